//! Socket-level facts the kernel knows and the proxy needs: where a redirected connection was going
//! (`SO_ORIGINAL_DST`), which Unix user opened it, and outbound sockets carrying the proxy's mark.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::capture::PROXY_MARK;

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination a connection had before nftables redirected it to the proxy.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    let local = stream.local_addr()?;
    // SAFETY: getsockopt writes at most `len` bytes into a zeroed sockaddr_storage we own.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let (level, opt) = if local.is_ipv4() {
            (libc::SOL_IP, SO_ORIGINAL_DST)
        } else {
            (libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)
        };
        if libc::getsockopt(
            fd,
            level,
            opt,
            &mut storage as *mut _ as *mut libc::c_void,
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&storage as *const _ as *const libc::sockaddr_in);
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*(&storage as *const _ as *const libc::sockaddr_in6);
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    0,
                    0,
                )))
            }
            f => Err(io::Error::other(format!("unexpected address family {f}"))),
        }
    }
}

/// Encodes an address as /proc/net/tcp{,6} prints it: each 32-bit word in host (little-endian) order.
fn proc_hex(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => v6
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// The Unix user owning the local socket `client` that connected to `dst` (before redirection).
///
/// After an nftables `redirect`, the client's socket still records the original destination, so its
/// entry in /proc/net/tcp is (client → dst). The kernel wrote the uid; the client cannot forge it.
pub fn local_peer_uid(client: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
    let (local, remote) = (proc_hex(client), proc_hex(dst));
    let files: &[&str] = match client {
        SocketAddr::V4(_) => &["/proc/net/tcp", "/proc/net/tcp6"],
        SocketAddr::V6(_) => &["/proc/net/tcp6"],
    };
    for file in files {
        let text = std::fs::read_to_string(file)?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 7 && cols[1] == local && cols[2] == remote {
                return Ok(cols[7].parse().ok());
            }
        }
    }
    Ok(None)
}

/// Connects with the proxy's socket mark set (exempt from capture), with a timeout.
pub async fn connect_marked(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket2::SockRef::from(&socket).set_mark(PROXY_MARK)?;
    socket.set_nodelay(true)?;
    tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_encoding_matches_the_kernel_format() {
        assert_eq!(proc_hex("127.0.0.1:8080".parse().unwrap()), "0100007F:1F90");
        assert_eq!(
            proc_hex("[::1]:80".parse().unwrap()),
            "00000000000000000000000001000000:0050"
        );
    }

    #[tokio::test]
    async fn finds_the_uid_of_a_local_connection() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let c = TcpStream::connect(dst).await.unwrap();
        let uid = local_peer_uid(c.local_addr().unwrap(), dst).unwrap();
        assert_eq!(uid, Some(unsafe { libc::geteuid() }));
    }
}
