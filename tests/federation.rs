//! Federation between organisations, control-plane side: three organisations, each with its own trust
//! domain, CA and control plane on its own host, exchange bundles through their bundle endpoints
//! (SPIFFE Federation, profile `https_spiffe`), with the real binary in network namespaces.
//!
//! | host | trust domain |
//! |---|---|
//! | owner | owner.example |
//! | vfx | vfx.example |
//! | color | color.example |

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use support::kube_api::{FakePod, FakeReview};
use support::kube_cluster::{self, Cluster};
use support::mesh::{
    bin, capture, contains, end_capture_with_plaintext_control, forge_cert, hold_tunnel, id,
    issue_cert, metric, pcap_summary, text, tunnel_sni, without_a_failed_request, Mesh, OWNER_UID,
    VFX_UID,
};
use support::{require_root, Netns, Proc};

struct Orgs {
    net: Netns,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Orgs {
    fn data(&self, org: &str) -> String {
        self.dir.join(org).to_string_lossy().into_owned()
    }

    fn start(&self, org: &str) -> Proc {
        let addr = format!("{}:15012", self.net.v4(org));
        let p = self.net.spawn(
            org,
            None,
            &[
                bin(),
                "control",
                "--data-dir",
                &self.data(org),
                "--listen",
                &addr,
            ],
            &self.dir.join(format!("{org}.log")),
        );
        self.net
            .eventually(Duration::from_secs(10), "control plane ready", || {
                text(&self.net.run(
                    org,
                    None,
                    &["curl", "-sk", &format!("https://{addr}/v1/ready")],
                ))
                .contains("ready")
            });
        p
    }

    /// `strait ARGS` as `org`'s administrator.
    fn admin(&self, org: &str, args: &[&str]) -> Output {
        let config = format!("STRAIT_CONFIG={}/admin.yaml", self.data(org));
        let mut all = vec!["env", config.as_str(), bin()];
        all.extend_from_slice(args);
        self.net.run(org, None, &all)
    }

    fn ok(&self, org: &str, args: &[&str]) -> String {
        let out = self.admin(org, args);
        assert!(
            out.status.success(),
            "strait {args:?} at {org}: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn refused(&self, org: &str, args: &[&str]) -> String {
        let out = self.admin(org, args);
        assert!(!out.status.success(), "strait {args:?} at {org} must fail");
        text(&out)
    }

    /// `strait federation bundle` at `org`: the file a partner is handed, and the fingerprint read out.
    fn bundle(&self, org: &str) -> (PathBuf, String) {
        let out = self.admin(org, &["federation", "bundle"]);
        assert!(out.status.success(), "{}", text(&out));
        let file = self.dir.join(format!("{org}-bundle.json"));
        std::fs::write(&file, &out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let fingerprint = stderr
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint: "))
            .unwrap_or_else(|| panic!("no fingerprint printed: {stderr}"))
            .trim()
            .to_owned();
        (file, fingerprint)
    }

    fn list(&self, org: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(org, &["federation", "list", "--output", "json"])).unwrap()
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn setup() -> Orgs {
    let net = Netns::new(&["owner", "vfx", "color"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let orgs = Orgs {
        net,
        _tmp: tmp,
        dir,
    };
    for org in ["owner", "vfx", "color"] {
        let out = std::process::Command::new(bin())
            .args(["control", "init", "--data-dir", &orgs.data(org)])
            .args(["--trust-domain", &format!("{org}.example")])
            .args(["--server", &format!("{}:15012", orgs.net.v4(org))])
            .output()
            .unwrap();
        assert!(out.status.success(), "init {org}: {}", text(&out));
    }
    orgs
}

#[test]
fn organisations_exchange_bundles_through_their_endpoints() {
    if !require_root() {
        return;
    }
    support::require_commands(&["curl", "openssl"]);
    let o = setup();
    let _owner = o.start("owner");
    let vfx = o.start("vfx");
    let _color = o.start("color");
    let vfx_endpoint = format!("{}:15012", o.net.v4("vfx"));

    // The endpoint as any SPIFFE consumer sees it: a JWK set over TLS whose server certificate is the
    // control plane's SVID.
    let served = text(&o.net.run(
        "owner",
        None,
        &[
            "curl",
            "-sk",
            &format!("https://{vfx_endpoint}/v1/federation/bundle"),
        ],
    ));
    let jwks: serde_json::Value = serde_json::from_str(&served).expect(&served);
    assert_eq!(jwks["keys"][0]["use"], "x509-svid", "{served}");
    assert_eq!(jwks["spiffe_refresh_hint"], 300);
    let first_sequence = jwks["spiffe_sequence"].as_u64().unwrap();
    let san = text(&o.net.run(
        "owner",
        None,
        &["bash", "-c", &format!(
            "openssl s_client -connect {vfx_endpoint} -alpn h2 </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName"
        )],
    ));
    assert!(
        san.contains("URI:spiffe://vfx.example/strait/control"),
        "{san}"
    );

    let (vfx_bundle, vfx_fp) = o.bundle("vfx");
    let (color_bundle, color_fp) = o.bundle("color");
    let add = |bundle: &PathBuf, extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "federation",
            "add",
            "--trust-domain",
            "vfx.example",
            "--endpoint",
            &vfx_endpoint,
            "--bootstrap-bundle",
            bundle.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // Refused, nothing stored: no fingerprint (it is printed for comparison), a wrong one, the bundle of
    // another organisation (vfx's endpoint does not chain to color's roots), the wrong endpoint ID, our
    // own trust domain.
    let a = add(&vfx_bundle, &[]);
    let out = o.refused("owner", &strs(&a));
    assert!(
        out.contains(&vfx_fp) && out.contains("--fingerprint"),
        "{out}"
    );
    let a = add(&vfx_bundle, &["--fingerprint", &color_fp]);
    let out = o.refused("owner", &strs(&a));
    assert!(out.contains("not the bundle"), "{out}");
    let a = add(&color_bundle, &["--fingerprint", &color_fp]);
    let out = o.refused("owner", &strs(&a));
    assert!(
        out.contains("nothing was added") && out.contains("not issued by a CA in the trust bundle"),
        "{out}"
    );
    let a = add(
        &vfx_bundle,
        &[
            "--fingerprint",
            &vfx_fp,
            "--endpoint-id",
            "spiffe://vfx.example/ns/x/sa/y",
        ],
    );
    let out = o.refused("owner", &strs(&a));
    assert!(
        out.contains("nothing was added") && out.contains("strait/control"),
        "{out}"
    );
    let out = o.refused(
        "owner",
        &[
            "federation",
            "add",
            "--trust-domain",
            "owner.example",
            "--endpoint",
            &vfx_endpoint,
            "--bootstrap-bundle",
            vfx_bundle.to_str().unwrap(),
            "--fingerprint",
            &vfx_fp,
        ],
    );
    assert!(out.contains("own trust domain"), "{out}");
    assert_eq!(o.list("owner")["partners"], serde_json::json!([]));

    // Added with the fingerprint read out (in the form people write it).
    let spaced = format!("sha256:{}", vfx_fp.to_uppercase());
    let a = add(&vfx_bundle, &["--fingerprint", &spaced]);
    let out = o.ok("owner", &strs(&a));
    assert!(out.contains("federation added"), "{out}");
    let list = o.list("owner");
    let vfx_entry = &list["partners"][0];
    assert_eq!(vfx_entry["trust_domain"], "vfx.example");
    assert_eq!(vfx_entry["sequence"].as_u64(), Some(first_sequence));
    assert_eq!(vfx_entry["fingerprint"], vfx_fp.as_str());
    assert_eq!(vfx_entry["roots"].as_array().unwrap().len(), 1);
    let old_root = vfx_entry["roots"][0]["sha256"].clone();
    let table = o.ok("owner", &["federation", "list"]);
    assert!(
        table.contains("vfx.example") && table.contains("ok"),
        "{table}"
    );

    // A root rotation at vfx: the next root is published (two roots, sequence + 1), then the old one is
    // withdrawn; each refresh replaces owner's copy whole (never merged).
    o.ok("vfx", &["ca", "rotation", "prepare"]);
    let out = o.ok("owner", &["federation", "refresh"]);
    assert!(out.contains("vfx.example"), "{out}");
    let entry = o.list("owner")["partners"][0].clone();
    assert_eq!(entry["sequence"].as_u64(), Some(first_sequence + 1));
    assert_eq!(entry["roots"].as_array().unwrap().len(), 2);
    o.ok("vfx", &["ca", "rotation", "activate", "--force"]);
    o.ok("vfx", &["ca", "rotation", "withdraw", "--force"]);
    o.ok(
        "owner",
        &["federation", "refresh", "--trust-domain", "vfx.example"],
    );
    let entry = o.list("owner")["partners"][0].clone();
    // The sequence moved on (the endpoint numbers each bundle it serves that differs from the last).
    assert!(
        entry["sequence"].as_u64() > Some(first_sequence + 1),
        "{entry}"
    );
    let roots = entry["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{entry}");
    assert_ne!(roots[0]["sha256"], old_root, "the withdrawn root is gone");
    // The refresh was authenticated by the bundle fetched before: the new root, never the bootstrap.
    assert_ne!(entry["fingerprint"], vfx_fp.as_str());

    // vfx's control plane goes away: the refresh fails, the last good bundle stays, the list says so.
    o.net.signal(vfx, libc::SIGTERM);
    o.net.wait(vfx, Duration::from_secs(10));
    let out = o.refused("owner", &["federation", "refresh"]);
    assert!(out.contains("last good bundle stays in force"), "{out}");
    let stale = o.list("owner")["partners"][0].clone();
    assert_eq!(stale["sequence"], entry["sequence"]);
    assert_eq!(stale["fingerprint"], entry["fingerprint"]);
    assert!(
        stale["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach")),
        "{stale}"
    );
    let table = o.ok("owner", &["federation", "list"]);
    assert!(table.contains("REFRESH FAILING"), "{table}");
    let _vfx = o.start("vfx");
    o.ok("owner", &["federation", "refresh"]);
    assert_eq!(
        o.list("owner")["partners"][0]["last_error"],
        serde_json::Value::Null
    );
    assert!(o.dir.join("owner.log").exists());
    let log = std::fs::read_to_string(o.dir.join("owner.log")).unwrap();
    assert!(log.contains("federated bundle refresh failed"), "{log}");
    assert!(log.contains("federated bundle changed"), "{log}");

    // Removed: forgotten.
    o.ok(
        "owner",
        &["federation", "remove", "--trust-domain", "vfx.example"],
    );
    assert_eq!(o.list("owner")["partners"], serde_json::json!([]));
    let out = o.refused(
        "owner",
        &["federation", "refresh", "--trust-domain", "vfx.example"],
    );
    assert!(out.contains("no federation with vfx.example"), "{out}");
}

/// A partner organisation's control plane on the mesh's outside host (its own trust domain and CA).
fn partner(m: &Mesh, td: &str, port: u16) -> (String, String) {
    let data = m.p(&format!("{td}-cp"));
    let addr = format!("{}:{port}", m.net.v4("out"));
    let out = std::process::Command::new(bin())
        .args([
            "control",
            "init",
            "--data-dir",
            data,
            "--trust-domain",
            td,
            "--server",
            &addr,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    m.net.spawn(
        "out",
        None,
        &[
            bin(),
            "control",
            "--data-dir",
            data,
            "--listen",
            &addr,
            "--monitoring",
            "off",
        ],
        &m.dir.join(format!("{td}-cp.log")),
    );
    let log = m.dir.join(format!("{td}-cp.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = text(&m.net.run(
            "out",
            None,
            &["curl", "-sk", &format!("https://{addr}/v1/ready")],
        ));
        if ready.contains("ready") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {td} control plane is not ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = format!("STRAIT_CONFIG={data}/admin.yaml");
    let out = m.net.run(
        "out",
        None,
        &["env", &config, bin(), "federation", "bundle"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let file = m.dir.join(format!("{td}.json"));
    std::fs::write(&file, &out.stdout).unwrap();
    let fingerprint = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: ").map(str::to_owned))
        .unwrap();
    (addr, fingerprint)
}

/// `strait federation add` of the partner `td` (started by [`partner`]) by the mesh's administrator.
fn add_partner(m: &Mesh, td: &str, addr: &str, fingerprint: &str) -> String {
    m.admin(&[
        "federation",
        "add",
        "--trust-domain",
        td,
        "--endpoint",
        addr,
        "--bootstrap-bundle",
        m.p(&format!("{td}.json")),
        "--fingerprint",
        fingerprint,
    ])
}

fn federated(m: &Mesh, host: &str) -> Vec<String> {
    m.config_dump(host)["trust_bundle"]["federated"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["trust_domain"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn proxies_verify_each_partner_against_its_own_roots_only() {
    if !require_root() {
        return;
    }
    support::require_commands(&["openssl"]);
    let m = Mesh::new("24h");
    m.start_proxy("a", &[]);
    m.start_proxy("b", &[]);
    m.converge();
    let (vfx_addr, vfx_fp) = partner(&m, "vfx.example", 15012);
    let (color_addr, color_fp) = partner(&m, "color.example", 15013);
    let vfx_ca = m.p("vfx.example-cp/ca").to_owned();
    let color_ca = m.p("color.example-cp/ca").to_owned();

    // Certificates as each partner's CA (or someone holding its key) could issue them.
    let vfx_own = issue_cert(
        &m,
        "vfx-own",
        &vfx_ca,
        "spiffe://vfx.example/ns/render/sa/vfx",
        "1h",
    );
    let vfx_as_ours = forge_cert(&m, "vfx-as-ours", &vfx_ca, &id("owner"));
    let vfx_as_color = forge_cert(
        &m,
        "vfx-as-color",
        &vfx_ca,
        "spiffe://color.example/ns/x/sa/y",
    );
    let color_own = issue_cert(
        &m,
        "color-own",
        &color_ca,
        "spiffe://color.example/ns/grade/sa/color",
        "1h",
    );

    // Presents a certificate to B's tunnel port as vfx's destination: whether the handshake passed (B counts
    // a refusal by its kind).
    let b_tunnel = format!("{}:15008", m.net.v4("b"));
    let sni = tunnel_sni(&id("vfx"));
    let errors = |kind: &str| {
        let all = m.metrics("b");
        all.lines()
            .filter(|l| {
                l.starts_with("strait_proxy_tls_handshake_errors_total") && l.contains(kind)
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let probe = |(crt, key): &(String, String), refused_as: Option<&str>| {
        let before = refused_as.map(errors);
        let total_before = errors("inbound");
        m.net.run("a", None, &["bash", "-c", &format!(
            "printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' | timeout 5 openssl s_client -connect {b_tunnel} -servername {sni} -alpn h2 -cert {crt} -key {key} -tls1_3 -quiet 2>&1; true"
        )]);
        match (refused_as, before) {
            (Some(kind), Some(before)) => assert!(
                errors(kind) > before,
                "{crt} must be refused as {kind}:\n{}",
                m.metrics("b")
            ),
            _ => assert_eq!(
                errors("inbound"),
                total_before,
                "{crt} must be accepted:\n{}",
                m.log("proxy-b.log")
            ),
        }
    };

    // Not federated yet: vfx's own identity is refused like any stranger's.
    probe(&vfx_own, Some("NotFederated"));

    // The owner federates with vfx: its proxies get vfx's roots with their next renewal.
    let added = add_partner(&m, "vfx.example", &vfx_addr, &vfx_fp);
    assert!(added.contains("federation added"), "{added}");
    m.net.eventually(
        Duration::from_secs(20),
        "both proxies hold vfx's roots",
        || federated(&m, "a") == ["vfx.example"] && federated(&m, "b") == ["vfx.example"],
    );
    assert!(m
        .log("proxy-b.log")
        .contains("the federated trust domains' bundles changed"));
    probe(&vfx_own, None);
    // vfx's CA cannot vouch for our identities, nor for a third organisation's.
    probe(&vfx_as_ours, Some("UnknownIssuer"));
    probe(&vfx_as_color, Some("NotFederated"));
    probe(&color_own, Some("NotFederated"));

    // With color federated too, color's identities pass on color's roots, and vfx's CA still cannot issue them.
    add_partner(&m, "color.example", &color_addr, &color_fp);
    m.net
        .eventually(Duration::from_secs(20), "B holds color's roots", || {
            federated(&m, "b").len() == 2
        });
    probe(&color_own, None);
    probe(&vfx_as_color, Some("UnknownIssuer"));

    // A tunnel vfx's identity holds open; ending the federation closes it, and vfx is refused again.
    let held = hold_tunnel(&m, "a", &b_tunnel, &sni, &vfx_own, "held.log");
    assert!(
        m.net.wait(held, Duration::from_millis(1500)).is_none(),
        "the tunnel is up"
    );
    m.admin(&["federation", "remove", "--trust-domain", "vfx.example"]);
    m.net
        .eventually(Duration::from_secs(20), "vfx's roots gone from B", || {
            federated(&m, "b") == ["color.example"]
        });
    assert!(
        m.net.wait(held, Duration::from_secs(10)).is_some(),
        "the tunnel vfx's roots verified is closed"
    );
    assert!(m
        .log("proxy-b.log")
        .contains("tunnel closed: its peer's certificate no longer verifies"));
    probe(&vfx_own, Some("NotFederated"));
    // The mesh's own traffic never noticed.
    assert_eq!(
        m.curl("a", Some(OWNER_UID), &m.vfx_url(false), &["-d", "x"]),
        "201"
    );
}

/// `strait ARGS` as the administrator of the partner `td` (whose control plane [`partner`] started on the
/// outside host); must succeed.
fn partner_admin(m: &Mesh, td: &str, args: &[&str]) -> String {
    let config = format!("STRAIT_CONFIG={}/admin.yaml", m.p(&format!("{td}-cp")));
    let mut all = vec!["env", config.as_str(), bin()];
    all.extend(args);
    let out = m.net.run("out", None, &all);
    assert!(
        out.status.success(),
        "{td}: strait {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node proxy of the partner `td` on the outside host, joined to the partner's control plane at
/// `cp` and taking its policy from it.
fn partner_proxy(m: &Mesh, td: &str, cp: &str) -> Proc {
    let token = partner_admin(m, td, &["node", "token", "create", "--node", "out-1"]);
    let (v4, v6) = (m.net.v4("out").to_string(), m.net.v6("out").to_string());
    let control = format!("https://{cp}");
    let p = m.net.spawn(
        "out",
        None,
        &[
            bin(),
            "proxy",
            "--control",
            &control,
            "--node",
            "out-1",
            "--token",
            token.trim(),
            "--data-dir",
            m.p(&format!("{td}-proxy")),
            "--address",
            &v4,
            "--address",
            &v6,
            "--drain-timeout",
            "3s",
        ],
        &m.dir.join(format!("{td}-proxy.log")),
    );
    m.net
        .eventually(Duration::from_secs(20), "the partner's proxy ready", || {
            text(
                &m.net
                    .run("out", None, &["curl", "-s", "http://127.0.0.1:15000/ready"]),
            )
            .starts_with("ready")
        });
    p
}

/// A workflow of `td` between example.org's `owner` and `ours` (the vfx workload on B) and
/// vfx.example's `render`, each side naming the other's by full SPIFFE ID: owner → render with `methods`
/// and render → ours with POST (`None`: no step).
fn cross_workflow(td: &str, methods: Option<&str>) -> String {
    let (owner, ours, render) = (
        id("owner"),
        id("vfx"),
        "spiffe://vfx.example/ns/render/sa/render",
    );
    let steps = match methods {
        Some(m) => format!(
            "steps:\n  - {{from: owner, to: render, methods: [{m}], paths: [\"/api/**\"]}}\n  - {{from: render, to: ours, methods: [POST], paths: [\"/api/**\"]}}\n"
        ),
        None => "steps: []\n".into(),
    };
    format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: film}}\ntrustDomain: {td}\nactors:\n  - {{name: owner, services: [{{name: owner, id: \"{owner}\"}}, {{name: ours, id: \"{ours}\"}}]}}\n  - {{name: vfx, services: [{{name: render, id: \"{render}\"}}]}}\n{steps}"
    )
}

#[test]
fn a_cross_organisation_step_needs_both_sides() {
    if !require_root() {
        return;
    }
    support::require_commands(&["socat", "tcpdump"]);
    // example.org (the owner: control plane on cp, proxies on a and b) and vfx.example (control plane and
    // one node on the outside host). Both proxies of example.org take their policy from its control plane.
    let m = Mesh::new("24h");
    let distributed = ["--decision-log-allow-sample", "0"];
    m.start_proxy("a", &distributed);
    m.start_proxy("b", &distributed);
    m.converge();
    let (vfx_addr, vfx_fp) = partner(&m, "vfx.example", 15012);
    let render = "spiffe://vfx.example/ns/render/sa/render";
    partner_admin(
        &m,
        "vfx.example",
        &[
            "workload",
            "add",
            "--id",
            render,
            "--node",
            "out-1",
            "--uid",
            "1002",
            "--port",
            "6000/http",
        ],
    );
    m.net.spawn(
        "out",
        Some(VFX_UID),
        &[
            bin(),
            "docstore",
            "--listen",
            "[::]:6000",
            "--name",
            "render",
        ],
        &m.dir.join("render.log"),
    );
    let _vfx_proxy = partner_proxy(&m, "vfx.example", &vfx_addr);
    let url = format!("http://{}:6000/api/render", m.net.v4("out"));
    let call = |data: &str| m.curl("a", Some(OWNER_UID), &url, &["-d", data]);

    // Federated both ways (each side adds the other), nothing exported yet: the owner's proxy does not
    // know the address, and refuses it as outside the mesh.
    add_partner(&m, "vfx.example", &vfx_addr, &vfx_fp);
    let own = m.admin_output(&["federation", "bundle"]);
    assert!(own.status.success(), "{}", text(&own));
    std::fs::write(m.dir.join("example.org.json"), &own.stdout).unwrap();
    let own_fp = String::from_utf8_lossy(&own.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: ").map(str::to_owned))
        .unwrap();
    let cp_addr = format!("{}:15012", m.net.v4("cp"));
    partner_admin(
        &m,
        "vfx.example",
        &[
            "federation",
            "add",
            "--trust-domain",
            "example.org",
            "--endpoint",
            &cp_addr,
            "--bootstrap-bundle",
            m.p("example.org.json"),
            "--fingerprint",
            &own_fp,
        ],
    );
    // A workflow may name a partner's service only once the partner is federated; both sides apply one.
    let wf = |name: &str, td: &str, methods: Option<&str>| {
        let f = m.dir.join(name);
        std::fs::write(&f, cross_workflow(td, methods)).unwrap();
        f.to_string_lossy().into_owned()
    };
    let apply_owner = |methods: Option<&str>| {
        let f = wf("owner-wf.yaml", "example.org", methods);
        m.admin(&["workflow", "apply", "-f", &f, "--wait", "20s"]);
    };
    let apply_vfx = |methods: Option<&str>| {
        let f = wf("vfx-wf.yaml", "vfx.example", methods);
        partner_admin(&m, "vfx.example", &["workflow", "apply", "-f", &f]);
    };
    let partner_metrics = || {
        text(&m.net.run(
            "out",
            None,
            &["curl", "-s", "http://127.0.0.1:15000/metrics"],
        ))
    };
    apply_owner(Some("POST"));
    apply_vfx(Some("POST"));
    assert_eq!(call("before the export"), "000");
    assert!(m
        .log("proxy-a.log")
        .contains("destination outside the mesh"));

    // vfx exports render to example.org; the owner's control plane fetches it (with its own SVID).
    let exported = partner_admin(
        &m,
        "vfx.example",
        &[
            "federation",
            "export",
            "--trust-domain",
            "example.org",
            "--workload",
            render,
        ],
    );
    assert!(
        exported.contains("exported to them: spiffe://vfx.example/ns/render/sa/render"),
        "{exported}"
    );
    let refreshed = m.admin(&["federation", "refresh", "--trust-domain", "vfx.example"]);
    assert!(
        refreshed.contains(&format!(
            "imported from them: {render} at {}",
            m.net.v4("out")
        )),
        "{refreshed}"
    );
    // Both consents: the request crosses, encrypted between the organisations.
    let pcap = m.dir.join("cross.pcap");
    let dump = capture(&m, "a", &pcap);
    let marker = "CROSS-ORG-SECRET-5d1e";
    m.net
        .eventually(Duration::from_secs(10), "owner → render allowed", || {
            call(marker) == "201"
        });
    let bytes = end_capture_with_plaintext_control(&m, dump, &pcap);
    let contains = |needle: &str| contains(&bytes, needle);
    assert!(
        !contains(marker),
        "the cross-organisation request left in plaintext: {}",
        pcap_summary(&pcap)
    );

    // vfx rotates its CA root with overlap while the owner calls render without pause: the owner's
    // proxies trust vfx's new root (fetched with a refresh) before vfx's proxies present certificates
    // from it; no request fails.
    let vfx_anchors = || {
        m.config_dump("a")["trust_bundle"]["federated"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["trust_domain"] == "vfx.example"))
            .and_then(|f| f["anchors"].as_u64())
            .unwrap_or(0)
    };
    without_a_failed_request(
        "a partner's root rotation (prepare, activate) under cross-organisation traffic",
        || call("rotation"),
        "201",
        || {
            let prepared = partner_admin(&m, "vfx.example", &["ca", "rotation", "prepare"]);
            assert!(prepared.contains("prepared"), "{prepared}");
            m.admin(&["federation", "refresh", "--trust-domain", "vfx.example"]);
            m.net.eventually(
                Duration::from_secs(20),
                "A trusts both of vfx's roots",
                || vfx_anchors() == 2,
            );
            let activated = partner_admin(&m, "vfx.example", &["ca", "rotation", "activate"]);
            assert!(activated.contains("retiring"), "{activated}");
            m.net.eventually(
                Duration::from_secs(20),
                "render's certificate re-issued by vfx's new root",
                || {
                    m.log("vfx.example-proxy.log")
                        .matches("workload certificate issued")
                        .count()
                        > 1
                },
            );
            std::thread::sleep(Duration::from_millis(500));
        },
    );
    // The old root withdrawn at vfx and gone from the owner's proxies with the next refresh: the tunnel
    // opened before the rotation (vfx's old-root certificate) is closed; new requests pass on new tunnels.
    partner_admin(
        &m,
        "vfx.example",
        &["ca", "rotation", "withdraw", "--force"],
    );
    m.admin(&["federation", "refresh", "--trust-domain", "vfx.example"]);
    m.net.eventually(
        Duration::from_secs(20),
        "A holds vfx's new root only",
        || vfx_anchors() == 1,
    );
    m.net.eventually(
        Duration::from_secs(10),
        "the tunnel the old root verified is closed",
        || {
            m.log("proxy-a.log")
                .contains("tunnel closed: its peer's certificate no longer verifies")
        },
    );
    assert_eq!(call("after the rotation"), "201");

    // The other way: example.org exports its workload on B to vfx.example; render calls it through
    // vfx's proxy and B's, decided by both workflows.
    m.admin(&[
        "federation",
        "export",
        "--trust-domain",
        "vfx.example",
        "--workload",
        &id("vfx"),
        "--port",
        "5000",
    ]);
    let imported = partner_admin(
        &m,
        "vfx.example",
        &["federation", "refresh", "--trust-domain", "example.org"],
    );
    assert!(
        imported.contains(&format!("imported from them: {}", id("vfx"))),
        "{imported}"
    );
    let back = |port: u16| {
        m.curl(
            "out",
            Some(VFX_UID),
            &format!("http://{}:{port}/api/vfx", m.net.v4("b")),
            &["-d", "from render"],
        )
    };
    m.net
        .eventually(Duration::from_secs(10), "render → ours allowed", || {
            back(5000) == "201"
        });
    // Port 5002 of the same workload was not exported: vfx's proxy has no route to it.
    assert_eq!(back(5002), "000");
    // Each side's status says where its cross-organisation steps stand.
    let status = m.admin(&["status"]);
    assert!(
        status.contains(&format!(
            "step {} → {render} (film): accepted by the partner",
            id("owner")
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "step {render} → {} (film): exported here",
            id("vfx")
        )),
        "{status}"
    );

    // The destination's organisation withdraws its consent (its workflow has no step now): refused
    // there, per request, with the decision's status; the source's status sees it as pending.
    apply_vfx(None);
    m.net.eventually(
        Duration::from_secs(10),
        "refused at the destination",
        || call("x") == "403",
    );
    let metrics = partner_metrics();
    assert!(
        metric(
            &metrics,
            "strait_proxy_refused_connections_total",
            "policy_denied"
        ) > 0,
        "{metrics}"
    );
    m.admin(&["federation", "refresh", "--trust-domain", "vfx.example"]);
    let status = m.admin(&["status"]);
    assert!(
        status.contains("pending: the partner's workflows lack this step"),
        "{status}"
    );
    apply_vfx(Some("POST"));
    m.net
        .eventually(Duration::from_secs(10), "allowed again", || {
            call("x") == "201"
        });

    // The source's organisation withdraws its step: refused at the source, before anything leaves.
    apply_owner(None);
    assert_eq!(call("x"), "000");
    assert!(m
        .log("proxy-a.log")
        .contains("no step of the policy lets this source reach that destination"));
    apply_owner(Some("POST"));
    m.net
        .eventually(Duration::from_secs(10), "allowed again", || {
            call("x") == "201"
        });

    // vfx withdraws the export: its proxy refuses the owner's next connection within a second, although
    // the owner's side still imports it (until its next fetch), and counts it; an idle connection the
    // owner holds open (which the HTTP layer would keep for 30 s) is closed with it.
    let held = m.net.spawn(
        "a",
        Some(OWNER_UID),
        &["socat", "-u", &format!("TCP:{}:6000", m.net.v4("out")), "-"],
        &m.dir.join("held-cross.log"),
    );
    assert!(
        m.net.wait(held, Duration::from_millis(1500)).is_none(),
        "the held connection is open"
    );
    let t = std::time::Instant::now();
    partner_admin(
        &m,
        "vfx.example",
        &[
            "federation",
            "unexport",
            "--trust-domain",
            "example.org",
            "--workload",
            render,
        ],
    );
    m.net
        .eventually(Duration::from_secs(5), "refused once unexported", || {
            // The destination proxy refuses the tunnel stream: the caller's connection is closed.
            call("x") == "000"
        });
    eprintln!("export withdrawn → refused: {:?}", t.elapsed());
    assert!(
        m.net.wait(held, Duration::from_secs(5)).is_some(),
        "the connection established before the withdrawal is closed"
    );
    assert!(m
        .log("vfx.example-proxy.log")
        .contains("partner's stream closed: the export it used was withdrawn"));
    assert!(m
        .log("vfx.example-proxy.log")
        .contains("the workload is not exported to the caller's trust domain"));
    let metrics = partner_metrics();
    assert!(
        metric(
            &metrics,
            "strait_proxy_refused_connections_total",
            "not_exported"
        ) > 0,
        "{metrics}"
    );
    // With its next periodic fetch of vfx's exports (every 15 s) the owner's side forgets the import:
    // refused before anything leaves.
    m.net
        .eventually(Duration::from_secs(40), "the import gone at A", || {
            !m.admin(&["federation", "list"])
                .contains("imported from them")
        });
    m.net
        .eventually(Duration::from_secs(10), "refused at A", || {
            call("x") == "000"
                && m.log("proxy-a.log")
                    .matches("destination outside the mesh")
                    .count()
                    > 1
        });

    // vfx's control plane cannot steer the owner's proxies: A restarted with vfx's genuinely signed
    // mesh version on its disk and vfx's control plane as its control address refuses both (the version
    // is not signed by example.org's distribution key; the server is not spiffe://example.org/strait/control)
    // and lets nothing through.
    let pa = m
        .proxies
        .lock()
        .unwrap()
        .iter()
        .find(|(h, _)| h == "a")
        .map(|(_, p)| *p)
        .unwrap();
    m.net.signal(pa, libc::SIGTERM);
    assert!(m.net.wait(pa, Duration::from_secs(10)).is_some());
    std::fs::copy(
        m.dir.join("vfx.example-proxy/mesh-version.json"),
        m.dir.join("proxy-a/mesh-version.json"),
    )
    .unwrap();
    let (v4, v6) = (m.net.v4("a").to_string(), m.net.v6("a").to_string());
    let steered = m.net.spawn(
        "a",
        None,
        &[
            bin(),
            "proxy",
            "--control",
            &format!("https://{vfx_addr}"),
            "--node",
            "host-a",
            "--data-dir",
            m.p("proxy-a"),
            "--address",
            &v4,
            "--address",
            &v6,
            "--decision-log-allow-sample",
            "0",
        ],
        &m.dir.join("proxy-a-steered.log"),
    );
    m.net.eventually(
        Duration::from_secs(15),
        "A refuses vfx's control plane",
        || {
            let log = m.log("proxy-a-steered.log");
            log.contains("persisted mesh version is refused")
                && log.contains("spiffe://vfx.example/strait/control")
        },
    );
    let ready = text(
        &m.net
            .run("a", None, &["curl", "-s", "http://127.0.0.1:15000/ready"]),
    );
    assert!(ready.contains("not ready: no mesh version"), "{ready}");
    assert_eq!(call("x"), "000");
    m.net.signal(steered, libc::SIGTERM);
    m.net.wait(steered, Duration::from_secs(10));

    // The owner's control plane never sees more of vfx's registry than the export, and a caller that is
    // not a partner's control plane gets nothing from the exports endpoint.
    let anon = text(&m.net.run(
        "a",
        None,
        &[
            "curl",
            "-sk",
            &format!("https://{vfx_addr}/v1/federation/exports"),
        ],
    ));
    assert!(anon.contains("unauthenticated"), "{anon}");

    // Ending the federation says which workflows still name the partner.
    let out = m.admin_output(&["federation", "remove", "--trust-domain", "vfx.example"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("workflows film still name services of vfx.example"),
        "{}",
        text(&out)
    );
}

/// `strait ARGS` as vfx.example's administrator, on the `vfx` host beside the Kubernetes cluster.
/// The gateways' service account in the test cluster.
const GATEWAY_SA: &str = "system:serviceaccount:strait-system:strait-gateway";

/// A Kubernetes join from host `from` as `node` with the service-account `token`, announcing
/// `gateway_address`; Err(message) when refused.
fn kube_join(
    c: &Cluster,
    from: &str,
    node: &str,
    token: &str,
    gateway_address: Option<&str>,
) -> Result<(), String> {
    let bundle_pem = std::fs::read_to_string(c.dir.join("bundle.pem")).unwrap();
    let control = format!("https://{}:15012", c.net.v4("ctl"));
    let node = strait_control::registry::NodeName::new(node).unwrap();
    let advert = strait_control::node::Advert {
        gateway_address: gateway_address.map(str::to_owned),
        ..Default::default()
    };
    kube_cluster::in_netns(&c.net.ns(from), || {
        let bundle = std::sync::Arc::new(
            strait_ca::TrustBundle::from_pem_self_described(&bundle_pem).unwrap(),
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(strait_control::node::join_kubernetes(
                &control, bundle, token, &node, advert,
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// A pod with the gateways' service account, controlled by ReplicaSet `rs`, and a token bound to it.
fn gateway_pod(c: &Cluster, name: &str, rs: &str, token: &str) {
    let ip = c.net.v4("gw").to_string();
    let mut pod = FakePod::running("strait-system", name, "node1", "strait-gateway", &[&ip]);
    pod.owners = vec![("ReplicaSet".into(), rs.into())];
    c.api.add_token(
        token,
        FakeReview {
            username: GATEWAY_SA.into(),
            ..kube_cluster::review(&pod)
        },
    );
    c.api.put_pod(pod);
}

/// The cluster's gateway in Kubernetes mode, on host `gw` (its pod, behind the LoadBalancer): forged
/// joins are refused, the real `strait gateway --mode kubernetes` joins as a pod of the Deployment
/// strait-gateway, vfx then imports `db` through it at a virtual address, and render reaches db there.
/// Returns db's URL for vfx (through the gateway).
fn kube_gateway(c: &mut Cluster, db: &str) -> String {
    let advertise = format!("{}:15009", c.net.v4("gw"));
    c.api.put_replicaset(
        "strait-system",
        "strait-gateway-6d5f8",
        Some(("Deployment", "strait-gateway")),
    );
    c.api.put_replicaset(
        "strait-system",
        "lookalike-7c9",
        Some(("Deployment", "lookalike")),
    );
    gateway_pod(
        c,
        "strait-gateway-6d5f8-x2k4q",
        "strait-gateway-6d5f8",
        "gw-token",
    );
    gateway_pod(c, "lookalike-7c9-abcde", "lookalike-7c9", "lookalike-token");
    // Names a ReplicaSet with the Deployment's prefix that the API server does not have.
    gateway_pod(
        c,
        "strait-gateway-0000-zzzzz",
        "strait-gateway-0000",
        "ghost-token",
    );
    for (what, node, token, announce, reason) in [
        (
            "the gateway's token claiming a node",
            "node1",
            "gw-token",
            Some(advertise.as_str()),
            "a gateway joins as node strait-gateway",
        ),
        (
            "the gateways' account in a pod of another Deployment",
            "strait-gateway",
            "lookalike-token",
            Some(advertise.as_str()),
            "is not a pod of the gateway Deployment strait-gateway",
        ),
        (
            "the gateways' account under a ReplicaSet the API does not know",
            "strait-gateway",
            "ghost-token",
            Some(advertise.as_str()),
            "ReplicaSet strait-system/strait-gateway-0000 cannot be read",
        ),
        (
            "a node proxy's token announcing a gateway address",
            "node1",
            "sa-token-node1",
            Some(advertise.as_str()),
            "announced a gateway address; refused",
        ),
    ] {
        let r = kube_join(c, "gw", node, token, announce);
        assert!(
            r.is_err(),
            "{what} must be refused\n{}",
            c.log("control.log")
        );
        assert!(
            c.log("control.log").contains(reason),
            "the control plane says why {what} was refused ({reason}):\n{}",
            c.log("control.log")
        );
    }

    // The real gateway, as the Deployment runs it.
    let token_file = c.dir.join("gateway.token");
    std::fs::write(&token_file, "gw-token").unwrap();
    let control = format!("https://{}:15012", c.net.v4("ctl"));
    let gateway = c.net.spawn(
        "gw",
        None,
        &[
            bin(),
            "gateway",
            "--mode",
            "kubernetes",
            "--node",
            "strait-gateway",
            "--control",
            &control,
            "--trust-bundle",
            &c.p("bundle.pem"),
            "--service-account-token-file",
            token_file.to_str().unwrap(),
            "--data-dir",
            &c.p("gateway-data"),
            "--listen",
            &advertise,
            "--advertise",
            &advertise,
        ],
        &c.dir.join("gateway.log"),
    );
    c.proxies.push(("gateway", gateway));
    c.net
        .eventually(Duration::from_secs(20), "the gateway pod ready", || {
            c.net
                .http_code("gw", None, "http://127.0.0.1:15000/ready", &[], 3)
                == "200"
        });
    let status = c.admin(&["status"]);
    assert!(
        status.contains(&format!("{advertise} (gateway)")),
        "the gateway is the cluster's, at the address partners dial: {status}"
    );
    // The export now names the gateway, not the pod: vfx imports db at a virtual address.
    let out = vfx_admin(
        c,
        &["federation", "refresh", "--trust-domain", "cluster.local"],
    );
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = listed
        .lines()
        .find(|l| l.contains(&format!("imported from them: {db} at ")))
        .unwrap_or_else(|| panic!("db imported: {listed}"));
    assert!(
        line.contains(&format!(
            "via gateway {advertise} (spiffe://cluster.local/node/strait-gateway)"
        )),
        "{line}"
    );
    let vip = line
        .split(" at ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_owned();
    assert!(vip.starts_with("240.240."), "{line}");
    assert!(
        !listed.contains(&kube_cluster::pod("db").v4.to_string()),
        "the pod's address is no longer told: {listed}"
    );
    // A connect() needs a route for the capture to see it (vfx's host has no default route).
    let route = c.net.run(
        "vfx",
        None,
        &["ip", "route", "add", "240.240.0.0/16", "dev", "e0"],
    );
    assert!(route.status.success(), "{}", text(&route));
    let url = format!("http://{vip}:8080/api/db");
    c.net.eventually(
        Duration::from_secs(20),
        "render → db through the cluster's gateway",
        || {
            c.net
                .http_code("vfx", Some(VFX_UID), &url, &["-d", "via the gateway"], 3)
                == "201"
        },
    );
    let metrics = text(&c.net.run(
        "gw",
        None,
        &["curl", "-s", "http://127.0.0.1:15000/metrics"],
    ));
    assert!(
        metric(
            &metrics,
            "strait_proxy_gateway_streams_total",
            "partner=\"vfx.example\""
        ) >= 1,
        "the gateway carried vfx's stream: {metrics}"
    );
    url
}

fn vfx_admin(c: &Cluster, args: &[&str]) -> Output {
    let config = format!("STRAIT_CONFIG={}/admin.yaml", c.p("vfx-cp"));
    let mut all = vec!["env", config.as_str(), bin()];
    all.extend_from_slice(args);
    c.net.run("vfx", None, &all)
}

/// `strait federation bundle` of an organisation: writes its bundle to `file`, returns its fingerprint.
fn own_bundle(out: Output, file: &std::path::Path) -> String {
    assert!(out.status.success(), "federation bundle: {}", text(&out));
    std::fs::write(file, &out.stdout).unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: ").map(str::to_owned))
        .expect("the bundle's fingerprint")
}

/// The workflow `film` of `td` between the cluster's pods (by namespace and service account) and vfx's
/// render: web → render (POST) and render → db (`to_db` methods).
fn kube_cross_workflow(td: &str, to_db: &str) -> String {
    let cluster = "spiffe://cluster.local/ns/shop/sa";
    format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: film}}\ntrustDomain: {td}\nactors:\n  - {{name: shop, services: [{{name: web, id: \"{cluster}/web\"}}, {{name: db, id: \"{cluster}/db\"}}]}}\n  - {{name: vfx, services: [{{name: render, id: \"spiffe://vfx.example/ns/render/sa/render\"}}]}}\nsteps:\n  - {{from: web, to: render, methods: [POST], paths: [\"/api/**\"]}}\n  - {{from: render, to: db, methods: [{to_db}], paths: [\"/api/**\"]}}\n"
    )
}

#[test]
fn a_kubernetes_cluster_federates_its_pods_by_namespace_and_service_account() {
    if !require_root() {
        return;
    }
    // cluster.local: the Kubernetes test cluster (its control plane follows the API server; pods web on
    // node1 and db on node2, meshed by their namespace's label). vfx.example: a VM organisation on the
    // host `vfx` beside it (control plane, one node proxy, the render workload), on the same network.
    // Host `gw` stands for the cluster's gateway pod behind its LoadBalancer (started late in the test).
    let mut c = kube_cluster::setup_with(&["vfx", "gw"]);
    c.start_proxies();
    let vfx = c.net.v4("vfx").to_string();
    let vfx_cp = format!("{vfx}:15012");
    let out = std::process::Command::new(bin())
        .args(["control", "init", "--data-dir", &c.p("vfx-cp")])
        .args(["--trust-domain", "vfx.example", "--server", &vfx_cp])
        .output()
        .unwrap();
    assert!(out.status.success(), "init: {}", text(&out));
    let _vfx_control = c.net.spawn(
        "vfx",
        None,
        &[
            bin(),
            "control",
            "--data-dir",
            &c.p("vfx-cp"),
            "--listen",
            &vfx_cp,
            "--monitoring",
            "off",
        ],
        &c.dir.join("vfx-cp.log"),
    );
    c.net
        .eventually(Duration::from_secs(10), "vfx's control plane ready", || {
            text(&c.net.run(
                "vfx",
                None,
                &["curl", "-sk", &format!("https://{vfx_cp}/v1/ready")],
            ))
            .contains("ready")
        });
    let vfx_ok = |args: &[&str]| {
        let out = vfx_admin(&c, args);
        assert!(out.status.success(), "vfx: strait {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let render = "spiffe://vfx.example/ns/render/sa/render";
    vfx_ok(&[
        "workload",
        "add",
        "--id",
        render,
        "--node",
        "vfx-1",
        "--uid",
        "1002",
        "--port",
        "6000/http",
    ]);
    c.net.spawn(
        "vfx",
        Some(VFX_UID),
        &[
            bin(),
            "docstore",
            "--listen",
            "[::]:6000",
            "--name",
            "render",
        ],
        &c.dir.join("render.log"),
    );
    let token = vfx_ok(&["node", "token", "create", "--node", "vfx-1"]);
    let vfx6 = c.net.v6("vfx").to_string();
    let control = format!("https://{vfx_cp}");
    let _vfx_proxy = c.net.spawn(
        "vfx",
        None,
        &[
            bin(),
            "proxy",
            "--control",
            &control,
            "--node",
            "vfx-1",
            "--token",
            token.trim(),
            "--data-dir",
            &c.p("vfx-proxy"),
            "--address",
            &vfx,
            "--address",
            &vfx6,
            "--drain-timeout",
            "2s",
        ],
        &c.dir.join("vfx-proxy.log"),
    );
    c.net
        .eventually(Duration::from_secs(20), "vfx's proxy ready", || {
            c.net
                .http_code("vfx", None, "http://127.0.0.1:15000/ready", &[], 3)
                == "200"
        });

    // Federated both ways, each side comparing the other's fingerprint.
    let ctl_env = format!("STRAIT_CONFIG={}/admin.yaml", c.p("ctl"));
    let cluster_fp = own_bundle(
        c.net.run(
            "ctl",
            None,
            &["env", &ctl_env, bin(), "federation", "bundle"],
        ),
        &c.dir.join("cluster.local.json"),
    );
    let vfx_fp = own_bundle(
        vfx_admin(&c, &["federation", "bundle"]),
        &c.dir.join("vfx.example.json"),
    );
    c.admin(&[
        "federation",
        "add",
        "--trust-domain",
        "vfx.example",
        "--endpoint",
        &vfx_cp,
        "--bootstrap-bundle",
        &c.p("vfx.example.json"),
        "--fingerprint",
        &vfx_fp,
    ]);
    let cluster_cp = format!("{}:15012", c.net.v4("ctl"));
    vfx_ok(&[
        "federation",
        "add",
        "--trust-domain",
        "cluster.local",
        "--endpoint",
        &cluster_cp,
        "--bootstrap-bundle",
        &c.p("cluster.local.json"),
        "--fingerprint",
        &cluster_fp,
    ]);

    // Exports: the cluster's db pod by its namespace and service account, on its port 8080 (a pod declares
    // no ports, so the export names them); vfx's render.
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    c.admin(&[
        "federation",
        "export",
        "--trust-domain",
        "vfx.example",
        "--workload",
        db,
        "--port",
        "8080",
    ]);
    vfx_ok(&[
        "federation",
        "export",
        "--trust-domain",
        "cluster.local",
        "--workload",
        render,
    ]);
    let wf = |name: &str, td: &str, to_db: &str| {
        let f = c.dir.join(name);
        std::fs::write(&f, kube_cross_workflow(td, to_db)).unwrap();
        f.to_string_lossy().into_owned()
    };
    c.admin(&[
        "workflow",
        "apply",
        "-f",
        &wf("cluster-wf.yaml", "cluster.local", "POST"),
        "--wait",
        "30s",
    ]);
    // vfx's own workflow allows render → db more than the cluster accepts (DELETE too).
    vfx_ok(&[
        "workflow",
        "apply",
        "-f",
        &wf("vfx-wf.yaml", "vfx.example", "POST, DELETE"),
        "--wait",
        "30s",
    ]);
    let imported = c.admin(&["federation", "refresh", "--trust-domain", "vfx.example"]);
    assert!(
        imported.contains(&format!("imported from them: {render} at {vfx}")),
        "{imported}"
    );
    let imported = vfx_ok(&["federation", "refresh", "--trust-domain", "cluster.local"]);
    let db_pod = kube_cluster::pod("db");
    assert!(
        imported.contains(&format!("imported from them: {db} at {}", db_pod.v4)),
        "{imported}"
    );

    // A pod calls the partner's workload, decided by both organisations.
    let render_url = format!("http://{vfx}:6000/api/render");
    c.net
        .eventually(Duration::from_secs(15), "web → render allowed", || {
            c.curl("web", &render_url, &["-d", "from the cluster"]) == "201"
        });
    // The partner's workload calls the exported pod: POST is in both workflows.
    let db_url = kube_cluster::url("db", false, "/api/db");
    let from_render = |extra: &[&str]| c.net.http_code("vfx", Some(VFX_UID), &db_url, extra, 3);
    c.net
        .eventually(Duration::from_secs(15), "render → db allowed", || {
            from_render(&["-d", "from vfx"]) == "201"
        });
    // DELETE: vfx's workflow lets it leave; the cluster has not accepted it, and node2's proxy refuses.
    assert_eq!(from_render(&["-X", "DELETE"]), "403");
    assert!(
        c.log("node2.log")
            .contains("spiffe://vfx.example/ns/render/sa/render"),
        "node2 logs the refused foreign caller"
    );
    // Another port of the exported pod, and a pod that was not exported: the partner's proxy has no
    // route to either (nothing else of the cluster is visible to vfx).
    let other_port = format!("http://{}:8081/api/x", db_pod.v4);
    assert_eq!(
        c.net.http_code("vfx", Some(VFX_UID), &other_port, &[], 3),
        "000"
    );
    let web_url = kube_cluster::url("web", false, "/api/x");
    assert_eq!(
        c.net.http_code("vfx", Some(VFX_UID), &web_url, &[], 3),
        "000"
    );
    assert!(c
        .log("vfx-proxy.log")
        .contains("destination outside the mesh"));

    let status = c.admin(&["status"]);
    assert!(status.contains("vfx.example"), "{status}");
    assert!(status.contains("accepted"), "{status}");

    // --- The cluster's gateway (deploy/kubernetes/gateway): a pod of the Deployment strait-gateway joins
    // with its service-account token, and from then on the export names it instead of the pod. ---
    let db_url = kube_gateway(&mut c, db);
    let from_render = |extra: &[&str]| c.net.http_code("vfx", Some(VFX_UID), &db_url, extra, 3);

    // The cluster withdraws the export: node2's proxy refuses render at once (the directory it enforces
    // no longer exports db), before vfx's next refresh removes the route there.
    let t0 = std::time::Instant::now();
    c.admin(&[
        "federation",
        "unexport",
        "--trust-domain",
        "vfx.example",
        "--workload",
        db,
    ]);
    c.net
        .eventually(Duration::from_secs(5), "render → db refused", || {
            from_render(&["-d", "after the unexport"]) != "201"
        });
    eprintln!("export withdrawn → refused in {:?}", t0.elapsed());
    // Through the gateway, the gateway is the first to refuse (its directory no longer exports db).
    assert!(
        c.log("gateway.log")
            .contains("a partner asked the gateway for a workload or port not exported to it"),
        "the gateway says why:\n{}",
        c.log("gateway.log")
    );
}

/// The workload of `org` in the three-organisation test: `spiffe://ORG.example/ns/film/sa/ORG`.
fn film_id(org: &str) -> String {
    format!("spiffe://{org}.example/ns/film/sa/{org}")
}

/// `org`'s own `film` workflow: every actor (of `actors`) by full SPIFFE ID, and only the steps that touch `org` (a step
/// needs a local end). Each step is (from, to, methods).
fn film_workflow(org: &str, actors: &[&str], steps: &[(&str, &str, &str)]) -> String {
    let actors: String = actors
        .iter()
        .map(|a| {
            format!(
                "  - {{name: {a}, services: [{{name: {a}, id: \"{}\"}}]}}\n",
                film_id(a)
            )
        })
        .collect();
    let steps: String = steps
        .iter()
        .filter(|(from, to, _)| *from == org || *to == org)
        .map(|(from, to, methods)| {
            format!("  - {{from: {from}, to: {to}, methods: [{methods}], paths: [\"/api/**\"]}}\n")
        })
        .collect();
    format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: film}}\ntrustDomain: {org}.example\nactors:\n{actors}steps:\n{steps}"
    )
}

#[test]
fn three_organisations_carry_a_film_workflow_with_each_others_consent() {
    if !require_root() {
        return;
    }
    support::require_commands(&["curl", "tcpdump"]);
    // Three organisations, each on its own host with its own control plane, CA, node proxy and one
    // workload; the part of the film workflow that crosses them: owner → vfx → color → owner.
    let orgs = ["owner", "vfx", "color"];
    let o = setup();
    let _cps: Vec<_> = orgs.iter().map(|org| o.start(org)).collect();
    let endpoint = |org: &str| format!("{}:15012", o.net.v4(org));
    for org in orgs {
        for partner in orgs.iter().filter(|p| **p != org) {
            let (file, fingerprint) = o.bundle(partner);
            o.ok(
                org,
                &[
                    "federation",
                    "add",
                    "--trust-domain",
                    &format!("{partner}.example"),
                    "--endpoint",
                    &endpoint(partner),
                    "--bootstrap-bundle",
                    file.to_str().unwrap(),
                    "--fingerprint",
                    &fingerprint,
                ],
            );
        }
    }
    let uid = |org: &str| match org {
        "owner" => 1001,
        "vfx" => 1002,
        _ => 1004,
    };
    let mut proxies = Vec::new();
    for org in orgs {
        let node = format!("{org}-1");
        o.ok(
            org,
            &[
                "workload",
                "add",
                "--id",
                &film_id(org),
                "--node",
                &node,
                "--uid",
                &uid(org).to_string(),
                "--port",
                "7000/http",
            ],
        );
        o.net.spawn(
            org,
            Some(uid(org)),
            &[bin(), "docstore", "--listen", "[::]:7000", "--name", org],
            &o.dir.join(format!("{org}-docstore.log")),
        );
        let token = o.ok(org, &["node", "token", "create", "--node", &node]);
        let (v4, v6) = (o.net.v4(org).to_string(), o.net.v6(org).to_string());
        let data = o.dir.join(format!("{org}-proxy"));
        proxies.push(o.net.spawn(
            org,
            None,
            &[
                bin(),
                "proxy",
                "--control",
                &format!("https://{}", endpoint(org)),
                "--node",
                &node,
                "--token",
                token.trim(),
                "--data-dir",
                data.to_str().unwrap(),
                "--address",
                &v4,
                "--address",
                &v6,
                "--decision-log-allow-sample",
                "1",
            ],
            &o.dir.join(format!("{org}-proxy.log")),
        ));
    }
    for org in orgs {
        o.net
            .eventually(Duration::from_secs(20), "the proxy ready", || {
                text(
                    &o.net
                        .run(org, None, &["curl", "-s", "http://127.0.0.1:15000/ready"]),
                )
                .starts_with("ready")
            });
    }

    // Each organisation exports its workload to the one organisation that calls it, and applies the
    // steps that touch it. vfx would also send PUT to color; color accepts POST only.
    for (org, to) in [("vfx", "owner"), ("color", "vfx"), ("owner", "color")] {
        o.ok(
            org,
            &[
                "federation",
                "export",
                "--trust-domain",
                &format!("{to}.example"),
                "--workload",
                &film_id(org),
            ],
        );
    }
    let steps_of = |org: &str| -> Vec<(&str, &str, &str)> {
        let vfx_to_color = if org == "vfx" { "POST, PUT" } else { "POST" };
        vec![
            ("owner", "vfx", "POST"),
            ("vfx", "color", vfx_to_color),
            ("color", "owner", "POST"),
        ]
    };
    for org in orgs {
        let file = o.dir.join(format!("{org}-film.yaml"));
        std::fs::write(&file, film_workflow(org, &orgs, &steps_of(org))).unwrap();
        o.ok(
            org,
            &[
                "workflow",
                "apply",
                "-f",
                file.to_str().unwrap(),
                "--wait",
                "20s",
            ],
        );
    }
    for org in orgs {
        o.ok(org, &["federation", "refresh"]);
    }

    let call = |from: &str, to: &str, method: &str, body: &str| {
        o.net.http_code(
            from,
            Some(uid(from)),
            &format!("http://{}:7000/api/{to}", o.net.v4(to)),
            &["-X", method, "-d", body],
            5,
        )
    };
    // Every step of the cycle, per request, encrypted on every link it crosses.
    let marker = "FILM-3ORG-SECRET-93c4";
    let pcaps: Vec<_> = orgs
        .iter()
        .map(|org| {
            let file = o.dir.join(format!("{org}.pcap"));
            (o.net.capture(org, &file), file)
        })
        .collect();
    for (from, to) in [("owner", "vfx"), ("vfx", "color"), ("color", "owner")] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while call(from, to, "POST", marker) != "201" {
            if std::time::Instant::now() > deadline {
                for log in [
                    format!("{from}-proxy.log"),
                    format!("{to}-proxy.log"),
                    format!("{from}.log"),
                ] {
                    let text = std::fs::read_to_string(o.dir.join(&log)).unwrap_or_default();
                    let tail: Vec<_> = text.lines().rev().take(25).collect();
                    eprintln!("--- {log} (last lines, newest first)\n{}", tail.join("\n"));
                }
                panic!("{from} → {to} is not allowed by both organisations");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for (dump, file) in pcaps {
        o.net.signal(dump, libc::SIGINT);
        o.net.wait(dump, Duration::from_secs(5));
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            bytes.len() > 1000,
            "the capture at {} saw the traffic",
            file.display()
        );
        assert!(
            !contains(&bytes, marker),
            "the marker crossed {} in plaintext",
            file.display()
        );
    }
    // The destination's decision names the real source, an identity of another organisation.
    let decided = |org: &str, needles: &[&str]| {
        std::fs::read_to_string(o.dir.join(format!("{org}-proxy.log")))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("strait::decision") && needles.iter().all(|n| l.contains(n)))
    };
    assert!(decided("vfx", &[&film_id("owner"), "/api/vfx"]));

    // Refused, each by the organisation that lacks the consent:
    // vfx allows PUT to color, color does not accept it: refused at color's proxy, per request.
    assert_eq!(call("vfx", "color", "PUT", "x"), "403");
    assert!(
        decided(
            "color",
            &[&film_id("vfx"), "\"method\":\"PUT\"", "\"allowed\":false"]
        ),
        "color's decision log shows the refused PUT"
    );
    // Steps outside the cycle, none exported to its caller and none in the caller's workflow: refused at
    // the source proxy, before anything leaves (owner → color, the cycle backwards color → vfx, and
    // vfx → owner), each logged there; the allowed step from the same source still passes afterwards.
    let outside = |org: &str| {
        std::fs::read_to_string(o.dir.join(format!("{org}-proxy.log")))
            .unwrap_or_default()
            .matches("destination outside the mesh")
            .count()
    };
    for (from, to, allowed) in [
        ("owner", "color", "vfx"),
        ("color", "vfx", "owner"),
        ("vfx", "owner", "color"),
    ] {
        let before = outside(from);
        assert_eq!(call(from, to, "POST", "x"), "000", "{from} → {to}");
        o.net.eventually(
            Duration::from_secs(5),
            "the refusal logged at the source",
            || outside(from) > before,
        );
        assert_eq!(
            call(from, allowed, "POST", "x"),
            "201",
            "{from} → {allowed}"
        );
    }

    // Each organisation's status shows its steps as the partner sees them.
    let status = o.ok("vfx", &["status"]);
    assert!(
        status.contains(&format!(
            "step {} → {} (film): accepted by the partner",
            film_id("vfx"),
            film_id("color")
        )),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "step {} → {} (film): exported here",
            film_id("owner"),
            film_id("vfx")
        )),
        "{status}"
    );
}

/// Puts `host` on a private network behind the organisation's border host `border`, at 10.9.0.2: the
/// same address in every organisation (their ranges overlap). It reaches the outside only through
/// `border`, which masquerades it, as an organisation's NAT does; nothing outside can route to it.
fn behind(o: &mut Orgs, border: &str, host: &str) {
    o.net.add_pod(
        border,
        host,
        PRIVATE.parse().unwrap(),
        "fd09::2".parse().unwrap(),
    );
    let rules = o.dir.join(format!("{border}-nat.nft"));
    std::fs::write(
        &rules,
        "table ip border_nat {\n  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr 10.9.0.0/24 oifname \"e0\" masquerade\n  }\n}\n",
    )
    .unwrap();
    let out = o
        .net
        .run(border, None, &["nft", "-f", rules.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// owner turns egress on (`strait federation egress on`) with a gateway on its border: its proxy's
/// connections to vfx leave through that gateway, and still pass once the border drops everything its
/// private network sends out directly; the egress gateway relays only to where a partner's import is
/// reached; with the gateway gone, owner's proxy refuses rather than dialling directly. Egress is off
/// again at the end. `call` sends one request from owner's workload to vfx's; `vfx_gw` is vfx's first
/// gateway.
fn egress_through_owners_gateway(
    o: &Orgs,
    call: &dyn Fn(&Orgs, &str) -> String,
    owner_cert: &(String, String),
    vfx_gw: &str,
) {
    let owner_gw = format!("{}:15009", o.net.v4("owner"));
    let token = o.ok(
        "owner",
        &[
            "node",
            "token",
            "create",
            "--node",
            "owner-gw1",
            "--gateway",
        ],
    );
    let egress_gw = o.net.spawn(
        "owner",
        None,
        &[
            bin(),
            "gateway",
            "--control",
            &format!("https://{}:15012", o.net.v4("owner")),
            "--node",
            "owner-gw1",
            "--token",
            token.trim(),
            "--data-dir",
            o.dir.join("owner-gw1").to_str().unwrap(),
            "--listen",
            &owner_gw,
            "--advertise",
            &owner_gw,
            "--admin",
            "127.0.0.1:15104",
        ],
        &o.dir.join("owner-gw1.log"),
    );
    let egress_metrics = || {
        text(&o.net.run(
            "owner",
            None,
            &["curl", "-s", "http://127.0.0.1:15104/metrics"],
        ))
    };
    o.net
        .eventually(Duration::from_secs(20), "owner's gateway ready", || {
            egress_metrics().contains("strait_proxy_")
        });
    let said = o.ok("owner", &["federation", "egress", "on"]);
    assert!(said.contains("1 gateway(s)"), "{said}");
    assert!(o
        .ok("owner", &["federation", "list"])
        .contains("leave through this organisation's gateways"));
    let egress_streams = || {
        metric(
            &egress_metrics(),
            "strait_proxy_gateway_streams_total",
            "way=\"egress\",partner=\"vfx.example\"",
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(call(o, "via egress") == "201" && egress_streams() >= 1) {
        if std::time::Instant::now() > deadline {
            for log in ["owner-proxy.log", "owner-gw1.log"] {
                let text = std::fs::read_to_string(o.dir.join(log)).unwrap_or_default();
                let tail: Vec<_> = text.lines().rev().take(30).collect();
                eprintln!("--- {log} (last lines, newest first)\n{}", tail.join("\n"));
            }
            panic!("owner → vfx does not pass through owner's egress gateway");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // owner's border now drops whatever its private network sends out directly: only the gateway (on
    // the border itself) reaches partners, and the requests still pass.
    let fw = o.dir.join("owner-egress-fw.nft");
    std::fs::write(
        &fw,
        "table ip owner_egress_fw {\n  chain leave {\n    type filter hook forward priority filter; policy accept;\n    ip saddr 10.9.0.0/24 oifname \"e0\" counter drop\n  }\n}\n",
    )
    .unwrap();
    let out = o
        .net
        .run("owner", None, &["nft", "-f", fw.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    for i in 0..5 {
        assert_eq!(
            call(o, "x"),
            "201",
            "request {i} with direct egress dropped"
        );
    }
    // The control: the same host, outside the mesh (root is not captured), cannot reach vfx directly.
    assert_eq!(
        o.net
            .http_code("own1", None, &format!("http://{vfx_gw}/"), &[], 2),
        "000"
    );
    let rules = text(&o.net.run(
        "owner",
        None,
        &["nft", "list", "table", "ip", "owner_egress_fw"],
    ));
    assert!(
        !rules.contains("packets 0 "),
        "the border dropped the direct attempt: {rules}"
    );
    let log = std::fs::read_to_string(o.dir.join("owner-gw1.log")).unwrap();
    assert!(
        log.contains("egress stream opened") && log.contains(&film_id("owner")),
        "the egress gateway names who called which partner: {log}"
    );
    // A plain egress rule covering vfx's gateway does not open a way around the egress gateway.
    let film = o.dir.join("owner-film.yaml");
    let mut yaml = std::fs::read_to_string(&film).unwrap();
    let vfx_ip = vfx_gw.split(':').next().unwrap();
    yaml.push_str(&format!(
        "egress:\n  - {{from: owner, cidr: {vfx_ip}/32, port: 15009}}\n"
    ));
    std::fs::write(&film, yaml).unwrap();
    o.ok(
        "owner",
        &[
            "workflow",
            "apply",
            "-f",
            film.to_str().unwrap(),
            "--wait",
            "20s",
        ],
    );
    assert_eq!(
        o.net
            .http_code("own1", Some(1001), &format!("http://{vfx_gw}/"), &[], 2),
        "000"
    );
    let log = std::fs::read_to_string(o.dir.join("owner-proxy.log")).unwrap();
    assert!(
        log.contains("a partner's address outside a tunnel while egress goes through the gateways"),
        "{log}"
    );
    // No open relay outwards: only addresses where a partner's import is reached.
    let own = "spiffe://owner.example/node/owner-gw1";
    assert_eq!(
        ask_gateway_named(o, "owner", &owner_gw, own, owner_cert, vfx_gw),
        "200",
        "the control: vfx's gateway is where owner's import is reached"
    );
    for target in [
        format!("{}:15012", o.net.v4("vfx")),
        format!("{}:22", o.net.v4("vfx")),
        "vfx.example:15009".to_owned(),
    ] {
        let answer = ask_gateway_named(o, "owner", &owner_gw, own, owner_cert, &target);
        assert!(answer == "403" || answer == "400", "{target}: {answer}");
    }
    // Fail closed: with the firewall gone and the egress gateway killed, owner's proxy refuses rather
    // than dialling vfx itself.
    let out = o.net.run(
        "owner",
        None,
        &["nft", "delete", "table", "ip", "owner_egress_fw"],
    );
    assert!(out.status.success(), "{}", text(&out));
    o.net.signal(egress_gw, libc::SIGKILL);
    o.net.wait(egress_gw, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        call(o, "x"),
        "000",
        "no egress gateway: refused, not direct"
    );
    let log = std::fs::read_to_string(o.dir.join("owner-proxy.log")).unwrap();
    assert!(log.contains("egress gateway unusable"), "{log}");
    // Off again: owner's proxy dials vfx's gateways itself.
    o.ok("owner", &["federation", "egress", "off"]);
    o.net.eventually(
        Duration::from_secs(20),
        "owner → vfx direct again",
        || call(o, "direct") == "201",
    );
}

/// Each organisation's node on its private network (short: interface names are made from it).
fn node_of(org: &str) -> String {
    format!("{}1", &org[..3])
}

/// Each organisation's private host address (see [`behind`]).
const PRIVATE: &str = "10.9.0.2";

/// The HTTP/2 CONNECT an attacker holding `cert` sends to vfx's first gateway at `gateway` (asking for
/// its name) for `authority` (tests/apps/h2_connect.py, the `h2` library), from `from`: the status,
/// "reset", "closed" or "tls: …".
fn ask_gateway(
    o: &Orgs,
    from: &str,
    gateway: &str,
    cert: &(String, String),
    authority: &str,
) -> String {
    ask_gateway_named(
        o,
        from,
        gateway,
        "spiffe://vfx.example/node/vfx-gw1",
        cert,
        authority,
    )
}

/// [`ask_gateway`] of the gateway whose node identity is `id`.
fn ask_gateway_named(
    o: &Orgs,
    from: &str,
    gateway: &str,
    id: &str,
    cert: &(String, String),
    authority: &str,
) -> String {
    let script = format!("{}/h2_connect.py", support::apps());
    let out = o.net.run(
        from,
        None,
        &[
            &support::python(),
            &script,
            gateway,
            &tunnel_sni(id),
            &cert.0,
            &cert.1,
            authority,
        ],
    );
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!answer.is_empty(), "h2_connect.py: {}", text(&out));
    answer
}

#[test]
fn organisations_on_separate_networks_meet_only_through_gateways() {
    if !require_root() {
        return;
    }
    support::require_commands(&["curl", "tcpdump", "openssl", "nft"]);
    // owner and vfx each have a border host on the shared "internet" (10.77.0.0/24: the control plane,
    // and vfx's two gateways) and one node on a private network behind it, both at 10.9.0.2. owner's
    // workload calls vfx's through vfx's gateway only.
    let mut o = setup();
    let orgs = ["owner", "vfx"];
    let _cps: Vec<_> = orgs.iter().map(|org| o.start(org)).collect();
    let endpoint = |o: &Orgs, org: &str| format!("{}:15012", o.net.v4(org));
    for (org, partner) in [("owner", "vfx"), ("vfx", "owner")] {
        let (file, fingerprint) = o.bundle(partner);
        o.ok(
            org,
            &[
                "federation",
                "add",
                "--trust-domain",
                &format!("{partner}.example"),
                "--endpoint",
                &endpoint(&o, partner),
                "--bootstrap-bundle",
                file.to_str().unwrap(),
                "--fingerprint",
                &fingerprint,
            ],
        );
    }
    for org in orgs {
        behind(&mut o, org, &node_of(org));
    }
    let uid = |org: &str| if org == "owner" { 1001 } else { 1002 };
    let secret = "spiffe://vfx.example/ns/film/sa/secret";
    o.ok(
        "vfx",
        &[
            "workload",
            "add",
            "--id",
            secret,
            "--node",
            "vfx1",
            "--uid",
            "1003",
            "--port",
            "7001/http",
        ],
    );
    let mut procs = Vec::new();
    for org in orgs {
        let node = node_of(org);
        o.ok(
            org,
            &[
                "workload",
                "add",
                "--id",
                &film_id(org),
                "--node",
                &node,
                "--uid",
                &uid(org).to_string(),
                "--port",
                "7000/http",
            ],
        );
        procs.push(o.net.spawn(
            &node,
            Some(uid(org)),
            &[bin(), "docstore", "--listen", "[::]:7000", "--name", org],
            &o.dir.join(format!("{org}-docstore.log")),
        ));
        let token = o.ok(org, &["node", "token", "create", "--node", &node]);
        let data = o.dir.join(format!("{org}-proxy"));
        procs.push(o.net.spawn(
            &node,
            None,
            &[
                bin(),
                "proxy",
                "--control",
                &format!("https://{}", endpoint(&o, org)),
                "--node",
                &node,
                "--token",
                token.trim(),
                "--data-dir",
                data.to_str().unwrap(),
                "--address",
                PRIVATE,
                "--decision-log-allow-sample",
                "1",
            ],
            &o.dir.join(format!("{org}-proxy.log")),
        ));
    }
    // vfx's two gateway replicas on its border host, each with its own port and admin port.
    let vfx = o.net.v4("vfx");
    let gateway = |o: &Orgs, n: u16| {
        let name = format!("vfx-gw{n}");
        let token = o.ok(
            "vfx",
            &["node", "token", "create", "--node", &name, "--gateway"],
        );
        let data = o.dir.join(&name);
        let addr = format!("{vfx}:{}", 15008 + n);
        o.net.spawn(
            "vfx",
            None,
            &[
                bin(),
                "gateway",
                "--control",
                &format!("https://{}", endpoint(o, "vfx")),
                "--node",
                &name,
                "--token",
                token.trim(),
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &addr,
                "--advertise",
                &addr,
                "--admin",
                &format!("127.0.0.1:{}", 15100 + n),
            ],
            &o.dir.join(format!("{name}.log")),
        )
    };
    let gw1 = gateway(&o, 1);
    let gw2 = gateway(&o, 2);
    // Only a node the operator made a gateway can be one: with a node proxy's token, `strait gateway` is
    // refused at its join (a node that could announce itself would pull every partner's tunnels through it).
    let token = o.ok("vfx", &["node", "token", "create", "--node", "vfx-rogue"]);
    let rogue_log = o.dir.join("vfx-rogue.log");
    let rogue = o.net.spawn(
        "vfx",
        None,
        &[
            bin(),
            "gateway",
            "--control",
            &format!("https://{}", endpoint(&o, "vfx")),
            "--node",
            "vfx-rogue",
            "--token",
            token.trim(),
            "--data-dir",
            o.dir.join("vfx-rogue").to_str().unwrap(),
            "--listen",
            &format!("{vfx}:15011"),
            "--advertise",
            &format!("{vfx}:15011"),
            "--admin",
            "127.0.0.1:15103",
        ],
        &rogue_log,
    );
    let exit = o.net.wait(rogue, Duration::from_secs(20));
    assert!(exit.is_some_and(|e| !e.success()), "{exit:?}");
    let said = std::fs::read_to_string(&rogue_log).unwrap();
    assert!(said.contains("did not join as a gateway"), "{said}");
    let ready = |o: &Orgs, host: &str, admin: &str| {
        o.net
            .eventually(Duration::from_secs(20), &format!("{host} ready"), || {
                text(&o.net.run(
                    host,
                    None,
                    &["curl", "-s", &format!("http://{admin}/ready")],
                ))
                .starts_with("ready")
            })
    };
    ready(&o, "own1", "127.0.0.1:15000");
    ready(&o, "vfx1", "127.0.0.1:15000");
    ready(&o, "vfx", "127.0.0.1:15101");
    ready(&o, "vfx", "127.0.0.1:15102");

    o.ok(
        "vfx",
        &[
            "federation",
            "export",
            "--trust-domain",
            "owner.example",
            "--workload",
            &film_id("vfx"),
        ],
    );
    for org in orgs {
        let file = o.dir.join(format!("{org}-film.yaml"));
        std::fs::write(
            &file,
            film_workflow(org, &orgs, &[("owner", "vfx", "POST")]),
        )
        .unwrap();
        o.ok(
            org,
            &[
                "workflow",
                "apply",
                "-f",
                file.to_str().unwrap(),
                "--wait",
                "20s",
            ],
        );
    }
    o.ok("owner", &["federation", "refresh"]);
    // owner imports vfx's workload at a virtual address of its own, through both gateways; vfx's private
    // address is nowhere in what owner was told.
    let listed = o.ok("owner", &["federation", "list"]);
    let line = listed
        .lines()
        .find(|l| l.contains(&format!("imported from them: {} at ", film_id("vfx"))))
        .unwrap_or_else(|| panic!("vfx's workload imported: {listed}"));
    let vip = line
        .split(" at ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_owned();
    assert!(vip.starts_with("240.240."), "{line}");
    for g in [format!("{vfx}:15009"), format!("{vfx}:15010")] {
        assert!(line.contains(&g), "both gateways are named: {line}");
    }
    assert!(!listed.contains(PRIVATE), "{listed}");

    let call = |o: &Orgs, body: &str| {
        o.net.http_code(
            "own1",
            Some(uid("owner")),
            &format!("http://{vip}:7000/api/vfx"),
            &["-X", "POST", "-d", body],
            5,
        )
    };
    // Encrypted end to end through the gateway: captures on vfx's internet link and on every interface
    // of the gateways' host (its private side included) never see the marker.
    let marker = "GATEWAY-MARKER-5d1e";
    let wan = o.dir.join("vfx-wan.pcap");
    let wan_dump = o.net.capture("vfx", &wan);
    let at_gw = o.dir.join("vfx-gateway-host.pcap");
    let gw_log = o.dir.join("vfx-gateway-host.pcap.log");
    let gw_dump = o.net.spawn(
        "vfx",
        None,
        &[
            "tcpdump",
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            "any",
            "-U",
            "-s",
            "0",
            "-w",
            at_gw.to_str().unwrap(),
        ],
        &gw_log,
    );
    o.net
        .eventually(Duration::from_secs(10), "tcpdump at the gateway", || {
            std::fs::read_to_string(&gw_log).is_ok_and(|l| l.contains("listening on"))
        });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while call(&o, marker) != "201" {
        if std::time::Instant::now() > deadline {
            for log in [
                "owner-proxy.log",
                "vfx-proxy.log",
                "vfx-gw1.log",
                "vfx-gw2.log",
            ] {
                let text = std::fs::read_to_string(o.dir.join(log)).unwrap_or_default();
                let tail: Vec<_> = text.lines().rev().take(25).collect();
                eprintln!("--- {log} (last lines, newest first)\n{}", tail.join("\n"));
            }
            panic!("owner → vfx through vfx's gateway does not pass");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..5 {
        assert_eq!(call(&o, marker), "201");
    }
    for (dump, file) in [(wan_dump, &wan), (gw_dump, &at_gw)] {
        o.net.signal(dump, libc::SIGINT);
        o.net.wait(dump, Duration::from_secs(5));
        let bytes = std::fs::read(file).unwrap();
        assert!(bytes.len() > 2000, "{} saw the traffic", file.display());
        assert!(
            !contains(&bytes, marker),
            "the marker crossed {} in plaintext",
            file.display()
        );
    }
    // The destination proxy decided on the real source, owner's workload, not on a gateway.
    let vfx_log = std::fs::read_to_string(o.dir.join("vfx-proxy.log")).unwrap();
    assert!(
        vfx_log.lines().any(|l| l.contains("strait::decision")
            && l.contains(&film_id("owner"))
            && l.contains("/api/vfx")
            && l.contains("\"allowed\":true")),
        "vfx's decision log names owner's workload"
    );
    let streams = |o: &Orgs, admin: &str| {
        let out = o.net.run(
            "vfx",
            None,
            &["curl", "-s", &format!("http://{admin}/metrics")],
        );
        metric(
            &String::from_utf8_lossy(&out.stdout),
            "strait_proxy_gateway_streams_total",
            "partner=\"owner.example\"",
        )
    };
    assert!(
        streams(&o, "127.0.0.1:15101") + streams(&o, "127.0.0.1:15102") >= 1,
        "the gateways count owner's streams"
    );

    // What an attacker on the internet can ask the gateway for, with the h2 library.
    let gw = format!("{vfx}:15009");
    let cert = |org: &str, name: &str, id: &str| {
        support::mesh::issue_cert_in(&o.dir, name, &format!("{}/ca", o.data(org)), id, "1h")
    };
    let owner_cert = cert(
        "owner",
        "owner-attacker",
        "spiffe://owner.example/ns/x/sa/y",
    );
    let exported = format!("{}:7000", tunnel_sni(&film_id("vfx")));
    // The control: the exported workload and port pass the gateway's checks.
    assert_eq!(
        ask_gateway(&o, "owner", &gw, &owner_cert, &exported),
        "200",
        "{}",
        std::fs::read_to_string(o.dir.join("vfx-gw1.log")).unwrap_or_default()
    );
    // A federated partner asking for a workload not exported to it, or for a port not exported.
    assert_eq!(
        ask_gateway(
            &o,
            "owner",
            &gw,
            &owner_cert,
            &format!("{}:7001", tunnel_sni(secret))
        ),
        "403"
    );
    assert_eq!(
        ask_gateway(
            &o,
            "owner",
            &gw,
            &owner_cert,
            &format!("{}:7002", tunnel_sni(&film_id("vfx")))
        ),
        "403"
    );
    // No open relay into the private network: addresses name nothing.
    for target in [
        format!("{PRIVATE}:15008"),
        format!("{PRIVATE}:7000"),
        format!("{vfx}:15012"),
    ] {
        assert_eq!(
            ask_gateway(&o, "owner", &gw, &owner_cert, &target),
            "403",
            "{target}"
        );
    }
    // An unfederated trust domain, and vfx's own workloads, are refused at the handshake.
    let mallory_ca = o.dir.join("mallory-ca");
    let out = std::process::Command::new(bin())
        .args(["ca", "init", "--dir", mallory_ca.to_str().unwrap()])
        .args(["--trust-domain", "mallory.example"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mallory = support::mesh::issue_cert_in(
        &o.dir,
        "mallory",
        mallory_ca.to_str().unwrap(),
        "spiffe://mallory.example/ns/x/sa/y",
        "1h",
    );
    let vfx_own = cert("vfx", "vfx-own", &film_id("vfx"));
    for (who, c) in [("mallory", &mallory), ("vfx's own", &vfx_own)] {
        let answer = ask_gateway(&o, "owner", &gw, c, &exported);
        assert!(
            answer.starts_with("tls:") || answer == "closed",
            "{who}: {answer}"
        );
    }
    let gw1_log = std::fs::read_to_string(o.dir.join("vfx-gw1.log")).unwrap();
    assert!(gw1_log.contains("mTLS handshake refused"), "{gw1_log}");

    egress_through_owners_gateway(&o, &call, &owner_cert, &gw);

    // Either replica can go: with one killed, every new request passes through the other.
    o.net.signal(gw1, libc::SIGKILL);
    o.net.wait(gw1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..10 {
        assert_eq!(call(&o, "x"), "201", "request {i} with one gateway gone");
    }
    // A server at a gateway's address with a valid vfx certificate of another identity is refused by
    // owner's proxy: it is not the gateway vfx named.
    let impostor = cert("vfx", "impostor", "spiffe://vfx.example/node/vfx-impostor");
    let imp = o.net.spawn(
        "vfx",
        None,
        &[
            "openssl",
            "s_server",
            "-accept",
            &gw,
            "-cert",
            &impostor.0,
            "-key",
            &impostor.1,
            "-alpn",
            "h2",
            "-tls1_3",
            "-quiet",
        ],
        &o.dir.join("impostor.log"),
    );
    o.net.signal(gw2, libc::SIGKILL);
    o.net.wait(gw2, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let owner_log = || std::fs::read_to_string(o.dir.join("owner-proxy.log")).unwrap();
    let before = owner_log().matches("partner gateway unusable").count();
    assert_eq!(call(&o, "x"), "000", "nothing passes through an impostor");
    let log = owner_log();
    assert!(
        log.matches("partner gateway unusable").count() > before
            && log.contains("spiffe://vfx.example/node/vfx-impostor"),
        "owner's proxy says why: {log}"
    );
    o.net.signal(imp, libc::SIGKILL);
}
