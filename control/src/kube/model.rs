//! The parts of Kubernetes objects the control plane reads, as serde types. Unknown fields are ignored (the
//! API adds fields all the time); missing optional fields default.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The owner that controls the object, `(kind, name)`.
    pub fn controller(&self) -> Option<(&str, &str)> {
        self.owner_references
            .iter()
            .find(|o| o.controller == Some(true))
            .map(|o| (o.kind.as_str(), o.name.as_str()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

/// `metadata` of a list: where a watch resumes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default)]
    pub resource_version: String,
    #[serde(default, rename = "continue")]
    pub continue_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct List<T> {
    #[serde(default)]
    pub metadata: ListMeta,
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// The parts of a container that say where kubelet probes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub readiness_probe: Option<Probe>,
    #[serde(default)]
    pub liveness_probe: Option<Probe>,
    #[serde(default)]
    pub startup_probe: Option<Probe>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i64,
}

/// A probe; only the network kinds matter (an `exec` probe runs inside the pod).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub http_get: Option<ProbeTarget>,
    #[serde(default)]
    pub tcp_socket: Option<ProbeTarget>,
    #[serde(default)]
    pub grpc: Option<ProbeTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProbeTarget {
    pub port: PortRef,
    /// Set when the probe goes to another host than the pod: then it is not the pod's business.
    #[serde(default)]
    pub host: Option<String>,
}

/// Kubernetes' IntOrString for ports: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(i64),
    Name(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

impl Pod {
    /// Every address the pod has (`podIPs`, or the older `podIP`); unparsable entries are skipped.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .status
            .pod_ips
            .iter()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                self.status
                    .pod_ip
                    .as_deref()
                    .and_then(|s| s.parse::<IpAddr>().ok()),
            );
        }
        ips
    }

    /// Succeeded or Failed: its containers are gone and its IP may already belong to another pod.
    pub fn finished(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// The TCP ports kubelet probes on the pod's own address (HTTP, TCP and gRPC probes; named ports
    /// resolved against the same container's ports), sorted, without duplicates.
    pub fn probe_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .spec
            .containers
            .iter()
            .flat_map(|c| {
                [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
                    .into_iter()
                    .flatten()
                    .flat_map(|p| [&p.http_get, &p.tcp_socket, &p.grpc].into_iter().flatten())
                    .filter(|t| t.host.as_deref().is_none_or(str::is_empty))
                    .filter_map(move |t| match &t.port {
                        PortRef::Number(n) => u16::try_from(*n).ok(),
                        PortRef::Name(name) => c
                            .ports
                            .iter()
                            .find(|p| p.name.as_deref() == Some(name.as_str()))
                            .and_then(|p| u16::try_from(p.container_port).ok()),
                    })
                    .filter(|p| *p != 0)
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The controller that owns the pod, `(kind, name)`.
    pub fn controller(&self) -> Option<(&str, &str)> {
        self.metadata.controller()
    }
}

/// The fields of a ReplicaSet read: who controls it (a gateway pod's ReplicaSet must be the gateway
/// Deployment's).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReplicaSet {
    pub metadata: ObjectMeta,
}

impl ReplicaSet {
    pub fn controller(&self) -> Option<(&str, &str)> {
        self.metadata.controller()
    }
}

/// `{"type": ..., "object": ...}`: one line of a watch stream.
#[derive(Debug, Clone, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub object: serde_json::Value,
}

/// A `Status` object (errors, and the object of a watch `ERROR` event).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// `authentication.k8s.io/v1` TokenReview, request and answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenReview {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub spec: TokenReviewSpec,
    #[serde(default)]
    pub status: Option<TokenReviewStatus>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct TokenReviewSpec {
    pub token: String,
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// The token is a credential: never in logs.
impl std::fmt::Debug for TokenReviewSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewSpec")
            .field("token", &"<redacted>")
            .field("audiences", &self.audiences)
            .finish()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenReviewStatus {
    #[serde(default)]
    pub authenticated: Option<bool>,
    #[serde(default)]
    pub user: Option<UserInfo>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// The single value of an `extra` key (bound tokens carry the pod's name, uid and node there).
    pub fn extra_one(&self, key: &str) -> Option<&str> {
        match self.extra.get(key).map(Vec::as_slice) {
            Some([v]) => Some(v.as_str()),
            _ => None,
        }
    }
}

pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMap {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_pod_parses() {
        let pod: Pod = serde_json::from_str(
            r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"web-1","namespace":"shop","uid":"u1",
            "resourceVersion":"42","labels":{"app":"web"},"ownerReferences":[{"apiVersion":"apps/v1",
            "kind":"ReplicaSet","name":"web-7d","uid":"x","controller":true}]},
            "spec":{"nodeName":"node-1","serviceAccountName":"web","containers":[{"name":"c","image":"i"}]},
            "status":{"phase":"Running","podIP":"10.244.1.5","podIPs":[{"ip":"10.244.1.5"},{"ip":"fd00::5"}]}}"#,
        )
        .unwrap();
        assert_eq!(pod.ips().len(), 2);
        assert!(pod.probe_ports().is_empty());
        let probed: Pod = serde_json::from_str(
            r#"{"metadata":{"name":"p"},"spec":{"containers":[
              {"name":"a","ports":[{"name":"http","containerPort":8080},{"containerPort":9000}],
               "readinessProbe":{"httpGet":{"path":"/ready","port":"http"}},
               "livenessProbe":{"tcpSocket":{"port":9000}},
               "startupProbe":{"exec":{"command":["true"]}}},
              {"name":"b","readinessProbe":{"grpc":{"port":7000}},
               "livenessProbe":{"httpGet":{"port":"http"}}},
              {"name":"c","readinessProbe":{"httpGet":{"port":8443,"host":"10.0.0.9"}},
               "livenessProbe":{"httpGet":{"port":70000}}}]}}"#,
        )
        .unwrap();
        // Container b's "http" names no port of b; c's probes go elsewhere or to no port.
        assert_eq!(probed.probe_ports(), [7000, 8080, 9000]);
        assert_eq!(pod.controller(), Some(("ReplicaSet", "web-7d")));
        assert!(!pod.finished());
        let pending: Pod =
            serde_json::from_str(r#"{"metadata":{"name":"p"},"status":{"phase":"Pending"}}"#)
                .unwrap();
        assert!(pending.ips().is_empty());
    }
}
