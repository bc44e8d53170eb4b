//! The gateway database schema against a real PostgreSQL.

mod common;

use apitree::db::{self, audit};
use common::TestDb;
use serde_json::json;
use sqlx::{AssertSqlSafe, PgPool, Row};
use uuid::Uuid;

#[tokio::test]
async fn migrations_apply_twice_without_change() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let tables_before: Vec<String> = table_names(&pool).await;
    db::migrate(&pool, &tdb.name)
        .await
        .expect("second run is a no-op");
    assert_eq!(tables_before, table_names(&pool).await);
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, db::MIGRATOR.iter().count());
    for t in [
        "orgs",
        "users",
        "api_keys",
        "apis",
        "upstream_credentials",
        "usage_counters",
        "incidents",
        "notification_outbox",
        "audit_log",
    ] {
        assert!(
            tables_before.iter().any(|n| n == t),
            "table {t} missing: {tables_before:?}"
        );
    }
}

/// Rows written before the "loadable rows" migration that no date type or plain array can
/// hold are rewritten to what the gateway already read them as, so the new rules hold for
/// every row and nothing old blocks a revocation, a grace sweep or a master-key rotation.
#[tokio::test]
async fn an_upgrade_rewrites_old_rows_the_gateway_could_not_read_and_they_stay_usable() {
    let tdb = TestDb::new().await;
    let pool = tdb.pool().await;
    let before = db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 20261205000012)
        .max()
        .unwrap();
    db::MIGRATOR.run_to(before, &pool).await.unwrap();
    let org = Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'acme')")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let insert_key = |prefix: &'static str, set: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO api_keys (id, org_id, prefix, key_hash, scope, tier) VALUES ($1, $2, $3, $4, 'live', 'std')")
                .bind(Uuid::new_v4())
                .bind(org)
                .bind(prefix)
                .bind(Uuid::new_v4().as_bytes().repeat(2))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::raw_sql(AssertSqlSafe(format!(
                "UPDATE api_keys SET {set} WHERE prefix = '{prefix}'"
            )))
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert_key(
        "at_live_forever1",
        "expires_at = 'infinity', last_used_at = 'infinity'",
    )
    .await;
    insert_key("at_live_ended001", "grace_until = '-infinity'").await;
    insert_key(
        "at_live_far00001",
        "expires_at = '200000-01-01', created_at = '-infinity'",
    )
    .await;
    let api = Uuid::new_v4();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO apis (id, org_id, name, path_prefix, upstream_url, scopes)
              VALUES ('{api}', '{org}', 'odd', '/odd', 'http://10.0.0.5:8080/v1?k=v#top', '[0:1]={{live,NULL}}');
         INSERT INTO apis (id, org_id, name, path_prefix, upstream_url, scopes)
              VALUES (gen_random_uuid(), '{org}', 'deep', '/deep', 'http://10.0.0.5/#top', '{{{{live}},{{test}}}}');
         INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version, value_prefix)
              VALUES (gen_random_uuid(), '{org}', '{api}', 'old', 'system', '\\x00', '\\x000000000000000000000000', 1, E' Bearer\\r\\n');
         INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version)
              VALUES (gen_random_uuid(), '{org}', '{api}', 'own', 'byok', '\\x00', '\\x000000000000000000000000', 1)"
    )))
    .execute(&pool)
    .await
    .unwrap();

    db::migrate(&pool, &tdb.name).await.expect("the upgrade");
    type Times = (String, Option<String>, Option<String>, bool, bool);
    let times: Vec<Times> = sqlx::query_as(
        "SELECT prefix, expires_at::text, grace_until::text, last_used_at IS NULL, created_at > now() - interval '1 hour'
           FROM api_keys ORDER BY prefix",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let epoch = Some("1970-01-01 00:00:00+00".to_string());
    assert_eq!(
        times,
        [
            ("at_live_ended001".into(), None, epoch, true, true),
            (
                "at_live_far00001".into(),
                Some("9999-12-31 23:59:59+00".into()),
                None,
                true,
                true
            ),
            ("at_live_forever1".into(), None, None, true, true),
        ]
    );
    let apis: Vec<(String, String, Vec<String>)> =
        sqlx::query_as("SELECT name, upstream_url, scopes::text[] FROM apis ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        apis,
        [
            (
                "deep".into(),
                "http://10.0.0.5/".into(),
                vec!["live".into(), "test".into()]
            ),
            (
                "odd".into(),
                "http://10.0.0.5:8080/v1".into(),
                vec!["live".into()]
            ),
        ]
    );
    // A BYOK credential written before the binding is bound to the upstream it was being
    // sent to (as rewritten above).
    let bound: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT name, bound_upstream FROM upstream_credentials ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        bound,
        [
            ("old".into(), None),
            ("own".into(), Some("http://10.0.0.5:8080/v1".into()))
        ]
    );
    // Every key is revocable and the grace sweep runs; an old credential the gateway skips
    // still takes a master-key rotation's rewrite, while a new bad prefix is refused.
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM api_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    for id in ids {
        db::keys::revoke_key(&pool, id, "test").await.unwrap();
    }
    db::keys::sweep_grace(&pool, chrono::Utc::now(), "test")
        .await
        .unwrap();
    sqlx::query("UPDATE upstream_credentials SET key_version = 2, ciphertext = '\\x01'")
        .execute(&pool)
        .await
        .unwrap();
    let e = sqlx::query("UPDATE upstream_credentials SET value_prefix = E'Bearer\\n'")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("visible ASCII"), "{e}");
    db::keys::load_entities(&pool)
        .await
        .expect("the gateway loads every row");
}

/// Whoever writes `apis`, the database refuses a prefix that one request path could match
/// together with another org's API (by the gateway's own rule, `prefixes_overlap`, which is
/// tested against routing), the same prefix twice, and `/`; nesting within one org passes.
/// Every pair of prefixes of up to four characters from `/`, `a`, `b`.
#[tokio::test]
async fn the_database_refuses_a_prefix_that_would_take_another_orgs_traffic() {
    use apitree::proxy::config::prefixes_overlap;
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (org, name) in [(a, "a"), (b, "b")] {
        sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
            .bind(org)
            .bind(name)
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut prefixes = vec!["/".to_string()];
    let mut frontier = prefixes.clone();
    for _ in 1..4 {
        frontier = frontier
            .iter()
            .flat_map(|s| ['/', 'a', 'b'].map(|c| format!("{s}{c}")))
            .collect();
        prefixes.extend(frontier.iter().cloned());
    }
    let mut conn = pool.acquire().await.unwrap();
    let insert = |org: Uuid, name: &'static str, prefix: String| {
        sqlx::query(
            "INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, $3, $4, 'http://10.0.0.5/')",
        )
        .bind(Uuid::new_v4())
        .bind(org)
        .bind(name)
        .bind(prefix)
    };
    let (mut refused, mut passed) = (0, 0);
    for first in prefixes.iter().filter(|p| *p != "/") {
        for second in &prefixes {
            for other_org in [true, false] {
                sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
                insert(a, "first", first.clone())
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                let result = insert(if other_org { b } else { a }, "second", second.clone())
                    .execute(&mut *conn)
                    .await;
                sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
                let want_refused = second == "/"
                    || first == second
                    || (other_org && prefixes_overlap(first, second));
                let what = format!("{first:?} then {second:?}, other org: {other_org}");
                match result {
                    Ok(_) => {
                        assert!(!want_refused, "{what}: passed");
                        passed += 1;
                    }
                    Err(e) => {
                        assert!(want_refused, "{what}: {e}");
                        assert_eq!(
                            e.as_database_error().and_then(|d| d.constraint()),
                            Some("apis_prefix_boundary"),
                            "{what}: {e}"
                        );
                        refused += 1;
                    }
                }
            }
        }
    }
    assert!(
        refused > 100 && passed > 100,
        "{refused} refused, {passed} passed"
    );
    // Moving an API (a new prefix, or to another org) is checked the same way; other changes
    // to a row are not.
    insert(a, "first", "/a/".into())
        .execute(&pool)
        .await
        .unwrap();
    insert(a, "nested", "/a/x/".into())
        .execute(&pool)
        .await
        .unwrap();
    insert(b, "second", "/b".into())
        .execute(&pool)
        .await
        .unwrap();
    for sql in [
        "UPDATE apis SET path_prefix = '/a/b' WHERE name = 'second'",
        "UPDATE apis SET org_id = (SELECT org_id FROM apis WHERE name = 'second') WHERE name = 'first'",
    ] {
        let e = sqlx::query(AssertSqlSafe(sql)).execute(&pool).await.unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{sql}: {e}");
    }
    sqlx::query("UPDATE apis SET upstream_url = 'http://10.0.0.6/'")
        .execute(&pool)
        .await
        .unwrap();

    // A writer whose snapshot predates another org's registration (REPEATABLE READ or
    // SERIALIZABLE, snapshot taken, the other commits, then it writes) does not win with it.
    for (n, isolation) in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]
        .into_iter()
        .enumerate()
    {
        let mut late = pool.acquire().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "BEGIN ISOLATION LEVEL {isolation}; SELECT count(*) FROM apis"
        )))
        .execute(&mut *late)
        .await
        .unwrap();
        let prefix = format!("/race{n}");
        insert(a, "early", prefix.clone())
            .execute(&pool)
            .await
            .unwrap();
        let e = insert(b, "late", format!("{prefix}/x"))
            .execute(&mut *late)
            .await
            .unwrap_err();
        assert_eq!(
            e.as_database_error().and_then(|d| d.constraint()),
            Some("apis_prefix_boundary"),
            "{isolation}: {e}"
        );
        sqlx::raw_sql("ROLLBACK").execute(&mut *late).await.unwrap();
        sqlx::query("DELETE FROM apis WHERE name = 'early'")
            .execute(&pool)
            .await
            .unwrap();
    }
}

async fn table_names(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Tenant tables: orgs itself and every table with an org_id column.
async fn tenant_tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT table_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND (column_name = 'org_id' OR table_name = 'orgs')
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Inserts one row in every tenant table for `org` and returns the org's API key id.
async fn seed_org(pool: &PgPool, name: &str, tag: &str) -> Uuid {
    let org = Uuid::new_v4();
    let user = Uuid::new_v4();
    let key = Uuid::new_v4();
    let api = Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, $2)")
        .bind(org)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO users (id, org_id, email, role) VALUES ($1, $2, $3, 'seller')")
        .bind(user)
        .bind(org)
        .bind(format!("owner@{name}.example"))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO api_keys (id, org_id, prefix, key_hash, scope) VALUES ($1, $2, $3, $4, 'live')",
    )
    .bind(key).bind(org).bind(format!("at_live_{tag}")).bind(vec![tag.as_bytes()[0]; 32])
    .execute(pool).await.unwrap();
    sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, $3, $4, 'http://up.example/')")
        .bind(api).bind(org).bind(format!("weather-{name}")).bind(format!("/{name}/")).execute(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version)
         VALUES ($1, $2, $3, 'vendor', 'byok', '\\x00ff', $4, 1)",
    )
    .bind(Uuid::new_v4()).bind(org).bind(api).bind(vec![0u8; 12]).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO usage_counters (org_id, api_key_id, api_id, window_start, requests) VALUES ($1, $2, $3, now(), 5)")
        .bind(org).bind(key).bind(api).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO credit_ledger (org_id, amount, reason, actor) VALUES ($1, 100, 'seed', 'test')")
        .bind(org).execute(pool).await.unwrap();
    audit::append(
        pool,
        "test",
        "org.create",
        name,
        Some(org),
        &json!({"name": name}),
    )
    .await
    .unwrap();
    org
}

#[tokio::test]
async fn tenant_role_sees_only_its_own_org_in_every_tenant_table() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let org_a = seed_org(&pool, "alpha", "aaaa").await;
    let org_b = seed_org(&pool, "bravo", "bbbb").await;

    let tables = tenant_tables(&pool).await;
    assert!(
        tables.len() >= 7,
        "expected the tenant tables, found {tables:?}"
    );
    for t in &tables {
        let rls: bool =
            sqlx::query_scalar("SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass")
                .bind(t)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(rls, "row-level security is not enabled on {t}");
    }

    // A non-superuser role, as a tenant-facing service would use.
    let role = format!("tenant_{}", Uuid::new_v4().simple());
    common::exec(
        &pool,
        format!("CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS"),
    )
    .await
    .unwrap();
    common::exec(
        &pool,
        format!("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}"),
    )
    .await
    .unwrap();

    let mut conn = pool.acquire().await.unwrap();
    common::exec(&mut *conn, format!("SET ROLE {role}"))
        .await
        .unwrap();
    // apitree's own connections refuse filtered queries (`row_security = off`, see
    // `db::WHOLE_DATABASE`); a tenant-facing service turns the policies back on.
    common::exec(&mut *conn, "SET row_security = on".into())
        .await
        .unwrap();
    common::exec(&mut *conn, format!("SET apitree.org_id = '{org_a}'"))
        .await
        .unwrap();
    for t in &tables {
        let org_col = if t == "orgs" { "id" } else { "org_id" };
        let rows = sqlx::query(AssertSqlSafe(format!("SELECT {org_col} AS org FROM {t}")))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{t}: org A should see its own rows");
        for r in rows {
            let org: Option<Uuid> = r.get("org");
            assert_eq!(org, Some(org_a), "{t}: a row of another org is visible");
        }
    }
    // Writing a row for org B while set to org A is refused.
    let err = sqlx::query("INSERT INTO users (id, org_id, email) VALUES ($1, $2, 'x@b.example')")
        .bind(Uuid::new_v4())
        .bind(org_b)
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");

    // With no org set, nothing is visible.
    common::exec(&mut *conn, "RESET apitree.org_id".into())
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    common::exec(&mut *conn, "RESET ROLE".into()).await.unwrap();
    drop(conn);
    common::exec(
        &pool,
        format!("REASSIGN OWNED BY {role} TO CURRENT_USER; DROP OWNED BY {role}; DROP ROLE {role}"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn audit_log_refuses_update_delete_and_truncate() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    audit::append(
        &pool,
        "alice",
        "key.create",
        "at_live_abcd",
        None,
        &json!({}),
    )
    .await
    .unwrap();
    for stmt in [
        "UPDATE audit_log SET actor = 'mallory'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = common::exec(&pool, stmt.to_string())
            .await
            .expect_err(stmt)
            .to_string();
        assert!(err.contains("append-only"), "{stmt}: {err}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn audit_hash_chain_links_rows_and_exposes_tampering() {
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    // Concurrent writers still produce one gapless chain.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            audit::append(
                &pool,
                &format!("actor-{i}"),
                "key.rotate",
                "at_live_zzzz",
                None,
                &json!({"n": i, "note": "grace 24h", "nested": {"b": [1, 2.50, "x"], "a": null}}),
            )
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rows = audit::read_rows(&pool, 0, 1000).await.unwrap();
    assert_eq!(rows.len(), 20);
    for pair in rows.windows(2) {
        assert_eq!(pair[1].id, pair[0].id + 1);
        assert_eq!(
            pair[1].prev_hash, pair[0].hash,
            "row {} does not link to {}",
            pair[1].id, pair[0].id
        );
    }
    let mut verifier = audit::ChainVerifier::new();
    for r in &rows {
        verifier.feed(r).expect("untouched chain verifies");
    }
    assert_eq!(verifier.verified(), 20);

    // A superuser edits row 7 behind the triggers' back; the chain names that row.
    common::exec(&pool, "ALTER TABLE audit_log DISABLE TRIGGER USER; UPDATE audit_log SET actor = 'mallory' WHERE id = 7; ALTER TABLE audit_log ENABLE TRIGGER USER".into())
        .await.unwrap();
    let rows = audit::read_rows(&pool, 0, 1000).await.unwrap();
    let mut verifier = audit::ChainVerifier::new();
    let broken = rows
        .iter()
        .find_map(|r| verifier.feed(r).err())
        .expect("tampering detected");
    assert_eq!(broken.id, 7);
}

#[tokio::test]
async fn the_grace_sweep_revokes_rotated_keys_once_their_grace_ends_and_only_once() {
    use apitree::db::keys as dbkeys;
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let pepper =
        apitree::entities::keys::Pepper::new(b"sweep-test-pepper-0123456789-0123456789".to_vec())
            .unwrap();
    let key = common::seed_live_key(&pool, &pepper, "ci").await;
    let t0 = chrono::Utc::now();
    let rotation = dbkeys::rotate_key(
        &pool,
        &pepper,
        key.id,
        chrono::Duration::hours(24),
        t0,
        "test",
    )
    .await
    .unwrap()
    .unwrap();
    // Inside the grace period nothing is revoked.
    let early = dbkeys::sweep_grace(&pool, t0 + chrono::Duration::hours(23), "sweep")
        .await
        .unwrap();
    assert!(early.is_empty());
    // After it, the old key is; two sweepers racing revoke (and audit) it once.
    let later = t0 + chrono::Duration::hours(25);
    let (a, b) = tokio::join!(
        dbkeys::sweep_grace(&pool, later, "sweep-a"),
        dbkeys::sweep_grace(&pool, later, "sweep-b")
    );
    let revoked: Vec<String> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    assert_eq!(revoked, vec![rotation.old_prefix]);
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'key.grace_expired'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    // The replacement key is untouched.
    let live: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(rotation.new.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(live.is_none());
}

#[tokio::test]
async fn master_key_reencryption_resumes_after_interruption_and_concurrent_runs_share_the_work() {
    use apitree::db::credentials::reencrypt_batch;
    use apitree::entities::vault::MasterKeys;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (k1, k2) = (b64.encode([7u8; 32]), b64.encode([9u8; 32]));
    let old = MasterKeys::single(1, &k1).unwrap();
    let both = MasterKeys::parse_file(&format!("1:{k1}\n2:{k2}\n")).unwrap();
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let org = common::seed_upstream_credentials(&pool, &old, 250).await;
    // One batch, then the run is "interrupted".
    let first = reencrypt_batch(&pool, &both, 100, "test").await.unwrap();
    assert_eq!((first.rewrapped, first.done, first.total), (100, 100, 250));
    assert_eq!(first.versions_in_use, vec![1]);
    // Two runs resume at once and finish it between them.
    let run = |who: &'static str| {
        let (pool, keys) = (pool.clone(), both.clone());
        async move {
            let mut n = 0;
            loop {
                let p = reencrypt_batch(&pool, &keys, 40, who).await.unwrap();
                n += p.rewrapped;
                if p.rewrapped == 0 {
                    return (n, p);
                }
            }
        }
    };
    let ((a, _), (b, _)) = tokio::join!(run("run-a"), run("run-b"));
    assert_eq!(a + b, 150, "each row rewrapped exactly once");
    // (A run that finds the last rows locked by the other stops before they commit; count
    // once both are done.)
    let last = reencrypt_batch(&pool, &both, 0, "count").await.unwrap();
    assert_eq!((last.done, last.total), (250, 250));
    assert!(last.versions_in_use.is_empty(), "version 1 can retire");
    // Every credential decrypts with the new key alone, to what it was.
    let new_only = MasterKeys::single(2, &k2).unwrap();
    common::assert_seeded_credentials_decrypt(&pool, &new_only, org).await;
    // The audit log names every credential once.
    let details: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT detail FROM audit_log WHERE action = 'master_key.reencrypt'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut ids: Vec<String> = details
        .iter()
        .flat_map(|d| d["credentials"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 250);
}

/// Work on the whole database (verifiers, sweeps, re-encryption, the proxy's snapshot, listings)
/// must never quietly act on the part of it a role can see. As a role that row-level security
/// applies to, every such operation fails and names the table; nothing is changed; and any
/// other query on any table with policies fails the same way (a new reader or a new table is
/// covered without being listed here). Drift detection reads the catalogs, which show every
/// object to every role: the restricted role sees exactly the owner's schema.
#[tokio::test]
async fn whole_database_work_fails_loudly_for_a_role_that_row_level_security_filters() {
    use apitree::db::{credentials, keys as dbkeys, DbError};
    use apitree::entities::vault::MasterKeys;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (k1, k2) = (b64.encode([7u8; 32]), b64.encode([9u8; 32]));
    let old = MasterKeys::single(1, &k1).unwrap();
    let both = MasterKeys::parse_file(&format!("1:{k1}\n2:{k2}\n")).unwrap();
    let tdb = TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    let pepper =
        apitree::entities::keys::Pepper::new(b"rls-test-pepper-0123456789-0123456789-x".to_vec())
            .unwrap();
    let org = common::seed_upstream_credentials(&pool, &old, 3).await;
    let key = dbkeys::create_key(
        &pool,
        &pepper,
        dbkeys::NewKey {
            org,
            scope: apitree::crd::gateway::KeyScope::Live,
            tier: "gold",
            daily_quota: None,
            name: "ci",
        },
        "test",
    )
    .await
    .unwrap();
    let t0 = chrono::Utc::now();
    dbkeys::rotate_key(
        &pool,
        &pepper,
        key.id,
        chrono::Duration::hours(1),
        t0,
        "test",
    )
    .await
    .unwrap()
    .unwrap();
    let after_grace = t0 + chrono::Duration::hours(2);

    // A role with every privilege on every table, but subject to the policies.
    let role = format!("blinkered_{}", &tdb.name[10..]);
    common::exec(
        &pool,
        format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS; \
             GRANT CONNECT ON DATABASE {db} TO {role}; GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
            db = tdb.name
        ),
    )
    .await
    .unwrap();
    let as_role = tdb
        .url
        .replacen("postgres://postgres", &format!("postgres://{role}"), 1)
        .replacen(":postgres@", "@", 1);
    let restricted = db::connect(&as_role, 2).await.unwrap();

    let outcomes: Vec<(&str, Result<(), DbError>)> = vec![
        (
            "audit::read_rows",
            audit::read_rows(&restricted, 0, 100).await.map(drop),
        ),
        (
            "keys::list_keys",
            dbkeys::list_keys(&restricted, None).await.map(drop),
        ),
        (
            "keys::load_entities",
            dbkeys::load_entities(&restricted).await.map(drop),
        ),
        (
            "keys::sweep_grace",
            dbkeys::sweep_grace(&restricted, after_grace, "sweep")
                .await
                .map(drop),
        ),
        (
            "rotation::database_credentials",
            apitree::operator::credentials::rotation::database_credentials(&restricted, true, true)
                .await
                .map(drop),
        ),
        (
            "credentials::reencrypt_batch",
            credentials::reencrypt_batch(&restricted, &both, 10, "test")
                .await
                .map(drop)
                .map_err(|e| match e {
                    credentials::ReencryptError::Database(e) => e,
                    other => panic!("re-encryption failed otherwise: {other}"),
                }),
        ),
    ];
    for (what, outcome) in outcomes {
        let err = outcome.expect_err(&format!("{what} acted on a filtered view"));
        assert_eq!(err.category(), "RowLevelSecurity", "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("row-level security") && text.contains("BYPASSRLS"),
            "{what}: {text}"
        );
    }
    // Any query on any table with policies is refused, naming the table.
    let policed: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'public' AND c.relrowsecurity ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(policed.len() >= 7, "{policed:?}");
    for table in policed {
        let err = sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&restricted)
            .await
            .expect_err(&format!("{table} was read through the policies"));
        assert!(
            err.to_string()
                .contains(&format!("row-level security policy for table \"{table}\"")),
            "{table}: {err}"
        );
    }
    // Nothing changed: the rotated key is still only in grace, no credential was rewrapped.
    let revoked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    let rewrapped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM upstream_credentials WHERE key_version = 2")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((revoked, rewrapped), (0, 0));
    // The owner (the role apitree is meant to run as) does the same work.
    assert_eq!(
        dbkeys::sweep_grace(&pool, after_grace, "sweep")
            .await
            .unwrap()
            .len(),
        1
    );

    // Drift detection sees every object as the restricted role.
    let mut owner_conn = pool.acquire().await.unwrap();
    let mut role_conn = restricted.acquire().await.unwrap();
    let seen_by_owner = apitree::drift::introspect::introspect(&mut owner_conn, "public")
        .await
        .unwrap();
    let seen_by_role = apitree::drift::introspect::introspect(&mut role_conn, "public")
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&seen_by_role).unwrap(),
        serde_json::to_value(&seen_by_owner).unwrap()
    );
    drop((owner_conn, role_conn));
    restricted.close().await;
    common::exec(&pool, format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

/// Retention as the health sweep applies it: each kind older than its rule is deleted (in
/// batches: 12,000 old usage rows go in one run), what is younger or still needed stays (open
/// incidents, undelivered messages, keys whose usage or successor refers to them), the run is
/// audited with its counts, a run with nothing to delete writes nothing, the chain verifies.
#[tokio::test]
async fn the_health_sweep_deletes_what_retention_no_longer_keeps() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let org = db::keys::create_org(&pool, "acme", "test").await.unwrap();
    let o = org.to_string();
    let key = |name: &str, extra: &str| {
        format!(
            "INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scope{c})
             VALUES (gen_random_uuid(), '{o}', '{name}', 'at_live_{name}', sha256('{name}'::bytea), 'live'{v});",
            c = if extra.is_empty() { "" } else { ", revoked_at, expires_at, replaced_by" },
            v = extra
        )
    };
    let seed = [
        // usage: 12,000 rows two years old (3 batches), one recent
        format!("INSERT INTO api_keys (id, org_id, prefix, key_hash, scope) VALUES ('00000000-0000-0000-0000-0000000000aa', '{o}', 'at_live_used', sha256('used'::bytea), 'live');"),
        "INSERT INTO usage_counters (org_id, api_key_id, window_start, requests)
         SELECT (SELECT org_id FROM api_keys WHERE prefix = 'at_live_used'), '00000000-0000-0000-0000-0000000000aa', now() - interval '730 days' - g * interval '1 minute', 1
           FROM generate_series(1, 12000) g;".to_string(),
        "INSERT INTO usage_counters (org_id, api_key_id, window_start, requests)
         SELECT org_id, id, now() - interval '1 day', 1 FROM api_keys WHERE prefix = 'at_live_used';".to_string(),
        // incidents: resolved long ago (goes), resolved lately, open since long ago (stay)
        "INSERT INTO incidents (id, gateway, route, signal, severity, max_severity, opened_at, resolved_at) VALUES
           (gen_random_uuid(), 'shop', 'a', 'error_ratio', 'high', 'high', now() - interval '400 days', now() - interval '200 days'),
           (gen_random_uuid(), 'shop', 'b', 'error_ratio', 'high', 'high', now() - interval '20 days', now() - interval '10 days'),
           (gen_random_uuid(), 'shop', 'c', 'error_ratio', 'high', 'high', now() - interval '400 days', NULL);".to_string(),
        // outbox: delivered long ago (goes), undelivered and old, delivered lately (stay)
        "INSERT INTO notification_outbox (dedupe_key, channel, method, payload, created_at, delivered_at) VALUES
           ('a', 'C', 'chat.postMessage', '{}', now() - interval '50 days', now() - interval '40 days'),
           ('b', 'C', 'chat.postMessage', '{}', now() - interval '50 days', NULL),
           ('c', 'C', 'chat.postMessage', '{}', now() - interval '5 days', now() - interval '5 days');".to_string(),
        // keys: revoked long ago (goes), expired long ago (goes), revoked lately, active (stay)
        key("old1", ", now() - interval '100 days', NULL, NULL"),
        key("old2", ", NULL, now() - interval '100 days', NULL"),
        key("new1", ", now() - interval '10 days', NULL, NULL"),
        key("live", ""),
        // a key revoked long ago that a newer key replaced stays while the newer one names it
        key("prev", ", now() - interval '100 days', NULL, NULL"),
        key("next", ", NULL, NULL, (SELECT id FROM api_keys WHERE prefix = 'at_live_prev')"),
        "UPDATE api_keys SET revoked_at = now() - interval '100 days' WHERE prefix = 'at_live_used';".to_string(),
        // data requests: four years old (goes), this year (stays)
        "INSERT INTO dsar_requests (subject, kind, state, actor, at, done_at, done_by) VALUES
           ('user:00000000-0000-0000-0000-000000000001', 'export', 'exported', 'x', now() - interval '1500 days', now() - interval '1500 days', 'x'),
           ('user:00000000-0000-0000-0000-000000000001', 'export', 'exported', 'x', now() - interval '10 days', now() - interval '10 days', 'x');".to_string(),
        // an open request received long ago stays until it is carried out
        "INSERT INTO dsar_requests (subject, kind, state, actor, at) VALUES
           ('user:00000000-0000-0000-0000-000000000001', 'erase', 'received', 'x', now() - interval '1500 days');".to_string(),
    ];
    for sql in seed {
        common::exec(&pool, sql).await.unwrap();
    }
    let target = apitree::operator::gateway::sweep::SweepTarget {
        gateway: "shop".into(),
        database_url: Some(db.url.clone()),
        unresolved: None,
        policy: apitree::crd::gateway::DriftPolicy::Off,
        retention: Default::default(),
        upstreams: Vec::new(),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let out =
        apitree::operator::gateway::sweep::sweep_gateway(&target, &http, chrono::Utc::now()).await;
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let purged: Vec<(&str, u64)> = out.purged.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(
        purged,
        [
            ("deliveredNotifications", 1),
            ("endedKeys", 2),
            ("resolvedIncidents", 1),
            ("usage", 12_000),
            ("dataRequests", 1),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    let left = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        left("SELECT string_agg(prefix, ' ' ORDER BY prefix) FROM api_keys").await,
        "at_live_live at_live_new1 at_live_next at_live_prev at_live_used",
        "keys still needed stay"
    );
    assert_eq!(
        left("SELECT string_agg(route, ' ' ORDER BY route) FROM incidents").await,
        "b c"
    );
    assert_eq!(
        left("SELECT string_agg(dedupe_key, ' ' ORDER BY dedupe_key) FROM notification_outbox")
            .await,
        "b c"
    );
    assert_eq!(left("SELECT count(*)::text FROM usage_counters").await, "1");
    assert_eq!(
        left("SELECT string_agg(state, ' ' ORDER BY id) FROM dsar_requests").await,
        "exported received"
    );
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log WHERE action = 'retention.purge'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(detail["deleted"]["usage"], 12_000, "{detail}");
    assert_eq!(detail["kept_for"]["usage"], "400d", "{detail}");
    // Nothing left to delete: no second audit row.
    let again =
        apitree::operator::gateway::sweep::sweep_gateway(&target, &http, chrono::Utc::now()).await;
    assert!(again.purged.is_empty(), "{:?}", again.purged);
    assert_eq!(
        left("SELECT count(*)::text FROM audit_log WHERE action = 'retention.purge'").await,
        "1"
    );
    let mut verifier = audit::ChainVerifier::new();
    for row in audit::read_rows(&pool, 0, 10_000).await.unwrap() {
        verifier.feed(&row).unwrap();
    }
    // A rule the operator would refuse (shorter than a day) deletes nothing, whatever the
    // spec says; a rule of millions of days keeps everything, without an error.
    let usage_before = left("SELECT count(*)::text FROM usage_counters").await;
    for (usage, problem) in [
        ("1h", Some("retention.usage is 1h, shorter than a day")),
        ("0s", Some("shorter than a day")),
        ("100000000d", None),
    ] {
        let policy = apitree::crd::gateway::RetentionSpec {
            usage: usage.parse().unwrap(),
            ..Default::default()
        };
        let out = db::retention::apply(&pool, &policy, chrono::Utc::now(), "test").await;
        assert_eq!(out.deleted.get("usage").copied().unwrap_or(0), 0, "{usage}");
        match problem {
            Some(p) => assert!(
                out.problems.iter().any(|x| x.contains(p)),
                "{usage}: {:?}",
                out.problems
            ),
            None => assert!(out.problems.is_empty(), "{usage}: {:?}", out.problems),
        }
    }
    assert_eq!(
        left("SELECT count(*)::text FROM usage_counters").await,
        usage_before
    );
}
