//! Korean PII detection and masking: resident registration numbers (RRN), phone numbers and
//! bank account numbers.
//!
//! The scanner works on bytes (UTF-8 text passes through untouched) and replaces only ASCII
//! digits with `*`, so masking never changes the length of a body and can stream with a small
//! bounded buffer ([`StreamMasker`]).
//!
//! Boundaries matter: a match must not be a slice of a longer number or an identifier, so a
//! candidate must not touch a letter, digit or `_`, nor continue a number through `-` or `.`.
//!
//! - RRN: `YYMMDD-GXXXXXX` or 13 digits; valid date and gender digit. The check digit (weights
//!   2..9,2..5; `(11 - sum mod 11) mod 10`) confirms it, but numbers issued since October 2020
//!   have a random suffix, so a failed checksum still counts when an RRN context word is near.
//! - Phones: mobile `01[016789]`, Seoul `02`, area codes `031`–`064`, `070`, representative
//!   numbers `15xx/16xx/18xx-xxxx`, and `+82` forms; hyphens, dots, spaces or none.
//! - Bank accounts: per-bank digit groupings (or 10–14 plain digits), only next to a banking
//!   context word, because bare digit runs are far more often order numbers than accounts.

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PiiKind {
    Rrn,
    Phone,
    BankAccount,
}

impl PiiKind {
    pub const ALL: [PiiKind; 3] = [PiiKind::Rrn, PiiKind::Phone, PiiKind::BankAccount];

    pub fn label(self) -> &'static str {
        match self {
            PiiKind::Rrn => "rrn",
            PiiKind::Phone => "phone",
            PiiKind::BankAccount => "bank_account",
        }
    }
}

/// One finding: bytes `start..end`; digits after the first `keep_head` and before the last
/// `keep_tail` are masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
    keep_head: u8,
    keep_tail: u8,
}

/// Longest match, in bytes (`+82-10-1234-5678` is 16; grouped accounts up to 18).
const MAX_MATCH: usize = 24;
/// How far back context words are looked for.
const CONTEXT: usize = 48;

const RRN_WORDS: &[&str] = &["주민", "rrn", "resident", "registration"];
const BANK_WORDS: &[&str] = &[
    "계좌",
    "은행",
    "입금",
    "예금주",
    "account",
    "acct",
    "bank",
    "국민",
    "신한",
    "우리",
    "하나",
    "농협",
    "기업",
    "카카오",
    "토스",
    "새마을",
    "우체국",
    "케이뱅크",
];
/// Per-bank groupings of account numbers written with separators.
const BANK_GROUPS: &[&[usize]] = &[
    &[6, 2, 6],    // KB Kookmin
    &[3, 2, 4, 3], // KB Kookmin (old)
    &[3, 3, 6],    // Shinhan
    &[3, 2, 6],    // Shinhan (old), SC
    &[4, 3, 6],    // Woori
    &[3, 6, 5],    // Hana
    &[3, 4, 4, 2], // NH Nonghyup
    &[6, 2, 6],    // NH Nonghyup (central)
    &[3, 6, 2, 3], // IBK
    &[4, 2, 7],    // KakaoBank
    &[4, 4, 4],    // Toss Bank
    &[3, 4, 4, 1], // Post office, MG
];

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn left_boundary(buf: &[u8], i: usize) -> bool {
    if i == 0 {
        return true;
    }
    let prev = buf[i - 1];
    if is_word_byte(prev) {
        return false;
    }
    // Asterisks right after digits are a masked part of that number ("900101-1******"), so
    // masked output scans like the original did; other asterisks ("**bold**") are punctuation.
    if prev == b'*' {
        let before = buf[..i].iter().rev().find(|b| **b != b'*');
        if before.is_some_and(u8::is_ascii_digit) {
            return false;
        }
    }
    // "123-0101..." continues a number through '-' or '.'.
    !(matches!(prev, b'-' | b'.') && i >= 2 && buf[i - 2].is_ascii_digit())
}

fn right_boundary(buf: &[u8], end: usize) -> bool {
    match buf.get(end) {
        None => true,
        Some(&b) if is_word_byte(b) => false,
        Some(b'-' | b'.') => !buf.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(_) => true,
    }
}

fn has_context(buf: &[u8], start: usize, words: &[&str]) -> bool {
    let from = start.saturating_sub(CONTEXT);
    let window = &buf[from..start];
    words.iter().any(|w| {
        let w = w.as_bytes();
        window.len() >= w.len() && window.windows(w.len()).any(|s| s.eq_ignore_ascii_case(w))
    })
}

/// Up to five digit groups of a number, kept on the stack (the scanner runs per byte).
#[derive(Clone, Copy, Default)]
struct Groups {
    spans: [(usize, usize); 5],
    n: usize,
    sep: Option<u8>,
}

impl Groups {
    fn lens(&self, k: usize) -> ([usize; 5], usize) {
        let mut out = [0; 5];
        for (o, g) in out.iter_mut().zip(&self.spans[..k]) {
            *o = g.1;
        }
        (out, k)
    }
}

/// Digit groups of a number starting at `i`, and the separator used.
fn groups(buf: &[u8], mut i: usize) -> Groups {
    let mut out = Groups::default();
    loop {
        let start = i;
        while i < buf.len() && buf[i].is_ascii_digit() {
            i += 1;
        }
        out.spans[out.n] = (start, i - start);
        out.n += 1;
        if out.n == 5 || i + 1 >= buf.len() {
            break;
        }
        let s = buf[i];
        let sep_ok = match out.sep {
            None => matches!(s, b'-' | b' ' | b'.'),
            Some(existing) => s == existing,
        };
        if !sep_ok || !buf[i + 1].is_ascii_digit() {
            break;
        }
        out.sep = Some(s);
        i += 1;
    }
    out
}

/// Longest digit string any pattern needs.
const MAX_DIGITS: usize = 16;

/// The digits of the first `k` groups as values 0–9, or None when there are too many.
fn digits_of(
    buf: &[u8],
    gs: &[(usize, usize)],
    lead_zero: bool,
) -> Option<([u8; MAX_DIGITS], usize)> {
    let mut out = [0u8; MAX_DIGITS];
    let mut n = usize::from(lead_zero);
    for &(s, l) in gs {
        if n + l > MAX_DIGITS {
            return None;
        }
        for (o, d) in out[n..n + l].iter_mut().zip(&buf[s..s + l]) {
            *o = d - b'0';
        }
        n += l;
    }
    Some((out, n))
}

fn valid_rrn_date(d: &[u8]) -> bool {
    let month = d[2] * 10 + d[3];
    let day = d[4] * 10 + d[5];
    let max_day = match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return false,
    };
    // Gender/century digit: 1-4 citizens, 5-8 foreign residents (RRNs began in 1968).
    (1..=max_day).contains(&day) && (1..=8).contains(&d[6])
}

/// The RRN check digit test.
pub fn rrn_checksum_ok(d: &[u8]) -> bool {
    const W: [u32; 12] = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5];
    let sum: u32 = d.iter().zip(W).map(|(&x, w)| x as u32 * w).sum();
    (11 - sum % 11) % 10 == d[12] as u32
}

fn is_mobile(d: &[u8]) -> bool {
    d.len() >= 3 && d[0] == 0 && d[1] == 1 && matches!(d[2], 0 | 1 | 6 | 7 | 8 | 9)
}

/// Area codes: 02 (Seoul), 031–033, 041–044, 051–055, 061–064, 070 (VoIP).
fn area_code_len(d: &[u8]) -> Option<usize> {
    if d.len() < 3 || d[0] != 0 {
        return None;
    }
    match (d[1], d[2]) {
        (2, _) => Some(2),
        (3, 1..=3) | (4, 1..=4) | (5, 1..=5) | (6, 1..=4) | (7, 0) => Some(3),
        _ => None,
    }
}

fn finding(
    kind: PiiKind,
    start: usize,
    end: usize,
    keep_head: u8,
    keep_tail: u8,
) -> Option<Finding> {
    Some(Finding {
        kind,
        start,
        end,
        keep_head,
        keep_tail,
    })
}

/// Classifies a number whose groups are `gs` (already boundary-checked).
fn classify(buf: &[u8], start: usize, gs: &[(usize, usize)], sep: Option<u8>) -> Option<Finding> {
    let mut lens_buf = [0usize; 5];
    for (o, g) in lens_buf.iter_mut().zip(gs) {
        *o = g.1;
    }
    let lens = &lens_buf[..gs.len()];
    let (digits, n) = digits_of(buf, gs, false)?;
    let d = &digits[..n];
    let (last_start, last_len) = gs[gs.len() - 1];
    let end = last_start + last_len;

    // Resident registration number.
    let rrn_shape = (lens == [6, 7] && matches!(sep, Some(b'-') | Some(b' '))) || lens == [13];
    if rrn_shape && valid_rrn_date(d) && (rrn_checksum_ok(d) || has_context(buf, start, RRN_WORDS))
    {
        return finding(PiiKind::Rrn, start, end, 7, 0);
    }

    // Phone numbers.
    let phone_grouped = |head: usize| {
        lens.len() == 3 && lens[0] == head && matches!(lens[1], 3 | 4) && lens[2] == 4
    };
    if is_mobile(d) && (phone_grouped(3) || (lens.len() == 1 && matches!(d.len(), 10 | 11))) {
        return finding(PiiKind::Phone, start, end, 3, 4);
    }
    if let Some(area) = area_code_len(d) {
        let plain = lens.len() == 1 && (d.len() == area + 7 || d.len() == area + 8);
        if phone_grouped(area) || plain {
            return finding(PiiKind::Phone, start, end, area as u8, 4);
        }
    }
    if lens == [4, 4] && d[0] == 1 && matches!(d[1], 5 | 6 | 8) {
        return finding(PiiKind::Phone, start, end, 4, 0);
    }

    // Bank accounts, only with banking context.
    let bank_shape = if lens.len() == 1 {
        (10..=14).contains(&d.len())
    } else {
        sep == Some(b'-') && BANK_GROUPS.contains(&lens)
    };
    if bank_shape && has_context(buf, start, BANK_WORDS) {
        return finding(PiiKind::BankAccount, start, end, 0, 4);
    }
    None
}

/// `+82` international form starting at `i` (which holds '+').
fn international(buf: &[u8], i: usize) -> Option<Finding> {
    if buf.get(i + 1..i + 3) != Some(b"82") {
        return None;
    }
    let mut j = i + 3;
    if buf.get(j).is_some_and(|b| matches!(b, b'-' | b' ' | b'.')) {
        j += 1;
    }
    if !buf.get(j).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let g = groups(buf, j);
    let gs = &g.spans[..g.n];
    // Put the trunk 0 back to reuse the domestic rules: +82 10-... is 010-...
    let (digits, _) = digits_of(buf, gs, true)?;
    let d = &digits[..];
    let (lens, _) = g.lens(g.n);
    for k in (1..=g.n).rev() {
        let end = gs[k - 1].0 + gs[k - 1].1;
        if end - i > MAX_MATCH || !right_boundary(buf, end) {
            continue;
        }
        let n: usize = lens[..k].iter().sum::<usize>() + 1;
        let dd = &d[..n];
        let grouped = k == 3 && matches!(lens[1], 3 | 4) && lens[2] == 4;
        // Kept: country code and area/carrier code (without the trunk 0), and the last 4.
        let area = if is_mobile(dd) {
            Some(3)
        } else {
            area_code_len(dd)
        };
        let ok = match area {
            Some(3) if is_mobile(dd) => {
                (grouped && lens[0] == 2) || (k == 1 && matches!(n, 10 | 11))
            }
            Some(area) => {
                (grouped && lens[0] == area - 1) || (k == 1 && (n == area + 7 || n == area + 8))
            }
            None => false,
        };
        if let (true, Some(area)) = (ok, area) {
            return finding(PiiKind::Phone, i, end, 1 + area as u8, 4);
        }
    }
    None
}

/// Scans `buf` for candidates starting in `from..until`; matches may extend past `until`.
fn scan_range(buf: &[u8], from: usize, until: usize, out: &mut Vec<Finding>) {
    let mut i = from;
    while i < until {
        let b = buf[i];
        if !(b.is_ascii_digit() || b == b'+') || !left_boundary(buf, i) {
            i += 1;
            continue;
        }
        if b == b'+' {
            if let Some(f) = international(buf, i) {
                i = f.end;
                out.push(f);
            } else {
                i += 1;
            }
            continue;
        }
        let g = groups(buf, i);
        let (gs, sep) = (&g.spans[..g.n], g.sep);
        // Fast path: a lone run of fewer than 9 digits matches no pattern.
        if g.n == 1 && gs[0].1 < 9 {
            i = gs[0].0 + gs[0].1;
            continue;
        }
        let mut matched = None;
        for k in (1..=g.n).rev() {
            let end = gs[k - 1].0 + gs[k - 1].1;
            if end - i > MAX_MATCH || !right_boundary(buf, end) {
                continue;
            }
            if let Some(f) = classify(buf, i, &gs[..k], if k > 1 { sep } else { None }) {
                matched = Some(f);
                break;
            }
        }
        match matched {
            Some(f) => {
                i = f.end;
                out.push(f);
            }
            // Skip the rest of this digit run: positions inside it are not boundaries.
            None => i = gs[0].0 + gs[0].1,
        }
    }
}

/// All findings in `text`.
pub fn scan(text: &[u8]) -> Vec<Finding> {
    let mut out = Vec::new();
    scan_range(text, 0, text.len(), &mut out);
    out
}

/// Masks the findings in place (digits only, same length).
pub fn apply_mask(buf: &mut [u8], findings: &[Finding]) {
    for f in findings {
        let total = buf[f.start..f.end]
            .iter()
            .filter(|b| b.is_ascii_digit())
            .count();
        let mut seen = 0;
        for b in &mut buf[f.start..f.end] {
            if b.is_ascii_digit() {
                if seen >= f.keep_head as usize && seen < total.saturating_sub(f.keep_tail as usize)
                {
                    *b = b'*';
                }
                seen += 1;
            }
        }
    }
}

/// Counts of findings by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts(pub [u64; 3]);

impl Counts {
    pub fn add(&mut self, findings: &[Finding]) {
        for f in findings {
            self.0[f.kind as usize] += 1;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    /// `rrn=1, phone=2` style summary (for the flag header); empty when nothing was found.
    pub fn summary(&self) -> String {
        PiiKind::ALL
            .iter()
            .filter(|k| self.0[**k as usize] > 0)
            .map(|k| format!("{}={}", k.label(), self.0[*k as usize]))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Masks a byte stream chunk by chunk with bounded memory: it holds back the last
/// [`MAX_MATCH`]+8 bytes (a match may continue into the next chunk) and keeps [`CONTEXT`] bytes
/// of what it already emitted for the context-word look-back.
#[derive(Debug, Default)]
pub struct StreamMasker {
    /// The bytes as they came: scanning must see unmasked neighbours (a masked digit before a
    /// `+` would make it look like the start of a number).
    buf: Vec<u8>,
    /// The same bytes with the findings masked: what is emitted.
    masked: Vec<u8>,
    /// Bytes at the front of `buf` that were already emitted (look-back context only).
    emitted: usize,
    /// Bytes after `emitted` that belong to a match already masked (not candidate starts).
    masked_until: usize,
    pub counts: Counts,
}

const HOLD: usize = MAX_MATCH + 8;

impl StreamMasker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; returns the bytes that are final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(chunk);
        self.masked.extend_from_slice(chunk);
        if self.buf.len() < self.emitted + HOLD {
            return Vec::new();
        }
        let until = self.buf.len() - HOLD;
        self.process(until)
    }

    /// Ends the stream; returns everything still held.
    pub fn finish(&mut self) -> Vec<u8> {
        let until = self.buf.len();
        self.process(until)
    }

    fn process(&mut self, until: usize) -> Vec<u8> {
        let from = self.emitted.max(self.masked_until);
        let mut found = Vec::new();
        if from < until {
            scan_range(&self.buf, from, until, &mut found);
        }
        apply_mask(&mut self.masked, &found);
        self.counts.add(&found);
        let cut = found.iter().map(|f| f.end).max().unwrap_or(0).max(until);
        let out = self.masked[self.emitted..until].to_vec();
        // Keep look-back context and everything not yet emitted.
        let keep_from = until.saturating_sub(CONTEXT);
        self.buf.drain(..keep_from);
        self.masked.drain(..keep_from);
        self.emitted = until - keep_from;
        self.masked_until = cut - keep_from;
        out
    }
}

/// Copies `input` to `output` masked, in bounded memory; returns what was masked.
pub fn mask_stream(
    mut input: impl std::io::Read,
    mut output: impl std::io::Write,
) -> std::io::Result<Counts> {
    let mut masker = StreamMasker::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&masker.push(&buf[..n]))?;
    }
    output.write_all(&masker.finish())?;
    output.flush()?;
    Ok(masker.counts)
}

/// A finding where a person reading the text finds it: line, column and the masked form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub kind: PiiKind,
    pub line: usize,
    pub column: usize,
    /// The finding as the gateway would pass it on (never the original digits).
    pub masked: String,
}

/// Every finding in `text`, located, with the counts by kind.
pub fn locate(text: &[u8]) -> (Vec<Located>, Counts) {
    let findings = scan(text);
    let mut masked = text.to_vec();
    apply_mask(&mut masked, &findings);
    let mut counts = Counts::default();
    counts.add(&findings);
    let positions = line_columns(text, findings.iter().map(|f| f.start));
    let located = findings
        .iter()
        .zip(positions)
        .map(|(f, (line, column))| Located {
            kind: f.kind,
            line,
            column,
            masked: String::from_utf8_lossy(&masked[f.start..f.end]).into_owned(),
        })
        .collect();
    (located, counts)
}

/// The 1-based line and column (in characters) of each byte offset in `text`, in one pass
/// however many offsets there are (offsets in ascending order; a smaller one than the last is
/// placed at the last one's position).
pub fn line_columns(text: &[u8], offsets: impl Iterator<Item = usize>) -> Vec<(usize, usize)> {
    let (mut line, mut column, mut at) = (1usize, 1usize, 0usize);
    offsets
        .map(|offset| {
            let offset = offset.min(text.len());
            for &b in text.get(at..offset).unwrap_or_default() {
                if b == b'\n' {
                    line += 1;
                    column = 1;
                } else if b & 0xC0 != 0x80 {
                    // Not a UTF-8 continuation byte: a character starts here.
                    column += 1;
                }
            }
            at = at.max(offset);
            (line, column)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> String {
        let mut b = text.as_bytes().to_vec();
        let f = scan(&b);
        apply_mask(&mut b, &f);
        String::from_utf8(b).unwrap()
    }

    fn kinds(text: &str) -> Vec<PiiKind> {
        scan(text.as_bytes()).into_iter().map(|f| f.kind).collect()
    }

    // 900101-1234568 has a valid check digit: sum = 2*9+3*0+4*0+5*1+6*0+7*1+8*1+9*2+2*3+3*4+4*5+5*6 = 124;
    // (11 - 124 % 11) % 10 = (11 - 3) % 10 = 8.
    const RRN: &str = "900101-1234568";

    #[test]
    fn rrn_with_valid_checksum_is_masked_after_the_gender_digit() {
        assert_eq!(masked(&format!("id: {RRN}.")), "id: 900101-1******.");
        assert_eq!(masked("9001011234568"), "9001011******");
        assert!(rrn_checksum_ok(&[9, 0, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 8]));
    }

    #[test]
    fn post_2020_rrn_without_checksum_counts_only_near_context() {
        let bad_check = "900101-1234567";
        assert_eq!(kinds(&format!("order {bad_check}")), vec![]);
        assert_eq!(
            kinds(&format!("주민등록번호: {bad_check}")),
            vec![PiiKind::Rrn]
        );
        assert_eq!(kinds(&format!("RRN {bad_check}")), vec![PiiKind::Rrn]);
        // An impossible date is never an RRN.
        assert_eq!(kinds("주민번호 901301-1234567"), vec![]);
    }

    #[test]
    fn phones_in_every_common_spelling() {
        for (text, want) in [
            ("010-1234-5678", "010-****-5678"),
            ("010.1234.5678", "010.****.5678"),
            ("010 1234 5678", "010 **** 5678"),
            ("01012345678", "010****5678"),
            ("02-123-4567", "02-***-4567"),
            ("031-1234-5678", "031-****-5678"),
            ("+82-10-1234-5678", "+82-10-****-5678"),
            ("+82 10 1234 5678", "+82 10 **** 5678"),
            ("+821012345678", "+8210****5678"),
            ("+82-2-123-4567", "+82-2-***-4567"),
            ("1588-1234", "1588-****"),
        ] {
            assert_eq!(masked(text), want, "{text}");
        }
    }

    #[test]
    fn slices_of_longer_numbers_and_ids_are_not_matches() {
        for text in [
            "9010-1234-5678",    // longer first group
            "010-1234-56789",    // longer last group
            "123-010-1234-5678", // continues a number
            "order_01012345678", // identifier
            "v01012345678x",
            "010-1234-5678-9",
            "tx 9001011234568123",
        ] {
            assert_eq!(kinds(text), vec![], "{text}");
        }
    }

    #[test]
    fn bank_accounts_need_context_and_a_known_grouping() {
        assert_eq!(kinds("ref 110-123-456789"), vec![]);
        assert_eq!(
            masked("신한은행 계좌 110-123-456789"),
            "신한은행 계좌 ***-***-**6789"
        );
        assert_eq!(
            kinds("account no. 1002345678901"),
            vec![PiiKind::BankAccount]
        );
        assert_eq!(kinds("계좌 12-34-56"), vec![]);
    }

    #[test]
    fn json_bodies_with_korean_text() {
        let body =
            format!(r#"{{"name":"홍길동","rrn":"{RRN}","tel":"010-9876-5432","count":12345}}"#);
        let out = masked(&body);
        assert!(
            out.contains("900101-1******")
                && out.contains("010-****-5432")
                && out.contains("12345"),
            "{out}"
        );
    }

    #[test]
    fn streaming_equals_whole_body_masking_for_every_split() {
        let body =
            format!("계좌 110-123-456789 / {RRN} / tel 010-1234-5678 / +82 10 1234 5678 end");
        let whole = masked(&body);
        let bytes = body.as_bytes();
        for chunk in 1..=bytes.len() {
            let mut m = StreamMasker::new();
            let mut out = Vec::new();
            for c in bytes.chunks(chunk) {
                out.extend(m.push(c));
            }
            out.extend(m.finish());
            assert_eq!(String::from_utf8(out).unwrap(), whole, "chunk size {chunk}");
            assert_eq!(m.counts.total(), 4, "chunk size {chunk}");
        }
    }

    #[test]
    fn asterisks_continue_a_masked_number_but_bold_markup_does_not() {
        // Masking the RRN must not turn the '+' glued to it into the start of a phone number.
        let once = masked(&format!("{RRN}+8220010101"));
        assert_eq!(once, "900101-1******+8220010101");
        assert_eq!(masked(&once), once, "masked output scans clean");
        // Bold markup around a number still leaves its edges boundaries.
        assert_eq!(masked("**010-1234-5678**"), "**010-****-5678**");
    }

    #[test]
    fn a_number_glued_to_a_masked_one_is_judged_on_the_original_bytes() {
        // Found by the streaming property test: once the RRN's last digit was masked, the `+`
        // after it looked like the start of a phone number to the next chunk's scan.
        let body = format!("{RRN}+8220010101+820계좌 ");
        let whole = masked(&body);
        assert_eq!(whole, "900101-1******+8220010101+820계좌 ");
        let mut m = StreamMasker::new();
        let mut out = Vec::new();
        for c in body.as_bytes().chunks(1) {
            out.extend(m.push(c));
        }
        out.extend(m.finish());
        assert_eq!(String::from_utf8(out).unwrap(), whole);
    }

    #[test]
    fn line_columns_count_lines_and_characters_in_one_pass() {
        let text = "ab\n주민 x\n\nz".as_bytes();
        let at = |needle: &str| {
            text.windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
        };
        let offsets = [0, at("x"), at("z"), text.len()];
        assert_eq!(
            line_columns(text, offsets.into_iter()),
            [(1, 1), (2, 4), (4, 1), (4, 2)]
        );
        // One pass: 200k offsets over 2 MB (rescanning from the start for each would take
        // minutes).
        let big = "0123456789\n".repeat(200_000);
        let all = line_columns(big.as_bytes(), (0..big.len()).step_by(11));
        assert_eq!(all.len(), 200_000);
        assert_eq!(all[199_999], (200_000, 1));
    }
}
