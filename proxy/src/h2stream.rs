//! One HTTP/2 CONNECT stream of a tunnel as a byte stream (`AsyncRead + AsyncWrite`), on the `h2` crate's
//! stream handles directly, as ztunnel does: a write becomes a DATA frame handed to the connection, a
//! received DATA frame is read in place and its flow-control credit given back as it is consumed.
//!
//! hyper's CONNECT `Upgraded` does the same through a spawned task and a channel per stream, copying each
//! write into a new buffer: two task hand-offs per write and per read that this avoids.
//!
//! A client stream can be used before the proxy at the other end has answered its CONNECT
//! ([`H2Stream::opening`]): writes go out at once (the request's first bytes ride with the CONNECT, saving
//! one round trip on every new connection), and the first read waits for the answer. Bytes sent early
//! reach only the destination proxy, which is the one that decides; a refusal discards them and the read
//! returns [`Refused`].
//!
//! A shutdown sends END_STREAM (the peer reads EOF: half-closes pass through); dropping the stream before
//! that resets it (CANCEL), so a caller that goes away cancels the work behind it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::ResponseFuture;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Received and not yet read.
    pending: Bytes,
    read_closed: bool,
    write_closed: bool,
}

/// The receiving half: a stream that is open, or the answer to our CONNECT still to come.
enum Recv {
    Open(RecvStream),
    Answer(ResponseFuture),
}

/// The destination proxy answered the CONNECT with something other than 200 (carried inside the
/// `io::Error` a read returns; [`Refused::of`] finds it).
#[derive(Debug, thiserror::Error)]
#[error("the destination proxy refused the stream: HTTP {0}")]
pub struct Refused(pub http::StatusCode);

impl Refused {
    pub fn of(e: &io::Error) -> Option<http::StatusCode> {
        e.get_ref()?.downcast_ref::<Refused>().map(|r| r.0)
    }
}

impl H2Stream {
    /// An open stream (the server side, or a client side whose CONNECT was answered).
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self::with(send, Recv::Open(recv))
    }

    /// A client stream whose CONNECT was sent and not answered yet.
    pub fn opening(send: SendStream<Bytes>, answer: ResponseFuture) -> Self {
        Self::with(send, Recv::Answer(answer))
    }

    /// Whether the other end has accepted the stream (always, for a stream made open).
    pub fn answered(&self) -> bool {
        matches!(self.recv, Recv::Open(_))
    }

    fn with(send: SendStream<Bytes>, recv: Recv) -> Self {
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
            let recv = match &mut self.recv {
                Recv::Open(r) => r,
                Recv::Answer(answer) => {
                    let resp = ready!(Pin::new(answer).poll(cx)).map_err(to_io)?;
                    if resp.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            Refused(resp.status()),
                        )));
                    }
                    self.recv = Recv::Open(resp.into_body());
                    continue;
                }
            };
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The credit goes back as soon as the frame is here: at most one frame per stream is
                    // held unread, so flow control still bounds what a peer can queue.
                    let _ = recv.flow_control().release_capacity(data.len());
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
            // A stream the peer already closed (it answered and reset, or the connection is gone) takes
            // no END_STREAM; that is not a failure of our side's shutdown. Failing here would end a
            // copy_bidirectional before the peer's last bytes, already received, reach our caller.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tunnel's two ends over an in-memory pipe; the server answers every CONNECT with `status` and,
    /// when it accepts, echoes what it reads. Returns what the server read before answering.
    async fn pair(
        status: StatusCode,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Vec<u8>>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            // Whatever the client sent before the answer is already here.
            let early = body.data().await.unwrap().unwrap().to_vec();
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            if status == StatusCode::OK {
                let send = respond.send_response(resp, false).unwrap();
                let mut s = H2Stream::new(send, body);
                s.write_all(&early).await.unwrap();
                s.shutdown().await.unwrap();
            } else {
                respond.send_response(resp, true).unwrap();
            }
            early
        });
        let (client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        (client, server)
    }

    fn connect() -> Request<()> {
        Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn bytes_sent_before_the_answer_arrive_and_the_answer_opens_the_stream() {
        let (mut client, server) = pair(StatusCode::OK).await;
        let (answer, send) = client.send_request(connect(), false).unwrap();
        let mut s = H2Stream::opening(send, answer);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert!(s.answered());
        assert_eq!(back, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(server.await.unwrap(), b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_refused_stream_reads_as_refused_with_the_status() {
        let (mut client, server) = pair(StatusCode::FORBIDDEN).await;
        let (answer, send) = client.send_request(connect(), false).unwrap();
        let mut s = H2Stream::opening(send, answer);
        s.write_all(b"secret").await.unwrap();
        let mut buf = [0u8; 16];
        let err = s.read(&mut buf).await.unwrap_err();
        assert!(!s.answered());
        assert_eq!(Refused::of(&err), Some(StatusCode::FORBIDDEN));
        server.await.unwrap();
    }
}
