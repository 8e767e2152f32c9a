//! What the inbound proxy does with one tunnel stream, by the port's declared protocol:
//!
//! - `http` / `http2`: HTTP is parsed (hyper; HTTP/1.1 and HTTP/2 prior knowledge both understood), each
//!   request gets a Rego decision; allowed requests are forwarded to the workload, denied ones answered
//!   with the decision's status (403 by default), headers, body and an `x-strait-deny-reason` header.
//! - `tcp`: one decision per connection with the L4 input, then bytes are copied.
//! - `auto`: the first bytes decide (HTTP method or the HTTP/2 preface → HTTP, anything else → TCP); if the
//!   client sends nothing for 200 ms (a server-first protocol) the stream is TCP. Never a long wait.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_ca::SpiffeId;
use strait_control::registry::{Protocol, Workload};
use strait_policy::input::HttpRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

use crate::authz::peer;
use crate::sockets::connect_marked;
use crate::tunnel::Ctx;

const SNIFF_WAIT: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to workloads with the proxy's socket mark (never captured).
#[derive(Clone, Debug, Default)]
pub struct MarkedConnector;

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "workload address"))?;
            connect_marked(addr, CONNECT_TIMEOUT)
                .await
                .map(TokioIo::new)
        })
    }
}

/// Requests forwarded to workloads: streamed, or buffered when the policy needed the body.
pub type ForwardBody = Either<Incoming, Full<Bytes>>;
pub type WorkloadClient = Client<MarkedConnector, ForwardBody>;

/// JSON and form bodies up to this size are buffered so the policy sees `parsed_body`; larger or
/// unsized bodies stream through and the policy sees no body.
pub const MAX_POLICY_BODY: u64 = 64 * 1024;

pub fn workload_client() -> WorkloadClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(MarkedConnector)
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn looks_like_http(b: &[u8]) -> bool {
    const STARTS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
        b"PRI * HTTP/2",
    ];
    STARTS
        .iter()
        .any(|s| b.starts_with(&s[..s.len().min(b.len())]) && !b.is_empty())
}

/// Serves one tunnel stream to `dst` on `target` for the verified peer `src`.
pub async fn serve<T>(
    ctx: Arc<Ctx>,
    mut io: T,
    src: SpiffeId,
    dst: Arc<Workload>,
    peer_addr: SocketAddr,
    target: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = dst
        .ports
        .iter()
        .find(|p| p.port == target.port())
        .map(|p| p.protocol)
        .unwrap_or_default();
    let (is_http, prefix) = match protocol {
        Protocol::Http | Protocol::Http2 => (true, Bytes::new()),
        Protocol::Tcp => (false, Bytes::new()),
        Protocol::Auto => {
            let mut buf = vec![0u8; 16];
            match tokio::time::timeout(SNIFF_WAIT, io.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    buf.truncate(n);
                    (looks_like_http(&buf), Bytes::from(buf))
                }
                Ok(Ok(_)) | Ok(Err(_)) => return,
                Err(_) => (false, Bytes::new()), // the client waits for the server: not HTTP
            }
        }
    };
    let io = Prefixed { prefix, inner: io };
    if is_http {
        serve_http(ctx, io, src, dst, peer_addr, target).await;
    } else {
        serve_tcp(ctx, io, src, dst, peer_addr, target).await;
    }
}

async fn serve_tcp<T>(
    ctx: Arc<Ctx>,
    mut io: T,
    src: SpiffeId,
    dst: Arc<Workload>,
    peer_addr: SocketAddr,
    target: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let verdict = ctx.authz.tcp(
        &peer(Some(peer_addr), src.as_str()),
        &peer(Some(target), dst.id.as_str()),
    );
    if !verdict.allowed() {
        ctx.metrics.refuse("inbound", "policy_denied");
        return;
    }
    match connect_marked(target, CONNECT_TIMEOUT).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
        }
        Err(e) => warn!(%src, dst = %dst.id, %target, error = %e, "workload unreachable"),
    }
}

type Body = Either<Full<Bytes>, Incoming>;

fn deny_response(d: &strait_policy::engine::Decision) -> Response<Body> {
    let body = d
        .body
        .clone()
        .unwrap_or_else(|| format!("denied by strait: {}\n", d.reason));
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(d.http_status).unwrap_or(StatusCode::FORBIDDEN);
    for (k, v) in &d.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    if let Ok(v) = HeaderValue::try_from(d.reason.as_str()) {
        r.headers_mut()
            .insert(HeaderName::from_static("x-strait-deny-reason"), v);
    }
    r
}

fn status(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(msg.to_owned()))));
    *r.status_mut() = code;
    r
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

async fn handle(
    ctx: Arc<Ctx>,
    src: SpiffeId,
    dst: Arc<Workload>,
    peer_addr: SocketAddr,
    target: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| target.to_string());
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut input = HttpRequest {
        method: parts.method.as_str().to_owned(),
        path: path.clone(),
        host,
        scheme: "http".into(),
        protocol: if parts.version == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        }
        .into(),
        size: parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        headers: parts
            .headers
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
            use http_body_util::BodyExt;
            match http_body_util::Limited::new(body, MAX_POLICY_BODY as usize)
                .collect()
                .await
            {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    input.body = Some(bytes.to_vec());
                    Either::Right(Full::new(bytes))
                }
                Err(_) => {
                    return status(StatusCode::BAD_REQUEST, "request body could not be read\n")
                }
            }
        }
        _ => Either::Left(body),
    };
    let verdict = ctx.authz.http(
        &peer(Some(peer_addr), src.as_str()),
        &peer(Some(target), dst.id.as_str()),
        &mut input,
    );
    if !verdict.allowed() {
        ctx.metrics.refuse("inbound", "policy_denied");
        return deny_response(&verdict.decision);
    }
    let d = &verdict.decision;
    let uri = format!("http://{target}{path}");
    let Ok(uri) = uri.parse::<Uri>() else {
        return status(StatusCode::BAD_REQUEST, "bad request target\n");
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let hop: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| hop_by_hop(k))
        .cloned()
        .collect();
    for k in hop {
        parts.headers.remove(k);
    }
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
    // Tell the workload who called, as Istio does (the peer's verified identity, never a client header).
    if let Ok(v) = HeaderValue::try_from(format!("By={};URI={}", dst.id, src)) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-client-cert"), v);
    }
    match ctx
        .workload_client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut rp, rb) = resp.into_parts();
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
        Err(e) => {
            warn!(%src, dst = %dst.id, %target, error = %e, "forwarding to the workload failed");
            status(StatusCode::BAD_GATEWAY, "the workload did not answer\n")
        }
    }
}

async fn serve_http<T>(
    ctx: Arc<Ctx>,
    io: T,
    src: SpiffeId,
    dst: Arc<Workload>,
    peer_addr: SocketAddr,
    target: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let (ctx, src, dst) = (ctx.clone(), src.clone(), dst.clone());
        async move { Ok::<_, Infallible>(handle(ctx, src, dst, peer_addr, target, req).await) }
    });
    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        debug!(error = %e, "HTTP stream ended with an error");
    }
}
