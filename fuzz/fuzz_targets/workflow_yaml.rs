//! Workflow YAML as an operator (or a Kubernetes `Workflow` resource) submits it: parsed, validated,
//! compiled to Rego data and built into a bundle whose policy compiles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_policy::bundle::Bundle;
use strait_policy::workflow::Workflow;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(wf) = Workflow::from_yaml(text) else {
        return;
    };
    let _ = wf.service_ids();
    let _ = strait_policy::compile::compile(&wf);
    if let Ok(bundle) = Bundle::from_workflow(&wf, &[], false) {
        let _ = bundle.content_hash();
    }
});
