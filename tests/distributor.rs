//! The policy distributor end to end, as root, in network namespaces (topology: `support::mesh`): workflows
//! applied through the control plane reach both proxies over QUIC (or TLS/TCP when UDP is dropped), a bad
//! bundle is refused with a NACK while the old policy stays, and the mesh keeps working when the control
//! plane dies, including across a proxy restart.

mod support;

use std::time::{Duration, Instant};

use support::mesh::*;
use support::require_root;

/// Proxies started without a local bundle (the harness adds an allow-all bundle unless it sees one of
/// these flags): the policy comes from the distributor.
const DISTRIBUTED: &[&str] = &["--decision-log-allow-sample", "0"];

fn workflow(methods: &str) -> String {
    format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: movie}}\ntrustDomain: {TD}\nactors:\n  - {{name: owner, services: [{{name: owner}}]}}\n  - {{name: vfx, services: [{{name: vfx}}]}}\nsteps:\n  - {{from: owner, to: vfx, methods: [{methods}], paths: [/api/vfx]}}\n"
    )
}

fn apply(m: &Mesh, methods: &str) -> String {
    let f = m.dir.join("wf.yaml");
    std::fs::write(&f, workflow(methods)).unwrap();
    m.admin(&[
        "workflow",
        "apply",
        "-f",
        f.to_str().unwrap(),
        "--wait",
        "20s",
    ])
}

/// What the document store answers a POST that got through.
const CREATED: &str = "201";

fn post(m: &Mesh) -> String {
    m.curl(
        "a",
        Some(OWNER_UID),
        &m.vfx_url(false),
        &["-X", "POST", "-d", "{\"doc\": 1}"],
    )
}

fn get(m: &Mesh) -> String {
    m.curl("a", Some(OWNER_UID), &m.vfx_url(false), &[])
}

fn status(m: &Mesh) -> serde_json::Value {
    serde_json::from_str(&m.admin(&["status", "--output", "json"])).unwrap()
}

/// Polls `check` every 5 ms and returns how long it took to hold.
fn time_until(m: &Mesh, what: &str, check: impl Fn() -> bool) -> Duration {
    let t0 = Instant::now();
    m.net.eventually(Duration::from_secs(20), what, || {
        let ok = check();
        if !ok {
            std::thread::sleep(Duration::from_millis(5));
        }
        ok
    });
    t0.elapsed()
}

/// SIGTERM to a host's proxy; waits until it has drained and exited.
fn stop_proxy(m: &Mesh, host: &str) {
    let p = m
        .proxies
        .lock()
        .unwrap()
        .iter()
        .find(|(h, _)| h == host)
        .map(|(_, p)| *p)
        .unwrap();
    m.net.signal(p, libc::SIGTERM);
    assert!(m.net.wait(p, Duration::from_secs(10)).is_some());
}

fn start_both(m: &Mesh, extra: &[&str]) {
    let args: Vec<&str> = DISTRIBUTED.iter().chain(extra).copied().collect();
    m.start_proxy("a", &args);
    m.start_proxy("b", &args);
    m.converge();
}

#[test]
fn an_applied_workflow_is_enforced_everywhere_and_status_shows_the_rollout() {
    if !require_root() {
        return;
    }
    let m = Mesh::new("24h");
    start_both(&m, &[]);
    // A mesh without workflows allows nothing.
    assert_ne!(post(&m), CREATED, "no workflow yet: denied");

    // Allowed after apply, then denied after a change, and the other way round for GET.
    let t0 = Instant::now();
    let out = apply(&m, "POST");
    assert!(
        out.contains("every connected proxy (2) applied version"),
        "{out}"
    );
    let allowed_after = time_until(&m, "POST allowed", || post(&m) == CREATED) + t0.elapsed();
    assert_eq!(get(&m), "403", "GET is not in the workflow");

    let t1 = Instant::now();
    apply(&m, "GET");
    let denied_after = time_until(&m, "POST denied", || post(&m) == "403") + t1.elapsed();
    assert_ne!(get(&m), "403", "GET now passes the proxies");
    eprintln!(
        "apply → enforced on every proxy: allow {} ms, deny {} ms (includes the CLI's round trips)",
        allowed_after.as_millis(),
        denied_after.as_millis()
    );

    let st = status(&m);
    let d = &st["distribution"];
    let latest = d["latest"].as_u64().unwrap();
    assert_eq!(d["connected"], 2, "{d}");
    assert_eq!(d["rollout_acked"], 2, "{d}");
    for p in d["proxies"].as_array().unwrap() {
        assert_eq!(p["connected"], true, "{p}");
        assert_eq!(p["transport"], "quic", "{p}");
        assert_eq!(p["applied"].as_u64(), Some(latest), "{p}");
        assert!(p["last_nack"].is_null(), "{p}");
    }
    for h in ["a", "b"] {
        let mesh = &m.config_dump(h)["mesh"];
        assert_eq!(mesh["version"].as_u64(), Some(latest), "{mesh}");
        assert_eq!(mesh["source"], "control plane");
        assert!(metric(&m.metrics(h), "strait_proxy_mesh_versions_applied", "") >= 2);
    }
    let table = m.admin(&["status"]);
    assert!(
        table.contains("2/2 connected proxies applied it"),
        "{table}"
    );
    let metrics = m.net.run(
        "cp",
        None,
        &["curl", "-s", "http://127.0.0.1:15014/metrics"],
    );
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metric(&metrics, "strait_distributor_acks_total", "") >= 4,
        "{metrics}"
    );
    assert!(
        metrics.contains("strait_distributor_rollout_seconds"),
        "{metrics}"
    );

    // list / show / delete; bad YAML and bad Rego are refused at apply with the place and the reason.
    assert!(m.admin(&["workflow", "list"]).contains("movie"));
    assert!(m
        .admin(&["workflow", "show", "movie"])
        .contains("methods: [GET]"));
    let bad = m.dir.join("bad.yaml");
    std::fs::write(&bad, workflow("GET").replace("steps:", "stepz:")).unwrap();
    let out = m.admin_output(&["workflow", "apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("stepz"), "{}", text(&out));
    let rego = m.dir.join("bad.rego");
    std::fs::write(
        &rego,
        "package strait.custom.bad\nimport rego.v1\n\nallow if {\n  input.x ==\n}\n",
    )
    .unwrap();
    let good = m.dir.join("wf.yaml");
    let out = m.admin_output(&[
        "workflow",
        "apply",
        "-f",
        good.to_str().unwrap(),
        "--custom",
        rego.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("does not compile"), "{}", text(&out));
    assert_eq!(
        status(&m)["distribution"]["latest"].as_u64(),
        Some(latest),
        "nothing changed"
    );
    assert!(m
        .admin(&["workflow", "delete", "movie"])
        .contains("deleted"));
    time_until(&m, "everything denied again", || post(&m) != CREATED);
}

#[test]
fn a_bundle_that_does_not_compile_is_nacked_and_the_old_policy_stays() {
    if !require_root() {
        return;
    }
    let m = Mesh::new("24h");
    start_both(&m, &[]);
    apply(&m, "POST");
    time_until(&m, "POST allowed", || post(&m) == CREATED);
    let good = status(&m)["distribution"]["latest"].as_u64().unwrap();

    // Behind the API's back: a custom module with a Rego error goes into the store. The control plane
    // packages what is stored (it compiled at apply time), so the new version carries the error.
    m.kill_control();
    {
        let store = strait_control::store::Store::open(&m.dir.join("cp/store.redb")).unwrap();
        let mut wf = store.workflow("movie").unwrap().unwrap();
        wf.modules.push(strait_control::store::CustomModule {
            file: "evil.rego".into(),
            source: "package strait.custom.evil\nimport rego.v1\nallow if {\n  input.x ==\n}\n"
                .into(),
        });
        store.put_workflow(&wf).unwrap();
    }
    m.start_control("24h");
    m.net
        .eventually(Duration::from_secs(30), "both proxies NACK", || {
            let d = &status(&m)["distribution"];
            d["latest"].as_u64() > Some(good)
                && d["proxies"].as_array().is_some_and(|ps| {
                    ps.len() == 2
                        && ps.iter().all(|p| {
                            p["last_nack"]["error"]
                                .as_str()
                                .is_some_and(|e| e.contains("does not compile"))
                        })
                })
        });
    // The old policy is still enforced, and each proxy says which version it runs and why it refused.
    assert_eq!(post(&m), CREATED);
    assert_eq!(get(&m), "403");
    for h in ["a", "b"] {
        let mesh = &m.config_dump(h)["mesh"];
        assert_eq!(mesh["version"].as_u64(), Some(good), "{mesh}");
        assert!(mesh["last_refusal"]
            .as_str()
            .unwrap()
            .contains("does not compile"));
        assert!(metric(&m.metrics(h), "strait_proxy_mesh_versions_refused", "") >= 1);
    }
    let text = m.admin(&["status"]);
    assert!(text.contains("NACK v"), "{text}");
    assert!(text.contains("0/2 connected proxies applied it"), "{text}");
}

#[test]
fn without_the_control_plane_the_mesh_runs_on_what_it_has() {
    if !require_root() {
        return;
    }
    let m = Mesh::new("24h");
    start_both(&m, &[]);
    apply(&m, "POST");
    time_until(&m, "POST allowed", || post(&m) == CREATED);

    m.kill_control();
    for _ in 0..5 {
        assert_eq!(
            post(&m),
            CREATED,
            "traffic keeps flowing under the last policy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Proxy A restarts meanwhile: it enforces the persisted version with its cached certificates.
    stop_proxy(&m, "a");
    m.start_proxy_with("a", None, DISTRIBUTED);
    let ready = m
        .net
        .run("a", None, &["curl", "-s", "http://127.0.0.1:15000/ready"]);
    let ready = String::from_utf8_lossy(&ready.stdout);
    assert!(
        ready.contains("control plane unreachable") && ready.contains("persisted"),
        "{ready}"
    );
    assert_eq!(post(&m), CREATED);
    assert_eq!(get(&m), "403");
    assert!(m
        .log("proxy-a.log")
        .contains("enforcing the persisted mesh version"));

    // Proxy B restarts with its persisted version altered on disk: refused like a forged push, so B has
    // nothing, is not ready, and lets nothing through.
    stop_proxy(&m, "b");
    let persisted = m.dir.join("proxy-b/mesh-version.json");
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&persisted).unwrap()).unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = String::from_utf8(b64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
    let forged = payload.replacen("\"POST\"", "\"GET\"", 1);
    assert_ne!(forged, payload);
    env["payload"] = b64.encode(forged).into();
    std::fs::write(&persisted, serde_json::to_vec(&env).unwrap()).unwrap();
    let data = m.p("proxy-b");
    let (v4, v6) = (m.net.v4("b").to_string(), m.net.v6("b").to_string());
    let control = format!("https://{}:15012", m.net.v4("cp"));
    let pb = m.net.spawn(
        "b",
        None,
        &[
            bin(),
            "proxy",
            "--control",
            &control,
            "--node",
            "host-b",
            "--data-dir",
            data,
            "--address",
            &v4,
            "--address",
            &v6,
            "--decision-log-allow-sample",
            "0",
        ],
        &m.dir.join("proxy-b.log"),
    );
    m.net
        .eventually(Duration::from_secs(10), "b not ready", || {
            let out = m
                .net
                .run("b", None, &["curl", "-s", "http://127.0.0.1:15000/ready"]);
            String::from_utf8_lossy(&out.stdout).contains("not ready: no mesh version")
        });
    assert!(m
        .log("proxy-b.log")
        .contains("persisted mesh version is refused"));
    assert_ne!(post(&m), CREATED, "B has no policy: nothing gets through");

    // The control plane comes back: everyone converges on the newest version.
    m.start_control("24h");
    time_until(&m, "B back", || post(&m) == CREATED);
    apply(&m, "GET");
    time_until(&m, "new policy everywhere", || post(&m) == "403");
    let d = &status(&m)["distribution"];
    assert_eq!(d["rollout_acked"], 2, "{d}");
    m.net.signal(pb, libc::SIGTERM);
    m.net.wait(pb, Duration::from_secs(10));
}

#[test]
fn where_udp_is_dropped_the_proxy_falls_back_to_tls_over_tcp() {
    if !require_root() {
        return;
    }
    let m = Mesh::new("24h");
    // Host A's UDP to the control plane is dropped (its own table, beside the proxy's).
    let cp = m.net.v4("cp").to_string();
    for rule in [
        vec!["nft", "add", "table", "inet", "blockudp"],
        vec![
            "nft",
            "add chain inet blockudp out { type filter hook output priority 0 ; }",
        ],
        vec![
            "nft", "add", "rule", "inet", "blockudp", "out", "ip", "daddr", &cp, "udp", "dport",
            "15012", "counter", "drop",
        ],
    ] {
        let out = m.net.run("a", None, &rule);
        assert!(out.status.success(), "{rule:?}: {}", text(&out));
    }
    start_both(&m, &[]);
    let mesh = &m.config_dump("a")["mesh"];
    assert_eq!(mesh["transport"], "tcp", "{mesh}");
    assert_eq!(mesh["fallback"], true, "{mesh}");
    assert_eq!(m.config_dump("b")["mesh"]["transport"], "quic");
    assert!(m.log("proxy-a.log").contains("QUIC did not get through"));
    let rules = m
        .net
        .run("a", None, &["nft", "list", "table", "inet", "blockudp"]);
    assert!(
        !text(&rules).contains("packets 0 "),
        "UDP was really sent and dropped: {}",
        text(&rules)
    );

    apply(&m, "POST");
    time_until(&m, "POST allowed through A", || post(&m) == CREATED);
    let d = &status(&m)["distribution"];
    let a = d["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "host-a")
        .unwrap();
    assert_eq!(a["transport"], "tcp", "{a}");
    assert_eq!(a["applied"], d["latest"], "{d}");
}

/// Trusted distribution key ids of a host's proxy (`/config_dump`).
fn trusted_keys(m: &Mesh, host: &str) -> Vec<String> {
    m.config_dump(host)["mesh"]["trusted_keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn key_status(m: &Mesh) -> serde_json::Value {
    serde_json::from_str(&m.admin(&["distribution-key", "status", "--output", "json"])).unwrap()
}

#[test]
fn the_distribution_key_rotates_under_traffic_and_a_node_that_missed_it_catches_up() {
    if !require_root() {
        return;
    }
    let m = Mesh::new("24h");
    start_both(&m, &[]);
    apply(&m, "POST");
    time_until(&m, "POST allowed", || post(&m) == CREATED);
    let first = key_status(&m)["active"].as_str().unwrap().to_owned();
    for h in ["a", "b"] {
        assert_eq!(trusted_keys(&m, h), std::slice::from_ref(&first));
    }

    // Continuous traffic from A's workload to B's through the whole rotation: not one request may fail.
    without_a_failed_request(
        "distribution key rotation under traffic",
        || post(&m),
        CREATED,
        || {
            // Step 1: the next key is announced under the current one; both proxies trust both.
            let out = m.admin(&["distribution-key", "prepare"]);
            assert!(out.contains("rotation prepared: next key"), "{out}");
            let next = key_status(&m)["next"].as_str().unwrap().to_owned();
            assert_ne!(next, first);
            time_until(&m, "both proxies trust both keys", || {
                ["a", "b"]
                    .iter()
                    .all(|h| trusted_keys(&m, h) == [first.clone(), next.clone()])
            });
            time_until(&m, "nobody waited for", || {
                key_status(&m)["waiting_for"]
                    .as_array()
                    .is_some_and(|w| w.is_empty())
            });
            let table = m.admin(&["status"]);
            assert!(table.contains("ready to activate"), "{table}");

            // Step 2: the next key signs; once its first version is applied, the old key is trusted nowhere.
            let out = m.admin(&["distribution-key", "activate"]);
            assert!(out.contains(&format!("DISTRIBUTION KEY {next}")), "{out}");
            assert!(out.contains("no rotation under way"), "{out}");
            time_until(&m, "both proxies trust only the new key", || {
                ["a", "b"]
                    .iter()
                    .all(|h| trusted_keys(&m, h) == [next.clone()])
            });
            // A workflow change signed by the new key is applied everywhere.
            apply(&m, "POST, GET");
            let d = &status(&m)["distribution"];
            assert_eq!(d["rollout_acked"], 2, "{d}");
            std::thread::sleep(Duration::from_millis(500));
        },
    );
    assert!(!m.dir.join("cp/distribution-key.next.pk8").exists());

    // A node away for a whole rotation: activation waits for it, unless forced; when it comes back it
    // meets a signature by a key it never saw announced, asks the control plane, and catches up.
    let second = key_status(&m)["active"].as_str().unwrap().to_owned();
    stop_proxy(&m, "b");
    m.admin(&["distribution-key", "prepare"]);
    let third = key_status(&m)["next"].as_str().unwrap().to_owned();
    time_until(&m, "A trusts both", || {
        trusted_keys(&m, "a") == [second.clone(), third.clone()]
    });
    let out = m.admin_output(&["distribution-key", "activate"]);
    assert!(
        !out.status.success(),
        "activation with a node behind is refused"
    );
    assert!(text(&out).contains("host-b"), "{}", text(&out));
    let out = m.admin(&["distribution-key", "activate", "--force"]);
    assert!(out.contains(&format!("DISTRIBUTION KEY {third}")), "{out}");
    apply(&m, "POST");
    time_until(&m, "A trusts only the third key", || {
        trusted_keys(&m, "a") == [third.clone()]
    });
    m.start_proxy_with("b", None, DISTRIBUTED);
    time_until(&m, "B caught up", || {
        trusted_keys(&m, "b") == [third.clone()]
    });
    let latest = status(&m)["distribution"]["latest"].as_u64();
    time_until(&m, "B applied the newest version", || {
        m.config_dump("b")["mesh"]["version"].as_u64() == latest
    });
    assert!(m
        .log("proxy-b.log")
        .contains("signed by a distribution key not yet trusted"));
    assert_eq!(post(&m), CREATED);
    assert_eq!(get(&m), "403", "B enforces the newest workflow");

    // B restarts with the control plane down: the persisted version (signed by the third key) is still
    // verified, because the keys trusted with it were saved beside it.
    m.kill_control();
    stop_proxy(&m, "b");
    m.start_proxy_with("b", None, DISTRIBUTED);
    time_until(&m, "B enforces the persisted version", || {
        post(&m) == CREATED
    });
    assert!(m
        .log("proxy-b.log")
        .contains("enforcing the persisted mesh version"));
}
