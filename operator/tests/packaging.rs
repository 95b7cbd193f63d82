//! The packaging stays true to the operator: the Helm chart's CRD is the generated one, and every
//! DerpRegion we ship as an example (`manifests/examples/`, the chart's `exampleRegion`) is one
//! the API server accepts: it deserialises into [`DerpRegion`], has no field the CRD's schema
//! lacks, matches the schema's types, enums and bounds, and passes its CEL rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use derp_operator::crd::DerpRegion;
use kube::CustomResourceExt;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let generated = read("crds/derpregions.derpfleet.io.yaml");
    let chart = read("charts/derp-fleet/crds/derpregions.derpfleet.io.yaml");
    assert!(
        chart == generated,
        "charts/derp-fleet/crds/derpregions.derpfleet.io.yaml is stale: \
         cp crds/derpregions.derpfleet.io.yaml charts/derp-fleet/crds/"
    );
    assert_eq!(generated, derp_operator::crd::crd_yaml().unwrap());
    // Nothing else in the chart's crds/ (Helm installs every file there).
    let names: Vec<_> = std::fs::read_dir(repo().join("charts/derp-fleet/crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["derpregions.derpfleet.io.yaml"]);
}

fn schema() -> Value {
    let crd = DerpRegion::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// Structural checks of `v` against an OpenAPI v3 schema node (the subset the API server applies
/// that our CRD uses: type, nullable, enum, properties with no unknown fields, required, items,
/// additionalProperties, int-or-string, numeric and length bounds). Appends `path: problem`.
fn check(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let s = |k: &str| schema.get(k);
    if v.is_null() && s("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if s("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            errs.push(format!("{path}: want integer or string, got {v}"));
        }
        return;
    }
    if s("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    let ty = s("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errs.push(format!("{path}: want {}, got {v}", ty.unwrap_or("?")));
        return;
    }
    if let Some(e) = s("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errs.push(format!("{path}: {v} is not one of {e:?}"));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s("minimum").and_then(Value::as_f64)
            && n < min
        {
            errs.push(format!("{path}: {n} < minimum {min}"));
        }
        if let Some(max) = s("maximum").and_then(Value::as_f64)
            && n > max
        {
            errs.push(format!("{path}: {n} > maximum {max}"));
        }
    }
    if let Some(t) = v.as_str() {
        let len = t.chars().count() as u64;
        if s("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            errs.push(format!("{path}: longer than maxLength"));
        }
        if s("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            errs.push(format!("{path}: shorter than minLength"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if s("minItems").and_then(Value::as_u64).is_some_and(|m| n < m) {
            errs.push(format!("{path}: fewer than minItems"));
        }
        if s("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m) {
            errs.push(format!("{path}: more than maxItems"));
        }
        if let Some(item) = s("items") {
            for (i, x) in items.iter().enumerate() {
                check(item, x, &format!("{path}[{i}]"), errs);
            }
        }
    }
    if let Some(obj) = v.as_object() {
        for r in s("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{path}: missing required field {r}"));
            }
        }
        let props = s("properties").and_then(Value::as_object);
        let extra = s("additionalProperties");
        for (k, x) in obj {
            let p = format!("{path}.{k}");
            match (props.and_then(|p| p.get(k)), extra) {
                (Some(sub), _) => check(sub, x, &p, errs),
                (None, Some(sub)) if sub.is_object() => check(sub, x, &p, errs),
                (None, Some(Value::Bool(true))) => {}
                // metadata is the API server's (ObjectMeta), not in the CRD schema.
                (None, _)
                    if path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) => {}
                (None, _) => errs.push(format!("{p}: unknown field (the CRD has no such field)")),
            }
        }
    }
}

/// Every problem the API server would report for this DerpRegion (empty when it is accepted).
fn problems(obj: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    if let Err(e) = serde_json::from_value::<DerpRegion>(obj.clone()) {
        errs.push(format!("does not deserialise into DerpRegion: {e}"));
    }
    let schema = schema();
    check(&schema, obj, "", &mut errs);
    if let Err(e) = kube::core::cel::Validator::new().validate(&schema, obj, None) {
        errs.extend(
            e.into_vec()
                .into_iter()
                .map(|e| format!("CEL: {}", e.message)),
        );
    }
    errs
}

/// The DerpRegions of a multi-document YAML file, as JSON.
fn regions_in(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| v.get("kind").and_then(Value::as_str) == Some("DerpRegion"))
        .collect()
}

#[test]
fn example_regions_pass_the_crd_validation() {
    let dir = repo().join("manifests/examples");
    let mut seen = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        for r in regions_in(&std::fs::read_to_string(&f).unwrap()) {
            let errs = problems(&r);
            assert!(errs.is_empty(), "{}: {errs:#?}", f.display());
            assert_eq!(r["apiVersion"], "derpfleet.io/v1alpha1", "{}", f.display());
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the self-signed and cert-manager example regions"
    );
}

#[test]
fn chart_example_region_passes_the_crd_validation() {
    let values: Value = yaml_serde::from_str(&read("charts/derp-fleet/values.yaml")).unwrap();
    let region = serde_json::json!({
        "apiVersion": "derpfleet.io/v1alpha1",
        "kind": "DerpRegion",
        "metadata": {"name": values["exampleRegion"]["name"], "namespace": "derp-fleet"},
        "spec": values["exampleRegion"]["spec"],
    });
    let errs = problems(&region);
    assert!(errs.is_empty(), "values.yaml exampleRegion: {errs:#?}");
}

#[test]
fn the_checker_refuses_bad_regions() {
    let good = serde_json::json!({
        "apiVersion": "derpfleet.io/v1alpha1", "kind": "DerpRegion",
        "metadata": {"name": "r", "namespace": "derp"},
        "spec": {"regionId": 900, "code": "home", "tls": {"selfSigned": {}}},
    });
    assert_eq!(problems(&good), Vec::<String>::new());
    let bad = |patch: Value| {
        let mut r = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            r["spec"][k] = v.clone();
        }
        problems(&r)
    };
    let has = |errs: Vec<String>, needle: &str| {
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "{needle}: {errs:#?}"
        );
    };
    has(bad(serde_json::json!({"regionID": 1})), "unknown field");
    has(
        bad(serde_json::json!({"addressTypes": ["PublicIP"]})),
        "is not one of",
    );
    has(bad(serde_json::json!({"addressTypes": []})), "minItems");
    has(
        bad(serde_json::json!({"hostnameTemplate": "derp.example.com"})),
        "CEL",
    );
    has(
        bad(serde_json::json!({"tls": {"selfSigned": {}, "secretName": "x"}})),
        "CEL",
    );
    has(bad(serde_json::json!({"regionId": "900"})), "want integer");
}
