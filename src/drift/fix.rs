//! `apitree drift check` and `apitree drift fix`.
//!
//! A fix runs in one transaction under an advisory lock and re-reads the schema inside it, so
//! two fixers never apply the same fix twice: the second finds nothing left to do. Missing
//! objects and security drift are fixed; changed objects only with `allow_changed`; extra
//! objects are only reported. Every applied fix appends an audit entry in the same transaction.

use serde::Serialize;
use sqlx::{AssertSqlSafe, PgPool};

use super::history::{self, HistoryItem, HistoryState};
use super::introspect::introspect;
use super::{diff, expected, DriftItem, Kind, Risk};
use crate::crd::gateway::DriftSummary;
use crate::db::DbError;

/// Why a check or fix could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(
        "the expected-schema snapshot does not parse ({source}); regenerate it with `{command}`"
    )]
    Snapshot {
        #[source]
        source: serde_json::Error,
        command: &'static str,
    },
    #[error("{0}")]
    Database(#[from] DbError),
    #[error("the database holds {0} table(s): snapshot an empty one, e.g. `createdb apitree_snapshot` and pass its URL")]
    NotEmpty(i64),
    #[error(
        "fixing {object} failed: {source}; nothing was changed (the fix runs in one transaction)"
    )]
    Apply {
        object: String,
        #[source]
        source: sqlx::Error,
    },
}

/// `apitree drift snapshot`: migrates an empty database and reads back the schema the
/// migrations make, the reference every check compares with. Only an empty database is taken:
/// a used one could carry its drift into the reference.
pub async fn snapshot(pool: &PgPool, target: &str) -> Result<super::Schema, DriftError> {
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(pool)
            .await
            .map_err(DbError::query("count tables"))?;
    if tables > 0 {
        return Err(DriftError::NotEmpty(tables));
    }
    crate::db::migrate(pool, target).await?;
    let mut conn = pool
        .acquire()
        .await
        .map_err(DbError::query("acquire a connection"))?;
    Ok(introspect(&mut conn, "public").await?)
}

/// The result of a check.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub items: Vec<DriftItem>,
    pub history: Vec<HistoryItem>,
}

impl Report {
    /// No drift worth acting on (cosmetic history changes do not count).
    pub fn in_sync(&self) -> bool {
        self.items.is_empty()
            && self
                .history
                .iter()
                .all(|h| h.state == HistoryState::Cosmetic)
    }

    /// Counts for the ApiGateway status.
    pub fn summary(&self, checked_at: String) -> DriftSummary {
        let count = |k: Kind| self.items.iter().filter(|i| i.kind == k).count() as u32;
        let security = self
            .items
            .iter()
            .filter(|i| i.risk == Risk::Security)
            .count() as u32;
        let edited = self
            .history
            .iter()
            .filter(|h| h.state != HistoryState::Cosmetic)
            .count();
        DriftSummary {
            checked_at,
            missing: count(Kind::Missing),
            extra: count(Kind::Extra),
            changed: count(Kind::Changed),
            security,
            message: Some(if self.in_sync() {
                "in sync with the migrations".into()
            } else {
                format!(
                    "{} drifted object(s), {security} weakening security; {edited} migration history issue(s)",
                    self.items.len()
                )
            }),
        }
    }

    /// One line per item, for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for i in &self.items {
            out.push_str(&format!(
                "{:<8} {:<12} {}: {}\n",
                format!("{:?}", i.kind).to_lowercase(),
                format!("{:?}", i.risk).to_lowercase(),
                i.object,
                i.detail
            ));
        }
        for h in &self.history {
            out.push_str(&format!(
                "{:<8} {:<12} migration {} ({})\n",
                format!("{:?}", h.state).to_lowercase(),
                "history",
                h.version,
                h.description
            ));
        }
        if out.is_empty() {
            out.push_str("in sync: the database matches the migrations\n");
        }
        out
    }
}

/// Compares the database with the expected schema and the migration history. Refuses
/// another application's database unless `adopt` ([`crate::db::ensure_apitree`]).
pub async fn check(pool: &PgPool, adopt: bool) -> Result<Report, DriftError> {
    crate::db::ensure_apitree(pool, "the database", adopt).await?;
    let expected = expected().map_err(|source| DriftError::Snapshot {
        source,
        command: super::SNAPSHOT_COMMAND,
    })?;
    let mut conn = pool.acquire().await.map_err(|source| DbError::Query {
        operation: "connect for the drift check",
        source,
    })?;
    let actual = introspect(&mut conn, "public").await?;
    let history = history::check(&mut conn).await?;
    Ok(Report {
        items: diff(&expected, &actual),
        history,
    })
}

/// What a fix did.
#[derive(Debug, Clone, Serialize)]
pub struct FixReport {
    pub applied: Vec<DriftItem>,
    /// Changed objects left alone (no `allow_changed`) and extra objects (never touched).
    pub left: Vec<DriftItem>,
    /// The check after the fix.
    pub after: Report,
}

/// Applies the fixes, audited as `actor`. Refuses another application's database unless
/// `adopt`: a fix creates apitree's tables and turns on row-level security.
pub async fn fix(
    pool: &PgPool,
    allow_changed: bool,
    adopt: bool,
    actor: &str,
) -> Result<FixReport, DriftError> {
    crate::db::ensure_apitree(pool, "the database", adopt).await?;
    let expected = expected().map_err(|source| DriftError::Snapshot {
        source,
        command: super::SNAPSHOT_COMMAND,
    })?;
    let query = |operation| move |source| DbError::Query { operation, source };
    let mut tx = pool.begin().await.map_err(query("begin the drift fix"))?;
    // One fixer at a time; the second waits here and then finds the work done.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('apitree.drift.fix'))")
        .execute(&mut *tx)
        .await
        .map_err(query("take the drift-fix lock"))?;
    let actual = introspect(&mut tx, "public").await?;
    let mut applied = Vec::new();
    let mut left = Vec::new();
    for item in diff(&expected, &actual) {
        let wanted = item.safe_to_fix() || (allow_changed && item.kind == Kind::Changed);
        let Some(sql) = item.fix_sql.clone().filter(|_| wanted) else {
            left.push(item);
            continue;
        };
        sqlx::raw_sql(AssertSqlSafe(sql.clone()))
            .execute(&mut *tx)
            .await
            .map_err(|source| DriftError::Apply {
                object: item.object.clone(),
                source,
            })?;
        applied.push(item);
    }
    // Audited after every fix, so a restored audit-log trigger chains these entries too.
    for item in &applied {
        crate::db::audit::append(
            &mut *tx,
            actor,
            "drift.fix",
            &item.object,
            None,
            &serde_json::json!({"kind": item.kind, "risk": item.risk, "sql": item.fix_sql}),
        )
        .await?;
    }
    tx.commit().await.map_err(query("commit the drift fix"))?;
    let after = check(pool, adopt).await?;
    Ok(FixReport {
        applied,
        left,
        after,
    })
}
