//! Reads a schema from pg_catalog: tables with their row-level-security flags, columns (type,
//! nullability, default), indexes that do not back a constraint, constraints, policies,
//! triggers, functions, enum types and sequences. sqlx's own `_sqlx_migrations` table is not
//! part of the schema.

use sqlx::{PgConnection, Row};

use super::{
    Column, Constraint, EnumType, Function, Index, Policy, Schema, Sequence, Table, Trigger,
};
use crate::db::DbError;

const SQLX_TABLE: &str = "_sqlx_migrations";

fn failed(operation: &'static str) -> impl Fn(sqlx::Error) -> DbError {
    move |source| DbError::Query { operation, source }
}

/// The schema `schema` (normally `public`) of the connected database.
pub async fn introspect(conn: &mut PgConnection, schema: &str) -> Result<Schema, DbError> {
    let mut out = Schema::default();
    let rows = sqlx::query(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname <> $2",
    )
    .bind(schema)
    .bind(SQLX_TABLE)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read tables"))?;
    for r in rows {
        out.tables.insert(
            r.get(0),
            Table {
                rls_enabled: r.get(1),
                rls_forced: r.get(2),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                pg_get_expr(d.adbin, d.adrelid), a.attnum
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname <> $2
            AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(schema)
    .bind(SQLX_TABLE)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read columns"))?;
    for r in rows {
        let (table, name): (String, String) = (r.get(0), r.get(1));
        out.columns.insert(
            format!("{table}.{name}"),
            Column {
                table,
                name,
                data_type: r.get(2),
                not_null: r.get(3),
                default: r.get(4),
                position: r.get(5),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT ic.relname, t.relname, pg_get_indexdef(i.indexrelid)
           FROM pg_index i
           JOIN pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname = $1 AND t.relname <> $2
            AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
    )
    .bind(schema)
    .bind(SQLX_TABLE)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read indexes"))?;
    for r in rows {
        out.indexes.insert(
            r.get(0),
            Index {
                table: r.get(1),
                definition: r.get(2),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT t.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid)
           FROM pg_constraint k
           JOIN pg_class t ON t.oid = k.conrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname = $1 AND t.relname <> $2",
    )
    .bind(schema)
    .bind(SQLX_TABLE)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read constraints"))?;
    for r in rows {
        let (table, name): (String, String) = (r.get(0), r.get(1));
        out.constraints.insert(
            format!("{table}.{name}"),
            Constraint {
                table,
                name,
                kind: r.get(2),
                definition: r.get(3),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT tablename::text, policyname::text, permissive = 'PERMISSIVE', roles::text[], cmd, qual, with_check
           FROM pg_policies WHERE schemaname = $1",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read policies"))?;
    for r in rows {
        let (table, name): (String, String) = (r.get(0), r.get(1));
        let mut roles: Vec<String> = r.get(3);
        roles.sort();
        out.policies.insert(
            format!("{table}.{name}"),
            Policy {
                table,
                name,
                permissive: r.get(2),
                roles,
                command: r.get(4),
                using: r.get(5),
                with_check: r.get(6),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled <> 'D'
           FROM pg_trigger t
           JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND NOT t.tgisinternal",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read triggers"))?;
    for r in rows {
        let (table, name): (String, String) = (r.get(0), r.get(1));
        out.triggers.insert(
            format!("{table}.{name}"),
            Trigger {
                table,
                name,
                definition: r.get(2),
                enabled: r.get(3),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT p.proname, pg_get_functiondef(p.oid)
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = $1 AND p.prokind = 'f'
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read functions"))?;
    for r in rows {
        out.functions.insert(
            r.get(0),
            Function {
                definition: r.get(1),
            },
        );
    }
    let rows = sqlx::query(
        "SELECT t.typname::text, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
           FROM pg_type t
           JOIN pg_enum e ON e.enumtypid = t.oid
           JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE n.nspname = $1
          GROUP BY t.typname",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read enum types"))?;
    for r in rows {
        out.enums.insert(r.get(0), EnumType { labels: r.get(1) });
    }
    // Identity columns' sequences are part of their column, not listed.
    let rows = sqlx::query(
        "SELECT s.relname::text, format_type(q.seqtypid, NULL), q.seqincrement,
                t.relname::text || '.' || a.attname::text
           FROM pg_sequence q
           JOIN pg_class s ON s.oid = q.seqrelid
           JOIN pg_namespace n ON n.oid = s.relnamespace
           LEFT JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass
                AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a'
           LEFT JOIN pg_class t ON t.oid = d.refobjid
           LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
          WHERE n.nspname = $1
            AND NOT EXISTS (SELECT 1 FROM pg_depend i WHERE i.objid = s.oid AND i.deptype = 'i')",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .map_err(failed("read sequences"))?;
    for r in rows {
        out.sequences.insert(
            r.get(0),
            Sequence {
                data_type: r.get(1),
                increment: r.get(2),
                owned_by: r.get(3),
            },
        );
    }
    Ok(out)
}
