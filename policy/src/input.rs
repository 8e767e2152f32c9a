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
//! | `source_trust_domain`, `destination_trust_domain` | the trust domains of the two principals (`vfx.example`): which organisation calls which, with federation |
//! | `version` | `{"encoding": "protojson", "ext_authz": "v3"}` |
//!
//! For TCP ports (one decision per connection) only `attributes.source`, `attributes.destination`,
//! `source_principal`, the trust domains and `version` are present.

use std::net::SocketAddr;
use std::sync::LazyLock;

use regorus::value::Object;
pub use regorus::Value;
use serde_json::Map;

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

/// The document's keys, made once (a regorus string is reference-counted: cloning a key is cheap, making
/// one allocates).
struct Keys {
    attributes: Value,
    source: Value,
    destination: Value,
    request: Value,
    http: Value,
    address: Value,
    socket_address: Value,
    port_value: Value,
    principal: Value,
    id: Value,
    method: Value,
    path: Value,
    host: Value,
    scheme: Value,
    protocol: Value,
    size: Value,
    headers: Value,
    body: Value,
    parsed_path: Value,
    parsed_query: Value,
    parsed_body: Value,
    truncated_body: Value,
    source_principal: Value,
    source_trust_domain: Value,
    destination_trust_domain: Value,
    version: Value,
    authority: Value,
    method_pseudo: Value,
    path_pseudo: Value,
    version_doc: Value,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    attributes: "attributes".into(),
    source: "source".into(),
    destination: "destination".into(),
    request: "request".into(),
    http: "http".into(),
    address: "address".into(),
    socket_address: "socketAddress".into(),
    port_value: "portValue".into(),
    principal: "principal".into(),
    id: "id".into(),
    method: "method".into(),
    path: "path".into(),
    host: "host".into(),
    scheme: "scheme".into(),
    protocol: "protocol".into(),
    size: "size".into(),
    headers: "headers".into(),
    body: "body".into(),
    parsed_path: "parsed_path".into(),
    parsed_query: "parsed_query".into(),
    parsed_body: "parsed_body".into(),
    truncated_body: "truncated_body".into(),
    source_principal: "source_principal".into(),
    source_trust_domain: "source_trust_domain".into(),
    destination_trust_domain: "destination_trust_domain".into(),
    version: "version".into(),
    authority: ":authority".into(),
    method_pseudo: ":method".into(),
    path_pseudo: ":path".into(),
    version_doc: Value::from(Object::from_iter([
        (Value::from("encoding"), Value::from("protojson")),
        (Value::from("ext_authz"), Value::from("v3")),
    ])),
});

fn peer_value(p: &Peer) -> Value {
    let k = &*KEYS;
    let mut o = Object::new();
    if let Some(a) = p.address {
        let sock = Object::from_iter([
            (k.address.clone(), Value::from(a.ip().to_string())),
            (k.port_value.clone(), Value::from(u64::from(a.port()))),
        ]);
        o.insert(
            k.address.clone(),
            Value::from(Object::from_iter([(
                k.socket_address.clone(),
                Value::from(sock),
            )])),
        );
    }
    if let Some(pr) = &p.principal {
        o.insert(k.principal.clone(), Value::from(pr.as_str()));
    }
    Value::from(o)
}

/// Both ends of a connection, in the document's form, made once per connection: each request's document
/// shares them.
#[derive(Debug, Clone)]
pub struct Peers {
    pub source: Peer,
    pub destination: Peer,
    source_value: Value,
    destination_value: Value,
    source_principal: Option<Value>,
    source_trust_domain: Option<Value>,
    destination_trust_domain: Option<Value>,
}

/// The trust domain of a SPIFFE ID (`spiffe://TD/...`), if it is one.
fn trust_domain_of(principal: Option<&str>) -> Option<Value> {
    let rest = principal?.strip_prefix("spiffe://")?;
    let td = rest.split('/').next().filter(|td| !td.is_empty())?;
    Some(Value::from(td))
}

impl Peers {
    pub fn new(source: Peer, destination: Peer) -> Self {
        Self {
            source_value: peer_value(&source),
            destination_value: peer_value(&destination),
            source_principal: source.principal.as_deref().map(Value::from),
            source_trust_domain: trust_domain_of(source.principal.as_deref()),
            destination_trust_domain: trust_domain_of(destination.principal.as_deref()),
            source,
            destination,
        }
    }

    /// `attributes` with the peers and, for HTTP, the request; plus `source_principal` and `version`.
    fn document(&self, request: Option<Value>) -> Object {
        let k = &*KEYS;
        let mut attributes = Object::from_iter([
            (k.source.clone(), self.source_value.clone()),
            (k.destination.clone(), self.destination_value.clone()),
        ]);
        if let Some(r) = request {
            attributes.insert(k.request.clone(), r);
        }
        let mut doc = Object::from_iter([
            (k.attributes.clone(), Value::from(attributes)),
            (k.version.clone(), k.version_doc.clone()),
        ]);
        if let Some(p) = &self.source_principal {
            doc.insert(k.source_principal.clone(), p.clone());
        }
        if let Some(td) = &self.source_trust_domain {
            doc.insert(k.source_trust_domain.clone(), td.clone());
        }
        if let Some(td) = &self.destination_trust_domain {
            doc.insert(k.destination_trust_domain.clone(), td.clone());
        }
        doc
    }
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
fn parse_query(q: &str) -> Value {
    let mut m = Object::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = Value::from(percent_decode(k, true));
        let value = Value::from(percent_decode(v, true));
        match m.get_mut(&key) {
            Some(list) => {
                if let Ok(a) = list.as_array_mut() {
                    a.push(value);
                }
            }
            None => {
                m.insert(key, Value::from(vec![value]));
            }
        }
    }
    Value::from(m)
}

impl HttpRequest {
    fn content_type(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str())
    }
}

/// The input document for an HTTP request, as the engine takes it.
pub fn http_input_value(peers: &Peers, req: &HttpRequest) -> Value {
    let k = &*KEYS;
    let mut headers = Object::new();
    for (name, v) in &req.headers {
        let key = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Value::from(name.to_ascii_lowercase())
        } else {
            Value::from(name.as_str())
        };
        match headers.get_mut(&key) {
            Some(Value::String(existing)) => {
                *existing = format!("{existing},{v}").into();
            }
            _ => {
                headers.insert(key, Value::from(v.as_str()));
            }
        }
    }
    headers.insert(k.authority.clone(), Value::from(req.host.as_str()));
    headers.insert(k.method_pseudo.clone(), Value::from(req.method.as_str()));
    let path = Value::from(req.path.as_str());
    headers.insert(k.path_pseudo.clone(), path.clone());

    let mut http = Object::new();
    for (key, v) in [
        (&k.id, &req.id),
        (&k.method, &req.method),
        (&k.host, &req.host),
        (&k.scheme, &req.scheme),
        (&k.protocol, &req.protocol),
    ] {
        if !v.is_empty() {
            http.insert(key.clone(), Value::from(v.as_str()));
        }
    }
    if !req.path.is_empty() {
        http.insert(k.path.clone(), path);
    }
    if let Some(size) = req.size {
        // protojson renders int64 as a string.
        http.insert(k.size.clone(), Value::from(size.to_string()));
    }
    http.insert(k.headers.clone(), Value::from(headers));

    let (path_only, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let parsed_path: Vec<Value> = path_only
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| Value::from(percent_decode(s, false)))
        .collect();

    let mut parsed_body = None;
    if let Some(body) = &req.body {
        let ct = req.content_type().unwrap_or("");
        parsed_body = if req.body_truncated {
            None
        } else if ct.starts_with("application/json") {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .map(Value::from)
        } else if ct.starts_with("application/x-www-form-urlencoded") {
            Some(parse_query(&String::from_utf8_lossy(body)))
        } else {
            None
        };
        http.insert(
            k.body.clone(),
            Value::from(String::from_utf8_lossy(body).into_owned()),
        );
    }
    let request = Object::from_iter([(k.http.clone(), Value::from(http))]);
    let mut doc = peers.document(Some(Value::from(request)));
    doc.insert(k.parsed_path.clone(), Value::from(parsed_path));
    doc.insert(k.parsed_query.clone(), parse_query(query));
    if req.body.is_some() {
        if let Some(p) = parsed_body {
            doc.insert(k.parsed_body.clone(), p);
        }
        doc.insert(k.truncated_body.clone(), Value::from(req.body_truncated));
    }
    Value::from(doc)
}

/// The input document for a TCP connection (one decision per connection), as the engine takes it.
pub fn tcp_input_value(peers: &Peers) -> Value {
    Value::from(peers.document(None))
}

fn to_json(v: Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Object(Map::new()))
}

/// The input document for an HTTP request, as JSON (`policy eval`, tests).
pub fn http_input(source: &Peer, destination: &Peer, req: &HttpRequest) -> serde_json::Value {
    to_json(http_input_value(
        &Peers::new(source.clone(), destination.clone()),
        req,
    ))
}

/// The input document for a TCP connection, as JSON.
pub fn tcp_input(source: &Peer, destination: &Peer) -> serde_json::Value {
    to_json(tcp_input_value(&Peers::new(
        source.clone(),
        destination.clone(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(doc["source_trust_domain"], "td");
        assert_eq!(
            doc["attributes"]["source"]["address"]["socketAddress"]["portValue"],
            4444
        );
    }

    #[test]
    fn tcp_documents_have_only_the_peers() {
        let src = Peer {
            address: None,
            principal: Some("spiffe://td/a".into()),
        };
        let doc = tcp_input(&src, &Peer::default());
        assert_eq!(
            doc,
            json!({"attributes": {"source": {"principal": "spiffe://td/a"}, "destination": {}},
                   "source_principal": "spiffe://td/a",
                   "source_trust_domain": "td",
                   "version": {"encoding": "protojson", "ext_authz": "v3"}})
        );
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2Fb%zz%4", false), "a/b%zz%4");
    }
}
