//! `apitree agent`: the proxy, configured from outside.
//!
//! At start the agent reads its local file and its cache; a cached configuration that passes
//! the signature, pool and generation checks is served at once, so a restart does not need the
//! control plane. Without one it asks the control plane, retrying with back-off and jitter,
//! and serves once it has a configuration it could apply.
//!
//! Then two loops run beside the proxy:
//! - the config loop long-polls the control plane for a newer generation; each one is checked
//!   (signature, pool, not older), joined with the local file and built; only then does it
//!   replace the running configuration and the cache. A configuration that fails any step is
//!   refused — logged in full here, reported to the control plane by its paths only — and the
//!   old one keeps serving;
//! - the report loop sends [`Report`]s: version, generation, refusal, metadata metrics.
//!
//! Failed requests to the control plane are retried after `min(max, min·2^n)` scaled by a
//! random factor in [0.5, 1] (so a fleet of agents that lost the control plane at once does
//! not come back at once).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt;

use super::bundle::{merge, AgentConfig, AgentLocal};
use super::cache::Cache;
use super::envelope::{Envelope, PublicKey};
use super::report::{metadata, Refusal, Report};
use crate::proxy::config::ProxyConfig;
use crate::proxy::server::Gateway;
use crate::proxy::state::GatewayState;
use crate::proxy::vault::MasterKeys;
use crate::proxy::{ProxyError, ProxyOptions};

/// How `apitree agent` runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The control plane's agent endpoint, `https://…` (its paths are below this URL).
    pub control_plane: reqwest::Url,
    /// The agent's token (`agt_NAME_SECRET`).
    pub token: String,
    /// The CA that signed the control plane's certificate: then only that CA is trusted.
    /// Without it, the system's CAs.
    pub ca_pem: Option<Vec<u8>>,
    /// The control plane's configuration-signing key.
    pub config_key: PublicKey,
    /// The pool this agent serves; a configuration for another pool is refused.
    pub pool: String,
    pub cache_dir: PathBuf,
    /// The local file (`AgentLocal`).
    pub config: PathBuf,
    pub redis_url: Option<String>,
    pub access_log: bool,
    pub report_every: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Worker threads of the proxy; the CPU count when None.
    pub workers: Option<usize>,
}

impl AgentOptions {
    /// Defaults for everything but where the control plane is and who the agent is.
    pub fn new(
        control_plane: reqwest::Url,
        token: String,
        config_key: PublicKey,
        pool: String,
        cache_dir: PathBuf,
        config: PathBuf,
    ) -> Self {
        Self {
            control_plane,
            token,
            ca_pem: None,
            config_key,
            pool,
            cache_dir,
            config,
            redis_url: None,
            access_log: false,
            report_every: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            workers: None,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Local(#[from] crate::proxy::config::InvalidConfig),
    #[error("{0}")]
    Proxy(#[from] ProxyError),
}

/// How long a failed attempt waits before the `attempt`-th retry: exponential from `min` to
/// `max`, times a random factor in [0.5, 1].
pub fn backoff(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exp = min.saturating_mul(2u32.saturating_pow(attempt.min(30)));
    exp.min(max).mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Why a request to the control plane failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("the control plane refused this agent ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// The control plane, as the agent reaches it.
struct ControlPlane {
    client: reqwest::Client,
    config_url: reqwest::Url,
    report_url: reqwest::Url,
    token: String,
}

/// How long the client waits for a long poll beyond the control plane's own wait.
const LONG_POLL_SLACK: Duration = Duration::from_secs(15);

impl ControlPlane {
    fn new(opts: &AgentOptions) -> Result<Self, String> {
        let mut base = opts.control_plane.clone();
        if base.scheme() != "https" {
            return Err(format!("--control-plane {base}: the agent only talks to its control plane over https (TLS 1.3)"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut builder = reqwest::Client::builder()
            .https_only(true)
            .tls_version_min(reqwest::tls::Version::TLS_1_3)
            .connect_timeout(Duration::from_secs(5))
            .timeout(super::hub::LONG_POLL + LONG_POLL_SLACK)
            .user_agent(concat!("apitree-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &opts.ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or("--ca-file holds no PEM certificate")?;
            builder = builder.tls_certs_only(roots);
        }
        let client = builder.build().map_err(|e| crate::tls::error_chain(&e))?;
        let join = |p: &str| {
            base.join(p)
                .map_err(|e| format!("--control-plane {base}: {e}"))
        };
        Ok(Self {
            client,
            config_url: join("agent/v1/config")?,
            report_url: join("agent/v1/report")?,
            token: opts.token.clone(),
        })
    }

    async fn check(
        &self,
        sent: Result<reqwest::Response, reqwest::Error>,
        url: &reqwest::Url,
    ) -> Result<reqwest::Response, FetchError> {
        let unreachable = |e: &reqwest::Error| FetchError::Unreachable {
            url: url.to_string(),
            reason: crate::tls::error_chain(e),
        };
        let resp = sent.map_err(|e| unreachable(&e))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(200).collect());
        if matches!(status.as_u16(), 401 | 403) {
            Err(FetchError::Refused {
                status: status.as_u16(),
                message,
            })
        } else {
            Err(FetchError::Unreachable {
                url: url.to_string(),
                reason: format!("answered {status}: {message}"),
            })
        }
    }

    /// The newest configuration above `after`; `None` when the long poll ended without one.
    async fn fetch(&self, after: Option<u64>) -> Result<Option<Envelope>, FetchError> {
        let mut url = self.config_url.clone();
        if let Some(a) = after {
            url.query_pairs_mut().append_pair("after", &a.to_string());
        }
        let sent = self
            .client
            .get(url.clone())
            .bearer_auth(&self.token)
            .send()
            .await;
        let resp = self.check(sent, &url).await?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let unreadable = |reason: String| FetchError::Unreachable {
            url: url.to_string(),
            reason,
        };
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| unreadable(crate::tls::error_chain(&e)))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| unreadable(format!("not a configuration envelope: {e}")))
    }

    async fn report(&self, report: &Report) -> Result<(), FetchError> {
        let sent = self
            .client
            .post(self.report_url.clone())
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10))
            .json(report)
            .send()
            .await;
        self.check(sent, &self.report_url).await.map(|_| ())
    }
}

/// A configuration the agent did not apply: what is reported, and what is logged.
#[derive(Debug)]
struct Refused {
    generation: Option<u64>,
    /// Safe to send: names paths and routes, holds nothing from the local file.
    reason: String,
}

/// What the agent runs and last saw.
#[derive(Default)]
struct Status {
    /// The generation serving.
    generation: Option<u64>,
    /// The last configuration refused since one was applied.
    refused: Option<Refusal>,
    /// The newest verified payload (applied or refused), joined again with the local file
    /// when that changes.
    latest: Option<(u64, AgentConfig, Envelope)>,
}

/// The agent's state shared by its loops.
struct Agent {
    opts: AgentOptions,
    /// The local file as the agent started with it.
    started: AgentLocal,
    local: Mutex<AgentLocal>,
    master_keys: Mutex<Option<MasterKeys>>,
    cache: Cache,
    status: Mutex<Status>,
    gateway: std::sync::OnceLock<Arc<Gateway>>,
}

impl Agent {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `/readyz` and errors call the running configuration.
    fn source(&self, generation: u64) -> String {
        format!(
            "control plane generation {generation} + {}",
            self.opts.config.display()
        )
    }

    /// Verifies `env` (signature, pool, not older than what runs), joins it with the local file
    /// and builds it (over `previous`, the running state, when there is one).
    fn check(
        &self,
        env: &Envelope,
        previous: Option<&GatewayState>,
    ) -> Result<(u64, AgentConfig, ProxyConfig, GatewayState), Refused> {
        let have = self.status().generation;
        let payload = self
            .opts
            .config_key
            .open(env, &self.opts.pool, have)
            .map_err(|e| Refused {
                generation: None,
                reason: e.to_string(),
            })?;
        let generation = payload.generation;
        let (cfg, master_keys) = self.join(&payload.config).map_err(|reason| Refused {
            generation: Some(generation),
            reason,
        })?;
        match GatewayState::build(
            &cfg,
            &self.source(generation),
            master_keys.as_ref(),
            previous,
        ) {
            Ok(state) => Ok((generation, payload.config, cfg, state)),
            Err(e) => {
                tracing::error!(generation, "configuration refused: {e}");
                let paths: Vec<_> = e.problems.iter().map(|p| p.path.as_str()).collect();
                Err(Refused {
                    generation: Some(generation),
                    reason: format!(
                        "with the agent's local file it has {} problem(s), at: {}; the agent's log has the details",
                        paths.len(),
                        paths.join(", ")
                    ),
                })
            }
        }
    }

    /// The configuration `remote` makes with the local file, and the master keys it needs.
    fn join(&self, remote: &AgentConfig) -> Result<(ProxyConfig, Option<MasterKeys>), String> {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cfg = merge(remote, &local).map_err(|problems| {
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let master_keys = self
            .master_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok((cfg, master_keys))
    }

    /// Applies a verified configuration to the running proxy and the cache, or refuses it.
    fn apply(&self, env: &Envelope) {
        let gateway = self
            .gateway
            .get()
            .expect("the proxy runs before configurations are applied");
        let previous = gateway.state.current();
        let result = self.check(env, Some(&previous));
        match result {
            Ok((generation, remote, _, state)) => {
                gateway.state.store(state);
                gateway
                    .metrics
                    .config_reloads
                    .with_label_values(&["ok"])
                    .inc();
                if let Err(e) = self.cache.write(env) {
                    tracing::error!("configuration generation {generation} applied but not cached: {e}; after a restart without the control plane the agent serves the previous cached one");
                }
                let mut status = self.status();
                status.generation = Some(generation);
                status.refused = None;
                status.latest = Some((generation, remote, env.clone()));
                tracing::info!(generation, "configuration applied");
            }
            Err(r) => self.refuse(r),
        }
    }

    fn refuse(&self, r: Refused) {
        tracing::error!(generation = ?r.generation, "configuration refused, the previous one keeps serving: {}", r.reason);
        if let Some(gw) = self.gateway.get() {
            gw.metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
        }
        self.status().refused = Some(Refusal {
            generation: r.generation,
            reason: r.reason,
        });
    }

    /// The generation to ask beyond: the one serving, or a newer one already refused (asking
    /// again for it would only refuse it again).
    fn after(&self) -> Option<u64> {
        let s = self.status();
        let refused = s.refused.as_ref().and_then(|r| r.generation);
        match (s.generation, refused) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the last configuration was refused before its generation could be believed.
    fn refused_unverified(&self) -> bool {
        self.status()
            .refused
            .as_ref()
            .is_some_and(|r| r.generation.is_none())
    }

    /// How long to wait before the `n`-th retry.
    fn wait(&self, n: u32) -> Duration {
        backoff(
            self.opts.retry_min,
            self.opts.retry_max,
            n.saturating_sub(1),
            rand::rng().random(),
        )
    }

    fn report(&self) -> Report {
        let s = self.status();
        Report {
            version: env!("CARGO_PKG_VERSION").into(),
            generation: s.generation,
            refused: s.refused.clone(),
            metrics: self
                .gateway
                .get()
                .map(|g| metadata(&g.metrics.registry))
                .unwrap_or_default(),
        }
    }

    /// Reads the local file again and joins it with the newest configuration: a bank that
    /// moved an upstream or added a missing one applies it with SIGHUP.
    fn reload_local(&self) -> Result<Vec<&'static str>, String> {
        let local = AgentLocal::load(&self.opts.config).map_err(|e| e.to_string())?;
        let restart = restart_only_changes(&self.started, &local);
        let master_keys = crate::proxy::state::load_master_keys(
            &merge(&AgentConfig::default(), &local).expect("an empty configuration joins"),
            Path::new(""),
        )?;
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = local;
        *self.master_keys.lock().unwrap_or_else(|p| p.into_inner()) = master_keys;
        let latest = self.status().latest.clone();
        if let Some((_, _, env)) = latest {
            // Applied again even at the same generation: the local half changed.
            let have = self.status().generation.take();
            self.apply(&env);
            let mut s = self.status();
            if s.generation.is_none() {
                s.generation = have;
            }
        } else {
            // A configuration refused for want of a local upstream is asked for again.
            self.status().refused = None;
        }
        if !restart.is_empty() {
            tracing::warn!(
                "the local file changes settings only a restart applies, which still run as started: {}",
                restart.join(", ")
            );
        }
        Ok(restart)
    }
}

/// The settings of the local file a running agent cannot change (its listeners are bound,
/// its keys hashed with the pepper it started with), named as in the file, where `started`
/// and `now` differ.
fn restart_only_changes(started: &AgentLocal, now: &AgentLocal) -> Vec<&'static str> {
    let mut out = Vec::new();
    if started.listen != now.listen {
        out.push("listen");
    }
    if started.admin != now.admin {
        out.push("admin");
    }
    if started.tls != now.tls {
        out.push("tls");
    }
    if started.secrets.pepper_file != now.secrets.pepper_file {
        out.push("secrets.pepperFile");
    }
    out
}

/// A running agent.
pub struct RunningAgent {
    /// The client listener's address.
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub gateway: Arc<Gateway>,
    agent: Arc<Agent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningAgent {
    /// The configuration generation serving.
    pub fn generation(&self) -> Option<u64> {
        self.agent.status().generation
    }

    /// The last configuration refused since one was applied.
    pub fn refused(&self) -> Option<Refusal> {
        self.agent.status().refused.clone()
    }

    /// Reads the local file again (what SIGHUP does); returns the changed settings only a
    /// restart applies (they keep running as started).
    pub fn reload_local(&self) -> Result<Vec<&'static str>, String> {
        self.agent.reload_local()
    }

    /// Stops the loops, drains in-flight requests and waits.
    pub async fn stop(mut self) {
        for l in &self.loops {
            l.abort();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

/// Starts the agent: serves once it has a configuration (from its cache or the control
/// plane); returns with the listeners bound and the loops running.
pub async fn start(opts: AgentOptions) -> Result<RunningAgent, AgentError> {
    let local = AgentLocal::load(&opts.config)?;
    let master_keys = crate::proxy::state::load_master_keys(
        &merge(&AgentConfig::default(), &local).expect("an empty configuration joins"),
        Path::new(""),
    )
    .map_err(AgentError::Setup)?;
    let cp = Arc::new(ControlPlane::new(&opts).map_err(AgentError::Setup)?);
    let cache = Cache::open(&opts.cache_dir).map_err(AgentError::Setup)?;
    let agent = Arc::new(Agent {
        opts: opts.clone(),
        started: local.clone(),
        local: Mutex::new(local),
        master_keys: Mutex::new(master_keys),
        cache,
        status: Mutex::default(),
        gateway: std::sync::OnceLock::new(),
    });
    let (generation, remote, cfg, env) = first_configuration(&agent, &cp).await;
    {
        let mut s = agent.status();
        s.generation = Some(generation);
        s.latest = Some((generation, remote, env));
    }
    let proxy_opts = ProxyOptions {
        config: opts.config.clone(),
        redis_url: opts.redis_url.clone(),
        redis_ca_file: None,
        database_url: None,
        upstream_allow: Vec::new(),
        listen: None,
        admin: None,
        access_log: opts.access_log,
        usage_metering: false,
    };
    let prepared =
        crate::proxy::prepare_config(cfg, Path::new(""), &agent.source(generation), &proxy_opts)
            .await?;
    let gateway = prepared.gateway.clone();
    let _ = agent.gateway.set(gateway.clone());
    let local_addr = |l: &tokio::net::TcpListener| {
        l.local_addr()
            .map_err(|e| AgentError::Setup(format!("listener address: {e}")))
    };
    let (addr, admin) = (
        local_addr(&prepared.listener)?,
        local_addr(&prepared.admin)?,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let workers = opts
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let done = tokio::spawn(crate::proxy::server::run_with_workers(
        gateway.clone(),
        prepared.listener,
        prepared.admin,
        async {
            let _ = stop_rx.await;
        },
        prepared.settings,
        workers,
    ));
    tracing::info!(%addr, %admin, generation, pool = %opts.pool, "apitree agent is serving");
    let loops = vec![
        tokio::spawn(config_loop(agent.clone(), cp.clone())),
        tokio::spawn(report_loop(agent.clone(), cp)),
    ];
    Ok(RunningAgent {
        addr,
        admin,
        gateway,
        agent,
        stop: Some(stop_tx),
        done: Some(done),
        loops,
    })
}

/// The cached configuration when it verifies and builds; otherwise the control plane's first
/// one that does, asked for until it comes.
async fn first_configuration(
    agent: &Agent,
    cp: &ControlPlane,
) -> (u64, AgentConfig, ProxyConfig, Envelope) {
    match agent.cache.read() {
        Ok(Some(env)) => match agent.check(&env, None) {
            Ok((generation, remote, cfg, _)) => {
                tracing::info!(
                    generation,
                    "serving the cached configuration until the control plane answers"
                );
                return (generation, remote, cfg, env);
            }
            Err(r) => {
                tracing::error!(
                    "the cached configuration is refused ({}); waiting for the control plane",
                    r.reason
                );
                agent.refuse(r);
            }
        },
        Ok(None) => tracing::info!("no cached configuration yet; waiting for the control plane"),
        Err(e) => tracing::error!("{e}; waiting for the control plane"),
    }
    let mut attempt = 0;
    let mut refusals = 0u32;
    loop {
        match cp.fetch(agent.after()).await {
            Ok(Some(env)) => match agent.check(&env, None) {
                Ok((generation, remote, cfg, _)) => {
                    if let Err(e) = agent.cache.write(&env) {
                        tracing::error!("configuration generation {generation} not cached: {e}");
                    }
                    return (generation, remote, cfg, env);
                }
                Err(r) => {
                    let unverified = r.generation.is_none();
                    agent.refuse(r);
                    attempt = 0;
                    if unverified {
                        refusals = refusals.saturating_add(1);
                        tokio::time::sleep(agent.wait(refusals)).await;
                    }
                    continue;
                }
            },
            Ok(None) => {
                attempt = 0;
                continue;
            }
            Err(e) => {
                tracing::warn!("{e}; retrying");
                let wait = backoff(
                    agent.opts.retry_min,
                    agent.opts.retry_max,
                    attempt,
                    rand::rng().random(),
                );
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn config_loop(agent: Arc<Agent>, cp: Arc<ControlPlane>) {
    let mut attempt = 0u32;
    let mut refusals = 0u32;
    loop {
        match cp.fetch(agent.after()).await {
            Ok(Some(env)) => {
                if attempt > 0 {
                    tracing::info!("the control plane answers again");
                }
                attempt = 0;
                agent.apply(&env);
                // Refused before its generation could be believed (a signature that does not
                // verify: a wrong --config-key, say): asking again at once would get the same
                // envelope at once, so the next ask waits as after a failure.
                if agent.refused_unverified() {
                    refusals = refusals.saturating_add(1);
                    tokio::time::sleep(agent.wait(refusals)).await;
                } else {
                    refusals = 0;
                }
            }
            Ok(None) => {
                if attempt > 0 {
                    tracing::info!("the control plane answers again");
                }
                attempt = 0;
            }
            Err(e) => {
                let wait = backoff(
                    agent.opts.retry_min,
                    agent.opts.retry_max,
                    attempt,
                    rand::rng().random(),
                );
                if attempt == 0 {
                    tracing::warn!(
                        "{e}; serving generation {:?} meanwhile, retrying in {wait:?}",
                        agent.status().generation
                    );
                }
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn report_loop(agent: Arc<Agent>, cp: Arc<ControlPlane>) {
    let mut failing = false;
    let mut tick = tokio::time::interval(agent.opts.report_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match cp.report(&agent.report()).await {
            Ok(()) => {
                if failing {
                    tracing::info!("reports reach the control plane again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("report not delivered: {e}; the next one carries the counts (they are cumulative)");
                }
                failing = true;
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves. SIGHUP reads the local file again.
pub async fn run(
    opts: AgentOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    let running = tokio::select! {
        r = start(opts) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    #[cfg(unix)]
    let hup = {
        let agent = running.agent.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                match agent.reload_local() {
                    Ok(_) => tracing::info!("local file read again"),
                    Err(e) => tracing::error!(
                        "local file NOT reloaded, still serving the previous one: {e}"
                    ),
                }
            }
        })
    };
    shutdown.await;
    #[cfg(unix)]
    hup.abort();
    running.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(min, max, 0, 1.0), min);
        assert_eq!(backoff(min, max, 0, 0.0), min / 2);
        assert_eq!(backoff(min, max, 3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(min, max, 10, 1.0), max);
        assert_eq!(backoff(min, max, u32::MAX, 1.0), max);
        assert_eq!(backoff(min, max, u32::MAX, 0.0), max / 2);
    }
}
