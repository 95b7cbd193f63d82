//! What the watch caches keep of each object, and which watch events are worth acting on.
//!
//! The operator caches every Node of the cluster and every derper Pod. As the API server sends
//! them, most of their bytes are things it never reads: `managedFields` (often half of an object),
//! a Node's image list, capacity, conditions and system info, a Pod's containers. At 5000 Nodes
//! that was ~250 MB of cache before any region existed (bench/operator-scale). So each object is
//! slimmed to the fields the selector, the map builder and the reconciler read before it is
//! stored, and a watch event that leaves the slimmed object as it was (a Node heartbeat, a Pod's
//! container status) neither rebuilds the map nor reconciles a region.
//!
//! Anything added to `select.rs`, `mapbuild.rs` or the reconciler that reads another field of a
//! Node or Pod must keep that field here (the tests below pin what is kept).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;
use serde::Serialize;

use crate::crd::{ANNOTATION_PUBLIC_IPV4, ANNOTATION_PUBLIC_IPV6, DerpRegion};

/// Drops `managedFields`: server-side apply bookkeeping nobody in the operator reads (the
/// compare-before-apply in `apply.rs` compares field values, not owners).
pub fn meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
}

/// A Node as `select.rs` reads it: name, labels (selectors), taints (tolerations), the public-IP
/// annotations and the status addresses, and whether it is being deleted.
pub fn node(n: &mut Node) {
    meta(&mut n.metadata);
    if let Some(a) = n.metadata.annotations.as_mut() {
        a.retain(|k, _| k == ANNOTATION_PUBLIC_IPV4 || k == ANNOTATION_PUBLIC_IPV6);
    }
    if let Some(s) = n.spec.as_mut() {
        *s = NodeSpec {
            taints: s.taints.take(),
            ..Default::default()
        };
    }
    if let Some(s) = n.status.as_mut() {
        *s = NodeStatus {
            addresses: s.addresses.take(),
            ..Default::default()
        };
    }
}

/// A derper Pod as the map builder reads it: labels (region), node, the Ready condition, and
/// whether it is terminating.
pub fn pod(p: &mut Pod) {
    meta(&mut p.metadata);
    p.metadata.annotations = None;
    if let Some(s) = p.spec.as_mut() {
        *s = PodSpec {
            node_name: s.node_name.take(),
            ..Default::default()
        };
    }
    if let Some(s) = p.status.as_mut() {
        *s = PodStatus {
            conditions: s
                .conditions
                .take()
                .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..Default::default()
        };
    }
}

/// Our DaemonSets: metadata and spec are compared before every apply; the status (rollout
/// counters) nobody reads.
pub fn daemonset(d: &mut DaemonSet) {
    meta(&mut d.metadata);
    d.status = None;
}

/// Any other kind (Secrets, ConfigMaps, the regions): only `managedFields` go; the rest is
/// compared before every apply or read by the reconciler.
pub fn other<K: Resource>(k: &mut K) {
    meta(k.meta_mut());
}

/// What of an object the operator reacts to, as a hash: the slimmed object without its
/// `resourceVersion` (which every write moves; for a DaemonSet that leaves metadata and spec, so
/// a rollout's status updates are no change). `None` when it cannot be hashed: such an object
/// counts as changed on every event.
pub trait Fingerprint {
    /// By default every event counts (kinds that change rarely, or only through us).
    fn fingerprint(&self) -> Option<u64> {
        None
    }
}

impl Fingerprint for DerpRegion {}
impl Fingerprint for Secret {}
impl Fingerprint for ConfigMap {}

fn hash_json<T: Serialize>(v: &T) -> Option<u64> {
    let bytes = serde_json::to_vec(v).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

fn without_rv<K: Resource + Clone>(k: &K) -> K {
    let mut k = k.clone();
    k.meta_mut().resource_version = None;
    k
}

impl Fingerprint for Node {
    fn fingerprint(&self) -> Option<u64> {
        hash_json(&without_rv(self))
    }
}

impl Fingerprint for Pod {
    fn fingerprint(&self) -> Option<u64> {
        hash_json(&without_rv(self))
    }
}

impl Fingerprint for DaemonSet {
    fn fingerprint(&self) -> Option<u64> {
        hash_json(&without_rv(self))
    }
}

fn key<K: Resource>(k: &K) -> String {
    let m = k.meta();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default()
    )
}

/// Remembers the fingerprint of every object seen and tells whether an event changes anything.
/// Deletions and the events of a (re)list always count; a modification counts when the
/// fingerprint moved.
#[derive(Default)]
pub struct Changes {
    seen: HashMap<String, u64>,
    /// Fingerprints collected during a relist; they replace `seen` when it completes, so objects
    /// deleted while the watch was down are forgotten.
    relist: Option<HashMap<String, u64>>,
}

impl Changes {
    pub fn relevant<K: Resource + Fingerprint>(&mut self, ev: &Event<K>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(HashMap::new());
            }
            Event::InitApply(o) => {
                let relist = self.relist.get_or_insert_with(HashMap::new);
                if let Some(f) = o.fingerprint() {
                    relist.insert(key(o), f);
                }
            }
            Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.seen = r;
                }
            }
            Event::Apply(o) => {
                let Some(f) = o.fingerprint() else {
                    self.seen.remove(&key(o));
                    return true;
                };
                return self.seen.insert(key(o), f) != Some(f);
            }
            Event::Delete(o) => {
                self.seen.remove(&key(o));
            }
        }
        true
    }
}

/// Passes on the events of `events` that change what the operator reads (and every error).
pub fn only_changes<K, E, S>(events: S) -> impl Stream<Item = Result<Event<K>, E>> + Send
where
    K: Resource + Fingerprint + Send,
    E: Send,
    S: Stream<Item = Result<Event<K>, E>> + Send,
{
    let mut changes = Changes::default();
    events.filter(move |ev| {
        let pass = match ev {
            Ok(ev) => changes.relevant(ev),
            Err(_) => true,
        };
        std::future::ready(pass)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{plan_node, selects};
    use crate::testutil::{node as test_node, region};
    use k8s_openapi::api::core::v1::{ContainerImage, NodeCondition, PodCondition, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    fn fat_node() -> Node {
        let mut n = test_node(
            "a",
            &[("InternalIP", "10.0.0.1"), ("ExternalIP", "198.51.100.1")],
        );
        n.metadata.labels = Some([("derp".to_string(), "yes".to_string())].into());
        n.metadata.annotations = Some(
            [
                (
                    ANNOTATION_PUBLIC_IPV4.to_string(),
                    "203.0.113.9".to_string(),
                ),
                ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
            ]
            .into(),
        );
        n.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        n.metadata.resource_version = Some("1".into());
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            pod_cidr: Some("10.0.0.0/24".into()),
            ..Default::default()
        });
        let status = n.status.get_or_insert_with(Default::default);
        status.images = Some(vec![ContainerImage {
            names: Some(vec!["x".into()]),
            ..Default::default()
        }]);
        status.conditions = Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]);
        n
    }

    #[test]
    fn a_slim_node_selects_and_plans_like_the_full_one() {
        let full = fat_node();
        let mut slim = full.clone();
        node(&mut slim);
        assert!(slim.metadata.managed_fields.is_none());
        assert_eq!(
            slim.metadata.annotations.as_ref().map(|a| a.len()),
            Some(1),
            "only our annotations stay"
        );
        let st = slim.status.as_ref().unwrap();
        assert!(st.images.is_none() && st.conditions.is_none());
        let mut r = region("home", 900);
        for tolerate in [false, true] {
            r.spec.node_selector = [("derp".to_string(), "yes".to_string())].into();
            if tolerate {
                r.spec.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
                    key: Some("dedicated".into()),
                    operator: Some("Exists".into()),
                    ..Default::default()
                }];
            }
            assert_eq!(selects(&r.spec, &full), selects(&r.spec, &slim));
            assert_eq!(plan_node(&r.spec, &full), plan_node(&r.spec, &slim));
        }
    }

    fn pod_with(ready: &str, running: bool) -> Pod {
        let mut p = crate::offline::derper_pod(
            "derp",
            "home",
            "a",
            PodCondition {
                type_: "Ready".into(),
                status: ready.into(),
                ..Default::default()
            },
        );
        p.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        let st = p.status.get_or_insert_with(Default::default);
        st.phase = Some(if running { "Running" } else { "Pending" }.into());
        st.conditions
            .get_or_insert_with(Vec::new)
            .push(PodCondition {
                type_: "ContainersReady".into(),
                status: ready.into(),
                ..Default::default()
            });
        p
    }

    #[test]
    fn a_slim_pod_keeps_node_labels_and_ready() {
        let full = pod_with("True", true);
        let mut slim = full.clone();
        pod(&mut slim);
        assert_eq!(slim.metadata.labels, full.metadata.labels);
        assert_eq!(slim.metadata.namespace, full.metadata.namespace);
        assert_eq!(
            slim.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("a")
        );
        let conds = slim.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(conds.len(), 1);
        assert_eq!(
            (conds[0].type_.as_str(), conds[0].status.as_str()),
            ("Ready", "True")
        );
        assert!(slim.metadata.managed_fields.is_none());
    }

    #[test]
    fn only_changes_that_matter_pass() {
        let mut c = Changes::default();
        let p = |ready: &str, running: bool, rv: &str| {
            let mut p = pod_with(ready, running);
            pod(&mut p);
            p.metadata.resource_version = Some(rv.into());
            p
        };
        assert!(c.relevant(&Event::<Pod>::Init));
        assert!(c.relevant(&Event::InitApply(p("False", false, "1"))));
        assert!(c.relevant(&Event::<Pod>::InitDone));
        // Phase moved, Ready did not: slimmed away, nothing to do.
        assert!(!c.relevant(&Event::Apply(p("False", true, "2"))));
        assert!(c.relevant(&Event::Apply(p("True", true, "3"))));
        assert!(!c.relevant(&Event::Apply(p("True", true, "4"))));
        // A delete always counts, even of an unchanged object.
        assert!(c.relevant(&Event::Delete(p("True", true, "4"))));
        // Seen again after the delete: new.
        assert!(c.relevant(&Event::Apply(p("True", true, "5"))));

        // A DaemonSet's status is slimmed away: not a change.
        let mut d = DaemonSet::default();
        d.metadata.name = Some("home-derper".into());
        assert!(c.relevant(&Event::Apply(d.clone())));
        d.status = Some(Default::default());
        d.metadata.resource_version = Some("9".into());
        daemonset(&mut d);
        assert!(d.status.is_none());
        assert!(!c.relevant(&Event::Apply(d.clone())));
        d.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
        assert!(c.relevant(&Event::Apply(d)));
    }

    #[test]
    fn a_relist_forgets_objects_deleted_meanwhile() {
        let mut c = Changes::default();
        let mut n = fat_node();
        node(&mut n);
        assert!(c.relevant(&Event::Apply(n.clone())));
        assert!(c.relevant(&Event::<Node>::Init));
        assert!(c.relevant(&Event::<Node>::InitDone));
        // `a` was not in the relist: its next event is new.
        n.metadata.resource_version = Some("2".into());
        assert!(c.relevant(&Event::Apply(n)));
    }
}
