//! The console watched like a gateway: its `/metrics` are scraped every detection window and
//! scored by the same detector, under the name [`CONSOLE`]. Every refused sign-in and session
//! counts in `apitree_console_auth_failures_total`, every answer in
//! `apitree_console_responses_total`, so a password-guessing run is an auth-failure spike
//! (and a failing console an error-ratio one) that opens an incident and reaches Slack like
//! any gateway's, with the same buttons.

use std::sync::Arc;
use std::time::Duration;

use crate::crd::gateway::DetectionSpec;
use crate::detect::engine::{Detector, IncidentStore, NoticeContext};
use crate::detect::score::ScoreConfig;
use crate::detect::source::ScrapeSource;
use crate::detect::IncidentNotice;
use crate::notify::slack::Interaction;
use crate::notify::Notifier;

/// The name the console's incidents carry where a gateway's name would be.
pub const CONSOLE: &str = "apitree-console";

/// Scrapes one console and scores what happened since the last scrape.
pub struct ConsoleWatch {
    source: ScrapeSource,
    detector: Detector,
}

impl ConsoleWatch {
    /// Watches `console` with `spec`'s scoring.
    pub fn new(
        console: &super::http::ConsoleLink,
        spec: &DetectionSpec,
        store: Arc<IncidentStore>,
        notifier: Arc<Notifier>,
    ) -> Result<Self, String> {
        let metrics = console
            .url
            .join("metrics")
            .map_err(|e| format!("{}: {e}", console.url))?;
        Ok(ConsoleWatch {
            source: ScrapeSource::with_targets(vec![crate::detect::source::ScrapeTarget {
                name: metrics.to_string(),
                url: metrics.to_string(),
                client: console.client.clone(),
            }]),
            detector: Detector::new(
                CONSOLE,
                ScoreConfig::from(spec),
                NoticeContext::default(),
                store,
                notifier,
            ),
        })
    }

    /// Scrapes and scores the window ending now, starting at `at` (unix seconds). The first
    /// call only primes the counters.
    pub async fn tick(&mut self, at: i64) -> Result<Vec<IncidentNotice>, String> {
        let Some(window) = self.source.window().await.map_err(|e| e.to_string())? else {
            return Ok(Vec::new());
        };
        self.detector
            .observe(at, &window)
            .await
            .map_err(|e| e.to_string())
    }

    /// Applies an Acknowledge / Silence press if it names one of the console's incidents.
    pub async fn respond(&mut self, press: &Interaction, now: i64) -> bool {
        let Some(response) = press.action.response(now) else {
            return false;
        };
        match self
            .detector
            .respond(press.incident, &press.user_id, response)
            .await
        {
            Ok(found) => found.is_some(),
            Err(e) => {
                tracing::error!("cannot record a response to a console incident: {e}");
                false
            }
        }
    }
}

/// Runs `watch` every `every` while `leads()` (only the leader scores and posts), logging
/// scrape failures once per change between failing and working.
pub async fn run(
    watch: Arc<tokio::sync::Mutex<ConsoleWatch>>,
    every: Duration,
    leads: impl Fn() -> bool,
) {
    let mut failing = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !leads() {
            continue;
        }
        let at = chrono::Utc::now().timestamp() - every.as_secs() as i64;
        match watch.lock().await.tick(at).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("the console's metrics are read again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("cannot watch the console's sign-ins: {e}");
            }
            Err(_) => {}
        }
    }
}
