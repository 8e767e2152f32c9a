//! Kubernetes mode end to end, as root, on the test cluster of `tests/support/kube_cluster.rs` (two node
//! namespaces, two routed pods each, a `--mode kubernetes` proxy per node, the control plane following the
//! in-suite API server):
//!
//!     sudo cargo bench --bench mesh_kubernetes                 # 10 s per scenario
//!     sudo STRAIT_BENCH_SECS=30 cargo bench --bench mesh_kubernetes
//!
//! wrk (Debian package `wrk`) from a pod on node1 to a docstore pod on node2, in the same run:
//! - direct: `olda` → `oldb`, pods of a namespace outside the mesh (the same routes through both nodes,
//!   no proxy): the baseline;
//! - mesh: `web` → `db`, meshed pods: TPROXY on node1, HTTP/2 CONNECT over mTLS to node2, a compiled
//!   workflow decision per request there.
//!
//! Each at 10 keep-alive connections and with a new connection per request. Prints a table (requests/s,
//! p50/p99 latency, CPU microseconds per request in each proxy) and writes
//! `bench/results/mesh-kubernetes.csv`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use support::kube_cluster::{pod, setup, Cluster};

/// One wrk run's figures.
struct Run {
    rps: f64,
    p50: String,
    p99: String,
    requests: u64,
    non_2xx: u64,
}

fn wrk(c: &Cluster, from: &str, url: &str, close: bool, secs: u64) -> Run {
    let dur = format!("{secs}s");
    let mut args = vec!["wrk", "-t2", "-c10", "-d", &dur, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = c.net.run(from, None, &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str, col: usize| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(col))
            .unwrap_or("-")
            .to_owned()
    };
    Run {
        rps: field("Requests/sec:", 1).parse().unwrap_or(0.0),
        p50: field("50%", 1),
        p99: field("99%", 1),
        requests: text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        non_2xx: field("Non-2xx", 3).parse().unwrap_or(0),
    }
}

/// User + system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime and stime are 14th and 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.get(11).zip(f.get(12)).map_or(0.0, |(u, s)| (u + s) / tck)
}

fn main() {
    if Command::new("wrk").arg("-v").output().is_err() {
        eprintln!("error: wrk not found: apt-get install wrk");
        std::process::exit(1);
    }
    if !support::require_root() {
        return;
    }
    let secs: u64 = std::env::var("STRAIT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut c = setup();
    c.start_proxies();
    c.apply_workflow("- {from: web, to: db, methods: [GET], paths: [/]}");
    let direct = format!("http://{}:8080/", pod("oldb").v4);
    let mesh = format!("http://{}:8080/", pod("db").v4);
    c.net
        .eventually(Duration::from_secs(10), "web → db allowed", || {
            c.curl("web", &mesh, &[]) == "200"
        });
    let pids: Vec<u32> = c.proxies.iter().map(|(_, p)| c.net.pid(*p)).collect();

    let mut rows = Vec::new();
    println!(
        "| {:<46} | {:>10} | {:>8} | {:>8} | {:>14} | {:>14} |",
        "scenario", "req/s", "p50", "p99", "µs CPU/req n1", "µs CPU/req n2"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|",
        "-".repeat(48),
        "-".repeat(12),
        "-".repeat(10),
        "-".repeat(10),
        "-".repeat(16),
        "-".repeat(16)
    );
    for (label, from, url, close, proxied) in [
        (
            "direct (un-meshed pods), keep-alive, 10 conns",
            "olda",
            &direct,
            false,
            false,
        ),
        (
            "direct (un-meshed pods), new conn per request",
            "olda",
            &direct,
            true,
            false,
        ),
        (
            "mesh (meshed pods), keep-alive, 10 conns",
            "web",
            &mesh,
            false,
            true,
        ),
        (
            "mesh (meshed pods), new conn per request",
            "web",
            &mesh,
            true,
            true,
        ),
    ] {
        let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
        let r = wrk(&c, from, url, close, secs);
        let per_req = |i: usize| {
            if proxied && r.requests > 0 {
                format!(
                    "{:.1}",
                    (cpu_secs(pids[i]) - before[i]) * 1e6 / r.requests as f64
                )
            } else {
                "-".to_owned()
            }
        };
        let (a, b) = (per_req(0), per_req(1));
        println!(
            "| {label:<46} | {:>10.0} | {:>8} | {:>8} | {a:>14} | {b:>14} |",
            r.rps, r.p50, r.p99
        );
        if r.non_2xx > 0 {
            eprintln!("# warning: {label}: {} non-2xx answers", r.non_2xx);
        }
        rows.push(format!("{label},{:.0},{},{},{a},{b}", r.rps, r.p50, r.p99));
    }
    let rss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    println!(
        "# proxy RSS after load: node1 {}, node2 {}",
        rss(pids[0]),
        rss(pids[1])
    );
    let csv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/mesh-kubernetes.csv");
    let _ = std::fs::create_dir_all(csv.parent().unwrap());
    let body = format!(
        "scenario,req_per_s,p50,p99,cpu_us_per_req_node1,cpu_us_per_req_node2\n{}\n",
        rows.join("\n")
    );
    match std::fs::write(&csv, body) {
        Ok(()) => println!("# written: {}", csv.display()),
        Err(e) => eprintln!("# cannot write {}: {e}", csv.display()),
    }
}
