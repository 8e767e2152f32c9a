//! Prometheus metrics of the proxy, served on the admin port's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub direction: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsOutcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Identity {
    pub id: String,
}

/// Gateway: a partner trust domain and one of the workloads exported to it (ingress), or one of this
/// organisation's workloads calling it (egress); bounded by the exports and the registry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// `ingress` (a partner's stream in) or `egress` (this organisation's stream out).
    pub way: &'static str,
    pub partner: String,
    pub workload: String,
}

impl GatewayLabels {
    pub fn direction(&self, direction: &'static str) -> GatewayBytes {
        GatewayBytes {
            way: self.way,
            partner: self.partner.clone(),
            workload: self.workload.clone(),
            direction,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayBytes {
    pub way: &'static str,
    pub partner: String,
    pub workload: String,
    /// `to_workload` or `to_partner`.
    pub direction: &'static str,
}

#[derive(Default)]
pub struct Metrics {
    pub connections: Family<Direction, Counter>,
    pub active: Family<Direction, Gauge>,
    pub bytes_sent: Family<Direction, Counter>,
    pub bytes_received: Family<Direction, Counter>,
    pub refused: Family<Reason, Counter>,
    pub handshake_errors: Family<Reason, Counter>,
    pub tunnels_opened: Counter,
    pub cert_expiry: Family<Identity, Gauge>,
    pub cert_renewals: Counter,
    pub cert_renewal_failures: Counter,
    pub mesh_version: Gauge,
    pub mesh_applied: Counter,
    pub mesh_refused: Counter,
    pub dns_queries: Family<DnsOutcome, Counter>,
    pub gateway_streams: Family<GatewayLabels, Counter>,
    pub gateway_active: Family<GatewayLabels, Gauge>,
    pub gateway_bytes: Family<GatewayBytes, Counter>,
}

impl Metrics {
    pub fn register(&self) -> Registry {
        let mut r = Registry::with_prefix("strait_proxy");
        r.register(
            "mesh_version",
            "Mesh version (directory + policy) this proxy enforces",
            self.mesh_version.clone(),
        );
        r.register(
            "mesh_versions_applied",
            "Mesh versions applied (ACK)",
            self.mesh_applied.clone(),
        );
        r.register(
            "mesh_versions_refused",
            "Mesh versions refused: bad signature, rollback, policy that does not compile (NACK)",
            self.mesh_refused.clone(),
        );
        r.register(
            "connections",
            "Connections handled",
            self.connections.clone(),
        );
        r.register(
            "active_connections",
            "Connections open now",
            self.active.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes sent towards the destination",
            self.bytes_sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes received from the destination",
            self.bytes_received.clone(),
        );
        r.register(
            "refused_connections",
            "Connections refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "tls_handshake_errors",
            "Failed TLS handshakes, by reason",
            self.handshake_errors.clone(),
        );
        r.register(
            "tunnels_opened",
            "mTLS tunnel connections opened (pooled)",
            self.tunnels_opened.clone(),
        );
        r.register(
            "certificate_expiry_seconds",
            "Seconds until each workload certificate expires",
            self.cert_expiry.clone(),
        );
        r.register(
            "dns_queries",
            "DNS queries of workloads by outcome: mesh (answered from the directory), mesh_unknown (NXDOMAIN), forwarded (an allowed name), refused (REFUSED: no egress entry names it), failed (SERVFAIL), unsupported, dropped (not DNS)",
            self.dns_queries.clone(),
        );
        r.register(
            "gateway_streams",
            "Gateway: partners' streams admitted, by partner trust domain and exported workload (refusals are in refused_connections{direction=\"gateway\"})",
            self.gateway_streams.clone(),
        );
        r.register(
            "gateway_active_streams",
            "Gateway: partners' streams open now, by partner and exported workload",
            self.gateway_active.clone(),
        );
        r.register(
            "gateway_bytes",
            "Gateway: bytes carried (encrypted, end to end), by partner, exported workload and direction",
            self.gateway_bytes.clone(),
        );
        r.register(
            "certificate_renewals",
            "Certificate renewals",
            self.cert_renewals.clone(),
        );
        r.register(
            "certificate_renewal_failures",
            "Failed certificate renewals",
            self.cert_renewal_failures.clone(),
        );
        r
    }

    pub fn dns_query(&self, outcome: &'static str) {
        self.dns_queries
            .get_or_create(&DnsOutcome { outcome })
            .inc();
    }

    pub fn refuse(&self, direction: &'static str, reason: &str) {
        self.refused
            .get_or_create(&Reason {
                direction,
                reason: reason.to_owned(),
            })
            .inc();
    }
}
