//! The ingress gateway (`strait gateway`): the one address an organisation exposes to its partners for
//! the workloads it exports (docs/gateway.md).
//!
//! A partner's proxy opens an outer mTLS tunnel to the gateway with its *source workload's* SVID (the
//! gateway proves its own node identity, which the partner learnt from this organisation's exports) and
//! asks, per exported workload and port, for a CONNECT stream named `<SNI name of the workload>:<port>`.
//! The gateway admits a stream only from a workload of a federated trust domain (never its own), to a
//! workload exported to that trust domain on that port, and then splices the stream's bytes to the
//! exporting node's tunnel listener. What travels in the stream is the partner's inner mTLS tunnel,
//! end to end with the destination workload's proxy, which verifies and authorizes the real source:
//! the gateway holds no key that could read it (it has none but its own node key). Like Istio ambient's
//! double HBONE for multi-network meshes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use strait_ca::spiffe::IdKind;
use strait_ca::verify::{peer_id, PeerIdMatcher, SvidClientVerifier};
use strait_ca::SpiffeId;
use strait_proto::api::GatewayRef;
use strait_proto::registry::Workload;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::certs::InboundResolver;
use crate::h2stream::H2Stream;
use crate::l7::idle::{Activity, Watched};
use crate::metrics::GatewayLabels;
use crate::tunnel::{Ctx, TunnelPort};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A gateway that failed is tried after the others for this long.
const FAILED_FOR: Duration = Duration::from_secs(10);
/// Outer tunnels carry one stream per inner tunnel, each long-lived: fewer than a node's tunnel port.
const MAX_STREAMS_PER_CONNECTION: u32 = 1000;

/// The partner's gateways in the order to try them: those that have not failed lately first, starting
/// at a rotating position so that new tunnels spread over the replicas; then the ones that failed.
pub(crate) fn in_order<'a>(ctx: &Ctx, gateways: &'a [GatewayRef]) -> Vec<&'a GatewayRef> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let start = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let failed = ctx
        .gateways_failed
        .lock()
        .map(|mut m| {
            m.retain(|_, at| at.elapsed() < FAILED_FOR);
            m.keys().copied().collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let n = gateways.len().max(1);
    let mut order: Vec<&GatewayRef> = (0..gateways.len())
        .map(|i| &gateways[(start + i) % n])
        .collect();
    // Stable: the rotation stays among the healthy ones and among the failed ones.
    order.sort_by_key(|g| failed.contains(&g.address));
    order
}

/// The gateway's TLS: its node certificate (chosen by SNI from the certificate store), and client
/// certificates of workloads of federated trust domains, or of this organisation's own workloads while
/// egress through the gateways is on (read at each handshake).
pub fn tls(ctx: &Arc<Ctx>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let own = ctx.bundle.load().trust_domain().clone();
    let view = ctx.clone();
    let mut cfg = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SvidClientVerifier::shared(
            ctx.bundle.clone(),
            PeerIdMatcher::predicate(
                "a workload of a federated trust domain, or of this one when egress is on",
                move |id| {
                    matches!(id.kind(), IdKind::Workload { .. })
                        && (!id.is_member_of(&own) || view.dir.load().egress.is_some())
                },
            ),
            true,
        )))
        .with_cert_resolver(Arc::new(InboundResolver(ctx.certs.clone())));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts partners' outer tunnels until the task is dropped.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let admit = |ctx: &Ctx, conn: &rustls::ServerConnection| {
        let id = peer_id(conn);
        if id.is_none() {
            ctx.metrics.refuse("gateway", "no_identity");
        }
        id
    };
    let port = TunnelPort {
        direction: "gateway",
        max_streams: MAX_STREAMS_PER_CONNECTION,
    };
    let each = |ctx: &Arc<Ctx>, src: &SpiffeId, peer, req, respond| {
        stream(ctx.clone(), src.clone(), peer, req, respond)
    };
    crate::tunnel::serve_tunnels(ctx, listener, tls, port, admit, each).await
}

/// At most one refusal line per second: a partner must not be able to flood the gateway's log (the
/// metric counts every refusal).
pub(crate) fn log_this_refusal() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(u64::MAX);
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    LAST.swap(second, Ordering::Relaxed) != second
}

pub(crate) fn refuse(
    ctx: &Ctx,
    mut respond: h2::server::SendResponse<Bytes>,
    code: StatusCode,
    reason: &'static str,
) {
    ctx.metrics.refuse("gateway", reason);
    let mut r = Response::new(());
    *r.status_mut() = code;
    let _ = respond.send_response(r, true);
}

/// The replicas of the exported workload a stream names, each with the node tunnel it is forwarded to,
/// that `partner` may reach on `port` now (none: refused).
fn admitted(ctx: &Ctx, partner: &str, sni: &str, port: u16) -> Vec<(Arc<Workload>, SocketAddr)> {
    let view = ctx.dir.load();
    view.exported_by_sni(sni)
        .into_iter()
        .filter(|(w, _)| view.exported_to(w, partner, port))
        .map(|(w, tunnel)| (w.clone(), tunnel))
        .collect()
}

/// One CONNECT stream from a partner: checked, then spliced to the exporting node's tunnel port.
fn stream(
    ctx: Arc<Ctx>,
    src: SpiffeId,
    peer: SocketAddr,
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
) {
    if req.method() != Method::CONNECT {
        return refuse(&ctx, respond, StatusCode::METHOD_NOT_ALLOWED, "not_connect");
    }
    if src.is_member_of(ctx.bundle.load().trust_domain()) {
        return crate::egress::stream(ctx, src, peer, req, respond);
    }
    let Some((sni, port)) = req
        .uri()
        .authority()
        .and_then(|a| Some((a.host().to_owned(), a.port_u16()?)))
    else {
        return refuse(&ctx, respond, StatusCode::BAD_REQUEST, "bad_target");
    };
    // Until its first directory is in force a gateway knows no export: it says so (503, another replica
    // may know), rather than refusing what it will admit a moment later.
    if ctx.dir.load().revision == 0 {
        return refuse(&ctx, respond, StatusCode::SERVICE_UNAVAILABLE, "not_ready");
    }
    let partner = src.trust_domain_str().to_owned();
    // Watched from before the check, so that a withdrawal racing the stream's opening is not missed.
    let epoch = ctx.dir_epoch.subscribe();
    // Only a workload exported to this partner, on a port exported to it: the gateway is no relay into
    // the private network (an address, or a workload not exported, names nothing here).
    let replicas = admitted(&ctx, &partner, &sni, port);
    let Some((dst, _)) = replicas.first().cloned() else {
        if log_this_refusal() {
            warn!(%src, target = %format!("{sni}:{port}"), "a partner asked the gateway for a workload or port not exported to it; refused (strait federation export; further refusals this second are only counted)");
        }
        return refuse(&ctx, respond, StatusCode::FORBIDDEN, "not_exported");
    };
    if !ctx.inflight.try_reserve(ctx.max_connections) {
        return refuse(
            &ctx,
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            "over_capacity",
        );
    }
    tokio::spawn(async move {
        let _guard = ctx.inflight.adopt(); // reserved above
        let labels = GatewayLabels {
            way: "ingress",
            partner: partner.clone(),
            workload: dst.id.to_string(),
        };
        // The first replica's node that answers. A plain connection: a gateway captures nothing, so
        // there is no capture to bypass.
        let mut reached = None;
        for (_, tunnel) in &replicas {
            match dial(*tunnel).await {
                Ok(t) => {
                    reached = Some((t, *tunnel));
                    break;
                }
                Err(e) => {
                    warn!(%src, dst = %dst.id, %tunnel, error = %e, "the exporting node's tunnel port is unreachable from the gateway")
                }
            }
        }
        let Some((node, tunnel)) = reached else {
            return refuse(&ctx, respond, StatusCode::BAD_GATEWAY, "node_unreachable");
        };
        info!(%src, dst = %dst.id, port, %tunnel, "gateway stream opened");
        let gone = withdrawn(&ctx, epoch, &partner, &sni, port);
        let Some(r) = relay(&ctx, respond, req, peer, node, &labels, "to_workload", gone).await
        else {
            return;
        };
        if r.gone {
            info!(%src, dst = %dst.id, port, "gateway stream closed: the export it used was withdrawn");
        }
        info!(%src, dst = %dst.id, port, sent = r.sent, received = r.received, seconds = r.seconds, "gateway stream closed");
    });
}

/// A plain connection (a gateway captures nothing, so there is no capture to bypass), given up after
/// a few seconds.
pub(crate) async fn dial(to: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// What [`relay`] carried.
pub(crate) struct Relayed {
    /// Bytes towards the far side, and back.
    pub sent: u64,
    pub received: u64,
    /// Cut because `gone` resolved (the directory no longer allows the stream).
    pub gone: bool,
    pub seconds: f64,
}

/// Answers an admitted stream (200), splices it with `far` until both sides are done, `gone` resolves
/// or no byte moves for --idle-timeout (an idle pooled tunnel too: its proxy opens another when it needs
/// one), and counts it under `labels`; `towards_far` names the direction of the bytes sent to `far`
/// (`to_workload` on ingress, `to_partner` on egress). `None` when the caller reset the stream first.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn relay(
    ctx: &Ctx,
    mut respond: h2::server::SendResponse<Bytes>,
    req: Request<h2::RecvStream>,
    peer: SocketAddr,
    far: TcpStream,
    labels: &GatewayLabels,
    towards_far: &'static str,
    gone: impl std::future::Future<Output = ()>,
) -> Option<Relayed> {
    let _ = far.set_nodelay(true);
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            debug!(%peer, error = %e, "stream reset before it was answered");
            return None;
        }
    };
    let mut near = H2Stream::new(send, req.into_body());
    ctx.metrics.gateway_streams.get_or_create(labels).inc();
    let active = ctx.metrics.gateway_active.get_or_create(labels).clone();
    active.inc();
    let started = Instant::now();
    let activity = Activity::new();
    let mut far = Watched::new(far, activity.clone());
    let mut cut = false;
    let (sent, received) = tokio::select! {
        copied = splice(&mut near, &mut far) => copied,
        () = gone => {
            cut = true;
            (0, 0)
        }
        () = activity.idle_for(ctx.idle_timeout) => {
            debug!(%peer, "gateway stream closed: idle");
            (0, 0)
        }
    };
    active.dec();
    let back = if towards_far == "to_workload" {
        "to_partner"
    } else {
        "to_workload"
    };
    for (direction, n) in [(towards_far, sent), (back, received)] {
        ctx.metrics
            .gateway_bytes
            .get_or_create(&labels.direction(direction))
            .inc_by(n);
    }
    Some(Relayed {
        sent,
        received,
        gone: cut,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copies both ways until both sides are done; the byte counts (towards the far side, back).
async fn splice(outer: &mut H2Stream, node: &mut Watched<TcpStream>) -> (u64, u64) {
    match tokio::io::copy_bidirectional(outer, node).await {
        Ok(counts) => counts,
        Err(e) => {
            debug!(error = %e, "gateway stream ended with an error");
            (0, 0)
        }
    }
}

/// Resolves once a directory in force (after `epoch` was taken) no longer exports the stream's workload
/// and port to `partner`.
async fn withdrawn(
    ctx: &Ctx,
    epoch: tokio::sync::watch::Receiver<u64>,
    partner: &str,
    sni: &str,
    port: u16,
) {
    until(epoch, || admitted(ctx, partner, sni, port).is_empty()).await
}

/// Resolves once a directory put in force after `epoch` was taken makes `gone` true.
pub(crate) async fn until(mut epoch: tokio::sync::watch::Receiver<u64>, gone: impl Fn() -> bool) {
    loop {
        if epoch.changed().await.is_err() {
            return std::future::pending().await;
        }
        if gone() {
            return;
        }
    }
}
