//! The control plane's state in one redb file.
//!
//! Why redb: a single file, no server, pure Rust, ACID transactions with copy-on-write pages and a
//! checksummed commit slot, so a crash at any moment leaves the last committed transaction intact; a
//! commit returns only after `fsync` (`Durability::Immediate`), which is what "acknowledged writes
//! survive `kill -9`" needs. SQLite would do as well but adds a C library for no gain here.
//!
//! Values are JSON: the store is small (thousands of workloads), and JSON keeps it inspectable and lets
//! fields be added without migrations. Every method is one transaction and blocks on disk I/O: async
//! callers run them on the blocking pool.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use strait_ca::SpiffeId;

use crate::registry::{NodeName, Workload};
use crate::tokens::{hashes_equal, Sha256};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const WORKLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("workloads");
const WORKFLOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("workflows");
/// Federation relationships by partner trust domain.
const FEDERATION: TableDefinition<&str, &[u8]> = TableDefinition::new("federation");

const KEY_ADMIN_HASH: &str = "admin_token_sha256";
/// The local bundle's `spiffe_sequence` and the fingerprint it was given for.
const KEY_BUNDLE_SEQUENCE: &str = "bundle_sequence";
/// Bumped by every change to the directory (workloads, node addresses): the version proxies compare.
const KEY_REVISION: &str = "registry_revision";
/// Whether connections to partners must leave through this organisation's gateways (a bool).
const KEY_EGRESS: &str = "egress_through_gateways";
/// The newest signed mesh version (directory + policy), as the distributor pushes it.
const KEY_MESH_VERSION: &str = "mesh_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    #[error("store record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(impl From<$t> for StoreError {
        fn from(e: $t) -> Self { StoreError::Db(e.into()) }
    })*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A join token as stored: the secret's hash, never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub node: NodeName,
    pub secret_sha256: Sha256,
    pub created_at: u64,
    pub expires_at: u64,
    pub used_at: Option<u64>,
    /// The node joins as an ingress gateway (`strait node token create --gateway`): only such a node may
    /// tell partners where to reach the organisation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

/// Why a join token was refused. Each case is logged; the caller sees one generic refusal so that a
/// guesser learns nothing about which tokens exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("join token secret does not match")]
    WrongSecret,
    #[error("join token expired")]
    Expired,
    #[error("join token already used (replay)")]
    Replayed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: NodeName,
    /// Where other proxies reach this node's tunnel port (host:port), as the node reported it.
    pub tunnel_address: Option<String>,
    /// Every address of the node; connections to them are routed to its tunnel.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    pub joined_at: u64,
    pub cert_not_after: u64,
    /// Last time the node renewed or asked for certificates (persisted on those writes only).
    pub last_cert_at: u64,
    /// Joined with a Kubernetes service-account token: renewals need its proxy pod to still exist.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub via_kubernetes: bool,
    /// An ingress gateway (`strait gateway`): where partners reach it (host:port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_address: Option<String>,
    /// Joined with a gateway token: the one kind of node that may set `gateway_address` (and that has no
    /// tunnel or workload addresses).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

impl NodeRecord {
    /// Whether `new` is reached differently than this record (the directory, hence its revision, moves).
    pub fn reach_changed(&self, new: &NodeRecord) -> bool {
        self.tunnel_address != new.tunnel_address
            || self.addresses != new.addresses
            || self.gateway_address != new.gateway_address
    }
}

/// A workflow as the operator applied it: its YAML and custom Rego modules, kept verbatim so that `strait
/// workflow show` returns what was written and the bundle can be rebuilt from the source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkflowRecord {
    pub name: String,
    pub yaml: String,
    #[serde(default)]
    pub modules: Vec<CustomModule>,
    pub applied_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CustomModule {
    pub file: String,
    pub source: String,
}

/// Result of an upsert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the store file with mode 0600 and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let txn = db.begin_write()?;
        for t in [META, TOKENS, NODES, WORKLOADS, WORKFLOWS, FEDERATION] {
            txn.open_table(t)?;
        }
        txn.commit()?;
        Ok(Self { db })
    }

    pub fn admin_hash(&self) -> Result<Option<Sha256>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(META)?;
        let v = t.get(KEY_ADMIN_HASH)?;
        v.map(|v| decode(KEY_ADMIN_HASH, v.value())).transpose()
    }

    pub fn set_admin_hash(&self, hash: &Sha256) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert(KEY_ADMIN_HASH, encode(hash).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn put_token(&self, id: &str, rec: &TokenRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TOKENS)?.insert(id, encode(rec).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Checks a join token and marks it used, in one durable transaction: two concurrent joins with the
    /// same token cannot both succeed, and a crash after the answer cannot make a used token usable again.
    /// Expired and used tokens are deleted lazily here.
    pub fn consume_token(
        &self,
        id: &str,
        secret_hash: &Sha256,
        now: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut t = txn.open_table(TOKENS)?;
            let rec: Option<TokenRecord> = t.get(id)?.map(|v| decode(id, v.value())).transpose()?;
            match rec {
                None => Err(TokenRefusal::Unknown),
                Some(r) if !hashes_equal(&r.secret_sha256, secret_hash) => {
                    Err(TokenRefusal::WrongSecret)
                }
                Some(r) if r.used_at.is_some() => Err(TokenRefusal::Replayed),
                Some(r) if now >= r.expires_at => Err(TokenRefusal::Expired),
                Some(mut r) => {
                    r.used_at = Some(now);
                    // Keep the used record until it would have expired, so a replay is reported as a
                    // replay (not as an unknown token) while the token is still fresh.
                    t.insert(id, encode(&r).as_slice())?;
                    Ok(r)
                }
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Removes join tokens that expired before `now` (used or not).
    pub fn purge_expired_tokens(&self, now: u64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let n = {
            let mut t = txn.open_table(TOKENS)?;
            let mut expired = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                let rec: TokenRecord = decode(k.value(), v.value())?;
                if rec.expires_at <= now {
                    expired.push(k.value().to_owned());
                }
            }
            for k in &expired {
                t.remove(k.as_str())?;
            }
            expired.len()
        };
        txn.commit()?;
        Ok(n)
    }

    /// Writes a node record. A new node, or a change of its addresses, changes the directory, so the
    /// revision moves; a renewal that only updates certificate times does not.
    pub fn put_node(&self, rec: &NodeRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(NODES)?;
            let key = rec.name.as_str();
            let old: Option<NodeRecord> =
                t.get(key)?.map(|v| decode(key, v.value())).transpose()?;
            t.insert(key, encode(rec).as_slice())?;
            let moved = old.is_none_or(|o| o.reach_changed(rec));
            if moved {
                bump_revision(&txn)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NODES)?;
        let v = t.get(name)?;
        v.map(|v| decode(name, v.value())).transpose()
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.all(NODES)
    }

    pub fn workloads(&self) -> Result<Vec<Workload>, StoreError> {
        self.all(WORKLOADS)
    }

    pub fn workload(&self, id: &SpiffeId) -> Result<Option<Workload>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(WORKLOADS)?;
        let v = t.get(id.as_str())?;
        v.map(|v| decode(id.as_str(), v.value())).transpose()
    }

    /// The `spiffe_sequence` of the bundle with this fingerprint: the stored one if the bundle is the one
    /// it was given for, the next one (stored) if the bundle changed. Monotonic across restarts.
    pub fn bundle_sequence(&self, fingerprint: &str) -> Result<u64, StoreError> {
        #[derive(Serialize, Deserialize)]
        struct Seq {
            fingerprint: String,
            sequence: u64,
        }
        let txn = self.db.begin_write()?;
        let sequence = {
            let mut meta = txn.open_table(META)?;
            let old: Option<Seq> = meta
                .get(KEY_BUNDLE_SEQUENCE)?
                .map(|v| decode(KEY_BUNDLE_SEQUENCE, v.value()))
                .transpose()?;
            match old {
                Some(o) if o.fingerprint == fingerprint => return Ok(o.sequence),
                o => {
                    let sequence = o.map_or(1, |o| o.sequence + 1);
                    let rec = Seq {
                        fingerprint: fingerprint.to_owned(),
                        sequence,
                    };
                    meta.insert(KEY_BUNDLE_SEQUENCE, encode(&rec).as_slice())?;
                    sequence
                }
            }
        };
        txn.commit()?;
        Ok(sequence)
    }

    /// Changes one relationship in one transaction: `f` gets the stored record (if any) and returns what
    /// to store (`None`: leave it as it is). Returns what `f` returned. Adds, refreshes and removals that
    /// overlap (a fetch takes seconds) never undo one another this way.
    pub fn update_federation(
        &self,
        td: &str,
        f: impl FnOnce(Option<crate::federation::Record>) -> Option<crate::federation::Record>,
    ) -> Result<Option<crate::federation::Record>, StoreError> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut t = txn.open_table(FEDERATION)?;
            let old: Option<crate::federation::Record> =
                t.get(td)?.map(|v| decode(td, v.value())).transpose()?;
            let shared = old.as_ref().map(|o| (o.exports.clone(), o.imports.clone()));
            let new = f(old);
            if let Some(rec) = &new {
                t.insert(td, encode(rec).as_slice())?;
                // Exports and imports are part of the directory: its revision moves with them, in the
                // same transaction.
                if shared.as_ref() != Some(&(rec.exports.clone(), rec.imports.clone())) {
                    bump_revision(&txn)?;
                }
            }
            new
        };
        txn.commit()?;
        Ok(out)
    }

    /// Turns egress through the gateways on or off; whether it changed (then the directory's revision
    /// moves in the same transaction).
    pub fn set_egress_through_gateways(&self, on: bool) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let changed = {
            let mut meta = txn.open_table(META)?;
            let was: bool = meta
                .get(KEY_EGRESS)?
                .map(|v| decode(KEY_EGRESS, v.value()))
                .transpose()?
                .unwrap_or(false);
            if was != on {
                meta.insert(KEY_EGRESS, encode(&on).as_slice())?;
            }
            was != on
        };
        if changed {
            bump_revision(&txn)?;
        }
        txn.commit()?;
        Ok(changed)
    }

    pub fn federation(&self, td: &str) -> Result<Option<crate::federation::Record>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FEDERATION)?;
        let v = t.get(td)?;
        v.map(|v| decode(td, v.value())).transpose()
    }

    pub fn federations(&self) -> Result<Vec<crate::federation::Record>, StoreError> {
        self.all(FEDERATION)
    }

    pub fn remove_federation(&self, td: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(FEDERATION)?.remove(td)?.is_some();
        if existed {
            // Its exports and imports leave the directory.
            bump_revision(&txn)?;
        }
        txn.commit()?;
        Ok(existed)
    }

    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(def)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(META)?;
        let v = t.get(KEY_REVISION)?;
        Ok(v.map(|v| decode(KEY_REVISION, v.value()))
            .transpose()?
            .unwrap_or(0))
    }

    /// Creates or updates workloads in one transaction (all or nothing). Identical entries are left alone,
    /// and the revision moves only if something changed, so applying the same file twice changes nothing.
    pub fn apply(&self, workloads: &[Workload]) -> Result<ApplyReport, StoreError> {
        let txn = self.db.begin_write()?;
        let mut report = ApplyReport::default();
        {
            let mut t = txn.open_table(WORKLOADS)?;
            for w in workloads {
                let key = w.id.as_str();
                let old: Option<Workload> =
                    t.get(key)?.map(|v| decode(key, v.value())).transpose()?;
                match old {
                    Some(o) if &o == w => report.unchanged += 1,
                    Some(_) => {
                        t.insert(key, encode(w).as_slice())?;
                        report.updated += 1;
                    }
                    None => {
                        t.insert(key, encode(w).as_slice())?;
                        report.created += 1;
                    }
                }
            }
            if report.created + report.updated > 0 {
                bump_revision(&txn)?;
            }
        }
        txn.commit()?;
        Ok(report)
    }

    /// The mesh directory: every workload and every node's addresses, read in one transaction.
    pub fn directory(&self) -> Result<crate::api::Directory, StoreError> {
        let txn = self.db.begin_read()?;
        let revision = txn
            .open_table(META)?
            .get(KEY_REVISION)?
            .map(|v| decode(KEY_REVISION, v.value()))
            .transpose()?
            .unwrap_or(0);
        let mut workloads = Vec::new();
        for entry in txn.open_table(WORKLOADS)?.iter()? {
            let (k, v) = entry?;
            workloads.push(decode(k.value(), v.value())?);
        }
        let mut nodes = Vec::new();
        for entry in txn.open_table(NODES)?.iter()? {
            let (k, v) = entry?;
            let n: NodeRecord = decode(k.value(), v.value())?;
            nodes.push(crate::api::DirectoryNode {
                name: n.name,
                tunnel_address: n.tunnel_address,
                addresses: n.addresses,
                gateway_address: n.gateway_address,
            });
        }
        // Federation: what each partner may reach here, and what it exports to us.
        let (mut exports, mut imports) = (Vec::new(), Vec::new());
        for entry in txn.open_table(FEDERATION)?.iter()? {
            let (k, v) = entry?;
            let rec: crate::federation::Record = decode(k.value(), v.value())?;
            exports.extend(rec.exports.iter().map(|r| crate::api::DirectoryExport {
                partner: rec.trust_domain.clone(),
                workload: r.workload.clone(),
                ports: r.ports.clone(),
            }));
            imports.extend(rec.imports);
        }
        let egress_through_gateways = txn
            .open_table(META)?
            .get(KEY_EGRESS)?
            .map(|v| decode(KEY_EGRESS, v.value()))
            .transpose()?
            .unwrap_or(false);
        Ok(crate::api::Directory {
            revision,
            workloads,
            nodes,
            exports,
            imports,
            egress_through_gateways,
        })
    }

    /// Stores a workflow (replacing one of the same name). Validation is the caller's job (the API
    /// compiles the candidate mesh policy before it calls this).
    pub fn put_workflow(&self, rec: &WorkflowRecord) -> Result<Change, StoreError> {
        let txn = self.db.begin_write()?;
        let change = {
            let mut t = txn.open_table(WORKFLOWS)?;
            let old: Option<WorkflowRecord> = t
                .get(rec.name.as_str())?
                .map(|v| decode(&rec.name, v.value()))
                .transpose()?;
            match old {
                Some(o) if o.yaml == rec.yaml && o.modules == rec.modules => Change::Unchanged,
                old => {
                    t.insert(rec.name.as_str(), encode(rec).as_slice())?;
                    if old.is_some() {
                        Change::Updated
                    } else {
                        Change::Created
                    }
                }
            }
        };
        txn.commit()?;
        Ok(change)
    }

    pub fn workflows(&self) -> Result<Vec<WorkflowRecord>, StoreError> {
        self.all(WORKFLOWS)
    }

    pub fn workflow(&self, name: &str) -> Result<Option<WorkflowRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(WORKFLOWS)?;
        let v = t.get(name)?;
        v.map(|v| decode(name, v.value())).transpose()
    }

    pub fn delete_workflow(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(WORKFLOWS)?.remove(name)?.is_some();
        txn.commit()?;
        Ok(existed)
    }

    /// The newest signed mesh version, if one was made.
    pub fn mesh_version(&self) -> Result<Option<crate::dist::version::SignedVersion>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(META)?;
        let v = t.get(KEY_MESH_VERSION)?;
        v.map(|v| decode(KEY_MESH_VERSION, v.value())).transpose()
    }

    pub fn put_mesh_version(
        &self,
        v: &crate::dist::version::SignedVersion,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?
            .insert(KEY_MESH_VERSION, encode(v).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Removes a workload; returns whether it existed.
    pub fn remove_workload(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(WORKLOADS)?.remove(id.as_str())?.is_some();
        if existed {
            bump_revision(&txn)?;
        }
        txn.commit()?;
        Ok(existed)
    }
}

fn bump_revision(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let rev: u64 = meta
        .get(KEY_REVISION)?
        .map(|v| decode(KEY_REVISION, v.value()))
        .transpose()?
        .unwrap_or(0);
    meta.insert(KEY_REVISION, encode(&(rev + 1)).as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{PortSpec, Protocol, Selector};
    use crate::tokens::sha256;

    fn wl(path: &str, uid: u32) -> Workload {
        Workload {
            id: SpiffeId::parse(&format!("spiffe://t{path}")).unwrap(),
            node: NodeName::new("n1").unwrap(),
            selector: Selector::Uid(uid),
            ports: vec![PortSpec::new(80, Protocol::Http)],
            probe_ports: Vec::new(),
        }
    }

    #[test]
    fn apply_is_idempotent_and_bumps_revision_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        let set = [wl("/a", 1), wl("/b", 2)];
        assert_eq!(s.apply(&set).unwrap().created, 2);
        assert_eq!(s.revision().unwrap(), 1);
        assert_eq!(s.apply(&set).unwrap().unchanged, 2);
        assert_eq!(s.revision().unwrap(), 1);
        assert_eq!(s.apply(&[wl("/a", 9)]).unwrap().updated, 1);
        assert_eq!(s.revision().unwrap(), 2);
        assert!(s.remove_workload(&set[1].id).unwrap());
        assert!(!s.remove_workload(&set[1].id).unwrap());
        assert_eq!(s.revision().unwrap(), 3);
        assert_eq!(s.workloads().unwrap().len(), 1);
    }

    #[test]
    fn tokens_work_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        let h = sha256(b"secret");
        let rec = TokenRecord {
            node: NodeName::new("n1").unwrap(),
            secret_sha256: h,
            created_at: 0,
            expires_at: 100,
            used_at: None,
            gateway: false,
        };
        s.put_token("t1", &rec).unwrap();
        s.put_token("t2", &rec).unwrap();
        assert_eq!(
            s.consume_token("t1", &sha256(b"guess"), 10).unwrap(),
            Err(TokenRefusal::WrongSecret)
        );
        assert_eq!(
            s.consume_token("t1", &h, 10)
                .unwrap()
                .unwrap()
                .node
                .as_str(),
            "n1"
        );
        assert_eq!(
            s.consume_token("t1", &h, 11).unwrap(),
            Err(TokenRefusal::Replayed)
        );
        assert_eq!(
            s.consume_token("t2", &h, 100).unwrap(),
            Err(TokenRefusal::Expired)
        );
        assert_eq!(
            s.consume_token("zz", &h, 1).unwrap(),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(s.purge_expired_tokens(101).unwrap(), 2);
    }
}
