//! The SQL a fix runs: quoted identifiers and literals, tables, columns and policies.

use super::schema::{Column, Policy};

/// Quotes an identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal.
pub(super) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub(super) fn create_table(name: &str, columns: &[&Column]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| column_sql(c)).collect();
    format!("CREATE TABLE {} ({})", ident(name), cols.join(", "))
}

pub(super) fn column_sql(c: &Column) -> String {
    let mut s = format!("{} {}", ident(&c.name), c.data_type);
    if let Some(d) = &c.default {
        s.push_str(&format!(" DEFAULT {d}"));
    }
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    s
}

pub(super) fn create_policy(p: &Policy) -> String {
    let mut s = format!(
        "CREATE POLICY {} ON {} AS {} FOR {} TO {}",
        ident(&p.name),
        ident(&p.table),
        if p.permissive {
            "PERMISSIVE"
        } else {
            "RESTRICTIVE"
        },
        p.command,
        p.roles
            .iter()
            .map(|r| if r == "public" { r.clone() } else { ident(r) })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(u) = &p.using {
        s.push_str(&format!(" USING ({u})"));
    }
    if let Some(w) = &p.with_check {
        s.push_str(&format!(" WITH CHECK ({w})"));
    }
    s
}
