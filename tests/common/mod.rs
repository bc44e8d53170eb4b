//! Shared test support: throwaway PostgreSQL databases on the real server.
#![allow(dead_code)]

pub mod gateway;
pub mod schema;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

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
