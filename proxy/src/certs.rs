//! The proxy's certificates: one SVID per local workload (keys generated here and kept only in this
//! process and its own data directory, mode 0600, so that a restart while the control plane is down can
//! still serve), swapped atomically on renewal so new handshakes use the new certificate while established
//! connections keep going.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use strait_ca::{SpiffeId, Svid};

/// The TLS server name that asks an inbound proxy for a given workload's certificate: a hash of the SPIFFE
/// ID (SVIDs carry no DNS names, and IDs are not valid DNS names).
pub fn sni_for(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}.spiffe.strait")
}

/// A workload's current certificate.
pub struct WorkloadCert {
    pub svid: Svid,
    pub certified: Arc<CertifiedKey>,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
    /// Increases on every renewal; tunnels opened with an older generation are not reused.
    pub generation: u64,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.svid.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    pub fn new(svid: Svid, not_after: SystemTime, generation: u64) -> Result<Self, rustls::Error> {
        let key = strait_ca::tls::provider()
            .key_provider
            .load_private_key(svid.key.clone_key())?;
        Ok(Self {
            certified: Arc::new(CertifiedKey::new(svid.chain.clone(), key)),
            svid,
            issued_at: SystemTime::now(),
            not_after,
            generation,
        })
    }

    /// When to renew: half way through the lifetime as seen from when it was received.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

#[derive(Default)]
pub struct CertStore {
    workloads: ArcSwap<HashMap<SpiffeId, Arc<WorkloadCert>>>,
    /// SNI → workload, for the inbound resolver.
    by_sni: ArcSwap<HashMap<String, SpiffeId>>,
    generation: AtomicU64,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("workloads", &self.workloads.load().len())
            .finish()
    }
}

impl CertStore {
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert(&self, cert: WorkloadCert) {
        let id = cert.svid.id.clone();
        let cert = Arc::new(cert);
        self.workloads.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(id.clone(), cert.clone());
            m
        });
        self.by_sni.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(sni_for(&id), id.clone());
            m
        });
    }

    pub fn remove(&self, id: &SpiffeId) {
        self.workloads.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(id);
            m
        });
        let sni = sni_for(id);
        self.by_sni.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(&sni);
            m
        });
    }

    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.workloads.load().get(id).cloned()
    }

    pub fn by_sni(&self, sni: &str) -> Option<Arc<WorkloadCert>> {
        let id = self.by_sni.load().get(sni).cloned()?;
        self.get(&id)
    }

    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        self.workloads.load().values().cloned().collect()
    }

    /// Seconds until the earliest workload certificate expires (for metrics).
    pub fn expiries(&self) -> Vec<(SpiffeId, Duration)> {
        let now = SystemTime::now();
        self.workloads
            .load()
            .iter()
            .map(|(id, c)| {
                (
                    id.clone(),
                    c.not_after.duration_since(now).unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// Server side of the tunnel port: the certificate of the workload the client named in SNI. An unknown
/// or missing SNI gets no certificate, which fails the handshake.
#[derive(Debug)]
pub struct InboundResolver(pub Arc<CertStore>);

impl ResolvesServerCert for InboundResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        self.0.by_sni(sni).map(|c| c.certified.clone())
    }
}

/// Client side: the current certificate of one source workload.
#[derive(Debug)]
pub struct SourceCert {
    pub store: Arc<CertStore>,
    pub id: SpiffeId,
}

impl ResolvesClientCert for SourceCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.get(&self.id).map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The cache of workload SVIDs in the proxy's data directory (`svids/<hash>.pem`: key and chain, 0600).
pub mod cache {
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use strait_ca::files;
    use strait_ca::{SpiffeId, Svid};

    fn path(dir: &Path, id: &SpiffeId) -> PathBuf {
        dir.join("svids")
            .join(format!("{}.pem", super::sni_for(id)))
    }

    pub fn save(dir: &Path, svid: &Svid) -> anyhow::Result<()> {
        let d = dir.join("svids");
        files::create_private_dir(&d)?;
        let mut pem = strait_ca::cert::pem_encode("PRIVATE KEY", svid.key.secret_der());
        pem.push_str(&strait_ca::cert::certs_to_pem(&svid.chain));
        files::write_atomic(&path(dir, &svid.id), pem.as_bytes(), files::SECRET_MODE)?;
        Ok(())
    }

    /// The cached SVID of `id` if there is one, it is for `id`, and it has not expired.
    pub fn load(dir: &Path, id: &SpiffeId) -> anyhow::Result<Option<(Svid, SystemTime)>> {
        let p = path(dir, id);
        if !p.exists() {
            return Ok(None);
        }
        let pem = files::read_secret_pem(&p)?;
        let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())?;
        let chain = strait_ca::cert::certs_from_pem(&pem)?;
        let first = chain
            .first()
            .ok_or_else(|| anyhow::anyhow!("{}: no certificate", p.display()))?;
        let summary = strait_ca::cert::CertSummary::of(first).map_err(anyhow::Error::msg)?;
        if &summary.spiffe_id.map_err(anyhow::Error::msg)? != id
            || summary.not_after <= SystemTime::now()
        {
            return Ok(None);
        }
        Ok(Some((
            Svid {
                id: id.clone(),
                chain,
                key,
            },
            summary.not_after,
        )))
    }

    pub fn remove(dir: &Path, id: &SpiffeId) {
        let _ = std::fs::remove_file(path(dir, id));
    }
}
