//! What the HTTP targets share: control bytes at the front of each input, split points, and
//! "inflation", which lets short inputs reach the parsers' size limits.
//!
//! An input is `[control bytes][wire bytes]`; the targets' docs give their control layouts.
//! Control bytes missing from a short input read as 0.

#![allow(dead_code)] // Not every target uses every helper.

/// The high nibble of a target's flags byte that turns inflation on: one input in 16 at
/// random, as inflated ones are up to 64 KiB long and much slower.
pub const INFLATE: u8 = 0xA;

/// Splits `N` control bytes off the front of `data` (zero-padded when `data` is shorter).
pub fn control<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut ctl = [0u8; N];
    let n = data.len().min(N);
    ctl[..n].copy_from_slice(&data[..n]);
    (ctl, &data[n..])
}

/// The little-endian u16 at `ctl[i..i + 2]`.
pub fn u16_at(ctl: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([ctl[i], ctl[i + 1]])
}

/// A point in `0..=len` chosen by `sel`: every point is reachable while `len` < 65536, and
/// the whole range (at coarser steps) beyond.
pub fn point(sel: u16, len: usize) -> usize {
    ((usize::from(sel) * (len + 1)) >> 16).min(len)
}

/// Grows `wire` by repeating the byte at the point `pos` selects `base - 256 + (delta % 512)`
/// more times, so that a field value, a target or a chunk-size line can straddle a limit of
/// `base` bytes (the fuzzer steers `delta` onto the exact boundary). An empty `wire` is
/// returned as it is.
pub fn inflate(wire: &[u8], pos: u16, delta: u16, base: usize) -> Vec<u8> {
    if wire.is_empty() {
        return wire.to_vec();
    }
    let at = point(pos, wire.len() - 1);
    let extra = base - 256 + usize::from(delta % 512);
    let mut out = Vec::with_capacity(wire.len() + extra);
    out.extend_from_slice(&wire[..at]);
    out.resize(at + extra, wire[at]);
    out.extend_from_slice(&wire[at..]);
    out
}

/// Whether a comma-separated field value lists `token` (any case, surrounding whitespace
/// ignored): how both parsers read `Connection`.
pub fn lists(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Bytes for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 400;
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{shown:?}… ({} bytes)", bytes.len())
    } else {
        format!("{shown:?}")
    }
}

/// The fields called `name` (lower case) among `(lower-case name, value)` pairs.
pub fn named<'a>(
    fields: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}
