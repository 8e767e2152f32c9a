//! One decision for workflows of 10, 100, 1 000 and 10 000 steps: compiled (fixed Rego + data indexed by
//! source and destination) against the same flows written naively as one Rego rule per step.
//!
//!     cargo bench -p strait-policy --bench decision
//!
//! Each iteration is what the proxy does per request: clone the prepared engine, set the input, evaluate
//! the decision path, read the result.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use serde_json::json;
use strait_policy::bundle::Bundle;
use strait_policy::compile::naive_modules;
use strait_policy::engine::{PolicyEngine, RegoVersion, DEFAULT_BUDGET, DEFAULT_DECISION_PATH};
use strait_policy::input::{http_input, HttpRequest, Peer};
use strait_policy::workflow::Workflow;

/// A workflow of `n` steps over enough services that every step is a distinct pair.
fn workflow(n: usize) -> Workflow {
    let k = ((n as f64).sqrt().ceil() as usize + 1).max(2);
    let services: Vec<String> = (0..k)
        .map(|i| format!("{{name: s{i}, namespace: bench, serviceAccount: s{i}}}"))
        .collect();
    let steps: Vec<String> = (0..n)
        .map(|i| {
            let (f, t) = (i % k, (i / k + 1 + i % k) % k);
            format!(
                "- {{from: s{f}, to: s{t}, methods: [POST], paths: ['/api/s{t}', '/api/s{t}/**']}}"
            )
        })
        .collect();
    Workflow::from_yaml(&format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: bench}}\ntrustDomain: example.org\nactors:\n- name: a\n  services: [{}]\nsteps:\n{}\n",
        services.join(", "),
        steps.join("\n")
    ))
    .unwrap()
}

fn input(wf: &Workflow, step: usize) -> serde_json::Value {
    let ids = wf.service_ids().unwrap();
    let s = &wf.steps[step];
    http_input(
        &Peer {
            address: Some("10.0.0.1:4000".parse().unwrap()),
            principal: Some(ids[&s.from].clone()),
        },
        &Peer {
            address: Some("10.0.0.2:5000".parse().unwrap()),
            principal: Some(ids[&s.to].clone()),
        },
        &HttpRequest {
            id: "b".into(),
            method: "POST".into(),
            path: format!("/api/{}/doc", s.to),
            host: format!("{}:5000", s.to),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("user-agent".into(), "bench".into()),
            ],
            ..Default::default()
        },
    )
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    for n in [10usize, 100, 1000, 10000] {
        let wf = workflow(n);
        // The last step: the worst case for the naive form (every rule before it is evaluated first).
        let allowed = input(&wf, n - 1);
        let compiled = Bundle::from_workflow(&wf, &[], false)
            .unwrap()
            .engine(DEFAULT_BUDGET)
            .unwrap();
        assert!(compiled.decide(&allowed).allowed);
        g.bench_with_input(BenchmarkId::new("compiled", n), &allowed, |b, i| {
            b.iter(|| compiled.decide(i))
        });

        let naive = PolicyEngine::new(
            &naive_modules(&wf).unwrap(),
            &json!({}),
            RegoVersion::V1,
            DEFAULT_DECISION_PATH,
            std::time::Duration::from_secs(10),
        )
        .unwrap();
        assert!(naive.decide(&allowed).allowed);
        if n >= 1000 {
            g.sample_size(10);
        }
        g.bench_with_input(
            BenchmarkId::new("naive_rule_per_step", n),
            &allowed,
            |b, i| b.iter(|| naive.decide(i)),
        );
        g.sample_size(100);
    }
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
