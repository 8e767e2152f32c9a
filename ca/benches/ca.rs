//! Issuance and verification costs: `cargo bench -p strait-ca --bench ca`.
//!
//! - `issue/csr_check+sign`: what the control plane does per SVID request (CSR parse, self-signature
//!   check, key-type check, leaf signing). Throughput is reported in certificates per second.
//! - `verify/chain+spiffe_id`: what each side of a tunnel does per handshake on the peer's chain.
//! - `handshake/mtls_in_memory`: a whole TLS 1.3 mutual handshake with SVIDs on both sides, in memory
//!   (no sockets), so it measures crypto and verification only.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use strait_ca::csr::generate_key_and_csr;
use strait_ca::tls::{client_config, server_config};
use strait_ca::verify::{unix_time, verify_peer, PeerRole};
use strait_ca::{CertificateAuthority, CheckedCsr, PeerIdMatcher, SpiffeId, TrustDomain};

fn setup() -> (CertificateAuthority, SpiffeId) {
    let td = TrustDomain::new("example.org").unwrap();
    let ca = CertificateAuthority::generate(
        td.clone(),
        Duration::from_secs(86400 * 365),
        SystemTime::now(),
    )
    .unwrap();
    (ca, SpiffeId::workload(&td, "default", "web").unwrap())
}

fn issuance(c: &mut Criterion) {
    let (ca, id) = setup();
    let (_key, csr_der) = generate_key_and_csr().unwrap();
    let now = SystemTime::now();
    let mut g = c.benchmark_group("issue");
    g.throughput(Throughput::Elements(1));
    g.bench_function("csr_check", |b| {
        b.iter(|| CheckedCsr::from_der(&csr_der).unwrap())
    });
    let checked = CheckedCsr::from_der(&csr_der).unwrap();
    g.bench_function("sign", |b| {
        b.iter(|| {
            ca.issue(&checked, &id, Duration::from_secs(86400), now)
                .unwrap()
        })
    });
    g.bench_function("csr_check+sign", |b| {
        b.iter(|| {
            let csr = CheckedCsr::from_der(&csr_der).unwrap();
            ca.issue(&csr, &id, Duration::from_secs(86400), now)
                .unwrap()
        })
    });
    g.finish();
}

fn verification(c: &mut Criterion) {
    let (ca, id) = setup();
    let svid = ca
        .issue_with_new_key(&id, Duration::from_secs(86400), SystemTime::now())
        .unwrap();
    let bundle = ca.trust_bundle().clone();
    let exact = PeerIdMatcher::Exact(id.clone());
    let now = unix_time(SystemTime::now());
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("chain+spiffe_id", |b| {
        b.iter(|| verify_peer(&bundle, &exact, &svid.chain[0], &[], now, PeerRole::Server).unwrap())
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let (ca, server_id) = setup();
    let td = ca.trust_domain().clone();
    let client_id = SpiffeId::workload(&td, "default", "client").unwrap();
    let now = SystemTime::now();
    let server_svid = ca
        .issue_with_new_key(&server_id, Duration::from_secs(86400), now)
        .unwrap();
    let client_svid = ca
        .issue_with_new_key(&client_id, Duration::from_secs(86400), now)
        .unwrap();
    let bundle = Arc::new(ca.trust_bundle().clone());
    let server_cfg = Arc::new(
        server_config(
            &server_svid,
            bundle.clone(),
            PeerIdMatcher::AnyInTrustDomain,
        )
        .unwrap(),
    );
    let client_cfg =
        Arc::new(client_config(&client_svid, bundle, PeerIdMatcher::Exact(server_id)).unwrap());
    let name = ServerName::try_from("strait.invalid").unwrap();

    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mtls_in_memory", |b| {
        b.iter(|| {
            let mut client = ClientConnection::new(client_cfg.clone(), name.clone()).unwrap();
            let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
            let mut buf = Vec::with_capacity(8192);
            while client.is_handshaking() || server.is_handshaking() {
                buf.clear();
                while client.wants_write() {
                    client.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                }
                server.process_new_packets().unwrap();
                buf.clear();
                while server.wants_write() {
                    server.write_tls(&mut buf).unwrap();
                }
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap();
                }
                client.process_new_packets().unwrap();
            }
            assert!(server.peer_certificates().is_some());
        })
    });
    g.finish();
}

criterion_group!(benches, issuance, verification, handshake);
criterion_main!(benches);
