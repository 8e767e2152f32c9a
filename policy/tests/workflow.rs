//! Workflows compiled to Rego + data decide like the workflow says, combine with custom Rego as
//! documented, and agree with the plain-Rust reference on random workflows and requests.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;
use strait_policy::compile::{compile, entry_rego, WORKFLOW_REGO};
use strait_policy::engine::{PolicyEngine, RegoVersion, DEFAULT_BUDGET, DEFAULT_DECISION_PATH};
use strait_policy::input::{http_input, tcp_input, HttpRequest, Peer};
use strait_policy::reference::{decide, RefHttp, RefRequest};
use strait_policy::workflow::Workflow;

const MOVIE: &str = include_str!("../../deploy/examples/movie-workflow.yaml");

fn engine_for(wf: &Workflow, custom: &[(&str, &str)]) -> PolicyEngine {
    let names: Vec<String> = custom.iter().map(|(n, _)| n.to_string()).collect();
    let mut modules = vec![
        (
            "strait/workflow.rego".to_string(),
            WORKFLOW_REGO.to_string(),
        ),
        ("strait/entry.rego".to_string(), entry_rego(&names)),
    ];
    for (n, src) in custom {
        modules.push((format!("custom/{n}.rego"), src.to_string()));
    }
    let e = PolicyEngine::new(
        &modules,
        &compile(wf).unwrap(),
        RegoVersion::V1,
        DEFAULT_DECISION_PATH,
        DEFAULT_BUDGET,
    )
    .unwrap();
    // Compiled workflows run on the bytecode VM: the property test below checks the VM against the
    // reference.
    assert!(e.uses_vm(), "workflow bundles should compile for the VM");
    e
}

fn id(name: &str) -> String {
    format!("spiffe://example.org/ns/movie/sa/{name}")
}

fn http(
    src: &str,
    dst: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> serde_json::Value {
    http_input(
        &Peer {
            address: None,
            principal: Some(src.into()),
        },
        &Peer {
            address: None,
            principal: Some(dst.into()),
        },
        &HttpRequest {
            method: method.into(),
            path: path.into(),
            host: "svc".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    )
}

const SERVICES: [&str; 7] = ["owner", "vfx-1", "vfx-2", "vfx-3", "color", "sound", "hdr"];
const STEPS: [(&str, &str); 8] = [
    ("owner", "vfx-1"),
    ("vfx-1", "vfx-2"),
    ("vfx-1", "vfx-3"),
    ("vfx-2", "color"),
    ("vfx-3", "sound"),
    ("color", "hdr"),
    ("hdr", "owner"),
    ("sound", "owner"),
];

#[test]
fn the_movie_workflow_allows_its_eight_steps_and_nothing_else() {
    let wf = Workflow::from_yaml(MOVIE).unwrap();
    let e = engine_for(&wf, &[]);
    let mut allowed = 0;
    for src in SERVICES {
        for dst in SERVICES {
            for method in ["POST", "GET", "PUT", "DELETE"] {
                let d = e.decide(&http(
                    &id(src),
                    &id(dst),
                    method,
                    &format!("/api/{dst}"),
                    &[],
                ));
                let want = method == "POST" && STEPS.contains(&(src, dst));
                assert_eq!(d.allowed, want, "{src} -> {dst} {method}: {}", d.reason);
                allowed += d.allowed as usize;
                if !want {
                    assert_eq!(d.reason, "no step of the workflow allows this request");
                }
            }
        }
    }
    assert_eq!(allowed, 8);
    // Right pair and method, wrong path; a TCP connection where no step says tcp.
    assert!(
        !e.decide(&http(&id("owner"), &id("vfx-1"), "POST", "/api/vfx-2", &[]))
            .allowed
    );
    assert!(
        !e.decide(&http(
            &id("owner"),
            &id("vfx-1"),
            "POST",
            "/api/vfx-1/../admin",
            &[]
        ))
        .allowed
    );
    let tcp = tcp_input(
        &Peer {
            address: None,
            principal: Some(id("owner")),
        },
        &Peer {
            address: None,
            principal: Some(id("vfx-1")),
        },
    );
    assert!(!e.decide(&tcp).allowed);
    // A principal from outside the workflow.
    assert!(
        !e.decide(&http(
            "spiffe://example.org/ns/x/sa/y",
            &id("vfx-1"),
            "POST",
            "/api/vfx-1",
            &[]
        ))
        .allowed
    );
}

#[test]
fn custom_modules_can_only_narrow_the_workflow() {
    let wf = Workflow::from_yaml(MOVIE).unwrap();
    let no_big_bodies = r#"package strait.custom.limits
import rego.v1
default allow := false
allow if not input.attributes.request.http.headers["x-classified"]
"#;
    let allow_everything = "package strait.custom.open\nimport rego.v1\nallow := true\n";
    let e = engine_for(
        &wf,
        &[("limits", no_big_bodies), ("open", allow_everything)],
    );
    let d = e.decide(&http(&id("owner"), &id("vfx-1"), "POST", "/api/vfx-1", &[]));
    assert!(d.allowed, "{d:?}");
    let d = e.decide(&http(
        &id("owner"),
        &id("vfx-1"),
        "POST",
        "/api/vfx-1",
        &[("X-Classified", "1")],
    ));
    assert!(!d.allowed);
    assert_eq!(d.reason, "denied by custom policy limits");
    // A custom module that allows everything does not open what the workflow forbids.
    let d = e.decide(&http(&id("owner"), &id("hdr"), "POST", "/api/hdr", &[]));
    assert!(!d.allowed);
}

fn one_step(when: &str) -> Workflow {
    Workflow::from_yaml(&format!(
        "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: t}}\ntrustDomain: example.org\nactors:\n- name: a\n  services: [{{name: a, namespace: t, serviceAccount: a}}, {{name: b, namespace: t, serviceAccount: b}}]\nsteps:\n- {{from: a, to: b, methods: [GET], paths: ['/x/**'], when: {when}}}\n"
    ))
    .unwrap()
}

#[test]
fn header_and_time_window_conditions() {
    let (a, b) = (
        "spiffe://example.org/ns/t/sa/a",
        "spiffe://example.org/ns/t/sa/b",
    );
    let e = engine_for(&one_step("{headers: {x-case: '*', x-env: prod}}"), &[]);
    assert!(
        e.decide(&http(
            a,
            b,
            "GET",
            "/x/1",
            &[("X-Case", "42"), ("x-env", "prod")]
        ))
        .allowed
    );
    assert!(
        !e.decide(&http(a, b, "GET", "/x/1", &[("x-env", "prod")]))
            .allowed
    );
    assert!(
        !e.decide(&http(
            a,
            b,
            "GET",
            "/x/1",
            &[("X-Case", "42"), ("x-env", "dev")]
        ))
        .allowed
    );

    let always = engine_for(
        &one_step("{timeWindow: {timezone: UTC, from: '00:00', to: '24:00'}}"),
        &[],
    );
    assert!(always.decide(&http(a, b, "GET", "/x/1", &[])).allowed);
    // Every day but today (in Tokyo): never open now.
    let today = {
        // 1970-01-01 was a Thursday; Tokyo is UTC+9 all year.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 9 * 3600;
        [
            "thursday",
            "friday",
            "saturday",
            "sunday",
            "monday",
            "tuesday",
            "wednesday",
        ][((secs / 86400) % 7) as usize]
    };
    let others: Vec<&str> = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ]
    .into_iter()
    .filter(|d| *d != today)
    .collect();
    let closed = engine_for(
        &one_step(&format!(
            "{{timeWindow: {{timezone: Asia/Tokyo, days: [{}], from: '00:00', to: '24:00'}}}}",
            others.join(", ")
        )),
        &[],
    );
    assert!(!closed.decide(&http(a, b, "GET", "/x/1", &[])).allowed);
    let open = engine_for(
        &one_step(&format!(
            "{{timeWindow: {{timezone: Asia/Tokyo, days: [{today}], from: '00:00', to: '24:00'}}}}"
        )),
        &[],
    );
    assert!(open.decide(&http(a, b, "GET", "/x/1", &[])).allowed);
}

#[test]
fn bad_workflows_say_where() {
    let e = Workflow::from_yaml(&MOVIE.replace("to: hdr,", "to: hdrr,")).unwrap_err();
    assert_eq!(e.at, "steps[5].to");
    let e = Workflow::from_yaml(&MOVIE.replace(
        "methods: [POST], paths: [/api/hdr]",
        "methods: ['GE T'], paths: [/api/hdr]",
    ))
    .unwrap_err();
    assert_eq!(e.at, "steps[5].methods[0]");
    let e = Workflow::from_yaml(&MOVIE.replace("paths: [/api/hdr]", "paths: ['/api/{a,b}']"))
        .unwrap_err();
    assert!(e.message.contains("not supported"), "{e}");
    let e = Workflow::from_yaml(&MOVIE.replace(
        "trustDomain: example.org",
        "trustDomain: example.org\ncolour: red",
    ))
    .unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
    // Egress entries name an address or a DNS name, exactly one of them, and a wildcard only as the
    // whole first label below a registrable name.
    let egress = |entry: &str| {
        let base = MOVIE.trim_end();
        Workflow::from_yaml(&format!("{base}\negress:\n- {{from: owner, {entry}}}\n"))
    };
    let ok = egress("host: '*.partner.example', port: 443").unwrap();
    let compiled = strait_policy::compile::compile(&ok).unwrap();
    assert!(compiled
        .to_string()
        .contains(r#""host":"*.partner.example""#));
    for (entry, at) in [
        ("host: '*.com'", "egress[0].host"),
        ("host: 'a b.example'", "egress[0].host"),
        ("host: 'x.*.example'", "egress[0].host"),
        ("cidr: 10.0.0.0/8, host: api.example", "egress[0]"),
        ("port: 443", "egress[0]"),
        ("cidr: api.example", "egress[0].cidr"),
    ] {
        assert_eq!(egress(entry).unwrap_err().at, at, "{entry}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Property: compiled Rego == reference

fn arb_workflow() -> impl Strategy<Value = Workflow> {
    // `get` in a workflow means GET; PROPFIND is an extension method, exact.
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "get", "PROPFIND"]);
    let path = prop::sample::select(vec!["/a", "/a/*", "/a/**", "/b", "/b/?", "/*/c", "/**"]);
    let step = (
        0usize..5,
        0usize..5,
        prop::collection::vec(method, 0..3),
        prop::collection::vec(path, 0..3),
        prop::sample::select(vec!["[]", "[5001]", "[5001, 5002]"]),
        prop::option::of(prop::sample::select(vec!["*", "yes"])),
    );
    prop::collection::vec(step, 0..12).prop_map(|steps| {
        let services = (0..5).map(|i| format!("{{name: s{i}, namespace: p, serviceAccount: s{i}}}")).collect::<Vec<_>>();
        let steps: Vec<String> = steps
            .into_iter()
            .map(|(f, t, m, p, tcp, h)| {
                let when = h.map(|v| format!(", when: {{headers: {{x-flag: '{v}'}}}}")).unwrap_or_default();
                format!(
                    "- {{from: s{f}, to: s{t}, methods: [{}], paths: [{}], tcp: {tcp}{when}}}",
                    m.join(", "),
                    p.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        Workflow::from_yaml(&format!(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {{name: p}}\ntrustDomain: example.org\nactors:\n- name: x\n  services: [{}]\nsteps:{}\n",
            services.join(", "),
            if steps.is_empty() { " []".to_string() } else { format!("\n{}", steps.join("\n")) }
        ))
        .unwrap()
    })
}

fn arb_request() -> impl Strategy<Value = RefRequest> {
    let principal = (0usize..6).prop_map(|i| format!("spiffe://example.org/ns/p/sa/s{i}"));
    let http = prop::option::of((
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "get", "PROPFIND", "propfind",
        ]),
        prop::sample::select(vec![
            "/a", "/a/x", "/a/x/y", "/b", "/b/1", "/b/12", "/q/c", "/c", "/a?z=1",
        ]),
        prop::option::of(prop::sample::select(vec!["yes", "no"])),
    ));
    let port = prop::sample::select(vec![5000u16, 5001, 5002]);
    (principal.clone(), principal, http, port).prop_map(|(source, destination, http, port)| {
        RefRequest {
            source,
            destination,
            port,
            http: http.map(|(m, p, flag)| RefHttp {
                method: m.into(),
                path: p.into(),
                headers: flag
                    .map(|f| BTreeMap::from([("x-flag".to_string(), f.to_string())]))
                    .unwrap_or_default(),
            }),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn compiled_rego_decides_exactly_like_the_reference(wf in arb_workflow(), reqs in prop::collection::vec(arb_request(), 1..12)) {
        let e = engine_for(&wf, &[]);
        for r in reqs {
            let want = decide(&wf, &r).expect("no time windows generated");
            let dst_addr = std::net::SocketAddr::from(([10, 0, 0, 2], r.port));
            let (src, dst) = (Peer { address: None, principal: Some(r.source.clone()) }, Peer { address: Some(dst_addr), principal: Some(r.destination.clone()) });
            let input = match &r.http {
                None => tcp_input(&src, &dst),
                Some(h) => http_input(&src, &dst, &HttpRequest {
                    method: h.method.clone(),
                    path: h.path.clone(),
                    headers: h.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    ..Default::default()
                }),
            };
            let got = e.decide(&input);
            prop_assert_eq!(got.allowed, want, "request {:?}: {}", r, got.reason);
        }
    }
}

#[test]
fn data_is_indexed_by_source_then_destination() {
    let wf = Workflow::from_yaml(MOVIE).unwrap();
    let data = compile(&wf).unwrap();
    let flows = &data["strait_workflow"]["flows"];
    assert_eq!(flows[id("vfx-1")].as_object().unwrap().len(), 2);
    assert_eq!(
        flows[id("owner")][id("vfx-1")]["methods"]["POST"][0]["exact"],
        json!({"/api/vfx-1": true})
    );
    assert!(flows[id("owner")][id("vfx-1")]["methods"]
        .get("GET")
        .is_none());
}
