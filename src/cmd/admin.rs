//! Admin commands against the control plane: join tokens, workloads, apply, status.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::Method;
use strait_ca::SpiffeId;
use strait_control::api::{self, paths};
use strait_control::client::decode;
use strait_control::dist::hub::DistributionStatus;
use strait_control::dist::keys::KeyStatus;
use strait_control::registry::{NodeName, PortSpec, Protocol, Selector, Workload};
use strait_control::store::ApplyReport;

use super::conn::admin_client;
use super::table;
use crate::cli::{
    CaRotationCommand, ConnArgs, DistributionKeyCommand, NodeCommand, OutputFormat, TokenCommand,
    WorkflowCommand, WorkloadCommand,
};

pub async fn node(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Uninstall => super::proxy::uninstall(),
        NodeCommand::Token(TokenCommand::Create {
            node,
            ttl,
            gateway,
            conn,
        }) => {
            let node = NodeName::new(&node).map_err(|e| anyhow!("--node {node:?}: {e}"))?;
            let client = admin_client(&conn)?;
            let resp: api::TokenResponse = client
                .post(
                    paths::ADMIN_TOKENS,
                    &api::TokenRequest {
                        node: node.clone(),
                        ttl_secs: Some(ttl.as_secs().max(1)),
                        gateway,
                    },
                )
                .await?;
            eprintln!(
                "one-time join token for {} {node}, valid until {}:",
                if gateway { "gateway" } else { "node" },
                fmt_time(resp.expires_at)
            );
            println!("{}", resp.token);
            Ok(())
        }
    }
}

fn parse_port(s: &str) -> anyhow::Result<PortSpec> {
    let (port, proto) = match s.split_once('/') {
        Some((p, proto)) => (p, Some(proto)),
        None => (s, None),
    };
    let port: u16 =
        port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
            anyhow!("--port {s:?}: expected PORT or PORT/PROTOCOL, e.g. 8080/http")
        })?;
    let protocol = match proto {
        None | Some("auto") => Protocol::Auto,
        Some("http") => Protocol::Http,
        Some("http2") => Protocol::Http2,
        Some("grpc") => Protocol::Grpc,
        Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            bail!("--port {s:?}: unknown protocol {other:?} (http, http2, grpc, tcp, auto; udp for plaintext UDP outside the mesh)")
        }
    };
    Ok(PortSpec::new(port, protocol))
}

pub async fn workload(cmd: WorkloadCommand) -> anyhow::Result<()> {
    match cmd {
        WorkloadCommand::Add {
            id,
            node,
            uid,
            ip,
            ports,
            conn,
        } => {
            let mut ports = ports
                .iter()
                .map(|p| parse_port(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            ports.sort_by_key(|p| p.port);
            let w = Workload {
                id: SpiffeId::parse(&id).with_context(|| format!("--id {id:?}"))?,
                node: NodeName::new(&node).map_err(|e| anyhow!("--node {node:?}: {e}"))?,
                selector: match uid {
                    Some(u) => Selector::Uid(u),
                    None => Selector::Ips(ip),
                },
                ports,
                probe_ports: Vec::new(),
            };
            let client = admin_client(&conn)?;
            let resp: api::ChangeResponse = client.post(paths::ADMIN_WORKLOADS, &w).await?;
            println!("{}: {:?}", w.id, resp.change);
            Ok(())
        }
        WorkloadCommand::List { output, conn } => {
            let list: Vec<Workload> = admin_client(&conn)?.get(paths::ADMIN_WORKLOADS).await?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                OutputFormat::Text => print!("{}", workload_table(&list)),
            }
            Ok(())
        }
        WorkloadCommand::Remove { id, conn } => {
            let id = SpiffeId::parse(&id).with_context(|| format!("--id {id:?}"))?;
            let resp: api::RemoveResponse = admin_client(&conn)?
                .post(
                    paths::ADMIN_WORKLOADS_REMOVE,
                    &api::RemoveRequest { id: id.clone() },
                )
                .await?;
            if !resp.removed {
                bail!("{id} is not registered (nothing removed)");
            }
            println!("{id}: removed");
            Ok(())
        }
    }
}

pub async fn apply(file: PathBuf, conn: ConnArgs) -> anyhow::Result<()> {
    let mut text = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut text)?;
    } else {
        text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    }
    let is_json = file.extension().is_some_and(|e| e == "json");
    let ct = if is_json {
        "application/json"
    } else {
        "application/yaml"
    };
    let client = admin_client(&conn)?;
    let (status, body) = client
        .raw(
            Method::POST,
            paths::ADMIN_APPLY,
            Some(ct),
            Bytes::from(text),
        )
        .await?;
    let report: ApplyReport = decode(status, &body).with_context(|| file.display().to_string())?;
    println!(
        "{}: {} created, {} updated, {} unchanged",
        file.display(),
        report.created,
        report.updated,
        report.unchanged
    );
    Ok(())
}

pub async fn status(output: OutputFormat, conn: ConnArgs) -> anyhow::Result<()> {
    let st: api::Status = admin_client(&conn)?.get(paths::ADMIN_STATUS).await?;
    if output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!(
        "trust domain {}   registry revision {}   CA valid until {}",
        st.trust_domain,
        st.revision,
        fmt_time(st.ca_not_after)
    );
    println!("\nNODES ({})", st.nodes.len());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = st
        .nodes
        .iter()
        .map(|n| {
            let expiry = if n.record.cert_not_after <= now {
                format!("{} (EXPIRED)", fmt_time(n.record.cert_not_after))
            } else {
                format!(
                    "{} (in {})",
                    fmt_time(n.record.cert_not_after),
                    humantime::format_duration(Duration::from_secs(n.record.cert_not_after - now))
                )
            };
            let reached = match (&n.record.tunnel_address, &n.record.gateway_address) {
                (_, Some(g)) => format!("{g} (gateway)"),
                (Some(t), None) => t.clone(),
                (None, None) => "-".into(),
            };
            vec![
                n.record.name.to_string(),
                reached,
                n.last_seen_secs_ago
                    .map(|s| format!("{}s ago", s))
                    .unwrap_or_else(|| "not since restart".into()),
                expiry,
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &["NAME", "TUNNEL ADDRESS", "LAST SEEN", "CERT EXPIRES"],
            &rows
        )
    );
    println!("\nWORKLOADS ({})", st.workloads.len());
    print!("{}", workload_table(&st.workloads));
    print!("{}", plaintext_table(&st.workloads));
    println!("\nWORKFLOWS ({})", st.workflows.len());
    for w in &st.workflows {
        println!("  {}  (applied {})", w.name, fmt_time(w.applied_at));
    }
    print!("{}", distribution_table(&st.distribution, st.nodes.len()));
    print!("\n{}", key_status_text(&st.distribution.keys));
    print!("\n{}", ca_status_text(&st.ca));
    print!("{}", federation_text(&st.federation, now));
    Ok(())
}

/// The partners: bundle age, exports, imports and each cross-organisation step's state.
fn federation_text(partners: &[api::PartnerStatus], now: u64) -> String {
    if partners.is_empty() {
        return String::new();
    }
    let mut out = format!("\nFEDERATION ({} partners)\n", partners.len());
    for p in partners {
        out.push_str(&format!(
            "  {}  bundle sequence {}, fetched {}s ago{}\n",
            p.trust_domain,
            p.sequence,
            now.saturating_sub(p.fetched_at),
            p.last_error
                .as_ref()
                .map(|e| format!(" (LAST REFRESH FAILED: {e})"))
                .unwrap_or_default()
        ));
        for e in &p.exports {
            out.push_str(&format!("    exported to them: {}\n", e.workload));
        }
        for i in &p.imports {
            out.push_str(&format!("    imported from them: {i}\n"));
        }
        if let Some(e) = &p.imports_error {
            out.push_str(&format!("    IMPORTS: {e}\n"));
        }
        for s in &p.steps {
            out.push_str(&format!(
                "    step {} → {} ({}): {}\n",
                s.from,
                s.to,
                s.workflow,
                s.state.describe()
            ));
        }
    }
    out
}

fn distribution_table(d: &DistributionStatus, nodes: usize) -> String {
    let mut out = String::new();
    match d.latest {
        Some(n) => out.push_str(&format!(
            "\nMESH VERSION {n} ({})   rollout: {}/{} connected proxies applied it, {} nodes registered{}\n",
            d.latest_hash.as_deref().map_or("-", |h| &h[..h.len().min(12)]),
            d.rollout_acked,
            d.connected,
            nodes,
            d.rollout_seconds
                .map(|s| format!(", completed {:.0} ms after apply", s * 1000.0))
                .unwrap_or_default()
        )),
        None => out.push_str("\nMESH VERSION none yet\n"),
    }
    let rows: Vec<Vec<String>> = d
        .proxies
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                if p.connected {
                    format!(
                        "yes ({})",
                        p.transport.map_or("-".into(), |t| t.to_string())
                    )
                } else {
                    format!("no (since {})", fmt_time(p.since))
                },
                p.applied.map_or("-".into(), |v| v.to_string()),
                match (&p.last_nack, d.latest) {
                    (Some(n), _) => format!("NACK v{}: {}", n.number, n.error),
                    (None, Some(l)) if p.applied == Some(l) => "ACK (latest)".into(),
                    (None, _) => "behind".into(),
                },
            ]
        })
        .collect();
    out.push_str(&table::render(
        &["PROXY", "CONNECTED", "VERSION", "STATE"],
        &rows,
    ));
    out
}

fn ca_status_text(c: &api::CaStatus) -> String {
    let rows: Vec<Vec<String>> = c
        .authorities
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                match a.state.as_str() {
                    "active" => "active (signs SVIDs)".to_owned(),
                    "prepared" => "prepared (trusted, signs nothing yet)".to_owned(),
                    "retiring" => "retiring (trusted until withdrawn)".to_owned(),
                    other => other.to_owned(),
                },
                if a.since == 0 {
                    "-".into()
                } else {
                    fmt_time(a.since)
                },
                fmt_time(a.not_after),
                a.withdraw_after.map_or("-".into(), fmt_time),
            ]
        })
        .collect();
    let mut out = format!(
        "CA AUTHORITIES (bundle {})\n",
        &c.bundle_fingerprint[..c.bundle_fingerprint.len().min(16)]
    );
    out.push_str(&table::render(
        &["ROOT", "STATE", "SINCE", "VALID UNTIL", "WITHDRAW AFTER"],
        &rows,
    ));
    if c.last_step_at > 0 {
        if c.nodes_behind.is_empty() {
            out.push_str("every registered node renewed since the last step\n");
        } else {
            out.push_str(&format!(
                "not renewed since the last step: {}\n",
                c.nodes_behind.join(", ")
            ));
        }
    }
    out
}

pub async fn ca_rotation(cmd: CaRotationCommand) -> anyhow::Result<()> {
    let step = |path, force, validity: Option<Duration>| {
        let request = api::CaStepRequest {
            force,
            validity_secs: validity.map(|v| v.as_secs()),
        };
        (Some((path, request)), OutputFormat::Text)
    };
    let ((path, output), conn) = match cmd {
        CaRotationCommand::Status { output, conn } => ((None, output), conn),
        CaRotationCommand::Prepare { validity, conn } => {
            (step(paths::ADMIN_CA_PREPARE, false, Some(validity)), conn)
        }
        CaRotationCommand::Activate { force, conn } => {
            (step(paths::ADMIN_CA_ACTIVATE, force, None), conn)
        }
        CaRotationCommand::Withdraw { force, conn } => {
            (step(paths::ADMIN_CA_WITHDRAW, force, None), conn)
        }
    };
    let client = admin_client(&conn)?;
    let c: api::CaStatus = match path {
        Some((p, request)) => client.post(p, &request).await?,
        None => client.get(paths::ADMIN_CA).await?,
    };
    if output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", ca_status_text(&c));
    }
    Ok(())
}

fn key_status_text(k: &KeyStatus) -> String {
    let mut out = format!("DISTRIBUTION KEY {}", k.active);
    match (&k.next, k.announced_in) {
        (Some(next), announced) => {
            out.push_str(&format!(
                "   rotation prepared: next key {next}{}",
                announced.map_or(String::new(), |n| format!(", announced in version {n}"))
            ));
            if k.waiting_for.is_empty() {
                out.push_str("; every registered node has it (ready to activate)");
            } else {
                out.push_str(&format!("; waiting for {}", k.waiting_for.join(", ")));
            }
        }
        (None, _) => out.push_str("   no rotation under way"),
    }
    out.push('\n');
    out
}

pub async fn distribution_key(cmd: DistributionKeyCommand) -> anyhow::Result<()> {
    match cmd {
        DistributionKeyCommand::Status { output, conn } => {
            let k: KeyStatus = admin_client(&conn)?
                .get(paths::ADMIN_DISTRIBUTION_KEY)
                .await?;
            if output == OutputFormat::Json {
                println!("{}", serde_json::to_string_pretty(&k)?);
            } else {
                print!("{}", key_status_text(&k));
            }
        }
        DistributionKeyCommand::Prepare { conn } => {
            let k: KeyStatus = admin_client(&conn)?
                .post(
                    paths::ADMIN_DISTRIBUTION_KEY_PREPARE,
                    &serde_json::json!({}),
                )
                .await?;
            print!("{}", key_status_text(&k));
        }
        DistributionKeyCommand::Activate { force, conn } => {
            let k: KeyStatus = admin_client(&conn)?
                .post(
                    paths::ADMIN_DISTRIBUTION_KEY_ACTIVATE,
                    &api::KeyActivateRequest { force },
                )
                .await?;
            print!("{}", key_status_text(&k));
        }
        DistributionKeyCommand::Rotate { timeout, conn } => {
            let client = admin_client(&conn)?;
            let k: KeyStatus = client
                .post(
                    paths::ADMIN_DISTRIBUTION_KEY_PREPARE,
                    &serde_json::json!({}),
                )
                .await?;
            print!("{}", key_status_text(&k));
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let k: KeyStatus = client.get(paths::ADMIN_DISTRIBUTION_KEY).await?;
                if k.waiting_for.is_empty() {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    bail!(
                        "after {}, {} still lack the next key; the rotation stays prepared: check them with `strait status`, then run `strait distribution-key activate` (or --force)",
                        humantime::format_duration(timeout),
                        k.waiting_for.join(", ")
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let k: KeyStatus = client
                .post(
                    paths::ADMIN_DISTRIBUTION_KEY_ACTIVATE,
                    &api::KeyActivateRequest { force: false },
                )
                .await?;
            print!("{}", key_status_text(&k));
        }
    }
    Ok(())
}

pub async fn workflow(cmd: WorkflowCommand) -> anyhow::Result<()> {
    match cmd {
        WorkflowCommand::Apply {
            file,
            custom,
            wait,
            conn,
        } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let modules = custom
                .iter()
                .map(|p| {
                    Ok(strait_control::store::CustomModule {
                        file: p
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        source: std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))?,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = admin_client(&conn)?;
            let started = std::time::Instant::now();
            let resp: api::WorkflowApplyResponse = client
                .post(
                    paths::ADMIN_WORKFLOWS,
                    &api::WorkflowApplyRequest { yaml, modules },
                )
                .await
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let change = serde_json::to_value(resp.change)?;
            match resp.version {
                Some(v) => println!(
                    "workflow {} {}; mesh version {v}",
                    resp.name,
                    change.as_str().unwrap_or("")
                ),
                None => println!("workflow {} unchanged", resp.name),
            }
            if let (Some(limit), Some(v)) = (wait, resp.version) {
                loop {
                    let st: api::Status = client.get(paths::ADMIN_STATUS).await?;
                    let d = &st.distribution;
                    let behind: Vec<&str> = d
                        .proxies
                        .iter()
                        .filter(|p| p.connected && p.applied.is_none_or(|a| a < v))
                        .map(|p| p.node.as_str())
                        .collect();
                    let nacked: Vec<String> = d
                        .proxies
                        .iter()
                        .filter_map(|p| {
                            p.last_nack
                                .as_ref()
                                .filter(|n| n.number == v)
                                .map(|n| format!("{}: {}", p.node, n.error))
                        })
                        .collect();
                    if !nacked.is_empty() {
                        bail!("version {v} refused by: {}", nacked.join("; "));
                    }
                    if behind.is_empty() {
                        println!(
                            "every connected proxy ({}) applied version {v} in {} ms",
                            d.connected,
                            started.elapsed().as_millis()
                        );
                        break;
                    }
                    if started.elapsed() > limit {
                        bail!(
                            "after {}: still waiting for {}",
                            humantime::format_duration(limit),
                            behind.join(", ")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Ok(())
        }
        WorkflowCommand::Graph { file, out } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let wf = strait_policy::workflow::Workflow::from_yaml(&text)
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            std::fs::write(&out, strait_policy::graph::svg(&wf))
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        WorkflowCommand::List { output, conn } => {
            let list: Vec<api::WorkflowSummary> =
                admin_client(&conn)?.get(paths::ADMIN_WORKFLOWS).await?;
            if output == OutputFormat::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|w| {
                    vec![
                        w.name.clone(),
                        fmt_time(w.applied_at),
                        w.modules.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["NAME", "APPLIED", "CUSTOM MODULES"], &rows)
            );
            Ok(())
        }
        WorkflowCommand::Show { name, conn } => {
            let w: strait_control::store::WorkflowRecord = admin_client(&conn)?
                .get(&format!("{}{name}", paths::ADMIN_WORKFLOW_PREFIX))
                .await?;
            print!("{}", w.yaml);
            for m in &w.modules {
                println!("\n# --- custom module {} ---\n{}", m.file, m.source);
            }
            Ok(())
        }
        WorkflowCommand::Delete { name, conn } => {
            let r: api::WorkflowDeleteResponse = admin_client(&conn)?
                .post(
                    paths::ADMIN_WORKFLOWS_DELETE,
                    &api::WorkflowDeleteRequest { name: name.clone() },
                )
                .await?;
            match (r.deleted, r.version) {
                (true, Some(v)) => println!("workflow {name} deleted; mesh version {v}"),
                (true, None) => println!("workflow {name} deleted"),
                (false, _) => bail!("no workflow named {name} (see `strait workflow list`)"),
            }
            Ok(())
        }
    }
}

/// What crosses the network outside the mesh's guarantees, declared by operators: plaintext UDP ports and
/// PERMISSIVE ports. Printed so that nobody has to read every workload to know.
fn plaintext_table(list: &[Workload]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .flat_map(|w| {
            w.ports.iter().filter_map(move |p| {
                let what = if p.is_udp() {
                    format!("{}/udp", p.port)
                } else if p.permissive {
                    format!("{}/tcp (permissive)", p.port)
                } else {
                    return None;
                };
                Some(vec![w.id.to_string(), w.node.to_string(), what])
            })
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "\nPLAINTEXT, OUTSIDE THE MESH'S GUARANTEES ({}): not encrypted, not authenticated, not decided by policy\n{}",
        rows.len(),
        table::render(&["WORKLOAD", "NODE", "PORT"], &rows)
    )
}

fn workload_table(list: &[Workload]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            vec![
                w.id.to_string(),
                w.node.to_string(),
                match &w.selector {
                    Selector::Uid(u) => format!("uid {u}"),
                    Selector::Ips(ips) => ips
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                },
                w.ports
                    .iter()
                    .map(|p| {
                        let proto = serde_json::to_value(p.protocol)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default();
                        format!(
                            "{}/{}{}",
                            p.port,
                            proto,
                            if p.permissive { " (permissive)" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    table::render(&["ID", "NODE", "SELECTOR", "PORTS"], &rows)
}

pub(super) fn fmt_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
