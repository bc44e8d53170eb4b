//! Incident lifecycle with hysteresis, and one detector series (history + incident).
//!
//! Escalation is immediate: the first window that supports a higher severity raises it.
//! De-escalation and resolution wait for `resolve_after` consecutive windows whose ratio is
//! below 80% of the current level's threshold, so a series flapping around a threshold keeps one
//! incident instead of paging on every crossing.

use serde::Serialize;

use super::gauge::{GaugeState, GAUGE_Z};
use super::score::{
    references, score_errors, strength, Episode, Horizon, Past, References, Score, ScoreConfig,
    Severity, MIN_EXPECTED_ERRORS, NOVELTY, RECENT,
};

/// Share of a level's threshold a ratio must fall below to count as calm.
pub const HYSTERESIS: f64 = 0.8;

/// What changed about an incident in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentEvent {
    Open,
    Escalate,
    Deescalate,
    Resolve,
}

impl IncidentEvent {
    pub fn label(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Escalate => "escalate",
            Self::Deescalate => "deescalate",
            Self::Resolve => "resolve",
        }
    }
}

/// The incident state of one (gateway, route, signal).
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    level: Option<Severity>,
    calm: u32,
}

impl Tracker {
    /// A tracker whose incident is open at `level` (resumed from the incident store).
    pub fn open_at(level: Severity) -> Self {
        Self {
            level: (level != Severity::None).then_some(level),
            calm: 0,
        }
    }

    /// The incident's current level (`None` when no incident is open).
    pub fn level(&self) -> Severity {
        self.level.unwrap_or(Severity::None)
    }

    /// Feeds one scored window.
    pub fn step(&mut self, score: &Score, cfg: &ScoreConfig) -> Option<IncidentEvent> {
        let current = self.level();
        if score.severity > current {
            self.level = Some(score.severity);
            self.calm = 0;
            return Some(if current == Severity::None {
                IncidentEvent::Open
            } else {
                IncidentEvent::Escalate
            });
        }
        if current == Severity::None {
            return None;
        }
        if score.ratio < cfg.threshold(current) * HYSTERESIS {
            self.calm += 1;
        } else {
            self.calm = 0;
        }
        if self.calm < cfg.resolve_after.max(1) {
            return None;
        }
        self.calm = 0;
        if score.severity == Severity::None {
            self.level = None;
            Some(IncidentEvent::Resolve)
        } else {
            self.level = Some(score.severity);
            Some(IncidentEvent::Deescalate)
        }
    }
}

/// The verdict on one window of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub at: i64,
    pub score: Score,
    /// The incident's level after this window.
    pub severity: Severity,
    pub event: Option<IncidentEvent>,
    /// Windows that entered the baseline's history with this one: the window itself when it
    /// was quiet, and for a gauge the earlier windows of a regime it turned out to start.
    pub remembered: Vec<Past>,
}

/// How many past windows a series keeps: five weeks of 1-minute windows at most.
const MAX_HISTORY: usize = 5 * 7 * 24 * 60;

/// Decayed sums of requests and errors: a burn window.
#[derive(Debug, Clone, Copy, Default)]
struct Decayed {
    requests: f64,
    errors: f64,
}

/// The burn windows of an error series: the SRE workbook's paired long and short windows (6 h
/// with 30 min, 1 h with the window itself), kept as exponentially decayed sums so a series
/// holds six numbers instead of hours of windows. A sliding window of length L has the mean
/// age of a decay with time constant L/2. Every window enters them, anomalous or not: they
/// measure what is happening, the reference measures what is normal.
#[derive(Debug, Clone, Copy, Default)]
struct Burn {
    at: Option<i64>,
    half_hour: Decayed,
    hour: Decayed,
    six_hours: Decayed,
}

impl Burn {
    fn add(&mut self, at: i64, requests: u64, errors: u64) {
        let elapsed = self.at.map_or(0, |t| (at - t).max(0)) as f64;
        for (d, tau) in [
            (&mut self.half_hour, 900.0),
            (&mut self.hour, 1_800.0),
            (&mut self.six_hours, 10_800.0),
        ] {
            let keep = (-elapsed / tau).exp();
            d.requests = d.requests * keep + requests as f64;
            d.errors = d.errors * keep + errors as f64;
        }
        self.at = Some(self.at.map_or(at, |t| t.max(at)));
    }
}

fn burn_score(d: Decayed, reference: f64, cfg: &ScoreConfig) -> Score {
    let requests = d.requests.round() as u64;
    score_errors(
        requests,
        (d.errors.round() as u64).min(requests),
        Some(reference),
        cfg,
    )
}

/// How far an error series' windows stray from its long reference when nothing happens: the
/// mean square of their binomial z (exponentially weighted over about 50 quiet windows). It is
/// 1 where errors are purely binomial; real traffic is usually more dispersed (retries, one
/// client's bad batch, a daily mix of callers), and a window's surprise is measured in these
/// units, so a series that always wobbles is not surprising when it wobbles.
#[derive(Debug, Clone, Copy, Default)]
struct Dispersion {
    phi: f64,
    /// Quiet windows it has learnt from.
    learnt: u32,
}

/// Quiet windows a series' dispersion is learnt from before its surprise counts.
const LEARN: u32 = 24;
/// The smallest rise that can be surprising, as a multiple of the long reference: at high
/// traffic a 10% rise is statistically certain and still nothing to look at.
const MIN_SURPRISE: f64 = 1.25;

impl Dispersion {
    /// The strength of this window's rise over `reference` in dispersion units (0.5 from
    /// [`GAUGE_Z`] units), and whether it is surprising. Calm windows that are not surprising
    /// teach the dispersion.
    fn surprise(
        &mut self,
        requests: u64,
        errors: u64,
        reference: f64,
        calm: bool,
        cfg: &ScoreConfig,
    ) -> (bool, f64) {
        let reference = reference.max(cfg.baseline_floor).min(1.0);
        let expected = requests as f64 * reference;
        if requests < cfg.min_requests || expected < MIN_EXPECTED_ERRORS || reference >= 1.0 {
            // Too few errors expected for a normal approximation to mean anything.
            return (false, 0.0);
        }
        let z = (errors as f64 - expected) / (expected * (1.0 - reference)).sqrt();
        let units = z / self.phi.max(1.0).sqrt();
        let surprising =
            self.learnt >= LEARN && units >= GAUGE_Z && errors as f64 >= MIN_SURPRISE * expected;
        if calm && units < GAUGE_Z {
            let z2 = z.clamp(-GAUGE_Z, GAUGE_Z).powi(2);
            self.phi = if self.learnt == 0 {
                z2
            } else {
                0.98 * self.phi + 0.02 * z2
            };
            self.learnt = self.learnt.saturating_add(1);
        }
        let s = if self.learnt >= LEARN && errors as f64 >= MIN_SURPRISE * expected {
            strength(units, GAUGE_Z)
        } else {
            0.0
        };
        (surprising, s)
    }
}

/// One watched series: its quiet history (the baseline's input) and its incident.
#[derive(Debug, Clone)]
pub struct Series {
    /// Sorted by time; trimmed in chunks so appends stay amortised O(1).
    history: Vec<Past>,
    /// The latest quiet windows (unordered ring), kept inline for cache-friendly ticks.
    recent: [Past; RECENT],
    recent_len: usize,
    recent_next: usize,
    pub tracker: Tracker,
    /// Error series: the burn windows.
    burn: Burn,
    /// Error series: the level before the long burn window.
    horizon: Horizon,
    /// Gauge series: predictors, scales and the current episode.
    gauge: Option<Box<GaugeState>>,
    /// Error series: how its windows stray from the long reference, and the current episode
    /// of surprising windows.
    dispersion: Dispersion,
    episode: Episode,
    /// Windows since the open incident last rose (opened or escalated).
    since_rise: u32,
}

impl Default for Series {
    fn default() -> Self {
        Self {
            history: Vec::new(),
            recent: [Past {
                at: 0,
                value: 0.0,
                weight: 0,
            }; RECENT],
            recent_len: 0,
            recent_next: 0,
            tracker: Tracker::default(),
            burn: Burn::default(),
            horizon: Horizon::default(),
            gauge: None,
            dispersion: Dispersion::default(),
            episode: Episode::default(),
            since_rise: 0,
        }
    }
}

impl Series {
    /// Puts windows that entered the baseline before (oldest first) back into its history.
    pub fn restore(&mut self, pasts: impl IntoIterator<Item = Past>) {
        for past in pasts {
            self.remember(past);
        }
    }

    /// Adds a quiet window to the history and the recent ring. Anomalous windows never come
    /// here, so a long incident never becomes normal.
    fn remember(&mut self, past: Past) {
        // Kept sorted by time (the baseline searches it); a late window is inserted.
        match self.history.last() {
            Some(last) if last.at > past.at => {
                let i = self.history.partition_point(|p| p.at <= past.at);
                self.history.insert(i, past);
                if self.horizon.covers(i) {
                    self.horizon.reset();
                }
            }
            _ => self.history.push(past),
        }
        self.recent[self.recent_next] = past;
        self.recent_next = (self.recent_next + 1) % RECENT;
        self.recent_len = (self.recent_len + 1).min(RECENT);
        if self.history.len() > MAX_HISTORY + MAX_HISTORY / 4 {
            self.history.drain(..MAX_HISTORY / 4);
            self.horizon.reset();
        }
    }

    /// The quiet windows before `at`.
    fn past(&self, at: i64) -> &[Past] {
        match self.history.last() {
            Some(last) if last.at < at => &self.history,
            _ => &self.history[..self.history.partition_point(|p| p.at < at)],
        }
    }

    /// An error-ratio window: `errors` of `requests`, starting at `at` (unix seconds).
    ///
    /// Three verdicts, the strongest counts: the window against its baseline (the seasonal
    /// reference blended with the recent level: fast spikes), and two burns against the long
    /// reference (the seasonal reference, or the level six to 24 hours ago, whichever is
    /// higher): the last hour together with this window, and the last six hours together with
    /// the last half hour. A burn needs both of its windows above a threshold, so it pages on
    /// a rise however slowly it came, and stops as soon as the short window is calm.
    pub fn observe_errors(
        &mut self,
        at: i64,
        requests: u64,
        errors: u64,
        cfg: &ScoreConfig,
    ) -> Verdict {
        let errors = errors.min(requests);
        let level_before = self.horizon.level(&self.history, at);
        let past = self.past(at);
        let References {
            baseline: base,
            seasonal: seasonal_ref,
        } = references(past, &self.recent[..self.recent_len], at, cfg);
        let long_ref = match (seasonal_ref, level_before) {
            (Some(s), Some(h)) => Some(s.max(h)),
            (s, h) => s.or(h),
        };
        let mut score = score_errors(requests, errors, base, cfg);
        self.burn.add(at, requests, errors);
        if let Some(reference) = long_ref {
            let this = score_errors(requests, errors, Some(reference), cfg);
            let hour = burn_score(self.burn.hour, reference, cfg).weaker(this);
            let six = burn_score(self.burn.six_hours, reference, cfg).weaker(burn_score(
                self.burn.half_hour,
                reference,
                cfg,
            ));
            score = score.stronger(hour).stronger(six);
            let calm = self.tracker.level() == Severity::None;
            let (surprising, rise) = self
                .dispersion
                .surprise(requests, errors, reference, calm, cfg);
            let surprise = self.episode.score(surprising, rise);
            score.anomaly_score = score.anomaly_score.max(surprise);
        }
        // An empty window says nothing about the level: it does not enter the history.
        let past = (requests > 0).then(|| Past {
            at,
            value: errors as f64 / requests as f64,
            weight: requests,
        });
        self.conclude(at, score, past, cfg)
    }

    /// A gauge window (see [`super::gauge`]).
    pub fn observe_gauge(&mut self, at: i64, value: f64, cfg: &ScoreConfig) -> Verdict {
        let mut gauge = self.gauge.take().unwrap_or_default();
        let judged = gauge.judge(
            self.past(at),
            &self.recent[..self.recent_len],
            at,
            value,
            cfg,
        );
        self.gauge = Some(gauge);
        let event = self.tracker.step(&judged.score, cfg);
        let severity = self.tracker.level();
        let mut remembered = judged.accepted;
        if judged.level_shift {
            // The new level is the recent level now.
            self.recent_len = 0;
            self.recent_next = 0;
        }
        if judged.quiet && remembered.is_empty() {
            remembered.push(Past {
                at,
                value,
                weight: 1,
            });
        }
        for past in &remembered {
            self.remember(*past);
        }
        Verdict {
            at,
            score: judged.score,
            severity,
            event,
            remembered,
        }
    }

    /// Steps the incident and remembers the window when it was quiet. The anomaly score of a
    /// window that neither opens nor escalates the open incident falls to 40% with every window
    /// since it last did: it marks where something started, not how long it lasts.
    fn conclude(
        &mut self,
        at: i64,
        mut score: Score,
        past: Option<Past>,
        cfg: &ScoreConfig,
    ) -> Verdict {
        let event = self.tracker.step(&score, cfg);
        let severity = self.tracker.level();
        match event {
            Some(IncidentEvent::Open | IncidentEvent::Escalate) => self.since_rise = 0,
            _ if severity != Severity::None => {
                self.since_rise = self.since_rise.saturating_add(1);
                score.anomaly_score *= NOVELTY.powi(self.since_rise.min(60) as i32);
            }
            _ => self.since_rise = 0,
        }
        let quiet = severity == Severity::None && score.severity == Severity::None;
        let remembered: Vec<Past> = past.filter(|_| quiet).into_iter().collect();
        for past in &remembered {
            self.remember(*past);
        }
        Verdict {
            at,
            score,
            severity,
            event,
            remembered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ScoreConfig {
        // The documented defaults (spec.detection with nothing set).
        ScoreConfig::from(&crate::crd::gateway::DetectionSpec::default())
    }

    fn run(series: &mut Series, start: i64, error_counts: &[u64]) -> Vec<Verdict> {
        error_counts
            .iter()
            .enumerate()
            .map(|(i, e)| series.observe_errors(start + i as i64 * 300, 10_000, *e, &cfg()))
            .collect()
    }

    const T0: i64 = 1_767_225_600;

    #[test]
    fn escalates_immediately_and_resolves_after_quiet_windows() {
        let mut s = Series::default();
        run(&mut s, T0, &[100; 12]); // 1% baseline
        let v = run(
            &mut s,
            T0 + 12 * 300,
            &[350, 600, 1200, 1200, 100, 100, 100, 100],
        );
        let events: Vec<Option<&str>> = v.iter().map(|v| v.event.map(|e| e.label())).collect();
        assert_eq!(
            events,
            [
                Some("open"),
                Some("escalate"),
                Some("escalate"),
                None,
                None,
                None,
                Some("resolve"),
                None
            ]
        );
        let levels: Vec<&str> = v.iter().map(|v| v.severity.label()).collect();
        assert_eq!(levels[..4], ["warning", "high", "critical", "critical"]);
    }

    #[test]
    fn de_escalates_to_the_level_the_quiet_windows_support() {
        let mut s = Series::default();
        run(&mut s, T0, &[100; 12]);
        let v = run(&mut s, T0 + 12 * 300, &[1200, 350, 350, 350, 100, 100, 100]);
        let events: Vec<Option<&str>> = v.iter().map(|v| v.event.map(|e| e.label())).collect();
        assert_eq!(
            events,
            [
                Some("open"),
                None,
                None,
                Some("deescalate"),
                None,
                None,
                Some("resolve")
            ]
        );
        assert_eq!(v[3].severity, Severity::Warning);
    }

    #[test]
    fn flapping_around_a_threshold_keeps_one_incident() {
        let mut s = Series::default();
        run(&mut s, T0, &[100; 12]);
        // Alternating just over and just under 3x: one open, no resolve.
        let v = run(
            &mut s,
            T0 + 12 * 300,
            &[320, 280, 320, 280, 320, 280, 320, 280],
        );
        let opens = v
            .iter()
            .filter(|v| v.event == Some(IncidentEvent::Open))
            .count();
        let resolves = v
            .iter()
            .filter(|v| v.event == Some(IncidentEvent::Resolve))
            .count();
        assert_eq!((opens, resolves), (1, 0));
    }

    #[test]
    fn a_gradual_ramp_does_not_become_the_baseline() {
        let mut s = Series::default();
        run(&mut s, T0, &[100; 12]);
        // Errors double every window; anomalous windows stay out of the baseline.
        let v = run(&mut s, T0 + 12 * 300, &[150, 250, 400, 700, 1200, 2000]);
        assert_eq!(v.last().unwrap().severity, Severity::Critical);
        let base = v.last().unwrap().score.baseline.unwrap();
        assert!(base < 0.015, "the ramp leaked into the baseline: {base}");
    }

    #[test]
    fn missing_windows_and_clock_skew_neither_page_nor_crash() {
        let mut s = Series::default();
        run(&mut s, T0, &[100; 12]);
        // A two-hour gap, then a window stamped slightly in the past of the last one.
        let v1 = s.observe_errors(T0 + 40 * 300, 10_000, 100, &cfg());
        let v2 = s.observe_errors(T0 + 40 * 300 - 30, 10_000, 110, &cfg());
        assert_eq!((v1.severity, v2.severity), (Severity::None, Severity::None));
        assert!(v2.score.baseline.is_some());
        // An empty window (no traffic) is not an outage.
        let v3 = s.observe_errors(T0 + 41 * 300, 0, 0, &cfg());
        assert_eq!(v3.severity, Severity::None);
    }

    /// The case: three days at ~1% errors, then a climb to 12% over six hours. Each
    /// window is only a little above the one before, so the recent level follows it; the burn
    /// windows against the level of earlier days page.
    #[test]
    fn a_slow_climb_to_twelve_times_pages_however_slowly_it_comes() {
        let mut s = Series::default();
        let c = cfg();
        let day = 288;
        for i in 0..3 * day {
            s.observe_errors(T0 + i as i64 * 300, 10_000, 100, &c);
        }
        let mut opened = None;
        let mut last = None;
        for k in 0..72 {
            let errors = 100 + 1_100 * k / 72;
            let v = s.observe_errors(T0 + (3 * day + k) as i64 * 300, 10_000, errors, &c);
            if v.event == Some(IncidentEvent::Open) && opened.is_none() {
                opened = Some(k);
            }
            last = Some(v);
        }
        let opened = opened.expect("a twelvefold rise never paged");
        assert!(opened < 48, "paged only after {opened} windows");
        assert!(last.unwrap().severity >= Severity::High);
        // The same with a traffic drop and the ratio unchanged: nothing.
        let mut quiet = Series::default();
        for i in 0..3 * day {
            quiet.observe_errors(T0 + i as i64 * 300, 10_000, 100, &c);
        }
        for k in 0..72 {
            let v = quiet.observe_errors(T0 + (3 * day + k) as i64 * 300, 1_000, 10, &c);
            assert_eq!(v.severity, Severity::None);
        }
    }

    /// A gauge that shifts its level is alerted once, then adapted to: the incident resolves
    /// and the anomaly score falls back while the new level holds.
    #[test]
    fn a_gauge_level_shift_alerts_then_adapts() {
        let mut s = Series::default();
        let c = cfg();
        for i in 0..300 {
            let noise = [0.0, 1.5, -1.0, 0.5, -1.5, 1.0][i % 6];
            s.observe_gauge(T0 + i as i64 * 300, 100.0 + noise, &c);
        }
        let mut v = Vec::new();
        for i in 300..340 {
            let noise = [0.0, 1.5, -1.0, 0.5, -1.5, 1.0][i % 6];
            v.push(s.observe_gauge(T0 + i as i64 * 300, 400.0 + noise, &c));
        }
        assert_eq!(v[0].event, Some(IncidentEvent::Open));
        assert!(v[0].score.anomaly_score >= 0.5);
        assert!(v[1..].iter().all(|v| v.score.anomaly_score < 0.5));
        assert!(v.iter().any(|v| v.event == Some(IncidentEvent::Resolve)));
        assert_eq!(v.last().unwrap().severity, Severity::None);
    }

    /// A gauge that climbs steadily (12 noise units over three hours) stays within a few units
    /// of its recent level, which follows it; the drift from what was predicted before the
    /// climb is what marks it, during the climb, and the quiet day before is never marked.
    #[test]
    fn a_gauge_that_climbs_slowly_is_marked_while_it_climbs() {
        let c = cfg();
        for seed in 1..=5 {
            let mut s = Series::default();
            let mut rng = crate::detect::eval::Rng::new(seed);
            let mut scores = Vec::new();
            for i in 0..400 {
                let climb = if i >= 300 {
                    12.0 * ((i - 300) as f64 / 36.0).min(1.0)
                } else {
                    0.0
                };
                let v = s.observe_gauge(T0 + i * 300, 200.0 + 4.0 * (climb + rng.normal()), &c);
                scores.push(v.score.anomaly_score);
            }
            let quiet = scores[48..300].iter().cloned().fold(0.0, f64::max);
            assert!(quiet < 0.5, "seed {seed}: a quiet window scored {quiet}");
            let first = scores[300..].iter().position(|s| *s >= 0.5);
            assert!(
                first.is_some_and(|k| k < 36),
                "seed {seed}: the climb was marked at {first:?} (it lasts 36 windows)"
            );
        }
    }

    /// Surprise is measured in the series' own wobble: errors that wobble ±30% from window to
    /// window (more than counting noise) are not surprising when they wobble, nor at a 1.6x
    /// rise; on a series without the wobble that rise is; and a rise under 1.25x never is,
    /// however much traffic makes it certain.
    #[test]
    fn surprise_is_measured_in_the_series_own_wobble() {
        let c = cfg();
        // (highest score on a quiet day after its first hours, highest in the hour of a rise)
        let run = |requests: u64, wobble: f64, rise: f64| -> (f64, f64) {
            let mut s = Series::default();
            let mut rng = crate::detect::eval::Rng::new(11);
            let mut quiet = 0.0f64;
            for i in 0..300 {
                let ratio = 0.01 * (1.0 + wobble * (2.0 * rng.uniform() - 1.0));
                let v = s.observe_errors(T0 + i * 300, requests, rng.binomial(requests, ratio), &c);
                if i >= 120 {
                    quiet = quiet.max(v.score.anomaly_score);
                }
            }
            let mut risen = 0.0f64;
            for k in 0..12 {
                let errors = rng.binomial(requests, 0.01 * rise);
                let v = s.observe_errors(T0 + (300 + k) * 300, requests, errors, &c);
                risen = risen.max(v.score.anomaly_score);
            }
            (quiet, risen)
        };
        let (quiet, risen) = run(20_000, 0.0, 1.6);
        assert!(
            quiet < 0.5 && risen >= 0.5,
            "steady series: {quiet} then {risen}"
        );
        let (quiet, risen) = run(20_000, 0.3, 1.6);
        assert!(
            quiet < 0.5 && risen < 0.5,
            "wobbling series: {quiet} then {risen}"
        );
        let (_, risen) = run(200_000, 0.0, 1.15);
        assert!(risen < 0.5, "a 1.15x rise was surprising: {risen}");
        let (_, risen) = run(200_000, 0.0, 1.4);
        assert!(
            risen >= 0.5,
            "a certain 1.4x rise was not surprising: {risen}"
        );
    }
}
