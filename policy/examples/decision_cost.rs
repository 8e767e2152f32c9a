//! Deterministic cost of one decision, for instruction counting with callgrind (wall-clock benchmarks on a
//! shared 2-core machine vary ±30 %; instruction counts repeat exactly):
//!
//!     cargo build --release -p strait-policy --example decision_cost
//!     valgrind --tool=callgrind --callgrind-out-file=cg.10 target/release/examples/decision_cost 10
//!     valgrind --tool=callgrind --callgrind-out-file=cg.10000 target/release/examples/decision_cost 10000
//!     callgrind_annotate --inclusive=yes cg.10 | grep PolicyEngine::decide     # ÷ 2001 decisions
//!
//! Builds a workflow of N steps (as `benches/decision.rs` does), then makes 2 001 decisions for its last
//! step the way the proxy does: the input document built in the engine's form (`http_input_value`, with
//! the peers prepared once), then `decide_value`.

use strait_policy::bundle::Bundle;
use strait_policy::input::{http_input_value, HttpRequest, Peer, Peers};
use strait_policy::workflow::Workflow;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            eprintln!("usage: decision_cost STEPS");
            std::process::exit(2)
        });
    let k = ((n as f64).sqrt().ceil() as usize + 1).max(2);
    let services: Vec<String> = (0..k)
        .map(|i| format!("{{name: s{i}, namespace: bench, serviceAccount: s{i}}}"))
        .collect();
    let steps: Vec<String> = (0..n)
        .map(|i| {
            let (f, t) = (i % k, (i / k + 1 + i % k) % k);
            format!("- {{from: s{f}, to: s{t}, methods: [POST], paths: ['/api/s{t}']}}")
        })
        .collect();
    let wf = Workflow::from_yaml(&format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: b}}\ntrustDomain: example.org\nactors:\n- name: a\n  services: [{}]\nsteps:\n{}\n",
        services.join(", "),
        steps.join("\n")
    ))
    .expect("generated workflow");
    let ids = wf.service_ids().expect("ids");
    let step = &wf.steps[n - 1];
    let peers = Peers::new(
        Peer {
            address: Some("10.0.0.1:40000".parse().expect("address")),
            principal: Some(ids[&step.from].clone()),
        },
        Peer {
            address: Some("10.0.0.2:5000".parse().expect("address")),
            principal: Some(ids[&step.to].clone()),
        },
    );
    let request = HttpRequest {
        id: "0123456789abcdef".into(),
        method: "POST".into(),
        path: format!("/api/{}", step.to),
        host: format!("{}:5000", step.to),
        scheme: "http".into(),
        protocol: "HTTP/1.1".into(),
        headers: vec![
            ("host".into(), format!("{}:5000", step.to)),
            ("user-agent".into(), "curl/7.88.1".into()),
            ("accept".into(), "*/*".into()),
        ],
        ..Default::default()
    };
    let engine = Bundle::from_workflow(&wf, &[], false)
        .expect("bundle")
        .engine(std::time::Duration::from_millis(100))
        .expect("engine");
    for _ in 0..2001 {
        let input = http_input_value(&peers, &request);
        assert!(engine.decide_value(input).allowed);
    }
}
