//! Master-key rotation for the upstream credentials in the database: every credential sealed
//! under an older key version is decrypted and sealed again under the current one, in batches.
//! Each batch commits on its own, so an interrupted run resumes where it stopped; rows are taken
//! with `FOR UPDATE SKIP LOCKED`, so concurrent runs share the work and never rewrap a row twice.

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{audit, DbError};
use crate::entities::vault::{MasterKeys, Sealed, VaultError};

/// Where a re-encryption stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// The version credentials are being moved to (the newest key).
    pub target_version: u32,
    /// Rewrapped by this call.
    pub rewrapped: u64,
    /// Credentials at the target version.
    pub done: u64,
    pub total: u64,
    /// Older versions still used by some credential (they cannot be retired yet).
    pub versions_in_use: Vec<u32>,
}

/// Why a batch failed; nothing of the batch was written.
#[derive(Debug, thiserror::Error)]
pub enum ReencryptError {
    #[error("{0}")]
    Database(#[from] DbError),
    #[error("credentials under key version(s) {0:?} are locked by another run or were added meanwhile; run again")]
    Unfinished(Vec<u32>),
    #[error("{source}; add key version {version} to the master keys and run again")]
    Decrypt {
        version: u32,
        #[source]
        source: VaultError,
    },
}

/// Rewraps every credential under an older key version, batch by batch, reporting each batch
/// to `progress`. Ends when every credential is at the current version; an error when a batch
/// rewraps nothing while older versions remain (rows locked by another run, or added meanwhile).
pub async fn reencrypt_all(
    pool: &PgPool,
    keys: &MasterKeys,
    batch: i64,
    actor: &str,
    mut progress: impl FnMut(&Progress),
) -> Result<Progress, ReencryptError> {
    loop {
        let p = reencrypt_batch(pool, keys, batch.max(1), actor).await?;
        progress(&p);
        if p.versions_in_use.is_empty() {
            return Ok(p);
        }
        if p.rewrapped == 0 {
            return Err(ReencryptError::Unfinished(p.versions_in_use));
        }
    }
}

type Row = (Uuid, String, Uuid, String, i32, Vec<u8>, Vec<u8>);

/// Rewraps up to `batch` credentials sealed under older versions and reports the progress.
pub async fn reencrypt_batch(
    pool: &PgPool,
    keys: &MasterKeys,
    batch: i64,
    actor: &str,
) -> Result<Progress, ReencryptError> {
    let target = keys.current_version();
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT c.id, c.name, c.org_id, a.name, c.key_version, c.nonce, c.ciphertext
           FROM upstream_credentials c JOIN apis a ON a.id = c.api_id
          WHERE c.key_version <> $1
          ORDER BY c.id
          LIMIT $2
          FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(target as i32)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await
    .map_err(DbError::query("read credentials to re-encrypt"))?;
    for (id, name, org, api, version, nonce, ciphertext) in &rows {
        let sealed = Sealed {
            key_version: *version as u32,
            nonce: nonce.clone(),
            ciphertext: ciphertext.clone(),
        };
        let org = org.to_string();
        let plain =
            keys.decrypt(name, &org, api, &sealed)
                .map_err(|source| ReencryptError::Decrypt {
                    version: *version as u32,
                    source,
                })?;
        let fresh = keys.encrypt(&org, api, plain.expose());
        sqlx::query(
            "UPDATE upstream_credentials
                SET key_version = $2, nonce = $3, ciphertext = $4, updated_at = now()
              WHERE id = $1",
        )
        .bind(id)
        .bind(fresh.key_version as i32)
        .bind(&fresh.nonce)
        .bind(&fresh.ciphertext)
        .execute(&mut *tx)
        .await
        .map_err(DbError::query("write a re-encrypted credential"))?;
    }
    if !rows.is_empty() {
        audit::append(
            &mut *tx,
            actor,
            "master_key.reencrypt",
            &format!("upstream_credentials→v{target}"),
            None,
            &serde_json::json!({"credentials": rows.iter().map(|r| r.0).collect::<Vec<_>>(), "target_version": target}),
        )
        .await?;
    }
    tx.commit().await.map_err(DbError::query("commit"))?;
    let (done, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE key_version = $1), count(*) FROM upstream_credentials",
    )
    .bind(target as i32)
    .fetch_one(pool)
    .await
    .map_err(DbError::query("count credentials"))?;
    let in_use: Vec<i32> = sqlx::query_scalar(
        "SELECT DISTINCT key_version FROM upstream_credentials WHERE key_version <> $1 ORDER BY 1",
    )
    .bind(target as i32)
    .fetch_all(pool)
    .await
    .map_err(DbError::query("list key versions in use"))?;
    Ok(Progress {
        target_version: target,
        rewrapped: rows.len() as u64,
        done: done as u64,
        total: total as u64,
        versions_in_use: in_use.into_iter().map(|v| v as u32).collect(),
    })
}
