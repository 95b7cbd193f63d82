//! A DERP map as the YAML file Headscale reads from `derp.paths`.
//!
//! Headscale decodes those files with yaml.v3 straight into tailcfg's Go structs, and yaml.v3
//! matches a struct field by its lower-cased Go name (it ignores the `json` tags), so the keys
//! here are `regions`, `regionid`, `hostname`, ... rather than the JSON map's `Regions`,
//! `RegionID`, `HostName`. The `Regions` and `RegionScore` maps are `map[int]...` in Go: their
//! keys must be YAML integers, not strings, or yaml.v3 refuses the file.
//!
//! Kept out of `derp-proto` so the wire-format crate carries no YAML dependency.

use derp_proto::derpmap::DerpMap;
use serde_json::Value as Json;
use yaml_serde::Value as Yaml;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the DERP map does not convert to JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the DERP map does not render as YAML: {0}")]
    Yaml(#[from] yaml_serde::Error),
}

/// The YAML text of `map` for a Headscale `derp.paths` file.
pub fn to_string(map: &DerpMap) -> Result<String, Error> {
    let json = serde_json::to_value(map)?;
    Ok(yaml_serde::to_string(&go_yaml_keys(json, false))?)
}

/// JSON → YAML with yaml.v3's key spelling; `int_keys` marks the children of a Go `map[int]`.
fn go_yaml_keys(value: Json, int_keys: bool) -> Yaml {
    match value {
        Json::Null => Yaml::Null,
        Json::Bool(b) => Yaml::Bool(b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Yaml::Number(i.into()),
            (None, Some(u), _) => Yaml::Number(u.into()),
            // serde_json only holds finite floats, so the last arm never loses a value.
            (None, None, Some(f)) => Yaml::Number(f.into()),
            (None, None, None) => Yaml::Null,
        },
        Json::String(s) => Yaml::String(s),
        Json::Array(items) => {
            Yaml::Sequence(items.into_iter().map(|x| go_yaml_keys(x, false)).collect())
        }
        Json::Object(fields) => {
            let mut out = yaml_serde::Mapping::new();
            for (key, val) in fields {
                let children_int = key == "Regions" || key == "RegionScore";
                let yaml_key = match (int_keys, key.parse::<i64>()) {
                    (true, Ok(i)) => Yaml::Number(i.into()),
                    _ => Yaml::String(key.to_ascii_lowercase()),
                };
                out.insert(yaml_key, go_yaml_keys(val, children_int));
            }
            Yaml::Mapping(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use derp_proto::derpmap::{DerpHomeParams, DerpNode, DerpRegion, SHA256_RAW_PREFIX};

    fn sample() -> DerpMap {
        let mut m = DerpMap::default();
        m.regions.insert(
            900,
            DerpRegion {
                region_id: 900,
                region_code: "home".into(),
                region_name: "Home".into(),
                nodes: vec![DerpNode {
                    name: "900a".into(),
                    region_id: 900,
                    host_name: "198.51.100.1".into(),
                    cert_name: format!("{SHA256_RAW_PREFIX}{}", "ab".repeat(32)),
                    ipv4: "198.51.100.1".into(),
                    stun_port: 3478,
                    derp_port: 443,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        m
    }

    #[test]
    fn keys_are_lowercase_and_region_ids_are_integers() {
        let y = to_string(&sample()).unwrap();
        assert!(
            y.starts_with("regions:\n  900:\n    regionid: 900\n    regioncode: home\n"),
            "{y}"
        );
        assert!(y.contains("      certname: sha256-raw:"), "{y}");
        assert!(y.contains("      stunport: 3478"), "{y}");
        assert!(!y.contains('\''), "{y}");
    }

    #[test]
    fn region_scores_are_keyed_by_integer_and_keep_fractions() {
        let mut m = sample();
        m.home_params = Some(DerpHomeParams {
            region_score: [(900, 0.5)].into(),
        });
        let y = to_string(&m).unwrap();
        assert!(
            y.contains("homeparams:\n  regionscore:\n    900: 0.5\n"),
            "{y}"
        );
    }

    #[test]
    fn yaml_reads_back_as_the_same_values() {
        let y = to_string(&sample()).unwrap();
        let back: Yaml = yaml_serde::from_str(&y).unwrap();
        let node = &back["regions"][900]["nodes"][0];
        assert_eq!(node["hostname"].as_str(), Some("198.51.100.1"));
        assert_eq!(node["derpport"].as_i64(), Some(443));
    }
}
