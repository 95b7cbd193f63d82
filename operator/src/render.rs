//! Pure rendering of everything a `DerpRegion` owns: the derper DaemonSet, the cert-manager
//! `Certificate` or the self-signed TLS Secret, the mesh key Secret and the mesh peers ConfigMap.
//! Input is the region, the cluster's Nodes and the Secrets that already exist (so keys and
//! certificates are kept across reconciles); output is the objects the controller applies with
//! server-side apply and `operator render` prints. No API calls, no clock or randomness of its own.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, Node, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};
use rand::RngCore;
use serde_json::json;

use crate::crd::{DerpRegion, IssuerKind, NODE_PLACEHOLDER, PORT_DISABLED, PortsSpec};
use crate::select::{NodePlan, plan_nodes};
use crate::tls::{self, Sans};

/// Label values and keys shared by everything we create.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_REGION: &str = "derpfleet.io/region";
pub const APP_NAME: &str = "derper";
pub const MANAGER_NAME: &str = "derp-fleet";

/// Where the derper finds its files inside the pod.
pub const TLS_DIR: &str = "/etc/derp/tls";
pub const MESH_KEY_DIR: &str = "/etc/derp/mesh";
pub const MESH_KEY_FILE: &str = "mesh.key";
pub const MESH_PEERS_DIR: &str = "/etc/derp/mesh-peers";
pub const MESH_PEERS_FILE: &str = "peers";
pub const STATE_DIR: &str = "/var/lib/derper";
pub const DERPER_BIN: &str = "/usr/local/bin/derper";

/// uid/gid of the derper when no port below 1024 is bound (the distroless `nonroot` user).
pub const NONROOT_UID: i64 = 65532;

/// Every 5 s, 2 misses: a dead derper leaves the map about 10 s later at worst (plus the map's
/// NotReady grace); faster probing costs the node little but adds kubelet status churn.
const READINESS_PERIOD_SECS: i32 = 5;
const READINESS_FAILURES: i32 = 2;
/// Liveness is slower than readiness: a stuck derper is restarted after 30 s, never because of a
/// short stall under load.
const LIVENESS_PERIOD_SECS: i32 = 10;
const LIVENESS_FAILURES: i32 = 3;
const PROBE_TIMEOUT_SECS: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("DerpRegion has no {0}")]
    MissingMeta(&'static str),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What rendering needs besides the region itself.
pub struct RenderContext<'a> {
    /// All Nodes of the cluster (the region's selection is applied here).
    pub nodes: &'a [Node],
    /// The region's mesh key Secret as it exists, to keep its key.
    pub existing_mesh_key: Option<&'a Secret>,
    /// The region's self-signed TLS Secret as it exists, to keep its certificate.
    pub existing_tls: Option<&'a Secret>,
    /// Unix time (s) for certificate validity.
    pub now_unix: i64,
}

/// The objects a region owns, in apply order.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub mesh_key_secret: Option<Secret>,
    pub mesh_peers: Option<ConfigMap>,
    pub tls_secret: Option<Secret>,
    pub certificate: Option<DynamicObject>,
    pub daemonset: DaemonSet,
}

impl Rendered {
    /// All objects as JSON values, in apply order (what `operator render` prints).
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = Vec::new();
        if let Some(s) = &self.mesh_key_secret {
            out.push(serde_json::to_value(s)?);
        }
        if let Some(c) = &self.mesh_peers {
            out.push(serde_json::to_value(c)?);
        }
        if let Some(s) = &self.tls_secret {
            out.push(serde_json::to_value(s)?);
        }
        if let Some(c) = &self.certificate {
            out.push(serde_json::to_value(c)?);
        }
        out.push(serde_json::to_value(&self.daemonset)?);
        Ok(out)
    }
}

pub fn daemonset_name(region: &str) -> String {
    format!("{region}-derper")
}
pub fn mesh_key_secret_name(region: &str) -> String {
    format!("{region}-derper-mesh-key")
}
pub fn mesh_peers_configmap_name(region: &str) -> String {
    format!("{region}-derper-mesh-peers")
}
/// Name of the cert-manager `Certificate` and of the Secret it (or we, when self-signed) write.
pub fn certificate_name(region: &str) -> String {
    format!("{region}-derper-tls")
}

/// The Secret the derpers mount as their certificate.
pub fn tls_secret_name(region: &DerpRegion) -> String {
    match &region.spec.tls.secret_name {
        Some(s) => s.clone(),
        None => certificate_name(&region.name_any()),
    }
}

/// The image the derpers run.
pub fn image(region: &DerpRegion) -> String {
    region
        .spec
        .image
        .clone()
        .unwrap_or_else(|| format!("ghcr.io/derp-fleet/derper:{}", crate::VERSION))
}

/// `app.kubernetes.io/name=derper`, `app.kubernetes.io/managed-by=derp-fleet`,
/// `derpfleet.io/region=<name>`.
pub fn common_labels(region: &str) -> BTreeMap<String, String> {
    [
        (LABEL_NAME, APP_NAME),
        (LABEL_MANAGED_BY, MANAGER_NAME),
        (LABEL_REGION, region),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Labels that select the region's pods (immutable in a DaemonSet, so never extended).
pub fn selector_labels(region: &str) -> BTreeMap<String, String> {
    [(LABEL_NAME, APP_NAME), (LABEL_REGION, region)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn meta(region: &DerpRegion, name: String) -> Result<ObjectMeta, RenderError> {
    let rname = region
        .metadata
        .name
        .clone()
        .ok_or(RenderError::MissingMeta("name"))?;
    let ns = region
        .metadata
        .namespace
        .clone()
        .ok_or(RenderError::MissingMeta("namespace"))?;
    // Without a uid (a file given to `operator render`) there is nothing to own us.
    let owner: Option<OwnerReference> = region.controller_owner_ref(&());
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(ns),
        labels: Some(common_labels(&rname)),
        owner_references: owner.map(|o| vec![o]),
        ..Default::default()
    })
}

/// Renders every object of `region`. `rng` makes a new mesh key when none exists yet.
pub fn render(
    region: &DerpRegion,
    ctx: &RenderContext<'_>,
    rng: &mut dyn RngCore,
) -> Result<Rendered, RenderError> {
    let plans = plan_nodes(&region.spec, ctx.nodes);
    let mesh = region.spec.meshed();
    let tls_mode = &region.spec.tls;

    let mesh_key_secret = if mesh {
        Some(render_mesh_key(region, ctx.existing_mesh_key, rng)?)
    } else {
        None
    };
    let mesh_peers = if mesh {
        Some(render_mesh_peers(region, &plans)?)
    } else {
        None
    };
    let tls_secret = if tls_mode.self_signed.is_some() {
        render_self_signed(region, &plans, ctx.existing_tls, ctx.now_unix)?
    } else {
        None
    };
    let certificate = if tls_mode.issuer_ref.is_some() {
        render_certificate(region, &plans)?
    } else {
        None
    };
    Ok(Rendered {
        mesh_key_secret,
        mesh_peers,
        tls_secret,
        certificate,
        daemonset: render_daemonset(region)?,
    })
}

/// Whether `s` is a valid mesh key: 64 hex digits after trimming (what the derper accepts).
fn valid_mesh_key(s: &str) -> bool {
    let s = s.trim();
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The mesh key Secret, keeping the existing key when it is valid.
pub fn render_mesh_key(
    region: &DerpRegion,
    existing: Option<&Secret>,
    rng: &mut dyn RngCore,
) -> Result<Secret, RenderError> {
    let kept = existing
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(MESH_KEY_FILE))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .filter(|k| valid_mesh_key(k))
        .map(|k| k.trim().to_string());
    let key = match kept {
        Some(k) => k,
        None => {
            let mut raw = [0u8; 32];
            rng.fill_bytes(&mut raw);
            hex::encode(raw)
        }
    };
    Ok(Secret {
        metadata: meta(region, mesh_key_secret_name(&region.name_any()))?,
        type_: Some("Opaque".into()),
        data: Some([(MESH_KEY_FILE.to_string(), ByteString(key.into_bytes()))].into()),
        ..Default::default()
    })
}

/// One mesh peer as the derper dials it: `host:port`, plus `/dialhost` when the in-cluster
/// address differs from the published name (TLS still verifies `host`).
pub fn mesh_peer_line(plan: &NodePlan, derp_port: i32) -> String {
    let host = match plan.host_name.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{}]:{derp_port}", plan.host_name),
        _ => format!("{}:{derp_port}", plan.host_name),
    };
    match plan.dial {
        Some(d) if d.to_string() != plan.host_name => format!("{host}/{d}"),
        _ => host,
    }
}

/// The mesh peers ConfigMap: every selected node, the derper's own included (it recognises and
/// skips itself), so one file serves every pod of the DaemonSet.
pub fn render_mesh_peers(
    region: &DerpRegion,
    plans: &[NodePlan],
) -> Result<ConfigMap, RenderError> {
    let mut body = format!(
        "# Mesh peers of DerpRegion {}/{}, kept current by derp-fleet.\n\
         # One host[:port][/dialhost] per line.\n",
        region.namespace().unwrap_or_default(),
        region.name_any()
    );
    for p in plans.iter().filter(|p| p.has_address()) {
        body.push_str(&mesh_peer_line(p, region.spec.ports.derp_port));
        body.push('\n');
    }
    Ok(ConfigMap {
        metadata: meta(region, mesh_peers_configmap_name(&region.name_any()))?,
        data: Some([(MESH_PEERS_FILE.to_string(), body)].into()),
        ..Default::default()
    })
}

/// The names a self-signed certificate must hold: each node's DNS name (template mode) and every
/// IP the node is known by (the mesh dials internal addresses).
pub fn self_signed_sans(region: &DerpRegion, plans: &[NodePlan]) -> Sans {
    let mut sans = Sans::default();
    for p in plans {
        if region.spec.hostname_template.is_some() {
            sans.dns.push(p.host_name.clone());
        }
        sans.ips.extend(p.all_ips.iter().copied());
    }
    sans.dns.sort();
    sans.dns.dedup();
    sans.ips.sort();
    sans.ips.dedup();
    sans
}

/// The self-signed `kubernetes.io/tls` Secret: the existing certificate while it covers every
/// node, else a new one. `None` when there is neither a node nor an existing certificate.
pub fn render_self_signed(
    region: &DerpRegion,
    plans: &[NodePlan],
    existing: Option<&Secret>,
    now_unix: i64,
) -> Result<Option<Secret>, RenderError> {
    let sans = self_signed_sans(region, plans);
    let data = existing.and_then(|s| s.data.as_ref());
    let old_cert = data.and_then(|d| d.get("tls.crt"));
    let old_key = data.and_then(|d| d.get("tls.key"));
    let (cert, key) = match (old_cert, old_key) {
        (Some(c), Some(k)) if tls::covers(&c.0, &sans, now_unix) => (c.0.clone(), k.0.clone()),
        _ if sans.dns.is_empty() && sans.ips.is_empty() => return Ok(None),
        _ => {
            let ck = tls::generate(&sans, &region.name_any(), now_unix)?;
            (ck.cert_pem.into_bytes(), ck.key_pem.into_bytes())
        }
    };
    Ok(Some(Secret {
        metadata: meta(region, certificate_name(&region.name_any()))?,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(cert)),
                ("tls.key".to_string(), ByteString(key)),
            ]
            .into(),
        ),
        ..Default::default()
    }))
}

/// The cert-manager `Certificate` (`cert-manager.io/v1`): DNS names from the template, or the
/// nodes' published IPs. `None` while no node is selected (cert-manager refuses a certificate
/// without names).
pub fn render_certificate(
    region: &DerpRegion,
    plans: &[NodePlan],
) -> Result<Option<DynamicObject>, RenderError> {
    let Some(issuer) = &region.spec.tls.issuer_ref else {
        return Ok(None);
    };
    let mut dns: Vec<String> = Vec::new();
    let mut ips: Vec<String> = Vec::new();
    for p in plans {
        if region.spec.hostname_template.is_some() {
            dns.push(p.host_name.clone());
        } else {
            ips.extend(p.ipv4.map(|i| i.to_string()));
            ips.extend(p.ipv6.map(|i| i.to_string()));
        }
    }
    dns.sort();
    dns.dedup();
    ips.sort();
    ips.dedup();
    if dns.is_empty() && ips.is_empty() {
        return Ok(None);
    }
    let name = certificate_name(&region.name_any());
    let mut spec = json!({
        "secretName": name,
        "issuerRef": {
            "name": issuer.name,
            "kind": match issuer.kind { IssuerKind::Issuer => "Issuer", IssuerKind::ClusterIssuer => "ClusterIssuer" },
            "group": issuer.group,
        },
        // ECDSA P-256 like our self-signed certificates; a new key on every renewal.
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "usages": ["server auth", "digital signature"],
        // Labels on the issued Secret let the operator's Secret watch map it back to the region.
        "secretTemplate": {"labels": common_labels(&region.name_any())},
    });
    if !dns.is_empty() {
        spec["dnsNames"] = json!(dns);
    }
    if !ips.is_empty() {
        spec["ipAddresses"] = json!(ips);
    }
    let ar = ApiResource {
        group: "cert-manager.io".into(),
        version: "v1".into(),
        api_version: "cert-manager.io/v1".into(),
        kind: "Certificate".into(),
        plural: "certificates".into(),
    };
    let mut obj = DynamicObject::new(&name, &ar).data(json!({ "spec": spec }));
    obj.metadata = meta(region, name)?;
    Ok(Some(obj))
}

/// The derper's command-line arguments (after the binary), as the DaemonSet passes them.
/// `$(HOST_IP)` and `$(NODE_NAME)` are expanded by the kubelet from the downward-API env.
pub fn derper_args(region: &DerpRegion) -> Vec<String> {
    let spec = &region.spec;
    let ports = &spec.ports;
    let bind_host = if spec.bind_to_node_ip {
        "$(HOST_IP)"
    } else {
        ""
    };
    let hostname = match &spec.hostname_template {
        Some(t) => t.replace(NODE_PLACEHOLDER, "$(NODE_NAME)"),
        None => "$(HOST_IP)".to_string(),
    };
    let mut args = vec![
        format!("-a={bind_host}:{}", ports.derp_port),
        format!("-hostname={hostname}"),
        "-certmode=manual".to_string(),
        "--reuse-port=true".to_string(),
        format!("-certdir={TLS_DIR}"),
        format!("-c={STATE_DIR}/derper.key"),
    ];
    if ports.stun_port == PORT_DISABLED {
        args.push("-stun=false".into());
    } else {
        args.push(format!("-stun-port={}", ports.stun_port));
    }
    args.push(format!("-http-port={}", ports.http_port));
    args.push(format!("--metrics-addr={bind_host}:{}", ports.metrics_port));
    if let Some(url) = &spec.verify_client_url {
        args.push(format!("-verify-client-url={url}"));
        args.push(format!(
            "-verify-client-url-fail-open={}",
            spec.verify_client_url_fail_open
        ));
    }
    if spec.meshed() {
        args.push(format!("-mesh-psk-file={MESH_KEY_DIR}/{MESH_KEY_FILE}"));
        args.push(format!(
            "--mesh-with-file={MESH_PEERS_DIR}/{MESH_PEERS_FILE}"
        ));
        // No --mesh-ca-file for self-signed regions: every derper of the region mounts the
        // same Secret, and a derper whose certificate is self-signed pins it for its mesh peers
        // on its own. A CA path would not even work: the leaf is no CA, and path validation of
        // an IP-SAN leaf against itself fails.
        // cert-manager writes the issuing CA as ca.crt for CA and SelfSigned issuers, so a
        // private-CA region meshes without extra arguments; for public CAs (ACME) the file is
        // absent and the derper uses the system roots, which already trust the peers.
        if spec.tls.issuer_ref.is_some() {
            args.push(format!("--mesh-ca-file={TLS_DIR}/ca.crt"));
        }
    }
    args.extend(spec.extra_args.iter().cloned());
    args
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(PROBE_TIMEOUT_SECS),
        ..Default::default()
    }
}

/// The derper DaemonSet.
pub fn render_daemonset(region: &DerpRegion) -> Result<DaemonSet, RenderError> {
    let rname = region.name_any();
    let spec = &region.spec;
    let (volumes, mounts) = volumes_and_mounts(region);
    let container = Container {
        name: "derper".into(),
        image: Some(image(region)),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![DERPER_BIN.into()]),
        args: Some(derper_args(region)),
        env: Some(vec![
            env_from_field("HOST_IP", "status.hostIP"),
            env_from_field("NODE_NAME", "spec.nodeName"),
        ]),
        // No `ports`: on the host network the API server makes every declared port a hostPort,
        // and the scheduler would never place the surge pod beside the old one.
        ports: None,
        readiness_probe: Some(http_probe(
            "/readyz",
            spec.ports.metrics_port,
            READINESS_PERIOD_SECS,
            READINESS_FAILURES,
        )),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(5),
            ..http_probe(
                "/healthz",
                spec.ports.metrics_port,
                LIVENESS_PERIOD_SECS,
                LIVENESS_FAILURES,
            )
        }),
        resources: spec.resources.clone(),
        security_context: Some(container_security(&spec.ports)),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let pod = PodSpec {
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        // The derper never calls the API server.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        affinity: spec.affinity.clone(),
        security_context: Some(PodSecurityContext {
            fs_group: Some(NONROOT_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    };
    Ok(DaemonSet {
        metadata: meta(region, daemonset_name(&rname))?,
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(&rname)),
                ..Default::default()
            },
            // Surge: the new derper starts beside the old one on the same ports (--reuse-port),
            // and the old one, deleted once the new one is Ready, hands its clients over.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(common_labels(&rname)),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        ..Default::default()
    })
}

/// A non-root process cannot bind below 1024: Kubernetes sets no ambient capabilities, and
/// `allowPrivilegeEscalation: false` (no_new_privs) ignores file capabilities. So with a low
/// port the derper runs as uid 0 holding only NET_BIND_SERVICE; otherwise as an unprivileged
/// user with no capability at all.
fn container_security(ports: &PortsSpec) -> SecurityContext {
    let low_port = ports.bound().iter().any(|p| *p < 1024);
    let (uid, caps_add) = if low_port {
        (0, Some(vec!["NET_BIND_SERVICE".to_string()]))
    } else {
        (NONROOT_UID, None)
    };
    SecurityContext {
        run_as_non_root: Some(!low_port),
        run_as_user: Some(uid),
        run_as_group: Some(if low_port { 0 } else { NONROOT_UID }),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: caps_add,
        }),
        ..Default::default()
    }
}

/// The pod's volumes and the derper's mounts of them: state and /tmp (the root filesystem is
/// read-only), the TLS Secret, and for a meshed region the mesh key and peers.
fn volumes_and_mounts(region: &DerpRegion) -> (Vec<Volume>, Vec<VolumeMount>) {
    let rname = region.name_any();
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let secret = |name: &str, secret_name: String| Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut mounts = vec![
        mount("state", STATE_DIR, false),
        mount("tmp", "/tmp", false),
        // Whole-directory mounts (never subPath) so the kubelet's Secret updates reach the
        // derper, which reloads its certificate when the files change.
        mount("tls", TLS_DIR, true),
    ];
    let mut volumes = vec![
        empty_dir("state"),
        empty_dir("tmp"),
        secret("tls", tls_secret_name(region)),
    ];
    if region.spec.meshed() {
        mounts.push(mount("mesh-key", MESH_KEY_DIR, true));
        mounts.push(mount("mesh-peers", MESH_PEERS_DIR, true));
        volumes.push(secret("mesh-key", mesh_key_secret_name(&rname)));
        volumes.push(Volume {
            name: "mesh-peers".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: mesh_peers_configmap_name(&rname),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    (volumes, mounts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{node, region};
    use rand::SeedableRng;

    fn ctx(nodes: &[Node]) -> RenderContext<'_> {
        RenderContext {
            nodes,
            existing_mesh_key: None,
            existing_tls: None,
            now_unix: 1_790_000_000,
        }
    }

    #[test]
    fn mesh_key_is_kept_across_reconciles() {
        let r = region("home", 900);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let first = render_mesh_key(&r, None, &mut rng).unwrap();
        let key = first.data.as_ref().unwrap()[MESH_KEY_FILE].clone();
        assert_eq!(key.0.len(), 64);
        let again = render_mesh_key(&r, Some(&first), &mut rng).unwrap();
        assert_eq!(again.data.as_ref().unwrap()[MESH_KEY_FILE], key);
        // An invalid key is replaced.
        let mut bad = first.clone();
        bad.data = Some([(MESH_KEY_FILE.to_string(), ByteString(b"short".to_vec()))].into());
        let fixed = render_mesh_key(&r, Some(&bad), &mut rng).unwrap();
        assert_ne!(fixed.data.as_ref().unwrap()[MESH_KEY_FILE], key);
        assert_eq!(fixed.data.as_ref().unwrap()[MESH_KEY_FILE].0.len(), 64);
    }

    #[test]
    fn region_per_node_renders_no_mesh_objects_or_flags() {
        let mut r = region("home", 900);
        r.spec.publish.mode = crate::crd::PublishMode::RegionPerNode;
        let nodes = vec![node("a", &[("InternalIP", "10.0.0.1")])];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let out = render(&r, &ctx(&nodes), &mut rng).unwrap();
        assert!(out.mesh_key_secret.is_none() && out.mesh_peers.is_none());
        let ds = serde_json::to_string(&out.daemonset).unwrap();
        assert!(!ds.contains("mesh"), "{ds}");
    }

    #[test]
    fn self_signed_cert_is_kept_until_a_node_needs_a_new_name() {
        let mut r = region("home", 900);
        r.spec.tls.self_signed = Some(Default::default());
        let nodes = vec![node("a", &[("InternalIP", "10.0.0.1")])];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let first = render(&r, &ctx(&nodes), &mut rng)
            .unwrap()
            .tls_secret
            .unwrap();
        assert_eq!(first.type_.as_deref(), Some("kubernetes.io/tls"));
        let mut c = ctx(&nodes);
        c.existing_tls = Some(&first);
        let kept = render(&r, &c, &mut rng).unwrap().tls_secret.unwrap();
        assert_eq!(kept.data, first.data);

        let more = vec![nodes[0].clone(), node("b", &[("InternalIP", "10.0.0.2")])];
        let mut c = ctx(&more);
        c.existing_tls = Some(&first);
        let renewed = render(&r, &c, &mut rng).unwrap().tls_secret.unwrap();
        assert_ne!(renewed.data, first.data);
        let pem = &renewed.data.as_ref().unwrap()["tls.crt"].0;
        let sans = self_signed_sans(&r, &plan_nodes(&r.spec, &more));
        assert!(tls::covers(pem, &sans, c.now_unix));
    }

    #[test]
    fn low_ports_need_root_with_only_net_bind_service() {
        let mut r = region("home", 900);
        let ds = render_daemonset(&r).unwrap();
        let sc = ds.spec.template.spec.unwrap().containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.run_as_non_root, Some(false));
        assert_eq!(
            sc.capabilities.unwrap().add,
            Some(vec!["NET_BIND_SERVICE".into()])
        );

        r.spec.ports.derp_port = 8443;
        r.spec.ports.http_port = PORT_DISABLED;
        let ds = render_daemonset(&r).unwrap();
        let sc = ds.spec.template.spec.unwrap().containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(NONROOT_UID));
        assert_eq!(sc.capabilities.unwrap().add, None);
    }

    #[test]
    fn self_signed_mesh_trusts_the_shared_certificate_without_a_ca_file() {
        let r = region("home", 900);
        let args = derper_args(&r);
        assert!(args.iter().any(|a| a.starts_with("--mesh-with-file=")));
        assert!(args.iter().any(|a| a.starts_with("-mesh-psk-file=")));
        assert!(!args.iter().any(|a| a.contains("mesh-ca-file")), "{args:?}");
    }

    #[test]
    fn cert_manager_regions_trust_the_issuing_ca_for_mesh() {
        let mut r = region("home", 900);
        r.spec.tls = crate::crd::TlsSpec {
            issuer_ref: Some(crate::crd::IssuerRef {
                name: "ca".into(),
                kind: crate::crd::IssuerKind::Issuer,
                group: "cert-manager.io".into(),
            }),
            secret_name: None,
            self_signed: None,
        };
        let args = derper_args(&r);
        assert!(
            args.contains(&format!("--mesh-ca-file={TLS_DIR}/ca.crt")),
            "{args:?}"
        );
    }

    #[test]
    fn mesh_peer_lines() {
        let r = region("home", 900);
        let n = node(
            "a",
            &[("InternalIP", "10.0.0.1"), ("ExternalIP", "198.51.100.1")],
        );
        let p = crate::select::plan_node(&r.spec, &n);
        assert_eq!(mesh_peer_line(&p, 443), "198.51.100.1:443/10.0.0.1");
        let n6 = node("b", &[("InternalIP", "2001:db8::2")]);
        let p6 = crate::select::plan_node(&r.spec, &n6);
        assert_eq!(mesh_peer_line(&p6, 443), "[2001:db8::2]:443");
    }
}
