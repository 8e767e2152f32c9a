//! One HTTP request on a tunnel stream: normalize, decide, forward exactly what was decided.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use strait_ca::SpiffeId;
use strait_policy::input::{HttpRequest, Peers};
use strait_proto::registry::{Protocol, Workload};
use tracing::{debug, warn};

use super::limits::MAX_POLICY_BODY;
use super::normalize::{self, Reject};
use super::respond::{self, is_grpc, Body};
use super::upstream::{ForwardBody, Upstream};
use super::Ends;
use crate::authz::peer;
use crate::tunnel::Ctx;

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Everything one tunnel stream's requests share.
pub struct Stream {
    ctx: Arc<Ctx>,
    src: SpiffeId,
    dst: Arc<Workload>,
    peers: Peers,
    target: SocketAddr,
    opts: normalize::Options,
    /// The port is declared `grpc`: failures are answered as gRPC statuses even without a gRPC
    /// content type.
    grpc_port: bool,
    /// The identity header the workload receives, made once per stream.
    xfcc: Option<HeaderValue>,
    upstream: Upstream,
    /// The caller is of another trust domain (federation): each request checks that the workload is
    /// still exported to it.
    foreign: bool,
}

impl Stream {
    pub fn new(ctx: Arc<Ctx>, ends: Ends, opts: normalize::Options, protocol: Protocol) -> Self {
        let Ends {
            src,
            dst,
            peer_addr,
            target,
        } = ends;
        // Tell the workload who called, as Istio does (the peer's verified identity, never a client header).
        let xfcc = HeaderValue::try_from(format!("By={};URI={}", dst.id, src)).ok();
        let foreign = src.trust_domain_str() != ctx.bundle.load().trust_domain().as_str();
        Self {
            foreign,
            peers: Peers::new(
                peer(Some(peer_addr), src.as_str()),
                peer(Some(target), dst.id.as_str()),
            ),
            ctx,
            src,
            dst,
            target,
            opts,
            grpc_port: protocol == Protocol::Grpc,
            xfcc,
            upstream: Upstream::new(target),
        }
    }

    fn refuse(&self, why: Reject, grpc_call: bool) -> Response<Body> {
        self.ctx.metrics.refuse("inbound", why.label());
        warn!(src = %self.src, dst = %self.dst.id, target = %self.target, reason = why.reason(), "request refused before the decision");
        respond::refuse(why.status(), why.reason(), grpc_call)
    }

    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let grpc_call = self.grpc_port || is_grpc(req.headers());
        let http1 = req.version() != Version::HTTP_2;
        if req.method() == Method::CONNECT {
            self.ctx.metrics.refuse("inbound", "connect_method");
            return respond::refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not forwarded to workloads",
                grpc_call,
            );
        }
        if self.foreign
            && !crate::tunnel::exported(&self.ctx, &self.src, &self.dst, self.target.port())
        {
            return respond::refuse(
                StatusCode::FORBIDDEN,
                "this workload is not exported to your organisation",
                grpc_call,
            );
        }
        let Prepared {
            mut input,
            host,
            info,
        } = match prepare(&mut req, http1, self.opts) {
            Ok(p) => p,
            Err(why) => return self.refuse(why, grpc_call),
        };
        let down_upgrade = req.extensions_mut().remove::<OnUpgrade>();
        let (mut parts, body) = req.into_parts();
        let parseable = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.starts_with("application/json")
                    || ct.starts_with("application/x-www-form-urlencoded")
            });
        let body: ForwardBody = match input.size {
            Some(len) if parseable && len <= MAX_POLICY_BODY => {
                match Limited::new(body, MAX_POLICY_BODY as usize).collect().await {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        input.body = Some(bytes.to_vec());
                        Either::Right(Full::new(bytes))
                    }
                    Err(_) => {
                        return respond::refuse(
                            StatusCode::BAD_REQUEST,
                            "request body could not be read",
                            grpc_call,
                        )
                    }
                }
            }
            _ => Either::Left(body),
        };
        let verdict = self.ctx.authz.http(&self.peers, &mut input);
        if !verdict.allowed() {
            self.ctx.metrics.refuse("inbound", "policy_denied");
            return respond::deny(&verdict.decision, grpc_call);
        }
        let d = &verdict.decision;
        // The request as decided: same method token, normalized target, cleaned headers.
        let uri = if http1 {
            input.path.parse::<Uri>()
        } else {
            let authority = host.unwrap_or_else(|| self.target.to_string());
            format!("http://{authority}{}", input.path).parse::<Uri>()
        };
        let Ok(uri) = uri else {
            return respond::refuse(StatusCode::BAD_REQUEST, "bad request target", grpc_call);
        };
        parts.uri = uri;
        parts.extensions = Default::default();
        for name in &d.request_headers_to_remove {
            parts.headers.remove(name.as_str());
        }
        for (k, v) in &d.request_headers_to_add {
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                parts.headers.insert(k, v);
            }
        }
        if let Some(v) = &self.xfcc {
            parts.headers.insert(XFCC, v.clone());
        }
        let upstream_req = Request::from_parts(parts, body);
        let sent = if http1 {
            self.upstream.send_h1(upstream_req).await
        } else {
            self.upstream.send_h2(upstream_req).await
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                warn!(src = %self.src, dst = %self.dst.id, target = %self.target, error = %e, "forwarding to the workload failed");
                return respond::refuse(
                    StatusCode::BAD_GATEWAY,
                    "the workload did not answer",
                    grpc_call,
                );
            }
        };
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let (Some(down), true) = (down_upgrade, info.websocket) else {
                warn!(src = %self.src, dst = %self.dst.id, "the workload switched protocols without a WebSocket upgrade being asked; refused");
                return respond::refuse(
                    StatusCode::BAD_GATEWAY,
                    "unexpected protocol switch by the workload",
                    grpc_call,
                );
            };
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(join_upgraded(down, up));
        }
        let (mut rp, rb) = resp.into_parts();
        normalize::response_headers(&mut rp.headers, switching);
        for (k, v) in &d.response_headers_to_add {
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                rp.headers.append(k, v);
            }
        }
        Response::from_parts(rp, Either::Right(rb))
    }
}

/// A request as the policy will see it, and the authority it is for.
#[derive(Debug)]
pub struct Prepared {
    pub input: HttpRequest,
    pub host: Option<String>,
    pub info: normalize::ConnectionInfo,
}

/// Everything decided about a request before the policy sees it, on its head alone (no I/O, so the fuzz
/// target `http_request` runs exactly this): the target normalized, the headers cleaned, the Host
/// checked, and the policy's view of the request built from what is left. The workload will receive
/// `input.path` as the target and these headers. A CONNECT and the body are the caller's business.
pub fn prepare<B>(
    req: &mut Request<B>,
    http1: bool,
    opts: normalize::Options,
) -> Result<Prepared, Reject> {
    // The target, normalized: the policy decides on it and the workload receives it.
    let raw_path = req.uri().path();
    let path = if raw_path == "*" && req.method() == Method::OPTIONS {
        std::borrow::Cow::Borrowed("*")
    } else {
        normalize::path(raw_path, opts)?
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let info = normalize::request_headers(req.headers_mut(), http1, opts)?;
    let host = host(req, http1)?;
    let input = HttpRequest {
        method: req.method().as_str().to_owned(),
        path: path_and_query,
        host: host.clone().unwrap_or_default(),
        scheme: "http".into(),
        protocol: match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .into(),
        size: req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        ..Default::default()
    };
    Ok(Prepared { input, host, info })
}

/// The request's authority, checked: what the policy sees as `host` and the workload receives. An
/// HTTP/1.1 request needs exactly one Host (absolute-form targets replace it, RFC 9112 §3.2.2); an
/// HTTP/2 request's `host` header, if any, must agree with `:authority`.
fn host<B>(req: &mut Request<B>, http1: bool) -> Result<Option<String>, Reject> {
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let header = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    if http1 {
        if let Some(a) = authority {
            if let Ok(v) = HeaderValue::try_from(a.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
            return Ok(Some(a));
        }
        if header.is_none() && req.version() == Version::HTTP_11 {
            return Err(Reject::MissingHost);
        }
        return Ok(header);
    }
    match (authority, header) {
        (Some(a), Some(h)) if a != h => Err(Reject::HostMismatch),
        (Some(a), _) => Ok(Some(a)),
        (None, h) => Ok(h),
    }
}

/// Once both sides switched to WebSocket, bytes flow both ways until either closes.
async fn join_upgraded(down: OnUpgrade, up: OnUpgrade) {
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => debug!(error = %e, "protocol switch did not complete"),
    }
}
