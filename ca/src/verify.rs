//! rustls verifiers that accept a peer only if its certificate chains to the trust bundle *and* names the
//! SPIFFE ID the caller expects.
//!
//! webpki validates the chain (signatures, validity, basic constraints, EKU) but cannot match URI SANs
//! (rustls-webpki issue #9), so the SPIFFE check runs after it, on the leaf that webpki accepted. This is
//! the order ztunnel and Linkerd use: never look at an identity before the chain that vouches for it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::bundle::{SharedBundle, TrustBundle};
use crate::cert::{svid_id, SvidShapeError};
use crate::spiffe::SpiffeId;
use crate::tls::provider;

/// The handshake-signature half of a verifier, the same for every verifier here: the provider's
/// algorithms check the peer's TLS signature with the key of the certificate already verified.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Which peer identities a verifier accepts, once the chain is valid and the peer is in the bundle's
/// trust domain.
#[derive(Clone)]
pub enum PeerIdMatcher {
    /// Exactly this ID (an outbound tunnel to a known destination workload).
    Exact(SpiffeId),
    /// Any ID of the trust domain (an inbound tunnel port, where authorization happens per request).
    AnyInTrustDomain,
    /// Whatever the predicate accepts; `description` says what it accepts, for error messages.
    Predicate {
        description: Arc<str>,
        accept: Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>,
    },
}

impl PeerIdMatcher {
    pub fn predicate(
        description: impl Into<Arc<str>>,
        accept: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::Predicate {
            description: description.into(),
            accept: Arc::new(accept),
        }
    }

    fn check(&self, id: &SpiffeId) -> Result<(), PeerRejection> {
        match self {
            PeerIdMatcher::Exact(want) if want == id => Ok(()),
            PeerIdMatcher::Exact(want) => Err(PeerRejection::WrongId {
                expected: want.to_string(),
                got: id.clone(),
            }),
            PeerIdMatcher::AnyInTrustDomain => Ok(()),
            PeerIdMatcher::Predicate { accept, .. } if accept(id) => Ok(()),
            PeerIdMatcher::Predicate { description, .. } => Err(PeerRejection::WrongId {
                expected: description.to_string(),
                got: id.clone(),
            }),
        }
    }
}

impl fmt::Debug for PeerIdMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdMatcher::Exact(id) => write!(f, "Exact({id})"),
            PeerIdMatcher::AnyInTrustDomain => f.write_str("AnyInTrustDomain"),
            PeerIdMatcher::Predicate { description, .. } => write!(f, "Predicate({description})"),
        }
    }
}

/// Why a peer certificate was refused. Each case has its own message so that an operator reading a log
/// line knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRejection {
    #[error("peer certificate expired {ago}s ago")]
    Expired { ago: u64 },
    #[error("peer certificate is not valid for another {in_secs}s (clock skew, or issued for the future)")]
    NotYetValid { in_secs: u64 },
    #[error("peer certificate was not issued by a CA in the trust bundle")]
    UnknownIssuer,
    #[error("peer presented a CA certificate (cA=true) as its own identity")]
    CaAsLeaf,
    #[error("peer certificate is not allowed for this use (extended key usage)")]
    WrongUsage,
    #[error("peer certificate is not a valid X.509-SVID: {0}")]
    Shape(SvidShapeError),
    #[error("peer {got} is outside trust domain {expected}")]
    WrongTrustDomain { expected: String, got: SpiffeId },
    #[error("peer {got} is of trust domain {trust_domain}, which is not federated")]
    NotFederated { trust_domain: String, got: SpiffeId },
    #[error("peer is {got}, expected {expected}")]
    WrongId { expected: String, got: SpiffeId },
    #[error("peer certificate chain is invalid: {0}")]
    Invalid(String),
}

/// The kind of a refusal, for metrics labels and tests; see [`rejection_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionKind {
    Expired,
    NotYetValid,
    UnknownIssuer,
    CaAsLeaf,
    WrongUsage,
    NotSvid,
    WrongTrustDomain,
    NotFederated,
    WrongId,
    Invalid,
}

impl PeerRejection {
    pub fn kind(&self) -> RejectionKind {
        match self {
            PeerRejection::Expired { .. } => RejectionKind::Expired,
            PeerRejection::NotYetValid { .. } => RejectionKind::NotYetValid,
            PeerRejection::UnknownIssuer => RejectionKind::UnknownIssuer,
            PeerRejection::CaAsLeaf => RejectionKind::CaAsLeaf,
            PeerRejection::WrongUsage => RejectionKind::WrongUsage,
            PeerRejection::Shape(SvidShapeError::CaAsLeaf) => RejectionKind::CaAsLeaf,
            PeerRejection::Shape(_) => RejectionKind::NotSvid,
            PeerRejection::WrongTrustDomain { .. } => RejectionKind::WrongTrustDomain,
            PeerRejection::NotFederated { .. } => RejectionKind::NotFederated,
            PeerRejection::WrongId { .. } => RejectionKind::WrongId,
            PeerRejection::Invalid(_) => RejectionKind::Invalid,
        }
    }

    fn from_webpki(e: webpki::Error) -> Self {
        use webpki::Error as W;
        let secs = |t: UnixTime| t.as_secs();
        match e {
            W::CertExpired { time, not_after } => PeerRejection::Expired {
                ago: secs(time).saturating_sub(secs(not_after)),
            },
            W::CertNotValidYet { time, not_before } => PeerRejection::NotYetValid {
                in_secs: secs(not_before).saturating_sub(secs(time)),
            },
            W::UnknownIssuer => PeerRejection::UnknownIssuer,
            W::CaUsedAsEndEntity => PeerRejection::CaAsLeaf,
            W::RequiredEkuNotFoundContext(_) => PeerRejection::WrongUsage,
            other => PeerRejection::Invalid(format!("{other:?}")),
        }
    }

    /// The rustls error to fail the handshake with. Expiry and unknown issuer map to rustls's own variants
    /// so the peer receives the precise TLS alert (certificate_expired, unknown_ca); the rest travel as
    /// `Other` and reach the peer as bad_certificate.
    fn into_rustls(self, now: UnixTime) -> rustls::Error {
        let at = |secs: u64| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        match self {
            PeerRejection::Expired { ago } => CertificateError::ExpiredContext {
                time: now,
                not_after: at(now.as_secs().saturating_sub(ago)),
            }
            .into(),
            PeerRejection::NotYetValid { in_secs } => CertificateError::NotValidYetContext {
                time: now,
                not_before: at(now.as_secs().saturating_add(in_secs)),
            }
            .into(),
            PeerRejection::UnknownIssuer => CertificateError::UnknownIssuer.into(),
            other => CertificateError::Other(OtherError(Arc::new(other))).into(),
        }
    }
}

/// Classifies a handshake error produced by the verifiers in this module (on the side that verified).
pub fn rejection_kind(err: &rustls::Error) -> Option<RejectionKind> {
    let rustls::Error::InvalidCertificate(ce) = err else {
        return None;
    };
    match ce {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            Some(RejectionKind::Expired)
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Some(RejectionKind::NotYetValid)
        }
        CertificateError::UnknownIssuer => Some(RejectionKind::UnknownIssuer),
        CertificateError::Other(OtherError(inner)) => inner
            .downcast_ref::<PeerRejection>()
            .map(PeerRejection::kind),
        _ => Some(RejectionKind::Invalid),
    }
}

/// Which end of the connection the peer is, which decides the extended key usage its leaf must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Client,
    Server,
}

/// Validates `end_entity` (+ `intermediates`) against `bundle` at `now` and returns the peer's SPIFFE ID if
/// it is an SVID of the bundle's trust domain that `expected` accepts.
pub fn verify_peer(
    bundle: &TrustBundle,
    expected: &PeerIdMatcher,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, PeerRejection> {
    let algs = provider().signature_verification_algorithms.all;
    // The roots that may vouch for the leaf are those of the trust domain its URI SAN claims: our own, or
    // a federated one's (never merged). The claim only picks the roots; the identity is trusted, and
    // checked, once the chain to those roots is valid. A leaf that names no SPIFFE ID is checked against
    // our roots and then refused for its shape.
    let claimed = svid_id(end_entity);
    let bundle = match &claimed {
        Ok(id) => match bundle.for_domain(id.trust_domain_str()) {
            Some(b) => b,
            None => {
                return Err(PeerRejection::NotFederated {
                    trust_domain: id.trust_domain_str().to_owned(),
                    got: id.clone(),
                })
            }
        },
        Err(_) => bundle,
    };
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| PeerRejection::Invalid(format!("unparseable leaf: {e:?}")))?;
    let usage = match role {
        PeerRole::Client => webpki::KeyUsage::client_auth(),
        PeerRole::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        algs,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(PeerRejection::from_webpki)?;
    let id = claimed.map_err(|e| match e {
        SvidShapeError::CaAsLeaf => PeerRejection::CaAsLeaf,
        other => PeerRejection::Shape(other),
    })?;
    if !id.is_member_of(bundle.trust_domain()) {
        return Err(PeerRejection::WrongTrustDomain {
            expected: bundle.trust_domain().to_string(),
            got: id,
        });
    }
    expected.check(&id)?;
    Ok(id)
}

/// The SPIFFE ID of the peer of an established connection (after the verifiers here accepted it).
pub fn peer_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    svid_id(leaf).ok()
}

/// Verifies client certificates on a server (the inbound side of a tunnel). Client authentication is
/// mandatory: a client without a certificate is refused.
pub struct SvidClientVerifier {
    bundle: Arc<SharedBundle>,
    expected: PeerIdMatcher,
    algs: WebPkiSupportedAlgorithms,
    root_hints: Vec<DistinguishedName>,
    mandatory: bool,
}

impl SvidClientVerifier {
    /// Client certificates are required.
    pub fn new(bundle: Arc<TrustBundle>, expected: PeerIdMatcher) -> Self {
        Self::build(bundle, expected, true)
    }

    /// Client certificates are optional, but one that is presented must pass every check (used by the
    /// control plane, where joining nodes and admins have no SVID yet and nodes do).
    pub fn optional(bundle: Arc<TrustBundle>, expected: PeerIdMatcher) -> Self {
        Self::build(bundle, expected, false)
    }

    /// Client certificates are required, verified against whatever bundle `bundle` holds at each
    /// handshake. No root hints are sent: they would go stale when the bundle changes, and SVID clients
    /// have one certificate to offer anyway.
    pub fn shared(bundle: Arc<SharedBundle>, expected: PeerIdMatcher, mandatory: bool) -> Self {
        Self {
            bundle,
            expected,
            algs: provider().signature_verification_algorithms,
            root_hints: Vec::new(),
            mandatory,
        }
    }

    fn build(bundle: Arc<TrustBundle>, expected: PeerIdMatcher, mandatory: bool) -> Self {
        let root_hints = bundle
            .anchors()
            .iter()
            .map(|a| DistinguishedName::in_sequence(a.subject.as_ref()))
            .collect();
        Self {
            bundle: Arc::new(SharedBundle::new(bundle)),
            expected,
            algs: provider().signature_verification_algorithms,
            root_hints,
            mandatory,
        }
    }
}

impl fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidClientVerifier")
            .field("trust_domain", self.bundle.load().trust_domain())
            .field("expected", &self.expected)
            .finish()
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle.load(),
            &self.expected,
            end_entity,
            intermediates,
            now,
            PeerRole::Client,
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(|r| r.into_rustls(now))
    }

    handshake_signatures!();
}

/// Verifies the server certificate on a client (the outbound side of a tunnel). The TLS server name is
/// ignored: SVIDs carry no DNS names, and the identity to prove is the expected SPIFFE ID.
pub struct SvidServerVerifier {
    bundle: Arc<SharedBundle>,
    expected: PeerIdMatcher,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidServerVerifier {
    pub fn new(bundle: Arc<TrustBundle>, expected: PeerIdMatcher) -> Self {
        Self::shared(Arc::new(SharedBundle::new(bundle)), expected)
    }

    /// Verified against whatever bundle `bundle` holds at each handshake.
    pub fn shared(bundle: Arc<SharedBundle>, expected: PeerIdMatcher) -> Self {
        Self {
            bundle,
            expected,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("trust_domain", self.bundle.load().trust_domain())
            .field("expected", &self.expected)
            .finish()
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle.load(),
            &self.expected,
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(|r| r.into_rustls(now))
    }

    handshake_signatures!();
}

/// Converts a `SystemTime` into the time type the verifiers take (pre-1970 clamps to the epoch).
pub fn unix_time(t: std::time::SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// [`explain`] for the I/O error a tokio-rustls handshake returns.
pub fn explain_io(err: &std::io::Error) -> String {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(explain)
        .unwrap_or_else(|| err.to_string())
}

/// A readable one-line explanation of a handshake error, for logs and CLI output. rustls prints the
/// errors that verifiers return as `Other(...)` in debug form; this prints ours with their messages.
pub fn explain(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            if let Some(r) = inner.downcast_ref::<PeerRejection>() {
                return format!("invalid peer certificate: {r}");
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            return format!("invalid peer certificate: {}", PeerRejection::UnknownIssuer);
        }
        _ => {}
    }
    err.to_string()
}

/// Verifies a server whose trust anchor is known only by its SHA-256 pin (a first join, before the node has
/// the trust bundle). The server must send the anchor in its chain; the chain is then validated against
/// that anchor alone, and the leaf must be an SVID of the anchor's trust domain whose path is `path`.
pub struct PinnedServerVerifier {
    pin: [u8; 32],
    path: String,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    pub fn new(pin: [u8; 32], path: impl Into<String>) -> Self {
        Self {
            pin,
            path: path.into(),
            algs: provider().signature_verification_algorithms,
        }
    }

    /// Finds the pinned anchor in `certs` and returns the bundle it makes, or `UnknownIssuer`.
    pub fn pinned_bundle(
        &self,
        leaf: &CertificateDer<'_>,
        certs: &[CertificateDer<'_>],
    ) -> Result<TrustBundle, PeerRejection> {
        let anchor = certs
            .iter()
            .find(|c| ring::digest::digest(&ring::digest::SHA256, c.as_ref()).as_ref() == self.pin)
            .ok_or(PeerRejection::UnknownIssuer)?;
        let id = svid_id(leaf).map_err(PeerRejection::Shape)?;
        TrustBundle::new(id.trust_domain(), vec![anchor.clone().into_owned()])
            .map_err(|e| PeerRejection::Invalid(e.to_string()))
    }
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let path = self.path.clone();
        self.pinned_bundle(end_entity, intermediates)
            .and_then(|bundle| {
                let expected =
                    PeerIdMatcher::predicate(format!("spiffe://<td>{path}"), move |id| {
                        id.path() == path
                    });
                verify_peer(
                    &bundle,
                    &expected,
                    end_entity,
                    intermediates,
                    now,
                    PeerRole::Server,
                )
            })
            .map(|_| ServerCertVerified::assertion())
            .map_err(|r| r.into_rustls(now))
    }

    handshake_signatures!();
}
