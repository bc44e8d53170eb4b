//! Gauge scoring: a route's p99 latency and the `timestamp,value` series of a replay.
//!
//! A gauge is predicted three ways: the recent level (median of the latest quiet windows of the
//! last day), the same time on up to seven earlier days, and the same time on up to four
//! earlier weeks. A window is judged against the predictor that has been right most lately
//! (exponentially weighted mean absolute error over about 30 windows); a seasonal predictor
//! only once it has predicted a day's worth of windows and beats the recent level by 10%. So
//! daily and weekly seasonality are found in the data, not configured, and a series that loses
//! its rhythm falls back to its recent level.
//!
//! The residual (value − prediction, corrected by the predictor's recent bias) is measured in
//! robust units: 1.4826 × the median absolute deviation of that predictor's residuals over its
//! latest 64 quiet windows, never less than 1% of the level (a gauge does not alarm on a few
//! percent). A window is anomalous from [`GAUGE_Z`] units. Anomalous windows stay out of the
//! baseline, unless they show that the series has changed regime:
//! - **a level shift**: 5 of the last 6 windows anomalous on the same side. They become the
//!   recent level: the shift is alerted, then adapted to;
//! - **a variance change**: 4 of the last 12 windows anomalous on both sides. Their residuals
//!   become the predictor's scale.
//!
//! A steady climb (or fall) can stay within [`GAUGE_Z`] units of the recent level, which
//! follows it a few windows behind. So a window is also anomalous when the mean of the latest
//! six quiet windows has drifted from what was predicted before they came by [`GAUGE_Z`] units
//! of how far such a mean drifts when nothing happens; the climb then stays out of the
//! baseline, and once it has lasted it is a level shift like any other.
//!
//! The anomaly score says how surprising a window is: 0.5 at [`GAUGE_Z`] units, 1 from 7. It
//! is high when something starts, not while it lasts (see [`Episode`]). A severity (the configured multiples of the prediction, in
//! either direction) is only raised by an anomalous window.

use statrs::distribution::{ContinuousCDF, Normal};

use super::score::{
    median, recent, same_time, strength, Episode, Past, Score, ScoreConfig, Severity, DAY, WEEK,
};
use crate::crd::gateway::BaselineMethod;

/// Robust units from which a gauge window is anomalous.
pub const GAUGE_Z: f64 = 4.5;
/// Quiet residuals each predictor's scale rests on.
const RING: usize = 64;
/// The latest windows (quiet or not) a regime change is read from.
const LAST: usize = 12;
/// Windows a drift is averaged over (see [`GaugeState::drift`]).
const DRIFT: usize = 6;
/// The least noise of a drift, as a share of one window's scale: a mean of six windows against
/// a median of twelve, √(1/6 + π/(2·12)) ≈ 0.55. A drift's noise is measured like a residual's
/// (the spread of the predictor's latest 64 quiet drifts, around their median): a seasonal
/// series the recent level follows a little behind drifts every day, and that is its normal.
const DRIFT_NOISE: f64 = 0.55;
/// Residuals a predictor needs before its own scale is used.
const MIN_RESIDUALS: usize = 8;
/// Windows a seasonal predictor must have predicted before it can be chosen.
const TRACK_RECORD: u32 = 48;
/// Weight of the newest window in a predictor's mean absolute error.
const ERROR_WEIGHT: f64 = 0.03;
/// The smallest scale, as a share of the level.
const RELATIVE_FLOOR: f64 = 0.01;

/// The predictors, in the order of [`GaugeState`]'s arrays.
const RECENT_LEVEL: usize = 0;
const SAME_TIME_DAYS: usize = 1;
const SAME_TIME_WEEKS: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Ring {
    values: [f64; RING],
    len: usize,
    next: usize,
    /// Pushes since the cached bias and scale were computed.
    stale: usize,
    bias: f64,
    scale: f64,
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            values: [0.0; RING],
            len: 0,
            next: 0,
            stale: usize::MAX,
            bias: 0.0,
            scale: 0.0,
        }
    }
}

impl Ring {
    fn push(&mut self, x: f64) {
        self.values[self.next] = x;
        self.next = (self.next + 1) % RING;
        self.len = (self.len + 1).min(RING);
        self.stale = self.stale.saturating_add(1);
    }

    fn replace(&mut self, xs: impl IntoIterator<Item = f64>) {
        *self = Self::default();
        for x in xs {
            self.push(x);
        }
    }

    /// (bias, scale): the median residual and 1.4826 × the median absolute deviation around
    /// it, recomputed every fourth push (sorting 64 numbers per window adds up over many
    /// series, and four windows barely move a median of 64).
    fn bias_and_scale(&mut self) -> Option<(f64, f64)> {
        if self.len < MIN_RESIDUALS {
            return None;
        }
        if self.stale >= 4 {
            let values = &self.values[..self.len];
            let bias = median(values.to_vec()).unwrap_or(0.0);
            let mad = median(values.iter().map(|x| (x - bias).abs()).collect()).unwrap_or(0.0);
            self.bias = bias;
            self.scale = 1.4826 * mad;
            self.stale = 0;
        }
        Some((self.bias, self.scale))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    at: i64,
    value: f64,
    /// What the window was judged against (the chosen prediction, bias-corrected).
    expected: f64,
    /// The chosen predictor.
    chosen: usize,
    residual: f64,
    anomalous: bool,
}

/// What a gauge series keeps besides its history: each predictor's residuals and record, the
/// latest windows and the current episode.
#[derive(Debug, Clone, Default)]
pub struct GaugeState {
    residuals: [Ring; 3],
    /// Each predictor's drifts on quiet windows: how far a drift goes when nothing happens.
    drifts: [Ring; 3],
    error: [f64; 3],
    predicted: [u32; 3],
    last: [Window; LAST],
    last_len: usize,
    last_next: usize,
    episode: Episode,
    /// When the latest level shift was adopted: a drift is not measured across it.
    settled: Option<i64>,
}

/// The verdict on one gauge window, before the incident steps.
pub struct Judged {
    pub score: Score,
    /// The window may enter the baseline.
    pub quiet: bool,
    /// Earlier anomalous windows that turned out to be a new regime: they enter the baseline
    /// now (with this window).
    pub accepted: Vec<Past>,
    /// A level shift: the recent level is made of the accepted windows only.
    pub level_shift: bool,
}

impl GaugeState {
    /// Judges `value` at `at` against `history` (quiet windows, sorted) and the recent ring.
    pub fn judge(
        &mut self,
        history: &[Past],
        recent_windows: &[Past],
        at: i64,
        value: f64,
        cfg: &ScoreConfig,
    ) -> Judged {
        let mut predictions = [None; 3];
        let allowed = match cfg.baseline {
            BaselineMethod::Auto => [true, true, true],
            BaselineMethod::RecentMedian => [true, false, false],
            BaselineMethod::SameTimeLastWeek => [false, false, true],
        };
        if allowed[RECENT_LEVEL] {
            predictions[RECENT_LEVEL] = recent(recent_windows, at);
        }
        if allowed[SAME_TIME_DAYS] {
            predictions[SAME_TIME_DAYS] = same_time(history, at, DAY, 7, cfg);
        }
        if allowed[SAME_TIME_WEEKS] {
            predictions[SAME_TIME_WEEKS] = same_time(history, at, WEEK, 4, cfg);
        }
        let chosen = self.choose(&predictions);
        let Some((c, predicted)) = chosen else {
            // Nothing to judge against yet: the window starts the history.
            self.remember_last(Window {
                at,
                value,
                expected: value,
                chosen: RECENT_LEVEL,
                residual: 0.0,
                anomalous: false,
            });
            return Judged {
                score: Score::unjudged(None, 1.0),
                quiet: true,
                accepted: Vec::new(),
                level_shift: false,
            };
        };
        let floor = cfg.baseline_floor.max(f64::MIN_POSITIVE);
        let (bias, scale) = match self.residuals[c].bias_and_scale() {
            Some((bias, scale)) => (bias, scale),
            // Too few residuals of this predictor (a new or restored series): the spread of
            // the recent history stands in.
            None => (0.0, fallback_scale(history)),
        };
        let expected = predicted + bias;
        let scale = scale
            .max(expected.abs() * RELATIVE_FLOOR)
            .max(floor)
            .max(f64::MIN_POSITIVE);
        let residual = value - expected;
        let mut z = residual.abs() / scale;
        if z < GAUGE_Z {
            // A window that is near its prediction may still be part of a steady climb the
            // prediction has been following.
            if let Some(drift) = self.drift(c, at, value, expected) {
                let (bias, spread) = self.drifts[c].bias_and_scale().unwrap_or((0.0, 0.0));
                let z_drift = (drift - bias).abs() / spread.max(DRIFT_NOISE * scale);
                if z_drift < GAUGE_Z {
                    self.drifts[c].push(drift);
                }
                z = z.max(z_drift);
            }
        }
        let anomalous = z >= GAUGE_Z;
        // Every predictor's record, with errors clipped so one spike does not disqualify one.
        for (i, p) in predictions.iter().enumerate() {
            if let Some(p) = p {
                let e = (value - p).abs().min(GAUGE_Z * scale);
                self.error[i] = if self.predicted[i] == 0 {
                    e
                } else {
                    (1.0 - ERROR_WEIGHT) * self.error[i] + ERROR_WEIGHT * e
                };
                self.predicted[i] = self.predicted[i].saturating_add(1);
                if !anomalous {
                    self.residuals[i].push(value - p);
                }
            }
        }
        self.remember_last(Window {
            at,
            value,
            expected,
            chosen: c,
            residual,
            anomalous,
        });
        let (accepted, level_shift) = if anomalous {
            self.regime_change(c)
        } else {
            (Vec::new(), false)
        };
        if level_shift {
            self.settled = Some(at);
        }
        let b = expected.abs().max(floor);
        let v = value.abs().max(floor);
        let ratio = if v >= b { v / b } else { b / v };
        let p_value = Normal::new(0.0, 1.0)
            .map(|n| 2.0 * (1.0 - n.cdf(z)))
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        let severity = if anomalous && p_value < cfg.alpha {
            cfg.level(ratio)
        } else {
            Severity::None
        };
        let anomaly_score = self.episode.score(anomalous, strength(z, GAUGE_Z));
        Judged {
            score: Score {
                baseline: Some(expected),
                ratio,
                p_value,
                severity,
                anomaly_score,
            },
            quiet: !anomalous || !accepted.is_empty(),
            accepted,
            level_shift,
        }
    }

    /// The predictor to judge against, and its prediction.
    fn choose(&self, predictions: &[Option<f64>; 3]) -> Option<(usize, f64)> {
        let mut chosen: Option<usize> = predictions[RECENT_LEVEL].map(|_| RECENT_LEVEL);
        for i in [SAME_TIME_DAYS, SAME_TIME_WEEKS] {
            if predictions[i].is_none() {
                continue;
            }
            let proven = self.predicted[i] >= TRACK_RECORD;
            chosen = match chosen {
                // Alone (SameTimeLastWeek, or no recent level yet after a gap).
                None => Some(i),
                Some(c) if proven && self.error[i] < 0.9 * self.error[c] => Some(i),
                keep => keep,
            };
        }
        chosen.and_then(|c| predictions[c].map(|p| (c, p)))
    }

    fn remember_last(&mut self, window: Window) {
        self.last[self.last_next] = window;
        self.last_next = (self.last_next + 1) % LAST;
        self.last_len = (self.last_len + 1).min(LAST);
    }

    /// How far the latest quiet windows (with this one) have drifted from their prediction,
    /// in the gauge's units, when that can be told. Against the recent level, which follows a
    /// climb a few windows behind, the drift is the mean of the latest [`DRIFT`] quiet values
    /// less the prediction made [`LAST`] windows ago, before they came; against a seasonal
    /// predictor, which does not follow, it is the mean of their residuals. Anomalous windows
    /// are left out (a spike is not a drift), and no drift is measured across a level shift
    /// or a gap of hours.
    fn drift(&self, chosen: usize, at: i64, value: f64, expected: f64) -> Option<f64> {
        if self.last_len < LAST - 1 {
            return None;
        }
        let oldest = self.last[self.latest(LAST - 1).next()?];
        if self.settled.is_some_and(|t| oldest.at <= t)
            || oldest.at < at - 3 * 3600
            || oldest.chosen != chosen
        {
            return None;
        }
        // The latest quiet windows of this predictor (with this one): how many, and the sum
        // of what the drift averages (values against the recent level, else residuals).
        let measure = |w: &Window| {
            if chosen == RECENT_LEVEL {
                w.value
            } else {
                w.residual
            }
        };
        let (mut n, mut sum) = (0usize, 0.0);
        for w in self.latest(DRIFT - 1).map(|i| &self.last[i]) {
            if !w.anomalous && w.chosen == chosen {
                n += 1;
                sum += measure(w);
            }
        }
        n += 1;
        sum += if chosen == RECENT_LEVEL {
            value
        } else {
            value - expected
        };
        if n < DRIFT - 1 {
            return None;
        }
        let mean = sum / n as f64;
        Some(if chosen == RECENT_LEVEL {
            mean - oldest.expected
        } else {
            mean
        })
    }

    /// The latest `n` windows, oldest first.
    fn latest(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        let n = n.min(self.last_len);
        (0..n).map(move |k| (self.last_next + LAST - n + k) % LAST)
    }

    /// Whether the latest anomalous windows are a new regime; if so they are accepted (they
    /// enter the baseline and are no longer counted as anomalies).
    fn regime_change(&mut self, chosen: usize) -> (Vec<Past>, bool) {
        let six: Vec<usize> = self.latest(6).collect();
        let shifted: Vec<usize> = six
            .iter()
            .copied()
            .filter(|&i| self.last[i].anomalous)
            .collect();
        let same_side = shifted
            .windows(2)
            .all(|w| self.last[w[0]].residual.signum() == self.last[w[1]].residual.signum());
        if shifted.len() >= 5 && same_side {
            return (self.accept(&shifted), true);
        }
        let twelve: Vec<usize> = self.latest(LAST).collect();
        let noisy: Vec<usize> = twelve
            .iter()
            .copied()
            .filter(|&i| self.last[i].anomalous)
            .collect();
        let up = noisy.iter().any(|&i| self.last[i].residual > 0.0);
        let down = noisy.iter().any(|&i| self.last[i].residual < 0.0);
        if noisy.len() >= 4 && up && down {
            let residuals: Vec<f64> = twelve.iter().map(|&i| self.last[i].residual).collect();
            self.residuals[chosen].replace(residuals);
            return (self.accept(&noisy), false);
        }
        (Vec::new(), false)
    }

    fn accept(&mut self, windows: &[usize]) -> Vec<Past> {
        windows
            .iter()
            .map(|&i| {
                self.last[i].anomalous = false;
                Past {
                    at: self.last[i].at,
                    value: self.last[i].value,
                    weight: 1,
                }
            })
            .collect()
    }
}

/// The spread of the latest 48 windows of history (1.4826 × MAD), for a predictor with too
/// few residuals of its own.
fn fallback_scale(history: &[Past]) -> f64 {
    let values: Vec<f64> = history.iter().rev().take(48).map(|p| p.value).collect();
    let med = median(values.clone()).unwrap_or(0.0);
    1.4826 * median(values.iter().map(|x| (x - med).abs()).collect()).unwrap_or(0.0)
}
