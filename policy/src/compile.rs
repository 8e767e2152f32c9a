//! Workflow → Rego + data.
//!
//! The Rego is fixed and small; the workflow goes into `data`, indexed by source principal and then
//! destination principal. A decision does two map lookups and then looks only at the steps between that
//! pair, so its cost does not grow with the number of steps in the workflow (regorus evaluates every rule
//! body, so one rule per step would grow linearly).
//!
//! ```text
//! data.strait_workflow.name = "movie"
//! data.strait_workflow.flows[<source ID>][<destination ID>].methods[<METHOD>] = [ {any_path, exact, globs, conditional, headers, window}, … ]
//! data.strait_workflow.flows[<source ID>][<destination ID>].methods["*"] = [ … ]   (steps for any method)
//! data.strait_workflow.flows[<source ID>][<destination ID>].tcp = [5432, …]        (a step with `tcp: [5432]`)
//! data.strait_workflow.egress[<source ID>] = [ {cidr, port} or {host, port}, … ]
//! ```
//!
//! How custom Rego combines with the workflow: modules in packages `strait.custom.<name>` each define
//! `allow`; the entry point (`envoy.authz.allow`, OPA-Envoy's default decision path) allows a request only
//! if the workflow allows it **and** every custom module allows it. A custom module cannot widen the
//! workflow, only narrow it.

use serde_json::{json, Map, Value};

use crate::workflow::{canonical_method, minutes, normalize_day, Workflow, WorkflowError};

/// The `methods` key of the steps that allow any method.
pub const ANY_METHOD: &str = "*";

/// The workflow's Rego (data-driven; the same for every workflow).
pub const WORKFLOW_REGO: &str = r#"package strait.workflow

import rego.v1

# Steps are looked up by (source principal, destination principal, METHOD) in data, never scanned, so a
# decision costs the same for 10 or 10 000 steps. Exact paths are map lookups too; only wildcard patterns
# need glob matching. regorus evaluates every rule body, so there are few of them and they fail fast.
default allow := false

# HTTP, unconditional steps (the common case). Methods are exact tokens (the proxy forwards exactly the
# method it decided on, and methods are case-sensitive); "*" holds the steps that allow any method.
allow if {
	http := input.attributes.request.http
	pair := data.strait_workflow.flows[input.attributes.source.principal][input.attributes.destination.principal]
	some method in [http.method, "*"]
	some step in pair.methods[method]
	not step.conditional
	path_ok(step, split(http.path, "?")[0])
}

# HTTP, steps with conditions (headers, time window).
allow if {
	http := input.attributes.request.http
	pair := data.strait_workflow.flows[input.attributes.source.principal][input.attributes.destination.principal]
	some method in [http.method, "*"]
	some step in pair.methods[method]
	step.conditional
	path_ok(step, split(http.path, "?")[0])
	headers_ok(step, http)
	time_ok(step)
}

# TCP connections: one decision per connection, allowed by steps that name the destination port in `tcp`.
allow if {
	not input.attributes.request.http
	pair := data.strait_workflow.flows[input.attributes.source.principal][input.attributes.destination.principal]
	input.attributes.destination.address.socketAddress.portValue in pair.tcp
}

# May the source reach the destination at all? (The outbound proxy asks before opening a tunnel.)
default reachable := false

reachable if {
	data.strait_workflow.flows[input.attributes.source.principal][input.attributes.destination.principal]
}

path_ok(step, _) if step.any_path

path_ok(step, path) if step.exact[path]

path_ok(step, path) if {
	some pattern in step.globs
	glob.match(pattern, ["/"], path)
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
    // Until the proxies enforce order per instance, an ordered workflow would be enforced as a static
    // graph: less than it says. Refused rather than enforced as less (fail closed).
    if wf.instances.is_some() {
        return Err(WorkflowError {
            at: "instances".into(),
            message: "ordered workflow instances are validated but not enforced by the proxies of this release: apply it without `instances:` (and the steps' id, after and max) for the static graph".into(),
        });
    }
    let ids = wf.service_ids()?;
    let mut flows: Map<String, Value> = Map::new();
    for s in &wf.steps {
        let (src, dst) = (&ids[&s.from], &ids[&s.to]);
        let pair = flows
            .entry(src.clone())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .and_then(|m| {
                m.entry(dst.clone())
                    .or_insert_with(|| json!({"methods": {}}))
                    .as_object_mut()
            });
        let Some(pair) = pair else { continue };
        if !s.tcp.is_empty() {
            if let Value::Array(ports) = pair.entry("tcp").or_insert_with(|| json!([])) {
                for p in &s.tcp {
                    if !ports.contains(&json!(p)) {
                        ports.push(json!(p));
                    }
                }
            }
            // A TCP-only step allows no HTTP request.
            if s.methods.is_empty() && s.paths.is_empty() && s.when.is_none() {
                continue;
            }
        }
        let (globs, exact): (Vec<&String>, Vec<&String>) =
            s.paths.iter().partition(|p| p.contains(['*', '?']));
        let cond = s.when.clone().unwrap_or_default();
        let mut step = json!({
            "any_path": s.paths.is_empty(),
            "exact": exact.iter().map(|p| ((*p).clone(), Value::Bool(true))).collect::<Map<_, _>>(),
            "globs": globs,
            "conditional": !cond.headers.is_empty() || cond.time_window.is_some(),
            "headers": cond.headers,
        });
        if let Some(w) = &cond.time_window {
            step["window"] = json!({
                "timezone": w.timezone,
                "days": w.days.iter().filter_map(|d| normalize_day(d)).collect::<Vec<_>>(),
                "from": minutes(&w.from),
                "to": minutes(&w.to),
            });
        }
        let methods: Vec<String> = if s.methods.is_empty() {
            vec![ANY_METHOD.to_owned()]
        } else {
            s.methods
                .iter()
                .filter_map(|m| canonical_method(m))
                .collect()
        };
        let Some(by_method) = pair.get_mut("methods").and_then(Value::as_object_mut) else {
            continue;
        };
        for m in methods {
            if let Value::Array(list) = by_method.entry(m).or_insert_with(|| json!([])) {
                list.push(step.clone());
            }
        }
    }
    let mut egress: Map<String, Value> = Map::new();
    for e in &wf.egress {
        let list = egress
            .entry(ids[&e.from].clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            a.push(match (&e.cidr, &e.host) {
                (Some(cidr), _) => json!({"cidr": cidr, "port": e.port}),
                (None, host) => json!({"host": host, "port": e.port}),
            });
        }
    }
    // Under its own root, not under the package's path: a data path that overlaps a package makes
    // regorus consider that package's rules on every lookup.
    Ok(json!({"strait_workflow": {"name": wf.metadata.name, "flows": flows, "egress": egress}}))
}

/// Merges the data documents of several compiled workflows: the flows of every (source, destination,
/// method) are the union of the workflows' steps, egress entries likewise. With none, an empty document
/// (no flow: everything is denied).
pub fn merge(compiled: Vec<Value>) -> Value {
    let mut flows: Map<String, Value> = Map::new();
    let mut egress: Map<String, Value> = Map::new();
    let mut names = Vec::new();
    for mut doc in compiled {
        let wf = doc["strait_workflow"].take();
        names.push(wf["name"].clone());
        for (src, dsts) in wf["flows"].as_object().into_iter().flatten() {
            let into_src = flows
                .entry(src.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            for (dst, pair) in dsts.as_object().into_iter().flatten() {
                let Some(into_dst) = into_src.as_object_mut().map(|m| {
                    m.entry(dst.clone())
                        .or_insert_with(|| Value::Object(Map::new()))
                }) else {
                    continue;
                };
                merge_pair(into_dst, pair);
            }
        }
        for (src, list) in wf["egress"].as_object().into_iter().flatten() {
            if let (Value::Array(have), Value::Array(more)) = (
                egress
                    .entry(src.clone())
                    .or_insert_with(|| Value::Array(Vec::new())),
                list,
            ) {
                have.extend(more.iter().cloned());
            }
        }
    }
    let name = if names.len() == 1 {
        names.remove(0)
    } else {
        Value::Array(names)
    };
    json!({"strait_workflow": {"name": name, "flows": flows, "egress": egress}})
}

/// Adds one workflow's (source, destination) entry to the merged one: steps per method appended, TCP ports
/// united.
fn merge_pair(into: &mut Value, pair: &Value) {
    let Some(into) = into.as_object_mut() else {
        return;
    };
    for (m, steps) in pair["methods"].as_object().into_iter().flatten() {
        let slot = into
            .entry("methods")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|by_method| by_method.entry(m.clone()).or_insert_with(|| json!([])));
        if let (Some(Value::Array(have)), Value::Array(more)) = (slot, steps) {
            have.extend(more.iter().cloned());
        }
    }
    if let Value::Array(ports) = &pair["tcp"] {
        if let Value::Array(have) = into.entry("tcp").or_insert_with(|| json!([])) {
            for p in ports {
                if !have.contains(p) {
                    have.push(p.clone());
                }
            }
        }
    }
}

/// The same flows written naively, one Rego rule per step, in files of at most 500 rules (regorus refuses
/// policy files over 1 MiB, which 10 000 such rules exceed). For benchmarks only: this is what the
/// compiler avoids.
pub fn naive_modules(wf: &Workflow) -> Result<Vec<(String, String)>, WorkflowError> {
    let ids = wf.service_ids()?;
    let header = "package envoy.authz\n\nimport rego.v1\n\nhttp := input.attributes.request.http\n";
    let mut files = vec![(
        "naive/0.rego".to_string(),
        format!("{header}\ndefault allow := false\n"),
    )];
    for (i, s) in wf.steps.iter().enumerate() {
        if i % 500 == 0 && i > 0 {
            files.push((format!("naive/{}.rego", i / 500), header.to_string()));
        }
        let mut rule = format!(
            "\nallow if {{\n\tinput.attributes.source.principal == {:?}\n\tinput.attributes.destination.principal == {:?}\n",
            ids[&s.from], ids[&s.to]
        );
        if !s.methods.is_empty() {
            let m: Vec<String> = s
                .methods
                .iter()
                .filter_map(|m| canonical_method(m))
                .map(|m| format!("{m:?}"))
                .collect();
            rule.push_str(&format!("\thttp.method in {{{}}}\n", m.join(", ")));
        }
        if !s.paths.is_empty() {
            let p: Vec<String> = s.paths.iter().map(|p| format!("{p:?}")).collect();
            rule.push_str(&format!(
                "\tsome p in [{}]\n\tglob.match(p, [\"/\"], split(http.path, \"?\")[0])\n",
                p.join(", ")
            ));
        }
        rule.push_str("}\n");
        if let Some(last) = files.last_mut() {
            last.1.push_str(&rule);
        }
    }
    Ok(files)
}
