//! A client of the control plane's API, used by the CLI (admin token), node proxies (node SVID) and joining
//! nodes (anchor pin from the join token).
//!
//! Requests share one HTTP/2 connection, re-established when it drops, so a proxy asking for many SVIDs
//! pays one TLS handshake, not one per request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde::{de::DeserializeOwned, Serialize};
use strait_ca::verify::{PinnedServerVerifier, SvidServerVerifier};
use strait_ca::{PeerIdMatcher, Svid, TrustBundle};

use strait_proto::api::{ErrorBody, CONTROL_ID_PATH, DEFAULT_PORT};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers larger than this are refused (a directory of tens of thousands of workloads fits).
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad control plane address {0:?}: use https://HOST:PORT")]
    BadUrl(String),
    #[error("cannot reach the control plane at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS with the control plane failed: {0}")]
    Tls(String),
    #[error("control plane request failed: {0}")]
    Http(String),
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
        field: Option<String>,
    },
    #[error("unexpected answer from the control plane: {0}")]
    Decode(String),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How the client authenticates the control plane.
pub enum ServerTrust {
    /// The trust bundle: the server must prove `spiffe://<td>/strait/control`.
    Bundle(Arc<TrustBundle>),
    /// A first join: only the SHA-256 of the trust anchor is known (from the join token).
    Pin([u8; 32]),
    /// Another trust domain's bundle endpoint: it must chain to `bundle` (that domain's roots) and prove
    /// exactly `id` (SPIFFE Federation, profile `https_spiffe`).
    Endpoint {
        bundle: Arc<TrustBundle>,
        id: strait_ca::SpiffeId,
    },
}

pub struct ApiClient {
    host: String,
    port: u16,
    authority: String,
    tls: Arc<rustls::ClientConfig>,
    bearer: Option<String>,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

/// Host and port of `https://host:port` (or `host:port`; the port defaults to 15012).
pub fn parse_server(server: &str) -> Result<(String, u16), ClientError> {
    let with_scheme = if server.contains("://") {
        server.to_owned()
    } else {
        format!("https://{server}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|_| ClientError::BadUrl(server.into()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::BadUrl(server.into()));
    }
    let host = uri
        .host()
        .ok_or_else(|| ClientError::BadUrl(server.into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(DEFAULT_PORT)))
}

/// `host:port` as an HTTP authority (IPv6 literals in brackets).
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why [`connect_tls`] failed.
pub enum ConnectFailure {
    /// The host is neither a DNS name nor an IP address.
    BadName,
    Tcp(String),
    Tls(String),
}

/// Opens TCP (without Nagle) to `host:port` and runs the TLS handshake, each step bounded by `timeout`.
/// Shared by the control plane's client and the Kubernetes API client.
pub async fn connect_tls(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ConnectFailure> {
    let name = ServerName::try_from(host.to_owned()).map_err(|_| ConnectFailure::BadName)?;
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| ConnectFailure::Tcp("timed out".into()))?
        .map_err(|e| ConnectFailure::Tcp(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| ConnectFailure::Tls("handshake timed out".into()))?
    .map_err(|e| ConnectFailure::Tls(strait_ca::verify::explain_io(&e)))
}

/// TLS 1.3 client configuration for talking to the control plane: the server must chain to the bundle
/// (or the pinned anchor) and prove the control plane's SPIFFE ID. No ALPN set.
pub fn control_tls(
    trust: ServerTrust,
    client_cert: Option<&Svid>,
) -> Result<rustls::ClientConfig, ClientError> {
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match trust {
        ServerTrust::Bundle(bundle) => {
            let td = bundle.trust_domain().id_string();
            let want = format!("{td}{CONTROL_ID_PATH}");
            Arc::new(SvidServerVerifier::new(
                bundle,
                PeerIdMatcher::predicate(want.clone(), move |id| id.as_str() == want),
            ))
        }
        ServerTrust::Pin(pin) => Arc::new(PinnedServerVerifier::new(pin, CONTROL_ID_PATH)),
        ServerTrust::Endpoint { bundle, id } => {
            Arc::new(SvidServerVerifier::new(bundle, PeerIdMatcher::Exact(id)))
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous() // the verifier checks the chain and the control plane's SPIFFE ID
        .with_custom_certificate_verifier(verifier);
    match client_cert {
        Some(svid) => builder
            .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())
            .map_err(|e| ClientError::Tls(e.to_string())),
        None => Ok(builder.with_no_client_auth()),
    }
}

impl ApiClient {
    /// `server` is `https://host:port` (or `host:port`); `client_cert` is the node SVID for node routes.
    pub fn new(
        server: &str,
        trust: ServerTrust,
        client_cert: Option<&Svid>,
        bearer: Option<String>,
    ) -> Result<Self, ClientError> {
        let (host, port) = parse_server(server)?;
        let mut tls = control_tls(trust, client_cert)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let authority = authority(&host, port);
        Ok(Self {
            host,
            port,
            authority,
            tls: Arc::new(tls),
            bearer,
            conn: Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tls = connect_tls(&self.host, self.port, self.tls.clone(), CONNECT_TIMEOUT)
            .await
            .map_err(|e| match e {
                ConnectFailure::BadName => ClientError::BadUrl(self.host.clone()),
                ConnectFailure::Tcp(reason) => ClientError::Connect {
                    addr: self.authority.clone(),
                    reason,
                },
                ConnectFailure::Tls(reason) => ClientError::Tls(reason),
            })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A ready sender: the cached connection, or a new one. The lock is never held across an await.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let cached = self.conn.lock().ok().and_then(|c| c.clone());
        if let Some(mut s) = cached {
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let fresh = self.connect().await?;
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(fresh.clone());
        }
        Ok(fresh)
    }

    /// Sends one request and returns status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut sender = self.sender().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{}{}", self.authority, path));
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        if let Some(token) = &self.bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let fut = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ClientError::Http("request timed out".into()))?
    }

    /// Sends JSON (or nothing) and decodes a JSON answer; an error answer becomes [`ClientError::Api`].
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let (ct, bytes) = match body {
            Some(b) => (
                Some("application/json"),
                Bytes::from(serde_json::to_vec(b).map_err(|e| ClientError::Decode(e.to_string()))?),
            ),
            None => (None, Bytes::new()),
        };
        let (status, answer) = self.raw(method, path, ct, bytes).await?;
        decode(status, &answer)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }
}

/// Decodes an answer: the JSON body on success, the API error otherwise.
pub fn decode<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, ClientError> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()));
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => Err(ClientError::Api {
            status,
            code: e.error.code,
            message: e.error.message,
            field: e.error.field,
        }),
        Err(_) => Err(ClientError::Api {
            status,
            code: "http".into(),
            message: format!("HTTP {status}: {}", String::from_utf8_lossy(body).trim()),
            field: None,
        }),
    }
}
