//! Command-line interface. Every flag can also be set through the `APITREE_*` variable named in
//! its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// apitree runs and heals the gateway of an API marketplace: the gateway proxy (data plane) and
/// a Kubernetes operator that gates every new revision Blue/Green, detects error-rate anomalies,
/// remediates schema drift and prompts credential rotation.
#[derive(Debug, Parser)]
#[command(
    name = "apitree",
    version,
    propagate_version = true,
    after_help = "Examples:\n  apitree crds | kubectl apply --server-side -f -\n  apitree crds --out crds --out charts/apitree/crds\n  DATABASE_URL=postgres://postgres@127.0.0.1/apitree apitree migrate"
)]
pub struct Cli {
    /// Log line format on stderr: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "APITREE_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log filter in tracing's env-filter syntax, e.g. `info` or `apitree=debug,kube=warn`.
    #[arg(long, global = true, default_value = "info", env = "APITREE_LOG")]
    pub log_filter: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions generated from the Rust types, or write them to files.
    ///
    /// Without --out, all CRDs go to stdout as one multi-document YAML stream, ready for
    /// `kubectl apply --server-side -f -`. With --out, each CRD is written to
    /// DIR/<plural>.apitree.io.yaml; repeat --out to refresh several copies at once:
    ///
    ///   apitree crds --out crds --out charts/apitree/crds
    Crds(CrdsArgs),

    /// Apply the gateway database migrations (idempotent: applied ones are skipped).
    ///
    /// Creates the tenant tables (orgs, users, API keys, APIs, upstream credentials, usage) with
    /// row-level security, the incident and notification-outbox tables and the append-only,
    /// hash-chained audit log. Exits 1 with a one-line reason when the database is unreachable.
    Migrate(DatabaseArgs),
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Directory to write one YAML file per CRD into (created if missing). Repeatable.
    #[arg(
        long,
        value_name = "DIR",
        env = "APITREE_CRDS_OUT",
        value_delimiter = ','
    )]
    pub out: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://apitree@db:5432/apitree. Falls back to DATABASE_URL.
    #[arg(
        long,
        value_name = "URL",
        env = "APITREE_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    /// The URL from the flag, `APITREE_DATABASE_URL` or `DATABASE_URL`, in that order.
    pub fn resolve(&self) -> Option<String> {
        self.database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok())
            .filter(|u| !u.trim().is_empty())
    }
}
