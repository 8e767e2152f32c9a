//! Finding the control plane and the admin credential: flags, then environment (clap reads both), then
//! the context file.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use strait_ca::cert::certs_from_pem;
use strait_ca::files;
use strait_ca::{TrustBundle, TrustDomain};
use strait_control::client::{ApiClient, ServerTrust};
use strait_control::context::ContextFile;

use crate::cli::ConnArgs;

fn default_config() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".config/strait/config.yaml");
    p.exists().then_some(p)
}

const HOW: &str = "pass --server/--bundle/--token-file, or `export STRAIT_CONFIG=<data-dir>/admin.yaml` (written by `strait control init`)";

pub fn admin_client(conn: &ConnArgs) -> anyhow::Result<ApiClient> {
    let file = match conn.config.clone().or_else(default_config) {
        Some(path) => Some(ContextFile::load(&path)?),
        None => None,
    };
    let ctx = file
        .as_ref()
        .and_then(|f| f.select(conn.context.as_deref()).cloned());
    // A named context that does not exist is an error; no context at all is fine when flags say all.
    if let (Some(name), None) = (&conn.context, &ctx) {
        return Err(anyhow!("context {name:?} not found in the config file"));
    }
    let server = conn
        .server
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.server.clone()))
        .ok_or_else(|| anyhow!("no control plane address: {HOW}"))?;
    let bundle_path = conn
        .bundle
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.bundle.clone()))
        .ok_or_else(|| anyhow!("no trust bundle: {HOW}"))?;
    let token_path = conn
        .token_file
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.token_file.clone()))
        .ok_or_else(|| anyhow!("no admin token file: {HOW}"))?;
    let bundle_pem = files::read_pem(&bundle_path)?;
    let td = match conn
        .trust_domain
        .clone()
        .or_else(|| ctx.as_ref().map(|c| c.trust_domain.clone()))
    {
        Some(td) => TrustDomain::new(&td).with_context(|| format!("trust domain {td:?}"))?,
        None => trust_domain_of_anchor(&bundle_pem)
            .ok_or_else(|| anyhow!("cannot tell the trust domain: pass --trust-domain"))?,
    };
    let bundle = TrustBundle::from_pem(td, &bundle_pem)
        .with_context(|| format!("bundle {}", bundle_path.display()))?;
    let token = strait_control::init::read_token_file(&token_path)
        .with_context(|| format!("admin token {}", token_path.display()))?;
    Ok(ApiClient::new(
        &server,
        ServerTrust::Bundle(Arc::new(bundle)),
        None,
        Some(token),
    )?)
}

/// Generated roots carry their trust domain as a URI SAN (`spiffe://<td>`).
fn trust_domain_of_anchor(pem: &str) -> Option<TrustDomain> {
    let certs = certs_from_pem(pem).ok()?;
    let summary = strait_ca::cert::CertSummary::of(&certs[0]).ok()?;
    summary
        .uri_sans
        .iter()
        .find_map(|u| TrustDomain::new(u).ok())
}
