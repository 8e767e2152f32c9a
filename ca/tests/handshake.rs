//! Real mutual-TLS handshakes between tokio-rustls endpoints over loopback TCP, using SVIDs from the CA.
//!
//! TLS 1.3 detail: a client's `connect()` completes before the server has checked the client certificate,
//! so every refusal test also reads from the connection, where the refused side learns its fate.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{id, now, TestCa, TD};
use rustls::pki_types::ServerName;
use strait_ca::tls::{client_config, server_config};
use strait_ca::verify::{explain, peer_id, rejection_kind};
use strait_ca::{PeerIdMatcher, RejectionKind, SpiffeId, Svid, TrustBundle, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What each side saw.
struct Outcome {
    /// The client's view: the server's verified ID, or the error (handshake, or first read).
    client: Result<SpiffeId, std::io::Error>,
    /// The server's view: the client's verified ID, or the handshake error.
    server: Result<SpiffeId, std::io::Error>,
}

/// Runs one connection: the server presents `server_svid` and accepts clients per `accept_clients`; the
/// client presents `client_svid` and requires the server to be `expect_server`.
async fn handshake(
    server_svid: &Svid,
    server_bundle: Arc<TrustBundle>,
    accept_clients: PeerIdMatcher,
    client_svid: &Svid,
    client_bundle: Arc<TrustBundle>,
    expect_server: PeerIdMatcher,
) -> Outcome {
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(server_svid, server_bundle, accept_clients).unwrap(),
    ));
    let connector = TlsConnector::from(Arc::new(
        client_config(client_svid, client_bundle, expect_server).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await?;
        let peer = peer_id(tls.get_ref().1).expect("verified peer has an ID");
        // Echo one message so the client's read proves the whole path works.
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(peer)
    });

    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        // The name is irrelevant to SVID verification; it only fills the SNI field.
        let name = ServerName::try_from("strait.invalid").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let peer = peer_id(tls.get_ref().1).expect("verified peer has an ID");
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok(peer)
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("client finished");
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server finished")
        .unwrap();
    Outcome { client, server }
}

fn tls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The rejection kind carried by an I/O error from tokio-rustls on the side that verified.
fn kind_of(err: &std::io::Error) -> Option<RejectionKind> {
    rejection_kind(tls_error(err)?)
}

/// The operator-facing message of a refusal.
fn message(err: &std::io::Error) -> String {
    tls_error(err)
        .map(explain)
        .unwrap_or_else(|| err.to_string())
}

/// A server at `/ns/b/sa/server` that accepts any client of the trust domain.
async fn against_server(ca: &TestCa, client: &Svid) -> Outcome {
    let server = ca.svid("/ns/b/sa/server");
    handshake(
        &server,
        ca.bundle.clone(),
        PeerIdMatcher::AnyInTrustDomain,
        client,
        ca.bundle.clone(),
        PeerIdMatcher::Exact(id("/ns/b/sa/server")),
    )
    .await
}

/// A client that expects `/ns/b/sa/server` connecting to a server presenting `server`.
async fn against_client(ca: &TestCa, server: &Svid) -> Outcome {
    let client = ca.svid("/ns/a/sa/client");
    handshake(
        server,
        ca.bundle.clone(),
        PeerIdMatcher::AnyInTrustDomain,
        &client,
        ca.bundle.clone(),
        PeerIdMatcher::Exact(id("/ns/b/sa/server")),
    )
    .await
}

/// Asserts the server refused the client with `kind`, and the client could not complete its exchange.
fn assert_server_refused(o: Outcome, kind: RejectionKind) {
    let err = o.server.expect_err("server must refuse");
    assert_eq!(kind_of(&err), Some(kind), "server error: {err}");
    assert!(o.client.is_err(), "client must not get through");
}

/// Asserts the client refused the server with `kind`, and the server saw no successful handshake.
fn assert_client_refused(o: Outcome, kind: RejectionKind) {
    let err = o.client.expect_err("client must refuse");
    assert_eq!(kind_of(&err), Some(kind), "client error: {err}");
    assert!(o.server.is_err(), "server must not complete");
}

#[tokio::test]
async fn right_ids_connect_and_each_side_reads_the_other() {
    let ca = TestCa::new();
    let client = ca.svid("/ns/a/sa/client");
    let o = against_server(&ca, &client).await;
    assert_eq!(o.client.unwrap(), id("/ns/b/sa/server"));
    assert_eq!(o.server.unwrap(), id("/ns/a/sa/client"));
}

#[tokio::test]
async fn predicate_matcher_selects_clients() {
    let ca = TestCa::new();
    let server = ca.svid("/ns/b/sa/server");
    let only_ns_a = || PeerIdMatcher::predicate("namespace a", |p| p.path().starts_with("/ns/a/"));
    let good = ca.svid("/ns/a/sa/client");
    let o = handshake(
        &server,
        ca.bundle.clone(),
        only_ns_a(),
        &good,
        ca.bundle.clone(),
        PeerIdMatcher::AnyInTrustDomain,
    )
    .await;
    assert_eq!(o.server.unwrap(), id("/ns/a/sa/client"));

    let other = ca.svid("/ns/z/sa/client");
    let o = handshake(
        &server,
        ca.bundle.clone(),
        only_ns_a(),
        &other,
        ca.bundle.clone(),
        PeerIdMatcher::AnyInTrustDomain,
    )
    .await;
    let err = o.server.unwrap_err();
    assert!(message(&err).contains("expected namespace a"), "{err}");
    assert_eq!(kind_of(&err), Some(RejectionKind::WrongId));
}

#[tokio::test]
async fn expired_certificates_are_refused_both_ways() {
    let ca = TestCa::new();
    let two_hours_ago = now() - Duration::from_secs(7200);
    let expired_client = ca.svid_at("/ns/a/sa/client", two_hours_ago, Duration::from_secs(3600));
    assert_server_refused(
        against_server(&ca, &expired_client).await,
        RejectionKind::Expired,
    );
    let expired_server = ca.svid_at("/ns/b/sa/server", two_hours_ago, Duration::from_secs(3600));
    assert_client_refused(
        against_client(&ca, &expired_server).await,
        RejectionKind::Expired,
    );
}

#[tokio::test]
async fn not_yet_valid_certificates_are_refused_both_ways() {
    let ca = TestCa::new();
    let tomorrow = now() + Duration::from_secs(86400);
    let future_client = ca.svid_at("/ns/a/sa/client", tomorrow, Duration::from_secs(3600));
    assert_server_refused(
        against_server(&ca, &future_client).await,
        RejectionKind::NotYetValid,
    );
    let future_server = ca.svid_at("/ns/b/sa/server", tomorrow, Duration::from_secs(3600));
    assert_client_refused(
        against_client(&ca, &future_server).await,
        RejectionKind::NotYetValid,
    );
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused_both_ways() {
    let ca = TestCa::new();
    // Same trust domain name, different key: exactly what an attacker with their own CA would make.
    let rogue = TestCa::new();
    let rogue_client = rogue.svid("/ns/a/sa/client");
    assert_server_refused(
        against_server(&ca, &rogue_client).await,
        RejectionKind::UnknownIssuer,
    );
    let rogue_server = rogue.svid("/ns/b/sa/server");
    assert_client_refused(
        against_client(&ca, &rogue_server).await,
        RejectionKind::UnknownIssuer,
    );
}

#[tokio::test]
async fn ids_outside_the_trust_domain_are_refused_both_ways() {
    let ca = TestCa::new();
    // Signed by the right CA key, but naming another trust domain, which is not federated.
    let foreign = ca.forge(&["spiffe://other.org/ns/a/sa/client"], |_| {});
    assert_server_refused(
        against_server(&ca, &foreign).await,
        RejectionKind::NotFederated,
    );
    let foreign = ca.forge(&["spiffe://other.org/ns/b/sa/server"], |_| {});
    assert_client_refused(
        against_client(&ca, &foreign).await,
        RejectionKind::NotFederated,
    );
}

#[tokio::test]
async fn a_federated_domain_is_verified_against_its_own_roots_only() {
    let ca = TestCa::new();
    let other = TestCa::for_domain(TrustDomain::new("other.org").unwrap());
    let third = TestCa::for_domain(TrustDomain::new("third.org").unwrap());
    let federated = Arc::new(ca.bundle.federate([(*other.bundle).clone()]));
    let server = ca.svid("/ns/b/sa/server");
    // The client side trusts the partner's roots and ours (for the server it talks to).
    let client_trust = Arc::new(other.bundle.federate([(*ca.bundle).clone()]));
    let try_client = |client: Svid| {
        let (server, federated, client_trust) =
            (server.clone(), federated.clone(), client_trust.clone());
        async move {
            handshake(
                &server,
                federated,
                PeerIdMatcher::AnyInTrustDomain,
                &client,
                client_trust,
                PeerIdMatcher::AnyInTrustDomain,
            )
            .await
        }
    };
    let issue = |by: &TestCa, id: &str| {
        by.ca
            .issue_with_new_key(
                &SpiffeId::parse(id).unwrap(),
                Duration::from_secs(600),
                now(),
            )
            .unwrap()
    };
    // The partner's own identity, on the partner's roots: accepted by the server.
    let o = try_client(issue(&other, "spiffe://other.org/ns/a/sa/client")).await;
    assert!(o.server.is_ok(), "{:?}", o.server.err());
    // The partner's CA vouching for one of ours, or for a third domain's: refused.
    let ours = other.forge(&[&format!("spiffe://{TD}/ns/a/sa/client")], |_| {});
    assert_server_refused(try_client(ours).await, RejectionKind::UnknownIssuer);
    let thirds = other.forge(&["spiffe://third.org/ns/a/sa/client"], |_| {});
    assert_server_refused(try_client(thirds).await, RejectionKind::NotFederated);
    // Our CA vouching for the partner's identities: refused (never merged).
    let theirs = ca.forge(&["spiffe://other.org/ns/a/sa/client"], |_| {});
    assert_server_refused(try_client(theirs).await, RejectionKind::UnknownIssuer);
    // A third domain's own identity: not federated.
    let stranger = issue(&third, "spiffe://third.org/ns/a/sa/client");
    assert_server_refused(try_client(stranger).await, RejectionKind::NotFederated);
    // The fingerprint of the federation moves with the partner's roots, and is empty without any.
    assert_eq!(ca.bundle.federation_fingerprint(), "");
    assert_ne!(
        federated.federation_fingerprint(),
        ca.bundle
            .federate([(*third.bundle).clone()])
            .federation_fingerprint()
    );
}

#[tokio::test]
async fn ca_certificates_used_as_leaf_are_refused_both_ways() {
    let ca = TestCa::new();
    let client = ca.forge_ca_as_leaf("/ns/a/sa/client");
    assert_server_refused(against_server(&ca, &client).await, RejectionKind::CaAsLeaf);
    let server = ca.forge_ca_as_leaf("/ns/b/sa/server");
    assert_client_refused(against_client(&ca, &server).await, RejectionKind::CaAsLeaf);
}

#[tokio::test]
async fn two_uri_sans_are_refused_both_ways() {
    let ca = TestCa::new();
    let both = [
        format!("spiffe://{TD}/ns/a/sa/client"),
        format!("spiffe://{TD}/ns/b/sa/server"),
    ];
    let both: Vec<&str> = both.iter().map(String::as_str).collect();
    let o = against_server(&ca, &ca.forge(&both, |_| {})).await;
    let err = o.server.as_ref().unwrap_err();
    assert!(message(err).contains("exactly one URI SAN"), "{err}");
    assert_server_refused(o, RejectionKind::NotSvid);
    assert_client_refused(
        against_client(&ca, &ca.forge(&both, |_| {})).await,
        RejectionKind::NotSvid,
    );
}

#[tokio::test]
async fn certificates_without_a_uri_san_are_refused() {
    let ca = TestCa::new();
    let none = ca.forge(&[], |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName(
            "client.example.org".try_into().unwrap(),
        )]
    });
    assert_server_refused(against_server(&ca, &none).await, RejectionKind::NotSvid);
}

#[tokio::test]
async fn a_server_with_the_wrong_id_is_refused_by_the_client() {
    let ca = TestCa::new();
    // A valid SVID of the trust domain, but not the workload the client asked for: the man in the middle
    // who holds *an* identity.
    let impostor = ca.svid("/ns/b/sa/impostor");
    let o = against_client(&ca, &impostor).await;
    let err = o.client.as_ref().unwrap_err();
    assert!(
        message(err)
            .contains("peer is spiffe://example.org/ns/b/sa/impostor, expected spiffe://example.org/ns/b/sa/server"),
        "{err}"
    );
    assert_client_refused(o, RejectionKind::WrongId);
}

#[tokio::test]
async fn a_client_with_the_wrong_id_is_refused_by_an_exact_server() {
    let ca = TestCa::new();
    let server = ca.svid("/ns/b/sa/server");
    let client = ca.svid("/ns/a/sa/intruder");
    let o = handshake(
        &server,
        ca.bundle.clone(),
        PeerIdMatcher::Exact(id("/ns/a/sa/client")),
        &client,
        ca.bundle.clone(),
        PeerIdMatcher::Exact(id("/ns/b/sa/server")),
    )
    .await;
    assert_server_refused(o, RejectionKind::WrongId);
}

#[tokio::test]
async fn a_client_certificate_without_client_auth_eku_is_refused() {
    let ca = TestCa::new();
    let uri = format!("spiffe://{TD}/ns/a/sa/client");
    let server_only = ca.forge(&[uri.as_str()], |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]
    });
    assert_server_refused(
        against_server(&ca, &server_only).await,
        RejectionKind::WrongUsage,
    );
}

#[tokio::test]
async fn a_client_without_any_certificate_is_refused() {
    let ca = TestCa::new();
    let server = ca.svid("/ns/b/sa/server");
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(&server, ca.bundle.clone(), PeerIdMatcher::AnyInTrustDomain).unwrap(),
    ));
    let no_cert = rustls::ClientConfig::builder_with_provider(strait_ca::tls::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(strait_ca::verify::SvidServerVerifier::new(
            ca.bundle.clone(),
            PeerIdMatcher::AnyInTrustDomain,
        )))
        .with_no_client_auth();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_side = TlsConnector::from(Arc::new(no_cert))
        .connect(ServerName::try_from("x.invalid").unwrap(), tcp)
        .await;
    let read = match client_side {
        Ok(mut tls) => tls.read(&mut [0u8; 1]).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(read.is_err(), "client without a certificate got through");
    let err = server_side.await.unwrap().unwrap_err();
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn trust_domain_bundles_are_not_interchangeable() {
    // A peer from another trust domain with its own CA: refused (not federated) by our bundle.
    let ca = TestCa::new();
    let other = TestCa::for_domain(TrustDomain::new("other.org").unwrap());
    let stranger = other
        .ca
        .issue_with_new_key(
            &SpiffeId::parse("spiffe://other.org/ns/a/sa/client").unwrap(),
            Duration::from_secs(600),
            now(),
        )
        .unwrap();
    assert_server_refused(
        against_server(&ca, &stranger).await,
        RejectionKind::NotFederated,
    );
}
