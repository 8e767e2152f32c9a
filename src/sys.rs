//! The binary's only `unsafe` code: thin wrappers over libc, mimalloc and tokio calls, each safe to call
//! with any argument its signature allows (what they need of memory is kept inside, with a `SAFETY:`
//! comment). Everything else is `deny(unsafe_code)` (see main.rs).

/// The effective user id.
pub use strait_proxy::sockets::effective_uid;

/// Sends `signal` to process `pid` (errors, such as a process already gone, are ignored).
pub fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// Asks the allocator to return the pages this thread freed to the system.
pub fn allocator_give_back() {
    // SAFETY: mi_collect has no preconditions; it only touches this thread's heap.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// Raises the soft limit of open files to the hard limit; `Some((from, to))` when it changed.
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                return Some((soft, lim.rlim_max));
            }
        }
    }
    None
}

/// A raw packet socket on the interface with index `ifindex` for the WAN relay (`strait bench
/// wan-relay`): every frame the interface receives (promiscuous), none of those sent through it, each
/// preceded by its virtio-net header (`PACKET_VNET_HDR`) so that offload state (a segmentation-offload
/// super-frame, a checksum still to be filled in) travels with the frame and the sending side's kernel
/// completes it. Non-blocking.
pub fn packet_socket(ifindex: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0: the socket receives nothing until `bind` names the interface and the protocol (with
    // ETH_P_ALL here it would take frames of every interface in between, the other region's included).
    // SAFETY: socket has no memory preconditions; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor we just opened and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level: libc::c_int, name: libc::c_int, value: &[u8]| -> std::io::Result<()> {
        // SAFETY: value points to `value.len()` readable bytes for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // Before bind, so that no frame is queued without its header.
    set(
        libc::SOL_PACKET,
        libc::PACKET_VNET_HDR,
        &1_i32.to_ne_bytes(),
    )?;
    set(
        libc::SOL_PACKET,
        libc::PACKET_IGNORE_OUTGOING,
        &1_i32.to_ne_bytes(),
    )?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: packet_mreq is plain old data; all-zero is a valid value.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: reading the bytes of a plain-old-data struct we own.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&mreq as *const libc::packet_mreq).cast::<u8>(),
            std::mem::size_of::<libc::packet_mreq>(),
        )
    };
    set(libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, bytes)?;
    Ok(fd)
}

/// recv(2) of one datagram into `buf`: its whole length, which is more than `buf.len()` when it was
/// truncated (MSG_TRUNC).
pub fn recv(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// send(2) of one datagram on a socket.
pub fn send(fd: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Registers a descriptor with the tokio reactor.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the OwnedFd is a valid, non-blocking descriptor that the AsyncFd owns from here on; nothing
    // else closes or replaces it while it is registered.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(fd) }?)
}
