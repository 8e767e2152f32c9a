//! Workflows: who may call whom, with which methods and paths, under which conditions.
//!
//! ```yaml
//! apiVersion: strait.dev/v1
//! kind: Workflow
//! metadata: {name: movie}
//! trustDomain: example.org
//! actors:
//!   - name: owner
//!     services:
//!       - name: owner                       # namespace/serviceAccount default to movie/<name>…
//!         namespace: movie
//!         serviceAccount: owner
//!   - name: vfx
//!     services:
//!       - {name: vfx-1, id: "spiffe://example.org/ns/movie/sa/vfx-1"}   # …or a full SPIFFE ID
//! steps:
//!   - from: owner
//!     to: vfx-1
//!     methods: [POST]                       # empty or absent: any method (extension methods too)
//!     paths: ["/api/vfx-1", "/api/vfx-1/**"] # globs: `*` within a segment, `**` across, `?` one char
//!     when:                                  # optional conditions, all must hold
//!       headers: {x-case-id: "*"}            # "*": present with any value; otherwise exact value
//!       timeWindow: {timezone: Europe/Paris, days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00"}
//!   - {from: vfx-1, to: vfx-2, tcp: [5432]}  # raw TCP connections to these ports of vfx-2 are allowed
//! egress:                                    # destinations outside the mesh
//!   - {from: sound, cidr: 192.0.2.0/24, port: 443}
//!   - {from: sound, host: api.partner.example, port: 443}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workflow {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub trust_domain: String,
    pub actors: Vec<Actor>,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub egress: Vec<Egress>,
    /// The workflow runs as ordered instances ([`crate::ordering`]); absent: a static graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Instances>,
}

/// `instances: {lifetime: 24h}`: steps then have ids, `after` and `max` (docs/workflows.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Instances {
    /// How long an instance lives from its first step: a whole number and s, m, h or d (at most 30d).
    pub lifetime: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub name: String,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    /// Ports of the destination that the source may open raw TCP connections to (one decision per
    /// connection). Only ports the destination declares `tcp` (or `auto` ports whose client does not speak
    /// HTTP) are served as TCP; HTTP ports stay decided per request whatever this says.
    #[serde(
        default,
        deserialize_with = "tcp_ports",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tcp: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Conditions>,
    /// Ordered workflows: the step's id, the steps it comes after, and how often it may complete per
    /// instance ([`crate::ordering`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// `tcp: [5432, 6379]`. The old `tcp: true` opened raw TCP to every port of the destination, HTTP ports
/// included; it is refused with the way forward. `tcp: false` means none.
fn tcp_ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Flag(bool),
        Ports(Vec<u16>),
    }
    match Raw::deserialize(d)
        .map_err(|_| serde::de::Error::custom("tcp: expected a list of ports, e.g. tcp: [5432]"))?
    {
        Raw::Flag(false) => Ok(Vec::new()),
        Raw::Flag(true) => Err(serde::de::Error::custom(
            "`tcp: true` is no longer accepted (it opened every port of the destination to raw TCP): \
             name the ports, e.g. tcp: [5432]",
        )),
        Raw::Ports(p) if p.contains(&0) => Err(serde::de::Error::custom("tcp: port 0 is not a port")),
        Raw::Ports(p) => Ok(p),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conditions {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_window: Option<TimeWindow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    pub timezone: String,
    #[serde(default)]
    pub days: Vec<String>,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    pub from: String,
    /// An address or CIDR outside the mesh; exactly one of `cidr` and `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// A DNS name (`api.example.com`) or every name below one (`*.example.com`): the source's proxy
    /// forwards its queries for these names, and the addresses in the answers become reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

/// A workflow that cannot be compiled, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct WorkflowError {
    pub at: String,
    pub message: String,
}

fn err(at: impl Into<String>, message: impl Into<String>) -> WorkflowError {
    WorkflowError {
        at: at.into(),
        message: message.into(),
    }
}

const DAYS: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];

/// `mon`/`monday`/`Monday` → `monday`.
fn day_name(d: &str) -> Option<&'static str> {
    let d = d.to_ascii_lowercase();
    DAYS.iter()
        .copied()
        .find(|full| *full == d || full.starts_with(&d) && d.len() >= 3)
}

/// `HH:MM` → minutes since midnight.
pub fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

/// Path patterns: literal characters and the wildcards `*`, `**`, `?`; must start with `/`.
fn check_pattern(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path pattern {p:?} must start with '/'"));
    }
    if let Some(c) = p
        .chars()
        .find(|c| matches!(c, '[' | ']' | '{' | '}' | '\\') || c.is_control())
    {
        return Err(format!(
            "path pattern {p:?}: {c:?} is not supported (use *, ** and ?)"
        ));
    }
    Ok(())
}

/// The methods of RFC 9110 and RFC 5789. Written in any case in a workflow they mean the upper-case
/// method; any other method (WebDAV's `PROPFIND`, `QUERY`, …) is an exact, case-sensitive token, as
/// methods are on the wire.
pub(crate) const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// RFC 9110 `tchar`: what a method token (and a header name) is made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The method a step's entry means: a standard method in any case → its upper-case name; any other token
/// as written; `None` when it is not a token.
pub fn canonical_method(m: &str) -> Option<String> {
    if m.is_empty() || !m.bytes().all(is_tchar) {
        return None;
    }
    Some(
        METHODS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(m))
            .map_or_else(|| m.to_owned(), |s| (*s).to_owned()),
    )
}

impl Workflow {
    pub fn from_yaml(text: &str) -> Result<Self, WorkflowError> {
        let de = serde_norway::Deserializer::from_str(text);
        let wf: Workflow = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            err(
                if path.is_empty() { ".".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        wf.validate()?;
        Ok(wf)
    }

    /// Whether `id` (a service's SPIFFE ID) is of this workflow's trust domain.
    fn is_local(&self, id: &str) -> bool {
        strait_ca::SpiffeId::parse(id).is_ok_and(|i| i.trust_domain_str() == self.trust_domain)
    }

    /// The trust domains of other organisations that this workflow's services name (federation).
    pub fn foreign_trust_domains(&self) -> Result<Vec<String>, WorkflowError> {
        let mut tds: Vec<String> = self
            .service_ids()?
            .values()
            .filter_map(|id| strait_ca::SpiffeId::parse(id).ok())
            .map(|id| id.trust_domain_str().to_owned())
            .filter(|td| td != &self.trust_domain)
            .collect();
        tds.sort();
        tds.dedup();
        Ok(tds)
    }

    /// Every service's SPIFFE ID, by service name.
    pub fn service_ids(&self) -> Result<BTreeMap<String, String>, WorkflowError> {
        let mut ids = BTreeMap::new();
        for (ai, actor) in self.actors.iter().enumerate() {
            for (si, s) in actor.services.iter().enumerate() {
                let at = format!("actors[{ai}].services[{si}]");
                let id = match (&s.id, &s.namespace, &s.service_account) {
                    (Some(id), None, None) => id.clone(),
                    (None, ns, sa) => format!(
                        "spiffe://{}/ns/{}/sa/{}",
                        self.trust_domain,
                        ns.as_deref().unwrap_or(&self.metadata.name),
                        sa.as_deref().unwrap_or(&s.name)
                    ),
                    _ => {
                        return Err(err(
                            at,
                            "give either `id` or `namespace`/`serviceAccount`, not both",
                        ))
                    }
                };
                // A full ID may name another organisation's service (federation): the steps that
                // involve it are checked in `validate` to have a local end.
                strait_ca::SpiffeId::parse(&id)
                    .map_err(|e| err(format!("{at}.id"), format!("{id}: {e}")))?;
                if ids.insert(s.name.clone(), id).is_some() {
                    return Err(err(at, format!("service name {:?} is used twice", s.name)));
                }
            }
        }
        Ok(ids)
    }

    fn validate(&self) -> Result<(), WorkflowError> {
        if self.api_version != "strait.dev/v1" {
            return Err(err("apiVersion", "must be strait.dev/v1"));
        }
        if self.kind != "Workflow" {
            return Err(err("kind", "must be Workflow"));
        }
        let ids = self.service_ids()?;
        for (i, s) in self.steps.iter().enumerate() {
            for (field, name) in [("from", &s.from), ("to", &s.to)] {
                if !ids.contains_key(name) {
                    return Err(err(
                        format!("steps[{i}].{field}"),
                        format!("no service named {name:?}"),
                    ));
                }
            }
            if !self.is_local(&ids[&s.from]) && !self.is_local(&ids[&s.to]) {
                return Err(err(
                    format!("steps[{i}]"),
                    format!(
                        "neither {} nor {} is of trust domain {}: a step between other organisations' services is theirs to allow",
                        ids[&s.from], ids[&s.to], self.trust_domain
                    ),
                ));
            }
            for (j, m) in s.methods.iter().enumerate() {
                if canonical_method(m).is_none() {
                    return Err(err(
                        format!("steps[{i}].methods[{j}]"),
                        format!("{m:?} is not an HTTP method (a token such as GET or PROPFIND)"),
                    ));
                }
            }
            for (j, p) in s.paths.iter().enumerate() {
                check_pattern(p).map_err(|m| err(format!("steps[{i}].paths[{j}]"), m))?;
            }
            if let Some(w) = s.when.as_ref().and_then(|c| c.time_window.as_ref()) {
                let at = format!("steps[{i}].when.timeWindow");
                let (Some(from), Some(to)) = (minutes(&w.from), minutes(&w.to)) else {
                    return Err(err(at, "from/to must be HH:MM"));
                };
                if from >= to {
                    return Err(err(
                        at,
                        "from must be before to (windows across midnight: use two steps)",
                    ));
                }
                for d in &w.days {
                    if day_name(d).is_none() {
                        return Err(err(format!("{at}.days"), format!("{d:?} is not a day")));
                    }
                }
                if w.timezone.is_empty() {
                    return Err(err(
                        format!("{at}.timezone"),
                        "a time zone name is required (e.g. UTC, Europe/Paris)",
                    ));
                }
            }
        }
        for (i, e) in self.egress.iter().enumerate() {
            if !ids.contains_key(&e.from) {
                return Err(err(
                    format!("egress[{i}].from"),
                    format!("no service named {:?}", e.from),
                ));
            }
            match (&e.cidr, &e.host) {
                (Some(cidr), None) => {
                    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, ""));
                    let ip: Result<std::net::IpAddr, _> = addr.parse();
                    if ip.is_err() || (!len.is_empty() && len.parse::<u8>().is_err()) {
                        return Err(err(
                            format!("egress[{i}].cidr"),
                            format!("{cidr:?} is not an address or CIDR"),
                        ));
                    }
                }
                (None, Some(host)) => {
                    if let Err(e) = crate::hostname::HostPattern::parse(host) {
                        return Err(err(
                            format!("egress[{i}].host"),
                            format!("{host:?} is not a DNS name or '*.' and a DNS name: {e}"),
                        ));
                    }
                }
                _ => {
                    return Err(err(
                        format!("egress[{i}]"),
                        "give exactly one of cidr (an address or CIDR) and host (a DNS name)",
                    ))
                }
            }
        }
        crate::ordering::validate(self)
    }
}

pub(crate) fn normalize_day(d: &str) -> Option<&'static str> {
    day_name(d)
}
