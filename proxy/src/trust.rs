//! Tunnels follow the trust bundle. Every handshake reads the current bundle, but a tunnel lives for as
//! long as it carries streams; so when the bundle changes (a CA root withdrawn after a rotation, and
//! later a federated partner's root), each open tunnel checks its peer's chain again and closes itself if
//! the chain no longer verifies. Traffic authenticated by a root the mesh stopped trusting ends with the
//! trust, not whenever the connection happens to go idle.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use strait_ca::verify::{verify_peer, PeerRejection, PeerRole};
use strait_ca::{PeerIdMatcher, SharedBundle, TrustBundle};
use tokio::sync::watch;

use crate::tunnel::Ctx;

/// The peer chain a tunnel was authenticated with (leaf first) and when, kept to be checked again.
pub struct PeerChain {
    certs: Vec<CertificateDer<'static>>,
    /// Checks again ask whether the new bundle would have accepted the chain at the handshake: a change
    /// of trust ends a tunnel, the leaf's expiry since then does not (the pool stops reusing tunnels of
    /// older certificates; their streams end on their own).
    verified_at: UnixTime,
}

impl PeerChain {
    /// The chain of an established TLS connection; `None` if it has none (never past the verifiers).
    pub fn of(conn: &rustls::CommonState) -> Option<Self> {
        let certs = conn.peer_certificates()?;
        (!certs.is_empty()).then(|| Self {
            certs: certs.iter().map(|c| c.clone().into_owned()).collect(),
            verified_at: UnixTime::now(),
        })
    }
}

/// Bumped on every bundle change; tunnels wait on it.
pub type Epoch = watch::Sender<u64>;

/// Makes `bundle` the one handshakes verify against, and has every open tunnel check its peer again.
pub fn replace_bundle(ctx: &Ctx, bundle: Arc<TrustBundle>) {
    ctx.bundle.store(bundle);
    ctx.trust_epoch.send_modify(|e| *e += 1);
}

/// What a tunnel's task needs to notice that its peer is no longer trusted (taken before it is spawned).
pub struct Watch {
    bundle: Arc<SharedBundle>,
    epoch: watch::Receiver<u64>,
}

/// Take it before the handshake: a bundle change between the handshake's verification and the watch
/// would otherwise go unseen by this tunnel.
pub fn watch(ctx: &Ctx) -> Watch {
    Watch {
        bundle: ctx.bundle.clone(),
        epoch: ctx.trust_epoch.subscribe(),
    }
}

impl Watch {
    /// Resolves when the bundle changed and `chain` no longer verifies against it, with the reason;
    /// never otherwise. `role` is the peer's (the tunnel's client on the inbound side, its server on the
    /// outbound side).
    pub async fn distrusted(mut self, chain: PeerChain, role: PeerRole) -> PeerRejection {
        // Changes since the watch was taken (before the handshake) count: check once at the start.
        self.epoch.mark_changed();
        let [leaf, intermediates @ ..] = chain.certs.as_slice() else {
            return std::future::pending().await;
        };
        loop {
            if self.epoch.changed().await.is_err() {
                // The node is shutting down: nothing more will change.
                return std::future::pending().await;
            }
            let bundle = self.bundle.load();
            if let Err(e) = verify_peer(
                &bundle,
                &PeerIdMatcher::AnyInTrustDomain,
                leaf,
                intermediates,
                chain.verified_at,
                role,
            ) {
                return e;
            }
        }
    }
}
