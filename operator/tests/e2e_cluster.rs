//! End-to-end test of `operator run` on the real control plane of `tests/cluster` (etcd,
//! kube-apiserver, controller-manager, scheduler, kwok nodes): one scenario, in order, on a fresh
//! rig, printing what it measures (map-update delays, write counts, `kubectl get derpregions`).
//!
//! Uses a running rig when `DERP_FLEET_RIG_STATE` names its state dir (`tests/cluster/up
//! --state DIR`); otherwise builds (cached) and starts one and stops it at the end. Fails with
//! "rig not available" when the rig cannot be built or started; there is no fake API server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::time::{Duration, Instant};

use common::{Rig, RigOptions, Steps, condition, http_get, map, map_nodes, metric, wait_for};

const NS: &str = "derp";
/// NotReady grace given to the operator: short, so the test measures the pipeline on top of it.
const GRACE: Duration = Duration::from_secs(1);

fn region_yaml(name: &str, id: u32, code: &str, selector: &str, tls: &str, extra: &str) -> String {
    common::region_yaml(NS, name, id, code, selector, tls, extra)
}

/// `resourceVersion` of every object the operator writes in the namespace (and the map
/// ConfigMap), and `generation` of the DaemonSets (whose status the DaemonSet controller writes).
fn our_versions(rig: &Rig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for kind in ["secrets", "configmaps", "derpregions", "daemonsets"] {
        let list = rig.json(&["-n", NS, "get", kind]).unwrap();
        for item in list["items"].as_array().unwrap() {
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            if kind == "configmaps" && name == "kube-root-ca.crt" {
                continue;
            }
            let field = if kind == "daemonsets" {
                item["metadata"]["generation"].to_string()
            } else {
                item["metadata"]["resourceVersion"].to_string()
            };
            out.push((format!("{kind}/{name}"), field));
        }
    }
    let cm = rig
        .json(&["-n", "default", "get", "configmap", "derp-map"])
        .unwrap();
    out.push((
        "default/configmap/derp-map".into(),
        cm["metadata"]["resourceVersion"].to_string(),
    ));
    out.sort();
    out
}

/// One replica and a 3-node self-signed region: the owned objects, the status, the pinned map and
/// its ConfigMap. Returns the replica's index and port.
fn region_published(rig: &mut Rig) -> (usize, u16) {
    let (a, port_a) = rig.start_operator("op-a", GRACE);
    let (_, d) = wait_for("op-a ready (caches synced, first map built)", || {
        let ok = http_get(port_a, "/readyz")?.0 == 200
            && metric(port_a, "derpfleet_operator_leader")? == 1;
        ok.then_some(())
    });
    println!("operator start -> ready and leading: {d:?}");
    let home = region_yaml("home", 900, "home", "derp", "{selfSigned: {}}", "");
    let t0 = Instant::now();
    rig.apply(&home);
    let (nodes, _) = wait_for("map with 3 nodes", || {
        map_nodes(port_a, 900).filter(|n| n.len() == 3)
    });
    println!(
        "region applied -> map with 3 nodes: {:?} ({nodes:?})",
        t0.elapsed()
    );
    let (_, d) = wait_for("DaemonSet with 3 ready pods", || {
        let ds = rig.json(&["-n", NS, "get", "ds", "home-derper"])?;
        (ds.pointer("/status/numberReady")?.as_i64()? == 3).then_some(())
    });
    println!("region applied -> DaemonSet with 3 Ready pods: {d:?}");
    for (kind, name) in [
        ("secret", "home-derper-mesh-key"),
        ("secret", "home-derper-tls"),
        ("configmap", "home-derper-mesh-peers"),
    ] {
        assert!(
            rig.json(&["-n", NS, "get", kind, name]).is_some(),
            "{kind}/{name} missing"
        );
    }
    let peers = rig
        .json(&["-n", NS, "get", "configmap", "home-derper-mesh-peers"])
        .unwrap();
    let peers = peers["data"]["peers"].as_str().unwrap().to_string();
    for ip in ["127.0.1.1:8443", "127.0.1.2:8443", "127.0.1.3:8443"] {
        assert!(peers.contains(ip), "mesh peers lack {ip}: {peers}");
    }
    let ds = rig.json(&["-n", NS, "get", "ds", "home-derper"]).unwrap();
    let args = ds
        .pointer("/spec/template/spec/containers/0/args")
        .unwrap()
        .to_string();
    assert!(
        !args.contains("mesh-ca-file"),
        "self-signed region must not pass --mesh-ca-file: {args}"
    );
    assert!(args.contains("--mesh-with-file"), "{args}");
    wait_for("status Ready=True, 3/3", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "home"])?;
        let ok = condition(&r, "Ready")? == ("True".into(), "Published".into())
            && r.pointer("/status/nodesReady")?.as_str()? == "3/3"
            && r.pointer("/status/observedGeneration") == r.pointer("/metadata/generation");
        ok.then_some(())
    });
    let (body, _) = map(port_a).unwrap();
    assert!(
        body.contains("sha256-raw:"),
        "self-signed region is pinned: {body}"
    );
    // The leader writes the ConfigMap at most every 5 s (a cold start changes the map many times
    // a second), so it follows the served map within a few seconds.
    let (cm, _) = wait_for("the derp-map ConfigMap holds the served map", || {
        let cm = rig.json(&["-n", "default", "get", "configmap", "derp-map"])?;
        (cm["data"]["derpmap.json"].as_str() == Some(body.as_str())).then_some(cm)
    });
    assert!(
        cm["data"]["derp.yaml"]
            .as_str()
            .unwrap()
            .contains("regionid: 900")
    );
    (a, port_a)
}

/// A pod turns NotReady: its node leaves the map after the grace, and comes back when Ready.
fn readiness_moves_the_map(rig: &Rig, port_a: u16) {
    let pods = rig
        .json(&["-n", NS, "get", "pods", "-l", "derpfleet.io/region=home"])
        .unwrap();
    let pod = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["spec"]["nodeName"] == "e2e-derp-1")
        .expect("pod on e2e-derp-1");
    let pod_name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    rig.run("rigctl", &["pod-ready", NS, &pod_name, "false"]);
    wait_for("e2e-derp-1 to leave the map", || {
        map_nodes(port_a, 900).filter(|n| !n.contains(&"900-e2e-derp-1".to_string()))
    });
    // From before `rigctl pod-ready` (a Go process start) to the map without the node.
    let delay = t0.elapsed();
    let seen = k8s_openapi::jiff::Timestamp::now();
    let pod_now = rig.json(&["-n", NS, "get", "pod", &pod_name]).unwrap();
    let since: k8s_openapi::jiff::Timestamp = pod_now["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    let grace_end = since
        .checked_add(k8s_openapi::jiff::SignedDuration::try_from(GRACE).unwrap())
        .unwrap();
    println!(
        "MEASURED map updated {} ms after the NotReady grace ended (pipeline: watch event, \
         grace timer, rebuild, publish, HTTP poll every 20 ms)",
        seen.as_millisecond() - grace_end.as_millisecond()
    );
    println!(
        "MEASURED pod NotReady -> node out of the map: {delay:?} (grace {GRACE:?}; the pod's \
         transition time has whole seconds, so the grace ends up to 1 s early)"
    );
    assert!(
        delay < GRACE + Duration::from_millis(1500),
        "took {delay:?}"
    );
    wait_for("status 2/3", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "home"])?;
        (r.pointer("/status/nodesReady")?.as_str()? == "2/3").then_some(())
    });
    let t0 = Instant::now();
    rig.run("rigctl", &["pod-ready", NS, &pod_name, "true"]);
    wait_for("e2e-derp-1 back in the map", || {
        map_nodes(port_a, 900).filter(|n| n.len() == 3)
    });
    println!(
        "MEASURED pod Ready -> node back in the map: {:?}",
        t0.elapsed()
    );
}

/// A node is deleted: gone from the map and from the mesh peers.
fn node_deleted(rig: &Rig, port_a: u16) {
    let t0 = Instant::now();
    rig.run("rigctl", &["delete-node", "e2e-derp-2", "--force-pods"]);
    wait_for("e2e-derp-2 to leave the map", || {
        map_nodes(port_a, 900).filter(|n| n == &["900-e2e-derp-0", "900-e2e-derp-1"])
    });
    println!(
        "MEASURED node deleted -> out of the map: {:?}",
        t0.elapsed()
    );
    wait_for("mesh peers without the deleted node", || {
        let cm = rig.json(&["-n", NS, "get", "configmap", "home-derper-mesh-peers"])?;
        (!cm["data"]["peers"].as_str()?.contains("127.0.1.3")).then_some(())
    });
}

/// The spec changes: the DaemonSet template follows.
fn spec_change_reaches_the_daemonset(rig: &Rig) {
    let changed = region_yaml(
        "home",
        900,
        "home",
        "derp",
        "{selfSigned: {}}",
        "  extraArgs: [\"--max-connections=5000\"]\n",
    );
    let t0 = Instant::now();
    rig.apply(&changed);
    wait_for("DaemonSet template with the new argument", || {
        let ds = rig.json(&["-n", NS, "get", "ds", "home-derper"])?;
        ds.pointer("/spec/template/spec/containers/0/args")?
            .to_string()
            .contains("--max-connections=5000")
            .then_some(())
    });
    println!(
        "spec change -> DaemonSet template changed: {:?}",
        t0.elapsed()
    );
}

/// A second region with the same id, and a third with the same code: Conflict, left out.
fn conflicts_left_out(rig: &Rig, port_a: u16) {
    rig.apply(&region_yaml(
        "dup",
        900,
        "dup",
        "nowhere",
        "{selfSigned: {}}",
        "",
    ));
    wait_for(
        "dup: Conflict=True RegionIDTaken, Ready=False Conflict",
        || {
            let r = rig.json(&["-n", NS, "get", "derpregion", "dup"])?;
            let ok = condition(&r, "Conflict")? == ("True".into(), "RegionIDTaken".into())
                && condition(&r, "Ready")? == ("False".into(), "Conflict".into());
            ok.then_some(())
        },
    );
    rig.apply(&region_yaml(
        "dupcode",
        902,
        "home",
        "nowhere",
        "{selfSigned: {}}",
        "",
    ));
    wait_for("dupcode: Conflict=True RegionCodeTaken", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "dupcode"])?;
        (condition(&r, "Conflict")? == ("True".into(), "RegionCodeTaken".into())).then_some(())
    });
    let (_, v) = map(port_a).unwrap();
    assert_eq!(v["Regions"]["900"]["RegionCode"], "home");
}

/// cert-manager is not installed: a clear condition and Event, not a crash loop.
fn cert_manager_missing(rig: &Rig) {
    rig.apply(&region_yaml(
        "acme",
        901,
        "acme",
        "derp",
        "{issuerRef: {name: letsencrypt, kind: ClusterIssuer}}",
        "",
    ));
    wait_for("acme: CertificateReady=False CertManagerMissing", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "acme"])?;
        (condition(&r, "CertificateReady")? == ("False".into(), "CertManagerMissing".into()))
            .then_some(())
    });
    wait_for("CertManagerMissing Event", || {
        let ev = rig.json(&["-n", NS, "get", "events.events.k8s.io"])?;
        ev["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "CertManagerMissing")
            .then_some(())
    });
    println!(
        "kubectl get derpregions:\n{}",
        rig.kubectl(&["-n", NS, "get", "derpregions"])
    );
}

/// The replica is stopped and started again: it writes nothing (counters and resourceVersions).
/// Returns the restarted replica's port.
fn restart_without_churn(rig: &mut Rig, a: usize, port_a: u16) -> u16 {
    // The snapshot is taken once the first replica is quiet and stopped: a status or map write
    // still in flight when the snapshot was taken (pods turning Ready a moment late on a fast
    // machine) would otherwise be blamed on the restarted replica.
    wait_for("objects quiet for 3 s before the restart", || {
        let first = our_versions(rig);
        std::thread::sleep(Duration::from_secs(3));
        (our_versions(rig) == first).then_some(())
    });
    let writes_before = metric(port_a, "derpfleet_operator_apply_requests_total");
    assert!(
        rig.stop_operator(a).success(),
        "operator exited with an error on SIGTERM"
    );
    let before = our_versions(rig);
    println!("operator op-a before restart: apply requests {writes_before:?}");
    let (_, port_a2) = rig.start_operator("op-a", GRACE);
    wait_for(
        "restarted replica: leader, map served, a reconcile done",
        || {
            let ok = metric(port_a2, "derpfleet_operator_leader")? == 1
                && metric(port_a2, "derpfleet_operator_reconciles_total")? >= 3
                && map_nodes(port_a2, 900)?.len() == 2;
            ok.then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let counter = |name: &str| metric(port_a2, name).unwrap();
    let reconciles = counter("derpfleet_operator_reconciles_total");
    let requests = counter("derpfleet_operator_apply_requests_total");
    let writes = counter("derpfleet_operator_writes_total");
    let events = counter("derpfleet_operator_events_total");
    let skipped = counter("derpfleet_operator_apply_skipped_total");
    let deletes = counter("derpfleet_operator_deletes_total");
    let after = our_versions(rig);
    println!(
        "MEASURED restart: {reconciles} reconciles, {requests} write requests, {writes} writes, \
         {events} events, {skipped} applies skipped as unchanged; resourceVersions of {} objects \
         unchanged: {}",
        before.len(),
        before == after
    );
    let changed: Vec<_> = before
        .iter()
        .filter(|entry| !after.contains(entry))
        .map(|(object, _)| object.as_str())
        .collect();
    assert_eq!((requests, writes, events, deletes), (0, 0, 0, 0));
    assert!(
        changed.is_empty(),
        "objects changed across a restart: {changed:?}"
    );
    port_a2
}

/// A second replica: one leader, both serve the same bytes and ETag, the standby reconciles nothing.
fn two_replicas_serve_one_map(rig: &mut Rig, port_a2: u16) {
    let (_, port_b) = rig.start_operator("op-b", GRACE);
    wait_for("op-b serving the map", || map(port_b));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(metric(port_a2, "derpfleet_operator_leader"), Some(1));
    assert_eq!(metric(port_b, "derpfleet_operator_leader"), Some(0));
    let (_, head_a, body_a) = http_get(port_a2, "/derpmap.json").unwrap();
    let (_, head_b, body_b) = http_get(port_b, "/derpmap.json").unwrap();
    assert_eq!(body_a, body_b, "replicas serve different maps");
    let etag = |h: &str| {
        h.lines()
            .find(|l| l.to_ascii_lowercase().starts_with("etag:"))
            .map(str::to_string)
    };
    assert_eq!(etag(&head_a), etag(&head_b));
    assert_eq!(
        metric(port_b, "derpfleet_operator_reconciles_total"),
        Some(0)
    );
    println!(
        "two replicas: op-a leads, op-b follows; same map bytes ({} B) and ETag",
        body_a.len()
    );
}

/// The region is deleted: everything it owned is garbage-collected, and the losers of its
/// conflicts are free of them.
fn region_deleted(rig: &Rig, port: u16) {
    let t0 = Instant::now();
    rig.kubectl(&["-n", NS, "delete", "derpregion", "home", "--wait=false"]);
    wait_for("home's objects to be garbage-collected", || {
        let gone = [
            "ds/home-derper",
            "secret/home-derper-mesh-key",
            "secret/home-derper-tls",
            "configmap/home-derper-mesh-peers",
        ]
        .iter()
        .all(|o| rig.json(&["-n", NS, "get", o]).is_none());
        gone.then_some(())
    });
    println!("region deleted -> owned objects gone: {:?}", t0.elapsed());
    // The loser of the id conflict now holds it (it has no node, so it is still not published).
    wait_for(
        "dup and dupcode: Conflict=False, Ready=False NoNodeSelected",
        || {
            let ok = ["dup", "dupcode"].iter().all(|name| {
                rig.json(&["-n", NS, "get", "derpregion", name])
                    .and_then(|r| Some((condition(&r, "Conflict")?, condition(&r, "Ready")?)))
                    .is_some_and(|(c, r)| {
                        c.0 == "False" && r == ("False".into(), "NoNodeSelected".into())
                    })
            });
            ok.then_some(())
        },
    );
    wait_for("map without region 900", || {
        let (_, v) = map(port)?;
        v["Regions"].get("900").is_none().then_some(())
    });
}

/// One scenario on one rig, in the order a user lives it. Steps that need an earlier step's
/// result are not run when it failed; the others run whatever failed before them.
#[test]
fn operator_on_real_control_plane() {
    let mut steps = Steps::new("operator e2e").only_from_env("DERP_FLEET_E2E_STEP");
    let mut rig = Rig::start(RigOptions::default());
    rig.install_crd();
    rig.kubectl(&["create", "namespace", NS]);
    rig.create_nodes("e2e-derp-", 3, "127.0.1.1", "derp", false);

    let Some((a, port_a)) = steps.required("region published", || region_published(&mut rig))
    else {
        return steps.finish(Some("region published"));
    };
    steps.run("readiness moves the map", || {
        readiness_moves_the_map(&rig, port_a);
    });
    steps.run("node deleted", || node_deleted(&rig, port_a));
    steps.run("spec change reaches the DaemonSet", || {
        spec_change_reaches_the_daemonset(&rig);
    });
    steps.run("conflicts left out", || conflicts_left_out(&rig, port_a));
    steps.run("cert-manager missing", || cert_manager_missing(&rig));
    let restarted = steps.required("restart without churn", || {
        restart_without_churn(&mut rig, a, port_a)
    });
    let Some(port_a2) = restarted else {
        rig.stop_operators();
        return steps.finish(Some("restart without churn"));
    };
    steps.run("two replicas serve one map", || {
        two_replicas_serve_one_map(&mut rig, port_a2);
    });
    steps.run("region deleted", || region_deleted(&rig, port_a2));
    rig.stop_operators();
    steps.finish(None);
}
