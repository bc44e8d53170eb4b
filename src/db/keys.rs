//! Orgs, API keys, registered APIs and upstream credentials: the admin writes (each audited in
//! the same transaction) and the reads a database-mode proxy serves from.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{audit, DbError};
use crate::crd::gateway::KeyScope;
use crate::entities::keys::{ApiKey, Pepper};
use crate::entities::{CredentialEntry, CredentialKind, KeyEntry, OrgEntry};

/// Creates an org; returns its id.
pub async fn create_org(pool: &PgPool, name: &str, actor: &str) -> Result<Uuid, DbError> {
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(DbError::query("create org"))?;
    audit::append(
        &mut *tx,
        actor,
        "org.create",
        &id.to_string(),
        Some(id),
        &json!({"name": name}),
    )
    .await?;
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(id)
}

/// A new key: shown once, stored hashed.
pub struct IssuedKey {
    pub id: Uuid,
    pub key: ApiKey,
}

/// Settings of a new key.
pub struct NewKey<'a> {
    pub org: Uuid,
    pub scope: KeyScope,
    pub tier: &'a str,
    pub daily_quota: Option<i64>,
    pub name: &'a str,
}

pub async fn insert_key(
    tx: &mut sqlx::PgConnection,
    pepper: &Pepper,
    new: &NewKey<'_>,
) -> Result<IssuedKey, DbError> {
    let key = ApiKey::generate(new.scope);
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scope, tier, daily_quota)
         VALUES ($1, $2, $3, $4, $5, $6::key_scope, $7, $8)",
    )
    .bind(id)
    .bind(new.org)
    .bind(new.name)
    .bind(key.prefix())
    .bind(pepper.hash(&key).0.to_vec())
    .bind(KeyScope::as_str(new.scope))
    .bind(new.tier)
    .bind(new.daily_quota)
    .execute(&mut *tx)
    .await
    .map_err(DbError::query("create API key"))?;
    Ok(IssuedKey { id, key })
}

/// Creates a key for an org.
pub async fn create_key(
    pool: &PgPool,
    pepper: &Pepper,
    new: NewKey<'_>,
    actor: &str,
) -> Result<IssuedKey, DbError> {
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    let issued = insert_key(&mut tx, pepper, &new).await?;
    audit::append(
        &mut *tx,
        actor,
        "key.create",
        issued.key.prefix(),
        Some(new.org),
        &json!({"key_id": issued.id, "scope": KeyScope::as_str(new.scope), "tier": new.tier, "daily_quota": new.daily_quota}),
    )
    .await?;
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(issued)
}

/// What a rotation did.
pub struct Rotation {
    pub new: IssuedKey,
    pub old_prefix: String,
    pub grace_until: DateTime<Utc>,
}

/// Issues a replacement for key `id`; the old key stays valid until `now + grace`.
pub async fn rotate_key(
    pool: &PgPool,
    pepper: &Pepper,
    id: Uuid,
    grace: chrono::Duration,
    now: DateTime<Utc>,
    actor: &str,
) -> Result<Option<Rotation>, DbError> {
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    let rotation = rotate_key_in(&mut tx, pepper, id, grace, now, actor).await?;
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(rotation)
}

/// [`rotate_key`] inside the caller's transaction: nothing holds until it commits (the caller
/// can first hand the new key over, and roll back when that fails).
pub async fn rotate_key_in(
    tx: &mut sqlx::PgConnection,
    pepper: &Pepper,
    id: Uuid,
    grace: chrono::Duration,
    now: DateTime<Utc>,
    actor: &str,
) -> Result<Option<Rotation>, DbError> {
    let row: Option<(Uuid, String, String, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT org_id, scope::text, tier, prefix, daily_quota, name FROM api_keys
         WHERE id = $1 AND revoked_at IS NULL AND replaced_by IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(DbError::query("read API key"))?;
    let Some((org, scope, tier, old_prefix, daily_quota, name)) = row else {
        return Ok(None);
    };
    let scope = KeyScope::from_stored(&scope);
    let new = insert_key(
        &mut *tx,
        pepper,
        &NewKey {
            org,
            scope,
            tier: &tier,
            daily_quota,
            name: &name,
        },
    )
    .await?;
    let grace_until = now + grace;
    sqlx::query("UPDATE api_keys SET grace_until = $2, replaced_by = $3 WHERE id = $1")
        .bind(id)
        .bind(grace_until)
        .bind(new.id)
        .execute(&mut *tx)
        .await
        .map_err(DbError::query("mark rotated key"))?;
    audit::append(
        &mut *tx,
        actor,
        "key.rotate",
        &old_prefix,
        Some(org),
        &json!({"old_key_id": id, "new_key_id": new.id, "new_prefix": new.key.prefix(), "grace_until": grace_until}),
    )
    .await?;
    Ok(Some(Rotation {
        new,
        old_prefix,
        grace_until,
    }))
}

/// Revokes key `id` now; returns its prefix, or None when there is no such active key.
pub async fn revoke_key(pool: &PgPool, id: Uuid, actor: &str) -> Result<Option<String>, DbError> {
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    let row: Option<(String, Uuid)> =
        sqlx::query_as("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING prefix, org_id")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(DbError::query("revoke API key"))?;
    let Some((prefix, org)) = row else {
        return Ok(None);
    };
    audit::append(
        &mut *tx,
        actor,
        "key.revoke",
        &prefix,
        Some(org),
        &json!({"key_id": id}),
    )
    .await?;
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(Some(prefix))
}

/// Revokes every rotated key whose grace period ended by `now`, auditing each as
/// `key.grace_expired`; returns their prefixes. Safe to run concurrently: a key is revoked (and
/// audited) once.
pub async fn sweep_grace(
    pool: &PgPool,
    now: DateTime<Utc>,
    actor: &str,
) -> Result<Vec<String>, DbError> {
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    let rows: Vec<(Uuid, String, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE api_keys SET revoked_at = $1
          WHERE grace_until IS NOT NULL AND grace_until <= $1 AND revoked_at IS NULL
         RETURNING id, prefix, org_id, grace_until",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .map_err(DbError::query("revoke keys whose grace ended"))?;
    for (id, prefix, org, grace_until) in &rows {
        audit::append(
            &mut *tx,
            actor,
            "key.grace_expired",
            prefix,
            Some(*org),
            &json!({"key_id": id, "grace_until": grace_until}),
        )
        .await?;
    }
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(rows.into_iter().map(|r| r.1).collect())
}

/// One row of `apitree keys list`.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct KeyListing {
    pub id: Uuid,
    pub org_id: Uuid,
    pub prefix: String,
    pub scope: String,
    pub tier: String,
    pub daily_quota: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Calls admitted today (UTC), as the gateways last reported (every 10 s).
    pub today: i64,
}

/// Where a listed key stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    /// Rotated; the old key works until this instant.
    InGrace(DateTime<Utc>),
    /// Rotated and its grace period is over.
    GraceOver,
    Expired,
    Revoked,
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Active => f.write_str("active"),
            Self::InGrace(until) => write!(
                f,
                "rotated, valid until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            Self::GraceOver => f.write_str("rotated (grace over)"),
            Self::Expired => f.write_str("expired"),
            Self::Revoked => f.write_str("revoked"),
        }
    }
}

impl KeyListing {
    /// The key's state at `now`: a revocation wins, then a rotation's grace, then expiry.
    pub fn state(&self, now: DateTime<Utc>) -> KeyState {
        match (self.revoked_at, self.grace_until, self.expires_at) {
            (Some(_), _, _) => KeyState::Revoked,
            (_, Some(g), _) if g <= now => KeyState::GraceOver,
            (_, Some(g), _) => KeyState::InGrace(g),
            (_, _, Some(e)) if e <= now => KeyState::Expired,
            _ => KeyState::Active,
        }
    }
}

pub async fn list_keys(pool: &PgPool, org: Option<Uuid>) -> Result<Vec<KeyListing>, DbError> {
    sqlx::query_as(
        "SELECT k.id, k.org_id, k.prefix, k.scope::text AS scope, k.tier, k.daily_quota, k.created_at,
                k.expires_at, k.grace_until, k.revoked_at,
                (SELECT coalesce(sum(u.requests), 0)::bigint FROM usage_counters u
                  WHERE u.api_key_id = k.id AND u.window_start >= date_trunc('day', now(), 'UTC')) AS today
           FROM api_keys k WHERE $1::uuid IS NULL OR k.org_id = $1 ORDER BY k.created_at, k.prefix",
    )
    .bind(org)
    .fetch_all(pool)
    .await
    .map_err(DbError::query("list API keys"))
}

/// Everything a proxy serves from the database, as config entries.
pub struct DbEntities {
    pub orgs: Vec<OrgEntry>,
    pub keys: Vec<KeyEntry>,
    pub routes: Vec<crate::crd::gateway::RouteSpec>,
    pub credentials: Vec<CredentialEntry>,
}

/// A key's end (seconds since the epoch) as the gateway reads it: `infinity` is no end, any
/// time before 1970 (`-infinity` too) has passed, any after 9999 is 9999.
fn until(epoch_s: f64) -> Option<String> {
    if epoch_s == f64::INFINITY {
        return None;
    }
    let ms = (epoch_s * 1000.0).clamp(0.0, 253_402_300_799_999.0) as i64;
    DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339())
}

/// Reads orgs, keys, APIs and credentials in one snapshot (one repeatable-read transaction).
/// Columns are read in forms every value the schema allows decodes from (times as seconds,
/// scopes as flags), so one odd row cannot fail the snapshot.
pub async fn load_entities(pool: &PgPool) -> Result<DbEntities, DbError> {
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(DbError::query("begin snapshot"))?;
    let orgs: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, name FROM orgs ORDER BY id")
        .fetch_all(&mut *tx)
        .await
        .map_err(DbError::query("load orgs"))?;
    type KeyRow = (
        Uuid,
        Uuid,
        String,
        Vec<u8>,
        String,
        String,
        Option<i64>,
        Option<f64>,
        Option<f64>,
        bool,
    );
    // Times as seconds since the epoch: a column holds what no date type can ('infinity',
    // year 200000), and one such row must not fail the whole snapshot.
    let keys: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, org_id, prefix, key_hash, scope::text, tier, daily_quota,
                extract(epoch FROM expires_at)::float8, extract(epoch FROM grace_until)::float8,
                revoked_at IS NOT NULL
         FROM api_keys ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(DbError::query("load API keys"))?;
    type ApiRow = (String, String, String, bool, bool, String, i32, bool, bool);
    // Which credential a call carries is decided by the API and the calling key's org, never
    // by a credential's name: the API's system credential is its own seller's (a system row of
    // another org is ignored), and each org's BYOK credential wins for that org's keys. So
    // every credential of an API is loaded under one name, the API's, and the route refers to
    // it when there is any.
    const USABLE: &str = "(c.kind = 'byok' OR c.org_id = a.org_id)";
    let apis: Vec<ApiRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT a.name, a.path_prefix, a.upstream_url,
                coalesce('live' = ANY(a.scopes), false), coalesce('test' = ANY(a.scopes), false),
                a.pii_mode, a.timeout_ms, a.log_bodies,
                EXISTS (SELECT 1 FROM upstream_credentials c WHERE c.api_id = a.id AND {USABLE})
         FROM apis a ORDER BY a.name"
    )))
    .fetch_all(&mut *tx)
    .await
    .map_err(DbError::query("load APIs"))?;
    type CredRow = (
        Uuid,
        String,
        String,
        i32,
        Vec<u8>,
        Vec<u8>,
        String,
        String,
        Option<String>,
    );
    let creds: Vec<CredRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.org_id, a.name, c.kind::text, c.key_version, c.nonce, c.ciphertext, c.header, c.value_prefix,
                c.bound_upstream
         FROM upstream_credentials c JOIN apis a ON a.id = c.api_id WHERE {USABLE} ORDER BY c.id"
    )))
    .fetch_all(&mut *tx)
    .await
    .map_err(DbError::query("load upstream credentials"))?;
    tx.commit().await.map_err(DbError::query("end snapshot"))?;

    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let scope = KeyScope::from_stored;
    Ok(DbEntities {
        orgs: orgs
            .into_iter()
            .map(|(id, name)| OrgEntry {
                id: id.to_string(),
                name,
            })
            .collect(),
        keys: keys
            .into_iter()
            .map(
                |(id, org, prefix, hash, sc, tier, quota, expires, grace, revoked)| KeyEntry {
                    id: Some(id.to_string()),
                    prefix,
                    hash: hex::encode(hash),
                    org: org.to_string(),
                    scope: scope(&sc),
                    tier: Some(tier),
                    daily_quota: quota.map(|q| q as u64),
                    expires_at: expires.and_then(until),
                    grace_until: grace.and_then(until),
                    revoked,
                },
            )
            .collect(),
        routes: apis
            .into_iter()
            .map(
                |(name, prefix, upstream, live, test, pii, timeout_ms, log_bodies, credential)| {
                    crate::crd::gateway::RouteSpec {
                        credential: credential.then(|| name.clone()),
                        name,
                        path_prefix: prefix,
                        upstream,
                        timeout: Some(crate::crd::KubeDuration::from_millis(
                            timeout_ms.max(1) as u64
                        )),
                        scopes: [(live, KeyScope::Live), (test, KeyScope::Test)]
                            .into_iter()
                            .filter_map(|(on, s)| on.then_some(s))
                            .collect(),
                        tier: None,
                        pii: match pii.as_str() {
                            "mask" => crate::crd::gateway::PiiMode::Mask,
                            "flag" => crate::crd::gateway::PiiMode::Flag,
                            _ => crate::crd::gateway::PiiMode::Off,
                        },
                        breaker: Default::default(),
                        log_bodies,
                        // Not columns of `apis` yet: every method but TRACE and CONNECT, and
                        // no encoded slashes.
                        methods: Vec::new(),
                        allow_encoded_slashes: false,
                        probe: None,
                    }
                },
            )
            .collect(),
        credentials: creds
            .into_iter()
            .map(
                |(org, api, kind, version, nonce, ciphertext, header, value_prefix, bound)| {
                    CredentialEntry {
                        name: api.clone(),
                        org: org.to_string(),
                        api,
                        kind: if kind == "byok" {
                            CredentialKind::Byok
                        } else {
                            CredentialKind::System
                        },
                        key_version: version as u32,
                        nonce: b64.encode(nonce),
                        ciphertext: b64.encode(ciphertext),
                        header,
                        value_prefix,
                        bound_upstream: bound,
                    }
                },
            )
            .collect(),
    })
}
