//! `apitree detect replay`: recorded windows through the same scoring and incident code, so
//! thresholds can be tuned on real history.
//!
//! Input is CSV with a header: `timestamp,requests,errors` (optional `auth_failures`, `p99_ms`)
//! for error-ratio series, or `timestamp,value` for a plain gauge. Timestamps are RFC 3339,
//! `YYYY-MM-DD HH:MM:SS` (UTC) or unix seconds. One output record per input row. Rows must be
//! sorted; gaps (missing windows) are allowed: baselines look windows up by time, the burn
//! windows decay by the time that passed, and after a gap of more than a day a series waits for
//! three windows before it judges again.

use serde::Serialize;

use super::incident::{IncidentEvent, Series, Verdict};
use super::score::ScoreConfig;

/// Why an input could not be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct ReplayError {
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> ReplayError {
    ReplayError {
        line,
        message: message.into(),
    }
}

/// The verdict of one signal in one row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SignalOutput {
    pub severity: &'static str,
    pub ratio: f64,
    pub p_value: f64,
    pub event: Option<&'static str>,
}

/// One output record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplayRow {
    pub timestamp: String,
    pub baseline: Option<f64>,
    pub ratio: f64,
    pub p_value: f64,
    /// The incident's current level: none, warning, high or critical.
    pub severity: &'static str,
    pub anomaly_score: f64,
    /// open, escalate, deescalate, resolve, or null.
    pub event: Option<&'static str>,
    /// Secondary signals (auth failures, p99 latency), when their columns are present.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub signals: std::collections::BTreeMap<&'static str, SignalOutput>,
}

/// Timestamp layouts without an offset, read as UTC.
const NAIVE_LAYOUTS: [&str; 4] = [
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
];

/// Unix seconds, RFC 3339 (`2026-11-29T07:00:00Z`, `…+09:00`, also with a space for the `T`)
/// or `YYYY-MM-DD HH:MM[:SS[.fff]]` without an offset, which is read as UTC.
pub fn parse_time(text: &str, line: usize) -> Result<i64, ReplayError> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(secs);
    }
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() {
            return Ok(secs as i64);
        }
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.timestamp());
    }
    if let Ok(d) = chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Ok(d.timestamp());
    }
    for layout in NAIVE_LAYOUTS {
        if let Ok(d) = chrono::NaiveDateTime::parse_from_str(t, layout) {
            return Ok(d.and_utc().timestamp());
        }
    }
    Err(err(
        line,
        format!(
            "timestamp {t:?} is neither RFC 3339 (2026-11-29T07:00:00Z), YYYY-MM-DD HH:MM:SS (UTC) nor unix seconds"
        ),
    ))
}

fn parse_count(text: &str, column: &str, line: usize) -> Result<u64, ReplayError> {
    text.trim().parse::<u64>().map_err(|_| {
        err(
            line,
            format!("{column} {:?} is not a whole number ≥ 0", text.trim()),
        )
    })
}

fn parse_float(text: &str, column: &str, line: usize) -> Result<f64, ReplayError> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| err(line, format!("{column} {:?} is not a number", text.trim())))
}

fn signal(v: &Verdict) -> SignalOutput {
    SignalOutput {
        severity: v.severity.label(),
        ratio: round(v.score.ratio),
        p_value: v.score.p_value,
        event: v.event.map(IncidentEvent::label),
    }
}

fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Replays a CSV document held in memory.
pub fn replay(csv: &str, cfg: &ScoreConfig) -> Result<Vec<ReplayRow>, ReplayError> {
    let mut out = Vec::new();
    replay_stream(csv.as_bytes(), cfg, |r| {
        out.push(r);
        Ok(())
    })
    .map_err(|e| match e {
        StreamError::Input(e) => e,
        StreamError::Output(e) => err(0, e.to_string()),
    })?;
    Ok(out)
}

/// Why a streamed replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The input is not a replayable CSV (the line says where), or could not be read.
    #[error("{0}")]
    Input(ReplayError),
    /// A verdict could not be written.
    #[error("{0}")]
    Output(#[source] std::io::Error),
}

/// Replays a CSV read line by line in bounded memory, handing each verdict to `emit` as soon
/// as its row is read.
pub fn replay_stream(
    input: impl std::io::BufRead,
    cfg: &ScoreConfig,
    mut emit: impl FnMut(ReplayRow) -> std::io::Result<()>,
) -> Result<(), StreamError> {
    let mut replayer: Option<Replayer> = None;
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| StreamError::Input(err(i + 1, e.to_string())))?;
        let row = match replayer.as_mut() {
            None => {
                replayer =
                    Replayer::header(i + 1, &line, cfg.clone()).map_err(StreamError::Input)?;
                continue;
            }
            Some(r) => r.row(i + 1, &line).map_err(StreamError::Input)?,
        };
        if let Some(r) = row {
            emit(r).map_err(StreamError::Output)?;
        }
    }
    if replayer.is_none() {
        return Err(StreamError::Input(err(
            1,
            "empty input; expected a header like timestamp,requests,errors",
        )));
    }
    Ok(())
}

/// Replays rows one at a time, so an input of any length is replayed in bounded memory and
/// each verdict can be written as soon as its row is read. Rows must come in ascending time
/// order, one per window: an unsorted or repeated timestamp would change every verdict after
/// it (a burst counted twice, or hidden), so it is refused with its line.
pub struct Replayer {
    cfg: ScoreConfig,
    columns: usize,
    ts: usize,
    measured: Measured,
    /// The requests column, for the auth-failure ratio.
    requests: Option<usize>,
    auth: Option<usize>,
    p99: Option<usize>,
    main: Series,
    auth_series: Series,
    latency_series: Series,
    /// The previous row's time and line.
    last: Option<(i64, usize)>,
}

/// What the main series of a replay is made of.
enum Measured {
    /// A `value` column: a gauge.
    Gauge(usize),
    /// `requests` and `errors` columns: an error ratio.
    Errors { requests: usize, errors: usize },
}

/// Timestamps are refused outside 1970..=9999 (unix seconds).
const LATEST_TIMESTAMP: i64 = 253_402_300_799;
/// A gauge value beyond this is not a measurement (and would overflow the scoring's sums).
const LARGEST_VALUE: f64 = 1e15;

impl Replayer {
    /// Reads the header line (line number `n`); `Ok(None)` for a blank or comment line, which
    /// comes before the header. A UTF-8 byte-order mark before it is skipped.
    pub fn header(n: usize, line: &str, cfg: ScoreConfig) -> Result<Option<Self>, ReplayError> {
        let line = line.strip_prefix('\u{feff}').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            return Ok(None);
        }
        let columns: Vec<String> = line
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        let col = |name: &str| columns.iter().position(|c| c == name);
        let ts = col("timestamp").ok_or_else(|| err(n, "the header needs a timestamp column"))?;
        let measured = match (col("value"), col("requests"), col("errors")) {
            (Some(g), _, _) => Measured::Gauge(g),
            (None, Some(requests), Some(errors)) => Measured::Errors { requests, errors },
            _ => {
                return Err(err(
                    n,
                    "the header needs either requests and errors columns, or a value column",
                ))
            }
        };
        Ok(Some(Self {
            cfg,
            columns: columns.len(),
            ts,
            measured,
            requests: col("requests"),
            auth: col("auth_failures"),
            p99: col("p99_ms"),
            main: Series::default(),
            auth_series: Series::default(),
            latency_series: Series::default(),
            last: None,
        }))
    }

    /// Replays line `n`; `Ok(None)` for a blank or comment line.
    pub fn row(&mut self, n: usize, line: &str) -> Result<Option<ReplayRow>, ReplayError> {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            return Ok(None);
        }
        let cfg = &self.cfg;
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != self.columns {
            return Err(err(
                n,
                format!(
                    "expected {} fields like the header, found {}",
                    self.columns,
                    fields.len()
                ),
            ));
        }
        let at = parse_time(fields[self.ts], n)?;
        if !(0..=LATEST_TIMESTAMP).contains(&at) {
            return Err(err(
                n,
                format!("timestamp {at} is outside 1970..9999; is it in seconds?"),
            ));
        }
        if let Some((before, m)) = self.last {
            if at <= before {
                return Err(err(
                    n,
                    format!(
                        "timestamp {} is not after line {m}'s; rows must be sorted by time, one per window (sort -t, -k1 the file first)",
                        fields[self.ts].trim()
                    ),
                ));
            }
        }
        self.last = Some((at, n));
        let verdict = match self.measured {
            Measured::Gauge(g) => {
                let value = parse_float(fields[g], "value", n)?;
                if value.abs() > LARGEST_VALUE {
                    return Err(err(
                        n,
                        format!("value {value:e} is beyond ±{LARGEST_VALUE:e}, not a measurement"),
                    ));
                }
                self.main.observe_gauge(at, value, cfg)
            }
            Measured::Errors { requests, errors } => {
                let req = parse_count(fields[requests], "requests", n)?;
                let errs = parse_count(fields[errors], "errors", n)?;
                if errs > req {
                    return Err(err(n, format!("errors ({errs}) exceed requests ({req})")));
                }
                self.main.observe_errors(at, req, errs, cfg)
            }
        };
        let mut signals = std::collections::BTreeMap::new();
        if let (Some(a), Some(r)) = (self.auth, self.requests) {
            let req = parse_count(fields[r], "requests", n)?;
            let failures = parse_count(fields[a], "auth_failures", n)?.min(req);
            signals.insert(
                "auth_failures",
                signal(&self.auth_series.observe_errors(at, req, failures, cfg)),
            );
        }
        if let Some(p) = self.p99 {
            let ms = parse_float(fields[p], "p99_ms", n)?;
            signals.insert(
                "p99_ms",
                signal(&self.latency_series.observe_gauge(at, ms, cfg)),
            );
        }
        Ok(Some(ReplayRow {
            timestamp: chrono::DateTime::from_timestamp(at, 0)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| at.to_string()),
            baseline: verdict.score.baseline.map(round),
            ratio: round(verdict.score.ratio),
            p_value: verdict.score.p_value,
            severity: verdict.severity.label(),
            anomaly_score: round(verdict.score.anomaly_score),
            event: verdict.event.map(IncidentEvent::label),
            signals,
        }))
    }
}

/// The human-readable line of a row.
pub fn text_line(r: &ReplayRow) -> String {
    format!(
        "{}  baseline {:>9}  ratio {:>8.2}x  p {:<10.3e}  {:<8}  score {:.2}{}",
        r.timestamp,
        r.baseline
            .map(|b| format!("{b:.5}"))
            .unwrap_or_else(|| "-".into()),
        r.ratio,
        r.p_value,
        r.severity,
        r.anomaly_score,
        r.event.map(|e| format!("  <- {e}")).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gateway::DetectionSpec;

    #[test]
    fn malformed_input_names_the_line_and_the_problem() {
        let cfg = ScoreConfig::from(&DetectionSpec::default());
        let bad = "timestamp,requests,errors\n1767225600,100,1\n1767225900,100\n";
        assert_eq!(replay(bad, &cfg).unwrap_err().line, 3);
        let bad = "timestamp,requests,errors\nyesterday,100,1\n";
        let e = replay(bad, &cfg).unwrap_err();
        assert!(
            e.to_string().starts_with("line 2: timestamp \"yesterday\""),
            "{e}"
        );
        let bad = "timestamp,requests,errors\n1767225600,10,20\n";
        assert!(replay(bad, &cfg).unwrap_err().message.contains("exceed"));
        assert!(replay("when,what\n", &cfg)
            .unwrap_err()
            .message
            .contains("timestamp"));
    }

    #[test]
    fn rfc3339_and_unix_timestamps_both_work() {
        let cfg = ScoreConfig::from(&DetectionSpec::default());
        let rows = replay(
            "timestamp,value\n2026-11-29T07:00:00Z,5\n1795935900,5\n",
            &cfg,
        )
        .unwrap();
        assert_eq!(rows[0].timestamp, "2026-11-29T07:00:00Z");
        assert_eq!(rows.len(), 2);
        for (text, secs) in [
            ("2026-11-29 07:00:00", 1_795_935_600),
            ("2026-11-29 07:00:00.250", 1_795_935_600),
            ("2026-11-29T07:00:00", 1_795_935_600),
            ("2026-11-29 07:00", 1_795_935_600),
            ("2026-11-29 16:00:00+09:00", 1_795_935_600),
            ("2026-11-29T16:00:00+09:00", 1_795_935_600),
        ] {
            assert_eq!(parse_time(text, 2), Ok(secs), "{text}");
        }
        for bad in ["2026-11-29", "29/11/2026 07:00", "2026-13-01 00:00:00"] {
            assert!(parse_time(bad, 7)
                .unwrap_err()
                .message
                .contains("YYYY-MM-DD HH:MM:SS"));
        }
    }

    /// Unsorted or repeated timestamps change every verdict after them: refused with the line.
    /// So are numbers no measurement has, and a byte-order mark is not part of the header.
    #[test]
    fn disorder_and_extreme_numbers_are_refused_with_their_line() {
        let cfg = ScoreConfig::from(&DetectionSpec::default());
        let cases = [
            (
                "timestamp,requests,errors\n60,100,1\n120,100,1\n90,100,1\n",
                4,
                "not after line 3",
            ),
            (
                "timestamp,requests,errors\n60,100,1\n60,100,1\n",
                3,
                "not after line 2",
            ),
            ("timestamp,value\n60,1e308\n", 2, "not a measurement"),
            ("timestamp,value\n1e308,1\n", 2, "outside 1970..9999"),
            ("timestamp,value\n-5,1\n", 2, "outside 1970..9999"),
            ("timestamp,requests,errors\n60,1e308,1\n", 2, "whole number"),
        ];
        for (csv, line, says) in cases {
            let e = replay(csv, &cfg).unwrap_err();
            assert_eq!(e.line, line, "{csv:?}: {e}");
            assert!(e.message.contains(says), "{csv:?}: {e}");
        }
        let bom = "\u{feff}timestamp,requests,errors\n60,100,1\n120,100,2\n";
        assert_eq!(replay(bom, &cfg).unwrap().len(), 2);
    }

    /// The streaming replayer gives what the whole-document one gives, row by row.
    #[test]
    fn rows_replayed_one_at_a_time_match_the_whole_document() {
        let cfg = ScoreConfig::from(&DetectionSpec::default());
        let mut csv = String::from("# recorded\ntimestamp,requests,errors\n");
        for i in 0..300 {
            let errors = if (200..230).contains(&i) { 400 } else { 10 };
            csv.push_str(&format!("{},{},{}\n", 1_700_000_000 + i * 60, 5000, errors));
        }
        let whole = replay(&csv, &cfg).unwrap();
        let mut streamed = Vec::new();
        let mut r: Option<Replayer> = None;
        for (i, line) in csv.lines().enumerate() {
            match r.as_mut() {
                None => r = Replayer::header(i + 1, line, cfg.clone()).unwrap(),
                Some(r) => streamed.extend(r.row(i + 1, line).unwrap()),
            }
        }
        assert_eq!(streamed, whole);
        assert!(whole.iter().any(|r| r.event == Some("open")));
    }
}
