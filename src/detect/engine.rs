//! The detector of one gateway: feeds each window's per-route error ratios and the gateway's
//! auth failures through their series, keeps one incident per (gateway, route, signal) in the
//! incident store (PostgreSQL when configured, memory otherwise) and hands every change to the
//! notifier.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use uuid::Uuid;

use super::incident::{IncidentEvent, Series, Tracker, Verdict};
use super::score::{Past, ScoreConfig, Severity};
use super::source::GatewayWindow;
use super::{IncidentNotice, IncidentSink};
use crate::db::DbError;

/// Signal names (also incident `signal` values).
pub const ERROR_RATIO: &str = "error ratio";
pub const AUTH_FAILURES: &str = "auth failures";
pub const P99_LATENCY: &str = "p99 latency";
pub const CIRCUIT_OPEN: &str = "circuit open";
/// Schema drift that weakens tenant isolation or the audit trail (found by the health sweep).
pub const SECURITY_DRIFT: &str = "security drift";
/// Credentials past their CredentialPolicy's maximum age (a warning until rotated).
pub const CREDENTIALS_OVERDUE: &str = "credentials overdue";
/// A burst of credential changes (key creations, rotations, revocations, credential writes,
/// re-encryptions) in one window.
pub const CREDENTIAL_CHANGES: &str = "credential changes";

/// A route's upstream that does not answer the health sweep's probe.
pub const UPSTREAM_DOWN: &str = "upstream down";
/// Serving replicas of the gateway that are not ready when the health sweep asks.
pub const ENDPOINTS_DOWN: &str = "endpoints down";

/// A Connector Agent that has not called the control plane for longer than its pool's
/// `lostAfter` (the incident's route is the agent's name).
pub const AGENT_LOST: &str = "agent lost";

/// Every signal an incident can be about.
pub const SIGNALS: [&str; 10] = [
    ERROR_RATIO,
    AUTH_FAILURES,
    P99_LATENCY,
    CIRCUIT_OPEN,
    SECURITY_DRIFT,
    CREDENTIALS_OVERDUE,
    CREDENTIAL_CHANGES,
    UPSTREAM_DOWN,
    ENDPOINTS_DOWN,
    AGENT_LOST,
];

/// Whether incidents of `signal` are events (something is or is not the case: a breaker
/// open, drift found, a burst of changes), not a ratio scored against a baseline: their
/// notices show no ratio or p-value.
pub fn is_event_signal(signal: &str) -> bool {
    let scored = [ERROR_RATIO, AUTH_FAILURES, P99_LATENCY];
    SIGNALS.contains(&signal) && !scored.contains(&signal)
}

/// Credential changes in one window that make an incident of their own.
pub const CREDENTIAL_BURST: usize = 5;

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

fn parse_severity(s: &str) -> Severity {
    match s {
        "critical" => Severity::Critical,
        "high" => Severity::High,
        _ => Severity::Warning,
    }
}

/// How far back baseline windows are kept: the longest baseline (five weeks).
const HISTORY_SECS: i64 = 35 * 24 * 3600;

/// An open incident as a restarted detector takes it up.
struct Resumed {
    incident: StoredIncident,
    /// The sequence number of its last notice.
    seq: u32,
    last: Option<IncidentNotice>,
}

/// The signal constant named `name` (watched series are keyed by them).
fn signal_named(name: &str) -> Option<&'static str> {
    SIGNALS.into_iter().find(|s| *s == name)
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
                        "INSERT INTO incidents (id, gateway, route, signal, severity, max_severity, ratio, baseline, p_value, notice_seq, last_notice)
                         VALUES ($1, $2, $3, $4, $5::incident_severity, $5::incident_severity, $6, $7, $8, $9, $10)",
                    )
                    .bind(id)
                    .bind(gateway)
                    .bind(route)
                    .bind(signal)
                    .bind(sev_str(n.severity))
                    .bind(n.ratio)
                    .bind(n.baseline)
                    .bind(n.p_value)
                    .bind(n.seq as i32)
                    .bind(sqlx::types::Json(IncidentNotice {
                        incident_id: id,
                        ..n.clone()
                    }))
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
                            resolved_at = CASE WHEN $2 THEN now() ELSE NULL END,
                            notice_seq = $7, last_notice = $8
                         WHERE id = $1",
                    )
                    .bind(id)
                    .bind(resolved)
                    .bind(sev_str(n.severity))
                    .bind(n.ratio)
                    .bind(n.baseline)
                    .bind(n.p_value)
                    .bind(n.seq as i32)
                    .bind(sqlx::types::Json(IncidentNotice {
                        incident_id: id,
                        ..n.clone()
                    }))
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

    /// Keeps `n` as the incident's last notice (a person's response changed it).
    async fn noted(&self, n: &IncidentNotice) -> Result<(), DbError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Postgres(pool) => {
                sqlx::query("UPDATE incidents SET notice_seq = $2, last_notice = $3 WHERE id = $1")
                    .bind(n.incident_id)
                    .bind(n.seq as i32)
                    .bind(sqlx::types::Json(n))
                    .execute(pool)
                    .await
                    .map_err(DbError::query("keep an incident's last notice"))?;
                Ok(())
            }
        }
    }

    /// Keeps a window that entered a baseline, and lets go of the series' windows older than
    /// the longest baseline.
    async fn remember(
        &self,
        gateway: &str,
        route: &str,
        signal: &str,
        past: &Past,
        prune: bool,
    ) -> Result<(), DbError> {
        let Self::Postgres(pool) = self else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO detector_history (gateway, route, signal, at, value, weight)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(gateway)
        .bind(route)
        .bind(signal)
        .bind(past.at)
        .bind(past.value)
        .bind(past.weight.min(i64::MAX as u64) as i64)
        .execute(pool)
        .await
        .map_err(DbError::query("keep a baseline window"))?;
        if prune {
            sqlx::query(
                "DELETE FROM detector_history WHERE gateway = $1 AND route = $2 AND signal = $3 AND at < $4",
            )
            .bind(gateway)
            .bind(route)
            .bind(signal)
            .bind(past.at - HISTORY_SECS)
            .execute(pool)
            .await
            .map_err(DbError::query("let go of old baseline windows"))?;
        }
        Ok(())
    }

    /// The baseline windows kept for `gateway`, oldest first, per (route, signal).
    async fn history(&self, gateway: &str) -> Result<Vec<(String, String, Past)>, DbError> {
        let Self::Postgres(pool) = self else {
            return Ok(Vec::new());
        };
        let rows: Vec<(String, String, i64, f64, i64)> = sqlx::query_as(
            "SELECT route, signal, at, value, weight FROM detector_history
             WHERE gateway = $1 AND at >= (SELECT coalesce(max(at), 0) FROM detector_history WHERE gateway = $1) - $2
             ORDER BY at",
        )
        .bind(gateway)
        .bind(HISTORY_SECS)
        .fetch_all(pool)
        .await
        .map_err(DbError::query("read baseline windows"))?;
        Ok(rows
            .into_iter()
            .map(|(route, signal, at, value, weight)| {
                (
                    route,
                    signal,
                    Past {
                        at,
                        value,
                        weight: weight.max(0) as u64,
                    },
                )
            })
            .collect())
    }

    /// Where `gateway`'s audit log was last read for credential changes (PostgreSQL only).
    pub async fn audit_cursor(&self, gateway: &str) -> Result<Option<i64>, DbError> {
        let Self::Postgres(pool) = self else {
            return Ok(None);
        };
        sqlx::query_scalar("SELECT after FROM audit_cursors WHERE gateway = $1")
            .bind(gateway)
            .fetch_optional(pool)
            .await
            .map_err(DbError::query("read the audit cursor"))
    }

    /// Keeps where `gateway`'s audit log was last read.
    pub async fn set_audit_cursor(&self, gateway: &str, after: i64) -> Result<(), DbError> {
        let Self::Postgres(pool) = self else {
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO audit_cursors (gateway, after) VALUES ($1, $2)
             ON CONFLICT (gateway) DO UPDATE SET after = excluded.after",
        )
        .bind(gateway)
        .bind(after)
        .execute(pool)
        .await
        .map_err(DbError::query("keep the audit cursor"))?;
        Ok(())
    }

    /// Open incidents, e.g. to show in status.
    pub async fn open(&self) -> Result<Vec<StoredIncident>, DbError> {
        Ok(self
            .open_incidents(None)
            .await?
            .into_iter()
            .map(|r| r.incident)
            .collect())
    }

    /// Open incidents (of `gateway`, or all), oldest first, with what a detector needs to
    /// carry on with them.
    async fn open_incidents(&self, gateway: Option<&str>) -> Result<Vec<Resumed>, DbError> {
        match self {
            Self::Memory(rows) => Ok(rows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|r| !r.resolved && gateway.is_none_or(|g| r.gateway == g))
                .map(|r| Resumed {
                    incident: r.clone(),
                    seq: 0,
                    last: None,
                })
                .collect()),
            Self::Postgres(pool) => {
                type Row = (
                    Uuid,
                    String,
                    String,
                    String,
                    String,
                    Option<String>,
                    Option<f64>,
                    i32,
                    Option<sqlx::types::Json<IncidentNotice>>,
                );
                let rows: Vec<Row> = sqlx::query_as(
                    "SELECT id, gateway, route, signal, severity::text, acknowledged_by,
                            extract(epoch FROM silenced_until)::float8, notice_seq, last_notice
                     FROM incidents WHERE resolved_at IS NULL AND ($1::text IS NULL OR gateway = $1)
                     ORDER BY opened_at",
                )
                .bind(gateway)
                .fetch_all(pool)
                .await
                .map_err(DbError::query("list open incidents"))?;
                Ok(rows
                    .into_iter()
                    .map(
                        |(id, gateway, route, signal, sev, ack, silenced, seq, last)| Resumed {
                            incident: StoredIncident {
                                id,
                                gateway,
                                route,
                                signal,
                                severity: parse_severity(&sev),
                                resolved: false,
                                acknowledged_by: ack,
                                silenced_until: silenced.map(|t| t as i64),
                            },
                            seq: seq.max(0) as u32,
                            last: last.map(|j| j.0),
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
    /// Window start at which this series' old baseline windows were last let go of.
    pruned_at: i64,
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
    notifier: Arc<dyn IncidentSink>,
    /// Credential changes seen lately: (unix seconds, description).
    changes: Vec<(i64, String)>,
    /// Open incidents and baseline windows have been taken up from the store.
    resumed: bool,
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
        notifier: Arc<dyn IncidentSink>,
    ) -> Self {
        Self {
            gateway: gateway.to_string(),
            cfg,
            context,
            watched: HashMap::new(),
            store,
            notifier,
            changes: Vec::new(),
            resumed: false,
        }
    }

    /// Takes up where the last process left off, once: this gateway's open incidents (with
    /// the sequence number and message of their last notice, so the next change updates the
    /// same Slack message) and the baseline windows the store kept. Until it succeeds nothing
    /// is scored or recorded: a cold detector would open a second incident for one open.
    async fn resume(&mut self) -> Result<(), DbError> {
        if self.resumed {
            return Ok(());
        }
        let history = self.store.history(&self.gateway).await?;
        let open = self.store.open_incidents(Some(&self.gateway)).await?;
        let windows = history.len();
        for (route, signal, past) in history {
            if let Some(signal) = signal_named(&signal) {
                self.watched(&route, signal).series.restore([past]);
            }
        }
        let incidents = open.len();
        for r in open {
            let Some(signal) = signal_named(&r.incident.signal) else {
                continue;
            };
            let w = self.watched(&r.incident.route, signal);
            w.incident = Some(r.incident.id);
            w.seq = r.seq;
            w.last = r.last;
            w.acknowledged_by = r.incident.acknowledged_by;
            w.silenced_until = r.incident.silenced_until;
            w.series.tracker = Tracker::open_at(r.incident.severity);
        }
        self.resumed = true;
        if incidents > 0 || windows > 0 {
            tracing::info!(
                gateway = %self.gateway,
                incidents,
                windows,
                "detector resumed: open incidents and baseline windows taken up"
            );
        }
        Ok(())
    }

    /// Keeps a window that entered a series' baseline in the store (a failure only costs a
    /// restarted detector that window, so it is logged, not raised).
    async fn keep(&mut self, route: &str, signal: &'static str, verdict: &Verdict) {
        for past in &verdict.remembered {
            let (store, gateway) = (self.store.clone(), self.gateway.clone());
            let w = self.watched(route, signal);
            let prune = past.at - w.pruned_at >= 3600;
            if prune {
                w.pruned_at = past.at;
            }
            if let Err(e) = store.remember(&gateway, route, signal, past, prune).await {
                tracing::warn!(gateway = %gateway, "cannot keep a baseline window: {e}");
            }
        }
    }

    /// Where notices go from now on (the gateway's Slack settings changed).
    pub fn set_notifier(&mut self, notifier: Arc<dyn IncidentSink>) {
        self.notifier = notifier;
    }

    /// Scores one window (starting at `at`, unix seconds) and records and notifies every change.
    pub async fn observe(
        &mut self,
        at: i64,
        window: &GatewayWindow,
    ) -> Result<Vec<IncidentNotice>, DbError> {
        self.resume().await?;
        let mut notices = Vec::new();
        let total: u64 = window
            .routes
            .values()
            .fold(0u64, |sum, w| sum.saturating_add(w.requests));
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
            self.keep(route, ERROR_RATIO, &verdict).await;
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
                self.keep(route, P99_LATENCY, &verdict).await;
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
        // The gateway-wide ratio is the cluster's: agents' requests are not in it.
        let total = total.saturating_sub(window.agent_requests);
        let auth = window.auth_failures.min(total);
        let verdict = self
            .watched("", AUTH_FAILURES)
            .series
            .observe_errors(at, total, auth, &cfg);
        self.keep("", AUTH_FAILURES, &verdict).await;
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
        self.event_signal_on(at, "", signal, active, severity).await
    }

    /// The routes with an open incident on `signal`.
    pub async fn open_routes(&mut self, signal: &'static str) -> Result<Vec<String>, DbError> {
        self.resume().await?;
        Ok(self
            .watched
            .iter()
            .filter(|((_, s), w)| *s == signal && w.incident.is_some())
            .map(|((route, _), _)| route.clone())
            .collect())
    }

    /// [`Detector::event_signal`] about one route (`""`: the whole gateway).
    pub async fn event_signal_on(
        &mut self,
        at: i64,
        route: &str,
        signal: &'static str,
        active: bool,
        severity: Severity,
    ) -> Result<Option<IncidentNotice>, DbError> {
        self.resume().await?;
        let was_open = self.watched(route, signal).incident.is_some();
        if active == was_open {
            return Ok(None);
        }
        let (severity, event) = if active {
            (severity, IncidentEvent::Open)
        } else {
            (Severity::None, IncidentEvent::Resolve)
        };
        let verdict = event_verdict(at, severity, event);
        self.change(at, route, signal, &verdict, if active { 1.0 } else { 0.0 })
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

    /// The credential changes the audit log recorded in the window starting at `at` (`rows`:
    /// any audit rows; other actions are ignored). Each is a notice in the gateway's channel
    /// (who, what, when — the row's actor, action and target, never its detail or a secret) and
    /// is attached to the error-ratio and auth-failure incidents that follow; a burst of
    /// [`CREDENTIAL_BURST`] or more in one window is an incident of its own, resolved by the
    /// next window with fewer. Returns that incident's change, if any.
    pub async fn credential_changes(
        &mut self,
        at: i64,
        rows: &[crate::db::audit::AuditRow],
    ) -> Result<Option<IncidentNotice>, DbError> {
        self.resume().await?;
        let changes: Vec<_> = rows
            .iter()
            .filter(|r| is_credential_change(&r.action))
            .collect();
        self.note_audit(rows);
        for r in &changes {
            let text = format!(
                "credential change on {}: {} {} by {} at {}",
                self.gateway,
                r.action,
                r.target,
                r.actor,
                r.at.format("%Y-%m-%d %H:%M:%SZ")
            );
            let id = change_note_id(&self.gateway, r.id);
            if let Err(e) = self.notifier.note(id, text).await {
                tracing::error!(gateway = %self.gateway, "cannot queue a credential-change notice: {e}");
            }
        }
        self.event_signal(
            at,
            CREDENTIAL_CHANGES,
            changes.len() >= CREDENTIAL_BURST,
            Severity::High,
        )
        .await
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
                pruned_at: 0,
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
        } else if let Err(e) = notifier.incident(&notice).await {
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
        self.resume().await?;
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
        if let Some(last) = &w.last {
            store.noted(last).await?;
        }
        if let Err(e) = notifier.incident(&notice).await {
            tracing::error!("cannot queue the notification for incident {incident}: {e}");
        }
        Ok(Some(notice))
    }
}

/// The notice of audit row `id` of `gateway`'s database: the same id every time, so the
/// outbox delivers it once however often it is queued.
fn change_note_id(gateway: &str, id: i64) -> Uuid {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("credential-change:{gateway}:{id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
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
        remembered: Vec::new(),
    }
}
