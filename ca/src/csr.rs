//! Certificate signing requests, checked before the CA looks at them.
//!
//! Only the CSR's public key is used. Its subject, SANs and requested extensions are ignored on purpose: the
//! identity in an SVID comes from the caller's authorization (a node's registry entry, an operator's command),
//! never from what the requester wrote in its own CSR.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::cert::KeyAlgorithm;

/// CSRs for the keys Strait accepts are a few hundred bytes; this bound keeps a hostile peer from making the
/// CA parse megabytes.
pub const MAX_CSR_DER: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("not a certificate signing request: {0}")]
    Malformed(String),
    #[error("the CSR's signature does not match its public key (tampered or corrupt CSR)")]
    BadSignature,
    #[error("CSR key type {0} is not accepted; use ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
    #[error("the CSR is {0} bytes; at most {MAX_CSR_DER} are accepted")]
    TooLarge(usize),
}

/// A CSR whose self-signature was verified and whose key type is allowed. Holds only what issuance needs.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    public_key: rcgen::SubjectPublicKeyInfo,
    algorithm: KeyAlgorithm,
    spki_der: Vec<u8>,
}

impl CheckedCsr {
    /// Parses a PEM CSR (`-----BEGIN CERTIFICATE REQUEST-----`).
    pub fn from_pem(pem: &str) -> Result<Self, CsrError> {
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            CsrError::Malformed(match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no \"-----BEGIN CERTIFICATE REQUEST-----\" block found".into()
                }
                other => other.to_string(),
            })
        })?;
        Self::from_der(der.as_ref())
    }

    /// Parses a DER CSR: checks size, structure, self-signature and key type.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_DER {
            return Err(CsrError::TooLarge(der.len()));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
        }
        let spki = &csr.certification_request_info.subject_pki;
        let algorithm = KeyAlgorithm::of(spki);
        if !algorithm.allowed_for_svid() {
            return Err(CsrError::UnsupportedKey(algorithm.to_string()));
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|e| CsrError::Malformed(format!("public key: {e}")))?;
        Ok(Self {
            public_key,
            algorithm,
            spki_der: spki.raw.to_vec(),
        })
    }

    pub fn algorithm(&self) -> &KeyAlgorithm {
        &self.algorithm
    }

    /// The DER SubjectPublicKeyInfo, e.g. to check that an issued certificate carries this key.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    pub(crate) fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }
}

/// Generates an ECDSA P-256 key and a CSR for it, for a process that will use the key itself (a proxy for
/// its workloads, the control plane for its own serving certificate). The CSR carries no names: the CA
/// decides the identity.
pub fn generate_key_and_csr(
) -> Result<(rustls::pki_types::PrivateKeyDer<'static>, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((key_der, csr.der().to_vec()))
}
