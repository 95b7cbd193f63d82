//! The DERP map builder: a pure function from every DerpRegion, Node, derper Pod and self-signed
//! TLS Secret (the operator's watch caches) plus a clock to the `DerpMap` the map server serves,
//! and the per-region facts the controller writes into status.
//!
//! Stability is the point: a tailscaled drops and redials every client of a region whenever that
//! region's definition changes in any way, so equal input gives byte-identical JSON (regions keyed
//! by id in a `BTreeMap`, nodes sorted by Kubernetes node name, names derived from node names, no
//! timestamps or hash-map order anywhere), and a pod that blinks NotReady for less than the grace
//! keeps its node in the map.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use derp_proto::derpmap::{DerpMap, DerpNode, DerpRegion as MapRegion};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{DerpRegion, PORT_DISABLED, PublishedNode, SelfSignedMode};
use crate::render::{APP_NAME, LABEL_NAME, LABEL_REGION, certificate_name};
use crate::select::{NodePlan, plan_node, plan_nodes};
use crate::tls;

/// Region id of Headscale's embedded DERP server by default; it wins any collision there.
pub const HEADSCALE_EMBEDDED_REGION_ID: i64 = 999;

/// `(namespace, name)` of a DerpRegion.
pub type RegionKey = (String, String);

/// How the map is built.
#[derive(Debug, Clone)]
pub struct MapConfig {
    /// A node whose derper pod turns NotReady stays in the map this long, so a probe blip does
    /// not make every client of the region redial twice.
    pub not_ready_grace: Duration,
    /// Sets `omitDefaultRegions` (a hint to the control server not to add Tailscale's regions).
    pub omit_default_regions: bool,
}

impl Default for MapConfig {
    fn default() -> Self {
        Self {
            // 5 s: about one readiness period; long enough for a single failed probe, short
            // enough that a dead derper leaves the map within seconds.
            not_ready_grace: Duration::from_secs(5),
            omit_default_regions: false,
        }
    }
}

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
    /// Set when another, older DerpRegion holds the id or code.
    pub conflict: Option<String>,
    /// Whether the region is in the map.
    pub published: bool,
    /// Why it is not in the map, when it is not.
    pub not_published_reason: Option<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapOutput {
    pub map: DerpMap,
    pub facts: BTreeMap<RegionKey, RegionFacts>,
    /// DERP node names in the map (feed back as `previously_published`).
    pub published: BTreeSet<String>,
    /// When a grace expires and the map must be rebuilt even if nothing else changes.
    pub next_rebuild: Option<Timestamp>,
    /// Per published region, its nodes as the map would list them without the probe gate: what
    /// the prober probes (a gated node must still be probed to come back).
    pub probe_targets: BTreeMap<RegionKey, Vec<DerpNode>>,
}

fn region_key(r: &DerpRegion) -> RegionKey {
    (r.namespace().unwrap_or_default(), r.name_any())
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
    let conflicts = find_conflicts(input.regions);
    let nodes_by_name: BTreeMap<&str, &Node> = input
        .nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, &**n)))
        .collect();
    let node_index = NodeIndex::new(input.nodes, input.regions);
    // Our pods by (namespace, region), in input order; and the Secrets by (namespace, name).
    let mut pods_of: HashMap<(&str, &str), Vec<&Pod>> = HashMap::new();
    for pod in input.pods {
        let labels = pod.labels();
        if labels.get(LABEL_NAME).map(String::as_str) != Some(APP_NAME) {
            continue;
        }
        if let (Some(ns), Some(region)) =
            (pod.metadata.namespace.as_deref(), labels.get(LABEL_REGION))
        {
            pods_of.entry((ns, region)).or_default().push(pod);
        }
    }
    let secrets: HashMap<(&str, &str), &Secret> = input
        .secrets
        .iter()
        .filter_map(|s| {
            Some((
                (
                    s.metadata.namespace.as_deref()?,
                    s.metadata.name.as_deref()?,
                ),
                &**s,
            ))
        })
        .collect();
    let grace_ms = i64::try_from(cfg.not_ready_grace.as_millis()).unwrap_or(i64::MAX);

    for region in input.regions {
        if region.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let key = region_key(region);
        let spec = &region.spec;
        let mut facts = RegionFacts {
            conflict: conflicts.get(&key).cloned(),
            ..Default::default()
        };
        if spec.region_id == HEADSCALE_EMBEDDED_REGION_ID {
            facts.warnings.push(
                "region id 999 is the default of Headscale's embedded DERP server, which wins \
                 over this region if it is enabled; prefer another id in 900-998"
                    .into(),
            );
        }
        let selected = plan_nodes(spec, node_index.candidates(region));
        facts.desired = u32::try_from(selected.len()).unwrap_or(u32::MAX);

        // Node name -> whether a derper of this region there counts as ready.
        let mut ready_on: BTreeMap<String, bool> = BTreeMap::new();
        let pods = pods_of
            .get(&(key.0.as_str(), key.1.as_str()))
            .map_or(&[][..], Vec::as_slice);
        for pod in pods {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let derp_name = crate::select::derp_node_name(spec.region_id, &node);
            let state = pod_ready(pod, input.now, grace_ms);
            let ready = match state {
                PodReadiness::Ready => true,
                PodReadiness::InGrace(until) if input.previously_published.contains(&derp_name) => {
                    out.next_rebuild = Some(out.next_rebuild.map_or(until, |t| t.min(until)));
                    true
                }
                _ => false,
            };
            let e = ready_on.entry(node).or_insert(false);
            *e |= ready;
        }

        // The nodes to report: selected ones plus any that still run one of our pods.
        let mut plans: BTreeMap<String, NodePlan> = selected
            .into_iter()
            .map(|p| (p.node_name.clone(), p))
            .collect();
        for node in ready_on.keys() {
            if !plans.contains_key(node)
                && let Some(n) = nodes_by_name.get(node.as_str())
            {
                plans.insert(node.clone(), plan_node(spec, n));
            }
        }

        let cert = region_cert(region, &secrets);
        let mut map_nodes = Vec::new();
        for (node_name, plan) in &plans {
            // A deleted Node takes its derper out of the map at once.
            let ready = nodes_by_name.contains_key(node_name.as_str())
                && ready_on.get(node_name).copied().unwrap_or(false)
                && plan.has_address();
            facts.nodes.push(PublishedNode {
                name: plan.derp_name.clone(),
                node_name: node_name.clone(),
                host_name: plan.host_name.clone(),
                ipv4: plan.ipv4.map(|i| i.to_string()),
                ipv6: plan.ipv6.map(|i| i.to_string()),
                ready,
            });
            if ready {
                map_nodes.push(plan);
            }
        }
        let probed = map_nodes.clone();
        // The prober's verdict moves clients to healthy siblings; it never empties a region (a
        // prober cut off from every node says more about the prober than about the nodes).
        if map_nodes
            .iter()
            .any(|p| !input.probe_failing.contains(&p.derp_name))
        {
            map_nodes.retain(|p| !input.probe_failing.contains(&p.derp_name));
            for n in &mut facts.nodes {
                n.ready &= !input.probe_failing.contains(&n.name);
            }
        }
        facts.ready = u32::try_from(map_nodes.len()).unwrap_or(u32::MAX);

        let region_id = u32::try_from(spec.region_id).ok().filter(|id| *id > 0);
        facts.not_published_reason = if let Some(c) = &facts.conflict {
            Some(c.clone())
        } else if region_id.is_none() {
            Some(format!("regionId {} is out of range", spec.region_id))
        } else if let Err(why) = &cert {
            Some(why.clone())
        } else if map_nodes.is_empty() {
            Some(if facts.desired == 0 {
                "no node matches the region's node selection".into()
            } else {
                format!(
                    "none of the {} selected nodes has a Ready derper",
                    facts.desired
                )
            })
        } else {
            None
        };
        if let (None, Some(id), Ok(cert)) = (&facts.not_published_reason, region_id, &cert) {
            let nodes: Vec<DerpNode> = map_nodes
                .iter()
                .map(|p| derp_node(region, id, p, cert))
                .collect();
            out.published.extend(nodes.iter().map(|n| n.name.clone()));
            out.probe_targets.insert(
                key.clone(),
                probed
                    .iter()
                    .map(|p| derp_node(region, id, p, cert))
                    .collect(),
            );
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
            facts.published = true;
        }
        out.facts.insert(key, facts);
    }
    out
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
) -> Result<CertMark, String> {
    let Some(ss) = &region.spec.tls.self_signed else {
        return Ok(CertMark::Verified);
    };
    if ss.mode == SelfSignedMode::InsecureForTests {
        return Ok(CertMark::Insecure);
    }
    let ns = region.namespace().unwrap_or_default();
    let name = certificate_name(&region.name_any());
    let secret = secrets
        .get(&(ns.as_str(), name.as_str()))
        .ok_or_else(|| format!("waiting for the self-signed certificate Secret {name}"))?;
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .ok_or_else(|| format!("Secret {name} has no tls.crt"))?;
    tls::pin(&pem.0)
        .map(CertMark::Pinned)
        .map_err(|e| format!("Secret {name}: {e}"))
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

enum PodReadiness {
    Ready,
    /// NotReady since less than the grace; may stay until the given time.
    InGrace(Timestamp),
    NotReady,
}

fn pod_ready(pod: &Pod, now: Timestamp, grace_ms: i64) -> PodReadiness {
    // A terminating derper is draining its clients: out at once.
    if pod.metadata.deletion_timestamp.is_some() {
        return PodReadiness::NotReady;
    }
    let cond = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let Some(cond) = cond else {
        return PodReadiness::NotReady;
    };
    if cond.status == "True" {
        return PodReadiness::Ready;
    }
    let Some(since) = cond.last_transition_time.as_ref().map(|t| t.0) else {
        return PodReadiness::NotReady;
    };
    let until_ms = since.as_millisecond().saturating_add(grace_ms);
    if now.as_millisecond() < until_ms {
        match Timestamp::from_millisecond(until_ms) {
            Ok(until) => PodReadiness::InGrace(until),
            Err(_) => PodReadiness::NotReady,
        }
    } else {
        PodReadiness::NotReady
    }
}

/// Regions that lose their id or code to an older region. Regions are taken oldest first
/// (`creationTimestamp`, then namespace/name for a tie); a region is published only if neither its
/// id nor its code is held by one taken before it, so a loser never blocks a third region.
pub fn find_conflicts<R: Borrow<DerpRegion>>(regions: &[R]) -> BTreeMap<RegionKey, String> {
    let mut order: Vec<&DerpRegion> = regions
        .iter()
        .map(Borrow::borrow)
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .collect();
    order.sort_by(|a, b| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // No timestamp (not yet created, e.g. `operator render`) sorts last.
        (ta.is_none(), ta, region_key(a)).cmp(&(tb.is_none(), tb, region_key(b)))
    });
    let mut ids: BTreeMap<i64, RegionKey> = BTreeMap::new();
    let mut codes: BTreeMap<&str, RegionKey> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for r in order {
        let key = region_key(r);
        if let Some(holder) = ids.get(&r.spec.region_id) {
            out.insert(
                key,
                format!(
                    "regionId {} is already held by the older DerpRegion {}/{}",
                    r.spec.region_id, holder.0, holder.1
                ),
            );
        } else if let Some(holder) = codes.get(r.spec.code.as_str()) {
            out.insert(
                key,
                format!(
                    "code {:?} is already held by the older DerpRegion {}/{}",
                    r.spec.code, holder.0, holder.1
                ),
            );
        } else {
            ids.insert(r.spec.region_id, key.clone());
            codes.insert(r.spec.code.as_str(), key);
        }
    }
    out
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
        crate::preview::derper_pod(
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

    fn build(
        regions: &[DerpRegion],
        nodes: &[Node],
        pods: &[Pod],
        secrets: &[Secret],
        prev: &BTreeSet<String>,
        now: i64,
    ) -> MapOutput {
        fn shared<T: Clone>(v: &[T]) -> Vec<Arc<T>> {
            v.iter().cloned().map(Arc::new).collect()
        }
        build_map(
            &MapInput {
                regions: &shared(regions),
                nodes: &shared(nodes),
                pods: &shared(pods),
                secrets: &shared(secrets),
                previously_published: prev,
                now: ts(now),
                probe_failing: &BTreeSet::new(),
            },
            &MapConfig::default(),
        )
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
        let f = &out.facts[&("derp".to_string(), "home".to_string())];
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
        assert_eq!(a.map.to_json(), b.map.to_json());
        assert!(a.map.to_json().contains(r#""InsecureForTests":true"#));
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
                    nodes: &nodes.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
                    pods: &pods.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
                    secrets: &[],
                    previously_published: &BTreeSet::new(),
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
        let key = ("derp".to_string(), "home".to_string());
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
        assert_eq!(out.map.to_json(), all_ready.map.to_json());

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
        let f = &out.facts[&("derp".to_string(), "home".to_string())];
        assert!(!f.published);
        assert!(
            f.not_published_reason
                .as_ref()
                .unwrap()
                .contains("Ready derper"),
            "{f:?}"
        );
    }

    #[test]
    fn deleted_node_and_terminating_pod_leave_at_once() {
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
        let k = |n: &str| ("derp".to_string(), n.to_string());
        assert!(c[&k("new")].contains("regionId 900") && c[&k("new")].contains("derp/old"));
        assert!(c[&k("other")].contains("code \"old\""));
        assert!(c[&k("tie-b")].contains("derp/tie-a"));
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
        let fb = &out.facts[&("derp".to_string(), "b".to_string())];
        assert!(fb.conflict.is_some() && !fb.published);
        assert!(out.facts[&("derp".to_string(), "a".to_string())].warnings[0].contains("999"));
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
        let json = out.map.to_json();
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
        let f = &out.facts[&("derp".to_string(), "home".to_string())];
        assert!(
            f.not_published_reason
                .as_ref()
                .unwrap()
                .contains("self-signed")
        );
    }
}
