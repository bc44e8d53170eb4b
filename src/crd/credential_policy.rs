//! `CredentialPolicy`: which credentials are tracked, how old they may get, and who is reminded.

// Each `printcolumn(...)` repeats `type_ = ...`; clippy reads them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::KubeDuration;
use super::gateway::SpecProblem;

/// The Secret (in a CredentialPolicy's namespace, created by a person beforehand) that receives
/// keys rotated from Slack: one data entry per new key, named by its prefix.
pub const ROTATED_KEYS_SECRET: &str = "apitree-rotated-keys";

/// Rotation rules for a set of credentials: Kubernetes Secrets, API keys and upstream credentials.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "apitree.io",
    version = "v1alpha1",
    kind = "CredentialPolicy",
    namespaced,
    status = "CredentialPolicyStatus",
    shortname = "credpol",
    category = "apitree",
    doc = "Tracks credential age, reminds owners before the maximum age and rotates API keys with a grace period.",
    printcolumn(
        name = "Tracked",
        type_ = "integer",
        json_path = ".status.tracked",
        description = "Credentials tracked"
    ),
    printcolumn(
        name = "Due",
        type_ = "integer",
        json_path = ".status.due",
        description = "Inside a reminder offset of max age"
    ),
    printcolumn(
        name = "Overdue",
        type_ = "integer",
        json_path = ".status.overdue",
        description = "Older than max age"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.secretSelector) || has(self.database)", "message": "select something to track: set secretSelector, database, or both"}
]))]
pub struct CredentialPolicySpec {
    /// Kubernetes Secrets in this namespace to track. Their age comes from the
    /// `apitree.io/rotated-at` annotation (RFC 3339), else their creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_selector: Option<LabelSelector>,

    /// Credentials stored in an ApiGateway's database (API keys, BYOK and system credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseCredentials>,

    /// Maximum age before a credential is overdue (an overdue credential is a warning incident).
    #[serde(default = "default_max_age")]
    pub max_age: KubeDuration,

    /// Reminders are sent when the time left before max age falls below each offset.
    #[serde(default = "default_reminders")]
    #[schemars(length(max = 10))]
    pub reminders: Vec<KubeDuration>,

    /// After an API key is rotated the old key stays valid this long, then it is revoked.
    #[serde(default = "default_grace_period")]
    pub grace_period: KubeDuration,

    /// Where prompts go.
    #[serde(default)]
    pub notify: RotationNotify,
}

fn default_max_age() -> KubeDuration {
    KubeDuration::from_secs(90 * 86_400)
}
fn default_reminders() -> Vec<KubeDuration> {
    [14, 3, 1]
        .into_iter()
        .map(|d| KubeDuration::from_secs(d * 86_400))
        .collect()
}
fn default_grace_period() -> KubeDuration {
    KubeDuration::from_secs(86_400)
}

/// Database-held credentials to track.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseCredentials {
    /// Name of the ApiGateway (same namespace) whose database holds the credentials.
    #[schemars(length(min = 1, max = 253))]
    pub gateway_ref: String,
    /// Track API keys.
    #[serde(default = "yes")]
    pub api_keys: bool,
    /// Track encrypted upstream credentials (BYOK and system).
    #[serde(default = "yes")]
    pub upstream_credentials: bool,
}

fn yes() -> bool {
    true
}

/// Where rotation prompts go.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotationNotify {
    /// Slack channel id for reminders; the operator's Slack channel when empty (overdue
    /// reminders go to its critical channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack_channel: Option<String>,
    /// Offer a "Rotate now" button (behind a confirmation dialog) on API-key reminders. A press
    /// rotates the key with the gateway's pepper, keeps the old key valid for `gracePeriod`, and
    /// writes the new key into Secret `apitree-rotated-keys` in this namespace (data key = the
    /// new key's prefix; never into Slack). That Secret must exist and the operator needs the
    /// chart's `slack.rotateKeys: true`; otherwise the press is refused with a thread reply.
    #[serde(default)]
    pub allow_rotate_from_slack: bool,
}

/// Observed state of a CredentialPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialPolicyStatus {
    /// Credentials tracked.
    #[serde(default)]
    pub tracked: u32,
    /// Credentials inside a reminder offset of max age.
    #[serde(default)]
    pub due: u32,
    /// Credentials older than max age.
    #[serde(default)]
    pub overdue: u32,
    /// Rotated API keys whose old key is still valid.
    #[serde(default)]
    pub in_grace: u32,
    /// The next items to act on, soonest first (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next_due: Vec<DueItem>,
    /// Progress of a master-key re-encryption, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reencryption: Option<ReencryptionProgress>,
    /// RFC 3339 time of the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<String>,
    /// Conditions: `Ready`, `SpecValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One credential that needs attention.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DueItem {
    /// `secret`, `apiKey` or `upstreamCredential`.
    pub kind: String,
    /// Secret name, key prefix or credential id (never the secret value).
    pub name: String,
    /// RFC 3339 time it reaches max age.
    pub due_at: String,
    /// `due`, `overdue` or `inGrace`.
    pub state: String,
}

/// Master-key re-encryption progress (with `database.gatewayRef`, when the gateway's master
/// key is a keyring of several versions).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReencryptionProgress {
    /// Key version being rolled out (the keyring's highest).
    pub target_version: i32,
    /// Credentials under the target version.
    pub done: u64,
    /// Credentials in all.
    pub total: u64,
    /// Older versions some credential still uses; the others can leave the keyring.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions_in_use: Vec<u32>,
    /// Why re-encryption is not running, e.g. the gateway's proxies do not hold the target
    /// version yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

impl CredentialPolicySpec {
    /// Rules that span fields (mirrored by the CRD's CEL rules where CEL can express them).
    pub fn problems(&self) -> Vec<SpecProblem> {
        let mut out = Vec::new();
        if self.secret_selector.is_none() && self.database.is_none() {
            out.push(SpecProblem {
                path: "spec".into(),
                message: "select something to track: set secretSelector, database, or both".into(),
            });
        }
        let max_age = self.max_age.as_std();
        if self.grace_period.as_std() >= max_age {
            out.push(SpecProblem {
                path: "spec.gracePeriod".into(),
                message: format!(
                    "gracePeriod ({}) must be shorter than maxAge ({})",
                    self.grace_period, self.max_age
                ),
            });
        }
        for (i, r) in self.reminders.iter().enumerate() {
            if r.as_std() >= max_age {
                out.push(SpecProblem {
                    path: format!("spec.reminders[{i}]"),
                    message: format!(
                        "reminder offset {r} must be shorter than maxAge ({})",
                        self.max_age
                    ),
                });
            }
        }
        out
    }
}
