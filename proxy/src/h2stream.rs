//! One HTTP/2 CONNECT stream of a tunnel as a byte stream (`AsyncRead + AsyncWrite`), on the `h2` crate's
//! stream handles directly, as ztunnel does: a write becomes a DATA frame handed to the connection, a
//! received DATA frame is read in place and its flow-control credit given back as it is consumed.
//!
//! hyper's CONNECT `Upgraded` does the same through a spawned task and a channel per stream, copying each
//! write into a new buffer: two task hand-offs per write and per read that this avoids.
//!
//! A shutdown sends END_STREAM (the peer reads EOF: half-closes pass through); dropping the stream before
//! that resets it (CANCEL), so a caller that goes away cancels the work behind it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    read_closed: bool,
    write_closed: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            read_closed: false,
            write_closed: false,
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("tunnel I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The credit goes back as soon as the frame is here: at most one frame per stream is
                    // held unread, so flow control still bounds what a peer can queue.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                // A peer that stops its side cleanly (RST_STREAM NO_ERROR after END_STREAM) is an EOF.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    self.read_closed = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => self.read_closed = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(buf.len());
        let n = loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n.min(buf.len()),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames handed to h2 are written by the connection's task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
