//! Socket-level facts the kernel knows and the proxy needs: where a redirected connection was going
//! (`SO_ORIGINAL_DST`), which Unix user opened it, and outbound sockets carrying the proxy's mark.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::capture::PROXY_MARK;

const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The first descriptor systemd passes (sd_listen_fds(3): `SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;
/// More would not be Strait's listeners.
const LISTEN_FDS_MAX: i32 = 64;

/// Activated listeners by socket name.
pub type Activated = std::collections::HashMap<String, Vec<std::net::TcpListener>>;

/// Listening TCP sockets handed over by socket activation (systemd's protocol, sd_listen_fds(3)):
/// `LISTEN_PID` names this process, `LISTEN_FDS` counts descriptors from 3 on, `LISTEN_FDNAMES` names them
/// (`FileDescriptorName=` in the socket unit). Sockets that outlive the process let a restart lose no
/// connection: the kernel queues new ones in the backlog until the next proxy accepts them. Returns the
/// listeners by name (none without activation) and clears the variables, so children do not inherit them.
/// Call it before any other thread starts (it changes the environment).
pub fn activated_listeners() -> io::Result<Activated> {
    let mut out = Activated::default();
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<i32>().ok());
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Sound only while no other thread runs: `strait proxy` calls this before it starts the runtime.
        #[allow(clippy::disallowed_methods)]
        std::env::remove_var(var);
    }
    let Some(count) = count.filter(|_| for_us) else {
        return Ok(out);
    };
    if !(0..=LISTEN_FDS_MAX).contains(&count) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS={count}: not a plausible number of sockets"),
        ));
    }
    let mut names = names.split(':');
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
        // SAFETY: the activation protocol hands descriptors LISTEN_FDS_START.. to this process (LISTEN_PID
        // was checked), open and owned by nobody else in it; each is taken exactly once here.
        let sock = unsafe { socket2::Socket::from_raw_fd(fd) };
        sock.set_cloexec(true)?;
        if sock.r#type()? != socket2::Type::STREAM || !sock.is_listener()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {fd} ({name}) handed over is not a listening TCP socket"),
            ));
        }
        sock.set_nonblocking(true)?;
        out.entry(name.to_owned())
            .or_default()
            .push(std::net::TcpListener::from(sock));
    }
    Ok(out)
}

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

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg` (the part we read).
#[repr(C)]
#[derive(Clone, Copy)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_NOCOOKIE: u32 = !0;

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b.copy_from_slice(&v6.octets()),
    }
    b
}

/// Sends one netlink request (`request` starts with its `nlmsghdr`) on a fresh socket of `protocol` and
/// reads the first answer into `buf`: `Ok(Some(len))`, `Ok(None)` when the kernel answered ENOENT (no such
/// socket or connection), or the kernel's error.
pub(crate) fn netlink_roundtrip(
    protocol: libc::c_int,
    request: &[u8],
    buf: &mut [u8],
) -> io::Result<Option<usize>> {
    let fd = netlink_send(protocol, request)?;
    let n = netlink_recv(&fd, buf)?;
    Ok(netlink_answer(&buf[..n])?.map(|a| a.len()))
}

/// A fresh netlink socket of `protocol` with `request` sent to the kernel on it.
fn netlink_send(protocol: libc::c_int, request: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain syscalls on a socket we own; `request` is valid for its length.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            protocol,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        let sent = libc::sendto(
            fd.as_raw_fd(),
            request.as_ptr() as *const libc::c_void,
            request.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// One datagram from a netlink socket into `buf`; its length.
fn netlink_recv(fd: &std::os::fd::OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The first message of a netlink answer: `None` for an error message saying ENOENT (no such socket or
/// connection), that error for any other error message, otherwise the answer itself.
pub fn netlink_answer(answer: &[u8]) -> io::Result<Option<&[u8]>> {
    let hdr_len = std::mem::size_of::<NlMsgHdr>();
    if answer.len() < hdr_len {
        return Err(io::Error::other("short netlink answer"));
    }
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if kind != NLMSG_ERROR {
        return Ok(Some(answer));
    }
    let code = answer
        .get(hdr_len..hdr_len + 4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| io::Error::other("short netlink error"))?;
    match code.checked_neg() {
        // An acknowledgement (asked for with NLM_F_ACK).
        Some(0) => Ok(Some(answer)),
        Some(libc::ENOENT) => Ok(None),
        Some(errno) if errno > 0 => Err(io::Error::from_raw_os_error(errno)),
        _ => Err(io::Error::other(format!(
            "netlink error message with code {code}"
        ))),
    }
}

/// The owner's uid in a `sock_diag` answer (`struct nlmsghdr` then `struct inet_diag_msg`).
pub fn parse_diag_uid(answer: &[u8]) -> io::Result<u32> {
    let hdr_len = std::mem::size_of::<NlMsgHdr>();
    let uid_at = hdr_len + std::mem::offset_of!(InetDiagMsg, uid);
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match (kind, answer.get(uid_at..uid_at + 4)) {
        (Some(SOCK_DIAG_BY_FAMILY), Some(_))
            if answer.len() >= hdr_len + std::mem::size_of::<InetDiagMsg>() =>
        {
            let b = &answer[uid_at..uid_at + 4];
            Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        }
        _ => Err(io::Error::other("unexpected netlink answer")),
    }
}

/// The Unix user that opened the redirected connection accepted as `tcp` from `peer`, going to `dst`.
///
/// Usually `peer` is the client's own address. But `redirect` maps every captured connection onto the
/// proxy's one address, so when a client reuses a source port towards another destination while the old
/// connection's conntrack entry lingers (TIME_WAIT), NAT gives the new one another source port to keep the
/// reply tuples apart, and no socket has the address the proxy sees. Then conntrack, asked by the reply
/// tuple, tells the client's real address.
pub fn client_uid(tcp: &TcpStream, peer: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
    if let Some(uid) = local_peer_uid(peer, dst)? {
        return Ok(Some(uid));
    }
    match crate::conntrack::original_source(tcp.local_addr()?, peer)? {
        Some(client) if client != peer => local_peer_uid(client, dst),
        _ => Ok(None),
    }
}

/// The Unix user owning the local socket `client` that connected to `dst` (before redirection).
///
/// After an nftables `redirect`, the client's socket still records the original destination, so the
/// kernel's socket table holds (client → dst). One exact `sock_diag` query by that 4-tuple returns the
/// owner's uid, which the kernel recorded and the client cannot forge. (Scanning /proc/net/tcp instead
/// costs milliseconds once connection churn fills it with TIME_WAIT entries.)
pub fn local_peer_uid(client: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
    owner_uid(libc::IPPROTO_TCP as u8, client, dst)
}

/// The Unix user owning the local UDP socket that sent from `client` to `dst` (the addresses before
/// redirection, from conntrack). It finds the socket the kernel would deliver `dst`'s answer to: a socket
/// connected to `dst` or an unconnected one bound to `client`'s port.
pub fn udp_sender_uid(client: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
    // The kernel's UDP lookup by `inet_diag_sockid` reads `src` as the remote end and `dst` as the local
    // one, the reverse of TCP's (udp_dump_one: "src and dst are swapped for historical reasons").
    owner_uid(libc::IPPROTO_UDP as u8, dst, client)
}

fn owner_uid(protocol: u8, src: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let id = InetDiagSockId {
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        src: addr_bytes(src.ip()),
        dst: addr_bytes(dst.ip()),
        interface: 0,
        cookie: [INET_DIAG_NOCOOKIE; 2],
    };
    let request = diag_request(
        family as u8,
        protocol,
        !0,
        SOCK_DIAG_BY_FAMILY,
        libc::NLM_F_REQUEST as u16,
        id,
    );
    let mut buf = [0u8; 1024];
    let n = match netlink_roundtrip(NETLINK_SOCK_DIAG, &request, &mut buf)? {
        Some(n) => n,
        None => return Ok(None),
    };
    parse_diag_uid(&buf[..n]).map(Some)
}

/// A socket of a local user, as `sock_diag` lists it (enough to destroy it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSocket {
    pub protocol: u8,
    pub uid: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    family: u8,
    /// The kernel's `inet_diag_sockid` as received (ports, addresses, interface, cookie).
    id: InetDiagSockId,
}
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const SOCK_DESTROY: u16 = 21;
const TCP_LISTEN: u32 = 10;

/// One `inet_diag_msg` of a dump answer (after its `nlmsghdr`): `None` unless well formed.
pub fn parse_diag_socket(protocol: u8, msg: &[u8]) -> Option<UserSocket> {
    let need = std::mem::size_of::<InetDiagMsg>();
    let msg = msg.get(..need)?;
    let family = msg[0];
    let raw = msg.get(4..4 + std::mem::size_of::<InetDiagSockId>())?;
    let word = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let id = InetDiagSockId {
        sport: [raw[0], raw[1]],
        dport: [raw[2], raw[3]],
        src: raw[4..20].try_into().ok()?,
        dst: raw[20..36].try_into().ok()?,
        interface: word(36),
        cookie: [word(40), word(44)],
    };
    let ip = |b: &[u8; 16]| -> Option<IpAddr> {
        Some(match family as libc::c_int {
            libc::AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&b[..4]).ok()?)),
            libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(*b)),
            _ => return None,
        })
    };
    let local = SocketAddr::new(ip(&id.src)?, u16::from_be_bytes(id.sport));
    let remote = SocketAddr::new(ip(&id.dst)?, u16::from_be_bytes(id.dport));
    let at = std::mem::offset_of!(InetDiagMsg, uid);
    let uid = u32::from_ne_bytes(msg.get(at..at + 4)?.try_into().ok()?);
    Some(UserSocket {
        protocol,
        uid,
        local,
        remote,
        family,
        id,
    })
}

/// A `sock_diag` request (`nlmsghdr` + `inet_diag_req_v2`) as bytes.
fn diag_request(
    family: u8,
    protocol: u8,
    states: u32,
    kind: u16,
    flags: u16,
    id: InetDiagSockId,
) -> Vec<u8> {
    let req = InetDiagReqV2 {
        family,
        protocol,
        states,
        id,
        ..Default::default()
    };
    #[repr(C)]
    struct Request {
        hdr: NlMsgHdr,
        req: InetDiagReqV2,
    }
    let msg = Request {
        hdr: NlMsgHdr {
            len: std::mem::size_of::<Request>() as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
        },
        req,
    };
    // SAFETY: `Request` is plain old data (repr(C)); we copy exactly its bytes.
    unsafe {
        std::slice::from_raw_parts(
            &msg as *const Request as *const u8,
            std::mem::size_of::<Request>(),
        )
    }
    .to_vec()
}

/// Every TCP and UDP socket (IPv4 and IPv6) owned by one of `uids`, except listening ones: what a workload
/// had open before its capture began.
pub fn sockets_of(uids: &std::collections::BTreeSet<u32>) -> io::Result<Vec<UserSocket>> {
    dump_sockets(
        uids,
        &[
            (libc::IPPROTO_TCP as u8, !(1u32 << TCP_LISTEN)),
            (libc::IPPROTO_UDP as u8, !0u32),
        ],
    )
}

/// The ports `uids` accept traffic on: listening TCP sockets and unconnected UDP sockets, IPv4 and
/// IPv6 (what a workload serves, declared or not).
pub fn listening_ports(
    uids: &std::collections::BTreeSet<u32>,
) -> io::Result<(
    std::collections::BTreeSet<u16>,
    std::collections::BTreeSet<u16>,
)> {
    let (mut tcp, mut udp) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for s in dump_sockets(
        uids,
        &[
            (libc::IPPROTO_TCP as u8, 1u32 << TCP_LISTEN),
            (libc::IPPROTO_UDP as u8, !0u32),
        ],
    )? {
        match s.protocol {
            p if p == libc::IPPROTO_TCP as u8 => {
                tcp.insert(s.local.port());
            }
            _ if s.remote.port() == 0 => {
                udp.insert(s.local.port());
            }
            _ => {}
        }
    }
    Ok((tcp, udp))
}

/// The sockets of `uids` for each (protocol, TCP state mask), IPv4 and IPv6.
fn dump_sockets(
    uids: &std::collections::BTreeSet<u32>,
    kinds: &[(u8, u32)],
) -> io::Result<Vec<UserSocket>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for &(protocol, states) in kinds {
            let req = diag_request(
                family,
                protocol,
                states,
                SOCK_DIAG_BY_FAMILY,
                libc::NLM_F_REQUEST as u16 | NLM_F_DUMP,
                InetDiagSockId::default(),
            );
            netlink_dump(&req, |msg| {
                if let Some(s) = parse_diag_socket(protocol, msg) {
                    if uids.contains(&s.uid) {
                        out.push(s);
                    }
                }
            })?;
        }
    }
    Ok(out)
}

/// Closes a socket of another process (`SOCK_DESTROY`, what `ss -K` does): its owner's next read or
/// write fails, and it sends nothing more.
pub fn destroy(s: &UserSocket) -> io::Result<()> {
    let req = diag_request(
        s.family,
        s.protocol,
        !0,
        SOCK_DESTROY,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        s.id,
    );
    let mut buf = [0u8; 512];
    netlink_roundtrip(NETLINK_SOCK_DIAG, &req, &mut buf).map(|_| ())
}

/// Sends a dump request and hands each message's payload (after its `nlmsghdr`) to `each`, until the
/// kernel says it is done.
fn netlink_dump(request: &[u8], mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let fd = netlink_send(NETLINK_SOCK_DIAG, request)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = netlink_recv(&fd, &mut buf)?;
        if dump_messages(&buf[..n], &mut each)? {
            return Ok(());
        }
    }
}

/// The messages of one dump datagram; `true` once NLMSG_DONE was seen.
pub fn dump_messages(mut data: &[u8], each: &mut impl FnMut(&[u8])) -> io::Result<bool> {
    let hdr_len = std::mem::size_of::<NlMsgHdr>();
    if data.is_empty() {
        return Ok(true);
    }
    while data.len() >= hdr_len {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < hdr_len || len > data.len() {
            return Err(io::Error::other("malformed netlink dump"));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                netlink_answer(&data[..len])?;
            }
            _ => each(&data[hdr_len..len]),
        }
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    Ok(false)
}

/// The proxy's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
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

/// A UDP socket with the proxy's mark, connected to `addr` (so only `addr`'s datagrams are received).
pub async fn udp_connected_marked(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let domain = match addr {
        SocketAddr::V4(_) => socket2::Domain::IPV4,
        SocketAddr::V6(_) => socket2::Domain::IPV6,
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(socket.into())?;
    socket.connect(addr).await?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_the_uid_of_a_local_connection() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let c = TcpStream::connect(dst).await.unwrap();
        let uid = local_peer_uid(c.local_addr().unwrap(), dst).unwrap();
        assert_eq!(uid, Some(unsafe { libc::geteuid() }));
        // No such connection: None, not an error.
        let none = local_peer_uid("127.0.0.1:1".parse().unwrap(), dst).unwrap();
        assert_eq!(none, None);
    }

    #[tokio::test]
    async fn finds_the_uid_of_a_udp_sender_connected_or_not() {
        let me = Some(unsafe { libc::geteuid() });
        let resolver: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(resolver).unwrap();
        let from = connected.local_addr().unwrap();
        assert_eq!(udp_sender_uid(from, resolver).unwrap(), me);
        // Connected elsewhere: not the socket that sent to `resolver`.
        let other: SocketAddr = "127.0.0.1:54".parse().unwrap();
        assert_eq!(udp_sender_uid(from, other).unwrap(), None);
        let unconnected = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = unconnected.local_addr().unwrap().port();
        let from = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
        assert_eq!(udp_sender_uid(from, resolver).unwrap(), me);
        // Nobody bound there.
        drop(unconnected);
        assert_eq!(udp_sender_uid(from, resolver).unwrap(), None);
    }

    #[test]
    fn lists_the_ports_a_user_listens_on() {
        let me: std::collections::BTreeSet<u32> = [unsafe { libc::geteuid() }].into();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect("127.0.0.1:9").unwrap();
        let (t, u) = listening_ports(&me).unwrap();
        assert!(t.contains(&tcp.local_addr().unwrap().port()));
        assert!(u.contains(&udp.local_addr().unwrap().port()));
        assert!(
            !u.contains(&connected.local_addr().unwrap().port()),
            "a connected socket is a client"
        );
        let nobody: std::collections::BTreeSet<u32> = [65_533].into();
        assert_eq!(listening_ports(&nobody).unwrap(), Default::default());
    }

    #[tokio::test]
    async fn finds_the_uid_over_ipv6() {
        let Ok(l) = tokio::net::TcpListener::bind("[::1]:0").await else {
            return; // no IPv6 on this host
        };
        let dst = l.local_addr().unwrap();
        let c = TcpStream::connect(dst).await.unwrap();
        let uid = local_peer_uid(c.local_addr().unwrap(), dst).unwrap();
        assert_eq!(uid, Some(unsafe { libc::geteuid() }));
    }
}
