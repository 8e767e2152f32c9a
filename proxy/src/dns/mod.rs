//! The DNS proxy: every DNS query of a meshed workload, over UDP or TCP, ends here (nftables redirects
//! port 53 to [`DNS_PORT`]), whatever resolver the workload addressed.
//!
//! - Names of the mesh (`<service account>.<namespace>.<zone>`, zone `strait.internal` by default) are
//!   answered from the directory: no resolver is asked, none is needed.
//! - A name an egress entry of the asking workload allows (`host: api.partner.example` or
//!   `*.partner.example` in the workflow, or `--allow-egress NAME[:PORT]`) is asked of the node's
//!   resolver in a query rebuilt from the parsed question ([`message`]); the addresses in the answer become
//!   reachable for that workload on the entry's port, for the answer's lifetime ([`resolved`]).
//! - Every other name is answered REFUSED here and logged with the workload and the name; a message that
//!   is not a DNS query is dropped. Nothing but a well-formed query for an allowed name reaches a
//!   resolver, so a name cannot carry data out (`secret.attacker.example`).
//!
//! How queries get here and who asks:
//! - VM mode: nftables redirects port 53 of workload users to [`DNS_PORT`]; conntrack gives the
//!   datagram's addresses before the redirect, and `sock_diag` the Unix user owning the sending socket.
//! - Kubernetes mode: nftables diverts port 53 from meshed pods with TPROXY to the same port (transparent
//!   sockets, [`crate::tproxy_udp`]); the source address is the pod's, and UDP answers leave from the
//!   address the pod asked.

pub mod message;
pub mod resolved;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_policy::hostname::{HostName, HostPattern};
use strait_proto::registry::Workload;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::capture::CaptureMode;
use crate::tunnel::Ctx;
use message::{Outcome, Plan, Scope, Transport};

/// Where workloads' DNS is redirected (UDP and TCP, on loopback).
pub const DNS_PORT: u16 = 15053;
/// The default zone of mesh names.
pub const DEFAULT_ZONE: &str = "strait.internal";
/// Kubernetes mode's default `--dns-cluster-domain` (kubelet's default `clusterDomain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// How long one resolver has to answer before the next is tried (then SERVFAIL).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A DNS-over-TCP client that sends nothing for this long is closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries answered at once; past it datagrams are dropped (the client retries) rather than queued.
const MAX_INFLIGHT: usize = 512;

/// An egress entry by name: the name pattern and, optionally, the one port it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pub pattern: HostPattern,
    pub port: Option<u16>,
}

impl HostRule {
    /// `NAME[:PORT]` or `*.NAME[:PORT]`, as `--allow-egress` takes it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, port) = match s.rsplit_once(':') {
            Some((n, p)) => (
                n,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("{s:?}: {p:?} is not a port"))?,
                ),
            ),
            None => (s, None),
        };
        let pattern =
            HostPattern::parse(name).map_err(|e| format!("{s:?} is not a DNS name: {e}"))?;
        Ok(Self { pattern, port })
    }

    pub fn allows(&self, name: &HostName, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.pattern.matches(name)
    }
}

/// How the node's DNS proxy is configured.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The zone of mesh names.
    pub zone: HostName,
    /// The resolvers allowed names are asked of (port 53), in order.
    pub upstreams: Vec<IpAddr>,
    /// `--allow-egress` entries that name DNS names.
    pub hosts: Vec<HostRule>,
    /// Names under this domain are forwarded for every workload of the node, and their answers open
    /// nothing (`--dns-cluster-domain`; Kubernetes mode: `cluster.local`, the Services and pods of the
    /// cluster, which its DNS answers itself).
    pub cluster_domain: Option<HostName>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            zone: HostName::parse(DEFAULT_ZONE).unwrap_or_else(|_| unreachable!("a valid name")),
            upstreams: Vec::new(),
            hosts: Vec::new(),
            cluster_domain: None,
        }
    }
}

/// The DNS proxy's settings and state, shared by its listeners and the egress check.
pub struct Dns {
    pub zone: HostName,
    /// Resolvers allowed names are asked of, in order.
    pub upstreams: Vec<SocketAddr>,
    /// `--allow-egress` entries that name DNS names (for every workload of the node).
    pub hosts: Vec<HostRule>,
    /// Names forwarded for any workload, whose answers open nothing (see [`DnsSettings`]).
    pub cluster_domain: Option<HostName>,
    pub resolved: resolved::Resolved,
    inflight: Arc<Semaphore>,
}

impl Dns {
    pub fn new(settings: DnsSettings) -> Self {
        let DnsSettings {
            zone,
            upstreams,
            hosts,
            cluster_domain,
        } = settings;
        Self {
            zone,
            cluster_domain,
            upstreams: upstreams
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 53))
                .collect(),
            hosts,
            resolved: resolved::Resolved::default(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        }
    }

    /// Whether `source` may connect to `dst` because a resolver told it a name an egress entry allows
    /// is there (the entry still allowing it now).
    pub fn egress_allowed(
        &self,
        authz: &crate::authz::Authz,
        source: &str,
        dst: SocketAddr,
    ) -> bool {
        self.resolved
            .names(source, dst.ip(), Instant::now())
            .iter()
            .any(|name| {
                self.hosts.iter().any(|r| r.allows(name, dst.port()))
                    || authz.egress_host_allowed(source, name, Some(dst.port()))
            })
    }

    /// Whether an egress entry for `source` names `name` (its answer then opens the entry's port).
    fn egress_name(&self, authz: &crate::authz::Authz, source: &str, name: &HostName) -> bool {
        self.hosts.iter().any(|r| r.pattern.matches(name))
            || authz.egress_host_allowed(source, name, None)
    }

    fn in_cluster_domain(&self, name: &HostName) -> bool {
        self.cluster_domain.as_ref().is_some_and(|d| name.is_in(d))
    }

    fn may_resolve(&self, authz: &crate::authz::Authz, source: &str, name: &HostName) -> bool {
        self.in_cluster_domain(name) || self.egress_name(authz, source, name)
    }
}

/// The workload that sent the flow the proxy sees as `peer` → `local`, if it is one of this node's.
fn source(
    ctx: &Ctx,
    transport: Transport,
    local: SocketAddr,
    peer: SocketAddr,
) -> Option<Arc<Workload>> {
    if ctx.mode == CaptureMode::Kubernetes {
        // TPROXY keeps the pod's address as the source (and spoofed pod addresses were dropped before
        // the divert).
        return ctx.dir.load().local_by_ip(peer.ip()).cloned();
    }
    let protocol = match transport {
        Transport::Udp => libc::IPPROTO_UDP,
        Transport::Tcp => libc::IPPROTO_TCP,
    } as u8;
    let (client, dst) = match crate::conntrack::original_tuple(protocol, local, peer) {
        Ok(Some(t)) => t,
        Ok(None) => (peer, local),
        Err(e) => {
            warn!(error = %e, %peer, "conntrack lookup for a DNS query failed");
            return None;
        }
    };
    let uid = match transport {
        Transport::Udp => crate::sockets::udp_sender_uid(client, dst),
        Transport::Tcp => crate::sockets::local_peer_uid(client, dst),
    };
    match uid {
        Ok(Some(uid)) => ctx.dir.load().local_by_uid(uid).cloned(),
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, %peer, "socket lookup for a DNS query failed");
            None
        }
    }
}

/// The answer to one message from `src` (`None`: nothing is sent back).
async fn answer(
    ctx: &Ctx,
    bytes: &[u8],
    transport: Transport,
    src: Option<&Workload>,
) -> Option<Vec<u8>> {
    let dns = &ctx.dns;
    // Planned in a block of its own: the directory guard and the closures are not held across the
    // resolver's await.
    let plan = {
        let dir = ctx.dir.load();
        let mesh = |relative: &str| dir.addresses_of(relative).map(<[IpAddr]>::to_vec);
        let allowed =
            |name: &HostName| src.is_some_and(|w| dns.may_resolve(&ctx.authz, w.id.as_str(), name));
        let scope = Scope {
            zone: &dns.zone,
            mesh: &mesh,
            allowed: &allowed,
        };
        message::plan(bytes, transport, &scope, fastrand::u16(..))
    };
    let who = src.map_or("an unregistered user", |w| w.id.as_str());
    let counted = |outcome: &'static str| ctx.metrics.dns_query(outcome);
    match plan {
        Plan::Drop => {
            counted("dropped");
            ctx.metrics.refuse("dns", "not_dns");
            warn!(
                src = who,
                len = bytes.len(),
                "bytes to port 53 that are not a DNS query; dropped"
            );
            None
        }
        Plan::Reply { bytes, outcome } => {
            match outcome {
                Outcome::Mesh => counted("mesh"),
                Outcome::MeshUnknown => counted("mesh_unknown"),
                Outcome::NotAllowed(name) => {
                    counted("refused");
                    ctx.metrics.refuse("dns", "name_not_allowed");
                    warn!(src = who, name = %name, "DNS name not allowed by any egress entry; answered REFUSED");
                }
                Outcome::Unsupported(what) => {
                    counted("unsupported");
                    debug!(src = who, what, "DNS query not served");
                }
            }
            Some(bytes)
        }
        Plan::Forward(pending) => {
            let Some(src) = src else {
                return Some(pending.failure());
            };
            let reply = forward(&dns.upstreams, &pending.upstream, transport).await;
            match reply.as_deref().map(|r| message::finish(&pending, r)) {
                Some(Ok((bytes, addrs))) => {
                    counted("forwarded");
                    if !dns.egress_name(&ctx.authz, src.id.as_str(), &pending.name) {
                        // A cluster name: answered, and the answer opens nothing (pods and Services
                        // are reached through the mesh, or by an egress entry of their own).
                        debug!(src = %src.id, name = %pending.name, "cluster DNS name resolved");
                        return Some(bytes);
                    }
                    if !dns
                        .resolved
                        .record(src.id.as_str(), &pending.name, &addrs, Instant::now())
                    {
                        warn!(src = %src.id, name = %pending.name, "too many resolved addresses for this workload; some are not reachable");
                    }
                    info!(src = %src.id, name = %pending.name, addresses = addrs.len(), "DNS name resolved for an egress entry");
                    Some(bytes)
                }
                Some(Err(e)) => {
                    counted("failed");
                    warn!(src = %src.id, name = %pending.name, error = %e, "the resolver's answer is refused; SERVFAIL");
                    Some(pending.failure())
                }
                None => {
                    counted("failed");
                    warn!(src = %src.id, name = %pending.name, resolvers = ?dns.upstreams, "no resolver answered; SERVFAIL");
                    Some(pending.failure())
                }
            }
        }
    }
}

/// Asks the resolvers in turn; the first answer with the query's id wins.
async fn forward(upstreams: &[SocketAddr], query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    for server in upstreams {
        let attempt = match transport {
            Transport::Udp => exchange_udp(*server, query).await,
            Transport::Tcp => exchange_tcp(*server, query).await,
        };
        match attempt {
            Ok(answer) => return Some(answer),
            Err(e) => debug!(%server, error = %e, "resolver did not answer"),
        }
    }
    None
}

async fn exchange_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = crate::sockets::udp_connected_marked(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; usize::from(message::UDP_PAYLOAD) * 4];
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            // A datagram with another id is not the answer (a late one, or a spoofing attempt): wait on.
            if n >= 2 && buf[..2] == query[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = crate::sockets::connect_marked(server, UPSTREAM_TIMEOUT).await?;
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        write_framed(&mut tcp, query).await?;
        read_framed(&mut tcp)
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"))
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// DNS over TCP frames each message with its length (RFC 1035 §4.2.2).
async fn write_framed(tcp: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    tcp.write_all(&framed).await
}

/// One framed message, or `None` at a clean end of stream.
async fn read_framed(tcp: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match tcp.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Serves DNS over UDP on one socket: redirected to it (VM mode: answered from the socket itself, and
/// the kernel undoes the redirect), or diverted to it by TPROXY (`diverted`, Kubernetes mode: answered
/// from the address the pod asked, [`crate::tproxy_udp`]).
pub async fn serve_udp(ctx: Arc<Ctx>, socket: UdpSocket, diverted: bool) {
    let socket = Arc::new(socket);
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; 65536];
    loop {
        let received = if diverted {
            crate::tproxy_udp::recv(&socket, &mut buf).await
        } else {
            socket
                .recv_from(&mut buf)
                .await
                .map(|(n, peer)| (n, peer, None))
        };
        let (n, peer, original) = match received {
            // With IP_RECVORIGDSTADDR every datagram says where it went: to the socket itself is not a
            // diverted one.
            Ok((n, peer, original)) => (n, peer, original.filter(|o| *o != local)),
            Err(e) => {
                // ICMP errors from earlier sends surface here; the socket itself is fine.
                debug!(error = %e, "DNS socket receive error");
                continue;
            }
        };
        if diverted && original.is_none() {
            // Sent to the proxy's own port, not diverted from a pod: no one to answer as.
            ctx.metrics.refuse("dns", "not_redirected");
            continue;
        }
        let Ok(permit) = ctx.dns.inflight.clone().try_acquire_owned() else {
            ctx.metrics.refuse("dns", "over_capacity");
            continue;
        };
        let query = buf[..n].to_vec();
        let (ctx, socket) = (ctx.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let src = source(&ctx, Transport::Udp, original.unwrap_or(local), peer);
            let Some(reply) = answer(&ctx, &query, Transport::Udp, src.as_deref()).await else {
                return;
            };
            let sent = match original {
                Some(from) => crate::tproxy_udp::send_from(from, peer, &reply),
                None => socket.send_to(&reply, peer).await.map(drop),
            };
            if let Err(e) = sent {
                debug!(error = %e, %peer, "DNS answer not sent");
            }
        });
    }
}

/// Serves redirected DNS over TCP (several queries per connection, answered in order).
pub async fn serve_tcp(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = ctx.dns.inflight.clone().try_acquire_owned() else {
            ctx.metrics.refuse("dns", "over_capacity");
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_tcp_client(&ctx, tcp, peer).await;
        });
    }
}

async fn serve_tcp_client(ctx: &Ctx, mut tcp: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let src = source(ctx, Transport::Tcp, tcp.local_addr()?, peer);
    loop {
        let Ok(msg) = tokio::time::timeout(TCP_IDLE, read_framed(&mut tcp)).await else {
            return Ok(());
        };
        let Some(msg) = msg? else {
            return Ok(());
        };
        match answer(ctx, &msg, Transport::Tcp, src.as_deref()).await {
            Some(reply) => write_framed(&mut tcp, &reply).await?,
            // Not DNS: this is not a DNS client; close.
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rules_parse_and_match() {
        let r = HostRule::parse("api.example.com:443").unwrap();
        let n = |s| HostName::parse(s).unwrap();
        assert!(r.allows(&n("api.example.com"), 443));
        assert!(!r.allows(&n("api.example.com"), 80));
        let any = HostRule::parse("*.example.com").unwrap();
        assert!(any.allows(&n("a.example.com"), 80));
        assert!(HostRule::parse("api.example.com:x").is_err());
        assert!(HostRule::parse("10.0.0.1/8").is_err());
    }
}
