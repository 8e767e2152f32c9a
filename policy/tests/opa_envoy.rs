//! The OPA-Envoy tutorial policy (JWT roles on /people) and an OPA-Istio style policy, written fresh from
//! the documented input shape, give the documented decisions in both Rego v1 and v0 syntax.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use strait_policy::engine::{PolicyEngine, RegoVersion, DEFAULT_BUDGET, DEFAULT_DECISION_PATH};
use strait_policy::input::{http_input, HttpRequest, Peer};

const V1: &str = r#"
package envoy.authz

import rego.v1

import input.attributes.request.http as http_request

default allow := false

allow if {
	is_token_valid
	action_allowed
}

is_token_valid if {
	token.valid
	now := time.now_ns() / 1000000000
	token.payload.nbf <= now
	now < token.payload.exp
}

action_allowed if {
	http_request.method == "GET"
	token.payload.role in {"guest", "admin"}
	glob.match("/people*", ["/"], http_request.path)
}

action_allowed if {
	http_request.method == "POST"
	token.payload.role == "admin"
	glob.match("/people", ["/"], http_request.path)
	lower(input.parsed_body.firstname) != base64url.decode(token.payload.sub)
}

token := {"valid": valid, "payload": payload} if {
	[_, encoded] := split(http_request.headers.authorization, " ")
	[valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "secret"})
}
"#;

const V0: &str = r#"
package envoy.authz

import input.attributes.request.http as http_request

default allow = false

allow {
	is_token_valid
	action_allowed
}

is_token_valid {
	token.valid
	now := time.now_ns() / 1000000000
	token.payload.nbf <= now
	now < token.payload.exp
}

action_allowed {
	http_request.method == "GET"
	roles := {"guest", "admin"}
	roles[token.payload.role]
	glob.match("/people*", ["/"], http_request.path)
}

action_allowed {
	http_request.method == "POST"
	token.payload.role == "admin"
	glob.match("/people", ["/"], http_request.path)
	lower(input.parsed_body.firstname) != base64url.decode(token.payload.sub)
}

token = {"valid": valid, "payload": payload} {
	[_, encoded] := split(http_request.headers.authorization, " ")
	[valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "secret"})
}
"#;

fn hs256(payload: serde_json::Value, secret: &str) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(payload.to_string());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, format!("{h}.{p}").as_bytes());
    format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(role: &str, sub: &str, valid_for: i64, secret: &str) -> String {
    let n = now() as i64;
    hs256(
        json!({"role": role, "sub": URL_SAFE_NO_PAD.encode(sub), "nbf": n - 60, "exp": n + valid_for}),
        secret,
    )
}

fn request(
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut headers = vec![("Authorization".to_string(), format!("Bearer {bearer}"))];
    if body.is_some() {
        headers.push(("Content-Type".into(), "application/json".into()));
    }
    http_input(
        &Peer {
            address: Some("10.0.0.1:5555".parse().unwrap()),
            principal: Some("spiffe://td/ns/a/sa/web".into()),
        },
        &Peer {
            address: Some("10.0.0.2:8080".parse().unwrap()),
            principal: Some("spiffe://td/ns/a/sa/people".into()),
        },
        &HttpRequest {
            method: method.into(),
            path: path.into(),
            host: "people:8080".into(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            headers,
            body: body.map(|b| b.to_string().into_bytes()),
            ..Default::default()
        },
    )
}

fn engine(src: &str, v: RegoVersion) -> PolicyEngine {
    PolicyEngine::new(
        &[("policy.rego".into(), src.into())],
        &json!({}),
        v,
        DEFAULT_DECISION_PATH,
        DEFAULT_BUDGET,
    )
    .unwrap()
}

#[test]
fn the_opa_envoy_jwt_example_decides_as_documented_in_v1_and_v0() {
    for (src, v) in [(V1, RegoVersion::V1), (V0, RegoVersion::V0)] {
        let e = engine(src, v);
        let guest = token("guest", "alice", 3600, "secret");
        let admin = token("admin", "bob", 3600, "secret");
        let cases = [
            (request("GET", "/people", &guest, None), true, "guest reads"),
            (
                request(
                    "POST",
                    "/people",
                    &guest,
                    Some(json!({"firstname": "charlie"})),
                ),
                false,
                "guest cannot create",
            ),
            (
                request(
                    "POST",
                    "/people",
                    &admin,
                    Some(json!({"firstname": "charlie"})),
                ),
                true,
                "admin creates someone else",
            ),
            (
                request("POST", "/people", &admin, Some(json!({"firstname": "Bob"}))),
                false,
                "admin cannot create themself",
            ),
            (
                request("DELETE", "/people/1", &admin, None),
                false,
                "nobody deletes",
            ),
            (
                request("GET", "/people", &token("guest", "a", -10, "secret"), None),
                false,
                "expired token",
            ),
            (
                request("GET", "/people", &token("guest", "a", 3600, "wrong"), None),
                false,
                "forged token",
            ),
            (
                request("GET", "/people", "not-a-jwt", None),
                false,
                "garbage token",
            ),
        ];
        for (input, want, what) in cases {
            let d = e.decide(&input);
            assert_eq!(d.allowed, want, "{v:?}: {what}: {d:?}");
        }
    }
}

#[test]
fn an_opa_istio_style_policy_uses_parsed_path_and_source_principal() {
    let src = r#"
package istio.authz
import rego.v1
default allow := false
allow if {
	input.parsed_path[0] == "api"
	input.attributes.request.http.method == "GET"
	input.source_principal == "spiffe://td/ns/a/sa/web"
}
allow if {
	input.parsed_query.debug == ["1"]
	input.attributes.source.principal == "spiffe://td/ns/ops/sa/admin"
}
"#;
    let e = PolicyEngine::new(
        &[("p.rego".into(), src.into())],
        &json!({}),
        RegoVersion::V1,
        "istio/authz/allow",
        DEFAULT_BUDGET,
    )
    .unwrap();
    assert!(e.decide(&request("GET", "/api/x?y=1", "t", None)).allowed);
    assert!(!e.decide(&request("POST", "/api/x", "t", None)).allowed);
    assert!(!e.decide(&request("GET", "/other", "t", None)).allowed);
}

#[test]
fn rs256_and_es256_tokens_verify_with_a_certificate() {
    // An ES256 key and a certificate for it, made with rcgen-free ring + a fixture-free SPKI PEM.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    use ring::signature::KeyPair as _;
    // SubjectPublicKeyInfo for a P-256 point: fixed prefix + the 65-byte point.
    let mut spki = hex_literal("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    spki.extend_from_slice(key.public_key().as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#);
    let p = URL_SAFE_NO_PAD.encode(json!({"sub": "x", "exp": now() + 60}).to_string());
    let sig = key.sign(&rng, format!("{h}.{p}").as_bytes()).unwrap();
    let jwt = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let src = format!(
        "package envoy.authz\nimport rego.v1\nallow if {{ [ok, _, claims] := io.jwt.decode_verify(input.t, {{\"cert\": {:?}}}); ok; claims.sub == \"x\" }}",
        pem
    );
    let e = engine(&src, RegoVersion::V1);
    assert!(e.decide(&json!({"t": jwt})).allowed);
    let tampered = jwt.replace(
        &p,
        &URL_SAFE_NO_PAD.encode(json!({"sub": "x", "exp": now() + 9999}).to_string()),
    );
    assert!(!e.decide(&json!({"t": tampered})).allowed);

    // RS256, with a key and signature made by OpenSSL (ring cannot generate RSA keys).
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("rsa.pem");
    let openssl = |args: &[&str], stdin: Option<&[u8]>| -> Vec<u8> {
        use std::io::Write;
        let mut c = std::process::Command::new("openssl")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (install it or run scripts/test.sh)");
        c.stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or_default())
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        out.stdout
    };
    openssl(&["genrsa", "-out", key.to_str().unwrap(), "2048"], None);
    let public = String::from_utf8(openssl(
        &["rsa", "-in", key.to_str().unwrap(), "-pubout"],
        None,
    ))
    .unwrap();
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
    let p = URL_SAFE_NO_PAD.encode(json!({"sub": "x", "exp": now() + 60}).to_string());
    let signing_input = format!("{h}.{p}");
    let sig = openssl(
        &["dgst", "-sha256", "-sign", key.to_str().unwrap()],
        Some(signing_input.as_bytes()),
    );
    let jwt = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig));
    let src = format!(
        "package envoy.authz\nimport rego.v1\nallow if {{ [ok, _, _] := io.jwt.decode_verify(input.t, {{\"cert\": {:?}, \"alg\": \"RS256\"}}); ok }}",
        public
    );
    let e = engine(&src, RegoVersion::V1);
    assert!(e.decide(&json!({"t": jwt})).allowed);
    let other_alg = jwt.replacen(&h, &URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#), 1);
    assert!(
        !e.decide(&json!({"t": other_alg})).allowed,
        "algorithm confusion"
    );
}

fn hex_literal(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
