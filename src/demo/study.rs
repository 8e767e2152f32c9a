//! `strait bench study`: the latency experiment of the study that motivated Strait (Miller et al. 2021,
//! "Towards Secure and Leak-Free Workflows Using Microservice Isolation"), on the demo's topology.
//!
//! Method as in the study: every permitted step of the workflow is exercised from its source service to its
//! destination, each request a new connection timed by `curl -w %{time_total}`, N samples per step.
//! Scenarios: direct (no mesh; the document stores before the proxies start), then through the mesh with a
//! workflow allowing every pair, the workflow itself ("minimal"), and the workflow with +100, +1 000 and
//! +10 000 extra steps between other services, each applied through the control plane and enforced by every
//! proxy before it is measured. Placements: intra (all hosts on one bridge) and inter-region (the hosts of
//! the second half of the services behind a WAN link with 25 ms each way: tc netem where the kernel has
//! `sch_netem`, else the userspace relay `strait bench wan-relay`; the delay it adds is measured and
//! printed before anything else).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::json;
use strait_policy::workflow::Workflow;

use super::mesh::Mesh;
use crate::plot::{Chart, Series};

/// The study's medians (ms): (scenario, intra, inter). "no OPA" is Istio without the OPA sidecar.
const STUDY: [(&str, f64, f64); 5] = [
    ("no OPA", 4.53, 51.41),
    ("allow-all", 7.71, 54.58),
    ("minimal", 7.88, 54.13),
    ("+100", 8.86, 54.97),
    ("+1000", 12.61, 60.26),
];

const WAN_DELAY: Duration = Duration::from_millis(25);

fn study_median(scenario: &str, inter: bool) -> Option<f64> {
    STUDY
        .iter()
        .find(|(s, _, _)| *s == scenario)
        .map(|(_, a, b)| if inter { *b } else { *a })
}

/// Every ordered pair of distinct services.
pub(super) fn every_pair(services: &[String]) -> Vec<(String, String)> {
    services
        .iter()
        .flat_map(|a| {
            services
                .iter()
                .filter(move |b| *b != a)
                .map(move |b| (a.clone(), b.clone()))
        })
        .collect()
}

/// One permitted step, as a request.
pub(super) struct Pair {
    pub(super) src: String,
    pub(super) dst: String,
    method: String,
    pub(super) path: String,
}

pub(super) fn pairs(wf: &Workflow) -> Vec<Pair> {
    wf.steps
        .iter()
        .filter(|s| s.tcp.is_empty())
        .map(|s| Pair {
            src: s.from.clone(),
            dst: s.to.clone(),
            method: s.methods.first().cloned().unwrap_or_else(|| "POST".into()),
            path: s
                .paths
                .iter()
                .find(|p| !p.contains('*'))
                .cloned()
                .unwrap_or_else(|| format!("/api/{}", s.to)),
        })
        .collect()
}

/// The scenarios' workflows, as documents for `strait workflow apply` (JSON is YAML). All carry the
/// workflow's name, so each apply replaces the previous one. `allow_all` lists the steps of the
/// allow-all scenario (source, destination; any method and path).
pub(super) fn variant(
    wf: &Workflow,
    allow_all: &[(String, String)],
    scenario: &str,
) -> anyhow::Result<String> {
    let mut doc = serde_json::to_value(wf)?;
    let extra: usize = match scenario {
        "minimal" => 0,
        "allow-all" => {
            let steps: Vec<_> = allow_all
                .iter()
                .map(|(a, b)| json!({"from": a, "to": b}))
                .collect();
            doc["steps"] = json!(steps);
            return Ok(doc.to_string());
        }
        s => s
            .strip_prefix('+')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("unknown scenario {s}"))?,
    };
    if extra > 0 {
        // Extra steps between 101 other services (never the measured ones), as the study padded its policy.
        const K: usize = 101;
        let ns = wf
            .actors
            .first()
            .and_then(|a| a.services.first())
            .and_then(|s| s.namespace.clone())
            .unwrap_or_else(|| "default".into());
        let padding: Vec<_> = (0..K)
            .map(|i| json!({"name": format!("pad-{i}"), "namespace": ns, "serviceAccount": format!("pad-{i}")}))
            .collect();
        doc["actors"]
            .as_array_mut()
            .context("actors")?
            .push(json!({"name": "padding", "services": padding}));
        let steps = doc["steps"].as_array_mut().context("steps")?;
        for i in 1..=extra {
            let (f, t) = (i % K, (i / K + 1 + i % K) % K);
            steps.push(json!({"from": format!("pad-{f}"), "to": format!("pad-{t}"), "methods": ["POST"], "paths": [format!("/api/pad-{t}")]}));
        }
    }
    Ok(doc.to_string())
}

pub(super) struct Cell {
    placement: &'static str,
    scenario: &'static str,
    /// Per pair: its samples in ms.
    samples: Vec<(usize, Vec<f64>)>,
}

/// The median of every sample of one cell.
pub(super) fn median(cells: &[Cell], placement: &str, scenario: &str) -> Option<f64> {
    cells
        .iter()
        .find(|c| c.placement == placement && c.scenario == scenario)
        .map(|c| {
            quantile(
                &sorted(c.samples.iter().flat_map(|(_, v)| v.clone()).collect()),
                0.5,
            )
        })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// `samples` new-connection requests for one pair to `url`, from its source host as its source user
/// (`uid`); the latencies in ms. Every answer must come from the service: a refusal means the scenario is
/// not what it claims.
pub(super) fn measure(
    lab: &super::lab::Lab,
    uid: u32,
    url: &str,
    pair: &Pair,
    samples: usize,
) -> anyhow::Result<Vec<f64>> {
    // Two warm-up requests (not counted); then one curl process per request, as the study's loop did.
    let script = format!(
        "for i in $(seq {}); do curl -s -o /dev/null -w '%{{http_code}} %{{time_total}}\\n' --max-time 5 -X {} -H 'content-type: text/plain' --data-binary doc '{url}'; done",
        samples + 2,
        pair.method
    );
    let out = lab.run(&pair.src, Some(uid), &["sh", "-c", &script])?;
    let mut ms = Vec::with_capacity(samples);
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(2) {
        let mut parts = line.split_whitespace();
        let code = parts.next().unwrap_or("000");
        if matches!(code, "000" | "403") || code.starts_with('5') {
            bail!(
                "{} → {} {} {} answered {code}: the scenario does not allow its own step",
                pair.src,
                pair.dst,
                pair.method,
                pair.path
            );
        }
        let t: f64 = parts
            .next()
            .and_then(|t| t.parse().ok())
            .context("curl printed no time")?;
        ms.push(t * 1000.0);
    }
    if ms.len() != samples {
        bail!(
            "{} → {}: {} samples instead of {samples}",
            pair.src,
            pair.dst,
            ms.len()
        );
    }
    Ok(ms)
}

/// The scenarios through the mesh, in the order they are measured (after "direct").
pub const SCENARIOS: [&str; 5] = ["allow-all", "minimal", "+100", "+1000", "+10000"];

/// What one run measures.
pub(super) struct Plan {
    pub(super) pairs: Vec<Pair>,
    /// Services of the second region.
    pub(super) remote: Vec<String>,
    /// The placements measured: intra, and inter when a step crosses the regions.
    placements: Vec<&'static str>,
    /// Mesh scenarios (a subset of [`SCENARIOS`], in its order).
    pub(super) scenarios: Vec<&'static str>,
    pub(super) samples: usize,
}

impl Plan {
    /// Checks the options and the workflow, and prints what will be measured.
    pub(super) fn new(
        wf: &Workflow,
        remote: Vec<String>,
        scenarios: &[String],
        samples: usize,
    ) -> anyhow::Result<Self> {
        if samples == 0 {
            bail!("--samples must be at least 1 (the study used 40 or more)");
        }
        let pairs = pairs(wf);
        if pairs.is_empty() {
            bail!("the workflow has no HTTP step to measure");
        }
        if let Some(unknown) = scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
            bail!(
                "unknown scenario {unknown} (known: {})",
                SCENARIOS.join(", ")
            );
        }
        let scenarios: Vec<&'static str> = SCENARIOS
            .into_iter()
            .filter(|s| scenarios.iter().any(|w| w == s))
            .collect();
        let mut plan = Self {
            pairs,
            remote,
            placements: vec!["intra"],
            scenarios,
            samples,
        };
        let crossing = plan.pairs.iter().filter(|p| plan.crosses(p)).count();
        if crossing > 0 {
            plan.placements.push("inter");
        } else {
            println!(
                "no step of the workflow crosses the regions: the inter-region placement is skipped"
            );
        }
        println!(
            "{} permitted steps × {samples} new-connection requests per scenario and placement (the inter-region placement measures the {crossing} steps that cross the regions); scenarios: direct, {}",
            plan.pairs.len(),
            plan.scenarios.join(", ")
        );
        Ok(plan)
    }

    /// A step crosses the regions when exactly one of its ends is remote.
    fn crosses(&self, p: &Pair) -> bool {
        self.remote.contains(&p.src) != self.remote.contains(&p.dst)
    }

    /// Measures `scenario` in every placement (the WAN delay set for the inter-region one, and removed
    /// afterwards); `target` says, per step, as which user its source sends and to which URL.
    pub(super) fn measure(
        &self,
        lab: &super::lab::Lab,
        scenario: &'static str,
        target: &dyn Fn(&Pair) -> anyhow::Result<(u32, String)>,
        cells: &mut Vec<Cell>,
    ) -> anyhow::Result<()> {
        // One region only (no step crosses): the lab has no WAN link to set.
        let two_regions = self.placements.len() > 1;
        for &placement in &self.placements {
            if two_regions {
                lab.set_wan_delay((placement == "inter").then_some(WAN_DELAY))?;
            }
            let mut per_pair = Vec::new();
            for (i, p) in self.pairs.iter().enumerate() {
                // The inter-region placement is about the steps that cross the WAN; the others are
                // measured in the intra placement already (and would only dilute the median).
                if placement == "inter" && !self.crosses(p) {
                    continue;
                }
                let (uid, url) = target(p)?;
                per_pair.push((i, measure(lab, uid, &url, p, self.samples)?));
            }
            let all = sorted(per_pair.iter().flat_map(|(_, v)| v.clone()).collect());
            println!(
                "  {scenario:<10} {placement:<6} median {:.2} ms",
                quantile(&all, 0.5)
            );
            cells.push(Cell {
                placement,
                scenario,
                samples: per_pair,
            });
        }
        if two_regions {
            lab.set_wan_delay(None)?;
        }
        Ok(())
    }

    /// Sets up the WAN link between the regions (tc netem where the kernel has it, else the userspace
    /// relay), measures what it adds between `from` and `to` (before any proxy runs, a refused TCP
    /// connection takes one round trip) and prints it beside what was asked. The measured one-way delay
    /// (ms).
    pub(super) fn measure_wan(
        &self,
        lab: &super::lab::Lab,
        from: &str,
        to: &str,
    ) -> anyhow::Result<f64> {
        let method = lab
            .set_wan_delay(Some(WAN_DELAY))
            .context("setting up the WAN link between the regions")?;
        let one_way = wan_one_way(lab, from, to)?;
        println!(
            "WAN link between the regions: {method}; asked {} ms one way, measured {one_way:.1} ms (half the median round trip of 7 refused TCP connections)",
            WAN_DELAY.as_millis()
        );
        lab.set_wan_delay(None)?;
        Ok(one_way)
    }

    /// Prints the table and writes the CSVs and plots; `deployment` names what was measured.
    pub(super) fn report(
        &self,
        cells: &[Cell],
        deployment: &str,
        out: &Path,
    ) -> anyhow::Result<()> {
        report(
            cells,
            &self.pairs,
            &self.placements,
            self.samples,
            deployment,
            out,
        )
    }
}

pub fn run(
    file: Option<PathBuf>,
    samples: usize,
    scenarios: &[String],
    out_dir: PathBuf,
) -> anyhow::Result<()> {
    super::preflight("bench study", &[("tc", "iproute2")])?;
    let l = super::load(file.as_deref())?;
    // The second half of the services is the other region (behind the WAN link).
    let (local, remote) = l.services.split_at(l.services.len().div_ceil(2));
    let plan = Plan::new(&l.wf, remote.to_vec(), scenarios, samples)?;
    let out_dir = super::federated::out_dir_at(out_dir)?;
    println!(
        "regions: [cp, {}] and [{}]",
        local.join(", "),
        remote.join(", ")
    );
    super::in_lab(&l.services, remote, |lab, state, exe| {
        let mesh = Mesh::start_control(
            lab,
            "cp",
            exe,
            state,
            &out_dir,
            &l.wf.trust_domain,
            &l.services,
        )?;
        if let Some(far) = remote.first() {
            let _ = plan.measure_wan(lab, "cp", far)?;
        }
        mesh.register(&l.ids)?;
        mesh.start_docstores()?;
        let target = |p: &Pair| Ok((mesh.uid(&p.src), mesh.service_url(&p.dst, &p.path)));
        let mut cells = Vec::new();
        // Direct first: once the proxies run, plaintext into a workload from another host is dropped.
        plan.measure(lab, "direct", &target, &mut cells)?;
        mesh.start_proxies()?;
        let allow_all = every_pair(&l.services);
        for &scenario in &plan.scenarios {
            let doc = variant(&l.wf, &allow_all, scenario)?;
            mesh.apply_workflow(&doc, "120s")
                .with_context(|| format!("applying the {scenario} workflow"))?;
            plan.measure(lab, scenario, &target, &mut cells)?;
        }
        plan.report(&cells, "one organisation", &out_dir)
    })
}

fn report(
    cells: &[Cell],
    pairs: &[Pair],
    placements: &[&str],
    samples: usize,
    deployment: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let summary = |c: &Cell| {
        let all = sorted(c.samples.iter().flat_map(|(_, v)| v.clone()).collect());
        (quantile(&all, 0.5), quantile(&all, 0.9))
    };
    let direct = |placement: &str| {
        cells
            .iter()
            .find(|c| c.scenario == "direct" && c.placement == placement)
            .map(|c| summary(c).0)
            .unwrap_or(f64::NAN)
    };
    let mut rows = Vec::new();
    let mut csv = String::from(
        "placement,scenario,pairs,samples,median_ms,p90_ms,overhead_ms,study_median_ms\n",
    );
    for c in cells {
        let (m, p90) = summary(c);
        let inter = c.placement == "inter";
        let study = study_median(c.scenario, inter);
        let study_text = match (c.scenario, study) {
            ("direct", _) => format!(
                "({:.2} Istio without OPA)",
                study_median("no OPA", inter).unwrap_or(f64::NAN)
            ),
            (_, Some(s)) => format!("{s:.2}"),
            (_, None) => "-".into(),
        };
        rows.push(vec![
            c.placement.to_owned(),
            c.scenario.to_owned(),
            format!("{m:.2} ({p90:.2})"),
            format!("{:+.2}", m - direct(c.placement)),
            study_text,
        ]);
        let _ = writeln!(
            csv,
            "{},{},{},{},{m:.3},{p90:.3},{:.3},{}",
            c.placement,
            c.scenario,
            c.samples.len(),
            samples,
            m - direct(c.placement),
            study
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "\n{deployment}: {samples} new-connection requests (curl time_total) per permitted step, {} steps, per scenario and placement; all hosts share this machine's cores\n",
        pairs.len()
    );
    print!(
        "{}",
        crate::cmd::table::render(
            &[
                "PLACEMENT",
                "SCENARIO",
                "MEDIAN (P90) MS",
                "OVER DIRECT MS",
                "STUDY MEDIAN MS"
            ],
            &rows
        )
    );
    let mut raw = String::from("placement,scenario,source,destination,method,path,sample,ms\n");
    for c in cells {
        for (i, v) in &c.samples {
            let p = &pairs[*i];
            for (k, ms) in v.iter().enumerate() {
                let _ = writeln!(
                    raw,
                    "{},{},{},{},{},{},{k},{ms:.3}",
                    c.placement, c.scenario, p.src, p.dst, p.method, p.path
                );
            }
        }
    }
    // Per step medians: does one pair stand out?
    let mut per_pair = String::from("placement,scenario,source,destination,median_ms,p90_ms\n");
    for c in cells {
        for (i, v) in &c.samples {
            let s = sorted(v.clone());
            let _ = writeln!(
                per_pair,
                "{},{},{},{},{:.3},{:.3}",
                c.placement,
                c.scenario,
                pairs[*i].src,
                pairs[*i].dst,
                quantile(&s, 0.5),
                quantile(&s, 0.9)
            );
        }
    }
    std::fs::write(out.join("study.csv"), &csv)?;
    std::fs::write(out.join("study-samples.csv"), raw)?;
    std::fs::write(out.join("study-pairs.csv"), per_pair)?;
    for &placement in placements {
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.placement == placement).collect();
        let chart = Chart {
            title: format!(
                "Request duration, a new connection each ({deployment}, {placement}): Strait vs the study"
            ),
            unit: "median ms".into(),
            categories: mine.iter().map(|c| c.scenario.to_owned()).collect(),
            series: vec![
                Series {
                    name: "Strait (this machine)".into(),
                    values: mine.iter().map(|c| Some(summary(c).0)).collect(),
                },
                Series {
                    name: "study (Istio + OPA; direct = Istio without OPA)".into(),
                    values: mine
                        .iter()
                        .map(|c| {
                            study_median(
                                if c.scenario == "direct" {
                                    "no OPA"
                                } else {
                                    c.scenario
                                },
                                placement == "inter",
                            )
                        })
                        .collect(),
                },
            ],
        };
        std::fs::write(out.join(format!("study-{placement}.svg")), chart.svg())?;
    }
    println!(
        "\nwrote {0}/study.csv (summary), study-pairs.csv (per step), study-samples.csv (every sample), study-<placement>.svg",
        out.display()
    );
    Ok(())
}

/// Half the median time a TCP connection from `from` to a closed port of `to` takes to be refused: the
/// one-way delay between them (milliseconds).
fn wan_one_way(lab: &super::lab::Lab, from: &str, to: &str) -> anyhow::Result<f64> {
    let url = format!("http://{}:9/", lab.v4(to));
    let mut rtts = Vec::new();
    for _ in 0..7 {
        let out = lab.run(
            from,
            None,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
                "--max-time",
                "5",
                &url,
            ],
        )?;
        let secs: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("curl printed no time")?;
        rtts.push(secs * 1e3);
    }
    Ok(quantile(&sorted(rtts), 0.5) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn movie() -> Workflow {
        Workflow::from_yaml(super::super::BUILTIN).unwrap()
    }

    #[test]
    fn every_scenario_is_a_valid_workflow_of_the_right_size() {
        let wf = movie();
        let services = every_pair(&super::super::load(None).unwrap().services);
        for (scenario, steps) in [
            ("minimal", 8),
            ("allow-all", 42),
            ("+100", 108),
            ("+1000", 1008),
        ] {
            let doc = variant(&wf, &services, scenario).unwrap();
            let v = Workflow::from_yaml(&doc).unwrap();
            assert_eq!(v.steps.len(), steps, "{scenario}");
            assert_eq!(v.metadata.name, "movie");
        }
        assert!(variant(&wf, &services, "+x").is_err());
    }

    #[test]
    fn the_measured_pairs_are_the_workflow_steps() {
        let p = pairs(&movie());
        assert_eq!(p.len(), 8);
        assert_eq!(
            (
                p[0].src.as_str(),
                p[0].dst.as_str(),
                p[0].method.as_str(),
                p[0].path.as_str()
            ),
            ("owner", "vfx-1", "POST", "/api/vfx-1")
        );
    }

    #[test]
    fn quantiles_pick_a_sample() {
        let s = sorted(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(quantile(&s, 0.5), 3.0);
        assert_eq!(quantile(&s, 0.9), 5.0);
        assert_eq!(quantile(&[7.0], 0.5), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
