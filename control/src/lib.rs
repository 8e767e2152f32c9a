//! `strait-control`: the control plane.
//!
//! - [`server`]: the HTTPS API process (admins by token, nodes by SVID, joins by one-time token).
//! - [`store`]: crash-safe state in one redb file.
//! - [`registry`]: workload declarations, validated, with field-path errors.
//! - [`tokens`]: join tokens (hashed at rest, CA-pinned) and the admin credential.
//! - [`api`]: paths and bodies; [`client`]: the API client; [`node`]: the node side (join, renew, SVIDs).
//! - [`dist`]: the policy distributor (signed mesh versions pushed over QUIC, ACK/NACK).
//! - [`workflows`]: stored workflows and the mesh policy bundle built from them.
//! - [`kube`]: Kubernetes mode (pods and namespaces watched, proxies vouched for by TokenReview).
//! - [`init`]: `strait control init`; [`context`]: the CLI's kubectl-style contexts.

#![forbid(unsafe_code)]

pub mod api;
pub mod authorities;
pub mod client;
pub mod context;
pub mod dist;
pub mod federation;
pub mod init;
pub mod kube;
pub mod node;
pub mod registry;
pub mod server;
pub mod store;
pub mod systemd;
pub mod tokens;
pub mod workflows;
