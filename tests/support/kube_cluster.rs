//! The Kubernetes test cluster in network namespaces, shared by `tests/mesh_kubernetes.rs` and the
//! `mesh_kubernetes` benchmark: a control plane in `--kubernetes` mode following the fake API server
//! ([`super::kube_api`]), two node namespaces each routing two pod namespaces the way Calico does, and one
//! `--mode kubernetes` proxy per node.
//!
//! | host | address | runs |
//! |---|---|---|
//! | ctl | 10.77.0.1 | `strait control --kubernetes` and the fake API server on 127.0.0.1:6443 |
//! | node1 | 10.77.0.2 | proxy `--mode kubernetes`; pods `web` (shop/web, meshed) 10.244.1.11, `olda` (legacy, not meshed) 10.244.1.12 |
//! | node2 | 10.77.0.3 | proxy `--mode kubernetes`; pods `db` (shop/db, meshed) 10.244.2.21, `oldb` (legacy, not meshed) 10.244.2.22 |
//!
//! Each pod runs a docstore on :8080 (IPv4 and IPv6: fd00:244:N::X).
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::kube_api::{FakePod, FakeReview, KubeApi};
use super::mesh::{bin, text};
use super::{Netns, Proc};

pub const TD: &str = "cluster.local";
pub const PROXY_SA: &str = "system:serviceaccount:strait-system:strait-proxy";

pub struct Pod {
    pub name: &'static str,
    pub node: &'static str,
    pub ns: &'static str,
    pub sa: &'static str,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

pub const PODS: [Pod; 4] = [
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

pub fn pod(name: &str) -> &'static Pod {
    PODS.iter().find(|p| p.name == name).expect("pod")
}

pub fn url(name: &str, v6: bool, path: &str) -> String {
    let p = pod(name);
    if v6 {
        format!("http://[{}]:8080{path}", p.v6)
    } else {
        format!("http://{}:8080{path}", p.v4)
    }
}

pub struct Cluster {
    pub net: Netns,
    _tmp: tempfile::TempDir,
    pub dir: std::path::PathBuf,
    pub api: KubeApi,
    pub proxies: Vec<(&'static str, Proc)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

impl Cluster {
    pub fn p(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Every log of the test (the control plane, the proxies, whatever else a test started here).
    pub fn dump_logs(&self) {
        let mut logs: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        logs.sort();
        for f in logs.iter().filter_map(|f| f.to_str()) {
            if f.ends_with(".log") && !f.ends_with("-store.log") {
                eprintln!("----- {f}\n{}", self.log(f));
            }
        }
    }

    /// curl from a pod: the HTTP status, or "000" when the connection failed.
    pub fn curl(&self, from: &str, url: &str, extra: &[&str]) -> String {
        self.net.http_code(from, None, url, extra, 3)
    }

    pub fn admin(&self, args: &[&str]) -> String {
        let ctx = format!("STRAIT_CONFIG={}/admin.yaml", self.p("ctl"));
        let mut cmd = vec!["env", ctx.as_str(), bin()];
        cmd.extend(args);
        let out = self.net.run("ctl", None, &cmd);
        assert!(out.status.success(), "strait {args:?}: {}", text(&out));
        text(&out)
    }

    /// Applies the workflow `shop` (services web and db) with these steps (YAML list items) and waits
    /// until every proxy has it.
    pub fn apply_workflow(&self, steps: &str) {
        let wf = self.dir.join("shop.yaml");
        std::fs::write(
            &wf,
            format!(
                "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: shop}}\ntrustDomain: {TD}\nactors:\n- name: shop\n  services: [{{name: web, namespace: shop, serviceAccount: web}}, {{name: db, namespace: shop, serviceAccount: db}}]\nsteps:\n{steps}\n"
            ),
        )
        .unwrap();
        self.admin(&[
            "workflow",
            "apply",
            "-f",
            wf.to_str().unwrap(),
            "--wait",
            "30s",
        ]);
    }

    pub fn nft(&self, host: &str) -> String {
        text(
            &self
                .net
                .run(host, None, &["nft", "list", "table", "inet", "strait"]),
        )
    }

    pub fn start_proxy(&self, node: &'static str) -> Proc {
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
                // The cluster DNS stand-in (dnsmasq on ctl:53, in the test that needs it).
                "--dns-resolver",
                &self.net.v4("ctl").to_string(),
            ],
            &self.dir.join(format!("{node}.log")),
        )
    }

    /// Starts the proxy of each node and waits until both are ready.
    pub fn start_proxies(&mut self) {
        for node in ["node1", "node2"] {
            let p = self.start_proxy(node);
            self.proxies.push((node, p));
        }
        self.net
            .eventually(Duration::from_secs(20), "both proxies ready", || {
                self.ready("node1") && self.ready("node2")
            });
    }

    pub fn ready(&self, node: &str) -> bool {
        self.net
            .http_code(node, None, "http://127.0.0.1:15000/ready", &[], 3)
            == "200"
    }
}

/// Runs `f` on a thread inside the network namespace `ns` (only that thread moves), with its own runtime.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
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

pub fn proxy_pod(name: &str, node: &str, ip: &str) -> FakePod {
    let mut p = FakePod::running("strait-system", name, node, "strait-proxy", &[ip]);
    p.host_network = true;
    p.owners = vec![("DaemonSet".into(), "strait-proxy".into())];
    p
}

pub fn review(pod: &FakePod) -> FakeReview {
    FakeReview {
        username: PROXY_SA.into(),
        audiences: vec!["strait".into()],
        pod_name: Some(pod.name.clone()),
        pod_uid: Some(pod.uid.clone()),
        node_name: Some(pod.node.clone()),
    }
}

pub fn setup() -> Cluster {
    setup_with(&[])
}

/// The cluster, and `extra` hosts on the same network that route to the pods (outside the cluster: another
/// organisation's machines, say).
pub fn setup_with(extra: &[&str]) -> Cluster {
    let hosts: Vec<&str> = ["ctl", "node1", "node2"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let mut net = Netns::new(&hosts);
    for p in &PODS {
        net.add_pod(p.node, p.name, p.v4, p.v6);
    }
    let via = |node: &str| -> Vec<&str> { hosts.iter().copied().filter(|h| *h != node).collect() };
    net.route_pods("node1", "10.244.1.0/24", "fd00:244:1::/64", &via("node1"));
    net.route_pods("node2", "10.244.2.0/24", "fd00:244:2::/64", &via("node2"));
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
