//! The reconciler of `DerpRegion`s (run by `run.rs` inside a kube-runtime `Controller`; only the
//! leader acts). One reconcile renders the region's objects from the watch caches, applies the
//! ones that differ with server-side apply, and writes the status (conditions, published nodes)
//! when it changed, plus an Event on each transition a person must know about. The map facts it
//! reports come from the map task (`maptask.rs`), so status says exactly what `/derpmap.json`
//! serves.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use exp_backoff::Backoff;

use crate::apply::{self, Applied, FIELD_MANAGER, WriteCounters};
use crate::certstate::{CertReason, CertState};
use crate::crd::{
    CONDITION_CERTIFICATE_READY, CONDITION_CONFLICT, CONDITION_HEALTHY, CONDITION_READY,
    DerpRegion, DerpRegionStatus, RegionProbeStatus,
};
use crate::mapbuild::{Conflict, MapOutput, NotPublished, RegionFacts, RegionKey};
use crate::probe::ProbeReport;
use crate::prune;
use crate::render::{
    LABEL_REGION, RenderContext, Rendered, certificate_name, mesh_key_secret_name, render,
    tls_secret_name,
};

/// A healthy region is looked at again this often even without events: a safety net for a
/// missed watch event; it writes nothing when nothing changed.
const RESYNC: Duration = Duration::from_secs(300);
/// Without map facts yet (the map task has not seen the region), look again soon.
const FACTS_PENDING_RETRY: Duration = Duration::from_secs(2);
/// How often a region waiting for cert-manager (missing CRD, unissued certificate or missing
/// Secret) is looked at: installing cert-manager must not need an operator restart.
const CERT_WAIT_RETRY: Duration = Duration::from_secs(30);
/// Error backoff: doubles from 1 s per consecutive failure of the same region, up to 5 min.
const ERROR_BACKOFF_MIN: Duration = Duration::from_secs(1);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// cert-manager's Certificate kind.
pub fn certificate_resource() -> ApiResource {
    ApiResource {
        group: "cert-manager.io".into(),
        version: "v1".into(),
        api_version: "cert-manager.io/v1".into(),
        kind: "Certificate".into(),
        plural: "certificates".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DerpRegion has no namespace")]
    NoNamespace,
    #[error(transparent)]
    Render(#[from] crate::render::RenderError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error("{what}: {source}")]
    Kube {
        what: &'static str,
        source: kube::Error,
    },
    #[error("serialising status: {0}")]
    Status(#[from] serde_json::Error),
}

impl Error {
    /// Stable label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoNamespace => "no_namespace",
            Self::Render(_) => "render",
            Self::Apply(_) => "apply",
            Self::Kube { .. } => "kube",
            Self::Status(_) => "status",
        }
    }
}

/// The watch caches the controller and the map builder share.
#[derive(Clone)]
pub struct Stores {
    pub regions: Store<DerpRegion>,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub secrets: Store<Secret>,
    pub configmaps: Store<ConfigMap>,
    pub daemonsets: Store<DaemonSet>,
    pub certificates: Store<DynamicObject>,
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub recorder: Recorder,
    pub counters: Arc<WriteCounters>,
    /// Latest map build (facts per region), from the map task.
    pub map: watch::Receiver<Option<Arc<MapOutput>>>,
    /// The prober's view per region (`None` when probing is off).
    pub probe: watch::Receiver<Option<Arc<ProbeReport>>>,
    /// `--probe-gates-map`, for the `Healthy` condition's message.
    pub probe_gates_map: bool,
    /// Whether this replica holds the Lease.
    pub leader: watch::Receiver<bool>,
    /// Whether cert-manager's Certificate CRD was found.
    pub cert_crd: Arc<AtomicBool>,
    /// Image for regions that name none.
    pub derper_image: Option<String>,
    /// The error backoff of each region that is failing, for [`error_policy`].
    pub failures: Mutex<HashMap<RegionKey, Backoff>>,
    pub reconciles: std::sync::atomic::AtomicU64,
}

/// Reconciles one region (leader only).
pub async fn reconcile(region: Arc<DerpRegion>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    if region.metadata.deletion_timestamp.is_some() {
        // Owner references hand the owned objects to the garbage collector.
        return Ok(Action::await_change());
    }
    let ns = region.namespace().ok_or(Error::NoNamespace)?;
    let span = info_span!("reconcile", region = %format!("{ns}/{}", region.name_any()));
    let res = reconcile_inner(&region, &ns, &ctx).instrument(span).await;
    ctx.reconciles.fetch_add(1, Ordering::Relaxed);
    if res.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&RegionKey::of(&region));
    }
    res
}

/// Backs off per region: 1 s, 2 s, 4 s ... 5 min.
pub fn error_policy(region: Arc<DerpRegion>, err: &Error, ctx: Arc<Context>) -> Action {
    let (n, delay) = ctx
        .failures
        .lock()
        .map(|mut f| {
            let b = f
                .entry(RegionKey::of(&region))
                .or_insert_with(|| Backoff::new(ERROR_BACKOFF_MIN, ERROR_BACKOFF_MAX));
            let delay = b.next_delay();
            (b.failures(), delay)
        })
        .unwrap_or((1, ERROR_BACKOFF_MIN));
    warn!(
        region = %format!("{}/{}", region.namespace().unwrap_or_default(), region.name_any()),
        error = %err, kind = err.metric_label(), failures = n, retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn find<K: Resource + Clone>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
where
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store.get(&ObjectRef::new(name).within(ns))
}

/// The Secret from the cache, else from the API server: a Secret we created a moment ago may not
/// be in the cache yet, and making a new mesh key or certificate over it would break the region.
async fn existing_secret(ctx: &Context, ns: &str, name: &str) -> Result<Option<Secret>, Error> {
    if let Some(s) = find(&ctx.stores.secrets, ns, name) {
        return Ok(Some((*s).clone()));
    }
    Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|source| Error::Kube {
            what: "reading Secret",
            source,
        })
}

/// One reconcile, in the order the objects depend on each other: read what a re-render must keep
/// (the Secrets) and the selected nodes, render, apply the Secrets and the mesh ConfigMap, find
/// (or request) the certificate, apply the DaemonSet that mounts them, prune what the region no
/// longer uses, and write the status from the map task's facts.
async fn reconcile_inner(region: &DerpRegion, ns: &str, ctx: &Context) -> Result<Action, Error> {
    let now_unix = Timestamp::now().as_second();
    let observed = observe(ctx, region, ns).await?;
    let rendered = render_region(ctx, region, &observed, now_unix)?;
    let mut changed = ChangedObjects::default();
    apply_secrets_and_configmap(ctx, ns, &rendered, &observed, &mut changed).await?;
    let cert = certificate_state(
        ctx,
        region,
        ns,
        &rendered,
        &observed,
        now_unix,
        &mut changed,
    )
    .await?;
    apply_daemonset(ctx, ns, &rendered, &mut changed).await?;
    changed.log();
    prune(ctx, region, ns).await?;
    if !write_status(ctx, region, ns, &cert.state).await? {
        debug!("no map facts for the region yet");
        return Ok(Action::requeue(FACTS_PENDING_RETRY));
    }
    Ok(Action::requeue(if cert.look_again_soon {
        CERT_WAIT_RETRY
    } else {
        RESYNC
    }))
}

/// What a render reads besides the region: the Secrets whose content must survive it (a new mesh
/// key or self-signed certificate would break the region) and the nodes the region selects.
struct Observed {
    mesh_key: Option<Secret>,
    tls: Option<Secret>,
    nodes: Vec<Node>,
}

async fn observe(ctx: &Context, region: &DerpRegion, ns: &str) -> Result<Observed, Error> {
    let name = region.name_any();
    let spec = &region.spec;
    let mesh_key = if spec.meshed() {
        existing_secret(ctx, ns, &mesh_key_secret_name(&name)).await?
    } else {
        None
    };
    let tls = if spec.tls.self_signed.is_some() {
        existing_secret(ctx, ns, &certificate_name(&name)).await?
    } else {
        None
    };
    // Only the nodes this region selects are copied: reconciles run concurrently, and copying
    // every cached Node for each of them grew the operator to gigabytes at 1000 regions over
    // 5000 nodes (bench/operator-scale).
    let nodes = ctx
        .stores
        .nodes
        .state()
        .iter()
        .filter(|n| crate::select::selects(spec, n))
        .map(|n| (**n).clone())
        .collect();
    Ok(Observed {
        mesh_key,
        tls,
        nodes,
    })
}

fn render_region(
    ctx: &Context,
    region: &DerpRegion,
    observed: &Observed,
    now_unix: i64,
) -> Result<Rendered, Error> {
    let mut r = region.clone();
    if r.spec.image.is_none() {
        r.spec.image = ctx.derper_image.clone();
    }
    let rctx = RenderContext {
        nodes: &observed.nodes,
        existing_mesh_key: observed.mesh_key.as_ref(),
        existing_tls: observed.tls.as_ref(),
        now_unix,
    };
    Ok(render(&r, &rctx, &mut rand::rngs::OsRng)?)
}

/// The objects a reconcile changed, logged once at its end.
#[derive(Default)]
struct ChangedObjects(Vec<String>);

impl ChangedObjects {
    fn note(&mut self, kind: &str, a: Applied) {
        if a != Applied::Unchanged {
            self.0.push(format!("{kind}:{a:?}"));
        }
    }

    fn log(&self) {
        if !self.0.is_empty() {
            info!(objects = ?self.0, "applied");
        }
    }
}

/// The mesh key Secret, the mesh peers ConfigMap and the self-signed TLS Secret (each when the
/// region has one): the DaemonSet mounts them.
async fn apply_secrets_and_configmap(
    ctx: &Context,
    ns: &str,
    rendered: &Rendered,
    observed: &Observed,
    changed: &mut ChangedObjects,
) -> Result<(), Error> {
    let c = &ctx.counters;
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    if let Some(s) = &rendered.mesh_key_secret {
        let have = observed.mesh_key.as_ref();
        changed.note("Secret", apply::apply(&secrets, s, have, c).await?);
    }
    if let Some(cm) = &rendered.mesh_peers {
        let have = find(&ctx.stores.configmaps, ns, &cm.name_any());
        let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns);
        let a = apply::apply(&api, cm, have.as_deref(), c).await?;
        changed.note("ConfigMap", a);
    }
    if let Some(s) = &rendered.tls_secret {
        let have = observed.tls.as_ref();
        changed.note("Secret", apply::apply(&secrets, s, have, c).await?);
    }
    Ok(())
}

async fn apply_daemonset(
    ctx: &Context,
    ns: &str,
    rendered: &Rendered,
    changed: &mut ChangedObjects,
) -> Result<(), Error> {
    let ds = &rendered.daemonset;
    let have = find(&ctx.stores.daemonsets, ns, &ds.name_any());
    let api = Api::<DaemonSet>::namespaced(ctx.client.clone(), ns);
    let a = apply::apply(&api, ds, have.as_deref(), &ctx.counters).await?;
    changed.note("DaemonSet", a);
    Ok(())
}

/// `CertificateReady` for each way a region gets its certificate: cert-manager (`issuerRef`,
/// the Certificate applied here), a Secret of the user's (`secretName`), or self-signed.
async fn certificate_state(
    ctx: &Context,
    region: &DerpRegion,
    ns: &str,
    rendered: &Rendered,
    observed: &Observed,
    now_unix: i64,
    changed: &mut ChangedObjects,
) -> Result<CertificateOutcome, Error> {
    let spec = &region.spec;
    let outcome = |state, look_again_soon| CertificateOutcome {
        state,
        applied: None,
        look_again_soon,
    };
    if spec.tls.issuer_ref.is_some() {
        let name = region.name_any();
        let cert = certificate(ctx, ns, &name, rendered.certificate.as_ref()).await?;
        if let Some(a) = cert.applied {
            changed.note("Certificate", a);
        }
        return Ok(cert);
    }
    if let Some(secret) = &spec.tls.secret_name {
        let found = Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get_opt(secret)
            .await
            .map_err(|source| Error::Kube {
                what: "reading the tls.secretName Secret",
                source,
            })?;
        return Ok(match found {
            Some(found) => {
                let state = CertState::of_provided_secret(
                    region,
                    &observed.nodes,
                    secret,
                    &found,
                    now_unix,
                );
                outcome(state, false)
            }
            None => outcome(CertState::secret_not_found(secret, ns), true),
        });
    }
    Ok(if rendered.tls_secret.is_some() {
        outcome(CertState::self_signed(&tls_secret_name(region)), false)
    } else {
        let what = "the self-signed certificate is made for the first one";
        outcome(CertState::no_nodes(what), false)
    })
}

/// Writes the status from the map task's facts (what `/derpmap.json` serves) when it changed,
/// with an Event per transition a person must know about. `false`: the map task has no facts
/// for the region yet.
async fn write_status(
    ctx: &Context,
    region: &DerpRegion,
    ns: &str,
    cert: &CertState,
) -> Result<bool, Error> {
    let key = RegionKey::of(region);
    let facts = ctx
        .map
        .borrow()
        .as_ref()
        .and_then(|m| m.facts.get(&key).cloned());
    let Some(facts) = facts else {
        return Ok(false);
    };
    let old = region.status.clone();
    let probe = ctx
        .probe
        .borrow()
        .as_ref()
        .map(|p| p.get(&key).cloned().unwrap_or_default());
    let new = with_probe(
        desired_status(region, &facts, cert, old.as_ref(), now_seconds()),
        probe,
        ctx.probe_gates_map,
        old.as_ref(),
        now_seconds(),
    );
    if old.as_ref() == Some(&new) {
        return Ok(true);
    }
    let api = Api::<DerpRegion>::namespaced(ctx.client.clone(), ns);
    let patch = json!({
        "apiVersion": "derpfleet.io/v1alpha1",
        "kind": "DerpRegion",
        "status": serde_json::to_value(&new)?,
    });
    api.patch_status(
        &region.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Kube {
        what: "writing status",
        source,
    })?;
    apply::count_status_write(&ctx.counters);
    info!(ready = ?new.nodes_ready, "status updated");
    for ev in transitions(old.as_ref(), &new)
        .into_iter()
        .chain(probe_transitions(old.as_ref(), &new, &facts))
    {
        publish(ctx, region, ev).await;
    }
    Ok(true)
}

/// Deletes the objects the region owns but no longer renders (see `prune.rs`), from the caches.
async fn prune(ctx: &Context, region: &DerpRegion, ns: &str) -> Result<(), Error> {
    let err = |what| move |source| Error::Kube { what, source };
    let (st, c) = (&ctx.stores, &ctx.counters);
    let client = || ctx.client.clone();
    prune::prune_kind(
        region,
        prune::Kind::Secret,
        &st.secrets,
        &Api::namespaced(client(), ns),
        c,
    )
    .await
    .map_err(err("deleting a Secret the region no longer uses"))?;
    prune::adopt_issued_secret(region, &st.secrets, &Api::namespaced(client(), ns), c)
        .await
        .map_err(err(
            "adding the region as owner of the Secret cert-manager issued",
        ))?;
    let api = Api::namespaced(client(), ns);
    prune::prune_kind(region, prune::Kind::ConfigMap, &st.configmaps, &api, c)
        .await
        .map_err(err("deleting a ConfigMap the region no longer uses"))?;
    if ctx.cert_crd.load(Ordering::Relaxed) {
        let api = Api::namespaced_with(client(), ns, &certificate_resource());
        prune::prune_kind(region, prune::Kind::Certificate, &st.certificates, &api, c)
            .await
            .map_err(err("deleting a Certificate the region no longer uses"))?;
    }
    Ok(())
}

/// Regions whose `tls.secretName` names this Secret, or whose Certificate cert-manager issues
/// into it (same namespace): that Secret has no owner reference until the region adopts it
/// (`prune::adopt_issued_secret`), so only this mapping reconciles the region when it appears.
pub fn regions_for_secret(
    regions: &Store<DerpRegion>,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<DerpRegion>> {
    regions
        .state()
        .iter()
        .filter(|r| {
            let issued_into = r.spec.tls.issuer_ref.is_some()
                && crate::render::certificate_name(&r.name_any()) == name;
            (r.spec.tls.secret_name.as_deref() == Some(name) || issued_into)
                && r.metadata.namespace.as_deref() == namespace
        })
        .map(|r| ObjectRef::from_obj(&**r))
        .collect()
}

/// What [`certificate`] found and did.
struct CertificateOutcome {
    state: CertState,
    /// What applying the Certificate did (`None`: nothing to apply yet).
    applied: Option<Applied>,
    /// Look again within [`CERT_WAIT_RETRY`] rather than [`RESYNC`]: waiting on cert-manager.
    look_again_soon: bool,
}

/// The Certificate's state, after applying it when cert-manager is installed.
async fn certificate(
    ctx: &Context,
    ns: &str,
    name: &str,
    desired: Option<&DynamicObject>,
) -> Result<CertificateOutcome, Error> {
    if !ctx.cert_crd.load(Ordering::Relaxed) {
        // Installed since the last look? (the Certificate watch starts on its own once it is).
        if cert_crd_installed(&ctx.client).await {
            ctx.cert_crd.store(true, Ordering::Relaxed);
        } else {
            return Ok(CertificateOutcome {
                state: CertState::cert_manager_missing(),
                applied: None,
                look_again_soon: true,
            });
        }
    }
    let Some(desired) = desired else {
        return Ok(CertificateOutcome {
            state: CertState::no_nodes("the Certificate is requested once one is"),
            applied: None,
            look_again_soon: false,
        });
    };
    let cname = certificate_name(name);
    let have = ctx
        .stores
        .certificates
        .get(&ObjectRef::new_with(&cname, certificate_resource()).within(ns));
    let api =
        Api::<DynamicObject>::namespaced_with(ctx.client.clone(), ns, &certificate_resource());
    let want = apply::stamp(serde_json::to_value(desired)?);
    let have_v = have.as_deref().map(serde_json::to_value).transpose()?;
    let applied = apply::apply_value(
        &api,
        &cname,
        "Certificate",
        want,
        have_v.as_ref(),
        &ctx.counters,
    )
    .await?;
    let state = CertState::of_certificate(&cname, have_v.as_ref());
    Ok(CertificateOutcome {
        look_again_soon: !state.ready(),
        state,
        applied: Some(applied),
    })
}

/// Whether the API server serves `certificates.cert-manager.io/v1`.
pub async fn cert_crd_installed(client: &Client) -> bool {
    match client.list_api_group_resources("cert-manager.io/v1").await {
        Ok(list) => list.resources.iter().any(|r| r.name == "certificates"),
        Err(_) => false,
    }
}

fn now_seconds() -> Timestamp {
    // Conditions carry whole seconds on the wire; a sub-second value would never compare equal
    // to what the cache reads back, and every reconcile would write the status again.
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    old: Option<&DerpRegionStatus>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let since = old
        .and_then(|o| o.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Reason of the `Ready` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyReason {
    Published,
    Conflict,
    NoNodeSelected,
    WaitingForCertificate,
    InvalidRegionID,
    NoReadyNode,
}

impl ReadyReason {
    pub const ALL: [ReadyReason; 6] = [
        Self::Published,
        Self::Conflict,
        Self::NoNodeSelected,
        Self::WaitingForCertificate,
        Self::InvalidRegionID,
        Self::NoReadyNode,
    ];

    /// The reason a status read back from the API server carries (`None`: not one of ours).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The reason for the map's facts: the one place a [`NotPublished`] becomes a reason.
    pub fn of(facts: &RegionFacts) -> Self {
        match &facts.not_published {
            _ if facts.published => Self::Published,
            Some(NotPublished::Conflict(_)) => Self::Conflict,
            Some(NotPublished::Certificate(_)) => Self::WaitingForCertificate,
            Some(NotPublished::InvalidRegionId(_)) => Self::InvalidRegionID,
            Some(NotPublished::NoNodeSelected) => Self::NoNodeSelected,
            Some(NotPublished::NoReadyNode { .. }) | None => Self::NoReadyNode,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "Published",
            Self::Conflict => "Conflict",
            Self::NoNodeSelected => "NoNodeSelected",
            Self::WaitingForCertificate => "WaitingForCertificate",
            Self::InvalidRegionID => "InvalidRegionID",
            Self::NoReadyNode => "NoReadyNode",
        }
    }
}

impl std::fmt::Display for ReadyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reason of the `Conflict` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictReason {
    Unique,
    RegionIDTaken,
    RegionCodeTaken,
}

impl ConflictReason {
    pub fn of(conflict: Option<&Conflict>) -> Self {
        match conflict {
            None => Self::Unique,
            Some(Conflict::RegionIdTaken { .. }) => Self::RegionIDTaken,
            Some(Conflict::CodeTaken { .. }) => Self::RegionCodeTaken,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unique => "Unique",
            Self::RegionIDTaken => "RegionIDTaken",
            Self::RegionCodeTaken => "RegionCodeTaken",
        }
    }
}

impl std::fmt::Display for ConflictReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status a region should have, given the map's facts and its certificate. Pure.
pub fn desired_status(
    region: &DerpRegion,
    facts: &RegionFacts,
    cert: &CertState,
    old: Option<&DerpRegionStatus>,
    now: Timestamp,
) -> DerpRegionStatus {
    let generation = region.metadata.generation;
    let (ready_reason, ready_msg) = if facts.published {
        (
            ReadyReason::Published,
            format!(
                "{} of {} nodes are in the DERP map",
                facts.ready, facts.desired
            ),
        )
    } else {
        let why = facts
            .not_published
            .as_ref()
            .map_or_else(|| "not in the DERP map".into(), ToString::to_string);
        (
            ReadyReason::of(facts),
            format!("not in the DERP map: {why}"),
        )
    };
    let conflict = facts.conflict();
    let conflict_msg = match conflict {
        Some(c) => c.to_string(),
        None => format!(
            "regionId {} and code {:?} belong to this region alone",
            region.spec.region_id, region.spec.code
        ),
    };
    let conditions = vec![
        condition(
            CONDITION_READY,
            facts.published,
            ready_reason.as_str(),
            ready_msg,
            generation,
            old,
            now,
        ),
        condition(
            CONDITION_CERTIFICATE_READY,
            cert.ready(),
            cert.reason.as_str(),
            cert.message.clone(),
            generation,
            old,
            now,
        ),
        condition(
            CONDITION_CONFLICT,
            conflict.is_some(),
            ConflictReason::of(conflict).as_str(),
            conflict_msg,
            generation,
            old,
            now,
        ),
    ];
    let mut message: Vec<String> = Vec::new();
    if let Some(why) = &facts.not_published {
        message.push(format!("not in the DERP map: {why}"));
    }
    message.extend(facts.warnings.iter().cloned());
    DerpRegionStatus {
        observed_generation: generation,
        conditions,
        nodes_ready: Some(format!("{}/{}", facts.ready, facts.desired)),
        nodes: facts.nodes.clone(),
        node_regions: facts.node_regions.clone(),
        message: (!message.is_empty()).then(|| message.join("; ")),
        probe: None,
    }
}

/// Adds the prober's view to a status: `status.probe` and the `Healthy` condition. `probe` is
/// `None` when this replica does not probe (both are then left out). Pure.
pub fn with_probe(
    mut status: DerpRegionStatus,
    probe: Option<RegionProbeStatus>,
    gates_map: bool,
    old: Option<&DerpRegionStatus>,
    now: Timestamp,
) -> DerpRegionStatus {
    let Some(probe) = probe.filter(|p| !p.nodes.is_empty()) else {
        return status;
    };
    let failing: Vec<String> = probe
        .nodes
        .iter()
        .filter(|n| !n.healthy)
        .map(|n| {
            let mut s = format!(
                "{}: {} failing",
                n.name,
                n.failing_check.as_deref().unwrap_or("probe")
            );
            if let Some(t) = &n.failing_since {
                let _ = write!(s, " since {}", t.0);
            }
            if let Some(m) = &n.message {
                let _ = write!(s, " ({m})");
            }
            s
        })
        .collect();
    let (ok, reason, message) = if failing.is_empty() {
        (
            true,
            "ProbesPassing",
            format!(
                "all {} probed nodes pass the tls, derp, stun and mesh checks",
                probe.nodes.len()
            ),
        )
    } else {
        let gate = if gates_map {
            "left out of the map while another node of the region is healthy"
        } else {
            "still in the map (--probe-gates-map is off)"
        };
        (
            false,
            "ProbeFailing",
            truncate(&format!("{}; {gate}", failing.join("; ")), 1000),
        )
    };
    status.conditions.push(condition(
        CONDITION_HEALTHY,
        ok,
        reason,
        message,
        status.observed_generation,
        old,
        now,
    ));
    status.probe = Some(probe);
    status
}

/// One Event per node whose probe verdict changed. Each names the node's Kubernetes Node as the
/// related object and the failing check in its reason: the recorder folds repeats of one
/// (reason, object, related object) into a series and keeps the first note, so a shared reason
/// would report the second failing node under the first one's name.
pub fn probe_transitions(
    old: Option<&DerpRegionStatus>,
    new: &DerpRegionStatus,
    facts: &RegionFacts,
) -> Vec<Event> {
    let Some(probe) = &new.probe else {
        return Vec::new();
    };
    let was = |name: &str| {
        old.and_then(|o| o.probe.as_ref())
            .and_then(|p| p.nodes.iter().find(|n| n.name == name))
            .map(|n| (n.healthy, n.failing_check.clone()))
    };
    let mut out = Vec::new();
    for n in &probe.nodes {
        let before = was(&n.name);
        let event = if n.healthy {
            // Recovered: only a node that was held unhealthy.
            matches!(before, Some((false, _)))
        } else {
            // Failing: a new failure, or another check failing while held. A node back from a
            // restart, still held but passing (no failing check), is neither.
            n.failing_check.is_some()
                && !matches!(&before, Some((false, c)) if *c == n.failing_check)
        };
        if !event {
            continue;
        }
        let (type_, reason, note) = if n.healthy {
            (
                EventType::Normal,
                "ProbeRecovered".to_string(),
                format!("{}: every probe passes again", n.name),
            )
        } else {
            let check = n.failing_check.as_deref().unwrap_or("probe");
            (
                EventType::Warning,
                format!("ProbeFailing{}", check_title(check)),
                format!(
                    "{}: the {check} check failed {}: {}",
                    n.name,
                    n.failing_since
                        .as_ref()
                        .map_or_else(String::new, |t| format!("since {}", t.0)),
                    n.message.as_deref().unwrap_or("no detail")
                ),
            )
        };
        let node = facts
            .nodes
            .iter()
            .find(|p| p.name == n.name)
            .map(|p| p.node_name.clone());
        out.push(Event {
            type_,
            reason,
            note: Some(truncate(&note, 1000)),
            action: "Probe".into(),
            secondary: node.map(|name| k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name),
                ..Default::default()
            }),
        });
    }
    out
}

fn check_title(check: &str) -> &'static str {
    match check {
        "tls" => "TLS",
        "derp" => "DERP",
        "stun" => "STUN",
        "mesh" => "Mesh",
        _ => "",
    }
}

/// Events for the condition transitions a person must know about, old → new.
pub fn transitions(old: Option<&DerpRegionStatus>, new: &DerpRegionStatus) -> Vec<Event> {
    let get = |s: Option<&DerpRegionStatus>, t: &str| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut out = Vec::new();
    for c in &new.conditions {
        if get(old, &c.type_) == Some((c.status.clone(), c.reason.clone())) {
            continue;
        }
        let ok = c.status == "True";
        let (type_, reason) = match c.type_.as_str() {
            CONDITION_CONFLICT if ok => (EventType::Warning, "RegionConflict"),
            CONDITION_CONFLICT if old.is_some() => (EventType::Normal, "ConflictResolved"),
            CONDITION_CERTIFICATE_READY => match CertReason::parse(&c.reason) {
                _ if ok => (EventType::Normal, "CertificateReady"),
                Some(CertReason::CertManagerMissing) => (EventType::Warning, "CertManagerMissing"),
                // Ready=False NoNodeSelected says it already.
                Some(CertReason::NoNodes) => continue,
                _ => (EventType::Warning, "CertificateNotReady"),
            },
            CONDITION_READY => match ReadyReason::parse(&c.reason) {
                _ if ok => (EventType::Normal, "Published"),
                Some(ReadyReason::NoReadyNode) => (EventType::Warning, "NoReadyNode"),
                Some(ReadyReason::NoNodeSelected) => (EventType::Warning, "NoNodeSelected"),
                _ => continue,
            },
            _ => continue,
        };
        out.push(Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(&c.message, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    out
}

/// Event notes are capped at 1 kB by the API server.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

async fn publish(ctx: &Context, region: &DerpRegion, ev: Event) {
    let reference = region.object_ref(&());
    match ctx.recorder.publish(&ev, &reference).await {
        Ok(()) => apply::count_event(&ctx.counters),
        // An Event is advice; failing to publish one must not fail the reconcile.
        Err(e) => warn!(reason = %ev.reason, "publishing event: {e}"),
    }
}

/// Regions a Node change may affect: those whose selection includes it, and those that list it
/// in their status (it may have just left their selection, or been deleted).
pub fn regions_for_node(regions: &Store<DerpRegion>, node: &Node) -> Vec<ObjectRef<DerpRegion>> {
    let name = node.name_any();
    regions
        .state()
        .iter()
        .filter(|r| {
            crate::select::selects(&r.spec, node)
                || r.status
                    .as_ref()
                    .is_some_and(|s| s.nodes.iter().any(|n| n.node_name == name))
        })
        .map(|r| ObjectRef::from_obj(&**r))
        .collect()
}

/// The region a derper Pod belongs to (label `derpfleet.io/region`, same namespace).
pub fn region_for_pod(pod: &Pod) -> Option<ObjectRef<DerpRegion>> {
    let region = pod.labels().get(LABEL_REGION)?;
    Some(ObjectRef::new(region).within(&pod.namespace()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PublishedNode;
    use crate::testutil::region;

    fn facts(ready: u32, desired: u32) -> RegionFacts {
        RegionFacts {
            desired,
            ready,
            nodes: vec![PublishedNode {
                name: "900-a".into(),
                node_name: "a".into(),
                host_name: "127.0.1.1".into(),
                ipv4: Some("127.0.1.1".into()),
                ipv6: None,
                ready: ready > 0,
            }],
            published: ready > 0,
            not_published: (ready == 0).then_some(NotPublished::NoReadyNode { desired }),
            ..Default::default()
        }
    }

    fn cert() -> CertState {
        CertState::self_signed("x")
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn unchanged_input_gives_equal_status_and_no_event() {
        let mut r = region("home", 900);
        r.metadata.generation = Some(3);
        let first = desired_status(&r, &facts(3, 3), &cert(), None, ts(100));
        assert_eq!(first.nodes_ready.as_deref(), Some("3/3"));
        assert_eq!(first.observed_generation, Some(3));
        let ready = &first.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        // Later, same input: equal (transition times kept), so nothing is written.
        let again = desired_status(&r, &facts(3, 3), &cert(), Some(&first), ts(200));
        assert_eq!(again, first);
        assert!(transitions(Some(&first), &again).is_empty());
        // Fewer ready nodes: message changes, transition time does not.
        let two = desired_status(&r, &facts(2, 3), &cert(), Some(&first), ts(300));
        assert_ne!(two, first);
        assert_eq!(
            two.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        assert!(transitions(Some(&first), &two).is_empty());
    }

    #[test]
    fn no_ready_node_and_conflict_raise_warnings() {
        let r = region("home", 900);
        let first = desired_status(&r, &facts(3, 3), &cert(), None, ts(100));
        let none = desired_status(&r, &facts(0, 3), &cert(), Some(&first), ts(200));
        assert_eq!(none.conditions[0].reason, "NoReadyNode");
        assert_eq!(none.conditions[0].last_transition_time, Time(ts(200)));
        let evs = transitions(Some(&first), &none);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].reason, "NoReadyNode");
        assert_eq!(evs[0].type_, EventType::Warning);

        let mut f = facts(0, 3);
        f.not_published = Some(NotPublished::Conflict(Conflict::RegionIdTaken {
            id: 900,
            holder: RegionKey::new("derp", "old"),
        }));
        let c = desired_status(&r, &f, &cert(), Some(&first), ts(200));
        assert_eq!(c.conditions[0].reason, "Conflict");
        assert_eq!(c.conditions[2].status, "True");
        assert_eq!(c.conditions[2].reason, "RegionIDTaken");
        let reasons: Vec<String> = transitions(Some(&first), &c)
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert!(
            reasons.contains(&"RegionConflict".to_string()),
            "{reasons:?}"
        );
    }

    /// Every `Ready` and `Conflict` reason, from the map builder's facts to the status a
    /// reconcile writes (`build_map`, then `desired_status`, as the map task and the controller
    /// chain them).
    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one table of every reason, from one build_map of regions that conflict with each other"
    )]
    fn every_status_reason_from_the_map_build() {
        use crate::crd::{SelfSignedMode, SelfSignedSpec};
        use crate::mapbuild::{MapConfig, MapInput, build_map};
        use crate::offline::derper_pod;
        use k8s_openapi::api::core::v1::PodCondition;

        let now = 1_790_000_000;
        let make = |name: &str, id: i64, created: i64, pinned: bool| {
            let mut r = region(name, id);
            if !pinned {
                r.spec.tls.self_signed = Some(SelfSignedSpec {
                    mode: SelfSignedMode::InsecureForTests,
                });
            }
            r.metadata.creation_timestamp = Some(Time(ts(created)));
            r
        };
        let nowhere = |mut r: DerpRegion| {
            r.spec.node_selector = [("derp".to_string(), "nowhere".to_string())].into();
            r
        };
        let mut code_taken = make("code-taken", 901, 3, false);
        code_taken.spec.code = "published".into();
        let regions = [
            make("published", 900, 1, false),
            make("id-taken", 900, 2, false),
            code_taken,
            nowhere(make("no-node", 902, 4, false)),
            // Pinned (self-signed) without its Secret yet.
            make("pinned", 903, 5, true),
            // With no node the Secret cannot exist either: the selection is the reason.
            nowhere(make("pinned-no-node", 904, 6, true)),
            // The CRD's validation refuses it on an API server; `operator render` reads files.
            make("invalid", 0, 7, false),
            make("unready", 905, 8, false),
        ];
        let nodes = [crate::testutil::node("a", &[("InternalIP", "10.0.0.1")])];
        // A derper on every node a region selects (a derper still running on a node its
        // region no longer selects keeps the node published until the DaemonSet removes it).
        let pods: Vec<Arc<Pod>> = regions
            .iter()
            .filter(|r| r.spec.node_selector.is_empty())
            .map(|r| {
                let ready = if r.name_any() == "unready" {
                    "False"
                } else {
                    "True"
                };
                let cond = PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                };
                Arc::new(derper_pod("derp", &r.name_any(), "a", cond))
            })
            .collect();
        let out = build_map(
            &MapInput {
                regions: &regions.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
                nodes: &nodes.iter().cloned().map(Arc::new).collect::<Vec<_>>(),
                pods: &pods,
                secrets: &[],
                previously_published: &Default::default(),
                unready_since: &Default::default(),
                now: ts(now),
                probe_failing: &Default::default(),
            },
            &MapConfig::default(),
        );
        let want = [
            (
                "published",
                "Published",
                "Unique",
                "1 of 1 nodes are in the DERP map",
            ),
            (
                "id-taken",
                "Conflict",
                "RegionIDTaken",
                "regionId 900 is already held by the older DerpRegion derp/published",
            ),
            (
                "code-taken",
                "Conflict",
                "RegionCodeTaken",
                "code \"published\" is already held by the older DerpRegion derp/published",
            ),
            ("no-node", "NoNodeSelected", "Unique", "no node matches"),
            (
                "pinned",
                "WaitingForCertificate",
                "Unique",
                "waiting for the self-signed certificate Secret pinned-derper-tls",
            ),
            (
                "pinned-no-node",
                "NoNodeSelected",
                "Unique",
                // the message names what the reason names, not the certificate still to come
                "no node matches",
            ),
            (
                "invalid",
                "InvalidRegionID",
                "Unique",
                "regionId 0 is out of range",
            ),
            (
                "unready",
                "NoReadyNode",
                "Unique",
                "none of the 1 selected nodes has a Ready derper",
            ),
        ];
        for (name, ready, conflict, message) in want {
            let r = regions.iter().find(|r| r.name_any() == name).unwrap();
            let f = &out.facts[&RegionKey::of(r)];
            let s = desired_status(r, f, &cert(), None, ts(now));
            assert_eq!(
                condition_of(&s, CONDITION_READY),
                (
                    if ready == "Published" {
                        "True"
                    } else {
                        "False"
                    }
                    .into(),
                    ready.into()
                ),
                "{name}: {s:?}"
            );
            assert_eq!(
                condition_of(&s, CONDITION_CONFLICT),
                (
                    if conflict == "Unique" {
                        "False"
                    } else {
                        "True"
                    }
                    .into(),
                    conflict.into()
                ),
                "{name}: {s:?}"
            );
            let said = s
                .conditions
                .iter()
                .filter(|c| c.type_ != CONDITION_CERTIFICATE_READY)
                .any(|c| c.message.contains(message));
            assert!(said, "{name}: no condition says {message:?}: {s:?}");
            // A region that is not published says so in status.message too.
            assert_eq!(s.message.is_some(), ready != "Published", "{name}: {s:?}");
        }
        // The map holds the winner alone.
        let ids: Vec<u32> = out.map.regions.keys().copied().collect();
        assert_eq!(ids, [900]);
        assert_eq!(out.map.regions[&900].region_code, "published");
    }

    #[test]
    fn probe_verdicts_become_a_condition_and_one_event_per_node_transition() {
        use crate::crd::{NodeProbeStatus, RegionProbeStatus};
        let r = crate::testutil::region("home", 900);
        let node = |healthy: bool, check: Option<&str>| RegionProbeStatus {
            nodes: vec![NodeProbeStatus {
                name: "900-a".into(),
                healthy,
                failing_check: check.map(str::to_string),
                message: check.map(|_| "timed out".into()),
                ..Default::default()
            }],
        };
        let f = facts(1, 1);
        let base = |old: Option<&DerpRegionStatus>, t| desired_status(&r, &f, &cert(), old, ts(t));
        let healthy = with_probe(
            base(None, 100),
            Some(node(true, None)),
            false,
            None,
            ts(100),
        );
        assert_eq!(
            condition_of(&healthy, CONDITION_HEALTHY),
            ("True".into(), "ProbesPassing".into())
        );
        assert!(probe_transitions(None, &healthy, &f).is_empty());
        // Failing: the condition says which check and that the map keeps it (gating off).
        let failing = with_probe(
            base(Some(&healthy), 200),
            Some(node(false, Some("stun"))),
            false,
            Some(&healthy),
            ts(200),
        );
        let c = failing
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_HEALTHY)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ProbeFailing")
        );
        assert!(
            c.message.contains("900-a: stun failing") && c.message.contains("still in the map")
        );
        let ev = probe_transitions(Some(&healthy), &failing, &f);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].reason, "ProbeFailingSTUN");
        // The related object is the Kubernetes Node: the recorder folds by it, not by the note.
        assert_eq!(
            ev[0].secondary.as_ref().and_then(|o| o.name.as_deref()),
            Some("a")
        );
        // The same verdict again: no Event; the condition keeps its transition time.
        let again = with_probe(
            base(Some(&failing), 300),
            Some(node(false, Some("stun"))),
            false,
            Some(&failing),
            ts(300),
        );
        assert_eq!(again, failing);
        assert!(probe_transitions(Some(&failing), &again, &f).is_empty());
        let back = with_probe(
            base(Some(&again), 400),
            Some(node(true, None)),
            true,
            Some(&again),
            ts(400),
        );
        let ev = probe_transitions(Some(&again), &back, &f);
        assert_eq!(
            ev.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["ProbeRecovered"]
        );
        // Probing off: neither status.probe nor the condition.
        let off = with_probe(base(Some(&back), 500), None, false, Some(&back), ts(500));
        assert!(off.probe.is_none());
        assert!(off.conditions.iter().all(|c| c.type_ != CONDITION_HEALTHY));
    }

    #[test]
    fn ready_reasons_read_back_as_themselves() {
        for r in ReadyReason::ALL {
            assert_eq!(ReadyReason::parse(r.as_str()), Some(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(ReadyReason::parse("Unknown"), None);
    }

    fn condition_of(s: &DerpRegionStatus, t: &str) -> (String, String) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn missing_cert_manager_is_a_condition_and_an_event() {
        let r = region("home", 900);
        let cm = CertState::cert_manager_missing();
        let s = desired_status(&r, &facts(0, 0), &cm, None, ts(1));
        let c = &s.conditions[1];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "CertManagerMissing")
        );
        let reasons: Vec<String> = transitions(None, &s)
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert!(
            reasons.contains(&"CertManagerMissing".to_string()),
            "{reasons:?}"
        );
    }
}
