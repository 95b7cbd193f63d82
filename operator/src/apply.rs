//! Server-side apply of the objects a region owns, under one field manager, with a
//! compare-before-apply so a reconcile of unchanged input writes nothing.
//!
//! Each object we apply carries the hash of what we applied (`derpfleet.io/applied-hash`). An
//! apply is skipped when the existing object (from the watch cache) carries the same hash *and*
//! still holds every field we set with the value we set (so a hand edit of one of our fields is
//! reverted). The hash catches what the subset check cannot see: a field we stopped setting, which
//! only a new apply removes. Every apply request and every apply that changed the object (its
//! `resourceVersion` moved) is counted, so tests can prove that a restart churns nothing.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "derp-fleet-operator";
/// Annotation holding the hash of the applied object (without this annotation).
pub const ANNOTATION_APPLIED_HASH: &str = "derpfleet.io/applied-hash";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("serialising {kind} {name}: {source}")]
    Serialize {
        kind: String,
        name: String,
        source: serde_json::Error,
    },
    #[error("rendering {kind} {name}: {source}")]
    Render {
        kind: String,
        name: String,
        source: headscale_yaml::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Api {
        kind: String,
        name: String,
        source: kube::Error,
    },
}

/// Counts of what the operator wrote, for `/metrics` and the tests.
#[derive(Debug, Default)]
pub struct WriteCounters {
    /// Server-side apply requests sent (objects and status).
    pub apply_requests: AtomicU64,
    /// Applies after which the object's `resourceVersion` differed from the cached one.
    pub changed: AtomicU64,
    /// Applies skipped because the cache already held what we would apply.
    pub skipped: AtomicU64,
    /// Kubernetes Events published.
    pub events: AtomicU64,
    /// Delete requests for objects a region no longer renders (`prune.rs`).
    pub deletes: AtomicU64,
}

impl WriteCounters {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a delete request.
    pub fn count_delete(&self) {
        Self::add(&self.deletes);
    }
}

/// What one [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The cache already held it; nothing was sent.
    Unchanged,
    /// Sent; the server reported no change (same `resourceVersion`).
    NoOp,
    /// Sent and changed (or created).
    Changed,
}

/// Hex SHA-256 of the canonical JSON of `v` (serde_json sorts object keys).
pub fn hash_value(v: &Value) -> String {
    let digest = Sha256::digest(v.to_string().as_bytes());
    hex::encode(&digest[..16])
}

/// `desired` with its hash annotation set. The hash covers `desired` without the annotation.
pub fn stamp(mut desired: Value) -> Value {
    let h = hash_value(&desired);
    if let Some(meta) = desired.get_mut("metadata").and_then(Value::as_object_mut) {
        let ann = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(ann) = ann.as_object_mut() {
            ann.insert(ANNOTATION_APPLIED_HASH.into(), Value::String(h));
        }
    }
    desired
}

/// Whether every field of `want` is in `have` with the same value. Arrays must have the same
/// length and match element-wise (the API server adds defaults inside elements, never elements).
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, wv)| match h.get(k) {
            Some(hv) => contains(hv, wv),
            None => wv.is_null(),
        }),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv))
        }
        (h, w) => h == w,
    }
}

/// Whether `stamped` (from [`stamp`]) must be applied over `existing`.
pub fn needs_apply(stamped: &Value, existing: Option<&Value>) -> bool {
    let Some(existing) = existing else {
        return true;
    };
    let hash_of = |v: &Value| {
        v.pointer("/metadata/annotations")
            .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    hash_of(stamped) != hash_of(existing) || !contains(existing, stamped)
}

/// Applies `desired` with server-side apply (field manager [`FIELD_MANAGER`], forced) unless
/// `existing` (the cached object) already holds it.
pub async fn apply<K>(
    api: &Api<K>,
    desired: &K,
    existing: Option<&K>,
    counters: &Arc<WriteCounters>,
) -> Result<Applied, ApplyError>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let name = desired.name_any();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let ser = |source| ApplyError::Serialize {
        kind: kind.clone(),
        name: name.clone(),
        source,
    };
    let want = stamp(serde_json::to_value(desired).map_err(ser)?);
    let have = existing
        .map(serde_json::to_value)
        .transpose()
        .map_err(ser)?;
    apply_value(api, &name, &kind, want, have.as_ref(), counters).await
}

/// [`apply`] for an already serialised object (dynamic kinds such as cert-manager's Certificate).
pub async fn apply_value<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    stamped: Value,
    existing: Option<&Value>,
    counters: &Arc<WriteCounters>,
) -> Result<Applied, ApplyError>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    if !needs_apply(&stamped, existing) {
        WriteCounters::add(&counters.skipped);
        return Ok(Applied::Unchanged);
    }
    WriteCounters::add(&counters.apply_requests);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let out = api
        .patch(name, &pp, &Patch::Apply(&stamped))
        .await
        .map_err(|source| ApplyError::Api {
            kind: kind.to_string(),
            name: name.to_string(),
            source,
        })?;
    let old_rv = existing
        .and_then(|e| e.pointer("/metadata/resourceVersion"))
        .and_then(Value::as_str);
    if old_rv.is_some() && old_rv == out.meta().resource_version.as_deref() {
        Ok(Applied::NoOp)
    } else {
        WriteCounters::add(&counters.changed);
        tracing::info!(kind, name, "applied");
        Ok(Applied::Changed)
    }
}

/// Counts a status apply (done by the controller, which decides on its own whether one is due).
pub fn count_status_write(counters: &WriteCounters) {
    WriteCounters::add(&counters.apply_requests);
    WriteCounters::add(&counters.changed);
}

/// Counts a published Event.
pub fn count_event(counters: &WriteCounters) {
    WriteCounters::add(&counters.events);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_defaults_but_not_changed_values() {
        let want = json!({"spec": {"a": 1, "list": [{"name": "x"}]}});
        let have = json!({"spec": {"a": 1, "b": 2, "list": [{"name": "x", "default": true}]}});
        assert!(contains(&have, &want));
        assert!(!contains(
            &json!({"spec": {"a": 2, "list": [{"name": "x"}]}}),
            &want
        ));
        assert!(!contains(
            &json!({"spec": {"a": 1, "list": [{"name": "x"}, {"name": "y"}]}}),
            &want
        ));
        assert!(!contains(&json!({"spec": {}}), &want));
    }

    #[test]
    fn stamped_object_needs_no_apply_when_cache_holds_it_with_defaults() {
        let want =
            stamp(json!({"metadata": {"name": "n", "labels": {"a": "b"}}, "data": {"k": "v"}}));
        assert!(needs_apply(&want, None));
        let mut have = want.clone();
        have["metadata"]["resourceVersion"] = json!("7");
        have["metadata"]["uid"] = json!("u");
        assert!(!needs_apply(&want, Some(&have)));
        // A field we no longer set: same subset, different hash → apply (SSA removes it).
        let fewer = stamp(json!({"metadata": {"name": "n", "labels": {"a": "b"}}}));
        assert!(needs_apply(&fewer, Some(&have)));
        // A hand edit of one of our fields: same hash, subset fails → apply (reverted).
        have["data"]["k"] = json!("edited");
        assert!(needs_apply(&want, Some(&have)));
    }

    #[test]
    fn hash_is_stable_and_excludes_itself() {
        let v = json!({"metadata": {"name": "n"}, "spec": {"x": [1, 2]}});
        let a = stamp(v.clone());
        let b = stamp(v);
        assert_eq!(a, b);
        assert_eq!(
            a["metadata"]["annotations"][ANNOTATION_APPLIED_HASH],
            json!(hash_value(
                &json!({"metadata": {"name": "n"}, "spec": {"x": [1, 2]}})
            ))
        );
    }
}
