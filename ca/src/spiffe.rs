//! SPIFFE IDs and trust domains, validated on construction.
//!
//! The rules are those of the SPIFFE ID specification (§2): the scheme is exactly `spiffe://`, the trust
//! domain is a non-empty string of lower-case letters, digits, `.`, `-` and `_`, the path is a sequence of
//! `/segment` where a segment is non-empty, is not `.` or `..`, and uses only letters, digits, `.`, `-` and
//! `_` (so percent-encoding, queries, fragments, ports and user info are all impossible), with no trailing
//! `/`, and the whole ID is at most 2048 bytes. A value of these types is always valid: there is no way to
//! build one that is not.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID, in bytes, that the specification requires implementations to accept; longer IDs
/// are refused rather than truncated.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error(
        "the trust domain may contain only lower-case letters, digits, '.', '-' and '_' (found {0:?})"
    )]
    BadTrustDomainChar(char),
    #[error("a path segment is empty (a doubled or trailing '/')")]
    EmptySegment,
    #[error("a path segment may not be '.' or '..'")]
    DotSegment,
    #[error("a path segment may contain only letters, digits, '.', '-' and '_' (found {0:?})")]
    BadPathChar(char),
    #[error("the SPIFFE ID is {0} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("a workload or node identity needs a path after the trust domain")]
    MissingPath,
}

fn is_td_char(c: u8) -> bool {
    matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_')
}

/// The first offending character of `s` at byte `at`, for error messages (never splits a UTF-8 sequence).
fn char_at(s: &str, at: usize) -> char {
    s[at..].chars().next().unwrap_or('\u{fffd}')
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if let Some(i) = td.bytes().position(|b| !is_td_char(b)) {
        return Err(SpiffeIdError::BadTrustDomainChar(char_at(td, i)));
    }
    Ok(())
}

fn check_segment(seg: &str) -> Result<(), SpiffeIdError> {
    if seg.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    if let Some(i) = seg.bytes().position(|b| !is_path_char(b)) {
        return Err(SpiffeIdError::BadPathChar(char_at(seg, i)));
    }
    Ok(())
}

/// A SPIFFE trust domain such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or the trust domain's own ID (`spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        check_trust_domain(name)?;
        if SCHEME.len() + name.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(SCHEME.len() + name.len()));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>` (used as the URI SAN of CA certificates).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// What a SPIFFE ID names, by Strait's conventions (see `DESIGN.md`, "Identity").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind<'a> {
    /// `spiffe://TD/ns/<namespace>/sa/<service-account>`, the Istio-compatible workload form.
    Workload {
        namespace: &'a str,
        service_account: &'a str,
    },
    /// `spiffe://TD/node/<name>`: a node proxy.
    Node { name: &'a str },
    /// Any other valid SPIFFE ID (accepted for verification, never issued by Strait's control plane).
    Other,
}

/// A SPIFFE ID that has a path: `spiffe://<trust-domain>/<segment>[/<segment>…]`.
///
/// SVIDs always name a workload or node, never a bare trust domain, so the path is required; the trust
/// domain's own ID is [`TrustDomain::id_string`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI, kept as one string so that comparisons and `as_str` cost nothing.
    uri: String,
    /// Byte offset of the path's leading `/` in `uri`.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        // `path` starts with '/', so the first split item is the empty string before it.
        path[1..].split('/').try_for_each(check_segment)?;
        Ok(Self {
            uri: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds an ID from a trust domain and path segments, validating each segment.
    pub fn from_segments<'a>(
        td: &TrustDomain,
        segments: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, SpiffeIdError> {
        let mut uri = td.id_string();
        let path_start = uri.len();
        for seg in segments {
            check_segment(seg)?;
            uri.push('/');
            uri.push_str(seg);
        }
        if uri.len() == path_start {
            return Err(SpiffeIdError::MissingPath);
        }
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(uri.len()));
        }
        Ok(Self { uri, path_start })
    }

    /// `spiffe://TD/ns/<namespace>/sa/<service_account>`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, ["ns", namespace, "sa", service_account])
    }

    /// `spiffe://TD/node/<name>`.
    pub fn node(td: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        Self::from_segments(td, ["node", name])
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain name, without the scheme.
    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, with its leading `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    pub fn kind(&self) -> IdKind<'_> {
        let mut segs = self.path()[1..].split('/');
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                IdKind::Workload {
                    namespace,
                    service_account,
                }
            }
            (Some("node"), Some(name), None, None, None) => IdKind::Node { name },
            _ => IdKind::Other,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_workload_and_node_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain_str(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(
            id.kind(),
            IdKind::Workload {
                namespace: "default",
                service_account: "web"
            }
        );
        let node = SpiffeId::parse("spiffe://td/node/host-a").unwrap();
        assert_eq!(node.kind(), IdKind::Node { name: "host-a" });
        assert_eq!(
            SpiffeId::parse("spiffe://td/a/b/c").unwrap().kind(),
            IdKind::Other
        );
    }

    #[test]
    fn refuses_each_rule_with_its_own_error() {
        use SpiffeIdError::*;
        let cases = [
            ("http://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:///a", EmptyTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://exa mple/a", BadTrustDomainChar(' ')),
            ("spiffe://td:443/a", BadTrustDomainChar(':')),
            ("spiffe://user@td/a", BadTrustDomainChar('@')),
            ("spiffe://td", MissingPath),
            ("spiffe://td/", EmptySegment),
            ("spiffe://td/a/", EmptySegment),
            ("spiffe://td//a", EmptySegment),
            ("spiffe://td/./a", DotSegment),
            ("spiffe://td/a/..", DotSegment),
            ("spiffe://td/a%20b", BadPathChar('%')),
            ("spiffe://td/a?x=1", BadPathChar('?')),
            ("spiffe://td/a#f", BadPathChar('#')),
            ("spiffe://td/é", BadPathChar('é')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
    }

    #[test]
    fn length_limit_is_inclusive() {
        let base = "spiffe://td/";
        let ok = format!("{base}{}", "a".repeat(MAX_SPIFFE_ID_LEN - base.len()));
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("{ok}a");
        assert_eq!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::TooLong(MAX_SPIFFE_ID_LEN + 1))
        );
    }

    #[test]
    fn builders_validate_segments() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            SpiffeId::workload(&td, "ns1", "sa1").unwrap().as_str(),
            "spiffe://example.org/ns/ns1/sa/sa1"
        );
        assert_eq!(
            SpiffeId::workload(&td, "a/b", "x"),
            Err(SpiffeIdError::BadPathChar('/'))
        );
        assert_eq!(SpiffeId::node(&td, ".."), Err(SpiffeIdError::DotSegment));
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
    }
}
