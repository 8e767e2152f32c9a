//! The data path: captured outbound connections are carried to the destination node as HTTP/2 CONNECT
//! streams over mutual TLS 1.3 (as Istio's HBONE), one TLS connection per (source workload, destination
//! workload) shared by all their streams; the inbound side checks the peer and forwards to the local
//! workload.
//!
//! Outbound, the client certificate is the *source workload's* SVID and the server must prove the
//! *destination workload's* SPIFFE ID (asked for by SNI). Inbound, the peer's ID comes from its verified
//! certificate. Bytes are copied with back-pressure (HTTP/2 flow control end to end) and half-closes pass
//! through: a client that shuts down its write side still receives the response.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use strait_ca::verify::{explain_io, peer_id, PeerRole, SvidClientVerifier, SvidServerVerifier};
use strait_ca::{PeerIdMatcher, SharedBundle, SpiffeId};
use strait_proto::registry::Workload;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::certs::{sni_for, CertStore, InboundResolver, SourceCert};
use crate::directory::{DirectoryView, Via};
use crate::h2stream::{H2Stream, Refused};
use crate::metrics::{Direction, Metrics};
use crate::sockets::{client_uid, connect_marked, original_dst};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 windows sized for throughput on a LAN: the defaults (64 KiB) cap a stream at a few MB/s with
/// any latency.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
pub(crate) const CONN_WINDOW: u32 = 16 << 20;
/// Frames up to 1 MiB: a bulk transfer takes fewer frames (ztunnel uses the same).
pub(crate) const MAX_FRAME: u32 = 1 << 20;

/// Destinations outside the mesh that workloads may reach directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub addr: IpAddr,
    pub prefix: u8,
    /// `None`: any port.
    pub port: Option<u16>,
}

impl EgressRule {
    /// `CIDR[:PORT]`, e.g. `10.1.2.0/24:443` or `[fd00::/64]:443` or `192.0.2.7`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("{s:?}: expected CIDR or CIDR:PORT, e.g. 10.1.2.0/24:443 or [fd00::/64]:443")
        };
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(bad)?;
            (net, after.strip_prefix(':'))
        } else if s.matches(':').count() == 1 {
            let (n, p) = s.split_once(':').ok_or_else(bad)?;
            (n, Some(p))
        } else {
            (s, None)
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (net, if net.contains(':') { 128 } else { 32 }),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| bad()))
            .transpose()?;
        Ok(Self { addr, prefix, port })
    }

    pub fn allows(&self, dst: SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != dst.port()) {
            return false;
        }
        match (self.addr, dst.ip()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Counts open connections so that shutdown can wait for them to drain.
#[derive(Default)]
pub struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

pub struct InflightGuard<'a>(&'a Inflight);

impl Inflight {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Counts one more connection if fewer than `max` are open (atomically: a burst of accepts cannot
    /// overshoot the cap). The reservation is held by the guard [`Inflight::adopt`] returns.
    pub fn try_reserve(&self, max: usize) -> bool {
        self.count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                (c < max).then_some(c + 1)
            })
            .is_ok()
    }

    /// The guard of a reservation made with [`Inflight::try_reserve`] (released when dropped).
    pub fn adopt(&self) -> InflightGuard<'_> {
        InflightGuard(self)
    }

    /// Resolves when no connection is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything the data path shares.
pub struct Ctx {
    pub certs: Arc<CertStore>,
    pub dir: ArcSwap<DirectoryView>,
    /// Replaced when the node's renewal brings a new trust bundle (CA rotation); each handshake reads it.
    /// Replace it with [`crate::trust::replace_bundle`], so open tunnels check their peers again.
    pub bundle: Arc<SharedBundle>,
    /// Bumped when `bundle` changes ([`crate::trust`]).
    pub trust_epoch: crate::trust::Epoch,
    /// Bumped when a new directory is in force: partners' open streams check their export again.
    pub dir_epoch: tokio::sync::watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    /// This node's addresses: inbound streams may only target these (or loopback).
    pub node_addrs: Vec<IpAddr>,
    pub egress: Vec<EgressRule>,
    pub inflight: Inflight,
    pub authz: Arc<crate::authz::Authz>,
    /// How captured connections reach the outbound listener, hence how their source is recognised.
    pub mode: crate::capture::CaptureMode,
    /// `auto` ports: how long to wait for the client's first bytes.
    pub auto_detect_timeout: Duration,
    /// An inbound stream that moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections carried at once; past it new ones are refused at once.
    pub max_connections: usize,
    /// The DNS proxy, and the addresses it resolved for the egress check.
    pub dns: crate::dns::Dns,
    pool: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// Partners' gateways that failed lately, and when: tried after the others for a while.
    pub(crate) gateways_failed: Mutex<HashMap<SocketAddr, std::time::Instant>>,
}

/// Streams one pooled tunnel carries at most before another is opened beside it (ztunnel uses 100 too):
/// more connections spread the TLS work over the cores, and no caller ever waits for a free stream.
pub const STREAMS_PER_TUNNEL: usize = 100;

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    src: SpiffeId,
    dst: SpiffeId,
    /// The node tunnel dialled, or `None` through the partner's gateways (whichever: a change of the
    /// partner's gateway list must not orphan the tunnels open through them).
    tunnel: Option<SocketAddr>,
    /// Through a gateway: the port the gateway admitted the tunnel's stream for (a partner's gateway
    /// checks the export per workload and port). 0 for a direct tunnel, which carries every port.
    port: u16,
    /// Opened through this organisation's egress gateways: once egress is turned on (or off), new
    /// streams stop using the tunnels opened the other way.
    egress: bool,
}

struct Pooled {
    sender: SendRequest<Bytes>,
    /// Set when the connection's task ends (h2's sender cannot tell).
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The source certificate generation the connection was opened with.
    generation: u64,
    /// Streams open on it now.
    streams: Arc<AtomicUsize>,
}

/// One stream's place on a pooled tunnel, given back when the stream ends.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        Self(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            addrs: Vec::new(),
            egress: Vec::new(),
            mode: Default::default(),
            auto_detect_timeout: crate::l7::limits::FIRST_BYTES_TIMEOUT,
            idle_timeout: crate::l7::limits::IDLE_TIMEOUT,
            max_connections: usize::MAX,
            dns: Default::default(),
        }
    }
}

/// What the data path needs to know about the node it runs on.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's addresses (VM workloads are reached on them).
    pub addrs: Vec<IpAddr>,
    /// Destinations outside the mesh that workloads may reach.
    pub egress: Vec<EgressRule>,
    pub mode: crate::capture::CaptureMode,
    /// `auto` ports: how long to wait for the client's first bytes (default 30 s).
    pub auto_detect_timeout: Duration,
    /// Inbound streams idle this long are closed (default 1 h).
    pub idle_timeout: Duration,
    /// Most connections (outbound connections plus inbound streams) carried at once.
    pub max_connections: usize,
    pub dns: crate::dns::DnsSettings,
}

impl Ctx {
    pub fn new(
        certs: Arc<CertStore>,
        dir: DirectoryView,
        bundle: Arc<SharedBundle>,
        metrics: Arc<Metrics>,
        node: NodeSettings,
        authz: Arc<crate::authz::Authz>,
    ) -> Self {
        let NodeSettings {
            addrs: node_addrs,
            egress,
            mode,
            auto_detect_timeout,
            idle_timeout,
            max_connections,
            dns,
        } = node;
        Self {
            certs,
            dir: ArcSwap::from_pointee(dir),
            bundle,
            trust_epoch: tokio::sync::watch::channel(0).0,
            dir_epoch: tokio::sync::watch::channel(0).0,
            metrics,
            node_addrs,
            egress,
            inflight: Inflight::default(),
            authz,
            mode,
            auto_detect_timeout,
            idle_timeout,
            max_connections,
            dns: crate::dns::Dns::new(dns),
            pool: Mutex::new(HashMap::new()),
            gateways_failed: Mutex::new(HashMap::new()),
        }
    }

    fn gateway_failed(&self, gw: SocketAddr) {
        if let Ok(mut m) = self.gateways_failed.lock() {
            m.insert(gw, std::time::Instant::now());
        }
    }

    pub fn pooled_tunnels(&self) -> usize {
        self.pool
            .lock()
            .map(|p| p.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------------
// Outbound

/// Accepts captured connections on the outbound port until the task is dropped.
pub async fn serve_outbound(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if !ctx.inflight.try_reserve(ctx.max_connections) {
            // Closed at once: the caller sees the connection end, not one that hangs.
            ctx.metrics.refuse("outbound", "over_capacity");
            drop(tcp);
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _guard = ctx.inflight.adopt();
            outbound(&ctx, tcp, peer).await;
        });
    }
}

async fn outbound(ctx: &Ctx, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let dir = Direction {
        direction: "outbound",
    };
    let view = ctx.dir.load_full();
    let Some((src, dst)) = source_and_destination(ctx, &view, &tcp, peer) else {
        return;
    };
    // A partner's import is taken only by a source whose policy reaches it: an address a partner claims
    // never turns a destination this source may reach as egress into a refusal.
    let route = view.route(dst);
    let unreached_import = route
        .as_ref()
        .filter(|r| r.imported && !ctx.authz.reachable(src.id.as_str(), r.workload.id.as_str()))
        .map(|r| r.workload.id.clone());
    let route = route.filter(|_| unreached_import.is_none());
    let Some(route) = route else {
        // With egress through the gateways on, nothing reaches a partner around them: not an import's
        // address, nor where a partner's import is reached, even if a plain egress rule covers it.
        if view.egress.is_some() && (unreached_import.is_some() || view.import_reach(dst).is_some())
        {
            ctx.metrics.refuse("outbound", "egress_through_gateways");
            warn!(src = %src.id, %dst, "a partner's address outside a tunnel while egress goes through the gateways; refused");
            return;
        }
        if ctx.egress.iter().any(|r| r.allows(dst))
            || ctx.authz.egress_allowed(src.id.as_str(), dst)
            || ctx.dns.egress_allowed(&ctx.authz, src.id.as_str(), dst)
        {
            return egress(ctx, tcp, &src, dst).await;
        }
        if let Some(imported) = unreached_import {
            ctx.metrics.refuse("outbound", "not_in_policy");
            warn!(src = %src.id, dst = %imported, %dst, "no step of the policy lets this source reach that destination; refused before leaving the host");
            return;
        }
        ctx.metrics.refuse("outbound", "outside_mesh");
        warn!(src = %src.id, %dst, "destination outside the mesh and not an allowed egress; refused");
        return;
    };
    // The egress check: a flow the policy does not contain never leaves this host.
    if !ctx
        .authz
        .reachable(src.id.as_str(), route.workload.id.as_str())
    {
        ctx.metrics.refuse("outbound", "not_in_policy");
        warn!(src = %src.id, dst = %route.workload.id, %dst, "no step of the policy lets this source reach that destination; refused before leaving the host");
        return;
    }
    ctx.metrics.connections.get_or_create(&dir).inc();
    let active = ctx.metrics.active.get_or_create(&dir).clone();
    active.inc();
    let result = tunnel(ctx, tcp, &src, &route.workload, &route.via, dst).await;
    active.dec();
    match result {
        Ok((sent, received)) => {
            ctx.metrics.bytes_sent.get_or_create(&dir).inc_by(sent);
            ctx.metrics
                .bytes_received
                .get_or_create(&dir)
                .inc_by(received);
            debug!(src = %src.id, dst = %route.workload.id, sent, received, "outbound connection closed");
        }
        Err(e) => {
            ctx.metrics.refuse("outbound", e.reason());
            warn!(src = %src.id, dst = %route.workload.id, %dst, error = %e, "outbound connection failed");
        }
    }
}

/// Who opened a captured connection and where it was going, or `None` (refused, logged and counted).
///
/// VM mode (`redirect`): the destination from `SO_ORIGINAL_DST`, the source workload from the Unix user
/// owning the client socket. Kubernetes mode (TPROXY): the connection keeps its original addresses, so the
/// destination is the accepted socket's local address and the source workload is the pod with the peer's
/// address. A pod cannot borrow another's address: the capture's strict reverse-path rule drops a meshed
/// address arriving on any interface but the one it is routed to, which on a routed CNI (one interface
/// per pod) is that pod's own. On a CNI that bridges pods on one interface this does not hold.
fn source_and_destination(
    ctx: &Ctx,
    view: &DirectoryView,
    tcp: &TcpStream,
    peer: SocketAddr,
) -> Option<(Arc<Workload>, SocketAddr)> {
    match ctx.mode {
        crate::capture::CaptureMode::Vm => {
            let dst = match original_dst(tcp) {
                // A connection made to the outbound port itself (a workload's traffic to loopback is not
                // redirected): conntrack's original destination is the port it reached.
                Ok(d) if tcp.local_addr().is_ok_and(|l| l == d) => {
                    ctx.metrics.refuse("outbound", "not_redirected");
                    warn!(%peer, "connection to the outbound port without a redirect; refused");
                    return None;
                }
                Ok(d) => d,
                Err(e) => {
                    // Not a redirected connection: someone connected to the outbound port directly.
                    ctx.metrics.refuse("outbound", "not_redirected");
                    warn!(%peer, error = %e, "connection to the outbound port without a redirect; refused");
                    return None;
                }
            };
            let uid = match client_uid(tcp, peer, dst) {
                Ok(Some(uid)) => uid,
                other => {
                    ctx.metrics.refuse("outbound", "unknown_source");
                    warn!(%peer, %dst, ?other, "cannot tell which user opened this connection; refused");
                    return None;
                }
            };
            let Some(src) = view.local_by_uid(uid).cloned() else {
                ctx.metrics.refuse("outbound", "unregistered_source");
                warn!(%peer, %dst, uid, "connection from a user that is not a registered workload; refused");
                return None;
            };
            Some((src, dst))
        }
        crate::capture::CaptureMode::Kubernetes => {
            let dst = match tcp.local_addr() {
                Ok(d) if !d.ip().is_loopback() => d,
                other => {
                    ctx.metrics.refuse("outbound", "not_redirected");
                    warn!(%peer, local = ?other, "connection to the outbound port that was not diverted by TPROXY; refused");
                    return None;
                }
            };
            let Some(src) = view.local_by_ip(peer.ip()).cloned() else {
                ctx.metrics.refuse("outbound", "unregistered_source");
                warn!(%peer, %dst, "connection from an address that is not a meshed pod on this node; refused");
                return None;
            };
            Some((src, dst))
        }
    }
}

async fn egress(ctx: &Ctx, mut tcp: TcpStream, src: &Workload, dst: SocketAddr) {
    match connect_marked(dst, CONNECT_TIMEOUT).await {
        Ok(mut upstream) => {
            info!(src = %src.id, %dst, "allowed egress");
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
        }
        Err(e) => {
            ctx.metrics.refuse("outbound", "egress_unreachable");
            warn!(src = %src.id, %dst, error = %e, "allowed egress destination unreachable");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("no certificate for the source workload yet")]
    NoSourceCert,
    #[error("cannot reach the destination node's tunnel port: {0}")]
    Connect(std::io::Error),
    #[error("mTLS with the destination node failed: {0}")]
    Tls(String),
    #[error("tunnel HTTP/2 error: {0}")]
    Http(String),
    #[error("the destination proxy refused the stream: HTTP {0}")]
    Refused(StatusCode),
}

impl TunnelError {
    fn reason(&self) -> &'static str {
        match self {
            TunnelError::NoSourceCert => "no_source_cert",
            TunnelError::Connect(_) => "tunnel_unreachable",
            TunnelError::Tls(_) => "tunnel_tls",
            TunnelError::Http(_) => "tunnel_http",
            TunnelError::Refused(_) => "tunnel_refused",
        }
    }
}

/// Opens a tunnel connection from `src` to `dst`: mutual TLS 1.3 and HTTP/2, over TCP to the node's
/// tunnel listener or, through a partner's gateway, inside a CONNECT stream of an outer tunnel to the
/// gateway (double HBONE: the gateway carries the inner TLS, it cannot read it).
async fn open_tunnel(
    ctx: &Ctx,
    src: &SpiffeId,
    dst: &SpiffeId,
    via: &Via,
    port: u16,
    through_egress_gateways: bool,
) -> Result<(SendRequest<Bytes>, Arc<std::sync::atomic::AtomicBool>), TunnelError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TunnelError::Tls(e.to_string()))?
        .dangerous() // the verifier checks the chain and that the server is exactly `dst`
        .with_custom_certificate_verifier(Arc::new(SvidServerVerifier::shared(
            ctx.bundle.clone(),
            PeerIdMatcher::Exact(dst.clone()),
        )))
        .with_client_cert_resolver(Arc::new(SourceCert {
            store: ctx.certs.clone(),
            id: src.clone(),
        }));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    match via {
        Via::Tunnel(addr) => {
            // Decided once with the pool key, so a tunnel pooled as "through egress" never went direct.
            if through_egress_gateways {
                // The tunnel to the partner inside a stream through this organisation's gateway; none
                // up: refused, never dialled directly.
                let egress = egress_gateways(ctx).unwrap_or_default();
                let target = addr.to_string();
                return through_gateways(ctx, dst, &tls, &egress, "egress", |gw| {
                    connect_stream(ctx, src, gw, target.clone())
                })
                .await;
            }
            let tcp = connect_marked(*addr, CONNECT_TIMEOUT)
                .await
                .map_err(TunnelError::Connect)?;
            handshake(ctx, tls, dst, tcp, None).await
        }
        Via::Gateways(gateways) => {
            // Named as the tunnel's SNI name, not an address: the partner's private addresses are not
            // known here.
            let target = format!("{}:{port}", sni_for(dst));
            through_gateways(ctx, dst, &tls, gateways, "partner", |gw| {
                connect_stream(ctx, src, gw, target.clone())
            })
            .await
        }
    }
}

/// The tunnel to `dst` inside a CONNECT stream that `stream` opens through one of `gateways`, tried in
/// [`crate::gateway::in_order`]: the next one when a gateway cannot be reached, is not the identity
/// named, or answers 5xx (not ready, overloaded, its path onwards down). Any other answer is final: the
/// partner's (not exported) or the destination's (its certificate, its refusal) would be the same
/// through any gateway. `which` names them in the log ("partner", "egress").
async fn through_gateways<'g, F, Fut>(
    ctx: &Ctx,
    dst: &SpiffeId,
    tls: &Arc<rustls::ClientConfig>,
    gateways: &'g [strait_proto::api::GatewayRef],
    which: &str,
    mut stream: F,
) -> Result<(SendRequest<Bytes>, Arc<std::sync::atomic::AtomicBool>), TunnelError>
where
    F: FnMut(&'g strait_proto::api::GatewayRef) -> Fut,
    Fut: std::future::Future<Output = Result<(H2Stream, StreamSlot), TunnelError>>,
{
    let mut last = TunnelError::Connect(std::io::Error::other(if which == "egress" {
        "connections to partners leave through this organisation's gateways (strait federation egress), and none is up".to_owned()
    } else {
        format!("the partner named no {which} gateway")
    }));
    for gw in crate::gateway::in_order(ctx, gateways) {
        let failed = match stream(gw).await {
            Err(e) => e,
            Ok((s, slot)) => match handshake(ctx, tls.clone(), dst, s, Some(slot)).await {
                Ok(t) => return Ok(t),
                Err(TunnelError::Refused(status)) if status.is_server_error() => {
                    TunnelError::Refused(status)
                }
                Err(e) => return Err(e),
            },
        };
        ctx.gateway_failed(gw.address);
        warn!(gateway = %gw.address, id = %gw.id, error = %failed, "{which} gateway unusable; trying the next");
        last = failed;
    }
    Err(last)
}

impl Ctx {
    /// Egress through the gateways was turned on (`egress`) or off: the pooled tunnels to partners
    /// opened the other way leave the pool (their open streams finish; an idle one closes once no sender
    /// is left).
    pub(crate) fn forget_partner_tunnels(&self, egress: bool) {
        let own = self.bundle.load().trust_domain().clone();
        if let Ok(mut p) = self.pool.lock() {
            let before = p.len();
            p.retain(|k, _| k.dst.is_member_of(&own) || k.egress == egress);
            info!(
                egress_through_gateways = egress,
                forgotten = before - p.len(),
                "egress changed: pooled tunnels to partners opened the other way are no longer used"
            );
        }
    }
}

/// Whether a tunnel to `dst` must go through this organisation's egress gateways (egress is on and
/// `dst` is a partner's).
fn egress_on(ctx: &Ctx, dst: &SpiffeId) -> bool {
    ctx.dir.load().egress.is_some() && !dst.is_member_of(ctx.bundle.load().trust_domain())
}

/// This organisation's gateways while egress through them is on (`None`: off).
fn egress_gateways(ctx: &Ctx) -> Option<Vec<strait_proto::api::GatewayRef>> {
    let own = ctx.bundle.load().trust_domain().clone();
    let view = ctx.dir.load();
    let gateways = view.egress.as_ref()?;
    Some(
        gateways
            .iter()
            .filter_map(|(address, name)| {
                Some(strait_proto::api::GatewayRef {
                    address: *address,
                    id: SpiffeId::node(&own, name.as_str()).ok()?,
                })
            })
            .collect(),
    )
}

/// A CONNECT stream for `authority` through the gateway `gw`, on a pooled tunnel to it that presents
/// `src`'s certificate and must prove exactly the gateway's identity (the same code opens that tunnel
/// as any other; a gateway is never reached through a gateway of its own kind).
async fn connect_stream(
    ctx: &Ctx,
    src: &SpiffeId,
    gw: &strait_proto::api::GatewayRef,
    authority: String,
) -> Result<(H2Stream, StreamSlot), TunnelError> {
    // Boxed: the tunnel to the gateway is opened by the same (recursive) code.
    let (mut outer, slot) =
        Box::pin(sender_for(ctx, src, &gw.id, &Via::Tunnel(gw.address), 0)).await?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|e| TunnelError::Http(e.to_string()))?;
    let (answer, send) = outer
        .send_request(req, false)
        .map_err(|e| TunnelError::Http(e.to_string()))?;
    Ok((H2Stream::opening(send, answer), slot))
}

/// TLS and HTTP/2 over `io` with the server `dst`; the connection is driven by a task of its own, which
/// also holds `outer` (the outer stream's place, through a gateway) for as long as it lives.
async fn handshake<T>(
    ctx: &Ctx,
    tls: Arc<rustls::ClientConfig>,
    dst: &SpiffeId,
    io: T,
    outer: Option<StreamSlot>,
) -> Result<(SendRequest<Bytes>, Arc<std::sync::atomic::AtomicBool>), TunnelError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let trust = crate::trust::watch(ctx);
    let name = ServerName::try_from(sni_for(dst)).map_err(|e| TunnelError::Tls(e.to_string()))?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, io),
    )
    .await
    .map_err(|_| TunnelError::Tls("handshake timed out".into()))?
    .map_err(|e| match Refused::of(&e) {
        // Through a gateway: the gateway refused the outer stream before the handshake could run.
        Some(status) => TunnelError::Refused(status),
        None => TunnelError::Tls(handshake_failed(ctx, "outbound", &e)),
    })?;
    let chain = crate::trust::PeerChain::of(tls.get_ref().1);
    let (sender, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| TunnelError::Http(e.to_string()))?;
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = closed.clone();
    let (metrics, peer) = (ctx.metrics.clone(), dst.clone());
    tokio::spawn(async move {
        let _outer = outer;
        let distrusted = async {
            match chain {
                Some(chain) => trust.distrusted(chain, PeerRole::Server).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = conn => if let Err(e) = ended {
                debug!(error = %e, "tunnel connection ended");
            },
            why = distrusted => {
                metrics.refuse("outbound", "peer_no_longer_trusted");
                warn!(%peer, reason = %why, "tunnel closed: its peer's certificate no longer verifies against the trust bundle");
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    ctx.metrics.tunnels_opened.inc();
    Ok((sender, closed))
}

/// A ready sender for (src, dst) and the stream's slot on it: a pooled tunnel that is alive, was opened
/// with the source's current certificate and has room for another stream, otherwise a new tunnel beside
/// the others. The pool lock is never held across an await.
async fn sender_for(
    ctx: &Ctx,
    src: &SpiffeId,
    dst: &SpiffeId,
    via: &Via,
    port: u16,
) -> Result<(SendRequest<Bytes>, StreamSlot), TunnelError> {
    let generation = ctx
        .certs
        .get(src)
        .ok_or(TunnelError::NoSourceCert)?
        .generation;
    let key = PoolKey {
        src: src.clone(),
        dst: dst.clone(),
        tunnel: match via {
            Via::Tunnel(t) => Some(*t),
            Via::Gateways(_) => None,
        },
        port,
        egress: egress_on(ctx, dst),
    };
    let through_egress_gateways = key.egress;
    let cached = ctx.pool.lock().ok().and_then(|mut p| {
        let conns = p.get_mut(&key)?;
        // Closed tunnels and those of an older certificate leave the pool.
        conns.retain(|e| e.generation == generation && !e.closed.load(Ordering::Relaxed));
        conns
            .iter()
            .find(|e| e.streams.load(Ordering::Relaxed) < STREAMS_PER_TUNNEL)
            .map(|e| (e.sender.clone(), StreamSlot::take(&e.streams)))
    });
    if let Some((s, slot)) = cached {
        if let Ok(s) = s.ready().await {
            return Ok((s, slot));
        }
    }
    let (sender, closed) = open_tunnel(ctx, src, dst, via, port, through_egress_gateways).await?;
    let streams = Arc::new(AtomicUsize::new(0));
    let slot = StreamSlot::take(&streams);
    if let Ok(mut p) = ctx.pool.lock() {
        p.entry(key).or_default().push(Pooled {
            sender: sender.clone(),
            closed,
            generation,
            streams,
        });
    }
    let sender = sender
        .ready()
        .await
        .map_err(|e| TunnelError::Http(e.to_string()))?;
    Ok((sender, slot))
}

async fn tunnel(
    ctx: &Ctx,
    mut tcp: TcpStream,
    src: &Workload,
    dst: &Workload,
    via: &Via,
    target: SocketAddr,
) -> Result<(u64, u64), TunnelError> {
    // Through a gateway the target is the workload's port: the address dialled here is a local virtual
    // one, meaningless at the destination, which serves the workload it authenticated as.
    let (authority, port) = match via {
        Via::Tunnel(_) => (target.to_string(), 0),
        Via::Gateways(_) => (
            format!("{}:{}", sni_for(&dst.id), target.port()),
            target.port(),
        ),
    };
    let (mut sender, _slot) = sender_for(ctx, &src.id, &dst.id, via, port).await?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|e| TunnelError::Http(e.to_string()))?;
    let (answer, send) = sender
        .send_request(req, false)
        .map_err(|e| TunnelError::Http(e.to_string()))?;
    // The caller's first bytes go out without waiting for the answer (one round trip less per new
    // connection); the first read waits for it, and a refusal ends the copy with `Refused`.
    let mut stream = H2Stream::opening(send, answer);
    match tokio::io::copy_bidirectional(&mut tcp, &mut stream).await {
        Ok(bytes) => Ok(bytes),
        Err(e) if !stream.answered() => Err(match Refused::of(&e) {
            Some(status) => TunnelError::Refused(status),
            None => TunnelError::Http(e.to_string()),
        }),
        // A reset by either end after data flowed is the end of a connection, not a tunnel failure.
        Err(e) => {
            debug!(error = %e, "outbound copy ended with an error");
            let _ = tcp.shutdown().await;
            Ok((0, 0))
        }
    }
}

/// Counts a failed handshake under a bounded reason label and returns the readable reason.
pub(crate) fn handshake_failed(ctx: &Ctx, direction: &'static str, err: &std::io::Error) -> String {
    let reason = explain_io(err);
    // The verifiers' own refusals are labelled by their kind: their messages name peer IDs, which
    // would make the label set unbounded.
    let kind = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(strait_ca::verify::rejection_kind);
    let label = match kind {
        Some(k) => format!("{k:?}"),
        None => reason_label(&reason),
    };
    ctx.metrics
        .handshake_errors
        .get_or_create(&crate::metrics::Reason {
            direction,
            reason: label,
        })
        .inc();
    reason
}

fn reason_label(reason: &str) -> String {
    // A bounded label set: the first words of the verifier's message.
    reason
        .split(':')
        .nth(1)
        .unwrap_or(reason)
        .split_whitespace()
        .take(4)
        .collect::<Vec<_>>()
        .join("_")
}

// ---------------------------------------------------------------------------------------------------
// Inbound

pub fn inbound_tls(ctx: &Ctx) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    // Any workload of the trust domain may open a tunnel; which requests it may make is for the
    // authorization layer to decide per stream.
    let mut cfg = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SvidClientVerifier::shared(
            ctx.bundle.clone(),
            PeerIdMatcher::AnyInTrustDomain,
            true,
        )))
        .with_cert_resolver(Arc::new(InboundResolver(ctx.certs.clone())));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts tunnel connections until the task is dropped.
pub async fn serve_inbound(ctx: Arc<Ctx>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let admit = |ctx: &Ctx, conn: &rustls::ServerConnection| {
        let (Some(src), Some(dst)) = (
            peer_id(conn),
            conn.server_name()
                .and_then(|sni| ctx.certs.by_sni(sni))
                .map(|c| c.svid.id.clone()),
        ) else {
            ctx.metrics.refuse("inbound", "no_identity");
            return None;
        };
        if !ctx.dir.load().local.iter().any(|w| w.id == dst) {
            ctx.metrics.refuse("inbound", "unknown_destination");
            return None;
        }
        Some((src, dst))
    };
    let stream = |ctx: &Arc<Ctx>, (src, dst): &(SpiffeId, SpiffeId), peer, req, respond| {
        inbound_stream(ctx.clone(), src.clone(), dst.clone(), peer, req, respond)
    };
    let port = TunnelPort {
        direction: "inbound",
        max_streams: 4 * STREAMS_PER_TUNNEL as u32,
    };
    serve_tunnels(ctx, listener, tls, port, admit, stream).await
}

/// A port where tunnels are accepted: the node's, or a gateway's.
pub(crate) struct TunnelPort {
    /// The metrics' and logs' name for it.
    pub direction: &'static str,
    /// Streams one connection may have open at once.
    pub max_streams: u32,
}

/// The server side of every tunnel port. Accepts TCP connections until the task is dropped, runs the
/// mTLS handshake, lets `admit` decide on the verified connection (and derive what its streams need from
/// the peer's identity and SNI), then serves HTTP/2 and hands each stream to `stream` until the peer goes
/// away or its certificate no longer verifies against the trust bundle. Pooled tunnel connections stay
/// open while idle, so they are not counted for draining; their streams are.
pub(crate) async fn serve_tunnels<T, A, S>(
    ctx: Arc<Ctx>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    port: TunnelPort,
    admit: A,
    stream: S,
) where
    T: Send + 'static,
    A: Fn(&Ctx, &rustls::ServerConnection) -> Option<T> + Copy + Send + 'static,
    S: Fn(&Arc<Ctx>, &T, SocketAddr, Request<h2::RecvStream>, h2::server::SendResponse<Bytes>)
        + Copy
        + Send
        + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let TunnelPort {
        direction,
        max_streams,
    } = port;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, direction, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (ctx, acceptor) = (ctx.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let trust = crate::trust::watch(&ctx);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    let reason = handshake_failed(&ctx, direction, &e);
                    warn!(%peer, %reason, direction, "mTLS handshake refused");
                    return;
                }
                Err(_) => {
                    ctx.metrics.refuse(direction, "handshake_timeout");
                    return;
                }
            };
            let (_, conn) = tls.get_ref();
            let Some(admitted) = admit(&ctx, conn) else {
                return;
            };
            let src = peer_id(conn);
            let chain = crate::trust::PeerChain::of(conn);
            let handshake = h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_send_buffer_size(STREAM_WINDOW as usize)
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(tls);
            let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, direction, "tunnel HTTP/2 handshake failed");
                    return;
                }
                Err(_) => {
                    ctx.metrics.refuse(direction, "handshake_timeout");
                    return;
                }
            };
            // Polling accept drives the connection: every stream's frames go through here.
            let distrusted = async {
                match chain {
                    Some(chain) => trust.distrusted(chain, PeerRole::Client).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(distrusted);
            loop {
                let next = tokio::select! {
                    next = conn.accept() => next,
                    why = &mut distrusted => {
                        // Dropping the connection ends its streams: nothing more passes on that trust.
                        ctx.metrics.refuse(direction, "peer_no_longer_trusted");
                        warn!(%peer, src = ?src.as_ref().map(SpiffeId::as_str), reason = %why, direction, "tunnel closed: its peer's certificate no longer verifies against the trust bundle");
                        return;
                    }
                };
                match next {
                    Some(Ok((req, respond))) => stream(&ctx, &admitted, peer, req, respond),
                    Some(Err(e)) => {
                        debug!(%peer, error = %e, direction, "tunnel connection ended with an error");
                        return;
                    }
                    None => return,
                }
            }
        });
    }
}

/// Federation: a caller of another trust domain reaches only a workload exported to its trust domain,
/// and only on a TCP port the workload declares (and the export lists, if it lists any): a workload
/// without declared ports, which serves every port to local callers, serves none to partners.
/// Withdrawing the export refuses its next stream and its next request (refused, logged and counted
/// here). Callers of this trust domain pass.
pub fn exported(ctx: &Ctx, src: &SpiffeId, dst: &Workload, port: u16) -> bool {
    let partner = src.trust_domain_str();
    if partner == ctx.bundle.load().trust_domain().as_str()
        || ctx.dir.load().exported_to(dst, partner, port)
    {
        return true;
    }
    ctx.metrics.refuse("inbound", "not_exported");
    warn!(%src, dst = %dst.id, port, "the workload is not exported to the caller's trust domain on this port; refused (strait federation export)");
    false
}

/// Resolves once a directory without the export `src`'s trust domain needs for `dst` on `port` is in
/// force (taken when the stream starts: a change after the check at its opening is not missed).
async fn export_withdrawn(ctx: &Ctx, src: &SpiffeId, dst: &Workload, port: u16) {
    let mut epoch = ctx.dir_epoch.subscribe();
    epoch.mark_changed();
    loop {
        if epoch.changed().await.is_err() {
            return std::future::pending().await;
        }
        let current = ctx
            .dir
            .load()
            .local
            .iter()
            .find(|w| w.id == dst.id)
            .cloned();
        match current {
            Some(w) if exported(ctx, src, &w, port) => {}
            _ => return,
        }
    }
}

fn refuse_stream(mut respond: h2::server::SendResponse<Bytes>, code: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = code;
    let _ = respond.send_response(r, true);
}

/// One CONNECT stream: checks the target and, if allowed, answers 200 and serves the stream (by the port's
/// protocol) in a task of its own.
fn inbound_stream(
    ctx: Arc<Ctx>,
    src: SpiffeId,
    dst_id: SpiffeId,
    peer: SocketAddr,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    if req.method() != Method::CONNECT {
        ctx.metrics.refuse("inbound", "not_connect");
        return refuse_stream(respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let target = req
        .uri()
        .authority()
        .and_then(|a| match a.as_str().parse() {
            Ok(addr) => Some(addr),
            // Through a partner's gateway: `<SNI name of the workload>:<port>`, the workload the tunnel is
            // authenticated for, at the address it serves that port on.
            Err(_) if a.host() == sni_for(&dst_id) => {
                ctx.dir
                    .load()
                    .local_address(&dst_id, a.port_u16()?, &ctx.node_addrs)
            }
            Err(_) => None,
        });
    let Some(target) = target else {
        ctx.metrics.refuse("inbound", "bad_target");
        return refuse_stream(respond, StatusCode::BAD_REQUEST);
    };
    // Only an address and port of a local workload with the identity the peer asked for (the node's
    // addresses and declared ports for a VM workload, the pod's own address for a pod): a tunnel is not an
    // open relay to the node's other services or to other hosts.
    let Some(dst) = ctx
        .dir
        .load()
        .local_target(&dst_id, target, &ctx.node_addrs)
    else {
        ctx.metrics.refuse("inbound", "target_not_workload");
        warn!(%src, dst = %dst_id, %target, "stream to an address or port the workload does not serve; refused");
        return refuse_stream(respond, StatusCode::FORBIDDEN);
    };
    if !exported(&ctx, &src, &dst, target.port()) {
        return refuse_stream(respond, StatusCode::FORBIDDEN);
    }
    if !ctx.inflight.try_reserve(ctx.max_connections) {
        ctx.metrics.refuse("inbound", "over_capacity");
        return refuse_stream(respond, StatusCode::SERVICE_UNAVAILABLE);
    }
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            drop(ctx.inflight.adopt());
            debug!(%peer, error = %e, "stream reset before it was answered");
            return;
        }
    };
    let stream = H2Stream::new(send, req.into_body());
    tokio::spawn(async move {
        let _guard = ctx.inflight.adopt(); // reserved above
        let dir = Direction {
            direction: "inbound",
        };
        ctx.metrics.connections.get_or_create(&dir).inc();
        let active = ctx.metrics.active.get_or_create(&dir).clone();
        active.inc();
        let ends = crate::l7::Ends {
            src: src.clone(),
            dst: dst.clone(),
            peer_addr: peer,
            target,
        };
        if src.trust_domain_str() == ctx.bundle.load().trust_domain().as_str() {
            crate::l7::serve(ctx.clone(), stream, ends).await;
        } else {
            // A partner's stream (raw TCP or upgraded ones included) ends when its export is withdrawn.
            tokio::select! {
                () = crate::l7::serve(ctx.clone(), stream, ends) => {}
                () = export_withdrawn(&ctx, &src, &dst, target.port()) => {
                    info!(%src, dst = %dst.id, "partner's stream closed: the export it used was withdrawn");
                }
            }
        }
        active.dec();
        debug!(%src, dst = %dst.id, "inbound stream closed");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_rules_parse_and_match() {
        let r = EgressRule::parse("10.1.2.0/24:443").unwrap();
        assert!(r.allows("10.1.2.9:443".parse().unwrap()));
        assert!(!r.allows("10.1.3.9:443".parse().unwrap()));
        assert!(!r.allows("10.1.2.9:80".parse().unwrap()));
        let r = EgressRule::parse("[fd00::/64]:443").unwrap();
        assert!(r.allows("[fd00::1]:443".parse().unwrap()));
        assert!(!r.allows("10.1.2.9:443".parse().unwrap()));
        let r = EgressRule::parse("192.0.2.7").unwrap();
        assert!(r.allows("192.0.2.7:1".parse().unwrap()));
        assert!(EgressRule::parse("10.0.0.0/33").is_err());
        assert!(EgressRule::parse("nonsense").is_err());
    }
}
