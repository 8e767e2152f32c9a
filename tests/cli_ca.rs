//! `strait ca …` as an operator runs it, checked by an independent tool: OpenSSL makes the CSRs and the
//! operator PKI, and verifies what Strait issues.
//!
//! These tests need the `openssl` command (installed by `scripts/test.sh`); without it they fail and say so.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TD: &str = "example.org";

fn strait(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .output()
        .expect("run strait")
}

fn openssl(args: &[&str]) -> Output {
    let out = Command::new("openssl").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `openssl` ({e}); install it (apt-get install openssl) or run scripts/test.sh")
    });
    out
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts a failure with a single-line `error: …` message containing `needle`, and returns it.
fn fails_with(out: Output, needle: &str) -> String {
    assert!(!out.status.success(), "expected failure, got success");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line of error, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "want {needle:?} in: {stderr}");
    stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        Self { _tmp: tmp, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn init_ca(&self) -> PathBuf {
        let ca = self.path("ca");
        ok(strait(&[
            "ca",
            "init",
            "--dir",
            p(&ca),
            "--trust-domain",
            TD,
        ]));
        ca
    }

    /// An ECDSA P-256 key and a CSR for it made by OpenSSL, with a subject and SAN Strait must ignore.
    fn openssl_csr(&self, name: &str) -> PathBuf {
        let key = self.path(&format!("{name}.key"));
        let csr = self.path(&format!("{name}.csr"));
        ok(openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            p(&key),
        ]));
        ok(openssl(&[
            "req",
            "-new",
            "-key",
            p(&key),
            "-subj",
            "/CN=i-want-to-be-admin",
            "-addext",
            "subjectAltName=URI:spiffe://evil.org/admin",
            "-out",
            p(&csr),
        ]));
        csr
    }
}

#[test]
fn openssl_accepts_what_strait_issues() {
    let env = Env::new();
    let ca = env.init_ca();
    let key_mode = fs::metadata(ca.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);

    let csr = env.openssl_csr("web");
    let cert = env.path("web.pem");
    let stdout = ok(strait(&[
        "ca",
        "issue",
        "--dir",
        p(&ca),
        "--csr",
        p(&csr),
        "--id",
        "spiffe://example.org/ns/default/sa/web",
        "--ttl",
        "2h",
        "--out",
        p(&cert),
    ]));
    assert!(
        stdout.contains("spiffe://example.org/ns/default/sa/web"),
        "{stdout}"
    );
    assert!(stdout.contains("valid until"), "{stdout}");

    let bundle = env.path("bundle.pem");
    fs::write(&bundle, ok(strait(&["ca", "bundle", "--dir", p(&ca)]))).unwrap();
    let verify = ok(openssl(&["verify", "-CAfile", p(&bundle), p(&cert)]));
    assert!(verify.trim().ends_with(": OK"), "{verify}");
    // Also with the purpose checks OpenSSL applies to TLS clients and servers.
    for purpose in ["sslclient", "sslserver"] {
        ok(openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            p(&bundle),
            p(&cert),
        ]));
    }

    let text = ok(openssl(&["x509", "-in", p(&cert), "-noout", "-text"]));
    assert!(
        text.contains("URI:spiffe://example.org/ns/default/sa/web"),
        "{text}"
    );
    assert!(
        !text.contains("evil.org"),
        "the CSR's SAN must not be copied: {text}"
    );
    assert!(
        !text.contains("i-want-to-be-admin"),
        "the CSR's subject must not be copied"
    );
    assert!(
        text.contains("X509v3 Subject Alternative Name: critical"),
        "{text}"
    );
    assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
    assert!(text.contains("X509v3 Subject Key Identifier"), "{text}");

    // The CA certificate itself, as OpenSSL reads it.
    let ca_text = ok(openssl(&["x509", "-in", p(&bundle), "-noout", "-text"]));
    assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
    assert!(ca_text.contains("Certificate Sign, CRL Sign"), "{ca_text}");
    assert!(ca_text.contains("ASN1 OID: prime256v1"), "{ca_text}");

    // inspect agrees.
    let inspect = ok(strait(&["ca", "inspect", p(&cert), "--bundle", p(&bundle)]));
    assert!(
        inspect.contains("SPIFFE ID:   spiffe://example.org/ns/default/sa/web"),
        "{inspect}"
    );
    assert!(inspect.contains("verdict:     valid"), "{inspect}");
    let json: serde_json::Value = serde_json::from_str(&ok(strait(&[
        "ca",
        "inspect",
        p(&cert),
        "--bundle",
        p(&bundle),
        "--output",
        "json",
    ])))
    .unwrap();
    assert_eq!(json["spiffe_id"], "spiffe://example.org/ns/default/sa/web");
    assert_eq!(json["chain_valid"], true);
}

#[test]
fn ed25519_and_p384_csrs_from_openssl_are_accepted() {
    let env = Env::new();
    let ca = env.init_ca();
    for (name, genkey) in [
        ("ed", vec!["genpkey", "-algorithm", "ed25519"]),
        (
            "p384",
            vec!["ecparam", "-name", "secp384r1", "-genkey", "-noout"],
        ),
    ] {
        let key = env.path(&format!("{name}.key"));
        let csr = env.path(&format!("{name}.csr"));
        let cert = env.path(&format!("{name}.pem"));
        let mut args = genkey.clone();
        args.extend(["-out", p(&key)]);
        ok(openssl(&args));
        ok(openssl(&[
            "req",
            "-new",
            "-key",
            p(&key),
            "-subj",
            "/",
            "-out",
            p(&csr),
        ]));
        ok(strait(&[
            "ca",
            "issue",
            "--dir",
            p(&ca),
            "--csr",
            p(&csr),
            "--id",
            &format!("spiffe://{TD}/ns/a/sa/{name}"),
            "--out",
            p(&cert),
        ]));
        ok(openssl(&[
            "verify",
            "-CAfile",
            p(&ca.join("bundle.pem")),
            p(&cert),
        ]));
    }
}

#[test]
fn strait_signs_under_an_operator_pki_made_by_openssl() {
    let env = Env::new();
    let ext = env.path("ext.cnf");
    fs::write(
        &ext,
        "[req]\ndistinguished_name=dn\n[dn]\n[root]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\n\
         [inter]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\nsubjectAltName=URI:spiffe://example.org\n",
    )
    .unwrap();
    let (root_key, root) = (env.path("root.key"), env.path("root.pem"));
    ok(openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        p(&root_key),
        "-subj",
        "/O=ACME/CN=ACME Root CA",
        "-days",
        "30",
        "-config",
        p(&ext),
        "-extensions",
        "root",
        "-out",
        p(&root),
    ]));
    let (inter_key, inter_csr, inter) = (
        env.path("inter.key"),
        env.path("inter.csr"),
        env.path("inter.pem"),
    );
    ok(openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        p(&inter_key),
        "-subj",
        "/O=ACME/CN=ACME Mesh Intermediate",
        "-out",
        p(&inter_csr),
    ]));
    ok(openssl(&[
        "x509",
        "-req",
        "-in",
        p(&inter_csr),
        "-CA",
        p(&root),
        "-CAkey",
        p(&root_key),
        "-CAcreateserial",
        "-days",
        "10",
        "-extfile",
        p(&ext),
        "-extensions",
        "inter",
        "-out",
        p(&inter),
    ]));
    fs::set_permissions(&inter_key, fs::Permissions::from_mode(0o600)).unwrap();

    let ca = env.path("ca");
    ok(strait(&[
        "ca",
        "init",
        "--dir",
        p(&ca),
        "--trust-domain",
        TD,
        "--from-cert",
        p(&inter),
        "--from-key",
        p(&inter_key),
        "--chain",
        p(&root),
    ]));
    let csr = env.openssl_csr("w");
    let cert = env.path("w.pem");
    ok(strait(&[
        "ca",
        "issue",
        "--dir",
        p(&ca),
        "--csr",
        p(&csr),
        "--id",
        "spiffe://example.org/ns/a/sa/w",
        "--out",
        p(&cert),
    ]));
    // The output holds leaf + intermediate; OpenSSL verifies it up to the operator's root.
    let chain = fs::read_to_string(&cert).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "{chain}");
    ok(openssl(&[
        "verify",
        "-CAfile",
        p(&root),
        "-untrusted",
        p(&cert),
        p(&cert),
    ]));
    // The bundle Strait exports is the operator's root.
    let bundle = ok(strait(&["ca", "bundle", "--dir", p(&ca)]));
    assert_eq!(bundle.trim(), fs::read_to_string(&root).unwrap().trim());
    let inspect = ok(strait(&["ca", "inspect", p(&cert), "--bundle", p(&root)]));
    assert!(inspect.contains("verdict:     valid"), "{inspect}");
}

#[test]
fn bad_inputs_fail_with_one_line_and_write_nothing() {
    let env = Env::new();
    let ca = env.init_ca();
    let out = env.path("out.pem");
    let issue = |csr: &Path, id: &str, dir: &Path| {
        strait(&[
            "ca",
            "issue",
            "--dir",
            p(dir),
            "--csr",
            p(csr),
            "--id",
            id,
            "--out",
            p(&out),
        ])
    };
    let good_id = "spiffe://example.org/ns/a/sa/b";

    // Not a CSR at all.
    let not_csr = env.path("not.csr");
    fs::write(&not_csr, "hello, I am not a CSR\n").unwrap();
    fails_with(
        issue(&not_csr, good_id, &ca),
        "not a certificate signing request",
    );

    // A certificate where a CSR should be.
    fails_with(
        issue(&ca.join("bundle.pem"), good_id, &ca),
        "CERTIFICATE REQUEST",
    );

    // A tampered CSR: the subject changed after signing (DER edited, re-encoded as PEM).
    let csr = env.openssl_csr("t");
    let der = ok_bytes(openssl(&["req", "-in", p(&csr), "-outform", "DER"]));
    let mut der = der;
    let pos = find(&der, b"i-want-to-be-admin").expect("subject in DER");
    der[pos] = b'I';
    let tampered_der = env.path("tampered.der");
    fs::write(&tampered_der, &der).unwrap();
    let tampered = env.path("tampered.csr");
    ok(openssl(&[
        "req",
        "-inform",
        "DER",
        "-in",
        p(&tampered_der),
        "-out",
        p(&tampered),
    ]));
    fails_with(issue(&tampered, good_id, &ca), "signature does not match");

    // An ID outside the trust domain, and a malformed one.
    let csr = env.openssl_csr("g");
    fails_with(
        issue(&csr, "spiffe://other.org/ns/a/sa/b", &ca),
        "outside this CA's trust domain",
    );
    fails_with(
        issue(&csr, "spiffe://example.org/ns//b", &ca),
        "path segment is empty",
    );

    // A missing CA.
    fails_with(issue(&csr, good_id, &env.path("nope")), "strait ca init");

    assert!(!out.exists(), "nothing may be written on failure");

    // init refuses to overwrite an existing CA, and a bad trust domain.
    fails_with(
        strait(&["ca", "init", "--dir", p(&ca), "--trust-domain", TD]),
        "refusing to overwrite",
    );
    fails_with(
        strait(&[
            "ca",
            "init",
            "--dir",
            p(&env.path("x")),
            "--trust-domain",
            "Bad.Domain",
        ]),
        "lower-case",
    );
    assert!(!env.path("x").exists());
}

#[test]
fn a_ca_key_readable_by_others_is_refused() {
    let env = Env::new();
    let ca = env.init_ca();
    fs::set_permissions(ca.join("ca-key.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    let csr = env.openssl_csr("k");
    let out = env.path("k.pem");
    fails_with(
        strait(&[
            "ca",
            "issue",
            "--dir",
            p(&ca),
            "--csr",
            p(&csr),
            "--id",
            "spiffe://example.org/a",
            "--out",
            p(&out),
        ]),
        "chmod 600",
    );
    assert!(!out.exists());
    // The same rule for an operator's key passed to init.
    let key = env.path("op.key");
    ok(openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        p(&key),
    ]));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    fails_with(
        strait(&[
            "ca",
            "init",
            "--dir",
            p(&env.path("ca2")),
            "--trust-domain",
            TD,
            "--from-cert",
            p(&ca.join("ca-cert.pem")),
            "--from-key",
            p(&key),
        ]),
        "chmod 600",
    );
    assert!(!env.path("ca2").exists());
}

#[test]
fn inspect_reports_foreign_and_expired_chains_and_exits_non_zero() {
    let env = Env::new();
    let ca = env.init_ca();
    let other = env.path("other");
    ok(strait(&[
        "ca",
        "init",
        "--dir",
        p(&other),
        "--trust-domain",
        TD,
    ]));
    let csr = env.openssl_csr("i");
    let cert = env.path("i.pem");
    ok(strait(&[
        "ca",
        "issue",
        "--dir",
        p(&ca),
        "--csr",
        p(&csr),
        "--id",
        "spiffe://example.org/a",
        "--ttl",
        "1s",
        "--out",
        p(&cert),
    ]));
    let out = strait(&[
        "ca",
        "inspect",
        p(&cert),
        "--bundle",
        p(&other.join("bundle.pem")),
    ]);
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("INVALID: peer certificate was not issued by a CA in the trust bundle"),
        "{stdout}"
    );

    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = strait(&[
        "ca",
        "inspect",
        p(&cert),
        "--bundle",
        p(&ca.join("bundle.pem")),
    ]);
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("(EXPIRED)"), "{stdout}");
    assert!(
        stdout.contains("INVALID: peer certificate expired"),
        "{stdout}"
    );
}

#[test]
fn spiffe_bundle_format_is_a_jwk_set() {
    let env = Env::new();
    let ca = env.init_ca();
    let json: serde_json::Value = serde_json::from_str(&ok(strait(&[
        "ca",
        "bundle",
        "--dir",
        p(&ca),
        "--format",
        "spiffe",
    ])))
    .unwrap();
    let key = &json["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert!(json["spiffe_sequence"].as_u64().unwrap() > 0);
}

#[test]
fn help_teaches_the_commands() {
    let help = ok(strait(&["ca", "issue", "--help"]));
    assert!(help.contains("openssl req -new"), "{help}");
    let help = ok(strait(&["--help"]));
    assert!(help.contains("strait ca init"), "{help}");
}

fn ok_bytes(out: Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
