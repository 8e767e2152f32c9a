//! Builtins that OPA-Envoy policies commonly use and regorus lacks, added as extensions:
//!
//! - `io.jwt.decode(token)` → `[header, payload, signature_hex]` (no verification);
//! - `io.jwt.decode_verify(token, constraints)` → `[valid, header, payload]`, verifying HS256 (`secret`),
//!   RS256 and ES256 (`cert`: a PEM certificate or public key), and checking `exp`/`nbf` against
//!   `time` (ns, default now), `iss` and `aud` when the constraints give them. Any failure gives
//!   `[false, {}, {}]`, as in OPA.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use regorus::Value;
use serde_json::{json, Value as Json};

fn to_value(j: Json) -> Value {
    Value::from(j)
}

fn b64(s: &str) -> anyhow::Result<Vec<u8>> {
    Ok(URL_SAFE_NO_PAD.decode(s.trim_end_matches('='))?)
}

struct Parts {
    header: Json,
    payload: Json,
    signing_input: String,
    signature: Vec<u8>,
}

fn split(token: &str) -> anyhow::Result<Parts> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        anyhow::bail!("a JWT has three dot-separated parts");
    };
    Ok(Parts {
        header: serde_json::from_slice(&b64(h)?)?,
        payload: serde_json::from_slice(&b64(p)?)?,
        signing_input: format!("{h}.{p}"),
        signature: b64(s)?,
    })
}

fn arg_str(args: &[Value], i: usize) -> anyhow::Result<String> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s.to_string()),
        _ => anyhow::bail!("argument {} must be a string", i + 1),
    }
}

/// The public key bytes ring wants, from a PEM certificate or SubjectPublicKeyInfo.
fn public_key(pem: &str) -> anyhow::Result<Vec<u8>> {
    let block = pem
        .split("-----BEGIN ")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("cert is not PEM"))?;
    let (label, rest) = block
        .split_once("-----")
        .ok_or_else(|| anyhow::anyhow!("cert is not PEM"))?;
    let body: String = rest
        .split("-----END")
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    use x509_parser::prelude::FromDer;
    let spki_bits = if label.contains("CERTIFICATE") {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)?;
        cert.public_key().subject_public_key.data.to_vec()
    } else {
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der)?;
        spki.subject_public_key.data.to_vec()
    };
    Ok(spki_bits)
}

fn verify_signature(parts: &Parts, constraints: &Json) -> anyhow::Result<bool> {
    use ring::signature;
    let alg = parts.header.get("alg").and_then(Json::as_str).unwrap_or("");
    if let Some(want) = constraints.get("alg").and_then(Json::as_str) {
        if want != alg {
            return Ok(false);
        }
    }
    let msg = parts.signing_input.as_bytes();
    Ok(match alg {
        "HS256" => {
            let secret = constraints
                .get("secret")
                .and_then(Json::as_str)
                .ok_or_else(|| anyhow::anyhow!("HS256 needs constraints.secret"))?;
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            ring::hmac::verify(&key, msg, &parts.signature).is_ok()
        }
        "RS256" | "ES256" => {
            let cert = constraints
                .get("cert")
                .and_then(Json::as_str)
                .ok_or_else(|| anyhow::anyhow!("{alg} needs constraints.cert"))?;
            let key = public_key(cert)?;
            let algo: &dyn signature::VerificationAlgorithm = if alg == "RS256" {
                &signature::RSA_PKCS1_2048_8192_SHA256
            } else {
                &signature::ECDSA_P256_SHA256_FIXED
            };
            signature::UnparsedPublicKey::new(algo, key)
                .verify(msg, &parts.signature)
                .is_ok()
        }
        _ => false,
    })
}

fn claims_ok(payload: &Json, constraints: &Json) -> bool {
    let now_ns = constraints
        .get("time")
        .and_then(Json::as_f64)
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as f64)
                .unwrap_or_default()
        });
    let now = now_ns / 1e9;
    if payload
        .get("exp")
        .and_then(Json::as_f64)
        .is_some_and(|exp| now >= exp)
    {
        return false;
    }
    if payload
        .get("nbf")
        .and_then(Json::as_f64)
        .is_some_and(|nbf| now < nbf)
    {
        return false;
    }
    if let Some(iss) = constraints.get("iss") {
        if payload.get("iss") != Some(iss) {
            return false;
        }
    }
    if let Some(aud) = constraints.get("aud").and_then(Json::as_str) {
        let ok = match payload.get("aud") {
            Some(Json::String(a)) => a == aud,
            Some(Json::Array(a)) => a.iter().any(|x| x.as_str() == Some(aud)),
            _ => false,
        };
        if !ok {
            return false;
        }
    } else if payload.get("aud").is_some() {
        // OPA: a token with an audience is only valid when the caller names one.
        return false;
    }
    true
}

pub fn register(engine: &mut regorus::Engine) -> anyhow::Result<()> {
    engine.add_extension(
        "io.jwt.decode".into(),
        1,
        Box::new(|args: Vec<Value>| -> anyhow::Result<Value> {
            let parts = split(&arg_str(&args, 0)?)?;
            let sig: String = parts.signature.iter().map(|b| format!("{b:02x}")).collect();
            Ok(to_value(json!([parts.header, parts.payload, sig])))
        }),
    )?;
    engine.add_extension(
        "io.jwt.decode_verify".into(),
        2,
        Box::new(|args: Vec<Value>| -> anyhow::Result<Value> {
            let token = arg_str(&args, 0)?;
            let constraints: Json = match args.get(1) {
                Some(v @ Value::Object(_)) => serde_json::to_value(v)?,
                _ => anyhow::bail!("argument 2 must be an object of constraints"),
            };
            let invalid = || to_value(json!([false, {}, {}]));
            let Ok(parts) = split(&token) else {
                return Ok(invalid());
            };
            match verify_signature(&parts, &constraints) {
                Ok(true) if claims_ok(&parts.payload, &constraints) => {
                    Ok(to_value(json!([true, parts.header, parts.payload])))
                }
                _ => Ok(invalid()),
            }
        }),
    )?;
    Ok(())
}
