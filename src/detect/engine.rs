//! The detector of one gateway: feeds each window's per-route error ratios and the gateway's
//! auth failures through their series, keeps one incident per (gateway, route, signal) in the
//! incident store (PostgreSQL when configured, memory otherwise) and hands every change to the
//! notifier.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use uuid::Uuid;

use super::incident::{IncidentEvent, Series, Verdict};
use super::score::{ScoreConfig, Severity};
use super::source::GatewayWindow;
use crate::db::DbError;
use crate::notify::{IncidentNotice, Notifier};

/// Signal names (also incident `signal` values).
pub const ERROR_RATIO: &str = "error ratio";
pub const AUTH_FAILURES: &str = "auth failures";
pub const P99_LATENCY: &str = "p99 latency";
pub const CIRCUIT_OPEN: &str = "circuit open";
/// Schema drift that weakens tenant isolation or the audit trail (found by the health sweep).
pub const SECURITY_DRIFT: &str = "security drift";
/// Credentials past their CredentialPolicy's maximum age (a warning until rotated).
pub const CREDENTIALS_OVERDUE: &str = "credentials overdue";

/// A stored incident.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredIncident {
    pub id: Uuid,
    pub gateway: String,
    pub route: String,
    pub signal: String,
    pub severity: Severity,
    pub resolved: bool,
    /// Slack user id of whoever acknowledged it.
    pub acknowledged_by: Option<String>,
    /// Unix seconds until which updates below critical are not posted.
    pub silenced_until: Option<i64>,
}

/// How long Slack's Silence button silences an incident.
pub const SILENCE_SECS: i64 = 3600;

/// What an on-call engineer did to an incident from Slack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Acknowledge,
    /// Updates below critical are not posted until then (unix seconds); an escalation to
    /// critical and the resolution still are.
    Silence {
        until: i64,
    },
}

/// Where incidents live.
pub enum IncidentStore {
    Memory(Mutex<Vec<StoredIncident>>),
    Postgres(PgPool),
}

fn sev_str(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "critical",
        Severity::High => "high",
        _ => "warning",
    }
}

impl IncidentStore {
    pub fn memory() -> Self {
        Self::Memory(Mutex::new(Vec::new()))
    }

    /// Records a change; returns the incident id (a new one on open).
    async fn record(
        &self,
        id: Option<Uuid>,
        gateway: &str,
        route: &str,
        signal: &str,
        n: &IncidentNotice,
    ) -> Result<Uuid, DbError> {
        let resolved = n.event == IncidentEvent::Resolve;
        match self {
            Self::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                match id.and_then(|id| rows.iter_mut().find(|r| r.id == id)) {
                    Some(r) => {
                        r.severity = n.severity;
                        r.resolved = resolved;
                        Ok(r.id)
                    }
                    None => {
                        let id = Uuid::new_v4();
                        rows.push(StoredIncident {
                            id,
                            gateway: gateway.into(),
                            route: route.into(),
                            signal: signal.into(),
                            severity: n.severity,
                            resolved,
                            acknowledged_by: None,
                            silenced_until: None,
                        });
                        Ok(id)
                    }
                }
            }
            Self::Postgres(pool) => match id {
                None => {
                    let id = Uuid::new_v4();
                    sqlx::query(
                        "INSERT INTO incidents (id, gateway, route, signal, severity, max_severity, ratio, baseline, p_value)
                         VALUES ($1, $2, $3, $4, $5::incident_severity, $5::incident_severity, $6, $7, $8)",
                    )
                    .bind(id)
                    .bind(gateway)
                    .bind(route)
                    .bind(signal)
                    .bind(sev_str(n.severity))
                    .bind(n.ratio)
                    .bind(n.baseline)
                    .bind(n.p_value)
                    .execute(pool)
                    .await
                    .map_err(DbError::query("open incident"))?;
                    Ok(id)
                }
                Some(id) => {
                    sqlx::query(
                        "UPDATE incidents SET
                            severity = CASE WHEN $2 THEN severity ELSE $3::incident_severity END,
                            max_severity = GREATEST(max_severity, CASE WHEN $2 THEN max_severity ELSE $3::incident_severity END),
                            ratio = $4, baseline = $5, p_value = $6, updated_at = now(),
                            resolved_at = CASE WHEN $2 THEN now() ELSE NULL END
                         WHERE id = $1",
                    )
                    .bind(id)
                    .bind(resolved)
                    .bind(sev_str(n.severity))
                    .bind(n.ratio)
                    .bind(n.baseline)
                    .bind(n.p_value)
                    .execute(pool)
                    .await
                    .map_err(DbError::query("update incident"))?;
                    Ok(id)
                }
            },
        }
    }

    /// Records a person's response to an open incident.
    async fn respond(&self, id: Uuid, user_id: &str, response: Response) -> Result<(), DbError> {
        match self {
            Self::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = rows.iter_mut().find(|r| r.id == id) {
                    match response {
                        Response::Acknowledge => r.acknowledged_by = Some(user_id.to_string()),
                        Response::Silence { until } => r.silenced_until = Some(until),
                    }
                }
                Ok(())
            }
            Self::Postgres(pool) => {
                let query = match response {
                    Response::Acknowledge => sqlx::query(
                        "UPDATE incidents SET acknowledged_by = $2, acknowledged_at = now(), updated_at = now() WHERE id = $1",
                    )
                    .bind(id)
                    .bind(user_id),
                    Response::Silence { until } => sqlx::query(
                        "UPDATE incidents SET silenced_until = to_timestamp($2), updated_at = now() WHERE id = $1",
                    )
                    .bind(id)
                    .bind(until as f64),
                };
                query
                    .execute(pool)
                    .await
                    .map_err(DbError::query("record a response to an incident"))?;
                Ok(())
            }
        }
    }

    /// Open incidents, e.g. to show in status.
    pub async fn open(&self) -> Result<Vec<StoredIncident>, DbError> {
        match self {
            Self::Memory(rows) => Ok(rows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|r| !r.resolved)
                .cloned()
                .collect()),
            Self::Postgres(pool) => {
                #[allow(clippy::type_complexity)]
                let rows: Vec<(Uuid, String, String, String, String, Option<String>, Option<f64>)> = sqlx::query_as(
                    "SELECT id, gateway, route, signal, severity::text, acknowledged_by, extract(epoch FROM silenced_until)::float8
                     FROM incidents WHERE resolved_at IS NULL ORDER BY opened_at",
                )
                .fetch_all(pool)
                .await
                .map_err(DbError::query("list open incidents"))?;
                Ok(rows
                    .into_iter()
                    .map(
                        |(id, gateway, route, signal, sev, ack, silenced)| StoredIncident {
                            id,
                            gateway,
                            route,
                            signal,
                            severity: match sev.as_str() {
                                "critical" => Severity::Critical,
                                "high" => Severity::High,
                                _ => Severity::Warning,
                            },
                            resolved: false,
                            acknowledged_by: ack,
                            silenced_until: silenced.map(|t| t as i64),
                        },
                    )
                    .collect())
            }
        }
    }
}

struct Watched {
    series: Series,
    incident: Option<Uuid>,
    seq: u32,
    /// The open incident's last notice (a person's response updates it).
    last: Option<IncidentNotice>,
    acknowledged_by: Option<String>,
    silenced_until: Option<i64>,
}

/// Settings that go into every notice.
#[derive(Debug, Clone, Default)]
pub struct NoticeContext {
    pub runbook_url: Option<String>,
    pub status_url: Option<String>,
    pub critical_mention: Option<String>,
}

/// The detector of one gateway.
pub struct Detector {
    pub gateway: String,
    cfg: ScoreConfig,
    context: NoticeContext,
    watched: HashMap<(String, &'static str), Watched>,
    store: Arc<IncidentStore>,
    notifier: Arc<Notifier>,
    /// Credential changes seen lately: (unix seconds, description).
    changes: Vec<(i64, String)>,
}

/// How long a credential change stays relevant to new incidents.
const CHANGE_RELEVANCE_SECS: i64 = 2 * 3600;

/// Audit actions that change credentials.
pub fn is_credential_change(action: &str) -> bool {
    action.starts_with("key.")
        || action.starts_with("credential.")
        || action.starts_with("master_key.")
}

impl Detector {
    pub fn new(
        gateway: &str,
        cfg: ScoreConfig,
        context: NoticeContext,
        store: Arc<IncidentStore>,
        notifier: Arc<Notifier>,
    ) -> Self {
        Self {
            gateway: gateway.to_string(),
            cfg,
            context,
            watched: HashMap::new(),
            store,
            notifier,
            changes: Vec::new(),
        }
    }

    /// Where notices go from now on (the gateway's Slack settings changed).
    pub fn set_notifier(&mut self, notifier: Arc<Notifier>) {
        self.notifier = notifier;
    }

    /// Scores one window (starting at `at`, unix seconds) and records and notifies every change.
    pub async fn observe(
        &mut self,
        at: i64,
        window: &GatewayWindow,
    ) -> Result<Vec<IncidentNotice>, DbError> {
        let mut notices = Vec::new();
        let total: u64 = window.routes.values().map(|w| w.requests).sum();
        for (route, w) in &window.routes {
            if route.as_str() == crate::proxy::metrics::NO_ROUTE {
                continue;
            }
            let cfg = self.cfg.clone();
            // Error ratio, scored.
            let verdict = self
                .watched(route, ERROR_RATIO)
                .series
                .observe_errors(at, w.requests, w.errors, &cfg);
            let current = if w.requests > 0 {
                w.errors as f64 / w.requests as f64
            } else {
                0.0
            };
            if let Some(n) = self
                .change(at, route, ERROR_RATIO, &verdict, current)
                .await?
            {
                notices.push(n);
            }
            // p99 latency, scored as a gauge once the window has enough requests to mean it.
            if let Some(p99) = w.p99_ms.filter(|_| w.requests >= cfg.min_requests) {
                let verdict = self
                    .watched(route, P99_LATENCY)
                    .series
                    .observe_gauge(at, p99, &cfg);
                if let Some(n) = self.change(at, route, P99_LATENCY, &verdict, p99).await? {
                    notices.push(n);
                }
            }
            // Circuit breaker: an event signal, open while the breaker is (or just was) open.
            let open = w.breaker_open || w.breaker_opens > 0;
            let was_open = self.watched(route, CIRCUIT_OPEN).incident.is_some();
            if open != was_open {
                let (severity, event) = if open {
                    (Severity::High, IncidentEvent::Open)
                } else {
                    (Severity::None, IncidentEvent::Resolve)
                };
                let verdict = event_verdict(at, severity, event);
                if let Some(n) = self
                    .change(at, route, CIRCUIT_OPEN, &verdict, w.breaker_opens as f64)
                    .await?
                {
                    notices.push(n);
                }
            }
        }
        let cfg = self.cfg.clone();
        let auth = window.auth_failures.min(total);
        let verdict = self
            .watched("", AUTH_FAILURES)
            .series
            .observe_errors(at, total, auth, &cfg);
        let current = if total > 0 {
            auth as f64 / total as f64
        } else {
            0.0
        };
        if let Some(n) = self
            .change(at, "", AUTH_FAILURES, &verdict, current)
            .await?
        {
            notices.push(n);
        }
        Ok(notices)
    }

    /// An event signal (not scored): opens an incident at `severity` when `active` turns true,
    /// resolves it when `active` turns false; nothing while it stays as it was.
    pub async fn event_signal(
        &mut self,
        at: i64,
        signal: &'static str,
        active: bool,
        severity: Severity,
    ) -> Result<Option<IncidentNotice>, DbError> {
        let was_open = self.watched("", signal).incident.is_some();
        if active == was_open {
            return Ok(None);
        }
        let (severity, event) = if active {
            (severity, IncidentEvent::Open)
        } else {
            (Severity::None, IncidentEvent::Resolve)
        };
        let verdict = event_verdict(at, severity, event);
        self.change(at, "", signal, &verdict, if active { 1.0 } else { 0.0 })
            .await
    }

    /// Feeds audit-log rows (any; non-credential actions are ignored). Credential changes are
    /// an event signal: they do not open incidents, they are attached to the error-ratio and
    /// auth-failure incidents that follow them within two hours.
    pub fn note_audit(&mut self, rows: &[crate::db::audit::AuditRow]) {
        for r in rows.iter().filter(|r| is_credential_change(&r.action)) {
            let at = r.at.timestamp();
            let when = r.at.format("%H:%M:%SZ");
            self.changes.push((
                at,
                format!("{} {} at {when} by {}", r.action, r.target, r.actor),
            ));
        }
        self.changes.sort_by_key(|c| c.0);
    }

    fn recent_changes(&self, at: i64) -> Vec<String> {
        let end = at + self.cfg.window_secs;
        self.changes
            .iter()
            .filter(|(t, _)| *t <= end && *t >= end - CHANGE_RELEVANCE_SECS)
            .map(|(_, d)| d.clone())
            .collect()
    }

    fn watched(&mut self, route: &str, signal: &'static str) -> &mut Watched {
        self.watched
            .entry((route.to_string(), signal))
            .or_insert_with(|| Watched {
                series: Series::default(),
                incident: None,
                seq: 0,
                last: None,
                acknowledged_by: None,
                silenced_until: None,
            })
    }

    /// Stores and notifies the change a verdict carries, if any.
    async fn change(
        &mut self,
        at: i64,
        route: &str,
        signal: &'static str,
        verdict: &Verdict,
        current: f64,
    ) -> Result<Option<IncidentNotice>, DbError> {
        let Some(event) = verdict.event else {
            return Ok(None);
        };
        let window_secs = self.cfg.window_secs;
        let (gateway, context) = (self.gateway.clone(), self.context.clone());
        let (store, notifier) = (self.store.clone(), self.notifier.clone());
        let related = if signal == AUTH_FAILURES || signal == ERROR_RATIO {
            self.recent_changes(at)
        } else {
            Vec::new()
        };
        let w = self.watched(route, signal);
        w.seq += 1;
        let mut notice = IncidentNotice {
            incident_id: w.incident.unwrap_or_else(Uuid::nil),
            seq: w.seq,
            gateway: gateway.clone(),
            route: route.to_string(),
            signal: signal.to_string(),
            severity: verdict.severity,
            event,
            ratio: verdict.score.ratio,
            current,
            baseline: verdict.score.baseline.unwrap_or(0.0),
            p_value: verdict.score.p_value,
            window_secs: window_secs as u64,
            at: chrono::DateTime::from_timestamp(at + window_secs, 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            runbook_url: context.runbook_url,
            status_url: context.status_url,
            rollout_revision: None,
            acknowledged_by: w.acknowledged_by.clone(),
            remark: None,
            critical_mention: context.critical_mention,
            related_changes: related,
        };
        let id = store
            .record(w.incident, &gateway, route, signal, &notice)
            .await?;
        notice.incident_id = id;
        let end = at + window_secs;
        let silenced = w.silenced_until.is_some_and(|until| end < until)
            && event != IncidentEvent::Resolve
            && !(verdict.severity == Severity::Critical
                && matches!(event, IncidentEvent::Open | IncidentEvent::Escalate));
        if event == IncidentEvent::Resolve {
            w.incident = None;
            w.seq = 0;
            w.last = None;
            w.acknowledged_by = None;
            w.silenced_until = None;
        } else {
            w.incident = Some(id);
            w.last = Some(notice.clone());
        }
        if silenced {
            tracing::info!(incident = %id, "incident silenced: change recorded, not posted");
        } else if let Err(e) = notifier.notify(&notice).await {
            tracing::error!("cannot queue the notification for incident {id}: {e}");
        }
        Ok(Some(notice))
    }

    /// Applies an on-call engineer's response (from Slack) to one of this gateway's open
    /// incidents: stores it and updates the incident's message. `None` when the incident is
    /// not open here.
    pub async fn respond(
        &mut self,
        incident: Uuid,
        user_id: &str,
        response: Response,
    ) -> Result<Option<IncidentNotice>, DbError> {
        let store = self.store.clone();
        let notifier = self.notifier.clone();
        let Some(w) = self
            .watched
            .values_mut()
            .find(|w| w.incident == Some(incident))
        else {
            return Ok(None);
        };
        let Some(mut notice) = w.last.clone() else {
            return Ok(None);
        };
        store.respond(incident, user_id, response).await?;
        let remark = match response {
            Response::Acknowledge => {
                w.acknowledged_by = Some(user_id.to_string());
                format!("acknowledged by <@{user_id}>")
            }
            Response::Silence { until } => {
                w.silenced_until = Some(until);
                let until = chrono::DateTime::from_timestamp(until, 0)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default();
                format!("silenced by <@{user_id}> until {until}: changes below critical are not posted until then")
            }
        };
        w.seq += 1;
        notice.seq = w.seq;
        notice.acknowledged_by = w.acknowledged_by.clone();
        notice.remark = Some(remark);
        w.last = Some(IncidentNotice {
            remark: None,
            ..notice.clone()
        });
        if let Err(e) = notifier.notify(&notice).await {
            tracing::error!("cannot queue the notification for incident {incident}: {e}");
        }
        Ok(Some(notice))
    }
}

/// A verdict for an event signal (not scored).
fn event_verdict(at: i64, severity: Severity, event: IncidentEvent) -> Verdict {
    Verdict {
        at,
        score: super::score::Score {
            baseline: None,
            ratio: 1.0,
            p_value: 0.0,
            severity,
            anomaly_score: if severity == Severity::None { 0.0 } else { 1.0 },
        },
        severity,
        event: Some(event),
    }
}
