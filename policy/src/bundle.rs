//! Policy bundles in OPA's layout: `.manifest` (JSON), `data.json` files (a file at `a/b/data.json` is
//! mounted at `data.a.b`) and `*.rego` modules, in a directory or a `.tar.gz`.
//!
//! Strait reads these manifest fields: `revision`, `rego_version` (0 or 1; default 1), and
//! `metadata.strait.decision_path` (default `envoy/authz/allow`) and `metadata.strait.dry_run` (log
//! would-be denials, allow the request).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::compile::{compile, entry_rego, merge, WORKFLOW_REGO};
use crate::engine::{PolicyEngine, PolicyError, RegoVersion, DEFAULT_DECISION_PATH};
use crate::workflow::{Workflow, WorkflowError};

/// Bundles are configuration, not data sets: these bounds stop a hostile or mistaken archive early.
const MAX_FILE: u64 = 16 << 20;
const MAX_TOTAL: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> BundleError {
    BundleError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    #[serde(default)]
    pub revision: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub manifest: Manifest,
    /// (path inside the bundle, source), sorted by path.
    pub modules: Vec<(String, String)>,
    pub data: Value,
}

/// Merges `value` into `root` at the slash-separated `at`.
fn mount(root: &mut Value, at: &str, value: Value) -> Result<(), String> {
    let mut cur = root;
    for seg in at.split('/').filter(|s| !s.is_empty()) {
        if !cur.is_object() {
            return Err(format!("data at {at} overlaps a non-object"));
        }
        cur = cur
            .as_object_mut()
            .ok_or("not an object")?
            .entry(seg.to_owned())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    match (cur, value) {
        (Value::Object(dst), Value::Object(src)) => {
            for (k, v) in src {
                if dst.insert(k.clone(), v).is_some() {
                    return Err(format!("data key {at}/{k} is defined twice"));
                }
            }
            Ok(())
        }
        (slot @ Value::Object(_), v) if slot.as_object().is_some_and(|o| o.is_empty()) => {
            *slot = v;
            Ok(())
        }
        _ => Err(format!("data at {at} is defined twice")),
    }
}

impl Bundle {
    /// A bundle from its files by path (what a directory or an archive holds), validated.
    pub fn from_files(files: BTreeMap<String, Vec<u8>>) -> Result<Self, BundleError> {
        let mut manifest = Manifest::default();
        let mut modules = Vec::new();
        let mut data = Value::Object(Default::default());
        for (path, bytes) in files {
            let name = path.rsplit('/').next().unwrap_or(&path);
            if name == ".manifest" {
                manifest =
                    serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
            } else if name == "data.json" {
                let v: Value =
                    serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?;
                let dir = path.strip_suffix("data.json").unwrap_or("");
                mount(&mut data, dir, v).map_err(|m| invalid(&path, m))?;
            } else if name.ends_with(".rego") {
                let src = String::from_utf8(bytes).map_err(|_| invalid(&path, "not UTF-8"))?;
                modules.push((path, src));
            }
        }
        if modules.is_empty() {
            return Err(invalid("<bundle>", "no .rego module in the bundle"));
        }
        Ok(Self {
            manifest,
            modules,
            data,
        })
    }

    /// Loads a bundle from a directory or a `.tar.gz`.
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let io = |e: std::io::Error| BundleError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut files = BTreeMap::new();
        let mut total = 0u64;
        if path.is_dir() {
            let mut stack = vec![path.to_path_buf()];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).map_err(io)? {
                    let entry = entry.map_err(io)?;
                    let p = entry.path();
                    let meta = entry.metadata().map_err(io)?;
                    if meta.is_dir() {
                        stack.push(p);
                    } else if meta.is_file() {
                        let rel = p
                            .strip_prefix(path)
                            .unwrap_or(&p)
                            .to_string_lossy()
                            .replace('\\', "/");
                        let mut f = std::fs::File::open(&p).map_err(io)?;
                        add_file(&mut files, &mut total, rel, meta.len(), &mut f)?;
                    }
                }
            }
        } else {
            let f = std::fs::File::open(path).map_err(io)?;
            return Self::from_tar_gz(f).map_err(|e| match e {
                BundleError::Io { message, .. } => io(std::io::Error::other(message)),
                other => other,
            });
        }
        Self::from_files(files)
    }

    /// Reads a bundle from a `.tar.gz` stream (OPA's layout). Only regular files are read; a path that
    /// leaves the bundle (`..`, absolute), a file or a bundle over the size limits is refused.
    pub fn from_tar_gz(r: impl Read) -> Result<Self, BundleError> {
        let io = |e: std::io::Error| BundleError::Io {
            path: "<tar.gz>".into(),
            message: e.to_string(),
        };
        let mut files = BTreeMap::new();
        let mut total = 0u64;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(r));
        for entry in archive.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let p = entry.path().map_err(io)?.into_owned();
            if p.components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                return Err(invalid(p.display().to_string(), "path escapes the bundle"));
            }
            let name = p.to_string_lossy().trim_start_matches("./").to_owned();
            let size = entry.size();
            add_file(&mut files, &mut total, name, size, &mut entry)?;
        }
        Self::from_files(files)
    }

    /// Writes the bundle as a `.tar.gz` in OPA's layout.
    pub fn write_tar_gz(&self, path: &Path) -> Result<(), BundleError> {
        let io = |e: std::io::Error| BundleError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut out = Vec::new();
        {
            let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
            let mut tar = tar::Builder::new(gz);
            let mut put = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_mtime(0); // reproducible archives
                h.set_cksum();
                tar.append_data(&mut h, name, bytes)
            };
            put(
                ".manifest",
                &serde_json::to_vec_pretty(&self.manifest).unwrap_or_default(),
            )
            .map_err(io)?;
            put(
                "data.json",
                &serde_json::to_vec(&self.data).unwrap_or_default(),
            )
            .map_err(io)?;
            for (p, src) in &self.modules {
                put(p, src.as_bytes()).map_err(io)?;
            }
            tar.into_inner().and_then(|gz| gz.finish()).map_err(io)?;
        }
        std::fs::write(path, out).map_err(io)
    }

    /// SHA-256 over the modules and the canonical data: what the bundle means, not how it is packed.
    pub fn content_hash(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for (p, src) in &self.modules {
            ctx.update(p.as_bytes());
            ctx.update(&[0]);
            ctx.update(src.as_bytes());
            ctx.update(&[0]);
        }
        ctx.update(
            serde_json::to_string(&self.data)
                .unwrap_or_default()
                .as_bytes(),
        );
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn strait_meta(&self, key: &str) -> Option<&Value> {
        self.manifest.metadata.as_ref()?.get("strait")?.get(key)
    }

    pub fn decision_path(&self) -> String {
        self.strait_meta("decision_path")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_DECISION_PATH)
            .to_owned()
    }

    pub fn dry_run(&self) -> bool {
        self.strait_meta("dry_run")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn rego_version(&self) -> RegoVersion {
        if self.manifest.rego_version == Some(0) {
            RegoVersion::V0
        } else {
            RegoVersion::V1
        }
    }

    pub fn engine(&self, budget: Duration) -> Result<PolicyEngine, PolicyError> {
        PolicyEngine::new(
            &self.modules,
            &self.data,
            self.rego_version(),
            &self.decision_path(),
            budget,
        )
    }

    /// The bundle for a workflow plus custom modules (`(file name, source)`, each in a package
    /// `strait.custom.<name>`). The revision is the content hash.
    pub fn from_workflow(
        wf: &Workflow,
        custom: &[(String, String)],
        dry_run: bool,
    ) -> Result<Self, BundleError> {
        Self::from_workflows(&[(wf, custom)], dry_run)
    }

    /// One bundle for several workflows, as the control plane distributes them to the mesh: a request is
    /// allowed when a step of any workflow allows it and every custom module (of any workflow) allows it.
    /// Custom module files are kept apart per workflow (`custom/<workflow>/<file>`); two workflows may not
    /// define the same custom package. With no workflow at all the bundle denies everything.
    pub fn from_workflows(
        workflows: &[(&Workflow, &[(String, String)])],
        dry_run: bool,
    ) -> Result<Self, BundleError> {
        let mut packages: Vec<String> = Vec::new();
        let mut modules = vec![(String::new(), WORKFLOW_REGO.to_owned())];
        let mut compiled = Vec::new();
        for (wf, custom) in workflows {
            for (file, src) in custom.iter() {
                let pkg = src
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("package "))
                    .map(str::trim)
                    .ok_or_else(|| invalid(file, "no package declaration"))?;
                let name = pkg
                    .strip_prefix("strait.custom.")
                    .filter(|n| {
                        !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                    .ok_or_else(|| {
                        invalid(
                            file,
                            format!(
                                "custom modules must be in a package strait.custom.<name>, not {pkg}"
                            ),
                        )
                    })?;
                if packages.iter().any(|p| p == name) {
                    return Err(invalid(
                        file,
                        format!(
                            "package strait.custom.{name} is already defined by another module"
                        ),
                    ));
                }
                packages.push(name.to_owned());
                let base = Path::new(file)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| file.clone());
                let path = if workflows.len() == 1 {
                    format!("custom/{base}")
                } else {
                    format!("custom/{}/{base}", wf.metadata.name)
                };
                modules.push((path, src.clone()));
            }
            compiled.push(compile(wf)?);
        }
        modules[0].0 = "strait/workflow.rego".to_owned();
        modules.insert(1, ("strait/entry.rego".to_owned(), entry_rego(&packages)));
        let names: Vec<&str> = workflows
            .iter()
            .map(|(wf, _)| wf.metadata.name.as_str())
            .collect();
        let mut bundle = Self {
            manifest: Manifest {
                revision: String::new(),
                roots: vec!["envoy".into(), "strait".into(), "strait_workflow".into()],
                rego_version: Some(1),
                metadata: Some(serde_json::json!({"strait": {
                    "decision_path": DEFAULT_DECISION_PATH,
                    "dry_run": dry_run,
                    "workflow": names.join(","),
                }})),
            },
            modules,
            data: merge(compiled),
        };
        bundle.manifest.revision = bundle.content_hash();
        Ok(bundle)
    }
}

/// Reads one file of a bundle into `files`, enforcing the per-file and whole-bundle size limits (a
/// declared size is not trusted: at most one byte past the limit is read).
fn add_file(
    files: &mut BTreeMap<String, Vec<u8>>,
    total: &mut u64,
    name: String,
    size: u64,
    read: &mut dyn Read,
) -> Result<(), BundleError> {
    if size > MAX_FILE {
        return Err(invalid(&name, format!("file larger than {MAX_FILE} bytes")));
    }
    *total += size;
    if *total > MAX_TOTAL {
        return Err(invalid(
            &name,
            format!("bundle larger than {MAX_TOTAL} bytes"),
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    read.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| invalid(&name, e.to_string()))?;
    if buf.len() as u64 > MAX_FILE {
        return Err(invalid(&name, format!("file larger than {MAX_FILE} bytes")));
    }
    files.insert(name, buf);
    Ok(())
}
