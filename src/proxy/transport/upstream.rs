//! The proxy's upstream connections: per worker thread, a pool of HTTP/1 connections to each
//! upstream, used without locks (a worker's requests and their upstream calls stay on its
//! thread, see `server::run_with_workers`).
//!
//! A connection goes back to its pool when its response body has been read to the end; one
//! whose body is dropped half-read is closed. Idle connections are reused newest first, closed
//! after [`IDLE_TIMEOUT`] or once the upstream closes them (a sweep on each worker, every
//! [`SWEEP_EVERY`]), and at most [`MAX_IDLE_PER_UPSTREAM`] wait per upstream. A request an idle
//! connection could not take (the upstream closed it meanwhile) goes out again on another
//! connection. A request already written is sent again only on the fast path below, when its
//! method is idempotent and the pooled connection closed without a byte of response.
//!
//! Bodiless requests to plain-HTTP upstreams (most API calls) take a fast path: the request
//! head is written and the response read in the request's own task ([`super::h1`]), with no
//! dispatcher task and no channels between the two. Requests with bodies, and HTTPS upstreams,
//! go through hyper's client connection. Each kind has its own idle list.
//!
//! Measured against hyper-util's pooled client in `benches/proxy-vs-nginx.sh` (the bare proxy,
//! `bare-workerpool` against `bare-hyper`): 6–13% less CPU per request in the same run before
//! the fast path, 12–14% with it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::Either;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use super::h1::{self, Chunked, Decoded, Framing, H1Error};
use crate::proxy::egress::EgressPolicy;
use crate::proxy::forward::{strip_hop_by_hop, Forwarding};
use crate::proxy::server::Body;
use crate::proxy::FastMap;

/// Idle connections older than this are closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream and worker; more are closed.
pub const MAX_IDLE_PER_UPSTREAM: usize = 1024;

/// Which upstream a connection goes to, and under which egress policy it was opened. Hashed
/// and compared as written (http's own `Authority` hashes byte by byte, lowercased): `Up:80`
/// and `up:80` get separate idle lists, which costs a connection, never a wrong one. A
/// connection opened without a policy is never handed to a route that has one.
#[derive(Clone, Debug)]
struct Key {
    scheme: Scheme,
    authority: Authority,
    egress: Option<Arc<EgressPolicy>>,
}

impl Key {
    fn new(scheme: &Scheme, authority: &Authority) -> Self {
        Self {
            scheme: scheme.clone(),
            authority: authority.clone(),
            egress: None,
        }
    }

    fn policy_id(&self) -> usize {
        self.egress.as_ref().map_or(0, |p| Arc::as_ptr(p) as usize)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.authority.as_str() == other.authority.as_str()
            && self.scheme.as_str() == other.scheme.as_str()
            && self.policy_id() == other.policy_id()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.authority.as_str().as_bytes());
        state.write(self.scheme.as_str().as_bytes());
        state.write_usize(self.policy_id());
    }
}

/// A connection an idle list can hold.
trait Reusable {
    /// False once the connection cannot take another request.
    fn is_open(&self) -> bool;
}

impl Reusable for SendRequest<Body> {
    fn is_open(&self) -> bool {
        !self.is_closed()
    }
}

/// A fast-path connection: the socket and what has been read from it but not yet used.
#[derive(Debug)]
struct RawConn {
    io: TcpStream,
    buf: BytesMut,
}

impl Reusable for RawConn {
    /// An idle connection the upstream has written to or closed is done with: the runtime has
    /// marked it readable (no system call is made to find out).
    fn is_open(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.io.poll_read_ready(&mut cx).is_pending()
    }
}

/// Read-buffer room made before each read from a fast-path connection.
const READ_CHUNK: usize = 16 * 1024;

impl RawConn {
    /// Reads what the socket has into `buf`; `Ok(0)` at the end of the connection. (Through
    /// `AsyncRead`, which marks the socket not readable after a read that did not fill the
    /// buffer: that is what lets [`Reusable::is_open`] trust the mark.)
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        std::pin::pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

type IdleLists<C> = RefCell<FastMap<Key, VecDeque<Idle<C>>>>;

struct Pool {
    idle: IdleLists<SendRequest<Body>>,
    raw: IdleLists<RawConn>,
    connector: HttpsConnector<HttpConnector>,
}

thread_local! {
    static POOL: Pool = Pool {
        idle: RefCell::new(FastMap::default()),
        raw: RefCell::new(FastMap::default()),
        connector: crate::tls::https_or_http(),
    };
}

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the upstream URL {0} has no scheme or host")]
    NotAbsolute(Uri),
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream connection failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the upstream connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the upstream sent a bad response: {0}")]
    Protocol(#[from] H1Error),
    #[error("the upstream closed the connection before the response ended")]
    Closed,
    #[error("the upstream request target is not valid: {0}")]
    Target(#[from] http::uri::InvalidUri),
}

/// A connection that was idle, newest first; None when none is left.
fn checkout<C: Reusable>(lists: &IdleLists<C>, key: &Key) -> Option<C> {
    // (A pooled hyper connection was ready when it was checked in: see `UpstreamBody::release`.)
    let mut idle = lists.borrow_mut();
    let list = idle.get_mut(key)?;
    while let Some(i) = list.pop_back() {
        if i.since.elapsed() >= IDLE_TIMEOUT {
            // The rest are older still.
            list.clear();
            return None;
        }
        if i.conn.is_open() {
            return Some(i.conn);
        }
    }
    None
}

fn checkin<C: Reusable>(lists: &IdleLists<C>, key: Key, conn: C) {
    if !conn.is_open() {
        return;
    }
    let now = Instant::now();
    let mut idle = lists.borrow_mut();
    let list = idle.entry(key).or_default();
    // The oldest go first; closed ones further in are dropped when checkout meets them.
    while list
        .front()
        .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
    {
        list.pop_front();
    }
    if list.len() >= MAX_IDLE_PER_UPSTREAM {
        list.pop_front();
    }
    list.push_back(Idle { conn, since: now });
}

/// How often each worker looks through its idle connections (see [`close_idle`]).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Runs on each worker for as long as it lives: every [`SWEEP_EVERY`], closes the idle
/// connections that have expired or that their upstream has closed. Without it, connections
/// left idle after a burst to an upstream that gets no more traffic would stay open (or sit in
/// CLOSE_WAIT once the upstream gave up on them) until the next request to that upstream.
pub async fn close_idle_periodically() {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        close_idle(Instant::now());
    }
}

/// Closes this worker's idle connections that are [`IDLE_TIMEOUT`] old at `now` or that can
/// no longer take a request, and forgets upstreams with none left.
fn close_idle(now: Instant) {
    fn sweep<C: Reusable>(lists: &IdleLists<C>, now: Instant) {
        lists.borrow_mut().retain(|_, list| {
            list.retain(|i| {
                now.saturating_duration_since(i.since) < IDLE_TIMEOUT && i.conn.is_open()
            });
            !list.is_empty()
        });
    }
    POOL.with(|p| {
        sweep(&p.idle, now);
        sweep(&p.raw, now);
    });
}

/// Idle connections this worker holds to `scheme://authority` (both kinds).
pub fn idle_count(scheme: &Scheme, authority: &Authority) -> usize {
    fn open<C: Reusable>(lists: &IdleLists<C>, key: &Key) -> usize {
        lists
            .borrow()
            .get(key)
            .map_or(0, |l| l.iter().filter(|i| i.conn.is_open()).count())
    }
    let key = Key::new(scheme, authority);
    POOL.with(|p| open(&p.idle, &key) + open(&p.raw, &key))
}

/// How long a TCP connect to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain TCP connection to `key`'s upstream (port 80 unless it names one). Under an egress
/// policy the host is resolved here and every address checked before any is dialled.
async fn connect_tcp(key: &Key) -> Result<TcpStream, UpstreamError> {
    let authority = &key.authority;
    let port = authority
        .port_u16()
        .unwrap_or(if key.scheme == Scheme::HTTPS { 443 } else { 80 });
    let shown = format!("{}:{port}", authority.host());
    let connecting = async {
        match &key.egress {
            None => TcpStream::connect(&shown).await,
            Some(policy) => {
                let denied = |e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e);
                let addrs = policy
                    .resolve(authority.host(), port)
                    .await
                    .map_err(denied)?;
                let stream = TcpStream::connect(&addrs[..]).await?;
                // A connection whose two ends have one address reached this host itself (one
                // of its own interfaces, which no fixed range names).
                let (near, far) = (stream.local_addr()?.ip(), stream.peer_addr()?.ip());
                if near == far && !policy.allowed(far) {
                    return Err(denied(crate::proxy::egress::EgressError::Denied {
                        host: authority.host().to_string(),
                        addr: far,
                    }));
                }
                Ok(stream)
            }
        }
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| UpstreamError::Connect(format!("{shown}: timed out after 5s")))?
        .map_err(|e| UpstreamError::Connect(format!("{shown}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect(key: &Key) -> Result<SendRequest<Body>, UpstreamError> {
    if key.scheme == Scheme::HTTP {
        // Plain TCP without the TLS connector's stream wrapper in every read and write.
        let stream = connect_tcp(key).await?;
        return handshake(hyper_util::rt::TokioIo::new(stream)).await;
    }
    if key.egress.is_some() {
        // TLS over a connection whose address the policy checked (the connector below would
        // resolve the name itself).
        let stream = connect_tcp(key).await?;
        let name = rustls::pki_types::ServerName::try_from(
            key.authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|e| UpstreamError::Connect(format!("{}: {e}", key.authority)))?;
        let tls = tokio_rustls::TlsConnector::from(crate::tls::client_config())
            .connect(name, stream)
            .await
            .map_err(|e| UpstreamError::Connect(format!("{}: {e}", key.authority)))?;
        return handshake(hyper_util::rt::TokioIo::new(tls)).await;
    }
    let uri = Uri::builder()
        .scheme(key.scheme.clone())
        .authority(key.authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
    let mut connector = POOL.with(|p| p.connector.clone());
    let io = connector
        .call(uri)
        .await
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
    handshake(io).await
}

async fn handshake<T>(io: T) -> Result<SendRequest<Body>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        // Small requests: one flattened write beats writev (measured in benches/).
        .writev(false)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(sender)
}

/// Sends `req` (absolute URI, Host header set) on a pooled connection to its upstream, or a
/// new one.
pub async fn request(req: Request<Body>) -> Result<Response<UpstreamBody>, UpstreamError> {
    let (Some(scheme), Some(authority)) = (req.uri().scheme(), req.uri().authority()) else {
        return Err(UpstreamError::NotAbsolute(req.uri().clone()));
    };
    let (scheme, authority) = (scheme.clone(), authority.clone());
    // On the wire an HTTP/1 request names the path only.
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    send(scheme, authority, target, req, None, None).await
}

/// Sends `req` (its URI is not used) to `scheme://authority` with `target` (path and query) as
/// the request target, on a pooled connection or a new one, its header fields rewritten by
/// `forwarding` (else sent as they are, Host included). The response carries end-to-end
/// fields only, whichever path carried the call. `target` must be a valid origin-form
/// target: the proxy builds it from a parsed request path and a route's validated base path.
///
/// Not an `async fn`: the fast path's future is a fifth of the size of hyper's, and the
/// caller moves it a few times per request; hyper's path is boxed instead.
pub fn send(
    scheme: Scheme,
    authority: Authority,
    target: String,
    mut req: Request<Body>,
    forwarding: Option<&Forwarding<'_>>,
    egress: Option<&Arc<EgressPolicy>>,
) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> + Send + 'static {
    let key = Key {
        scheme,
        authority,
        egress: egress.cloned(),
    };
    if key.scheme == Scheme::HTTP && req.body().is_end_stream() {
        let (parts, _) = req.into_parts();
        let mut head = Vec::with_capacity(256);
        match forwarding {
            Some(f) => f.encode(&parts.method, &target, &parts.headers, &mut head),
            None => h1::encode_request(&parts.method, &target, &parts.headers, &mut head),
        }
        return Either::Left(fast_request(key, parts.method, head));
    }
    if let Some(f) = forwarding {
        f.apply(req.headers_mut());
    }
    Either::Right(Box::pin(send_hyper(key, target, req)))
}

/// Sends `req` through hyper's client (a body, or TLS).
async fn send_hyper(
    key: Key,
    target: String,
    mut req: Request<Body>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    *req.uri_mut() = PathAndQuery::try_from(target)?.into();
    if !req.body().is_end_stream()
        && req.body().size_hint().exact().is_none()
        && !req.headers().contains_key(CONTENT_LENGTH)
    {
        // A body of unknown length goes chunked whatever the method: left to itself, hyper's
        // client sends a GET, HEAD or DELETE of unknown length as bodiless.
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    loop {
        let (mut sender, reused) = match POOL.with(|p| checkout(&p.idle, &key)) {
            Some(s) => (s, true),
            None => (connect(&key).await?, false),
        };
        if let Err(e) = sender.ready().await {
            if reused {
                continue;
            }
            return Err(e.into());
        }
        match sender.try_send_request(req).await {
            Ok(mut resp) => {
                // Framed by Transfer-Encoding, a Content-Length beside it is stale (RFC 9112
                // 6.3); then end-to-end fields only, as the fast path's parser hands on.
                if resp.headers().contains_key(TRANSFER_ENCODING) {
                    resp.headers_mut().remove(CONTENT_LENGTH);
                }
                strip_hop_by_hop(resp.headers_mut());
                return Ok(resp.map(|b| UpstreamBody::hyper(b, key, sender)));
            }
            Err(mut e) => match e.take_message() {
                // Not written: the connection closed before it could take the request.
                Some(unsent) if reused => req = unsent,
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// Sends a bodiless request (`head`, encoded) on a fast-path connection: a pooled one, or a
/// new one. A pooled connection that the upstream closed just as the request went out (nothing
/// came back) is replaced and the request sent again when its method is idempotent (as nginx
/// does).
async fn fast_request(
    key: Key,
    method: Method,
    head: Vec<u8>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let head_request = method == Method::HEAD;
    loop {
        let (mut conn, reused) = match POOL.with(|p| checkout(&p.raw, &key)) {
            Some(c) => (c, true),
            None => {
                let io = connect_tcp(&key).await?;
                let buf = BytesMut::with_capacity(READ_CHUNK);
                (RawConn { io, buf }, false)
            }
        };
        let sent = match conn.io.write_all(&head).await {
            Ok(()) => read_head(&mut conn, head_request).await,
            Err(e) => Err(UpstreamError::Io(e)),
        };
        let parsed = match sent {
            Ok(parsed) => parsed,
            Err(e) => {
                let nothing_back = matches!(e, UpstreamError::Closed | UpstreamError::Io(_))
                    && conn.buf.is_empty();
                if reused && nothing_back && method.is_idempotent() {
                    continue;
                }
                return Err(e);
            }
        };
        let body = RawBody::new(parsed.framing, parsed.keep_alive, key, conn);
        let mut resp = Response::new(UpstreamBody(Kind::Raw(body)));
        *resp.status_mut() = parsed.status;
        *resp.version_mut() = parsed.version;
        *resp.headers_mut() = parsed.headers;
        return Ok(resp);
    }
}

/// Reads until a whole response head has arrived; [`UpstreamError::Closed`] when the
/// connection ends first.
async fn read_head(conn: &mut RawConn, head_request: bool) -> Result<h1::Head, UpstreamError> {
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = h1::parse_response(&mut conn.buf, head_request)? {
                return Ok(head);
            }
        }
        let n = std::future::poll_fn(|cx| conn.poll_fill(cx)).await?;
        if n == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

/// A fast-path response body, read from the socket as the server asks for it.
#[derive(Debug)]
struct RawBody {
    /// None once the body has ended (the connection is then pooled or closed).
    conn: Option<RawConn>,
    key: Key,
    state: RawState,
    keep_alive: bool,
}

#[derive(Debug)]
enum RawState {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes.
    Close,
    Done,
}

impl RawBody {
    fn new(framing: Framing, keep_alive: bool, key: Key, conn: RawConn) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => RawState::Done,
            Framing::Length(n) => RawState::Length(n),
            Framing::Chunked => RawState::Chunked(Chunked::default()),
            Framing::Close => RawState::Close,
        };
        let mut body = Self {
            conn: Some(conn),
            key,
            state,
            keep_alive,
        };
        if matches!(body.state, RawState::Done) {
            body.finish();
        }
        body
    }

    /// The body has ended: the connection goes back to the pool when the response allowed it
    /// and nothing beyond the body arrived.
    fn finish(&mut self) {
        self.state = RawState::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                POOL.with(|p| checkin(&p.raw, self.key.clone(), conn));
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.state {
                RawState::Done => return Poll::Ready(None),
                RawState::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (conn.buf.len() as u64).min(*left);
                        let data = conn.buf.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            // The last bytes: the server may not ask again.
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                RawState::Chunked(decoder) => match decoder.decode(&mut conn.buf)? {
                    Decoded::Data(data) => return Poll::Ready(Some(Ok(data))),
                    Decoded::End => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Decoded::NeedMore => {}
                },
                RawState::Close => {
                    if !conn.buf.is_empty() {
                        return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                    }
                }
            }
            if ready!(conn.poll_fill(cx))? == 0 {
                if matches!(self.state, RawState::Close) {
                    self.finish();
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(UpstreamError::Closed)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, RawState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            RawState::Done => SizeHint::with_exact(0),
            RawState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// An upstream response body. A hyper connection goes back to the pool once its body has been
/// read to the end, a fast-path one once its framing says the body ended; one whose body is
/// dropped half-read, or fails, is closed.
#[derive(Debug)]
pub struct UpstreamBody(Kind);

#[derive(Debug)]
enum Kind {
    Hyper {
        inner: Incoming,
        back: Option<(Key, SendRequest<Body>)>,
    },
    Raw(RawBody),
}

impl UpstreamBody {
    fn hyper(inner: Incoming, key: Key, sender: SendRequest<Body>) -> Self {
        let end = inner.is_end_stream();
        let mut body = Self(Kind::Hyper {
            inner,
            back: Some((key, sender)),
        });
        if end {
            body.release();
        }
        body
    }

    /// The response has ended: its connection goes back to the pool once it can take a new
    /// request. Until then (the request body may still be on its way up) it is not pooled, so
    /// no other request waits behind a stalled upload; a connection not ready within
    /// [`IDLE_TIMEOUT`] is closed.
    fn release(&mut self) {
        if let Kind::Hyper { back, .. } = &mut self.0 {
            if let Some((key, mut sender)) = back.take() {
                if sender.is_ready() {
                    POOL.with(|p| checkin(&p.idle, key, sender));
                    return;
                }
                tokio::spawn(async move {
                    if let Ok(Ok(())) = tokio::time::timeout(IDLE_TIMEOUT, sender.ready()).await {
                        POOL.with(|p| checkin(&p.idle, key, sender));
                    }
                });
            }
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let (inner, back) = match &mut self.0 {
            Kind::Raw(raw) => {
                let polled = raw.poll_data(cx);
                if let Poll::Ready(Some(Err(_))) = &polled {
                    raw.conn = None;
                    raw.state = RawState::Done;
                }
                return polled.map(|o| o.map(|r| r.map(Frame::data)));
            }
            Kind::Hyper { inner, back } => (inner, back),
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            // The last frame: the server may not poll again.
            Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => *back = None,
            _ => {}
        }
        polled.map(|o| o.map(|r| r.map_err(UpstreamError::Http)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Hyper { inner, .. } => inner.is_end_stream(),
            Kind::Raw(raw) => raw.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Hyper { inner, .. } => inner.size_hint(),
            Kind::Raw(raw) => raw.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An upstream on loopback that counts the connections it accepted; `keep_alive` false
    /// closes each after one response, `close_after` closes each that long after it opened.
    async fn upstream(
        keep_alive: bool,
        close_after: Option<Duration>,
    ) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("you asked for {}", req.uri());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.keep_alive(keep_alive);
                    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    match close_after {
                        Some(after) => {
                            let _ = tokio::time::timeout(after, conn).await;
                        }
                        None => {
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn get(authority: &Authority, path: &str) -> Request<Body> {
        Request::builder()
            .uri(format!("http://{authority}{path}"))
            .header(http::header::HOST, authority.as_str())
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap()
    }

    async fn text(resp: Response<UpstreamBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sequential_requests_share_one_connection_and_send_the_path_only() {
        let (up, accepted) = upstream(true, None).await;
        for i in 0..5 {
            let resp = request(get(&up, &format!("/items/{i}?x=1"))).await.unwrap();
            assert_eq!(text(resp).await, format!("you asked for /items/{i}?x=1"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_count(&Scheme::HTTP, &up), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_half_read_response_does_not_hand_its_connection_back() {
        let (up, accepted) = upstream(true, None).await;
        let resp = request(get(&up, "/a")).await.unwrap();
        drop(resp);
        assert_eq!(idle_count(&Scheme::HTTP, &up), 0);
        let resp = request(get(&up, "/b")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /b");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_that_closes_connections_is_still_served() {
        // Closes after every response.
        let (up, accepted) = upstream(false, None).await;
        for i in 0..3 {
            let resp = request(get(&up, &format!("/{i}"))).await.unwrap();
            assert_eq!(text(resp).await, format!("you asked for /{i}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        // Closes each connection 50 ms after it opened: the pooled one is gone by the next
        // request, which goes out on a new one.
        let (up, accepted) = upstream(true, Some(Duration::from_millis(50))).await;
        let resp = request(get(&up, "/first")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /first");
        until_closed_by_upstream(&up).await;
        let resp = request(get(&up, "/second")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /second");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn large_bodies_stream_both_ways_and_the_connection_is_reused() {
        // An upstream that streams each request body back as the response body.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(Response::new(req.into_body()))
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        // 4 MiB in 64 KiB chunks, far more than the socket buffers hold: the request is still
        // being written while the response is already coming back.
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        for round in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxErr>>(4);
            let body = http_body_util::StreamBody::new(tokio_stream(rx)).boxed();
            let req = Request::builder()
                .method("POST")
                .uri(format!("http://{up}/echo"))
                .header(http::header::HOST, up.as_str())
                .body(body)
                .unwrap();
            let sending = chunk.clone();
            let feeder = tokio::spawn(async move {
                for _ in 0..64 {
                    let frame = Frame::data(Bytes::from(sending.clone()));
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
            });
            let resp = request(req).await.unwrap();
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            feeder.await.unwrap();
            assert_eq!(got.len(), 64 * chunk.len(), "round {round}");
            assert!(got.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reused it"
        );
        assert_eq!(idle_count(&Scheme::HTTP, &up), 1);
    }

    /// Waits until the upstream has closed every pooled connection to it (the pool sees the
    /// socket's readiness through the runtime, so this yields between looks).
    async fn until_closed_by_upstream(authority: &Authority) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while idle_count(&Scheme::HTTP, authority) > 0 {
            assert!(
                Instant::now() < deadline,
                "the upstream never closed its connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Idle connections this worker holds to `authority` (http), open or not.
    fn held(authority: &Authority) -> usize {
        fn len<C>(lists: &IdleLists<C>, key: &Key) -> usize {
            lists.borrow().get(key).map_or(0, VecDeque::len)
        }
        let key = Key::new(&Scheme::HTTP, authority);
        POOL.with(|p| len(&p.idle, &key) + len(&p.raw, &key))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_are_closed_when_they_expire_or_the_upstream_closes_them() {
        // An upstream that answers one request per connection, keeps it open, and counts the
        // connections the gateway closed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let count = closed.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut buf = [0; 4096];
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    stream.write_all(answer).await.unwrap();
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                    count.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        // One idle connection of each kind: a bodiless GET (the fast path), a POST (hyper's).
        let resp = request(get(&up, "/a")).await.unwrap();
        assert_eq!(text(resp).await, "ok");
        let post = Request::post(format!("http://{up}/b"))
            .header(http::header::HOST, up.as_str())
            .body(
                Full::new(Bytes::from_static(b"{}"))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap();
        assert_eq!(text(request(post).await.unwrap()).await, "ok");
        assert_eq!(held(&up), 2);

        close_idle(Instant::now());
        assert_eq!(held(&up), 2, "fresh open connections are kept");
        assert_eq!(closed.load(Ordering::SeqCst), 0);

        close_idle(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(held(&up), 0);
        for _ in 0..100 {
            if closed.load(Ordering::SeqCst) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            closed.load(Ordering::SeqCst),
            2,
            "the upstream saw both closed"
        );

        // An upstream that closes its connections 50 ms after opening them: the socket left
        // behind is let go at the next sweep, though it has not expired.
        let (up, _) = upstream(true, Some(Duration::from_millis(50))).await;
        let resp = request(get(&up, "/c")).await.unwrap();
        assert_eq!(text(resp).await, "you asked for /c");
        until_closed_by_upstream(&up).await;
        assert_eq!(held(&up), 1);
        close_idle(Instant::now());
        assert_eq!(held(&up), 0);
    }

    type BoxErr = Box<dyn std::error::Error + Send + Sync>;

    /// A stream of a channel's items.
    fn tokio_stream<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send + Sync + 'static
    where
        T: Send + 'static,
    {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    /// What a scripted upstream sends for the n-th request on a connection: pieces written
    /// (a few milliseconds apart) and whether it closes afterwards; None closes without an
    /// answer.
    type Script = fn(&str, usize) -> Option<(Vec<&'static [u8]>, bool)>;

    /// An upstream speaking raw HTTP/1 from a script; counts the connections it accepted.
    async fn scripted(script: Script) -> (Authority, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0.. {
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut tmp = [0u8; 4096];
                            match stream.read(&mut tmp).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&tmp[..k]),
                            }
                        };
                        let head: Vec<u8> = buf.drain(..end).collect();
                        let head = String::from_utf8_lossy(&head).to_string();
                        let Some((pieces, close)) = script(head.lines().next().unwrap(), n) else {
                            return;
                        };
                        for piece in pieces {
                            if stream.write_all(piece).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(3)).await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (up, accepted)
    }

    fn with_method(method: &str, authority: &Authority, path: &str) -> Request<Body> {
        let mut req = get(authority, path);
        *req.method_mut() = method.parse().unwrap();
        req
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fast_path_chunked_bodies_arrive_whole_and_keep_the_connection() {
        let (up, accepted) = scripted(|_, _| {
            Some((
                vec![
                    &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                    b"5\r\nhel",
                    b"lo\r\n6\r\n world\r\n",
                    b"0\r\n\r\n",
                ],
                false,
            ))
        })
        .await;
        for _ in 0..2 {
            let resp = request(get(&up, "/c")).await.unwrap();
            assert_eq!(text(resp).await, "hello world");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle_count(&Scheme::HTTP, &up), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fast_path_bodies_without_length_run_to_the_close_and_are_not_reused() {
        let (up, accepted) = scripted(|_, _| {
            Some((
                vec![&b"HTTP/1.1 200 OK\r\n\r\nuntil "[..], b"the close"],
                true,
            ))
        })
        .await;
        for _ in 0..2 {
            let resp = request(get(&up, "/")).await.unwrap();
            assert_eq!(text(resp).await, "until the close");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(idle_count(&Scheme::HTTP, &up), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fast_path_skips_interim_responses_and_head_responses_have_no_body() {
        let (up, accepted) = scripted(|line, _| {
            let reply: &'static [u8] = if line.starts_with("HEAD") {
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            Some((vec![reply], false))
        })
        .await;
        let resp = request(with_method("HEAD", &up, "/h")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "42");
        assert!(resp.body().is_end_stream());
        assert_eq!(text(resp).await, "");
        let resp = request(get(&up, "/g")).await.unwrap();
        assert_eq!(text(resp).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the HEAD's connection was reused"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_pooled_connection_closed_under_a_request_is_retried_only_when_idempotent() {
        // Answers the first request on each connection, then closes on the next one unread.
        let (up, accepted) = scripted(|_, n| {
            (n == 0).then(|| {
                (
                    vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]],
                    false,
                )
            })
        })
        .await;
        let resp = request(get(&up, "/1")).await.unwrap();
        assert_eq!(text(resp).await, "ok");
        let resp = request(get(&up, "/2")).await.unwrap();
        assert_eq!(
            text(resp).await,
            "ok",
            "GET went out again on a new connection"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let err = request(with_method("POST", &up, "/3")).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Closed), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "POST is not sent twice");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fast_path_refuses_bad_framing_and_short_bodies() {
        let (up, _) = scripted(|line, _| {
            let reply: &'static [u8] = if line.contains("/conflict") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"
            };
            Some((vec![reply], true))
        })
        .await;
        let err = request(get(&up, "/conflict")).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::Protocol(H1Error::ContentLength)),
            "{err}"
        );
        let resp = request(get(&up, "/short")).await.unwrap();
        let err = resp.into_body().collect().await.unwrap_err();
        assert!(matches!(err, UpstreamError::Closed), "{err}");
        assert_eq!(idle_count(&Scheme::HTTP, &up), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn nothing_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let err = request(get(&addr, "/")).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect(_)), "{err}");
    }
}
