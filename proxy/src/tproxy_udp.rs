//! UDP that nftables' TPROXY diverted to one of the proxy's sockets (Kubernetes mode: a meshed pod's DNS
//! query, whatever resolver it addressed).
//!
//! TPROXY does not rewrite the datagram: it hands it to a local socket marked `IP_TRANSPARENT`, which
//! learns where the datagram was going from an `IP_ORIGDSTADDR` control message. The answer must come back
//! from that address, or the pod's resolver library drops it (it checks the source against the server it
//! asked): it is sent from a transparent socket bound to the original destination. That answer is the reply
//! direction of the query's conntrack entry, so a Service DNAT in front (kube-proxy's cluster DNS Service) is
//! undone on the way back exactly as for an answer from the Service's real backend.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::capture::PROXY_MARK;

/// Room for one `IP_ORIGDSTADDR`/`IPV6_ORIGDSTADDR` message (a header and a `sockaddr_in6`) and more.
const CONTROL_LEN: usize = 128;

/// Makes a bound UDP socket receive diverted datagrams and tell their original destination.
pub fn accept_diverted(socket: &UdpSocket) -> io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    let one: libc::c_int = 1;
    let (level, opt) = match socket.local_addr()? {
        SocketAddr::V4(_) => {
            sock.set_ip_transparent_v4(true)?;
            (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
        }
        SocketAddr::V6(_) => {
            sock.set_ip_transparent_v6(true)?;
            (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
        }
    };
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram: its length, its sender, and where it was going (`None` if it was not diverted, e.g. sent
/// straight to the socket's own address).
pub async fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    socket
        .async_io(Interest::READABLE, || recvmsg(socket.as_raw_fd(), buf))
        .await
}

fn recvmsg(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    // u64s so the control buffer is aligned as cmsghdr needs.
    let mut control = [0u64; CONTROL_LEN / 8];
    let mut name = [0u64; std::mem::size_of::<libc::sockaddr_storage>() / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below points into buffers that outlive the
    // call, with their true lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = std::mem::size_of_val(&name) as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1 as _;
    msg.msg_control = control.as_mut_ptr().cast();
    // `as _`: size_t on glibc, socklen_t on musl (the container image's target).
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: see above; recvmsg writes only within the lengths given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let as_bytes = |words: &[u64], len: usize| -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .take(len)
            .collect()
    };
    let peer = sockaddr(&as_bytes(&name, msg.msg_namelen as usize))
        .ok_or_else(|| io::Error::other("a datagram from an address that is not IPv4 or IPv6"))?;
    #[allow(clippy::unnecessary_cast)] // a u32 on musl
    let control = as_bytes(&control, msg.msg_controllen as usize);
    Ok((n as usize, peer, original_destination(&control)))
}

/// The original destination in a control-message buffer as recvmsg(2) filled it, if it holds one.
pub fn original_destination(control: &[u8]) -> Option<SocketAddr> {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then the data, each message
    // padded to the alignment of size_t.
    const HDR: usize = std::mem::size_of::<usize>() + 8;
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut rest = control;
    while rest.len() >= HDR {
        let len = usize::from_ne_bytes(rest[..ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(rest[ALIGN..ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(rest[ALIGN + 4..ALIGN + 8].try_into().ok()?);
        if len < HDR || len > rest.len() {
            return None;
        }
        let data = &rest[HDR..len];
        if (level == libc::SOL_IP && kind == libc::IP_ORIGDSTADDR)
            || (level == libc::SOL_IPV6 && kind == libc::IPV6_ORIGDSTADDR)
        {
            return sockaddr(data);
        }
        let next = len.div_ceil(ALIGN) * ALIGN;
        rest = rest.get(next..)?;
    }
    None
}

/// A `sockaddr_in` or `sockaddr_in6` as the kernel wrote it.
pub fn sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(b.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Sends `bytes` to `to` from `from`, an address that need not be the node's (the original destination
/// of a diverted datagram). The socket carries the proxy's mark, so capture lets it out. It never blocks:
/// a datagram the kernel cannot take at once is dropped, as the network could (the client retries).
pub fn send_from(from: SocketAddr, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
    let domain = socket2::Domain::for_address(from);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    match from {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
        }
    }
    // Other answers from the same address may be in flight on sockets of their own.
    socket.set_reuse_address(true)?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.bind(&from.into())?;
    socket.send_to(bytes, &to.into()).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let align = std::mem::size_of::<usize>();
        let len = align + 8 + data.len();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(len.div_ceil(align) * align, 0);
        out
    }

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&ip);
        b.extend_from_slice(&[0; 8]);
        b
    }

    #[test]
    fn finds_the_original_destination_among_other_messages() {
        let mut control = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMP, &[7; 16]);
        control.extend(cmsg(
            libc::SOL_IP,
            libc::IP_ORIGDSTADDR,
            &sockaddr_in([10, 96, 0, 10], 53),
        ));
        assert_eq!(
            original_destination(&control),
            Some("10.96.0.10:53".parse().unwrap())
        );
        let mut v6 = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v6.extend_from_slice(&53u16.to_be_bytes());
        v6.extend_from_slice(&[0; 4]);
        v6.extend_from_slice(&"fd00::10".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0; 4]);
        assert_eq!(
            original_destination(&cmsg(libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR, &v6)),
            Some("[fd00::10]:53".parse().unwrap())
        );
    }

    #[test]
    fn malformed_control_data_yields_nothing() {
        assert_eq!(original_destination(&[]), None);
        let good = cmsg(
            libc::SOL_IP,
            libc::IP_ORIGDSTADDR,
            &sockaddr_in([1, 2, 3, 4], 53),
        );
        // Truncated anywhere, or claiming more than there is, or too little: no address, no panic.
        for cut in 0..good.len() {
            let _ = original_destination(&good[..cut]);
        }
        let mut lying = good.clone();
        lying[..std::mem::size_of::<usize>()].copy_from_slice(&4096usize.to_ne_bytes());
        assert_eq!(original_destination(&lying), None);
        let mut short = good;
        short[..std::mem::size_of::<usize>()].copy_from_slice(&1usize.to_ne_bytes());
        assert_eq!(original_destination(&short), None);
        assert_eq!(sockaddr(&[0xff; 3]), None);
    }

    #[tokio::test]
    async fn an_undiverted_datagram_has_no_original_destination() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tx.send_to(b"hi", rx.local_addr().unwrap()).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, peer, orig) = recv(&rx, &mut buf).await.unwrap();
        assert_eq!((&buf[..n], peer), (&b"hi"[..], tx.local_addr().unwrap()));
        assert_eq!(orig, None);
    }
}
