//! Drift check on a large schema: the gateway's own tables plus N generated ones (each with six
//! columns, a primary key, an index, row-level security, a policy and a trigger), against the
//! expected schema. Needs the PostgreSQL that scripts/test starts (or APITREE_TEST_PG).
//!
//!   cargo bench --bench drift          # 200 extra tables (the goal: a check under 250 ms)
//!   cargo bench --bench drift -- 500
//!
//! Runs only under `cargo bench` (it exits at once under `cargo test --all-targets`).

use std::time::Instant;

use sqlx::{AssertSqlSafe, Connection, PgConnection};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tables: usize = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let server = std::env::var("APITREE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("apitree_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .expect("PostgreSQL must be running (scripts/test starts it)");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{server}/{name}");
    let pool = apitree::db::connect(&url, 2).await.unwrap();
    apitree::db::migrate(&pool, &name).await.unwrap();
    let mut ddl = String::new();
    for i in 0..tables {
        ddl.push_str(&format!(
            "CREATE TABLE gen_{i} (id uuid PRIMARY KEY, org_id uuid NOT NULL, name text NOT NULL DEFAULT '', \
             n bigint, created_at timestamptz NOT NULL DEFAULT now(), note varchar(200));
             CREATE INDEX gen_{i}_org ON gen_{i} (org_id);
             ALTER TABLE gen_{i} ENABLE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON gen_{i} USING (org_id = apitree_current_org());
             CREATE TRIGGER gen_{i}_notify AFTER INSERT ON gen_{i} FOR EACH STATEMENT EXECUTE FUNCTION apitree_notify_config();\n"
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(ddl))
        .execute(&pool)
        .await
        .unwrap();
    let mut times = Vec::new();
    let mut findings = 0;
    for _ in 0..15 {
        let started = Instant::now();
        let report = apitree::drift::fix::check(&pool, false).await.unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        findings = report.items.len();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "drift check, {} tables ({} extra): median {:.1} ms, best {:.1} ms, worst {:.1} ms over {} runs; {findings} findings",
        tables + 10,
        tables,
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        times.len()
    );
    pool.close().await;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}
