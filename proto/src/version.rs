//! Mesh versions: what the distributor pushes (the directory and the policy bundle), numbered, hashed and
//! signed with the control plane's distribution key, and the checks a proxy makes before applying one.
//!
//! The signing key is an Ed25519 key of its own (not the CA key: a leaked distribution key lets an attacker
//! change policy, not mint identities, and the CA key never has to be online for pushes). Its public half
//! reaches proxies in the join and renewal answers, over the TLS session the join token's CA pin (or the
//! node SVID) authenticates, and is kept next to the trust bundle.
//!
//! Signed bytes are `CONTEXT || payload`, where payload is the exact JSON that travels, so the verifier
//! never re-serialises before checking.

use std::path::Path;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use strait_policy::bundle::Bundle;

use crate::api::Directory;

/// Domain separation: a signature over a mesh version cannot be taken for a signature over anything else.
/// Its `v1` is the version format: a payload an older proxy cannot read gets a new context.
const CONTEXT: &[u8] = b"strait mesh version v1\0";
/// The format of signed mesh versions (the signature's domain-separation context names it).
pub const FORMAT: &str = "v1";

/// File (in the control plane's data directory) holding the distribution key, PKCS#8, mode 0600.
pub const SIGNING_KEY_FILE: &str = "distribution-key.pk8";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::b64().encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::b64()
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// What a mesh version says. `number` grows by one with every change; `content_hash` covers the directory
/// and the bundle (not the number), so the control plane makes a new version only when something changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionPayload {
    pub trust_domain: String,
    pub number: u64,
    /// Milliseconds since the Unix epoch when the control plane made it (for apply → ACK timings).
    pub created_at_ms: u64,
    pub content_hash: String,
    pub directory: Directory,
    pub bundle: Bundle,
    /// The distribution key that will sign versions after this one, announced under the current key while
    /// a rotation is prepared (docs/distributor.md, "Rotating the distribution key"). A proxy that applies
    /// this version accepts versions signed by the key that signed it or by this one, and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<PublicKey>,
    /// The trust bundle and the signing authority in force (they change during a CA rotation). A proxy
    /// whose bundle has another fingerprint renews its node certificate, which brings the bundle over the
    /// node's mTLS session; when the authority changes it re-issues its SVIDs at once. The bundle itself is
    /// never taken from a version: the distribution key can change policy, not whom the mesh trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustState>,
}

/// See [`VersionPayload::trust`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustState {
    /// [`strait_ca::TrustBundle::fingerprint`] of the bundle in force.
    pub bundle_fingerprint: String,
    /// Id of the root that signs SVIDs now.
    pub authority: String,
    /// [`strait_ca::TrustBundle::federation_fingerprint`] of the federated trust domains' bundles in force;
    /// empty (and absent on the wire, as before federation existed) without federation. A proxy holding
    /// another renews its node certificate, whose answer carries the bundles.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub federation_fingerprint: String,
}

impl VersionPayload {
    /// SHA-256 (hex) over the directory's workloads, nodes, federation exports and imports, the bundle's content hash and the announced
    /// next key (when there is one, so announcing a key makes a new version; without one the hash is what
    /// it was before rotation existed).
    pub fn compute_hash(
        directory: &Directory,
        bundle: &Bundle,
        next_key: Option<&PublicKey>,
        trust: Option<&TrustState>,
    ) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&serde_json::to_vec(&directory.workloads).unwrap_or_default());
        ctx.update(&[0]);
        ctx.update(&serde_json::to_vec(&directory.nodes).unwrap_or_default());
        ctx.update(&[0]);
        // Federation's exports and imports, only when there are any (versions without federation hash as
        // they always did).
        if !directory.exports.is_empty() || !directory.imports.is_empty() {
            ctx.update(b"federation-directory:");
            ctx.update(&serde_json::to_vec(&directory.exports).unwrap_or_default());
            ctx.update(&[0]);
            ctx.update(&serde_json::to_vec(&directory.imports).unwrap_or_default());
            ctx.update(&[0]);
        }
        // Egress through the gateways, only when on (versions without it hash as they always did).
        if directory.egress_through_gateways {
            ctx.update(b"egress-through-gateways");
            ctx.update(&[0]);
        }
        ctx.update(bundle.content_hash().as_bytes());
        if let Some(k) = next_key {
            ctx.update(&[0]);
            ctx.update(b"next-key:");
            ctx.update(&k.0);
        }
        if let Some(t) = trust {
            ctx.update(&[0]);
            ctx.update(b"trust:");
            ctx.update(t.bundle_fingerprint.as_bytes());
            ctx.update(&[0]);
            ctx.update(t.authority.as_bytes());
            if !t.federation_fingerprint.is_empty() {
                ctx.update(&[0]);
                ctx.update(b"federation:");
                ctx.update(t.federation_fingerprint.as_bytes());
            }
        }
        crate::tokens::hex(ctx.finish().as_ref())
    }
}

/// A version as it travels and as proxies persist it: the payload bytes and a signature over them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedVersion {
    /// Identifies the key (first 8 bytes of SHA-256 of the public key, hex), for rotation.
    pub key_id: String,
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    #[serde(with = "base64_bytes", default)]
    pub signature: Vec<u8>,
}

/// The control plane's distribution key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn key_id(public: &[u8]) -> String {
    crate::tokens::hex(&ring::digest::digest(&ring::digest::SHA256, public).as_ref()[..8])
}

impl SigningKey {
    /// Loads the key from `dir`, creating it (0600) on first use.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        Self::load_or_create_at(&dir.join(SIGNING_KEY_FILE))
    }

    /// Loads the key from the file `path`, creating it (0600) when there is none.
    pub fn load_or_create_at(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let pkcs8 = if path.exists() {
            strait_ca::files::read_secret(path)
                .with_context(|| format!("reading the distribution key {}", path.display()))?
        } else {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| anyhow::anyhow!("cannot generate the distribution key"))?;
            strait_ca::files::write_atomic(path, doc.as_ref(), 0o600)?;
            doc.as_ref().to_vec()
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 key: {e}", path.display()))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    /// A fresh key that lives only in memory (tests, benchmarks).
    pub fn ephemeral() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pair = Ed25519KeyPair::generate_pkcs8(&rng)
            .ok()
            .and_then(|d| Ed25519KeyPair::from_pkcs8(d.as_ref()).ok())
            .expect("ring generates Ed25519 keys");
        let key_id = key_id(pair.public_key().as_ref());
        Self { pair, key_id }
    }

    /// The public half, as handed to proxies.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.pair.public_key().as_ref().to_vec())
    }

    pub fn sign(&self, payload: &VersionPayload) -> SignedVersion {
        let bytes = serde_json::to_vec(payload).unwrap_or_default();
        self.sign_bytes(bytes)
    }

    /// Signs payload bytes as they are (tests use this to sign malformed payloads).
    pub fn sign_bytes(&self, payload: Vec<u8>) -> SignedVersion {
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&payload);
        SignedVersion {
            key_id: self.key_id.clone(),
            signature: self.pair.sign(&msg).as_ref().to_vec(),
            payload,
        }
    }
}

/// The distribution key's public half (raw 32-byte Ed25519; base64 on the wire and on disk).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(Vec<u8>);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PublicKey {
    pub fn parse(b64_text: &str) -> Result<Self, String> {
        let raw = b64()
            .decode(b64_text.trim().as_bytes())
            .map_err(|e| format!("distribution key: {e}"))?;
        if raw.len() != 32 {
            return Err(format!(
                "distribution key: {} bytes, an Ed25519 key has 32",
                raw.len()
            ));
        }
        Ok(Self(raw))
    }

    pub fn to_base64(&self) -> String {
        b64().encode(&self.0)
    }

    pub fn key_id(&self) -> String {
        key_id(&self.0)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Why a proxy refused a version. Each is logged and sent back as the NACK's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unsigned version (no signature): refused")]
    Unsigned,
    #[error("signature does not verify with the distribution key {expected_key}: tampered or signed by another key")]
    BadSignature { expected_key: String },
    #[error("signed by distribution key {key_id}, which this proxy does not trust (it trusts {trusted})")]
    UnknownKey { key_id: String, trusted: String },
    #[error("malformed version payload: {0}")]
    Malformed(String),
    #[error("version {got} is for trust domain {domain}, not ours")]
    WrongTrustDomain { got: u64, domain: String },
    #[error("version {got} is older than version {have} already applied (rollback refused)")]
    Older { have: u64, got: u64 },
    #[error("version {number} differs from the version {number} already applied (same number, other content)")]
    Conflict { number: u64 },
    #[error("content hash mismatch in version {number}")]
    HashMismatch { number: u64 },
    #[error("policy bundle of version {number} does not compile: {reason}")]
    BadPolicy { number: u64, reason: String },
}

/// What a proxy checks before applying: signature (by one of the keys it trusts), trust domain, monotonic
/// number, content hash.
///
/// The trusted keys are the key that signed the version in force plus the next key that version announced
/// (or, before any version, what the control plane handed over at join or renewal). Applying a version
/// replaces them ([`Verifier::after`]), so a key is dropped as soon as a version signed by its successor is
/// applied, and versions signed by the retired key are refused from then on.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<PublicKey>,
    trust_domain: String,
}

/// Result of a check: a version to apply, or the one already applied (idempotent re-send).
#[derive(Debug)]
pub enum Checked {
    New(Box<VersionPayload>),
    AlreadyApplied { number: u64, content_hash: String },
}

impl Verifier {
    pub fn new(key: PublicKey, trust_domain: impl Into<String>) -> Self {
        Self::with_keys([key], trust_domain)
    }

    /// A verifier trusting each of `keys` (duplicates are kept once).
    pub fn with_keys(
        keys: impl IntoIterator<Item = PublicKey>,
        trust_domain: impl Into<String>,
    ) -> Self {
        let mut v = Self {
            keys: Vec::new(),
            trust_domain: trust_domain.into(),
        };
        v.trust(keys);
        v
    }

    /// Adds keys the control plane handed over on an authenticated channel (join, renewal, or the node's
    /// key query after a version signed by an unknown key).
    pub fn trust(&mut self, keys: impl IntoIterator<Item = PublicKey>) {
        for k in keys {
            if !self.keys.contains(&k) {
                self.keys.push(k);
            }
        }
    }

    /// The keys trusted now, in order.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The key ids trusted now, in order.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(PublicKey::key_id).collect()
    }

    /// The verifier once `v` (which [`check`](Self::check) accepted) is in force: the key that signed it
    /// and the next key it announces.
    pub fn after(&self, v: &SignedVersion, payload: &VersionPayload) -> Self {
        let signer = self.keys.iter().find(|k| k.key_id() == v.key_id).cloned();
        Self::with_keys(
            signer.into_iter().chain(payload.next_key.clone()),
            self.trust_domain.clone(),
        )
    }

    /// Checks `v` against the version currently applied (`have`: number and content hash).
    pub fn check(&self, v: &SignedVersion, have: Option<(u64, &str)>) -> Result<Checked, Refusal> {
        if v.signature.is_empty() {
            return Err(Refusal::Unsigned);
        }
        // The envelope's key id only chooses which trusted key to try; the signature decides.
        let key = self
            .keys
            .iter()
            .find(|k| k.key_id() == v.key_id)
            .ok_or_else(|| Refusal::UnknownKey {
                key_id: v.key_id.chars().take(64).collect(),
                trusted: self.key_ids().join(", "),
            })?;
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&v.payload);
        UnparsedPublicKey::new(&ED25519, &key.0)
            .verify(&msg, &v.signature)
            .map_err(|_| Refusal::BadSignature {
                expected_key: key.key_id(),
            })?;
        let p: VersionPayload =
            serde_json::from_slice(&v.payload).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if p.trust_domain != self.trust_domain {
            return Err(Refusal::WrongTrustDomain {
                got: p.number,
                domain: p.trust_domain,
            });
        }
        if let Some((number, hash)) = have {
            if p.number < number {
                return Err(Refusal::Older {
                    have: number,
                    got: p.number,
                });
            }
            if p.number == number {
                return if p.content_hash == hash {
                    Ok(Checked::AlreadyApplied {
                        number,
                        content_hash: p.content_hash,
                    })
                } else {
                    Err(Refusal::Conflict { number })
                };
            }
        }
        if VersionPayload::compute_hash(
            &p.directory,
            &p.bundle,
            p.next_key.as_ref(),
            p.trust.as_ref(),
        ) != p.content_hash
        {
            return Err(Refusal::HashMismatch { number: p.number });
        }
        Ok(Checked::New(Box::new(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(number: u64) -> VersionPayload {
        let wf = strait_policy::workflow::Workflow::from_yaml(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {name: t}\ntrustDomain: td\nactors:\n  - {name: a, services: [{name: a}]}\n  - {name: b, services: [{name: b}]}\nsteps:\n  - {from: a, to: b, methods: [POST]}\n",
        )
        .unwrap();
        let bundle = Bundle::from_workflows(&[(&wf, &[])], false).unwrap();
        let directory = Directory {
            revision: number,
            ..Default::default()
        };
        VersionPayload {
            trust_domain: "td".into(),
            number,
            created_at_ms: 0,
            content_hash: VersionPayload::compute_hash(&directory, &bundle, None, None),
            directory,
            bundle,
            next_key: None,
            trust: None,
        }
    }

    #[test]
    fn accepts_a_signed_newer_version_and_refuses_every_forgery() {
        let key = SigningKey::ephemeral();
        let v = Verifier::new(key.public(), "td");
        let good = key.sign(&payload(5));
        assert!(matches!(v.check(&good, None), Ok(Checked::New(_))));
        assert!(matches!(
            v.check(&good, Some((4, "x"))),
            Ok(Checked::New(_))
        ));

        // Unsigned.
        let mut unsigned = good.clone();
        unsigned.signature.clear();
        assert_eq!(v.check(&unsigned, None).unwrap_err(), Refusal::Unsigned);

        // Tampered payload (one byte of the policy changed), signature left as it was.
        let mut tampered = good.clone();
        let text = String::from_utf8(tampered.payload.clone()).unwrap();
        tampered.payload = text.replacen("POST", "GETS", 1).into_bytes();
        assert_ne!(tampered.payload, good.payload);
        assert!(matches!(
            v.check(&tampered, None),
            Err(Refusal::BadSignature { .. })
        ));

        // Signed by another key, named as such or claiming the trusted key's id.
        let mut other = SigningKey::ephemeral().sign(&payload(6));
        assert!(matches!(
            v.check(&other, None),
            Err(Refusal::UnknownKey { .. })
        ));
        other.key_id = key.public().key_id();
        assert!(matches!(
            v.check(&other, None),
            Err(Refusal::BadSignature { .. })
        ));

        // Replay of an older version.
        let hash = payload(5).content_hash;
        assert_eq!(
            v.check(&key.sign(&payload(3)), Some((5, &hash)))
                .unwrap_err(),
            Refusal::Older { have: 5, got: 3 }
        );
        // The same version again is idempotent; the same number with other content is refused.
        assert!(matches!(
            v.check(&good, Some((5, &hash))),
            Ok(Checked::AlreadyApplied { number: 5, .. })
        ));
        assert_eq!(
            v.check(&good, Some((5, "other"))).unwrap_err(),
            Refusal::Conflict { number: 5 }
        );

        // Signed, but the hash does not match the content.
        let mut p = payload(7);
        p.content_hash = "0".repeat(64);
        assert_eq!(
            v.check(&key.sign(&p), None).unwrap_err(),
            Refusal::HashMismatch { number: 7 }
        );

        // Signed with egress through the gateways turned on after the hash was taken (the hash covers it).
        let mut p = payload(7);
        p.directory.egress_through_gateways = true;
        assert_eq!(
            v.check(&key.sign(&p), None).unwrap_err(),
            Refusal::HashMismatch { number: 7 }
        );

        // Signed, for another trust domain.
        let mut p = payload(8);
        p.trust_domain = "other".into();
        assert!(matches!(
            v.check(&key.sign(&p), None),
            Err(Refusal::WrongTrustDomain { .. })
        ));

        // Signed garbage.
        assert!(matches!(
            v.check(&key.sign_bytes(b"{not json".to_vec()), None),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn a_key_announced_under_the_current_one_takes_over_and_the_old_one_is_dropped() {
        let old = SigningKey::ephemeral();
        let new = SigningKey::ephemeral();
        let v = Verifier::new(old.public(), "td");
        // Before the announcement, the new key is not trusted.
        assert!(matches!(
            v.check(&new.sign(&payload(2)), None),
            Err(Refusal::UnknownKey { .. })
        ));
        // An announcement signed by the current key.
        let mut p = payload(2);
        p.next_key = Some(new.public());
        p.content_hash = VersionPayload::compute_hash(
            &p.directory,
            &p.bundle,
            p.next_key.as_ref(),
            p.trust.as_ref(),
        );
        assert_ne!(p.content_hash, payload(2).content_hash);
        let announced = old.sign(&p);
        let Ok(Checked::New(applied)) = v.check(&announced, None) else {
            panic!("announcement refused")
        };
        let v = v.after(&announced, &applied);
        assert_eq!(v.key_ids(), [old.public().key_id(), new.public().key_id()]);
        // Both are accepted while the rotation is under way.
        assert!(v.check(&old.sign(&payload(3)), Some((2, "h"))).is_ok());
        let by_new = new.sign(&payload(3));
        let Ok(Checked::New(applied)) = v.check(&by_new, Some((2, "h"))) else {
            panic!("version signed by the announced key refused")
        };
        // Once a version signed by the new key is in force, the old key is no longer trusted.
        let v = v.after(&by_new, &applied);
        assert_eq!(v.key_ids(), [new.public().key_id()]);
        assert!(matches!(
            v.check(&old.sign(&payload(4)), Some((3, "h"))),
            Err(Refusal::UnknownKey { .. })
        ));
        // An announced key whose hash does not cover it (announcement smuggled into a signed payload
        // whose hash predates it) is refused.
        let mut p = payload(5);
        p.next_key = Some(SigningKey::ephemeral().public());
        assert!(matches!(
            v.check(&new.sign(&p), None),
            Err(Refusal::HashMismatch { .. })
        ));
    }

    #[test]
    fn the_key_persists_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = SigningKey::load_or_create(dir.path()).unwrap();
        let b = SigningKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public(), b.public());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            PublicKey::parse(&a.public().to_base64()).unwrap(),
            a.public()
        );
    }
}
