//! Database mode against the real PostgreSQL: keys created, revoked and rotated with the admin
//! commands take effect in a running proxy through LISTEN/NOTIFY; losing the database keeps the
//! last good configuration serving.

mod common;

use std::time::Duration;

use apitree::crd::gateway::KeyScope;
use apitree::db::keys as dbkeys;
use common::eventually;
use common::gateway::*;
use common::TestDb;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

struct DbGateway {
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(
    tdb: &TestDb,
    pool: &PgPool,
    upstream: std::net::SocketAddr,
    org: Uuid,
) -> DbGateway {
    register_api(pool, upstream, org).await;
    start_proxy(tdb).await
}

/// One API with an encrypted system credential, as an admin would register it.
async fn register_api(pool: &PgPool, upstream: std::net::SocketAddr, org: Uuid) {
    let api = Uuid::new_v4();
    sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, 'weather', '/weather/', $3)")
        .bind(api)
        .bind(org)
        .bind(format!("http://{upstream}/"))
        .execute(pool)
        .await
        .unwrap();
    store_credential(pool, org, "weather", "vendor", "system", UPSTREAM_SECRET)
        .await
        .unwrap();
}

/// A database-mode proxy on `tdb` with a file that names no route, its sellers' upstreams
/// allowed on loopback (where the tests' upstreams listen).
async fn start_proxy(tdb: &TestDb) -> DbGateway {
    start_proxy_allowing(tdb, vec!["127.0.0.0/8".parse().unwrap()]).await
}

async fn start_proxy_allowing(tdb: &TestDb, upstream_allow: Vec<ipnet::IpNet>) -> DbGateway {
    start_proxy_with(tdb, upstream_allow, "").await
}

/// A database-mode proxy whose file adds `routes` (YAML list items) of the gateway's own.
async fn start_proxy_with(
    tdb: &TestDb,
    upstream_allow: Vec<ipnet::IpNet>,
    routes: &str,
) -> DbGateway {
    let (dir, cfg) = config_dir(routes);
    let opts = apitree::proxy::ProxyOptions {
        database_url: Some(tdb.url.clone()),
        upstream_allow,
        ..proxy_options(cfg)
    };
    let p = apitree::proxy::prepare(&opts)
        .await
        .expect("database mode starts");
    let (addr, admin) = (
        p.listener.local_addr().unwrap(),
        p.admin.local_addr().unwrap(),
    );
    tokio::spawn(apitree::proxy::transport::workers::run(
        p.gateway,
        p.listener,
        p.admin,
        std::future::pending(),
        p.settings,
    ));
    DbGateway {
        addr,
        admin,
        _dir: dir,
    }
}

/// A proxy file (pepper, master key, a `std` tier, the given `routes`) in a directory of its
/// own: (the directory, the file).
fn config_dir(routes: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pepper"), PEPPER).unwrap();
    std::fs::write(dir.path().join("master"), format!("1:{MASTER_KEY_B64}\n")).unwrap();
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(
        &cfg,
        format!("secrets: {{ pepperFile: pepper, masterKeyFile: master }}\ntiers:\n  - {{ name: std, perKey: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }}, perOrg: {{ burst10s: 1000, perMinute: 10000, perDay: 100000 }} }}\ndefaultTier: std\nroutes:{}\n", if routes.is_empty() { " []".to_string() } else { format!("\n{routes}") }),
    )
    .unwrap();
    (dir, cfg)
}

async fn status(gw: &DbGateway, key: &str) -> u16 {
    client()
        .get(format!("http://{}/weather/today", gw.addr))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn readiness(gw: &DbGateway) -> Value {
    client()
        .get(format!("http://{}/readyz", gw.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn key_lifecycle_reaches_a_running_proxy_and_is_audited() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let up = start_upstream().await;
    let org = dbkeys::create_org(&pool, "acme", "test:alice")
        .await
        .unwrap();
    let first = dbkeys::create_key(
        &pool,
        &pepper(),
        dbkeys::NewKey {
            org,
            scope: KeyScope::Live,
            tier: "gold",
            daily_quota: None,
            name: "ci",
        },
        "test:alice",
    )
    .await
    .unwrap();
    let gw = start(&tdb, &pool, up.addr.unwrap(), org).await;
    assert_eq!(
        status(&gw, first.key.expose_secret()).await,
        200,
        "a key from the database works (unknown tier → default)"
    );
    let resp: Value = client()
        .get(format!("http://{}/weather/x", gw.addr))
        .bearer_auth(first.key.expose_secret())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        resp["headers"]["authorization"],
        format!("Bearer {UPSTREAM_SECRET}")
    );

    // A key created while the proxy runs works without a restart.
    let second = dbkeys::create_key(
        &pool,
        &pepper(),
        dbkeys::NewKey {
            org,
            scope: KeyScope::Test,
            tier: "std",
            daily_quota: Some(5),
            name: "",
        },
        "test:bob",
    )
    .await
    .unwrap();
    let k2 = second.key.expose_secret().to_string();
    eventually("the new key is accepted", || async {
        status(&gw, &k2).await == 200
    })
    .await;

    // Rotation: both keys work during the grace period.
    let rotation = dbkeys::rotate_key(
        &pool,
        &pepper(),
        first.id,
        chrono::Duration::hours(24),
        chrono::Utc::now(),
        "test:alice",
    )
    .await
    .unwrap()
    .unwrap();
    let k3 = rotation.new.key.expose_secret().to_string();
    eventually("the rotated-in key is accepted", || async {
        status(&gw, &k3).await == 200
    })
    .await;
    assert_eq!(
        status(&gw, first.key.expose_secret()).await,
        200,
        "the old key is valid during its grace period"
    );
    // A grace period that has ended refuses the old key.
    sqlx::query("UPDATE api_keys SET grace_until = now() - interval '1 second' WHERE id = $1")
        .bind(first.id)
        .execute(&pool)
        .await
        .unwrap();
    let k1 = first.key.expose_secret().to_string();
    eventually("the old key is refused after its grace", || async {
        status(&gw, &k1).await == 401
    })
    .await;

    // Revocation takes effect at once.
    dbkeys::revoke_key(&pool, second.id, "test:bob")
        .await
        .unwrap()
        .unwrap();
    eventually("the revoked key is refused", || async {
        status(&gw, &k2).await == 401
    })
    .await;

    let actions: Vec<(String, String, String)> =
        sqlx::query_as("SELECT actor, action, target FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let names: Vec<&str> = actions.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(
        names,
        [
            "org.create",
            "key.create",
            "key.create",
            "key.rotate",
            "key.revoke"
        ]
    );
    assert_eq!(actions[4].0, "test:bob");
    assert_eq!(
        actions[4].2,
        &k2[..16],
        "the audit target is the key prefix, never the key"
    );
    let audit_text: String =
        sqlx::query_scalar("SELECT string_agg(detail::text, ' ') FROM audit_log")
            .fetch_one(&pool)
            .await
            .unwrap();
    for k in [&k1, &k2, &k3] {
        assert!(
            !audit_text.contains(k.as_str()),
            "a key leaked into the audit log"
        );
    }
}

#[tokio::test]
async fn losing_the_database_keeps_the_last_config_and_degrades_readiness() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let up = start_upstream().await;
    let org = dbkeys::create_org(&pool, "acme", "test").await.unwrap();
    let key = live_key(&pool, org).await;
    let gw = start(&tdb, &pool, up.addr.unwrap(), org).await;
    assert_eq!(readiness(&gw).await["database"], "ok");
    pool.close().await;

    // Take the database away: refuse new connections and end the existing ones.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", common::server_url()))
        .await
        .unwrap();
    let name = tdb.name.clone();
    common::exec(
        &admin,
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
    )
    .await
    .unwrap();
    common::exec(
        &admin,
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    )
    .await
    .unwrap();
    eventually("readiness reports the database degraded", || async {
        readiness(&gw).await["database"] == "degraded"
    })
    .await;
    let ready = readiness(&gw).await;
    assert_eq!(ready["status"], "degraded");
    assert_eq!(
        status(&gw, &key).await,
        200,
        "the last good configuration keeps serving"
    );

    // Bring it back: the proxy reconnects, reloads and is ready again.
    common::exec(
        &admin,
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    )
    .await
    .unwrap();
    let pool = tdb.pool().await;
    let later = live_key(&pool, org).await;
    eventually("the database is ok again", || async {
        readiness(&gw).await["database"] == "ok"
    })
    .await;
    eventually("a key created after the outage works", || async {
        status(&gw, &later).await == 200
    })
    .await;
}

/// A fresh install: a database-mode proxy whose database has no API registered yet starts (it
/// used to refuse: "at least one route is needed"), says so in `/readyz` (ready, zero routes),
/// answers requests (a JSON error with its request id), and serves an API once it is
/// registered.
#[tokio::test]
async fn a_database_mode_proxy_starts_with_no_api_and_picks_one_up_when_registered() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let gw = start_proxy(&tdb).await;
    let ready = readiness(&gw).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["config"]["routes"], 0, "{ready}");
    let r = client()
        .get(format!("http://{}/weather/today", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no key, no API: refused, not dropped");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["request_id"].is_string() || body["requestId"].is_string(),
        "{body}"
    );

    let up = start_upstream().await;
    let org = Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'acme')")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    register_api(&pool, up.addr.unwrap(), org).await;
    eventually("the registered API is served", || async {
        readiness(&gw).await["config"]["routes"] == 1
    })
    .await;
}

/// A live key of `org`.
async fn live_key(pool: &PgPool, org: Uuid) -> String {
    let issued = dbkeys::create_key(
        pool,
        &pepper(),
        dbkeys::NewKey {
            org,
            scope: KeyScope::Live,
            tier: "std",
            daily_quota: None,
            name: "",
        },
        "test",
    )
    .await
    .unwrap();
    issued.key.expose_secret().to_string()
}

/// Seals `value` for `org` on API `api` and stores it as a credential of `kind`.
async fn store_credential(
    pool: &PgPool,
    org: Uuid,
    api: &str,
    name: &str,
    kind: &str,
    value: &str,
) -> Result<(), sqlx::Error> {
    let sealed = master_keys().encrypt(&org.to_string(), api, value);
    sqlx::query(
        "INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version)
         SELECT $1, $2, id, $3, $4::credential_kind, $5, $6, 1 FROM apis WHERE name = $7",
    )
    .bind(Uuid::new_v4())
    .bind(org)
    .bind(name)
    .bind(kind)
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .bind(api)
    .execute(pool)
    .await
    .map(|_| ())
}

#[tokio::test]
async fn the_credential_a_call_carries_depends_on_the_callers_org_never_on_a_name() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let up = start_upstream().await;
    let seller = dbkeys::create_org(&pool, "seller", "test").await.unwrap();
    let byok_buyer = dbkeys::create_org(&pool, "beta", "test").await.unwrap();
    let plain_buyer = dbkeys::create_org(&pool, "gamma", "test").await.unwrap();
    // The seller's system credential is named "vendor"; the buyer's BYOK one sorts before it.
    let gw = start(&tdb, &pool, up.addr.unwrap(), seller).await;
    store_credential(&pool, byok_buyer, "weather", "aaa", "byok", BYOK_SECRET)
        .await
        .unwrap();
    let (byok_key, plain_key) = (
        live_key(&pool, byok_buyer).await,
        live_key(&pool, plain_buyer).await,
    );
    let sent = |key: String| {
        let url = format!("http://{}/weather/x", gw.addr);
        async move {
            let resp = client().get(url).bearer_auth(key).send().await.unwrap();
            let body: Value = resp.json().await.unwrap_or_default();
            body["headers"]["authorization"].as_str().map(String::from)
        }
    };
    eventually("the BYOK buyer's own credential is sent", || async {
        sent(byok_key.clone()).await == Some(format!("Bearer {BYOK_SECRET}"))
    })
    .await;
    eventually(
        "a buyer without BYOK gets the seller's system credential",
        || async { sent(plain_key.clone()).await == Some(format!("Bearer {UPSTREAM_SECRET}")) },
    )
    .await;

    // The database refuses what would make the choice ambiguous or hand it to another org.
    let e = store_credential(&pool, byok_buyer, "weather", "second", "byok", "x")
        .await
        .unwrap_err();
    assert_eq!(
        e.as_database_error().unwrap().code().as_deref(),
        Some("23505"),
        "a second BYOK credential for one org and API: {e}"
    );
    let e = store_credential(&pool, plain_buyer, "weather", "mine", "system", "x")
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("a system credential must belong to the org that owns the API"),
        "a system credential for another org's API: {e}"
    );
    let e = store_credential(&pool, seller, "weather", "other", "system", "x")
        .await
        .unwrap_err();
    assert_eq!(
        e.as_database_error().unwrap().code().as_deref(),
        Some("23505"),
        "a second system credential for one API: {e}"
    );
    assert_eq!(
        sent(plain_key.clone()).await,
        Some(format!("Bearer {UPSTREAM_SECRET}"))
    );

    // An API without a system credential: a buyer's BYOK credential is that buyer's and does
    // not turn the API off for everyone else.
    let open = Uuid::new_v4();
    sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, 'open', '/open/', $3)")
        .bind(open)
        .bind(seller)
        .bind(format!("http://{}/", up.addr.unwrap()))
        .execute(&pool)
        .await
        .unwrap();
    store_credential(&pool, byok_buyer, "open", "mine", "byok", BYOK_SECRET)
        .await
        .unwrap();
    let call_open = |key: String| {
        let url = format!("http://{}/open/x", gw.addr);
        async move {
            let resp = client().get(url).bearer_auth(key).send().await.unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or_default();
            (
                status,
                body["headers"]["authorization"].as_str().map(String::from),
            )
        }
    };
    eventually(
        "the BYOK buyer's credential is sent to the open API",
        || async {
            call_open(byok_key.clone()).await == (200, Some(format!("Bearer {BYOK_SECRET}")))
        },
    )
    .await;
    assert_eq!(call_open(plain_key).await, (200, None), "others pass bare");
}

/// `GET /weather/x` with `key`: the status and the JSON body (the upstream's echo, or the
/// gateway's error).
async fn call_weather(gw: &DbGateway, key: &str) -> (u16, Value) {
    let resp = client()
        .get(format!("http://{}/weather/x", gw.addr))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// The marketplace most tests start from: a seller's API "weather" on `upstream` with its
/// system credential, a buyer with their own (BYOK) credential for it, and a buyer without;
/// a live key for each buyer.
struct Market {
    seller: Uuid,
    buyer: Uuid,
    plain_buyer: Uuid,
    byok_key: String,
    plain_key: String,
}

async fn market(pool: &PgPool, upstream: &Upstream) -> Market {
    let seller = dbkeys::create_org(pool, "seller", "test").await.unwrap();
    let buyer = dbkeys::create_org(pool, "beta", "test").await.unwrap();
    let plain_buyer = dbkeys::create_org(pool, "gamma", "test").await.unwrap();
    register_api(pool, upstream.addr.unwrap(), seller).await;
    store_credential(pool, buyer, "weather", "mine", "byok", BYOK_SECRET)
        .await
        .unwrap();
    Market {
        seller,
        buyer,
        plain_buyer,
        byok_key: live_key(pool, buyer).await,
        plain_key: live_key(pool, plain_buyer).await,
    }
}

/// A buyer's own (BYOK) secret goes only to the server it was written for. A seller who
/// repoints their API at another host (their own, say) does not receive it: that buyer's calls
/// get 503 and never reach the new host, until the buyer writes the credential again. A new
/// path on the same server, a rewrite of the ciphertext alone (as a master-key rotation does)
/// and the seller's own system credential are unaffected.
#[tokio::test]
async fn a_seller_who_moves_their_api_elsewhere_does_not_receive_buyers_own_secrets() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let (vendor, elsewhere) = (start_upstream().await, start_upstream().await);
    let Market {
        seller,
        buyer,
        byok_key: key,
        plain_key,
        ..
    } = market(&pool, &vendor).await;
    let gw = start_proxy(&tdb).await;
    // (status, path the upstream saw or error code, authorization the upstream saw)
    let call = |key: String| {
        let gw = &gw;
        async move {
            let (status, body) = call_weather(gw, &key).await;
            let at = body["path"]
                .as_str()
                .or(body["code"].as_str())
                .map(String::from);
            let sent = body["headers"]["authorization"].as_str().map(String::from);
            (status, at, sent)
        }
    };
    let own = |path: &str| {
        (
            200,
            Some(path.to_string()),
            Some(format!("Bearer {BYOK_SECRET}")),
        )
    };
    let move_api = |url: String| {
        let pool = pool.clone();
        async move {
            sqlx::query("UPDATE apis SET upstream_url = $1 WHERE name = 'weather'")
                .bind(url)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let hits = |u: &Upstream| u.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(call(key.clone()).await, own("/x"));

    // Another path on the same server: still the buyer's server.
    let vendor_addr = vendor.addr.unwrap();
    move_api(format!("http://{vendor_addr}/v2")).await;
    eventually(
        "a new path on the same server keeps the buyer's secret",
        || async { call(key.clone()).await == own("/v2/x") },
    )
    .await;

    // The seller moves the API to another server: the buyer's calls stop there, before it.
    move_api(format!("http://{}/", elsewhere.addr.unwrap())).await;
    let held = (
        503,
        Some("upstream_credential_unavailable".to_string()),
        None,
    );
    eventually("the moved API holds the buyer's secret back", || async {
        call(key.clone()).await == held
    })
    .await;
    let before = hits(&elsewhere);
    let (_, body) = call_weather(&gw, &key).await;
    assert!(
        body["error"].as_str().unwrap().contains("write it again"),
        "the buyer is told what to do: {body}"
    );
    assert_eq!(
        hits(&elsewhere),
        before,
        "the new server never saw the buyer's call"
    );
    assert_eq!(readiness(&gw).await["config"]["skipped"]["credentials"], 1);
    // The seller's own credential goes where the seller points it.
    assert_eq!(
        call(plain_key.clone()).await,
        (
            200,
            Some("/x".into()),
            Some(format!("Bearer {UPSTREAM_SECRET}"))
        )
    );
    let before = before + 1;
    assert_eq!(hits(&elsewhere), before);

    // Rewriting only the ciphertext (a master-key rotation does) does not rebind it, nor does
    // naming a binding by hand on insert.
    sqlx::query(
        "UPDATE upstream_credentials SET ciphertext = ciphertext, nonce = nonce, updated_at = now()
          WHERE kind = 'byok'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let third = dbkeys::create_org(&pool, "delta", "test").await.unwrap();
    let sealed = master_keys().encrypt(&third.to_string(), "weather", BYOK_SECRET);
    sqlx::query(
        "INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version, bound_upstream)
         SELECT $1, $2, id, 'mine', 'byok', $3, $4, 1, 'http://somewhere.else/' FROM apis WHERE name = 'weather'",
    )
    .bind(Uuid::new_v4())
    .bind(third)
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .execute(&pool)
    .await
    .unwrap();
    let bound: std::collections::HashSet<(Uuid, String, Option<String>)> =
        sqlx::query_as("SELECT org_id, kind::text, bound_upstream FROM upstream_credentials")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        bound,
        [
            (buyer, "byok".into(), Some(format!("http://{vendor_addr}/"))),
            (
                third,
                "byok".into(),
                Some(format!("http://{}/", elsewhere.addr.unwrap()))
            ),
            (seller, "system".into(), None),
        ]
        .into_iter()
        .collect(),
        "bound by the database to what the API was when each secret was written"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call(key.clone()).await, held);
    assert_eq!(hits(&elsewhere), before);

    // The buyer writes it again (the console clears the binding): now it goes to the new
    // server, with the buyer's consent.
    sqlx::query("UPDATE upstream_credentials SET bound_upstream = NULL WHERE org_id = $1")
        .bind(buyer)
        .execute(&pool)
        .await
        .unwrap();
    eventually(
        "written again, the secret goes to the API's server",
        || async { call(key.clone()).await == own("/x") },
    )
    .await;
    assert_eq!(hits(&elsewhere), before + 1);
}

/// Rows the schema allows (or allowed before a constraint) that the gateway cannot use are
/// skipped one at a time: a time no date type can hold does not fail the snapshot, and a
/// credential that would break a request head, or that no master key opens, costs only the
/// calls that would carry it: a 503 (an error the detector counts), never a bare call, and
/// its API stays served to everyone else.
#[tokio::test]
async fn rows_the_gateway_cannot_use_cost_only_the_calls_that_need_them() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let up = start_upstream().await;
    let Market {
        seller,
        plain_buyer,
        byok_key,
        plain_key,
        ..
    } = market(&pool, &up).await;
    let (forever, ended, far) = (
        live_key(&pool, plain_buyer).await,
        live_key(&pool, plain_buyer).await,
        live_key(&pool, plain_buyer).await,
    );
    let set_key = |key: &str, sql: &'static str| {
        let (pool, prefix) = (pool.clone(), key[..16].to_string());
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE api_keys SET {sql} WHERE $1 LIKE prefix || '%'"
            )))
            .bind(prefix)
            .execute(&pool)
            .await
            .map(|r| assert_eq!(r.rows_affected(), 1))
        }
    };
    // Written now, such rows are refused with the reason.
    let e = set_key(&forever, "expires_at = 'infinity'")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("api_keys_times_readable"), "{e}");
    let bad_prefix = "UPDATE upstream_credentials SET value_prefix = E'Bearer\\r\\nX-Injected: 1 ' WHERE kind = 'system'";
    let e = sqlx::query(bad_prefix).execute(&pool).await.unwrap_err();
    assert_eq!(
        e.as_database_error().and_then(|d| d.constraint()),
        Some("upstream_credentials_header_text"),
        "{e}"
    );
    // With the rules dropped (by hand, say), such rows are written, and loaded anyway.
    sqlx::raw_sql(
        "ALTER TABLE api_keys DROP CONSTRAINT api_keys_times_readable;
         DROP TRIGGER upstream_credentials_header_text ON upstream_credentials",
    )
    .execute(&pool)
    .await
    .unwrap();
    set_key(&forever, "expires_at = 'infinity'").await.unwrap();
    set_key(&ended, "grace_until = '-infinity'").await.unwrap();
    set_key(&far, "expires_at = '200000-01-01'").await.unwrap();

    let gw = start_proxy(&tdb).await;
    let call = |key: String| {
        let gw = &gw;
        async move {
            let (status, body) = call_weather(gw, &key).await;
            let sent = body["headers"]["authorization"].as_str().map(String::from);
            let code = body["code"].as_str().map(String::from);
            (status, sent.or(code))
        }
    };
    let system = || (200, Some(format!("Bearer {UPSTREAM_SECRET}")));
    let own = || (200, Some(format!("Bearer {BYOK_SECRET}")));
    let unavailable = || (503, Some("upstream_credential_unavailable".to_string()));
    assert_eq!(
        call(forever.clone()).await,
        system(),
        "'infinity' never ends"
    );
    assert_eq!(call(far.clone()).await, system(), "year 200000 is far away");
    assert_eq!(status(&gw, &ended).await, 401, "'-infinity' has passed");
    assert_eq!(call(plain_key.clone()).await, system());
    assert_eq!(call(byok_key.clone()).await, own());

    // The seller's credential would split the request head: its calls get 503, not a bare
    // call and not a 404; the BYOK buyer's calls go on.
    let hits = |u: &Upstream| u.hits.load(std::sync::atomic::Ordering::SeqCst);
    sqlx::query(bad_prefix).execute(&pool).await.unwrap();
    eventually("the seller's broken credential costs its calls", || async {
        call(plain_key.clone()).await == unavailable()
    })
    .await;
    let before = hits(&up);
    assert_eq!(call(plain_key.clone()).await, unavailable());
    assert_eq!(hits(&up), before, "the upstream never saw the call");
    assert_eq!(call(byok_key.clone()).await, own());

    // A BYOK credential no master key opens costs only that buyer's calls: they do not fall
    // back to the seller's credential. Then a seller's secret that decrypts to a line break.
    sqlx::query("UPDATE upstream_credentials SET value_prefix = 'Bearer ' WHERE kind = 'system'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE upstream_credentials SET key_version = 99 WHERE kind = 'byok'")
        .execute(&pool)
        .await
        .unwrap();
    eventually(
        "the buyer's unreadable BYOK costs only the buyer's calls",
        || async {
            call(byok_key.clone()).await == unavailable()
                && call(plain_key.clone()).await == system()
        },
    )
    .await;
    let sealed = master_keys().encrypt(&seller.to_string(), "weather", "tok\r\nX-Injected: 1");
    sqlx::query(
        "UPDATE upstream_credentials SET ciphertext = $1, nonce = $2 WHERE kind = 'system'",
    )
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .execute(&pool)
    .await
    .unwrap();
    eventually("a secret with a line break is never sent", || async {
        call(plain_key.clone()).await == unavailable()
    })
    .await;
    assert_eq!(call(byok_key.clone()).await, unavailable());

    // Written again, both serve; and the gateway never stopped following the database.
    store_credential(
        &pool,
        seller,
        "weather",
        "vendor",
        "system",
        UPSTREAM_SECRET,
    )
    .await
    .unwrap_err(); // one system credential per API: rewrite it in place
    let sealed = master_keys().encrypt(&seller.to_string(), "weather", UPSTREAM_SECRET);
    sqlx::query(
        "UPDATE upstream_credentials SET ciphertext = $1, nonce = $2 WHERE kind = 'system'",
    )
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE upstream_credentials SET key_version = 1 WHERE kind = 'byok'")
        .execute(&pool)
        .await
        .unwrap();
    eventually("both credentials serve again", || async {
        call(plain_key.clone()).await == system() && call(byok_key.clone()).await == own()
    })
    .await;
    set_key(&forever, "revoked_at = now()").await.unwrap();
    eventually("a revocation still arrives", || async {
        status(&gw, &forever).await == 401
    })
    .await;
}

/// A seller's upstream that resolves inside the gateway's network is refused at connect time
/// (whatever the console checked when it was saved: names can be repointed), while the same
/// upstream in the gateway's own file is the SRE's to choose.
#[tokio::test]
async fn a_sellers_upstream_on_a_denied_address_is_never_dialled() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let up = start_upstream().await;
    let org = dbkeys::create_org(&pool, "acme", "test").await.unwrap();
    let key = live_key(&pool, org).await;
    // Written straight to the database, as if DNS had changed after the console's check:
    // `localhost` resolves to loopback.
    let addr = up.addr.unwrap();
    register_api(&pool, addr, org).await;
    sqlx::query("UPDATE apis SET upstream_url = $1")
        .bind(format!("http://localhost:{}/", addr.port()))
        .execute(&pool)
        .await
        .unwrap();
    let gw = start_proxy_allowing(&tdb, Vec::new()).await;
    let resp = client()
        .get(format!("http://{}/weather/x", gw.addr))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);
    let body: Value = resp.json().await.unwrap();
    assert!(body["request_id"].is_string(), "{body}");
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the upstream was never called"
    );

    // Allowed networks are reachable.
    let open = start_proxy_allowing(
        &tdb,
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
    )
    .await;
    assert_eq!(status(&open, &key).await, 200);
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// An API row the gateway cannot serve (an upstream only a lenient parser accepts), or one
/// that would take the gateway's own route (its name, or a prefix under it), is skipped: the
/// gateway still starts, serves the rest, never hands the own route's traffic to the seller,
/// and keeps reloading (a revoked key stops working).
#[tokio::test]
async fn a_sellers_unservable_or_intruding_api_is_skipped_and_reloads_go_on() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let (own, seller_up) = (start_upstream().await, start_upstream().await);
    let org = dbkeys::create_org(&pool, "acme", "test").await.unwrap();
    let key = live_key(&pool, org).await;
    register_api(&pool, seller_up.addr.unwrap(), org).await;
    let intruder = format!("http://{}/", seller_up.addr.unwrap());
    // The database refuses `/` today; a row from before that rule is still skipped.
    sqlx::raw_sql("DROP TRIGGER apis_prefix_boundary ON apis")
        .execute(&pool)
        .await
        .unwrap();
    for (name, prefix, upstream) in [
        ("poison", "/poison", "http://203.0.113.9/a b"),
        ("ops", "/elsewhere", intruder.as_str()),
        ("ops-v2", "/ops/v2", intruder.as_str()),
        ("root", "/", intruder.as_str()),
    ] {
        sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, $3, $4, $5)")
            .bind(Uuid::new_v4())
            .bind(org)
            .bind(name)
            .bind(prefix)
            .bind(upstream)
            .execute(&pool)
            .await
            .unwrap();
    }
    let gw = start_proxy_with(
        &tdb,
        vec!["127.0.0.0/8".parse().unwrap()],
        &format!(
            "  - {{ name: ops, pathPrefix: /ops, upstream: \"http://{}/\" }}",
            own.addr.unwrap()
        ),
    )
    .await;
    assert_eq!(
        status(&gw, &key).await,
        200,
        "the seller's good API is served"
    );
    let hits = |u: &Upstream| u.hits.load(std::sync::atomic::Ordering::SeqCst);
    let before = hits(&seller_up);
    let resp = client()
        .get(format!("http://{}/ops/v2/orders", gw.addr))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(hits(&own), 1, "the gateway's own route answered");
    assert_eq!(hits(&seller_up), before, "the seller never saw it");
    // Readiness and the metrics say how many rows are skipped (the log says which and why).
    let ready = readiness(&gw).await;
    assert_eq!(
        ready["config"]["skipped"],
        serde_json::json!({"apis": 4, "orgs": 0, "keys": 0, "credentials": 0}),
        "{ready}"
    );
    assert_eq!(ready["status"], "ready", "the rest is served: {ready}");
    let metrics = client()
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("apitree_proxy_database_rows_skipped{kind=\"api\"} 4"),
        "{metrics}"
    );

    let id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    dbkeys::revoke_key(&pool, id, "test").await.unwrap();
    eventually("the revocation reaches the gateway", || async {
        status(&gw, &key).await == 401
    })
    .await;
}

/// Usage is metered per key, API and UTC day, off the request path: two replicas on one
/// database add up exactly; refused calls (no key, over a limit) are not usage; a batch whose
/// commit is unconfirmed is sent again and counts once; what is pending is sent at shutdown.
#[tokio::test]
async fn usage_is_metered_per_key_and_api_and_replicas_add_up_exactly() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let up = start_upstream().await;
    let org = dbkeys::create_org(&pool, "acme", "test").await.unwrap();
    register_api(&pool, up.addr.unwrap(), org).await;
    let (k1, k2) = (live_key(&pool, org).await, live_key(&pool, org).await);
    let (_dir, cfg) = config_dir("");
    let opts = |listen: &str| apitree::proxy::ProxyOptions {
        database_url: Some(tdb.url.clone()),
        upstream_allow: vec!["127.0.0.0/8".parse().unwrap()],
        listen: Some(listen.to_string()),
        admin: Some("127.0.0.1:0".to_string()),
        ..proxy_options(cfg.clone())
    };
    // Replica A: served by `serve`, which sends what is pending when it stops.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn(apitree::proxy::serve(
        opts(&format!("127.0.0.1:{port}")),
        async move {
            let _ = stopped.await;
        },
    ));
    // Replica B: its meter flushed by hand.
    let b = apitree::proxy::prepare(&opts("127.0.0.1:0")).await.unwrap();
    let b_addr = b.listener.local_addr().unwrap();
    let b_gw = b.gateway.clone();
    let b_pool = b.usage_pool.clone().unwrap();
    tokio::spawn(apitree::proxy::transport::workers::run(
        b.gateway,
        b.listener,
        b.admin,
        std::future::pending(),
        b.settings,
    ));
    let call = |addr: String, key: Option<String>, path: &'static str| async move {
        let mut req = client().get(format!("http://{addr}/weather/{path}"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    let a_addr = format!("127.0.0.1:{port}");
    eventually("replica A serves", || {
        let a_addr = a_addr.clone();
        async move { call(a_addr, None, "x").await == 401 }
    })
    .await;
    for _ in 0..7 {
        assert_eq!(call(a_addr.clone(), Some(k1.clone()), "today").await, 200);
        assert_eq!(
            call(b_addr.to_string(), Some(k1.clone()), "today").await,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            call(b_addr.to_string(), Some(k2.clone()), "fail").await,
            500
        );
        // Not usage: no key, and a key nobody has.
        assert_eq!(call(b_addr.to_string(), None, "today").await, 401);
    }
    // An API whose upstream is down: the calls that went to it are usage (and errors); those
    // the open breaker refused without calling it are not.
    sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, 'dead', '/dead/', 'http://127.0.0.1:1/')")
        .bind(Uuid::new_v4())
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let dead = |key: String| {
        let addr = b_addr;
        async move {
            client()
                .get(format!("http://{addr}/dead/x"))
                .bearer_auth(key)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    eventually("the new API is served", || {
        let k = k2.clone();
        async move { dead(k).await != 404 }
    })
    .await;
    let (mut upstream_calls, mut refused) = (0, 0);
    for _ in 0..20 {
        match dead(k2.clone()).await {
            502 => upstream_calls += 1,
            503 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "the breaker opened");
    let meter = b_gw.usage.clone().expect("database mode meters usage");
    apitree::proxy::flush_usage(&b_gw, &meter, &b_pool).await;
    let (requests, errors): (i64, i64) = sqlx::query_as(
        "SELECT sum(requests)::bigint, sum(errors)::bigint FROM usage_counters u JOIN apis a ON a.id = u.api_id WHERE a.name = 'dead'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // The probe call that found the new API counted too, when it reached the upstream.
    assert!(
        requests == upstream_calls || requests == upstream_calls + 1,
        "{requests} recorded, {upstream_calls} went upstream, {refused} refused"
    );
    assert_eq!(errors, requests);
    sqlx::query(
        "DELETE FROM usage_counters WHERE api_id = (SELECT id FROM apis WHERE name = 'dead')",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(meter.pending().await, 0);
    let _ = stop.send(());
    a.await.unwrap().unwrap();
    let rows: Vec<(String, Option<String>, chrono::NaiveDate, i64, i64)> = sqlx::query_as(
        "SELECT k.prefix, a.name, (u.window_start AT TIME ZONE 'UTC')::date, u.requests, u.errors
           FROM usage_counters u JOIN api_keys k ON k.id = u.api_key_id
           LEFT JOIN apis a ON a.id = u.api_id ORDER BY u.requests DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let today = chrono::Utc::now().date_naive();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for ((prefix, api, day, requests, errors), (key, want)) in
        rows.iter().zip([(&k1, (14, 0)), (&k2, (3, 3))])
    {
        assert!(key.starts_with(prefix.as_str()), "{rows:?}");
        assert_eq!((api.as_deref(), *day), (Some("weather"), today));
        assert_eq!((*requests, *errors), want, "{rows:?}");
    }
    // `apitree keys list` shows today's calls.
    let listed = dbkeys::list_keys(&pool, Some(org)).await.unwrap();
    let mut today: Vec<i64> = listed.iter().map(|k| k.today).collect();
    today.sort();
    assert_eq!(today, [3, 14]);
    // The same batch again (its commit unconfirmed) counts once.
    let replica = Uuid::new_v4();
    let flush = || {
        sqlx::query_scalar::<_, bool>(
            "SELECT usage_flush($1, 1, ARRAY[(SELECT id FROM api_keys ORDER BY created_at LIMIT 1)], ARRAY['weather'], ARRAY[(extract(epoch from now())::bigint / 86400)], ARRAY[5::bigint], ARRAY[0::bigint], ARRAY[0::bigint])",
        )
        .bind(replica)
        .fetch_one(&pool)
    };
    assert!(flush().await.unwrap());
    assert!(!flush().await.unwrap(), "applied once");
    let total: i64 = sqlx::query_scalar("SELECT sum(requests)::bigint FROM usage_counters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 14 + 3 + 5);
    // A database that is away: the batch is kept, then sent once it is back, counted once.
    let id: Uuid = sqlx::query_scalar("SELECT id FROM api_keys ORDER BY created_at LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    let meter = apitree::proxy::usage::UsageMeter::new();
    let now_ms = chrono::Utc::now().timestamp_millis() as u64;
    meter.record(&id.to_string(), "weather", now_ms, false, 10);
    let away = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap();
    assert!(meter.flush(&away).await.is_err());
    assert_eq!(meter.pending().await, 1, "kept");
    meter.record(&id.to_string(), "weather", now_ms, false, 10);
    assert_eq!(meter.flush(&pool).await.unwrap(), 2);
    assert_eq!(meter.pending().await, 0);
    let total: i64 = sqlx::query_scalar("SELECT sum(requests)::bigint FROM usage_counters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 14 + 3 + 5 + 2);
    // Sums saturate: a declared length of any size never makes a batch fail.
    meter.record(&id.to_string(), "weather", now_ms, false, u64::MAX);
    meter.record(&id.to_string(), "weather", now_ms, false, u64::MAX);
    assert_eq!(meter.flush(&pool).await.unwrap(), 2);
    meter.record(&id.to_string(), "weather", now_ms, false, u64::MAX);
    assert_eq!(meter.flush(&pool).await.unwrap(), 1);
    let bytes: i64 = sqlx::query_scalar("SELECT max(bytes_out) FROM usage_counters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(bytes, i64::MAX);
    // A batch the database refuses for good (here: a trigger refusing 13) is set aside, and
    // does not hold up the next one.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.requests = 13 THEN RAISE EXCEPTION 'no 13' USING ERRCODE = '22023'; END IF;
         RETURN NEW; END $$;
         CREATE TRIGGER refuse_13 BEFORE INSERT ON usage_counters FOR EACH ROW EXECUTE FUNCTION refuse_13();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let other: Uuid =
        sqlx::query_scalar("SELECT id FROM api_keys ORDER BY created_at DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    let day_later = now_ms + 86_400_000;
    for _ in 0..13 {
        meter.record(&other.to_string(), "weather", day_later, false, 0);
    }
    assert!(matches!(
        meter.flush(&pool).await,
        Err(apitree::proxy::usage::FlushError::Discarded(_))
    ));
    assert_eq!(meter.pending().await, 0, "set aside");
    meter.record(&other.to_string(), "weather", day_later, false, 0);
    assert_eq!(meter.flush(&pool).await.unwrap(), 1);
}
