//! Workflow → Rego + data.
//!
//! The Rego is fixed and small; the workflow goes into `data`, indexed by source principal and then
//! destination principal. A decision does two map lookups and then looks only at the steps between that
//! pair, so its cost does not grow with the number of steps in the workflow (regorus evaluates every rule
//! body, so one rule per step would grow linearly).
//!
//! ```text
//! data.strait.workflow.name = "movie"
//! data.strait.workflow.flows[<source ID>][<destination ID>] = [ {methods, paths, tcp, headers, window}, … ]
//! data.strait.workflow.egress[<source ID>] = [ {cidr, port}, … ]
//! ```
//!
//! How custom Rego combines with the workflow: modules in packages `strait.custom.<name>` each define
//! `allow`; the entry point (`envoy.authz.allow`, OPA-Envoy's default decision path) allows a request only
//! if the workflow allows it **and** every custom module allows it. A custom module cannot widen the
//! workflow, only narrow it.

use serde_json::{json, Map, Value};

use crate::workflow::{minutes, normalize_day, Workflow, WorkflowError};

/// The workflow's Rego (data-driven; the same for every workflow).
pub const WORKFLOW_REGO: &str = r#"package strait.workflow

import rego.v1

# A request (or TCP connection) is allowed when a step between the verified source and the destination
# matches it. Steps are looked up by principal, never scanned.
default allow := false

allow if {
	some step in data.strait.workflow.flows[input.attributes.source.principal][input.attributes.destination.principal]
	step_matches(step)
}

# May the source reach the destination at all? (The outbound proxy asks before opening a tunnel.)
default reachable := false

reachable if {
	data.strait.workflow.flows[input.attributes.source.principal][input.attributes.destination.principal]
}

step_matches(step) if {
	http := input.attributes.request.http
	method_ok(step, http.method)
	path_ok(step, http.path)
	headers_ok(step, http)
	time_ok(step)
}

step_matches(step) if {
	not input.attributes.request.http
	step.tcp
}

method_ok(step, _) if count(step.methods) == 0

method_ok(step, method) if upper(method) in step.methods

path_ok(step, _) if count(step.paths) == 0

path_ok(step, path) if {
	some pattern in step.paths
	glob.match(pattern, ["/"], split(path, "?")[0])
}

headers_ok(step, http) if {
	every name, want in step.headers {
		header_ok(http, name, want)
	}
}

header_ok(http, name, "*") if http.headers[name]

header_ok(http, name, want) if {
	want != "*"
	http.headers[name] == want
}

time_ok(step) if not step.window

time_ok(step) if {
	w := step.window
	now := time.now_ns()
	day_ok(w, lower(time.weekday([now, w.timezone])))
	clock := time.clock([now, w.timezone])
	m := (clock[0] * 60) + clock[1]
	w.from <= m
	m < w.to
}

day_ok(w, _) if count(w.days) == 0

day_ok(w, day) if day in w.days
"#;

/// The entry point at the decision path, combining the workflow with the custom modules named.
pub fn entry_rego(custom_packages: &[String]) -> String {
    let mut customs = String::new();
    let mut denials = String::new();
    for p in custom_packages {
        customs.push_str(&format!("\tdata.strait.custom.{p}.allow == true\n"));
        denials.push_str(&format!(
            "\nallow := {{\"allowed\": false, \"reason\": \"denied by custom policy {p}\"}} if {{\n\tdata.strait.workflow.allow\n\tnot data.strait.custom.{p}.allow == true\n}}\n"
        ));
    }
    format!(
        r#"package envoy.authz

import rego.v1

# The workflow and every custom module (strait.custom.*) must all allow.
default allow := {{"allowed": false, "reason": "no step of the workflow allows this request"}}

allow := {{"allowed": true, "reason": "allowed by the workflow"}} if {{
	data.strait.workflow.allow
{customs}}}
{denials}"#
    )
}

/// Compiles a workflow into the data document.
pub fn compile(wf: &Workflow) -> Result<Value, WorkflowError> {
    let ids = wf.service_ids()?;
    let mut flows: Map<String, Value> = Map::new();
    for s in &wf.steps {
        let (src, dst) = (&ids[&s.from], &ids[&s.to]);
        let mut step = json!({
            "methods": s.methods.iter().map(|m| m.to_ascii_uppercase()).collect::<Vec<_>>(),
            "paths": s.paths,
            "tcp": s.tcp,
            "headers": s.when.as_ref().map(|c| json!(c.headers)).unwrap_or_else(|| json!({})),
        });
        if let Some(w) = s.when.as_ref().and_then(|c| c.time_window.as_ref()) {
            step["window"] = json!({
                "timezone": w.timezone,
                "days": w.days.iter().filter_map(|d| normalize_day(d)).collect::<Vec<_>>(),
                "from": minutes(&w.from),
                "to": minutes(&w.to),
            });
        }
        let by_dst = flows
            .entry(src.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = by_dst {
            let list = m
                .entry(dst.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = list {
                a.push(step);
            }
        }
    }
    let mut egress: Map<String, Value> = Map::new();
    for e in &wf.egress {
        let list = egress
            .entry(ids[&e.from].clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            a.push(json!({"cidr": e.cidr, "port": e.port}));
        }
    }
    Ok(
        json!({"strait": {"workflow": {"name": wf.metadata.name, "flows": flows, "egress": egress}}}),
    )
}

/// The same flows written naively, one Rego rule per step (for benchmarks only: this is what the
/// compiler avoids).
pub fn naive_rego(wf: &Workflow) -> Result<String, WorkflowError> {
    let ids = wf.service_ids()?;
    let mut out = String::from(
        "package envoy.authz\n\nimport rego.v1\n\ndefault allow := false\n\nhttp := input.attributes.request.http\n",
    );
    for s in &wf.steps {
        out.push_str(&format!(
            "\nallow if {{\n\tinput.attributes.source.principal == {:?}\n\tinput.attributes.destination.principal == {:?}\n",
            ids[&s.from], ids[&s.to]
        ));
        if !s.methods.is_empty() {
            let m: Vec<String> = s
                .methods
                .iter()
                .map(|m| format!("{:?}", m.to_ascii_uppercase()))
                .collect();
            out.push_str(&format!("\thttp.method in {{{}}}\n", m.join(", ")));
        }
        if !s.paths.is_empty() {
            let p: Vec<String> = s.paths.iter().map(|p| format!("{p:?}")).collect();
            out.push_str(&format!(
                "\tsome p in [{}]\n\tglob.match(p, [\"/\"], split(http.path, \"?\")[0])\n",
                p.join(", ")
            ));
        }
        out.push_str("}\n");
    }
    Ok(out)
}
