//! The distribution protocol's messages and framing, the same over QUIC (one bidirectional stream) and
//! over TLS on TCP (the fallback): each message is a 4-byte big-endian length and that many bytes of JSON.
//!
//! ```text
//! proxy                                   control plane
//!   Hello {have: Some(7), hash}  ───────▶
//!                                ◀───────  Version(8)          (what is missing: the newest version)
//!   Ack {number: 8, hash}        ───────▶
//!                                ◀───────  Version(9)          (pushed when an operator changes something)
//!   Nack {number: 9, error}      ───────▶                      (proxy keeps enforcing 8)
//!                                ◀───────  Ping                (every 10 s, so dead peers are noticed)
//! ```

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::version::SignedVersion;

/// ALPN of the distribution protocol, on QUIC and on the TCP fallback (which shares the API's TLS port).
pub const ALPN: &[u8] = b"strait-dist/1";

/// Transport a proxy session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// QUIC transport settings both ends use: keep-alives well inside the idle timeout, one bidirectional stream
/// per session and no unidirectional ones.
pub fn quic_transport() -> std::sync::Arc<quinn_proto::TransportConfig> {
    let mut t = quinn_proto::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
    t.max_idle_timeout(quinn_proto::IdleTimeout::try_from(std::time::Duration::from_secs(20)).ok());
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(1u8.into());
    std::sync::Arc::new(t)
}

/// Largest message accepted: bundles are configuration; a 10 000-step workflow is about 3 MiB.
pub const MAX_MESSAGE: usize = 64 << 20;

/// How large a message of each direction may be. A proxy only ever sends a hello, ACKs and NACKs (a NACK
/// reason is a line of text), so the control plane reads at most 64 KiB from it: a proxy cannot make the
/// hub hold a version-sized buffer per connection.
pub trait Bounded {
    const MAX_BYTES: usize;
}

impl Bounded for ClientMsg {
    const MAX_BYTES: usize = 64 << 10;
}

impl Bounded for ServerMsg {
    const MAX_BYTES: usize = MAX_MESSAGE;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// First message: the version the proxy enforces now (none: it has nothing).
    Hello {
        have: Option<u64>,
        #[serde(default)]
        hash: Option<String>,
    },
    Ack {
        number: u64,
        hash: String,
    },
    Nack {
        number: u64,
        error: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMsg {
    Version {
        version: SignedVersion,
    },
    /// Nothing to send: the proxy is up to date (answers a Hello).
    UpToDate {
        number: u64,
    },
    Ping,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("peer closed the stream")]
    Closed,
}

/// Encodes a message as one frame (length + JSON), so a version pushed to many proxies is encoded once.
pub fn encode<T: Serialize>(msg: &T) -> Result<bytes::Bytes, WireError> {
    let body = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame.into())
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), WireError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), WireError> {
    write_frame(w, &encode(msg)?).await
}

/// Reads one frame. The length is checked against the message type's bound first, and the body buffer
/// grows with what actually arrives (a peer announcing a large frame and sending nothing gets no
/// allocation of that size).
pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned + Bounded>(
    r: &mut R,
) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > T::MAX_BYTES {
        return Err(WireError::TooLarge(len));
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(WireError::Closed);
    }
    serde_json::from_slice(&body).map_err(|e| WireError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write(
            &mut a,
            &ClientMsg::Nack {
                number: 3,
                error: "x".into(),
            },
        )
        .await
        .unwrap();
        let m: ClientMsg = read(&mut b).await.unwrap();
        assert!(matches!(m, ClientMsg::Nack { number: 3, .. }));

        // A length over the limit is refused before anything is allocated.
        a.write_all(&(MAX_MESSAGE as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            read::<_, ClientMsg>(&mut b).await,
            Err(WireError::TooLarge(_))
        ));

        // A proxy's message is small: a hello-sized bound, not a version-sized one.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&(ClientMsg::MAX_BYTES as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            read::<_, ClientMsg>(&mut b).await,
            Err(WireError::TooLarge(_))
        ));
        // A frame that ends early is a closed stream, not a message.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&1000u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{}").await.unwrap();
        drop(a);
        assert!(matches!(
            read::<_, ServerMsg>(&mut b).await,
            Err(WireError::Closed)
        ));

        // Garbage is refused with a reason.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{nope").await.unwrap();
        assert!(matches!(
            read::<_, ClientMsg>(&mut b).await,
            Err(WireError::Malformed(_))
        ));
        drop(a);
        assert!(matches!(
            read::<_, ClientMsg>(&mut b).await,
            Err(WireError::Closed)
        ));
    }
}
