//! `strait demo`, the README's main command, run for real (as root): it must pass its own verdict, write
//! the graph and the results, refuse a workflow whose verdict cannot hold, and leave nothing behind.

mod support;

use std::process::Command;

use support::require_root;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strait")
}

fn leftovers() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("sdemo-"))
        .map(str::to_owned)
        .collect()
}

// The demo's namespace names are fixed (one demo at a time), so its cases run in one test, in order.
#[test]
fn the_demo_passes_on_the_reference_workflow_and_cleans_up() {
    if !require_root() {
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["demo", "--out-dir", out_dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("8 of 84 requests allowed, 8 expected"),
        "{text}"
    );
    assert!(text.contains("mismatches: 0"), "{text}");
    assert!(text.contains("marker found: no"), "{text}");
    assert!(text.contains("PASS"), "{text}");
    let csv = std::fs::read_to_string(out_dir.path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 85, "header + 84 requests");
    assert_eq!(csv.matches(",allowed,allowed,").count(), 8);
    let svg = std::fs::read_to_string(out_dir.path().join("movie.svg")).unwrap();
    assert_eq!(svg.matches("<line ").count(), 8);
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // The verdict follows the workflow, not a fixed count: one more step (GET owner → hdr) is one more
    // request through (the store answers 404 for a GET of the collection, but the mesh let it pass).
    let wf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/movie-workflow.yaml"
    ))
    .unwrap()
        + "  - {from: owner, to: hdr, methods: [GET], paths: [/api/hdr]}\n";
    let f = out_dir.path().join("plus-one.yaml");
    std::fs::write(&f, wf).unwrap();
    let out = Command::new(bin())
        .args([
            "demo",
            "-f",
            f.to_str().unwrap(),
            "--out-dir",
            out_dir.path().join("second").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("9 of 84 requests allowed, 9 expected"),
        "{text}"
    );
    assert!(
        text.contains("owner   hdr          GET     allowed   allowed"),
        "{text}"
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // The study's experiment on the same topology (`strait bench study`; same namespace names, hence in
    // this test). Three samples per step: this checks that every scenario runs and lets each step through
    // (a refused request fails the run), not how fast it is.
    let study = out_dir.path().join("study");
    let (text, summary) = bench_study(&["--samples", "3"], &study);
    let intra = scenarios(&summary, "intra");
    assert_eq!(intra, EVERY_SCENARIO, "{summary}");
    // The inter-region placement runs everywhere (tc netem, or the WAN relay where the kernel has no
    // sch_netem) and measures the 4 steps that cross the regions.
    let inter = scenarios(&summary, "inter").len();
    assert_eq!(inter, intra.len(), "{summary}");
    assert!(
        text.contains("asked 25 ms one way, measured"),
        "the WAN delay is measured and printed: {text}"
    );
    let samples = std::fs::read_to_string(study.join("study-samples.csv")).unwrap();
    assert_eq!(
        samples.lines().count(),
        1 + intra.len() * 8 * 3 + inter * 4 * 3,
        "3 samples per step: 8 steps per intra cell, the 4 crossing steps per inter cell"
    );
    assert!(study.join("study-inter.svg").exists());
    let plot = std::fs::read_to_string(study.join("study-intra.svg")).unwrap();
    assert!(
        plot.contains(
            "<title>study (Istio + OPA; direct = Istio without OPA): 7.88 median ms</title>"
        ),
        "{plot}"
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // The study's deployment: five organisations, each its own trust domain, CA, control plane, private
    // network (the same range everywhere) and gateway, in two regions, joined only through their
    // gateways (`strait demo --federated`).
    let fed = out_dir.path().join("federated");
    let out = Command::new(bin())
        .args(["demo", "--federated", "--out-dir", fed.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "8 of 84 requests allowed, 8 expected by the workflow (8 steps, 6 across organisations); mismatches: 0"
        ),
        "{text}"
    );
    // Seven captures (both regions' networks, every gateway's host), each with traffic, none with the
    // marker.
    assert_eq!(text.matches("marker found: no").count(), 7, "{text}");
    assert!(!text.contains(" 0 packets"), "{text}");
    // Each organisation's consent is shown: what it exports, imports, and the steps' state.
    assert!(
        text.contains("step spiffe://owner.example/ns/movie/sa/owner → spiffe://vfx.example/ns/movie/sa/vfx-1 (movie): accepted by the partner"),
        "{text}"
    );
    let csv = std::fs::read_to_string(fed.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 85, "header + 84 requests");
    assert_eq!(
        csv.lines()
            .filter(|l| l.contains(",inter,allowed,allowed,"))
            .count(),
        4,
        "the four steps that cross the regions pass: {csv}"
    );
    assert!(text.contains("PASS"), "{text}");
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // The gateway benchmark (`strait bench gateway`, with hey) runs both paths, every request answered
    // 201 (it fails otherwise); how fast is for the benchmark's own table, not checked here.
    let bench = out_dir.path().join("gateway-bench");
    let out = Command::new(bin())
        .args(["bench", "gateway", "--seconds", "1", "--out-dir"])
        .arg(&bench)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(bench.join("gateway.csv")).unwrap();
    let paths: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(paths, ["direct", "gateway", "egress"], "{csv}");
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // The study's experiment on the study's deployment (`strait bench study --federated`): direct through
    // the borders' port forwards, then every scenario applied by every organisation to its own part, both
    // placements. Two samples per step: every step must be answered (a refusal fails the run).
    let fstudy = out_dir.path().join("study-federated");
    let (text, summary) = bench_study(&["--federated", "--samples", "2"], &fstudy);
    for placement in ["intra", "inter"] {
        assert_eq!(scenarios(&summary, placement), EVERY_SCENARIO, "{summary}");
    }
    let samples = std::fs::read_to_string(fstudy.join("study-samples.csv")).unwrap();
    assert_eq!(
        samples.lines().count(),
        1 + 6 * 8 * 2 + 6 * 4 * 2,
        "2 samples per step: 8 steps per intra cell, the 4 crossing steps per inter cell"
    );
    assert!(
        text.contains("five organisations, through their gateways")
            && text.contains("ms over one round trip"),
        "{text}"
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
}

/// The scenarios of `strait bench study`, in the order they are measured.
const EVERY_SCENARIO: [&str; 6] = ["direct", "allow-all", "minimal", "+100", "+1000", "+10000"];

/// `strait bench study ARGS --out-dir DIR`, which must succeed: what it printed, and study.csv.
fn bench_study(args: &[&str], dir: &std::path::Path) -> (String, String) {
    let out = Command::new(bin())
        .args(["bench", "study"])
        .args(args)
        .arg("--out-dir")
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        text,
        std::fs::read_to_string(dir.join("study.csv")).unwrap(),
    )
}

/// The scenarios study.csv has for `placement`, in its order.
fn scenarios<'a>(summary: &'a str, placement: &str) -> Vec<&'a str> {
    summary
        .lines()
        .filter(|l| l.split(',').next() == Some(placement))
        .filter_map(|l| l.split(',').nth(1))
        .collect()
}

#[test]
fn the_demo_refuses_to_run_without_root_with_one_line() {
    // As nobody (uid 65534): one line saying what to do.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "demo",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
}
