//! The detector: scores error ratios (and gauges) of each watched series against a baseline and
//! runs an incident per (gateway, route, signal) with hysteresis.
//!
//! Everything here decides in pure functions with the time passed in; sources (scrape /
//! Prometheus), persistence and notifications sit at the edges.

pub mod engine;
pub mod incident;
pub mod replay;
pub mod score;
pub mod source;

pub use incident::{IncidentEvent, Series, Tracker, Verdict};
pub use score::{Score, ScoreConfig, Severity};
