//! List + watch, the way client-go's reflector does it: list once (a consistent snapshot and its
//! resourceVersion), then watch from that version; each event moves the version on, bookmarks move it on
//! without an object. A watch that ends is resumed from the last version (no re-list); only a 410 Gone
//! (the version was compacted away), as an HTTP status or as a watch `ERROR` event, forces a fresh list.
//! Errors back off exponentially, capped, so a down API server is not hammered.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::client::KubeError;
use super::model::{List, Namespace, Pod, Status, WatchEvent};
use super::Kube;

/// Server-side watch timeout; the client gives up on a silent stream a little after it.
const WATCH_TIMEOUT_SECS: u64 = 300;
const IDLE_LIMIT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECS + 30);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The two resources the control plane follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Pods,
    Namespaces,
}

impl Resource {
    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "/api/v1/pods",
            Resource::Namespaces => "/api/v1/namespaces",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
        }
    }
}

/// What one watch line means for the reflector.
#[derive(Debug)]
pub enum Step {
    /// An object changed; resume after `version`.
    Applied { version: String },
    /// A bookmark: nothing changed, resume after `version`.
    Bookmark { version: String },
    /// 410 Gone: list again.
    Relist,
    /// Any other error event or an unreadable line: end this watch and resume after a pause.
    Restart(String),
}

fn decode<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn version_of(v: &serde_json::Value) -> Option<String> {
    v.get("metadata")?
        .get("resourceVersion")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Applies one watch line (untrusted JSON from the API server) to the cache: never panics, an unreadable
/// or unexpected line is a `Restart` with the reason. The fuzz target `kube_watch` runs this.
pub fn apply_line(kube: &Kube, resource: Resource, line: &[u8]) -> Step {
    let event: WatchEvent = match serde_json::from_slice(line) {
        Ok(e) => e,
        Err(e) => return Step::Restart(format!("unreadable watch event: {e}")),
    };
    if event.kind == "ERROR" {
        let status: Status = decode(event.object).unwrap_or_default();
        if status.code == Some(410) {
            return Step::Relist;
        }
        return Step::Restart(format!(
            "watch error {}: {}",
            status.code.unwrap_or_default(),
            status.message.unwrap_or_default()
        ));
    }
    let Some(version) = version_of(&event.object) else {
        return Step::Restart(format!("{} event without a resourceVersion", event.kind));
    };
    let applied = match (event.kind.as_str(), resource) {
        ("BOOKMARK", _) => return Step::Bookmark { version },
        ("ADDED" | "MODIFIED", Resource::Pods) => {
            decode::<Pod>(event.object).map(|p| kube.upsert_pod(p))
        }
        ("DELETED", Resource::Pods) => decode::<Pod>(event.object).map(|p| kube.remove_pod(&p)),
        ("ADDED" | "MODIFIED", Resource::Namespaces) => {
            decode::<Namespace>(event.object).map(|n| kube.upsert_namespace(n))
        }
        ("DELETED", Resource::Namespaces) => {
            decode::<Namespace>(event.object).map(|n| kube.remove_namespace(&n))
        }
        (other, _) => Err(format!("unknown watch event type {other:?}")),
    };
    match applied {
        Ok(()) => Step::Applied { version },
        Err(e) => Step::Restart(format!("{} event: {e}", resource.name())),
    }
}

/// Reads a whole list, page by page (`limit`/`continue`, every page from the same snapshot); returns the
/// items and the snapshot's resourceVersion. An expired continue token is a 410: the caller lists again.
async fn list_all<T: DeserializeOwned>(
    kube: &Kube,
    resource: Resource,
) -> Result<(Vec<T>, String), KubeError> {
    let mut items = Vec::new();
    let mut cont: Option<String> = None;
    loop {
        let mut url = format!("{}?limit={}", resource.path(), kube.settings.list_page_size);
        if let Some(c) = &cont {
            url.push_str("&continue=");
            url.push_str(&urlencode(c));
        }
        let page: List<T> = kube.client.get(&url).await?;
        items.extend(page.items);
        match page.metadata.continue_token.filter(|c| !c.is_empty()) {
            Some(c) => cont = Some(c),
            None => return Ok((items, page.metadata.resource_version)),
        }
    }
}

/// Lists the resource into the cache (replacing it only once every page is read); returns the list's
/// resourceVersion.
async fn list(kube: &Kube, resource: Resource) -> Result<String, KubeError> {
    let (n, version) = match resource {
        Resource::Pods => {
            let (items, version) = list_all::<Pod>(kube, resource).await?;
            let n = items.len();
            kube.replace_pods(items);
            (n, version)
        }
        Resource::Namespaces => {
            let (items, version) = list_all::<Namespace>(kube, resource).await?;
            let n = items.len();
            kube.replace_namespaces(items);
            (n, version)
        }
    };
    info!(resource = resource.name(), items = n, %version, "listed");
    Ok(version)
}

/// Follows one resource forever.
pub async fn reflect(kube: Arc<Kube>, resource: Resource) {
    let mut version: Option<String> = None;
    let mut backoff = BACKOFF_MIN;
    let pause = |why: &str, backoff: &mut Duration| {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        warn!(resource = resource.name(), reason = why, retry_in = ?wait, "Kubernetes watch interrupted");
        wait
    };
    loop {
        let from = match &version {
            Some(v) => v.clone(),
            None => match list(&kube, resource).await {
                Ok(v) => {
                    version = Some(v.clone());
                    v
                }
                Err(e) => {
                    let wait = pause(&format!("list failed: {e}"), &mut backoff);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            },
        };
        let url = format!(
            "{}?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_SECS}",
            resource.path(),
            urlencode(&from)
        );
        let mut lines = match kube.client.watch(&url).await {
            Ok(l) => l,
            Err(e) if e.is_gone() => {
                info!(
                    resource = resource.name(),
                    "resourceVersion expired (410 Gone); listing again"
                );
                version = None;
                continue;
            }
            Err(e) => {
                let wait = pause(&e.to_string(), &mut backoff);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        debug!(resource = resource.name(), from = %from, "watching");
        let opened = tokio::time::Instant::now();
        let restart = loop {
            let line = match tokio::time::timeout(IDLE_LIMIT, lines.next()).await {
                Err(_) => break Some("the watch stream went silent".to_owned()),
                Ok(Err(e)) => break Some(e.to_string()),
                Ok(Ok(None)) => break None,
                Ok(Ok(Some(line))) => line,
            };
            match apply_line(&kube, resource, &line) {
                Step::Applied { version: v } | Step::Bookmark { version: v } => {
                    version = Some(v);
                    backoff = BACKOFF_MIN;
                }
                Step::Relist => {
                    info!(
                        resource = resource.name(),
                        "watch said 410 Gone; listing again"
                    );
                    version = None;
                    break None;
                }
                Step::Restart(why) => {
                    // Resuming from the same version would replay the same event for ever, and the
                    // cache would stay frozen on it: list again instead.
                    version = None;
                    break Some(why);
                }
            }
        };
        match restart {
            Some(why) => {
                let wait = pause(&why, &mut backoff);
                tokio::time::sleep(wait).await;
            }
            // A server that ends watches at once must not make this loop spin.
            None if opened.elapsed() < Duration::from_secs(1) => {
                tokio::time::sleep(BACKOFF_MIN).await;
            }
            None => {}
        }
    }
}

/// resourceVersions are opaque strings; keep them intact in a query.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_move_the_version_and_410_relists() {
        let k = super::super::tests_support::kube();
        let s = apply_line(
            &k,
            Resource::Namespaces,
            br#"{"type":"ADDED","object":{"metadata":{"name":"shop","resourceVersion":"7","labels":{"strait.dev/mesh":"enabled"}}}}"#,
        );
        assert!(
            matches!(s, Step::Applied { ref version } if version == "7"),
            "{s:?}"
        );
        let s = apply_line(
            &k,
            Resource::Pods,
            br#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"12"}}}"#,
        );
        assert!(
            matches!(s, Step::Bookmark { ref version } if version == "12"),
            "{s:?}"
        );
        let s = apply_line(
            &k,
            Resource::Pods,
            br#"{"type":"ERROR","object":{"kind":"Status","status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#,
        );
        assert!(matches!(s, Step::Relist), "{s:?}");
        let s = apply_line(
            &k,
            Resource::Pods,
            br#"{"type":"ERROR","object":{"kind":"Status","code":500,"message":"etcd down"}}"#,
        );
        assert!(
            matches!(s, Step::Restart(ref m) if m.contains("etcd down")),
            "{s:?}"
        );
        for bad in [
            &b"not json"[..],
            br#"{"type":"ADDED","object":{"metadata":{"name":"x"}}}"#,
            br#"{"type":"SURPRISE","object":{"metadata":{"resourceVersion":"3"}}}"#,
            br#"{"type":"ADDED","object":{"metadata":{"resourceVersion":"3","name":5}}}"#,
        ] {
            assert!(matches!(
                apply_line(&k, Resource::Pods, bad),
                Step::Restart(_)
            ));
        }
        assert_eq!(urlencode("12/3"), "12%2F3");
    }
}
