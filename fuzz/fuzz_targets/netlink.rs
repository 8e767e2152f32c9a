//! Netlink answers the proxy reads from the kernel on every captured connection: sock_diag (which user
//! owns a socket; the dump of a user's sockets) and ctnetlink (a connection's address before NAT). The kernel is trusted, but a parser
//! that indexes past what was received is a bug whoever sends the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_proxy::conntrack::parse_original_tuple;
use strait_proxy::sockets::{dump_messages, netlink_answer, parse_diag_socket, parse_diag_uid};

fuzz_target!(|data: &[u8]| {
    let _ = parse_original_tuple(data);
    if let Ok(Some(answer)) = netlink_answer(data) {
        let _ = parse_diag_uid(answer);
    }
    // A socket dump (the sockets of newly captured workloads): every message parsed.
    let _ = dump_messages(data, &mut |msg| {
        let _ = parse_diag_socket(6, msg);
    });
});
