//! Kubernetes mode of the control plane: the API server is the source of truth for which pods are in the
//! mesh, and it vouches for node proxies.
//!
//! - [`watch`]: list + watch of pods and namespaces (resourceVersion, bookmarks, re-list on 410 Gone) into
//!   an in-memory cache; every change becomes a new mesh version (debounced), pushed to proxies as in VM
//!   mode. Proxies never talk to the API server.
//! - [`join`]: a proxy proves itself with its projected service-account token (audience `strait`); the
//!   control plane asks TokenReview and checks the token is bound to a pod of the strait DaemonSet on the
//!   node it claims.
//! - [`client`]: the HTTPS client (in-cluster credentials); [`model`]: the object fields read.
//!
//! A pod is in the mesh when its namespace has the label `strait.dev/mesh=enabled`, it has an IP, is
//! scheduled, does not use the host network (its address would be the node's) and has not finished. Its
//! identity is `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>`; all its ports are mesh ports.

pub mod client;
pub mod join;
pub mod model;
pub mod watch;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use strait_ca::{SpiffeId, TrustDomain};
use tokio::sync::Notify;

use crate::registry::{NodeName, Selector, Workload};
use client::KubeClient;
use model::{Namespace, Pod};

/// The namespace label that opts a namespace's pods into the mesh (like Istio's injection label).
pub const MESH_LABEL: &str = "strait.dev/mesh";
pub const MESH_LABEL_VALUE: &str = "enabled";
pub use strait_proto::api::kube::{AUDIENCE, BUNDLE_CONFIGMAP, BUNDLE_KEY};

/// Who the node proxies are in the cluster.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The namespace the control plane and the proxies run in (the ConfigMap goes there).
    pub namespace: String,
    /// The proxies' service account (in `namespace`).
    pub proxy_service_account: String,
    /// The DaemonSet whose pods are the proxies.
    pub proxy_daemonset: String,
    /// The gateways' service account (in `namespace`).
    pub gateway_service_account: String,
    /// The Deployment whose pods are the gateways; also the node name every replica joins as.
    pub gateway_deployment: String,
    /// Objects per page when listing (`limit`), so a large cluster's pods arrive in bounded answers.
    pub list_page_size: u32,
}

/// The names `deploy/kubernetes` uses (the control plane's flags default to them).
impl Default for KubeSettings {
    fn default() -> Self {
        Self {
            namespace: "strait-system".into(),
            proxy_service_account: "strait-proxy".into(),
            proxy_daemonset: "strait-proxy".into(),
            gateway_service_account: "strait-gateway".into(),
            gateway_deployment: "strait-gateway".into(),
            list_page_size: 500,
        }
    }
}

/// What `State::open_with` needs to run in Kubernetes mode.
#[derive(Debug)]
pub struct KubeParts {
    pub client: KubeClient,
    pub settings: KubeSettings,
}

/// Turns cache changes into mesh versions: waits for a change, lets a burst of events settle (a rollout
/// changes many pods at once; one version for all of them), and rebuilds when the meshed pods differ.
pub async fn feed(state: std::sync::Arc<crate::server::State>, kube: std::sync::Arc<Kube>) {
    const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
    let mut last: Option<Vec<Workload>> = None;
    loop {
        kube.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        if !kube.synced() {
            continue;
        }
        let now = kube.workloads();
        if last.as_ref() == Some(&now) {
            continue;
        }
        last = Some(now.clone());
        tracing::info!(pods = now.len(), "meshed pods changed");
        let st = state.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || st.set_kube_workloads(now)).await {
            tracing::error!(error = %e, "mesh version update task failed");
        }
    }
}

/// The control plane's Kubernetes side: client, settings and the watched state.
#[derive(Debug)]
pub struct Kube {
    pub client: KubeClient,
    pub settings: KubeSettings,
    trust_domain: TrustDomain,
    cache: Mutex<Cache>,
    /// Signalled after every change to the cache.
    pub(crate) changed: Notify,
    pods_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    /// Joins being checked now. Each costs a TokenReview and a pod read on the API server, and the join
    /// route is open to anyone who reaches the control plane: past this many, callers are asked to retry.
    pub(crate) joins: tokio::sync::Semaphore,
}

/// Kubernetes joins checked at once (see [`Kube::joins`]).
pub const MAX_CONCURRENT_JOINS: usize = 16;

#[derive(Debug, Default)]
struct Cache {
    /// Namespace name → in the mesh.
    namespaces: HashMap<String, bool>,
    /// (namespace, name) → pod.
    pods: HashMap<(String, String), Pod>,
}

impl Kube {
    pub fn new(client: KubeClient, settings: KubeSettings, trust_domain: TrustDomain) -> Self {
        Self {
            client,
            settings,
            trust_domain,
            cache: Mutex::new(Cache::default()),
            changed: Notify::new(),
            pods_synced: AtomicBool::new(false),
            namespaces_synced: AtomicBool::new(false),
            joins: tokio::sync::Semaphore::new(MAX_CONCURRENT_JOINS),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Both lists have been read once: until then the mesh is not published from a partial view.
    pub fn synced(&self) -> bool {
        self.pods_synced.load(Ordering::SeqCst) && self.namespaces_synced.load(Ordering::SeqCst)
    }

    /// The identity a pod would have, whether or not it is in the mesh.
    pub fn identity(&self, pod: &Pod) -> Option<SpiffeId> {
        let ns = pod.metadata.namespace.as_deref()?;
        let sa = pod
            .spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        SpiffeId::workload(&self.trust_domain, ns, sa).ok()
    }

    /// The mesh workload a pod is, or why it is not one.
    fn workload_of(&self, cache: &Cache, pod: &Pod) -> Option<Workload> {
        let ns = pod.metadata.namespace.as_deref()?;
        if !cache.namespaces.get(ns).copied().unwrap_or(false)
            || pod.spec.host_network
            || pod.finished()
        {
            return None;
        }
        let node = NodeName::new(pod.spec.node_name.as_deref()?).ok()?;
        let ips = pod.ips();
        if ips.is_empty() {
            return None;
        }
        Some(Workload {
            id: self.identity(pod)?,
            node,
            selector: Selector::Ips(ips),
            ports: Vec::new(),
            probe_ports: pod.probe_ports(),
        })
    }

    /// Every meshed pod as a workload, in a stable order (so equal states hash equally).
    ///
    /// An address is one pod's: when two meshed pods claim the same one (a terminating pod whose address
    /// was already given to a new pod), the pod not being deleted keeps it; if that does not settle it,
    /// neither gets it, since a wrong identity on an address is worse than none.
    pub fn workloads(&self) -> Vec<Workload> {
        let cache = self.cache();
        let mut keys: Vec<&(String, String)> = cache.pods.keys().collect();
        keys.sort();
        let meshed: Vec<(&Pod, Workload)> = keys
            .into_iter()
            .filter_map(|k| cache.pods.get(k))
            .filter_map(|p| Some((p, self.workload_of(&cache, p)?)))
            .collect();
        // Address → (claims by live pods, claims by terminating pods).
        let mut claims: HashMap<IpAddr, (u32, u32)> = HashMap::new();
        for (pod, w) in &meshed {
            for ip in w.selector.ips() {
                let c = claims.entry(*ip).or_default();
                if pod.metadata.deletion_timestamp.is_some() {
                    c.1 += 1;
                } else {
                    c.0 += 1;
                }
            }
        }
        meshed
            .into_iter()
            .filter(|(pod, w)| {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                w.selector.ips().iter().all(|ip| match claims.get(ip) {
                    Some(&(live, dying)) if deleting => live == 0 && dying == 1,
                    Some(&(live, _)) => live == 1,
                    None => true,
                })
            })
            .map(|(_, w)| w)
            .collect()
    }

    /// True when a pod of the proxy DaemonSet, not being deleted, is scheduled on `node`.
    pub fn proxy_pod_on(&self, node: &NodeName) -> bool {
        let s = &self.settings;
        self.cache().pods.values().any(|p| {
            p.metadata.namespace.as_deref() == Some(s.namespace.as_str())
                && p.spec.node_name.as_deref() == Some(node.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && !p.finished()
                && matches!(p.controller(), Some(("DaemonSet", name)) if name == s.proxy_daemonset)
        })
    }

    /// A pod of the gateway Deployment runs (its ReplicaSet is named `<Deployment>-<pod template hash>`;
    /// the join checked the ReplicaSet's owner): the gateway node may renew while one does.
    pub fn gateway_pod_running(&self) -> bool {
        let s = &self.settings;
        let prefix = format!("{}-", s.gateway_deployment);
        // The hash has no '-': `strait-gateway-canary-<hash>` is another Deployment's.
        let of_deployment = |rs: &str| {
            rs.strip_prefix(&prefix).is_some_and(|hash| {
                !hash.is_empty() && hash.chars().all(|c| c.is_ascii_alphanumeric())
            })
        };
        self.cache().pods.values().any(|p| {
            p.metadata.namespace.as_deref() == Some(s.namespace.as_str())
                && p.spec.service_account_name.as_deref()
                    == Some(s.gateway_service_account.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && !p.finished()
                && matches!(p.controller(), Some(("ReplicaSet", name)) if of_deployment(name))
        })
    }

    pub(crate) fn replace_namespaces(&self, items: Vec<Namespace>) {
        let mut c = self.cache();
        c.namespaces = items
            .into_iter()
            .map(|n| {
                let meshed = in_mesh(&n);
                (n.metadata.name, meshed)
            })
            .collect();
        drop(c);
        self.namespaces_synced.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    pub(crate) fn upsert_namespace(&self, n: Namespace) {
        let meshed = in_mesh(&n);
        self.cache().namespaces.insert(n.metadata.name, meshed);
        self.changed.notify_one();
    }

    pub(crate) fn remove_namespace(&self, n: &Namespace) {
        self.cache().namespaces.remove(&n.metadata.name);
        self.changed.notify_one();
    }

    pub(crate) fn replace_pods(&self, items: Vec<Pod>) {
        let mut c = self.cache();
        c.pods = items
            .into_iter()
            .filter_map(|p| Some((key(&p)?, p)))
            .collect();
        drop(c);
        self.pods_synced.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    pub(crate) fn upsert_pod(&self, p: Pod) {
        if let Some(k) = key(&p) {
            self.cache().pods.insert(k, p);
            self.changed.notify_one();
        }
    }

    pub(crate) fn remove_pod(&self, p: &Pod) {
        if let Some(k) = key(p) {
            self.cache().pods.remove(&k);
            self.changed.notify_one();
        }
    }
}

fn key(p: &Pod) -> Option<(String, String)> {
    Some((p.metadata.namespace.clone()?, p.metadata.name.clone()))
}

fn in_mesh(n: &Namespace) -> bool {
    n.metadata.labels.get(MESH_LABEL).map(String::as_str) == Some(MESH_LABEL_VALUE)
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A `Kube` whose client points nowhere (the cache is what unit tests exercise).
    pub fn kube() -> Kube {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t").unwrap();
        // A CA file is needed only to build the client; any certificate does.
        let ca = strait_ca::CertificateAuthority::generate(
            TrustDomain::new("cluster.local").unwrap(),
            std::time::Duration::from_secs(3600),
            std::time::SystemTime::now(),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.trust_bundle().to_pem()).unwrap();
        let client = KubeClient::new(&client::KubeConfig {
            server: "https://127.0.0.1:6443".into(),
            ca_file: dir.path().join("ca.crt"),
            token_file: dir.path().join("token"),
        })
        .unwrap();
        Kube::new(
            client,
            KubeSettings::default(),
            TrustDomain::new("cluster.local").unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::kube;
    use super::*;

    fn pod(json: &str) -> Pod {
        serde_json::from_str(json).unwrap()
    }

    fn ns(name: &str, meshed: bool) -> Namespace {
        let mut n = Namespace::default();
        n.metadata.name = name.into();
        if meshed {
            n.metadata
                .labels
                .insert(MESH_LABEL.into(), MESH_LABEL_VALUE.into());
        }
        n
    }

    #[test]
    fn only_running_pods_of_opted_in_namespaces_are_workloads() {
        let k = kube();
        k.replace_namespaces(vec![ns("shop", true), ns("other", false)]);
        let mk = |ns: &str, name: &str, extra: &str| {
            pod(&format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"nodeName":"n1","serviceAccountName":"web"{extra}}},
                "status":{{"phase":"Running","podIPs":[{{"ip":"10.244.1.{}"}}]}}}}"#,
                name.len()
            ))
        };
        k.replace_pods(vec![
            mk("shop", "web", ""),
            mk("other", "db", ""),
            mk("shop", "hostnet", r#","hostNetwork":true"#),
        ]);
        let w = k.workloads();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(w[0].node.as_str(), "n1");
        // The namespace loses its label: nothing is meshed any more.
        k.upsert_namespace(ns("shop", false));
        assert!(k.workloads().is_empty());
        k.upsert_namespace(ns("shop", true));
        let mut done = mk("shop", "web", "");
        done.status.phase = Some("Succeeded".into());
        k.upsert_pod(done);
        assert!(
            k.workloads().is_empty(),
            "a finished pod's IP may belong to another pod"
        );
    }

    #[test]
    fn an_address_claimed_twice_goes_to_the_live_pod_or_to_nobody() {
        let k = kube();
        k.replace_namespaces(vec![ns("shop", true)]);
        let mk = |name: &str, sa: &str, deleting: bool| {
            let del = if deleting {
                r#","deletionTimestamp":"2024-01-01T00:00:00Z""#
            } else {
                ""
            };
            pod(&format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"shop"{del}}},"spec":{{"nodeName":"n1","serviceAccountName":"{sa}"}},
                "status":{{"phase":"Running","podIPs":[{{"ip":"10.244.1.7"}}]}}}}"#
            ))
        };
        // A terminating pod whose address was given to a new pod: the new pod has it.
        k.replace_pods(vec![mk("old", "db", true), mk("new", "web", false)]);
        let w = k.workloads();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        // Alone, a terminating pod keeps its address until it is gone.
        k.replace_pods(vec![mk("old", "db", true)]);
        assert_eq!(k.workloads().len(), 1);
        // Two live pods on one address: nobody (a wrong identity is worse than none).
        k.replace_pods(vec![mk("a", "db", false), mk("b", "web", false)]);
        assert!(k.workloads().is_empty());
    }
}
