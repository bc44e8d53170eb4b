//! The `apitree` binary as a user runs it.

mod common;

use common::pki::Pki;

use std::process::{Command, Output};

fn apitree(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("APITREE_DATABASE_URL")
        .output()
        .expect("run apitree")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn migrate_with_a_malformed_url_says_what_is_expected() {
    let out = apitree(&["migrate", "--database-url", "mysql://root:pw@localhost/x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: invalid database URL"), "{err}");
    assert!(err.contains("postgres://USER"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn migrate_against_an_unreachable_server_names_it_and_never_shows_the_password() {
    let out = apitree(&[
        "migrate",
        "--database-url",
        "postgres://app:hunter2-secret@127.0.0.1:1/gw",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to PostgreSQL at 127.0.0.1:1/gw"),
        "{err}"
    );
    assert!(err.contains("check that PostgreSQL is running"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn migrate_without_a_url_explains_where_it_looks() {
    let out = apitree(&["migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("pass --database-url, or set APITREE_DATABASE_URL or DATABASE_URL")
    );
}

#[test]
fn migrate_against_a_missing_database_says_to_create_it() {
    let url = format!("{}/apitree_no_such_db", common::server_url());
    let out = apitree(&["migrate", "--database-url", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("create the database"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn migrate_applies_and_is_idempotent_via_database_url_env() {
    let tdb = common::TestDb::new().await;
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
            .args(["migrate", "--log-format", "json"])
            .env("DATABASE_URL", &tdb.url)
            .env_remove("APITREE_DATABASE_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let line = stderr(&out);
        let log: serde_json::Value =
            serde_json::from_str(line.lines().last().unwrap()).expect("json log line");
        assert_eq!(log["message"], "database is at the latest schema");
    }
}

/// Another application's database (tables, no apitree migration history) is refused by
/// `migrate`, `drift check` and `drift fix`, and left exactly as it was; `--adopt` is the
/// explicit way in.
#[tokio::test]
async fn commands_refuse_to_reshape_a_database_that_is_not_apitrees() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.pool().await;
    common::exec(
        &pool,
        "CREATE TABLE users (id serial PRIMARY KEY, name text); INSERT INTO users (name) VALUES ('x')"
            .into(),
    )
    .await
    .unwrap();
    for args in [
        &["migrate"][..],
        &["drift", "check"],
        &["drift", "fix"],
        &["drift", "fix", "--allow-changed"],
    ] {
        let mut all = args.to_vec();
        all.extend(["--database-url", &tdb.url]);
        let out = apitree(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("another application's database") && err.contains("--adopt"),
            "{args:?}: {err}"
        );
    }
    let (tables, rls): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_tables WHERE schemaname = 'public'), \
                (SELECT relrowsecurity FROM pg_class WHERE relname = 'users')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (tables, rls),
        (1, false),
        "the other application's table is untouched"
    );
    sqlx::query("INSERT INTO users (name) VALUES ('still works')")
        .execute(&pool)
        .await
        .unwrap();

    // Told explicitly, a database with unrelated tables is taken over.
    let other = common::TestDb::new().await;
    let pool = other.pool().await;
    common::exec(&pool, "CREATE TABLE legacy_notes (id int)".into())
        .await
        .unwrap();
    let out = apitree(&["migrate", "--adopt", "--database-url", &other.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    // From then on it has apitree's history: no --adopt needed.
    let out = apitree(&["drift", "check", "--database-url", &other.url]);
    assert_ne!(out.status.code(), Some(1), "{}", stderr(&out));
}

/// `drift snapshot` writes the reference from an empty database only: a used one (migrated
/// before, or with its own tables) could carry drift into it; the fresh snapshot is the
/// committed reference.
#[tokio::test]
async fn a_drift_snapshot_is_taken_of_an_empty_database_only() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("schema.json");
    let out_arg = out_file.to_str().unwrap();
    let used = common::TestDb::new().await;
    assert!(apitree(&["migrate", "--database-url", &used.url])
        .status
        .success());
    let out = apitree(&[
        "drift",
        "snapshot",
        "--database-url",
        &used.url,
        "--out",
        out_arg,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("snapshot an empty one"),
        "{}",
        stderr(&out)
    );
    assert!(!out_file.exists());
    let fresh = common::TestDb::new().await;
    let out = apitree(&[
        "drift",
        "snapshot",
        "--database-url",
        &fresh.url,
        "--out",
        out_arg,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/drift/expected-schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        written, committed,
        "the committed reference is what the migrations create"
    );
}

/// `migrate` on a database whose migrations are all applied but a table was dropped since says
/// so (exit 1) instead of "at the latest schema".
#[tokio::test]
async fn migrate_reports_a_dropped_table_instead_of_claiming_the_latest_schema() {
    let tdb = common::TestDb::new().await;
    let out = apitree(&["migrate", "--database-url", &tdb.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pool = tdb.pool().await;
    common::exec(&pool, "DROP TABLE usage_counters CASCADE".into())
        .await
        .unwrap();
    let out = apitree(&["migrate", "--database-url", &tdb.url]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("usage_counters") && err.contains("drift fix"),
        "{err}"
    );
}

#[test]
fn crds_prints_every_crd_and_writes_files() {
    let out = apitree(&["crds"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let names: Vec<&str> = docs
        .iter()
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["apigateways.apitree.io", "credentialpolicies.apitree.io"]
    );

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("nested/crds");
    let out = apitree(&["crds", "--out", target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.join("apigateways.apitree.io.yaml").exists());
    assert!(target.join("credentialpolicies.apitree.io.yaml").exists());
}

#[test]
fn a_bad_log_filter_is_refused_with_an_example() {
    let out = apitree(&["--log-filter", "apitree=loud", "crds"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid log filter"),
        "{}",
        stderr(&out)
    );
}

fn apitree_stdin(args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_apitree"));
    cmd.args(args)
        .env_remove("APITREE_KEY_PEPPER")
        .env_remove("APITREE_MASTER_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn proxy_with_an_invalid_config_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen: nope\nkeys:\n  - { prefix: at_live_x, hash: zz, org: ghost, scope: live }\nroutes:\n  - { name: a, pathPrefix: /a/, upstream: \"ftp://x\", tier: gold }\n",
    )
    .unwrap();
    let out = apitree_stdin(
        &["proxy", "--config", path.to_str().unwrap()],
        &[("APITREE_KEY_PEPPER", "p-0123456789-0123456789-0123456789")],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    for want in [
        "listen:",
        "keys[0].hash:",
        "keys[0].org:",
        "routes[0].upstream:",
        "routes[0].tier:",
    ] {
        assert!(err.contains(want), "{want} missing from:\n{err}");
    }
    assert!(
        err.contains("5 problem(s)") || err.contains("problem(s)"),
        "{err}"
    );
}

#[test]
fn proxy_refuses_to_start_without_a_pepper() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "routes:\n  - { name: a, pathPrefix: /a/, upstream: \"http://127.0.0.1:1/\" }\n",
    )
    .unwrap();
    let out = apitree_stdin(&["proxy", "--config", path.to_str().unwrap()], &[], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no key pepper"), "{}", stderr(&out));
}

#[test]
fn pii_scan_masks_stdin_and_lists_findings() {
    let text = "고객 주민번호 900101-1234568, 연락처 010-1234-5678\norder 12345\n";
    let out = apitree_stdin(&["pii", "scan", "--mask"], &[], text);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout.clone()).unwrap(),
        "고객 주민번호 900101-1******, 연락처 010-****-5678\norder 12345\n"
    );
    assert!(stderr(&out).contains("rrn=1, phone=1"));

    let out = apitree_stdin(&["pii", "scan", "--format", "json"], &[], text);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["counts"]["rrn"], 1);
    assert_eq!(doc["findings"][0]["line"], 1);
    assert_eq!(doc["findings"][0]["column"], 9);
    assert_eq!(doc["findings"][1]["masked"], "010-****-5678");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("1234568"),
        "findings are reported masked"
    );
}

/// `apitree … | head -1`: every command that writes to stdout ends quietly (exit 0, no panic,
/// no error line) when its reader goes away, whatever the output mode.
#[test]
fn commands_end_quietly_when_the_reader_goes_away() {
    use std::io::{BufRead, Write};
    let many = "연락처 010-1234-5678\n".repeat(50_000);
    let csv = {
        let mut t = String::from("timestamp,requests,errors\n");
        for i in 0..20_000 {
            t.push_str(&format!("{},{},{}\n", 1_700_000_000 + i * 60, 1000, 5));
        }
        t
    };
    let cases: [(&[&str], &str); 4] = [
        (&["pii", "scan"], &many),
        (&["pii", "scan", "--format", "json"], &many),
        (&["pii", "scan", "--mask"], &many),
        (&["detect", "replay", "--input", "-"], &csv),
    ];
    for (args, input) in cases {
        let mut child = Command::new(env!("CARGO_BIN_EXE_apitree"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // The reader goes away after one line.
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let err = stderr(&out);
        assert!(!first.is_empty(), "{args:?} printed nothing: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn keys_hash_prints_the_stored_form_and_refuses_typos() {
    let pepper = "p-0123456789-0123456789-0123456789";
    let key = apitree::entities::keys::ApiKey::generate(apitree::crd::gateway::KeyScope::Test);
    let out = apitree_stdin(
        &["keys", "hash", "-", "--org", "acme"],
        &[("APITREE_KEY_PEPPER", pepper)],
        key.expose_secret(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let entry = String::from_utf8(out.stdout).unwrap();
    let want = apitree::entities::keys::Pepper::new(pepper.as_bytes().to_vec())
        .unwrap()
        .hash(&key)
        .to_hex();
    assert!(
        entry.contains(&format!("hash: {want}"))
            && entry.contains("scope: test")
            && entry.contains("org: acme"),
        "{entry}"
    );
    assert!(!entry.contains(key.expose_secret()));

    let out = apitree_stdin(
        &["keys", "hash", "at_test_short"],
        &[("APITREE_KEY_PEPPER", pepper)],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wrong length"), "{}", stderr(&out));
}

#[tokio::test]
async fn the_proxy_example_runs_as_is_and_its_documented_keys_work() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = repo.join("examples/proxy.yaml");
    let text = std::fs::read_to_string(&example).unwrap();
    let keys: Vec<String> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("#   live: ")
                .or_else(|| l.strip_prefix("#   test: "))
        })
        .map(|k| k.trim().to_string())
        .collect();
    assert_eq!(keys.len(), 2, "the example documents a live and a test key");
    let opts = common::gateway::proxy_options(example);
    let prepared = apitree::proxy::prepare(&opts)
        .await
        .expect("the example starts as-is");
    let addr = prepared.listener.local_addr().unwrap();
    tokio::spawn(apitree::proxy::transport::workers::run(
        prepared.gateway,
        prepared.listener,
        prepared.admin,
        std::future::pending(),
        prepared.settings,
    ));
    let client = reqwest::Client::new();
    // Nothing listens on the example upstream port here, so allowed requests get 502; what
    // matters is that both keys authenticate and that 40 quick requests meet the limit.
    let test_on_live_only = client
        .get(format!("http://{addr}/live-only/"))
        .bearer_auth(&keys[1])
        .send()
        .await
        .unwrap();
    assert_eq!(test_on_live_only.status(), 403);
    let mut limited = 0;
    for _ in 0..40 {
        let s = client
            .get(format!("http://{addr}/demo/"))
            .bearer_auth(&keys[0])
            .send()
            .await
            .unwrap()
            .status();
        assert_ne!(s, 401, "the documented live key must authenticate");
        if s == 429 {
            limited += 1;
        }
    }
    assert!(
        limited >= 10,
        "40 quick requests should see 429s, saw {limited}"
    );
}

#[tokio::test]
async fn orgs_and_keys_admin_commands_print_ids_keys_and_grace() {
    let tdb = common::TestDb::new().await;
    let _pool = tdb.migrated_pool().await;
    let pepper = ("APITREE_KEY_PEPPER", "p-0123456789-0123456789-0123456789");
    let db = ("APITREE_DATABASE_URL", tdb.url.as_str());
    let out = apitree_stdin(&["orgs", "create", "acme", "--actor", "ops"], &[db], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let org = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(uuid::Uuid::parse_str(&org).is_ok(), "{org}");

    let out = apitree_stdin(
        &[
            "keys",
            "create",
            "--org",
            &org,
            "--scope",
            "live",
            "--daily-quota",
            "100",
        ],
        &[db, pepper],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let key = String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    assert!(
        apitree::entities::keys::ApiKey::parse(&key).is_ok(),
        "{key}"
    );
    assert!(stderr(&out).contains("only time it is shown"));

    let out = apitree_stdin(&["keys", "list", "--format", "json"], &[db], "");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["prefix"], &key[..16]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&key),
        "list never shows keys"
    );
    let id = rows[0]["id"].as_str().unwrap().to_string();

    let out = apitree_stdin(&["keys", "rotate", &id, "--grace", "2h"], &[db, pepper], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("the old key {} stays valid until", &key[..16])),
        "{err}"
    );
    let out = apitree_stdin(&["keys", "rotate", &id], &[db, pepper], "");
    assert_eq!(out.status.code(), Some(1), "a key is rotated once");
    assert!(stderr(&out).contains("no active, unrotated key"));

    let out = apitree_stdin(&["keys", "revoke", &id], &[db], "");
    assert!(out.status.success());
    let out = apitree_stdin(&["keys", "list"], &[db], "");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("revoked") && table.contains("active"),
        "{table}"
    );
}

#[tokio::test]
async fn audit_verify_passes_an_intact_chain_and_names_the_first_altered_row() {
    let tdb = common::TestDb::new().await;
    let pool = tdb.migrated_pool().await;
    for i in 0..5 {
        apitree::db::audit::append(
            &pool,
            "ops",
            "key.create",
            &format!("at_live_{i:08}"),
            None,
            &serde_json::json!({"i": i}),
        )
        .await
        .unwrap();
    }
    let db = ("APITREE_DATABASE_URL", tdb.url.as_str());
    let out = apitree_stdin(&["audit", "verify"], &[db], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 rows verified"));

    common::exec(&pool, "ALTER TABLE audit_log DISABLE TRIGGER USER; UPDATE audit_log SET detail = '{\"i\": 99}' WHERE id = 3; ALTER TABLE audit_log ENABLE TRIGGER USER".into())
        .await
        .unwrap();
    let out = apitree_stdin(&["audit", "verify"], &[db], "");
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("BROKEN at row 3"), "{}", stderr(&out));

    // A role that row-level security filters sees no rows: it must not certify the (tampered)
    // chain as intact, and says why.
    let role = format!("auditor_{}", &tdb.name[10..]);
    common::exec(
        &pool,
        format!(
            "CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {db} TO {role}; \
             GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON audit_log TO {role}",
            db = tdb.name
        ),
    )
    .await
    .unwrap();
    let as_role = tdb
        .url
        .replacen("postgres://postgres", &format!("postgres://{role}"), 1);
    let as_role = as_role.replacen(":postgres@", "@", 1);
    let out = apitree_stdin(
        &["audit", "verify"],
        &[("APITREE_DATABASE_URL", as_role.as_str())],
        "",
    );
    let err = stderr(&out);
    common::exec(&pool, format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("row-level security filters audit_log"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("intact"));
}

/// A PostgreSQL of the test's own, speaking TLS with a certificate for `localhost` only,
/// issued by a CA made for it; stopped (immediately) when dropped.
struct TlsPostgres {
    pki: Pki,
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl TlsPostgres {
    /// `program`, as the `postgres` user when we are root (initdb and postgres refuse root).
    fn as_server_user(program: &std::path::Path) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .expect("PostgreSQL's server binaries under /usr/lib/postgresql (scripts/test installs them)");
        let run = |cmd: &mut Command, what: &str| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(out.status.success(), "{what}: {}", stderr(&out));
        };
        let pki = Pki::new();
        pki.issue_for("server", 2, "DNS:localhost");
        // The server's own directory: its data, and its pair (the key readable by it alone).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        for f in ["server.crt", "server.key"] {
            std::fs::copy(pki.path(f), path.join(f)).unwrap();
        }
        let data = path.join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(path),
                "chown",
            );
        }
        run(
            Command::new("chmod")
                .args(["0600"])
                .arg(path.join("server.key")),
            "chmod",
        );
        run(
            Self::as_server_user(&bin.join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data),
            "initdb",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=localhost -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c fsync=off",
            path.display(),
            path.join("server.crt").display(),
            path.join("server.key").display()
        );
        run(
            Self::as_server_user(&bin.join("pg_ctl"))
                .args(["-w", "-t", "30", "-l"])
                .arg(path.join("log"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &opts, "start"]),
            "pg_ctl start",
        );
        Self {
            pki,
            dir,
            port,
            bin,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Self::as_server_user(&self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Against a PostgreSQL the test starts with TLS (a certificate for `localhost`, from a CA of
/// its own): `sslmode=verify-full` with `sslrootcert` connects and migrates; it refuses a host
/// the certificate does not name (where `verify-ca` still connects) and a CA that did not sign
/// the certificate, each with a message that says what to check (not "check the network").
#[tokio::test]
async fn postgres_tls_is_verified_against_sslrootcert_and_a_wrong_ca_is_refused_clearly() {
    let pg = tokio::task::spawn_blocking(TlsPostgres::start)
        .await
        .unwrap();
    let root = format!("sslrootcert={}", pg.pki.path("ca.crt").display());
    let migrate = |url: String| {
        tokio::task::spawn_blocking(move || apitree(&["migrate", "--database-url", &url]))
    };
    let ok = migrate(pg.url("localhost", &format!("sslmode=verify-full&{root}")))
        .await
        .unwrap();
    assert!(ok.status.success(), "verify-full: {}", stderr(&ok));
    // The connection really is TLS: the server says so.
    let pool = sqlx::PgPool::connect(&pg.url("localhost", &format!("sslmode=verify-full&{root}")))
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl);
    pool.close().await;
    // 127.0.0.1 is not on the certificate: verify-full refuses it, verify-ca does not check names.
    let wrong_host = migrate(pg.url("127.0.0.1", &format!("sslmode=verify-full&{root}")))
        .await
        .unwrap();
    let err = stderr(&wrong_host);
    assert_eq!(wrong_host.status.code(), Some(1), "{err}");
    assert!(err.contains("a name the certificate carries"), "{err}");
    let ca_only = migrate(pg.url("127.0.0.1", &format!("sslmode=verify-ca&{root}")))
        .await
        .unwrap();
    assert!(ca_only.status.success(), "verify-ca: {}", stderr(&ca_only));
    // Another CA: refused, and the message points at sslrootcert.
    let other = Pki::new();
    let other_ca = other.path("ca.crt");
    for mode in ["verify-ca", "verify-full"] {
        let url = pg.url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", other_ca.display()),
        );
        let refused = migrate(url).await.unwrap();
        let err = stderr(&refused);
        assert_eq!(refused.status.code(), Some(1), "{mode}: {err}");
        assert!(
            err.contains("certificate") && err.contains("check sslrootcert"),
            "{mode}: {err}"
        );
    }
}

/// `local` and `operator` keep their state only in a database at this release's schema: one
/// that lacks a migration is refused at start with what to run, not met mid-incident.
#[tokio::test]
async fn a_state_database_behind_the_release_is_refused_at_start_with_what_to_run() {
    let tdb = common::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, path) = (tdb.url.clone(), dir.path().display().to_string());
        move || {
            apitree(&[
                "local",
                "-f",
                &path,
                "--database-url",
                &url,
                "--http",
                "127.0.0.1:0",
            ])
        }
    })
    .await
    .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is at migration 0, and this release needs")
            && err.contains("apitree migrate --database-url"),
        "{err}"
    );
}

/// Every `--help`, of every command and subcommand, shows each example command on a line of its
/// own: clap joins consecutive doc-comment lines into one paragraph, which once printed
/// "apitree demo apitree demo --format json > summary.json" (two commands run together).
#[test]
fn every_help_shows_one_example_command_per_line() {
    use clap::CommandFactory;
    fn walk(cmd: &mut clap::Command, path: String, out: &mut Vec<(String, String)>) {
        out.push((path.clone(), cmd.render_long_help().to_string()));
        for sub in cmd.get_subcommands_mut() {
            let name = format!("{path} {}", sub.get_name());
            walk(sub, name, out);
        }
    }
    let mut helps = Vec::new();
    walk(
        &mut apitree::cli::Cli::command(),
        "apitree".into(),
        &mut helps,
    );
    assert!(helps.len() > 20, "only {} commands walked", helps.len());
    for (path, help) in helps {
        for line in help.lines() {
            let invocations = line.split_whitespace().filter(|w| *w == "apitree").count();
            assert!(
                invocations <= 1,
                "`{path} --help` runs two commands together: {line:?}"
            );
        }
    }
}

/// Every `apitree` command the docs show — shell blocks and inline code in README.md, every
/// Markdown file under docs/, the chart's README and NOTES, example files' comments — parses
/// with this binary's CLI: no renamed flag, removed subcommand or wrong value can hide in a
/// text people copy. (Code blocks and example comments must be complete; a command named in
/// running prose may leave out a required argument.)
#[test]
fn every_apitree_command_in_the_docs_parses() {
    use clap::Parser;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![
        root.join("README.md"),
        root.join("charts/apitree/README.md"),
        root.join("charts/apitree/templates/NOTES.txt"),
    ];
    let docs = common::files_under(&root.join("docs"), &["md"]);
    assert!(!docs.is_empty(), "docs/ holds the documentation");
    files.extend(docs);
    files.extend(common::files_under(&root.join("examples"), &["yaml", "md"]));
    // (where, command text, complete?)
    let mut found: Vec<(String, String, bool)> = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.strip_prefix(root).unwrap().display().to_string();
        let mut fenced = false;
        let mut pending = String::new();
        for (n, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", n + 1);
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            let trimmed = line.trim_start().trim_start_matches('#').trim();
            let complete = fenced
                || (line.trim_start().starts_with('#')
                    && f.extension().is_some_and(|x| x == "yaml"));
            if complete {
                // Continuation lines join the command they continue.
                let joined = format!("{pending}{trimmed}");
                if let Some(stripped) = joined.strip_suffix('\\') {
                    pending = format!("{stripped} ");
                    continue;
                }
                pending.clear();
                for segment in joined.split(['|', ';']).flat_map(|s| s.split("&&")) {
                    let segment = segment.replace("$(", " ").replace(')', " ");
                    if let Some(cmd) = command_in(&segment) {
                        found.push((at.clone(), cmd, true));
                    }
                }
            } else {
                // Spans closed on this line; synopses ("create / rotate", "[--flag]") are not
                // commands.
                let spans: Vec<&str> = line.split('`').collect();
                let closed = if spans.len().is_multiple_of(2) {
                    spans.len() - 1
                } else {
                    spans.len()
                };
                for (i, span) in spans[..closed].iter().enumerate() {
                    if i % 2 == 1 && !span.contains(['[', '…', '|']) && !span.contains(" / ") {
                        if let Some(cmd) = command_in(span) {
                            found.push((at.clone(), cmd, false));
                        }
                    }
                }
            }
        }
    }
    assert!(found.len() > 30, "only {} commands found", found.len());
    let mut broken = Vec::new();
    for (at, cmd, complete) in &found {
        // Shell variables and <PLACEHOLDERS> stand for ids here.
        let args = split_words(cmd).into_iter().map(|w| {
            if w.starts_with('$') || (w.starts_with('<') && w.ends_with('>')) {
                "00000000-0000-0000-0000-000000000000".to_string()
            } else {
                w
            }
        });
        match apitree::cli::Cli::try_parse_from(std::iter::once("apitree".to_string()).chain(args))
        {
            Ok(_) => {}
            Err(e) => {
                use clap::error::ErrorKind::*;
                let fine = matches!(
                    e.kind(),
                    DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
                ) || (!complete && e.kind() == MissingRequiredArgument);
                if !fine {
                    broken.push(format!("{at}: `apitree {cmd}`: {}", e.kind()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "commands in the docs that do not parse:\n{}",
        broken.join("\n")
    );
}

/// The arguments of the `apitree` (or `cargo run [--release] --`) command in `text`, up to a
/// redirection or comment; None when it runs none.
fn command_in(text: &str) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let start = words.iter().enumerate().find_map(|(i, w)| match *w {
        "apitree"
            if words.get(i + 1).is_some_and(|n| {
                n.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !n.is_empty()
            }) =>
        {
            Some(i + 1)
        }
        "--" if i >= 2 && words[..i].contains(&"run") && words[..i].contains(&"cargo") => {
            Some(i + 1)
        }
        _ => None,
    })?;
    let rest: Vec<&str> = words[start..]
        .iter()
        .take_while(|w| {
            !w.starts_with('#') && !w.starts_with('>') && !w.starts_with("2>") && **w != "&"
        })
        .copied()
        .collect();
    (!rest.is_empty()).then(|| rest.join(" "))
}

/// Splits a command line into words as a shell would for these docs: whitespace, with
/// single- and double-quoted words kept whole (quotes removed).
fn split_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            (None, c) => word.push(c),
        }
    }
    if any || !word.is_empty() {
        out.push(word);
    }
    out
}

/// `credentials encrypt` prints only an entry the gateway accepts: a header a credential may
/// not set is refused here, naming the ones it may.
#[test]
fn credentials_encrypt_refuses_a_header_the_gateway_would_refuse() {
    let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let args = |header: &'static str| {
        [
            "credentials",
            "encrypt",
            "--name",
            "vendor",
            "--org",
            "acme",
            "--api",
            "demo",
            "--header",
            header,
        ]
    };
    let out = apitree_stdin(&args("host"), &[("APITREE_MASTER_KEY", key)], "s3cret");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("use one of authorization"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    let out = apitree_stdin(&args("X-API-Key"), &[("APITREE_MASTER_KEY", key)], "s3cret");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("header: X-API-Key"));
}

/// Out of file descriptors, a listener waits between tries instead of spinning on `accept`
/// (it stays readable while the process cannot take the connection): the proxy, held at a low
/// open-files limit and sent more connections than it may open, stays nearly idle.
#[test]
fn out_of_file_descriptors_the_accept_loop_waits_instead_of_spinning() {
    use std::time::Duration;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = env!("CARGO_BIN_EXE_apitree");
    let (listen, admin) = ("127.0.0.1:38480", "127.0.0.1:38490");
    let mut child = Command::new("bash")
        .args([
            "-c",
            &format!("ulimit -n 96; exec '{bin}' proxy --config examples/proxy.yaml --listen {listen} --admin {admin} --no-access-log"),
        ])
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect(admin).is_ok()
    });
    assert!(up, "the proxy did not start");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (log, mut stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // More connections than the limit lets it accept; held open.
    let held: Vec<_> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(listen).ok())
        .collect();
    assert!(held.len() > 96, "the kernel queued the connections");
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // utime and stime, in clock ticks (fields 14 and 15; 12 and 13 after the name).
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    // Out of descriptors from here on (the limit is the process's): every accept backs off.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !log.lock().unwrap().contains("cannot accept connections") {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never said it cannot accept: {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // "Does not spin" is CPU over a stretch of wall time: this window stays a fixed one.
    let before = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu() - before;
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let log = log.lock().unwrap().clone();
    assert!(
        used < 50,
        "the proxy used {used} ticks of CPU in 2 s (of 200) with nothing to do but wait for descriptors:\n{log}"
    );
    assert!(log.contains("cannot accept connections"), "{log}");
    assert!(
        log.matches("cannot accept connections").count() <= 2,
        "one line per 10 s, not one per try:\n{log}"
    );
    drop(held);
}
