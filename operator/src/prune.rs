//! Deleting the objects a region no longer renders: the mesh key Secret and peers ConfigMap when
//! the mesh is turned off, the self-signed Secret when TLS moves away from `selfSigned`, the
//! cert-manager `Certificate` (and the Secret cert-manager issued for it) when `issuerRef` goes.
//!
//! Only objects the region owns are touched: they carry our labels (`managed-by=derp-fleet`,
//! `derpfleet.io/region=<name>`) *and* a controller owner reference to the region's uid. The one
//! exception is the Secret cert-manager writes for our Certificate: cert-manager sets no owner
//! reference, so it counts as ours when it carries our labels (from the Certificate's
//! `secretTemplate`) and cert-manager's `cert-manager.io/certificate-name` annotation naming our
//! Certificate. The decision is pure ([`stale`]); [`delete`] does the I/O.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::apply::WriteCounters;
use crate::crd::DerpRegion;
use crate::render::{
    LABEL_MANAGED_BY, LABEL_REGION, MANAGER_NAME, certificate_name, mesh_key_secret_name,
    mesh_peers_configmap_name,
};

/// cert-manager's annotation on the Secret it issues, naming the Certificate.
pub const ANNOTATION_CERTIFICATE_NAME: &str = "cert-manager.io/certificate-name";

/// The kinds a region may stop rendering (the DaemonSet always exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Secret,
    ConfigMap,
    Certificate,
}

/// An object to delete, with the uid it must still have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub kind: Kind,
    pub name: String,
    pub uid: Option<String>,
    /// Why, for the log.
    pub why: &'static str,
}

/// Names of `kind` the region's current spec keeps. Independent of the nodes: a region with no
/// node selected right now keeps its certificate and mesh key for when one comes back.
fn wanted(region: &DerpRegion, kind: Kind) -> Vec<String> {
    let name = region.name_any();
    let spec = &region.spec;
    let mut out = Vec::new();
    match kind {
        Kind::Secret => {
            if spec.meshed() {
                out.push(mesh_key_secret_name(&name));
            }
            // Self-signed: ours; issuerRef: cert-manager's (same name).
            if spec.tls.self_signed.is_some() || spec.tls.issuer_ref.is_some() {
                out.push(certificate_name(&name));
            }
            if let Some(s) = &spec.tls.secret_name {
                out.push(s.clone());
            }
        }
        Kind::ConfigMap => {
            if spec.meshed() {
                out.push(mesh_peers_configmap_name(&name));
            }
        }
        Kind::Certificate => {
            if spec.tls.issuer_ref.is_some() {
                out.push(certificate_name(&name));
            }
        }
    }
    out
}

fn labelled_for(meta: &ObjectMeta, region: &DerpRegion) -> bool {
    let labels = meta.labels.as_ref();
    let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    meta.namespace == region.metadata.namespace
        && get(LABEL_MANAGED_BY) == Some(MANAGER_NAME)
        && get(LABEL_REGION) == Some(region.name_any().as_str())
}

fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid && o.kind == "DerpRegion")
}

/// Objects of `kind` (from the watch caches) that `region` owns and no longer wants.
pub fn stale<'a>(
    region: &DerpRegion,
    kind: Kind,
    objects: impl IntoIterator<Item = &'a ObjectMeta>,
) -> Vec<Stale> {
    let Some(uid) = region.metadata.uid.as_deref() else {
        return Vec::new();
    };
    if region.metadata.deletion_timestamp.is_some() {
        return Vec::new(); // the garbage collector's job
    }
    let keep = wanted(region, kind);
    let cert = certificate_name(&region.name_any());
    let mut out: Vec<Stale> = objects
        .into_iter()
        .filter(|m| labelled_for(m, region))
        .filter(|m| m.deletion_timestamp.is_none())
        .filter_map(|m| {
            let name = m.name.clone()?;
            if keep.contains(&name) {
                return None;
            }
            let issued_for_us = kind == Kind::Secret
                && m.annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_CERTIFICATE_NAME))
                    == Some(&cert);
            if !controlled_by(m, uid) && !issued_for_us {
                return None;
            }
            let why = match kind {
                Kind::ConfigMap => "the mesh is off",
                Kind::Certificate => "tls.issuerRef was removed",
                Kind::Secret if issued_for_us => "tls.issuerRef was removed",
                Kind::Secret if name == cert => "tls.selfSigned was removed",
                Kind::Secret if name == mesh_key_secret_name(&region.name_any()) => {
                    "the mesh is off"
                }
                Kind::Secret => "no longer rendered",
            };
            Some(Stale {
                kind,
                name,
                uid: m.uid.clone(),
                why,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Deletes `what` with a uid precondition (a recreated object of the same name is left alone);
/// an object already gone counts as deleted. Returns whether a delete request changed anything.
pub async fn delete<K>(
    api: &Api<K>,
    what: &Stale,
    counters: &Arc<WriteCounters>,
) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        preconditions: what.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    counters.count_delete();
    match api.delete(&what.name, &dp).await {
        Ok(_) => {
            info!(kind = ?what.kind, name = %what.name, why = what.why, "deleted an object the region no longer uses");
            Ok(true)
        }
        // Gone already, or replaced by another object of the same name (uid precondition).
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        // No `delete` verb in the operator's RBAC: the leftover is harmless (nothing mounts it
        // any more), so say so and let the reconcile finish rather than fail it every time.
        Err(kube::Error::Api(e)) if e.code == 403 => {
            warn!(kind = ?what.kind, name = %what.name, why = what.why, "not allowed to delete an object the region no longer uses (grant `delete` to the operator): {}", e.message);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Deletes every object of `kind` in `cache` that [`stale`] finds for `region`.
pub async fn prune_kind<K>(
    region: &DerpRegion,
    kind: Kind,
    cache: &Store<K>,
    api: &Api<K>,
    counters: &Arc<WriteCounters>,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let objects = cache.state();
    for s in stale(region, kind, objects.iter().map(|o| o.meta())) {
        delete(api, &s, counters).await?;
    }
    Ok(())
}

/// The Secret cert-manager issued for the region's Certificate, when nothing owns it yet: its
/// name and resourceVersion. cert-manager sets no owner reference on the Secrets it writes
/// (unless it runs with `--enable-certificate-owner-ref`), so deleting the region would leave the
/// Secret behind, key and all (tests/e2e_faults.rs found it: a deleted `issuerRef` region's
/// Secret survived). A Secret with any owner already is left alone: cert-manager's own
/// reference, when it sets one, makes the garbage collector remove it with the Certificate.
pub fn unowned_issued_secret<'a>(
    region: &DerpRegion,
    secrets: impl IntoIterator<Item = &'a ObjectMeta>,
) -> Option<(String, Option<String>)> {
    region.metadata.uid.as_deref()?;
    if region.spec.tls.issuer_ref.is_none() || region.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let cert = certificate_name(&region.name_any());
    secrets
        .into_iter()
        .filter(|m| labelled_for(m, region) && m.deletion_timestamp.is_none())
        .filter(|m| m.name.as_deref() == Some(cert.as_str()))
        .filter(|m| {
            m.annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_CERTIFICATE_NAME))
                == Some(&cert)
        })
        .find(|m| m.owner_references.as_ref().is_none_or(Vec::is_empty))
        .map(|m| (cert.clone(), m.resource_version.clone()))
}

/// Makes the region an owner (not the controller: cert-manager may claim that) of the Secret
/// cert-manager issued for it, so the garbage collector deletes the Secret with the region. A
/// merge patch guarded by the cached resourceVersion: if the Secret moved meanwhile, the next
/// reconcile looks again. Returns whether the Secret was changed.
pub async fn adopt_issued_secret(
    region: &DerpRegion,
    cache: &Store<k8s_openapi::api::core::v1::Secret>,
    api: &Api<k8s_openapi::api::core::v1::Secret>,
    counters: &Arc<WriteCounters>,
) -> Result<bool, kube::Error> {
    let objects = cache.state();
    let Some((name, rv)) = unowned_issued_secret(region, objects.iter().map(|o| o.meta())) else {
        return Ok(false);
    };
    let Some(mut owner) = region.controller_owner_ref(&()) else {
        return Ok(false);
    };
    owner.controller = Some(false);
    owner.block_owner_deletion = None;
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": rv, "ownerReferences": [owner]}
    });
    crate::apply::count_status_write(counters);
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(secret = %name, "the region now owns the Secret cert-manager issued for it (deleted with the region)");
            Ok(true)
        }
        // Changed or gone meanwhile: the watch brings the new state and another reconcile.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(false),
        Err(kube::Error::Api(e)) if e.code == 403 => {
            warn!(secret = %name, "not allowed to patch the Secret cert-manager issued (grant `patch` on Secrets); it will outlive its region: {}", e.message);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::common_labels;
    use crate::testutil::region;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn meta(r: &DerpRegion, name: &str, owned: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("derp".into()),
            uid: Some(format!("uid-of-{name}")),
            labels: Some(common_labels(&r.name_any())),
            owner_references: owned.then(|| vec![r.controller_owner_ref(&()).unwrap()]),
            ..Default::default()
        }
    }

    fn names(s: &[Stale]) -> Vec<&str> {
        s.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn mesh_off_deletes_its_secret_and_configmap_only() {
        let mut r = region("home", 900);
        let secrets = [
            meta(&r, "home-derper-mesh-key", true),
            meta(&r, "home-derper-tls", true),
        ];
        let cms = [meta(&r, "home-derper-mesh-peers", true)];
        assert!(stale(&r, Kind::Secret, &secrets).is_empty());
        assert!(stale(&r, Kind::ConfigMap, &cms).is_empty());
        r.spec.mesh.enabled = false;
        assert_eq!(
            names(&stale(&r, Kind::Secret, &secrets)),
            ["home-derper-mesh-key"]
        );
        let s = stale(&r, Kind::ConfigMap, &cms);
        assert_eq!(names(&s), ["home-derper-mesh-peers"]);
        assert_eq!(s[0].uid.as_deref(), Some("uid-of-home-derper-mesh-peers"));
        // One region per node: no mesh, whatever mesh.enabled says.
        r.spec.mesh.enabled = true;
        r.spec.publish.mode = crate::crd::PublishMode::RegionPerNode;
        assert_eq!(
            names(&stale(&r, Kind::Secret, &secrets)),
            ["home-derper-mesh-key"]
        );
        assert_eq!(
            names(&stale(&r, Kind::ConfigMap, &cms)),
            ["home-derper-mesh-peers"]
        );
    }

    #[test]
    fn only_an_unowned_secret_issued_for_our_certificate_is_adopted() {
        let mut r = region("home", 900);
        let mut issued = meta(&r, "home-derper-tls", false);
        issued.annotations = Some(
            [(
                ANNOTATION_CERTIFICATE_NAME.to_string(),
                "home-derper-tls".to_string(),
            )]
            .into(),
        );
        issued.resource_version = Some("7".into());
        // Self-signed: the Secret is ours already, nothing to adopt.
        assert_eq!(unowned_issued_secret(&r, [&issued]), None);
        r.spec.tls.self_signed = None;
        r.spec.tls.issuer_ref = Some(crate::crd::IssuerRef {
            name: "ca".into(),
            kind: crate::crd::IssuerKind::Issuer,
            group: "cert-manager.io".into(),
        });
        assert_eq!(
            unowned_issued_secret(&r, [&issued]),
            Some(("home-derper-tls".into(), Some("7".into())))
        );
        // Owned already (by us, or by cert-manager's Certificate reference): left alone.
        let owned = ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                uid: "cert-uid".into(),
                ..Default::default()
            }]),
            ..issued.clone()
        };
        assert_eq!(unowned_issued_secret(&r, [&owned]), None);
        // Not issued for our Certificate, or not labelled for this region: not ours to adopt.
        let mut other = issued.clone();
        other.annotations =
            Some([(ANNOTATION_CERTIFICATE_NAME.to_string(), "x".to_string())].into());
        assert_eq!(unowned_issued_secret(&r, [&other]), None);
        let mut unlabelled = issued.clone();
        unlabelled.labels = None;
        assert_eq!(unowned_issued_secret(&r, [&unlabelled]), None);
        // A region being deleted adopts nothing (the garbage collector is at work).
        r.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(unowned_issued_secret(&r, [&issued]), None);
    }

    #[test]
    fn tls_mode_changes_delete_the_old_mode_objects() {
        let mut r = region("home", 900);
        let secrets = [meta(&r, "home-derper-tls", true)];
        // selfSigned -> secretName: our self-signed Secret goes.
        r.spec.tls.self_signed = None;
        r.spec.tls.secret_name = Some("user-tls".into());
        let s = stale(&r, Kind::Secret, &secrets);
        assert_eq!(names(&s), ["home-derper-tls"]);
        assert_eq!(s[0].why, "tls.selfSigned was removed");
        // -> issuerRef: the same name is cert-manager's Secret now: kept.
        r.spec.tls.secret_name = None;
        r.spec.tls.issuer_ref = Some(crate::crd::IssuerRef {
            name: "ca".into(),
            kind: crate::crd::IssuerKind::Issuer,
            group: "cert-manager.io".into(),
        });
        assert!(stale(&r, Kind::Secret, &secrets).is_empty());
        let certs = [meta(&r, "home-derper-tls", true)];
        assert!(stale(&r, Kind::Certificate, &certs).is_empty());
        // issuerRef -> secretName: the Certificate goes, and the Secret cert-manager issued for
        // it (no owner reference, but our labels and its certificate-name annotation).
        let mut issued = meta(&r, "home-derper-tls", false);
        issued.annotations = Some(
            [(
                ANNOTATION_CERTIFICATE_NAME.to_string(),
                "home-derper-tls".to_string(),
            )]
            .into(),
        );
        r.spec.tls.issuer_ref = None;
        r.spec.tls.secret_name = Some("user-tls".into());
        assert_eq!(
            names(&stale(&r, Kind::Certificate, &certs)),
            ["home-derper-tls"]
        );
        let s = stale(&r, Kind::Secret, [&issued]);
        assert_eq!(names(&s), ["home-derper-tls"]);
        assert_eq!(s[0].why, "tls.issuerRef was removed");
    }

    #[test]
    fn objects_not_owned_by_this_region_are_never_deleted() {
        let mut r = region("home", 900);
        r.spec.mesh.enabled = false;
        let other = region("other", 901);
        // Labelled for us but owned by nobody / by another uid; owned by us but unlabelled;
        // another namespace; the user's own Secret; already terminating.
        let mut foreign_owner = meta(&r, "home-derper-mesh-key", false);
        foreign_owner.owner_references = Some(vec![OwnerReference {
            controller: Some(true),
            ..other.controller_owner_ref(&()).unwrap()
        }]);
        let mut unlabelled = meta(&r, "home-derper-mesh-key", true);
        unlabelled.labels = None;
        let mut elsewhere = meta(&r, "home-derper-mesh-key", true);
        elsewhere.namespace = Some("other".into());
        let mut terminating = meta(&r, "home-derper-mesh-key", true);
        terminating.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let objs = [
            meta(&r, "home-derper-mesh-key", false),
            foreign_owner,
            unlabelled,
            elsewhere,
            terminating,
        ];
        assert!(stale(&r, Kind::Secret, &objs).is_empty());
        // A region being deleted leaves everything to the garbage collector.
        let mut gone = r.clone();
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let owned = [meta(&r, "home-derper-mesh-key", true)];
        assert!(stale(&gone, Kind::Secret, &owned).is_empty());
        assert_eq!(stale(&r, Kind::Secret, &owned).len(), 1);
    }
}
