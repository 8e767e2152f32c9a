//! Secrets the control plane hands out: one-time node join tokens and the admin credential.
//!
//! Only SHA-256 hashes of the secrets are stored. A join token also carries a pin of the CA's trust anchor
//! (as kubeadm's discovery hash does), so a proxy joining for the first time can authenticate the control
//! plane without being given the bundle separately: a token leaked to an attacker's fake control plane is
//! useless to it, and a proxy pointed at an impostor refuses it.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

const JOIN_PREFIX: &str = "stj1";
const ADMIN_PREFIX: &str = "sta1";

pub type Sha256 = [u8; 32];

pub fn sha256(data: &[u8]) -> Sha256 {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two hashes without an early exit (the comparison time does not reveal where they differ).
pub fn hashes_equal(a: &Sha256, b: &Sha256) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| TokenError::Random)?;
    Ok(b)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("this is not a Strait join token (expected stj1.<id>.<secret>.<ca-pin>)")]
    Malformed,
    #[error("the system random generator failed")]
    Random,
}

/// A join token: `stj1.<id: 16 hex>.<secret: 32 bytes b64url>.<ca pin: sha256 of the anchor, b64url>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public lookup key (safe to log).
    pub id: String,
    secret: [u8; 32],
    /// SHA-256 of the DER trust anchor the control plane's certificate must chain to.
    pub ca_pin: Sha256,
}

impl JoinToken {
    pub fn generate(ca_pin: Sha256) -> Result<Self, TokenError> {
        Ok(Self {
            id: hex(&random::<8>()?),
            secret: random::<32>()?,
            ca_pin,
        })
    }

    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let mut parts = s.trim().split('.');
        let (Some(JOIN_PREFIX), Some(id), Some(secret), Some(pin), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed);
        }
        let decode32 = |s: &str| -> Result<[u8; 32], TokenError> {
            URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(TokenError::Malformed)
        };
        Ok(Self {
            id: id.to_ascii_lowercase(),
            secret: decode32(secret)?,
            ca_pin: decode32(pin)?,
        })
    }

    pub fn secret_hash(&self) -> Sha256 {
        sha256(&self.secret)
    }

    /// The token as the operator copies it. This is the only place the secret is rendered.
    pub fn reveal(&self) -> String {
        format!(
            "{JOIN_PREFIX}.{}.{}.{}",
            self.id,
            URL_SAFE_NO_PAD.encode(self.secret),
            URL_SAFE_NO_PAD.encode(self.ca_pin)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}, secret redacted)", self.id)
    }
}

/// The admin credential: a bearer token `sta1.<32 bytes b64url>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn generate() -> Result<Self, TokenError> {
        Ok(Self(random::<32>()?))
    }

    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.trim().strip_prefix(ADMIN_PREFIX)?.strip_prefix('.')?;
        let bytes: [u8; 32] = URL_SAFE_NO_PAD.decode(rest).ok()?.try_into().ok()?;
        Some(Self(bytes))
    }

    pub fn hash(&self) -> Sha256 {
        sha256(&self.0)
    }

    pub fn reveal(&self) -> String {
        format!("{ADMIN_PREFIX}.{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_round_trip_and_refuse_garbage() {
        let t = JoinToken::generate(sha256(b"anchor")).unwrap();
        let s = t.reveal();
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(
            !format!("{t:?}").contains(&s[22..40]),
            "debug must not print the secret"
        );
        for bad in [
            "",
            "stj1",
            "stj1.x.y.z",
            &s.replace("stj1", "stj2"),
            &format!("{s}.x"),
        ] {
            assert_eq!(JoinToken::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn admin_tokens_round_trip() {
        let t = AdminToken::generate().unwrap();
        assert_eq!(AdminToken::parse(&t.reveal()).unwrap().hash(), t.hash());
        assert!(AdminToken::parse("sta1.short").is_none());
        assert!(hashes_equal(&t.hash(), &t.hash()));
        assert!(!hashes_equal(&t.hash(), &sha256(b"x")));
    }
}
