//! The signed envelope a configuration travels in, from the control plane to an agent and
//! from the agent's disk back into the agent after a restart.
//!
//! The control plane signs the exact bytes of a [`Payload`] with an Ed25519 key; the agent
//! holds the public key (pinned next to the control plane's CA) and checks the signature before
//! it reads a single field. The envelope keeps the payload as those bytes (base64), so what is
//! verified is what was signed — no canonical JSON to agree on — and the cache on disk is the
//! envelope as received, verified again on every start with the same check.
//!
//! A payload names its pool and a generation: an agent refuses a payload for another pool
//! (one bank's configuration replayed to another) and one older than what it already runs (a
//! replayed old configuration).
//!
//! A payload marked `preview` is a candidate the control plane's gate is checking: the agent
//! builds it beside the running one, probes it and reports, but never serves it to its clients
//! nor caches it. The mark is inside the signed bytes, so a candidate cannot be passed off as
//! the configuration to serve ([`PublicKey::open`] refuses it; [`PublicKey::open_preview`]
//! takes nothing else), and an agent that predates previews refuses one as an unknown field.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::bundle::AgentConfig;

/// What the control plane says to the agents of one pool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Payload {
    /// The agent pool this configuration is for.
    pub pool: String,
    /// Grows with every new configuration of the pool; an agent never goes back to a lower one.
    pub generation: u64,
    /// RFC 3339, when the control plane signed it (shown, not trusted for ordering).
    pub issued_at: String,
    /// A candidate for the gate's checks, not the configuration to serve.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
    pub config: AgentConfig,
}

/// A signed [`Payload`], as sent over the wire and kept in the agent's cache.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// The payload's JSON bytes, base64.
    pub payload: String,
    /// Ed25519 signature of those bytes, base64.
    pub signature: String,
    /// Which signing key (the first 16 hex digits of the SHA-256 of its public key).
    pub key_id: String,
}

/// Why an envelope was refused. None of these texts holds configuration content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the configuration envelope is malformed ({0}); it was not applied")]
    Malformed(String),
    #[error("the configuration is signed with key {got}, not the pinned key {pinned}; if the control plane's signing key was replaced, pin the new public key (--config-key)")]
    UnknownKey { pinned: String, got: String },
    #[error("the configuration's signature does not verify against the pinned key: it was altered after signing; it was not applied")]
    BadSignature,
    #[error("the configuration is for pool {got:?}, this agent serves pool {expected:?}; it was not applied")]
    WrongPool { expected: String, got: String },
    #[error("the configuration has generation {got}, older than generation {have} this agent already runs (a replayed configuration); it was not applied")]
    Stale { got: u64, have: u64 },
    #[error("a candidate configuration (preview) came where the configuration to serve belongs; it was not applied")]
    PreviewAsActive,
    #[error("a configuration to serve came where a candidate (preview) belongs; it was not built as one")]
    ActiveAsPreview,
}

/// The control plane's signing key.
pub struct Signer {
    key: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.public.id())
            .finish_non_exhaustive()
    }
}

/// Text form of a signing key file: this prefix and the PKCS#8 document, base64.
const SIGNING_KEY_PREFIX: &str = "apitree-ed25519-pkcs8:";
/// Text form of a public key: this prefix and the 32 key bytes, base64.
const PUBLIC_KEY_PREFIX: &str = "ed25519:";

impl Signer {
    /// A new random key, in the text form [`Signer::parse`] reads.
    pub fn generate_text() -> String {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system's random source works");
        format!("{SIGNING_KEY_PREFIX}{}\n", B64.encode(doc.as_ref()))
    }

    /// Reads a signing key written by [`Signer::generate_text`] (`apitree agent keygen`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let body = text
            .trim()
            .strip_prefix(SIGNING_KEY_PREFIX)
            .ok_or("is not an apitree signing key (it starts with \"apitree-ed25519-pkcs8:\"; `apitree agent keygen` writes one)")?;
        let doc = B64
            .decode(body)
            .map_err(|_| "holds a signing key that is not valid base64")?;
        let key = Ed25519KeyPair::from_pkcs8(&doc)
            .map_err(|_| "holds a signing key that is not an Ed25519 PKCS#8 key")?;
        let public = PublicKey(
            key.public_key()
                .as_ref()
                .try_into()
                .expect("Ed25519 public keys are 32 bytes"),
        );
        Ok(Self { key, public })
    }

    /// Reads the signing key file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("signing key {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("signing key {}: {e}", path.display()))
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `payload`.
    pub fn sign(&self, payload: &Payload) -> Envelope {
        let bytes = serde_json::to_vec(payload).expect("a payload serialises");
        Envelope {
            payload: B64.encode(&bytes),
            signature: B64.encode(self.key.sign(&bytes).as_ref()),
            key_id: self.public.id(),
        }
    }
}

/// The public half of the signing key: what an agent pins.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", B64.encode(self.0))
    }
}

impl PublicKey {
    /// Reads `ed25519:BASE64` (what `apitree agent keygen` prints).
    pub fn parse(text: &str) -> Result<Self, String> {
        let body = text.trim().strip_prefix(PUBLIC_KEY_PREFIX).ok_or(
            "is not a public key like \"ed25519:BASE64\" (`apitree agent keygen` prints one)",
        )?;
        let bytes = B64
            .decode(body)
            .map_err(|_| "holds a public key that is not valid base64")?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "holds a public key that is not 32 bytes long")?;
        Ok(Self(bytes))
    }

    /// Reads the public key file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config key {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config key {}: {e}", path.display()))
    }

    /// The key's short id: the first 16 hex digits of the SHA-256 of its bytes.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }

    /// Checks `envelope`'s signature, then that it is for `pool`, not older than `have` (the
    /// generation the agent runs) and not a candidate. Returns the payload only when
    /// everything holds.
    pub fn open(
        &self,
        envelope: &Envelope,
        pool: &str,
        have: Option<u64>,
    ) -> Result<Payload, EnvelopeError> {
        let payload = self.verified(envelope, pool)?;
        if payload.preview {
            return Err(EnvelopeError::PreviewAsActive);
        }
        if let Some(have) = have {
            if payload.generation < have {
                return Err(EnvelopeError::Stale {
                    got: payload.generation,
                    have,
                });
            }
        }
        Ok(payload)
    }

    /// Checks a candidate's signature, that it is for `pool` and that it is marked as one.
    pub fn open_preview(&self, envelope: &Envelope, pool: &str) -> Result<Payload, EnvelopeError> {
        let payload = self.verified(envelope, pool)?;
        if !payload.preview {
            return Err(EnvelopeError::ActiveAsPreview);
        }
        Ok(payload)
    }

    /// The payload of `envelope` when its signature verifies and it is for `pool`.
    fn verified(&self, envelope: &Envelope, pool: &str) -> Result<Payload, EnvelopeError> {
        let malformed = |what: &str| EnvelopeError::Malformed(what.to_string());
        if envelope.key_id != self.id() {
            return Err(EnvelopeError::UnknownKey {
                pinned: self.id(),
                got: envelope.key_id.chars().take(32).collect(),
            });
        }
        let bytes = B64
            .decode(&envelope.payload)
            .map_err(|_| malformed("the payload is not base64"))?;
        let signature = B64
            .decode(&envelope.signature)
            .map_err(|_| malformed("the signature is not base64"))?;
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(&bytes, &signature)
            .map_err(|_| EnvelopeError::BadSignature)?;
        // Only signed bytes are parsed.
        let payload: Payload = serde_json::from_slice(&bytes)
            .map_err(|e| EnvelopeError::Malformed(format!("the signed payload: {e}")))?;
        if payload.pool != pool {
            return Err(EnvelopeError::WrongPool {
                expected: pool.to_string(),
                got: payload.pool,
            });
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(pool: &str, generation: u64) -> Payload {
        Payload {
            pool: pool.into(),
            generation,
            issued_at: "2026-12-06T00:00:00Z".into(),
            preview: false,
            config: serde_json::from_str(
                r#"{"routes":[{"name":"accounts","pathPrefix":"/accounts/"}]}"#,
            )
            .unwrap(),
        }
    }

    fn signer() -> Signer {
        Signer::parse(&Signer::generate_text()).unwrap()
    }

    #[test]
    fn a_signed_payload_opens_with_the_pinned_key() {
        let s = signer();
        let pinned = PublicKey::parse(&s.public_key().to_string()).unwrap();
        let env = s.sign(&payload("bank-a", 7));
        assert_eq!(
            pinned.open(&env, "bank-a", Some(7)).unwrap(),
            payload("bank-a", 7)
        );
        assert_eq!(pinned.open(&env, "bank-a", None).unwrap().generation, 7);
    }

    /// Every single-byte change of the signed bytes, and every change of the signature, is
    /// refused: the class "altered after signing", not one example of it.
    #[test]
    fn any_altered_byte_is_refused() {
        let s = signer();
        let env = s.sign(&payload("bank-a", 1));
        let bytes = B64.decode(&env.payload).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let forged = Envelope {
                payload: B64.encode(&b),
                ..env.clone()
            };
            assert_eq!(
                s.public_key().open(&forged, "bank-a", None),
                Err(EnvelopeError::BadSignature),
                "byte {i} changed"
            );
        }
        let sig = B64.decode(&env.signature).unwrap();
        for i in 0..sig.len() {
            let mut b = sig.clone();
            b[i] ^= 0x80;
            let forged = Envelope {
                signature: B64.encode(&b),
                ..env.clone()
            };
            assert_eq!(
                s.public_key().open(&forged, "bank-a", None),
                Err(EnvelopeError::BadSignature),
                "signature byte {i} changed"
            );
        }
    }

    #[test]
    fn another_key_another_pool_or_an_older_generation_is_refused() {
        let (s, other) = (signer(), signer());
        let env = other.sign(&payload("bank-a", 3));
        assert!(matches!(
            s.public_key().open(&env, "bank-a", None),
            Err(EnvelopeError::UnknownKey { .. })
        ));
        // The same key id claimed by another key: the signature still decides.
        let claimed = Envelope {
            key_id: s.public_key().id(),
            ..env
        };
        assert_eq!(
            s.public_key().open(&claimed, "bank-a", None),
            Err(EnvelopeError::BadSignature)
        );
        let env = s.sign(&payload("bank-b", 3));
        assert!(matches!(
            s.public_key().open(&env, "bank-a", None),
            Err(EnvelopeError::WrongPool { .. })
        ));
        let env = s.sign(&payload("bank-a", 3));
        assert_eq!(
            s.public_key().open(&env, "bank-a", Some(4)),
            Err(EnvelopeError::Stale { got: 3, have: 4 })
        );
        for garbage in ["", "%%%", "AAAA"] {
            let bad = Envelope {
                payload: garbage.into(),
                ..s.sign(&payload("bank-a", 3))
            };
            assert!(s.public_key().open(&bad, "bank-a", None).is_err());
        }
    }

    /// A candidate never opens as the configuration to serve, nor the other way round: the
    /// mark is signed, so neither can be relabelled.
    #[test]
    fn a_candidate_and_a_configuration_to_serve_do_not_pass_for_each_other() {
        let s = signer();
        let active = s.sign(&payload("bank-a", 5));
        let candidate = s.sign(&Payload {
            preview: true,
            ..payload("bank-a", 6)
        });
        assert_eq!(
            s.public_key().open(&candidate, "bank-a", None),
            Err(EnvelopeError::PreviewAsActive)
        );
        assert_eq!(
            s.public_key().open_preview(&active, "bank-a"),
            Err(EnvelopeError::ActiveAsPreview)
        );
        assert!(
            s.public_key()
                .open_preview(&candidate, "bank-a")
                .unwrap()
                .preview
        );
        assert!(matches!(
            s.public_key().open_preview(&candidate, "bank-b"),
            Err(EnvelopeError::WrongPool { .. })
        ));
        // The mark is in the signed bytes: flipping it breaks the signature.
        let text = String::from_utf8(B64.decode(&candidate.payload).unwrap()).unwrap();
        let relabelled = Envelope {
            payload: B64.encode(text.replace(r#","preview":true"#, "")),
            ..candidate.clone()
        };
        assert_ne!(relabelled.payload, candidate.payload);
        assert_eq!(
            s.public_key().open(&relabelled, "bank-a", None),
            Err(EnvelopeError::BadSignature)
        );
        // An agent that predates candidates refuses one: its payload has no such field.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        #[allow(dead_code)]
        struct OldPayload {
            pool: String,
            generation: u64,
            issued_at: String,
            config: serde_json::Value,
        }
        assert!(serde_json::from_str::<OldPayload>(&text).is_err());
    }

    #[test]
    fn key_texts_say_what_is_wrong() {
        assert!(Signer::parse("nonsense").unwrap_err().contains("keygen"));
        assert!(PublicKey::parse("ed25519:AAAA")
            .unwrap_err()
            .contains("32 bytes"));
        assert!(PublicKey::parse("rsa:AAAA")
            .unwrap_err()
            .contains("ed25519:"));
        let s = signer();
        assert!(!format!("{s:?}").contains(SIGNING_KEY_PREFIX));
    }
}
