//! `strait policy compile|eval|test` as an operator uses them.

use std::process::{Command, Output};

fn strait(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .output()
        .unwrap()
}

fn input(src: &str, dst: &str, method: &str) -> String {
    format!(
        r#"{{"attributes": {{"source": {{"principal": "spiffe://example.org/ns/movie/sa/{src}"}}, "destination": {{"principal": "spiffe://example.org/ns/movie/sa/{dst}"}}, "request": {{"http": {{"method": "{method}", "path": "/api/{dst}", "headers": {{}}}}}}}}}}"#
    )
}

#[test]
fn compile_then_eval_the_movie_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("movie.tar.gz");
    let wf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/movie-workflow.yaml"
    );
    let out = strait(&[
        "policy",
        "compile",
        "-f",
        wf,
        "-o",
        bundle.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (src, dst, method, allowed) in [
        ("owner", "vfx-1", "POST", true),
        ("owner", "vfx-1", "GET", false),
        ("vfx-1", "owner", "POST", false),
    ] {
        let f = dir.path().join("in.json");
        std::fs::write(&f, input(src, dst, method)).unwrap();
        let out = strait(&[
            "policy",
            "eval",
            "--bundle",
            bundle.to_str().unwrap(),
            "--input",
            f.to_str().unwrap(),
        ]);
        assert_eq!(out.status.success(), allowed, "{src}->{dst} {method}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["allowed"], allowed);
        assert!(v["reason"].as_str().unwrap().len() > 5);
    }
}

#[test]
fn a_bad_workflow_is_refused_with_the_line_of_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("wf.yaml");
    let text =
        include_str!("../deploy/examples/movie-workflow.yaml").replace("to: sound,", "to: noise,");
    std::fs::write(&f, text).unwrap();
    let out_file = dir.path().join("b.tar.gz");
    let out = strait(&[
        "policy",
        "compile",
        "-f",
        f.to_str().unwrap(),
        "-o",
        out_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("steps[4].to") && err.contains("noise"),
        "{err}"
    );
    assert!(!out_file.exists());
}

#[test]
fn policy_test_runs_test_rules_and_fails_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("authz.rego"),
        "package authz\nimport rego.v1\ndefault allow := false\nallow if input.user == \"alice\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("authz_test.rego"),
        "package authz_test\nimport rego.v1\ntest_alice if data.authz.allow with input as {\"user\": \"alice\"}\ntest_bob_denied if not data.authz.allow with input as {\"user\": \"bob\"}\n",
    )
    .unwrap();
    let out = strait(&["policy", "test", dir.path().to_str().unwrap(), "-v"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");
    std::fs::write(
        dir.path().join("broken_test.rego"),
        "package broken_test\nimport rego.v1\ntest_wrong if data.authz.allow with input as {\"user\": \"eve\"}\n",
    )
    .unwrap();
    let out = strait(&["policy", "test", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL data.broken_test.test_wrong")
            && stdout.contains("2 passed, 1 failed"),
        "{stdout}"
    );
}
