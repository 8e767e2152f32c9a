//! The workload registry's types: what an operator declares about a workload, validated on the way in.
//!
//! A workload is a SPIFFE ID on one node, recognised there either by the Unix user its processes run as (VM
//! mode) or by its IP addresses (Kubernetes mode), serving on declared ports. The wire and file form is a
//! flat map (`uid: 1001` or `ips: [10.0.0.5]`); in code the choice is an enum, so a workload with both or
//! neither cannot exist.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use strait_ca::SpiffeId;

/// A node name: also a SPIFFE path segment (`spiffe://TD/node/<name>`), so limited to letters, digits,
/// `.`, `-`, `_`, at most 253 bytes (a DNS name's length).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeName(String);

impl NodeName {
    pub fn new(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 253 {
            return Err("a node name must be 1 to 253 characters".into());
        }
        if s == "." || s == ".." {
            return Err("a node name cannot be '.' or '..'".into());
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(format!(
                "a node name may contain only letters, digits, '.', '-' and '_' (found {c:?})"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// How the proxy treats a port's traffic (used by the authorization layer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (requests parsed and authorized one by one).
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC: HTTP/2 with prior knowledge, denials answered as gRPC statuses.
    Grpc,
    /// Opaque TCP: one decision per connection.
    Tcp,
    /// Not declared: the client's first bytes decide (an HTTP/1 request line or the HTTP/2 preface → HTTP,
    /// anything else → TCP). Client-first protocols only: see docs/proxy.md.
    #[default]
    Auto,
    /// Plaintext UDP, **outside the mesh's guarantees**: datagrams to this port from anywhere, and the
    /// workload's answers from it, pass the node's rules unencrypted and undecided (docs/security.md).
    /// `strait status` lists every such port. Nothing else about the workload changes: its TCP ports stay
    /// meshed, other UDP stays dropped.
    Udp,
}

/// A port a workload serves on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// PERMISSIVE: plaintext from other hosts is accepted on this port (for migrations). Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permissive: bool,
    /// HTTP: pass percent-encoded `/` and `\` (`%2F`, `%5C`) in paths through unchanged instead of refusing
    /// them with 400. Weakens path rules: a workload that decodes them may serve a path the policy did not
    /// see. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_escaped_slashes: bool,
    /// HTTP: forward request headers whose names contain `_` (dropped by default, so that
    /// `x_forwarded_client_cert` cannot pass for `x-forwarded-client-cert` at a workload that folds `_`
    /// into `-`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_underscore_headers: bool,
}

impl PortSpec {
    /// A plaintext UDP port (not carried by the mesh), as opposed to a TCP port the mesh carries.
    pub fn is_udp(&self) -> bool {
        self.protocol == Protocol::Udp
    }

    /// A port with the protocol's defaults (no PERMISSIVE, no weakened HTTP handling).
    pub fn new(port: u16, protocol: Protocol) -> Self {
        Self {
            port,
            protocol,
            permissive: false,
            allow_escaped_slashes: false,
            allow_underscore_headers: false,
        }
    }
}

/// How the node recognises the workload's traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// VM mode: processes running as this Unix user.
    Uid(u32),
    /// Kubernetes mode: these pod addresses (one or more, v4 and v6).
    Ips(Vec<IpAddr>),
}

impl Selector {
    /// The addresses an `Ips` selector names (none for a `Uid` one).
    pub fn ips(&self) -> &[IpAddr] {
        match self {
            Selector::Ips(ips) => ips,
            Selector::Uid(_) => &[],
        }
    }
}

/// A registered workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawWorkload", into = "RawWorkload")]
pub struct Workload {
    pub id: SpiffeId,
    pub node: NodeName,
    pub selector: Selector,
    /// Sorted by port, no duplicates. Empty only for an `Ips` workload, meaning every port (protocol
    /// detected); see [`Workload::serves`].
    pub ports: Vec<PortSpec>,
    /// Kubernetes pods: the ports kubelet probes in plaintext from the node (see the proxy's
    /// `--allow-kubelet-probes`). Sorted, no duplicates; empty for VM workloads.
    pub probe_ports: Vec<u16>,
}

impl Workload {
    /// True when mesh traffic to `port` is for this workload.
    pub fn serves(&self, port: u16) -> bool {
        self.ports.is_empty() || self.tcp_ports().any(|p| p.port == port)
    }

    /// The TCP ports the mesh carries (every declared port but plaintext UDP ones).
    pub fn tcp_ports(&self) -> impl Iterator<Item = &PortSpec> {
        self.ports.iter().filter(|p| !p.is_udp())
    }

    /// The plaintext UDP ports (outside the mesh).
    pub fn udp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().filter(|p| p.is_udp()).map(|p| p.port)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    id: SpiffeId,
    node: NodeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ips: Vec<IpAddr>,
    #[serde(default, serialize_with = "serialize_ports")]
    ports: Vec<PortSpecSer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    probe_ports: Vec<u16>,
}

/// Ports in serialised form (always the full map).
#[derive(Deserialize)]
#[serde(transparent)]
struct PortSpecSer(#[serde(deserialize_with = "deserialize_port")] PortSpec);

/// `5000` or `{port: 5000, protocol: http}` in files, with an error that says so.
fn deserialize_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PortSpec, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = PortSpec;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number (1-65535) or a map {port, protocol, permissive}")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
            let port = u16::try_from(v)
                .map_err(|_| E::custom(format!("{v} is not a port number (1-65535)")))?;
            Ok(PortSpec::new(port, Protocol::Auto))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("{v} is not a port number (1-65535)")))
                .and_then(|v| self.visit_u64(v))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<PortSpec, A::Error> {
            PortSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V)
}

fn serialize_ports<S: serde::Serializer>(ports: &[PortSpecSer], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ports.iter().map(|p| &p.0))
}

impl TryFrom<RawWorkload> for Workload {
    type Error = String;
    fn try_from(raw: RawWorkload) -> Result<Self, String> {
        let selector = match (raw.uid, raw.ip, raw.ips.is_empty()) {
            (Some(uid), None, true) => Selector::Uid(uid),
            (None, Some(ip), true) => Selector::Ips(vec![ip]),
            (None, None, false) => Selector::Ips(raw.ips),
            (None, None, true) => {
                return Err("give either `uid` (VM mode) or `ip`/`ips` (Kubernetes mode)".into())
            }
            _ => return Err("give only one of `uid`, `ip` and `ips`".into()),
        };
        let mut ports: Vec<PortSpec> = raw.ports.into_iter().map(|p| p.0).collect();
        // A pod address belongs to the workload alone, so a pod may leave `ports` empty: every port is
        // its, protocol detected. A VM workload shares the node's address and must say which ports.
        if ports.is_empty() && matches!(selector, Selector::Uid(_)) {
            return Err(
                "`ports` needs at least one port (a `uid` workload shares the node's addresses)"
                    .into(),
            );
        }
        if ports.iter().any(|p| p.port == 0) {
            return Err("port 0 is not a port".into());
        }
        // TCP and UDP port numbers are separate: 53/tcp and 53/udp may both be declared.
        ports.sort_by_key(|p| (p.port, p.is_udp()));
        if ports
            .windows(2)
            .any(|w| w[0].port == w[1].port && w[0].is_udp() == w[1].is_udp())
        {
            return Err("a port is listed twice".into());
        }
        if let Some(p) = ports.iter().find(|p| {
            p.is_udp() && (p.permissive || p.allow_escaped_slashes || p.allow_underscore_headers)
        }) {
            return Err(format!(
                "port {}/udp: permissive and the HTTP options are for TCP ports (plaintext UDP is never meshed)",
                p.port
            ));
        }
        if ports.iter().any(PortSpec::is_udp) && !matches!(selector, Selector::Uid(_)) {
            return Err(
                "plaintext UDP ports (`protocol: udp`) are for VM workloads (`uid`) for now".into(),
            );
        }
        let mut probe_ports = raw.probe_ports;
        probe_ports.sort_unstable();
        probe_ports.dedup();
        if probe_ports.contains(&0) {
            return Err("probe port 0 is not a port".into());
        }
        if !probe_ports.is_empty() && matches!(selector, Selector::Uid(_)) {
            return Err("`probe_ports` are for pods (`ip`/`ips`), not `uid` workloads".into());
        }
        Ok(Workload {
            id: raw.id,
            node: raw.node,
            selector,
            ports,
            probe_ports,
        })
    }
}

impl From<Workload> for RawWorkload {
    fn from(w: Workload) -> Self {
        let (uid, ips) = match w.selector {
            Selector::Uid(u) => (Some(u), Vec::new()),
            Selector::Ips(ips) => (None, ips),
        };
        RawWorkload {
            id: w.id,
            node: w.node,
            uid,
            ip: None,
            ips,
            ports: w.ports.into_iter().map(PortSpecSer).collect(),
            probe_ports: w.probe_ports,
        }
    }
}

impl Serialize for PortSpecSer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The document `strait apply -f` sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplyDocument {
    pub api_version: ApiVersion,
    pub kind: ApplyKind,
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ApiVersion {
    #[serde(rename = "strait.dev/v1")]
    V1,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ApplyKind {
    WorkloadList,
}

/// A document that could not be read, with the path of the offending field (`workloads[1].ports`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Parses JSON into `T`, naming the field that is wrong.
pub fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end().map_err(|e| FieldError {
        field: ".".into(),
        message: e.to_string(),
    })?;
    Ok(v)
}

/// Parses YAML into `T`, naming the field that is wrong.
pub fn from_yaml<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    let de = serde_norway::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(path_error)
}

fn path_error<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> FieldError {
    let field = e.path().to_string();
    let mut message = e.into_inner().to_string();
    // serde_norway already prefixes its messages with the path; keep it once, in `field`.
    if let Some(rest) = message.strip_prefix(&format!("{field}: ")) {
        message = rest.to_owned();
    }
    FieldError {
        field: if field.is_empty() { ".".into() } else { field },
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_shorthand_ports_parses() {
        let doc: ApplyDocument = from_yaml(
            br#"
apiVersion: strait.dev/v1
kind: WorkloadList
workloads:
  - id: spiffe://example.org/ns/a/sa/web
    node: host-a
    uid: 1001
    ports: [8080, {port: 5000, protocol: http}]
  - id: spiffe://example.org/ns/a/sa/db
    node: host-b
    ips: [10.0.0.5, "fd00::5"]
    ports: [{port: 5432, protocol: tcp, permissive: true}]
"#,
        )
        .unwrap();
        assert_eq!(doc.workloads.len(), 2);
        assert_eq!(doc.workloads[0].selector, Selector::Uid(1001));
        assert_eq!(doc.workloads[0].ports[0].port, 5000, "sorted");
        assert_eq!(doc.workloads[0].ports[1].protocol, Protocol::Auto);
        assert!(doc.workloads[1].ports[0].permissive);
        // Round trip through JSON keeps everything.
        let json = serde_json::to_vec(&doc.workloads).unwrap();
        let back: Vec<Workload> = from_json(&json).unwrap();
        assert_eq!(back, doc.workloads);
    }

    #[test]
    fn plaintext_udp_ports_are_separate_from_tcp_and_take_no_tcp_options() {
        let parse = |ports: &str, selector: &str| {
            from_yaml::<ApplyDocument>(
                format!("apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n  - id: spiffe://example.org/ns/a/sa/dns\n    node: n\n    {selector}\n    ports: {ports}\n").as_bytes(),
            )
            .map(|d| d.workloads[0].clone())
            .map_err(|e| e.to_string())
        };
        let w = parse(
            "[{port: 53, protocol: tcp}, {port: 53, protocol: udp}]",
            "uid: 1",
        )
        .unwrap();
        assert_eq!(w.udp_ports().collect::<Vec<_>>(), [53]);
        assert_eq!(w.tcp_ports().count(), 1);
        assert!(w.serves(53));
        let w = parse("[8080, {port: 5353, protocol: udp}]", "uid: 1").unwrap();
        assert!(!w.serves(5353), "a UDP port is not a mesh (TCP) port");
        let e = parse(
            "[{port: 53, protocol: udp}, {port: 53, protocol: udp}]",
            "uid: 1",
        )
        .unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = parse("[{port: 53, protocol: udp, permissive: true}]", "uid: 1").unwrap_err();
        assert!(e.contains("for TCP ports"), "{e}");
        let e = parse("[{port: 53, protocol: udp}]", "ip: 10.0.0.1").unwrap_err();
        assert!(e.contains("VM workloads"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = from_yaml::<ApplyDocument>(
            b"apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n  - id: spiffe://example.org/a\n    node: n\n    uid: 1\n    ports: [70000]\n",
        )
        .unwrap_err();
        assert!(e.field.starts_with("workloads[0]"), "{e}");
        let e = from_yaml::<ApplyDocument>(
            b"apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n  - id: spiffe://Example.org/a\n    node: n\n    uid: 1\n    ports: [1]\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "workloads[0].id", "{e}");
        assert!(e.message.contains("lower-case"), "{e}");
        let e = from_json::<Workload>(
            br#"{"id":"spiffe://t/a","node":"n","uid":1,"ips":["10.0.0.1"],"ports":[1]}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("only one of"), "{e}");
        let e = from_json::<Workload>(
            br#"{"id":"spiffe://t/a","node":"n","uid":1,"ports":[1],"colour":"red"}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("colour"), "{e}");
        let e = from_yaml::<ApplyDocument>(b"apiVersion: v2\nkind: WorkloadList\n").unwrap_err();
        assert_eq!(e.field, "apiVersion");
    }
}
