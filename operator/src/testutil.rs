//! Builders for test fixtures shared by the unit tests.

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{DerpRegion, DerpRegionSpec};

/// A region `derp/<name>` with id `id`, code = name, self-signed pinned TLS, `SharedRegion` (the
/// mode these fixtures were written for: ids and codes conflict, nodes mesh; the per-node tests
/// set `RegionPerNode`), defaults elsewhere.
pub fn region(name: &str, id: i64) -> DerpRegion {
    let spec: DerpRegionSpec = serde_json::from_value(serde_json::json!({
        "regionId": id, "code": name, "tls": {"selfSigned": {}},
        "publish": {"mode": "SharedRegion"}
    }))
    .unwrap();
    let mut r = DerpRegion::new(name, spec);
    r.metadata.namespace = Some("derp".into());
    r.metadata.uid = Some(format!("uid-{name}"));
    r
}

/// A Node with the given `(type, address)` pairs.
pub fn node(name: &str, addrs: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: (*t).into(),
                        address: (*a).into(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}
