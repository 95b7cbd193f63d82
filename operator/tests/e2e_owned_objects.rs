//! e2e of the objects a region stops rendering and of a user-provided `tls.secretName`, on the
//! real control plane of `tests/cluster` with kwok nodes and cert-manager's real controllers:
//!
//! - the mesh turned off → its key Secret and peers ConfigMap are deleted;
//! - TLS `selfSigned` → `secretName` → the self-signed Secret is deleted;
//! - `issuerRef` → `secretName` → the Certificate and the Secret cert-manager issued for it are
//!   deleted; objects that carry our labels but are not owned by the region survive;
//! - the `tls.secretName` Secret is watched: created, replaced by a certificate that does not
//!   name the nodes, fixed, deleted: `CertificateReady` follows each within a second or two (the
//!   fallback recheck is 30 s).
//!
//! Prints what it measures (`--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step panics with its cause

mod common;

use std::time::{Duration, Instant};

use common::{Rig, RigOptions, condition, metric, wait_for, wait_within};

const NS: &str = "owned";
/// Bound for what a watch must deliver promptly (the recheck without a watch is 30 s).
const PROMPT: Duration = Duration::from_secs(10);

fn region(tls: &str, extra: &str) -> String {
    common::region_yaml(NS, "r", 920, "r", "owned", tls, extra)
}

fn exists(rig: &Rig, what: &str) -> bool {
    rig.json(&["-n", NS, "get", what]).is_some()
}

fn cert_ready(rig: &Rig) -> Option<(String, String)> {
    let r = rig.json(&["-n", NS, "get", "derpregion", "r"])?;
    condition(&r, "CertificateReady")
}

/// A `kubernetes.io/tls` Secret manifest with a fresh certificate naming `san` (openssl syntax).
fn user_tls_secret(rig: &Rig, name: &str, san: &str) -> String {
    let dir = rig
        .state
        .join(format!("user-cert-{}", san.replace([':', ','], "_")));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    rig.run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=user",
            "-addext",
            &format!("subjectAltName={san}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ],
    );
    rig.run(
        "kubectl",
        &[
            "-n",
            NS,
            "create",
            "secret",
            "tls",
            name,
            "--cert",
            crt.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    )
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one scenario on one rig: each step builds on the state the previous one left"
)]
fn stale_objects_are_deleted_and_provided_secret_is_watched() {
    let t_all = Instant::now();
    let mut rig = Rig::start(RigOptions {
        certmanager: true,
        ..Default::default()
    });
    rig.install_crd();
    rig.kubectl(&["create", "namespace", NS]);
    rig.create_nodes("owned-", 2, "127.0.3.1", "owned", false);
    let port = rig.start_leader("op-owned", Duration::from_secs(1));

    // Objects with our labels that the region does not own: never touched.
    rig.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: r-derper-mesh-peers-copy\n  namespace: {NS}\n  \
         labels: {{app.kubernetes.io/managed-by: derp-fleet, derpfleet.io/region: r, app.kubernetes.io/name: derper}}\n\
         data: {{peers: x}}\n"
    ));

    // --- self-signed with the mesh: every object exists
    rig.apply(&region("{selfSigned: {}}", ""));
    let (_, d) = wait_for("mesh Secret, peers ConfigMap, self-signed Secret", || {
        let all = [
            "secret/r-derper-mesh-key",
            "configmap/r-derper-mesh-peers",
            "secret/r-derper-tls",
            "ds/r-derper",
        ]
        .iter()
        .all(|o| exists(&rig, o));
        all.then_some(())
    });
    println!("region applied -> its objects exist: {d:?}");

    // --- mesh off: its Secret and ConfigMap go
    let t0 = Instant::now();
    rig.apply(&region("{selfSigned: {}}", "  mesh: {enabled: false}\n"));
    wait_for("mesh Secret and ConfigMap deleted", || {
        (!exists(&rig, "secret/r-derper-mesh-key")
            && !exists(&rig, "configmap/r-derper-mesh-peers"))
        .then_some(())
    });
    println!(
        "MEASURED mesh turned off -> mesh Secret and ConfigMap deleted: {:?}",
        t0.elapsed()
    );
    let ds = rig.json(&["-n", NS, "get", "ds", "r-derper"]).unwrap();
    let tmpl = ds.pointer("/spec/template/spec").unwrap().to_string();
    assert!(
        !tmpl.contains("mesh"),
        "DaemonSet still uses the mesh: {tmpl}"
    );
    assert!(
        exists(&rig, "secret/r-derper-tls"),
        "the self-signed Secret is still used"
    );

    // --- selfSigned -> secretName (not created yet): the self-signed Secret goes; the
    // condition says what is missing.
    let t0 = Instant::now();
    rig.apply(&region(
        "{secretName: user-tls}",
        "  mesh: {enabled: false}\n",
    ));
    wait_for("self-signed Secret deleted", || {
        (!exists(&rig, "secret/r-derper-tls")).then_some(())
    });
    println!(
        "MEASURED selfSigned -> secretName: self-signed Secret deleted: {:?}",
        t0.elapsed()
    );
    wait_for("CertificateReady=False SecretNotFound", || {
        (cert_ready(&rig)? == ("False".into(), "SecretNotFound".into())).then_some(())
    });

    // --- the provided Secret is watched. The operator's recheck of a waiting region is 30 s:
    // each step below must be seen well before that.
    let good = user_tls_secret(&rig, "user-tls", "IP:127.0.3.1,IP:127.0.3.2");
    let bad = user_tls_secret(&rig, "user-tls", "IP:127.0.3.1,DNS:elsewhere.example");
    let step = |what: &str, act: &dyn Fn(), want: (&str, &str)| {
        let t0 = Instant::now();
        act();
        let (_, d) = wait_within(what, PROMPT, || {
            (cert_ready(&rig)? == (want.0.to_string(), want.1.to_string())).then_some(())
        });
        println!(
            "MEASURED tls.secretName {what} -> CertificateReady={}/{}: {:?} (from before kubectl)",
            want.0,
            want.1,
            t0.elapsed()
        );
        d
    };
    step("created", &|| rig.apply(&good), ("True", "SecretFound"));
    step(
        "replaced by a cert without 127.0.3.2",
        &|| rig.apply(&bad),
        ("False", "SecretInvalid"),
    );
    let r = rig.json(&["-n", NS, "get", "derpregion", "r"]).unwrap();
    let msg = r.pointer("/status/conditions").unwrap().to_string();
    assert!(msg.contains("does not name 127.0.3.2"), "{msg}");
    step("fixed", &|| rig.apply(&good), ("True", "SecretFound"));
    step(
        "deleted",
        &|| {
            rig.kubectl(&["-n", NS, "delete", "secret", "user-tls"]);
        },
        ("False", "SecretNotFound"),
    );
    rig.apply(&good);

    // --- secretName -> issuerRef (a SelfSigned Issuer): the Certificate, issued by cert-manager
    rig.apply(&format!(
        "apiVersion: cert-manager.io/v1\nkind: Issuer\nmetadata: {{name: selfsigned, namespace: {NS}}}\nspec: {{selfSigned: {{}}}}\n"
    ));
    let t0 = Instant::now();
    rig.apply(&region(
        "{issuerRef: {name: selfsigned}}",
        "  mesh: {enabled: false}\n",
    ));
    wait_for("Certificate issued, CertificateReady=True", || {
        (cert_ready(&rig)? == ("True".into(), "Issued".into())).then_some(())
    });
    println!(
        "MEASURED secretName -> issuerRef: Certificate issued and CertificateReady: {:?}",
        t0.elapsed()
    );
    let cert = rig
        .json(&["-n", NS, "get", "certificate", "r-derper-tls"])
        .unwrap();
    assert_eq!(
        cert.pointer("/spec/ipAddresses").unwrap(),
        &serde_json::json!(["127.0.3.1", "127.0.3.2"])
    );
    let issued = rig
        .json(&["-n", NS, "get", "secret", "r-derper-tls"])
        .unwrap();
    assert!(
        issued
            .pointer("/metadata/annotations/cert-manager.io~1certificate-name")
            .is_some(),
        "the Secret is cert-manager's: {issued}"
    );

    // --- issuerRef -> secretName: the Certificate and the Secret issued for it go
    let t0 = Instant::now();
    rig.apply(&region(
        "{secretName: user-tls}",
        "  mesh: {enabled: false}\n",
    ));
    wait_for("Certificate and issued Secret deleted", || {
        (!exists(&rig, "certificate/r-derper-tls") && !exists(&rig, "secret/r-derper-tls"))
            .then_some(())
    });
    println!(
        "MEASURED issuerRef removed -> Certificate and its Secret deleted: {:?}",
        t0.elapsed()
    );
    wait_for("CertificateReady=True SecretFound", || {
        (cert_ready(&rig)? == ("True".into(), "SecretFound".into())).then_some(())
    });

    // Not ours: kept.
    assert!(exists(&rig, "configmap/r-derper-mesh-peers-copy"));
    assert!(exists(&rig, "secret/user-tls"));
    assert!(exists(&rig, "ds/r-derper"));
    let deletes = metric(port, "derpfleet_operator_deletes_total").unwrap();
    println!("operator delete requests: {deletes}");
    assert!(deletes >= 5, "{deletes}");
    rig.stop_operators();
    println!("owned-objects e2e done in {:?}", t_all.elapsed());
}
