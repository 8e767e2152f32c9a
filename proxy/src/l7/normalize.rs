//! What a request looks like once the proxy has normalized it: the form the policy decides on and the
//! workload receives, byte for byte. Nothing here does I/O, so it is tested (and fuzzed) as pure functions.
//!
//! Paths (Envoy's `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action` are the
//! reference; RFC 3986 §6.2.2):
//! 1. the path must be origin-form (`/…`); a raw `\` or a malformed `%` escape → refused;
//! 2. `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded; `%2F` and `%5C` (encoded `/`
//!    and `\`) → refused, unless the port allows them (kept, upper-cased); other escapes are kept,
//!    upper-cased;
//! 3. runs of `/` are merged into one (before dot-segments, as file systems and nginx read `//`);
//! 4. dot-segments are removed (RFC 3986 §5.2.4), so `/a/%2e%2e/b` is `/b`.
//!
//! The result is idempotent: normalizing it again gives it back, so a workload that normalizes as well
//! serves exactly the path that was decided. The query string is left as sent.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Why a request is refused before any decision (answered 400, or 431 for the limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NotOriginForm,
    Backslash,
    EncodedSlash,
    BadEscape,
    BadPathByte,
    DuplicateHost,
    HostMismatch,
    MissingHost,
    TooManyHeaders,
    HeadersTooLarge,
}

impl Reject {
    pub fn status(self) -> http::StatusCode {
        match self {
            Reject::TooManyHeaders | Reject::HeadersTooLarge => {
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            _ => http::StatusCode::BAD_REQUEST,
        }
    }

    /// The reason given to the client and logged (a bounded label set for metrics too).
    pub fn reason(self) -> &'static str {
        match self {
            Reject::NotOriginForm => "the request target must be a path starting with /",
            Reject::Backslash => "backslashes are not allowed in paths",
            Reject::EncodedSlash => {
                "encoded / or \\ (%2F, %5C) in the path are refused on this port"
            }
            Reject::BadEscape => "malformed percent-encoding in the path",
            Reject::BadPathByte => "the path has a character that must be percent-encoded",
            Reject::DuplicateHost => "more than one Host header",
            Reject::HostMismatch => "the Host header and :authority differ",
            Reject::MissingHost => "an HTTP/1.1 request needs a Host header",
            Reject::TooManyHeaders => "too many request headers",
            Reject::HeadersTooLarge => "request headers too large",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Reject::NotOriginForm => "not_origin_form",
            Reject::Backslash => "backslash",
            Reject::EncodedSlash => "encoded_slash",
            Reject::BadEscape => "bad_escape",
            Reject::BadPathByte => "bad_path_byte",
            Reject::DuplicateHost => "duplicate_host",
            Reject::HostMismatch => "host_mismatch",
            Reject::MissingHost => "missing_host",
            Reject::TooManyHeaders => "too_many_headers",
            Reject::HeadersTooLarge => "headers_too_large",
        }
    }
}

/// Per-port choices that weaken the defaults (see `PortSpec`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub allow_escaped_slashes: bool,
    pub allow_underscore_headers: bool,
}

/// Header limits, the same for HTTP/1.1 and HTTP/2 (Envoy's defaults): at most this many fields, and at
/// most this many bytes counted as HTTP/2 counts a header list (name + value + 32 per field, RFC 9113
/// §6.5.2), pseudo-headers excluded.
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADER_LIST_BYTES: usize = 60 * 1024;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` minus `%` (handled apart) plus `/`: what may stand unencoded in a path.
fn path_byte(b: u8) -> bool {
    unreserved(b) || b"!$&'()*+,;=:@/".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes a path (without its query). Borrowed when it is already normal (the common case).
pub fn path(raw: &str, opts: Options) -> Result<Cow<'_, str>, Reject> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(Reject::NotOriginForm);
    }
    // Fast path: nothing to decode, no `//`, no dot-segment.
    let mut simple = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return Err(Reject::Backslash),
            b'%' => simple = false,
            b'/' if b.get(i + 1) == Some(&b'/') => simple = false,
            b'.' if b[i - 1] == b'/' => simple = false,
            c if !path_byte(c) => return Err(Reject::BadPathByte),
            _ => {}
        }
    }
    if simple {
        return Ok(Cow::Borrowed(raw));
    }
    // 1–2: escapes.
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'%' {
            decoded.push(c);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Reject::BadEscape);
        };
        let v = h << 4 | l;
        if unreserved(v) {
            decoded.push(v);
        } else if matches!(v, b'/' | b'\\') && !opts.allow_escaped_slashes {
            return Err(Reject::EncodedSlash);
        } else {
            decoded.push(b'%');
            decoded.extend_from_slice(format!("{v:02X}").as_bytes());
        }
        i += 3;
    }
    // 3: merged slashes.
    decoded.dedup_by(|a, b| *a == b'/' && *b == b'/');
    // 4: dot-segments, segment by segment (the path starts with `/` and has no empty segment now).
    let mut out: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split(|&c| c == b'/') {
        trailing_slash = false;
        match seg {
            b"." => trailing_slash = true,
            b".." => {
                out.pop();
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut norm = Vec::with_capacity(decoded.len());
    for seg in &out {
        norm.push(b'/');
        norm.extend_from_slice(seg);
    }
    if norm.is_empty() || trailing_slash {
        norm.push(b'/');
    }
    // Only ASCII went in and only ASCII was decoded.
    String::from_utf8(norm)
        .map(Cow::Owned)
        .map_err(|_| Reject::BadPathByte)
}

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the legacy ones proxies see), never forwarded.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "http2-settings"
    )
}

/// What the request headers said about the connection, before they were cleaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionInfo {
    /// An HTTP/1.1 `Upgrade: websocket` with `Connection: upgrade`: kept, and the request may become a
    /// WebSocket once decided and answered 101.
    pub websocket: bool,
}

fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Cleans request headers in place: hop-by-hop fields and those a `Connection` header nominates removed
/// (`te: trailers` kept: gRPC needs it end to end), a WebSocket upgrade kept in its canonical form, the
/// identity headers only the proxy may set (`x-forwarded-client-cert`, `x-strait-*`) removed, names with
/// `_` dropped unless the port allows them. Then the limits are checked on what remains.
pub fn request_headers(
    headers: &mut HeaderMap,
    http1: bool,
    opts: Options,
) -> Result<ConnectionInfo, Reject> {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Reject::DuplicateHost);
    }
    let mut info = ConnectionInfo::default();
    let mut nominated: Vec<HeaderName> = Vec::new();
    let mut connection_upgrade = false;
    for v in headers.get_all(header::CONNECTION) {
        for t in tokens(v) {
            if t.eq_ignore_ascii_case("upgrade") {
                connection_upgrade = true;
            } else if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                // A nomination never removes the Host: the target must stay what was decided.
                if n != header::HOST {
                    nominated.push(n);
                }
            }
        }
    }
    if http1 && connection_upgrade {
        let mut upgrades = headers.get_all(header::UPGRADE).iter().flat_map(tokens);
        info.websocket = upgrades
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case("websocket"))
            && upgrades.next().is_none();
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case("trailers"));
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let remove: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let n = k.as_str();
            hop_by_hop(n)
                || n == "x-forwarded-client-cert"
                || n.starts_with("x-strait-")
                || (!opts.allow_underscore_headers && n.contains('_'))
        })
        .cloned()
        .chain(nominated)
        .collect();
    for k in remove {
        headers.remove(k);
    }
    if chunked {
        // Chunked framing wins over a Content-Length (RFC 9112 §6.3); the body is re-framed upstream.
        headers.remove(header::CONTENT_LENGTH);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if info.websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    check_limits(headers)?;
    Ok(info)
}

/// The header limits, on a header map (pseudo-headers are not in it).
pub fn check_limits(headers: &HeaderMap) -> Result<(), Reject> {
    if headers.len() > MAX_HEADERS {
        return Err(Reject::TooManyHeaders);
    }
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    if size > MAX_HEADER_LIST_BYTES {
        return Err(Reject::HeadersTooLarge);
    }
    Ok(())
}

/// Cleans response headers in place: hop-by-hop fields and those `Connection` nominates removed, except
/// the `Connection`/`Upgrade` pair of a 101 answering a WebSocket upgrade.
pub fn response_headers(headers: &mut HeaderMap, switching_to_websocket: bool) {
    let nominated: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let remove: Vec<HeaderName> = headers
        .keys()
        .filter(|k| hop_by_hop(k.as_str()))
        .cloned()
        .chain(nominated)
        .collect();
    for k in remove {
        headers.remove(k);
    }
    if switching_to_websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Reject> {
        path(p, Options::default()).map(Cow::into_owned)
    }

    #[test]
    fn paths_normalize_like_rfc_3986() {
        for (raw, want) in [
            ("/", "/"),
            ("/api/vfx", "/api/vfx"),
            ("/api/vfx/", "/api/vfx/"),
            ("/api/./vfx", "/api/vfx"),
            ("/api/vfx/../admin", "/api/admin"),
            ("/api/vfx/..", "/api/"),
            ("/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2e/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("//api///vfx", "/api/vfx"),
            ("/api//../admin", "/admin"),
            ("/%61pi/%7Efile", "/api/~file"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a/.../b", "/a/.../b"),
            ("/a/.b/c", "/a/.b/c"),
            ("/a/b/.", "/a/b/"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
            // Idempotent.
            assert_eq!(norm(want).as_deref(), Ok(want), "{want}");
        }
    }

    #[test]
    fn dangerous_paths_are_refused() {
        assert_eq!(norm("/a%2fb"), Err(Reject::EncodedSlash));
        assert_eq!(norm("/a%2Fb"), Err(Reject::EncodedSlash));
        assert_eq!(norm("/a%5cb"), Err(Reject::EncodedSlash));
        assert_eq!(norm("/a\\b"), Err(Reject::Backslash));
        assert_eq!(norm("/a%zz"), Err(Reject::BadEscape));
        assert_eq!(norm("/a%4"), Err(Reject::BadEscape));
        assert_eq!(norm("a/b"), Err(Reject::NotOriginForm));
        assert_eq!(norm("*"), Err(Reject::NotOriginForm));
        assert_eq!(norm("/a b"), Err(Reject::BadPathByte));
        assert_eq!(norm("/é"), Err(Reject::BadPathByte));
        let weak = Options {
            allow_escaped_slashes: true,
            ..Default::default()
        };
        assert_eq!(path("/a%2fb/../c", weak).as_deref(), Ok("/c"));
        assert_eq!(path("/a%2fb", weak).as_deref(), Ok("/a%2Fb"));
        assert_eq!(path("/a\\b", weak), Err(Reject::Backslash));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn request_headers_are_cleaned() {
        let mut h = map(&[
            ("host", "vfx"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "300"),
            ("te", "trailers, deflate"),
            (
                "x-forwarded-client-cert",
                "By=spiffe://x;URI=spiffe://forged",
            ),
            ("x-strait-deny-reason", "none"),
            ("x_forwarded_client_cert", "forged"),
            ("x-case", "7"),
        ]);
        let info = request_headers(&mut h, true, Options::default()).unwrap();
        assert!(!info.websocket);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-case", "te"]);
        assert_eq!(h["te"], "trailers");

        let mut h = map(&[("host", "a"), ("host", "b")]);
        assert_eq!(
            request_headers(&mut h, true, Options::default()),
            Err(Reject::DuplicateHost)
        );
        let mut h = map(&[("host", "a"), ("x_y", "1")]);
        request_headers(
            &mut h,
            true,
            Options {
                allow_underscore_headers: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(h.contains_key("x_y"));
        // Nominating Host does not remove it.
        let mut h = map(&[("host", "a"), ("connection", "host")]);
        request_headers(&mut h, true, Options::default()).unwrap();
        assert_eq!(h["host"], "a");
        // Chunked wins over Content-Length.
        let mut h = map(&[
            ("host", "a"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
        ]);
        request_headers(&mut h, true, Options::default()).unwrap();
        assert!(h.is_empty() || !h.contains_key("content-length"));
    }

    #[test]
    fn websocket_upgrades_are_recognised_and_kept() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", "k"),
        ]);
        let info = request_headers(&mut h, true, Options::default()).unwrap();
        assert!(info.websocket);
        assert_eq!(
            (&h["connection"], &h["upgrade"]),
            (
                &"upgrade".parse::<HeaderValue>().unwrap(),
                &"websocket".parse::<HeaderValue>().unwrap()
            )
        );
        // h2c (or anything else) is not: the offer is dropped and the request is plain HTTP/1.1.
        let mut h = map(&[
            ("host", "a"),
            ("connection", "upgrade, http2-settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        let info = request_headers(&mut h, true, Options::default()).unwrap();
        assert!(!info.websocket);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn limits_are_counted_like_http2() {
        let mut h = HeaderMap::new();
        for i in 0..MAX_HEADERS {
            h.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert_eq!(check_limits(&h), Ok(()));
        h.insert("x-one-more", HeaderValue::from_static("v"));
        assert_eq!(check_limits(&h), Err(Reject::TooManyHeaders));
        let big = "a".repeat(MAX_HEADER_LIST_BYTES - 32 - "x-big".len());
        let h = map(&[("x-big", &big)]);
        assert_eq!(check_limits(&h), Ok(()));
        let h = map(&[("x-big", &format!("{big}a"))]);
        assert_eq!(check_limits(&h), Err(Reject::HeadersTooLarge));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever a client sends: no panic; what comes out is origin-form, has no empty or dot segment,
        /// no encoded slash, and normalizing it again changes nothing (what the workload may normalize
        /// itself is what was decided).
        #[test]
        fn normalized_paths_are_canonical(raw in "/[a-z./%25%2e%2E%2f%5c\\\\0-9A-F_~-]{0,40}") {
            if let Ok(p) = path(&raw, Options::default()) {
                prop_assert!(p.starts_with('/'));
                prop_assert!(!p.contains("//"), "{p}");
                prop_assert!(!p.split('/').any(|s| s == "." || s == ".."), "{p}");
                let lower = p.to_ascii_lowercase();
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"), "{p}");
                prop_assert!(!p.contains('\\'));
                let again = path(&p, Options::default()).map(Cow::into_owned);
                prop_assert_eq!(again, Ok(p.to_string()));
            }
        }

        #[test]
        fn any_bytes_are_handled(raw in any::<Vec<u8>>()) {
            if let Ok(s) = std::str::from_utf8(&raw) {
                let _ = path(s, Options::default());
                let _ = path(s, Options { allow_escaped_slashes: true, allow_underscore_headers: true });
            }
        }
    }
}
