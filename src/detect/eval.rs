//! How good the detector is, measured: a labelled corpus of series generated with fixed seeds,
//! the scoring rules, and two simple reference detectors to compare with.
//! `cargo bench --bench detector_quality` runs it; the rules are written down in docs/performance.md (Detector quality).
//!
//! **The corpus.** Twelve categories, six series each, six days of 5-minute windows. Gauges:
//! spikes, dips, level shifts, ramps (up and down), variance changes, seasonality changes
//! (phase or amplitude of the daily rhythm), a flat series with rare small noise, a long quiet
//! seasonal stretch with one late anomaly. Error-ratio series (`requests,errors`): error
//! bursts, slow burns (a rise to about 12x over six hours), a traffic drop with the ratio
//! unchanged followed by a real burst, and low traffic (tens of requests a window) with one
//! outage. Every anomaly has a labelled window starting at its first row.
//!
//! **The score** (per category and overall; a detection is a row whose anomaly score reaches
//! the detector's threshold; the first day is warm-up and never labelled):
//! - the first detection inside a labelled window `[s, e)` earns `1 − 0.5·(i − s)/(e − s)`: 1 on
//!   the anomaly's first row, 0.5 on its last; later detections in the window count nothing;
//! - a window without a detection costs 1;
//! - every detection outside a window costs 0.11 (the Numenta Anomaly Benchmark's standard
//!   false-positive weight), so a detector that stays high long after a change, or fires on
//!   noise, loses points;
//! - normalised: `100 · (raw − null) / (perfect − null)`, where the null detector (never fires)
//!   scores −1 per window and the perfect one +1: null 0, perfect 100, and below 0 is possible.

use super::replay;
use super::score::ScoreConfig;

/// Windows in a generated series (six days of 5 minutes).
pub const ROWS: usize = 6 * 288;
/// Rows at the start that are warm-up (never labelled).
pub const WARM_UP: usize = 288;
const STEP: i64 = 300;
/// 2026-01-05T00:00:00Z, a Monday.
const START: i64 = 1_767_571_200;
/// Cost of a detection outside every window.
pub const FALSE_POSITIVE: f64 = 0.11;

/// What a series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `timestamp,value`
    Gauge,
    /// `timestamp,requests,errors`
    Errors,
}

/// One labelled series.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub category: &'static str,
    pub name: String,
    pub kind: Kind,
    /// Unix seconds of each row.
    pub times: Vec<i64>,
    /// Gauge values, or error ratios (errors / requests; 0 for an empty window).
    pub values: Vec<f64>,
    /// Error series: (requests, errors) of each row.
    pub counts: Vec<(u64, u64)>,
    /// Labelled anomaly windows, as row ranges `[start, end)`.
    pub windows: Vec<(usize, usize)>,
}

impl Labelled {
    /// The series as a replay CSV.
    pub fn csv(&self) -> String {
        let mut out = String::with_capacity(self.times.len() * 24);
        match self.kind {
            Kind::Gauge => {
                out.push_str("timestamp,value\n");
                for (t, v) in self.times.iter().zip(&self.values) {
                    out.push_str(&format!("{t},{v:.4}\n"));
                }
            }
            Kind::Errors => {
                out.push_str("timestamp,requests,errors\n");
                for (t, (r, e)) in self.times.iter().zip(&self.counts) {
                    out.push_str(&format!("{t},{r},{e}\n"));
                }
            }
        }
        out
    }
}

/// A small deterministic generator (SplitMix64): the corpus is the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    pub fn index(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-12);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Binomial(n, p): exact for small means, normal approximation for large ones.
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        let p = p.clamp(0.0, 1.0);
        let mean = n as f64 * p;
        if mean < 30.0 && n <= 2_000 {
            (0..n).filter(|_| self.uniform() < p).count() as u64
        } else if mean < 30.0 {
            // Poisson (Knuth) for a rare event in many trials.
            let limit = (-mean).exp();
            let mut k = 0;
            let mut prod = self.uniform();
            while prod > limit {
                k += 1;
                prod *= self.uniform();
            }
            k.min(n)
        } else {
            let sd = (mean * (1.0 - p)).sqrt();
            (mean + sd * self.normal()).round().clamp(0.0, n as f64) as u64
        }
    }
}

/// The time of day of row `i` as a fraction of a day.
fn day_phase(i: usize) -> f64 {
    (i % 288) as f64 / 288.0
}

/// A daily rhythm: 1 + amplitude · sin, peaking mid-afternoon.
fn rhythm(i: usize, amplitude: f64, phase: f64) -> f64 {
    1.0 + amplitude * (2.0 * std::f64::consts::PI * (day_phase(i) - 0.375 + phase)).sin()
}

fn times() -> Vec<i64> {
    (0..ROWS).map(|i| START + i as i64 * STEP).collect()
}

/// A gauge: level · rhythm + noise, with `edit` applied to each row (index, value, noise sd).
fn gauge(
    category: &'static str,
    seed: u64,
    rng: &mut Rng,
    windows: Vec<(usize, usize)>,
    mut edit: impl FnMut(usize, f64, f64, &mut Rng) -> f64,
) -> Labelled {
    let level = rng.range(50.0, 500.0);
    let amplitude = if rng.uniform() < 0.67 {
        rng.range(0.1, 0.35)
    } else {
        0.0
    };
    let sd = level * rng.range(0.02, 0.05);
    let values = (0..ROWS)
        .map(|i| {
            let clean = level * rhythm(i, amplitude, 0.0) + sd * rng.normal();
            edit(i, clean, sd, rng)
        })
        .collect();
    gauge_series(category, seed, values, windows)
}

fn gauge_series(
    category: &'static str,
    seed: u64,
    values: Vec<f64>,
    windows: Vec<(usize, usize)>,
) -> Labelled {
    Labelled {
        category,
        name: format!("{category}-{seed}"),
        kind: Kind::Gauge,
        times: times(),
        values,
        counts: Vec::new(),
        windows,
    }
}

/// An error series: traffic with a daily rhythm, errors binomial at `ratio(i)`.
fn errors(
    category: &'static str,
    seed: u64,
    rng: &mut Rng,
    traffic: f64,
    windows: Vec<(usize, usize)>,
    mut shape: impl FnMut(usize) -> (f64, f64),
) -> Labelled {
    let mut counts = Vec::with_capacity(ROWS);
    for i in 0..ROWS {
        // (traffic multiplier, error ratio)
        let (busy, ratio) = shape(i);
        let mean = traffic * rhythm(i, 0.4, 0.0) * busy;
        let requests = (mean + mean.sqrt() * rng.normal()).round().max(0.0) as u64;
        counts.push((requests, rng.binomial(requests, ratio)));
    }
    let values = counts
        .iter()
        .map(|&(r, e)| if r == 0 { 0.0 } else { e as f64 / r as f64 })
        .collect();
    Labelled {
        category,
        name: format!("{category}-{seed}"),
        kind: Kind::Errors,
        times: times(),
        values,
        counts,
        windows,
    }
}

/// Non-overlapping anomaly starts in the last `days` days, each followed by `gap` rows.
fn starts(rng: &mut Rng, n: usize, from: usize, gap: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    while out.len() < n {
        let s = rng.index(from, ROWS - gap);
        if out.iter().all(|&o| o.abs_diff(s) > gap) {
            out.push(s);
        }
    }
    out.sort_unstable();
    out
}

/// The categories, in report order.
pub const CATEGORIES: [&str; 12] = [
    "spike",
    "dip",
    "level shift",
    "ramp",
    "variance change",
    "seasonality change",
    "flat, rare noise",
    "long quiet",
    "error burst",
    "slow burn",
    "traffic drop",
    "low traffic",
];

/// Series per category.
pub const PER_CATEGORY: u64 = 6;

/// The whole labelled corpus (deterministic).
pub fn corpus() -> Vec<Labelled> {
    let mut out = Vec::new();
    for (c, category) in CATEGORIES.iter().enumerate() {
        for k in 0..PER_CATEGORY {
            let seed = 1_000 * (c as u64 + 1) + k;
            out.push(series(category, seed));
        }
    }
    out
}

fn series(category: &'static str, seed: u64) -> Labelled {
    let mut rng = Rng::new(seed);
    let late = 3 * 288;
    match category {
        "spike" | "dip" => {
            let at = starts(&mut rng, 3, late, 36);
            let sign = if category == "spike" { 1.0 } else { -1.0 };
            let size: Vec<f64> = at.iter().map(|_| rng.range(7.0, 14.0)).collect();
            let windows = at.iter().map(|&s| (s, s + 6)).collect();
            gauge(category, seed, &mut rng, windows, |i, v, sd, _| {
                match at.iter().position(|&s| s == i) {
                    Some(k) => v + sign * size[k] * sd,
                    None => v,
                }
            })
        }
        "level shift" => {
            let s = rng.index(late, 5 * 288);
            let shift = rng.range(5.0, 10.0) * if rng.uniform() < 0.5 { 1.0 } else { -1.0 };
            gauge(
                category,
                seed,
                &mut rng,
                vec![(s, s + 12)],
                |i, v, sd, _| {
                    if i >= s {
                        v + shift * sd
                    } else {
                        v
                    }
                },
            )
        }
        "ramp" => {
            let s = rng.index(late, 5 * 288);
            let len = rng.index(24, 48);
            let rise = rng.range(10.0, 16.0) * if rng.uniform() < 0.5 { 1.0 } else { -1.0 };
            gauge(
                category,
                seed,
                &mut rng,
                vec![(s, s + len)],
                |i, v, sd, _| {
                    let progress = (i.saturating_sub(s) as f64 / len as f64).min(1.0);
                    if i >= s {
                        v + rise * sd * progress
                    } else {
                        v
                    }
                },
            )
        }
        "variance change" => {
            let s = rng.index(late, 5 * 288);
            let factor = rng.range(3.0, 5.0);
            gauge(
                category,
                seed,
                &mut rng,
                vec![(s, s + 36)],
                |i, v, sd, rng| {
                    if i >= s {
                        v + (factor - 1.0) * sd * rng.normal()
                    } else {
                        v
                    }
                },
            )
        }
        "seasonality change" => {
            let level = rng.range(50.0, 500.0);
            let amplitude = rng.range(0.25, 0.4);
            let sd = level * rng.range(0.015, 0.03);
            let s = rng.index(late, 5 * 288);
            let phase_shift = rng.uniform() < 0.5;
            let values = (0..ROWS)
                .map(|i| {
                    let shape = if i < s {
                        rhythm(i, amplitude, 0.0)
                    } else if phase_shift {
                        rhythm(i, amplitude, 0.25)
                    } else {
                        rhythm(i, amplitude * 2.5, 0.0)
                    };
                    level * shape + sd * rng.normal()
                })
                .collect();
            gauge_series(category, seed, values, vec![(s, s + 48)])
        }
        "flat, rare noise" => {
            let level = rng.range(10.0, 1_000.0);
            let s = rng.index(late, 5 * 288);
            let jump = rng.range(0.3, 0.8) * if rng.uniform() < 0.5 { 1.0 } else { -1.0 };
            let spike = rng.uniform() < 0.5;
            let values = (0..ROWS)
                .map(|i| {
                    let blip = if rng.uniform() < 0.01 {
                        level * 0.02 * if rng.uniform() < 0.5 { 1.0 } else { -1.0 }
                    } else {
                        0.0
                    };
                    let event = (i == s || (!spike && i > s)) as u8 as f64 * level * jump;
                    level + blip + event
                })
                .collect();
            gauge_series(category, seed, values, vec![(s, s + 12)])
        }
        "long quiet" => {
            let s = rng.index(5 * 288, ROWS - 12);
            let size = rng.range(7.0, 10.0) * if rng.uniform() < 0.5 { 1.0 } else { -1.0 };
            gauge(category, seed, &mut rng, vec![(s, s + 6)], |i, v, sd, _| {
                if i == s {
                    v + size * sd
                } else {
                    v
                }
            })
        }
        "error burst" => {
            let traffic = rng.range(2_000.0, 20_000.0);
            let base = rng.range(0.005, 0.02);
            let at = starts(&mut rng, 2, late, 48);
            let lengths: Vec<usize> = at.iter().map(|_| rng.index(2, 7)).collect();
            let factors: Vec<f64> = at.iter().map(|_| rng.range(4.0, 15.0)).collect();
            let windows = at.iter().map(|&s| (s, s + 12)).collect();
            errors(category, seed, &mut rng, traffic, windows, |i| {
                for k in 0..at.len() {
                    if i >= at[k] && i < at[k] + lengths[k] {
                        return (1.0, (base * factors[k]).min(1.0));
                    }
                }
                (1.0, base)
            })
        }
        "slow burn" => {
            let traffic = rng.range(2_000.0, 20_000.0);
            let base = rng.range(0.005, 0.015);
            let s = rng.index(late, 5 * 288 - 100);
            let ramp = 72; // six hours
            let hold = 24;
            errors(
                category,
                seed,
                &mut rng,
                traffic,
                vec![(s, s + ramp + hold)],
                |i| {
                    if i < s || i >= s + ramp + hold {
                        (1.0, base)
                    } else {
                        let progress = ((i - s) as f64 / ramp as f64).min(1.0);
                        (1.0, base * (1.0 + 11.0 * progress))
                    }
                },
            )
        }
        "traffic drop" => {
            let traffic = rng.range(2_000.0, 20_000.0);
            let base = rng.range(0.005, 0.02);
            let drop = rng.index(late, late + 288);
            let burst = drop + rng.index(100, 250);
            let factor = rng.range(5.0, 12.0);
            errors(
                category,
                seed,
                &mut rng,
                traffic,
                vec![(burst, burst + 12)],
                |i| {
                    let busy = if i >= drop && i < drop + 72 { 0.1 } else { 1.0 };
                    let ratio = if i >= burst && i < burst + 4 {
                        base * factor
                    } else {
                        base
                    };
                    (busy, ratio)
                },
            )
        }
        "low traffic" => {
            let traffic = rng.range(20.0, 80.0);
            let base = rng.range(0.01, 0.03);
            let s = rng.index(late, ROWS - 24);
            errors(category, seed, &mut rng, traffic, vec![(s, s + 12)], |i| {
                if i >= s && i < s + 3 {
                    (1.0, 0.6)
                } else {
                    (1.0, base)
                }
            })
        }
        other => unreachable!("no generator for category {other}"),
    }
}

/// The raw score of one series at one threshold, with its null and perfect bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub raw: f64,
    pub null: f64,
    pub perfect: f64,
    pub detected: usize,
    pub missed: usize,
    pub false_positives: usize,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.raw += other.raw;
        self.null += other.null;
        self.perfect += other.perfect;
        self.detected += other.detected;
        self.missed += other.missed;
        self.false_positives += other.false_positives;
    }

    /// 0 for the null detector, 100 for the perfect one.
    pub fn normalised(&self) -> f64 {
        if self.perfect <= self.null {
            return 0.0;
        }
        100.0 * (self.raw - self.null) / (self.perfect - self.null)
    }
}

/// Scores one series' anomaly scores against its windows (the rules in the module docs).
pub fn tally(scores: &[f64], threshold: f64, windows: &[(usize, usize)]) -> Tally {
    let mut t = Tally {
        null: -(windows.len() as f64),
        perfect: windows.len() as f64,
        ..Tally::default()
    };
    let mut found = vec![false; windows.len()];
    for (i, &s) in scores.iter().enumerate().skip(WARM_UP) {
        if s < threshold {
            continue;
        }
        match windows.iter().position(|&(a, b)| i >= a && i < b) {
            Some(w) if !found[w] => {
                found[w] = true;
                let (a, b) = windows[w];
                t.raw += 1.0 - 0.5 * (i - a) as f64 / (b - a) as f64;
                t.detected += 1;
            }
            Some(_) => {}
            None => {
                t.raw -= FALSE_POSITIVE;
                t.false_positives += 1;
            }
        }
    }
    t.missed = found.iter().filter(|f| !**f).count();
    t.raw -= t.missed as f64;
    t
}

/// The score of a z-like distance, shared by the references: 0.5 at 4.5, 1 from 7 (the
/// detector's gauge mapping), so thresholds mean the same for all of them.
fn from_z(z: f64) -> f64 {
    ((z - 2.0) / 5.0).clamp(0.0, 1.0)
}

/// Reference: a windowed Gaussian (the last `window` values, anomalies included: mean and
/// standard deviation; the score grows with the z-score).
pub fn windowed_gaussian(values: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let (mut sum, mut sq) = (0.0, 0.0);
    for (i, &x) in values.iter().enumerate() {
        let n = i.min(window);
        let score = if n >= 12 {
            let mean = sum / n as f64;
            let var = (sq / n as f64 - mean * mean).max(0.0);
            let sd = var.sqrt().max(mean.abs() * 1e-6).max(1e-12);
            from_z((x - mean).abs() / sd)
        } else {
            0.0
        };
        out.push(score);
        sum += x;
        sq += x * x;
        if i >= window {
            let old = values[i - window];
            sum -= old;
            sq -= old * old;
        }
    }
    out
}

/// Reference: a rolling median and MAD of the last `window` values (anomalies included).
pub fn rolling_mad(values: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut buf: Vec<f64> = Vec::with_capacity(window);
    for (i, &x) in values.iter().enumerate() {
        let from = i.saturating_sub(window);
        let score = if i - from >= 12 {
            buf.clear();
            buf.extend_from_slice(&values[from..i]);
            let m = select_median(&mut buf);
            for v in buf.iter_mut() {
                *v = (*v - m).abs();
            }
            let mad = select_median(&mut buf);
            let scale = (1.4826 * mad).max(m.abs() * 1e-6).max(1e-12);
            from_z((x - m).abs() / scale)
        } else {
            0.0
        };
        out.push(score);
    }
    out
}

fn select_median(v: &mut [f64]) -> f64 {
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

/// The detector's anomaly scores for a series, through `apitree detect replay`'s code.
pub fn detector_scores(series: &Labelled, cfg: &ScoreConfig) -> Vec<f64> {
    replay::replay(&series.csv(), cfg)
        .expect("the corpus replays")
        .iter()
        .map(|r| r.anomaly_score)
        .collect()
}

/// The detectors compared.
pub const DETECTORS: [&str; 3] = ["apitree", "windowed Gaussian", "rolling median/MAD"];
/// Reference window: one day of 5-minute windows.
pub const REFERENCE_WINDOW: usize = 288;
/// The detector's threshold: its documented meaning of 0.5 (an anomalous window).
pub const DETECTOR_THRESHOLD: f64 = 0.5;

/// Scores of every detector for every series: `[detector][series][row]`.
pub fn run_all(corpus: &[Labelled], cfg: &ScoreConfig) -> Vec<Vec<Vec<f64>>> {
    vec![
        corpus.iter().map(|s| detector_scores(s, cfg)).collect(),
        corpus
            .iter()
            .map(|s| windowed_gaussian(&s.values, REFERENCE_WINDOW))
            .collect(),
        corpus
            .iter()
            .map(|s| rolling_mad(&s.values, REFERENCE_WINDOW))
            .collect(),
    ]
}

/// One detector's tallies per category (in [`CATEGORIES`] order) and overall.
pub fn tallies(corpus: &[Labelled], scores: &[Vec<f64>], threshold: f64) -> (Vec<Tally>, Tally) {
    let mut per = vec![Tally::default(); CATEGORIES.len()];
    let mut all = Tally::default();
    for (s, sc) in corpus.iter().zip(scores) {
        let t = tally(sc, threshold, &s.windows);
        let c = CATEGORIES
            .iter()
            .position(|c| *c == s.category)
            .expect("a known category");
        per[c].add(t);
        all.add(t);
    }
    (per, all)
}

/// The threshold (0.05 … 0.95) that gives a reference its best overall score: the references
/// are compared at their best, the detector at its documented 0.5.
pub fn best_threshold(corpus: &[Labelled], scores: &[Vec<f64>]) -> f64 {
    (1..=19)
        .map(|k| k as f64 * 0.05)
        .max_by(|a, b| {
            let sa = tallies(corpus, scores, *a).1.normalised();
            let sb = tallies(corpus, scores, *b).1.normalised();
            sa.total_cmp(&sb)
        })
        .unwrap_or(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_null_detector_scores_0_the_perfect_one_100_and_lateness_and_noise_cost() {
        let windows = [(400, 412), (900, 906)];
        let null = vec![0.0; ROWS];
        assert_eq!(tally(&null, 0.5, &windows).normalised(), 0.0);
        let mut perfect = vec![0.0; ROWS];
        perfect[400] = 1.0;
        perfect[900] = 1.0;
        assert_eq!(tally(&perfect, 0.5, &windows).normalised(), 100.0);
        // Late (the last row of the first window) earns 0.5 of 1.
        let mut late = perfect.clone();
        late[400] = 0.0;
        late[411] = 1.0;
        let t = tally(&late, 0.5, &windows);
        assert!(
            (t.raw - (1.0 + (1.0 - 0.5 * 11.0 / 12.0))).abs() < 1e-9,
            "{t:?}"
        );
        // Staying high after a window: every row costs.
        let mut sticky = perfect.clone();
        for s in sticky.iter_mut().take(950).skip(906) {
            *s = 1.0;
        }
        let t = tally(&sticky, 0.5, &windows);
        assert_eq!(t.false_positives, 44);
        assert!(t.normalised() < 0.0, "worse than never firing: {t:?}");
        // Detections in the warm-up day are not counted at all.
        let mut warm = perfect.clone();
        warm[10] = 1.0;
        assert_eq!(tally(&warm, 0.5, &windows).normalised(), 100.0);
        // A detector that fires everywhere is below the null detector.
        assert!(tally(&vec![1.0; ROWS], 0.5, &windows).normalised() < 0.0);
    }

    #[test]
    fn the_corpus_is_the_same_every_time_and_labels_every_series() {
        let a = corpus();
        let b = corpus();
        assert_eq!(a.len(), CATEGORIES.len() * PER_CATEGORY as usize);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.values, y.values);
            assert!(!x.windows.is_empty(), "{} has no labelled window", x.name);
            for &(s, e) in &x.windows {
                assert!(s >= WARM_UP && s < e && e <= ROWS, "{}: {s}..{e}", x.name);
            }
        }
    }

    /// The corpus through the replay path: the detector keeps its overall score and is at
    /// least level with both references in every category (see the table in docs/performance.md).
    #[test]
    fn the_detector_keeps_its_corpus_score() {
        let cfg = ScoreConfig::from(&crate::crd::gateway::DetectionSpec::default());
        let corpus = corpus();
        let scores = run_all(&corpus, &cfg);
        let (per, all) = tallies(&corpus, &scores[0], DETECTOR_THRESHOLD);
        for (c, t) in CATEGORIES.iter().zip(&per) {
            eprintln!("{c}: {:.1} ({} fp)", t.normalised(), t.false_positives);
        }
        eprintln!("overall: {:.1}", all.normalised());
        assert!(all.normalised() >= 75.0, "overall {:.1}", all.normalised());
        for reference in &scores[1..] {
            let t = best_threshold(&corpus, reference);
            let (rper, rall) = tallies(&corpus, reference, t);
            assert!(all.normalised() > rall.normalised());
            for (c, category) in CATEGORIES.iter().enumerate() {
                assert!(
                    per[c].normalised() >= rper[c].normalised(),
                    "{category}: {:.1} vs {:.1}",
                    per[c].normalised(),
                    rper[c].normalised()
                );
            }
        }
    }
}
