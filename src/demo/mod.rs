//! `apitree demo`: the whole product on one machine with embedded defaults, no cluster, database
//! or Slack. A sample API, a gateway on the local platform and synthetic clients (valid and
//! invalid keys); then a good revision through the gate, an error burst the detector escalates
//! 3x → 5x → 10x and resolves, and two bad revisions the gate refuses (a broken upstream caught
//! by smoke, a flaky one caught by analysis). Everything it started stops before it returns.
//!
//! With a database (`--database-url`, an empty one it migrates and marks as the demo's) the
//! gateway names it: the gate's schema check runs for real, incidents and the outbox are kept
//! there, and the tour adds a drift step — tenant isolation switched off in the database, found
//! by the health sweep (a critical incident), fixed by it (audited) and resolved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::net::TcpListener;

mod sample_api;
pub use sample_api::{start_sample_api, SampleApi};

use crate::crd::gateway::{ApiGatewaySpec, GatewayPhase, KeyScope, SecretKeyRef};
use crate::detect::engine::IncidentStore;
use crate::entities::keys::{ApiKey, Pepper};
use crate::entities::{KeyEntry, OrgEntry};
use crate::notify::slack::console_or_slack;
use crate::notify::Notifier;
use crate::operator::gateway::rollout::{reconcile, Context, Managed};
use crate::operator::http::HttpState;
use crate::platform::local::{LocalPlatform, LocalSecrets};
use crate::platform::Platform;
use crate::proxy::config::ProxyConfig;

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Leave the gateway, the sample API and the status page up after the tour (until Ctrl-C).
    pub keep_running: bool,
    /// Slack channel for notifications when `SLACK_BOT_TOKEN` is set.
    pub slack_channel: Option<String>,
    /// Address of the status page with `keep_running`.
    pub http: String,
    /// PostgreSQL for the gateway and the tour's state (empty, or an earlier demo's).
    pub database_url: Option<String>,
}

/// Marks a database as the demo's (`COMMENT ON DATABASE`): the demo switches tenant isolation
/// off in it for a moment, so it only ever uses an empty database or one it marked.
const DEMO_MARK: &str = "apitree demo database: the demo switches tenant isolation off in it";

/// The demo's database: migrated, marked, and the state store of the tour.
pub struct DemoDatabase {
    pub url: String,
    pub pool: sqlx::PgPool,
}

impl DemoDatabase {
    /// Connects, refuses a database that holds anything but an earlier demo's data, migrates
    /// it to this release and marks it.
    pub async fn prepare(url: &str) -> Result<Self, DemoError> {
        let fail = |reason: String| DemoError::Start {
            what: "database",
            reason,
        };
        let pool = crate::db::connect(url, 4)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (name, mark, tables): (String, Option<String>, i64) = sqlx::query_as(
            "SELECT current_database(),
                    shobj_description((SELECT oid FROM pg_database WHERE datname = current_database()), 'pg_database'),
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                       AND n.nspname NOT LIKE 'pg\\_%' AND c.relkind IN ('r', 'p', 'v', 'm', 'f'))",
        )
        .fetch_one(&pool)
        .await
        .map_err(|e| fail(e.to_string()))?;
        if tables > 0 && mark.as_deref() != Some(DEMO_MARK) {
            return Err(fail(format!(
                "database {name} already holds tables or views and is not one an earlier demo made; the demo switches tenant isolation off in its database for a moment, so give it an empty one of its own (createdb apitree_demo, then --database-url postgres://…/apitree_demo)"
            )));
        }
        // Marked first: a role that cannot mark the database (it must own it) is told so
        // before anything is created in it.
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "COMMENT ON DATABASE {quoted} IS '{DEMO_MARK}'"
        )))
        .execute(&pool)
        .await
        .map_err(|e| {
            fail(format!(
                "cannot mark database {name} as the demo's ({e}); create it as the user the demo connects as"
            ))
        })?;
        crate::db::migrate(&pool, &name)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            url: url.to_string(),
            pool,
        })
    }
}

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the demo's {what}: {reason}")]
    Start { what: &'static str, reason: String },
    #[error("the demo got stuck at \"{stage}\" (gateway phase {phase}); this is a bug, please report it with the log above")]
    Stuck { stage: &'static str, phase: String },
}

/// The JSON summary `apitree demo --format json` prints.
pub fn summary(m: &Managed) -> Value {
    let runs: Vec<Value> = m
        .runtime
        .runs
        .iter()
        .map(|r| {
            json!({
                "revision": r.revision,
                "outcome": r.outcome,
                "reason": r.reason,
                "checks": r.checks.iter().map(|c| json!({
                    "name": c.name,
                    "phase": c.phase,
                    "observed": c.observed,
                    "threshold": c.threshold,
                    "reason": c.reason,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "gate_runs": runs,
        "incidents": m.runtime.incidents,
        "notifications": m.runtime.notifications,
        "drift": m.status.drift,
    })
}

/// A port nothing listens on: the "broken upstream" of a bad revision.
async fn closed_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l.local_addr().map(|a| a.port()).unwrap_or(9),
        Err(_) => 9,
    }
}

/// The demo gateway's spec; `{weather}` and `{fx}` are upstream base URLs.
const SPEC: &str = r#"
replicas: 2
proxy:
  routes:
  - name: weather
    pathPrefix: /weather/
    upstream: "{weather}"
    timeout: 5s
  - name: fx
    pathPrefix: /fx/
    upstream: "{fx}"
  tiers:
  - name: standard
    perKey: { burst10s: 100000, perMinute: 600000, perDay: 100000000 }
    perOrg: { burst10s: 100000, perMinute: 600000, perDay: 100000000 }
  defaultTier: standard
gate:
  rolloutDeadline: 20s
  observationWindow: 4s
  minSamples: 100
  # Green serves ~450 requests in a window at the sample API's 1.1% background errors: one
  # percentage point is about two standard deviations of chance there (by a Poisson estimate a
  # good revision fails 1-2.5% of runs), three is over six. The bad revisions add 10 points or more.
  maxErrorRatioIncrease: 0.03
  autoPromote: true
  rollbackWindow: 6s
  smoke:
  - name: weather-today
    path: /weather/today
    apiKey: { name: demo-keys, key: live }
detection:
  window: 2s
  minRequests: 100
  resolveAfterWindows: 2
"#;

/// The demo gateway's spec with its routes pointing at `weather` and `fx`.
pub fn spec(weather: &str, fx: &str) -> ApiGatewaySpec {
    let text = SPEC.replace("{weather}", weather).replace("{fx}", fx);
    // The embedded spec is part of the binary and covered by a test.
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("embedded demo spec: {e}"))
}

/// Synthetic clients: 8 loops of GETs, three in four to `/weather/today`, the rest to
/// `/fx/usd-krw`, 3% with an invalid key; a third of the requests go to the preview endpoint
/// while `preview` holds one, so green has traffic to be judged on. They stop when `stop` is set.
pub fn start_traffic(
    active: String,
    preview: Arc<RwLock<Option<String>>>,
    key: String,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(16)
        .build()
        .unwrap_or_default();
    (0..8u64)
        .map(|worker| {
            let (client, active, preview, key, stop) = (
                client.clone(),
                active.clone(),
                preview.clone(),
                key.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    n += 8;
                    let base = match preview.read().map(|p| p.clone()) {
                        Ok(Some(p)) if n % 3 == 0 => p,
                        _ => active.clone(),
                    };
                    let path = if n % 4 == 0 {
                        "/fx/usd-krw"
                    } else {
                        "/weather/today"
                    };
                    let presented = if n % 33 == 0 {
                        "at_live_thisKeyDoesNotExist000000000000000".to_string()
                    } else {
                        key.clone()
                    };
                    let _ = client
                        .get(format!("{base}{path}"))
                        .bearer_auth(presented)
                        .send()
                        .await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect()
}

/// A gateway on the local platform driven by hand: the demo's stages and the end-to-end tests.
pub struct Tour {
    pub m: Managed,
    pub ctx: Context<LocalPlatform>,
    /// The preview URL while a gate runs, for synthetic clients.
    pub preview: Arc<RwLock<Option<String>>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Tour {
    pub fn new(m: Managed, ctx: Context<LocalPlatform>) -> Self {
        Self {
            m,
            ctx,
            preview: Arc::new(RwLock::new(None)),
            background: Vec::new(),
        }
    }

    /// One reconcile pass now; publishes the preview URL while a gate runs.
    pub async fn tick(&mut self) {
        if let Err(e) = reconcile(&mut self.m, &self.ctx, Timestamp::now()).await {
            tracing::debug!("pass stopped early: {e}");
        }
        let gating = matches!(
            self.m.status.phase,
            Some(GatewayPhase::Gating | GatewayPhase::AwaitingApproval)
        );
        let url = if gating {
            self.ctx.platform.preview_url(&self.m.name, false).await
        } else {
            None
        };
        if let Ok(mut p) = self.preview.write() {
            *p = url;
        }
    }

    /// Ticks every 250 ms until `done` or `limit` passes.
    pub async fn until(
        &mut self,
        stage: &'static str,
        limit: Duration,
        done: impl Fn(&Managed) -> bool,
    ) -> Result<(), DemoError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.tick().await;
            if done(&self.m) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DemoError::Stuck {
                    stage,
                    phase: self
                        .m
                        .status
                        .phase
                        .map(|p| format!("{p:?}"))
                        .unwrap_or_else(|| "none".into()),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A new spec, as if the resource had been edited.
    pub fn set_spec(&mut self, spec: ApiGatewaySpec) {
        let generation = self.m.generation + 1;
        self.m.update_spec(spec, generation);
    }
}

/// `--keep-running`: the gateway, its clients and the status page stay up until Ctrl-C.
async fn keep_running(tour: &mut Tour, addr: &str) -> Result<(), std::io::Error> {
    let listener = TcpListener::bind(addr).await?;
    let state = Arc::new(HttpState::new(tour.ctx.metrics.clone(), None));
    let server = crate::operator::http::spawn(listener, state.clone(), None);
    let url = tour.ctx.platform.active_url(&tour.m.name).await;
    eprintln!(
        "\nkept running: status page http://{addr}/, gateway {}; Ctrl-C stops everything",
        url.as_deref().unwrap_or("-")
    );
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tour.tick().await;
        let url = tour.ctx.platform.active_url(&tour.m.name).await;
        state.publish(vec![tour.m.view(url)]);
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    server.stop().await;
    Ok(())
}

/// A local-platform context with one org (`acme`), one live API key (returned, and resolvable
/// as Secret `demo-keys`/`live` for smoke probes) and a fresh random pepper; with `database`,
/// Secret `demo-db`/`url` resolves to its URL and incidents are kept in it.
pub fn local_context(
    notifier: Arc<Notifier>,
    database: Option<&DemoDatabase>,
) -> Result<(Context<LocalPlatform>, ApiKey), DemoError> {
    let mut pepper_bytes = [0u8; 32];
    rand::fill(&mut pepper_bytes);
    let pepper = Pepper::new(pepper_bytes.to_vec()).map_err(|e| DemoError::Start {
        what: "key pepper",
        reason: e.to_string(),
    })?;
    let key = ApiKey::generate(KeyScope::Live);
    let base = ProxyConfig {
        orgs: vec![OrgEntry {
            id: "acme".into(),
            name: "ACME Travel".into(),
        }],
        keys: vec![KeyEntry {
            id: None,
            prefix: key.prefix().to_string(),
            hash: pepper.hash(&key).to_hex(),
            org: "acme".into(),
            scope: KeyScope::Live,
            tier: None,
            daily_quota: None,
            expires_at: None,
            grace_until: None,
            revoked: false,
        }],
        shutdown_grace: crate::crd::duration::KubeDuration::from_secs(1),
        ..ProxyConfig::default()
    };
    let platform = Arc::new(LocalPlatform::new(
        LocalSecrets {
            pepper,
            master_keys: None,
        },
        None,
    ));
    let secret_key = key.expose_secret().to_string();
    let database_url = database.map(|d| d.url.clone());
    let store = match database {
        Some(d) => IncidentStore::Postgres(d.pool.clone()),
        None => IncidentStore::memory(),
    };
    let ctx = Context {
        platform,
        notifier,
        store: Arc::new(store),
        base,
        master_keys: None,
        secrets: Arc::new(
            move |r: &SecretKeyRef| match (r.name.as_str(), r.key.as_str()) {
                ("demo-keys", "live") => Some(secret_key.clone()),
                ("demo-db", "url") => database_url.clone(),
                _ => None,
            },
        ),
        secret_versions: vec![("demo-keys".into(), "1".into())],
        default_image: format!("apitree:{}", env!("CARGO_PKG_VERSION")),
        http: reqwest::Client::new(),
        status_url: None,
        metrics: Arc::new(crate::operator::metrics::OperatorMetrics::new()),
        agents: None,
    };
    Ok((ctx, key))
}

/// Runs the tour and returns the gateway as it ended (its runs, incidents and notifications).
pub async fn run(opts: DemoOptions) -> Result<Managed, DemoError> {
    let database = match &opts.database_url {
        Some(url) => Some(DemoDatabase::prepare(url).await?),
        None => None,
    };
    let api = start_sample_api().await?;
    let upstream = format!("http://{}", api.addr);
    let channel = opts.slack_channel.as_deref().unwrap_or("apitree-demo");
    let outbox = match &database {
        Some(d) => crate::notify::outbox::Outbox::postgres_for(d.pool.clone(), "demo"),
        None => crate::notify::outbox::Outbox::memory(),
    };
    let (notifier, delivery) = console_or_slack(channel, Arc::new(outbox), Arc::new(|| true));
    let (ctx, key) = local_context(Arc::new(notifier), database.as_ref())?;
    let platform = ctx.platform.clone();
    let mut spec = spec(&format!("{upstream}/weather/"), &format!("{upstream}/fx/"));
    if database.is_some() {
        spec.database = Some(SecretKeyRef {
            name: "demo-db".into(),
            key: "url".into(),
        });
    }
    let m = Managed::new(
        "demo",
        spec,
        1,
        ctx.notifier.clone(),
        ctx.store.clone(),
        None,
    );
    let mut tour = Tour::new(m, ctx);
    let stop = Arc::new(AtomicBool::new(false));
    let result = tour_steps(
        &mut tour,
        &api,
        &upstream,
        &key,
        database.as_ref(),
        stop.clone(),
        opts.keep_running,
    )
    .await;
    if opts.keep_running && result.is_ok() {
        if let Err(e) = keep_running(&mut tour, &opts.http).await {
            tracing::error!("{e}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in std::mem::take(&mut tour.background) {
        let _ = t.await;
    }
    platform.shutdown().await;
    drop(api);
    if let Some(delivery) = delivery {
        delivery.finish().await;
    }
    result.map(|()| tour.m)
}

#[allow(clippy::too_many_arguments)]
async fn tour_steps(
    tour: &mut Tour,
    api: &SampleApi,
    upstream: &str,
    key: &ApiKey,
    database: Option<&DemoDatabase>,
    stop: Arc<AtomicBool>,
    keep_traffic: bool,
) -> Result<(), DemoError> {
    let stages = if database.is_some() { 6 } else { 5 };
    let mut at = 0;
    let mut stage = |text: &str| {
        at += 1;
        eprintln!("\n== {at}/{stages} {text}");
    };
    stage("first deploy: revision on blue behind the front listener");
    tour.until("first deploy", Duration::from_secs(20), |m| {
        m.status.phase == Some(GatewayPhase::Stable)
    })
    .await?;
    let active = tour
        .ctx
        .platform
        .active_url("demo")
        .await
        .unwrap_or_default();
    eprintln!("gateway at {active}; synthetic clients start (3% with an invalid key)");
    let traffic = start_traffic(
        active,
        tour.preview.clone(),
        key.expose_secret().to_string(),
        stop.clone(),
    );

    stage("a good revision (fx gets a 10s timeout) goes through the 5-check gate");
    let mut good = tour.m.spec.clone();
    good.proxy.routes[1].timeout = Some(crate::crd::duration::KubeDuration::from_secs(10));
    tour.set_spec(good.clone());
    tour.until("good revision", Duration::from_secs(40), |m| {
        m.runtime.runs.len() == 1 && m.status.phase == Some(GatewayPhase::Stable)
    })
    .await?;

    stage("an error burst on route weather: 5.5% → 9% → 20% failures, then back to normal");
    // The detector needs quiet windows of green to know what normal is (the switch restarted
    // its scrape); a ramp into a thin baseline would drag the baseline up with it.
    let learned = tour.m.runtime.error_ratios.len() + 6;
    tour.until("baseline", Duration::from_secs(30), |m| {
        m.runtime.error_ratios.len() >= learned
    })
    .await?;
    for (share, windows) in [(55, 2), (90, 2), (200, 2)] {
        api.weather_failure_per_mille
            .store(share, Ordering::Relaxed);
        let until = tokio::time::Instant::now() + Duration::from_secs(2 * windows);
        while tokio::time::Instant::now() < until {
            tour.tick().await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    api.weather_failure_per_mille.store(15, Ordering::Relaxed);
    tour.until("incident resolution", Duration::from_secs(40), |m| {
        !m.runtime.incidents.is_empty() && m.runtime.incidents.iter().all(|i| i.resolved)
    })
    .await?;

    if let Some(db) = database {
        stage("security drift: tenant isolation switched off in the gateway database");
        security_drift(tour, db).await?;
    }

    stage("a bad revision: route weather points at an upstream that is down");
    let port = closed_port().await;
    let mut broken = good.clone();
    broken.proxy.routes[0].upstream = format!("http://127.0.0.1:{port}/weather/");
    tour.set_spec(broken);
    tour.until("broken revision", Duration::from_secs(30), |m| {
        m.runtime.runs.len() == 2
    })
    .await?;

    stage("a subtly bad revision: route fx moves to a flaky upstream (40% errors)");
    let mut flaky = good.clone();
    flaky.proxy.routes[1].upstream = format!("{upstream}/flaky/");
    tour.set_spec(flaky);
    tour.until("flaky revision", Duration::from_secs(40), |m| {
        m.runtime.runs.len() == 3
    })
    .await?;

    if !keep_traffic {
        stop.store(true, Ordering::Relaxed);
    }
    for t in traffic {
        if keep_traffic {
            tour.background.push(t);
        } else {
            let _ = t.await;
        }
    }
    for run in &tour.m.runtime.runs {
        eprintln!(
            "gate run {}: {} ({})",
            run.revision, run.outcome, run.reason
        );
    }
    Ok(())
}

/// The drift step: row-level security off on `api_keys` (as a careless migration or an
/// attacker would leave it), then the health sweep as its schedule would run it, under
/// `driftPolicy: auto`: it finds the drift (a critical incident), fixes it in an audited
/// transaction, and the check after the fix resolves the incident.
async fn security_drift(tour: &mut Tour, db: &DemoDatabase) -> Result<(), DemoError> {
    let fail = |e: sqlx::Error| DemoError::Start {
        what: "drift step",
        reason: e.to_string(),
    };
    sqlx::query("ALTER TABLE api_keys DISABLE ROW LEVEL SECURITY")
        .execute(&db.pool)
        .await
        .map_err(fail)?;
    eprintln!("ALTER TABLE api_keys DISABLE ROW LEVEL SECURITY; the health sweep runs");
    let since: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM audit_log")
        .fetch_one(&db.pool)
        .await
        .map_err(fail)?;
    tour.m.database_url = Some(db.url.clone());
    let target = crate::operator::gateway::sweep::SweepTarget {
        policy: crate::crd::gateway::DriftPolicy::Auto,
        ..tour.m.sweep_target()
    };
    let outcome =
        crate::operator::gateway::sweep::sweep_gateway(&target, &tour.ctx.http, chrono::Utc::now())
            .await;
    if !outcome.problems.is_empty() {
        return Err(DemoError::Start {
            what: "health sweep",
            reason: outcome.problems.join("; "),
        });
    }
    tour.m.runtime.sweep = Some(outcome);
    tour.m.apply_sweep(Timestamp::now()).await;
    let audited: Vec<(String, String, String)> =
        sqlx::query_as("SELECT actor, action, target FROM audit_log WHERE id > $1 ORDER BY id")
            .bind(since)
            .fetch_all(&db.pool)
            .await
            .map_err(fail)?;
    for (actor, action, target) in audited {
        eprintln!("audit: {action} {target} by {actor}");
    }
    let resolved = tour
        .m
        .runtime
        .incidents
        .iter()
        .any(|i| i.signal == crate::detect::engine::SECURITY_DRIFT && i.resolved);
    if !resolved {
        return Err(DemoError::Stuck {
            stage: "security drift",
            phase: "no resolved security-drift incident".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_spec_parses_and_has_no_problems() {
        let s = spec("http://127.0.0.1:1/weather/", "http://127.0.0.1:1/fx/");
        assert!(s.problems().is_empty());
        assert!(s.gate.auto_promote);
    }
}
