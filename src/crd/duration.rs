//! Human durations in resource specs (`30s`, `5m`, `1h30m`, `14d`).
//!
//! Go's duration syntax has no days, and credential ages are naturally written in days, so the
//! grammar is ours: one or more `<integer><unit>` pairs with units `ms`, `s`, `m`, `h`, `d`.

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the CRD schema enforces; kept equal to what [`KubeDuration::from_str`] accepts.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A duration written as text in a spec, kept in the user's spelling for round trips.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeDuration {
    text: String,
    value: Duration,
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {text:?}: {reason}; write it as one or more <number><unit> pairs with units ms, s, m, h, d (e.g. \"90s\", \"1h30m\", \"14d\")")]
pub struct ParseDurationError {
    text: String,
    reason: &'static str,
}

impl KubeDuration {
    /// The parsed value.
    pub fn as_std(&self) -> Duration {
        self.value
    }

    /// Builds a duration from milliseconds, spelled in seconds when exact.
    pub fn from_millis(ms: u64) -> Self {
        if ms.is_multiple_of(1000) {
            return Self::from_secs(ms / 1000);
        }
        Self {
            text: format!("{ms}ms"),
            value: Duration::from_millis(ms),
        }
    }

    /// Builds a duration from whole seconds, spelled in the largest exact unit.
    pub fn from_secs(secs: u64) -> Self {
        let text = match secs {
            0 => "0s".to_string(),
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3_600 == 0 => format!("{}h", s / 3_600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        };
        Self {
            text,
            value: Duration::from_secs(secs),
        }
    }
}

impl FromStr for KubeDuration {
    type Err = ParseDurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDurationError {
            text: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(err("it is empty"));
        }
        let bytes = text.as_bytes();
        let mut total = Duration::ZERO;
        let mut i = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(err("a unit must follow a number"));
            }
            let number: u64 = text[start..i]
                .parse()
                .map_err(|_| err("a number is too large"))?;
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit_ms: u64 = match &text[unit_start..i] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" => return Err(err("a number has no unit")),
                _ => return Err(err("unknown unit")),
            };
            let part = number
                .checked_mul(unit_ms)
                .ok_or_else(|| err("it is too large"))?;
            total = total
                .checked_add(Duration::from_millis(part))
                .ok_or_else(|| err("it is too large"))?;
        }
        Ok(Self {
            text: text.to_string(),
            value: total,
        })
    }
}

impl fmt::Display for KubeDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for KubeDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for KubeDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for KubeDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_compound_durations() {
        let d: KubeDuration = "1h30m".parse().unwrap();
        assert_eq!(d.as_std(), Duration::from_secs(5_400));
        assert_eq!(d.to_string(), "1h30m");
        let d: KubeDuration = "14d".parse().unwrap();
        assert_eq!(d.as_std(), Duration::from_secs(14 * 86_400));
        let d: KubeDuration = "250ms".parse().unwrap();
        assert_eq!(d.as_std(), Duration::from_millis(250));
    }

    #[test]
    fn refuses_malformed_durations_with_a_hint() {
        for bad in ["", "5", "m", "5y", "1.5h", "-3s", "5 m"] {
            let err = bad.parse::<KubeDuration>().unwrap_err().to_string();
            assert!(err.contains("e.g."), "{bad:?}: {err}");
        }
    }

    #[test]
    fn from_secs_uses_largest_exact_unit() {
        assert_eq!(KubeDuration::from_secs(86_400).to_string(), "1d");
        assert_eq!(KubeDuration::from_secs(90).to_string(), "90s");
        assert_eq!(KubeDuration::from_secs(300).to_string(), "5m");
    }
}
