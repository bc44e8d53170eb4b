//! What an agent tells the control plane: metadata only.
//!
//! A report carries the agent's version, the configuration generation it runs, the last one
//! it refused (with a reason that names paths in the configuration, never values from the
//! bank's file), and its proxy metrics in the Prometheus text format — but only the families
//! in [`FAMILIES`], only samples whose labels are in [`LABELS`] and whose values are short
//! plain words. Counts, latency histograms, breaker state, auth failures: what the detector,
//! the gate and Slack need. Bodies, PII, client addresses, keys and upstream addresses have no
//! family or label to travel in, and a new metric that grew one would be dropped here until
//! it is added on purpose.

use prometheus::{proto::MetricFamily, Encoder, Registry, TextEncoder};
use serde::{Deserialize, Serialize};

/// The metric families an agent reports.
pub const FAMILIES: &[&str] = &[
    "apitree_proxy_requests_total",
    "apitree_proxy_request_duration_seconds",
    "apitree_proxy_in_flight_requests",
    "apitree_proxy_auth_failures_total",
    "apitree_proxy_rate_limited_total",
    "apitree_proxy_breaker_state",
    "apitree_proxy_breaker_opens_total",
    "apitree_proxy_upstream_errors_total",
    "apitree_proxy_pii_findings_total",
    "apitree_proxy_config_reloads_total",
];

/// The labels those families may carry: route names and fixed categories.
pub const LABELS: &[&str] = &[
    "route",
    "status_class",
    "reason",
    "subject",
    "window",
    "kind",
    "result",
];

/// The longest label value reported (route names are at most 63 characters).
const MAX_LABEL_VALUE: usize = 63;

/// One report, sent every few seconds.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    /// The agent's apitree version.
    pub version: String,
    /// The configuration generation it serves (none before its first configuration).
    pub generation: Option<u64>,
    /// The last configuration it refused since it last applied one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// Its metrics, filtered to [`FAMILIES`], Prometheus text format.
    pub metrics: String,
    /// What it made of the candidate configuration the control plane offered, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewReport>,
}

/// The agent's side of the gate: what became of a candidate configuration (built beside the
/// running one, never served to the agent's clients).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreviewReport {
    /// The candidate's generation (none when its signature did not verify).
    pub generation: Option<u64>,
    /// Why it was not built (paths, never the partner's values); then nothing else is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Whether its admin `/readyz` says ready (rate-limit store reachable, configuration
    /// loaded), and if not, what it says.
    #[serde(default)]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    /// Its smoke probes, once they have run (empty before).
    #[serde(default)]
    pub smoke: Vec<SmokeOutcome>,
    /// Its own metrics (traffic the partner's monitors or canary clients send it), filtered
    /// like the report's.
    #[serde(default)]
    pub metrics: String,
}

impl PreviewReport {
    /// Whether this is the answer to candidate `generation`: one for that generation, or a
    /// refusal of a candidate whose signature did not verify (it had no generation to read).
    pub fn answers(&self, generation: u64) -> bool {
        self.generation == Some(generation) || (self.generation.is_none() && self.refused.is_some())
    }
}

/// One smoke probe an agent sent through a candidate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmokeOutcome {
    /// The probe's name (a plain name: lower-case letters, digits, `-`).
    pub name: String,
    pub passed: bool,
    /// What came back against what was expected, e.g. `got 200, expected 401`.
    pub detail: String,
}

/// A configuration the agent did not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Refusal {
    /// The refused generation, when its signature verified (an envelope that did not verify
    /// has no generation to believe).
    pub generation: Option<u64>,
    pub reason: String,
}

/// A label value that can only be a name or a category: lower-case letters, digits, `-`, `_`,
/// `.`, at most [`MAX_LABEL_VALUE`] characters.
pub fn plain(value: &str) -> bool {
    value.len() <= MAX_LABEL_VALUE
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// The families of `families` an agent may report, with every sample that has a label outside
/// [`LABELS`] or a value that is not [`plain`] removed.
pub fn filter(families: Vec<MetricFamily>) -> Vec<MetricFamily> {
    families
        .into_iter()
        .filter(|f| FAMILIES.contains(&f.name()))
        .filter_map(|mut f| {
            let kept: Vec<_> = f
                .take_metric()
                .into_iter()
                .filter(|m| {
                    m.get_label()
                        .iter()
                        .all(|l| LABELS.contains(&l.name()) && plain(l.value()))
                })
                .collect();
            if kept.is_empty() {
                return None;
            }
            f.set_metric(kept);
            Some(f)
        })
        .collect()
}

/// [`filter`]ed metrics of `registry`, Prometheus text format.
pub fn metadata(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&filter(registry.gather()), &mut out)
        .expect("text encoding of gathered metrics");
    String::from_utf8(out).expect("the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, Opts};

    fn counter(r: &Registry, name: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, "h"), labels).unwrap();
        r.register(Box::new(c.clone())).unwrap();
        c
    }

    #[test]
    fn only_listed_families_labels_and_plain_values_are_reported() {
        let r = Registry::new();
        counter(
            &r,
            "apitree_proxy_requests_total",
            &["route", "status_class"],
        )
        .with_label_values(&["accounts", "2xx"])
        .inc();
        // A listed family with a value that is not a name (an address, a key, text).
        let reasons = counter(&r, "apitree_proxy_auth_failures_total", &["reason"]);
        reasons.with_label_values(&["unknown_key"]).inc();
        for value in [
            "10.1.2.3:8443",
            "at_live_Xy3kQ9abSECRET",
            "홍길동",
            "a b",
            &"x".repeat(64),
        ] {
            reasons.with_label_values(&[value]).inc();
        }
        // A listed family name with a label nobody listed.
        counter(
            &r,
            "apitree_proxy_upstream_errors_total",
            &["route", "client"],
        )
        .with_label_values(&["accounts", "bob"])
        .inc();
        // A family nobody listed.
        counter(&r, "apitree_proxy_something_new_total", &["route"])
            .with_label_values(&["accounts"])
            .inc();
        let text = metadata(&r);
        assert!(
            text.contains(r#"apitree_proxy_requests_total{route="accounts",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"reason="unknown_key""#), "{text}");
        for gone in [
            "10.1.2.3",
            "at_live",
            "홍길동",
            "a b",
            "xxxxx",
            "bob",
            "something_new",
            "upstream_errors",
        ] {
            assert!(!text.contains(gone), "{gone} reported:\n{text}");
        }
    }

    /// The proxy's own metrics: every family it registers that the report keeps has only
    /// listed labels, so nothing the detector reads is silently dropped.
    #[test]
    fn the_proxys_reported_families_keep_all_their_samples() {
        let m = crate::proxy::metrics::ProxyMetrics::new();
        m.auth_failures.with_label_values(&["unknown_key"]).inc();
        m.upstream_errors
            .with_label_values(&["accounts", "connect"])
            .inc();
        m.breaker_state.with_label_values(&["accounts"]).set(2);
        let all = m.registry.gather();
        let kept = filter(m.registry.gather());
        for f in &all {
            if FAMILIES.contains(&f.name()) && !f.get_metric().is_empty() {
                let k = kept
                    .iter()
                    .find(|k| k.name() == f.name())
                    .unwrap_or_else(|| panic!("{} dropped", f.name()));
                assert_eq!(k.get_metric().len(), f.get_metric().len(), "{}", f.name());
            }
        }
    }
}
