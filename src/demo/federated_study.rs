//! `strait bench study --federated`: the study's latency experiment (`strait bench study`) on the
//! study's deployment (`strait demo --federated`): five organisations, each its own control plane, CA,
//! trust domain and private network, in two regions 25 ms apart, joined only through their gateways.
//!
//! Direct is what organisations do without a mesh: each publishes its services on its border with a port
//! forward (DNAT to the private address; the source's border masquerades as for any outbound traffic), and
//! a step inside one organisation goes to the private address. Then the forwards go, the proxies and
//! gateways start, and each mesh scenario is applied by every organisation to its own part of the
//! workflow (padding included: +10 000 is 10 000 extra steps in each organisation's policy).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use strait_policy::workflow::Workflow;

use super::federated::{self, Deployment, Org};
use super::lab::Lab;
use super::mesh::PORT;
use super::study::{self, Pair, Plan};

/// The first port of a border's forwards (one per service, in the organisation's order).
const FORWARD_BASE: u16 = 18000;
/// The nftables table of the forwards (in each border's namespace).
const FORWARD_TABLE: &str = "sdemo_direct";
/// The target the issue set for the inter-region overhead over direct (ms).
const OVERHEAD_TARGET_MS: f64 = 1.0;

pub fn run(samples: usize, scenarios: &[String], out_dir: PathBuf) -> anyhow::Result<()> {
    super::preflight("bench study --federated", &[("tc", "iproute2")])?;
    let out_dir = federated::out_dir_at(out_dir)?;
    federated::in_deployment(|lab, wf, orgs, state, exe| {
        let remote: Vec<String> = orgs
            .iter()
            .filter(|o| federated::remote(o))
            .flat_map(|o| o.services.clone())
            .collect();
        let plan = Plan::new(wf, remote, scenarios, samples)?;
        let dep = Deployment::federate(lab, wf, orgs, exe, state, &out_dir)?;
        let near = orgs.iter().find(|o| !federated::remote(o));
        let far = orgs.iter().find(|o| federated::remote(o));
        let one_way = match (near, far) {
            (Some(near), Some(far)) => {
                Some(plan.measure_wan(lab, &near.border(), &far.border())?)
            }
            _ => None,
        };
        dep.start_workloads()?;

        let mut cells = Vec::new();
        publish_directly(lab, orgs, true)?;
        let direct = |p: &Pair| -> anyhow::Result<(u32, String)> {
            let (from, to) = (
                federated::org_of(orgs, &p.src)?,
                federated::org_of(orgs, &p.dst)?,
            );
            let url = if from.name == to.name {
                format!("http://{}:{PORT}{}", lab.v4(&p.dst), p.path)
            } else {
                format!(
                    "http://{}:{}{}",
                    lab.v4(&to.border()),
                    forward_port(to, &p.dst)?,
                    p.path
                )
            };
            Ok((dep.mesh(&from.name)?.uid(&p.src), url))
        };
        plan.measure(lab, "direct", &direct, &mut cells)?;
        // The mesh replaces the forwards: nothing of an organisation is published but its gateway.
        publish_directly(lab, orgs, false)?;

        let reach = dep.enforce(wf, exe, &out_dir)?;
        let through_mesh = |p: &Pair| -> anyhow::Result<(u32, String)> {
            let from = federated::org_of(orgs, &p.src)?;
            let addr = reach
                .get(&from.name)
                .and_then(|r| r.get(&p.dst))
                .ok_or_else(|| anyhow!("{} did not import {}", from.name, p.dst))?;
            Ok((
                dep.mesh(&from.name)?.uid(&p.src),
                format!("http://{addr}:{PORT}{}", p.path),
            ))
        };
        let parts: Vec<(&Org, Workflow)> = orgs
            .iter()
            .map(|o| {
                let yaml = federated::workflow_of(wf, orgs, o)?;
                Ok((o, Workflow::from_yaml(&yaml)?))
            })
            .collect::<anyhow::Result<_>>()?;
        for &scenario in &plan.scenarios {
            for (org, part) in &parts {
                let doc = study::variant(part, &allow_all(org, part), scenario)?;
                dep.mesh(&org.name)?
                    .apply_workflow(&doc, "180s")
                    .with_context(|| format!("{} applying the {scenario} workflow", org.name))?;
            }
            plan.measure(lab, scenario, &through_mesh, &mut cells)?;
        }
        plan.report(
            &cells,
            "five organisations, through their gateways",
            &out_dir,
        )?;
        targets(&plan, &cells, one_way);
        Ok(())
    })
}

/// The allow-all scenario of one organisation's part: every ordered pair of the services its part
/// names with at least one end its own (the other organisations decide for theirs).
fn allow_all(org: &Org, part: &Workflow) -> Vec<(String, String)> {
    let services: Vec<String> = part
        .actors
        .iter()
        .flat_map(|a| a.services.iter().map(|s| s.name.clone()))
        .collect();
    study::every_pair(&services)
        .into_iter()
        .filter(|(a, b)| org.services.contains(a) || org.services.contains(b))
        .collect()
}

/// Where `org`'s border forwards to `service` (direct placement).
fn forward_port(org: &Org, service: &str) -> anyhow::Result<u16> {
    org.services
        .iter()
        .position(|s| s == service)
        .and_then(|k| u16::try_from(k).ok())
        .map(|k| FORWARD_BASE + k)
        .ok_or_else(|| anyhow!("{} does not run {service}", org.name))
}

/// Adds (or, with `on` false, removes) every border's port forwards to its services.
fn publish_directly(lab: &Lab, orgs: &[Org], on: bool) -> anyhow::Result<()> {
    for org in orgs {
        let rules = if on {
            let mut forwards = String::new();
            for s in &org.services {
                forwards.push_str(&format!(
                    " iifname \"e0\" tcp dport {} dnat to {}:{PORT};",
                    forward_port(org, s)?,
                    lab.v4(s)
                ));
            }
            format!(
                "table ip {FORWARD_TABLE} {{ chain pre {{ type nat hook prerouting priority dstnat; policy accept;{forwards} }}; }}"
            )
        } else {
            format!("delete table ip {FORWARD_TABLE}")
        };
        let out = lab.run(&org.border(), None, &["nft", &rules])?;
        if !out.status.success() {
            bail!(
                "the port forwards of {}: {}",
                org.border(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The targets, from this run: inter-region overhead over direct ≤ 1 ms, and flat in policy
/// size (the largest policy measured against the workflow itself). Direct pays two WAN round trips on a
/// new connection (the TCP handshake, then the request) where the mesh pays one (the connection ends at
/// the local proxy; the request rides a tunnel already open), so the overhead is also given over the
/// network's floor: one round trip as measured (`one_way` × 2).
fn targets(plan: &Plan, cells: &[study::Cell], one_way: Option<f64>) {
    let Some(direct) = study::median(cells, "inter", "direct") else {
        return;
    };
    let floor = one_way.map(|w| 2.0 * w);
    println!(
        "\ntargets (inter-region medians of this run; direct {direct:.2} ms{}):",
        floor.map_or(String::new(), |f| format!(", one WAN round trip {f:.2} ms"))
    );
    for &scenario in &plan.scenarios {
        if let Some(m) = study::median(cells, "inter", scenario) {
            let over = m - direct;
            println!(
                "  {scenario:<10} {over:+.2} ms over direct ({}){}",
                if over <= OVERHEAD_TARGET_MS {
                    "within 1 ms"
                } else {
                    "MORE than 1 ms"
                },
                floor.map_or(String::new(), |f| format!(
                    ", {:+.2} ms over one round trip",
                    m - f
                ))
            );
        }
    }
    let largest = plan.scenarios.iter().rev().find(|s| s.starts_with('+'));
    if let (Some(largest), Some(minimal)) = (largest, study::median(cells, "inter", "minimal")) {
        if let Some(m) = study::median(cells, "inter", largest) {
            println!("  policy size: {largest} vs minimal {:+.2} ms", m - minimal);
        }
    }
    println!("  (direct opens its TCP connection across the WAN: two round trips; through the mesh the connection ends at the local proxy and the request takes the tunnel it keeps open to the partner's gateway: one)");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orgs() -> Vec<Org> {
        vec![
            Org {
                name: "owner".into(),
                services: vec!["owner".into()],
            },
            Org {
                name: "vfx".into(),
                services: vec!["vfx-1".into(), "vfx-2".into()],
            },
        ]
    }

    #[test]
    fn each_service_of_a_border_has_its_own_forward() {
        let o = orgs();
        assert_eq!(forward_port(&o[1], "vfx-1").unwrap(), 18000);
        assert_eq!(forward_port(&o[1], "vfx-2").unwrap(), 18001);
        assert!(forward_port(&o[0], "vfx-1").is_err());
    }

    #[test]
    fn an_organisation_allows_all_only_where_it_is_one_end() {
        let wf = Workflow::from_yaml(super::super::BUILTIN).unwrap();
        let o: Vec<Org> = wf
            .actors
            .iter()
            .map(|a| Org {
                name: a.name.clone(),
                services: a.services.iter().map(|s| s.name.clone()).collect(),
            })
            .collect();
        let owner = &o[0];
        let part = Workflow::from_yaml(&federated::workflow_of(&wf, &o, owner).unwrap()).unwrap();
        let pairs = allow_all(owner, &part);
        assert!(!pairs.is_empty());
        assert!(pairs
            .iter()
            .all(|(a, b)| owner.services.contains(a) || owner.services.contains(b)));
        // Every scenario of the part is a workflow the control plane accepts.
        for scenario in study::SCENARIOS {
            let doc = study::variant(&part, &pairs, scenario).unwrap();
            Workflow::from_yaml(&doc).unwrap();
        }
    }
}
