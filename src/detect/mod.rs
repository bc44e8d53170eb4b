//! The detector: scores error ratios (and gauges) of each watched series against a baseline and
//! runs an incident per (gateway, route, signal) with hysteresis.
//!
//! Everything here decides in pure functions with the time passed in; sources (scrape /
//! Prometheus), persistence and notifications sit at the edges; notices leave through
//! [`IncidentSink`], which `crate::notify` implements.

pub mod engine;
pub mod eval;
pub mod gauge;
pub mod incident;
pub mod notice;
pub mod replay;
pub mod score;
pub mod source;

pub use incident::{IncidentEvent, Series, Tracker, Verdict};
pub use notice::{IncidentNotice, IncidentSink, SinkError};
pub use score::{Score, ScoreConfig, Severity};

/// A p-value as people read it: `p=2.40e-8`; below what a float holds (a test so lopsided its
/// p-value underflows to 0) `p<1e-300`, never `p=0.00e0`.
pub fn p_text(p: f64) -> String {
    if p < 1e-300 {
        "p<1e-300".into()
    } else {
        format!("p={p:.2e}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn p_values_read_as_numbers_and_an_underflow_as_a_bound() {
        assert_eq!(super::p_text(2.4e-8), "p=2.40e-8");
        assert_eq!(super::p_text(0.513), "p=5.13e-1");
        assert_eq!(super::p_text(0.0), "p<1e-300");
        assert_eq!(super::p_text(f64::MIN_POSITIVE), "p<1e-300");
    }
}
