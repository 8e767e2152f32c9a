//! The certificate authority: a generated ECDSA P-256 root, or an operator's own CA certificate and key
//! (root or intermediate, so that a company PKI can sit above Strait), and X.509-SVID issuance from CSRs.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::X509Certificate;

use crate::bundle::{BundleError, TrustBundle};
use crate::cert::{
    asn1_to_system_time, certs_from_pem, certs_to_pem, parse_cert, uri_sans, PemError,
};
use crate::csr::CheckedCsr;
use crate::files::{self, FileError, PUBLIC_MODE, SECRET_MODE};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::tls::Svid;
use crate::verify::{unix_time, verify_peer, PeerIdMatcher, PeerRole};

/// Default lifetime of an SVID (DESIGN.md: 24 h, renewed at half life).
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a generated root.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far `notBefore` is set in the past, so that a peer whose clock is slightly behind the CA's does not
/// refuse a certificate issued a moment ago.
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(30);
/// The longest SVID lifetime the CA will sign; SVIDs are meant to be short-lived.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// File names inside a CA directory.
pub mod layout {
    pub const META: &str = "ca.json";
    pub const CERT: &str = "ca-cert.pem";
    pub const KEY: &str = "ca-key.pem";
    /// Certificates between the signing certificate and the trust anchor (may be empty).
    pub const CHAIN: &str = "ca-chain.pem";
    pub const BUNDLE: &str = "bundle.pem";
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{0} holds no Strait CA (no {meta}); create one with `strait ca init --dir {0}`", meta = layout::META)]
    NotFound(String),
    #[error("{0} already holds a CA; refusing to overwrite its key (choose another --dir)")]
    AlreadyExists(String),
    #[error("CA metadata {path} is invalid: {reason}")]
    BadMeta { path: String, reason: String },
    #[error("the private key cannot be used: {0}")]
    BadKey(String),
    #[error("the private key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate is not usable as a CA: {0}")]
    NotACa(String),
    #[error("the CA chain is broken: {0}")]
    BadChain(String),
    #[error("the CA certificate names trust domain {found}, not {expected}")]
    TrustDomainMismatch { expected: String, found: String },
    #[error("the CA is not valid at this time (valid {not_before} to {not_after}); rotate or re-import it")]
    CaNotValid {
        not_before: humantime::Rfc3339Timestamp,
        not_after: humantime::Rfc3339Timestamp,
    },
    #[error("{id} is outside this CA's trust domain {trust_domain}")]
    IdOutsideTrustDomain { id: SpiffeId, trust_domain: String },
    #[error("the requested lifetime must be between 1 second and {max_days} days")]
    BadTtl { max_days: u64 },
    #[error("the imported CA failed its self-test (an SVID it signs does not verify): {0}")]
    SelfTest(String),
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// A signed X.509-SVID, without the key (the requester holds that).
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub id: SpiffeId,
    /// Serial number, big-endian, positive.
    pub serial: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Leaf first, then the certificates up to (not including) the trust anchor.
    pub chain: Vec<CertificateDer<'static>>,
}

impl IssuedSvid {
    pub fn chain_pem(&self) -> String {
        certs_to_pem(&self.chain)
    }

    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    format: u32,
    trust_domain: TrustDomain,
}

/// A CA able to sign SVIDs for one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    signing_cert: CertificateDer<'static>,
    /// Certificates returned after every leaf: the signing certificate and intermediates, unless the
    /// signing certificate is itself the trust anchor.
    chain_to_anchor: Vec<CertificateDer<'static>>,
    /// Certificates strictly between the signing certificate and the anchor (persisted as `ca-chain.pem`).
    upper_chain: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    not_before: SystemTime,
    not_after: SystemTime,
    /// The parameters a root generated here signed itself with, so that another CA can certify the same
    /// name and key ([`cross_certify`](Self::cross_certify)); `None` for a CA loaded from files.
    root_params: Option<CertificateParams>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

/// A random positive serial of 128 bits (RFC 5280 allows up to 20 octets; CA/B Forum asks for ≥ 64 random
/// bits). rcgen would otherwise derive the serial from the public key, which repeats on renewal.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::BadKey("the system random generator failed".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x40; // and a full 16 octets long, so every serial has the same size
    Ok(SerialNumber::from_slice(&bytes))
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root for `trust_domain`, valid from `now` for `validity`.
    pub fn generate(
        trust_domain: TrustDomain,
        validity: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Strait");
        let short_serial: String = serial.to_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        dn.push(DnType::CommonName, format!("Strait root CA {short_serial}"));
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        // Path length 0: this root signs only leaves. An operator who wants intermediates imports them.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // X509-SVID §4.1: a signing certificate may carry the trust domain's own SPIFFE ID.
        params.subject_alt_names =
            vec![SanType::URI(trust_domain.id_string().try_into().map_err(
                |e| CaError::BadKey(format!("trust domain as URI: {e}")),
            )?)];
        params.not_before = (now - CLOCK_SKEW_BACKDATE).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key)?;
        let der = cert.der().clone();
        let bundle = TrustBundle::new(trust_domain.clone(), vec![der.clone()])?;
        Ok(Self {
            trust_domain,
            issuer: Issuer::new(params.clone(), key),
            signing_cert: der,
            chain_to_anchor: Vec::new(),
            upper_chain: Vec::new(),
            bundle,
            not_before: now - CLOCK_SKEW_BACKDATE,
            not_after: now + validity,
            root_params: Some(params),
        })
    }

    /// Loads an operator's CA: `cert_pem` holds the signing certificate (optionally followed by its chain),
    /// `key_pem` its private key, `chain_pem` the certificates above it, ending at the trust anchor. The last
    /// certificate becomes the trust anchor (the signing certificate itself when there is no chain). The CA
    /// must be valid at `now`; the import is proven by signing and verifying a throw-away SVID.
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let mut all = certs_from_pem(cert_pem)?;
        if let Some(chain) = chain_pem {
            all.extend(certs_from_pem(chain)?);
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadKey(e.to_string()))?;

        let parsed = all
            .iter()
            .enumerate()
            .map(|(i, der)| {
                parse_cert(der).map_err(|e| CaError::BadChain(format!("certificate {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signing = &parsed[0];
        check_is_ca(signing)?;
        if key.subject_public_key_info() != signing.public_key().raw {
            return Err(CaError::KeyMismatch);
        }
        check_trust_domain_san(signing, &trust_domain)?;
        check_chain_order(&parsed)?;
        let not_before = asn1_to_system_time(signing.validity().not_before);
        let not_after = asn1_to_system_time(signing.validity().not_after);
        drop(parsed);

        let signing_cert = all[0].clone();
        let anchor = all[all.len() - 1].clone();
        let chain_to_anchor = all[..all.len() - 1].to_vec();
        let upper_chain = if all.len() > 2 {
            all[1..all.len() - 1].to_vec()
        } else {
            Vec::new()
        };
        let issuer = Issuer::from_ca_cert_der(&signing_cert, key)
            .map_err(|e| CaError::NotACa(e.to_string()))?;
        let ca = Self {
            bundle: TrustBundle::new(trust_domain.clone(), vec![anchor])?,
            trust_domain,
            issuer,
            signing_cert,
            chain_to_anchor,
            upper_chain,
            not_before,
            not_after,
            root_params: None,
        };
        ca.check_valid_at(now)?;
        ca.self_test(now)?;
        Ok(ca)
    }

    /// Signs a throw-away SVID and verifies it as a peer would. This catches an imported CA whose names,
    /// key usages or chain would make every SVID it signs unverifiable, at import time rather than at the
    /// first handshake.
    fn self_test(&self, now: SystemTime) -> Result<(), CaError> {
        let (_key, csr_der) = crate::csr::generate_key_and_csr()?;
        let csr = CheckedCsr::from_der(&csr_der).map_err(|e| CaError::SelfTest(e.to_string()))?;
        let id = SpiffeId::from_segments(&self.trust_domain, ["strait", "ca-self-test"])
            .map_err(|e| CaError::SelfTest(e.to_string()))?;
        let svid = self.issue(&csr, &id, Duration::from_secs(60), now)?;
        for role in [PeerRole::Client, PeerRole::Server] {
            verify_peer(
                &self.bundle,
                &PeerIdMatcher::Exact(id.clone()),
                &svid.chain[0],
                &svid.chain[1..],
                unix_time(now),
                role,
            )
            .map_err(|e| CaError::SelfTest(e.to_string()))?;
        }
        Ok(())
    }

    fn check_valid_at(&self, now: SystemTime) -> Result<(), CaError> {
        if now < self.not_before || now >= self.not_after {
            return Err(CaError::CaNotValid {
                not_before: humantime::format_rfc3339_seconds(self.not_before),
                not_after: humantime::format_rfc3339_seconds(self.not_after),
            });
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn signing_cert(&self) -> &CertificateDer<'static> {
        &self.signing_cert
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs an X.509-SVID for `id` over the key in `csr`.
    ///
    /// `id` comes from the caller's authorization decision; nothing in the CSR except its public key is
    /// used. The lifetime is `ttl`, backdated by [`CLOCK_SKEW_BACKDATE`] and clamped to the CA's validity.
    pub fn issue(
        &self,
        csr: &CheckedCsr,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::IdOutsideTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_SVID_TTL {
            return Err(CaError::BadTtl {
                max_days: MAX_SVID_TTL.as_secs() / 86400,
            });
        }
        self.check_valid_at(now)?;
        let not_before = (now - CLOCK_SKEW_BACKDATE).max(self.not_before);
        let not_after = (now + ttl).min(self.not_after);
        let serial = random_serial()?;
        let serial_bytes = serial.to_bytes();

        let mut params = CertificateParams::default();
        // Empty subject, as Istio does: the identity is the URI SAN alone (rcgen then marks the SAN critical,
        // as RFC 5280 §4.2.1.6 requires).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.as_str().try_into().map_err(|e| {
                CaError::BadKey(format!("SPIFFE ID as URI: {e}"))
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params.signed_by(csr.public_key(), &self.issuer)?;

        let mut chain = Vec::with_capacity(1 + self.chain_to_anchor.len());
        chain.push(leaf.der().clone());
        chain.extend(self.chain_to_anchor.iter().cloned());
        Ok(IssuedSvid {
            id: id.clone(),
            serial: serial_bytes,
            not_before,
            not_after,
            chain,
        })
    }

    /// Generates a key here and issues an SVID for it: for callers that are themselves the key's user (the
    /// control plane's own serving certificate, tests). Workloads and proxies send CSRs instead.
    pub fn issue_with_new_key(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Svid, CaError> {
        let (key, csr_der) = crate::csr::generate_key_and_csr()?;
        let csr = CheckedCsr::from_der(&csr_der).map_err(|e| CaError::BadKey(e.to_string()))?;
        let issued = self.issue(&csr, id, ttl, now)?;
        Ok(Svid {
            id: issued.id,
            chain: issued.chain,
            key,
        })
    }

    /// Certifies `subject`'s root under this CA (cross-signing): a certificate with the same name and key as
    /// `subject`'s self-signed root, issued by this CA. A client that trusts only this CA's anchor (a join
    /// token made before a root rotation pins the old root) can then verify what `subject` signs, through
    /// this certificate. Path length 0, like the root it copies (RFC 5280 §6.1 takes a trust anchor as a
    /// name and a key: the anchor's own path-length field is not part of path validation). Valid from `now`
    /// until the earlier of both CAs' expiry. Only roots generated in this process can be certified: their
    /// name is reproduced from the parameters they were made with, and checked byte for byte.
    pub fn cross_certify(
        &self,
        subject: &CertificateAuthority,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let Some(root_params) = &subject.root_params else {
            return Err(CaError::NotACa(
                "only a root generated here can be cross-certified".into(),
            ));
        };
        // An operator's intermediate must not put a CA of ours into the operator's hierarchy; and a token
        // pins the anchor, which a cross-certificate from an intermediate would not reach anyway.
        if !self.chain_to_anchor.is_empty()
            || self.bundle.certs().first() != Some(&self.signing_cert)
        {
            return Err(CaError::NotACa(
                "only a self-signed root certifies another root; this CA is an intermediate".into(),
            ));
        }
        if subject.trust_domain != self.trust_domain {
            return Err(CaError::TrustDomainMismatch {
                expected: self.trust_domain.to_string(),
                found: subject.trust_domain.to_string(),
            });
        }
        self.check_valid_at(now)?;
        let mut params = root_params.clone();
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - CLOCK_SKEW_BACKDATE).max(self.not_before).into();
        params.not_after = self.not_after.min(subject.not_after).into();
        let cert = params.signed_by(subject.issuer.key(), &self.issuer)?;
        let der = cert.der().clone();
        // The certificate must name exactly the root it stands for, or no chain would use it.
        let (made, original) = (parse_cert(&der), parse_cert(&subject.signing_cert));
        match (made, original) {
            (Ok(m), Ok(o))
                if m.subject().as_raw() == o.subject().as_raw()
                    && m.public_key().raw == o.public_key().raw => {}
            _ => {
                return Err(CaError::BadChain(
                    "the cross-certificate does not reproduce the root's name and key".into(),
                ))
            }
        }
        Ok(der)
    }

    /// Writes the CA into `dir` (created `0700` if needed). Refuses a directory that already holds a CA.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        if dir.join(layout::META).exists() || dir.join(layout::KEY).exists() {
            return Err(CaError::AlreadyExists(dir.display().to_string()));
        }
        files::create_private_dir(dir)?;
        // Key first and metadata last: a crash in between leaves no `ca.json`, so the half-written
        // directory is not mistaken for a CA, and the next `init` is refused by the key file rather than
        // overwriting it.
        let key_pem = self.issuer.key().serialize_pem();
        files::write_atomic(&dir.join(layout::KEY), key_pem.as_bytes(), SECRET_MODE)?;
        files::write_atomic(
            &dir.join(layout::CERT),
            certs_to_pem([&self.signing_cert]).as_bytes(),
            PUBLIC_MODE,
        )?;
        files::write_atomic(
            &dir.join(layout::CHAIN),
            certs_to_pem(&self.upper_chain).as_bytes(),
            PUBLIC_MODE,
        )?;
        files::write_atomic(
            &dir.join(layout::BUNDLE),
            self.bundle.to_pem().as_bytes(),
            PUBLIC_MODE,
        )?;
        let meta = Meta {
            format: 1,
            trust_domain: self.trust_domain.clone(),
        };
        let meta = serde_json::to_vec_pretty(&meta).map_err(|e| CaError::BadMeta {
            path: layout::META.into(),
            reason: e.to_string(),
        })?;
        files::write_atomic(&dir.join(layout::META), &meta, PUBLIC_MODE)?;
        Ok(())
    }

    /// Loads a CA written by [`save`](Self::save), checking the key file's permissions and that the CA is
    /// valid at `now`.
    pub fn load(dir: &Path, now: SystemTime) -> Result<Self, CaError> {
        let meta_path = dir.join(layout::META);
        if !meta_path.exists() {
            return Err(CaError::NotFound(dir.display().to_string()));
        }
        let meta: Meta =
            serde_json::from_str(&files::read_pem(&meta_path)?).map_err(|e| CaError::BadMeta {
                path: meta_path.display().to_string(),
                reason: e.to_string(),
            })?;
        if meta.format != 1 {
            return Err(CaError::BadMeta {
                path: meta_path.display().to_string(),
                reason: format!("unknown format {}", meta.format),
            });
        }
        let key_pem = files::read_secret_pem(&dir.join(layout::KEY))?;
        let cert_pem = files::read_pem(&dir.join(layout::CERT))?;
        let chain = files::read_pem(&dir.join(layout::CHAIN))?;
        let bundle = files::read_pem(&dir.join(layout::BUNDLE))?;
        // The bundle's anchor completes the chain unless the signing certificate is the anchor itself.
        let signing = certs_from_pem(&cert_pem)?;
        let anchors = certs_from_pem(&bundle)?;
        let mut upper = if chain.trim().is_empty() {
            Vec::new()
        } else {
            certs_from_pem(&chain)?
        };
        if anchors.first() != signing.first() {
            upper.extend(anchors);
        }
        let upper_pem = (!upper.is_empty()).then(|| certs_to_pem(&upper));
        Self::from_pem(
            meta.trust_domain,
            &cert_pem,
            &key_pem,
            upper_pem.as_deref(),
            now,
        )
    }

    /// The signing key as PKCS#8, for callers that must hand it to another TLS stack in this process.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.issuer.key().serialize_der()))
    }
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), CaError> {
    if !cert.is_ca() {
        return Err(CaError::NotACa(
            "basicConstraints cA is not true; give the CA certificate, not a leaf".into(),
        ));
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(CaError::NotACa("key usage lacks keyCertSign".into()));
        }
    }
    if let Ok(Some(bc)) = cert.basic_constraints() {
        if bc.value.path_len_constraint.is_some_and(|n| n > 16) {
            return Err(CaError::NotACa("implausible path length constraint".into()));
        }
    }
    Ok(())
}

/// A CA certificate that carries a SPIFFE ID must carry the trust domain it will issue for.
fn check_trust_domain_san(cert: &X509Certificate<'_>, td: &TrustDomain) -> Result<(), CaError> {
    let sans = uri_sans(cert).map_err(CaError::NotACa)?;
    for uri in sans {
        if let Some(rest) = uri.strip_prefix("spiffe://") {
            let found = rest.split('/').next().unwrap_or_default();
            if found != td.as_str() {
                return Err(CaError::TrustDomainMismatch {
                    expected: td.to_string(),
                    found: found.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Each certificate must be issued (name and signature) by the next, which must be a CA.
fn check_chain_order(certs: &[X509Certificate<'_>]) -> Result<(), CaError> {
    for (i, pair) in certs.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.issuer().as_raw() != parent.subject().as_raw() {
            return Err(CaError::BadChain(format!(
                "certificate {i} was issued by \"{}\" but the next one is \"{}\"; give the chain in order, signing certificate first",
                child.issuer(),
                parent.subject()
            )));
        }
        if !parent.is_ca() {
            return Err(CaError::BadChain(format!(
                "certificate {} is not a CA",
                i + 1
            )));
        }
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|e| {
                CaError::BadChain(format!(
                    "certificate {i} is not signed by certificate {}: {e}",
                    i + 1
                ))
            })?;
    }
    Ok(())
}
