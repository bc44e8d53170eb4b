//! The schema as the drift check sees it, and what a difference is: its kind, its risk and
//! the SQL that fixes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One schema (`public`) as the drift check sees it. Keys are object names; table-scoped objects
/// are keyed `table.name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Schema {
    pub tables: BTreeMap<String, Table>,
    pub columns: BTreeMap<String, Column>,
    pub indexes: BTreeMap<String, Index>,
    pub constraints: BTreeMap<String, Constraint>,
    pub policies: BTreeMap<String, Policy>,
    pub triggers: BTreeMap<String, Trigger>,
    pub functions: BTreeMap<String, Function>,
    #[serde(default)]
    pub enums: BTreeMap<String, EnumType>,
    #[serde(default)]
    pub sequences: BTreeMap<String, Sequence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnumType {
    /// Labels in their sort order.
    pub labels: Vec<String>,
}

/// A sequence that is not an identity column's (those come with their column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    pub data_type: String,
    pub increment: i64,
    /// `table.column` that owns it (a serial column).
    pub owned_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub rls_enabled: bool,
    pub rls_forced: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub table: String,
    pub name: String,
    /// `format_type` of the column, e.g. `character varying(64)`.
    pub data_type: String,
    pub not_null: bool,
    pub default: Option<String>,
    /// Position, to recreate tables in their column order.
    pub position: i16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub table: String,
    /// `pg_get_indexdef`: a complete CREATE INDEX statement.
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub table: String,
    pub name: String,
    /// p, u, f, c, x (primary key, unique, foreign key, check, exclusion).
    pub kind: String,
    /// `pg_get_constraintdef`.
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub table: String,
    pub name: String,
    pub permissive: bool,
    pub roles: Vec<String>,
    pub command: String,
    pub using: Option<String>,
    pub with_check: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub table: String,
    pub name: String,
    /// `pg_get_triggerdef`.
    pub definition: String,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Function {
    /// `pg_get_functiondef`: a complete CREATE OR REPLACE FUNCTION statement.
    pub definition: String,
}

/// How an object differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The migrations create it; the database lacks it.
    Missing,
    /// It exists in the database only.
    Extra,
    /// Both have it, differently.
    Changed,
}

/// What fixing (or ignoring) it risks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Adding it back loses nothing.
    Additive,
    /// Fixing it may lose or rewrite data.
    Destructive,
    /// Tenant isolation or the audit trail is weakened until it is fixed.
    Security,
}

/// One drifted object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftItem {
    pub kind: Kind,
    pub risk: Risk,
    /// e.g. `column api_keys.tier`, `policy orgs.tenant_isolation`.
    pub object: String,
    /// What differs, in words.
    pub detail: String,
    /// SQL that brings the object back to the expected state; None for extra objects, which are
    /// only reported.
    pub fix_sql: Option<String>,
    /// Apply order: tables, columns, constraints, indexes, functions, triggers, RLS, policies.
    #[serde(skip)]
    pub order: u8,
}

impl DriftItem {
    /// Applied by `fix` without `--allow-changed`.
    pub fn safe_to_fix(&self) -> bool {
        self.fix_sql.is_some() && matches!(self.risk, Risk::Additive | Risk::Security)
    }
}
