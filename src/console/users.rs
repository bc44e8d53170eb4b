//! `apitree users`: console users from the command line (the first super_admin, listing,
//! disabling). These run as the database owner; each write is audited with the OS user.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::authz::Role;
use crate::db::{audit, DbError};

/// One row of `apitree users list`.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct UserListing {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub org_id: Option<Uuid>,
    pub disabled: bool,
    pub invited: bool,
    pub created_at: DateTime<Utc>,
}

/// Why a user could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error("a user with email {0} exists already")]
    Exists(String),
    #[error("no org with id {0}; create it with `apitree orgs create`")]
    NoOrg(Uuid),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Creates a user with a password hash; returns the id.
pub async fn create(
    pool: &PgPool,
    email: &str,
    role: Role,
    org: Option<Uuid>,
    password_hash: &str,
    actor: &str,
) -> Result<Uuid, CreateError> {
    let email = email.trim();
    super::api::check_email(email).map_err(CreateError::Invalid)?;
    match (role.is_staff(), org) {
        (false, None) => {
            return Err(CreateError::Invalid(format!(
                "a {} belongs to an org: pass --org",
                role.as_str()
            )))
        }
        (true, Some(_)) => {
            return Err(CreateError::Invalid(format!(
                "a {} belongs to no org: leave --org out",
                role.as_str()
            )))
        }
        _ => {}
    }
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    if let Some(org) = org {
        let found: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orgs WHERE id = $1")
            .bind(org)
            .fetch_optional(&mut *tx)
            .await
            .map_err(DbError::query("find org"))?;
        if found.is_none() {
            return Err(CreateError::NoOrg(org));
        }
    }
    let id = Uuid::new_v4();
    let inserted = sqlx::query(
        "INSERT INTO users (id, org_id, email, role, password_hash) VALUES ($1, $2, $3, $4::user_role, $5)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(org)
    .bind(email)
    .bind(role.as_str())
    .bind(password_hash)
    .execute(&mut *tx)
    .await
    .map_err(DbError::query("create user"))?;
    if inserted.rows_affected() == 0 {
        return Err(CreateError::Exists(email.to_string()));
    }
    audit::append(
        &mut *tx,
        actor,
        "user.create",
        &format!("user:{id}"),
        org,
        &json!({"user_id": id, "role": role.as_str(), "via": "cli"}),
    )
    .await?;
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(id)
}

pub async fn list(pool: &PgPool) -> Result<Vec<UserListing>, DbError> {
    sqlx::query_as(
        "SELECT id, email, role::text AS role, org_id, disabled_at IS NOT NULL AS disabled,
                password_hash IS NULL AS invited, created_at
           FROM users ORDER BY email",
    )
    .fetch_all(pool)
    .await
    .map_err(DbError::query("list users"))
}

/// Disables the user with `email`; None when there is none.
pub async fn disable(pool: &PgPool, email: &str, actor: &str) -> Result<Option<Uuid>, DbError> {
    let mut tx = pool.begin().await.map_err(DbError::query("begin"))?;
    let row: Option<(Uuid, Option<Uuid>)> = sqlx::query_as(
        "UPDATE users SET disabled_at = coalesce(disabled_at, now()), updated_at = now()
          WHERE lower(email) = lower($1) RETURNING id, org_id",
    )
    .bind(email.trim())
    .fetch_optional(&mut *tx)
    .await
    .map_err(DbError::query("disable user"))?;
    let Some((id, org)) = row else {
        return Ok(None);
    };
    audit::append(
        &mut *tx,
        actor,
        "user.disable",
        &format!("user:{id}"),
        org,
        &json!({"user_id": id, "via": "cli"}),
    )
    .await?;
    tx.commit().await.map_err(DbError::query("commit"))?;
    Ok(Some(id))
}
