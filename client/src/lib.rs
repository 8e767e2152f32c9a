//! `strait-client`: the node side's I/O on Strait's protocols (the types and codecs are in `strait-proto`).
//!
//! - [`client`]: the control plane's HTTPS API client (server pinned by the join token, or verified by the
//!   trust bundle and the control plane's SPIFFE ID), used by proxies, the CLI and partner control planes.
//! - [`node`]: a node's identity: join (one-time token or Kubernetes service-account token), renewal,
//!   workload SVIDs, and the files it keeps on disk.
//! - [`distributor`]: a proxy's session with the policy distributor (QUIC, then TLS over TCP), ACK/NACK and
//!   reconnection with jittered backoff.
//! - [`systemd`]: readiness, stopping and watchdog notifications for `Type=notify` units (both daemons).

#![forbid(unsafe_code)]

pub mod client;
pub mod distributor;
pub mod node;
pub mod systemd;
