//! DNS names that egress entries may name, and the names workloads ask for.
//!
//! One place for both sides of the comparison, so the workflow validator, the proxy's DNS answerer and
//! its egress check agree on what a name is: lower case, no trailing dot, labels of letters, digits, `-`
//! and `_` (service labels such as `_grpc._tcp`), 1–63 bytes each, 253 in all (RFC 1035 §2.3.4). A
//! pattern is an exact name or `*.` followed by a name, which matches every name strictly below it (not
//! the name itself, as in TLS certificates and Envoy's `server_names`).

use std::fmt;

/// A DNS name in canonical form (see the module docs). Case-insensitive input, lower-case inside.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

/// Why a name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("an empty name")]
    Empty,
    #[error("longer than 253 bytes")]
    TooLong,
    #[error("an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("a label longer than 63 bytes")]
    LongLabel,
    #[error("{0:?} is not allowed in a DNS name (letters, digits, '-' and '_' only)")]
    BadByte(char),
    #[error("a label starts or ends with '-'")]
    Hyphen,
    #[error("'*' is only allowed as the whole first label ('*.example.com')")]
    Wildcard,
}

impl HostName {
    /// Parses a name as a person or a resolver wrote it: case is folded, one trailing dot is dropped.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 253 {
            return Err(NameError::TooLong);
        }
        for label in s.split('.') {
            check_label(label)?;
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is `zone` or lies below it.
    pub fn is_in(&self, zone: &HostName) -> bool {
        self.0 == zone.0 || self.strictly_below(zone)
    }

    fn strictly_below(&self, zone: &HostName) -> bool {
        self.0.len() > zone.0.len()
            && self.0.ends_with(zone.0.as_str())
            && self.0.as_bytes()[self.0.len() - zone.0.len() - 1] == b'.'
    }

    /// The labels before `zone`, when `self` lies strictly below it (`a.b.zone` → `a.b`).
    pub fn relative_to<'a>(&'a self, zone: &HostName) -> Option<&'a str> {
        self.strictly_below(zone)
            .then(|| &self.0[..self.0.len() - zone.0.len() - 1])
    }
}

fn check_label(label: &str) -> Result<(), NameError> {
    if label.is_empty() {
        return Err(NameError::EmptyLabel);
    }
    if label.len() > 63 {
        return Err(NameError::LongLabel);
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(if c == '*' {
            NameError::Wildcard
        } else {
            NameError::BadByte(c)
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::Hyphen);
    }
    Ok(())
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An egress entry's name: `api.example.com` (that name only) or `*.example.com` (every name below).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(HostName),
    Below(HostName),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        match s.strip_prefix("*.") {
            Some(rest) => {
                let zone = HostName::parse(rest)?;
                // `*.com` would open a whole top-level domain, a channel to anyone who buys a name in it.
                if !zone.0.contains('.') {
                    return Err(NameError::Wildcard);
                }
                Ok(Self::Below(zone))
            }
            None => HostName::parse(s).map(Self::Exact),
        }
    }

    pub fn matches(&self, name: &HostName) -> bool {
        match self {
            Self::Exact(n) => n == name,
            Self::Below(zone) => name.strictly_below(zone),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => write!(f, "{n}"),
            Self::Below(z) => write!(f, "*.{z}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_canonical() {
        assert_eq!(
            HostName::parse("API.Example.COM.").unwrap().as_str(),
            "api.example.com"
        );
        assert_eq!(
            HostName::parse("_grpc._tcp.x.io").unwrap().as_str(),
            "_grpc._tcp.x.io"
        );
        for bad in [
            "", ".", "a..b", ".a", "a b", "a/b", "-a.b", "a-.b", "é.fr", "a.*.b", "a\0b",
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(HostName::parse(&"a".repeat(64)), Err(NameError::LongLabel));
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(HostName::parse(&long), Err(NameError::TooLong));
    }

    #[test]
    fn patterns_match_what_they_say() {
        let n = |s| HostName::parse(s).unwrap();
        let exact = HostPattern::parse("api.example.com").unwrap();
        assert!(exact.matches(&n("API.example.com.")));
        assert!(!exact.matches(&n("x.api.example.com")));
        let below = HostPattern::parse("*.example.com").unwrap();
        assert!(below.matches(&n("a.example.com")));
        assert!(below.matches(&n("a.b.example.com")));
        assert!(!below.matches(&n("example.com")));
        assert!(!below.matches(&n("badexample.com")));
        assert!(HostPattern::parse("*.com").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert_eq!(below.to_string(), "*.example.com");
        let zone = n("strait.internal");
        assert_eq!(
            n("vfx.movie.strait.internal").relative_to(&zone),
            Some("vfx.movie")
        );
        assert_eq!(n("strait.internal").relative_to(&zone), None);
        assert_eq!(n("xstrait.internal").relative_to(&zone), None);
        assert!(n("strait.internal").is_in(&zone));
    }
}
