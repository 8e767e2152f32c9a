//! Federation with other trust domains (SPIFFE Federation): this control plane serves its own bundle at
//! its bundle endpoint and keeps, for each partner it was told about, that partner's bundle, fetched from
//! the partner's endpoint and refreshed at the partner's hint.
//!
//! A relationship is `<trust domain, endpoint, endpoint SPIFFE ID>`, set by an operator and never
//! inferred (Federation §7.2). The profile is `https_spiffe`: the endpoint must present exactly the
//! configured SVID, chained to the partner's roots. The first fetch is authenticated by a bootstrap bundle
//! handed over out of band, accepted only with the fingerprint the partner read out; every later fetch by
//! the bundle fetched before. A failed fetch keeps the last good bundle (and says how stale it is); a
//! bundle with an older sequence than the one in force is refused (a replay); a root the partner stops
//! publishing is gone with the next fetch: bundles are replaced, never merged.
//!
//! Proxies get the partners' roots with their node-certificate renewal (over their mTLS session); each
//! mesh version names the federated bundles' fingerprint, so a change reaches every proxy within a
//! version's push.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use strait_ca::{SpiffeBundle, SpiffeId, TrustBundle, TrustDomain};
use tracing::{info, warn};

use crate::api::{
    paths, ExportList, ExportRule, ExportedWorkload, FederatedRoot, Federation, FederationAdd,
    FederationExport, GatewayRef, Reach,
};
use crate::client::{ApiClient, ServerTrust};
use crate::store::{Store, StoreError};

/// The refresh hint this control plane publishes (SPIFFE's customary 5 minutes).
pub const REFRESH_HINT_SECS: u64 = 300;
/// Partners are polled at their hint, but never more often than this (as SPIRE) nor less often than
/// once a day.
const MIN_REFRESH_SECS: u64 = 60;
const MAX_REFRESH_SECS: u64 = 86_400;
/// A failed fetch is tried again after this, whatever the hint.
const RETRY_SECS: u64 = 30;
/// A partner's exports are fetched this often (they change more often than its roots, and a new export
/// should be usable without waiting for the bundle's hint). Withdrawals need no fetch: the exporter's own
/// proxies stop admitting the partner's callers at once.
pub const IMPORTS_REFRESH_SECS: u64 = 15;
/// At most this many workloads are imported from one partner.
const MAX_IMPORTS: usize = 4096;
/// Per imported workload: addresses (replicas), ports and accepted callers.
const MAX_ADDRESSES: usize = 64;
const MAX_PORTS: usize = 64;
const MAX_ACCEPTS: usize = 1024;
/// Ingress gateways per exported workload.
const MAX_GATEWAYS: usize = 16;
/// Where workloads imported through gateways get their local addresses (as Istio allocates
/// ServiceEntry addresses): 240.240.0.0/16, reserved space no real network uses, so an organisation's
/// own ranges never collide with it.
pub const VIRTUAL_RANGE: (std::net::Ipv4Addr, u32) =
    (std::net::Ipv4Addr::new(240, 240, 0, 0), 1 << 16);

impl Record {
    /// The partner's roots in force, parsed.
    pub fn bundle(&self) -> Result<TrustBundle, String> {
        crate::api::FederatedBundle {
            trust_domain: self.trust_domain.clone(),
            bundle_pem: self.bundle_pem.clone(),
        }
        .parse()
    }
}

/// A relationship and the partner's bundle in force, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub trust_domain: String,
    pub endpoint: String,
    pub endpoint_id: String,
    /// The roots in force (PEM).
    pub bundle_pem: String,
    pub sequence: u64,
    pub refresh_hint_secs: u64,
    pub fetched_at: u64,
    pub attempted_at: u64,
    pub last_error: Option<String>,
    /// What this organisation exports to the partner (set by `strait federation export`).
    #[serde(default)]
    pub exports: Vec<ExportRule>,
    /// What the partner exports to this organisation: its last good answer, when it was fetched and why
    /// the last fetch failed.
    #[serde(default)]
    pub imports: Vec<ExportedWorkload>,
    #[serde(default)]
    pub imports_at: u64,
    #[serde(default)]
    pub imports_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unconfirmed(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("no federation with {0}")]
    Unknown(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Invalid(_) | Refusal::Unconfirmed(_) => StatusCode::BAD_REQUEST,
            Refusal::Unreachable(_) => StatusCode::BAD_GATEWAY,
            Refusal::Unknown(_) => StatusCode::NOT_FOUND,
            Refusal::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "invalid",
            Refusal::Unconfirmed(_) => "fingerprint",
            Refusal::Unreachable(_) => "fetch_failed",
            Refusal::Unknown(_) => "not_found",
            Refusal::Store(_) => "store",
        }
    }
}

/// A fingerprint as people write it: hex, any case, with or without `sha256:` and colons.
fn normalize_fingerprint(s: &str) -> String {
    s.trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// A bundle handed over out of band: SPIFFE JSON (what `strait federation bundle` prints) or PEM.
pub fn parse_bootstrap(td: &TrustDomain, text: &str) -> Result<TrustBundle, Refusal> {
    let parsed = if text.trim_start().starts_with('{') {
        SpiffeBundle::parse(td.clone(), text.as_bytes()).map(|b| b.bundle)
    } else {
        TrustBundle::from_pem(td.clone(), text)
    };
    parsed.map_err(|e| Refusal::Invalid(format!("the bootstrap bundle: {e}")))
}

/// Fetches `endpoint`'s bundle of `td`, authenticating the endpoint as `endpoint_id` by `trust`.
async fn fetch(
    td: &TrustDomain,
    endpoint: &str,
    endpoint_id: &SpiffeId,
    trust: TrustBundle,
) -> Result<SpiffeBundle, String> {
    let body = partner_get(endpoint, endpoint_id, trust, None, paths::FEDERATION_BUNDLE).await?;
    SpiffeBundle::parse(td.clone(), &body).map_err(|e| e.to_string())
}

/// GET `path` from a partner's control plane at `endpoint`, which must present `endpoint_id` chained to
/// `trust`; `identity` is presented as client certificate when given. The body of a 200 answer.
async fn partner_get(
    endpoint: &str,
    endpoint_id: &SpiffeId,
    trust: TrustBundle,
    identity: Option<&strait_ca::Svid>,
    path: &str,
) -> Result<bytes::Bytes, String> {
    let client = ApiClient::new(
        endpoint,
        ServerTrust::Endpoint {
            bundle: Arc::new(trust),
            id: endpoint_id.clone(),
        },
        identity,
        None,
    )
    .map_err(|e| e.to_string())?;
    let (status, body) = client
        .raw(Method::GET, path, None, bytes::Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        let detail = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(format!("{path} answered {status}: {detail}"));
    }
    Ok(body)
}

/// What `list` shows of a record.
pub fn describe(rec: &Record) -> Federation {
    let bundle = rec.bundle().ok();
    let roots = bundle
        .as_ref()
        .map_or(&[][..], |b| b.certs())
        .iter()
        .map(|der| {
            let (subject, not_after) = strait_ca::cert::parse_cert(der)
                .map(|c| {
                    (
                        c.subject().to_string(),
                        c.validity().not_after.timestamp().max(0) as u64,
                    )
                })
                .unwrap_or_else(|e| (format!("unparseable: {e}"), 0));
            FederatedRoot {
                subject,
                not_after,
                sha256: crate::tokens::hex(
                    ring::digest::digest(&ring::digest::SHA256, der.as_ref()).as_ref(),
                ),
            }
        })
        .collect();
    Federation {
        trust_domain: rec.trust_domain.clone(),
        endpoint: rec.endpoint.clone(),
        endpoint_id: rec.endpoint_id.clone(),
        sequence: rec.sequence,
        fingerprint: bundle.as_ref().map(|b| b.fingerprint()).unwrap_or_default(),
        roots,
        refresh_hint_secs: rec.refresh_hint_secs,
        fetched_at: rec.fetched_at,
        attempted_at: rec.attempted_at,
        last_error: rec.last_error.clone(),
        exports: rec.exports.clone(),
        imports: rec.imports.clone(),
        imports_error: rec.imports_error.clone(),
    }
}

fn hint(fetched: &SpiffeBundle) -> u64 {
    fetched
        .refresh_hint_secs
        .unwrap_or(REFRESH_HINT_SECS)
        .clamp(MIN_REFRESH_SECS, MAX_REFRESH_SECS)
}

/// `strait federation add`: checks the request and the bootstrap bundle's fingerprint, fetches the
/// partner's bundle with it and stores the relationship. Nothing is stored if any step fails.
pub async fn add(
    store: Arc<Store>,
    own: &TrustDomain,
    req: FederationAdd,
) -> Result<Federation, Refusal> {
    let td = TrustDomain::new(&req.trust_domain)
        .map_err(|e| Refusal::Invalid(format!("trust domain {:?}: {e}", req.trust_domain)))?;
    if &td == own {
        return Err(Refusal::Invalid(format!(
            "{td} is this control plane's own trust domain"
        )));
    }
    let endpoint_id = SpiffeId::parse(&req.endpoint_id)
        .map_err(|e| Refusal::Invalid(format!("endpoint ID {:?}: {e}", req.endpoint_id)))?;
    if !endpoint_id.is_member_of(&td) {
        return Err(Refusal::Invalid(format!(
            "the endpoint ID {endpoint_id} is not in the trust domain {td}"
        )));
    }
    crate::client::parse_server(&req.endpoint)
        .map_err(|e| Refusal::Invalid(format!("endpoint {:?}: {e}", req.endpoint)))?;
    let (s, key) = (store.clone(), td.to_string());
    if tokio::task::spawn_blocking(move || s.federation(&key))
        .await
        .map_err(|e| Refusal::Invalid(e.to_string()))??
        .is_some()
    {
        return Err(Refusal::Invalid(format!(
            "{td} is federated already: remove it first to change its endpoint"
        )));
    }
    let bootstrap = parse_bootstrap(&td, &req.bootstrap_bundle)?;
    let actual = bootstrap.fingerprint();
    match req.fingerprint.as_deref().map(normalize_fingerprint) {
        None => {
            return Err(Refusal::Unconfirmed(format!(
                "the bootstrap bundle's fingerprint is {actual}: compare it with what {td}'s operator reads from `strait federation bundle`, then run this again with --fingerprint {actual}"
            )))
        }
        Some(given) if given != actual => {
            return Err(Refusal::Unconfirmed(format!(
                "the bootstrap bundle's fingerprint is {actual}, not {given}: this is not the bundle {td}'s operator read out; nothing was added"
            )))
        }
        Some(_) => {}
    }
    let fetched = fetch(&td, &req.endpoint, &endpoint_id, bootstrap)
        .await
        .map_err(|e| {
            Refusal::Unreachable(format!(
                "fetching {td}'s bundle from {} failed: {e}; nothing was added",
                req.endpoint
            ))
        })?;
    let t = crate::server::unix_now();
    let rec = Record {
        trust_domain: td.to_string(),
        endpoint: req.endpoint,
        endpoint_id: endpoint_id.to_string(),
        bundle_pem: fetched.bundle.to_pem(),
        sequence: fetched.sequence,
        refresh_hint_secs: hint(&fetched),
        fetched_at: t,
        attempted_at: t,
        last_error: None,
        exports: Vec::new(),
        imports: Vec::new(),
        imports_at: 0,
        imports_error: None,
    };
    let stored = rec.clone();
    let key = td.to_string();
    // Stored only if no relationship with that trust domain appeared meanwhile.
    let added = tokio::task::spawn_blocking(move || {
        store.update_federation(&key, |old| old.is_none().then_some(stored))
    })
    .await
    .map_err(|e| Refusal::Invalid(e.to_string()))??;
    if added.is_none() {
        return Err(Refusal::Invalid(format!(
            "{td} is federated already: remove it first to change its endpoint"
        )));
    }
    info!(trust_domain = %td, endpoint = %rec.endpoint, sequence = rec.sequence, fingerprint = %fetched.bundle.fingerprint(), "federation added");
    Ok(describe(&rec))
}

/// The federated trust domains' bundles in force (a record that does not parse is left out, logged).
pub fn bundles(store: &Store) -> Result<Vec<TrustBundle>, StoreError> {
    Ok(store
        .federations()?
        .into_iter()
        .filter_map(|rec| {
            rec.bundle()
                .inspect_err(|e| warn!(trust_domain = %rec.trust_domain, error = %e, "a stored federated bundle does not parse; left out"))
                .ok()
        })
        .collect())
}

/// Fetches one partner's bundle now with the bundle in force, and stores what came of it. The flag says
/// whether the roots in force changed.
pub async fn refresh(store: Arc<Store>, td: &str) -> Result<(Federation, bool), Refusal> {
    let s = store.clone();
    let key = td.to_owned();
    let Some(mut rec) = tokio::task::spawn_blocking(move || s.federation(&key))
        .await
        .map_err(|e| Refusal::Invalid(e.to_string()))??
    else {
        return Err(Refusal::Unknown(td.to_owned()));
    };
    let before = rec.clone();
    let outcome = async {
        let id = SpiffeId::parse(&rec.endpoint_id).map_err(|e| e.to_string())?;
        let trust = rec.bundle()?;
        let domain = trust.trust_domain().clone();
        let fetched = fetch(&domain, &rec.endpoint, &id, trust).await?;
        if fetched.sequence < rec.sequence {
            return Err(format!(
                "the endpoint served sequence {}, older than the {} in force (a replayed bundle?); kept the bundle in force",
                fetched.sequence, rec.sequence
            ));
        }
        Ok(fetched)
    }
    .await;
    rec.attempted_at = crate::server::unix_now();
    let mut changed = false;
    match outcome {
        Ok(fetched) => {
            let pem = fetched.bundle.to_pem();
            if pem != rec.bundle_pem {
                changed = true;
                info!(trust_domain = %rec.trust_domain, sequence = fetched.sequence, fingerprint = %fetched.bundle.fingerprint(), roots = fetched.bundle.certs().len(), "federated bundle changed");
            }
            rec.bundle_pem = pem;
            rec.sequence = fetched.sequence;
            rec.refresh_hint_secs = hint(&fetched);
            rec.fetched_at = rec.attempted_at;
            rec.last_error = None;
        }
        Err(e) => {
            warn!(trust_domain = %rec.trust_domain, endpoint = %rec.endpoint, error = %e, stale_secs = rec.attempted_at.saturating_sub(rec.fetched_at), "federated bundle refresh failed; the last good bundle stays in force");
            rec.last_error = Some(e);
        }
    }
    // Written only over the record this refresh started from: a relationship removed or replaced
    // meanwhile stays removed or replaced, and a newer bundle stored by an overlapping refresh is not
    // rolled back.
    let (fetched_from, stored, s) = (before, rec.clone(), store.clone());
    let key = rec.trust_domain.clone();
    let written = tokio::task::spawn_blocking(move || {
        s.update_federation(&key, |current| {
            let current = current?;
            let unchanged = current.endpoint == fetched_from.endpoint
                && current.endpoint_id == fetched_from.endpoint_id
                && current.sequence == fetched_from.sequence
                && current.fetched_at == fetched_from.fetched_at
                && current.bundle_pem == fetched_from.bundle_pem;
            if !unchanged {
                return None;
            }
            // Exports and imports are changed by their own updates: keep what is stored.
            Some(Record {
                exports: current.exports,
                imports: current.imports,
                imports_at: current.imports_at,
                imports_error: current.imports_error,
                ..stored
            })
        })
    })
    .await
    .map_err(|e| Refusal::Invalid(e.to_string()))??;
    if let Some(w) = written {
        return Ok((describe(&w), changed));
    }
    // Someone else changed the relationship while this fetch ran: what is stored stands.
    let key = rec.trust_domain.clone();
    match tokio::task::spawn_blocking(move || store.federation(&key))
        .await
        .map_err(|e| Refusal::Invalid(e.to_string()))??
    {
        Some(current) => Ok((describe(&current), false)),
        None => Err(Refusal::Unknown(rec.trust_domain)),
    }
}

/// Refreshes every partner whose hint has elapsed (or whose last attempt failed 30 s ago), and every
/// partner's imports every [`IMPORTS_REFRESH_SECS`], all partners at once, forever; `changed` runs when a partner's roots or
/// imports changed. `identity` is this control plane's SVID, presented to partners for their exports.
pub async fn refresh_loop(
    store: Arc<Store>,
    hub: Arc<crate::dist::hub::Hub>,
    identity: impl Fn() -> Option<strait_ca::Svid>,
    changed: impl Fn(),
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        let Ok(Ok(records)) = tokio::task::spawn_blocking(move || s.federations()).await else {
            continue;
        };
        let t = crate::server::unix_now();
        let due: Vec<(Record, bool, bool)> = records
            .into_iter()
            .map(|rec| {
                let bundle_at = if rec.last_error.is_some() {
                    rec.attempted_at + RETRY_SECS.min(rec.refresh_hint_secs)
                } else {
                    rec.fetched_at + rec.refresh_hint_secs
                };
                let imports_due = t >= rec.imports_at + IMPORTS_REFRESH_SECS;
                (rec, t >= bundle_at, imports_due)
            })
            .filter(|(_, bundle, imports)| *bundle || *imports)
            .collect();
        if due.is_empty() {
            continue;
        }
        let id = due
            .iter()
            .any(|(_, _, imports)| *imports)
            .then(&identity)
            .flatten()
            .map(Arc::new);
        // Partners are fetched side by side: one that does not answer (each fetch has its own timeouts)
        // delays nobody else's refresh.
        let mut tasks = tokio::task::JoinSet::new();
        for (rec, bundle_due, imports_due) in due {
            let (store, hub, id) = (store.clone(), hub.clone(), id.clone());
            tasks.spawn(async move {
                let mut any = false;
                if bundle_due {
                    any |= matches!(
                        refresh(store.clone(), &rec.trust_domain).await,
                        Ok((_, true))
                    );
                }
                if let (true, Some(id)) = (imports_due, id) {
                    any |= matches!(
                        refresh_imports(store, hub, &rec.trust_domain, &id).await,
                        Ok(true)
                    );
                }
                any
            });
        }
        let mut any = false;
        while let Some(changed_one) = tasks.join_next().await {
            any |= changed_one.unwrap_or(false);
        }
        if any {
            changed();
        }
    }
}

/// `strait federation export|unexport`: what this organisation lets `req.trust_domain` reach. The
/// workload must be of this trust domain (it need not be registered yet: the export applies to whatever
/// registers with that identity). Returns the record and whether the exports changed.
pub fn set_export(
    store: &Store,
    own: &TrustDomain,
    req: FederationExport,
) -> Result<(Federation, bool), Refusal> {
    let workload = SpiffeId::parse(&req.workload)
        .map_err(|e| Refusal::Invalid(format!("workload {:?}: {e}", req.workload)))?;
    if !workload.is_member_of(own) {
        return Err(Refusal::Invalid(format!(
            "{workload} is not of this trust domain ({own}): only own workloads can be exported"
        )));
    }
    if req.ports.contains(&0) {
        return Err(Refusal::Invalid("port 0 is not a port".into()));
    }
    let mut ports = req.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let rule = ExportRule { workload, ports };
    let mut changed = false;
    let stored = store.update_federation(&req.trust_domain, |cur| {
        let mut rec = cur?;
        let before = rec.exports.clone();
        rec.exports.retain(|r| r.workload != rule.workload);
        if !req.remove {
            rec.exports.push(rule.clone());
        }
        rec.exports
            .sort_by(|a, b| a.workload.as_str().cmp(b.workload.as_str()));
        changed = rec.exports != before;
        Some(rec)
    })?;
    let rec = stored.ok_or_else(|| Refusal::Unknown(req.trust_domain.clone()))?;
    Ok((describe(&rec), changed))
}

/// What this organisation exports to `partner`, resolved against the registry: each exported workload's
/// addresses, the exported ports it declares and its node's tunnel listener. Workloads not registered (or
/// whose node has no tunnel yet) are left out until they are.
pub fn exports_for(
    store: &Store,
    hub: &crate::dist::hub::Hub,
    own: &TrustDomain,
    partner: &str,
) -> Result<ExportList, Refusal> {
    let rec = store
        .federation(partner)?
        .ok_or_else(|| Refusal::Unknown(partner.to_owned()))?;
    let dir = mesh_directory(store, hub)?;
    let steps = workflow_steps(&store.workflows()?);
    // With ingress gateways (`strait gateway` nodes), partners reach every export through them and
    // learn no private address of this organisation; without, they reach each node's tunnel directly.
    let gateways: Vec<GatewayRef> = dir
        .nodes
        .iter()
        .filter_map(|n| {
            let address = n.gateway_address.as_deref()?.parse().ok()?;
            let id = SpiffeId::node(own, n.name.as_str()).ok()?;
            Some(GatewayRef { address, id })
        })
        .collect();
    let mut workloads = Vec::new();
    for rule in &rec.exports {
        for w in dir.workloads.iter().filter(|w| w.id == rule.workload) {
            let Some(node) = dir.nodes.iter().find(|n| n.name == w.node) else {
                continue;
            };
            let Some(tunnel) = node
                .tunnel_address
                .as_deref()
                .and_then(|t| t.parse::<std::net::SocketAddr>().ok())
            else {
                continue;
            };
            let (addresses, reach) = if gateways.is_empty() {
                let addresses = match &w.selector {
                    crate::registry::Selector::Ips(ips) => ips.clone(),
                    crate::registry::Selector::Uid(_) => node.addresses.clone(),
                };
                (addresses, Reach::Tunnel(tunnel))
            } else {
                (Vec::new(), Reach::Gateways(gateways.clone()))
            };
            let ports: Vec<_> = if w.ports.is_empty() {
                // A pod declares no ports (every port is its, protocol detected): only the ports the
                // export names cross, detected the same way at the partner; none named, none cross.
                rule.ports
                    .iter()
                    .map(|&p| crate::registry::PortSpec::new(p, crate::registry::Protocol::Auto))
                    .collect()
            } else {
                w.tcp_ports()
                    .filter(|p| rule.ports.is_empty() || rule.ports.contains(&p.port))
                    // Only what the partner's proxies need: the port and how it is spoken.
                    .map(|p| crate::registry::PortSpec::new(p.port, p.protocol))
                    .collect()
            };
            // Through gateways the replicas of one identity are one import (the gateway picks the node):
            // their ports are merged into the first.
            if let Some(first) = workloads
                .iter_mut()
                .find(|e: &&mut ExportedWorkload| !gateways.is_empty() && e.id == w.id)
            {
                for p in ports {
                    if !first.ports.iter().any(|q| q.port == p.port) {
                        first.ports.push(p);
                    }
                }
                continue;
            }
            if !ports.is_empty() && (!addresses.is_empty() || !gateways.is_empty()) {
                let mut accepts: Vec<SpiffeId> = steps
                    .iter()
                    .filter(|s| s.to == w.id && s.from.trust_domain_str() == partner)
                    .map(|s| s.from.clone())
                    .collect();
                accepts.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                accepts.dedup();
                workloads.push(ExportedWorkload {
                    id: w.id.clone(),
                    addresses,
                    ports,
                    reach,
                    accepts,
                });
            }
        }
    }
    Ok(ExportList {
        trust_domain: own.to_string(),
        workloads,
    })
}

/// The directory proxies are given (in Kubernetes mode with the pods), or the store's alone while the
/// pods are not known yet.
fn mesh_directory(
    store: &Store,
    hub: &crate::dist::hub::Hub,
) -> Result<crate::api::Directory, StoreError> {
    match hub.directory(store) {
        Ok(Some(d)) => Ok(d),
        Ok(None) => store.directory(),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot build the mesh directory; using the store's");
            store.directory()
        }
    }
}

/// A step of a stored workflow, by its ends' SPIFFE IDs.
struct StepEnds {
    workflow: String,
    from: SpiffeId,
    to: SpiffeId,
}

/// Every step of the stored workflows (a workflow that no longer parses is left out: it was checked
/// when applied).
fn workflow_steps(workflows: &[crate::store::WorkflowRecord]) -> Vec<StepEnds> {
    let mut out = Vec::new();
    for rec in workflows {
        let Ok(wf) = strait_policy::workflow::Workflow::from_yaml(&rec.yaml) else {
            continue;
        };
        let Ok(ids) = wf.service_ids() else { continue };
        for step in &wf.steps {
            let (Some(from), Some(to)) = (ids.get(&step.from), ids.get(&step.to)) else {
                continue;
            };
            if let (Ok(from), Ok(to)) = (SpiffeId::parse(from), SpiffeId::parse(to)) {
                out.push(StepEnds {
                    workflow: rec.name.clone(),
                    from,
                    to,
                });
            }
        }
    }
    out
}

/// Each partner as `strait status` shows it: bundle, exports, imports, and where every
/// cross-organisation step of this organisation's workflows stands.
pub fn partner_status(store: &Store) -> Result<Vec<crate::api::PartnerStatus>, StoreError> {
    use crate::api::{CrossStep, CrossStepState};
    let steps = workflow_steps(&store.workflows()?);
    let mut out = Vec::new();
    for rec in store.federations()? {
        let td = rec.trust_domain.as_str();
        let mut cross = Vec::new();
        for s in &steps {
            let state = if s.to.trust_domain_str() == td {
                match rec.imports.iter().find(|i| i.id == s.to) {
                    None => CrossStepState::NotExported,
                    Some(i) if i.accepts.contains(&s.from) => CrossStepState::Accepted,
                    Some(_) => CrossStepState::Pending,
                }
            } else if s.from.trust_domain_str() == td {
                if rec.exports.iter().any(|e| e.workload == s.to) {
                    CrossStepState::Exported
                } else {
                    CrossStepState::NotExportedHere
                }
            } else {
                continue;
            };
            cross.push(CrossStep {
                workflow: s.workflow.clone(),
                from: s.from.clone(),
                to: s.to.clone(),
                state,
            });
        }
        let mut imports: Vec<SpiffeId> = rec.imports.iter().map(|i| i.id.clone()).collect();
        imports.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        imports.dedup();
        out.push(crate::api::PartnerStatus {
            trust_domain: rec.trust_domain.clone(),
            sequence: rec.sequence,
            fetched_at: rec.fetched_at,
            last_error: rec.last_error.clone(),
            exports: rec.exports.clone(),
            imports,
            imports_at: rec.imports_at,
            imports_error: rec.imports_error.clone(),
            steps: cross,
        });
    }
    Ok(out)
}

/// A partner's answer to [`paths::FEDERATION_EXPORTS`] (untrusted bytes): the workloads that may be
/// imported and why the others were refused; `Err` when the answer does not parse at all.
pub fn parse_imports(
    partner: &TrustDomain,
    body: &[u8],
    own: &crate::api::Directory,
) -> Result<(Vec<ExportedWorkload>, Vec<String>), String> {
    let list = serde_json::from_slice::<ExportList>(body)
        .map_err(|e| format!("the partner's exports do not parse: {e}"))?;
    Ok(check_imports(partner, list, own))
}

/// An address a partner's workload may be reached at: unicast, not loopback, link-local (where cloud
/// metadata services live), multicast, broadcast or unspecified.
fn routable(a: &std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified())
        }
        std::net::IpAddr::V6(v6) => {
            let mapped = v6.to_ipv4_mapped();
            !(v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || v6.is_unicast_link_local()
                || mapped.is_some())
        }
    }
}

/// The partner's exports that may be imported: identities of the partner's trust domain only, TCP
/// ports, and no address or tunnel that is one of this mesh's own (a partner must not be able to draw
/// traffic meant for a local workload). What is refused is said in the returned errors.
fn check_imports(
    partner: &TrustDomain,
    list: ExportList,
    own: &crate::api::Directory,
) -> (Vec<ExportedWorkload>, Vec<String>) {
    let mut ours: std::collections::HashSet<std::net::IpAddr> = std::collections::HashSet::new();
    for n in &own.nodes {
        ours.extend(&n.addresses);
        if let Some(t) = n
            .tunnel_address
            .as_deref()
            .and_then(|t| t.parse::<std::net::SocketAddr>().ok())
        {
            ours.insert(t.ip());
        }
    }
    for w in &own.workloads {
        ours.extend(w.selector.ips());
    }
    let (mut ok, mut refused) = (Vec::new(), Vec::new());
    if list.trust_domain != partner.as_str() {
        refused.push(format!(
            "the answer names trust domain {}, not {partner}",
            list.trust_domain
        ));
        return (ok, refused);
    }
    for mut w in list.workloads {
        let why = if !w.id.is_member_of(partner) {
            Some(format!("{} is not of {partner}", w.id))
        } else if !matches!(w.id.kind(), strait_ca::spiffe::IdKind::Workload { .. }) {
            Some(format!("{} is not a workload identity", w.id))
        } else if w.ports.is_empty() {
            Some(format!("{} has no port", w.id))
        } else if w.ports.iter().any(|p| p.port == 0 || p.is_udp()) {
            Some(format!("{}: only TCP ports are carried", w.id))
        } else if w.addresses.len() > MAX_ADDRESSES
            || w.ports.len() > MAX_PORTS
            || w.accepts.len() > MAX_ACCEPTS
        {
            Some(format!(
                "{}: more than {MAX_ADDRESSES} addresses, {MAX_PORTS} ports or {MAX_ACCEPTS} accepted callers",
                w.id
            ))
        } else if let Some(why) = check_reach(partner, &mut w, &ours) {
            Some(why)
        } else if ok.len() >= MAX_IMPORTS {
            Some(format!("more than {MAX_IMPORTS} workloads"))
        } else {
            None
        };
        match why {
            Some(why) => refused.push(why),
            None => ok.push(w),
        }
    }
    (ok, refused)
}

/// Where a partner's workload is reached, checked (and, through gateways, narrowed): directly, at its
/// own addresses and its node's tunnel, none of which may be this mesh's, unroutable or in
/// [`VIRTUAL_RANGE`] (a partner must not claim the addresses this mesh gives imports); or through the
/// partner's gateways, with no address of the partner's private network (the importer gives it virtual
/// ones). Gateways that are not a node of the partner, or are at an address of this mesh or an unroutable
/// one, are dropped (the others still serve); with none left, or too many, the workload is refused.
fn check_reach(
    partner: &TrustDomain,
    w: &mut ExportedWorkload,
    ours: &std::collections::HashSet<std::net::IpAddr>,
) -> Option<String> {
    let unusable = |a: &std::net::IpAddr| {
        if ours.contains(a) {
            Some(format!("{}: {a} is an address of this mesh", w.id))
        } else if !routable(a) {
            Some(format!(
                "{}: {a} is not a unicast address a workload can have (loopback, link-local, multicast, broadcast or unspecified)",
                w.id
            ))
        } else {
            None
        }
    };
    match &mut w.reach {
        Reach::Tunnel(_) if w.addresses.is_empty() => Some(format!("{} has no address", w.id)),
        Reach::Tunnel(t) => w.addresses.iter().chain([&t.ip()]).find_map(|a| match a {
            std::net::IpAddr::V4(v4) if in_virtual_range(*v4) => Some(format!(
                "{}: {a} is in {}/16, where this mesh gives imports their addresses",
                w.id, VIRTUAL_RANGE.0
            )),
            a => unusable(a),
        }),
        Reach::Gateways(_) if !w.addresses.is_empty() => Some(format!(
            "{}: a gateway export names no address of the partner's network",
            w.id
        )),
        Reach::Gateways(g) if g.len() > MAX_GATEWAYS => {
            Some(format!("{}: more than {MAX_GATEWAYS} gateways", w.id))
        }
        Reach::Gateways(g) => {
            let mut dropped = Vec::new();
            g.retain(|gw| {
                let why = if !gw.id.is_member_of(partner)
                    || !matches!(gw.id.kind(), strait_ca::spiffe::IdKind::Node { .. })
                {
                    Some(format!("gateway {} is not a node of {partner}", gw.id))
                } else {
                    unusable(&gw.address.ip())
                };
                dropped.extend(why.clone());
                why.is_none()
            });
            if g.is_empty() {
                Some(format!(
                    "{}: no usable gateway ({})",
                    w.id,
                    dropped.join("; ")
                ))
            } else {
                for why in &dropped {
                    warn!(workload = %w.id, reason = %why, "a partner's gateway was left out");
                }
                None
            }
        }
    }
}

/// Gives the imports reached through gateways their local virtual addresses: the one each had before
/// (`before`), else the first free one of [`VIRTUAL_RANGE`] from a hash of its identity, skipping
/// `taken` (the other partners' imports and this mesh's addresses). Stable across refreshes, so callers
/// that resolved an address keep reaching the same workload.
fn assign_virtual_addresses(
    imports: &mut [ExportedWorkload],
    before: &[ExportedWorkload],
    taken: &mut std::collections::HashSet<std::net::IpAddr>,
) {
    let (base, size) = VIRTUAL_RANGE;
    let through_gateways = |w: &ExportedWorkload| matches!(w.reach, Reach::Gateways(_));
    // First every import keeps the address it had (so a new import never takes an existing one's), then
    // the new ones get theirs.
    let mut kept = std::collections::HashMap::new();
    for w in imports.iter().filter(|w| through_gateways(w)) {
        let had = before
            .iter()
            .find(|b| b.id == w.id && through_gateways(b))
            .and_then(|b| b.addresses.first().copied());
        if let Some(a) = had.filter(|a| !taken.contains(a)) {
            taken.insert(a);
            kept.insert(w.id.clone(), a);
        }
    }
    for w in imports.iter_mut().filter(|w| through_gateways(w)) {
        let addr = kept.get(&w.id).copied().or_else(|| {
            let digest = ring::digest::digest(&ring::digest::SHA256, w.id.as_str().as_bytes());
            let start = u32::from_be_bytes([0, 0, digest.as_ref()[0], digest.as_ref()[1]]);
            (0..size)
                .map(|i| (start + i) % size)
                // .0 and .255 of each /24 are left out: some stacks treat them specially.
                .filter(|off| !matches!(off & 0xff, 0 | 0xff))
                .map(|off| std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from(base) + off)))
                .find(|a| !taken.contains(a))
        });
        if let Some(a) = addr {
            taken.insert(a);
            w.addresses = vec![a];
        }
    }
}

fn in_virtual_range(a: std::net::Ipv4Addr) -> bool {
    let (base, size) = VIRTUAL_RANGE;
    (u32::from(a).wrapping_sub(u32::from(base))) < size
}

/// Fetches what `td` exports to this organisation, presenting `identity` (this control plane's SVID),
/// and stores it. Returns whether the imports changed. A failed fetch keeps the last good imports.
pub async fn refresh_imports(
    store: Arc<Store>,
    hub: Arc<crate::dist::hub::Hub>,
    td: &str,
    identity: &strait_ca::Svid,
) -> Result<bool, Refusal> {
    let s = store.clone();
    let key = td.to_owned();
    let Some(rec) = tokio::task::spawn_blocking(move || s.federation(&key))
        .await
        .map_err(|e| Refusal::Invalid(e.to_string()))??
    else {
        return Err(Refusal::Unknown(td.to_owned()));
    };
    let outcome = async {
        let id = SpiffeId::parse(&rec.endpoint_id).map_err(|e| e.to_string())?;
        let trust = rec.bundle()?;
        let body = partner_get(
            &rec.endpoint,
            &id,
            trust,
            Some(identity),
            paths::FEDERATION_EXPORTS,
        )
        .await?;
        Ok(body)
    }
    .await;
    let (domain, s) = (
        TrustDomain::new(td).map_err(|e| Refusal::Invalid(e.to_string()))?,
        store.clone(),
    );
    let (endpoint, endpoint_id, trust_pem) = (
        rec.endpoint.clone(),
        rec.endpoint_id.clone(),
        rec.bundle_pem.clone(),
    );
    let written = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let own = mesh_directory(&s, &hub)?;
        let (imports, error) = match outcome.and_then(|body| parse_imports(&domain, &body, &own)) {
            Ok((ok, refused)) => {
                for why in &refused {
                    warn!(trust_domain = %domain, reason = %why, "a partner's export was refused");
                }
                (Some(ok), (!refused.is_empty()).then(|| refused.join("; ")))
            }
            Err(e) => {
                warn!(trust_domain = %domain, error = %e, "fetching the partner's exports failed; the last good imports stay");
                (None, Some(e))
            }
        };
        let mut changed = false;
        // Virtual addresses already given to other partners' imports, and this mesh's own.
        let mut taken: std::collections::HashSet<std::net::IpAddr> = s
            .federations()?
            .iter()
            .filter(|r| r.trust_domain != domain.as_str())
            .flat_map(|r| r.imports.iter().flat_map(|w| w.addresses.iter().copied()))
            .collect();
        taken.extend(own.nodes.iter().flat_map(|n| n.addresses.iter().copied()));
        taken.extend(own.workloads.iter().flat_map(|w| w.selector.ips().iter().copied()));
        s.update_federation(domain.as_str(), |cur| {
            let mut cur = cur?;
            // Only over the relationship (and the trust) this fetch was made with.
            if cur.endpoint != endpoint || cur.endpoint_id != endpoint_id || cur.bundle_pem != trust_pem {
                return None;
            }
            if let Some(mut imports) = imports {
                assign_virtual_addresses(&mut imports, &cur.imports, &mut taken);
                changed = cur.imports != imports;
                cur.imports = imports;
            }
            cur.imports_error = error;
            cur.imports_at = crate::server::unix_now();
            Some(cur)
        })?;
        if changed {
            info!(trust_domain = %domain, "the partner's exports changed");
        }
        Ok(changed)
    })
    .await
    .map_err(|e| Refusal::Invalid(e.to_string()))??;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(
        id: &str,
        addr: &str,
        port: u16,
        proto: crate::registry::Protocol,
    ) -> ExportedWorkload {
        ExportedWorkload {
            id: SpiffeId::parse(id).unwrap(),
            addresses: vec![addr.parse().unwrap()],
            ports: vec![crate::registry::PortSpec::new(port, proto)],
            reach: Reach::Tunnel(std::net::SocketAddr::new(addr.parse().unwrap(), 15008)),
            accepts: Vec::new(),
        }
    }

    #[test]
    fn imports_are_the_partners_own_workloads_at_addresses_not_ours() {
        use crate::registry::Protocol;
        let partner = TrustDomain::new("vfx.example").unwrap();
        let own = crate::api::Directory {
            nodes: vec![crate::api::DirectoryNode {
                name: crate::registry::NodeName::new("host-a").unwrap(),
                tunnel_address: Some("10.0.0.2:15008".into()),
                addresses: vec!["10.0.0.2".parse().unwrap()],
                gateway_address: None,
            }],
            ..Default::default()
        };
        let ok = exported(
            "spiffe://vfx.example/ns/r/sa/render",
            "10.9.0.4",
            6000,
            Protocol::Http,
        );
        let mut too_many = ok.clone();
        too_many.ports = (1..=65)
            .map(|p| crate::registry::PortSpec::new(p, Protocol::Tcp))
            .collect();
        let list = ExportList {
            trust_domain: "vfx.example".into(),
            workloads: vec![
                ok.clone(),
                // Another organisation's identity, ours, a node identity.
                exported(
                    "spiffe://color.example/ns/r/sa/x",
                    "10.9.0.5",
                    1,
                    Protocol::Http,
                ),
                exported(
                    "spiffe://example.org/ns/r/sa/x",
                    "10.9.0.5",
                    1,
                    Protocol::Http,
                ),
                exported("spiffe://vfx.example/node/n", "10.9.0.5", 1, Protocol::Http),
                // An address of this mesh, loopback, link-local (cloud metadata), multicast.
                exported(
                    "spiffe://vfx.example/ns/r/sa/a",
                    "10.0.0.2",
                    1,
                    Protocol::Http,
                ),
                exported(
                    "spiffe://vfx.example/ns/r/sa/b",
                    "127.0.0.1",
                    1,
                    Protocol::Http,
                ),
                exported(
                    "spiffe://vfx.example/ns/r/sa/c",
                    "169.254.169.254",
                    80,
                    Protocol::Http,
                ),
                exported(
                    "spiffe://vfx.example/ns/r/sa/d",
                    "ff02::1",
                    80,
                    Protocol::Http,
                ),
                // UDP is not carried; too many ports.
                exported(
                    "spiffe://vfx.example/ns/r/sa/e",
                    "10.9.0.6",
                    53,
                    Protocol::Udp,
                ),
                too_many,
            ],
        };
        let (imported, refused) = check_imports(&partner, list, &own);
        assert_eq!(imported, vec![ok], "{refused:?}");
        assert_eq!(refused.len(), 9, "{refused:?}");
        // An answer naming another trust domain is refused whole.
        let (imported, refused) = check_imports(
            &partner,
            ExportList {
                trust_domain: "color.example".into(),
                workloads: Vec::new(),
            },
            &own,
        );
        assert!(imported.is_empty() && refused.len() == 1);
    }

    #[test]
    fn gateway_imports_name_partner_nodes_and_get_stable_virtual_addresses() {
        use crate::registry::Protocol;
        let partner = TrustDomain::new("vfx.example").unwrap();
        let own = crate::api::Directory::default();
        let via = |gw: &str, id: &str| {
            let mut w = exported(
                "spiffe://vfx.example/ns/r/sa/render",
                "10.9.0.4",
                6000,
                Protocol::Http,
            );
            w.addresses.clear();
            w.reach = Reach::Gateways(vec![GatewayRef {
                address: gw.parse().unwrap(),
                id: SpiffeId::parse(id).unwrap(),
            }]);
            w
        };
        let ok = via("198.51.100.7:15009", "spiffe://vfx.example/node/gw-1");
        let mut with_private = ok.clone();
        with_private.addresses = vec!["10.9.0.4".parse().unwrap()];
        let list = ExportList {
            trust_domain: "vfx.example".into(),
            workloads: vec![
                ok.clone(),
                // A workload identity, or another organisation's node, posing as the gateway.
                via("198.51.100.7:15009", "spiffe://vfx.example/ns/r/sa/render"),
                via("198.51.100.7:15009", "spiffe://color.example/node/gw-1"),
                // A gateway at loopback; a gateway export that leaks a private address.
                via("127.0.0.1:15009", "spiffe://vfx.example/node/gw-1"),
                with_private,
            ],
        };
        let (mut imported, refused) = check_imports(&partner, list, &own);
        assert_eq!(imported, vec![ok.clone()], "{refused:?}");
        assert_eq!(refused.len(), 4, "{refused:?}");
        // One bad gateway among good ones is left out; the workload is still imported through the rest.
        let mut two = ok.clone();
        if let Reach::Gateways(g) = &mut two.reach {
            g.push(GatewayRef {
                address: "127.0.0.1:15009".parse().unwrap(),
                id: SpiffeId::parse("spiffe://vfx.example/node/gw-2").unwrap(),
            });
        }
        let (kept, refused) = check_imports(
            &partner,
            ExportList {
                trust_domain: "vfx.example".into(),
                workloads: vec![two],
            },
            &own,
        );
        assert_eq!(kept, vec![ok.clone()], "{refused:?}");
        // A partner cannot claim the addresses imports are given.
        let squatter = exported(
            "spiffe://vfx.example/ns/r/sa/squat",
            "240.240.1.1",
            80,
            Protocol::Http,
        );
        let (kept, refused) = check_imports(
            &partner,
            ExportList {
                trust_domain: "vfx.example".into(),
                workloads: vec![squatter],
            },
            &own,
        );
        assert!(kept.is_empty() && refused.len() == 1, "{refused:?}");

        // Virtual addresses: in 240.240.0.0/16, never one already taken, and the same at the next refresh.
        let mut taken = std::collections::HashSet::new();
        assign_virtual_addresses(&mut imported, &[], &mut taken);
        let first = imported[0].addresses.clone();
        assert_eq!(first.len(), 1);
        let std::net::IpAddr::V4(v4) = first[0] else {
            panic!("{first:?}")
        };
        assert_eq!(v4.octets()[..2], [240, 240]);
        let mut again = vec![ok.clone()];
        assign_virtual_addresses(&mut again, &imported, &mut std::collections::HashSet::new());
        assert_eq!(again[0].addresses, first);
        let mut other = vec![ok];
        assign_virtual_addresses(&mut other, &[], &mut taken);
        assert_ne!(
            other[0].addresses, first,
            "a taken address is not given twice"
        );

        // The wire form: `tunnel` or `gateways`, exactly one.
        let text = serde_json::to_string(&imported[0]).unwrap();
        assert!(
            text.contains("\"gateways\"") && !text.contains("\"tunnel\""),
            "{text}"
        );
        let both = text.replace("\"gateways\"", "\"tunnel\":\"10.0.0.1:1\",\"gateways\"");
        assert!(serde_json::from_str::<ExportedWorkload>(&both).is_err());
    }

    #[test]
    fn fingerprints_compare_as_people_write_them() {
        assert_eq!(normalize_fingerprint(" sha256:AB:cd:01 "), "abcd01");
        assert_eq!(normalize_fingerprint("abcd01"), "abcd01");
    }
}
