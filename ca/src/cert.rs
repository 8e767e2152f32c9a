//! Reading certificates: PEM decoding, key algorithms, and the X.509-SVID shape rules that both the
//! verifiers and `strait ca inspect` apply.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// A public key algorithm, as far as Strait cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa {
        bits: usize,
    },
    /// Anything else, by OID (and curve OID for other EC curves).
    Other(String),
}

impl KeyAlgorithm {
    pub fn of(spki: &SubjectPublicKeyInfo<'_>) -> Self {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            return match curve {
                Some(c) if c == OID_EC_P256 => KeyAlgorithm::EcdsaP256,
                Some(c) if c == OID_NIST_EC_P384 => KeyAlgorithm::EcdsaP384,
                Some(c) => KeyAlgorithm::Other(format!("EC curve {c}")),
                None => KeyAlgorithm::Other("EC without a named curve".into()),
            };
        }
        if *alg == OID_SIG_ED25519 {
            return KeyAlgorithm::Ed25519;
        }
        if *alg == OID_PKCS1_RSAENCRYPTION {
            let bits = match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(k)) => k.key_size(),
                _ => 0,
            };
            return KeyAlgorithm::Rsa { bits };
        }
        KeyAlgorithm::Other(alg.to_id_string())
    }

    /// Keys Strait accepts in CSRs for SVIDs: the ones every TLS 1.3 stack verifies quickly.
    pub fn allowed_for_svid(&self) -> bool {
        matches!(
            self,
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 | KeyAlgorithm::Ed25519
        )
    }
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyAlgorithm::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyAlgorithm::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyAlgorithm::Ed25519 => f.write_str("Ed25519"),
            KeyAlgorithm::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyAlgorithm::Other(s) => write!(f, "unsupported key ({s})"),
        }
    }
}

/// Why a PEM input could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("no {0} found (expected a PEM block such as \"-----BEGIN {1}-----\")")]
    Missing(&'static str, &'static str),
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// All certificates in a PEM text, in order; at least one.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Missing("certificate", "CERTIFICATE"));
    }
    Ok(certs)
}

/// Encodes DER certificates as concatenated PEM blocks.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|c| pem_encode("CERTIFICATE", c.as_ref()))
        .collect()
}

/// Encodes DER bytes as one PEM block with the given label.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Parses one DER certificate, refusing trailing bytes.
pub fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("not a valid X.509 certificate: {e}")),
    }
}

pub(crate) fn asn1_to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// How a leaf certificate fails the X.509-SVID rules, after its chain was validated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidShapeError {
    #[error("certificate cannot be parsed: {0}")]
    Unparseable(String),
    #[error("an SVID must carry exactly one URI SAN, this one has {0}")]
    UriSanCount(usize),
    #[error("the URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    NotSpiffe { uri: String, reason: SpiffeIdError },
    #[error("a CA certificate (cA=true) cannot be used as a workload or node certificate")]
    CaAsLeaf,
}

/// Extracts the SPIFFE ID of a leaf certificate, enforcing the X.509-SVID rules the chain validator does
/// not know about: exactly one URI SAN, which is a valid SPIFFE ID, on a non-CA certificate.
pub fn svid_id(leaf_der: &[u8]) -> Result<SpiffeId, SvidShapeError> {
    let cert = parse_cert(leaf_der).map_err(SvidShapeError::Unparseable)?;
    svid_id_of(&cert)
}

pub(crate) fn svid_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidShapeError> {
    if cert.is_ca() {
        return Err(SvidShapeError::CaAsLeaf);
    }
    let uris = uri_sans(cert).map_err(SvidShapeError::Unparseable)?;
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|reason| SvidShapeError::NotSpiffe {
            uri: (*uri).to_owned(),
            reason,
        }),
        other => Err(SvidShapeError::UriSanCount(other.len())),
    }
}

pub(crate) fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// What `strait ca inspect` shows about one certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub uri_sans: Vec<String>,
    /// The SPIFFE ID when the certificate is a well-formed SVID, otherwise why it is not.
    pub spiffe_id: Result<SpiffeId, String>,
    pub is_ca: bool,
    pub key: String,
    #[serde(with = "unix_secs")]
    pub not_before: SystemTime,
    #[serde(with = "unix_secs")]
    pub not_after: SystemTime,
}

impl CertSummary {
    pub fn of(der: &[u8]) -> Result<Self, String> {
        let cert = parse_cert(der)?;
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            uri_sans: uri_sans(&cert)?.into_iter().map(str::to_owned).collect(),
            spiffe_id: svid_id_of(&cert).map_err(|e| e.to_string()),
            is_ca: cert.is_ca(),
            key: KeyAlgorithm::of(cert.public_key()).to_string(),
            not_before: asn1_to_system_time(cert.validity().not_before),
            not_after: asn1_to_system_time(cert.validity().not_after),
        })
    }
}

mod unix_secs {
    use std::time::{SystemTime, UNIX_EPOCH};
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        s.serialize_i64(secs)
    }
}
