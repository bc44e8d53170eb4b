//! The difference between the expected and the live schema, classified and in apply order.

use std::collections::BTreeMap;

use super::schema::{Column, DriftItem, Kind, Risk, Schema};
use super::sql::{column_sql, create_policy, create_table, ident, literal};

/// `ALTER TYPE … ADD VALUE` statements that turn `actual` into `expected`, when `actual`'s
/// labels are all in `expected`, in the same order (labels can be added, never dropped).
pub(super) fn enum_additions(
    name: &str,
    expected: &[String],
    actual: &[String],
) -> Option<Vec<String>> {
    let mut rest = expected.iter();
    if !actual.iter().all(|a| rest.any(|e| e == a)) {
        return None;
    }
    let mut out = Vec::new();
    for (i, label) in expected.iter().enumerate() {
        if actual.contains(label) {
            continue;
        }
        let place = match (i.checked_sub(1).map(|p| &expected[p]), actual.first()) {
            (Some(prev), _) => format!(" AFTER {}", literal(prev)),
            (None, Some(first)) => format!(" BEFORE {}", literal(first)),
            (None, None) => String::new(),
        };
        out.push(format!(
            "ALTER TYPE {} ADD VALUE {}{place}",
            ident(name),
            literal(label)
        ));
    }
    Some(out)
}

/// Objects of one kind (`what`) only the database has: reported, never dropped. Listed first
/// in apply order, like the missing ones of tables, enum types and sequences.
pub(super) fn push_extras<V>(
    push: &mut impl FnMut(Kind, Risk, String, String, Option<String>, u8),
    what: &str,
    expected: &BTreeMap<String, V>,
    actual: &BTreeMap<String, V>,
) {
    for name in actual.keys().filter(|n| !expected.contains_key(*n)) {
        push(
            Kind::Extra,
            Risk::Destructive,
            format!("{what} {name}"),
            "not created by the migrations; reported, never dropped".into(),
            None,
            0,
        );
    }
}

/// Enum types and sequences, first in apply order (tables use them): `enum type` and
/// `sequence` sort before `table`.
pub(super) fn diff_types_and_sequences(
    expected: &Schema,
    actual: &Schema,
    push: &mut impl FnMut(Kind, Risk, String, String, Option<String>, u8),
) {
    for (name, e) in &expected.enums {
        let object = format!("enum type {name}");
        match actual.enums.get(name) {
            None => push(
                Kind::Missing,
                Risk::Additive,
                object,
                "the type does not exist".into(),
                Some(format!(
                    "CREATE TYPE {} AS ENUM ({})",
                    ident(name),
                    e.labels
                        .iter()
                        .map(|l| literal(l))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                0,
            ),
            Some(a) if a.labels != e.labels => {
                let detail = format!("labels are {:?} but should be {:?}", a.labels, e.labels);
                match enum_additions(name, &e.labels, &a.labels) {
                    Some(adds) => push(
                        Kind::Changed,
                        Risk::Additive,
                        object,
                        detail,
                        Some(adds.join("; ")),
                        0,
                    ),
                    // A label was renamed, dropped or moved: rows may use it; a person decides.
                    None => push(
                        Kind::Changed,
                        Risk::Destructive,
                        object,
                        format!("{detail}; labels cannot be dropped, fix by hand"),
                        None,
                        0,
                    ),
                }
            }
            _ => {}
        }
    }
    push_extras(push, "enum type", &expected.enums, &actual.enums);
    for (name, q) in &expected.sequences {
        let object = format!("sequence {name}");
        let owner = q.owned_by.as_ref().and_then(|o| o.split_once('.'));
        match actual.sequences.get(name) {
            None => {
                let mut sql = format!(
                    "CREATE SEQUENCE {} AS {} INCREMENT BY {}",
                    ident(name),
                    q.data_type,
                    q.increment
                );
                // Continue after the highest value in use, or inserts would collide with rows.
                if let Some((table, column)) = owner.filter(|(t, _)| actual.tables.contains_key(*t))
                {
                    sql.push_str(&format!(
                        "; ALTER SEQUENCE {s} OWNED BY {t}.{c}; SELECT setval({l}, COALESCE((SELECT max({c}) FROM {t}), 0) + 1, false)",
                        s = ident(name),
                        t = ident(table),
                        c = ident(column),
                        l = literal(&ident(name)),
                    ));
                }
                push(
                    Kind::Missing,
                    Risk::Additive,
                    object,
                    "the sequence does not exist; inserts relying on it fail".into(),
                    Some(sql),
                    0,
                );
            }
            Some(a) if a != q => push(
                Kind::Changed,
                Risk::Destructive,
                object,
                format!(
                    "is {} by {} owned by {} but should be {} by {} owned by {}",
                    a.data_type,
                    a.increment,
                    a.owned_by.as_deref().unwrap_or("nothing"),
                    q.data_type,
                    q.increment,
                    q.owned_by.as_deref().unwrap_or("nothing")
                ),
                Some(format!(
                    "ALTER SEQUENCE {} AS {} INCREMENT BY {} OWNED BY {}",
                    ident(name),
                    q.data_type,
                    q.increment,
                    owner
                        .map(|(t, c)| format!("{}.{}", ident(t), ident(c)))
                        .unwrap_or_else(|| "NONE".into())
                )),
                0,
            ),
            _ => {}
        }
    }
    push_extras(push, "sequence", &expected.sequences, &actual.sequences);
}

/// The audit log's own objects: losing any of them weakens the audit trail.
pub(super) fn audit_related(table: &str, name: &str) -> bool {
    table == "audit_log" || name.starts_with("audit_log")
}

/// Risks of a missing and of a changed object: security when it guards the audit trail.
pub(super) fn risks(security: bool) -> (Risk, Risk) {
    if security {
        (Risk::Security, Risk::Security)
    } else {
        (Risk::Additive, Risk::Destructive)
    }
}

pub(super) fn constraint_order(kind: &str) -> u8 {
    match kind {
        "p" => 2,
        "u" => 3,
        "f" => 5,
        _ => 4,
    }
}

/// Everything that differs between `expected` and `actual`, in apply order.
pub fn diff(expected: &Schema, actual: &Schema) -> Vec<DriftItem> {
    let mut out = Vec::new();
    let mut push = |kind, risk, object: String, detail: String, fix_sql: Option<String>, order| {
        out.push(DriftItem {
            kind,
            risk,
            object,
            detail,
            fix_sql,
            order,
        })
    };
    diff_types_and_sequences(expected, actual, &mut push);
    // Tables and their RLS flags.
    for (name, t) in &expected.tables {
        match actual.tables.get(name) {
            None => {
                let mut cols: Vec<&Column> = expected
                    .columns
                    .values()
                    .filter(|c| &c.table == name)
                    .collect();
                cols.sort_by_key(|c| c.position);
                push(
                    Kind::Missing,
                    Risk::Additive,
                    format!("table {name}"),
                    "the table does not exist".into(),
                    Some(create_table(name, &cols)),
                    0,
                );
                if t.rls_enabled {
                    push(
                        Kind::Missing,
                        Risk::Security,
                        format!("row-level security on {name}"),
                        "the recreated table needs row-level security".into(),
                        Some(format!(
                            "ALTER TABLE {} ENABLE ROW LEVEL SECURITY",
                            ident(name)
                        )),
                        8,
                    );
                }
            }
            Some(a) => {
                if a.rls_enabled != t.rls_enabled {
                    let (risk, verb) = if t.rls_enabled {
                        (Risk::Security, "ENABLE")
                    } else {
                        (Risk::Destructive, "DISABLE")
                    };
                    push(
                        Kind::Changed,
                        risk,
                        format!("row-level security on {name}"),
                        format!(
                            "row-level security is {} but should be {}",
                            if a.rls_enabled { "enabled" } else { "disabled" },
                            if t.rls_enabled { "enabled" } else { "disabled" }
                        ),
                        Some(format!(
                            "ALTER TABLE {} {verb} ROW LEVEL SECURITY",
                            ident(name)
                        )),
                        8,
                    );
                }
                if a.rls_forced != t.rls_forced {
                    push(
                        Kind::Changed,
                        if t.rls_forced {
                            Risk::Security
                        } else {
                            Risk::Destructive
                        },
                        format!("forced row-level security on {name}"),
                        format!(
                            "FORCE ROW LEVEL SECURITY is {} but should be {}",
                            a.rls_forced, t.rls_forced
                        ),
                        Some(format!(
                            "ALTER TABLE {} {} ROW LEVEL SECURITY",
                            ident(name),
                            if t.rls_forced { "FORCE" } else { "NO FORCE" }
                        )),
                        8,
                    );
                }
            }
        }
    }
    push_extras(&mut push, "table", &expected.tables, &actual.tables);
    // Columns of tables both have (a missing table brings its columns).
    for (key, c) in &expected.columns {
        if !actual.tables.contains_key(&c.table) {
            continue;
        }
        match actual.columns.get(key) {
            None => push(
                Kind::Missing,
                Risk::Additive,
                format!("column {key}"),
                format!("the column ({}) does not exist", c.data_type),
                Some(format!(
                    "ALTER TABLE {} ADD COLUMN {}",
                    ident(&c.table),
                    column_sql(c)
                )),
                1,
            ),
            Some(a) => {
                let t = ident(&c.table);
                let col = ident(&c.name);
                if a.data_type != c.data_type {
                    push(
                        Kind::Changed,
                        Risk::Destructive,
                        format!("column {key}"),
                        format!("type is {} but should be {}", a.data_type, c.data_type),
                        Some(format!(
                            "ALTER TABLE {t} ALTER COLUMN {col} TYPE {ty} USING {col}::{ty}",
                            ty = c.data_type
                        )),
                        1,
                    );
                }
                if a.not_null != c.not_null {
                    push(
                        Kind::Changed,
                        Risk::Destructive,
                        format!("column {key}"),
                        format!("NOT NULL is {} but should be {}", a.not_null, c.not_null),
                        Some(format!(
                            "ALTER TABLE {t} ALTER COLUMN {col} {} NOT NULL",
                            if c.not_null { "SET" } else { "DROP" }
                        )),
                        1,
                    );
                }
                if a.default != c.default {
                    // Restoring a lost default loses nothing; replacing one might matter.
                    let risk = if a.default.is_none() {
                        Risk::Additive
                    } else {
                        Risk::Destructive
                    };
                    push(
                        Kind::Changed,
                        risk,
                        format!("column {key}"),
                        format!(
                            "default is {} but should be {}",
                            a.default.as_deref().unwrap_or("none"),
                            c.default.as_deref().unwrap_or("none")
                        ),
                        Some(match &c.default {
                            Some(d) => {
                                format!("ALTER TABLE {t} ALTER COLUMN {col} SET DEFAULT {d}")
                            }
                            None => format!("ALTER TABLE {t} ALTER COLUMN {col} DROP DEFAULT"),
                        }),
                        1,
                    );
                }
            }
        }
    }
    for (key, c) in &actual.columns {
        if expected.tables.contains_key(&c.table) && !expected.columns.contains_key(key) {
            push(
                Kind::Extra,
                Risk::Destructive,
                format!("column {key}"),
                format!(
                    "a {} column the migrations do not create; reported, never dropped",
                    c.data_type
                ),
                None,
                1,
            );
        }
    }
    // Constraints.
    for (key, k) in &expected.constraints {
        let add = format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            ident(&k.table),
            ident(&k.name),
            k.definition
        );
        match actual.constraints.get(key) {
            None => push(
                Kind::Missing,
                Risk::Additive,
                format!("constraint {key}"),
                format!("missing: {}", k.definition),
                Some(add),
                constraint_order(&k.kind),
            ),
            Some(a) if a.definition != k.definition => push(
                Kind::Changed,
                Risk::Destructive,
                format!("constraint {key}"),
                format!("is {} but should be {}", a.definition, k.definition),
                Some(format!(
                    "ALTER TABLE {} DROP CONSTRAINT {}; {add}",
                    ident(&k.table),
                    ident(&k.name)
                )),
                constraint_order(&k.kind),
            ),
            _ => {}
        }
    }
    for (key, k) in &actual.constraints {
        if !expected.constraints.contains_key(key) && expected.tables.contains_key(&k.table) {
            push(
                Kind::Extra,
                Risk::Destructive,
                format!("constraint {key}"),
                format!("{}; reported, never dropped", k.definition),
                None,
                4,
            );
        }
    }
    // Indexes.
    for (name, i) in &expected.indexes {
        match actual.indexes.get(name) {
            None => push(
                Kind::Missing,
                Risk::Additive,
                format!("index {name}"),
                format!("missing on {}", i.table),
                Some(i.definition.clone()),
                6,
            ),
            Some(a) if a.definition != i.definition => push(
                Kind::Changed,
                Risk::Destructive,
                format!("index {name}"),
                format!("is `{}` but should be `{}`", a.definition, i.definition),
                Some(format!("DROP INDEX {}; {}", ident(name), i.definition)),
                6,
            ),
            _ => {}
        }
    }
    for (name, i) in &actual.indexes {
        if !expected.indexes.contains_key(name) && expected.tables.contains_key(&i.table) {
            push(
                Kind::Extra,
                Risk::Destructive,
                format!("index {name}"),
                format!("on {}; reported, never dropped", i.table),
                None,
                6,
            );
        }
    }
    // Functions, then the triggers that call them.
    for (name, f) in &expected.functions {
        let (missing, changed) = risks(audit_related("", name));
        match actual.functions.get(name) {
            None => push(
                Kind::Missing,
                missing,
                format!("function {name}"),
                "the function does not exist".into(),
                Some(f.definition.clone()),
                7,
            ),
            Some(a) if a.definition != f.definition => push(
                Kind::Changed,
                changed,
                format!("function {name}"),
                "its body differs from the migrations'".into(),
                Some(f.definition.clone()),
                7,
            ),
            _ => {}
        }
    }
    for (key, t) in &expected.triggers {
        let (missing, changed) = risks(audit_related(&t.table, &t.name));
        match actual.triggers.get(key) {
            None => push(
                Kind::Missing,
                missing,
                format!("trigger {key}"),
                "the trigger does not exist".into(),
                Some(t.definition.clone()),
                8,
            ),
            Some(a) if a.definition != t.definition => push(
                Kind::Changed,
                changed,
                format!("trigger {key}"),
                format!("is `{}` but should be `{}`", a.definition, t.definition),
                Some(format!(
                    "DROP TRIGGER {} ON {}; {}",
                    ident(&t.name),
                    ident(&t.table),
                    t.definition
                )),
                8,
            ),
            Some(a) if a.enabled != t.enabled => push(
                Kind::Changed,
                changed,
                format!("trigger {key}"),
                format!(
                    "the trigger is {}",
                    if a.enabled { "enabled" } else { "disabled" }
                ),
                Some(format!(
                    "ALTER TABLE {} {} TRIGGER {}",
                    ident(&t.table),
                    if t.enabled { "ENABLE" } else { "DISABLE" },
                    ident(&t.name)
                )),
                8,
            ),
            _ => {}
        }
    }
    // Policies.
    for (key, p) in &expected.policies {
        match actual.policies.get(key) {
            None => push(
                Kind::Missing,
                Risk::Security,
                format!("policy {key}"),
                "the row-level security policy does not exist".into(),
                Some(create_policy(p)),
                9,
            ),
            Some(a) if a != p => push(
                Kind::Changed,
                Risk::Security,
                format!("policy {key}"),
                format!(
                    "USING ({}) should be ({})",
                    a.using.as_deref().unwrap_or(""),
                    p.using.as_deref().unwrap_or("")
                ),
                Some(format!(
                    "DROP POLICY {} ON {}; {}",
                    ident(&p.name),
                    ident(&p.table),
                    create_policy(p)
                )),
                9,
            ),
            _ => {}
        }
    }
    for (key, p) in &actual.policies {
        // An extra table is reported once, not once more per policy on it.
        if !expected.policies.contains_key(key) && expected.tables.contains_key(&p.table) {
            push(
                Kind::Extra,
                Risk::Security,
                format!("policy {key}"),
                format!(
                    "a policy the migrations do not create (USING {}); reported, never dropped",
                    p.using.as_deref().unwrap_or("-")
                ),
                None,
                9,
            );
        }
    }
    for (key, t) in &actual.triggers {
        if !expected.triggers.contains_key(key) && expected.tables.contains_key(&t.table) {
            push(
                Kind::Extra,
                Risk::Destructive,
                format!("trigger {key}"),
                "reported, never dropped".into(),
                None,
                8,
            );
        }
    }
    out.sort_by(|a, b| (a.order, &a.object).cmp(&(b.order, &b.object)));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn enum_labels_can_be_added_in_place_but_never_dropped() {
        let labels = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let expected = labels(&["warning", "high", "critical"]);
        assert_eq!(
            enum_additions("sev", &expected, &labels(&["warning", "critical"])).unwrap(),
            ["ALTER TYPE \"sev\" ADD VALUE 'high' AFTER 'warning'"]
        );
        assert_eq!(
            enum_additions("sev", &expected, &labels(&["high"])).unwrap(),
            [
                "ALTER TYPE \"sev\" ADD VALUE 'warning' BEFORE 'high'",
                "ALTER TYPE \"sev\" ADD VALUE 'critical' AFTER 'high'"
            ]
        );
        // Renamed, extra or reordered labels cannot be fixed by adding.
        assert!(enum_additions("sev", &expected, &labels(&["warning", "major"])).is_none());
        assert!(enum_additions("sev", &expected, &labels(&["critical", "warning"])).is_none());
    }

    use super::*;
    use crate::drift::{expected, Policy, Table};

    fn schema() -> Schema {
        let mut s = Schema::default();
        s.tables.insert(
            "orgs".into(),
            Table {
                rls_enabled: true,
                rls_forced: false,
            },
        );
        s.columns.insert(
            "orgs.id".into(),
            Column {
                table: "orgs".into(),
                name: "id".into(),
                data_type: "uuid".into(),
                not_null: true,
                default: Some("gen_random_uuid()".into()),
                position: 1,
            },
        );
        s.columns.insert(
            "orgs.name".into(),
            Column {
                table: "orgs".into(),
                name: "name".into(),
                data_type: "text".into(),
                not_null: true,
                default: None,
                position: 2,
            },
        );
        s.policies.insert(
            "orgs.tenant_isolation".into(),
            Policy {
                table: "orgs".into(),
                name: "tenant_isolation".into(),
                permissive: true,
                roles: vec!["public".into()],
                command: "ALL".into(),
                using: Some("(id = apitree_current_org())".into()),
                with_check: None,
            },
        );
        s
    }

    #[test]
    fn the_same_schema_has_no_drift() {
        assert!(diff(&schema(), &schema()).is_empty());
    }

    #[test]
    fn a_missing_table_is_recreated_in_column_order_with_its_rls() {
        let mut live = schema();
        live.tables.clear();
        live.columns.clear();
        live.policies.clear();
        let items = diff(&schema(), &live);
        assert_eq!(
            items[0].fix_sql.as_deref(),
            Some("CREATE TABLE \"orgs\" (\"id\" uuid DEFAULT gen_random_uuid() NOT NULL, \"name\" text NOT NULL)")
        );
        assert!(items
            .iter()
            .any(|i| i.object == "row-level security on orgs" && i.risk == Risk::Security));
        assert_eq!(items.last().unwrap().object, "policy orgs.tenant_isolation");
    }

    #[test]
    fn classification_of_changes() {
        let mut live = schema();
        live.tables.get_mut("orgs").unwrap().rls_enabled = false;
        live.columns.get_mut("orgs.name").unwrap().data_type = "character varying(10)".into();
        live.columns.insert(
            "orgs.note".into(),
            Column {
                table: "orgs".into(),
                name: "note".into(),
                data_type: "text".into(),
                not_null: false,
                default: None,
                position: 3,
            },
        );
        let items = diff(&schema(), &live);
        let find = |o: &str| items.iter().find(|i| i.object == o).unwrap();
        let ty = find("column orgs.name");
        assert_eq!((ty.kind, ty.risk), (Kind::Changed, Risk::Destructive));
        assert!(!ty.safe_to_fix());
        let rls = find("row-level security on orgs");
        assert_eq!((rls.kind, rls.risk), (Kind::Changed, Risk::Security));
        assert!(rls.safe_to_fix());
        let extra = find("column orgs.note");
        assert_eq!(extra.kind, Kind::Extra);
        assert!(extra.fix_sql.is_none());
    }

    #[test]
    fn the_committed_snapshot_parses() {
        let s = expected().unwrap();
        assert!(s.tables.contains_key("audit_log"));
        assert!(s.tables["api_keys"].rls_enabled);
    }
}
