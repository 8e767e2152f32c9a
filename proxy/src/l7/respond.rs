//! Answers the proxy gives itself: denials, refusals before a decision, and workload failures — as HTTP
//! statuses, or for gRPC calls as gRPC statuses (a Trailers-Only response: HTTP 200 with `grpc-status`
//! and `grpc-message`), so that a denied call reaches a gRPC client as `PERMISSION_DENIED` with the reason
//! instead of an `UNAVAILABLE` made up from an HTTP error.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use strait_policy::engine::Decision;

/// Responses to the client: made here, or the workload's streamed through.
pub type Body = Either<Full<Bytes>, Incoming>;

const DENY_REASON: HeaderName = HeaderName::from_static("x-strait-deny-reason");

/// Whether a request is a gRPC call (what its answers must be).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for an HTTP status, as gRPC maps them (grpc/doc/http-grpc-status-mapping.md).
fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded: bytes outside 0x20–0x7E and `%` itself (gRPC over HTTP/2 spec).
fn grpc_message(msg: &str) -> HeaderValue {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(out).unwrap_or_else(|_| HeaderValue::from_static("denied"))
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn grpc(status: StatusCode, reason: &str) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::new())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(u16::from(grpc_code(status))),
    );
    h.insert(
        HeaderName::from_static("grpc-message"),
        grpc_message(reason),
    );
    r
}

/// A refusal made by the proxy (no workload involved): `reason` in the body (or `grpc-message`) and in
/// `x-strait-deny-reason`.
pub fn refuse(status: StatusCode, reason: &str, grpc_call: bool) -> Response<Body> {
    let mut r = if grpc_call {
        grpc(status, reason)
    } else {
        text(status, format!("{reason}\n"))
    };
    if let Ok(v) = HeaderValue::try_from(reason) {
        r.headers_mut().insert(DENY_REASON, v);
    }
    r
}

/// A policy denial: the decision's status, headers and body, with the reason.
pub fn deny(d: &Decision, grpc_call: bool) -> Response<Body> {
    let status = StatusCode::from_u16(d.http_status).unwrap_or(StatusCode::FORBIDDEN);
    let mut r = if grpc_call {
        grpc(status, &d.reason)
    } else {
        text(
            status,
            d.body
                .clone()
                .unwrap_or_else(|| format!("denied by strait: {}\n", d.reason)),
        )
    };
    for (k, v) in &d.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    if let Ok(v) = HeaderValue::try_from(d.reason.as_str()) {
        r.headers_mut().insert(DENY_REASON, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_denials_carry_a_grpc_status() {
        let d = Decision::deny("no step allows /pkg.S/M — 100%", std::time::Duration::ZERO);
        let r = deny(&d, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(
            r.headers()["grpc-message"],
            "no step allows /pkg.S/M %E2%80%94 100%25"
        );
        let r = deny(&d, false);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(grpc_code(StatusCode::BAD_GATEWAY), 14);
        assert_eq!(grpc_code(StatusCode::UNAUTHORIZED), 16);
    }
}
