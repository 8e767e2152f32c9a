//! The control plane end to end: the real `strait` binary serving its API over TLS 1.3 on loopback, driven
//! by the CLI (as an operator) and by the node client library (as a proxy would).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use strait_ca::verify::{unix_time, verify_peer, PeerRole};
use strait_ca::{PeerIdMatcher, SpiffeId, TrustBundle, TrustDomain};
use strait_control::api::{self, paths};
use strait_control::client::{ApiClient, ClientError, ServerTrust};
use strait_control::node::{join, Advert, NodeClient, NodeError};
use strait_control::registry::{NodeName, PortSpec, Protocol, Selector, Workload};

const TD: &str = "example.org";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A control plane process with its own data directory; killed on drop.
struct ControlPlane {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    svid_ttl: &'static str,
}

impl ControlPlane {
    fn start() -> Self {
        Self::start_with_ttl("24h")
    }

    fn start_with_ttl(svid_ttl: &'static str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cp");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let out = strait(
            None,
            &[
                "control",
                "init",
                "--data-dir",
                p(&dir),
                "--trust-domain",
                TD,
                "--server",
                &addr.to_string(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = tmp.path().join("control.log");
        let mut cp = Self {
            _tmp: tmp,
            dir,
            addr,
            child: None,
            log,
            svid_ttl,
        };
        cp.spawn();
        cp
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strait"))
            .args([
                "control",
                "--data-dir",
                p(&self.dir),
                "--listen",
                &self.addr.to_string(),
                "--svid-ttl",
                self.svid_ttl,
                "--monitoring",
                "off",
                "--log-format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "control plane did not listen on {}: {}",
            self.addr,
            self.log_text()
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("admin.yaml")
    }

    fn server(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn cli(&self, args: &[&str]) -> Output {
        strait(Some(&self.config()), args)
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        let pem = std::fs::read_to_string(self.dir.join("ca/bundle.pem")).unwrap();
        Arc::new(TrustBundle::from_pem(TrustDomain::new(TD).unwrap(), &pem).unwrap())
    }

    fn admin(&self) -> ApiClient {
        let token = std::fs::read_to_string(self.dir.join("admin.token")).unwrap();
        ApiClient::new(
            &self.server(),
            ServerTrust::Bundle(self.bundle()),
            None,
            Some(token.trim().into()),
        )
        .unwrap()
    }

    fn anonymous(&self) -> ApiClient {
        ApiClient::new(
            &self.server(),
            ServerTrust::Bundle(self.bundle()),
            None,
            None,
        )
        .unwrap()
    }

    fn token(&self, node: &str, ttl: &str) -> String {
        let out = self.cli(&["node", "token", "create", "--node", node, "--ttl", ttl]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (log lines are written asynchronously to the answer).
    fn assert_logged(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("log lacks {needle:?}:\n{}", self.log_text());
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn strait(config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strait"));
    cmd.args(args).env_remove("STRAIT_CONFIG");
    if let Some(c) = config {
        cmd.env("STRAIT_CONFIG", c);
    }
    cmd.output().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wid(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}")).unwrap()
}

fn workload(ns: &str, sa: &str, node: &str, uid: u32) -> Workload {
    Workload {
        id: wid(ns, sa),
        node: NodeName::new(node).unwrap(),
        selector: Selector::Uid(uid),
        ports: vec![PortSpec::new(5000, Protocol::Http)],
        probe_ports: Vec::new(),
    }
}

fn api_status(e: &NodeError) -> Option<StatusCode> {
    match e {
        NodeError::Api(c) => c.status(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_gets_svids_only_for_its_own_workloads() {
    let cp = ControlPlane::start();
    ok(cp.cli(&[
        "workload",
        "add",
        "--id",
        wid("movie", "owner").as_str(),
        "--node",
        "host-a",
        "--uid",
        "1001",
        "--port",
        "5000/http",
    ]));
    ok(cp.cli(&[
        "workload",
        "add",
        "--id",
        wid("movie", "vfx").as_str(),
        "--node",
        "host-b",
        "--uid",
        "1002",
        "--port",
        "5000",
    ]));

    let token = cp.token("host-a", "10m");
    let node = join(
        &cp.server(),
        &token,
        Advert {
            tunnel_address: Some("10.0.0.1:15008".into()),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            gateway_address: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(node.id().as_str(), "spiffe://example.org/node/host-a");
    // The node certificate verifies against the bundle, as a node identity.
    verify_peer(
        &cp.bundle(),
        &PeerIdMatcher::Exact(node.id().clone()),
        &node.svid.chain[0],
        &[],
        unix_time(SystemTime::now()),
        PeerRole::Client,
    )
    .unwrap();

    let client = NodeClient::new(&cp.server(), &node).unwrap();
    let (svid, not_after) = client.workload_svid(&wid("movie", "owner")).await.unwrap();
    assert_eq!(svid.id, wid("movie", "owner"));
    assert!(not_after > SystemTime::now() + Duration::from_secs(23 * 3600));

    // host-b's workload, and a workload nobody registered: refused, and logged with the node's name.
    let err = client
        .workload_svid(&wid("movie", "vfx"))
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(StatusCode::FORBIDDEN), "{err}");
    cp.assert_logged("node asked for a workload registered on another node");
    cp.assert_logged(r#""node":"host-a""#);
    let err = client
        .workload_svid(&wid("movie", "ghost"))
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(StatusCode::FORBIDDEN), "{err}");
    cp.assert_logged("node asked for an unregistered workload");

    // The directory has both workloads and the node's tunnel address.
    let dir = client.directory().await.unwrap();
    assert_eq!(dir.workloads.len(), 2);
    assert_eq!(dir.nodes.len(), 1);
    assert_eq!(
        dir.nodes[0].tunnel_address.as_deref(),
        Some("10.0.0.1:15008")
    );

    // Renewal with the node SVID (no token) gives a fresh certificate for the same node.
    let renewed = client.renew(Advert::default()).await.unwrap();
    assert_eq!(renewed.id(), node.id());
    assert_ne!(renewed.svid.chain[0], node.svid.chain[0]);
    // The renewed identity works on its own.
    let client2 = NodeClient::new(&cp.server(), &renewed).unwrap();
    client2.workload_svid(&wid("movie", "owner")).await.unwrap();

    // Status shows the node, its certificate expiry and both workloads.
    let status: api::Status = cp.admin().get(paths::ADMIN_STATUS).await.unwrap();
    assert_eq!(status.nodes.len(), 1);
    assert!(status.nodes[0].last_seen_secs_ago.is_some());
    assert_eq!(status.workloads.len(), 2);
    let text = ok(cp.cli(&["status"]));
    assert!(
        text.contains("host-a") && text.contains("10.0.0.1:15008"),
        "{text}"
    );
    assert!(text.contains("CERT EXPIRES"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(cp.cli(&["status", "--output", "json"]))).unwrap();
    assert_eq!(json["nodes"][0]["name"], "host-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_work_once_and_expire() {
    let cp = ControlPlane::start();
    let token = cp.token("host-a", "10m");
    join(&cp.server(), &token, Advert::default()).await.unwrap();
    // Replay: the same token again.
    let err = join(&cp.server(), &token, Advert::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(StatusCode::UNAUTHORIZED), "{err}");
    cp.assert_logged("join token already used (replay)");

    // Expired.
    let short = cp.token("host-b", "1s");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = join(&cp.server(), &short, Advert::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(StatusCode::UNAUTHORIZED), "{err}");
    cp.assert_logged("join token expired");

    // A guessed secret for a real token id.
    let fresh = cp.token("host-c", "10m");
    let mut parts: Vec<String> = fresh.split('.').map(str::to_owned).collect();
    parts[2] = "A".repeat(43);
    let guessed = parts.join(".");
    let err = join(&cp.server(), &guessed, Advert::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(&err), Some(StatusCode::UNAUTHORIZED), "{err}");
    cp.assert_logged("join token secret does not match");
    // The real one still works afterwards (a wrong guess does not burn it).
    join(&cp.server(), &fresh, Advert::default()).await.unwrap();

    // Secrets never reach the log.
    let log = cp.log_text();
    for t in [&token, &short, &fresh] {
        let secret = t.split('.').nth(2).unwrap();
        assert!(!log.contains(secret), "a token secret was logged");
    }
    let admin_secret = std::fs::read_to_string(cp.dir.join("admin.token")).unwrap();
    assert!(!log.contains(admin_secret.trim()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_refuses_a_control_plane_that_does_not_match_the_token_pin() {
    let real = ControlPlane::start();
    let impostor = ControlPlane::start();
    // A token from the real control plane, presented to another one (e.g. DNS hijack): the TLS
    // handshake fails on the node's side, before the token is sent.
    let token = real.token("host-a", "10m");
    let err = join(&impostor.server(), &token, Advert::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NodeError::Api(ClientError::Tls(m)) if m.contains("not issued by a CA")),
        "{err}"
    );
    assert!(!impostor.log_text().contains("node joined"));
    // The token was not consumed, so it still works at the real control plane.
    join(&real.server(), &token, Advert::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_admin_credential() {
    let cp = ControlPlane::start();
    let err = cp
        .anonymous()
        .get::<Vec<Workload>>(paths::ADMIN_WORKLOADS)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");
    cp.assert_logged("anonymous admin call refused");

    let wrong = ApiClient::new(
        &cp.server(),
        ServerTrust::Bundle(cp.bundle()),
        None,
        Some("sta1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
    )
    .unwrap();
    let err = wrong
        .get::<Vec<Workload>>(paths::ADMIN_WORKLOADS)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");
    cp.assert_logged("admin call with a wrong credential refused");

    // A plain HTTP client (curl) without credentials gets the same 401 with a WWW-Authenticate header.
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-D",
            "-",
            &format!("{}/v1/admin/status", cp.server()),
        ])
        .output()
        .expect("curl (install it or run scripts/test.sh)");
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(headers.contains(" 401"), "{headers}");
    assert!(headers.contains("www-authenticate: bearer"), "{headers}");

    // Node routes without a node certificate.
    let err = cp
        .anonymous()
        .get::<api::Directory>(paths::NODE_DIRECTORY)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");

    // The CLI without any configuration explains what to do.
    let out = strait(None, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("STRAIT_CONFIG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_svids_cannot_be_used_to_call_the_control_plane() {
    let cp = ControlPlane::start();
    cp.admin()
        .post::<_, api::ChangeResponse>(paths::ADMIN_WORKLOADS, &workload("a", "web", "host-a", 1))
        .await
        .unwrap();
    let node = join(&cp.server(), &cp.token("host-a", "10m"), Advert::default())
        .await
        .unwrap();
    let (svid, _) = NodeClient::new(&cp.server(), &node)
        .unwrap()
        .workload_svid(&wid("a", "web"))
        .await
        .unwrap();
    // The workload's certificate is valid, but not a node identity: the handshake is refused.
    let as_node = strait_control::node::NodeIdentity {
        svid,
        bundle: node.bundle.clone(),
        not_after: node.not_after,
        distribution_key: node.distribution_key.clone(),
        distribution_next_key: None,
    };
    let err = NodeClient::new(&cp.server(), &as_node)
        .unwrap()
        .directory()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            NodeError::Api(ClientError::Http(_) | ClientError::Tls(_))
        ),
        "{err}"
    );
    cp.assert_logged("expected a node identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_are_added_listed_removed_and_applied_idempotently() {
    let cp = ControlPlane::start();
    ok(cp.cli(&[
        "workload",
        "add",
        "--id",
        wid("shop", "web").as_str(),
        "--node",
        "host-a",
        "--uid",
        "1001",
        "--port",
        "8080/http",
        "--port",
        "9090/http2",
    ]));
    let list = ok(cp.cli(&["workload", "list"]));
    assert!(
        list.contains("spiffe://example.org/ns/shop/sa/web")
            && list.contains("8080/http 9090/http2"),
        "{list}"
    );
    ok(cp.cli(&["workload", "remove", "--id", wid("shop", "web").as_str()]));
    let list: Vec<Workload> =
        serde_json::from_str(&ok(cp.cli(&["workload", "list", "--output", "json"]))).unwrap();
    assert!(list.is_empty());
    let out = cp.cli(&["workload", "remove", "--id", wid("shop", "web").as_str()]);
    assert!(!out.status.success());

    let file = cp.dir.join("workloads.yaml");
    std::fs::write(
        &file,
        "apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n\
         - id: spiffe://example.org/ns/shop/sa/web\n  node: host-a\n  uid: 1001\n  ports: [8080]\n\
         - id: spiffe://example.org/ns/shop/sa/db\n  node: host-b\n  ips: [10.0.0.7, 'fd00::7']\n  ports: [{port: 5432, protocol: tcp}]\n",
    )
    .unwrap();
    let first = ok(cp.cli(&["apply", "-f", p(&file)]));
    assert!(
        first.contains("2 created, 0 updated, 0 unchanged"),
        "{first}"
    );
    let rev1: api::Status = cp.admin().get(paths::ADMIN_STATUS).await.unwrap();
    let second = ok(cp.cli(&["apply", "-f", p(&file)]));
    assert!(
        second.contains("0 created, 0 updated, 2 unchanged"),
        "{second}"
    );
    let rev2: api::Status = cp.admin().get(paths::ADMIN_STATUS).await.unwrap();
    assert_eq!(
        rev1.revision, rev2.revision,
        "an idempotent apply must not bump the revision"
    );
    assert_eq!(rev2.workloads.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_400_with_the_field_and_oversized_bodies_413() {
    let cp = ControlPlane::start();
    let file = cp.dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n\
         - id: spiffe://example.org/ns/shop/sa/web\n  node: host-a\n  uid: 1001\n  ports: [80]\n\
         - id: spiffe://example.org/ns/shop/sa/db\n  node: host-b\n  uid: 7\n  ports: [99999]\n",
    )
    .unwrap();
    let out = cp.cli(&["apply", "-f", p(&file)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workloads[1].ports[0]") && err.contains("99999 is not a port number"),
        "{err}"
    );
    // Nothing was applied (all or nothing).
    let list: Vec<Workload> = cp.admin().get(paths::ADMIN_WORKLOADS).await.unwrap();
    assert!(list.is_empty());

    let admin = cp.admin();
    let (status, body) = admin
        .raw(
            http::Method::POST,
            paths::ADMIN_WORKLOADS,
            Some("application/json"),
            r#"{"id":"spiffe://example.org/ns/a/sa/b","node":"n","uid":1}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least one port"),
        "{body}"
    );

    let (status, body) = admin
        .raw(
            http::Method::POST,
            paths::ADMIN_WORKLOADS,
            Some("application/json"),
            r#"{"id":"spiffe://other.org/ns/a/sa/b","node":"n","uid":1,"ports":[1]}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["field"], "id", "{body}");

    let (status, _) = admin
        .raw(
            http::Method::POST,
            paths::ADMIN_APPLY,
            Some("application/yaml"),
            vec![b'#'; 2 << 20].into(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = cp
        .anonymous()
        .raw(
            http::Method::POST,
            paths::JOIN,
            Some("application/json"),
            "{not json".into(),
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// Kills the control plane with SIGKILL in the middle of a burst of writes, restarts it, and checks that
/// every write it acknowledged is there and the store is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let mut cp = ControlPlane::start();
    for round in 0..3 {
        let admin = Arc::new(cp.admin());
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for worker in 0..8 {
            let (admin, acked) = (admin.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let w = workload(
                        "burst",
                        &format!("r{round}-w{worker}-{i}"),
                        "host-a",
                        1000 + i,
                    );
                    match admin
                        .post::<_, api::ChangeResponse>(paths::ADMIN_WORKLOADS, &w)
                        .await
                    {
                        Ok(_) => acked.lock().unwrap().push(w.id.clone()),
                        Err(_) => return,
                    }
                }
            }));
        }
        // Let the burst run, then kill without warning.
        tokio::time::sleep(Duration::from_millis(400 + 150 * round as u64)).await;
        cp.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > 20,
            "the burst made too few writes ({}) to test anything",
            acked.len()
        );

        cp.spawn();
        let stored: Vec<Workload> = cp.admin().get(paths::ADMIN_WORKLOADS).await.unwrap();
        let stored_ids: std::collections::HashSet<_> =
            stored.iter().map(|w| w.id.clone()).collect();
        for id in &acked {
            assert!(
                stored_ids.contains(id),
                "acknowledged write {id} lost after kill -9"
            );
        }
        // Consistent: every record decodes (the list call above did), and the store takes new writes.
        cp.admin()
            .post::<_, api::ChangeResponse>(
                paths::ADMIN_WORKLOADS,
                &workload("after", &format!("crash{round}"), "h", 1),
            )
            .await
            .unwrap();
        eprintln!(
            "round {round}: {} acknowledged, {} stored",
            acked.len(),
            stored.len()
        );
    }
}

#[test]
fn secrets_on_disk_are_private() {
    let cp = ControlPlane::start();
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.token", "store.redb", "ca/ca-key.pem"] {
        let mode = std::fs::metadata(cp.dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let mode = std::fs::metadata(&cp.dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // A second init on the same directory is refused.
    let out = strait(
        None,
        &[
            "control",
            "init",
            "--data-dir",
            p(&cp.dir),
            "--trust-domain",
            TD,
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
}

/// The certificates the control plane presents, as OpenSSL's client receives them.
fn presented_chain(cp: &ControlPlane) -> Vec<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &cp.addr.to_string(), "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl is needed (apt-get install openssl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .filter_map(|c| c.split("-----END CERTIFICATE-----").next())
        .map(|b64| format!("-----BEGIN CERTIFICATE-----{b64}-----END CERTIFICATE-----\n"))
        .collect()
}

/// Waits (5 s at most) until the control plane presents `len` certificates.
fn chain_becomes(cp: &ControlPlane, len: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while presented_chain(cp).len() != len {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_made_before_a_root_rotation_work_until_the_old_root_is_withdrawn() {
    let cp = ControlPlane::start();
    let old_root = cp.bundle();
    assert_eq!(presented_chain(&cp).len(), 2, "leaf and root");
    let before = cp.token("host-a", "10m");
    let spare = cp.token("host-b", "10m");
    ok(cp.cli(&["ca", "rotation", "prepare"]));
    // While prepared, the old root still signs: a token made now pins it too.
    let while_prepared = cp.token("host-c", "10m");
    ok(cp.cli(&["ca", "rotation", "activate"]));

    // After activation the control plane's certificate chains to the new root; its chain now also carries
    // the new root certified by the old one, and the old root, so tokens pinning the old root still work.
    chain_becomes(&cp, 4, "the serving chain renewed at activation");
    let new_root = cp.bundle();
    assert_ne!(new_root.certs()[0], old_root.certs()[0]);
    // OpenSSL checks both links of SVID → cross-certificate (the third certificate presented) → old
    // root: the old root signed the cross-certificate, and the SVID verifies under it. (Asked for the
    // whole path at once OpenSSL refuses it, on the old root's own path length: see docs/ca.md.)
    let chain = presented_chain(&cp);
    let file = |name: &str, pem: &str| {
        let path = cp.dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (leaf, cross, old) = (
        file("leaf.pem", &chain[0]),
        file("cross.pem", &chain[2]),
        file("old-root.pem", &old_root.to_pem()),
    );
    let links: [&[&str]; 2] = [
        &["-CAfile", &old, &cross],
        &["-partial_chain", "-CAfile", &cross, &leaf],
    ];
    for args in links {
        let verified = Command::new("openssl")
            .arg("verify")
            .args(args)
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "openssl verify {args:?}: {}{}",
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    for token in [&before, &while_prepared] {
        let node = join(&cp.server(), token, Advert::default()).await.unwrap();
        // The node is signed by the new root and trusts both while the old one retires.
        assert_eq!(node.bundle.certs().len(), 2);
        verify_peer(
            &new_root,
            &PeerIdMatcher::Exact(node.id().clone()),
            &node.svid.chain[0],
            &node.svid.chain[1..],
            unix_time(SystemTime::now()),
            PeerRole::Client,
        )
        .unwrap();
    }
    // Tokens made after activation pin the new root.
    let after = cp.token("host-d", "10m");
    join(&cp.server(), &after, Advert::default()).await.unwrap();

    // Once the old root is withdrawn, nothing links to it: a token pinning it is refused before it is
    // sent, with what to do; a new token works.
    ok(cp.cli(&["ca", "rotation", "withdraw", "--force"]));
    chain_becomes(&cp, 2, "the serving chain without the withdrawn root");
    let err = join(&cp.server(), &spare, Advert::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("withdrawn by a CA rotation") && text.contains("strait node token create"),
        "{text}"
    );
    assert!(
        !cp.log_text()
            .lines()
            .any(|l| l.contains("node joined") && l.contains("host-b")),
        "the refused token was not spent"
    );
    let fresh = cp.token("host-b", "10m");
    join(&cp.server(), &fresh, Advert::default()).await.unwrap();
    assert!(!cp.dir.join("ca/cross-signed.pem").exists());
}
