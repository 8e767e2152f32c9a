//! `strait docstore`: a small HTTP document store, the workload used by the tests, benchmarks and the
//! demo. `POST /api/<name>` stores a document, `GET /api/<name>/<id>` returns it, `GET /` names the
//! service. Documents live in memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};

const MAX_DOC: usize = 4 << 20;

struct Store {
    name: String,
    docs: Mutex<Vec<Bytes>>,
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(store: Arc<Store>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let prefix = format!("/api/{}", store.name);
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => reply(StatusCode::OK, format!("{}\n", store.name)),
        (Method::POST, p) if p == prefix => {
            let body = match Limited::new(req.into_body(), MAX_DOC).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "document too large\n"),
            };
            let len = body.len();
            let id = match store.docs.lock() {
                Ok(mut d) => {
                    d.push(body);
                    d.len() - 1
                }
                Err(_) => return reply(StatusCode::INTERNAL_SERVER_ERROR, "store poisoned\n"),
            };
            reply(
                StatusCode::CREATED,
                format!(
                    "{{\"service\":\"{}\",\"id\":{id},\"bytes\":{len}}}\n",
                    store.name
                ),
            )
        }
        (Method::GET, p) if p.starts_with(&format!("{prefix}/")) => {
            let doc = p[prefix.len() + 1..]
                .parse::<usize>()
                .ok()
                .and_then(|i| store.docs.lock().ok()?.get(i).cloned());
            match doc {
                Some(d) => reply(StatusCode::OK, d),
                None => reply(StatusCode::NOT_FOUND, "no such document\n"),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            format!("try GET / or POST {prefix}\n"),
        ),
    }
}

pub fn run(listen: Vec<SocketAddr>, name: String) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let shutdown = super::control::shutdown_signal();
            let store = Arc::new(Store {
                name,
                docs: Mutex::new(Vec::new()),
            });
            let mut tasks = Vec::new();
            for addr in listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let store = store.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let store = store.clone();
                                async move { Ok::<_, Infallible>(handle(store, req).await) }
                            });
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(tcp), svc)
                                    .await;
                        });
                    }
                }));
            }
            tokio::select! {
                _ = shutdown => {}
                _ = futures_join(tasks) => {}
            }
            Ok(())
        })
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
