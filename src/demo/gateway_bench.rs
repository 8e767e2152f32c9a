//! `strait bench gateway`: what a gateway costs, measured with `hey` in one run on one topology. Two
//! organisations (owner calls vfx's `vfx-1`), both nodes on one shared network, first federated directly
//! (owner's proxy reaches vfx's node tunnel), then through vfx's gateway (the same export, now naming the
//! gateway, imported at a virtual address), then also through owner's own gateway (egress: `strait
//! federation egress on`). Each path: keep-alive throughput and latency with 16 connections, then a new
//! connection per request (the study's method), and the gateways' CPU per request.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

use super::federated::{self, Org};
use super::lab::Lab;
use super::mesh::PORT;

const CONNECTIONS: usize = 16;
const NEW_CONNECTIONS: usize = 300;

/// One `hey` run's figures.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
}

/// Parses `hey`'s summary; every response must be a 201 (a refused request fails the benchmark).
fn parse_hey(text: &str) -> anyhow::Result<Load> {
    let number_after = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let rps = number_after("Requests/sec:")
        .ok_or_else(|| anyhow!("hey printed no Requests/sec: {text}"))?;
    let p50 = number_after("50% in").ok_or_else(|| anyhow!("hey printed no median: {text}"))?;
    let p99 = number_after("99% in").ok_or_else(|| anyhow!("hey printed no p99: {text}"))?;
    let mut requests = 0;
    for l in text.lines().map(str::trim).filter(|l| l.starts_with('[')) {
        let (code, rest) = l.split_once(']').unwrap_or((l, ""));
        let n: u64 = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if code != "[201" {
            bail!(
                "{n} responses with status {}: {text}",
                code.trim_start_matches('[')
            );
        }
        requests += n;
    }
    if text.contains("Error distribution") {
        bail!("hey saw errors: {text}");
    }
    Ok(Load {
        rps,
        p50_ms: p50 * 1000.0,
        p99_ms: p99 * 1000.0,
        requests,
    })
}

/// User plus system CPU time of `pid`, from /proc (clock ticks of 10 ms).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces; the fields after ") " are fixed.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

struct Measured {
    path: &'static str,
    keep_alive: Load,
    new_conn: Load,
    gateway_cpu_us: Option<f64>,
}

pub fn run(seconds: u64, out_dir: PathBuf) -> anyhow::Result<()> {
    super::preflight("bench gateway", &[("hey", "hey")])?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    let orgs = [
        Org {
            name: "owner".into(),
            services: vec!["owner".into()],
        },
        Org {
            name: "vfx".into(),
            services: vec!["vfx-1".into()],
        },
    ];
    let hosts = ["owner-gw", "vfx-gw", "owner", "vfx-1"];
    println!(
        "building two organisations on one network (namespaces {}*)",
        super::lab::PREFIX
    );
    super::in_hosts(&hosts, &[], &[], |lab, state, exe| {
        bench(lab, &orgs, seconds, state, &out_dir, exe)
    })
}

fn bench(
    lab: &Lab,
    orgs: &[Org],
    seconds: u64,
    state: &Path,
    out: &Path,
    exe: &str,
) -> anyhow::Result<()> {
    let meshes = federated::start_controls(lab, orgs, exe, state, out)?;
    let mesh = |org: &str| {
        meshes
            .get(org)
            .ok_or_else(|| anyhow!("no organisation {org}"))
    };
    let (owner, vfx) = (&orgs[0], &orgs[1]);
    federated::federate(lab, state, &meshes, orgs, "owner", "vfx")?;
    federated::federate(lab, state, &meshes, orgs, "vfx", "owner")?;
    for org in orgs {
        federated::start_services(mesh(&org.name)?, org)?;
    }
    mesh("vfx")?.admin(&[
        "federation",
        "export",
        "--trust-domain",
        &owner.trust_domain(),
        "--workload",
        &vfx.id("vfx-1"),
    ])?;
    let path = "/api/vfx-1";
    let wf = |org: &Org| {
        format!(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: bench}}\ntrustDomain: {}\nactors:\n  - {{name: owner, services: [{{name: owner, id: \"{}\"}}]}}\n  - {{name: vfx, services: [{{name: vfx-1, id: \"{}\"}}]}}\nsteps:\n  - {{from: owner, to: vfx-1, methods: [POST], paths: [{path}]}}\n",
            org.trust_domain(),
            owner.id("owner"),
            vfx.id("vfx-1")
        )
    };
    for org in orgs {
        mesh(&org.name)?.apply_workflow(&wf(org), "30s")?;
    }

    // Imports through a gateway get virtual addresses (240.240.0.0/16): a node needs a route to them for a
    // connect() to leave the socket and meet the capture (a default route gives one; these hosts have
    // none).
    let route = lab.run(
        "owner",
        None,
        &["ip", "route", "add", "240.240.0.0/16", "dev", "e0"],
    )?;
    if !route.status.success() {
        bail!(
            "a route for the virtual addresses: {}",
            String::from_utf8_lossy(&route.stderr)
        );
    }
    let mut rows = Vec::new();
    // The gateways in the path, whose CPU is counted.
    let mut gateways = Vec::new();
    for path_name in ["direct", "gateway", "egress"] {
        if path_name == "gateway" {
            gateways.push(federated::start_gateway(lab, mesh("vfx")?, vfx, exe, out)?);
        }
        if path_name == "egress" {
            gateways.push(federated::start_gateway(
                lab,
                mesh("owner")?,
                owner,
                exe,
                out,
            )?);
            mesh("owner")?.admin(&["federation", "egress", "on"])?;
        }
        mesh("owner")?.admin(&["federation", "refresh"])?;
        let addr = federated::addresses(mesh("owner")?, lab, owner, orgs)?
            .remove("vfx-1")
            .ok_or_else(|| anyhow!("owner did not import vfx-1"))?;
        let through_gateway = addr.starts_with("240.");
        if through_gateway != (path_name != "direct") {
            // The new export reaches owner's control plane with the refresh above; wait for it.
            bail!("owner imports vfx-1 at {addr}, expected the {path_name} path");
        }
        let url = format!("http://{addr}:{PORT}{path}");
        let uid = mesh("owner")?.uid("owner");
        // Through egress: until owner's proxy enforces the version that turned it on, its requests
        // still go straight to vfx's gateway; owner's gateway counts the first egress stream.
        let egress_counted = || {
            path_name != "egress"
                || lab
                    .run(
                        &owner.border(),
                        None,
                        &["curl", "-s", "http://127.0.0.1:15000/metrics"],
                    )
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                            l.starts_with("strait_proxy_gateway_streams_total{way=\"egress\"")
                        })
                    })
        };
        lab.eventually(
            Duration::from_secs(30),
            &format!("owner → vfx-1 ({path_name})"),
            || {
                super::curl(lab, "owner", uid, "POST", &url, "x")
                    .is_ok_and(|(code, _)| code == "201")
                    && egress_counted()
            },
        )?;
        let hey = |args: &[&str]| -> anyhow::Result<Load> {
            let mut all = vec!["hey", "-m", "POST", "-d", "x", "-T", "text/plain"];
            all.extend_from_slice(args);
            all.push(&url);
            let o = lab.run("owner", Some(uid), &all)?;
            parse_hey(&String::from_utf8_lossy(&o.stdout))
        };
        let gateways_cpu =
            || -> anyhow::Result<f64> { gateways.iter().map(|&pid| cpu_seconds(pid)).sum() };
        let before = gateways_cpu()?;
        let c = CONNECTIONS.to_string();
        let z = format!("{seconds}s");
        let keep_alive = hey(&["-z", &z, "-c", &c])?;
        let gateway_cpu_us = (!gateways.is_empty())
            .then_some((gateways_cpu()? - before) * 1e6 / keep_alive.requests.max(1) as f64);
        let n = NEW_CONNECTIONS.to_string();
        let new_conn = hey(&["-n", &n, "-c", "1", "-disable-keepalive"])?;
        println!(
            "{path_name}: {:.0} req/s keep-alive, new connection p50 {:.2} ms",
            keep_alive.rps, new_conn.p50_ms
        );
        rows.push(Measured {
            path: path_name,
            keep_alive,
            new_conn,
            gateway_cpu_us,
        });
    }

    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.path.to_owned(),
                format!("{:.0}", r.keep_alive.rps),
                format!("{:.2}", r.keep_alive.p50_ms),
                format!("{:.2}", r.keep_alive.p99_ms),
                format!("{:.2}", r.new_conn.p50_ms),
                format!("{:.2}", r.new_conn.p99_ms),
                r.gateway_cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
            ]
        })
        .collect();
    println!();
    print!(
        "{}",
        crate::cmd::table::render(
            &[
                "PATH",
                &format!("REQ/S ({CONNECTIONS} conns)"),
                "P50 MS",
                "P99 MS",
                "NEW CONN P50 MS",
                "NEW CONN P99 MS",
                "GATEWAYS CPU µs/REQ",
            ],
            &table
        )
    );
    if let [direct, paths @ ..] = rows.as_slice() {
        for (gw, what) in paths.iter().zip([
            "through vfx's gateway",
            "through owner's egress gateway and vfx's gateway",
        ]) {
            println!(
                "\n{what}: {:.2}× the direct path's throughput; +{:.2} ms per request on a new connection (median), +{:.2} ms on a kept-alive one",
                gw.keep_alive.rps / direct.keep_alive.rps.max(1e-9),
                gw.new_conn.p50_ms - direct.new_conn.p50_ms,
                gw.keep_alive.p50_ms - direct.keep_alive.p50_ms
            );
        }
    }
    let mut csv = String::from(
        "path,rps,p50_ms,p99_ms,new_conn_p50_ms,new_conn_p99_ms,gateway_cpu_us_per_request\n",
    );
    for r in &rows {
        let _ = writeln!(
            csv,
            "{},{:.1},{:.3},{:.3},{:.3},{:.3},{}",
            r.path,
            r.keep_alive.rps,
            r.keep_alive.p50_ms,
            r.keep_alive.p99_ms,
            r.new_conn.p50_ms,
            r.new_conn.p99_ms,
            r.gateway_cpu_us
                .map_or(String::new(), |c| format!("{c:.2}"))
        );
    }
    let file = out.join("gateway.csv");
    std::fs::write(&file, csv)?;
    println!("results: {}", file.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_hey;

    #[test]
    fn hey_summaries_parse_and_a_refused_request_fails() {
        let ok = "Summary:\n  Total:\t5.0 secs\n  Requests/sec:\t1234.5678\n\nLatency distribution:\n  10% in 0.0010 secs\n  50% in 0.0020 secs\n  99% in 0.0100 secs\n\nStatus code distribution:\n  [201]\t6172 responses\n";
        let l = parse_hey(ok).unwrap();
        assert!((l.rps - 1234.5678).abs() < 1e-6);
        assert!((l.p50_ms - 2.0).abs() < 1e-9 && (l.p99_ms - 10.0).abs() < 1e-9);
        assert_eq!(l.requests, 6172);
        let refused = ok.replace(
            "  [201]\t6172 responses\n",
            "  [201]\t6000 responses\n  [403]\t172 responses\n",
        );
        assert!(parse_hey(&refused).is_err());
        assert!(parse_hey("nothing").is_err());
    }
}
