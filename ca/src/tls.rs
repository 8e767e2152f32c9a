//! rustls configurations for mutual TLS between SVID holders: TLS 1.3 only, the *ring* provider chosen
//! explicitly (with more than one provider compiled in, rustls's implicit default panics), and the SPIFFE
//! verifiers of [`crate::verify`] on both sides.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};

use crate::bundle::TrustBundle;
use crate::spiffe::SpiffeId;
use crate::verify::{PeerIdMatcher, SvidClientVerifier, SvidServerVerifier};

/// The crypto provider every Strait TLS endpoint uses.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// An SVID with its private key, as held by the process that generated the key.
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then any intermediates up to (not including) the trust anchor.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Svid {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A TLS 1.3 server that presents `svid` and requires clients holding an SVID that `clients` accepts.
pub fn server_config(
    svid: &Svid,
    bundle: Arc<TrustBundle>,
    clients: PeerIdMatcher,
) -> Result<ServerConfig, rustls::Error> {
    ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SvidClientVerifier::new(bundle, clients)))
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())
}

/// A TLS 1.3 client that presents `svid` and requires the server to prove an ID that `server` accepts.
pub fn client_config(
    svid: &Svid,
    bundle: Arc<TrustBundle>,
    server: PeerIdMatcher,
) -> Result<ClientConfig, rustls::Error> {
    ClientConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // Not dangerous here: the custom verifier validates the chain *and* the SPIFFE ID.
        .with_custom_certificate_verifier(Arc::new(SvidServerVerifier::new(bundle, server)))
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
}
