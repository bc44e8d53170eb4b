//! Migration-history drift: the applied migrations recorded in `_sqlx_migrations` against the
//! ones this release ships. An applied migration whose file changed since is reported with its
//! version. A change is cosmetic when only whitespace changed: `apitree migrate` records a
//! whitespace-insensitive fingerprint of each migration as applied
//! (`apitree_migration_fingerprints`), so any whitespace edit is recognised, added or removed.
//! For migrations applied without one (by an older release or another tool), the exact checksum
//! is matched against the file with a normalisation undone: CRLF ↔ LF, the final newline,
//! trailing spaces stripped.

use serde::Serialize;
use sha2::{Digest, Sha384};
use sqlx::{PgConnection, Row};

use crate::db::DbError;

/// What is off about one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryState {
    /// Applied, and its file has changed since: the database may not be what the file says.
    Edited,
    /// Applied; the file differs only in line endings or trailing whitespace.
    Cosmetic,
    /// Shipped but not applied: run `apitree migrate`.
    Pending,
    /// Applied but not shipped by this release (a newer release ran here?).
    Unknown,
    /// Recorded as failed.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryItem {
    pub version: i64,
    pub description: String,
    pub state: HistoryState,
}

/// An applied migration as recorded.
pub struct Applied {
    pub version: i64,
    pub description: String,
    pub checksum: Vec<u8>,
    pub success: bool,
    /// [`fingerprint`] of the text as applied, when `apitree migrate` recorded it.
    pub fingerprint: Option<Vec<u8>>,
}

use crate::db::migration_fingerprint as fingerprint;

/// A migration the release ships.
pub struct Shipped<'a> {
    pub version: i64,
    pub description: &'a str,
    pub checksum: &'a [u8],
    pub sql: &'a str,
}

/// The file's text as it might have been when it was applied, had only whitespace changed.
fn cosmetic_variants(sql: &str) -> Vec<String> {
    let lf = sql.replace("\r\n", "\n");
    let stripped: String = lf.lines().map(str::trim_end).collect::<Vec<_>>().join("\n");
    let mut out = vec![lf.replace('\n', "\r\n"), lf.clone(), stripped.clone()];
    for base in [lf.trim_end().to_string(), stripped.clone()] {
        out.push(format!("{base}\n"));
        out.push(base.clone());
        out.push(format!("{}\r\n", base.replace('\n', "\r\n")));
    }
    out
}

/// Compares the recorded history with the shipped migrations. Pure.
pub fn classify(applied: &[Applied], shipped: &[Shipped<'_>]) -> Vec<HistoryItem> {
    let mut out = Vec::new();
    for a in applied {
        let state = match shipped.iter().find(|s| s.version == a.version) {
            _ if !a.success => Some(HistoryState::Failed),
            None => Some(HistoryState::Unknown),
            Some(s) if s.checksum == a.checksum.as_slice() => None,
            Some(s) => {
                let cosmetic = match &a.fingerprint {
                    Some(f) => *f == fingerprint(s.sql),
                    None => cosmetic_variants(s.sql)
                        .iter()
                        .any(|v| Sha384::digest(v.as_bytes()).as_slice() == a.checksum.as_slice()),
                };
                Some(if cosmetic {
                    HistoryState::Cosmetic
                } else {
                    HistoryState::Edited
                })
            }
        };
        if let Some(state) = state {
            out.push(HistoryItem {
                version: a.version,
                description: a.description.clone(),
                state,
            });
        }
    }
    for s in shipped {
        if !applied.iter().any(|a| a.version == s.version) {
            out.push(HistoryItem {
                version: s.version,
                description: s.description.to_string(),
                state: HistoryState::Pending,
            });
        }
    }
    out.sort_by_key(|i| i.version);
    out
}

/// The history of the connected database against this release's migrations.
pub async fn check(conn: &mut PgConnection) -> Result<Vec<HistoryItem>, DbError> {
    let (exists, fingerprints): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL,
                to_regclass('apitree_migration_fingerprints') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(DbError::query("read the migration history"))?;
    let query = if fingerprints {
        "SELECT m.version, m.description, m.checksum, m.success, f.fingerprint
         FROM _sqlx_migrations m LEFT JOIN apitree_migration_fingerprints f USING (version)
         ORDER BY m.version"
    } else {
        "SELECT version, description, checksum, success, NULL::bytea FROM _sqlx_migrations ORDER BY version"
    };
    let applied: Vec<Applied> = if exists {
        sqlx::query(query)
            .fetch_all(&mut *conn)
            .await
            .map_err(DbError::query("read the migration history"))?
            .into_iter()
            .map(|r| Applied {
                version: r.get(0),
                description: r.get(1),
                checksum: r.get(2),
                success: r.get(3),
                fingerprint: r.get(4),
            })
            .collect()
    } else {
        Vec::new()
    };
    let shipped: Vec<Shipped<'_>> = crate::db::MIGRATOR
        .iter()
        .map(|m| Shipped {
            version: m.version,
            description: &m.description,
            checksum: &m.checksum,
            sql: m.sql.as_str(),
        })
        .collect();
    Ok(classify(&applied, &shipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQL: &str = "CREATE TABLE t (id int);  \nCREATE INDEX i ON t (id);\n";

    fn applied(sql: &str) -> Applied {
        Applied {
            version: 1,
            description: "t".into(),
            checksum: Sha384::digest(sql.as_bytes()).to_vec(),
            success: true,
            fingerprint: None,
        }
    }

    fn shipped(sql: &str) -> (Vec<u8>, String) {
        (Sha384::digest(sql.as_bytes()).to_vec(), sql.to_string())
    }

    fn run(applied_sql: &str, file_sql: &str) -> Vec<HistoryItem> {
        let (sum, sql) = shipped(file_sql);
        classify(
            &[applied(applied_sql)],
            &[Shipped {
                version: 1,
                description: "t",
                checksum: &sum,
                sql: &sql,
            }],
        )
    }

    #[test]
    fn an_unchanged_migration_is_in_sync() {
        assert!(run(SQL, SQL).is_empty());
    }

    #[test]
    fn line_endings_and_trailing_spaces_are_cosmetic() {
        let crlf = SQL.replace('\n', "\r\n");
        assert_eq!(run(&crlf, SQL)[0].state, HistoryState::Cosmetic);
        assert_eq!(run(SQL, &crlf)[0].state, HistoryState::Cosmetic);
        // Trailing spaces added to the file since it was applied, or the final newline dropped.
        let stripped = "CREATE TABLE t (id int);\nCREATE INDEX i ON t (id);\n";
        assert_eq!(run(stripped, SQL)[0].state, HistoryState::Cosmetic);
        assert_eq!(run(SQL, SQL.trim_end())[0].state, HistoryState::Cosmetic);
    }

    #[test]
    fn with_a_fingerprint_whitespace_removed_since_is_cosmetic_too() {
        let applied_sql = "CREATE TABLE t (\n    id int\n);\n\n\nCREATE INDEX i ON t (id);\n";
        let file = "CREATE TABLE t ( id int );\nCREATE INDEX i ON t (id);\n";
        let (sum, sql) = shipped(file);
        let classify_with = |fingerprint: Option<Vec<u8>>| {
            classify(
                &[Applied {
                    fingerprint,
                    ..applied(applied_sql)
                }],
                &[Shipped {
                    version: 1,
                    description: "t",
                    checksum: &sum,
                    sql: &sql,
                }],
            )[0]
            .state
        };
        assert_eq!(
            classify_with(Some(fingerprint(applied_sql))),
            HistoryState::Cosmetic
        );
        // Without one, only the normalisations above can be undone.
        assert_eq!(classify_with(None), HistoryState::Edited);
        // A real edit stays an edit.
        let edited = file.replace("int", "bigint");
        assert_ne!(fingerprint(applied_sql), fingerprint(&edited));
    }

    #[test]
    fn a_real_edit_is_reported() {
        let edited = SQL.replace("int", "bigint");
        assert_eq!(run(SQL, &edited)[0].state, HistoryState::Edited);
    }

    #[test]
    fn pending_and_unknown_versions() {
        let (sum, sql) = shipped(SQL);
        let items = classify(
            &[Applied {
                version: 9,
                description: "future".into(),
                checksum: vec![1],
                success: true,
                fingerprint: None,
            }],
            &[Shipped {
                version: 1,
                description: "t",
                checksum: &sum,
                sql: &sql,
            }],
        );
        assert_eq!(items[0].state, HistoryState::Pending);
        assert_eq!(items[1].state, HistoryState::Unknown);
    }
}
