//! Check 5, analysis: green's error ratio and p99 latency against blue's over the observation
//! window. Pure: traffic counts in, a verdict out.
//!
//! The error comparison is a one-sided two-proportion z-test (is green's error ratio higher than
//! blue's?). Green fails only when the difference is both larger than `maxErrorRatioIncrease` and
//! significant at `alpha`, so a handful of unlucky requests cannot refuse a good revision, and a
//! real regression cannot hide behind the tolerance. Too little traffic is Inconclusive, never
//! Passed.

use statrs::distribution::{ContinuousCDF, Normal};

use crate::crd::gateway::{CheckPhase, Color, GateSpec};

/// Traffic one color served in the window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub requests: u64,
    pub errors: u64,
    /// p99 latency in milliseconds, when requests were seen.
    pub p99_ms: Option<f64>,
}

impl Traffic {
    fn ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors.min(self.requests) as f64 / self.requests as f64
        }
    }
}

/// Latency differences below this are noise on a loopback or in-cluster hop, whatever the ratio.
const LATENCY_FLOOR_MS: f64 = 10.0;

/// Requests each color must serve before their p99s are compared: the p99 of n requests is about
/// the (n/100)-th slowest one, so below this it rests on fewer than ten requests and one stall
/// (a GC pause, a busy node) decides it.
pub const MIN_LATENCY_SAMPLES: u64 = 1000;

/// The analysis verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub phase: CheckPhase,
    pub observed: String,
    pub threshold: String,
    pub samples: u64,
    pub p_value: Option<f64>,
    pub reason: String,
}

/// One-sided p-value of "green's error ratio is higher than blue's".
pub fn error_increase_p_value(blue: &Traffic, green: &Traffic) -> f64 {
    let (bn, gn) = (blue.requests as f64, green.requests as f64);
    if bn == 0.0 || gn == 0.0 {
        return 1.0;
    }
    let (pb, pg) = (blue.ratio(), green.ratio());
    if pg <= pb {
        return 1.0;
    }
    let pooled =
        (blue.errors.min(blue.requests) + green.errors.min(green.requests)) as f64 / (bn + gn);
    let se = (pooled * (1.0 - pooled) * (1.0 / bn + 1.0 / gn)).sqrt();
    if se <= 0.0 {
        return 0.0;
    }
    let z = (pg - pb) / se;
    Normal::new(0.0, 1.0).map(|n| 1.0 - n.cdf(z)).unwrap_or(1.0)
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// Judges the new revision (`green`, on color `preview`) against the serving one (`blue`, on
/// the other color); texts name the colors as they are.
pub fn judge(blue: &Traffic, green: &Traffic, spec: &GateSpec, preview: Color) -> Judgement {
    let (new, old) = (preview.as_str(), preview.other().as_str());
    let latency = match (green.p99_ms, blue.p99_ms) {
        (Some(g), Some(b)) => format!("; p99 {g:.0} ms vs {b:.0} ms"),
        _ => String::new(),
    };
    let observed = format!(
        "{new} {} errors ({}/{}), {old} {} ({}/{}){latency}",
        pct(green.ratio()),
        green.errors,
        green.requests,
        pct(blue.ratio()),
        blue.errors,
        blue.requests
    );
    let threshold = format!(
        "≤ +{:.2} pp errors (α={}), p99 ≤ {}× {old}, ≥ {} requests",
        spec.max_error_ratio_increase * 100.0,
        spec.alpha,
        spec.max_latency_ratio,
        spec.min_samples
    );
    let verdict = |phase, p_value, reason: String| Judgement {
        phase,
        observed: observed.clone(),
        threshold: threshold.clone(),
        samples: green.requests,
        p_value,
        reason,
    };
    if green.requests < spec.min_samples {
        return verdict(
            CheckPhase::Inconclusive,
            None,
            format!(
                "{new} served {} requests in the window, fewer than minSamples {}: send traffic to the preview endpoint or lower gate.minSamples",
                green.requests, spec.min_samples
            ),
        );
    }
    if blue.requests == 0 {
        return verdict(
            CheckPhase::Inconclusive,
            None,
            format!(
                "{old} served no requests in the window, so there is nothing to compare {new} with"
            ),
        );
    }
    let p = error_increase_p_value(blue, green);
    let increase = green.ratio() - blue.ratio();
    if increase > spec.max_error_ratio_increase && p < spec.alpha {
        return verdict(
            CheckPhase::Failed,
            Some(p),
            format!(
                "{new}'s error ratio is {:.2} percentage points above {old}'s ({})",
                increase * 100.0,
                crate::detect::p_text(p)
            ),
        );
    }
    let latency_judged =
        green.requests >= MIN_LATENCY_SAMPLES && blue.requests >= MIN_LATENCY_SAMPLES;
    if let (Some(g), Some(b), true) = (green.p99_ms, blue.p99_ms, latency_judged) {
        if g > b * spec.max_latency_ratio && g - b > LATENCY_FLOOR_MS {
            return verdict(
                CheckPhase::Failed,
                Some(p),
                format!(
                    "{new}'s p99 latency {g:.0} ms is {:.1}× {old}'s {b:.0} ms",
                    g / b.max(f64::MIN_POSITIVE)
                ),
            );
        }
    }
    let reason = if latency_judged {
        format!("{new}'s errors and latency are in line with {old}'s")
    } else {
        format!("{new}'s errors are in line with {old}'s; p99s not compared below {MIN_LATENCY_SAMPLES} requests per color")
    };
    verdict(CheckPhase::Passed, Some(p), reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(requests: u64, errors: u64, p99: f64) -> Traffic {
        Traffic {
            requests,
            errors,
            p99_ms: Some(p99),
        }
    }

    fn spec() -> GateSpec {
        GateSpec {
            min_samples: 200,
            ..GateSpec::default()
        }
    }

    #[test]
    fn too_few_green_requests_is_inconclusive_even_when_clean() {
        let j = judge(&t(1000, 1, 10.0), &t(150, 0, 10.0), &spec(), Color::Green);
        assert_eq!(j.phase, CheckPhase::Inconclusive);
        assert!(
            j.reason.contains("fewer than minSamples 200"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn equal_error_ratios_pass() {
        let j = judge(
            &t(1000, 10, 10.0),
            &t(1000, 12, 11.0),
            &spec(),
            Color::Green,
        );
        assert_eq!(j.phase, CheckPhase::Passed, "{j:?}");
    }

    #[test]
    fn a_significant_regression_fails() {
        let j = judge(&t(1000, 5, 10.0), &t(1000, 60, 10.0), &spec(), Color::Green);
        assert_eq!(j.phase, CheckPhase::Failed);
        assert!(j.p_value.unwrap() < 0.001);
        assert!(j.reason.contains("5.50 percentage points"), "{}", j.reason);
    }

    /// Every second rollout runs the new revision on blue: the texts name the colors as
    /// they are, never "green" for the new one by habit.
    #[test]
    fn texts_name_the_new_revisions_color_and_the_serving_one() {
        let j = judge(&t(1000, 5, 10.0), &t(1000, 60, 10.0), &spec(), Color::Blue);
        assert!(
            j.reason
                .starts_with("blue's error ratio is 5.50 percentage points above green's"),
            "{}",
            j.reason
        );
        assert!(
            j.observed
                .starts_with("blue 6.00% errors (60/1000), green 0.50%"),
            "{}",
            j.observed
        );
        assert!(j.threshold.contains("× green"), "{}", j.threshold);
        let j = judge(&t(0, 0, 0.0), &t(500, 0, 10.0), &spec(), Color::Blue);
        assert!(
            j.reason.starts_with("green served no requests"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn a_large_but_insignificant_difference_passes() {
        // 2 of 200 vs 0 of 200: 1 pp above blue, but nowhere near significant.
        let mut s = spec();
        s.max_error_ratio_increase = 0.005;
        let j = judge(&t(200, 0, 10.0), &t(200, 2, 10.0), &s, Color::Green);
        assert_eq!(j.phase, CheckPhase::Passed, "{j:?}");
        assert!(j.p_value.unwrap() > 0.05);
    }

    #[test]
    fn slower_green_fails_but_tiny_absolute_differences_do_not() {
        let j = judge(&t(1000, 0, 10.0), &t(1000, 0, 40.0), &spec(), Color::Green);
        assert_eq!(j.phase, CheckPhase::Failed);
        assert!(j.reason.contains("4.0× blue's"), "{}", j.reason);
        // 9 ms vs 3 ms is 3× but only 6 ms: loopback noise.
        let j = judge(&t(1000, 0, 3.0), &t(1000, 0, 9.0), &spec(), Color::Green);
        assert_eq!(j.phase, CheckPhase::Passed);
        // A p99 of 300 requests is their third-slowest: not judged, and the reason says so.
        let j = judge(&t(300, 0, 10.0), &t(300, 0, 80.0), &spec(), Color::Green);
        assert_eq!(j.phase, CheckPhase::Passed);
        assert!(
            j.reason.contains("p99s not compared below 1000"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn no_blue_traffic_is_inconclusive() {
        let j = judge(&t(0, 0, 0.0), &t(500, 0, 10.0), &spec(), Color::Green);
        assert_eq!(j.phase, CheckPhase::Inconclusive);
    }
}
