//! The control plane's HTTP API: paths and JSON bodies. What nodes and partner control planes speak is
//! defined in [`strait_proto::api`] and re-exported here; this module adds the admin API's bodies.
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

pub use strait_proto::api::*;

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

/// This trust domain's own bundle as its endpoint serves it, and the relationships.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FederationList {
    pub trust_domain: String,
    pub sequence: u64,
    pub fingerprint: String,
    pub partners: Vec<Federation>,
    /// Connections to partners leave through this organisation's gateways only.
    #[serde(default)]
    pub egress_through_gateways: bool,
}

/// `strait federation egress on|off`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationEgress {
    pub through_gateways: bool,
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
pub struct TokenRequest {
    pub node: NodeName,
    /// Lifetime in seconds (default one hour, at most a week).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// The node joins as an ingress gateway (docs/gateway.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
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
