//! The `DerpRegion` custom resource (`derpfleet.io/v1alpha1`): one DERP region of Tailscale's map,
//! run as a DaemonSet of derpers on the nodes it selects. The CRD YAML in `crds/` is generated from
//! these types (`operator crd`); schema defaults and CEL rules here are what `kubectl apply`
//! enforces, so every rule carries a message written for a person.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of our resources and prefix of our labels and annotations.
pub const GROUP: &str = "derpfleet.io";
/// Node annotation whose value replaces the node's IPv4 address in the map (for clusters whose
/// nodes have no ExternalIP, e.g. behind a home router with a port forward).
pub const ANNOTATION_PUBLIC_IPV4: &str = "derpfleet.io/public-ipv4";
/// Node annotation whose value replaces the node's IPv6 address in the map.
pub const ANNOTATION_PUBLIC_IPV6: &str = "derpfleet.io/public-ipv6";

/// Placeholder in `hostnameTemplate` replaced by the Kubernetes node name.
pub const NODE_PLACEHOLDER: &str = "{node}";

/// Condition types in `status.conditions`.
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_CERTIFICATE_READY: &str = "CertificateReady";
pub const CONDITION_CONFLICT: &str = "Conflict";
/// Set while the operator probes: True when every probed node passes its checks.
pub const CONDITION_HEALTHY: &str = "Healthy";

/// A DERP region: which nodes run a derper, how they are named and reached, and how their TLS
/// certificate is obtained. The operator publishes every node whose derper is Ready in the DERP map
/// it serves (`/derpmap.json`, for Headscale's `derp.urls`).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "derpfleet.io",
    version = "v1alpha1",
    kind = "DerpRegion",
    plural = "derpregions",
    shortname = "derp",
    namespaced,
    status = "DerpRegionStatus",
    printcolumn = r#"{"name":"ID","type":"integer","description":"DERP region id","jsonPath":".spec.regionId"}"#,
    printcolumn = r#"{"name":"Code","type":"string","description":"DERP region code","jsonPath":".spec.code"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","description":"ready/desired derper nodes","jsonPath":".status.nodesReady"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"Ready condition","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.publish) || !has(self.publish.mode) || self.publish.mode != 'RegionPerNode' || self.regionId + (has(self.publish.maxRegions) ? self.publish.maxRegions : 8) - 1 <= 4294967295").message("regionId + publish.maxRegions - 1 must not exceed 4294967295 (the RegionPerNode id range)"))]
pub struct DerpRegionSpec {
    /// DERP region id (`RegionID`). Tailscale reserves 900-999 for self-hosted regions; 999 is
    /// Headscale's embedded DERP server's default and wins a collision there.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4294967295").message("regionId must be between 1 and 4294967295; use 900-999 for self-hosted regions"))]
    pub region_id: i64,

    /// Short region code shown by `tailscale netcheck` (`RegionCode`), e.g. `home` or `fra1`.
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9-]{0,31}$')").message("code must be 1 to 32 lowercase letters, digits or '-', starting with a letter or digit (e.g. 'home' or 'fra-1')"))]
    pub code: String,

    /// Long region name (`RegionName`); the code when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub name: Option<String>,

    /// Marks the region `Avoid` in the map (deprecated by Tailscale; do not choose as home).
    #[serde(default, skip_serializing_if = "is_false")]
    pub avoid: bool,

    /// Marks the region `NoMeasureNoHome`: clients never make it their home but still use it to
    /// reach peers homed there.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,

    /// Nodes to run a derper on (all nodes when empty), as in a Pod's `nodeSelector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the derper pods (e.g. for dedicated edge nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity of the derper pods; `requiredDuringSchedulingIgnoredDuringExecution` node
    /// affinity also narrows the nodes the operator names in certificates and mesh peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Ports of the derper on each node (host network).
    #[serde(default)]
    pub ports: PortsSpec,

    /// Host name of each node, with `{node}` replaced by the Kubernetes node name, e.g.
    /// `{node}.derp.example.com`. DNS must resolve it to the node's public address. When unset,
    /// nodes are named by their IP address (`HostName` is the IP), as in the pure-IP recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.contains('{node}')").message("hostnameTemplate must contain the placeholder {node}, e.g. '{node}.derp.example.com', so each node gets its own name"))]
    #[x_kube(validation = Rule::new("self.replace('{node}', 'node').matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("hostnameTemplate must be a lowercase DNS name once {node} is replaced (letters, digits, '-' and '.')"))]
    pub hostname_template: Option<String>,

    /// Which node addresses to publish, in order of preference. The node annotations
    /// `derpfleet.io/public-ipv4` and `derpfleet.io/public-ipv6` override both.
    #[serde(default = "default_address_types")]
    #[schemars(length(min = 1))]
    pub address_types: Vec<NodeAddressType>,

    /// IP families to publish (`IPv4`, `IPv6`).
    #[serde(default = "default_ip_families")]
    #[schemars(length(min = 1))]
    pub ip_families: Vec<IpFamily>,

    /// Where the derpers' TLS certificate comes from; set exactly one mode.
    pub tls: TlsSpec,

    /// URL the derpers ask whether a client may connect (`-verify-client-url`), e.g. Headscale's
    /// `https://headscale.example.com/verify`.
    #[serde(
        default,
        rename = "verifyClientURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("verifyClientURL must be an http:// or https:// URL"))]
    pub verify_client_url: Option<String>,

    /// Admit clients when the verify URL cannot be reached (`-verify-client-url-fail-open`).
    #[serde(
        default,
        rename = "verifyClientURLFailOpen",
        skip_serializing_if = "is_false"
    )]
    pub verify_client_url_fail_open: bool,

    /// Meshing of the region's derpers, so clients on different nodes reach each other. Only in
    /// `publish.mode: SharedRegion`: a region of one node has no other derper to mesh with.
    #[serde(default)]
    pub mesh: MeshSpec,

    /// How the nodes appear in the DERP map: one region per node (ids from `regionId` on) or one
    /// region holding every node.
    #[serde(default)]
    pub publish: PublishSpec,

    /// Bind each derper to the node's IP (`-a $(HOST_IP):port`) instead of all addresses: for
    /// hosts that run other services on the same ports, and for test rigs whose nodes are
    /// 127.0.0.x addresses of one host.
    #[serde(default, rename = "bindToNodeIP", skip_serializing_if = "is_false")]
    pub bind_to_node_ip: bool,

    /// Derper image; `ghcr.io/derp-fleet/derper:<operator version>` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Image pull policy of the derper container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Resources of the derper container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra derper arguments appended after the ones the operator sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl DerpRegionSpec {
    /// Whether the derpers mesh: asked for, and more than one derper can share a region.
    pub fn meshed(&self) -> bool {
        self.mesh.enabled && self.publish.mode == PublishMode::SharedRegion
    }

    /// The region ids this DerpRegion may publish: `regionId` alone, or in `RegionPerNode` mode
    /// `regionId` .. `regionId + maxRegions - 1`.
    pub fn id_range(&self) -> std::ops::RangeInclusive<i64> {
        match self.publish.mode {
            PublishMode::SharedRegion => self.region_id..=self.region_id,
            PublishMode::RegionPerNode => {
                self.region_id
                    ..=self
                        .region_id
                        .saturating_add(self.publish.max_regions.max(1) - 1)
            }
        }
    }

    /// `RegionCode` of the region with id `id` (in `RegionPerNode` mode, `<code>-<offset>` past
    /// the first id, so a one-node region keeps the plain code).
    pub fn code_for(&self, id: i64) -> String {
        if id == self.region_id {
            self.code.clone()
        } else {
            format!("{}-{}", self.code, id - self.region_id)
        }
    }
}

/// How a DerpRegion's nodes are published.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PublishSpec {
    /// `SharedRegion`: one region (`regionId`) whose nodes are every derper; clients fail over
    /// between them within the region, but Headscale reorders a region's nodes at every refresh
    /// and tailscaled redials a region whose definition changed, so every client of a
    /// multi-node region reconnects at nearly every refresh. `RegionPerNode`: each node is its own
    /// one-node region, with an id from `regionId` on and a code `<code>-<n>` kept for the
    /// node's life (in `status.nodeRegions`); nothing for Headscale to reorder, no mesh needed,
    /// but each region costs every client a netcheck probe and a client whose node dies moves
    /// to another home region instead of another node. Default `RegionPerNode`.
    #[serde(default)]
    pub mode: PublishMode,
    /// `RegionPerNode`: at most this many regions (nodes), ids `regionId` ..
    /// `regionId + maxRegions - 1`. Bounds the netcheck probes every client sends.
    #[serde(default = "default_max_regions")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("publish.maxRegions must be between 1 and 100 (every region costs each client a netcheck probe)"))]
    pub max_regions: i64,
}

pub const DEFAULT_MAX_REGIONS: i64 = 8;

fn default_max_regions() -> i64 {
    DEFAULT_MAX_REGIONS
}

impl Default for PublishSpec {
    fn default() -> Self {
        Self {
            mode: PublishMode::default(),
            max_regions: DEFAULT_MAX_REGIONS,
        }
    }
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum PublishMode {
    SharedRegion,
    /// The default: tests/headscale-day measured 0 reconnects per client in steady state under
    /// Headscale's per-refresh shuffle, against about 0.7 per refresh for a shared region.
    #[default]
    RegionPerNode,
}

/// Node ports of the derper. `-1` disables STUN or the plain-HTTP port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.derpPort != self.metricsPort && (self.httpPort == -1 || (self.httpPort != self.derpPort && self.httpPort != self.metricsPort))").message("derpPort, httpPort and metricsPort are TCP ports on the node and must all differ"))]
pub struct PortsSpec {
    /// DERP over TLS (tcp), `DERPPort` in the map.
    #[serde(default = "default_derp_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("derpPort must be a port number between 1 and 65535"))]
    pub derp_port: i32,

    /// STUN (udp), `STUNPort` in the map; -1 disables STUN.
    #[serde(default = "default_stun_port")]
    #[x_kube(validation = Rule::new("self == -1 || (self >= 1 && self <= 65535)").message("stunPort must be a port number between 1 and 65535, or -1 to disable STUN"))]
    pub stun_port: i32,

    /// Plain HTTP (tcp; captive-portal checks, `CanPort80` when 80); -1 disables it.
    #[serde(default = "default_http_port")]
    #[x_kube(validation = Rule::new("self == -1 || (self >= 1 && self <= 65535)").message("httpPort must be a port number between 1 and 65535, or -1 to disable plain HTTP"))]
    pub http_port: i32,

    /// Prometheus metrics, `/healthz` and `/readyz` (plain HTTP, tcp). 9731 because node-exporter
    /// holds 9100 on most host networks.
    #[serde(default = "default_metrics_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("metricsPort must be a port number between 1 and 65535"))]
    pub metrics_port: i32,
}

pub const DEFAULT_DERP_PORT: i32 = 443;
pub const DEFAULT_STUN_PORT: i32 = 3478;
pub const DEFAULT_HTTP_PORT: i32 = 80;
pub const DEFAULT_METRICS_PORT: i32 = 9731;
/// Port value that disables STUN or plain HTTP (the derper's `-http-port -1`, the map's
/// `STUNPort: -1`).
pub const PORT_DISABLED: i32 = -1;

fn default_derp_port() -> i32 {
    DEFAULT_DERP_PORT
}
fn default_stun_port() -> i32 {
    DEFAULT_STUN_PORT
}
fn default_http_port() -> i32 {
    DEFAULT_HTTP_PORT
}
fn default_metrics_port() -> i32 {
    DEFAULT_METRICS_PORT
}

impl Default for PortsSpec {
    fn default() -> Self {
        Self {
            derp_port: DEFAULT_DERP_PORT,
            stun_port: DEFAULT_STUN_PORT,
            http_port: DEFAULT_HTTP_PORT,
            metrics_port: DEFAULT_METRICS_PORT,
        }
    }
}

impl PortsSpec {
    /// Every TCP/UDP port the derper binds on the node.
    pub fn bound(&self) -> Vec<i32> {
        [
            self.derp_port,
            self.stun_port,
            self.http_port,
            self.metrics_port,
        ]
        .into_iter()
        .filter(|p| *p > 0)
        .collect()
    }
}

/// Kubernetes node address types we publish (`Node.status.addresses[].type`).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum NodeAddressType {
    ExternalIP,
    InternalIP,
}

fn default_address_types() -> Vec<NodeAddressType> {
    vec![NodeAddressType::ExternalIP, NodeAddressType::InternalIP]
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

fn default_ip_families() -> Vec<IpFamily> {
    vec![IpFamily::IPv4, IpFamily::IPv6]
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// TLS certificate source. Exactly one of the three.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.issuerRef) ? 1 : 0) + (has(self.secretName) ? 1 : 0) + (has(self.selfSigned) ? 1 : 0) == 1").message("tls must set exactly one of issuerRef (a cert-manager issuer), secretName (an existing kubernetes.io/tls Secret) or selfSigned"))]
pub struct TlsSpec {
    /// A cert-manager issuer; the operator creates a `Certificate` naming every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// An existing `kubernetes.io/tls` Secret in the region's namespace whose certificate covers
    /// every node's host name (e.g. a wildcard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// A certificate the operator makes (ECDSA P-256, every node address as a SAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<SelfSignedSpec>,
}

/// Reference to a cert-manager `Issuer` or `ClusterIssuer`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (same namespace) or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    pub kind: IssuerKind,
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuerKind {
    Issuer,
    ClusterIssuer,
}

fn default_issuer_kind() -> IssuerKind {
    IssuerKind::Issuer
}
fn default_issuer_group() -> String {
    "cert-manager.io".into()
}

/// How clients trust the self-signed certificate.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SelfSignedSpec {
    #[serde(default)]
    pub mode: SelfSignedMode,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum SelfSignedMode {
    /// The map pins the certificate: `CertName: sha256-raw:<hash of the leaf>`.
    #[default]
    Pin,
    /// The map marks nodes `InsecureForTests` (no verification at all; tests only).
    InsecureForTests,
}

/// Meshing of the region's derpers. On by default; with one node the peer list holds only that
/// node (which the derper skips), so adding a second node needs no DaemonSet roll.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

/// Observed state of a region, written by the leader.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DerpRegionStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CertificateReady`, `Conflict`, and `Healthy` while the operator probes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `ready/desired` nodes, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_ready: Option<String>,
    /// The region's nodes as the map publishes them (or would, once ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PublishedNode>,
    /// `RegionPerNode`: the region id and code each node holds, sorted by node. A node keeps its
    /// entry while its Node exists, so no node's region ever changes because another came or
    /// went.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_regions: Vec<NodeRegion>,
    /// What a person should know (why the region is not in the map, warnings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the operator's prober sees of each node in the map (absent when probing is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<RegionProbeStatus>,
}

/// The prober's view of a region: one entry per node it probes, sorted by name.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionProbeStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeProbeStatus>,
}

/// One node's probe results. Latencies and `lastSuccess` are refreshed when a check changes
/// state and otherwise every `--probe-status-refresh` (the metrics have every round).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeProbeStatus {
    /// DERP node name in the map.
    pub name: String,
    /// False once the node failed `--probe-fail-rounds` rounds in a row; true again after
    /// `--probe-recover-rounds` good rounds.
    pub healthy: bool,
    /// When every check last passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<Time>,
    /// The first failing check of the latest round: `tls`, `derp`, `stun` or `mesh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_check: Option<String>,
    /// Start of the current run of failed rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<Time>,
    /// What the failing check reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// TLS handshake, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ms: Option<u32>,
    /// Whole connect (TCP, TLS, DERP handshake up to ServerInfo), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derp_ms: Option<u32>,
    /// STUN binding round trip, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stun_ms: Option<u32>,
    /// Slowest delivery through the mesh from this node to a sibling's client, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ms: Option<u32>,
    /// `notAfter` of the certificate the node serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<Time>,
}

/// One node of the region as seen in the map.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PublishedNode {
    /// DERP node name in the map (`Name`).
    pub name: String,
    /// Kubernetes node name.
    pub node_name: String,
    pub host_name: String,
    #[serde(default, rename = "ipv4", skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, rename = "ipv6", skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// In the map: the derper pod is Ready (or NotReady for less than the grace), and the
    /// prober does not hold it out (`--probe-gates-map`).
    pub ready: bool,
}

/// The region a node holds in `RegionPerNode` mode.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegion {
    /// Kubernetes node name.
    pub node_name: String,
    pub region_id: i64,
    pub code: String,
}

/// The CRD as YAML, exactly as `crds/derpregions.derpfleet.io.yaml` holds it.
pub fn crd_yaml() -> Result<String, yaml_serde::Error> {
    yaml_serde::to_string(&DerpRegion::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRD_PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/derpregions.derpfleet.io.yaml"
    );

    #[test]
    fn crd_file_is_current() {
        let want = crd_yaml().unwrap();
        let have = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
        assert!(
            have == want,
            "crds/derpregions.derpfleet.io.yaml is stale; regenerate it with \
             `cargo run -p operator -- crd > crds/derpregions.derpfleet.io.yaml`"
        );
    }

    #[test]
    fn minimal_spec_takes_defaults() {
        let r: DerpRegion = yaml_serde::from_str(
            "apiVersion: derpfleet.io/v1alpha1\nkind: DerpRegion\nmetadata: {name: home, namespace: derp}\n\
             spec: {regionId: 900, code: home, tls: {selfSigned: {}}}\n",
        )
        .unwrap();
        assert_eq!(r.spec.ports, PortsSpec::default());
        assert!(r.spec.mesh.enabled);
        assert_eq!(r.spec.address_types, default_address_types());
        assert_eq!(
            r.spec.tls.self_signed.as_ref().unwrap().mode,
            SelfSignedMode::Pin
        );
    }

    /// Runs the CRD's schema CEL rules (with schema defaults applied, as the apiserver does) on
    /// `spec` and returns the failure messages.
    fn cel_errors(spec: serde_json::Value) -> Vec<String> {
        let crd = DerpRegion::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let obj = serde_json::json!({
            "apiVersion": "derpfleet.io/v1alpha1", "kind": "DerpRegion",
            "metadata": {"name": "r", "namespace": "derp"}, "spec": spec,
        });
        match kube::core::cel::Validator::new().validate(&schema, &obj, None) {
            Ok(()) => vec![],
            Err(e) => e.into_vec().into_iter().map(|e| e.message).collect(),
        }
    }

    #[test]
    fn cel_accepts_good_specs() {
        for spec in [
            serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}}}),
            serde_json::json!({"regionId": 901, "code": "fra-1", "name": "Frankfurt",
                "hostnameTemplate": "{node}.derp.example.com",
                "ports": {"derpPort": 8443, "stunPort": -1, "httpPort": -1, "metricsPort": 9731},
                "tls": {"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
                "verifyClientURL": "https://hs.example.com/verify"}),
            serde_json::json!({"regionId": 902, "code": "x", "tls": {"secretName": "wild"}}),
            serde_json::json!({"regionId": 910, "code": "pn", "tls": {"secretName": "wild"},
                "publish": {"mode": "RegionPerNode", "maxRegions": 20}}),
        ] {
            assert_eq!(cel_errors(spec.clone()), Vec::<String>::new(), "{spec}");
        }
    }

    #[test]
    fn cel_refuses_bad_specs_with_human_messages() {
        let cases = [
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {}}),
                "tls must set exactly one of",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home",
                    "tls": {"selfSigned": {}, "secretName": "x"}}),
                "tls must set exactly one of",
            ),
            (
                serde_json::json!({"regionId": 0, "code": "home", "tls": {"selfSigned": {}}}),
                "regionId must be between 1 and",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "Home_1", "tls": {"selfSigned": {}}}),
                "code must be 1 to 32 lowercase",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "hostnameTemplate": "derp.example.com"}),
                "must contain the placeholder {node}",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "hostnameTemplate": "{node}.Derp_Example.com"}),
                "must be a lowercase DNS name",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "ports": {"derpPort": 70000}}),
                "derpPort must be a port number",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "ports": {"stunPort": 0}}),
                "or -1 to disable STUN",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "ports": {"derpPort": 9731}}),
                "must all differ",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "verifyClientURL": "hs.example.com/verify"}),
                "verifyClientURL must be an http",
            ),
            (
                serde_json::json!({"regionId": 900, "code": "home", "tls": {"selfSigned": {}},
                    "publish": {"mode": "RegionPerNode", "maxRegions": 0}}),
                "publish.maxRegions must be between 1 and 100",
            ),
            (
                serde_json::json!({"regionId": 4294967290_i64, "code": "home",
                    "tls": {"selfSigned": {}}, "publish": {"mode": "RegionPerNode"}}),
                "must not exceed 4294967295",
            ),
        ];
        for (spec, want) in cases {
            let errs = cel_errors(spec.clone());
            assert!(
                errs.iter().any(|e| e.contains(want)),
                "{spec}: want {want:?}, got {errs:?}"
            );
        }
    }
}
