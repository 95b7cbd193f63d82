//! Which Nodes a `DerpRegion` selects and how each one is named and addressed. Both the renderer
//! (certificate names, mesh peers) and the map builder (published nodes) plan nodes here, so the
//! names in a certificate and in the map cannot disagree.
//!
//! Selection mirrors what the DaemonSet controller does with our pod template: nodeSelector,
//! taints against tolerations (plus the tolerations the DaemonSet controller adds on its own), and
//! required node affinity. It predicts where derpers will run so certificates and mesh peers can
//! be ready before the pods start; the map itself trusts only Ready pods.

use std::borrow::Borrow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration,
};

use crate::crd::{
    ANNOTATION_PUBLIC_IPV4, ANNOTATION_PUBLIC_IPV6, DerpRegionSpec, IpFamily, NODE_PLACEHOLDER,
    NodeAddressType,
};

/// One selected node as the region names and reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// Kubernetes node name.
    pub node_name: String,
    /// DERP node name in the map (`Name`): `<regionId>-<node name>`, see [`derp_node_name`].
    pub derp_name: String,
    /// `HostName` in the map: the template with the node name, or the node's IP.
    pub host_name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Address other derpers of the region dial for the mesh: the node's first InternalIP
    /// (reachable inside the cluster even when the public address needs hairpin NAT), else the
    /// published address.
    pub dial: Option<IpAddr>,
    /// Every IP the node is known by (annotations and status addresses), for self-signed SANs.
    pub all_ips: Vec<IpAddr>,
}

impl NodePlan {
    /// A node in IP mode that has no address of a published family cannot be reached.
    pub fn has_address(&self) -> bool {
        !self.host_name.is_empty()
    }
}

/// DERP node name: `<regionId>-<Kubernetes node name>`. Derived from the node's name rather than
/// its index so that a node joining or leaving never renames the others, and equal across
/// operator restarts and replicas. Unique in the map because a region has at most one derper per
/// node and region ids are unique among published regions.
pub fn derp_node_name(region_id: i64, node_name: &str) -> String {
    format!("{region_id}-{node_name}")
}

/// The nodes `spec` selects, planned, sorted by node name (the order of the map's `Nodes`).
pub fn plan_nodes<N: Borrow<Node>>(spec: &DerpRegionSpec, nodes: &[N]) -> Vec<NodePlan> {
    let mut out: Vec<NodePlan> = nodes
        .iter()
        .map(Borrow::borrow)
        .filter(|n| selects(spec, n))
        .map(|n| plan_node(spec, n))
        .collect();
    out.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    out
}

/// Plans one node whether or not the region selects it (the map builder plans the nodes its pods
/// actually run on).
pub fn plan_node(spec: &DerpRegionSpec, node: &Node) -> NodePlan {
    let node_name = node.metadata.name.clone().unwrap_or_default();
    let want4 = spec.ip_families.contains(&IpFamily::IPv4);
    let want6 = spec.ip_families.contains(&IpFamily::IPv6);
    let annotation = |key: &str| -> Option<IpAddr> {
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
    };
    let status_addrs: Vec<(String, IpAddr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|addrs| {
            addrs
                .iter()
                .filter_map(|a| Some((a.type_.clone(), a.address.trim().parse::<IpAddr>().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let by_type = |want: &dyn Fn(&IpAddr) -> bool| -> Option<IpAddr> {
        spec.address_types.iter().find_map(|t| {
            let t = match t {
                NodeAddressType::ExternalIP => "ExternalIP",
                NodeAddressType::InternalIP => "InternalIP",
            };
            status_addrs
                .iter()
                .find(|(ty, ip)| ty == t && want(ip))
                .map(|(_, ip)| *ip)
        })
    };
    let ipv4 = if want4 {
        match annotation(ANNOTATION_PUBLIC_IPV4) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => match by_type(&|ip| ip.is_ipv4()) {
                Some(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            },
        }
    } else {
        None
    };
    let ipv6 = if want6 {
        match annotation(ANNOTATION_PUBLIC_IPV6) {
            Some(IpAddr::V6(ip)) => Some(ip),
            // Link-local addresses need a zone and are never reachable from clients.
            _ => match by_type(&|ip| matches!(ip, IpAddr::V6(v6) if !is_link_local6(v6))) {
                Some(IpAddr::V6(ip)) => Some(ip),
                _ => None,
            },
        }
    } else {
        None
    };
    let host_name = match &spec.hostname_template {
        Some(t) => t.replace(NODE_PLACEHOLDER, &node_name),
        None => ipv4
            .map(|ip| ip.to_string())
            .or_else(|| ipv6.map(|ip| ip.to_string()))
            .unwrap_or_default(),
    };
    let internal = status_addrs
        .iter()
        .filter(|(ty, _)| ty == "InternalIP")
        .map(|(_, ip)| *ip)
        .min_by_key(|ip| ip.is_ipv6());
    let dial = internal.or(ipv4.map(IpAddr::V4)).or(ipv6.map(IpAddr::V6));
    let mut all_ips: Vec<IpAddr> = ipv4
        .map(IpAddr::V4)
        .into_iter()
        .chain(ipv6.map(IpAddr::V6))
        .chain(status_addrs.iter().map(|(_, ip)| *ip))
        .collect();
    all_ips.sort();
    all_ips.dedup();
    NodePlan {
        derp_name: derp_node_name(spec.region_id, &node_name),
        node_name,
        host_name,
        ipv4,
        ipv6,
        dial,
        all_ips,
    }
}

fn is_link_local6(ip: &Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

/// Tolerations the DaemonSet controller adds to every DaemonSet pod (hostNetwork included), so
/// nodes with these taints still run a derper.
const DAEMONSET_TOLERATED_TAINTS: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
    "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/network-unavailable",
];

/// Whether the region's DaemonSet would place a derper on `node`.
pub fn selects(spec: &DerpRegionSpec, node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let empty = Default::default();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    if !spec
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let taints: &[Taint] = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or(&[]);
    for taint in taints {
        if taint.effect == "PreferNoSchedule"
            || DAEMONSET_TOLERATED_TAINTS.contains(&taint.key.as_str())
        {
            continue;
        }
        if !spec.tolerations.iter().any(|t| tolerates(t, taint)) {
            return false;
        }
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if let Some(req) = required {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        if !req
            .node_selector_terms
            .iter()
            .any(|term| term_matches(term, labels, name))
        {
            return false;
        }
    }
    true
}

fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref()
        && !effect.is_empty()
        && effect != taint.effect
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or_default();
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => key == taint.key && t.value.as_deref() == Some(taint.value.as_deref().unwrap_or("")),
    }
}

/// A term matches when all its requirements hold; an empty term matches nothing (as in the
/// scheduler).
fn term_matches(
    term: &NodeSelectorTerm,
    labels: &std::collections::BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node_name)))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{node, region};

    #[test]
    fn node_selector_taints_and_affinity() {
        let mut r = region("home", 900);
        r.spec.node_selector.insert("derp".into(), "yes".into());
        let mut a = node("a", &[("InternalIP", "10.0.0.1")]);
        a.metadata.labels = Some([("derp".to_string(), "yes".to_string())].into());
        let b = node("b", &[("InternalIP", "10.0.0.2")]);
        assert!(selects(&r.spec, &a));
        assert!(!selects(&r.spec, &b));

        // A NoSchedule taint needs a toleration; the DaemonSet's own ones are implied.
        a.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![
                Taint {
                    key: "edge".into(),
                    effect: "NoSchedule".into(),
                    value: Some("true".into()),
                    ..Default::default()
                },
                Taint {
                    key: "node.kubernetes.io/unschedulable".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        });
        assert!(!selects(&r.spec, &a));
        r.spec.tolerations.push(Toleration {
            key: Some("edge".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        });
        assert!(selects(&r.spec, &a));

        let aff: k8s_openapi::api::core::v1::Affinity = serde_json::from_value(serde_json::json!({
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["a"]}]}
            ]}}
        }))
        .unwrap();
        r.spec.affinity = Some(aff);
        assert!(!selects(&r.spec, &a));
    }

    #[test]
    fn addresses_prefer_annotation_then_external_then_internal() {
        let r = region("home", 900);
        let mut n = node(
            "a",
            &[
                ("InternalIP", "10.0.0.1"),
                ("ExternalIP", "198.51.100.1"),
                ("InternalIP", "fe80::1"),
                ("InternalIP", "2001:db8::1"),
            ],
        );
        let p = plan_node(&r.spec, &n);
        assert_eq!(p.ipv4, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(p.ipv6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(p.host_name, "198.51.100.1");
        assert_eq!(p.dial, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p.derp_name, "900-a");

        n.metadata.annotations = Some(
            [
                (
                    ANNOTATION_PUBLIC_IPV4.to_string(),
                    "203.0.113.9".to_string(),
                ),
                (
                    ANNOTATION_PUBLIC_IPV6.to_string(),
                    "2001:db8::9".to_string(),
                ),
            ]
            .into(),
        );
        let p = plan_node(&r.spec, &n);
        assert_eq!(p.host_name, "203.0.113.9");
        assert_eq!(p.ipv6, Some("2001:db8::9".parse().unwrap()));
        assert!(p.all_ips.contains(&"10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ipv6_only_node_is_named_by_its_ipv6() {
        let mut r = region("home", 900);
        r.spec.ip_families = vec![IpFamily::IPv6];
        let n = node(
            "a",
            &[("InternalIP", "10.0.0.1"), ("ExternalIP", "2001:db8::7")],
        );
        let p = plan_node(&r.spec, &n);
        assert_eq!(p.ipv4, None);
        assert_eq!(p.host_name, "2001:db8::7");

        r.spec.hostname_template = Some("{node}.derp.example.com".into());
        assert_eq!(plan_node(&r.spec, &n).host_name, "a.derp.example.com");
    }
}
