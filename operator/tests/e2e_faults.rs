//! The operator under faults (issue 14 items 1-3), on the real control plane of `tests/cluster`
//! (etcd, kube-apiserver v1.37, controller-manager, kwok nodes, cert-manager's controllers). One
//! rig, three scenarios in order, each in its own namespace with its own nodes, replicas
//! (`--namespace`), Lease and map ConfigMap. During each, a poller fetches `/derpmap.json` from
//! every running replica 10 times a second and records every answer (status, body hash, time).
//!
//! 1. **Control-plane faults**: kube-apiserver SIGKILLed and restarted, then etcd (same ports, same
//!    data, `tests/cluster/component`), under two replicas. Every answer of every replica is a 200
//!    with the same bytes throughout; afterwards no object the operator writes changed (its write
//!    counters and the objects' resourceVersions) and its watches work again (a spec change and
//!    a pod turning NotReady reach both replicas' maps; the leader writes the new status).
//! 2. **Leader loss**: the leader SIGKILLed: the standby takes the Lease (measured from the kill
//!    and from the Lease's last renewal), reconciles every region without a write, and serves the
//!    same bytes throughout. Then both replicas SIGKILLed, the regions changed while none runs,
//!    both started again: exactly the objects the regions call for (nothing duplicated, nothing
//!    orphaned) and the map they call for.
//! 3. **Crash mid-reconcile**: `DERP_FLEET_CRASH_TRIALS` (default 20) trials, each a burst of
//!    region creations, updates (TLS mode, publish mode, derper args) and deletions with the
//!    operator SIGKILLed after a random number of its write requests, then restarted: every trial
//!    converges to exactly the objects the regions call for (DaemonSets, Secrets, ConfigMaps,
//!    Certificates) and their map. Seeded: the seed is printed, `DERP_FLEET_CRASH_SEED=N`
//!    replays it.
//!
//! Prints what it measures (`--nocapture`); figures are in operator/tests/README.md. Uses a running
//! rig when `DERP_FLEET_RIG_STATE` names its state dir (it must have been started by this
//! checkout's `tests/cluster/up`, which records the command lines a restart needs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::{Rig, RigOptions, Steps, http_get, metric, wait_for};

/// NotReady grace of every replica: short, so a pod turning NotReady proves the Pod watch within
/// seconds.
const GRACE: Duration = Duration::from_secs(2);
/// Lease duration of the leader-loss scenario (`--lease-duration`; renewed 1 s before expiry).
const LEASE_S: u64 = 4;
/// How long a component stays down before it is started again.
const DOWN: Duration = Duration::from_secs(3);
const MANAGED: &str = "app.kubernetes.io/managed-by=derp-fleet";

// ---------------------------------------------------------------------------------------------
// The poller: every replica's /derpmap.json 10 times a second, every answer recorded.

#[derive(Clone, Debug)]
struct Sample {
    /// Since the poller started.
    at: Duration,
    replica: String,
    /// 0: no HTTP answer (connection refused, timeout).
    status: u16,
    hash: u64,
    latency: Duration,
}

struct Target {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

struct Poller {
    t0: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    bodies: Arc<Mutex<HashMap<u64, String>>>,
    targets: HashMap<String, Target>,
}

fn hash_of(body: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    h.finish()
}

/// What the poller saw of one replica in a window.
#[derive(Debug, Default)]
struct Window {
    answers: usize,
    ok: usize,
    failed: usize,
    bodies: BTreeSet<u64>,
    /// Longest time between two 200 answers (or the window's edge and one).
    max_gap: Duration,
    max_latency: Duration,
}

impl Poller {
    fn new() -> Poller {
        Poller {
            t0: Instant::now(),
            samples: Arc::default(),
            bodies: Arc::default(),
            targets: HashMap::new(),
        }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Starts polling a replica (a thread of its own, so a slow replica delays no other).
    fn add(&mut self, replica: &str, port: u16) {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, samples, bodies, t0) = (
            stop.clone(),
            self.samples.clone(),
            self.bodies.clone(),
            self.t0,
        );
        let name = replica.to_string();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let start = Instant::now();
                let (status, hash) = match http_get(port, "/derpmap.json") {
                    Some((status, _, body)) => {
                        let h = hash_of(&body);
                        bodies.lock().unwrap().entry(h).or_insert(body);
                        (status, h)
                    }
                    None => (0, 0),
                };
                samples.lock().unwrap().push(Sample {
                    at: start - t0,
                    replica: name.clone(),
                    status,
                    hash,
                    latency: start.elapsed(),
                });
                let next = start + Duration::from_millis(100);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        });
        self.targets
            .insert(replica.to_string(), Target { stop, handle });
    }

    /// Stops polling a replica (before it is killed: a dead replica's refusals are not a gap of
    /// the service).
    fn remove(&mut self, replica: &str) {
        if let Some(t) = self.targets.remove(replica) {
            t.stop.store(true, Ordering::Relaxed);
            let _ = t.handle.join();
        }
    }

    fn window(&self, replica: &str, from: Duration, to: Duration) -> Window {
        let samples = self.samples.lock().unwrap();
        let mut w = Window::default();
        let mut last_ok = from;
        for s in samples
            .iter()
            .filter(|s| s.replica == replica && s.at >= from && s.at <= to)
        {
            w.answers += 1;
            w.max_latency = w.max_latency.max(s.latency);
            if s.status == 200 {
                w.ok += 1;
                w.bodies.insert(s.hash);
                w.max_gap = w.max_gap.max(s.at.saturating_sub(last_ok));
                last_ok = s.at;
            } else {
                w.failed += 1;
            }
        }
        w.max_gap = w.max_gap.max(to.saturating_sub(last_ok));
        w
    }

    /// Asserts every answer of `replica` in the window was a 200 with the body `want`; prints
    /// the figures.
    fn assert_served(&self, what: &str, replica: &str, from: Duration, to: Duration, want: u64) {
        let w = self.window(replica, from, to);
        println!(
            "MEASURED {what}: {replica} answered {}/{} polls with 200 over {:.1} s, {} distinct \
             bodies, longest gap between 200s {} ms, slowest answer {} ms",
            w.ok,
            w.answers,
            (to - from).as_secs_f64(),
            w.bodies.len(),
            w.max_gap.as_millis(),
            w.max_latency.as_millis()
        );
        assert!(w.answers > 0, "{what}: {replica} was never polled");
        assert_eq!(w.failed, 0, "{what}: {replica} failed {} polls", w.failed);
        if w.bodies.iter().any(|h| *h != want) {
            let bodies = self.bodies.lock().unwrap();
            let seen: Vec<&String> = w.bodies.iter().filter_map(|h| bodies.get(h)).collect();
            panic!(
                "{what}: {replica} served another map; wanted:\n{}\nsaw:\n{seen:#?}",
                bodies.get(&want).map_or("?", String::as_str)
            );
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let names: Vec<String> = self.targets.keys().cloned().collect();
        for n in names {
            self.remove(&n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster helpers

/// One map fetch: (hash, the parsed map).
fn map_now(port: u16) -> Option<(u64, Value)> {
    let (status, _, body) = http_get(port, "/derpmap.json")?;
    (status == 200).then_some(())?;
    Some((hash_of(&body), serde_json::from_str(&body).ok()?))
}

/// The map's regions: id -> (code, region name, node count).
fn map_regions(map: &Value) -> BTreeMap<u64, (String, String, usize)> {
    let mut out = BTreeMap::new();
    if let Some(regions) = map["Regions"].as_object() {
        for (id, r) in regions {
            let nodes = r["Nodes"].as_array().map_or(0, Vec::len);
            out.insert(
                id.parse().unwrap_or(0),
                (
                    r["RegionCode"].as_str().unwrap_or_default().to_string(),
                    r["RegionName"].as_str().unwrap_or_default().to_string(),
                    nodes,
                ),
            );
        }
    }
    out
}

fn leader(port: u16) -> Option<u64> {
    metric(port, "derpfleet_operator_leader")
}

/// The operator's write counters: (apply requests, writes that changed something, deletes,
/// events).
fn counters(port: u16) -> (u64, u64, u64, u64) {
    let (_, _, body) = http_get(port, "/metrics").expect("metrics served");
    let m = |n| common::metric_text(&body, n).unwrap_or(0);
    (
        m("derpfleet_operator_apply_requests_total"),
        m("derpfleet_operator_writes_total"),
        m("derpfleet_operator_deletes_total"),
        m("derpfleet_operator_events_total"),
    )
}

/// Every object an operator writes in `ns` (and its map ConfigMap): kind/name -> version. The
/// DaemonSets' and Certificates' `generation` (their controllers write their status), everything
/// else's resourceVersion.
fn versions(rig: &Rig, ns: &str, map_cm: &str) -> BTreeMap<String, String> {
    let list = rig
        .json(&[
            "-n",
            ns,
            "get",
            "secrets,configmaps,daemonsets,certificates.cert-manager.io,derpregions",
        ])
        .unwrap();
    let mut out = BTreeMap::new();
    for o in list["items"].as_array().unwrap() {
        let kind = o["kind"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        if name == "kube-root-ca.crt" {
            continue;
        }
        let v = if kind == "DaemonSet" || kind == "Certificate" {
            o["metadata"]["generation"].to_string()
        } else {
            o["metadata"]["resourceVersion"].to_string()
        };
        out.insert(format!("{kind}/{name}"), v);
    }
    if let Some(cm) = rig.json(&["-n", "default", "get", "configmap", map_cm]) {
        out.insert(
            format!("ConfigMap/default/{map_cm}"),
            cm["metadata"]["resourceVersion"].to_string(),
        );
    }
    out
}

fn changed(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect()
}

/// Waits until the map ConfigMap holds the map `port` serves (the leader writes it at most every
/// 5 s, so a write may be pending) and `versions` is unchanged for `quiet`: what is in flight
/// (pods turning Ready, cert-manager issuing, a status or ConfigMap write) must not be blamed on
/// the fault that follows.
fn wait_quiet(
    rig: &Rig,
    ns: &str,
    map_cm: &str,
    port: u16,
    quiet: Duration,
) -> BTreeMap<String, String> {
    let (v, d) = wait_for("objects quiet", || {
        let served = http_get(port, "/derpmap.json")?.2;
        let cm = rig.json(&["-n", "default", "get", "configmap", map_cm])?;
        (cm["data"]["derpmap.json"].as_str()? == served).then_some(())?;
        let first = versions(rig, ns, map_cm);
        std::thread::sleep(quiet);
        let second = versions(rig, ns, map_cm);
        (first == second).then_some(second)
    });
    println!("objects of {ns} quiet for {quiet:?} after {d:?}");
    v
}

/// `tests/cluster/component` on the rig: returns the milliseconds it printed.
fn component(rig: &Rig, action: &str, name: &str) -> u64 {
    let script = common::repo_root().join("tests/cluster/component");
    let out = rig.run(
        script.to_str().unwrap(),
        &["--state", rig.state.to_str().unwrap(), action, name],
    );
    print!("{out}");
    out.split(" ms ")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Operator arguments that keep a scenario's replicas to their own namespace, Lease and map
/// ConfigMap.
fn scoped(ns: &str, lease_s: u64) -> Vec<String> {
    vec![
        "--namespace".into(),
        ns.into(),
        "--operator-namespace".into(),
        "default".into(),
        "--lease-name".into(),
        format!("derp-fleet-{ns}"),
        "--map-configmap".into(),
        format!("derp-map-{ns}"),
        "--lease-duration".into(),
        lease_s.to_string(),
    ]
}

fn start_replica(rig: &mut Rig, identity: &str, ns: &str, lease_s: u64) -> (usize, u16) {
    let args = scoped(ns, lease_s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    rig.start_operator_with(identity, GRACE, &args)
}

fn wait_ready(port: u16) {
    wait_for("replica ready (caches synced, a map built)", || {
        (http_get(port, "/readyz")?.0 == 200).then_some(())
    });
}

fn sigkill(rig: &mut Rig, i: usize) {
    let _ = rig.operators[i].kill();
    let _ = rig.operators[i].wait();
}

/// Every version of a scenario's Lease from now until [`LeaseWatch::stop`] (`kubectl get -w`):
/// the API server's own record of who renewed it when, however slow this machine is.
struct LeaseWatch(std::process::Child);

type Ts = k8s_openapi::jiff::Timestamp;

impl LeaseWatch {
    fn start(rig: &Rig, ns: &str) -> LeaseWatch {
        let child = rig
            .cmd("kubectl")
            .args(["-n", "default", "get", "lease", &format!("derp-fleet-{ns}")])
            .args(["-w", "-o", "json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kubectl get -w");
        LeaseWatch(child)
    }

    /// Stops the watch; returns each version's (holder, renewTime, acquireTime).
    fn stop(mut self) -> Vec<(Option<String>, Option<Ts>, Option<Ts>)> {
        let _ = self.0.kill();
        let out = self.0.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map_while(Result::ok)
            .map(|l| {
                let spec = &l["spec"];
                let ts = |k: &str| spec[k].as_str().and_then(|t| t.parse().ok());
                (
                    spec["holderIdentity"].as_str().map(str::to_string),
                    ts("renewTime"),
                    ts("acquireTime"),
                )
            })
            .collect()
    }
}
// ---------------------------------------------------------------------------------------------
// The regions a test drives, and what they call for.

/// The variable part of a region's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    /// `tls.issuerRef` to the namespace's SelfSigned Issuer (cert-manager), else `selfSigned`.
    cert_manager: bool,
    /// `publish.mode: RegionPerNode` (no mesh), else `SharedRegion` with the mesh.
    per_node: bool,
    /// `extraArgs: [--max-connections=N]` when set.
    max_conns: Option<u32>,
}

/// A region of a test: name, id (ids are 10 apart: a RegionPerNode region uses id..id+2 here),
/// index for its ports.
fn region_manifest(ns: &str, selector: &str, name: &str, id: u32, i: u16, v: Variant) -> String {
    let tls = if v.cert_manager {
        "{issuerRef: {name: selfsigned, kind: Issuer}}"
    } else {
        "{selfSigned: {}}"
    };
    let mut extra = String::new();
    // Both modes spelled out: the CRD's default changed once already.
    extra.push_str(if v.per_node {
        "  publish: {mode: RegionPerNode}\n"
    } else {
        "  publish: {mode: SharedRegion}\n"
    });
    if let Some(n) = v.max_conns {
        extra.push_str(&format!("  extraArgs: [\"--max-connections={n}\"]\n"));
    }
    common::RegionYaml {
        ns,
        name,
        id,
        code: name,
        selector,
        tls,
        ports: (9000 + 10 * i, 9001 + 10 * i, 9002 + 10 * i),
        extra: &extra,
    }
    .yaml()
}

/// kind/name of every object a region with this variant owns.
fn expected_objects(name: &str, v: Variant) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.insert(format!("DaemonSet/{name}-derper"));
    // Self-signed: ours; issuerRef: cert-manager's, issued for our Certificate (same name).
    out.insert(format!("Secret/{name}-derper-tls"));
    if !v.per_node {
        out.insert(format!("Secret/{name}-derper-mesh-key"));
        out.insert(format!("ConfigMap/{name}-derper-mesh-peers"));
    }
    if v.cert_manager {
        out.insert(format!("Certificate/{name}-derper-tls"));
    }
    out
}

/// kind/name of every object in `ns` that carries our labels (being deleted or not).
fn managed_objects(rig: &Rig, ns: &str) -> Option<(BTreeSet<String>, Value)> {
    let list = rig.json(&[
        "-n",
        ns,
        "get",
        "secrets,configmaps,daemonsets,certificates.cert-manager.io",
        "-l",
        MANAGED,
    ])?;
    let set = list["items"]
        .as_array()?
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    Some((set, list))
}

/// Whether the cluster and the served map are exactly what `model` (name -> (id, variant)) calls
/// for on `nodes` nodes; `Err` says what differs.
fn check_converged(
    rig: &Rig,
    ns: &str,
    port: u16,
    nodes: usize,
    model: &BTreeMap<String, (u32, Variant)>,
) -> Result<(), String> {
    let (have, list) = managed_objects(rig, ns).ok_or("listing objects failed")?;
    let want: BTreeSet<String> = model
        .iter()
        .flat_map(|(n, (_, v))| expected_objects(n, *v))
        .collect();
    if have != want {
        let extra: Vec<_> = have.difference(&want).collect();
        let missing: Vec<_> = want.difference(&have).collect();
        return Err(format!("objects: extra {extra:?}, missing {missing:?}"));
    }
    let regions = rig
        .json(&["-n", ns, "get", "derpregions"])
        .ok_or("listing regions failed")?;
    let uids: BTreeSet<&str> = regions["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["metadata"]["uid"].as_str())
        .collect();
    for o in list["items"].as_array().unwrap() {
        let kind = o["kind"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        if o.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(format!("{kind}/{name} is being deleted"));
        }
        // Owned by a live region, so the garbage collector removes it with the region (names
        // alone would miss an object a deleted and recreated region left behind).
        let owned = o["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|refs| {
                refs.iter()
                    .any(|r| uids.contains(r["uid"].as_str().unwrap_or_default()))
            });
        if !owned {
            return Err(format!("{kind}/{name} is owned by no live region"));
        }
        if kind == "DaemonSet" {
            let region = name.trim_end_matches("-derper");
            let (_, v) = model[region];
            let args = o
                .pointer("/spec/template/spec/containers/0/args")
                .map(Value::to_string)
                .unwrap_or_default();
            let want_arg = v.max_conns.map(|n| format!("--max-connections={n}"));
            let has = args.contains("--max-connections=");
            match &want_arg {
                Some(a) if !args.contains(a.as_str()) => {
                    return Err(format!("{name}: args {args} lack {a}"));
                }
                None if has => return Err(format!("{name}: args {args} keep --max-connections")),
                _ => {}
            }
        }
    }
    let listed: BTreeSet<String> = regions["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = r["metadata"]["name"].as_str().unwrap_or_default();
            let g = r.pointer("/metadata/generation");
            let og = r.pointer("/status/observedGeneration");
            if g != og {
                // Reported through the set difference below.
                format!("{name} (generation {g:?}, observed {og:?})")
            } else {
                name.to_string()
            }
        })
        .collect();
    let modelled: BTreeSet<String> = model.keys().cloned().collect();
    if listed != modelled {
        return Err(format!(
            "regions (with status caught up) {listed:?}, want {modelled:?}"
        ));
    }
    let (_, map) = map_now(port).ok_or("no map served")?;
    let got: BTreeMap<u64, (String, usize)> = map_regions(&map)
        .into_iter()
        .map(|(id, (code, _, n))| (id, (code, n)))
        .collect();
    let mut want_map = BTreeMap::new();
    for (name, (id, v)) in model {
        if v.per_node {
            for k in 0..nodes {
                let code = if k == 0 {
                    name.clone()
                } else {
                    format!("{name}-{k}")
                };
                want_map.insert(u64::from(*id) + k as u64, (code, 1));
            }
        } else {
            want_map.insert(u64::from(*id), (name.clone(), nodes));
        }
    }
    if got != want_map {
        return Err(format!("map regions {got:?}, want {want_map:?}"));
    }
    Ok(())
}

/// Waits (bounded) for [`check_converged`]; returns how long it took.
fn wait_converged(
    rig: &Rig,
    ns: &str,
    port: u16,
    nodes: usize,
    model: &BTreeMap<String, (u32, Variant)>,
    within: Duration,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let last = match check_converged(rig, ns, port, nodes, model) {
            Ok(()) => return t0.elapsed(),
            Err(e) => e,
        };
        assert!(
            t0.elapsed() < within,
            "not converged within {within:?}: {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn apply_model(rig: &Rig, ns: &str, selector: &str, model: &BTreeMap<String, (u32, Variant)>) {
    let docs: Vec<String> = model
        .iter()
        .map(|(n, (id, v))| region_manifest(ns, selector, n, *id, index_of(n), *v))
        .collect();
    rig.apply(&docs.join("---\n"));
}

/// Port index of a test region: the number in its name.
fn index_of(name: &str) -> u16 {
    name.trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0)
}

fn setup_namespace(rig: &Rig, ns: &str, prefix: &str, first_ip: &str) {
    rig.kubectl(&["create", "namespace", ns]);
    rig.apply(&format!(
        "apiVersion: cert-manager.io/v1\nkind: Issuer\nmetadata: {{name: selfsigned, namespace: {ns}}}\n\
         spec: {{selfSigned: {{}}}}\n"
    ));
    rig.create_nodes(prefix, 3, first_ip, ns, false);
}

// ---------------------------------------------------------------------------------------------
// 1. Control-plane faults

#[allow(
    clippy::too_many_lines,
    reason = "one scenario on one rig: each step builds on the state the previous one left"
)]
fn control_plane_faults(rig: &mut Rig) {
    let ns = "cpf";
    let map_cm = format!("derp-map-{ns}");
    setup_namespace(rig, ns, "cpf-", "127.0.4.1");
    let (ia, pa) = start_replica(rig, "cpf-a", ns, 15);
    wait_for("cpf-a leads", || (leader(pa)? == 1).then_some(()));
    let (ib, pb) = start_replica(rig, "cpf-b", ns, 15);
    wait_ready(pb);
    let mut model = BTreeMap::new();
    let shared = Variant {
        cert_manager: false,
        per_node: false,
        max_conns: None,
    };
    let per_node = Variant {
        cert_manager: true,
        per_node: true,
        max_conns: None,
    };
    model.insert("cp0".to_string(), (1100, shared));
    model.insert("cp1".to_string(), (1110, per_node));
    apply_model(rig, ns, ns, &model);
    let d = wait_converged(rig, ns, pa, 3, &model, common::WAIT);
    println!("cpf: 2 regions converged in {d:?}");
    wait_converged(rig, ns, pb, 3, &model, common::WAIT);

    let mut poller = Poller::new();
    poller.add("cpf-a", pa);
    poller.add("cpf-b", pb);
    let pods = rig
        .json(&["-n", ns, "get", "pods", "-l", "derpfleet.io/region=cp0"])
        .unwrap();
    let pod = pods["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();

    for (round, comp) in ["kube-apiserver", "etcd"].into_iter().enumerate() {
        let before = wait_quiet(rig, ns, &map_cm, pa, Duration::from_secs(3));
        let (want, _) = map_now(pa).unwrap();
        assert_eq!(
            map_now(pb).unwrap().0,
            want,
            "replicas serve different maps"
        );
        let (ca, cb) = (counters(pa), counters(pb));
        let (builds_a, builds_b) = (
            metric(pa, "derpfleet_map_builds_total").unwrap(),
            metric(pb, "derpfleet_map_builds_total").unwrap(),
        );
        let from = poller.now();
        let down_ms = component(rig, "kill", comp);
        std::thread::sleep(DOWN);
        let ready_ms = component(rig, "start", comp);
        let back = Instant::now();
        // Watches reconnect on their own backoff; a relist rebuilds the map (same bytes).
        // (Not every fault makes a watch relist: one that resumes from its resourceVersion
        // rebuilds nothing. Watched for 10 s, reported, not required.)
        let mut rebuilt: [Option<Duration>; 2] = [None, None];
        while back.elapsed() < Duration::from_secs(10) && rebuilt.iter().any(Option::is_none) {
            for (k, (p, b0)) in [(pa, builds_a), (pb, builds_b)].into_iter().enumerate() {
                if rebuilt[k].is_none()
                    && metric(p, "derpfleet_map_builds_total").is_some_and(|b| b > b0)
                {
                    rebuilt[k] = Some(back.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
            "MEASURED {comp} down {down_ms} ms (kill) + {DOWN:?} + {ready_ms} ms (start to \
             ready); ready -> map rebuilt from relisted caches: cpf-a {:?}, cpf-b {:?}",
            rebuilt[0], rebuilt[1]
        );
        // Settle, then count what the operator wrote across the fault.
        std::thread::sleep(Duration::from_secs(5));
        let after = versions(rig, ns, &map_cm);
        let to = poller.now();
        let (ca2, cb2) = (counters(pa), counters(pb));
        let diff = changed(&before, &after);
        println!(
            "MEASURED {comp} SIGKILL, {DOWN:?} down, {ready_ms} ms to ready: writes across it: \
             cpf-a apply requests +{}, changed +{}, deletes +{}, events +{}; cpf-b +{}/+{}/+{}/+{}; \
             objects changed: {}",
            ca2.0 - ca.0,
            ca2.1 - ca.1,
            ca2.2 - ca.2,
            ca2.3 - ca.3,
            cb2.0 - cb.0,
            cb2.1 - cb.1,
            cb2.2 - cb.2,
            cb2.3 - cb.3,
            diff.len()
        );
        for (r, p) in [("cpf-a", pa), ("cpf-b", pb)] {
            poller.assert_served(&format!("{comp} restart"), r, from, to, want);
            println!("{r} leads: {:?}", leader(p));
        }
        assert!(
            diff.is_empty(),
            "{comp} restart: objects changed: {diff:#?}"
        );
        assert_eq!(
            (ca2.1 - ca.1, ca2.2 - ca.2, cb2.1 - cb.1, cb2.2 - cb.2),
            (0, 0, 0, 0),
            "{comp} restart: the operator wrote"
        );
        assert_eq!(
            leader(pa).unwrap() + leader(pb).unwrap(),
            1,
            "one leader after the {comp} restart"
        );

        // The watches work: a spec change (DerpRegion watch) reaches both maps and the leader
        // writes the new status; a pod NotReady (Pod watch) takes its node out of both maps.
        let new_name = format!("CP0 after {comp}");
        let t0 = Instant::now();
        rig.kubectl(&[
            "-n",
            ns,
            "patch",
            "derpregion",
            "cp0",
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{\"name\":\"{new_name}\"}}}}"),
        ]);
        for (r, p) in [("cpf-a", pa), ("cpf-b", pb)] {
            wait_for("the new region name in the map", || {
                let (_, m) = map_now(p)?;
                (map_regions(&m).get(&1100)?.1 == new_name).then_some(())
            });
            println!(
                "MEASURED after the {comp} restart: spec change -> {r}'s map: {:?}",
                t0.elapsed()
            );
        }
        wait_for("status.observedGeneration follows", || {
            let r = rig.json(&["-n", ns, "get", "derpregion", "cp0"])?;
            (r.pointer("/status/observedGeneration")? == r.pointer("/metadata/generation")?)
                .then_some(())
        });
        println!(
            "MEASURED after the {comp} restart: spec change -> leader wrote the status: {:?}",
            t0.elapsed()
        );
        let t0 = Instant::now();
        rig.run("rigctl", &["pod-ready", ns, &pod, "false"]);
        for (r, p) in [("cpf-a", pa), ("cpf-b", pb)] {
            wait_for("a NotReady node out of the map", || {
                let (_, m) = map_now(p)?;
                (map_regions(&m).get(&1100)?.2 == 2).then_some(())
            });
            println!(
                "MEASURED after the {comp} restart: pod NotReady -> out of {r}'s map: {:?} (grace {GRACE:?})",
                t0.elapsed()
            );
        }
        rig.run("rigctl", &["pod-ready", ns, &pod, "true"]);
        for p in [pa, pb] {
            wait_for("the node back in the map", || {
                let (_, m) = map_now(p)?;
                (map_regions(&m).get(&1100)?.2 == 3).then_some(())
            });
        }
        let _ = round;
    }
    drop(poller);
    for i in [ia, ib] {
        sigkill(rig, i);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Leader loss

#[allow(
    clippy::too_many_lines,
    reason = "one scenario on one rig: each step builds on the state the previous one left"
)]
fn leader_loss(rig: &mut Rig) {
    let ns = "ll";
    let map_cm = format!("derp-map-{ns}");
    setup_namespace(rig, ns, "ll-", "127.0.5.1");
    let (ia, pa) = start_replica(rig, "ll-a", ns, LEASE_S);
    wait_for("ll-a leads", || (leader(pa)? == 1).then_some(()));
    let (ib, pb) = start_replica(rig, "ll-b", ns, LEASE_S);
    wait_ready(pb);
    let mut model = BTreeMap::new();
    model.insert(
        "ll0".to_string(),
        (
            1200,
            Variant {
                cert_manager: false,
                per_node: false,
                max_conns: None,
            },
        ),
    );
    model.insert(
        "ll1".to_string(),
        (
            1210,
            Variant {
                cert_manager: true,
                per_node: true,
                max_conns: None,
            },
        ),
    );
    apply_model(rig, ns, ns, &model);
    wait_converged(rig, ns, pa, 3, &model, common::WAIT);
    wait_converged(rig, ns, pb, 3, &model, common::WAIT);
    let before = wait_quiet(rig, ns, &map_cm, pa, Duration::from_secs(2));
    let (want, _) = map_now(pa).unwrap();
    assert_eq!(
        map_now(pb).unwrap().0,
        want,
        "replicas serve different maps"
    );
    assert_eq!(leader(pb), Some(0));
    let reconciles_b = metric(pb, "derpfleet_operator_reconciles_total").unwrap();
    let writes_b = counters(pb);

    // --- SIGKILL the leader: the standby takes over
    let mut poller = Poller::new();
    poller.add("ll-a", pa);
    poller.add("ll-b", pb);
    let watch = LeaseWatch::start(rig, ns);
    std::thread::sleep(Duration::from_millis(500));
    let from = poller.now();
    poller.remove("ll-a");
    let t_kill = Instant::now();
    let killed_at = Ts::now();
    sigkill(rig, ia);
    wait_for("ll-b leads", || (leader(pb)? == 1).then_some(()));
    let takeover = t_kill.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let versions_seen = watch.stop();
    // The dead leader's last renewal, and the standby's acquisition, as the Lease recorded them.
    let last_renew = versions_seen
        .iter()
        .filter(|v| v.0.as_deref() == Some("ll-a"))
        .filter_map(|v| v.1)
        .max()
        .expect("the Lease watch saw ll-a hold it");
    let acquired = versions_seen
        .iter()
        .filter(|v| v.0.as_deref() == Some("ll-b"))
        .find_map(|v| v.2)
        .expect("the Lease watch saw ll-b take it");
    let since_renew = acquired.duration_since(last_renew);
    let since_kill = acquired.duration_since(killed_at);
    println!(
        "MEASURED leader SIGKILL -> standby leads: {takeover:?} (lease {LEASE_S} s); the Lease \
         names ll-b {} ms after the kill, {} ms after the dead leader's last renewal ({} Lease \
         versions watched)",
        since_kill.as_millis(),
        since_renew.as_millis(),
        versions_seen.len()
    );
    // kube-lease-manager takes an expired Lease after a random 0.1-1 s pause (fewer collisions);
    // the new holder's acquireTime is the Lease's own clock, so the bound is the lease duration
    // plus that pause plus the API round trips.
    assert!(
        since_renew.as_millis() <= i128::from(LEASE_S) * 1000 + 2500,
        "the standby took the Lease {} ms after the last renewal (lease {LEASE_S} s)",
        since_renew.as_millis()
    );
    let (_, d) = wait_for("the new leader reconciled every region", || {
        (metric(pb, "derpfleet_operator_reconciles_total")? >= reconciles_b + 2).then_some(())
    });
    println!(
        "MEASURED new leader reconciled both regions {:?} after leading",
        d
    );
    std::thread::sleep(Duration::from_secs(2));
    let to = poller.now();
    let after = versions(rig, ns, &map_cm);
    let wb = counters(pb);
    println!(
        "MEASURED takeover writes: apply requests +{}, changed +{}, deletes +{}, events +{} \
         ({} reconciles); objects changed: {:?}",
        wb.0 - writes_b.0,
        wb.1 - writes_b.1,
        wb.2 - writes_b.2,
        wb.3 - writes_b.3,
        metric(pb, "derpfleet_operator_reconciles_total").unwrap() - reconciles_b,
        changed(&before, &after)
    );
    poller.assert_served("leader SIGKILL and takeover", "ll-b", from, to, want);
    assert!(
        changed(&before, &after).is_empty(),
        "the takeover rewrote objects"
    );
    assert_eq!((wb.1 - writes_b.1, wb.2 - writes_b.2), (0, 0));

    // The new leader acts: the fleet grows by a node; both regions follow.
    let t0 = Instant::now();
    rig.create_nodes("ll-x-", 1, "127.0.5.9", ns, false);
    wait_converged(rig, ns, pb, 4, &model, common::WAIT);
    println!(
        "MEASURED new leader: a 4th node -> objects and map converged: {:?}",
        t0.elapsed()
    );
    let (want4, _) = map_now(pb).unwrap();

    // The old leader comes back as a standby and serves the same bytes from its first map on.
    let (ia2, pa2) = start_replica(rig, "ll-a", ns, LEASE_S);
    let from = poller.now();
    poller.add("ll-a", pa2);
    wait_ready(pa2);
    std::thread::sleep(Duration::from_secs(1));
    let to = poller.now();
    let w = poller.window("ll-a", from, to);
    println!(
        "restarted ll-a: {} polls, {} before its first map (503 or refused), then {} x 200 \
         with {} distinct bodies",
        w.answers,
        w.failed,
        w.ok,
        w.bodies.len()
    );
    assert!(
        w.bodies.iter().all(|h| *h == want4),
        "restarted standby served another map"
    );
    assert_eq!(leader(pa2), Some(0));

    // --- both SIGKILLed; the regions change while nothing runs; both start again
    let t_down = poller.now();
    poller.remove("ll-a");
    poller.remove("ll-b");
    sigkill(rig, ia2);
    sigkill(rig, ib);
    // ll0: SharedRegion -> RegionPerNode (its mesh Secret and ConfigMap must go); ll1: issuerRef
    // -> selfSigned (its Certificate goes, the Secret of that name becomes ours); ll2: new.
    model.insert(
        "ll0".to_string(),
        (
            1200,
            Variant {
                cert_manager: false,
                per_node: true,
                max_conns: Some(777),
            },
        ),
    );
    model.insert(
        "ll1".to_string(),
        (
            1210,
            Variant {
                cert_manager: false,
                per_node: false,
                max_conns: None,
            },
        ),
    );
    model.insert(
        "ll2".to_string(),
        (
            1220,
            Variant {
                cert_manager: true,
                per_node: false,
                max_conns: None,
            },
        ),
    );
    apply_model(rig, ns, ns, &model);
    let t0 = Instant::now();
    let (_, pa3) = start_replica(rig, "ll-a", ns, LEASE_S);
    let (_, pb3) = start_replica(rig, "ll-b", ns, LEASE_S);
    poller.add("ll-a", pa3);
    poller.add("ll-b", pb3);
    wait_for("one of the restarted replicas leads", || {
        (leader(pa3)? + leader(pb3)? == 1).then_some(())
    });
    println!("MEASURED both restarted -> a leader: {:?}", t0.elapsed());
    let d = wait_converged(rig, ns, pa3, 4, &model, common::WAIT);
    wait_converged(rig, ns, pb3, 4, &model, common::WAIT);
    println!(
        "MEASURED both replicas SIGKILLed, 3 regions changed, both restarted -> exactly the \
         objects and map the regions call for: {:?} (from the restart)",
        t0.elapsed().max(d)
    );
    let w = poller.window("ll-b", t_down, poller.now());
    println!(
        "restarted ll-b: {} polls before its first map of {} in all",
        w.failed, w.answers
    );
    drop(poller);
    rig.stop_operators();
}

// ---------------------------------------------------------------------------------------------
// 3. Crash mid-reconcile

fn random_variant(rng: &mut StdRng) -> Variant {
    Variant {
        cert_manager: rng.gen_bool(0.5),
        per_node: rng.gen_bool(0.4),
        max_conns: rng.gen_bool(0.5).then(|| rng.gen_range(100..10_000)),
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "one scenario on one rig: each step builds on the state the previous one left"
)]
fn crash_mid_reconcile(rig: &mut Rig) {
    let ns = "crash";
    setup_namespace(rig, ns, "crash-", "127.0.6.1");
    let trials: usize = std::env::var("DERP_FLEET_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("DERP_FLEET_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!(
        "crash mid-reconcile: seed {seed} ({trials} trials; replay with \
         DERP_FLEET_CRASH_SEED={seed} cargo test -p operator --test e2e_faults)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let id = |n: &str| 1300 + 10 * u32::from(index_of(n));
    let mut model: BTreeMap<String, (u32, Variant)> = BTreeMap::new();
    let (mut op, mut port) = start_replica(rig, "crash-op", ns, 15);
    wait_for("crash-op leads", || (leader(port)? == 1).then_some(()));
    let mut figures = Vec::new();
    let mut kills_before_done = 0;
    for trial in 0..trials {
        // The burst: each name is created, updated, deleted or left alone.
        let mut next = model.clone();
        let mut ops = Vec::new();
        for n in &names {
            let r: f64 = rng.r#gen();
            match next.get(n).copied() {
                None if r < 0.6 => {
                    next.insert(n.clone(), (id(n), random_variant(&mut rng)));
                    ops.push(format!("+{n}"));
                }
                Some(_) if r < 0.3 => {
                    next.remove(n);
                    ops.push(format!("-{n}"));
                }
                Some((i, old)) if r < 0.8 => {
                    let mut v = random_variant(&mut rng);
                    if v == old {
                        v.max_conns = Some(old.max_conns.unwrap_or(0) + 1);
                    }
                    next.insert(n.clone(), (i, v));
                    ops.push(format!("~{n}"));
                }
                _ => {}
            }
        }
        let deleted: Vec<String> = model
            .keys()
            .filter(|n| !next.contains_key(*n))
            .cloned()
            .collect();
        let applied: BTreeMap<String, (u32, Variant)> = next
            .iter()
            .filter(|(n, v)| model.get(*n) != Some(v))
            .map(|(n, v)| (n.clone(), *v))
            .collect();
        // Kill after a random number of the operator's write requests (apply and delete) in
        // this burst; 0 kills it before it wrote anything.
        let kill_after: u64 = rng.gen_range(0..=12);
        let w0 = {
            let c = counters(port);
            c.0 + c.2
        };
        let t0 = Instant::now();
        let burst = {
            let env = rig.env.clone();
            let yaml: Vec<String> = applied
                .iter()
                .map(|(n, (i, v))| region_manifest(ns, ns, n, *i, index_of(n), *v))
                .collect();
            let yaml = yaml.join("---\n");
            let deleted = deleted.clone();
            std::thread::spawn(move || {
                let run = |args: &[&str], stdin: Option<&str>| {
                    let mut c = std::process::Command::new("kubectl");
                    c.envs(env.iter().map(|(k, v)| (k, v)))
                        .args(args)
                        .stdin(std::process::Stdio::piped())
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped());
                    let mut child = c.spawn().unwrap();
                    if let Some(s) = stdin {
                        use std::io::Write;
                        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
                    }
                    drop(child.stdin.take());
                    let out = child.wait_with_output().unwrap();
                    assert!(
                        out.status.success(),
                        "kubectl {args:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                };
                if !yaml.is_empty() {
                    run(&["apply", "-f", "-"], Some(&yaml));
                }
                if !deleted.is_empty() {
                    let mut args = vec!["-n", ns, "delete", "derpregion", "--wait=false"];
                    args.extend(deleted.iter().map(String::as_str));
                    run(&args, None);
                }
            })
        };
        // Poll the counters until the kill point (0: as soon as kubectl is done); a burst that
        // needs fewer writes is killed 3 s after it began (after its reconcile: the other end
        // of the range).
        let mut at = w0;
        while t0.elapsed() < Duration::from_secs(3) {
            if let Some((_, _, body)) = http_get(port, "/metrics") {
                let m = |n| common::metric_text(&body, n).unwrap_or(0);
                at = m("derpfleet_operator_apply_requests_total")
                    + m("derpfleet_operator_deletes_total");
                if at - w0 >= kill_after && (kill_after > 0 || burst.is_finished()) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let killed_at = t0.elapsed();
        sigkill(rig, op);
        if at - w0 >= kill_after {
            kills_before_done += 1;
        }
        burst.join().expect("the burst's kubectl failed");
        model = next;
        let t_restart = Instant::now();
        (op, port) = start_replica(rig, "crash-op", ns, 15);
        let d = wait_converged(rig, ns, port, 3, &model, common::WAIT);
        println!(
            "trial {trial:2}: {:<24} killed after {:2} write requests ({:4} ms into the burst); \
             restarted -> converged in {:5} ms; regions now {:?}",
            ops.join(" "),
            at - w0,
            killed_at.as_millis(),
            d.as_millis(),
            model.keys().collect::<Vec<_>>()
        );
        figures.push((t_restart.elapsed(), d));
    }
    let conv: Vec<u128> = figures.iter().map(|f| f.1.as_millis()).collect();
    let mut sorted = conv.clone();
    sorted.sort_unstable();
    println!(
        "MEASURED crash mid-reconcile, seed {seed}: {trials} trials, {kills_before_done} killed at \
         their chosen write; restart -> converged: median {} ms, max {} ms",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    // Leave nothing behind: delete every region, everything it owned goes.
    rig.kubectl(&["-n", ns, "delete", "derpregions", "--all", "--wait=false"]);
    model.clear();
    wait_converged(rig, ns, port, 3, &model, common::WAIT);
    rig.stop_operators();
}

#[test]
fn operator_survives_control_plane_faults_leader_loss_and_crashes() {
    let mut rig = Rig::start(RigOptions {
        certmanager: true,
        ..Default::default()
    });
    rig.install_crd();
    let mut steps = Steps::new("fault scenarios").only_from_env("DERP_FLEET_FAULTS_ONLY");
    type Scenario = fn(&mut Rig);
    let scenarios: [(&str, Scenario); 3] = [
        ("control-plane faults", control_plane_faults),
        ("leader loss", leader_loss),
        ("crash mid-reconcile", crash_mid_reconcile),
    ];
    for (name, scenario) in scenarios {
        steps.run(name, || scenario(&mut rig));
        // Whatever happened, no replica of this scenario runs on into the next.
        for c in &mut rig.operators {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    steps.finish(None);
}
