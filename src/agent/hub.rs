//! The control plane's side: the endpoint agents dial.
//!
//! - `GET /agent/v1/config?after=N` — the newest signed configuration of the agent's pool when
//!   its generation is above `N`; otherwise the request waits (a long poll, up to
//!   [`LONG_POLL`]) for one, and answers `304` when none came.
//! - `POST /agent/v1/report` — the agent's [`Report`]: version, generation, refusal, metrics,
//!   and what it made of the pool's candidate configuration. While the gate checks a revision
//!   that changes the pool, the answer carries that candidate (signed, marked `preview`):
//!   `200 {"preview": envelope}`; otherwise `204`.
//!
//! Every request carries `Authorization: Bearer agt_NAME_SECRET`. The hub knows each agent by
//! name, pool and the SHA-256 of its token (the agents file, `apitree agent token` prints an
//! entry); a token is compared in constant time, and a revoked agent is refused with 403 at
//! its next request, including one already waiting in a long poll. Errors are JSON with a
//! `request_id`; no answer and no log line holds a token.
//!
//! The hub keeps, per agent, what it last reported: [`Hub::agents`] (name, pool, version,
//! generation, refusal, last seen) and [`Hub::agent_metrics`] (its metrics text, which the
//! detector scrapes like a proxy's `/metrics`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::bundle::AgentConfig;
use super::envelope::{Payload, Signer};
use super::report::{PreviewReport, Refusal, Report};

/// The longest a config request waits for a new generation before answering 304.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// The largest report accepted.
pub const MAX_REPORT_BYTES: usize = 1024 * 1024;
/// The prefix of agent tokens.
pub const TOKEN_PREFIX: &str = "agt_";

/// One agent the control plane knows (an entry of the agents file).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentRecord {
    /// The agent's name (lower-case letters, digits, `-`), part of its token.
    pub name: String,
    /// The pool whose configuration it receives.
    pub pool: String,
    /// Hex SHA-256 of its token.
    pub token_sha256: String,
    /// A revoked agent is refused (403) at its next request. Required: a file cut before
    /// an entry's `revoked: true` must not read as an agent let back in.
    pub revoked: bool,
}

/// The agents file: which gateway each pool serves, and the agents.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsFile {
    /// Each pool and the one gateway whose `spec.connectors` may configure it. A pool not
    /// listed receives nothing: which gateway speaks to a partner's agents is the control
    /// plane operators' decision, not a gateway author's.
    #[serde(default)]
    pub pools: Vec<PoolBinding>,
    /// Required, even empty (`agents: []`): an empty or cut file is not "no agents".
    pub agents: Vec<AgentRecord>,
}

/// A pool and its gateway.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolBinding {
    pub name: String,
    /// The gateway as the control plane names it: `NAMESPACE/NAME` in a cluster, the
    /// manifest's name with `apitree local`.
    pub gateway: String,
}

impl AgentsFile {
    /// Reads and checks the file: names well formed, no agent or pool listed twice (which
    /// entry counts, a revoked one or not, must never be a guess).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let at = |e: &dyn std::fmt::Display| format!("agents file {}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
        let file: Self = serde_saphyr::from_str(&text).map_err(|e| at(&e))?;
        file.check().map_err(|e| at(&e))?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        let mut agents = std::collections::HashSet::new();
        for a in &self.agents {
            if let Some(problem) = name_problem(&a.name) {
                return Err(format!("agent {:?}: {problem}", a.name));
            }
            if !agents.insert(a.name.as_str()) {
                return Err(format!(
                    "agent {:?} is listed twice; keep one entry",
                    a.name
                ));
            }
        }
        let mut pools = std::collections::HashSet::new();
        for p in &self.pools {
            if !pools.insert(p.name.as_str()) {
                return Err(format!(
                    "pool {:?} is listed twice; a pool serves one gateway",
                    p.name
                ));
            }
        }
        Ok(())
    }
}

/// Why `name` cannot be an agent's name, if it cannot.
pub fn name_problem(name: &str) -> Option<&'static str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    (!ok).then_some("a name is 1 to 63 lower-case letters, digits and '-'")
}

/// A new token for agent `name` and its agents-file entry for `pool`.
pub fn new_token(name: &str, pool: &str) -> Result<(String, AgentRecord), String> {
    if let Some(p) = name_problem(name) {
        return Err(format!("agent name {name:?}: {p}"));
    }
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let token = format!("{TOKEN_PREFIX}{name}_{}", B64URL.encode(secret));
    let record = AgentRecord {
        name: name.into(),
        pool: pool.into(),
        token_sha256: token_sha256(&token),
        revoked: false,
    };
    Ok((token, record))
}

pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The agent name a token claims (checked against its hash before it is believed).
fn token_name(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (name, _) = rest.split_once('_')?;
    Some(name)
}

/// What the hub knows of one agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub name: String,
    pub pool: String,
    /// The agent's version, from its last report.
    pub version: Option<String>,
    /// The configuration generation it last reported serving.
    pub generation: Option<u64>,
    /// The configuration it last refused (since it last applied one).
    pub refused: Option<Refusal>,
    /// Its last request of any kind.
    pub last_seen: DateTime<Utc>,
    pub revoked: bool,
    /// What it made of the pool's candidate configuration, from its last report (its metrics
    /// are kept apart: [`Hub::preview_metrics`]).
    pub preview: Option<PreviewReport>,
}

/// A pool's newest configuration.
struct Published {
    generation: u64,
    config: AgentConfig,
    body: Bytes,
}

/// The candidate the gate is checking for a pool.
struct Candidate {
    /// The gateway that offered it: served only while the pool is still bound to it.
    gateway: String,
    revision: String,
    generation: u64,
    config: AgentConfig,
    /// `{"preview": envelope}`, the answer to a report.
    body: Bytes,
}

/// What an agent last said.
struct Seen {
    status: AgentStatus,
    metrics: String,
    preview_metrics: String,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, AgentRecord>,
    /// Pool → the gateway that may configure it.
    bindings: HashMap<String, String>,
    pools: HashMap<String, Published>,
    previews: HashMap<String, Candidate>,
    seen: BTreeMap<String, Seen>,
    /// Config requests each agent has open now.
    /// Requests each agent has open now, by endpoint (`config`, `report`) and agent.
    polls: HashMap<(&'static str, String), usize>,
    /// When each pool was last signed again above an agent's generation.
    followed: HashMap<String, std::time::Instant>,
}

/// Why a configuration was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("pool {pool:?} is bound to no gateway in the agents file; add `pools: [{{name: {pool}, gateway: {gateway}}}]` there to let gateway {gateway} configure it")]
    Unbound { pool: String, gateway: String },
    #[error("pool {pool:?} serves gateway {owner} (the agents file binds it so); gateway {gateway} cannot configure it")]
    Taken {
        pool: String,
        gateway: String,
        owner: String,
    },
}

/// Config requests one agent may have open at once; more are answered 429.
pub const MAX_POLLS_PER_AGENT: usize = 4;
/// Reports one agent may have in flight at once (it sends one at a time); more are answered
/// 429, so one token cannot keep the hub parsing megabytes in parallel.
pub const MAX_REPORTS_PER_AGENT: usize = 2;
/// The largest count a report may carry (more than a proxy counts in centuries).
pub const MAX_REPORTED_VALUE: f64 = 1e15;
/// How long a report's body may take to arrive.
const REPORT_READ: Duration = Duration::from_secs(10);
/// The longest refusal reason kept from a report.
const MAX_REASON: usize = 1024;
/// The most smoke probes a report may name.
pub const MAX_SMOKE: usize = 32;
/// How far ahead of this control plane's clock a generation an agent runs may be and still be
/// followed (a control plane whose clock went back, or that lost its memory): 30 days.
const MAX_GENERATION_AHEAD_MS: u64 = 30 * 24 * 3600 * 1000;
/// How often a pool may be signed again above an agent's generation.
const FOLLOW_EVERY: Duration = Duration::from_secs(60);
/// At most one log line per this long about refused tokens (the counter counts them all).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

/// The control plane's agent endpoint.
pub struct Hub {
    signer: Signer,
    inner: Mutex<Inner>,
    /// Bumped on every publication and agents change: long polls wake and look again.
    changed: tokio::sync::watch::Sender<u64>,
    requests: IntCounterVec,
    long_poll: Duration,
    /// Refused tokens since the last log line about them, and when that line was written.
    refused_log: Mutex<(u64, Option<std::time::Instant>)>,
}

/// An answer with its request id.
type Answer = Response<Full<Bytes>>;

impl Hub {
    /// A hub signing with `signer`, knowing the pools and agents of `agents`; its request
    /// counter (`apitree_agent_hub_requests_total{endpoint,result}`) goes in `registry`.
    pub fn new(signer: Signer, agents: AgentsFile, registry: &Registry) -> Arc<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "apitree_agent_hub_requests_total",
                "Agent requests by endpoint (config, report) and result (ok, unchanged, unauthorized, revoked, bad_request).",
            ),
            &["endpoint", "result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        let hub = Arc::new(Self {
            signer,
            inner: Mutex::default(),
            changed: tokio::sync::watch::channel(0).0,
            requests,
            long_poll: LONG_POLL,
            refused_log: Mutex::default(),
        });
        hub.set_agents(agents);
        hub
    }

    /// The same hub with a shorter long poll (tests).
    pub fn with_long_poll(self: Arc<Self>, long_poll: Duration) -> Arc<Self> {
        let mut hub = Arc::into_inner(self).expect("with_long_poll before the hub is shared");
        hub.long_poll = long_poll;
        Arc::new(hub)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Replaces the known pools and agents (a revocation takes effect at each agent's next
    /// request, a waiting one included).
    pub fn set_agents(&self, file: AgentsFile) {
        let mut inner = self.lock();
        inner.agents = file
            .agents
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect();
        inner.bindings = file
            .pools
            .into_iter()
            .map(|p| (p.name, p.gateway))
            .collect();
        drop(inner);
        self.bump();
    }

    /// Makes `config` the newest configuration of `pool` and returns its generation; only the
    /// gateway the agents file binds the pool to may. The same configuration again keeps its
    /// generation (agents are not woken for nothing). Generations grow: at least one more than
    /// the last, and at least the time in milliseconds, so a control plane that restarts
    /// without memory still moves forward (and [`Hub::follow`] covers a clock that went back).
    pub fn publish(
        &self,
        gateway: &str,
        pool: &str,
        config: AgentConfig,
    ) -> Result<u64, PublishError> {
        let mut inner = self.lock();
        bound_to(&inner, gateway, pool)?;
        if let Some(p) = inner.pools.get(pool) {
            if p.config == config {
                return Ok(p.generation);
            }
        }
        let generation = next_generation(&inner, pool);
        self.sign_into(&mut inner, pool, config, generation);
        drop(inner);
        self.bump();
        Ok(generation)
    }

    /// Offers `config`, revision `revision`'s configuration of `pool`, to the pool's agents as
    /// the candidate the gate checks: they build it beside what they serve, probe it and
    /// report ([`Hub::previews`]). The same candidate again keeps its generation. Only the
    /// gateway the pool is bound to may.
    pub fn publish_preview(
        &self,
        gateway: &str,
        pool: &str,
        revision: &str,
        config: AgentConfig,
    ) -> Result<u64, PublishError> {
        let mut inner = self.lock();
        bound_to(&inner, gateway, pool)?;
        if let Some(c) = inner.previews.get(pool) {
            if c.revision == revision && c.config == config {
                return Ok(c.generation);
            }
        }
        let generation = next_generation(&inner, pool);
        let envelope = self.signer.sign(&Payload {
            pool: pool.into(),
            generation,
            issued_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            preview: true,
            config: config.clone(),
        });
        let body = serde_json::json!({ "preview": envelope }).to_string();
        inner.previews.insert(
            pool.into(),
            Candidate {
                gateway: gateway.into(),
                revision: revision.into(),
                generation,
                config,
                body: Bytes::from(body),
            },
        );
        Ok(generation)
    }

    /// Takes back every candidate `gateway` offered but for those of `keep` (a gate ended, a
    /// pool left the spec, the gateway was deleted: `keep` empty): their agents stop them at
    /// their next report.
    pub fn retain_previews(&self, gateway: &str, keep: &[&str]) {
        self.lock()
            .previews
            .retain(|pool, c| c.gateway != gateway || keep.contains(&pool.as_str()));
    }

    /// The revision and generation of the candidate `gateway` offers `pool`, while the pool
    /// is bound to it.
    pub fn preview_of(&self, gateway: &str, pool: &str) -> Option<(String, u64)> {
        let inner = self.lock();
        offered(&inner, pool)
            .filter(|c| c.gateway == gateway)
            .map(|c| (c.revision.clone(), c.generation))
    }

    /// Signs `config` as generation `generation` of `pool` and makes it the newest.
    fn sign_into(&self, inner: &mut Inner, pool: &str, config: AgentConfig, generation: u64) {
        let envelope = self.signer.sign(&Payload {
            pool: pool.into(),
            generation,
            issued_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            preview: false,
            config: config.clone(),
        });
        let body = Bytes::from(serde_json::to_vec(&envelope).expect("an envelope serialises"));
        inner.pools.insert(
            pool.into(),
            Published {
                generation,
                config,
                body,
            },
        );
    }

    /// An agent runs generation `after` of `pool`, newer than anything published here (this
    /// control plane restarted without its memory, or its clock went back): the pool's
    /// configuration is signed again above it, so the agents are not left waiting for a
    /// number this clock will not reach soon. Not beyond [`MAX_GENERATION_AHEAD_MS`], so an
    /// agent cannot push a pool's generations to the end of the range.
    fn follow(&self, pool: &str, after: Option<u64>) {
        let Some(after) = after else { return };
        let mut inner = self.lock();
        if !inner.bindings.contains_key(pool) {
            return;
        }
        let Some(published) = inner.pools.get(pool).map(|p| p.generation) else {
            return;
        };
        if after <= published {
            return;
        }
        // Bounded by this clock, not by the last publication: steps of any size cannot add
        // up beyond it (an agent walking the pool's generations towards the end of the range
        // would leave every later control plane behind its agents).
        let now_ms = Utc::now().timestamp_millis().max(0) as u64;
        if after > now_ms.saturating_add(MAX_GENERATION_AHEAD_MS) {
            tracing::error!(pool, generation = after, published, "an agent runs a generation more than 30 days ahead of this control plane's clock; not followed: check the clocks, or clear that agent's --cache-dir");
            return;
        }
        // At most once per FOLLOW_EVERY a pool: each follow makes every agent of the pool
        // apply and cache again, which one agent must not be able to ask for endlessly.
        if inner
            .followed
            .get(pool)
            .is_some_and(|at| at.elapsed() < FOLLOW_EVERY)
        {
            return;
        }
        inner
            .followed
            .insert(pool.to_string(), std::time::Instant::now());
        tracing::warn!(pool, generation = after, published, "an agent runs a generation this control plane did not publish (a restart without memory, or a clock that went back); signing the pool's configuration again above it");
        let config = inner.pools[pool].config.clone();
        self.sign_into(&mut inner, pool, config, after.saturating_add(1));
        drop(inner);
        self.bump();
    }

    /// The gateway the agents file binds `pool` to.
    pub fn gateway_of(&self, pool: &str) -> Option<String> {
        self.lock().bindings.get(pool).cloned()
    }

    /// The newest generation of `pool`.
    pub fn generation(&self, pool: &str) -> Option<u64> {
        self.lock().pools.get(pool).map(|p| p.generation)
    }

    /// Every agent that has made a request, by name.
    pub fn agents(&self) -> Vec<AgentStatus> {
        let inner = self.lock();
        inner
            .seen
            .values()
            .map(|seen| {
                let mut s = seen.status.clone();
                s.revoked = inner.agents.get(&s.name).is_none_or(|a| a.revoked);
                s
            })
            .collect()
    }

    /// Every agent the agents file assigns to `pool` and does not revoke, with what the hub
    /// has heard from it (`None`: nothing since this control plane started).
    pub fn pool_agents(&self, pool: &str) -> Vec<(String, Option<AgentStatus>)> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .agents
            .values()
            .filter(|a| a.pool == pool && !a.revoked)
            .map(|a| {
                let seen = inner.seen.get(&a.name).map(|s| s.status.clone());
                (a.name.clone(), seen)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The metrics texts the agents of `pools` last reported, by agent name.
    pub fn pool_metrics(&self, pools: &[&str]) -> Vec<(String, String)> {
        self.metrics_of(pools, |s| &s.metrics)
    }

    /// The metrics texts of the candidates the agents of `pools` run, by agent name.
    pub fn preview_metrics(&self, pools: &[&str]) -> Vec<(String, String)> {
        self.metrics_of(pools, |s| &s.preview_metrics)
    }

    fn metrics_of(&self, pools: &[&str], which: fn(&Seen) -> &String) -> Vec<(String, String)> {
        self.lock()
            .seen
            .iter()
            .filter(|(_, s)| pools.contains(&s.status.pool.as_str()) && !which(s).is_empty())
            .map(|(name, s)| (name.clone(), which(s).clone()))
            .collect()
    }

    /// The metrics text agent `name` last reported.
    pub fn agent_metrics(&self, name: &str) -> Option<String> {
        self.lock().seen.get(name).map(|s| s.metrics.clone())
    }

    /// Serves the agent endpoint on `listener` until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<Arc<crate::proxy::tls::ServerTls>>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        crate::small_http::serve(
            listener,
            tls,
            Duration::from_secs(10),
            stop,
            move |req, _| {
                let hub = self.clone();
                async move { hub.handle(req).await }
            },
        )
        .await
    }

    /// Answers one agent request.
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Answer
    where
        B: http_body::Body + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let id = uuid::Uuid::new_v4().to_string();
        let endpoint = match (req.method(), req.uri().path()) {
            (&Method::GET, "/agent/v1/config") => "config",
            (&Method::POST, "/agent/v1/report") => "report",
            (_, "/agent/v1/config" | "/agent/v1/report") => {
                return error(
                    &id,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use GET for /agent/v1/config and POST for /agent/v1/report",
                )
            }
            _ => {
                return error(
                    &id,
                    StatusCode::NOT_FOUND,
                    "no such agent endpoint; agents use /agent/v1/config and /agent/v1/report",
                )
            }
        };
        let (answer, result) = match self.authenticate(&req) {
            Err((status, result, message)) => (error(&id, status, &message), result),
            Ok(agent) => match endpoint {
                "config" => self.config(&id, &agent, req.uri().query()).await,
                _ => self.report(&id, &agent, req.into_body()).await,
            },
        };
        self.requests.with_label_values(&[endpoint, result]).inc();
        answer
    }

    /// The agent a request's token belongs to, or why there is none.
    fn authenticate<B>(
        &self,
        req: &Request<B>,
    ) -> Result<AgentRecord, (StatusCode, &'static str, String)> {
        let unauthorized = |m: &str| (StatusCode::UNAUTHORIZED, "unauthorized", m.to_string());
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("send the agent's token as `Authorization: Bearer agt_…` (the file named by --token-file)"))?;
        let name = token_name(token).ok_or_else(|| unauthorized("the token is not an agent token (agt_NAME_SECRET); `apitree agent token` issues one"))?;
        let inner = self.lock();
        let record = inner.agents.get(name);
        let presented = Sha256::digest(token.as_bytes());
        let matches = record.is_some_and(|r| {
            hex::decode(&r.token_sha256)
                .is_ok_and(|known| bool::from(known.as_slice().ct_eq(presented.as_slice())))
        });
        let Some(record) = record.filter(|_| matches).cloned() else {
            drop(inner);
            self.log_refused(name);
            return Err(unauthorized(
                "the token is not valid for this control plane; ask its operators for a new one",
            ));
        };
        if record.revoked {
            tracing::warn!(agent = %record.name, "a revoked agent tried to connect");
            return Err((
                StatusCode::FORBIDDEN,
                "revoked",
                format!(
                    "agent {} is revoked; ask the control plane's operators for a new token",
                    record.name
                ),
            ));
        }
        drop(inner);
        self.seen(&record, |_| {});
        Ok(record)
    }

    /// Logs a refused token: the first, then at most one line per [`REFUSED_LOG_EVERY`] with
    /// how many there were. Anyone can send tokens; the log must not be theirs to fill.
    fn log_refused(&self, name: &str) {
        let mut log = self.refused_log.lock().unwrap_or_else(|p| p.into_inner());
        log.0 += 1;
        if log.1.is_none_or(|at| at.elapsed() >= REFUSED_LOG_EVERY) {
            let shown: String = name.chars().take(63).collect();
            tracing::warn!(agent = ?shown, refused = log.0, "agent token(s) refused: unknown agent or wrong token (the latest shown; apitree_agent_hub_requests_total counts them all)");
            *log = (0, Some(std::time::Instant::now()));
        }
    }

    /// Records that `agent` was seen now, updating its status with `update`.
    fn seen(&self, agent: &AgentRecord, update: impl FnOnce(&mut Seen)) {
        let mut inner = self.lock();
        let entry = inner
            .seen
            .entry(agent.name.clone())
            .or_insert_with(|| Seen {
                status: AgentStatus {
                    name: agent.name.clone(),
                    pool: agent.pool.clone(),
                    version: None,
                    generation: None,
                    refused: None,
                    last_seen: Utc::now(),
                    revoked: false,
                    preview: None,
                },
                metrics: String::new(),
                preview_metrics: String::new(),
            });
        entry.status.last_seen = Utc::now();
        entry.status.pool = agent.pool.clone();
        update(entry);
    }

    async fn config(
        self: &Arc<Self>,
        id: &str,
        agent: &AgentRecord,
        query: Option<&str>,
    ) -> (Answer, &'static str) {
        let mut after = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if k == "after" {
                match v.parse::<u64>() {
                    Ok(n) => after = Some(n),
                    Err(_) => {
                        return (
                            error(
                                id,
                                StatusCode::BAD_REQUEST,
                                "`after` is the generation the agent runs, a whole number",
                            ),
                            "bad_request",
                        )
                    }
                }
            }
        }
        let Some(_poll) = PollSlot::take(self, "config", &agent.name, MAX_POLLS_PER_AGENT) else {
            let mut resp = error(
                id,
                StatusCode::TOO_MANY_REQUESTS,
                &format!("agent {} already has {MAX_POLLS_PER_AGENT} configuration requests open; one is enough", agent.name),
            );
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
            return (resp, "too_many");
        };
        self.follow(&agent.pool, after);
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.long_poll;
        loop {
            // Looked up again after every wake-up: the agent may have been revoked meanwhile.
            {
                let inner = self.lock();
                match inner.agents.get(&agent.name) {
                    Some(a) if a.revoked => {
                        return (
                            error(id, StatusCode::FORBIDDEN, &format!("agent {} is revoked; ask the control plane's operators for a new token", a.name)),
                            "revoked",
                        )
                    }
                    // Gone from the file, or given a new token since this request began.
                    Some(a) if a.token_sha256 == agent.token_sha256 => {}
                    _ => {
                        return (
                            error(id, StatusCode::UNAUTHORIZED, "the token is not valid for this control plane; ask its operators for a new one"),
                            "unauthorized",
                        )
                    }
                }
                // A pool the agents file no longer binds to a gateway receives nothing.
                let bound = inner.bindings.contains_key(&agent.pool);
                if let Some(p) = inner.pools.get(&agent.pool).filter(|_| bound) {
                    if after.is_none_or(|a| p.generation > a) {
                        let mut resp = Response::new(Full::new(p.body.clone()));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        with_id(&mut resp, id);
                        return (resp, "ok");
                    }
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.seen(agent, |_| {});
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        with_id(&mut resp, id);
        (resp, "unchanged")
    }

    async fn report<B>(&self, id: &str, agent: &AgentRecord, body: B) -> (Answer, &'static str)
    where
        B: http_body::Body + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(_slot) = PollSlot::take(self, "report", &agent.name, MAX_REPORTS_PER_AGENT) else {
            let mut resp = error(
                id,
                StatusCode::TOO_MANY_REQUESTS,
                &format!("agent {} already has {MAX_REPORTS_PER_AGENT} reports in flight; send one at a time", agent.name),
            );
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
            return (resp, "too_many");
        };
        let collected =
            tokio::time::timeout(REPORT_READ, Limited::new(body, MAX_REPORT_BYTES).collect()).await;
        let refuse = |status, message: &str| (error(id, status, message), "bad_request");
        let bytes = match collected {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(StatusCode::PAYLOAD_TOO_LARGE, "a report is at most 1 MiB")
            }
            Ok(Err(_)) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "the report's body did not arrive whole (a broken chunked encoding?)",
                )
            }
            Err(_) => {
                return refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "the report's body must arrive within 10 s",
                )
            }
        };
        let report: Report = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return (
                    error(
                        id,
                        StatusCode::BAD_REQUEST,
                        &format!("the report is not valid JSON of the expected shape: {e}"),
                    ),
                    "bad_request",
                )
            }
        };
        if let Some(problem) = metrics_problem(&report.metrics) {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("the report's metrics are refused: {problem}"),
            );
        }
        let mut preview = report.preview;
        if let Some(p) = &preview {
            if let Some(problem) = preview_problem(p) {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    &format!("the report's preview is refused: {problem}"),
                );
            }
        }
        let preview_metrics = preview
            .as_mut()
            .map(|p| std::mem::take(&mut p.metrics))
            .unwrap_or_default();
        if let Some(p) = preview.as_mut() {
            for text in [&mut p.refused, &mut p.not_ready].into_iter().flatten() {
                *text = clean(text, MAX_REASON);
            }
            for s in &mut p.smoke {
                s.detail = clean(&s.detail, 200);
            }
        }
        self.seen(agent, |seen| {
            let status = &mut seen.status;
            status.version = Some(clean(&report.version, 64));
            status.generation = report.generation;
            status.refused = report.refused.map(|mut r| {
                r.reason = clean(&r.reason, MAX_REASON);
                r
            });
            status.preview = preview;
            seen.metrics = report.metrics;
            seen.preview_metrics = preview_metrics;
        });
        // The pool's candidate, if the gate is checking one, goes back with the answer.
        let candidate = offered(&self.lock(), &agent.pool).map(|c| c.body.clone());
        let mut resp = match candidate {
            Some(body) => {
                let mut resp = Response::new(Full::new(body));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                resp
            }
            None => {
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }
        };
        with_id(&mut resp, id);
        (resp, "ok")
    }
}

/// Where and how a control plane serves its agent endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// Address of the agent endpoint's listener.
    pub listen: String,
    /// Its certificate chain and key (PEM): agents only speak TLS 1.3.
    pub tls: (std::path::PathBuf, std::path::PathBuf),
    /// The configuration-signing key (`apitree agent keygen`).
    pub signing_key: std::path::PathBuf,
    /// The agents file, read again when it changes (a revocation needs no restart).
    pub agents_file: std::path::PathBuf,
}

/// How often the agents file is looked at.
const AGENTS_FILE_EVERY: Duration = Duration::from_secs(2);

/// Starts the agent endpoint: loads the key and the agents file, binds, serves over TLS and
/// watches the agents file. Fails, saying which, when any of them is unusable.
pub async fn start_endpoint(
    opts: &EndpointOptions,
    registry: &Registry,
) -> Result<(Arc<Hub>, std::net::SocketAddr), String> {
    let signer =
        Signer::from_file(&opts.signing_key).map_err(|e| format!("--agent-signing-key: {e}"))?;
    let agents = AgentsFile::load(&opts.agents_file).map_err(|e| format!("--agents-file: {e}"))?;
    let tls = crate::small_http::tls(&opts.tls.0, &opts.tls.1, registry, "apitree_agent_hub")
        .map_err(|e| format!("--agent-tls-cert/--agent-tls-key: {e}"))?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| {
            format!(
                "--agent-listen {}: {e}; is another process using the port?",
                opts.listen
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("--agent-listen {}: {e}", opts.listen))?;
    let hub = Hub::new(signer, agents, registry);
    tracing::info!(%addr, key = %hub.signer.public_key(), agents = hub.lock().agents.len(), "serving the Connector Agent endpoint");
    tokio::spawn(
        hub.clone()
            .serve(listener, Some(tls), std::future::pending()),
    );
    tokio::spawn(watch_agents_file(hub.clone(), opts.agents_file.clone()));
    Ok((hub, addr))
}

/// Reads the agents file again whenever its content changes; a file that does not read keeps
/// the agents as they were, and says why.
async fn watch_agents_file(hub: Arc<Hub>, path: std::path::PathBuf) {
    let mut applied = std::fs::read(&path).ok();
    let mut seen = applied.clone();
    loop {
        tokio::time::sleep(AGENTS_FILE_EVERY).await;
        let now = std::fs::read(&path).ok();
        // Taken once it reads the same twice in a row: a file caught half-written is not.
        let stable = now == seen;
        seen = now.clone();
        if !stable || now == applied {
            continue;
        }
        applied = now;
        match AgentsFile::load(&path) {
            Ok(file) => {
                tracing::info!(
                    agents = file.agents.len(),
                    revoked = file.agents.iter().filter(|a| a.revoked).count(),
                    pools = file.pools.len(),
                    "agents file read again"
                );
                hub.set_agents(file);
            }
            Err(e) => tracing::error!("{e}; the agents stay as they were"),
        }
    }
}

/// Text an agent sent, as the control plane keeps it: cut to `max` characters (marked when
/// cut), every control character (a newline, an escape sequence) and every invisible format
/// character (bidi overrides and isolates, zero-width characters, line and paragraph
/// separators) replaced by `\u{FFFD}`, so it cannot forge log lines, drive a terminal or
/// reorder what an operator reads where the reason is shown.
fn clean(text: &str, max: usize) -> String {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c,
                '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}')
    };
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if unsafe_char(c) { '\u{FFFD}' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// `pool`'s candidate, if one is offered by the gateway the pool is bound to now (one offered
/// before the agents file bound the pool elsewhere is not).
fn offered<'a>(inner: &'a Inner, pool: &str) -> Option<&'a Candidate> {
    let owner = inner.bindings.get(pool)?;
    inner.previews.get(pool).filter(|c| &c.gateway == owner)
}

/// Why a pool's binding does not let `gateway` configure it.
fn bound_to(inner: &Inner, gateway: &str, pool: &str) -> Result<(), PublishError> {
    match inner.bindings.get(pool) {
        None => Err(PublishError::Unbound {
            pool: pool.into(),
            gateway: gateway.into(),
        }),
        Some(owner) if owner != gateway => Err(PublishError::Taken {
            pool: pool.into(),
            gateway: gateway.into(),
            owner: owner.clone(),
        }),
        Some(_) => Ok(()),
    }
}

/// The next generation of `pool` (configurations and candidates share the sequence): at
/// least one more than the last, and at least the time in milliseconds.
fn next_generation(inner: &Inner, pool: &str) -> u64 {
    let last = [
        inner.pools.get(pool).map(|p| p.generation),
        inner.previews.get(pool).map(|c| c.generation),
    ]
    .into_iter()
    .flatten()
    .max();
    last.map_or(0, |g| g.saturating_add(1))
        .max(Utc::now().timestamp_millis().max(0) as u64)
}

/// Why the preview part of a report cannot be taken: its metrics are not counts, or its smoke
/// probes are too many or not plainly named.
fn preview_problem(p: &PreviewReport) -> Option<String> {
    if let Some(problem) = metrics_problem(&p.metrics) {
        return Some(problem);
    }
    if p.smoke.len() > MAX_SMOKE {
        return Some(format!(
            "{} smoke probes; at most {MAX_SMOKE}",
            p.smoke.len()
        ));
    }
    p.smoke
        .iter()
        .find(|s| !super::report::plain(&s.name))
        .map(|_| "a smoke probe's name is not a plain name ([a-z0-9._-], at most 63)".to_string())
}

/// Why a report's metrics text cannot be taken: it does not parse, or a value is not a count
/// (negative, not finite, or beyond [`MAX_REPORTED_VALUE`]). What an agent reports goes into
/// the detector's sums.
fn metrics_problem(text: &str) -> Option<String> {
    let scrape = match prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))) {
        Ok(s) => s,
        Err(e) => return Some(format!("not Prometheus text: {e}")),
    };
    let count = |v: &f64| v.is_finite() && (0.0..=MAX_REPORTED_VALUE).contains(v);
    for s in &scrape.samples {
        let values: Vec<f64> = match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => vec![*v],
            prometheus_parse::Value::Histogram(h) => {
                if let Some(b) = h.iter().find(|c| c.less_than.is_nan() || c.less_than < 0.0) {
                    return Some(format!(
                        "{} has a bucket bound of {}",
                        s.metric, b.less_than
                    ));
                }
                h.iter().map(|c| c.count).collect()
            }
            prometheus_parse::Value::Summary(q) => {
                if let Some(b) = q.iter().find(|c| !(0.0..=1.0).contains(&c.quantile)) {
                    return Some(format!("{} has a quantile of {}", s.metric, b.quantile));
                }
                q.iter().map(|c| c.count).collect()
            }
        };
        if let Some(v) = values.iter().find(|v| !count(v)) {
            return Some(format!(
                "{} has the value {v}; a report holds counts from 0 to {MAX_REPORTED_VALUE:e}",
                s.metric
            ));
        }
    }
    None
}

/// One of an agent's open requests to an endpoint, given back when the request ends.
struct PollSlot<'a> {
    hub: &'a Hub,
    key: (&'static str, String),
}

impl<'a> PollSlot<'a> {
    /// A slot when `agent` has fewer than `max` requests to `endpoint` open.
    fn take(hub: &'a Hub, endpoint: &'static str, agent: &str, max: usize) -> Option<Self> {
        let key = (endpoint, agent.to_string());
        let mut inner = hub.lock();
        let open = inner.polls.entry(key.clone()).or_default();
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(Self { hub, key })
    }
}

impl Drop for PollSlot<'_> {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(open) = inner.polls.get_mut(&self.key) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                inner.polls.remove(&self.key);
            }
        }
    }
}

fn with_id(resp: &mut Answer, id: &str) {
    if let Ok(v) = http::HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
}

/// A JSON error: what is wrong and what to do, with the request id.
fn error(id: &str, status: StatusCode, message: &str) -> Answer {
    let body = serde_json::json!({ "error": message, "request_id": id });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    with_id(&mut resp, id);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> (Arc<Hub>, String, String) {
        let (t1, a1) = new_token("bank-a-1", "bank-a").unwrap();
        let (t2, mut a2) = new_token("bank-a-2", "bank-a").unwrap();
        a2.revoked = true;
        let signer = Signer::parse(&Signer::generate_text()).unwrap();
        let file = AgentsFile {
            pools: vec![PoolBinding {
                name: "bank-a".into(),
                gateway: "ns/bank".into(),
            }],
            agents: vec![a1, a2],
        };
        let hub =
            Hub::new(signer, file, &Registry::new()).with_long_poll(Duration::from_millis(50));
        (hub, t1, t2)
    }

    fn publish(hub: &Hub, cfg: AgentConfig) -> u64 {
        hub.publish("ns/bank", "bank-a", cfg).unwrap()
    }

    fn get(path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
        let mut b = Request::get(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::new())).unwrap()
    }

    async fn body(resp: Answer) -> (StatusCode, serde_json::Value) {
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Every way a token can be wrong is refused with a JSON error and a request id, and no
    /// answer repeats the token.
    #[tokio::test]
    async fn tokens_are_checked_and_never_echoed() {
        let (hub, good, revoked) = hub();
        let forged = format!("{}x", &good[..good.len() - 1]);
        let other_name = good.replace("bank-a-1", "bank-a-2");
        let cases: Vec<(Option<String>, StatusCode)> = vec![
            (None, StatusCode::UNAUTHORIZED),
            (Some("".into()), StatusCode::UNAUTHORIZED),
            (Some("agt_".into()), StatusCode::UNAUTHORIZED),
            (Some("not-a-token".into()), StatusCode::UNAUTHORIZED),
            (Some("agt_nobody_AAAA".into()), StatusCode::UNAUTHORIZED),
            (Some(forged), StatusCode::UNAUTHORIZED),
            (Some(other_name), StatusCode::UNAUTHORIZED),
            (
                Some(good[..good.len() - 1].to_string()),
                StatusCode::UNAUTHORIZED,
            ),
            (Some(revoked.clone()), StatusCode::FORBIDDEN),
        ];
        for (token, want) in cases {
            let resp = hub.handle(get("/agent/v1/config", token.as_deref())).await;
            assert!(resp.headers().contains_key("x-request-id"));
            let (status, json) = body(resp).await;
            assert_eq!(status, want, "{token:?}");
            assert!(json["request_id"].is_string() && json["error"].is_string());
            if let Some(t) = token.filter(|t| t.len() > 8) {
                assert!(!json.to_string().contains(&t[4..]), "token echoed");
            }
        }
        // The good token: nothing published yet, so the long poll ends in 304.
        let resp = hub.handle(get("/agent/v1/config", Some(&good))).await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    }

    // On a paused clock: a sleep returns only once every spawned poll is parked.
    #[tokio::test(start_paused = true)]
    async fn a_long_poll_wakes_for_a_new_generation_and_for_a_revocation() {
        let (hub, good, _) = hub();
        let g1 = publish(&hub, AgentConfig::default());
        assert_eq!(
            publish(&hub, AgentConfig::default()),
            g1,
            "same config, same generation"
        );
        let resp = hub.handle(get("/agent/v1/config", Some(&good))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let uri = format!("/agent/v1/config?after={g1}");
        assert_eq!(
            hub.handle(get(&uri, Some(&good))).await.status(),
            StatusCode::NOT_MODIFIED
        );
        let hub = Hub {
            long_poll: Duration::from_secs(30),
            ..Arc::into_inner(hub).unwrap()
        };
        let hub = Arc::new(hub);
        let waiting = tokio::spawn({
            let (hub, good, uri) = (hub.clone(), good.clone(), uri.clone());
            async move { hub.handle(get(&uri, Some(&good))).await.status() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cfg = AgentConfig {
            default_tier: Some("gold".into()),
            ..Default::default()
        };
        let g2 = publish(&hub, cfg);
        assert!(g2 > g1);
        assert_eq!(waiting.await.unwrap(), StatusCode::OK);
        // Revoked while waiting: the wait ends with 403.
        let waiting = tokio::spawn({
            let (hub, good) = (hub.clone(), good.clone());
            async move {
                hub.handle(get(&format!("/agent/v1/config?after={g2}"), Some(&good)))
                    .await
                    .status()
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut agents: Vec<_> = hub.lock().agents.values().cloned().collect();
        agents.iter_mut().for_each(|a| a.revoked = true);
        hub.set_agents(AgentsFile {
            pools: vec![],
            agents,
        });
        assert_eq!(waiting.await.unwrap(), StatusCode::FORBIDDEN);
        // Given a new token while waiting: the old one's wait ends with 401.
        let (hub, good, _) = self::hub();
        let hub = Arc::new(Hub {
            long_poll: Duration::from_secs(30),
            ..Arc::into_inner(hub).unwrap()
        });
        let waiting = tokio::spawn({
            let (hub, good) = (hub.clone(), good.clone());
            async move {
                hub.handle(get("/agent/v1/config", Some(&good)))
                    .await
                    .status()
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, reissued) = new_token("bank-a-1", "bank-a").unwrap();
        hub.set_agents(AgentsFile {
            pools: vec![],
            agents: vec![reissued],
        });
        assert_eq!(waiting.await.unwrap(), StatusCode::UNAUTHORIZED);
    }

    /// Only the gateway the agents file binds a pool to publishes to it; a pool bound to none
    /// receives nothing.
    #[test]
    fn a_pool_is_configured_by_its_bound_gateway_only() {
        let (hub, _, _) = hub();
        assert!(matches!(
            hub.publish("ns/other", "bank-a", AgentConfig::default()),
            Err(PublishError::Taken { .. })
        ));
        let unbound = hub.publish("ns/bank", "bank-b", AgentConfig::default());
        assert!(matches!(unbound, Err(PublishError::Unbound { .. })));
        assert!(unbound.unwrap_err().to_string().contains("pools:"));
        assert_eq!(hub.generation("bank-a"), None);
        assert!(hub
            .publish("ns/bank", "bank-a", AgentConfig::default())
            .is_ok());
    }

    /// A pool whose binding is taken out of the agents file receives nothing more, although
    /// a configuration was published for it.
    #[tokio::test]
    async fn an_unbound_pool_is_served_nothing() {
        let (hub, good, _) = hub();
        publish(&hub, AgentConfig::default());
        let first = hub.handle(get("/agent/v1/config", Some(&good))).await;
        assert_eq!(first.status(), StatusCode::OK);
        let agents = hub.lock().agents.values().cloned().collect();
        hub.set_agents(AgentsFile {
            pools: vec![],
            agents,
        });
        let after = hub.handle(get("/agent/v1/config", Some(&good))).await;
        assert_eq!(after.status(), StatusCode::NOT_MODIFIED);
    }

    /// An agents file that leaves which entry counts to a guess is refused whole.
    #[test]
    fn an_agents_file_with_an_agent_or_pool_twice_is_refused() {
        let (_, a) = new_token("a-1", "p").unwrap();
        let twice = AgentsFile {
            pools: vec![],
            agents: vec![a.clone(), AgentRecord { revoked: true, ..a }],
        };
        assert!(twice.check().unwrap_err().contains("listed twice"));
        let bind = |g: &str| PoolBinding {
            name: "p".into(),
            gateway: g.into(),
        };
        let pools = AgentsFile {
            pools: vec![bind("x"), bind("y")],
            agents: vec![],
        };
        assert!(pools.check().unwrap_err().contains("one gateway"));
        // An empty file, or one cut before an entry's `revoked:`, is no agents file.
        let (_, r) = new_token("a-1", "p").unwrap();
        let whole = format!(
            "agents:\n  - {{ name: a-1, pool: p, tokenSha256: {}, revoked: true }}\n",
            r.token_sha256
        );
        assert!(serde_saphyr::from_str::<AgentsFile>(&whole).is_ok());
        let cut = whole.replace(", revoked: true", "");
        for text in ["", "pools: []\n", cut.as_str()] {
            assert!(
                serde_saphyr::from_str::<AgentsFile>(text).is_err(),
                "{text:?} read"
            );
        }
    }

    /// An agent that runs a generation this control plane never reached (it restarted
    /// without memory, or its clock went back) is given the configuration again above it:
    /// once a minute at most, and never beyond 30 days past this clock, however the agent
    /// steps.
    #[tokio::test]
    async fn a_generation_ahead_of_the_control_plane_is_followed_within_bounds() {
        let now_ms = Utc::now().timestamp_millis() as u64;
        let (hub, good, _) = hub();
        let g = publish(&hub, AgentConfig::default());
        let ahead = g + 86_400_000;
        let ask = |after: u64| get(&format!("/agent/v1/config?after={after}"), Some(&good));
        assert_eq!(hub.handle(ask(ahead)).await.status(), StatusCode::OK);
        assert_eq!(hub.generation("bank-a"), Some(ahead + 1));
        // Again at once: not followed (one agent cannot make its pool reload endlessly).
        let again = hub.handle(ask(ahead + 5)).await.status();
        assert_eq!(again, StatusCode::NOT_MODIFIED);
        assert_eq!(hub.generation("bank-a"), Some(ahead + 1));
        // Beyond 30 days past this clock: never, on a fresh hub too.
        let (fresh, good, _) = self::hub();
        publish(&fresh, AgentConfig::default());
        let far = now_ms + MAX_GENERATION_AHEAD_MS + 86_400_000;
        let resp = fresh
            .handle(get(&format!("/agent/v1/config?after={far}"), Some(&good)))
            .await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert!(fresh.generation("bank-a").unwrap() < far);
    }

    /// One agent holds at most a few config requests open; more are answered 429 and the
    /// slots come back when the requests end.
    // On a paused clock: a sleep returns only once every spawned poll is parked.
    #[tokio::test(start_paused = true)]
    async fn an_agent_holds_a_bounded_number_of_long_polls() {
        let (hub, good, _) = hub();
        let hub = Arc::new(Hub {
            long_poll: Duration::from_millis(400),
            ..Arc::into_inner(hub).unwrap()
        });
        let waiting: Vec<_> = (0..MAX_POLLS_PER_AGENT)
            .map(|_| {
                let (hub, good) = (hub.clone(), good.clone());
                tokio::spawn(async move {
                    hub.handle(get("/agent/v1/config", Some(&good)))
                        .await
                        .status()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let extra = hub.handle(get("/agent/v1/config", Some(&good))).await;
        assert_eq!(extra.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(extra.headers().contains_key("retry-after"));
        for w in waiting {
            assert_eq!(w.await.unwrap(), StatusCode::NOT_MODIFIED);
        }
        assert!(hub.lock().polls.is_empty());
        let again = hub.handle(get("/agent/v1/config", Some(&good))).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    }

    /// A bucket bound no histogram has, for each bad count of the report test (`1e30` and
    /// `1e16` are fine bounds, so those use NaN).
    fn bound(value: &str) -> &str {
        match value {
            "-1" | "-Inf" => value,
            _ => "NaN",
        }
    }

    #[tokio::test]
    async fn reports_are_checked_and_kept() {
        let (hub, good, _) = hub();
        let post = |body: &str| {
            Request::post("/agent/v1/report")
                .header("authorization", format!("Bearer {good}"))
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        };
        for bad in [
            "",
            "{",
            r#"{"version":"1"}"#,
            r#"{"version":"1","generation":1,"metrics":"","extra":1}"#,
        ] {
            let (status, json) = body(hub.handle(post(bad)).await).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(json["error"].as_str().unwrap().contains("report"), "{json}");
        }
        let big = format!(
            r#"{{"version":"1","generation":1,"metrics":"{}"}}"#,
            "#".repeat(MAX_REPORT_BYTES)
        );
        assert_eq!(
            hub.handle(post(&big)).await.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        // Every way a number can be no count: the detector sums what agents report.
        for value in ["-1", "1e30", "+Inf", "-Inf", "NaN", "1e16"] {
            for family in [
                format!("apitree_proxy_requests_total{{route=\"a\",status_class=\"2xx\"}} {value}"),
                format!("apitree_proxy_auth_failures_total{{reason=\"x\"}} {value}"),
                format!("# TYPE h histogram\nh_bucket{{le=\"+Inf\"}} {value}\nh_sum 1\nh_count 1"),
                format!(
                    "# TYPE h histogram\nh_bucket{{le=\"{}\"}} 1\nh_sum 1\nh_count 1",
                    bound(value)
                ),
            ] {
                let report = serde_json::json!({"version": "1", "generation": 1, "metrics": format!("{family}\n")});
                let (status, json) = body(hub.handle(post(&report.to_string())).await).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{family}");
                let error = json["error"].as_str().unwrap();
                assert!(
                    error.contains("counts from 0") || error.contains("bound"),
                    "{json}"
                );
            }
        }
        // A refusal reason is kept short, whatever an agent sends.
        let long = serde_json::json!({"version": "1", "generation": 1, "metrics": "",
            "refused": {"generation": 2, "reason": "x".repeat(100_000)}});
        assert_eq!(
            hub.handle(post(&long.to_string())).await.status(),
            StatusCode::NO_CONTENT
        );
        let kept = hub.agents()[0].refused.clone().unwrap().reason;
        assert!(
            kept.chars().count() <= MAX_REASON + 1,
            "{} characters kept",
            kept.len()
        );
        let ok = r#"{"version":"0.1.0","generation":5,"metrics":"apitree_proxy_requests_total{route=\"a\",status_class=\"2xx\"} 3\n"}"#;
        assert_eq!(hub.handle(post(ok)).await.status(), StatusCode::NO_CONTENT);
        let status = hub.agents();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].name, "bank-a-1");
        assert_eq!(status[0].generation, Some(5));
        assert_eq!(status[0].version.as_deref(), Some("0.1.0"));
        assert!(hub
            .agent_metrics("bank-a-1")
            .unwrap()
            .contains("status_class"));
    }

    /// While a candidate is offered, the answer to every report carries it, signed and marked
    /// so it opens only as a candidate; withdrawn, the answer is empty again. Only the bound
    /// gateway offers or withdraws one.
    #[tokio::test]
    async fn a_candidate_travels_with_the_report_answer() {
        let (hub, good, _) = hub();
        let post = |body: serde_json::Value| {
            Request::post("/agent/v1/report")
                .header("authorization", format!("Bearer {good}"))
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        };
        let plain = serde_json::json!({"version": "1", "generation": 1, "metrics": ""});
        assert_eq!(
            hub.handle(post(plain.clone())).await.status(),
            StatusCode::NO_CONTENT
        );
        let g1 = publish(&hub, AgentConfig::default());
        let cfg = AgentConfig {
            default_tier: Some("gold".into()),
            ..Default::default()
        };
        assert!(matches!(
            hub.publish_preview("ns/other", "bank-a", "rev-b", cfg.clone()),
            Err(PublishError::Taken { .. })
        ));
        assert!(matches!(
            hub.publish_preview("ns/bank", "bank-z", "rev-b", cfg.clone()),
            Err(PublishError::Unbound { .. })
        ));
        let g2 = hub
            .publish_preview("ns/bank", "bank-a", "rev-b", cfg.clone())
            .unwrap();
        assert!(g2 > g1, "candidates share the pool's sequence");
        assert_eq!(
            hub.publish_preview("ns/bank", "bank-a", "rev-b", cfg.clone())
                .unwrap(),
            g2,
            "the same candidate keeps its generation"
        );
        assert_eq!(
            hub.generation("bank-a"),
            Some(g1),
            "the served generation stays"
        );
        let (status, json) = body(hub.handle(post(plain.clone())).await).await;
        assert_eq!(status, StatusCode::OK);
        let env: super::super::envelope::Envelope =
            serde_json::from_value(json["preview"].clone()).unwrap();
        let key = *hub.signer.public_key();
        let payload = key.open_preview(&env, "bank-a").unwrap();
        assert_eq!((payload.generation, payload.config), (g2, cfg));
        assert_eq!(
            key.open(&env, "bank-a", None),
            Err(super::super::envelope::EnvelopeError::PreviewAsActive)
        );
        // Another gateway cannot withdraw it; the one that offered it can.
        hub.retain_previews("ns/other", &[]);
        assert_eq!(
            hub.preview_of("ns/bank", "bank-a"),
            Some(("rev-b".into(), g2))
        );
        assert_eq!(hub.preview_of("ns/other", "bank-a"), None);
        hub.retain_previews("ns/bank", &["bank-a"]);
        assert_eq!(
            hub.preview_of("ns/bank", "bank-a"),
            Some(("rev-b".into(), g2))
        );
        // The agents file binds the pool elsewhere: the old gateway's candidate is not served.
        let mut file = AgentsFile {
            pools: vec![PoolBinding {
                name: "bank-a".into(),
                gateway: "ns/other".into(),
            }],
            agents: hub.lock().agents.values().cloned().collect(),
        };
        hub.set_agents(file.clone());
        assert_eq!(
            hub.handle(post(plain.clone())).await.status(),
            StatusCode::NO_CONTENT
        );
        assert_eq!(hub.preview_of("ns/other", "bank-a"), None);
        file.pools[0].gateway = "ns/bank".into();
        hub.set_agents(file);
        assert_eq!(
            hub.handle(post(plain.clone())).await.status(),
            StatusCode::OK
        );
        hub.retain_previews("ns/bank", &[]);
        assert_eq!(hub.preview_of("ns/bank", "bank-a"), None);
        assert_eq!(
            hub.handle(post(plain)).await.status(),
            StatusCode::NO_CONTENT
        );
    }

    /// What an agent reports about a candidate is checked like the rest of a report, kept
    /// apart from what it serves, and cut to size.
    #[tokio::test]
    async fn a_candidates_report_is_checked_and_kept_apart() {
        let (hub, good, _) = hub();
        let post = |preview: serde_json::Value| {
            let report = serde_json::json!({"version": "1", "generation": 1, "metrics": "", "preview": preview});
            Request::post("/agent/v1/report")
                .header("authorization", format!("Bearer {good}"))
                .body(Full::new(Bytes::from(report.to_string())))
                .unwrap()
        };
        let smoke = |name: &str| serde_json::json!({"name": name, "passed": true, "detail": "ok"});
        let many: Vec<_> = (0..=MAX_SMOKE).map(|i| smoke(&format!("p{i}"))).collect();
        for (what, bad) in [
            (
                "a name that is not plain",
                serde_json::json!({"generation": 2, "smoke": [smoke("Bad Name")]}),
            ),
            (
                "a name too long",
                serde_json::json!({"generation": 2, "smoke": [smoke(&"a".repeat(64))]}),
            ),
            (
                "too many probes",
                serde_json::json!({"generation": 2, "smoke": many}),
            ),
            (
                "metrics that are no counts",
                serde_json::json!({"generation": 2, "metrics": "apitree_proxy_requests_total{route=\"a\",status_class=\"5xx\"} 1e30\n"}),
            ),
            (
                "an unknown field",
                serde_json::json!({"generation": 2, "upstream": "http://10.0.0.1/"}),
            ),
        ] {
            let (status, json) = body(hub.handle(post(bad)).await).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
            assert!(
                json["error"].as_str().unwrap().contains("report"),
                "{what}: {json}"
            );
        }
        let metrics = "apitree_proxy_requests_total{route=\"accounts\",status_class=\"2xx\"} 7\n";
        let good_preview = serde_json::json!({
            "generation": 2, "ready": false, "notReady": "x".repeat(5000),
            "smoke": [{"name": "balance", "passed": false, "detail": "d".repeat(5000)}],
            "metrics": metrics,
        });
        assert_eq!(
            hub.handle(post(good_preview)).await.status(),
            StatusCode::NO_CONTENT
        );
        let agent = hub
            .agents()
            .into_iter()
            .find(|a| a.name == "bank-a-1")
            .unwrap();
        let p = agent.preview.unwrap();
        assert!(
            p.metrics.is_empty(),
            "metrics are kept apart from the status"
        );
        assert!(p.not_ready.unwrap().chars().count() <= MAX_REASON + 1);
        assert!(p.smoke[0].detail.chars().count() <= 201);
        assert!(hub.pool_metrics(&["bank-a"]).is_empty());
        let kept = hub.preview_metrics(&["bank-a"]);
        assert_eq!(kept.len(), 1);
        assert!(kept[0].1.contains("route=\"accounts\""), "{kept:?}");
    }

    /// Whatever text an agent sends (its version, a refusal, a candidate's readiness or probe
    /// detail), no control character is kept: none can forge a log line or a terminal
    /// sequence where the control plane shows it.
    #[tokio::test]
    async fn an_agents_text_is_kept_without_control_characters() {
        let (hub, good, _) = hub();
        let nasty =
            "ok\n2026-12-07T01:40:00Z  INFO 5/5 passed\u{1b}[2J\r\t\u{0}\u{7f}\u{85}\u{202e}\u{2066}\u{200b}\u{2028}\u{feff}end";
        let report = serde_json::json!({
            "version": nasty, "generation": 1, "metrics": "",
            "refused": {"generation": 2, "reason": nasty},
            "preview": {"generation": 3, "refused": nasty, "notReady": nasty,
                        "smoke": [{"name": "p", "passed": false, "detail": nasty}]},
        });
        let req = Request::post("/agent/v1/report")
            .header("authorization", format!("Bearer {good}"))
            .body(Full::new(Bytes::from(report.to_string())))
            .unwrap();
        assert_eq!(hub.handle(req).await.status(), StatusCode::NO_CONTENT);
        let a = hub
            .agents()
            .into_iter()
            .find(|a| a.name == "bank-a-1")
            .unwrap();
        let p = a.preview.clone().unwrap();
        let texts = [
            a.version.unwrap(),
            a.refused.unwrap().reason,
            p.refused.unwrap(),
            p.not_ready.unwrap(),
            p.smoke[0].detail.clone(),
        ];
        for t in texts {
            assert!(!t.chars().any(char::is_control), "{t:?}");
            for invisible in ['\u{202e}', '\u{2066}', '\u{200b}', '\u{2028}', '\u{feff}'] {
                assert!(!t.contains(invisible), "{t:?}");
            }
            assert!(
                t.starts_with("ok\u{FFFD}2026") && t.contains("end") || t.ends_with('…'),
                "{t:?}"
            );
        }
    }

    /// One token holds at most MAX_REPORTS_PER_AGENT reports in flight: the next is answered
    /// 429, and slots come back when reports end (here: their bodies never arrive and time
    /// out).
    #[tokio::test(start_paused = true)]
    async fn an_agent_holds_a_bounded_number_of_reports_in_flight() {
        type Pending = http_body_util::StreamBody<
            futures::stream::Pending<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
        >;
        let (hub, good, _) = hub();
        let slow = || {
            Request::post("/agent/v1/report")
                .header("authorization", format!("Bearer {good}"))
                .body(Pending::new(futures::stream::pending()))
                .unwrap()
        };
        let in_flight: Vec<_> = (0..MAX_REPORTS_PER_AGENT)
            .map(|_| {
                let (hub, req) = (hub.clone(), slow());
                tokio::spawn(async move { hub.handle(req).await.status() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let extra = hub.handle(slow()).await;
        assert_eq!(extra.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(extra.headers().contains_key("retry-after"));
        for r in in_flight {
            assert_eq!(r.await.unwrap(), StatusCode::REQUEST_TIMEOUT);
        }
        assert!(hub.lock().polls.is_empty());
    }
}
