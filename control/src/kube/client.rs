//! A small HTTPS client for the Kubernetes API: JSON requests and watch streams, authenticated with the
//! service-account token (re-read for every request: projected tokens rotate under a running process) and
//! the API server checked against the cluster CA (`ca.crt`).
//!
//! The control plane makes few API calls (two watches, a TokenReview per join, one ConfigMap), so each
//! request opens its own HTTP/1.1 connection; nothing to pool, nothing to go stale.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::Status;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A list of every pod of a large cluster fits; anything bigger is refused rather than buffered.
const MAX_RESPONSE: usize = 256 << 20;
/// One watch event (one object) larger than this ends the stream.
const MAX_EVENT: usize = 16 << 20;

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// `https://host:port`.
    pub server: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
}

/// The in-cluster defaults every pod gets (`KUBERNETES_SERVICE_HOST`/`_PORT` and the service-account
/// files), as client-go's `rest.InClusterConfig` reads them.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl KubeConfig {
    pub fn in_cluster() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            KubeError::Config(
                "KUBERNETES_SERVICE_HOST is not set: not running in a pod (pass --kube-api-server)"
                    .into(),
            )
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Self {
            server: format!("https://{host}:{port}"),
            ca_file: PathBuf::from(SA_DIR).join("ca.crt"),
            token_file: PathBuf::from(SA_DIR).join("token"),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("cannot reach the Kubernetes API at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("Kubernetes API request failed: {0}")]
    Http(String),
    /// The API server answered with a `Status` (or an error code without one).
    #[error("Kubernetes API said {code} {reason}: {message}")]
    Status {
        code: u16,
        reason: String,
        message: String,
    },
    #[error("unexpected answer from the Kubernetes API: {0}")]
    Decode(String),
}

impl KubeError {
    /// 410 Gone: the resourceVersion is older than what the API server still has; list again.
    pub fn is_gone(&self) -> bool {
        matches!(self, KubeError::Status { code: 410, .. })
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_status(code: StatusCode, body: &[u8]) -> Self {
        match serde_json::from_slice::<Status>(body) {
            Ok(s) => KubeError::Status {
                code: s.code.unwrap_or(code.as_u16()),
                reason: s.reason.unwrap_or_default(),
                message: s.message.unwrap_or_default(),
            },
            Err(_) => KubeError::Status {
                code: code.as_u16(),
                reason: code.canonical_reason().unwrap_or("").into(),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            },
        }
    }
}

pub struct KubeClient {
    host: String,
    port: u16,
    authority: String,
    tls: Arc<rustls::ClientConfig>,
    token_file: PathBuf,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient")
            .field("server", &self.authority)
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    pub fn new(cfg: &KubeConfig) -> Result<Self, KubeError> {
        let (host, port) = crate::client::parse_server(&cfg.server)
            .map_err(|_| KubeError::Config(format!("{:?} is not https://HOST:PORT", cfg.server)))?;
        let port = if cfg.server.contains("://") && !has_port(&cfg.server) {
            443
        } else {
            port
        };
        let pem = std::fs::read(&cfg.ca_file).map_err(|e| {
            KubeError::Config(format!(
                "cannot read the cluster CA {}: {e}",
                cfg.ca_file.display()
            ))
        })?;
        let mut roots = rustls::RootCertStore::empty();
        let certs = strait_ca::cert::certs_from_pem(&String::from_utf8_lossy(&pem))
            .map_err(|e| KubeError::Config(format!("{}: {e}", cfg.ca_file.display())))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| KubeError::Config(format!("{}: {e}", cfg.ca_file.display())))?;
        }
        let provider = strait_ca::tls::provider().clone();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| KubeError::Config(e.to_string()))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeError::Config(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Fail early with a clear message rather than at the first request.
        read_token(&cfg.token_file)?;
        let authority = crate::client::authority(&host, port);
        Ok(Self {
            host,
            port,
            authority,
            tls: Arc::new(tls),
            token_file: cfg.token_file.clone(),
        })
    }

    /// Sends one request and returns the response head and its (streaming) body; non-2xx answers become
    /// [`KubeError::Status`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, KubeError> {
        use crate::client::{connect_tls, ConnectFailure};
        let tls = connect_tls(&self.host, self.port, self.tls.clone(), CONNECT_TIMEOUT)
            .await
            .map_err(|e| match e {
                ConnectFailure::BadName => {
                    KubeError::Config(format!("bad API server name {:?}", self.host))
                }
                ConnectFailure::Tcp(reason) => KubeError::Connect {
                    server: self.authority.clone(),
                    reason,
                },
                ConnectFailure::Tls(reason) => KubeError::Connect {
                    server: self.authority.clone(),
                    reason: format!("TLS: {reason}"),
                },
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| KubeError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let token = read_token(&self.token_file)?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::USER_AGENT, "strait-control");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| KubeError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| KubeError::Http(e.to_string()))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(KubeError::from_status(status, &body))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, KubeError> {
        let work = async {
            let resp = self.send(method, path, body).await?;
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| KubeError::Http(e.to_string()))?
                .to_bytes();
            serde_json::from_slice(&bytes).map_err(|e| KubeError::Decode(format!("{path}: {e}")))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| KubeError::Http(format!("{path}: no answer within {REQUEST_TIMEOUT:?}")))?
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let body = serde_json::to_vec(body).map_err(|e| KubeError::Decode(e.to_string()))?;
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let body = serde_json::to_vec(body).map_err(|e| KubeError::Decode(e.to_string()))?;
        self.call(Method::PUT, path, Some(body)).await
    }

    /// Opens a watch: the body is a stream of JSON objects, one per line.
    pub async fn watch(&self, path: &str) -> Result<Lines, KubeError> {
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.send(Method::GET, path, None))
            .await
            .map_err(|_| {
                KubeError::Http(format!("{path}: no answer within {REQUEST_TIMEOUT:?}"))
            })??;
        Ok(Lines {
            body: resp.into_body(),
            buf: BytesMut::new(),
        })
    }
}

fn has_port(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(']') {
        Some((_, after)) => after.starts_with(':'),
        None => authority.contains(':'),
    }
}

fn read_token(file: &std::path::Path) -> Result<String, KubeError> {
    let t = std::fs::read_to_string(file).map_err(|e| {
        KubeError::Config(format!(
            "cannot read the service-account token {}: {e}",
            file.display()
        ))
    })?;
    let t = t.trim();
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(KubeError::Config(format!(
            "{} does not hold a bearer token",
            file.display()
        )));
    }
    Ok(t.to_owned())
}

/// The lines of a watch response, split as they arrive.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
}

impl Lines {
    /// The next complete line (without the newline); `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, KubeError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(i + 1).freeze();
                let line = line.slice(..i);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_EVENT {
                return Err(KubeError::Decode(format!(
                    "a watch event is larger than {MAX_EVENT} bytes"
                )));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(KubeError::Http(e.to_string())),
                None => {
                    // A last event without a trailing newline still counts.
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        return Ok(None);
                    }
                    return Ok(Some(std::mem::take(&mut self.buf).freeze()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_and_without_ports() {
        assert!(has_port("https://10.96.0.1:443"));
        assert!(has_port("https://[fd00::1]:6443/"));
        assert!(!has_port("https://kubernetes.default.svc"));
        assert!(!has_port("https://[fd00::1]"));
    }

    #[test]
    fn status_bodies_become_errors() {
        let e = KubeError::from_status(
            StatusCode::GONE,
            br#"{"kind":"Status","status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}"#,
        );
        assert!(e.is_gone(), "{e}");
        assert!(e.to_string().contains("too old"));
        let e = KubeError::from_status(StatusCode::FORBIDDEN, b"<html>nope</html>");
        assert_eq!(e.code(), Some(403));
    }
}
