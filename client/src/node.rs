//! The node side of the API: joining with a token, renewing the node SVID, obtaining workload SVIDs and
//! fetching the directory. Keys are generated here, in the process that will use them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use strait_ca::cert::certs_from_pem;
use strait_ca::csr::generate_key_and_csr;
use strait_ca::files::{self, PUBLIC_MODE, SECRET_MODE};
use strait_ca::{SpiffeId, Svid, TrustBundle, TrustDomain};

use crate::client::{ApiClient, ClientError, ServerTrust};
use strait_proto::api::{self, paths};
use strait_proto::tokens::{sha256, JoinToken};
use strait_proto::version::PublicKey;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Api(#[from] ClientError),
    /// The reason is the source (one "invalid join token: …" line in an error chain, not the reason twice).
    #[error("invalid join token")]
    Token(#[from] strait_proto::tokens::TokenError),
    #[error("the control plane answered with an unusable certificate or bundle: {0}")]
    BadAnswer(String),
    #[error("cannot generate a key: {0}")]
    Key(String),
    #[error(transparent)]
    File(#[from] strait_ca::files::FileError),
}

/// A node's identity: its SVID (key generated here) and the trust bundle.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub svid: Svid,
    pub bundle: Arc<TrustBundle>,
    pub not_after: SystemTime,
    /// The policy distributor's public key: mesh versions must carry its signature.
    pub distribution_key: Option<PublicKey>,
    /// The next distribution key, while the control plane rotates it.
    pub distribution_next_key: Option<PublicKey>,
}

impl NodeIdentity {
    /// The distribution keys to trust: the active one, then the next one.
    pub fn distribution_keys(&self) -> Vec<PublicKey> {
        self.distribution_key
            .iter()
            .chain(&self.distribution_next_key)
            .cloned()
            .collect()
    }
}

/// Files a node keeps in its data directory.
pub mod layout {
    pub const NODE_CERT: &str = "node-cert.pem";
    pub const NODE_KEY: &str = "node-key.pem";
    pub const BUNDLE: &str = "bundle.pem";
    /// The federated trust domains' bundles (JSON: trust domain → PEM), when there are any.
    pub const FEDERATED: &str = "federated-bundles.json";
    pub const DISTRIBUTION_KEY: &str = "distribution-key.pub";
}

fn new_csr() -> Result<(PrivateKeyDer<'static>, String), NodeError> {
    let (key, der) = generate_key_and_csr().map_err(|e| NodeError::Key(e.to_string()))?;
    Ok((
        key,
        strait_ca::cert::pem_encode("CERTIFICATE REQUEST", &der),
    ))
}

fn identity_from(
    resp: api::NodeCertResponse,
    key: PrivateKeyDer<'static>,
) -> Result<NodeIdentity, NodeError> {
    let bad = |e: &dyn std::fmt::Display| NodeError::BadAnswer(e.to_string());
    let td = TrustDomain::new(&resp.trust_domain).map_err(|e| bad(&e))?;
    let bundle = TrustBundle::from_pem(td, &resp.bundle_pem)
        .map_err(|e| bad(&e))?
        .federate(federated_bundles(&resp.federated).map_err(|e| bad(&e))?);
    let chain = certs_from_pem(&resp.chain_pem).map_err(|e| bad(&e))?;
    let id = strait_ca::cert::svid_id(&chain[0]).map_err(|e| bad(&e))?;
    if id != resp.id {
        return Err(NodeError::BadAnswer(format!(
            "asked for {}, got a certificate for {id}",
            resp.id
        )));
    }
    let parse = |k: &Option<String>| {
        k.as_deref()
            .map(PublicKey::parse)
            .transpose()
            .map_err(|e| bad(&e))
    };
    let distribution_key = parse(&resp.distribution_key)?;
    let distribution_next_key = parse(&resp.distribution_next_key)?;
    Ok(NodeIdentity {
        svid: Svid { id, chain, key },
        bundle: Arc::new(bundle),
        not_after: UNIX_EPOCH + Duration::from_secs(resp.not_after),
        distribution_key,
        distribution_next_key,
    })
}

/// Parses the federated bundles a node was handed (or saved).
fn federated_bundles(list: &[api::FederatedBundle]) -> Result<Vec<TrustBundle>, String> {
    list.iter().map(api::FederatedBundle::parse).collect()
}

/// Where a node can be reached, as it tells the control plane on join and renewal.
#[derive(Debug, Clone, Default)]
pub struct Advert {
    /// host:port of the node's tunnel listener.
    pub tunnel_address: Option<String>,
    /// Every address of the node (IPv4 and IPv6).
    pub addresses: Vec<std::net::IpAddr>,
    /// host:port where partners reach this node as the organisation's ingress gateway.
    pub gateway_address: Option<String>,
}

/// Joins the mesh with a one-time token; the control plane is authenticated by the anchor pin in the token.
pub async fn join(server: &str, token: &str, advert: Advert) -> Result<NodeIdentity, NodeError> {
    let parsed = JoinToken::parse(token)?;
    let client = ApiClient::new(server, ServerTrust::Pin(parsed.ca_pin), None, None)?;
    let (key, csr_pem) = new_csr()?;
    let resp: api::NodeCertResponse = client
        .post(
            paths::JOIN,
            &api::JoinRequest {
                token: token.trim().to_owned(),
                csr_pem,
                tunnel_address: advert.tunnel_address,
                addresses: advert.addresses,
                gateway_address: advert.gateway_address,
            },
        )
        .await
        .map_err(|e| match e {
            // The handshake failed before the token was sent, so the token is not spent.
            ClientError::Tls(m) if m.contains("not issued by a CA") => ClientError::Tls(format!(
                "{m}: the control plane does not present the root CA this join token pins; the token \
                 belongs to another control plane, or the root it pins was withdrawn by a CA rotation \
                 since it was made (create a new token with `strait node token create`)"
            )),
            e => e,
        })?;
    let identity = identity_from(resp, key)?;
    // The bundle handed over must contain the anchor the token pinned.
    if !identity
        .bundle
        .certs()
        .iter()
        .any(|c| sha256(c.as_ref()) == parsed.ca_pin)
    {
        return Err(NodeError::BadAnswer(
            "the trust bundle does not contain the CA pinned by the join token".into(),
        ));
    }
    Ok(identity)
}

/// Kubernetes mode: joins with the pod's projected service-account token. The control plane is
/// authenticated with the trust bundle it published (mounted from its ConfigMap), since there is no join
/// token to carry a pin.
pub async fn join_kubernetes(
    server: &str,
    bundle: Arc<TrustBundle>,
    service_account_token: &str,
    node: &strait_proto::registry::NodeName,
    advert: Advert,
) -> Result<NodeIdentity, NodeError> {
    let client = ApiClient::new(server, ServerTrust::Bundle(bundle.clone()), None, None)?;
    let (key, csr_pem) = new_csr()?;
    let resp: api::NodeCertResponse = client
        .post(
            paths::JOIN_KUBERNETES,
            &api::KubeJoinRequest {
                token: service_account_token.trim().to_owned(),
                node: node.clone(),
                csr_pem,
                tunnel_address: advert.tunnel_address,
                addresses: advert.addresses,
                gateway_address: advert.gateway_address,
            },
        )
        .await?;
    let identity = identity_from(resp, key)?;
    if identity.bundle.certs() != bundle.certs() {
        return Err(NodeError::BadAnswer(
            "the control plane answered with a trust bundle other than the one mounted".into(),
        ));
    }
    Ok(identity)
}

impl NodeIdentity {
    pub fn id(&self) -> &SpiffeId {
        &self.svid.id
    }

    /// TLS client configuration for the policy distributor: this node's SVID, the control plane checked
    /// against the trust bundle and its SPIFFE ID.
    pub fn control_tls(&self) -> Result<rustls::ClientConfig, NodeError> {
        Ok(crate::client::control_tls(
            ServerTrust::Bundle(self.bundle.clone()),
            Some(&self.svid),
        )?)
    }

    /// Writes the node SVID (key 0600) and bundle into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), NodeError> {
        files::create_private_dir(dir)?;
        let key = strait_ca::cert::pem_encode("PRIVATE KEY", self.svid.key.secret_der());
        files::write_atomic(&dir.join(layout::NODE_KEY), key.as_bytes(), SECRET_MODE)?;
        files::write_atomic(
            &dir.join(layout::NODE_CERT),
            strait_ca::cert::certs_to_pem(&self.svid.chain).as_bytes(),
            PUBLIC_MODE,
        )?;
        files::write_atomic(
            &dir.join(layout::BUNDLE),
            self.bundle.to_pem().as_bytes(),
            PUBLIC_MODE,
        )?;
        let federated: Vec<api::FederatedBundle> = self
            .bundle
            .federated()
            .map(|b| api::FederatedBundle {
                trust_domain: b.trust_domain().to_string(),
                bundle_pem: b.to_pem(),
            })
            .collect();
        let federated_file = dir.join(layout::FEDERATED);
        if federated.is_empty() {
            if federated_file.exists() {
                std::fs::remove_file(&federated_file).map_err(|e| {
                    NodeError::BadAnswer(format!("removing {}: {e}", federated_file.display()))
                })?;
            }
        } else {
            let json = serde_json::to_vec_pretty(&federated)
                .map_err(|e| NodeError::BadAnswer(e.to_string()))?;
            files::write_atomic(&federated_file, &json, PUBLIC_MODE)?;
        }
        if self.distribution_key.is_some() {
            save_distribution_keys(dir, &self.distribution_keys())?;
        }
        Ok(())
    }

    /// Reads what [`save`](Self::save) wrote; refuses a key others can read.
    pub fn load(dir: &Path) -> Result<Self, NodeError> {
        let bad = |e: &dyn std::fmt::Display| NodeError::BadAnswer(e.to_string());
        let key_pem = files::read_secret_pem(&dir.join(layout::NODE_KEY))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&e))?;
        let chain =
            certs_from_pem(&files::read_pem(&dir.join(layout::NODE_CERT))?).map_err(|e| bad(&e))?;
        let summary = strait_ca::cert::CertSummary::of(&chain[0]).map_err(|e| bad(&e))?;
        let id = summary.spiffe_id.map_err(|e| bad(&e))?;
        let bundle = TrustBundle::from_pem(
            id.trust_domain(),
            &files::read_pem(&dir.join(layout::BUNDLE))?,
        )
        .map_err(|e| bad(&e))?;
        let federated_file = dir.join(layout::FEDERATED);
        // A damaged copy is not a reason to refuse to start: the node then trusts no partner until its
        // next renewal brings the bundles again (fail closed for partners only).
        let bundle = match federated_file.exists().then(|| {
            files::read_pem(&federated_file)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    serde_json::from_str::<Vec<api::FederatedBundle>>(&text)
                        .map_err(|e| e.to_string())
                })
                .and_then(|list| federated_bundles(&list))
        }) {
            Some(Ok(partners)) => bundle.federate(partners),
            Some(Err(e)) => {
                tracing::warn!(file = %federated_file.display(), error = %e, "the saved federated bundles are unreadable; no partner is trusted until the next renewal");
                bundle
            }
            None => bundle,
        };
        let key_file = dir.join(layout::DISTRIBUTION_KEY);
        let mut keys = if key_file.exists() {
            files::read_pem(&key_file)?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(PublicKey::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(&e))?
        } else {
            Vec::new()
        }
        .into_iter();
        let (distribution_key, distribution_next_key) = (keys.next(), keys.next());
        Ok(Self {
            svid: Svid { id, chain, key },
            bundle: Arc::new(bundle),
            not_after: summary.not_after,
            distribution_key,
            distribution_next_key,
        })
    }
}

/// Writes the distribution keys a node trusts, one per line (the active one first), so that a restart
/// verifies the persisted mesh version with what was trusted when it was applied.
pub fn save_distribution_keys(dir: &Path, keys: &[PublicKey]) -> Result<(), NodeError> {
    let lines: String = keys.iter().map(|k| k.to_base64() + "\n").collect();
    files::write_atomic(
        &dir.join(layout::DISTRIBUTION_KEY),
        lines.as_bytes(),
        PUBLIC_MODE,
    )?;
    Ok(())
}

/// A node's authenticated session with the control plane (mTLS with the node SVID).
pub struct NodeClient {
    api: ApiClient,
}

impl NodeClient {
    pub fn new(server: &str, identity: &NodeIdentity) -> Result<Self, NodeError> {
        Ok(Self {
            api: ApiClient::new(
                server,
                ServerTrust::Bundle(identity.bundle.clone()),
                Some(&identity.svid),
                None,
            )?,
        })
    }

    /// A new node SVID (new key) authenticated by the current one.
    pub async fn renew(&self, advert: Advert) -> Result<NodeIdentity, NodeError> {
        let (key, csr_pem) = new_csr()?;
        let resp: api::NodeCertResponse = self
            .api
            .post(
                paths::NODE_RENEW,
                &api::RenewRequest {
                    csr_pem,
                    tunnel_address: advert.tunnel_address,
                    addresses: advert.addresses,
                    gateway_address: advert.gateway_address,
                },
            )
            .await?;
        identity_from(resp, key)
    }

    /// An SVID for a workload registered on this node, with a key generated here.
    pub async fn workload_svid(
        &self,
        workload: &SpiffeId,
    ) -> Result<(Svid, SystemTime), NodeError> {
        let (key, csr_pem) = new_csr()?;
        self.workload_svid_for_csr(workload, key, csr_pem).await
    }

    /// Like [`workload_svid`](Self::workload_svid) with a key and CSR made by the caller.
    pub async fn workload_svid_for_csr(
        &self,
        workload: &SpiffeId,
        key: PrivateKeyDer<'static>,
        csr_pem: String,
    ) -> Result<(Svid, SystemTime), NodeError> {
        let resp: api::SvidResponse = self
            .api
            .post(
                paths::NODE_SVIDS,
                &api::SvidRequest {
                    workload: workload.clone(),
                    csr_pem,
                },
            )
            .await?;
        let chain =
            certs_from_pem(&resp.chain_pem).map_err(|e| NodeError::BadAnswer(e.to_string()))?;
        let id =
            strait_ca::cert::svid_id(&chain[0]).map_err(|e| NodeError::BadAnswer(e.to_string()))?;
        if &id != workload {
            return Err(NodeError::BadAnswer(format!(
                "asked for {workload}, got {id}"
            )));
        }
        Ok((
            Svid { id, chain, key },
            UNIX_EPOCH + Duration::from_secs(resp.not_after),
        ))
    }

    pub async fn directory(&self) -> Result<api::Directory, NodeError> {
        Ok(self.api.get(paths::NODE_DIRECTORY).await?)
    }

    /// The distribution keys to trust now, asked over this authenticated session (a node that missed a
    /// rotation's announcement learns the new key this way).
    pub async fn distribution_keys(&self) -> Result<api::DistributionKeys, NodeError> {
        Ok(self.api.get(paths::NODE_DISTRIBUTION_KEYS).await?)
    }
}

/// A key and PEM CSR for callers that want to prepare requests ahead of time (benchmarks).
pub fn prepare_csr() -> Result<(PrivateKeyDer<'static>, String), NodeError> {
    new_csr()
}
