//! The CLI's connection settings, kept like kubectl's: a YAML file of named contexts (server URL, trust
//! bundle, admin token file) with a current one. `strait control init` writes one for its data directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContextFile {
    #[serde(default)]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    pub name: String,
    /// The trust domain; the control plane must prove `spiffe://<trust-domain>/strait/control`.
    pub trust_domain: String,
    /// `https://host:port` of the control plane.
    pub server: String,
    /// PEM trust bundle the control plane's certificate must chain to.
    pub bundle: PathBuf,
    /// File holding the admin token (mode 0600).
    pub token_file: PathBuf,
}

impl ContextFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        crate::registry::from_yaml(text.as_bytes())
            .with_context(|| format!("config {}", path.display()))
    }

    /// The context named `name`, or the current one.
    pub fn select(&self, name: Option<&str>) -> Option<&Context> {
        let want = name.or(self.current_context.as_deref())?;
        self.contexts.iter().find(|c| c.name == want)
    }
}
