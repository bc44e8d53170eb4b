//! The gateway database: connection, migrations and one file per table family.

pub mod audit;
pub mod credentials;
pub mod dsar;
pub mod keys;
pub mod retention;

use sha2::{Digest, Sha384};
use std::{str::FromStr, time::Duration};

use sqlx::{
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
    Connection, PgConnection, PgPool,
};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long `connect` waits for the first connection before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Database errors. Messages name the server (never the password) and what to check.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "invalid database URL: {reason}; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    )]
    InvalidUrl { reason: String },

    #[error("cannot connect to PostgreSQL at {target}: {cause}; {hint}")]
    Connect {
        target: String,
        cause: String,
        hint: &'static str,
        #[source]
        source: sqlx::Error,
    },

    #[error("migrating the database at {target} failed: {source}")]
    Migrate {
        target: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    #[error(
        "{target} holds {tables} table(s) but no apitree migration history: it looks like another application's database, and apitree will not reshape it. Check --database-url; if it really is apitree's (say, restored without its history), pass --adopt"
    )]
    NotApitree { target: String, tables: i64 },

    #[error(
        "{operation} refused: row-level security would hide rows of {table} from this role, so apitree would see (and act on) only part of the data. Connect as the table's owner or a role with BYPASSRLS: apitree's commands, operator, health sweep and proxy work on the whole database; tenant isolation is for tenant-facing roles"
    )]
    RowSecurity {
        operation: &'static str,
        table: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "the database at {target} is at migration {applied}, and this release needs {latest}: run `apitree migrate --database-url …` against it first"
    )]
    Behind {
        target: String,
        applied: i64,
        latest: i64,
    },

    #[error("{operation} failed: {source}")]
    Query {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl DbError {
    /// A stable label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidUrl { .. } => "InvalidDatabaseUrl",
            Self::Connect { .. } => "DatabaseUnreachable",
            Self::Migrate { .. } => "MigrationFailed",
            Self::NotApitree { .. } => "NotApitreeDatabase",
            Self::RowSecurity { .. } => "RowLevelSecurity",
            Self::Behind { .. } => "SchemaBehind",
            Self::Query { .. } => "DatabaseQuery",
        }
    }

    pub(crate) fn query(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| match row_security_table(&source) {
            Some(table) => Self::RowSecurity {
                operation,
                table,
                source,
            },
            None => Self::Query { operation, source },
        }
    }
}

/// The table PostgreSQL named when it refused a query because row-level security would have
/// filtered it (only with `row_security = off`, see [`connect`]).
fn row_security_table(err: &sqlx::Error) -> Option<String> {
    let db = err.as_database_error()?;
    if db.code().as_deref() != Some("42501") {
        return None;
    }
    let table = db
        .message()
        .strip_prefix("query would be affected by row-level security policy for table ")?;
    Some(table.trim_matches('"').to_string())
}

/// Every connection [`connect`] opens runs with this setting. apitree's commands, the
/// operator, the health sweep and the proxy act on the whole database; a role that row-level
/// security applies to would quietly see part of it (a verifier certifying rows it cannot see,
/// a sweep finding nothing to revoke, a re-encryption "complete" with rows left under the old
/// key). With `row_security = off` PostgreSQL refuses such a query instead, and the error says
/// which table ([`DbError::RowSecurity`]). Tenant-facing code that relies on the policies must
/// turn it back on for its own connections.
pub const WHOLE_DATABASE: (&str, &str) = ("row_security", "off");

/// Parses a database URL without ever echoing its password back.
pub fn parse_url(url: &str) -> Result<PgConnectOptions, DbError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DbError::InvalidUrl {
            reason: "the scheme must be postgres:// or postgresql://".into(),
        });
    }
    PgConnectOptions::from_str(url).map_err(|e| DbError::InvalidUrl {
        reason: redact(&e.to_string(), url),
    })
}

/// `host:port/database` of a connection, for messages.
pub fn describe_target(opts: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("(default database)")
    )
}

/// Opens a small pool and proves it works with one round trip.
/// Connections see the whole database or fail ([`WHOLE_DATABASE`]).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    // NOTICEs ("already exists, skipping" on every migrate) are not news to the person
    // reading the log; warnings and errors still arrive.
    let opts = parse_url(url)?.options([WHOLE_DATABASE, ("client_min_messages", "warning")]);
    let target = describe_target(&opts);
    let fail = |source: sqlx::Error| {
        let (cause, hint) = classify_connect_error(&source);
        DbError::Connect {
            target: target.clone(),
            cause: redact(&cause, url),
            hint,
            source,
        }
    };
    // One direct connection first: a pool retries until its timeout and then reports only
    // "timed out", hiding the refused connection or bad password the user needs to see.
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
        .await
        .map_err(|_| fail(sqlx::Error::PoolTimedOut))?
        .map_err(fail)?;
    let _ = probe.close().await;
    // Lazy: the pool connects when first used, so a command that needs one connection opens
    // one more, not two (a TLS handshake each).
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(opts))
}

/// Whether apitree may shape this database: one that is empty (no tables in `public`) or
/// holds apitree's migration history (its first migration recorded in `_sqlx_migrations`).
/// Anything else is another application's database, refused unless `adopt` says otherwise.
pub async fn ensure_apitree(pool: &PgPool, target: &str, adopt: bool) -> Result<(), DbError> {
    if adopt {
        return Ok(());
    }
    let first = MIGRATOR.iter().next().map_or(0, |m| m.version);
    let (tables, ours): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations'),
                to_regclass('public._sqlx_migrations') IS NOT NULL
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                            WHERE a.attrelid = to_regclass('public._sqlx_migrations') AND a.attname = 'version')",
    )
    .fetch_one(pool)
    .await
    .map_err(|source| DbError::Query {
        operation: "look for apitree's migration history",
        source,
    })?;
    let ours = ours
        && sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = $1)",
        )
        .bind(first)
        .fetch_one(pool)
        .await
        .map_err(|source| DbError::Query {
            operation: "read the migration history",
            source,
        })?;
    if tables > 0 && !ours {
        return Err(DbError::NotApitree {
            target: target.to_string(),
            tables,
        });
    }
    Ok(())
}

/// Refuses a database that lacks a migration this release ships (a process that keeps its
/// state there must not meet missing tables mid-incident).
pub async fn require_latest(pool: &PgPool, url: &str) -> Result<(), DbError> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let has_history: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await
            .map_err(DbError::query("look for the migration history"))?;
    let applied: i64 = if has_history {
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .map_err(DbError::query("read the migration history"))?
    } else {
        0
    };
    if applied < latest {
        return Err(DbError::Behind {
            target: describe_target(&parse_url(url)?),
            applied,
            latest,
        });
    }
    Ok(())
}

/// Applies every pending migration; already applied ones are skipped, so this is idempotent.
/// Refuses another application's database ([`ensure_apitree`]).
pub async fn migrate(pool: &PgPool, target: &str) -> Result<(), DbError> {
    migrate_with(pool, target, false).await
}

/// [`migrate`], taking over a database without apitree's history when `adopt` is set.
pub async fn migrate_with(pool: &PgPool, target: &str, adopt: bool) -> Result<(), DbError> {
    ensure_apitree(pool, &format!("the database at {target}"), adopt).await?;
    MIGRATOR
        .run(pool)
        .await
        .map_err(|source| DbError::Migrate {
            target: target.to_string(),
            source,
        })?;
    record_fingerprints(pool).await
}

/// SHA-384 of a migration with every run of whitespace made one space: equal for two texts
/// that differ only in whitespace.
pub fn migration_fingerprint(sql: &str) -> Vec<u8> {
    let words: Vec<&str> = sql.split_whitespace().collect();
    Sha384::digest(words.join(" ").as_bytes()).to_vec()
}

/// Records the fingerprint of every applied migration (drift's history check compares them) that has none yet and whose checksum
/// shows it was applied from the text this release ships.
async fn record_fingerprints(pool: &sqlx::PgPool) -> Result<(), DbError> {
    for m in MIGRATOR.iter() {
        sqlx::query(
            "INSERT INTO apitree_migration_fingerprints (version, fingerprint)
             SELECT version, $3 FROM _sqlx_migrations
             WHERE version = $1 AND checksum = $2 AND success
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(m.version)
        .bind(m.checksum.as_ref())
        .bind(migration_fingerprint(m.sql.as_str()))
        .execute(pool)
        .await
        .map_err(DbError::query("record migration fingerprints"))?;
    }
    Ok(())
}

fn classify_connect_error(err: &sqlx::Error) -> (String, &'static str) {
    use std::io::ErrorKind;
    match err {
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => (
                "connection refused".into(),
                "check that PostgreSQL is running and listening on that host and port",
            ),
            ErrorKind::NotFound | ErrorKind::AddrNotAvailable => {
                (io.to_string(), "check the host name in the URL")
            }
            _ if io.to_string().contains("certificate") => (
                io.to_string(),
                "the server's TLS certificate did not verify: check sslrootcert in the URL (the CA that signed it) and, with sslmode=verify-full, that the URL's host is a name the certificate carries",
            ),
            _ => (
                io.to_string(),
                "check the host, port and network path to the server",
            ),
        },
        sqlx::Error::PoolTimedOut => (
            format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            "check the host, port and any firewall between here and the server",
        ),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => (
                db.message().to_string(),
                "check the user name and password in the URL",
            ),
            Some("3D000") => (
                db.message().to_string(),
                "create the database or fix its name in the URL",
            ),
            _ => (db.message().to_string(), "check the server log for details"),
        },
        sqlx::Error::Tls(e) => (
            e.to_string(),
            "check sslmode in the URL and the server's TLS settings",
        ),
        other => (
            other.to_string(),
            "check the URL and that the server is reachable",
        ),
    }
}

/// Replaces the URL's password, wherever it appears in `text`, with `****`.
fn redact(text: &str, url: &str) -> String {
    let Some(rest) = url.split_once("://").map(|(_, r)| r) else {
        return text.to_string();
    };
    let userinfo = match rest.rsplit_once('@') {
        Some((userinfo, _)) => userinfo,
        None => return text.to_string(),
    };
    match userinfo.split_once(':') {
        Some((_, password)) if !password.is_empty() => text.replace(password, "****"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_scheme_is_refused_with_the_expected_form() {
        let err = parse_url("mysql://root@localhost/test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres://"), "{err}");
    }

    #[test]
    fn passwords_never_reach_messages() {
        let url = "postgres://app:s3cr3t-pw@db.example:5432/gw";
        let text = "error near postgres://app:s3cr3t-pw@db.example";
        assert!(!redact(text, url).contains("s3cr3t-pw"));
        let opts = parse_url(url).unwrap();
        assert_eq!(describe_target(&opts), "db.example:5432/gw");
    }
}
