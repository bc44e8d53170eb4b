//! Shared test support: throwaway PostgreSQL databases on the real server.
#![allow(dead_code)]

pub mod faults;
pub mod gateway;
pub mod pki;
pub mod slack;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// Waits until `check` holds, polling every 20 ms; fails naming `what` after 5 s. Tests wait
/// on a condition, never for a fixed time.
pub async fn until(what: &str, check: impl FnMut() -> bool) {
    until_within(what, std::time::Duration::from_secs(5), check).await
}

/// [`until`] with a limit of its own.
pub async fn until_within(
    what: &str,
    within: std::time::Duration,
    mut check: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + within;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// [`until`] for a check that has to wait on something itself (a request, a query).
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every file under `dir` (recursively) whose extension is one of `extensions`, sorted.
pub fn files_under(dir: &std::path::Path, extensions: &[&str]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p
                .extension()
                .is_some_and(|x| extensions.iter().any(|want| x == *want))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Server the tests use; `scripts/test` makes sure it is up. Override with APITREE_TEST_PG.
pub fn server_url() -> String {
    std::env::var("APITREE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A database created for one test and dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!("apitree_t_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("PostgreSQL must be running for this test (scripts/test starts it)");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = format!("{}/{name}", server_url());
        Self { name, url }
    }

    pub async fn pool(&self) -> PgPool {
        apitree::db::connect(&self.url, 8)
            .await
            .expect("connect to test database")
    }

    pub async fn migrated_pool(&self) -> PgPool {
        let pool = self.pool().await;
        apitree::db::migrate(&pool, &self.name)
            .await
            .expect("migrate");
        pool
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = format!("{}/postgres", server_url());
        // Drop from a fresh runtime on another thread: Drop may run inside a test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .ok()
            })
        })
        .join();
    }
}

/// Runs one or more statements built at run time (test fixtures only).
pub async fn exec<'e>(db: impl sqlx::PgExecutor<'e>, sql: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(db)
        .await
        .map(|_| ())
}

/// Seeds an org `acme` with an API `weather` and `n` system credentials `cred-000…` whose
/// plaintexts are `secret-0…`, sealed under `keys`; returns the org id.
pub async fn seed_upstream_credentials(
    pool: &PgPool,
    keys: &apitree::entities::vault::MasterKeys,
    n: usize,
) -> uuid::Uuid {
    let org = apitree::db::keys::create_org(pool, "acme", "test")
        .await
        .unwrap();
    // One API per credential: an API has one system credential.
    for i in 0..n {
        let api = uuid::Uuid::new_v4();
        let name = format!("weather-{i:03}");
        sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, $3, $4, 'http://up/')")
            .bind(api)
            .bind(org)
            .bind(&name)
            .bind(format!("/{name}/"))
            .execute(pool)
            .await
            .unwrap();
        let sealed = keys.encrypt(&org.to_string(), &name, &format!("secret-{i}"));
        sqlx::query("INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version) VALUES ($1, $2, $3, $4, 'system', $5, $6, $7)")
            .bind(uuid::Uuid::new_v4())
            .bind(org)
            .bind(api)
            .bind(format!("cred-{i:03}"))
            .bind(&sealed.ciphertext)
            .bind(&sealed.nonce)
            .bind(sealed.key_version as i32)
            .execute(pool)
            .await
            .unwrap();
    }
    org
}

/// Asserts every credential [`seed_upstream_credentials`] wrote decrypts with `keys` (e.g. the
/// new master key alone) to what it was.
pub async fn assert_seeded_credentials_decrypt(
    pool: &PgPool,
    keys: &apitree::entities::vault::MasterKeys,
    org: uuid::Uuid,
) {
    // (credential, API, key version, nonce, ciphertext)
    type Row = (String, String, i32, Vec<u8>, Vec<u8>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT c.name, a.name, c.key_version, c.nonce, c.ciphertext
           FROM upstream_credentials c JOIN apis a ON a.id = c.api_id ORDER BY c.name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (i, (name, api, version, nonce, ciphertext)) in rows.into_iter().enumerate() {
        let sealed = apitree::entities::vault::Sealed {
            key_version: version as u32,
            nonce,
            ciphertext,
        };
        let plain = keys
            .decrypt(&name, &org.to_string(), &api, &sealed)
            .unwrap();
        assert_eq!(plain.expose(), format!("secret-{i}"));
    }
}

/// Org `acme` with one live key on tier `gold` named `name`, created by actor `test`.
pub async fn seed_live_key(
    pool: &PgPool,
    pepper: &apitree::entities::keys::Pepper,
    name: &str,
) -> apitree::db::keys::IssuedKey {
    use apitree::db::keys as dbkeys;
    let org = dbkeys::create_org(pool, "acme", "test").await.unwrap();
    dbkeys::create_key(
        pool,
        pepper,
        dbkeys::NewKey {
            org,
            scope: apitree::crd::gateway::KeyScope::Live,
            tier: "gold",
            daily_quota: None,
            name,
        },
        "test",
    )
    .await
    .unwrap()
}

/// The audit log's (actor, action, target) rows in order, with a `subject:<uuid>` actor shown
/// as the `kind:label` it stands for, as the console's audit page shows it (the chain itself
/// holds only the reference; see `apitree::db::dsar`).
pub async fn audit_named(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT coalesce(d.kind || ':' || d.label, a.actor), a.action, a.target
           FROM audit_log a LEFT JOIN data_subjects d ON a.actor = 'subject:' || d.id::text
          ORDER BY a.id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}
