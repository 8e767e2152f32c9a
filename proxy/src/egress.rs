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

use bytes::Bytes;
use http::{Request, StatusCode};
use strait_ca::SpiffeId;
use tracing::{info, warn};

use crate::gateway::{log_this_refusal, refuse, relay};
use crate::metrics::GatewayLabels;
use crate::tunnel::Ctx;

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
        let far = match crate::gateway::dial(target).await {
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
        let labels = GatewayLabels {
            way: "egress",
            partner: partner.clone(),
            workload: src.to_string(),
        };
        info!(%src, %partner, %target, "egress stream opened");
        // Egress turned off, or the partner no longer reached there (removed, import withdrawn): the
        // stream ends with the directory that says so.
        let gone = crate::gateway::until(epoch, || {
            let v = ctx.dir.load();
            v.egress.is_none() || v.import_reach(target).is_none()
        });
        let Some(r) = relay(&ctx, respond, req, peer, far, &labels, "to_partner", gone).await
        else {
            return;
        };
        if r.gone {
            info!(%src, %partner, %target, "egress stream closed: egress is off or the partner is no longer reached there");
        }
        info!(%src, %partner, %target, sent = r.sent, received = r.received, seconds = r.seconds, "egress stream closed");
    });
}
