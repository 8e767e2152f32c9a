//! The idle timeout of an inbound stream: a stream (TCP, or a caller's HTTP connection) that moves no byte
//! either way for `--idle-timeout` is closed, as Envoy's `idle_timeout` does. A stream that is served
//! stops being watched the moment it ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When the stream last moved bytes, in milliseconds since `start`.
#[derive(Clone)]
pub struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once the stream has been idle for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An I/O that records its activity.
pub struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn idle_means_no_byte_either_way() {
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut w = Watched::new(a, activity.clone());
        let timeout = Duration::from_millis(400);
        // Traffic every 250 ms keeps it alive past 400 ms.
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity.idle_for(timeout).await;
                Instant::now()
            }
        });
        let start = Instant::now();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            b.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            w.read_exact(&mut one).await.unwrap();
        }
        let idle_at = watcher.await.unwrap();
        // Three gaps of 250 ms, then 400 ms of silence (timers never fire early). The activity clock has
        // millisecond steps, so allow one.
        assert!(
            idle_at - start >= Duration::from_millis(1149),
            "{:?}",
            idle_at - start
        );
    }
}
