//! The control plane's certificate authorities and the rotation of the root without downtime.
//!
//! Three steps, as SPIRE's `localauthority x509 prepare` / `activate` / `revoke`:
//!
//! 1. **prepare**: a new root is generated (key 0600 in `<data>/ca-next/`, never anywhere else). The trust
//!    bundle becomes *old + new*; SVIDs are still signed by the old root. Every node fetches the new bundle
//!    with a node-certificate renewal that the next mesh version triggers (it names the bundle's
//!    fingerprint).
//! 2. **activate** (once every registered node renewed since `prepare`, so every proxy trusts the new root):
//!    the new root signs every SVID from now on (`ca-next/` becomes `ca/`, the old one `ca-retiring/` with
//!    its key deleted). The next mesh version names the new authority, and each proxy re-issues its node
//!    and workload SVIDs at once. Old and new SVIDs verify against each other's bundle meanwhile.
//! 3. **withdraw** (allowed once the longest SVID signed by the old root has expired: activation plus the
//!    SVID lifetime, or with `force`): the old root leaves the bundle; proxies renew and stop trusting it.
//!
//! Every step is visible in `strait status` (the authorities and their states, and per node whether it
//! renewed since the last step).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use strait_ca::authority::{layout as ca_layout, CLOCK_SKEW_BACKDATE};
use strait_ca::{CertificateAuthority, SharedBundle, TrustBundle, TrustDomain};

use crate::dist::version::TrustState;

/// The active CA.
pub const ACTIVE_DIR: &str = "ca";
/// The prepared (next) CA, between `prepare` and `activate`.
pub const NEXT_DIR: &str = "ca-next";
/// The previous root after `activate`: its certificate only (the key is deleted), until `withdraw`.
pub const RETIRING_DIR: &str = "ca-retiring";
const RETIRING_META: &str = "retiring.json";
/// In the prepared (then active) CA's directory: its root certified by the root it replaces, so that a join
/// token made before `activate` (it pins the old root) still authenticates the control plane until
/// `withdraw`.
pub const CROSS_CERT: &str = "cross-signed.pem";

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A short id for a root: the first 8 bytes of SHA-256 over its certificate, hex.
pub fn authority_id(anchor: &CertificateDer<'_>) -> String {
    crate::tokens::hex(&ring::digest::digest(&ring::digest::SHA256, anchor.as_ref()).as_ref()[..8])
}

/// A CA's trust anchor: the certificate its SVIDs chain to.
fn anchor(ca: &CertificateAuthority) -> Option<&CertificateDer<'static>> {
    ca.trust_bundle().certs().first()
}

/// The id of a CA's root ([`authority_id`] of its anchor).
fn root_id(ca: &CertificateAuthority) -> String {
    anchor(ca).map(authority_id).unwrap_or_default()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RetiringMeta {
    /// Unix seconds after which no SVID signed by this root can still be valid.
    withdraw_after: u64,
    activated_at: u64,
}

struct Retiring {
    anchor: CertificateDer<'static>,
    meta: RetiringMeta,
    /// The active root certified by this one ([`CROSS_CERT`]), if `prepare` could make it.
    cross: Option<CertificateDer<'static>>,
}

/// Reads the cross-certificate a `prepare` left in `dir`, if any (a damaged file only costs old join
/// tokens, so it is logged, not fatal).
fn read_cross(dir: &Path) -> Option<CertificateDer<'static>> {
    let path = dir.join(CROSS_CERT);
    let Ok(pem) = std::fs::read_to_string(&path) else {
        tracing::warn!(path = %path.display(), "a root retires but no cross-certificate links it to the active one; join tokens made before `activate` will not work (make new ones)");
        return None;
    };
    match strait_ca::cert::certs_from_pem(&pem) {
        Ok(mut certs) if certs.len() == 1 => certs.pop(),
        _ => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable cross-certificate; join tokens made before the root was activated will not work (make new ones)");
            None
        }
    }
}

struct Inner {
    active: Arc<CertificateAuthority>,
    prepared: Option<(Arc<CertificateAuthority>, u64)>,
    retiring: Option<Retiring>,
}

/// State of one authority, for status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorityStatus {
    pub id: String,
    /// `active` (signs SVIDs), `prepared` (trusted, signs nothing yet) or `retiring` (trusted until withdrawn).
    pub state: String,
    pub not_after: u64,
    /// Since when it is in this state (Unix seconds; 0 for an active root from before rotation existed).
    #[serde(default)]
    pub since: u64,
    /// `retiring`: when `withdraw` is allowed without `--force`.
    #[serde(default)]
    pub withdraw_after: Option<u64>,
}

/// Why a step was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The control plane's authorities and the bundle they make.
pub struct Authorities {
    dir: PathBuf,
    trust_domain: TrustDomain,
    svid_ttl: Duration,
    inner: Mutex<Inner>,
    /// The bundle in force, shared with the control plane's own TLS verifiers.
    bundle: Arc<SharedBundle>,
}

impl Authorities {
    /// Opens the authorities in a control plane's data directory (finishing an activation a crash
    /// interrupted).
    pub fn open(dir: &Path, svid_ttl: Duration, now: SystemTime) -> anyhow::Result<Self> {
        let (active_dir, next_dir, retiring_dir) = (
            dir.join(ACTIVE_DIR),
            dir.join(NEXT_DIR),
            dir.join(RETIRING_DIR),
        );
        if !active_dir.exists() && next_dir.exists() && retiring_dir.exists() {
            // Crashed between the two renames of `activate`.
            std::fs::rename(&next_dir, &active_dir)
                .context("finishing an interrupted CA activation")?;
        }
        let active = CertificateAuthority::load(&active_dir, now).context("loading the CA")?;
        let prepared = if next_dir.exists() {
            let ca =
                CertificateAuthority::load(&next_dir, now).context("loading the prepared CA")?;
            let since = std::fs::metadata(next_dir.join(ca_layout::META))
                .and_then(|m| m.modified())
                .map(secs)
                .unwrap_or_default();
            Some((Arc::new(ca), since))
        } else {
            None
        };
        let retiring = if retiring_dir.exists() {
            let anchor = TrustBundle::from_pem(
                active.trust_domain().clone(),
                &strait_ca::files::read_pem(&retiring_dir.join(ca_layout::BUNDLE))?,
            )?
            .certs()
            .first()
            .cloned()
            .context("the retiring CA has no certificate")?;
            let meta_path = retiring_dir.join(RETIRING_META);
            let meta = match std::fs::read(&meta_path) {
                Ok(b) => serde_json::from_slice(&b)
                    .with_context(|| format!("reading {}", meta_path.display()))?,
                // Crashed before the metadata was written: count from now, which is only later.
                Err(_) => write_retiring(&retiring_dir, now, svid_ttl)?,
            };
            let _ = std::fs::remove_file(retiring_dir.join(ca_layout::KEY));
            Some(Retiring {
                anchor,
                meta,
                cross: read_cross(&active_dir),
            })
        } else {
            None
        };
        let inner = Inner {
            active: Arc::new(active),
            prepared,
            retiring,
        };
        let bundle = Arc::new(SharedBundle::new(Arc::new(bundle_of(&inner)?)));
        Ok(Self {
            dir: dir.to_owned(),
            trust_domain: inner.active.trust_domain().clone(),
            svid_ttl,
            inner: Mutex::new(inner),
            bundle,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA that signs SVIDs now.
    pub fn active(&self) -> Arc<CertificateAuthority> {
        self.lock().active.clone()
    }

    /// The bundle in force (every root a peer may chain to).
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    pub fn shared_bundle(&self) -> Arc<SharedBundle> {
        self.bundle.clone()
    }

    /// Certificates the control plane's serving chain carries after its own root: while a root retires,
    /// the active root certified by the retiring one and the retiring root itself, so that a node joining
    /// with a token that pins the retiring root still finds a path to it (and nobody else needs them).
    pub fn serving_chain_extra(&self) -> Vec<CertificateDer<'static>> {
        match &self.lock().retiring {
            Some(Retiring {
                anchor,
                cross: Some(cross),
                ..
            }) => vec![cross.clone(), anchor.clone()],
            _ => Vec::new(),
        }
    }

    /// SHA-256 of the active root: what join tokens pin.
    pub fn active_pin(&self) -> [u8; 32] {
        anchor(&self.active()).map_or([0; 32], |a| crate::tokens::sha256(a.as_ref()))
    }

    /// What mesh versions carry so that proxies know which bundle and authority are in force.
    pub fn trust_state(&self) -> TrustState {
        TrustState {
            bundle_fingerprint: self.bundle().fingerprint(),
            authority: root_id(&self.active()),
            federation_fingerprint: String::new(),
        }
    }

    /// The authorities and their states, newest first.
    pub fn status(&self) -> Vec<AuthorityStatus> {
        let g = self.lock();
        let mut out = Vec::new();
        if let Some((ca, since)) = &g.prepared {
            out.push(AuthorityStatus {
                id: root_id(ca),
                state: "prepared".into(),
                not_after: secs(ca.not_after()),
                since: *since,
                withdraw_after: None,
            });
        }
        out.push(AuthorityStatus {
            id: root_id(&g.active),
            state: "active".into(),
            not_after: secs(g.active.not_after()),
            since: g.retiring.as_ref().map_or(0, |r| r.meta.activated_at),
            withdraw_after: None,
        });
        if let Some(r) = &g.retiring {
            let not_after = strait_ca::cert::CertSummary::of(&r.anchor)
                .map(|s| secs(s.not_after))
                .unwrap_or_default();
            out.push(AuthorityStatus {
                id: authority_id(&r.anchor),
                state: "retiring".into(),
                not_after,
                since: r.meta.activated_at,
                withdraw_after: Some(r.meta.withdraw_after),
            });
        }
        out
    }

    /// When the last step happened (Unix seconds): nodes that renewed since have what it changed.
    pub fn last_step_at(&self) -> u64 {
        let g = self.lock();
        match (&g.prepared, &g.retiring) {
            (Some((_, since)), _) => *since,
            (None, Some(r)) => r.meta.activated_at,
            _ => 0,
        }
    }

    /// Step 1: a new root, trusted by everyone from the next renewal on, signing nothing yet.
    pub fn prepare(&self, validity: Duration, now: SystemTime) -> Result<(), RotationError> {
        let mut g = self.lock();
        if g.prepared.is_some() {
            return Err(RotationError::Refused(
                "a new root is already prepared; activate it (strait ca rotation activate)".into(),
            ));
        }
        if g.retiring.is_some() {
            return Err(RotationError::Refused(
                "the previous root is still retiring; withdraw it first (strait ca rotation withdraw)"
                    .into(),
            ));
        }
        let ca = CertificateAuthority::generate(self.trust_domain.clone(), validity, now)
            .map_err(anyhow::Error::from)?;
        // The old root vouches for the new one while its key still exists (it is deleted at `activate`).
        let cross = g.active.cross_certify(&ca, now);
        let next_dir = self.dir.join(NEXT_DIR);
        ca.save(&next_dir).map_err(anyhow::Error::from)?;
        let written = cross.map_err(anyhow::Error::from).and_then(|cross| {
            Ok(strait_ca::files::write_atomic(
                &next_dir.join(CROSS_CERT),
                strait_ca::cert::certs_to_pem([&cross]).as_bytes(),
                strait_ca::files::PUBLIC_MODE,
            )?)
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "no cross-certificate from the current root to the new one; join tokens made before `activate` will stop working at activation (make new ones)");
        }
        g.prepared = Some((Arc::new(ca), secs(now)));
        self.bundle.store(Arc::new(bundle_of(&g)?));
        Ok(())
    }

    /// Step 2: the prepared root signs from now on; the old one is kept in the bundle, without its key.
    pub fn activate(&self, now: SystemTime) -> Result<(), RotationError> {
        let mut g = self.lock();
        let Some((next, _)) = g.prepared.clone() else {
            return Err(RotationError::Refused(
                "no new root is prepared: run `strait ca rotation prepare` first".into(),
            ));
        };
        let (active_dir, next_dir, retiring_dir) = (
            self.dir.join(ACTIVE_DIR),
            self.dir.join(NEXT_DIR),
            self.dir.join(RETIRING_DIR),
        );
        std::fs::rename(&active_dir, &retiring_dir).context("moving the old CA aside")?;
        std::fs::rename(&next_dir, &active_dir).context("activating the new CA")?;
        let meta = write_retiring(&retiring_dir, now, self.svid_ttl)?;
        // The old key signs nothing any more: delete it (its certificate stays in the bundle).
        let _ = std::fs::remove_file(retiring_dir.join(ca_layout::KEY));
        let old = std::mem::replace(&mut g.active, next);
        let old_anchor = anchor(&old)
            .cloned()
            .context("the old CA has no trust anchor")?;
        g.prepared = None;
        g.retiring = Some(Retiring {
            anchor: old_anchor,
            meta,
            cross: read_cross(&active_dir),
        });
        self.bundle.store(Arc::new(bundle_of(&g)?));
        Ok(())
    }

    /// Step 3: the old root leaves the bundle. Refused before every SVID it signed has expired, unless
    /// `force` (SVIDs it signed then stop verifying at once).
    pub fn withdraw(&self, force: bool, now: SystemTime) -> Result<(), RotationError> {
        let mut g = self.lock();
        let Some(r) = &g.retiring else {
            return Err(RotationError::Refused(
                "no root is retiring: nothing to withdraw".into(),
            ));
        };
        if secs(now) < r.meta.withdraw_after && !force {
            return Err(RotationError::Refused(format!(
                "SVIDs signed by the old root may be valid until {}; withdraw then, or pass --force (connections that present them will be refused)",
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(r.meta.withdraw_after))
            )));
        }
        // Nothing will trust the old root any more, so the certificate linking to it has no use. First, so
        // that a failure here leaves the rotation where it was; a leftover file is harmless (it is read
        // only while a root retires).
        match std::fs::remove_file(self.dir.join(ACTIVE_DIR).join(CROSS_CERT)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(error = %e, "cannot remove the cross-certificate; it is no longer served")
            }
            _ => {}
        }
        match std::fs::remove_dir_all(self.dir.join(RETIRING_DIR)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::from(e).context("removing the old CA").into())
            }
            _ => {}
        }
        g.retiring = None;
        self.bundle.store(Arc::new(bundle_of(&g)?));
        Ok(())
    }
}

/// Writes the retiring root's metadata: withdrawal allowed once the longest SVID it may have signed (the
/// SVID lifetime plus the backdating) has expired.
fn write_retiring(dir: &Path, now: SystemTime, svid_ttl: Duration) -> anyhow::Result<RetiringMeta> {
    let meta = RetiringMeta {
        withdraw_after: secs(now + svid_ttl + CLOCK_SKEW_BACKDATE),
        activated_at: secs(now),
    };
    strait_ca::files::write_atomic(
        &dir.join(RETIRING_META),
        &serde_json::to_vec_pretty(&meta)?,
        strait_ca::files::PUBLIC_MODE,
    )?;
    Ok(meta)
}

/// The bundle: the active root, the prepared one, the retiring one (in that order, without repeats).
fn bundle_of(g: &Inner) -> anyhow::Result<TrustBundle> {
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    let mut add = |c: &CertificateDer<'static>| {
        if !certs.contains(c) {
            certs.push(c.clone());
        }
    };
    g.active.trust_bundle().certs().iter().for_each(&mut add);
    if let Some((p, _)) = &g.prepared {
        p.trust_bundle().certs().iter().for_each(&mut add);
    }
    if let Some(r) = &g.retiring {
        add(&r.anchor);
    }
    Ok(TrustBundle::new(g.active.trust_domain().clone(), certs)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_ca::{PeerIdMatcher, SpiffeId};

    fn verifies(bundle: &TrustBundle, svid: &strait_ca::Svid, now: SystemTime) -> bool {
        strait_ca::verify::verify_peer(
            bundle,
            &PeerIdMatcher::Exact(svid.id.clone()),
            &svid.chain[0],
            &svid.chain[1..],
            strait_ca::verify::unix_time(now),
            strait_ca::verify::PeerRole::Client,
        )
        .is_ok()
    }

    #[test]
    fn prepare_activate_withdraw_keep_old_and_new_svids_valid_until_the_old_root_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let td = TrustDomain::new("example.org").unwrap();
        CertificateAuthority::generate(td.clone(), Duration::from_secs(86400 * 365), now)
            .unwrap()
            .save(&dir.path().join(ACTIVE_DIR))
            .unwrap();
        let ttl = Duration::from_secs(3600);
        let a = Authorities::open(dir.path(), ttl, now).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        let old_svid = a.active().issue_with_new_key(&id, ttl, now).unwrap();
        let first = a.trust_state();
        assert_eq!(a.bundle().certs().len(), 1);

        a.prepare(Duration::from_secs(86400 * 365), now).unwrap();
        assert!(a.prepare(Duration::from_secs(86400), now).is_err());
        assert_eq!(a.bundle().certs().len(), 2);
        assert_ne!(a.trust_state().bundle_fingerprint, first.bundle_fingerprint);
        assert_eq!(
            a.trust_state().authority,
            first.authority,
            "the old root still signs"
        );
        // Survives a restart between steps.
        let a = Authorities::open(dir.path(), ttl, now).unwrap();
        assert_eq!(a.bundle().certs().len(), 2);

        a.activate(now).unwrap();
        assert!(!dir.path().join(RETIRING_DIR).join(ca_layout::KEY).exists());
        let new_svid = a.active().issue_with_new_key(&id, ttl, now).unwrap();
        assert_ne!(a.trust_state().authority, first.authority);
        assert!(verifies(&a.bundle(), &old_svid, now) && verifies(&a.bundle(), &new_svid, now));
        let states: Vec<String> = a.status().into_iter().map(|s| s.state).collect();
        assert_eq!(states, ["active", "retiring"]);

        // Too early to withdraw: an old SVID may still be valid.
        assert!(matches!(
            a.withdraw(false, now),
            Err(RotationError::Refused(_))
        ));
        let a = Authorities::open(dir.path(), ttl, now).unwrap();
        a.withdraw(false, now + ttl + Duration::from_secs(31))
            .unwrap();
        assert_eq!(a.bundle().certs().len(), 1);
        assert!(!verifies(&a.bundle(), &old_svid, now));
        assert!(verifies(&a.bundle(), &new_svid, now));
        assert!(!dir.path().join(RETIRING_DIR).exists());
        let a = Authorities::open(dir.path(), ttl, now).unwrap();
        assert_eq!(a.status().len(), 1);
    }
}
