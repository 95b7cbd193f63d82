//! Rendering offline, for the `operator render` command: read DerpRegions and Nodes from YAML
//! files, render (with `render.rs`, the controller's pure renderer) what the controller would
//! apply, and build the map entry the region would get once every selected node's derper is
//! Ready. Also what the golden tests under `tests/golden/` compare.

use std::collections::BTreeSet;
use std::sync::Arc;

use derp_proto::derpmap::DerpMap;
use k8s_openapi::api::core::v1::{Node, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use rand::RngCore;
use serde::Deserialize;

use crate::crd::DerpRegion;
use crate::mapbuild::{MapConfig, MapInput, build_map};
use crate::render::{RenderContext, Rendered, common_labels, render};
use crate::select::plan_nodes;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("YAML document {index}: {source}")]
    Yaml {
        index: usize,
        source: yaml_serde::Error,
    },
    #[error("YAML document {index} has no kind (expected DerpRegion, Node or a List of them)")]
    Kind { index: usize, kind: String },
    #[error(transparent)]
    Render(#[from] crate::render::RenderError),
    #[error("clock: {0}")]
    Clock(String),
}

/// DerpRegions and Nodes found in a YAML stream (documents, or `List`s of them).
#[derive(Debug, Default)]
pub struct Objects {
    pub regions: Vec<DerpRegion>,
    pub nodes: Vec<Node>,
    /// Other kinds in the stream (a Namespace, an Issuer...), skipped: `kind name` each.
    pub skipped: Vec<String>,
}

/// Parses every document of `text`; `kind: List` (as `kubectl get -o yaml` prints) is unpacked.
pub fn parse_objects(text: &str) -> Result<Objects, OfflineError> {
    let mut out = Objects::default();
    for (index, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let v = yaml_serde::Value::deserialize(doc)
            .map_err(|source| OfflineError::Yaml { index, source })?;
        if v.is_null() {
            continue;
        }
        push_object(&mut out, v, index)?;
    }
    Ok(out)
}

fn push_object(out: &mut Objects, v: yaml_serde::Value, index: usize) -> Result<(), OfflineError> {
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let yaml = |source| OfflineError::Yaml { index, source };
    match kind.as_str() {
        "DerpRegion" => {
            let mut r: DerpRegion = yaml_serde::from_value(v).map_err(yaml)?;
            if r.metadata.namespace.is_none() {
                r.metadata.namespace = Some("default".into());
            }
            out.regions.push(r);
        }
        "Node" => out.nodes.push(yaml_serde::from_value(v).map_err(yaml)?),
        k if k.ends_with("List") => {
            if let Some(items) = v.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    push_object(out, item, index)?;
                }
            }
        }
        "" => return Err(OfflineError::Kind { index, kind }),
        _ => {
            // Example files carry their Namespace or Issuer; rendering needs only regions.
            let name = v
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("?");
            out.skipped.push(format!("{kind} {name}"));
        }
    }
    Ok(())
}

/// What one region would become.
#[derive(Debug, Clone)]
pub struct OfflineRender {
    pub rendered: Rendered,
    /// The map with this region alone, every selected node Ready.
    pub map: DerpMap,
}

/// Renders `region` over `nodes` as if it had just been created, and the map entry it would get
/// once every selected derper is Ready.
pub fn render_offline(
    region: &DerpRegion,
    nodes: &[Node],
    now_unix: i64,
    rng: &mut dyn RngCore,
) -> Result<OfflineRender, OfflineError> {
    let rendered = render(
        region,
        &RenderContext {
            nodes,
            existing_mesh_key: None,
            existing_tls: None,
            now_unix,
        },
        rng,
    )?;
    let now = Timestamp::from_second(now_unix).map_err(|e| OfflineError::Clock(e.to_string()))?;
    let pods: Vec<Pod> = plan_nodes(&region.spec, nodes)
        .into_iter()
        .map(|p| ready_pod(region, &p.node_name))
        .collect();
    let secrets: Vec<_> = rendered.tls_secret.iter().cloned().map(Arc::new).collect();
    let nodes: Vec<Arc<Node>> = nodes.iter().cloned().map(Arc::new).collect();
    let pods: Vec<Arc<Pod>> = pods.into_iter().map(Arc::new).collect();
    let out = build_map(
        &MapInput {
            regions: &[Arc::new(region.clone())],
            nodes: &nodes,
            pods: &pods,
            secrets: &secrets,
            previously_published: &BTreeSet::new(),
            unready_since: &Default::default(),
            now,
            probe_failing: &BTreeSet::new(),
        },
        &MapConfig::default(),
    );
    Ok(OfflineRender {
        rendered,
        map: out.map,
    })
}

fn ready_pod(region: &DerpRegion, node: &str) -> Pod {
    derper_pod(
        &region.namespace().unwrap_or_default(),
        &region.name_any(),
        node,
        PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        },
    )
}

/// A derper pod of region `namespace/region` on `node` with the given Ready condition.
pub(crate) fn derper_pod(namespace: &str, region: &str, node: &str, ready: PodCondition) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{region}-derper-{node}")),
            namespace: Some(namespace.into()),
            labels: Some(common_labels(region)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            conditions: Some(vec![ready]),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod golden {
    //! Golden YAML of every rendered object and the map entry, one file per case under
    //! `operator/tests/golden/`. Regenerate with `UPDATE_GOLDEN=1 cargo test -p operator golden`.

    use super::*;
    use rand::SeedableRng;

    const NOW: i64 = 1_790_000_000;

    fn dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
    }

    /// Rendered objects as a YAML stream, then the map as JSON and as Headscale YAML. Generated
    /// certificate material is random (ECDSA), so it is replaced by a marker and the pin by a
    /// fixed string; the unit tests check those separately.
    fn golden_text(p: &OfflineRender) -> String {
        let mut s = String::new();
        let pin_marker = "sha256-raw:<pin of the generated certificate>";
        for mut v in p.rendered.to_values().unwrap() {
            if v["type"] == "kubernetes.io/tls" {
                v["data"]["tls.crt"] = "<generated>".into();
                v["data"]["tls.key"] = "<generated>".into();
            }
            s.push_str("---\n");
            s.push_str(&yaml_serde::to_string(&v).unwrap());
        }
        let mut map = p.map.clone();
        for r in map.regions.values_mut() {
            for n in &mut r.nodes {
                if n.cert_name.starts_with("sha256-raw:") {
                    n.cert_name = pin_marker.into();
                }
            }
        }
        s.push_str("# derpmap.json\n");
        for line in map.to_json_pretty().unwrap().lines() {
            s.push_str("# ");
            s.push_str(line);
            s.push('\n');
        }
        s.push_str("# Headscale derp.paths\n");
        for line in headscale_yaml::to_string(&map).unwrap().lines() {
            s.push_str("# ");
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    #[test]
    fn golden_cases() {
        let nodes = parse_objects(&std::fs::read_to_string(dir().join("nodes.yaml")).unwrap())
            .unwrap()
            .nodes;
        let mut cases: Vec<_> = std::fs::read_dir(dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".region.yaml"))
            .collect();
        cases.sort();
        assert!(cases.len() >= 3, "golden cases missing in {:?}", dir());
        let update = std::env::var_os("UPDATE_GOLDEN").is_some();
        let mut stale = Vec::new();
        for case in cases {
            let objs = parse_objects(&std::fs::read_to_string(&case).unwrap()).unwrap();
            let region = &objs.regions[0];
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            let p = render_offline(region, &nodes, NOW, &mut rng).unwrap();
            let text = golden_text(&p);
            let out = case.with_file_name(
                case.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .replace(".region.yaml", ".golden.yaml"),
            );
            if update {
                std::fs::write(&out, &text).unwrap();
            } else if std::fs::read_to_string(&out).unwrap_or_default() != text {
                stale.push(out.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "golden files differ: {stale:?}; review the change and regenerate with \
             `UPDATE_GOLDEN=1 cargo test -p operator golden`"
        );
    }
}
