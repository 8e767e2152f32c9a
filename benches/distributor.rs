//! Policy distributor at scale: one real control plane process (`strait control`) and N simulated proxies in
//! this process, each a real QUIC connection authenticated by its own node SVID (real joins), running the
//! proxies' own subscriber code; a simulated proxy verifies each version (signature, number, content hash)
//! and ACKs, but does not compile the policy or touch nftables.
//!
//!     cargo bench --bench distributor                 # 1 000 subscribers
//!     STRAIT_SUBSCRIBERS=200 cargo bench --bench distributor
//!
//! Measures: time from `workflow apply` to the last ACK (seen by the subscribers and by the control
//! plane), control plane CPU time and memory (from /proc), and after a kill -9 and restart of the control
//! plane, how the reconnections spread out (no thundering herd) and how long until all are back.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strait_ca::TrustDomain;
use strait_control::api::{self, paths};
use strait_control::client::{ApiClient, ServerTrust};
use strait_control::dist::client::{Applier, Link, Target};
use strait_control::dist::version::{Checked, SignedVersion, Verifier};
use strait_control::node::{join, Advert};
use strait_control::registry::NodeName;

const TD: &str = "bench.example";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strait")
}

/// A simulated proxy: verifies, records when it applied which version, ACKs.
struct Sim {
    verifier: Verifier,
    current: Mutex<Option<(u64, String)>>,
    applied_at: Mutex<Vec<(u64, Instant)>>,
    connected: AtomicBool,
    connects: AtomicU64,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    /// Reconnect times (since the restart), for the spread.
    reconnects: Mutex<Vec<Instant>>,
}

impl Applier for Sim {
    fn current(&self) -> Option<(u64, String)> {
        self.current.lock().unwrap().clone()
    }

    async fn apply(&self, v: SignedVersion) -> Result<(u64, String), (u64, String)> {
        let have = self.current();
        match self
            .verifier
            .check(&v, have.as_ref().map(|(n, h)| (*n, h.as_str())))
        {
            Ok(Checked::New(p)) => {
                *self.current.lock().unwrap() = Some((p.number, p.content_hash.clone()));
                self.applied_at
                    .lock()
                    .unwrap()
                    .push((p.number, Instant::now()));
                Ok((p.number, p.content_hash))
            }
            Ok(Checked::AlreadyApplied {
                number,
                content_hash,
            }) => Ok((number, content_hash)),
            Err(e) => Err((0, e.to_string())),
        }
    }

    fn link(&self, link: Link) {
        let up = matches!(link, Link::Connected { .. });
        let was = self.connected.swap(up, Ordering::SeqCst);
        if up && !was {
            self.stats.connected.fetch_add(1, Ordering::SeqCst);
            if self.connects.fetch_add(1, Ordering::SeqCst) > 0 {
                self.stats.reconnects.lock().unwrap().push(Instant::now());
            }
        } else if !up && was {
            self.stats.connected.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU seconds (user + system) and current / peak RSS in MiB of a process.
fn proc_usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (ticks / hz, kib("VmRSS:"), kib("VmHWM:"))
}

fn spawn_control(dir: &std::path::Path, addr: SocketAddr) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("control.log"))
        .unwrap();
    Command::new(bin())
        .args([
            "control",
            "--data-dir",
            dir.join("cp").to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--monitoring",
            "off",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_up(addr: SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("control plane did not come up");
}

fn workflow(extra_steps: usize) -> String {
    let mut y = format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: bench}}\ntrustDomain: {TD}\nactors:\n  - {{name: a, services: [{{name: a}}]}}\n  - {{name: b, services: [{{name: b}}]}}\nsteps:\n  - {{from: a, to: b, methods: [POST], paths: [/api/b]}}\n"
    );
    for i in 0..extra_steps {
        y.push_str(&format!(
            "  - {{from: a, to: b, methods: [GET], paths: [/extra/{i}]}}\n"
        ));
    }
    y
}

fn main() {
    let n: usize = std::env::var("STRAIT_SUBSCRIBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench(n));
}

async fn bench(n: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let out = Command::new(bin())
        .args([
            "control",
            "init",
            "--data-dir",
            tmp.path().join("cp").to_str().unwrap(),
            "--trust-domain",
            TD,
            "--server",
            &addr.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut control = spawn_control(tmp.path(), addr);
    wait_up(addr).await;
    let server = format!("https://{addr}");
    let bundle = Arc::new(
        strait_ca::TrustBundle::from_pem(
            TrustDomain::new(TD).unwrap(),
            &std::fs::read_to_string(tmp.path().join("cp/ca/bundle.pem")).unwrap(),
        )
        .unwrap(),
    );
    let token = std::fs::read_to_string(tmp.path().join("cp/admin.token")).unwrap();
    let admin = Arc::new(
        ApiClient::new(
            &server,
            ServerTrust::Bundle(bundle),
            None,
            Some(token.trim().into()),
        )
        .unwrap(),
    );

    // N nodes join for real (each join makes a new mesh version: the directory grows).
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let identities = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (admin, next, ids, server) = (
            admin.clone(),
            next.clone(),
            identities.clone(),
            server.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let tok: api::TokenResponse = admin
                    .post(
                        paths::ADMIN_TOKENS,
                        &api::TokenRequest {
                            node: NodeName::new(&format!("sim-{i}")).unwrap(),
                            ttl_secs: None,
                            gateway: false,
                        },
                    )
                    .await
                    .unwrap();
                let advert = Advert {
                    tunnel_address: Some(format!(
                        "10.{}.{}.{}:15008",
                        100 + i / 65536,
                        (i / 256) % 256,
                        i % 256
                    )),
                    addresses: vec![format!(
                        "10.{}.{}.{}",
                        100 + i / 65536,
                        (i / 256) % 256,
                        i % 256
                    )
                    .parse()
                    .unwrap()],
                    gateway_address: None,
                };
                let id = join(&server, &tok.token, advert).await.unwrap();
                ids.lock().unwrap().push(id);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let joined_in = t.elapsed();
    let identities = std::mem::take(&mut *identities.lock().unwrap());

    // N subscribers over one QUIC endpoint (one UDP socket), like N proxies behind one address.
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let stats = Arc::new(Stats::default());
    let mut sims = Vec::with_capacity(n);
    let t = Instant::now();
    let (cpu_before_connect, _, _) = proc_usage(control.id());
    for id in identities {
        let sim = Arc::new(Sim {
            verifier: Verifier::new(id.distribution_key.clone().unwrap(), TD),
            current: Mutex::new(None),
            applied_at: Mutex::new(Vec::new()),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            stats: stats.clone(),
        });
        let id = Arc::new(id);
        let target = Target {
            addr,
            tls: Box::new(move || Ok(id.control_tls()?)),
            endpoint: endpoint.clone(),
            tcp_only: false,
        };
        tokio::spawn(strait_control::dist::client::run(target, sim.clone()));
        sims.push(sim);
    }
    let latest = |admin: Arc<ApiClient>| async move {
        let st: api::Status = admin.get(paths::ADMIN_STATUS).await.unwrap();
        st.distribution
    };
    loop {
        let d = latest(admin.clone()).await;
        if d.connected == n && d.rollout_acked == n {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "subscribers did not all connect: {}/{}",
            d.connected,
            n
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connected_in = t.elapsed();
    let (cpu_after_connect, rss_connected, _) = proc_usage(control.id());

    // Rollouts: apply workflows of growing size; time to the last ACK.
    let mut rows = Vec::new();
    for extra in [0usize, 1000, 10_000] {
        let (cpu0, _, _) = proc_usage(control.id());
        let t0 = Instant::now();
        let resp: api::WorkflowApplyResponse = admin
            .post(
                paths::ADMIN_WORKFLOWS,
                &api::WorkflowApplyRequest {
                    yaml: workflow(extra),
                    modules: vec![],
                },
            )
            .await
            .unwrap();
        let v = resp.version.unwrap();
        let apply_rtt = t0.elapsed();
        let last_ack = loop {
            let times: Vec<Option<Instant>> = sims
                .iter()
                .map(|s| {
                    s.applied_at
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|(n, _)| *n == v)
                        .map(|(_, t)| *t)
                })
                .collect();
            if times.iter().all(Option::is_some) {
                break times.into_iter().flatten().max().unwrap();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "rollout of v{v} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // The control plane's own view (ACKs received), once it has them all.
        let mut server_rollout = None;
        for _ in 0..200 {
            let d = latest(admin.clone()).await;
            if d.rollout_acked == n {
                server_rollout = d.rollout_seconds;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (cpu1, rss, hwm) = proc_usage(control.id());
        rows.push((
            extra + 1,
            apply_rtt,
            last_ack.duration_since(t0),
            server_rollout,
            cpu1 - cpu0,
            rss,
            hwm,
        ));
    }

    // kill -9 and restart: reconnections spread by jittered backoff.
    let _ = control.kill();
    let _ = control.wait();
    let down = Instant::now();
    while stats.connected.load(Ordering::SeqCst) > 0 && down.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stats.reconnects.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart = Instant::now();
    control = spawn_control(tmp.path(), addr);
    wait_up(addr).await;
    while stats.connected.load(Ordering::SeqCst) < n && restart.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_back = restart.elapsed();
    let (cpu_restart, rss_restart, hwm_restart) = proc_usage(control.id());
    let mut per_100ms = std::collections::BTreeMap::<u64, usize>::new();
    for t in stats.reconnects.lock().unwrap().iter() {
        *per_100ms
            .entry(t.duration_since(restart).as_millis() as u64 / 100)
            .or_default() += 1;
    }
    let peak = per_100ms.values().copied().max().unwrap_or(0);
    let _ = control.kill();
    let _ = control.wait();

    println!("\npolicy distributor, {n} subscribers (real QUIC, one process), one control plane process, 2 cores shared");
    println!(
        "setup: {n} joins in {:.1} s; {n} subscribers connected and on the newest version in {:.2} s (control plane CPU {:.2} s, RSS {:.1} MiB)",
        joined_in.as_secs_f64(),
        connected_in.as_secs_f64(),
        cpu_after_connect - cpu_before_connect,
        rss_connected
    );
    // The table also goes to bench/results/distributor.csv (plot it with `strait bench plot`).
    let mut csv = String::from("workflow_steps,subscribers,apply_call_ms,last_ack_subscribers_ms,last_ack_control_plane_ms,control_plane_cpu_s,rss_mib,peak_rss_mib\n");
    for (steps, rtt, last, server, cpu, rss, hwm) in &rows {
        csv.push_str(&format!(
            "{steps},{n},{:.1},{:.1},{},{cpu:.3},{rss:.1},{hwm:.1}\n",
            rtt.as_secs_f64() * 1000.0,
            last.as_secs_f64() * 1000.0,
            server.map_or("-".into(), |s| format!("{:.1}", s * 1000.0)),
        ));
    }
    let results = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    if std::fs::create_dir_all(&results).is_ok()
        && std::fs::write(results.join("distributor.csv"), csv).is_ok()
    {
        println!("(also in {})", results.join("distributor.csv").display());
    }
    println!("\n| workflow steps | apply call | apply → last ACK (subscribers) | apply → last ACK (control plane) | control plane CPU | RSS | peak RSS |");
    println!("|---|---|---|---|---|---|---|");
    for (steps, rtt, last, server, cpu, rss, hwm) in rows {
        println!(
            "| {steps} | {:.0} ms | {:.0} ms | {} | {:.2} s | {:.1} MiB | {:.1} MiB |",
            rtt.as_secs_f64() * 1000.0,
            last.as_secs_f64() * 1000.0,
            server.map_or("-".into(), |s| format!("{:.0} ms", s * 1000.0)),
            cpu,
            rss,
            hwm
        );
    }
    println!(
        "\ncontrol plane kill -9 + restart: all {n} back in {:.2} s; most reconnections in any 100 ms: {peak} ({:.0}% of the fleet); control plane CPU {:.2} s, RSS {:.1} MiB (peak {:.1})",
        all_back.as_secs_f64(),
        peak as f64 * 100.0 / n as f64,
        cpu_restart,
        rss_restart,
        hwm_restart
    );
}
