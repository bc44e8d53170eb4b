//! The CredentialPolicy controller: gathers the tracked credentials (Secrets' metadata by label
//! selector; API keys and upstream credentials in the database of the referenced ApiGateway),
//! evaluates them (`super::rotation`), writes counts and the next due items to status, and
//! publishes a reminder Event each time a credential crosses a reminder offset or its maximum
//! age. It looks again every hour.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use super::apply;
use crate::crd::condition::{set_condition, ConditionStatus};
use crate::crd::credential_policy::{
    CredentialPolicy, CredentialPolicyStatus, ReencryptionProgress, ROTATED_KEYS_SECRET,
};
use crate::crd::gateway::{ApiGateway, DetectionSpec, SecretKeyRef};
use crate::detect::engine::{Detector, IncidentStore, NoticeContext, CREDENTIALS_OVERDUE};
use crate::detect::{ScoreConfig, Severity};
use crate::entities::vault::MasterKeys;
use crate::notify::slack::{Interaction, RotateTarget};
use crate::notify::{Note, Notifier, RotateButton};
use crate::operator::credentials::rotation::{self, Credential, ROTATED_AT_ANNOTATION};
use crate::operator::metrics::OperatorMetrics;

/// Why a pass, a read of what a policy names, or a "Rotate now" press failed. Each variant
/// names the operation; `category` is the metric label and the Event reason.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot list the Secrets CredentialPolicy {name} selects: {source}")]
    ListSecrets {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the status of CredentialPolicy {name}: {source}")]
    PatchStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("CredentialPolicy {policy} no longer exists")]
    PolicyGone { policy: String },
    #[error("Secret {name} does not exist")]
    SecretMissing { name: String },
    #[error("ApiGateway {gateway} does not exist in {ns}")]
    GatewayMissing { gateway: String, ns: String },
    #[error("Secret {name} has no key {key:?}")]
    SecretKeyMissing { name: String, key: String },
    #[error("ApiGateway {gateway} has no spec.database")]
    NoDatabase { gateway: String },
    #[error("the master key in Secret {secret}: {source}")]
    MasterKey {
        secret: String,
        #[source]
        source: crate::entities::vault::VaultError,
    },
    #[error("the pepper in Secret {secret}: {source}")]
    Pepper {
        secret: String,
        #[source]
        source: crate::entities::keys::WeakPepper,
    },
    #[error("ApiGateway {gateway} has no spec.secrets.keyPepper to hash a new key with")]
    NoPepper { gateway: String },
    #[error("CredentialPolicy {policy} does not allow rotation from Slack (spec.notify.allowRotateFromSlack is false); rotate with `apitree keys rotate {key_id}`")]
    RotationNotAllowed { policy: String, key_id: uuid::Uuid },
    #[error("CredentialPolicy {policy} tracks no API keys")]
    NoApiKeys { policy: String },
    #[error("Secret {ns}/{ROTATED_KEYS_SECRET}, where the new key goes, does not exist; create it (`kubectl -n {ns} create secret generic {ROTATED_KEYS_SECRET}`) and press again")]
    NoRotatedKeysSecret { ns: String },
    #[error("{0}")]
    Database(#[from] crate::db::DbError),
    #[error("cannot start a database transaction: {0}")]
    Begin(#[source] sqlx::Error),
    #[error("{0}")]
    Reencrypt(#[from] crate::db::credentials::ReencryptError),
    #[error("the key was already rotated or revoked (or is not in this gateway's database); nothing changed")]
    AlreadyRotated,
    #[error("cannot write the new key into Secret {ns}/{ROTATED_KEYS_SECRET} ({reason}); the rotation was rolled back and the old key is unchanged")]
    StoreKey { ns: String, reason: String },
    #[error("the new key is in Secret {ns}/{ROTATED_KEYS_SECRET} as {prefix}, but recording the rotation failed ({source}), so that key does not work; the old key is unchanged")]
    RecordRotation {
        ns: String,
        prefix: String,
        #[source]
        source: sqlx::Error,
    },
}

impl CredentialsError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::ListSecrets { .. } => "ListSecrets",
            Self::PatchStatus { .. } => "PatchStatus",
            Self::Read { .. } => "Read",
            Self::PolicyGone { .. } => "PolicyGone",
            Self::SecretMissing { .. } => "SecretMissing",
            Self::GatewayMissing { .. } => "GatewayMissing",
            Self::SecretKeyMissing { .. } => "SecretKeyMissing",
            Self::NoDatabase { .. } => "NoDatabase",
            Self::MasterKey { .. } => "MasterKey",
            Self::Pepper { .. } => "Pepper",
            Self::NoPepper { .. } => "NoPepper",
            Self::RotationNotAllowed { .. } => "RotationNotAllowed",
            Self::NoApiKeys { .. } => "NoApiKeys",
            Self::NoRotatedKeysSecret { .. } => "NoRotatedKeysSecret",
            Self::Database(_) => "Database",
            Self::Begin(_) => "Database",
            Self::Reencrypt(_) => "Reencrypt",
            Self::AlreadyRotated => "AlreadyRotated",
            Self::StoreKey { .. } => "StoreKey",
            Self::RecordRotation { .. } => "RecordRotation",
        }
    }
}

/// What the controller keeps between passes.
pub struct Rotations {
    pub client: Client,
    pub metrics: Arc<OperatorMetrics>,
    /// Where reminders go besides Events (Slack when configured).
    pub notifier: Arc<Notifier>,
    pub reporter: Reporter,
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// Reminders sent, per policy.
    sent: Mutex<HashMap<String, HashSet<String>>>,
    /// (due, overdue, in grace) per policy, summed into `apitree_operator_credentials`.
    counts: Mutex<HashMap<String, [u32; 3]>>,
    /// Per policy: the `credentials overdue` warning incident, open while any is overdue.
    incidents: tokio::sync::Mutex<HashMap<String, Detector>>,
    store: Arc<IncidentStore>,
}

impl Rotations {
    pub fn new(
        client: Client,
        metrics: Arc<OperatorMetrics>,
        notifier: Arc<Notifier>,
        clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    ) -> Self {
        Self {
            client,
            metrics,
            notifier,
            reporter: crate::operator::gateway::controller::reporter(),
            clock,
            sent: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            incidents: tokio::sync::Mutex::new(HashMap::new()),
            store: Arc::new(IncidentStore::memory()),
        }
    }

    /// Opens the policy's `credentials overdue` incident (warning) when something is overdue,
    /// resolves it when nothing is; posts only those changes.
    async fn track_overdue(&self, policy: &str, overdue: u32, now: Timestamp) {
        let mut incidents = self.incidents.lock().await;
        let detector = incidents.entry(policy.to_string()).or_insert_with(|| {
            Detector::new(
                &format!("CredentialPolicy {policy}"),
                ScoreConfig::from(&DetectionSpec::default()),
                NoticeContext::default(),
                self.store.clone(),
                self.notifier.clone(),
            )
        });
        if let Err(e) = detector
            .event_signal(
                now.as_second(),
                CREDENTIALS_OVERDUE,
                overdue > 0,
                Severity::Warning,
            )
            .await
        {
            tracing::error!(
                policy,
                "cannot record the overdue-credentials incident: {e}"
            );
        }
    }

    /// Applies a Slack Acknowledge / Silence press if it names a policy's incident.
    pub async fn respond(&self, press: &crate::notify::slack::Interaction) -> bool {
        let Some(response) = press.action.response((self.clock)().as_second()) else {
            return false;
        };
        for detector in self.incidents.lock().await.values_mut() {
            match detector
                .respond(press.incident, &press.user_id, response)
                .await
            {
                Ok(Some(_)) => return true,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(
                        "cannot record a response to incident {}: {e}",
                        press.incident
                    );
                    return true;
                }
            }
        }
        false
    }
}

/// A key rotated by a "Rotate now" press.
struct SlackRotation {
    old_prefix: String,
    new_prefix: String,
    grace_until: chrono::DateTime<chrono::Utc>,
}

impl Rotations {
    /// Acts on a "Rotate now" press: rotates the API key it names if its CredentialPolicy still
    /// allows it, writing the new key into the policy namespace's [`ROTATED_KEYS_SECRET`] Secret
    /// before the rotation commits (so a key nobody can find is never issued); the old key stays
    /// valid for the policy's grace period. The reminder gets a thread reply either way (the
    /// message loses its button once rotated), the policy an Event. Returns false for other
    /// presses.
    pub async fn rotate_from_slack(&self, press: &Interaction) -> bool {
        let Some(target) = &press.rotate else {
            return false;
        };
        let policy = format!("{}/{}", target.namespace, target.policy);
        let outcome = self.rotate_pressed(press, target).await;
        let (text, replace, event) = match &outcome {
            Ok(r) => {
                let text = format!(
                    "API key {} rotated by {} (CredentialPolicy {policy}): the new key {} is in Secret {}/{}; the old key works until {}",
                    r.old_prefix,
                    press.actor(),
                    r.new_prefix,
                    target.namespace,
                    ROTATED_KEYS_SECRET,
                    r.grace_until.to_rfc3339(),
                );
                (
                    format!(":key: {text}"),
                    true,
                    (EventType::Normal, "KeyRotated", text),
                )
            }
            Err(why) => {
                let text = format!(
                    "Rotate now pressed by {} did not rotate: {why}",
                    press.actor()
                );
                (
                    format!(":warning: {text}"),
                    false,
                    (EventType::Warning, "KeyRotationFailed", text),
                )
            }
        };
        match &outcome {
            Ok(_) => tracing::info!(policy = %policy, "{}", event.2),
            Err(_) => tracing::warn!(policy = %policy, "{}", event.2),
        }
        if let Err(e) = self
            .notifier
            .note_reply(press.incident, press.message.as_ref(), &text, replace)
            .await
        {
            tracing::error!(policy = %policy, "cannot queue the Slack reply: {e}");
        }
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("apitree.io/v1alpha1".into()),
            kind: Some("CredentialPolicy".into()),
            namespace: Some(target.namespace.clone()),
            name: Some(target.policy.clone()),
            ..Default::default()
        };
        apply::publish_events(
            &self.client,
            &self.reporter,
            &reference,
            "RotateKey",
            vec![(event.0, event.1.into(), event.2)],
        )
        .await;
        true
    }

    async fn rotate_pressed(
        &self,
        press: &Interaction,
        t: &RotateTarget,
    ) -> Result<SlackRotation, CredentialsError> {
        let (ns, name) = (&t.namespace, &t.policy);
        let policy_name = format!("{ns}/{name}");
        let policy = read(
            &Api::<CredentialPolicy>::namespaced(self.client.clone(), ns),
            name,
            || format!("CredentialPolicy {policy_name}"),
        )
        .await?
        .ok_or_else(|| CredentialsError::PolicyGone {
            policy: policy_name.clone(),
        })?;
        if !policy.spec.notify.allow_rotate_from_slack {
            return Err(CredentialsError::RotationNotAllowed {
                policy: policy_name,
                key_id: t.key_id,
            });
        }
        let db = policy
            .spec
            .database
            .as_ref()
            .filter(|d| d.api_keys)
            .ok_or_else(|| CredentialsError::NoApiKeys {
                policy: policy_name.clone(),
            })?;
        let secrets = Api::<Secret>::namespaced(self.client.clone(), ns);
        let exists = secrets
            .get_metadata_opt(ROTATED_KEYS_SECRET)
            .await
            .map_err(|source| CredentialsError::Read {
                what: format!("Secret {ns}/{ROTATED_KEYS_SECRET}"),
                source,
            })?;
        if exists.is_none() {
            return Err(CredentialsError::NoRotatedKeysSecret { ns: ns.clone() });
        }
        let g = gateway_database(&self.client, ns, &db.gateway_ref).await?;
        let pepper_ref =
            g.secrets
                .map(|s| s.key_pepper)
                .ok_or_else(|| CredentialsError::NoPepper {
                    gateway: db.gateway_ref.clone(),
                })?;
        let pepper = secret_value(&self.client, ns, &pepper_ref).await?;
        let pepper = crate::entities::keys::Pepper::new(pepper.trim().as_bytes().to_vec())
            .map_err(|source| CredentialsError::Pepper {
                secret: pepper_ref.name.clone(),
                source,
            })?;
        let pool = crate::db::connect(&g.url, 1).await?;
        let now = to_chrono((self.clock)());
        let grace = chrono::Duration::from_std(policy.spec.grace_period.as_std())
            .unwrap_or(chrono::Duration::days(1));
        let result = async {
            let mut tx = pool.begin().await.map_err(CredentialsError::Begin)?;
            let r = crate::db::keys::rotate_key_in(
                &mut tx,
                &pepper,
                t.key_id,
                grace,
                now,
                &press.actor(),
            )
            .await?
            .ok_or(CredentialsError::AlreadyRotated)?;
            let new_prefix = r.new.key.prefix().to_string();
            let annotation = format!(
                "replaces {} (valid until {}); rotated from Slack by {} at {}",
                r.old_prefix,
                r.grace_until.to_rfc3339(),
                press.actor(),
                now.to_rfc3339()
            );
            apply::store_rotated_key(
                &self.client,
                ns,
                &new_prefix,
                r.new.key.expose_secret().as_bytes(),
                annotation,
            )
            .await
            .map_err(|e| CredentialsError::StoreKey {
                ns: ns.clone(),
                reason: kube_reason(&e),
            })?;
            tx.commit()
                .await
                .map_err(|source| CredentialsError::RecordRotation {
                    ns: ns.clone(),
                    prefix: new_prefix.clone(),
                    source,
                })?;
            Ok(SlackRotation {
                old_prefix: r.old_prefix,
                new_prefix,
                grace_until: r.grace_until,
            })
        }
        .await;
        pool.close().await;
        result
    }
}

/// Reads one object (None when it does not exist), naming it in the error.
async fn read<K>(
    api: &Api<K>,
    name: &str,
    what: impl FnOnce() -> String,
) -> Result<Option<K>, CredentialsError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|source| CredentialsError::Read {
            what: what(),
            source,
        })
}

/// A Kubernetes API error as the API server's reason, without the request.
fn kube_reason(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// A label selector in the list-request syntax: `a=b,c in (d,e),!f`.
pub fn selector_string(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

fn to_chrono(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)
        .unwrap_or_default()
}

/// What the controller reads from the ApiGateway a policy's `database.gatewayRef` names.
struct GatewayDatabase {
    url: String,
    /// `spec.secrets`: where the pepper and the master keys are (read when needed).
    secrets: Option<crate::crd::gateway::ProxySecrets>,
    /// `status.masterKeyVersions`: what the proxies taking traffic hold.
    proxies_hold: Vec<u32>,
}

impl GatewayDatabase {
    /// The gateway's master keys, when `spec.secrets.masterKey` is set.
    async fn master_keys(
        &self,
        client: &Client,
        ns: &str,
    ) -> Option<Result<MasterKeys, CredentialsError>> {
        let s = self.secrets.as_ref()?;
        let r = s.master_key.as_ref()?;
        Some(match secret_value(client, ns, r).await {
            Ok(v) => {
                MasterKeys::from_value(&v, s.master_key_version.max(1) as u32).map_err(|source| {
                    CredentialsError::MasterKey {
                        secret: r.name.clone(),
                        source,
                    }
                })
            }
            Err(e) => Err(e),
        })
    }
}

async fn secret_value(
    client: &Client,
    ns: &str,
    r: &SecretKeyRef,
) -> Result<String, CredentialsError> {
    let secret = read(
        &Api::<Secret>::namespaced(client.clone(), ns),
        &r.name,
        || format!("Secret {}", r.name),
    )
    .await?
    .ok_or_else(|| CredentialsError::SecretMissing {
        name: r.name.clone(),
    })?;
    secret
        .data
        .and_then(|d| d.get(&r.key).cloned())
        .and_then(|v| String::from_utf8(v.0).ok())
        .ok_or_else(|| CredentialsError::SecretKeyMissing {
            name: r.name.clone(),
            key: r.key.clone(),
        })
}

/// Reads the database URL, secret references and `status.masterKeyVersions` of the ApiGateway
/// a policy names.
async fn gateway_database(
    client: &Client,
    ns: &str,
    gateway: &str,
) -> Result<GatewayDatabase, CredentialsError> {
    let gw = read(
        &Api::<ApiGateway>::namespaced(client.clone(), ns),
        gateway,
        || format!("ApiGateway {gateway}"),
    )
    .await?
    .ok_or_else(|| CredentialsError::GatewayMissing {
        gateway: gateway.to_string(),
        ns: ns.to_string(),
    })?;
    let db = gw
        .spec
        .database
        .as_ref()
        .ok_or_else(|| CredentialsError::NoDatabase {
            gateway: gateway.to_string(),
        })?;
    let url = secret_value(client, ns, db).await?;
    Ok(GatewayDatabase {
        url,
        secrets: gw.spec.secrets,
        proxies_hold: gw.status.map(|s| s.master_key_versions).unwrap_or_default(),
    })
}

/// How long one pass re-encrypts before writing progress to status.
const REENCRYPT_BUDGET: Duration = Duration::from_secs(10);
const REENCRYPT_BATCH: i64 = 200;

/// Re-encrypts credentials to the keyring's newest version for up to [`REENCRYPT_BUDGET`],
/// once the gateway's proxies hold that version; returns the progress for status.
async fn reencrypt(
    pool: &sqlx::PgPool,
    keys: &MasterKeys,
    proxies_hold: &[u32],
) -> Result<ReencryptionProgress, CredentialsError> {
    let target = keys.current_version();
    let ready = proxies_hold.contains(&target);
    let started = std::time::Instant::now();
    loop {
        // A batch of 0 only counts.
        let batch = if ready { REENCRYPT_BATCH } else { 0 };
        let p =
            crate::db::credentials::reencrypt_batch(pool, keys, batch, "apitree-operator").await?;
        if p.rewrapped == 0 || started.elapsed() >= REENCRYPT_BUDGET {
            return Ok(ReencryptionProgress {
                target_version: target as i32,
                done: p.done,
                total: p.total,
                versions_in_use: p.versions_in_use,
                waiting: (!ready && p.done < p.total).then(|| {
                    format!(
                        "the gateway's proxies do not hold master key v{target} yet (they hold {proxies_hold:?}); \
                         re-encryption starts once a revision with it takes traffic"
                    )
                }),
            });
        }
    }
}

/// One pass over one CredentialPolicy.
pub async fn reconcile(
    policy: Arc<CredentialPolicy>,
    ctx: Arc<Rotations>,
) -> Result<Action, CredentialsError> {
    let ns = policy.namespace().unwrap_or_else(|| "default".into());
    let name = format!("{ns}/{}", policy.name_any());
    let now = (ctx.clock)();
    let generation = policy.metadata.generation;
    let mut status = CredentialPolicyStatus {
        conditions: policy
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        ..CredentialPolicyStatus::default()
    };
    let mut notes: Vec<(EventType, String, String)> = Vec::new();
    let problems: Vec<String> = policy
        .spec
        .problems()
        .into_iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect();
    let action = if !problems.is_empty() {
        let message = format!("the spec cannot be evaluated; fix: {}", problems.join("; "));
        let changed = set_condition(
            &mut status.conditions,
            "SpecValid",
            ConditionStatus::False,
            "InvalidSpec",
            &message,
            generation,
            now,
        );
        if changed {
            notes.push((EventType::Warning, "InvalidSpec".into(), message));
        }
        Action::await_change()
    } else {
        set_condition(
            &mut status.conditions,
            "SpecValid",
            ConditionStatus::True,
            "Valid",
            "the spec is valid",
            generation,
            now,
        );
        let mut creds: Vec<Credential> = Vec::new();
        if let Some(sel) = &policy.spec.secret_selector {
            let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .list_metadata(&ListParams::default().labels(&selector_string(sel)))
                .await
                .map_err(|source| CredentialsError::ListSecrets {
                    name: name.clone(),
                    source,
                })?;
            for s in secrets.items {
                let rotated = s
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ROTATED_AT_ANNOTATION))
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .or_else(|| {
                        s.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| to_chrono(t.0))
                    });
                if let Some(rotated_at) = rotated {
                    creds.push(Credential {
                        kind: "secret",
                        name: s.metadata.name.unwrap_or_default(),
                        rotated_at,
                        grace_until: None,
                        key_id: None,
                    });
                }
            }
        }
        if let Some(db) = &policy.spec.database {
            let gateway = match gateway_database(&ctx.client, &ns, &db.gateway_ref).await {
                // Master keys only matter for the upstream credentials they re-encrypt.
                Ok(g) if db.upstream_credentials => {
                    let keys = g.master_keys(&ctx.client, &ns).await;
                    Ok((g, keys))
                }
                Ok(g) => Ok((g, None)),
                Err(e) => Err(e),
            };
            let found = match gateway {
                Ok((g, keys)) => match crate::db::connect(&g.url, 1).await {
                    Ok(pool) => {
                        let r = rotation::database_credentials(
                            &pool,
                            db.api_keys,
                            db.upstream_credentials,
                        )
                        .await
                        .map_err(CredentialsError::from);
                        match &keys {
                            Some(Ok(keys)) => match reencrypt(&pool, keys, &g.proxies_hold).await {
                                Ok(p) => status.reencryption = Some(p),
                                Err(e) => notes.push((
                                    EventType::Warning,
                                    "ReencryptionFailed".into(),
                                    e.to_string(),
                                )),
                            },
                            Some(Err(e)) => notes.push((
                                EventType::Warning,
                                "MasterKeyUnreadable".into(),
                                e.to_string(),
                            )),
                            None => {}
                        }
                        pool.close().await;
                        r
                    }
                    Err(e) => Err(CredentialsError::from(e)),
                },
                Err(e) => Err(e),
            };
            match found {
                Ok(c) => creds.extend(c),
                Err(e) => notes.push((
                    EventType::Warning,
                    "DatabaseUnavailable".into(),
                    e.to_string(),
                )),
            }
        }
        if let Some(p) = &status.reencryption {
            let previous = policy.status.as_ref().and_then(|s| s.reencryption.as_ref());
            if p.done == p.total && p.total > 0 && previous.is_some_and(|q| q.done < q.total) {
                notes.push((
                    EventType::Normal,
                    "Reencrypted".into(),
                    format!(
                        "every upstream credential is under master key v{}; older versions can leave the keyring",
                        p.target_version
                    ),
                ));
            }
        }
        let (evaluated, reminders) = {
            let mut sent = ctx.sent.lock().unwrap_or_else(|e| e.into_inner());
            let seen = sent.entry(name.clone()).or_default();
            rotation::evaluate(&creds, &policy.spec, to_chrono(now), seen)
        };
        status.tracked = evaluated.tracked;
        status.due = evaluated.due;
        status.overdue = evaluated.overdue;
        status.in_grace = evaluated.in_grace;
        status.next_due = evaluated.next_due;
        status.last_checked = evaluated.last_checked;
        ctx.track_overdue(&name, evaluated.overdue, now).await;
        {
            let mut counts = ctx.counts.lock().unwrap_or_else(|e| e.into_inner());
            counts.insert(
                name.clone(),
                [evaluated.due, evaluated.overdue, evaluated.in_grace],
            );
            for (i, state) in ["due", "overdue", "in_grace"].iter().enumerate() {
                let total: u32 = counts.values().map(|c| c[i]).sum();
                ctx.metrics
                    .credentials
                    .with_label_values(&[state])
                    .set(total as i64);
            }
        }
        for r in reminders {
            let (kind, reason) = if r.overdue {
                (EventType::Warning, "CredentialOverdue")
            } else {
                (EventType::Normal, "CredentialDue")
            };
            tracing::info!(policy = %name, "{}", r.text());
            let rotate = match r.key_id {
                Some(key_id) if policy.spec.notify.allow_rotate_from_slack => Some(RotateButton {
                    key_id,
                    key_prefix: r.name.clone(),
                    policy: name.clone(),
                    grace: policy.spec.grace_period.to_string(),
                }),
                _ => None,
            };
            let note = Note {
                id: uuid::Uuid::new_v4(),
                text: format!("CredentialPolicy {name}: {}", r.text()),
                channel: policy.spec.notify.slack_channel.clone(),
                urgent: r.overdue,
                rotate,
            };
            if let Err(e) = ctx.notifier.note(&note).await {
                tracing::error!(policy = %name, "cannot queue the reminder: {e}");
            }
            notes.push((kind, reason.into(), r.text()));
        }
        match &status.reencryption {
            // Keep going while there is work the proxies are ready for.
            Some(p) if p.done < p.total && p.waiting.is_none() => {
                Action::requeue(Duration::from_secs(5))
            }
            // Waiting for the gateway to switch to a revision with the new key.
            Some(p) if p.done < p.total => Action::requeue(Duration::from_secs(60)),
            _ => Action::requeue(Duration::from_secs(3600)),
        }
    };
    status.observed_generation = generation;
    apply::publish_events(
        &ctx.client,
        &ctx.reporter,
        &policy.object_ref(&()),
        "Evaluate",
        notes,
    )
    .await;
    apply::write_status(&ctx.client, &policy, &status)
        .await
        .map_err(|source| CredentialsError::PatchStatus {
            name: name.clone(),
            source,
        })?;
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    Ok(action)
}

fn error_policy(_p: Arc<CredentialPolicy>, err: &CredentialsError, ctx: Arc<Rotations>) -> Action {
    ctx.metrics
        .errors
        .with_label_values(&[err.category()])
        .inc();
    tracing::warn!("{err}");
    Action::requeue(Duration::from_secs(60))
}

/// Runs the controller until `stop` resolves.
pub async fn run(
    ctx: Arc<Rotations>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let policies: Api<CredentialPolicy> = Api::all(ctx.client.clone());
    Controller::new(policies, watcher::Config::default())
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("credential policy reconcile: {e}");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_render_in_list_syntax() {
        let s: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"team": "payments"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
                {"key": "legacy", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        assert_eq!(
            selector_string(&s),
            "team=payments,tier in (gold,silver),!legacy"
        );
    }
}
