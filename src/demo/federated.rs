//! `strait demo --federated`: the study's deployment. Each actor of the film workflow is an organisation
//! with its own trust domain, control plane, CA, private network (10.9.0.0/24 in every one: the ranges
//! overlap) and ingress gateway, on a border host that alone is on the shared network; owner, vfx and
//! color in one region, sound and hdr in the other, 25 ms apart. Organisations federate with the ones
//! they share a step with, export to each the services its steps reach, and apply their own part of the
//! workflow; then every ordered pair of services tries a POST and a GET carrying a marker, and the verdict
//! checks the table against the workflow and captures of both regions' networks and of every gateway host
//! against the marker.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use strait_policy::workflow::Workflow;

use super::lab::Lab;
use super::mesh::{Mesh, PORT};

/// The study's second region.
const REMOTE: [&str; 2] = ["sound", "hdr"];
const WAN_DELAY: Duration = Duration::from_millis(25);
const GATEWAY_PORT: u16 = 15009;

/// An organisation: one actor of the workflow.
pub(super) struct Org {
    pub(super) name: String,
    pub(super) services: Vec<String>,
}

impl Org {
    pub(super) fn trust_domain(&self) -> String {
        format!("{}.example", self.name)
    }

    /// The organisation's border host: its control plane and gateway, on the shared network.
    pub(super) fn border(&self) -> String {
        format!("{}-gw", self.name)
    }

    pub(super) fn id(&self, service: &str) -> String {
        format!("spiffe://{}/ns/movie/sa/{service}", self.trust_domain())
    }
}

pub fn run(out_dir: PathBuf) -> anyhow::Result<()> {
    super::preflight("demo --federated", &[])?;
    let out_dir = out_dir_at(out_dir)?;
    in_deployment(|lab, wf, orgs, state, exe| demo(lab, wf, orgs, state, &out_dir, exe))
}

/// `dir`, created, as an absolute path.
pub(super) fn out_dir_at(dir: PathBuf) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// Builds the hosts of the study's deployment (the built-in workflow's actors as organisations: a border
/// host each, their services' hosts behind it; the second region's borders behind the WAN link), runs
/// `f` in them, and takes everything down afterwards (also on Ctrl-C).
pub(super) fn in_deployment<T>(
    f: impl FnOnce(&Lab, &Workflow, &[Org], &Path, &str) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let l = super::load(None)?;
    let orgs: Vec<Org> =
        l.wf.actors
            .iter()
            .map(|a| Org {
                name: a.name.clone(),
                services: a.services.iter().map(|s| s.name.clone()).collect(),
            })
            .collect();
    let border_names: Vec<String> = orgs.iter().map(Org::border).collect();
    let borders: Vec<&str> = border_names.iter().map(String::as_str).collect();
    let behind: Vec<(&str, &str)> = orgs
        .iter()
        .zip(&border_names)
        .flat_map(|(o, b)| o.services.iter().map(move |s| (s.as_str(), b.as_str())))
        .collect();
    let remote: Vec<String> = REMOTE.iter().map(|r| format!("{r}-gw")).collect();
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
    println!(
        "building {} organisations: each a border host (control plane, gateway) and its services' hosts on a private network behind it (network namespaces {}*)",
        orgs.len(),
        super::lab::PREFIX
    );
    super::in_hosts(&borders, &remote, &behind, |lab, state, exe| {
        f(lab, &l.wf, &orgs, state, exe)
    })
}

/// Whether `org` is in the second region.
pub(super) fn remote(org: &Org) -> bool {
    REMOTE.contains(&org.name.as_str())
}

/// The organisation of a service.
pub(super) fn org_of<'a>(orgs: &'a [Org], service: &str) -> anyhow::Result<&'a Org> {
    orgs.iter()
        .find(|o| o.services.iter().any(|s| s == service))
        .ok_or_else(|| anyhow!("no organisation runs {service}"))
}

/// `org`'s own workflow: the steps that touch it, its actors by their full SPIFFE IDs.
pub(super) fn workflow_of(wf: &Workflow, orgs: &[Org], org: &Org) -> anyhow::Result<String> {
    let mut steps = String::new();
    let mut actors: BTreeSet<&str> = BTreeSet::from([org.name.as_str()]);
    for s in &wf.steps {
        let (from, to) = (org_of(orgs, &s.from)?, org_of(orgs, &s.to)?);
        if from.name != org.name && to.name != org.name {
            continue;
        }
        actors.extend([from.name.as_str(), to.name.as_str()]);
        let _ = writeln!(
            steps,
            "  - {{from: {}, to: {}, methods: [{}], paths: [{}]}}",
            s.from,
            s.to,
            s.methods.join(", "),
            s.paths.join(", ")
        );
    }
    let mut doc = format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: {}}}\ntrustDomain: {}\nactors:\n",
        wf.metadata.name,
        org.trust_domain()
    );
    for a in orgs.iter().filter(|o| actors.contains(o.name.as_str())) {
        let services: Vec<String> = a
            .services
            .iter()
            .map(|s| format!("{{name: {s}, id: \"{}\"}}", a.id(s)))
            .collect();
        let _ = writeln!(
            doc,
            "  - {{name: {}, services: [{}]}}",
            a.name,
            services.join(", ")
        );
    }
    Ok(format!("{doc}steps:\n{steps}"))
}

/// Where `src`'s organisation reaches each service: its own at their private addresses, each imported
/// one at the virtual address its control plane gave it (`strait federation list`).
pub(super) fn addresses(
    mesh: &Mesh,
    lab: &Lab,
    org: &Org,
    orgs: &[Org],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = org
        .services
        .iter()
        .map(|s| (s.clone(), lab.v4(s).to_string()))
        .collect();
    let listed = mesh.admin(&["federation", "list"])?;
    for other in orgs.iter().filter(|o| o.name != org.name) {
        for s in &other.services {
            let prefix = format!("imported from them: {} at ", other.id(s));
            if let Some(addr) = listed
                .lines()
                .find_map(|l| l.split_once(&prefix))
                .and_then(|(_, rest)| rest.split([' ', ',']).next())
            {
                out.insert(s.clone(), addr.to_owned());
            }
        }
    }
    Ok(out)
}

struct Row {
    src: String,
    dst: String,
    method: &'static str,
    inter_region: bool,
    expected: bool,
    code: String,
    seconds: f64,
    /// The destination was not imported by the source's organisation: sent to the destination
    /// organisation's public address instead, which the source proxy refuses as outside the mesh.
    not_imported: bool,
}

impl Row {
    fn allowed(&self) -> bool {
        !matches!(self.code.as_str(), "403" | "000")
    }

    fn got(&self) -> &'static str {
        match (self.code.as_str(), self.not_imported) {
            ("403", _) => "denied at the destination proxy (403)",
            ("000", true) => "refused at the source (not imported)",
            ("000", false) => "refused at the source (no step)",
            _ => "allowed",
        }
    }
}

fn demo(
    lab: &Lab,
    wf: &Workflow,
    orgs: &[Org],
    state: &Path,
    out: &Path,
    exe: &str,
) -> anyhow::Result<()> {
    let method = lab.set_wan_delay(Some(WAN_DELAY))?;
    println!(
        "regions: {} | {} ({} ms each way between them, by {method})",
        orgs.iter()
            .filter(|o| !remote(o))
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        REMOTE.join(", "),
        WAN_DELAY.as_millis()
    );
    let dep = Deployment::federate(lab, wf, orgs, exe, state, out)?;
    dep.start_workloads()?;
    let reach = dep.enforce(wf, exe, out)?;
    let meshes = &dep.meshes;
    let mesh = |org: &str| dep.mesh(org);
    let crossing = &dep.crossing;
    println!("every organisation enforces its part of the workflow; imports in force\n");
    print!("{}", federation_summary(orgs, meshes)?);

    // Captures: both regions' shared networks, and every interface of every gateway's host (the side
    // towards the private network included).
    let mut dumps = Vec::new();
    let places: Vec<(String, &str, String)> = [
        ("sw".to_owned(), "br0", "region-1".to_owned()),
        ("sw".to_owned(), "br1", "region-2".to_owned()),
    ]
    .into_iter()
    .chain(
        orgs.iter()
            .map(|o| (o.border(), "any", format!("gateway-host-{}", o.name))),
    )
    .collect();
    for (host, iface, name) in places {
        let pcap = out.join(format!("{name}.pcap"));
        let log = out.join(format!("{name}.pcap.log"));
        let _ = std::fs::remove_file(&pcap);
        let _ = std::fs::remove_file(&log);
        let pid = lab.spawn(
            &host,
            None,
            &[
                "tcpdump",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                iface,
                "-U",
                "-s",
                "0",
                "-w",
                &pcap.to_string_lossy(),
            ],
            &log,
        )?;
        lab.eventually(Duration::from_secs(10), "a packet capture", || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on"))
        })?;
        dumps.push((pid, name, pcap));
    }

    let marker = super::marker()?;
    let services: Vec<&str> = orgs
        .iter()
        .flat_map(|o| o.services.iter().map(String::as_str))
        .collect();
    println!(
        "\nsending a POST and a GET from every service to every other ({} requests), each carrying {marker}",
        services.len() * (services.len() - 1) * 2
    );
    let mut rows = Vec::new();
    for &src in &services {
        let from = org_of(orgs, src)?;
        let m = mesh(&from.name)?;
        for &dst in services.iter().filter(|d| **d != src) {
            let to = org_of(orgs, dst)?;
            let imported = reach.get(from.name.as_str()).and_then(|r| r.get(dst));
            // Not imported: the only address the source knows is the destination organisation's public one.
            let addr = imported
                .cloned()
                .unwrap_or_else(|| lab.v4(&to.border()).to_string());
            for method in ["POST", "GET"] {
                let (code, seconds) = super::curl(
                    lab,
                    src,
                    m.uid(src),
                    method,
                    &format!("http://{addr}:{PORT}/api/{dst}"),
                    &marker,
                )?;
                rows.push(Row {
                    src: src.to_owned(),
                    dst: dst.to_owned(),
                    method,
                    inter_region: remote(from) != remote(to),
                    expected: super::expected(wf, src, dst, method),
                    code,
                    seconds,
                    not_imported: imported.is_none(),
                });
            }
        }
    }
    for (pid, _, _) in &dumps {
        // Pids we started (ip netns exec execs tcpdump in place).
        crate::sys::signal(*pid as i32, libc::SIGINT);
    }
    std::thread::sleep(Duration::from_millis(700));

    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                format!(
                    "{} ({})",
                    r.src,
                    org_of(orgs, &r.src).map(|o| o.name.as_str()).unwrap_or("?")
                ),
                format!(
                    "{} ({})",
                    r.dst,
                    org_of(orgs, &r.dst).map(|o| o.name.as_str()).unwrap_or("?")
                ),
                r.method.to_owned(),
                if r.inter_region { "inter" } else { "intra" }.to_owned(),
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
                "REGIONS",
                "EXPECTED",
                "GOT",
                "LATENCY",
                ""
            ],
            &table
        )
    );
    let mut csv =
        String::from("source,destination,method,regions,expected,got,http_code,latency_ms\n");
    for r in &rows {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{:.3}",
            r.src,
            r.dst,
            r.method,
            if r.inter_region { "inter" } else { "intra" },
            if r.expected { "allowed" } else { "denied" },
            r.got(),
            r.code,
            r.seconds * 1000.0
        );
    }
    std::fs::write(out.join("results.csv"), csv)?;
    let svg = out.join(format!("{}.svg", wf.metadata.name));
    std::fs::write(&svg, strait_policy::graph::svg(wf))?;

    // Every capture saw traffic and none the marker.
    let mut leaks = Vec::new();
    let mut silent = Vec::new();
    println!("\nverdict");
    for (_, name, pcap) in &dumps {
        let bytes = std::fs::read(pcap).with_context(|| format!("reading {}", pcap.display()))?;
        let leaked = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
        let packets = lab
            .run(
                "sw",
                None,
                &["tcpdump", "-nn", "-r", &pcap.to_string_lossy()],
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
        println!(
            "  capture {name}: {packets} packets, marker found: {}",
            if leaked { "YES" } else { "no" }
        );
        if leaked {
            leaks.push(name.clone());
        }
        if packets == 0 {
            silent.push(name.clone());
        }
    }
    let wrong: Vec<&Row> = rows.iter().filter(|r| r.expected != r.allowed()).collect();
    let allowed = rows.iter().filter(|r| r.allowed()).count();
    let median = |inter: bool| {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|r| r.allowed() && r.inter_region == inter)
            .map(|r| r.seconds * 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    println!(
        "  {allowed} of {} requests allowed, {} expected by the workflow ({} steps, {} across organisations); mismatches: {}",
        rows.len(),
        rows.iter().filter(|r| r.expected).count(),
        wf.steps.len(),
        crossing.len(),
        wrong.len()
    );
    for (what, inter) in [("intra-region", false), ("inter-region", true)] {
        if let Some(m) = median(inter) {
            println!(
                "  median latency of allowed {what} requests (a new connection each): {m:.1} ms"
            );
        }
    }
    println!(
        "  workflow graph (coloured by organisation): {}   results: {}",
        svg.display(),
        out.join("results.csv").display()
    );
    if wrong.is_empty() && leaks.is_empty() && silent.is_empty() {
        println!("\nPASS: exactly the workflow's steps are allowed, each with both organisations' consent, and nothing crossed any network or gateway in clear");
        return Ok(());
    }
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
        "FAIL: {} mismatches, marker seen in {leaks:?}, captures without traffic {silent:?}; see the logs in {}",
        wrong.len(),
        out.display()
    )
}

/// A step from one organisation to another.
pub(super) struct Crossing<'o> {
    pub(super) from: &'o Org,
    pub(super) to: &'o Org,
    /// The destination service.
    pub(super) service: String,
}

/// The study's deployment, built in the phases the demo and the study share: control planes federated
/// ([`Deployment::federate`]), the services running without the mesh ([`Deployment::start_workloads`]; the
/// study measures its direct baseline here), then every organisation enforcing its part
/// ([`Deployment::enforce`]).
pub(super) struct Deployment<'a, 'o> {
    pub(super) lab: &'a Lab,
    pub(super) orgs: &'o [Org],
    pub(super) meshes: BTreeMap<&'o str, Mesh<'a>>,
    pub(super) crossing: Vec<Crossing<'o>>,
}

impl<'a, 'o> Deployment<'a, 'o> {
    /// Each organisation's control plane (its own CA) on its border host; then each pair of organisations
    /// that share a step exchanges bundles (out of band here: a file and the fingerprint read out), and
    /// nobody else.
    pub(super) fn federate(
        lab: &'a Lab,
        wf: &Workflow,
        orgs: &'o [Org],
        exe: &str,
        state: &Path,
        out: &Path,
    ) -> anyhow::Result<Self> {
        let meshes = start_controls(lab, orgs, exe, state, out)?;
        println!("{} control planes up, each with its own CA", orgs.len());
        let mut pairs: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut crossing = Vec::new();
        for s in &wf.steps {
            let (from, to) = (org_of(orgs, &s.from)?, org_of(orgs, &s.to)?);
            if from.name != to.name {
                pairs.insert((from.name.as_str(), to.name.as_str()));
                pairs.insert((to.name.as_str(), from.name.as_str()));
                crossing.push(Crossing {
                    from,
                    to,
                    service: s.to.clone(),
                });
            }
        }
        for &(org, partner) in &pairs {
            federate(lab, state, &meshes, orgs, org, partner)?;
        }
        println!(
            "{} federation relationships (each pair that shares a step, both ways)",
            pairs.len()
        );
        Ok(Self {
            lab,
            orgs,
            meshes,
            crossing,
        })
    }

    pub(super) fn mesh(&self, org: &str) -> anyhow::Result<&Mesh<'a>> {
        self.meshes
            .get(org)
            .ok_or_else(|| anyhow!("no organisation {org}"))
    }

    /// Every organisation's services registered under its trust domain and running (document stores),
    /// with no proxy yet.
    pub(super) fn start_workloads(&self) -> anyhow::Result<()> {
        for org in self.orgs {
            let m = self.mesh(&org.name)?;
            m.register(&ids(org))?;
            m.start_docstores()?;
        }
        Ok(())
    }

    /// A node proxy per service and a gateway per organisation; each destination organisation exports
    /// to the source's what its steps reach; each organisation applies its own part of the workflow and
    /// refreshes its imports. Returns, per organisation, where it reaches each service (its own at their
    /// private addresses, the imported ones at their virtual addresses), once every crossing step passes.
    pub(super) fn enforce(
        &self,
        wf: &Workflow,
        exe: &str,
        out: &Path,
    ) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
        let (lab, orgs) = (self.lab, self.orgs);
        for org in orgs {
            let m = self.mesh(&org.name)?;
            m.start_proxies()?;
            start_gateway(lab, m, org, exe, out)?;
        }
        println!(
            "{} services behind their organisations' NAT, each with its node proxy; a gateway per organisation",
            orgs.iter().map(|o| o.services.len()).sum::<usize>()
        );
        // Exports: the destination organisation lets the source's reach the service its step calls.
        let mut exported: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
        for c in &self.crossing {
            if exported.insert((&c.to.name, &c.from.name, &c.service)) {
                self.mesh(&c.to.name)?.admin(&[
                    "federation",
                    "export",
                    "--trust-domain",
                    &c.from.trust_domain(),
                    "--workload",
                    &c.to.id(&c.service),
                    "--port",
                    &PORT.to_string(),
                ])?;
            }
        }
        for org in orgs {
            self.mesh(&org.name)?
                .apply_workflow(&workflow_of(wf, orgs, org)?, "30s")?;
        }
        for org in orgs {
            self.mesh(&org.name)?.admin(&["federation", "refresh"])?;
        }
        let mut reach = BTreeMap::new();
        for org in orgs {
            reach.insert(
                org.name.clone(),
                addresses(self.mesh(&org.name)?, lab, org, orgs)?,
            );
        }
        // The imports reach the proxies with the next mesh version: wait until every crossing step passes.
        for c in &self.crossing {
            for src in wf
                .steps
                .iter()
                .filter(|s| s.to == c.service)
                .map(|s| s.from.as_str())
            {
                if org_of(orgs, src)?.name != c.from.name {
                    continue;
                }
                let addr = reach
                    .get(&c.from.name)
                    .and_then(|r| r.get(&c.service))
                    .ok_or_else(|| anyhow!("{} did not import {}", c.from.name, c.service))?;
                let url = format!("http://{addr}:{PORT}/api/{}", c.service);
                let m = self.mesh(&c.from.name)?;
                lab.eventually(
                    Duration::from_secs(30),
                    &format!(
                        "{src} → {} across organisations ({} → {})",
                        c.service, c.from.name, c.to.name
                    ),
                    || {
                        super::curl(lab, src, m.uid(src), "POST", &url, "warm-up")
                            .is_ok_and(|(code, _)| code == "201")
                    },
                )?;
            }
        }
        Ok(reach)
    }
}

/// `org`'s services' SPIFFE IDs.
fn ids(org: &Org) -> BTreeMap<String, String> {
    org.services
        .iter()
        .map(|s| (s.clone(), org.id(s)))
        .collect()
}

/// `org`'s services: registered under its trust domain, their document stores, and a node proxy each.
pub(super) fn start_services(mesh: &Mesh, org: &Org) -> anyhow::Result<()> {
    mesh.register(&ids(org))?;
    mesh.start_docstores()?;
    mesh.start_proxies()
}

/// Each organisation's control plane (its own CA and trust domain) on its border host.
pub(super) fn start_controls<'a, 'o>(
    lab: &'a Lab,
    orgs: &'o [Org],
    exe: &str,
    state: &Path,
    out: &Path,
) -> anyhow::Result<BTreeMap<&'o str, Mesh<'a>>> {
    let mut meshes = BTreeMap::new();
    for org in orgs {
        let mesh = Mesh::start_control(
            lab,
            &org.border(),
            exe,
            &state.join(&org.name),
            out,
            &org.trust_domain(),
            &org.services,
        )?;
        meshes.insert(org.name.as_str(), mesh);
    }
    Ok(meshes)
}

/// `org` federates with `partner`: the partner's bundle handed over out of band (a file and the
/// fingerprint read out), then `strait federation add` at `org`.
pub(super) fn federate(
    lab: &Lab,
    state: &Path,
    meshes: &BTreeMap<&str, Mesh>,
    orgs: &[Org],
    org: &str,
    partner: &str,
) -> anyhow::Result<()> {
    let mesh = |org: &str| {
        meshes
            .get(org)
            .ok_or_else(|| anyhow!("no organisation {org}"))
    };
    let p = org_of_name(orgs, partner)?;
    let bundle = mesh(partner)?.admin_output(&["federation", "bundle"])?;
    let file = state.join(format!("{partner}-bundle-for-{org}.json"));
    std::fs::write(&file, &bundle.stdout)?;
    let fingerprint = String::from_utf8_lossy(&bundle.stderr)
        .lines()
        .find_map(|l| {
            l.strip_prefix("fingerprint: ")
                .map(str::trim)
                .map(str::to_owned)
        })
        .ok_or_else(|| anyhow!("`strait federation bundle` printed no fingerprint"))?;
    mesh(org)?.admin(&[
        "federation",
        "add",
        "--trust-domain",
        &p.trust_domain(),
        "--endpoint",
        &format!("{}:15012", lab.v4(&p.border())),
        "--bootstrap-bundle",
        &file.to_string_lossy(),
        "--fingerprint",
        &fingerprint,
    ])?;
    Ok(())
}

fn org_of_name<'a>(orgs: &'a [Org], name: &str) -> anyhow::Result<&'a Org> {
    orgs.iter()
        .find(|o| o.name == name)
        .ok_or_else(|| anyhow!("no organisation {name}"))
}

/// `strait gateway` on `org`'s border host, joined with a one-time token, advertising the border's
/// public address; waits until it enforces a mesh version.
/// Its pid.
pub(super) fn start_gateway(
    lab: &Lab,
    mesh: &Mesh,
    org: &Org,
    exe: &str,
    out: &Path,
) -> anyhow::Result<u32> {
    let token = mesh.admin(&["node", "token", "create", "--node", "gateway", "--gateway"])?;
    let data = mesh.state().join("gateway");
    let border = org.border();
    let addr = format!("{}:{GATEWAY_PORT}", lab.v4(&border));
    let pid = lab.spawn(
        &border,
        None,
        &[
            exe,
            "gateway",
            "--control",
            &mesh.url(),
            "--node",
            "gateway",
            "--token",
            token.trim(),
            "--data-dir",
            &data.to_string_lossy(),
            "--listen",
            &addr,
            "--advertise",
            &addr,
        ],
        &out.join(format!("gateway-{}.log", org.name)),
    )?;
    lab.eventually(
        Duration::from_secs(30),
        &format!("the gateway of {}", org.name),
        || {
            lab.run(
                &border,
                None,
                &["curl", "-s", "http://127.0.0.1:15000/ready"],
            )
            .is_ok_and(|o| o.stdout.starts_with(b"ready"))
        },
    )?;
    Ok(pid)
}

/// What each organisation exported, imported and accepted: the federation part of its `strait status`.
fn federation_summary(orgs: &[Org], meshes: &BTreeMap<&str, Mesh>) -> anyhow::Result<String> {
    let mut out = String::new();
    for org in orgs {
        let m = meshes
            .get(org.name.as_str())
            .ok_or_else(|| anyhow!("no organisation {}", org.name))?;
        let status = m.admin(&["status"])?;
        let _ = writeln!(
            out,
            "{} ({}), as its `strait status` says:",
            org.name,
            org.trust_domain()
        );
        for line in status
            .lines()
            .skip_while(|l| !l.starts_with("FEDERATION"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
        {
            let _ = writeln!(out, "{line}");
        }
    }
    Ok(out)
}
