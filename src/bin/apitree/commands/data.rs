//! Commands on the gateway database: keys, orgs, upstream credentials, the audit chain,
//! migrations and drift, console users and personal-data requests.

use std::io::Read;

use anyhow::{anyhow, Context, Result};

use apitree::cli::{
    CredentialsCommand, DatabaseArgs, DriftCommand, KeysCommand, MigrateArgs, OutputFormat,
    SecretArgs, UsersCommand,
};
use apitree::db;
use apitree::entities::keys::ApiKey;
use apitree::proxy::{self, state};

use super::{open_db, pepper_from, secret_sources, DriftFound, Tampered};

pub async fn drift(cmd: DriftCommand) -> Result<()> {
    use apitree::drift::fix;
    match cmd {
        DriftCommand::Check { format, adopt, db } => {
            let pool = open_db(&db).await?;
            let report = fix::check(&pool, adopt).await?;
            match format {
                OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?)?,
                OutputFormat::Text => print!("{}", report.text()),
            }
            if report.in_sync() {
                Ok(())
            } else {
                Err(anyhow!(DriftFound(
                    report.items.len() + report.history.len()
                )))
            }
        }
        DriftCommand::Fix {
            allow_changed,
            adopt,
            actor,
            format,
            db,
        } => {
            let pool = open_db(&db).await?;
            let done = fix::fix(&pool, allow_changed, adopt, &actor.resolve()).await?;
            match format {
                OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&done)?)?,
                OutputFormat::Text => {
                    for i in &done.applied {
                        outln!("fixed    {}: {}", i.object, i.detail)?;
                    }
                    for i in &done.left {
                        let why = if i.fix_sql.is_none() {
                            "reported only"
                        } else {
                            "changed: rerun with --allow-changed to rewrite it"
                        };
                        outln!("left     {}: {} ({why})", i.object, i.detail)?;
                    }
                    print!("after the fix: {}", done.after.text());
                }
            }
            Ok(())
        }
        DriftCommand::Snapshot { out, db } => {
            let pool = open_db(&db).await?;
            let target = db::describe_target(&db::parse_url(&db.resolve().unwrap_or_default())?);
            let schema = apitree::drift::fix::snapshot(&pool, &target).await?;
            std::fs::write(&out, serde_json::to_string_pretty(&schema)? + "\n")
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "wrote {} ({} tables, {} columns, {} policies, {} triggers, {} enum types, {} sequences)",
                out.display(),
                schema.tables.len(),
                schema.columns.len(),
                schema.policies.len(),
                schema.triggers.len(),
                schema.enums.len(),
                schema.sequences.len()
            );
            Ok(())
        }
    }
}

pub async fn keys(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create {
            org,
            scope,
            tier,
            daily_quota,
            name,
            db: dbargs,
            secrets,
            actor,
        } => {
            let pepper = pepper_from(&secrets)?;
            let pool = open_db(&dbargs).await?;
            let daily_quota = daily_quota.map(|q| q.min(i64::MAX as u64) as i64);
            let new = db::keys::NewKey {
                org,
                scope,
                tier: &tier,
                daily_quota,
                name: &name,
            };
            let issued = db::keys::create_key(&pool, &pepper, new, &actor.resolve()).await?;
            outln!("{}", issued.key.expose_secret())?;
            eprintln!(
                "created key {} (id {}); this is the only time it is shown",
                issued.key.prefix(),
                issued.id
            );
        }
        KeysCommand::Rotate {
            id,
            grace,
            db: dbargs,
            secrets,
            actor,
        } => {
            let pepper = pepper_from(&secrets)?;
            let pool = open_db(&dbargs).await?;
            let grace = chrono::Duration::from_std(grace.as_std())
                .map_err(|_| anyhow!("--grace is too long"))?;
            let rotation = db::keys::rotate_key(
                &pool,
                &pepper,
                id,
                grace,
                chrono::Utc::now(),
                &actor.resolve(),
            )
            .await?
            .ok_or_else(|| {
                anyhow!("no active, unrotated key with id {id}; see `apitree keys list`")
            })?;
            outln!("{}", rotation.new.key.expose_secret())?;
            eprintln!(
                "new key {} (id {}); the old key {} stays valid until {} and is refused after that",
                rotation.new.key.prefix(),
                rotation.new.id,
                rotation.old_prefix,
                rotation
                    .grace_until
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
        KeysCommand::Sweep { db: dbargs, actor } => {
            let pool = open_db(&dbargs).await?;
            let revoked =
                db::keys::sweep_grace(&pool, chrono::Utc::now(), &actor.resolve()).await?;
            for prefix in &revoked {
                outln!("{prefix}")?;
            }
            eprintln!("{} key(s) past their grace period revoked", revoked.len());
        }
        KeysCommand::Revoke {
            id,
            db: dbargs,
            actor,
        } => {
            let pool = open_db(&dbargs).await?;
            let prefix = db::keys::revoke_key(&pool, id, &actor.resolve())
                .await?
                .ok_or_else(|| anyhow!("no active key with id {id}; see `apitree keys list`"))?;
            eprintln!("revoked {prefix}");
        }
        KeysCommand::List {
            org,
            format,
            db: dbargs,
        } => {
            let pool = open_db(&dbargs).await?;
            let rows = db::keys::list_keys(&pool, org).await?;
            match format {
                OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&rows)?)?,
                OutputFormat::Text => {
                    outln!(
                        "{:<36}  {:<16}  {:<5}  {:<10}  {:<15}  STATE",
                        "ID",
                        "PREFIX",
                        "SCOPE",
                        "TIER",
                        "TODAY"
                    )?;
                    let now = chrono::Utc::now();
                    for r in rows {
                        let state = r.state(now);
                        // Calls today (UTC), out of the daily quota when the key has one.
                        let today = match r.daily_quota {
                            Some(q) => format!("{}/{q}", r.today),
                            None => r.today.to_string(),
                        };
                        outln!(
                            "{:<36}  {:<16}  {:<5}  {:<10}  {today:<15}  {state}",
                            r.id,
                            r.prefix,
                            r.scope,
                            r.tier
                        )?;
                    }
                }
            }
        }
        KeysCommand::Hash { key, org, secrets } => {
            let text = if key == "-" {
                let mut buf = String::new();
                std::io::stdin().read_to_string(&mut buf)?;
                buf.trim().to_string()
            } else {
                key
            };
            let key = ApiKey::parse(&text).map_err(|e| anyhow!("{e}"))?;
            let pepper = pepper_from(&secrets)?;
            print!("{}", key.config_entry(&pepper, &org));
        }
        KeysCommand::Generate {
            scope,
            org,
            secrets,
        } => {
            let pepper = pepper_from(&secrets)?;
            let key = ApiKey::generate(scope);
            outln!("{}", key.expose_secret())?;
            eprintln!(
                "# Store only this entry; the key above is shown once.\n{}",
                key.config_entry(&pepper, &org)
            );
        }
    }
    Ok(())
}

pub async fn reencrypt(
    batch: i64,
    secrets: SecretArgs,
    dbargs: DatabaseArgs,
    actor: String,
) -> Result<()> {
    let (cfg, base) = secret_sources(&secrets)?;
    let keys = state::load_master_keys(&cfg, &base)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("{}", apitree::entities::vault::VaultError::Missing))?;
    let pool = open_db(&dbargs).await?;
    let done = db::credentials::reencrypt_all(&pool, &keys, batch, &actor, |p| {
        eprintln!(
            "re-encrypted {}: {}/{} credentials at key version {}",
            p.rewrapped, p.done, p.total, p.target_version
        )
    })
    .await?;
    outln!(
        "every credential is at key version {}; older versions are unused and can be removed",
        done.target_version
    )?;
    Ok(())
}

pub fn credentials(cmd: CredentialsCommand) -> Result<()> {
    let CredentialsCommand::Encrypt {
        name,
        org,
        api,
        kind,
        header,
        value_prefix,
        secrets,
    } = cmd
    else {
        return Err(anyhow!(
            "only `credentials encrypt` runs without a database"
        ));
    };
    let (cfg, base) = secret_sources(&secrets)?;
    let keys = state::load_master_keys(&cfg, &base)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("{}", apitree::entities::vault::VaultError::Missing))?;
    let mut value = String::new();
    std::io::stdin().read_to_string(&mut value)?;
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(anyhow!("no credential on stdin: pipe the secret in, e.g. `printf %s \"$TOKEN\" | apitree credentials encrypt ...`"));
    }
    if let Some(e) = proxy::config::value_prefix_problem(&value_prefix) {
        return Err(anyhow!("--value-prefix {e}"));
    }
    // The gateway refuses a credential that sets any other header: say so now.
    if let Some(e) = proxy::config::credential_header_problem(&header) {
        return Err(anyhow!("--header {e}"));
    }
    if let Some(e) = proxy::config::secret_problem(&value_prefix, value) {
        return Err(anyhow!("the credential on stdin {e}"));
    }
    let sealed = keys.encrypt(&org, &api, value);
    print!(
        "- name: {name}\n  org: {org}\n  api: {api}\n  kind: {}\n  keyVersion: {}\n  nonce: {}\n  ciphertext: {}\n  header: {header}\n  valuePrefix: {value_prefix:?}\n",
        kind.as_str(),
        sealed.key_version,
        sealed.nonce_b64(),
        sealed.ciphertext_b64()
    );
    Ok(())
}

pub async fn migrate(args: MigrateArgs) -> Result<()> {
    let url = args.db.resolve().context(
        "no database URL: pass --database-url, or set APITREE_DATABASE_URL or DATABASE_URL",
    )?;
    let target = db::describe_target(&db::parse_url(&url)?);
    let pool = db::connect(&url, 2).await?;
    db::migrate_with(&pool, &target, args.adopt).await?;
    // Applied migrations are not a schema: a table dropped since is still missing.
    let report = apitree::drift::fix::check(&pool, true).await?;
    let missing: Vec<&str> = report
        .items
        .iter()
        .filter(|i| i.kind == apitree::drift::Kind::Missing)
        .map(|i| i.object.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(anyhow!(
            "every migration is applied, but the schema is not what they make: missing {}; `apitree drift check` lists the drift and `apitree drift fix` restores it",
            missing.join(", ")
        ));
    }
    let applied = db::MIGRATOR.iter().count();
    tracing::info!(database = %target, migrations = applied, "database is at the latest schema");
    Ok(())
}

/// The user a request names, and the other identities given for them.
pub async fn dsar_subject(
    conn: &mut sqlx::PgConnection,
    who: &apitree::cli::DsarSubject,
) -> Result<(uuid::Uuid, Vec<db::dsar::Handle>)> {
    let also = who
        .identities
        .iter()
        .map(|h| db::dsar::Handle::parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let id = match (&who.user, &who.email) {
        (Some(id), _) => *id,
        (None, Some(email)) => db::dsar::user_by_email(conn, email).await?.ok_or_else(|| {
            anyhow!("there is no user with the email {email:?}; `apitree users list` shows them")
        })?,
        (None, None) => return Err(anyhow!("name the person: --user ID or --email EMAIL")),
    };
    Ok((id, also))
}

pub async fn dsar(cmd: apitree::cli::DsarCommand) -> Result<()> {
    use apitree::cli::DsarCommand;
    match cmd {
        DsarCommand::Export {
            who,
            actor,
            db: dbargs,
        } => {
            let pool = open_db(&dbargs).await?;
            let mut tx = pool.begin().await?;
            let (id, also) = dsar_subject(&mut tx, &who).await?;
            let doc = db::dsar::export(&mut tx, id, &also, &actor.resolve()).await?;
            tx.commit().await?;
            outln!("{}", serde_json::to_string_pretty(&doc)?)?;
        }
        DsarCommand::Erase {
            who,
            reason,
            yes,
            actor,
            db: dbargs,
        } => {
            let pool = open_db(&dbargs).await?;
            let mut tx = pool.begin().await?;
            let (id, also) = dsar_subject(&mut tx, &who).await?;
            let actor = actor.resolve();
            let report = match db::dsar::erase(&mut tx, id, &also, &actor, &reason).await {
                Ok(report) => report,
                Err(db::dsar::DsarError::Refused(why)) if yes => {
                    // The request and its refusal stay in the queue.
                    tx.rollback().await?;
                    let mut tx = pool.begin().await?;
                    db::dsar::record_refusal(&mut tx, id, &actor, &reason, &why).await?;
                    tx.commit().await?;
                    return Err(anyhow!("erasure refused: {why}"));
                }
                Err(e) => return Err(e.into()),
            };
            if !yes {
                // The same statements, rolled back: what --yes would do, exactly.
                tx.rollback().await?;
                eprintln!(
                    "nothing erased (this was a dry run): add --yes to erase user {id}; export first with `apitree dsar export`, nothing can be undone"
                );
            } else {
                tx.commit().await?;
                eprintln!("erased user {id}");
            }
            outln!("{}", serde_json::to_string_pretty(&report)?)?;
        }
    }
    Ok(())
}

pub async fn users(cmd: UsersCommand) -> Result<()> {
    use apitree::console::{password, users};
    match cmd {
        UsersCommand::Create {
            email,
            role,
            org,
            password_stdin: _,
            db: dbargs,
        } => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            let pw = line.trim_end_matches(['\r', '\n']);
            let phc = password::hash(pw).map_err(|e| anyhow!("{e}"))?;
            let pool = open_db(&dbargs).await?;
            let actor = apitree::cli::ActorArgs { actor: None }.resolve();
            let id = users::create(&pool, &email, role, org, &phc, &actor).await?;
            outln!("{id}")?;
            eprintln!("created {} {email} (id {id})", role.as_str());
        }
        UsersCommand::List { format, db: dbargs } => {
            let pool = open_db(&dbargs).await?;
            let rows = users::list(&pool).await?;
            match format {
                OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&rows)?)?,
                OutputFormat::Text => {
                    outln!(
                        "{:<36}  {:<32}  {:<11}  {:<36}  STATE",
                        "ID",
                        "EMAIL",
                        "ROLE",
                        "ORG"
                    )?;
                    for r in rows {
                        let state = if r.disabled {
                            "disabled"
                        } else if r.invited {
                            "invited"
                        } else {
                            "active"
                        };
                        let org = r
                            .org_id
                            .map(|o| o.to_string())
                            .unwrap_or_else(|| "-".into());
                        outln!(
                            "{:<36}  {:<32}  {:<11}  {org:<36}  {state}",
                            r.id,
                            r.email,
                            r.role
                        )?;
                    }
                }
            }
        }
        UsersCommand::Disable { email, db: dbargs } => {
            let pool = open_db(&dbargs).await?;
            let actor = apitree::cli::ActorArgs { actor: None }.resolve();
            users::disable(&pool, &email, &actor)
                .await?
                .ok_or_else(|| anyhow!("no user with email {email}; see `apitree users list`"))?;
            eprintln!("disabled {email}; their sessions end at their next request");
        }
    }
    Ok(())
}

pub async fn create_org(name: &str, dbargs: &DatabaseArgs, actor: &str) -> Result<()> {
    let pool = open_db(dbargs).await?;
    let id = db::keys::create_org(&pool, name, actor).await?;
    outln!("{id}")?;
    Ok(())
}

pub async fn audit_verify(dbargs: &DatabaseArgs) -> Result<()> {
    use db::audit::ChainVerdict;
    match db::audit::verify_chain(&open_db(dbargs).await?).await? {
        ChainVerdict::Intact(rows) => outln!("audit log intact: {rows} rows verified")?,
        ChainVerdict::Hidden(why) => return Err(anyhow!("cannot verify the audit log: {why}")),
        ChainVerdict::Broken { link, verified } => {
            eprintln!(
                "audit log chain BROKEN at row {}: {} ({verified} rows before it verified)",
                link.id, link.reason
            );
            return Err(anyhow!(Tampered));
        }
    }
    Ok(())
}
