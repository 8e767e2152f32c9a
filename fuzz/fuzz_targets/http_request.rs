//! The HTTP → policy input path of the destination proxy: an HTTP/1.x request head as hyper would hand it
//! over (parsed by httparse, which hyper uses), through `l7::prepare` (path normalization, header
//! cleaning, Host checks) into the policy input. The first byte picks the per-port options and whether
//! the request is treated as HTTP/2. Beyond "never panics", it checks what the proxy promises: the path
//! the policy sees is already normalized (normalizing it again changes nothing), no identity header a
//! client could forge survives, and names with `_` survive only when the port allows them.
#![no_main]

use http::{HeaderName, HeaderValue, Method, Request, Version};
use libfuzzer_sys::fuzz_target;
use strait_policy::input::{http_input_value, Peers};
use strait_proxy::authz::peer;
use strait_proxy::l7::{normalize, prepare, sniff};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let _ = sniff::classify(head);
    let opts = normalize::Options {
        allow_escaped_slashes: flags & 1 != 0,
        allow_underscore_headers: flags & 2 != 0,
    };
    let http1 = flags & 4 == 0;
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(head) else {
        return;
    };
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = target.parse::<http::Uri>() else {
        return;
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = match (http1, parsed.version) {
        (false, _) => Version::HTTP_2,
        (true, Some(0)) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    for h in parsed.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    let Ok(p) = prepare(&mut req, http1, opts) else {
        return;
    };
    let path = p.input.path.split('?').next().unwrap_or_default();
    if path != "*" {
        let again = normalize::path(path, opts).expect("a decided path normalizes again");
        assert_eq!(again, path, "the decided path is not normalized");
    }
    for name in req.headers().keys() {
        let n = name.as_str();
        assert!(
            n != "x-forwarded-client-cert" && !n.starts_with("x-strait-"),
            "{n} survived"
        );
        assert!(
            opts.allow_underscore_headers || !n.contains('_'),
            "{n} survived"
        );
    }
    let peers = Peers::new(
        peer(
            Some("10.0.0.1:40000".parse().unwrap()),
            "spiffe://a.example/ns/a/sa/a",
        ),
        peer(
            Some("10.0.0.2:8080".parse().unwrap()),
            "spiffe://a.example/ns/b/sa/b",
        ),
    );
    let _ = http_input_value(&peers, &p.input);
});
