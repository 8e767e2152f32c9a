//! The gateway's egress side (`strait federation egress on`): this organisation's own proxies send their
//! connections to partners through it, so that all cross-organisation traffic leaves from the addresses
//! the organisation controls and is seen (and counted) in one place.
//!
//! A source proxy opens a tunnel to the gateway with its *source workload's* SVID (this trust domain's)
//! and asks for a CONNECT stream to `<address>:<port>`: a partner's gateway, or a partner node's tunnel
//! for a direct import. The gateway admits only addresses where something this organisation imports is
//! reached (its directory's imports), never anything else, so it is no open relay out of the network;
//! then it splices the stream to that address. What the stream carries is the source proxy's own TLS to
//! the partner (the outer tunnel to the partner's gateway, or the end-to-end tunnel to the partner's
//! node): the egress gateway sees who calls which partner, and holds no key to read what.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use strait_ca::SpiffeId;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::gateway::{log_this_refusal, refuse, splice};
use crate::h2stream::H2Stream;
use crate::l7::idle::{Activity, Watched};
use crate::metrics::GatewayLabels;
use crate::tunnel::Ctx;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an egress stream asks to go: `IP:PORT`, nothing else (a name would be resolved here, and the
/// check is against the addresses partners' imports are reached at).
fn target(req: &Request<h2::RecvStream>) -> Option<SocketAddr> {
    req.uri().authority()?.as_str().parse().ok()
}

/// One CONNECT stream from this organisation's own workload: checked, then spliced to the partner.
pub(crate) fn stream(
    ctx: Arc<Ctx>,
    src: SpiffeId,
    peer: SocketAddr,
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
) {
    let Some(target) = target(&req) else {
        return refuse(&ctx, respond, StatusCode::BAD_REQUEST, "bad_target");
    };
    // Watched from before the check, so that a change racing the stream's opening is not missed.
    let epoch = ctx.dir_epoch.subscribe();
    let view = ctx.dir.load();
    if view.revision == 0 {
        return refuse(&ctx, respond, StatusCode::SERVICE_UNAVAILABLE, "not_ready");
    }
    // Turned off since the handshake: the organisation's own workloads are no longer served.
    if view.egress.is_none() {
        return refuse(&ctx, respond, StatusCode::FORBIDDEN, "egress_off");
    }
    let Some(partner) = view.import_reach(target).map(str::to_owned) else {
        if log_this_refusal() {
            warn!(%src, %target, "an egress stream asked for an address where no partner's import is reached; refused (the egress gateway relays only to partners; further refusals this second are only counted)");
        }
        return refuse(&ctx, respond, StatusCode::FORBIDDEN, "not_a_partner");
    };
    drop(view);
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
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
        let far = match connected.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
            Ok(t) => t,
            Err(e) => {
                warn!(%src, %partner, %target, error = %e, "the partner is unreachable from the egress gateway");
                return refuse(
                    &ctx,
                    respond,
                    StatusCode::BAD_GATEWAY,
                    "partner_unreachable",
                );
            }
        };
        let _ = far.set_nodelay(true);
        let mut respond = respond;
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, error = %e, "stream reset before it was answered");
                return;
            }
        };
        let labels = GatewayLabels {
            way: "egress",
            partner: partner.clone(),
            workload: src.to_string(),
        };
        let mut inner = H2Stream::new(send, req.into_body());
        ctx.metrics.gateway_streams.get_or_create(&labels).inc();
        let active = ctx.metrics.gateway_active.get_or_create(&labels).clone();
        active.inc();
        let started = Instant::now();
        info!(%src, %partner, %target, "egress stream opened");
        let activity = Activity::new();
        let mut far = Watched::new(far, activity.clone());
        // Egress turned off, or the partner no longer reached there (removed, import withdrawn): the
        // stream ends with the directory that says so.
        let gone = || {
            let v = ctx.dir.load();
            v.egress.is_none() || v.import_reach(target).is_none()
        };
        let (sent, received) = tokio::select! {
            copied = splice(&mut inner, &mut far) => copied,
            () = crate::gateway::until(epoch, gone) => {
                info!(%src, %partner, %target, "egress stream closed: egress is off or the partner is no longer reached there");
                (0, 0)
            }
            () = activity.idle_for(ctx.idle_timeout) => {
                debug!(%src, %partner, "egress stream closed: idle");
                (0, 0)
            }
        };
        active.dec();
        ctx.metrics
            .gateway_bytes
            .get_or_create(&labels.direction("to_partner"))
            .inc_by(sent);
        ctx.metrics
            .gateway_bytes
            .get_or_create(&labels.direction("to_workload"))
            .inc_by(received);
        info!(%src, %partner, %target, sent, received, seconds = started.elapsed().as_secs_f64(), "egress stream closed");
    });
}
