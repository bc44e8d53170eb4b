//! One gateway's control loop, platform-independent: validate the spec, render the revision,
//! observe both colors, step the gate, carry out its actions (deploy, probe, count, switch,
//! scale down, notify) and keep the detector watching the active color. `apitree local` and
//! `apitree demo` drive it on the local platform; status goes wherever the caller keeps it.
//! The Connector Agents' part of a pass is in `connectors`, the detector's in `watch`.

mod connectors;
mod watch;

use connectors::*;
use watch::*;
pub use watch::{count_open_incidents, open_incident_counts, set_open_incidents};

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use super::plan;
use super::probes::{self, ProbeTarget, SecretResolver};
use crate::crd::condition::{set_condition, ConditionStatus};
use crate::crd::gateway::{ApiGatewaySpec, ApiGatewayStatus, Color, GatewayPhase, IncidentSummary};
use crate::detect::engine::{Detector, IncidentStore, NoticeContext};
use crate::detect::source::{
    window_between, GatewayWindow, MetricSource, ScrapeSource, ScrapeTarget, Snapshot,
};
use crate::detect::{IncidentEvent, ScoreConfig, Severity};
use crate::entities::vault::MasterKeys;
use crate::gate::{self, Action, AnalysisWindow, NoticeKind, Observations, Request, Traffic};
use crate::notify::{Notifier, RolloutNotice};
use crate::platform::{Platform, Workload};
use crate::proxy::config::ProxyConfig;

/// What every gateway's loop shares.
pub struct Context<P: Platform> {
    pub platform: Arc<P>,
    pub notifier: Arc<Notifier>,
    pub store: Arc<IncidentStore>,
    /// Orgs, keys, credentials and secret sources the rendered configs start from.
    pub base: ProxyConfig,
    pub master_keys: Option<MasterKeys>,
    pub secrets: Arc<SecretResolver>,
    /// Versions of the secrets the proxies use; part of every revision.
    pub secret_versions: Vec<(String, String)>,
    /// Image of a spec that names none (the operator's own).
    pub default_image: String,
    pub http: reqwest::Client,
    /// Link to the status page, shown in notifications.
    pub status_url: Option<String>,
    pub metrics: Arc<crate::operator::metrics::OperatorMetrics>,
    /// The endpoint Connector Agents dial (`--agent-listen`), when this control plane serves one.
    pub agents: Option<Arc<crate::agent::hub::Hub>>,
}

use crate::dashboard::{EventView, GatewayView};
use crate::gate::GateRun;

/// One incident as the demo summary and the status page tell it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IncidentRecord {
    pub signal: String,
    pub route: String,
    pub max_severity: Severity,
    pub resolved: bool,
    #[serde(skip)]
    pub opened_at: String,
    #[serde(skip)]
    pub severity: Severity,
    #[serde(skip)]
    pub ratio: f64,
    /// Slack user id of whoever acknowledged it.
    #[serde(skip)]
    pub acknowledged_by: Option<String>,
}

/// A verified Slack button press, for the gateway it concerns: Promote / Roll back name a
/// revision, Acknowledge / Silence an incident.
pub use crate::notify::slack::Interaction as Press;

/// An Event: reason and message, newest last.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GatewayEvent {
    /// Increases with every Event of the gateway.
    #[serde(skip)]
    pub seq: u64,
    pub at: String,
    pub reason: String,
    pub message: String,
    pub warning: bool,
}

struct AnalysisCounters {
    revision: String,
    active: ScrapeSource,
    preview: ScrapeSource,
    active_start: Snapshot,
    preview_start: Snapshot,
    /// The pools offered the revision's candidate: their agents' served and candidate traffic,
    /// judged per pool.
    agents: Vec<PoolCounters>,
}

/// Windows of the error ratio kept for the status page's sparkline.
const SPARKLINE: usize = 60;
const EVENTS_KEPT: usize = 50;

/// One gateway under management: the resource as last read (its spec, and the status that is
/// persisted on it and read back after a restart), the requests people made, and what this
/// process keeps about it between passes ([`Runtime`], lost on restart).
pub struct Managed {
    pub name: String,
    pub spec: ApiGatewaySpec,
    pub generation: i64,
    pub status: ApiGatewayStatus,
    /// Pending human requests (annotation or Slack).
    pub promote: Option<Request>,
    pub rollback: Option<Request>,
    /// uid of the resource in a cluster (owner references of its children).
    pub uid: Option<String>,
    /// The gateway database's URL, when the spec names one (for the health sweep).
    pub database_url: Option<String>,
    pub runtime: Runtime,
}

/// What this process keeps about one gateway between passes: the history the status page and
/// the demo show, the detector and the analysis counters, what the agents were sent, and the
/// cluster controller's bookkeeping. None of it is persisted; a restarted process starts it
/// afresh from the status.
pub struct Runtime {
    pub runs: Vec<GateRun>,
    pub events: VecDeque<GatewayEvent>,
    /// Gateway-wide error ratio per detection window, oldest first.
    pub error_ratios: VecDeque<f64>,
    /// Every incident seen, in the order they opened.
    pub incidents: Vec<IncidentRecord>,
    pub notifications: usize,
    analysis: Option<AnalysisCounters>,
    detector: Detector,
    /// The detector's source and the replicas' admin URLs it was made for.
    detect_source: Option<(Vec<String>, MetricSource)>,
    next_detect: Option<Timestamp>,
    critical: Option<String>,
    open: BTreeMap<(String, String), usize>,
    /// Why the latest edit of the resource could not be read; the last good spec keeps running.
    manifest_error: Option<String>,
    /// Where this gateway's audit log was last read (credential changes page people).
    audit: Option<AuditCursor>,
    /// The last health sweep of this gateway.
    pub sweep: Option<crate::operator::gateway::sweep::SweepOutcome>,
    /// Master-key versions each revision was deployed with (for `status.masterKeyVersions`).
    deployed_keys: BTreeMap<String, Vec<u32>>,
    /// Slack presses applied between passes, for the next pass's audit rows.
    pub answered: Vec<Press>,
    /// Sequence of the last Event published to the cluster.
    pub events_published: u64,
    /// A status this process decided but could not write (the API refused it after retries):
    /// newer than the object's, so the next pass starts from it instead of deciding again
    /// (a switch is not made, or announced, twice).
    pub unwritten: Option<ApiGatewayStatus>,
    /// What each agent pool receives, by revision (the active revision's is published).
    agent_configs: BTreeMap<String, BTreeMap<String, crate::agent::bundle::AgentConfig>>,
    /// The agents' counters at the last detection window, by pool.
    agent_snapshots: BTreeMap<String, Snapshot>,
    /// The gateway database, for the orgs and keys its agents receive.
    agent_db: Option<(String, sqlx::PgPool)>,
}

impl Managed {
    /// The gateway as the status page shows it.
    pub fn view(&self, url: Option<String>) -> GatewayView {
        let s: &ApiGatewayStatus = &self.status;
        GatewayView {
            name: self.name.clone(),
            phase: s
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into()),
            active_color: s.active_color.map(|c| c.as_str().to_string()),
            active_revision: s.active_revision.clone(),
            preview_revision: s.preview_revision.clone(),
            previous_revision: s.previous_revision.clone(),
            gate_revision: s.gate.as_ref().map(|g| g.revision.clone()),
            gate_progress: s.gate.as_ref().map(|g| g.progress.clone()),
            checks: s
                .gate
                .as_ref()
                .map(|g| g.checks.clone())
                .unwrap_or_default(),
            rejected: s
                .rejected_revision
                .as_ref()
                .map(|r| format!("{}: {}", r.revision, r.reason)),
            incidents: s.incidents.clone(),
            error_ratios: self.runtime.error_ratios.iter().copied().collect(),
            runs: self.runtime.runs.iter().rev().take(10).cloned().collect(),
            events: self
                .runtime
                .events
                .iter()
                .rev()
                .take(15)
                .map(|e| EventView {
                    at: e.at.clone(),
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                    warning: e.warning,
                })
                .collect(),
            url,
            connectors: s.connectors.clone(),
        }
    }
}

impl Managed {
    pub fn new(
        name: &str,
        spec: ApiGatewaySpec,
        generation: i64,
        ctx_notifier: Arc<Notifier>,
        store: Arc<IncidentStore>,
        status_url: Option<String>,
    ) -> Self {
        let detector = Detector::new(
            name,
            ScoreConfig::from(&spec.detection),
            NoticeContext {
                runbook_url: spec.escalation.runbook_url.clone(),
                status_url,
                critical_mention: spec
                    .escalation
                    .slack
                    .as_ref()
                    .and_then(|s| s.critical_mention.clone()),
            },
            store,
            ctx_notifier,
        );
        Self {
            name: name.to_string(),
            spec,
            generation,
            status: ApiGatewayStatus::default(),
            promote: None,
            rollback: None,
            uid: None,
            database_url: None,
            runtime: Runtime {
                runs: Vec::new(),
                events: VecDeque::new(),
                error_ratios: VecDeque::new(),
                incidents: Vec::new(),
                notifications: 0,
                analysis: None,
                detector,
                detect_source: None,
                next_detect: None,
                critical: None,
                open: BTreeMap::new(),
                manifest_error: None,
                audit: None,
                sweep: None,
                deployed_keys: BTreeMap::new(),
                answered: Vec::new(),
                events_published: 0,
                unwritten: None,
                agent_configs: BTreeMap::new(),
                agent_snapshots: BTreeMap::new(),
                agent_db: None,
            },
        }
    }

    /// The resource was edited into something that does not parse: keep running the last good
    /// spec, say so in `SpecValid` and an Event (once per distinct problem).
    pub fn manifest_problem(&mut self, problem: &str, now: Timestamp) {
        if self.runtime.manifest_error.as_deref() != Some(problem) {
            self.runtime.manifest_error = Some(problem.to_string());
            self.event(
                now,
                "InvalidManifest",
                format!("{problem}; still running the last valid spec"),
                true,
            );
        }
    }

    /// The resource reads again as the spec that runs: the problem is over.
    pub fn manifest_fixed(&mut self) {
        self.runtime.manifest_error = None;
    }

    /// A warning Event, once until its message changes (a setting that stays wrong must not
    /// repeat it every pass).
    pub fn warn_once(&mut self, reason: &str, message: &str, now: Timestamp) {
        self.event_once(reason, message, true, now);
    }

    /// An Event, once until its message changes.
    pub fn event_once(&mut self, reason: &str, message: &str, warning: bool, now: Timestamp) {
        let repeated = self
            .runtime
            .events
            .iter()
            .rev()
            .find(|e| e.reason == reason)
            .is_some_and(|e| e.message == message);
        if !repeated {
            self.event(now, reason, message.to_string(), warning);
        }
    }

    /// What the health sweep looks at for this gateway: its routes' upstreams and, when its
    /// spec names one, its database.
    pub fn sweep_target(&self) -> crate::operator::gateway::sweep::SweepTarget {
        let unresolved = match (&self.spec.database, &self.database_url) {
            (Some(db), None) => Some(format!(
                "the database URL in Secret {} (key {:?}) could not be read; database checks skipped",
                db.name, db.key
            )),
            _ => None,
        };
        crate::operator::gateway::sweep::SweepTarget {
            gateway: self.name.clone(),
            database_url: self.database_url.clone(),
            unresolved,
            policy: self.spec.drift_policy,
            retention: self.spec.retention.clone(),
            upstreams: self
                .spec
                .proxy
                .routes
                .iter()
                .map(|r| crate::operator::gateway::sweep::Upstream {
                    route: r.name.clone(),
                    url: r.upstream.clone(),
                    probe: r.probe.clone(),
                })
                .collect(),
        }
    }

    /// Carries the last health sweep into status (`status.drift`), Events, and a critical
    /// `security drift` incident while drift weakens tenant isolation or the audit trail (opened
    /// and resolved by the same sweep when it fixed that drift under `driftPolicy: auto`).
    pub async fn apply_sweep(&mut self, now: Timestamp) {
        let Some(o) = self.runtime.sweep.clone() else {
            return;
        };
        // A sweep that could not finish its check (the database went away mid-sweep) says so
        // in an Event; the last completed check stays in status with the time it was made.
        if o.drift.is_some() {
            self.status.drift = o.drift.clone();
        }
        let at = o.at.to_rfc3339();
        if !o.problems.is_empty() {
            self.warn_once("HealthSweepFailed", &o.problems.join("; "), now);
        }
        if !o.fixed.is_empty() {
            let msg = format!("fixed schema drift at {at}: {}", o.fixed.join(", "));
            self.event_once("DriftFixed", &msg, false, now);
        }
        if let Some(d) = o
            .drift
            .as_ref()
            .filter(|d| d.missing + d.changed + d.security > 0)
        {
            let msg = d.message.clone().unwrap_or_default();
            self.warn_once("SchemaDrift", &msg, now);
        }
        if !o.revoked.is_empty() {
            let msg = format!(
                "revoked keys whose grace ended at {at}: {}",
                o.revoked.join(", ")
            );
            self.event_once("GraceExpired", &msg, false, now);
        }
        if !o.purged.is_empty() {
            let counts: Vec<String> = o.purged.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let msg = format!(
                "retention deleted at {at}: {} (spec.retention)",
                counts.join(", ")
            );
            self.event_once("RetentionApplied", &msg, false, now);
        }
        // Security drift the sweep found and fixed (`driftPolicy: auto`) still pages: someone
        // or something switched tenant isolation or the audit trail off. Taken once; the
        // check after the fix resolves it below.
        let found = self.runtime.sweep.as_mut().and_then(|s| s.found.take());
        if let Some(f) = found.filter(|f| f.security > 0) {
            let msg = f.message.clone().unwrap_or_default();
            self.warn_once("SchemaDrift", &msg, now);
            self.security_drift(o.at.timestamp(), true).await;
        }
        // Only a completed drift check can open or resolve the incident.
        if let Some(d) = &o.drift {
            self.security_drift(o.at.timestamp(), d.security > 0).await;
        }
        self.apply_probes(&o, now).await;
    }

    /// The sweep's probes: `status.probes`, an `upstream down` incident per route whose
    /// upstream does not answer, an `endpoints down` incident while serving replicas are not
    /// ready, each resolved by the first sweep that finds it up again.
    async fn apply_probes(
        &mut self,
        o: &crate::operator::gateway::sweep::SweepOutcome,
        now: Timestamp,
    ) {
        use crate::detect::engine::{ENDPOINTS_DOWN, UPSTREAM_DOWN};
        if o.probed.is_empty() {
            return;
        }
        let down: Vec<String> = o
            .probed
            .iter()
            .filter_map(|p| {
                let what = match &p.route {
                    Some(route) => format!("route {route}"),
                    None => "endpoints".into(),
                };
                p.down.as_ref().map(|why| format!("{what}: {why}"))
            })
            .collect();
        self.status.probes = Some(crate::crd::gateway::ProbesSummary {
            checked_at: o.at.to_rfc3339(),
            probed: o.probed.len() as u32,
            down: down.clone(),
        });
        if !down.is_empty() {
            self.warn_once("ProbeFailed", &down.join("; "), now);
        }
        let at = o.at.timestamp();
        for p in &o.probed {
            let (route, signal) = match &p.route {
                Some(route) => (route.as_str(), UPSTREAM_DOWN),
                None => ("", ENDPOINTS_DOWN),
            };
            self.event_on(at, route, signal, p.down.is_some(), Severity::High)
                .await;
        }
        // A route that is gone (or an API no longer registered) is not down any more; only a
        // sweep that listed everything can say so.
        if o.problems.is_empty() {
            // Open incidents as the detector knows them (taken up from the state database
            // after a restart), not only those this process opened.
            let open = match self.runtime.detector.open_routes(UPSTREAM_DOWN).await {
                Ok(routes) => routes,
                Err(e) => {
                    tracing::error!(gateway = %self.name, "cannot read open incidents: {e}");
                    Vec::new()
                }
            };
            let gone: Vec<String> = open
                .into_iter()
                .filter(|route| !o.probed.iter().any(|p| p.route.as_ref() == Some(route)))
                .collect();
            for route in gone {
                self.event_on(at, &route, UPSTREAM_DOWN, false, Severity::High)
                    .await;
            }
        }
    }

    /// Opens (`active`) or resolves an event-signal incident about `route` (`""`: gateway).
    async fn event_on(
        &mut self,
        at: i64,
        route: &str,
        signal: &'static str,
        active: bool,
        severity: Severity,
    ) {
        match self
            .runtime
            .detector
            .event_signal_on(at, route, signal, active, severity)
            .await
        {
            Ok(Some(n)) => record_notices(self, vec![n]),
            Ok(None) => {}
            Err(e) => tracing::error!(gateway = %self.name, "cannot record the incident: {e}"),
        }
    }

    /// Opens (`active`) or resolves the critical `security drift` incident.
    async fn security_drift(&mut self, at: i64, active: bool) {
        let signal = crate::detect::engine::SECURITY_DRIFT;
        self.event_on(at, "", signal, active, Severity::Critical)
            .await;
    }

    /// Takes a button press if it concerns this gateway: Promote / Roll back naming its gate's or
    /// active revision (acted on by the next gate step), Acknowledge / Silence naming one of its
    /// open incidents (applied now: stored, the message updated, an Event).
    pub async fn accept(&mut self, p: &Press, now: Timestamp) -> bool {
        use crate::detect::engine::Response;
        use crate::notify::slack::Action as Button;
        let response = match (p.action.response(now.as_second()), &p.revision) {
            (Some(response), _) => response,
            (None, Some(revision)) => {
                let names_it = self
                    .status
                    .gate
                    .as_ref()
                    .is_some_and(|g| &g.revision == revision)
                    || self.status.active_revision.as_ref() == Some(revision);
                let request = Request {
                    revision: revision.clone(),
                    by: format!("slack:{}", p.user_name),
                };
                if names_it && p.action == Button::Promote {
                    self.promote = Some(request);
                } else if names_it {
                    self.rollback = Some(request);
                }
                return names_it;
            }
            (None, None) => return false,
        };
        match self
            .runtime
            .detector
            .respond(p.incident, &p.user_id, response)
            .await
        {
            Ok(None) => false,
            Ok(Some(notice)) => {
                let (reason, what) = match response {
                    Response::Acknowledge => ("IncidentAcknowledged", "acknowledged"),
                    Response::Silence { .. } => ("IncidentSilenced", "silenced for an hour"),
                };
                let route = if notice.route.is_empty() {
                    "all routes".to_string()
                } else {
                    format!("route {}", notice.route)
                };
                let message = format!(
                    "{} incident on {route} {what} by slack:{}",
                    notice.signal, p.user_name
                );
                record_notices(self, vec![notice]);
                self.event(now, reason, message, false);
                true
            }
            Err(e) => {
                self.event(
                    now,
                    "IncidentStoreFailed",
                    format!(
                        "cannot record slack:{}'s response to incident {}: {e}",
                        p.user_name, p.incident
                    ),
                    true,
                );
                true
            }
        }
    }

    /// Puts the open incidents (as this loop knows them) back into status.
    pub fn refresh_incidents(&mut self) {
        summarize_incidents(self);
    }

    /// Where this gateway's detector notices go from now on.
    pub fn set_notifier(&mut self, notifier: Arc<Notifier>) {
        self.runtime.detector.set_notifier(notifier);
    }

    /// A new spec (file edited, resource updated). The gate notices the new revision.
    pub fn update_spec(&mut self, spec: ApiGatewaySpec, generation: i64) {
        self.spec = spec;
        self.generation = generation;
        self.runtime.manifest_error = None;
    }

    fn event(&mut self, now: Timestamp, reason: &str, message: String, warning: bool) {
        if warning {
            tracing::warn!(gateway = %self.name, reason, "{message}");
        } else {
            tracing::info!(gateway = %self.name, reason, "{message}");
        }
        let seq = self.runtime.events.back().map_or(1, |e| e.seq + 1);
        self.runtime.events.push_back(GatewayEvent {
            seq,
            // Whole seconds: what a person reads on the status page (RFC 3339).
            at: now
                .round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or(now)
                .to_string(),
            reason: reason.to_string(),
            message,
            warning,
        });
        while self.runtime.events.len() > EVENTS_KEPT {
            self.runtime.events.pop_front();
        }
    }

    /// The revision the spec asks for, or every problem that keeps it from running.
    pub fn desired<P: Platform>(
        &self,
        ctx: &Context<P>,
    ) -> Result<(String, ProxyConfig), Vec<String>> {
        let rendered = plan::render(&self.spec, &ctx.base);
        let mut problems = plan::problems(&self.spec, &rendered, ctx.master_keys.as_ref());
        problems.extend(ctx.platform.cannot_run(&self.spec));
        if !problems.is_empty() {
            return Err(problems);
        }
        let image = self.spec.image.as_deref().unwrap_or(&ctx.default_image);
        Ok((
            plan::revision_with_agents(image, &rendered, &ctx.secret_versions, &self.spec),
            rendered,
        ))
    }
}

fn traffic(w: &GatewayWindow) -> Traffic {
    let mut t = Traffic::default();
    for (route, r) in &w.routes {
        if route == crate::proxy::metrics::NO_ROUTE {
            continue;
        }
        t.requests = t.requests.saturating_add(r.requests);
        t.errors = t.errors.saturating_add(r.errors);
        if let Some(p) = r.p99_ms {
            t.p99_ms = Some(t.p99_ms.unwrap_or(0.0).max(p));
        }
    }
    t
}

/// The `/metrics` of each replica of `color`, reached as the health check reaches them.
async fn metric_targets<P: Platform>(
    m: &Managed,
    ctx: &Context<P>,
    admins: &[String],
) -> Result<Vec<ScrapeTarget>, String> {
    let tls = m.spec.tls.is_some();
    // (Only a TLS gateway's certificate is verified against the preview endpoint's name.)
    let preview = match tls {
        true => ctx.platform.preview_url(&m.name, tls).await,
        false => None,
    };
    probes::metric_targets(
        &ctx.http,
        &m.spec,
        ctx.secrets.as_ref(),
        admins,
        preview.as_deref(),
    )
    .await
}

/// A scrape of every replica of `color`.
async fn scrape_source<P: Platform>(
    m: &Managed,
    ctx: &Context<P>,
    color: Color,
) -> Result<ScrapeSource, String> {
    let tls = m.spec.tls.is_some();
    let admins = ctx
        .platform
        .admin_urls(&m.name, color, tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ScrapeSource::with_targets(
        metric_targets(m, ctx, &admins).await?,
    ))
}

/// The platform could not say what runs (an API error or timeout): counted, said once as a
/// warning Event, and nothing is decided on it.
fn api_fault<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    e: &crate::platform::PlatformError,
    now: Timestamp,
) {
    ctx.metrics.errors.with_label_values(&[e.category()]).inc();
    m.warn_once(
        e.category(),
        &format!("{e}; the gate waits and asks again next pass"),
        now,
    );
}

/// Why a pass stopped before the gate could finish stepping. The loop has already recorded it
/// (a warning Event, once per kind, and `apitree_operator_errors_total`); it is returned so a
/// caller can look again sooner than it would after a good pass.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("cannot see the colors of {gateway}: {source}")]
    Observe {
        gateway: String,
        #[source]
        source: crate::platform::PlatformError,
    },
    #[error("the switch of {gateway} to {color} did not happen: {source}")]
    Switch {
        gateway: String,
        color: &'static str,
        #[source]
        source: crate::platform::PlatformError,
    },
}

impl PassError {
    /// The metric label and Event reason of the platform error behind it.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Observe { source, .. } | Self::Switch { source, .. } => source.category(),
        }
    }
}

/// One pass of one gateway's loop. A spec that cannot run is not an error of the pass: it is
/// refused in the status (`SpecValid=False`) and the pass ends `Ok`.
pub async fn reconcile<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    now: Timestamp,
) -> Result<(), PassError> {
    let timer = ctx.metrics.reconcile_duration.start_timer();
    let (desired, rendered) = match m.desired(ctx) {
        Ok(d) => d,
        Err(problems) => {
            ctx.metrics
                .reconciles
                .with_label_values(&["invalid_spec"])
                .inc();
            refuse_spec(m, problems, now);
            if let Some(hub) = ctx.agents.clone() {
                // No gate steps on a spec that cannot run: its candidates are withdrawn, and
                // offered again (with fresh keys) once it can.
                hub.retain_previews(&m.name, &[]);
                connector_status(m, &hub, &[], now).await;
            }
            return Ok(());
        }
    };
    let generation = Some(m.generation);
    let (valid, reason, message) = match &m.runtime.manifest_error {
        Some(problem) => (
            ConditionStatus::False,
            "InvalidManifest",
            format!("{problem}; still running the last valid spec"),
        ),
        None => (
            ConditionStatus::True,
            "Valid",
            "the spec renders to a proxy configuration that starts".to_string(),
        ),
    };
    set_condition(
        &mut m.status.conditions,
        "SpecValid",
        valid,
        reason,
        &message,
        generation,
        now,
    );
    let platform = &ctx.platform;
    let mut obs = Observations {
        desired: desired.clone(),
        replicas: m.spec.replicas,
        promote: m.promote.clone(),
        rollback: m.rollback.clone(),
        critical_incident: m.runtime.critical.clone(),
        ..Observations::default()
    };
    let entities = pass_entities(m, ctx, now).await;
    // Each pool's configuration under the desired revision, for its candidate and (when it
    // takes traffic) its publication.
    let configs = plan::agent_configs(&m.spec, &rendered);
    obs.agents = candidates(m, ctx, &desired, &configs, &entities);
    obs.analysis = analysis_window(m, ctx).await;
    for _ in 0..8 {
        let observed = match platform.observe(&m.name, Color::Blue).await {
            Ok(blue) => platform
                .observe(&m.name, Color::Green)
                .await
                .map(|green| (blue, green)),
            Err(e) => Err(e),
        };
        (obs.blue, obs.green) = match observed {
            Ok(colors) => colors,
            Err(source) => {
                // Not "nothing runs": the gate steps on what it can see, next pass.
                api_fault(m, ctx, &source, now);
                return Err(PassError::Observe {
                    gateway: m.name.clone(),
                    source,
                });
            }
        };
        let before = m.status.phase;
        let prior = m.status.clone();
        let (status, actions) = gate::step(&m.status, &m.spec.gate, &obs, now);
        m.status = status;
        obs.probe = None;
        let mut again = false;
        for action in actions {
            match perform(m, ctx, &mut obs, action, &desired, &rendered, now).await {
                Step::Done => {}
                Step::Again => again = true,
                Step::Undone(why) => {
                    // The step's decision did not take effect (traffic did not move): none of
                    // it stands, and the next pass decides again from the same state.
                    m.status = prior;
                    return Err(why);
                }
            }
        }
        if m.status.phase != before {
            // Requests are for one decision; a stale one must not act on a later gate.
            m.promote = None;
            m.rollback = None;
            obs.promote = None;
            obs.rollback = None;
        }
        if !again {
            break;
        }
    }
    if m.status.phase != Some(GatewayPhase::Promoting) {
        m.runtime.critical = None;
    }
    update_conditions(m, now);
    if m.status.preview_revision.is_none() {
        // The gate ended this pass (promoted, refused, cancelled): no candidate stays offered.
        if let Some(hub) = &ctx.agents {
            hub.retain_previews(&m.name, &[]);
        }
    }
    connectors(m, ctx, &desired, configs, entities, now).await;
    m.status.observed_generation = generation;
    detect(m, ctx, now).await;
    timer.observe_duration();
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    Ok(())
}

fn refuse_spec(m: &mut Managed, problems: Vec<String>, now: Timestamp) {
    let message = format!(
        "the spec cannot run; fix these and apply again: {}",
        problems.join("; ")
    );
    let generation = Some(m.generation);
    let changed = set_condition(
        &mut m.status.conditions,
        "SpecValid",
        ConditionStatus::False,
        "InvalidSpec",
        &message,
        generation,
        now,
    );
    let new_generation = m.status.observed_generation != generation;
    if changed || new_generation {
        m.event(now, "InvalidSpec", message.clone(), true);
    }
    if m.status.active_revision.is_none() {
        m.status.phase = Some(GatewayPhase::Degraded);
    }
    set_condition(
        &mut m.status.conditions,
        "Degraded",
        ConditionStatus::True,
        "InvalidSpec",
        &message,
        generation,
        now,
    );
    m.status.observed_generation = generation;
}

fn update_conditions(m: &mut Managed, now: Timestamp) {
    let generation = Some(m.generation);
    let phase = m.status.phase;
    let serving = m.status.active_revision.is_some();
    let (ready, reason) = if serving {
        (ConditionStatus::True, "Serving")
    } else {
        (ConditionStatus::False, "NotServing")
    };
    let active = m.status.active_revision.clone().unwrap_or_default();
    set_condition(
        &mut m.status.conditions,
        "Ready",
        ready,
        reason,
        &format!("active revision {active}"),
        generation,
        now,
    );
    let progressing = matches!(
        phase,
        Some(
            GatewayPhase::Progressing
                | GatewayPhase::Gating
                | GatewayPhase::AwaitingApproval
                | GatewayPhase::Promoting
        )
    );
    let phase_name = phase.map(|p| format!("{p:?}")).unwrap_or_default();
    set_condition(
        &mut m.status.conditions,
        "Progressing",
        if progressing {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        &phase_name,
        &m.status
            .gate
            .as_ref()
            .map(|g| format!("gate {} for revision {}", g.progress, g.revision))
            .unwrap_or_default(),
        generation,
        now,
    );
    let rejected = matches!(
        phase,
        Some(GatewayPhase::Rejected | GatewayPhase::RolledBack)
    );
    set_condition(
        &mut m.status.conditions,
        "Degraded",
        if rejected {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        if rejected {
            "RevisionRejected"
        } else {
            "AsExpected"
        },
        &m.status
            .rejected_revision
            .as_ref()
            .filter(|_| rejected)
            .map(|r| format!("revision {} was refused: {}", r.revision, r.reason))
            .unwrap_or_default(),
        generation,
        now,
    );
}

/// Adds the gateway's own endpoints to a fresh health sweep: every serving replica's
/// `/readyz`, asked as the gate's health check asks (over TLS with `spec.tls`). Once per sweep;
/// an API fault listing the replicas leaves the endpoints out of that sweep.
pub async fn probe_endpoints<P: Platform>(m: &mut Managed, ctx: &Context<P>) {
    let Some(sweep) = m.runtime.sweep.as_ref() else {
        return;
    };
    if sweep.probed.iter().any(|p| p.route.is_none()) || m.status.active_revision.is_none() {
        return;
    }
    let active = m.status.active_color.unwrap_or(Color::Blue);
    let tls = m.spec.tls.is_some();
    let admin_urls = match ctx.platform.admin_urls(&m.name, active, tls).await {
        Ok(urls) => urls,
        Err(e) => {
            tracing::warn!(gateway = %m.name, "the sweep cannot list the serving replicas: {e}");
            return;
        }
    };
    let revision = m.status.active_revision.clone().unwrap_or_default();
    let target = ProbeTarget {
        http: &ctx.http,
        spec: &m.spec,
        revision: &revision,
        preview_url: ctx.platform.preview_url(&m.name, tls).await,
        admin_urls,
        secrets: ctx.secrets.as_ref(),
    };
    let r = probes::run(gate::GateCheck::Health, &target).await;
    let probed = crate::operator::gateway::sweep::Probed {
        route: None,
        target: format!("{} replicas' /readyz", active.as_str()),
        down: (r.phase != crate::crd::gateway::CheckPhase::Passed)
            .then(|| format!("{} ({})", r.observed.as_deref().unwrap_or("?"), r.reason)),
    };
    if let Some(s) = m.runtime.sweep.as_mut() {
        s.probed.push(probed);
    }
}

/// Green's and blue's traffic since the analysis window started, when it is being counted,
/// and apart from it each changed pool's agents' candidate and served traffic.
async fn analysis_window<P: Platform>(m: &mut Managed, ctx: &Context<P>) -> Option<AnalysisWindow> {
    let gate_revision = m.status.gate.as_ref().map(|g| g.revision.clone())?;
    let counters = m
        .runtime
        .analysis
        .as_ref()
        .filter(|a| a.revision == gate_revision)?;
    let (active, preview) = match (
        counters.active.snapshot().await,
        counters.preview.snapshot().await,
    ) {
        (Ok(a), Ok(p)) => (a, p),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(gateway = %m.name, "analysis counters lost, the window restarts: {e}");
            m.runtime.analysis = None;
            return None;
        }
    };
    let mut pools = Vec::new();
    if let Some(hub) = &ctx.agents {
        for pool in &counters.agents {
            match pool.windows(hub) {
                Ok((a, p)) => pools.push(gate::PoolTraffic {
                    pool: pool.pool.clone(),
                    active: traffic(&a),
                    preview: traffic(&p),
                }),
                Err(e) => {
                    tracing::warn!(gateway = %m.name, pool = %pool.pool, "cannot read the agents' reported metrics for the analysis: {e}")
                }
            }
        }
    }
    Some(AnalysisWindow {
        revision: gate_revision,
        active: traffic(&window_between(&counters.active_start, &active)),
        preview: traffic(&window_between(&counters.preview_start, &preview)),
        pools,
    })
}

/// What performing one action of a gate step leaves.
enum Step {
    Done,
    /// Done, and the gate should step again in this pass (a probe result to take in).
    Again,
    /// It failed in a way that leaves the step's decision untrue (a switch that did not
    /// happen): the step is undone.
    Undone(PassError),
}

async fn perform<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    obs: &mut Observations,
    action: Action,
    desired: &str,
    rendered: &ProxyConfig,
    now: Timestamp,
) -> Step {
    let platform = &ctx.platform;
    match action {
        Action::Deploy { color, revision } => {
            let d = Workload {
                gateway: m.name.clone(),
                revision: revision.clone(),
                replicas: m.spec.replicas,
                config: rendered.clone(),
                image: m
                    .spec
                    .image
                    .clone()
                    .unwrap_or_else(|| ctx.default_image.clone()),
                spec: m.spec.clone(),
                owner_uid: m.uid.clone(),
            };
            if revision != desired {
                return Step::Done;
            }
            let keys = master_key_versions(&m.spec, ctx);
            m.runtime.deployed_keys.insert(revision.clone(), keys);
            match platform.deploy(color, &d).await {
                Ok(()) => Step::Again,
                Err(e) => {
                    // The rollout check times out and refuses the revision; say why now.
                    ctx.metrics.errors.with_label_values(&[e.category()]).inc();
                    m.event(now, e.category(), e.to_string(), true);
                    Step::Done
                }
            }
        }
        Action::Probe(check) => {
            let active = m.status.active_color.unwrap_or(Color::Blue);
            // Only the health check asks the replicas themselves (in a cluster: a pod list).
            let admin_urls = if check == gate::GateCheck::Health {
                match platform
                    .admin_urls(&m.name, active.other(), m.spec.tls.is_some())
                    .await
                {
                    Ok(urls) => urls,
                    Err(e) => {
                        // Not "no replicas": the check stays running and asks again next pass.
                        api_fault(m, ctx, &e, now);
                        obs.probe = None;
                        return Step::Done;
                    }
                }
            } else {
                Vec::new()
            };
            let target = ProbeTarget {
                http: &ctx.http,
                spec: &m.spec,
                revision: desired,
                preview_url: platform.preview_url(&m.name, m.spec.tls.is_some()).await,
                admin_urls,
                secrets: ctx.secrets.as_ref(),
            };
            obs.probe = Some(probes::run(check, &target).await);
            Step::Again
        }
        Action::StartAnalysis => {
            let active = m.status.active_color.unwrap_or(Color::Blue);
            let (active_src, preview_src) = match (
                scrape_source(m, ctx, active).await,
                scrape_source(m, ctx, active.other()).await,
            ) {
                (Ok(a), Ok(p)) => (a, p),
                (Err(e), _) | (_, Err(e)) => {
                    m.event(now, "AnalysisUnavailable", e, true);
                    return Step::Done;
                }
            };
            let mut agents = Vec::new();
            if let Some(hub) = &ctx.agents {
                for c in &m.spec.connectors {
                    if hub
                        .preview_of(&m.name, &c.pool)
                        .is_none_or(|(r, _)| r != desired)
                    {
                        continue;
                    }
                    match PoolCounters::snapshots(hub, &c.pool) {
                        Ok((active_start, preview_start)) => agents.push(PoolCounters {
                            pool: c.pool.clone(),
                            routes: c.routes.iter().map(|r| r.name.clone()).collect(),
                            active_start,
                            preview_start,
                        }),
                        Err(e) => {
                            tracing::warn!(gateway = %m.name, pool = %c.pool, "cannot read the agents' reported metrics for the analysis: {e}")
                        }
                    }
                }
            }
            match (active_src.snapshot().await, preview_src.snapshot().await) {
                (Ok(active_start), Ok(preview_start)) => {
                    m.runtime.analysis = Some(AnalysisCounters {
                        revision: desired.to_string(),
                        active: active_src,
                        preview: preview_src,
                        active_start,
                        preview_start,
                        agents,
                    });
                }
                (Err(e), _) | (_, Err(e)) => {
                    m.event(now, "AnalysisUnavailable", e.to_string(), true);
                }
            }
            Step::Done
        }
        Action::Switch { to, revision } => {
            if let Err(e) = platform.switch(&m.name, to).await {
                // Never announced as switched, never followed by the step's scale-down (which
                // would stop the color still taking traffic).
                ctx.metrics.errors.with_label_values(&[e.category()]).inc();
                m.warn_once(
                    e.category(),
                    &format!(
                        "the switch to {} did not happen: {e}; the gate decides again next pass",
                        to.as_str()
                    ),
                    now,
                );
                return Step::Undone(PassError::Switch {
                    gateway: m.name.clone(),
                    color: to.as_str(),
                    source: e,
                });
            }
            // Unknown after an operator restart: empty, so re-encryption waits for a switch.
            m.status.master_key_versions = m
                .runtime
                .deployed_keys
                .get(&revision)
                .cloned()
                .unwrap_or_default();
            m.runtime.detect_source = None;
            m.event(
                now,
                "Switched",
                format!("traffic now goes to {} (revision {revision})", to.as_str()),
                false,
            );
            Step::Done
        }
        Action::ScaleDown { color } => {
            if let Err(e) = platform.scale_down(&m.name, color).await {
                ctx.metrics.errors.with_label_values(&[e.category()]).inc();
                m.event(
                    now,
                    e.category(),
                    format!("{} keeps running: {e}", color.as_str()),
                    true,
                );
            }
            if m.runtime.analysis.is_some() {
                m.runtime.analysis = None;
            }
            Step::Done
        }
        Action::Notify(n) => {
            announce(m, ctx, n, now).await;
            Step::Done
        }
    }
}

async fn announce<P: Platform>(
    m: &mut Managed,
    ctx: &Context<P>,
    n: gate::GateNotice,
    now: Timestamp,
) {
    let warning = matches!(n.kind, NoticeKind::Rejected | NoticeKind::RolledBack);
    m.event(
        now,
        n.kind.reason(),
        format!("revision {}: {}", n.revision, n.reason),
        warning,
    );
    if let Some(outcome) = n.kind.outcome() {
        ctx.metrics
            .gate_results
            .with_label_values(&[outcome.as_str()])
            .inc();
        m.runtime.runs.push(GateRun {
            revision: n.revision.clone(),
            outcome,
            reason: n.reason.clone(),
            checks: m
                .status
                .gate
                .as_ref()
                .filter(|g| g.revision == n.revision)
                .map(|g| g.checks.clone())
                .unwrap_or_default(),
        });
    }
    let progress = m
        .status
        .gate
        .as_ref()
        .filter(|g| g.revision == n.revision)
        .map(|g| g.progress.clone())
        .unwrap_or_else(|| "-".into());
    let notice = RolloutNotice {
        id: uuid::Uuid::new_v4(),
        gateway: m.name.clone(),
        kind: n.kind.reason().to_string(),
        revision: n.revision,
        reason: n.reason,
        progress,
        promote_button: n.kind == NoticeKind::AwaitingApproval,
        rollback_button: matches!(n.kind, NoticeKind::AwaitingApproval | NoticeKind::Promoted),
    };
    m.runtime.notifications += 1;
    if let Err(e) = ctx.notifier.rollout(&notice).await {
        tracing::error!(gateway = %m.name, "cannot queue the rollout notification: {e}");
    }
}

/// The master-key versions a revision rendered from `spec` now would hold.
fn master_key_versions<P: Platform>(spec: &ApiGatewaySpec, ctx: &Context<P>) -> Vec<u32> {
    let Some(s) = &spec.secrets else {
        return Vec::new();
    };
    s.master_key
        .as_ref()
        .and_then(|r| (ctx.secrets)(r))
        .and_then(|v| MasterKeys::from_value(&v, s.master_key_version.max(1) as u32).ok())
        .map(|k| k.versions())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_selects_the_active_colors_pods_of_the_gateway() {
        assert_eq!(
            prometheus_selector("shop-ns/shop", Color::Green),
            r#"namespace="shop-ns",pod=~"shop-green-.*""#
        );
        assert_eq!(
            prometheus_selector("demo", Color::Blue),
            r#"pod=~"demo-blue-.*""#
        );
    }

    /// An Event's time reads as a person expects, to the second: "2026-12-04T18:38:23Z", not
    /// "2026-12-04T18:38:23.077396167Z".
    #[tokio::test]
    async fn event_times_are_whole_seconds() {
        let mut m = Managed::new(
            "shop",
            serde_json::from_value(serde_json::json!({"replicas": 1, "proxy": {"routes": []}}))
                .unwrap(),
            1,
            Arc::new(Notifier::recording()),
            Arc::new(IncidentStore::memory()),
            None,
        );
        let now: Timestamp = "2026-12-04T18:38:23.577396167Z".parse().unwrap();
        m.event(
            now,
            "Deployed",
            "first revision serving on blue".into(),
            false,
        );
        assert_eq!(m.runtime.events[0].at, "2026-12-04T18:38:24Z");
    }
}
