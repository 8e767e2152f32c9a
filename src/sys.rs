//! The binary's only `unsafe` code: thin wrappers over libc and mimalloc calls that have no memory
//! preconditions. Everything else is `deny(unsafe_code)` (see main.rs).

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
