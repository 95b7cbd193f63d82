//! Rollouts under traffic (issue 14, item 4), on the real control plane of `tests/cluster`: the
//! DaemonSet controller rolls a region's derper pods node by node, run by the process kubelet,
//! while two of Tailscale's `derphttp` region clients relay through the region.
//!
//! One region (self-signed, pinned in the map, meshed) on two process nodes. Client A uses the
//! operator's map as served (prefers node 0), client B the same region with the nodes reversed
//! (prefers node 1), so A and B relay across the mesh and each rollout step moves one of them.
//! `derproll` (tests/interop) sends a sequence-numbered packet every 10 ms each way and reports
//! the longest time without a delivery around a client move (the relay stall), the packets lost and whether a flow
//! broke. Two rollouts are measured: a new image tag, then new arguments. A poller reads the
//! operator's `/derpmap.json` ten times a second throughout.
//!
//! Checked: each rollout completes (every pod replaced, both nodes Ready), no flow is broken,
//! each client ends on a new derper, the map keeps both nodes throughout. The stall and loss
//! are printed (`MEASURED`), not asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{RegionYaml, Rig, RigOptions, map, map_nodes, wait_for, wait_within};
use serde_json::{Value, json};

const NS: &str = "roll";
const REGION: &str = "roll";
const ID: u32 = 920;

/// The region's derper pods: (name, node, controller-revision-hash, terminating).
fn pods(rig: &Rig) -> Vec<(String, String, String, bool)> {
    let list = rig
        .json(&[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            &format!("derpfleet.io/region={REGION}"),
        ])
        .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |ptr: &str| p.pointer(ptr).and_then(Value::as_str).unwrap_or("");
            (
                s("/metadata/name").to_string(),
                s("/spec/nodeName").to_string(),
                s("/metadata/labels/controller-revision-hash").to_string(),
                p.pointer("/metadata/deletionTimestamp").is_some(),
            )
        })
        .collect()
}

/// Which nodes each client's map lists.
#[derive(Clone, Copy)]
enum Clients {
    /// A: the region as served (node 0 first), B: reversed; they relay across the mesh.
    Meshed,
    /// Both: node 0 only, a region of one node as its clients see it (no other node to go to).
    OneNode,
}

/// The region with its nodes in the given order, as a one-region map file.
fn region_map(full: &Value, reverse: bool, first_only: bool) -> String {
    let mut region = full["Regions"][ID.to_string()].clone();
    let mut nodes = region["Nodes"].as_array().unwrap().clone();
    if reverse {
        nodes.reverse();
    }
    if first_only {
        nodes.truncate(1);
    }
    region["Nodes"] = json!(nodes);
    json!({"Regions": {ID.to_string(): region}}).to_string()
}

struct Measured {
    stall_ms: i64,
    move_ms: i64,
    moves: i64,
    lost: i64,
    rollout: Duration,
    map_samples: usize,
    map_short: usize,
    output: String,
}

/// Runs derproll while `change` is applied and the DaemonSet rolls; returns what it measured.
#[allow(
    clippy::too_many_lines,
    reason = "one measurement: the poller, the clients and the rollout run side by side and are read together"
)]
fn measure(
    rig: &mut Rig,
    ts: &Path,
    map_port: u16,
    (what, patch, clients): (&str, &str, Clients),
) -> Measured {
    let work = rig.state.join("e2e-rollout");
    std::fs::create_dir_all(&work).unwrap();
    let (_, full) = map(map_port).unwrap();
    let fa = work.join(format!("{what}-a.json"));
    let fb = work.join(format!("{what}-b.json"));
    let one = matches!(clients, Clients::OneNode);
    std::fs::write(&fa, region_map(&full, false, one)).unwrap();
    std::fs::write(&fb, region_map(&full, !one, one)).unwrap();
    let stop = work.join(format!("{what}.stop"));
    let ready = work.join(format!("{what}.ready"));
    let out_path = work.join(format!("{what}.out"));
    let out = std::fs::File::create(&out_path).unwrap();
    let mut roll = rig
        .cmd("timeout")
        .args(["-k", "5", "300"])
        .arg(ts.join("derproll"))
        .arg("-a-map")
        .arg(&fa)
        .arg("-b-map")
        .arg(&fb)
        .arg("-stop-file")
        .arg(&stop)
        .arg("-ready-file")
        .arg(&ready)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting derproll");
    rig.add_log(out_path.clone());
    wait_within(
        "derproll relaying both ways",
        Duration::from_secs(60),
        || ready.exists().then_some(()),
    );
    let before: Vec<String> = pods(rig).into_iter().map(|p| p.2).collect();

    // The map, ten times a second, for the whole rollout.
    let samples: Arc<Mutex<Vec<Option<Vec<String>>>>> = Arc::default();
    let polling = Arc::new(AtomicBool::new(true));
    let poller = {
        let (samples, polling) = (samples.clone(), polling.clone());
        std::thread::spawn(move || {
            while polling.load(Ordering::Relaxed) {
                let s = map_nodes(map_port, ID);
                samples.lock().unwrap().push(s);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let t0 = Instant::now();
    rig.kubectl(&[
        "-n",
        NS,
        "patch",
        "derpregion",
        REGION,
        "--type",
        "merge",
        "-p",
        patch,
    ]);
    // Done: two pods, none terminating, both of a revision that was not there before, Ready.
    let (_, _) = wait_within(
        &format!("{what}: every derper pod replaced"),
        Duration::from_secs(180),
        || {
            let p = pods(rig);
            let done = p.len() == 2
                && p.iter()
                    .all(|(_, _, rev, term)| !term && !before.contains(rev));
            if !done {
                return None;
            }
            let ds = rig.json(&["-n", NS, "get", "daemonset", &format!("{REGION}-derper")])?;
            let st = &ds["status"];
            (st["numberReady"] == 2 && st["updatedNumberScheduled"] == 2).then_some(())
        },
    );
    let rollout = t0.elapsed();
    // Let the clients show they relay on the new pods.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, "stop\n").unwrap();
    let status = roll.wait().unwrap();
    polling.store(false, Ordering::Relaxed);
    poller.join().unwrap();
    let output = std::fs::read_to_string(&out_path).unwrap();
    println!("--- derproll, rollout of the {what}:\n{output}");
    assert!(
        status.success(),
        "derproll failed (a broken flow?):\n{output}"
    );
    let stall = output
        .lines()
        .find_map(|l| l.strip_prefix("STALL "))
        .expect("derproll's STALL line");
    let field = |k: &str| -> i64 {
        stall
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let samples = samples.lock().unwrap();
    let map_short = samples
        .iter()
        .filter(|s| s.as_ref().is_none_or(|n| n.len() < 2))
        .count();
    Measured {
        stall_ms: field("max="),
        move_ms: field("move="),
        moves: field("moves="),
        lost: field("lost="),
        rollout,
        map_samples: samples.len(),
        map_short,
        output,
    }
}

/// Each client's servers, from derproll's `RESULT client X ... servers=[k1 k2 ...]` lines.
fn servers_of(output: &str, client: &str) -> Vec<String> {
    let prefix = format!("RESULT client {client} ");
    let line = output
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no result line for client {client}"));
    let list = line
        .split("servers=[")
        .nth(1)
        .unwrap()
        .trim_end_matches(']');
    list.split_whitespace().map(str::to_string).collect()
}

#[test]
fn derper_rollouts_under_traffic() {
    let t_all = Instant::now();
    let derper = common::derper_bin();
    let ts = common::tailscale_bin();
    let mut rig = Rig::start(RigOptions {
        certmanager: false,
        process_kubelet: true,
        image_bins: vec![("ghcr.io/derp-fleet/derper".into(), derper)],
    });
    rig.install_crd();
    rig.kubectl(&["create", "namespace", NS]);
    let net = common::loopback_net();
    rig.create_nodes("roll-", 2, &format!("{net}.1"), "roll", true);
    // The chart's default not-ready grace (10 min): the map rides out a rollout.
    let port = rig.start_leader("op-roll", Duration::from_secs(600));
    let region = RegionYaml {
        ns: NS,
        name: REGION,
        id: ID,
        code: REGION,
        selector: "roll",
        tls: "{selfSigned: {}}",
        ports: (8460, 3480, 9760),
        extra: "  image: ghcr.io/derp-fleet/derper:v1\n",
    };
    rig.apply(&region.yaml());
    let (_, d) = wait_for("both derpers Ready and in the map", || {
        (map_nodes(port, ID)?.len() == 2).then_some(())
    });
    println!("region applied -> 2 nodes in the map: {d:?}");
    let ds = rig
        .json(&["-n", NS, "get", "daemonset", &format!("{REGION}-derper")])
        .unwrap();
    println!(
        "updateStrategy: {}",
        ds.pointer("/spec/updateStrategy").unwrap()
    );
    for (pod, _, _, _) in pods(&rig) {
        rig.add_log(rig.pod_log(NS, &pod, "derper"));
    }

    let mut results = Vec::new();
    for (what, patch, clients) in [
        (
            "image",
            r#"{"spec":{"image":"ghcr.io/derp-fleet/derper:v2"}}"#,
            Clients::Meshed,
        ),
        (
            "args",
            r#"{"spec":{"extraArgs":["--max-connections=100000"]}}"#,
            Clients::OneNode,
        ),
    ] {
        let m = measure(&mut rig, &ts, port, (what, patch, clients));
        for (pod, _, _, _) in pods(&rig) {
            rig.add_log(rig.pod_log(NS, &pod, "derper"));
        }
        // Each client moved to a new derper: its last server is not its first.
        for c in ["A", "B"] {
            let s = servers_of(&m.output, c);
            assert!(
                s.len() >= 2 && s.first() != s.last(),
                "{what}: client {c} never moved to a new derper: {s:?}"
            );
        }
        println!(
            "MEASURED rollout of the {what} ({}): DaemonSet rolled 2 nodes in {:?}; relay stall \
             around a client move {} ms at most ({} moves), longest gap in the whole run {} ms, \
             {} packets lost (of 2 x 100/s), map polled {} times, {} without both nodes",
            match clients {
                Clients::Meshed => "A and B on different nodes, meshed",
                Clients::OneNode => "A and B on node 0 only",
            },
            m.rollout,
            m.move_ms,
            m.moves,
            m.stall_ms,
            m.lost,
            m.map_samples,
            m.map_short
        );
        assert_eq!(
            m.map_short, 0,
            "{what}: the map lost a node during the rollout"
        );
        results.push((what, m));
    }
    println!(
        "MEASURED rollouts: {}; whole test {:?}",
        results
            .iter()
            .map(|(w, m)| format!(
                "{w}: move stall {} ms, longest gap {} ms, lost {}",
                m.move_ms, m.stall_ms, m.lost
            ))
            .collect::<Vec<_>>()
            .join("; "),
        t_all.elapsed()
    );
    rig.stop_operators();
}
