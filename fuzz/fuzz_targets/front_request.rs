//! `apitree::proxy::transport::front::parse_request`: the client-facing fast path's request heads.
//!
//! Input: `[flags][split: u16 LE][pos: u16 LE][delta: u16 LE]` then the bytes a client sent.
//! `flags >> 4 == 0xA`: inflate the wire (repeat the byte at `pos`) so the head straddles
//! `front::MAX_HEAD_BYTES` (rare: 64 KiB inputs are slow). `split`: where the bytes are cut
//! into two reads.
//!
//! Properties:
//! - `Partial` and `NotPlain` leave the buffer exactly as it was; `Partial` only while httparse
//!   says the head is incomplete and the buffer is within the limit.
//! - `Plain` takes exactly one head off the buffer, no more, no less: httparse parses those
//!   bytes completely, to the same method, target and fields (count and values); the head is
//!   within the limit, HTTP/1.1, not CONNECT, has no `Transfer-Encoding`, `Expect` or
//!   `Upgrade`, at most one `Content-Length` and that one exactly `0`; `close` is what
//!   `Connection` says.
//! - The same bytes in two reads: a verdict reached on the first read (`Plain`, `NotPlain`)
//!   is the verdict on the whole, and after `Partial` the second read gives the whole's verdict.

#![no_main]

mod common;

use apitree::proxy::transport::front::{parse_request, Parsed, MAX_HEAD_BYTES};
use apitree::proxy::transport::h1::MAX_HEADERS;
use bytes::BytesMut;
use common::{control, inflate, lists, named, point, show, u16_at, INFLATE};
use http::{Method, Version};
use libfuzzer_sys::fuzz_target;

/// What `parse_request` decided, in a form that can be compared.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Partial,
    NotPlain,
    Plain {
        /// Bytes taken off the buffer.
        consumed: usize,
        method: String,
        target: String,
        version: Version,
        /// In the map's order.
        fields: Vec<(String, Vec<u8>)>,
        close: bool,
    },
}

/// Parses `buf` once; the verdict and what is left in the buffer.
fn parse(mut buf: BytesMut) -> (Verdict, BytesMut) {
    let before = buf.len();
    let verdict = match parse_request(&mut buf) {
        Parsed::Partial => Verdict::Partial,
        Parsed::NotPlain => Verdict::NotPlain,
        Parsed::Plain { req, close } => Verdict::Plain {
            consumed: before - buf.len(),
            method: req.method().as_str().to_owned(),
            target: req.uri().to_string(),
            version: req.version(),
            fields: req
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            close,
        },
    };
    (verdict, buf)
}

fn check_whole(wire: &[u8], verdict: &Verdict, left: &[u8]) {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let reference = req.parse(wire);
    match verdict {
        Verdict::Partial => {
            assert_eq!(left, wire, "Partial changed the buffer: {}", show(wire));
            assert!(
                matches!(reference, Ok(httparse::Status::Partial)) && wire.len() <= MAX_HEAD_BYTES,
                "Partial, but httparse says {reference:?} ({} bytes): {}",
                wire.len(),
                show(wire)
            );
        }
        Verdict::NotPlain => {
            assert_eq!(left, wire, "NotPlain changed the buffer: {}", show(wire));
        }
        Verdict::Plain {
            consumed,
            method,
            target,
            version,
            fields: got,
            close,
        } => {
            let consumed = *consumed;
            assert_eq!(
                left,
                &wire[consumed..],
                "what follows the head changed: {}",
                show(wire)
            );
            assert!(
                consumed <= MAX_HEAD_BYTES,
                "a {consumed}-byte head is plain"
            );
            // The head alone: httparse takes all of it, the same as from the whole buffer.
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut head = httparse::Request::new(&mut fields);
            let status = head.parse(&wire[..consumed]);
            assert_eq!(
                status,
                Ok(httparse::Status::Complete(consumed)),
                "the {consumed} bytes taken are not one whole head: {}",
                show(wire)
            );
            assert_eq!(head.version, Some(1), "not HTTP/1.1: {}", show(wire));
            assert_eq!(*version, Version::HTTP_11);
            assert_eq!(head.method, Some(method.as_str()), "method: {}", show(wire));
            assert_ne!(
                method,
                Method::CONNECT.as_str(),
                "CONNECT is plain: {}",
                show(wire)
            );
            // `http` drops a fragment (`#…`), as it does for hyper.
            let path = head.path.expect("a complete head has a target");
            let path = path.split('#').next().unwrap_or(path);
            assert_eq!(target, path, "target: {}", show(wire));
            // The same fields, compared as multisets (the map groups them by name).
            let mut want: Vec<(String, Vec<u8>)> = head
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect();
            let mut got = got.clone();
            want.sort();
            got.sort();
            assert_eq!(got, want, "fields: {}", show(wire));
            for hop in ["transfer-encoding", "expect", "upgrade"] {
                assert_eq!(
                    named(&want, hop).count(),
                    0,
                    "{hop} in a plain request: {}",
                    show(wire)
                );
            }
            let lengths: Vec<_> = named(&want, "content-length").collect();
            assert!(
                lengths.len() <= 1,
                "{} Content-Length fields in a plain request: {}",
                lengths.len(),
                show(wire)
            );
            for v in lengths {
                assert_eq!(v, b"0", "Content-Length in a plain request: {}", show(wire));
            }
            let asked = named(&want, "connection").any(|v| lists(v, b"close"));
            assert_eq!(*close, asked, "close: {}", show(wire));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (ctl, wire) = control::<7>(data);
    let inflated;
    let wire = if ctl[0] >> 4 == INFLATE {
        inflated = inflate(wire, u16_at(&ctl, 3), u16_at(&ctl, 5), MAX_HEAD_BYTES);
        &inflated[..]
    } else {
        wire
    };

    let (whole, left) = parse(BytesMut::from(wire));
    check_whole(wire, &whole, &left);

    // Two reads: the first `split` bytes, then the rest appended to what is left.
    let split = point(u16_at(&ctl, 1), wire.len());
    let (first, mut buf) = parse(BytesMut::from(&wire[..split]));
    match &first {
        Verdict::Partial => {
            buf.extend_from_slice(&wire[split..]);
            let (second, left2) = parse(buf);
            assert_eq!(second, whole, "split at {split}: {}", show(wire));
            assert_eq!(left2, left, "split at {split}: {}", show(wire));
        }
        Verdict::NotPlain => {
            assert_eq!(
                whole,
                Verdict::NotPlain,
                "NotPlain on the first {split} bytes: {}",
                show(wire)
            );
        }
        Verdict::Plain { .. } => {
            assert_eq!(
                first,
                whole,
                "Plain on the first {split} bytes: {}",
                show(wire)
            );
            buf.extend_from_slice(&wire[split..]);
            assert_eq!(buf, left, "split at {split}: {}", show(wire));
        }
    }
});
