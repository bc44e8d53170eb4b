//! Logging setup: tracing to stderr, as text or JSON, filtered by an env-filter expression.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::cli::LogFormat;

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {source}; use e.g. `info` or `apitree=debug,kube=warn`")]
pub struct TelemetryError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|source| TelemetryError {
        filter: filter.to_string(),
        source,
    })?;
    let registry = tracing_subscriber::registry().with(env_filter);
    // Colour only for a person at a terminal: a file or a pipe gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(colour),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .flatten_event(true),
            )
            .init(),
    }
    Ok(())
}
