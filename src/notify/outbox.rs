//! The notification outbox: every Slack call is first a row here, then delivered, retried with
//! backoff on failure, and marked delivered. In PostgreSQL it survives restarts; in memory (no
//! database) it survives Slack outages but not a restart. In PostgreSQL a deliverer claims the
//! rows it takes (`FOR UPDATE SKIP LOCKED`), so two deliverers never send one row at once. Rows
//! of one incident are delivered in order, and a row waits while an earlier row of its incident
//! is undelivered (an update cannot go out before the message it updates). Duplicate keys are
//! ignored.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::DbError;

/// How long a row handed to a deliverer is not handed to another: longer than one Slack call
/// can take. A deliverer killed between Slack's answer and marking the row delivered leaves it
/// to be sent once more after this.
pub const CLAIM_FOR: Duration = Duration::from_secs(60);

/// Which part of the incident's conversation a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The incident's message (chat.postMessage).
    Main,
    /// Refresh of that message (chat.update).
    Update,
    /// A thread reply under it (chat.postMessage with thread_ts).
    Reply,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Update => "update",
            Kind::Reply => "reply",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "update" => Kind::Update,
            "reply" => Kind::Reply,
            _ => Kind::Main,
        }
    }
    fn method(self) -> &'static str {
        match self {
            Kind::Update => "chat.update",
            _ => "chat.postMessage",
        }
    }
}

/// A row ready to deliver.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub incident: Uuid,
    pub kind: Kind,
    pub channel: String,
    pub body: Value,
    pub attempts: i32,
    /// The incident's delivered main message (channel, ts), if any.
    pub main: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct MemRow {
    id: i64,
    key: String,
    incident: Uuid,
    kind: Kind,
    channel: String,
    body: Value,
    attempts: i32,
    next_at: SystemTime,
    delivered: bool,
    ts: Option<String>,
    last_error: Option<String>,
}

/// Where rows live.
pub enum Outbox {
    Memory(Mutex<Vec<MemRow>>),
    /// The rows of one Slack `app` in PostgreSQL: `""` for the operator's own app, a gateway's
    /// `namespace/name` for the app its ApiGateway names.
    Postgres {
        pool: PgPool,
        app: String,
    },
}

impl Outbox {
    pub fn memory() -> Self {
        Self::Memory(Mutex::new(Vec::new()))
    }

    /// The operator's own app's rows in PostgreSQL.
    pub fn postgres(pool: PgPool) -> Self {
        Self::postgres_for(pool, "")
    }

    /// One app's rows in PostgreSQL.
    pub fn postgres_for(pool: PgPool, app: &str) -> Self {
        Self::Postgres {
            pool,
            app: app.to_string(),
        }
    }

    /// Adds a row unless one with `key` exists.
    pub async fn enqueue(
        &self,
        incident: Uuid,
        kind: Kind,
        channel: &str,
        body: Value,
        key: &str,
    ) -> Result<(), DbError> {
        match self {
            Self::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                if rows.iter().any(|r| r.key == key) {
                    return Ok(());
                }
                let id = rows.len() as i64 + 1;
                rows.push(MemRow {
                    id,
                    key: key.to_string(),
                    incident,
                    kind,
                    channel: channel.to_string(),
                    body,
                    attempts: 0,
                    next_at: SystemTime::UNIX_EPOCH,
                    delivered: false,
                    ts: None,
                    last_error: None,
                });
                Ok(())
            }
            Self::Postgres { pool, app } => {
                sqlx::query(
                    "INSERT INTO notification_outbox (dedupe_key, incident_id, channel, method, kind, payload, app)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (dedupe_key) DO NOTHING",
                )
                .bind(key)
                .bind(incident)
                .bind(channel)
                .bind(kind.method())
                .bind(kind.as_str())
                .bind(&body)
                .bind(app)
                .execute(pool)
                .await
                .map_err(DbError::query("enqueue notification"))?;
                Ok(())
            }
        }
    }

    /// Rows due now, oldest first, at most `limit`, skipping incidents with an earlier row
    /// still undelivered. In PostgreSQL the rows are claimed for [`CLAIM_FOR`].
    pub async fn due(&self, limit: i64) -> Result<Vec<Pending>, DbError> {
        match self {
            Self::Memory(rows) => {
                let rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                let now = SystemTime::now();
                let mut blocked = std::collections::HashSet::new();
                let mut out = Vec::new();
                for r in rows.iter().filter(|r| !r.delivered) {
                    if !blocked.insert(r.incident) || r.next_at > now {
                        continue;
                    }
                    let main = rows
                        .iter()
                        .find(|m| m.incident == r.incident && m.kind == Kind::Main && m.delivered)
                        .and_then(|m| m.ts.clone().map(|ts| (m.channel.clone(), ts)));
                    out.push(Pending {
                        id: r.id,
                        incident: r.incident,
                        kind: r.kind,
                        channel: r.channel.clone(),
                        body: r.body.clone(),
                        attempts: r.attempts,
                        main,
                    });
                    if out.len() as i64 >= limit {
                        break;
                    }
                }
                Ok(out)
            }
            Self::Postgres { pool, app } => {
                type Row = (
                    i64,
                    Option<Uuid>,
                    String,
                    String,
                    Value,
                    i32,
                    Option<String>,
                    Option<String>,
                );
                // Claimed: due again only after CLAIM_FOR, so a second deliverer (a replica
                // that takes over, an old leader still finishing) skips them, and a deliverer
                // killed mid-call leaves them to the next one.
                let rows: Vec<Row> = sqlx::query_as(
                    "WITH due AS (
                         SELECT o.id FROM notification_outbox o
                         WHERE o.delivered_at IS NULL AND o.next_attempt_at <= now() AND o.app = $3
                           AND NOT EXISTS (SELECT 1 FROM notification_outbox e
                                           WHERE e.incident_id = o.incident_id AND e.id < o.id AND e.delivered_at IS NULL)
                         ORDER BY o.id LIMIT $1
                         FOR UPDATE OF o SKIP LOCKED
                     ), claimed AS (
                         UPDATE notification_outbox o SET next_attempt_at = now() + $2 * interval '1 millisecond'
                         FROM due WHERE o.id = due.id
                         RETURNING o.id, o.incident_id, o.kind, o.channel, o.payload, o.attempts
                     )
                     SELECT c.id, c.incident_id, c.kind, c.channel, c.payload, c.attempts, m.channel, m.slack_ts
                     FROM claimed c
                     LEFT JOIN notification_outbox m
                       ON m.incident_id = c.incident_id AND m.kind = 'main' AND m.delivered_at IS NOT NULL
                     ORDER BY c.id",
                )
                .bind(limit)
                .bind(CLAIM_FOR.as_millis() as f64)
                .bind(app)
                .fetch_all(pool)
                .await
                .map_err(DbError::query("read due notifications"))?;
                Ok(rows
                    .into_iter()
                    .map(
                        |(id, incident, kind, channel, body, attempts, mc, mts)| Pending {
                            id,
                            incident: incident.unwrap_or_default(),
                            kind: Kind::parse(&kind),
                            channel,
                            body,
                            attempts,
                            main: mc.zip(mts),
                        },
                    )
                    .collect())
            }
        }
    }

    /// Marks a row delivered; `ts` is the posted message's timestamp (kept for main rows).
    pub async fn delivered(&self, id: i64, ts: Option<&str>) -> Result<(), DbError> {
        match self {
            Self::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = rows.iter_mut().find(|r| r.id == id) {
                    r.delivered = true;
                    r.ts = ts.map(str::to_string);
                }
                Ok(())
            }
            Self::Postgres { pool, .. } => {
                sqlx::query("UPDATE notification_outbox SET delivered_at = now(), slack_ts = $2, attempts = attempts + 1 WHERE id = $1 AND delivered_at IS NULL")
                    .bind(id)
                    .bind(ts)
                    .execute(pool)
                    .await
                    .map_err(DbError::query("mark notification delivered"))?;
                Ok(())
            }
        }
    }

    /// Records a failed attempt; the row is retried after `retry_in`.
    pub async fn failed(&self, id: i64, error: &str, retry_in: Duration) -> Result<(), DbError> {
        match self {
            Self::Memory(rows) => {
                let mut rows = rows.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = rows.iter_mut().find(|r| r.id == id) {
                    r.attempts += 1;
                    r.next_at = SystemTime::now() + retry_in;
                    r.last_error = Some(error.to_string());
                }
                Ok(())
            }
            Self::Postgres { pool, .. } => {
                sqlx::query(
                    "UPDATE notification_outbox
                     SET attempts = attempts + 1, last_error = $2, next_attempt_at = now() + $3 * interval '1 millisecond'
                     WHERE id = $1",
                )
                .bind(id)
                .bind(error)
                .bind(retry_in.as_millis() as f64)
                .execute(pool)
                .await
                .map_err(DbError::query("record notification failure"))?;
                Ok(())
            }
        }
    }

    /// Gives claimed rows back at once (instead of after [`CLAIM_FOR`]): a deliverer that
    /// stopped a pass before sending them.
    pub async fn release(&self, ids: &[i64]) -> Result<(), DbError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Postgres { pool, .. } => {
                sqlx::query(
                    "UPDATE notification_outbox SET next_attempt_at = now()
                     WHERE id = ANY($1) AND delivered_at IS NULL",
                )
                .bind(ids)
                .execute(pool)
                .await
                .map_err(DbError::query("release claimed notifications"))?;
                Ok(())
            }
        }
    }

    /// Rows not yet delivered (for status and tests).
    pub async fn pending_count(&self) -> Result<i64, DbError> {
        match self {
            Self::Memory(rows) => Ok(rows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|r| !r.delivered)
                .count() as i64),
            Self::Postgres { pool, app } => sqlx::query_scalar(
                "SELECT count(*) FROM notification_outbox WHERE delivered_at IS NULL AND app = $1",
            )
            .bind(app)
            .fetch_one(pool)
            .await
            .map_err(DbError::query("count pending notifications")),
        }
    }
}
