//! What the inbound proxy does with one tunnel stream (one caller's connection), by the port's declared
//! protocol:
//!
//! - `http` / `http2` / `grpc`: HTTP is parsed (hyper; HTTP/1.x and HTTP/2 prior knowledge both
//!   understood), each request is normalized ([`normalize`]), decided by Rego and, if allowed, forwarded
//!   to the workload in the client's own HTTP version on a connection of this stream alone
//!   ([`upstream`]); denied ones are answered with the decision's status (gRPC calls with a gRPC status).
//! - `tcp`: one decision per connection with the L4 input, then bytes are copied.
//! - `auto`: the client's first bytes decide ([`sniff`]): HTTP is handled as above, anything else as TCP.
//!
//! Limits and timeouts are in [`limits`], the same for HTTP/1.1 and HTTP/2.

mod handle;
pub mod idle;
pub mod normalize;
mod respond;
pub mod sniff;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use strait_ca::SpiffeId;
use strait_proto::registry::{Protocol, Workload};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::{debug, info, warn};

use crate::authz::peer;
use crate::sockets::connect_marked;
use crate::tunnel::Ctx;

pub use handle::{prepare, Prepared};
pub use upstream::ForwardBody;

/// Limits and timeouts of the HTTP path (docs/proxy.md lists them for operators).
pub mod limits {
    use std::time::Duration;

    pub use super::normalize::{MAX_HEADERS, MAX_HEADER_LIST_BYTES};

    /// From the moment the proxy waits for a request's head (a new connection, or the next request on a
    /// kept-alive HTTP/1 connection) until the head is complete.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// `auto` ports: how long the proxy waits for the client's first bytes (`--auto-detect-timeout`).
    pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);
    /// An inbound stream (TCP, or a caller's HTTP connection) that moves no byte either way for this long is
    /// closed (`--idle-timeout`; Envoy's default idle timeout).
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    /// JSON and form bodies up to this size are buffered so the policy sees `parsed_body`; larger or
    /// unsized bodies stream through and the policy sees no body.
    pub const MAX_POLICY_BODY: u64 = 64 * 1024;
    /// Transport limits are set above the checked ones ([`MAX_HEADERS`], [`MAX_HEADER_LIST_BYTES`]) so that
    /// the one check in `normalize` decides, identically for both versions; beyond these the transport
    /// answers 431 itself.
    pub const H1_BUF: usize = 4 * MAX_HEADER_LIST_BYTES;
    pub const H1_MAX_HEADERS: usize = 2 * MAX_HEADERS;
    pub const H2_HEADER_LIST: u32 = 2 * MAX_HEADER_LIST_BYTES as u32;
    /// HTTP/2 windows towards clients and workloads (the defaults, 64 KiB, cap a stream at a few MB/s).
    pub const H2_STREAM_WINDOW: u32 = 4 << 20;
    pub const H2_CONN_WINDOW: u32 = 16 << 20;
    /// Concurrent HTTP/2 streams one caller may have open.
    pub const H2_MAX_STREAMS: u32 = 1000;
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Who is at both ends of one tunnel stream: the verified peer, the local workload it asked for, the
/// peer's address and the workload address it targets.
pub struct Ends {
    pub src: SpiffeId,
    pub dst: Arc<Workload>,
    pub peer_addr: SocketAddr,
    pub target: SocketAddr,
}

/// Reads an `auto` port's first bytes until they tell HTTP from anything else: `Some((is_http, bytes))`,
/// or `None` when the client closed or sent nothing in time (logged).
async fn sniff<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: std::time::Duration,
    ends: &Ends,
) -> Option<(bool, Bytes)> {
    let Ends {
        src, dst, target, ..
    } = ends;
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match sniff::classify(&buf) {
            sniff::Sniffed::Http1 | sniff::Sniffed::Http2 => return Some((true, buf.freeze())),
            sniff::Sniffed::Tcp => return Some((false, buf.freeze())),
            sniff::Sniffed::NeedMore => {}
        }
        buf.reserve(1024);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return None,
            // Closed in the middle of what might have been a request line: not HTTP.
            Ok(Ok(0)) => return Some((false, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "stream failed before its first bytes");
                return None;
            }
            Err(_) => {
                warn!(%src, dst = %dst.id, %target, ?timeout,
                    "the client sent nothing on this auto port; closed. A server-first protocol (the server speaks first) must be declared `tcp`");
                return None;
            }
        }
    }
}

/// Serves one tunnel stream between its `ends`, until it ends or moves no byte for the idle timeout.
pub async fn serve<T>(ctx: Arc<Ctx>, io: T, ends: Ends)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = idle::Activity::new();
    let io = idle::Watched::new(io, activity.clone());
    let (timeout, src, dst) = (ctx.idle_timeout, ends.src.clone(), ends.dst.id.clone());
    tokio::select! {
        () = serve_stream(ctx.clone(), io, ends) => {}
        () = activity.idle_for(timeout) => {
            ctx.metrics.refuse("inbound", "idle_timeout");
            info!(%src, %dst, ?timeout, "stream idle for the idle timeout; closed");
        }
    }
}

async fn serve_stream<T>(ctx: Arc<Ctx>, mut io: T, ends: Ends)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let port = ends.dst.tcp_ports().find(|p| p.port == ends.target.port());
    let protocol = port.map(|p| p.protocol).unwrap_or_default();
    let opts = normalize::Options {
        allow_escaped_slashes: port.is_some_and(|p| p.allow_escaped_slashes),
        allow_underscore_headers: port.is_some_and(|p| p.allow_underscore_headers),
    };
    let (is_http, prefix) = match protocol {
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => (true, Bytes::new()),
        Protocol::Tcp => (false, Bytes::new()),
        // Never a TCP port (tcp_ports() leaves these out): refuse rather than guess.
        Protocol::Udp => return,
        Protocol::Auto => match sniff(&mut io, ctx.auto_detect_timeout, &ends).await {
            Some(s) => s,
            None => return,
        },
    };
    let io = Prefixed { prefix, inner: io };
    if is_http {
        let stream = Arc::new(handle::Stream::new(ctx, ends, opts, protocol));
        serve_http(stream, io).await;
    } else {
        serve_tcp(ctx, io, ends).await;
    }
}

async fn serve_tcp<T>(ctx: Arc<Ctx>, mut io: T, ends: Ends)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Ends {
        src,
        dst,
        peer_addr,
        target,
    } = ends;
    let verdict = ctx.authz.tcp(
        &peer(Some(peer_addr), src.as_str()),
        &peer(Some(target), dst.id.as_str()),
    );
    if !verdict.allowed() {
        ctx.metrics.refuse("inbound", "policy_denied");
        return;
    }
    match connect_marked(target, std::time::Duration::from_secs(5)).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
        }
        Err(e) => warn!(%src, dst = %dst.id, %target, error = %e, "workload unreachable"),
    }
}

async fn serve_http<T>(stream: Arc<handle::Stream>, io: T)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let stream = stream.clone();
        async move { Ok::<_, std::convert::Infallible>(stream.handle(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // A client that sends its request and then shuts down its write side still gets its answer.
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits::HEADER_READ_TIMEOUT)
        .max_buf_size(limits::H1_BUF)
        .max_headers(limits::H1_MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits::H2_HEADER_LIST)
        .initial_stream_window_size(limits::H2_STREAM_WINDOW)
        .initial_connection_window_size(limits::H2_CONN_WINDOW)
        .max_concurrent_streams(limits::H2_MAX_STREAMS);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        debug!(error = %e, "HTTP stream ended with an error");
    }
}
