//! The proxy's view of the mesh directory: which workload a destination address is, and which local
//! workload a Unix user is.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use strait_proto::api::{Directory, GatewayRef, Reach};
use strait_proto::registry::{NodeName, Selector, Workload};

/// Where a captured connection goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub workload: Arc<Workload>,
    pub via: Via,
    /// A partner's workload (federation), not one of this mesh's.
    pub imported: bool,
}

/// How the tunnel to a destination workload is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Via {
    /// The destination node's tunnel listener.
    Tunnel(SocketAddr),
    /// A partner's ingress gateways (any of them): the tunnel runs inside a stream through one.
    Gateways(Arc<[GatewayRef]>),
}

#[derive(Debug, Default)]
pub struct DirectoryView {
    pub revision: u64,
    pub raw: Directory,
    node_by_addr: HashMap<IpAddr, NodeName>,
    by_node_port: HashMap<(NodeName, u16), Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    tunnels: HashMap<NodeName, SocketAddr>,
    local_by_uid: HashMap<u32, Arc<Workload>>,
    local_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Mesh DNS names (`<service account>.<namespace>`, relative to the DNS zone) → addresses.
    by_name: HashMap<String, Vec<IpAddr>>,
    /// Declared plaintext UDP ports (`protocol: udp`) → the node addresses of the workloads declaring them.
    pub plaintext_udp: BTreeMap<u16, BTreeSet<IpAddr>>,
    pub local: Vec<Arc<Workload>>,
    /// Federation: partners' workloads imported here, by (address, port), with their node's tunnel.
    imported: HashMap<(IpAddr, u16), Route>,
    /// Federation: local workload → partner trust domain → the exported ports (empty: all it declares).
    /// Nested so that the check on every foreign stream and request looks up by reference, unallocated.
    exported: HashMap<strait_ca::SpiffeId, HashMap<String, Vec<u16>>>,
    /// Gateway: the exported workloads by the name partners ask for ([`crate::certs::sni_for`]), every
    /// replica (one entry per node running the identity).
    exported_by_sni: HashMap<String, Vec<Arc<Workload>>>,
    /// Egress through the gateways (`strait federation egress on`): this organisation's gateways, by
    /// address and node name. `None`: off, proxies dial partners themselves; `Some(empty)`: on, and
    /// connections to partners are refused until a gateway is up.
    pub egress: Option<Vec<(SocketAddr, NodeName)>>,
    /// Egress gateway: where partners' imports are reached (their gateways, or their nodes' tunnels) →
    /// the partner's trust domain. The only places an egress stream may go.
    import_reach: HashMap<SocketAddr, String>,
}

impl DirectoryView {
    pub fn build(dir: Directory, me: &NodeName) -> Self {
        let mut v = DirectoryView {
            revision: dir.revision,
            ..Default::default()
        };
        for n in &dir.nodes {
            for a in &n.addresses {
                v.node_by_addr.insert(*a, n.name.clone());
            }
            if let Some(t) = n
                .tunnel_address
                .as_deref()
                .and_then(|t| t.parse::<SocketAddr>().ok())
            {
                v.node_by_addr
                    .entry(t.ip())
                    .or_insert_with(|| n.name.clone());
                v.tunnels.insert(n.name.clone(), t);
            }
        }
        let node_addrs: HashMap<&NodeName, &Vec<IpAddr>> =
            dir.nodes.iter().map(|n| (&n.name, &n.addresses)).collect();
        for w in &dir.workloads {
            if let Some(name) = dns_name(&w.id) {
                let addrs = v.by_name.entry(name).or_default();
                match &w.selector {
                    Selector::Ips(ips) => addrs.extend(ips),
                    Selector::Uid(_) => {
                        addrs.extend(node_addrs.get(&w.node).into_iter().copied().flatten())
                    }
                }
                addrs.sort();
                addrs.dedup();
            }
            let w = Arc::new(w.clone());
            for p in w.tcp_ports() {
                v.by_node_port.insert((w.node.clone(), p.port), w.clone());
            }
            for port in w.udp_ports() {
                // Plaintext UDP (outside the mesh): where this node's workloads may send datagrams.
                let at = v.plaintext_udp.entry(port).or_default();
                at.extend(node_addrs.get(&w.node).into_iter().copied().flatten());
            }
            match &w.selector {
                Selector::Ips(ips) => {
                    for ip in ips {
                        v.by_ip.insert(*ip, w.clone());
                        if &w.node == me {
                            v.local_by_ip.insert(*ip, w.clone());
                        }
                    }
                }
                Selector::Uid(uid) if &w.node == me => {
                    v.local_by_uid.insert(*uid, w.clone());
                }
                Selector::Uid(_) => {}
            }
            if &w.node == me {
                v.local.push(w);
            }
        }
        let mut conflicts = HashSet::new();
        for imp in &dir.imports {
            let Ok(node) = NodeName::new(imp.id.trust_domain_str()) else {
                continue;
            };
            let mut ports = imp.ports.clone();
            ports.sort_by_key(|p| p.port);
            ports.dedup_by_key(|p| p.port);
            let route = Route {
                workload: Arc::new(Workload {
                    id: imp.id.clone(),
                    node,
                    selector: Selector::Ips(imp.addresses.clone()),
                    ports,
                    probe_ports: Vec::new(),
                }),
                via: match &imp.reach {
                    Reach::Tunnel(t) => Via::Tunnel(*t),
                    Reach::Gateways(g) => Via::Gateways(g.as_slice().into()),
                },
                imported: true,
            };
            for ip in &imp.addresses {
                for p in route.workload.tcp_ports() {
                    // The control plane refused imports of this mesh's own addresses. An address and
                    // port claimed by two imported identities (two partners, or one partner twice)
                    // goes to neither.
                    match v.imported.entry((*ip, p.port)) {
                        Entry::Vacant(e) => {
                            e.insert(route.clone());
                        }
                        Entry::Occupied(e) if e.get().workload.id != route.workload.id => {
                            conflicts.insert((*ip, p.port));
                        }
                        Entry::Occupied(_) => {}
                    }
                }
            }
        }
        for key in conflicts {
            if let Some(r) = v.imported.remove(&key) {
                tracing::warn!(address = %key.0, port = key.1, first = %r.workload.id, "an address and port imported from more than one identity; routed to none");
            }
        }
        for imp in &dir.imports {
            let partner = imp.id.trust_domain_str();
            match &imp.reach {
                Reach::Tunnel(t) => {
                    v.import_reach.insert(*t, partner.to_owned());
                }
                Reach::Gateways(g) => {
                    for gw in g {
                        v.import_reach.insert(gw.address, partner.to_owned());
                    }
                }
            }
        }
        if dir.egress_through_gateways {
            v.egress = Some(
                dir.nodes
                    .iter()
                    .filter_map(|n| {
                        let a = n.gateway_address.as_deref()?.parse::<SocketAddr>().ok()?;
                        Some((a, n.name.clone()))
                    })
                    .collect(),
            );
        }
        for e in &dir.exports {
            v.exported
                .entry(e.workload.clone())
                .or_default()
                .entry(e.partner.clone())
                .or_default()
                .extend(&e.ports);
        }
        for w in &dir.workloads {
            if v.exported.contains_key(&w.id) {
                v.exported_by_sni
                    .entry(crate::certs::sni_for(&w.id))
                    .or_default()
                    .push(Arc::new(w.clone()));
            }
        }
        v.raw = dir;
        v
    }

    /// Egress gateway: the partner whose import is reached at `target`, if any.
    pub fn import_reach(&self, target: SocketAddr) -> Option<&str> {
        self.import_reach.get(&target).map(String::as_str)
    }

    /// Whether the local workload `dst` is exported to trust domain `partner` on `port` (federation:
    /// a partner's callers reach only what was exported to them). An export without ports covers the
    /// ports the workload declares; a pod declares none, so only the ports its export names are covered
    /// (what the partner was told, `strait_control::federation::exports_for`).
    pub fn exported_to(&self, dst: &Workload, partner: &str, port: u16) -> bool {
        self.exported
            .get(&dst.id)
            .and_then(|by_partner| by_partner.get(partner))
            .is_some_and(|ports| {
                if ports.is_empty() {
                    dst.tcp_ports().any(|p| p.port == port)
                } else {
                    ports.contains(&port) && dst.serves(port)
                }
            })
    }

    /// The mesh workload serving at `dst`, if any: a pod address (Kubernetes mode) or a node address and a
    /// port a workload on that node declared (VM mode).
    pub fn route(&self, dst: SocketAddr) -> Option<Route> {
        let workload = match self.by_ip.get(&dst.ip()) {
            Some(w) if w.serves(dst.port()) => w.clone(),
            Some(_) => return None,
            None => match self.node_by_addr.get(&dst.ip()) {
                Some(node) => self.by_node_port.get(&(node.clone(), dst.port()))?.clone(),
                // A partner's workload (federation), through its own node's tunnel.
                None => return self.imported.get(&(dst.ip(), dst.port())).cloned(),
            },
        };
        let tunnel = *self.tunnels.get(&workload.node)?;
        Some(Route {
            workload,
            via: Via::Tunnel(tunnel),
            imported: false,
        })
    }

    /// Gateway: the replicas of the exported workload partners name `sni` ([`crate::certs::sni_for`]),
    /// each with its node's tunnel listener (replicas whose node has none are left out).
    pub fn exported_by_sni(&self, sni: &str) -> Vec<(&Arc<Workload>, SocketAddr)> {
        self.exported_by_sni
            .get(sni)
            .into_iter()
            .flatten()
            .filter_map(|w| Some((w, *self.tunnels.get(&w.node)?)))
            .collect()
    }

    /// The address a local workload `id` serves `port` at: a pod's own address, or the node's first for
    /// a VM workload (a stream through a gateway names the workload and port, not an address).
    pub fn local_address(
        &self,
        id: &strait_ca::SpiffeId,
        port: u16,
        node_addrs: &[IpAddr],
    ) -> Option<SocketAddr> {
        self.local
            .iter()
            .filter(|w| &w.id == id && w.serves(port))
            .find_map(|w| match &w.selector {
                Selector::Ips(ips) => ips.first(),
                Selector::Uid(_) => node_addrs.first(),
            })
            .map(|ip| SocketAddr::new(*ip, port))
    }

    /// The addresses of the workloads named `<service account>.<namespace>` (all replicas); `None` when
    /// no workload has that name.
    pub fn addresses_of(&self, name: &str) -> Option<&[IpAddr]> {
        self.by_name.get(name).map(Vec::as_slice)
    }

    pub fn local_by_uid(&self, uid: u32) -> Option<&Arc<Workload>> {
        self.local_by_uid.get(&uid)
    }

    /// The local pod with this address (Kubernetes mode).
    pub fn local_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.local_by_ip.get(&ip)
    }

    /// The local workload with identity `id` that serves `target`: a pod owning that address (several
    /// replicas may share an identity on one node), or a VM workload on one of the node's addresses.
    pub fn local_target(
        &self,
        id: &strait_ca::SpiffeId,
        target: SocketAddr,
        node_addrs: &[IpAddr],
    ) -> Option<Arc<Workload>> {
        self.local
            .iter()
            .filter(|w| &w.id == id && w.serves(target.port()))
            .find(|w| match &w.selector {
                Selector::Ips(ips) => ips.contains(&target.ip()),
                Selector::Uid(_) => target.ip().is_loopback() || node_addrs.contains(&target.ip()),
            })
            .cloned()
    }

    /// The meshed pod addresses on this node (Kubernetes mode capture).
    pub fn local_pod_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.local_by_ip.keys().copied()
    }
}

/// The DNS name of a workload relative to the mesh zone: `spiffe://td/ns/movie/sa/vfx` → `vfx.movie`
/// (lower case; `None` for identities of another shape or with characters DNS names cannot carry).
fn dns_name(id: &strait_ca::SpiffeId) -> Option<String> {
    let mut parts = id.path().trim_start_matches('/').split('/');
    let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let name = strait_policy::hostname::HostName::parse(&format!("{sa}.{ns}")).ok()?;
    Some(name.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_proto::api::{DirectoryExport, ExportedWorkload};
    use strait_proto::registry::{PortSpec, Protocol};

    fn import(id: &str, addr: &str, port: u16) -> ExportedWorkload {
        ExportedWorkload {
            id: strait_ca::SpiffeId::parse(id).unwrap(),
            addresses: vec![addr.parse().unwrap()],
            ports: vec![PortSpec::new(port, Protocol::Http)],
            reach: strait_proto::api::Reach::Tunnel(format!("{addr}:15008").parse().unwrap()),
            accepts: Vec::new(),
        }
    }

    #[test]
    fn imports_route_by_address_and_port_and_a_contested_one_goes_nowhere() {
        let dir = Directory {
            imports: vec![
                import("spiffe://vfx.example/ns/r/sa/render", "10.9.0.4", 6000),
                import("spiffe://vfx.example/ns/r/sa/grade", "10.9.0.5", 6000),
                // color.example claims vfx's address and port.
                import("spiffe://color.example/ns/r/sa/x", "10.9.0.5", 6000),
            ],
            ..Default::default()
        };
        let v = DirectoryView::build(dir, &NodeName::new("me").unwrap());
        let r = v.route("10.9.0.4:6000".parse().unwrap()).unwrap();
        assert!(r.imported);
        assert_eq!(
            r.workload.id.as_str(),
            "spiffe://vfx.example/ns/r/sa/render"
        );
        assert_eq!(r.via, Via::Tunnel("10.9.0.4:15008".parse().unwrap()));
        assert!(v.route("10.9.0.4:6001".parse().unwrap()).is_none());
        assert!(v.route("10.9.0.5:6000".parse().unwrap()).is_none());
    }

    #[test]
    fn an_export_covers_what_the_partner_was_told_and_no_more() {
        let me = NodeName::new("me").unwrap();
        let td = |id: &str| strait_ca::SpiffeId::parse(id).unwrap();
        let vm = Workload {
            id: td("spiffe://example.org/ns/a/sa/store"),
            node: me.clone(),
            selector: Selector::Uid(1001),
            ports: vec![
                PortSpec::new(5000, Protocol::Http),
                PortSpec::new(5001, Protocol::Tcp),
            ],
            probe_ports: Vec::new(),
        };
        // A pod declares no ports: it serves every port, but only the ports its export names cross.
        let pod = Workload {
            id: td("spiffe://example.org/ns/shop/sa/db"),
            node: me.clone(),
            selector: Selector::Ips(vec!["10.244.2.21".parse().unwrap()]),
            ports: Vec::new(),
            probe_ports: Vec::new(),
        };
        let pod_all = Workload {
            id: td("spiffe://example.org/ns/shop/sa/web"),
            selector: Selector::Ips(vec!["10.244.2.22".parse().unwrap()]),
            ..pod.clone()
        };
        let export = |w: &Workload, ports: &[u16]| DirectoryExport {
            partner: "vfx.example".into(),
            workload: w.id.clone(),
            ports: ports.to_vec(),
        };
        let dir = Directory {
            workloads: vec![vm.clone(), pod.clone(), pod_all.clone()],
            exports: vec![
                export(&vm, &[]),
                export(&pod, &[8080]),
                export(&pod_all, &[]),
            ],
            ..Default::default()
        };
        let v = DirectoryView::build(dir, &me);
        assert!(v.exported_to(&vm, "vfx.example", 5000));
        assert!(v.exported_to(&vm, "vfx.example", 5001));
        assert!(
            !v.exported_to(&vm, "vfx.example", 5002),
            "a port it does not declare"
        );
        assert!(
            !v.exported_to(&vm, "color.example", 5000),
            "another partner"
        );
        assert!(v.exported_to(&pod, "vfx.example", 8080));
        assert!(
            !v.exported_to(&pod, "vfx.example", 8081),
            "a port the export does not name"
        );
        for port in [80, 8080, 5432] {
            assert!(
                !v.exported_to(&pod_all, "vfx.example", port),
                "a pod exported without ports"
            );
        }
    }
}
