//! The `apitree` binary: parse, set up telemetry, dispatch, map errors to exit codes.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Parser;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use apitree::cli::{
    AuditCommand, Cli, Command, ConsoleArgs, CrdsArgs, CredentialsCommand, DatabaseArgs, DemoArgs,
    DetectCommand, DriftCommand, KeysCommand, LocalArgs, MigrateArgs, OperatorArgs, OrgsCommand,
    OutputFormat, PiiCommand, ProxyArgs, Scope, SecretArgs, UsersCommand,
};
use apitree::crd::gateway::KeyScope;
use apitree::proxy::{self, config::ProxyConfig, keys::ApiKey, pii, state};
use apitree::{crd, db, telemetry};

// The proxy allocates per request (headers, buffers); mimalloc's thread-local caches suit that
// better than glibc malloc (see benches/proxy-vs-nginx.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // kube, sqlx and slack-morphism use rustls with ring; pick that provider before any TLS use
    // so a second provider compiled in by a dependency cannot make rustls panic at first use.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = Cli::parse();
    // The demo tells its story through notifications on stderr; operator logs would repeat it.
    let quiet_demo = matches!(cli.command, Command::Demo(_))
        && cli.log_filter == "info"
        && std::env::var_os("APITREE_LOG").is_none();
    let filter = if quiet_demo { "error" } else { &cli.log_filter };
    if let Err(err) = telemetry::init(cli.log_format, filter) {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`apitree pii scan | head -1`): nothing left to say to it.
        Err(err) if reader_gone(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the top-level message already carries the cause and what to check.
            eprintln!("error: {err}");
            if err.is::<Tampered>() {
                return ExitCode::from(3);
            }
            if err.is::<DriftFound>() {
                return ExitCode::from(2);
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether `err` is stdout's reader having closed the pipe.
fn reader_gone(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` that returns the write's error (a closed pipe among them) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `drift check` found drift: exit 2, so scripts can tell it from errors (1).
#[derive(Debug)]
struct DriftFound(usize);

impl std::fmt::Display for DriftFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} drift finding(s): see the report above", self.0)
    }
}

impl std::error::Error for DriftFound {}

/// The audit chain did not verify: a distinct exit code so scripts can tell it from errors.
#[derive(Debug)]
struct Tampered;

impl std::fmt::Display for Tampered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the audit log has been altered")
    }
}

impl std::error::Error for Tampered {}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Crds(args) => crds(args),
        Command::Migrate(args) => migrate(args).await,
        Command::Proxy(args) => run_proxy(args).await,
        Command::Agent(cmd) => agent(cmd).await,
        Command::Keys(cmd) => keys(cmd).await,
        Command::Orgs(OrgsCommand::Create { name, db, actor }) => {
            let pool = open_db(&db).await?;
            let id = db::keys::create_org(&pool, &name, &actor.resolve()).await?;
            outln!("{id}")?;
            Ok(())
        }
        Command::Credentials(CredentialsCommand::Reencrypt {
            batch,
            secrets,
            db: dbargs,
            actor,
        }) => reencrypt(batch, secrets, dbargs, actor.resolve()).await,
        Command::Credentials(cmd) => credentials(cmd),
        Command::Pii(PiiCommand::Scan { mask, format }) => pii_scan(mask, format),
        Command::Audit(AuditCommand::Verify { db: dbargs }) => {
            let pool = open_db(&dbargs).await?;
            if let Some(why) = db::audit::hidden_rows(&pool).await? {
                return Err(anyhow!("cannot verify the audit log: {why}"));
            }
            let mut verifier = db::audit::ChainVerifier::new();
            let mut after = 0;
            loop {
                let rows = db::audit::read_rows(&pool, after, 5_000).await?;
                let Some(last) = rows.last() else { break };
                after = last.id;
                for row in &rows {
                    if let Err(broken) = verifier.feed(row) {
                        eprintln!(
                            "audit log chain BROKEN at row {}: {} ({} rows before it verified)",
                            broken.id,
                            broken.reason,
                            verifier.verified()
                        );
                        return Err(anyhow!(Tampered));
                    }
                }
            }
            outln!("audit log intact: {} rows verified", verifier.verified())?;
            Ok(())
        }
        Command::Detect(DetectCommand::Replay {
            input,
            config,
            format,
        }) => detect_replay(&input, config.as_deref(), format),
        Command::Demo(args) => demo(args).await,
        Command::Local(args) => local(args).await,
        Command::Operator(args) => operator(args).await,
        Command::Drift(cmd) => drift(cmd).await,
        Command::Console(args) => console(args).await,
        Command::Users(cmd) => users(cmd).await,
        Command::Dsar(cmd) => dsar(cmd).await,
    }
}

async fn drift(cmd: DriftCommand) -> Result<()> {
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
            // What the migrations create, and nothing else: a used database could carry drift
            // into the reference.
            let tables: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                    .fetch_one(&pool)
                    .await?;
            if tables > 0 {
                return Err(anyhow!("the database holds {tables} table(s): snapshot an empty one, e.g. `createdb apitree_snapshot` and pass its URL"));
            }
            let target = db::describe_target(&db::parse_url(&db.resolve().unwrap_or_default())?);
            db::migrate(&pool, &target).await?;
            let mut conn = pool.acquire().await?;
            let schema = apitree::drift::introspect::introspect(&mut conn, "public").await?;
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

async fn operator(args: OperatorArgs) -> Result<()> {
    let viewers = status_viewers()?;
    let identity = args.identity.unwrap_or_else(|| {
        std::env::var("HOSTNAME").unwrap_or_else(|_| format!("apitree-{}", std::process::id()))
    });
    let opts = apitree::operator::serve::OperatorOptions {
        http: args.http,
        http_tls: args.tls.pair(),
        namespace: args.lease_namespace,
        lease_name: args.lease_name,
        identity,
        slack_channel: args.slack_channel,
        default_image: args
            .image
            .unwrap_or_else(|| format!("ghcr.io/apitree/apitree:{}", env!("CARGO_PKG_VERSION"))),
        status_url: args.status_url,
        sweep_every: args.sweep_every.as_std(),
        database_url: args.state.resolve(),
        viewers,
        agents: args.agents.options(),
    };
    let signing_secret = std::env::var("SLACK_SIGNING_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    apitree::operator::serve::run(opts, signing_secret, shutdown_signal()).await?;
    Ok(())
}

async fn local(args: LocalArgs) -> Result<()> {
    let viewers = status_viewers()?;
    let durable = std::sync::Arc::new(
        apitree::operator::durable::Durable::open(args.state.resolve().as_deref()).await?,
    );
    let (notifier, delivery) = apitree::notify::slack::console_or_slack(
        &args.slack_channel,
        durable.outbox(""),
        std::sync::Arc::new(|| true),
    );
    let signing_secret = std::env::var("SLACK_SIGNING_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    let opts = apitree::operator::local::LocalOptions {
        path: args.path,
        proxy_config: args.proxy_config,
        http: args.http,
        http_tls: args.tls.pair(),
        base_port: args.port,
        viewers,
        interval: std::time::Duration::from_secs(1),
        durable,
        agents: args.agents.options(),
    };
    let result = apitree::operator::local::run(
        opts,
        std::sync::Arc::new(notifier),
        signing_secret,
        shutdown_signal(),
    )
    .await;
    if let Some(d) = delivery {
        d.finish().await;
    }
    Ok(result?)
}

async fn demo(args: DemoArgs) -> Result<()> {
    let gateway = apitree::demo::run(apitree::demo::DemoOptions {
        keep_running: args.keep_running,
        slack_channel: Some(args.slack_channel),
        http: args.http,
        database_url: apitree::cli::database_url_or_env(&args.database_url),
    })
    .await?;
    let summary = apitree::demo::summary(&gateway);
    match args.format {
        OutputFormat::Json => outln!("{summary}")?,
        OutputFormat::Text => {
            eprintln!(
                "\ndemo finished: {} gate run(s), {} incident(s), {} notification(s)",
                gateway.runs.len(),
                gateway.incidents.len(),
                gateway.notifications
            );
        }
    }
    Ok(())
}

async fn run_proxy(args: ProxyArgs) -> Result<()> {
    let opts = proxy::ProxyOptions {
        config: args.config,
        redis_url: args.redis_url,
        redis_ca_file: args.redis_ca_file,
        database_url: args.database_url,
        upstream_allow: args.upstream_allow,
        listen: args.listen,
        admin: args.admin,
        access_log: !args.no_access_log,
        usage_metering: !args.no_usage_metering,
    };
    proxy::serve(opts, shutdown_signal()).await?;
    Ok(())
}

async fn agent(cmd: apitree::cli::AgentCommand) -> Result<()> {
    use apitree::agent::{envelope, hub, run};
    match cmd.tool {
        Some(apitree::cli::AgentTool::Keygen { out }) => {
            let text = envelope::Signer::generate_text();
            write_private(&out, &text)?;
            let signer = envelope::Signer::parse(&text).map_err(|e| anyhow!(e))?;
            outln!("{}", signer.public_key())?;
            Ok(())
        }
        Some(apitree::cli::AgentTool::Token { name, pool, out }) => {
            let (token, record) = hub::new_token(&name, &pool).map_err(|e| anyhow!(e))?;
            write_private(&out, &format!("{token}\n"))?;
            let entry = serde_saphyr::to_string(&vec![record])?;
            let entry: String = entry.lines().map(|l| format!("  {l}\n")).collect();
            outln!("  # agent {name} of pool {pool}: this entry goes under `agents:` in the control plane's agents file\n{}", entry.trim_end())?;
            Ok(())
        }
        None => {
            let a = cmd.run;
            let need =
                |v: Option<PathBuf>, flag: &str| v.ok_or_else(|| anyhow!("{flag} is required"));
            let token_file = need(a.token_file, "--token-file")?;
            let token = std::fs::read_to_string(&token_file)
                .map_err(|e| anyhow!("--token-file {}: {e}", token_file.display()))?
                .trim()
                .to_string();
            let key = envelope::PublicKey::from_file(&need(a.config_key, "--config-key")?)
                .map_err(|e| anyhow!(e))?;
            let ca_pem = match &a.ca_file {
                Some(f) => {
                    Some(std::fs::read(f).map_err(|e| anyhow!("--ca-file {}: {e}", f.display()))?)
                }
                None => None,
            };
            let mut opts = run::AgentOptions::new(
                a.control_plane
                    .ok_or_else(|| anyhow!("--control-plane is required"))?,
                token,
                key,
                a.pool.ok_or_else(|| anyhow!("--pool is required"))?,
                need(a.cache_dir, "--cache-dir")?,
                need(a.config, "--config")?,
            );
            opts.ca_pem = ca_pem;
            opts.redis_url = a.redis_url;
            opts.redis_ca_file = a.redis_ca_file;
            opts.access_log = !a.no_access_log;
            opts.report_every = a.report_every.as_std();
            run::run(opts, shutdown_signal()).await?;
            Ok(())
        }
    }
}

/// Writes a secret to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path).map_err(|e| {
        anyhow!(
            "{}: {e} (it is never overwritten; choose a new file)",
            path.display()
        )
    })?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The key pepper from the environment or the --config file's secrets.pepperFile.
fn pepper_from(secrets: &SecretArgs) -> Result<proxy::keys::Pepper> {
    let (cfg, base) = secret_sources(secrets)?;
    state::load_pepper(&cfg, &base).map_err(|e| anyhow!(e))
}

/// The proxy config named by --config (for its secret file paths), or an empty one.
fn secret_sources(args: &SecretArgs) -> Result<(ProxyConfig, PathBuf)> {
    match &args.config {
        Some(path) => {
            let cfg = ProxyConfig::load(path)?;
            Ok((
                cfg,
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
            ))
        }
        None => Ok((serde_saphyr::from_str("{}")?, PathBuf::new())),
    }
}

async fn open_db(args: &DatabaseArgs) -> Result<sqlx::PgPool> {
    let url = args.resolve().context(
        "no database URL: pass --database-url, or set APITREE_DATABASE_URL or DATABASE_URL",
    )?;
    Ok(db::connect(&url, 2).await?)
}

fn to_scope(scope: Scope) -> KeyScope {
    match scope {
        Scope::Live => KeyScope::Live,
        Scope::Test => KeyScope::Test,
    }
}

async fn keys(cmd: KeysCommand) -> Result<()> {
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
                scope: to_scope(scope),
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
                        let state = match (r.revoked_at, r.grace_until, r.expires_at) {
                            (Some(_), _, _) => "revoked".to_string(),
                            (_, Some(g), _) if g <= now => "rotated (grace over)".into(),
                            (_, Some(g), _) => format!(
                                "rotated, valid until {}",
                                g.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                            ),
                            (_, _, Some(e)) if e <= now => "expired".into(),
                            _ => "active".into(),
                        };
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
            print!("{}", key_entry(&key, &pepper, &org));
        }
        KeysCommand::Generate {
            scope,
            org,
            secrets,
        } => {
            let pepper = pepper_from(&secrets)?;
            let key = ApiKey::generate(to_scope(scope));
            outln!("{}", key.expose_secret())?;
            eprintln!(
                "# Store only this entry; the key above is shown once.\n{}",
                key_entry(&key, &pepper, &org)
            );
        }
    }
    Ok(())
}

fn key_entry(key: &ApiKey, pepper: &proxy::keys::Pepper, org: &str) -> String {
    let scope = match key.scope() {
        KeyScope::Live => "live",
        KeyScope::Test => "test",
    };
    format!(
        "- prefix: {}\n  hash: {}\n  org: {org}\n  scope: {scope}\n",
        key.prefix(),
        pepper.hash(key).to_hex()
    )
}

async fn reencrypt(
    batch: i64,
    secrets: SecretArgs,
    dbargs: DatabaseArgs,
    actor: String,
) -> Result<()> {
    let (cfg, base) = secret_sources(&secrets)?;
    let keys = state::load_master_keys(&cfg, &base)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("{}", proxy::vault::VaultError::Missing))?;
    let pool = open_db(&dbargs).await?;
    loop {
        let p = db::credentials::reencrypt_batch(&pool, &keys, batch.max(1), &actor).await?;
        eprintln!(
            "re-encrypted {}: {}/{} credentials at key version {}",
            p.rewrapped, p.done, p.total, p.target_version
        );
        if p.rewrapped == 0 || p.versions_in_use.is_empty() {
            if p.versions_in_use.is_empty() {
                outln!(
                    "every credential is at key version {}; older versions are unused and can be removed",
                    p.target_version
                )?;
                return Ok(());
            }
            return Err(anyhow!(
                "credentials under key version(s) {:?} are locked by another run or were added meanwhile; run again",
                p.versions_in_use
            ));
        }
    }
}

fn credentials(cmd: CredentialsCommand) -> Result<()> {
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
    if !matches!(kind.as_str(), "byok" | "system") {
        return Err(anyhow!("--kind must be byok or system, got {kind:?}"));
    }
    let (cfg, base) = secret_sources(&secrets)?;
    let keys = state::load_master_keys(&cfg, &base)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("{}", proxy::vault::VaultError::Missing))?;
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
        "- name: {name}\n  org: {org}\n  api: {api}\n  kind: {kind}\n  keyVersion: {}\n  nonce: {}\n  ciphertext: {}\n  header: {header}\n  valuePrefix: {value_prefix:?}\n",
        sealed.key_version,
        sealed.nonce_b64(),
        sealed.ciphertext_b64()
    );
    Ok(())
}

fn detect_replay(input: &Path, config: Option<&Path>, format: OutputFormat) -> Result<()> {
    use apitree::crd::gateway::DetectionSpec;
    use apitree::detect::{replay, ScoreConfig};
    let spec: DetectionSpec = match config {
        None => DetectionSpec::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
            serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
    };
    let t = &spec.thresholds;
    if !(t.warning < t.high && t.high < t.critical) {
        return Err(anyhow!(
            "thresholds must be ordered warning < high < critical, got {} / {} / {}",
            t.warning,
            t.high,
            t.critical
        ));
    }
    // Streamed: each verdict is written as its row is read, in bounded memory.
    let reader: Box<dyn std::io::BufRead + 'static> = if input == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(input)
            .map_err(|e| anyhow!("cannot read {}: {e}", input.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let cfg = ScoreConfig::from(&spec);
    let mut replayer: Option<replay::Replayer> = None;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, line) in std::io::BufRead::lines(reader).enumerate() {
        let line = line.map_err(|e| anyhow!("{}: line {}: {e}", input.display(), i + 1))?;
        let at = |e: replay::ReplayError| anyhow!("{}: {e}", input.display());
        let row = match replayer.as_mut() {
            None => {
                replayer = replay::Replayer::header(i + 1, &line, cfg.clone()).map_err(at)?;
                continue;
            }
            Some(r) => r.row(i + 1, &line).map_err(at)?,
        };
        let Some(r) = row else { continue };
        match format {
            OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&r)?)?,
            OutputFormat::Text => writeln!(out, "{}", replay::text_line(&r))?,
        }
    }
    if replayer.is_none() {
        return Err(anyhow!(
            "{}: line 1: empty input; expected a header like timestamp,requests,errors",
            input.display()
        ));
    }
    out.flush()?;
    Ok(())
}

fn pii_scan(mask: bool, format: OutputFormat) -> Result<()> {
    let mut stdin = std::io::stdin().lock();
    if mask {
        let mut stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        let mut masker = pii::StreamMasker::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stdout.write_all(&masker.push(&buf[..n]))?;
        }
        stdout.write_all(&masker.finish())?;
        stdout.flush()?;
        let summary = masker.counts.summary();
        eprintln!(
            "masked: {}",
            if summary.is_empty() {
                "nothing found".into()
            } else {
                summary
            }
        );
        return Ok(());
    }
    let mut text = Vec::new();
    stdin.read_to_end(&mut text)?;
    let findings = pii::scan(&text);
    let mut masked = text.clone();
    pii::apply_mask(&mut masked, &findings);
    let mut counts = pii::Counts::default();
    counts.add(&findings);
    let positions = pii::line_columns(&text, findings.iter().map(|f| f.start));
    let rows: Vec<serde_json::Value> = findings
        .iter()
        .zip(positions)
        .map(|(f, (line, column))| {
            serde_json::json!({
                "kind": f.kind.label(),
                "line": line,
                "column": column,
                "masked": String::from_utf8_lossy(&masked[f.start..f.end]),
            })
        })
        .collect();
    match format {
        OutputFormat::Json => {
            let by_kind: serde_json::Map<String, serde_json::Value> = pii::PiiKind::ALL
                .iter()
                .map(|k| (k.label().to_string(), counts.0[*k as usize].into()))
                .collect();
            outln!(
                "{}",
                serde_json::json!({"findings": rows, "counts": by_kind})
            )?;
        }
        OutputFormat::Text => {
            for r in &rows {
                outln!(
                    "{}:{}\t{}\t{}",
                    r["line"],
                    r["column"],
                    r["kind"].as_str().unwrap_or(""),
                    r["masked"].as_str().unwrap_or("")
                )?;
            }
            eprintln!("{} finding(s)", findings.len());
        }
    }
    Ok(())
}

fn crds(args: CrdsArgs) -> Result<()> {
    if args.out.is_empty() {
        print!("{}", crd::render_all()?);
        return Ok(());
    }
    for dir in &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow!("cannot create directory {}: {e}", dir.display()))?;
        for def in crd::all_crds() {
            let path = dir.join(crd::crd_file_name(&def));
            std::fs::write(&path, crd::render_crd(&def)?)
                .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

async fn migrate(args: MigrateArgs) -> Result<()> {
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

async fn console(args: ConsoleArgs) -> Result<()> {
    use apitree::console::{self, jwt::Keyring, throttle::Limits, Console, ConsoleMetrics};
    use std::sync::Arc;
    let secrets = std::env::var("APITREE_JWT_SECRETS").map_err(|_| {
        anyhow!("no session keyring: set APITREE_JWT_SECRETS to `kid:secret` (a secret of at least 32 bytes, e.g. from `openssl rand -base64 48`)")
    })?;
    let keyring = Keyring::parse(&secrets).map_err(|e| anyhow!(e))?;
    console::password::prepare();
    let url = args.db.resolve().context(
        "no database URL: pass --database-url, or set APITREE_DATABASE_URL or DATABASE_URL",
    )?;
    let pool = db::connect(&url, 8).await?;
    db::require_latest(&pool, &url).await?;
    let (cfg, base) = secret_sources(&args.secrets)?;
    let pepper = match state::load_pepper(&cfg, &base) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            tracing::warn!("{e}; the console will not issue or rotate keys");
            None
        }
    };
    let master_keys = state::load_master_keys(&cfg, &base)
        .map_err(|e| anyhow!(e))?
        .map(Arc::new);
    if master_keys.is_none() {
        tracing::warn!(
            "no master key (APITREE_MASTER_KEY); the console will not store credentials"
        );
    }
    let metrics = ConsoleMetrics::new();
    let tls = match args.tls.pair() {
        Some((cert, key)) => Some(
            apitree::small_http::tls(&cert, &key, &metrics.registry, "apitree_console")
                .map_err(|e| anyhow!(e))?,
        ),
        None => None,
    };
    let c = Arc::new(Console {
        pool,
        keyring,
        session_ttl: args.session_ttl.as_std(),
        trusted_proxies: args.trusted_proxies.clone(),
        egress: apitree::proxy::egress::EgressPolicy::allowing(args.upstream_allow.clone()),
        hashing: apitree::console::password::Gate::per_core(),
        throttle: console::throttle::Throttle::new(Limits {
            per_account: args.login_max_per_account.max(1),
            per_address: args.login_max_per_address.max(1),
            window: args.login_window.as_std(),
        }),
        pepper,
        master_keys,
        metrics,
        contacts: console::Contacts {
            security: args.security_contact.clone(),
            privacy: args.privacy_contact.clone(),
        },
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let kids = c.keyring.kids().join(", ");
    let server = console::spawn(listener, c, tls.clone())?;
    tracing::info!(
        addr = %server.addr,
        tls = tls.is_some(),
        jwt_kids = %kids,
        "console serving"
    );
    shutdown_signal().await;
    server.stop().await;
    Ok(())
}

/// The user a request names, and the other identities given for them.
async fn dsar_subject(
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

async fn dsar(cmd: apitree::cli::DsarCommand) -> Result<()> {
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

async fn users(cmd: UsersCommand) -> Result<()> {
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

/// Reads APITREE_JWT_SECRETS and the console's variables once, before the HTTP port starts,
/// and says who may read the status.
fn status_viewers() -> Result<Option<apitree::operator::http::Viewers>> {
    let viewers = apitree::operator::http::Viewers::from_env().map_err(|e| anyhow!(e))?;
    match &viewers {
        Some(v) => match v.console() {
            Some(link) => tracing::info!(
                kids = %v.keyring.kids().join(", "),
                console = %link.url,
                "the status data (/api/gateways) answers admins with a console session, confirmed with the console"
            ),
            None => tracing::warn!(
                kids = %v.keyring.kids().join(", "),
                "the status data (/api/gateways) answers admins with a console session; without APITREE_CONSOLE_URL a session's role is believed until it expires (a disabled admin keeps access that long)"
            ),
        },
        None => tracing::info!(
            "the status data (/api/gateways) answers this machine only; set APITREE_JWT_SECRETS to the console's keyring to serve it to signed-in admins"
        ),
    }
    Ok(viewers)
}
