//! The map under a slow poller (issue 12 item 3), on the real control plane of `tests/cluster`:
//! Headscale reads the map every `update_frequency` (hours by default) and keeps whatever it read,
//! so the map must not drop a region for a blink, and must never hand out a map without our
//! regions while DerpRegions exist. One operator with the default 10-minute not-ready grace:
//! - every derper of a region NotReady, then a derper pod deleted and replaced by the DaemonSet
//!   controller: the served bytes never change;
//! - every node of the region deleted (a deleted Node leaves the map at once): the last build has
//!   no region, so the last good map (with the last node) stays served; `/readyz` says "held", `derpfleet_map_held` is 1, the region gets a
//!   `ServingLastGoodMap` Event and the `derp-map` ConfigMap keeps the good map;
//! - the nodes come back: the map has the region again, `MapRecovered`;
//! - a `RegionPerNode` DerpRegion: one-node regions with the ids `status.nodeRegions` records;
//! - the operator restarted while every derper of a region is NotReady: the new replica serves
//!   the region from its first map on (nodes seeded from the `derp-map` ConfigMap).
//!
//! Uses a running rig when `DERP_FLEET_RIG_STATE` names its state dir; otherwise builds (cached)
//! and starts one. Fails with "rig not available" when the rig cannot be built or started.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::time::{Duration, Instant};

use common::{Rig, RigOptions, http_get, map, map_nodes, metric, wait_for};

const NS: &str = "slow";
/// The operator's default.
const GRACE: Duration = Duration::from_secs(600);

/// Polls the served map every 50 ms for `d` and fails on any change of its bytes.
fn map_stays(port: u16, want: &str, d: Duration, what: &str) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let (body, _) = map(port).expect("map served");
        assert_eq!(body, want, "the map changed during {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn events(rig: &Rig, reason: &str) -> usize {
    let list = rig
        .json(&[
            "-n",
            NS,
            "get",
            "events",
            "--field-selector",
            &format!("reason={reason}"),
        ])
        .unwrap();
    list["items"].as_array().map_or(0, Vec::len)
}

fn pod_names(rig: &Rig) -> Vec<String> {
    let pods = rig
        .json(&["-n", NS, "get", "pods", "-l", "derpfleet.io/region=slow"])
        .unwrap();
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one scenario on one rig: each step builds on the state the previous one left"
)]
fn map_keeps_regions_through_blinks_and_never_goes_empty() {
    let mut rig = Rig::start(RigOptions::default());
    rig.install_crd();
    rig.kubectl(&["create", "namespace", NS]);
    rig.create_nodes("slow-derp-", 3, "127.0.3.1", "slow", false);
    let port = rig.start_leader("op-slow", GRACE);
    rig.apply(&common::region_yaml(
        NS,
        "slow",
        910,
        "slow",
        "slow",
        "{selfSigned: {mode: InsecureForTests}}",
        "",
    ));
    wait_for("map with 3 nodes", || {
        map_nodes(port, 910).filter(|n| n.len() == 3)
    });
    wait_for("DaemonSet with 3 ready pods", || {
        let ds = rig.json(&["-n", NS, "get", "ds", "slow-derper"])?;
        (ds.pointer("/status/numberReady")?.as_i64()? == 3).then_some(())
    });
    let (good, _) = map(port).unwrap();

    // --- every derper NotReady: the region stays, status says why
    let pods = pod_names(&rig);
    for p in &pods {
        rig.run("rigctl", &["pod-ready", NS, p, "false"]);
    }
    map_stays(
        port,
        &good,
        Duration::from_secs(3),
        "a region-wide NotReady",
    );
    wait_for("status names the grace", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "slow"])?;
        r.pointer("/status/message")?
            .as_str()?
            .contains("not-ready grace")
            .then_some(())
    });
    for p in &pods {
        rig.run("rigctl", &["pod-ready", NS, p, "true"]);
    }

    // --- a derper pod deleted: the DaemonSet controller replaces it, the map never changes
    let t0 = Instant::now();
    rig.kubectl(&["-n", NS, "delete", "pod", &pods[0], "--wait=false"]);
    wait_for("a replacement pod Ready", || {
        let (body, _) = map(port)?;
        assert_eq!(body, good, "the map changed while a pod was replaced");
        let ds = rig.json(&["-n", NS, "get", "ds", "slow-derper"])?;
        let names = pod_names(&rig);
        (!names.contains(&pods[0]) && ds.pointer("/status/numberReady")?.as_i64()? == 3)
            .then_some(())
    });
    println!(
        "MEASURED pod deleted -> replaced and Ready, map unchanged throughout: {:?}",
        t0.elapsed()
    );

    // --- every node deleted: a deleted Node leaves at once, so the map shrinks to the last
    // node; then the build is empty and that last good map stays served
    for i in 0..2 {
        rig.run(
            "rigctl",
            &["delete-node", &format!("slow-derp-{i}"), "--force-pods"],
        );
    }
    wait_for("map with only slow-derp-2", || {
        map_nodes(port, 910).filter(|n| n == &["910-slow-derp-2"])
    });
    let (good, _) = map(port).unwrap();
    let withheld0 = metric(port, "derpfleet_map_withheld_builds_total").unwrap_or(0);
    rig.run("rigctl", &["delete-node", "slow-derp-2", "--force-pods"]);
    let (readyz, d) = wait_for("/readyz to report the held map", || {
        let (code, _, body) = http_get(port, "/readyz")?;
        (code == 200 && body.contains("held")).then_some(body)
    });
    println!(
        "MEASURED nodes deleted -> map held: {d:?} ({})",
        readyz.trim()
    );
    assert!(readyz.contains("slow/slow"), "{readyz}");
    map_stays(port, &good, Duration::from_secs(2), "the empty build");
    assert_eq!(metric(port, "derpfleet_map_held"), Some(1));
    assert!(metric(port, "derpfleet_map_withheld_builds_total").unwrap_or(0) > withheld0);
    wait_for("a ServingLastGoodMap Event", || {
        (events(&rig, "ServingLastGoodMap") > 0).then_some(())
    });
    // The ConfigMap (written at most every 5 s) keeps a map with the region, never an empty one.
    let cm = rig
        .json(&["-n", "default", "get", "configmap", "derp-map"])
        .unwrap();
    let cm_map = cm["data"]["derpmap.json"].as_str().unwrap_or_default();
    assert!(cm_map.contains("\"910\""), "{cm_map}");

    // --- the nodes come back: a fresh map with the region, no longer held
    rig.create_nodes("slow-derp-", 3, "127.0.3.1", "slow", false);
    wait_for("map with 3 nodes again, not held", || {
        let ok = map_nodes(port, 910)?.len() == 3 && metric(port, "derpfleet_map_held")? == 0;
        ok.then_some(())
    });
    assert_eq!(http_get(port, "/readyz").unwrap().2, "ok\n");
    wait_for("a MapRecovered Event", || {
        (events(&rig, "MapRecovered") > 0).then_some(())
    });

    // --- one region per node: three one-node regions, ids recorded in status, no mesh objects
    rig.apply(
        &common::RegionYaml {
            ns: NS,
            name: "pn",
            id: 920,
            code: "pn",
            selector: "slow",
            tls: "{selfSigned: {mode: InsecureForTests}}",
            ports: (8444, 3479, 9732),
            extra: "  publish: {mode: RegionPerNode, maxRegions: 4}\n",
        }
        .yaml(),
    );
    let (_, d) = wait_for("regions 920-922 with one node each", || {
        let (_, v) = map(port)?;
        let ok = (920..923).all(|id| {
            v["Regions"][id.to_string()]["Nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 1)
        });
        ok.then_some(())
    });
    println!("MEASURED RegionPerNode region applied -> 3 one-node regions: {d:?}");
    let (regions, _) = wait_for("status.nodeRegions with 3 entries", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "pn"])?;
        let nr = r.pointer("/status/nodeRegions")?.as_array()?.clone();
        (nr.len() == 3).then_some(nr)
    });
    let (_, v) = map(port).unwrap();
    for nr in &regions {
        let id = nr["regionId"].as_i64().unwrap();
        let node = nr["nodeName"].as_str().unwrap();
        let region = &v["Regions"][id.to_string()];
        assert_eq!(region["RegionCode"], nr["code"], "{region}");
        assert_eq!(
            region["Nodes"][0]["Name"],
            format!("{id}-{node}"),
            "{region}"
        );
    }
    assert!(
        rig.json(&["-n", NS, "get", "secret", "pn-derper-mesh-key"])
            .is_none()
    );

    // --- the operator restarted while every derper of a region is NotReady: the new replica's
    // first map still has the region (its nodes seeded from the derp-map ConfigMap)
    let (served, _) = map(port).unwrap();
    wait_for("the ConfigMap holds the served map", || {
        let cm = rig.json(&["-n", "default", "get", "configmap", "derp-map"])?;
        (cm["data"]["derpmap.json"].as_str()? == served).then_some(())
    });
    for p in pod_names(&rig) {
        rig.run("rigctl", &["pod-ready", NS, &p, "false"]);
    }
    std::thread::sleep(Duration::from_millis(500));
    rig.stop_operators();
    let port2 = rig.start_leader("op-slow-2", GRACE);
    let (body2, _) = map(port2).unwrap();
    assert_eq!(
        body2, served,
        "the restarted replica's map differs from the one before"
    );
    println!("MEASURED restart with a region NotReady: the new replica's first map is the old one");

    // --- a map change held back by the 5 s write interval, then the leader stopped: it writes
    // the change before it lets the Lease go (else the ConfigMap keeps the older map, at a cold
    // start one with no region, which stops a Headscale reading it through derp.paths)
    let cm_map = |rig: &Rig| {
        let cm = rig.json(&["-n", "default", "get", "configmap", "derp-map"])?;
        Some(cm["data"]["derpmap.json"].as_str()?.to_string())
    };
    rig.run("rigctl", &["delete-node", "slow-derp-0", "--force-pods"]);
    wait_for("the ConfigMap written without slow-derp-0", || {
        let (served, _) = map(port2)?;
        (!served.contains("slow-derp-0") && cm_map(&rig)? == served).then_some(())
    });
    let written = Instant::now();
    rig.run("rigctl", &["delete-node", "slow-derp-1", "--force-pods"]);
    let (served, _) = wait_for("the map without slow-derp-1", || {
        let (served, _) = map(port2)?;
        (!served.contains("slow-derp-1")).then_some(served)
    });
    assert_ne!(
        cm_map(&rig).unwrap(),
        served,
        "the ConfigMap has the change already: more than the 5 s interval passed?"
    );
    rig.stop_operators();
    let held_back = written.elapsed();
    assert!(
        held_back < Duration::from_secs(5),
        "{held_back:?} between the write and the stop: longer than the interval, so this does not \
         test the write at shutdown"
    );
    assert_eq!(
        cm_map(&rig).unwrap(),
        served,
        "the ConfigMap lacks the last map after the leader stopped"
    );
    println!(
        "MEASURED a change {held_back:?} after a ConfigMap write, leader stopped: written on the way out"
    );
}
