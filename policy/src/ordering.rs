//! Ordered workflow instances: the model and its reference semantics (docs/workflows.md).
//!
//! A workflow that declares `instances:` runs as instances. Each step has an `id`, the steps it comes
//! `after` (a DAG: fan-out, and joins that need every one of them), an optional `max` completions per
//! instance, and the instance lives for `instances.lifetime` from its first step:
//!
//! ```yaml
//! instances: {lifetime: 24h}
//! steps:
//!   - {id: brief, from: owner, to: vfx-1, methods: [POST]}
//!   - {id: plates, from: vfx-1, to: vfx-2, after: [brief]}
//!   - {id: fx, from: vfx-1, to: vfx-3, after: [brief]}
//!   - {id: grade, from: vfx-2, to: color, after: [plates], max: 3}
//!   - {id: mix, from: vfx-3, to: sound, after: [fx]}
//!   - {id: deliver, from: sound, to: owner, after: [mix]}
//! ```
//!
//! The meaning, which [`Instance`] states in plain Rust and against which the proxies are to be tested:
//! in an instance that has not expired, a step may run when every step it comes after has completed at
//! least once and it has completed fewer than `max` times; a step with no `after` starts instances.
//! Workflows without `instances:` keep their meaning: a static graph, any time, any number of times.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::workflow::{Step, Workflow, WorkflowError};

/// The longest instance lifetime accepted: receipts and the nonces proxies remember are bounded by it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most steps of an ordered workflow: the completed steps ride on every request of an instance.
pub const MAX_ORDERED_STEPS: usize = 64;

fn err(at: impl Into<String>, message: impl Into<String>) -> WorkflowError {
    WorkflowError {
        at: at.into(),
        message: message.into(),
    }
}

/// `30s`, `15m`, `24h`, `7d`: a whole number and a unit.
pub fn parse_lifetime(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// A step id: lower-case letters, digits and `-`, starting with a letter, at most 63 characters (it
/// travels in headers and logs).
fn valid_id(id: &str) -> bool {
    id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Checks the ordering part of a workflow (called by [`Workflow`]'s validation).
pub(crate) fn validate(wf: &Workflow) -> Result<(), WorkflowError> {
    let Some(instances) = &wf.instances else {
        for (i, s) in wf.steps.iter().enumerate() {
            let field = if s.id.is_some() {
                "id"
            } else if !s.after.is_empty() {
                "after"
            } else if s.max.is_some() {
                "max"
            } else {
                continue;
            };
            return Err(err(
                format!("steps[{i}].{field}"),
                "ordered steps need `instances: {lifetime: ...}` on the workflow (without it, steps are a static graph)",
            ));
        }
        return Ok(());
    };
    match parse_lifetime(&instances.lifetime) {
        Some(d) if d <= MAX_LIFETIME => {}
        Some(_) => {
            return Err(err(
                "instances.lifetime",
                "at most 30d (what proxies remember of an instance is bounded by its lifetime)",
            ))
        }
        None => {
            return Err(err(
                "instances.lifetime",
                format!(
                    "{:?} is not a lifetime: a whole number and s, m, h or d, e.g. 24h",
                    instances.lifetime
                ),
            ))
        }
    }
    if wf.steps.len() > MAX_ORDERED_STEPS {
        return Err(err(
            "steps",
            format!(
                "an ordered workflow has at most {MAX_ORDERED_STEPS} steps (the instance's completed steps travel with its requests)"
            ),
        ));
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in wf.steps.iter().enumerate() {
        let Some(id) = s.id.as_deref() else {
            return Err(err(
                format!("steps[{i}].id"),
                "every step of an ordered workflow needs an id (what `after` names)",
            ));
        };
        if !valid_id(id) {
            return Err(err(
                format!("steps[{i}].id"),
                format!("{id:?}: lower-case letters, digits and '-', starting with a letter"),
            ));
        }
        if index.insert(id, i).is_some() {
            return Err(err(
                format!("steps[{i}].id"),
                format!("{id:?} names two steps"),
            ));
        }
        if !s.tcp.is_empty() {
            return Err(err(
                format!("steps[{i}].tcp"),
                "a step of an ordered workflow is an HTTP request (the instance travels in a header)",
            ));
        }
        if s.max == Some(0) {
            return Err(err(
                format!("steps[{i}].max"),
                "at least 1 (leave it out for no limit)",
            ));
        }
    }
    for (i, s) in wf.steps.iter().enumerate() {
        for (j, a) in s.after.iter().enumerate() {
            if !index.contains_key(a.as_str()) {
                return Err(err(
                    format!("steps[{i}].after[{j}]"),
                    format!("no step has the id {a:?}"),
                ));
            }
        }
    }
    if let Some(cycle) = cycle(&wf.steps, &index) {
        return Err(err(
            "steps",
            format!(
                "the steps' `after` form a cycle ({}): an instance could never start it",
                cycle.join(" → ")
            ),
        ));
    }
    Ok(())
}

/// A cycle of `after` edges, as step ids, if there is one (depth-first search).
fn cycle(steps: &[Step], index: &BTreeMap<&str, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        i: usize,
        steps: &[Step],
        index: &BTreeMap<&str, usize>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        marks[i] = Mark::Open;
        path.push(i);
        for a in &steps[i].after {
            let Some(&j) = index.get(a.as_str()) else {
                continue;
            };
            match marks[j] {
                Mark::Open => {
                    let from = path.iter().position(|&p| p == j).unwrap_or(0);
                    let mut ids: Vec<String> = path[from..]
                        .iter()
                        .map(|&p| steps[p].id.clone().unwrap_or_default())
                        .collect();
                    ids.push(steps[j].id.clone().unwrap_or_default());
                    return Some(ids);
                }
                Mark::New => {
                    if let Some(c) = visit(j, steps, index, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; steps.len()];
    for i in 0..steps.len() {
        if marks[i] == Mark::New {
            if let Some(c) = visit(i, steps, index, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// An ordered workflow's steps as the reference reads them.
#[derive(Debug, Clone)]
pub struct Plan {
    ids: Vec<String>,
    after: Vec<Vec<usize>>,
    max: Vec<Option<u32>>,
    pub lifetime: Duration,
}

impl Plan {
    /// The plan of a validated workflow; `None` when it does not run as instances.
    pub fn of(wf: &Workflow) -> Option<Self> {
        let lifetime = parse_lifetime(&wf.instances.as_ref()?.lifetime)?;
        let ids: Vec<String> = wf
            .steps
            .iter()
            .map(|s| s.id.clone())
            .collect::<Option<_>>()?;
        let after = wf
            .steps
            .iter()
            .map(|s| {
                s.after
                    .iter()
                    .filter_map(|a| ids.iter().position(|id| id == a))
                    .collect()
            })
            .collect();
        Some(Self {
            max: wf.steps.iter().map(|s| s.max).collect(),
            ids,
            after,
            lifetime,
        })
    }

    /// The step with this id.
    pub fn step(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|s| s == id)
    }

    pub fn id(&self, step: usize) -> &str {
        &self.ids[step]
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The steps that start instances (no `after`).
    pub fn starts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).filter(|&s| self.after[s].is_empty())
    }
}

/// Why a step may not run in an instance now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The instance's lifetime is over.
    Expired,
    /// These steps it comes after have not completed in this instance.
    NotAfter(Vec<String>),
    /// It completed `max` times already.
    OverMax(u32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Expired => write!(f, "the instance expired"),
            Refusal::NotAfter(missing) => write!(
                f,
                "the steps it comes after have not completed in this instance: {}",
                missing.join(", ")
            ),
            Refusal::OverMax(max) => write!(f, "it already completed {max} times in this instance"),
        }
    }
}

/// One instance: when it started and how often each step completed. The reference semantics of ordered
/// workflows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Seconds since the Unix epoch.
    pub started: u64,
    done: Vec<u32>,
}

impl Instance {
    pub fn new(plan: &Plan, started: u64) -> Self {
        Self {
            started,
            done: vec![0; plan.len()],
        }
    }

    /// Whether `step` may run at `now` (seconds since the Unix epoch).
    pub fn check(&self, plan: &Plan, step: usize, now: u64) -> Result<(), Refusal> {
        if now >= self.started.saturating_add(plan.lifetime.as_secs()) {
            return Err(Refusal::Expired);
        }
        let missing: BTreeSet<&str> = plan.after[step]
            .iter()
            .filter(|&&a| self.done[a] == 0)
            .map(|&a| plan.ids[a].as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::NotAfter(
                missing.into_iter().map(str::to_owned).collect(),
            ));
        }
        match plan.max[step] {
            Some(max) if self.done[step] >= max => Err(Refusal::OverMax(max)),
            _ => Ok(()),
        }
    }

    /// Records a completion of `step`.
    pub fn complete(&mut self, step: usize) {
        self.done[step] = self.done[step].saturating_add(1);
    }

    /// [`Instance::check`], then [`Instance::complete`] when allowed.
    pub fn run(&mut self, plan: &Plan, step: usize, now: u64) -> Result<(), Refusal> {
        self.check(plan, step, now)?;
        self.complete(step);
        Ok(())
    }

    /// How often `step` completed.
    pub fn completed(&self, step: usize) -> u32 {
        self.done[step]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordered(extra: &str, steps: &str) -> Result<Workflow, WorkflowError> {
        Workflow::from_yaml(&format!(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: film}}\ntrustDomain: example.org\n{extra}actors:\n  - name: a\n    services: [{{name: owner}}, {{name: vfx-1}}, {{name: vfx-2}}, {{name: vfx-3}}, {{name: color}}, {{name: sound}}]\nsteps:\n{steps}"
        ))
    }

    const FILM: &str = "  - {id: brief, from: owner, to: vfx-1, methods: [POST]}\n  - {id: plates, from: vfx-1, to: vfx-2, after: [brief]}\n  - {id: fx, from: vfx-1, to: vfx-3, after: [brief]}\n  - {id: grade, from: vfx-2, to: color, after: [plates], max: 2}\n  - {id: mix, from: vfx-3, to: sound, after: [fx]}\n  - {id: deliver, from: sound, to: owner, after: [mix, grade]}\n";

    #[test]
    fn an_instance_runs_in_order_and_refuses_what_is_out_of_order() {
        let wf = ordered("instances: {lifetime: 1h}\n", FILM).unwrap();
        let plan = Plan::of(&wf).unwrap();
        let s = |id| plan.step(id).unwrap();
        assert_eq!(plan.starts().collect::<Vec<_>>(), [s("brief")]);
        let mut i = Instance::new(&plan, 1000);
        // sound → owner before anything: refused, naming what is missing.
        assert_eq!(
            i.run(&plan, s("deliver"), 1001),
            Err(Refusal::NotAfter(vec!["grade".into(), "mix".into()]))
        );
        for step in ["brief", "plates", "fx", "grade", "mix"] {
            i.run(&plan, s(step), 1002).unwrap();
        }
        // At most twice.
        i.run(&plan, s("grade"), 1003).unwrap();
        assert_eq!(i.run(&plan, s("grade"), 1004), Err(Refusal::OverMax(2)));
        // The join: both branches done.
        i.run(&plan, s("deliver"), 1005).unwrap();
        // Expired.
        assert_eq!(i.check(&plan, s("mix"), 1000 + 3600), Err(Refusal::Expired));
        assert_eq!(i.completed(s("grade")), 2);
    }

    #[test]
    fn instances_do_not_share_progress() {
        let wf = ordered("instances: {lifetime: 1h}\n", FILM).unwrap();
        let plan = Plan::of(&wf).unwrap();
        let mut a = Instance::new(&plan, 0);
        let b = Instance::new(&plan, 0);
        a.run(&plan, plan.step("brief").unwrap(), 1).unwrap();
        a.run(&plan, plan.step("fx").unwrap(), 1).unwrap();
        assert!(b.check(&plan, plan.step("fx").unwrap(), 1).is_err());
    }

    #[test]
    fn ordered_workflows_are_validated() {
        let lifetime = "instances: {lifetime: 1h}\n";
        for (extra, steps, at, says) in [
            ("", "  - {id: x, from: owner, to: vfx-1}\n", "steps[0].id", "instances"),
            ("", "  - {from: owner, to: vfx-1, max: 2}\n", "steps[0].max", "instances"),
            (lifetime, "  - {from: owner, to: vfx-1}\n", "steps[0].id", "needs an id"),
            (lifetime, "  - {id: X, from: owner, to: vfx-1}\n", "steps[0].id", "lower-case"),
            (lifetime, "  - {id: a, from: owner, to: vfx-1}\n  - {id: a, from: vfx-1, to: vfx-2}\n", "steps[1].id", "two steps"),
            (lifetime, "  - {id: a, from: owner, to: vfx-1, after: [b]}\n", "steps[0].after[0]", "no step"),
            (lifetime, "  - {id: a, from: owner, to: vfx-1, after: [b]}\n  - {id: b, from: vfx-1, to: vfx-2, after: [a]}\n", "steps", "cycle"),
            (lifetime, "  - {id: a, from: owner, to: vfx-1, after: [a]}\n", "steps", "cycle"),
            (lifetime, "  - {id: a, from: owner, to: vfx-1, max: 0}\n", "steps[0].max", "at least 1"),
            (lifetime, "  - {id: a, from: owner, to: vfx-1, tcp: [5432]}\n", "steps[0].tcp", "HTTP request"),
            ("instances: {lifetime: forever}\n", "  - {id: a, from: owner, to: vfx-1}\n", "instances.lifetime", "not a lifetime"),
            ("instances: {lifetime: 31d}\n", "  - {id: a, from: owner, to: vfx-1}\n", "instances.lifetime", "30d"),
        ] {
            let e = ordered(extra, steps).unwrap_err();
            assert_eq!(e.at, at, "{steps}: {e:?}");
            assert!(e.message.contains(says), "{steps}: {e:?}");
        }
        // Without instances, the workflow is what it always was.
        let plain = ordered("", "  - {from: owner, to: vfx-1}\n").unwrap();
        assert!(Plan::of(&plain).is_none());
        assert!(crate::compile::compile(&plain).is_ok());
    }

    #[test]
    fn an_ordered_workflow_is_not_enforced_as_a_static_graph() {
        // Until the proxies enforce order, compiling one fails (the control plane refuses to apply it).
        let wf = ordered("instances: {lifetime: 1h}\n", FILM).unwrap();
        let e = crate::compile::compile(&wf).unwrap_err();
        assert_eq!(e.at, "instances");
        assert!(e.message.contains("not enforced"), "{e:?}");
    }

    #[test]
    fn lifetimes_parse() {
        assert_eq!(parse_lifetime("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_lifetime("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_lifetime("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_lifetime("7d"), Some(Duration::from_secs(604_800)));
        for bad in [
            "",
            "h",
            "0s",
            "10",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_lifetime(bad), None, "{bad}");
        }
    }
}
