//! Command-line definitions. Help texts teach: each command says what it does, what it writes, and what to
//! run next.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "strait",
    version,
    about = "Strait: a service-mesh data plane with its own CA, mTLS between workloads and inline Rego policy",
    long_about = "Strait secures traffic between workloads: a control plane with its own certificate \
authority issues SPIFFE identities (X.509-SVIDs), node proxies capture traffic with nftables, carry it \
over mutual TLS and authorize every request with Rego.\n\nStart with `strait ca init` to create a trust \
domain's CA.",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Log level or filter (e.g. `info`, `strait_ca=debug`); the STRAIT_LOG environment variable wins.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage the certificate authority: create it, issue SVIDs, export the trust bundle, inspect certificates.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA in DIR: a new ECDSA P-256 root, or your own CA certificate and key.
    ///
    /// The key is written with mode 0600 and never leaves DIR. To place Strait under a company PKI, pass
    /// the intermediate certificate and key Strait should sign with (--from-cert/--from-key) and the
    /// certificates above it up to your root (--chain); the last certificate becomes the trust anchor.
    ///
    /// Example: strait ca init --dir /var/lib/strait/ca --trust-domain example.org
    Init {
        /// Directory to create the CA in (created 0700; must not already hold a CA).
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain, e.g. `example.org` (lower-case letters, digits, '.', '-', '_').
        #[arg(long)]
        trust_domain: String,
        /// PEM certificate of an existing CA to sign with, instead of generating a root.
        #[arg(long, requires = "from_key")]
        from_cert: Option<PathBuf>,
        /// PEM private key of --from-cert (must be mode 0600).
        #[arg(long, requires = "from_cert")]
        from_key: Option<PathBuf>,
        /// PEM certificates above --from-cert, in order, ending with your root.
        #[arg(long, requires = "from_cert")]
        chain: Option<PathBuf>,
        /// Lifetime of a generated root, e.g. `10y`, `365d`.
        #[arg(long, value_parser = parse_duration, default_value = "10y", conflicts_with = "from_cert")]
        validity: Duration,
    },
    /// Sign an X.509-SVID for the key in a CSR, with the SPIFFE ID given here.
    ///
    /// Only the CSR's public key is used; its subject and SANs are ignored. The output holds the leaf and
    /// any intermediates. Make a CSR with, for example:
    ///   openssl ecparam -name prime256v1 -genkey -noout -out key.pem
    ///   openssl req -new -key key.pem -subj / -out csr.pem
    Issue {
        /// The CA directory (from `strait ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// PEM certificate signing request (ECDSA P-256/P-384 or Ed25519 key).
        #[arg(long)]
        csr: PathBuf,
        /// SPIFFE ID to issue, e.g. spiffe://example.org/ns/default/sa/web.
        #[arg(long)]
        id: String,
        /// Lifetime, e.g. `24h`, `10s`; clamped to the CA's own validity.
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        ttl: Duration,
        /// Where to write the certificate chain (PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the trust bundle that peers validate SVIDs against.
    Bundle {
        /// The CA directory (from `strait ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// `pem` for TLS stacks, `spiffe` for a SPIFFE bundle (JWKS with use x509-svid).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Show a certificate's SPIFFE ID and validity, and (with --bundle) whether its chain verifies.
    ///
    /// Exits non-zero when --bundle is given and the chain or the SVID rules do not hold.
    Inspect {
        /// PEM file: the leaf first, then any intermediates.
        cert: PathBuf,
        /// Trust bundle (PEM) to verify the chain against, e.g. the output of `strait ca bundle`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Durations such as `24h`, `90s`, `10y`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write it like 24h, 90s, 30d or 1h30m)"))
}
