//! `strait-ca`: identities and certificates for the Strait mesh.
//!
//! - [`spiffe`]: SPIFFE IDs and trust domains, valid by construction.
//! - [`authority`]: a generated or imported CA that signs X.509-SVIDs from CSRs.
//! - [`csr`]: CSR checks (self-signature, allowed key types) before the CA signs.
//! - [`bundle`]: trust bundles as PEM and as SPIFFE bundles (JWKS).
//! - [`verify`]: rustls verifiers checking the chain *and* the peer's SPIFFE ID.
//! - [`tls`]: TLS 1.3 client and server configurations built from an SVID.
//!
//! The crate does no network I/O and reads no clock: every operation that depends on time takes `now`.
//! Files are touched only by [`files`] and the CA's `save`/`load`, at paths the caller passes.

#![forbid(unsafe_code)]

pub mod authority;
pub mod bundle;
pub mod cert;
pub mod csr;
pub mod files;
pub mod spiffe;
pub mod tls;
pub mod verify;

pub use authority::{CaError, CertificateAuthority, IssuedSvid, DEFAULT_SVID_TTL};
pub use bundle::{SharedBundle, SpiffeBundle, TrustBundle};
pub use csr::CheckedCsr;
pub use spiffe::{IdKind, SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::Svid;
pub use verify::{PeerIdMatcher, PeerRejection, RejectionKind};
