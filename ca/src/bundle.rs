//! Trust bundles: the CA certificates that peers of one trust domain are validated against, as PEM and as
//! a SPIFFE bundle (a JWK set whose keys have `use: x509-svid`, SPIFFE Trust Domain and Bundle §4).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rustls::pki_types::{CertificateDer, TrustAnchor};
use x509_parser::public_key::PublicKey;

use crate::cert::{certs_from_pem, certs_to_pem, parse_cert, KeyAlgorithm, PemError};
use crate::spiffe::TrustDomain;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("certificate {index} of the bundle cannot be a trust anchor: {reason}")]
    BadAnchor { index: usize, reason: String },
    #[error("not a SPIFFE bundle: {0}")]
    Spiffe(String),
}

/// A SPIFFE bundle as a bundle endpoint serves it: the X.509 anchors and the two SPIFFE members.
#[derive(Debug, Clone)]
pub struct SpiffeBundle {
    pub bundle: TrustBundle,
    /// Orders updates of one trust domain (absent: 0).
    pub sequence: u64,
    /// How often the publisher asks to be polled, in seconds (absent: `None`, the consumer's default).
    pub refresh_hint_secs: Option<u64>,
}

/// Larger SPIFFE bundles are refused: a trust domain has a handful of roots, not thousands.
pub const MAX_SPIFFE_BUNDLE_BYTES: usize = 1 << 20;
/// The most keys a SPIFFE bundle may hold.
pub const MAX_SPIFFE_BUNDLE_KEYS: usize = 64;

/// A trust bundle that can be replaced while verifiers hold it: during a CA rotation the anchors change
/// (old + new, then new only) under live listeners; each handshake reads the bundle in force.
pub type SharedBundle = arc_swap::ArcSwap<TrustBundle>;

/// The trust anchors of one trust domain.
///
/// The parsed webpki anchors are computed once here, because the verifiers use them on every handshake.
///
/// A bundle may carry the bundles of federated trust domains beside its own ([`TrustBundle::federate`]):
/// a peer is then verified against the roots of the trust domain its URI SAN names, and only those (never
/// merged: a partner's CA cannot vouch for our IDs, nor for a third domain's).
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    federated: Arc<BTreeMap<TrustDomain, TrustBundle>>,
}

impl TrustBundle {
    pub fn new(
        trust_domain: TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, c)| {
                parse_cert(c).map_err(|reason| BundleError::BadAnchor { index, reason })?;
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadAnchor {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain,
            certs,
            anchors,
            federated: Arc::default(),
        })
    }

    /// This bundle with `partners` as the federated trust domains (replacing any it had). A partner of this
    /// bundle's own trust domain, and a partner's own partners, are left out.
    pub fn federate(&self, partners: impl IntoIterator<Item = TrustBundle>) -> Self {
        let federated = partners
            .into_iter()
            .filter(|p| p.trust_domain != self.trust_domain)
            .map(|p| {
                let bare = TrustBundle {
                    federated: Arc::default(),
                    ..p
                };
                (bare.trust_domain.clone(), bare)
            })
            .collect();
        TrustBundle {
            federated: Arc::new(federated),
            ..self.clone()
        }
    }

    /// The federated trust domains' bundles.
    pub fn federated(&self) -> impl Iterator<Item = &TrustBundle> {
        self.federated.values()
    }

    /// The bundle that vouches for IDs of `td`: this one for its own trust domain, a federated one, or
    /// `None` (not federated).
    pub fn for_domain(&self, td: &str) -> Option<&TrustBundle> {
        if self.trust_domain.as_str() == td {
            return Some(self);
        }
        self.federated
            .iter()
            .find(|(k, _)| k.as_str() == td)
            .map(|(_, b)| b)
    }

    /// SHA-256 (hex) over the federated trust domains and their bundles' fingerprints, in order; empty
    /// without federation. What the control plane announces and proxies compare.
    pub fn federation_fingerprint(&self) -> String {
        if self.federated.is_empty() {
            return String::new();
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for (td, b) in self.federated.iter() {
            ctx.update(td.as_str().as_bytes());
            ctx.update(b"\0");
            ctx.update(b.fingerprint().as_bytes());
            ctx.update(b"\0");
        }
        hex(ctx.finish().as_ref())
    }

    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        Self::new(trust_domain, certs_from_pem(pem)?)
    }

    /// A bundle whose trust domain is read from its first anchor's URI SAN (`spiffe://<td>`, which Strait's
    /// CA certificates carry): for a node given only the bundle file, as in Kubernetes mode.
    pub fn from_pem_self_described(pem: &str) -> Result<Self, BundleError> {
        let certs = certs_from_pem(pem)?;
        let bad = |reason: String| BundleError::BadAnchor { index: 0, reason };
        let first = certs
            .first()
            .ok_or_else(|| bad("the bundle is empty".into()))?;
        let cert = parse_cert(first).map_err(bad)?;
        let sans = crate::cert::uri_sans(&cert).map_err(bad)?;
        let td = sans
            .iter()
            .find_map(|u| TrustDomain::new(u).ok())
            .ok_or_else(|| {
                bad("no spiffe://<trust-domain> URI SAN names the trust domain".into())
            })?;
        Self::new(td, certs)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.certs)
    }

    /// SHA-256 (hex) over the anchors' DER, in order: what control plane and proxies compare to know
    /// whether a proxy holds the bundle in force.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for c in &self.certs {
            ctx.update(&(c.len() as u32).to_be_bytes());
            ctx.update(c.as_ref());
        }
        hex(ctx.finish().as_ref())
    }

    /// The SPIFFE bundle (JWKS) form. `sequence` lets consumers order updates of the same trust domain;
    /// `refresh_hint_secs` tells them how often to poll.
    pub fn to_spiffe_json(&self, sequence: u64, refresh_hint_secs: u64) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self.certs.iter().filter_map(|c| jwk_for(c)).collect();
        serde_json::json!({
            "keys": keys,
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        })
    }
}

impl SpiffeBundle {
    /// Parses a SPIFFE bundle (SPIFFE Trust Domain and Bundle §4) for `trust_domain`, which the bundle
    /// itself does not name: the relationship configured for it does. Only `x509-svid` keys are taken
    /// (JWT keys and unknown uses are skipped, as §4.2.1 says); each must carry exactly one certificate in
    /// `x5c`, a CA certificate whose public key is the one the JWK states. A bundle without any X.509 key
    /// is refused: it would silently mean "trust nothing of that domain".
    pub fn parse(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        let bad = |m: String| BundleError::Spiffe(m);
        if bytes.len() > MAX_SPIFFE_BUNDLE_BYTES {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_SPIFFE_BUNDLE_BYTES} allowed",
                bytes.len()
            )));
        }
        let doc: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let keys = obj
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| bad("no \"keys\" array".into()))?;
        if keys.len() > MAX_SPIFFE_BUNDLE_KEYS {
            return Err(bad(format!(
                "{} keys, more than the {MAX_SPIFFE_BUNDLE_KEYS} allowed",
                keys.len()
            )));
        }
        let number = |name: &str| -> Result<Option<u64>, BundleError> {
            match obj.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("\"{name}\" is not a non-negative integer"))),
            }
        };
        let sequence = number("spiffe_sequence")?.unwrap_or(0);
        let refresh_hint_secs = number("spiffe_refresh_hint")?;
        let mut certs = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if key.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
                continue;
            }
            let x5c = key
                .get("x5c")
                .and_then(|x| x.as_array())
                .ok_or_else(|| bad(format!("key {i}: an x509-svid key without \"x5c\"")))?;
            let [only] = x5c.as_slice() else {
                return Err(bad(format!(
                    "key {i}: \"x5c\" must hold exactly one certificate, not {}",
                    x5c.len()
                )));
            };
            let der = only
                .as_str()
                .and_then(|b| STANDARD.decode(b).ok())
                .ok_or_else(|| bad(format!("key {i}: \"x5c\" is not base64 DER")))?;
            let der = CertificateDer::from(der);
            let stated = jwk_for(&der)
                .ok_or_else(|| bad(format!("key {i}: a certificate with an unsupported key")))?;
            for member in ["kty", "crv", "x", "y", "n", "e"] {
                if key.get(member) != stated.get(member) {
                    return Err(bad(format!(
                        "key {i}: \"{member}\" does not match the certificate in \"x5c\""
                    )));
                }
            }
            let cert = parse_cert(&der).map_err(|e| bad(format!("key {i}: {e}")))?;
            if !cert.is_ca() {
                return Err(bad(format!("key {i}: the certificate is not a CA")));
            }
            certs.push(der);
        }
        if certs.is_empty() {
            return Err(bad("no x509-svid key: the bundle has no X.509 root".into()));
        }
        Ok(Self {
            bundle: TrustBundle::new(trust_domain, certs)?,
            sequence,
            refresh_hint_secs,
        })
    }
}

/// One JWK for a trust anchor. Certificates whose key type has no JWK form are left out rather than
/// encoded wrongly (they still appear in the PEM bundle).
fn jwk_for(der: &CertificateDer<'_>) -> Option<serde_json::Value> {
    let cert = parse_cert(der).ok()?;
    let spki = cert.public_key();
    let x5c = [STANDARD.encode(der.as_ref())];
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let mut jwk = match (KeyAlgorithm::of(spki), spki.parsed().ok()?) {
        (alg @ (KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384), PublicKey::EC(point)) => {
            // Uncompressed point: 0x04 || X || Y, both coordinates of equal length.
            let data = point.data();
            let coord = (data.len().checked_sub(1)?) / 2;
            if data.first() != Some(&4) || data.len() != 1 + 2 * coord {
                return None;
            }
            let crv = if alg == KeyAlgorithm::EcdsaP256 {
                "P-256"
            } else {
                "P-384"
            };
            serde_json::json!({
                "kty": "EC", "crv": crv,
                "x": b64(&data[1..1 + coord]), "y": b64(&data[1 + coord..]),
            })
        }
        (KeyAlgorithm::Rsa { .. }, PublicKey::RSA(rsa)) => serde_json::json!({
            "kty": "RSA",
            "n": b64(strip_leading_zeros(rsa.modulus)),
            "e": b64(strip_leading_zeros(rsa.exponent)),
        }),
        (KeyAlgorithm::Ed25519, _) => serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": b64(&spki.subject_public_key.data),
        }),
        _ => return None,
    };
    jwk["use"] = "x509-svid".into();
    jwk["x5c"] = serde_json::json!(x5c);
    Some(jwk)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}
