//! The HTTP/1.1 wire format for the proxy's upstream fast path (`upstream.rs`): request heads
//! out, response heads and bodies in. Bodiless requests to plain-HTTP upstreams (most API
//! calls) take this path; everything else goes through hyper's client.
//!
//! The rules are RFC 9112's: interim 1xx responses are skipped; a response to HEAD, and a 204 or
//! 304, has no body; else `Transfer-Encoding` ending in `chunked` frames the body, else a
//! `Content-Length` (every value the same, or the response is refused), else the body runs to
//! the end of the connection. A connection is kept for reuse only when the response says so
//! (HTTP/1.1 without `Connection: close`, or 1.0 with `keep-alive`) and its framing ends it.
//! Hop-by-hop fields are read here and not handed on: they describe the upstream connection.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Response heads with more header lines than this are refused (hyper's limit too); request
/// heads with more go from `front.rs` to hyper.
pub const MAX_HEADERS: usize = 100;
/// Response heads longer than this are refused.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A chunk-size line or a trailer section longer than this is refused.
const MAX_LINE_BYTES: usize = 4096;

/// Hop-by-hop fields: they describe one connection
/// and are never forwarded, in either direction (RFC 9110 7.6.1).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    // Not in RFC 9110's list, but what old clients send in place of `Connection`.
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// One of the fixed hop-by-hop names.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    let s = name.as_str();
    // The lengths of the names below: most names are ruled out without a comparison.
    matches!(s.len(), 2 | 7 | 10 | 16 | 17 | 18 | 19) && HOP_BY_HOP.contains(&s)
}

/// The field a `Connection` token names beyond the fixed hop-by-hop set: hop-by-hop for that
/// message too (`Connection: x-trace`). None for an empty or invalid token or a fixed name.
pub fn listed_field(token: &[u8]) -> Option<HeaderName> {
    let token = token.trim_ascii();
    if token.is_empty() {
        return None;
    }
    HeaderName::from_bytes(token)
        .ok()
        .filter(|name| !is_hop_by_hop(name))
}

/// What is wrong with what the upstream sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum H1Error {
    #[error("malformed response head: {0}")]
    Head(String),
    #[error("the response head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the response head has more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("the response switches protocols (101), which the proxy does not support")]
    Upgrade,
    #[error("the Content-Length header is invalid or has conflicting values")]
    ContentLength,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// End-to-end fields only: the hop-by-hop ones (the fixed set and any `Connection` lists)
    /// are about the upstream connection, which the fast path keeps.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this response has been read.
    pub keep_alive: bool,
}

/// Writes a request head: request line, the header fields as given, and `Content-Length: 0`
/// for a bodiless POST, PUT or PATCH that does not say its length (as hyper's client does).
pub fn encode_request<'h>(
    method: &Method,
    target: &str,
    headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    for (name, value) in headers {
        has_length |= name == http::header::CONTENT_LENGTH;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_length && matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Response heads are first parsed with room for this many header lines (zeroed on the stack
/// for every response); longer ones are parsed again with room for [`MAX_HEADERS`].
const USUAL_HEADERS: usize = 24;

/// Parses the final response head at the front of `buf` (skipping interim 1xx responses) and
/// removes it from `buf`; `None` while more bytes are needed. `head_request`: the request was
/// HEAD, so the response has no body whatever its headers say.
pub fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, H1Error> {
    loop {
        let parsed = match parse_one::<USUAL_HEADERS>(buf) {
            Err(H1Error::TooManyHeaders) => parse_one::<MAX_HEADERS>(buf)?,
            other => other?,
        };
        let Some((code, version, headers, framers)) = parsed else {
            return Ok(None);
        };
        if code == 101 {
            return Err(H1Error::Upgrade);
        }
        if (100..200).contains(&code) {
            // 100 Continue, 103 Early Hints…: the final response follows.
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| H1Error::Head(format!("status code {code} is out of range")))?;
        return finish_head(status, version, headers, framers, head_request).map(Some);
    }
}

/// A response head's status code, version, headers and what they say about framing.
type Parsed = (u16, Version, HeaderMap, Framers);

/// One response head from the front of `buf` (removed once complete). `N`: room for header
/// lines.
fn parse_one<const N: usize>(buf: &mut BytesMut) -> Result<Option<Parsed>, H1Error> {
    let mut room = [httparse::EMPTY_HEADER; N];
    let mut parsed = httparse::Response::new(&mut room);
    let len = match parsed.parse(buf) {
        // Whole but too long: refused however the bytes arrived.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => {
            return Err(H1Error::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(H1Error::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(H1Error::TooManyHeaders),
        Err(e) => return Err(H1Error::Head(e.to_string())),
    };
    let code = parsed.code.unwrap_or(0);
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // One copy of the head, which every header value then shares.
    let head = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut framers = Framers::default();
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| H1Error::Head("a header name is not valid".into()))?;
        let start = h.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(head.slice(start..start + h.value.len()))
            .map_err(|_| H1Error::Head(format!("the {name} header value is not valid")))?;
        framers.note(&name, &value);
        // Fields about the upstream connection stay here, with the connection.
        if !is_hop_by_hop(&name) {
            headers.append(name, value);
        }
    }
    for name in framers.listed.drain(..) {
        headers.remove(name);
    }
    buf.advance(len);
    Ok(Some((code, version, headers, framers)))
}

/// What a response head says about its framing and its connection, noted header by header as
/// the head is parsed (no lookups in the finished map).
#[derive(Default)]
struct Framers {
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
    /// The last `Transfer-Encoding` value.
    transfer_encoding: Option<HeaderValue>,
    /// A `Transfer-Encoding` value is not visible ASCII.
    transfer_encoding_invalid: bool,
    /// Every `Content-Length` value and item so far: None before the first, then the one
    /// length they agree on, or an error.
    content_length: Option<Result<u64, H1Error>>,
    /// Names `Connection` lists beyond the fixed hop-by-hop set (rare: empty, unallocated).
    listed: Vec<HeaderName>,
}

impl Framers {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == http::header::CONTENT_LENGTH {
            for item in value.as_bytes().split(|&b| b == b',') {
                let n = content_length_item(item);
                self.content_length = Some(match self.content_length.take() {
                    None => n,
                    Some(Ok(l)) if n.as_ref().is_ok_and(|n| *n == l) => Ok(l),
                    Some(_) => Err(H1Error::ContentLength),
                });
            }
        } else if name == http::header::TRANSFER_ENCODING {
            // A value that is not visible ASCII has no agreed reading (hyper's client takes it
            // as not chunked): refused in `finish_head`.
            self.transfer_encoding_invalid |= value.to_str().is_err();
            self.transfer_encoding = Some(value.clone());
        } else if name == http::header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                let close = token.eq_ignore_ascii_case(b"close");
                let keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                // Every option names a field to drop (RFC 9110 7.6.1), `close` too.
                if !keep_alive {
                    self.listed.extend(listed_field(token));
                }
            }
        }
    }
}

/// One Content-Length value (or comma-separated item): decimal digits only.
fn content_length_item(item: &[u8]) -> Result<u64, H1Error> {
    let item = item.trim_ascii();
    if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
        return Err(H1Error::ContentLength);
    }
    Ok(item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn finish_head(
    status: StatusCode,
    version: Version,
    mut headers: HeaderMap,
    framers: Framers,
    head_request: bool,
) -> Result<Head, H1Error> {
    let mut keep_alive = if version == Version::HTTP_10 {
        framers.keep_alive && !framers.close
    } else {
        !framers.close
    };
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if framers.transfer_encoding.is_some() {
        if framers.transfer_encoding_invalid {
            return Err(H1Error::Head(
                "the Transfer-Encoding value is not visible ASCII".into(),
            ));
        }
        if version == Version::HTTP_10 {
            // RFC 9112 6.1: faulty framing; hyper's client refuses it too.
            return Err(H1Error::Head(
                "an HTTP/1.0 response cannot use Transfer-Encoding".into(),
            ));
        }
        // Framed by Transfer-Encoding: a Content-Length beside it describes nothing that is
        // sent and must not reach the client, which would take a short body as whole.
        headers.remove(http::header::CONTENT_LENGTH);
    }
    let framing = if no_body {
        Framing::Empty
    } else if let Some(last) = &framers.transfer_encoding {
        // Both headers on one response is how request smuggling starts: frame by
        // Transfer-Encoding (RFC 9112 6.3) and do not reuse the connection.
        if framers.content_length.is_some() {
            keep_alive = false;
        }
        let chunked = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(length) = framers.content_length {
        Framing::Length(length?)
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    })
}

/// What [`Chunked::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer ends inside the body: read more.
    NeedMore,
    /// The last chunk and the trailers have been read.
    End,
}

/// A chunked-body decoder that works through whatever bytes have arrived.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Takes the next piece of body data from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = (buf.len() as u64).min(left);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Chunked("chunk data is not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    // Trailer fields are dropped (the response head has already gone out).
                    self.trailer_bytes += line.len() + 2;
                    if self.trailer_bytes > MAX_HEAD_BYTES {
                        return Err(H1Error::Chunked("the trailer section is too long"));
                    }
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// The line at the front of `buf` without its CRLF (removed from `buf`); `None` until one has
/// arrived. Lines end in CRLF only: a bare CR or LF, or another control byte but HTAB, inside
/// a line is refused (readers that accept a bare LF as a line end would frame differently).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, H1Error> {
    let scanned = buf.len().min(MAX_LINE_BYTES + 2);
    match buf[..scanned].windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            if buf[..end]
                .iter()
                .any(|&b| b != b'\t' && (b < 0x20 || b == 0x7F))
            {
                return Err(H1Error::Chunked(
                    "a line holds a bare CR, LF or control byte",
                ));
            }
            let line = buf.split_to(end);
            let _ = buf.split_to(2);
            Ok(Some(line))
        }
        // Longer than a line of MAX_LINE_BYTES and its CRLF: a read ending between the CR and
        // the LF of a line of exactly MAX_LINE_BYTES still waits (found by the fuzzer).
        None if buf.len() >= MAX_LINE_BYTES + 2 => Err(H1Error::Chunked("a line is too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional spaces or tabs and `;extensions` (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(H1Error::Chunked("a chunk size is missing"));
    }
    if digits > 15 {
        return Err(H1Error::Chunked("a chunk size is too large"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(H1Error::Chunked("a chunk size is not hexadecimal"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).expect("a hex digit"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, head_request: bool) -> Result<Option<Head>, H1Error> {
        parse_response(&mut BytesMut::from(text), head_request)
    }

    #[test]
    fn request_heads_carry_every_header_and_a_length_only_where_a_body_is_expected() {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("up:8080"));
        h.append("x-tag", HeaderValue::from_static("a"));
        h.append("x-tag", HeaderValue::from_static("b"));
        let mut out = Vec::new();
        encode_request(&Method::GET, "/items?q=1", &h, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /items?q=1 HTTP/1.1\r\nhost: up:8080\r\nx-tag: a\r\nx-tag: b\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request(&Method::POST, "/", &HeaderMap::new(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn response_heads_hand_on_end_to_end_fields_only() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
             X-Hop: 1\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nUpgrade: h2c\r\n\
             Content-Type: text/plain\r\nX-End: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        let mut names: Vec<&str> = head.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-end"]);
        // What the dropped fields said still counts: chunked framing, kept alive.
        assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, true));
        let head = parse(
            "HTTP/1.1 204 No Content\r\nConnection: close\r\nX-A: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.headers.len(), 1);
        assert!(!head.keep_alive);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        assert_eq!(head.headers["x-a"], "1");
        let head = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        // Both framings: chunked wins and the connection is not reused.
        let head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, false));
        let head = parse("HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Close, false));
        for (text, head_request) in [
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true),
        ] {
            let head = parse(text, head_request).unwrap().unwrap();
            assert_eq!(
                (head.framing, head.keep_alive),
                (Framing::Empty, true),
                "{text}"
            );
        }
        let head = parse(
            "HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!head.keep_alive);
        let head = parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive, "1.0 closes unless it says keep-alive");
        let head = parse(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(head.keep_alive);
        // Repeated lengths must agree.
        let head = parse("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(2));
        for bad in ["2, 3", "-1", "", "0x10", "99999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                parse(&text, false).unwrap_err(),
                H1Error::ContentLength,
                "{bad}"
            );
        }
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        );
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(&buf[..], b"ok", "the body stays in the buffer");
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Le");
        assert!(parse_response(&mut buf, false).unwrap().is_none());
        assert_eq!(buf.len(), 27, "nothing is taken from a partial head");
        assert_eq!(
            parse("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).unwrap_err(),
            H1Error::Upgrade
        );
        assert!(matches!(
            parse("NOT HTTP\r\n\r\n", false),
            Err(H1Error::Head(_))
        ));
        // More header lines than the first parse has room for, fewer than the limit.
        let many: String = (0..60).map(|i| format!("X-H{i}: {i}\r\n")).collect();
        let head = parse(
            &format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 0\r\n\r\n"),
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.headers.len(), 61);
        assert_eq!(head.headers["x-h59"], "59");
        let too_many: String = (0..=MAX_HEADERS)
            .map(|i| format!("X-H{i}: {i}\r\n"))
            .collect();
        assert_eq!(
            parse(&format!("HTTP/1.1 200 OK\r\n{too_many}\r\n"), false).unwrap_err(),
            H1Error::TooManyHeaders
        );
        let huge = format!("HTTP/1.1 200 OK\r\nX-Big: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(&huge, false).unwrap_err(), H1Error::HeadTooLarge);
    }

    /// Decodes `wire` fed to the decoder in pieces of `step` bytes.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, usize), H1Error> {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => return Ok((body, buf.len())),
                Decoded::NeedMore => {
                    if fed == wire.len() {
                        return Err(H1Error::Chunked("ended early"));
                    }
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let wire = b"5;ext=1\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (body, left) = decode_in_steps(wire, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            // Bytes after the body are left for whoever reads next.
            assert!(left <= 4, "step {step}");
        }
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"\r\n", b"1 2\r\n"] {
            assert!(
                matches!(decode_in_steps(bad, 64), Err(H1Error::Chunked(_))),
                "{bad:?}"
            );
        }
        assert!(
            decode_in_steps(b"1000000000000000\r\n", 64).is_err(),
            "size overflow"
        );
    }

    /// A reader that ends lines at a bare LF would frame these differently: refused, in the
    /// size line, its extensions and the trailers alike, however the bytes arrive.
    #[test]
    fn chunk_lines_end_in_crlf_only() {
        for bad in [
            &b"5;x\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r;x\r\nhello\r\n0\r\n\r\n",
            b"5;x=\x01\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX-T: a\nX-U: b\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
        ] {
            for step in [1, 3, 64] {
                assert!(
                    matches!(decode_in_steps(bad, step), Err(H1Error::Chunked(_))),
                    "{:?} in steps of {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        // A line of exactly the limit is accepted however the bytes arrive, its CR and LF in
        // different reads included.
        let long = format!(
            "5;x={}\r\nhello\r\n0\r\n\r\n",
            "a".repeat(MAX_LINE_BYTES - 4)
        );
        for step in [1, 7, MAX_LINE_BYTES + 1, 64 * 1024] {
            let (body, _) = decode_in_steps(long.as_bytes(), step).unwrap();
            assert_eq!(body, b"hello", "steps of {step}");
        }
        let longer = format!(
            "5;x={}\r\nhello\r\n0\r\n\r\n",
            "a".repeat(MAX_LINE_BYTES - 3)
        );
        assert!(decode_in_steps(longer.as_bytes(), 64 * 1024).is_err());
        // Spaces and tabs before extensions are fine (RFC 9112 BWS).
        let (body, _) = decode_in_steps(b"5 \t;a=b\r\nhello\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!(body, b"hello");
    }

    #[test]
    fn a_length_beside_transfer_encoding_is_not_handed_on_and_http_1_0_may_not_use_it() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.headers.get("content-length").is_none());
        assert!(!head.keep_alive, "not reused after both framings");
        assert!(matches!(
            parse(
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Err(H1Error::Head(_))
        ));
    }
}
