//! The input document, in the shape OPA-Envoy builds from Envoy's ext_authz `CheckRequest` (protojson:
//! lowerCamelCase keys, empty fields absent), so that a policy written for OPA-Envoy or OPA-Istio runs
//! unmodified:
//!
//! | field | meaning |
//! |---|---|
//! | `attributes.source.address.socketAddress.{address,portValue}` | the client's address |
//! | `attributes.source.principal` | the verified SPIFFE ID of the peer (from its certificate) |
//! | `attributes.destination.address…`, `.principal` | the workload being called |
//! | `attributes.request.http.id` | a request id (also in the decision log) |
//! | `attributes.request.http.{method,path,host,scheme,protocol}` | `path` includes the query string |
//! | `attributes.request.http.size` | body size when known (absent otherwise) |
//! | `attributes.request.http.headers` | lower-case names; repeated headers joined with `,`; plus `:authority`, `:method`, `:path` |
//! | `parsed_path` | path segments, percent-decoded, without the query |
//! | `parsed_query` | query parameters, each an array of values |
//! | `parsed_body` | JSON or form body (bounded); `truncated_body: true` when cut |
//! | `source_principal` | same as `attributes.source.principal` (OPA-Istio convenience) |
//! | `version` | `{"encoding": "protojson", "ext_authz": "v3"}` |
//!
//! For TCP ports (one decision per connection) only `attributes.source`, `attributes.destination`,
//! `source_principal` and `version` are present.

use std::net::SocketAddr;

use serde_json::{json, Map, Value};

/// One side of a connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub address: Option<SocketAddr>,
    pub principal: Option<String>,
}

/// The HTTP request being authorized.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub id: String,
    pub method: String,
    /// Path with query, as on the request line.
    pub path: String,
    pub host: String,
    pub scheme: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    /// Body size in bytes when known.
    pub size: Option<u64>,
    /// Header names as received (any case), in order.
    pub headers: Vec<(String, String)>,
    /// The body, when it was buffered for policy (bounded by the caller).
    pub body: Option<Vec<u8>>,
    /// True when `body` holds only the first bytes of a longer body.
    pub body_truncated: bool,
}

fn peer_json(p: &Peer) -> Value {
    let mut o = Map::new();
    if let Some(a) = p.address {
        o.insert(
            "address".into(),
            json!({"socketAddress": {"address": a.ip().to_string(), "portValue": a.port()}}),
        );
    }
    if let Some(pr) = &p.principal {
        o.insert("principal".into(), Value::String(pr.clone()));
    }
    Value::Object(o)
}

/// Percent-decodes `s` (invalid escapes are kept literally, as OPA-Envoy does).
fn percent_decode(s: &str, plus_as_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=1&a=2&b` → `{"a": ["1","2"], "b": [""]}`.
fn parse_query(q: &str) -> Map<String, Value> {
    let mut m: Map<String, Value> = Map::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let entry = m
            .entry(percent_decode(k, true))
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = entry {
            a.push(Value::String(percent_decode(v, true)));
        }
    }
    m
}

impl HttpRequest {
    fn content_type(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str())
    }
}

/// Builds the input document for an HTTP request.
pub fn http_input(source: &Peer, destination: &Peer, req: &HttpRequest) -> Value {
    let mut headers = Map::new();
    for (k, v) in &req.headers {
        let k = k.to_ascii_lowercase();
        match headers.get_mut(&k) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(v);
            }
            _ => {
                headers.insert(k, Value::String(v.clone()));
            }
        }
    }
    headers.insert(":authority".into(), Value::String(req.host.clone()));
    headers.insert(":method".into(), Value::String(req.method.clone()));
    headers.insert(":path".into(), Value::String(req.path.clone()));

    let mut http = Map::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            http.insert(k.into(), Value::String(v.to_owned()));
        }
    };
    put("id", &req.id);
    put("method", &req.method);
    put("path", &req.path);
    put("host", &req.host);
    put("scheme", &req.scheme);
    put("protocol", &req.protocol);
    if let Some(size) = req.size {
        // protojson renders int64 as a string.
        http.insert("size".into(), Value::String(size.to_string()));
    }
    http.insert("headers".into(), Value::Object(headers));

    let (path_only, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let parsed_path: Vec<Value> = path_only
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(percent_decode(s, false)))
        .collect();

    let mut doc = json!({
        "attributes": {
            "source": peer_json(source),
            "destination": peer_json(destination),
            "request": {"http": Value::Object(http)},
        },
        "parsed_path": parsed_path,
        "parsed_query": Value::Object(parse_query(query)),
        "version": {"encoding": "protojson", "ext_authz": "v3"},
    });
    if let Some(p) = &source.principal {
        doc["source_principal"] = Value::String(p.clone());
    }
    if let Some(body) = &req.body {
        let ct = req.content_type().unwrap_or("");
        let parsed = if req.body_truncated {
            None
        } else if ct.starts_with("application/json") {
            serde_json::from_slice::<Value>(body).ok()
        } else if ct.starts_with("application/x-www-form-urlencoded") {
            Some(Value::Object(parse_query(&String::from_utf8_lossy(body))))
        } else {
            None
        };
        if let Some(p) = parsed {
            doc["parsed_body"] = p;
        }
        doc["truncated_body"] = Value::Bool(req.body_truncated);
        doc["attributes"]["request"]["http"]["body"] =
            Value::String(String::from_utf8_lossy(body).into_owned());
    }
    doc
}

/// Builds the input document for a TCP connection (one decision per connection).
pub fn tcp_input(source: &Peer, destination: &Peer) -> Value {
    let mut doc = json!({
        "attributes": {"source": peer_json(source), "destination": peer_json(destination)},
        "version": {"encoding": "protojson", "ext_authz": "v3"},
    });
    if let Some(p) = &source.principal {
        doc["source_principal"] = Value::String(p.clone());
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_opa_envoy_shape() {
        let src = Peer {
            address: Some("10.0.0.1:4444".parse().unwrap()),
            principal: Some("spiffe://td/ns/a/sa/x".into()),
        };
        let dst = Peer {
            address: Some("10.0.0.2:5000".parse().unwrap()),
            principal: Some("spiffe://td/ns/b/sa/y".into()),
        };
        let req = HttpRequest {
            id: "r1".into(),
            method: "POST".into(),
            path: "/api/v%201/items?a=1&a=2&b=x+y".into(),
            host: "svc:5000".into(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            size: Some(9),
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("X-Rep".into(), "1".into()),
                ("x-rep".into(), "2".into()),
            ],
            body: Some(br#"{"k":"v"}"#.to_vec()),
            body_truncated: false,
        };
        let doc = http_input(&src, &dst, &req);
        let http = &doc["attributes"]["request"]["http"];
        assert_eq!(http["headers"]["x-rep"], "1,2");
        assert_eq!(http["headers"][":method"], "POST");
        assert_eq!(http["headers"][":path"], "/api/v%201/items?a=1&a=2&b=x+y");
        assert_eq!(http["size"], "9");
        assert_eq!(doc["parsed_path"], json!(["api", "v 1", "items"]));
        assert_eq!(doc["parsed_query"], json!({"a": ["1", "2"], "b": ["x y"]}));
        assert_eq!(doc["parsed_body"], json!({"k": "v"}));
        assert_eq!(doc["source_principal"], "spiffe://td/ns/a/sa/x");
        assert_eq!(
            doc["attributes"]["source"]["address"]["socketAddress"]["portValue"],
            4444
        );
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2Fb%zz%4", false), "a/b%zz%4");
    }
}
