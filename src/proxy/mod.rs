//! The gateway data plane: `apitree proxy`.
//!
//! `server` is the policy stack, the one place that stacks the layers; one module per layer
//! beside it (ratelimit + limiter, breaker, pii, accesslog, metrics, forward, inbound,
//! request_body), `rescue` (refusals to responses), `body` (response body adapters), `admin`
//! (`/metrics`, `/healthz`, `/readyz`), the compiled configuration (`config`, `state`,
//! `dbmode`) and `transport`, everything that moves bytes (workers, the client and upstream
//! fast paths, pools, deadlines, drain). API keys and credential sealing are
//! `crate::entities`.

pub mod accesslog;
pub mod admin;
pub mod body;
pub mod breaker;
pub mod config;
pub mod dbmode;
pub mod egress;
pub mod forward;
pub mod inbound;
pub mod limiter;
pub mod metrics;
pub mod pii;
pub mod ratelimit;
pub mod redirect;
pub mod request_body;
pub mod rescue;
pub mod server;
pub mod sharded;
pub mod state;
pub mod tls;
pub mod transport;
pub mod usage;

/// A `HashMap` with foldhash's fast, unkeyed hasher, for the maps a request looks into:
/// rate-limit counters by key and org id, idle upstream connections by address, keys by their
/// HMAC. None of those keys is chosen by a client (ids and addresses come from the config; a
/// key's HMAC is keyed by the secret pepper), so the DoS-resistant default hasher buys nothing
/// there and costs a SipHash per lookup.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

use std::{future::Future, path::PathBuf, sync::Arc};

use tokio::net::TcpListener;

use config::{InvalidConfig, ProxyConfig};
use server::Gateway;
use state::{GatewayState, SharedState};

/// How `apitree proxy` was asked to run.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub config: PathBuf,
    pub redis_url: Option<String>,
    /// CA certificates (PEM file) a `rediss://` Redis is verified against, instead of the
    /// system's roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Serve orgs, keys, APIs and credentials from this PostgreSQL database.
    pub database_url: Option<String>,
    /// In database mode, networks sellers' upstreams may reach although the egress policy
    /// denies them (see [`egress`]).
    pub upstream_allow: Vec<ipnet::IpNet>,
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub access_log: bool,
    /// In database mode, record usage in `usage_counters` (see [`usage`]).
    pub usage_metering: bool,
}

/// Why the proxy could not start. Nothing starts half-configured.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Config(#[from] InvalidConfig),
    #[error("{0}")]
    Secrets(String),
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Redis(#[from] limiter::RedisUrlError),
    #[error("{0}")]
    Database(#[from] crate::db::DbError),
    #[error("{0}")]
    Tls(String),
}

/// A gateway ready to serve, with its listeners bound.
pub struct Prepared {
    pub gateway: Arc<Gateway>,
    /// The database usage is written to (database mode).
    pub usage_pool: Option<sqlx::PgPool>,
    pub listener: TcpListener,
    pub admin: TcpListener,
    /// `tls.redirect`'s plain-HTTP listener and its redirect counter.
    pub redirect: Option<(TcpListener, prometheus::IntCounter)>,
    pub settings: transport::workers::ServerSettings,
    pub config: ProxyConfig,
}

/// Loads and validates everything, binds the listeners; does not serve yet.
pub async fn prepare(opts: &ProxyOptions) -> Result<Prepared, ProxyError> {
    let cfg = ProxyConfig::load(&opts.config)?;
    let base = opts.config.parent().map(PathBuf::from).unwrap_or_default();
    let file = opts.config.display().to_string();
    prepare_config(cfg, &base, &file, opts).await
}

/// [`prepare`] for a configuration already in memory: `base` is the directory its relative
/// paths start from, `file` what errors and `/readyz` call it. `opts.config` is not read.
pub async fn prepare_config(
    mut cfg: ProxyConfig,
    base: &std::path::Path,
    file: &str,
    opts: &ProxyOptions,
) -> Result<Prepared, ProxyError> {
    if let Some(l) = &opts.listen {
        cfg.listen = l.clone();
    }
    if let Some(a) = &opts.admin {
        cfg.admin = a.clone();
    }
    let (base, file) = (base.to_path_buf(), file.to_string());
    let pepper = state::load_pepper(&cfg, &base).map_err(ProxyError::Secrets)?;
    let master_keys = state::load_master_keys(&cfg, &base).map_err(ProxyError::Secrets)?;
    warn_on_example_secrets(&cfg);
    let (state, database) = match &opts.database_url {
        None => (
            GatewayState::build(&cfg, &file, master_keys.as_ref(), None)?,
            None,
        ),
        Some(url) => {
            let pool = crate::db::connect(url, 4).await?;
            let source = format!(
                "{file} + database {}",
                crate::db::describe_target(&crate::db::parse_url(url)?)
            );
            let egress = Arc::new(egress::EgressPolicy::allowing(opts.upstream_allow.clone()));
            let state =
                dbmode::load(&pool, &cfg, &source, master_keys.as_ref(), &egress, None).await?;
            (state, Some((pool, source, egress)))
        }
    };
    let metrics = metrics::ProxyMetrics::new();
    metrics.config_reloads.with_label_values(&["ok"]).inc();
    let limiter = match &opts.redis_url {
        Some(url) => {
            let ca = match &opts.redis_ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    ProxyError::Secrets(format!("--redis-ca-file {}: {e}", path.display()))
                })?),
                None => None,
            };
            limiter::Limiter::shared_with_ca(url, ca, metrics.clone())?
        }
        None => limiter::Limiter::local(metrics.clone()),
    };
    let access_log = if opts.access_log {
        accesslog::AccessLog::stdout(metrics.access_log_dropped.clone())
    } else {
        accesslog::AccessLog::disabled(metrics.access_log_dropped.clone())
    };
    let mut gateway = Gateway::new(
        SharedState::new(state),
        pepper,
        limiter,
        metrics,
        access_log,
        server::system_clock(),
    )
    .with_body_read_timeout(cfg.body_read_timeout.as_std());
    if database.is_some() && opts.usage_metering {
        gateway = gateway.with_usage(Arc::new(usage::UsageMeter::new()));
    }
    let gateway = Arc::new(gateway);
    let bind = |addr: String| async move {
        TcpListener::bind(&addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, source })
    };
    let mut usage_pool = None;
    if let Some((pool, source, egress)) = database {
        usage_pool = Some(pool.clone());
        *gateway.database.lock().unwrap_or_else(|p| p.into_inner()) = server::DependencyStatus::Ok;
        tokio::spawn(dbmode::watch(
            gateway.clone(),
            pool,
            cfg.clone(),
            source,
            master_keys.clone(),
            egress,
        ));
    }
    let mut settings = transport::workers::ServerSettings::of(&cfg);
    if let Some(tls) = &cfg.tls {
        let tls = tls::ServerTls::gateway(tls, &base, &gateway.metrics.registry)
            .map_err(ProxyError::Tls)?;
        *gateway.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls.certificates.clone());
        tokio::spawn(tls.certificates.clone().watch());
        settings.tls = Some(tls);
    }
    let listener = bind(cfg.listen.clone()).await?;
    let admin = bind(cfg.admin.clone()).await?;
    let redirect = match cfg.tls.as_ref().and_then(|t| t.redirect.as_ref()) {
        Some(r) => {
            let counter = prometheus::IntCounter::new(
                "apitree_proxy_https_redirects_total",
                "Plain-HTTP requests answered with a redirect to https (tls.redirect).",
            )
            .expect("valid metric");
            let _ = gateway.metrics.registry.register(Box::new(counter.clone()));
            Some((bind(r.listen.clone()).await?, counter))
        }
        None => None,
    };
    Ok(Prepared {
        gateway,
        usage_pool,
        listener,
        admin,
        redirect,
        settings,
        config: cfg,
    })
}

/// A proxy running inside this process on loopback ports: one replica of the local platform.
pub struct Embedded {
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Embedded {
    /// Stops accepting, drains in-flight requests (up to the config's shutdown grace) and waits.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

/// Starts a DB-less proxy from an in-memory config on 127.0.0.1 ephemeral ports (the config's
/// listen and admin addresses are ignored), with one worker thread and its own metrics.
pub async fn start_embedded(
    cfg: &ProxyConfig,
    source: &str,
    pepper: crate::entities::keys::Pepper,
    master_keys: Option<&crate::entities::vault::MasterKeys>,
) -> Result<Embedded, ProxyError> {
    let state = GatewayState::build(cfg, source, master_keys, None)?;
    let metrics = metrics::ProxyMetrics::new();
    metrics.config_reloads.with_label_values(&["ok"]).inc();
    let gateway = Arc::new(
        Gateway::new(
            SharedState::new(state),
            pepper,
            limiter::Limiter::local(metrics.clone()),
            metrics.clone(),
            accesslog::AccessLog::disabled(metrics.access_log_dropped.clone()),
            server::system_clock(),
        )
        .with_body_read_timeout(cfg.body_read_timeout.as_std()),
    );
    let bind = || async {
        TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| ProxyError::Bind {
                addr: "127.0.0.1:0".into(),
                source,
            })
    };
    let (listener, admin) = (bind().await?, bind().await?);
    let local = |l: &TcpListener| {
        l.local_addr().map_err(|source| ProxyError::Bind {
            addr: "127.0.0.1:0".into(),
            source,
        })
    };
    let (addr, admin_addr) = (local(&listener)?, local(&admin)?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let settings = transport::workers::ServerSettings::of(cfg);
    let done = tokio::spawn(transport::workers::run_with_workers(
        gateway.clone(),
        listener,
        admin,
        async {
            let _ = rx.await;
        },
        settings,
        1,
    ));
    Ok(Embedded {
        addr,
        admin: admin_addr,
        gateway,
        stop: Some(tx),
        done: Some(done),
    })
}

fn warn_on_example_secrets(cfg: &ProxyConfig) {
    for path in example_secret_files(cfg, |v| std::env::var_os(v).is_some()) {
        tracing::warn!(file = %path.display(), "using an EXAMPLE secret file: fine for trying apitree out, never for real traffic");
    }
}

/// The example secret files the config uses: a file the environment overrides (`set(var)`)
/// is not used (see `load_pepper`, `load_master_keys`).
fn example_secret_files(cfg: &ProxyConfig, set: impl Fn(&str) -> bool) -> Vec<&std::path::PathBuf> {
    [
        (&cfg.secrets.pepper_file, "APITREE_KEY_PEPPER"),
        (&cfg.secrets.master_key_file, "APITREE_MASTER_KEY"),
    ]
    .into_iter()
    .filter(|(_, var)| !set(var))
    .filter_map(|(file, _)| file.as_ref())
    .filter(|path| path.to_string_lossy().contains("example"))
    .collect()
}

/// Reloads the config file into a running gateway; keeps the old config when the new one is
/// invalid (and says why). In database mode the database watcher reloads instead. Returns the
/// changed settings only a restart applies (compared with `started`, the config the process
/// started with): those keep running as started.
pub fn reload(
    gateway: &Gateway,
    opts: &ProxyOptions,
    started: &ProxyConfig,
) -> Result<Vec<&'static str>, ProxyError> {
    if opts.database_url.is_some() {
        tracing::info!("database mode reloads on database changes; restart to apply file changes");
        return Ok(Vec::new());
    }
    let result = (|| {
        let mut cfg = ProxyConfig::load(&opts.config)?;
        // Command-line addresses win over the file's, as at start.
        if let Some(l) = &opts.listen {
            cfg.listen = l.clone();
        }
        if let Some(a) = &opts.admin {
            cfg.admin = a.clone();
        }
        let restart = started.restart_only_changes(&cfg);
        let base = opts.config.parent().map(PathBuf::from).unwrap_or_default();
        let master_keys = state::load_master_keys(&cfg, &base).map_err(ProxyError::Secrets)?;
        let previous = gateway.state.current();
        let state = GatewayState::build(
            &cfg,
            &opts.config.display().to_string(),
            master_keys.as_ref(),
            Some(&previous),
        )?;
        gateway.state.store(state);
        Ok(restart)
    })();
    let label = if result.is_ok() { "ok" } else { "error" };
    gateway
        .metrics
        .config_reloads
        .with_label_values(&[label])
        .inc();
    result
}

/// Runs `apitree proxy` until `shutdown` resolves. SIGHUP reloads the config file.
pub async fn serve(
    opts: ProxyOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let prepared = prepare(&opts).await?;
    let gw = prepared.gateway.clone();
    let usage_pool = prepared.usage_pool.clone();
    let usage_task = tokio::spawn({
        let (gw, pool) = (gw.clone(), usage_pool.clone());
        async move {
            let (Some(meter), Some(pool)) = (gw.usage.clone(), pool) else {
                return;
            };
            let mut tick = tokio::time::interval(USAGE_FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                flush_usage(&gw, &meter, &pool).await;
            }
        }
    });
    tracing::info!(
        listen = %prepared.config.listen,
        scheme = if prepared.settings.tls.is_some() { "https" } else { "http" },
        admin = %prepared.config.admin,
        redirect_to_https = prepared
            .config
            .tls
            .as_ref()
            .and_then(|t| t.redirect.as_ref())
            .map_or("", |r| r.listen.as_str()),
        routes = prepared.config.routes.len(),
        keys = prepared.config.keys.len(),
        rate_limits = if opts.redis_url.is_some() { "redis" } else { "local" },
        "apitree proxy is serving"
    );
    #[cfg(unix)]
    {
        let gw = gw.clone();
        let opts = opts.clone();
        let started = prepared.config.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                let certificates = gw.tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(certificates) = certificates {
                    let _ = tokio::task::spawn_blocking(move || certificates.reload(true)).await;
                }
                match reload(&gw, &opts, &started) {
                    Ok(pending) if pending.is_empty() => tracing::info!("configuration reloaded"),
                    Ok(pending) => tracing::warn!(
                        "configuration reloaded, except settings only a restart applies, which still run as started: {}",
                        pending.join(", ")
                    ),
                    Err(e) => tracing::error!(
                        "configuration NOT reloaded, still serving the previous one: {e}"
                    ),
                }
            }
        });
    }
    let redirect = prepared.redirect.map(|(listener, counter)| {
        let port = prepared
            .config
            .tls
            .as_ref()
            .and_then(|t| t.redirect.as_ref());
        let port = port.map_or(443, |r| r.https_port);
        let header_read = prepared.settings.header_read;
        tokio::spawn(redirect::serve(listener, port, header_read, counter))
    });
    transport::workers::run(
        gw.clone(),
        prepared.listener,
        prepared.admin,
        shutdown,
        prepared.settings,
    )
    .await;
    if let Some(task) = redirect {
        task.abort();
    }
    if let (Some(meter), Some(pool)) = (&gw.usage, &usage_pool) {
        // What was counted since the last flush, after the last request has been answered.
        usage_task.abort();
        if let Err(e) = meter.flush(pool).await {
            let lost = meter.pending().await;
            tracing::error!("usage of {lost} call(s) could not be recorded before exit: {e}");
        }
    }
    if !gw.access_log.close(std::time::Duration::from_secs(2)) {
        tracing::warn!("access-log lines still unwritten at exit: stdout is not keeping up");
    }
    Ok(())
}

/// How often a database-mode gateway sends the usage it counted.
pub const USAGE_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends the usage counted so far; a failure keeps it for the next try (counted in
/// `apitree_proxy_usage_flushes_total{result="failed"}`).
pub async fn flush_usage(gw: &Gateway, meter: &usage::UsageMeter, pool: &sqlx::PgPool) {
    let result = match meter.flush(pool).await {
        Ok(0) => return,
        Ok(_) => "ok",
        Err(e @ usage::FlushError::Kept(_)) => {
            tracing::warn!("{e}");
            "failed"
        }
        Err(e @ usage::FlushError::Discarded(_)) => {
            tracing::error!("{e}");
            "discarded"
        }
    };
    gw.metrics.usage_flushes.with_label_values(&[result]).inc();
}

#[cfg(test)]
mod example_secret_tests {
    use super::*;

    /// The warning names the example files in use, not those the environment overrides.
    #[test]
    fn only_the_example_files_in_use_are_named() {
        let cfg: ProxyConfig = serde_saphyr::from_str(
            "secrets: { pepperFile: proxy.example-pepper, masterKeyFile: proxy.example-master-keys }\n",
        )
        .unwrap();
        let named = |set: &[&str]| {
            example_secret_files(&cfg, |v| set.contains(&v))
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            named(&[]),
            ["proxy.example-pepper", "proxy.example-master-keys"]
        );
        assert_eq!(
            named(&["APITREE_KEY_PEPPER"]),
            ["proxy.example-master-keys"]
        );
        assert!(named(&["APITREE_KEY_PEPPER", "APITREE_MASTER_KEY"]).is_empty());
    }
}
