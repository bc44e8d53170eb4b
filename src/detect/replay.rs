//! `apitree detect replay`: recorded windows through the same scoring and incident code, so
//! thresholds can be tuned on real history.
//!
//! Input is CSV with a header: `timestamp,requests,errors` (optional `auth_failures`, `p99_ms`)
//! for error-ratio series, or `timestamp,value` for a plain gauge. Timestamps are RFC 3339 or
//! unix seconds. One output record per input row.

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

fn parse_time(text: &str, line: usize) -> Result<i64, ReplayError> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(secs);
    }
    if let Ok(secs) = t.parse::<f64>() {
        if secs.is_finite() {
            return Ok(secs as i64);
        }
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp())
        .map_err(|_| {
            err(
                line,
                format!(
                    "timestamp {t:?} is neither RFC 3339 (2026-11-29T07:00:00Z) nor unix seconds"
                ),
            )
        })
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

/// Replays a CSV document.
pub fn replay(csv: &str, cfg: &ScoreConfig) -> Result<Vec<ReplayRow>, ReplayError> {
    let mut lines = csv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (header_idx, header) = lines.next().ok_or_else(|| {
        err(
            1,
            "empty input; expected a header like timestamp,requests,errors",
        )
    })?;
    let columns: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let col = |name: &str| columns.iter().position(|c| c == name);
    let ts = col("timestamp")
        .ok_or_else(|| err(header_idx + 1, "the header needs a timestamp column"))?;
    let gauge = col("value");
    let requests = col("requests");
    let errors = col("errors");
    if gauge.is_none() && (requests.is_none() || errors.is_none()) {
        return Err(err(
            header_idx + 1,
            "the header needs either requests and errors columns, or a value column",
        ));
    }
    let auth = col("auth_failures");
    let p99 = col("p99_ms");

    let mut main = Series::default();
    let mut auth_series = Series::default();
    let mut latency_series = Series::default();
    let mut out = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != columns.len() {
            return Err(err(
                n,
                format!(
                    "expected {} fields like the header, found {}",
                    columns.len(),
                    fields.len()
                ),
            ));
        }
        let at = parse_time(fields[ts], n)?;
        let verdict = match gauge {
            Some(g) => main.observe_gauge(at, parse_float(fields[g], "value", n)?, cfg),
            None => {
                let req = parse_count(fields[requests.expect("checked")], "requests", n)?;
                let errs = parse_count(fields[errors.expect("checked")], "errors", n)?;
                if errs > req {
                    return Err(err(n, format!("errors ({errs}) exceed requests ({req})")));
                }
                main.observe_errors(at, req, errs, cfg)
            }
        };
        let mut signals = std::collections::BTreeMap::new();
        if let (Some(a), Some(r)) = (auth, requests) {
            let req = parse_count(fields[r], "requests", n)?;
            let failures = parse_count(fields[a], "auth_failures", n)?.min(req);
            signals.insert(
                "auth_failures",
                signal(&auth_series.observe_errors(at, req, failures, cfg)),
            );
        }
        if let Some(p) = p99 {
            let ms = parse_float(fields[p], "p99_ms", n)?;
            signals.insert("p99_ms", signal(&latency_series.observe_gauge(at, ms, cfg)));
        }
        out.push(ReplayRow {
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
        });
    }
    Ok(out)
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
    }
}
