//! Control plane throughput through the real API (TLS 1.3 + HTTP/2 on loopback, redb store with fsync):
//!
//!     cargo bench -p strait-control --bench api
//!
//! - joins: each one a new TLS connection pinned by the token, a token consumed durably, a node SVID
//!   signed and the node record written (the node's key and CSR are made beforehand);
//! - workload SVIDs: one node over one HTTP/2 connection, CSRs made beforehand.
//!
//! Client and server share this machine's cores, as they would not in production.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_ca::TrustDomain;
use strait_control::api::{self, paths};
use strait_control::client::{ApiClient, ServerTrust};
use strait_control::init::{init, CaSource, InitOptions};
use strait_control::node::{join, prepare_csr, NodeClient};
use strait_control::registry::{NodeName, PortSpec, Protocol, Selector, Workload};
use strait_control::server::{serve, State};

const JOINS: usize = 400;
const SVIDS: usize = 4000;

struct Row {
    what: &'static str,
    count: usize,
    concurrency: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run<F, Fut>(count: usize, concurrency: usize, f: F) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return lat;
                }
                let t = Instant::now();
                f(i).await;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (start.elapsed(), all)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cp");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        init(InitOptions {
            data_dir: dir.clone(),
            trust_domain: TrustDomain::new("bench.example").unwrap(),
            server: addr.to_string(),
            ca: CaSource::Generate {
                validity: Duration::from_secs(86400 * 365),
            },
        })
        .unwrap();
        let state = Arc::new(State::open(&dir, Duration::from_secs(86400)).unwrap());
        tokio::spawn(serve(state, listener, std::future::pending()));
        let server = format!("https://{addr}");
        let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
        let bundle = Arc::new(
            strait_ca::TrustBundle::from_pem(
                TrustDomain::new("bench.example").unwrap(),
                &std::fs::read_to_string(dir.join("ca/bundle.pem")).unwrap(),
            )
            .unwrap(),
        );
        let admin = ApiClient::new(
            &server,
            ServerTrust::Bundle(bundle),
            None,
            Some(token.trim().into()),
        )
        .unwrap();

        // Tokens for the joins.
        let mut tokens = Vec::with_capacity(JOINS);
        for i in 0..JOINS {
            let t: api::TokenResponse = admin
                .post(
                    paths::ADMIN_TOKENS,
                    &api::TokenRequest {
                        node: NodeName::new(&format!("n{i}")).unwrap(),
                        ttl_secs: None,
                        gateway: false,
                    },
                )
                .await
                .unwrap();
            tokens.push(t.token);
        }
        let tokens = Arc::new(tokens);
        let mut rows = Vec::new();
        for concurrency in [1, 8] {
            let (srv, toks) = (server.clone(), tokens.clone());
            let offset = if concurrency == 1 { 0 } else { JOINS / 4 };
            let count = if concurrency == 1 {
                JOINS / 4
            } else {
                JOINS - JOINS / 4
            };
            let (elapsed, lat) = run(count, concurrency, move |i| {
                let (srv, toks) = (srv.clone(), toks.clone());
                async move {
                    join(&srv, &toks[offset + i], Default::default())
                        .await
                        .unwrap();
                }
            })
            .await;
            rows.push(Row {
                what: "node join (new TLS conn each)",
                count,
                concurrency,
                elapsed,
                latencies: lat,
            });
        }

        // One node with one registered workload asks for many SVIDs.
        let node = join(
            &server,
            &{
                let t: api::TokenResponse = admin
                    .post(
                        paths::ADMIN_TOKENS,
                        &api::TokenRequest {
                            node: NodeName::new("svid-node").unwrap(),
                            ttl_secs: None,
                            gateway: false,
                        },
                    )
                    .await
                    .unwrap();
                t.token
            },
            Default::default(),
        )
        .await
        .unwrap();
        let w = Workload {
            id: strait_ca::SpiffeId::parse("spiffe://bench.example/ns/a/sa/web").unwrap(),
            node: NodeName::new("svid-node").unwrap(),
            selector: Selector::Uid(1000),
            ports: vec![PortSpec::new(80, Protocol::Http)],
            probe_ports: Vec::new(),
        };
        let _: api::ChangeResponse = admin.post(paths::ADMIN_WORKLOADS, &w).await.unwrap();
        let csrs: Arc<Vec<_>> = Arc::new((0..SVIDS).map(|_| prepare_csr().unwrap()).collect());
        let client = Arc::new(NodeClient::new(&server, &node).unwrap());
        for concurrency in [1, 16] {
            let (c, csrs, id) = (client.clone(), csrs.clone(), w.id.clone());
            let count = SVIDS / 2;
            let offset = if concurrency == 1 { 0 } else { SVIDS / 2 };
            let (elapsed, lat) = run(count, concurrency, move |i| {
                let (c, csrs, id) = (c.clone(), csrs.clone(), id.clone());
                async move {
                    let (key, csr) = &csrs[offset + i];
                    c.workload_svid_for_csr(&id, key.clone_key(), csr.clone())
                        .await
                        .unwrap();
                }
            })
            .await;
            rows.push(Row {
                what: "workload SVID (one h2 conn)",
                count,
                concurrency,
                elapsed,
                latencies: lat,
            });
        }

        println!(
            "\n{:<32} {:>6} {:>5} {:>9} {:>10} {:>9} {:>9}",
            "operation", "count", "conc", "seconds", "per sec", "p50 ms", "p99 ms"
        );
        for r in &rows {
            println!(
                "{:<32} {:>6} {:>5} {:>9.2} {:>10.0} {:>9.2} {:>9.2}",
                r.what,
                r.count,
                r.concurrency,
                r.elapsed.as_secs_f64(),
                r.count as f64 / r.elapsed.as_secs_f64(),
                pct(&r.latencies, 0.5).as_secs_f64() * 1e3,
                pct(&r.latencies, 0.99).as_secs_f64() * 1e3,
            );
        }
    });
}
