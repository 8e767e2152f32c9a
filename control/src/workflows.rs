//! Workflows as the control plane keeps them, and the one policy bundle the mesh enforces, built from all
//! of them (see [`strait_policy::bundle::Bundle::from_workflows`] for how they combine).

use std::time::Duration;

use strait_policy::bundle::Bundle;
use strait_policy::workflow::Workflow;

use crate::store::WorkflowRecord;

/// A workflow or module the control plane refuses, with where and why (YAML field path or Rego line).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn parse(rec: &WorkflowRecord) -> Result<Workflow, Invalid> {
    Workflow::from_yaml(&rec.yaml).map_err(|e| Invalid(format!("workflow {}: {e}", rec.name)))
}

/// The mesh's policy bundle from the stored workflows. This packages what is stored; it does not compile
/// the Rego (the apply check did that), so a store tampered behind the API's back still yields a bundle and
/// the proxies' own compile check is what refuses it (NACK).
pub fn mesh_bundle(records: &[WorkflowRecord]) -> Result<Bundle, Invalid> {
    let parsed: Vec<(Workflow, Vec<(String, String)>)> = records
        .iter()
        .map(|r| {
            Ok((
                parse(r)?,
                r.modules
                    .iter()
                    .map(|m| (m.file.clone(), m.source.clone()))
                    .collect(),
            ))
        })
        .collect::<Result<_, Invalid>>()?;
    let refs: Vec<(&Workflow, &[(String, String)])> =
        parsed.iter().map(|(w, m)| (w, m.as_slice())).collect();
    Bundle::from_workflows(&refs, false).map_err(|e| Invalid(e.to_string()))
}

/// The apply-time check: the workflow parses, belongs to this trust domain, and the mesh bundle with it
/// (replacing any workflow of the same name) compiles. Returns the workflow's name.
pub fn check_candidate(
    candidate: &WorkflowRecord,
    others: &[WorkflowRecord],
    trust_domain: &str,
    federated: &[String],
) -> Result<String, Invalid> {
    let wf = parse(candidate)?;
    if wf.trust_domain != trust_domain {
        return Err(Invalid(format!(
            "trustDomain: {} is not this mesh's trust domain ({trust_domain})",
            wf.trust_domain
        )));
    }
    for td in wf
        .foreign_trust_domains()
        .map_err(|e| Invalid(e.to_string()))?
    {
        if !federated.contains(&td) {
            return Err(Invalid(format!(
                "the workflow names services of {td}, which is not federated: `strait federation add --trust-domain {td} …` first"
            )));
        }
    }
    let mut all: Vec<WorkflowRecord> = others
        .iter()
        .filter(|o| o.name != wf.metadata.name)
        .cloned()
        .collect();
    all.push(WorkflowRecord {
        name: wf.metadata.name.clone(),
        ..candidate.clone()
    });
    let bundle = mesh_bundle(&all)?;
    bundle
        .engine(Duration::from_millis(100))
        .map_err(|e| Invalid(format!("policy does not compile: {e}")))?;
    Ok(wf.metadata.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CustomModule;

    fn rec(name: &str, td: &str, module: Option<&str>) -> WorkflowRecord {
        WorkflowRecord {
            name: name.into(),
            yaml: format!("apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: {name}}}\ntrustDomain: {td}\nactors:\n  - {{name: a, services: [{{name: a}}]}}\n  - {{name: b, services: [{{name: b}}]}}\nsteps:\n  - {{from: a, to: b, methods: [POST]}}\n"),
            modules: module
                .map(|m| vec![CustomModule { file: "c.rego".into(), source: m.into() }])
                .unwrap_or_default(),
            applied_at: 0,
        }
    }

    #[test]
    fn apply_checks_trust_domain_yaml_and_rego_with_line() {
        assert_eq!(
            check_candidate(&rec("w", "td", None), &[], "td", &[]).unwrap(),
            "w"
        );
        let e = check_candidate(&rec("w", "other", None), &[], "td", &[]).unwrap_err();
        assert!(e.0.contains("trust domain"), "{e}");
        let mut bad = rec("w", "td", None);
        bad.yaml = bad.yaml.replace("methods:", "methodz:");
        let e = check_candidate(&bad, &[], "td", &[]).unwrap_err();
        assert!(e.0.contains("methodz"), "{e}");
        let e = check_candidate(
            &rec(
                "w",
                "td",
                Some("package strait.custom.c\nimport rego.v1\nallow if {\n  input.x ==\n}\n"),
            ),
            &[],
            "td",
            &[],
        )
        .unwrap_err();
        assert!(e.0.contains("does not compile") && e.0.contains('5'), "{e}");
    }

    #[test]
    fn foreign_services_need_their_trust_domain_federated_and_a_local_end() {
        let mut r = rec("w", "td", None);
        r.yaml = r.yaml.replace(
            "{name: b, services: [{name: b}]}",
            "{name: b, services: [{name: b, id: \"spiffe://partner.example/ns/x/sa/b\"}]}",
        );
        let e = check_candidate(&r, &[], "td", &[]).unwrap_err();
        assert!(
            e.0.contains("partner.example, which is not federated"),
            "{e}"
        );
        assert_eq!(
            check_candidate(&r, &[], "td", &["partner.example".into()]).unwrap(),
            "w"
        );
        // Both ends of a step in other organisations: not ours to allow.
        r.yaml = r.yaml.replace(
            "{name: a, services: [{name: a}]}",
            "{name: a, services: [{name: a, id: \"spiffe://partner.example/ns/x/sa/a\"}]}",
        );
        let e = check_candidate(&r, &[], "td", &["partner.example".into()]).unwrap_err();
        assert!(e.0.contains("theirs to allow"), "{e}");
    }
}
