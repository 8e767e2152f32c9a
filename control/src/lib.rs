//! `strait-control`: the control plane.
//!
//! - [`server`]: the HTTPS API process (admins by token, nodes by SVID, joins by one-time token).
//! - [`store`]: crash-safe state in one redb file.
//! - [`api`]: the admin API's bodies (the node and federation protocol is `strait_proto::api`).
//! - From `strait-proto` (wire types and codecs, no I/O): [`registry`] (workload declarations, validated),
//!   [`tokens`] (join tokens and the admin credential); from `strait-client`: [`client`] (the API client),
//!   [`node`] (join, renew, SVIDs), [`systemd`].
//! - [`dist`]: the policy distributor (signed mesh versions pushed over QUIC, ACK/NACK).
//! - [`workflows`]: stored workflows and the mesh policy bundle built from them.
//! - [`kube`]: Kubernetes mode (pods and namespaces watched, proxies vouched for by TokenReview).
//! - [`init`]: `strait control init`; [`context`]: the CLI's kubectl-style contexts.

#![forbid(unsafe_code)]

// Defined in the protocol crate (types and codecs) and the client crate (the node side's I/O); re-exported
// under their old paths for the CLI and the tests.
pub use strait_client::{client, node, systemd};
pub use strait_proto::{registry, tokens};

pub mod api;
pub mod authorities;
pub mod context;
pub mod dist;
pub mod federation;
pub mod init;
pub mod kube;
pub mod server;
pub mod store;
pub mod workflows;
