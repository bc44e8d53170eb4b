//! `apitree::proxy::transport::h1::parse_response` and `h1::Chunked::decode`: the upstream fast path's
//! response heads and chunked bodies.
//!
//! Input: `[flags][split1: u16 LE][split2: u16 LE][pos: u16 LE][delta: u16 LE]` then the
//! bytes an upstream sent. `flags & 1`: the request was HEAD. `flags >> 4 == 0xA`: inflate the
//! wire (repeat the byte at `pos`) so a line straddles a limit, `h1::MAX_HEAD_BYTES` when
//! `flags & 4`, else the 4096-byte chunk-line limit (rare: long inputs are slow).
//!
//! The bytes are read the way `upstream.rs` reads them: `parse_response` until a head, then,
//! for a chunked body, `Chunked::decode` until the end, more bytes appended whenever either
//! asks for them. Properties:
//! - The bytes fed whole, in 2 and in 3 pieces (cut where the split bytes say) give the same
//!   outcome: head (status, version, fields, framing, keep-alive), error or not (which error
//!   may differ: a head both too long and malformed), decoded body, and what is left after it.
//! - What an accepted head took off the buffer is a run of heads httparse parses completely,
//!   each within `MAX_HEAD_BYTES`: interim 1xx ones (not 101), then the final one.
//! - `Head.headers` holds no hop-by-hop field: neither the fixed set nor a field the final
//!   head's `Connection` names (`close` included); every other field of the final head is
//!   there, but `Content-Length` beside `Transfer-Encoding`, which is never handed on.
//! - A head with `Transfer-Encoding` is HTTP/1.1 and its values are visible ASCII (SP and
//!   HTAB allowed); framing is `Empty` for HEAD, 204 and 304, `Length` only from a
//!   `Content-Length` without `Transfer-Encoding`; `Close` framing or `Connection: close`
//!   never keeps the connection; the final status is not 1xx.

#![no_main]

mod common;

use apitree::proxy::transport::h1::{
    parse_response, Chunked, Decoded, Framing, H1Error, Head, HOP_BY_HOP, MAX_HEADERS,
    MAX_HEAD_BYTES,
};
use bytes::BytesMut;
use common::{control, inflate, lists, named, point, show, u16_at, INFLATE};
use http::{header, StatusCode, Version};
use libfuzzer_sys::fuzz_target;

/// h1.rs's (private) limit on a chunk-size or trailer line.
const MAX_LINE_BYTES: usize = 4096;

/// An error, equal to any other: how the bytes arrive may change which error is found first
/// (a head both too long and malformed), not whether there is one.
#[derive(Debug)]
struct Failure(#[allow(dead_code)] H1Error);

impl PartialEq for Failure {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Failure {}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The bytes ended inside a head.
    HeadIncomplete,
    HeadError(Failure),
    Head {
        head: HeadView,
        /// Bytes the head (and any interim heads) took.
        consumed: usize,
        body: Body,
    },
}

#[derive(Debug, PartialEq, Eq)]
struct HeadView {
    status: StatusCode,
    version: Version,
    /// In the map's order.
    fields: Vec<(String, Vec<u8>)>,
    framing: Framing,
    keep_alive: bool,
}

impl From<&Head> for HeadView {
    fn from(h: &Head) -> Self {
        HeadView {
            status: h.status,
            version: h.version,
            fields: h
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            framing: h.framing,
            keep_alive: h.keep_alive,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    /// Not chunked: the bytes after the head, as they are.
    Rest(Vec<u8>),
    Chunked {
        /// The data decoded, however it was handed out.
        data: Vec<u8>,
        end: ChunkEnd,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum ChunkEnd {
    /// The bytes ended inside the body.
    NeedMore,
    Error(Failure),
    /// The last chunk and the trailers were read; `rest`: the bytes after them.
    End {
        rest: Vec<u8>,
    },
}

/// Reads `pieces` as they arrive; the outcome, and the head when one was accepted.
fn read(pieces: &[&[u8]], head_request: bool) -> (Outcome, Option<Head>) {
    let mut pieces = pieces.iter();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut more = |buf: &mut BytesMut, fed: &mut usize| match pieces.next() {
        Some(p) => {
            buf.extend_from_slice(p);
            *fed += p.len();
            true
        }
        None => false,
    };
    let head = loop {
        match parse_response(&mut buf, head_request) {
            Err(e) => return (Outcome::HeadError(Failure(e)), None),
            Ok(Some(head)) => break head,
            Ok(None) => {
                if !more(&mut buf, &mut fed) {
                    return (Outcome::HeadIncomplete, None);
                }
            }
        }
    };
    let consumed = fed - buf.len();
    let body = if head.framing == Framing::Chunked {
        let mut decoder = Chunked::default();
        let mut data = Vec::new();
        let end = loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty(), "an empty Data");
                    data.extend_from_slice(&d);
                }
                Ok(Decoded::NeedMore) => {
                    assert!(!decoder.is_done());
                    if !more(&mut buf, &mut fed) {
                        break ChunkEnd::NeedMore;
                    }
                }
                Ok(Decoded::End) => {
                    assert!(decoder.is_done());
                    while more(&mut buf, &mut fed) {}
                    break ChunkEnd::End { rest: buf.to_vec() };
                }
                Err(e) => break ChunkEnd::Error(Failure(e)),
            }
        };
        Body::Chunked { data, end }
    } else {
        while more(&mut buf, &mut fed) {}
        Body::Rest(buf.to_vec())
    };
    let outcome = Outcome::Head {
        head: HeadView::from(&head),
        consumed,
        body,
    };
    (outcome, Some(head))
}

/// The properties of an accepted head, against httparse's reading of the same bytes.
fn check_head(wire: &[u8], consumed: usize, head: &Head, head_request: bool) {
    // The heads taken: interim ones, then the final one, each whole and within the limit.
    let mut at = 0;
    let (code, version, fields) = loop {
        let mut room = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut room);
        let len = match resp.parse(&wire[at..consumed]) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!(
                "httparse: {other:?} for the head at {at} of the {consumed} bytes taken: {}",
                show(wire)
            ),
        };
        assert!(
            len <= MAX_HEAD_BYTES,
            "a {len}-byte head is accepted (limit {MAX_HEAD_BYTES}): {}",
            show(wire)
        );
        at += len;
        let code = resp.code.expect("a complete head has a status");
        if at == consumed {
            let fields: Vec<(String, Vec<u8>)> = resp
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect();
            break (code, resp.version, fields);
        }
        assert!(
            (100..200).contains(&code) && code != 101,
            "a {code} head is skipped as interim: {}",
            show(wire)
        );
    };
    assert_eq!(head.status.as_u16(), code, "status: {}", show(wire));
    assert!(
        !head.status.is_informational(),
        "final status {code}: {}",
        show(wire)
    );
    let version_ok = match version {
        Some(0) => head.version == Version::HTTP_10,
        _ => head.version == Version::HTTP_11,
    };
    assert!(
        version_ok,
        "version {version:?} → {:?}: {}",
        head.version,
        show(wire)
    );

    let has_te = named(&fields, "transfer-encoding").next().is_some();
    let has_cl = named(&fields, "content-length").next().is_some();
    let close = named(&fields, "connection").any(|v| lists(v, b"close"));

    // Hop-by-hop: the fixed set and every name the final head's Connection lists.
    let mut hop: Vec<Vec<u8>> = HOP_BY_HOP.iter().map(|n| n.as_bytes().to_vec()).collect();
    for v in named(&fields, "connection") {
        for token in v.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if !token.is_empty() {
                hop.push(token.to_ascii_lowercase());
            }
        }
    }
    for name in head.headers.keys() {
        assert!(
            !hop.iter().any(|h| h == name.as_str().as_bytes()),
            "hop-by-hop field {name} handed on: {}",
            show(wire)
        );
    }
    // Everything else is handed on (values as they came), but a length beside
    // Transfer-Encoding.
    let mut want: Vec<(String, Vec<u8>)> = fields
        .iter()
        .filter(|(n, _)| !hop.iter().any(|h| h == n.as_bytes()))
        .filter(|(n, _)| !(has_te && n == "content-length"))
        .cloned()
        .collect();
    let mut got: Vec<(String, Vec<u8>)> = head
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "end-to-end fields: {}", show(wire));

    if has_te {
        assert!(
            !head.headers.contains_key(header::CONTENT_LENGTH),
            "Content-Length beside Transfer-Encoding handed on: {}",
            show(wire)
        );
        assert_eq!(
            head.version,
            Version::HTTP_11,
            "1.0 with Transfer-Encoding: {}",
            show(wire)
        );
        for v in named(&fields, "transfer-encoding") {
            assert!(
                v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)),
                "a Transfer-Encoding value that is not visible ASCII is accepted: {}",
                show(wire)
            );
        }
    }
    let no_body = head_request
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    match head.framing {
        Framing::Empty => assert!(no_body, "Empty framing for a {code}: {}", show(wire)),
        _ if no_body => panic!(
            "{:?} framing for a bodiless response: {}",
            head.framing,
            show(wire)
        ),
        Framing::Length(_) => assert!(
            has_cl && !has_te,
            "Length framing without a lone Content-Length: {}",
            show(wire)
        ),
        Framing::Chunked => assert!(
            has_te,
            "Chunked framing without Transfer-Encoding: {}",
            show(wire)
        ),
        Framing::Close => assert!(
            !has_cl || has_te,
            "Close framing beside a Content-Length: {}",
            show(wire)
        ),
    }
    if head.framing == Framing::Close || close {
        assert!(!head.keep_alive, "kept alive: {}", show(wire));
    }
}

fuzz_target!(|data: &[u8]| {
    let (ctl, wire) = control::<9>(data);
    let head_request = ctl[0] & 1 == 1;
    let inflated;
    let wire = if ctl[0] >> 4 == INFLATE {
        let base = if ctl[0] & 4 == 4 {
            MAX_HEAD_BYTES
        } else {
            MAX_LINE_BYTES
        };
        inflated = inflate(wire, u16_at(&ctl, 5), u16_at(&ctl, 7), base);
        &inflated[..]
    } else {
        wire
    };

    let (whole, head) = read(&[wire], head_request);
    if let (Outcome::Head { consumed, .. }, Some(head)) = (&whole, &head) {
        check_head(wire, *consumed, head, head_request);
    }

    let mut cuts = [
        point(u16_at(&ctl, 1), wire.len()),
        point(u16_at(&ctl, 3), wire.len()),
    ];
    let (two, _) = read(&[&wire[..cuts[0]], &wire[cuts[0]..]], head_request);
    assert_eq!(
        two,
        whole,
        "in two pieces, cut at {}: {}",
        cuts[0],
        show(wire)
    );
    cuts.sort_unstable();
    let [a, b] = cuts;
    let (three, _) = read(&[&wire[..a], &wire[a..b], &wire[b..]], head_request);
    assert_eq!(
        three,
        whole,
        "in three pieces, cut at {a} and {b}: {}",
        show(wire)
    );
});
