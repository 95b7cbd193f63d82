//! The DERP map builder: a pure function from every DerpRegion, Node, derper Pod and self-signed
//! TLS Secret (the operator's watch caches) plus a clock to the `DerpMap` the map server serves,
//! and the per-region facts the controller writes into status.
//!
//! Stability is the point: a tailscaled drops and redials every client of a region whenever that
//! region's definition changes in any way, so equal input gives byte-identical JSON (regions keyed
//! by id in a `BTreeMap`, nodes sorted by Kubernetes node name, names derived from node names, no
//! timestamps or hash-map order anywhere).
//!
//! Removal suits a slow poller: Headscale reads the map every `update_frequency` (3 h by default)
//! and a node or region it drops stays dropped until its next read, hours after the derper is back.
//! So a published node leaves only when it is really gone: its Node is deleted, the region no
//! longer selects the node (the DaemonSet will not run there), its pod is gone and not replaced
//! within [`POD_REPLACE_GRACE`], or its derper stays not Ready (NotReady or terminating) past the
//! long `not_ready_grace`. A rolling restart or a region that blinks out keeps its map entry, and
//! clients redial it as soon as the derpers are back, without waiting for Headscale.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use derp_proto::derpmap::{DerpMap, DerpNode, DerpRegion as MapRegion};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::crd::{
    DerpRegion, NodeRegion, PORT_DISABLED, PublishMode, PublishedNode, SelfSignedMode,
};
use crate::render::{APP_NAME, LABEL_NAME, LABEL_REGION, certificate_name};
use crate::select::{NodePlan, plan_node, plan_nodes};
use crate::tls;

/// Region id of Headscale's embedded DERP server by default; it wins any collision there.
pub const HEADSCALE_EMBEDDED_REGION_ID: i64 = 999;

/// Where a DerpRegion lives: its namespace and name (ordered by namespace, then name).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionKey {
    pub namespace: String,
    pub name: String,
}

impl RegionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `region` (a region without a namespace, as `operator render` may read one,
    /// gets the empty one).
    pub fn of(region: &DerpRegion) -> Self {
        Self::new(region.namespace().unwrap_or_default(), region.name_any())
    }

    /// The reference the controller's `reconcile_on` and the reflector stores take.
    pub fn object_ref(&self) -> ObjectRef<DerpRegion> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

impl fmt::Display for RegionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why an older DerpRegion keeps this one out of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    RegionIdTaken { id: i64, holder: RegionKey },
    CodeTaken { code: String, holder: RegionKey },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let holder = match self {
            Self::RegionIdTaken { id, holder } => {
                write!(f, "regionId {id}")?;
                holder
            }
            Self::CodeTaken { code, holder } => {
                write!(f, "code {code:?}")?;
                holder
            }
        };
        write!(f, " is already held by the older DerpRegion {holder}")
    }
}

/// Why a region's self-signed certificate cannot be pinned in the map yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertWait {
    /// The operator has not written the Secret yet (it does for the first selected node).
    NoSecret {
        secret: String,
    },
    NoTlsCrt {
        secret: String,
    },
    Unreadable {
        secret: String,
        error: String,
    },
}

impl fmt::Display for CertWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSecret { secret } => {
                write!(f, "waiting for the self-signed certificate Secret {secret}")
            }
            Self::NoTlsCrt { secret } => write!(f, "Secret {secret} has no tls.crt"),
            Self::Unreadable { secret, error } => write!(f, "Secret {secret}: {error}"),
        }
    }
}

/// Why a region is not in the map, first cause first (see [`build_map`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotPublished {
    Conflict(Conflict),
    /// `regionId` is no DERP region id (the CRD's validation keeps such a region out of the API
    /// server; `operator render` reads files).
    InvalidRegionId(i64),
    Certificate(CertWait),
    NoNodeSelected,
    /// None of the `desired` selected nodes has a derper that is Ready (or in its grace).
    NoReadyNode {
        desired: u32,
    },
}

impl fmt::Display for NotPublished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conflict(c) => c.fmt(f),
            Self::InvalidRegionId(id) => write!(f, "regionId {id} is out of range"),
            Self::Certificate(c) => c.fmt(f),
            Self::NoNodeSelected => f.write_str("no node matches the region's node selection"),
            Self::NoReadyNode { desired } => {
                write!(f, "none of the {desired} selected nodes has a Ready derper")
            }
        }
    }
}

/// A published node whose derper pod is gone (deleted, evicted) while the region still selects the
/// node stays this long for the DaemonSet to replace the pod (it does within seconds); past it,
/// or past `not_ready_grace` if shorter, the pod counts as not replaced and the node leaves.
pub const POD_REPLACE_GRACE: Duration = Duration::from_secs(60);

/// How the map is built.
#[derive(Debug, Clone)]
pub struct MapConfig {
    /// A published node whose derper is not Ready (NotReady, terminating, or its pod deleted and
    /// being replaced) stays in the map this long. Long by default: Headscale only sees the map
    /// every `update_frequency`, so a node dropped for a blink is missing from every client until
    /// Headscale's next read, while a node kept through a restart is redialled by clients the
    /// moment its derper is back.
    pub not_ready_grace: Duration,
    /// Sets `omitDefaultRegions` (a hint to the control server not to add Tailscale's regions).
    pub omit_default_regions: bool,
}

impl Default for MapConfig {
    fn default() -> Self {
        Self {
            // Longer than a DaemonSet rollout, a node reboot or a short outage; a derper gone for
            // ten minutes is gone (clients of a multi-node region meanwhile dial its other
            // nodes, clients of a one-node region pick another home).
            not_ready_grace: DEFAULT_NOT_READY_GRACE,
            omit_default_regions: false,
        }
    }
}

/// Default of [`MapConfig::not_ready_grace`] (`--not-ready-grace`).
pub const DEFAULT_NOT_READY_GRACE: Duration = Duration::from_secs(600);

/// Everything the builder reads: the objects as the watch caches hold them (shared, so a rebuild
/// copies no object).
pub struct MapInput<'a> {
    pub regions: &'a [Arc<DerpRegion>],
    pub nodes: &'a [Arc<Node>],
    /// Pods of our DaemonSets (others are ignored by label).
    pub pods: &'a [Arc<Pod>],
    /// Secrets holding self-signed certificates (others are ignored by name).
    pub secrets: &'a [Arc<Secret>],
    /// DERP node names the previous build published: only those may use the NotReady grace (a
    /// pod that never was Ready must not enter the map).
    pub previously_published: &'a BTreeSet<String>,
    /// Since when each published node has not been Ready, as the previous build found it (feed
    /// back [`MapOutput::unready_since`]): the clock of a node whose pod was deleted and
    /// replaced keeps running across the replacement.
    pub unready_since: &'a BTreeMap<String, Timestamp>,
    pub now: Timestamp,
    /// DERP node names the prober holds to be failing (`--probe-gates-map`; empty when off):
    /// they leave the map, unless that would leave their region with no node at all.
    pub probe_failing: &'a BTreeSet<String>,
}

/// What the controller writes into one region's status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionFacts {
    /// Nodes the region selects.
    pub desired: u32,
    /// Nodes published (Ready, or in the grace).
    pub ready: u32,
    /// Selected nodes and nodes running a derper of the region, sorted by node name.
    pub nodes: Vec<PublishedNode>,
    /// `RegionPerNode`: the region each node holds (for `status.nodeRegions`).
    pub node_regions: Vec<NodeRegion>,
    /// Whether the region is in the map.
    pub published: bool,
    /// Why it is not in the map, when it is not.
    pub not_published: Option<NotPublished>,
    pub warnings: Vec<String>,
}

impl RegionFacts {
    /// The older DerpRegion's claim that keeps this one out, if any (it is the first cause).
    pub fn conflict(&self) -> Option<&Conflict> {
        match &self.not_published {
            Some(NotPublished::Conflict(c)) => Some(c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapOutput {
    pub map: DerpMap,
    pub facts: BTreeMap<RegionKey, RegionFacts>,
    /// DERP node names in the map (feed back as `previously_published`).
    pub published: BTreeSet<String>,
    /// Nodes in the map whose derper is not Ready, and since when (feed back as
    /// `unready_since`).
    pub unready_since: BTreeMap<String, Timestamp>,
    /// When a grace expires and the map must be rebuilt even if nothing else changes.
    pub next_rebuild: Option<Timestamp>,
    /// Per published region, its nodes as the map would list them without the probe gate: what
    /// the prober probes (a gated node must still be probed to come back).
    pub probe_targets: BTreeMap<RegionKey, Vec<DerpNode>>,
}

/// The nodes by the label pairs some region's `nodeSelector` names: a region then looks only at
/// the nodes carrying its rarest pair instead of at every node. At 1000 regions over 5000 nodes
/// the full scan was 5 million selector checks per rebuild (bench/operator-scale).
struct NodeIndex<'a> {
    all: Vec<&'a Node>,
    /// label key -> label value -> nodes.
    by_label: HashMap<&'a str, HashMap<&'a str, Vec<&'a Node>>>,
}

impl<'a> NodeIndex<'a> {
    fn new(nodes: &'a [Arc<Node>], regions: &[Arc<DerpRegion>]) -> Self {
        let keys: BTreeSet<&str> = regions
            .iter()
            .flat_map(|r| r.spec.node_selector.keys().map(String::as_str))
            .collect();
        let mut by_label: HashMap<&str, HashMap<&str, Vec<&Node>>> = HashMap::new();
        for n in nodes {
            let Some(labels) = n.metadata.labels.as_ref() else {
                continue;
            };
            for (k, v) in labels {
                if keys.contains(k.as_str()) {
                    by_label.entry(k).or_default().entry(v).or_default().push(n);
                }
            }
        }
        Self {
            all: nodes.iter().map(|n| &**n).collect(),
            by_label,
        }
    }

    /// A superset of the nodes `region` selects (every selected node carries all the
    /// `nodeSelector` pairs); `select::plan_nodes` does the exact selection.
    fn candidates(&self, region: &DerpRegion) -> &[&'a Node] {
        region
            .spec
            .node_selector
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(k.as_str())
                    .and_then(|vs| vs.get(v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or(&self.all)
    }
}

/// Builds the map. Pure: equal input gives equal output.
pub fn build_map(input: &MapInput<'_>, cfg: &MapConfig) -> MapOutput {
    let mut out = MapOutput {
        map: DerpMap {
            omit_default_regions: cfg.omit_default_regions,
            ..Default::default()
        },
        ..Default::default()
    };
    let nodes_by_name: BTreeMap<&str, &Node> = input
        .nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, &**n)))
        .collect();
    let node_index = NodeIndex::new(input.nodes, input.regions);
    let mut selection: HashMap<RegionKey, Vec<NodePlan>> = input
        .regions
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .map(|r| {
            (
                RegionKey::of(r),
                plan_nodes(&r.spec, node_index.candidates(r)),
            )
        })
        .collect();
    let ids = assign_ids(input.regions, &selection, &|n| {
        nodes_by_name.contains_key(n)
    });
    let build = Build {
        input,
        cfg,
        nodes_by_name,
        pods_of: pods_by_region(input.pods),
        secrets: secrets_by_name(input.secrets),
        ids,
    };
    for region in input.regions {
        if region.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let key = RegionKey::of(region);
        let selected = selection.remove(&key).unwrap_or_default();
        let facts = build.region(region, &key, selected, &mut out);
        out.facts.insert(key, facts);
    }
    out
}

/// Our derper pods by (namespace, region), in input order.
fn pods_by_region(pods: &[Arc<Pod>]) -> HashMap<(&str, &str), Vec<&Pod>> {
    let mut out: HashMap<(&str, &str), Vec<&Pod>> = HashMap::new();
    for pod in pods {
        let labels = pod.labels();
        if labels.get(LABEL_NAME).map(String::as_str) != Some(APP_NAME) {
            continue;
        }
        if let (Some(ns), Some(region)) =
            (pod.metadata.namespace.as_deref(), labels.get(LABEL_REGION))
        {
            out.entry((ns, region)).or_default().push(pod);
        }
    }
    out
}

/// The Secrets by (namespace, name).
fn secrets_by_name(secrets: &[Arc<Secret>]) -> HashMap<(&str, &str), &Secret> {
    secrets
        .iter()
        .filter_map(|s| {
            let ns = s.metadata.namespace.as_deref()?;
            Some(((ns, s.metadata.name.as_deref()?), &**s))
        })
        .collect()
}

/// What one build looks regions up in.
struct Build<'a> {
    input: &'a MapInput<'a>,
    cfg: &'a MapConfig,
    nodes_by_name: BTreeMap<&'a str, &'a Node>,
    pods_of: HashMap<(&'a str, &'a str), Vec<&'a Pod>>,
    secrets: HashMap<(&'a str, &'a str), &'a Secret>,
    ids: IdAssignment,
}

impl Build<'_> {
    /// One region: which of its nodes are in the map, whether it is published (into `out`), and
    /// the facts its status reports.
    fn region(
        &self,
        region: &DerpRegion,
        key: &RegionKey,
        selected: Vec<NodePlan>,
        out: &mut MapOutput,
    ) -> RegionFacts {
        let spec = &region.spec;
        let assigned = self.ids.per_node.get(key);
        let mut facts = RegionFacts {
            warnings: self.ids.warnings.get(key).cloned().unwrap_or_default(),
            node_regions: assigned
                .map(|a| {
                    a.iter()
                        .map(|(node, (id, code))| NodeRegion {
                            node_name: node.clone(),
                            region_id: *id,
                            code: code.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            desired: u32::try_from(selected.len()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        if spec.id_range().contains(&HEADSCALE_EMBEDDED_REGION_ID) {
            facts.warnings.push(
                "region id 999 is the default of Headscale's embedded DERP server, which wins \
                 over this region if it is enabled; prefer another id in 900-998"
                    .into(),
            );
        }
        let selected_names: BTreeSet<String> =
            selected.iter().map(|p| p.node_name.clone()).collect();
        let plans = self.node_plans(region, key, selected, assigned);
        let probed = self.nodes_in_map(region, key, &plans, &selected_names, &mut facts, out);
        // The prober's verdict moves clients to healthy siblings; it never empties a region (a
        // prober cut off from every node says more about the prober than about the nodes).
        let failing = self.input.probe_failing;
        let mut map_nodes = probed.clone();
        if map_nodes.iter().any(|p| !failing.contains(&p.derp_name)) {
            map_nodes.retain(|p| !failing.contains(&p.derp_name));
            for n in &mut facts.nodes {
                n.ready &= !failing.contains(&n.name);
            }
        }
        facts.ready = u32::try_from(map_nodes.len()).unwrap_or(u32::MAX);

        let region_id = u32::try_from(spec.region_id).ok().filter(|id| *id > 0);
        let cert = region_cert(region, &self.secrets);
        // The first thing a person must change comes first. With no node selected a self-signed
        // region has no certificate yet either (it is made for the first node), and the id only
        // matters once there is something to publish: the selection is named, not either.
        facts.not_published = if let Some(c) = self.ids.conflicts.get(key) {
            Some(NotPublished::Conflict(c.clone()))
        } else if facts.desired == 0 {
            Some(NotPublished::NoNodeSelected)
        } else if region_id.is_none() {
            Some(NotPublished::InvalidRegionId(spec.region_id))
        } else if let Err(why) = &cert {
            Some(NotPublished::Certificate(why.clone()))
        } else if map_nodes.is_empty() {
            Some(NotPublished::NoReadyNode {
                desired: facts.desired,
            })
        } else {
            None
        };
        if let (None, Some(id), Ok(cert)) = (&facts.not_published, region_id, &cert) {
            if spec.publish.mode == PublishMode::RegionPerNode {
                publish_per_node(region, assigned, &map_nodes, cert, out);
            } else {
                let node = |p: &&NodePlan| derp_node(region, id, p, cert);
                let nodes: Vec<DerpNode> = map_nodes.iter().map(node).collect();
                out.published.extend(nodes.iter().map(|n| n.name.clone()));
                out.probe_targets
                    .insert(key.clone(), probed.iter().map(node).collect());
                out.map.regions.insert(
                    id,
                    MapRegion {
                        region_id: id,
                        region_code: spec.code.clone(),
                        region_name: spec.name.clone().unwrap_or_else(|| spec.code.clone()),
                        avoid: spec.avoid,
                        no_measure_no_home: spec.no_measure_no_home,
                        nodes,
                        ..Default::default()
                    },
                );
            }
            facts.published = true;
        }
        facts
    }

    /// The nodes to report, by node name: the selected ones plus any that still run one of the
    /// region's pods. In `RegionPerNode` mode each DERP name carries the id of its node's own
    /// region (a node without one, the range being full, is reported but not published).
    fn node_plans(
        &self,
        region: &DerpRegion,
        key: &RegionKey,
        selected: Vec<NodePlan>,
        assigned: Option<&BTreeMap<String, (i64, String)>>,
    ) -> BTreeMap<String, NodePlan> {
        let mut plans: BTreeMap<String, NodePlan> = selected
            .into_iter()
            .map(|p| (p.node_name.clone(), p))
            .collect();
        for pod in self.pods(key) {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                && !plans.contains_key(node)
                && let Some(n) = self.nodes_by_name.get(node)
            {
                plans.insert(node.to_string(), plan_node(&region.spec, n));
            }
        }
        if region.spec.publish.mode == PublishMode::RegionPerNode {
            for (node, plan) in plans.iter_mut() {
                if let Some((id, _)) = assigned.and_then(|a| a.get(node)) {
                    plan.derp_name = crate::select::derp_node_name(*id, node);
                }
            }
        }
        plans
    }

    fn pods<'s>(&'s self, key: &'s RegionKey) -> &'s [&'s Pod] {
        self.pods_of
            .get(&(key.namespace.as_str(), key.name.as_str()))
            .map_or(&[][..], Vec::as_slice)
    }

    /// Decides for each planned node whether it is in the map (before the probe gate), records
    /// it in `facts.nodes`, and keeps the NotReady graces in `out`. Returns the nodes in the map.
    fn nodes_in_map<'p>(
        &self,
        region: &DerpRegion,
        key: &RegionKey,
        plans: &'p BTreeMap<String, NodePlan>,
        selected: &BTreeSet<String>,
        facts: &mut RegionFacts,
        out: &mut MapOutput,
    ) -> Vec<&'p NodePlan> {
        // Node name -> the state of this region's derpers there.
        let mut on_node: BTreeMap<&str, PodsOnNode> = BTreeMap::new();
        for pod in self.pods(key) {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
                on_node.entry(node).or_default().add(pod_state(pod));
            }
        }
        let per_node = region.spec.publish.mode == PublishMode::RegionPerNode;
        let assigned = self.ids.per_node.get(key);
        let input = self.input;
        let mut map_nodes = Vec::new();
        for (node_name, plan) in plans {
            let no_region = per_node && assigned.is_none_or(|a| !a.contains_key(node_name));
            let verdict = if !self.nodes_by_name.contains_key(node_name.as_str())
                || !plan.has_address()
                || no_region
            {
                // A deleted Node takes its derper out of the map at once.
                Verdict::Out
            } else {
                node_verdict(
                    on_node.get(node_name.as_str()),
                    selected.contains(node_name)
                        && input.previously_published.contains(&plan.derp_name),
                    input.unready_since.get(&plan.derp_name).copied(),
                    input.now,
                    self.cfg.not_ready_grace,
                )
            };
            let in_map = match verdict {
                Verdict::Ready => true,
                Verdict::Kept { since, until } => {
                    out.unready_since.insert(plan.derp_name.clone(), since);
                    out.next_rebuild = Some(out.next_rebuild.map_or(until, |t| t.min(until)));
                    facts.warnings.push(format!(
                        "node {node_name} has had no Ready derper since {since}; it stays in the \
                         map until {until} (not-ready grace) so clients redial it once it is back"
                    ));
                    true
                }
                Verdict::Out => false,
            };
            facts.nodes.push(PublishedNode {
                name: plan.derp_name.clone(),
                node_name: node_name.clone(),
                host_name: plan.host_name.clone(),
                ipv4: plan.ipv4.map(|i| i.to_string()),
                ipv6: plan.ipv6.map(|i| i.to_string()),
                ready: in_map,
            });
            if in_map {
                map_nodes.push(plan);
            }
        }
        map_nodes
    }
}

/// `RegionPerNode`: each node in the map is a one-node region of its own, with the id and code
/// its node holds.
fn publish_per_node(
    region: &DerpRegion,
    assigned: Option<&BTreeMap<String, (i64, String)>>,
    map_nodes: &[&NodePlan],
    cert: &CertMark,
    out: &mut MapOutput,
) {
    let spec = &region.spec;
    let name = spec.name.as_deref().unwrap_or(&spec.code);
    for plan in map_nodes {
        let Some((id, code)) = assigned.and_then(|a| a.get(&plan.node_name)) else {
            continue;
        };
        let Ok(id) = u32::try_from(*id) else { continue };
        let node = derp_node(region, id, plan, cert);
        out.published.insert(node.name.clone());
        out.map.regions.insert(
            id,
            MapRegion {
                region_id: id,
                region_code: code.clone(),
                region_name: format!("{name} ({})", plan.node_name),
                avoid: spec.avoid,
                no_measure_no_home: spec.no_measure_no_home,
                nodes: vec![node],
                ..Default::default()
            },
        );
    }
}

/// How the map marks a region's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CertMark {
    /// Publicly or cluster-trusted certificate: clients verify `HostName`.
    Verified,
    Pinned(String),
    Insecure,
}

fn region_cert(
    region: &DerpRegion,
    secrets: &HashMap<(&str, &str), &Secret>,
) -> Result<CertMark, CertWait> {
    let Some(ss) = &region.spec.tls.self_signed else {
        return Ok(CertMark::Verified);
    };
    if ss.mode == SelfSignedMode::InsecureForTests {
        return Ok(CertMark::Insecure);
    }
    let ns = region.namespace().unwrap_or_default();
    let name = certificate_name(&region.name_any());
    let Some(secret) = secrets.get(&(ns.as_str(), name.as_str())) else {
        return Err(CertWait::NoSecret { secret: name });
    };
    let Some(pem) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return Err(CertWait::NoTlsCrt { secret: name });
    };
    tls::pin(&pem.0)
        .map(CertMark::Pinned)
        .map_err(|e| CertWait::Unreadable {
            secret: name,
            error: e.to_string(),
        })
}

fn derp_node(region: &DerpRegion, id: u32, plan: &NodePlan, cert: &CertMark) -> DerpNode {
    let ports = &region.spec.ports;
    DerpNode {
        name: plan.derp_name.clone(),
        region_id: id,
        host_name: plan.host_name.clone(),
        cert_name: match cert {
            CertMark::Pinned(p) => p.clone(),
            _ => String::new(),
        },
        insecure_for_tests: *cert == CertMark::Insecure,
        ipv4: plan.ipv4.map(|i| i.to_string()).unwrap_or_default(),
        ipv6: plan.ipv6.map(|i| i.to_string()).unwrap_or_default(),
        // -1 is the one value every Tailscale tool reads as "no STUN here".
        stun_port: if ports.stun_port == PORT_DISABLED {
            -1
        } else {
            i64::from(ports.stun_port)
        },
        derp_port: i64::from(ports.derp_port),
        // Captive-portal checks dial IPv4 port 80 only.
        can_port80: ports.http_port == 80 && plan.ipv4.is_some(),
        ..Default::default()
    }
}

/// One derper pod's readiness.
enum PodState {
    Ready,
    /// Not Ready since the given time (the Ready condition's transition), when known.
    NotReady(Option<Timestamp>),
}

fn pod_state(pod: &Pod) -> PodState {
    // A terminating derper is draining its clients: not Ready, whatever its condition says.
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::NotReady(None);
    }
    let cond = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match cond {
        Some(c) if c.status == "True" => PodState::Ready,
        Some(c) => PodState::NotReady(c.last_transition_time.as_ref().map(|t| t.0)),
        None => PodState::NotReady(None),
    }
}

/// The region's derper pods on one node (a DaemonSet may briefly have an old and a new one).
#[derive(Default)]
struct PodsOnNode {
    ready: bool,
    /// Earliest known time one of the pods turned not Ready.
    unready_since: Option<Timestamp>,
}

impl PodsOnNode {
    fn add(&mut self, s: PodState) {
        match s {
            PodState::Ready => self.ready = true,
            PodState::NotReady(t) => {
                self.unready_since = match (self.unready_since, t) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }
}

/// Whether a node whose Node exists and has an address is in the map.
enum Verdict {
    Ready,
    /// Not Ready since `since`, kept until `until`.
    Kept {
        since: Timestamp,
        until: Timestamp,
    },
    Out,
}

/// `pods`: the region's pods on the node (`None`: none). `may_keep`: the node was published by the
/// previous build and the region still selects it (a pod that never was Ready must not enter the
/// map, and a node the region no longer selects will get no derper back). `remembered`: since when
/// the previous build saw it not Ready.
fn node_verdict(
    pods: Option<&PodsOnNode>,
    may_keep: bool,
    remembered: Option<Timestamp>,
    now: Timestamp,
    grace: Duration,
) -> Verdict {
    if pods.is_some_and(|p| p.ready) {
        return Verdict::Ready;
    }
    if !may_keep {
        return Verdict::Out;
    }
    let from_pod = pods.and_then(|p| p.unready_since);
    let since = match (remembered, from_pod) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(now),
    };
    let limit = if pods.is_some() {
        grace
    } else {
        grace.min(POD_REPLACE_GRACE)
    };
    let limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
    match Timestamp::from_millisecond(since.as_millisecond().saturating_add(limit_ms)) {
        Ok(until) if now < until => Verdict::Kept { since, until },
        _ => Verdict::Out,
    }
}

/// Region ids and codes as [`assign_ids`] hands them out.
#[derive(Debug, Default)]
pub struct IdAssignment {
    /// `SharedRegion` regions left out because an older region holds their id or code.
    pub conflicts: BTreeMap<RegionKey, Conflict>,
    /// `RegionPerNode` regions: node name -> (region id, code).
    pub per_node: BTreeMap<RegionKey, BTreeMap<String, (i64, String)>>,
    /// What a person should know (a node that lost its id, a full range).
    pub warnings: BTreeMap<RegionKey, Vec<String>>,
}

/// Regions oldest first (`creationTimestamp`, then namespace/name for a tie; no timestamp, as in
/// `operator render`, sorts last), deleted ones left out.
fn oldest_first<R: Borrow<DerpRegion>>(regions: &[R]) -> Vec<&DerpRegion> {
    let mut order: Vec<&DerpRegion> = regions
        .iter()
        .map(Borrow::borrow)
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .collect();
    order.sort_by(|a, b| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (ta.is_none(), ta, RegionKey::of(a)).cmp(&(tb.is_none(), tb, RegionKey::of(b)))
    });
    order
}

/// The region ids and codes claimed so far, and by whom.
#[derive(Default)]
struct Claims {
    ids: BTreeMap<i64, RegionKey>,
    codes: BTreeMap<String, RegionKey>,
}

impl Claims {
    /// The older claim that keeps `id` or `code` from a newer region (the id is looked at first).
    fn taken(&self, id: i64, code: &str) -> Option<Conflict> {
        if let Some(holder) = self.ids.get(&id) {
            let holder = holder.clone();
            return Some(Conflict::RegionIdTaken { id, holder });
        }
        let holder = self.codes.get(code)?.clone();
        let code = code.to_string();
        Some(Conflict::CodeTaken { code, holder })
    }

    fn claim(&mut self, id: i64, code: &str, by: &RegionKey) {
        self.ids.insert(id, by.clone());
        self.codes.insert(code.to_string(), by.clone());
    }
}

/// Hands out region ids and codes. Claims are taken oldest region first, so an older region
/// always wins: a `SharedRegion` region claims its `regionId` and `code` (or is a conflict); a
/// `RegionPerNode` region keeps the ids its status records for nodes that still exist (an id an
/// older region now holds is lost, with a warning). Then each selected node of a `RegionPerNode`
/// region without an id gets the lowest free one of the region's range, nodes in name order.
/// Recorded ids are never moved to make room, so a node keeps its region for life.
pub fn assign_ids<R: Borrow<DerpRegion>>(
    regions: &[R],
    selection: &HashMap<RegionKey, Vec<NodePlan>>,
    node_exists: &dyn Fn(&str) -> bool,
) -> IdAssignment {
    let order = oldest_first(regions);
    let mut out = IdAssignment::default();
    let mut claims = Claims::default();
    for r in &order {
        let key = RegionKey::of(r);
        let spec = &r.spec;
        match spec.publish.mode {
            PublishMode::SharedRegion => match claims.taken(spec.region_id, &spec.code) {
                Some(why) => {
                    out.conflicts.insert(key, why);
                }
                None => claims.claim(spec.region_id, &spec.code, &key),
            },
            PublishMode::RegionPerNode => {
                let recorded = r.status.iter().flat_map(|s| s.node_regions.iter());
                let mut mine = BTreeMap::new();
                for nr in recorded {
                    if !node_exists(&nr.node_name) || mine.contains_key(&nr.node_name) {
                        continue;
                    }
                    let lost = if !spec.id_range().contains(&nr.region_id) {
                        Some(format!(
                            "regionId {} is outside the range {:?}",
                            nr.region_id,
                            spec.id_range()
                        ))
                    } else {
                        claims.taken(nr.region_id, &nr.code).map(|c| c.to_string())
                    };
                    if let Some(why) = lost {
                        out.warnings.entry(key.clone()).or_default().push(format!(
                            "node {} loses its region: {why}; it gets a new one",
                            nr.node_name
                        ));
                        continue;
                    }
                    claims.claim(nr.region_id, &nr.code, &key);
                    mine.insert(nr.node_name.clone(), (nr.region_id, nr.code.clone()));
                }
                out.per_node.insert(key, mine);
            }
        }
    }
    for r in order
        .iter()
        .filter(|r| r.spec.publish.mode == PublishMode::RegionPerNode)
    {
        let key = RegionKey::of(r);
        let spec = &r.spec;
        let plans = selection.get(&key).map_or(&[][..], Vec::as_slice);
        let mine = out.per_node.entry(key.clone()).or_default();
        let mut free = spec
            .id_range()
            .filter(|id| *id >= 1 && *id <= i64::from(u32::MAX));
        for plan in plans {
            if mine.contains_key(&plan.node_name) {
                continue;
            }
            let next = free
                .by_ref()
                .find(|id| claims.taken(*id, &spec.code_for(*id)).is_none());
            let Some(id) = next else {
                out.warnings.entry(key.clone()).or_default().push(format!(
                    "node {} has no region: every id of {:?} is taken (raise publish.maxRegions)",
                    plan.node_name,
                    spec.id_range()
                ));
                continue;
            };
            claims.claim(id, &spec.code_for(id), &key);
            mine.insert(plan.node_name.clone(), (id, spec.code_for(id)));
        }
    }
    out
}

/// `SharedRegion` regions that lose their id or code to an older region (see [`assign_ids`]).
pub fn find_conflicts<R: Borrow<DerpRegion>>(regions: &[R]) -> BTreeMap<RegionKey, Conflict> {
    assign_ids(regions, &HashMap::new(), &|_| true).conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::IpFamily;
    use crate::testutil::{node, region};
    use k8s_openapi::api::core::v1::PodCondition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use rand::SeedableRng;

    const NOW_S: i64 = 1_790_000_000;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn pod(region: &str, node: &str, ready: bool, since: i64) -> Pod {
        crate::offline::derper_pod(
            "derp",
            region,
            node,
            PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                last_transition_time: Some(Time(ts(since))),
                ..Default::default()
            },
        )
    }

    fn insecure(name: &str, id: i64) -> DerpRegion {
        let mut r = region(name, id);
        r.spec.tls.self_signed = Some(crate::crd::SelfSignedSpec {
            mode: SelfSignedMode::InsecureForTests,
        });
        r
    }

    fn nodes3() -> Vec<Node> {
        vec![
            node(
                "c",
                &[("InternalIP", "10.0.0.3"), ("ExternalIP", "198.51.100.3")],
            ),
            node(
                "a",
                &[("InternalIP", "10.0.0.1"), ("ExternalIP", "198.51.100.1")],
            ),
            node(
                "b",
                &[("InternalIP", "10.0.0.2"), ("InternalIP", "2001:db8::2")],
            ),
        ]
    }

    /// A pinned region needs its self-signed Secret; render it as the controller would.
    fn tls_secret(r: &DerpRegion, nodes: &[Node]) -> Secret {
        let ctx = crate::render::RenderContext {
            nodes,
            existing_mesh_key: None,
            existing_tls: None,
            now_unix: NOW_S,
        };
        crate::render::render(r, &ctx, &mut rand::rngs::StdRng::seed_from_u64(7))
            .unwrap()
            .tls_secret
            .unwrap()
    }

    /// The caches hand the builder `Arc`s; the tests keep plain objects.
    fn shared<T: Clone>(v: &[T]) -> Vec<Arc<T>> {
        v.iter().cloned().map(Arc::new).collect()
    }

    fn build(
        regions: &[DerpRegion],
        nodes: &[Node],
        pods: &[Pod],
        secrets: &[Secret],
        prev: &BTreeSet<String>,
        now: i64,
    ) -> MapOutput {
        build_map(
            &MapInput {
                regions: &shared(regions),
                nodes: &shared(nodes),
                pods: &shared(pods),
                secrets: &shared(secrets),
                previously_published: prev,
                unready_since: &BTreeMap::new(),
                now: ts(now),
                probe_failing: &BTreeSet::new(),
            },
            &MapConfig {
                not_ready_grace: Duration::from_secs(5),
                ..Default::default()
            },
        )
    }

    /// One build in a sequence: feeds the previous output back as the map task does.
    fn step(
        regions: &[DerpRegion],
        nodes: &[Node],
        pods: &[Pod],
        prev: &MapOutput,
        now: i64,
        grace: Duration,
    ) -> MapOutput {
        build_map(
            &MapInput {
                regions: &shared(regions),
                nodes: &shared(nodes),
                pods: &shared(pods),
                secrets: &[],
                previously_published: &prev.published,
                unready_since: &prev.unready_since,
                now: ts(now),
                probe_failing: &BTreeSet::new(),
            },
            &MapConfig {
                not_ready_grace: grace,
                ..Default::default()
            },
        )
    }

    fn node_names(out: &MapOutput, id: u32) -> Vec<String> {
        out.map
            .regions
            .get(&id)
            .map(|r| r.nodes.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn rolling_restart_and_whole_region_outage_keep_the_map_unchanged() {
        let r = insecure("home", 900);
        let nodes = nodes3();
        let regions = [r];
        let grace = DEFAULT_NOT_READY_GRACE;
        let all = |ready: bool, since: i64| -> Vec<Pod> {
            ["a", "b", "c"]
                .iter()
                .map(|n| pod("home", n, ready, since))
                .collect()
        };
        let start = step(
            &regions,
            &nodes,
            &all(true, 0),
            &MapOutput::default(),
            NOW_S,
            grace,
        );
        let want = start.map.to_json().unwrap();
        assert_eq!(start.published.len(), 3);

        // Rolling restart of node b: terminating, gone, replaced (NotReady), Ready again.
        let mut terminating = pod("home", "b", true, 0);
        terminating.metadata.deletion_timestamp = Some(Time(ts(NOW_S + 1)));
        let with = |b: Option<Pod>| -> Vec<Pod> {
            let mut v = vec![pod("home", "a", true, 0), pod("home", "c", true, 0)];
            v.extend(b);
            v
        };
        let mut prev = start.clone();
        for (t, b) in [
            (1, Some(terminating)),
            (3, None),
            (4, Some(pod("home", "b", false, NOW_S + 4))),
        ] {
            prev = step(&regions, &nodes, &with(b), &prev, NOW_S + t, grace);
            assert_eq!(prev.map.to_json().unwrap(), want, "t={t}");
            // The clock started when the pod began terminating and survives its replacement.
            assert_eq!(prev.unready_since["900-b"], ts(NOW_S + 1), "t={t}");
        }
        let back = step(
            &regions,
            &nodes,
            &with(Some(pod("home", "b", true, NOW_S + 6))),
            &prev,
            NOW_S + 6,
            grace,
        );
        assert_eq!(back.map.to_json().unwrap(), want);
        assert!(back.unready_since.is_empty() && back.next_rebuild.is_none());

        // The whole region NotReady for 5 minutes: still in the map, and says so in status.
        let down = step(
            &regions,
            &nodes,
            &all(false, NOW_S + 10),
            &back,
            NOW_S + 10,
            grace,
        );
        let down = step(
            &regions,
            &nodes,
            &all(false, NOW_S + 10),
            &down,
            NOW_S + 310,
            grace,
        );
        assert_eq!(down.map.to_json().unwrap(), want);
        assert_eq!(down.next_rebuild, Some(ts(NOW_S + 610)));
        let f = &down.facts[&RegionKey::new("derp", "home")];
        assert!(
            f.published && f.warnings.iter().any(|w| w.contains("not-ready grace")),
            "{f:?}"
        );
        // Past the grace the region leaves.
        let gone = step(
            &regions,
            &nodes,
            &all(false, NOW_S + 10),
            &down,
            NOW_S + 610,
            grace,
        );
        assert!(gone.map.regions.is_empty());
    }

    #[test]
    fn a_pod_not_replaced_or_a_node_no_longer_selected_leaves() {
        let r = insecure("home", 900);
        let nodes = nodes3();
        let regions = [r];
        let grace = DEFAULT_NOT_READY_GRACE;
        let ab = [pod("home", "a", true, 0), pod("home", "b", true, 0)];
        let start = step(&regions, &nodes, &ab, &MapOutput::default(), NOW_S, grace);
        assert_eq!(node_names(&start, 900), ["900-a", "900-b"]);

        // b's pod deleted and never replaced: kept for POD_REPLACE_GRACE, then out.
        let only_a = [pod("home", "a", true, 0)];
        let t1 = step(&regions, &nodes, &only_a, &start, NOW_S + 1, grace);
        assert_eq!(node_names(&t1, 900), ["900-a", "900-b"]);
        assert_eq!(t1.next_rebuild, Some(ts(NOW_S + 61)));
        let t2 = step(&regions, &nodes, &only_a, &t1, NOW_S + 61, grace);
        assert_eq!(node_names(&t2, 900), ["900-a"]);

        // Node b loses the label the region selects: out at once, even with a terminating pod.
        let mut sel = insecure("home", 900);
        sel.spec.node_selector = [("derp".to_string(), "yes".to_string())].into();
        let mut labelled = nodes3();
        for n in &mut labelled {
            if n.name_any() != "b" {
                n.metadata.labels = Some([("derp".to_string(), "yes".to_string())].into());
            }
        }
        let mut term_b = pod("home", "b", true, 0);
        term_b.metadata.deletion_timestamp = Some(Time(ts(NOW_S + 1)));
        let t = step(
            &[sel],
            &labelled,
            &[pod("home", "a", true, 0), term_b],
            &start,
            NOW_S + 1,
            grace,
        );
        assert_eq!(node_names(&t, 900), ["900-a"]);
    }

    #[test]
    fn ready_nodes_in_sorted_order_with_pins_and_ipv6() {
        let r = region("home", 900);
        let nodes = nodes3();
        let secret = tls_secret(&r, &nodes);
        let pods = vec![
            pod("home", "c", true, NOW_S - 100),
            pod("home", "b", true, NOW_S - 100),
            pod("home", "a", true, NOW_S - 100),
        ];
        let out = build(
            &[r],
            &nodes,
            &pods,
            std::slice::from_ref(&secret),
            &BTreeSet::new(),
            NOW_S,
        );
        let reg = &out.map.regions[&900];
        let names: Vec<&str> = reg.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["900-a", "900-b", "900-c"]);
        let pin = tls::pin(&secret.data.as_ref().unwrap()["tls.crt"].0).unwrap();
        assert!(reg.nodes.iter().all(|n| n.cert_name == pin));
        assert_eq!(reg.nodes[0].host_name, "198.51.100.1");
        assert_eq!(reg.nodes[0].ipv4, "198.51.100.1");
        assert!(reg.nodes[0].can_port80);
        // Node b has only internal addresses: its IPv4 and IPv6 are published.
        assert_eq!(reg.nodes[1].ipv4, "10.0.0.2");
        assert_eq!(reg.nodes[1].ipv6, "2001:db8::2");
        assert_eq!(reg.nodes[1].stun_port, 3478);
        assert_eq!(reg.nodes[1].derp_port, 443);
        let f = &out.facts[&RegionKey::new("derp", "home")];
        assert_eq!((f.ready, f.desired, f.published), (3, 3, true));
        assert_eq!(out.published.len(), 3);
    }

    #[test]
    fn equal_input_gives_identical_json_whatever_the_order() {
        let r1 = region("home", 900);
        let r2 = insecure("away", 901);
        let nodes = nodes3();
        let secret = tls_secret(&r1, &nodes);
        let mut pods = vec![
            pod("home", "a", true, 0),
            pod("home", "b", true, 0),
            pod("away", "c", true, 0),
            pod("away", "a", true, 0),
        ];
        let a = build(
            &[r1.clone(), r2.clone()],
            &nodes,
            &pods,
            std::slice::from_ref(&secret),
            &BTreeSet::new(),
            NOW_S,
        );
        pods.reverse();
        let mut nodes_rev = nodes.clone();
        nodes_rev.reverse();
        let b = build(
            &[r2, r1],
            &nodes_rev,
            &pods,
            &[secret],
            &BTreeSet::new(),
            NOW_S + 3600,
        );
        assert_eq!(a.map.to_json().unwrap(), b.map.to_json().unwrap());
        assert!(
            a.map
                .to_json()
                .unwrap()
                .contains(r#""InsecureForTests":true"#)
        );
        let keys: Vec<u32> = a.map.regions.keys().copied().collect();
        assert_eq!(keys, [900, 901]);
    }

    #[test]
    fn probe_failing_nodes_leave_the_map_but_never_empty_a_region() {
        let r = insecure("home", 900);
        let nodes = nodes3();
        let pods = [
            pod("home", "a", true, NOW_S - 100),
            pod("home", "b", true, NOW_S - 100),
        ];
        let gated = |failing: &[&str]| {
            let failing: BTreeSet<String> = failing.iter().map(|s| s.to_string()).collect();
            build_map(
                &MapInput {
                    regions: &[Arc::new(r.clone())],
                    nodes: &shared(&nodes),
                    pods: &shared(&pods),
                    secrets: &[],
                    previously_published: &BTreeSet::new(),
                    unready_since: &BTreeMap::new(),
                    now: ts(NOW_S),
                    probe_failing: &failing,
                },
                &MapConfig::default(),
            )
        };
        let names = |out: &MapOutput| -> Vec<String> {
            out.map.regions[&900]
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .collect()
        };
        let key = RegionKey::new("derp", "home");
        let targets = |out: &MapOutput| -> Vec<String> {
            out.probe_targets[&key]
                .iter()
                .map(|n| n.name.clone())
                .collect()
        };
        let none = gated(&[]);
        assert_eq!(names(&none), ["900-a", "900-b"]);
        let one = gated(&["900-b"]);
        assert_eq!(names(&one), ["900-a"]);
        // The gated node is still probed (else it could never come back), and the status says
        // it is out of the map.
        assert_eq!(targets(&one), ["900-a", "900-b"]);
        let f = &one.facts[&key];
        assert_eq!(f.ready, 1);
        assert!(!f.nodes.iter().find(|n| n.name == "900-b").unwrap().ready);
        // Every node failing: the region keeps them all (the prober may be the one cut off).
        let all = gated(&["900-a", "900-b"]);
        assert_eq!(names(&all), ["900-a", "900-b"]);
        assert_eq!(all.facts[&key].ready, 2);
        // A node of another region with the same verdict set changes nothing here.
        assert_eq!(names(&gated(&["901-a"])), ["900-a", "900-b"]);
    }

    #[test]
    fn not_ready_leaves_after_the_grace_but_not_before() {
        let r = insecure("home", 900);
        let nodes = nodes3();
        let regions = [r];
        let all_ready = build(
            &regions,
            &nodes,
            &[pod("home", "a", true, 0), pod("home", "b", true, 0)],
            &[],
            &BTreeSet::new(),
            NOW_S,
        );
        assert_eq!(all_ready.published.len(), 2);

        // b turned NotReady 2 s ago: still in, and a rebuild is due when the grace ends.
        let blip = [
            pod("home", "a", true, 0),
            pod("home", "b", false, NOW_S - 2),
        ];
        let out = build(&regions, &nodes, &blip, &[], &all_ready.published, NOW_S);
        assert_eq!(out.map.regions[&900].nodes.len(), 2);
        assert_eq!(out.next_rebuild, Some(ts(NOW_S + 3)));
        assert_eq!(out.map.to_json().unwrap(), all_ready.map.to_json().unwrap());

        // After the grace it is gone.
        let out = build(
            &regions,
            &nodes,
            &blip,
            &[],
            &all_ready.published,
            NOW_S + 4,
        );
        let names: Vec<&str> = out.map.regions[&900]
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(names, ["900-a"]);
        assert_eq!(out.next_rebuild, None);

        // A pod that was never published gets no grace.
        let out = build(&regions, &nodes, &blip, &[], &BTreeSet::new(), NOW_S);
        assert_eq!(out.map.regions[&900].nodes.len(), 1);

        // No ready node at all: the region is left out and says why.
        let none = [pod("home", "a", false, 0)];
        let out = build(&regions, &nodes, &none, &[], &BTreeSet::new(), NOW_S);
        assert!(out.map.regions.is_empty());
        let f = &out.facts[&RegionKey::new("derp", "home")];
        assert!(!f.published);
        assert_eq!(
            f.not_published,
            Some(NotPublished::NoReadyNode { desired: 3 }),
            "{f:?}"
        );
        assert_eq!(
            f.not_published.as_ref().unwrap().to_string(),
            "none of the 3 selected nodes has a Ready derper"
        );
    }

    /// A deleted Node leaves at once; a terminating pod never published gets no grace.
    #[test]
    fn deleted_node_and_unpublished_terminating_pod_leave_at_once() {
        let r = insecure("home", 900);
        let nodes = nodes3();
        let mut terminating = pod("home", "b", true, 0);
        terminating.metadata.deletion_timestamp = Some(Time(ts(NOW_S)));
        let pods = [
            pod("home", "a", true, 0),
            terminating,
            pod("home", "c", true, 0),
        ];
        let without_c: Vec<Node> = nodes
            .iter()
            .filter(|n| n.name_any() != "c")
            .cloned()
            .collect();
        let out = build(&[r], &without_c, &pods, &[], &BTreeSet::new(), NOW_S);
        let names: Vec<&str> = out.map.regions[&900]
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(names, ["900-a"]);
    }

    fn per_node(name: &str, id: i64, max: i64) -> DerpRegion {
        let mut r = insecure(name, id);
        r.spec.publish = crate::crd::PublishSpec {
            mode: PublishMode::RegionPerNode,
            max_regions: max,
        };
        r
    }

    /// The controller writes `facts.node_regions` into status; the next build reads it back.
    fn record(r: &mut DerpRegion, out: &MapOutput) {
        let f = &out.facts[&RegionKey::of(r)];
        r.status = Some(crate::crd::DerpRegionStatus {
            node_regions: f.node_regions.clone(),
            ..Default::default()
        });
    }

    fn regions_of(out: &MapOutput) -> Vec<(u32, String, Vec<String>)> {
        out.map
            .regions
            .values()
            .map(|r| {
                let nodes = r.nodes.iter().map(|n| n.name.clone()).collect();
                (r.region_id, r.region_code.clone(), nodes)
            })
            .collect()
    }

    #[test]
    fn region_per_node_ids_are_stable_for_a_node_s_life() {
        let mut r = per_node("home", 900, 8);
        let mut nodes = nodes3();
        let pods = |names: &[&str]| -> Vec<Pod> {
            names.iter().map(|n| pod("home", n, true, 0)).collect()
        };
        let out = build(
            &[r.clone()],
            &nodes,
            &pods(&["a", "b", "c"]),
            &[],
            &BTreeSet::new(),
            NOW_S,
        );
        let want = vec![
            (900, "home".to_string(), vec!["900-a".to_string()]),
            (901, "home-1".to_string(), vec!["901-b".to_string()]),
            (902, "home-2".to_string(), vec!["902-c".to_string()]),
        ];
        assert_eq!(regions_of(&out), want);
        assert_eq!(out.map.regions[&901].region_name, "home (b)");
        record(&mut r, &out);

        // Node a is deleted and d joins: b and c keep their regions, d gets the freed id.
        nodes.retain(|n| n.name_any() != "a");
        nodes.push(node("d", &[("InternalIP", "10.0.0.4")]));
        let out2 = build(
            &[r.clone()],
            &nodes,
            &pods(&["b", "c", "d"]),
            &[],
            &out.published,
            NOW_S,
        );
        let got = regions_of(&out2);
        assert_eq!(got[1..], want[1..]);
        assert_eq!(got[0], (900, "home".to_string(), vec!["900-d".to_string()]));

        // The recorded ids win over name order: with the status of the first build, node b is
        // still 901 though a is gone and b now sorts first.
        let out3 = build(
            &[r.clone()],
            &nodes,
            &pods(&["b", "c"]),
            &[],
            &out.published,
            NOW_S,
        );
        assert_eq!(regions_of(&out3)[0].0, 901);
    }

    #[test]
    fn region_per_node_skips_ids_of_others_and_reports_a_full_range() {
        let mut shared = insecure("other", 901);
        shared.metadata.creation_timestamp = Some(Time(ts(1)));
        let mut pn = per_node("home", 900, 3);
        pn.metadata.creation_timestamp = Some(Time(ts(2)));
        let nodes = nodes3();
        let pods = [
            pod("home", "a", true, 0),
            pod("home", "b", true, 0),
            pod("home", "c", true, 0),
            pod("other", "a", true, 0),
        ];
        let out = build(
            &[pn.clone(), shared.clone()],
            &nodes,
            &pods,
            &[],
            &BTreeSet::new(),
            NOW_S,
        );
        let ids: Vec<u32> = out.map.regions.keys().copied().collect();
        // 900 a, 901 is the older shared region, 902 b; c finds the range 900-902 full.
        assert_eq!(ids, [900, 901, 902]);
        assert_eq!(out.map.regions[&902].nodes[0].name, "902-b");
        let f = &out.facts[&RegionKey::of(&pn)];
        assert!(f.published);
        assert!(
            f.warnings
                .iter()
                .any(|w| w.contains("node c has no region")),
            "{f:?}"
        );
        assert!(f.nodes.iter().any(|n| n.node_name == "c" && !n.ready));

        // A newer shared region asking for an id a node holds is the conflict, not the node.
        record(&mut pn, &out);
        let mut late = insecure("late", 902);
        late.metadata.creation_timestamp = Some(Time(ts(3)));
        let out = build(
            &[late.clone(), pn, shared],
            &nodes,
            &pods,
            &[],
            &out.published,
            NOW_S,
        );
        assert_eq!(out.map.regions[&902].nodes[0].name, "902-b");
        let f = &out.facts[&RegionKey::of(&late)];
        assert!(
            f.conflict().unwrap().to_string().contains("derp/home"),
            "{f:?}"
        );
    }

    #[test]
    fn conflicts_older_wins_then_namespace_name() {
        let mut old = region("old", 900);
        old.metadata.creation_timestamp = Some(Time(ts(100)));
        let mut new_same_id = region("new", 900);
        new_same_id.metadata.creation_timestamp = Some(Time(ts(200)));
        let mut same_code = region("other", 901);
        same_code.spec.code = "old".into();
        same_code.metadata.creation_timestamp = Some(Time(ts(300)));
        // Same id as the loser `new` but not as any winner: published.
        let mut third = region("third", 902);
        third.metadata.creation_timestamp = Some(Time(ts(50)));
        let mut tie_b = region("tie-b", 903);
        tie_b.metadata.creation_timestamp = Some(Time(ts(400)));
        let mut tie_a = region("tie-a", 903);
        tie_a.metadata.creation_timestamp = Some(Time(ts(400)));

        let c = find_conflicts(&[old, new_same_id, same_code, third, tie_b, tie_a]);
        let k = |n: &str| RegionKey::new("derp", n);
        assert_eq!(
            c[&k("new")],
            Conflict::RegionIdTaken {
                id: 900,
                holder: k("old")
            }
        );
        assert_eq!(
            c[&k("new")].to_string(),
            "regionId 900 is already held by the older DerpRegion derp/old"
        );
        assert_eq!(
            c[&k("other")].to_string(),
            "code \"old\" is already held by the older DerpRegion derp/old"
        );
        assert!(
            matches!(&c[&k("tie-b")], Conflict::RegionIdTaken { holder, .. } if *holder == k("tie-a"))
        );
        assert!(!c.contains_key(&k("old")) && !c.contains_key(&k("third")));
        assert!(!c.contains_key(&k("tie-a")));
    }

    #[test]
    fn conflicting_region_is_left_out_and_999_warns() {
        let mut a = region("a", 999);
        a.metadata.creation_timestamp = Some(Time(ts(1)));
        a.spec.tls.self_signed = Some(crate::crd::SelfSignedSpec {
            mode: SelfSignedMode::InsecureForTests,
        });
        let mut b = a.clone();
        b.metadata.name = Some("b".into());
        b.spec.code = "b".into();
        b.metadata.creation_timestamp = Some(Time(ts(2)));
        let nodes = nodes3();
        let pods = [pod("a", "a", true, 0), pod("b", "b", true, 0)];
        let out = build(&[b, a], &nodes, &pods, &[], &BTreeSet::new(), NOW_S);
        assert_eq!(out.map.regions[&999].region_code, "a");
        let fb = &out.facts[&RegionKey::new("derp", "b")];
        assert!(fb.conflict().is_some() && !fb.published);
        assert!(out.facts[&RegionKey::new("derp", "a")].warnings[0].contains("999"));
    }

    #[test]
    fn template_names_stun_disabled_and_ipv6_only() {
        let mut r = region("home", 900);
        r.spec.hostname_template = Some("{node}.derp.example.com".into());
        r.spec.ip_families = vec![IpFamily::IPv6];
        r.spec.ports.stun_port = PORT_DISABLED;
        r.spec.tls.self_signed = None;
        r.spec.tls.secret_name = Some("wild".into());
        let nodes = nodes3();
        let pods = [pod("home", "b", true, 0), pod("home", "a", true, 0)];
        let out = build(&[r], &nodes, &pods, &[], &BTreeSet::new(), NOW_S);
        let reg = &out.map.regions[&900];
        // Node a has no IPv6 but a DNS name: published, clients resolve the name.
        assert_eq!(reg.nodes[0].host_name, "a.derp.example.com");
        assert_eq!(reg.nodes[0].ipv4, "");
        assert_eq!(reg.nodes[1].ipv6, "2001:db8::2");
        assert!(
            reg.nodes
                .iter()
                .all(|n| n.stun_port == -1 && n.cert_name.is_empty())
        );
        assert!(!reg.nodes[0].can_port80);
        let json = out.map.to_json().unwrap();
        assert!(json.contains(r#""STUNPort":-1"#), "{json}");
    }

    #[test]
    fn pinned_region_waits_for_its_secret() {
        let r = region("home", 900);
        let nodes = nodes3();
        let out = build(
            &[r],
            &nodes,
            &[pod("home", "a", true, 0)],
            &[],
            &BTreeSet::new(),
            NOW_S,
        );
        assert!(out.map.regions.is_empty());
        let f = &out.facts[&RegionKey::new("derp", "home")];
        assert_eq!(
            f.not_published,
            Some(NotPublished::Certificate(CertWait::NoSecret {
                secret: certificate_name("home")
            }))
        );
        assert!(
            f.not_published
                .as_ref()
                .unwrap()
                .to_string()
                .contains("self-signed")
        );
    }
}
