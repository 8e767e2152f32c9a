//! The L7 path with clients and servers nobody here wrote, across two hosts (VM mode), as root:
//! grpcio (the four call kinds, trailers, deadlines, a denied call), the `websockets` client against
//! hypercorn's WebSocket, curl and nghttp over HTTP/1.1 and h2c against hypercorn (trailers, `:authority`,
//! header sizes), Python's http.server as an echoing workload for the normalization table, socat for raw
//! requests and half-closes, and many concurrent connections from one workload.
//!
//! The workload's ports on host b (uid 1002):
//!
//! | port | protocol | server |
//! |---|---|---|
//! | 7001 | grpc | grpcio server (tests/apps/grpc_server.py) |
//! | 7002 | auto | the same gRPC server |
//! | 7003 | http | hypercorn (tests/apps/echo.py): HTTP/1.1, h2c, WebSocket at /ws |
//! | 7004 | auto | the same hypercorn |
//! | 7005 | http | Python http.server echo (tests/apps/raw_echo.py): method and target exactly as received |
//! | 7006 | auto | the same http.server |
//! | 7007 | auto | a server-first protocol (socat: a banner, then echo) |
//! | 7008 | tcp | the same banner server, declared tcp |
//!
//! The destination proxy runs a custom Rego policy (OPA-Envoy style) that allows everything except paths
//! under `/admin`, gRPC calls to `strait.test.Admin`, and requests carrying `x-secret`; every decision is
//! logged, so each case can compare what the client sent, what the policy saw and what the workload got.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::mesh::{bin, Mesh, OWNER_UID, VFX_UID};
use support::{apps, python, require_root};

const POLICY: &str = r#"package envoy.authz

import rego.v1

default allow := {"allowed": false, "reason": "not allowed"}

allow := {"allowed": true, "reason": "allowed"} if not refused

allow := {"allowed": false, "reason": "admin paths are not part of the workflow"} if refused

http := input.attributes.request.http

refused if startswith(http.path, "/admin")

refused if startswith(http.path, "/strait.test.Admin/")

refused if http.headers["x-secret"]
"#;

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The workloads' servers and proxies, with b on the custom policy.
fn mesh() -> Mesh {
    let m = Mesh::new("1h");
    let ports = "[{port: 5000, protocol: http}, {port: 7001, protocol: grpc}, {port: 7002, protocol: auto}, {port: 7003, protocol: http}, {port: 7004, protocol: auto}, {port: 7005, protocol: http}, {port: 7006, protocol: auto}, {port: 7007, protocol: auto}, {port: 7008, protocol: tcp}, {port: 7009, protocol: http2}]";
    let apply = m.dir.join("vfx-l7.yaml");
    std::fs::write(
        &apply,
        format!(
            "apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n- id: {}\n  node: host-b\n  uid: {VFX_UID}\n  ports: {ports}\n",
            support::mesh::id("vfx")
        ),
    )
    .unwrap();
    m.admin(&["apply", "-f", apply.to_str().unwrap()]);
    let (py, apps) = (python(), apps());
    let hypercorn = format!(
        "ulimit -Sn $(ulimit -Hn); cd {apps} && exec {py} -m hypercorn --workers 0 --backlog 4096 --bind '[::]:7003' --bind '[::]:7004' echo:app"
    );
    let grpc_server = format!("{apps}/grpc_server.py");
    let raw_echo = format!("{apps}/raw_echo.py");
    let h2_abrupt = format!("{apps}/h2_abrupt.py");
    for (args, log) in [
        (
            vec![py.as_str(), grpc_server.as_str(), "7001", "7002"],
            "grpc.log",
        ),
        (
            // Many concurrent connections need more descriptors than a shell's soft limit.
            vec!["sh", "-c", &hypercorn],
            "hypercorn.log",
        ),
        (vec![py.as_str(), raw_echo.as_str(), "7005"], "echo1.log"),
        (
            vec![py.as_str(), h2_abrupt.as_str(), "7009"],
            "h2-abrupt.log",
        ),
        (vec![py.as_str(), raw_echo.as_str(), "7006"], "echo2.log"),
        (
            vec![
                "socat",
                "TCP6-LISTEN:7007,ipv6only=0,reuseaddr,fork",
                "SYSTEM:echo 220-banner; cat",
            ],
            "banner1.log",
        ),
        (
            vec![
                "socat",
                "TCP6-LISTEN:7008,ipv6only=0,reuseaddr,fork",
                "SYSTEM:echo 220-banner; cat",
            ],
            "banner2.log",
        ),
    ] {
        m.net.spawn("b", Some(VFX_UID), &args, &m.dir.join(log));
    }
    let policy = m.dir.join("l7-policy");
    std::fs::create_dir_all(&policy).unwrap();
    std::fs::write(policy.join("policy.rego"), POLICY).unwrap();
    // A's proxy starts with a shell's soft limit of 1 024 descriptors (it raises it to the hard limit) and
    // a cap of 5 200 connections: `many_connections` holds 5 000 through it, then goes over the cap.
    m.start_proxy_behind(
        "a",
        &["prlimit", "--nofile=1024:", "--"],
        &["--max-connections", "5200"],
    );
    m.start_proxy(
        "b",
        &[
            "--policy-bundle",
            m.p("l7-policy"),
            "--decision-log-allow-sample",
            "1",
            "--auto-detect-timeout",
            "8s",
            "--idle-timeout",
            "15s",
        ],
    );
    m.converge();
    // The servers listen.
    m.net
        .eventually(Duration::from_secs(20), "test servers listening", || {
            let ss = m.net.run("b", None, &["ss", "-ltnH"]);
            let s = String::from_utf8_lossy(&ss.stdout);
            (7001..=7008).all(|p| s.contains(&format!(":{p} ")))
        });
    m
}

/// The decisions logged by proxy b so far, in order.
fn decisions(m: &Mesh) -> Vec<Value> {
    m.log("proxy-b.log")
        .lines()
        .filter(|l| l.contains("strait::decision"))
        .filter_map(|l| serde_json::from_str(&l[l.find('{')?..]).ok())
        .collect()
}

/// Sends raw bytes from host a as the owner (socat half-closes after them, as `nc -N` does) and returns
/// the HTTP status and the body.
fn raw(m: &Mesh, port: u16, request: &str) -> (u16, String) {
    let b = m.net.v4("b");
    // The request goes to socat's stdin through printf (%b keeps every byte as written).
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &[
            "sh",
            "-c",
            &format!("printf '%b' \"$0\" | socat -t 10 -T 15 - TCP:{b}:{port}"),
            &request.replace('\\', "\\\\").replace("\r\n", "\\r\\n"),
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

struct Case {
    what: &'static str,
    method: &'static str,
    target: &'static str,
    extra: &'static str,
    status: u16,
    /// What the policy saw (method, path), or `None`: refused before any decision.
    decided: Option<(&'static str, &'static str)>,
    /// What the workload received (method, target) when it was forwarded.
    received: Option<(&'static str, &'static str)>,
}

const fn case(
    what: &'static str,
    method: &'static str,
    target: &'static str,
    status: u16,
    decided: Option<(&'static str, &'static str)>,
) -> Case {
    Case {
        what,
        method,
        target,
        extra: "",
        status,
        decided,
        received: if status == 200 { decided } else { None },
    }
}

fn normalization_table(m: &Mesh) {
    let cases = [
        case("plain", "GET", "/public/a", 200, Some(("GET", "/public/a"))),
        case(
            "dot-segments",
            "GET",
            "/public/../admin/x",
            403,
            Some(("GET", "/admin/x")),
        ),
        case(
            "encoded dots",
            "GET",
            "/public/%2e%2e/admin",
            403,
            Some(("GET", "/admin")),
        ),
        case(
            "encoded dots, upper case",
            "GET",
            "/public/%2E%2E/admin",
            403,
            Some(("GET", "/admin")),
        ),
        case(
            "mixed dots",
            "GET",
            "/public/.%2e/admin",
            403,
            Some(("GET", "/admin")),
        ),
        case(
            "merged slashes",
            "GET",
            "//admin",
            403,
            Some(("GET", "/admin")),
        ),
        case(
            "merged slashes, allowed",
            "GET",
            "/public//a///b",
            200,
            Some(("GET", "/public/a/b")),
        ),
        case(
            "dot-segment after merge",
            "GET",
            "/public//../admin",
            403,
            Some(("GET", "/admin")),
        ),
        case(
            "encoded unreserved",
            "GET",
            "/public/%61bc%7E",
            200,
            Some(("GET", "/public/abc~")),
        ),
        case(
            "other escapes kept, upper-cased",
            "GET",
            "/public/a%3fb",
            200,
            Some(("GET", "/public/a%3Fb")),
        ),
        case(
            "query untouched",
            "GET",
            "/public/a?x=../../admin",
            200,
            Some(("GET", "/public/a?x=../../admin")),
        ),
        case("encoded slash", "GET", "/public/..%2fadmin", 400, None),
        case(
            "encoded slash, lower case",
            "GET",
            "/public/a%2fb",
            400,
            None,
        ),
        case("encoded backslash", "GET", "/public/..%5cadmin", 400, None),
        case("raw backslash", "GET", "/public\\..\\admin", 400, None),
        case("malformed escape", "GET", "/public/%zz", 400, None),
        case(
            "lower-case method kept",
            "post",
            "/public/a",
            200,
            Some(("post", "/public/a")),
        ),
        case(
            "extension method",
            "PROPFIND",
            "/public/d",
            200,
            Some(("PROPFIND", "/public/d")),
        ),
        case(
            "lower-case method, admin",
            "get",
            "/admin",
            403,
            Some(("get", "/admin")),
        ),
        Case {
            extra: "Host: other\r\n",
            ..case("two Host headers", "GET", "/public/a", 400, None)
        },
        Case {
            extra: "Connection: x-secret\r\nX-Secret: 1\r\n",
            ..case(
                "Connection-nominated header removed before the decision",
                "GET",
                "/public/n",
                200,
                Some(("GET", "/public/n")),
            )
        },
        Case {
            extra: "X-Secret: 1\r\n",
            ..case(
                "the same header not nominated reaches the policy",
                "GET",
                "/public/n",
                403,
                Some(("GET", "/public/n")),
            )
        },
    ];
    let mut table = String::from(
        "\n| case | sent | status | policy saw | workload got |\n|---|---|---|---|---|\n",
    );
    for c in &cases {
        let before = decisions(m).len();
        let req = format!(
            "{} {} HTTP/1.1\r\nHost: vfx\r\n{}Connection: close\r\n\r\n",
            c.method, c.target, c.extra
        );
        let (status, body) = raw(m, 7005, &req);
        let after = decisions(m);
        let saw = after.get(before..).unwrap_or_default();
        let echo: Value = serde_json::from_str(&body).unwrap_or_default();
        table.push_str(&format!(
            "| {} | {} {} | {status} | {} | {} |\n",
            c.what,
            c.method,
            c.target,
            saw.iter()
                .map(|d| format!(
                    "{} {}",
                    d["method"].as_str().unwrap_or("?"),
                    d["path"].as_str().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", "),
            echo["method"].as_str().map_or("-".into(), |mth| format!(
                "{mth} {}",
                echo["target"].as_str().unwrap_or("?")
            )),
        ));
        if status != c.status {
            eprintln!(
                "A LOG:\n{}\nB LOG:\n{}",
                m.log("proxy-a.log"),
                m.log("proxy-b.log")
            );
        }
        assert_eq!(status, c.status, "{}: status{table}", c.what);
        match c.decided {
            None => assert!(
                saw.is_empty(),
                "{}: refused before the decision, yet decided{table}",
                c.what
            ),
            Some((mth, path)) => {
                assert_eq!(saw.len(), 1, "{}: one decision{table}", c.what);
                assert_eq!(
                    (saw[0]["method"].as_str(), saw[0]["path"].as_str()),
                    (Some(mth), Some(path)),
                    "{}: what the policy saw{table}",
                    c.what
                );
            }
        }
        match c.received {
            None => assert!(
                echo.is_null(),
                "{}: nothing may reach the workload{table}",
                c.what
            ),
            Some((mth, target)) => assert_eq!(
                (echo["method"].as_str(), echo["target"].as_str()),
                (Some(mth), Some(target)),
                "{}: what the workload received{table}",
                c.what
            ),
        }
    }
    println!("{table}");

    // Spoofed identity headers never reach the workload; the real caller does.
    let (status, body) = raw(
        m,
        7005,
        "GET /public/who HTTP/1.1\r\nHost: vfx\r\nX-Forwarded-Client-Cert: By=x;URI=spiffe://example.org/ns/movie/sa/admin\r\nx_forwarded_client_cert: forged\r\nX-Strait-Identity: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    let headers: Vec<(String, String)> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let xfcc: Vec<&(String, String)> = headers
        .iter()
        .filter(|(k, _)| k == "x-forwarded-client-cert")
        .collect();
    assert_eq!(xfcc.len(), 1, "{headers:?}");
    assert!(
        xfcc[0]
            .1
            .ends_with("URI=spiffe://example.org/ns/movie/sa/owner"),
        "{headers:?}"
    );
    assert!(
        !headers
            .iter()
            .any(|(k, _)| k.contains('_') || k.starts_with("x-strait-")),
        "{headers:?}"
    );
}

/// `cancels`: how many cancelled streams the server must have seen after this run.
fn grpc(m: &Mesh, port: u16, cancels: usize) {
    let b = m.net.v4("b");
    let client = format!("{}/grpc_client.py", apps());
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &[&python(), &client, &format!("{b}:{port}")],
    );
    let text = out(&o);
    let calls: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let call = |name: &str| -> &Value {
        calls
            .iter()
            .find(|c| c["call"] == name)
            .unwrap_or_else(|| panic!("port {port}: no result for {name}: {text}"))
    };
    let ctx = format!("port {port}: {text}");
    assert_eq!(call("unary")["code"], "OK", "{ctx}");
    assert_eq!(call("unary")["result"], "echo:hello", "{ctx}");
    assert_eq!(
        call("unary")["trailers"]["x-served-by"],
        "grpc-server",
        "{ctx}"
    );
    assert_eq!(call("client_stream")["result"], "a,b,c", "{ctx}");
    assert_eq!(
        call("server_stream")["result"],
        serde_json::json!(["msg-0", "msg-1", "msg-2"]),
        "{ctx}"
    );
    assert_eq!(
        call("bidi")["result"],
        serde_json::json!(["bidi:x", "bidi:y"]),
        "{ctx}"
    );
    assert_eq!(call("deadline")["code"], "DEADLINE_EXCEEDED", "{ctx}");
    assert_eq!(call("fail")["code"], "NOT_FOUND", "{ctx}");
    assert_eq!(call("fail")["details"], "no such thing", "{ctx}");
    // A client that cancels a stream: its RST_STREAM crosses both proxies and the server sees it.
    assert_eq!(
        call("cancel")["result"],
        serde_json::json!(["tick-0", "tick-1", "CANCELLED"]),
        "{ctx}"
    );
    m.net.eventually(
        Duration::from_secs(10),
        "the server to see the cancel",
        || m.log("grpc.log").matches("endless cancelled").count() >= cancels,
    );
    assert_eq!(call("denied")["code"], "PERMISSION_DENIED", "{ctx}");
    assert_eq!(
        call("denied")["details"],
        "admin paths are not part of the workflow",
        "{ctx}"
    );
    // One decision per call, with the gRPC method as the path (as OPA-Envoy gives it).
    let d = decisions(m);
    assert!(
        d.iter()
            .any(|d| d["method"] == "POST" && d["path"] == "/strait.test.Echo/Bidi"),
        "{d:?}"
    );
}

/// curl from host a as the owner, with at most 10 s: the response body as JSON (panics with curl's output
/// when it is not JSON).
fn curl_json(m: &Mesh, args: &[&str]) -> Value {
    let mut all = vec!["curl", "-s", "--max-time", "10"];
    all.extend(args);
    let o = m.net.run("a", Some(OWNER_UID), &all);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("curl {args:?}: {}", out(&o)))
}

fn http2_and_websocket(m: &Mesh) {
    let b = m.net.v4("b");
    for port in [7003, 7004] {
        // HTTP/2 end to end: the workload sees HTTP/2 and the client's authority.
        let url = format!("http://{b}:{port}/echo");
        let echo = curl_json(
            m,
            &[
                "--http2-prior-knowledge",
                "-H",
                "Host: vfx.example:7003",
                &url,
            ],
        );
        assert_eq!(echo["http_version"], "2", "port {port}: {echo}");
        assert!(
            echo["headers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h[0] == "host" && h[1] == "vfx.example:7003"),
            "port {port}: the authority must be preserved: {echo}"
        );
        // HTTP/1.1 stays HTTP/1.1.
        let echo = curl_json(m, &[&url]);
        assert_eq!(echo["http_version"], "1.1", "port {port}: {echo}");
        // Response trailers reach an HTTP/2 client (nghttp, nghttp2's client; prior knowledge).
        let o = m.net.run(
            "a",
            Some(OWNER_UID),
            &[
                "nghttp",
                "-v",
                "-t",
                "10",
                "-H",
                "te: trailers",
                &format!("http://{b}:{port}/trailers"),
            ],
        );
        let t = out(&o);
        assert!(
            t.contains("x-echo-trailer: done"),
            "port {port}: trailers lost: {t}"
        );
        // The same header sizes pass (or are refused) on HTTP/1.1 and HTTP/2: the limit is 60 KiB counted
        // as HTTP/2 counts (curl's HTTP/2 library will not send a header list over 64 KiB at all).
        for (size, want) in [(32 * 1024, "200"), (62 * 1024, "431")] {
            let header = format!("x-big: {}", "b".repeat(size));
            for h2 in [false, true] {
                let mut extra = vec!["-H", header.as_str()];
                if h2 {
                    extra.push("--http2-prior-knowledge");
                }
                let code = m.curl("a", Some(OWNER_UID), &url, &extra);
                assert_eq!(
                    code,
                    want,
                    "port {port}: a {size}-byte header over {}",
                    if h2 { "HTTP/2" } else { "HTTP/1.1" }
                );
            }
        }
        // WebSocket: decided like any request, then bytes both ways.
        let client = format!("{}/ws_client.py", apps());
        let o = m.net.run(
            "a",
            Some(OWNER_UID),
            &[&python(), &client, &format!("ws://{b}:{port}/ws")],
        );
        let t = out(&o);
        assert!(o.status.success(), "port {port}: websocket: {t}");
        assert!(
            t.contains("'echo:one'")
                && t.contains("'echo:two'")
                && t.contains("b'\\x00\\x01binary'"),
            "port {port}: {t}"
        );
    }
    let d = decisions(m);
    let ws = d
        .iter()
        .find(|d| d["path"] == "/ws")
        .expect("the WebSocket handshake was decided");
    assert_eq!(ws["method"], "GET");
    // A denied upgrade never switches.
    let code = m.curl(
        "a",
        Some(OWNER_UID),
        &format!("http://{b}:7003/admin/ws"),
        &[
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    );
    assert_eq!(code, "403");
    // An h2c upgrade offer is not an opaque tunnel: the request is answered in HTTP/1.1, decided.
    let echo = curl_json(m, &["--http2", &format!("http://{b}:7003/h2c")]);
    assert_eq!(echo["http_version"], "1.1", "{echo}");
    assert!(decisions(m).iter().any(|d| d["path"] == "/h2c"));
}

/// Connects from host a as the owner and only reads (socat -u: the client sends nothing) until the
/// connection closes, at most 40 s: what was read, and how long the connection lasted.
fn read_until_closed(m: &Mesh, port: u16) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let target = format!("TCP:{}:{port}", m.net.v4("b"));
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &["socat", "-T", "40", "-u", &target, "STDOUT"],
    );
    (o, start.elapsed())
}

fn auto_ports(m: &Mesh) {
    let b = m.net.v4("b");
    // An HTTP client idle for 5 s before its first request is still HTTP, decided per request.
    let before = decisions(m).len();
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &["sh", "-c", &format!("(sleep 5; printf 'GET /public/slow HTTP/1.1\\r\\nHost: vfx\\r\\nConnection: close\\r\\n\\r\\n') | socat -t 10 - TCP:{b}:7006")],
    );
    let t = out(&o);
    assert!(t.starts_with("HTTP/1.1 200"), "{t}");
    assert!(
        decisions(m)[before..]
            .iter()
            .any(|d| d["path"] == "/public/slow"),
        "{t}"
    );
    // A server-first protocol on an auto port: the client waits for the server, the proxy for the client;
    // the stream is closed after the detection timeout, and the log says what to do.
    let (o, took) = read_until_closed(m, 7007);
    assert!(
        (Duration::from_secs(7)..Duration::from_secs(18)).contains(&took),
        "closed after {took:?} (the detection timeout is 8 s)"
    );
    assert!(o.stdout.is_empty(), "{}", out(&o));
    assert!(m.log("proxy-b.log").contains("must be declared `tcp`"));
    // Declared tcp, it works (one decision per connection).
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &[
            "sh",
            "-c",
            &format!("(sleep 1; echo ping) | socat -t 3 - TCP:{b}:7008"),
        ],
    );
    let t = out(&o);
    assert!(t.contains("220-banner") && t.contains("ping"), "{t}");
    // A TCP stream that moves nothing for the idle timeout (15 s here) is closed.
    let (o, idle) = read_until_closed(m, 7008);
    assert!(out(&o).contains("220-banner"), "{}", out(&o));
    assert!(
        (Duration::from_secs(14)..Duration::from_secs(30)).contains(&idle),
        "closed after {idle:?}"
    );
    assert!(m
        .log("proxy-b.log")
        .contains("stream idle for the idle timeout"));
}

/// More concurrent connections between one pair than one tunnel carries streams: further tunnels open.
fn many_connections(m: &Mesh, n: usize) {
    let b = m.net.v4("b");
    let script = format!("{}/many_conns.py", apps());
    let start = Instant::now();
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &[&python(), &script, &b.to_string(), "7003", &n.to_string()],
    );
    let t = out(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(&format!("ok {n}")), "{t}");
    println!("{n} concurrent connections in {:?}: {t}", start.elapsed());
    let metrics = m.metrics("a");
    assert!(
        support::mesh::metric(&metrics, "strait_proxy_tunnels_opened", "") >= (n / 100) as u64,
        "{metrics}"
    );
}

/// A workload's RST_STREAM reaches the client as a reset (not as a stream that ended cleanly), and its
/// GOAWAY ends only that upstream connection: the caller's next requests on the same connection are served
/// on a new one, as Envoy and Linkerd do (h2load straight to this server gets 1 of 4 answered: it does not
/// reconnect after a GOAWAY). nghttp (nghttp2) and h2load are the clients; the server is the `h2` library.
fn workload_resets_and_goaway(m: &Mesh) {
    let b = m.net.v4("b");
    m.net
        .eventually(Duration::from_secs(10), "the h2 server on 7009", || {
            let o = m.net.run(
                "a",
                Some(OWNER_UID),
                &["nghttp", &format!("http://{b}:7009/ok")],
            );
            out(&o).contains("ok")
        });
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &["nghttp", "-v", &format!("http://{b}:7009/rst")],
    );
    let t = out(&o);
    assert!(
        t.contains("recv RST_STREAM"),
        "the workload's reset must reach the client: {t}"
    );
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &[
            "h2load",
            "-n",
            "4",
            "-c",
            "1",
            "-m",
            "1",
            &format!("http://{b}:7009/goaway"),
            &format!("http://{b}:7009/ok"),
        ],
    );
    let t = out(&o);
    assert!(
        t.contains("4 succeeded, 0 failed"),
        "requests after the workload's GOAWAY: {t}"
    );
    assert!(t.contains("status codes: 4 2xx"), "{t}");
}

/// Past `--max-connections` (5 200 on A) new connections are refused at once and counted; the open ones
/// keep working, and once they close the proxy carries connections again.
fn over_the_cap(m: &Mesh) {
    let b = m.net.v4("b");
    let script = format!("{}/many_conns.py", apps());
    let o = m.net.run(
        "a",
        Some(OWNER_UID),
        &[&python(), &script, &b.to_string(), "7003", "5600"],
    );
    let t = out(&o);
    assert!(t.contains("open 5600") && t.contains("failed"), "{t}");
    let refused = support::mesh::metric(
        &m.metrics("a"),
        "strait_proxy_refused_connections_total",
        "over_capacity",
    );
    assert!(refused >= 400, "refused over the cap: {refused}; {t}");
    // The burst's connections end within moments; then a new one is carried again.
    m.net
        .eventually(Duration::from_secs(15), "a request after the burst", || {
            m.curl("a", Some(OWNER_UID), &format!("http://{b}:7003/after"), &[]) == "200"
        });
}

#[test]
fn grpc_websocket_http2_and_normalized_requests_through_the_mesh() {
    if !require_root() {
        return;
    }
    support::require_commands(&["socat", "curl", "nghttp"]);
    let _ = bin();
    let m = mesh();
    normalization_table(&m);
    grpc(&m, 7001, 1);
    grpc(&m, 7002, 2);
    http2_and_websocket(&m);
    auto_ports(&m);
    workload_resets_and_goaway(&m);
    many_connections(&m, 5000);
    over_the_cap(&m);
}
