//! The proxy's side of the distributor: keep one session with the control plane, on QUIC when UDP gets
//! through and on TLS over TCP otherwise, apply what arrives, answer ACK or NACK, and reconnect with
//! jittered exponential backoff (so a control plane restart does not bring every proxy back at once).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use strait_proto::version::SignedVersion;
use strait_proto::wire::{self, ClientMsg, ServerMsg, Transport, ALPN};

/// How long a QUIC handshake may take before the TCP fallback is tried (UDP silently dropped looks like
/// this: no answer at all).
pub const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Three missed pings: the control plane is gone.
const READ_TIMEOUT: Duration = Duration::from_secs(35);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(15);

/// The link's state, for `/ready`, `/config_dump` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Connected {
        transport: Transport,
        /// True when QUIC failed and TCP is used instead.
        fallback: bool,
    },
    Down {
        error: String,
    },
}

/// What a subscriber does with versions. Implemented by the proxy (verify, compile, persist, swap) and by
/// the scale harness (verify only).
pub trait Applier: Send + Sync + 'static {
    /// The version enforced now (number and content hash).
    fn current(&self) -> Option<(u64, String)>;
    /// Applies a version: `Ok` with its number and hash (→ ACK), or `Err` with its number (0 when it could
    /// not be read) and the reason (→ NACK).
    fn apply(
        &self,
        v: SignedVersion,
    ) -> impl Future<Output = Result<(u64, String), (u64, String)>> + Send;
    fn link(&self, link: Link);
}

/// Where and how to reach the control plane.
pub struct Target {
    pub addr: SocketAddr,
    /// Builds the TLS client configuration for each attempt (the node certificate renews in between).
    pub tls: Box<dyn Fn() -> anyhow::Result<rustls::ClientConfig> + Send + Sync>,
    /// The QUIC endpoint to connect from (shared by many subscribers in the scale harness).
    pub endpoint: quinn::Endpoint,
    /// Skip QUIC (tests, or operators who know UDP is blocked).
    pub tcp_only: bool,
}

fn with_alpn(mut c: rustls::ClientConfig) -> rustls::ClientConfig {
    c.alpn_protocols = vec![ALPN.to_vec()];
    c
}

async fn connect_quic(
    target: &Target,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let tls = with_alpn((target.tls)()?);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(wire::quic_transport());
    let connecting = target
        .endpoint
        .connect_with(cfg, target.addr, "strait-control")?;
    let conn = tokio::time::timeout(QUIC_CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            anyhow::anyhow!("no QUIC answer within {QUIC_CONNECT_TIMEOUT:?} (UDP blocked?)")
        })??;
    let (send, recv) = conn.open_bi().await?;
    Ok((conn, send, recv))
}

async fn connect_tcp(
    target: &Target,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = with_alpn((target.tls)()?);
    let tcp = tokio::time::timeout(
        TCP_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(target.addr),
    )
    .await
    .map_err(|_| anyhow::anyhow!("TCP connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("strait-control")?;
    let stream = tokio::time::timeout(
        TCP_CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))??;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
        anyhow::bail!("the control plane does not speak the distribution protocol over TCP");
    }
    Ok(stream)
}

/// One session: hello, then apply and answer until the stream ends.
async fn session<A: Applier, R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    applier: &A,
    mut r: R,
    mut w: W,
) -> anyhow::Result<()> {
    let current = applier.current();
    wire::write(
        &mut w,
        &ClientMsg::Hello {
            have: current.as_ref().map(|c| c.0),
            hash: current.map(|c| c.1),
        },
    )
    .await?;
    loop {
        let msg = tokio::time::timeout(READ_TIMEOUT, wire::read::<_, ServerMsg>(&mut r))
            .await
            .map_err(|_| {
                anyhow::anyhow!("nothing from the control plane for {READ_TIMEOUT:?}")
            })??;
        match msg {
            ServerMsg::Version { version } => {
                let answer = match applier.apply(version).await {
                    Ok((number, hash)) => ClientMsg::Ack { number, hash },
                    Err((number, error)) => ClientMsg::Nack { number, error },
                };
                wire::write(&mut w, &answer).await?;
            }
            ServerMsg::UpToDate { number } => debug!(version = number, "up to date"),
            ServerMsg::Ping => {}
        }
    }
}

/// "Full jitter" backoff: a uniformly random wait in [0, min(cap, base·2^attempt)].
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(fastrand::f64())
}

/// Runs forever: connect, run a session, and on any end reconnect after a jittered backoff.
pub async fn run<A: Applier>(target: Target, applier: Arc<A>) {
    let mut attempt: u32 = 0;
    loop {
        applier.link(Link::Connecting);
        let started = Instant::now();
        let mut quic_error = None;
        let outcome: anyhow::Result<()> = async {
            if !target.tcp_only {
                match connect_quic(&target).await {
                    Ok((conn, send, recv)) => {
                        info!(control = %target.addr, "policy distributor connected over QUIC");
                        applier.link(Link::Connected {
                            transport: Transport::Quic,
                            fallback: false,
                        });
                        let r = session(&*applier, recv, send).await;
                        conn.close(0u8.into(), b"bye");
                        return r;
                    }
                    Err(e) => quic_error = Some(format!("{e:#}")),
                }
            }
            let stream = connect_tcp(&target).await?;
            match &quic_error {
                Some(e) => warn!(control = %target.addr, quic_error = %e, "QUIC did not get through; policy distributor connected over TLS/TCP (fallback)"),
                None => info!(control = %target.addr, "policy distributor connected over TLS/TCP"),
            }
            applier.link(Link::Connected {
                transport: Transport::Tcp,
                fallback: quic_error.is_some(),
            });
            let (r, w) = tokio::io::split(stream);
            session(&*applier, r, w).await
        }
        .await;
        let error = match outcome {
            Ok(()) => "session closed".to_owned(),
            Err(e) => match quic_error {
                Some(q) => format!("QUIC: {q}; TCP: {e:#}"),
                None => format!("{e:#}"),
            },
        };
        // A session that lived a while resets the backoff; repeated quick failures grow it.
        if started.elapsed() > Duration::from_secs(10) {
            attempt = 0;
        }
        let wait = backoff(attempt);
        attempt = attempt.saturating_add(1);
        warn!(control = %target.addr, %error, retry_in = ?wait, "policy distributor link down; enforcing the last good version");
        applier.link(Link::Down { error });
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP);
            assert!(d <= BACKOFF_BASE * 2u32.pow(attempt.min(16)));
        }
        // Jitter: many draws at the same attempt are not all the same.
        let draws: std::collections::BTreeSet<u128> =
            (0..50).map(|_| backoff(5).as_micros()).collect();
        assert!(draws.len() > 40, "{draws:?}");
    }
}
