//! The `apitree` binary: parse, set up telemetry, dispatch, map errors to exit codes.

use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Parser;

use apitree::cli::{Cli, Command, CrdsArgs, DatabaseArgs};
use apitree::{crd, db, telemetry};

fn main() -> ExitCode {
    // kube, sqlx and slack-morphism use rustls with ring; pick that provider before any TLS use
    // so a second provider compiled in by a dependency cannot make rustls panic at first use.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = Cli::parse();
    if let Err(err) = telemetry::init(cli.log_format, &cli.log_filter) {
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
        Err(err) => {
            // One line: the top-level message already carries the cause and what to check.
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Crds(args) => crds(args),
        Command::Migrate(args) => migrate(args).await,
    }
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

async fn migrate(args: DatabaseArgs) -> Result<()> {
    let url = args.resolve().context(
        "no database URL: pass --database-url, or set APITREE_DATABASE_URL or DATABASE_URL",
    )?;
    let target = db::describe_target(&db::parse_url(&url)?);
    let pool = db::connect(&url, 2).await?;
    db::migrate(&pool, &target).await?;
    let applied = db::MIGRATOR.iter().count();
    tracing::info!(%target, migrations = applied, "database is at the latest schema");
    Ok(())
}
