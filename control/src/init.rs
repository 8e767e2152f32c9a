//! `strait control init`: a data directory with the CA, the store, the admin credential and a CLI context.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use strait_ca::files::{self, PUBLIC_MODE, SECRET_MODE};
use strait_ca::{CertificateAuthority, TrustDomain};

use crate::context::{Context, ContextFile};
use crate::server::layout;
use crate::store::Store;
use crate::tokens::AdminToken;

/// Where the CA comes from.
pub enum CaSource {
    Generate {
        validity: Duration,
    },
    Import {
        cert_pem: String,
        key_pem: String,
        chain_pem: Option<String>,
    },
}

impl CaSource {
    /// Reads the operator's files (the key must be 0600), or asks for a generated root.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
        chain: Option<&Path>,
        validity: Duration,
    ) -> anyhow::Result<Self> {
        Ok(match (cert, key) {
            (Some(cert), Some(key)) => CaSource::Import {
                cert_pem: files::read_pem(cert)?,
                key_pem: files::read_secret_pem(key)?,
                chain_pem: chain.map(files::read_pem).transpose()?,
            },
            _ => CaSource::Generate { validity },
        })
    }

    /// The CA for `td`, valid at `now`.
    pub fn build(self, td: TrustDomain, now: SystemTime) -> anyhow::Result<CertificateAuthority> {
        Ok(match self {
            CaSource::Generate { validity } => CertificateAuthority::generate(td, validity, now)?,
            CaSource::Import {
                cert_pem,
                key_pem,
                chain_pem,
            } => CertificateAuthority::from_pem(td, &cert_pem, &key_pem, chain_pem.as_deref(), now)
                .context("importing the CA")?,
        })
    }
}

pub struct InitOptions {
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    /// The address clients will use, HOST:PORT (written into the context file).
    pub server: String,
    pub ca: CaSource,
}

pub struct InitOutput {
    pub context_file: PathBuf,
    pub token_file: PathBuf,
}

/// The context file written into the data directory.
pub const CONTEXT_FILE: &str = "admin.yaml";

pub fn init(opts: InitOptions) -> anyhow::Result<InitOutput> {
    let dir = &opts.data_dir;
    if dir.join(layout::STORE).exists() {
        anyhow::bail!(
            "{} already holds a control plane (store.redb exists); refusing to overwrite it",
            dir.display()
        );
    }
    files::create_private_dir(dir)?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let now = SystemTime::now();
    let ca = opts.ca.build(opts.trust_domain.clone(), now)?;
    ca.save(&dir.join(layout::CA_DIR))?;

    let admin = AdminToken::generate()?;
    let token_file = dir.join(layout::ADMIN_TOKEN);
    files::write_atomic(
        &token_file,
        format!("{}\n", admin.reveal()).as_bytes(),
        SECRET_MODE,
    )?;
    // The store is written last: its presence marks a complete data directory.
    Store::open(&dir.join(layout::STORE))?.set_admin_hash(&admin.hash())?;

    let context_file = dir.join(CONTEXT_FILE);
    let ctx = ContextFile {
        current_context: Some(opts.trust_domain.to_string()),
        contexts: vec![Context {
            name: opts.trust_domain.to_string(),
            trust_domain: opts.trust_domain.to_string(),
            server: format!("https://{}", opts.server),
            bundle: dir
                .join(layout::CA_DIR)
                .join(strait_ca::authority::layout::BUNDLE),
            token_file: token_file.clone(),
        }],
    };
    let yaml = serde_norway::to_string(&ctx)?;
    files::write_atomic(&context_file, yaml.as_bytes(), PUBLIC_MODE)?;
    Ok(InitOutput {
        context_file,
        token_file,
    })
}

/// Reads the admin token from a file, refusing one others can read.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    Ok(files::read_secret_pem(path)?.trim().to_owned())
}
