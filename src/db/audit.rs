//! The append-only, hash-chained audit log.
//!
//! The database numbers and chains rows in a trigger (see the audit-log migration); this module
//! appends entries and recomputes hashes the same way so a chain can be verified from outside.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{
    types::chrono::{DateTime, Utc},
    PgExecutor,
};
use uuid::Uuid;

use super::DbError;

/// One stored audit row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub org_id: Option<Uuid>,
    /// `detail::text`: the database's own text form of the jsonb, which is what it hashed.
    pub detail: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// Appends one entry and returns its id. The database assigns id, time and hashes.
pub async fn append<'e>(
    db: impl PgExecutor<'e>,
    actor: &str,
    action: &str,
    target: &str,
    org_id: Option<Uuid>,
    detail: &Value,
) -> Result<i64, DbError> {
    sqlx::query_scalar(
        "INSERT INTO audit_log (id, actor, action, target, org_id, detail, prev_hash, hash)
         VALUES (0, $1, $2, $3, $4, $5, '', '') RETURNING id",
    )
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(org_id)
    .bind(detail)
    .fetch_one(db)
    .await
    .map_err(DbError::query("append audit entry"))
}

/// Why this connection's role cannot see every row of `audit_log`, if it cannot: row-level
/// security applies to it (not the owner, nor a superuser or BYPASSRLS role, or the table
/// forces it), or it may not read the table. A verifier that sees only some rows (or none)
/// cannot vouch for the chain: "0 rows, intact" would be a lie.
pub async fn hidden_rows(pool: &sqlx::PgPool) -> Result<Option<String>, DbError> {
    let (role, readable, bypass, owner, enabled, forced): (String, bool, bool, bool, bool, bool) =
        sqlx::query_as(
            "SELECT current_user::text,
                    has_table_privilege('audit_log', 'SELECT'),
                    (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user),
                    pg_has_role(c.relowner, 'USAGE'),
                    c.relrowsecurity,
                    c.relforcerowsecurity
             FROM pg_class c WHERE c.oid = 'audit_log'::regclass",
        )
        .fetch_one(pool)
        .await
        .map_err(DbError::query("look at who may read audit_log"))?;
    if !readable {
        return Ok(Some(format!(
            "role {role} may not read audit_log; run the verifier as the table's owner"
        )));
    }
    let filtered = enabled && !bypass && (!owner || forced);
    Ok(filtered.then(|| {
        format!(
            "row-level security filters audit_log for role {role}, so some rows (perhaps all) are hidden from it; run the verifier as the table's owner or a role with BYPASSRLS"
        )
    }))
}

/// The exact text the database hashes for a row (`audit_log_canonical` in SQL).
pub fn canonical(row: &AuditRow) -> String {
    [
        row.id.to_string(),
        row.at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        row.actor.clone(),
        row.action.clone(),
        row.target.clone(),
        row.org_id.map(|o| o.to_string()).unwrap_or_default(),
        row.detail.clone(),
    ]
    .join("\u{1f}")
}

/// The hash a row must carry given its predecessor's hash.
pub fn expected_hash(prev_hash: &[u8], row: &AuditRow) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(canonical(row).as_bytes());
    h.finalize().to_vec()
}

/// Reads rows in id order, starting after `after_id`, at most `limit` of them.
pub async fn read_rows<'e>(
    db: impl PgExecutor<'e>,
    after_id: i64,
    limit: i64,
) -> Result<Vec<AuditRow>, DbError> {
    sqlx::query_as(
        "SELECT id, at, actor, action, target, org_id, detail::text AS detail, prev_hash, hash
         FROM audit_log WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after_id)
    .bind(limit)
    .fetch_all(db)
    .await
    .map_err(DbError::query("read audit log"))
}

/// What [`verify_chain`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainVerdict {
    /// Every row links to the one before it; this many rows were checked.
    Intact(i64),
    /// The chain breaks at this row, after `verified` good rows.
    Broken { link: BrokenLink, verified: i64 },
    /// Rows exist that this connection cannot read (row-level security), so the chain cannot be
    /// checked.
    Hidden(String),
}

/// Verifies the whole audit chain from row 1, reading it in pages of 5,000 rows.
pub async fn verify_chain(pool: &sqlx::PgPool) -> Result<ChainVerdict, DbError> {
    if let Some(why) = hidden_rows(pool).await? {
        return Ok(ChainVerdict::Hidden(why));
    }
    let mut verifier = ChainVerifier::new();
    let mut after = 0;
    loop {
        let rows = read_rows(pool, after, 5_000).await?;
        let Some(last) = rows.last() else {
            return Ok(ChainVerdict::Intact(verifier.verified()));
        };
        after = last.id;
        for row in &rows {
            if let Err(link) = verifier.feed(row) {
                let verified = verifier.verified();
                return Ok(ChainVerdict::Broken { link, verified });
            }
        }
    }
}

/// Walks a chain row by row (rows in id order, from id 1), so long logs can be read in pages.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    prev_hash: Vec<u8>,
    next_id: i64,
}

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub id: i64,
    pub reason: &'static str,
}

impl ChainVerifier {
    pub fn new() -> Self {
        Self {
            prev_hash: Vec::new(),
            next_id: 1,
        }
    }

    /// Checks the next row; the first error is where the chain breaks.
    pub fn feed(&mut self, row: &AuditRow) -> Result<(), BrokenLink> {
        let broken = |id, reason| Err(BrokenLink { id, reason });
        if row.id != self.next_id {
            return broken(self.next_id, "row is missing");
        }
        if row.prev_hash != self.prev_hash {
            return broken(row.id, "prev_hash does not match the previous row's hash");
        }
        if row.hash != expected_hash(&self.prev_hash, row) {
            return broken(row.id, "hash does not match the row's content");
        }
        self.prev_hash.clone_from(&row.hash);
        self.next_id += 1;
        Ok(())
    }

    /// Rows verified so far.
    pub fn verified(&self) -> i64 {
        self.next_id - 1
    }
}
