//! The proxy's subscription to the policy distributor: verify each pushed mesh version, compile its
//! policy, persist it, swap it in, and answer ACK; or refuse it (NACK) and keep enforcing the last good one.
//!
//! The applied version is persisted (`mesh-version.json`, the signed envelope exactly as received, 0600) and
//! re-verified on start, so a proxy restarted while the control plane is down enforces what it enforced
//! before, and a file altered on disk is refused like a tampered push.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strait_client::distributor::{Applier, Link};
use strait_proto::version::{Checked, Refusal, SignedVersion, Verifier, VersionPayload};
use tracing::{error, info};

use crate::authz::LoadedPolicy;

/// The persisted version in the proxy's data directory.
pub const PERSISTED: &str = "mesh-version.json";

/// A verified version whose policy compiled: ready to be swapped in.
pub struct Prepared {
    pub payload: VersionPayload,
    pub policy: LoadedPolicy,
    /// The keys to trust once this version is in force (its signer and the next key it announces).
    pub verifier: Verifier,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("number", &self.payload.number)
            .field("content_hash", &self.payload.content_hash)
            .finish_non_exhaustive()
    }
}

/// Verifies and compiles `v` (blocking: compiling a large bundle takes milliseconds).
pub fn prepare(
    verifier: &Verifier,
    v: &SignedVersion,
    have: Option<(u64, &str)>,
) -> Result<Option<Prepared>, Refusal> {
    let payload = match verifier.check(v, have)? {
        Checked::AlreadyApplied { .. } => return Ok(None),
        Checked::New(p) => *p,
    };
    let policy =
        LoadedPolicy::from_bundle(payload.bundle.clone()).map_err(|e| Refusal::BadPolicy {
            number: payload.number,
            reason: format!("{e:#}"),
        })?;
    let verifier = verifier.after(v, &payload);
    Ok(Some(Prepared {
        payload,
        policy,
        verifier,
    }))
}

/// Reads and verifies the persisted version. A missing file is `Ok(None)`; a file that fails verification is
/// an error (the caller logs it and starts with nothing).
pub fn load_persisted(dir: &Path, verifier: &Verifier) -> anyhow::Result<Option<Prepared>> {
    let path = dir.join(PERSISTED);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = strait_ca::files::read_secret(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let v: SignedVersion =
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    prepare(verifier, &v, None).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn persist(dir: &Path, v: &SignedVersion) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(v)?;
    strait_ca::files::write_atomic(&dir.join(PERSISTED), &bytes, strait_ca::files::SECRET_MODE)?;
    Ok(())
}

/// Where the proxy's distribution link stands, for `/ready` and `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeshStatus {
    pub version: Option<u64>,
    pub content_hash: Option<String>,
    /// "persisted" until the control plane confirmed or replaced it, then "control plane".
    pub source: &'static str,
    pub link: String,
    pub transport: Option<String>,
    pub fallback: bool,
    pub last_refusal: Option<String>,
    /// Ids of the distribution keys whose signatures this proxy accepts now.
    pub trusted_keys: Vec<String>,
}

/// What the link reports; the version itself is read from `current`, so it is never stored twice.
#[derive(Debug, Clone)]
struct LinkState {
    source: &'static str,
    link: String,
    transport: Option<String>,
    fallback: bool,
    last_refusal: Option<String>,
}

/// The proxy's [`Applier`].
pub struct ProxyApplier {
    node: Arc<crate::run::Node>,
    /// Replaced by each applied version's successor verifier (never held across an await).
    verifier: Mutex<Verifier>,
    data_dir: PathBuf,
    current: Mutex<Option<(u64, String)>>,
    state: Mutex<LinkState>,
}

impl ProxyApplier {
    pub fn new(node: Arc<crate::run::Node>, verifier: Verifier, data_dir: PathBuf) -> Self {
        Self {
            node,
            verifier: Mutex::new(verifier),
            data_dir,
            current: Mutex::new(None),
            state: Mutex::new(LinkState {
                source: "none",
                link: "connecting".into(),
                transport: None,
                fallback: false,
                last_refusal: None,
            }),
        }
    }

    fn set<T>(&self, f: impl FnOnce(&mut LinkState) -> T) -> T {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn verifier(&self) -> Verifier {
        self.verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn status(&self) -> MeshStatus {
        let current = self.current();
        let s = self.set(|s| s.clone());
        let trusted_keys = self.verifier().key_ids();
        MeshStatus {
            version: current.as_ref().map(|c| c.0),
            content_hash: current.map(|c| c.1),
            source: s.source,
            link: s.link,
            transport: s.transport,
            fallback: s.fallback,
            last_refusal: s.last_refusal,
            trusted_keys,
        }
    }

    /// Puts a verified, compiled version in force (from the control plane or, at start, from disk) and
    /// makes the proxy ready.
    pub fn install(&self, prepared: Prepared, source: &'static str) {
        let (number, hash) = (
            prepared.payload.number,
            prepared.payload.content_hash.clone(),
        );
        let next = prepared.verifier.clone();
        let (old, new) = (self.verifier().key_ids(), next.key_ids());
        if old != new {
            info!(version = number, trusted_keys = ?new, was = ?old, "distribution keys trusted from now on");
            // A restart must trust the key that signed the persisted version.
            if let Err(e) = strait_client::node::save_distribution_keys(&self.data_dir, next.keys())
            {
                error!(error = %e, "cannot save the trusted distribution keys");
            }
        }
        *self.verifier.lock().unwrap_or_else(|p| p.into_inner()) = next;
        self.node.install(prepared);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((number, hash));
        self.set(|s| {
            s.source = source;
            s.last_refusal = None;
        });
        self.node.metrics.mesh_version.set(number as i64);
        self.node.shared_ready();
    }
}

/// The version number a refused envelope claims, for the NACK (not trusted for anything else).
fn claimed_number(v: &SignedVersion) -> u64 {
    serde_json::from_slice::<serde_json::Value>(&v.payload)
        .ok()
        .and_then(|p| p.get("number").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

impl ProxyApplier {
    /// Verifies and compiles `v` on the blocking pool against the version in force.
    async fn prepare_off_thread(
        &self,
        v: &Arc<SignedVersion>,
    ) -> Result<Result<Option<Prepared>, Refusal>, (u64, String)> {
        let have = self.current();
        let verifier = self.verifier();
        let env = v.clone();
        tokio::task::spawn_blocking(move || {
            prepare(
                &verifier,
                &env,
                have.as_ref().map(|(n, h)| (*n, h.as_str())),
            )
        })
        .await
        .map_err(|e| (claimed_number(v), format!("apply task failed: {e}")))
    }
}

impl Applier for ProxyApplier {
    fn current(&self) -> Option<(u64, String)> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn apply(&self, v: SignedVersion) -> Result<(u64, String), (u64, String)> {
        let v = Arc::new(v);
        let mut prepared = self.prepare_off_thread(&v).await?;
        if let Err(Refusal::UnknownKey { key_id, .. }) = &prepared {
            // A rotation this proxy missed (it was away while the next key was announced): ask the control
            // plane, over the node's mTLS session, which keys sign now, and check again. A forged signature
            // under a made-up key id still fails: the control plane only names its own keys.
            let client = self.node.client.load_full();
            match client.distribution_keys().await {
                Ok(keys) => {
                    info!(key = %key_id, active = %keys.active.key_id(), next = ?keys.next.as_ref().map(|k| k.key_id()), "version signed by a distribution key not yet trusted; the control plane's keys are trusted now");
                    self.verifier
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .trust(std::iter::once(keys.active).chain(keys.next));
                    prepared = self.prepare_off_thread(&v).await?;
                }
                Err(e) => {
                    error!(key = %key_id, error = %e, "cannot ask the control plane for its distribution keys")
                }
            }
        }
        let prepared = match prepared {
            Ok(Some(p)) => p,
            Ok(None) => {
                // The version we already enforce (sent again after a reconnect).
                let (n, h) = self.current().unwrap_or_default();
                self.set(|s| s.source = "control plane");
                return Ok((n, h));
            }
            Err(refusal) => {
                let number = claimed_number(&v);
                error!(version = number, reason = %refusal, "mesh version refused; keeping the last good one");
                self.node.metrics.mesh_refused.inc();
                self.set(|s| s.last_refusal = Some(refusal.to_string()));
                return Err((number, refusal.to_string()));
            }
        };
        let (number, hash) = (
            prepared.payload.number,
            prepared.payload.content_hash.clone(),
        );
        // Persist first: an ACK promises that a restart enforces this version.
        if let Err(e) = persist(&self.data_dir, &v) {
            let reason = format!("cannot persist version {number}: {e:#}");
            error!(%reason, "mesh version refused");
            return Err((number, reason));
        }
        self.install(prepared, "control plane");
        self.node.metrics.mesh_applied.inc();
        info!(version = number, hash = %hash, "mesh version applied");
        Ok((number, hash))
    }

    fn link(&self, link: Link) {
        self.set(|s| match &link {
            Link::Connecting => s.link = "connecting".into(),
            Link::Connected {
                transport,
                fallback,
            } => {
                s.link = "connected".into();
                s.transport = Some(transport.to_string());
                s.fallback = *fallback;
            }
            Link::Down { error } => {
                s.link = format!("down: {error}");
                s.transport = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_policy::bundle::Bundle;
    use strait_proto::api::Directory;
    use strait_proto::version::SigningKey;

    fn version(key: &SigningKey, number: u64, rego_error: bool) -> SignedVersion {
        let wf = strait_policy::workflow::Workflow::from_yaml(
            "apiVersion: strait.dev/v1\nkind: Workflow\nmetadata: {name: t}\ntrustDomain: td\nactors:\n  - {name: a, services: [{name: a}]}\n",
        )
        .unwrap();
        let custom = if rego_error {
            vec![(
                "bad.rego".to_owned(),
                "package strait.custom.bad\nimport rego.v1\nallow if {\n input.x ==\n}\n"
                    .to_owned(),
            )]
        } else {
            vec![]
        };
        let bundle = Bundle::from_workflows(&[(&wf, &custom)], false).unwrap();
        let directory = Directory::default();
        key.sign(&VersionPayload {
            trust_domain: "td".into(),
            number,
            created_at_ms: 0,
            content_hash: VersionPayload::compute_hash(&directory, &bundle, None, None),
            directory,
            bundle,
            next_key: None,
            trust: None,
        })
    }

    #[test]
    fn persisted_versions_are_reverified_and_refused_when_altered() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::ephemeral();
        let verifier = Verifier::new(key.public(), "td");
        assert!(load_persisted(dir.path(), &verifier).unwrap().is_none());

        persist(dir.path(), &version(&key, 3, false)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(PERSISTED))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let p = load_persisted(dir.path(), &verifier).unwrap().unwrap();
        assert_eq!(p.payload.number, 3);

        // One byte of the payload changed on disk: the signature no longer holds.
        let mut v = version(&key, 3, false);
        let i = v.payload.len() / 2;
        v.payload[i] ^= 1;
        persist(dir.path(), &v).unwrap();
        let err = format!("{:#}", load_persisted(dir.path(), &verifier).unwrap_err());
        assert!(err.contains("signature"), "{err}");
    }

    #[test]
    fn a_signed_version_whose_policy_does_not_compile_is_refused() {
        let key = SigningKey::ephemeral();
        let verifier = Verifier::new(key.public(), "td");
        match prepare(&verifier, &version(&key, 4, true), None) {
            Err(Refusal::BadPolicy { number: 4, reason }) => assert!(!reason.is_empty()),
            Err(other) => panic!("unexpected refusal {other}"),
            Ok(_) => panic!("accepted a policy that does not compile"),
        }
        // Older than what is applied: refused before anything else.
        let hash = "x".to_owned();
        assert!(matches!(
            prepare(&verifier, &version(&key, 2, false), Some((4, &hash))),
            Err(Refusal::Older { have: 4, got: 2 })
        ));
    }
}
