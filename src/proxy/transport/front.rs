//! The client-facing HTTP/1.1 side of a proxy worker's connection.
//!
//! Plain requests are read, served and answered here: HTTP/1.1 with an origin-form target, no
//! body (no `Transfer-Encoding`, `Content-Length` absent or 0), no `Expect`, no `Upgrade`, and a
//! head httparse accepts within [`MAX_HEADERS`] fields and [`MAX_HEAD_BYTES`]. Those are most
//! API calls. The first request that is not plain hands the connection, with every byte already
//! read, to hyper's server for the rest of its life: bodies, `100-continue`, HTTP/1.0,
//! malformed heads (hyper's 400) and oversized ones (431) get hyper's behaviour unchanged.
//!
//! Why: hyper's server dispatcher took about 9% of a busy worker's CPU on the proxy bench
//! (perf); a straight read → serve → write loop costs a fraction of that.
//!
//! ServerSettings ([`ServerSettings`], the same on both paths): the first head must be complete within
//! `header_read` of the connection's start, later heads within it of their first byte (hyper's
//! rule); a kept-alive connection idle for `keep_alive` between requests is closed (hyper has no
//! such timeout, so its path gets one here: [`close_when_idle`]); a response the client takes
//! nothing of for `send` closes the connection (nginx's `send_timeout`: [`send`] here,
//! [`Tracked`] on hyper's path, where an HTTP/2 window the client never opens stalls a stream
//! without filling any socket). Draining: an idle connection
//! closes at once, a request in flight is answered with `Connection: close`.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::drain::{self, Drain};
// Heads with more fields go to hyper, which answers 431: the same limit as for upstream heads.
use super::h1::MAX_HEADERS;
use super::workers::ServerSettings;
use crate::proxy::server::{Body, BoxError, Gateway};
/// Heads longer than this go to hyper, which reads on and applies its own limit.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Room kept free in the read buffer before each read.
const READ_CHUNK: usize = 8 * 1024;
/// Response bytes gathered before a write; bigger body frames are written as they come.
const WRITE_GATHER: usize = 64 * 1024;

/// What the front of the read buffer holds.
#[derive(Debug)]
// The big variant is the usual one: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A plain request, its head taken off the buffer; `close`: the client asked to close
    /// after the response.
    Plain { req: Request<Body>, close: bool },
    /// Something for hyper; the buffer is untouched.
    NotPlain,
}

/// Where a field's name and value sit in the head.
#[derive(Clone, Copy, Default)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

fn offset_in(base: &[u8], part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start as u32, (start + part.len()) as u32)
}

/// Whether a comma-separated field value lists `token` (any case).
fn lists(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Parses the request head at the front of `buf`; see [`Parsed`].
pub fn parse_request(buf: &mut BytesMut) -> Parsed {
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut spans = [Span::default(); MAX_HEADERS];
    let (head_len, method, target, count, close) = {
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Parsed::Partial,
            _ => return Parsed::NotPlain,
        };
        if head_len > MAX_HEAD_BYTES || req.version != Some(1) {
            return Parsed::NotPlain;
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Parsed::NotPlain;
        };
        if !path.starts_with('/') {
            return Parsed::NotPlain;
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Parsed::NotPlain;
        };
        // What follows a CONNECT is a tunnel, not the next request: hyper's to frame.
        if method == Method::CONNECT {
            return Parsed::NotPlain;
        }
        let mut close = false;
        let mut lengths = 0;
        for (field, span) in req.headers.iter().zip(spans.iter_mut()) {
            let (name, value) = (field.name.as_bytes(), field.value);
            let plain = match name.len() {
                6 => !name.eq_ignore_ascii_case(b"expect"),
                7 => !name.eq_ignore_ascii_case(b"upgrade"),
                17 => !name.eq_ignore_ascii_case(b"transfer-encoding"),
                // One `Content-Length: 0` at most: hyper folds repeated ones into one.
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    lengths += 1;
                    lengths == 1 && value.trim_ascii() == b"0"
                }
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    close |= lists(value, b"close");
                    true
                }
                _ => true,
            };
            if !plain {
                return Parsed::NotPlain;
            }
            *span = Span {
                name: offset_in(buf, name),
                value: offset_in(buf, value),
            };
        }
        (
            head_len,
            method,
            offset_in(buf, path.as_bytes()),
            req.headers.len(),
            close,
        )
    };
    let head = buf.split_to(head_len).freeze();
    let at = |(a, b): (u32, u32)| head.slice(a as usize..b as usize);
    let Ok(uri) = Uri::from_maybe_shared(at(target)) else {
        // Not a target hyper would take either; give it back for hyper's answer.
        return restore(buf, head);
    };
    let mut headers = HeaderMap::with_capacity(count);
    for span in &spans[..count] {
        let name = HeaderName::from_bytes(&head[span.name.0 as usize..span.name.1 as usize]);
        let value = HeaderValue::from_maybe_shared(at(span.value));
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => return restore(buf, head),
        }
    }
    let mut req = Request::new(empty());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Parsed::Plain { req, close }
}

/// Puts a head taken off the buffer back in front of it. Defensive: within `MAX_HEAD_BYTES`
/// no head is known that httparse accepts and `http` refuses (non-ASCII targets and field
/// values pass both; a target too long for `Uri` makes a head over the limit).
fn restore(buf: &mut BytesMut, head: Bytes) -> Parsed {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
    Parsed::NotPlain
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body bytes at all (HEAD, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding (length unknown).
    Chunked,
}

/// Decides the framing and writes the response head: status line, the fields as given (a
/// `Transfer-Encoding` or `Connection` among them is replaced by the framing's and the
/// connection's own), `Content-Length` when only the body knows it, `Date` when missing (the
/// upstream's is kept, as hyper's server did; `date` writes the current one), and
/// `Connection: close` when the connection ends after this response.
pub fn encode_head(
    head_request: bool,
    status: StatusCode,
    headers: &HeaderMap,
    body_len: Option<u64>,
    close: bool,
    date: impl FnOnce(&mut Vec<u8>),
    out: &mut Vec<u8>,
) -> Framing {
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut declared = None;
    let mut has_date = false;
    for (name, value) in headers {
        if name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        if name == CONTENT_LENGTH {
            declared = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        }
        has_date |= name == DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body_len {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !has_date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

thread_local! {
    /// The `Date` value for the current second, made once per second per worker.
    static DATE_VALUE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends the current `Date` field value (IMF-fixdate).
fn current_date(out: &mut Vec<u8>) {
    with_date(|d| out.extend_from_slice(d))
}

/// Calls `f` with the current `Date` field value (IMF-fixdate).
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE_VALUE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        f(cached.1.as_bytes())
    })
}

/// How a connection's fast path ended.
enum End {
    /// The connection is done (closed by either side, timed out, drained or failed).
    Closed,
    /// A request that is not plain sits at the front of the buffer: hyper takes over.
    Handoff,
}

/// Serves one client connection until it closes; see the module docs.
pub async fn serve(
    mut io: TcpStream,
    gateway: Arc<Gateway>,
    forwarded_for: Option<HeaderValue>,
    drain: Arc<Drain>,
    settings: ServerSettings,
) {
    // The connection's future lives as long as the connection, idle or not, and its size is
    // that of its largest state: what only a request in flight or a connection handed to hyper
    // needs is boxed for as long as it runs instead (the future was 6.9 KB in a release build
    // with a request's handling inline; 9,000 idle connections measured 7.7 KB each then, 4.3 KB
    // since). TLS connections keep rustls' state per connection anyway and are not boxed.
    if !settings.client_fast_path {
        return Box::pin(hand_to_hyper(
            io,
            Bytes::new(),
            gateway,
            forwarded_for,
            drain,
            settings,
        ))
        .await;
    }
    let mut buf = BytesMut::new();
    let end = fast_path(
        &mut io,
        &mut buf,
        &gateway,
        &forwarded_for,
        &drain,
        &settings,
    )
    .await;
    match end {
        End::Handoff => {
            Box::pin(hand_to_hyper(
                io,
                buf.freeze(),
                gateway,
                forwarded_for,
                drain,
                settings,
            ))
            .await
        }
        End::Closed => linger(io).await,
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of it is read at most.
const LINGER_BYTES: usize = 1024 * 1024;

/// Closes a connection the way nginx's lingering close does: the write side first (a FIN after
/// the last response), then whatever the client still sends is read and dropped for a short
/// while. Closing with unread bytes would reset the connection, and a reset can destroy the
/// response before the client has read it.
async fn linger(mut io: TcpStream) {
    if io.shutdown().await.is_err() {
        return;
    }
    // On the heap: in the task a 4 KB array would be part of every connection's size.
    let mut sink = vec![0u8; 4096];
    let mut read = 0;
    let _ = super::timer::timeout(LINGER_TIME, async {
        while read < LINGER_BYTES {
            match tokio::io::AsyncReadExt::read(&mut io, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

async fn fast_path(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    gateway: &Gateway,
    forwarded_for: &Option<HeaderValue>,
    drain: &Drain,
    settings: &ServerSettings,
) -> End {
    let mut out = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        let (req, asked_close) = match next_head(io, buf, &mut out, drain, first, settings).await {
            None => return End::Closed,
            Some(Parsed::NotPlain) => return End::Handoff,
            Some(Parsed::Plain { req, close }) => (req, close),
            Some(Parsed::Partial) => unreachable!("next_head returns whole heads"),
        };
        first = false;
        let head_request = req.method() == Method::HEAD;
        let resp = Box::pin(gateway.handle(req, forwarded_for.clone())).await;
        let close = asked_close || drain.draining();
        match write_response(io, &mut out, head_request, resp, close, settings.send).await {
            Ok(true) if !close => {}
            _ => return End::Closed,
        }
        // A request counts against the task's budget: a client that pipelines without end
        // (every request answered at once, a refusal say, its socket never empty) makes its
        // connection yield every so often, so it cannot keep the worker from its other
        // connections, its timers and shutdown.
        tokio::task::coop::consume_budget().await;
    }
}

/// The next request head (or something for hyper); `None` when the connection ends, drains or
/// runs out of time first: the first head must be whole within `header_read` of the
/// connection's start; before a later one the connection may idle for `keep_alive`, and from
/// its first byte the head must be whole within `header_read`. A later head that arrives whole
/// in one read (the usual case) arms only the idle deadline.
async fn next_head(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    drain: &Drain,
    first: bool,
    settings: &ServerSettings,
) -> Option<Parsed> {
    if !first {
        if buf.is_empty() && !read_at_once(io, buf).await? {
            // Idle: the connection gives its buffers back and waits holding none (10,000 idle
            // clients would otherwise hold about 9 KB each for as long as they stay). A busy
            // connection finds its next request already there and keeps them.
            *buf = BytesMut::new();
            *out = Vec::new();
            let idle = super::timer::timeout(settings.keep_alive, read_more(io, buf, drain));
            if !matches!(idle.await, Ok(Ok(n)) if n > 0) {
                return None;
            }
        }
        match parse_request(buf) {
            Parsed::Partial => {}
            parsed => return Some(parsed),
        }
    }
    super::timer::timeout(settings.header_read, read_head(io, buf, drain))
        .await
        .ok()
        .flatten()
}

/// Reads until a whole head (or something for hyper) is at the front of `buf`; `None` when
/// the connection ends first.
async fn read_head(io: &mut TcpStream, buf: &mut BytesMut, drain: &Drain) -> Option<Parsed> {
    loop {
        match parse_request(buf) {
            Parsed::Partial => {}
            parsed => return Some(parsed),
        }
        match read_more(io, buf, drain).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Reads what the socket already holds into `buf` without waiting: `Some(true)` when something
/// was read, `Some(false)` when nothing is there yet, `None` when the connection has ended.
/// Readiness is asked of tokio first (an exhausted task budget reads as `Some(false)`, the
/// idle path, which then yields).
async fn read_at_once(io: &mut TcpStream, buf: &mut BytesMut) -> Option<bool> {
    match poll_fn(|cx| Poll::Ready(io.poll_read_ready(cx))).await {
        Poll::Pending => return Some(false),
        Poll::Ready(Err(_)) => return None,
        Poll::Ready(Ok(())) => {}
    }
    make_room(buf);
    match io.try_read_buf(buf) {
        Ok(0) => None,
        Ok(_) => Some(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(false),
        Err(_) => None,
    }
}

/// The most a connection's read buffer holds: the longest head the fast path takes and one read
/// past it (which tells it the head is too long for it).
const MAX_READ_BUFFER: usize = MAX_HEAD_BYTES + READ_CHUNK;

/// Makes room for a read of up to [`READ_CHUNK`] bytes, growing `buf` by doubling but never past
/// [`MAX_READ_BUFFER`]: `BytesMut::reserve` doubles, so a client trickling a head just under the
/// limit would otherwise make each of its connections hold twice the limit until it times out.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() >= READ_CHUNK || buf.len() >= MAX_READ_BUFFER {
        return;
    }
    let want = (2 * buf.capacity())
        .max(buf.len() + READ_CHUNK)
        .min(MAX_READ_BUFFER);
    if want >= 2 * buf.capacity() {
        buf.reserve(want - buf.len());
    } else {
        let mut grown = BytesMut::with_capacity(want);
        grown.extend_from_slice(buf);
        *buf = grown;
    }
}

/// Reads what the socket has into `buf`; 0 at the end of the stream or when the worker is
/// draining (a head not yet complete is not waited for).
async fn read_more(io: &mut TcpStream, buf: &mut BytesMut, drain: &Drain) -> io::Result<usize> {
    poll_fn(|cx| loop {
        if drain.draining() {
            return Poll::Ready(Ok(0));
        }
        std::task::ready!(io.poll_read_ready(cx))?;
        // Room only once there is something to read: a connection waiting for its client
        // holds no buffer.
        make_room(buf);
        match io.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    })
    .await
}

/// Writes the response; true when the connection can carry another request. A client that
/// takes none of it for `send_timeout` ends the connection ([`send`]).
async fn write_response(
    io: &mut TcpStream,
    out: &mut Vec<u8>,
    head_request: bool,
    resp: Response<Body>,
    close: bool,
    send_timeout: Duration,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    out.clear();
    // One allocation for a head when an idle wait gave the buffer back.
    out.reserve(1024);
    let framing = encode_head(
        head_request,
        parts.status,
        &parts.headers,
        body.size_hint().exact(),
        close,
        current_date,
        out,
    );
    let mut left = match framing {
        Framing::None => {
            send(io, out, send_timeout).await?;
            return Ok(true);
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    loop {
        // Take what is ready now; write what is gathered before waiting for more.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    send(io, out, send_timeout).await?;
                    out.clear();
                }
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => {
                // The body failed midway: the client must not take it as whole.
                send(io, out, send_timeout).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not sent
            },
        };
        if data.is_empty() {
            continue;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        } else {
            let n = data.len() as u64;
            if n > left {
                // More than the declared length: send what was declared and close.
                out.extend_from_slice(&data[..left as usize]);
                send(io, out, send_timeout).await?;
                return Ok(false);
            }
            left -= n;
        }
        if out.len() + data.len() <= WRITE_GATHER {
            out.extend_from_slice(&data);
        } else {
            // A big frame: what is gathered, then the frame, without copying it.
            send(io, out, send_timeout).await?;
            out.clear();
            send(io, &data, send_timeout).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    send(io, out, send_timeout).await?;
    out.clear();
    Ok(framing == Framing::Chunked || left == 0)
}

/// Writes all of `data`, as nginx's `send_timeout` does: the connection fails when the client
/// has taken nothing for `timeout` (a client that stops reading would otherwise hold the
/// request's upstream connection for as long as it likes). A write the socket takes at once,
/// the usual case, arms no timer.
async fn send(io: &mut TcpStream, mut data: &[u8], timeout: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match io.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match super::timer::timeout(timeout, io.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Serves the rest of the connection with hyper, the bytes already read first.
async fn hand_to_hyper(
    io: TcpStream,
    read: Bytes,
    gateway: Arc<Gateway>,
    forwarded_for: Option<HeaderValue>,
    drain: Arc<Drain>,
    settings: ServerSettings,
) {
    let activity = Arc::new(Activity::new(false));
    let service = hyper_service(gateway, forwarded_for, activity.clone(), None);
    let io = Rewind::new(io, read, activity.clone(), None);
    // Both deadlines are kept by `close_when_idle`: hyper's own header-read timer also runs
    // while a kept-alive connection waits for its next request, which would cut idle
    // connections at `header_read` instead of `keep_alive`.
    let conn = super::workers::http1_builder(None).serve_connection(TokioIo::new(io), service);
    close_when_idle(drain::graceful(drain, conn), &activity, &settings).await;
}

/// Serves one TLS client connection with hyper: the handshake (within `headerReadTimeout`),
/// then HTTP/2 or HTTP/1.1 as ALPN chose, every response carrying `Strict-Transport-Security`.
pub async fn serve_tls(
    io: TcpStream,
    tls: Arc<crate::proxy::tls::ServerTls>,
    gateway: Arc<Gateway>,
    forwarded_for: Option<HeaderValue>,
    drain: Arc<Drain>,
    settings: ServerSettings,
) {
    let handshake = super::timer::timeout(settings.header_read, tls.acceptor.accept(io)).await;
    let Some(stream) = tls.accepted(handshake) else {
        return;
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let activity = Arc::new(Activity::new(h2));
    let service = hyper_service(
        gateway,
        forwarded_for,
        activity.clone(),
        Some(tls.hsts.clone()),
    );
    // HTTP/1.1: hyper answers a head it cannot parse itself (400, 414, 431); `Rewind` adds
    // the header to those answers. (HTTP/2 has no such answers: a bad stream is reset.)
    let own_answers = (!h2).then(|| tls.hsts.clone());
    let io = TokioIo::new(Rewind::new(
        stream,
        Bytes::new(),
        activity.clone(),
        own_answers,
    ));
    if h2 {
        let mut http = hyper::server::conn::http2::Builder::new(LocalExec);
        http.timer(super::timer::WorkerTimer)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .max_concurrent_streams(MAX_H2_STREAMS);
        let conn = http.serve_connection(io, service);
        close_when_idle(drain::graceful(drain, conn), &activity, &settings).await;
    } else {
        let conn = super::workers::http1_builder(None).serve_connection(io, service);
        close_when_idle(drain::graceful(drain, conn), &activity, &settings).await;
    }
}

/// Streams one HTTP/2 client may have open at once (nginx's `http2_max_concurrent_streams`).
const MAX_H2_STREAMS: u32 = 128;

/// Runs HTTP/2 streams as tasks on the worker's own (single-threaded) runtime.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// The service hyper calls for each request of a connection: the gateway's policies, the
/// request counted in flight until its body is sent, and `hsts` on every response (TLS).
fn hyper_service(
    gateway: Arc<Gateway>,
    forwarded_for: Option<HeaderValue>,
    activity: Arc<Activity>,
    hsts: Option<HeaderValue>,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Tracked>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, std::convert::Infallible>> + Send,
> + Clone {
    // The connection's own handle on the gateway: cloning it per request touches a reference
    // count no other core uses.
    let gateway = Arc::new(gateway);
    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (gw, forwarded_for, hsts) = (gateway.clone(), forwarded_for.clone(), hsts.clone());
        let in_flight = InFlight::new(activity.clone());
        async move {
            let mut req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
            if hsts.is_some() {
                req.extensions_mut().insert(crate::proxy::server::OverTls);
            }
            let mut resp = gw.handle(req, forwarded_for).await;
            if let Some(hsts) = hsts {
                resp.headers_mut()
                    .insert(http::header::STRICT_TRANSPORT_SECURITY, hsts);
            }
            // In flight until hyper has written the whole body and drops it. hyper frames the
            // body by its Content-Length, so that is its length whatever the body says.
            let length = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            Ok::<_, std::convert::Infallible>(
                resp.map(|body| Tracked::new(body, in_flight, length)),
            )
        }
    })
}

/// No head is being read (for [`Activity::head_since`]).
const NO_HEAD: u64 = u64::MAX;
/// A response slot of [`Activity::waiting`] that no request holds.
const FREE: u64 = u64::MAX;
/// A response slot whose response is not waiting for the client: its head is not ready yet,
/// or hyper has asked for its next piece.
const TAKEN: u64 = u64::MAX - 1;

/// What a connection on hyper's path has been doing, for [`close_when_idle`].
struct Activity {
    start: Instant,
    /// HTTP/2: bytes the client sends (PINGs, SETTINGS, WINDOW_UPDATEs) neither start a request
    /// nor keep an idle connection open; only requests do.
    h2: bool,
    /// Nanoseconds after `start` of the last read or write that moved bytes (HTTP/2: of the
    /// last request's start or end).
    last: AtomicU64,
    /// Nanoseconds after `start` of the first byte of a request head not yet served, or
    /// [`NO_HEAD`]. The connection's first head counts from its start.
    head_since: AtomicU64,
    /// Requests whose responses hyper has not finished writing.
    in_flight: AtomicUsize,
    /// Requests the service has been called for.
    requests: AtomicU64,
    /// One slot per request in flight, and who to tell when a response starts waiting.
    waiting: std::sync::Mutex<Slots>,
}

/// [`Activity::waiting`].
#[derive(Default)]
struct Slots {
    /// Per response: since when (nanoseconds after `start`) it has had a piece ready that
    /// hyper has not taken, because the client takes nothing (a full socket buffer, a closed
    /// HTTP/2 flow-control window); [`TAKEN`] or [`FREE`] otherwise.
    stamps: Vec<u64>,
    /// The task of [`close_when_idle`] while requests are in flight and no response is waiting
    /// (it has no deadline then). HTTP/2 runs each stream as its own task, so a stream's
    /// response can start waiting, or its request end, while the connection's task sleeps:
    /// that task is woken to arm its deadline. (HTTP/1 bodies are polled inside the
    /// connection's task, which looks again after every poll.)
    idle_watch: Option<std::task::Waker>,
}

impl Activity {
    fn new(h2: bool) -> Self {
        Self {
            start: Instant::now(),
            h2,
            last: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            waiting: std::sync::Mutex::new(Slots::default()),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    /// Bytes were written.
    fn wrote(&self) {
        if !self.h2 {
            self.touch();
        }
    }

    /// Bytes arrived: with no request in flight they start a head (HTTP/1).
    fn read(&self) {
        if self.h2 {
            return;
        }
        self.touch();
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NO_HEAD
        {
            self.head_since
                .store(self.last.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn at(&self, nanos: u64) -> Instant {
        self.start + Duration::from_nanos(nanos)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Nothing panics while holding it; a poisoned lock still holds valid stamps.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new request's response, not waiting yet.
    fn new_slot(&self) -> usize {
        let stamps = &mut self.slots().stamps;
        match stamps.iter().position(|&s| s == FREE) {
            Some(i) => {
                stamps[i] = TAKEN;
                i
            }
            None => {
                stamps.push(TAKEN);
                stamps.len() - 1
            }
        }
    }

    /// Marks slot `i`: waiting for the client from now (`true`), or not waiting. A response
    /// that starts waiting while none was wakes [`Slots::idle_watch`].
    fn set_waiting(&self, i: usize, waiting: bool) {
        let stamp = if waiting { self.now() } else { TAKEN };
        let mut slots = self.slots();
        if let Some(slot) = slots.stamps.get_mut(i) {
            *slot = stamp;
        }
        if waiting {
            let watch = slots.idle_watch.take();
            drop(slots);
            if let Some(watch) = watch {
                watch.wake();
            }
        }
    }

    /// Wakes [`Slots::idle_watch`]: a request has ended outside the connection's task.
    fn wake_watch(&self) {
        let watch = self.slots().idle_watch.take();
        if let Some(watch) = watch {
            watch.wake();
        }
    }

    fn free_slot(&self, i: usize) {
        if let Some(slot) = self.slots().stamps.get_mut(i) {
            *slot = FREE;
        }
    }

    /// When the connection is to be closed if nothing happens first: a head being read must
    /// be whole `header_read` after its first byte; an idle connection closes `keep_alive`
    /// after its last activity; with requests in flight, a response that has waited
    /// `send` for the client to take its next piece closes it (nginx's `send_timeout`).
    /// With requests in flight and none waiting there is no deadline: `watch` is woken when
    /// one starts waiting.
    fn due(&self, settings: &ServerSettings, watch: &std::task::Waker) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            let mut slots = self.slots();
            let oldest = slots.stamps.iter().copied().filter(|&s| s < TAKEN).min();
            if oldest.is_none() && self.h2 {
                match &mut slots.idle_watch {
                    Some(w) => w.clone_from(watch),
                    none => *none = Some(watch.clone()),
                }
            }
            return Some(self.at(oldest?) + settings.send);
        }
        Some(match self.head_since.load(Ordering::Relaxed) {
            NO_HEAD => self.at(self.last.load(Ordering::Relaxed)) + settings.keep_alive,
            since => self.at(since) + settings.header_read,
        })
    }
}

/// Counts a request from the service's call (its head is whole) until its response body is
/// dropped, and holds the response's slot in [`Activity::waiting`].
struct InFlight {
    activity: Arc<Activity>,
    slot: usize,
}

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.head_since.store(NO_HEAD, Ordering::Relaxed);
        if activity.h2 {
            activity.touch();
        }
        let slot = activity.new_slot();
        Self { activity, slot }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.free_slot(self.slot);
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.activity.touch();
        // (With none left the connection's idle deadline starts.)
        self.activity.wake_watch();
    }
}

/// A response body that keeps its request counted as in flight, and notes while it has a
/// piece ready that hyper has not taken: from when its head is handed over, and from each
/// piece it hands over until hyper asks for the next.
///
/// A body of known length (its own size hint, else the response's Content-Length, by which
/// hyper frames it) ends when that many bytes have gone out, whether or not the body says so
/// itself: hyper then drops it at once (and the request stops counting as in flight)
/// instead of keeping it until its buffer is flushed, while the connection already reads the
/// next head (see [`Rewind::poll_write`]).
struct Tracked {
    body: Body,
    in_flight: InFlight,
    /// Bytes still to come, when the body's length is known.
    left: Option<u64>,
}

impl Tracked {
    fn new(body: Body, in_flight: InFlight, content_length: Option<u64>) -> Self {
        in_flight.activity.set_waiting(in_flight.slot, true);
        let left = body.size_hint().exact().or(content_length);
        Self {
            body,
            in_flight,
            left,
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let (activity, slot) = (&this.in_flight.activity, this.in_flight.slot);
        activity.set_waiting(slot, false);
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            activity.set_waiting(slot, true);
            if let (Some(left), Some(data)) = (this.left.as_mut(), frame.data_ref()) {
                *left = left.saturating_sub(data.len() as u64);
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.left == Some(0) || self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Runs `conn` until it ends, or until [`Activity::due`] passes: a head not whole within
/// `header_read`, no request in flight and no bytes moved for `keep_alive` (hyper's server
/// has no idle timeout of its own), or a response the client has taken nothing of for `send`.
/// Then an HTTP/2 connection with nothing in flight is closed gracefully (GOAWAY, then at most
/// [`LINGER_TIME`] more); otherwise `conn` is dropped, which closes the connection.
///
/// What changes the due time (bytes read or written, a request starting or finishing, a
/// response piece handed over or taken) happens while `conn` is polled here, so the deadline
/// is brought up to date right after each poll; the exception, an HTTP/2 stream's response
/// starting to wait in the stream's own task while no deadline is armed, wakes this task (see
/// [`Slots::idle_watch`]). A deadline that fires early is looked at again, not obeyed.
async fn close_when_idle<C: hyper_util::server::graceful::GracefulConnection>(
    conn: drain::Graceful<C>,
    activity: &Activity,
    settings: &ServerSettings,
) {
    let mut conn = std::pin::pin!(conn);
    let mut armed: Option<(Instant, super::timer::Sleep)> = None;
    let mut goaway: Option<super::timer::Sleep> = None;
    poll_fn(|cx| loop {
        if conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if let Some(last) = goaway.as_mut() {
            return Pin::new(last).poll(cx);
        }
        let Some(due) = activity.due(settings, cx.waker()) else {
            armed = None;
            return Poll::Pending;
        };
        if armed.as_ref().is_none_or(|(at, _)| *at != due) {
            armed = Some((due, super::timer::sleep_until(due)));
        }
        match armed.as_mut() {
            Some((_, sleep)) => std::task::ready!(Pin::new(sleep).poll(cx)),
            None => return Poll::Pending,
        }
        if !activity.h2 || activity.in_flight.load(Ordering::Relaxed) > 0 {
            return Poll::Ready(());
        }
        conn.as_mut().close_gracefully();
        goaway = Some(super::timer::sleep_until(Instant::now() + LINGER_TIME));
    })
    .await
}

/// A stream whose first reads return bytes already read from it, noting when bytes move. When
/// hyper is done with it, the connection is closed with [`Closing::close`].
///
/// With `hsts` (HTTP/1.1 over TLS) it also adds `Strict-Transport-Security` to the answers
/// hyper makes itself, without a call to the service, for a head it cannot parse (400, 414,
/// 431): see [`Rewind::poll_write`].
struct Rewind<S: Closing> {
    read: Bytes,
    /// Taken by `Drop`.
    io: Option<S>,
    activity: Arc<Activity>,
    hsts: Option<HeaderValue>,
    /// What hyper still held after the last write (with `hsts`).
    held: Held,
    /// Bytes accepted from hyper and not yet written (an answer with the header added).
    pending: Bytes,
}

/// What hyper's write buffer held after a write: the `len` bytes it presented that the socket
/// did not take, presented when no request was in flight (`settled`) and after the service had
/// been called for `requests` requests. hyper keeps one flat buffer (`writev(false)`), presents
/// what it holds from its start and appends at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    len: usize,
    settled: bool,
    requests: u64,
}

/// How a client connection is closed once hyper is done with it./// How a client connection is closed once hyper is done with it.
trait Closing: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn close(self) -> impl Future<Output = ()> + Send;
}

impl Closing for TcpStream {
    fn close(self) -> impl Future<Output = ()> + Send {
        linger(self)
    }
}

impl Closing for tokio_rustls::server::TlsStream<TcpStream> {
    /// close_notify and FIN (hyper has usually sent them already), then the lingering close.
    async fn close(mut self) {
        let _ = super::timer::timeout(LINGER_TIME, self.shutdown()).await;
        linger(self.into_inner().0).await
    }
}

impl<S: Closing> Rewind<S> {
    fn new(io: S, read: Bytes, activity: Arc<Activity>, hsts: Option<HeaderValue>) -> Self {
        Self {
            read,
            io: Some(io),
            activity,
            hsts,
            held: Held {
                len: 0,
                settled: true,
                requests: 0,
            },
            pending: Bytes::new(),
        }
    }

    fn io(&mut self) -> io::Result<Pin<&mut S>> {
        match self.io.as_mut() {
            Some(io) => Ok(Pin::new(io)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Writes [`Rewind::pending`] out; ready once it is all written.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let pending = self.pending.clone();
            match std::task::ready!(self.io()?.poll_write(cx, &pending))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => {
                    self.pending.advance(n);
                    self.activity.wrote();
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `data` with `strict-transport-security: hsts` added to its head, when `data` starts with an
/// HTTP/1 response head (whole within `data`) that has no such field; `None` otherwise.
fn with_hsts(data: &[u8], hsts: &HeaderValue) -> Option<Bytes> {
    if !data.starts_with(b"HTTP/1.") {
        return None;
    }
    let head_end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 2;
    let head = &data[..head_end];
    let status_end = head.windows(2).position(|w| w == b"\r\n")? + 2;
    let field = b"strict-transport-security:";
    let has_it = head[status_end..]
        .split(|&b| b == b'\n')
        .any(|line| line.len() >= field.len() && line[..field.len()].eq_ignore_ascii_case(field));
    if has_it {
        return None;
    }
    let mut out = BytesMut::with_capacity(data.len() + field.len() + hsts.len() + 3);
    out.extend_from_slice(&data[..status_end]);
    out.extend_from_slice(field);
    out.extend_from_slice(b" ");
    out.extend_from_slice(hsts.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&data[status_end..]);
    Some(out.freeze())
}

impl<S: Closing> Drop for Rewind<S> {
    fn drop(&mut self) {
        if let (Some(io), Ok(runtime)) = (self.io.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(io.close());
        }
    }
}

impl<S: Closing> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.has_remaining() {
            let n = self.read.len().min(dst.remaining());
            dst.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = dst.filled().len();
        let polled = self.io()?.poll_read(cx, dst);
        if dst.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<S: Closing> AsyncWrite for Rewind<S> {
    /// With `hsts`: hyper writes its own answer to an unparsable head (400, 414, 431) without
    /// a call to the service, so with no request in flight, at the end of its buffer: behind
    /// what the socket has not taken yet of the previous response when the client reads slowly.
    /// Bytes hyper presents beyond what it held after the last write ([`Held`]), when nothing
    /// was in flight then and nothing is now and the service has not been called since, are
    /// such an answer: a response head lacking the field gets it. Every other write passes
    /// untouched: the previous response's bytes were all presented before, and the service's
    /// own responses carry the field already.
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if self.hsts.is_none() {
            let polled = self.io()?.poll_write(cx, data);
            if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
                self.activity.wrote();
            }
            return polled;
        }
        let now = Held {
            len: 0,
            settled: self.activity.in_flight.load(Ordering::Relaxed) == 0,
            requests: self.activity.requests.load(Ordering::Relaxed),
        };
        let held = self.held;
        let own_from = (held.settled && now.settled && held.requests == now.requests)
            .then_some(held.len)
            .filter(|&at| at < data.len());
        let hsts = self.hsts.as_ref();
        if let Some((at, answer)) =
            own_from.and_then(|at| Some((at, with_hsts(&data[at..], hsts?)?)))
        {
            let mut all = BytesMut::with_capacity(at + answer.len());
            all.extend_from_slice(&data[..at]);
            all.extend_from_slice(&answer);
            self.pending = all.freeze();
            self.held = now;
            // Accepted whole; what the socket does not take now goes first next time.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(data.len()));
        }
        let polled = self.io()?.poll_write(cx, data);
        match &polled {
            Poll::Ready(Ok(n)) => {
                if *n > 0 {
                    self.activity.wrote();
                }
                self.held = Held {
                    len: data.len().saturating_sub(*n),
                    ..now
                };
            }
            Poll::Pending => {
                self.held = Held {
                    len: data.len(),
                    ..now
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        self.io()?.poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        self.io()?.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.hsts.is_some() {
            // One path for the check above (hyper writes flat here anyway).
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        std::task::ready!(self.poll_pending(cx))?;
        let polled = self.io()?.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However a head arrives (a byte or a chunk at a time, starting from an empty buffer or
    /// from one a pipelined request left), the read buffer never grows past the longest head
    /// the fast path takes plus one read, and there is always room for the next read below it.
    #[test]
    fn the_read_buffer_never_outgrows_the_head_limit() {
        for step in [
            1,
            100,
            1000,
            4096,
            READ_CHUNK,
            READ_CHUNK + 1,
            3 * READ_CHUNK,
        ] {
            for start in [0, 10, READ_CHUNK - 1, 20_000] {
                let mut buf = BytesMut::new();
                buf.extend_from_slice(&vec![b'a'; start]);
                while buf.len() < MAX_READ_BUFFER {
                    make_room(&mut buf);
                    assert!(
                        buf.capacity() <= MAX_READ_BUFFER,
                        "step {step}, start {start}: {} bytes of room at {} bytes",
                        buf.capacity(),
                        buf.len()
                    );
                    let spare = buf.capacity() - buf.len();
                    assert!(
                        spare > 0,
                        "step {step}, start {start}: no room at {}",
                        buf.len()
                    );
                    let n = step.min(spare);
                    buf.extend_from_slice(&vec![b'a'; n]);
                }
            }
        }
    }

    /// A plain connection's future, which lives (boxed) for as long as the connection does,
    /// idle or not: its size is that of its largest state, so anything big inlined into it
    /// (a request's handling, hyper's connection, a stack buffer) is paid by every idle
    /// connection. 10,000 idle connections cost 6.9 KB each in this future before.
    #[tokio::test]
    async fn an_idle_connection_keeps_a_small_future() {
        use crate::entities::keys;
        use crate::proxy::{accesslog, config, limiter, metrics, state};
        let cfg = config::ProxyConfig::default();
        let built = state::GatewayState::build_of(
            &cfg,
            "test",
            None,
            None,
            config::Routes::MayBeNone,
            None,
        )
        .unwrap();
        let metrics = metrics::ProxyMetrics::new();
        let gateway = Arc::new(Gateway::new(
            state::SharedState::new(built),
            keys::Pepper::new(vec![7; 32]).unwrap(),
            limiter::Limiter::local(metrics.clone()),
            metrics.clone(),
            accesslog::AccessLog::disabled(metrics.access_log_dropped.clone()),
            crate::proxy::server::system_clock(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let settings = ServerSettings::of(&cfg);
        let conn = serve(io, gateway, None, Drain::new(), settings);
        let size = std::mem::size_of_val(&conn);
        // 1.6 KB in a debug build (the test profile), less in a release one.
        assert!(size <= 2048, "a connection's future takes {size} bytes");
    }

    /// A socket that takes what each step of its plan says (`None`: nothing, not ready) and
    /// keeps what it took.
    struct Sink {
        plan: std::collections::VecDeque<Option<usize>>,
        out: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Sink {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.plan.pop_front().unwrap_or(Some(usize::MAX)) {
                None => Poll::Pending,
                Some(n) => {
                    let n = n.min(data.len());
                    self.out.lock().unwrap().extend_from_slice(&data[..n]);
                    Poll::Ready(Ok(n))
                }
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Closing for Sink {
        async fn close(self) {}
    }

    /// What happens between a response's last bytes and what hyper appends next.
    #[derive(Debug, Clone, Copy)]
    enum Between {
        /// Nothing: hyper answers an unparsable head itself.
        Nothing,
        /// The service was called for another request, which has finished.
        Served,
        /// The service was called for another request, still in flight.
        InFlight,
    }

    /// Over TLS, the answer hyper appends to its buffer without a call to the service gets the
    /// header, whether the socket took the previous response whole or not (a client reading
    /// slowly); bytes of the service's responses never do, even when they read like a head.
    #[test]
    fn hsts_goes_on_hypers_own_answer_behind_an_unsent_response_and_nowhere_else() {
        let hsts = HeaderValue::from_static("max-age=1");
        // A body that reads like hyper's answer.
        let body = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let response = format!(
            "HTTP/1.1 200 OK\r\nstrict-transport-security: max-age=1\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let own = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let own_with = "HTTP/1.1 400 Bad Request\r\nstrict-transport-security: max-age=1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // (how the socket takes the response: its plan; what happens next; header added?)
        let cases: Vec<(Vec<Option<usize>>, Between, bool)> = vec![
            (vec![Some(usize::MAX)], Between::Nothing, true),
            (vec![Some(10), None], Between::Nothing, true),
            (vec![Some(70), Some(5), None, None], Between::Nothing, true),
            (vec![None], Between::Nothing, true),
            (vec![Some(usize::MAX)], Between::Served, false),
            (vec![Some(10), None], Between::Served, false),
            (vec![Some(10), None], Between::InFlight, false),
            (vec![Some(usize::MAX)], Between::InFlight, false),
        ];
        for (plan, between, adds) in cases {
            let case = format!("{plan:?} then {between:?}");
            let activity = Arc::new(Activity::new(false));
            let out = Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = Sink {
                plan: plan.iter().copied().collect(),
                out: out.clone(),
            };
            let mut w = Rewind::new(sink, Bytes::new(), activity.clone(), Some(hsts.clone()));
            // hyper's flat buffer: the response, written while its request is in flight; the
            // request ends (body dropped) after its last piece is buffered.
            let mut buf = BytesMut::new();
            let request = InFlight::new(activity.clone());
            buf.extend_from_slice(response.as_bytes());
            drop(request);
            for _ in &plan {
                match Pin::new(&mut w).poll_write(&mut cx, &buf) {
                    Poll::Ready(Ok(n)) => buf.advance(n),
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => panic!("{case}: {e}"),
                }
                if buf.is_empty() {
                    break;
                }
            }
            let _second = match between {
                Between::Nothing => None,
                Between::Served => {
                    drop(InFlight::new(activity.clone()));
                    None
                }
                Between::InFlight => Some(InFlight::new(activity.clone())),
            };
            buf.extend_from_slice(own.as_bytes());
            while !buf.is_empty() {
                match Pin::new(&mut w).poll_write(&mut cx, &buf) {
                    Poll::Ready(Ok(n)) => buf.advance(n),
                    other => panic!("{case}: {other:?}"),
                }
            }
            assert!(Pin::new(&mut w).poll_flush(&mut cx).is_ready(), "{case}");
            let want = format!("{response}{}", if adds { own_with } else { own });
            let got = String::from_utf8(out.lock().unwrap().clone()).unwrap();
            assert_eq!(got, want, "{case}");
        }
    }

    /// A body of known length that never says it has ended itself (a PII-flagging or masking
    /// wrapper, say) ends for hyper once its length has gone out: the length its size hint
    /// gives, or else the response's Content-Length.
    #[test]
    fn a_body_of_known_length_ends_when_its_bytes_are_out() {
        struct NeverSaysEnd(Option<Bytes>, http_body::SizeHint);
        impl HttpBody for NeverSaysEnd {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
                Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
            }
            fn size_hint(&self) -> http_body::SizeHint {
                self.1
            }
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let hinted = http_body::SizeHint::with_exact(5);
        let unknown = http_body::SizeHint::default();
        // (what goes out, the body's hint, the response's Content-Length, ended?)
        let cases = [
            ("hello", hinted, None, true),
            ("hel", hinted, None, false),
            ("hello", unknown, Some(5), true),
            ("hel", unknown, Some(5), false),
            ("hello", unknown, None, false),
        ];
        for (chunks, hint, length, ends) in cases {
            let activity = Arc::new(Activity::new(false));
            let body = NeverSaysEnd(Some(Bytes::from(chunks)), hint).boxed();
            let mut t = Tracked::new(body, InFlight::new(activity.clone()), length);
            assert!(!t.is_end_stream());
            assert!(Pin::new(&mut t).poll_frame(&mut cx).is_ready());
            assert_eq!(t.is_end_stream(), ends, "{chunks:?}");
            assert_eq!(activity.in_flight.load(Ordering::Relaxed), 1);
            drop(t);
            assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
        }
    }

    /// `with_hsts` adds the field to a whole HTTP/1 response head that lacks it, after the
    /// status line and before everything else, and leaves everything else alone.
    #[test]
    fn hsts_is_added_to_a_bare_response_head_and_to_nothing_else() {
        let v = HeaderValue::from_static("max-age=1");
        let hyper_400 = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Fri, 04 Dec 2026 10:00:00 GMT\r\n\r\n";
        assert_eq!(
            with_hsts(hyper_400.as_bytes(), &v).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nstrict-transport-security: max-age=1\r\ncontent-length: 0\r\ndate: Fri, 04 Dec 2026 10:00:00 GMT\r\n\r\n"
        );
        // (data, whether the field is added after its status line)
        let cases = [
            ("HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n", true),
            ("HTTP/1.0 414 URI Too Long\r\n\r\n", true),
            // Whatever follows the head stays as it was.
            ("HTTP/1.1 400 Bad Request\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", true),
            // A field that only contains the name is not it.
            ("HTTP/1.1 400 Bad Request\r\nx-strict-transport-security: 1\r\n\r\n", true),
            // The field already there, in any case: untouched.
            ("HTTP/1.1 200 OK\r\nstrict-transport-security: max-age=9\r\n\r\n", false),
            ("HTTP/1.1 204 No Content\r\ndate: x\r\nStrict-Transport-Security: max-age=9\r\n\r\n", false),
            // Not a whole HTTP/1 head at the start: untouched.
            ("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n", false),
            ("{\"HTTP/1.1 400\": 1}\r\n\r\n", false),
            ("HTTP/2 400\r\n\r\n", false),
            (" HTTP/1.1 400 Bad Request\r\n\r\n", false),
            ("", false),
        ];
        for (data, adds) in cases {
            let want = adds.then(|| {
                let (status, rest) = data.split_once("\r\n").unwrap();
                format!("{status}\r\nstrict-transport-security: max-age=1\r\n{rest}")
            });
            let got =
                with_hsts(data.as_bytes(), &v).map(|b| String::from_utf8(b.to_vec()).unwrap());
            assert_eq!(got, want, "{data:?}");
        }
    }

    fn plain(text: &str) -> (Request<Body>, bool, BytesMut) {
        let mut buf = BytesMut::from(text);
        match parse_request(&mut buf) {
            Parsed::Plain { req, close } => (req, close, buf),
            other => panic!("{text:?} not plain: {other:?}"),
        }
    }

    #[test]
    fn a_plain_head_becomes_a_request_and_leaves_what_follows() {
        let (req, close, rest) = plain(
            "GET /api/x?y=1 HTTP/1.1\r\nHost: gw\r\nX-Tag: a\r\nx-tag: b\r\nContent-Length: 0\r\n\r\nGET /next",
        );
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/api/x");
        assert_eq!(req.uri().query(), Some("y=1"));
        assert_eq!(req.headers()["host"], "gw");
        let tags: Vec<_> = req.headers().get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"], "repeated fields kept in order");
        assert!(!close);
        assert_eq!(
            &rest[..],
            b"GET /next",
            "the next request stays in the buffer"
        );
        assert!(req.body().is_end_stream());
    }

    #[test]
    fn connection_close_is_noticed_among_other_tokens() {
        let (_, close, _) = plain("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(close);
        let (_, close, _) = plain("GET / HTTP/1.1\r\nConnection: closed\r\n\r\n");
        assert!(!close, "a token is matched whole");
    }

    #[test]
    fn a_partial_head_waits_and_leaves_the_buffer_alone() {
        let text = "GET /api/x HTTP/1.1\r\nHost: g";
        let mut buf = BytesMut::from(text);
        assert!(matches!(parse_request(&mut buf), Parsed::Partial));
        assert_eq!(&buf[..], text.as_bytes());
    }

    #[test]
    fn anything_but_a_plain_request_is_left_whole_for_hyper() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let long = format!(
            "GET / HTTP/1.1\r\nx-long: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let cases = [
            "GET / HTTP/1.0\r\n\r\n".to_string(),
            "POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".into(),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n".into(),
            "GET http://other/ HTTP/1.1\r\n\r\n".into(),
            "OPTIONS * HTTP/1.1\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nno colon\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n".into(),
            format!("GET / HTTP/1.1\r\n{many}\r\n"),
            long,
        ];
        for text in cases {
            let mut buf = BytesMut::from(text.as_str());
            let got = parse_request(&mut buf);
            assert!(
                matches!(got, Parsed::NotPlain),
                "{:?}: {got:?}",
                &text[..text.len().min(60)]
            );
            assert_eq!(&buf[..], text.as_bytes(), "left whole");
        }
    }

    fn head(
        method_head: bool,
        status: u16,
        fields: &[(&str, &str)],
        body_len: Option<u64>,
        close: bool,
    ) -> (String, Framing) {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let framing = encode_head(
            method_head,
            StatusCode::from_u16(status).unwrap(),
            &h,
            body_len,
            close,
            |out: &mut Vec<u8>| out.extend_from_slice(b"Mon, 30 Nov 2026 04:00:00 GMT"),
            &mut out,
        );
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn response_heads_say_how_the_body_ends() {
        let (text, f) = head(false, 200, &[("x-a", "1")], Some(5), false);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: Mon, 30 Nov 2026 04:00:00 GMT\r\n\r\n"
        );
        assert_eq!(f, Framing::Length(5));

        let (text, f) = head(false, 200, &[("content-length", "7")], None, false);
        assert_eq!(f, Framing::Length(7), "the declared length is kept");
        assert_eq!(text.matches("content-length").count(), 1);

        let (text, f) = head(false, 502, &[], None, true);
        assert_eq!(f, Framing::Chunked);
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        assert!(text.ends_with("connection: close\r\n\r\n"));

        let (text, f) = head(true, 200, &[("content-length", "9")], Some(9), false);
        assert_eq!(f, Framing::None, "HEAD: no body");
        assert!(text.contains("content-length: 9\r\n"));
        for status in [204, 304] {
            let (text, f) = head(false, status, &[], None, false);
            assert_eq!(f, Framing::None);
            assert!(!text.contains("transfer-encoding"), "{status}: {text}");
        }
    }

    #[test]
    fn the_connections_own_fields_are_not_copied_from_the_response() {
        let fields = [
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive"),
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ];
        let (text, f) = head(false, 599, &fields, Some(2), false);
        assert_eq!(
            text,
            "HTTP/1.1 599 \r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(f, Framing::Length(2));
    }

    #[test]
    fn the_date_is_the_current_second_in_imf_fixdate() {
        let text = with_date(|d| String::from_utf8(d.to_vec()).unwrap());
        let parsed = httpdate::parse_http_date(&text).unwrap();
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off < Duration::from_secs(2), "{text}");
        assert_eq!(text.len(), 29);
    }
}
