//! What a client's request must be before a route is chosen for it: one valid `Host`, a method
//! the gateway forwards, and a request target with one meaning.
//!
//! The target rule (written down in docs/proxy.md, "Request targets"): routes are matched on,
//! and upstreams receive, the *normalised* path —
//! - percent-encoded unreserved characters are decoded (`%2E` is a dot, `%7E` a tilde) and the
//!   remaining percent-encodings are written with upper-case hex (RFC 3986 §6.2.2);
//! - runs of slashes are merged (nginx's `merge_slashes`, Envoy's `merge_slashes`);
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4); `..` never climbs above the root.
//!
//! A target whose meaning depends on who reads it is refused (400): an invalid
//! percent-encoding, a backslash, NUL or another control character (raw or encoded), a dot
//! segment with parameters (`..;x`, which some servers read as `..`), and an encoded `/`
//! (`%2F`) unless the route allows encoded slashes (then it stays encoded, inside its segment).
//! After normalisation no path can leave a route's prefix, so the rest appended to the route's
//! upstream base path stays under it.

use std::borrow::Cow;

use http::{header::HOST, HeaderMap, Method, Version};

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "the request path has an invalid percent-encoding (a % must be followed by two hex digits)"
    )]
    BadPercent,
    #[error("the request path contains a backslash, which servers read differently; use /")]
    Backslash,
    #[error("the request path contains a control character (raw or percent-encoded)")]
    Control,
    #[error("the request path has a dot segment behind parameters or an encoded slash (like `..;` or `..%2F`), which servers read differently")]
    DotParameters,
    #[error("the request path contains an encoded slash (%2F), which this API does not accept")]
    EncodedSlash,
}

/// A request path in normal form, and whether it holds an encoded slash.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub path: Cow<'a, str>,
    pub encoded_slash: bool,
}

/// RFC 3986 `sub-delims`.
fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Bytes that never need a closer look: unreserved characters but `.`, the sub-delimiters,
/// `:` and `@` (RFC 3986 `pchar`), and `/`.
fn is_simple(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(b, b'-' | b'_' | b'~' | b'/' | b':' | b'@')
        || is_sub_delim(b)
}

/// Already normal: simple bytes or dots only, no `//`, and no segment made of dots.
fn is_normal(path: &[u8]) -> bool {
    let mut prev = 0;
    let mut segment_dots_only = false;
    for &b in path {
        match b {
            b'.' => {
                if prev == b'/' {
                    segment_dots_only = true;
                }
            }
            b'/' => {
                if prev == b'/' || segment_dots_only {
                    return false;
                }
            }
            // Parameters (`.;x`, `x;..`) can hide a dot segment: the slow path looks.
            b';' => return false,
            b if is_simple(b) => segment_dots_only = false,
            _ => return false,
        }
        prev = b;
    }
    !segment_dots_only
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path of a request target in normal form (see the module docs). A target that is not a
/// path (`*`) is returned as it is: no route matches it.
pub fn normalize(path: &str) -> Result<Target<'_>, TargetError> {
    let bytes = path.as_bytes();
    if !bytes.starts_with(b"/") || is_normal(bytes) {
        return Ok(Target {
            path: Cow::Borrowed(path),
            encoded_slash: false,
        });
    }
    // Pass 1: one spelling per byte.
    let mut decoded = String::with_capacity(path.len());
    let mut encoded_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(TargetError::BadPercent);
                };
                let v = hi << 4 | lo;
                match v {
                    b'\\' => return Err(TargetError::Backslash),
                    0..=0x1F | 0x7F => return Err(TargetError::Control),
                    b'/' => {
                        encoded_slash = true;
                        decoded.push_str("%2F");
                    }
                    v if is_unreserved(v) => decoded.push(v as char),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.push('%');
                        decoded.push(HEX[usize::from(v >> 4)] as char);
                        decoded.push(HEX[usize::from(v & 0xF)] as char);
                    }
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(TargetError::Backslash),
            0..=0x1F | 0x7F => return Err(TargetError::Control),
            _ => {}
        }
        // Multi-byte UTF-8 is copied whole (the input is a str).
        let len = utf8_len(b);
        decoded.push_str(&path[i..i + len]);
        i += len;
    }
    // Pass 2: merge slashes, remove dot segments.
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        // A dot segment hidden behind parameters (`..;x`, `..%3B`) or an encoded slash
        // (`..%2F..`, on routes that allow those): servers that split there see `..`.
        if segment != "." && segment != ".." {
            let hidden = segment
                .replace("%2F", "/")
                .replace("%3B", ";")
                .split(['/', ';'])
                .any(|piece| piece == "." || piece == "..");
            if hidden {
                return Err(TargetError::DotParameters);
            }
        }
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Ok(Target {
        path: Cow::Owned(out),
        encoded_slash,
    })
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Methods no route forwards: TRACE would echo the injected upstream credential back to the
/// caller, CONNECT would make the gateway a tunnel.
pub fn is_forbidden_method(method: &Method) -> bool {
    // In any case (`trace` is an extension method to `http`, TRACE to some servers), and
    // TRACK, IIS's TRACE.
    ["TRACE", "TRACK", "CONNECT"]
        .iter()
        .any(|m| method.as_str().eq_ignore_ascii_case(m))
}

/// Why a request's `Host` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("an HTTP/1.1 request needs exactly one Host header; this one has none")]
    Missing,
    #[error("a request may carry only one Host header")]
    Repeated,
    #[error("the Host header is not a valid host[:port]")]
    Invalid,
}

/// HTTP/1.1 requests carry exactly one valid `Host` (RFC 9112 §3.2); HTTP/1.0 at most one.
pub fn check_host(version: Version, headers: &HeaderMap) -> Result<(), HostError> {
    let mut values = headers.get_all(HOST).iter();
    let Some(host) = values.next() else {
        return if version == Version::HTTP_11 {
            Err(HostError::Missing)
        } else {
            Ok(())
        };
    };
    if values.next().is_some() {
        return Err(HostError::Repeated);
    }
    if is_host_and_port(host.as_bytes()) {
        Ok(())
    } else {
        Err(HostError::Invalid)
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): an IP-literal in brackets, or a reg-name / IPv4
/// address (unreserved, sub-delims, percent-encodings; never `@`, so no userinfo), then an
/// optional port of digits. One pass over the bytes: parsing it as a URI authority cost about a
/// thousand instructions per request (callgrind).
fn is_host_and_port(v: &[u8]) -> bool {
    let (host_ok, rest) = match v.first() {
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 1
                    && v[1..end]
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                &v[end + 1..],
            ),
            None => (false, &v[..0]),
        },
        _ => {
            let split = v.iter().position(|&b| b == b':').unwrap_or(v.len());
            let name = &v[..split];
            let ok = !name.is_empty()
                && name.iter().all(|&b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%')
                        || is_sub_delim(b)
                });
            (ok, &v[split..])
        }
    };
    host_ok
        && match rest {
            [] => true,
            [b':', port @ ..] => {
                (1..=5).contains(&port.len())
                    && port.iter().all(u8::is_ascii_digit)
                    && port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= 65535
            }
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, TargetError> {
        normalize(p).map(|t| t.path.into_owned())
    }

    #[test]
    fn dot_segments_are_removed_however_they_are_spelled() {
        let cases = [
            ("/pub/../private/x", "/private/x"),
            ("/pub/%2e%2e/private/x", "/private/x"),
            ("/pub/%2E%2E/private/x", "/private/x"),
            ("/pub/.%2e/private/x", "/private/x"),
            ("/pub/%2e./private/x", "/private/x"),
            ("/pub/./x", "/pub/x"),
            ("/pub/%2e/x", "/pub/x"),
            ("/pub//../private", "/private"),
            ("/pub/x/..", "/pub/"),
            ("/pub/x/.", "/pub/x/"),
            ("/../../etc", "/etc"),
            ("/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/", "/a/b/"),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_uppercased() {
        assert_eq!(norm("/p%72iv/x").as_deref(), Ok("/priv/x"));
        assert_eq!(norm("/a%7eb").as_deref(), Ok("/a~b"));
        assert_eq!(norm("/a%20b%3f").as_deref(), Ok("/a%20b%3F"));
        assert_eq!(norm("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
    }

    #[test]
    fn ambiguous_targets_are_refused() {
        let cases = [
            ("/a%", TargetError::BadPercent),
            ("/a%2", TargetError::BadPercent),
            ("/a%zz", TargetError::BadPercent),
            ("/a\\..\\b", TargetError::Backslash),
            ("/a%5c..%5Cb", TargetError::Backslash),
            ("/a%00b", TargetError::Control),
            ("/a%0d%0aX: y", TargetError::Control),
            ("/a%7f", TargetError::Control),
            ("/pub/..;/private", TargetError::DotParameters),
            ("/pub/.;x/private", TargetError::DotParameters),
            ("/pub/%2e%2e;/private", TargetError::DotParameters),
            ("/pub/%2e%2e%3b/priv", TargetError::DotParameters),
            ("/enc/..%2f..%2fprivate/x", TargetError::DotParameters),
            ("/enc/a%2F.%2Fb", TargetError::DotParameters),
            // Found by the fuzzer: the fast path let these through.
            ("/;.", TargetError::DotParameters),
            ("/pub;../private", TargetError::DotParameters),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw), Err(want), "{raw}");
        }
        assert!(is_forbidden_method(&Method::from_bytes(b"trace").unwrap()));
        assert!(is_forbidden_method(&Method::from_bytes(b"TRACK").unwrap()));
        assert!(is_forbidden_method(&Method::CONNECT));
        assert!(!is_forbidden_method(
            &Method::from_bytes(b"PROPFIND").unwrap()
        ));
        let t = normalize("/a%2fb").unwrap();
        assert!(t.encoded_slash);
        assert_eq!(t.path, "/a%2Fb");
        assert!(!normalize("/a/b").unwrap().encoded_slash);
    }

    #[test]
    fn normal_paths_are_borrowed_and_dots_inside_names_kept() {
        // (Parameters take the slow path, with the same result.)
        assert_eq!(norm("/a;b=c/d").as_deref(), Ok("/a;b=c/d"));
        for p in ["/", "/api/v1/x", "/a.b/c..d/.e/f.", "/~u/x:y@z"] {
            let t = normalize(p).unwrap();
            assert_eq!(t.path, p);
            assert!(matches!(t.path, Cow::Borrowed(_)), "{p} not copied");
        }
        // Not a path: left for the router, which matches no route.
        assert_eq!(norm("*").as_deref(), Ok("*"));
    }

    /// Every path made of a small alphabet: the normal form is a fixed point, has no dot
    /// segments or empty segments, and never climbs out of a prefix it did not start under
    /// unless a `..` said so.
    #[test]
    fn normal_forms_are_fixed_points_over_a_small_alphabet() {
        let alphabet = ["/", ".", "a", "%2e", "%2E", "%2f", "%41", ";", "b"];
        let mut count = 0;
        let mut path = String::new();
        fn walk(depth: usize, path: &mut String, alphabet: &[&str], count: &mut usize) {
            if depth == 0 {
                return;
            }
            for part in alphabet {
                let len = path.len();
                path.push_str(part);
                *count += 1;
                if let Ok(t) = normalize(path) {
                    let again = normalize(&t.path).expect("a normal form is valid");
                    assert_eq!(again.path, t.path, "{path} is not stable");
                    assert!(
                        !t.path.contains("//") && !t.path.split('/').any(|s| s == "." || s == ".."),
                        "{path} → {}",
                        t.path
                    );
                    assert!(t.path.starts_with('/'));
                }
                walk(depth - 1, path, alphabet, count);
                path.truncate(len);
            }
        }
        path.push('/');
        walk(6, &mut path, &alphabet, &mut count);
        assert!(count > 500_000, "{count} paths");
    }

    #[test]
    fn host_rules_follow_rfc_9112() {
        let h = |values: &[&str]| {
            let mut m = HeaderMap::new();
            for v in values {
                m.append(HOST, v.parse().unwrap());
            }
            m
        };
        let v11 = Version::HTTP_11;
        assert_eq!(check_host(v11, &h(&["api.example"])), Ok(()));
        assert_eq!(check_host(v11, &h(&["api.example:8443"])), Ok(()));
        assert_eq!(check_host(v11, &h(&["[::1]:80"])), Ok(()));
        assert_eq!(check_host(v11, &h(&[])), Err(HostError::Missing));
        assert_eq!(check_host(v11, &h(&["a", "b"])), Err(HostError::Repeated));
        assert_eq!(check_host(v11, &h(&["a", "a"])), Err(HostError::Repeated));
        for good in ["a", "10.0.0.1:65535", "[2001:db8::1]", "x-y.example_z~:1"] {
            assert_eq!(check_host(v11, &h(&[good])), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "user@host",
            "a b",
            "host:port",
            "a/b",
            ":80",
            "a:",
            "a:65536",
            "a:123456",
            "[::1",
            "[]",
            "[::1]x",
            "a:1:2",
            "a\\b",
        ] {
            assert_eq!(
                check_host(v11, &h(&[bad])),
                Err(HostError::Invalid),
                "{bad:?}"
            );
        }
        assert_eq!(check_host(Version::HTTP_10, &h(&[])), Ok(()));
        assert_eq!(
            check_host(Version::HTTP_10, &h(&["a", "b"])),
            Err(HostError::Repeated)
        );
    }
}
