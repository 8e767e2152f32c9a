//! The control plane's HTTP API as nodes and other control planes speak it: paths and JSON bodies. The
//! admin API (the CLI's) adds its own bodies in `strait_control::api`, on the same paths namespace.
//!
//! | method | path | who | body → answer |
//! |---|---|---|---|
//! | GET | `/v1/ready` | anyone | → `ready` |
//! | GET | `/v1/bundle` | anyone | → trust bundle PEM |
//! | POST | `/v1/join` | holder of a join token | [`JoinRequest`] → [`NodeCertResponse`] |
//! | POST | `/v1/join/kubernetes` | proxy pod (service-account token) | [`KubeJoinRequest`] → [`NodeCertResponse`] |
//! | POST | `/v1/node/renew` | node (mTLS, node SVID) | [`RenewRequest`] → [`NodeCertResponse`] |
//! | POST | `/v1/node/svids` | node (mTLS) | [`SvidRequest`] → [`SvidResponse`] |
//! | GET | `/v1/node/directory` | node (mTLS) | → [`Directory`] |
//! | GET | `/v1/node/distribution-keys` | node (mTLS) | → [`DistributionKeys`] |
//! | GET | `/v1/federation/bundle` | anyone (SPIFFE bundle endpoint, `https_spiffe`) | → JWKS |
//! | GET | `/v1/federation/exports` | a federated partner's control plane (mTLS, its SVID) | → [`ExportList`] |
//!
//! The policy distributor speaks its own protocol ([`crate::wire`]) on the same port: QUIC on UDP, and TLS
//! over TCP with the ALPN [`crate::wire::ALPN`] as the fallback.
//!
//! Errors are `{"error": {"code", "message", "field"?}}` ([`ErrorBody`]) with a matching HTTP status.

use serde::{Deserialize, Serialize};
use strait_ca::SpiffeId;

use crate::registry::{NodeName, Workload};

/// Port the control plane's API listens on by default (Istio's istiod uses 15012 for the same job).
pub const DEFAULT_PORT: u16 = 15012;

/// The path of the control plane's own SPIFFE ID: `spiffe://<td>/strait/control`.
pub const CONTROL_ID_PATH: &str = "/strait/control";

pub mod paths {
    pub const READY: &str = "/v1/ready";
    pub const BUNDLE: &str = "/v1/bundle";
    pub const JOIN: &str = "/v1/join";
    pub const JOIN_KUBERNETES: &str = "/v1/join/kubernetes";
    pub const NODE_RENEW: &str = "/v1/node/renew";
    pub const NODE_SVIDS: &str = "/v1/node/svids";
    pub const NODE_DIRECTORY: &str = "/v1/node/directory";
    pub const NODE_DISTRIBUTION_KEYS: &str = "/v1/node/distribution-keys";
    pub const ADMIN_CA: &str = "/v1/admin/ca";
    pub const ADMIN_CA_PREPARE: &str = "/v1/admin/ca/prepare";
    pub const ADMIN_CA_ACTIVATE: &str = "/v1/admin/ca/activate";
    pub const ADMIN_CA_WITHDRAW: &str = "/v1/admin/ca/withdraw";
    pub const ADMIN_DISTRIBUTION_KEY: &str = "/v1/admin/distribution-key";
    pub const ADMIN_DISTRIBUTION_KEY_PREPARE: &str = "/v1/admin/distribution-key/prepare";
    pub const ADMIN_DISTRIBUTION_KEY_ACTIVATE: &str = "/v1/admin/distribution-key/activate";
    pub const ADMIN_TOKENS: &str = "/v1/admin/tokens";
    pub const ADMIN_WORKLOADS: &str = "/v1/admin/workloads";
    pub const ADMIN_WORKLOADS_REMOVE: &str = "/v1/admin/workloads/remove";
    pub const ADMIN_APPLY: &str = "/v1/admin/apply";
    pub const ADMIN_STATUS: &str = "/v1/admin/status";
    pub const ADMIN_WORKFLOWS: &str = "/v1/admin/workflows";
    /// `GET /v1/admin/workflows/<name>`.
    pub const ADMIN_WORKFLOW_PREFIX: &str = "/v1/admin/workflows/";
    pub const ADMIN_WORKFLOWS_DELETE: &str = "/v1/admin/workflows/delete";
    /// The SPIFFE bundle endpoint (profile `https_spiffe`): this trust domain's bundle as a JWK set,
    /// served to anyone over TLS authenticated by the control plane's SVID.
    pub const FEDERATION_BUNDLE: &str = "/v1/federation/bundle";
    pub const ADMIN_FEDERATION: &str = "/v1/admin/federation";
    pub const ADMIN_FEDERATION_REFRESH: &str = "/v1/admin/federation/refresh";
    pub const ADMIN_FEDERATION_REMOVE: &str = "/v1/admin/federation/remove";
    pub const ADMIN_FEDERATION_EXPORT: &str = "/v1/admin/federation/export";
    /// Whether traffic to partners leaves through this organisation's own gateways (egress).
    pub const ADMIN_FEDERATION_EGRESS: &str = "/v1/admin/federation/egress";
    /// What this organisation exports to the calling partner (the partner's control plane SVID as
    /// TLS client certificate; nobody else).
    pub const FEDERATION_EXPORTS: &str = "/v1/federation/exports";
}

/// One exported workload as the partner's control plane receives it (and passes it to its proxies):
/// the identity, where it is reached, its ports and how a partner's proxy gets to it. Nothing else of
/// the exporter's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ExportedWorkloadWire", into = "ExportedWorkloadWire")]
pub struct ExportedWorkload {
    pub id: SpiffeId,
    /// Where the importer's workloads address it: the exporter's own addresses when both organisations
    /// share a network ([`Reach::Tunnel`]); none in a gateway export, where the importer's control plane
    /// gives it local virtual addresses (the exporter's private ranges are not the partner's business
    /// and may overlap its own).
    pub addresses: Vec<std::net::IpAddr>,
    pub ports: Vec<crate::registry::PortSpec>,
    pub reach: Reach,
    /// The importer's identities that a step of the exporter's workflows lets call this workload: what
    /// the importer's `strait status` shows as accepted (anything else it asks for is pending there).
    pub accepts: Vec<SpiffeId>,
}

/// How a partner's proxy reaches an exported workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reach {
    /// Directly: its node's tunnel listener (the organisations share a network).
    Tunnel(std::net::SocketAddr),
    /// Through the exporter's ingress gateways (docs/gateway.md): any of them, each proving its own
    /// identity. The inner mTLS tunnel runs end to end inside the gateway's stream.
    Gateways(Vec<GatewayRef>),
}

/// An organisation's ingress gateway as partners see it: the one address it exposes and the SPIFFE ID
/// its certificate must carry (a node identity of the exporter's trust domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRef {
    pub address: std::net::SocketAddr,
    pub id: SpiffeId,
}

/// [`ExportedWorkload`] on the wire: `tunnel` or `gateways`, exactly one (the form earlier releases
/// wrote, `tunnel` alone, still parses).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportedWorkloadWire {
    id: SpiffeId,
    #[serde(default)]
    addresses: Vec<std::net::IpAddr>,
    ports: Vec<crate::registry::PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tunnel: Option<std::net::SocketAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gateways: Vec<GatewayRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    accepts: Vec<SpiffeId>,
}

impl TryFrom<ExportedWorkloadWire> for ExportedWorkload {
    type Error = String;

    fn try_from(w: ExportedWorkloadWire) -> Result<Self, String> {
        let reach = match (w.tunnel, w.gateways.is_empty()) {
            (Some(t), true) => Reach::Tunnel(t),
            (None, false) => Reach::Gateways(w.gateways),
            (Some(_), false) => {
                return Err(format!("{}: both a tunnel and gateways", w.id));
            }
            (None, true) => return Err(format!("{}: neither a tunnel nor a gateway", w.id)),
        };
        Ok(Self {
            id: w.id,
            addresses: w.addresses,
            ports: w.ports,
            reach,
            accepts: w.accepts,
        })
    }
}

impl From<ExportedWorkload> for ExportedWorkloadWire {
    fn from(w: ExportedWorkload) -> Self {
        let (tunnel, gateways) = match w.reach {
            Reach::Tunnel(t) => (Some(t), Vec::new()),
            Reach::Gateways(g) => (None, g),
        };
        Self {
            id: w.id,
            addresses: w.addresses,
            ports: w.ports,
            tunnel,
            gateways,
            accepts: w.accepts,
        }
    }
}

/// The answer of [`paths::FEDERATION_EXPORTS`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportList {
    pub trust_domain: String,
    pub workloads: Vec<ExportedWorkload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    pub csr_pem: String,
    /// host:port where other proxies reach this node's tunnel port.
    #[serde(default)]
    pub tunnel_address: Option<String>,
    /// Every address of the node (IPv4 and IPv6): connections to them are routed to this node.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// host:port where partners reach this node as the organisation's ingress gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
}

/// Kubernetes mode: a node proxy joins with its projected service-account token (audience `strait`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeJoinRequest {
    /// The service-account token (a JWT); checked with TokenReview, never stored or logged.
    pub token: String,
    /// The node the proxy runs on (its pod's spec.nodeName).
    pub node: crate::registry::NodeName,
    pub csr_pem: String,
    #[serde(default)]
    pub tunnel_address: Option<String>,
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// A gateway's public address (host:port); only a pod of the gateway Deployment may send one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
}

/// The token is a credential: never in logs, not even at debug level.
impl std::fmt::Debug for KubeJoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeJoinRequest")
            .field("token", &"<redacted>")
            .field("node", &self.node)
            .field("tunnel_address", &self.tunnel_address)
            .field("addresses", &self.addresses)
            .field("gateway_address", &self.gateway_address)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr_pem: String,
    #[serde(default)]
    pub tunnel_address: Option<String>,
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
}

/// A federated trust domain's roots, as a node receives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederatedBundle {
    pub trust_domain: String,
    pub bundle_pem: String,
}

impl FederatedBundle {
    /// The roots as a bundle of their trust domain: the one parse of a partner's stored or received roots
    /// (control plane store, node renewal answer, node's saved copy).
    pub fn parse(&self) -> Result<strait_ca::TrustBundle, String> {
        let td = strait_ca::TrustDomain::new(&self.trust_domain)
            .map_err(|e| format!("federated trust domain {:?}: {e}", self.trust_domain))?;
        strait_ca::TrustBundle::from_pem(td, &self.bundle_pem)
            .map_err(|e| format!("the bundle of {}: {e}", self.trust_domain))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeCertResponse {
    pub id: SpiffeId,
    pub chain_pem: String,
    pub bundle_pem: String,
    /// The bundles of the federated trust domains (docs/federation.md); older control planes send none.
    #[serde(default)]
    pub federated: Vec<FederatedBundle>,
    pub trust_domain: String,
    pub not_after: u64,
    /// The policy distributor's public key (Ed25519, base64): mesh versions must be signed by it.
    #[serde(default)]
    pub distribution_key: Option<String>,
    /// The next distribution key while a rotation is prepared (docs/distributor.md).
    #[serde(default)]
    pub distribution_next_key: Option<String>,
}

/// The distribution keys a node should trust: the active one and, during a rotation, the next one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistributionKeys {
    pub active: crate::version::PublicKey,
    #[serde(default)]
    pub next: Option<crate::version::PublicKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidRequest {
    pub workload: SpiffeId,
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvidResponse {
    pub id: SpiffeId,
    pub chain_pem: String,
    pub not_after: u64,
}

/// What a proxy needs to route: every workload, and where each node's tunnel port is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Directory {
    /// The registry revision this directory was built from (monotonic).
    pub revision: u64,
    pub workloads: Vec<Workload>,
    pub nodes: Vec<DirectoryNode>,
    /// Federation (docs/federation.md): the local workloads exported to each partner (the destination
    /// proxies admit a partner's callers only to these), and the partners' workloads imported here (the
    /// source proxies route to these). Absent without federation, so such directories are unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<DirectoryExport>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<ExportedWorkload>,
    /// Egress (`strait federation egress on`): every connection to a partner leaves through one of this
    /// organisation's gateways (the nodes with a `gateway_address`), never directly; with none up, such
    /// connections are refused. Absent (false) unless turned on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub egress_through_gateways: bool,
}

/// A local workload exported to a partner trust domain, as proxies receive it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectoryExport {
    pub partner: String,
    pub workload: SpiffeId,
    /// Empty: every TCP port the workload declares.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectoryNode {
    pub name: NodeName,
    pub tunnel_address: Option<String>,
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// An ingress gateway (`strait gateway`): the address partners reach it at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Kubernetes mode's conventions, shared by the control plane and the proxies.
pub mod kube {
    /// The audience proxies' projected service-account tokens must be issued for.
    pub const AUDIENCE: &str = "strait";
    /// The ConfigMap the control plane publishes the trust bundle in (key [`BUNDLE_KEY`]).
    pub const BUNDLE_CONFIGMAP: &str = "strait-trust-bundle";
    pub const BUNDLE_KEY: &str = "bundle.pem";
}
