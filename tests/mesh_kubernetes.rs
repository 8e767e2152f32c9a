//! Kubernetes mode, end to end: the control plane follows a (fake, wire-exact) API server, proxies join with
//! service-account tokens, and pod traffic is captured for real with TPROXY in "node" namespaces that route
//! "pods" the way Calico does. The cluster is `support::kube_cluster` (hosts and addresses there).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::kube_api::{FakePod, FakeReview};
use support::kube_cluster::{in_netns, pod, proxy_pod, review, setup, url, Cluster};
use support::mesh::{metric, pcap_summary, text};
use support::require_root;

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

/// `dig` from a pod: what it printed.
fn dig(c: &Cluster, from: &str, args: &[&str]) -> String {
    c.net.dig(from, None, args)
}

/// A meshed pod's DNS, whatever resolver it addresses, is answered by its node's proxy: mesh names from
/// the directory, cluster names forwarded, names an egress entry allows forwarded (and only then is the
/// entry's address reachable), everything else REFUSED without any resolver seeing it. The cluster DNS
/// stand-in is dnsmasq on ctl, logging every query it sees.
fn dns_goes_through_the_node_proxy(c: &Cluster) {
    let resolver = c.net.v4("ctl").to_string();
    let (db4, db6, oldb4) = (
        pod("db").v4.to_string(),
        pod("db").v6.to_string(),
        pod("oldb").v4.to_string(),
    );
    let at_resolver = format!("@{resolver}");
    let at_v6 = format!("@{}", c.net.v6("ctl"));
    let queries = c.dir.join("dnsmasq-queries.log");
    c.net.dnsmasq(
        "ctl",
        &resolver,
        &[
            format!("--address=/db.shop.svc.cluster.local/{db4}"),
            format!("--address=/legacy.partner.example/{oldb4}"),
            format!("--address=/attacker.example/{resolver}"),
        ],
        &queries,
        &c.dir.join("dnsmasq.log"),
    );
    c.net.eventually(
        Duration::from_secs(5),
        "dnsmasq answers an un-meshed pod",
        || {
            dig(
                c,
                "olda",
                &[&at_resolver, "+short", "db.shop.svc.cluster.local"],
            )
            .trim()
                == db4
        },
    );
    // kube-proxy's cluster DNS Service: 10.96.0.10 is DNATed to the resolver before Strait's prerouting
    // chain, so the proxy sees the resolver's address and its answer must be un-NATed on the way back.
    let dnat = format!("dnat to {resolver}");
    for cmd in [
        vec!["add", "table", "ip", "kube-proxy-dns"],
        vec![
            "add",
            "chain",
            "ip",
            "kube-proxy-dns",
            "pre",
            "{ type nat hook prerouting priority -100; }",
        ],
        vec![
            "add",
            "rule",
            "ip",
            "kube-proxy-dns",
            "pre",
            "ip",
            "daddr",
            "10.96.0.10",
            "meta",
            "l4proto",
            "{ udp, tcp }",
            "th",
            "dport",
            "53",
            "counter",
            &dnat,
        ],
    ] {
        let out = c
            .net
            .run("node1", None, &[&["nft"], cmd.as_slice()].concat());
        assert!(out.status.success(), "nft {cmd:?}: {}", text(&out));
    }
    // Cluster names: forwarded for any meshed pod, over UDP and TCP, over IPv4 and IPv6 (dnsmasq listens
    // on IPv4 only: the proxy asked it, not the pod), through the Service.
    for args in [
        vec![at_resolver.as_str(), "+short", "db.shop.svc.cluster.local"],
        vec![
            at_resolver.as_str(),
            "+tcp",
            "+short",
            "db.shop.svc.cluster.local",
        ],
        vec![at_v6.as_str(), "+short", "db.shop.svc.cluster.local"],
        vec!["@10.96.0.10", "+short", "db.shop.svc.cluster.local"],
        vec!["@10.96.0.10", "+tcp", "+short", "db.shop.svc.cluster.local"],
    ] {
        assert_eq!(dig(c, "web", &args).trim(), db4, "dig {args:?}");
    }
    // Mesh names: from the directory, whatever resolver was addressed (10.96.0.10 does not exist).
    assert_eq!(
        dig(
            c,
            "web",
            &["@10.96.0.10", "+short", "db.shop.strait.internal"]
        )
        .trim(),
        db4
    );
    assert_eq!(
        dig(
            c,
            "web",
            &[&at_v6, "+tcp", "+short", "AAAA", "db.shop.strait.internal"]
        )
        .trim(),
        db6
    );
    // A name no egress entry allows: REFUSED by the proxy, over UDP and TCP; dnsmasq never hears of it.
    for args in [
        vec![at_resolver.as_str(), "secret-data.attacker.example"],
        vec![at_resolver.as_str(), "+tcp", "secret-tcp.attacker.example"],
    ] {
        let refused = dig(c, "web", &args);
        assert!(refused.contains("status: REFUSED"), "{refused}");
    }
    // The entry's address is closed until web resolves the entry's name, then open on its port.
    let legacy = url("oldb", false, "/");
    assert_eq!(
        c.curl("web", &legacy, &[]),
        "000",
        "an address nobody resolved"
    );
    assert_eq!(
        dig(
            c,
            "web",
            &[&at_resolver, "+short", "legacy.partner.example"]
        )
        .trim(),
        oldb4
    );
    assert_eq!(
        c.curl("web", &legacy, &[]),
        "200",
        "resolved for an egress entry"
    );
    assert_eq!(
        c.curl("web", &url("olda", false, "/"), &[]),
        "000",
        "only the answer's address opened"
    );
    let seen = std::fs::read_to_string(&queries).unwrap_or_default();
    for never in ["attacker", "strait.internal"] {
        assert!(!seen.contains(never), "the resolver saw {never}:\n{seen}");
    }
    assert!(seen.contains("legacy.partner.example"), "{seen}");
    let m = text(&c.net.run(
        "node1",
        None,
        &["curl", "-s", "http://127.0.0.1:15000/metrics"],
    ));
    assert!(
        metric(&m, "strait_proxy_dns_queries_total", r#"outcome="refused""#) >= 2,
        "{m}"
    );
    let rules = c.nft("node1");
    assert!(rules.contains("tproxy ip to 127.0.0.1:15053"), "{rules}");
    assert!(rules.contains("tproxy ip6 to [::1]:15053"), "{rules}");
}

#[test]
fn pods_are_meshed_by_namespace_label_and_captured_with_tproxy() {
    if !require_root() {
        return;
    }
    support::require_commands(&["dig", "dnsmasq", "socat", "tcpdump"]);
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
        "not to the proxies' or the gateways' service account",
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
    c.start_proxies();
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
    // The egress entry names a name: oldb's address opens for web only once a resolver said so.
    c.apply_workflow(
        "- {from: web, to: db, methods: [POST], paths: [/api/db]}\negress:\n- {from: web, host: legacy.partner.example, port: 8080}",
    );

    // Pod to pod across nodes, IPv4 and IPv6, through mTLS; the policy is enforced per request.
    let wire = c.dir.join("node2.pcap");
    let tcpdump = c.net.capture("node2", &wire);
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
    dns_goes_through_the_node_proxy(&c);
    // No UDP but DNS leaves a meshed pod, and its DNS goes to the proxy, not to the port it addressed.
    for port in ["53", "54"] {
        c.net.spawn(
            "ctl",
            None,
            &[
                "socat",
                &format!(
                    "UDP6-LISTEN:{port},fork,reuseaddr,bind=[{}]",
                    c.net.v6("ctl")
                ),
                "EXEC:cat",
            ],
            &c.dir.join(format!("udp{port}.log")),
        );
    }
    let udp = |from: &str, port: &str| {
        let cmd = format!("echo ping | socat -t1 - UDP:[{}]:{port}", c.net.v6("ctl"));
        text(&c.net.run(from, None, &["sh", "-c", &cmd])).contains("ping")
    };
    c.net
        .eventually(Duration::from_secs(5), "an un-meshed pod's UDP", || {
            udp("olda", "54")
        });
    assert!(udp("olda", "53"), "an un-meshed pod's port 53 is untouched");
    assert!(!udp("web", "54"), "other UDP must not leave a meshed pod");
    assert!(
        !udp("web", "53"),
        "bytes that are not DNS never reach anything on port 53"
    );
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

    // --- A CA rotation step reaches the ConfigMap the DaemonSet mounts, at once. ---
    c.admin(&["ca", "rotation", "prepare"]);
    c.net.eventually(
        Duration::from_secs(10),
        "the ConfigMap holds both roots",
        || {
            c.api
                .configmap("strait-system", "strait-trust-bundle")
                .and_then(|d| d.get("bundle.pem").cloned())
                .is_some_and(|pem| pem.matches("BEGIN CERTIFICATE").count() == 2)
        },
    );

    // --- A restart finds the previous proxy's rules and route and replaces them without stacking. ---
    let i = c.proxies.iter().position(|(n, _)| *n == "node2").unwrap();
    let (_, p) = c.proxies.remove(i);
    c.net.signal(p, libc::SIGTERM);
    assert!(c.net.wait(p, Duration::from_secs(10)).is_some());
    let p = c.start_proxy("node2");
    c.proxies.push(("node2", p));
    c.net
        .eventually(Duration::from_secs(20), "node2 ready again", || {
            c.ready("node2")
        });

    // --- Shutdown leaves the rules and routes (a DaemonSet update fails closed); --uninstall removes
    // every rule and route the proxy installed. ---
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
        assert!(tables.contains("strait"), "{tables}");
        for family in ["-4", "-6"] {
            let rules = text(&c.net.run(node, None, &["ip", family, "rule"]));
            assert_eq!(rules.matches("0x5355").count(), 1, "{rules}");
        }
        let out = c
            .net
            .run(node, None, &[support::mesh::bin(), "node", "uninstall"]);
        assert!(out.status.success(), "{}", text(&out));
        let tables = text(&c.net.run(node, None, &["nft", "list", "tables"]));
        assert!(!tables.contains("strait"), "{tables}");
        let rules = text(&c.net.run(node, None, &["ip", "rule"]));
        assert!(!rules.contains("0x5355"), "{rules}");
    }
}
