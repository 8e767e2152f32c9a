//! DNS messages from workloads (any bytes a meshed process sends to port 53) and the resolver's answers
//! to the queries the proxy forwards: planned, answered, finished, never a panic.
//!
//! Input: two bytes giving the query's length, the query, then the bytes of an answer. The answer is
//! tried as given and, so that the fuzzer reaches record parsing, appended to a header and question
//! that match the forwarded query (`fuzz/seeds/dns_message/` shows the layout).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_policy::hostname::HostName;
use strait_proxy::dns::message::{finish, plan, Plan, Scope, Transport};

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (query, answer) = rest.split_at(split);
    let Ok(zone) = HostName::parse("strait.internal") else {
        return;
    };
    let mesh = |rel: &str| (rel == "vfx.movie").then(|| vec!["10.77.0.3".parse().unwrap()]);
    let allowed = |n: &HostName| n.as_str().ends_with("example");
    let scope = Scope {
        zone: &zone,
        mesh: &mesh,
        allowed: &allowed,
    };
    for transport in [Transport::Udp, Transport::Tcp] {
        match plan(query, transport, &scope, 0xbeef) {
            Plan::Reply { bytes, .. } => {
                assert!(
                    transport == Transport::Tcp || bytes.len() <= 1232,
                    "an oversized UDP answer"
                );
            }
            Plan::Forward(pending) => {
                let _ = finish(&pending, answer);
                // The forwarded query with QR set, the answer count from the first byte, then the
                // fuzzer's bytes as records.
                let mut framed = pending.upstream.clone();
                // Without its OPT record (11 bytes with no options; the additional count goes to 0).
                framed.truncate(framed.len().saturating_sub(11).max(12));
                framed[2] |= 0x80;
                framed[6..8].copy_from_slice(
                    &u16::from(answer.first().copied().unwrap_or(1)).to_be_bytes(),
                );
                framed[10..12].copy_from_slice(&[0, 0]);
                framed.extend_from_slice(answer);
                if let Ok((bytes, _)) = finish(&pending, &framed) {
                    let limit = if transport == Transport::Udp {
                        1232
                    } else {
                        65535
                    };
                    assert!(
                        bytes.len() <= limit,
                        "an answer larger than the client can take"
                    );
                }
                let _ = pending.failure();
            }
            Plan::Drop => {}
        }
    }
});
