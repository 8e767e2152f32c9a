//! The admin endpoint (default 127.0.0.1:15000): `/live`, `/ready`, `/metrics`, `/config_dump`; and the
//! optional health endpoint (`--health-listen`, e.g. 0.0.0.0:15021 for kubelet probes and Prometheus on a
//! host-network DaemonSet), which answers only `/live` (alias `/healthz`), `/ready` and `/metrics`: the
//! configuration dump (identities, directory, rules) stays on the loopback admin port.
//!
//! `/config_dump` shows the whole directory of the mesh, so it is answered only to root and to the proxy's
//! own user: the kernel tells which Unix user owns the connecting socket (one `sock_diag` query per admin
//! connection, as for captured connections). Anyone else, and any caller that is not a local socket, gets
//! 403; `/live`, `/ready` and `/metrics` stay open to every local user.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::warn;

use crate::run::Shared;

fn reply(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    r
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Who is asking: the two ends of the admin connection, from which the kernel can name the user (asked
/// only for `/config_dump`, so probes and scrapes cost no netlink query).
#[derive(Debug, Clone, Copy)]
struct Caller {
    ends: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
}

impl Caller {
    fn of(tcp: &tokio::net::TcpStream) -> Self {
        Self {
            ends: tcp.peer_addr().ok().zip(tcp.local_addr().ok()),
        }
    }

    /// The Unix user owning the client socket, when it is a local socket.
    fn uid(&self) -> Option<u32> {
        let (peer, local) = self.ends?;
        crate::sockets::local_peer_uid(peer, local).ok().flatten()
    }
}

/// Root, or the user the proxy runs as.
fn may_read_config(uid: Option<u32>) -> bool {
    let own = crate::sockets::effective_uid();
    matches!(uid, Some(u) if u == 0 || u == own)
}

fn handle(
    shared: &Shared,
    caller: Caller,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => match shared.not_ready_reason() {
            // Still ready (traffic is served under the last good version), but say why it is degraded.
            None => match shared.degraded_reason() {
                None => reply(StatusCode::OK, "text/plain", "ready\n"),
                Some(why) => reply(StatusCode::OK, "text/plain", format!("ready; {why}\n")),
            },
            Some(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            for (id, left) in shared.ctx.certs.expiries() {
                shared
                    .ctx
                    .metrics
                    .cert_expiry
                    .get_or_create(&crate::metrics::Identity { id: id.to_string() })
                    .set(left.as_secs() as i64);
            }
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &shared.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/config_dump" => {
            let uid = caller.uid();
            if !may_read_config(uid) {
                warn!(uid = ?uid, "/config_dump refused: only root or the proxy's own user may read it");
                return reply(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "/config_dump is only for root and the proxy's own user (it holds the mesh's directory); \
                     run the request as root, e.g. `sudo curl http://127.0.0.1:15000/config_dump`\n",
                );
            }
            let view = shared.ctx.dir.load();
            let certs: Vec<_> = shared
                .ctx
                .certs
                .all()
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.svid.id.as_str(),
                        "not_after": secs(c.not_after),
                        "renew_at": secs(c.renew_at()),
                        "generation": c.generation,
                        "issuer": c.svid.chain.first()
                            .and_then(|leaf| strait_ca::cert::CertSummary::of(leaf).ok())
                            .map(|s| s.issuer),
                    })
                })
                .collect();
            let dump = serde_json::json!({
                "node": shared.node_id.as_str(),
                "node_cert_not_after": secs(shared.node_not_after()),
                "workload_certs": certs,
                "directory_revision": view.revision,
                "local_workloads": view.local.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
                "directory": &view.raw,
                "capture": &**shared.capture.load(),
                "nftables": crate::capture::list(),
                "policy_revision": shared.ctx.authz.revision(),
                "trust_bundle": {
                    "fingerprint": shared.ctx.bundle.load().fingerprint(),
                    "anchors": shared.ctx.bundle.load().certs().len(),
                    "federated": shared.ctx.bundle.load().federated().map(|b| serde_json::json!({
                        "trust_domain": b.trust_domain().as_str(),
                        "fingerprint": b.fingerprint(),
                        "anchors": b.certs().len(),
                    })).collect::<Vec<_>>(),
                },
                "mesh": shared.mesh.get().map(|m| m.status()),
                "open_connections": shared.ctx.inflight.count(),
                "pooled_tunnels": shared.ctx.pooled_tunnels(),
            });
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /live, /ready, /metrics or /config_dump\n",
        ),
    }
}

/// The health endpoint: the probe and metrics paths of [`handle`], nothing else.
fn handle_health(
    shared: &Shared,
    caller: Caller,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" | "/healthz" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" | "/metrics" => handle(shared, caller, req),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "this is the health endpoint: /live, /healthz, /ready, /metrics\n",
        ),
    }
}

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    serve_with(shared, listener, handle).await
}

pub async fn serve_health(shared: Arc<Shared>, listener: TcpListener) {
    serve_with(shared, listener, handle_health).await
}

async fn serve_with(
    shared: Arc<Shared>,
    listener: TcpListener,
    handler: fn(&Shared, Caller, &Request<hyper::body::Incoming>) -> Response<Full<Bytes>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let caller = Caller::of(&tcp);
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handler(&shared, caller, &req)) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                warn!(error = %e, "admin connection error");
            }
        });
    }
}
