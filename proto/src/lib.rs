//! `strait-proto`: what proxies, control planes and the CLI say to each other, in one place, without network
//! I/O (the way quinn-proto holds QUIC without sockets). The proxy links this crate and `strait-client`,
//! not the control plane.
//!
//! | protocol | version | module |
//! |---|---|---|
//! | the control plane's HTTPS API (joins, node renewals and SVIDs, the directory, federation) | path prefix `/v1/` | [`api`] |
//! | the registry's declarations (workloads, nodes, ports), as stored and as sent in directories | with the API | [`registry`] |
//! | join tokens and the admin credential | prefixes `stj1.` and `sta1.` | [`tokens`] |
//! | signed mesh versions (directory + policy bundle, Ed25519) | [`version::FORMAT`] | [`version`] |
//! | the distributor's session (QUIC, or TLS over TCP) | ALPN [`wire::ALPN`] | [`wire`] |
//!
//! A change that an older peer cannot read gets a new version here, and both ends keep accepting the
//! previous one for a release.

#![forbid(unsafe_code)]

pub mod api;
pub mod registry;
pub mod tokens;
pub mod version;
pub mod wire;
