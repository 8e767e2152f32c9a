//! A decision made straight from the workflow, in plain Rust: the reference the compiled Rego is tested
//! against (property tests generate workflows and requests and require the same answers).

use std::collections::BTreeMap;

use crate::workflow::{canonical_method, Workflow};

/// What the reference needs to know about a request.
#[derive(Debug, Clone)]
pub struct RefRequest {
    pub source: String,
    pub destination: String,
    /// `None` for a TCP connection.
    pub http: Option<RefHttp>,
    /// The destination port (what `tcp: [ports]` is checked against).
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct RefHttp {
    pub method: String,
    /// Path, possibly with a query string.
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
}

/// Glob matching with `/` as separator, as OPA's `glob.match(pattern, ["/"], s)`: `**` matches anything,
/// `*` anything but `/`, `?` one character but `/`.
pub fn glob(pattern: &str, s: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| go(rest, &s[i..])),
            [b'*', rest @ ..] => {
                let max = s.iter().position(|&c| c == b'/').unwrap_or(s.len());
                (0..=max).any(|i| go(rest, &s[i..]))
            }
            [b'?', rest @ ..] => matches!(s, [c, ..] if *c != b'/') && go(rest, &s[1..]),
            [c, rest @ ..] => matches!(s, [d, ..] if d == c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), s.as_bytes())
}

/// The decision, or `None` when it would depend on a time window (the reference has no clock).
pub fn decide(wf: &Workflow, req: &RefRequest) -> Option<bool> {
    let ids = wf.service_ids().ok()?;
    let mut allowed = false;
    for step in &wf.steps {
        if ids.get(&step.from) != Some(&req.source) || ids.get(&step.to) != Some(&req.destination) {
            continue;
        }
        let Some(http) = &req.http else {
            allowed |= step.tcp.contains(&req.port);
            continue;
        };
        // A TCP-only step allows no request.
        if !step.tcp.is_empty()
            && step.methods.is_empty()
            && step.paths.is_empty()
            && step.when.is_none()
        {
            continue;
        }
        let method_ok = step.methods.is_empty()
            || step
                .methods
                .iter()
                .any(|m| canonical_method(m).as_deref() == Some(http.method.as_str()));
        let path = http.path.split('?').next().unwrap_or_default();
        let path_ok = step.paths.is_empty() || step.paths.iter().any(|p| glob(p, path));
        let cond = step.when.clone().unwrap_or_default();
        let headers_ok = cond
            .headers
            .iter()
            .all(|(name, want)| match http.headers.get(name) {
                Some(v) => want == "*" || v == want,
                None => false,
            });
        if method_ok && path_ok && headers_ok {
            if cond.time_window.is_some() {
                return None;
            }
            allowed = true;
        }
    }
    Some(allowed)
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_semantics() {
        assert!(glob("/api/*", "/api/x"));
        assert!(!glob("/api/*", "/api/x/y"));
        assert!(glob("/api/**", "/api/x/y"));
        assert!(glob("/a?c", "/abc"));
        assert!(!glob("/a?c", "/a/c"));
        assert!(glob("/api/*/items", "/api/v1/items"));
        assert!(glob("/x*y", "/xy"));
    }
}
