//! A small fake Kubernetes API server, so tests can drive a real Kubernetes client (the control plane)
//! over the real wire format: HTTPS with a bearer token, JSON lists, streaming watches, TokenReview and
//! ConfigMaps.
//!
//! It keeps only what a watch-based client needs: namespaces and pods (list, get, watch with label and
//! field selectors), one global resourceVersion counter bumped by every change (as etcd's revision is), a
//! history of changes so a watch from an older version replays what it missed, and compaction, after
//! which old versions answer 410 Expired. The test changes the state directly (`put_pod`, `compact`, ...)
//! and every change reaches the open watches at once.
//!
//! The server runs on its own thread with its own tokio runtime. `KubeApi::start` enters a network
//! namespace on that thread before binding, so a process in that namespace reaches it at
//! `https://127.0.0.1:<port>` (a socket stays in the namespace it was created in).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, TcpListener as StdTcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

/// The audience a TokenReview checks when it names none: the API server's own (its default
/// `--api-audiences`), so a client that forgets to ask for its audience fails here as it would for real.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Timestamps are not modelled; objects that need one (deletionTimestamp) get this fixed, valid RFC 3339 time.
const FIXED_TIME: &str = "2024-01-01T00:00:00Z";

/// A pod as the test describes it; turned into the API server's JSON by `pod_json`.
#[derive(Clone, Debug)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// "Running", "Pending", "Succeeded", ...
    pub phase: String,
    pub host_network: bool,
    pub labels: Vec<(String, String)>,
    /// ownerReferences: (kind, name), e.g. ("DaemonSet", "strait-proxy").
    pub owners: Vec<(String, String)>,
    /// Sets metadata.deletionTimestamp (the pod is terminating).
    pub deleting: bool,
    /// spec.containers as given (ports, probes); one bare container when `None`.
    pub containers: Option<Value>,
}

impl FakePod {
    /// A running pod with a fresh uid, no labels and no owners.
    pub fn running(ns: &str, name: &str, node: &str, sa: &str, ips: &[&str]) -> Self {
        Self {
            namespace: ns.to_string(),
            name: name.to_string(),
            uid: new_uid(),
            node: node.to_string(),
            service_account: sa.to_string(),
            ips: ips
                .iter()
                .map(|ip| {
                    ip.parse()
                        .unwrap_or_else(|e| panic!("bad pod IP {ip}: {e}"))
                })
                .collect(),
            phase: "Running".to_string(),
            host_network: false,
            labels: Vec::new(),
            owners: Vec::new(),
            deleting: false,
            containers: None,
        }
    }
}

/// What a TokenReview says about a registered token.
#[derive(Clone, Debug)]
pub struct FakeReview {
    /// e.g. "system:serviceaccount:strait-system:strait-proxy"
    pub username: String,
    /// The audiences the token was issued for, e.g. ["strait"].
    pub audiences: Vec<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
}

/// A handle on a running fake API server; clones share it, and dropping the last one stops it.
#[derive(Clone)]
pub struct KubeApi {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<Mutex<State>>,
    port: u16,
    dir: PathBuf,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Ending the watches first lets clients see a clean end of stream rather than a reset.
        lock(&self.state).watches.clear();
        if let Some(stop) = take(&self.stop) {
            let _ = stop.send(());
        }
        if let Some(thread) = take(&self.thread) {
            let _ = thread.join();
        }
    }
}

fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
    m.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Locks the state even after a panic elsewhere: a failed assertion must not turn into a cascade of
/// poisoned-mutex panics in the server thread.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl KubeApi {
    /// Starts the server on 127.0.0.1:`port` inside the network namespace /run/netns/`netns` (needs root),
    /// writing `ca.crt` and `token` into `dir`.
    pub fn start(netns: &str, port: u16, dir: &Path) -> KubeApi {
        Self::spawn(Some(Path::new("/run/netns").join(netns)), port, dir)
    }

    /// Starts the server on a free port of 127.0.0.1 in the test's own network namespace.
    pub fn start_local(dir: &Path) -> KubeApi {
        Self::spawn(None, 0, dir)
    }

    fn spawn(netns: Option<PathBuf>, port: u16, dir: &Path) -> KubeApi {
        std::fs::create_dir_all(dir).expect("create the fake API server's directory");
        let (tls, token) = write_credentials(dir);
        let state = Arc::new(Mutex::new(State::new(token)));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || {
                // Everything below runs on this one thread, so entering the namespace here puts the
                // listening socket (and every connection accepted from it) in that namespace.
                let listener = match bind(netns.as_deref(), port) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let port = listener.local_addr().expect("local address").port();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the fake API server");
                let _ = ready_tx.send(Ok(port));
                rt.block_on(serve(listener, tls, shared, stop_rx));
                // Dropping the runtime here cancels every connection task, ending open streams.
            })
            .expect("spawn the fake API server thread");
        let port = match ready_rx.recv() {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => panic!("fake API server: {e}"),
            Err(_) => panic!("fake API server thread died before listening"),
        };
        KubeApi {
            inner: Arc::new(Inner {
                state,
                port,
                dir: dir.to_owned(),
                stop: Mutex::new(Some(stop_tx)),
                thread: Mutex::new(Some(thread)),
            }),
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.inner.port)
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The PEM CA certificate that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.inner.dir.join("ca.crt")
    }

    /// The file holding the bearer token every request must carry.
    pub fn token_file(&self) -> PathBuf {
        self.inner.dir.join("token")
    }

    /// The bearer token itself (the content of `token_file`).
    pub fn token(&self) -> String {
        self.state().token.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Creates a namespace or replaces its labels (a MODIFIED event when it existed).
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut s = self.state();
        let key = (String::new(), name.to_string());
        let uid = s
            .namespaces
            .get(&key)
            .and_then(|ns| ns["metadata"]["uid"].as_str().map(String::from))
            .unwrap_or_else(new_uid);
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.change(
            Resource::Namespaces,
            key,
            Some(namespace_json(name, &uid, &labels)),
        );
    }

    pub fn delete_namespace(&self, name: &str) {
        self.state().change(
            Resource::Namespaces,
            (String::new(), name.to_string()),
            None,
        );
    }

    /// Creates or replaces (by namespace/name) a pod.
    pub fn put_pod(&self, pod: FakePod) {
        let key = (pod.namespace.clone(), pod.name.clone());
        self.state()
            .change(Resource::Pods, key, Some(pod_json(&pod)));
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.state().change(
            Resource::Pods,
            (namespace.to_string(), name.to_string()),
            None,
        );
    }

    /// Simulates etcd compaction: every resourceVersion handed out so far becomes too old. Open watches get
    /// one ERROR event (Status 410 Expired) and end; a later watch from an old version gets the same.
    ///
    /// The counter moves on by one, so a list made afterwards returns a version that can be watched from
    /// (otherwise nothing changed since, the relist would return the same expired version and a correct
    /// client would loop on 410).
    pub fn compact(&self) {
        let mut s = self.state();
        s.rv += 1;
        s.compacted = s.rv;
        s.history.clear();
        let error = line(&expired_event(
            "The resourceVersion for the provided watch is too old.".to_string(),
        ));
        for w in s.watches.drain(..) {
            let _ = w.tx.send(error.clone());
        }
    }

    /// Sends a BOOKMARK carrying the current resourceVersion on every open watch that allowed bookmarks.
    pub fn bookmark(&self) {
        let mut s = self.state();
        let rv = s.rv.to_string();
        s.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let event = json!({
                "type": "BOOKMARK",
                "object": {
                    "kind": w.resource.kind(),
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": rv},
                },
            });
            w.tx.send(line(&event)).is_ok()
        });
    }

    /// Ends every open watch stream cleanly, as an API server does when a watch times out.
    pub fn close_watches(&self) {
        self.state().watches.clear();
    }

    /// Registers a token that TokenReview will recognise.
    /// A ReplicaSet controlled by `owner` (kind, name), e.g. ("Deployment", "strait-gateway").
    pub fn put_replicaset(&self, namespace: &str, name: &str, owner: Option<(&str, &str)>) {
        let owners: Vec<Value> = owner
            .into_iter()
            .map(|(kind, n)| json!({"apiVersion": "apps/v1", "kind": kind, "name": n, "uid": new_uid(), "controller": true}))
            .collect();
        let rs = json!({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": namespace, "uid": new_uid(), "ownerReferences": owners},
        });
        self.state()
            .replicasets
            .insert((namespace.to_string(), name.to_string()), rs);
    }

    pub fn add_token(&self, token: &str, review: FakeReview) {
        self.state()
            .tokens
            .insert(token.to_string(), (review, new_uid()));
    }

    /// A ConfigMap's `data`, if it exists.
    pub fn configmap(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let s = self.state();
        let cm = s
            .configmaps
            .get(&(namespace.to_string(), name.to_string()))?;
        let data = cm["data"].as_object().cloned().unwrap_or_default();
        Some(
            data.into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                .collect(),
        )
    }

    /// How many authenticated requests of a kind were served, whatever their outcome (a 400 or 409 counts;
    /// a 401, an unknown path or a method the path does not allow does not): ("list", "pods"),
    /// ("watch", "namespaces"), ("get", "pods"), ("get", "namespaces"), ("tokenreview", ""),
    /// ("get" | "create" | "update", "configmaps").
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.state()
            .counts
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// The resourceVersion each watch of `resource` ("pods", "namespaces") asked for, in order ("" when
    /// it named none).
    pub fn watch_versions(&self, resource: &str) -> Vec<String> {
        self.state()
            .watch_versions
            .get(resource)
            .cloned()
            .unwrap_or_default()
    }

    /// The current resourceVersion (the last one handed out).
    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }
}

// ---------------------------------------------------------------------------------------------------
// Setup: credentials, TLS and the listening socket.

/// Writes `ca.crt` and `token` into `dir`; returns the TLS acceptor for the server and the token.
fn write_credentials(dir: &Path) -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "fake-kubernetes-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("self-signed CA");
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .expect("server params");
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .expect("server certificate");

    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write ca.crt");
    // Like a projected service-account token: no trailing newline, readable by its owner only.
    let token = random_token();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("token"))
            .expect("create token file");
        f.write_all(token.as_bytes()).expect("write token");
    }

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![server_cert.der().clone()];
    // ALL_VERSIONS is TLS 1.2 and 1.3 when rustls is built with its `tls12` feature, else TLS 1.3 only.
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(rustls::ALL_VERSIONS)
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server certificate and key");
    // Real API servers also speak h2; http/1.1 is all the clients need and keeps the server simple.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), token)
}

/// Enters the network namespace at `netns` (for this thread only) and binds 127.0.0.1:`port` there.
fn bind(netns: Option<&Path>, port: u16) -> Result<StdTcpListener, String> {
    if let Some(path) = netns {
        let f = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        // SAFETY: setns on a namespace file descriptor we hold open; it only affects this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    let listener = StdTcpListener::bind(("127.0.0.1", port))
        .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    Ok(listener)
}

async fn serve(
    listener: StdTcpListener,
    tls: tokio_rustls::TlsAcceptor,
    state: Arc<Mutex<State>>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    // Tells the connections to finish: a graceful shutdown ends each response properly (the watch
    // streams, whose senders are already gone, with their last chunk) instead of resetting it.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let tcp = tokio::select! {
            // Either a stop message or the sender being dropped ends the server.
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        while connections.try_join_next().is_some() {}
        let tls = tls.clone();
        let state = state.clone();
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = closing_tx.send(true);
    // Bounded, in case a client never reads its response; the runtime's drop cancels what is left.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

// ---------------------------------------------------------------------------------------------------
// The state.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Namespaces,
    Pods,
}

impl Resource {
    fn plural(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One change of a watched object, kept so that a watch from an older version can replay it.
struct Change {
    rv: u64,
    resource: Resource,
    kind: ChangeKind,
    /// The new state (for a deletion: the last state, with the deletion's resourceVersion).
    object: Value,
    /// The state before a modification, to tell watchers whose selector it stops or starts matching.
    previous: Option<Value>,
}

/// An open watch stream: events are written as JSON lines into `tx`, which feeds the response body.
struct Watch {
    id: u64,
    resource: Resource,
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    /// Sends the change if this watch sees it; false when the client has gone away.
    fn deliver(&self, change: &Change) -> bool {
        match event_for(&self.selector, change) {
            Some(event) => self.tx.send(line(&event)).is_ok(),
            None => !self.tx.is_closed(),
        }
    }
}

struct State {
    token: String,
    /// The last resourceVersion handed out; every change takes the next one, whatever the resource.
    rv: u64,
    /// Watches from a version below this get 410 Expired.
    compacted: u64,
    /// Keyed by ("", name).
    namespaces: BTreeMap<(String, String), Value>,
    /// Keyed by (namespace, name).
    pods: BTreeMap<(String, String), Value>,
    configmaps: BTreeMap<(String, String), Value>,
    /// Read with get only (a gateway pod's owner); keyed by (namespace, name).
    replicasets: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    next_watch: u64,
    /// token -> (review, the user's uid)
    tokens: HashMap<String, (FakeReview, String)>,
    counts: HashMap<(String, String), usize>,
    watch_versions: HashMap<String, Vec<String>>,
    /// Paged lists in progress: continue token → (the snapshot's resourceVersion, the items still to send).
    /// Like etcd, every page of one list comes from the same snapshot.
    pages: HashMap<String, (u64, Vec<Value>)>,
}

/// How a watch request starts.
enum WatchStart {
    /// Streams events from this channel until the watch is closed.
    Stream(mpsc::UnboundedReceiver<Bytes>, u64),
    /// The requested version was compacted away: this single ERROR line, then the end.
    Expired(Bytes),
}

impl State {
    fn new(token: String) -> Self {
        Self {
            token,
            // Real clusters never hand out 0, which means "any version" in requests.
            rv: 1,
            compacted: 0,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            configmaps: BTreeMap::new(),
            replicasets: BTreeMap::new(),
            history: Vec::new(),
            watches: Vec::new(),
            next_watch: 0,
            tokens: HashMap::new(),
            counts: HashMap::new(),
            watch_versions: HashMap::new(),
            pages: HashMap::new(),
        }
    }

    fn count(&mut self, verb: &str, resource: &str) {
        *self
            .counts
            .entry((verb.to_string(), resource.to_string()))
            .or_default() += 1;
    }

    fn objects(&self, resource: Resource) -> &BTreeMap<(String, String), Value> {
        match resource {
            Resource::Namespaces => &self.namespaces,
            Resource::Pods => &self.pods,
        }
    }

    fn objects_mut(&mut self, resource: Resource) -> &mut BTreeMap<(String, String), Value> {
        match resource {
            Resource::Namespaces => &mut self.namespaces,
            Resource::Pods => &mut self.pods,
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Stores (`Some`) or deletes (`None`) an object under a new resourceVersion, records the change
    /// and delivers it to the open watches. Deleting a missing object changes nothing.
    fn change(&mut self, resource: Resource, key: (String, String), new: Option<Value>) {
        if new.is_none() && !self.objects(resource).contains_key(&key) {
            return;
        }
        let rv = self.next_rv();
        let (kind, object, previous) = match new {
            Some(mut object) => {
                set_rv(&mut object, rv);
                let previous = self.objects_mut(resource).insert(key, object.clone());
                let kind = if previous.is_some() {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Added
                };
                (kind, object, previous)
            }
            None => {
                let Some(mut last) = self.objects_mut(resource).remove(&key) else {
                    return;
                };
                set_rv(&mut last, rv);
                (ChangeKind::Deleted, last, None)
            }
        };
        let change = Change {
            rv,
            resource,
            kind,
            object,
            previous,
        };
        // Watches whose client went away are dropped here.
        self.watches
            .retain(|w| w.resource != resource || w.deliver(&change));
        self.history.push(change);
    }

    /// A list, whole or (with `limit`) one page of it. `continue` resumes a paged list from its snapshot;
    /// once the snapshot's version is compacted away the token answers 410 Expired, as a real API server
    /// does, and the client must list from the start.
    fn list(
        &mut self,
        resource: Resource,
        selector: &Selector,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> Result<Value, Box<Response<Body>>> {
        let (rv, mut items) = match cont {
            Some(token) => match self.pages.remove(token) {
                Some((rv, _)) if rv < self.compacted => {
                    return Err(Box::new(error(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                        None,
                    )))
                }
                Some(page) => page,
                None => return Err(Box::new(bad_request("invalid continue token"))),
            },
            None => (
                self.rv,
                self.objects(resource)
                    .values()
                    .filter(|o| selector.matches(o))
                    .cloned()
                    .collect(),
            ),
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if let Some(limit) = limit.filter(|l| *l > 0 && *l < items.len()) {
            let rest = items.split_off(limit);
            let token = format!("c{}", random_token());
            metadata["continue"] = json!(token);
            metadata["remainingItemCount"] = json!(rest.len());
            self.pages.insert(token, (rv, rest));
        }
        Ok(json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": "v1",
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Opens a watch from resourceVersion `from`: "" or "0" starts with an ADDED event for every current
    /// object; a version still in the history replays the changes after it; an older one is Expired.
    /// Everything happens under the state lock, so no change can fall between the replay and the live
    /// stream.
    fn start_watch(
        &mut self,
        resource: Resource,
        selector: Selector,
        from: &str,
        bookmarks: bool,
    ) -> Result<WatchStart, String> {
        self.watch_versions
            .entry(resource.plural().to_string())
            .or_default()
            .push(from.to_string());
        let (tx, rx) = mpsc::unbounded_channel();
        if from.is_empty() || from == "0" {
            for object in self.objects(resource).values() {
                if selector.matches(object) {
                    let _ = tx.send(line(&json!({"type": "ADDED", "object": object})));
                }
            }
        } else {
            let version: u64 = from
                .parse()
                .map_err(|_| format!("invalid resourceVersion {from:?}"))?;
            if version < self.compacted {
                return Ok(WatchStart::Expired(line(&expired_event(format!(
                    "too old resource version: {version} ({})",
                    self.compacted
                )))));
            }
            for change in &self.history {
                if change.resource == resource && change.rv > version {
                    if let Some(event) = event_for(&selector, change) {
                        let _ = tx.send(line(&event));
                    }
                }
            }
        }
        self.next_watch += 1;
        let id = self.next_watch;
        self.watches.push(Watch {
            id,
            resource,
            selector,
            bookmarks,
            tx,
        });
        Ok(WatchStart::Stream(rx, id))
    }
}

/// The event a watcher with `selector` gets for a change, if any. An object that starts or stops matching
/// the selector is ADDED or DELETED for that watcher, as the API server's watch cache does.
fn event_for(selector: &Selector, change: &Change) -> Option<Value> {
    let matches_now = selector.matches(&change.object);
    let (kind, object) = match change.kind {
        ChangeKind::Added | ChangeKind::Deleted => {
            if !matches_now {
                return None;
            }
            (change.kind, change.object.clone())
        }
        ChangeKind::Modified => {
            let previous = change.previous.as_ref().filter(|p| selector.matches(p));
            match (previous, matches_now) {
                (Some(_), true) => (ChangeKind::Modified, change.object.clone()),
                (None, true) => (ChangeKind::Added, change.object.clone()),
                // The real server sends the previous content with the change's resourceVersion.
                (Some(previous), false) => {
                    let mut last = previous.clone();
                    set_rv(&mut last, change.rv);
                    (ChangeKind::Deleted, last)
                }
                (None, false) => return None,
            }
        }
    };
    Some(json!({"type": kind.as_str(), "object": object}))
}

fn expired_event(message: String) -> Value {
    json!({"type": "ERROR", "object": status_json(410, "Expired", &message, None)})
}

/// One watch event on the wire: a JSON object and a newline.
fn line(event: &Value) -> Bytes {
    Bytes::from(format!("{event}\n"))
}

fn set_rv(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

// ---------------------------------------------------------------------------------------------------
// Objects.

fn labels_json(labels: &[(String, String)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn namespace_json(name: &str, uid: &str, labels: &[(String, String)]) -> Value {
    let mut labels = labels_json(labels);
    // Every real namespace carries this label (Kubernetes 1.21+), so selectors on it work as in a cluster.
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": uid, "labels": labels},
        "spec": {},
        "status": {"phase": "Active"},
    })
}

fn pod_json(pod: &FakePod) -> Value {
    let mut metadata = json!({
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": pod.uid,
        "labels": labels_json(&pod.labels),
    });
    if !pod.owners.is_empty() {
        metadata["ownerReferences"] = pod
            .owners
            .iter()
            .map(|(kind, name)| {
                json!({
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": name,
                    "uid": format!("owner-{kind}-{name}").to_lowercase(),
                    "controller": true,
                    "blockOwnerDeletion": true,
                })
            })
            .collect();
    }
    if pod.deleting {
        metadata["deletionTimestamp"] = json!(FIXED_TIME);
        metadata["deletionGracePeriodSeconds"] = json!(30);
    }
    let mut status = json!({"phase": pod.phase});
    if let Some(first) = pod.ips.first() {
        status["podIP"] = json!(first.to_string());
        status["podIPs"] = pod
            .ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
    }
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": metadata,
        "spec": {
            "nodeName": pod.node,
            "serviceAccountName": pod.service_account,
            "hostNetwork": pod.host_network,
            "containers": pod
                .containers
                .clone()
                .unwrap_or_else(|| json!([{"name": "app", "image": "x"}])),
        },
        "status": status,
    })
}

fn status_json(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

// ---------------------------------------------------------------------------------------------------
// Selectors.

#[derive(Clone, Debug)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug)]
struct FieldRequirement {
    path: &'static [&'static str],
    value: String,
    equal: bool,
}

/// Which objects a list or watch returns: an optional namespace (from the URL) and the selectors.
#[derive(Clone, Debug, Default)]
struct Selector {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Selector {
    /// Parses `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated) and `fieldSelector`
    /// (`=`, `==` or `!=` on the few fields below). Anything else is a 400, so a test using an
    /// unsupported form fails loudly instead of silently matching the wrong objects.
    fn parse(
        resource: Resource,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
    ) -> Result<Selector, String> {
        let mut selector = Selector {
            namespace: namespace.map(String::from),
            ..Default::default()
        };
        for term in terms(query.get("labelSelector")) {
            let requirement = if let Some((k, v)) = term.split_once("!=") {
                LabelRequirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelRequirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelRequirement::NotExists(k.trim().into())
            } else if term.contains([' ', '(', ')']) {
                return Err(format!("unsupported label selector {term:?}"));
            } else {
                LabelRequirement::Exists(term.into())
            };
            selector.labels.push(requirement);
        }
        for term in terms(query.get("fieldSelector")) {
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector {term:?}"));
            };
            let path: &'static [&'static str] = match (resource, field.trim()) {
                (_, "metadata.name") => &["metadata", "name"],
                (Resource::Pods, "metadata.namespace") => &["metadata", "namespace"],
                (Resource::Pods, "spec.nodeName") => &["spec", "nodeName"],
                (Resource::Pods, "status.phase") => &["status", "phase"],
                (_, other) => {
                    return Err(format!(
                        "field label not supported: {other} (for {})",
                        resource.plural()
                    ))
                }
            };
            selector.fields.push(FieldRequirement {
                path,
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        if let Some(ns) = &self.namespace {
            if metadata["namespace"].as_str() != Some(ns.as_str()) {
                return false;
            }
        }
        let label = |k: &str| metadata["labels"].get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|f| {
            // A missing field compares as "", as in the real server.
            let actual = f
                .path
                .iter()
                .fold(object, |v, key| &v[*key])
                .as_str()
                .unwrap_or("");
            (actual == f.value) == f.equal
        });
        labels_ok && fields_ok
    }
}

fn terms(selector: Option<&String>) -> impl Iterator<Item = &str> {
    selector
        .map(|s| s.as_str())
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

// ---------------------------------------------------------------------------------------------------
// HTTP.

type Body = BoxBody<Bytes, Infallible>;

/// A response body fed by a channel: the watch stream. It ends when every sender is dropped (the watch
/// was closed, timed out or compacted, or the server stopped).
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn respond(status: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    respond(status, Full::new(Bytes::from(value.to_string())).boxed())
}

fn error(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &status_json(code, reason, message, details))
}

fn bad_request(message: &str) -> Response<Body> {
    error(400, "BadRequest", message, None)
}

fn not_found(resource: &str, name: &str) -> Response<Body> {
    error(
        404,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
        Some(json!({"name": name, "kind": resource})),
    )
}

/// The routes this server knows, from the URL path alone.
enum Route<'a> {
    /// A list or watch, cluster-wide or in one namespace.
    Collection(Resource, Option<&'a str>),
    Namespace(&'a str),
    Pod(&'a str, &'a str),
    ConfigMaps(&'a str),
    ConfigMap(&'a str, &'a str),
    ReplicaSet(&'a str, &'a str),
    TokenReviews,
}

fn route(path: &str) -> Option<Route<'_>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        ["api", "v1", "namespaces"] => Route::Collection(Resource::Namespaces, None),
        ["api", "v1", "pods"] => Route::Collection(Resource::Pods, None),
        ["api", "v1", "namespaces", ns] => Route::Namespace(ns),
        ["api", "v1", "namespaces", ns, "pods"] => Route::Collection(Resource::Pods, Some(ns)),
        ["api", "v1", "namespaces", ns, "pods", name] => Route::Pod(ns, name),
        ["api", "v1", "namespaces", ns, "configmaps"] => Route::ConfigMaps(ns),
        ["api", "v1", "namespaces", ns, "configmaps", name] => Route::ConfigMap(ns, name),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Route::TokenReviews,
        ["apis", "apps", "v1", "namespaces", ns, "replicasets", name] => {
            Route::ReplicaSet(ns, name)
        }
        _ => return None,
    })
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let authorized = {
        let s = lock(state);
        req.headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.trim() == s.token)
    };
    if !authorized {
        return error(401, "Unauthorized", "Unauthorized", None);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = match parse_query(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return bad_request(&e),
    };
    let Some(route) = route(&path) else {
        return error(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    };
    let Some((verb, resource)) = verb(&route, &method, &query) else {
        return error(
            405,
            "MethodNotAllowed",
            &format!("the server does not allow this method on the requested resource: {method}"),
            None,
        );
    };
    // Counted before the request is looked at further, so a request that fails (400, 404, 409) counts too.
    lock(state).count(verb, resource);
    match (route, method) {
        (Route::Collection(resource, ns), Method::GET) => {
            list_or_watch(state, resource, ns, &query)
        }
        (Route::Namespace(name), Method::GET) => get_object(state, Resource::Namespaces, "", name),
        (Route::Pod(ns, name), Method::GET) => get_object(state, Resource::Pods, ns, name),
        (Route::ConfigMap(ns, name), Method::GET) => get_configmap(state, ns, name),
        (Route::ReplicaSet(ns, name), Method::GET) => {
            let s = lock(state);
            match s.replicasets.get(&(ns.to_string(), name.to_string())) {
                Some(rs) => json_response(StatusCode::OK, rs),
                None => not_found("replicasets", name),
            }
        }
        (Route::ConfigMaps(ns), Method::POST) => match read_json(req).await {
            Ok(body) => create_configmap(state, ns, body),
            Err(response) => response,
        },
        (Route::ConfigMap(ns, name), Method::PUT) => match read_json(req).await {
            Ok(body) => update_configmap(state, ns, name, body),
            Err(response) => response,
        },
        (Route::TokenReviews, Method::POST) => match read_json(req).await {
            Ok(body) => token_review(state, body),
            Err(response) => response,
        },
        // `verb` let only the combinations above through.
        _ => error(405, "MethodNotAllowed", "method not allowed", None),
    }
}

/// What `count` records a request as, or None when the route does not allow the method.
fn verb(
    route: &Route<'_>,
    method: &Method,
    query: &HashMap<String, String>,
) -> Option<(&'static str, &'static str)> {
    Some(match (route, method) {
        (Route::Collection(r, _), &Method::GET) if flag(query, "watch") => ("watch", r.plural()),
        (Route::Collection(r, _), &Method::GET) => ("list", r.plural()),
        (Route::Namespace(_), &Method::GET) => ("get", "namespaces"),
        (Route::Pod(..), &Method::GET) => ("get", "pods"),
        (Route::ConfigMap(..), &Method::GET) => ("get", "configmaps"),
        (Route::ReplicaSet(..), &Method::GET) => ("get", "replicasets"),
        (Route::ConfigMaps(_), &Method::POST) => ("create", "configmaps"),
        (Route::ConfigMap(..), &Method::PUT) => ("update", "configmaps"),
        (Route::TokenReviews, &Method::POST) => ("tokenreview", ""),
        _ => return None,
    })
}

/// Reads a request body as a JSON object; anything else is a 400.
async fn read_json(req: Request<Incoming>) -> Result<Map<String, Value>, Response<Body>> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| bad_request(&format!("reading the body: {e}")))?
        .to_bytes();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(bad_request("the body is not a JSON object")),
        Err(e) => Err(bad_request(&format!("invalid JSON body: {e}"))),
    }
}

/// Splits a query string into decoded key/value pairs (the last of a repeated key wins).
fn parse_query(query: &str) -> Result<HashMap<String, String>, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
                // Two ASCII hex digits always parse.
                let text = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                out.push(u8::from_str_radix(text, 16).map_err(|e| e.to_string())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("query is not UTF-8: {s:?}"))
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    matches!(query.get(name).map(String::as_str), Some("true" | "1"))
}

fn list_or_watch(
    state: &Arc<Mutex<State>>,
    resource: Resource,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let selector = match Selector::parse(resource, namespace, query) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    if !flag(query, "watch") {
        // resourceVersion is ignored: a list is always of now (or of its first page's snapshot).
        let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
            None => None,
            Some(Ok(l)) => Some(l),
            Some(Err(_)) => return bad_request("invalid limit"),
        };
        let cont = query
            .get("continue")
            .map(String::as_str)
            .filter(|c| !c.is_empty());
        return match lock(state).list(resource, &selector, limit, cont) {
            Ok(list) => json_response(StatusCode::OK, &list),
            Err(resp) => *resp,
        };
    }
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None | Some(Ok(0)) => None,
        Some(Ok(t)) => Some(Duration::from_secs(t)),
        Some(Err(_)) => return bad_request("invalid timeoutSeconds"),
    };
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    let started = lock(state).start_watch(
        resource,
        selector,
        &from,
        flag(query, "allowWatchBookmarks"),
    );
    match started {
        Err(e) => bad_request(&e),
        // A real API server answers an expired watch with 200 and the error as the only event.
        Ok(WatchStart::Expired(event)) => respond(StatusCode::OK, Full::new(event).boxed()),
        Ok(WatchStart::Stream(rx, id)) => {
            if let Some(timeout) = timeout {
                let state = state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    lock(&state).watches.retain(|w| w.id != id);
                });
            }
            respond(StatusCode::OK, ChannelBody(rx).boxed())
        }
    }
}

fn get_object(
    state: &Arc<Mutex<State>>,
    resource: Resource,
    namespace: &str,
    name: &str,
) -> Response<Body> {
    let s = lock(state);
    match s
        .objects(resource)
        .get(&(namespace.to_string(), name.to_string()))
    {
        Some(object) => json_response(StatusCode::OK, object),
        None => not_found(resource.plural(), name),
    }
}

fn get_configmap(state: &Arc<Mutex<State>>, namespace: &str, name: &str) -> Response<Body> {
    let s = lock(state);
    match s.configmaps.get(&(namespace.to_string(), name.to_string())) {
        Some(cm) => json_response(StatusCode::OK, cm),
        None => not_found("configmaps", name),
    }
}

/// The stored form of a ConfigMap from a request body: name, namespace, labels, annotations and data
/// (which must map strings to strings).
fn configmap_json(
    namespace: &str,
    name: &str,
    uid: &str,
    body: &Map<String, Value>,
) -> Result<Value, String> {
    let data = match body.get("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(data)) if data.values().all(Value::is_string) => data.clone(),
        Some(_) => return Err("ConfigMap data must map strings to strings".into()),
    };
    let mut metadata = json!({"name": name, "namespace": namespace, "uid": uid});
    for key in ["labels", "annotations"] {
        if let Some(v @ Value::Object(_)) = body.get("metadata").and_then(|m| m.get(key)) {
            metadata[key] = v.clone();
        }
    }
    Ok(json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": metadata, "data": data}))
}

fn body_name(body: &Map<String, Value>) -> Option<&str> {
    body.get("metadata")?
        .get("name")?
        .as_str()
        .filter(|n| !n.is_empty())
}

fn create_configmap(
    state: &Arc<Mutex<State>>,
    namespace: &str,
    body: Map<String, Value>,
) -> Response<Body> {
    let mut s = lock(state);
    let Some(name) = body_name(&body) else {
        return error(
            422,
            "Invalid",
            "ConfigMap \"\" is invalid: metadata.name: Required value: name or generateName is required",
            None,
        );
    };
    let key = (namespace.to_string(), name.to_string());
    if s.configmaps.contains_key(&key) {
        return error(
            409,
            "AlreadyExists",
            &format!("configmaps \"{name}\" already exists"),
            Some(json!({"name": name, "kind": "configmaps"})),
        );
    }
    let mut cm = match configmap_json(namespace, name, &new_uid(), &body) {
        Ok(cm) => cm,
        Err(e) => return bad_request(&e),
    };
    let rv = s.next_rv();
    set_rv(&mut cm, rv);
    s.configmaps.insert(key, cm.clone());
    json_response(StatusCode::CREATED, &cm)
}

fn update_configmap(
    state: &Arc<Mutex<State>>,
    namespace: &str,
    name: &str,
    body: Map<String, Value>,
) -> Response<Body> {
    let mut s = lock(state);
    if body_name(&body) != Some(name) {
        return bad_request(&format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            body_name(&body).unwrap_or("")
        ));
    }
    let key = (namespace.to_string(), name.to_string());
    let Some(stored) = s.configmaps.get(&key) else {
        return not_found("configmaps", name);
    };
    // Optimistic concurrency: an update naming a resourceVersion must name the current one.
    let asked = body
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !asked.is_empty() && Some(asked) != stored["metadata"]["resourceVersion"].as_str() {
        return error(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again"
            ),
            Some(json!({"name": name, "kind": "configmaps"})),
        );
    }
    let uid = stored["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let mut cm = match configmap_json(namespace, name, &uid, &body) {
        Ok(cm) => cm,
        Err(e) => return bad_request(&e),
    };
    let rv = s.next_rv();
    set_rv(&mut cm, rv);
    s.configmaps.insert(key, cm.clone());
    json_response(StatusCode::OK, &cm)
}

/// Answers a TokenReview: the request echoed with a `status`. An unknown token or one not issued for
/// every requested audience is `authenticated: false` (still 201, as in a real cluster).
fn token_review(state: &Arc<Mutex<State>>, mut review: Map<String, Value>) -> Response<Body> {
    let s = lock(state);
    let spec = review.get("spec");
    let Some(token) = spec
        .and_then(|sp| sp.get("token"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return bad_request("token is required for TokenReview");
    };
    let mut requested = Vec::new();
    match spec.and_then(|sp| sp.get("audiences")) {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for a in list {
                match a.as_str() {
                    Some(a) => requested.push(a.to_string()),
                    None => return bad_request("spec.audiences must be strings"),
                }
            }
        }
        Some(_) => return bad_request("spec.audiences must be a list"),
    }
    if requested.is_empty() {
        requested.push(API_SERVER_AUDIENCE.to_string());
    }
    let status = match s.tokens.get(token) {
        None => json!({"authenticated": false, "error": "[invalid bearer token, unknown]"}),
        Some((r, _)) if !requested.iter().all(|a| r.audiences.contains(a)) => json!({
            "authenticated": false,
            "error": format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}, unknown]",
                r.audiences, requested
            ),
        }),
        Some((r, uid)) => {
            let mut groups = Vec::new();
            if let Some(ns) = r
                .username
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                .map(|(ns, _)| ns)
            {
                groups.push("system:serviceaccounts".to_string());
                groups.push(format!("system:serviceaccounts:{ns}"));
            }
            groups.push("system:authenticated".to_string());
            let mut extra = Map::new();
            for (key, value) in [
                ("authentication.kubernetes.io/pod-name", &r.pod_name),
                ("authentication.kubernetes.io/pod-uid", &r.pod_uid),
                ("authentication.kubernetes.io/node-name", &r.node_name),
            ] {
                if let Some(v) = value {
                    extra.insert(key.to_string(), json!([v]));
                }
            }
            json!({
                "authenticated": true,
                "user": {"username": r.username, "uid": uid, "groups": groups, "extra": extra},
                "audiences": requested,
            })
        }
    };
    review.insert("kind".into(), json!("TokenReview"));
    review.insert("apiVersion".into(), json!("authentication.k8s.io/v1"));
    review
        .entry("metadata")
        .or_insert_with(|| json!({"creationTimestamp": null}));
    review.insert("status".into(), status);
    json_response(StatusCode::CREATED, &Value::Object(review))
}

// ---------------------------------------------------------------------------------------------------
// Randomness.

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system randomness");
    bytes
}

/// A bearer token: 32 random bytes in hex.
fn random_token() -> String {
    random_bytes::<32>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random UUID (version 4), the form Kubernetes uses for uids.
fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
