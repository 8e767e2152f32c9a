//! `strait ca …`: create a CA, issue SVIDs from CSRs, export the bundle, inspect certificates.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context};
use strait_ca::cert::{certs_from_pem, CertSummary};
use strait_ca::files::{self, PUBLIC_MODE};
use strait_ca::verify::{unix_time, verify_peer, PeerIdMatcher, PeerRole};
use strait_ca::{CertificateAuthority, CheckedCsr, SpiffeId, TrustBundle, TrustDomain};
use strait_control::init::CaSource;

use crate::cli::{BundleFormat, CaCommand, OutputFormat};

pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match cmd {
        // The running control plane's root: through its admin API.
        CaCommand::Rotation(c) => super::block_on(super::admin::ca_rotation(c)),
        CaCommand::Init {
            dir,
            trust_domain,
            ca,
        } => {
            let td = TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let source = CaSource::from_files(
                ca.from_cert.as_deref(),
                ca.from_key.as_deref(),
                ca.chain.as_deref(),
                ca.validity,
            )?;
            let ca = source.build(td, now)?;
            ca.save(&dir)?;
            println!(
                "created CA for trust domain {} in {} (valid until {})",
                ca.trust_domain(),
                dir.display(),
                humantime::format_rfc3339_seconds(ca.not_after())
            );
            println!(
                "next: export the trust bundle with `strait ca bundle --dir {}`",
                dir.display()
            );
            Ok(())
        }
        CaCommand::Issue {
            dir,
            csr,
            id,
            ttl,
            out,
        } => {
            let id = SpiffeId::parse(&id).with_context(|| format!("--id {id:?}"))?;
            let csr_pem = files::read_pem(&csr)?;
            let checked =
                CheckedCsr::from_pem(&csr_pem).with_context(|| format!("{}", csr.display()))?;
            let ca = load_ca(&dir, now)?;
            let svid = ca.issue(&checked, &id, ttl, now)?;
            files::write_atomic(&out, svid.chain_pem().as_bytes(), PUBLIC_MODE)?;
            println!(
                "issued {} (serial {}, {} key) valid until {} -> {}",
                svid.id,
                svid.serial_hex(),
                checked.algorithm(),
                humantime::format_rfc3339_seconds(svid.not_after),
                out.display()
            );
            Ok(())
        }
        CaCommand::Bundle { dir, format } => {
            let ca = load_ca(&dir, now)?;
            let bundle = ca.trust_bundle();
            match format {
                BundleFormat::Pem => print!("{}", bundle.to_pem()),
                BundleFormat::Spiffe => {
                    let seq = now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&bundle.to_spiffe_json(seq, 300))?
                    );
                }
            }
            Ok(())
        }
        CaCommand::Inspect {
            cert,
            bundle,
            output,
        } => inspect(&cert, bundle.as_deref(), output, now),
    }
}

fn load_ca(dir: &Path, now: SystemTime) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::load(dir, now)
        .with_context(|| format!("loading CA from {}", dir.display()))
}

fn inspect(
    cert: &Path,
    bundle: Option<&Path>,
    output: OutputFormat,
    now: SystemTime,
) -> anyhow::Result<()> {
    let chain =
        certs_from_pem(&files::read_pem(cert)?).with_context(|| cert.display().to_string())?;
    let summary = CertSummary::of(&chain[0])
        .map_err(anyhow::Error::msg)
        .with_context(|| cert.display().to_string())?;
    let verdict = match bundle {
        None => None,
        Some(path) => Some(verify_against(path, &summary, &chain, now)?),
    };
    match output {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&summary)?;
            v["spiffe_id"] = match &summary.spiffe_id {
                Ok(id) => id.as_str().into(),
                Err(_) => serde_json::Value::Null,
            };
            v["svid_error"] = summary.spiffe_id.as_ref().err().cloned().into();
            v["chain_length"] = chain.len().into();
            if let Some(verdict) = &verdict {
                v["chain_valid"] = verdict.is_ok().into();
                v["chain_error"] = verdict.as_ref().err().cloned().into();
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Text => {
            let fmt_t = |t| humantime::format_rfc3339_seconds(t).to_string();
            match &summary.spiffe_id {
                Ok(id) => println!("SPIFFE ID:   {id}"),
                Err(e) => println!("SPIFFE ID:   none ({e})"),
            }
            println!("subject:     {}", or_empty(&summary.subject));
            println!("issuer:      {}", or_empty(&summary.issuer));
            println!("serial:      {}", summary.serial);
            println!("key:         {}", summary.key);
            println!("CA:          {}", summary.is_ca);
            println!("not before:  {}", fmt_t(summary.not_before));
            let state = if now >= summary.not_after {
                " (EXPIRED)"
            } else if now < summary.not_before {
                " (NOT YET VALID)"
            } else {
                ""
            };
            println!("not after:   {}{state}", fmt_t(summary.not_after));
            println!("chain:       {} certificate(s) in file", chain.len());
            match &verdict {
                None => println!("verdict:     not checked (pass --bundle BUNDLE.pem)"),
                Some(Ok(())) => {
                    println!("verdict:     valid X.509-SVID, chain verifies against the bundle")
                }
                Some(Err(e)) => println!("verdict:     INVALID: {e}"),
            }
        }
    }
    if let Some(Err(e)) = verdict {
        bail!("{}: {e}", cert.display());
    }
    Ok(())
}

fn or_empty(s: &str) -> &str {
    if s.is_empty() {
        "(empty)"
    } else {
        s
    }
}

/// Verifies `chain` as an SVID against the bundle in `path`. The bundle's trust domain is taken from the
/// certificate's own SPIFFE ID: `inspect` answers "does this chain verify", not "is it in my domain".
fn verify_against(
    path: &Path,
    summary: &CertSummary,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    now: SystemTime,
) -> anyhow::Result<Result<(), String>> {
    let id = match &summary.spiffe_id {
        Ok(id) => id,
        Err(e) => return Ok(Err(format!("not an X.509-SVID: {e}"))),
    };
    let pem = files::read_pem(path)?;
    let bundle = TrustBundle::from_pem(id.trust_domain(), &pem)
        .with_context(|| format!("bundle {}", path.display()))?;
    let bundle = Arc::new(bundle);
    let result = verify_peer(
        &bundle,
        &PeerIdMatcher::AnyInTrustDomain,
        &chain[0],
        &chain[1..],
        unix_time(now),
        PeerRole::Client,
    );
    Ok(result.map(|_| ()).map_err(|e| e.to_string()))
}
