//! The detector of one gateway: feeds each window's per-route error ratios and the gateway's
//! auth failures through their series, keeps one incident per (gateway, route, signal) in the
//! incident store (PostgreSQL when configured, memory otherwise) and hands every change to the
//! notifier.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use uuid::Uuid;

use super::incident::{IncidentEvent, Series};
use super::score::{ScoreConfig, Severity};
use super::source::GatewayWindow;
use crate::db::DbError;
use crate::notify::{IncidentNotice, Notifier};

/// Signal names (also incident `signal` values).
pub const ERROR_RATIO: &str = "error ratio";
pub const AUTH_FAILURES: &str = "auth failures";

/// A stored incident.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredIncident {
    pub id: Uuid,
    pub gateway: String,
    pub route: String,
    pub signal: String,
    pub severity: Severity,
    pub resolved: bool,
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
                let rows: Vec<(Uuid, String, String, String, String)> = sqlx::query_as(
                    "SELECT id, gateway, route, signal, severity::text FROM incidents WHERE resolved_at IS NULL ORDER BY opened_at",
                )
                .fetch_all(pool)
                .await
                .map_err(DbError::query("list open incidents"))?;
                Ok(rows
                    .into_iter()
                    .map(|(id, gateway, route, signal, sev)| StoredIncident {
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
                    })
                    .collect())
            }
        }
    }
}

struct Watched {
    series: Series,
    incident: Option<Uuid>,
    seq: u32,
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
        }
    }

    /// Scores one window (starting at `at`, unix seconds) and records and notifies every change.
    pub async fn observe(
        &mut self,
        at: i64,
        window: &GatewayWindow,
    ) -> Result<Vec<IncidentNotice>, DbError> {
        let mut inputs: Vec<(String, &'static str, u64, u64)> = window
            .routes
            .iter()
            .filter(|(route, _)| route.as_str() != crate::proxy::metrics::NO_ROUTE)
            .map(|(route, w)| (route.clone(), ERROR_RATIO, w.requests, w.errors))
            .collect();
        let total: u64 = window.routes.values().map(|w| w.requests).sum();
        inputs.push((
            String::new(),
            AUTH_FAILURES,
            total,
            window.auth_failures.min(total),
        ));

        let mut notices = Vec::new();
        for (route, signal, requests, errors) in inputs {
            let w = self
                .watched
                .entry((route.clone(), signal))
                .or_insert_with(|| Watched {
                    series: Series::default(),
                    incident: None,
                    seq: 0,
                });
            let verdict = w.series.observe_errors(at, requests, errors, &self.cfg);
            let Some(event) = verdict.event else { continue };
            w.seq += 1;
            let mut notice = IncidentNotice {
                incident_id: w.incident.unwrap_or_else(Uuid::nil),
                seq: w.seq,
                gateway: self.gateway.clone(),
                route: route.clone(),
                signal: signal.to_string(),
                severity: verdict.severity,
                event,
                ratio: verdict.score.ratio,
                current: if requests > 0 {
                    errors as f64 / requests as f64
                } else {
                    0.0
                },
                baseline: verdict.score.baseline.unwrap_or(0.0),
                p_value: verdict.score.p_value,
                window_secs: self.cfg.window_secs as u64,
                at: chrono::DateTime::from_timestamp(at + self.cfg.window_secs, 0)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default(),
                runbook_url: self.context.runbook_url.clone(),
                status_url: self.context.status_url.clone(),
                rollout_revision: None,
                acknowledged_by: None,
                critical_mention: self.context.critical_mention.clone(),
            };
            let id = self
                .store
                .record(w.incident, &self.gateway, &route, signal, &notice)
                .await?;
            notice.incident_id = id;
            w.incident = if event == IncidentEvent::Resolve {
                None
            } else {
                Some(id)
            };
            if event == IncidentEvent::Resolve {
                w.seq = 0;
            }
            if let Err(e) = self.notifier.notify(&notice).await {
                tracing::error!("cannot queue the notification for incident {id}: {e}");
            }
            notices.push(notice);
        }
        Ok(notices)
    }
}
