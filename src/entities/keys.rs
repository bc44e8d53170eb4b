//! API keys: format, checksum, generation and the HMAC-SHA256 stored form.
//!
//! A key reads `at_<scope>_<30 base62 chars><6 base62 checksum chars>`, e.g.
//! `at_live_Xy…`. The checksum (CRC-32 of everything before it) lets the gateway refuse a typo
//! before any lookup. Keys are stored only as HMAC-SHA256 under a server-side pepper; the first
//! 8 body characters form a public prefix (`at_live_Xy3kQ9ab`) used in logs and listings.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::crd::gateway::KeyScope;

const BODY_LEN: usize = 30;
const CHECK_LEN: usize = 6;
const PREFIX_BODY_LEN: usize = 8;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented key was refused before lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("API keys start with at_live_ or at_test_")]
    UnknownPrefix,
    #[error("the API key has the wrong length or characters; copy it again in full")]
    Malformed,
    #[error("the API key's checksum does not match; it was probably mistyped or truncated")]
    BadChecksum,
}

/// A syntactically valid key (checksum verified). Its Debug output never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: String,
    scope: KeyScope,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}…)", self.prefix())
    }
}

fn scope_tag(scope: KeyScope) -> &'static str {
    match scope {
        KeyScope::Live => "at_live_",
        KeyScope::Test => "at_test_",
    }
}

/// The checksum characters (base62 of the CRC-32) for a key's head.
fn checksum(head: &str) -> [u8; CHECK_LEN] {
    let mut n = crc32(head.as_bytes()) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// CRC-32 (IEEE) lookup tables for slicing by 8, built at compile time: `CRC_TABLES[0]` is
/// the byte-at-a-time table; `CRC_TABLES[k][i]` is the CRC of byte `i` followed by `k` zero
/// bytes, so eight bytes are folded in with eight independent lookups.
const CRC_TABLES: [[u32; 256]; 8] = {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
};

/// CRC-32 (IEEE), checked on every request: eight bytes per step (a key's head is 38 bytes),
/// the rest a byte at a time. A byte-at-a-time loop is one chain of dependent table loads.
fn crc32(bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        let at =
            |table: &[u32; 256], word: u32, shift: u32| table[((word >> shift) & 0xFF) as usize];
        crc = at(&t[7], lo, 0)
            ^ at(&t[6], lo, 8)
            ^ at(&t[5], lo, 16)
            ^ at(&t[4], lo, 24)
            ^ at(&t[3], hi, 0)
            ^ at(&t[2], hi, 8)
            ^ at(&t[1], hi, 16)
            ^ at(&t[0], hi, 24);
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u32) & 0xFF) as usize];
    }
    !crc
}

impl ApiKey {
    /// Generates a new random key of `scope`.
    pub fn generate(scope: KeyScope) -> Self {
        let mut rng = rand::rng();
        let body: String = (0..BODY_LEN)
            .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
            .collect();
        let head = format!("{}{body}", scope_tag(scope));
        let check = checksum(&head);
        let text = format!("{head}{}", String::from_utf8_lossy(&check));
        Self { text, scope }
    }

    /// Parses a presented key, checking shape and checksum (no lookup).
    pub fn parse(text: &str) -> Result<Self, KeyFormatError> {
        let scope = Self::check(text)?;
        Ok(Self {
            text: text.to_string(),
            scope,
        })
    }

    /// [`Self::parse`] without keeping the key: its scope when shape and checksum are right.
    pub fn check(text: &str) -> Result<KeyScope, KeyFormatError> {
        let scope = if text.starts_with("at_live_") {
            KeyScope::Live
        } else if text.starts_with("at_test_") {
            KeyScope::Test
        } else {
            return Err(KeyFormatError::UnknownPrefix);
        };
        let rest = &text.as_bytes()[8..];
        if rest.len() != BODY_LEN + CHECK_LEN || !rest.iter().all(u8::is_ascii_alphanumeric) {
            return Err(KeyFormatError::Malformed);
        }
        let (head, check) = text.split_at(8 + BODY_LEN);
        if checksum(head).ct_eq(check.as_bytes()).unwrap_u8() != 1 {
            return Err(KeyFormatError::BadChecksum);
        }
        Ok(scope)
    }

    pub fn scope(&self) -> KeyScope {
        self.scope
    }

    /// The public prefix, e.g. `at_live_Xy3kQ9ab`.
    pub fn prefix(&self) -> &str {
        &self.text[..8 + PREFIX_BODY_LEN]
    }

    /// The full secret text; shown to the user once, at creation.
    pub fn expose_secret(&self) -> &str {
        &self.text
    }
}

/// The server-side pepper keys are hashed under. Debug output never shows it. Holds the HMAC
/// state with the pepper already absorbed, so a request pays for the key's blocks only.
#[derive(Clone)]
pub struct Pepper(Hmac<Sha256>);

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(****)")
    }
}

/// Why a pepper was refused.
#[derive(Debug, thiserror::Error)]
#[error("the key pepper must be at least 32 bytes (got {0}); generate one with `head -c 48 /dev/urandom | base64`")]
pub struct WeakPepper(usize);

impl ApiKey {
    /// The proxy configuration's `keys:` entry for this key: its prefix and peppered hash, never
    /// the key itself.
    pub fn config_entry(&self, pepper: &Pepper, org: &str) -> String {
        format!(
            "- prefix: {}\n  hash: {}\n  org: {org}\n  scope: {}\n",
            self.prefix(),
            pepper.hash(self).to_hex(),
            self.scope().as_str()
        )
    }
}

impl Pepper {
    pub fn new(bytes: Vec<u8>) -> Result<Self, WeakPepper> {
        if bytes.len() < 32 {
            return Err(WeakPepper(bytes.len()));
        }
        Ok(Self(
            <Hmac<Sha256> as KeyInit>::new_from_slice(&bytes)
                .expect("HMAC accepts keys of any length"),
        ))
    }

    /// The stored form of a key: HMAC-SHA256(pepper, key).
    pub fn hash(&self, key: &ApiKey) -> KeyHash {
        self.hash_text(&key.text)
    }

    /// [`Self::hash`] of a key's text that [`ApiKey::check`] accepted.
    pub fn hash_text(&self, text: &str) -> KeyHash {
        let mut mac = self.0.clone();
        mac.update(text.as_bytes());
        KeyHash(mac.finalize().into_bytes().into())
    }
}

/// A stored key hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

/// HMAC outputs are uniformly spread: their first 8 bytes are as good a hash as all 32.
impl std::hash::Hash for KeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl KeyHash {
    /// Compares in constant time: every word is XORed and ORed together, no early exit.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        let mut diff = 0u64;
        for (a, b) in self.0.chunks_exact(8).zip(other.0.chunks_exact(8)) {
            let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
            diff |= word(a) ^ word(b);
        }
        std::hint::black_box(diff) == 0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_keep_their_scope() {
        for scope in [KeyScope::Live, KeyScope::Test] {
            let key = ApiKey::generate(scope);
            let parsed = ApiKey::parse(key.expose_secret()).unwrap();
            assert_eq!(parsed.scope(), scope);
            assert_eq!(parsed.prefix().len(), 16);
            // What the gateway checks per request, without keeping the key.
            assert_eq!(ApiKey::check(key.expose_secret()), Ok(scope));
        }
    }

    #[test]
    fn a_single_typo_is_caught_by_the_checksum() {
        let key = ApiKey::generate(KeyScope::Live);
        let text = key.expose_secret();
        for i in 8..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(
                ApiKey::parse(&typo),
                Err(KeyFormatError::BadChecksum),
                "position {i}"
            );
            assert_eq!(ApiKey::check(&typo), Err(KeyFormatError::BadChecksum));
        }
    }

    #[test]
    fn wrong_shapes_are_named() {
        assert_eq!(
            ApiKey::parse("sk_live_abc"),
            Err(KeyFormatError::UnknownPrefix)
        );
        assert_eq!(ApiKey::parse("at_live_abc"), Err(KeyFormatError::Malformed));
        let key = ApiKey::generate(KeyScope::Test);
        let truncated = &key.expose_secret()[..40];
        assert_eq!(ApiKey::parse(truncated), Err(KeyFormatError::Malformed));
    }

    #[test]
    fn hashes_depend_on_the_pepper_and_debug_hides_secrets() {
        let key = ApiKey::generate(KeyScope::Live);
        let p1 = Pepper::new(vec![1; 32]).unwrap();
        let p2 = Pepper::new(vec![2; 32]).unwrap();
        assert!(p1.hash(&key).ct_eq(&p1.hash(&key)));
        assert!(!p1.hash(&key).ct_eq(&p2.hash(&key)));
        assert!(p1.hash_text(key.expose_secret()).ct_eq(&p1.hash(&key)));
        let shown = format!("{key:?} {p1:?}");
        assert!(!shown.contains(&key.expose_secret()[16..]));
        assert!(Pepper::new(vec![0; 8]).is_err());
    }

    #[test]
    fn crc32_matches_the_reference_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// The sliced CRC against the textbook one (a bit at a time, no table) at every length
    /// around the 8-byte steps, so a wrong table or a wrong byte order cannot hide.
    #[test]
    fn crc32_agrees_with_the_bitwise_definition_at_every_length() {
        fn bitwise(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in bytes {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let data: Vec<u8> = (0..100u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            for start in 0..3 {
                let slice = &data[start..(start + len).min(data.len())];
                assert_eq!(
                    crc32(slice),
                    bitwise(slice),
                    "length {} from {start}",
                    slice.len()
                );
            }
        }
    }
}
