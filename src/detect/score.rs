//! Scoring one window against a baseline: pure functions, no clock reads, no I/O.
//!
//! The score is current ratio / baseline ratio. A severity (3x / 5x / 10x by default) is only
//! raised when the excess is statistically significant — a binomial upper-tail test of the
//! window's errors against the baseline ratio — and the window has enough requests. Low traffic
//! therefore never pages on noise, while a large jump that is significant even on few requests
//! (many errors, a tiny p-value) still does. A traffic drop with an unchanged error ratio scores
//! about 1 and raises nothing.

use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal};

use crate::crd::gateway::{BaselineMethod, DetectionSpec};

/// Incident severity, ordered.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    None,
    Warning,
    High,
    Critical,
}

impl Severity {
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Warning => "warning",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// Scoring settings (from an `ApiGateway`'s `spec.detection`).
#[derive(Debug, Clone)]
pub struct ScoreConfig {
    pub warning: f64,
    pub high: f64,
    pub critical: f64,
    pub alpha: f64,
    pub min_requests: u64,
    pub baseline_floor: f64,
    pub baseline: BaselineMethod,
    pub resolve_after: u32,
    /// Window length in seconds.
    pub window_secs: i64,
}

impl From<&DetectionSpec> for ScoreConfig {
    fn from(d: &DetectionSpec) -> Self {
        Self {
            warning: d.thresholds.warning,
            high: d.thresholds.high,
            critical: d.thresholds.critical,
            alpha: d.alpha,
            min_requests: d.min_requests,
            baseline_floor: d.baseline_floor,
            baseline: d.baseline,
            resolve_after: d.resolve_after_windows,
            window_secs: d.window.as_std().as_secs().max(1) as i64,
        }
    }
}

impl ScoreConfig {
    /// The severity a score multiple reaches, ignoring significance.
    pub fn level(&self, ratio: f64) -> Severity {
        if ratio >= self.critical {
            Severity::Critical
        } else if ratio >= self.high {
            Severity::High
        } else if ratio >= self.warning {
            Severity::Warning
        } else {
            Severity::None
        }
    }

    /// The multiple a severity starts at.
    pub fn threshold(&self, s: Severity) -> f64 {
        match s {
            Severity::None => 1.0,
            Severity::Warning => self.warning,
            Severity::High => self.high,
            Severity::Critical => self.critical,
        }
    }
}

/// One past window as the baseline sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Past {
    /// Window start, unix seconds.
    pub at: i64,
    /// The window's value: an error ratio, or a gauge value.
    pub value: f64,
    /// Requests in the window (1 for gauges).
    pub weight: u64,
}

pub const DAY: i64 = 86_400;
pub const WEEK: i64 = 7 * DAY;
/// Recent windows the fallback baseline uses.
pub const RECENT: usize = 12;
/// Fewest past windows a baseline rests on.
const MIN_HISTORY: usize = 3;

/// Errors a window must be expected to hold (at the baseline ratio) before an ordinary
/// severity can be raised: below that, counts are too small for 3x to mean anything.
pub const MIN_EXPECTED_ERRORS: f64 = 5.0;

/// The central value of past windows: for error ratios the pooled ratio (total errors / total
/// requests, which stays right when most small windows hold zero errors), for gauges the median.
pub(super) fn central(points: &[Past]) -> Option<f64> {
    if points.is_empty() {
        return None;
    }
    if points.iter().all(|p| p.weight == 1) {
        return median(points.iter().map(|p| p.value).collect());
    }
    let requests: f64 = points.iter().map(|p| p.weight as f64).sum();
    let errors: f64 = points.iter().map(|p| p.value * p.weight as f64).sum();
    (requests > 0.0).then(|| errors / requests)
}

pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The baseline for a window starting at `now` from quiet past windows (anomalous windows are
/// left out by the caller). Same time on earlier weeks when that history exists, else on
/// earlier days, blended with the recent level (the last day, at most the 12 latest windows);
/// None when there is too little history to judge. `history` must be sorted by time.
pub fn baseline(history: &[Past], now: i64, cfg: &ScoreConfig) -> Option<f64> {
    let end = history.partition_point(|p| p.at < now);
    let tail = &history[end.saturating_sub(RECENT)..end];
    references(history, tail, now, cfg).baseline
}

/// The window of `past` (sorted by time) nearest to `target`, when one lies within
/// `tolerance`. Windows are usually evenly spaced, so the index is guessed from the time and
/// corrected by a few steps; a binary search only when the guess is far off. A tick over many
/// series therefore touches a handful of cache lines per lookup.
fn near(past: &[Past], target: i64, tolerance: i64, spacing: i64) -> Option<Past> {
    let last = past.last()?;
    let n = past.len();
    let back = (last.at - target) / spacing.max(1);
    let mut i = (n as i64 - 1 - back).clamp(0, n as i64 - 1) as usize;
    let mut steps = 0;
    while steps < 4 && i + 1 < n && past[i].at < target {
        i += 1;
        steps += 1;
    }
    while steps < 8 && i > 0 && past[i].at > target {
        i -= 1;
        steps += 1;
    }
    if steps >= 4 {
        // Uneven spacing (gaps): search properly.
        i = past.partition_point(|p| p.at < target).min(n - 1);
    }
    [i.checked_sub(1), Some(i), (i + 1 < n).then_some(i + 1)]
        .into_iter()
        .flatten()
        .map(|j| past[j])
        .filter(|p| p.weight > 0 && (p.at - target).abs() <= tolerance)
        .min_by_key(|p| (p.at - target).abs())
}

/// Same time on up to `count` earlier periods (days or weeks): the central value of the
/// windows found, None when none is.
pub fn same_time(
    past: &[Past],
    now: i64,
    period: i64,
    count: i64,
    cfg: &ScoreConfig,
) -> Option<f64> {
    let tolerance = (cfg.window_secs / 2).max(1);
    if past.first().is_none_or(|p| p.at > now - period + tolerance) {
        return None;
    }
    let mut found = [EMPTY; 7];
    let mut n = 0;
    for k in 1..=count.min(7) {
        if let Some(p) = near(past, now - k * period, tolerance, cfg.window_secs) {
            found[n] = p;
            n += 1;
        }
    }
    central(&found[..n])
}

const EMPTY: Past = Past {
    at: 0,
    value: 0.0,
    weight: 0,
};

/// The seasonal reference of a window: same time on up to four earlier weeks when a week of
/// history exists, else on up to seven earlier days.
pub fn seasonal(past: &[Past], now: i64, cfg: &ScoreConfig) -> Option<f64> {
    same_time(past, now, WEEK, 4, cfg).or_else(|| same_time(past, now, DAY, 7, cfg))
}

/// The recent level: the central value of the latest quiet windows of the last day (at least
/// three of them).
pub fn recent(recent_windows: &[Past], now: i64) -> Option<f64> {
    let usable = |p: &&Past| p.at < now && p.at >= now - DAY && p.weight > 0;
    // One pass for the pooled ratio (the usual case, error series: no copy, no sort); gauge
    // windows (all of weight 1) take the median.
    let (mut n, mut requests, mut errors, mut all_one) = (0, 0.0, 0.0, true);
    for p in recent_windows.iter().filter(usable).take(RECENT) {
        n += 1;
        requests += p.weight as f64;
        errors += p.value * p.weight as f64;
        all_one &= p.weight == 1;
    }
    if n < MIN_HISTORY {
        return None;
    }
    if all_one {
        return median(
            recent_windows
                .iter()
                .filter(usable)
                .take(RECENT)
                .map(|p| p.value)
                .collect(),
        );
    }
    (requests > 0.0).then(|| errors / requests)
}

/// What an anomaly score keeps per window an episode (or an incident) goes on: 0.4, so a
/// window after the first is below 0.5 even at full strength.
pub const NOVELTY: f64 = 0.4;
/// Quiet windows that end an episode: an anomaly that flickers on and off is one episode.
const EPISODE_GAP: u32 = 6;

/// Anomalous windows close together, so that an anomaly score is high where something starts,
/// not while it lasts: within an episode (anomalous windows until six quiet ones in a row end
/// it, so a flickering anomaly is one episode) a window's score falls to 40% with every
/// anomalous window, unless it is markedly stronger than the episode's strongest so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Episode {
    /// Anomalous windows in the episode so far.
    length: u32,
    /// Its strongest window's strength.
    peak: f64,
    /// Quiet windows since the latest anomalous one.
    calm: u32,
}

impl Episode {
    /// The anomaly score of a window of `strength` (in [0, 1], 0.5 = anomalous).
    pub fn score(&mut self, anomalous: bool, strength: f64) -> f64 {
        if !anomalous {
            self.calm = self.calm.saturating_add(1);
            return strength;
        }
        if self.calm >= EPISODE_GAP {
            *self = Self::default();
        }
        self.calm = 0;
        let score = if self.length == 0 || strength > 1.5 * self.peak {
            strength
        } else {
            strength * NOVELTY.powi(self.length.min(60) as i32)
        };
        self.length += 1;
        self.peak = self.peak.max(strength);
        score
    }
}

/// Strength of a distance of `units` (robust or dispersion-corrected standard units) from what
/// was expected: 0.5 at `anomalous` units, 1 from `anomalous + 2.5`.
pub fn strength(units: f64, anomalous: f64) -> f64 {
    ((units - 2.0) / (2.0 * (anomalous - 2.0))).clamp(0.0, 1.0)
}

/// The level before the long burn window: errors pooled over the quiet windows between a day
/// and six hours before `now` (at least three of them). A rise that has been going on for
/// hours is measured against it, not against the windows it has already crept into.
///
/// Kept as running sums over a slice of the history that slides with time: each window adds
/// the windows that have just become six hours old and drops those that have become a day old,
/// so a tick over many series costs a few additions per series, never a scan of 18 hours.
#[derive(Debug, Clone, Copy, Default)]
pub struct Horizon {
    /// The slice `history[from..to]` the sums cover, and the `now` they were moved to.
    from: usize,
    to: usize,
    now: Option<i64>,
    requests: f64,
    errors: f64,
}

impl Horizon {
    /// The level before `now`. `history` is sorted by time and only grows at its end between
    /// calls, unless [`Horizon::reset`] was called.
    pub fn level(&mut self, history: &[Past], now: i64) -> Option<f64> {
        if self.now.is_some_and(|t| now < t) || self.to > history.len() {
            // A late window, or a history that changed under the sums: start again.
            self.reset();
        }
        self.now = Some(now);
        while self.to < history.len() && history[self.to].at < now - 6 * 3600 {
            let p = history[self.to];
            self.requests += p.weight as f64;
            self.errors += p.value * p.weight as f64;
            self.to += 1;
        }
        while self.from < self.to && history[self.from].at < now - DAY {
            let p = history[self.from];
            self.requests -= p.weight as f64;
            self.errors -= p.value * p.weight as f64;
            self.from += 1;
        }
        if self.from == self.to {
            // Nothing in the slice: no rounding left over either.
            self.requests = 0.0;
            self.errors = 0.0;
        }
        (self.to - self.from >= MIN_HISTORY && self.requests > 0.0)
            .then(|| (self.errors / self.requests).clamp(0.0, 1.0))
    }

    /// Forgets the sums: the next [`Horizon::level`] adds the slice up again (after the
    /// history was trimmed, or a window was inserted before the slice's end).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Whether a window inserted at `index` of the history lands inside or before the slice.
    pub fn covers(&self, index: usize) -> bool {
        index < self.to
    }
}

/// A window's references: its baseline, and the seasonal reference it was blended from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct References {
    pub baseline: Option<f64>,
    pub seasonal: Option<f64>,
}

/// [`baseline`] with the recent windows supplied separately (a series keeps them in a small
/// ring next to its state, so a tick over many series reads little memory), and the seasonal
/// reference (the burn windows' long reference starts from it).
pub fn references(
    history: &[Past],
    recent_windows: &[Past],
    now: i64,
    cfg: &ScoreConfig,
) -> References {
    // Usually every stored window is older than `now`: skip the search (and its cache misses).
    let past = match history.last() {
        Some(last) if last.at < now => history,
        _ => &history[..history.partition_point(|p| p.at < now)],
    };
    let recent_level = || recent(recent_windows, now);
    match cfg.baseline {
        BaselineMethod::SameTimeLastWeek => {
            let weekly = same_time(past, now, WEEK, 4, cfg);
            References {
                baseline: weekly,
                seasonal: weekly,
            }
        }
        BaselineMethod::RecentMedian => References {
            baseline: recent_level(),
            seasonal: None,
        },
        // The seasonal reference blended with the recent level so a shifted day or week (a
        // holiday, a migration) does not skew it alone: the larger of the two guards against
        // false alarms. Slow rises that drag the recent level along are the burn windows' job.
        BaselineMethod::Auto => {
            let seasonal = seasonal(past, now, cfg);
            let baseline = match (seasonal, recent_level()) {
                (Some(w), Some(r)) => Some(w.max(r)),
                (w, r) => w.or(r),
            };
            References { baseline, seasonal }
        }
    }
}

/// The verdict on one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// The baseline used (after the floor), None when there was too little history.
    pub baseline: Option<f64>,
    /// Current value / baseline.
    pub ratio: f64,
    /// Probability of seeing this many errors (or this deviation) if nothing had changed.
    pub p_value: f64,
    /// The severity this window supports on its own (already gated by significance and sample size).
    pub severity: Severity,
    /// 0 (normal) to 1; from 0.5 the window is anomalous: it supports a warning, or its error
    /// ratio is surprising against the long reference, or it is an anomalous gauge window.
    pub anomaly_score: f64,
}

impl Score {
    /// Nothing to judge (no baseline yet, or an empty window).
    pub fn unjudged(baseline: Option<f64>, ratio: f64) -> Self {
        Self {
            baseline,
            ratio,
            p_value: 1.0,
            severity: Severity::None,
            anomaly_score: 0.0,
        }
    }

    /// The severity `ratio` reaches, when the window has enough data and the excess is
    /// significant at `cfg.alpha`.
    fn judged(base: f64, ratio: f64, p_value: f64, enough: bool, cfg: &ScoreConfig) -> Self {
        let passes = enough && p_value < cfg.alpha;
        let severity = if passes {
            cfg.level(ratio)
        } else {
            Severity::None
        };
        Self {
            baseline: Some(base),
            ratio,
            p_value,
            severity,
            anomaly_score: anomaly_score(ratio, p_value, passes, cfg),
        }
    }

    /// The stronger of two verdicts: the higher severity, then the larger ratio.
    pub fn stronger(self, other: Self) -> Self {
        if (other.severity, other.ratio) > (self.severity, self.ratio) {
            other
        } else {
            self
        }
    }

    /// The weaker of two verdicts (a burn needs both of its windows).
    pub fn weaker(self, other: Self) -> Self {
        if (other.severity, other.ratio) < (self.severity, self.ratio) {
            other
        } else {
            self
        }
    }
}

/// How anomalous a window is, in [0, 1]: 0.5 at the warning multiple, 1 at its square (9x by
/// default), scaled by confidence (1 − p). A window that cannot raise a severity (too few
/// requests or errors, not significant) stays below 0.5, so "0.5 or more" means "supports a
/// warning or more".
fn anomaly_score(ratio: f64, p_value: f64, passes: bool, cfg: &ScoreConfig) -> f64 {
    if ratio <= 1.0 {
        return 0.0;
    }
    let size = (0.5 * ratio.ln() / cfg.warning.max(1.0 + 1e-9).ln()).min(1.0);
    let score = (size * (1.0 - p_value)).clamp(0.0, 1.0);
    if passes {
        score
    } else {
        score.min(0.45)
    }
}

/// Scores an error-ratio window: `errors` of `requests` against the baseline ratio.
pub fn score_errors(
    requests: u64,
    errors: u64,
    baseline_ratio: Option<f64>,
    cfg: &ScoreConfig,
) -> Score {
    let errors = errors.min(requests);
    let Some(base) = baseline_ratio else {
        return Score::unjudged(None, 1.0);
    };
    let base = base.max(cfg.baseline_floor).min(1.0);
    if requests == 0 {
        return Score::unjudged(Some(base), 0.0);
    }
    let current = errors as f64 / requests as f64;
    let ratio = current / base;
    // P(X >= errors) for X ~ Binomial(requests, base). The normal approximation (with
    // continuity correction) is cheap; the exact tail is computed where it can change a
    // decision (within two orders of magnitude of alpha, or on small counts where the
    // approximation is poor). Far-out tails keep the approximation: the exact one costs tens of
    // microseconds and would dominate a tick over 100k series.
    let p_value = if errors == 0 || current <= base {
        1.0
    } else {
        let mean = requests as f64 * base;
        let sd = (mean * (1.0 - base)).sqrt().max(f64::MIN_POSITIVE);
        let z = (errors as f64 - 0.5 - mean) / sd;
        let approx = Normal::new(0.0, 1.0).map(|n| 1.0 - n.cdf(z)).unwrap_or(1.0);
        let near_alpha = approx > cfg.alpha / 100.0 && approx < cfg.alpha * 100.0;
        if ratio >= cfg.warning && (near_alpha || mean < 10.0) {
            Binomial::new(base, requests)
                .map(|b| b.sf(errors - 1))
                .unwrap_or(1.0)
        } else {
            approx
        }
    };
    let expected = requests as f64 * base;
    let enough = (requests >= cfg.min_requests && expected >= MIN_EXPECTED_ERRORS)
        // A jump that is significant even on few requests still pages.
        || (errors >= 5 && p_value < cfg.alpha / 100.0);
    Score::judged(base, ratio, p_value, enough, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn cfg() -> ScoreConfig {
        // The documented defaults (spec.detection with nothing set).
        ScoreConfig::from(&crate::crd::gateway::DetectionSpec::default())
    }

    #[test]
    fn a_zero_baseline_is_floored_so_one_error_is_not_10x() {
        let s = score_errors(1000, 1, Some(0.0), &cfg());
        assert_eq!(s.baseline, Some(0.001));
        assert!((s.ratio - 1.0).abs() < 1e-9);
        assert_eq!(s.severity, Severity::None);
    }

    #[test]
    fn low_traffic_noise_never_pages_but_a_big_significant_jump_does() {
        // 2 errors in 20 requests against 1%: 10x, but p ≈ 0.017 and too few requests.
        let s = score_errors(20, 2, Some(0.01), &cfg());
        assert!(s.ratio >= 10.0);
        assert_eq!(s.severity, Severity::None);
        // 15 errors in 30 requests against 1%: p is astronomically small → critical.
        let s = score_errors(30, 15, Some(0.01), &cfg());
        assert_eq!(s.severity, Severity::Critical, "{s:?}");
    }

    #[test]
    fn a_traffic_drop_with_the_same_ratio_is_not_an_error_spike() {
        let busy = score_errors(10_000, 100, Some(0.01), &cfg());
        let quiet = score_errors(500, 5, Some(0.01), &cfg());
        assert_eq!(busy.severity, Severity::None);
        assert_eq!(quiet.severity, Severity::None);
        assert!((quiet.ratio - 1.0).abs() < 1e-9);
    }

    #[test]
    fn severities_follow_the_multiples_when_significant() {
        let c = cfg();
        assert_eq!(
            score_errors(10_000, 350, Some(0.01), &c).severity,
            Severity::Warning
        );
        assert_eq!(
            score_errors(10_000, 600, Some(0.01), &c).severity,
            Severity::High
        );
        assert_eq!(
            score_errors(10_000, 1_200, Some(0.01), &c).severity,
            Severity::Critical
        );
        let s = score_errors(10_000, 1_200, Some(0.01), &c);
        assert!(s.anomaly_score > 0.9 && s.anomaly_score <= 1.0);
    }

    #[test]
    fn baseline_prefers_same_time_last_week_and_falls_back_to_recent_median() {
        let now = 1_767_225_600;
        let mut history: Vec<Past> = (1..=6)
            .rev()
            .map(|i| Past {
                at: now - i * 300,
                value: 0.02,
                weight: 1000,
            })
            .collect();
        let mut c = cfg();
        assert_eq!(baseline(&history, now, &c), Some(0.02));
        history.push(Past {
            at: now - WEEK + 60,
            value: 0.05,
            weight: 1000,
        });
        history.sort_by_key(|p| p.at);
        c.baseline = BaselineMethod::SameTimeLastWeek;
        assert_eq!(baseline(&history, now, &c), Some(0.05));
        c.baseline = BaselineMethod::Auto;
        assert_eq!(baseline(&history, now, &c), Some(0.05));
        c.baseline = BaselineMethod::RecentMedian;
        assert_eq!(baseline(&history, now, &c), Some(0.02));
        assert_eq!(
            baseline(&history[history.len() - 2..], now, &c),
            None,
            "two windows are too little history"
        );
    }

    /// The sliding level before the long burn window equals the pooled ratio of the quiet
    /// windows 6–24 h old, computed from scratch, at every step: windows arriving in order,
    /// with gaps, late windows inserted before the slice (after a reset), and time going back.
    #[test]
    fn the_sliding_horizon_equals_the_level_computed_from_scratch() {
        let from_scratch = |history: &[Past], now: i64| {
            let span: Vec<&Past> = history
                .iter()
                .filter(|p| p.at >= now - DAY && p.at < now - 6 * 3600)
                .collect();
            let requests: f64 = span.iter().map(|p| p.weight as f64).sum();
            let errors: f64 = span.iter().map(|p| p.value * p.weight as f64).sum();
            (span.len() >= MIN_HISTORY && requests > 0.0).then(|| errors / requests)
        };
        let mut rng = crate::detect::eval::Rng::new(7);
        let mut history: Vec<Past> = Vec::new();
        let mut horizon = Horizon::default();
        let mut now = 1_700_000_000;
        for step in 0..3_000 {
            // Mostly 5-minute steps, sometimes a gap of hours.
            now += if rng.uniform() < 0.01 { 4 * 3600 } else { 300 };
            let requests = rng.index(1, 500) as u64;
            let window = Past {
                at: now,
                value: rng.binomial(requests, 0.02) as f64 / requests as f64,
                weight: requests,
            };
            let asked = if step % 97 == 0 {
                // A window that arrives late, hours behind: inserted in its place.
                let late = Past {
                    at: now - rng.index(3_600, 20 * 3_600) as i64,
                    ..window
                };
                let i = history.partition_point(|p| p.at <= late.at);
                history.insert(i, late);
                if horizon.covers(i) {
                    horizon.reset();
                }
                late.at + 1
            } else {
                history.push(window);
                now + 1
            };
            let got = horizon.level(&history, asked);
            let want = from_scratch(&history, asked);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "step {step}: {g} vs {w}"),
                (g, w) => assert_eq!(g, w, "step {step}"),
            }
        }
    }

    /// An episode marks where an anomaly starts: its first window keeps its strength, the
    /// following ones fall to 40% each, a flicker (quiet windows between anomalous ones) stays
    /// one episode, a markedly stronger window is marked again, and six quiet windows in a row
    /// end the episode.
    #[test]
    fn an_episode_is_marked_where_it_starts_not_while_it_lasts() {
        // (anomalous, strength, expected score)
        let table: &[(bool, f64, f64)] = &[
            (false, 0.2, 0.2),
            (true, 0.6, 0.6),                     // starts
            (true, 0.6, 0.6 * NOVELTY),           // goes on
            (false, 0.1, 0.1),                    // one calm window...
            (true, 0.6, 0.6 * NOVELTY * NOVELTY), // ...is a flicker, not a new start
            (true, 1.0, 1.0),                     // markedly stronger: marked again
            (true, 1.0, NOVELTY.powi(4)),
            (false, 0.0, 0.0),
            (false, 0.0, 0.0),
            (false, 0.0, 0.0),
            (false, 0.0, 0.0),
            (false, 0.0, 0.0),
            (false, 0.0, 0.0), // six calm windows end it
            (true, 0.6, 0.6),  // a new start
        ];
        let mut episode = Episode::default();
        for (k, &(anomalous, strength, want)) in table.iter().enumerate() {
            let got = episode.score(anomalous, strength);
            assert!((got - want).abs() < 1e-12, "row {k}: {got} vs {want}");
        }
    }
}
