//! Differential property tests: the proxy's two hand-written HTTP/1.1 parsers against hyper.
//!
//! The proxy reads HTTP/1.1 itself on both of its fast paths, and hands everything else to
//! hyper. Wherever the two read the same bytes differently, a client or an upstream can make
//! the proxy see one message where the rest of the chain sees another (request smuggling,
//! response splitting). So each parser is run on generated messages side by side with hyper's
//! own HTTP/1 code, fed the same bytes over an in-memory pipe:
//!
//! * `front::parse_request` (client side) against hyper's server
//!   (`hyper::server::conn::http1`). When front serves a request itself (`Plain`), hyper must
//!   hand the same request to its service: same method, target, version (1.1), header fields
//!   (names, values byte for byte, repeated fields in order) and an empty body; and the bytes
//!   front leaves after the head must be exactly what hyper goes on to read as the next
//!   message(s), unless front closes the connection after this request. When front waits for
//!   more bytes (`Partial`, at most 64 KiB), hyper must be waiting too. `NotPlain` leaves the
//!   buffer untouched (hyper then decides, so there is nothing to compare).
//! * `h1::parse_response` and the body decoders (upstream side) against hyper's client
//!   (`hyper::client::conn::http1`), with the response bytes fed to h1 whole and in pieces, as
//!   reads deliver them. When h1 accepts a response and reads its body to the end, hyper must
//!   accept it with the same status, version, end-to-end header fields and body, and end the
//!   message at the same byte (what follows is the next response on a kept connection); when
//!   Transfer-Encoding is present, h1 must not hand on a Content-Length. When h1 refuses what
//!   hyper accepts, the input must show one of the intended strictnesses in [`Strictness`]
//!   (checked against the bytes, not taken from h1's word); when h1 accepts what hyper
//!   refuses, hyper must read it as h1 does once the part h1 ignores on purpose is taken out
//!   ([`Leniency`]).
//!
//! Messages are built from an HTTP/1.1 grammar with the usual smuggling suspects (duplicate,
//! conflicting, signed and huge lengths, odd transfer codings, whitespace before colons,
//! obs-fold, bare CR and LF, control bytes, long lines, chunk extensions and trailers), then
//! often mutated (bytes inserted, replaced, deleted; truncated; random suffixes).
//!
//! Each property runs `APITREE_DIFF_CASES` cases (default 100,000, the CI run). A longer run:
//!
//! ```text
//! APITREE_DIFF_CASES=2000000 cargo test --release --test differential -- --nocapture
//! ```
//!
//! A failure prints the input (escaped), both verdicts and why they disagree; proptest stores
//! its seed in `tests/differential.proptest-regressions` and replays it first on the next run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::task::Poll;

use apitree::proxy::inbound;
use apitree::proxy::transport::front::{self, Parsed};
use apitree::proxy::transport::h1::{self, Chunked, Decoded, Framing, H1Error};
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestRunner,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

// ---------------------------------------------------------------------------------------------
// The runs
// ---------------------------------------------------------------------------------------------

/// Cases per property: `APITREE_DIFF_CASES`, else 100,000.
fn cases() -> u32 {
    match std::env::var("APITREE_DIFF_CASES") {
        Ok(n) => n
            .trim()
            .parse()
            .expect("APITREE_DIFF_CASES must be a whole number"),
        Err(_) => 100_000,
    }
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        // Shrinking reruns hyper per step: bounded, so a failure is reported in seconds.
        max_shrink_iters: 4096,
        // Several times cheaper than the default ChaCha in debug builds; cases stay random.
        rng_algorithm: RngAlgorithm::XorShift,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    })
}

/// One runtime per property: every case is driven on it with `block_on`, all in memory.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
}

/// Runs `property` on `cases()` inputs; panics with proptest's minimal failing input.
fn run<S: Strategy>(strategy: S, property: impl Fn(&S::Value) -> Result<(), TestCaseError>)
where
    S::Value: fmt::Debug,
{
    let mut runner = runner();
    if let Err(e) = runner.run(&strategy, |value| property(&value)) {
        panic!("{e}");
    }
}

#[test]
fn front_serves_only_requests_hyper_reads_the_same_way() {
    let rt = runtime();
    run(request(), |wire| check_front(&rt, &wire.0));
}

#[test]
fn h1_accepts_only_responses_hyper_reads_the_same_way() {
    let rt = runtime();
    run(response(), |case| check_upstream(&rt, case));
}

/// Runs the request-side comparison on one input; panics with its report.
fn assert_front(text: &str) {
    if let Err(e) = check_front(&runtime(), text.as_bytes()) {
        panic!("{e}");
    }
}

/// Runs the response-side comparison on one input; panics with its report.
fn assert_upstream(text: &str, head_request: bool) {
    let case = ResponseCase {
        wire: Wire(text.into()),
        head_request,
        step: 3,
    };
    if let Err(e) = check_upstream(&runtime(), &case) {
        panic!("{e}");
    }
}

#[test]
fn plain_requests_and_what_follows_them_read_as_hyper_reads_them() {
    assert_front(
        "GET /a?b HTTP/1.1\r\nHost: gw\r\nX-A: 1\r\nx-a: 2\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
    );
    assert_front("GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
    assert_front("GET / HTTP/1.1\r\nHost: gw\r\n");
}

/// Found by the property: front served `CONNECT` (origin-form) itself and read the bytes after
/// the head as the next request. hyper's server does the same only while the answer is not 2xx:
/// after a 2xx the bytes are a tunnel (RFC 9110 9.3.6). The gateway refuses CONNECT with 405
/// (`inbound::is_forbidden_method`), and front now leaves CONNECT to hyper, so the two agree
/// whatever the answer.
#[test]
fn connect_is_refused_so_what_follows_it_is_the_next_request() {
    assert_front("CONNECT /x HTTP/1.1\r\nHost: gw\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
}

/// Found by the property: front handed on both of two equal `Content-Length: 0` fields, where
/// hyper's server keeps one (RFC 9110 8.6 allows either refusing or folding them; forwarding
/// both lets the upstream decide differently on the two paths). front now leaves a repeated
/// `Content-Length` to hyper.
#[test]
fn repeated_content_lengths_reach_the_gateway_as_hyper_gives_them() {
    assert_front("GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n");
}

/// The strictnesses h1 has on purpose (see [`Strictness`]): each of these is refused.
#[test]
fn h1_refuses_faulty_framing() {
    for text in [
        // RFC 9112 6.1: a 1.0 message with Transfer-Encoding has faulty framing.
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // A bare CR or LF in a chunk-size line, an extension or a trailer line.
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\n\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\nY: b\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\rb\r\n\r\n",
        // Conflicting lengths.
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ] {
        for step in [usize::MAX, 1] {
            let run = h1_read(text.as_bytes(), false, step);
            assert!(
                matches!(run.verdict, Verdict::Refused(_)),
                "h1 must refuse {:?}: {:?}",
                Wire(text.into()),
                run.verdict
            );
        }
        assert_upstream(text, false);
    }
}

/// RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and a Content-Length beside it
/// must not be handed on (the client would take a short body as whole).
#[test]
fn h1_hands_on_no_content_length_beside_transfer_encoding() {
    assert_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    );
    assert_upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        true,
    );
    assert_upstream(
        "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        false,
    );
}

#[test]
fn h1_skips_interim_responses_and_drops_hop_by_hop_fields_as_hyper_reads_them() {
    assert_upstream(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\n\r\nok",
        false,
    );
    // Malformed trailer fields are dropped unread, as the body ends where hyper ends it.
    assert_upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad line\r\n\r\n",
        false,
    );
}

/// Found by the property: hyper's client decides "chunked" only on a value that is visible
/// ASCII (`HeaderValue::to_str`), and reads `Transfer-Encoding: \x80, chunked` to the end of
/// the connection; h1 decoded it as chunked (and kept the connection). The two paths ended the
/// body at different bytes: a response splitting risk on a pooled upstream connection. h1 now
/// refuses such a value (502), an intended strictness.
#[test]
fn h1_refuses_a_transfer_encoding_that_is_not_visible_ascii() {
    assert_upstream(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: \u{80}, chunked\r\n\r\n0\r\n\r\n",
        false,
    );
    let mut buf = bytes::BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \x80, chunked\r\n\r\n0\r\n\r\n"[..],
    );
    assert!(matches!(
        h1::parse_response(&mut buf, false),
        Err(H1Error::Head(_))
    ));
}

/// Found by the property: RFC 9110 7.6.1 has a proxy remove every field a `Connection` option
/// names; h1 removes those named by other options but keeps a field named `close` (or
/// `keep-alive`, which is hop-by-hop anyway).
#[test]
fn h1_drops_a_field_named_close_when_connection_lists_it() {
    assert_upstream(
        "HTTP/1.1 200 OK\r\nClose: a\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        false,
    );
}

// ---------------------------------------------------------------------------------------------
// Client side: front.rs against hyper's server
// ---------------------------------------------------------------------------------------------

/// A request as one side read it.
#[derive(Debug, PartialEq)]
struct Seen {
    method: Method,
    target: String,
    version: Version,
    /// In `HeaderMap` order: names lowercase, values as sent, repeated names in order.
    fields: Vec<(String, Wire)>,
    body: Result<Wire, String>,
}

/// What hyper's HTTP/1 server made of a byte stream.
#[derive(Debug, PartialEq)]
struct ServerRun {
    /// The requests it handed to its service, in order.
    requests: Vec<Seen>,
    end: ServerEnd,
}

#[derive(Debug, PartialEq)]
enum ServerEnd {
    /// The connection ended cleanly.
    Closed,
    /// The connection ended with this error (a 400 or 431 answer, a cut body…).
    Failed(String),
    /// Still waiting for bytes.
    Waiting,
}

/// Front's reading of a plain request.
#[derive(Debug)]
struct FrontPlain {
    request: Seen,
    /// The client asked to close after the response.
    close: bool,
    /// What front left in the buffer after the head.
    rest: Wire,
}

fn check_front(rt: &Runtime, input: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(input);
    let parsed = front::parse_request(&mut buf);
    let fail = |why: &str, front: &dyn fmt::Debug, hyper: &dyn fmt::Debug| {
        TestCaseError::fail(format!(
            "{why}\n  input: {:?}\n  front: {front:?}\n  hyper: {hyper:?}",
            Wire(input.to_vec())
        ))
    };
    match parsed {
        Parsed::NotPlain => {
            if buf != input {
                return Err(fail(
                    "NotPlain must leave the buffer as it was",
                    &Wire(buf.to_vec()),
                    &"(not run)",
                ));
            }
        }
        Parsed::Partial => {
            if buf != input || buf.len() > front::MAX_HEAD_BYTES {
                return Err(fail(
                    "Partial must leave the buffer as it was, and only up to 64 KiB",
                    &Wire(buf.to_vec()),
                    &"(not run)",
                ));
            }
            let hyper = hyper_serve(rt, input, false);
            if !(hyper.requests.is_empty() && hyper.end == ServerEnd::Waiting) {
                return Err(fail(
                    "front waits for more bytes, hyper does not",
                    &"Partial",
                    &hyper,
                ));
            }
        }
        Parsed::Plain { req, close } => {
            let body_empty =
                req.body().is_end_stream() && req.body().size_hint().exact() == Some(0);
            let front = Seen {
                method: req.method().clone(),
                target: req.uri().to_string(),
                version: req.version(),
                fields: field_list(req.headers()),
                body: if body_empty {
                    Ok(Wire(Vec::new()))
                } else {
                    Err("a body".into())
                },
            };
            let front = FrontPlain {
                request: front,
                close,
                rest: Wire(buf.to_vec()),
            };
            let whole = hyper_serve(rt, input, true);
            let Some(first) = whole.requests.first() else {
                return Err(fail(
                    "front serves a request hyper does not accept",
                    &front,
                    &whole,
                ));
            };
            if *first != front.request || front.request.version != Version::HTTP_11 {
                return Err(fail(
                    "front and hyper read the request differently",
                    &front,
                    &whole,
                ));
            }
            // What follows the head: hyper on this connection must read it as hyper on a fresh
            // connection given only the rest (front's next parse, or the hand-off, starts there).
            if !front.close {
                let after = hyper_serve(rt, &front.rest.0, true);
                if whole.requests[1..] != after.requests[..] || whole.end != after.end {
                    return Err(fail(
                        &format!(
                            "hyper reads what follows the head differently from front's rest\n  \
                             hyper given the rest alone: {after:?}"
                        ),
                        &front,
                        &whole,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs hyper's HTTP/1 server (parsing as the proxy configures it: defaults) over `input`, then
/// end of stream when `eof`; without it, hyper is given a few turns to show it waits for more.
fn hyper_serve(rt: &Runtime, input: &[u8], eof: bool) -> ServerRun {
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(input.len() + 64 * 1024);
        client
            .write_all(input)
            .await
            .expect("the pipe holds the whole input");
        if eof {
            client.shutdown().await.expect("end of stream");
        }
        let seen = Rc::new(RefCell::new(Vec::new()));
        let service = {
            let seen = seen.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let method = parts.method.clone();
                    let body = match body.collect().await {
                        Ok(b) => Ok(Wire(b.to_bytes().to_vec())),
                        Err(e) => Err(chain(&e)),
                    };
                    seen.borrow_mut().push(Seen {
                        method: parts.method,
                        target: parts.uri.to_string(),
                        version: parts.version,
                        fields: field_list(&parts.headers),
                        body,
                    });
                    let mut resp = Response::new(Empty::<Bytes>::new());
                    if inbound::is_forbidden_method(&method) {
                        // As the gateway answers them: to a 2xx, hyper would take the bytes
                        // after a CONNECT head as a tunnel, not as the next request.
                        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                    }
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        // `half_close`: the end of the input must not abort a request in flight (without it
        // hyper drops the connection at the client's FIN). Parsing is the same either way.
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        // Everything is in memory: a finished connection needs a handful of turns; one that
        // waits for bytes makes no progress after its first.
        let end = match drive(conn, if eof { 10_000 } else { 16 }).await {
            Some(Ok(())) => ServerEnd::Closed,
            Some(Err(e)) => ServerEnd::Failed(chain(&e)),
            None => ServerEnd::Waiting,
        };
        let requests = std::mem::take(&mut *seen.borrow_mut());
        ServerRun { requests, end }
    })
}

// ---------------------------------------------------------------------------------------------
// Upstream side: h1.rs against hyper's client
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct ResponseCase {
    wire: Wire,
    /// The request was HEAD.
    head_request: bool,
    /// h1 is fed this many bytes per read (it is also fed the whole input at once).
    step: usize,
}

impl fmt::Debug for ResponseCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} (head_request: {}, step: {})",
            self.wire, self.head_request, self.step
        )
    }
}

/// A response as one side read it.
#[derive(Debug, PartialEq)]
struct Read {
    status: u16,
    version: Version,
    /// End-to-end fields by name (lowercase), each name's values in order.
    fields: BTreeMap<String, Vec<Wire>>,
    body: Wire,
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Accepted(Read),
    /// Refused, or the stream ended before the message did.
    Refused(String),
}

/// h1's reading of a response, with what the allow-list looks at.
#[derive(Debug)]
struct H1Run {
    verdict: Verdict,
    error: Option<H1Error>,
    /// The bytes after the final head, when h1 accepted the head.
    body_wire: Option<Wire>,
    /// Where the message ended in the input, when h1 accepted it.
    end: Option<usize>,
}

/// hyper's client's reading of a response.
#[derive(Debug)]
struct HyperRead {
    status: u16,
    version: Version,
    headers: HeaderMap,
    body: Wire,
}

fn check_upstream(rt: &Runtime, case: &ResponseCase) -> Result<(), TestCaseError> {
    let input = &case.wire.0;
    let hyper = hyper_fetch(rt, input, case.head_request);
    // Each read reparses the head: small reads of a long input cost quadratic time, and the
    // boundaries they try are tried as well on short inputs.
    let step = case.step.max(input.len() / 64);
    let mut end_whole = None;
    for step in [usize::MAX, step] {
        let h1 = h1_read(input, case.head_request, step);
        let fail = |why: String| {
            TestCaseError::fail(format!(
                "{why}\n  input: {case:?}\n  h1 (fed {} bytes a read): {h1:?}\n  hyper: {hyper:?}",
                if step == usize::MAX {
                    "all".to_string()
                } else {
                    step.to_string()
                }
            ))
        };
        match (&h1.verdict, &hyper) {
            (Verdict::Accepted(ours), Ok(theirs)) => {
                same_response(ours, theirs).map_err(fail)?;
                let end = h1.end.expect("an accepted response has an end");
                match end_whole {
                    None => {
                        same_end(rt, case, ours, end).map_err(fail)?;
                        end_whole = Some(end);
                    }
                    Some(whole) if whole != end => {
                        return Err(fail(format!(
                            "h1 ends the message at byte {end} fed in pieces, at {whole} fed whole"
                        )));
                    }
                    Some(_) => {}
                }
            }
            (Verdict::Accepted(ours), Err(_)) => {
                if intended_leniency(rt, case, &h1, ours).is_none() {
                    return Err(fail(
                        "h1 accepts a response hyper refuses, and no intended leniency explains it"
                            .into(),
                    ));
                }
            }
            (Verdict::Refused(_), Ok(theirs)) => {
                if intended_strictness(input, &h1, theirs).is_none() {
                    return Err(fail(
                        "h1 refuses a response hyper accepts, and no intended strictness explains it"
                            .into(),
                    ));
                }
            }
            (Verdict::Refused(_), Err(_)) => {}
        }
    }
    Ok(())
}

/// Whether hyper ends the message where h1 does (at byte `end`): what follows is the next
/// response on a kept connection, so a different end splits the stream differently. Given the
/// input up to `end`, hyper must read the same response; given one byte less, it must not.
fn same_end(rt: &Runtime, case: &ResponseCase, ours: &Read, end: usize) -> Result<(), String> {
    let input = &case.wire.0;
    if end < input.len() {
        let cut = hyper_fetch(rt, &input[..end], case.head_request);
        if let Err(e) = cut
            .as_ref()
            .map_err(|e| e.clone())
            .and_then(|t| same_response(ours, t))
        {
            return Err(format!(
                "h1 ends the message at byte {end}; hyper, given the input up to there, does \
                 not read the same response (it ends the message later): {e}"
            ));
        }
    }
    if end > 0 {
        if let Ok(theirs) = hyper_fetch(rt, &input[..end - 1], case.head_request) {
            if same_response(ours, &theirs).is_ok() {
                return Err(format!(
                    "h1 ends the message at byte {end}; hyper reads the same response from the \
                     bytes before it (it ends the message earlier)"
                ));
            }
        }
    }
    Ok(())
}

/// Whether h1's reading is hyper's: status, version, body, and the end-to-end fields; and no
/// Content-Length handed on beside Transfer-Encoding.
fn same_response(ours: &Read, theirs: &HyperRead) -> Result<(), String> {
    if theirs.headers.contains_key(TRANSFER_ENCODING)
        && ours.fields.contains_key(CONTENT_LENGTH.as_str())
    {
        return Err("h1 hands on a Content-Length beside Transfer-Encoding".into());
    }
    let theirs = Read {
        status: theirs.status,
        version: theirs.version,
        fields: end_to_end(&theirs.headers),
        body: theirs.body.clone(),
    };
    if *ours != theirs {
        return Err(format!(
            "h1 and hyper read the response differently\n  hyper, end to end: {theirs:?}"
        ));
    }
    Ok(())
}

/// Feeds `input` to h1 `step` bytes at a time, as the upstream fast path reads: the head (after
/// any 1xx), then the body by its framing, to the end of the input at most.
fn h1_read(input: &[u8], head_request: bool, step: usize) -> H1Run {
    let mut feed = Feed { rest: input, step };
    let mut buf = BytesMut::new();
    let refused = |error: H1Error, body_wire: Option<Wire>| H1Run {
        verdict: Verdict::Refused(error.to_string()),
        error: Some(error),
        body_wire,
        end: None,
    };
    let incomplete = |what: &str, body_wire: Option<Wire>| H1Run {
        verdict: Verdict::Refused(format!("the input ends inside the {what}")),
        error: None,
        body_wire,
        end: None,
    };
    let head = loop {
        if !buf.is_empty() {
            match h1::parse_response(&mut buf, head_request) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => return refused(e, None),
            }
        }
        if !feed.more(&mut buf) {
            return incomplete("head", None);
        }
    };
    let body_wire = Some(Wire([&buf[..], feed.rest].concat()));
    let body = match head.framing {
        Framing::Empty => Vec::new(),
        Framing::Length(n) => loop {
            if buf.len() as u64 >= n {
                break buf.split_to(n as usize).to_vec();
            }
            if !feed.more(&mut buf) {
                return incomplete("body", body_wire);
            }
        },
        Framing::Chunked => {
            let mut decoder = Chunked::default();
            let mut body = Vec::new();
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Decoded::Data(data)) => body.extend_from_slice(&data),
                    Ok(Decoded::End) => break body,
                    Ok(Decoded::NeedMore) => {
                        if !feed.more(&mut buf) {
                            return incomplete("chunked body", body_wire);
                        }
                    }
                    Err(e) => return refused(e, body_wire),
                }
            }
        }
        Framing::Close => {
            while feed.more(&mut buf) {}
            buf.split().to_vec()
        }
    };
    let mut fields = BTreeMap::<String, Vec<Wire>>::new();
    for (name, value) in &head.headers {
        fields
            .entry(name.as_str().to_owned())
            .or_default()
            .push(Wire(value.as_bytes().to_vec()));
    }
    H1Run {
        verdict: Verdict::Accepted(Read {
            status: head.status.as_u16(),
            version: head.version,
            fields,
            body: Wire(body),
        }),
        error: None,
        body_wire,
        end: Some(input.len() - buf.len() - feed.rest.len()),
    }
}

/// The input still to be read, handed over `step` bytes at a time.
struct Feed<'a> {
    rest: &'a [u8],
    step: usize,
}

impl Feed<'_> {
    /// Appends the next read to `buf`; false at the end of the input.
    fn more(&mut self, buf: &mut BytesMut) -> bool {
        if self.rest.is_empty() {
            return false;
        }
        let (now, later) = self.rest.split_at(self.step.min(self.rest.len()));
        buf.extend_from_slice(now);
        self.rest = later;
        true
    }
}

/// Sends a GET (or HEAD) with hyper's client (defaults, as the proxy's hyper path has them) to
/// an upstream that answers with `input` once the request is in, then closes.
fn hyper_fetch(rt: &Runtime, input: &[u8], head_request: bool) -> Result<HyperRead, String> {
    rt.block_on(async {
        let (client_io, mut upstream) = tokio::io::duplex(input.len() + 64 * 1024);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client_io))
                .await
                .map_err(|e| chain(&e))?;
        let method = if head_request {
            Method::HEAD
        } else {
            Method::GET
        };
        let req = Request::builder()
            .method(method)
            .uri("/")
            .header(HOST, "upstream")
            .body(Empty::new())
            .expect("a valid request");
        let exchange = async move {
            let resp = sender.send_request(req).await.map_err(|e| chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| chain(&e))?.to_bytes();
            Ok(HyperRead {
                status: parts.status.as_u16(),
                version: parts.version,
                headers: parts.headers,
                body: Wire(body.to_vec()),
            })
        };
        let answer = async move {
            // Only once the request is in: bytes before it are an unsolicited response.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match upstream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            upstream
                .write_all(input)
                .await
                .expect("the pipe holds the whole response");
            upstream.shutdown().await.expect("end of stream");
            upstream
        };
        let mut conn = std::pin::pin!(conn);
        let mut conn_done = false;
        let mut both = std::pin::pin!(futures::future::join(answer, exchange));
        let exchange = poll_fn(|cx| {
            if !conn_done && conn.as_mut().poll(cx).is_ready() {
                conn_done = true;
            }
            both.as_mut().poll(cx)
        });
        match drive(exchange, 10_000).await {
            Some((_upstream, read)) => read,
            None => Err("hyper's client did not finish (test harness)".into()),
        }
    })
}

/// Fields that describe one connection (RFC 9110 7.6.1, plus `Proxy-Connection`, which old
/// clients send in place of `Connection`), written out here rather than taken from h1.rs, which
/// is under test.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The end-to-end fields of what hyper read: without the hop-by-hop ones (RFC 9110 7.6.1: the
/// fixed set, and every field a `Connection` option names), and without Content-Length when
/// Transfer-Encoding is present (RFC 9112 6.3: Transfer-Encoding overrides it, and a proxy
/// must remove it before forwarding).
fn end_to_end(headers: &HeaderMap) -> BTreeMap<String, Vec<Wire>> {
    let mut dropped: Vec<String> = HOP_BY_HOP.iter().map(|s| s.to_string()).collect();
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if !token.is_empty() {
                dropped.push(String::from_utf8_lossy(token).to_ascii_lowercase());
            }
        }
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        dropped.push(CONTENT_LENGTH.as_str().into());
    }
    let mut fields = BTreeMap::<String, Vec<Wire>>::new();
    for (name, value) in headers {
        if !dropped.iter().any(|d| d == name.as_str()) {
            fields
                .entry(name.as_str().to_owned())
                .or_default()
                .push(Wire(value.as_bytes().to_vec()));
        }
    }
    fields
}

/// What h1 refuses on purpose although hyper's client reads it. Each entry is recognised from
/// the input itself, so an h1 refusal for any other reason still fails the property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strictness {
    /// 101 Switching Protocols: the fast path does not switch protocols (hyper's client hands
    /// the 101 on, for an upgrade).
    SwitchingProtocols,
    /// HTTP/1.0 with Transfer-Encoding is faulty framing (RFC 9112 6.1). hyper refuses it too,
    /// except where the status or a HEAD request means there is no body.
    Http10TransferEncoding,
    /// A response head over h1's 64 KiB (hyper allows about 400 KiB).
    HeadOverLimit,
    /// A `Transfer-Encoding` value that is not visible ASCII: hyper reads such a body to the
    /// close, other readers as chunked; h1 refuses it.
    NonAsciiTransferEncoding,
    /// A Content-Length item of more than 19 digits (leading zeros included); hyper takes any
    /// digit string that fits in a u64.
    LongContentLength,
    /// A bare CR or LF, or another control byte but HTAB, in a chunk-size line or its
    /// extensions: readers that end lines at a bare LF frame such a body differently.
    ControlByteInChunkLine,
    /// The same in a trailer line (hyper takes a bare LF there as the end of a trailer field).
    ControlByteInTrailerLine,
    /// A chunk size of more than 15 hex digits (leading zeros included).
    WideChunkSize,
    /// A chunk-size or trailer line of 4 KiB or more.
    LongLine,
    /// A trailer section over 64 KiB.
    LongTrailerSection,
}

/// h1's line limit for chunk-size and trailer lines (`MAX_LINE_BYTES` in h1.rs).
const H1_MAX_LINE_BYTES: usize = 4096;

/// Which intended strictness, if any, explains h1 refusing what hyper read as `theirs`.
fn intended_strictness(input: &[u8], h1: &H1Run, theirs: &HyperRead) -> Option<Strictness> {
    if h1.error == Some(H1Error::Upgrade) && theirs.status == 101 {
        return Some(Strictness::SwitchingProtocols);
    }
    let head_error = matches!(h1.error, Some(H1Error::Head(_)));
    if head_error
        && theirs.version == Version::HTTP_10
        && theirs.headers.contains_key(TRANSFER_ENCODING)
    {
        return Some(Strictness::Http10TransferEncoding);
    }
    let non_ascii_te = theirs
        .headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_err());
    if head_error && non_ascii_te {
        return Some(Strictness::NonAsciiTransferEncoding);
    }
    if h1.error == Some(H1Error::HeadTooLarge) && input.len() > h1::MAX_HEAD_BYTES {
        return Some(Strictness::HeadOverLimit);
    }
    let long_length = theirs
        .headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|item| item.trim_ascii().len() > 19);
    if h1.error == Some(H1Error::ContentLength) && long_length {
        return Some(Strictness::LongContentLength);
    }
    if matches!(h1.error, Some(H1Error::Chunked(_))) {
        return chunked_strictness(&h1.body_wire.as_ref()?.0);
    }
    None
}

/// Names the first intended strictness a chunked body shows, walking it as h1 splits it.
fn chunked_strictness(wire: &[u8]) -> Option<Strictness> {
    let walk = ChunkedLines::of(wire);
    let mut trailer_bytes = 0;
    for (kind, range) in &walk.lines {
        let line = &wire[range.clone()];
        if line.len() >= H1_MAX_LINE_BYTES {
            return Some(Strictness::LongLine);
        }
        if line.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
            return Some(match kind {
                LineKind::Size => Strictness::ControlByteInChunkLine,
                LineKind::Trailer => Strictness::ControlByteInTrailerLine,
            });
        }
        if *kind == LineKind::Trailer {
            trailer_bytes += line.len() + 2;
            if trailer_bytes > h1::MAX_HEAD_BYTES {
                return Some(Strictness::LongTrailerSection);
            }
        } else if line.iter().take_while(|b| b.is_ascii_hexdigit()).count() > 15 {
            return Some(Strictness::WideChunkSize);
        }
    }
    (wire.len() - walk.unterminated > H1_MAX_LINE_BYTES).then_some(Strictness::LongLine)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// A chunk-size line, with any extensions.
    Size,
    /// A trailer line (the empty one that ends the body included).
    Trailer,
}

/// The lines of a chunked body as h1 splits it: each ends at the next CRLF, chunk data is
/// skipped by its size. The walk stops after the empty line that ends the trailers, or where
/// the framing breaks.
struct ChunkedLines {
    lines: Vec<(LineKind, std::ops::Range<usize>)>,
    /// Where the walk ran out of CRLFs: the bytes from here are a line h1 is still waiting
    /// to see end (the length when the walk stopped for another reason).
    unterminated: usize,
}

impl ChunkedLines {
    fn of(wire: &[u8]) -> Self {
        let mut lines = Vec::new();
        let mut at = 0;
        let mut kind = LineKind::Size;
        loop {
            let Some(len) = wire[at..].windows(2).position(|w| w == b"\r\n") else {
                return Self {
                    lines,
                    unterminated: at,
                };
            };
            let line = at..at + len;
            lines.push((kind, line.clone()));
            at += len + 2;
            if kind == LineKind::Trailer {
                if line.is_empty() {
                    break;
                }
                continue;
            }
            let digits = wire[line.clone()]
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            let size = std::str::from_utf8(&wire[line.start..line.start + digits])
                .ok()
                .and_then(|hex| usize::from_str_radix(hex, 16).ok());
            match size {
                Some(0) => kind = LineKind::Trailer,
                Some(n) if wire.len() - at >= n.saturating_add(2) => at += n + 2,
                _ => break,
            }
        }
        // The walk ended (or the framing broke) before any unterminated bytes.
        Self {
            lines,
            unterminated: wire.len(),
        }
    }

    /// Where the trailer fields lie: from after the last chunk's size line to the empty line
    /// that ends the body; `None` unless the walk reached that line.
    fn trailer_fields(&self) -> Option<std::ops::Range<usize>> {
        let (kind, last) = self.lines.last()?;
        if *kind != LineKind::Trailer || !last.is_empty() {
            return None;
        }
        let first = self
            .lines
            .iter()
            .find(|(k, _)| *k == LineKind::Trailer)?
            .1
            .start;
        Some(first..last.start)
    }
}

/// What h1 accepts on purpose although hyper's client refuses it. Each entry is verified, not
/// assumed: hyper must read the response the same as h1 once the part h1 ignores is taken out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leniency {
    /// h1 finds the end of the trailer section by its CRLF lines and drops the trailers
    /// without parsing them as fields; hyper parses them and refuses malformed ones. The body
    /// and where it ends are the same.
    TrailerFields,
}

/// Which intended leniency, if any, explains h1 accepting (as `ours`) what hyper refuses.
fn intended_leniency(
    rt: &Runtime,
    case: &ResponseCase,
    h1: &H1Run,
    ours: &Read,
) -> Option<Leniency> {
    let input = &case.wire.0;
    let body_wire = &h1.body_wire.as_ref()?.0;
    let body_start = input.len() - body_wire.len();
    let walk = ChunkedLines::of(body_wire);
    let trailers = walk.trailer_fields()?;
    // Lines with no CR or LF inside end at the same CRLF for hyper, which reads a trailer line
    // up to its CR: then both end the section, and the message, at the same byte.
    let one_line_each = walk.lines.iter().all(|(_, line)| {
        !body_wire[line.clone()]
            .iter()
            .any(|&b| b == b'\r' || b == b'\n')
    });
    if trailers.is_empty() || !one_line_each {
        return None;
    }
    let without = [
        &input[..body_start + trailers.start],
        &input[body_start + trailers.end..],
    ]
    .concat();
    let theirs = hyper_fetch(rt, &without, case.head_request).ok()?;
    same_response(ours, &theirs)
        .is_ok()
        .then_some(Leniency::TrailerFields)
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Bytes, shown escaped (long ones shortened in the middle).
#[derive(Clone, PartialEq, Eq)]
struct Wire(Vec<u8>);

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 3000;
        let b = &self.0;
        if b.len() <= SHOWN {
            write!(f, "b\"{}\"", b.escape_ascii())
        } else {
            write!(
                f,
                "b\"{}\"…({} bytes)…b\"{}\"",
                b[..SHOWN - 500].escape_ascii(),
                b.len() - SHOWN,
                b[b.len() - 500..].escape_ascii()
            )
        }
    }
}

fn field_list(headers: &HeaderMap) -> Vec<(String, Wire)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), Wire(v.as_bytes().to_vec())))
        .collect()
}

/// An error with its causes, for comparing and printing.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Polls `fut` until it finishes, letting other tasks run between polls; `None` when it has not
/// finished after `polls` polls.
async fn drive<F: Future>(fut: F, polls: usize) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..polls {
        if let Poll::Ready(out) = futures::poll!(fut.as_mut()) {
            return Some(out);
        }
        tokio::task::yield_now().await;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// The alternatives for one part of a message: the usual ones, and odd ones drawn about one
/// time in [`ODD`] (each list weighted within itself). Most generated messages are then whole
/// and valid, so the comparisons reach the bodies, the rest and the next message; the odd
/// parts and the mutations make the rest malformed in one place at a time.
struct Choices {
    usual: &'static [(u32, &'static str)],
    odd: &'static [(u32, &'static str)],
}

/// One odd part in this many draws.
const ODD: u32 = 40;

fn weighted(options: &'static [(u32, &'static str)]) -> BoxedStrategy<&'static str> {
    let expanded: Vec<&'static str> = options
        .iter()
        .flat_map(|&(weight, s)| std::iter::repeat_n(s, weight as usize))
        .collect();
    prop::sample::select(expanded).boxed()
}

/// One of `choices` (only odd ones where a list has no usual ones: the caller draws it rarely).
fn pick(choices: &'static Choices) -> BoxedStrategy<&'static str> {
    if choices.odd.is_empty() {
        return weighted(choices.usual);
    }
    if choices.usual.is_empty() {
        return weighted(choices.odd);
    }
    prop_oneof![
        ODD - 1 => weighted(choices.usual),
        1 => weighted(choices.odd),
    ]
    .boxed()
}

fn pick_bytes(choices: &'static Choices) -> BoxedStrategy<Vec<u8>> {
    pick(choices).prop_map(|s| s.as_bytes().to_vec()).boxed()
}

/// A field line: name, separator, value, line end.
fn field(names: &'static Choices, values: &'static Choices) -> BoxedStrategy<Vec<u8>> {
    (pick(names), pick(SEPARATORS), pick(values), pick(LINE_ENDS))
        .prop_map(|(n, s, v, e)| [n, s, v, e].concat().into_bytes())
        .boxed()
}

/// A field with a long value: past the line and head limits now and then.
fn long_field() -> BoxedStrategy<Vec<u8>> {
    prop::sample::select(vec![100usize, 1000, 5000, 20_000, 66_000])
        .prop_map(|n| format!("X-Long: {}\r\n", "v".repeat(n)).into_bytes())
        .boxed()
}

/// Usually nothing; now and then about `MAX_HEADERS` fields, on either side of the limit.
fn many_fields() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        80 => Just(Vec::new()),
        1 => (95usize..106).prop_map(|n| {
            (0..n).map(|i| format!("X-N{i}: {i}\r\n")).collect::<String>().into_bytes()
        }),
    ]
    .boxed()
}

fn noise_byte() -> BoxedStrategy<u8> {
    let special = vec![
        b'\r', b'\n', b' ', b'\t', 0, b':', b',', b';', 0x0b, 0x0c, 0x7f, 0x80, 0xff, b'0', b'a',
    ];
    prop_oneof![3 => prop::sample::select(special), 1 => any::<u8>()].boxed()
}

/// A random suffix: whatever an attacker or a broken peer sends next.
fn noise() -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(noise_byte(), 1..24).boxed()
}

#[derive(Debug, Clone)]
enum Mutation {
    /// The bytes stop here: a peer that stops midway, or a read not yet complete.
    Truncate(Index),
    Insert(Index, u8),
    Replace(Index, u8),
    Delete(Index),
}

/// Usually none; one or two in a fifth of the messages.
fn mutations() -> BoxedStrategy<Vec<Mutation>> {
    let one = prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), noise_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        3 => (any::<Index>(), noise_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        2 => any::<Index>().prop_map(Mutation::Delete),
    ];
    prop_oneof![
        4 => Just(Vec::new()),
        1 => prop::collection::vec(one, 1..3),
    ]
    .boxed()
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
            Mutation::Insert(at, b) => bytes.insert(at.index(bytes.len() + 1), *b),
            Mutation::Replace(at, b) if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Delete(at) if !bytes.is_empty() => {
                bytes.remove(at.index(bytes.len()));
            }
            _ => {}
        }
    }
    bytes
}

// --- parts of both -----------------------------------------------------------------------------

const SPACES: &Choices = &Choices {
    usual: &[(1, " ")],
    odd: &[(1, "  "), (1, "\t"), (1, "")],
};
const SEPARATORS: &Choices = &Choices {
    usual: &[(16, ": "), (2, ":"), (1, ":\t"), (1, ":   ")],
    odd: &[],
};
const LINE_ENDS: &Choices = &Choices {
    usual: &[(20, "\r\n"), (1, "\n")],
    odd: &[(1, "\r"), (1, ""), (1, "\r\r\n"), (1, "\n\r")],
};
const HEAD_ENDS: &Choices = LINE_ENDS;
const ANY_VALUES: &Choices = &Choices {
    usual: &[
        (8, "a"),
        (4, "b"),
        (3, ""),
        (2, "a, b"),
        (1, "  spaced  "),
        (1, "é"),
        (1, "\u{80}"),
        (1, "a\tb"),
        (1, "\"quoted, with comma\""),
    ],
    odd: &[
        (1, "a\u{7f}b"),
        (1, "a\u{0}b"),
        (1, "a\u{b}b"),
        (1, "a\u{c}b"),
        (1, "a\rb"),
        (1, "a\nb"),
        (1, "a\r\n b"),
    ],
};
const CL_NAMES: &Choices = &Choices {
    usual: &[
        (12, "Content-Length"),
        (3, "content-length"),
        (1, "CONTENT-LENGTH"),
    ],
    odd: &[
        (1, "Content-Length "),
        (1, "Content-Length\t"),
        (1, " Content-Length"),
        (1, "Content_Length"),
        (1, "Content-Lengt"),
    ],
};
const TE_NAMES: &Choices = &Choices {
    usual: &[
        (12, "Transfer-Encoding"),
        (3, "transfer-encoding"),
        (1, "TRANSFER-ENCODING"),
    ],
    odd: &[
        (1, "Transfer-Encoding "),
        (1, " Transfer-Encoding"),
        (1, "Transfer_Encoding"),
        (1, "Transfer-Encodin"),
    ],
};
const TE_VALUES: &Choices = &Choices {
    usual: &[
        (16, "chunked"),
        (2, "gzip, chunked"),
        (2, "chunked, gzip"),
        (2, "identity"),
        (2, "Chunked"),
        (1, "CHUNKED"),
        (1, " chunked "),
        (1, "chunked, chunked"),
        (1, "gzip,chunked,identity"),
    ],
    odd: &[
        (1, "chunked,"),
        (1, ",chunked"),
        (1, ""),
        (1, "xchunked"),
        (1, "chunke"),
        (1, "\"chunked\""),
        (1, "chunked;q=1"),
        (1, "\u{80}, chunked"),
        (1, "gzip\u{80}, chunked"),
        (1, "chunked\u{b}"),
        (1, "chunked\t"),
    ],
};
const CONNECTION_NAMES: &Choices = &Choices {
    usual: &[(8, "Connection"), (2, "connection")],
    odd: &[(1, "Proxy-Connection"), (1, "Connection ")],
};
const CONNECTION_VALUES: &Choices = &Choices {
    usual: &[
        (6, "close"),
        (6, "keep-alive"),
        (2, "Close"),
        (2, "keep-alive, close"),
        (2, "x-hop"),
        (1, "X-Hop, close"),
        (1, "te, x-hop"),
        (1, "upgrade"),
    ],
    odd: &[
        (1, "closed"),
        (1, "close\u{80}"),
        (1, "\u{80}, close"),
        (1, "content-length"),
        (1, "transfer-encoding"),
        (1, "Content-Type"),
        (1, ""),
        (1, ",close,"),
        (1, "x-hop\u{80}"),
    ],
};
/// Lines that are no field: obs-fold, no colon, empty name, an early end of the head.
const ODD_LINES: &Choices = &Choices {
    usual: &[],
    odd: &[
        (2, " folded\r\n"),
        (1, "\tfolded\r\n"),
        (1, "no colon\r\n"),
        (1, ": empty name\r\n"),
        (1, "X-Tag: a\r\n b\r\n"),
        (1, "X-Tag: a\n\tb\n"),
        (1, "\r\n"),
    ],
};

// --- requests ----------------------------------------------------------------------------------

const METHODS: &Choices = &Choices {
    usual: &[
        (30, "GET"),
        (3, "HEAD"),
        (3, "POST"),
        (1, "PUT"),
        (3, "DELETE"),
        (3, "OPTIONS"),
        (2, "TRACE"),
        (1, "PATCH"),
        (2, "CONNECT"),
        (1, "PRI"),
        (1, "get"),
        (1, "X-PURGE"),
    ],
    odd: &[(1, "M@X"), (1, "GÉT"), (1, "G\u{0}T"), (1, "")],
};
const TARGETS: &Choices = &Choices {
    usual: &[
        (12, "/"),
        (12, "/api/x?y=1"),
        (3, "/v1/items/42"),
        (1, "/a%20b"),
        (1, "/a?b=c&d=%ZZ"),
        (1, "//double/slash"),
        (1, "/?"),
        (1, "/#frag"),
        (1, "/a#b?c"),
        (1, "/é"),
        (1, "/\u{80}"),
        (1, "/{}|\\^`"),
        (1, "/[::1]"),
        (1, "/%"),
        (1, "/a\"b<c>"),
        (2, "*"),
        (2, "http://h/p?q"),
        (1, "http://h"),
        (1, "https://h:443/p"),
        (2, "h:443"),
        (1, "a/b"),
        (1, "?q"),
    ],
    odd: &[(1, "/a\u{7f}b"), (1, "/a\tb"), (1, "/a b"), (1, "")],
};
const REQUEST_VERSIONS: &Choices = &Choices {
    usual: &[(10, "HTTP/1.1"), (1, "HTTP/1.0")],
    odd: &[
        (1, "HTTP/2.0"),
        (1, "HTTP/1.2"),
        (1, "http/1.1"),
        (1, "HTTP/1.10"),
        (1, "HTTP/1"),
        (1, "HTTP/1.1 "),
        (1, "HTTP/0.9"),
        (1, ""),
    ],
};
const HOST_NAMES: &Choices = &Choices {
    usual: &[(8, "Host"), (2, "host"), (1, "HOST")],
    odd: &[(1, "Host ")],
};
const HOST_VALUES: &Choices = &Choices {
    usual: &[(8, "gw"), (2, "gw:8080"), (1, "[::1]:80")],
    odd: &[(1, ""), (1, "a b"), (1, "é"), (1, "gw, other")],
};
const REQUEST_LENGTHS: &Choices = &Choices {
    usual: &[(12, "0"), (2, "1"), (1, "5")],
    odd: &[
        (1, "00"),
        (1, "+0"),
        (1, "-0"),
        (1, "0, 0"),
        (1, "0,0"),
        (1, "0 0"),
        (1, "0,"),
        (1, "-1"),
        (1, ""),
        (1, "0x0"),
        (1, "18446744073709551615"),
        (1, "99999999999999999999"),
        (1, "000000000000000000000"),
        (1, "0\u{b}"),
        (1, "0\u{80}"),
    ],
};
const REQUEST_OTHER_NAMES: &Choices = &Choices {
    usual: &[
        (3, "Expect"),
        (3, "Upgrade"),
        (1, "expect"),
        (1, "UPGRADE"),
        (1, "Keep-Alive"),
        (1, "TE"),
        (1, "Trailer"),
        (1, "Proxy-Authorization"),
        (1, "Expectation"),
        (1, "Upgrade-Insecure-Requests"),
        (1, "Content-Type"),
        (1, "Content-Lengthy"),
        (1, "Transfer-Encodings"),
    ],
    odd: &[],
};
const REQUEST_OTHER_VALUES: &Choices = &Choices {
    usual: &[
        (3, "100-continue"),
        (1, "100-Continue"),
        (3, "websocket"),
        (1, "h2c"),
        (1, "trailers"),
        (2, "1"),
        (1, "timeout=5"),
        (1, ""),
    ],
    odd: &[],
};
const PLAIN_NAMES: &Choices = &Choices {
    usual: &[
        (6, "X-Tag"),
        (3, "x-tag"),
        (2, "Accept"),
        (2, "Authorization"),
        (2, "X-Api-Key"),
        (1, "Cookie"),
        (1, "X-Forwarded-For"),
    ],
    odd: &[
        (1, "X-é"),
        (1, "X Tag"),
        (1, "X\u{0}Tag"),
        (1, "X-Tag\t"),
        (1, "X(Tag)"),
        (1, ""),
    ],
};
const REQUEST_TAILS: &Choices = &Choices {
    usual: &[
        (16, ""),
        (6, "GET /next HTTP/1.1\r\nHost: gw\r\n\r\n"),
        (1, "GET /next HTTP/1.1\r\nHost: gw\r\n"),
        (1, "GET /next HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
        (
            1,
            "POST /next HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (1, "GET /next HTTP/1.0\r\n\r\n"),
        (1, "\r\nGET /next HTTP/1.1\r\n\r\n"),
    ],
    odd: &[
        (1, "{}"),
        (1, "hello"),
        (1, "0\r\n\r\n"),
        (1, "5\r\nhello\r\n0\r\n\r\n"),
        (1, "\r\n"),
    ],
};

/// A request field line.
fn request_field() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        4 => field(HOST_NAMES, HOST_VALUES),
        4 => field(CL_NAMES, REQUEST_LENGTHS),
        2 => field(TE_NAMES, TE_VALUES),
        3 => field(CONNECTION_NAMES, CONNECTION_VALUES),
        2 => field(REQUEST_OTHER_NAMES, REQUEST_OTHER_VALUES),
        12 => field(PLAIN_NAMES, ANY_VALUES),
    ]
    .boxed()
}

/// Now and then an odd line or a long field among the others.
fn odd_line() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        30 => Just(Vec::new()),
        2 => pick_bytes(ODD_LINES),
        1 => long_field(),
    ]
    .boxed()
}

/// The target: usually one of [`TARGETS`], now and then a long path.
fn target() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        80 => pick_bytes(TARGETS),
        1 => prop::sample::select(vec![1000usize, 9000, 70_000])
            .prop_map(|n| format!("/{}", "p".repeat(n)).into_bytes()),
    ]
    .boxed()
}

/// A client's bytes: a request head from the grammar, what follows it, and mutations.
fn request() -> impl Strategy<Value = Wire> {
    let line = (
        pick(METHODS),
        pick(SPACES),
        target(),
        pick(SPACES),
        pick(REQUEST_VERSIONS),
        pick(LINE_ENDS),
    );
    let fields = (
        prop::collection::vec(request_field(), 0..6),
        odd_line(),
        any::<Index>(),
        many_fields(),
    )
        .prop_map(|(mut fields, odd, at, many)| {
            fields.insert(at.index(fields.len() + 1), odd);
            fields.push(many);
            fields.concat()
        });
    let tail = prop_oneof![10 => pick_bytes(REQUEST_TAILS), 1 => noise()];
    (line, fields, pick(HEAD_ENDS), tail, mutations()).prop_map(
        |((method, sp1, target, sp2, version, eol), fields, end, tail, muts)| {
            let mut wire = [method.as_bytes(), sp1.as_bytes(), &target, sp2.as_bytes()].concat();
            wire.extend_from_slice(version.as_bytes());
            wire.extend_from_slice(eol.as_bytes());
            wire.extend_from_slice(&fields);
            wire.extend_from_slice(end.as_bytes());
            wire.extend_from_slice(&tail);
            Wire(mutate(wire, &muts))
        },
    )
}

// --- responses ---------------------------------------------------------------------------------

const INTERIM: &Choices = &Choices {
    usual: &[
        (40, ""),
        (2, "HTTP/1.1 100 Continue\r\n\r\n"),
        (1, "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"),
        (1, "HTTP/1.1 102 Processing\r\n\r\n"),
        (1, "HTTP/1.0 100 Continue\r\n\r\n"),
        (1, "HTTP/1.1 100 Continue\n\n"),
        (
            1,
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
        ),
    ],
    odd: &[
        (1, "HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n"),
        (
            1,
            "HTTP/1.1 100 Continue\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (1, "HTTP/1.1 199 Whatever\r\n\r\n"),
    ],
};
const RESPONSE_VERSIONS: &Choices = &Choices {
    usual: &[(5, "HTTP/1.1"), (1, "HTTP/1.0")],
    odd: &[
        (1, "HTTP/2.0"),
        (1, "HTTP/1.2"),
        (1, "http/1.1"),
        (1, "HTTP/1"),
        (1, "ICY"),
    ],
};
const STATUS_CODES: &Choices = &Choices {
    usual: &[
        (30, "200"),
        (2, "201"),
        (3, "204"),
        (1, "206"),
        (1, "299"),
        (1, "301"),
        (3, "304"),
        (2, "404"),
        (2, "500"),
        (1, "599"),
        (1, "101"),
    ],
    odd: &[
        (1, "100"),
        (2, "101"),
        (1, "103"),
        (1, "199"),
        (1, "600"),
        (1, "999"),
        (1, "099"),
        (1, "000"),
        (1, "2000"),
        (1, "20"),
        (1, "2x0"),
    ],
};
const REASONS: &Choices = &Choices {
    usual: &[
        (16, "OK"),
        (3, ""),
        (1, "Not Found"),
        (1, "A B  C"),
        (1, "é"),
        (1, "\t"),
    ],
    odd: &[(1, "X\u{7f}"), (1, "X\u{0}")],
};
const RESPONSE_NAMES: &Choices = &Choices {
    usual: &[
        (6, "Content-Type"),
        (3, "Set-Cookie"),
        (2, "Date"),
        (3, "X-Hop"),
        (2, "Keep-Alive"),
        (1, "Trailer"),
        (1, "Upgrade"),
        (1, "Proxy-Authenticate"),
        (1, "TE"),
        (1, "Close"),
        (4, "X-A"),
        (1, "x-a"),
    ],
    odd: &[(1, "X-é"), (1, "X A"), (1, "X-A "), (1, "")],
};
const CHUNK_EXTENSIONS: &Choices = &Choices {
    usual: &[
        (30, ""),
        (2, ";a=b"),
        (1, ";a"),
        (1, " ;a"),
        (1, "\t;a=\"x;y\""),
        (1, ";a=\"q\\\"r\""),
        (1, " "),
        (1, "; a = b"),
        (1, ";\u{80}"),
    ],
    odd: &[
        (1, ";a\rb"),
        (1, ";a\nb"),
        (1, "\n"),
        (1, "\r"),
        (1, "\u{c}"),
        (1, "\u{b}"),
        (1, ";\u{0}"),
        (1, ";\u{7f}"),
    ],
};
const CHUNK_SIZES_ODD: &Choices = &Choices {
    usual: &[],
    odd: &[
        (1, ""),
        (1, "x"),
        (1, "-1"),
        (1, "0x5"),
        (1, "+5"),
        (1, " 5"),
        (1, "5 5"),
        (1, "ffffffffffffffff"),
        (1, "10000000000000000"),
    ],
};
const CHUNK_DATA_ENDS: &Choices = &Choices {
    usual: &[(1, "\r\n")],
    odd: &[(1, "\n"), (1, "\r"), (1, ""), (1, "xx")],
};
const LAST_CHUNKS: &Choices = &Choices {
    usual: &[
        (20, "0\r\n"),
        (1, "00\r\n"),
        (1, "0;ext=1\r\n"),
        (1, "0 \r\n"),
    ],
    odd: &[(1, "0000000000000000\r\n"), (1, "0\n"), (1, "0\r"), (1, "")],
};
const TRAILER_LINES: &Choices = &Choices {
    usual: &[(8, "X-T: 1\r\n"), (1, "X-U: 2\r\n")],
    odd: &[
        (1, "X-T: a\nY: b\r\n"),
        (1, "X-T: a\rb\r\n"),
        (1, "X-T: 1\n"),
        (1, "bad line\r\n"),
        (1, " folded\r\n"),
        (1, ": v\r\n"),
        (1, "Content-Length: 9\r\n"),
        (1, "X-T:\u{0}\r\n"),
        (1, "X-T: \u{80}\r\n"),
    ],
};
const RESPONSE_TAILS: &Choices = &Choices {
    usual: &[
        (16, ""),
        (2, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
    odd: &[(1, "\r\n"), (1, "hello")],
};
const BAD_LENGTHS: &Choices = &Choices {
    usual: &[],
    odd: &[
        (1, ""),
        (1, "-1"),
        (1, "0x5"),
        (1, "5 5"),
        (1, "18446744073709551615"),
        (1, "18446744073709551613"),
        (1, "99999999999999999999"),
        (1, "1,"),
        (1, "\u{80}"),
    ],
};

/// How the body's length is written in Content-Length, given the real length.
#[derive(Debug, Clone, Copy)]
enum LengthForm {
    Exact,
    Listed,
    Repeated,
    Conflicting,
    Longer,
    Shorter,
    Signed,
    Padded,
    Spaced,
    Literal(&'static str),
}

fn length_form() -> BoxedStrategy<LengthForm> {
    use LengthForm::*;
    prop_oneof![
        40 => Just(Exact),
        1 => Just(Listed),
        1 => Just(Repeated),
        1 => Just(Conflicting),
        1 => Just(Longer),
        1 => Just(Shorter),
        1 => Just(Signed),
        1 => Just(Padded),
        1 => Just(Spaced),
        2 => pick(BAD_LENGTHS).prop_map(Literal),
    ]
    .boxed()
}

/// Content-Length field lines for a body of `n` bytes.
fn length_fields(name: &str, form: LengthForm, n: usize) -> String {
    let line = |v: &str| format!("{name}: {v}\r\n");
    match form {
        LengthForm::Exact => line(&n.to_string()),
        LengthForm::Listed => line(&format!("{n}, {n}")),
        LengthForm::Repeated => line(&n.to_string()) + &line(&n.to_string()),
        LengthForm::Conflicting => line(&n.to_string()) + &line(&(n + 1).to_string()),
        LengthForm::Longer => line(&(n + 1).to_string()),
        LengthForm::Shorter => line(&n.saturating_sub(1).to_string()),
        LengthForm::Signed => line(&format!("+{n}")),
        LengthForm::Padded => line(&format!("{n:0>20}")),
        LengthForm::Spaced => format!("{name}:\t {n} \t\r\n"),
        LengthForm::Literal(v) => line(v),
    }
}

/// How a chunk's size is written.
#[derive(Debug, Clone, Copy)]
enum SizeForm {
    Lower,
    Upper,
    Zeros,
    Wide,
    Longer,
    Shorter,
    Literal(&'static str),
}

fn size_form() -> BoxedStrategy<SizeForm> {
    use SizeForm::*;
    prop_oneof![
        60 => Just(Lower),
        4 => Just(Upper),
        2 => Just(Zeros),
        1 => Just(Wide),
        1 => Just(Longer),
        1 => Just(Shorter),
        2 => pick(CHUNK_SIZES_ODD).prop_map(Literal),
    ]
    .boxed()
}

fn chunk_size(form: SizeForm, n: usize) -> String {
    match form {
        SizeForm::Lower => format!("{n:x}"),
        SizeForm::Upper => format!("{n:X}"),
        SizeForm::Zeros => format!("00{n:x}"),
        SizeForm::Wide => format!("{n:016x}"),
        SizeForm::Longer => format!("{:x}", n + 1),
        SizeForm::Shorter => format!("{:x}", n.saturating_sub(1)),
        SizeForm::Literal(s) => s.to_string(),
    }
}

fn body_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..24),
        1 => Just(b"hello".to_vec()),
        1 => Just(b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".to_vec()),
    ]
    .boxed()
}

/// A chunked body from the grammar: chunks, the last chunk, trailers, the final line end.
fn chunked_body() -> BoxedStrategy<Vec<u8>> {
    let extension = prop_oneof![
        80 => pick(CHUNK_EXTENSIONS).prop_map(String::from),
        1 => prop::sample::select(vec![1000usize, 4090, 5000])
            .prop_map(|n| format!(";{}", "e".repeat(n))),
    ];
    let chunk = (
        prop::collection::vec(any::<u8>(), 1..16),
        size_form(),
        extension,
        pick(LINE_ENDS),
        pick(CHUNK_DATA_ENDS),
    )
        .prop_map(|(data, form, ext, eol, end)| {
            let mut c = (chunk_size(form, data.len()) + &ext + eol).into_bytes();
            c.extend_from_slice(&data);
            c.extend_from_slice(end.as_bytes());
            c
        });
    let trailer = prop_oneof![
        40 => pick_bytes(TRAILER_LINES),
        1 => prop::sample::select(vec![4090usize, 5000])
            .prop_map(|n| format!("X-Long: {}\r\n", "t".repeat(n)).into_bytes()),
    ];
    let trailers = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec(trailer, 1..3),
    ];
    (
        prop::collection::vec(chunk, 0..4),
        pick(LAST_CHUNKS),
        trailers,
        pick(LINE_ENDS),
    )
        .prop_map(|(chunks, last, trailers, end)| {
            let mut body = chunks.concat();
            body.extend_from_slice(last.as_bytes());
            body.extend_from_slice(&trailers.concat());
            body.extend_from_slice(end.as_bytes());
            body
        })
        .boxed()
}

/// The framing fields and the body to go with them.
fn framing() -> BoxedStrategy<(Vec<u8>, Vec<u8>)> {
    let te = || {
        prop_oneof![
            8 => field(TE_NAMES, TE_VALUES),
            1 => (field(TE_NAMES, TE_VALUES), field(TE_NAMES, TE_VALUES))
                .prop_map(|(a, b)| [a, b].concat()),
        ]
    };
    let length = (pick(CL_NAMES), length_form(), body_bytes())
        .prop_map(|(name, form, body)| (length_fields(name, form, body.len()).into_bytes(), body));
    let chunked = (te(), chunked_body());
    let both = (
        te(),
        pick(CL_NAMES),
        length_form(),
        any::<bool>(),
        chunked_body(),
    )
        .prop_map(|(te, name, form, te_first, body)| {
            let cl = length_fields(name, form, body.len()).into_bytes();
            let fields = if te_first { [te, cl] } else { [cl, te] };
            (fields.concat(), body)
        });
    let close = body_bytes().prop_map(|body| (Vec::new(), body));
    prop_oneof![5 => length, 5 => chunked, 1 => both, 2 => close].boxed()
}

/// A response field line.
fn response_field() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        10 => field(RESPONSE_NAMES, ANY_VALUES),
        4 => field(CONNECTION_NAMES, CONNECTION_VALUES),
        1 => field(CL_NAMES, REQUEST_LENGTHS),
        1 => field(TE_NAMES, TE_VALUES),
    ]
    .boxed()
}

/// An upstream's bytes: interim responses, a final head from the grammar with framing fields
/// among others, a body meant for that framing (or not), what follows, and mutations.
fn response() -> impl Strategy<Value = ResponseCase> {
    let status = (
        pick(INTERIM),
        pick(RESPONSE_VERSIONS),
        pick(SPACES),
        pick(STATUS_CODES),
        pick(SPACES),
        pick(REASONS),
        pick(LINE_ENDS),
    )
        .prop_map(|(interim, version, sp1, code, sp2, reason, eol)| {
            [interim, version, sp1, code, sp2, reason, eol]
                .concat()
                .into_bytes()
        });
    let fields = (
        prop::collection::vec(response_field(), 0..5),
        framing(),
        odd_line(),
        any::<(Index, Index)>(),
        many_fields(),
    )
        .prop_map(|(mut fields, (framing, body), odd, (at, odd_at), many)| {
            fields.insert(at.index(fields.len() + 1), framing);
            fields.insert(odd_at.index(fields.len() + 1), odd);
            fields.push(many);
            (fields.concat(), body)
        });
    let tail = prop_oneof![10 => pick_bytes(RESPONSE_TAILS), 1 => noise()];
    let step = prop_oneof![1 => 1usize..8, 2 => 8usize..200, 1 => 200usize..5000];
    (
        status,
        fields,
        pick(HEAD_ENDS),
        tail,
        mutations(),
        prop::bool::weighted(0.1),
        step,
    )
        .prop_map(
            |(status, (fields, body), end, tail, muts, head_request, step)| {
                let mut wire = status;
                wire.extend_from_slice(&fields);
                wire.extend_from_slice(end.as_bytes());
                wire.extend_from_slice(&body);
                wire.extend_from_slice(&tail);
                ResponseCase {
                    wire: Wire(mutate(wire, &muts)),
                    head_request,
                    step,
                }
            },
        )
}
