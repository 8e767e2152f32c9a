//! Helpers shared by the CA integration tests: a CA, SVIDs, and certificates forged with the CA's own key
//! (the strongest attacker short of a CA compromise: someone who can get *something* signed).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use strait_ca::{CertificateAuthority, SpiffeId, Svid, TrustBundle, TrustDomain};

pub const TD: &str = "example.org";

pub fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

pub fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}{path}")).unwrap()
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

/// A fresh generated CA for `example.org` and the loaded copy of its key for forging.
pub struct TestCa {
    pub ca: CertificateAuthority,
    pub bundle: Arc<TrustBundle>,
    forger: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        Self::for_domain(td())
    }

    pub fn for_domain(td: TrustDomain) -> Self {
        // Started three days ago, so tests can issue certificates that have already expired.
        let start = now() - Duration::from_secs(3 * 86400);
        let ca = CertificateAuthority::generate(td, Duration::from_secs(3600 * 24 * 365), start)
            .unwrap();
        let key =
            KeyPair::from_der_and_sign_algo(&ca.key_der(), &rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let forger = Issuer::from_ca_cert_der(ca.signing_cert(), key).unwrap();
        let bundle = Arc::new(ca.trust_bundle().clone());
        Self { ca, bundle, forger }
    }

    /// A proper SVID from the CA.
    pub fn svid(&self, path: &str) -> Svid {
        self.ca
            .issue_with_new_key(&id(path), Duration::from_secs(3600), now())
            .unwrap()
    }

    /// An SVID issued at `at` with `ttl` (for expired / not-yet-valid certificates).
    pub fn svid_at(&self, path: &str, at: SystemTime, ttl: Duration) -> Svid {
        self.ca.issue_with_new_key(&id(path), ttl, at).unwrap()
    }

    /// A certificate signed by the CA key with whatever `shape` does to otherwise-SVID parameters.
    pub fn forge(&self, uri_sans: &[&str], shape: impl FnOnce(&mut CertificateParams)) -> Svid {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = uri_sans
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = (now() - Duration::from_secs(60)).into();
        p.not_after = (now() + Duration::from_secs(3600)).into();
        shape(&mut p);
        let cert = p.signed_by(&key, &self.forger).unwrap();
        Svid {
            id: uri_sans
                .first()
                .and_then(|u| SpiffeId::parse(u).ok())
                .unwrap_or_else(|| id("/forged")),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A CA certificate (cA=true) signed by this CA, with a URI SAN, used as if it were a leaf.
    pub fn forge_ca_as_leaf(&self, path: &str) -> Svid {
        let uri = format!("spiffe://{TD}{path}");
        self.forge(&[uri.as_str()], |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        })
    }
}

pub fn leaf(svid: &Svid) -> &CertificateDer<'static> {
    &svid.chain[0]
}
