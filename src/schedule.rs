//! The periodic health sweep (tokio-cron-scheduler, every 15 minutes by default): for every
//! gateway with a database — is the database reachable, does its schema drift (fixed at once
//! under `driftPolicy: auto`, after noting what was found), and which rotated keys' grace periods ended (revoked). Results go
//! to the gateway's status (`status.drift`), Events and metrics. Runs never overlap: a run that
//! finds the previous one still going is skipped and counted as such.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::crd::gateway::{DriftPolicy, DriftSummary};

/// One gateway the sweep looks at.
#[derive(Debug, Clone)]
pub struct SweepTarget {
    pub gateway: String,
    pub database_url: String,
    pub policy: DriftPolicy,
}

/// What the sweep found for one gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepOutcome {
    pub gateway: String,
    pub at: DateTime<Utc>,
    pub drift: Option<DriftSummary>,
    /// Under `driftPolicy: auto`, the drift found before fixing it (None when there was none):
    /// security drift found is an incident even when the same sweep fixed it.
    pub found: Option<DriftSummary>,
    /// Objects fixed under `driftPolicy: auto`.
    pub fixed: Vec<String>,
    /// Prefixes of keys revoked because their grace period ended.
    pub revoked: Vec<String>,
    /// Why (part of) the sweep failed.
    pub problems: Vec<String>,
}

/// The sweep's metrics (registered in the operator's registry).
#[derive(Clone)]
pub struct SweepMetrics {
    /// Runs by result: ok, failed (some gateway had a problem), skipped (overlap).
    pub runs: IntCounterVec,
    /// Unix time of the last run with no problem.
    pub last_success: IntGauge,
}

impl SweepMetrics {
    pub fn register(registry: &Registry) -> Self {
        let runs = IntCounterVec::new(
            Opts::new(
                "apitree_operator_sweep_runs_total",
                "Health sweep runs by result: ok, failed, skipped (the previous run was still going).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let last_success = IntGauge::new(
            "apitree_operator_sweep_last_success_timestamp_seconds",
            "Unix time of the last health sweep that found no problem.",
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(runs.clone()));
        let _ = registry.register(Box::new(last_success.clone()));
        Self { runs, last_success }
    }
}

/// Sweeps one gateway's database.
pub async fn sweep_gateway(t: &SweepTarget, now: DateTime<Utc>) -> SweepOutcome {
    let mut out = SweepOutcome {
        gateway: t.gateway.clone(),
        at: now,
        drift: None,
        found: None,
        fixed: Vec::new(),
        revoked: Vec::new(),
        problems: Vec::new(),
    };
    let pool = match crate::db::connect(&t.database_url, 2).await {
        Ok(p) => p,
        Err(e) => {
            out.problems.push(e.to_string());
            return out;
        }
    };
    if t.policy != DriftPolicy::Off {
        if t.policy == DriftPolicy::Auto {
            match crate::drift::fix::check(&pool, false).await {
                Ok(report) if !report.in_sync() => {
                    out.found = Some(report.summary(now.to_rfc3339()));
                }
                Ok(_) => {}
                Err(e) => out.problems.push(format!("drift check: {e}")),
            }
            match crate::drift::fix::fix(
                &pool,
                false,
                false,
                "apitree health sweep (driftPolicy: auto)",
            )
            .await
            {
                Ok(r) => out.fixed = r.applied.into_iter().map(|i| i.object).collect(),
                Err(e) => out.problems.push(format!("drift fix: {e}")),
            }
        }
        match crate::drift::fix::check(&pool, false).await {
            Ok(report) => out.drift = Some(report.summary(now.to_rfc3339())),
            Err(e) => out.problems.push(format!("drift check: {e}")),
        }
    }
    match crate::db::keys::sweep_grace(&pool, now, "apitree health sweep").await {
        Ok(r) => out.revoked = r,
        Err(e) => out.problems.push(format!("grace expiry: {e}")),
    }
    pool.close().await;
    out
}

/// Runs sweeps one at a time.
pub struct Sweeper {
    running: tokio::sync::Mutex<()>,
    pub metrics: SweepMetrics,
}

impl Sweeper {
    pub fn new(metrics: SweepMetrics) -> Self {
        Self {
            running: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// Sweeps every target; None when the previous run is still going (skipped).
    pub async fn run(
        &self,
        targets: &[SweepTarget],
        now: DateTime<Utc>,
    ) -> Option<Vec<SweepOutcome>> {
        let Ok(_guard) = self.running.try_lock() else {
            self.metrics.runs.with_label_values(&["skipped"]).inc();
            tracing::warn!("health sweep skipped: the previous run is still going");
            return None;
        };
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            out.push(sweep_gateway(t, now).await);
        }
        if out.iter().all(|o| o.problems.is_empty()) {
            self.metrics.runs.with_label_values(&["ok"]).inc();
            self.metrics.last_success.set(now.timestamp());
        } else {
            self.metrics.runs.with_label_values(&["failed"]).inc();
        }
        Some(out)
    }
}

/// Starts a scheduler that calls `job` every `every`. Keep the returned scheduler alive; shut it
/// down to stop.
pub async fn every<F, Fut>(every: Duration, job: F) -> Result<JobScheduler, JobSchedulerError>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let scheduler = JobScheduler::new().await?;
    let job = Arc::new(job);
    scheduler
        .add(Job::new_repeated_async(every, move |_id, _lock| {
            let job = job.clone();
            Box::pin(async move { job().await })
        })?)
        .await?;
    scheduler.start().await?;
    Ok(scheduler)
}
