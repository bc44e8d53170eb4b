//! The console end to end: a real PostgreSQL, the console on a local port, real HTTP.
//!
//! Every endpoint × every role (own org, another org), JWT tampering at the API, sessions that
//! end when a user is disabled or re-roled, sign-in throttling, the database refusing another
//! org's rows when the application check is skipped, write-only credentials, invitations,
//! credits, and one audit row per write with the authenticated actor.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use apitree::console::authz::Role;
use apitree::console::{self, jwt::Keyring, throttle::Limits, Console, ConsoleMetrics};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

const PASSWORD: &str = "correct horse battery staple";
const SECRETS: &str =
    "k1:first-secret-of-at-least-32-bytes-000001,k2:second-secret-of-at-least-32-bytes-00002";
const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, base64

struct People {
    buyer: Uuid,
    seller: Uuid,
    admin: Uuid,
    super_admin: Uuid,
}

struct Env {
    _db: common::TestDb,
    pool: PgPool,
    base: String,
    http: reqwest::Client,
    org_a: Uuid,
    org_b: Uuid,
    people: People,
    server: Option<console::ConsoleServer>,
}

impl Env {
    async fn new() -> Env {
        Env::with_limits(Limits {
            per_account: 3,
            per_address: 1000,
            window: Duration::from_secs(60),
        })
        .await
    }

    async fn with_limits(limits: Limits) -> Env {
        Env::build(limits, None).await
    }

    /// A console serving TLS with `pki`'s `tls.crt` (signed by its private CA), which this
    /// Env's client trusts.
    async fn with_tls(pki: &common::pki::Pki) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = apitree::small_http::tls(
            &pki.path("tls.crt"),
            &pki.path("tls.key"),
            &prometheus::Registry::new(),
            "test",
        )
        .unwrap();
        Env::build(
            Limits {
                per_account: 3,
                per_address: 1000,
                window: Duration::from_secs(60),
            },
            Some((tls, pki.ca())),
        )
        .await
    }

    async fn build(
        limits: Limits,
        tls: Option<(Arc<apitree::proxy::tls::ServerTls>, Vec<u8>)>,
    ) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let db = common::TestDb::new().await;
        let pool = db.migrated_pool().await;
        let org_a = apitree::db::keys::create_org(&pool, "org-a", "test")
            .await
            .unwrap();
        let org_b = apitree::db::keys::create_org(&pool, "org-b", "test")
            .await
            .unwrap();
        let phc = apitree::console::password::hash(PASSWORD).unwrap();
        let user = |email: &'static str, role, org| {
            let (pool, phc) = (pool.clone(), phc.clone());
            async move {
                apitree::console::users::create(&pool, email, role, org, &phc, "test")
                    .await
                    .unwrap()
            }
        };
        let people = People {
            buyer: user("buyer@a.test", Role::Buyer, Some(org_a)).await,
            seller: user("seller@a.test", Role::Seller, Some(org_a)).await,
            admin: user("admin@ops.test", Role::Admin, None).await,
            super_admin: user("root@ops.test", Role::SuperAdmin, None).await,
        };
        // Org B has a seller, an API and a key of its own.
        user("seller@b.test", Role::Seller, Some(org_b)).await;
        let c = Arc::new(Console {
            pool: pool.clone(),
            keyring: Keyring::parse(SECRETS).unwrap(),
            session_ttl: Duration::from_secs(900),
            trusted_proxies: Vec::new(),
            egress: apitree::proxy::egress::EgressPolicy::default(),
            hashing: apitree::console::password::Gate::per_core(),
            throttle: console::throttle::Throttle::new(limits),
            pepper: Some(Arc::new(
                apitree::entities::keys::Pepper::new(b"pepper-0123456789-0123456789-0123".to_vec())
                    .unwrap(),
            )),
            master_keys: Some(Arc::new(
                apitree::entities::vault::MasterKeys::single(1, MASTER_KEY).unwrap(),
            )),
            metrics: ConsoleMetrics::new(),
            contacts: console::Contacts {
                security: Some(console::Contact::parse("security@ops.test").unwrap()),
                privacy: Some(console::Contact::parse("https://ops.test/privacy").unwrap()),
            },
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tls, http) = match tls {
            Some((tls, ca)) => (
                Some(tls),
                reqwest::Client::builder()
                    .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
                    .build()
                    .unwrap(),
            ),
            None => (None, reqwest::Client::new()),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = console::spawn(listener, c, tls).unwrap();
        let env = Env {
            base: format!("{scheme}://{}", server.addr),
            _db: db,
            pool,
            http,
            org_a,
            org_b,
            people,
            server: Some(server),
        };
        let sb = env.sign_in("seller@b.test").await;
        let (s, v) = env
            .call(
                &sb,
                "POST",
                &format!("orgs/{org_b}/apis"),
                Some(api_body("maps")),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, _) = env
            .call(
                &sb,
                "POST",
                &format!("orgs/{org_b}/keys"),
                Some(json!({"scope": "live"})),
            )
            .await;
        assert_eq!(s, 201);
        env
    }

    async fn sign_in(&self, email: &str) -> String {
        let (s, v) = self
            .call(
                "",
                "POST",
                "session",
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    async fn raw(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}/api/v1/{path}", self.base));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let r = self.raw(token, method, path, body).await;
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    async fn audit_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_log")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::spawn(s.stop());
        }
    }
}

fn api_body(name: &str) -> Value {
    json!({"name": name, "path_prefix": format!("/{name}"), "upstream_url": "http://93.184.215.14:9/"})
}

/// What a role may do with an endpoint: docs/console.md's matrix, written out independently of the
/// code's table.
#[derive(Clone, Copy, PartialEq, Debug)]
enum May {
    No,
    Own,
    Any,
}

/// One endpoint call: method, path, body, what buyer / seller / admin / super_admin may do,
/// whether it writes.
type Row = (&'static str, String, Option<Value>, [May; 4], bool);

/// Every endpoint × every role × (own org, another org): allowed calls succeed and write one
/// audit row naming the caller; tenant users get 404 for another org, refused roles 403; a
/// refusal writes nothing.
/// Every endpoint of the API, with a body it accepts: (method, path, body, who may call it
/// as buyer, seller, admin, super_admin, whether a success writes an audit row). `key` and
/// `api` are a key and an API of `org`; `n` makes names unique.
fn endpoints(
    env: &Env,
    org: Uuid,
    key: &str,
    api: &str,
    api_name: &str,
    n: usize,
    role: Role,
) -> Vec<Row> {
    use May::*;
    vec![
        (
            "GET",
            format!("orgs/{org}/keys"),
            None,
            [Own, Own, Any, Any],
            false,
        ),
        (
            "POST",
            format!("orgs/{org}/keys"),
            Some(json!({"scope": "live", "name": "k"})),
            [Own, Own, No, Any],
            true,
        ),
        (
            "POST",
            format!("orgs/{org}/keys/{key}/rotate"),
            Some(json!({"grace_seconds": 60})),
            [Own, Own, No, Any],
            true,
        ),
        (
            "POST",
            format!("orgs/{org}/credentials"),
            Some(
                json!({"api": "maps", "name": format!("byok-{n}"), "value": "s3cr3t-value", "kind": "byok"}),
            ),
            [Own, Own, No, Any],
            true,
        ),
        (
            "POST",
            format!("orgs/{org}/credentials"),
            Some(
                json!({"api": api_name, "name": format!("sys-{n}"), "value": "s3cr3t-value", "kind": "system"}),
            ),
            [No, Own, No, Any],
            true,
        ),
        (
            "GET",
            format!("orgs/{org}/credentials"),
            None,
            [Own, Own, No, Any],
            false,
        ),
        (
            "GET",
            format!("orgs/{org}/credentials/origin?api=maps"),
            None,
            [Own, Own, No, Any],
            false,
        ),
        (
            "GET",
            format!("orgs/{org}/apis"),
            None,
            [No, Own, Any, Any],
            false,
        ),
        (
            "POST",
            format!("orgs/{org}/apis"),
            Some(api_body(&format!("new-{n}"))),
            [No, Own, No, Any],
            true,
        ),
        (
            "PUT",
            format!("orgs/{org}/apis/{api}"),
            Some(
                json!({"name": api_name, "path_prefix": format!("/moved-{n}"), "upstream_url": "https://93.184.215.15/"}),
            ),
            [No, Own, No, Any],
            true,
        ),
        (
            "GET",
            format!("orgs/{org}/usage"),
            None,
            [Own, Own, Any, Any],
            false,
        ),
        (
            "GET",
            format!("orgs/{org}/credits"),
            None,
            [Own, Own, Any, Any],
            false,
        ),
        (
            "POST",
            format!("orgs/{org}/credits"),
            Some(json!({"amount": 100, "reason": "welcome credit"})),
            [No, No, Any, Any],
            true,
        ),
        (
            "POST",
            format!("orgs/{org}/keys/{key}/revoke"),
            None,
            [Own, Own, Any, Any],
            true,
        ),
        ("GET", "users".into(), None, [No, No, Any, Any], false),
        ("GET", "orgs".into(), None, [No, No, Any, Any], false),
        (
            "POST",
            "users".into(),
            Some(
                json!({"email": format!("new{n}-{}@a.test", role.as_str()), "role": "buyer", "org": env.org_a}),
            ),
            [No, No, Any, Any],
            true,
        ),
        ("GET", "audit".into(), None, [No, No, Any, Any], false),
    ]
}

#[tokio::test]
async fn every_endpoint_follows_the_role_matrix_for_every_role() {
    use May::*;
    let env = Env::new().await;
    let roles = [
        ("buyer@a.test", Role::Buyer, env.people.buyer),
        ("seller@a.test", Role::Seller, env.people.seller),
        ("admin@ops.test", Role::Admin, env.people.admin),
        ("root@ops.test", Role::SuperAdmin, env.people.super_admin),
    ];
    let mut n = 0;
    for (email, role, user_id) in roles {
        let token = env.sign_in(email).await;
        for org in [env.org_a, env.org_b] {
            let own = org == env.org_a;
            // A key and an API in `org` to act on, made by super_admin-free SQL-less means: the
            // org's seller (or org B's) through the API.
            let seller = env
                .sign_in(if own {
                    "seller@a.test"
                } else {
                    "seller@b.test"
                })
                .await;
            let (_, k) = env
                .call(
                    &seller,
                    "POST",
                    &format!("orgs/{org}/keys"),
                    Some(json!({"scope": "test"})),
                )
                .await;
            let key = k["id"].as_str().unwrap().to_string();
            n += 1;
            let api_name = format!("api-{n}");
            let (_, a) = env
                .call(
                    &seller,
                    "POST",
                    &format!("orgs/{org}/apis"),
                    Some(api_body(&api_name)),
                )
                .await;
            let api = a["api"]["id"].as_str().unwrap().to_string();
            let table = endpoints(&env, org, &key, &api, &api_name, n, role);
            for (method, path, body, may, writes) in table {
                let may = may[role as usize];
                let before = env.audit_rows().await;
                let (status, v) = env.call(&token, method, &path, body).await;
                let after = env.audit_rows().await;
                let what = format!("{} {method} {path} (own org: {own})", role.as_str());
                // Endpoints outside an org (users, orgs, audit) have no "other org".
                let scoped = path.starts_with("orgs/");
                let expect: u16 = match (may, own || !scoped, role.is_staff()) {
                    (Any, _, _) | (Own, true, _) => 0, // success
                    (_, false, false) => 404,
                    (No, true, false) | (No, _, true) => 403,
                    (Own, false, true) => unreachable!("staff never have Own"),
                };
                if expect == 0 {
                    assert!((200..300).contains(&status), "{what}: {status} {v}");
                    assert_eq!(after - before, i64::from(writes), "{what}: audit rows");
                    if writes {
                        let (actor, detail): (String, Value) = sqlx::query_as(
                            "SELECT actor, detail FROM audit_log ORDER BY id DESC LIMIT 1",
                        )
                        .fetch_one(&env.pool)
                        .await
                        .unwrap();
                        assert_eq!(actor, format!("user:{user_id}"), "{what}");
                        if !path.ends_with("/rotate") {
                            assert_eq!(detail["actor"]["role"], role.as_str(), "{what}");
                        }
                        let text = detail.to_string();
                        assert!(
                            !text.contains("s3cr3t-value"),
                            "{what}: a credential in the audit row"
                        );
                        if let Some(key) = v["key"].as_str() {
                            assert!(!text.contains(key), "{what}: the key in the audit row");
                        }
                    }
                } else {
                    assert_eq!(status, expect, "{what}: {v}");
                    assert_eq!(after, before, "{what}: a refusal wrote an audit row");
                    assert!(
                        v["request_id"].as_str().is_some_and(|r| !r.is_empty()),
                        "{what}: {v}"
                    );
                    assert!(
                        v["code"].is_string() && v["error"].is_string(),
                        "{what}: {v}"
                    );
                }
            }
        }
    }
}

/// No byte PostgreSQL cannot store turns a request into a server error: a NUL at either end
/// of any text field of any endpoint's body, or in a query parameter, is a 400 with the
/// request id that says what is wrong, and writes nothing.
#[tokio::test]
async fn a_nul_in_any_text_field_or_parameter_is_a_clear_400() {
    let env = Env::new().await;
    let root = env.sign_in("root@ops.test").await;
    let org = env.org_a;
    let (_, k) = env
        .call(
            &root,
            "POST",
            &format!("orgs/{org}/keys"),
            Some(json!({"scope": "test"})),
        )
        .await;
    let (_, a) = env
        .call(
            &root,
            "POST",
            &format!("orgs/{org}/apis"),
            Some(api_body("nul-api")),
        )
        .await;
    let (key, api) = (k["id"].as_str().unwrap(), a["api"]["id"].as_str().unwrap());
    let mut rows = endpoints(&env, org, key, api, "nul-api", 1, Role::SuperAdmin);
    for (method, path, body) in [
        (
            "POST",
            "session".to_string(),
            json!({"email": "root@ops.test", "password": PASSWORD}),
        ),
        (
            "POST",
            "invitations/accept".into(),
            json!({"token": "t0123456789", "password": PASSWORD}),
        ),
        (
            "PUT",
            format!("users/{}/role", env.people.buyer),
            json!({"role": "seller"}),
        ),
        ("GET", "me".into(), Value::Null),
    ] {
        let body = (!body.is_null()).then_some(body);
        rows.push((method, path, body, [May::Any; 4], false));
    }
    let mut fields = 0;
    for (method, path, body, _, _) in rows {
        let mut tries = vec![(format!("{path}?action=%00&org=x%00"), body.clone())];
        if let Some(Value::Object(map)) = &body {
            for (field, v) in map {
                let Value::String(text) = v else { continue };
                fields += 1;
                for nul in [format!("{text}\0"), format!("\0{text}")] {
                    let mut b = map.clone();
                    b.insert(field.clone(), Value::String(nul));
                    tries.push((path.clone(), Some(Value::Object(b))));
                }
            }
        }
        for (path, body) in tries {
            let before = env.audit_rows().await;
            let (status, v) = env.call(&root, method, &path, body.clone()).await;
            let what = format!("{method} {path} {body:?}");
            assert_eq!(status, 400, "{what}: {v}");
            assert!(
                v["error"].as_str().is_some_and(|e| e.contains("NUL")),
                "{what}: {v}"
            );
            assert!(
                v["request_id"].as_str().is_some_and(|r| !r.is_empty()),
                "{what}: {v}"
            );
            assert_eq!(env.audit_rows().await, before, "{what}: wrote an audit row");
        }
    }
    assert!(
        fields >= 15,
        "the table's bodies have text fields ({fields})"
    );
}

/// A tenant user cannot tell another org that exists from one that does not.
#[tokio::test]
async fn another_orgs_resources_are_404_like_nothing_at_all() {
    let env = Env::new().await;
    let buyer = env.sign_in("buyer@a.test").await;
    let b_key: Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE org_id = $1")
        .bind(env.org_b)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let nowhere = Uuid::new_v4();
    for (real, fake) in [
        (
            format!("orgs/{}/keys", env.org_b),
            format!("orgs/{nowhere}/keys"),
        ),
        (
            format!("orgs/{}/credits", env.org_b),
            format!("orgs/{nowhere}/credits"),
        ),
        (
            format!("orgs/{}/apis", env.org_b),
            format!("orgs/{nowhere}/apis"),
        ),
    ] {
        let (s1, v1) = env.call(&buyer, "GET", &real, None).await;
        let (s2, v2) = env.call(&buyer, "GET", &fake, None).await;
        assert_eq!(
            (s1, &v1["code"], &v1["error"]),
            (s2, &v2["code"], &v2["error"]),
            "{real}"
        );
        assert_eq!(s1, 404);
    }
    // A key of org B named under the buyer's own org is not found either, and stays active.
    let (s, _) = env
        .call(
            &buyer,
            "POST",
            &format!("orgs/{}/keys/{b_key}/revoke", env.org_a),
            None,
        )
        .await;
    assert_eq!(s, 404);
    let revoked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(b_key)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(revoked.is_none());
}

/// The second line of defence: with the application check skipped, the console's database
/// role still sees and writes only the org opened to its transaction.
#[tokio::test]
async fn the_database_refuses_another_orgs_rows_without_the_application_check() {
    let env = Env::new().await;
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL ROLE apitree_console; SET LOCAL row_security = on")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT set_config('apitree.org_id', $1, true)")
        .bind(env.org_a.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    let keys_b: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE org_id = $1")
        .bind(env.org_b)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(keys_b, 0, "org B's keys are invisible");
    for table in [
        "apis",
        "users",
        "credit_ledger",
        "audit_log",
        "upstream_credentials",
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE org_id IS DISTINCT FROM '{}'",
            env.org_a
        )))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(n, 0, "{table}: rows outside org A are visible");
    }
    // Writing into org B is refused by the policy's WITH CHECK.
    let e = sqlx::query(
        "INSERT INTO credit_ledger (org_id, amount, reason, actor) VALUES ($1, 1, 'x', 'x')",
    )
    .bind(env.org_b)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(e.to_string().contains("row-level security"), "{e}");
    tx.rollback().await.unwrap();

    // Credentials are write-only for the role: no ciphertext comes back.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL ROLE apitree_console; SET LOCAL row_security = on")
        .execute(&mut *tx)
        .await
        .unwrap();
    let e = sqlx::query("SELECT ciphertext FROM upstream_credentials")
        .fetch_all(&mut *tx)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    tx.rollback().await.unwrap();

    // Without an org opened, nothing at all.
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL ROLE apitree_console; SET LOCAL row_security = on")
        .execute(&mut *tx)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 0);
    tx.rollback().await.unwrap();
}

/// Tampered tokens at the API: each refused 401 with its reason, nothing served.
#[tokio::test]
async fn tampered_and_stale_tokens_are_refused_at_the_api() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let env = Env::new().await;
    let token = env.sign_in("buyer@a.test").await;
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    payload["role"] = json!("super_admin");
    let promoted = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(payload.to_string()),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","kid":"k2"}"#),
        parts[1]
    );
    let rs = format!(
        "{}.{}.{}",
        b64.encode(r#"{"alg":"RS256","kid":"k2"}"#),
        parts[1],
        parts[2]
    );
    let kid = format!(
        "{}.{}.{}",
        b64.encode(r#"{"alg":"HS256","kid":"k9"}"#),
        parts[1],
        parts[2]
    );
    let path = format!("orgs/{}/keys", env.org_a);
    for (what, t, code) in [
        ("role edited", promoted.as_str(), "token_signature"),
        ("alg none", none.as_str(), "token_algorithm"),
        ("RS256", rs.as_str(), "token_algorithm"),
        ("unknown kid", kid.as_str(), "token_unknown_key"),
        ("garbage", "abc", "token_malformed"),
        ("none at all", "", "unauthenticated"),
    ] {
        let (s, v) = env.call(t, "GET", &path, None).await;
        assert_eq!((s, v["code"].as_str()), (401, Some(code)), "{what}: {v}");
        assert!(
            !v.to_string().contains(&token[..20]),
            "{what}: the token is echoed"
        );
    }
    // The real token works, and the same role-edited token still cannot reach users.
    assert_eq!(env.call(&token, "GET", &path, None).await.0, 200);
    assert_eq!(env.call(&promoted, "GET", "users", None).await.0, 401);
    // The token was signed by the newest key.
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["kid"], "k2");
    assert_eq!(header["alg"], "HS256");
}

/// Disabling a user or changing their role takes effect at their next request.
#[tokio::test]
async fn a_disabled_user_or_a_changed_role_takes_effect_on_the_next_request() {
    let env = Env::new().await;
    let seller = env.sign_in("seller@a.test").await;
    let admin = env.sign_in("admin@ops.test").await;
    let apis = format!("orgs/{}/apis", env.org_a);
    assert_eq!(
        env.call(&seller, "POST", &apis, Some(api_body("first")))
            .await
            .0,
        201
    );
    let (s, v) = env
        .call(
            &admin,
            "PUT",
            &format!("users/{}/role", env.people.seller),
            Some(json!({"role": "buyer"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = env
        .call(&seller, "POST", &apis, Some(api_body("second")))
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    let buyer = env.sign_in("buyer@a.test").await;
    assert_eq!(
        env.call(&buyer, "GET", &format!("orgs/{}/keys", env.org_a), None)
            .await
            .0,
        200
    );
    let (s, _) = env
        .call(
            &admin,
            "POST",
            &format!("users/{}/disable", env.people.buyer),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = env
        .call(&buyer, "GET", &format!("orgs/{}/keys", env.org_a), None)
        .await;
    assert_eq!((s, v["code"].as_str()), (401, Some("session_revoked")));
    // And they cannot sign in again.
    let (s, _) = env
        .call(
            "",
            "POST",
            "session",
            Some(json!({"email": "buyer@a.test", "password": PASSWORD})),
        )
        .await;
    assert_eq!(s, 401);
    // An admin cannot touch staff, nor themselves; a super_admin can grant admin.
    let (s, _) = env
        .call(
            &admin,
            "PUT",
            &format!("users/{}/role", env.people.super_admin),
            Some(json!({"role": "buyer"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = env
        .call(
            &admin,
            "PUT",
            &format!("users/{}/role", env.people.seller),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = env
        .call(
            &admin,
            "POST",
            &format!("users/{}/disable", env.people.admin),
            None,
        )
        .await;
    assert_eq!(s, 403);
    let root = env.sign_in("root@ops.test").await;
    let (s, _) = env
        .call(
            &root,
            "PUT",
            &format!("users/{}/role", env.people.super_admin),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, 403, "nobody changes their own role");
    let (s, v) = env
        .call(
            &root,
            "PUT",
            &format!("users/{}/role", env.people.admin),
            Some(json!({"role": "super_admin"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (detail,): (Value,) = sqlx::query_as(
        "SELECT detail FROM audit_log WHERE action = 'user.role' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (detail["before"].as_str(), detail["after"].as_str()),
        (Some("admin"), Some("super_admin"))
    );
}

/// Failed sign-ins lock the account (any address) with 429 and Retry-After, before any
/// password is checked; they are counted as auth failures.
#[tokio::test]
async fn failed_sign_ins_are_throttled_and_counted() {
    let env = Env::new().await;
    for _ in 0..3 {
        let (s, v) = env
            .call(
                "",
                "POST",
                "session",
                Some(json!({"email": "buyer@a.test", "password": "wrong password!"})),
            )
            .await;
        assert_eq!((s, v["code"].as_str()), (401, Some("invalid_credentials")));
    }
    let r = env
        .raw(
            "",
            "POST",
            "session",
            Some(json!({"email": "BUYER@a.test", "password": PASSWORD})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Unknown emails answer exactly like wrong passwords.
    let (s, v) = env
        .call(
            "",
            "POST",
            "session",
            Some(json!({"email": "nobody@a.test", "password": PASSWORD})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (401, Some("invalid_credentials")));
    // Another account is unaffected.
    env.sign_in("seller@a.test").await;
    // The locked account under another spelling a database could fold into it (İ lower-cases
    // to i in PostgreSQL's C.UTF-8): not a way around the lock, with the right password too.
    for _ in 0..3 {
        let wrong = json!({"email": "admin@ops.test", "password": "wrong password, again"});
        assert_eq!(env.call("", "POST", "session", Some(wrong)).await.0, 401);
    }
    let right = json!({"email": "admin@ops.test", "password": PASSWORD});
    assert_eq!(env.call("", "POST", "session", Some(right)).await.0, 429);
    let folded = json!({"email": "admİn@ops.test", "password": PASSWORD});
    let (s, v) = env.call("", "POST", "session", Some(folded)).await;
    assert_eq!(s, 401, "{v}");
    let metrics = env
        .http
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"apitree_console_auth_failures_total{reason="login_invalid"} 8"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"apitree_console_auth_failures_total{reason="login_throttled"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"apitree_console_logins_total{result="ok"} "#));
    assert!(!metrics.contains(PASSWORD) && !metrics.contains("wrong password"));
}

/// A credential written in the console is sealed for (org, API) as the proxy reads it, and
/// never comes back.
#[tokio::test]
async fn credentials_are_sealed_for_the_proxy_and_never_readable() {
    let env = Env::new().await;
    let buyer = env.sign_in("buyer@a.test").await;
    let (s, v) = env
        .call(
            &buyer,
            "POST",
            &format!("orgs/{}/credentials", env.org_a),
            Some(json!({
            "api": "maps", "name": "mine", "value": "sk-live-123456", "kind": "byok"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(!v.to_string().contains("sk-live-123456"));
    let (version, nonce, ciphertext): (i32, Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT key_version, nonce, ciphertext FROM upstream_credentials WHERE name = 'mine'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let keys = apitree::entities::vault::MasterKeys::single(1, MASTER_KEY).unwrap();
    let sealed = apitree::entities::vault::Sealed {
        key_version: version as u32,
        nonce,
        ciphertext,
    };
    let plain = keys
        .decrypt("mine", &env.org_a.to_string(), "maps", &sealed)
        .unwrap();
    assert_eq!(plain.expose(), "sk-live-123456");
    // Bound to the org: under org B's name it does not open.
    assert!(keys
        .decrypt("mine", &env.org_b.to_string(), "maps", &sealed)
        .is_err());
    let (_, list) = env
        .call(
            &buyer,
            "GET",
            &format!("orgs/{}/credentials", env.org_a),
            None,
        )
        .await;
    assert!(
        !list.to_string().contains("sk-live") && list["credentials"][0]["name"] == "mine",
        "{list}"
    );
    assert_eq!(list["credentials"][0]["upstream_changed"], false, "{list}");

    // The seller moves the API to another server: the buyer's secret is bound to the old one
    // (the gateway holds it back), and the buyer's list says so without showing the seller's
    // upstream. Writing it again binds it to the new server.
    let seller_b = env.sign_in("seller@b.test").await;
    let maps: Uuid = sqlx::query_scalar("SELECT id FROM apis WHERE name = 'maps'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let listed = |token: String| {
        let env = &env;
        async move {
            let (s, v) = env
                .call(
                    &token,
                    "GET",
                    &format!("orgs/{}/credentials", env.org_a),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{v}");
            assert!(
                !v.to_string().contains("/v2"),
                "no seller's path shown: {v}"
            );
            v["credentials"][0].clone()
        }
    };
    for (upstream, changed, goes_to) in [
        (
            "http://93.184.215.14:9/v2/",
            false,
            "http://93.184.215.14:9",
        ),
        ("https://93.184.215.14:9/", true, "https://93.184.215.14:9"),
        ("http://93.184.215.99:80/", true, "http://93.184.215.99"),
        ("http://93.184.215.14:9", false, "http://93.184.215.14:9"),
    ] {
        let (s, v) = env
            .call(
                &seller_b,
                "PUT",
                &format!("orgs/{}/apis/{maps}", env.org_b),
                Some(json!({"name": "maps", "path_prefix": "/maps", "upstream_url": upstream})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let row = listed(buyer.clone()).await;
        assert_eq!(
            (
                &row["upstream_changed"],
                &row["sent_to"],
                &row["api_goes_to"],
                &row["api"]
            ),
            (
                &json!(changed),
                &json!("http://93.184.215.14:9"),
                &json!(goes_to),
                &json!("maps")
            ),
            "moved to {upstream}: {row}"
        );
    }
    let (s, _) = env
        .call(
            &seller_b,
            "PUT",
            &format!("orgs/{}/apis/{maps}", env.org_b),
            Some(json!({"name": "maps", "path_prefix": "/maps", "upstream_url": "http://93.184.215.99:9/"})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(listed(buyer.clone()).await["upstream_changed"], true);
    // A rewrite that expects another server than the API's now is refused and changes
    // nothing; one that expects the shown server binds to it.
    let rewrite = |expect: &str| {
        let (env, buyer) = (&env, buyer.clone());
        let body = json!({"api": "maps", "name": "mine", "value": "sk-live-654321", "kind": "byok",
                          "expect_origin": expect});
        async move {
            env.call(
                &buyer,
                "POST",
                &format!("orgs/{}/credentials", env.org_a),
                Some(body),
            )
            .await
        }
    };
    let (s, v) = rewrite(&format!("http://{}", "a".repeat(300))).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    let (s, v) = rewrite("http://93.184.215.14:9").await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("upstream_moved")),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("http://93.184.215.99:9"),
        "{v}"
    );
    assert_eq!(listed(buyer.clone()).await["upstream_changed"], true);
    let (s, v) = rewrite("http://93.184.215.99:9").await;
    assert_eq!(
        (s, &v["sent_to"]),
        (201, &json!("http://93.184.215.99:9")),
        "{v}"
    );
    let consented: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT detail->>'sent_to' FROM audit_log WHERE action = 'credential.write' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        consented,
        [
            Some("http://93.184.215.14:9".into()),
            Some("http://93.184.215.99:9".into())
        ],
        "the audit log says where each written secret goes"
    );
    assert_eq!(
        listed(buyer.clone()).await["upstream_changed"],
        false,
        "written again for the new server"
    );
    let bound: Option<String> =
        sqlx::query_scalar("SELECT bound_upstream FROM upstream_credentials WHERE name = 'mine'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(bound.as_deref(), Some("http://93.184.215.99:9/"));

    // A seller flipping the API between two servers while the buyer keeps writing, always
    // expecting the first: every write that is stored is bound to the first, so the last
    // binding is too (a check before the write, not of the binding, loses this race).
    let deadline = Instant::now() + Duration::from_secs(2);
    let flip = async {
        let mut n = 0;
        while Instant::now() < deadline {
            n += 1;
            let url = if n % 2 == 0 {
                "http://93.184.215.99:9/"
            } else {
                "http://93.184.215.66:9/"
            };
            let (s, v) = env
                .call(
                    &seller_b,
                    "PUT",
                    &format!("orgs/{}/apis/{maps}", env.org_b),
                    Some(json!({"name": "maps", "path_prefix": "/maps", "upstream_url": url})),
                )
                .await;
            assert_eq!(s, 200, "{v}");
        }
    };
    let write = || async {
        let (mut stored, mut refused) = (0, 0);
        while Instant::now() < deadline {
            let (s, v) = rewrite("http://93.184.215.99:9").await;
            match s {
                201 => {
                    assert_eq!(v["sent_to"], "http://93.184.215.99:9", "{v}");
                    stored += 1;
                }
                409 => refused += 1,
                _ => panic!("{s} {v}"),
            }
        }
        (stored, refused)
    };
    let (_, a, b) = tokio::join!(flip, write(), write());
    assert!(
        a.0 + b.0 > 0 && a.1 + b.1 > 0,
        "both outcomes happened: {a:?} {b:?}"
    );
    let bound: Option<String> =
        sqlx::query_scalar("SELECT bound_upstream FROM upstream_credentials WHERE name = 'mine'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        bound.as_deref(),
        Some("http://93.184.215.99:9/"),
        "never bound to the other server"
    );
    // A value that would split a header is refused; a system credential for another org's
    // API is not found.
    let seller = env.sign_in("seller@a.test").await;
    for (body, code) in [
        (
            json!({"api": "maps", "name": "x", "value": "a\r\nX-Evil: 1", "kind": "byok"}),
            400,
        ),
        (
            json!({"api": "maps", "name": "x", "value": "v", "kind": "system"}),
            404,
        ),
        (
            json!({"api": "nope", "name": "x", "value": "v", "kind": "byok"}),
            404,
        ),
        (
            json!({"api": "maps", "name": "x", "value": "v", "kind": "root"}),
            400,
        ),
    ] {
        let (s, v) = env
            .call(
                &seller,
                "POST",
                &format!("orgs/{}/credentials", env.org_a),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, code, "{body}: {v}");
    }
}

/// An admin invites; the person sets a password once; the invitation cannot be used twice.
#[tokio::test]
async fn invitations_set_a_password_once() {
    let env = Env::new().await;
    let admin = env.sign_in("admin@ops.test").await;
    let (s, v) = env
        .call(
            &admin,
            "POST",
            "users",
            Some(json!({"email": "new@a.test", "role": "seller", "org": env.org_a})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let token = v["invitation"].as_str().unwrap().to_string();
    let (s, _) = env
        .call(
            "",
            "POST",
            "invitations/accept",
            Some(json!({"token": token, "password": "short"})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, v) = env
        .call(
            "",
            "POST",
            "invitations/accept",
            Some(json!({"token": token, "password": PASSWORD})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let seller = env.sign_in("new@a.test").await;
    assert_eq!(
        env.call(&seller, "GET", &format!("orgs/{}/apis", env.org_a), None)
            .await
            .0,
        200
    );
    let (s, _) = env
        .call(
            "",
            "POST",
            "invitations/accept",
            Some(json!({"token": token, "password": "another long password"})),
        )
        .await;
    assert_eq!(s, 404);
    // Staff invitations: only a super_admin grants admin; a duplicate email conflicts.
    let (s, _) = env
        .call(
            &admin,
            "POST",
            "users",
            Some(json!({"email": "boss@ops.test", "role": "admin"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = env
        .call(
            &admin,
            "POST",
            "users",
            Some(json!({"email": "NEW@a.test", "role": "buyer", "org": env.org_a})),
        )
        .await;
    assert_eq!(s, 409);
}

/// Credits: adjustments by admin with a reason, the balance from the ledger, never below zero,
/// the ledger append-only.
#[tokio::test]
async fn credits_are_an_append_only_ledger() {
    let env = Env::new().await;
    let admin = env.sign_in("admin@ops.test").await;
    let path = format!("orgs/{}/credits", env.org_a);
    assert_eq!(
        env.call(
            &admin,
            "POST",
            &path,
            Some(json!({"amount": 500, "reason": "prepaid"}))
        )
        .await
        .0,
        201
    );
    assert_eq!(
        env.call(
            &admin,
            "POST",
            &path,
            Some(json!({"amount": -200, "reason": "refund"}))
        )
        .await
        .0,
        201
    );
    let (s, v) = env
        .call(
            &admin,
            "POST",
            &path,
            Some(json!({"amount": -301, "reason": "too much"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("balance_negative")));
    for bad in [
        json!({"amount": 0, "reason": "x"}),
        json!({"amount": 5, "reason": "  "}),
        json!({"amount": 5}),
    ] {
        assert_eq!(
            env.call(&admin, "POST", &path, Some(bad.clone())).await.0,
            400,
            "{bad}"
        );
    }
    let buyer = env.sign_in("buyer@a.test").await;
    let (s, v) = env.call(&buyer, "GET", &path, None).await;
    assert_eq!((s, v["balance"].as_i64()), (200, Some(300)), "{v}");
    assert_eq!(v["ledger"].as_array().unwrap().len(), 2);
    let e = sqlx::query("UPDATE credit_ledger SET amount = 1000000")
        .execute(&env.pool)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    // The audit page shows who did it, by email.
    let (_, audit) = env
        .call(&admin, "GET", "audit?action=credits.adjust", None)
        .await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(
        entries.iter().all(|e| e["actor_email"] == "admin@ops.test"),
        "{audit}"
    );
}

/// Every response carries the security headers; API responses are not cached; errors are
/// JSON with the request id; bodies must be JSON.
#[tokio::test]
async fn responses_carry_security_headers_and_json_errors() {
    let env = Env::new().await;
    // HEAD answers like GET, without the body.
    let head = env
        .http
        .head(format!("{}/", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-frame-options"], "DENY");
    assert!(head.bytes().await.unwrap().is_empty());
    let page = env.http.get(format!("{}/", env.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers();
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<script src=\"/app.js\""));
    let r = env
        .http
        .post(format!("{}/api/v1/session", env.base))
        .header("x-request-id", "req-42")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=a&password=b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["request_id"], "req-42");
    let (s, v) = env
        .call("", "POST", "session", Some(json!({"email": "a@b.c"})))
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("password"), "{v}");
    let (s, v) = env.call("", "DELETE", "session", None).await;
    assert_eq!((s, v["code"].as_str()), (405, Some("method_not_allowed")));
    let (s, _) = env.call("", "GET", "nothing/here", None).await;
    assert_eq!(s, 404);
    let big = "x".repeat(70 * 1024);
    let (s, _) = env
        .call(
            "",
            "POST",
            "session",
            Some(json!({"email": big, "password": "p"})),
        )
        .await;
    assert_eq!(s, 413);
}

/// Headless Chromium (which `scripts/test` installs) driven over the DevTools protocol.
struct Browser {
    child: std::process::Child,
    _profile: tempfile::TempDir,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Browser {
    async fn start() -> Browser {
        let chromium =
            std::env::var("APITREE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&chromium).exists(),
            "{chromium} not found: scripts/test installs Debian's chromium (or set APITREE_CHROMIUM)"
        );
        let profile = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let port_file = profile.path().join("DevToolsActivePort");
        let mut port = String::new();
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                if let Some(p) = text.lines().next().filter(|p| !p.is_empty()) {
                    port = p.to_string();
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!port.is_empty(), "chromium did not open its DevTools port");
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Browser {
            child,
            _profile: profile,
            ws,
            next: 0,
        }
    }

    async fn send(&mut self, method: &str, params: Value) -> Value {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next += 1;
        let id = self.next;
        self.ws
            .send(Message::text(
                json!({"id": id, "method": method, "params": params}).to_string(),
            ))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("DevTools answers within 20 s")
                .unwrap()
                .unwrap();
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Runs `js` in the page (awaiting a promise) and returns its value.
    async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .send(
                "Runtime.evaluate",
                json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `js` until it returns true.
    async fn until(&mut self, what: &str, js: &str) {
        for _ in 0..100 {
            if self.eval(js).await == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let error = self
            .eval("document.getElementById('error').textContent")
            .await;
        panic!("{what}: not within 10 s (page error: {error})");
    }

    async fn open(&mut self, url: &str) {
        self.send("Page.navigate", json!({"url": url})).await;
        self.until(
            "page loaded",
            &format!("location.href.startsWith({url:?}) && document.readyState === 'complete' && typeof start === 'function'"),
        )
        .await;
    }

    async fn sign_in(&mut self, base: &str, email: &str) -> Vec<String> {
        // Forget the last session before the page loads, or its start() races this sign-in.
        self.eval("try { sessionStorage.clear() } catch (e) {} true")
            .await;
        self.open(&format!("{base}/")).await;
        self.eval(&format!(
            "document.getElementById('email').value = {email:?}; \
             document.getElementById('password').value = {PASSWORD:?}; \
             document.getElementById('signin-form').requestSubmit(); true"
        ))
        .await;
        self.until("signed in", "!document.getElementById('tabs').hidden && document.querySelectorAll('#tabs button').length > 0")
            .await;
        serde_json::from_value(
            self.eval("[...document.querySelectorAll('#tabs button')].map(b => b.textContent)")
                .await,
        )
        .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The web page in a real browser: each role signs in and sees only its pages; a buyer
/// creates a key (shown once); an admin adjusts credits; the audit page shows both with the
/// right people. Runs under the console's CSP (no inline script).
#[tokio::test]
async fn each_role_sees_its_pages_in_a_browser_and_the_audit_page_shows_who_acted() {
    let env = Env::new().await;
    let mut b = Browser::start().await;
    for (email, pages) in [
        ("buyer@a.test", vec!["Keys", "Credentials"]),
        ("seller@a.test", vec!["Keys", "APIs", "Credentials"]),
        (
            "admin@ops.test",
            vec!["Users", "Credits", "Audit", "Customer operations"],
        ),
        (
            "root@ops.test",
            vec![
                "Keys",
                "APIs",
                "Credentials",
                "Users",
                "Credits",
                "Audit",
                "Customer operations",
            ],
        ),
    ] {
        assert_eq!(b.sign_in(&env.base, email).await, pages, "{email}");
    }

    b.sign_in(&env.base, "buyer@a.test").await;
    b.eval(
        "document.getElementById('key-name').value = 'from the browser'; \
         document.getElementById('key-scope').value = 'live'; \
         document.getElementById('key-form').requestSubmit(); true",
    )
    .await;
    b.until(
        "the new key is shown",
        "document.getElementById('key-shown').textContent.includes('at_live_') && document.querySelectorAll('#keys tbody tr').length === 1",
    )
    .await;
    let shown = b
        .eval("document.getElementById('key-shown').textContent")
        .await;
    let prefix: String =
        sqlx::query_scalar("SELECT prefix FROM api_keys WHERE name = 'from the browser'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(shown.as_str().unwrap().contains(&prefix), "{shown}");

    // The buyer's own credential: the page says where it goes before storing it, says when
    // the API has moved, and a rewrite expects the server it showed (the seller moves the API
    // again meanwhile: refused, nothing rebound; the next press shows the new server first).
    let move_maps = |url: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query("UPDATE apis SET upstream_url = $1 WHERE name = 'maps'")
                .bind(url)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let write_byok = "document.getElementById('cred-api').value = 'maps'; \
         document.getElementById('cred-name').value = 'own'; \
         document.getElementById('cred-value').value = 'sk-browser-123'; \
         document.getElementById('cred-kind').value = 'byok'; \
         document.getElementById('cred-form').requestSubmit(); true";
    b.eval("document.getElementById('tab-credentials').click(); true")
        .await;
    b.eval(write_byok).await;
    b.until(
        "the page says where the secret would go, before storing it",
        "document.getElementById('cred-shown').textContent.includes('will be sent to http://93.184.215.14:9.')",
    )
    .await;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM upstream_credentials WHERE name = 'own'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stored, 0, "nothing stored before the buyer confirms");
    b.eval(write_byok).await;
    b.until(
        "the page says where the secret goes",
        "document.getElementById('cred-shown').textContent === 'Stored: sent only to http://93.184.215.14:9' \
         && document.querySelector('#creds tbody').textContent.includes('in use')",
    )
    .await;
    move_maps("http://93.184.215.99/").await;
    b.eval("document.getElementById('tab-credentials').click(); true")
        .await;
    b.until(
        "the page says the API moved",
        "document.querySelector('#creds tbody').textContent.includes('held back: the API now sends to http://93.184.215.99;')",
    )
    .await;
    move_maps("http://93.184.215.77/").await;
    b.eval(write_byok).await;
    b.until(
        "the rewrite is refused",
        "document.getElementById('error').textContent.includes('now sends to http://93.184.215.77')",
    )
    .await;
    let bound: String =
        sqlx::query_scalar("SELECT bound_upstream FROM upstream_credentials WHERE name = 'own'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(bound, "http://93.184.215.14:9/", "nothing rebound");
    b.eval(write_byok).await;
    b.until(
        "the page shows the new server first",
        "document.getElementById('cred-shown').textContent.includes('will be sent to http://93.184.215.77.')",
    )
    .await;
    b.eval(write_byok).await;
    b.until(
        "stored for the server the buyer saw",
        "document.getElementById('cred-shown').textContent === 'Stored: sent only to http://93.184.215.77'",
    )
    .await;

    b.sign_in(&env.base, "admin@ops.test").await;
    b.eval("document.getElementById('tab-credits').click(); true")
        .await;
    b.until(
        "orgs listed",
        "document.querySelectorAll('#credit-org option').length === 2",
    )
    .await;
    b.eval(&format!(
        "document.getElementById('credit-org').value = '{}'; \
         document.getElementById('credit-amount').value = '250'; \
         document.getElementById('credit-reason').value = 'browser goodwill'; \
         document.getElementById('credit-form').requestSubmit(); true",
        env.org_a
    ))
    .await;
    b.until(
        "the balance shows the adjustment",
        "document.getElementById('balance').textContent === '250'",
    )
    .await;
    b.eval("document.getElementById('tab-audit').click(); true")
        .await;
    b.until(
        "the audit page lists the credit",
        "document.querySelector('#audit tbody').textContent.includes('credits.adjust')",
    )
    .await;
    let rows: Vec<Vec<String>> = serde_json::from_value(
        b.eval("[...document.querySelectorAll('#audit tbody tr')].map(r => [...r.children].map(c => c.textContent))")
            .await,
    )
    .unwrap();
    let find = |action: &str| rows.iter().find(|r| r[3] == action).cloned();
    assert_eq!(
        find("credits.adjust").map(|r| r[2].clone()).as_deref(),
        Some("admin@ops.test"),
        "{rows:?}"
    );
    assert_eq!(
        find("key.create").map(|r| r[2].clone()).as_deref(),
        Some("buyer@a.test"),
        "{rows:?}"
    );
}

/// Review findings, each a class: a credential cannot set a framing or routing header; an API
/// name is unique across orgs and never changes; an invited admin can activate.
#[tokio::test]
async fn credentials_api_names_and_staff_invitations_hold_their_rules() {
    let env = Env::new().await;
    let buyer = env.sign_in("buyer@a.test").await;
    let creds = format!("orgs/{}/credentials", env.org_a);
    for header in [
        "content-length",
        "transfer-encoding",
        "host",
        "x-forwarded-for",
        "x-request-id",
        "connection",
    ] {
        let (s, v) = env
            .call(&buyer, "POST", &creds, Some(json!({"api": "maps", "name": "k", "value": "0", "kind": "byok", "header": header})))
            .await;
        assert_eq!(s, 400, "{header}: {v}");
    }
    for name in [" ", "a b", "", "ü"] {
        let (s, _) = env
            .call(
                &buyer,
                "POST",
                &creds,
                Some(json!({"api": "maps", "name": name, "value": "v", "kind": "byok"})),
            )
            .await;
        assert_eq!(s, 400, "{name:?}");
    }
    let (s, v) = env
        .call(&buyer, "POST", &creds, Some(json!({"api": "maps", "name": "k", "value": "v", "kind": "byok", "header": "X-Api-Key", "value_prefix": ""})))
        .await;
    assert_eq!(s, 201, "{v}");

    let seller = env.sign_in("seller@a.test").await;
    let apis = format!("orgs/{}/apis", env.org_a);
    let (s, v) = env
        .call(&seller, "POST", &apis, Some(api_body("maps")))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("conflict")),
        "another org's API name: {v}"
    );
    let (s, v) = env
        .call(&seller, "POST", &apis, Some(api_body("weather")))
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["api"]["id"].as_str().unwrap().to_string();
    let (s, v) = env
        .call(
            &seller,
            "PUT",
            &format!("{apis}/{id}"),
            Some(api_body("climate")),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("name_fixed")), "{v}");

    let root = env.sign_in("root@ops.test").await;
    let (s, v) = env
        .call(
            &root,
            "POST",
            "users",
            Some(json!({"email": "second@ops.test", "role": "admin"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = env
        .call(
            "",
            "POST",
            "invitations/accept",
            Some(json!({"token": v["invitation"], "password": PASSWORD})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    env.sign_in("second@ops.test").await;
}

/// A seller cannot register a prefix that takes another seller's traffic, nor an upstream
/// inside the gateway's network; an org holds one credential of each kind per API.
#[tokio::test]
async fn sellers_cannot_take_anothers_traffic_or_point_the_gateway_inward() {
    let env = Env::new().await;
    let seller = env.sign_in("seller@a.test").await;
    let apis = format!("orgs/{}/apis", env.org_a);
    let register = |name: &str, prefix: &str, url: &str| json!({"name": name, "path_prefix": prefix, "upstream_url": url});
    const PUBLIC: &str = "http://93.184.215.14/";
    // Org B owns /maps. Every prefix a call to /maps… could match is refused.
    for (prefix, taken) in [
        ("/maps", true),
        ("/maps/", true),
        ("/maps/v2", true),
        ("/maps/v2/", true),
        ("/mapsx", false),
        ("/map", false),
        ("/other/maps", false),
    ] {
        let name = format!("p{}", prefix.len() * 10 + usize::from(taken));
        let (s, v) = env
            .call(
                &seller,
                "POST",
                &apis,
                Some(register(&name, prefix, PUBLIC)),
            )
            .await;
        if taken {
            assert_eq!(
                (s, v["code"].as_str()),
                (409, Some("path_prefix_taken")),
                "{prefix}: {v}"
            );
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("another seller's API"),
                "{v}"
            );
        } else {
            assert_eq!(s, 201, "{prefix}: {v}");
        }
    }
    // Within one org, nesting is the seller's choice; the same prefix twice is not.
    for (name, prefix, want) in [
        ("shop", "/shop", 201),
        ("shop-v2", "/shop/v2", 201),
        ("shop-again", "/shop", 409),
    ] {
        let (s, v) = env
            .call(&seller, "POST", &apis, Some(register(name, prefix, PUBLIC)))
            .await;
        assert_eq!(s, want, "{name} {prefix}: {v}");
    }

    // Upstreams inside the gateway's network, however written.
    for url in [
        "http://127.0.0.1:8080/",
        "http://localhost/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00:ec2::254]/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://0.0.0.0/",
        "http://2130706433/",
        "http://0x7f.1/",
        "https://100.64.0.1/",
        "http://[::127.0.0.1]/",
        "http://[64:ff9b:1::7f00:1]/",
        "http://[2002:7f00:1::]/",
    ] {
        let (s, v) = env
            .call(
                &seller,
                "POST",
                &apis,
                Some(register("inward", "/inward", url)),
            )
            .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("upstream_refused")),
            "{url}: {v}"
        );
    }
    let (s, v) = env
        .call(
            &seller,
            "POST",
            &apis,
            Some(register(
                "nowhere",
                "/nowhere",
                "http://no-such-host.invalid/",
            )),
        )
        .await;
    assert_eq!(s, 400, "an upstream that does not resolve: {v}");
    // What the gateway could not read is not saved, whatever a lenient parser makes of it.
    for url in [
        "http://93.184.215.14/a b",
        "http://1.1.1.1\\@127.0.0.1/",
        "http://1.1.1.1/\tx",
    ] {
        let (s, v) = env
            .call(&seller, "POST", &apis, Some(register("odd", "/odd", url)))
            .await;
        assert_eq!(s, 400, "{url:?}: {v}");
    }
    let (s, v) = env
        .call(&seller, "POST", &apis, Some(register("all", "/", PUBLIC)))
        .await;
    assert_eq!(s, 400, "/ takes every path: {v}");

    // One BYOK credential per org and API: writing again replaces it.
    let buyer = env.sign_in("buyer@a.test").await;
    let creds = format!("orgs/{}/credentials", env.org_a);
    for name in ["first", "second"] {
        let byok = json!({"api": "maps", "name": name, "value": "v", "kind": "byok"});
        let (s, v) = env.call(&buyer, "POST", &creds, Some(byok)).await;
        assert_eq!(s, 201, "{v}");
    }
    let (_, v) = env.call(&buyer, "GET", &creds, None).await;
    let names: Vec<&str> = v["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["second"]);
}

/// The operator's status data answers an admin's console session only while the console says
/// that admin is enabled and still staff: a disabled admin is refused at the next request,
/// not when the token expires.
#[tokio::test]
async fn the_operators_status_data_follows_the_console_on_every_request() {
    use apitree::operator::http::{ConsoleLink, HttpState, Viewers};
    let env = Env::new().await;
    let mut state = HttpState::new(
        Arc::new(apitree::operator::metrics::OperatorMetrics::new()),
        None,
    );
    state.viewers = Some(
        Viewers::new(
            Keyring::parse(SECRETS).unwrap(),
            Some(ConsoleLink::new(env.base.parse().unwrap(), None).unwrap()),
        )
        .uncached(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = apitree::operator::http::spawn(listener, Arc::new(state), None);
    let status = |token: String| {
        let http = env.http.clone();
        async move {
            http.get(format!("http://{addr}/api/gateways"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let admin = env.sign_in("admin@ops.test").await;
    let seller = env.sign_in("seller@a.test").await;
    assert_eq!(status(admin.clone()).await, 200);
    assert_eq!(status(seller).await, 403);
    let root = env.sign_in("root@ops.test").await;
    let (s, v) = env
        .call(
            &root,
            "POST",
            &format!("users/{}/disable", env.people.admin),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        status(admin).await,
        403,
        "the disabled admin's token still verifies, the console says no"
    );
}

/// A console whose certificate a private CA signed: the operator confirms sessions and
/// scrapes its metrics when `APITREE_CONSOLE_CA_FILE` names that CA, and does not trust it
/// otherwise (the status data answers 503, never a session it could not confirm).
#[tokio::test]
async fn the_operator_trusts_a_console_signed_by_a_private_ca_only_when_told() {
    use apitree::operator::console_watch::ConsoleWatch;
    use apitree::operator::http::{ConsoleLink, HttpState, Viewers};
    let pki = common::pki::Pki::serving();
    let env = Env::with_tls(&pki).await;
    assert!(env.base.starts_with("https://"));
    let admin = env.sign_in("admin@ops.test").await;
    let url: reqwest::Url = env.base.parse().unwrap();
    let trusting = ConsoleLink::new(url.clone(), Some(&pki.ca())).unwrap();
    let system_cas = ConsoleLink::new(url.clone(), None).unwrap();
    let e = ConsoleLink::new(url, Some(b"not a certificate"))
        .err()
        .unwrap();
    assert!(e.contains("no PEM certificate"), "{e}");

    for (link, want) in [(trusting.clone(), 200), (system_cas.clone(), 503)] {
        let mut state = HttpState::new(
            Arc::new(apitree::operator::metrics::OperatorMetrics::new()),
            None,
        );
        state.viewers = Some(Viewers::new(Keyring::parse(SECRETS).unwrap(), Some(link)).uncached());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = apitree::operator::http::spawn(listener, Arc::new(state), None);
        let status = reqwest::Client::new()
            .get(format!("http://{addr}/api/gateways"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, want);
    }
    let watch = |link: &ConsoleLink| {
        ConsoleWatch::new(
            link,
            &Default::default(),
            Arc::new(apitree::detect::engine::IncidentStore::memory()),
            Arc::new(apitree::notify::Notifier::recording()),
        )
        .unwrap()
    };
    let at = chrono::Utc::now().timestamp();
    assert!(
        watch(&trusting).tick(at).await.is_ok(),
        "metrics are scraped"
    );
    let e = watch(&system_cas).tick(at).await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

/// A password-guessing run against the console is an auth-failure spike the operator's
/// detector scores like a gateway's: quiet windows with the odd typo open nothing, the run
/// opens an incident for the console, and the notice goes where gateways' go (Slack).
#[tokio::test]
async fn a_password_guessing_run_opens_an_auth_failure_incident_for_the_console() {
    use apitree::detect::engine::{IncidentStore, AUTH_FAILURES};
    use apitree::operator::console_watch::{ConsoleWatch, CONSOLE};
    let env = Env::with_limits(Limits {
        per_account: 10_000,
        per_address: 10_000,
        window: Duration::from_secs(60),
    })
    .await;
    let notifier = Arc::new(apitree::notify::Notifier::recording());
    let spec = apitree::crd::gateway::DetectionSpec {
        min_requests: 20,
        ..Default::default()
    };
    let mut watch = ConsoleWatch::new(
        &apitree::operator::http::ConsoleLink::new(env.base.parse().unwrap(), None).unwrap(),
        &spec,
        Arc::new(IncidentStore::memory()),
        notifier.clone(),
    )
    .unwrap();
    let token = env.sign_in("buyer@a.test").await;
    let keys = format!("orgs/{}/keys", env.org_a);
    let wrong = || {
        env.call(
            "",
            "POST",
            "session",
            Some(json!({"email": "buyer@a.test", "password": "not the password at all"})),
        )
    };
    let t0 = chrono::Utc::now().timestamp() - 3600;
    assert!(
        watch.tick(t0).await.unwrap().is_empty(),
        "the first scrape primes"
    );
    for i in 1..=4 {
        for _ in 0..40 {
            assert_eq!(env.call(&token, "GET", &keys, None).await.0, 200);
        }
        assert_eq!(wrong().await.0, 401, "a typo");
        let notices = watch.tick(t0 + i * 300).await.unwrap();
        assert!(notices.is_empty(), "a quiet window: {notices:?}");
    }
    for _ in 0..40 {
        env.call(&token, "GET", &keys, None).await;
    }
    for _ in 0..60 {
        assert_eq!(wrong().await.0, 401);
    }
    let notices = watch.tick(t0 + 5 * 300).await.unwrap();
    let opened = notices
        .iter()
        .find(|n| n.signal == AUTH_FAILURES)
        .unwrap_or_else(|| panic!("no auth-failure incident in {notices:?}"));
    assert_eq!(opened.gateway, CONSOLE);
    assert!(opened.ratio >= 3.0, "{opened:?}");
    assert!(
        notifier
            .recorded()
            .iter()
            .any(|n| n.signal == AUTH_FAILURES),
        "the notice was delivered"
    );
}

/// A person's data, through the console: every role × whom (themselves, a buyer, an admin, a
/// super_admin) × export / erase, answered as the matrix says; an export carries the person's
/// data, an erasure ends their sessions, the queue lists both and the chain still verifies.
#[tokio::test]
async fn personal_data_export_and_erasure_follow_who_may_touch_whom() {
    let env = Env::new().await;
    let phc = apitree::console::password::hash(PASSWORD).unwrap();
    let mut n = 0;
    // A fresh target of `role` per cell, so an erasure in one cell changes no other.
    let mut fresh = |role: Role| {
        n += 1;
        let (pool, phc, org) = (env.pool.clone(), phc.clone(), env.org_a);
        async move {
            let email = format!("target{n}-{}@a.test", role.as_str());
            let org = (!role.is_staff()).then_some(org);
            let id = apitree::console::users::create(&pool, &email, role, org, &phc, "test")
                .await
                .unwrap();
            (id, email)
        }
    };
    let callers = [
        ("buyer@a.test", env.people.buyer),
        ("seller@a.test", env.people.seller),
        ("admin@ops.test", env.people.admin),
        ("root@ops.test", env.people.super_admin),
    ];
    // (whom, action, status for buyer / seller / admin / super_admin)
    let table: [(&str, &str, [u16; 4]); 8] = [
        ("self", "export", [200, 200, 200, 200]),
        ("buyer", "export", [403, 403, 200, 200]),
        ("admin", "export", [403, 403, 403, 200]),
        ("super_admin", "export", [403, 403, 403, 200]),
        ("self", "erase", [403, 403, 403, 403]),
        ("buyer", "erase", [403, 403, 200, 200]),
        ("admin", "erase", [403, 403, 403, 200]),
        // The database refuses to erase a super_admin, whoever asks.
        ("super_admin", "erase", [403, 403, 403, 409]),
    ];
    for (i, (email, me)) in callers.iter().enumerate() {
        let token = env.sign_in(email).await;
        for (whom, action, want) in &table {
            let (id, target_email) = match *whom {
                "self" => (*me, email.to_string()),
                "buyer" => fresh(Role::Buyer).await,
                "admin" => fresh(Role::Admin).await,
                _ => fresh(Role::SuperAdmin).await,
            };
            let before = env.audit_rows().await;
            let (s, v) = if *action == "export" {
                env.call(&token, "GET", &format!("users/{id}/export"), None)
                    .await
            } else {
                env.call(
                    &token,
                    "POST",
                    &format!("users/{id}/erase"),
                    Some(json!({"reason": "ticket 7: account closed", "confirm": id})),
                )
                .await
            };
            assert_eq!(s, want[i], "{email} {action} {whom}: {v}");
            let written = env.audit_rows().await - before;
            if s == 200 || s == 409 {
                // Done, or refused by the database: either way recorded (and queued).
                assert_eq!(written, 1, "{email} {action} {whom}: one audit row");
            } else {
                assert_eq!(
                    written, 0,
                    "{email} {action} {whom}: refused, nothing written"
                );
                assert!(
                    v["error"].as_str().is_some() && v["request_id"].is_string(),
                    "{v}"
                );
            }
            match (*action, s) {
                ("export", 200) => {
                    assert_eq!(v["profile"]["email"], target_email.as_str(), "{v}");
                    assert_eq!(v["profile"]["id"], id.to_string());
                    assert!(!v.to_string().contains("argon2"), "a hash exported: {v}");
                }
                ("erase", 200) => {
                    let (s, _) = env
                        .call(
                            "",
                            "POST",
                            "session",
                            Some(json!({"email": target_email, "password": PASSWORD})),
                        )
                        .await;
                    assert_eq!(s, 401, "an erased person cannot sign in");
                }
                _ => {}
            }
        }
    }
    // Only staff name other identities; an erasure must say whom twice; unknown people are 404.
    let buyer = env.sign_in("buyer@a.test").await;
    let (s, v) = env
        .call(
            &buyer,
            "GET",
            &format!("users/{}/export?identity=slack:U1", env.people.buyer),
            None,
        )
        .await;
    assert_eq!(s, 403, "{v}");
    // Naming an identity reaches whoever holds it: super_admins only.
    let admin = env.sign_in("admin@ops.test").await;
    let (s, v) = env
        .call(
            &admin,
            "GET",
            &format!("users/{}/export?identity=slack:U1", env.people.buyer),
            None,
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let root = env.sign_in("root@ops.test").await;
    let (s, v) = env
        .call(
            &root,
            "GET",
            &format!("users/{}/export?identity=slack:U1", env.people.buyer),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (target, _) = fresh(Role::Buyer).await;
    for (body, code) in [
        (
            json!({"reason": "x", "confirm": env.people.buyer}),
            "invalid_request",
        ),
        (json!({"reason": "x"}), "invalid_request"),
        (json!({"reason": " ", "confirm": target}), "invalid_request"),
    ] {
        let (s, v) = env
            .call(&admin, "POST", &format!("users/{target}/erase"), Some(body))
            .await;
        assert_eq!((s, v["code"].as_str()), (400, Some(code)), "{v}");
    }
    let (s, v) = env
        .call(
            &root,
            "GET",
            &format!("users/{target}/export?identity=bogus"),
            None,
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let nobody = Uuid::new_v4();
    let (s, _) = env
        .call(&admin, "GET", &format!("users/{nobody}/export"), None)
        .await;
    assert_eq!(s, 404);
    // The queue, for staff only.
    let (s, v) = env.call(&admin, "GET", "dsar/requests", None).await;
    assert_eq!(s, 200, "{v}");
    let kinds: Vec<&str> = v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "erased").count(), 3, "{v}");
    assert_eq!(kinds.iter().filter(|k| **k == "exported").count(), 9, "{v}");
    assert_eq!(kinds.iter().filter(|k| **k == "refused").count(), 1, "{v}");
    let (s, _) = env.call(&buyer, "GET", "dsar/requests", None).await;
    assert_eq!(s, 403);
    // Logging a request: staff only, a known person, export or erase.
    let body =
        |user: Uuid, kind: &str| Some(json!({"user": user, "kind": kind, "note": "ticket 1"}));
    let (s, _) = env
        .call(
            &buyer,
            "POST",
            "dsar/requests",
            body(env.people.buyer, "export"),
        )
        .await;
    assert_eq!(s, 403);
    let (s, v) = env
        .call(
            &admin,
            "POST",
            "dsar/requests",
            body(env.people.buyer, "delete"),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = env
        .call(
            &admin,
            "POST",
            "dsar/requests",
            body(Uuid::new_v4(), "export"),
        )
        .await;
    assert_eq!(s, 404);
    let (s, v) = env
        .call(
            &admin,
            "POST",
            "dsar/requests",
            body(env.people.buyer, "export"),
        )
        .await;
    assert_eq!((s, v["state"].as_str()), (201, Some("received")), "{v}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["audit", "verify", "--database-url", &env._db.url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Customer operations page in a real browser: anyone downloads their own data; an admin
/// exports a buyer's, then erases them in two steps (the email typed again), and the queue shows
/// both requests; the erased buyer cannot sign in.
#[tokio::test]
async fn customer_operations_exports_and_erases_in_two_steps_in_a_browser() {
    let env = Env::new().await;
    let mut b = Browser::start().await;
    // The footer names where reports and requests go, before anyone signs in.
    b.eval("try { sessionStorage.clear() } catch (e) {} true")
        .await;
    b.open(&format!("{}/", env.base)).await;
    b.until(
        "footer",
        "[...document.querySelectorAll('#contacts a')].map(a => a.href).join(' ') === 'mailto:security@ops.test https://ops.test/privacy'",
    )
    .await;
    // Downloads are captured instead of saved.
    let capture =
        "window.__got = []; download = (name, doc) => window.__got.push([name, doc]); true";
    b.sign_in(&env.base, "buyer@a.test").await;
    b.eval(capture).await;
    b.eval("document.getElementById('mydata').click(); true")
        .await;
    b.until("own data downloaded", "window.__got.length === 1")
        .await;
    let mine = b.eval("window.__got[0]").await;
    assert_eq!(mine[0], "apitree-my-data.json");
    assert_eq!(mine[1]["profile"]["email"], "buyer@a.test", "{mine}");

    b.sign_in(&env.base, "admin@ops.test").await;
    b.eval(capture).await;
    b.eval("document.getElementById('tab-ops').click(); true")
        .await;
    // The request arrives by email: logged, it waits in the queue.
    b.eval(
        "document.getElementById('ops-email').value = 'BUYER@a.test'; \
         document.getElementById('ops-log-kind').value = 'erase'; \
         document.getElementById('ops-log-note').value = 'email of 3 Dec'; \
         document.getElementById('ops-log-form').requestSubmit(); true",
    )
    .await;
    b.until(
        "the logged request is open",
        "(() => { const r = document.querySelector('#dsar tbody tr'); return !!r && r.cells[1].textContent === 'erase' && r.cells[2].textContent === 'received' && r.cells[3].textContent === 'buyer@a.test'; })()",
    )
    .await;
    b.eval("document.getElementById('ops-form').requestSubmit(); true")
        .await;
    b.until("export downloaded", "window.__got.length === 1")
        .await;
    let doc = b.eval("window.__got[0][1]").await;
    assert_eq!(doc["profile"]["email"], "buyer@a.test", "{doc}");
    // Step one names the person and what happens; a wrong email in step two erases nothing.
    b.eval("document.getElementById('ops-erase').click(); true")
        .await;
    b.until(
        "confirmation shown",
        "!document.getElementById('ops-confirm').hidden && document.getElementById('ops-confirm-what').textContent.includes('buyer@a.test')",
    )
    .await;
    b.eval(
        "document.getElementById('ops-confirm-email').value = 'seller@a.test'; \
         document.getElementById('ops-reason').value = 'ticket 9: account closed'; \
         document.getElementById('ops-confirm-form').requestSubmit(); true",
    )
    .await;
    b.until(
        "refused",
        "document.getElementById('error').textContent.includes('type the email')",
    )
    .await;
    let erased: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE erased_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(erased, 0);
    b.eval(
        "document.getElementById('ops-confirm-email').value = 'buyer@a.test'; \
         document.getElementById('ops-confirm-form').requestSubmit(); true",
    )
    .await;
    b.until(
        "erased",
        "document.getElementById('ops-shown').textContent.startsWith('Erased:')",
    )
    .await;
    b.until(
        "the queue shows both requests",
        "(() => { const rows = [...document.querySelectorAll('#dsar tbody tr')]; \
          return rows.map(r => r.cells[1].textContent + '/' + r.cells[2].textContent).join(' ') === 'export/exported erase/erased export/exported' \
            && rows[0].cells[6].textContent === 'admin@ops.test' && rows[1].cells[6].textContent === 'admin@ops.test' \
            && rows[2].cells[6].textContent.endsWith('@erased.invalid'); })()",
    )
    .await;
    let (s, _) = env
        .call(
            "",
            "POST",
            "session",
            Some(json!({"email": "buyer@a.test", "password": PASSWORD})),
        )
        .await;
    assert_eq!(s, 401, "an erased buyer cannot sign in");
}

/// A buyer sees each key's calls today and what is left of its daily quota (from the usage the
/// gateways report).
#[tokio::test]
async fn keys_show_todays_calls_and_the_quota_left() {
    let env = Env::new().await;
    let buyer = env.sign_in("buyer@a.test").await;
    let org = env.org_a;
    let (s, k) = env
        .call(
            &buyer,
            "POST",
            &format!("orgs/{org}/keys"),
            Some(json!({"scope": "live", "name": "q", "daily_quota": 100})),
        )
        .await;
    assert_eq!(s, 201, "{k}");
    let id: Uuid = k["id"].as_str().unwrap().parse().unwrap();
    sqlx::query(
        "INSERT INTO usage_counters (org_id, api_key_id, window_start, requests) VALUES
           ($1, $2, date_trunc('day', now(), 'UTC'), 30),
           ($1, $2, date_trunc('day', now(), 'UTC') - interval '1 day', 99)",
    )
    .bind(org)
    .bind(id)
    .execute(&env.pool)
    .await
    .unwrap();
    let (s, v) = env
        .call(&buyer, "GET", &format!("orgs/{org}/keys"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let key = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.to_string())
        .unwrap();
    assert_eq!(
        (key["today"].clone(), key["quota_left"].clone()),
        (json!(30), json!(70)),
        "{key}"
    );
}
