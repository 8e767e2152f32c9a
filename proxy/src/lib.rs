//! `strait-proxy`: the node proxy.
//!
//! - [`capture`]: the nftables table that redirects workload traffic and drops plaintext around the mesh.
//! - [`sockets`]: original destinations, source users, marked sockets; [`tproxy_udp`]: datagrams TPROXY
//!   diverted, answered from their original destination.
//! - [`certs`]: workload SVIDs (keys made here), swapped on renewal; TLS certificate resolvers.
//! - [`directory`]: routing from the mesh directory.
//! - [`dns`]: the DNS proxy: mesh names from the directory, allowed names forwarded, the rest refused.
//! - [`tunnel`]: outbound capture → HTTP/2 CONNECT over mTLS → inbound → workload; [`h2stream`]: one
//!   CONNECT stream as a byte stream.
//! - [`gateway`]: the ingress gateway partners reach this organisation's exports through.
//! - [`trust`]: open tunnels follow the trust bundle (a peer whose root was withdrawn is cut off).
//! - [`authz`]: the policy bundle (hot reload), decisions, decision log; [`l7`]: HTTP/TCP enforcement.
//! - [`admin`], [`metrics`]: `/live`, `/ready`, `/metrics`, `/config_dump`.
//! - [`mesh`]: the policy distributor subscription: verify, compile, persist, swap, ACK/NACK.
//! - [`run`]: start-up, renewal and drain.

#![deny(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod capture;
pub mod certs;
pub mod conntrack;
pub mod directory;
pub mod dns;
pub mod egress;
pub mod gateway;
pub mod h2stream;
pub mod l7;
pub mod mesh;
pub mod metrics;
pub mod run;
// The one module with `unsafe` (socket options and netlink syscalls, each with a SAFETY comment).
#[allow(unsafe_code)]
pub mod sockets;
// recvmsg for diverted UDP (its control messages), with SAFETY comments.
#[allow(unsafe_code)]
pub mod tproxy_udp;
pub mod trust;
pub mod tunnel;
