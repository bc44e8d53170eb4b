//! The ApiGateway controller in a cluster: kube-runtime's Controller drives `reconcile`, wrapped
//! in the finalizer helper so deleting a gateway deletes its children first. Each pass loads the
//! gateway's status from the object (so a restarted operator resumes mid-gate), runs the shared
//! loop (`rollout::reconcile`) on the Kubernetes platform, publishes the pass's Events and writes
//! the status back with server-side apply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::apply;
use super::probes::SecretResolver;
use super::rollout::{self, Context, Managed, Press};
use crate::crd::gateway::{ApiGateway, GatewayPhase, SecretKeyRef};
use crate::dashboard::GatewayView;
use crate::detect::engine::IncidentStore;
use crate::gate::Request;
use crate::notify::slack::{slack_notifier, DeliveryTask, SlackConfig};
use crate::notify::{Channels, Notifier};
use crate::operator::http::HttpState;
use crate::operator::metrics::OperatorMetrics;
use crate::platform::kube::KubePlatform;
use crate::proxy::config::ProxyConfig;

/// Finalizer that makes deletion remove the gateway's children first.
pub const FINALIZER: &str = "apitree.io/cleanup";
pub use crate::operator::local::{PROMOTE_ANNOTATION, ROLLBACK_ANNOTATION};

/// Why a pass failed. Each variant names the operation; `category` is the metric label and the
/// Event reason.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot write the status of ApiGateway {name}: {source}")]
    PatchStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot delete the children of ApiGateway {name}: {source}")]
    Cleanup {
        name: String,
        #[source]
        source: crate::platform::PlatformError,
    },
    #[error("finalizer of ApiGateway {name}: {reason}")]
    Finalizer { name: String, reason: String },
}

impl ControllerError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::PatchStatus { .. } => "PatchStatus",
            Self::Cleanup { .. } => "Cleanup",
            Self::Finalizer { .. } => "Finalizer",
        }
    }
}

/// Everything the controller shares between passes.
pub struct Operator {
    pub client: Client,
    pub platform: Arc<KubePlatform>,
    pub metrics: Arc<OperatorMetrics>,
    pub notifier: Arc<Notifier>,
    pub store: Arc<IncidentStore>,
    /// Where state lives; gateways' own Slack apps get their outboxes here.
    durable: Arc<crate::operator::durable::Durable>,
    pub default_image: String,
    pub http: reqwest::Client,
    pub status_url: Option<String>,
    pub reporter: Reporter,
    /// The operator's clock; tests move it by hand.
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    pub views: Arc<HttpState>,
    /// Signing secrets of the gateways' Slack apps, shared with the interaction endpoint.
    pub signing_secrets: Arc<std::sync::RwLock<Vec<String>>>,
    /// Each gateway's state behind its own lock: a pass holds only its gateway's, so a slow
    /// probe of one gateway delays neither another's gate nor a Slack press.
    gateways: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Managed>>>>,
    /// What each gateway's last pass published (status page, metrics, sweep), readable while
    /// any pass runs.
    published: Mutex<std::collections::BTreeMap<String, Published>>,
    /// Sweep results waiting for their gateway's next pass.
    sweeps: Mutex<HashMap<String, crate::operator::gateway::sweep::SweepOutcome>>,
    /// Pools of the gateways' databases, for their audit logs.
    pools: tokio::sync::Mutex<HashMap<String, sqlx::PgPool>>,
    slack: Mutex<HashMap<String, GatewaySlack>>,
    /// Slack presses waiting for their gateway's next pass, with when they arrived.
    presses: Mutex<Vec<(Timestamp, Press)>>,
    failures: Mutex<HashMap<String, u32>>,
    /// The Connector Agent endpoint, when this operator serves one.
    pub agents: Option<Arc<crate::agent::hub::Hub>>,
}

/// What a gateway's last pass published.
struct Published {
    view: GatewayView,
    /// Open incidents by severity: warning, high, critical.
    incidents: [i64; 3],
    sweep: Option<crate::operator::gateway::sweep::SweepTarget>,
}

/// A gateway's own Slack delivery (`spec.escalation.slack`).
struct GatewaySlack {
    /// Digest of the token, signing secret and channels it was built from.
    fingerprint: String,
    signing_secret: Option<String>,
    notifier: Arc<Notifier>,
    delivery: Option<DeliveryTask>,
}

impl Operator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        platform: Arc<KubePlatform>,
        metrics: Arc<OperatorMetrics>,
        notifier: Arc<Notifier>,
        default_image: String,
        status_url: Option<String>,
        clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
        views: Arc<HttpState>,
    ) -> Self {
        Self {
            client,
            platform,
            metrics,
            notifier,
            store: Arc::new(IncidentStore::memory()),
            durable: Arc::new(crate::operator::durable::Durable::memory()),
            default_image,
            http: reqwest::Client::new(),
            status_url,
            reporter: reporter(),
            clock,
            views,
            signing_secrets: Arc::default(),
            gateways: Mutex::new(HashMap::new()),
            published: Mutex::new(Default::default()),
            sweeps: Mutex::new(HashMap::new()),
            pools: tokio::sync::Mutex::new(HashMap::new()),
            slack: Mutex::new(HashMap::new()),
            presses: Mutex::new(Vec::new()),
            failures: Mutex::new(HashMap::new()),
            agents: None,
        }
    }

    /// Keeps incidents, outboxes and baselines where `durable` says.
    pub fn set_durable(&mut self, durable: Arc<crate::operator::durable::Durable>) {
        self.store = durable.store.clone();
        self.durable = durable;
    }

    /// The notifier of one gateway: its own Slack app when `spec.escalation.slack` names one
    /// whose token resolves, else the operator's. Rebuilt when the token or channels change.
    fn notifier_for(
        &self,
        gateway: &str,
        spec: &crate::crd::gateway::EscalationSpec,
        secret: &SecretResolver,
    ) -> Result<Arc<Notifier>, String> {
        let mut slack = self.slack.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = &spec.slack else {
            if let Some(old) = slack.remove(gateway) {
                retire(old);
            }
            self.refresh_signing_secrets(&slack);
            return Ok(self.notifier.clone());
        };
        let Some(token) = secret(&s.token) else {
            return Err(format!(
                "Secret {} has no key {:?} with the Slack bot token; notifications go to the operator log",
                s.token.name, s.token.key
            ));
        };
        let signing_secret = secret(&s.signing_secret);
        let channels = Channels {
            warning: s.channels.warning.clone(),
            high: s.channels.high.clone(),
            critical: s.channels.critical.clone(),
        };
        let fingerprint = hex::encode(
            &<sha2::Sha256 as sha2::Digest>::digest(
                format!(
                    "{token}\n{}\n{channels:?}",
                    signing_secret.as_deref().unwrap_or("")
                )
                .as_bytes(),
            )[..8],
        );
        if let Some(current) = slack.get(gateway) {
            if current.fingerprint == fingerprint {
                return Ok(current.notifier.clone());
            }
        }
        let config = SlackConfig {
            token,
            signing_secret: signing_secret.clone(),
            api_url: SlackConfig::api_url_from_env(),
        };
        let views = self.views.clone();
        let (notifier, delivery) = slack_notifier(
            &config,
            channels,
            self.durable.outbox(gateway),
            Arc::new(move || views.delivers()),
        );
        let notifier = Arc::new(notifier);
        let previous = slack.insert(
            gateway.to_string(),
            GatewaySlack {
                fingerprint,
                signing_secret,
                notifier: notifier.clone(),
                delivery: Some(delivery),
            },
        );
        if let Some(old) = previous {
            retire(old);
        }
        self.refresh_signing_secrets(&slack);
        Ok(notifier)
    }

    fn refresh_signing_secrets(&self, slack: &HashMap<String, GatewaySlack>) {
        let secrets: Vec<String> = slack
            .values()
            .filter_map(|s| s.signing_secret.clone())
            .collect();
        *self
            .signing_secrets
            .write()
            .unwrap_or_else(|e| e.into_inner()) = secrets;
    }

    /// Appends `entries` (actor, action, detail) about `gateway` to its database's audit log.
    async fn audit(
        &self,
        gateway: &str,
        url: &str,
        entries: Vec<(String, String, serde_json::Value)>,
    ) {
        let pool = {
            let mut pools = self.pools.lock().await;
            match pools.get(url) {
                Some(p) => p.clone(),
                None => match crate::db::connect(url, 2).await {
                    Ok(p) => {
                        pools.insert(url.to_string(), p.clone());
                        p
                    }
                    Err(e) => {
                        self.metrics
                            .errors
                            .with_label_values(&["AuditFailed"])
                            .inc();
                        tracing::warn!(gateway, "cannot audit: {e}");
                        return;
                    }
                },
            }
        };
        for (actor, action, detail) in entries {
            if let Err(err) =
                crate::db::audit::append(&pool, &actor, &action, gateway, None, &detail).await
            {
                self.metrics
                    .errors
                    .with_label_values(&["AuditFailed"])
                    .inc();
                tracing::warn!(gateway, "cannot audit {action}: {err}");
            }
        }
    }

    /// The gateways the health sweep should look at: every one whose pass has run.
    pub async fn sweep_targets(&self) -> Vec<crate::operator::gateway::sweep::SweepTarget> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|p| p.sweep.clone())
            .collect()
    }

    /// Hands a sweep's results to the gateways; their next pass puts them in status.
    pub async fn record_sweep(&self, outcomes: Vec<crate::operator::gateway::sweep::SweepOutcome>) {
        let mut sweeps = self.sweeps.lock().unwrap_or_else(|e| e.into_inner());
        for o in outcomes {
            sweeps.insert(o.gateway.clone(), o);
        }
    }

    /// The state of every gateway, each behind its own lock.
    fn slots(&self) -> Vec<Arc<tokio::sync::Mutex<Managed>>> {
        self.gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Publishes what `m`'s pass leaves (status page, incident metrics, sweep target), and
    /// the whole page.
    fn publish(&self, m: &Managed) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.insert(
            m.name.clone(),
            Published {
                view: m.view(None),
                incidents: rollout::open_incident_counts(m),
                sweep: Some(m.sweep_target()),
            },
        );
        self.publish_all(&published);
    }

    fn publish_all(&self, published: &std::collections::BTreeMap<String, Published>) {
        let mut counts = [0i64; 3];
        for p in published.values() {
            for (c, n) in counts.iter_mut().zip(p.incidents) {
                *c += n;
            }
        }
        rollout::set_open_incidents(counts, &self.metrics);
        self.views
            .publish(published.values().map(|p| p.view.clone()).collect());
    }

    /// Takes a Slack press. Acknowledge and Silence apply at once (the on-call engineer sees the
    /// message change; the Event and audit row follow at the gateway's next pass); Promote and
    /// Roll back, and presses no gateway holds yet, wait for the next pass of the gateway they
    /// concern.
    pub async fn press(&self, p: Press) {
        let now = (self.clock)();
        if p.action.response(now.as_second()).is_some() {
            // Gateways between passes first; one in the middle of a pass is asked once its
            // pass ends, so only a press for that gateway waits for it.
            let mut busy = Vec::new();
            for slot in self.slots() {
                let Ok(mut m) = slot.try_lock() else {
                    busy.push(slot);
                    continue;
                };
                if m.accept(&p, now).await {
                    m.runtime.answered.push(p);
                    return;
                }
            }
            for slot in busy {
                let mut m = slot.lock().await;
                if m.accept(&p, now).await {
                    m.runtime.answered.push(p);
                    return;
                }
            }
        }
        self.presses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((now, p));
    }

    /// Hands the queued presses to `m`; returns the ones it took. A press no gateway takes
    /// within [`PRESS_TTL_SECS`] (its incident resolved, its revision gone) is dropped.
    async fn presses_for(&self, m: &mut Managed, now: Timestamp) -> Vec<Press> {
        let queued = std::mem::take(&mut *self.presses.lock().unwrap_or_else(|e| e.into_inner()));
        let mut taken = Vec::new();
        let mut left = Vec::new();
        for (at, p) in queued {
            if m.accept(&p, now).await {
                taken.push(p);
            } else if now.as_second() - at.as_second() < PRESS_TTL_SECS {
                left.push((at, p));
            } else {
                tracing::warn!(action = p.action.audit_name(), incident = %p.incident, user = %p.user_name,
                    "a Slack press no gateway took within {PRESS_TTL_SECS}s; dropped");
            }
        }
        // Presses that arrived meanwhile stay queued too.
        self.presses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(left);
        taken
    }
}

/// How long a Slack press waits for a gateway to take it.
const PRESS_TTL_SECS: i64 = 300;

/// Who publishes the operator's Events: the controller and this replica's pod.
pub fn reporter() -> Reporter {
    Reporter {
        controller: "apitree-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

fn key(obj: &ApiGateway) -> String {
    format!(
        "{}/{}",
        obj.namespace().unwrap_or_else(|| "default".into()),
        obj.name_any()
    )
}

/// Lets a replaced delivery send what it still holds, then stop.
fn retire(mut old: GatewaySlack) {
    if let Some(d) = old.delivery.take() {
        tokio::spawn(d.finish());
    }
}

/// One pass over one ApiGateway.
pub async fn reconcile(obj: Arc<ApiGateway>, op: Arc<Operator>) -> Result<Action, ControllerError> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ApiGateway> = Api::namespaced(op.client.clone(), &ns);
    let name = key(&obj);
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(gw) => apply(gw, &op).await,
            Finalizer::Cleanup(gw) => cleanup(gw, &op).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            op.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e))
        | Err(kube::runtime::finalizer::Error::CleanupFailed(e)) => Err(e),
        Err(e) => Err(ControllerError::Finalizer {
            name,
            reason: e.to_string(),
        }),
    }
}

/// Transient failures back off per object: 5 s, 10 s, 20 s … up to 5 minutes.
pub fn error_policy(obj: Arc<ApiGateway>, err: &ControllerError, op: Arc<Operator>) -> Action {
    op.metrics.errors.with_label_values(&[err.category()]).inc();
    op.metrics.reconciles.with_label_values(&["error"]).inc();
    let mut failures = op.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(key(&obj)).or_insert(0);
    *n += 1;
    let wait = Duration::from_secs(5u64 << (*n - 1).min(6)).min(Duration::from_secs(300));
    tracing::warn!(gateway = %key(&obj), retry_in_s = wait.as_secs(), "{err}");
    Action::requeue(wait)
}

/// Values of the Secrets a pass needs (smoke-probe keys, the database URL) and the versions of
/// those the proxies use (pepper, master key, database, Redis), which go into the revision.
async fn secrets(
    client: &Client,
    ns: &str,
    obj: &ApiGateway,
) -> (HashMap<(String, String), String>, Vec<(String, String)>) {
    let spec = &obj.spec;
    // The CA the smoke probes trust for a TLS gateway; renewals are not revisions.
    let tls_ca = spec.tls.as_ref().map(|t| SecretKeyRef {
        name: t.secret_name.clone(),
        key: t.ca_key.clone(),
    });
    let mut wanted: Vec<(&SecretKeyRef, bool)> = Vec::new();
    if let Some(ca) = &tls_ca {
        wanted.push((ca, false));
    }
    if let Some(s) = &spec.secrets {
        wanted.push((&s.key_pepper, true));
        if let Some(m) = &s.master_key {
            wanted.push((m, true));
        }
    }
    if let Some(d) = &spec.database {
        wanted.push((d, true));
    }
    if let Some(r) = &spec.redis {
        wanted.push((r, true));
    }
    for p in &spec.gate.smoke {
        if let Some(k) = &p.api_key {
            wanted.push((k, false));
        }
    }
    if let Some(s) = &spec.escalation.slack {
        wanted.push((&s.token, false));
        wanted.push((&s.signing_secret, false));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut values = HashMap::new();
    let mut versions = Vec::new();
    let mut fetched: HashMap<String, Option<Secret>> = HashMap::new();
    for (r, versioned) in wanted {
        if !fetched.contains_key(&r.name) {
            let got = match api.get_opt(&r.name).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(secret = %r.name, "cannot read Secret: {e}");
                    None
                }
            };
            fetched.insert(r.name.clone(), got);
        }
        let secret = fetched.get(&r.name).and_then(|s| s.as_ref());
        if versioned {
            let version = secret
                .and_then(|s| s.metadata.resource_version.clone())
                .unwrap_or_else(|| "missing".into());
            let entry = (r.name.clone(), version);
            if !versions.contains(&entry) {
                versions.push(entry);
            }
        }
        let value = secret
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(&r.key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok());
        if let Some(v) = value {
            values.insert((r.name.clone(), r.key.clone()), v);
        }
    }
    (values, versions)
}

/// When to look again after a pass that stopped on a platform fault.
const FAULT_RETRY: Duration = Duration::from_secs(2);

/// How soon to look again: gate timers need seconds; a quiet gateway its detection window.
fn requeue_after(m: &Managed) -> Action {
    match m.status.phase {
        Some(GatewayPhase::Degraded) if m.status.active_revision.is_none() => {
            // An invalid spec waits for the user to change it.
            Action::await_change()
        }
        Some(
            GatewayPhase::Progressing
            | GatewayPhase::Gating
            | GatewayPhase::Promoting
            | GatewayPhase::AwaitingApproval,
        ) => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(
            m.spec
                .detection
                .window
                .as_std()
                .clamp(Duration::from_secs(5), Duration::from_secs(60)),
        ),
    }
}

async fn apply(obj: Arc<ApiGateway>, op: &Operator) -> Result<Action, ControllerError> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let name = key(&obj);
    let generation = obj.metadata.generation.unwrap_or(1);
    let (values, versions) = secrets(&op.client, &ns, &obj).await;
    let resolver: Arc<SecretResolver> =
        Arc::new(move |r: &SecretKeyRef| values.get(&(r.name.clone(), r.key.clone())).cloned());
    let (notifier, slack_problem) =
        match op.notifier_for(&name, &obj.spec.escalation, resolver.as_ref()) {
            Ok(n) => (n, None),
            Err(problem) => (op.notifier.clone(), Some(problem)),
        };
    let ctx = Context {
        platform: op.platform.clone(),
        notifier: notifier.clone(),
        store: op.store.clone(),
        base: ProxyConfig::default(),
        master_keys: None,
        secrets: resolver.clone(),
        secret_versions: versions,
        default_image: op.default_image.clone(),
        http: op.http.clone(),
        status_url: op.status_url.clone(),
        metrics: op.metrics.clone(),
        agents: op.agents.clone(),
    };
    let slot = op
        .gateways
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.clone())
        .or_insert_with(|| {
            Arc::new(tokio::sync::Mutex::new(Managed::new(
                &name,
                obj.spec.clone(),
                generation,
                op.notifier.clone(),
                op.store.clone(),
                op.status_url.clone(),
            )))
        })
        .clone();
    let mut guard = slot.lock().await;
    let m = &mut *guard;
    if let Some(sweep) = op
        .sweeps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name)
    {
        m.runtime.sweep = Some(sweep);
    }
    if m.spec != obj.spec || m.generation != generation {
        m.update_spec(obj.spec.clone(), generation);
    }
    m.uid = obj.metadata.uid.clone();
    m.database_url = obj.spec.database.as_ref().and_then(|d| resolver(d));
    m.set_notifier(notifier);
    if let Some(problem) = slack_problem {
        m.warn_once("SlackNotConfigured", &problem, (op.clock)());
    }
    // The object's status is the truth: a restarted operator resumes from it. Only a status
    // this process decided and could not write is newer.
    m.status = match m.runtime.unwritten.take() {
        Some(decided) => decided,
        None => obj.status.clone().unwrap_or_default(),
    };
    let annotation = |k: &str| {
        obj.annotations().get(k).map(|rev| Request {
            revision: rev.clone(),
            by: format!("annotation {k}"),
        })
    };
    m.promote = annotation(PROMOTE_ANNOTATION);
    m.rollback = annotation(ROLLBACK_ANNOTATION);
    // Presses answered since the last pass changed incidents the object's status predates.
    if !m.runtime.answered.is_empty() {
        m.refresh_incidents();
    }
    // Presses for other gateways wait for theirs.
    let mut presses = std::mem::take(&mut m.runtime.answered);
    presses.extend(op.presses_for(m, (op.clock)()).await);
    let pass = rollout::reconcile(m, &ctx, (op.clock)()).await;
    rollout::probe_endpoints(m, &ctx).await;
    m.apply_sweep((op.clock)()).await;
    // Events of this pass.
    let fresh: Vec<_> = m
        .runtime
        .events
        .iter()
        .filter(|e| e.seq > m.runtime.events_published)
        .cloned()
        .collect();
    // Who pressed what, then what the gate did.
    let audited: Vec<_> = presses
        .iter()
        .map(|p| {
            let detail = serde_json::json!({"incident": p.incident, "revision": p.revision});
            (p.actor(), p.action.audit_name().to_string(), detail)
        })
        .chain(
            fresh
                .iter()
                .filter(|e| matches!(e.reason.as_str(), "Promoted" | "RolledBack" | "Rejected"))
                .map(|e| {
                    let action = format!("rollout.{}", e.reason.to_lowercase());
                    let detail = serde_json::json!({"message": e.message, "at": e.at});
                    ("apitree-operator".to_string(), action, detail)
                }),
        )
        .collect();
    if let (false, Some(url)) = (audited.is_empty(), m.database_url.clone()) {
        op.audit(&name, &url, audited).await;
    }
    if let Some(last) = fresh.last() {
        m.runtime.events_published = last.seq;
    }
    apply::publish_events(&op.client, &op.reporter, &obj, fresh).await;
    if let Err(source) = apply::write_status(&op.client, &obj, &m.status).await {
        m.runtime.unwritten = Some(m.status.clone());
        return Err(ControllerError::PatchStatus {
            name: name.clone(),
            source,
        });
    }
    let action = match &pass {
        Ok(()) => requeue_after(m),
        // Recorded in the status and Events already; look again as soon as a gate would.
        Err(e) => {
            tracing::debug!(gateway = %name, "pass stopped early: {e}");
            Action::requeue(FAULT_RETRY)
        }
    };
    op.publish(m);
    Ok(action)
}

async fn cleanup(obj: Arc<ApiGateway>, op: &Operator) -> Result<Action, ControllerError> {
    let name = key(&obj);
    op.platform
        .delete_children(&name)
        .await
        .map_err(|source| ControllerError::Cleanup {
            name: name.clone(),
            source,
        })?;
    op.gateways
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    {
        let mut published = op.published.lock().unwrap_or_else(|e| e.into_inner());
        published.remove(&name);
        op.publish_all(&published);
    }
    if let Some(hub) = &op.agents {
        // A gate that was running offers its agents nothing any more.
        hub.retain_previews(&name, &[]);
    }
    if let Some(old) = op
        .slack
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name)
    {
        retire(old);
    }
    tracing::info!(gateway = %name, "deleted: children removed");
    Ok(Action::await_change())
}

/// Runs the controller until `stop` resolves.
pub async fn run(
    op: Arc<Operator>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let gateways: Api<ApiGateway> = Api::all(op.client.clone());
    let deployments: Api<Deployment> = Api::all(op.client.clone());
    Controller::new(gateways, watcher::Config::default())
        .owns(
            deployments,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=apitree-operator"),
        )
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, op)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}
