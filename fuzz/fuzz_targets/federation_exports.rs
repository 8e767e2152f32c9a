//! What a partner's control plane answers for its exports (`GET /v1/federation/exports`), as the importing
//! control plane checks it: whatever the bytes, nothing panics, and every workload that comes out is a
//! workload identity of the partner's own trust domain, with TCP ports only, at addresses that are neither
//! this mesh's nor loopback, link-local, multicast or unspecified, reached through its node's tunnel or
//! through gateways that are nodes of the partner (then with no private address), within the size limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_ca::{IdKind, TrustDomain};
use strait_control::api::{Directory, DirectoryNode, Reach};
use strait_control::registry::NodeName;

fuzz_target!(|data: &[u8]| {
    let (Ok(partner), Ok(node)) = (TrustDomain::new("vfx.example"), NodeName::new("host-a")) else {
        return;
    };
    let own = Directory {
        nodes: vec![DirectoryNode {
            name: node,
            tunnel_address: Some("10.0.0.2:15008".into()),
            addresses: vec!["10.0.0.2"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into())],
            gateway_address: None,
        }],
        ..Default::default()
    };
    let Ok((imported, _refused)) = strait_control::federation::parse_imports(&partner, data, &own)
    else {
        return;
    };
    assert!(imported.len() <= 4096);
    for w in &imported {
        assert!(w.id.is_member_of(&partner), "{}", w.id);
        assert!(matches!(w.id.kind(), IdKind::Workload { .. }), "{}", w.id);
        assert!(!w.ports.is_empty() && w.ports.iter().all(|p| p.port != 0 && !p.is_udp()));
        assert!(w.addresses.len() <= 64 && w.ports.len() <= 64 && w.accepts.len() <= 1024);
        // Where the importer's proxies would dial: the node's tunnel, or each gateway (a gateway export
        // names no address of the partner's network, and at least one gateway of the partner's nodes).
        let dialled: Vec<std::net::IpAddr> = match &w.reach {
            Reach::Tunnel(t) => {
                assert!(!w.addresses.is_empty());
                vec![t.ip()]
            }
            Reach::Gateways(g) => {
                assert!(w.addresses.is_empty() && !g.is_empty() && g.len() <= 16);
                for gw in g {
                    assert!(gw.id.is_member_of(&partner), "{}", gw.id);
                    assert!(matches!(gw.id.kind(), IdKind::Node { .. }), "{}", gw.id);
                }
                g.iter().map(|g| g.address.ip()).collect()
            }
        };
        for a in w.addresses.iter().chain(&dialled) {
            assert!(
                a.to_string() != "10.0.0.2"
                    && !a.is_loopback()
                    && !a.is_multicast()
                    && !a.is_unspecified(),
                "{a}"
            );
        }
    }
});
