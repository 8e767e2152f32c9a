//! `strait proxy`.

use std::net::IpAddr;

use anyhow::{anyhow, Context as _};
use strait_control::registry::NodeName;
use strait_policy::hostname::HostName;
use strait_proxy::dns::HostRule;
use strait_proxy::run::{run as run_proxy, Bootstrap, ProxyOptions, OUTBOUND_PORT, TUNNEL_PORT};
use strait_proxy::tunnel::EgressRule;

use crate::cli::{GatewayArgs, JoinArgs, ProxyArgs, ProxyMode};

/// `strait node uninstall`.
pub fn uninstall() -> anyhow::Result<()> {
    if !has_net_admin() {
        return Err(anyhow!(
            "removing the capture rules needs CAP_NET_ADMIN: run it as root"
        ));
    }
    // The TPROXY route exists only in Kubernetes mode; removing an absent one is a no-op.
    strait_proxy::capture::uninstall(true).context("removing the capture rules")?;
    println!("capture rules removed: this node's workloads are no longer captured by the mesh");
    Ok(())
}

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    if !has_net_admin() {
        return Err(anyhow!(
            "strait proxy needs CAP_NET_ADMIN (nftables rules, socket marks, conntrack): run it as root, or as the strait-proxy systemd unit (user strait with ambient CAP_NET_ADMIN and CAP_NET_RAW)"
        ));
    }
    // regorus captures backtraces on internal errors under a global lock; never pay that in the proxy.
    // Sound here: no other thread runs yet (the runtime starts below).
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    raise_open_files_limit();
    let (control, node, bootstrap, data_dir) = joining(args.join, args.mode)?;
    let (mut egress, mut egress_hosts) = (Vec::new(), Vec::new());
    for e in &args.egress {
        // An address or CIDR if it parses as one, else a DNS name.
        match EgressRule::parse(e) {
            Ok(rule) => egress.push(rule),
            Err(cidr_error) => egress_hosts.push(HostRule::parse(e).map_err(|name_error| {
                anyhow!("--allow-egress {e:?} is neither an address ({cidr_error}) nor a DNS name ({name_error})")
            })?),
        }
    }
    let dns_zone = HostName::parse(&args.dns_zone)
        .map_err(|e| anyhow!("--dns-zone {:?} is not a DNS name: {e}", args.dns_zone))?;
    let dns_cluster_domain = match (&args.dns_cluster_domain, args.mode) {
        (Some(d), _) if d.is_empty() => None,
        (Some(d), _) => Some(
            HostName::parse(d)
                .map_err(|e| anyhow!("--dns-cluster-domain {d:?} is not a DNS name: {e}"))?,
        ),
        (None, ProxyMode::Kubernetes) => Some(
            HostName::parse(strait_proxy::dns::DEFAULT_CLUSTER_DOMAIN)
                .map_err(|e| anyhow!("the default cluster domain: {e}"))?,
        ),
        (None, ProxyMode::Vm) => None,
    };
    if args.allow_kubelet_probes && args.mode != ProxyMode::Kubernetes {
        return Err(anyhow!(
            "--allow-kubelet-probes is for --mode kubernetes (VM workloads declare PERMISSIVE ports instead)"
        ));
    }
    let mut dns_resolvers = args.dns_resolvers;
    if dns_resolvers.is_empty() {
        // In Kubernetes mode the DaemonSet runs with dnsPolicy ClusterFirstWithHostNet, so this file
        // names the cluster DNS Service: the resolver the node's pods use.
        dns_resolvers = std::fs::read_to_string(RESOLV_CONF)
            .map(|text| nameservers(&text))
            .unwrap_or_default();
        if dns_resolvers.is_empty() {
            tracing::warn!(
                file = RESOLV_CONF,
                "no --dns-resolver and no nameserver found: only mesh names resolve for workloads"
            );
        } else {
            tracing::info!(resolvers = ?dns_resolvers, "resolvers for allowed names from {RESOLV_CONF}");
        }
    }
    let opts = ProxyOptions {
        control,
        remove_rules_on_exit: args.on_exit == crate::cli::OnExit::RemoveRules,
        node,
        bootstrap,
        data_dir,
        addresses: args.addresses,
        tunnel_port: TUNNEL_PORT,
        outbound_port: OUTBOUND_PORT,
        admin: args.admin,
        dns_resolvers,
        dns_cluster_domain,
        dns_zone,
        egress,
        egress_hosts,
        drain_timeout: args.drain_timeout,
        policy_bundle: args.policy_bundle,
        distributor_tcp_only: args.distributor_tcp_only,
        decision_log_allow_sample: args.decision_log_allow_sample,
        auto_detect_timeout: args.auto_detect_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
        health: args.health_listen,
        allow_kubelet_probes: args.allow_kubelet_probes,
        gateway: None,
    };
    start(opts, args.worker_threads)
}

/// The join token given, if any. An empty STRAIT_JOIN_TOKEN (the packaged env file after the first
/// join) means none.
/// The control plane, node name, way of joining and data directory of a proxy or gateway.
fn joining(
    join: JoinArgs,
    mode: ProxyMode,
) -> anyhow::Result<(String, NodeName, Bootstrap, std::path::PathBuf)> {
    // An empty STRAIT_JOIN_TOKEN (the packaged proxy.env after the first join) means no token.
    let given = join.token.as_ref().filter(|t| !t.trim().is_empty());
    let token = match (given, &join.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(strait_control::init::read_token_file(f)?),
        (None, None) => None,
    };
    let bootstrap = match mode {
        ProxyMode::Vm => Bootstrap::JoinToken(token),
        ProxyMode::Kubernetes if token.is_some() => {
            return Err(anyhow!(
                "--mode kubernetes joins with the service-account token (--service-account-token-file); drop --token/--token-file"
            ))
        }
        ProxyMode::Kubernetes => Bootstrap::ServiceAccount {
            token_file: join.service_account_token_file,
            trust_bundle: join.trust_bundle,
        },
    };
    let node = NodeName::new(&join.node).map_err(|e| anyhow!("--node {:?}: {e}", join.node))?;
    Ok((join.control, node, bootstrap, join.data_dir))
}

/// `strait gateway`: the proxy in gateway mode (no capture, so no CAP_NET_ADMIN needed).
pub fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    if args.advertise.ip().is_unspecified() || args.advertise.ip().is_loopback() {
        return Err(anyhow!(
            "--advertise {} is not an address partners can dial: give the organisation's public address (or the load balancer's) and port",
            args.advertise
        ));
    }
    // As the proxy's: no regorus backtraces; sound, no other thread runs yet.
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    raise_open_files_limit();
    let (control, node, bootstrap, data_dir) = joining(args.join, args.mode)?;
    let opts = ProxyOptions {
        control,
        remove_rules_on_exit: false,
        node,
        bootstrap,
        data_dir,
        addresses: Vec::new(),
        tunnel_port: TUNNEL_PORT,
        outbound_port: OUTBOUND_PORT,
        admin: args.admin,
        dns_resolvers: Vec::new(),
        dns_cluster_domain: None,
        dns_zone: HostName::parse(strait_proxy::dns::DEFAULT_ZONE)
            .map_err(|e| anyhow!("the default zone: {e}"))?,
        egress: Vec::new(),
        egress_hosts: Vec::new(),
        drain_timeout: args.drain_timeout,
        policy_bundle: None,
        distributor_tcp_only: args.distributor_tcp_only,
        decision_log_allow_sample: 0,
        auto_detect_timeout: strait_proxy::l7::limits::FIRST_BYTES_TIMEOUT,
        idle_timeout: strait_proxy::l7::limits::IDLE_TIMEOUT,
        max_connections: args.max_connections,
        health: args.health_listen,
        allow_kubelet_probes: false,
        gateway: Some(strait_proxy::run::GatewaySettings {
            listen: args.listen,
            advertise: args.advertise,
        }),
    };
    start(opts, args.worker_threads)
}

/// Runs the proxy (or gateway) on a runtime of `workers` threads (0: one per CPU) until a signal.
fn start(opts: ProxyOptions, workers: usize) -> anyhow::Result<()> {
    // Before the runtime's threads exist: taking them clears the activation variables.
    let activated =
        strait_proxy::sockets::activated_listeners().context("taking the activated sockets")?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        runtime.worker_threads(workers);
    }
    runtime
        .enable_all()
        .on_thread_park(give_back_memory)
        .build()
        .context("starting the runtime")?
        .block_on(
            async move { run_proxy(opts, activated, super::control::shutdown_signal()).await },
        )
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Called by a runtime worker each time it runs out of work: at most once a second per worker, ask the
/// allocator to return the pages this thread freed (connections closed, a burst over) to the system, so that
/// the proxy's memory goes back near idle after load instead of staying at its peak.
fn give_back_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            last.set(Some(now));
            crate::sys::allocator_give_back();
        }
    });
}

/// The `nameserver` addresses of a resolv.conf (an IPv6 zone suffix such as `%eth0` is dropped).
fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// Every proxied connection holds two descriptors (the caller's and the workload's or the tunnel's): the
/// soft limit a shell gives (often 1 024) would cap a proxy at a few hundred connections. Raise it to the
/// hard limit, as servers do (the systemd units set both to 1 048 576).
fn raise_open_files_limit() {
    if let Some((from, to)) = crate::sys::raise_open_files_limit() {
        tracing::debug!(from, to, "raised the open files limit");
    }
}

/// Whether this process holds CAP_NET_ADMIN in its effective set (root usually does; the systemd unit grants
/// it as an ambient capability to the unprivileged `strait` user).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::nameservers;

    #[test]
    fn nameservers_of_a_cluster_resolv_conf() {
        let text = "search shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n# nameserver 1.1.1.1\nnameserver fd00:10:96::a\nnameserver fe80::1%eth0\nnameserver junk\noptions ndots:5\n";
        let got: Vec<String> = nameservers(text).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["10.96.0.10", "fd00:10:96::a", "fe80::1"]);
    }
}
