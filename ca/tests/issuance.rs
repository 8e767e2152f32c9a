//! The CA's issuance rules, checked on the certificates it produces (parsed with x509-parser, independently
//! of the code that wrote them), and its on-disk handling of keys.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{id, now, td, TestCa};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use strait_ca::authority::{layout, CLOCK_SKEW_BACKDATE};
use strait_ca::csr::CsrError;
use strait_ca::verify::{unix_time, verify_peer, PeerRole};
use strait_ca::{CaError, CertificateAuthority, CheckedCsr, PeerIdMatcher, TrustDomain};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

fn csr_for(key: &KeyPair, shape: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut p = CertificateParams::default();
    shape(&mut p);
    p.serialize_request(key).unwrap().der().to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn issued_svid_has_exactly_the_x509_svid_shape() {
    let ca = TestCa::new();
    let csr = CheckedCsr::from_der(&csr_for(&p256(), |_| {})).unwrap();
    let t = now();
    let svid = ca
        .ca
        .issue(
            &csr,
            &id("/ns/default/sa/web"),
            Duration::from_secs(3600),
            t,
        )
        .unwrap();
    assert_eq!(
        svid.chain.len(),
        1,
        "a root-signed SVID carries no intermediates"
    );
    let (_, cert) = X509Certificate::from_der(&svid.chain[0]).unwrap();

    assert!(cert.subject().as_raw().len() <= 2, "empty subject");
    let mut uri_sans = vec![];
    let (mut san_critical, mut ku_ok, mut eku_ok, mut bc_ok, mut ski, mut aki) =
        (false, false, false, false, None, None);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                san_critical = ext.critical;
                for n in &san.general_names {
                    match n {
                        GeneralName::URI(u) => uri_sans.push(u.to_string()),
                        other => panic!("unexpected SAN {other:?}"),
                    }
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                ku_ok = ext.critical
                    && ku.digital_signature()
                    && !ku.key_cert_sign()
                    && !ku.crl_sign()
                    && !ku.key_encipherment();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                eku_ok = eku.server_auth && eku.client_auth && !eku.any && eku.other.is_empty();
            }
            ParsedExtension::BasicConstraints(bc) => bc_ok = !bc.ca,
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                aki = k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => {}
        }
    }
    assert_eq!(uri_sans, vec!["spiffe://example.org/ns/default/sa/web"]);
    assert!(san_critical, "SAN must be critical with an empty subject");
    assert!(ku_ok, "key usage: digitalSignature only, critical");
    assert!(eku_ok, "EKU: serverAuth + clientAuth");
    assert!(bc_ok, "basicConstraints cA=false");
    assert!(ski.is_some(), "subject key identifier");
    let (_, root) = X509Certificate::from_der(ca.ca.signing_cert()).unwrap();
    let root_ski = root
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
    assert_eq!(
        aki, root_ski,
        "authority key identifier = CA's subject key identifier"
    );

    // Validity: backdated for clock skew, TTL as asked.
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert_eq!(nb, secs(t - CLOCK_SKEW_BACKDATE));
    assert_eq!(na, secs(t + Duration::from_secs(3600)));

    // Serial: positive, at least 64 bits, different every time.
    let serial = cert.raw_serial();
    assert!(serial.len() >= 8 && serial[0] & 0x80 == 0);
    let again = ca
        .ca
        .issue(
            &csr,
            &id("/ns/default/sa/web"),
            Duration::from_secs(3600),
            t,
        )
        .unwrap();
    assert_ne!(
        again.serial, svid.serial,
        "renewal with the same key gets a new serial"
    );
}

#[test]
fn identity_comes_from_the_caller_not_the_csr() {
    let ca = TestCa::new();
    // The requester asks to be the admin, in another trust domain, with a CA flag.
    let der = csr_for(&p256(), |p| {
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.subject_alt_names = vec![
            SanType::URI(
                "spiffe://evil.org/ns/kube-system/sa/admin"
                    .try_into()
                    .unwrap(),
            ),
            SanType::DnsName("control.example.org".try_into().unwrap()),
        ];
    });
    let csr = CheckedCsr::from_der(&der).unwrap();
    let svid = ca
        .ca
        .issue(
            &csr,
            &id("/ns/app/sa/worker"),
            Duration::from_secs(60),
            now(),
        )
        .unwrap();
    let (_, cert) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    assert_eq!(cert.subject().to_string(), "");
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(sans, vec!["URI(spiffe://example.org/ns/app/sa/worker)"]);
    assert!(!cert.is_ca());
}

#[test]
fn csr_checks_refuse_tampering_and_weak_keys() {
    let good = csr_for(&p256(), |_| {});
    // Flip one bit inside the signed part (the subject public key): the self-signature no longer matches.
    let mut tampered = good.clone();
    let at = tampered.len() - 80;
    tampered[at] ^= 0x01;
    assert!(matches!(
        CheckedCsr::from_der(&tampered),
        Err(CsrError::BadSignature | CsrError::Malformed(_))
    ));
    // Tampering with the signature itself.
    let mut bad_sig = good.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x01;
    assert_eq!(
        CheckedCsr::from_der(&bad_sig).unwrap_err(),
        CsrError::BadSignature
    );

    // RSA is refused (fixture made with `openssl req -new -newkey rsa:2048`; ring cannot generate RSA keys).
    let err = CheckedCsr::from_pem(include_str!("data/rsa2048.csr.pem")).unwrap_err();
    assert_eq!(err, CsrError::UnsupportedKey("RSA 2048".into()));
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        CheckedCsr::from_der(&csr_for(&key, |_| {})).unwrap();
    }
    assert!(matches!(
        CheckedCsr::from_pem("hello"),
        Err(CsrError::Malformed(_))
    ));
    assert!(matches!(
        CheckedCsr::from_der(&vec![0x30; 20_000]),
        Err(CsrError::TooLarge(20_000))
    ));
}

#[test]
fn ids_outside_the_trust_domain_and_absurd_ttls_are_refused() {
    let ca = TestCa::new();
    let csr = CheckedCsr::from_der(&csr_for(&p256(), |_| {})).unwrap();
    let foreign = strait_ca::SpiffeId::parse("spiffe://other.org/ns/a/sa/b").unwrap();
    let err = ca
        .ca
        .issue(&csr, &foreign, Duration::from_secs(60), now())
        .unwrap_err();
    assert!(matches!(err, CaError::IdOutsideTrustDomain { .. }), "{err}");
    let err = ca
        .ca
        .issue(&csr, &id("/a"), Duration::from_secs(0), now())
        .unwrap_err();
    assert!(matches!(err, CaError::BadTtl { .. }));
}

#[test]
fn ttl_is_clamped_to_the_ca_validity() {
    let t = now();
    let ca = CertificateAuthority::generate(td(), Duration::from_secs(600), t).unwrap();
    let csr = CheckedCsr::from_der(&csr_for(&p256(), |_| {})).unwrap();
    let svid = ca
        .issue(&csr, &id("/a"), Duration::from_secs(86400), t)
        .unwrap();
    assert_eq!(secs(svid.not_after), secs(t + Duration::from_secs(600)));
    // Past the CA's end, nothing is issued.
    let err = ca
        .issue(
            &csr,
            &id("/a"),
            Duration::from_secs(60),
            t + Duration::from_secs(601),
        )
        .unwrap_err();
    assert!(matches!(err, CaError::CaNotValid { .. }), "{err}");
}

#[test]
fn save_and_load_keep_the_key_private() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = TestCa::new();
    ca.ca.save(&ca_dir).unwrap();
    let mode = |name: &str| {
        std::fs::metadata(ca_dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(layout::KEY), 0o600);
    assert_eq!(
        std::fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let loaded = CertificateAuthority::load(&ca_dir, now()).unwrap();
    assert_eq!(loaded.signing_cert(), ca.ca.signing_cert());
    // A certificate from the loaded CA verifies against the original bundle.
    let svid = loaded
        .issue_with_new_key(&id("/x"), Duration::from_secs(60), now())
        .unwrap();
    verify_peer(
        &ca.bundle,
        &PeerIdMatcher::AnyInTrustDomain,
        &svid.chain[0],
        &[],
        unix_time(now()),
        PeerRole::Client,
    )
    .unwrap();

    // Refuses to overwrite.
    assert!(matches!(
        ca.ca.save(&ca_dir),
        Err(CaError::AlreadyExists(_))
    ));
    // Refuses a key others can read.
    std::fs::set_permissions(
        ca_dir.join(layout::KEY),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = CertificateAuthority::load(&ca_dir, now()).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    // A directory without a CA says how to make one.
    let err = CertificateAuthority::load(dir.path(), now()).unwrap_err();
    assert!(err.to_string().contains("strait ca init"), "{err}");
}

/// An operator's PKI: a root and an intermediate made outside Strait; Strait signs with the intermediate.
struct OperatorPki {
    root_pem: String,
    inter_pem: String,
    inter_key_pem: String,
    root_key: KeyPair,
    root_params: CertificateParams,
}

fn operator_pki(td_uri: Option<&str>) -> OperatorPki {
    let root_key = p256();
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name = rcgen::DistinguishedName::new();
    root_params
        .distinguished_name
        .push(DnType::CommonName, "ACME Root");
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let inter_key = p256();
    let mut ip = CertificateParams::default();
    ip.distinguished_name = rcgen::DistinguishedName::new();
    ip.distinguished_name
        .push(DnType::CommonName, "ACME Mesh Intermediate");
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ip.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    ip.use_authority_key_identifier_extension = true;
    if let Some(u) = td_uri {
        ip.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    let issuer = rcgen::Issuer::from_params(&root_params, &root_key);
    let inter = ip.signed_by(&inter_key, &issuer).unwrap();
    OperatorPki {
        root_pem: root.pem(),
        inter_pem: inter.pem(),
        inter_key_pem: inter_key.serialize_pem(),
        root_key,
        root_params,
    }
}

#[test]
fn an_operator_intermediate_signs_svids_that_chain_to_the_operator_root() {
    let pki = operator_pki(Some("spiffe://example.org"));
    let ca = CertificateAuthority::from_pem(
        td(),
        &pki.inter_pem,
        &pki.inter_key_pem,
        Some(&pki.root_pem),
        now(),
    )
    .unwrap();
    let svid = ca
        .issue_with_new_key(&id("/ns/a/sa/b"), Duration::from_secs(60), now())
        .unwrap();
    assert_eq!(svid.chain.len(), 2, "leaf + intermediate");
    assert_eq!(ca.trust_bundle().certs().len(), 1);
    let (_, anchor) = X509Certificate::from_der(&ca.trust_bundle().certs()[0]).unwrap();
    assert_eq!(anchor.subject().to_string(), "CN=ACME Root");
    verify_peer(
        ca.trust_bundle(),
        &PeerIdMatcher::Exact(id("/ns/a/sa/b")),
        &svid.chain[0],
        &svid.chain[1..],
        unix_time(now()),
        PeerRole::Server,
    )
    .unwrap();

    // Persisted and reloaded, it still chains the same way.
    let dir = tempfile::tempdir().unwrap();
    ca.save(&dir.path().join("ca")).unwrap();
    let loaded = CertificateAuthority::load(&dir.path().join("ca"), now()).unwrap();
    assert_eq!(loaded.trust_bundle().certs(), ca.trust_bundle().certs());
    let again = loaded
        .issue_with_new_key(&id("/ns/a/sa/b"), Duration::from_secs(60), now())
        .unwrap();
    assert_eq!(again.chain[1], svid.chain[1]);
}

#[test]
fn operator_imports_are_checked() {
    let pki = operator_pki(None);
    let other_key = p256().serialize_pem();
    let err = CertificateAuthority::from_pem(
        td(),
        &pki.inter_pem,
        &other_key,
        Some(&pki.root_pem),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch), "{err}");

    // A leaf is not a CA.
    let leaf_key = p256();
    let leaf = CertificateParams::new(vec!["x.example".into()])
        .unwrap()
        .signed_by(
            &leaf_key,
            &rcgen::Issuer::from_params(&pki.root_params, &pki.root_key),
        )
        .unwrap();
    let err =
        CertificateAuthority::from_pem(td(), &leaf.pem(), &leaf_key.serialize_pem(), None, now())
            .unwrap_err();
    assert!(matches!(err, CaError::NotACa(_)), "{err}");

    // A chain that does not belong to the certificate.
    let unrelated = operator_pki(None);
    let err = CertificateAuthority::from_pem(
        td(),
        &pki.inter_pem,
        &pki.inter_key_pem,
        Some(&unrelated.root_pem),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::BadChain(_)), "{err}");

    // A CA that names another trust domain.
    let pki = operator_pki(Some("spiffe://other.org"));
    let err = CertificateAuthority::from_pem(
        td(),
        &pki.inter_pem,
        &pki.inter_key_pem,
        Some(&pki.root_pem),
        now(),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");

    // Not yet valid / expired CA (rcgen's default validity ends in 4096, so test "before").
    let pki = operator_pki(None);
    let long_ago = UNIX_EPOCH + Duration::from_secs(86400);
    let err = CertificateAuthority::from_pem(
        td(),
        &pki.inter_pem,
        &pki.inter_key_pem,
        Some(&pki.root_pem),
        long_ago,
    )
    .unwrap_err();
    assert!(matches!(err, CaError::CaNotValid { .. }), "{err}");
}

#[test]
fn spiffe_bundle_has_one_x509_svid_key_per_anchor() {
    let ca = TestCa::new();
    let jwks = ca.ca.trust_bundle().to_spiffe_json(7, 300);
    assert_eq!(jwks["spiffe_sequence"], 7);
    assert_eq!(jwks["spiffe_refresh_hint"], 300);
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k["use"], "x509-svid");
    assert_eq!(k["kty"], "EC");
    assert_eq!(k["crv"], "P-256");
    assert_eq!(
        k["x"].as_str().unwrap().len(),
        43,
        "32 bytes, base64url without padding"
    );
    assert_eq!(k["y"].as_str().unwrap().len(), 43);
    use base64::Engine;
    let x5c = base64::engine::general_purpose::STANDARD
        .decode(k["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(x5c.as_slice(), ca.ca.signing_cert().as_ref());
}

#[test]
fn a_spiffe_bundle_parses_back_and_forgeries_are_refused() {
    use strait_ca::SpiffeBundle;
    let ca = TestCa::new();
    let jwks = ca.ca.trust_bundle().to_spiffe_json(7, 300);
    let bytes = serde_json::to_vec(&jwks).unwrap();
    let parsed = SpiffeBundle::parse(td(), &bytes).unwrap();
    assert_eq!(parsed.sequence, 7);
    assert_eq!(parsed.refresh_hint_secs, Some(300));
    assert_eq!(
        parsed.bundle.fingerprint(),
        ca.ca.trust_bundle().fingerprint()
    );
    assert_eq!(parsed.bundle.trust_domain(), &td());

    let refused = |v: serde_json::Value, why: &str| {
        let err = SpiffeBundle::parse(td(), &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    };
    // A JWK whose stated key is not the certificate's.
    let mut other = jwks.clone();
    other["keys"][0]["x"] =
        TestCa::new().ca.trust_bundle().to_spiffe_json(1, 1)["keys"][0]["x"].clone();
    refused(other, "does not match the certificate");
    // A leaf certificate offered as a root.
    let leaf = ca.svid("/ns/a/sa/b");
    let as_root = strait_ca::TrustBundle::new(td(), vec![leaf.chain[0].clone()]).unwrap();
    refused(as_root.to_spiffe_json(1, 1), "not a CA");
    let mut two = jwks.clone();
    let c = two["keys"][0]["x5c"][0].clone();
    two["keys"][0]["x5c"] = serde_json::json!([c.clone(), c]);
    refused(two, "exactly one certificate");
    refused(serde_json::json!({"keys": []}), "no x509-svid key");
    refused(
        serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC"}]}),
        "no x509-svid key",
    );
    refused(serde_json::json!([]), "not a JSON object");
    let mut seq = jwks.clone();
    seq["spiffe_sequence"] = serde_json::json!(-1);
    refused(seq, "spiffe_sequence");
    let huge = vec![b' '; strait_ca::bundle::MAX_SPIFFE_BUNDLE_BYTES + 1];
    assert!(SpiffeBundle::parse(td(), &huge).is_err());
    // Garbage never panics.
    for cut in 0..bytes.len() {
        let _ = SpiffeBundle::parse(td(), &bytes[..cut]);
    }
}

#[test]
fn trust_domain_parsing_accepts_the_scheme_form() {
    assert_eq!(TrustDomain::new("spiffe://a.b").unwrap().as_str(), "a.b");
    assert!(TrustDomain::new("A.b").is_err());
}

#[test]
fn a_cross_certificate_lets_the_old_anchor_verify_what_the_new_root_signs() {
    let t = now();
    let old = CertificateAuthority::generate(td(), Duration::from_secs(86400), t).unwrap();
    let new = CertificateAuthority::generate(td(), Duration::from_secs(3 * 86400), t).unwrap();
    let cross = old.cross_certify(&new, t).unwrap();
    let (_, x) = X509Certificate::from_der(&cross).unwrap();
    let (_, root) = X509Certificate::from_der(new.signing_cert()).unwrap();
    let (_, old_root) = X509Certificate::from_der(old.signing_cert()).unwrap();
    assert_eq!(x.subject().as_raw(), root.subject().as_raw());
    assert_eq!(x.issuer().as_raw(), old_root.subject().as_raw());
    assert_eq!(x.public_key().raw, root.public_key().raw);
    assert!(x.is_ca());
    // Bounded by the earlier expiry (the old root's).
    assert_eq!(
        x.validity().not_after.timestamp(),
        old_root.validity().not_after.timestamp()
    );

    let wid = id("/ns/default/sa/web");
    let svid = new
        .issue_with_new_key(&wid, Duration::from_secs(3600), t)
        .unwrap();
    let check = |bundle: &strait_ca::TrustBundle,
                 intermediates: &[rustls::pki_types::CertificateDer<'static>]| {
        verify_peer(
            bundle,
            &PeerIdMatcher::Exact(wid.clone()),
            &svid.chain[0],
            intermediates,
            unix_time(t),
            PeerRole::Server,
        )
    };
    // Trusting only the old root: the new root's leaf needs the cross-certificate, which links them.
    check(old.trust_bundle(), std::slice::from_ref(&cross)).unwrap();
    // The chain the control plane presents during the retiring period: new root, cross, old root.
    check(
        old.trust_bundle(),
        &[
            new.signing_cert().clone(),
            cross.clone(),
            old.signing_cert().clone(),
        ],
    )
    .unwrap();
    assert!(
        check(old.trust_bundle(), &[new.signing_cert().clone()]).is_err(),
        "without the cross-certificate nothing links the new root to the old one"
    );
    // Holders of the new bundle do not need it.
    check(new.trust_bundle(), &[]).unwrap();

    // Only roots generated here, and only of the same trust domain.
    let other = CertificateAuthority::generate(
        TrustDomain::new("other.example").unwrap(),
        Duration::from_secs(86400),
        t,
    )
    .unwrap();
    assert!(matches!(
        old.cross_certify(&other, t),
        Err(CaError::TrustDomainMismatch { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    new.save(dir.path()).unwrap();
    let loaded = CertificateAuthority::load(dir.path(), t).unwrap();
    assert!(old.cross_certify(&loaded, t).is_err());
    // An operator's intermediate never certifies a root of ours into the operator's hierarchy.
    let pki = operator_pki(Some("spiffe://example.org"));
    let intermediate = CertificateAuthority::from_pem(
        td(),
        &pki.inter_pem,
        &pki.inter_key_pem,
        Some(&pki.root_pem),
        t,
    )
    .unwrap();
    let refused = intermediate.cross_certify(&new, t).unwrap_err();
    assert!(refused.to_string().contains("intermediate"), "{refused}");
}
