//! Node proxies join with their projected service-account token instead of a join token.
//!
//! The checks, in order (each refusal says which one failed, in the log; the caller gets one generic
//! answer): TokenReview says the token is authentic and issued for the audience `strait`; it belongs to the
//! proxies' service account; it is bound to a pod (pod name and uid in the review's `extra`); that pod
//! exists now with that uid, is not being deleted, is controlled by the strait DaemonSet and is scheduled on
//! the node the proxy claims (and the review's node name, when the API server adds it, agrees). Only then is
//! a node SVID issued for that node. A token copied out of a proxy pod is therefore worth that one node's
//! identity, only while that pod exists.
//!
//! The trust bundle proxies use to authenticate the control plane on that first call is published by the
//! control plane in a ConfigMap ([`publish_bundle`]).

use std::time::Duration;
use strait_ca::SharedBundle;

use tracing::{info, warn};

use super::client::KubeError;
use super::model::{
    ConfigMap, ObjectMeta, Pod, ReplicaSet, TokenReview, TokenReviewSpec, EXTRA_NODE_NAME,
    EXTRA_POD_NAME, EXTRA_POD_UID,
};
use super::{Kube, AUDIENCE, BUNDLE_CONFIGMAP, BUNDLE_KEY};
use crate::registry::NodeName;

/// Why a proxy's token was not accepted (logged, never sent back in detail).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("TokenReview failed: {0}")]
    Review(KubeError),
    #[error("the token is not valid: {0}")]
    NotAuthenticated(String),
    #[error("the token was not issued for the audience {AUDIENCE:?} (audiences: {0:?})")]
    Audience(Vec<String>),
    #[error(
        "the token belongs to {0}, not to the proxies' or the gateways' service account ({1})"
    )]
    WrongAccount(String, String),
    #[error("the token is not bound to a pod (use a projected service-account token)")]
    NotPodBound,
    #[error("pod {0} cannot be read: {1}")]
    PodLookup(String, KubeError),
    #[error("pod {0} was replaced (uid {1}, the token names {2})")]
    PodReplaced(String, String, String),
    #[error("pod {0} is being deleted")]
    PodDeleting(String),
    #[error("pod {0} is not a pod of the DaemonSet {1} (controller: {2})")]
    NotProxyPod(String, String, String),
    #[error("pod {pod} runs on node {actual}, but the proxy asked for node {claimed}")]
    WrongNode {
        pod: String,
        actual: String,
        claimed: String,
    },
    #[error("a gateway joins as node {expected} (its Deployment), not {claimed}")]
    GatewayNode { expected: String, claimed: String },
    #[error("pod {0} is not a pod of the gateway Deployment {1} ({2})")]
    NotGatewayPod(String, String, String),
    #[error("node {0} is the name the gateways join as; a proxy cannot take it")]
    GatewaysName(String),
    #[error("ReplicaSet {0} cannot be read: {1}")]
    ReplicaSetLookup(String, KubeError),
}

/// What a service-account token proved its pod to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A pod of the proxy DaemonSet on the node it claims.
    Proxy,
    /// A pod of the gateway Deployment, joining as the Deployment's node.
    Gateway,
}

/// Checks a proxy's or a gateway's token for `node`; Ok says which, and that the node SVID may be issued.
pub async fn authenticate(kube: &Kube, token: &str, node: &NodeName) -> Result<Role, Refusal> {
    let review = TokenReview {
        api_version: "authentication.k8s.io/v1".into(),
        kind: "TokenReview".into(),
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: vec![AUDIENCE.into()],
        },
        status: None,
    };
    let answer: TokenReview = kube
        .client
        .post("/apis/authentication.k8s.io/v1/tokenreviews", &review)
        .await
        .map_err(Refusal::Review)?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Refusal::NotAuthenticated(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status.audiences.iter().any(|a| a == AUDIENCE) {
        return Err(Refusal::Audience(status.audiences));
    }
    let user = status.user.unwrap_or_default();
    let s = &kube.settings;
    let account = |sa: &str| format!("system:serviceaccount:{}:{sa}", s.namespace);
    let role = if user.username == account(&s.proxy_service_account) {
        Role::Proxy
    } else if user.username == account(&s.gateway_service_account) {
        Role::Gateway
    } else {
        return Err(Refusal::WrongAccount(
            user.username,
            format!(
                "{} or {}",
                account(&s.proxy_service_account),
                account(&s.gateway_service_account)
            ),
        ));
    };
    let (Some(pod_name), Some(pod_uid)) = (
        user.extra_one(EXTRA_POD_NAME),
        user.extra_one(EXTRA_POD_UID),
    ) else {
        return Err(Refusal::NotPodBound);
    };
    let full = format!("{}/{pod_name}", s.namespace);
    // Read the pod from the API, not the watch cache: the answer must be current.
    let pod: Pod = kube
        .client
        .get(&format!(
            "/api/v1/namespaces/{}/pods/{}",
            s.namespace,
            path_segment(pod_name)
        ))
        .await
        .map_err(|e| Refusal::PodLookup(full.clone(), e))?;
    if pod.metadata.uid != pod_uid {
        return Err(Refusal::PodReplaced(
            full,
            pod.metadata.uid,
            pod_uid.to_owned(),
        ));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Refusal::PodDeleting(full));
    }
    if role == Role::Gateway {
        return gateway_pod(kube, &pod, &full, node).await.map(|()| role);
    }
    if node.as_str() == s.gateway_deployment {
        return Err(Refusal::GatewaysName(node.to_string()));
    }
    match pod.controller() {
        Some(("DaemonSet", name)) if name == s.proxy_daemonset => {}
        other => {
            let c = other.map_or("none".to_owned(), |(k, n)| format!("{k}/{n}"));
            return Err(Refusal::NotProxyPod(full, s.proxy_daemonset.clone(), c));
        }
    }
    let actual = pod.spec.node_name.unwrap_or_default();
    let review_node = user.extra_one(EXTRA_NODE_NAME);
    if actual != node.as_str() || review_node.is_some_and(|n| n != node.as_str()) {
        return Err(Refusal::WrongNode {
            pod: full,
            actual,
            claimed: node.to_string(),
        });
    }
    Ok(role)
}

/// A gateway's pod: controlled by a ReplicaSet that the gateway Deployment controls (read from the API,
/// so a pod that merely names a ReplicaSet with the right prefix is not enough), and joining as the
/// Deployment's node. Every replica shares that one node identity: partners dial the load balancer in
/// front of the replicas and must find, whichever answers, the identity the export names.
async fn gateway_pod(kube: &Kube, pod: &Pod, full: &str, node: &NodeName) -> Result<(), Refusal> {
    let s = &kube.settings;
    if node.as_str() != s.gateway_deployment {
        return Err(Refusal::GatewayNode {
            expected: s.gateway_deployment.clone(),
            claimed: node.to_string(),
        });
    }
    let not_ours =
        |why: String| Refusal::NotGatewayPod(full.to_owned(), s.gateway_deployment.clone(), why);
    let rs_name = match pod.controller() {
        Some(("ReplicaSet", name)) => name.to_owned(),
        other => {
            let c = other.map_or("none".to_owned(), |(k, n)| format!("{k}/{n}"));
            return Err(not_ours(format!("controller: {c}")));
        }
    };
    let rs: ReplicaSet = kube
        .client
        .get(&format!(
            "/apis/apps/v1/namespaces/{}/replicasets/{}",
            s.namespace,
            path_segment(&rs_name)
        ))
        .await
        .map_err(|e| Refusal::ReplicaSetLookup(format!("{}/{rs_name}", s.namespace), e))?;
    match rs.controller() {
        Some(("Deployment", name)) if name == s.gateway_deployment => Ok(()),
        other => {
            let c = other.map_or("none".to_owned(), |(k, n)| format!("{k}/{n}"));
            Err(not_ours(format!(
                "ReplicaSet {rs_name} is controlled by {c}"
            )))
        }
    }
}

/// A pod name is a DNS label; anything else cannot name a pod and must not reach the URL unescaped.
fn path_segment(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .collect()
}

/// Keeps the ConfigMap holding the trust bundle up to date (created if missing, replaced if different):
/// at once when the bundle changes (a CA rotation step), and every few minutes in case it was deleted or
/// edited.
pub async fn publish_bundle(kube: std::sync::Arc<Kube>, bundle: std::sync::Arc<SharedBundle>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let current = bundle.load_full();
        match ensure_bundle(&kube, &current.to_pem()).await {
            Ok(changed) => {
                if changed {
                    info!(
                        namespace = %kube.settings.namespace,
                        configmap = BUNDLE_CONFIGMAP,
                        anchors = current.certs().len(),
                        "trust bundle published for node proxies"
                    );
                }
                backoff = Duration::from_millis(200);
                // A rotation step stores a new bundle: comparing the pointer is enough, and costs nothing.
                let recheck = tokio::time::Instant::now() + Duration::from_secs(300);
                while tokio::time::Instant::now() < recheck
                    && std::sync::Arc::ptr_eq(&bundle.load(), &current)
                {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "cannot publish the trust bundle ConfigMap");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn ensure_bundle(kube: &Kube, pem: &str) -> Result<bool, KubeError> {
    let ns = &kube.settings.namespace;
    let path = format!("/api/v1/namespaces/{ns}/configmaps/{BUNDLE_CONFIGMAP}");
    let existing: Option<ConfigMap> = match kube.client.get(&path).await {
        Ok(cm) => Some(cm),
        Err(e) if e.code() == Some(404) => None,
        Err(e) => return Err(e),
    };
    let mut cm = ConfigMap {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        metadata: ObjectMeta {
            name: BUNDLE_CONFIGMAP.into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        data: [(BUNDLE_KEY.to_owned(), pem.to_owned())].into(),
    };
    cm.metadata
        .labels
        .insert("app.kubernetes.io/part-of".into(), "strait".into());
    match existing {
        None => {
            let _: ConfigMap = kube
                .client
                .post(&format!("/api/v1/namespaces/{ns}/configmaps"), &cm)
                .await?;
            Ok(true)
        }
        Some(old) if old.data.get(BUNDLE_KEY).map(String::as_str) == Some(pem) => Ok(false),
        Some(old) => {
            // Optimistic concurrency: replace exactly the version read.
            cm.metadata.resource_version = old.metadata.resource_version;
            let _: ConfigMap = kube.client.put(&path, &cm).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_cannot_escape_the_path() {
        assert_eq!(path_segment("strait-proxy-x7k2p"), "strait-proxy-x7k2p");
        assert_eq!(path_segment("../../secrets?x=1"), "....secretsx1");
    }
}
