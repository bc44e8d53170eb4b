//! The long-running roles: the proxy, the Connector Agent, the operator (in a cluster, on this
//! machine, the demo) and the console.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};

use apitree::cli::{ConsoleArgs, DemoArgs, LocalArgs, OperatorArgs, OutputFormat, ProxyArgs};
use apitree::db;
use apitree::proxy::{self, state};

use super::{secret_sources, shutdown_signal, write_private};

pub async fn operator(args: OperatorArgs) -> Result<()> {
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

pub async fn local(args: LocalArgs) -> Result<()> {
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

pub async fn demo(args: DemoArgs) -> Result<()> {
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
                gateway.runtime.runs.len(),
                gateway.runtime.incidents.len(),
                gateway.runtime.notifications
            );
        }
    }
    Ok(())
}

pub async fn proxy(args: ProxyArgs) -> Result<()> {
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

pub async fn agent(cmd: apitree::cli::AgentCommand) -> Result<()> {
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

pub async fn console(args: ConsoleArgs) -> Result<()> {
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

/// Reads APITREE_JWT_SECRETS and the console's variables once, before the HTTP port starts,
/// and says who may read the status.
pub fn status_viewers() -> Result<Option<apitree::operator::http::Viewers>> {
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
