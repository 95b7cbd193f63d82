//! DERP-map types with the exact JSON names Tailscale's `tailcfg.DERPMap` uses. The YAML form
//! Headscale reads from `derp.paths` is the `headscale-yaml` crate's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// `tailcfg.DERPMap`. Regions are keyed by id; serialised as decimal strings in JSON, in
/// numeric order, so equal maps always render to identical bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpMap {
    #[serde(
        rename = "HomeParams",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub home_params: Option<DerpHomeParams>,
    #[serde(rename = "Regions", default)]
    pub regions: BTreeMap<u32, DerpRegion>,
    #[serde(
        rename = "omitDefaultRegions",
        default,
        skip_serializing_if = "is_false"
    )]
    pub omit_default_regions: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpHomeParams {
    #[serde(
        rename = "RegionScore",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub region_score: BTreeMap<u32, f64>,
}

/// `tailcfg.DERPRegion`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpRegion {
    #[serde(rename = "RegionID")]
    pub region_id: u32,
    #[serde(rename = "RegionCode", default)]
    pub region_code: String,
    #[serde(rename = "RegionName", default)]
    pub region_name: String,
    #[serde(rename = "Latitude", default, skip_serializing_if = "is_zero_f64")]
    pub latitude: f64,
    #[serde(rename = "Longitude", default, skip_serializing_if = "is_zero_f64")]
    pub longitude: f64,
    #[serde(rename = "Avoid", default, skip_serializing_if = "is_false")]
    pub avoid: bool,
    #[serde(rename = "NoMeasureNoHome", default, skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    #[serde(rename = "Nodes", default)]
    pub nodes: Vec<DerpNode>,
}

/// `tailcfg.DERPNode`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerpNode {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RegionID")]
    pub region_id: u32,
    #[serde(rename = "HostName")]
    pub host_name: String,
    #[serde(rename = "CertName", default, skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    #[serde(rename = "IPv4", default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(rename = "IPv6", default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    #[serde(rename = "STUNPort", default, skip_serializing_if = "is_zero_i64")]
    pub stun_port: i64,
    #[serde(rename = "STUNOnly", default, skip_serializing_if = "is_false")]
    pub stun_only: bool,
    #[serde(rename = "DERPPort", default, skip_serializing_if = "is_zero_i64")]
    pub derp_port: i64,
    #[serde(rename = "InsecureForTests", default, skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    #[serde(
        rename = "STUNTestIP",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub stun_test_ip: String,
    #[serde(rename = "CanPort80", default, skip_serializing_if = "is_false")]
    pub can_port80: bool,
}

/// `CertName` prefix for a pinned certificate: SHA-256 of the leaf DER, lowercase hex.
pub const SHA256_RAW_PREFIX: &str = "sha256-raw:";

impl DerpMap {
    /// Compact JSON, byte-identical for equal maps.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    pub fn to_json_pretty(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn json_uses_go_names_and_omits_zero_values() {
        let j = sample().to_json().unwrap();
        assert!(j.starts_with(r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"home","RegionName":"Home","Nodes":[{"Name":"900a","RegionID":900,"HostName":"198.51.100.1","CertName":"sha256-raw:"#), "{j}");
        assert!(
            !j.contains("InsecureForTests") && !j.contains("IPv6") && !j.contains("omitDefault")
        );
        let back: DerpMap = serde_json::from_str(&j).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn decodes_go_style_map() {
        let go = r#"{"Regions":{"1":{"RegionID":1,"RegionCode":"x","RegionName":"X","Nodes":[{"Name":"1a","RegionID":1,"HostName":"h","STUNPort":-1,"InsecureForTests":true}]}},"omitDefaultRegions":true}"#;
        let m: DerpMap = serde_json::from_str(go).unwrap();
        assert!(m.omit_default_regions);
        assert_eq!(m.regions[&1].nodes[0].stun_port, -1);
        assert_eq!(m.to_json().unwrap(), go);
    }
}
