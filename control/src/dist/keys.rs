//! The distribution key ring: the active key that signs mesh versions and, while a rotation is under way,
//! the next key, announced to proxies inside versions signed by the active one.
//!
//! A rotation has two steps, like SPIRE's `localauthority prepare` / `activate`:
//!
//! 1. **prepare**: a new key is generated here (it never leaves this process and its data directory, 0600)
//!    and every version from now on announces it (`next_key`), signed by the active key. A proxy that
//!    applies such a version trusts both keys.
//! 2. **activate**: once every registered node applied a version announcing the key, the next key becomes
//!    the active one (an atomic rename over the old key file) and signs the next version, which announces
//!    nothing. A proxy that applies it trusts the new key only, so the old key, even if it leaked, can no
//!    longer sign anything a proxy accepts.
//!
//! A node that was away for the whole rotation meets a version signed by a key it does not know; it asks
//! the control plane for the current keys over its mTLS session (authenticated like a join or renewal)
//! and applies the version then.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::version::{PublicKey, SigningKey, SIGNING_KEY_FILE};

/// The next key, while a rotation is prepared (PKCS#8, 0600).
pub const NEXT_KEY_FILE: &str = "distribution-key.next.pk8";

/// Why a rotation step was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no rotation is prepared: run `strait distribution-key prepare` first")]
    NothingPrepared,
    #[error("not every node has the next key yet: {} still run a version older than {announced_in}, the first to announce it. Wait until `strait distribution-key status` lists nobody, or pass --force (a node that missed the announcement fetches the keys from the control plane when it meets the new signature)", waiting_for.join(", "))]
    NotEveryNode {
        announced_in: u64,
        waiting_for: Vec<String>,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The key ring of one control plane.
pub struct KeyRing {
    /// Where the key files live; `None` for an in-memory ring (tests, benchmarks).
    dir: Option<PathBuf>,
    active: SigningKey,
    next: Option<SigningKey>,
    /// The first version that announced `next` (this process's knowledge; after a restart, the newest
    /// version, which is at least as late and so only more careful).
    announced_in: Option<u64>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active.public().key_id())
            .field("next", &self.next.as_ref().map(|k| k.public().key_id()))
            .finish_non_exhaustive()
    }
}

/// Where a rotation of the distribution key stands (the admin API's and `strait status`'s view).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyStatus {
    /// Id of the key signing versions now.
    pub active: String,
    /// Id of the announced next key, while a rotation is prepared.
    #[serde(default)]
    pub next: Option<String>,
    /// The first version known to announce it.
    #[serde(default)]
    pub announced_in: Option<u64>,
    /// Registered nodes that have not yet applied a version announcing it (activation waits for them).
    #[serde(default)]
    pub waiting_for: Vec<String>,
}

impl KeyRing {
    /// Opens the ring in a control plane's data directory, creating the active key on first use.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let active = SigningKey::load_or_create(dir).context("loading the distribution key")?;
        let next_path = dir.join(NEXT_KEY_FILE);
        let next = next_path
            .exists()
            .then(|| SigningKey::load_or_create_at(&next_path))
            .transpose()
            .context("loading the next distribution key")?;
        Ok(Self {
            dir: Some(dir.to_owned()),
            active,
            next,
            announced_in: None,
        })
    }

    /// A ring of one key that lives only in memory.
    pub fn in_memory(active: SigningKey) -> Self {
        Self {
            dir: None,
            active,
            next: None,
            announced_in: None,
        }
    }

    pub fn active(&self) -> &SigningKey {
        &self.active
    }

    pub fn next_public(&self) -> Option<PublicKey> {
        self.next.as_ref().map(SigningKey::public)
    }

    /// The public keys a node should trust now: the active one, then the next one if any.
    pub fn trusted(&self) -> (PublicKey, Option<PublicKey>) {
        (self.active.public(), self.next_public())
    }

    /// Records the first version that carried the next key (kept if already known).
    pub fn announced(&mut self, number: u64) {
        if self.next.is_some() && self.announced_in.is_none() {
            self.announced_in = Some(number);
        }
    }

    pub fn announced_in(&self) -> Option<u64> {
        self.announced_in
    }

    /// Step 1: generates the next key. Refused while one is already prepared.
    pub fn prepare(&mut self) -> anyhow::Result<PublicKey> {
        if let Some(next) = &self.next {
            anyhow::bail!(
                "a rotation is already prepared (next key {}); activate it first",
                next.public().key_id()
            );
        }
        let next = match &self.dir {
            Some(dir) => SigningKey::load_or_create_at(&dir.join(NEXT_KEY_FILE))?,
            None => SigningKey::ephemeral(),
        };
        let public = next.public();
        self.next = Some(next);
        self.announced_in = None;
        Ok(public)
    }

    /// Step 2: the next key becomes the active one. The caller has checked that nodes are ready.
    pub fn activate(&mut self) -> anyhow::Result<PublicKey> {
        let Some(next) = self.next.take() else {
            anyhow::bail!("no rotation is prepared: run `strait distribution-key prepare` first");
        };
        if let Some(dir) = &self.dir {
            // One rename: a crash leaves either the old ring (next still announced) or the new one.
            let (from, to) = (dir.join(NEXT_KEY_FILE), dir.join(SIGNING_KEY_FILE));
            if let Err(e) = std::fs::rename(&from, &to) {
                self.next = Some(next);
                return Err(e).with_context(|| {
                    format!("replacing {} with {}", to.display(), from.display())
                });
            }
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.active = next;
        self.announced_in = None;
        Ok(self.active.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_survives_a_restart_at_every_step_and_leaves_one_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyRing::open(dir.path()).unwrap().active().public();

        let mut ring = KeyRing::open(dir.path()).unwrap();
        assert_eq!(ring.active().public(), first);
        let next = ring.prepare().unwrap();
        assert!(ring.prepare().is_err(), "a second prepare is refused");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(NEXT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Restarted between the steps: the next key is still there.
        let mut ring = KeyRing::open(dir.path()).unwrap();
        assert_eq!(ring.trusted(), (first.clone(), Some(next.clone())));
        assert_eq!(ring.activate().unwrap(), next);
        assert!(ring.activate().is_err(), "nothing left to activate");

        let ring = KeyRing::open(dir.path()).unwrap();
        assert_eq!(ring.trusted(), (next, None));
        assert!(!dir.path().join(NEXT_KEY_FILE).exists());
    }
}
