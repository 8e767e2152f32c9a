//! The proxy's life: join (or reuse the node identity), get workload SVIDs, fetch the directory, install the
//! capture rules, open the listeners, report ready; then keep certificates and the directory fresh; on
//! shutdown, stop accepting, drain, and remove the rules.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use strait_ca::SpiffeId;
use strait_control::node::{join, Advert, NodeClient, NodeIdentity};
use strait_control::registry::NodeName;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::capture::{self, CapturePlan};
use crate::certs::{CertStore, WorkloadCert};
use crate::directory::DirectoryView;
use crate::metrics::Metrics;
use crate::tunnel::{self, Ctx, EgressRule};

/// Ports (DESIGN.md): 15001 outbound capture, 15008 tunnel, 15000 admin.
pub const OUTBOUND_PORT: u16 = 15001;
pub const TUNNEL_PORT: u16 = 15008;

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub control: String,
    pub node: NodeName,
    pub token: Option<String>,
    pub data_dir: PathBuf,
    /// This node's addresses; the first is advertised as the tunnel address.
    pub addresses: Vec<IpAddr>,
    pub tunnel_port: u16,
    pub outbound_port: u16,
    pub admin: SocketAddr,
    pub dns_resolvers: Vec<IpAddr>,
    pub egress: Vec<EgressRule>,
    pub drain_timeout: Duration,
    pub refresh_interval: Duration,
    /// Policy bundle (OPA layout, directory or .tar.gz); reloaded when it changes. None: deny all.
    pub policy_bundle: Option<PathBuf>,
    /// Log one allowed decision in this many (0: none); denials are always logged.
    pub decision_log_allow_sample: u64,
}

/// What the admin endpoint reads.
pub struct Shared {
    pub ctx: Arc<Ctx>,
    pub registry: Registry,
    pub node_id: SpiffeId,
    pub capture: ArcSwap<CapturePlan>,
    node_not_after: AtomicU64,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Shared {
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::SeqCst) {
            Some("draining")
        } else if !self.ready.load(Ordering::SeqCst) {
            Some("starting")
        } else {
            None
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
    Advert {
        tunnel_address: opts
            .addresses
            .first()
            .map(|a| SocketAddr::new(*a, opts.tunnel_port).to_string()),
        addresses: opts.addresses.clone(),
    }
}

/// The node identity: the one saved in the data directory if it is this node's and still valid,
/// otherwise a new join with the token.
async fn node_identity(opts: &ProxyOptions) -> anyhow::Result<NodeIdentity> {
    let want = format!("/node/{}", opts.node);
    if opts
        .data_dir
        .join(strait_control::node::layout::NODE_KEY)
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
    let token = opts.token.as_deref().with_context(|| {
        format!(
            "no node identity in {} and no --token: create one with `strait node token create --node {}`",
            opts.data_dir.display(),
            opts.node
        )
    })?;
    let id = join(&opts.control, token, advert(opts)).await?;
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

fn capture_plan(view: &DirectoryView, opts: &ProxyOptions) -> CapturePlan {
    let mut plan = CapturePlan {
        outbound_port: opts.outbound_port,
        dns_resolvers: opts.dns_resolvers.clone(),
        ..Default::default()
    };
    for w in &view.local {
        if let strait_control::registry::Selector::Uid(u) = w.selector {
            plan.workload_uids.insert(u);
        }
        plan.strict_ports
            .extend(w.ports.iter().filter(|p| !p.permissive).map(|p| p.port));
        plan.permissive_ports
            .extend(w.ports.iter().filter(|p| p.permissive).map(|p| p.port));
    }
    plan
}

async fn fetch_cert(
    client: &NodeClient,
    certs: &CertStore,
    id: &SpiffeId,
) -> anyhow::Result<Arc<WorkloadCert>> {
    let (svid, not_after) = client.workload_svid(id).await?;
    let cert = WorkloadCert::new(svid, not_after, certs.next_generation())?;
    certs.insert(cert);
    certs.get(id).context("certificate vanished")
}

/// Renews one workload's certificate at half life, forever; on failure it keeps the current certificate
/// and retries with capped exponential backoff.
async fn keep_cert(
    client: Arc<ArcSwap<NodeClient>>,
    certs: Arc<CertStore>,
    metrics: Arc<Metrics>,
    id: SpiffeId,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let wait = certs
            .get(&id)
            .map(|c| {
                c.renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match fetch_cert(&client.load(), &certs, &id).await {
            Ok(c) => {
                metrics.cert_renewals.inc();
                backoff = Duration::from_millis(250);
                info!(workload = %id, generation = c.generation, not_after = %humantime::format_rfc3339_seconds(c.not_after), "workload certificate renewed");
            }
            Err(e) => {
                metrics.cert_renewal_failures.inc();
                warn!(workload = %id, error = %format!("{e:#}"), retry_in = ?backoff, "certificate renewal failed; keeping the current certificate");
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
    shared: Arc<Shared>,
    mut identity: NodeIdentity,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let now = SystemTime::now();
        let life = identity.not_after.duration_since(now).unwrap_or_default();
        tokio::time::sleep(life / 2).await;
        let renewed = client.load().renew(advert(&opts)).await;
        match renewed.map_err(anyhow::Error::from).and_then(|id| {
            id.save(&opts.data_dir)?;
            let c = NodeClient::new(&opts.control, &id)?;
            Ok((id, c))
        }) {
            Ok((id, c)) => {
                shared
                    .node_not_after
                    .store(unix(id.not_after), Ordering::Relaxed);
                client.store(Arc::new(c));
                identity = id;
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

/// Binds the IPv4 address and, when the host has IPv6, the IPv6 one.
fn bind_pair(v4: SocketAddr, v6: SocketAddr) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = vec![bind(v4).with_context(|| format!("cannot listen on {v4} (in use?)"))?];
    match bind(v6) {
        Ok(l) => out.push(l),
        Err(e) => warn!(addr = %v6, error = %e, "no IPv6 listener (IPv6 disabled on this host?)"),
    }
    Ok(out)
}

pub async fn run(
    opts: ProxyOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if opts.addresses.is_empty() {
        bail!("give this node's address with --address (repeat for IPv6)");
    }
    let identity = node_identity(&opts).await?;
    let client = Arc::new(ArcSwap::from_pointee(NodeClient::new(
        &opts.control,
        &identity,
    )?));
    let directory = client
        .load()
        .directory()
        .await
        .context("fetching the mesh directory")?;
    let view = DirectoryView::build(directory, &opts.node);
    info!(
        revision = view.revision,
        local = view.local.len(),
        "directory fetched"
    );

    let certs = Arc::new(CertStore::default());
    for w in &view.local {
        fetch_cert(&client.load(), &certs, &w.id)
            .await
            .with_context(|| format!("obtaining the SVID of {}", w.id))?;
    }
    let metrics = Arc::new(Metrics::default());
    let policy = match &opts.policy_bundle {
        Some(path) => Some(
            crate::authz::LoadedPolicy::load(path)
                .with_context(|| format!("loading the policy bundle {}", path.display()))?,
        ),
        None => {
            warn!("no --policy-bundle: every request and connection will be denied (fail closed)");
            None
        }
    };
    if let Some(p) = &policy {
        info!(revision = %p.revision, dry_run = p.dry_run, "policy bundle loaded");
    }
    let authz = Arc::new(crate::authz::Authz::new(
        policy,
        opts.decision_log_allow_sample,
    ));
    let plan = capture_plan(&view, &opts);
    let ctx = Arc::new(Ctx::new(
        certs.clone(),
        view,
        identity.bundle.clone(),
        metrics.clone(),
        opts.addresses.clone(),
        opts.egress.clone(),
        authz.clone(),
    ));

    // Listeners before the rules, so no captured connection ever meets a closed port while we start.
    let outbound = bind_pair(
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), opts.outbound_port),
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), opts.outbound_port),
    )?;
    let inbound = bind_pair(
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), opts.tunnel_port),
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), opts.tunnel_port),
    )?;
    let admin = TcpListener::bind(opts.admin)
        .await
        .with_context(|| format!("cannot listen on {} for the admin endpoint", opts.admin))?;
    capture::apply(&plan).context("installing the nftables rules")?;
    info!(uids = ?plan.workload_uids, ports = ?plan.strict_ports, "capture rules installed");

    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        registry: metrics.register(),
        node_id: identity.id().clone(),
        capture: ArcSwap::from_pointee(plan),
        node_not_after: AtomicU64::new(unix(identity.not_after)),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
    });

    let tls = tunnel::inbound_tls(&ctx)?;
    let mut listeners: Vec<JoinHandle<()>> = Vec::new();
    for l in outbound {
        listeners.push(tokio::spawn(tunnel::serve_outbound(ctx.clone(), l)));
    }
    for l in inbound {
        listeners.push(tokio::spawn(tunnel::serve_inbound(
            ctx.clone(),
            l,
            tls.clone(),
        )));
    }
    let admin_task = tokio::spawn(crate::admin::serve(shared.clone(), admin));

    let mut background: Vec<JoinHandle<()>> = Vec::new();
    if let Some(path) = &opts.policy_bundle {
        background.push(tokio::spawn(crate::authz::watch(
            authz.clone(),
            path.clone(),
            Duration::from_secs(1),
        )));
    }
    background.push(tokio::spawn(keep_node_cert(
        opts.clone(),
        client.clone(),
        shared.clone(),
        identity,
    )));
    let mut cert_tasks: HashMap<SpiffeId, JoinHandle<()>> = HashMap::new();
    for w in &ctx.dir.load().local {
        cert_tasks.insert(
            w.id.clone(),
            tokio::spawn(keep_cert(
                client.clone(),
                certs.clone(),
                metrics.clone(),
                w.id.clone(),
            )),
        );
    }
    shared.ready.store(true, Ordering::SeqCst);
    info!(admin = %opts.admin, "proxy ready");

    // Directory refresh (the policy distributor will push instead of this poll).
    let refresh = {
        let (opts, client, shared, certs, metrics) = (
            opts.clone(),
            client.clone(),
            shared.clone(),
            certs.clone(),
            metrics.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(opts.refresh_interval).await;
                let dir = match client.load().directory().await {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "directory refresh failed; keeping the current one");
                        continue;
                    }
                };
                if dir.revision == shared.ctx.dir.load().revision {
                    continue;
                }
                let view = DirectoryView::build(dir, &opts.node);
                let local: BTreeSet<SpiffeId> = view.local.iter().map(|w| w.id.clone()).collect();
                for id in &local {
                    if !cert_tasks.contains_key(id) {
                        if let Err(e) = fetch_cert(&client.load(), &certs, id).await {
                            warn!(workload = %id, error = %format!("{e:#}"), "cannot get a certificate for a new workload");
                        }
                        cert_tasks.insert(
                            id.clone(),
                            tokio::spawn(keep_cert(
                                client.clone(),
                                certs.clone(),
                                metrics.clone(),
                                id.clone(),
                            )),
                        );
                    }
                }
                cert_tasks.retain(|id, task| {
                    let keep = local.contains(id);
                    if !keep {
                        task.abort();
                        certs.remove(id);
                    }
                    keep
                });
                let plan = capture_plan(&view, &opts);
                info!(
                    revision = view.revision,
                    local = local.len(),
                    "directory updated"
                );
                shared.ctx.dir.store(Arc::new(view));
                if **shared.capture.load() != plan {
                    match capture::apply(&plan) {
                        Ok(()) => shared.capture.store(Arc::new(plan)),
                        Err(e) => {
                            error!(error = %e, "cannot update the nftables rules; the previous rules stay")
                        }
                    }
                }
            }
        })
    };
    background.push(refresh);

    shutdown.await;
    info!("shutting down: refusing new connections, draining");
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
    admin_task.abort();
    capture::remove().context("removing the nftables rules")?;
    info!("capture rules removed; bye");
    Ok(())
}
