//! The periodic health sweep (tokio-cron-scheduler, every 15 minutes by default). For every
//! gateway: does each route's upstream answer (a configurable probe per route, and every API
//! registered in the gateway's database); and for gateways with a database — is it reachable,
//! does its schema drift (fixed at once under `driftPolicy: auto`, after noting what was
//! found), and which rotated keys' grace periods ended (revoked). The gateway's own endpoints
//! (its serving replicas' `/readyz`) are probed by its next pass, which has the gateway's TLS
//! settings. Results go to the gateway's status (`status.drift`, `status.probes`), Events,
//! incidents and metrics. Runs never overlap: a run that finds the previous one still going is
//! skipped and counted as such.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::crd::gateway::{probe_url, DriftPolicy, DriftSummary, UpstreamProbe};

/// One gateway the sweep looks at.
#[derive(Debug, Clone)]
pub struct SweepTarget {
    pub gateway: String,
    /// The gateway's database, when its spec names one.
    pub database_url: Option<String>,
    /// Why the database the spec names could not be resolved (its Secret unreadable): the
    /// sweep then reports a problem instead of taking the gateway for one without a database.
    pub unresolved: Option<String>,
    pub policy: DriftPolicy,
    /// How long the database keeps each kind of data.
    pub retention: crate::crd::gateway::RetentionSpec,
    /// The spec's routes' upstreams.
    pub upstreams: Vec<Upstream>,
}

/// A route's upstream and how to probe it.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub route: String,
    pub url: String,
    /// None: any HTTP answer counts as up.
    pub probe: Option<UpstreamProbe>,
}

/// One thing the sweep (or the pass after it) probed.
#[derive(Debug, Clone, PartialEq)]
pub struct Probed {
    /// The route whose upstream it is; None for the gateway's own endpoints.
    pub route: Option<String>,
    /// What was asked.
    pub target: String,
    /// Why it counts as down; None when it is up.
    pub down: Option<String>,
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
    /// Rows deleted by retention, by kind (only kinds with deletions).
    pub purged: std::collections::BTreeMap<&'static str, u64>,
    /// Upstreams probed (and, once the gateway's pass has run, its endpoints).
    pub probed: Vec<Probed>,
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

/// Sweeps one gateway: its upstreams, then its database.
pub async fn sweep_gateway(
    t: &SweepTarget,
    http: &reqwest::Client,
    now: DateTime<Utc>,
) -> SweepOutcome {
    let mut out = SweepOutcome {
        gateway: t.gateway.clone(),
        at: now,
        drift: None,
        found: None,
        fixed: Vec::new(),
        revoked: Vec::new(),
        purged: Default::default(),
        probed: Vec::new(),
        problems: Vec::new(),
    };
    let mut upstreams = t.upstreams.clone();
    if let Some(why) = &t.unresolved {
        out.problems.push(why.clone());
    }
    if let Some(url) = &t.database_url {
        match crate::db::connect(url, 2).await {
            Ok(pool) => {
                sweep_database(t, &pool, now, &mut out, &mut upstreams).await;
                pool.close().await;
            }
            Err(e) => out.problems.push(e.to_string()),
        }
    }
    out.probed = futures::future::join_all(upstreams.iter().map(|u| probe_upstream(http, u))).await;
    out
}

async fn sweep_database(
    t: &SweepTarget,
    pool: &sqlx::PgPool,
    now: DateTime<Utc>,
    out: &mut SweepOutcome,
    upstreams: &mut Vec<Upstream>,
) {
    if t.policy != DriftPolicy::Off {
        if t.policy == DriftPolicy::Auto {
            match crate::drift::fix::check(pool, false).await {
                Ok(report) if !report.in_sync() => {
                    out.found = Some(report.summary(now.to_rfc3339()));
                }
                Ok(_) => {}
                Err(e) => out.problems.push(format!("drift check: {e}")),
            }
            match crate::drift::fix::fix(
                pool,
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
        match crate::drift::fix::check(pool, false).await {
            Ok(report) => out.drift = Some(report.summary(now.to_rfc3339())),
            Err(e) => out.problems.push(format!("drift check: {e}")),
        }
    }
    match crate::db::keys::sweep_grace(pool, now, "apitree health sweep").await {
        Ok(r) => out.revoked = r,
        Err(e) => out.problems.push(format!("grace expiry: {e}")),
    }
    let purged =
        crate::db::retention::apply(pool, &t.retention, now, "apitree health sweep (retention)")
            .await;
    out.purged = purged.deleted.into_iter().filter(|(_, n)| *n > 0).collect();
    out.problems.extend(purged.problems);
    // APIs registered in the database are routes of a database-mode proxy.
    let registered: Result<Vec<(String, String)>, _> =
        sqlx::query_as("SELECT name, upstream_url FROM apis ORDER BY name")
            .fetch_all(pool)
            .await;
    match registered {
        Ok(apis) => {
            for (route, url) in apis {
                if !upstreams.iter().any(|u| u.route == route) {
                    upstreams.push(Upstream {
                        route,
                        url,
                        probe: None,
                    });
                }
            }
        }
        Err(e) => out.problems.push(format!("registered APIs: {e}")),
    }
}

/// Probes one upstream: with a probe, `GET path` must answer its status in its time; without,
/// any HTTP answer within 5 s counts as up (a 5xx too: it is the API's answer, not an outage
/// of the address).
async fn probe_upstream(http: &reqwest::Client, u: &Upstream) -> Probed {
    let (url, expect, timeout) = match &u.probe {
        Some(p) => match probe_url(&u.url, &p.path) {
            Ok(url) => (url, Some(p.expect_status), p.timeout.as_std()),
            Err(e) => {
                return Probed {
                    route: Some(u.route.clone()),
                    target: without_credentials(&u.url),
                    down: Some(e),
                }
            }
        },
        None => (u.url.clone(), None, Duration::from_secs(5)),
    };
    let answer = http.get(&url).timeout(timeout).send().await;
    // Upstream URLs may carry credentials (user:password@): never in status, Events or Slack.
    let shown = without_credentials(&url);
    let down = match (answer, expect) {
        (Ok(r), Some(want)) if r.status().as_u16() != want => Some(format!(
            "GET {shown} answered {}, expected {want}",
            r.status().as_u16()
        )),
        (Ok(_), _) => None,
        (Err(e), _) if e.is_timeout() => Some(format!(
            "GET {shown} had no answer within {} ms",
            timeout.as_millis()
        )),
        (Err(e), _) => Some(format!(
            "GET {shown}: {}",
            crate::tls::error_chain(&e.without_url())
        )),
    };
    Probed {
        route: Some(u.route.clone()),
        target: shown,
        down,
    }
}

/// `url` without its user name and password.
pub fn without_credentials(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// The sweep's HTTP client: no redirects (a probe stays on its upstream, and an
/// `expectStatus` of 3xx means what it says) and a bounded connect.
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default()
}

/// Gateways swept at once.
const SWEEP_PARALLEL: usize = 8;

/// Runs sweeps one at a time.
pub struct Sweeper {
    running: tokio::sync::Mutex<()>,
    pub metrics: SweepMetrics,
    http: reqwest::Client,
}

impl Sweeper {
    pub fn new(metrics: SweepMetrics, http: reqwest::Client) -> Self {
        Self {
            running: tokio::sync::Mutex::new(()),
            metrics,
            http,
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
        // Several gateways at once (each probe is bounded by its timeout, at most a minute),
        // so one gateway's slow upstreams cannot hold up every other gateway's sweep.
        use futures::StreamExt;
        let out: Vec<SweepOutcome> = futures::stream::iter(targets.to_vec())
            .map(|t| {
                let http = self.http.clone();
                async move { sweep_gateway(&t, &http, now).await }
            })
            .buffered(SWEEP_PARALLEL)
            .collect()
            .await;
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
