//! `apitree::proxy::inbound::normalize`: the one meaning of a request path.
//!
//! Input: any bytes; those that are not UTF-8 are skipped (the gateway hands it `&str`s).
//!
//! Properties, for a path (starting with `/`):
//! - A backslash or a control character, raw or percent-encoded (`%5C`, `%00`, any case), is
//!   refused.
//! - An accepted path's normal form starts with `/`, has no `//`, no `.` or `..` segment, no
//!   dot spelled `%2e`/`%2E` anywhere (unreserved characters are decoded), no dot segment
//!   behind parameters or an encoded slash (`..;x`, `x%2F..`, `..%3B`), and only upper-case
//!   escapes of bytes that are neither unreserved nor controls nor `\`; `encoded_slash` says
//!   whether the target as sent held `%2F` (any case), which a `..` may have removed since.
//! - The normal form is normal: normalising it again gives it back unchanged.
//!
//! Anything else (`*`, the empty path of an authority-form target) is not a path and is
//! returned as it is (the documented behaviour: no route matches it).

#![no_main]

use std::borrow::Cow;

use apitree::proxy::inbound::normalize;
use libfuzzer_sys::fuzz_target;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn check(input: &str) {
    let result = normalize(input);
    if !input.starts_with('/') {
        let t = result.unwrap_or_else(|e| panic!("{input:?} (not a path): {e:?}"));
        assert!(
            matches!(t.path, Cow::Borrowed(p) if p == input),
            "{input:?} → {:?}",
            t.path
        );
        assert!(!t.encoded_slash);
        return;
    }
    let refused = |b: u8| b < 0x20 || b == 0x7F || b == b'\\';
    let raw = input.as_bytes();
    // Every `%` of an accepted path starts an escape (hex digits are never `%`).
    let escaped = raw
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'%')
        .any(|(i, _)| {
            let digit = |j: usize| raw.get(j).and_then(|b| hex(b.to_ascii_uppercase()));
            matches!((digit(i + 1), digit(i + 2)), (Some(hi), Some(lo)) if refused(hi << 4 | lo))
        });
    let must_refuse = escaped || raw.iter().any(|&b| refused(b));
    let t = match result {
        Err(_) => return,
        Ok(t) => t,
    };
    assert!(!must_refuse, "{input:?} is accepted as {:?}", t.path);
    let out: &str = &t.path;
    assert!(out.starts_with('/'), "{input:?} → {out:?}");
    assert!(!out.contains("//"), "{input:?} → {out:?}");
    let bytes = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        let (hi, lo) = (bytes.get(i + 1).copied(), bytes.get(i + 2).copied());
        let (Some(hi), Some(lo)) = (hi.and_then(hex), lo.and_then(hex)) else {
            panic!("{input:?} → {out:?}: an escape that is not two upper-case hex digits");
        };
        let b = hi << 4 | lo;
        assert!(
            !is_unreserved(b) && b >= 0x20 && b != 0x7F && b != b'\\',
            "{input:?} → {out:?}: %{:02X} is left encoded",
            b
        );
    }
    // The flag is about the target as sent (server.rs refuses it unless the route allows
    // encoded slashes), so a `%2F` that a later `..` removed still counts.
    let sent_encoded_slash = input.to_ascii_lowercase().contains("%2f");
    assert_eq!(t.encoded_slash, sent_encoded_slash, "{input:?} → {out:?}");
    assert!(
        !out.contains("%2F") || t.encoded_slash,
        "{input:?} → {out:?}"
    );
    for segment in out.split('/').skip(1) {
        // A dot however it is spelled, also where a reader that splits at parameters or at an
        // encoded slash would see one (`..;x`, `x%2F..`, `..%3B`).
        let dots = segment
            .to_ascii_lowercase()
            .replace("%2e", ".")
            .replace("%2f", "/")
            .replace("%3b", ";");
        assert!(
            !dots
                .split(['/', ';'])
                .any(|piece| piece == "." || piece == ".."),
            "{input:?} → {out:?}: dot segment {segment:?}"
        );
    }
    assert!(
        !out.to_ascii_lowercase().contains("%2e"),
        "{input:?} → {out:?}: an encoded dot"
    );
    let again = normalize(out).unwrap_or_else(|e| panic!("{input:?} → {out:?} → {e:?}"));
    assert_eq!(again.path, out, "{input:?} → {out:?} is not a fixed point");
    assert_eq!(
        again.encoded_slash,
        out.contains("%2F"),
        "{input:?} → {out:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = std::str::from_utf8(data) {
        check(input);
    }
});
