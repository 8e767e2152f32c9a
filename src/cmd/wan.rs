//! `strait bench wan-relay`: a WAN link with a fixed one-way delay, for kernels without `sch_netem`.
//!
//! Two interfaces (usually the ends of two veth pairs whose other ends sit on two bridges, the "regions")
//! are joined by this process: every frame one receives is sent out of the other `delay` later, in order.
//! Frames are copied with their virtio-net header (`PACKET_VNET_HDR`), so segmentation-offload
//! super-frames and checksums left to the hardware cross intact and the sending kernel finishes them.
//! The delay is a deadline per frame on tokio's timer (millisecond ticks): each frame leaves between
//! `delay` and `delay` + about 1 ms after it arrived. What is queued is bounded ([`MAX_QUEUED_BYTES`] per
//! direction, like a router's buffer): past it frames are dropped and counted.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tracing::{info, warn};

/// Bytes queued per direction before frames are dropped (25 ms at 10 Gbit/s is about 31 MB).
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Largest datagram a packet socket hands over: a 64 KiB offload super-frame plus headers.
const MAX_FRAME: usize = 65_536 + 128;

/// One end of the relay: a packet socket on an interface.
struct Port {
    name: String,
    fd: AsyncFd<OwnedFd>,
}

impl Port {
    fn open(name: &str) -> anyhow::Result<Self> {
        let path = format!("/sys/class/net/{name}/ifindex");
        let ifindex: u32 = std::fs::read_to_string(&path)
            .with_context(|| format!("no interface {name} in this network namespace ({path})"))?
            .trim()
            .parse()
            .with_context(|| format!("reading {path}"))?;
        let fd = crate::sys::packet_socket(ifindex)
            .with_context(|| format!("opening a packet socket on {name} (needs CAP_NET_RAW)"))?;
        Ok(Self {
            name: name.to_owned(),
            fd: crate::sys::async_fd(fd)?,
        })
    }

    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| crate::sys::recv(fd.get_ref().as_fd(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| crate::sys::send(fd.get_ref().as_fd(), frame)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Relays frames between `interfaces[0]` and `interfaces[1]` with `delay` each way, until SIGTERM/SIGINT.
pub fn run(interfaces: &[String], delay: Duration) -> anyhow::Result<()> {
    let [a, b] = interfaces else {
        anyhow::bail!("name exactly two interfaces: --interface A --interface B");
    };
    anyhow::ensure!(a != b, "the two interfaces must differ");
    anyhow::ensure!(
        delay <= Duration::from_secs(10),
        "a delay above 10 s is not a WAN"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let (a, b) = (Arc::new(Port::open(a)?), Arc::new(Port::open(b)?));
            info!(a = %a.name, b = %b.name, delay_ms = delay.as_secs_f64() * 1e3, "WAN relay running");
            let mut ab = tokio::spawn(relay(a.clone(), b.clone(), delay));
            let mut ba = tokio::spawn(relay(b, a, delay));
            tokio::select! {
                r = &mut ab => r.context("relay task")?,
                r = &mut ba => r.context("relay task")?,
                _ = super::shutdown_signal() => {
                    info!("WAN relay stopping");
                    Ok(())
                }
            }
        })
}

/// One direction: frames read from `from` leave through `to` `delay` after they arrived.
async fn relay(from: Arc<Port>, to: Arc<Port>, delay: Duration) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_FRAME];
    if delay.is_zero() {
        // No timer in the path (its millisecond ticks would add up to 1 ms a frame).
        let mut lost = Lost::default();
        loop {
            let n = from
                .recv(&mut buf)
                .await
                .with_context(|| format!("reading from {}", from.name))?;
            if n > buf.len() {
                lost.count(
                    &from.name,
                    "a frame larger than the relay's buffer was dropped",
                );
                continue;
            }
            if let Err(e) = to.send(&buf[..n]).await {
                lost.count(&to.name, &format!("frame not sent: {e}"));
            }
        }
    }
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut queued_bytes = 0usize;
    let mut lost = Lost::default();
    loop {
        let due = queue.front().map(|(t, _)| *t);
        tokio::select! {
            // Frames leave in arrival order: with one fixed delay, that is deadline order.
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                let now = Instant::now();
                while queue.front().is_some_and(|(t, _)| *t <= now) {
                    let Some((_, frame)) = queue.pop_front() else { break };
                    queued_bytes -= frame.len();
                    if let Err(e) = to.send(&frame).await {
                        // A frame the other side cannot take (its link down, too large) is lost, as on a
                        // real link; the relay goes on.
                        lost.count(&to.name, &format!("frame not sent: {e}"));
                    }
                }
            }
            n = from.recv(&mut buf) => {
                let n = n.with_context(|| format!("reading from {}", from.name))?;
                if n > buf.len() {
                    lost.count(&from.name, "a frame larger than the relay's buffer was dropped");
                    continue;
                }
                if queued_bytes + n > MAX_QUEUED_BYTES {
                    lost.count(&from.name, "WAN queue full: frame dropped");
                    continue;
                }
                queued_bytes += n;
                queue.push_back((Instant::now() + delay, buf[..n].to_vec()));
            }
        }
    }
}

/// Frames lost on one direction, logged at the 1st, 2nd, 4th, 8th… so that a burst cannot flood the log.
#[derive(Default)]
struct Lost(u64);

impl Lost {
    fn count(&mut self, interface: &str, what: &str) {
        self.0 += 1;
        if self.0.is_power_of_two() {
            warn!(interface, lost = self.0, "{what}");
        }
    }
}
