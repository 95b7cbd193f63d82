//! The map task every replica runs: rebuilds the DERP map from the shared watch caches whenever
//! one of them changes or a NotReady grace ends, publishes it to the map server through a `watch`
//! channel (only when its bytes change), hands the per-region facts to the controller (and asks
//! it to reconcile a region whose facts changed), and, on the leader, keeps the `derp-map`
//! ConfigMap (`derpmap.json` and Headscale's `derp.yaml`) equal to what is served.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use derp_proto::derpmap::DerpMap;
use exp_backoff::Backoff;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::apply::{self, WriteCounters};
use crate::controller::Stores;
use crate::crd::DerpRegion;
use crate::mapbuild::{MapConfig, MapInput, MapOutput, RegionFacts, RegionKey, build_map};
use crate::mapserver::MapSnapshot;
use crate::render::{APP_NAME, LABEL_MANAGED_BY, LABEL_NAME, MANAGER_NAME};

/// How long a starting replica waits for the `derp-map` ConfigMap.
const SEED_TIMEOUT: Duration = Duration::from_secs(5);

/// The map a `derp-map` ConfigMap holds, when it parses and has a region.
pub fn seed_from_configmap(cm: &ConfigMap) -> Option<DerpMap> {
    let json = cm.data.as_ref()?.get(CONFIGMAP_JSON_KEY)?;
    serde_json::from_str::<DerpMap>(json)
        .ok()
        .filter(|m| !m.regions.is_empty())
}

/// A held map is announced with an Event on at most this many DerpRegions.
const MAX_HOLD_EVENTS: usize = 20;

/// Keys of the `derp-map` ConfigMap.
pub const CONFIGMAP_JSON_KEY: &str = "derpmap.json";
pub const CONFIGMAP_YAML_KEY: &str = "derp.yaml";

/// Changes arriving within this window are folded into one rebuild (a DaemonSet rollout or the
/// initial list touches many objects at once). Small against the sub-second goal for a NotReady
/// pod to leave the map.
const COALESCE: Duration = Duration::from_millis(20);
/// A failed ConfigMap write is retried after this long (doubling up to 1 min).
const CONFIGMAP_RETRY_MIN: Duration = Duration::from_secs(1);
const CONFIGMAP_RETRY_MAX: Duration = Duration::from_secs(60);
/// The ConfigMap is written at most this often.
const CONFIGMAP_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// At shutdown the leader spends at most this long writing a map the ConfigMap still lags.
const CONFIGMAP_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The API server refuses a ConfigMap whose data exceeds 1 MiB (about 900 regions of 5 nodes
/// with JSON and YAML together); such a write is not sent.
pub const CONFIGMAP_MAX_DATA: usize = 1024 * 1024;

/// What [`ConfigMapWriter::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigMapWrite {
    /// Written, or already up to date.
    Done,
    /// Not written: the data would be this many bytes, over [`CONFIGMAP_MAX_DATA`].
    TooLarge(usize),
}
/// Slack after a grace deadline so the rebuild sees it passed (`now < until` is strict and the
/// pod's transition time has whole seconds).
const GRACE_SLACK: Duration = Duration::from_millis(5);

/// Where the leader writes the map.
#[derive(Clone)]
pub struct MapConfigMap {
    pub api: Api<ConfigMap>,
    pub namespace: String,
    pub name: String,
}

pub struct MapTask {
    pub stores: Stores,
    pub config: MapConfig,
    /// Signalled by every reflector after it applied an event.
    pub changed: Arc<Notify>,
    pub snapshot: watch::Sender<Option<Arc<MapSnapshot>>>,
    pub output: watch::Sender<Option<Arc<MapOutput>>>,
    /// Regions whose facts changed, for the controller's `reconcile_on`.
    pub trigger: mpsc::UnboundedSender<ObjectRef<DerpRegion>>,
    pub leader: watch::Receiver<bool>,
    pub configmap: Option<MapConfigMap>,
    pub counters: Arc<WriteCounters>,
    /// Map rebuilds and publications, for `/metrics`.
    pub stats: Arc<MapStats>,
    /// `--probe-gates-map`: nodes the prober's verdict (in the regions' status, so every replica
    /// serves the same map) holds failing leave the map.
    pub probe_gates_map: bool,
    /// Why the served map is not the latest build (`None`: it is): a build with no region while
    /// DerpRegions exist is never served, the last good map is, and `/readyz` says so.
    pub held: watch::Sender<Option<String>>,
    /// Publishes the Events of a held map (leader only); none in tests without an API server.
    pub recorder: Option<Recorder>,
}

#[derive(Debug, Default)]
pub struct MapStats {
    pub builds: std::sync::atomic::AtomicU64,
    pub publications: std::sync::atomic::AtomicU64,
    /// Unix milliseconds of the latest publication (0: none yet).
    pub last_publication_ms: std::sync::atomic::AtomicU64,
    /// Builds not served because they had no region while DerpRegions exist.
    pub withheld: std::sync::atomic::AtomicU64,
}

/// Why `out` must not be served: it has no region although `live_regions` DerpRegions exist.
/// Headscale reads any body as a map and would drop every region of ours until its next refresh
/// (or refuse to start), so an empty map is only served when there is really nothing to publish.
pub fn withhold_reason(out: &MapOutput, live_regions: usize) -> Option<String> {
    if !out.map.regions.is_empty() || live_regions == 0 {
        return None;
    }
    let why: Vec<String> = out
        .facts
        .iter()
        .filter_map(|(key, f)| f.not_published.as_ref().map(|r| format!("{key}: {r}")))
        .take(5)
        .collect();
    Some(format!(
        "the latest build has no region although {live_regions} DerpRegion(s) exist ({})",
        why.join("; ")
    ))
}

/// The `derp-map` ConfigMap for `map`.
pub fn render_map_configmap(
    cm: &MapConfigMap,
    out: &MapOutput,
) -> Result<ConfigMap, headscale_yaml::Error> {
    let labels = [
        (LABEL_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGER_NAME.to_string()),
    ]
    .into();
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(cm.name.clone()),
            namespace: Some(cm.namespace.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        data: Some(
            [
                (CONFIGMAP_JSON_KEY.to_string(), out.map.to_json()?),
                (
                    CONFIGMAP_YAML_KEY.to_string(),
                    headscale_yaml::to_string(&out.map)?,
                ),
            ]
            .into(),
        ),
        ..Default::default()
    })
}

impl MapTask {
    fn build(
        &self,
        previously_published: &BTreeSet<String>,
        unready_since: &BTreeMap<String, Timestamp>,
    ) -> MapOutput {
        let regions = self.stores.regions.state();
        let probe_failing = if self.probe_gates_map {
            crate::probe::failing_nodes(&regions)
        } else {
            BTreeSet::new()
        };
        // The caches' own `Arc`s: a rebuild shares the objects instead of copying them.
        build_map(
            &MapInput {
                regions: &regions,
                nodes: &self.stores.nodes.state(),
                pods: &self.stores.pods.state(),
                secrets: &self.stores.secrets.state(),
                previously_published,
                unready_since,
                now: Timestamp::now(),
                probe_failing: &probe_failing,
            },
            &self.config,
        )
    }

    /// Runs until `cancel`. Waits for the caches it reads to be synced before the first build, so
    /// no replica ever serves a map built from half a list.
    pub async fn run(self, cancel: CancellationToken) {
        let s = &self.stores;
        debug!("map task waiting for the caches");
        let synced = async {
            ready(&s.regions).await?;
            ready(&s.nodes).await?;
            ready(&s.pods).await?;
            ready(&s.secrets).await
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = synced => if r.is_err() { return },
        }
        info!("caches synced; building the first map");
        // What the last leader served: its nodes get the not-ready grace from the first build on,
        // and it is the last good map if the first builds have no region. So a replica started
        // while every derper is down (all replicas restarted across a Headscale refresh) serves
        // the fleet's map instead of 503.
        let seed = self.read_seed().await;
        let mut published: BTreeSet<String> = seed
            .iter()
            .flat_map(|m| m.regions.values())
            .flat_map(|r| r.nodes.iter().map(|n| n.name.clone()))
            .collect();
        let seed_snap = seed.as_ref().and_then(|m| match MapSnapshot::new(m) {
            Ok(snap) => Some(Arc::new(snap)),
            Err(e) => {
                warn!("the map seeded from the ConfigMap does not serialise, not using it: {e}");
                None
            }
        });
        let mut leader = self.leader.clone();
        let mut unready_since = BTreeMap::new();
        let mut last_facts: BTreeMap<RegionKey, RegionFacts> = BTreeMap::new();
        let mut writer = self
            .configmap
            .clone()
            .map(|target| ConfigMapWriter::new(target, self.counters.clone()));
        loop {
            let out = self.build(&published, &unready_since);
            self.stats.builds.fetch_add(1, Ordering::Relaxed);
            published = out.published.clone();
            unready_since = out.unready_since.clone();
            let snap = self.snapshot_to_serve(&out, seed_snap.as_ref());
            self.publish(snap.as_ref());
            for (key, f) in &out.facts {
                if last_facts.get(key) != Some(f) {
                    let _ = self.trigger.send(key.object_ref());
                }
            }
            last_facts = out.facts.clone();
            let next_rebuild = out.next_rebuild;
            let out = Arc::new(out);
            self.output.send_replace(Some(out.clone()));

            // The leader keeps the ConfigMap current with the map it serves (not a held one's
            // empty build).
            let is_leader = *leader.borrow();
            let writes = is_leader && self.held.borrow().is_none();
            let mut cm_wake = None;
            if let Some(w) = &mut writer {
                if !is_leader {
                    w.forget();
                } else if let Some(snap) = snap.as_ref().filter(|_| writes) {
                    w.sync(&out, snap).await;
                    cm_wake = w.retry_at(snap);
                }
            }
            let grace_end = next_rebuild.map(|t| {
                let ms = t.as_millisecond() - Timestamp::now().as_millisecond();
                tokio::time::Instant::now()
                    + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
                    + GRACE_SLACK
            });
            let wake = [grace_end, cm_wake].into_iter().flatten().min();
            tokio::select! {
                _ = cancel.cancelled() => {
                    // A write held back by the interval would otherwise be lost: the ConfigMap
                    // would keep an older map (at a cold start, one with no region, which stops
                    // a Headscale that reads it with derp.paths) until the next leader writes.
                    if let (Some(w), Some(snap)) = (&mut writer, snap.as_ref().filter(|_| writes)) {
                        w.flush(&out, snap).await;
                    }
                    return;
                }
                _ = self.changed.notified() => {
                    tokio::time::sleep(COALESCE).await;
                }
                _ = sleep_until_opt(wake) => {
                    debug!("grace or retry deadline");
                }
                r = leader.changed() => {
                    if r.is_err() { return }
                }
            }
        }
    }

    /// The map to serve after building `out`: the build, unless it must be withheld (then the
    /// map served so far, or the seed); the current snapshot when the map did not change.
    /// Records the hold (see [`Self::hold`]).
    fn snapshot_to_serve(
        &self,
        out: &MapOutput,
        seed: Option<&Arc<MapSnapshot>>,
    ) -> Option<Arc<MapSnapshot>> {
        let live_regions = self
            .stores
            .regions
            .state()
            .iter()
            .filter(|r| r.metadata.deletion_timestamp.is_none())
            .count();
        let withhold = withhold_reason(out, live_regions);
        let current = self.snapshot.borrow().clone();
        let snap = if withhold.is_some() {
            self.stats.withheld.fetch_add(1, Ordering::Relaxed);
            current.or_else(|| seed.cloned())
        } else {
            // Most rebuilds change only facts (status), not the map: comparing the maps is
            // much cheaper than serialising and hashing a megabyte of JSON to find that out.
            let same_map = self
                .output
                .borrow()
                .as_ref()
                .is_some_and(|prev| prev.map == out.map);
            match (current, same_map) {
                (Some(cur), true) => Some(cur),
                (current, _) => match MapSnapshot::new(&out.map) {
                    Ok(s) => Some(Arc::new(s)),
                    // serde_json cannot fail on these plain types; should it ever, the last
                    // map stays served rather than an empty or partial body.
                    Err(e) => {
                        error!("the DERP map does not serialise, keeping the last one: {e}");
                        current
                    }
                },
            }
        };
        self.hold(withhold, snap.as_deref(), *self.leader.borrow());
        snap
    }

    /// Hands `snap` to the map server when its bytes differ from what it serves.
    fn publish(&self, snap: Option<&Arc<MapSnapshot>>) {
        let Some(snap) = snap else { return };
        let sent = self.snapshot.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.json == snap.json) {
                return false;
            }
            *cur = Some(snap.clone());
            true
        });
        if sent {
            self.stats.publications.fetch_add(1, Ordering::Relaxed);
            self.stats.last_publication_ms.store(
                u64::try_from(Timestamp::now().as_millisecond()).unwrap_or(0),
                Ordering::Relaxed,
            );
            info!(
                regions = snap.regions,
                nodes = snap.nodes,
                etag = %snap.etag,
                "map published"
            );
        }
    }

    /// The map in the `derp-map` ConfigMap, if it has a region (waits at most 5 s; a failure is
    /// logged and the replica starts without it).
    async fn read_seed(&self) -> Option<DerpMap> {
        let cm = self.configmap.as_ref()?;
        match tokio::time::timeout(SEED_TIMEOUT, cm.api.get_opt(&cm.name)).await {
            Ok(Ok(Some(c))) => {
                let m = seed_from_configmap(&c);
                if let Some(m) = &m {
                    info!(
                        regions = m.regions.len(),
                        "seeded from ConfigMap {}/{}", cm.namespace, cm.name
                    );
                }
                m
            }
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                warn!(
                    "reading ConfigMap {}/{} at start: {e}; starting without it",
                    cm.namespace, cm.name
                );
                None
            }
            Err(_) => {
                warn!(
                    "reading ConfigMap {}/{} at start timed out; starting without it",
                    cm.namespace, cm.name
                );
                None
            }
        }
    }

    /// Records whether the served map is held (and why), logs and, on the leader, publishes an
    /// Event on every DerpRegion when a hold starts or ends.
    fn hold(&self, reason: Option<String>, served: Option<&MapSnapshot>, is_leader: bool) {
        let reason = reason.map(|r| match served {
            Some(s) => format!(
                "{r}; serving the last good map ({} regions, {} nodes, ETag {})",
                s.regions, s.nodes, s.etag
            ),
            None => format!("{r}; no good map yet, /derpmap.json answers 503"),
        });
        let was = self.held.borrow().clone();
        if was.is_some() == reason.is_some() {
            // Only the text may differ; keep it current for /readyz without logging again.
            self.held.send_if_modified(|h| {
                let changed = *h != reason;
                *h = reason.clone();
                changed
            });
            return;
        }
        let (type_, event_reason, note) = match &reason {
            Some(r) => {
                warn!("{r}");
                (EventType::Warning, "ServingLastGoodMap", r.clone())
            }
            None => {
                info!("the map has regions again; serving the latest build");
                (
                    EventType::Normal,
                    "MapRecovered",
                    "the map has regions again; serving the latest build".to_string(),
                )
            }
        };
        self.held.send_replace(reason);
        let Some(recorder) = self.recorder.clone().filter(|_| is_leader) else {
            return;
        };
        let refs: Vec<_> = self
            .stores
            .regions
            .state()
            .iter()
            .filter(|r| r.metadata.deletion_timestamp.is_none())
            .take(MAX_HOLD_EVENTS)
            .map(|r| r.object_ref(&()))
            .collect();
        let note: String = note.chars().take(1000).collect();
        let counters = self.counters.clone();
        // Events are advice: sent off the map loop, failures only logged.
        tokio::spawn(async move {
            for reference in refs {
                let ev = Event {
                    type_,
                    reason: event_reason.into(),
                    note: Some(note.clone()),
                    action: "PublishMap".into(),
                    secondary: None,
                };
                match recorder.publish(&ev, &reference).await {
                    Ok(()) => apply::count_event(&counters),
                    Err(e) => warn!(reason = event_reason, "publishing event: {e}"),
                }
            }
        });
    }
}

/// What the `derp-map` ConfigMap holds, as far as this replica knows.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// Not read since this replica became the leader (another replica may have written it).
    Unread,
    /// Read or written by us: the object (our fields, stamped), `None` when it does not exist.
    Holds(Option<serde_json::Value>),
}

/// The leader's writer of the `derp-map` ConfigMap: keeps it equal to the served map, writing
/// only when the map changed, at most every [`CONFIGMAP_MIN_INTERVAL`], with a backoff after a
/// failure, and never a map too large for a ConfigMap.
struct ConfigMapWriter {
    target: MapConfigMap,
    counters: Arc<WriteCounters>,
    known: Known,
    /// ETag of the map the ConfigMap was last written with (by this replica, as leader).
    written: Option<String>,
    /// Delay before the next attempt after a failure.
    backoff: Backoff,
    /// No write before this instant (the interval after a write, the backoff after a failure).
    next_at: Option<tokio::time::Instant>,
    /// Whether the last map was too large (warned once per episode).
    too_large: bool,
}

impl ConfigMapWriter {
    fn new(target: MapConfigMap, counters: Arc<WriteCounters>) -> Self {
        Self {
            target,
            counters,
            known: Known::Unread,
            written: None,
            backoff: Backoff::new(CONFIGMAP_RETRY_MIN, CONFIGMAP_RETRY_MAX),
            next_at: None,
            too_large: false,
        }
    }

    /// Not the leader: another replica writes the ConfigMap, so what we knew of it is stale.
    fn forget(&mut self) {
        self.known = Known::Unread;
        self.written = None;
    }

    fn lags(&self, snap: &MapSnapshot) -> bool {
        self.written.as_deref() != Some(snap.etag.as_str())
    }

    /// When to wake to write `snap`: while the ConfigMap lags it, at the next allowed write.
    fn retry_at(&self, snap: &MapSnapshot) -> Option<tokio::time::Instant> {
        self.next_at.filter(|_| self.lags(snap))
    }

    /// Writes `out` (whose snapshot is `snap`) when the ConfigMap lags it and a write is allowed.
    async fn sync(&mut self, out: &MapOutput, snap: &MapSnapshot) {
        // Rendering and comparing the ConfigMap costs two serialisations of the whole map; most
        // rebuilds (status-only changes) leave the map as it was written.
        if !self.lags(snap)
            || self
                .next_at
                .is_some_and(|t| t > tokio::time::Instant::now())
        {
            return;
        }
        let written = self.write(out).await;
        let (ns, name) = (&self.target.namespace, &self.target.name);
        match written {
            Ok(written) => {
                if let ConfigMapWrite::TooLarge(bytes) = written
                    && !self.too_large
                {
                    warn!(
                        bytes,
                        limit = CONFIGMAP_MAX_DATA,
                        "the map no longer fits the ConfigMap {ns}/{name}; it keeps the last \
                         map that did (fetch /derpmap.json instead: Headscale derp.urls)",
                    );
                }
                self.too_large = matches!(written, ConfigMapWrite::TooLarge(_));
                self.backoff.reset();
                self.written = Some(snap.etag.clone());
                // At most one write per interval: a cold start changes the map many times a
                // second, and each write sends (and gets back) the whole map twice. Mounted
                // ConfigMaps reach pods only about once a minute anyway.
                self.next_at = Some(tokio::time::Instant::now() + CONFIGMAP_MIN_INTERVAL);
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                warn!(retry_in = ?delay, "writing ConfigMap {ns}/{name}: {e}");
                self.forget();
                self.next_at = Some(tokio::time::Instant::now() + delay);
            }
        }
    }

    /// Writes `snap` now if the ConfigMap lags it, ignoring the interval; bounded by
    /// [`CONFIGMAP_FLUSH_TIMEOUT`] so a shutdown never hangs on an unreachable API server.
    async fn flush(&mut self, out: &MapOutput, snap: &MapSnapshot) {
        if !self.lags(snap) {
            return;
        }
        self.next_at = None;
        let (ns, name) = (self.target.namespace.clone(), self.target.name.clone());
        info!("writing the latest map to ConfigMap {ns}/{name} before stopping");
        let flushed = tokio::time::timeout(CONFIGMAP_FLUSH_TIMEOUT, self.sync(out, snap)).await;
        if flushed.is_err() || self.lags(snap) {
            warn!(
                "ConfigMap {ns}/{name} was not brought up to date before stopping; the next \
                 leader writes it"
            );
        }
    }

    async fn write(&mut self, out: &MapOutput) -> Result<ConfigMapWrite, apply::ApplyError> {
        let cm = &self.target;
        let kind = || "ConfigMap".to_string();
        let want = render_map_configmap(cm, out).map_err(|source| apply::ApplyError::Render {
            kind: kind(),
            name: cm.name.clone(),
            source,
        })?;
        let bytes: usize = want
            .data
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if bytes > CONFIGMAP_MAX_DATA {
            return Ok(ConfigMapWrite::TooLarge(bytes));
        }
        let serialize = |source| apply::ApplyError::Serialize {
            kind: kind(),
            name: cm.name.clone(),
            source,
        };
        if self.known == Known::Unread {
            let have = cm
                .api
                .get_opt(&cm.name)
                .await
                .map_err(|source| apply::ApplyError::Api {
                    kind: kind(),
                    name: cm.name.clone(),
                    source,
                })?;
            let have = have
                .map(serde_json::to_value)
                .transpose()
                .map_err(serialize)?;
            self.known = Known::Holds(have);
        }
        let stamped = apply::stamp(serde_json::to_value(&want).map_err(serialize)?);
        let existing = match &self.known {
            Known::Holds(v) => v.as_ref(),
            Known::Unread => None,
        };
        if !apply::needs_apply(&stamped, existing) {
            return Ok(ConfigMapWrite::Done);
        }
        let api = &cm.api;
        apply::apply_value(
            api,
            &cm.name,
            "ConfigMap",
            stamped.clone(),
            existing,
            &self.counters,
        )
        .await?;
        // The stamped object is what the server now holds for our fields.
        self.known = Known::Holds(Some(stamped));
        Ok(ConfigMapWrite::Done)
    }
}

/// Waits until `store` has its first full list. `Store::wait_until_ready` keeps only the waker
/// of its latest poller (a futures oneshot underneath), and the controller polls the same store,
/// so a lone waiter here may never be woken: poll again every 100 ms (the state is memoised once
/// any poller saw it).
async fn ready<K>(
    store: &kube::runtime::reflector::Store<K>,
) -> Result<(), kube::runtime::reflector::store::WriterDropped>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await
        {
            return r;
        }
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapbuild::{NotPublished, RegionFacts};

    #[test]
    fn an_empty_build_is_withheld_only_while_derp_regions_exist() {
        let mut out = MapOutput::default();
        // No DerpRegion at all: the empty map is the truth.
        assert_eq!(withhold_reason(&out, 0), None);
        out.facts.insert(
            RegionKey::new("derp", "home"),
            RegionFacts {
                not_published: Some(NotPublished::NoReadyNode { desired: 3 }),
                ..Default::default()
            },
        );
        let why = withhold_reason(&out, 1).unwrap();
        assert!(
            why.contains("1 DerpRegion(s)") && why.contains("derp/home: none of the 3"),
            "{why}"
        );
        out.map.regions.insert(900, Default::default());
        assert_eq!(withhold_reason(&out, 1), None);
    }

    #[test]
    fn the_configmap_seeds_only_a_map_with_regions() {
        let cm = |json: &str| ConfigMap {
            data: Some([(CONFIGMAP_JSON_KEY.to_string(), json.to_string())].into()),
            ..Default::default()
        };
        let mut map = DerpMap::default();
        assert_eq!(seed_from_configmap(&cm(&map.to_json().unwrap())), None);
        assert_eq!(seed_from_configmap(&cm("not json")), None);
        assert_eq!(seed_from_configmap(&ConfigMap::default()), None);
        map.regions.insert(
            900,
            derp_proto::derpmap::DerpRegion {
                region_id: 900,
                region_code: "home".into(),
                nodes: vec![derp_proto::derpmap::DerpNode {
                    name: "900-a".into(),
                    region_id: 900,
                    host_name: "198.51.100.1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let seeded = seed_from_configmap(&cm(&map.to_json().unwrap())).unwrap();
        assert_eq!(seeded, map);
        // The seed is served byte for byte as the leader wrote it.
        assert_eq!(
            MapSnapshot::new(&seeded).unwrap().json,
            MapSnapshot::new(&map).unwrap().json
        );
    }
}
