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

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
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
) -> Watch<K>
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
    .boxed()
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

/// `state` serving the operator's own metrics (and the prober's) after the map server's.
fn with_operator_metrics(
    state: MapServerState,
    counters: Arc<WriteCounters>,
    stats: Arc<MapStats>,
    ctx: Arc<Context>,
    leader: watch::Receiver<bool>,
    probe: Option<Arc<ProbeMetrics>>,
) -> MapServerState {
    let own = OperatorMetrics {
        counters,
        stats,
        ctx,
        leader,
    };
    let state = state.with_metrics(Arc::new(own));
    match probe {
        Some(p) => state.with_metrics(p),
        None => state,
    }
}

/// The controller's and the map task's counters, and per region the nodes selected and in the
/// map, as read at one scrape.
struct OperatorMetrics {
    counters: Arc<WriteCounters>,
    stats: Arc<MapStats>,
    ctx: Arc<Context>,
    leader: watch::Receiver<bool>,
}

impl std::fmt::Debug for OperatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorMetrics")
    }
}

impl Collector for OperatorMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::{RegionLabels, counter, gauge, gauge_family};
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (c, s) = (&self.counters, &self.stats);
        let leader = i64::from(*self.leader.borrow());
        gauge(
            &mut e,
            "derpfleet_operator_leader",
            "Whether this replica holds the Lease.",
            leader,
        )?;
        let counters = [
            (
                "derpfleet_operator_reconciles",
                "Reconciles run (leader only).",
                &self.ctx.reconciles,
            ),
            (
                "derpfleet_operator_apply_requests",
                "Write requests sent (server-side apply of objects and status).",
                &c.apply_requests,
            ),
            (
                "derpfleet_operator_writes",
                "Writes that changed an object.",
                &c.changed,
            ),
            (
                "derpfleet_operator_apply_skipped",
                "Applies skipped because the cache already held the object.",
                &c.skipped,
            ),
            (
                "derpfleet_operator_events",
                "Kubernetes Events published.",
                &c.events,
            ),
            (
                "derpfleet_operator_deletes",
                "Delete requests for objects a region no longer uses.",
                &c.deletes,
            ),
            ("derpfleet_map_builds", "Map rebuilds.", &s.builds),
            (
                "derpfleet_map_publications",
                "Map rebuilds whose bytes changed.",
                &s.publications,
            ),
            (
                "derpfleet_map_withheld_builds",
                "Builds not served because they had no region while DerpRegions exist.",
                &s.withheld,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut e, name, help, l(value))?;
        }
        let map = self.ctx.map.borrow().clone();
        let facts = || map.iter().flat_map(|m| m.facts.iter());
        gauge_family(
            &mut e,
            "derp_fleet_region_desired_nodes",
            "Nodes the region selects.",
            facts().map(|(k, f)| (RegionLabels::of(k), i64::from(f.desired))),
        )?;
        gauge_family(
            &mut e,
            "derp_fleet_region_ready_nodes",
            "Nodes of the region in the DERP map.",
            facts().map(|(k, f)| (RegionLabels::of(k), i64::from(f.ready))),
        )?;
        let last = l(&s.last_publication_ms);
        if last > 0 {
            gauge(
                &mut e,
                "derp_fleet_map_last_publication_timestamp_seconds",
                "When this replica last published a changed map (Unix seconds).",
                last as f64 / 1000.0,
            )?;
        }
        Ok(())
    }
}

/// Runs the operator until `cancel` fires; then stops the controller, releases the Lease and
/// drains the HTTP servers. About 100 lines because it is the wiring diagram: every channel,
/// task and server is made here in start-up order (each by its own type or helper), so one read
/// shows what feeds what.
pub async fn run(
    client: Client,
    cfg: RunConfig,
    cancel: CancellationToken,
) -> Result<(), RunError> {
    // Bind first: a port clash is a start-up error, not a silent replica without a map.
    let (map_listener, metrics_listener) = bind(&cfg).await?;
    info!(map_addr = %cfg.map_addr, metrics_addr = ?cfg.metrics_addr,
        namespace = ?cfg.watch_namespace, "operator starting");
    let changed = Arc::new(Notify::new());
    let (stores, watches) = watch_all(&client, &cfg, &changed, &cancel);
    let cert_crd = watches.cert_crd.clone();

    let (leader_tx, leader_rx) = watch::channel(false);
    // The Lease is released only after the map task stopped: as leader it may still write the
    // ConfigMap on its way out, and a standby must not take over before that.
    let lease_cancel = CancellationToken::new();
    let leader_task = tokio::spawn(leader::run(
        client.clone(),
        cfg.lease.clone(),
        leader_tx,
        lease_cancel.clone(),
    ));

    let counters = Arc::new(WriteCounters::default());
    let stats = Arc::new(MapStats::default());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "derp-fleet-operator".into(),
            instance: Some(cfg.lease.identity.clone()),
        },
    );
    let (snap_tx, snap_rx) = watch::channel(None);
    let (out_tx, out_rx) = watch::channel(None);
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<DerpRegion>>();
    let (probe_tx, probe_rx) = watch::channel(None);
    let (held_tx, held_rx) = watch::channel(None);
    let prober = cfg.probe.clone().map(|config| Prober {
        config,
        map: out_rx.clone(),
        regions: stores.regions.clone(),
        secrets: stores.secrets.clone(),
        report: probe_tx,
        trigger: trigger_tx.clone(),
        metrics: Arc::default(),
    });
    let probe_metrics = prober.as_ref().map(|p| p.metrics.clone());
    let map_task = MapTask {
        stores: stores.clone(),
        config: cfg.map.clone(),
        changed,
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
        client,
        stores,
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
    let state = with_operator_metrics(
        MapServerState::new(snap_rx).with_held(held_rx),
        counters,
        stats,
        ctx.clone(),
        leader_rx.clone(),
        probe_metrics,
    );
    let servers = Servers::spawn(map_listener, metrics_listener, &state, &cancel);

    run_controller(watches, ctx, leader_rx, trigger_rx, &cfg, cancel.clone()).await;
    info!("controller stopped");

    // The controller returns only after cancel (or when its streams end): stop everything else.
    cancel.cancel();
    let _ = map_handle.await;
    lease_cancel.cancel();
    let _ = leader_task.await;
    if let Some(p) = probe_handle {
        let _ = p.await;
    }
    let served = servers.wait().await;
    info!("operator stopped");
    served
}

/// The map server and the optional metrics-only server, draining on `cancel`.
struct Servers {
    map: tokio::task::JoinHandle<std::io::Result<()>>,
    metrics: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Servers {
    fn spawn(
        map: tokio::net::TcpListener,
        metrics: Option<tokio::net::TcpListener>,
        state: &MapServerState,
        cancel: &CancellationToken,
    ) -> Self {
        let serve = |listener| {
            let c = cancel.clone();
            tokio::spawn(mapserver::serve(listener, state.clone(), async move {
                c.cancelled().await
            }))
        };
        Self {
            map: serve(map),
            metrics: metrics.map(serve),
        }
    }

    /// Waits for both to drain; the map server's failure is the operator's.
    async fn wait(self) -> Result<(), RunError> {
        let served = self.map.await;
        if let Some(m) = self.metrics {
            let _ = m.await;
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::Serve(e)),
            Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
        }
    }
}

/// The map listener and the optional metrics listener.
async fn bind(
    cfg: &RunConfig,
) -> Result<(tokio::net::TcpListener, Option<tokio::net::TcpListener>), RunError> {
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { addr, source })
    };
    let map = bind(cfg.map_addr).await?;
    let metrics = match cfg.metrics_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    Ok((map, metrics))
}

type Watch<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The controller's trigger streams, one per watched kind (each already feeding its store).
struct Watches {
    regions: Watch<DerpRegion>,
    regions_reader: Store<DerpRegion>,
    nodes: Watch<Node>,
    pods: Watch<Pod>,
    secrets: Watch<Secret>,
    configmaps: Watch<ConfigMap>,
    daemonsets: Watch<DaemonSet>,
    /// Metadata of every Secret, for the ones regions name in `tls.secretName`.
    provided_secrets: Watch<PartialObjectMeta<Secret>>,
    certificates: Watch<DynamicObject>,
    /// Set once cert-manager's Certificate CRD is found.
    cert_crd: Arc<AtomicBool>,
}

/// One watch per kind, each feeding a store of [`Stores`] and waking `changed`.
fn watch_all(
    client: &Client,
    cfg: &RunConfig,
    changed: &Arc<Notify>,
    cancel: &CancellationToken,
) -> (Stores, Watches) {
    let ns = cfg.watch_namespace.as_deref();
    let ours = format!("{LABEL_MANAGED_BY}={MANAGER_NAME}");
    let (regions_r, regions_w) = reflector::store::<DerpRegion>();
    let (nodes_r, nodes_w) = reflector::store::<Node>();
    let (pods_r, pods_w) = reflector::store::<Pod>();
    let (secrets_r, secrets_w) = reflector::store::<Secret>();
    let (cms_r, cms_w) = reflector::store::<ConfigMap>();
    let (ds_r, ds_w) = reflector::store::<DaemonSet>();
    let certs_w = Writer::<DynamicObject>::new(certificate_resource());
    let stores = Stores {
        regions: regions_r.clone(),
        nodes: nodes_r,
        pods: pods_r,
        secrets: secrets_r,
        configmaps: cms_r,
        daemonsets: ds_r,
        certificates: certs_w.as_reader(),
    };
    let pods_config = list_config().labels(&format!("{LABEL_NAME}={APP_NAME},{LABEL_REGION}"));
    let cert_crd = Arc::new(AtomicBool::new(false));
    let watches = Watches {
        regions: reflect(
            api::<DerpRegion>(client, ns),
            list_config(),
            regions_w,
            changed.clone(),
            slim::other,
        ),
        regions_reader: regions_r,
        nodes: reflect(
            Api::<Node>::all(client.clone()),
            list_config(),
            nodes_w,
            changed.clone(),
            slim::node,
        ),
        pods: reflect(
            api::<Pod>(client, ns),
            pods_config,
            pods_w,
            changed.clone(),
            slim::pod,
        ),
        secrets: reflect(
            api::<Secret>(client, ns),
            list_config().labels(&ours),
            secrets_w,
            changed.clone(),
            slim::other,
        ),
        configmaps: reflect(
            api::<ConfigMap>(client, ns),
            list_config().labels(&ours),
            cms_w,
            changed.clone(),
            slim::other,
        ),
        daemonsets: reflect(
            api::<DaemonSet>(client, ns),
            list_config().labels(&ours),
            ds_w,
            changed.clone(),
            slim::daemonset,
        ),
        // Every Secret's metadata (no data is cached): a change of the Secret a region names
        // in `tls.secretName` (created, replaced, renewed by someone else, deleted) reconciles
        // it at once instead of on the next recheck. Our own Secrets come through `secrets`.
        provided_secrets: watcher(api::<PartialObjectMeta<Secret>>(client, ns), list_config())
            .default_backoff()
            .touched_objects()
            .boxed(),
        certificates: certificate_watch(
            client.clone(),
            cfg.watch_namespace.clone(),
            certs_w,
            CertWatch {
                crd_found: cert_crd.clone(),
                changed: changed.clone(),
                cancel: cancel.clone(),
            },
        ),
        cert_crd,
    };
    (stores, watches)
}

/// What the Certificate watch reports to and stops on.
struct CertWatch {
    crd_found: Arc<AtomicBool>,
    changed: Arc<Notify>,
    cancel: CancellationToken,
}

/// Certificates: watched once cert-manager's CRD exists (looked for every 30 s until then).
fn certificate_watch(
    client: Client,
    ns: Option<String>,
    writer: Writer<DynamicObject>,
    w: CertWatch,
) -> Watch<DynamicObject> {
    let ours = format!("{LABEL_MANAGED_BY}={MANAGER_NAME}");
    futures::stream::once(async move {
        loop {
            if controller::cert_crd_installed(&client).await {
                break;
            }
            tokio::select! {
                _ = w.cancel.cancelled() => return None,
                _ = tokio::time::sleep(CERT_CRD_POLL) => {}
            }
        }
        w.crd_found.store(true, Ordering::Relaxed);
        info!("cert-manager Certificate CRD found; watching Certificates");
        let ar = certificate_resource();
        let api = match &ns {
            Some(ns) => Api::<DynamicObject>::namespaced_with(client, ns, &ar),
            None => Api::<DynamicObject>::all_with(client, &ar),
        };
        let changed = w.changed;
        Some(
            watcher(api, list_config().labels(&ours))
                .default_backoff()
                .modify(slim::other)
                .reflect(writer)
                .inspect(move |_| changed.notify_one())
                .touched_objects(),
        )
    })
    .filter_map(|s| async move { s })
    .flatten()
    .boxed()
}

/// The `DerpRegion` controller, fed by `watches`, until `cancel`. Winning the Lease reconciles
/// every region; a region whose map facts changed is reconciled at once.
async fn run_controller(
    watches: Watches,
    ctx: Arc<Context>,
    leader: watch::Receiver<bool>,
    mut facts_changed: mpsc::UnboundedReceiver<ObjectRef<DerpRegion>>,
    cfg: &RunConfig,
    cancel: CancellationToken,
) {
    let became_leader = futures::stream::unfold(leader, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            if *rx.borrow_and_update() {
                return Some(((), rx));
            }
        }
    });
    let facts_changed = futures::stream::poll_fn(move |cx| facts_changed.poll_recv(cx));
    let node_regions = watches.regions_reader.clone();
    let secret_regions = watches.regions_reader.clone();
    Controller::for_stream(watches.regions, watches.regions_reader)
        .with_config(
            ControllerConfig::default()
                .debounce(RECONCILE_DEBOUNCE)
                .concurrency(cfg.reconcile_concurrency),
        )
        .trigger_backoff(NoTriggerBackoff)
        .owns_stream(watches.daemonsets)
        .owns_stream(watches.secrets)
        .owns_stream(watches.configmaps)
        .owns_stream_with(watches.certificates, certificate_resource())
        .watches_stream(watches.nodes, move |n: Node| {
            controller::regions_for_node(&node_regions, &n)
        })
        .watches_stream(watches.pods, |p: Pod| controller::region_for_pod(&p))
        .watches_stream(
            watches.provided_secrets,
            move |s: PartialObjectMeta<Secret>| {
                controller::regions_for_secret(
                    &secret_regions,
                    s.metadata.namespace.as_deref(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                )
            },
        )
        .reconcile_on(facts_changed)
        .reconcile_all_on(became_leader)
        .graceful_shutdown_on(async move { cancel.cancelled().await })
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
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::mapbuild::{MapOutput, RegionFacts, RegionKey};

    /// Each series of an exposition as `type name{label keys, sorted}`. A sample's type is its
    /// family's (`# TYPE`), found by the sample's name or by the name less `_total`, `_bucket`,
    /// `_sum` or `_count` (the text format names a counter family with `_total`, OpenMetrics
    /// without).
    fn shape(text: &str) -> BTreeSet<String> {
        let types: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.strip_prefix("# TYPE ")?.split_whitespace();
                Some((it.next()?, it.next()?))
            })
            .collect();
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty());
        samples
            .map(|l| {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                let mut keys: Vec<&str> = l
                    .split_once('{')
                    .and_then(|(_, rest)| rest.split_once('}'))
                    .map(|(ls, _)| ls.split(',').filter_map(|kv| kv.split_once('=')))
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                    .collect();
                keys.sort_unstable();
                let kind = types.get(name).or_else(|| {
                    ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| types.get(name.strip_suffix(s)?))
                });
                format!(
                    "{} {name}{{{}}}",
                    kind.unwrap_or(&"untyped"),
                    keys.join(",")
                )
            })
            .collect()
    }

    /// `/metrics` of a replica that leads, has published a map with one region and probes one
    /// node (the way `run` wires it).
    fn exposition() -> String {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let stores = Stores {
            regions: reflector::store().0,
            nodes: reflector::store().0,
            pods: reflector::store().0,
            secrets: reflector::store().0,
            configmaps: reflector::store().0,
            daemonsets: reflector::store().0,
            certificates: Writer::<DynamicObject>::new(certificate_resource()).as_reader(),
        };
        let mut out = MapOutput::default();
        let facts = RegionFacts {
            desired: 3,
            ready: 2,
            ..Default::default()
        };
        out.facts.insert(RegionKey::new("derp", "home"), facts);
        let (_, map) = watch::channel(Some(Arc::new(out)));
        let (_, probe) = watch::channel(None);
        let (_, leader) = watch::channel(true);
        let reporter = Reporter {
            controller: "test".into(),
            instance: None,
        };
        let ctx = Arc::new(Context {
            client: client.clone(),
            stores,
            recorder: Recorder::new(client, reporter),
            counters: Arc::default(),
            map,
            probe,
            probe_gates_map: false,
            leader: leader.clone(),
            cert_crd: Arc::default(),
            derper_image: None,
            failures: Default::default(),
            reconciles: Default::default(),
        });
        ctx.reconciles.store(7, Ordering::Relaxed);
        let stats = Arc::new(MapStats::default());
        stats
            .last_publication_ms
            .store(1_790_000_000_500, Ordering::Relaxed);
        let (_, snap) = watch::channel(None);
        let (_, held) = watch::channel(None);
        let state = MapServerState::new(snap).with_held(held);
        let state = with_operator_metrics(
            state,
            ctx.counters.clone(),
            stats,
            ctx,
            leader,
            Some(Arc::new(crate::probe::ProbeMetrics::example())),
        );
        mapserver::metrics_text(&state).unwrap()
    }

    /// Every name, type and label key the chart's dashboard, its alerts and the e2e tests may
    /// read; a change here is a breaking change for every Prometheus that stored them.
    #[tokio::test]
    async fn metrics_keep_every_name_type_and_label() {
        let text = exposition();
        let want = [
            "counter derpfleet_map_builds_total{}",
            "counter derpfleet_map_gzip_responses_total{}",
            "counter derpfleet_map_publications_total{}",
            "counter derpfleet_map_requests_total{result}",
            "counter derpfleet_map_withheld_builds_total{}",
            "counter derpfleet_operator_apply_requests_total{}",
            "counter derpfleet_operator_apply_skipped_total{}",
            "counter derpfleet_operator_deletes_total{}",
            "counter derpfleet_operator_events_total{}",
            "counter derpfleet_operator_reconciles_total{}",
            "counter derpfleet_operator_writes_total{}",
            "counter derp_fleet_probe_rounds_total{}",
            "gauge derpfleet_map_held{}",
            "gauge derpfleet_map_nodes{}",
            "gauge derpfleet_map_regions{}",
            "gauge derpfleet_operator_leader{}",
            "gauge derp_fleet_map_last_publication_timestamp_seconds{}",
            "gauge derp_fleet_probe_cert_not_after_seconds{namespace,node,region}",
            "gauge derp_fleet_probe_healthy{namespace,node,region}",
            "gauge derp_fleet_probe_mesh_success{from,namespace,region,to}",
            "gauge derp_fleet_probe_round_duration_seconds{}",
            "gauge derp_fleet_probe_success{check,namespace,node,region}",
            "gauge derp_fleet_region_desired_nodes{namespace,region}",
            "gauge derp_fleet_region_ready_nodes{namespace,region}",
            "histogram derp_fleet_probe_latency_seconds_bucket{check,le,namespace,region}",
            "histogram derp_fleet_probe_latency_seconds_count{check,namespace,region}",
            "histogram derp_fleet_probe_latency_seconds_sum{check,namespace,region}",
            "histogram derp_fleet_probe_mesh_delivery_seconds_bucket{le,namespace,region}",
            "histogram derp_fleet_probe_mesh_delivery_seconds_count{namespace,region}",
            "histogram derp_fleet_probe_mesh_delivery_seconds_sum{namespace,region}",
        ];
        let got = shape(&text);
        let want: BTreeSet<String> = want.into_iter().map(String::from).collect();
        assert_eq!(got, want, "{text}");
        for sample in [
            "derpfleet_operator_leader 1",
            "derpfleet_operator_reconciles_total 7",
            "derpfleet_map_requests_total{result=\"not_modified\"} 0",
            "derp_fleet_region_desired_nodes{namespace=\"derp\",region=\"home\"} 3",
            "derp_fleet_region_ready_nodes{namespace=\"derp\",region=\"home\"} 2",
            "derp_fleet_map_last_publication_timestamp_seconds 1790000000.5",
            "derp_fleet_probe_rounds_total 2",
        ] {
            assert!(text.contains(sample), "no {sample:?} in\n{text}");
        }
    }
}
