//! The connection to the workload that serves one tunnel stream (one caller's connection), opened on its
//! first allowed request and closed with the stream. Nothing is pooled across callers: one caller's
//! `Connection: close`, upgrade or protocol error never reaches another's requests (what ztunnel's inbound
//! does too). The workload is spoken to in the version the client used: HTTP/1.x stays HTTP/1.x, HTTP/2
//! stays HTTP/2 (h2c with prior knowledge).

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use crate::l7::limits;
use crate::sockets::connect_marked;

/// Requests forwarded to workloads: streamed, or buffered when the policy needed the body.
pub type ForwardBody = Either<Incoming, Full<Bytes>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the workload: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One stream's connection to its workload.
pub struct Upstream {
    target: SocketAddr,
    /// HTTP/1: requests on one downstream connection come one at a time, so the sender is taken out for a
    /// request and put back when its response head arrives (never a lock held across an await).
    h1: Mutex<Option<http1::SendRequest<ForwardBody>>>,
    /// HTTP/2: one connection multiplexing this caller's streams (the sender is cloned per request).
    h2: Mutex<Option<http2::SendRequest<ForwardBody>>>,
}

impl Upstream {
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            h1: Mutex::new(None),
            h2: Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<TokioIo<tokio::net::TcpStream>, UpstreamError> {
        connect_marked(self.target, CONNECT_TIMEOUT)
            .await
            .map(TokioIo::new)
            .map_err(UpstreamError::Connect)
    }

    /// Sends an HTTP/1.x request (upgrades allowed: the caller decides what a 101 may become).
    pub async fn send_h1(
        &self,
        req: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut reusable = None;
        if let Some(mut s) = self.h1.lock().ok().and_then(|mut s| s.take()) {
            if !s.is_closed() && s.ready().await.is_ok() {
                reusable = Some(s);
            }
        }
        let mut sender = match reusable {
            Some(s) => s,
            None => {
                let io = self.connect().await?;
                let (sender, conn) = http1::Builder::new()
                    .max_buf_size(limits::H1_BUF)
                    .max_headers(limits::H1_MAX_HEADERS)
                    .handshake(io)
                    .await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "workload HTTP/1 connection ended");
                    }
                });
                sender
            }
        };
        let resp = sender.send_request(req).await;
        if let Ok(mut slot) = self.h1.lock() {
            *slot = Some(sender);
        }
        Ok(resp?)
    }

    /// Sends an HTTP/2 request on this caller's h2c connection to the workload. A connection the workload
    /// is closing (it sent GOAWAY) may still look open; a request it never took is sent once more on a new
    /// connection, so the workload's GOAWAY ends that connection, not the caller's requests.
    pub async fn send_h2(
        &self,
        req: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let cached = self
            .h2
            .lock()
            .ok()
            .and_then(|s| s.as_ref().filter(|s| !s.is_closed()).cloned());
        let req = match cached {
            Some(mut sender) => match sender.ready().await {
                Ok(()) => match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(mut e) => match e.take_message() {
                        Some(req) => {
                            debug!(error = %e.error(), "workload HTTP/2 connection closing; new one");
                            req
                        }
                        None => return Err(e.into_error().into()),
                    },
                },
                Err(_) => req,
            },
            None => req,
        };
        let mut sender = self.connect_h2().await?;
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<ForwardBody>, UpstreamError> {
        let io = self.connect().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(limits::H2_CONN_WINDOW)
            .max_header_list_size(limits::H2_HEADER_LIST)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "workload HTTP/2 connection ended");
            }
        });
        if let Ok(mut slot) = self.h2.lock() {
            *slot = Some(sender.clone());
        }
        Ok(sender)
    }
}
