//! The `apitree` binary as a user runs it.

mod common;

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
