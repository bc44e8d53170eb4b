//! Credential rotation: how old each tracked credential is against a `CredentialPolicy`, what is
//! due, overdue or in grace, and which reminders to send — decided in one pure function with the
//! clock passed in. Gathering the credentials (Secrets' metadata, the gateway database's API keys
//! and upstream credentials) is the I/O at the edges.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use crate::crd::credential_policy::{CredentialPolicySpec, CredentialPolicyStatus, DueItem};
use crate::db::DbError;

/// Annotation that dates a Secret's last rotation (RFC 3339); else its creation time counts.
pub const ROTATED_AT_ANNOTATION: &str = "apitree.io/rotated-at";

/// One tracked credential (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// `secret`, `apiKey` or `upstreamCredential`.
    pub kind: &'static str,
    /// Secret name, key prefix or `org/api/name` of an upstream credential.
    pub name: String,
    /// When it was created or last rotated.
    pub rotated_at: DateTime<Utc>,
    /// For a rotated-out API key: valid until then, revoked by the sweep afterwards.
    pub grace_until: Option<DateTime<Utc>>,
    /// The API key's row id (what a "Rotate now" button names); None for other kinds.
    pub key_id: Option<uuid::Uuid>,
}

/// A reminder to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reminder {
    pub kind: &'static str,
    pub name: String,
    pub due_at: DateTime<Utc>,
    pub overdue: bool,
    /// The reminder offset crossed, e.g. `3d`; `overdue` once past max age.
    pub offset: String,
    /// The API key's row id, for a "Rotate now" button.
    pub key_id: Option<uuid::Uuid>,
}

impl Reminder {
    /// One line for Events, logs and Slack.
    pub fn text(&self) -> String {
        if self.overdue {
            format!(
                "{} {} is OVERDUE for rotation: it reached its maximum age at {}",
                self.kind,
                self.name,
                self.due_at.to_rfc3339()
            )
        } else {
            format!(
                "{} {} is due for rotation by {} (less than {} left)",
                self.kind,
                self.name,
                self.due_at.to_rfc3339(),
                self.offset
            )
        }
    }
}

fn std_to_chrono(d: std::time::Duration) -> Duration {
    Duration::from_std(d).unwrap_or(Duration::MAX)
}

/// Where every credential stands, and the reminders not sent yet. `sent` remembers what was sent
/// (by credential, rotation and offset), so each offset is crossed once per rotation.
pub fn evaluate(
    creds: &[Credential],
    spec: &CredentialPolicySpec,
    now: DateTime<Utc>,
    sent: &mut HashSet<String>,
) -> (CredentialPolicyStatus, Vec<Reminder>) {
    let max_age = std_to_chrono(spec.max_age.as_std());
    let mut offsets: Vec<(Duration, String)> = spec
        .reminders
        .iter()
        .map(|r| (std_to_chrono(r.as_std()), r.to_string()))
        .collect();
    offsets.sort_by_key(|o| o.0);
    let widest = offsets.last().map(|o| o.0).unwrap_or(Duration::zero());
    let mut status = CredentialPolicyStatus {
        tracked: creds.len() as u32,
        last_checked: Some(now.to_rfc3339()),
        ..CredentialPolicyStatus::default()
    };
    let mut items: Vec<(DateTime<Utc>, DueItem)> = Vec::new();
    let mut reminders = Vec::new();
    for c in creds {
        if let Some(grace) = c.grace_until.filter(|g| *g > now) {
            status.in_grace += 1;
            items.push((
                grace,
                DueItem {
                    kind: c.kind.into(),
                    name: c.name.clone(),
                    due_at: grace.to_rfc3339(),
                    state: "inGrace".into(),
                },
            ));
            continue;
        }
        let due_at = c.rotated_at + max_age;
        let left = due_at - now;
        let state = if left <= Duration::zero() {
            status.overdue += 1;
            "overdue"
        } else if left <= widest {
            status.due += 1;
            "due"
        } else {
            continue;
        };
        items.push((
            due_at,
            DueItem {
                kind: c.kind.into(),
                name: c.name.clone(),
                due_at: due_at.to_rfc3339(),
                state: state.into(),
            },
        ));
        // The narrowest offset already crossed: a reminder for each offset, once.
        let offset = if state == "overdue" {
            Some("overdue".to_string())
        } else {
            offsets
                .iter()
                .find(|(o, _)| left <= *o)
                .map(|(_, text)| text.clone())
        };
        if let Some(offset) = offset {
            let key = format!(
                "{}/{}/{}/{offset}",
                c.kind,
                c.name,
                c.rotated_at.timestamp()
            );
            if sent.insert(key) {
                reminders.push(Reminder {
                    kind: c.kind,
                    name: c.name.clone(),
                    due_at,
                    overdue: state == "overdue",
                    offset,
                    key_id: c.key_id,
                });
            }
        }
    }
    items.sort_by_key(|i| i.0);
    status.next_due = items.into_iter().take(20).map(|i| i.1).collect();
    (status, reminders)
}

/// The gateway database's active API keys and upstream credentials.
pub async fn database_credentials(
    pool: &PgPool,
    api_keys: bool,
    upstream: bool,
) -> Result<Vec<Credential>, DbError> {
    let mut out = Vec::new();
    if api_keys {
        // id, prefix, created, grace until
        type KeyRow = (uuid::Uuid, String, DateTime<Utc>, Option<DateTime<Utc>>);
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, prefix, created_at, grace_until FROM api_keys WHERE revoked_at IS NULL",
        )
        .fetch_all(pool)
        .await
        .map_err(DbError::query("read API keys for rotation"))?;
        out.extend(
            rows.into_iter()
                .map(|(id, prefix, created, grace)| Credential {
                    kind: "apiKey",
                    name: prefix,
                    rotated_at: created,
                    grace_until: grace,
                    key_id: Some(id),
                }),
        );
    }
    if upstream {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT o.name || '/' || a.name || '/' || c.name, coalesce(c.rotated_at, c.created_at)
               FROM upstream_credentials c JOIN orgs o ON o.id = c.org_id JOIN apis a ON a.id = c.api_id",
        )
        .fetch_all(pool)
        .await
        .map_err(DbError::query("read upstream credentials for rotation"))?;
        out.extend(rows.into_iter().map(|(name, at)| Credential {
            kind: "upstreamCredential",
            name,
            rotated_at: at,
            grace_until: None,
            key_id: None,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::duration::KubeDuration;

    fn spec() -> CredentialPolicySpec {
        serde_json::from_value(serde_json::json!({"secretSelector": {"matchLabels": {"a": "b"}}}))
            .unwrap()
    }

    fn cred(name: &str, days_old: i64, now: DateTime<Utc>) -> Credential {
        Credential {
            kind: "secret",
            name: name.into(),
            rotated_at: now - Duration::days(days_old),
            grace_until: None,
            key_id: None,
        }
    }

    #[test]
    fn fresh_due_and_overdue_credentials_with_the_defaults() {
        let now = Utc::now();
        let s = spec();
        assert_eq!(s.max_age, KubeDuration::from_secs(90 * 86_400));
        let creds = [
            cred("fresh", 10, now),
            cred("soon", 80, now),
            cred("old", 95, now),
        ];
        let (status, reminders) = evaluate(&creds, &s, now, &mut HashSet::new());
        assert_eq!((status.tracked, status.due, status.overdue), (3, 1, 1));
        assert_eq!(status.next_due[0].name, "old");
        assert_eq!(status.next_due[0].state, "overdue");
        assert_eq!(status.next_due[1].name, "soon");
        assert_eq!(reminders.len(), 2);
        let soon = reminders.iter().find(|r| r.name == "soon").unwrap();
        assert_eq!(soon.offset, "14d");
        assert!(soon.text().contains("less than 14d left"));
        assert!(reminders.iter().any(|r| r.name == "old" && r.overdue));
    }

    #[test]
    fn each_offset_reminds_once_as_the_credential_ages() {
        let t0 = Utc::now();
        let c = [cred("k", 80, t0)];
        let s = spec();
        let mut sent = HashSet::new();
        let first = evaluate(&c, &s, t0, &mut sent).1;
        assert_eq!(first[0].offset, "14d");
        assert!(evaluate(&c, &s, t0 + Duration::hours(1), &mut sent)
            .1
            .is_empty());
        let three = evaluate(&c, &s, t0 + Duration::days(8), &mut sent).1;
        assert_eq!(three[0].offset, "3d");
        let one = evaluate(
            &c,
            &s,
            t0 + Duration::days(9) + Duration::hours(1),
            &mut sent,
        )
        .1;
        assert_eq!(one[0].offset, "1d");
        let overdue = evaluate(&c, &s, t0 + Duration::days(11), &mut sent).1;
        assert!(overdue[0].overdue);
        assert!(evaluate(&c, &s, t0 + Duration::days(12), &mut sent)
            .1
            .is_empty());
    }

    #[test]
    fn a_rotated_out_key_is_in_grace_not_due() {
        let now = Utc::now();
        let mut old = cred("at_live_old", 120, now);
        old.kind = "apiKey";
        old.grace_until = Some(now + Duration::hours(5));
        let (status, reminders) = evaluate(&[old], &spec(), now, &mut HashSet::new());
        assert_eq!((status.in_grace, status.overdue), (1, 0));
        assert_eq!(status.next_due[0].state, "inGrace");
        assert!(reminders.is_empty());
    }
}
