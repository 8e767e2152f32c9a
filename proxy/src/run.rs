//! The proxy's life: join (or reuse the node identity), enforce the persisted mesh version if there is one,
//! open the listeners, install the capture rules, subscribe to the policy distributor and apply what it
//! pushes (directory, policy, then workload certificates and capture rules follow); keep certificates fresh;
//! on shutdown, stop accepting, drain, and remove the rules.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use strait_ca::SpiffeId;
use strait_client::node::{join, Advert, NodeClient, NodeIdentity};
use strait_proto::api::Directory;
use strait_proto::registry::NodeName;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::capture::{self, CaptureMode, CapturePlan};
use crate::certs::{CertStore, WorkloadCert};
use crate::directory::DirectoryView;
use crate::metrics::Metrics;
use crate::tunnel::{self, Ctx, EgressRule};

/// Ports (DESIGN.md): 15001 outbound capture, 15008 tunnel, 15000 admin.
pub const OUTBOUND_PORT: u16 = 15001;
pub const TUNNEL_PORT: u16 = 15008;

/// How a node proves itself to the control plane the first time.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// VM mode: a one-time join token (none when the data directory already holds an identity).
    JoinToken(Option<String>),
    /// Kubernetes mode: the pod's projected service-account token (re-read at each join, as kubelet
    /// rotates it) and the trust bundle the control plane publishes, to authenticate it.
    ServiceAccount {
        token_file: PathBuf,
        trust_bundle: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub control: String,
    pub node: NodeName,
    pub bootstrap: Bootstrap,
    pub data_dir: PathBuf,
    /// This node's addresses; the first is advertised as the tunnel address.
    pub addresses: Vec<IpAddr>,
    pub tunnel_port: u16,
    pub outbound_port: u16,
    pub admin: SocketAddr,
    /// Resolvers the DNS proxy asks for names an egress entry allows (and for cluster names).
    pub dns_resolvers: Vec<IpAddr>,
    /// Names forwarded for every workload, whose answers open nothing (Kubernetes: `cluster.local`).
    pub dns_cluster_domain: Option<strait_policy::hostname::HostName>,
    /// The zone of mesh DNS names.
    pub dns_zone: strait_policy::hostname::HostName,
    pub egress: Vec<EgressRule>,
    /// `--allow-egress` entries by DNS name.
    pub egress_hosts: Vec<crate::dns::HostRule>,
    pub drain_timeout: Duration,
    /// Remove the capture rules at SIGTERM (after draining) instead of leaving them to fail closed.
    pub remove_rules_on_exit: bool,
    /// A local policy bundle (OPA layout, directory or .tar.gz) that overrides the distributed policy,
    /// reloaded when it changes. None: the distributor's policy (and with no version yet, deny all).
    pub policy_bundle: Option<PathBuf>,
    /// Talk to the distributor over TLS/TCP only (skip QUIC).
    pub distributor_tcp_only: bool,
    /// Log one allowed decision in this many (0: none); denials are always logged.
    pub decision_log_allow_sample: u64,
    /// `auto` ports: how long to wait for the client's first bytes.
    pub auto_detect_timeout: Duration,
    /// Inbound streams that move no byte for this long are closed.
    pub idle_timeout: Duration,
    /// Most connections carried at once (0: derived from the open-files limit).
    pub max_connections: usize,
    /// Optional health endpoint (probes and metrics only), e.g. 0.0.0.0:15021.
    pub health: Option<SocketAddr>,
    /// Kubernetes mode: let the node reach its meshed pods' probe ports in plaintext (kubelet).
    pub allow_kubelet_probes: bool,
    /// Run as the organisation's ingress gateway (`strait gateway`) instead of a node proxy: no capture,
    /// no workloads, only partners' streams to exported workloads.
    pub gateway: Option<GatewaySettings>,
}

/// `strait gateway`: where it listens and the address partners are told.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
}

impl ProxyOptions {
    pub fn mode(&self) -> CaptureMode {
        match self.bootstrap {
            Bootstrap::JoinToken(_) => CaptureMode::Vm,
            Bootstrap::ServiceAccount { .. } => CaptureMode::Kubernetes,
        }
    }
}

/// What the admin endpoint reads.
pub struct Shared {
    pub ctx: Arc<Ctx>,
    pub registry: Registry,
    pub node_id: SpiffeId,
    pub capture: ArcSwap<CapturePlan>,
    node_not_after: AtomicU64,
    ready: AtomicBool,
    /// Listeners bound and capture installed: readiness may be announced to systemd.
    serving: AtomicBool,
    pub(crate) draining: AtomicBool,
    /// The distributor subscription (set once it starts).
    pub mesh: std::sync::OnceLock<Arc<crate::mesh::ProxyApplier>>,
    /// Renew the node certificate now (it brings the trust bundle): a mesh version named another bundle.
    renew_node: tokio::sync::Notify,
    /// Bumped when the CA's signing root changed: every workload certificate is re-issued now.
    reissue: tokio::sync::watch::Sender<u64>,
    /// The signing root the last installed mesh version named.
    authority: Mutex<Option<String>>,
    /// The rules in force are a previous proxy's (kept across its restart) until the first plan applies.
    inherited_rules: AtomicBool,
}

impl Shared {
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::SeqCst) {
            Some("draining")
        } else if !self.ready.load(Ordering::SeqCst) {
            Some("no mesh version yet (nothing persisted and the control plane has not sent one); denying everything")
        } else {
            None
        }
    }

    /// Ready, but worth saying: the control plane is unreachable and the proxy runs on what it has.
    pub fn degraded_reason(&self) -> Option<String> {
        let s = self.mesh.get()?.status();
        (s.link != "connected").then(|| {
            format!(
                "control plane unreachable ({}); enforcing {} mesh version {}",
                s.link,
                s.source,
                s.version.map_or("-".into(), |v| v.to_string())
            )
        })
    }

    /// Type=notify: systemd hears READY=1 once the proxy serves *and* a mesh version (policy + directory)
    /// is in force — what `/ready` says — whichever comes last.
    fn announce_ready(&self) {
        if self.serving.load(Ordering::SeqCst) && self.ready.load(Ordering::SeqCst) {
            strait_client::systemd::ready("enforcing a mesh version");
        }
    }

    pub fn node_not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.node_not_after.load(Ordering::Relaxed))
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn advert(opts: &ProxyOptions) -> Advert {
    match &opts.gateway {
        // A gateway carries no workload: it is reached by partners only, at the address it advertises.
        Some(gw) => Advert {
            tunnel_address: None,
            addresses: Vec::new(),
            gateway_address: Some(gw.advertise.to_string()),
        },
        None => Advert {
            tunnel_address: opts
                .addresses
                .first()
                .map(|a| SocketAddr::new(*a, opts.tunnel_port).to_string()),
            addresses: opts.addresses.clone(),
            gateway_address: None,
        },
    }
}

/// The node identity: the one saved in the data directory if it is this node's and still valid,
/// otherwise a new join with the token.
async fn node_identity(opts: &ProxyOptions) -> anyhow::Result<NodeIdentity> {
    let want = format!("/node/{}", opts.node);
    if opts
        .data_dir
        .join(strait_client::node::layout::NODE_KEY)
        .exists()
    {
        let id = NodeIdentity::load(&opts.data_dir).with_context(|| {
            format!("loading the node identity from {}", opts.data_dir.display())
        })?;
        if id.id().path() != want {
            bail!(
                "{} holds the identity of {}, not node {}; use another --data-dir",
                opts.data_dir.display(),
                id.id(),
                opts.node
            );
        }
        if id.not_after > SystemTime::now() {
            info!(node = %id.id(), "reusing the node identity in the data directory");
            return Ok(id);
        }
        warn!(node = %id.id(), "the saved node certificate expired; joining again");
    }
    let id = match &opts.bootstrap {
        Bootstrap::JoinToken(token) => {
            let token = token.as_deref().with_context(|| {
                format!(
                    "no node identity in {} and no --token: create one with `strait node token create --node {}`",
                    opts.data_dir.display(),
                    opts.node
                )
            })?;
            join(&opts.control, token, advert(opts)).await?
        }
        Bootstrap::ServiceAccount {
            token_file,
            trust_bundle,
        } => {
            let pem = std::fs::read_to_string(trust_bundle).with_context(|| {
                format!(
                    "reading the trust bundle {} (the control plane publishes it in the ConfigMap {})",
                    trust_bundle.display(),
                    strait_proto::api::kube::BUNDLE_CONFIGMAP
                )
            })?;
            let bundle =
                strait_ca::TrustBundle::from_pem_self_described(&pem).with_context(|| {
                    format!("{} is not a Strait trust bundle", trust_bundle.display())
                })?;
            let token = std::fs::read_to_string(token_file).with_context(|| {
                format!(
                    "reading the service-account token {} (a projected token with audience {:?})",
                    token_file.display(),
                    strait_proto::api::kube::AUDIENCE
                )
            })?;
            strait_client::node::join_kubernetes(
                &opts.control,
                Arc::new(bundle),
                &token,
                &opts.node,
                advert(opts),
            )
            .await
            .context("joining with the service-account token")?
        }
    };
    if id.id().path() != want {
        bail!(
            "the join token was made for {}, not node {}",
            id.id(),
            opts.node
        );
    }
    id.save(&opts.data_dir)?;
    info!(node = %id.id(), "joined the mesh");
    Ok(id)
}

/// The Unix users the rules in force capture, kept in the data directory so that a restarted proxy that
/// finds its predecessor's rules knows whose connections already went through a proxy.
mod captured_uids {
    use std::collections::BTreeSet;
    use std::path::Path;

    const FILE: &str = "captured-uids";

    pub fn load(dir: &Path) -> BTreeSet<u32> {
        std::fs::read_to_string(dir.join(FILE))
            .map(|t| {
                t.split_whitespace()
                    .filter_map(|u| u.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn save(dir: &Path, uids: &BTreeSet<u32>) {
        let text: String = uids.iter().map(|u| format!("{u}\n")).collect();
        if let Err(e) = strait_ca::files::write_atomic(
            &dir.join(FILE),
            text.as_bytes(),
            strait_ca::files::SECRET_MODE,
        ) {
            tracing::warn!(error = %e, "cannot save the captured users");
        }
    }
}

/// Connections that newly captured workloads opened before their capture began went around the mesh and
/// would keep doing so; now that the rules are in place, they are closed (`SOCK_DESTROY`, as `ss -K`), so
/// the workload reconnects through the proxy. Listening sockets, unconnected UDP sockets (they can no
/// longer send anywhere but the resolver) and connections to loopback (allowed, local) are left alone.
fn cut_uncaptured_sockets(
    uids: &std::collections::BTreeSet<u32>,
    metrics: &crate::metrics::Metrics,
) {
    if uids.is_empty() {
        return;
    }
    let sockets = match crate::sockets::sockets_of(uids) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot list the sockets of newly captured workloads; connections they opened before capture stay open");
            return;
        }
    };
    for s in sockets
        .iter()
        .filter(|s| s.remote.port() != 0 && !s.remote.ip().is_loopback())
    {
        match crate::sockets::destroy(s) {
            Ok(()) => {
                metrics.refuse("outbound", "opened_before_capture");
                info!(uid = s.uid, local = %s.local, remote = %s.remote, protocol = s.protocol, "closed a connection opened before the workload was captured");
            }
            Err(e) => {
                warn!(uid = s.uid, local = %s.local, remote = %s.remote, error = %e, "cannot close a connection opened before capture (kernel without CONFIG_INET_DIAG_DESTROY?)")
            }
        }
    }
}

/// The connection cap: as asked, or half the open-files limit less a reserve for listeners, tunnels,
/// the control plane and logs (each carried connection holds two descriptors).
fn max_connections(asked: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    let cap = limit.saturating_sub(256).max(256) / 2;
    tracing::info!(
        open_files_limit = limit,
        max_connections = cap,
        "connection cap (--max-connections)"
    );
    cap
}

/// The ports the node's workloads listen on (TCP) and receive on (unconnected UDP), last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listening {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
}

/// How often the workloads' listening sockets are listed: a port a workload opens without declaring it
/// is reachable from other hosts for at most this long (TCP: not even then, its SYN-ACK cannot leave).
const LISTENING_REFRESH: Duration = Duration::from_secs(2);

fn capture_plan(view: &DirectoryView, opts: &ProxyOptions, listening: &Listening) -> CapturePlan {
    let mut plan = CapturePlan {
        listening_tcp: listening.tcp.clone(),
        listening_udp: listening.udp.clone(),
        mode: opts.mode(),
        outbound_port: opts.outbound_port,
        dns_port: crate::dns::DNS_PORT,
        ..Default::default()
    };
    if plan.mode == CaptureMode::Kubernetes {
        // Every port of a meshed pod is protected by address; nothing port-based applies.
        plan.meshed_pods = view.local_pod_ips().collect();
        if opts.allow_kubelet_probes {
            for w in view.local.iter().filter(|w| !w.probe_ports.is_empty()) {
                for ip in w.selector.ips() {
                    plan.probe_ports
                        .insert(*ip, w.probe_ports.iter().copied().collect());
                }
            }
        }
        return plan;
    }
    for w in &view.local {
        if let strait_proto::registry::Selector::Uid(u) = w.selector {
            plan.workload_uids.insert(u);
        }
        plan.strict_ports
            .extend(w.tcp_ports().filter(|p| !p.permissive).map(|p| p.port));
        plan.permissive_ports
            .extend(w.tcp_ports().filter(|p| p.permissive).map(|p| p.port));
        plan.plaintext_udp.extend(w.udp_ports());
    }
    plan.plaintext_udp_peers = view.plaintext_udp.clone();
    plan
}

/// What applying a mesh version touches, and the tasks that keep workload certificates fresh.
pub struct Node {
    pub opts: ProxyOptions,
    pub client: Arc<ArcSwap<NodeClient>>,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    cert_tasks: Mutex<HashMap<SpiffeId, JoinHandle<()>>>,
    /// Held while a capture plan is computed and applied, so the directory and the listening-socket
    /// watcher never apply plans out of order. Also holds the last listening ports read.
    capture: Mutex<Listening>,
}

impl Node {
    /// Swaps in a verified version: the policy (unless a local bundle pins it), then the directory, whose
    /// local workloads get certificate keepers and capture rules.
    pub fn install(self: &Arc<Self>, p: crate::mesh::Prepared) {
        if let Some(trust) = &p.payload.trust {
            self.follow_trust(trust);
        }
        if self.opts.policy_bundle.is_none() {
            info!(revision = %p.policy.revision, "distributed policy in force");
            self.shared.ctx.authz.swap(p.policy);
        }
        self.apply_directory(p.payload.directory);
    }

    /// A CA root rotation step at the control plane: fetch the bundle it names (with a node-certificate
    /// renewal, over the node's mTLS session), and re-issue every certificate when the signing root changed.
    fn follow_trust(&self, trust: &strait_proto::version::TrustState) {
        let shared = &self.shared;
        let held = shared.ctx.bundle.load();
        if trust.bundle_fingerprint != held.fingerprint() {
            info!(
                fingerprint = %trust.bundle_fingerprint,
                "the control plane's trust bundle changed; renewing the node certificate to fetch it"
            );
            shared.renew_node.notify_one();
        } else if trust.federation_fingerprint != held.federation_fingerprint() {
            info!(
                fingerprint = %trust.federation_fingerprint,
                "the federated trust domains' bundles changed; renewing the node certificate to fetch them"
            );
            shared.renew_node.notify_one();
        }
        let mut last = shared.authority.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_some_and(|a| a != &trust.authority) {
            info!(authority = %trust.authority, "the CA's signing root changed; re-issuing the node and workload certificates");
            shared.renew_node.notify_one();
            shared.reissue.send_modify(|e| *e += 1);
        }
        *last = Some(trust.authority.clone());
    }

    pub fn shared_ready(&self) {
        self.shared.ready.store(true, Ordering::SeqCst);
        self.shared.announce_ready();
    }

    fn apply_directory(self: &Arc<Self>, dir: Directory) {
        let view = DirectoryView::build(dir, &self.opts.node);
        let local: BTreeSet<SpiffeId> = view.local.iter().map(|w| w.id.clone()).collect();
        {
            let mut tasks = self.cert_tasks.lock().unwrap_or_else(|p| p.into_inner());
            for id in &local {
                if tasks.contains_key(id) {
                    continue;
                }
                // A cached certificate serves at once (and while the control plane is down); the keeper
                // fetches one immediately when there is none.
                if self.certs.get(id).is_none() {
                    match crate::certs::cache::load(&self.opts.data_dir, id) {
                        Ok(Some((svid, not_after))) => {
                            match WorkloadCert::new(svid, not_after, self.certs.next_generation()) {
                                Ok(c) => {
                                    info!(workload = %id, "using the cached workload certificate");
                                    self.certs.insert(c);
                                }
                                Err(e) => {
                                    warn!(workload = %id, error = %e, "cached certificate unusable")
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(workload = %id, error = %format!("{e:#}"), "cached certificate unreadable")
                        }
                    }
                }
                tasks.insert(
                    id.clone(),
                    tokio::spawn(keep_cert(self.clone(), id.clone())),
                );
            }
            tasks.retain(|id, task| {
                let keep = local.contains(id);
                if !keep {
                    task.abort();
                    self.certs.remove(id);
                    crate::certs::cache::remove(&self.opts.data_dir, id);
                }
                keep
            });
        }
        info!(
            revision = view.revision,
            local = local.len(),
            "directory in force"
        );
        // Rules before the view: a newly captured workload's first connections then meet a proxy that
        // does not know it yet and are refused (closed), never the other way round (known but uncaptured).
        if self.opts.gateway.is_none() {
            let listening = self.capture.lock().unwrap_or_else(|p| p.into_inner());
            self.apply_plan(capture_plan(&view, &self.opts, &listening));
            drop(listening);
        }
        let egress = view.egress.is_some();
        let was = self.shared.ctx.dir.swap(Arc::new(view)).egress.is_some();
        if egress != was {
            // Tunnels to partners opened the other way are no longer handed out; idle ones close.
            self.shared.ctx.forget_partner_tunnels(egress);
        }
        self.shared.ctx.dir_epoch.send_modify(|e| *e += 1);
    }

    /// Applies `plan` unless it is already in force; closes what newly captured workloads opened before.
    /// Called with `self.capture` held.
    fn apply_plan(&self, plan: CapturePlan) {
        let inherited = self.shared.inherited_rules.load(Ordering::SeqCst);
        if !inherited && **self.shared.capture.load() == plan {
            return;
        }
        // nft takes tens of milliseconds: tell the runtime, so other tasks move to other workers.
        let apply = || capture::apply(&plan);
        let applied = match tokio::runtime::Handle::try_current() {
            // Not spawn_blocking: the caller holds the capture lock and needs the result before it goes
            // on, and nothing else may change the rules meanwhile.
            #[allow(clippy::disallowed_methods)]
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(apply)
            }
            _ => apply(),
        };
        match applied {
            Ok(()) => {
                let before = self.shared.capture.load().workload_uids.clone();
                let newly: std::collections::BTreeSet<u32> =
                    plan.workload_uids.difference(&before).copied().collect();
                if before != plan.workload_uids || inherited {
                    captured_uids::save(&self.opts.data_dir, &plan.workload_uids);
                }
                self.shared.capture.store(Arc::new(plan));
                self.shared.inherited_rules.store(false, Ordering::SeqCst);
                cut_uncaptured_sockets(&newly, &self.shared.ctx.metrics);
            }
            Err(e) => {
                error!(error = %e, "cannot update the nftables rules; the previous rules stay")
            }
        }
    }

    /// Re-reads the ports the workloads listen on; when they changed, the inbound rules follow.
    fn refresh_listening(&self) {
        if self.shared.inherited_rules.load(Ordering::SeqCst) {
            // The predecessor's whole ruleset stays until a directory gives this proxy its own plan.
            return;
        }
        let uids = self.shared.capture.load().workload_uids.clone();
        let now = match crate::sockets::listening_ports(&uids) {
            Ok((tcp, udp)) => Listening { tcp, udp },
            Err(e) => {
                warn!(error = %e, "cannot list the workloads' listening sockets; the inbound rules stay as they are");
                return;
            }
        };
        let mut listening = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if *listening == now {
            return;
        }
        info!(tcp = ?now.tcp, udp = ?now.udp, "ports the workloads listen on changed");
        *listening = now;
        let mut plan = (**self.shared.capture.load()).clone();
        plan.listening_tcp = listening.tcp.clone();
        plan.listening_udp = listening.udp.clone();
        self.apply_plan(plan);
    }

    async fn fetch_cert(&self, id: &SpiffeId) -> anyhow::Result<Arc<WorkloadCert>> {
        // The client is cloned out of the swap: its guard must not be held across the request.
        let client = self.client.load_full();
        let (svid, not_after) = client.workload_svid(id).await?;
        if let Err(e) = crate::certs::cache::save(&self.opts.data_dir, &svid) {
            warn!(workload = %id, error = %format!("{e:#}"), "cannot cache the workload certificate");
        }
        let cert = WorkloadCert::new(svid, not_after, self.certs.next_generation())?;
        self.certs.insert(cert);
        self.certs.get(id).context("certificate vanished")
    }
}

/// Keeps one workload's certificate: fetches it at once when there is none, then renews at half life,
/// forever; on failure it keeps the current certificate and retries with capped exponential backoff.
async fn keep_cert(node: Arc<Node>, id: SpiffeId) {
    let mut backoff = Duration::from_millis(250);
    let mut reissue = node.shared.reissue.subscribe();
    reissue.mark_unchanged();
    loop {
        let wait = node
            .certs
            .get(&id)
            .map(|c| {
                c.renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = reissue.changed() => {
                // Spread a node's re-issues over half a second rather than all at once.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..500))).await;
            }
        }
        match node.fetch_cert(&id).await {
            Ok(c) => {
                node.metrics.cert_renewals.inc();
                backoff = Duration::from_millis(250);
                info!(workload = %id, generation = c.generation, not_after = %humantime::format_rfc3339_seconds(c.not_after), "workload certificate issued");
            }
            Err(e) => {
                node.metrics.cert_renewal_failures.inc();
                warn!(workload = %id, error = %format!("{e:#}"), retry_in = ?backoff, "cannot get a workload certificate; keeping the current one if any");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Renews the node certificate at half life (it authenticates the proxy to the control plane).
async fn keep_node_cert(
    opts: ProxyOptions,
    client: Arc<ArcSwap<NodeClient>>,
    identity: Arc<ArcSwap<NodeIdentity>>,
    shared: Arc<Shared>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let now = SystemTime::now();
        let life = identity
            .load()
            .not_after
            .duration_since(now)
            .unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(life / 2) => {}
            _ = shared.renew_node.notified() => {}
        }
        let current = client.load_full();
        let renewed = current.renew(advert(&opts)).await;
        match renewed.map_err(anyhow::Error::from).and_then(|id| {
            id.save(&opts.data_dir)?;
            let c = NodeClient::new(&opts.control, &id)?;
            Ok((id, c))
        }) {
            Ok((id, c)) => {
                shared
                    .node_not_after
                    .store(unix(id.not_after), Ordering::Relaxed);
                let fingerprint = id.bundle.fingerprint();
                let held = shared.ctx.bundle.load();
                if fingerprint != held.fingerprint()
                    || id.bundle.federation_fingerprint() != held.federation_fingerprint()
                {
                    let federated: Vec<String> = id
                        .bundle
                        .federated()
                        .map(|b| b.trust_domain().to_string())
                        .collect();
                    info!(%fingerprint, anchors = id.bundle.certs().len(), federated = ?federated, "trust bundle updated: tunnels are verified against it from now on");
                    crate::trust::replace_bundle(&shared.ctx, id.bundle.clone());
                }
                if opts.gateway.is_some() {
                    if let Err(e) = serve_as_gateway(&shared.ctx, &id) {
                        warn!(error = %format!("{e:#}"), "the renewed node certificate cannot serve the gateway; the previous one stays");
                    }
                }
                client.store(Arc::new(c));
                identity.store(Arc::new(id));
                backoff = Duration::from_millis(250);
                info!("node certificate renewed");
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), retry_in = ?backoff, "node certificate renewal failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Gateway: partners' tunnels are answered with the node certificate (they ask for the node's SNI name).
fn serve_as_gateway(ctx: &Ctx, id: &NodeIdentity) -> anyhow::Result<()> {
    let cert = WorkloadCert::new(id.svid.clone(), id.not_after, ctx.certs.next_generation())
        .context("the node certificate as the gateway's server certificate")?;
    ctx.certs.insert(cert);
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = tokio::net::TcpSocket::new_v6()?;
            socket2::SockRef::from(&s).set_only_v6(true)?;
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Lets TPROXY hand this listener connections addressed elsewhere (accepted with their original
/// addresses).
fn set_transparent(l: &TcpListener) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(l);
    match l.local_addr()? {
        SocketAddr::V4(_) => sock.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => sock.set_ip_transparent_v6(true),
    }
}

/// Binds the IPv4 address and, when the host has IPv6, the IPv6 one.
fn bind_pair(v4: SocketAddr, v6: SocketAddr) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = vec![bind(v4).with_context(|| format!("cannot listen on {v4} (in use?)"))?];
    match bind(v6) {
        Ok(l) => out.push(l),
        Err(e) => warn!(addr = %v6, error = %e, "no IPv6 listener (IPv6 disabled on this host?)"),
    }
    Ok(out)
}

/// UDP sockets on the IPv4 address and, when the host has IPv6, the IPv6 one.
fn bind_udp_pair(v4: SocketAddr, v6: SocketAddr) -> anyhow::Result<Vec<tokio::net::UdpSocket>> {
    let bind = |addr: SocketAddr| -> std::io::Result<tokio::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(socket)
    };
    let mut out = vec![bind(v4).with_context(|| format!("cannot listen on UDP {v4} (in use?)"))?];
    match bind(v6) {
        Ok(s) => out.push(s),
        Err(e) => {
            warn!(addr = %v6, error = %e, "no IPv6 DNS listener (IPv6 disabled on this host?)")
        }
    }
    Ok(out)
}

/// The control plane's address for the distributor (same host and port as the API).
async fn control_addr(control: &str) -> anyhow::Result<SocketAddr> {
    let (host, port) = strait_client::client::parse_server(control)?;
    let mut addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving the control plane address {host}"))?;
    addrs
        .next()
        .with_context(|| format!("{host} has no address"))
}

/// Runs the proxy until `shutdown`. `activated`: the listeners the service manager handed over
/// ([`crate::sockets::activated_listeners`], taken before the runtime started).
pub async fn run(
    opts: ProxyOptions,
    mut activated: crate::sockets::Activated,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if opts.addresses.is_empty() && opts.gateway.is_none() {
        bail!("give this node's address with --address (repeat for IPv6)");
    }
    let mut identity = node_identity(&opts).await?;
    let mut client = NodeClient::new(&opts.control, &identity)?;
    if identity.distribution_key.is_none() {
        // An identity saved by an older release: the renewal answer carries the key.
        identity = client
            .renew(advert(&opts))
            .await
            .context("the node identity has no distribution key and renewing it failed")?;
        identity.save(&opts.data_dir)?;
        client = NodeClient::new(&opts.control, &identity)?;
    }
    let keys = identity.distribution_keys();
    if keys.is_empty() {
        bail!("the control plane sent no distribution key");
    }
    let verifier =
        strait_proto::version::Verifier::with_keys(keys, identity.id().trust_domain().to_string());
    let client = Arc::new(ArcSwap::from_pointee(client));
    let control = control_addr(&opts.control).await?;

    let persisted = match crate::mesh::load_persisted(&opts.data_dir, &verifier) {
        Ok(p) => p,
        Err(e) => {
            error!(error = %format!("{e:#}"), "the persisted mesh version is refused; waiting for the control plane");
            None
        }
    };

    let certs = Arc::new(CertStore::default());
    let metrics = Arc::new(Metrics::default());
    let local_policy = match &opts.policy_bundle {
        Some(path) => {
            let p = crate::authz::LoadedPolicy::load(path)
                .with_context(|| format!("loading the policy bundle {}", path.display()))?;
            info!(revision = %p.revision, dry_run = p.dry_run, path = %path.display(), "local policy bundle pins the policy (the distributed one is ignored)");
            Some(p)
        }
        None => None,
    };
    let authz = Arc::new(crate::authz::Authz::new(
        local_policy,
        opts.decision_log_allow_sample,
    ));
    let view = DirectoryView::default();
    let plan = capture_plan(&view, &opts, &Listening::default());
    let ctx = Arc::new(Ctx::new(
        certs.clone(),
        view,
        Arc::new(strait_ca::SharedBundle::new(identity.bundle.clone())),
        metrics.clone(),
        tunnel::NodeSettings {
            addrs: opts.addresses.clone(),
            egress: opts.egress.clone(),
            mode: opts.mode(),
            auto_detect_timeout: opts.auto_detect_timeout,
            idle_timeout: opts.idle_timeout,
            max_connections: max_connections(opts.max_connections),
            dns: crate::dns::DnsSettings {
                zone: opts.dns_zone.clone(),
                upstreams: opts.dns_resolvers.clone(),
                hosts: opts.egress_hosts.clone(),
                cluster_domain: opts.dns_cluster_domain.clone(),
            },
        },
        authz.clone(),
    ));

    // A gateway serves partners on one port and captures nothing; a node proxy has the capture's
    // listeners.
    let gateway_listener = match &opts.gateway {
        Some(gw) => Some(bind(gw.listen).with_context(|| {
            format!(
                "cannot listen on {} for the gateway (in use? pass --listen ADDR)",
                gw.listen
            )
        })?),
        None => None,
    };
    let (outbound, dns_tcp, dns_udp, inbound, diverted_dns) = if gateway_listener.is_some() {
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), false)
    } else {
        // Listeners before the rules, so no captured connection ever meets a closed port while we start.
        // Handed over by socket activation when the service manager holds them across restarts.
        let mut take = |name: &str,
                        v4: SocketAddr,
                        v6: SocketAddr|
         -> anyhow::Result<Vec<TcpListener>> {
            match activated.remove(name) {
                Some(ls) => {
                    let ls = ls
                        .into_iter()
                        .map(TcpListener::from_std)
                        .collect::<std::io::Result<Vec<_>>>()?;
                    let addrs: Vec<String> = ls
                        .iter()
                        .filter_map(|l| l.local_addr().ok().map(|a| a.to_string()))
                        .collect();
                    info!(socket = name, addrs = ?addrs, "listening on sockets handed over by the service manager (socket activation)");
                    Ok(ls)
                }
                None => bind_pair(v4, v6),
            }
        };
        let outbound = take(
            "outbound",
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), opts.outbound_port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), opts.outbound_port),
        )?;
        if opts.mode() == CaptureMode::Kubernetes {
            // TPROXY hands connections to a loopback listener only if it is transparent; it then accepts them
            // with their original (pod) addresses.
            for l in &outbound {
                set_transparent(l).context(
                    "setting IP_TRANSPARENT on the outbound listener (needs CAP_NET_ADMIN)",
                )?;
            }
            capture::ensure_tproxy_route().context("installing the TPROXY policy route")?;
        }
        let dns_tcp = bind_pair(
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), crate::dns::DNS_PORT),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), crate::dns::DNS_PORT),
        )?;
        let dns_udp = bind_udp_pair(
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), crate::dns::DNS_PORT),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), crate::dns::DNS_PORT),
        )?;
        // Kubernetes mode diverts pods' DNS with TPROXY, which delivers only to transparent sockets.
        let diverted_dns = opts.mode() == CaptureMode::Kubernetes;
        if diverted_dns {
            for l in &dns_tcp {
                set_transparent(l).context("setting IP_TRANSPARENT on the DNS listener")?;
            }
            for s in &dns_udp {
                crate::tproxy_udp::accept_diverted(s).context(
                    "making the DNS socket receive diverted datagrams (needs CAP_NET_ADMIN)",
                )?;
            }
        }
        let inbound = take(
            "tunnel",
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), opts.tunnel_port),
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), opts.tunnel_port),
        )?;
        (outbound, dns_tcp, dns_udp, inbound, diverted_dns)
    };
    for name in activated.keys() {
        warn!(socket = %name, "a socket handed over with a name the proxy does not use (outbound, tunnel); ignored");
    }
    let admin = TcpListener::bind(opts.admin)
        .await
        .with_context(|| format!("cannot listen on {} for the admin endpoint", opts.admin))?;
    let health = match opts.health {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the health endpoint (in use? pass --health-listen ADDR)")
        })?),
        None => None,
    };
    // A previous proxy's rules still in place (it was restarted, or died): they stay until this proxy's
    // first plan replaces them in one transaction, so the workloads are never uncaptured in between; the
    // users they captured are not "newly captured" (their connections went through a proxy, or failed).
    let inherited = opts.gateway.is_none() && capture::table_exists();
    let mut initial = plan.clone();
    if opts.gateway.is_some() {
        info!("gateway: no capture rules (it carries partners' streams, no workload of its own)");
    } else if inherited {
        initial.workload_uids = captured_uids::load(&opts.data_dir);
        info!(
            workloads = initial.workload_uids.len(),
            "the previous proxy's capture rules are in force; this proxy replaces them with its first plan"
        );
    } else {
        capture::apply(&plan).context("installing the nftables rules")?;
        captured_uids::save(&opts.data_dir, &plan.workload_uids);
    }

    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        registry: metrics.register(),
        node_id: identity.id().clone(),
        capture: ArcSwap::from_pointee(initial),
        inherited_rules: AtomicBool::new(inherited),
        node_not_after: AtomicU64::new(unix(identity.not_after)),
        ready: AtomicBool::new(false),
        serving: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        mesh: std::sync::OnceLock::new(),
        renew_node: tokio::sync::Notify::new(),
        reissue: tokio::sync::watch::Sender::new(0),
        authority: Mutex::new(None),
    });
    let node = Arc::new(Node {
        opts: opts.clone(),
        client: client.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        shared: shared.clone(),
        cert_tasks: Mutex::new(HashMap::new()),
        capture: Mutex::new(Listening::default()),
    });
    let applier = Arc::new(crate::mesh::ProxyApplier::new(
        node.clone(),
        verifier,
        opts.data_dir.clone(),
    ));
    let _ = shared.mesh.set(applier.clone());
    match persisted {
        Some(p) => {
            let n = p.payload.number;
            applier.install(p, "persisted");
            info!(
                version = n,
                "enforcing the persisted mesh version until the control plane confirms or replaces it"
            );
        }
        None => info!("no persisted mesh version: not ready, denying everything until the control plane sends one"),
    }

    let tls = tunnel::inbound_tls(&ctx)?;
    let mut listeners: Vec<JoinHandle<()>> = Vec::new();
    for l in outbound {
        listeners.push(tokio::spawn(tunnel::serve_outbound(ctx.clone(), l)));
    }
    for l in dns_tcp {
        listeners.push(tokio::spawn(crate::dns::serve_tcp(ctx.clone(), l)));
    }
    for s in dns_udp {
        listeners.push(tokio::spawn(crate::dns::serve_udp(
            ctx.clone(),
            s,
            diverted_dns,
        )));
    }
    for l in inbound {
        listeners.push(tokio::spawn(tunnel::serve_inbound(
            ctx.clone(),
            l,
            tls.clone(),
        )));
    }
    if let Some(l) = gateway_listener {
        serve_as_gateway(&ctx, &identity)?;
        listeners.push(tokio::spawn(crate::gateway::serve(
            ctx.clone(),
            l,
            crate::gateway::tls(&ctx)?,
        )));
        info!(listen = ?opts.gateway.as_ref().map(|g| g.listen), "gateway serving partners");
    }
    let admin_task = tokio::spawn(crate::admin::serve(shared.clone(), admin));
    let health_task = health.map(|l| tokio::spawn(crate::admin::serve_health(shared.clone(), l)));

    let identity = Arc::new(ArcSwap::from_pointee(identity));
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    if let Some(path) = &opts.policy_bundle {
        background.push(tokio::spawn(crate::authz::watch(
            authz.clone(),
            path.clone(),
            Duration::from_secs(1),
        )));
    }
    if opts.mode() == CaptureMode::Vm && opts.gateway.is_none() {
        let node = node.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LISTENING_REFRESH);
            loop {
                tick.tick().await;
                node.refresh_listening();
            }
        }));
    }
    background.push(tokio::spawn(keep_node_cert(
        opts.clone(),
        client.clone(),
        identity.clone(),
        shared.clone(),
    )));
    let bind_any: SocketAddr = if control.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind_any).context("opening the QUIC endpoint")?;
    let target = strait_client::distributor::Target {
        addr: control,
        tls: Box::new(move || Ok(identity.load().control_tls()?)),
        endpoint,
        tcp_only: opts.distributor_tcp_only,
    };
    background.push(tokio::spawn(strait_client::distributor::run(
        target,
        applier.clone(),
    )));
    info!(admin = %opts.admin, control = %control, "proxy running");
    strait_client::systemd::spawn_watchdog();
    shared.serving.store(true, Ordering::SeqCst);
    shared.announce_ready();
    if shared.not_ready_reason().is_some() {
        strait_client::systemd::status(
            "waiting for a mesh version from the control plane; denying everything",
        );
    }

    shutdown.await;
    info!("shutting down: refusing new connections, draining");
    strait_client::systemd::stopping();
    shared.draining.store(true, Ordering::SeqCst);
    for l in &listeners {
        l.abort();
    }
    match tokio::time::timeout(opts.drain_timeout, ctx.inflight.drained()).await {
        Ok(()) => info!("all connections drained"),
        Err(_) => warn!(
            open = ctx.inflight.count(),
            "drain timeout; closing the remaining connections"
        ),
    }
    for t in background {
        t.abort();
    }
    for (_, t) in node
        .cert_tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
    {
        t.abort();
    }
    admin_task.abort();
    if let Some(t) = health_task {
        t.abort();
    }
    if opts.gateway.is_some() {
        info!("gateway stopped; bye");
    } else if opts.remove_rules_on_exit {
        capture::uninstall(opts.mode() == CaptureMode::Kubernetes)
            .context("removing the nftables rules")?;
        info!("capture rules removed (--on-exit remove-rules); bye");
    } else {
        info!("capture rules left in place: the workloads' traffic is refused, never around the mesh, until the proxy is back (`strait node uninstall` takes the node out of the mesh); bye");
    }
    Ok(())
}
