//! The fake Kubernetes API server of `support::kube_api`, checked over its real wire format (HTTPS with a
//! bearer token, JSON, streamed watches) with a plain hyper client, so tests built on it can trust it.
//! Needs no root: it runs in the test's own network namespace.

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use support::kube_api::{FakePod, FakeReview, KubeApi};

/// A minimal Kubernetes client: one connection per request, verifying the server against `ca.crt`.
struct Client {
    port: u16,
    token: Option<String>,
    tls: tokio_rustls::TlsConnector,
}

impl Client {
    fn new(api: &KubeApi) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(api.ca_file()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        // Offer h2 too, as real clients do: the server must pick http/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let token = std::fs::read_to_string(api.token_file()).unwrap();
        assert_eq!(token, api.token());
        Self {
            port: api.port(),
            token: Some(token),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    async fn connect(&self) -> SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .await
            .unwrap();
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tls = self.tls.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> hyper::Response<Incoming> {
        let mut send = self.connect().await;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, format!("127.0.0.1:{}", self.port))
            .header(CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        send.send_request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap()
    }

    /// A request answered with a JSON body.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let resp = self.send(method, path, body).await;
        let status = resp.status();
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn watch(&self, path: &str) -> WatchStream {
        let resp = self.send(Method::GET, path, None).await;
        assert_eq!(resp.status(), StatusCode::OK, "watch {path}");
        WatchStream {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

/// A watch response read as newline-separated JSON events.
struct WatchStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl WatchStream {
    /// The next event, or None at the end of the stream; panics after 5 s without either.
    async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(Duration::from_secs(5), self.read())
            .await
            .expect("a watch event or the end of the stream within 5 s")
    }

    async fn read(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame.unwrap().into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "a partial event at the end of the stream"
                    );
                    return None;
                }
            }
        }
    }

    /// Asserts that nothing arrives for a short while.
    async fn quiet(&mut self) {
        let got = tokio::time::timeout(Duration::from_millis(300), self.read()).await;
        assert!(got.is_err(), "unexpected watch event: {got:?}");
    }
}

fn rv(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn labelled(mut pod: FakePod, k: &str, v: &str) -> FakePod {
    pod.labels.push((k.to_string(), v.to_string()));
    pod
}

#[tokio::test]
async fn lists_gets_and_filters_pods_and_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    assert_eq!(api.url(), format!("https://127.0.0.1:{}", api.port()));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(api.token_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let c = Client::new(&api);

    api.put_namespace("shop", &[("strait.io/mesh", "on")]);
    api.put_namespace("other", &[]);
    let mut web = labelled(
        FakePod::running("shop", "web-1", "node-a", "web", &["10.1.0.5", "fd00::5"]),
        "app",
        "web",
    );
    web.owners.push(("ReplicaSet".into(), "web-abc".into()));
    api.put_pod(web.clone());
    api.put_pod(FakePod::running("shop", "db-1", "node-b", "db", &[]));

    let (status, list) = c.get("/api/v1/pods").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["kind"], "PodList");
    assert_eq!(rv(&list), api.resource_version().to_string());
    assert_eq!(names(&list), ["db-1", "web-1"]);
    let pod = &list["items"][1];
    assert_eq!(pod["metadata"]["uid"], web.uid.as_str());
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "ReplicaSet");
    assert_eq!(pod["spec"]["nodeName"], "node-a");
    assert_eq!(pod["spec"]["serviceAccountName"], "web");
    assert_eq!(pod["spec"]["hostNetwork"], false);
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["podIP"], "10.1.0.5");
    assert_eq!(
        pod["status"]["podIPs"],
        json!([{"ip": "10.1.0.5"}, {"ip": "fd00::5"}])
    );
    assert!(pod["metadata"].get("deletionTimestamp").is_none());
    let db = &list["items"][0];
    assert!(db["status"].get("podIP").is_none() && db["status"].get("podIPs").is_none());

    let (_, by_node) = c
        .get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a")
        .await;
    assert_eq!(names(&by_node), ["web-1"]);
    let (_, by_label) = c
        .get("/api/v1/pods?labelSelector=app%3Dweb&limit=500")
        .await;
    assert_eq!(names(&by_label), ["web-1"]);
    let (_, has_label) = c.get("/api/v1/pods?labelSelector=app,missing").await;
    assert_eq!(names(&has_label), Vec::<String>::new());
    let (_, by_name) = c.get("/api/v1/pods?fieldSelector=metadata.name=db-1").await;
    assert_eq!(names(&by_name), ["db-1"]);
    let (status, _) = c.get("/api/v1/pods?labelSelector=app+in+(web)").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (_, namespaces) = c
        .get("/api/v1/namespaces?labelSelector=strait.io/mesh=on")
        .await;
    assert_eq!(namespaces["kind"], "NamespaceList");
    assert_eq!(names(&namespaces), ["shop"]);
    assert_eq!(namespaces["items"][0]["status"]["phase"], "Active");

    let (status, got) = c.get("/api/v1/namespaces/shop/pods/web-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["metadata"]["name"], "web-1");
    let (status, missing) = c.get("/api/v1/namespaces/shop/pods/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["kind"], "Status");
    assert_eq!(missing["reason"], "NotFound");
    let (status, unknown) = c.get("/api/v1/services").await;
    assert_eq!(
        (status, unknown["reason"].as_str()),
        (StatusCode::NOT_FOUND, Some("NotFound"))
    );

    let anonymous = Client {
        token: None,
        ..Client::new(&api)
    };
    let (status, denied) = anonymous.get("/api/v1/pods").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        denied,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":"Unauthorized","reason":"Unauthorized","code":401})
    );

    assert_eq!(api.count("list", "pods"), 6);
    assert_eq!(api.count("list", "namespaces"), 1);
    assert_eq!(api.count("get", "pods"), 2);
}

#[tokio::test]
async fn watches_deliver_changes_from_the_listed_version() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    let c = Client::new(&api);
    api.put_pod(FakePod::running(
        "shop",
        "old",
        "node-a",
        "web",
        &["10.1.0.1"],
    ));
    let (_, list) = c.get("/api/v1/pods").await;
    let listed = rv(&list);

    let mut all = c
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={listed}"))
        .await;
    let mut node_a = c
        .watch(&format!(
            "/api/v1/pods?watch=1&resourceVersion={listed}&fieldSelector=spec.nodeName%3Dnode-a"
        ))
        .await;

    let pod = FakePod::running("shop", "web-1", "node-a", "web", &["10.1.0.5"]);
    api.put_pod(pod.clone());
    let added = all.next().await.unwrap();
    assert_eq!(added["type"], "ADDED");
    assert_eq!(added["object"]["metadata"]["name"], "web-1");
    assert_eq!(rv(&added["object"]), api.resource_version().to_string());
    assert_eq!(node_a.next().await.unwrap()["type"], "ADDED");

    api.put_pod(FakePod::running("shop", "elsewhere", "node-b", "web", &[]));
    assert_eq!(
        all.next().await.unwrap()["object"]["metadata"]["name"],
        "elsewhere"
    );
    node_a.quiet().await;

    let mut terminating = pod.clone();
    terminating.deleting = true;
    api.put_pod(terminating);
    let modified = all.next().await.unwrap();
    assert_eq!(modified["type"], "MODIFIED");
    assert!(modified["object"]["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(node_a.next().await.unwrap()["type"], "MODIFIED");

    // Moving off node-a is a deletion for the node-a watch.
    let mut moved = pod.clone();
    moved.node = "node-c".into();
    api.put_pod(moved);
    assert_eq!(all.next().await.unwrap()["type"], "MODIFIED");
    let gone = node_a.next().await.unwrap();
    assert_eq!(gone["type"], "DELETED");
    assert_eq!(gone["object"]["spec"]["nodeName"], "node-a");

    let before = api.resource_version();
    api.delete_pod("shop", "web-1");
    let deleted = all.next().await.unwrap();
    assert_eq!(deleted["type"], "DELETED");
    assert_eq!(deleted["object"]["spec"]["nodeName"], "node-c");
    assert_eq!(rv(&deleted["object"]), (before + 1).to_string());
    api.delete_pod("shop", "web-1"); // already gone: no event, no version
    assert_eq!(api.resource_version(), before + 1);

    // A watch from the listed version replays everything since, in order.
    let mut late = c
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={listed}"))
        .await;
    let mut replay = Vec::new();
    for _ in 0..5 {
        let e = late.next().await.unwrap();
        replay.push(format!(
            "{} {}",
            e["type"].as_str().unwrap(),
            e["object"]["metadata"]["name"].as_str().unwrap()
        ));
    }
    assert_eq!(
        replay,
        [
            "ADDED web-1",
            "ADDED elsewhere",
            "MODIFIED web-1",
            "MODIFIED web-1",
            "DELETED web-1"
        ]
    );
    late.quiet().await;

    // resourceVersion 0: every current object as ADDED, then live changes.
    let mut fresh = c.watch("/api/v1/pods?watch=true&resourceVersion=0").await;
    let mut first = Vec::new();
    for _ in 0..2 {
        let e = fresh.next().await.unwrap();
        assert_eq!(e["type"], "ADDED");
        first.push(
            e["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(first, ["elsewhere", "old"]);
    fresh.quiet().await;

    // Namespaces: relabelling is MODIFIED.
    let mut namespaces = c.watch("/api/v1/namespaces?watch=true").await;
    api.put_namespace("shop", &[]);
    assert_eq!(namespaces.next().await.unwrap()["type"], "ADDED");
    api.put_namespace("shop", &[("strait.io/mesh", "on")]);
    let relabelled = namespaces.next().await.unwrap();
    assert_eq!(relabelled["type"], "MODIFIED");
    assert_eq!(
        relabelled["object"]["metadata"]["labels"]["strait.io/mesh"],
        "on"
    );
    api.delete_namespace("shop");
    assert_eq!(namespaces.next().await.unwrap()["type"], "DELETED");

    assert_eq!(api.count("watch", "pods"), 4);
    assert_eq!(
        api.watch_versions("pods"),
        [listed.clone(), listed.clone(), listed, "0".into()]
    );
    assert_eq!(api.watch_versions("namespaces"), [""]);
}

#[tokio::test]
async fn compaction_expires_old_versions_with_410() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    let c = Client::new(&api);
    api.put_pod(FakePod::running(
        "shop",
        "web-1",
        "node-a",
        "web",
        &["10.1.0.5"],
    ));
    let (_, list) = c.get("/api/v1/pods").await;
    let old = rv(&list);
    let mut open = c
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={old}"))
        .await;

    api.compact();
    let error = open.next().await.unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert_eq!(open.next().await, None);

    // A new watch from the old version: 200, the one ERROR event, then the end.
    let mut stale = c
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={old}"))
        .await;
    let error = stale.next().await.unwrap();
    assert_eq!(
        (error["type"].as_str(), error["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
    assert_eq!(stale.next().await, None);

    // Relisting gives a version that can be watched from.
    let (_, relist) = c.get("/api/v1/pods").await;
    assert_ne!(rv(&relist), old);
    let mut resumed = c
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&relist)
        ))
        .await;
    api.delete_pod("shop", "web-1");
    assert_eq!(resumed.next().await.unwrap()["type"], "DELETED");

    let (status, _) = c.get("/api/v1/pods?watch=true&resourceVersion=abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn paged_lists_come_from_one_snapshot_and_expire_with_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    let c = Client::new(&api);
    for i in 1..=5 {
        api.put_pod(FakePod::running(
            "shop",
            &format!("web-{i}"),
            "node-a",
            "web",
            &[&format!("10.1.0.{i}")],
        ));
    }
    let (status, first) = c.get("/api/v1/pods?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names(&first), ["web-1", "web-2"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
    // A change between pages does not show in the rest of this list (same snapshot, same version).
    api.delete_pod("shop", "web-5");
    let (_, second) = c
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!(names(&second), ["web-3", "web-4"]);
    let token = second["metadata"]["continue"].as_str().unwrap().to_owned();
    let (_, last) = c
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!(names(&last), ["web-5"]);
    assert!(last["metadata"].get("continue").is_none(), "{last}");
    assert_eq!(rv(&first), rv(&last));
    // A token is good once; a list whose snapshot was compacted away answers 410 Expired.
    let (status, _) = c
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, first) = c.get("/api/v1/pods?limit=2").await;
    let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
    api.compact();
    let (status, body) = c
        .get(&format!("/api/v1/pods?limit=2&continue={token}"))
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::GONE, Some("Expired"))
    );
    // Without limit, or with a limit above the count, one answer holds everything.
    let (_, all) = c.get("/api/v1/pods?limit=50").await;
    assert_eq!(names(&all).len(), 4);
    assert!(all["metadata"].get("continue").is_none());
}

#[tokio::test]
async fn bookmarks_closing_and_timeouts() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    let c = Client::new(&api);
    api.put_namespace("shop", &[]);
    let (_, list) = c.get("/api/v1/pods").await;
    let mut with = c
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}&allowWatchBookmarks=true",
            rv(&list)
        ))
        .await;
    let mut without = c
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={}",
            rv(&list)
        ))
        .await;

    api.put_namespace("other", &[]); // moves the version on without any pod event
    api.bookmark();
    let bookmark = with.next().await.unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    let at = rv(&bookmark["object"]);
    assert_eq!(at, api.resource_version().to_string());
    without.quiet().await;

    api.close_watches();
    assert_eq!(with.next().await, None);
    assert_eq!(without.next().await, None);

    // The client resumes from the bookmark and sees only what came after it.
    api.put_pod(FakePod::running("shop", "web-1", "node-a", "web", &[]));
    let mut resumed = c
        .watch(&format!("/api/v1/pods?watch=true&resourceVersion={at}"))
        .await;
    let added = resumed.next().await.unwrap();
    assert_eq!(
        (
            added["type"].as_str(),
            added["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("web-1"))
    );
    assert_eq!(api.watch_versions("pods").last(), Some(&at));

    let started = std::time::Instant::now();
    let mut short = c
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={at}&timeoutSeconds=1"
        ))
        .await;
    assert_eq!(short.next().await.unwrap()["type"], "ADDED");
    assert_eq!(short.next().await, None);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Stopping the server ends the streams still open.
    drop(api);
    assert_eq!(resumed.next().await, None);
}

#[tokio::test]
async fn token_reviews() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    let c = Client::new(&api);
    api.add_token(
        "proxy-token",
        FakeReview {
            username: "system:serviceaccount:strait-system:strait-proxy".into(),
            audiences: vec!["strait".into()],
            pod_name: Some("strait-proxy-x1".into()),
            pod_uid: Some("1234".into()),
            node_name: Some("node-a".into()),
        },
    );
    let review = |token: &str, audiences: Value| {
        json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview",
               "spec":{"token": token, "audiences": audiences}})
    };
    let path = "/apis/authentication.k8s.io/v1/tokenreviews";

    let (status, ok) = c
        .call(
            Method::POST,
            path,
            Some(review("proxy-token", json!(["strait"]))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ok["kind"], "TokenReview");
    assert_eq!(ok["spec"]["token"], "proxy-token");
    let s = &ok["status"];
    assert_eq!(s["authenticated"], true);
    assert_eq!(s["audiences"], json!(["strait"]));
    assert_eq!(
        s["user"]["username"],
        "system:serviceaccount:strait-system:strait-proxy"
    );
    assert_eq!(
        s["user"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:strait-system",
            "system:authenticated"
        ])
    );
    assert_eq!(
        s["user"]["extra"],
        json!({"authentication.kubernetes.io/pod-name": ["strait-proxy-x1"],
               "authentication.kubernetes.io/pod-uid": ["1234"],
               "authentication.kubernetes.io/node-name": ["node-a"]})
    );

    for (token, audiences) in [
        ("proxy-token", json!(["other"])),
        ("proxy-token", json!([])), // the API server's own audience
        ("unknown", json!(["strait"])),
    ] {
        let (status, no) = c
            .call(Method::POST, path, Some(review(token, audiences.clone())))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(no["status"]["authenticated"], false, "{token} {audiences}");
        assert!(no["status"]["error"].is_string());
        assert!(no["status"].get("user").is_none());
    }

    let resp = c.send(Method::POST, path, None).await; // an empty body is not JSON
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (status, bad) = c.call(Method::POST, path, Some(json!({"spec": {}}))).await;
    assert_eq!(
        (status, bad["kind"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Status"))
    );
    let (status, _) = c.get(path).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(api.count("tokenreview", ""), 6);
}

#[tokio::test]
async fn configmaps_create_get_and_update_with_conflicts() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start_local(tmp.path());
    let c = Client::new(&api);
    let path = "/api/v1/namespaces/strait-system/configmaps";
    let one = format!("{path}/strait-bundle");

    let (status, _) = c.get(&one).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body = json!({"apiVersion":"v1","kind":"ConfigMap",
                      "metadata":{"name":"strait-bundle","namespace":"strait-system"},
                      "data":{"bundle.pem":"one"}});
    let (status, created) = c.call(Method::POST, path, Some(body.clone())).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["kind"], "ConfigMap");
    assert_eq!(created["data"]["bundle.pem"], "one");
    assert!(created["metadata"]["uid"].is_string());
    let first = rv(&created);

    let (status, exists) = c.call(Method::POST, path, Some(body)).await;
    assert_eq!(
        (status, exists["reason"].as_str()),
        (StatusCode::CONFLICT, Some("AlreadyExists"))
    );

    let (status, got) = c.get(&one).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, created);

    let mut update = created.clone();
    update["data"]["bundle.pem"] = json!("two");
    let (status, updated) = c.call(Method::PUT, &one, Some(update.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(rv(&updated), first);
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);

    // Still naming the first version: someone else changed it since.
    update["data"]["bundle.pem"] = json!("three");
    let (status, conflict) = c.call(Method::PUT, &one, Some(update.clone())).await;
    assert_eq!(
        (status, conflict["reason"].as_str()),
        (StatusCode::CONFLICT, Some("Conflict"))
    );
    assert_eq!(
        api.configmap("strait-system", "strait-bundle").unwrap()["bundle.pem"],
        "two"
    );

    // Without a resourceVersion an update always applies.
    update["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (status, _) = c.call(Method::PUT, &one, Some(update)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        api.configmap("strait-system", "strait-bundle").unwrap()["bundle.pem"],
        "three"
    );

    let (status, _) = c
        .call(
            Method::PUT,
            &format!("{path}/absent"),
            Some(json!({"metadata":{"name":"absent"}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = c
        .call(
            Method::POST,
            path,
            Some(json!({"metadata":{"name":"x"},"data":{"n":1}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(api.configmap("strait-system", "absent"), None);

    assert_eq!(api.count("get", "configmaps"), 2);
    assert_eq!(api.count("create", "configmaps"), 3);
    assert_eq!(api.count("update", "configmaps"), 4);
}
