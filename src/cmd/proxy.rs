//! `strait proxy`.

use anyhow::{anyhow, Context as _};
use strait_control::registry::NodeName;
use strait_proxy::run::{run as run_proxy, ProxyOptions, OUTBOUND_PORT, TUNNEL_PORT};
use strait_proxy::tunnel::EgressRule;

use crate::cli::ProxyArgs;

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(anyhow!(
            "strait proxy needs root (nftables rules and socket marks): run it with sudo or as the strait systemd unit"
        ));
    }
    // regorus captures backtraces on internal errors under a global lock; never pay that in the proxy.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(strait_control::init::read_token_file(f)?),
        (None, None) => None,
    };
    let egress = args
        .egress
        .iter()
        .map(|e| EgressRule::parse(e).map_err(|m| anyhow!("--allow-egress {m}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = ProxyOptions {
        control: args.control,
        node: NodeName::new(&args.node).map_err(|e| anyhow!("--node {:?}: {e}", args.node))?,
        token,
        data_dir: args.data_dir,
        addresses: args.addresses,
        tunnel_port: TUNNEL_PORT,
        outbound_port: OUTBOUND_PORT,
        admin: args.admin,
        dns_resolvers: args.dns_resolvers,
        egress,
        drain_timeout: args.drain_timeout,
        policy_bundle: args.policy_bundle,
        distributor_tcp_only: args.distributor_tcp_only,
        decision_log_allow_sample: args.decision_log_allow_sample,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run_proxy(opts, super::control::shutdown_signal()))
}
