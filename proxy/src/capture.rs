//! Traffic capture with nftables, in one table owned by Strait (`inet strait`, IPv4 and IPv6 alike).
//!
//! The ruleset (VM mode), rebuilt whole and applied in one nft transaction whenever the local workloads
//! change, so the kernel never sees half of it:
//!
//! ```text
//! table inet strait {
//!   chain nat_output    { type nat hook output priority -100
//!     meta mark PROXY_MARK return                      # the proxy's own sockets
//!     meta skuid != { workload uids } return           # only registered workloads are captured
//!     udp dport 53 redirect to :15053; tcp dport 53 redirect to :15053   # all DNS to the DNS proxy
//!     ip daddr 127.0.0.0/8 return; ip6 daddr ::1 return
//!     meta l4proto tcp redirect to :15001              # every other TCP flow goes to the proxy
//!   }
//!   chain filter_output { type filter hook output priority 0
//!     meta mark PROXY_MARK accept
//!     oifname "lo" tcp dport { strict ports } reject with tcp reset   # local non-proxy → workload port
//!     oifname "lo" udp dport { declared ports } counter drop          # UDP to workload ports, locally
//!     meta skuid { uids } udp dport 53 counter drop; … tcp dport 53   # DNS that escaped the redirect
//!     meta skuid { uids } ip daddr 127.0.0.0/8 accept; … ::1 accept   # redirected (NAT already done)
//!     meta skuid { uids } tcp sport { permissive ports } accept       # replies on PERMISSIVE ports
//!     meta skuid { uids } udp sport { plaintext udp } ct direction reply accept   # declared UDP: answers
//!     meta skuid { uids } ip daddr { nodes } udp dport P counter accept          # … and to declared UDP
//!     meta skuid { uids } oifname != "lo" counter drop                # UDP, ICMP, raw: nothing leaves
//!   }
//!   chain filter_input  { type filter hook input priority 0
//!     iifname "lo" accept
//!     udp dport { plaintext udp } counter accept       # declared plaintext UDP (outside the mesh)
//!     meta l4proto udp ct direction reply accept       # answers to datagrams to declared UDP ports
//!     tcp dport { strict ports } counter drop          # plaintext from other hosts
//!     udp dport { declared ports } counter drop        # UDP to workload ports from other hosts
//!   }
//! }
//! ```
//!
//! Redirected TCP reaches the proxy, which forwards it through a tunnel only to mesh destinations (and to
//! explicitly allowed egress); anything else is closed there. If the proxy dies (SIGKILL), the rules stay:
//! captured connections are refused (nothing listens on 15001) and inbound plaintext stays dropped, so the
//! failure is closed. `nft delete table inet strait` (or restarting the proxy) recovers.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem,
};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Reject, RejectType, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

/// The table Strait owns; `nft delete table inet strait` removes every rule Strait installed.
pub const TABLE: &str = "strait";
/// Socket mark on every socket the proxy opens, so its own traffic is never captured.
pub const PROXY_MARK: u32 = 0x5354;

/// Packets of meshed pods diverted to the proxy carry this mark, which routes them to the local stack.
pub const TPROXY_MARK: u32 = 0x5355;
/// The routing table that delivers [`TPROXY_MARK`]ed packets locally (`local default dev lo`).
pub const TPROXY_TABLE: u32 = 0x5355;

/// How workloads are recognised and captured on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Local processes by Unix user; their TCP is `redirect`ed in the output hook.
    #[default]
    Vm,
    /// Pods by address; their TCP is diverted with TPROXY in the prerouting hook of the node (the proxy
    /// runs in the host network namespace).
    Kubernetes,
}

/// What the rules must capture and protect on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CapturePlan {
    pub mode: CaptureMode,
    /// Kubernetes mode: addresses of the meshed pods on this node.
    pub meshed_pods: BTreeSet<IpAddr>,
    /// Kubernetes mode with `--allow-kubelet-probes`: the TCP ports of each meshed pod address that the
    /// node may reach in plaintext (the pods' HTTP, TCP and gRPC probes).
    pub probe_ports: BTreeMap<IpAddr, BTreeSet<u16>>,
    /// Unix users of the node's registered workloads (outbound capture).
    pub workload_uids: BTreeSet<u32>,
    /// Workload ports that refuse plaintext (everything not declared PERMISSIVE).
    pub strict_ports: BTreeSet<u16>,
    /// PERMISSIVE workload ports: plaintext from other hosts is accepted, so the workload's replies from
    /// these ports must leave the host.
    pub permissive_ports: BTreeSet<u16>,
    /// Where workloads' DNS (UDP and TCP port 53, to any address) goes: redirected (VM mode) or
    /// diverted with TPROXY (Kubernetes mode) to the proxy's DNS sockets on loopback.
    pub dns_port: u16,
    /// VM mode: TCP ports workloads listen on and UDP ports they have unconnected sockets on, declared
    /// or not, as the kernel lists them (refreshed every few seconds): dropped from other hosts.
    pub listening_tcp: BTreeSet<u16>,
    pub listening_udp: BTreeSet<u16>,
    /// Where captured TCP is redirected.
    pub outbound_port: u16,
    /// VM mode: plaintext UDP ports local workloads declared (`protocol: udp`, outside the mesh): other
    /// hosts' datagrams to them are accepted, and the workloads' answers from them leave.
    pub plaintext_udp: BTreeSet<u16>,
    /// VM mode: every declared plaintext UDP port in the mesh → the node addresses declaring it: where
    /// local workloads may send datagrams (and get answers).
    pub plaintext_udp_peers: BTreeMap<u16, BTreeSet<IpAddr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot run nft ({0}); install nftables (apt-get install nftables) and run as root")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Nft(String),
}

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_owned()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn field(protocol: &str, name: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Owned(protocol.to_owned()),
            field: Cow::Owned(name.to_owned()),
        },
    )))
}

fn set(items: impl IntoIterator<Item = Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn prefix(addr: &str, len: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len,
    }))
}

fn m(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    m(left, Operator::EQ, right)
}

/// `ct direction`: `original` for the packet that created a conntrack entry, `reply` for its answers.
fn ct_direction() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(nftables::expr::CT {
        key: "direction".into(),
        family: None,
        dir: None,
    }))
}

fn uid_set(plan: &CapturePlan) -> Expression<'static> {
    set(plan.workload_uids.iter().map(|u| Expression::Number(*u)))
}

/// A set of ports as an nft expression.
fn ports<'a>(ports: impl IntoIterator<Item = &'a u16>) -> Expression<'static> {
    set(ports.into_iter().map(|p| Expression::Number(u32::from(*p))))
}

fn port_set(plan: &CapturePlan) -> Expression<'static> {
    ports(&plan.strict_ports)
}

/// Every declared workload port, strict or PERMISSIVE (UDP to any of them is dropped: the mesh carries
/// TCP only, and PERMISSIVE is about plaintext TCP during a migration).
fn declared_port_set(plan: &CapturePlan) -> Expression<'static> {
    ports(plan.strict_ports.iter().chain(&plan.permissive_ports))
}

fn chain(name: &str, kind: NfChainType, hook: NfHook, prio: i32) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: Cow::Owned(name.to_owned()),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })))
}

fn rule(chain: &str, comment: &str, stmts: Vec<Statement<'static>>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: Cow::Owned(chain.to_owned()),
        expr: Cow::Owned(stmts),
        comment: Some(Cow::Owned(comment.to_owned())),
        ..Rule::default()
    })))
}

/// The two loopback destinations (IPv4 and IPv6) as matches, for rules that treat loopback specially.
fn loopback_dsts() -> [Statement<'static>; 2] {
    [
        eq(field("ip", "daddr"), prefix("127.0.0.0", 8)),
        eq(field("ip6", "daddr"), s("::1")),
    ]
}

fn counter() -> Statement<'static> {
    Statement::Counter(nftables::stmt::Counter::Anonymous(None))
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

/// Create the table (a no-op if present), delete it with everything in it, create it again: the start of
/// every ruleset transaction, so applying one replaces whatever was there.
fn fresh_table() -> Vec<NfObject<'static>> {
    vec![
        NfObject::CmdObject(NfCmd::Add(table())),
        NfObject::CmdObject(NfCmd::Delete(table())),
        NfObject::CmdObject(NfCmd::Add(table())),
    ]
}

/// The complete, idempotent transaction for the plan's mode. nft applies the batch atomically.
pub fn ruleset(plan: &CapturePlan) -> Nftables<'static> {
    match plan.mode {
        CaptureMode::Vm => vm_ruleset(plan),
        CaptureMode::Kubernetes => kubernetes_ruleset(plan),
    }
}

fn vm_ruleset(plan: &CapturePlan) -> Nftables<'static> {
    let mut objs = fresh_table();
    objs.extend([
        chain("nat_output", NfChainType::NAT, NfHook::Output, -100),
        chain("filter_output", NfChainType::Filter, NfHook::Output, 0),
        chain("filter_input", NfChainType::Filter, NfHook::Input, 0),
    ]);
    let ret = || Statement::Return(None);
    let mark = || meta(MetaKey::Mark);
    let tcp = || eq(meta(MetaKey::L4proto), s("tcp"));

    // Outbound capture.
    objs.push(rule(
        "nat_output",
        "the proxy's own sockets",
        vec![eq(mark(), Expression::Number(PROXY_MARK)), ret()],
    ));
    if !plan.workload_uids.is_empty() {
        objs.push(rule(
            "nat_output",
            "only registered workloads are captured",
            vec![m(meta(MetaKey::Skuid), Operator::NEQ, uid_set(plan)), ret()],
        ));
        // Before loopback is exempted: a resolver on 127.0.0.53 is asked through the proxy too.
        for l4 in ["udp", "tcp"] {
            objs.push(rule(
                "nat_output",
                "workload DNS goes to the proxy's DNS port",
                vec![
                    eq(field(l4, "dport"), Expression::Number(53)),
                    Statement::Redirect(Some(NAT {
                        addr: None,
                        family: None,
                        port: Some(Expression::Number(u32::from(plan.dns_port))),
                        flags: None,
                    })),
                ],
            ));
        }
        for dst in loopback_dsts() {
            objs.push(rule("nat_output", "loopback stays local", vec![dst, ret()]));
        }
        objs.push(rule(
            "nat_output",
            "workload TCP goes to the proxy",
            vec![
                tcp(),
                Statement::Redirect(Some(NAT {
                    addr: None,
                    family: None,
                    port: Some(Expression::Number(u32::from(plan.outbound_port))),
                    flags: None,
                })),
            ],
        ));
    }

    // Local enforcement.
    objs.push(rule(
        "filter_output",
        "the proxy's own sockets",
        vec![
            eq(mark(), Expression::Number(PROXY_MARK)),
            Statement::Accept(None),
        ],
    ));
    if !plan.strict_ports.is_empty() {
        objs.push(rule(
            "filter_output",
            "only the proxy may reach workload ports locally",
            vec![
                eq(meta(MetaKey::Oifname), s("lo")),
                tcp(),
                eq(field("tcp", "dport"), port_set(plan)),
                counter(),
                Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
            ],
        ));
    }
    let declared = !plan.strict_ports.is_empty() || !plan.permissive_ports.is_empty();
    if declared {
        // Not only from unregistered users: a workload sending UDP to another workload on this host would
        // bypass the mesh over loopback too, and the proxy itself never sends UDP to workload ports.
        objs.push(rule(
            "filter_output",
            "UDP to workload ports on this host",
            vec![
                eq(meta(MetaKey::Oifname), s("lo")),
                eq(meta(MetaKey::L4proto), s("udp")),
                eq(field("udp", "dport"), declared_port_set(plan)),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }
    if !plan.workload_uids.is_empty() {
        // Redirected DNS has the proxy's port by now; what still goes to port 53 escaped the redirect
        // (a flow conntrack knew before the rules existed) and must not reach a resolver.
        for l4 in ["udp", "tcp"] {
            objs.push(rule(
                "filter_output",
                "workload DNS that was not redirected",
                vec![
                    eq(meta(MetaKey::Skuid), uid_set(plan)),
                    eq(field(l4, "dport"), Expression::Number(53)),
                    counter(),
                    Statement::Drop(None),
                ],
            ));
        }
        // After the nat chain's redirect the destination is loopback, but `oifname` still names the device
        // chosen before NAT, so redirected packets are recognised by their rewritten destination.
        for dst in loopback_dsts() {
            objs.push(rule(
                "filter_output",
                "redirected to the proxy",
                vec![
                    eq(meta(MetaKey::Skuid), uid_set(plan)),
                    dst,
                    Statement::Accept(None),
                ],
            ));
        }
        if !plan.permissive_ports.is_empty() {
            // Workload-initiated TCP was redirected by the nat chain before this point, so TCP leaving
            // from these source ports is the answer to an inbound connection.
            objs.push(rule(
                "filter_output",
                "replies from PERMISSIVE ports",
                vec![
                    eq(meta(MetaKey::Skuid), uid_set(plan)),
                    tcp(),
                    eq(field("tcp", "sport"), ports(&plan.permissive_ports)),
                    Statement::Accept(None),
                ],
            ));
        }
        if !plan.plaintext_udp.is_empty() {
            // Only answers: a workload cannot start a flow to anywhere from its declared port.
            objs.push(rule(
                "filter_output",
                "answers from plaintext UDP ports (outside the mesh)",
                vec![
                    eq(meta(MetaKey::Skuid), uid_set(plan)),
                    eq(meta(MetaKey::L4proto), s("udp")),
                    eq(field("udp", "sport"), ports(&plan.plaintext_udp)),
                    eq(ct_direction(), s("reply")),
                    Statement::Accept(None),
                ],
            ));
        }
        for (port, addrs) in &plan.plaintext_udp_peers {
            for (family, daddrs) in [
                (
                    "ip",
                    addrs.iter().filter(|a| a.is_ipv4()).collect::<Vec<_>>(),
                ),
                ("ip6", addrs.iter().filter(|a| a.is_ipv6()).collect()),
            ] {
                if daddrs.is_empty() {
                    continue;
                }
                objs.push(rule(
                    "filter_output",
                    "plaintext UDP to a declared UDP port (outside the mesh)",
                    vec![
                        eq(meta(MetaKey::Skuid), uid_set(plan)),
                        eq(
                            field(family, "daddr"),
                            set(daddrs.iter().map(|a| s(&a.to_string()))),
                        ),
                        eq(meta(MetaKey::L4proto), s("udp")),
                        eq(field("udp", "dport"), Expression::Number(u32::from(*port))),
                        counter(),
                        Statement::Accept(None),
                    ],
                ));
            }
        }
        objs.push(rule(
            "filter_output",
            "nothing else leaves the host from a workload",
            vec![
                eq(meta(MetaKey::Skuid), uid_set(plan)),
                m(meta(MetaKey::Oifname), Operator::NEQ, s("lo")),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }

    // Inbound.
    objs.push(rule(
        "filter_input",
        "loopback (the proxy forwarding to workloads)",
        vec![eq(meta(MetaKey::Iifname), s("lo")), Statement::Accept(None)],
    ));
    if !plan.plaintext_udp.is_empty() {
        objs.push(rule(
            "filter_input",
            "plaintext UDP to declared UDP ports (outside the mesh)",
            vec![
                eq(meta(MetaKey::L4proto), s("udp")),
                eq(field("udp", "dport"), ports(&plan.plaintext_udp)),
                counter(),
                Statement::Accept(None),
            ],
        ));
    }
    if !plan.plaintext_udp_peers.is_empty() && !plan.workload_uids.is_empty() {
        objs.push(rule(
            "filter_input",
            "answers to plaintext UDP sent to declared UDP ports",
            vec![
                eq(meta(MetaKey::L4proto), s("udp")),
                eq(ct_direction(), s("reply")),
                Statement::Accept(None),
            ],
        ));
    }
    if !plan.strict_ports.is_empty() {
        objs.push(rule(
            "filter_input",
            "plaintext to workload ports from other hosts",
            vec![
                tcp(),
                eq(field("tcp", "dport"), port_set(plan)),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }
    if declared {
        objs.push(rule(
            "filter_input",
            "UDP to workload ports from other hosts",
            vec![
                eq(meta(MetaKey::L4proto), s("udp")),
                eq(field("udp", "dport"), declared_port_set(plan)),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }
    // Not only declared ports: in VM mode nothing tells the kernel which user an inbound packet is for,
    // so the proxy lists the workloads' listening sockets and drops other hosts' traffic to those ports.
    // (PERMISSIVE ports stay open to plaintext on purpose.)
    let undeclared_tcp: Vec<u16> = plan
        .listening_tcp
        .iter()
        .filter(|p| !plan.strict_ports.contains(p) && !plan.permissive_ports.contains(p))
        .copied()
        .collect();
    if !undeclared_tcp.is_empty() {
        objs.push(rule(
            "filter_input",
            "TCP to ports workloads listen on without declaring them",
            vec![
                eq(meta(MetaKey::L4proto), s("tcp")),
                eq(field("tcp", "dport"), ports(&undeclared_tcp)),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }
    if !plan.listening_udp.is_empty() {
        objs.push(rule(
            "filter_input",
            "UDP to the sockets of workloads",
            vec![
                eq(meta(MetaKey::L4proto), s("udp")),
                eq(field("udp", "dport"), ports(&plan.listening_udp)),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }
    Nftables {
        objects: Cow::Owned(objs),
    }
}

/// The Kubernetes-mode ruleset (the proxy is in the node's network namespace; pods sit behind their own
/// interfaces and are routed through the node, as with routed CNIs such as Calico):
///
/// ```text
/// table inet strait {
///   chain prerouting { type filter hook prerouting priority -90     # after kube-proxy's Service DNAT
///     ip saddr @meshed fib saddr . iif oif missing counter drop    # a pod's address from elsewhere
///     ip saddr @meshed4 meta l4proto { udp, tcp } th dport 53 tproxy ip to 127.0.0.1:15053
///         meta mark set TPROXY_MARK accept                 # all DNS to the DNS proxy, any resolver
///     ip saddr @meshed4 meta l4proto tcp tproxy ip to 127.0.0.1:15001 meta mark set TPROXY_MARK accept
///     ip6 saddr @meshed6 meta l4proto tcp tproxy ip6 to [::1]:15001 meta mark set TPROXY_MARK accept
///   }
///   chain input { type filter hook input priority 0              # pods to the node itself
///     meta mark TPROXY_MARK accept                         # the diverted TCP, to the proxy
///     icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
///     ct direction reply accept                            # answers to the proxy's deliveries
///     ip saddr @meshed counter drop
///   }
///   chain forward { type filter hook forward priority 0
///     ip saddr @meshed counter drop                    # UDP, ICMP… from meshed pods: nothing else leaves
///     ip daddr @meshed counter drop                    # plaintext into meshed pods (other pods, other hosts)
///   }
///   chain output { type filter hook output priority 0
///     icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept   # the node finds its pods
///     meta mark PROXY_MARK accept                      # the proxy delivering tunnelled streams
///     ct direction reply accept                        # the transparent sockets answering pods
///     ip daddr POD tcp dport { PROBE PORTS } accept      # only with --allow-kubelet-probes
///     ip daddr @meshed counter drop                    # the node's other processes: no plaintext either
///   }
/// }
/// ```
///
/// Pods of namespaces that did not opt in match none of these rules. The policy route for
/// [`TPROXY_MARK`] (see [`ensure_tproxy_route`]) delivers diverted packets to the proxy's transparent
/// listener, which sees the original source (the pod) and destination.
fn kubernetes_ruleset(plan: &CapturePlan) -> Nftables<'static> {
    let mut objs = fresh_table();
    objs.extend([
        chain("prerouting", NfChainType::Filter, NfHook::Prerouting, -90),
        chain("input", NfChainType::Filter, NfHook::Input, 0),
        chain("forward", NfChainType::Filter, NfHook::Forward, 0),
        chain("output", NfChainType::Filter, NfHook::Output, 0),
    ]);
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = plan.meshed_pods.iter().partition(|a| a.is_ipv4());
    let families = [("ip", v4), ("ip6", v6)];
    let addr_set = |ips: &[IpAddr]| set(ips.iter().map(|a| s(&a.to_string())));
    let direction = |dir: &str| eq(ct_direction(), s(dir));
    // The node resolves its pods' IPv6 addresses with neighbour discovery and the pods resolve the node's
    // (ARP, the IPv4 equivalent, is not IP and never reaches this table).
    let neighbour_discovery = |chain_name: &str| {
        rule(
            chain_name,
            "IPv6 neighbour discovery between the node and its pods",
            vec![
                eq(meta(MetaKey::L4proto), s("ipv6-icmp")),
                eq(
                    field("icmpv6", "type"),
                    set([s("nd-neighbor-solicit"), s("nd-neighbor-advert")]),
                ),
                Statement::Accept(None),
            ],
        )
    };
    let drop_meshed =
        |chain_name: &str, comment: &str, dir: &str, objs: &mut Vec<NfObject<'static>>| {
            for (proto, ips) in &families {
                if !ips.is_empty() {
                    objs.push(rule(
                        chain_name,
                        comment,
                        vec![
                            eq(field(proto, dir), addr_set(ips)),
                            counter(),
                            Statement::Drop(None),
                        ],
                    ));
                }
            }
        };

    // Source addresses are what identify pods here, so a packet claiming a meshed pod's address must have
    // come in through the interface that address is routed to (strict reverse-path check, whatever the
    // node's rp_filter sysctls say).
    for (proto, ips) in &families {
        if ips.is_empty() {
            continue;
        }
        objs.push(rule(
            "prerouting",
            "spoofed meshed pod address (not routed back through its interface)",
            vec![
                eq(field(proto, "saddr"), addr_set(ips)),
                eq(
                    Expression::Named(NamedExpression::Fib(nftables::expr::Fib {
                        result: nftables::expr::FibResult::Oif,
                        flags: [nftables::expr::FibFlag::Saddr, nftables::expr::FibFlag::Iif]
                            .into_iter()
                            .collect(),
                    })),
                    Expression::Boolean(false),
                ),
                counter(),
                Statement::Drop(None),
            ],
        ));
    }
    let tproxy = |proto: &str, port: u16| -> [Statement<'static>; 3] {
        let to = if proto == "ip" { "127.0.0.1" } else { "::1" };
        [
            Statement::TProxy(nftables::stmt::TProxy {
                family: Some(proto.to_owned().into()),
                port,
                addr: Some(to.into()),
            }),
            Statement::Mangle(nftables::stmt::Mangle {
                key: meta(MetaKey::Mark),
                value: Expression::Number(TPROXY_MARK),
            }),
            Statement::Accept(None),
        ]
    };
    // A meshed pod's DNS, UDP and TCP, to whatever address it asked (the cluster DNS Service, after
    // kube-proxy's DNAT, or anything else), goes to the DNS proxy: nothing but DNS the proxy allowed
    // reaches a resolver from a pod.
    for (proto, ips) in &families {
        if ips.is_empty() {
            continue;
        }
        let mut stmts = vec![
            eq(field(proto, "saddr"), addr_set(ips)),
            eq(meta(MetaKey::L4proto), set([s("udp"), s("tcp")])),
            eq(field("th", "dport"), Expression::Number(53)),
        ];
        stmts.extend(tproxy(proto, plan.dns_port));
        objs.push(rule(
            "prerouting",
            "meshed pods' DNS goes to the DNS proxy",
            stmts,
        ));
    }
    for (proto, ips) in &families {
        if ips.is_empty() {
            continue;
        }
        let mut stmts = vec![
            eq(field(proto, "saddr"), addr_set(ips)),
            eq(meta(MetaKey::L4proto), s("tcp")),
        ];
        stmts.extend(tproxy(proto, plan.outbound_port));
        objs.push(rule(
            "prerouting",
            "meshed pods' TCP goes to the proxy",
            stmts,
        ));
    }

    // Into the node itself (its addresses, host-network pods, a node-local DNS cache).
    objs.push(rule(
        "input",
        "meshed pods' TCP diverted to the proxy",
        vec![
            eq(meta(MetaKey::Mark), Expression::Number(TPROXY_MARK)),
            Statement::Accept(None),
        ],
    ));
    objs.push(neighbour_discovery("input"));
    objs.push(rule(
        "input",
        "answers to the node's connections (the proxy delivering streams)",
        vec![direction("reply"), Statement::Accept(None)],
    ));
    drop_meshed(
        "input",
        "nothing else from a meshed pod to the node",
        "saddr",
        &mut objs,
    );

    // Through the node. No blanket "established" accept: a connection that existed before its pod joined
    // the mesh is cut, not grandfathered.
    drop_meshed(
        "forward",
        "nothing else leaves a meshed pod",
        "saddr",
        &mut objs,
    );
    drop_meshed("forward", "plaintext into meshed pods", "daddr", &mut objs);

    // From the node's own processes.
    objs.push(neighbour_discovery("output"));
    objs.push(rule(
        "output",
        "the proxy's own sockets",
        vec![
            eq(meta(MetaKey::Mark), Expression::Number(PROXY_MARK)),
            Statement::Accept(None),
        ],
    ));
    objs.push(rule(
        "output",
        "answers to connections meshed pods opened (the proxy's transparent sockets)",
        vec![direction("reply"), Statement::Accept(None)],
    ));
    for (addr, probe) in &plan.probe_ports {
        let proto = if addr.is_ipv4() { "ip" } else { "ip6" };
        objs.push(rule(
            "output",
            "kubelet probes (--allow-kubelet-probes)",
            vec![
                eq(field(proto, "daddr"), s(&addr.to_string())),
                eq(meta(MetaKey::L4proto), s("tcp")),
                eq(field("tcp", "dport"), ports(probe)),
                counter(),
                Statement::Accept(None),
            ],
        ));
    }
    drop_meshed(
        "output",
        "plaintext from the node into meshed pods",
        "daddr",
        &mut objs,
    );
    Nftables {
        objects: Cow::Owned(objs),
    }
}

/// Runs `ip ARGS`, returning its error text on failure.
fn ip(args: &[&str]) -> Result<(), CaptureError> {
    ip_output(args).map(drop)
}

/// Runs `ip ARGS`, returning what it printed, or its error text on failure.
fn ip_output(args: &[&str]) -> Result<String, CaptureError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(CaptureError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CaptureError::Nft(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The policy routes TPROXY needs (IPv4 and IPv6): packets marked [`TPROXY_MARK`] are delivered locally,
/// whatever their destination. Idempotent without a gap: a restart finds the previous proxy's route (the
/// rules outlive it), adds its own copy first and only then removes extra copies, so marked packets are
/// never routed onwards (past the mesh) in between.
pub fn ensure_tproxy_route() -> Result<(), CaptureError> {
    let mark = format!("{TPROXY_MARK:#x}");
    let table = TPROXY_TABLE.to_string();
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        ip(&[
            family, "route", "replace", "local", default, "dev", "lo", "table", &table,
        ])?;
        ip(&[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        let copies = |out: String| out.lines().filter(|l| !l.trim().is_empty()).count();
        while copies(ip_output(&[
            family, "rule", "list", "fwmark", &mark, "lookup", &table,
        ])?) > 1
        {
            ip(&[family, "rule", "del", "fwmark", &mark, "lookup", &table])?;
        }
    }
    Ok(())
}

/// Removes what [`ensure_tproxy_route`] added; absent routes are fine.
pub fn remove_tproxy_route() {
    let mark = format!("{TPROXY_MARK:#x}");
    let table = TPROXY_TABLE.to_string();
    for family in ["-4", "-6"] {
        // `ip rule del` removes one matching rule per call.
        while ip(&[family, "rule", "del", "fwmark", &mark, "lookup", &table]).is_ok() {}
        let _ = ip(&[family, "route", "flush", "table", &table]);
    }
}

/// Runs `nft -j -f -` with the given JSON, returning nft's own error text on failure.
fn nft_json(json: &str) -> Result<(), CaptureError> {
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CaptureError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(json.as_bytes())
            .map_err(CaptureError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(CaptureError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Installs (or replaces) the table, atomically.
pub fn apply(plan: &CapturePlan) -> Result<(), CaptureError> {
    let json =
        serde_json::to_string(&ruleset(plan)).map_err(|e| CaptureError::Nft(e.to_string()))?;
    nft_json(&json)
}

/// True when Strait's table is in place (a previous proxy's rules, kept across its restart).
pub fn table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Takes the node out of the mesh: the table and, in Kubernetes mode, the TPROXY policy route.
pub fn uninstall(kubernetes: bool) -> Result<(), CaptureError> {
    remove()?;
    if kubernetes {
        remove_tproxy_route();
    }
    Ok(())
}

/// Removes the table and every rule in it; succeeds if it is already gone.
pub fn remove() -> Result<(), CaptureError> {
    let batch = Nftables {
        objects: Cow::Owned(vec![
            NfObject::CmdObject(NfCmd::Add(table())),
            NfObject::CmdObject(NfCmd::Delete(table())),
        ]),
    };
    let json = serde_json::to_string(&batch).map_err(|e| CaptureError::Nft(e.to_string()))?;
    nft_json(&json)
}

/// The table as nft prints it, for `/config_dump`.
pub fn list() -> String {
    Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_serialises_to_nft_json() {
        let plan = CapturePlan {
            workload_uids: [1001, 1002].into(),
            strict_ports: [5000].into(),
            permissive_ports: [5002].into(),
            dns_port: 15053,
            outbound_port: 15001,
            ..Default::default()
        };
        let json = serde_json::to_string(&ruleset(&plan)).unwrap();
        assert!(json.contains(r#""redirect":{"port":15001}"#), "{json}");
        // DNS is redirected before loopback is exempted, and never accepted to a resolver directly.
        let dns = json
            .find(r#""redirect":{"port":15053}"#)
            .expect("DNS redirect");
        assert!(dns < json.find("loopback stays local").unwrap());
        assert!(json.contains("workload DNS that was not redirected"));
        assert!(json.contains(r#""skuid""#));
        assert!(json.contains("tcp reset"));
        assert!(json.contains("replies from PERMISSIVE ports"));
    }

    #[test]
    fn kubernetes_ruleset_diverts_meshed_pods_only() {
        let plan = CapturePlan {
            mode: CaptureMode::Kubernetes,
            meshed_pods: [
                "10.244.1.2".parse().unwrap(),
                "fd00:244::2".parse().unwrap(),
            ]
            .into(),
            outbound_port: 15001,
            dns_port: 15053,
            ..Default::default()
        };
        let json = serde_json::to_string(&ruleset(&plan)).unwrap();
        // DNS is diverted to the DNS proxy before the TCP rule could take port 53 to the outbound port.
        let dns = json
            .find(r#""tproxy":{"family":"ip","port":15053,"addr":"127.0.0.1"}"#)
            .expect("DNS diverted");
        assert!(dns < json.find("meshed pods' TCP goes to the proxy").unwrap());
        assert!(json.contains(r#""tproxy":{"family":"ip6","port":15053,"addr":"::1"}"#));
        assert!(
            json.contains(r#""tproxy":{"family":"ip","port":15001,"addr":"127.0.0.1"}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""tproxy":{"family":"ip6","port":15001,"addr":"::1"}"#),
            "{json}"
        );
        assert!(json.contains("plaintext into meshed pods"));
        assert!(
            json.contains(r#""fib":{"result":"oif","flags":["#),
            "{json}"
        );
        assert!(json.contains("nd-neighbor-solicit"), "{json}");
        assert!(
            !json.contains("kubelet probes"),
            "no probe rule unless asked"
        );
        let probed = CapturePlan {
            probe_ports: [("10.244.1.2".parse().unwrap(), [8080, 9000].into())].into(),
            ..plan.clone()
        };
        let json = serde_json::to_string(&ruleset(&probed)).unwrap();
        assert!(json.contains("kubelet probes"), "{json}");
        assert!(json.contains(r#"{"set":[8080,9000]}"#), "{json}");
        assert!(!json.contains("skuid"), "no VM rules in Kubernetes mode");
        // No meshed pods: no pod rules at all, only the table and the generic accepts.
        let empty = CapturePlan {
            mode: CaptureMode::Kubernetes,
            ..Default::default()
        };
        let json = serde_json::to_string(&ruleset(&empty)).unwrap();
        assert!(!json.contains("tproxy"));
    }
}
