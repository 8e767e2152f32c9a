//! The control plane's HTTP API: paths and JSON bodies, shared by the server, the CLI and the proxy.
//!
//! | method | path | who | body → answer |
//! |---|---|---|---|
//! | GET | `/v1/ready` | anyone | → `ready` |
//! | GET | `/v1/bundle` | anyone | → trust bundle PEM |
//! | POST | `/v1/join` | holder of a join token | [`JoinRequest`] → [`NodeCertResponse`] |
//! | POST | `/v1/node/renew` | node (mTLS, node SVID) | [`RenewRequest`] → [`NodeCertResponse`] |
//! | POST | `/v1/node/svids` | node (mTLS) | [`SvidRequest`] → [`SvidResponse`] |
//! | GET | `/v1/node/directory` | node (mTLS) | → [`Directory`] |
//! | GET | `/v1/node/distribution-keys` | node (mTLS) | → [`DistributionKeys`] |
//! | POST | `/v1/admin/tokens` | admin (bearer) | [`TokenRequest`] → [`TokenResponse`] |
//! | GET | `/v1/admin/workloads` | admin | → `[Workload]` |
//! | POST | `/v1/admin/workloads` | admin | `Workload` → [`ChangeResponse`] |
//! | POST | `/v1/admin/workloads/remove` | admin | [`RemoveRequest`] → [`RemoveResponse`] |
//! | POST | `/v1/admin/apply` | admin | YAML or JSON [`crate::registry::ApplyDocument`] → [`crate::store::ApplyReport`] |
//! | GET | `/v1/admin/status` | admin | → [`Status`] |
//! | GET | `/v1/admin/workflows` | admin | → `[WorkflowSummary]` |
//! | GET | `/v1/admin/ca` | admin | → [`CaStatus`] |
//! | POST | `/v1/admin/ca/prepare`, `…/activate`, `…/withdraw` | admin | [`CaStepRequest`] → [`CaStatus`] |
//! | GET | `/v1/admin/distribution-key` | admin | → [`crate::dist::keys::KeyStatus`] |
//! | POST | `/v1/admin/distribution-key/prepare` | admin | → [`crate::dist::keys::KeyStatus`] |
//! | POST | `/v1/admin/distribution-key/activate` | admin | [`KeyActivateRequest`] → [`crate::dist::keys::KeyStatus`] |
//! | POST | `/v1/admin/workflows` | admin | [`WorkflowApplyRequest`] → [`WorkflowApplyResponse`] |
//! | GET | `/v1/admin/workflows/<name>` | admin | → [`crate::store::WorkflowRecord`] |
//! | POST | `/v1/admin/workflows/delete` | admin | [`WorkflowDeleteRequest`] → [`WorkflowDeleteResponse`] |
//!
//! The policy distributor speaks its own protocol ([`crate::dist::wire`]) on the same port: QUIC on UDP, and
//! TLS over TCP with the ALPN `strait-dist/1` as the fallback.
//!
//! Errors are `{"error": {"code", "message", "field"?}}` with a matching HTTP status.

use serde::{Deserialize, Serialize};
use strait_ca::SpiffeId;

use crate::registry::{NodeName, Workload};
use crate::store::{Change, NodeRecord};

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
    /// What this organisation exports to the calling partner (the partner's control plane SVID as
    /// TLS client certificate; nobody else).
    pub const FEDERATION_EXPORTS: &str = "/v1/federation/exports";
}

/// `strait federation add`: a relationship with another trust domain's bundle endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationAdd {
    pub trust_domain: String,
    /// `HOST:PORT` of the partner's control plane.
    pub endpoint: String,
    /// The SPIFFE ID the endpoint must present (`spiffe://<td>/strait/control` for a Strait partner).
    pub endpoint_id: String,
    /// The partner's bundle obtained out of band (SPIFFE JSON or PEM): it authenticates the first fetch.
    pub bootstrap_bundle: String,
    /// The bootstrap bundle's fingerprint as the partner read it to the operator; required.
    pub fingerprint: Option<String>,
}

/// `strait federation refresh|remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationTarget {
    /// One trust domain; `None` (refresh only): every relationship.
    #[serde(default)]
    pub trust_domain: Option<String>,
}

/// One root of a federated bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederatedRoot {
    pub subject: String,
    /// Unix seconds.
    pub not_after: u64,
    /// SHA-256 of the certificate (hex).
    pub sha256: String,
}

/// A federation relationship as `strait federation list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Federation {
    pub trust_domain: String,
    pub endpoint: String,
    pub endpoint_id: String,
    /// The bundle in force (last good fetch): its `spiffe_sequence`, fingerprint and roots.
    pub sequence: u64,
    pub fingerprint: String,
    pub roots: Vec<FederatedRoot>,
    /// The partner's refresh hint in seconds (what the next fetch waits for; at least 60).
    pub refresh_hint_secs: u64,
    /// Unix seconds of the last good fetch, and of the last attempt.
    pub fetched_at: u64,
    pub attempted_at: u64,
    /// Why the last attempt failed, if it did (the bundle in force is then the last good one).
    pub last_error: Option<String>,
    /// What this organisation exports to the partner.
    #[serde(default)]
    pub exports: Vec<ExportRule>,
    /// What the partner exports to this organisation (its last good answer), and why the last fetch of
    /// it failed, if it did.
    #[serde(default)]
    pub imports: Vec<ExportedWorkload>,
    #[serde(default)]
    pub imports_error: Option<String>,
}

/// One workload this organisation exports to a partner: its identity and which of its TCP ports (empty:
/// every TCP port it declares).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportRule {
    pub workload: SpiffeId,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// `strait federation export|unexport`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationExport {
    pub trust_domain: String,
    pub workload: String,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Withdraw the export instead.
    #[serde(default)]
    pub remove: bool,
}

/// One exported workload as the partner's control plane receives it (and passes it to its proxies):
/// the identity, where it is reached, its ports and its node's tunnel listener. Nothing else of the
/// exporter's registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportedWorkload {
    pub id: SpiffeId,
    pub addresses: Vec<std::net::IpAddr>,
    pub ports: Vec<crate::registry::PortSpec>,
    pub tunnel: std::net::SocketAddr,
    /// The importer's identities that a step of the exporter's workflows lets call this workload: what
    /// the importer's `strait status` shows as accepted (anything else it asks for is pending there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepts: Vec<SpiffeId>,
}

/// The answer of [`paths::FEDERATION_EXPORTS`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportList {
    pub trust_domain: String,
    pub workloads: Vec<ExportedWorkload>,
}

/// This trust domain's own bundle as its endpoint serves it, and the relationships.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederationList {
    pub trust_domain: String,
    pub sequence: u64,
    pub fingerprint: String,
    pub partners: Vec<Federation>,
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
}

/// The token is a credential: never in logs, not even at debug level.
impl std::fmt::Debug for KubeJoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeJoinRequest")
            .field("token", &"<redacted>")
            .field("node", &self.node)
            .field("tunnel_address", &self.tunnel_address)
            .field("addresses", &self.addresses)
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
    pub active: crate::dist::version::PublicKey,
    #[serde(default)]
    pub next: Option<crate::dist::version::PublicKey>,
}

/// A step of the CA root rotation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaStepRequest {
    /// `activate`: even though some nodes have not renewed since `prepare`; `withdraw`: even though SVIDs
    /// signed by the old root may still be valid.
    #[serde(default)]
    pub force: bool,
    /// `prepare`: lifetime of the new root in seconds (default 10 years).
    #[serde(default)]
    pub validity_secs: Option<u64>,
}

/// Where a CA root rotation stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaStatus {
    pub authorities: Vec<crate::authorities::AuthorityStatus>,
    /// Unix seconds of the last step (0: no rotation under way).
    pub last_step_at: u64,
    /// Registered nodes that have not renewed their node certificate since the last step.
    pub nodes_behind: Vec<String>,
    pub bundle_fingerprint: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyActivateRequest {
    /// Activate even though some registered nodes have not applied the announcement.
    #[serde(default)]
    pub force: bool,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub node: NodeName,
    /// Lifetime in seconds (default one hour, at most a week).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub node: NodeName,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeResponse {
    pub change: Change,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    pub id: SpiffeId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub removed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Seconds since the node last called the control plane (since this process started); `None` when it
    /// has not called since.
    pub last_seen_secs_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub trust_domain: String,
    pub revision: u64,
    pub ca_not_after: u64,
    pub nodes: Vec<NodeStatus>,
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub workflows: Vec<WorkflowSummary>,
    #[serde(default)]
    pub distribution: crate::dist::hub::DistributionStatus,
    /// The CA's authorities and any root rotation under way.
    #[serde(default)]
    pub ca: CaStatus,
    /// Each federated partner: its bundle, what is exported and imported, and the cross-organisation
    /// steps of this organisation's workflows with where each stands.
    #[serde(default)]
    pub federation: Vec<PartnerStatus>,
}

/// One federated partner in `strait status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartnerStatus {
    pub trust_domain: String,
    pub sequence: u64,
    /// Unix seconds of the last good bundle fetch, and why the last attempt failed.
    pub fetched_at: u64,
    pub last_error: Option<String>,
    pub exports: Vec<ExportRule>,
    pub imports: Vec<SpiffeId>,
    pub imports_at: u64,
    pub imports_error: Option<String>,
    pub steps: Vec<CrossStep>,
}

/// A step of one of this organisation's workflows with one end at a partner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CrossStep {
    pub workflow: String,
    pub from: SpiffeId,
    pub to: SpiffeId,
    pub state: CrossStepState,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CrossStepState {
    /// Outgoing: the partner exports the destination and its workflows have the step too.
    Accepted,
    /// Outgoing: the partner exports the destination, but none of its workflows has the step (yet):
    /// refused at the partner's proxy.
    Pending,
    /// Outgoing: the partner does not export the destination to us: refused at our proxy.
    NotExported,
    /// Incoming: we export the destination to the partner (the partner's own workflow decides its side).
    Exported,
    /// Incoming: we do not export the destination to the partner: refused at our proxy.
    NotExportedHere,
}

impl CrossStepState {
    pub fn describe(self) -> &'static str {
        match self {
            CrossStepState::Accepted => "accepted by the partner",
            CrossStepState::Pending => "pending: the partner's workflows lack this step",
            CrossStepState::NotExported => "refused: the partner does not export the destination",
            CrossStepState::Exported => "exported here (the partner's workflow decides its side)",
            CrossStepState::NotExportedHere => {
                "refused here: the destination is not exported to them"
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowApplyRequest {
    /// The workflow YAML, verbatim.
    pub yaml: String,
    /// Custom Rego modules (package `strait.custom.<name>`) that every request must also satisfy.
    #[serde(default)]
    pub modules: Vec<crate::store::CustomModule>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowApplyResponse {
    pub name: String,
    pub change: Change,
    /// The mesh version that carries it (None when nothing changed).
    pub version: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowSummary {
    pub name: String,
    pub applied_at: u64,
    pub modules: usize,
    pub yaml_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDeleteRequest {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowDeleteResponse {
    pub deleted: bool,
    pub version: Option<u64>,
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
