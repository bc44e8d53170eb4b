//! Retention: the health sweep deletes what the gateway database no longer needs to keep, kind
//! by kind, in batches (short transactions, so the proxies' reads and the console's writes do
//! not wait behind one long delete). The audit log is never deleted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{audit, DbError};
use crate::crd::gateway::RetentionSpec;

/// Rows deleted per statement.
pub const BATCH: i64 = 5_000;
/// Statements per kind and run: what is left waits for the next sweep.
pub const MAX_BATCHES: usize = 20;

/// The statement deleting at most `$2` rows of one kind older than `$1`.
fn statement(kind: &str) -> &'static str {
    match kind {
        "usage" => {
            "DELETE FROM usage_counters WHERE ctid IN (
                SELECT ctid FROM usage_counters WHERE window_start < $1 LIMIT $2)"
        }
        "resolvedIncidents" => {
            "DELETE FROM incidents WHERE id IN (
                SELECT id FROM incidents WHERE resolved_at < $1 LIMIT $2)"
        }
        "deliveredNotifications" => {
            "DELETE FROM notification_outbox WHERE id IN (
                SELECT id FROM notification_outbox WHERE delivered_at < $1 LIMIT $2)"
        }
        "endedKeys" => {
            // Usage is billing (kept by its own rule); a rotated key's successor names it.
            "DELETE FROM api_keys WHERE id IN (
                SELECT k.id FROM api_keys k
                 WHERE (k.revoked_at < $1 OR (k.revoked_at IS NULL AND k.expires_at < $1))
                   AND NOT EXISTS (SELECT 1 FROM usage_counters u WHERE u.api_key_id = k.id)
                   AND NOT EXISTS (SELECT 1 FROM api_keys r WHERE r.replaced_by = k.id)
                 LIMIT $2)"
        }
        _ => {
            // An open request stays until it is carried out.
            "DELETE FROM dsar_requests WHERE id IN (
                SELECT id FROM dsar_requests
                 WHERE coalesce(done_at, 'infinity') < $1 LIMIT $2)"
        }
    }
}

/// Deletes what `policy` no longer keeps, as of `now`; rows deleted by kind. A run that deleted
/// anything is audited (`retention.purge`, with the counts and the policy).
pub async fn apply(
    pool: &PgPool,
    policy: &RetentionSpec,
    now: DateTime<Utc>,
    actor: &str,
) -> Result<BTreeMap<&'static str, u64>, DbError> {
    let mut deleted = BTreeMap::new();
    for (kind, keep) in policy.kinds() {
        let before = chrono::Duration::from_std(keep.as_std())
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut n = 0u64;
        for _ in 0..MAX_BATCHES {
            let done = sqlx::query(statement(kind))
                .bind(before)
                .bind(BATCH)
                .execute(pool)
                .await
                .map_err(DbError::query("apply retention"))?
                .rows_affected();
            n += done;
            if (done as i64) < BATCH {
                break;
            }
        }
        deleted.insert(kind, n);
    }
    if deleted.values().any(|n| *n > 0) {
        let kept: BTreeMap<&str, String> = policy
            .kinds()
            .into_iter()
            .map(|(k, d)| (k, d.to_string()))
            .collect();
        audit::append(
            pool,
            actor,
            "retention.purge",
            "database",
            None,
            &serde_json::json!({"deleted": deleted, "kept_for": kept}),
        )
        .await?;
    }
    Ok(deleted)
}
