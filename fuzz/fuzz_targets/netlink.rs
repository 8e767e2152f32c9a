//! Netlink answers the proxy reads from the kernel on every captured connection: sock_diag (which user
//! owns a socket) and ctnetlink (a connection's address before NAT). The kernel is trusted, but a parser
//! that indexes past what was received is a bug whoever sends the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_proxy::conntrack::parse_original_source;
use strait_proxy::sockets::{netlink_answer, parse_diag_uid};

fuzz_target!(|data: &[u8]| {
    let _ = parse_original_source(data);
    if let Ok(Some(answer)) = netlink_answer(data) {
        let _ = parse_diag_uid(answer);
    }
});
