//! The control plane's side of the distributor.
//!
//! After every change to the registry or the workflows, [`Hub::rebuild`] makes the mesh's content (the
//! directory and one policy bundle from all workflows); if its hash differs from the newest version's, it
//! signs version N+1, stores it (so a restart keeps numbering and proxies never see a lower number) and
//! publishes it on a watch channel. Each proxy session waits on that channel and sends the newest version
//! it has not sent yet; a slow proxy skips intermediate versions instead of queueing them (versions are
//! full snapshots, not deltas). The encoded frame is shared by all sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::keys::{KeyError, KeyRing, KeyStatus};
use super::version::{PublicKey, SignedVersion, TrustState, VersionPayload};
use super::wire::{self, ClientMsg, ServerMsg};
use super::Transport;
use crate::registry::{NodeName, Workload};
use crate::store::Store;

/// A proxy has this long to say hello after its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Application-level ping, so a proxy on the TCP fallback notices a dead control plane (QUIC has its own
/// keep-alives too).
pub const PING_EVERY: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The newest version, ready to send.
#[derive(Debug)]
pub struct Published {
    pub number: u64,
    pub hash: String,
    pub created_at_ms: u64,
    /// `ServerMsg::Version` encoded once.
    frame: Bytes,
}

impl Published {
    fn new(signed: &SignedVersion, p: &VersionPayload) -> anyhow::Result<Self> {
        Ok(Self {
            number: p.number,
            hash: p.content_hash.clone(),
            created_at_ms: p.created_at_ms,
            frame: wire::encode(&ServerMsg::Version {
                version: signed.clone(),
            })?,
        })
    }
}

/// What the control plane knows of one proxy's distribution session (in memory: it describes live
/// connections).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyDistStatus {
    pub node: String,
    pub connected: bool,
    pub transport: Option<Transport>,
    pub remote: Option<String>,
    /// Unix seconds of the last connect or disconnect.
    pub since: u64,
    /// The version the proxy said it had when it connected, then the last one it acknowledged.
    pub applied: Option<u64>,
    pub last_ack_at: Option<u64>,
    pub last_nack: Option<NackInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NackInfo {
    pub number: u64,
    pub error: String,
    pub at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DistributionStatus {
    pub latest: Option<u64>,
    pub latest_hash: Option<String>,
    pub latest_created_at_ms: Option<u64>,
    /// Proxies (connected or not) that acknowledged the newest version.
    pub rollout_acked: usize,
    /// Proxies currently connected.
    pub connected: usize,
    /// Seconds from the newest version's creation to the ACK that completed its rollout to every connected
    /// proxy, when it completed.
    pub rollout_seconds: Option<f64>,
    pub proxies: Vec<ProxyDistStatus>,
    /// The distribution key and any rotation under way.
    #[serde(default)]
    pub keys: KeyStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

struct HubMetrics {
    registry: Registry,
    versions: Counter,
    latest: Gauge,
    pushes: Counter,
    acks: Counter,
    nacks: Counter,
    connected: Family<TransportLabel, Gauge>,
    ack_latency: Histogram,
    rollout_seconds: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl HubMetrics {
    fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("strait_distributor"),
            versions: Counter::default(),
            latest: Gauge::default(),
            pushes: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            connected: Family::default(),
            ack_latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            rollout_seconds: Default::default(),
        };
        let r = &mut m.registry;
        r.register(
            "versions",
            "Mesh versions made (directory or policy changes)",
            m.versions.clone(),
        );
        r.register(
            "latest_version",
            "Number of the newest mesh version",
            m.latest.clone(),
        );
        r.register("pushes", "Versions sent to proxies", m.pushes.clone());
        r.register(
            "acks",
            "Versions proxies acknowledged (applied)",
            m.acks.clone(),
        );
        r.register(
            "nacks",
            "Versions proxies refused (they keep the last good one)",
            m.nacks.clone(),
        );
        r.register(
            "connected_proxies",
            "Proxies with a live distribution session",
            m.connected.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "Time from a version's creation (apply) to each proxy's ACK",
            m.ack_latency.clone(),
        );
        r.register(
            "rollout_seconds",
            "Time from the newest version's creation to the last ACK of the connected proxies",
            m.rollout_seconds.clone(),
        );
        m
    }
}

struct Entry {
    status: ProxyDistStatus,
    /// The live session, so that an old session ending does not mark a newer one disconnected.
    session: u64,
}

pub struct Hub {
    /// Locked only briefly, never across an await (rebuilds run on the blocking pool).
    keys: Mutex<KeyRing>,
    /// The trust bundle and authority every version names (set by the control plane's CA).
    trust: Mutex<Option<TrustState>>,
    trust_domain: String,
    latest: watch::Sender<Option<Arc<Published>>>,
    /// Serialises rebuilds so that two changes never make two versions with the same number.
    build: Mutex<()>,
    proxies: Mutex<HashMap<NodeName, Entry>>,
    rollout_done: Mutex<Option<(u64, f64)>>,
    next_session: AtomicU64,
    metrics: HubMetrics,
    /// Workloads that come from outside the store (Kubernetes pods), merged into every directory.
    external: Mutex<External>,
}

/// The externally sourced workloads.
#[derive(Debug, Clone, Default)]
enum External {
    /// VM mode: none.
    #[default]
    None,
    /// Kubernetes mode before the first complete list of pods and namespaces: no version is made, so a
    /// restarting control plane never publishes a directory that lacks every pod.
    Waiting,
    Known(Arc<Vec<Workload>>),
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Opens the hub with the newest stored version (if any); call [`rebuild`](Self::rebuild) next to pick
    /// up changes made while the control plane was down.
    pub fn open(store: &Store, keys: KeyRing, trust_domain: &str) -> anyhow::Result<Self> {
        let metrics = HubMetrics::new();
        let latest = match store.mesh_version()? {
            Some(signed) => match serde_json::from_slice::<VersionPayload>(&signed.payload) {
                Ok(p) => {
                    metrics.latest.set(p.number as i64);
                    Some(Arc::new(Published::new(&signed, &p)?))
                }
                Err(e) => {
                    error!(error = %e, "the stored mesh version is unreadable; a new one will be made");
                    None
                }
            },
            None => None,
        };
        let mut keys = keys;
        if let Some(l) = &latest {
            // Restarted during a rotation: the newest version is at least as late as the announcement.
            keys.announced(l.number);
        }
        Ok(Self {
            keys: Mutex::new(keys),
            trust: Mutex::new(None),
            trust_domain: trust_domain.to_owned(),
            latest: watch::Sender::new(latest),
            build: Mutex::new(()),
            proxies: Mutex::new(HashMap::new()),
            rollout_done: Mutex::new(None),
            next_session: AtomicU64::new(1),
            metrics,
            external: Mutex::new(External::None),
        })
    }

    /// Kubernetes mode: hold new versions until [`set_external`](Self::set_external) gives the pods.
    pub fn expect_external(&self) {
        *self.external.lock().unwrap_or_else(|p| p.into_inner()) = External::Waiting;
    }

    /// Replaces the external workloads; the caller rebuilds.
    pub fn set_external(&self, workloads: Vec<Workload>) {
        *self.external.lock().unwrap_or_else(|p| p.into_inner()) =
            External::Known(Arc::new(workloads));
    }

    /// The external workloads in the directory now (for status).
    pub fn external(&self) -> Arc<Vec<Workload>> {
        match &*self.external.lock().unwrap_or_else(|p| p.into_inner()) {
            External::Known(w) => w.clone(),
            _ => Arc::default(),
        }
    }

    /// Sets the trust state the next versions carry; the caller rebuilds.
    pub fn set_trust(&self, trust: TrustState) {
        *self.trust.lock().unwrap_or_else(|p| p.into_inner()) = Some(trust);
    }

    fn with_keys<T>(&self, f: impl FnOnce(&mut KeyRing) -> T) -> T {
        f(&mut self.keys.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The keys a node should trust now: the active one, and the next one while a rotation is prepared.
    pub fn public_keys(&self) -> (PublicKey, Option<PublicKey>) {
        self.with_keys(|k| k.trusted())
    }

    /// Where the distribution key stands; `nodes` are the registered nodes, of which those that have not
    /// applied a version announcing the next key are listed as waited for.
    pub fn key_status(&self, nodes: &[NodeName]) -> KeyStatus {
        let (active, next, announced_in) = self.with_keys(|k| {
            (
                k.active().public().key_id(),
                k.next_public().map(|p| p.key_id()),
                k.announced_in(),
            )
        });
        let waiting_for = match (&next, announced_in) {
            (Some(_), Some(n)) => self.with_proxies(|m| {
                nodes
                    .iter()
                    .filter(|node| {
                        m.get(*node)
                            .and_then(|e| e.status.applied)
                            .is_none_or(|applied| applied < n)
                    })
                    .map(|node| node.to_string())
                    .collect()
            }),
            (Some(_), None) => nodes.iter().map(|n| n.to_string()).collect(),
            _ => Vec::new(),
        };
        KeyStatus {
            active,
            next,
            announced_in,
            waiting_for,
        }
    }

    /// Rotation step 1: a new key, announced in a new version signed by the current one.
    pub fn prepare_key_rotation(&self, store: &Store) -> anyhow::Result<KeyStatus> {
        let next = self.with_keys(|k| k.prepare())?;
        info!(next_key = %next.key_id(), "distribution key rotation prepared; announcing the next key");
        let number = match self.rebuild(store)? {
            Some(n) => n,
            None => self.latest().map_or(0, |l| l.number),
        };
        self.with_keys(|k| k.announced(number));
        Ok(self.key_status(&Self::node_names(store)?))
    }

    /// Rotation step 2: the announced key signs from now on. Refused while a registered node has not applied
    /// a version announcing it, unless `force` (such a node asks for the keys when it meets the new
    /// signature).
    pub fn activate_key_rotation(&self, store: &Store, force: bool) -> Result<KeyStatus, KeyError> {
        let before = self.key_status(&Self::node_names(store)?);
        if before.next.is_none() {
            return Err(KeyError::NothingPrepared);
        }
        if !before.waiting_for.is_empty() && !force {
            return Err(KeyError::NotEveryNode {
                announced_in: before.announced_in.unwrap_or_default(),
                waiting_for: before.waiting_for,
            });
        }
        let _guard = self.build.lock().unwrap_or_else(|p| p.into_inner());
        let active = self.with_keys(|k| k.activate())?;
        drop(_guard);
        info!(active_key = %active.key_id(), forced = force && !before.waiting_for.is_empty(), "distribution key rotated: the next key signs from now on");
        self.rebuild(store)?;
        Ok(self.key_status(&Self::node_names(store)?))
    }

    fn node_names(store: &Store) -> anyhow::Result<Vec<NodeName>> {
        Ok(store.nodes()?.into_iter().map(|n| n.name).collect())
    }

    pub fn latest(&self) -> Option<Arc<Published>> {
        self.latest.borrow().clone()
    }

    /// The directory a version would carry now: the store's workloads and nodes plus the external ones;
    /// `None` while the external ones are still awaited. Blocking (store reads).
    pub fn directory(&self, store: &Store) -> anyhow::Result<Option<crate::api::Directory>> {
        let external = self
            .external
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut directory = store.directory()?;
        match external {
            External::None => {}
            External::Waiting => return Ok(None),
            External::Known(pods) => {
                // An identity registered in the store belongs to that registration; a pod spelling the
                // same namespace and service account is left out (and cannot obtain the SVID either).
                let registered: std::collections::HashSet<_> =
                    directory.workloads.iter().map(|w| w.id.clone()).collect();
                for pod in pods.iter() {
                    if registered.contains(&pod.id) {
                        warn!(id = %pod.id, node = %pod.node, "a meshed pod has the identity of a registered workload; left out of the directory");
                    } else {
                        directory.workloads.push(pod.clone());
                    }
                }
            }
        }
        Ok(Some(directory))
    }

    /// Makes a new version if the mesh's content changed; returns its number. Blocking (store reads and a
    /// store write): call it from the blocking pool.
    pub fn rebuild(&self, store: &Store) -> anyhow::Result<Option<u64>> {
        let _guard = self.build.lock().unwrap_or_else(|p| p.into_inner());
        let Some(directory) = self.directory(store)? else {
            debug!("waiting for the first list of pods before making a mesh version");
            return Ok(None);
        };
        let bundle = crate::workflows::mesh_bundle(&store.workflows()?)?;
        let trust = self.trust.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let next_key = keys.next_public();
        let hash =
            VersionPayload::compute_hash(&directory, &bundle, next_key.as_ref(), trust.as_ref());
        let current = self.latest();
        if current.as_ref().is_some_and(|c| c.hash == hash) {
            return Ok(None);
        }
        let payload = VersionPayload {
            trust_domain: self.trust_domain.clone(),
            number: current.as_ref().map_or(0, |c| c.number) + 1,
            created_at_ms: now_ms(),
            content_hash: hash,
            directory,
            bundle,
            next_key,
            trust,
        };
        let signed = keys.active().sign(&payload);
        drop(keys);
        store.put_mesh_version(&signed)?;
        let published = Arc::new(Published::new(&signed, &payload)?);
        info!(
            version = payload.number,
            hash = %payload.content_hash,
            bytes = published.frame.len(),
            workloads = payload.directory.workloads.len(),
            nodes = payload.directory.nodes.len(),
            "new mesh version"
        );
        self.metrics.versions.inc();
        self.metrics.latest.set(payload.number as i64);
        self.latest.send_replace(Some(published));
        Ok(Some(payload.number))
    }

    /// Rebuilds after a change and logs (rather than returns) a failure: the change itself is stored, and
    /// the next successful rebuild includes it.
    pub fn changed(&self, store: &Store) {
        if let Err(e) = self.rebuild(store) {
            error!(error = %format!("{e:#}"), "cannot make a new mesh version; proxies keep the previous one");
        }
    }

    fn with_proxies<T>(&self, f: impl FnOnce(&mut HashMap<NodeName, Entry>) -> T) -> T {
        let mut g = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn connected(
        &self,
        node: &NodeName,
        transport: Transport,
        remote: SocketAddr,
        have: Option<u64>,
    ) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let replaced = self.with_proxies(|m| {
            let e = m.entry(node.clone()).or_insert_with(|| Entry {
                status: ProxyDistStatus {
                    node: node.to_string(),
                    ..Default::default()
                },
                session,
            });
            let was = e.status.connected.then_some(e.status.transport).flatten();
            e.session = session;
            e.status.connected = true;
            e.status.transport = Some(transport);
            e.status.remote = Some(remote.to_string());
            e.status.since = now_ms() / 1000;
            e.status.applied = have;
            was
        });
        if let Some(t) = replaced {
            self.connected_gauge(t).dec();
        }
        self.connected_gauge(transport).inc();
        session
    }

    fn connected_gauge(&self, t: Transport) -> Gauge {
        self.metrics
            .connected
            .get_or_create(&TransportLabel {
                transport: t.to_string(),
            })
            .clone()
    }

    fn disconnected(&self, node: &NodeName, session: u64) {
        let t = self.with_proxies(|m| match m.get_mut(node) {
            Some(e) if e.session == session && e.status.connected => {
                e.status.connected = false;
                e.status.since = now_ms() / 1000;
                e.status.transport
            }
            _ => None,
        });
        if let Some(t) = t {
            self.connected_gauge(t).dec();
        }
    }

    fn ack(&self, node: &NodeName, number: u64, hash: &str) {
        self.metrics.acks.inc();
        let latest = self.latest();
        if let Some(l) = latest.as_ref().filter(|l| l.number == number) {
            if l.hash != hash {
                warn!(%node, version = number, "ACK with another content hash than the version sent");
            }
            self.metrics
                .ack_latency
                .observe(now_ms().saturating_sub(l.created_at_ms) as f64 / 1000.0);
        }
        let all_done = self.with_proxies(|m| {
            if let Some(e) = m.get_mut(node) {
                e.status.applied = Some(number);
                e.status.last_ack_at = Some(now_ms() / 1000);
                if e.status
                    .last_nack
                    .as_ref()
                    .is_some_and(|n| n.number <= number)
                {
                    e.status.last_nack = None;
                }
            }
            latest.as_ref().is_some_and(|l| {
                m.values()
                    .filter(|e| e.status.connected)
                    .all(|e| e.status.applied == Some(l.number))
            })
        });
        debug!(%node, version = number, "ACK");
        if let (true, Some(l)) = (all_done, latest) {
            let mut done = self.rollout_done.lock().unwrap_or_else(|p| p.into_inner());
            if done.is_none_or(|(n, _)| n != l.number) {
                let secs = now_ms().saturating_sub(l.created_at_ms) as f64 / 1000.0;
                *done = Some((l.number, secs));
                self.metrics.rollout_seconds.set(secs);
                info!(
                    version = l.number,
                    seconds = secs,
                    "every connected proxy applied the newest version"
                );
            }
        }
    }

    fn nack(&self, node: &NodeName, number: u64, error: String) {
        self.metrics.nacks.inc();
        warn!(%node, version = number, %error, "proxy refused a mesh version (NACK); it keeps its last good one");
        self.with_proxies(|m| {
            if let Some(e) = m.get_mut(node) {
                e.status.last_nack = Some(NackInfo {
                    number,
                    error,
                    at: now_ms() / 1000,
                });
            }
        });
    }

    /// The rollout of the newest version and the key status; `nodes` are the registered nodes.
    pub fn status(&self, nodes: &[NodeName]) -> DistributionStatus {
        let latest = self.latest();
        let mut proxies: Vec<ProxyDistStatus> =
            self.with_proxies(|m| m.values().map(|e| e.status.clone()).collect());
        proxies.sort_by(|a, b| a.node.cmp(&b.node));
        let done = *self.rollout_done.lock().unwrap_or_else(|p| p.into_inner());
        DistributionStatus {
            latest: latest.as_ref().map(|l| l.number),
            latest_hash: latest.as_ref().map(|l| l.hash.clone()),
            latest_created_at_ms: latest.as_ref().map(|l| l.created_at_ms),
            rollout_acked: proxies
                .iter()
                .filter(|p| latest.as_ref().is_some_and(|l| p.applied == Some(l.number)))
                .count(),
            connected: proxies.iter().filter(|p| p.connected).count(),
            rollout_seconds: done
                .filter(|(n, _)| latest.as_ref().is_some_and(|l| l.number == *n))
                .map(|(_, s)| s),
            proxies,
            keys: self.key_status(nodes),
        }
    }

    /// Prometheus text exposition of the distributor's metrics.
    pub fn encode_metrics(&self, out: &mut String) {
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.metrics.registry);
    }

    /// One proxy's session, on either transport: hello, what is missing, then every new version; ACKs and
    /// NACKs are recorded as they come.
    pub async fn session<R, W>(
        self: Arc<Self>,
        node: NodeName,
        transport: Transport,
        remote: SocketAddr,
        mut r: R,
        mut w: W,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: super::FrameSink,
    {
        let have = match tokio::time::timeout(HELLO_TIMEOUT, wire::read::<_, ClientMsg>(&mut r))
            .await
        {
            Ok(Ok(ClientMsg::Hello { have, .. })) => have,
            Ok(Ok(other)) => {
                warn!(%node, %remote, msg = ?other, "distribution session must start with hello; closing");
                return;
            }
            Ok(Err(e)) => {
                debug!(%node, %remote, error = %e, "distribution session ended before hello");
                return;
            }
            Err(_) => {
                warn!(%node, %remote, "no hello within 10 s; closing");
                return;
            }
        };
        let session = self.connected(&node, transport, remote, have);
        info!(%node, %remote, %transport, have = ?have, "proxy subscribed");

        // Reading frames is not cancel-safe, so one task reads and hands whole messages over.
        let (tx, mut incoming) = mpsc::channel::<Result<ClientMsg, wire::WireError>>(16);
        let reader = tokio::spawn(async move {
            loop {
                let m = wire::read::<_, ClientMsg>(&mut r).await;
                let end = m.is_err();
                if tx.send(m).await.is_err() || end {
                    break;
                }
            }
        });

        let mut latest = self.latest.subscribe();
        let mut sent = have;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let result: Result<(), String> = async {
            let first = latest.borrow_and_update().clone();
            match first {
                Some(p) if have != Some(p.number) => {
                    w.send(p.frame.clone()).await.map_err(|e| e.to_string())?;
                    self.metrics.pushes.inc();
                    sent = Some(p.number);
                }
                Some(p) => {
                    let msg = wire::encode(&ServerMsg::UpToDate { number: p.number })
                        .map_err(|e| e.to_string())?;
                    w.send(msg).await.map_err(|e| e.to_string())?
                }
                None => {}
            }
            loop {
                tokio::select! {
                    changed = latest.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        let p = latest.borrow_and_update().clone();
                        if let Some(p) = p.filter(|p| sent.is_none_or(|s| p.number > s)) {
                            w.send(p.frame.clone()).await.map_err(|e| e.to_string())?;
                            self.metrics.pushes.inc();
                            sent = Some(p.number);
                        }
                    }
                    msg = incoming.recv() => match msg {
                        Some(Ok(ClientMsg::Ack { number, hash })) => self.ack(&node, number, &hash),
                        Some(Ok(ClientMsg::Nack { number, error })) => {
                            // Bound what a node can make us store and log.
                            let error: String = error.chars().take(2048).collect();
                            self.nack(&node, number, error)
                        }
                        Some(Ok(ClientMsg::Hello { .. })) => return Err("second hello".into()),
                        Some(Err(wire::WireError::Closed)) | None => return Ok(()),
                        Some(Err(e)) => return Err(e.to_string()),
                    },
                    _ = ping.tick() => {
                        let ping = wire::encode(&ServerMsg::Ping).map_err(|e| e.to_string())?;
                        w.send(ping).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        .await;
        reader.abort();
        self.disconnected(&node, session);
        match result {
            Ok(()) => info!(%node, %remote, "proxy unsubscribed"),
            Err(e) => warn!(%node, %remote, error = %e, "distribution session failed"),
        }
    }
}

/// Accepts QUIC connections from proxies (node SVIDs, checked by the TLS layer) until the endpoint closes.
pub async fn serve_quic(hub: Arc<Hub>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let hub = hub.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    warn!(%remote, error = %e, "QUIC handshake refused");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "QUIC handshake timed out");
                    return;
                }
            };
            let Some(node) = quic_peer_node(&conn) else {
                warn!(%remote, "QUIC peer without a node identity; closing");
                conn.close(1u8.into(), b"node identity required");
                return;
            };
            let (send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
                Ok(Ok(s)) => s,
                _ => {
                    debug!(%node, %remote, "no stream opened; closing");
                    return;
                }
            };
            hub.session(node, Transport::Quic, remote, recv, send).await;
            conn.close(0u8.into(), b"bye");
        });
    }
}

fn quic_peer_node(conn: &quinn::Connection) -> Option<NodeName> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let id = strait_ca::cert::svid_id(certs.first()?).ok()?;
    match id.kind() {
        strait_ca::IdKind::Node { name } => NodeName::new(name).ok(),
        _ => None,
    }
}
