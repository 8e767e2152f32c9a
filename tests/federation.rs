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

use support::mesh::{bin, text};
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
