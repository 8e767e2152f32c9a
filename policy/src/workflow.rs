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
//!     methods: [POST]                       # empty or absent: any method
//!     paths: ["/api/vfx-1", "/api/vfx-1/**"] # globs: `*` within a segment, `**` across, `?` one char
//!     when:                                  # optional conditions, all must hold
//!       headers: {x-case-id: "*"}            # "*": present with any value; otherwise exact value
//!       timeWindow: {timezone: Europe/Paris, days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00"}
//!   - {from: vfx-1, to: vfx-2, tcp: true}    # raw TCP connections between these two are allowed
//! egress:                                    # destinations outside the mesh
//!   - {from: sound, cidr: 192.0.2.0/24, port: 443}
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
    #[serde(default)]
    pub tcp: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Conditions>,
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
    pub cidr: String,
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

pub(crate) const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

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
                let parsed = strait_ca::SpiffeId::parse(&id)
                    .map_err(|e| err(format!("{at}.id"), format!("{id}: {e}")))?;
                if parsed.trust_domain_str() != self.trust_domain {
                    return Err(err(
                        format!("{at}.id"),
                        format!("{id} is outside trust domain {}", self.trust_domain),
                    ));
                }
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
            for (j, m) in s.methods.iter().enumerate() {
                if !METHODS.contains(&m.to_ascii_uppercase().as_str()) {
                    return Err(err(
                        format!("steps[{i}].methods[{j}]"),
                        format!("{m:?} is not an HTTP method"),
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
            let (addr, len) = e.cidr.split_once('/').unwrap_or((&e.cidr, ""));
            let ip: Result<std::net::IpAddr, _> = addr.parse();
            if ip.is_err() || (!len.is_empty() && len.parse::<u8>().is_err()) {
                return Err(err(
                    format!("egress[{i}].cidr"),
                    format!("{:?} is not an address or CIDR", e.cidr),
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn normalize_day(d: &str) -> Option<&'static str> {
    day_name(d)
}
