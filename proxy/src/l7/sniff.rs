//! `auto` ports: what the client's first bytes are. The rule (documented in docs/proxy.md):
//!
//! - the HTTP/2 connection preface → HTTP/2;
//! - an HTTP/1 request line (`TOKEN SP TARGET SP HTTP/1.x CRLF`) → HTTP/1;
//! - as soon as the bytes cannot begin either → TCP (one decision per connection).
//!
//! The proxy waits for the client however long it idles before its first request (up to
//! [`FIRST_BYTES_TIMEOUT`](super::FIRST_BYTES_TIMEOUT)): a slow HTTP client is never mistaken for TCP.
//! The price is that a server-first protocol (the server speaks first: SMTP, MySQL, SSH banners) cannot
//! run on an `auto` port: its client waits for the server, the proxy for the client, and the stream is
//! closed after the timeout with a log line saying to declare the port `tcp`.

use strait_policy::workflow::is_tchar;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A request line longer than this is handed to the HTTP parser, which refuses it.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Tcp,
    /// Not enough bytes to tell yet.
    NeedMore,
}

/// Classifies the first bytes a client sent.
pub fn classify(b: &[u8]) -> Sniffed {
    if b.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = b.len().min(PREFACE.len());
    if b[..n] == PREFACE[..n] {
        return if b.len() >= PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    // Only the first MAX_REQUEST_LINE bytes count, so that more bytes never change an answer.
    let window = &b[..b.len().min(MAX_REQUEST_LINE)];
    match request_line(window) {
        Sniffed::NeedMore if b.len() >= MAX_REQUEST_LINE => Sniffed::Http1,
        other => other,
    }
}

fn request_line(b: &[u8]) -> Sniffed {
    // method
    let method = b.iter().take_while(|c| is_tchar(**c)).count();
    if method == b.len() {
        return more_or_http(b);
    }
    if method == 0 || b[method] != b' ' {
        return Sniffed::Tcp;
    }
    // request target: visible ASCII up to the next space
    let rest = &b[method + 1..];
    let target = rest.iter().take_while(|c| c.is_ascii_graphic()).count();
    if target == rest.len() {
        return more_or_http(b);
    }
    if target == 0 || rest[target] != b' ' {
        return Sniffed::Tcp;
    }
    // version and line end
    let tail = &rest[target + 1..];
    const VERSION: &[u8] = b"HTTP/1.";
    let n = tail.len().min(VERSION.len());
    if tail[..n] != VERSION[..n] {
        return Sniffed::Tcp;
    }
    if tail.len() <= VERSION.len() {
        return more_or_http(b);
    }
    if !tail[VERSION.len()].is_ascii_digit() {
        return Sniffed::Tcp;
    }
    match &tail[VERSION.len() + 1..] {
        [] | [b'\r'] => more_or_http(b),
        [b'\r', b'\n', ..] | [b'\n', ..] => Sniffed::Http1,
        _ => Sniffed::Tcp,
    }
}

fn more_or_http(_: &[u8]) -> Sniffed {
    Sniffed::NeedMore
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_recognised_byte_by_byte() {
        for full in [
            &b"GET /api HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROPFIND /d HTTP/1.1\r\n",
            b"post / HTTP/1.0\n",
        ] {
            let end = full.iter().position(|c| *c == b'\n').unwrap();
            for i in 1..=end {
                assert_eq!(classify(&full[..i]), Sniffed::NeedMore, "{:?}", &full[..i]);
            }
            assert_eq!(classify(&full[..=end]), Sniffed::Http1);
        }
        for i in 1..PREFACE.len() {
            assert_eq!(classify(&PREFACE[..i]), Sniffed::NeedMore);
        }
        assert_eq!(classify(PREFACE), Sniffed::Http2);
    }

    #[test]
    fn other_protocols_are_tcp_as_soon_as_it_shows() {
        for b in [
            &b"\x16\x03\x01\x02\x00"[..],        // TLS ClientHello
            b"*1\r\n$4\r\nPING\r\n",             // Redis
            b"SET k v\r\n",                      // Redis inline: no HTTP version
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"SSH-2.0-OpenSSH\r\n",
            b"GET /x HTTP/2.0\r\n",
            b"GET  /x",
            b"PRI * HTTP/2.0\r\n\r\nXX",
        ] {
            assert_eq!(
                classify(b),
                Sniffed::Tcp,
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        assert_eq!(classify(b""), Sniffed::NeedMore);
        let long = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE]].concat();
        assert_eq!(classify(&long), Sniffed::Http1);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Once the first bytes are classified, more bytes never change the answer: the sniffer may decide
        /// on however much arrived first.
        #[test]
        fn a_classification_never_changes_with_more_bytes(
            head in prop_oneof![
                Just(b"GET /a HTTP/1.1\r\n".to_vec()),
                Just(PREFACE.to_vec()),
                any::<Vec<u8>>(),
            ],
            cut in 0usize..64,
            more in any::<Vec<u8>>(),
        ) {
            let cut = cut.min(head.len());
            let first = classify(&head[..cut]);
            let all = [&head[..], &more[..]].concat();
            if first != Sniffed::NeedMore {
                prop_assert_eq!(classify(&all), first);
            }
        }
    }
}
