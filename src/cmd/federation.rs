//! `strait federation`: relationships with other organisations' trust domains.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use strait_control::api::{self, paths, Federation, FederationList, FederationTarget};

use super::admin::fmt_time;
use super::conn::admin_client;
use super::table;
use crate::cli::{FederationCommand, OutputFormat};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `120` → "2m ago"; 0 → "never".
fn ago(t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    let secs = now().saturating_sub(t);
    format!(
        "{} ago",
        humantime::format_duration(std::time::Duration::from_secs(secs))
    )
}

fn describe(f: &Federation) -> String {
    let mut out = format!(
        "{}  endpoint {} ({})\n  bundle sequence {}, fingerprint {}\n  refreshed {} (every {} s), last attempt {}\n",
        f.trust_domain,
        f.endpoint,
        f.endpoint_id,
        f.sequence,
        f.fingerprint,
        ago(f.fetched_at),
        f.refresh_hint_secs,
        ago(f.attempted_at),
    );
    if let Some(e) = &f.last_error {
        out.push_str(&format!(
            "  LAST REFRESH FAILED: {e}\n  (the bundle in force is {} old)\n",
            ago(f.fetched_at).trim_end_matches(" ago")
        ));
    }
    for r in &f.roots {
        out.push_str(&format!(
            "  root {}  expires {}  sha256 {}\n",
            r.subject,
            fmt_time(r.not_after),
            r.sha256
        ));
    }
    for e in &f.exports {
        let ports = if e.ports.is_empty() {
            "every TCP port".to_owned()
        } else {
            let p: Vec<String> = e.ports.iter().map(u16::to_string).collect();
            format!("ports {}", p.join(","))
        };
        out.push_str(&format!("  exported to them: {} ({ports})\n", e.workload));
    }
    for w in &f.imports {
        let p: Vec<String> = w
            .ports
            .iter()
            .map(|p| format!("{}/{:?}", p.port, p.protocol).to_lowercase())
            .collect();
        let a: Vec<String> = w.addresses.iter().map(ToString::to_string).collect();
        let via = match &w.reach {
            strait_control::api::Reach::Tunnel(t) => format!("its node's tunnel {t}"),
            strait_control::api::Reach::Gateways(g) => {
                let g: Vec<String> = g
                    .iter()
                    .map(|g| format!("{} ({})", g.address, g.id))
                    .collect();
                format!("gateway {}", g.join(", "))
            }
        };
        out.push_str(&format!(
            "  imported from them: {} at {} ports {} via {via}\n",
            w.id,
            a.join(","),
            p.join(","),
        ));
    }
    if let Some(e) = &f.imports_error {
        out.push_str(&format!("  IMPORTS: {e}\n"));
    }
    out
}

pub async fn run(cmd: FederationCommand) -> anyhow::Result<()> {
    match cmd {
        FederationCommand::Bundle { conn } => {
            let client = admin_client(&conn)?;
            let list: FederationList = client.get(paths::ADMIN_FEDERATION).await?;
            let bundle: serde_json::Value = client.get(paths::FEDERATION_BUNDLE).await?;
            let text = serde_json::to_string_pretty(&bundle)?;
            // The fingerprint of exactly what is printed, as the partner's `add` will compute it.
            let td = strait_ca::TrustDomain::new(&list.trust_domain)?;
            let parsed = strait_ca::SpiffeBundle::parse(td, text.as_bytes())?;
            println!("{text}");
            eprintln!(
                "trust domain {}, bundle sequence {}\nfingerprint: {}",
                list.trust_domain,
                parsed.sequence,
                parsed.bundle.fingerprint()
            );
        }
        FederationCommand::Add {
            trust_domain,
            endpoint,
            endpoint_id,
            bootstrap_bundle,
            fingerprint,
            conn,
        } => {
            let text = std::fs::read_to_string(&bootstrap_bundle).with_context(|| {
                format!(
                    "reading the bootstrap bundle {}",
                    bootstrap_bundle.display()
                )
            })?;
            let endpoint_id = endpoint_id.unwrap_or_else(|| {
                format!(
                    "spiffe://{}{}",
                    trust_domain.trim_start_matches("spiffe://"),
                    api::CONTROL_ID_PATH
                )
            });
            let f: Federation = admin_client(&conn)?
                .post(
                    paths::ADMIN_FEDERATION,
                    &api::FederationAdd {
                        trust_domain,
                        endpoint,
                        endpoint_id,
                        bootstrap_bundle: text,
                        fingerprint,
                    },
                )
                .await?;
            print!("federation added\n{}", describe(&f));
        }
        FederationCommand::List { output, conn } => {
            let list: FederationList = admin_client(&conn)?.get(paths::ADMIN_FEDERATION).await?;
            if output == OutputFormat::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "this trust domain: {} (bundle sequence {}, fingerprint {})\n",
                list.trust_domain, list.sequence, list.fingerprint
            );
            if list.egress_through_gateways {
                println!("connections to partners leave through this organisation's gateways (strait federation egress)\n");
            }
            if list.partners.is_empty() {
                println!("no federation: add one with `strait federation add`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .partners
                .iter()
                .map(|f| {
                    vec![
                        f.trust_domain.clone(),
                        f.endpoint.clone(),
                        f.sequence.to_string(),
                        f.roots.len().to_string(),
                        ago(f.fetched_at),
                        match &f.last_error {
                            None => "ok".into(),
                            Some(_) => "REFRESH FAILING (last good bundle in force)".into(),
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(
                    &[
                        "TRUST DOMAIN",
                        "ENDPOINT",
                        "SEQUENCE",
                        "ROOTS",
                        "REFRESHED",
                        "STATUS"
                    ],
                    &rows
                )
            );
            println!();
            for f in &list.partners {
                print!("{}", describe(f));
            }
        }
        FederationCommand::Refresh { trust_domain, conn } => {
            let out: Vec<Federation> = admin_client(&conn)?
                .post(
                    paths::ADMIN_FEDERATION_REFRESH,
                    &FederationTarget { trust_domain },
                )
                .await?;
            let mut failed = Vec::new();
            for f in &out {
                print!("{}", describe(f));
                if f.last_error.is_some() {
                    failed.push(f.trust_domain.clone());
                }
            }
            if !failed.is_empty() {
                anyhow::bail!(
                    "refreshing {} failed; the last good bundle stays in force",
                    failed.join(", ")
                );
            }
        }
        FederationCommand::Remove { trust_domain, conn } => {
            let answer: serde_json::Value = admin_client(&conn)?
                .post(
                    paths::ADMIN_FEDERATION_REMOVE,
                    &FederationTarget {
                        trust_domain: Some(trust_domain.clone()),
                    },
                )
                .await?;
            println!("federation with {trust_domain} removed");
            let naming: Vec<&str> = answer["workflows_naming_it"]
                .as_array()
                .map(|a| a.iter().filter_map(|w| w.as_str()).collect())
                .unwrap_or_default();
            if !naming.is_empty() {
                eprintln!(
                    "warning: workflows {} still name services of {trust_domain}: their steps with it are refused until it is federated again (edit or delete them)",
                    naming.join(", ")
                );
            }
        }
        FederationCommand::Export {
            trust_domain,
            workload,
            ports,
            conn,
        } => {
            let f = change_export(&conn, trust_domain, &workload, ports, false).await?;
            print!("{workload} exported\n{}", describe(&f));
        }
        FederationCommand::Unexport {
            trust_domain,
            workload,
            conn,
        } => {
            let f = change_export(&conn, trust_domain, &workload, Vec::new(), true).await?;
            print!("{workload} no longer exported\n{}", describe(&f));
        }
        FederationCommand::Egress {
            through_gateways,
            conn,
        } => egress(&conn, through_gateways == "on").await?,
    }
    Ok(())
}

/// `strait federation egress on|off`.
async fn egress(conn: &crate::cli::ConnArgs, on: bool) -> anyhow::Result<()> {
    let answer: serde_json::Value = admin_client(conn)?
        .post(
            paths::ADMIN_FEDERATION_EGRESS,
            &api::FederationEgress {
                through_gateways: on,
            },
        )
        .await?;
    let gateways = answer["gateways"].as_u64().unwrap_or(0);
    match (on, gateways) {
        (false, _) => println!("proxies dial partners themselves (egress through the gateways is off)"),
        (true, 0) => println!("connections to partners must leave through this organisation's gateways, and there is none: they are refused until one joins (strait node token create --gateway)"),
        (true, n) => println!("connections to partners leave through this organisation's {n} gateway(s) from the next mesh version on"),
    }
    Ok(())
}

/// `export` / `unexport`: one admin call, the partner's record as it is after it.
async fn change_export(
    conn: &crate::cli::ConnArgs,
    trust_domain: String,
    workload: &str,
    ports: Vec<u16>,
    remove: bool,
) -> anyhow::Result<Federation> {
    Ok(admin_client(conn)?
        .post(
            paths::ADMIN_FEDERATION_EXPORT,
            &api::FederationExport {
                trust_domain,
                workload: workload.to_owned(),
                ports,
                remove,
            },
        )
        .await?)
}
