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
    /// Registers every metric under `derper_`. The drop and refusal families start with a zero
    /// series for each label value: a labelled family with no series is not exposed at all, so a
    /// dashboard would show "no data" and `rate()`/alerts would see nothing until the first drop.
    pub fn register(&self, r: &mut Registry) {
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
        let r = r.sub_registry_with_prefix("derper");
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
