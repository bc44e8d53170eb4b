//! Schema drift of the gateway database: the expected schema (a snapshot of what `migrations/`
//! produces, committed beside this file), the live one (read from pg_catalog by `introspect`),
//! the difference as classified items with the SQL that fixes each (pure: `schema` holds the
//! types, `diff` compares, `sql` writes the statements), and `fix`, which applies the safe ones
//! under an advisory lock with an audit entry per fix.

pub mod fix;
pub mod history;
pub mod introspect;

mod diff;
mod schema;
mod sql;

pub use diff::diff;
pub use schema::{
    Column, Constraint, DriftItem, EnumType, Function, Index, Kind, Policy, Risk, Schema, Sequence,
    Table, Trigger,
};
pub use sql::ident;

/// The schema this release expects (`apitree drift snapshot` writes it).
pub const EXPECTED_JSON: &str = include_str!("expected-schema.json");

/// The command that regenerates [`EXPECTED_JSON`].
pub const SNAPSHOT_COMMAND: &str =
    "cargo run -- drift snapshot --database-url postgres://postgres@127.0.0.1:5432/<empty db> --out src/drift/expected-schema.json";

/// The expected schema.
pub fn expected() -> Result<Schema, serde_json::Error> {
    serde_json::from_str(EXPECTED_JSON)
}
