//! `operator run`: wires the watch caches, the map task, the map server, leader election and the
//! `DerpRegion` controller together under one cancellation token.
//!
//! One watch per kind feeds a reflector store; each reflector stream, after its store applied an
//! event, wakes the map task and then flows on into the controller as its trigger
//! (`for_stream`/`owns_stream`/`watches_stream`), so the map and the reconciler read the same
//! caches and the cluster is watched once. The controller runs on every replica (it drives the
//! streams) but its reconcile acts only on the Lease holder; winning the Lease reconciles every
//! region at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apply::WriteCounters;
use crate::controller::{self, Context, Stores, certificate_resource};
use crate::crd::DerpRegion;
use crate::leader::{self, LeaseConfig};
use crate::mapbuild::MapConfig;
use crate::mapserver::{self, MapServerState};
use crate::maptask::{MapConfigMap, MapStats, MapTask};
use crate::probe::{ProbeConfig, ProbeMetrics, Prober};
use crate::render::{APP_NAME, LABEL_MANAGED_BY, LABEL_NAME, LABEL_REGION, MANAGER_NAME};
use crate::slim;

/// How often a missing cert-manager Certificate CRD is looked for again, so installing
/// cert-manager later needs no operator restart.
const CERT_CRD_POLL: Duration = Duration::from_secs(30);
/// The controller folds triggers for one region arriving within this window into one reconcile.
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(100);
/// Objects per page of a watcher's initial LIST. A page is deserialized whole, as full objects
/// (managedFields, Pod specs, statuses), before the first of them is slimmed, and every watcher
/// lists at once on start: with kube-runtime's default of 500, those pages were 52 of the 94 MiB
/// peak heap of a replica starting at 500 regions (bench/operator-scale/README.md). 100 brought
/// that peak to 49 MiB for 5x the LIST requests (50 instead of 10 for 5000 Pods).
const LIST_PAGE_SIZE: u32 = 100;

/// Configuration of `operator run` (the CLI fills it; nothing here knows about clap).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub map_addr: SocketAddr,
    /// A second listener with the same endpoints (for a metrics-only Service or NetworkPolicy).
    pub metrics_addr: Option<SocketAddr>,
    pub map: MapConfig,
    /// Watch DerpRegions and their objects in this namespace only (all when `None`).
    pub watch_namespace: Option<String>,
    /// Namespace of the operator: its Lease and the `derp-map` ConfigMap.
    pub operator_namespace: String,
    pub lease: LeaseConfig,
    /// Image for regions that name none.
    pub derper_image: Option<String>,
    /// Name of the ConfigMap the leader writes the map to; `None` disables it.
    pub map_configmap: Option<String>,
    /// Most regions reconciled at once (0: no limit).
    pub reconcile_concurrency: u16,
    /// The fleet prober (`None`: off).
    pub probe: Option<ProbeConfig>,
    /// Nodes the prober holds failing leave the map (see `probe`).
    pub probe_gates_map: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("map server: {0}")]
    Serve(std::io::Error),
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflector over `api`: each object is slimmed (`slim`, before it is stored), the store is
/// updated, then, if the event changed what the operator reads (see `slim::Fingerprint`: a Node
/// heartbeat or a DaemonSet rollout counter does not), `changed` is signalled and the event flows
/// on (as the objects it touched) to the controller.
fn reflect<K>(
    api: Api<K>,
    wc: watcher::Config,
    writer: Writer<K>,
    changed: Arc<Notify>,
    slim: fn(&mut K),
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource
        + slim::Fingerprint
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    slim::only_changes(
        watcher(api, wc)
            .default_backoff()
            .modify(slim)
            .reflect(writer),
    )
    .inspect(move |_| changed.notify_one())
    .touched_objects()
}

/// The controller's backoff over its merged trigger streams: none. kube-runtime's default
/// (800 ms doubling to 30 s, with jitter, reset after 120 s) pauses *every* watch at once when
/// any one of them reports an error, and every watcher reports its own after an API server
/// restart (refused connects, then `410 Expired`): the stores, hence the map on every replica,
/// then froze for over a minute with each error lengthening the pause (tests/e2e_faults.rs).
/// Each watcher already backs off alone (`default_backoff`), which is the pacing wanted.
struct NoTriggerBackoff;

impl Iterator for NoTriggerBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        // `None` would end the controller's trigger stream; zero resumes at once.
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoTriggerBackoff {
    fn reset(&mut self) {}
}

/// The watcher configuration every watch here starts from (see [`LIST_PAGE_SIZE`]).
fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// Metrics text of the operator's own counters.
fn operator_metrics(
    counters: Arc<WriteCounters>,
    stats: Arc<MapStats>,
    ctx: Arc<Context>,
    leader: watch::Receiver<bool>,
    probe: Option<Arc<ProbeMetrics>>,
) -> mapserver::ExtraMetrics {
    Arc::new(move || {
        let mut text = counters_text(&counters, &stats, &ctx, &leader);
        text.push_str(&region_metrics(&ctx, &stats));
        if let Some(p) = &probe {
            text.push_str(&p.render());
        }
        text
    })
}

/// Per region: nodes selected and nodes in the map; and when the map last changed.
fn region_metrics(ctx: &Context, stats: &MapStats) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# HELP derp_fleet_region_desired_nodes Nodes the region selects.\n\
         # TYPE derp_fleet_region_desired_nodes gauge\n",
    );
    let mut ready = String::from(
        "# HELP derp_fleet_region_ready_nodes Nodes of the region in the DERP map.\n\
         # TYPE derp_fleet_region_ready_nodes gauge\n",
    );
    if let Some(m) = ctx.map.borrow().as_ref() {
        for ((ns, name), f) in &m.facts {
            let l = format!("namespace=\"{ns}\",region=\"{name}\"");
            let _ = writeln!(out, "derp_fleet_region_desired_nodes{{{l}}} {}", f.desired);
            let _ = writeln!(ready, "derp_fleet_region_ready_nodes{{{l}}} {}", f.ready);
        }
    }
    out.push_str(&ready);
    let last = stats.last_publication_ms.load(Ordering::Relaxed);
    if last > 0 {
        let _ = write!(
            out,
            "# HELP derp_fleet_map_last_publication_timestamp_seconds When this replica last \
             published a changed map (Unix seconds).\n\
             # TYPE derp_fleet_map_last_publication_timestamp_seconds gauge\n\
             derp_fleet_map_last_publication_timestamp_seconds {}\n",
            last as f64 / 1000.0
        );
    }
    out
}

fn counters_text(
    counters: &WriteCounters,
    stats: &MapStats,
    ctx: &Context,
    leader: &watch::Receiver<bool>,
) -> String {
    {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP derpfleet_operator_leader Whether this replica holds the Lease.\n\
             # TYPE derpfleet_operator_leader gauge\n\
             derpfleet_operator_leader {}\n\
             # HELP derpfleet_operator_reconciles_total Reconciles run (leader only).\n\
             # TYPE derpfleet_operator_reconciles_total counter\n\
             derpfleet_operator_reconciles_total {}\n\
             # HELP derpfleet_operator_apply_requests_total Write requests sent (server-side apply of objects and status).\n\
             # TYPE derpfleet_operator_apply_requests_total counter\n\
             derpfleet_operator_apply_requests_total {}\n\
             # HELP derpfleet_operator_writes_total Writes that changed an object.\n\
             # TYPE derpfleet_operator_writes_total counter\n\
             derpfleet_operator_writes_total {}\n\
             # HELP derpfleet_operator_apply_skipped_total Applies skipped because the cache already held the object.\n\
             # TYPE derpfleet_operator_apply_skipped_total counter\n\
             derpfleet_operator_apply_skipped_total {}\n\
             # HELP derpfleet_operator_events_total Kubernetes Events published.\n\
             # TYPE derpfleet_operator_events_total counter\n\
             derpfleet_operator_events_total {}\n\
             # HELP derpfleet_operator_deletes_total Delete requests for objects a region no longer uses.\n\
             # TYPE derpfleet_operator_deletes_total counter\n\
             derpfleet_operator_deletes_total {}\n\
             # HELP derpfleet_map_builds_total Map rebuilds.\n\
             # TYPE derpfleet_map_builds_total counter\n\
             derpfleet_map_builds_total {}\n\
             # HELP derpfleet_map_publications_total Map rebuilds whose bytes changed.\n\
             # TYPE derpfleet_map_publications_total counter\n\
             derpfleet_map_publications_total {}\n\
             # HELP derpfleet_map_withheld_builds_total Builds not served because they had no region while DerpRegions exist.\n\
             # TYPE derpfleet_map_withheld_builds_total counter\n\
             derpfleet_map_withheld_builds_total {}\n",
            u8::from(*leader.borrow()),
            l(&ctx.reconciles),
            l(&counters.apply_requests),
            l(&counters.changed),
            l(&counters.skipped),
            l(&counters.events),
            l(&counters.deletes),
            l(&stats.builds),
            l(&stats.publications),
            l(&stats.withheld),
        )
    }
}

/// Runs the operator until `cancel` fires; then stops the controller, releases the Lease and
/// drains the HTTP servers.
pub async fn run(
    client: Client,
    cfg: RunConfig,
    cancel: CancellationToken,
) -> Result<(), RunError> {
    let ns = cfg.watch_namespace.as_deref();
    let changed = Arc::new(Notify::new());
    let counters = Arc::new(WriteCounters::default());
    let stats = Arc::new(MapStats::default());

    // Bind first: a port clash is a start-up error, not a silent replica without a map.
    let map_listener = tokio::net::TcpListener::bind(cfg.map_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: cfg.map_addr,
            source,
        })?;
    let metrics_listener = match cfg.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?,
        ),
        None => None,
    };
    info!(map_addr = %cfg.map_addr, metrics_addr = ?cfg.metrics_addr, namespace = ?ns, "operator starting");

    // Watch caches.
    let ours = format!("{LABEL_MANAGED_BY}={MANAGER_NAME}");
    let (regions_r, regions_w) = reflector::store::<DerpRegion>();
    let (nodes_r, nodes_w) = reflector::store::<Node>();
    let (pods_r, pods_w) = reflector::store::<Pod>();
    let (secrets_r, secrets_w) = reflector::store::<Secret>();
    let (cms_r, cms_w) = reflector::store::<ConfigMap>();
    let (ds_r, ds_w) = reflector::store::<DaemonSet>();
    let cert_ar = certificate_resource();
    let certs_w = Writer::<DynamicObject>::new(cert_ar.clone());
    let certs_r = certs_w.as_reader();
    let stores = Stores {
        regions: regions_r.clone(),
        nodes: nodes_r,
        pods: pods_r,
        secrets: secrets_r,
        configmaps: cms_r,
        daemonsets: ds_r,
        certificates: certs_r,
    };

    let regions_s = reflect(
        api::<DerpRegion>(&client, ns),
        list_config(),
        regions_w,
        changed.clone(),
        slim::other,
    );
    let nodes_s = reflect(
        Api::<Node>::all(client.clone()),
        list_config(),
        nodes_w,
        changed.clone(),
        slim::node,
    );
    let pods_s = reflect(
        api::<Pod>(&client, ns),
        list_config().labels(&format!("{LABEL_NAME}={APP_NAME},{LABEL_REGION}")),
        pods_w,
        changed.clone(),
        slim::pod,
    );
    let secrets_s = reflect(
        api::<Secret>(&client, ns),
        list_config().labels(&ours),
        secrets_w,
        changed.clone(),
        slim::other,
    );
    let cms_s = reflect(
        api::<ConfigMap>(&client, ns),
        list_config().labels(&ours),
        cms_w,
        changed.clone(),
        slim::other,
    );
    let ds_s = reflect(
        api::<DaemonSet>(&client, ns),
        list_config().labels(&ours),
        ds_w,
        changed.clone(),
        slim::daemonset,
    );
    // Every Secret's metadata (no data is cached): a change of the Secret a region names in
    // `tls.secretName` (created, replaced, renewed by someone else, deleted) reconciles it at
    // once instead of on the next recheck. Our own Secrets come through `secrets_s` already.
    let secrets_meta: Api<PartialObjectMeta<Secret>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let provided_secrets_s = watcher(secrets_meta, list_config())
        .default_backoff()
        .touched_objects();
    // Certificates: watched once cert-manager's CRD exists (looked for every 30 s until then).
    let cert_crd = Arc::new(AtomicBool::new(false));
    let certs_s = {
        let client = client.clone();
        let cert_crd = cert_crd.clone();
        let changed = changed.clone();
        let ar = cert_ar.clone();
        let ours = ours.clone();
        let ns = cfg.watch_namespace.clone();
        let cancel = cancel.clone();
        futures::stream::once(async move {
            loop {
                if controller::cert_crd_installed(&client).await {
                    break;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(CERT_CRD_POLL) => {}
                }
            }
            cert_crd.store(true, Ordering::Relaxed);
            info!("cert-manager Certificate CRD found; watching Certificates");
            let api = match &ns {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client, ns, &ar),
                None => Api::<DynamicObject>::all_with(client, &ar),
            };
            Some(
                watcher(api, list_config().labels(&ours))
                    .default_backoff()
                    .modify(slim::other)
                    .reflect(certs_w)
                    .inspect(move |_| changed.notify_one())
                    .touched_objects(),
            )
        })
        .filter_map(|s| async move { s })
        .flatten()
    };

    // Leadership.
    let (leader_tx, leader_rx) = watch::channel(false);
    let leader_task = tokio::spawn(leader::run(
        client.clone(),
        cfg.lease.clone(),
        leader_tx,
        cancel.clone(),
    ));

    // Map task and map server.
    let (snap_tx, snap_rx) = watch::channel(None);
    let (out_tx, out_rx) = watch::channel(None);
    let (trigger_tx, mut trigger_rx) = mpsc::unbounded_channel::<ObjectRef<DerpRegion>>();
    let (probe_tx, probe_rx) = watch::channel(None);
    let probe_metrics = cfg
        .probe
        .as_ref()
        .map(|_| Arc::new(ProbeMetrics::default()));
    let prober = cfg.probe.clone().map(|config| Prober {
        config,
        map: out_rx.clone(),
        regions: stores.regions.clone(),
        secrets: stores.secrets.clone(),
        report: probe_tx,
        trigger: trigger_tx.clone(),
        metrics: probe_metrics.clone().unwrap_or_default(),
    });
    let (held_tx, held_rx) = watch::channel(None);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "derp-fleet-operator".into(),
            instance: Some(cfg.lease.identity.clone()),
        },
    );
    let map_task = MapTask {
        stores: stores.clone(),
        config: cfg.map.clone(),
        changed: changed.clone(),
        snapshot: snap_tx,
        output: out_tx,
        trigger: trigger_tx,
        leader: leader_rx.clone(),
        configmap: cfg.map_configmap.as_ref().map(|name| MapConfigMap {
            api: Api::namespaced(client.clone(), &cfg.operator_namespace),
            namespace: cfg.operator_namespace.clone(),
            name: name.clone(),
        }),
        counters: counters.clone(),
        stats: stats.clone(),
        probe_gates_map: cfg.probe_gates_map,
        held: held_tx,
        recorder: Some(recorder.clone()),
    };
    let map_handle = tokio::spawn(map_task.run(cancel.clone()));
    let probe_handle = prober.map(|p| tokio::spawn(p.run(cancel.clone())));

    let ctx = Arc::new(Context {
        client: client.clone(),
        stores: stores.clone(),
        recorder,
        counters: counters.clone(),
        map: out_rx,
        probe: probe_rx,
        probe_gates_map: cfg.probe_gates_map,
        leader: leader_rx.clone(),
        cert_crd,
        derper_image: cfg.derper_image.clone(),
        failures: Default::default(),
        reconciles: Default::default(),
    });

    let state = MapServerState::new(snap_rx)
        .with_held(held_rx)
        .with_extra_metrics(operator_metrics(
            counters,
            stats,
            ctx.clone(),
            leader_rx.clone(),
            probe_metrics,
        ));
    let server = {
        let c = cancel.clone();
        tokio::spawn(mapserver::serve(map_listener, state.clone(), async move {
            c.cancelled().await
        }))
    };
    let metrics_server = metrics_listener.map(|l| {
        let c = cancel.clone();
        tokio::spawn(mapserver::serve(
            l,
            state,
            async move { c.cancelled().await },
        ))
    });

    // Winning the Lease reconciles every region.
    let became_leader = futures::stream::unfold(leader_rx, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    });
    let facts_changed = futures::stream::poll_fn(move |cx| trigger_rx.poll_recv(cx));
    let node_regions = regions_r.clone();
    let secret_regions = regions_r.clone();
    let shutdown = cancel.clone();
    Controller::for_stream(regions_s, regions_r)
        .with_config(
            ControllerConfig::default()
                .debounce(RECONCILE_DEBOUNCE)
                .concurrency(cfg.reconcile_concurrency),
        )
        .trigger_backoff(NoTriggerBackoff)
        .owns_stream(ds_s)
        .owns_stream(secrets_s)
        .owns_stream(cms_s)
        .owns_stream_with(certs_s, cert_ar)
        .watches_stream(nodes_s, move |n: Node| {
            controller::regions_for_node(&node_regions, &n)
        })
        .watches_stream(pods_s, |p: Pod| controller::region_for_pod(&p))
        .watches_stream(provided_secrets_s, move |s: PartialObjectMeta<Secret>| {
            controller::regions_for_secret(
                &secret_regions,
                s.metadata.namespace.as_deref(),
                s.metadata.name.as_deref().unwrap_or_default(),
            )
        })
        .reconcile_on(facts_changed)
        .reconcile_all_on(became_leader)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                match e {
                    kube::runtime::controller::Error::ReconcilerFailed(..) => {} // logged by error_policy
                    e => warn!("controller: {e}"),
                }
            }
        })
        .await;
    info!("controller stopped");

    // The controller returns only after cancel (or when its streams end): stop everything else.
    cancel.cancel();
    let _ = leader_task.await;
    let _ = map_handle.await;
    if let Some(p) = probe_handle {
        let _ = p.await;
    }
    let served = server.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    info!("operator stopped");
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RunError::Serve(e)),
        Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
    }
}
