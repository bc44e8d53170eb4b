//! Property tests for the parsers that face untrusted input: API keys, proxy configs, the PII
//! scanner and upstream HTTP/1 responses. Case counts are set here so the closing note can
//! report executions.

use apitree::crd::gateway::KeyScope;
use apitree::entities::keys::ApiKey;
use apitree::proxy::transport::h1::{self, Chunked, Decoded, Framing};
use apitree::proxy::{config::ProxyConfig, pii};
use bytes::BytesMut;
use proptest::prelude::*;

/// Bytes that make PII scanning interesting: digits, separators, context words, letters.
fn pii_soup() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop::sample::select(vec![
        "0",
        "1",
        "2",
        "5",
        "8",
        "9",
        "01",
        "010",
        "02",
        "82",
        "+82",
        "-",
        "-",
        ".",
        " ",
        "_",
        "a",
        "\n",
        "\"",
        "계좌 ",
        "주민 ",
        "RRN ",
        "900101-1234568",
        "010-1234-5678",
        "110-123-456789",
    ]);
    prop::collection::vec(pieces, 0..60).prop_map(|v| v.concat().into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn key_parsing_never_panics(text in "\\PC{0,60}") {
        let _ = ApiKey::parse(&text);
    }

    #[test]
    fn any_single_character_change_to_a_key_is_refused(pos in 8usize..44, replacement in "[0-9A-Za-z]") {
        let key = ApiKey::generate(KeyScope::Live);
        let mut bytes = key.expose_secret().as_bytes().to_vec();
        let r = replacement.as_bytes()[0];
        prop_assume!(bytes[pos] != r);
        bytes[pos] = r;
        prop_assert!(ApiKey::parse(std::str::from_utf8(&bytes).unwrap()).is_err());
    }

    #[test]
    fn masking_keeps_length_and_every_non_digit_byte(text in pii_soup()) {
        let findings = pii::scan(&text);
        let mut masked = text.clone();
        pii::apply_mask(&mut masked, &findings);
        prop_assert_eq!(masked.len(), text.len());
        for (a, b) in text.iter().zip(&masked) {
            prop_assert!(a == b || (a.is_ascii_digit() && *b == b'*'));
        }
        // Masked output holds nothing the scanner would still report.
        prop_assert_eq!(pii::scan(&masked), vec![]);
    }

    #[test]
    fn streaming_masking_equals_whole_body_masking(text in pii_soup(), chunk in 1usize..40) {
        let mut whole = text.clone();
        let findings = pii::scan(&text);
        pii::apply_mask(&mut whole, &findings);
        let mut m = pii::StreamMasker::new();
        let mut out = Vec::new();
        for c in text.chunks(chunk) {
            out.extend(m.push(c));
        }
        out.extend(m.finish());
        prop_assert_eq!(out, whole);
        prop_assert_eq!(m.counts.total(), findings.len() as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn config_parsing_and_validation_never_panic(text in "(listen|admin|routes|keys|tiers|orgs|- |name|: |\\{|\\}|\\[|\\]|,|\\n|  |[a-z0-9/:.]{1,8}){0,40}") {
        if let Ok(cfg) = serde_saphyr::from_str::<ProxyConfig>(&text) {
            let _ = cfg.problems(None);
        }
    }
}

/// Bytes that make an upstream's HTTP/1 response interesting: mostly a status line, then whole
/// and broken header lines, framing headers, chunk sizes and line ends in every form.
fn response_soup() -> impl Strategy<Value = Vec<u8>> {
    let status = prop::sample::select(vec![
        "HTTP/1.1 200 OK\r\n",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
        "HTTP/1.0 204 No Content\r\n",
        "HTTP/1.1 101 Switching Protocols\r\n",
        "HTTP/1.1 999 X\r\n",
        "",
    ]);
    let pieces = prop::sample::select(vec![
        "\r\n",
        "\r\n",
        "\n",
        "Content-Length: 5\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: ",
        "Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip, ",
        "Connection: close\r\n",
        "X-A: b\r\n",
        "0",
        "5",
        "ff",
        "99999999999999999999",
        ";ext",
        ",",
        " ",
        ":",
        "hello",
        "\0",
        "é",
    ]);
    (status, prop::collection::vec(pieces, 0..40))
        .prop_map(|(status, v)| [status.to_string(), v.concat()].concat().into_bytes())
}

/// Feeds `wire` to a chunked decoder `step` bytes at a time: the body, and whether it ended.
fn decode_chunked(wire: &[u8], step: usize, buf: &mut BytesMut) -> (Vec<u8>, bool) {
    let mut decoder = Chunked::default();
    let mut body = Vec::new();
    let mut fed = 0;
    loop {
        match decoder.decode(buf) {
            Ok(Decoded::Data(d)) => body.extend_from_slice(&d),
            Ok(Decoded::End) => return (body, true),
            Err(_) => return (body, false),
            Ok(Decoded::NeedMore) => {
                if fed == wire.len() {
                    return (body, false);
                }
                let end = (fed + step).min(wire.len());
                buf.extend_from_slice(&wire[fed..end]);
                fed = end;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn upstream_response_parsing_never_panics_however_the_bytes_arrive(
        wire in response_soup(),
        step in 1usize..64,
    ) {
        let mut buf = BytesMut::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            match h1::parse_response(&mut buf, false) {
                // Read more (interim 1xx heads already read are gone; the final one waits).
                Ok(None) => {}
                Ok(Some(head)) => {
                    prop_assert!(head.status.as_u16() >= 200);
                    if head.framing == Framing::Chunked {
                        let rest = buf.split().freeze();
                        let _ = decode_chunked(&rest, step, &mut BytesMut::new());
                    }
                    break;
                }
                Err(_) => break,
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_to_what_was_sent_however_they_are_split(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8),
        step in 1usize..97,
        trailer in any::<bool>(),
    ) {
        let mut wire = Vec::new();
        for c in &chunks {
            wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n");
        if trailer {
            wire.extend_from_slice(b"X-Checksum: 1\r\n");
        }
        wire.extend_from_slice(b"\r\nNEXT");
        let mut buf = BytesMut::new();
        let (body, ended) = decode_chunked(&wire, step, &mut buf);
        prop_assert!(ended);
        prop_assert_eq!(body, chunks.concat());
        // What follows the body is left for the next reader, never eaten.
        prop_assert!(b"NEXT".starts_with(&buf[..]));
    }
}

/// Request fields as a client might send them: the policy's own names, hop-by-hop ones,
/// `Connection` lists naming others, repeats.
fn request_fields() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    let names = prop::sample::select(vec![
        "host",
        "authorization",
        "x-api-key",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "accept-encoding",
        "x-vendor-key",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "content-length",
        "x-trace",
        "x-custom",
    ]);
    let values = prop::sample::select(vec![
        "1",
        "keep-alive",
        "close",
        "x-trace",
        "close, X-Trace",
        "x-custom , te",
        "gzip",
        "10.0.0.1",
    ]);
    prop::collection::vec((names, values), 0..12)
}

/// A request head's fields: each name (lowercase) with its values in the order written.
fn fields_of(head: &[u8]) -> std::collections::BTreeMap<String, Vec<String>> {
    let text = std::str::from_utf8(head).unwrap();
    let mut fields = std::collections::BTreeMap::<String, Vec<String>>::new();
    for line in text.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(": ").unwrap();
        fields
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(value.to_string());
    }
    fields
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// The fast path writes the forwarding policy into the head; hyper's path applies it to the
    /// header map. The upstream must get the same fields either way.
    #[test]
    fn the_forwarding_policy_writes_what_it_applies(
        fields in request_fields(),
        forwarded_for in any::<bool>(),
        identity_encoding in any::<bool>(),
        credential in prop::option::of(prop::sample::select(vec![
            "authorization", "x-vendor-key", "host", "x-request-id", "x-forwarded-for", "accept-encoding",
            "x-forwarded-proto",
        ])),
        post in any::<bool>(),
    ) {
        use apitree::proxy::{forward::Forwarding, state::Injected};
        use http::{HeaderMap, HeaderName, HeaderValue, Method};
        let mut map = HeaderMap::new();
        for (name, value) in &fields {
            map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        let host = HeaderValue::from_static("upstream:8080");
        let request_id = HeaderValue::from_static("rid-1");
        let injected = credential.map(|name| Injected {
            header: HeaderName::from_static(name),
            value: HeaderValue::from_static("Bearer upstream-secret"),
        });
        let policy = Forwarding {
            host: &host,
            request_id: &request_id,
            forwarded_for: forwarded_for.then(|| HeaderValue::from_static("127.0.0.1")),
            proto: &apitree::proxy::forward::PROTO_HTTPS,
            identity_encoding,
            credential: injected.as_ref(),
        };
        let method = if post { Method::POST } else { Method::GET };
        let mut written = Vec::new();
        policy.encode(&method, "/v1/x", &map, &mut written);
        let mut applied = map.clone();
        policy.apply(&mut applied);
        let mut expected = Vec::new();
        h1::encode_request(&method, "/v1/x", &applied, &mut expected);
        let got = fields_of(&written);
        prop_assert_eq!(&got, &fields_of(&expected));
        for never in ["connection", "keep-alive", "te", "upgrade", "proxy-authorization", "x-api-key"] {
            prop_assert!(!got.contains_key(never), "{} forwarded", never);
        }
        prop_assert_eq!(&got["host"], &vec![if credential == Some("host") { "Bearer upstream-secret" } else { "upstream:8080" }.to_string()]);
        // Whatever the client claimed, the upstream hears how it really came in.
        if credential != Some("x-forwarded-proto") {
            prop_assert_eq!(&got["x-forwarded-proto"], &vec!["https".to_string()]);
        }
    }
}
