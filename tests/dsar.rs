//! Data subject requests on a real database: every column is classified, an export holds
//! everything a person left, an erasure forgets it, and the audit chain still verifies.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use apitree::db::{
    audit,
    dsar::{self, DsarError, Handle, Personal},
};
use common::TestDb;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// A new column must be classified in `dsar::COLUMNS` (and a personal one handled by export
/// and erasure): this fails naming it.
#[tokio::test]
async fn every_column_of_the_schema_is_classified_for_export_and_erasure() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let schema: BTreeSet<String> = rows.iter().map(|(t, c)| format!("{t}.{c}")).collect();
    let listed: BTreeSet<String> = dsar::COLUMNS
        .iter()
        .flat_map(|(t, cols)| cols.iter().map(move |(c, _)| format!("{t}.{c}")))
        .collect();
    let unlisted: Vec<_> = schema.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&schema).collect();
    assert!(
        unlisted.is_empty(),
        "columns not classified in dsar::COLUMNS (can they hold personal data? then export and erase them in dsar_export / dsar_erase): {unlisted:?}"
    );
    assert!(
        gone.is_empty(),
        "dsar::COLUMNS lists columns the schema does not have: {gone:?}"
    );
}

/// Everything the test plants about one person, by the column it lands in.
struct Person {
    id: Uuid,
    email: String,
    handles: Vec<Handle>,
    /// (table, column) → a value only this person's data contains.
    seeds: BTreeMap<(&'static str, &'static str), String>,
}

async fn exec(pool: &PgPool, sql: &str, binds: &[&str]) {
    let mut q = sqlx::query(AssertSqlSafe(sql.to_string()));
    for b in binds {
        q = q.bind(*b);
    }
    q.execute(pool).await.unwrap();
}

/// A buyer who signed in, created a key and a BYOK credential, used the key, was credited, and
/// acts in Slack and at a shell: a row in every table that can hold personal data.
async fn plant(pool: &PgPool, n: u32) -> Person {
    let tag = Uuid::new_v4().simple().to_string()[..8].to_uppercase();
    let id = Uuid::new_v4();
    let org = apitree::db::keys::create_org(pool, &format!("org-{tag}"), "test")
        .await
        .unwrap();
    let seller = apitree::db::keys::create_org(pool, &format!("seller-{tag}"), "test")
        .await
        .unwrap();
    let email = format!("alice.{tag}@example.com");
    let password_hash = format!("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ${tag}PW");
    let invite = format!("{:0>64}", tag.to_lowercase());
    let slack_id = format!("UDSAR{tag}");
    let slack_name = format!("alice-slack-{tag}");
    let os_user = format!("alice{tag}").to_lowercase();
    let key_name = format!("alice laptop {tag}");
    let cred_name = format!("alice-cred-{tag}");
    let expires = format!("{}-01-02", 2990 + n);
    exec(
        pool,
        "INSERT INTO users (id, org_id, email, role, password_hash, invite_hash, invite_expires_at)
         VALUES ($1::uuid, $2::uuid, $3, 'buyer', $4, decode($5, 'hex'), $6::timestamptz)",
        &[
            &id.to_string(),
            &org.to_string(),
            &email,
            &password_hash,
            &invite,
            &format!("{expires}T03:04:05Z"),
        ],
    )
    .await;
    let actor = format!("user:{id}");
    // A key and a BYOK credential, created through the console (as its audit rows say).
    let key = Uuid::new_v4();
    exec(
        pool,
        "INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scope)
         VALUES ($1::uuid, $2::uuid, $3, 'at_live_' || $4, sha256($4::bytea), 'live')",
        &[&key.to_string(), &org.to_string(), &key_name, &tag],
    )
    .await;
    audit::append(
        pool,
        &actor,
        "key.create",
        "at_live_x",
        Some(org),
        &serde_json::json!({"key_id": key}),
    )
    .await
    .unwrap();
    let api = Uuid::new_v4();
    exec(
        pool,
        "INSERT INTO apis (id, org_id, name, path_prefix, upstream_url)
         VALUES ($1::uuid, $2::uuid, $3, '/' || $3 || '/', 'https://up.example/')",
        &[
            &api.to_string(),
            &seller.to_string(),
            &format!("w{}", tag.to_lowercase()),
        ],
    )
    .await;
    let cred = Uuid::new_v4();
    exec(
        pool,
        "INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version)
         VALUES ($1::uuid, $2::uuid, $3::uuid, $4, 'byok', '\\x00', '\\x000000000000000000000000', 1)",
        &[&cred.to_string(), &org.to_string(), &api.to_string(), &cred_name],
    )
    .await;
    audit::append(
        pool,
        &actor,
        "credential.write",
        &format!("credential:{cred}"),
        Some(org),
        &serde_json::json!({"credential_id": cred}),
    )
    .await
    .unwrap();
    exec(
        pool,
        "INSERT INTO usage_counters (org_id, api_key_id, api_id, window_start, requests)
         VALUES ($1::uuid, $2::uuid, $3::uuid, '2026-12-01T00:00:00Z', 4242)",
        &[&org.to_string(), &key.to_string(), &api.to_string()],
    )
    .await;
    exec(
        pool,
        "INSERT INTO credit_ledger (org_id, amount, reason, actor) VALUES ($1::uuid, 100, 'welcome credit', $2)",
        &[&org.to_string(), &actor],
    )
    .await;
    // In Slack: a button press (the operator's audit row), a gate decision naming them, an
    // acknowledged incident and its queued message.
    audit::append(
        pool,
        &format!("slack:{slack_name} ({slack_id})"),
        "slack.promote",
        "shop",
        None,
        &serde_json::json!({"revision": "abc"}),
    )
    .await
    .unwrap();
    audit::append(
        pool,
        "apitree-operator",
        "rollout.promoted",
        "shop",
        None,
        &serde_json::json!({"message": format!("abc promoted by slack:{slack_name}")}),
    )
    .await
    .unwrap();
    let incident = Uuid::new_v4();
    exec(
        pool,
        "INSERT INTO incidents (id, gateway, route, signal, severity, max_severity, acknowledged_by, acknowledged_at, last_notice)
         VALUES ($1::uuid, 'shop', $2, 'error_ratio', 'high', 'high', $3, now(), jsonb_build_object('acknowledged_by', $3))",
        &[&incident.to_string(), &tag, &slack_id],
    )
    .await;
    exec(
        pool,
        "INSERT INTO notification_outbox (dedupe_key, incident_id, channel, method, payload)
         VALUES ($1, $2::uuid, 'C1', 'chat.update', jsonb_build_object('text', 'Acknowledged by <@' || $3 || '>'))",
        &[&format!("ack-{tag}"), &incident.to_string(), &slack_id],
    )
    .await;
    // At a shell: `apitree drift fix` as their OS user.
    audit::append(
        pool,
        &format!("os:{os_user} (TICKET-{tag})"),
        "drift.fix",
        "table users",
        None,
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    let seeds = BTreeMap::from([
        (("users", "email"), email.clone()),
        (("users", "password_hash"), password_hash),
        (("users", "invite_hash"), invite),
        (("users", "invite_expires_at"), expires),
        (("api_keys", "name"), key_name),
        (("upstream_credentials", "name"), cred_name),
        (("incidents", "acknowledged_by"), slack_id.clone()),
        (("incidents", "last_notice"), slack_id.clone()),
        (("notification_outbox", "payload"), slack_id.clone()),
        (("data_subjects", "label"), slack_name),
        (("data_subjects", "external_id"), os_user.clone()),
    ]);
    Person {
        id,
        email,
        handles: vec![
            Handle::parse(&format!("slack:{slack_id}")).unwrap(),
            Handle::parse(&format!("os:{os_user}")).unwrap(),
        ],
        seeds,
    }
}

/// Rows of `table` whose `column` (as text) contains `value`.
async fn holding(pool: &PgPool, table: &str, column: &str, value: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE {column}::text LIKE '%' || $1 || '%'"
    )))
    .bind(value)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn audit_verifies(url: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["audit", "verify", "--database-url", url])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn an_export_holds_everything_and_an_erasure_forgets_it_with_the_chain_intact() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let p = plant(&pool, 1).await;
    let other = plant(&pool, 2).await;

    // Every personal column is planted by this test (a new one must be added to `plant`).
    for (table, cols) in dsar::COLUMNS {
        for (col, class) in *cols {
            if matches!(class, Personal::Erased | Personal::Secret) {
                assert!(
                    p.seeds.contains_key(&(*table, *col)),
                    "{table}.{col} holds personal data: plant a value in it in `plant` so export and erasure are checked"
                );
            }
        }
    }
    // Names never reach the hash chain: the trigger wrote references.
    for (table, col) in [("data_subjects", "label"), ("data_subjects", "external_id")] {
        let v = &p.seeds[&(table, col)];
        for c in ["actor", "target", "detail"] {
            assert_eq!(
                holding(&pool, "audit_log", c, v).await,
                0,
                "{v} in audit_log.{c}"
            );
        }
    }
    assert_eq!(
        holding(&pool, "audit_log", "actor", "subject:").await,
        4,
        "two people, each a Slack and an OS subject"
    );

    // Export: every planted value of this person, no secret, nothing of the other person.
    let mut tx = pool.begin().await.unwrap();
    let doc = dsar::export(&mut tx, p.id, &p.handles, "os:dpo")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let text = doc.to_string();
    for ((table, col), v) in &p.seeds {
        let class = dsar::COLUMNS
            .iter()
            .find(|(t, _)| t == table)
            .and_then(|(_, cols)| cols.iter().find(|(c, _)| c == col))
            .map(|(_, class)| *class)
            .unwrap();
        if class == Personal::Secret {
            assert!(
                !text.contains(v.as_str()),
                "{table}.{col} is exported: {text}"
            );
        } else {
            assert!(
                text.contains(v.as_str()),
                "{table}.{col} ({v}) missing: {text}"
            );
        }
    }
    for v in other.seeds.values() {
        assert!(!text.contains(v.as_str()), "another person's {v} exported");
    }
    for (section, n) in [
        ("api_keys", 1),
        ("credentials", 1),
        ("usage", 1),
        ("credit_ledger", 1),
        ("incidents_acknowledged", 1),
        ("identities", 2),
    ] {
        assert_eq!(
            doc[section].as_array().unwrap().len(),
            n,
            "{section}: {doc:#}"
        );
    }
    assert_eq!(doc["usage"][0]["requests"], 4242);
    // The export is audited, as a reference to the person.
    let exported: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'dsar.export' AND target = 'user:' || $1::text",
    )
    .bind(p.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(exported, 1);

    // Erasure: every planted value is gone from every column of every table.
    let mut tx = pool.begin().await.unwrap();
    let report = dsar::erase(
        &mut tx,
        p.id,
        &p.handles,
        "os:dpo",
        "ticket 1: account closed",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(report["keys_revoked"], 1, "{report}");
    assert_eq!(report["credentials_removed"], 1, "{report}");
    assert_eq!(report["identities_erased"], 2, "{report}");
    // The erasure's audit row names the identities it forgot, by reference.
    let identities: serde_json::Value = sqlx::query_scalar(
        "SELECT detail->'identities' FROM audit_log WHERE action = 'dsar.erase'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(identities.as_array().map(Vec::len), Some(2), "{identities}");
    assert!(identities.to_string().contains("subject:"), "{identities}");
    assert_eq!(report["incidents_scrubbed"], 1, "{report}");
    assert_eq!(report["messages_scrubbed"], 1, "{report}");
    for v in p.seeds.values() {
        for (table, cols) in dsar::COLUMNS {
            for (col, _) in *cols {
                assert_eq!(
                    holding(&pool, table, col, v).await,
                    0,
                    "{v} still in {table}.{col} after erasure"
                );
            }
        }
    }
    // The other person is untouched.
    for ((table, col), v) in &other.seeds {
        assert!(
            holding(&pool, table, col, v).await > 0,
            "{table}.{col} of the other person"
        );
    }
    // They cannot sign in; their key is revoked; the chain still verifies.
    let login: Option<Uuid> = sqlx::query_scalar("SELECT id FROM console_login($1)")
        .bind(&p.email)
        .fetch_optional(&pool)
        .await
        .unwrap();
    assert_eq!(login, None);
    let revoked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE name = '' AND revoked_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(revoked, 1);
    assert!(audit_verifies(&db.url).await.contains("intact"));
    // Once is enough; the request queue has both requests.
    let mut tx = pool.begin().await.unwrap();
    let again = dsar::erase(&mut tx, p.id, &[], "os:dpo", "again").await;
    assert!(
        matches!(again, Err(DsarError::AlreadyErased(_))),
        "{again:?}"
    );
    drop(tx);
    let states: Vec<String> = sqlx::query_scalar(
        "SELECT kind || '/' || state FROM dsar_requests WHERE subject = 'user:' || $1::text ORDER BY id",
    )
    .bind(p.id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(states, ["export/exported", "erase/erased"]);
}

/// A migrated database of its own with an org `acme`.
async fn with_org() -> (TestDb, PgPool, Uuid) {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let org = apitree::db::keys::create_org(&pool, "acme", "test")
        .await
        .unwrap();
    (db, pool, org)
}

async fn user(pool: &PgPool, org: Option<Uuid>, role: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, org_id, email, role) VALUES ($1, $2, $3, $4::user_role)")
        .bind(id)
        .bind(org)
        .bind(format!("{id}@example.com"))
        .bind(role)
        .execute(pool)
        .await
        .unwrap();
    id
}

async fn erase(pool: &PgPool, id: Uuid, reason: &str) -> Result<serde_json::Value, DsarError> {
    let mut tx = pool.begin().await.unwrap();
    let r = dsar::erase(&mut tx, id, &[], "os:dpo", reason).await;
    if r.is_ok() {
        tx.commit().await.unwrap();
    }
    r
}

/// Who cannot be erased, and what a request must carry: each refusal says what to do.
#[tokio::test]
async fn erasure_refuses_a_super_admin_an_orgs_last_admin_and_a_request_without_reason() {
    let (db, pool, org) = with_org().await;
    let root = user(&pool, None, "super_admin").await;
    let err = erase(&pool, root, "left").await.unwrap_err();
    assert!(matches!(err, DsarError::Refused(_)), "{err:?}");
    assert!(
        err.to_string().contains("changes their role first"),
        "{err}"
    );

    let a = user(&pool, Some(org), "admin").await;
    let err = erase(&pool, a, "left").await.unwrap_err();
    assert!(err.to_string().contains("last admin of org"), "{err}");
    let b = user(&pool, Some(org), "admin").await;
    erase(&pool, a, "left").await.unwrap();
    let err = erase(&pool, b, "left").await.unwrap_err();
    assert!(err.to_string().contains("last admin of org"), "{err}");
    // Staff without an org is not an org's admin.
    let staff = user(&pool, None, "admin").await;
    erase(&pool, staff, "left").await.unwrap();

    let buyer = user(&pool, Some(org), "buyer").await;
    for reason in ["", "   "] {
        let err = erase(&pool, buyer, reason).await.unwrap_err();
        assert!(matches!(err, DsarError::BadInput(_)), "{err:?}");
        assert!(err.to_string().contains("needs a reason"), "{err}");
    }
    let err = erase(&pool, Uuid::new_v4(), "gone").await.unwrap_err();
    assert!(matches!(err, DsarError::NoUser(_)), "{err:?}");
    // Nothing refused left a trace; the two erasures did.
    let erased: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE erased_at IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(erased, 2);
    assert!(audit_verifies(&db.url).await.contains("intact"));
}

/// Rows written before people were referenced by subject keep their names (the chain cannot
/// change); an erasure counts them so the answer to the person can say so.
#[tokio::test]
async fn rows_from_before_subjects_are_counted_not_rewritten() {
    let (db, pool, org) = with_org().await;
    let id = user(&pool, Some(org), "buyer").await;
    exec(
        &pool,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_actor_subject",
        &[],
    )
    .await;
    audit::append(
        &pool,
        "slack:old (UOLD1)",
        "slack.promote",
        "shop",
        None,
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    exec(
        &pool,
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_actor_subject",
        &[],
    )
    .await;
    let mut tx = pool.begin().await.unwrap();
    let report = dsar::erase(
        &mut tx,
        id,
        &[Handle::parse("slack:UOLD1").unwrap()],
        "os:dpo",
        "closed",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(report["legacy_audit_rows_kept"], 1, "{report}");
    assert!(audit_verifies(&db.url).await.contains("intact"));
}

/// `apitree dsar` as docs/gdpr.md shows it: export by email, a dry run that changes nothing, the
/// erasure, and a clear error for someone who is not there.
#[tokio::test]
async fn the_cli_exports_dry_runs_and_erases_by_email() {
    let (db, pool, org) = with_org().await;
    user(&pool, Some(org), "buyer").await;
    sqlx::query("UPDATE users SET email = 'alice@example.com'")
        .execute(&pool)
        .await
        .unwrap();
    let apitree = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_apitree"));
        cmd.args(["dsar"])
            .args(args)
            .args(["--database-url", &db.url])
            .env_remove("APITREE_ACTOR");
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stdout, stderr) = apitree(&[
        "export",
        "--email",
        "ALICE@example.com",
        "--identity",
        "slack:U024BE7LH",
    ]);
    assert!(ok, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["profile"]["email"], "alice@example.com");
    let erase = [
        "erase",
        "--email",
        "alice@example.com",
        "--reason",
        "ticket 4711: account closed",
    ];
    let (ok, stdout, stderr) = apitree(&erase);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("dry run") && stderr.contains("--yes"),
        "{stderr}"
    );
    assert!(stdout.contains("keys_revoked"), "{stdout}");
    let still: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE email = 'alice@example.com'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(still, 1, "a dry run erases nothing");
    let (ok, _, stderr) = apitree(&[&erase[..], &["--yes"]].concat());
    assert!(ok, "{stderr}");
    let still: i64 =
        sqlx::query_scalar("SELECT count(*) FROM users WHERE email = 'alice@example.com'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(still, 0);
    let (ok, _, stderr) = apitree(&["export", "--email", "alice@example.com"]);
    assert!(!ok);
    assert!(
        stderr.contains("no user with the email") && stderr.contains("users list"),
        "{stderr}"
    );
    let (ok, _, stderr) = apitree(&["export", "--email", "x@example.com", "--identity", "U024"]);
    assert!(!ok);
    assert!(stderr.contains("slack:<Slack user id>"), "{stderr}");
    assert!(audit_verifies(&db.url).await.contains("intact"));
}

/// Review findings, each a class: what a person holds through rotation, what someone else
/// wrote last, and the identity records of others.
#[tokio::test]
async fn erasure_follows_rotations_and_last_writers_and_scrubs_only_whole_ids() {
    let (_db, pool, org) = with_org().await;
    let alice = user(&pool, Some(org), "buyer").await;
    let dave = user(&pool, Some(org), "buyer").await;
    let key = |name: &'static str, replaced_by: Option<Uuid>| {
        let pool = pool.clone();
        async move {
            let id = Uuid::new_v4();
            sqlx::query(
                "INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scope, replaced_by)
                 VALUES ($1, $2, $3, 'at_live_' || $4, sha256($4::bytea), 'live', $5)",
            )
            .bind(id)
            .bind(org)
            .bind(name)
            .bind(&id.simple().to_string()[..12])
            .bind(replaced_by)
            .execute(&pool)
            .await
            .unwrap();
            id
        }
    };
    let audit_as = |who: Uuid, action: &'static str, detail: serde_json::Value| {
        let pool = pool.clone();
        async move {
            audit::append(
                &pool,
                &format!("user:{who}"),
                action,
                "x",
                Some(org),
                &detail,
            )
            .await
            .unwrap();
        }
    };
    // Alice creates A and rotates it herself into B (she holds B's secret); dave rotates B
    // into C (he holds C's, which still carries her key's name).
    let c = key("alice laptop", None).await;
    let b = key("alice laptop", Some(c)).await;
    let a = key("alice laptop", Some(b)).await;
    audit_as(alice, "key.create", serde_json::json!({"key_id": a})).await;
    audit_as(
        alice,
        "key.rotate",
        serde_json::json!({"old_key_id": a, "new_key_id": b}),
    )
    .await;
    audit_as(
        dave,
        "key.rotate",
        serde_json::json!({"old_key_id": b, "new_key_id": c}),
    )
    .await;
    // Alice writes a BYOK credential that dave then rewrites (same row): it is dave's now.
    let seller = apitree::db::keys::create_org(&pool, "seller", "test")
        .await
        .unwrap();
    let api = Uuid::new_v4();
    sqlx::query("INSERT INTO apis (id, org_id, name, path_prefix, upstream_url) VALUES ($1, $2, 'maps', '/maps/', 'https://up.example/')")
        .bind(api)
        .bind(seller)
        .execute(&pool)
        .await
        .unwrap();
    let cred = Uuid::new_v4();
    sqlx::query("INSERT INTO upstream_credentials (id, org_id, api_id, name, kind, ciphertext, nonce, key_version) VALUES ($1, $2, $3, 'dave-cred', 'byok', '\\x00', '\\x000000000000000000000000', 1)")
        .bind(cred)
        .bind(org)
        .bind(api)
        .execute(&pool)
        .await
        .unwrap();
    audit_as(
        alice,
        "credential.write",
        serde_json::json!({"credential_id": cred}),
    )
    .await;
    audit_as(
        dave,
        "credential.write",
        serde_json::json!({"credential_id": cred}),
    )
    .await;
    // A message whose channel and timestamp merely contain the Slack id's characters.
    sqlx::query("INSERT INTO notification_outbox (dedupe_key, channel, method, payload) VALUES ('m', 'C0U1AB', 'chat.update', '{\"channel\": \"C0U1AB\", \"ts\": \"17U1.0\", \"text\": \"Acknowledged by <@U1>\"}')")
        .execute(&pool)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    let doc = dsar::export(&mut tx, alice, &[], "os:dpo").await.unwrap();
    tx.commit().await.unwrap();
    let keys: Vec<(String, bool)> = doc["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_string(),
                k["revoked_on_erasure"].as_bool().unwrap(),
            )
        })
        .collect();
    let held = |id: Uuid| keys.iter().find(|k| k.0 == id.to_string()).map(|k| k.1);
    assert_eq!(
        (held(a), held(b), held(c)),
        (Some(true), Some(true), Some(false)),
        "{doc:#}"
    );
    assert_eq!(
        doc["credentials"],
        serde_json::json!([]),
        "dave's credential is not hers"
    );

    let mut tx = pool.begin().await.unwrap();
    let report = dsar::erase(
        &mut tx,
        alice,
        &[Handle::parse("slack:U1").unwrap()],
        "os:dpo",
        "closed",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(report["keys_revoked"], 2, "{report}");
    assert_eq!(report["keys_unnamed"], 1, "{report}");
    assert_eq!(report["credentials_removed"], 0, "{report}");
    let rows: Vec<(Uuid, String, bool)> =
        sqlx::query_as("SELECT id, name, revoked_at IS NOT NULL FROM api_keys")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (id, name, revoked) in rows {
        assert_eq!(name, "", "no key keeps her name");
        assert_eq!(revoked, id != c, "only the keys she holds are revoked");
    }
    let creds: i64 = sqlx::query_scalar("SELECT count(*) FROM upstream_credentials")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(creds, 1, "dave's credential stays");
    let payload: serde_json::Value = sqlx::query_scalar("SELECT payload FROM notification_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"channel": "C0U1AB", "ts": "17U1.0", "text": "Acknowledged by <@erased>"})
    );
}

/// No spelling of a person's name reaches the hash chain, and no name makes an audit row fail
/// (a lost row is worse than a kept name).
#[tokio::test]
async fn no_name_reaches_the_chain_and_no_name_loses_a_row() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let long = "n".repeat(600);
    // (actor as written, the name that must not be in the chain)
    let actors: Vec<(String, String)> = [
        ("slack:alice (U0A)", "alice"),
        ("slack:alicex (U0AX)", "alicex"),
        ("Slack:bob (U0B)", "bob"),
        ("  SLACK :  carol (U0C)", "carol"),
        ("OS:dan", "dan"),
        ("os:erin (ticket 7 for Erin Example)", "Erin Example"),
        ("slack:mallory\" (U0M)", "mallory\""),
        ("slack:back\\slash (U0BS)", "back\\slash"),
        ("slack:tab\tname (U0T)", "tab\tname"),
        ("slack: (U0EMPTY)", "U0EMPTY"),
        ("slack:o'brien [x]{1}*+? (U0OB)", "o'brien [x]{1}*+?"),
    ]
    .into_iter()
    .map(|(a, n)| (a.to_string(), n.to_string()))
    .chain([(format!("slack:{long} (U0LONG)"), long.clone())])
    .collect();
    for (actor, _) in &actors {
        audit::append(
            &pool,
            actor,
            "slack.acknowledge",
            "x",
            None,
            &serde_json::json!({}),
        )
        .await
        .unwrap_or_else(|e| panic!("{actor:?}: {e}"));
    }
    // Two people whose long names differ only past the cut stay two people.
    let long_a = format!("slack:{} (U0LA)", "w".repeat(600));
    let long_b = format!("slack:{} (U0LB)", "w".repeat(600));
    for a in [&long_a, &long_b] {
        audit::append(
            &pool,
            a,
            "slack.acknowledge",
            "x",
            None,
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    }
    let distinct: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT actor) FROM audit_log WHERE actor IN (SELECT 'subject:' || id FROM data_subjects WHERE external_id IN ('U0LA', 'U0LB'))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(distinct, 2);
    // Every Slack name again, in a gate message of the operator's, in several spellings.
    // (Not the 600-character name: Slack's names are far shorter than the 500 kept.)
    let slack = |a: &str| {
        a.trim().to_lowercase().starts_with("slack") && !a.contains("slack: (") && a.len() < 500
    };
    let messages = actors.iter().filter(|(a, _)| slack(a)).count() * 4;
    for (actor, name) in actors.iter().filter(|(a, _)| slack(a)) {
        for text in [
            format!("promoted by slack:{name}"),
            format!("promoted by slack:{name}."),
            format!("promoted by Slack:{name}, then by slack:{name}"),
            format!("promoted by SLACK:{}", name.to_uppercase()),
        ] {
            audit::append(
                &pool,
                "apitree-operator",
                "rollout.promoted",
                "shop",
                None,
                &serde_json::json!({"message": text}),
            )
            .await
            .unwrap_or_else(|e| panic!("{actor:?} / {text:?}: {e}"));
        }
    }
    let rows: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT actor, detail FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), actors.len() + 2 + messages, "every row written");
    for (actor, detail) in &rows {
        assert!(
            actor.starts_with("subject:") || actor == "apitree-operator",
            "{actor}"
        );
        let message = detail["message"].as_str().unwrap_or("");
        assert!(!message.to_lowercase().contains("slack:"), "{message:?}");
    }
    // Found by their ids: the long name's id survives the label's cut.
    for id in ["U0A", "U0AX", "U0B", "U0C", "U0LONG", "U0EMPTY"] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM data_subjects WHERE kind = 'slack' AND external_id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "{id}");
    }
    // `slack:alicex` is alicex's, not alice's with an x.
    let alicex: Uuid =
        sqlx::query_scalar("SELECT id FROM data_subjects WHERE external_id = 'U0AX'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE detail->>'message' = 'promoted by subject:' || $1::text",
    )
    .bind(alicex)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 2, "as written and in capitals");
    assert!(audit_verifies(&db.url).await.contains("intact"));
}

/// Who acted is a reference in every table that records it, not only the audit log.
#[tokio::test]
async fn request_queue_and_ledger_record_people_by_reference() {
    let (_db, pool, org) = with_org().await;
    let id = user(&pool, Some(org), "buyer").await;
    let mut tx = pool.begin().await.unwrap();
    dsar::export(&mut tx, id, &[], "os:root (ticket 7 for Erin Example)")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query(
        "INSERT INTO credit_ledger (org_id, amount, reason, actor) VALUES ($1, 5, 'x', 'os:root')",
    )
    .bind(org)
    .execute(&pool)
    .await
    .unwrap();
    for table in ["dsar_requests", "credit_ledger"] {
        let actor: String = sqlx::query_scalar(AssertSqlSafe(format!("SELECT actor FROM {table}")))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(actor.starts_with("subject:"), "{table}: {actor}");
    }
    // A reason of only whitespace is no reason.
    for reason in ["\n\t ", "", "\u{a0}", "\u{3000} \u{2009}"] {
        let mut tx = pool.begin().await.unwrap();
        let err = dsar::erase(&mut tx, id, &[], "os:dpo", reason)
            .await
            .unwrap_err();
        assert!(matches!(err, DsarError::BadInput(_)), "{err:?}");
    }
}

/// A request of the person that is under way when their erasure starts finishes first, and
/// what it created is erased too; one that starts later finds them gone.
#[tokio::test]
async fn an_erasure_waits_for_the_persons_request_under_way_and_takes_its_key() {
    let (_db, pool, org) = with_org().await;
    let id = user(&pool, Some(org), "buyer").await;
    // The person's console request: principal looked up (share lock), then a key created.
    let mut request = pool.begin().await.unwrap();
    let disabled: bool = sqlx::query_scalar("SELECT disabled FROM console_principal_locked($1)")
        .bind(id)
        .fetch_one(&mut *request)
        .await
        .unwrap();
    assert!(!disabled);
    let erasure = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let report = dsar::erase(&mut tx, id, &[], "os:dpo", "closed")
                .await
                .unwrap();
            tx.commit().await.unwrap();
            report
        })
    };
    // The erasure is waiting for the request's lock.
    let mut waited = false;
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%dsar_erase%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            waited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(waited, "the erasure waits for the request under way");
    let key = Uuid::new_v4();
    sqlx::query("INSERT INTO api_keys (id, org_id, name, prefix, key_hash, scope) VALUES ($1, $2, 'late', 'at_live_late1', sha256('late'::bytea), 'live')")
        .bind(key)
        .bind(org)
        .execute(&mut *request)
        .await
        .unwrap();
    audit::append(
        &mut *request,
        &format!("user:{id}"),
        "key.create",
        "x",
        Some(org),
        &serde_json::json!({"key_id": key}),
    )
    .await
    .unwrap();
    request.commit().await.unwrap();
    let report = erasure.await.unwrap();
    assert_eq!(report["keys_revoked"], 1, "{report}");
    // A request that starts now finds the person disabled.
    let disabled: bool = sqlx::query_scalar("SELECT disabled FROM console_principal_locked($1)")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(disabled);
}

/// A function that runs as the owner is nobody else's to call: every SECURITY DEFINER function
/// of the schema refuses a role that was not granted it (row-level security and the console's
/// checks would otherwise be one call away).
#[tokio::test]
async fn owner_functions_are_not_callable_by_any_role() {
    let db = TestDb::new().await;
    let pool = db.migrated_pool().await;
    let role = format!("apitree_t_role_{}", Uuid::new_v4().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE ROLE {role} NOLOGIN")))
        .execute(&pool)
        .await
        .unwrap();
    let open: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.prosecdef AND p.pronamespace = current_schema()::regnamespace
            AND has_function_privilege($1, p.oid, 'EXECUTE')",
    )
    .bind(&role)
    .fetch_all(&pool)
    .await
    .unwrap();
    let search_path: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.prosecdef AND p.pronamespace = current_schema()::regnamespace
            AND NOT coalesce(p.proconfig @> ARRAY['search_path=public, pg_temp'], false)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(&pool)
        .await
        .unwrap();
    assert!(open.is_empty(), "callable by any role: {open:?}");
    assert!(
        search_path.is_empty(),
        "search_path not pinned: {search_path:?}"
    );
}
