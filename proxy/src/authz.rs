//! Authorization in the proxy: the current policy bundle (swapped atomically on reload, so a request sees
//! the old policy or the new one, never a mix), decisions, and the decision log.
//!
//! Fail closed: with no policy loaded every request and connection is denied.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use strait_policy::bundle::Bundle;
use strait_policy::engine::{Decision, PolicyEngine, DEFAULT_BUDGET};
use strait_policy::input::{http_input_value, tcp_input_value, HttpRequest, Peer, Peers};
use tracing::{error, info, warn};

/// A loaded bundle.
pub struct LoadedPolicy {
    pub engine: PolicyEngine,
    pub revision: String,
    pub dry_run: bool,
    /// Whether the bundle carries a compiled workflow (and so the `reachable` rule for egress checks).
    pub has_workflow: bool,
    /// The workflow's `egress` entries: destinations outside the mesh each source may reach.
    pub egress: std::collections::HashMap<String, Vec<crate::tunnel::EgressRule>>,
    /// The workflow's `egress` entries by DNS name (`host:`), per source.
    pub egress_hosts: std::collections::HashMap<String, Vec<crate::dns::HostRule>>,
    /// (source, destination) pairs that some step connects: the compiled workflow's
    /// `data.strait_workflow.flows[source][destination]`, read once here so the per-connection egress
    /// check is a set lookup instead of a Rego evaluation (same answer as `strait.workflow.reachable`).
    pub reachable: std::collections::HashSet<(String, String)>,
}

impl LoadedPolicy {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::from_bundle(Bundle::load(path)?)
    }

    /// Compiles a bundle (from a file or pushed by the distributor).
    pub fn from_bundle(bundle: Bundle) -> anyhow::Result<Self> {
        let engine = bundle.engine(DEFAULT_BUDGET)?;
        let mut egress: std::collections::HashMap<String, Vec<crate::tunnel::EgressRule>> =
            Default::default();
        let mut egress_hosts: std::collections::HashMap<String, Vec<crate::dns::HostRule>> =
            Default::default();
        if let Some(by_source) = bundle
            .data
            .pointer("/strait_workflow/egress")
            .and_then(serde_json::Value::as_object)
        {
            for (source, entries) in by_source {
                for e in entries.as_array().into_iter().flatten() {
                    let port = e
                        .get("port")
                        .and_then(serde_json::Value::as_u64)
                        .map(|p| {
                            u16::try_from(p).map_err(|_| {
                                anyhow::anyhow!(
                                    "workflow egress entry for {source}: port {p} out of range"
                                )
                            })
                        })
                        .transpose()?;
                    if let Some(host) = e.get("host").and_then(serde_json::Value::as_str) {
                        let pattern =
                            strait_policy::hostname::HostPattern::parse(host).map_err(|m| {
                                anyhow::anyhow!("workflow egress entry for {source}: {host:?}: {m}")
                            })?;
                        egress_hosts
                            .entry(source.clone())
                            .or_default()
                            .push(crate::dns::HostRule { pattern, port });
                        continue;
                    }
                    let cidr = e
                        .get("cidr")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default();
                    let spec = match e.get("port").and_then(serde_json::Value::as_u64) {
                        Some(p) if cidr.contains(':') => format!("[{cidr}]:{p}"),
                        Some(p) => format!("{cidr}:{p}"),
                        None => cidr.to_owned(),
                    };
                    let rule = crate::tunnel::EgressRule::parse(&spec)
                        .map_err(|m| anyhow::anyhow!("workflow egress entry for {source}: {m}"))?;
                    egress.entry(source.clone()).or_default().push(rule);
                }
            }
        }
        let reachable = bundle
            .data
            .pointer("/strait_workflow/flows")
            .and_then(serde_json::Value::as_object)
            .into_iter()
            .flatten()
            .flat_map(|(src, dsts)| {
                dsts.as_object()
                    .into_iter()
                    .flat_map(|d| d.keys())
                    .map(move |dst| (src.clone(), dst.clone()))
            })
            .collect();
        Ok(Self {
            revision: bundle.manifest.revision.clone(),
            dry_run: bundle.dry_run(),
            has_workflow: bundle.data.get("strait_workflow").is_some(),
            engine,
            egress,
            egress_hosts,
            reachable,
        })
    }
}

pub struct Authz {
    current: ArcSwapOption<LoadedPolicy>,
    /// Log one allowed decision in this many (0: none). Denials are always logged.
    allow_sample: u64,
    counter: AtomicU64,
}

/// The outcome the data path acts on.
pub struct Verdict {
    pub decision: Decision,
    /// Allowed only because the bundle is in dry-run mode.
    pub dry_run_allowed: bool,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.decision.allowed || self.dry_run_allowed
    }
}

/// A request id for the input and the decision log: unique enough to correlate, not a secret (a
/// thread-local generator, no system call per request).
fn request_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

impl Authz {
    pub fn new(initial: Option<LoadedPolicy>, allow_sample: u64) -> Self {
        Self {
            current: ArcSwapOption::new(initial.map(Arc::new)),
            allow_sample,
            counter: AtomicU64::new(0),
        }
    }

    pub fn revision(&self) -> Option<String> {
        self.current.load().as_ref().map(|p| p.revision.clone())
    }

    pub fn swap(&self, p: LoadedPolicy) {
        self.current.store(Some(Arc::new(p)));
    }

    fn decide(&self, input: strait_policy::input::Value) -> (Verdict, Option<Arc<LoadedPolicy>>) {
        let policy = self.current.load_full();
        let Some(p) = policy.clone() else {
            return (
                Verdict {
                    decision: Decision::deny("no policy loaded (fail closed)", Duration::ZERO),
                    dry_run_allowed: false,
                },
                None,
            );
        };
        let decision = p.engine.decide_value(input);
        let dry_run_allowed = !decision.allowed && p.dry_run;
        (
            Verdict {
                decision,
                dry_run_allowed,
            },
            policy,
        )
    }

    /// One decision for an HTTP request between `peers` (made once per connection); logs it.
    pub fn http(&self, peers: &Peers, req: &mut HttpRequest) -> Verdict {
        if req.id.is_empty() {
            req.id = request_id();
        }
        let (v, p) = self.decide(http_input_value(peers, req));
        self.log(
            &v,
            p.as_deref(),
            &peers.source,
            &peers.destination,
            Some(req),
        );
        v
    }

    /// One decision for a TCP connection; logs it.
    pub fn tcp(&self, source: &Peer, destination: &Peer) -> Verdict {
        let peers = Peers::new(source.clone(), destination.clone());
        let (v, p) = self.decide(tcp_input_value(&peers));
        self.log(&v, p.as_deref(), source, destination, None);
        v
    }

    /// Does the workflow let `source` reach `dst`, a destination outside the mesh?
    pub fn egress_allowed(&self, source: &str, dst: SocketAddr) -> bool {
        self.current
            .load()
            .as_ref()
            .and_then(|p| p.egress.get(source))
            .is_some_and(|rules| rules.iter().any(|r| r.allows(dst)))
    }

    /// Does an egress entry of `source` name `name` (and `port`, when given)? With no port, whether any
    /// entry names it at all: what the DNS proxy asks before forwarding a query.
    pub fn egress_host_allowed(
        &self,
        source: &str,
        name: &strait_policy::hostname::HostName,
        port: Option<u16>,
    ) -> bool {
        self.current
            .load()
            .as_ref()
            .and_then(|p| p.egress_hosts.get(source))
            .is_some_and(|rules| {
                rules.iter().any(|r| match port {
                    Some(port) => r.allows(name, port),
                    None => r.pattern.matches(name),
                })
            })
    }

    /// May `source` open a flow to `destination` at all? Asked before a tunnel is opened, so a flow the
    /// workflow does not contain never leaves the source host. Bundles without a workflow leave the
    /// decision to the destination's per-request check.
    pub fn reachable(&self, source: &str, destination: &str) -> bool {
        let Some(p) = self.current.load_full() else {
            return false;
        };
        !p.has_workflow
            || p.reachable
                .contains(&(source.to_owned(), destination.to_owned()))
    }

    fn log(
        &self,
        v: &Verdict,
        p: Option<&LoadedPolicy>,
        source: &Peer,
        destination: &Peer,
        req: Option<&HttpRequest>,
    ) {
        let d = &v.decision;
        if d.allowed {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            if self.allow_sample == 0 || n % self.allow_sample != 0 {
                return;
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_millis() as u64)
            .unwrap_or_default();
        let line = serde_json::json!({
            "decision_id": req.map(|r| r.id.clone()).unwrap_or_else(request_id),
            "time_ms": now,
            "source": source.principal,
            "destination": destination.principal,
            "kind": if req.is_some() { "http" } else { "tcp" },
            "method": req.map(|r| r.method.as_str()),
            "path": req.map(|r| r.path.as_str()),
            "allowed": d.allowed,
            "dry_run": v.dry_run_allowed,
            "http_status": d.http_status,
            "reason": d.reason,
            "revision": p.map(|p| p.revision.as_str()),
            "eval_us": d.took.as_micros() as u64,
        });
        info!(target: "strait::decision", "{line}");
    }
}

fn fingerprint(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return Some((meta.modified().ok()?, meta.len()));
    }
    let mut latest = (meta.modified().ok()?, 0u64);
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let m = e.metadata().ok()?;
            if m.is_dir() {
                stack.push(e.path());
            }
            latest.0 = latest.0.max(m.modified().ok()?);
            latest.1 += m.len();
        }
    }
    Some(latest)
}

/// Reloads the bundle at `path` when it changes. A bundle that fails to load is reported and the last
/// good policy stays in force.
pub async fn watch(authz: Arc<Authz>, path: PathBuf, every: Duration) {
    let mut seen = fingerprint(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let p = path.clone();
        match tokio::task::spawn_blocking(move || LoadedPolicy::load(&p)).await {
            Ok(Ok(policy)) => {
                if Some(&policy.revision) == authz.revision().as_ref() {
                    continue;
                }
                info!(revision = %policy.revision, dry_run = policy.dry_run, "policy bundle reloaded");
                authz.swap(policy);
            }
            Ok(Err(e)) => {
                error!(path = %path.display(), error = %format!("{e:#}"), "new policy bundle refused; keeping the last good one");
            }
            Err(e) => warn!(error = %e, "policy reload task failed"),
        }
    }
}

/// A peer for the input document.
pub fn peer(addr: Option<SocketAddr>, principal: &str) -> Peer {
    Peer {
        address: addr,
        principal: Some(principal.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path, manifest: &str, rego: &str) {
        std::fs::write(dir.join(".manifest"), manifest).unwrap();
        std::fs::write(dir.join("policy.rego"), rego).unwrap();
    }

    fn request() -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            ..Default::default()
        }
    }

    #[test]
    fn dry_run_logs_the_denial_but_lets_the_request_through() {
        let dir = tempfile::tempdir().unwrap();
        let deny_all = "package envoy.authz\nimport rego.v1\nallow := false\n";
        bundle(
            dir.path(),
            r#"{"revision": "r1", "metadata": {"strait": {"dry_run": true}}}"#,
            deny_all,
        );
        let authz = Authz::new(Some(LoadedPolicy::load(dir.path()).unwrap()), 0);
        let v = authz.http(
            &Peers::new(peer(None, "spiffe://td/a"), peer(None, "spiffe://td/b")),
            &mut request(),
        );
        assert!(!v.decision.allowed, "the decision itself is a denial");
        assert!(v.dry_run_allowed && v.allowed(), "dry-run lets it through");

        bundle(dir.path(), r#"{"revision": "r2"}"#, deny_all);
        let authz = Authz::new(Some(LoadedPolicy::load(dir.path()).unwrap()), 0);
        let v = authz.http(
            &Peers::new(peer(None, "spiffe://td/a"), peer(None, "spiffe://td/b")),
            &mut request(),
        );
        assert!(!v.allowed());
    }

    #[test]
    fn no_policy_denies_and_reaches_nothing() {
        let authz = Authz::new(None, 0);
        let v = authz.tcp(&peer(None, "spiffe://td/a"), &peer(None, "spiffe://td/b"));
        assert!(!v.allowed());
        assert!(!authz.reachable("spiffe://td/a", "spiffe://td/b"));
        assert!(!authz.egress_allowed("spiffe://td/a", "192.0.2.1:443".parse().unwrap()));
    }
}
