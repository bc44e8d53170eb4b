//! The console's REST API under `/api/v1`. Each handler names its [`Action`]; [`Request::authorize`]
//! verifies the session, reads the user's current role from the database, asks
//! [`authz::decide`] and only then opens the org to the transaction (`apitree.org_id`), which
//! runs as `apitree_console`, a role row-level security applies to.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::authz::{self, Action, Decision, Principal, Role, UserChange};
use super::jwt::{Claims, AUDIENCE, ISSUER};
use super::{password, Console};
use crate::crd::gateway::KeyScope;
use crate::db::{audit, dsar, keys as dbkeys};

/// A refusal or failure, answered as `{"error", "code", "request_id"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(super) fn bad(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request", message)
    }

    fn not_found(what: &str) -> Self {
        ApiError::new(404, "not_found", format!("no such {what}"))
    }

    fn db(e: sqlx::Error) -> Self {
        if let Some(d) = e.as_database_error() {
            match d.code().as_deref() {
                Some("23505") => {
                    // One credential of each kind per org and API: two first writes at once.
                    let message = match d.constraint() {
                        Some("upstream_credentials_one_byok_idx" | "upstream_credentials_one_system_idx") => {
                            "another request wrote this org's credential for this API at the same moment; write it again"
                        }
                        _ => "a resource with that name already exists",
                    };
                    return ApiError::new(409, "conflict", message);
                }
                Some("23514") | Some("22P02") | Some("23502") => {
                    return ApiError::bad(format!(
                        "the database refused a value: {}",
                        d.constraint().unwrap_or("a check")
                    ))
                }
                Some("42501") => {
                    // Row-level security or a missing privilege: the database's own refusal
                    // of something the application check let through. Worth a look.
                    tracing::warn!(error = %e, "the database refused a console query");
                    return ApiError::new(404, "not_found", "no such resource");
                }
                _ => {}
            }
        }
        tracing::warn!(error = %e, "console query failed");
        ApiError::new(
            503,
            "database_unavailable",
            "the console could not reach its database; retry shortly",
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::db(e)
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        tracing::warn!(error = %e, "console write failed");
        ApiError::new(
            503,
            "database_unavailable",
            "the console could not complete the write; retry shortly",
        )
    }
}

pub type Reply = Result<(u16, Value), ApiError>;

/// One API request: method, path segments after `/api/v1/`, query, body, caller.
pub struct Request<'a> {
    pub console: &'a Arc<Console>,
    pub method: &'a http::Method,
    pub segments: Vec<&'a str>,
    pub query: Vec<(String, String)>,
    pub body: &'a [u8],
    pub bearer: Option<&'a str>,
    pub peer: IpAddr,
}

/// An authorized request: the transaction (as `apitree_console`, org opened) and the caller.
pub struct Authorized {
    pub tx: Transaction<'static, Postgres>,
    pub who: Principal,
}

impl Authorized {
    fn actor(&self) -> String {
        format!("user:{}", self.who.id)
    }

    /// Who acted, for an audit row's detail: id and role (the email is joined at read time,
    /// so erasing a person does not touch the hash chain).
    fn actor_detail(&self) -> Value {
        json!({"id": self.who.id, "role": self.who.role.as_str()})
    }

    /// Before committing something that will be the caller's (a key, a credential): the caller
    /// is still enabled, checked under a share lock on their row held to commit. An erasure
    /// (which locks the row for update) that started first is waited for and then refuses this
    /// write; one that starts later waits for it and takes what it wrote. Taken only here, at
    /// the end, so requests never hold it while they update other users.
    async fn confirm_still_enabled(&mut self) -> Result<(), ApiError> {
        let disabled: Option<bool> =
            sqlx::query_scalar("SELECT disabled FROM console_principal_locked($1)")
                .bind(self.who.id)
                .fetch_optional(&mut *self.tx)
                .await?;
        if disabled == Some(false) {
            Ok(())
        } else {
            Err(session_revoked())
        }
    }

    async fn audit(
        &mut self,
        action: &str,
        target: &str,
        org: Option<Uuid>,
        mut detail: Value,
    ) -> Result<(), ApiError> {
        detail["actor"] = self.actor_detail();
        let actor = self.actor();
        audit::append(&mut *self.tx, &actor, action, target, org, &detail).await?;
        Ok(())
    }
}

/// Opens a transaction as the console's database role, with no org and no staff flag.
async fn begin(console: &Console) -> Result<Transaction<'static, Postgres>, ApiError> {
    let mut tx = console.pool.begin().await?;
    // The pool's connections refuse to be filtered (row_security off, so the owner's queries
    // fail loudly instead of silently missing rows); the console wants the filter.
    sqlx::raw_sql("SET LOCAL ROLE apitree_console; SET LOCAL row_security = on")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Opens `org` (or, for staff, every org) to the transaction.
async fn open(
    tx: &mut Transaction<'static, Postgres>,
    org: Option<Uuid>,
    staff: bool,
) -> Result<(), ApiError> {
    sqlx::query(
        "SELECT set_config('apitree.org_id', $1, true), set_config('apitree.staff', $2, true)",
    )
    .bind(org.map(|o| o.to_string()).unwrap_or_default())
    .bind(if staff { "on" } else { "off" })
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Request<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ApiError> {
        let bad = |e: serde_json::Error| {
            ApiError::bad(format!("the body is not the JSON this endpoint takes: {e}"))
        };
        let value: Value = serde_json::from_slice(self.body).map_err(bad)?;
        // No text the console stores or looks up may hold NUL (PostgreSQL cannot): refused
        // here, for every field of every endpoint, instead of failing in the database.
        fn nul(v: &Value) -> bool {
            match v {
                Value::String(s) => s.contains('\0'),
                Value::Array(a) => a.iter().any(nul),
                Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || nul(v)),
                _ => false,
            }
        }
        if nul(&value) {
            return Err(ApiError::bad(
                "a text field holds a NUL character (\\u0000); remove it",
            ));
        }
        serde_json::from_value(value).map_err(bad)
    }

    /// The session token's claims when it verifies (signature, expiry, issuer, audience). Not
    /// an authorization: the user is read from the database by [`Request::authorize`].
    pub fn verify_session(&self) -> Result<crate::console::jwt::Claims, ApiError> {
        let c = self.console;
        let Some(token) = self.bearer else {
            c.metrics.auth_failure("no_token");
            return Err(ApiError::new(
                401,
                "unauthenticated",
                "sign in first: POST /api/v1/session, then send Authorization: Bearer <token>",
            ));
        };
        c.keyring
            .verify(token, Utc::now().timestamp())
            .map_err(|e| {
                c.metrics.auth_failure(e.code());
                ApiError::new(401, e.code(), e.to_string())
            })
    }

    /// Verifies the session and decides `action` in `org`.
    pub async fn authorize(
        &self,
        action: Action,
        org: Option<Uuid>,
    ) -> Result<Authorized, ApiError> {
        self.authorize_with(action, org, |p| authz::decide(p, action, org))
            .await
    }

    async fn authorize_with(
        &self,
        action: Action,
        org: Option<Uuid>,
        rule: impl FnOnce(&Principal) -> Decision,
    ) -> Result<Authorized, ApiError> {
        let c = self.console;
        let claims = self.verify_session()?;
        let mut tx = begin(c).await?;
        let row: Option<(String, Option<Uuid>, String, bool)> =
            sqlx::query_as("SELECT email, org_id, role::text, disabled FROM console_principal($1)")
                .bind(claims.sub)
                .fetch_optional(&mut *tx)
                .await?;
        let who = match row {
            Some((email, org, role, false)) => Principal {
                id: claims.sub,
                email,
                role: Role::parse(&role).ok_or_else(|| ApiError::bad("unknown role"))?,
                org,
            },
            _ => {
                c.metrics.auth_failure("session_revoked");
                return Err(session_revoked());
            }
        };
        match rule(&who) {
            Decision::Allow => {}
            Decision::NotFound => {
                c.metrics.refused(action.name(), "not_found");
                return Err(ApiError::not_found("resource"));
            }
            Decision::Forbidden(why) => {
                c.metrics.refused(action.name(), "forbidden");
                return Err(ApiError::new(403, "forbidden", why));
            }
        }
        // The database sees the org of the signed-in user, never one from the path: were the
        // check above wrong, row-level security still keeps a tenant in their own org. Staff
        // (no org of their own) work in the org they asked for.
        let db_org = if who.role.is_staff() { org } else { who.org };
        open(&mut tx, db_org, who.role.is_staff()).await?;
        if let Some(org) = org {
            // Staff reach any org, but only one that exists.
            let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orgs WHERE id = $1")
                .bind(org)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(ApiError::not_found("org"));
            }
        }
        Ok(Authorized { tx, who })
    }
}

/// 401 for a session whose user is disabled, erased or gone.
fn session_revoked() -> ApiError {
    ApiError::new(
        401,
        "session_revoked",
        "this account is disabled or gone; its sessions end at once",
    )
}

fn uuid(s: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::not_found(what))
}

/// Routes `/api/v1/...`.
pub async fn dispatch(r: Request<'_>) -> Reply {
    use http::Method as M;
    let seg = r.segments.clone();
    match (r.method, seg.as_slice()) {
        (&M::POST, ["session"]) => sign_in(&r).await,
        (&M::POST, ["invitations", "accept"]) => accept_invitation(&r).await,
        (&M::GET, ["me"]) => me(&r).await,
        // Public: the page shows it before anyone signs in.
        (&M::GET, ["contacts"]) => Ok((200, json!(r.console.contacts))),
        (&M::GET, ["orgs", org, "keys"]) => list_keys(&r, uuid(org, "org")?).await,
        (&M::POST, ["orgs", org, "keys"]) => create_key(&r, uuid(org, "org")?).await,
        (&M::POST, ["orgs", org, "keys", id, "rotate"]) => {
            rotate_key(&r, uuid(org, "org")?, uuid(id, "key")?).await
        }
        (&M::POST, ["orgs", org, "keys", id, "revoke"]) => {
            revoke_key(&r, uuid(org, "org")?, uuid(id, "key")?).await
        }
        (&M::GET, ["orgs", org, "apis"]) => list_apis(&r, uuid(org, "org")?).await,
        (&M::POST, ["orgs", org, "apis"]) => write_api(&r, uuid(org, "org")?, None).await,
        (&M::PUT, ["orgs", org, "apis", id]) => {
            write_api(&r, uuid(org, "org")?, Some(uuid(id, "API")?)).await
        }
        (&M::GET, ["orgs", org, "credentials"]) => list_credentials(&r, uuid(org, "org")?).await,
        (&M::POST, ["orgs", org, "credentials"]) => write_credential(&r, uuid(org, "org")?).await,
        (&M::GET, ["orgs", org, "credentials", "origin"]) => {
            credential_origin(&r, uuid(org, "org")?).await
        }
        (&M::GET, ["orgs", org, "usage"]) => usage(&r, uuid(org, "org")?).await,
        (&M::GET, ["orgs", org, "credits"]) => credits(&r, uuid(org, "org")?).await,
        (&M::POST, ["orgs", org, "credits"]) => adjust_credits(&r, uuid(org, "org")?).await,
        (&M::GET, ["orgs"]) => list_orgs(&r).await,
        (&M::GET, ["users"]) => list_users(&r).await,
        (&M::POST, ["users"]) => invite_user(&r).await,
        (&M::PUT, ["users", id, "role"]) => set_role(&r, uuid(id, "user")?).await,
        (&M::POST, ["users", id, "disable"]) => disable_user(&r, uuid(id, "user")?).await,
        (&M::GET, ["users", id, "export"]) => export_user(&r, uuid(id, "user")?).await,
        (&M::POST, ["users", id, "erase"]) => erase_user(&r, uuid(id, "user")?).await,
        (&M::GET, ["dsar", "requests"]) => dsar_requests(&r).await,
        (&M::POST, ["dsar", "requests"]) => receive_request(&r).await,
        (&M::GET, ["audit"]) => read_audit(&r).await,
        (_, path) if known_path(path) => Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{} is not served on this path", r.method),
        )),
        _ => Err(ApiError::new(
            404,
            "no_route",
            "no such endpoint; the API is listed in docs/console.md",
        )),
    }
}

fn known_path(path: &[&str]) -> bool {
    matches!(
        path,
        ["session"]
            | ["invitations", "accept"]
            | ["me"]
            | ["contacts"]
            | ["orgs"]
            | [
                "orgs",
                _,
                "keys" | "apis" | "credentials" | "usage" | "credits"
            ]
            | ["orgs", _, "keys", _, "rotate" | "revoke"]
            | ["orgs", _, "credentials", "origin"]
            | ["orgs", _, "apis", _]
            | ["users"]
            | ["users", _, "role" | "disable" | "export" | "erase"]
            | ["dsar", "requests"]
            | ["audit"]
    )
}

// ---- sessions ----

/// 429 with Retry-After for a throttled sign-in or invitation.
fn throttled(t: crate::console::throttle::Throttled, what: &str) -> ApiError {
    let secs = t.retry_after.as_secs().max(1);
    let mut e = ApiError::new(
        429,
        "too_many_attempts",
        format!("too many {what} from this {}; retry in {secs} s", t.by),
    );
    e.retry_after = Some(secs);
    e
}

/// 503 with Retry-After when too many passwords are being hashed at once.
fn busy() -> ApiError {
    let mut e = ApiError::new(
        503,
        "busy",
        "the console is checking too many passwords at once; retry in a second",
    );
    e.retry_after = Some(1);
    e
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    email: String,
    password: String,
}

async fn sign_in(r: &Request<'_>) -> Reply {
    let c = r.console;
    let body: SignIn = r.json()?;
    if body.email.len() > 254 || body.password.len() > password::MAX_BYTES {
        return Err(ApiError::bad("the email or password is too long"));
    }
    let now = Instant::now();
    if let Err(t) = c.throttle.begin(Some(&body.email), r.peer, now) {
        c.metrics.login("throttled");
        c.metrics.auth_failure("login_throttled");
        return Err(throttled(t, "failed sign-ins"));
    }
    type LoginRow = (Uuid, Option<Uuid>, String, Option<String>, bool);
    // Every account's email is visible ASCII (`check_email`): any other sign-in is looked up
    // nowhere (it still spends a hash and a count), so no database case-folding can make it
    // another's and no byte the database refuses turns a failed sign-in into an error.
    let row: Option<LoginRow> = if body.email.trim().bytes().all(|b| b.is_ascii_graphic()) {
        let mut tx = begin(c).await?;
        let row = sqlx::query_as(
            "SELECT id, org_id, role::text, password_hash, disabled FROM console_login($1)",
        )
        .bind(body.email.trim())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row
    } else {
        None
    };
    let stored = row.as_ref().and_then(|r| r.3.clone());
    // Argon2 is slow on purpose: off the async workers, a bounded number at once.
    let (password, email) = (body.password, body.email.clone());
    let ok = c
        .hashing
        .run(move || password::verify(&password, stored.as_deref()))
        .await
        .map_err(|_| {
            c.throttle.not_tried(Some(&email), r.peer, now);
            busy()
        })?;
    let user = match row {
        Some((id, _org, role, Some(_), false)) if ok => (id, Role::parse(&role)),
        _ => {
            c.metrics.login("invalid");
            c.metrics.auth_failure("login_invalid");
            tracing::info!(peer = %r.peer, "console sign-in refused");
            return Err(ApiError::new(
                401,
                "invalid_credentials",
                "the email or password is wrong, or the account is disabled",
            ));
        }
    };
    let (id, Some(role)) = user else {
        return Err(ApiError::bad("unknown role"));
    };
    c.throttle.succeeded(Some(&body.email), r.peer, now);
    c.metrics.login("ok");
    let iat = Utc::now().timestamp();
    let exp = iat + c.session_ttl.as_secs() as i64;
    let token = c.keyring.sign(&Claims {
        sub: id,
        role,
        iat,
        exp,
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
    });
    Ok((
        200,
        json!({
            "token": token,
            "expires_at": DateTime::<Utc>::from_timestamp(exp, 0).map(|t| t.to_rfc3339()),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Accept {
    token: String,
    password: String,
}

async fn accept_invitation(r: &Request<'_>) -> Reply {
    let c = r.console;
    let body: Accept = r.json()?;
    password::check_new(&body.password).map_err(ApiError::bad)?;
    // Guessing tokens is throttled per address like guessing passwords: each try costs a hash.
    let now = Instant::now();
    if let Err(t) = c.throttle.begin(None, r.peer, now) {
        c.metrics.auth_failure("invite_throttled");
        return Err(throttled(t, "failed attempts"));
    }
    let hash = Sha256::digest(body.token.trim().as_bytes()).to_vec();
    let password = body.password;
    let phc = c
        .hashing
        .run(move || password::hash(&password))
        .await
        .map_err(|_| {
            c.throttle.not_tried(None, r.peer, now);
            busy()
        })?
        .map_err(ApiError::bad)?;
    let mut tx = begin(r.console).await?;
    let row: Option<(Uuid, Option<Uuid>)> =
        sqlx::query_as("SELECT id, org_id FROM console_accept_invite($1, $2)")
            .bind(&hash)
            .bind(&phc)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((id, org)) = row else {
        r.console.metrics.auth_failure("invite_invalid");
        return Err(ApiError::new(
            404,
            "invitation_invalid",
            "this invitation is unknown, used or expired; ask an admin for a new one",
        ));
    };
    c.throttle.succeeded(None, r.peer, now);
    // Staff belong to no org: their activation row is written through the staff policy.
    open(&mut tx, org, org.is_none()).await?;
    audit::append(
        &mut *tx,
        &format!("user:{id}"),
        "user.activate",
        &format!("user:{id}"),
        org,
        &json!({"actor": {"id": id}}),
    )
    .await?;
    tx.commit().await?;
    Ok((200, json!({"id": id, "activated": true})))
}

async fn me(r: &Request<'_>) -> Reply {
    // Everyone signed in may ask who they are: the rule is "any verified, enabled user".
    let a = r
        .authorize_with(Action::ListKeys, None, |_| Decision::Allow)
        .await?;
    let actions: Vec<Value> = Action::ALL
        .iter()
        .filter(|act| authz::reach(a.who.role, **act) != authz::Reach::None)
        .map(|act| json!(act.name()))
        .collect();
    Ok((200, json!({"user": a.who, "actions": actions})))
}

// ---- keys ----

#[derive(sqlx::FromRow, serde::Serialize)]
struct KeyRow {
    id: Uuid,
    name: String,
    prefix: String,
    scope: String,
    tier: String,
    daily_quota: Option<i64>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    grace_until: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    /// Calls admitted today (UTC), as the gateways last reported (every 10 s).
    today: i64,
    /// What is left of `daily_quota` today (None without a quota).
    quota_left: Option<i64>,
}

async fn list_keys(r: &Request<'_>, org: Uuid) -> Reply {
    let mut a = r.authorize(Action::ListKeys, Some(org)).await?;
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT k.id, k.name, k.prefix, k.scope::text AS scope, k.tier, k.daily_quota, k.created_at,
                k.expires_at, k.grace_until, k.revoked_at, k.last_used_at, t.today,
                greatest(k.daily_quota - t.today, 0) AS quota_left
           FROM api_keys k
           CROSS JOIN LATERAL (
                SELECT coalesce(sum(u.requests), 0)::bigint AS today FROM usage_counters u
                 WHERE u.api_key_id = k.id AND u.window_start >= date_trunc('day', now(), 'UTC')) t
          WHERE k.org_id = $1 ORDER BY k.created_at, k.prefix",
    )
    .bind(org)
    .fetch_all(&mut *a.tx)
    .await?;
    Ok((200, json!({"keys": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    scope: KeyScope,
    #[serde(default)]
    name: String,
    #[serde(default = "default_tier")]
    tier: String,
    daily_quota: Option<i64>,
}

fn default_tier() -> String {
    "default".into()
}

fn pepper(r: &Request<'_>) -> Result<Arc<crate::entities::keys::Pepper>, ApiError> {
    r.console.pepper.clone().ok_or_else(|| {
        ApiError::new(
            503,
            "no_key_pepper",
            "this console has no key pepper, so it cannot issue keys; set APITREE_KEY_PEPPER",
        )
    })
}

fn short_text(value: &str, what: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(ApiError::bad(format!(
            "{what} must be at most {max} characters without control characters"
        )));
    }
    Ok(())
}

async fn create_key(r: &Request<'_>, org: Uuid) -> Reply {
    let body: NewKeyBody = r.json()?;
    short_text(&body.name, "name", 100)?;
    short_text(&body.tier, "tier", 63)?;
    if body.daily_quota.is_some_and(|q| q <= 0) {
        return Err(ApiError::bad(
            "daily_quota must be a positive number of requests",
        ));
    }
    let pepper = pepper(r)?;
    let mut a = r.authorize(Action::CreateKey, Some(org)).await?;
    let new = dbkeys::NewKey {
        org,
        scope: body.scope,
        tier: &body.tier,
        daily_quota: body.daily_quota,
        name: &body.name,
    };
    let issued = dbkeys::insert_key(&mut a.tx, &pepper, &new).await?;
    let scope = serde_json::to_value(body.scope).unwrap_or_default();
    a.audit(
        "key.create",
        issued.key.prefix(),
        Some(org),
        json!({"key_id": issued.id, "scope": scope, "tier": body.tier, "daily_quota": body.daily_quota}),
    )
    .await?;
    a.confirm_still_enabled().await?;
    a.tx.commit().await?;
    Ok((
        201,
        json!({
            "id": issued.id,
            "prefix": issued.key.prefix(),
            "key": issued.key.expose_secret(),
            "note": "the key is shown this once; only its hash is stored",
        }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old key stays valid, in seconds (default one day, at most 30 days).
    grace_seconds: Option<i64>,
}

async fn rotate_key(r: &Request<'_>, org: Uuid, id: Uuid) -> Reply {
    let body: RotateBody = if r.body.is_empty() {
        RotateBody::default()
    } else {
        r.json()?
    };
    let grace = body.grace_seconds.unwrap_or(86_400);
    if !(0..=30 * 86_400).contains(&grace) {
        return Err(ApiError::bad(
            "grace_seconds must be between 0 and 2592000 (30 days)",
        ));
    }
    let pepper = pepper(r)?;
    let mut a = r.authorize(Action::RotateKey, Some(org)).await?;
    let mine: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM api_keys WHERE id = $1 AND org_id = $2")
            .bind(id)
            .bind(org)
            .fetch_optional(&mut *a.tx)
            .await?;
    if mine.is_none() {
        return Err(ApiError::not_found("key"));
    }
    let actor = a.actor();
    let rotation = dbkeys::rotate_key_in(
        &mut a.tx,
        &pepper,
        id,
        chrono::Duration::seconds(grace),
        Utc::now(),
        &actor,
    )
    .await?
    .ok_or_else(|| {
        ApiError::new(
            409,
            "not_rotatable",
            "this key is revoked or was already rotated; rotate its replacement",
        )
    })?;
    a.confirm_still_enabled().await?;
    a.tx.commit().await?;
    Ok((
        201,
        json!({
            "id": rotation.new.id,
            "prefix": rotation.new.key.prefix(),
            "key": rotation.new.key.expose_secret(),
            "old_prefix": rotation.old_prefix,
            "old_valid_until": rotation.grace_until.to_rfc3339(),
            "note": "the key is shown this once; only its hash is stored",
        }),
    ))
}

async fn revoke_key(r: &Request<'_>, org: Uuid, id: Uuid) -> Reply {
    let mut a = r.authorize(Action::RevokeKey, Some(org)).await?;
    let prefix: Option<String> = sqlx::query_scalar(
        "UPDATE api_keys SET revoked_at = now()
          WHERE id = $1 AND org_id = $2 AND revoked_at IS NULL RETURNING prefix",
    )
    .bind(id)
    .bind(org)
    .fetch_optional(&mut *a.tx)
    .await?;
    let Some(prefix) = prefix else {
        return Err(ApiError::not_found("active key"));
    };
    a.audit("key.revoke", &prefix, Some(org), json!({"key_id": id}))
        .await?;
    a.tx.commit().await?;
    Ok((200, json!({"id": id, "prefix": prefix, "revoked": true})))
}

// ---- APIs ----

#[derive(sqlx::FromRow, serde::Serialize)]
struct ApiRow {
    id: Uuid,
    name: String,
    path_prefix: String,
    upstream_url: String,
    scopes: Vec<String>,
    pii_mode: String,
    timeout_ms: i32,
    updated_at: DateTime<Utc>,
}

const API_COLUMNS: &str =
    "id, name, path_prefix, upstream_url, scopes::text[] AS scopes, pii_mode, timeout_ms, updated_at";

async fn list_apis(r: &Request<'_>, org: Uuid) -> Reply {
    let mut a = r.authorize(Action::ListApis, Some(org)).await?;
    let rows: Vec<ApiRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {API_COLUMNS} FROM apis WHERE org_id = $1 ORDER BY name"
    )))
    .bind(org)
    .fetch_all(&mut *a.tx)
    .await?;
    Ok((200, json!({"apis": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiBody {
    name: String,
    path_prefix: String,
    upstream_url: String,
    #[serde(default = "default_scopes")]
    scopes: Vec<KeyScope>,
    #[serde(default = "default_pii")]
    pii_mode: String,
    #[serde(default = "default_timeout")]
    timeout_ms: i32,
}

fn default_scopes() -> Vec<KeyScope> {
    vec![KeyScope::Live, KeyScope::Test]
}
fn default_pii() -> String {
    "off".into()
}
fn default_timeout() -> i32 {
    30_000
}

/// How long the console waits for an upstream host to resolve.
const UPSTREAM_RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

fn check_api(b: &ApiBody) -> Result<(), ApiError> {
    let name_ok = !b.name.is_empty()
        && b.name.len() <= 63
        && b.name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !b.name.starts_with('-')
        && !b.name.ends_with('-');
    if !name_ok {
        return Err(ApiError::bad(
            "name: 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'",
        ));
    }
    let p = &b.path_prefix;
    if !p.starts_with('/')
        || p.len() > 200
        || p.contains("//")
        || p.split('/').any(|s| s == "." || s == "..")
        || !p
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"/-_.~".contains(&c))
    {
        return Err(ApiError::bad(
            "path_prefix: starts with '/', at most 200 characters of letters, digits, '/', '-', '_', '.', '~', no '//' and no '.' or '..' segment",
        ));
    }
    if p == "/" {
        return Err(ApiError::bad(
            "path_prefix: / would take every path of the marketplace; name your API's, e.g. /weather",
        ));
    }
    // Exactly the gateway's reading of the URL: a URL the gateway refuses must not be saved.
    crate::proxy::config::upstream_uri(&b.upstream_url)
        .map_err(|e| ApiError::bad(format!("upstream_url: {e}")))?;
    if !matches!(b.pii_mode.as_str(), "off" | "flag" | "mask") {
        return Err(ApiError::bad("pii_mode is one of off, flag, mask"));
    }
    if !(1..=300_000).contains(&b.timeout_ms) {
        return Err(ApiError::bad("timeout_ms is between 1 and 300000"));
    }
    if b.scopes.is_empty() {
        return Err(ApiError::bad("scopes needs at least one of live, test"));
    }
    Ok(())
}

async fn write_api(r: &Request<'_>, org: Uuid, id: Option<Uuid>) -> Reply {
    let body: ApiBody = r.json()?;
    check_api(&body)?;
    // Resolve the host as the gateway will (the gateways check each connection's addresses
    // too: a name can be repointed later), for a signed-in caller only, before a database
    // connection is held, and not for longer than a few seconds.
    let claims = r.verify_session()?;
    if authz::reach(claims.role, Action::WriteApi) == authz::Reach::None {
        // Refused below, with the rule; no lookup on its behalf.
        r.authorize(Action::WriteApi, Some(org)).await?;
    }
    let uri = crate::proxy::config::upstream_uri(&body.upstream_url).map_err(ApiError::bad)?;
    let host = uri.host().unwrap_or_default();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    match tokio::time::timeout(
        UPSTREAM_RESOLVE_TIMEOUT,
        r.console.egress.resolve(host, port),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(ApiError::new(400, "upstream_refused", e.to_string())),
        Err(_) => {
            return Err(ApiError::new(
                400,
                "upstream_refused",
                format!(
                    "upstream host {host} did not resolve within {} s",
                    UPSTREAM_RESOLVE_TIMEOUT.as_secs()
                ),
            ))
        }
    }
    let mut a = r.authorize(Action::WriteApi, Some(org)).await?;
    let scopes: Vec<String> = body
        .scopes
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        })
        .collect();
    let before: Option<ApiRow> = match id {
        Some(id) => Some(
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {API_COLUMNS} FROM apis WHERE id = $1 AND org_id = $2"
            )))
            .bind(id)
            .bind(org)
            .fetch_optional(&mut *a.tx)
            .await?
            .ok_or_else(|| ApiError::not_found("API"))?,
        ),
        None => None,
    };
    let id = id.unwrap_or_else(Uuid::new_v4);
    // The gateway routes and seals credentials by API name: it is unique across orgs.
    let named: Vec<(Uuid, Uuid)> = sqlx::query_as("SELECT id, org_id FROM console_api_by_name($1)")
        .bind(&body.name)
        .fetch_all(&mut *a.tx)
        .await?;
    if named.iter().any(|(other, _)| *other != id) {
        return Err(ApiError::new(
            409,
            "conflict",
            format!(
                "an API named {} exists already; API names are unique across the marketplace",
                body.name
            ),
        ));
    }
    // Credentials (every org's BYOK ones too) are sealed to the name: it never changes.
    if before.as_ref().is_some_and(|b| b.name != body.name) {
        return Err(ApiError::new(
            409,
            "name_fixed",
            "an API's name cannot change: routes and sealed credentials are bound to it; register a new API instead",
        ));
    }
    // The gateway sends a call to the longest matching prefix: a prefix that overlaps another
    // org's would take that seller's traffic (and its buyers' bodies). Nested prefixes within
    // one org are the seller's own business; the same prefix twice is ambiguous anywhere.
    let overlaps: Vec<(String, Uuid, String)> =
        sqlx::query_as("SELECT name, org_id, path_prefix FROM console_prefix_overlaps($1, $2)")
            .bind(&body.path_prefix)
            .bind(id)
            .fetch_all(&mut *a.tx)
            .await?;
    if let Some((name, owner, prefix)) = overlaps
        .iter()
        .find(|(_, owner, prefix)| *owner != org || *prefix == body.path_prefix)
    {
        let whose = if *owner == org {
            format!("your API {name}")
        } else {
            "another seller's API".to_string()
        };
        return Err(ApiError::new(
            409,
            "path_prefix_taken",
            format!(
                "path_prefix {} overlaps {prefix} of {whose}: choose a prefix that no other seller's API matches, e.g. /{}/",
                body.path_prefix, body.name
            ),
        ));
    }
    let row: ApiRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO apis (id, org_id, name, path_prefix, upstream_url, scopes, pii_mode, timeout_ms)
         VALUES ($1, $2, $3, $4, $5, $6::key_scope[], $7, $8)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, path_prefix = EXCLUDED.path_prefix,
             upstream_url = EXCLUDED.upstream_url, scopes = EXCLUDED.scopes,
             pii_mode = EXCLUDED.pii_mode, timeout_ms = EXCLUDED.timeout_ms, updated_at = now()
         RETURNING {API_COLUMNS}"
    )))
    .bind(id)
    .bind(org)
    .bind(&body.name)
    .bind(&body.path_prefix)
    .bind(&body.upstream_url)
    .bind(&scopes)
    .bind(&body.pii_mode)
    .bind(body.timeout_ms)
    .fetch_one(&mut *a.tx)
    .await?;
    let (action, status) = if before.is_some() {
        ("api.update", 200)
    } else {
        ("api.create", 201)
    };
    a.audit(
        action,
        &row.name,
        Some(org),
        json!({"api_id": id, "before": before, "after": &row}),
    )
    .await?;
    a.tx.commit().await?;
    Ok((status, json!({"api": row})))
}

// ---- credentials ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    /// The API's name.
    api: String,
    name: String,
    value: String,
    kind: String,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default = "default_value_prefix")]
    value_prefix: String,
    /// BYOK: the server (`https://host[:port]`) the buyer means to send the secret to, as the
    /// credential list showed it; refused (409) when the API goes elsewhere now.
    #[serde(default)]
    expect_origin: Option<String>,
}

use crate::proxy::config::{
    credential_header_problem, secret_problem, upstream_origin, value_prefix_problem, Origin,
};

fn default_header() -> String {
    "authorization".into()
}
fn default_value_prefix() -> String {
    "Bearer ".into()
}

async fn list_credentials(r: &Request<'_>, org: Uuid) -> Reply {
    // Listing is part of writing: metadata only, the role cannot read a ciphertext.
    let mut a = r.authorize(Action::WriteByokCredential, Some(org)).await?;
    let rows: Vec<(Uuid, Uuid, String, String, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, api_id, name, kind::text, key_version, updated_at
           FROM upstream_credentials WHERE org_id = $1 ORDER BY name",
    )
    .bind(org)
    .fetch_all(&mut *a.tx)
    .await?;
    // A BYOK credential is sent only to the server it was written for (the gateway's rule,
    // `upstream_origin`): the buyer sees that server, where the API goes now, and whether it
    // waits to be written again. Origins only: the seller's paths are not shown.
    let bindings: Vec<(Uuid, String, Option<String>, String)> = sqlx::query_as(
        "SELECT id, api, bound_upstream, upstream_url FROM console_byok_bindings($1)",
    )
    .bind(org)
    .fetch_all(&mut *a.tx)
    .await?;
    let byok: HashMap<Uuid, (String, Option<Origin>, Option<Origin>)> = bindings
        .into_iter()
        .map(|(id, api, was, now)| (id, (api, origin_of(was.as_deref()), origin_of(Some(&now)))))
        .collect();
    let text = |o: &Option<Origin>| o.as_ref().map(Origin::to_string);
    let list: Vec<Value> = rows
        .into_iter()
        .map(|(id, api, name, kind, v, at)| {
            let mut row = json!({"id": id, "api_id": api, "name": name, "kind": kind, "key_version": v,
                                 "updated_at": at, "upstream_changed": false});
            if let Some((api, was, now)) = byok.get(&id) {
                row["api"] = json!(api);
                row["sent_to"] = json!(text(was));
                row["api_goes_to"] = json!(text(now));
                row["upstream_changed"] = json!(!(was.is_some() && was == now));
            }
            row
        })
        .collect();
    Ok((200, json!({"credentials": list})))
}

/// The origin an upstream URL is dialled at (the gateway's rule); None for none, or for one
/// the gateway cannot use.
fn origin_of(upstream: Option<&str>) -> Option<Origin> {
    upstream.and_then(|u| upstream_origin(u).ok())
}

/// Where a BYOK secret for an API would be sent (`?api=NAME`): its server's origin, never its
/// path. A buyer sees this before handing over a secret, and writes with it as
/// `expect_origin`.
async fn credential_origin(r: &Request<'_>, org: Uuid) -> Reply {
    let name = r
        .param("api")
        .ok_or_else(|| ApiError::bad("name the API: ?api=NAME"))?
        .to_string();
    let mut a = r.authorize(Action::WriteByokCredential, Some(org)).await?;
    let api: Option<(Uuid, Uuid)> =
        sqlx::query_as("SELECT id, org_id FROM console_api_by_name($1)")
            .bind(&name)
            .fetch_optional(&mut *a.tx)
            .await?;
    let Some((id, _)) = api else {
        return Err(ApiError::not_found("API"));
    };
    let upstream: Option<String> = sqlx::query_scalar("SELECT console_api_upstream($1)")
        .bind(id)
        .fetch_one(&mut *a.tx)
        .await?;
    let origin = origin_of(upstream.as_deref()).map(|o| o.to_string());
    Ok((200, json!({"api": name, "origin": origin})))
}

async fn write_credential(r: &Request<'_>, org: Uuid) -> Reply {
    let body: CredentialBody = r.json()?;
    let action = match body.kind.as_str() {
        "byok" => Action::WriteByokCredential,
        "system" => Action::WriteSystemCredential,
        _ => {
            return Err(ApiError::bad(
                "kind is byok (your own upstream account) or system (your API's)",
            ))
        }
    };
    short_text(&body.name, "name", 100)?;
    if body.name.is_empty() {
        return Err(ApiError::bad("name must not be empty"));
    }
    if body.value.len() > 8192 {
        return Err(ApiError::bad("value must be at most 8192 bytes"));
    }
    if let Some(e) = value_prefix_problem(&body.value_prefix)
        .map(|e| format!("value_prefix {e}"))
        .or_else(|| secret_problem(&body.value_prefix, &body.value).map(|e| format!("value {e}")))
    {
        return Err(ApiError::bad(e));
    }
    // A credential may only set an authentication header (the gateway refuses others too).
    if let Some(e) = credential_header_problem(&body.header) {
        return Err(ApiError::bad(format!("header {e}")));
    }
    let name_ok = body.name.len() <= 64
        && body
            .name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c));
    if !name_ok {
        return Err(ApiError::bad(
            "name: 1 to 64 letters, digits, '-', '_' and '.'",
        ));
    }
    if body.value_prefix.len() > 32 {
        return Err(ApiError::bad("value_prefix must be at most 32 characters"));
    }
    let keys = r.console.master_keys.clone().ok_or_else(|| {
        ApiError::new(
            503,
            "no_master_key",
            "this console has no master key, so it cannot seal credentials; set APITREE_MASTER_KEY",
        )
    })?;
    let mut a = r.authorize(action, Some(org)).await?;
    let api: Option<(Uuid, Uuid)> =
        sqlx::query_as("SELECT id, org_id FROM console_api_by_name($1)")
            .bind(&body.api)
            .fetch_optional(&mut *a.tx)
            .await?;
    let api_id = match api {
        // A system credential is for one of the org's own APIs.
        Some((id, owner)) if action == Action::WriteByokCredential || owner == org => id,
        _ => return Err(ApiError::not_found("API")),
    };
    // The server the buyer means their secret for, if they say (any spelling of it).
    let expected = match (&body.expect_origin, action) {
        (Some(e), _) if e.len() > 300 => {
            return Err(ApiError::bad(
                "expect_origin is at most 300 characters: scheme, host and port",
            ))
        }
        (Some(e), Action::WriteByokCredential) => Some(upstream_origin(e).map_err(|e| {
            ApiError::bad(format!("expect_origin {e}; write it as the credential list shows it, e.g. https://api.example.com"))
        })?),
        (Some(_), _) => return Err(ApiError::bad("expect_origin is for BYOK credentials")),
        (None, _) => None,
    };
    let sealed = keys.encrypt(&org.to_string(), &body.api, &body.value);
    // An org holds one credential of each kind per API (the database says so too): writing
    // again replaces it, under the new name if one is given. Update, else insert: the role may
    // not read ciphertexts, which an upsert's EXCLUDED would need.
    let updated: Option<(Uuid, Option<String>)> = sqlx::query_as(
        "UPDATE upstream_credentials SET name = $3, ciphertext = $5, nonce = $6,
                key_version = $7, header = $8, value_prefix = $9, updated_at = now(), rotated_at = now(),
                bound_upstream = NULL
          WHERE org_id = $1 AND api_id = $2 AND kind = $4::credential_kind
         RETURNING id, bound_upstream",
    )
    .bind(org)
    .bind(api_id)
    .bind(&body.name)
    .bind(&body.kind)
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .bind(sealed.key_version as i32)
    .bind(body.header.to_ascii_lowercase())
    .bind(&body.value_prefix)
    .fetch_optional(&mut *a.tx)
    .await?;
    let (id, bound) = match updated {
        Some(row) => row,
        None => {
            sqlx::query_as(
                "INSERT INTO upstream_credentials
                     (id, org_id, api_id, name, kind, ciphertext, nonce, key_version, header, value_prefix)
                 VALUES ($1, $2, $3, $4, $5::credential_kind, $6, $7, $8, $9, $10)
                 RETURNING id, bound_upstream",
            )
            .bind(Uuid::new_v4())
            .bind(org)
            .bind(api_id)
            .bind(&body.name)
            .bind(&body.kind)
            .bind(&sealed.ciphertext)
            .bind(&sealed.nonce)
            .bind(sealed.key_version as i32)
            .bind(body.header.to_ascii_lowercase())
            .bind(&body.value_prefix)
            .fetch_one(&mut *a.tx)
            .await?
        }
    };
    // A BYOK secret is bound by the database to the API's server as it is at this write; one
    // the buyer did not expect is rolled back, so a seller who moves the API while the buyer
    // writes gets nothing.
    let bound = origin_of(bound.as_deref());
    if let Some(expected) = &expected {
        if bound.as_ref() != Some(expected) {
            return Err(ApiError::new(
                409,
                "upstream_moved",
                format!(
                    "API {} now sends to {}, not {expected}: nothing was stored; check that this is where your secret should go, then write it again with expect_origin set to it",
                    body.api,
                    bound.map_or("an upstream the gateway cannot use".to_string(), |o| o.to_string())
                ),
            ));
        }
    }
    let sent_to = bound.map(|o| o.to_string());
    // The target is a reference: a credential's name is the buyer's free text, and the
    // chain cannot forget it (see `db::dsar`).
    a.audit(
        "credential.write",
        &format!("credential:{id}"),
        Some(org),
        json!({"credential_id": id, "api": body.api, "kind": body.kind, "key_version": sealed.key_version,
               "sent_to": sent_to}),
    )
    .await?;
    a.confirm_still_enabled().await?;
    a.tx.commit().await?;
    Ok((
        201,
        json!({"id": id, "api": body.api, "name": body.name, "kind": body.kind, "key_version": sealed.key_version,
               "sent_to": sent_to}),
    ))
}

// ---- usage and credits ----

async fn usage(r: &Request<'_>, org: Uuid) -> Reply {
    let days: i32 = r
        .param("days")
        .map(|d| {
            d.parse()
                .map_err(|_| ApiError::bad("days is a whole number from 1 to 90"))
        })
        .transpose()?
        .unwrap_or(7);
    if !(1..=90).contains(&days) {
        return Err(ApiError::bad("days is a whole number from 1 to 90"));
    }
    let mut a = r.authorize(Action::ReadUsage, Some(org)).await?;
    let rows: Vec<(chrono::NaiveDate, i64, i64, i64)> = sqlx::query_as(
        "SELECT (window_start AT TIME ZONE 'UTC')::date AS day, sum(requests)::bigint,
                sum(errors)::bigint, sum(bytes_out)::bigint
           FROM usage_counters
          WHERE org_id = $1 AND window_start >= now() - make_interval(days => $2)
          GROUP BY 1 ORDER BY 1",
    )
    .bind(org)
    .bind(days)
    .fetch_all(&mut *a.tx)
    .await?;
    let days: Vec<Value> = rows
        .into_iter()
        .map(|(d, req, err, bytes)| json!({"day": d.to_string(), "requests": req, "errors": err, "bytes_out": bytes}))
        .collect();
    Ok((200, json!({"usage": days})))
}

async fn balance(tx: &mut Transaction<'static, Postgres>, org: Uuid) -> Result<i64, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(amount), 0)::bigint FROM credit_ledger WHERE org_id = $1",
    )
    .bind(org)
    .fetch_one(&mut **tx)
    .await?)
}

async fn credits(r: &Request<'_>, org: Uuid) -> Reply {
    let mut a = r.authorize(Action::ReadCredits, Some(org)).await?;
    let balance = balance(&mut a.tx, org).await?;
    let rows: Vec<(i64, i64, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, amount, reason, actor, at FROM credit_ledger WHERE org_id = $1
          ORDER BY id DESC LIMIT 100",
    )
    .bind(org)
    .fetch_all(&mut *a.tx)
    .await?;
    let ledger: Vec<Value> = rows
        .into_iter()
        .map(|(id, amount, reason, actor, at)| json!({"id": id, "amount": amount, "reason": reason, "actor": actor, "at": at}))
        .collect();
    Ok((200, json!({"balance": balance, "ledger": ledger})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    amount: i64,
    reason: String,
}

/// Largest single adjustment.
const MAX_ADJUSTMENT: i64 = 1_000_000_000_000;

async fn adjust_credits(r: &Request<'_>, org: Uuid) -> Reply {
    let body: Adjustment = r.json()?;
    if body.amount == 0 || body.amount.unsigned_abs() > MAX_ADJUSTMENT as u64 {
        return Err(ApiError::bad(format!(
            "amount is a non-zero whole number of credits, at most {MAX_ADJUSTMENT} either way"
        )));
    }
    let reason = body.reason.trim();
    if reason.is_empty() {
        return Err(ApiError::bad("every adjustment needs a reason"));
    }
    short_text(reason, "reason", 500)?;
    let mut a = r.authorize(Action::AdjustCredits, Some(org)).await?;
    // One adjustment per org at a time: the balance check and the insert see the same ledger.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('apitree.credits:' || $1::text))")
        .bind(org)
        .execute(&mut *a.tx)
        .await?;
    let before = balance(&mut a.tx, org).await?;
    let after = before
        .checked_add(body.amount)
        .filter(|b| *b >= 0)
        .ok_or_else(|| {
            ApiError::new(
                409,
                "balance_negative",
                format!("the balance is {before}; this adjustment would take it below zero"),
            )
        })?;
    let actor = a.actor();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO credit_ledger (org_id, amount, reason, actor) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(org)
    .bind(body.amount)
    .bind(reason)
    .bind(&actor)
    .fetch_one(&mut *a.tx)
    .await?;
    a.audit(
        "credits.adjust",
        &format!("org:{org}"),
        Some(org),
        json!({"entry": id, "amount": body.amount, "reason": reason, "before": before, "after": after}),
    )
    .await?;
    a.tx.commit().await?;
    Ok((201, json!({"entry": id, "balance": after})))
}

// ---- users ----

async fn list_orgs(r: &Request<'_>) -> Reply {
    let mut a = r.authorize(Action::ListUsers, None).await?;
    let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, name FROM orgs ORDER BY name")
        .fetch_all(&mut *a.tx)
        .await?;
    let orgs: Vec<Value> = rows
        .into_iter()
        .map(|(id, name)| json!({"id": id, "name": name}))
        .collect();
    Ok((200, json!({"orgs": orgs})))
}

async fn list_users(r: &Request<'_>) -> Reply {
    let org = r.param("org").map(|o| uuid(o, "org")).transpose()?;
    let mut a = r.authorize(Action::ListUsers, None).await?;
    type Row = (
        Uuid,
        String,
        String,
        Option<Uuid>,
        bool,
        bool,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, email, role::text, org_id, disabled_at IS NOT NULL, password_hash IS NULL, created_at
           FROM users WHERE $1::uuid IS NULL OR org_id = $1 ORDER BY email",
    )
    .bind(org)
    .fetch_all(&mut *a.tx)
    .await?;
    let users: Vec<Value> = rows
        .into_iter()
        .map(|(id, email, role, org, disabled, invited, at)| {
            json!({"id": id, "email": email, "role": role, "org": org, "disabled": disabled, "invited": invited, "created_at": at})
        })
        .collect();
    Ok((200, json!({"users": users})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Invite {
    email: String,
    role: Role,
    org: Option<Uuid>,
}

/// How long an invitation stays valid.
const INVITE_TTL_HOURS: i64 = 72;

pub fn check_email(email: &str) -> Result<(), String> {
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.')
        })
        && email.matches('@').count() == 1
        // ASCII only (a domain in its xn-- form): one lower-casing, the same in Rust and in
        // PostgreSQL, so the throttle and the database agree on which account is meant.
        && email.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{email:?} is not an email address (ASCII, one @, a dotted domain; write an internationalised domain in its xn-- form)"
        ))
    }
}

async fn invite_user(r: &Request<'_>) -> Reply {
    let body: Invite = r.json()?;
    let email = body.email.trim().to_string();
    check_email(&email).map_err(ApiError::bad)?;
    let org = match (body.role.is_staff(), body.org) {
        (false, None) => {
            return Err(ApiError::bad(
                "a buyer or seller belongs to an org: give org",
            ))
        }
        (true, Some(_)) => {
            return Err(ApiError::bad(
                "admins and super_admins belong to no org: leave org out",
            ))
        }
        (_, org) => org,
    };
    let grant = body.role;
    let mut a = r
        .authorize_with(Action::InviteUser, None, |p| {
            authz::decide_user_change(
                p,
                Action::InviteUser,
                UserChange {
                    target: None,
                    grant: Some(grant),
                },
            )
        })
        .await?;
    if let Some(org) = org {
        let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orgs WHERE id = $1")
            .bind(org)
            .fetch_optional(&mut *a.tx)
            .await?;
        if exists.is_none() {
            return Err(ApiError::not_found("org"));
        }
    }
    let token = invitation_token();
    let hash = Sha256::digest(token.as_bytes()).to_vec();
    let id = Uuid::new_v4();
    let expires: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO users (id, org_id, email, role, invite_hash, invite_expires_at)
         VALUES ($1, $2, $3, $4::user_role, $5, now() + make_interval(hours => $6))
         RETURNING invite_expires_at",
    )
    .bind(id)
    .bind(org)
    .bind(&email)
    .bind(grant.as_str())
    .bind(&hash)
    .bind(INVITE_TTL_HOURS as i32)
    .fetch_one(&mut *a.tx)
    .await?;
    a.audit(
        "user.invite",
        &format!("user:{id}"),
        org,
        json!({"user_id": id, "role": grant.as_str()}),
    )
    .await?;
    a.tx.commit().await?;
    Ok((
        201,
        json!({
            "id": id,
            "invitation": token,
            "expires_at": expires,
            "note": "give the invitation to the person; they set a password with POST /api/v1/invitations/accept. It is shown this once.",
        }),
    ))
}

fn invitation_token() -> String {
    use base64::Engine;
    use rand::RngExt;
    let mut bytes = [0u8; 24];
    rand::rng().fill(&mut bytes[..]);
    format!(
        "inv_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

async fn target_user(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
) -> Result<(Role, Option<Uuid>), ApiError> {
    let row: Option<(String, Option<Uuid>)> =
        sqlx::query_as("SELECT role::text, org_id FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let (role, org) = row.ok_or_else(|| ApiError::not_found("user"))?;
    Ok((
        Role::parse(&role).ok_or_else(|| ApiError::bad("unknown role"))?,
        org,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: Role,
}

async fn set_role(r: &Request<'_>, id: Uuid) -> Reply {
    let body: RoleBody = r.json()?;
    // Staff read every user: open the staff view first, then decide on the target's rank.
    let mut a = r
        .authorize_with(Action::SetRole, None, |p| {
            authz::decide(p, Action::SetRole, None)
        })
        .await?;
    let (current, org) = target_user(&mut a.tx, id).await?;
    if let Decision::Forbidden(why) = authz::decide_user_change(
        &a.who,
        Action::SetRole,
        UserChange {
            target: Some((id, current)),
            grant: Some(body.role),
        },
    ) {
        r.console
            .metrics
            .refused(Action::SetRole.name(), "forbidden");
        return Err(ApiError::new(403, "forbidden", why));
    }
    if !body.role.is_staff() && org.is_none() {
        return Err(ApiError::new(
            409,
            "no_org",
            "this user belongs to no org; a buyer or seller needs one",
        ));
    }
    sqlx::query("UPDATE users SET role = $2::user_role, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(body.role.as_str())
        .execute(&mut *a.tx)
        .await?;
    a.audit(
        "user.role",
        &format!("user:{id}"),
        org,
        json!({"user_id": id, "before": current.as_str(), "after": body.role.as_str()}),
    )
    .await?;
    a.tx.commit().await?;
    Ok((200, json!({"id": id, "role": body.role})))
}

async fn disable_user(r: &Request<'_>, id: Uuid) -> Reply {
    let mut a = r
        .authorize_with(Action::DisableUser, None, |p| {
            authz::decide(p, Action::DisableUser, None)
        })
        .await?;
    let (current, org) = target_user(&mut a.tx, id).await?;
    if let Decision::Forbidden(why) = authz::decide_user_change(
        &a.who,
        Action::DisableUser,
        UserChange {
            target: Some((id, current)),
            grant: None,
        },
    ) {
        r.console
            .metrics
            .refused(Action::DisableUser.name(), "forbidden");
        return Err(ApiError::new(403, "forbidden", why));
    }
    sqlx::query(
        "UPDATE users SET disabled_at = coalesce(disabled_at, now()), updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *a.tx)
    .await?;
    a.audit(
        "user.disable",
        &format!("user:{id}"),
        org,
        json!({"user_id": id, "role": current.as_str()}),
    )
    .await?;
    a.tx.commit().await?;
    Ok((200, json!({"id": id, "disabled": true})))
}

// ---- personal data (GDPR) ----

/// The other identities a staff member names for a person (`identity=slack:U…`, repeatable).
fn identities(r: &Request<'_>, who: &Principal) -> Result<Vec<dsar::Handle>, ApiError> {
    let given: Vec<&str> = r
        .query
        .iter()
        .filter(|(k, _)| k == "identity")
        .map(|(_, v)| v.as_str())
        .collect();
    // Naming an identity reaches whoever holds it (staff included): super_admins only.
    if !given.is_empty() && who.role != Role::SuperAdmin {
        return Err(ApiError::new(
            403,
            "forbidden",
            "only a super_admin names other identities (Slack, OS users) of a person",
        ));
    }
    given
        .into_iter()
        .map(|h| dsar::Handle::parse(h).map_err(|e| ApiError::bad(e.to_string())))
        .collect()
}

fn dsar_error(e: dsar::DsarError) -> ApiError {
    use dsar::DsarError as E;
    match e {
        E::NoUser(_) => ApiError::not_found("user"),
        E::AlreadyErased(m) => ApiError::new(409, "already_erased", m),
        E::Refused(m) => ApiError::new(409, "erasure_refused", m),
        E::BadInput(m) => ApiError::bad(m),
        E::Db(e) => e.into(),
    }
}

/// Opens the staff view (or the caller's own) and decides on the person asked about.
async fn authorize_personal(
    r: &Request<'_>,
    action: Action,
    id: Uuid,
) -> Result<Authorized, ApiError> {
    let mut a = r
        .authorize_with(action, None, |p| {
            if action == Action::ExportPersonalData && p.id == id {
                Decision::Allow
            } else {
                authz::decide(p, action, None)
            }
        })
        .await?;
    let (role, _) = if a.who.id == id {
        (a.who.role, a.who.org)
    } else {
        target_user(&mut a.tx, id).await?
    };
    if let Decision::Forbidden(why) = authz::decide_personal_data(&a.who, action, (id, role)) {
        r.console.metrics.refused(action.name(), "forbidden");
        return Err(ApiError::new(403, "forbidden", why));
    }
    Ok(a)
}

async fn export_user(r: &Request<'_>, id: Uuid) -> Reply {
    let mut a = authorize_personal(r, Action::ExportPersonalData, id).await?;
    let also = identities(r, &a.who)?;
    let actor = a.actor();
    let doc = dsar::export(&mut a.tx, id, &also, &actor)
        .await
        .map_err(dsar_error)?;
    a.tx.commit().await?;
    Ok((200, doc))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseBody {
    reason: String,
    /// The user's id again: an erasure cannot be undone, so the caller says whom twice.
    confirm: Uuid,
}

async fn erase_user(r: &Request<'_>, id: Uuid) -> Reply {
    let body: EraseBody = r.json()?;
    if body.confirm != id {
        return Err(ApiError::bad(
            "confirm must repeat the id of the user to erase; an erasure cannot be undone",
        ));
    }
    let mut a = authorize_personal(r, Action::ErasePersonalData, id).await?;
    let also = identities(r, &a.who)?;
    let actor = a.actor();
    let report = match dsar::erase(&mut a.tx, id, &also, &actor, &body.reason).await {
        Ok(report) => report,
        Err(e) => {
            let staff = a.who.role.is_staff();
            drop(a.tx);
            if let dsar::DsarError::Refused(why) = &e {
                // The request and its refusal stay in the queue.
                let mut tx = begin(r.console).await?;
                open(&mut tx, None, staff).await?;
                dsar::record_refusal(&mut tx, id, &actor, &body.reason, why)
                    .await
                    .map_err(dsar_error)?;
                tx.commit().await?;
            }
            return Err(dsar_error(e));
        }
    };
    a.tx.commit().await?;
    Ok((200, json!({"id": id, "erased": true, "report": report})))
}

/// The Customer Operations queue: requests about people's data, newest first.
async fn dsar_requests(r: &Request<'_>) -> Reply {
    let mut a = r.authorize(Action::ExportPersonalData, None).await?;
    // Who is named by reference: the person's current email (an erased one reads
    // erased-…@erased.invalid), the actors' emails or subject labels. Open requests first.
    let requests: Vec<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object(
                'id', r.id, 'subject', r.subject, 'email', u.email, 'kind', r.kind,
                'state', r.state, 'actor', r.actor,
                'actor_name', coalesce(au.email, ad.kind || ':' || ad.label),
                'reason', r.reason, 'outcome', r.outcome, 'at', r.at, 'done_at', r.done_at,
                'done_by', r.done_by,
                'done_by_name', coalesce(du.email, dd.kind || ':' || dd.label))
           FROM dsar_requests r
           LEFT JOIN users u ON r.subject = 'user:' || u.id::text
           LEFT JOIN users au ON r.actor = 'user:' || au.id::text
           LEFT JOIN data_subjects ad ON r.actor = 'subject:' || ad.id::text
           LEFT JOIN users du ON r.done_by = 'user:' || du.id::text
           LEFT JOIN data_subjects dd ON r.done_by = 'subject:' || dd.id::text
          ORDER BY (r.state = 'received') DESC, r.id DESC LIMIT 200",
    )
    .fetch_all(&mut *a.tx)
    .await?;
    a.tx.commit().await?;
    Ok((200, json!({"requests": requests})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveBody {
    user: Uuid,
    kind: String,
    #[serde(default)]
    note: Option<String>,
}

/// Logs a request about a person's data as it arrives (an email to the data protection
/// address, a ticket): the queue shows it open until it is carried out.
async fn receive_request(r: &Request<'_>) -> Reply {
    let body: ReceiveBody = r.json()?;
    let mut a = r.authorize(Action::ExportPersonalData, None).await?;
    let actor = a.actor();
    let id = dsar::receive(
        &mut a.tx,
        body.user,
        &body.kind,
        &actor,
        body.note.as_deref(),
    )
    .await
    .map_err(dsar_error)?;
    a.tx.commit().await?;
    Ok((201, json!({"id": id, "state": "received"})))
}

// ---- audit ----

async fn read_audit(r: &Request<'_>) -> Reply {
    let org = r.param("org").map(|o| uuid(o, "org")).transpose()?;
    let before: Option<i64> = r
        .param("before")
        .map(|b| {
            b.parse()
                .map_err(|_| ApiError::bad("before is an audit entry id"))
        })
        .transpose()?;
    let limit: i64 = r
        .param("limit")
        .map(|l| {
            l.parse()
                .map_err(|_| ApiError::bad("limit is a whole number from 1 to 200"))
        })
        .transpose()?
        .unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad("limit is a whole number from 1 to 200"));
    }
    let action = r.param("action").map(str::to_string);
    let mut a = r.authorize(Action::ReadAudit, None).await?;
    type Row = (
        i64,
        DateTime<Utc>,
        String,
        Option<String>,
        Option<String>,
        String,
        String,
        Option<Uuid>,
        Value,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.id, a.at, a.actor, u.email, d.kind || ':' || d.label, a.action,
                a.target, a.org_id, a.detail
           FROM audit_log a
           LEFT JOIN users u ON a.actor = 'user:' || u.id::text
           LEFT JOIN data_subjects d ON a.actor = 'subject:' || d.id::text
          WHERE ($1::uuid IS NULL OR a.org_id = $1)
            AND ($2::bigint IS NULL OR a.id < $2)
            AND ($3::text IS NULL OR a.action = $3)
          ORDER BY a.id DESC LIMIT $4",
    )
    .bind(org)
    .bind(before)
    .bind(action)
    .bind(limit)
    .fetch_all(&mut *a.tx)
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.0))
        .flatten();
    let entries: Vec<Value> = rows
        .into_iter()
        .map(
            |(id, at, actor, email, name, action, target, org, detail)| {
                json!({"id": id, "at": at, "actor": actor, "actor_email": email, "actor_name": name,
                   "action": action,
                   "target": target, "org": org, "detail": detail})
            },
        )
        .collect();
    Ok((200, json!({"entries": entries, "next_before": next})))
}
