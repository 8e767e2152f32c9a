//! The control plane process: HTTPS (TLS 1.3) API over the store and the CA.
//!
//! One listener serves three kinds of callers, told apart per request:
//! - **admins**, by a bearer token (its SHA-256 compared in constant time);
//! - **nodes**, by their node SVID as TLS client certificate (optional at the TLS layer, required by the
//!   `/v1/node/*` routes; a presented certificate must pass every check or the handshake fails);
//! - **joining nodes**, by a one-time join token in the request body.
//!
//! Store and CA work blocks (fsync, signatures), so handlers run it on the blocking pool; no lock is held
//! across an await.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use strait_ca::verify::peer_id;
use strait_ca::{CheckedCsr, IdKind, PeerIdMatcher, SpiffeId, TrustBundle, TrustDomain};
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::api::{self, paths, ErrorBody, ErrorDetail};
use crate::authorities::{Authorities, RotationError};
use crate::dist::hub::Hub;
use crate::dist::keys::{KeyError, KeyRing};
use crate::dist::Transport;
use crate::registry::{from_json, from_yaml, ApplyDocument, FieldError, NodeName, Workload};
use crate::store::{NodeRecord, Store, StoreError, TokenRecord};
use crate::tokens::{AdminToken, JoinToken};

/// Largest request body accepted (an apply document of a few thousand workloads fits).
pub const MAX_BODY: usize = 1 << 20;
/// Largest header block accepted, HTTP/1.1 and HTTP/2.
pub const MAX_HEADERS: usize = 16 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_TOKEN_TTL: u64 = 3600;
const MAX_TOKEN_TTL: u64 = 7 * 86400;

/// Files in the control plane's data directory.
pub mod layout {
    pub const CA_DIR: &str = "ca";
    pub const STORE: &str = "store.redb";
    pub const ADMIN_TOKEN: &str = "admin.token";
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Lifetime of node and workload SVIDs.
    pub svid_ttl: Duration,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The control plane's own serving certificate, swapped at half life without restarting the listener.
#[derive(Debug)]
struct ServingCert(arc_swap::ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Issues the control plane's SVID with a key made here (never written anywhere), and sends the trust
/// anchor in the chain so that a joining node can check it against the pin in its token (and, while a
/// root retires, the path to that root: [`Authorities::serving_chain_extra`]).
fn serving_cert(
    authorities: &Authorities,
    id: &SpiffeId,
    ttl: Duration,
) -> anyhow::Result<(CertifiedKey, SystemTime)> {
    let now = SystemTime::now();
    let ca = authorities.active();
    let svid = ca.issue_with_new_key(id, ttl, now)?;
    let mut chain = svid.chain;
    chain.extend(ca.trust_bundle().certs().iter().cloned());
    chain.extend(authorities.serving_chain_extra());
    let key = strait_ca::tls::provider()
        .key_provider
        .load_private_key(svid.key)?;
    Ok((CertifiedKey::new(chain, key), now + ttl))
}

pub struct State {
    /// The active CA, and during a root rotation the prepared or retiring one.
    authorities: Authorities,
    store: Arc<Store>,
    /// Serialises trust-state announcements ([`announce_trust`]).
    trust_update: Mutex<()>,
    /// The local bundle's fingerprint and its `spiffe_sequence`, as last served.
    bundle_sequence: Mutex<Option<(String, u64)>>,
    admin_hash: [u8; 32],
    /// Wakes the serving-certificate loop when the signing root changed.
    serving_renew: tokio::sync::Notify,
    svid_ttl: Duration,
    /// Last call per node since this process started (kept in memory: writing it on every call would cost
    /// an fsync per request).
    last_seen: Mutex<HashMap<NodeName, Instant>>,
    /// The policy distributor (mesh versions, proxy sessions).
    pub hub: Arc<Hub>,
    /// Kubernetes mode: the API server client and the pods it reports.
    kube: Option<Arc<crate::kube::Kube>>,
    /// What the API's TLS port verifies client certificates against: this trust domain's roots and,
    /// apart, each federated partner's (a partner's control plane asks for its exports). Kept in step by
    /// [`announce_trust`].
    api_trust: Arc<strait_ca::SharedBundle>,
}

impl State {
    /// Opens the data directory written by [`crate::init::init`] (VM mode).
    pub fn open(data_dir: &Path, svid_ttl: Duration) -> anyhow::Result<Self> {
        Self::open_with(data_dir, svid_ttl, None)
    }

    /// Opens the data directory; with `kube`, pods come from the Kubernetes API and no mesh version is made
    /// until they have been listed (call [`start_kubernetes`](Self::start_kubernetes) next).
    pub fn open_with(
        data_dir: &Path,
        svid_ttl: Duration,
        kube: Option<crate::kube::KubeParts>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let authorities = Authorities::open(data_dir, svid_ttl, SystemTime::now())?;
        let ca = authorities.active();
        let store = Store::open(&data_dir.join(layout::STORE)).context("opening the store")?;
        let admin_hash = store.admin_hash()?.with_context(|| {
            format!(
                "{} has no admin credential; run `strait control init`",
                data_dir.display()
            )
        })?;
        let keys = KeyRing::open(data_dir)?;
        let hub = Arc::new(Hub::open(&store, keys, &ca.trust_domain().to_string())?);
        let kube = kube.map(|k| {
            hub.expect_external();
            Arc::new(crate::kube::Kube::new(
                k.client,
                k.settings,
                ca.trust_domain().clone(),
            ))
        });
        hub.set_trust(trust_state(&authorities, &store));
        let api_trust = Arc::new(strait_ca::SharedBundle::from_pointee(api_trust(
            &authorities,
            &store,
        )));
        // Changes made while the control plane was down (or an older store) become a version now.
        hub.rebuild(&store).context("making the mesh version")?;
        Ok(Self {
            hub,
            authorities,
            serving_renew: tokio::sync::Notify::new(),
            store: Arc::new(store),
            trust_update: Mutex::new(()),
            bundle_sequence: Mutex::new(None),
            admin_hash,
            svid_ttl,
            last_seen: Mutex::new(HashMap::new()),
            kube,
            api_trust,
        })
    }

    /// A fresh SVID of this control plane (`spiffe://<td>/strait/control`), presented as client
    /// certificate to federated partners' control planes.
    fn client_identity(&self) -> Option<strait_ca::Svid> {
        let id = self.control_id().ok()?;
        self.authorities
            .active()
            .issue_with_new_key(&id, Duration::from_secs(600), SystemTime::now())
            .inspect_err(
                |e| warn!(error = %e, "cannot issue the control plane's client certificate"),
            )
            .ok()
    }

    /// Kubernetes mode: follows pods and namespaces, feeds them into mesh versions and publishes the trust
    /// bundle for the proxies. No-op in VM mode.
    pub fn start_kubernetes(self: &Arc<Self>) {
        let Some(kube) = self.kube.clone() else {
            return;
        };
        use crate::kube::watch::{reflect, Resource};
        tokio::spawn(reflect(kube.clone(), Resource::Namespaces));
        tokio::spawn(reflect(kube.clone(), Resource::Pods));
        tokio::spawn(crate::kube::join::publish_bundle(
            kube.clone(),
            self.authorities.shared_bundle(),
        ));
        tokio::spawn(crate::kube::feed(self.clone(), kube));
    }

    /// New pod workloads from Kubernetes: a new mesh version if they changed. Blocking.
    pub(crate) fn set_kube_workloads(&self, workloads: Vec<Workload>) {
        self.hub.set_external(workloads);
        self.hub.changed(&self.store);
    }
    fn control_id(&self) -> anyhow::Result<SpiffeId> {
        Ok(SpiffeId::parse(&format!(
            "{}{}",
            self.authorities.trust_domain().id_string(),
            api::CONTROL_ID_PATH
        ))?)
    }

    fn bundle_pem(&self) -> String {
        self.authorities.bundle().to_pem()
    }

    fn trust_domain(&self) -> &TrustDomain {
        self.authorities.trust_domain()
    }

    fn touch(&self, node: &NodeName) {
        if let Ok(mut m) = self.last_seen.lock() {
            m.insert(node.clone(), Instant::now());
        }
    }
}

/// Runs the API until `shutdown` resolves.
pub async fn serve(
    state: Arc<State>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let control_id = state.control_id()?;
    let (cert, mut not_after) = serving_cert(&state.authorities, &control_id, state.svid_ttl)?;
    let resolver = Arc::new(ServingCert(arc_swap::ArcSwap::from_pointee(cert)));

    // Only node SVIDs may be presented as client certificates to the distributor; workloads talk to their
    // proxy, never to the control plane. On the API port a federated partner's control plane may present
    // its own SVID too (to fetch what is exported to it), verified against that partner's roots only.
    let nodes_only =
        PeerIdMatcher::predicate("a node identity (spiffe://<td>/node/<name>)", |id| {
            matches!(id.kind(), IdKind::Node { .. })
        });
    let own_td = state.trust_domain().clone();
    let nodes_or_partners = PeerIdMatcher::predicate(
        "a node identity of this trust domain, or a federated partner's control plane",
        move |id| {
            if id.is_member_of(&own_td) {
                matches!(id.kind(), IdKind::Node { .. })
            } else {
                id.path() == api::CONTROL_ID_PATH
            }
        },
    );
    let mut tls = rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(strait_ca::verify::SvidClientVerifier::shared(
            state.api_trust.clone(),
            nodes_or_partners,
            false,
        )))
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        crate::dist::wire::ALPN.to_vec(),
    ];

    // The distributor's QUIC endpoint on the same address (UDP), with the same certificate; here client
    // certificates are required and must be node SVIDs.
    let quic = {
        let mut qtls =
            rustls::ServerConfig::builder_with_provider(strait_ca::tls::provider().clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(Arc::new(strait_ca::verify::SvidClientVerifier::shared(
                    state.authorities.shared_bundle(),
                    nodes_only.clone(),
                    true,
                )))
                .with_cert_resolver(resolver.clone());
        qtls.alpn_protocols = vec![crate::dist::wire::ALPN.to_vec()];
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(qtls)?,
        ));
        cfg.transport_config(strait_proto::wire::quic_transport());
        let addr = listener.local_addr()?;
        let endpoint = quinn::Endpoint::server(cfg, addr).map_err(|e| {
            anyhow::anyhow!("cannot listen on {addr}/udp for the policy distributor (in use?): {e}")
        })?;
        tokio::spawn(crate::dist::hub::serve_quic(
            state.hub.clone(),
            endpoint.clone(),
        ));
        let st = state.clone();
        let me = state.clone();
        tokio::spawn(crate::federation::refresh_loop(
            state.store.clone(),
            state.hub.clone(),
            move || me.client_identity(),
            move || {
                let st = st.clone();
                tokio::task::spawn_blocking(move || announce_trust(&st));
            },
        ));
        endpoint
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADERS);
    http.http2()
        .max_header_list_size(MAX_HEADERS as u32)
        .max_concurrent_streams(256);
    let http = Arc::new(http);

    info!(addr = %listener.local_addr()?, id = %control_id, "control plane listening");
    tokio::pin!(shutdown);
    loop {
        // Renew the serving certificate at half life.
        let half_life = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            / 2;
        tokio::select! {
            _ = &mut shutdown => {
                info!("control plane shutting down");
                quic.close(0u8.into(), b"control plane shutting down");
                return Ok(());
            }
            _ = async {
                tokio::select! {
                    _ = tokio::time::sleep(half_life.max(Duration::from_secs(1))) => {}
                    _ = state.serving_renew.notified() => {}
                }
            } => {
                match serving_cert(&state.authorities, &control_id, state.svid_ttl) {
                    Ok((cert, na)) => {
                        resolver.0.store(Arc::new(cert));
                        not_after = na;
                        info!("renewed the control plane's serving certificate");
                    }
                    Err(e) => error!(error = %e, "cannot renew the serving certificate; retrying in 1 s"),
                }
            }
            accepted = listener.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, state, http) = (acceptor.clone(), state.clone(), http.clone());
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            let reason = strait_ca::verify::explain_io(&e);
                            warn!(%remote, %reason, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let peer = peer_id(tls.get_ref().1);
                    let own = state.trust_domain();
                    let node = peer.as_ref().filter(|id| id.is_member_of(own)).and_then(|id| match id.kind() {
                        IdKind::Node { name } => NodeName::new(name).ok(),
                        _ => None,
                    });
                    // The verifier admitted only a partner's control plane SVID from another trust domain.
                    let partner = peer
                        .as_ref()
                        .filter(|id| !id.is_member_of(own))
                        .map(|id| id.trust_domain_str().to_owned());
                    if tls.get_ref().1.alpn_protocol() == Some(crate::dist::wire::ALPN) {
                        // The distribution protocol over TLS/TCP: the fallback for nodes whose UDP is blocked.
                        let Some(node) = node else {
                            warn!(%remote, "distribution session without a node certificate refused");
                            return;
                        };
                        let (r, w) = tokio::io::split(tls);
                        state
                            .hub
                            .clone()
                            .session(node, Transport::Tcp, remote, r, crate::dist::Stream(w))
                            .await;
                        return;
                    }
                    let ctx = Arc::new(Caller { remote, node, partner });
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, ctx) = (state.clone(), ctx.clone());
                        async move { Ok::<_, Infallible>(route(state, ctx, req).await) }
                    });
                    if let Err(e) = http.serve_connection(TokioIo::new(tls), svc).await {
                        debug!(%remote, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
}

/// Who is calling, as far as the TLS layer knows.
struct Caller {
    remote: SocketAddr,
    /// The verified node, when the caller presented a node SVID.
    node: Option<NodeName>,
    /// The federated partner's trust domain, when the caller presented its control plane's SVID.
    partner: Option<String>,
}

/// An error answer: status, stable code, message, and the offending field when there is one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn bad_field(e: FieldError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: e.to_string(),
            field: Some(e.field),
        }
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the control plane log",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(e)
    }
}

type Reply = Result<Response<Full<Bytes>>, ApiError>;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    let mut r = json(
        e.status,
        &ErrorBody {
            error: ErrorDetail {
                code: e.code.into(),
                message: e.message,
                field: e.field,
            },
        },
    );
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"strait\""),
        );
    }
    r
}

/// Runs blocking work (store, signatures) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

async fn route(
    state: Arc<State>,
    caller: Arc<Caller>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let result = dispatch(&state, &caller, &method, &path, req).await;
    let response = result.unwrap_or_else(error_response);
    debug!(remote = %caller.remote, %method, %path, status = response.status().as_u16(), "request");
    response
}

async fn dispatch(
    state: &Arc<State>,
    caller: &Arc<Caller>,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Reply {
    match (method, path) {
        (&Method::GET, paths::READY) => Ok(text(StatusCode::OK, "ready\n")),
        (&Method::GET, paths::BUNDLE) => Ok(text(StatusCode::OK, state.bundle_pem())),
        (&Method::GET, paths::FEDERATION_BUNDLE) => federation_bundle(state).await,
        (&Method::GET, paths::FEDERATION_EXPORTS) => federation_exports(state, caller).await,
        (&Method::POST, paths::JOIN) => join(state, caller, req).await,
        (&Method::POST, paths::JOIN_KUBERNETES) => join_kubernetes(state, caller, req).await,
        (_, p) if p.starts_with("/v1/node/") => {
            let node = caller.node.clone().ok_or_else(|| {
                warn!(remote = %caller.remote, path = p, "node route called without a node certificate");
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "node routes need the node's SVID as TLS client certificate (join first)",
                )
            })?;
            state.touch(&node);
            match (method, p) {
                (&Method::POST, paths::NODE_RENEW) => renew(state, node, req).await,
                (&Method::POST, paths::NODE_SVIDS) => workload_svid(state, node, req).await,
                (&Method::GET, paths::NODE_DIRECTORY) => directory(state).await,
                (&Method::GET, paths::NODE_DISTRIBUTION_KEYS) => {
                    let (active, next) = state.hub.public_keys();
                    Ok(json(
                        StatusCode::OK,
                        &api::DistributionKeys { active, next },
                    ))
                }
                _ => Err(not_found(method, p)),
            }
        }
        (_, p) if p.starts_with("/v1/admin/") => {
            authorize_admin(state, caller, &req, p)?;
            match (method, p) {
                (&Method::POST, paths::ADMIN_TOKENS) => create_token(state, req).await,
                (&Method::GET, paths::ADMIN_WORKLOADS) => {
                    let st = state.clone();
                    let list = blocking(move || Ok(st.store.workloads()?)).await?;
                    Ok(json(StatusCode::OK, &list))
                }
                (&Method::POST, paths::ADMIN_WORKLOADS) => put_workload(state, req).await,
                (&Method::POST, paths::ADMIN_WORKLOADS_REMOVE) => remove_workload(state, req).await,
                (&Method::POST, paths::ADMIN_APPLY) => apply(state, req).await,
                (&Method::GET, paths::ADMIN_STATUS) => status(state).await,
                (&Method::GET, paths::ADMIN_WORKFLOWS) => list_workflows(state).await,
                (&Method::POST, paths::ADMIN_WORKFLOWS) => apply_workflow(state, req).await,
                (&Method::POST, paths::ADMIN_WORKFLOWS_DELETE) => delete_workflow(state, req).await,
                (&Method::GET, paths::ADMIN_CA) => ca_rotation(state, CaStep::Status).await,
                (&Method::POST, paths::ADMIN_CA_PREPARE) => {
                    let r: api::CaStepRequest = json_body(req).await?;
                    ca_rotation(state, CaStep::Prepare(r)).await
                }
                (&Method::POST, paths::ADMIN_CA_ACTIVATE) => {
                    let r: api::CaStepRequest = json_body(req).await?;
                    ca_rotation(state, CaStep::Activate(r)).await
                }
                (&Method::POST, paths::ADMIN_CA_WITHDRAW) => {
                    let r: api::CaStepRequest = json_body(req).await?;
                    ca_rotation(state, CaStep::Withdraw(r)).await
                }
                (&Method::GET, paths::ADMIN_DISTRIBUTION_KEY) => {
                    key_rotation(state, KeyStep::Status).await
                }
                (&Method::POST, paths::ADMIN_DISTRIBUTION_KEY_PREPARE) => {
                    key_rotation(state, KeyStep::Prepare).await
                }
                (&Method::POST, paths::ADMIN_DISTRIBUTION_KEY_ACTIVATE) => {
                    let r: api::KeyActivateRequest = json_body(req).await?;
                    key_rotation(state, KeyStep::Activate { force: r.force }).await
                }
                (&Method::GET, paths::ADMIN_FEDERATION) => list_federations(state).await,
                (&Method::POST, paths::ADMIN_FEDERATION) => add_federation(state, req).await,
                (&Method::POST, paths::ADMIN_FEDERATION_REFRESH) => {
                    refresh_federations(state, req).await
                }
                (&Method::POST, paths::ADMIN_FEDERATION_REMOVE) => {
                    remove_federation(state, req).await
                }
                (&Method::POST, paths::ADMIN_FEDERATION_EXPORT) => {
                    export_federation(state, req).await
                }
                (&Method::POST, paths::ADMIN_FEDERATION_EGRESS) => {
                    egress_federation(state, req).await
                }
                (&Method::GET, p) if p.starts_with(paths::ADMIN_WORKFLOW_PREFIX) => {
                    show_workflow(state, &p[paths::ADMIN_WORKFLOW_PREFIX.len()..]).await
                }
                _ => Err(not_found(method, p)),
            }
        }
        _ => Err(not_found(method, path)),
    }
}

fn not_found(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {path}"),
    )
}

fn authorize_admin(
    state: &State,
    caller: &Caller,
    req: &Request<Incoming>,
    path: &str,
) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(AdminToken::parse);
    match presented {
        Some(t) if crate::tokens::hashes_equal(&t.hash(), &state.admin_hash) => Ok(()),
        Some(_) => {
            warn!(remote = %caller.remote, path, "admin call with a wrong credential refused");
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the admin credential is not valid",
            ))
        }
        None => {
            warn!(remote = %caller.remote, path, "anonymous admin call refused");
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "admin calls need `Authorization: Bearer <admin token>` (see `strait control init`)",
            ))
        }
    }
}

async fn body(req: Request<Incoming>) -> Result<(Option<String>, Bytes), ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request bodies are limited to {MAX_BODY} bytes"),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.to_string())
            }
        })?
        .to_bytes();
    Ok((content_type, bytes))
}

async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let (_, bytes) = body(req).await?;
    from_json(&bytes).map_err(ApiError::bad_field)
}

fn check_csr(pem: &str) -> Result<CheckedCsr, ApiError> {
    CheckedCsr::from_pem(pem).map_err(|e| {
        ApiError::bad_field(FieldError {
            field: "csr_pem".into(),
            message: e.to_string(),
        })
    })
}

fn check_tunnel_address(addr: &Option<String>) -> Result<(), ApiError> {
    check_address("tunnel_address", addr)
}

fn check_address(field: &str, addr: &Option<String>) -> Result<(), ApiError> {
    match addr {
        Some(a) if a.parse::<SocketAddr>().is_err() => Err(ApiError::bad_field(FieldError {
            field: field.into(),
            message: format!("{a:?} is not an address:port"),
        })),
        _ => Ok(()),
    }
}

/// The generic refusal a joining caller sees; the log says which check failed.
fn join_refused() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "join_refused",
        "the join token is not valid (unknown, expired or already used); create a new one with `strait node token create`",
    )
}

async fn join(state: &Arc<State>, caller: &Caller, req: Request<Incoming>) -> Reply {
    let r: api::JoinRequest = json_body(req).await?;
    check_tunnel_address(&r.tunnel_address)?;
    check_address("gateway_address", &r.gateway_address)?;
    let token = JoinToken::parse(&r.token).map_err(|_| {
        warn!(remote = %caller.remote, "join with a malformed token refused");
        join_refused()
    })?;
    let csr = check_csr(&r.csr_pem)?;
    let (st, remote) = (state.clone(), caller.remote);
    let resp = blocking(move || {
        let now = SystemTime::now();
        let node = match st
            .store
            .consume_token(&token.id, &token.secret_hash(), secs(now))?
        {
            Ok(t) => t,
            Err(refusal) => {
                // The token id is a lookup key, not a secret; the secret is never logged.
                warn!(%remote, token_id = %token.id, reason = %refusal, "join refused");
                return Err(join_refused());
            }
        };
        let advert = Advert {
            tunnel_address: r.tunnel_address,
            addresses: r.addresses,
            gateway_address: r.gateway_address,
        };
        let (node, token_gateway) = (node.node, node.gateway);
        let how = Issuance::JoinToken {
            gateway: token_gateway,
        };
        let resp = issue_node_cert(&st, &node, &csr, advert, now, how)?;
        info!(%remote, node = %node, token_id = %token.id, gateway = token_gateway, "node joined");
        Ok(resp)
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

/// Kubernetes mode: a proxy proves itself with its service-account token (see [`crate::kube::join`]).
async fn join_kubernetes(state: &Arc<State>, caller: &Caller, req: Request<Incoming>) -> Reply {
    let Some(kube) = state.kube.clone() else {
        warn!(remote = %caller.remote, "Kubernetes join on a control plane in VM mode refused");
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_kubernetes",
            "this control plane is not in Kubernetes mode (start it with --kubernetes); join with a token",
        ));
    };
    let r: api::KubeJoinRequest = json_body(req).await?;
    check_tunnel_address(&r.tunnel_address)?;
    check_address("gateway_address", &r.gateway_address)?;
    let csr = check_csr(&r.csr_pem)?;
    let Ok(_permit) = kube.joins.try_acquire() else {
        warn!(remote = %caller.remote, node = %r.node, "Kubernetes join refused: too many joins in progress");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many joins are being checked; retry in a few seconds",
        ));
    };
    let role = match crate::kube::join::authenticate(&kube, &r.token, &r.node).await {
        Ok(role) => role,
        Err(refusal) => {
            warn!(remote = %caller.remote, node = %r.node, reason = %refusal, "Kubernetes join refused");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "join_refused",
                "the service-account token was not accepted for this node (the control plane log says why)",
            ));
        }
    };
    let gateway = role == crate::kube::join::Role::Gateway;
    let (st, remote, node) = (state.clone(), caller.remote, r.node);
    let resp = blocking(move || {
        let advert = Advert {
            tunnel_address: r.tunnel_address,
            addresses: r.addresses,
            gateway_address: r.gateway_address,
        };
        let resp = issue_node_cert(
            &st,
            &node,
            &csr,
            advert,
            SystemTime::now(),
            Issuance::JoinKubernetes { gateway },
        )?;
        info!(%remote, node = %node, gateway, "node joined with its Kubernetes service-account token");
        Ok(resp)
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

/// Where a node says it can be reached.
struct Advert {
    tunnel_address: Option<String>,
    addresses: Vec<std::net::IpAddr>,
    gateway_address: Option<String>,
}

/// Why a node certificate is being issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Issuance {
    /// With a one-time token, made for a gateway or a node proxy.
    JoinToken {
        gateway: bool,
    },
    /// With a service-account token: of a proxy pod, or of a gateway pod.
    JoinKubernetes {
        gateway: bool,
    },
    Renew,
}

fn issue_node_cert(
    st: &State,
    node: &NodeName,
    csr: &CheckedCsr,
    advert: Advert,
    now: SystemTime,
    how: Issuance,
) -> Result<api::NodeCertResponse, ApiError> {
    let old = st.store.node(node.as_str())?;
    let via_kubernetes = match how {
        Issuance::JoinToken { .. } => false,
        Issuance::JoinKubernetes { .. } => true,
        Issuance::Renew => old.as_ref().is_some_and(|o| o.via_kubernetes),
    };
    // A gateway is what the operator made with a gateway token; nothing else may tell partners where to
    // reach the organisation (any node could otherwise pull every partner's tunnels through itself).
    let gateway = match how {
        Issuance::JoinToken { gateway } | Issuance::JoinKubernetes { gateway } => gateway,
        Issuance::Renew => old.as_ref().is_some_and(|o| o.gateway),
    };
    if advert.gateway_address.is_some() && !gateway {
        warn!(node = %node, "a node that was not made a gateway announced a gateway address; refused");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_a_gateway",
            "this node did not join as a gateway: create its token with `strait node token create --gateway` (in Kubernetes, run it as a pod of the gateway Deployment)",
        ));
    }
    // A node vouched for by Kubernetes stays a node only while its pod exists: a token or key copied out
    // of a deleted pod must not renew itself forever.
    if how == Issuance::Renew && via_kubernetes {
        let kube = st.kube.as_ref();
        if gateway && !kube.is_some_and(|k| k.gateway_pod_running()) {
            warn!(node = %node, "renewal refused: no running pod of the gateway Deployment");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "no_gateway_pod",
                "this gateway joined through Kubernetes and no pod of the gateway Deployment runs now",
            ));
        }
        if !gateway && !kube.is_some_and(|k| k.proxy_pod_on(node)) {
            warn!(node = %node, "renewal refused: no running pod of the proxy DaemonSet on this node");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "no_proxy_pod",
                "this node joined through Kubernetes and no pod of the proxy DaemonSet runs on it now",
            ));
        }
    }
    let id = SpiffeId::node(st.trust_domain(), node.as_str()).map_err(ApiError::internal)?;
    let svid = st
        .authorities
        .active()
        .issue(csr, &id, st.svid_ttl, now)
        .map_err(ApiError::internal)?;
    // What the node announces is authoritative for its kind: a gateway has no tunnel and no workload
    // addresses, a node proxy no gateway address (so a host that changes role leaves nothing behind).
    let (tunnel_address, addresses, gateway_address) = if gateway {
        let kept = old.as_ref().and_then(|o| o.gateway_address.clone());
        (None, Vec::new(), advert.gateway_address.or(kept))
    } else {
        let addresses = if advert.addresses.is_empty() {
            old.as_ref()
                .map(|o| o.addresses.clone())
                .unwrap_or_default()
        } else {
            advert.addresses
        };
        let kept = old.as_ref().and_then(|o| o.tunnel_address.clone());
        (advert.tunnel_address.or(kept), addresses, None)
    };
    let rec = NodeRecord {
        name: node.clone(),
        tunnel_address,
        addresses,
        gateway_address,
        gateway,
        joined_at: match (&old, how) {
            (Some(o), Issuance::Renew) => o.joined_at,
            _ => secs(now),
        },
        cert_not_after: secs(svid.not_after),
        last_cert_at: secs(now),
        via_kubernetes,
    };
    let moved = old.as_ref().is_none_or(|o| o.reach_changed(&rec));
    st.store.put_node(&rec)?;
    if moved {
        st.hub.changed(&st.store);
    }
    st.touch(node);
    let (active_key, next_key) = st.hub.public_keys();
    Ok(api::NodeCertResponse {
        id,
        chain_pem: svid.chain_pem(),
        bundle_pem: st.bundle_pem(),
        // The same list the versions' federation fingerprint is made of.
        federated: crate::federation::bundles(&st.store)?
            .iter()
            .map(|b| api::FederatedBundle {
                trust_domain: b.trust_domain().to_string(),
                bundle_pem: b.to_pem(),
            })
            .collect(),
        trust_domain: st.trust_domain().to_string(),
        not_after: secs(svid.not_after),
        distribution_key: Some(active_key.to_base64()),
        distribution_next_key: next_key.map(|k| k.to_base64()),
    })
}

async fn renew(state: &Arc<State>, node: NodeName, req: Request<Incoming>) -> Reply {
    let r: api::RenewRequest = json_body(req).await?;
    check_tunnel_address(&r.tunnel_address)?;
    check_address("gateway_address", &r.gateway_address)?;
    let csr = check_csr(&r.csr_pem)?;
    let st = state.clone();
    let resp = blocking(move || {
        let advert = Advert {
            tunnel_address: r.tunnel_address,
            addresses: r.addresses,
            gateway_address: r.gateway_address,
        };
        let resp = issue_node_cert(&st, &node, &csr, advert, SystemTime::now(), Issuance::Renew)?;
        info!(node = %node, "node certificate renewed");
        Ok(resp)
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

async fn workload_svid(state: &Arc<State>, node: NodeName, req: Request<Incoming>) -> Reply {
    let r: api::SvidRequest = json_body(req).await?;
    let csr = check_csr(&r.csr_pem)?;
    let st = state.clone();
    let resp = blocking(move || {
        // A registration in the store wins: a pod whose namespace and service account spell a registered
        // VM workload's identity must not obtain it elsewhere.
        match st.store.workload(&r.workload)? {
            Some(w) if w.node == node => {}
            // A meshed pod on this node, as the directory the proxies enforce lists it.
            None if st
                .hub
                .external()
                .iter()
                .any(|w| w.id == r.workload && w.node == node) => {}
            Some(w) => {
                warn!(node = %node, workload = %r.workload, registered_on = %w.node,
                      "node asked for a workload registered on another node; refused");
                return Err(forbidden_workload(&r.workload));
            }
            None => {
                warn!(node = %node, workload = %r.workload, "node asked for an unregistered workload; refused");
                return Err(forbidden_workload(&r.workload));
            }
        }
        let svid = st
            .authorities
            .active()
            .issue(&csr, &r.workload, st.svid_ttl, SystemTime::now())
            .map_err(ApiError::internal)?;
        debug!(node = %node, workload = %r.workload, "workload SVID issued");
        Ok(api::SvidResponse {
            id: svid.id.clone(),
            chain_pem: svid.chain_pem(),
            not_after: secs(svid.not_after),
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

fn forbidden_workload(id: &SpiffeId) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "not_your_workload",
        format!("{id} is not registered on this node"),
    )
}

async fn directory(state: &Arc<State>) -> Reply {
    let st = state.clone();
    // The directory proxies are given (pods included in Kubernetes mode), or the store's while the first
    // list of pods is awaited.
    let dir = blocking(
        move || match st.hub.directory(&st.store).map_err(ApiError::internal)? {
            Some(d) => Ok(d),
            None => Ok(st.store.directory()?),
        },
    )
    .await?;
    Ok(json(StatusCode::OK, &dir))
}

async fn create_token(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::TokenRequest = json_body(req).await?;
    let ttl = r.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL);
    if ttl == 0 || ttl > MAX_TOKEN_TTL {
        return Err(ApiError::bad_field(FieldError {
            field: "ttl_secs".into(),
            message: format!("must be between 1 and {MAX_TOKEN_TTL} seconds"),
        }));
    }
    let st = state.clone();
    let resp = blocking(move || {
        let token = JoinToken::generate(st.authorities.active_pin()).map_err(ApiError::internal)?;
        let now = unix_now();
        let rec = TokenRecord {
            node: r.node.clone(),
            secret_sha256: token.secret_hash(),
            created_at: now,
            expires_at: now + ttl,
            used_at: None,
            gateway: r.gateway,
        };
        st.store.put_token(&token.id, &rec)?;
        let purged = st.store.purge_expired_tokens(now)?;
        info!(node = %r.node, token_id = %token.id, ttl, purged, gateway = r.gateway, "join token created");
        Ok(api::TokenResponse {
            token: token.reveal(),
            node: r.node,
            expires_at: rec.expires_at,
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

fn check_trust_domain(st: &State, workloads: &[Workload]) -> Result<(), ApiError> {
    for (i, w) in workloads.iter().enumerate() {
        if !w.id.is_member_of(st.trust_domain()) {
            return Err(ApiError::bad_field(FieldError {
                field: format!("workloads[{i}].id"),
                message: format!("{} is outside trust domain {}", w.id, st.trust_domain()),
            }));
        }
        if !matches!(w.id.kind(), IdKind::Workload { .. }) {
            return Err(ApiError::bad_field(FieldError {
                field: format!("workloads[{i}].id"),
                message: format!(
                    "{} is not a workload ID (spiffe://{}/ns/<namespace>/sa/<service-account>)",
                    w.id,
                    st.trust_domain()
                ),
            }));
        }
    }
    Ok(())
}

async fn put_workload(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let w: Workload = json_body(req).await?;
    let st = state.clone();
    let change = blocking(move || {
        check_trust_domain(&st, std::slice::from_ref(&w)).map_err(|mut e| {
            e.field = Some("id".into());
            e
        })?;
        let report = st.store.apply(std::slice::from_ref(&w))?;
        st.hub.changed(&st.store);
        let change = if report.created > 0 {
            crate::store::Change::Created
        } else if report.updated > 0 {
            crate::store::Change::Updated
        } else {
            crate::store::Change::Unchanged
        };
        info!(workload = %w.id, node = %w.node, ?change, "workload registered");
        Ok(change)
    })
    .await?;
    Ok(json(StatusCode::OK, &api::ChangeResponse { change }))
}

async fn remove_workload(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::RemoveRequest = json_body(req).await?;
    let st = state.clone();
    let removed = blocking(move || {
        let removed = st.store.remove_workload(&r.id)?;
        st.hub.changed(&st.store);
        info!(workload = %r.id, removed, "workload removal");
        Ok(removed)
    })
    .await?;
    Ok(json(StatusCode::OK, &api::RemoveResponse { removed }))
}

async fn apply(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let (content_type, bytes) = body(req).await?;
    let doc: ApplyDocument = match content_type.as_deref() {
        Some(ct) if ct.starts_with("application/json") => from_json(&bytes),
        _ => from_yaml(&bytes),
    }
    .map_err(ApiError::bad_field)?;
    let st = state.clone();
    let report = blocking(move || {
        check_trust_domain(&st, &doc.workloads)?;
        let mut seen = std::collections::HashSet::new();
        for (i, w) in doc.workloads.iter().enumerate() {
            if !seen.insert(&w.id) {
                return Err(ApiError::bad_field(FieldError {
                    field: format!("workloads[{i}].id"),
                    message: format!("{} appears twice in the document", w.id),
                }));
            }
        }
        let report = st.store.apply(&doc.workloads)?;
        st.hub.changed(&st.store);
        info!(
            created = report.created,
            updated = report.updated,
            unchanged = report.unchanged,
            "apply"
        );
        Ok(report)
    })
    .await?;
    Ok(json(StatusCode::OK, &report))
}

enum CaStep {
    Status,
    Prepare(api::CaStepRequest),
    Activate(api::CaStepRequest),
    Withdraw(api::CaStepRequest),
}

/// The root rotation's status: the authorities, and the registered nodes that have not renewed their node
/// certificate since the last step (so may lack the bundle or the new root's certificates).
fn ca_status(st: &State, nodes: &[NodeRecord]) -> api::CaStatus {
    let last_step_at = st.authorities.last_step_at();
    let nodes_behind = nodes
        .iter()
        .filter(|n| last_step_at > 0 && n.last_cert_at < last_step_at)
        .map(|n| n.name.to_string())
        .collect();
    api::CaStatus {
        authorities: st.authorities.status(),
        last_step_at,
        nodes_behind,
        bundle_fingerprint: st.authorities.bundle().fingerprint(),
    }
}

/// What every mesh version says of trust: the CA's state, and the federated bundles' fingerprint.
fn trust_state(
    authorities: &crate::authorities::Authorities,
    store: &Store,
) -> crate::dist::version::TrustState {
    let mut t = authorities.trust_state();
    let partners = crate::federation::bundles(store).unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the federated bundles; versions announce none");
        Vec::new()
    });
    t.federation_fingerprint = authorities
        .bundle()
        .federate(partners)
        .federation_fingerprint();
    t
}

/// This trust domain's roots with each federated partner's beside them (never merged: a peer is
/// verified against its own trust domain's roots only).
fn api_trust(authorities: &crate::authorities::Authorities, store: &Store) -> TrustBundle {
    let partners = crate::federation::bundles(store).unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the federated bundles; partners cannot fetch their exports");
        Vec::new()
    });
    authorities.bundle().federate(partners)
}

/// Makes the next version carry the trust state as it is now (after a CA rotation step, or a federated
/// bundle added, refreshed to other roots or removed: proxies then fetch the bundles with their next
/// renewal). One at a time: a state computed earlier
/// must not overwrite a later one between `set_trust` and the rebuild. Blocking.
fn announce_trust(st: &State) {
    let _one = st.trust_update.lock().unwrap_or_else(|p| p.into_inner());
    st.api_trust
        .store(Arc::new(api_trust(&st.authorities, &st.store)));
    st.hub.set_trust(trust_state(&st.authorities, &st.store));
    st.hub.changed(&st.store);
}

/// [`announce_trust`] from an async handler.
async fn announce_federation(state: &Arc<State>) -> Result<(), ApiError> {
    let st = state.clone();
    blocking(move || {
        announce_trust(&st);
        Ok(())
    })
    .await
}

async fn add_federation(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::FederationAdd = json_body(req).await?;
    let own = state.trust_domain().clone();
    let f = crate::federation::add(state.store.clone(), &own, r)
        .await
        .map_err(federation_refused)?;
    announce_federation(state).await?;
    Ok(json(StatusCode::CREATED, &f))
}

/// Refreshes one partner, or all; a new version announces changed roots.
async fn refresh_federations(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::FederationTarget = json_body(req).await?;
    let tds = match r.trust_domain {
        Some(td) => vec![td],
        None => {
            let st = state.clone();
            blocking(move || Ok(st.store.federations()?))
                .await?
                .into_iter()
                .map(|f| f.trust_domain)
                .collect()
        }
    };
    let (mut out, mut changed) = (Vec::new(), false);
    let identity = state.client_identity();
    for td in tds {
        let (mut f, c) = crate::federation::refresh(state.store.clone(), &td)
            .await
            .map_err(federation_refused)?;
        changed |= c;
        if let Some(id) = &identity {
            changed |=
                crate::federation::refresh_imports(state.store.clone(), state.hub.clone(), &td, id)
                    .await
                    .map_err(federation_refused)?;
            let (st, key) = (state.clone(), td.clone());
            if let Some(rec) = blocking(move || Ok(st.store.federation(&key)?)).await? {
                f = crate::federation::describe(&rec);
            }
        }
        out.push(f);
    }
    if changed {
        announce_federation(state).await?;
    }
    Ok(json(StatusCode::OK, &out))
}

async fn remove_federation(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::FederationTarget = json_body(req).await?;
    let td = r.trust_domain.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "name the trust domain to remove",
        )
    })?;
    let st = state.clone();
    let key = td.clone();
    if !blocking(move || Ok(st.store.remove_federation(&key)?)).await? {
        return Err(federation_refused(crate::federation::Refusal::Unknown(td)));
    }
    announce_federation(state).await?;
    // Workflows that still name the partner's services stay applied (re-federating restores them), but
    // their cross-organisation steps are refused from now on: say which.
    let (st, key) = (state.clone(), td.clone());
    let naming: Vec<String> = blocking(move || Ok(st.store.workflows()?))
        .await?
        .into_iter()
        .filter(|w| {
            strait_policy::workflow::Workflow::from_yaml(&w.yaml)
                .and_then(|wf| wf.foreign_trust_domains())
                .is_ok_and(|tds| tds.contains(&key))
        })
        .map(|w| w.name)
        .collect();
    info!(trust_domain = %td, workflows_naming_it = ?naming, "federation removed");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "removed": td, "workflows_naming_it": naming }),
    ))
}

/// `strait federation export|unexport`: a withdrawn export reaches this mesh's proxies with the next
/// version (they stop admitting the partner's callers to it); a new one reaches the partner with its next
/// fetch of our exports.
async fn export_federation(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::FederationExport = json_body(req).await?;
    let st = state.clone();
    let (td, workload, remove) = (r.trust_domain.clone(), r.workload.clone(), r.remove);
    let f = blocking(move || {
        let own = st.trust_domain().clone();
        let (f, changed) =
            crate::federation::set_export(&st.store, &own, r).map_err(federation_refused)?;
        if changed {
            st.hub.changed(&st.store);
        }
        Ok(f)
    })
    .await?;
    info!(trust_domain = %td, %workload, withdrawn = remove, "federation export changed");
    Ok(json(StatusCode::OK, &f))
}

/// `strait federation egress on|off`: the next mesh version tells the proxies whether connections to
/// partners must leave through this organisation's gateways.
async fn egress_federation(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::FederationEgress = json_body(req).await?;
    let st = state.clone();
    let on = r.through_gateways;
    let gateways = blocking(move || {
        if st.store.set_egress_through_gateways(on)? {
            st.hub.changed(&st.store);
        }
        Ok(st
            .store
            .nodes()?
            .into_iter()
            .filter(|n| n.gateway_address.is_some())
            .count())
    })
    .await?;
    info!(through_gateways = on, gateways, "federation egress changed");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "through_gateways": on, "gateways": gateways }),
    ))
}

/// What this organisation exports to the calling partner: only to a federated partner's control plane
/// (its SVID verified against its roots in the TLS handshake), only its own exports.
async fn federation_exports(state: &Arc<State>, caller: &Caller) -> Reply {
    let Some(partner) = caller.partner.clone() else {
        warn!(remote = %caller.remote, "exports asked for without a partner's control plane certificate");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "exports are served to a federated partner's control plane only (its SVID as TLS client certificate)",
        ));
    };
    let (st, td) = (state.clone(), partner.clone());
    let list = blocking(move || {
        let own = st.trust_domain().clone();
        crate::federation::exports_for(&st.store, &st.hub, &own, &td).map_err(federation_refused)
    })
    .await?;
    debug!(remote = %caller.remote, %partner, workloads = list.workloads.len(), "exports served");
    Ok(json(StatusCode::OK, &list))
}

fn federation_refused(e: crate::federation::Refusal) -> ApiError {
    ApiError::new(e.status(), e.code(), e.to_string())
}

/// This trust domain's bundle and its `spiffe_sequence` (bumped whenever the bundle changes).
async fn local_bundle(state: &Arc<State>) -> Result<(Arc<TrustBundle>, u64), ApiError> {
    let bundle = state.authorities.bundle();
    let fingerprint = bundle.fingerprint();
    // Anyone may ask: the store is written only when the bundle changed since the last answer.
    let cached = state.bundle_sequence.lock().ok().and_then(|c| {
        c.as_ref()
            .filter(|(f, _)| *f == fingerprint)
            .map(|(_, n)| *n)
    });
    if let Some(sequence) = cached {
        return Ok((bundle, sequence));
    }
    let st = state.clone();
    let f = fingerprint.clone();
    let sequence = blocking(move || Ok(st.store.bundle_sequence(&f)?)).await?;
    if let Ok(mut c) = state.bundle_sequence.lock() {
        *c = Some((fingerprint, sequence));
    }
    Ok((bundle, sequence))
}

/// The bundle endpoint: the SPIFFE bundle (JWK set) of this trust domain.
async fn federation_bundle(state: &Arc<State>) -> Reply {
    let (bundle, sequence) = local_bundle(state).await?;
    Ok(json(
        StatusCode::OK,
        &bundle.to_spiffe_json(sequence, crate::federation::REFRESH_HINT_SECS),
    ))
}

async fn list_federations(state: &Arc<State>) -> Reply {
    let (bundle, sequence) = local_bundle(state).await?;
    let st = state.clone();
    let (partners, egress) = blocking(move || {
        Ok((
            st.store.federations()?,
            st.store.directory()?.egress_through_gateways,
        ))
    })
    .await?;
    Ok(json(
        StatusCode::OK,
        &api::FederationList {
            trust_domain: state.trust_domain().to_string(),
            sequence,
            fingerprint: bundle.fingerprint(),
            partners: partners.iter().map(crate::federation::describe).collect(),
            egress_through_gateways: egress,
        },
    ))
}

async fn ca_rotation(state: &Arc<State>, step: CaStep) -> Reply {
    let st = state.clone();
    let status = blocking(move || {
        let now = SystemTime::now();
        let refused = |e: RotationError| match e {
            RotationError::Refused(m) => {
                ApiError::new(StatusCode::CONFLICT, "rotation_refused", m)
            }
            RotationError::Other(e) => ApiError::internal(format!("{e:#}")),
        };
        let changed = match step {
            CaStep::Status => false,
            CaStep::Prepare(r) => {
                let validity = Duration::from_secs(r.validity_secs.unwrap_or(10 * 365 * 86400));
                st.authorities.prepare(validity, now).map_err(refused)?;
                info!("CA rotation: new root prepared; it is in the trust bundle and signs nothing yet");
                true
            }
            CaStep::Activate(r) => {
                let behind = ca_status(&st, &st.store.nodes()?).nodes_behind;
                if !behind.is_empty() && !r.force {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "rotation_refused",
                        format!(
                            "{} have not renewed since the new root was prepared, so may not trust it yet; wait (strait ca rotation status), or pass --force",
                            behind.join(", ")
                        ),
                    ));
                }
                st.authorities.activate(now).map_err(refused)?;
                st.serving_renew.notify_one();
                info!(forced = r.force && !behind.is_empty(), "CA rotation: the new root signs from now on; proxies re-issue their certificates");
                true
            }
            CaStep::Withdraw(r) => {
                st.authorities.withdraw(r.force, now).map_err(refused)?;
                // The serving chain no longer carries the path to the withdrawn root.
                st.serving_renew.notify_one();
                info!(forced = r.force, "CA rotation: the old root left the trust bundle");
                true
            }
        };
        if changed {
            announce_trust(&st);
        }
        Ok(ca_status(&st, &st.store.nodes()?))
    })
    .await?;
    Ok(json(StatusCode::OK, &status))
}

enum KeyStep {
    Status,
    Prepare,
    Activate { force: bool },
}

async fn key_rotation(state: &Arc<State>, step: KeyStep) -> Reply {
    let st = state.clone();
    let status = blocking(move || {
        let nodes: Vec<NodeName> = st.store.nodes()?.into_iter().map(|n| n.name).collect();
        match step {
            KeyStep::Status => Ok(st.hub.key_status(&nodes)),
            KeyStep::Prepare => st.hub.prepare_key_rotation(&st.store).map_err(|e| {
                ApiError::new(StatusCode::CONFLICT, "rotation_refused", format!("{e:#}"))
            }),
            KeyStep::Activate { force } => {
                st.hub
                    .activate_key_rotation(&st.store, force)
                    .map_err(|e| match e {
                        KeyError::Other(e) => ApiError::internal(format!("{e:#}")),
                        refused => ApiError::new(
                            StatusCode::CONFLICT,
                            "rotation_refused",
                            refused.to_string(),
                        ),
                    })
            }
        }
    })
    .await?;
    Ok(json(StatusCode::OK, &status))
}

async fn status(state: &Arc<State>) -> Reply {
    let st = state.clone();
    let status = blocking(move || {
        let seen = st.last_seen.lock().map(|m| m.clone()).unwrap_or_default();
        let records = st.store.nodes()?;
        let node_names: Vec<NodeName> = records.iter().map(|n| n.name.clone()).collect();
        let ca = ca_status(&st, &records);
        let nodes = records
            .into_iter()
            .map(|record| api::NodeStatus {
                last_seen_secs_ago: seen.get(&record.name).map(|t| t.elapsed().as_secs()),
                record,
            })
            .collect();
        Ok(api::Status {
            trust_domain: st.trust_domain().to_string(),
            revision: st.store.revision()?,
            ca_not_after: secs(st.authorities.active().not_after()),
            ca,
            nodes,
            // What the proxies are given: the store's workloads and, in Kubernetes mode, the pods.
            workloads: match st.hub.directory(&st.store).map_err(ApiError::internal)? {
                Some(d) => d.workloads,
                None => st.store.workloads()?,
            },
            workflows: st.store.workflows()?.iter().map(summary).collect(),
            distribution: st.hub.status(&node_names),
            federation: crate::federation::partner_status(&st.store)?,
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &status))
}

fn summary(w: &crate::store::WorkflowRecord) -> api::WorkflowSummary {
    api::WorkflowSummary {
        name: w.name.clone(),
        applied_at: w.applied_at,
        modules: w.modules.len(),
        yaml_bytes: w.yaml.len(),
    }
}

async fn list_workflows(state: &Arc<State>) -> Reply {
    let st = state.clone();
    let list = blocking(move || {
        Ok(st
            .store
            .workflows()?
            .iter()
            .map(summary)
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(json(StatusCode::OK, &list))
}

async fn show_workflow(state: &Arc<State>, name: &str) -> Reply {
    let (st, name) = (state.clone(), name.to_owned());
    let found = blocking(move || Ok(st.store.workflow(&name)?)).await?;
    match found {
        Some(w) => Ok(json(StatusCode::OK, &w)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no workflow of that name (see `strait workflow list`)",
        )),
    }
}

/// Stores a workflow after compiling the mesh policy with it; nothing changes when the check fails.
async fn apply_workflow(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::WorkflowApplyRequest = json_body(req).await?;
    let st = state.clone();
    let resp = blocking(move || {
        let existing = st.store.workflows()?;
        let mut rec = crate::store::WorkflowRecord {
            name: String::new(),
            yaml: r.yaml,
            modules: r.modules,
            applied_at: unix_now(),
        };
        let td = st.trust_domain().to_string();
        let federated: Vec<String> = st
            .store
            .federations()?
            .into_iter()
            .map(|f| f.trust_domain)
            .collect();
        rec.name =
            crate::workflows::check_candidate(&rec, &existing, &td, &federated).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_workflow", e.to_string())
            })?;
        let change = st.store.put_workflow(&rec)?;
        let version = match change {
            crate::store::Change::Unchanged => None,
            _ => st.hub.rebuild(&st.store).map_err(ApiError::internal)?,
        };
        info!(workflow = %rec.name, ?change, version = ?version, "workflow applied");
        Ok(api::WorkflowApplyResponse {
            name: rec.name,
            change,
            version,
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

async fn delete_workflow(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let r: api::WorkflowDeleteRequest = json_body(req).await?;
    let st = state.clone();
    let resp = blocking(move || {
        let deleted = st.store.delete_workflow(&r.name)?;
        let version = if deleted {
            st.hub.rebuild(&st.store).map_err(ApiError::internal)?
        } else {
            None
        };
        info!(workflow = %r.name, deleted, version = ?version, "workflow delete");
        Ok(api::WorkflowDeleteResponse { deleted, version })
    })
    .await?;
    Ok(json(StatusCode::OK, &resp))
}

/// The monitoring endpoint (plain HTTP, loopback by default, like istiod's 15014): `/metrics` and `/ready`.
pub async fn serve_monitoring(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(match req.uri().path() {
                        "/metrics" => {
                            let mut out = String::new();
                            state.hub.encode_metrics(&mut out);
                            let mut r = text(StatusCode::OK, out);
                            r.headers_mut().insert(
                                header::CONTENT_TYPE,
                                header::HeaderValue::from_static(
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                            );
                            r
                        }
                        "/ready" => text(StatusCode::OK, "ready\n"),
                        _ => text(StatusCode::NOT_FOUND, "try /metrics or /ready\n"),
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
