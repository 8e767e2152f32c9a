//! `strait demo`: the whole product on one machine. A control plane host and one host per service of the
//! workflow (network namespaces on a bridge), a document store per service behind its own node proxy, the
//! workflow applied through the control plane; then every ordered pair of services tries a POST and a GET,
//! and the verdict checks the table against the workflow and a packet capture of the links against the
//! requests' marker.

pub mod federated;
pub mod federated_study;
pub mod gateway_bench;
mod lab;
mod mesh;
pub mod study;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use strait_policy::workflow::Workflow;

use lab::Lab;
use mesh::{Mesh, PORT};

const BUILTIN: &str = include_str!("../../deploy/examples/movie-workflow.yaml");

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Root and the tools, each refusal one line saying what to do.
fn preflight(command: &str, extra: &[(&str, &str)]) -> anyhow::Result<()> {
    if crate::sys::effective_uid() != 0 {
        bail!("strait {command} needs root (network namespaces, nftables): run `sudo strait {command}`, or `sudo bash scripts/demo.sh` which also installs what it needs");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("tcpdump", "tcpdump"),
        ("curl", "curl"),
        ("setpriv", "util-linux"),
    ]
    .iter()
    .chain(extra)
    {
        if !on_path(tool) {
            bail!("`{tool}` is missing: install it with `apt-get install {package}` (or run `sudo bash scripts/demo.sh`, which installs what the demo needs)");
        }
    }
    Ok(())
}

/// One row of the table.
struct Row {
    src: String,
    dst: String,
    method: &'static str,
    expected: bool,
    code: String,
    seconds: f64,
}

impl Row {
    /// The mesh let it through: the service answered (201 for a stored document, 404 for a GET of the
    /// collection), rather than the destination proxy's 403 or the source proxy's refusal.
    fn allowed(&self) -> bool {
        !matches!(self.code.as_str(), "403" | "000")
    }

    fn got(&self) -> &'static str {
        match self.code.as_str() {
            "403" => "denied (403 at destination)",
            "000" => "denied (refused at source)",
            _ => "allowed",
        }
    }
}

/// A random marker every request carries: the captures must never show it.
fn marker() -> anyhow::Result<String> {
    let mut rnd = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| anyhow!("no randomness"))?;
    Ok(format!(
        "STRAIT-DEMO-{}",
        rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// curl on `host` as `uid`: `method` to `url` with `marker` as the body, a new connection, at most 5 s;
/// the HTTP status ("000": no answer) and the seconds it took.
fn curl(
    lab: &Lab,
    host: &str,
    uid: u32,
    method: &str,
    url: &str,
    marker: &str,
) -> anyhow::Result<(String, f64)> {
    let out = lab.run(
        host,
        Some(uid),
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "--max-time",
            "5",
            "-X",
            method,
            "-H",
            "content-type: text/plain",
            "--data-binary",
            marker,
            url,
        ],
    )?;
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = answer.split_whitespace();
    Ok((
        parts.next().unwrap_or("000").to_owned(),
        parts.next().and_then(|t| t.parse().ok()).unwrap_or(0.0),
    ))
}

/// Does a step allow `method` on `/api/<dst>` from `src` to `dst`?
fn expected(wf: &Workflow, src: &str, dst: &str, method: &str) -> bool {
    let path = format!("/api/{dst}");
    wf.steps.iter().any(|s| {
        s.from == src
            && s.to == dst
            && (s.methods.is_empty() || s.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && (s.paths.is_empty() || s.paths.iter().any(|p| p == &path))
    })
}

/// The workflow to run: `file`, or the built-in film-production workflow.
pub struct Loaded {
    pub yaml: String,
    pub wf: Workflow,
    pub ids: BTreeMap<String, String>,
    pub services: Vec<String>,
}

pub fn load(file: Option<&Path>) -> anyhow::Result<Loaded> {
    let yaml = match file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => BUILTIN.to_owned(),
    };
    let wf = Workflow::from_yaml(&yaml).map_err(|e| anyhow!("workflow: {e}"))?;
    let ids: BTreeMap<String, String> = wf.service_ids().map_err(|e| anyhow!("workflow: {e}"))?;
    let services: Vec<String> = wf
        .actors
        .iter()
        .flat_map(|a| a.services.iter().map(|s| s.name.clone()))
        .collect();
    if services.len() > 40 {
        bail!(
            "the demo runs one host per service; {} services is too many (at most 40)",
            services.len()
        );
    }
    Ok(Loaded {
        yaml,
        wf,
        ids,
        services,
    })
}

/// Builds the hosts (control plane + one per service), runs `f` in them, and takes everything down
/// afterwards — also on Ctrl-C or SIGTERM.
pub fn in_lab<T>(
    services: &[String],
    remote: &[String],
    f: impl FnOnce(&Lab, &Path, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut hosts = vec!["cp"];
    hosts.extend(services.iter().map(String::as_str));
    println!(
        "building the mesh: a control plane host and {} service hosts (network namespaces {}*)",
        services.len(),
        lab::PREFIX
    );
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
    in_hosts(&hosts, &remote, &[], f)
}

/// Builds the hosts of [`Lab::with_hosts`], runs `f` in them (with a private state directory and this
/// executable's path), and takes everything down afterwards — also on Ctrl-C or SIGTERM.
fn in_hosts<T>(
    hosts: &[&str],
    remote: &[&str],
    behind: &[(&str, &str)],
    f: impl FnOnce(&Lab, &Path, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let stale = lab::stale();
    if !stale.is_empty() {
        eprintln!(
            "removing {} namespaces left by an earlier demo run",
            stale.len()
        );
        lab::delete_namespaces(&stale);
    }
    // State (CA, keys, stores) lives in a private temporary directory and goes with the lab.
    let state = tempfile::Builder::new().prefix("strait-demo").tempdir()?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let lab = Arc::new(Lab::with_hosts(hosts, remote, behind)?);
    {
        // Ctrl-C or SIGTERM: take everything down, then leave.
        let lab = lab.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async { crate::cmd::shutdown_signal().await });
                eprintln!("\ninterrupted: removing the namespaces and processes");
                lab.teardown();
                std::process::exit(130);
            }
        });
    }
    // Also when `f` panics (the Ctrl-C thread holds the lab too, so it would never be dropped).
    struct TearDown<'a>(&'a Lab);
    impl Drop for TearDown<'_> {
        fn drop(&mut self) {
            self.0.teardown();
        }
    }
    let _down = TearDown(&lab);
    f(&lab, state.path(), &exe)
}

pub fn run(file: Option<PathBuf>, out_dir: PathBuf) -> anyhow::Result<()> {
    preflight("demo", &[])?;
    let l = load(file.as_deref())?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    in_lab(&l.services, &[], |lab, state, exe| {
        demo(
            lab,
            &l.wf,
            &l.yaml,
            &l.ids,
            &l.services,
            state,
            &out_dir,
            exe,
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn demo(
    lab: &Lab,
    wf: &Workflow,
    yaml: &str,
    ids: &BTreeMap<String, String>,
    services: &[String],
    state: &Path,
    out: &Path,
    exe: &str,
) -> anyhow::Result<()> {
    let mesh = Mesh::start_control(lab, "cp", exe, state, out, &wf.trust_domain, services)?;
    println!("control plane up at {}", mesh.url());
    mesh.register(ids)?;
    mesh.start_docstores()?;
    mesh.start_proxies()?;
    println!(
        "{} proxies ready (each joined with a one-time token and got its workload's SVID)",
        services.len()
    );
    let applied = mesh.apply_workflow(yaml, "30s")?;
    print!("{applied}");
    let svg = out.join(format!("{}.svg", wf.metadata.name));
    std::fs::write(&svg, strait_policy::graph::svg(wf))?;

    // Capture the links while the requests run.
    let pcap = out.join("wire.pcap");
    let _ = std::fs::remove_file(&pcap);
    let tcpdump_log = out.join("tcpdump.log");
    let _ = std::fs::remove_file(&tcpdump_log);
    let pcap_s = pcap.to_string_lossy().into_owned();
    let dump = lab.spawn(
        "sw",
        None,
        &[
            "tcpdump",
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            "br0",
            "-U",
            "-s",
            "0",
            "-w",
            &pcap_s,
        ],
        &tcpdump_log,
    )?;
    lab.eventually(Duration::from_secs(10), "the packet capture", || {
        std::fs::read_to_string(&tcpdump_log).is_ok_and(|l| l.contains("listening on"))
    })?;

    let marker = marker()?;
    println!("\nsending a POST and a GET from every service to every other ({} requests), each carrying {marker}", services.len() * (services.len() - 1) * 2);
    let mut rows = Vec::new();
    for src in services {
        for dst in services {
            if dst == src {
                continue;
            }
            for method in ["POST", "GET"] {
                let url = mesh.service_url(dst, &format!("/api/{dst}"));
                let (code, seconds) = curl(lab, src, mesh.uid(src), method, &url, &marker)?;
                rows.push(Row {
                    src: src.clone(),
                    dst: dst.clone(),
                    method,
                    expected: expected(wf, src, dst, method),
                    code,
                    seconds,
                });
            }
        }
    }
    // A pid we started (ip netns exec execs tcpdump in place).
    crate::sys::signal(dump as i32, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(700));

    // The table.
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.src.clone(),
                r.dst.clone(),
                r.method.to_owned(),
                if r.expected { "allowed" } else { "denied" }.to_owned(),
                r.got().to_owned(),
                format!("{} {:.1} ms", r.code, r.seconds * 1000.0),
                if r.expected == r.allowed() {
                    "ok"
                } else {
                    "WRONG"
                }
                .to_owned(),
            ]
        })
        .collect();
    println!();
    print!(
        "{}",
        crate::cmd::table::render(
            &[
                "SOURCE",
                "DESTINATION",
                "METHOD",
                "EXPECTED",
                "GOT",
                "LATENCY",
                ""
            ],
            &table
        )
    );
    let mut csv = String::from("source,destination,method,expected,got,http_code,latency_ms\n");
    for r in &rows {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{:.3}",
            r.src,
            r.dst,
            r.method,
            if r.expected { "allowed" } else { "denied" },
            r.got(),
            r.code,
            r.seconds * 1000.0
        );
    }
    std::fs::write(out.join("results.csv"), csv)?;

    // The wire: the marker must not appear; the tunnel port must (or the capture saw nothing).
    let bytes = std::fs::read(&pcap).with_context(|| format!("reading {}", pcap.display()))?;
    let leaked = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
    let count = |filter: &str| -> usize {
        lab.run("sw", None, &["tcpdump", "-nn", "-r", &pcap_s, filter])
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    let tunnel_packets = count("tcp port 15008");
    let plain_packets = count(&format!("tcp port {PORT}"));

    let allowed: Vec<&Row> = rows.iter().filter(|r| r.allowed()).collect();
    let wrong: Vec<&Row> = rows.iter().filter(|r| r.expected != r.allowed()).collect();
    let want = rows.iter().filter(|r| r.expected).count();
    let mean_allowed =
        allowed.iter().map(|r| r.seconds).sum::<f64>() / allowed.len().max(1) as f64 * 1000.0;
    println!("\nverdict");
    println!(
        "  {} of {} requests allowed, {} expected by the workflow ({} steps); {} denied",
        allowed.len(),
        rows.len(),
        want,
        wf.steps.len(),
        rows.len() - allowed.len()
    );
    println!("  mismatches: {}", wrong.len());
    println!(
        "  wire ({}): {} packets on the tunnel port 15008 (mTLS), {} on the services' port {PORT} (plaintext), marker found: {}",
        pcap.display(),
        tunnel_packets,
        plain_packets,
        if leaked { "YES" } else { "no" }
    );
    println!("  mean latency of allowed requests (new connection each, as curl does): {mean_allowed:.1} ms");
    println!(
        "  workflow graph: {}   results: {}",
        svg.display(),
        out.join("results.csv").display()
    );
    let ok = wrong.is_empty() && !leaked && tunnel_packets > 0 && plain_packets == 0;
    if ok {
        println!("\nPASS: exactly the workflow's steps are allowed, and nothing crossed the wire in clear");
        Ok(())
    } else {
        for r in &wrong {
            eprintln!(
                "wrong: {} → {} {}: expected {}, got {} ({})",
                r.src,
                r.dst,
                r.method,
                if r.expected { "allowed" } else { "denied" },
                r.got(),
                r.code
            );
        }
        bail!(
            "FAIL: see the table above and the logs in {}",
            out.display()
        )
    }
}
