//! Incident lifecycle with hysteresis, and one detector series (history + incident).
//!
//! Escalation is immediate: the first window that supports a higher severity raises it.
//! De-escalation and resolution wait for `resolve_after` consecutive windows whose ratio is
//! below 80% of the current level's threshold, so a series flapping around a threshold keeps one
//! incident instead of paging on every crossing.

use serde::Serialize;

use super::score::{
    baseline_with_recent, score_errors, score_gauge, Past, Score, ScoreConfig, Severity, RECENT,
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub at: i64,
    pub score: Score,
    /// The incident's level after this window.
    pub severity: Severity,
    pub event: Option<IncidentEvent>,
    /// The window as it entered the baseline's history (quiet windows only).
    pub remembered: Option<Past>,
}

/// How many past windows a series keeps: five weeks of 1-minute windows at most.
const MAX_HISTORY: usize = 5 * 7 * 24 * 60;

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
        }
    }
}

impl Series {
    /// Puts windows that entered the baseline before (oldest first) back into its history.
    pub fn restore(&mut self, pasts: impl IntoIterator<Item = Past>) {
        for past in pasts {
            self.remember(past, true);
        }
    }

    fn remember(&mut self, past: Past, verdict_quiet: bool) {
        // Anomalous windows stay out of the baseline, so a long incident never becomes normal.
        if verdict_quiet {
            // Kept sorted by time (the baseline binary-searches it); a late window is inserted.
            match self.history.last() {
                Some(last) if last.at > past.at => {
                    let i = self.history.partition_point(|p| p.at <= past.at);
                    self.history.insert(i, past);
                }
                _ => self.history.push(past),
            }
            self.recent[self.recent_next] = past;
            self.recent_next = (self.recent_next + 1) % RECENT;
            self.recent_len = (self.recent_len + 1).min(RECENT);
            if self.history.len() > MAX_HISTORY + MAX_HISTORY / 4 {
                self.history.drain(..MAX_HISTORY / 4);
            }
        }
    }

    /// An error-ratio window: `errors` of `requests`, starting at `at` (unix seconds).
    pub fn observe_errors(
        &mut self,
        at: i64,
        requests: u64,
        errors: u64,
        cfg: &ScoreConfig,
    ) -> Verdict {
        let base = baseline_with_recent(&self.history, &self.recent[..self.recent_len], at, cfg);
        let score = score_errors(requests, errors, base, cfg);
        // An empty window says nothing about the level: it does not enter the history.
        let past = (requests > 0).then(|| Past {
            at,
            value: errors.min(requests) as f64 / requests as f64,
            weight: requests,
        });
        self.conclude(at, score, past, cfg)
    }

    /// A gauge window.
    pub fn observe_gauge(&mut self, at: i64, value: f64, cfg: &ScoreConfig) -> Verdict {
        let base = baseline_with_recent(&self.history, &self.recent[..self.recent_len], at, cfg);
        let recent: Vec<f64> = self
            .history
            .iter()
            .rev()
            .take(48)
            .map(|p| p.value)
            .collect();
        let score = score_gauge(value, base, &recent, cfg);
        self.conclude(
            at,
            score,
            Some(Past {
                at,
                value,
                weight: 1,
            }),
            cfg,
        )
    }

    /// Steps the incident and remembers the window when it was quiet.
    fn conclude(
        &mut self,
        at: i64,
        score: Score,
        past: Option<Past>,
        cfg: &ScoreConfig,
    ) -> Verdict {
        let event = self.tracker.step(&score, cfg);
        let severity = self.tracker.level();
        let quiet = severity == Severity::None && score.severity == Severity::None;
        let remembered = past.filter(|_| quiet);
        if let Some(past) = past {
            self.remember(past, quiet);
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
}
