//! Upstream credentials (BYOK and system keys), encrypted with AES-256-GCM.
//!
//! The associated data binds every ciphertext to its org, API and master-key version, so a
//! ciphertext copied to another org or API fails to decrypt. Master keys live outside the
//! config and the database (an env var or a file of `version:base64` lines), are versioned, and
//! never appear in Debug output, logs or errors.

use std::{collections::BTreeMap, fmt};

use aes_gcm::{
    aead::{Aead, KeyInit, Payload},
    Aes256Gcm, Key,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use rand::RngExt;

/// A decrypted secret value. Debug and Display never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(****)")
    }
}

/// Vault errors. None of them carries key material or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error("master key version {version} is not loaded; provide it in the master-key file or APITREE_MASTER_KEY")]
    UnknownVersion { version: u32 },
    #[error("credential {name:?} does not decrypt for org {org} and API {api}: it was encrypted for another org/API, altered, or under another master key")]
    Decrypt {
        name: String,
        org: String,
        api: String,
    },
    #[error("master key {what}: expected base64 of exactly 32 bytes (generate one with `head -c 32 /dev/urandom | base64`)")]
    BadKey { what: String },
    #[error("master-key file line {line}: expected `<version>:<base64 key>`")]
    BadLine { line: usize },
    #[error("no master key: set APITREE_MASTER_KEY (base64 of 32 bytes; APITREE_MASTER_KEY_VERSION if not 1), or name a file of version:base64 lines as secrets.masterKeyFile in the config given with -c")]
    Missing,
    #[error("invalid base64 in {field} of credential {name:?}")]
    BadEncoding { name: String, field: &'static str },
}

/// Master keys by version; the highest version encrypts.
#[derive(Clone)]
pub struct MasterKeys {
    keys: BTreeMap<u32, Key<Aes256Gcm>>,
}

impl fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MasterKeys(versions {:?})",
            self.keys.keys().collect::<Vec<_>>()
        )
    }
}

fn decode_key(text: &str, what: String) -> Result<Key<Aes256Gcm>, VaultError> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|_| VaultError::BadKey { what: what.clone() })?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| VaultError::BadKey { what })?;
    Ok(arr.into())
}

impl MasterKeys {
    /// One key from base64 text.
    pub fn single(version: u32, base64_key: &str) -> Result<Self, VaultError> {
        let key = decode_key(base64_key, format!("version {version}"))?;
        Ok(Self {
            keys: BTreeMap::from([(version, key)]),
        })
    }

    /// The keys an environment variable (or Secret value) holds: one base64 key of version
    /// `version`, or a keyring in the key-file format (`version:base64` lines; base64 never
    /// contains `:`), whose highest version encrypts.
    pub fn from_value(value: &str, version: u32) -> Result<Self, VaultError> {
        if value.contains(':') {
            Self::parse_file(value)
        } else {
            Self::single(version, value)
        }
    }

    /// Parses a key file: one `version:base64` per line; `#` comments and blank lines ignored.
    pub fn parse_file(text: &str) -> Result<Self, VaultError> {
        let mut keys = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (v, k) = line
                .split_once(':')
                .ok_or(VaultError::BadLine { line: i + 1 })?;
            let version: u32 = v
                .trim()
                .parse()
                .map_err(|_| VaultError::BadLine { line: i + 1 })?;
            keys.insert(
                version,
                decode_key(k, format!("version {version} (line {})", i + 1))?,
            );
        }
        if keys.is_empty() {
            return Err(VaultError::Missing);
        }
        Ok(Self { keys })
    }

    /// The version new ciphertexts use.
    pub fn current_version(&self) -> u32 {
        *self.keys.keys().next_back().expect("at least one key")
    }

    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Encrypts `plaintext` for (org, api) under the current version.
    pub fn encrypt(&self, org: &str, api: &str, plaintext: &str) -> Sealed {
        let version = self.current_version();
        let cipher = Aes256Gcm::new(&self.keys[&version]);
        let mut nonce = [0u8; 12];
        rand::rng().fill(&mut nonce[..]);
        let aad = associated_data(org, api, version);
        let ciphertext = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        Sealed {
            key_version: version,
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Decrypts a credential; fails when org, API or version differ from encryption time.
    pub fn decrypt(
        &self,
        name: &str,
        org: &str,
        api: &str,
        sealed: &Sealed,
    ) -> Result<SecretValue, VaultError> {
        let key = self
            .keys
            .get(&sealed.key_version)
            .ok_or(VaultError::UnknownVersion {
                version: sealed.key_version,
            })?;
        let fail = || VaultError::Decrypt {
            name: name.to_string(),
            org: org.to_string(),
            api: api.to_string(),
        };
        let nonce: [u8; 12] = sealed.nonce.clone().try_into().map_err(|_| fail())?;
        let aad = associated_data(org, api, sealed.key_version);
        let plain = Aes256Gcm::new(key)
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| fail())?;
        String::from_utf8(plain)
            .map(SecretValue)
            .map_err(|_| fail())
    }
}

/// The associated data: binds a ciphertext to where it may be used.
fn associated_data(org: &str, api: &str, version: u32) -> String {
    format!("apitree/credential/v1|org={org}|api={api}|key_version={version}")
}

/// An encrypted credential as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_version: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sealed(v{}, {} bytes)",
            self.key_version,
            self.ciphertext.len()
        )
    }
}

impl Sealed {
    pub fn from_base64(
        name: &str,
        version: u32,
        nonce: &str,
        ciphertext: &str,
    ) -> Result<Self, VaultError> {
        let bad = |field| VaultError::BadEncoding {
            name: name.to_string(),
            field,
        };
        Ok(Self {
            key_version: version,
            nonce: B64.decode(nonce).map_err(|_| bad("nonce"))?,
            ciphertext: B64.decode(ciphertext).map_err(|_| bad("ciphertext"))?,
        })
    }

    pub fn nonce_b64(&self) -> String {
        B64.encode(&self.nonce)
    }

    pub fn ciphertext_b64(&self) -> String {
        B64.encode(&self.ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> MasterKeys {
        MasterKeys::parse_file(&format!(
            "# test keys\n1:{}\n2:{}\n",
            B64.encode([7u8; 32]),
            B64.encode([9u8; 32])
        ))
        .unwrap()
    }

    #[test]
    fn an_env_value_holds_one_key_or_a_keyring() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (k1, k2) = (b64.encode([1u8; 32]), b64.encode([2u8; 32]));
        let one = MasterKeys::from_value(&k1, 3).unwrap();
        assert_eq!(one.versions(), [3]);
        let ring = MasterKeys::from_value(&format!("1:{k1}\n2:{k2}\n"), 3).unwrap();
        assert_eq!(ring.versions(), [1, 2], "a keyring's own versions win");
        assert_eq!(ring.current_version(), 2);
        assert!(MasterKeys::from_value("1:not-base64", 1).is_err());
    }

    #[test]
    fn round_trip_under_the_newest_version() {
        let k = keys();
        let sealed = k.encrypt("org-a", "weather", "vendor-secret-123");
        assert_eq!(sealed.key_version, 2);
        let plain = k.decrypt("w", "org-a", "weather", &sealed).unwrap();
        assert_eq!(plain.expose(), "vendor-secret-123");
    }

    #[test]
    fn ciphertext_moved_to_another_org_or_api_fails() {
        let k = keys();
        let sealed = k.encrypt("org-a", "weather", "vendor-secret-123");
        for (org, api) in [("org-b", "weather"), ("org-a", "payments")] {
            let err = k.decrypt("w", org, api, &sealed).unwrap_err();
            assert!(matches!(err, VaultError::Decrypt { .. }));
            assert!(!err.to_string().contains("vendor-secret"));
        }
        let mut relabelled = sealed.clone();
        relabelled.key_version = 1;
        assert!(k.decrypt("w", "org-a", "weather", &relabelled).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let k = keys();
        let shown = format!("{k:?} {:?}", SecretValue::new("hunter2".into()));
        assert!(!shown.contains("hunter2") && !shown.contains(&B64.encode([7u8; 32])));
    }

    #[test]
    fn bad_key_material_is_explained() {
        assert!(matches!(
            MasterKeys::single(1, "c2hvcnQ="),
            Err(VaultError::BadKey { .. })
        ));
        assert_eq!(
            MasterKeys::parse_file("nonsense").unwrap_err(),
            VaultError::BadLine { line: 1 }
        );
        assert_eq!(
            MasterKeys::parse_file("# nothing\n").unwrap_err(),
            VaultError::Missing
        );
    }
}
