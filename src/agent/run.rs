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
//! - the report loop sends [`Report`]s: version, generation, refusal, metadata metrics. The
//!   answer may carry a candidate configuration the control plane's gate is checking: the
//!   agent verifies it (signed, for its pool, marked as a candidate), joins it with the local
//!   file and runs it beside the served one on `previewListen` — never for its clients, never
//!   cached — checks its `/readyz`, sends its smoke probes through it (every route without a
//!   key must get 401, and the local file's own probes) and reports the outcome and the
//!   candidate's metrics with the next reports. When the control plane stops offering it, it
//!   is stopped.
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
use super::envelope::{Envelope, Payload, PublicKey};
use super::report::{metadata, PreviewReport, Refusal, Report, SmokeOutcome};
use crate::entities::vault::MasterKeys;
use crate::proxy::config::ProxyConfig;
use crate::proxy::server::Gateway;
use crate::proxy::state::GatewayState;
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
    /// CA certificates (PEM) a rediss:// Redis is verified against.
    pub redis_ca_file: Option<PathBuf>,
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
            redis_ca_file: None,
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

    /// Sends `report`; returns the candidate configuration the answer carries, if any.
    async fn report(&self, report: &Report) -> Result<Option<Envelope>, FetchError> {
        let sent = self
            .client
            .post(self.report_url.clone())
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10))
            .json(report)
            .send()
            .await;
        let resp = self.check(sent, &self.report_url).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            preview: Option<Envelope>,
        }
        let unreadable = |reason: String| FetchError::Unreachable {
            url: self.report_url.to_string(),
            reason,
        };
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| unreadable(crate::tls::error_chain(&e)))?;
        serde_json::from_slice::<Answer>(&bytes)
            .map(|a| a.preview)
            .map_err(|e| unreadable(format!("not a report answer: {e}")))
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

/// The name of the smoke probe every candidate gets: each route's path without a key must be
/// refused with 401.
pub const NO_KEY_PROBE: &str = "no-key-is-refused";

/// How long one smoke probe or readiness call may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A candidate configuration running beside the served one.
struct PreviewStack {
    gateway: Arc<Gateway>,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl PreviewStack {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.done.await;
    }
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
    /// The candidate last offered (the report loop's answer), and what became of it.
    offered: Mutex<Option<Envelope>>,
    preview: Mutex<Option<(PreviewReport, Option<Arc<Gateway>>)>>,
    /// The running candidate; held while one is replaced or stopped.
    preview_stack: tokio::sync::Mutex<Option<PreviewStack>>,
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
        self.build(payload, previous)
    }

    /// Joins a verified payload with the local file and builds it.
    fn build(
        &self,
        payload: Payload,
        previous: Option<&GatewayState>,
    ) -> Result<(u64, AgentConfig, ProxyConfig, GatewayState), Refused> {
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
        let preview = self
            .preview
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(report, gateway)| PreviewReport {
                metrics: gateway
                    .as_ref()
                    .map(|g| metadata(&g.metrics.registry))
                    .unwrap_or_default(),
                ..report.clone()
            });
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
            preview,
        }
    }

    /// The report loop's answer: a candidate the agent has not taken up yet starts a task that
    /// runs it (replacing the one running); no candidate stops the one running.
    fn offer(self: &Arc<Self>, candidate: Option<Envelope>) {
        {
            let mut offered = self.offered.lock().unwrap_or_else(|p| p.into_inner());
            if *offered == candidate {
                return;
            }
            offered.clone_from(&candidate);
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let mut stack = agent.preview_stack.lock().await;
            // Offered again meanwhile: the newer offer's task does the work.
            if *agent.offered.lock().unwrap_or_else(|p| p.into_inner()) != candidate {
                return;
            }
            if let Some(old) = stack.take() {
                old.stop().await;
            }
            let Some(env) = candidate else {
                *agent.preview.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return;
            };
            let (report, running) = agent.try_candidate(&env).await;
            let gateway = running.as_ref().map(|r| r.gateway.clone());
            *stack = running;
            *agent.preview.lock().unwrap_or_else(|p| p.into_inner()) = Some((report, gateway));
        });
    }

    /// Verifies, builds and starts a candidate on `previewListen`, then checks its readiness
    /// and sends its smoke probes.
    async fn try_candidate(&self, env: &Envelope) -> (PreviewReport, Option<PreviewStack>) {
        let refused = |generation, reason: String| PreviewReport {
            generation,
            refused: Some(reason),
            ready: false,
            not_ready: None,
            smoke: Vec::new(),
            metrics: String::new(),
        };
        let payload = match self.opts.config_key.open_preview(env, &self.opts.pool) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("candidate configuration refused: {e}");
                return (refused(None, e.to_string()), None);
            }
        };
        let generation = payload.generation;
        let routes = payload.config.routes.clone();
        let (_, _, mut cfg, _) = match self.build(payload, None) {
            Ok(built) => built,
            Err(r) => {
                tracing::error!(generation, "candidate configuration refused: {}", r.reason);
                return (refused(Some(generation), r.reason), None);
            }
        };
        let preview_listen = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .preview_listen
            .clone();
        // Plain HTTP on loopback: only this host reaches the candidate.
        cfg.tls = None;
        cfg.listen = preview_listen;
        cfg.admin = "127.0.0.1:0".into();
        let opts = self.proxy_options();
        let source = format!(
            "candidate generation {generation} + {}",
            self.opts.config.display()
        );
        let prepared = match crate::proxy::prepare_config(cfg, Path::new(""), &source, &opts).await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(generation, "candidate configuration not started: {e}");
                let reason = match &e {
                    // The address stays home, like every value of the local file.
                    ProxyError::Bind { .. } => "previewListen cannot be bound (is its port in use?); the agent's log has the details".into(),
                    _ => "it does not start with the agent's local file; the agent's log has the details".into(),
                };
                return (refused(Some(generation), reason), None);
            }
        };
        let (addr, admin) = match (prepared.listener.local_addr(), prepared.admin.local_addr()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                return (
                    refused(
                        Some(generation),
                        "the candidate's listeners have no address".into(),
                    ),
                    None,
                )
            }
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let gateway = prepared.gateway.clone();
        let done = tokio::spawn(crate::proxy::transport::workers::run_with_workers(
            prepared.gateway,
            prepared.listener,
            prepared.admin,
            async {
                let _ = stop_rx.await;
            },
            prepared.settings,
            1,
        ));
        tracing::info!(generation, %addr, "candidate configuration running beside the served one, for the gate's checks");
        let stack = PreviewStack {
            gateway,
            stop,
            done,
        };
        let (ready, not_ready) = readiness(admin).await;
        let probes = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .smoke
            .clone();
        let smoke = smoke(addr, &routes, &probes).await;
        let report = PreviewReport {
            generation: Some(generation),
            refused: None,
            ready,
            not_ready,
            smoke,
            metrics: String::new(),
        };
        tracing::info!(
            generation,
            ready,
            failed = report.smoke.iter().filter(|s| !s.passed).count(),
            "candidate configuration checked"
        );
        (report, Some(stack))
    }

    /// How the agent's proxies (the served one and a candidate) are started.
    fn proxy_options(&self) -> ProxyOptions {
        ProxyOptions {
            config: self.opts.config.clone(),
            redis_url: self.opts.redis_url.clone(),
            redis_ca_file: self.opts.redis_ca_file.clone(),
            database_url: None,
            upstream_allow: Vec::new(),
            listen: None,
            admin: None,
            access_log: self.opts.access_log,
            usage_metering: false,
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
        // A candidate is tried again with the new file at the next report's answer.
        *self.offered.lock().unwrap_or_else(|p| p.into_inner()) = None;
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

/// A candidate's `/readyz` on its admin listener: ready, or what it says instead.
async fn readiness(admin: std::net::SocketAddr) -> (bool, Option<String>) {
    let answer = loopback_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await;
    match answer {
        Ok(r) => {
            let code = r.status().as_u16();
            let doc: serde_json::Value = r.json().await.unwrap_or_default();
            match crate::proxy::admin::readyz_verdict(code, &doc) {
                Ok(()) => (true, None),
                Err(why) => (false, Some(why)),
            }
        }
        Err(e) => (false, Some(no_answer(&e))),
    }
}

fn loopback_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PROBE_TIMEOUT)
        .build()
        .expect("a plain HTTP client builds")
}

/// Why a probe got no answer, without the address (which stays in the partner's network).
fn no_answer(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("no answer within {PROBE_TIMEOUT:?}")
    } else {
        "no answer (the connection failed)".into()
    }
}

/// The smoke probes through a candidate listening at `addr`: every route's path without a key
/// must get 401 (one outcome, [`NO_KEY_PROBE`]), then each of the local file's probes.
async fn smoke(
    addr: std::net::SocketAddr,
    routes: &[super::bundle::ConnectorRoute],
    local: &[super::bundle::LocalSmoke],
) -> Vec<SmokeOutcome> {
    let client = loopback_client();
    let send = |method: &str, path: &str, key: Option<String>| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = client.request(method, format!("http://{addr}{path}"));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send()
    };
    let mut failures = Vec::new();
    for r in routes {
        let method = r
            .methods
            .first()
            .map_or(http::Method::GET, |m| m.as_method());
        match send(method.as_str(), &r.path_prefix, None).await {
            Ok(resp) if resp.status().as_u16() == 401 => {}
            Ok(resp) => failures.push(format!(
                "route {}: got {}, expected 401",
                r.name,
                resp.status().as_u16()
            )),
            Err(e) => failures.push(format!("route {}: {}", r.name, no_answer(&e))),
        }
    }
    let mut out = vec![SmokeOutcome {
        name: NO_KEY_PROBE.into(),
        passed: failures.is_empty(),
        detail: if failures.is_empty() {
            format!(
                "{} route(s) refuse a request without a key (401)",
                routes.len()
            )
        } else {
            failures.join("; ")
        },
    }];
    for p in local {
        let key = match &p.api_key_file {
            Some(f) => match std::fs::read_to_string(f) {
                Ok(k) => Some(k.trim().to_string()),
                Err(e) => {
                    tracing::error!(probe = %p.name, "smoke probe's apiKeyFile {}: {e}", f.display());
                    out.push(SmokeOutcome {
                        name: p.name.clone(),
                        passed: false,
                        detail: "its apiKeyFile cannot be read; the agent's log says why".into(),
                    });
                    continue;
                }
            },
            None => None,
        };
        let (passed, detail) = match send(&p.method, &p.path, key).await {
            Ok(resp) => {
                let got = resp.status().as_u16();
                (
                    got == p.expect_status,
                    format!("got {got}, expected {}", p.expect_status),
                )
            }
            Err(e) => (false, no_answer(&e)),
        };
        out.push(SmokeOutcome {
            name: p.name.clone(),
            passed,
            detail,
        });
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

    /// The candidate configuration the agent runs beside the served one, and what it made of
    /// it, if the control plane offers one.
    pub fn preview(&self) -> Option<PreviewReport> {
        self.agent
            .preview
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(r, _)| r.clone())
    }

    /// Stops the loops and a candidate, drains in-flight requests and waits.
    pub async fn stop(mut self) {
        for l in &self.loops {
            l.abort();
        }
        if let Some(stack) = self.agent.preview_stack.lock().await.take() {
            stack.stop().await;
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
        offered: Mutex::default(),
        preview: Mutex::default(),
        preview_stack: tokio::sync::Mutex::default(),
    });
    let (generation, remote, cfg, env) = first_configuration(&agent, &cp).await;
    {
        let mut s = agent.status();
        s.generation = Some(generation);
        s.latest = Some((generation, remote, env));
    }
    let proxy_opts = agent.proxy_options();
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
    let done = tokio::spawn(crate::proxy::transport::workers::run_with_workers(
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

/// Reports that fail in a row before a running candidate is stopped: the control plane that
/// offered it cannot be heard, so whether its gate still runs is unknown.
const CANDIDATE_LOST_AFTER: u32 = 3;

async fn report_loop(agent: Arc<Agent>, cp: Arc<ControlPlane>) {
    let mut failures = 0u32;
    let mut tick = tokio::time::interval(agent.opts.report_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match cp.report(&agent.report()).await {
            Ok(candidate) => {
                agent.offer(candidate);
                if failures > 0 {
                    tracing::info!("reports reach the control plane again");
                }
                failures = 0;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!("report not delivered: {e}; the next one carries the counts (they are cumulative)");
                }
                failures = failures.saturating_add(1);
                // Refused (revoked, a replaced token) or unheard for a while: no candidate
                // keeps running on an offer nobody can withdraw.
                if matches!(e, FetchError::Refused { .. }) || failures >= CANDIDATE_LOST_AFTER {
                    agent.offer(None);
                }
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
