//! The fleet prober: what Tailscale's `derpprobe` checks, run from inside the operator against
//! every node the map publishes, on an interval: a TLS and DERP handshake with our own client
//! (`tls`, `derp`), a STUN binding (`stun`), and in every region with two or more nodes a packet
//! from a client on each node to a client on each sibling, which only the mesh can deliver
//! (`mesh`). Each check is timed.
//!
//! **Every replica probes; only the leader's results reach the status.** Probing from each
//! replica costs a handshake per node per replica and interval (little next to real clients) and
//! gives every replica's `/metrics` its own view, so a standby on another Kubernetes node shows
//! whether a failure is the derper's or the prober's own network. The verdict that matters for
//! the map must be one, or two replicas behind one Service would serve different maps and every
//! tailscaled would redial on each flip: the leader's controller writes `status.probe` and the
//! `Healthy` condition, and every replica's map task reads the gate from there (`failing_nodes`).
//! A new leader starts from what the status says, so a failing node stays out until it recovers.
//!
//! Verdicts have hysteresis: a node turns unhealthy after `fail_rounds` failed rounds in a row and
//! healthy again after `recover_rounds` good ones. The status changes when a verdict or a node's
//! failing check changes, and otherwise at most every `status_refresh` (latencies, last success),
//! so a healthy fleet costs no API writes per round. Probes are bounded: at most `concurrency`
//! nodes (and node pairs) at once, each check within `timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use derp_client::{AddrFamily, Client, ClientConfig, ClientHandle, ServerToClient, TlsTrust};
use derp_proto::derpmap::DerpNode;
use derp_proto::{MeshKey, NodePrivate, NodePublic, stun};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::crd::{DerpRegion, NodeProbeStatus, RegionProbeStatus};
use crate::mapbuild::{MapOutput, RegionKey};
use crate::metrics::{HistogramSeries, RegionLabels};
use crate::render::{MESH_KEY_FILE, certificate_name, mesh_key_secret_name, tls_secret_name};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};

/// The checks, in the order a node's failure is attributed (the first failing one is named).
pub const CHECKS: [&str; 4] = ["tls", "derp", "stun", "mesh"];
/// A mesh probe packet is resent this often until one arrives: a client that just connected to
/// one node is known to its siblings only once the mesh has told them.
const MESH_RESEND: Duration = Duration::from_millis(100);
/// Histogram buckets (seconds) of every probe latency.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// How long the verdict of an unhealthy node that left the map's targets (its pod NotReady) is
/// kept for its return.
const ABSENT_MEMORY: Duration = Duration::from_secs(600);
/// Prefix of a mesh probe packet (then an 8-byte nonce).
const MESH_MAGIC: &[u8] = b"derp-fleet-probe";

/// How the prober runs (the CLI fills it).
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub concurrency: usize,
    pub timeout: Duration,
    pub fail_rounds: u32,
    pub recover_rounds: u32,
    pub status_refresh: Duration,
}

/// The prober's view for the status, by region.
pub type ProbeReport = BTreeMap<RegionKey, RegionProbeStatus>;

/// DERP node names whose status says the prober found them failing: the map gate. Read from the
/// regions' status (written by the leader) so every replica gates the same nodes.
pub fn failing_nodes(regions: &[Arc<DerpRegion>]) -> BTreeSet<String> {
    regions
        .iter()
        .filter_map(|r| r.status.as_ref()?.probe.as_ref())
        .flat_map(|p| p.nodes.iter())
        .filter(|n| !n.healthy)
        .map(|n| n.name.clone())
        .collect()
}

/// One check's outcome in a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok(Duration),
    /// Passed, but not timed on its own (TLS came up, then the DERP handshake failed).
    Passed,
    Failed(String),
    /// Not run (STUN disabled on the node, no sibling to mesh with, an earlier check failed).
    Skipped,
}

impl Outcome {
    fn failed(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
    fn latency(&self) -> Option<Duration> {
        match self {
            Outcome::Ok(d) => Some(*d),
            _ => None,
        }
    }
}

/// Everything one round learnt about a node.
#[derive(Debug, Clone)]
pub struct NodeRound {
    /// By check, in [`CHECKS`] order.
    pub checks: [Outcome; 4],
    pub cert_not_after: Option<i64>,
    /// Mesh deliveries from this node: (to, outcome).
    pub mesh: Vec<(String, Outcome)>,
}

impl NodeRound {
    fn first_failure(&self) -> Option<(&'static str, &str)> {
        CHECKS.iter().zip(&self.checks).find_map(|(c, o)| match o {
            Outcome::Failed(why) => Some((*c, why.as_str())),
            _ => None,
        })
    }
}

/// A node's verdict across rounds (pure: the tests drive it round by round).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub healthy: bool,
    pub fails_in_a_row: u32,
    pub oks_in_a_row: u32,
    pub failing_check: Option<String>,
    pub failing_since: Option<Timestamp>,
    pub message: Option<String>,
    pub last_success: Option<Timestamp>,
    /// Latest latencies, milliseconds, in [`CHECKS`] order.
    pub latency_ms: [Option<u32>; 4],
    pub cert_not_after: Option<i64>,
}

impl NodeState {
    /// A node seen for the first time: healthy, unless the status (from an earlier leader) says
    /// otherwise, in which case it must earn its way back like any failing node.
    pub fn new(previous: Option<&NodeProbeStatus>) -> Self {
        let healthy = previous.is_none_or(|p| p.healthy);
        NodeState {
            healthy,
            fails_in_a_row: 0,
            oks_in_a_row: 0,
            failing_check: previous.and_then(|p| p.failing_check.clone()),
            failing_since: previous.and_then(|p| p.failing_since.as_ref().map(|t| t.0)),
            message: previous.and_then(|p| p.message.clone()),
            last_success: previous.and_then(|p| p.last_success.as_ref().map(|t| t.0)),
            latency_ms: [None; 4],
            cert_not_after: None,
        }
    }

    /// Applies one round; returns whether the verdict changed.
    pub fn apply(&mut self, round: &NodeRound, cfg: &ProbeConfig, now: Timestamp) -> bool {
        let before = self.healthy;
        for (slot, o) in self.latency_ms.iter_mut().zip(&round.checks) {
            if let Some(d) = o.latency() {
                *slot = Some(u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
            }
        }
        if round.cert_not_after.is_some() {
            self.cert_not_after = round.cert_not_after;
        }
        match round.first_failure() {
            None => {
                self.oks_in_a_row = self.oks_in_a_row.saturating_add(1);
                self.fails_in_a_row = 0;
                self.last_success = Some(now);
                self.failing_check = None;
                self.failing_since = None;
                self.message = None;
                if self.oks_in_a_row >= cfg.recover_rounds {
                    self.healthy = true;
                }
            }
            Some((check, why)) => {
                self.fails_in_a_row = self.fails_in_a_row.saturating_add(1);
                self.oks_in_a_row = 0;
                if self.failing_since.is_none() || self.failing_check.is_none() {
                    self.failing_since = Some(now);
                }
                self.failing_check = Some(check.to_string());
                self.message = Some(truncate(why, 300));
                if self.fails_in_a_row >= cfg.fail_rounds {
                    self.healthy = false;
                }
            }
        }
        self.healthy != before
    }

    /// The status entry; `with_numbers` false leaves out what changes every round.
    fn status(&self, name: &str, numbers: &StatusNumbers) -> NodeProbeStatus {
        let t = |ts: Option<Timestamp>| ts.and_then(whole_seconds).map(Time);
        NodeProbeStatus {
            name: name.to_string(),
            healthy: self.healthy,
            last_success: t(numbers.last_success),
            failing_check: self.failing_check.clone(),
            failing_since: t(self.failing_since),
            message: numbers.message.clone(),
            tls_ms: numbers.latency_ms[0],
            derp_ms: numbers.latency_ms[1],
            stun_ms: numbers.latency_ms[2],
            mesh_ms: numbers.latency_ms[3],
            cert_not_after: t(self
                .cert_not_after
                .and_then(|s| Timestamp::from_second(s).ok())),
        }
    }
}

/// The per-round numbers as last written to the status (refreshed every `status_refresh`).
#[derive(Debug, Clone, Default)]
struct StatusNumbers {
    last_success: Option<Timestamp>,
    latency_ms: [Option<u32>; 4],
    /// The failing check's message (its text may differ every round: addresses, timings).
    message: Option<String>,
}

fn whole_seconds(t: Timestamp) -> Option<Timestamp> {
    Timestamp::from_second(t.as_second()).ok()
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Mesh attribution: a failed delivery between two nodes is blamed on a node only when every
/// delivery to or from it failed (with three nodes and one wrong mesh key, only that node's
/// pairs fail, and only it is named; with two nodes both are).
pub fn mesh_blame(pairs: &[(String, String, bool)]) -> BTreeMap<String, bool> {
    let mut seen: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for (from, to, ok) in pairs {
        for n in [from, to] {
            let e = seen.entry(n.clone()).or_default();
            e.0 += 1;
            e.1 += u32::from(*ok);
        }
    }
    seen.into_iter()
        .map(|(n, (total, ok))| (n, total > 0 && ok == 0))
        .collect()
}

/// A latency histogram in Prometheus' cumulative form.
#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if s <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    /// The histogram as the exposition takes it: counts per bucket, not cumulative.
    fn series(&self) -> HistogramSeries {
        let mut below = 0;
        let buckets = BUCKETS
            .iter()
            .zip(self.counts)
            .map(|(b, c)| {
                let in_bucket = c.saturating_sub(below);
                below = c;
                (*b, in_bucket)
            })
            .collect();
        HistogramSeries {
            sum: self.sum,
            count: self.count,
            buckets,
        }
    }
}

/// What `/metrics` shows of the prober: the latest round per node, the verdicts, and latency
/// histograms per region and check.
#[derive(Debug, Default)]
pub struct ProbeMetrics {
    inner: Mutex<MetricsState>,
}

/// A probed node: its region and its name in the map (`900-a`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct NodeKey {
    region: RegionKey,
    node: String,
}

#[derive(Debug, Default)]
struct MetricsState {
    rounds: u64,
    round_seconds: f64,
    /// The latest round and the verdict of each node.
    nodes: BTreeMap<NodeKey, (NodeRound, bool)>,
    /// (region, check) -> histogram; check "mesh" is the delivery time.
    latency: BTreeMap<(RegionKey, &'static str), Histogram>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
impl ProbeMetrics {
    /// Two rounds over node 900-a of derp/home: STUN failed, the mesh delivery to 900-b arrived,
    /// a TLS and a mesh latency observed.
    pub(crate) fn example() -> Self {
        let m = Self::default();
        {
            let mut s = m.lock();
            s.rounds = 2;
            let ms = Duration::from_millis;
            let round = NodeRound {
                checks: [
                    Outcome::Ok(ms(3)),
                    Outcome::Ok(ms(5)),
                    Outcome::Failed("boom".into()),
                    Outcome::Skipped,
                ],
                cert_not_after: Some(2_000_000_000),
                mesh: vec![("900-b".into(), Outcome::Ok(ms(2)))],
            };
            let key = RegionKey::new("derp", "home");
            s.nodes.insert(
                NodeKey {
                    region: key.clone(),
                    node: "900-a".into(),
                },
                (round, false),
            );
            let mut h = Histogram::default();
            h.observe(ms(3));
            s.latency.insert((key.clone(), "tls"), h.clone());
            s.latency.insert((key, "mesh"), h);
        }
        m
    }
}

impl ProbeMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, MetricsState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Collector for ProbeMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let m = self.lock();
        m.encode_rounds(&mut e)?;
        m.encode_nodes(&mut e)?;
        m.encode_latency(&mut e)
    }
}

impl NodeKey {
    fn labels(&self) -> NodeLabels {
        NodeLabels {
            namespace: esc(&self.region.namespace),
            region: esc(&self.region.name),
            node: esc(&self.node),
        }
    }
}

fn region_labels(r: &RegionKey) -> RegionLabels {
    RegionLabels {
        namespace: esc(&r.namespace),
        region: esc(&r.name),
    }
}

impl MetricsState {
    fn encode_rounds(&self, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::{counter, gauge};
        counter(
            e,
            "derp_fleet_probe_rounds",
            "Probe rounds run by this replica.",
            self.rounds,
        )?;
        gauge(
            e,
            "derp_fleet_probe_round_duration_seconds",
            "How long the latest probe round took.",
            self.round_seconds,
        )
    }

    /// The latest round's results and the verdict of each node.
    fn encode_nodes(&self, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::gauge_family;
        let success = self.nodes.iter().flat_map(|(key, (round, _))| {
            let run = CHECKS.iter().zip(&round.checks);
            run.filter(|(_, o)| **o != Outcome::Skipped)
                .map(move |(c, o)| {
                    let l = CheckLabels {
                        node: key.labels(),
                        check: c,
                    };
                    (l, i64::from(!o.failed()))
                })
        });
        gauge_family(
            e,
            "derp_fleet_probe_success",
            "Whether the check passed in the latest round (tls, derp, stun, mesh).",
            success,
        )?;
        gauge_family(
            e,
            "derp_fleet_probe_healthy",
            "The prober's verdict with hysteresis (0 after --probe-fail-rounds failed rounds).",
            self.nodes
                .iter()
                .map(|(key, (_, verdict))| (key.labels(), i64::from(*verdict))),
        )?;
        gauge_family(
            e,
            "derp_fleet_probe_cert_not_after_seconds",
            "notAfter (Unix seconds) of the certificate the node served in the latest round.",
            self.nodes
                .iter()
                .filter_map(|(key, (round, _))| Some((key.labels(), round.cert_not_after?))),
        )?;
        let mesh = self.nodes.iter().flat_map(|(key, (round, _))| {
            let sent = round.mesh.iter().filter(|(_, o)| *o != Outcome::Skipped);
            sent.map(move |(to, o)| {
                let l = MeshLabels {
                    namespace: esc(&key.region.namespace),
                    region: esc(&key.region.name),
                    from: esc(&key.node),
                    to: esc(to),
                };
                (l, i64::from(!o.failed()))
            })
        });
        gauge_family(
            e,
            "derp_fleet_probe_mesh_success",
            "Whether a packet from a client on one node reached a client on its sibling.",
            mesh,
        )
    }

    fn encode_latency(&self, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::histogram_family;
        histogram_family(
            e,
            "derp_fleet_probe_latency_seconds",
            "Probe latency by check: TLS handshake, whole DERP connect, STUN round trip.",
            self.latency
                .iter()
                .filter(|((_, c), _)| *c != "mesh")
                .map(|((r, c), h)| {
                    let l = RegionCheckLabels {
                        region: region_labels(r),
                        check: c,
                    };
                    (l, h.series())
                }),
        )?;
        histogram_family(
            e,
            "derp_fleet_probe_mesh_delivery_seconds",
            "Time from sending a packet on one node to receiving it on a sibling.",
            self.latency
                .iter()
                .filter(|((_, c), _)| *c == "mesh")
                .map(|((r, _), h)| (region_labels(r), h.series())),
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    namespace: String,
    region: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    #[prometheus(flatten)]
    node: NodeLabels,
    check: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeshLabels {
    namespace: String,
    region: String,
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionCheckLabels {
    #[prometheus(flatten)]
    region: RegionLabels,
    check: &'static str,
}

/// The prober task of one replica.
pub struct Prober {
    pub config: ProbeConfig,
    /// The map task's output: the nodes to probe.
    pub map: watch::Receiver<Option<Arc<MapOutput>>>,
    pub regions: Store<DerpRegion>,
    /// Our Secrets: a region's CA (`ca.crt` of a cert-manager Secret) and its mesh key.
    pub secrets: Store<Secret>,
    pub report: watch::Sender<Option<Arc<ProbeReport>>>,
    /// Regions whose status view changed, for the controller.
    pub trigger: mpsc::UnboundedSender<ObjectRef<DerpRegion>>,
    pub metrics: Arc<ProbeMetrics>,
}

/// One node to probe.
#[derive(Clone)]
struct Target {
    region: RegionKey,
    node: DerpNode,
    trust: TlsTrust,
    mesh_key: Option<MeshKey>,
}

impl Prober {
    pub async fn run(self, cancel: CancellationToken) {
        let mut states: BTreeMap<NodeKey, NodeState> = BTreeMap::new();
        let mut written: BTreeMap<NodeKey, StatusNumbers> = BTreeMap::new();
        let mut absent: BTreeMap<NodeKey, (Instant, NodeState)> = BTreeMap::new();
        let mut refreshed_at = Instant::now();
        let mut map = self.map.clone();
        info!(interval = ?self.config.interval, concurrency = self.config.concurrency,
              timeout = ?self.config.timeout, "prober starting");
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            next = Instant::now() + self.config.interval;
            let Some(out) = map.borrow_and_update().clone() else {
                continue;
            };
            let targets = self.targets(&out);
            let t0 = Instant::now();
            let rounds = tokio::select! {
                _ = cancel.cancelled() => return,
                r = probe_round(&targets, &self.config) => r,
            };
            let elapsed = t0.elapsed();
            debug!(nodes = targets.len(), ?elapsed, "probe round done");
            let now = Timestamp::now();
            let refresh = refreshed_at.elapsed() >= self.config.status_refresh;
            if refresh {
                refreshed_at = Instant::now();
            }
            let mut changed: BTreeSet<RegionKey> = BTreeSet::new();
            // Nodes no longer probed leave the status and the metrics. An unhealthy one is
            // remembered for a while: a failing derper whose pod restarts (NotReady, then Ready
            // again) must pass `recover_rounds` before it counts as healthy, not start afresh.
            let live: BTreeSet<NodeKey> = rounds.keys().cloned().collect();
            let gone: Vec<NodeKey> = states
                .keys()
                .filter(|k| !live.contains(*k))
                .cloned()
                .collect();
            for k in gone {
                changed.insert(k.region.clone());
                written.remove(&k);
                if let Some(st) = states.remove(&k)
                    && !st.healthy
                {
                    absent.insert(k, (Instant::now(), st));
                }
            }
            absent.retain(|_, (since, _)| since.elapsed() < ABSENT_MEMORY);
            for (key, round) in &rounds {
                let first_sight = !states.contains_key(key);
                let state = states.entry(key.clone()).or_insert_with(|| {
                    changed.insert(key.region.clone());
                    absent.remove(key).map_or_else(
                        || NodeState::new(self.previous_status(&key.region, &key.node).as_ref()),
                        |(_, st)| st,
                    )
                });
                let check_before = state.failing_check.clone();
                let flipped = state.apply(round, &self.config, now);
                if flipped {
                    if state.healthy {
                        info!(region = %key.region, node = %key.node, "probe: node healthy again");
                    } else {
                        warn!(region = %key.region, node = %key.node,
                              check = ?state.failing_check, message = ?state.message,
                              "probe: node failing");
                    }
                }
                let numbers = written.entry(key.clone()).or_default();
                if first_sight || flipped || check_before != state.failing_check || refresh {
                    numbers.last_success = state.last_success;
                    numbers.latency_ms = state.latency_ms;
                    numbers.message = state.message.clone();
                    changed.insert(key.region.clone());
                }
            }
            self.record_metrics(&rounds, &states, &targets, elapsed);
            let mut report = ProbeReport::new();
            for (key, state) in &states {
                let numbers = written.get(key).cloned().unwrap_or_default();
                report
                    .entry(key.region.clone())
                    .or_default()
                    .nodes
                    .push(state.status(&key.node, &numbers));
            }
            self.report.send_replace(Some(Arc::new(report)));
            for region in changed {
                let _ = self.trigger.send(region.object_ref());
            }
        }
    }

    fn previous_status(&self, region: &RegionKey, node: &str) -> Option<NodeProbeStatus> {
        let r = self.regions.get(&region.object_ref())?;
        r.status
            .as_ref()?
            .probe
            .as_ref()?
            .nodes
            .iter()
            .find(|n| n.name == node)
            .cloned()
    }

    fn secret(&self, ns: &str, name: &str, key: &str) -> Option<Vec<u8>> {
        let s = self.secrets.get(&ObjectRef::new(name).within(ns))?;
        Some(s.data.as_ref()?.get(key)?.0.clone())
    }

    fn targets(&self, out: &MapOutput) -> Vec<Target> {
        let mut v = Vec::new();
        for (key, nodes) in &out.probe_targets {
            let region = self.regions.get(&key.object_ref());
            // A CA-issued certificate (cert-manager) is verified with the CA in its Secret; a
            // public one with the Web PKI; pinned and insecure ones as the map says.
            let trust = region
                .as_ref()
                .filter(|r| r.spec.tls.issuer_ref.is_some())
                .and_then(|r| self.secret(&key.namespace, &tls_secret_name(r), "ca.crt"))
                .or_else(|| self.secret(&key.namespace, &certificate_name(&key.name), "ca.crt"))
                .and_then(|pem| TlsTrust::extra_ca_pem(&pem).ok())
                .unwrap_or(TlsTrust::WebPki);
            // Behind an admission URL (Headscale's /verify) the prober's keys are unknown: it
            // comes in as a mesh peer, which the derper never sends to the verifier.
            let mesh_key = region
                .as_ref()
                .filter(|r| r.spec.verify_client_url.is_some())
                .and_then(|_| {
                    self.secret(
                        &key.namespace,
                        &mesh_key_secret_name(&key.name),
                        MESH_KEY_FILE,
                    )
                })
                .and_then(|b| MeshKey::parse_hex(String::from_utf8_lossy(&b).trim()).ok());
            for node in nodes {
                v.push(Target {
                    region: key.clone(),
                    node: node.clone(),
                    trust: trust.clone(),
                    mesh_key,
                });
            }
        }
        v
    }

    fn record_metrics(
        &self,
        rounds: &BTreeMap<NodeKey, NodeRound>,
        states: &BTreeMap<NodeKey, NodeState>,
        targets: &[Target],
        elapsed: Duration,
    ) {
        let mut m = self.metrics.lock();
        m.rounds += 1;
        m.round_seconds = elapsed.as_secs_f64();
        m.nodes = rounds
            .iter()
            .map(|(k, r)| {
                let healthy = states.get(k).is_none_or(|s| s.healthy);
                (k.clone(), (r.clone(), healthy))
            })
            .collect();
        let regions: BTreeSet<&RegionKey> = targets.iter().map(|t| &t.region).collect();
        m.latency.retain(|(r, _), _| regions.contains(r));
        for (NodeKey { region, .. }, r) in rounds {
            for (c, o) in CHECKS.iter().zip(&r.checks).take(3) {
                if let Some(d) = o.latency() {
                    m.latency
                        .entry((region.clone(), *c))
                        .or_default()
                        .observe(d);
                }
            }
            for (_, o) in &r.mesh {
                if let Some(d) = o.latency() {
                    m.latency
                        .entry((region.clone(), "mesh"))
                        .or_default()
                        .observe(d);
                }
            }
        }
    }
}

/// A connected probe client and the deliveries it waits for.
struct Connected {
    handle: ClientHandle,
    key: NodePublic,
    waiting: Arc<Mutex<HashMap<[u8; 8], oneshot::Sender<Instant>>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One round over every target: node checks (bounded), then the mesh pairs of each region.
async fn probe_round(targets: &[Target], cfg: &ProbeConfig) -> BTreeMap<NodeKey, NodeRound> {
    let sem = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let node_checks = targets.iter().map(|t| {
        let sem = sem.clone();
        async move {
            let _permit = sem.acquire().await.ok();
            let (round, client) = probe_node(t, cfg).await;
            (t, round, client)
        }
    });
    let results = futures::future::join_all(node_checks).await;
    let mut rounds: BTreeMap<NodeKey, NodeRound> = BTreeMap::new();
    let mut by_region: BTreeMap<RegionKey, Vec<(String, Connected)>> = BTreeMap::new();
    for (t, round, client) in results {
        let key = NodeKey {
            region: t.region.clone(),
            node: t.node.name.clone(),
        };
        rounds.insert(key, round);
        if let Some(c) = client {
            by_region
                .entry(t.region.clone())
                .or_default()
                .push((t.node.name.clone(), c));
        }
    }
    // Mesh: every ordered pair of connected nodes in a region.
    let mut pairs = Vec::new();
    for (region, clients) in &by_region {
        for (a, ca) in clients {
            for (b, cb) in clients {
                if a != b {
                    pairs.push((region, a, ca, b, cb));
                }
            }
        }
    }
    let deliveries = futures::future::join_all(pairs.into_iter().map(|(r, a, ca, b, cb)| {
        let sem = sem.clone();
        async move {
            let _permit = sem.acquire().await.ok();
            let o = deliver(ca, cb, cfg.timeout).await;
            (r.clone(), a.clone(), b.clone(), o)
        }
    }))
    .await;
    let mut per_region: BTreeMap<RegionKey, Vec<(String, String, bool)>> = BTreeMap::new();
    for (region, a, b, o) in deliveries {
        per_region
            .entry(region.clone())
            .or_default()
            .push((a.clone(), b.clone(), !o.failed()));
        if let Some(r) = rounds.get_mut(&NodeKey { region, node: a }) {
            r.mesh.push((b, o));
        }
    }
    for (region, pairs) in per_region {
        for (node, blamed) in mesh_blame(&pairs) {
            let Some(r) = rounds.get_mut(&NodeKey {
                region: region.clone(),
                node: node.clone(),
            }) else {
                continue;
            };
            let slowest = r.mesh.iter().filter_map(|(_, o)| o.latency()).max();
            r.checks[3] = if blamed {
                let failed: Vec<&str> = pairs
                    .iter()
                    .filter(|(a, b, ok)| !ok && (*a == node || *b == node))
                    .map(|(a, b, _)| if *a == node { b.as_str() } else { a.as_str() })
                    .collect();
                Outcome::Failed(format!(
                    "no packet crossed the mesh between this node and {}",
                    failed.join(", ")
                ))
            } else {
                slowest.map_or(Outcome::Skipped, Outcome::Ok)
            };
        }
    }
    for (_, clients) in by_region {
        for (_, c) in clients {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.handle.close()).await;
        }
    }
    rounds
}

/// TLS and DERP handshake (keeping the client for the mesh checks), then STUN.
async fn probe_node(t: &Target, cfg: &ProbeConfig) -> (NodeRound, Option<Connected>) {
    let mut round = NodeRound {
        checks: [
            Outcome::Skipped,
            Outcome::Skipped,
            Outcome::Skipped,
            Outcome::Skipped,
        ],
        cert_not_after: None,
        mesh: Vec::new(),
    };
    let (derp, stun) = tokio::join!(connect(t, cfg), stun_check(&t.node, cfg.timeout));
    round.checks[2] = stun;
    let client = match derp {
        Ok((client, total)) => {
            let info = client.conn_info();
            round.checks[0] = info.tls_handshake.map_or(Outcome::Skipped, Outcome::Ok);
            round.checks[1] = Outcome::Ok(total);
            round.cert_not_after = info.leaf_not_after;
            let key = client.public_key();
            let (handle, mut rx) = client.split();
            let waiting: Arc<Mutex<HashMap<[u8; 8], oneshot::Sender<Instant>>>> = Arc::default();
            let w = waiting.clone();
            let reader = tokio::spawn(async move {
                while let Ok(frame) = rx.recv().await {
                    if let ServerToClient::RecvPacket { packet, .. } = frame
                        && let Some(nonce) = packet.strip_prefix(MESH_MAGIC)
                        && let Ok(nonce) = <[u8; 8]>::try_from(nonce)
                        && let Some(tx) = w
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&nonce)
                    {
                        let _ = tx.send(Instant::now());
                    }
                }
            });
            Some(Connected {
                handle,
                key,
                waiting,
                reader,
            })
        }
        Err((tls_reached, why)) => {
            if tls_reached {
                round.checks[0] = Outcome::Passed;
                round.checks[1] = Outcome::Failed(why);
            } else {
                round.checks[0] = Outcome::Failed(why);
            }
            None
        }
    };
    (round, client)
}

/// Connects; on failure says whether TLS was established before it failed.
async fn connect(t: &Target, cfg: &ProbeConfig) -> Result<(Client, Duration), (bool, String)> {
    let mut c = ClientConfig::for_node(&t.node, AddrFamily::Any, NodePrivate::generate())
        .map_err(|e| (false, e.to_string()))?;
    c.tls = match c.tls {
        // for_node leaves Web PKI for verified certificates; a private CA needs its root.
        TlsTrust::WebPki => t.trust.clone(),
        other => other,
    };
    c.is_prober = true;
    c.app_name = "derp-fleet-prober".into();
    c.mesh_key = t.mesh_key;
    c.connect_timeout = cfg.timeout;
    c.read_timeout = None;
    c.write_timeout = Some(cfg.timeout);
    let t0 = Instant::now();
    match Client::connect(&c).await {
        Ok(client) => Ok((client, t0.elapsed())),
        Err(e) => {
            let msg = e.to_string();
            // Errors before TLS is up: connect, resolve, timeouts of those steps, TLS itself.
            let before_tls = matches!(
                e,
                derp_client::ClientError::Connect { .. }
                    | derp_client::ClientError::Resolve { .. }
                    | derp_client::ClientError::Tls(_)
                    | derp_client::ClientError::Config(_)
            ) || matches!(&e, derp_client::ClientError::Timeout { step }
                    if *step == "TCP connect" || *step == "TLS handshake");
            Err((!before_tls, msg))
        }
    }
}

/// One packet from `a`'s client to `b`'s, resent every [`MESH_RESEND`] until one arrives.
async fn deliver(a: &Connected, b: &Connected, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Instant)>();
    let mut nonces = Vec::new();
    let result = loop {
        let nonce: [u8; 8] = rand::random();
        let (otx, orx) = oneshot::channel();
        b.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(nonce, otx);
        nonces.push(nonce);
        let sent = Instant::now();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(at) = orx.await {
                let _ = tx.send((sent, at));
            }
        });
        let mut packet = MESH_MAGIC.to_vec();
        packet.extend_from_slice(&nonce);
        if let Err(e) = a.handle.send_packet(&b.key, &packet).await {
            break Outcome::Failed(format!("sending: {e}"));
        }
        let wait = (Instant::now() + MESH_RESEND).min(deadline);
        match tokio::time::timeout_at(wait, rx.recv()).await {
            Ok(Some((sent, at))) => break Outcome::Ok(at.saturating_duration_since(sent)),
            _ if Instant::now() >= deadline => {
                break Outcome::Failed(format!("no packet arrived within {timeout:?}"));
            }
            _ => {}
        }
    };
    let mut w = b
        .waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for n in nonces {
        w.remove(&n);
    }
    result
}

/// A STUN binding request to the node's STUN port; skipped when the map says it has none.
async fn stun_check(node: &DerpNode, timeout: Duration) -> Outcome {
    let port = match node.stun_port {
        p if p < 0 => return Outcome::Skipped,
        0 => 3478,
        p => match u16::try_from(p) {
            Ok(p) => p,
            Err(_) => return Outcome::Failed(format!("STUN port {p} out of range")),
        },
    };
    match tokio::time::timeout(timeout, stun_once(node, port)).await {
        Ok(Ok(d)) => Outcome::Ok(d),
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Failed(format!("no STUN answer within {timeout:?}")),
    }
}

async fn stun_once(node: &DerpNode, port: u16) -> Result<Duration, String> {
    let ip: IpAddr = match (node.ipv4.parse(), node.ipv6.parse()) {
        (Ok(ip), _) | (_, Ok(ip)) => ip,
        _ => tokio::net::lookup_host((node.host_name.as_str(), port))
            .await
            .map_err(|e| format!("resolving {}: {e}", node.host_name))?
            .next()
            .ok_or_else(|| format!("{} has no address", node.host_name))?
            .ip(),
    };
    let addr = SocketAddr::new(ip, port);
    let bind: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|e| format!("{e}"))?;
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("binding a UDP socket: {e}"))?;
    sock.connect(addr)
        .await
        .map_err(|e| format!("STUN {addr}: {e}"))?;
    let tx: stun::TxId = rand::random();
    let t0 = Instant::now();
    sock.send(&stun::binding_request(&tx))
        .await
        .map_err(|e| format!("STUN {addr}: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| format!("STUN {addr}: {e}"))?;
        if let Ok((got, _mapped)) = stun::parse_response(&buf[..n])
            && got == tx
        {
            return Ok(t0.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProbeConfig {
        ProbeConfig {
            interval: Duration::from_secs(1),
            concurrency: 4,
            timeout: Duration::from_secs(1),
            fail_rounds: 3,
            recover_rounds: 2,
            status_refresh: Duration::from_secs(300),
        }
    }

    fn round(failing: Option<usize>) -> NodeRound {
        let mut checks = [
            Outcome::Ok(Duration::from_millis(3)),
            Outcome::Ok(Duration::from_millis(5)),
            Outcome::Ok(Duration::from_millis(1)),
            Outcome::Skipped,
        ];
        if let Some(i) = failing {
            checks[i] = Outcome::Failed("boom".into());
        }
        NodeRound {
            checks,
            cert_not_after: Some(2_000_000_000),
            mesh: vec![],
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn hysteresis_fails_after_n_rounds_and_recovers_after_m() {
        let c = cfg();
        let mut s = NodeState::new(None);
        assert!(s.healthy);
        assert!(!s.apply(&round(Some(2)), &c, ts(10)));
        assert_eq!(s.failing_check.as_deref(), Some("stun"));
        assert_eq!(s.failing_since, Some(ts(10)));
        assert!(!s.apply(&round(Some(2)), &c, ts(11)));
        // The third failed round flips it; failing_since is still the first.
        assert!(s.apply(&round(Some(2)), &c, ts(12)));
        assert!(!s.healthy);
        assert_eq!(s.failing_since, Some(ts(10)));
        // One good round is not enough; a failure resets the count.
        assert!(!s.apply(&round(None), &c, ts(13)));
        assert!(!s.healthy && s.failing_check.is_none());
        assert!(!s.apply(&round(Some(0)), &c, ts(14)));
        assert_eq!(s.failing_since, Some(ts(14)));
        assert!(!s.apply(&round(None), &c, ts(15)));
        assert!(s.apply(&round(None), &c, ts(16)));
        assert!(s.healthy);
        assert_eq!(s.last_success, Some(ts(16)));
        assert_eq!(s.latency_ms[..3], [Some(3), Some(5), Some(1)]);
    }

    #[test]
    fn a_node_failing_in_the_status_must_recover_before_it_is_healthy() {
        let prev = NodeProbeStatus {
            name: "900-a".into(),
            healthy: false,
            failing_check: Some("derp".into()),
            failing_since: Some(Time(ts(5))),
            ..Default::default()
        };
        let c = cfg();
        let mut s = NodeState::new(Some(&prev));
        assert!(!s.healthy);
        assert!(!s.apply(&round(None), &c, ts(10)));
        assert!(s.apply(&round(None), &c, ts(11)));
        // A failing node whose derper restarted and answers again: healthy after two rounds.
        assert!(s.healthy && s.failing_check.is_none() && s.failing_since.is_none());
    }

    #[test]
    fn mesh_blame_names_only_the_node_all_of_whose_pairs_fail() {
        let p = |a: &str, b: &str, ok: bool| (a.to_string(), b.to_string(), ok);
        let three = [
            p("a", "b", true),
            p("b", "a", true),
            p("a", "c", false),
            p("c", "a", false),
            p("b", "c", false),
            p("c", "b", false),
        ];
        let blame = mesh_blame(&three);
        assert_eq!(
            blame,
            [("a".into(), false), ("b".into(), false), ("c".into(), true)].into()
        );
        let two = [p("a", "b", false), p("b", "a", true)];
        assert_eq!(
            mesh_blame(&two),
            [("a".into(), false), ("b".into(), false)].into()
        );
        let two_dead = [p("a", "b", false), p("b", "a", false)];
        assert!(mesh_blame(&two_dead).values().all(|b| *b));
    }

    #[test]
    fn failing_nodes_come_from_the_status() {
        let mut r = crate::testutil::region("home", 900);
        r.status = Some(crate::crd::DerpRegionStatus {
            probe: Some(RegionProbeStatus {
                nodes: vec![
                    NodeProbeStatus {
                        name: "900-a".into(),
                        healthy: true,
                        ..Default::default()
                    },
                    NodeProbeStatus {
                        name: "900-b".into(),
                        healthy: false,
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        });
        let f = failing_nodes(&[Arc::new(r), Arc::new(crate::testutil::region("x", 901))]);
        assert_eq!(f, ["900-b".to_string()].into());
    }

    #[test]
    fn metrics_render_success_verdict_and_histograms() {
        let m = Arc::new(ProbeMetrics::example());
        let text = crate::metrics::encode([crate::metrics::Shared(m)]).unwrap();
        for want in [
            "derp_fleet_probe_rounds_total 2",
            r#"derp_fleet_probe_success{namespace="derp",region="home",node="900-a",check="stun"} 0"#,
            r#"derp_fleet_probe_success{namespace="derp",region="home",node="900-a",check="tls"} 1"#,
            r#"derp_fleet_probe_healthy{namespace="derp",region="home",node="900-a"} 0"#,
            r#"derp_fleet_probe_cert_not_after_seconds{namespace="derp",region="home",node="900-a"} 2000000000"#,
            r#"derp_fleet_probe_mesh_success{namespace="derp",region="home",from="900-a",to="900-b"} 1"#,
            r#"derp_fleet_probe_latency_seconds_bucket{le="0.0025",namespace="derp",region="home",check="tls"} 0"#,
            r#"derp_fleet_probe_latency_seconds_bucket{le="0.005",namespace="derp",region="home",check="tls"} 1"#,
            r#"derp_fleet_probe_latency_seconds_bucket{le="+Inf",namespace="derp",region="home",check="tls"} 1"#,
            r#"derp_fleet_probe_latency_seconds_sum{namespace="derp",region="home",check="tls"} 0.003"#,
            r#"derp_fleet_probe_mesh_delivery_seconds_count{namespace="derp",region="home"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        // The skipped mesh check has no success series.
        assert!(!text.contains(r#"check="mesh"} "#), "{text}");
    }
}
