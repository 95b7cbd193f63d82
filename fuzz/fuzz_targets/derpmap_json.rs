//! DERP-map JSON as clients and the operator decode it (`tailcfg.DERPMap` field names), then
//! every rendering we produce from it (compact and pretty JSON, Headscale YAML); the compact
//! JSON must decode again.
#![no_main]

use derp_proto::derpmap::DerpMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<DerpMap>(data) else {
        return;
    };
    let json = m
        .to_json()
        .unwrap_or_else(|e| panic!("a decoded map does not encode: {e}"));
    if let Err(e) = m.to_json_pretty() {
        panic!("a decoded map does not encode pretty: {e}");
    }
    if let Err(e) = headscale_yaml::to_string(&m) {
        panic!("a decoded map does not render as Headscale YAML: {e}");
    }
    let back: DerpMap = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("our own JSON {json} does not decode: {e}"));
    assert_eq!(back.regions.len(), m.regions.len());
});
