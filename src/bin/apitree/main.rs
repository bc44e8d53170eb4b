//! The `apitree` binary: parse, set up telemetry, dispatch, map errors to exit codes. Each
//! command's handler (in `commands/`) reads its arguments and files, calls the library and
//! prints; what a command does lives in the library's modules.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use apitree::cli::{
    AuditCommand, Cli, Command, CredentialsCommand, DetectCommand, OrgsCommand, PiiCommand,
};
use apitree::telemetry;

mod commands;

use commands::{data, serve, tools, DriftFound, Tampered};

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

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Crds(args) => tools::crds(args),
        Command::Migrate(args) => data::migrate(args).await,
        Command::Proxy(args) => serve::proxy(args).await,
        Command::Agent(cmd) => serve::agent(cmd).await,
        Command::Keys(cmd) => data::keys(cmd).await,
        Command::Orgs(OrgsCommand::Create { name, db, actor }) => {
            data::create_org(&name, &db, &actor.resolve()).await
        }
        Command::Credentials(CredentialsCommand::Reencrypt {
            batch,
            secrets,
            db,
            actor,
        }) => data::reencrypt(batch, secrets, db, actor.resolve()).await,
        Command::Credentials(cmd) => data::credentials(cmd),
        Command::Pii(PiiCommand::Scan { mask, format }) => tools::pii_scan(mask, format),
        Command::Audit(AuditCommand::Verify { db }) => data::audit_verify(&db).await,
        Command::Detect(DetectCommand::Replay {
            input,
            config,
            format,
        }) => tools::detect_replay(&input, config.as_deref(), format),
        Command::Demo(args) => serve::demo(args).await,
        Command::Local(args) => serve::local(args).await,
        Command::Operator(args) => serve::operator(args).await,
        Command::Drift(cmd) => data::drift(cmd).await,
        Command::Console(args) => serve::console(args).await,
        Command::Users(cmd) => data::users(cmd).await,
        Command::Dsar(cmd) => data::dsar(cmd).await,
    }
}
