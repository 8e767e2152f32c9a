//! Command-line definitions. Help texts teach: each command says what it does, what it writes, and what to
//! run next.

use std::net::{IpAddr, SocketAddr};
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
    /// Default: `info` for the long-running `control` and `proxy`, `warn` for one-shot commands.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
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
    /// Compile workflows to policy bundles, evaluate one decision, run Rego unit tests.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the control plane, or create its data directory with `strait control init`.
    Control(ControlArgs),
    /// Run the node proxy: capture workload traffic with nftables and carry it over mTLS (VM mode by
    /// default; `--mode kubernetes` for the DaemonSet).
    Proxy(ProxyArgs),
    /// Run an organisation's ingress gateway: the one address partners reach its exported workloads
    /// through, when organisations do not share a network (docs/gateway.md).
    ///
    /// The gateway joins the control plane like a node (`strait node token create --node gw-1
    /// --gateway`), or in Kubernetes (`--mode kubernetes`) as a pod of the strait-gateway Deployment
    /// with its service-account token (deploy/kubernetes/gateway), and tells it the address partners
    /// reach it at (--advertise); from then on every export names the gateways (run two for redundancy)
    /// instead of private addresses. A partner's request travels as its own
    /// end-to-end mTLS tunnel inside a stream through the gateway, which checks that the partner's trust
    /// domain is federated and the workload exported to it, and cannot read what it carries.
    ///
    /// With `strait federation egress on` the same gateways also carry this organisation's own
    /// connections to partners out (egress): its proxies then never dial a partner themselves.
    Gateway(GatewayArgs),
    /// Run a small HTTP document store (a workload for tests, benchmarks and the demo).
    ///
    /// POST /api/<name> stores a document; GET /api/<name>/<id> returns it; GET / names the service.
    Docstore {
        /// Address to listen on (repeat for IPv4 and IPv6).
        #[arg(long, default_value = "0.0.0.0:5000")]
        listen: Vec<SocketAddr>,
        /// Service name, used in the API path.
        #[arg(long)]
        name: String,
    },
    /// Node bootstrap (one-time join tokens) and taking a node out of the mesh (uninstall).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Register, list and remove workloads.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Apply a file of workloads (declarative: applying the same file twice changes nothing).
    ///
    /// The file is YAML (or JSON):
    ///
    ///   apiVersion: strait.dev/v1
    ///   kind: WorkloadList
    ///   workloads:
    ///     - id: spiffe://example.org/ns/shop/sa/web
    ///       node: host-a
    ///       uid: 1001                  # VM mode; or `ips: [10.1.0.5]` for pods
    ///       ports: [8080, {port: 9090, protocol: http2}]
    Apply {
        /// The file to apply; `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Store workflows in the control plane; every proxy enforces them within about a second.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Rotate the key that signs mesh versions, without downtime (docs/distributor.md).
    ///
    /// Two steps, as SPIRE's `localauthority prepare` and `activate`: `prepare` makes a new key and
    /// announces it to every proxy inside a version signed by the current key; `activate` (once every
    /// registered node applied the announcement, which `status` shows) makes the new key sign from then
    /// on, and proxies stop trusting the old one with the first version it signs. `rotate` does both and
    /// waits in between.
    #[command(subcommand)]
    DistributionKey(DistributionKeyCommand),
    /// Federate with other organisations' trust domains (SPIFFE Federation, docs/federation.md).
    ///
    /// Each organisation keeps its own trust domain, CA and control plane. Its control plane serves its
    /// trust bundle at its bundle endpoint (the API port, path /v1/federation/bundle, authenticated by the
    /// control plane's SVID: profile https_spiffe). To federate with a partner: the partner's operator
    /// runs `strait federation bundle > partner.json` and reads you the fingerprint it prints; you run
    /// `strait federation add --trust-domain partner.example --endpoint HOST:15012 --bootstrap-bundle
    /// partner.json --fingerprint FINGERPRINT`. From then on the partner's bundle is fetched at its refresh
    /// hint, the last good one kept when a fetch fails.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// The main job: a whole mesh on this machine, in network namespaces, running the reference workflow.
    ///
    /// Builds a control plane host and one host per service of the film-production workflow (seven
    /// document stores on port 5000, each behind its own node proxy), applies the workflow through the
    /// control plane, sends every ordered pair of services a POST and a GET, and checks that exactly the
    /// eight steps are allowed, everything else denied, and that no request crossed the wire in clear (a
    /// packet capture of the links is searched for the requests' marker). Needs root, ip, nft, tcpdump,
    /// curl and setpriv. Cleans up after itself, also on Ctrl-C.
    Demo {
        /// Workflow to run (default: the built-in film-production workflow, deploy/examples/movie-workflow.yaml).
        #[arg(short = 'f', long = "file", conflicts_with = "federated")]
        file: Option<PathBuf>,
        /// The study's deployment instead: each actor of the film workflow an organisation with its own
        /// trust domain, CA, control plane, private network (the same range in each) and gateway, in two
        /// regions 25 ms apart, joined only through their gateways (docs/gateway.md).
        #[arg(long)]
        federated: bool,
        /// Where to write the workflow graph (SVG), the capture and the logs.
        #[arg(long, default_value = "strait-demo")]
        out_dir: PathBuf,
    },
    /// Benchmarks that need the whole mesh (the study's experiment), and plots of benchmark results.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show nodes, workloads, workflows, and the rollout of the newest mesh version: for each proxy
    /// whether it is connected (QUIC or TCP fallback), which version it applied, and its last NACK.
    Status {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// How the CLI finds the control plane and its admin credential: flags, then environment, then the
/// context file (like kubectl's). `strait control init` writes a context file into its data directory:
/// `export STRAIT_CONFIG=<data-dir>/admin.yaml` and every command below finds it.
#[derive(Args, Debug, Clone, Default)]
pub struct ConnArgs {
    /// Control plane URL, e.g. https://10.0.0.1:15012.
    #[arg(long, env = "STRAIT_SERVER")]
    pub server: Option<String>,
    /// Trust bundle (PEM) the control plane's certificate must chain to.
    #[arg(long, env = "STRAIT_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// Trust domain of the control plane (read from the context file when not given).
    #[arg(long, env = "STRAIT_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// File with the admin token (mode 0600).
    #[arg(long, env = "STRAIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Context file (default: ~/.config/strait/config.yaml).
    #[arg(long, env = "STRAIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Context to use instead of the file's current-context.
    #[arg(long, env = "STRAIT_CONTEXT")]
    pub context: Option<String>,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlArgs {
    #[command(subcommand)]
    pub command: Option<ControlCommand>,
    #[command(flatten)]
    pub run: ControlRun,
}

/// Run the control plane (HTTPS API for admins and node proxies).
#[derive(Args, Debug)]
pub struct ControlRun {
    /// Data directory made by `strait control init`.
    #[arg(long, env = "STRAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on: the API on TCP, the policy distributor on QUIC (UDP) and, as its fallback,
    /// on TCP too (ALPN strait-dist/1).
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,
    /// Plain-HTTP monitoring endpoint: /metrics (Prometheus) and /ready. "off" disables it.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub monitoring: String,
    /// Lifetime of the node and workload SVIDs it signs (renewed by proxies at half life).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub svid_ttl: Duration,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// Kubernetes mode: the control plane watches pods and namespaces and vouches for proxies with TokenReview.
#[derive(Args, Debug)]
#[command(next_help_heading = "Kubernetes mode")]
pub struct KubernetesArgs {
    /// Run in Kubernetes mode with the pod's in-cluster credentials: meshed pods (namespaces labelled
    /// strait.dev/mesh=enabled) come from the API server, proxies join with their service-account
    /// tokens, and the trust bundle is published in the ConfigMap strait-trust-bundle. VM mode (join tokens,
    /// `strait apply`) is the default and keeps working beside it.
    #[arg(long)]
    pub kubernetes: bool,
    /// API server URL instead of the in-cluster one (KUBERNETES_SERVICE_HOST), e.g. to run the control
    /// plane outside the cluster.
    #[arg(long, requires = "kubernetes")]
    pub kube_api_server: Option<String>,
    /// CA certificate of the API server.
    #[arg(
        long,
        requires = "kubernetes",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kube_ca_file: PathBuf,
    /// Bearer token for the API server (re-read for every request, as projected tokens rotate).
    #[arg(
        long,
        requires = "kubernetes",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kube_token_file: PathBuf,
    /// Namespace Strait runs in (proxies' service account and DaemonSet, the bundle ConfigMap). Default: the
    /// pod's own namespace.
    #[arg(long, requires = "kubernetes")]
    pub kube_namespace: Option<String>,
    /// Service account of the node proxies.
    #[arg(long, requires = "kubernetes", default_value = "strait-proxy")]
    pub proxy_service_account: String,
    /// DaemonSet of the node proxies: a joining proxy's pod must be controlled by it.
    #[arg(long, requires = "kubernetes", default_value = "strait-proxy")]
    pub proxy_daemonset: String,
    /// Service account of the gateways (`strait gateway --mode kubernetes`).
    #[arg(long, requires = "kubernetes", default_value = "strait-gateway")]
    pub gateway_service_account: String,
    /// Deployment of the gateways: a joining gateway's pod must belong to it (through its ReplicaSet),
    /// and every replica joins as the node of this name, so that partners reaching any replica behind
    /// the load balancer find the one identity the export names.
    #[arg(long, requires = "kubernetes", default_value = "strait-gateway")]
    pub gateway_deployment: String,
    /// Pods and namespaces are listed in pages of this many objects (the API server's `limit`).
    #[arg(long, requires = "kubernetes", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_list_page_size: u32,
}

#[derive(Subcommand, Debug)]
pub enum ControlCommand {
    /// Create the data directory: CA, store, admin token (0600) and a CLI context file.
    ///
    /// Example:
    ///   strait control init --data-dir /var/lib/strait/control --trust-domain example.org
    ///   export STRAIT_CONFIG=/var/lib/strait/control/admin.yaml
    ///   strait control --data-dir /var/lib/strait/control &
    ///   strait status
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
        /// Address clients will reach the control plane on, HOST:PORT (written into the context file),
        /// e.g. strait-control.strait-system.svc:15012.
        #[arg(long, default_value = "127.0.0.1:15012")]
        server: String,
        /// When the directory already holds a control plane, keep it and succeed (for systemd's
        /// ExecStartPre and Kubernetes init containers, which run at every start).
        #[arg(long)]
        keep_existing: bool,
        #[command(flatten)]
        ca: CaSourceArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Take this node out of the mesh: remove the capture rules its proxy left in place (the nftables
    /// table `inet strait` and, in Kubernetes mode, the TPROXY policy route). Its workloads' traffic then
    /// no longer goes through the mesh, and is no longer refused. A proxy restart does not need this: the
    /// rules stay while the proxy is down (traffic fails closed) and the new proxy replaces them in one
    /// transaction. Run as root on the node.
    Uninstall,
    /// Join tokens: one-time, expiring secrets a proxy presents once to get its node certificate.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new one-time join token for a node (stdout: the token alone).
    ///
    /// The token works once, expires, is stored only as a hash, and pins the CA so the proxy can
    /// authenticate the control plane on its first contact.
    Create {
        /// Node name (becomes spiffe://<td>/node/<name>).
        #[arg(long)]
        node: String,
        /// How long the token stays valid.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
        /// The node joins as an ingress gateway (`strait gateway`, docs/gateway.md): the only kind of node
        /// whose address partners are given.
        #[arg(long)]
        gateway: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Store a workflow (YAML) and push it to every proxy as a new mesh version.
    ///
    /// The control plane compiles the whole mesh policy with it first: a YAML error (with its field) or a
    /// Rego error (with its line) is reported and nothing changes. Applying the same file again changes
    /// nothing. Custom Rego modules (package strait.custom.<name>, rule `allow`) must also allow each
    /// request.
    ///
    /// Example: strait workflow apply -f deploy/examples/movie-workflow.yaml
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// A custom Rego module to enforce with it (repeat).
        #[arg(long = "custom")]
        custom: Vec<PathBuf>,
        /// Wait until every connected proxy acknowledged the new version (up to this long), and say how
        /// long the rollout took.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Draw a workflow file as an SVG graph (services by actor, one arrow per step). Works offline.
    ///
    /// Example: strait workflow graph -f deploy/examples/movie-workflow.yaml -o movie.svg
    Graph {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
    /// List stored workflows.
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a stored workflow's YAML (and its custom modules).
    Show {
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a workflow; its steps stop being allowed everywhere with the next version.
    Delete {
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum FederationCommand {
    /// This trust domain's bundle as its endpoint serves it (SPIFFE JSON on standard output) and its
    /// fingerprint (on standard error): hand the file to a partner, read them the fingerprint.
    Bundle {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Federate with a partner trust domain: checks the bootstrap bundle's fingerprint, fetches the
    /// partner's bundle from its endpoint with it, and keeps it fresh from then on.
    Add {
        /// The partner's trust domain (a DNS name the partner owns).
        #[arg(long)]
        trust_domain: String,
        /// The partner's control plane, HOST:PORT (its API port, 15012 by default).
        #[arg(long)]
        endpoint: String,
        /// The SPIFFE ID the endpoint must present. Default: spiffe://TRUST_DOMAIN/strait/control.
        #[arg(long)]
        endpoint_id: Option<String>,
        /// The partner's bundle, obtained out of band (`strait federation bundle` on their side; SPIFFE JSON
        /// or PEM). It authenticates the first fetch only.
        #[arg(long)]
        bootstrap_bundle: PathBuf,
        /// The bootstrap bundle's fingerprint as the partner read it to you. Without it nothing is added:
        /// the command prints the file's fingerprint for you to compare.
        #[arg(long)]
        fingerprint: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The partners: bundle sequence, roots and their expiry, last refresh and its age, the last error.
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Fetch partners' bundles now (one trust domain, or all).
    Refresh {
        #[arg(long)]
        trust_domain: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// End a federation: the partner's bundle is forgotten.
    Remove {
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Let a federated partner reach one of this organisation's workloads. The partner's control plane
    /// fetches what is exported to it (and nothing else of the registry); its callers still need a step of
    /// a workflow here that names them, checked per request at the destination proxy.
    Export {
        /// The partner's trust domain.
        #[arg(long)]
        trust_domain: String,
        /// The workload's SPIFFE ID (of this trust domain).
        #[arg(long)]
        workload: String,
        /// Only these TCP ports of the workload (repeat); default every TCP port it declares. Kubernetes
        /// pods declare none: name the ports, or nothing of the pods crosses.
        #[arg(long = "port")]
        ports: Vec<u16>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Withdraw an export: this mesh's proxies refuse the partner's next requests to the workload (and its
    /// next connections) as soon as they apply the change.
    Unexport {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        workload: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Egress gateways: `on` makes every connection this organisation's proxies open to a partner leave
    /// through one of its own gateways (`strait gateway`), so that all cross-organisation traffic leaves
    /// from the addresses it controls and is seen in one place; never directly, and refused while no
    /// gateway is up. `off` (the default) lets proxies dial partners themselves. The gateway relays the
    /// encrypted tunnel without a key for it, only to addresses of what partners export here.
    Egress {
        #[arg(value_parser = ["on", "off"])]
        through_gateways: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum DistributionKeyCommand {
    /// The active key, the next key if a rotation is prepared, and the nodes it still waits for.
    Status {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Step 1: make the next key and announce it under the current one.
    Prepare {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Step 2: the announced key signs from now on. Refused while a registered node has not applied the
    /// announcement, unless --force.
    Activate {
        /// Activate even so (a node that missed the announcement asks the control plane for the keys when
        /// it meets the new signature; until then it keeps enforcing its last version).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Both steps: prepare, wait until every registered node has the next key, activate.
    Rotate {
        /// How long to wait for the nodes between the steps.
        #[arg(long, value_parser = parse_duration, default_value = "2m")]
        timeout: Duration,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkloadCommand {
    /// Register (or update) a workload on a node.
    ///
    /// Example: strait workload add --id spiffe://example.org/ns/shop/sa/web --node host-a --uid 1001 --port 8080/http
    Add {
        /// SPIFFE ID: spiffe://<td>/ns/<namespace>/sa/<service-account>.
        #[arg(long)]
        id: String,
        /// The node the workload runs on.
        #[arg(long)]
        node: String,
        /// VM mode: the Unix user its processes run as.
        #[arg(long, conflicts_with = "ip", required_unless_present = "ip")]
        uid: Option<u32>,
        /// Kubernetes mode: its pod address (repeat for several).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// A port it serves on, as PORT or PORT/PROTOCOL (http, http2, grpc, tcp, auto); repeat for several.
        #[arg(long = "port", required = true)]
        ports: Vec<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List registered workloads.
    List {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove a workload from the registry.
    Remove {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaRotationCommand {
    /// The authorities (active, prepared, retiring) and the nodes that have not renewed since the last step.
    Status {
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Step 1: a new root, added to the trust bundle; it signs nothing yet. Proxies fetch the bundle
    /// within seconds (the next mesh version names it).
    Prepare {
        /// Lifetime of the new root.
        #[arg(long, value_parser = parse_duration, default_value = "10y")]
        validity: Duration,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Step 2: the new root signs every SVID from now on; proxies re-issue theirs at once. Refused while a
    /// registered node has not renewed since `prepare` (it might not trust the new root), unless --force.
    Activate {
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Step 3: the old root leaves the trust bundle. Refused until every SVID it signed has expired
    /// (activation + the SVID lifetime), unless --force.
    Withdraw {
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Rotate the running control plane's root CA without downtime: prepare, activate, withdraw
    /// (docs/ca.md, "Rotating the root").
    #[command(subcommand)]
    Rotation(CaRotationCommand),
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
        #[command(flatten)]
        ca: CaSourceArgs,
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

/// The node proxy. Needs root (or CAP_NET_ADMIN) for nftables and socket marks.
///
/// First start: `strait proxy --control https://10.0.0.1:15012 --node host-a --token <token> \
///   --data-dir /var/lib/strait/proxy --address 10.0.0.2 --address fd00::2`
/// Later starts reuse the node identity saved in --data-dir (no token needed).
#[derive(Args, Debug)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub join: JoinArgs,
    /// What SIGTERM does to the capture rules once connections are drained. `keep-rules` (default): they
    /// stay, so the workloads' traffic fails closed (refused, never around the mesh) until the proxy is
    /// back, which replaces them in one transaction; a restart never opens a gap. `remove-rules`: the
    /// workloads are uncaptured once the proxy has exited (their traffic bypasses the mesh).
    #[arg(long, value_enum, default_value = "keep-rules", env = "STRAIT_ON_EXIT")]
    pub on_exit: OnExit,
    /// vm: workloads are local processes recognised by Unix user (systemd units). kubernetes: the proxy
    /// runs in the node's network namespace (DaemonSet, host network); workloads are the meshed pods on
    /// the node, recognised by address, their traffic diverted with TPROXY; the proxy joins with its
    /// service-account token instead of a join token.
    #[arg(long, value_enum, default_value = "vm", env = "STRAIT_MODE")]
    pub mode: ProxyMode,
    /// This node's addresses, IPv4 and IPv6 (repeat, or comma-separated in STRAIT_ADDRESSES); the first is
    /// the tunnel address other nodes use.
    #[arg(
        long = "address",
        required = true,
        env = "STRAIT_ADDRESSES",
        value_delimiter = ','
    )]
    pub addresses: Vec<IpAddr>,
    /// Admin endpoint (/live, /ready, /metrics, /config_dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Kubernetes mode: let the node's own processes (kubelet) reach the ports that meshed pods' HTTP,
    /// TCP and gRPC probes name, in plaintext, on those pods' addresses. Without it every other plaintext
    /// into a meshed pod is dropped, probes included, and such pods never turn Ready.
    #[arg(long)]
    pub allow_kubelet_probes: bool,
    /// Also serve the probe and metrics paths (/live, /healthz, /ready, /metrics; not /config_dump) on
    /// this address, e.g. 0.0.0.0:15021 for kubelet probes on a host-network DaemonSet.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// Resolver the DNS proxy asks for names an egress entry allows (port 53); repeat for several.
    /// Default: the nameservers of /etc/resolv.conf (in Kubernetes mode, under the DaemonSet's dnsPolicy
    /// ClusterFirstWithHostNet, the cluster DNS Service). Workloads' DNS (UDP and TCP port 53, to any
    /// address; VM workloads by redirect, meshed pods by TPROXY) goes to the proxy (port 15053), which
    /// answers mesh names itself, forwards only queries for allowed names and answers every other name
    /// REFUSED.
    #[arg(long = "dns-resolver")]
    pub dns_resolvers: Vec<IpAddr>,
    /// Names under this domain are forwarded to the resolver for every workload without an egress
    /// entry, and their answers open nothing (the addresses are reached through the mesh, or by an
    /// egress entry). Default in Kubernetes mode: cluster.local, the cluster's Services and pods
    /// (db.shop.svc.cluster.local), which the cluster DNS answers itself; '' forwards none. Use it only
    /// for a domain the resolver is authoritative for and never forwards, or names under it can carry
    /// data to whoever the resolver asks. VM mode: none.
    #[arg(long = "dns-cluster-domain")]
    pub dns_cluster_domain: Option<String>,
    /// The DNS zone of mesh names: the workload spiffe://TD/ns/NS/sa/SA is SA.NS.ZONE (its node's
    /// addresses, or its pod addresses), answered by the proxy without any resolver.
    #[arg(long = "dns-zone", default_value = strait_proxy::dns::DEFAULT_ZONE)]
    pub dns_zone: String,
    /// A destination outside the mesh that workloads may reach directly, as CIDR[:PORT]
    /// (10.1.2.0/24:443) or NAME[:PORT] (api.partner.example:443, *.partner.example:443: the addresses
    /// the resolver gives for the name, for the answer's lifetime); repeat.
    #[arg(long = "allow-egress")]
    pub egress: Vec<String>,
    /// How long SIGTERM waits for open connections before the proxy exits.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Pin a local policy bundle (from `strait policy compile`, or any OPA-layout bundle: directory or
    /// .tar.gz) instead of the policy the control plane distributes; reloaded atomically when the file
    /// changes. The directory still comes from the control plane. For air-gapped tests and debugging.
    #[arg(long, env = "STRAIT_POLICY_BUNDLE")]
    pub policy_bundle: Option<PathBuf>,
    /// Reach the policy distributor over TLS/TCP only. By default QUIC (UDP, same port as the API) is
    /// tried first and TCP is the automatic fallback when UDP does not get through.
    #[arg(long)]
    pub distributor_tcp_only: bool,
    /// Log one allowed decision in this many (0: none). Denials are always logged.
    #[arg(long, default_value_t = 0)]
    pub decision_log_allow_sample: u64,
    /// On `auto` ports, how long to wait for the client's first bytes (HTTP or not is decided on them).
    /// A client idle for less than this before its first request is still handled as HTTP; a server-first
    /// protocol on an `auto` port is closed after it, with a log line (declare such ports `tcp`).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub auto_detect_timeout: Duration,
    /// Close an inbound stream (a TCP connection, or a caller's HTTP connection) that moves no byte either
    /// way for this long. HTTP/1 connections are also closed 30 s after a response when no next request
    /// starts (the header-read timeout).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub idle_timeout: Duration,
    /// Most connections carried at once (captured outbound connections plus inbound tunnel streams);
    /// past it new ones are refused at once and counted (`refused_connections_total{reason="over_capacity"}`)
    /// instead of stalling the open ones when descriptors run out. 0: half the open-files limit, less a
    /// reserve (each connection holds two descriptors).
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// Runtime worker threads carrying the traffic (0: one per CPU the process may use). Fewer workers
    /// cost less CPU per request (fewer cross-thread wake-ups: about 13 % less on a 2-core node,
    /// docs/benchmarks.md) and cap the proxy at that many cores; ztunnel defaults to 2.
    #[arg(long, env = "STRAIT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub join: JoinArgs,
    /// vm: the gateway joins with a one-time token made with `strait node token create --gateway`.
    /// kubernetes: it runs as a pod of the gateway Deployment and joins with its service-account token
    /// (every replica as the node named for the Deployment, strait-gateway by default).
    #[arg(long, value_enum, default_value = "vm", env = "STRAIT_MODE")]
    pub mode: ProxyMode,
    /// Where partners' tunnels are accepted.
    #[arg(long, default_value = "0.0.0.0:15009", env = "STRAIT_GATEWAY_LISTEN")]
    pub listen: SocketAddr,
    /// The address partners reach the gateway at (host:port), told to them with every export: the
    /// organisation's public address, or the load balancer's in front of the gateways.
    #[arg(long, env = "STRAIT_GATEWAY_ADVERTISE", value_parser = parse_advertise)]
    pub advertise: SocketAddr,
    /// Admin endpoint (/live, /ready, /metrics, /config_dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Also serve the probe and metrics paths on this address (e.g. 0.0.0.0:15021).
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// How long SIGTERM waits for open streams before the gateway exits.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Reach the policy distributor over TLS/TCP only (QUIC is tried first by default).
    #[arg(long)]
    pub distributor_tcp_only: bool,
    /// Most partner streams carried at once (0: derived from the open-files limit).
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,
    /// Runtime worker threads (0: one per CPU the process may use).
    #[arg(long, env = "STRAIT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

/// `--advertise`: an address and port partners can dial. Empty (the Kubernetes ConfigMap not set yet)
/// says what to set.
fn parse_advertise(s: &str) -> Result<SocketAddr, String> {
    if s.trim().is_empty() {
        return Err("empty: set it to the address partners dial and port 15009 (in Kubernetes, the strait-gateway Service's load-balancer IP, in the strait-gateway ConfigMap's key `advertise`)".into());
    }
    s.trim()
        .parse()
        .map_err(|e| format!("{s:?} is not IP:PORT ({e}); a gateway is dialled by address"))
}

/// How a proxy or gateway joins the mesh and where it keeps its identity.
#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Control plane URL.
    #[arg(long, env = "STRAIT_CONTROL")]
    pub control: String,
    /// This node's name (as in `strait node token create --node`).
    #[arg(long, env = "STRAIT_NODE")]
    pub node: String,
    /// One-time join token (first start only; VM mode).
    #[arg(long, env = "STRAIT_JOIN_TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the join token (mode 0600).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where the node identity is kept (created 0700; the key is 0600).
    #[arg(long, env = "STRAIT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Kubernetes mode: the projected service-account token (audience "strait") to join with.
    #[arg(long, default_value = "/var/run/secrets/strait/token")]
    pub service_account_token_file: PathBuf,
    /// Kubernetes mode: the trust bundle that authenticates the control plane (the ConfigMap
    /// strait-trust-bundle, mounted).
    #[arg(long, default_value = "/etc/strait/trust/bundle.pem")]
    pub trust_bundle: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Vm,
    Kubernetes,
}

/// See [`ProxyArgs::on_exit`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    KeepRules,
    RemoveRules,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Compile a workflow (YAML) into a policy bundle (OPA layout, .tar.gz).
    ///
    /// The bundle holds a fixed Rego module and the workflow as data, so a decision costs the same for 10
    /// or 10 000 steps. Custom modules (package strait.custom.<name>, rule `allow`) are added beside it; a
    /// request must be allowed by the workflow AND every custom module.
    ///
    /// Example: strait policy compile -f deploy/examples/movie-workflow.yaml -o movie.tar.gz
    Compile {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Custom Rego modules to combine with the workflow (repeat).
        #[arg(long = "custom")]
        custom: Vec<PathBuf>,
        /// Log would-be denials but allow the requests.
        #[arg(long)]
        dry_run: bool,
    },
    /// Evaluate one decision: prints whether it is allowed, the policy's result and why.
    ///
    /// Exit code 0 when allowed, 1 when denied (so scripts can test policies).
    Eval {
        /// Bundle: a directory in OPA layout or a .tar.gz.
        #[arg(long)]
        bundle: PathBuf,
        /// The input document (JSON, OPA-Envoy shape); `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
        /// Decision path instead of the bundle's (e.g. envoy/authz/allow).
        #[arg(long)]
        path: Option<String>,
    },
    /// Run the `test_*` rules in Rego files and directories, like `opa test`.
    Test {
        paths: Vec<PathBuf>,
        /// Parse as Rego v0 (the default is v1).
        #[arg(long)]
        v0: bool,
        /// Print every test, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
}

/// Where a new CA comes from: generated, or the operator's own CA certificate and key.
#[derive(Args, Debug)]
pub struct CaSourceArgs {
    /// PEM certificate of an existing CA to sign with, instead of generating a root.
    #[arg(long, requires = "from_key")]
    pub from_cert: Option<PathBuf>,
    /// PEM private key of --from-cert (must be mode 0600).
    #[arg(long, requires = "from_cert")]
    pub from_key: Option<PathBuf>,
    /// PEM certificates above --from-cert, in order, ending with your root.
    #[arg(long, requires = "from_cert")]
    pub chain: Option<PathBuf>,
    /// Lifetime of a generated root, e.g. `10y`, `365d`.
    #[arg(long, value_parser = parse_duration, default_value = "10y", conflicts_with = "from_cert")]
    pub validity: Duration,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The motivating study's latency experiment on the demo's topology (as root).
    ///
    /// Builds the demo's mesh (a control plane host and one host per service, in network namespaces), then
    /// times every permitted step of the workflow with a new connection per request (`curl -w
    /// %{time_total}`, the study's method): direct without the mesh, then through the mesh with an
    /// allow-all workflow, the workflow itself, and the workflow with +100, +1 000 and +10 000 extra
    /// steps. Then it repeats everything with half of the hosts behind a 25 ms WAN ("inter-region": tc
    /// netem where the kernel has sch_netem, else `strait bench wan-relay`). Prints the table beside the
    /// study's medians and writes CSVs and SVG plots.
    Study {
        /// Workflow to measure (default: the built-in film-production workflow).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Requests per permitted step, per scenario and placement (the study used 40 or more).
        #[arg(long, default_value_t = 40)]
        samples: usize,
        /// The policy scenarios to measure through the mesh, comma-separated (direct is always
        /// measured first): allow-all (every pair), minimal (the workflow), +100, +1000 and +10000
        /// (the workflow padded with that many steps between other services).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "allow-all,minimal,+100,+1000,+10000",
            value_parser = ["allow-all", "minimal", "+100", "+1000", "+10000"]
        )]
        scenarios: Vec<String>,
        /// The study's deployment instead (`strait demo --federated`): every actor an organisation with
        /// its own control plane, CA and private network, joined only through their gateways; owner, vfx
        /// and color in one region, sound and hdr in the other. Direct is then each organisation
        /// publishing its services with a port forward on its border (no mesh, no gateway); the mesh
        /// scenarios are applied by every organisation to its own part of the workflow.
        #[arg(long, conflicts_with = "file")]
        federated: bool,
        /// Where to write study.csv, study-pairs.csv, study-samples.csv, the plots and the logs
        /// (default bench/results/study, or bench/results/study-federated).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Draw a CSV of benchmark results as a grouped bar chart (SVG): one group per row, one bar per value
    /// column. The bench/ scripts call it for their tables.
    ///
    /// Example: `strait bench plot bench/results/compare.csv --category scenario --value req_per_s -o
    /// compare.svg --title "Throughput" --unit req/s`
    Plot {
        /// CSV with a header row (comma-separated, no quoting).
        csv: PathBuf,
        /// Column(s) naming each group; several are joined with " / ".
        #[arg(long, required = true)]
        category: Vec<String>,
        /// Column(s) to draw, one bar each; cells that are not numbers are left out.
        #[arg(long, required = true)]
        value: Vec<String>,
        #[arg(long, default_value = "")]
        title: String,
        /// Unit of the values, shown on the axis.
        #[arg(long, default_value = "")]
        unit: String,
        /// Output SVG file.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
    /// What a gateway costs (as root; needs `hey`): two organisations, owner calling vfx, first federated
    /// directly on one network, then through vfx's gateway, then also through owner's own gateway
    /// (egress), in the same run. For each path: requests per second and latency over 16 kept-alive
    /// connections, latency with a new connection per request, and the gateways' CPU per request. Prints
    /// a table and writes gateway.csv.
    Gateway {
        /// How long each keep-alive run lasts.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value = "strait-bench-gateway")]
        out_dir: PathBuf,
    },
    /// A WAN link with a fixed one-way delay where the kernel has no sch_netem (as root, in the network
    /// namespace that holds both interfaces).
    ///
    /// Every Ethernet frame that arrives on one interface leaves through the other `--delay` later (up to
    /// about 1 ms more), both ways, in order; queues are bounded (64 MiB each way) and overflow is dropped
    /// and logged. `strait bench study` runs it between its two regions when `tc netem` is missing.
    /// Example, with a and b the ends of veth pairs whose peers sit on two bridges:
    /// `strait bench wan-relay --interface a --interface b --delay 25ms`
    WanRelay {
        /// The two interfaces to join (give it twice).
        #[arg(long = "interface", required = true)]
        interface: Vec<String>,
        /// One-way delay added to every frame, e.g. 25ms (the study's inter-region placement).
        #[arg(long, value_parser = parse_duration, default_value = "25ms")]
        delay: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::Parser as _;

    /// Stand-ins for the flags the manifests fill from the pod's environment (fieldRef, ConfigMap).
    const FROM_ENV: [(&str, &str, &str); 2] = [
        ("STRAIT_ADDRESSES", "--address", "10.0.0.1"),
        (
            "STRAIT_GATEWAY_ADVERTISE",
            "--advertise",
            "203.0.113.7:15009",
        ),
    ];

    /// Every container of every workload object in `file`: (name, args, names of its env variables).
    fn containers(file: &str) -> Vec<(String, Vec<String>, Vec<String>)> {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut out = Vec::new();
        for doc in text.split("\n---\n") {
            let v: serde_json::Value = serde_norway::from_str(doc).unwrap();
            let pod = &v["spec"]["template"]["spec"];
            for list in ["initContainers", "containers"] {
                for c in pod[list].as_array().into_iter().flatten() {
                    let strings = |key: &str, field: &str| -> Vec<String> {
                        c[key]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|a| {
                                if field.is_empty() {
                                    a.as_str()
                                } else {
                                    a[field].as_str()
                                }
                            })
                            .map(str::to_owned)
                            .collect()
                    };
                    out.push((
                        c["name"].as_str().unwrap_or("?").to_owned(),
                        strings("args", ""),
                        strings("env", "name"),
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn the_kubernetes_manifests_pass_only_flags_the_binary_accepts() {
        let mut checked = 0;
        for file in [
            "deploy/kubernetes/control.yaml",
            "deploy/kubernetes/proxy.yaml",
            "deploy/kubernetes/gateway/gateway.yaml",
        ] {
            for (name, args, env) in containers(file) {
                let mut argv = vec!["strait".to_owned()];
                argv.extend(args.iter().map(|a| a.replace("$(NODE_NAME)", "node-a")));
                for (var, flag, value) in FROM_ENV {
                    if env.iter().any(|e| e == var) {
                        argv.extend([flag.to_owned(), value.to_owned()]);
                    }
                }
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("{file}, container {name}: {argv:?} is refused:\n{e}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 4, "control (init and server), proxy, gateway");
    }
}
