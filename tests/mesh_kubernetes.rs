//! Kubernetes mode, end to end: the control plane follows a (fake, wire-exact) API server, proxies join with
//! service-account tokens, and pod traffic is captured for real with TPROXY in "node" namespaces that route
//! "pods" the way Calico does.
//!
//! | host | address | runs |
//! |---|---|---|
//! | ctl | 10.77.0.1 | `strait control --kubernetes` and the fake API server on 127.0.0.1:6443 |
//! | node1 | 10.77.0.2 | proxy `--mode kubernetes`; pods `web` (shop/web, meshed) 10.244.1.11, `olda` (legacy, not meshed) 10.244.1.12 |
//! | node2 | 10.77.0.3 | proxy `--mode kubernetes`; pods `db` (shop/db, meshed) 10.244.2.21, `oldb` (legacy, not meshed) 10.244.2.22 |
//!
//! Each pod runs a docstore on :8080 (IPv4 and IPv6: fd00:244:N::X).

mod support;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::kube_api::{FakePod, FakeReview, KubeApi};
use support::mesh::{bin, metric, pcap_summary, text};
use support::{require_root, Netns, Proc};

const TD: &str = "cluster.local";
const PROXY_SA: &str = "system:serviceaccount:strait-system:strait-proxy";

struct Pod {
    name: &'static str,
    node: &'static str,
    ns: &'static str,
    sa: &'static str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

const PODS: [Pod; 4] = [
    Pod {
        name: "web",
        node: "node1",
        ns: "shop",
        sa: "web",
        v4: Ipv4Addr::new(10, 244, 1, 11),
        v6: Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11),
    },
    Pod {
        name: "olda",
        node: "node1",
        ns: "legacy",
        sa: "default",
        v4: Ipv4Addr::new(10, 244, 1, 12),
        v6: Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12),
    },
    Pod {
        name: "db",
        node: "node2",
        ns: "shop",
        sa: "db",
        v4: Ipv4Addr::new(10, 244, 2, 21),
        v6: Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x21),
    },
    Pod {
        name: "oldb",
        node: "node2",
        ns: "legacy",
        sa: "default",
        v4: Ipv4Addr::new(10, 244, 2, 22),
        v6: Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x22),
    },
];

fn pod(name: &str) -> &'static Pod {
    PODS.iter().find(|p| p.name == name).expect("pod")
}

fn url(name: &str, v6: bool, path: &str) -> String {
    let p = pod(name);
    if v6 {
        format!("http://[{}]:8080{path}", p.v6)
    } else {
        format!("http://{}:8080{path}", p.v4)
    }
}

struct Cluster {
    net: Netns,
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    api: KubeApi,
    proxies: Vec<(&'static str, Proc)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

impl Cluster {
    fn p(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn dump_logs(&self) {
        for f in ["control.log", "node1.log", "node2.log"] {
            eprintln!("----- {f}\n{}", self.log(f));
        }
    }

    /// curl from a pod: the HTTP status, or "000" when the connection failed.
    fn curl(&self, from: &str, url: &str, extra: &[&str]) -> String {
        self.net.http_code(from, None, url, extra, 3)
    }

    fn admin(&self, args: &[&str]) -> String {
        let ctx = format!("STRAIT_CONFIG={}/admin.yaml", self.p("ctl"));
        let mut cmd = vec!["env", ctx.as_str(), bin()];
        cmd.extend(args);
        let out = self.net.run("ctl", None, &cmd);
        assert!(out.status.success(), "strait {args:?}: {}", text(&out));
        text(&out)
    }

    fn nft(&self, host: &str) -> String {
        text(
            &self
                .net
                .run(host, None, &["nft", "list", "table", "inet", "strait"]),
        )
    }

    fn start_proxy(&self, node: &'static str) -> Proc {
        let n = self.net.v4(node).to_string();
        let n6 = self.net.v6(node).to_string();
        let control = format!("https://{}:15012", self.net.v4("ctl"));
        self.net.spawn(
            node,
            None,
            &[
                bin(),
                "proxy",
                "--mode",
                "kubernetes",
                "--node",
                node,
                "--control",
                &control,
                "--trust-bundle",
                &self.p("bundle.pem"),
                "--service-account-token-file",
                &self.p(&format!("{node}.token")),
                "--data-dir",
                &self.p(&format!("{node}-data")),
                "--address",
                &n,
                "--address",
                &n6,
                "--drain-timeout",
                "2s",
                "--allow-kubelet-probes",
                // The cluster DNS stand-in (a UDP echo on ctl:53).
                "--dns-resolver",
                &self.net.v4("ctl").to_string(),
            ],
            &self.dir.join(format!("{node}.log")),
        )
    }

    fn ready(&self, node: &str) -> bool {
        self.net
            .http_code(node, None, "http://127.0.0.1:15000/ready", &[], 3)
            == "200"
    }
}

/// Runs `f` on a thread inside the network namespace `ns` (only that thread moves), with its own runtime.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns on a namespace fd we opened; it only affects this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn proxy_pod(name: &str, node: &str, ip: &str) -> FakePod {
    let mut p = FakePod::running("strait-system", name, node, "strait-proxy", &[ip]);
    p.host_network = true;
    p.owners = vec![("DaemonSet".into(), "strait-proxy".into())];
    p
}

fn review(pod: &FakePod) -> FakeReview {
    FakeReview {
        username: PROXY_SA.into(),
        audiences: vec!["strait".into()],
        pod_name: Some(pod.name.clone()),
        pod_uid: Some(pod.uid.clone()),
        node_name: Some(pod.node.clone()),
    }
}

fn setup() -> Cluster {
    let mut net = Netns::new(&["ctl", "node1", "node2"]);
    for p in &PODS {
        net.add_pod(p.node, p.name, p.v4, p.v6);
    }
    net.route_pods(
        "node1",
        "10.244.1.0/24",
        "fd00:244:1::/64",
        &["node2", "ctl"],
    );
    net.route_pods(
        "node2",
        "10.244.2.0/24",
        "fd00:244:2::/64",
        &["node1", "ctl"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let ctl = net.v4("ctl");

    let out = std::process::Command::new(bin())
        .args(["control", "init", "--data-dir"])
        .arg(dir.join("ctl"))
        .args(["--trust-domain", TD, "--server", &format!("{ctl}:15012")])
        .output()
        .unwrap();
    assert!(out.status.success(), "init: {}", text(&out));

    let api = KubeApi::start(&net.ns("ctl"), 6443, &dir.join("kube"));
    api.put_namespace("strait-system", &[]);
    api.put_namespace("shop", &[("strait.dev/mesh", "enabled")]);
    api.put_namespace("legacy", &[]);
    for p in &PODS {
        let mut fp = FakePod::running(
            p.ns,
            p.name,
            p.node,
            p.sa,
            &[&p.v4.to_string(), &p.v6.to_string()],
        );
        if p.name == "web" {
            // kubelet probes web on its named port; db has no probe.
            fp.containers = Some(serde_json::json!([{
                "name": "app", "image": "docstore",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
            }]));
        }
        api.put_pod(fp);
    }
    for (node, pod_name) in [("node1", "strait-proxy-a"), ("node2", "strait-proxy-b")] {
        let pp = proxy_pod(pod_name, node, &net.v4(node).to_string());
        let token = format!("sa-token-{node}");
        api.add_token(&token, review(&pp));
        std::fs::write(dir.join(format!("{node}.token")), &token).unwrap();
        api.put_pod(pp);
    }

    let cluster = Cluster {
        net,
        _tmp: tmp,
        dir,
        api,
        proxies: Vec::new(),
    };
    cluster.net.spawn(
        "ctl",
        None,
        &[
            bin(),
            "control",
            "--data-dir",
            &cluster.p("ctl"),
            "--listen",
            &format!("{ctl}:15012"),
            "--kubernetes",
            "--kube-api-server",
            "https://127.0.0.1:6443",
            "--kube-ca-file",
            cluster.api.ca_file().to_str().unwrap(),
            "--kube-token-file",
            cluster.api.token_file().to_str().unwrap(),
            "--kube-namespace",
            "strait-system",
            // Small pages, so the lists (6 pods, 3 namespaces) take several continue round trips.
            "--kube-list-page-size",
            "2",
        ],
        &cluster.dir.join("control.log"),
    );
    // The control plane publishes its trust bundle for the proxies (the DaemonSet mounts this ConfigMap).
    let mut bundle = None;
    cluster.net.eventually(
        Duration::from_secs(15),
        "the trust bundle ConfigMap",
        || {
            bundle = cluster
                .api
                .configmap("strait-system", "strait-trust-bundle")
                .and_then(|d| d.get("bundle.pem").cloned());
            bundle.is_some()
        },
    );
    std::fs::write(cluster.dir.join("bundle.pem"), bundle.unwrap()).unwrap();
    for p in &PODS {
        let listen6 = "[::]:8080";
        cluster.net.spawn(
            p.name,
            None,
            &[bin(), "docstore", "--listen", listen6, "--name", p.name],
            &cluster.dir.join(format!("{}-store.log", p.name)),
        );
    }
    cluster
}

/// Joins as `node` with `token` from inside node1's namespace; Err(message) when refused.
fn try_join(c: &Cluster, node: &str, token: &str) -> Result<(), String> {
    let bundle_pem = std::fs::read_to_string(c.dir.join("bundle.pem")).unwrap();
    let control = format!("https://{}:15012", c.net.v4("ctl"));
    let node = strait_control::registry::NodeName::new(node).unwrap();
    in_netns(&c.net.ns("node1"), || {
        let bundle =
            Arc::new(strait_ca::TrustBundle::from_pem_self_described(&bundle_pem).unwrap());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(strait_control::node::join_kubernetes(
                &control,
                bundle,
                token,
                &node,
                Default::default(),
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// What node1 can ask the control plane with its saved node identity.
enum Node1Call<'a> {
    WorkloadSvid(&'a str),
    Renew,
    Directory,
}

/// Calls the control plane as node1 (its saved identity); Ok(answer as text) or Err(message).
fn node1_call(c: &Cluster, call: Node1Call) -> Result<String, String> {
    let data = c.dir.join("node1-data");
    let control = format!("https://{}:15012", c.net.v4("ctl"));
    in_netns(&c.net.ns("node1"), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let identity =
                    strait_control::node::NodeIdentity::load(&data).map_err(|e| e.to_string())?;
                let client = strait_control::node::NodeClient::new(&control, &identity)
                    .map_err(|e| e.to_string())?;
                match call {
                    Node1Call::WorkloadSvid(id) => {
                        let id = strait_ca::SpiffeId::parse(id).unwrap();
                        client.workload_svid(&id).await.map(|_| String::new())
                    }
                    Node1Call::Renew => client
                        .renew(Default::default())
                        .await
                        .map(|_| String::new()),
                    Node1Call::Directory => client
                        .directory()
                        .await
                        .map(|d| serde_json::to_string(&d).unwrap()),
                }
                .map_err(|e| e.to_string())
            })
    })
}

fn node1_svid(c: &Cluster, workload: &str) -> Result<String, String> {
    node1_call(c, Node1Call::WorkloadSvid(workload))
}

fn capture(c: &Cluster, host: &str, file: &Path) -> Proc {
    let p = c.net.spawn(
        "sw",
        None,
        &[
            "tcpdump",
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            &c.net.switch_port(host),
            "-U",
            "-s",
            "0",
            "-w",
            file.to_str().unwrap(),
        ],
        &c.dir.join(format!(
            "{}.log",
            file.file_name().unwrap().to_string_lossy()
        )),
    );
    std::thread::sleep(Duration::from_millis(300));
    p
}

/// The packets counted by the rules of `nft list table` output whose comment contains `comment`.
fn dropped_by(rules: &str, comment: &str) -> u64 {
    rules
        .lines()
        .filter(|l| l.contains(comment))
        .filter_map(|l| {
            l.split("packets ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn packets(file: &Path, filter: &str) -> usize {
    let out = std::process::Command::new("tcpdump")
        .args(["-nr", file.to_str().unwrap(), filter])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn pods_are_meshed_by_namespace_label_and_captured_with_tproxy() {
    if !require_root() {
        return;
    }
    let mut c = setup();

    // --- Joining with service-account tokens: every forgery is refused before any proxy starts. ---
    let impostor = {
        // A pod with the proxies' service account but not from their DaemonSet.
        let mut p = FakePod::running(
            "strait-system",
            "impostor",
            "node1",
            "strait-proxy",
            &["10.244.1.99"],
        );
        p.owners = vec![("ReplicaSet".into(), "impostor-7d".into())];
        p
    };
    c.api.add_token("impostor-token", review(&impostor));
    c.api.put_pod(impostor);
    let web_pod = FakePod::running("shop", "web-token-holder", "node1", "web", &["10.244.1.98"]);
    c.api.add_token(
        "web-token",
        FakeReview {
            username: "system:serviceaccount:shop:web".into(),
            ..review(&web_pod)
        },
    );
    let pb = proxy_pod("strait-proxy-b", "node2", "10.77.0.3");
    c.api.add_token(
        "wrong-audience",
        FakeReview {
            audiences: vec!["https://kubernetes.default.svc.cluster.local".into()],
            ..review(&pb)
        },
    );
    c.api.add_token(
        "unbound",
        FakeReview {
            pod_name: None,
            pod_uid: None,
            ..review(&pb)
        },
    );
    for (what, node, token) in [
        ("an unknown token", "node1", "made-up"),
        (
            "node2's proxy token claiming node1",
            "node1",
            "sa-token-node2",
        ),
        ("a token for another audience", "node2", "wrong-audience"),
        ("a token not bound to a pod", "node2", "unbound"),
        ("a workload's token", "node1", "web-token"),
        (
            "a token of a pod outside the DaemonSet",
            "node1",
            "impostor-token",
        ),
    ] {
        let r = try_join(&c, node, token);
        assert!(
            matches!(&r, Err(e) if e.contains("not accepted")),
            "{what} must be refused, got {r:?}\n{}",
            c.log("control.log")
        );
    }
    let control_log = c.log("control.log");
    for reason in [
        "the token is not valid",
        "runs on node node2, but the proxy asked for node node1",
        "is invalid for the target audiences",
        "not bound to a pod",
        "not to the proxies' service account",
        "not a pod of the DaemonSet",
    ] {
        assert!(
            control_log.contains(reason),
            "the log says why ({reason}):\n{control_log}"
        );
    }
    assert!(
        !control_log.contains("sa-token-node2"),
        "tokens are never logged"
    );

    // --- Proxies join and become ready with the pods the API lists. ---
    for node in ["node1", "node2"] {
        let p = c.start_proxy(node);
        c.proxies.push((node, p));
    }
    c.net
        .eventually(Duration::from_secs(20), "both proxies ready", || {
            c.ready("node1") && c.ready("node2")
        });
    // 6 pods in pages of 2: the first list alone took three requests.
    assert!(c.api.count("list", "pods") >= 3, "paged lists");
    let status = c.admin(&["status"]);
    assert!(
        status.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{status}"
    );
    assert!(
        status.contains("spiffe://cluster.local/ns/shop/sa/db"),
        "{status}"
    );
    assert!(
        !status.contains("ns/legacy"),
        "un-meshed pods are not workloads: {status}"
    );
    // A node obtains SVIDs only for meshed pods the API says run on it.
    assert!(node1_svid(&c, "spiffe://cluster.local/ns/shop/sa/web").is_ok());
    let stolen = node1_svid(&c, "spiffe://cluster.local/ns/shop/sa/db");
    assert!(
        matches!(&stolen, Err(e) if e.contains("not registered on this node")),
        "{stolen:?}"
    );
    let legacy = node1_svid(&c, "spiffe://cluster.local/ns/legacy/sa/default");
    assert!(legacy.is_err(), "{legacy:?}");

    // --- A workflow: web may POST to db. ---
    let wf = c.dir.join("shop.yaml");
    std::fs::write(
        &wf,
        format!(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: shop}}\ntrustDomain: {TD}\nactors:\n- name: shop\n  services: [{{name: web, namespace: shop, serviceAccount: web}}, {{name: db, namespace: shop, serviceAccount: db}}]\nsteps:\n- {{from: web, to: db, methods: [POST], paths: [/api/db]}}\n"
        ),
    )
    .unwrap();
    c.admin(&[
        "workflow",
        "apply",
        "-f",
        wf.to_str().unwrap(),
        "--wait",
        "30s",
    ]);

    // Pod to pod across nodes, IPv4 and IPv6, through mTLS; the policy is enforced per request.
    let wire = c.dir.join("node2.pcap");
    let tcpdump = capture(&c, "node2", &wire);
    for v6 in [false, true] {
        let target = url("db", v6, "/api/db");
        let mut got = String::new();
        c.net.eventually(
            Duration::from_secs(10),
            "web → db through the mesh",
            || {
                got = c.curl("web", &target, &["-d", "secret-marker-4711"]);
                got == "201"
            },
        );
        assert_eq!(
            c.curl("web", &url("db", v6, "/api/db/1"), &[]),
            "403",
            "GET is not in the workflow"
        );
    }
    // Plaintext into a meshed pod is refused: from an un-meshed pod on another node, and from the node.
    assert_eq!(c.curl("olda", &url("db", false, "/"), &[]), "000");
    assert_eq!(c.curl("olda", &url("db", true, "/"), &[]), "000");
    assert_eq!(
        text(&c.net.run(
            "node2",
            None,
            &["curl", "-s", "--max-time", "2", &url("db", false, "/")]
        )),
        ""
    );
    // kubelet's probe of web (httpGet on its named port 8080) comes from the node in plaintext and is let
    // through (--allow-kubelet-probes); the node still cannot reach web's other ports, nor db (no probe).
    assert_eq!(
        c.net
            .http_code("node1", None, &url("web", false, "/"), &[], 2),
        "200",
        "kubelet's probe port"
    );
    assert!(
        dropped_by(&c.nft("node1"), "kubelet probes") >= 1,
        "{}",
        c.nft("node1")
    );
    let before = dropped_by(&c.nft("node1"), "plaintext from the node");
    let other_port = format!("http://{}:9000/", pod("web").v4);
    c.net.run(
        "node1",
        None,
        &["curl", "-s", "--max-time", "1", &other_port],
    );
    assert!(
        dropped_by(&c.nft("node1"), "plaintext from the node") > before,
        "another port of web is not a probe port"
    );
    // Un-meshed pods are untouched: they talk in plaintext across nodes.
    assert_eq!(c.curl("olda", &url("oldb", false, "/"), &[]), "200");
    assert_eq!(c.curl("oldb", &url("olda", true, "/"), &[]), "200");
    // A meshed pod cannot reach outside the mesh (no egress allowed), not even an un-meshed pod.
    assert_eq!(c.curl("web", &url("oldb", false, "/"), &[]), "000");
    // DNS to the resolver is the one UDP a meshed pod may send; any other UDP is dropped at its node.
    for port in ["53", "54"] {
        c.net.spawn(
            "ctl",
            None,
            &[
                "socat",
                &format!("UDP-LISTEN:{port},fork,reuseaddr"),
                "EXEC:cat",
            ],
            &c.dir.join(format!("udp{port}.log")),
        );
    }
    let udp = |from: &str, port: &str| {
        let cmd = format!("echo ping | socat -t1 - UDP:{}:{port}", c.net.v4("ctl"));
        text(&c.net.run(from, None, &["sh", "-c", &cmd])).contains("ping")
    };
    c.net
        .eventually(Duration::from_secs(5), "DNS from a meshed pod", || {
            udp("web", "53")
        });
    assert!(!udp("web", "54"), "other UDP must not leave a meshed pod");
    assert!(udp("olda", "54"), "an un-meshed pod's UDP is untouched");
    // An un-meshed pod on the same node claiming web's address is dropped before the proxy sees it.
    let web4 = pod("web").v4.to_string();
    c.net.run(
        "olda",
        None,
        &["ip", "addr", "add", &format!("{web4}/32"), "dev", "eth0"],
    );
    let spoof = c.curl(
        "olda",
        &url("db", false, "/api/db"),
        &["--interface", &web4, "-d", "x"],
    );
    assert_eq!(spoof, "000", "a spoofed source must not pass as web");
    let spoofed = dropped_by(&c.nft("node1"), "spoofed");
    assert!(
        spoofed >= 1,
        "the reverse-path rule dropped the spoofed SYN:\n{}",
        c.nft("node1")
    );
    std::thread::sleep(Duration::from_millis(300));
    c.net.signal(tcpdump, libc::SIGINT);
    c.net.wait(tcpdump, Duration::from_secs(5));

    let rules = c.nft("node2");
    let dropped = dropped_by(&rules, "plaintext");
    assert!(
        dropped >= 3,
        "the plaintext attempts hit Strait's drop rules:\n{rules}"
    );
    assert!(rules.contains("tproxy ip to 127.0.0.1:15001"), "{rules}");
    assert!(
        !rules.contains(&pod("oldb").v4.to_string()),
        "un-meshed pods are in no rule:\n{rules}"
    );
    // The wire between the nodes: the mesh's requests only on the tunnel port, the marker never in clear;
    // the un-meshed pods' plaintext on :8080.
    let summary = pcap_summary(&wire);
    assert!(packets(&wire, "tcp port 15008") > 0, "{summary}");
    // The un-meshed pod's SYNs to db cross the wire (node2 drops them), but db never answers one.
    for db in [pod("db").v4.to_string(), pod("db").v6.to_string()] {
        assert_eq!(
            packets(&wire, &format!("tcp src port 8080 and src host {db}")),
            0,
            "no plaintext to the meshed pod got through:\n{summary}"
        );
    }
    assert!(
        packets(&wire, &format!("tcp port 8080 and host {}", pod("oldb").v4)) > 0,
        "{summary}"
    );
    let raw = std::fs::read(&wire).unwrap();
    assert!(
        !raw.windows(18).any(|w| w == b"secret-marker-4711"),
        "the request body crossed the wire in clear"
    );
    let m = text(&c.net.run(
        "node1",
        None,
        &["curl", "-s", "http://127.0.0.1:15000/metrics"],
    ));
    assert!(
        metric(&m, "strait_proxy_connections_total", "outbound") >= 4,
        "{m}"
    );

    // --- The API server's watch semantics. ---
    // Compaction: the next watch gets 410 Gone; the control plane lists again and sees a new replica.
    let lists = c.api.count("list", "pods");
    c.api.compact();
    c.api.close_watches();
    c.api.put_pod(FakePod::running(
        "shop",
        "web-2",
        "node1",
        "web",
        &["10.244.1.13"],
    ));
    c.net
        .eventually(Duration::from_secs(15), "a re-list after 410 Gone", || {
            c.api.count("list", "pods") > lists
        });
    c.net.eventually(
        Duration::from_secs(15),
        "the new replica in the directory",
        || c.admin(&["status"]).contains("10.244.1.13"),
    );
    // Bookmarks: a watch that ends resumes from the bookmark's version, without listing again.
    let lists = c.api.count("list", "pods");
    c.api.bookmark();
    let bookmarked = c.api.resource_version().to_string();
    std::thread::sleep(Duration::from_millis(300));
    c.api.close_watches();
    c.net.eventually(
        Duration::from_secs(15),
        "a watch resumed from the bookmark",
        || c.api.watch_versions("pods").last() == Some(&bookmarked),
    );
    assert_eq!(
        c.api.count("list", "pods"),
        lists,
        "no re-list after a bookmark"
    );

    // The namespace opts out: its pods leave the mesh, their traffic is no longer captured, and the
    // (now plaintext) request reaches db directly.
    c.api.put_namespace("shop", &[]);
    c.net.eventually(
        Duration::from_secs(15),
        "shop's pods out of the rules",
        || !c.nft("node2").contains(&pod("db").v4.to_string()),
    );
    assert_eq!(
        c.curl("web", &url("db", false, "/api/db/1"), &[]),
        "200",
        "the GET the mesh refused (403) now reaches the store directly"
    );
    // Plaintext flows opened meanwhile (TCP and UDP echoes on db:9000 from the un-meshed pod olda, a line
    // every 100 ms) must not outlive the namespace's return to the mesh: no conntrack entry is honoured.
    let mut sizes = Vec::new();
    for proto in ["TCP", "UDP"] {
        c.net.spawn(
            "db",
            None,
            &[
                "socat",
                &format!("{proto}-LISTEN:9000,fork,reuseaddr"),
                "EXEC:cat",
            ],
            &c.dir.join(format!("echo-{proto}.log")),
        );
        let flag = if proto == "TCP" { "-Hlnt" } else { "-Hlnu" };
        c.net
            .eventually(Duration::from_secs(5), "the echo listening", || {
                !text(&c.net.run("db", None, &["ss", flag, "sport = :9000"]))
                    .trim()
                    .is_empty()
            });
        let echoed = c.dir.join(format!("echoed-{proto}.txt"));
        let feed = format!(
            "while true; do echo tick; sleep 0.1; done | socat - {proto}:{}:9000 > {}",
            pod("db").v4,
            echoed.display()
        );
        c.net.spawn(
            "olda",
            None,
            &["sh", "-c", &feed],
            &c.dir.join(format!("feed-{proto}.log")),
        );
        sizes.push((proto, echoed));
    }
    let size = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    c.net.eventually(
        Duration::from_secs(10),
        "the plaintext echoes flowing",
        || sizes.iter().all(|(_, f)| size(f) > 20),
    );
    c.api
        .put_namespace("shop", &[("strait.dev/mesh", "enabled")]);
    c.net.eventually(
        Duration::from_secs(15),
        "db's address back in the rules",
        || c.nft("node2").contains(&pod("db").v4.to_string()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let cut_at: Vec<u64> = sizes.iter().map(|(_, f)| size(f)).collect();
    std::thread::sleep(Duration::from_secs(1));
    for ((proto, f), before) in sizes.iter().zip(cut_at) {
        assert_eq!(
            size(f),
            before,
            "an established {proto} flow kept going into a meshed pod"
        );
    }
    c.net
        .eventually(Duration::from_secs(15), "shop meshed again", || {
            c.curl("olda", &url("db", false, "/"), &[]) == "000"
                && c.curl("web", &url("db", false, "/api/db"), &["-d", "x"]) == "201"
        });

    // --- The node's view and its identity follow the API. ---
    let dir = node1_call(&c, Node1Call::Directory).unwrap();
    assert!(
        dir.contains(&pod("db").v4.to_string()),
        "the node directory lists the pods: {dir}"
    );
    assert_eq!(node1_call(&c, Node1Call::Renew), Ok(String::new()));
    // Its proxy pod deleted, node1 can no longer renew: a copied key or token does not outlive the pod.
    c.api.delete_pod("strait-system", "strait-proxy-a");
    let mut renewal = Ok(String::new());
    c.net
        .eventually(Duration::from_secs(10), "renewal refused", || {
            renewal = node1_call(&c, Node1Call::Renew);
            renewal.is_err()
        });
    assert!(
        matches!(&renewal, Err(e) if e.contains("no pod of the proxy DaemonSet")),
        "{renewal:?}"
    );

    // --- Shutdown removes every rule and route the proxy installed. ---
    let proxies = std::mem::take(&mut c.proxies);
    for (node, p) in proxies {
        c.net.signal(p, libc::SIGTERM);
        let st = c.net.wait(p, Duration::from_secs(10));
        assert!(
            st.is_some_and(|s| s.success()),
            "{node} proxy exit: {st:?}\n{}",
            c.log(&format!("{node}.log"))
        );
        let tables = text(&c.net.run(node, None, &["nft", "list", "tables"]));
        assert!(!tables.contains("strait"), "{tables}");
        let rules = text(&c.net.run(node, None, &["ip", "rule"]));
        assert!(!rules.contains("0x5355"), "{rules}");
    }
}
