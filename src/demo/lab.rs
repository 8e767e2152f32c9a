//! Hosts made of network namespaces for `strait demo`: a switch namespace with a bridge, one namespace per
//! host on a veth pair, `10.78.0.N/24` and `fd78::N/64`. Everything it creates carries the prefix
//! `sdemo-`, so a run interrupted by a crash can be cleaned by the next one, and [`Lab::teardown`] (also on
//! drop and on Ctrl-C) kills what it started and deletes the namespaces, which removes their links and
//! nftables tables with them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub const PREFIX: &str = "sdemo-";

pub struct Lab {
    hosts: Vec<String>,
    /// Hosts on a border host's private network (see [`Lab::with_hosts`]): their index there.
    private: std::collections::HashMap<String, u8>,
    children: Mutex<Vec<(String, Child)>>,
    wan: Mutex<WanLink>,
}

/// How the two regions are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WanLink {
    /// One region only.
    Absent,
    /// A veth pair `wan0`–`wan1` between the bridges; `tc netem` on both ends when a delay is set.
    Veth,
    /// The kernel has no `sch_netem`: `wan0` and `wan1` lead to a namespace of their own where
    /// `strait bench wan-relay` (this pid) copies frames between them with the delay.
    Relay { pid: u32 },
}

/// What carries the delay between the regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanMethod {
    Netem,
    Relay,
}

impl std::fmt::Display for WanMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WanMethod::Netem => "tc netem",
            WanMethod::Relay => "strait bench wan-relay (no sch_netem in this kernel)",
        })
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces left by an earlier run that did not finish.
pub fn stale() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(PREFIX))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub fn delete_namespaces(names: &[String]) {
    for n in names {
        // Processes still inside would keep the namespace's nftables alive; kill them first.
        let _ = Command::new("ip")
            .args(["netns", "pids", n])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        crate::sys::signal(p, libc::SIGKILL);
                    }
                }
            });
        let _ = Command::new("ip").args(["netns", "del", n]).output();
    }
}

/// Packet sockets bound to a protocol, from `/proc/net/packet` (columns: sk RefCnt Type Proto Iface …).
fn bound_packet_sockets(table: &str) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3).is_some_and(|p| p != "0000"))
        .count()
}

impl Lab {
    /// Hosts listed in `remote` sit on a second bridge (`br1`), joined to the first by a veth pair
    /// (`wan0`–`wan1`): the "WAN" where [`Lab::set_wan_delay`] adds latency between the two regions
    /// only, with one queueing discipline per direction and no packet filters.
    ///
    /// Hosts on private networks: each `(host, border)` of `behind` sits
    /// behind `border` at `10.9.0.(2 + k)` (k counts the hosts behind that border), the same addresses
    /// behind every border, as organisations' private ranges overlap. A private host's default route
    /// leads to its border, which forwards and masquerades its IPv4 traffic to the bridge (an
    /// organisation's NAT); nothing on the bridge can route to a private host.
    pub fn with_hosts(
        hosts: &[&str],
        remote: &[&str],
        behind: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut private = std::collections::HashMap::new();
        let mut all: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        for (host, border) in behind {
            let k = behind
                .iter()
                .take_while(|(h, _)| h != host)
                .filter(|(_, b)| b == border)
                .count();
            private.insert(host.to_string(), k as u8);
            all.push(host.to_string());
        }
        let lab = Self {
            hosts: all,
            private,
            children: Mutex::new(Vec::new()),
            wan: Mutex::new(if remote.is_empty() {
                WanLink::Absent
            } else {
                WanLink::Veth
            }),
        };
        let sw = lab.ns("sw");
        sh(&["ip", "netns", "add", &sw])?;
        sh(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        if !remote.is_empty() {
            sh(&["ip", "-n", &sw, "link", "add", "br1", "type", "bridge"])?;
            sh(&["ip", "-n", &sw, "link", "set", "br1", "up"])?;
            sh(&[
                "ip", "-n", &sw, "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
            ])?;
            sh(&[
                "ip", "-n", &sw, "link", "set", "wan0", "master", "br0", "up",
            ])?;
            sh(&[
                "ip", "-n", &sw, "link", "set", "wan1", "master", "br1", "up",
            ])?;
        }
        for (i, h) in hosts.iter().enumerate() {
            let ns = lab.ns(h);
            let port = format!("sd{i}");
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "e0", "netns", &ns,
            ])?;
            sh(&["ip", "link", "set", &port, "netns", &sw])?;
            let bridge = if remote.contains(h) { "br1" } else { "br0" };
            sh(&[
                "ip", "-n", &sw, "link", "set", &port, "master", bridge, "up",
            ])?;
            let v4 = format!("{}/24", lab.v4(h));
            let v6 = format!("{}/64", lab.v6(h));
            sh(&["ip", "-n", &ns, "addr", "add", &v4, "dev", "e0"])?;
            sh(&["ip", "-n", &ns, "addr", "add", &v6, "dev", "e0", "nodad"])?;
            sh(&["ip", "-n", &ns, "link", "set", "e0", "up"])?;
        }
        let mut natted = Vec::new();
        for (i, (host, border)) in behind.iter().enumerate() {
            lab.put_behind(host, border, &format!("sdp{i}"))?;
            if !natted.contains(border) {
                natted.push(*border);
                let rules = "table ip sdemo_nat { chain post { type nat hook postrouting priority srcnat; policy accept; ip saddr 10.9.0.0/24 oifname \"e0\" masquerade; }; }";
                let out = lab.run(border, None, &["nft", rules])?;
                if !out.status.success() {
                    bail!(
                        "the NAT of {border}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        Ok(lab)
    }

    /// `host`'s namespace behind `border` on a veth pair (`link` on the border's side), routed as
    /// [`Lab::with_hosts`] says.
    fn put_behind(&self, host: &str, border: &str, link: &str) -> anyhow::Result<()> {
        let (ns, bns) = (self.ns(host), self.ns(border));
        let (v4, v6) = (self.v4(host), self.v6(host));
        sh(&["ip", "netns", "add", &ns])?;
        sh(&[
            "ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        sh(&["ip", "link", "set", link, "netns", &bns])?;
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
        ] {
            let mut a = vec!["ip", "-n", &ns];
            a.extend(args);
            sh(&a)?;
        }
        for args in [
            vec!["link", "set", link, "up"],
            vec!["addr", "add", "169.254.1.1/32", "dev", link],
            vec!["route", "add", &format!("{v4}/32"), "dev", link],
        ] {
            let mut a = vec!["ip", "-n", &bns];
            a.extend(args);
            sh(&a)?;
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &bns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
    }

    /// Adds `delay` each way between the two regions, or removes it (`None`): `tc netem` on both ends of
    /// the WAN link where the kernel has `sch_netem`, else the userspace relay (`strait bench wan-relay`,
    /// which stays in the path from then on, with no delay when there is none to add).
    pub fn set_wan_delay(&self, delay: Option<Duration>) -> anyhow::Result<WanMethod> {
        let mut wan = self.wan.lock().unwrap_or_else(|p| p.into_inner());
        match *wan {
            WanLink::Absent => bail!("this lab has a single region: there is no WAN link"),
            WanLink::Veth => match self.netem(delay) {
                Ok(()) => Ok(WanMethod::Netem),
                Err(_) if delay.is_none() => Ok(WanMethod::Netem),
                Err(netem) => {
                    self.install_relay().with_context(|| {
                        format!("tc netem failed ({netem:#}), and so did the relay")
                    })?;
                    *wan = WanLink::Relay {
                        pid: self.start_relay(delay.unwrap_or_default())?,
                    };
                    Ok(WanMethod::Relay)
                }
            },
            WanLink::Relay { pid } => {
                self.stop(pid);
                *wan = WanLink::Relay {
                    pid: self.start_relay(delay.unwrap_or_default())?,
                };
                Ok(WanMethod::Relay)
            }
        }
    }

    /// Replaces the veth pair between the bridges with two pairs that lead to the relay's namespace
    /// (`wan`; its ends `region0` and `region1` carry no address and no IPv6, so that namespace only forwards).
    fn install_relay(&self) -> anyhow::Result<()> {
        let (sw, wan) = (self.ns("sw"), self.ns("wan"));
        sh(&["ip", "-n", &sw, "link", "del", "wan0"])?;
        sh(&["ip", "netns", "add", &wan])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &wan,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        for (outer, inner, bridge) in [("wan0", "region0", "br0"), ("wan1", "region1", "br1")] {
            sh(&[
                "ip", "-n", &sw, "link", "add", outer, "type", "veth", "peer", "name", inner,
                "netns", &wan,
            ])?;
            sh(&[
                "ip", "-n", &sw, "link", "set", outer, "master", bridge, "up",
            ])?;
            sh(&["ip", "-n", &wan, "link", "set", "dev", inner, "up"])?;
        }
        Ok(())
    }

    /// Starts the relay with `delay` and waits until it reads frames; returns its pid.
    fn start_relay(&self, delay: Duration) -> anyhow::Result<u32> {
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        let log = std::env::temp_dir().join(format!("{PREFIX}wan-relay.log"));
        let _ = std::fs::remove_file(&log);
        let ms = format!("{}ms", delay.as_millis());
        let pid = self.spawn(
            "wan",
            None,
            &[
                &exe,
                "bench",
                "wan-relay",
                "--interface",
                "region0",
                "--interface",
                "region1",
                "--delay",
                &ms,
            ],
            &log,
        )?;
        // Ready once both packet sockets are bound (their protocol is set at bind): a log line would
        // depend on STRAIT_LOG.
        self.eventually(Duration::from_secs(5), "the WAN relay", || {
            self.run("wan", None, &["cat", "/proc/net/packet"])
                .is_ok_and(|o| bound_packet_sockets(&String::from_utf8_lossy(&o.stdout)) >= 2)
        })
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
        Ok(pid)
    }

    /// Stops a process this lab started (SIGTERM, then SIGKILL after 2 s) and forgets it.
    fn stop(&self, pid: u32) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = children.iter().position(|(_, c)| c.id() == pid) {
            let (_, mut c) = children.remove(i);
            crate::sys::signal(pid as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `tc netem` with `delay` on both ends of the veth pair between the regions (none: removed).
    fn netem(&self, delay: Option<Duration>) -> anyhow::Result<()> {
        let sw = self.ns("sw");
        for dev in ["wan0", "wan1"] {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", &sw, "tc", "qdisc", "del", "dev", dev, "root",
                ])
                .output();
            if let Some(d) = delay {
                let ms = format!("{}ms", d.as_millis());
                sh(&[
                    "ip", "netns", "exec", &sw, "tc", "qdisc", "add", "dev", dev, "root", "netem",
                    "delay", &ms,
                ])?;
            }
        }
        Ok(())
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{PREFIX}{host}")
    }

    fn index(&self, host: &str) -> usize {
        self.hosts.iter().position(|h| h == host).unwrap_or(0)
    }

    pub fn v4(&self, host: &str) -> Ipv4Addr {
        match self.private.get(host) {
            Some(k) => Ipv4Addr::new(10, 9, 0, k + 2),
            None => Ipv4Addr::new(10, 78, 0, self.index(host) as u8 + 1),
        }
    }

    pub fn v6(&self, host: &str) -> Ipv6Addr {
        match self.private.get(host) {
            Some(k) => Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, u16::from(*k) + 2),
            None => Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, self.index(host) as u16 + 1),
        }
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
        cmd
    }

    pub fn run(&self, host: &str, uid: Option<u32>, args: &[&str]) -> anyhow::Result<Output> {
        self.command(host, uid, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} in {host}", args.join(" ")))
    }

    /// Starts a long-running command in `host`, its output appended to `log`; returns its pid.
    pub fn spawn(
        &self,
        host: &str,
        uid: Option<u32>,
        args: &[&str],
        log: &Path,
    ) -> anyhow::Result<u32> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = file.try_clone()?;
        let child = self
            .command(host, uid, args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} in {host}", args.join(" ")))?;
        let pid = child.id();
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((args.join(" "), child));
        Ok(pid)
    }

    /// Polls `check` until it holds, or fails with `what` after `timeout`.
    pub fn eventually(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out after {timeout:?} waiting for {what}")
    }

    /// Stops everything: SIGTERM (proxies remove their rules and drain), then SIGKILL, then the namespaces.
    pub fn teardown(&self) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        for (_, c) in children.iter() {
            crate::sys::signal(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in children.iter_mut() {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        children.clear();
        let mut names: Vec<String> = self.hosts.iter().map(|h| self.ns(h)).collect();
        // The relay's namespace exists only once the relay was needed; deleting a missing one is a no-op.
        names.extend([self.ns("sw"), self.ns("wan")]);
        delete_namespaces(&names);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}
