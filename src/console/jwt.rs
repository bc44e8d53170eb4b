//! Console sessions: HS256 JSON Web Tokens signed with a keyring.
//!
//! `APITREE_JWT_SECRETS` holds the keyring: entries `kid:secret`, separated by commas or new
//! lines, the newest last. The newest signs; every entry verifies, so a secret rotates by
//! appending a new entry, waiting one token lifetime, and removing the old one. Each secret is
//! at least 32 bytes; none is ever logged (the keyring's `Debug` shows key ids only).
//!
//! Verification pins HS256: jsonwebtoken runs on a crypto provider of ours that knows HS256
//! and nothing else, so `none`, RS/ES/PS/EdDSA and HS/RS confusion cannot verify whatever the
//! header says. A token must name a known `kid` and carry `exp`, `iat`, `iss`, `aud` and `sub`.
//! The role in a token is informational: each request reads the user's current role and
//! disabled flag from the database.

use std::collections::HashSet;

use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{signature, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use super::authz::Role;

/// Issuer and audience of console tokens.
pub const ISSUER: &str = "apitree-console";
pub const AUDIENCE: &str = "apitree";
/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Clock skew tolerated on `exp` and `iat`.
const LEEWAY_SECS: u64 = 5;

/// What a console token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The user's id.
    pub sub: Uuid,
    /// The role at sign-in (informational; the database decides).
    pub role: Role,
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

/// Why a token was refused. The text never contains the token or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not HS256")]
    Algorithm,
    #[error("the token names no key id (kid), or one this console does not hold")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired; sign in again")]
    Expired,
    #[error("the token was issued in the future")]
    NotYetValid,
    #[error("the token's issuer, audience or claims are not the console's")]
    Claims,
}

impl TokenError {
    /// Stable code for metrics and JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::Algorithm => "token_algorithm",
            TokenError::UnknownKey => "token_unknown_key",
            TokenError::Signature => "token_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::Claims => "token_claims",
        }
    }
}

/// Signing and verifying secrets by key id; the last one signs.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Keyring").field("kids", &kids).finish()
    }
}

impl Keyring {
    /// Parses `kid:secret` entries separated by commas or new lines (newest last).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        let mut seen = HashSet::new();
        for (n, entry) in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let n = n + 1;
            let Some((kid, secret)) = entry.split_once(':') else {
                return Err(format!(
                    "JWT keyring entry {n} has no `kid:` in front of its secret; write entries as `kid:secret`"
                ));
            };
            let kid = kid.trim();
            if kid.is_empty()
                || kid.len() > 64
                || !kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(format!(
                    "JWT keyring entry {n}: a key id is 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.'"
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "JWT keyring entry {n} (kid {kid}): the secret has {} bytes, at least {MIN_SECRET_BYTES} are needed \
                     (e.g. `openssl rand -base64 48`)",
                    secret.len()
                ));
            }
            if !seen.insert(kid.to_string()) {
                return Err(format!("JWT keyring: kid {kid} is listed twice"));
            }
            keys.push((kid.to_string(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err("the JWT keyring is empty: set APITREE_JWT_SECRETS to `kid:secret` (a secret of at least 32 bytes)".into());
        }
        Ok(Keyring { keys })
    }

    /// The keyring in `APITREE_JWT_SECRETS`, if that is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var("APITREE_JWT_SECRETS") {
            Ok(text) => Keyring::parse(&text).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The key id that signs new tokens.
    pub fn signing_kid(&self) -> &str {
        &self.keys.last().expect("a keyring is never empty").0
    }

    /// Every key id, oldest first.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Signs `claims` with the newest secret.
    pub fn sign(&self, claims: &Claims) -> String {
        install_provider();
        let (kid, secret) = self.keys.last().expect("a keyring is never empty");
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(secret).expect("an HMAC secret"),
        )
        .expect("HS256 signing with a non-empty secret cannot fail")
    }

    /// Verifies `token` at `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        install_provider();
        // The header's `alg` is read as text first: jsonwebtoken cannot even name `none`,
        // and a refusal should say it was the algorithm.
        let first = token.split('.').next().unwrap_or("");
        let raw: serde_json::Value =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, first)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or(TokenError::Malformed)?;
        if raw.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(TokenError::Algorithm);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let (_, secret) = self
            .keys
            .iter()
            .find(|(k, _)| *k == kid)
            .ok_or(TokenError::UnknownKey)?;
        let mut v = Validation::new(Algorithm::HS256);
        v.algorithms = vec![Algorithm::HS256];
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[AUDIENCE]);
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let key = DecodingKey::from_secret(secret).map_err(|_| TokenError::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => TokenError::Signature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::Algorithm,
            ErrorKind::InvalidIssuer
            | ErrorKind::InvalidAudience
            | ErrorKind::MissingRequiredClaim(_)
            | ErrorKind::InvalidSubject
            | ErrorKind::Json(_) => TokenError::Claims,
            _ => TokenError::Malformed,
        })?;
        let claims = data.claims;
        if claims.iat > now + LEEWAY_SECS as i64 {
            return Err(TokenError::NotYetValid);
        }
        // jsonwebtoken compares `exp` with the system clock; the caller's `now` decides too.
        if claims.exp + (LEEWAY_SECS as i64) < now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

type HmacSha256 = Hmac<Sha256>;

struct Hs256(HmacSha256);

impl signature::Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut mac = self.0.clone();
        mac.update(msg);
        Ok(mac.finalize().into_bytes().to_vec())
    }
}

impl signature::Verifier<Vec<u8>> for Hs256 {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let mut mac = self.0.clone();
        mac.update(msg);
        // Constant-time comparison.
        mac.verify_slice(sig).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

fn hs256(alg: &Algorithm, secret: &[u8]) -> jsonwebtoken::errors::Result<Hs256> {
    if *alg != Algorithm::HS256 || secret.is_empty() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    HmacSha256::new_from_slice(secret)
        .map(Hs256)
        .map_err(|_| ErrorKind::InvalidKeyFormat.into())
}

/// jsonwebtoken's crypto: HS256 and nothing else.
static HS256_ONLY: CryptoProvider = CryptoProvider {
    signer_factory: |alg, key| Ok(Box::new(hs256(alg, key.as_bytes())?)),
    verifier_factory: |alg, key| Ok(Box::new(hs256(alg, key.try_get_as_bytes()?)?)),
    key_utils: KeyUtils::new_unimplemented(),
};

fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = HS256_ONLY.install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    const SECRET_A: &str = "a-secret-of-at-least-thirty-two-bytes-0001";
    const SECRET_B: &str = "b-secret-of-at-least-thirty-two-bytes-0002";

    fn ring() -> Keyring {
        Keyring::parse(&format!("old:{SECRET_A}, new:{SECRET_B}")).unwrap()
    }

    fn claims(now: i64) -> Claims {
        Claims {
            sub: Uuid::nil(),
            role: Role::Buyer,
            iat: now,
            exp: now + 900,
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    /// A token built by hand: any header, any payload, signed with HMAC-SHA256 under `key`
    /// (or with `sig` verbatim).
    fn forge(header: &serde_json::Value, payload: &serde_json::Value, key: &[u8]) -> String {
        let msg = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(payload.to_string())
        );
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(msg.as_bytes());
        format!("{msg}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn the_newest_secret_signs_and_every_secret_verifies() {
        let ring = ring();
        let t = ring.sign(&claims(now()));
        let header = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(header.kid.as_deref(), Some("new"));
        assert_eq!(ring.verify(&t, now()).unwrap(), claims(now()));
        // A token from before a rotation (signed by `old`) still verifies.
        let before = Keyring::parse(&format!("old:{SECRET_A}")).unwrap();
        let old = before.sign(&claims(now()));
        assert!(ring.verify(&old, now()).is_ok());
        // Once `old` is removed it does not.
        let after = Keyring::parse(&format!("new:{SECRET_B}")).unwrap();
        assert_eq!(after.verify(&old, now()), Err(TokenError::UnknownKey));
    }

    /// Every way to bend a token, each refused with its own reason.
    #[test]
    fn tampered_tokens_are_refused() {
        let ring = ring();
        let n = now();
        let good_payload = serde_json::to_value(claims(n)).unwrap();
        let hs = |kid: &str| serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": kid});
        let mut admin = good_payload.clone();
        admin["role"] = "super_admin".into();
        let mut other_aud = good_payload.clone();
        other_aud["aud"] = "someone-else".into();
        let mut other_iss = good_payload.clone();
        other_iss["iss"] = "someone-else".into();
        let mut no_exp = good_payload.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        let mut no_iat = good_payload.clone();
        no_iat.as_object_mut().unwrap().remove("iat");
        let mut expired = good_payload.clone();
        expired["exp"] = (n - 60).into();
        let mut future = good_payload.clone();
        future["iat"] = (n + 3600).into();
        future["exp"] = (n + 7200).into();

        // The payload of a good token swapped for an edited one keeps the old signature.
        let good = ring.sign(&claims(n));
        let parts: Vec<&str> = good.split('.').collect();
        let role_edited = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(admin.to_string()),
            parts[2]
        );
        let unsigned = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","typ":"JWT","kid":"new"}"#),
            parts[1]
        );
        let none_signed = format!(
            "{}.{}.{}",
            B64.encode(r#"{"alg":"none","typ":"JWT","kid":"new"}"#),
            parts[1],
            parts[2]
        );
        let cases: Vec<(&str, String, TokenError)> = vec![
            (
                "role edited in the payload",
                role_edited,
                TokenError::Signature,
            ),
            ("alg none, no signature", unsigned, TokenError::Algorithm),
            (
                "alg none, signature kept",
                none_signed,
                TokenError::Algorithm,
            ),
            (
                "RS256 header over an HMAC with the secret (HS/RS confusion)",
                forge(
                    &serde_json::json!({"alg": "RS256", "kid": "new"}),
                    &good_payload,
                    SECRET_B.as_bytes(),
                ),
                TokenError::Algorithm,
            ),
            (
                "ES256 header",
                forge(
                    &serde_json::json!({"alg": "ES256", "kid": "new"}),
                    &good_payload,
                    SECRET_B.as_bytes(),
                ),
                TokenError::Algorithm,
            ),
            (
                "HS512 header",
                forge(
                    &serde_json::json!({"alg": "HS512", "kid": "new"}),
                    &good_payload,
                    SECRET_B.as_bytes(),
                ),
                TokenError::Algorithm,
            ),
            (
                "wrong secret",
                forge(
                    &hs("new"),
                    &good_payload,
                    b"another-secret-of-at-least-32-bytes-xx",
                ),
                TokenError::Signature,
            ),
            (
                "signed by `old` but claiming kid `new`",
                forge(&hs("new"), &good_payload, SECRET_A.as_bytes()),
                TokenError::Signature,
            ),
            (
                "unknown kid",
                forge(&hs("gone"), &good_payload, SECRET_B.as_bytes()),
                TokenError::UnknownKey,
            ),
            (
                "no kid",
                forge(
                    &serde_json::json!({"alg": "HS256"}),
                    &good_payload,
                    SECRET_B.as_bytes(),
                ),
                TokenError::UnknownKey,
            ),
            (
                "expired",
                forge(&hs("new"), &expired, SECRET_B.as_bytes()),
                TokenError::Expired,
            ),
            (
                "issued in the future",
                forge(&hs("new"), &future, SECRET_B.as_bytes()),
                TokenError::NotYetValid,
            ),
            (
                "other audience",
                forge(&hs("new"), &other_aud, SECRET_B.as_bytes()),
                TokenError::Claims,
            ),
            (
                "other issuer",
                forge(&hs("new"), &other_iss, SECRET_B.as_bytes()),
                TokenError::Claims,
            ),
            (
                "no exp",
                forge(&hs("new"), &no_exp, SECRET_B.as_bytes()),
                TokenError::Claims,
            ),
            (
                "no iat",
                forge(&hs("new"), &no_iat, SECRET_B.as_bytes()),
                TokenError::Claims,
            ),
            ("not a JWT", "hello".into(), TokenError::Malformed),
            ("empty", String::new(), TokenError::Malformed),
            (
                "two parts",
                format!("{}.{}", parts[0], parts[1]),
                TokenError::Malformed,
            ),
        ];
        for (what, token, want) in cases {
            assert_eq!(ring.verify(&token, n), Err(want.clone()), "{what}");
        }
        // The same forge with the right secret and header passes: the cases above fail for
        // their own reason, not because the forge is broken.
        let fine = forge(&hs("new"), &good_payload, SECRET_B.as_bytes());
        assert!(ring.verify(&fine, n).is_ok());
    }

    #[test]
    fn expiry_is_judged_against_the_given_clock() {
        let ring = ring();
        let n = now();
        let t = ring.sign(&claims(n));
        assert!(ring.verify(&t, n + 899).is_ok());
        assert_eq!(ring.verify(&t, n + 906), Err(TokenError::Expired));
    }

    #[test]
    fn bad_keyrings_say_what_is_wrong_without_the_secret() {
        for (text, want) in [
            ("", "empty"),
            ("nokid", "kid:"),
            ("k:short", "at least 32"),
            (&format!("bad kid!:{SECRET_A}"), "key id"),
            (&format!("a:{SECRET_A},a:{SECRET_B}"), "twice"),
        ] {
            let e = Keyring::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            if text == "k:short" {
                assert!(!e.contains("short"), "the secret leaked: {e}");
            }
            assert!(!e.contains(SECRET_A) && !e.contains(SECRET_B), "{e}");
        }
        let r = ring();
        assert_eq!(format!("{r:?}"), r#"Keyring { kids: ["old", "new"] }"#);
        assert_eq!(r.signing_kid(), "new");
        // New lines separate entries too.
        assert_eq!(
            Keyring::parse(&format!("a:{SECRET_A}\nb:{SECRET_B}\n"))
                .unwrap()
                .kids(),
            ["a", "b"]
        );
    }
}
