//! The policy distributor: signed, numbered mesh versions (directory + policy bundle) pushed to every proxy
//! over QUIC, with TLS over TCP as the fallback where UDP is blocked, acknowledged by each proxy.
//!
//! - [`version`] and [`wire`] (from `strait-proto`): the signed version, the checks a proxy makes, the
//!   messages and their framing.
//! - [`keys`]: the control plane's key ring and the two steps of a key rotation.
//! - [`hub`]: the control plane's side: making versions, sessions with proxies, rollout status, metrics.
//! - [`client`] (from `strait-client`): the proxy's side: connect (QUIC, then TCP), say what it has, apply,
//!   ACK or NACK, reconnect with jittered backoff.

pub mod hub;
pub mod keys;

pub use strait_client::distributor as client;
pub use strait_proto::wire::Transport;
pub use strait_proto::{version, wire};

/// Where a session writes frames. QUIC streams take the shared frame without copying it (a version pushed to
/// a thousand proxies stays one buffer); byte streams (the TLS/TCP fallback) copy it into their TLS records.
pub trait FrameSink: Send {
    fn send(
        &mut self,
        frame: bytes::Bytes,
    ) -> impl std::future::Future<Output = Result<(), wire::WireError>> + Send;
}

impl FrameSink for quinn::SendStream {
    async fn send(&mut self, frame: bytes::Bytes) -> Result<(), wire::WireError> {
        self.write_chunk(frame)
            .await
            .map_err(|e| wire::WireError::Io(e.into()))
    }
}

/// A byte stream as a [`FrameSink`].
pub struct Stream<W>(pub W);

impl<W: tokio::io::AsyncWrite + Unpin + Send> FrameSink for Stream<W> {
    async fn send(&mut self, frame: bytes::Bytes) -> Result<(), wire::WireError> {
        wire::write_frame(&mut self.0, &frame).await
    }
}
