//! Schema drift on a real PostgreSQL: every kind of drift is found and classified, fixes are
//! applied once (even by concurrent fixers) and audited, and the committed snapshot stays true.

use std::process::Command;

use apitree::drift::fix::{check, fix};
use apitree::drift::history::HistoryState;
use apitree::drift::{expected, introspect::introspect, Kind, Risk, SNAPSHOT_COMMAND};
use sha2::{Digest, Sha384};

mod common;
use common::{exec, TestDb};

#[tokio::test]
async fn the_committed_snapshot_is_what_the_migrations_create() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let mut conn = pool.acquire().await.unwrap();
    let live = introspect(&mut conn, "public").await.unwrap();
    let snapshot = expected().unwrap();
    assert!(
        live == snapshot,
        "src/drift/expected-schema.json is stale: regenerate it with `{SNAPSHOT_COMMAND}`\n\
         differences: {:#?}",
        apitree::drift::diff(&snapshot, &live)
    );
    assert!(live.tables.len() >= 9, "{:?}", live.tables.keys());
}

#[tokio::test]
async fn a_migrated_database_is_in_sync_and_check_exits_0() {
    let db = TestDb::new().await;
    db.migrated_pool().await;
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["drift", "check", "--database-url", &db.url])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("in sync"));
}

/// The item about `object`, which must be reported.
fn reported<'a>(
    report: &'a apitree::drift::fix::Report,
    object: &str,
) -> &'a apitree::drift::DriftItem {
    report
        .items
        .iter()
        .find(|i| i.object == object)
        .unwrap_or_else(|| panic!("{object} not reported: {:#?}", report.items))
}

/// Six kinds of drift at once (a changed column type is added where a test wants it).
const DRIFT: &str = "
    DROP INDEX users_org_id_idx;
    ALTER TABLE users DROP COLUMN created_at;
    CREATE TABLE scratch (x int);
    ALTER TABLE api_keys DISABLE ROW LEVEL SECURITY;
    DROP POLICY tenant_isolation ON users;
    DROP TRIGGER audit_log_chain ON audit_log;
";

#[tokio::test]
async fn every_kind_of_drift_is_found_classified_and_exits_2() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    exec(&pool, DRIFT.to_string()).await.unwrap();
    exec(
        &pool,
        "ALTER TABLE orgs ALTER COLUMN name TYPE varchar(300)".into(),
    )
    .await
    .unwrap();
    let report = check(&pool, false).await.unwrap();
    let find = |object: &str| reported(&report, object);
    let expect = [
        ("index users_org_id_idx", Kind::Missing, Risk::Additive),
        ("column users.created_at", Kind::Missing, Risk::Additive),
        ("table scratch", Kind::Extra, Risk::Destructive),
        ("column orgs.name", Kind::Changed, Risk::Destructive),
        // The new type rewrites the CHECK constraint on the column too.
        (
            "constraint orgs.orgs_name_check",
            Kind::Changed,
            Risk::Destructive,
        ),
        (
            "row-level security on api_keys",
            Kind::Changed,
            Risk::Security,
        ),
        (
            "policy users.tenant_isolation",
            Kind::Missing,
            Risk::Security,
        ),
        (
            "trigger audit_log.audit_log_chain",
            Kind::Missing,
            Risk::Security,
        ),
    ];
    for (object, kind, risk) in expect {
        let i = find(object);
        assert_eq!((i.kind, i.risk), (kind, risk), "{object}");
    }
    assert_eq!(report.items.len(), expect.len(), "{:#?}", report.items);
    assert_eq!(find("table scratch").fix_sql, None);
    let summary = report.summary("now".into());
    assert_eq!(
        (
            summary.missing,
            summary.extra,
            summary.changed,
            summary.security
        ),
        (4, 1, 3, 3)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args([
            "drift",
            "check",
            "--format",
            "json",
            "--database-url",
            &db.url,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), expect.len());
    assert!(String::from_utf8_lossy(&out.stderr).contains("8 drift finding(s)"));
}

#[tokio::test]
async fn fix_restores_missing_and_security_drift_once_and_audits_each_fix() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    exec(&pool, DRIFT.to_string()).await.unwrap();
    let done = fix(&pool, false, false, "test:drift").await.unwrap();
    let fixed: Vec<&str> = done.applied.iter().map(|i| i.object.as_str()).collect();
    assert_eq!(fixed.len(), 5, "{fixed:?}");
    assert!(fixed.contains(&"trigger audit_log.audit_log_chain"));
    // Only the extra table is left, reported.
    assert_eq!(done.after.items.len(), 1, "{:#?}", done.after.items);
    assert_eq!(done.after.items[0].object, "table scratch");
    // RLS is really back: the policy filters for a role other than the owner.
    let rls: bool =
        sqlx::query_scalar("SELECT relrowsecurity FROM pg_class WHERE relname = 'api_keys'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(rls);
    // One audit entry per fix, chained by the restored trigger.
    let audited: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT target, hash FROM audit_log WHERE action = 'drift.fix' ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(audited.len(), 5);
    assert!(
        audited.iter().all(|(_, hash)| hash.len() == 32),
        "{audited:?}"
    );
    // Idempotent.
    let again = fix(&pool, false, false, "test:drift").await.unwrap();
    assert!(again.applied.is_empty(), "{:#?}", again.applied);
}

#[tokio::test]
async fn concurrent_fixers_never_apply_a_fix_twice() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    exec(&pool, DRIFT.to_string()).await.unwrap();
    let (a, b) = tokio::join!(
        fix(&pool, false, false, "fixer-a"),
        fix(&pool, false, false, "fixer-b")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.applied.len() + b.applied.len(), 5, "{a:#?}\n{b:#?}");
    assert!(a.applied.is_empty() || b.applied.is_empty());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'drift.fix'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 5);
}

#[tokio::test]
async fn a_changed_column_is_rewritten_only_with_allow_changed() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    exec(
        &pool,
        "ALTER TABLE orgs ALTER COLUMN name TYPE varchar(300)".into(),
    )
    .await
    .unwrap();
    let done = fix(&pool, false, false, "t").await.unwrap();
    assert!(done.applied.is_empty());
    assert_eq!(done.left[0].object, "column orgs.name");
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["drift", "fix", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("rerun with --allow-changed"));
    let done = fix(&pool, true, false, "t").await.unwrap();
    let fixed: Vec<&str> = done.applied.iter().map(|i| i.object.as_str()).collect();
    assert_eq!(
        fixed,
        ["column orgs.name", "constraint orgs.orgs_name_check"]
    );
    assert!(done.after.in_sync(), "{:#?}", done.after);
}

/// `drift fix` records who ran it like every other admin command: the OS user, with
/// `--actor` only as a label.
#[tokio::test]
async fn a_drift_fix_is_audited_under_the_os_user() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    exec(&pool, "DROP INDEX apis_org_id_idx".into())
        .await
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args([
            "drift",
            "fix",
            "--actor",
            "TICKET-9",
            "--database-url",
            &db.url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The chain holds a reference; the OS user and the label are the subject's (see dsar).
    let actors: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT a.actor, d.kind, d.label FROM audit_log a
           JOIN data_subjects d ON a.actor = 'subject:' || d.id::text
          WHERE a.action = 'drift.fix'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!actors.is_empty());
    for (_, kind, label) in actors {
        assert_eq!(kind, "os");
        assert!(label.ends_with(" (TICKET-9)"), "{label}");
    }
}

#[tokio::test]
async fn a_dropped_sequence_is_recreated_after_the_highest_id_and_a_renamed_enum_label_is_reported()
{
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    exec(
        &pool,
        "INSERT INTO notification_outbox (dedupe_key, channel, method, payload)
         SELECT 'k' || g, 'C1', 'chat.postMessage', '{}' FROM generate_series(1, 5) g;
         DROP SEQUENCE notification_outbox_id_seq CASCADE;
         ALTER TYPE incident_severity RENAME VALUE 'high' TO 'major';"
            .into(),
    )
    .await
    .unwrap();
    let report = check(&pool, false).await.unwrap();
    let find = |object: &str| reported(&report, object).clone();
    let seq = find("sequence notification_outbox_id_seq");
    assert_eq!((seq.kind, seq.risk), (Kind::Missing, Risk::Additive));
    // DROP … CASCADE took the column's default with it.
    let default = find("column notification_outbox.id");
    assert_eq!(
        (default.kind, default.risk),
        (Kind::Changed, Risk::Additive)
    );
    let labels = find("enum type incident_severity");
    assert_eq!(
        (labels.kind, labels.risk),
        (Kind::Changed, Risk::Destructive)
    );
    assert!(labels.detail.contains("major"), "{}", labels.detail);
    assert!(
        labels.fix_sql.is_none(),
        "a renamed label is a person's call"
    );

    let done = fix(&pool, false, false, "t").await.unwrap();
    let fixed: Vec<&str> = done.applied.iter().map(|i| i.object.as_str()).collect();
    assert_eq!(
        fixed,
        [
            "sequence notification_outbox_id_seq",
            "column notification_outbox.id"
        ]
    );
    // Inserts work again and continue after the rows that were there.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO notification_outbox (dedupe_key, channel, method, payload)
         VALUES ('k6', 'C1', 'chat.postMessage', '{}') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(id, 6);
    let left: Vec<String> = done.after.items.iter().map(|i| i.object.clone()).collect();
    assert_eq!(left, ["enum type incident_severity"]);
}

/// Makes the database say the first migration was applied from `applied_sql` (what
/// `apitree migrate` records when it applies a text: its checksum and, unless `fingerprint` is
/// false, its whitespace-insensitive fingerprint).
async fn applied_as(pool: &sqlx::PgPool, applied_sql: &str, fingerprint: bool) -> i64 {
    let first = apitree::db::MIGRATOR.iter().next().unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2")
        .bind(Sha384::digest(applied_sql.as_bytes()).to_vec())
        .bind(first.version)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM apitree_migration_fingerprints WHERE version = $1")
        .bind(first.version)
        .execute(pool)
        .await
        .unwrap();
    if fingerprint {
        sqlx::query(
            "INSERT INTO apitree_migration_fingerprints (version, fingerprint) VALUES ($1, $2)",
        )
        .bind(first.version)
        .bind(apitree::db::migration_fingerprint(applied_sql))
        .execute(pool)
        .await
        .unwrap();
    }
    first.version
}

#[tokio::test]
async fn an_edited_migration_is_reported_and_a_whitespace_change_is_cosmetic() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let first = apitree::db::MIGRATOR.iter().next().unwrap();
    let file = first.sql.as_str();
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM apitree_migration_fingerprints")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        recorded as usize,
        apitree::db::MIGRATOR.iter().count(),
        "migrate records a fingerprint per migration"
    );
    // Applied with CRLF line endings (no fingerprint: an older release applied it).
    applied_as(&pool, &file.replace('\n', "\r\n"), false).await;
    let report = check(&pool, false).await.unwrap();
    assert_eq!(report.history.len(), 1);
    assert_eq!(report.history[0].state, HistoryState::Cosmetic);
    assert!(report.in_sync(), "cosmetic history is not drift");
    // Applied with more whitespace than the file has now (blank lines, indentation removed
    // since): only the fingerprint can tell.
    let roomier = file.replace('\n', "\n\n    ");
    applied_as(&pool, &roomier, false).await;
    assert_eq!(
        check(&pool, false).await.unwrap().history[0].state,
        HistoryState::Edited
    );
    applied_as(&pool, &roomier, true).await;
    assert_eq!(
        check(&pool, false).await.unwrap().history[0].state,
        HistoryState::Cosmetic
    );
    // A real edit.
    let version = applied_as(&pool, "CREATE TABLE something_else (x int);", true).await;
    let report = check(&pool, false).await.unwrap();
    assert_eq!(report.history[0].state, HistoryState::Edited);
    assert_eq!(report.history[0].version, version);
    assert!(!report.in_sync());
}

fn sweeper() -> (
    apitree::operator::gateway::sweep::Sweeper,
    prometheus::Registry,
) {
    let registry = prometheus::Registry::new();
    let metrics = apitree::operator::gateway::sweep::SweepMetrics::register(&registry);
    common::gateway::install_crypto();
    (
        apitree::operator::gateway::sweep::Sweeper::new(metrics, reqwest::Client::new()),
        registry,
    )
}

#[tokio::test]
async fn the_health_sweep_fixes_drift_under_auto_only_reports_it_otherwise_and_never_overlaps() {
    use apitree::crd::gateway::DriftPolicy;
    use apitree::operator::gateway::sweep::SweepTarget;
    let (auto_db, report_db) = (TestDb::new().await, TestDb::new().await);
    for db in [&auto_db, &report_db] {
        let pool = db.migrated_pool().await;
        exec(&pool, DRIFT.to_string()).await.unwrap();
    }
    let targets = vec![
        SweepTarget {
            gateway: "ns/auto".into(),
            database_url: Some(auto_db.url.clone()),
            policy: DriftPolicy::Auto,
            upstreams: Vec::new(),
            unresolved: None,
            retention: Default::default(),
        },
        SweepTarget {
            gateway: "ns/report".into(),
            database_url: Some(report_db.url.clone()),
            policy: DriftPolicy::Report,
            upstreams: Vec::new(),
            unresolved: None,
            retention: Default::default(),
        },
    ];
    let (sweeper, _registry) = sweeper();
    let now = chrono::Utc::now();
    // Two runs at once: the second is skipped, not queued behind the first.
    let (a, b) = tokio::join!(sweeper.run(&targets, now), sweeper.run(&targets, now));
    let outcomes = a.or(b).expect("one run went ahead");
    assert_eq!(
        sweeper.metrics.runs.with_label_values(&["skipped"]).get(),
        1
    );
    let auto = &outcomes[0];
    assert_eq!(auto.fixed.len(), 5, "{auto:#?}");
    let found = auto.found.as_ref().expect("what was found before the fix");
    assert_eq!((found.missing, found.security), (4, 3), "{found:?}");
    let d = auto.drift.as_ref().unwrap();
    assert_eq!((d.missing, d.changed, d.security, d.extra), (0, 0, 0, 1));
    let report = &outcomes[1];
    assert!(report.fixed.is_empty());
    assert!(
        report.found.is_none(),
        "only a fixing sweep says what it found first"
    );
    let d = report.drift.as_ref().unwrap();
    assert_eq!((d.missing, d.security), (4, 3), "{d:?}");
    assert!(outcomes.iter().all(|o| o.problems.is_empty()));
    assert_eq!(sweeper.metrics.runs.with_label_values(&["ok"]).get(), 1);
    assert!(sweeper.metrics.last_success.get() > 0);
}

/// An upstream stand-in: `/health` 200, `/v1/status` 503, `/slow` after 2 s, `/redirect` 302
/// elsewhere, anything else 404.
async fn start_probed_upstream() -> std::net::SocketAddr {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.uri().path() == "/redirect" {
                            return Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(302)
                                    .header("location", "http://127.0.0.1:1/health")
                                    .body(Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            );
                        }
                        let status = match req.uri().path() {
                            "/health" => 200,
                            "/v1/status" => 503,
                            "/slow" => {
                                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                                200
                            }
                            _ => 404,
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The sweep probes every route's upstream and every API registered in the gateway's
/// database, each as its probe says (a path resolved against the upstream URL, a status, a
/// timeout) or, without one, "answers HTTP at all": up, a wrong status, no answer in time, a
/// refused connection — each with the reason an SRE would want to read, never with the
/// credentials an upstream URL may carry; a redirect is an answer, not followed elsewhere.
#[tokio::test]
async fn the_sweep_probes_each_routes_upstream_and_every_registered_api() {
    use apitree::crd::gateway::{DriftPolicy, UpstreamProbe};
    use apitree::operator::gateway::sweep::{sweep_gateway, SweepTarget, Upstream};
    common::gateway::install_crypto();
    let up = start_probed_upstream().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let probe = |path: &str, status: u16, ms: u64| {
        Some(UpstreamProbe {
            path: path.into(),
            expect_status: status,
            timeout: apitree::crd::duration::KubeDuration::from_millis(ms),
        })
    };
    let route = |route: &str, url: String, probe| Upstream {
        route: route.into(),
        url,
        probe,
    };
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let org = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO orgs (id, name) VALUES ($1, 'acme')")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    for (name, url) in [
        ("registered-up", format!("http://{up}/anything/")),
        ("registered-down", format!("http://{closed}/")),
        // Also a spec route: probed once, as the spec says.
        ("healthy", format!("http://{closed}/")),
    ] {
        sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, $3, $4, $5)")
            .bind(uuid::Uuid::new_v4())
            .bind(org)
            .bind(name)
            .bind(format!("/{name}/"))
            .bind(url)
            .execute(&pool)
            .await
            .unwrap();
    }
    let target = SweepTarget {
        gateway: "ns/shop".into(),
        database_url: Some(db.url.clone()),
        policy: DriftPolicy::Off,
        retention: Default::default(),
        upstreams: vec![
            route(
                "healthy",
                format!("http://{up}/v1/"),
                probe("/health", 200, 1000),
            ),
            route(
                "relative",
                format!("http://{up}/v1/"),
                probe("status", 200, 1000),
            ),
            route(
                "expects-503",
                format!("http://{up}/v1/"),
                probe("status", 503, 1000),
            ),
            route("slow", format!("http://{up}/"), probe("slow", 200, 200)),
            route("any-answer", format!("http://{up}/missing/"), None),
            route("refused", format!("http://{closed}/api/"), None),
            route(
                "redirected",
                format!("http://{up}/"),
                probe("redirect", 200, 1000),
            ),
            route(
                "with-password",
                format!("http://probe:s3cret@{closed}/"),
                None,
            ),
        ],
        unresolved: None,
    };
    let out = sweep_gateway(
        &target,
        &apitree::operator::gateway::sweep::probe_client(),
        chrono::Utc::now(),
    )
    .await;
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let got: Vec<(String, String, Option<String>)> = out
        .probed
        .iter()
        .map(|p| (p.route.clone().unwrap(), p.target.clone(), p.down.clone()))
        .collect();
    let want = [
        ("healthy", format!("http://{up}/health"), None),
        (
            "relative",
            format!("http://{up}/v1/status"),
            Some(format!(
                "GET http://{up}/v1/status answered 503, expected 200"
            )),
        ),
        ("expects-503", format!("http://{up}/v1/status"), None),
        (
            "slow",
            format!("http://{up}/slow"),
            Some(format!("GET http://{up}/slow had no answer within 200 ms")),
        ),
        ("any-answer", format!("http://{up}/missing/"), None),
        (
            "refused",
            format!("http://{closed}/api/"),
            Some(String::new()),
        ),
        (
            "redirected",
            format!("http://{up}/redirect"),
            Some(format!(
                "GET http://{up}/redirect answered 302, expected 200"
            )),
        ),
        (
            "with-password",
            format!("http://{closed}/"),
            Some(String::new()),
        ),
        (
            "registered-down",
            format!("http://{closed}/"),
            Some(String::new()),
        ),
        ("registered-up", format!("http://{up}/anything/"), None),
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    assert!(!format!("{got:?}").contains("s3cret"), "{got:?}");
    for ((route, target, down), (w_route, w_target, w_down)) in got.iter().zip(&want) {
        assert_eq!((route.as_str(), target), (*w_route, w_target));
        match (down, w_down) {
            // A refused connection: the reason names the URL and says so.
            (Some(d), Some(w)) if w.is_empty() => {
                assert!(d.starts_with(&format!("GET {target}: ")), "{d}");
                assert!(d.to_lowercase().contains("connect"), "{d}");
            }
            _ => assert_eq!(down, w_down, "{route}"),
        }
    }
}

#[tokio::test]
async fn an_unreachable_database_is_a_failed_sweep_run_with_the_reason() {
    use apitree::crd::gateway::DriftPolicy;
    let (sweeper, _registry) = sweeper();
    let target = apitree::operator::gateway::sweep::SweepTarget {
        gateway: "ns/down".into(),
        database_url: Some("postgres://postgres@127.0.0.1:1/none".into()),
        policy: DriftPolicy::Auto,
        upstreams: Vec::new(),
        unresolved: None,
        retention: Default::default(),
    };
    let out = sweeper.run(&[target], chrono::Utc::now()).await.unwrap();
    assert!(
        out[0].problems[0].contains("cannot connect to PostgreSQL at"),
        "{:?}",
        out[0].problems
    );
    assert_eq!(sweeper.metrics.runs.with_label_values(&["failed"]).get(), 1);
    assert_eq!(sweeper.metrics.last_success.get(), 0);
}

#[tokio::test]
async fn the_scheduler_runs_the_sweep_again_and_again() {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    let mut scheduler =
        apitree::operator::gateway::sweep::every(std::time::Duration::from_secs(1), move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Three runs, and not faster than one a second (the first may come at once).
    common::until_within("three runs", std::time::Duration::from_secs(15), || {
        runs.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    let took = started.elapsed();
    scheduler.shutdown().await.unwrap();
    assert!(
        took >= std::time::Duration::from_millis(1900),
        "three runs in {took:?} at one per second"
    );
}

/// An `upstream down` incident outlives an operator restart (it is in the state database), and
/// the first sweep after the restart whose gateway no longer has that route resolves it — the
/// new process knows it from the database, not from its own memory.
#[tokio::test]
async fn an_upstream_down_incident_of_a_route_removed_meanwhile_resolves_after_a_restart() {
    use apitree::detect::engine::IncidentStore;
    use apitree::detect::IncidentEvent;
    use apitree::notify::Notifier;
    use apitree::operator::gateway::rollout::Managed;
    use apitree::operator::gateway::sweep::{Probed, SweepOutcome};
    use std::sync::Arc;
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let sweep = |route: &str, down: Option<&str>| SweepOutcome {
        gateway: "shop".into(),
        at: chrono::Utc::now(),
        drift: None,
        found: None,
        fixed: Vec::new(),
        revoked: Vec::new(),
        purged: Default::default(),
        probed: vec![Probed {
            route: Some(route.into()),
            target: format!("http://{route}.svc/"),
            down: down.map(str::to_string),
        }],
        problems: Vec::new(),
    };
    let process = |notifier: Arc<Notifier>| {
        Managed::new(
            "shop",
            serde_json::from_value(serde_json::json!({"replicas": 1, "proxy": {"routes": []}}))
                .unwrap(),
            1,
            notifier,
            Arc::new(IncidentStore::Postgres(pool.clone())),
            None,
        )
    };
    let mut before = process(Arc::new(Notifier::recording()));
    before.runtime.sweep = Some(sweep(
        "legacy",
        Some("GET http://legacy.svc/: cannot connect"),
    ));
    before
        .apply_sweep(k8s_openapi::jiff::Timestamp::now())
        .await;
    drop(before);
    let open = |pool: sqlx::PgPool| async move {
        IncidentStore::Postgres(pool)
            .open()
            .await
            .unwrap()
            .into_iter()
            .map(|i| (i.route, i.signal))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        open(pool.clone()).await,
        [("legacy".to_string(), "upstream down".to_string())]
    );

    let notifier = Arc::new(Notifier::recording());
    let mut after = process(notifier.clone());
    after.runtime.sweep = Some(sweep("current", None));
    after.apply_sweep(k8s_openapi::jiff::Timestamp::now()).await;
    let told: Vec<_> = notifier
        .recorded()
        .iter()
        .map(|n| (n.route.clone(), n.event))
        .collect();
    assert_eq!(told, [("legacy".to_string(), IncidentEvent::Resolve)]);
    assert!(open(pool.clone()).await.is_empty());
}
