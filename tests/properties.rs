//! Property tests for the parsers that face untrusted input: API keys, proxy configs and the
//! PII scanner. Case counts are set here so the closing note can report executions.

use apitree::crd::gateway::KeyScope;
use apitree::proxy::{config::ProxyConfig, keys::ApiKey, pii};
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
