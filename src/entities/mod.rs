//! What the proxy and the gateway database both hold, in one place both can use: orgs, API
//! keys in stored form (`keys`: the key format, the pepper and hashing) and upstream
//! credentials (`vault`: AES-256-GCM sealing bound to org and API). The proxy's configuration
//! file lists these entries; the database stores them and renders them back. This module
//! depends on `crd` only, so `db` and `proxy` never need each other's types.

pub mod keys;
pub mod vault;

use serde::{Deserialize, Serialize};

use crate::crd::gateway::KeyScope;

/// An org.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrgEntry {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// A key in stored form.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyEntry {
    /// Stable id (defaults to the prefix); counts and limits are kept per id.
    #[serde(default)]
    pub id: Option<String>,
    /// Public prefix, e.g. `at_live_Xy3kQ9ab`.
    pub prefix: String,
    /// Hex HMAC-SHA256 of the key under the pepper.
    pub hash: String,
    /// Org id.
    pub org: String,
    pub scope: KeyScope,
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub daily_quota: Option<u64>,
    /// RFC 3339; the key is refused afterwards.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// RFC 3339; set on a rotated key: valid until then.
    #[serde(default)]
    pub grace_until: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

/// An encrypted upstream credential.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialEntry {
    /// Name routes refer to.
    pub name: String,
    /// Org the ciphertext is bound to: the buyer's org for BYOK, the seller's for system keys.
    pub org: String,
    /// Route (API) the ciphertext is bound to.
    pub api: String,
    pub kind: CredentialKind,
    pub key_version: u32,
    pub nonce: String,
    pub ciphertext: String,
    /// Header to set on upstream calls.
    #[serde(default = "default_header")]
    pub header: String,
    /// Text before the secret in the header value, e.g. `Bearer `.
    #[serde(default)]
    pub value_prefix: String,
    /// For BYOK: the upstream URL the secret was written for. It is sent only while the
    /// route's upstream has the same origin (scheme, host, port); when the route moves to
    /// another host the credential is held back (503 for that org) until it is written again.
    /// The database sets it on every BYOK write; unset in a file means any upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_upstream: Option<String>,
}

/// Who owns a credential (also a command-line value: `--kind byok|system`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum CredentialKind {
    /// The buyer's own upstream key, used for that buyer's org only.
    Byok,
    /// The platform's or seller's key, used for every org without a BYOK key.
    System,
}

impl CredentialKind {
    /// The name in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Byok => "byok",
            Self::System => "system",
        }
    }
}

fn default_header() -> String {
    "authorization".into()
}
