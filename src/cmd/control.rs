//! `strait control` and `strait control init`.

use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use strait_ca::TrustDomain;
use strait_control::init::{init, CaSource, InitOptions};
use strait_control::server::{serve, serve_monitoring, State};
use tracing::info;

use crate::cli::{ControlArgs, ControlCommand};

pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    match args.command {
        Some(ControlCommand::Init {
            data_dir,
            trust_domain,
            server,
            keep_existing,
            ca,
        }) => {
            if keep_existing
                && data_dir
                    .join(strait_control::server::layout::STORE)
                    .exists()
            {
                println!(
                    "{} already holds a control plane; keeping it (--keep-existing)",
                    data_dir.display()
                );
                return Ok(());
            }
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            strait_control::client::parse_server(&server)
                .map_err(|_| anyhow!("--server {server:?}: expected HOST:PORT, e.g. 10.0.0.5:15012 or strait-control.strait-system.svc:15012"))?;
            let ca = CaSource::from_files(
                ca.from_cert.as_deref(),
                ca.from_key.as_deref(),
                ca.chain.as_deref(),
                ca.validity,
            )?;
            let out = init(InitOptions {
                data_dir: data_dir.clone(),
                trust_domain: td.clone(),
                server: server.clone(),
                ca,
            })?;
            println!(
                "created control plane for trust domain {td} in {}",
                data_dir.display()
            );
            println!("admin token: {} (mode 0600)", out.token_file.display());
            println!("next:");
            println!(
                "  strait control --data-dir {} --listen {server} &",
                data_dir.display()
            );
            println!("  export STRAIT_CONFIG={}", out.context_file.display());
            println!("  strait status");
            Ok(())
        }
        None => {
            let data_dir = args.run.data_dir.ok_or_else(|| {
                anyhow!("--data-dir is required (create one with `strait control init --data-dir DIR --trust-domain TD`)")
            })?;
            let kube = kubernetes_parts(&args.run.kubernetes)?;
            let state = Arc::new(State::open_with(&data_dir, args.run.svid_ttl, kube)?);
            let listen = args.run.listen;
            let monitoring: Option<std::net::SocketAddr> = match args.run.monitoring.as_str() {
                "off" => None,
                a => Some(a.parse().map_err(|_| {
                    anyhow!(
                        "--monitoring {a:?}: expected ADDRESS:PORT (e.g. 127.0.0.1:15014) or off"
                    )
                })?),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let shutdown = shutdown_signal();
                    let listener =
                        tokio::net::TcpListener::bind(listen)
                            .await
                            .with_context(|| {
                                format!("cannot listen on {listen} (in use? pass --listen ADDR)")
                            })?;
                    if let Some(addr) = monitoring {
                        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                            format!("cannot listen on {addr} for monitoring (in use? pass --monitoring ADDR or off)")
                        })?;
                        tokio::spawn(serve_monitoring(state.clone(), l));
                    }
                    state.start_kubernetes();
                    strait_control::systemd::spawn_watchdog();
                    strait_control::systemd::ready(&format!("serving the API on {listen}"));
                    serve(state, listener, async {
                        shutdown.await;
                        strait_control::systemd::stopping();
                    })
                    .await
                })
        }
    }
}

/// The Kubernetes client and settings when `--kubernetes` is given.
fn kubernetes_parts(
    args: &crate::cli::KubernetesArgs,
) -> anyhow::Result<Option<strait_control::kube::KubeParts>> {
    use strait_control::kube::client::{KubeClient, KubeConfig, SA_DIR};
    if !args.kubernetes {
        return Ok(None);
    }
    let server = match &args.kube_api_server {
        Some(s) => s.clone(),
        None => KubeConfig::in_cluster()?.server,
    };
    let config = KubeConfig {
        server,
        ca_file: args.kube_ca_file.clone(),
        token_file: args.kube_token_file.clone(),
    };
    let client = KubeClient::new(&config).context("--kubernetes")?;
    let namespace = match &args.kube_namespace {
        Some(n) => n.clone(),
        None => std::fs::read_to_string(std::path::Path::new(SA_DIR).join("namespace"))
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                anyhow!("cannot read this pod's namespace from {SA_DIR}/namespace ({e}); pass --kube-namespace")
            })?,
    };
    info!(server = %config.server, %namespace, "Kubernetes mode");
    Ok(Some(strait_control::kube::KubeParts {
        client,
        settings: strait_control::kube::KubeSettings {
            namespace,
            proxy_service_account: args.proxy_service_account.clone(),
            proxy_daemonset: args.proxy_daemonset.clone(),
            gateway_service_account: args.gateway_service_account.clone(),
            gateway_deployment: args.gateway_deployment.clone(),
            list_page_size: args.kube_list_page_size,
        },
    }))
}

/// Resolves on SIGTERM or SIGINT.
///
/// The handlers are installed when this is called (inside the runtime), not when the future is first
/// polled: call it before binding the listeners, so that a SIGTERM that arrives once the port answers is
/// never met by the default action (which exits with a signal status instead of shutting down).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the process still stops on the default action.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    }
}
