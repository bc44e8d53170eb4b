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

/// The statement deleting at most `$2` rows of one kind older than `$1`; None for a kind it
/// does not know (never guessed: a wrong guess deletes another kind's rows).
fn statement(kind: &str) -> Option<&'static str> {
    Some(match kind {
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
        "dataRequests" => {
            // An open request stays until it is carried out.
            "DELETE FROM dsar_requests WHERE id IN (
                SELECT id FROM dsar_requests
                 WHERE coalesce(done_at, 'infinity') < $1 LIMIT $2)"
        }
        _ => return None,
    })
}

/// The shortest rule applied: a spec the operator refused (`1h`, `0s`) never deletes anything.
pub const MIN_KEEP: std::time::Duration = std::time::Duration::from_secs(86_400);

/// What a retention run did.
#[derive(Debug, Default)]
pub struct Purged {
    /// Rows deleted, by kind.
    pub deleted: BTreeMap<&'static str, u64>,
    /// Why a kind was not applied (a rule shorter than a day), or where the run stopped.
    pub problems: Vec<String>,
}

/// Deletes what `policy` no longer keeps, as of `now`. A run that deleted anything is audited
/// (`retention.purge`, with the counts, the rules, and the error that stopped it, if any).
pub async fn apply(
    pool: &PgPool,
    policy: &RetentionSpec,
    now: DateTime<Utc>,
    actor: &str,
) -> Purged {
    let mut out = Purged::default();
    // Year 1: older than anything stored, and a time PostgreSQL takes (a rule of millions of
    // days means "keep everything").
    let floor =
        DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
    'kinds: for (kind, keep) in policy.kinds() {
        let Some(sql) = statement(kind) else {
            out.problems.push(format!(
                "retention.{kind} has no rule in this release: not applied"
            ));
            continue;
        };
        if keep.as_std() < MIN_KEEP {
            out.problems.push(format!(
                "retention.{kind} is {keep}, shorter than a day: not applied"
            ));
            continue;
        }
        let before = chrono::Duration::from_std(keep.as_std())
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .map_or(floor, |t| t.max(floor));
        let mut n = 0u64;
        for _ in 0..MAX_BATCHES {
            match sqlx::query(sql)
                .bind(before)
                .bind(BATCH)
                .execute(pool)
                .await
            {
                Ok(done) => {
                    n += done.rows_affected();
                    if (done.rows_affected() as i64) < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    out.deleted.insert(kind, n);
                    out.problems.push(format!(
                        "retention stopped at {kind}: {}",
                        DbError::query("apply retention")(e)
                    ));
                    break 'kinds;
                }
            }
        }
        out.deleted.insert(kind, n);
    }
    if out.deleted.values().any(|n| *n > 0) {
        let kept: BTreeMap<&str, String> = policy
            .kinds()
            .into_iter()
            .map(|(k, d)| (k, d.to_string()))
            .collect();
        let detail =
            serde_json::json!({"deleted": out.deleted, "kept_for": kept, "problems": out.problems});
        if let Err(e) =
            audit::append(pool, actor, "retention.purge", "database", None, &detail).await
        {
            out.problems
                .push(format!("retention could not be audited: {e}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// Every kind the spec has is one this module deletes, by its own statement.
    #[test]
    fn every_kind_has_its_own_statement() {
        let spec = crate::crd::gateway::RetentionSpec::default();
        let mut seen = std::collections::BTreeSet::new();
        for (kind, _) in spec.kinds() {
            let sql = super::statement(kind).unwrap_or_else(|| panic!("{kind} has no statement"));
            assert!(seen.insert(sql), "{kind} shares a statement");
        }
        assert_eq!(super::statement("usages"), None);
    }
}
