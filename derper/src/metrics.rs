//! Prometheus metrics with stable names. Served on `--metrics-addr`, never on the public port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Why a packet was dropped; the label values mirror Go's `dropReason` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    UnknownDest,
    UnknownDestOnFwd,
    GoneDisconnected,
    QueueHead,
    WriteError,
    DupClient,
    MeshQueueFull,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::UnknownDest,
        DropReason::UnknownDestOnFwd,
        DropReason::GoneDisconnected,
        DropReason::QueueHead,
        DropReason::WriteError,
        DropReason::DupClient,
        DropReason::MeshQueueFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownDest => "unknown_dest",
            DropReason::UnknownDestOnFwd => "unknown_dest_on_fwd",
            DropReason::GoneDisconnected => "gone_disconnected",
            DropReason::QueueHead => "queue_head",
            DropReason::WriteError => "write_error",
            DropReason::DupClient => "dup_client",
            DropReason::MeshQueueFull => "mesh_queue_full",
        }
    }
}

pub fn kind_label(disco: bool) -> &'static str {
    if disco { "disco" } else { "other" }
}

#[derive(Default)]
pub struct Metrics {
    pub accepts: Counter,
    pub connections: Gauge,
    pub clients: Gauge,
    pub mesh_peers: Gauge,
    pub home_connections: Gauge,
    pub duplicate_client_keys: Gauge,
    pub watchers: Gauge,
    pub packets_received: Family<KindLabel, Counter>,
    pub bytes_received: Counter,
    pub packets_sent: Counter,
    pub bytes_sent: Counter,
    pub packets_forwarded_out: Counter,
    pub packets_forwarded_in: Counter,
    pub packets_dropped: Family<DropLabels, Counter>,
    pub handshake_failures: Family<ReasonLabel, Counter>,
    pub stun_requests: Family<ReasonLabel, Counter>,
    pub http_requests: Family<EndpointLabel, Counter>,
    pub peer_gone_sent: Family<ReasonLabel, Counter>,
    pub cert_reloads: Family<ReasonLabel, Counter>,
    pub acme_orders: Family<ReasonLabel, Counter>,
    /// Unix time at which the served certificate expires (0 until there is one).
    pub cert_not_after: Gauge,
    pub clients_refused: Family<ReasonLabel, Counter>,
    pub connections_refused: Family<ReasonLabel, Counter>,
    pub restarting_sent: Counter,
    pub mesh_links: Gauge,
    pub connection_buffer_bytes: Gauge,
}

/// `clients_refused` reasons (`verify::Decision::Deny` labels) and `connections_refused` reasons
/// (the accept loop's limits), created at zero when the registry is served.
const CLIENT_REFUSAL_REASONS: [&str; 6] = [
    "cached",
    "tailscaled",
    "tailscaled_error",
    "url",
    "url_unreachable",
    "url_error",
];
const CONNECTION_REFUSAL_REASONS: [&str; 2] = ["accept_rate", "max_connections"];

impl Metrics {
    /// Registers every metric under `derper_`, in the order they are exposed.
    pub fn register(&self, r: &mut Registry) {
        self.create_zero_series();
        let r = r.sub_registry_with_prefix("derper");
        self.register_connection_gauges(r);
        self.register_packet_counters(r);
        self.register_request_counters(r);
        self.register_certificate_metrics(r);
        self.register_admission_counters(r);
        self.register_lifecycle_metrics(r);
    }

    /// The drop and refusal families start with a zero series for each label value: a labelled
    /// family with no series is not exposed at all, so a dashboard would show "no data" and
    /// `rate()`/alerts would see nothing until the first drop.
    fn create_zero_series(&self) {
        for reason in DropReason::ALL {
            for disco in [false, true] {
                let _ = self.packets_dropped.get_or_create(&DropLabels {
                    reason: reason.label(),
                    kind: kind_label(disco),
                });
            }
        }
        for reason in CLIENT_REFUSAL_REASONS {
            let _ = self.clients_refused.get_or_create(&ReasonLabel { reason });
        }
        for reason in CONNECTION_REFUSAL_REASONS {
            let _ = self
                .connections_refused
                .get_or_create(&ReasonLabel { reason });
        }
    }

    /// What is connected now: connections, clients, mesh peers and their buffers.
    fn register_connection_gauges(&self, r: &mut Registry) {
        r.register(
            "accepts",
            "TCP connections accepted on the DERP listener",
            self.accepts.clone(),
        );
        r.register(
            "connections",
            "DERP connections currently open (after the handshake)",
            self.connections.clone(),
        );
        r.register(
            "clients",
            "Distinct client keys currently connected",
            self.clients.clone(),
        );
        r.register(
            "mesh_peers",
            "Connections that authenticated with the mesh key",
            self.mesh_peers.clone(),
        );
        r.register(
            "home_connections",
            "Connections whose client says this is its home DERP",
            self.home_connections.clone(),
        );
        r.register(
            "duplicate_client_keys",
            "Client keys with more than one connection",
            self.duplicate_client_keys.clone(),
        );
        r.register(
            "watchers",
            "Mesh connections watching for peer changes",
            self.watchers.clone(),
        );
        r.register(
            "connection_buffer_bytes",
            "Bytes of read and write buffers held by DERP connections (TLS library buffers not \
             included); busy connections keep theirs, idle ones release them after a keepalive \
             period",
            self.connection_buffer_bytes.clone(),
        );
    }

    /// The packets relayed, forwarded over the mesh and dropped.
    fn register_packet_counters(&self, r: &mut Registry) {
        r.register(
            "packets_received",
            "Packets received from clients, by kind (disco or other)",
            self.packets_received.clone(),
        );
        r.register(
            "bytes_received",
            "Packet payload bytes received from clients",
            self.bytes_received.clone(),
        );
        r.register(
            "packets_sent",
            "Packets written to clients",
            self.packets_sent.clone(),
        );
        r.register(
            "bytes_sent",
            "Packet payload bytes written to clients",
            self.bytes_sent.clone(),
        );
        r.register(
            "packets_forwarded_out",
            "Packets forwarded to a mesh peer",
            self.packets_forwarded_out.clone(),
        );
        r.register(
            "packets_forwarded_in",
            "Packets received from a mesh peer for a local client",
            self.packets_forwarded_in.clone(),
        );
        r.register(
            "packets_dropped",
            "Packets dropped, by reason and kind",
            self.packets_dropped.clone(),
        );
    }

    /// What arrives besides packets: handshakes, STUN, HTTP, and the PeerGone frames sent.
    fn register_request_counters(&self, r: &mut Registry) {
        r.register(
            "handshake_failures",
            "Connections that failed before becoming a client, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "stun_requests",
            "STUN datagrams, by result",
            self.stun_requests.clone(),
        );
        r.register(
            "http_requests",
            "Requests on the public listener other than DERP upgrades, by endpoint (a fixed set; unknown paths count as other)",
            self.http_requests.clone(),
        );
        r.register(
            "peer_gone_sent",
            "PeerGone frames queued, by reason",
            self.peer_gone_sent.clone(),
        );
    }

    /// The served certificate: reloads, ACME orders and its expiry.
    fn register_certificate_metrics(&self, r: &mut Registry) {
        r.register(
            "cert_reloads",
            "Certificate reload attempts, by result",
            self.cert_reloads.clone(),
        );
        r.register(
            "acme_orders",
            "ACME certificate orders (-certmode letsencrypt/gcp), by result: ok or the problem kind",
            self.acme_orders.clone(),
        );
        r.register(
            "cert_not_after_seconds",
            "Unix time at which the served TLS certificate expires",
            self.cert_not_after.clone(),
        );
    }

    /// Connections and clients refused by a limit or by admission control.
    fn register_admission_counters(&self, r: &mut Registry) {
        r.register(
            "clients_refused",
            "Clients refused by admission control (-verify-clients, -verify-client-url), by reason",
            self.clients_refused.clone(),
        );
        r.register(
            "connections_refused",
            "TCP connections closed at once by a limit, by reason",
            self.connections_refused.clone(),
        );
    }

    /// Shutdown and the mesh links.
    fn register_lifecycle_metrics(&self, r: &mut Registry) {
        r.register(
            "restarting_sent",
            "Restarting frames sent to clients on shutdown",
            self.restarting_sent.clone(),
        );
        r.register(
            "mesh_links",
            "Mesh links to the region's other servers currently up",
            self.mesh_links.clone(),
        );
    }

    pub fn dropped(&self, reason: DropReason, disco: bool) {
        self.packets_dropped
            .get_or_create(&DropLabels {
                reason: reason.label(),
                kind: kind_label(disco),
            })
            .inc();
    }

    pub fn handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registry's text, with a series in every family (one without any is not exposed).
    fn exposition() -> String {
        let mut reg = Registry::default();
        let m = Metrics::default();
        m.register(&mut reg);
        let _ = m
            .packets_received
            .get_or_create(&KindLabel { kind: "disco" });
        for family in [
            &m.handshake_failures,
            &m.stun_requests,
            &m.peer_gone_sent,
            &m.cert_reloads,
            &m.acme_orders,
        ] {
            let _ = family.get_or_create(&ReasonLabel { reason: "test" });
        }
        let _ = m
            .http_requests
            .get_or_create(&EndpointLabel { endpoint: "test" });
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    /// The names and types dashboards and alerts rely on (`charts/derp-fleet/files`): renaming
    /// or retyping one breaks them, so it must be a deliberate change here too.
    #[test]
    fn every_metric_keeps_its_name_and_type() {
        let text = exposition();
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        let want = [
            ("derper_accepts", "counter"),
            ("derper_connections", "gauge"),
            ("derper_clients", "gauge"),
            ("derper_mesh_peers", "gauge"),
            ("derper_home_connections", "gauge"),
            ("derper_duplicate_client_keys", "gauge"),
            ("derper_watchers", "gauge"),
            ("derper_connection_buffer_bytes", "gauge"),
            ("derper_packets_received", "counter"),
            ("derper_bytes_received", "counter"),
            ("derper_packets_sent", "counter"),
            ("derper_bytes_sent", "counter"),
            ("derper_packets_forwarded_out", "counter"),
            ("derper_packets_forwarded_in", "counter"),
            ("derper_packets_dropped", "counter"),
            ("derper_handshake_failures", "counter"),
            ("derper_stun_requests", "counter"),
            ("derper_http_requests", "counter"),
            ("derper_peer_gone_sent", "counter"),
            ("derper_cert_reloads", "counter"),
            ("derper_acme_orders", "counter"),
            ("derper_cert_not_after_seconds", "gauge"),
            ("derper_clients_refused", "counter"),
            ("derper_connections_refused", "counter"),
            ("derper_restarting_sent", "counter"),
            ("derper_mesh_links", "gauge"),
        ];
        assert_eq!(types, want, "{text}");
        // Every metric has its help text.
        assert_eq!(text.matches("# HELP derper_").count(), want.len(), "{text}");
    }

    /// The drop and refusal families are exposed at zero for every label value before the first
    /// event, so `rate()` and alerts see them from the start.
    #[test]
    fn labelled_families_start_with_a_zero_series_per_reason() {
        let text = exposition();
        for reason in DropReason::ALL {
            for kind in ["disco", "other"] {
                let series = format!(
                    "derper_packets_dropped_total{{reason=\"{}\",kind=\"{kind}\"}} 0\n",
                    reason.label()
                );
                assert!(text.contains(&series), "{series} missing:\n{text}");
            }
        }
        for reason in CLIENT_REFUSAL_REASONS {
            let series = format!("derper_clients_refused_total{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
        for reason in CONNECTION_REFUSAL_REASONS {
            let series = format!("derper_connections_refused_total{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }

    #[test]
    #[ignore = "writes the exposition to $DUMP for a before/after diff"]
    fn dump_exposition() {
        std::fs::write(std::env::var("DUMP").unwrap(), exposition()).unwrap();
    }
}
