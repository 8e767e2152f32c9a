//! The policy distributor: signed, numbered mesh versions (directory + policy bundle) pushed to every proxy
//! over QUIC, with TLS over TCP as the fallback where UDP is blocked, acknowledged by each proxy.
//!
//! - [`version`]: the signed version, the distribution key, and the checks a proxy makes (no I/O).
//! - [`keys`]: the control plane's key ring and the two steps of a key rotation.
//! - [`wire`]: messages and framing.
//! - [`hub`]: the control plane's side: making versions, sessions with proxies, rollout status, metrics.
//! - [`client`]: the proxy's side: connect (QUIC, then TCP), say what it has, apply, ACK or NACK, reconnect
//!   with jittered backoff.

pub mod client;
pub mod hub;
pub mod keys;
pub mod version;
pub mod wire;

/// Transport a proxy session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Quic,
    /// TLS over TCP, used when QUIC (UDP) does not get through.
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}
