//! The `operator` binary's offline commands: `crd` prints the checked-in CRD, `render` prints
//! the objects and map entry of the golden fixtures in every format.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn operator(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_operator"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn crd_prints_the_checked_in_file() {
    let want = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/derpregions.derpfleet.io.yaml"
    ))
    .unwrap();
    assert_eq!(operator(&["crd"]), want);
}

#[test]
fn render_prints_objects_and_map_in_every_format() {
    let f = "tests/golden/selfsigned-ip.region.yaml";
    let nodes = "tests/golden/nodes.yaml";
    let yaml = operator(&["render", "-f", f, "--nodes", nodes]);
    for kind in [
        "kind: DaemonSet",
        "kind: ConfigMap",
        "kind: Secret",
        "# DERP map",
    ] {
        assert!(yaml.contains(kind), "{kind} missing:\n{yaml}");
    }
    let json: serde_json::Value = serde_json::from_str(&operator(&[
        "render", "-f", f, "--nodes", nodes, "--format", "json",
    ]))
    .unwrap();
    assert_eq!(json["objects"].as_array().unwrap().len(), 4);
    let nodes_json = json["derpMap"]["Regions"]["900"]["Nodes"]
        .as_array()
        .unwrap();
    assert_eq!(nodes_json.len(), 3);
    assert!(
        nodes_json[0]["CertName"]
            .as_str()
            .unwrap()
            .starts_with("sha256-raw:")
    );
    let hs = operator(&["render", "-f", f, "--nodes", nodes, "--format", "headscale"]);
    assert!(hs.starts_with("regions:\n  900:\n"), "{hs}");
    let map: derp_proto::derpmap::DerpMap = serde_json::from_str(&operator(&[
        "render", "-f", f, "--nodes", nodes, "--format", "map",
    ]))
    .unwrap();
    assert_eq!(map.regions[&900].nodes[2].name, "900-worker-1");
}
