//! The commands' handlers, by what they work on: `data` (the gateway database: keys, orgs,
//! credentials, audit, drift, users, personal data), `tools` (offline: CRDs, PII scan, detector
//! replay) and `serve` (the long-running roles: proxy, agent, operator, local, demo, console).
//! Below: what they share.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use apitree::cli::{DatabaseArgs, SecretArgs};
use apitree::db;
use apitree::proxy::{config::ProxyConfig, state};

/// `println!` that returns the write's error (a closed pipe among them) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `drift check` found drift: exit 2, so scripts can tell it from errors (1).
#[derive(Debug)]
pub struct DriftFound(pub usize);

impl std::fmt::Display for DriftFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} drift finding(s): see the report above", self.0)
    }
}

impl std::error::Error for DriftFound {}

/// The audit chain did not verify: a distinct exit code so scripts can tell it from errors.
#[derive(Debug)]
pub struct Tampered;

impl std::fmt::Display for Tampered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the audit log has been altered")
    }
}

impl std::error::Error for Tampered {}

pub mod data;
pub mod serve;
pub mod tools;

/// Writes a secret to a new file only its owner can read.
pub(crate) fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
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
pub(crate) async fn shutdown_signal() {
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
pub(crate) fn pepper_from(secrets: &SecretArgs) -> Result<apitree::entities::keys::Pepper> {
    let (cfg, base) = secret_sources(secrets)?;
    state::load_pepper(&cfg, &base).map_err(|e| anyhow!(e))
}

/// The proxy config named by --config (for its secret file paths), or an empty one.
pub(crate) fn secret_sources(args: &SecretArgs) -> Result<(ProxyConfig, PathBuf)> {
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

pub(crate) async fn open_db(args: &DatabaseArgs) -> Result<sqlx::PgPool> {
    let url = args.resolve().context(
        "no database URL: pass --database-url, or set APITREE_DATABASE_URL or DATABASE_URL",
    )?;
    Ok(db::connect(&url, 2).await?)
}
