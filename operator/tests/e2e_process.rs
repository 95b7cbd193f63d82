//! True end to end on the real control plane of `tests/cluster`: process-backed pods run our
//! built derper on 127.x addresses, cert-manager's real controllers issue the certificate, and
//! Tailscale's own code (`derpprobe`, and `derprelay`, a pair of `derphttp` clients) uses only
//! the operator's `/derpmap.json`.
//!
//! Two regions on the same two process nodes (different ports), both `bindToNodeIP`:
//! - `cm` (910): hostname template `{node}.derp.test`, `tls.issuerRef` to a CA `Issuer`
//!   (itself bootstrapped by a SelfSigned issuer), trusted by the clients via `SSL_CERT_FILE`;
//!   the mesh verifies peers with the CA (the operator passes `--mesh-ca-file` for the issued Secret's `ca.crt`).
//! - `ip` (911): self-signed, pinned in the map (`CertName: sha256-raw:...`).
//!
//! Checked: the Certificate's names, the issued Secret mounted and served, `CertificateReady`,
//! the derpers Ready through their `/readyz` probe, the map listing them, derpprobe's TLS/STUN
//! probes on all four nodes and its node-pair (mesh) probe on the DNS region (on the IP region it
//! fails by design: Tailscale's probe needs a DNS HostName, spec §13), a client pair relaying
//! across the mesh in each region (A on node 0, B on node 1), then a forced cert-manager renewal
//! reaching the running derpers without a restart (same PID, `derper_cert_reloads_total` and the
//! served leaf), and the map bytes unchanged by it.
//!
//! Needs the derper binary (`cargo build -p derper`, done by `cargo test --workspace`) and the
//! Tailscale tools (`tests/interop/build`, cached). Prints what it measures (`--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    RegionYaml, Rig, RigOptions, Steps, condition, http_get_at, map, map_nodes, metric_text,
    pem_pin, secret_data, served_pin, wait_for, wait_within,
};
use serde_json::{Value, json};

const NS: &str = "e2e";

/// The derper pods of `region`: (node name, pod name, restart count).
fn pods(rig: &Rig, region: &str) -> Vec<(String, String, i64)> {
    let list = rig
        .json(&[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            &format!("derpfleet.io/region={region}"),
        ])
        .unwrap();
    let mut out: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p.pointer("/status/containerStatuses/0/restartCount")
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    out
}

fn pod_pid(rig: &Rig, pod: &str) -> Option<String> {
    let f = rig
        .state
        .join("process-kubelet/pids")
        .join(format!("pod-{NS}_{pod}_derper.pid"));
    Some(std::fs::read_to_string(f).ok()?.trim().to_string())
}

fn reloads_ok(ip: &str, metrics_port: u16) -> Option<u64> {
    let (_, _, body) = http_get_at(ip, metrics_port, "/metrics")?;
    Some(metric_text(&body, "derper_cert_reloads_total{reason=\"ok\"}").unwrap_or(0))
}

/// The map with only region `id` and only its node `name`.
fn single_node_map(full: &Value, id: u32, name: &str) -> String {
    let mut region = full["Regions"][id.to_string()].clone();
    let nodes: Vec<Value> = region["Nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["Name"] == name)
        .cloned()
        .collect();
    assert_eq!(nodes.len(), 1, "node {name} in region {id}");
    region["Nodes"] = json!(nodes);
    json!({"Regions": {id.to_string(): region}}).to_string()
}

/// Runs a Tailscale tool under `timeout`; returns (exit ok, combined output).
fn tool(rig: &Rig, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut full = vec!["-k", "5", "180", bin.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = rig.try_run("timeout", &full, None, env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// derprelay A on `a`, B on `b` (single-node maps), small plan: returns its summary line.
fn relay(
    rig: &Rig,
    bin: &Path,
    full: &Value,
    id: u32,
    (a, b): (&str, &str),
    env: &[(&str, &str)],
) -> String {
    let work = rig.state.join("e2e-process");
    let fa = work.join(format!("map-{id}-a.json"));
    let fb = work.join(format!("map-{id}-b.json"));
    std::fs::write(&fa, single_node_map(full, id, a)).unwrap();
    std::fs::write(&fb, single_node_map(full, id, b)).unwrap();
    let t0 = Instant::now();
    let (ok, out) = tool(
        rig,
        &bin.join("derprelay"),
        &[
            "-map",
            fa.to_str().unwrap(),
            "-b-map",
            fb.to_str().unwrap(),
            "-warmup",
            "30s",
            "-per-class",
            "20",
            "-random",
            "100",
            "-small",
            "1000",
        ],
        env,
    );
    println!(
        "derprelay region {id}: A on {a}, B on {b} ({:?}):\n{}",
        t0.elapsed(),
        indent(&out)
    );
    assert!(ok, "derprelay across the mesh of region {id} failed");
    let summary = out.lines().last().unwrap_or_default().to_string();
    assert!(summary.ends_with(", 0 failed"), "{summary}");
    summary
}

/// What every step needs: the rig, its two process nodes, the CA, and the operator's map port.
struct Env {
    rig: Rig,
    ts: PathBuf,
    work: PathBuf,
    ips: [String; 2],
    ca_pem: String,
    port: u16,
}

/// The rig with cert-manager and two process nodes on a 127.x range of our own (the derpers really
/// bind these addresses), a CA issuer, and a leading operator.
fn setup() -> Env {
    let derper = common::derper_bin();
    let ts = common::tailscale_bin();
    let mut rig = Rig::start(RigOptions {
        certmanager: true,
        process_kubelet: true,
        image_bins: vec![("ghcr.io/derp-fleet/derper".into(), derper)],
    });
    let work = rig.state.join("e2e-process");
    std::fs::create_dir_all(&work).unwrap();
    rig.install_crd();
    rig.kubectl(&["create", "namespace", NS]);
    let net = common::loopback_net();
    let ips = [format!("{net}.1"), format!("{net}.2")];
    rig.create_nodes("proc-", 2, &ips[0], "proc", true);

    // A CA issuer: SelfSigned bootstraps the CA certificate, the CA Issuer signs the derpers'.
    rig.apply(&format!(
        "apiVersion: cert-manager.io/v1\nkind: Issuer\nmetadata: {{name: bootstrap, namespace: {NS}}}\nspec: {{selfSigned: {{}}}}\n---\n\
         apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {{name: derp-ca, namespace: {NS}}}\n\
         spec: {{isCA: true, commonName: derp-fleet-e2e-ca, secretName: derp-ca, privateKey: {{algorithm: ECDSA, size: 256}}, \
         issuerRef: {{name: bootstrap, kind: Issuer}}}}\n---\n\
         apiVersion: cert-manager.io/v1\nkind: Issuer\nmetadata: {{name: derp-ca, namespace: {NS}}}\nspec: {{ca: {{secretName: derp-ca}}}}\n"
    ));
    let (_, d) = wait_for("CA Issuer Ready", || {
        let i = rig.json(&["-n", NS, "get", "issuer", "derp-ca"])?;
        (condition(&i, "Ready")?.0 == "True").then_some(())
    });
    println!("CA issuer ready: {d:?}");
    let ca_secret = rig.json(&["-n", NS, "get", "secret", "derp-ca"]).unwrap();
    let ca_pem = secret_data(&ca_secret, "tls.crt").unwrap();
    let port = rig.start_leader("op-proc", Duration::from_secs(1));
    Env {
        rig,
        ts,
        work,
        ips,
        ca_pem,
        port,
    }
}

/// Region `cm` (CA-issued, DNS names) and region `ip` (self-signed) on both nodes: the
/// Certificate's names and issuer, and the issued Secret. Returns the issued leaf's pin and the
/// time the regions were applied.
fn certificate_issued(env: &Env) -> (String, Instant) {
    let rig = &env.rig;
    let cm = RegionYaml {
        ns: NS,
        name: "cm",
        id: 910,
        code: "cm",
        selector: "proc",
        tls: "{issuerRef: {name: derp-ca, kind: Issuer}}",
        ports: (8443, 3478, 9731),
        extra: "  hostnameTemplate: \"{node}.derp.test\"\n",
    };
    let ip = RegionYaml {
        name: "ip",
        id: 911,
        code: "ip",
        tls: "{selfSigned: {}}",
        ports: (8444, 3479, 9732),
        extra: "",
        ..cm
    };
    let t0 = Instant::now();
    rig.apply(&cm.yaml());
    rig.apply(&ip.yaml());
    let (cert, d) = wait_for("Certificate cm-derper-tls", || {
        rig.json(&["-n", NS, "get", "certificate", "cm-derper-tls"])
    });
    println!("regions applied -> Certificate created: {d:?}");
    assert_eq!(
        cert.pointer("/spec/dnsNames").unwrap(),
        &json!(["proc-0.derp.test", "proc-1.derp.test"])
    );
    assert_eq!(cert.pointer("/spec/issuerRef/name").unwrap(), "derp-ca");
    let (issued, d) = wait_for("issued Secret cm-derper-tls", || {
        let s = rig.json(&["-n", NS, "get", "secret", "cm-derper-tls"])?;
        secret_data(&s, "tls.crt").map(|_| s)
    });
    println!(
        "regions applied -> cert-manager issued the Secret: {:?} (+{d:?})",
        t0.elapsed()
    );
    (pem_pin(&secret_data(&issued, "tls.crt").unwrap()), t0)
}

/// The pods run and turn Ready through `/readyz`, the map lists all four derpers (verified DNS
/// names in `cm`, pins in `ip`), and each derper serves the certificate the map promises.
/// Returns the map and the `cm` pods.
fn derpers_ready_and_mapped(
    env: &mut Env,
    pin1: &str,
    t0: Instant,
) -> (Value, Vec<(String, String, i64)>) {
    let port = env.port;
    for (node, pod, _) in pods(&env.rig, "cm").into_iter().chain(pods(&env.rig, "ip")) {
        println!("pod {pod} on {node}");
        let log = env.rig.pod_log(NS, &pod, "derper");
        env.rig.add_log(log);
    }
    let (_, d) = wait_for("both regions with 2 nodes in the map", || {
        let ok = map_nodes(port, 910)?.len() == 2 && map_nodes(port, 911)?.len() == 2;
        ok.then_some(())
    });
    println!(
        "MEASURED regions applied -> 4 process derpers Ready and in the map: {:?} (+{d:?} after the Secret)",
        t0.elapsed()
    );
    let rig = &env.rig;
    let cm_pods = pods(rig, "cm");
    let ip_pods = pods(rig, "ip");
    assert_eq!(cm_pods.len(), 2);
    assert_eq!(ip_pods.len(), 2);
    for (_, pod, _) in cm_pods.iter().chain(&ip_pods) {
        let p = rig.json(&["-n", NS, "get", "pod", pod]).unwrap();
        let probe = p
            .pointer("/spec/containers/0/readinessProbe/httpGet/path")
            .unwrap();
        assert_eq!(probe, "/readyz");
        // Publication delay: the pod's Ready transition (whole seconds) to the map we saw.
        let since: k8s_openapi::jiff::Timestamp = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready" && c["status"] == "True")
            .and_then(|c| c["lastTransitionTime"].as_str())
            .unwrap()
            .parse()
            .unwrap();
        println!(
            "  pod {pod}: Ready at {since}, pid {}",
            pod_pid(rig, pod).unwrap_or_default()
        );
    }
    wait_for("cm: CertificateReady=True Issued, Ready=True", || {
        let r = rig.json(&["-n", NS, "get", "derpregion", "cm"])?;
        let ok = condition(&r, "CertificateReady")? == ("True".into(), "Issued".into())
            && condition(&r, "Ready")?.0 == "True";
        ok.then_some(())
    });
    let (body, full) = map(port).unwrap();
    println!(
        "map served by the operator ({} B):\n{}",
        body.len(),
        indent(&serde_json::to_string_pretty(&full).unwrap())
    );
    let n0 = &full["Regions"]["910"]["Nodes"][0];
    assert_eq!(n0["HostName"], "proc-0.derp.test");
    assert_eq!(n0["IPv4"], env.ips[0].as_str());
    assert!(
        n0.get("CertName").is_none(),
        "a CA-issued region is verified, not pinned: {n0}"
    );
    let m0 = &full["Regions"]["911"]["Nodes"][0];
    assert_eq!(m0["HostName"], env.ips[0].as_str());
    assert!(m0["CertName"].as_str().unwrap().starts_with("sha256-raw:"));
    for (i, a) in env.ips.iter().enumerate() {
        let sni = format!("proc-{i}.derp.test");
        let served = wait_for("the derper serving the issued cert", || {
            served_pin(&format!("{a}:8443"), &sni)
        })
        .0;
        assert_eq!(served, pin1, "{a} serves another certificate");
        let ip_served = served_pin(&format!("{a}:8444"), a).unwrap();
        assert_eq!(
            Some(ip_served.as_str()),
            full["Regions"]["911"]["Nodes"][i]["CertName"].as_str()
        );
    }
    (full, cm_pods)
}

/// Tailscale's derpprobe, given only the operator's map URL: TLS and STUN probes good on every
/// node, node-pair (mesh) probes good on the DNS region.
fn derpprobe_on_the_map(env: &Env) {
    let rig = &env.rig;
    let ip_secret = rig
        .json(&["-n", NS, "get", "secret", "ip-derper-tls"])
        .unwrap();
    let trust = env.work.join("trust.pem");
    std::fs::write(
        &trust,
        format!(
            "{}\n{}",
            env.ca_pem,
            secret_data(&ip_secret, "tls.crt").unwrap()
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{}/derpmap.json", env.port);
    // derpprobe's TLS probe dials HostName through DNS (tailscaled's derphttp dials IPv4): give
    // it an /etc/hosts naming the nodes, bind-mounted in a private mount namespace of its own.
    let hosts = env.work.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "{}\n{} proc-0.derp.test\n{} proc-1.derp.test\n",
            std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
            env.ips[0],
            env.ips[1]
        ),
    )
    .unwrap();
    let probe = env.ts.join("derpprobe");
    let wrapped = [
        "--mount",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts || exit 99; exec \"$@\"",
        hosts.to_str().unwrap(),
        probe.to_str().unwrap(),
        "-once",
        "-spread=false",
        "-derp-map",
        &url,
    ];
    let t0 = Instant::now();
    let ssl_env = [("SSL_CERT_FILE", trust.to_str().unwrap())];
    let (_, mut out) = tool(rig, &PathBuf::from("unshare"), &wrapped, &ssl_env);
    let resolved = out.contains("derpmap-probe"); // else the mount failed: derpprobe never ran
    if !resolved {
        println!(
            "no private mount namespace here ({}); derpprobe without the hosts file",
            out.trim()
        );
        out = tool(
            rig,
            &probe,
            &["-once", "-spread=false", "-derp-map", &url],
            &ssl_env,
        )
        .1;
    }
    println!(
        "derpprobe -once -spread=false -derp-map {url} ({:?}):\n{}",
        t0.elapsed(),
        indent(&out)
    );
    let good = |p: &str| out.lines().any(|l| l.contains(" good: ") && l.contains(p));
    let mut want = Vec::new();
    for (i, (a, b)) in [("910-proc-0", "910-proc-1"), ("911-proc-0", "911-proc-1")]
        .iter()
        .enumerate()
    {
        for n in [a, b] {
            if resolved || i == 1 {
                want.push(format!("/{n}/tls:"));
            }
            want.push(format!("/{n}/udp:"));
        }
        if i == 0 {
            for (x, y) in [(a, a), (a, b), (b, a), (b, b)] {
                want.push(format!("/{x}/{y}/mesh:"));
            }
        }
    }
    let missing: Vec<&String> = want.iter().filter(|p| !good(p)).collect();
    assert!(missing.is_empty(), "derpprobe probes not good: {missing:?}");
    let bad: Vec<&str> = out.lines().filter(|l| l.contains(" bad: ")).collect();
    for l in &bad {
        let ip_node_pair =
            l.contains("/911-") && l.contains("/mesh: TLS server name \"\" != derp hostname");
        let unresolved = !resolved && l.contains("/910-") && l.contains("no such host");
        assert!(ip_node_pair || unresolved, "unexpected bad probe: {l}");
    }
    println!(
        "derpprobe: {} good ({} expected), {} bad (all node-pair probes of the IP-hostname region, \
         which Tailscale's prober cannot run against an IP HostName, spec §13)",
        out.lines().filter(|l| l.contains(" good: ")).count(),
        want.len(),
        bad.len()
    );
}

/// derprelay in region 910 (CA-issued), the clients trusting the CA: returns its summary.
fn relay_910(env: &Env, full: &Value) -> String {
    let ca_file = env.work.join("ca.pem");
    std::fs::write(&ca_file, &env.ca_pem).unwrap();
    let ca_env = [("SSL_CERT_FILE", ca_file.to_str().unwrap())];
    let pair = ("910-proc-0", "910-proc-1");
    relay(&env.rig, &env.ts, full, 910, pair, &ca_env)
}

/// A derphttp client pair in each region, A on node 0 and B on node 1: packets cross the mesh.
fn relay_across_the_mesh(env: &Env, full: &Value) {
    let s910 = relay_910(env, full);
    let pair = ("911-proc-0", "911-proc-1");
    let s911 = relay(&env.rig, &env.ts, full, 911, pair, &[]);
    println!(
        "derprelay through the mesh: region 910 (CA, verified): {s910}; region 911 (pinned): {s911}"
    );
}

/// A forced renewal (what `cmctl renew` does: the Issuing condition): the new Secret reaches the
/// running derpers (which poll their files every 10 s) without a restart, and the map bytes stay;
/// then a client trusting the CA relays through the renewed derpers.
fn renewal_without_restart(env: &Env, full: &Value, cm_pods: &[(String, String, i64)], pin1: &str) {
    let (rig, ips, port) = (&env.rig, &env.ips, env.port);
    let before: Vec<_> = cm_pods
        .iter()
        .map(|(_, p, _)| pod_pid(rig, p).unwrap())
        .collect();
    let reloads_before: Vec<u64> = ips.iter().map(|a| reloads_ok(a, 9731).unwrap()).collect();
    let (map_before, _) = map(port).unwrap();
    let revision_before = rig
        .json(&["-n", NS, "get", "certificate", "cm-derper-tls"])
        .and_then(|c| c.pointer("/status/revision").and_then(Value::as_i64));
    println!("before the renewal: Certificate revision {revision_before:?}");
    let now =
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
            .unwrap();
    let patch = json!([{"op": "add", "path": "/status/conditions/-", "value": {
        "type": "Issuing", "status": "True", "reason": "ManuallyTriggered",
        "message": "renewal forced by the e2e test", "lastTransitionTime": now.to_string()}}]);
    let t0 = Instant::now();
    rig.kubectl(&[
        "-n",
        NS,
        "patch",
        "certificate",
        "cm-derper-tls",
        "--subresource=status",
        "--type=json",
        "-p",
        &patch.to_string(),
    ]);
    let secret_pin = || {
        let s = rig.json(&["-n", NS, "get", "secret", "cm-derper-tls"])?;
        Some(pem_pin(&secret_data(&s, "tls.crt")?))
    };
    let (first_renewed, d_secret) =
        wait_for("renewed Secret", || secret_pin().filter(|p| p != pin1));
    println!("MEASURED renewal forced -> cert-manager wrote the new Secret: {d_secret:?}");
    // cert-manager may write the Secret more than once for one renewal (seen under load: a
    // second revision a moment after the first); the derpers, polling every 10 s, may skip
    // one. What must hold is that each serves what the Secret holds now, a renewed certificate.
    let mut renewed = vec![first_renewed];
    let mut served_at = Vec::new();
    for (i, a) in ips.iter().enumerate() {
        let sni = format!("proc-{i}.derp.test");
        wait_within(
            "the running derper serving the renewed cert the Secret holds",
            Duration::from_secs(60),
            || {
                let now = secret_pin()?;
                if !renewed.contains(&now) {
                    renewed.push(now.clone());
                }
                (now != pin1 && served_pin(&format!("{a}:8443"), &sni)? == now).then_some(())
            },
        );
        served_at.push(t0.elapsed());
    }
    let revision = rig
        .json(&["-n", NS, "get", "certificate", "cm-derper-tls"])
        .and_then(|c| c.pointer("/status/revision").and_then(Value::as_i64));
    println!(
        "renewal: the Secret held {} renewed certificate(s) in turn; Certificate revision now {revision:?}",
        renewed.len()
    );
    println!(
        "MEASURED renewal forced -> both derpers serve the new certificate: {served_at:?} \
         (after the Secret: {:?}; the derper polls its files every 10 s)",
        served_at
            .iter()
            .map(|t| t.saturating_sub(d_secret))
            .collect::<Vec<_>>()
    );
    for (i, a) in ips.iter().enumerate() {
        let r = reloads_ok(a, 9731).unwrap();
        assert!(
            r > reloads_before[i],
            "{a}: derper_cert_reloads_total{{reason=\"ok\"}} {} -> {r}",
            reloads_before[i]
        );
        println!(
            "  {a}: derper_cert_reloads_total{{reason=\"ok\"}} {} -> {r}",
            reloads_before[i]
        );
    }
    let after: Vec<_> = cm_pods
        .iter()
        .map(|(_, p, _)| pod_pid(rig, p).unwrap())
        .collect();
    assert_eq!(before, after, "the derpers were restarted");
    for (_, pod, restarts) in pods(rig, "cm") {
        assert_eq!(restarts, 0, "{pod} restarted");
        let log = std::fs::read_to_string(rig.pod_log(NS, &pod, "derper")).unwrap();
        assert!(
            log.contains("certificate changed on disk"),
            "{pod} log lacks the reload"
        );
    }
    let (map_after, _) = map(port).unwrap();
    assert_eq!(
        map_before, map_after,
        "a renewal of a verified certificate changed the map"
    );
    println!("renewal: same PIDs {after:?}, restartCount 0, map bytes unchanged");
    // A client trusting the CA connects to the renewed derpers and relays.
    println!("derprelay after the renewal: {}", relay_910(env, full));
}

/// One rig, steps in order; a step that needs an earlier one's result is not run when it failed,
/// the others run whatever failed before them.
#[test]
fn derpers_in_process_pods_with_cert_manager_and_tailscale_clients() {
    let mut steps = Steps::new("process e2e").only_from_env("DERP_FLEET_E2E_STEP");
    let mut env = setup();
    let Some((pin1, t0)) = steps.required("certificate issued", || certificate_issued(&env)) else {
        return steps.finish(Some("certificate issued"));
    };
    let published = steps.required("derpers ready and mapped", || {
        derpers_ready_and_mapped(&mut env, &pin1, t0)
    });
    let Some((full, cm_pods)) = published else {
        env.rig.stop_operators();
        return steps.finish(Some("derpers ready and mapped"));
    };
    steps.run("derpprobe on the map", || derpprobe_on_the_map(&env));
    steps.run("relay across the mesh", || {
        relay_across_the_mesh(&env, &full)
    });
    steps.run("renewal without restart", || {
        renewal_without_restart(&env, &full, &cm_pods, &pin1);
    });
    env.rig.stop_operators();
    steps.finish(None);
}
