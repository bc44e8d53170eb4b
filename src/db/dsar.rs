//! Data subject requests: what apitree holds about one person (export), and forgetting them
//! (erasure) without breaking the audit log's hash chain.
//!
//! The work is done by the SQL functions `dsar_export` and `dsar_erase` (migration
//! `…015_data_subjects`), so the CLI and the console run the same statements. The design:
//! the audit log names people only by opaque references — `user:<uuid>` for a console user,
//! `subject:<uuid>` for a Slack or OS user (a trigger replaces their names before the row is
//! chained) — and the names live in `users` and `data_subjects`, which erasure overwrites.
//! [`COLUMNS`] says, for every column of the schema, whether it can hold personal data and
//! how export and erasure treat it; a test fails when a new column is not listed.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{audit, DbError};

/// Another identity of the same person, as `slack:<Slack user id>` or `os:<OS user name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle(String);

impl Handle {
    /// Parses `slack:U0123ABC` or `os:alice`.
    pub fn parse(text: &str) -> Result<Self, DsarError> {
        let ok = match text.split_once(':') {
            Some(("slack", id)) => {
                (1..=40).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            }
            Some(("os", name)) => {
                (1..=64).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-$".contains(&b))
            }
            _ => false,
        };
        if ok {
            Ok(Self(text.to_string()))
        } else {
            Err(DsarError::BadInput(format!(
                "{text:?} is not an identity: write slack:<Slack user id> (e.g. slack:U024BE7LH) or os:<user name> (e.g. os:alice)"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a request about a person's data was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum DsarError {
    #[error("{0}")]
    NoUser(String),
    #[error("{0}")]
    AlreadyErased(String),
    #[error("erasure refused: {0}")]
    Refused(String),
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl DsarError {
    /// A stable label (console error codes, CLI exit reasons).
    pub fn category(&self) -> &'static str {
        match self {
            Self::NoUser(_) => "not_found",
            Self::AlreadyErased(_) => "already_erased",
            Self::Refused(_) => "erasure_refused",
            Self::BadInput(_) => "bad_request",
            Self::Db(_) => "internal",
        }
    }

    fn from_sql(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |e| {
            let mapped = e.as_database_error().and_then(|d| {
                let message = d.message().to_string();
                match d.code().as_deref() {
                    Some("AT404") => Some(Self::NoUser(message)),
                    Some("AT409") => Some(Self::AlreadyErased(message)),
                    Some("AT403") => Some(Self::Refused(message)),
                    Some("AT400") => Some(Self::BadInput(message)),
                    _ => None,
                }
            });
            mapped.unwrap_or_else(|| Self::Db(DbError::query(operation)(e)))
        }
    }
}

fn handles(list: &[Handle]) -> Vec<String> {
    list.iter().map(|h| h.0.clone()).collect()
}

/// The user whose email this is (case-insensitive), if any.
pub async fn user_by_email(db: &mut PgConnection, email: &str) -> Result<Option<Uuid>, DbError> {
    sqlx::query_scalar("SELECT id FROM users WHERE lower(email) = lower($1)")
        .bind(email.trim())
        .fetch_optional(db)
        .await
        .map_err(DbError::query("find the user"))
}

/// Everything apitree holds about `user` (and the identities in `also`), as one JSON document;
/// the export is itself audited (`dsar.export`) and queued as a request. Commit `db` after.
pub async fn export(
    db: &mut PgConnection,
    user: Uuid,
    also: &[Handle],
    actor: &str,
) -> Result<Value, DsarError> {
    let doc: Option<Value> = sqlx::query_scalar("SELECT dsar_export($1, $2)")
        .bind(user)
        .bind(handles(also))
        .fetch_one(&mut *db)
        .await
        .map_err(DsarError::from_sql("export a person's data"))?;
    let Some(doc) = doc else {
        return Err(DsarError::NoUser(format!("there is no user {user}")));
    };
    let counts: serde_json::Map<String, Value> = doc
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_array().map(|a| (k.clone(), Value::from(a.len()))))
        .collect();
    let subject = format!("user:{user}");
    let detail = serde_json::json!({"user_id": user, "sections": counts});
    let org: Option<Uuid> = doc["profile"]["org_id"]
        .as_str()
        .and_then(|s| s.parse().ok());
    audit::append(&mut *db, actor, "dsar.export", &subject, org, &detail).await?;
    sqlx::query("SELECT dsar_done($1, 'export', 'exported', $2, NULL, $3)")
        .bind(&subject)
        .bind(actor)
        .bind(&detail)
        .execute(&mut *db)
        .await
        .map_err(DsarError::from_sql("record the export"))?;
    Ok(doc)
}

/// Erases `user` (and the identities in `also`): keys they created revoked, BYOK credentials
/// they wrote removed, profile overwritten, identities forgotten; audited as `dsar.erase`.
/// Returns the counts. Refused for a super_admin or an org's last admin. Commit `db` after.
pub async fn erase(
    db: &mut PgConnection,
    user: Uuid,
    also: &[Handle],
    actor: &str,
    reason: &str,
) -> Result<Value, DsarError> {
    sqlx::query_scalar("SELECT dsar_erase($1, $2, $3, $4)")
        .bind(user)
        .bind(handles(also))
        .bind(actor)
        .bind(reason)
        .fetch_one(&mut *db)
        .await
        .map_err(DsarError::from_sql("erase a person's data"))
}

/// Queues an erasure request that was refused (`why`), with an audit row, in a transaction of
/// its own (the refused one was rolled back). Commit `db` after.
pub async fn record_refusal(
    db: &mut PgConnection,
    user: Uuid,
    actor: &str,
    reason: &str,
    why: &str,
) -> Result<(), DsarError> {
    let subject = format!("user:{user}");
    let reason = reason.trim();
    let reason = (!reason.is_empty()).then(|| reason.chars().take(1000).collect::<String>());
    let outcome = serde_json::json!({"refused": why});
    audit::append(
        &mut *db,
        actor,
        "dsar.erase_refused",
        &subject,
        None,
        &serde_json::json!({"user_id": user, "reason": reason, "refused": why}),
    )
    .await?;
    sqlx::query("SELECT dsar_done($1, 'erase', 'refused', $2, $3, $4)")
        .bind(&subject)
        .bind(actor)
        .bind(reason)
        .bind(outcome)
        .execute(&mut *db)
        .await
        .map_err(DsarError::from_sql("record the refusal"))?;
    Ok(())
}

/// Logs a request as it arrives (`received`), for the queue; carrying it out later closes it.
/// Commit `db` after.
pub async fn receive(
    db: &mut PgConnection,
    user: Uuid,
    kind: &str,
    actor: &str,
    note: Option<&str>,
) -> Result<i64, DsarError> {
    if !matches!(kind, "export" | "erase") {
        return Err(DsarError::BadInput(format!(
            "{kind:?} is not a request: give export or erase"
        )));
    }
    let note = note.map(str::trim).filter(|n| !n.is_empty());
    if note.is_some_and(|n| n.chars().count() > 1000) {
        return Err(DsarError::BadInput(
            "a note is at most 1000 characters".into(),
        ));
    }
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
        .bind(user)
        .fetch_optional(&mut *db)
        .await
        .map_err(DsarError::from_sql("find the user"))?;
    if exists.is_none() {
        return Err(DsarError::NoUser(format!("there is no user {user}")));
    }
    let subject = format!("user:{user}");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO dsar_requests (subject, kind, state, actor, reason)
         VALUES ($1, $2, 'received', $3, $4) RETURNING id",
    )
    .bind(&subject)
    .bind(kind)
    .bind(actor)
    .bind(note)
    .fetch_one(&mut *db)
    .await
    .map_err(DsarError::from_sql("log the request"))?;
    audit::append(
        &mut *db,
        actor,
        "dsar.received",
        &subject,
        None,
        &serde_json::json!({"user_id": user, "kind": kind, "request": id}),
    )
    .await?;
    Ok(id)
}

/// How a column relates to the people apitree knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personal {
    /// Personal data: in the export, overwritten or removed by erasure.
    Erased,
    /// A secret about a person (a password or invitation hash): never exported, cleared by
    /// erasure.
    Secret,
    /// About a person, exported, and kept by erasure because once the profile is gone it
    /// identifies no one (ids, roles, times).
    Kept,
    /// Names a person only by an opaque reference (`user:<uuid>`, `subject:<uuid>`), or is
    /// free text written by staff about an org (never a place for personal data); kept.
    Reference,
    /// Holds no personal data.
    No,
}

/// Every column of the schema, classified. A new column must be added here (a test compares
/// this list with the migrated schema), and a new [`Personal::Erased`] or [`Personal::Secret`]
/// one handled by `dsar_export` / `dsar_erase` (a test seeds each and checks both).
pub const COLUMNS: &[(&str, &[(&str, Personal)])] = {
    use Personal::*;
    &[
        (
            "users",
            &[
                ("id", Kept),
                ("org_id", Kept),
                ("email", Erased),
                ("role", Kept),
                ("created_at", Kept),
                ("password_hash", Secret),
                ("disabled_at", Kept),
                ("updated_at", Kept),
                ("invite_hash", Secret),
                ("invite_expires_at", Erased),
                ("erased_at", Kept),
            ],
        ),
        (
            "data_subjects",
            &[
                ("id", Reference),
                ("kind", Kept),
                ("label", Erased),
                ("external_id", Erased),
                ("first_seen", Kept),
                ("last_seen", Kept),
                ("erased_at", Kept),
            ],
        ),
        (
            "api_keys",
            &[
                ("id", Kept),
                ("org_id", No),
                ("name", Erased),
                ("prefix", Kept),
                ("key_hash", No),
                ("scope", Kept),
                ("tier", Kept),
                ("daily_quota", Kept),
                ("created_at", Kept),
                ("expires_at", Kept),
                ("grace_until", Kept),
                ("revoked_at", Kept),
                ("replaced_by", Kept),
                ("last_used_at", Kept),
            ],
        ),
        (
            "upstream_credentials",
            &[
                ("id", Kept),
                ("org_id", No),
                ("api_id", No),
                ("name", Erased),
                ("kind", No),
                ("ciphertext", No),
                ("nonce", No),
                ("key_version", No),
                ("created_at", Kept),
                ("updated_at", Kept),
                ("rotated_at", Kept),
                ("header", No),
                ("value_prefix", No),
                ("bound_upstream", No),
            ],
        ),
        (
            "usage_counters",
            &[
                ("org_id", No),
                ("api_key_id", Kept),
                ("api_id", Kept),
                ("window_start", Kept),
                ("requests", Kept),
                ("errors", Kept),
                ("bytes_out", Kept),
            ],
        ),
        (
            "incidents",
            &[
                ("id", No),
                ("gateway", No),
                ("route", No),
                ("signal", No),
                ("severity", No),
                ("max_severity", No),
                ("ratio", No),
                ("baseline", No),
                ("p_value", No),
                ("opened_at", No),
                ("updated_at", No),
                ("resolved_at", No),
                ("acknowledged_by", Erased),
                ("acknowledged_at", Kept),
                ("silenced_until", No),
                ("slack_channel", No),
                ("slack_ts", No),
                ("notice_seq", No),
                ("last_notice", Erased),
            ],
        ),
        (
            "notification_outbox",
            &[
                ("id", No),
                ("dedupe_key", No),
                ("incident_id", No),
                ("channel", No),
                ("method", No),
                ("payload", Erased),
                ("attempts", No),
                ("next_attempt_at", No),
                ("last_error", No),
                ("created_at", No),
                ("delivered_at", No),
                ("kind", No),
                ("app", No),
                ("slack_ts", No),
            ],
        ),
        (
            "audit_log",
            &[
                ("id", Reference),
                ("at", Reference),
                ("actor", Reference),
                ("action", Reference),
                ("target", Reference),
                ("org_id", Reference),
                ("detail", Reference),
                ("prev_hash", No),
                ("hash", No),
            ],
        ),
        (
            "credit_ledger",
            &[
                ("id", No),
                ("org_id", No),
                ("amount", No),
                ("reason", Reference),
                ("actor", Reference),
                ("at", Reference),
            ],
        ),
        (
            "dsar_requests",
            &[
                ("id", No),
                ("subject", Reference),
                ("kind", Reference),
                ("state", Reference),
                ("actor", Reference),
                ("reason", Reference),
                ("outcome", No),
                ("at", Reference),
                ("done_at", Reference),
                ("done_by", Reference),
            ],
        ),
        ("orgs", &[("id", No), ("name", No), ("created_at", No)]),
        (
            "apis",
            &[
                ("id", No),
                ("org_id", No),
                ("name", No),
                ("path_prefix", No),
                ("upstream_url", No),
                ("scopes", No),
                ("pii_mode", No),
                ("timeout_ms", No),
                ("log_bodies", No),
                ("created_at", No),
                ("updated_at", No),
            ],
        ),
        (
            "detector_history",
            &[
                ("at", No),
                ("gateway", No),
                ("route", No),
                ("signal", No),
                ("value", No),
                ("weight", No),
            ],
        ),
        ("audit_cursors", &[("gateway", No), ("after", No)]),
        ("usage_flushes", &[("replica", No), ("seq", No), ("at", No)]),
        (
            "apitree_migration_fingerprints",
            &[("version", No), ("fingerprint", No), ("recorded_at", No)],
        ),
    ]
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_parsed_strictly() {
        for good in ["slack:U024BE7LH", "os:alice", "os:svc-deploy.1", "slack:W1"] {
            assert_eq!(Handle::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "alice",
            "slack:",
            "slack:u024",
            "slack:U0 24",
            "os:",
            "os:a b",
            "os:a'b",
            "os:a%",
            "email:a@b",
            "user:7",
        ] {
            let err = Handle::parse(bad).unwrap_err();
            assert!(err.to_string().contains("slack:<Slack user id>"), "{err}");
        }
    }
}
