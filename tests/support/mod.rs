//! Hosts made of network namespaces for end-to-end tests.
//!
//! Every test builds its own topology with a unique name prefix: a "switch" namespace holding a bridge, and
//! one namespace per host attached to it by a veth pair, each host with `10.77.0.N/24` and `fd77::N/64`.
//! Addresses repeat between tests, but namespaces do not, so tests never see each other. Dropping the
//! `Netns` kills every process it started and deletes the namespaces, which also removes their veths,
//! bridges and nftables tables.
#![allow(dead_code)]

pub mod kube_api;
pub mod kube_cluster;
pub mod mesh;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The environment variable that skips namespace tests when not root. CI never sets it.
pub const SKIP_VAR: &str = "STRAIT_SKIP_NETNS_TESTS";

/// The third-party peers' scripts (tests/apps).
pub fn apps() -> String {
    format!("{}/tests/apps", env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the test virtualenv (grpcio, hypercorn, websockets, h2), made by scripts/test-venv.sh.
pub fn python() -> String {
    let py = std::env::var("STRAIT_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/target/test-venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    assert!(
        std::path::Path::new(&py).exists(),
        "{py} is missing: run `bash scripts/test-venv.sh` (scripts/test.sh does) or set STRAIT_TEST_PYTHON"
    );
    py
}

/// True when the test may run; panics with instructions when it needs root and was not told to skip.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
        eprintln!("skipped: network-namespace tests need root ({SKIP_VAR}=1)");
        return false;
    }
    panic!(
        "network-namespace tests need root: run `sudo bash scripts/test.sh`, or set {SKIP_VAR}=1 to skip them"
    );
}

/// Panics naming every program of `cmds` that is not on PATH (`ip netns exec` would only say "No such
/// file" in a process log, and the test would time out waiting for it).
#[allow(dead_code)]
pub fn require_commands(cmds: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = cmds
        .iter()
        .copied()
        .filter(|c| !std::env::split_paths(&path).any(|d| d.join(c).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "missing programs: {}; `bash scripts/test.sh` installs them (Debian packages)",
        missing.join(", ")
    );
}

pub struct Netns {
    pub prefix: String,
    hosts: Vec<String>,
    children: Mutex<Vec<(String, Child)>>,
}

/// A process started in a namespace; its index in the harness, for signalling it later.
#[derive(Debug, Clone, Copy)]
pub struct Proc(usize);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install iproute2/nftables or run scripts/test.sh)",
                args[0]
            )
        });
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates hosts with the given names on one bridge; host i (from 0) gets 10.77.0.(i+1).
    pub fn new(hosts: &[&str]) -> Self {
        let prefix = format!(
            "st{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let net = Self {
            prefix: prefix.clone(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            children: Mutex::new(Vec::new()),
        };
        let sw = net.ns("sw");
        sh(&["ip", "netns", "add", &sw]);
        sh(&["ip", "-n", &sw, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (i, h) in hosts.iter().enumerate() {
            let ns = net.ns(h);
            let port = net.switch_port(h);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "e0", "netns", &ns,
            ]);
            sh(&["ip", "link", "set", &port, "netns", &sw]);
            sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                "e0",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("fd77::{}/64", i + 1),
                "dev",
                "e0",
                "nodad",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "e0", "up"]);
        }
        net
    }

    /// Adds a "pod": its own namespace behind a veth whose other end is in `node`, routed the way routed
    /// CNIs (Calico) do it: the pod has only /32 and /128 addresses and a default route to a link-local
    /// gateway the node's side answers for; the node has a host route per pod and forwards. Other nodes
    /// reach the pod through `node` (see [`route_pods`](Self::route_pods)).
    pub fn add_pod(&mut self, node: &str, pod: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
        let (pns, nns) = (self.ns(pod), self.ns(node));
        let host_side = format!("{}{pod}", self.prefix);
        sh(&["ip", "netns", "add", &pns]);
        self.hosts.push(pod.to_owned());
        sh(&[
            "ip", "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &pns,
        ]);
        sh(&["ip", "link", "set", &host_side, "netns", &nns]);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "set", "eth0", "up"],
            vec!["addr", "add", &format!("{v4}/32"), "dev", "eth0"],
            vec!["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"],
            vec!["route", "add", "169.254.1.1", "dev", "eth0"],
            vec![
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
            vec![
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ],
        ] {
            let mut a = vec!["ip", "-n", &pns];
            a.extend(args);
            sh(&a);
        }
        for args in [
            vec!["link", "set", &host_side, "up"],
            vec!["addr", "add", "169.254.1.1/32", "dev", &host_side],
            vec!["addr", "add", "fe80::1/64", "dev", &host_side, "nodad"],
            vec!["route", "add", &format!("{v4}/32"), "dev", &host_side],
            vec![
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                &host_side,
            ],
        ] {
            let mut a = vec!["ip", "-n", &nns];
            a.extend(args);
            sh(&a);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &nns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
    }

    /// Puts the hosts `remote` in a second region: their switch ports move to a second bridge, joined to
    /// the first only through a namespace `wan` where `strait bench wan-relay` (started here, its output
    /// in `log`) copies frames between the two bridges with `delay` (e.g. `25ms`) each way.
    pub fn split_by_wan(&mut self, remote: &[&str], delay: &str, log: &Path) -> Proc {
        let (sw, wan) = (self.ns("sw"), self.ns("wan"));
        sh(&["ip", "-n", &sw, "link", "add", "br1", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br1", "up"]);
        for h in remote {
            sh(&[
                "ip",
                "-n",
                &sw,
                "link",
                "set",
                &self.switch_port(h),
                "master",
                "br1",
            ]);
        }
        sh(&["ip", "netns", "add", &wan]);
        self.hosts.push("wan".into());
        sh(&[
            "ip",
            "netns",
            "exec",
            &wan,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        for (outer, inner, bridge) in [("wan0", "region0", "br0"), ("wan1", "region1", "br1")] {
            sh(&[
                "ip", "-n", &sw, "link", "add", outer, "type", "veth", "peer", "name", inner,
                "netns", &wan,
            ]);
            sh(&[
                "ip", "-n", &sw, "link", "set", outer, "master", bridge, "up",
            ]);
            sh(&["ip", "-n", &wan, "link", "set", "dev", inner, "up"]);
        }
        let relay = self.spawn(
            "wan",
            None,
            &[
                env!("CARGO_BIN_EXE_strait"),
                "bench",
                "wan-relay",
                "--interface",
                "region0",
                "--interface",
                "region1",
                "--delay",
                delay,
            ],
            log,
        );
        // Ready once both packet sockets are bound (their protocol, column 4, is set at bind).
        self.eventually(Duration::from_secs(5), "the WAN relay", || {
            let table = self.run("wan", None, &["cat", "/proc/net/packet"]);
            String::from_utf8_lossy(&table.stdout)
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(3).is_some_and(|p| p != "0000"))
                .count()
                >= 2
        });
        relay
    }

    /// Routes a node's pod networks (`v4net`, `v6net`) from every other host through that node.
    pub fn route_pods(&self, node: &str, v4net: &str, v6net: &str, via: &[&str]) {
        for other in via {
            let ns = self.ns(other);
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                v4net,
                "via",
                &self.v4(node).to_string(),
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                v6net,
                "via",
                &self.v6(node).to_string(),
            ]);
        }
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The bridge-side name of a host's veth (in the switch namespace): where a capture sees its traffic.
    pub fn switch_port(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h == host)
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    pub fn v4(&self, host: &str) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, self.index(host) as u8 + 1)
    }

    pub fn v6(&self, host: &str) -> Ipv6Addr {
        format!("fd77::{}", self.index(host) + 1).parse().unwrap()
    }

    fn command(&self, host: &str, uid: Option<u32>, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]);
        if let Some(u) = uid {
            cmd.args([
                "setpriv",
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--clear-groups",
            ]);
        }
        cmd.args(args);
        cmd.env_remove("STRAIT_CONFIG");
        cmd
    }

    /// Runs a command in `host` (as `uid` when given) and waits for it.
    pub fn run(&self, host: &str, uid: Option<u32>, args: &[&str]) -> Output {
        self.command(host, uid, args)
            .output()
            .expect("ip netns exec")
    }

    /// curl in `host` (as `uid`), at most `max_secs`: the HTTP status, "000" when the connection failed.
    pub fn http_code(
        &self,
        host: &str,
        uid: Option<u32>,
        url: &str,
        extra: &[&str],
        max_secs: u32,
    ) -> String {
        let max = max_secs.to_string();
        let mut args = vec![
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            &max,
        ];
        args.extend(extra);
        args.push(url);
        let out = self.run(host, uid, &args);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts tcpdump on `host`'s switch port, writing to `file` (its log beside it, `FILE.log`), and waits
    /// until it listens; the returned Proc is stopped with SIGINT.
    pub fn capture(&self, host: &str, file: &Path) -> Proc {
        let port = self.switch_port(host);
        let log = file.with_file_name(format!(
            "{}.log",
            file.file_name().unwrap().to_string_lossy()
        ));
        // Debian's tcpdump drops to its own user after opening the device; -Z root keeps it able to write
        // into the test's private directory.
        let p = self.spawn(
            "sw",
            None,
            &[
                "tcpdump",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                &port,
                "-U",
                "-s",
                "0",
                "-w",
                file.to_str().unwrap(),
            ],
            &log,
        );
        self.eventually(Duration::from_secs(10), "tcpdump listening", || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
        });
        p
    }

    /// Starts a long-running command in `host`, its output appended to `log`.
    pub fn spawn(&self, host: &str, uid: Option<u32>, args: &[&str], log: &Path) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = file.try_clone().unwrap();
        // Its own process group: whatever it forks (socat's `fork` children, a server's workers) is
        // killed with it when the harness is dropped.
        let child = self
            .command(host, uid, args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .expect("spawn in namespace");
        let mut c = self.children.lock().unwrap();
        c.push((args.join(" "), child));
        Proc(c.len() - 1)
    }

    /// The process id of a started process (`ip netns exec` execs the command, so it is the command's).
    pub fn pid(&self, p: Proc) -> u32 {
        self.children.lock().unwrap()[p.0].1.id()
    }

    pub fn signal(&self, p: Proc, sig: libc::c_int) {
        let c = self.children.lock().unwrap();
        // SAFETY: kill with a pid we started.
        unsafe {
            libc::kill(c[p.0].1.id() as libc::pid_t, sig);
        }
    }

    /// A real resolver on `host`: dnsmasq listening on `addr` only, answering from `records` (dnsmasq
    /// options: `--address=/NAME/IP`, `--txt-record=…`), upstream of nothing, logging every query it sees
    /// to `queries` (so a test can show what never reached it). Its own output goes to `log`.
    pub fn dnsmasq(
        &self,
        host: &str,
        addr: &str,
        records: &[String],
        queries: &Path,
        log: &Path,
    ) -> Proc {
        let listen = format!("--listen-address={addr}");
        let facility = format!("--log-facility={}", queries.display());
        let mut args = vec![
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &listen,
            "--user=root",
            "--pid-file=",
            "--log-queries",
            &facility,
        ];
        args.extend(records.iter().map(String::as_str));
        self.spawn(host, None, &args, log)
    }

    /// `dig` on `host` (as `uid`), one try of 3 s: what it printed.
    pub fn dig(&self, host: &str, uid: Option<u32>, args: &[&str]) -> String {
        let mut all = vec!["dig", "+time=3", "+tries=1"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&self.run(host, uid, &all).stdout).into_owned()
    }

    /// Waits for a process to exit, up to `timeout`; returns its exit status if it did.
    pub fn wait(&self, p: Proc, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.children.lock().unwrap()[p.0].1.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until `check` holds (or panics with `what` after `timeout`).
    pub fn eventually(&self, timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(mut c) = self.children.lock() {
            for (_, child) in c.iter_mut() {
                // SAFETY: kill of the process group this harness created (the child leads it).
                unsafe {
                    libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for h in self.hosts.iter().chain(std::iter::once(&"sw".to_string())) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
        }
    }
}
