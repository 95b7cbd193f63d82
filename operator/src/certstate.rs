//! The region's `CertificateReady` condition: a typed reason for each way a certificate can be
//! found, missing or invalid, and the pure functions that derive it from what a reconcile read
//! (cert-manager's Certificate, the user's `tls.secretName` Secret, the self-signed Secret).
//! `controller.rs` does the reading and writes the status; the reason strings are made here only.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Secret};
use serde_json::Value;

use crate::crd::DerpRegion;
use crate::select::plan_nodes;
use crate::tls;

/// Reason of the `CertificateReady` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReason {
    /// cert-manager issued the region's Certificate (`tls.issuerRef`).
    Issued,
    /// The `tls.secretName` Secret holds a certificate valid for every selected node.
    SecretFound,
    /// The operator made a self-signed certificate; the map pins it.
    SelfSigned,
    /// `tls.issuerRef` without cert-manager's Certificate API on the cluster.
    CertManagerMissing,
    /// No node is selected, so there is nothing to request or make a certificate for.
    NoNodes,
    /// The Certificate has no `Ready` condition yet.
    CertificatePending,
    /// The Certificate's `Ready` condition is not `True`.
    CertificateNotReady,
    /// The `tls.secretName` Secret does not exist.
    SecretNotFound,
    /// The `tls.secretName` Secret lacks a key, or its certificate does not fit the nodes.
    SecretInvalid,
}

impl CertReason {
    pub const ALL: [CertReason; 9] = [
        Self::Issued,
        Self::SecretFound,
        Self::SelfSigned,
        Self::CertManagerMissing,
        Self::NoNodes,
        Self::CertificatePending,
        Self::CertificateNotReady,
        Self::SecretNotFound,
        Self::SecretInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "Issued",
            Self::SecretFound => "SecretFound",
            Self::SelfSigned => "SelfSigned",
            Self::CertManagerMissing => "CertManagerMissing",
            Self::NoNodes => "NoNodes",
            Self::CertificatePending => "CertificatePending",
            Self::CertificateNotReady => "CertificateNotReady",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretInvalid => "SecretInvalid",
        }
    }

    /// The reason a status read back from the API server carries (`None`: not one of ours).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the derpers have a certificate to serve (`CertificateReady=True`).
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Issued | Self::SecretFound | Self::SelfSigned)
    }
}

impl std::fmt::Display for CertReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State of the region's certificate, as `CertificateReady` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertState {
    pub reason: CertReason,
    pub message: String,
}

impl CertState {
    pub fn new(reason: CertReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub fn ready(&self) -> bool {
        self.reason.is_ready()
    }

    pub fn cert_manager_missing() -> Self {
        Self::new(
            CertReason::CertManagerMissing,
            "cert-manager is not installed (no certificates.cert-manager.io/v1 API): install \
             cert-manager, or use tls.selfSigned or tls.secretName",
        )
    }

    /// No node selected yet; `what` is the certificate that waits for one.
    pub fn no_nodes(what: &str) -> Self {
        Self::new(
            CertReason::NoNodes,
            format!("no node is selected yet; {what}"),
        )
    }

    /// From cert-manager's Certificate `name` as last read (`None`: not created yet).
    pub fn of_certificate(name: &str, certificate: Option<&Value>) -> Self {
        let ready = certificate
            .and_then(|v| v.pointer("/status/conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
            });
        let field = |c: &Value, k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        match ready {
            Some(c) if field(c, "status") == "True" => Self::new(
                CertReason::Issued,
                format!("Certificate {name} is issued (Secret {name})"),
            ),
            Some(c) => Self::new(
                CertReason::CertificateNotReady,
                format!(
                    "Certificate {name} is not ready: {} {}",
                    field(c, "reason"),
                    field(c, "message")
                )
                .trim_end()
                .to_string(),
            ),
            None => Self::new(
                CertReason::CertificatePending,
                format!("waiting for cert-manager to issue Certificate {name}"),
            ),
        }
    }

    pub fn secret_not_found(name: &str, namespace: &str) -> Self {
        Self::new(
            CertReason::SecretNotFound,
            format!(
                "Secret {name} (tls.secretName) does not exist in namespace {namespace}; the \
                 derpers cannot start until it does"
            ),
        )
    }

    /// From a `tls.secretName` Secret: it must hold a certificate that is valid now and names
    /// every node's host (the DNS names with a hostname template, else the IPs).
    pub fn of_provided_secret(
        region: &DerpRegion,
        nodes: &[Node],
        name: &str,
        secret: &Secret,
        now_unix: i64,
    ) -> Self {
        let data = secret.data.as_ref();
        let (Some(crt), Some(_)) = (
            data.and_then(|d| d.get("tls.crt")),
            data.and_then(|d| d.get("tls.key")),
        ) else {
            return Self::new(
                CertReason::SecretInvalid,
                format!("Secret {name} (tls.secretName) needs the keys tls.crt and tls.key"),
            );
        };
        let mut sans = tls::Sans::default();
        for p in plan_nodes(&region.spec, nodes)
            .iter()
            .filter(|p| p.has_address())
        {
            if region.spec.hostname_template.is_some() {
                sans.dns.push(p.host_name.clone());
            } else {
                sans.ips.extend(p.ipv4.map(IpAddr::from));
                sans.ips.extend(p.ipv6.map(IpAddr::from));
            }
        }
        match tls::check_provided(&crt.0, &sans, now_unix) {
            Ok(()) => Self::new(
                CertReason::SecretFound,
                format!(
                    "using Secret {name} ({}, valid for every selected node)",
                    tls::pin(&crt.0).unwrap_or_default()
                ),
            ),
            Err(why) => Self::new(
                CertReason::SecretInvalid,
                format!("Secret {name} (tls.secretName): {why}"),
            ),
        }
    }

    /// The self-signed certificate the operator keeps in Secret `name`.
    pub fn self_signed(name: &str) -> Self {
        Self::new(
            CertReason::SelfSigned,
            format!("self-signed certificate in Secret {name}; the map pins it"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{desired_status, transitions};
    use crate::crd::{CONDITION_CERTIFICATE_READY, DerpRegionStatus};
    use crate::mapbuild::RegionFacts;
    use crate::testutil::{node, region};
    use k8s_openapi::ByteString;
    use k8s_openapi::jiff::Timestamp;
    use kube::runtime::events::EventType;

    fn tls_secret(sans: &tls::Sans, now: i64) -> Secret {
        let ck = tls::generate(sans, "user", now).unwrap();
        Secret {
            data: Some(
                [
                    ("tls.crt".to_string(), ByteString(ck.cert_pem.into_bytes())),
                    ("tls.key".to_string(), ByteString(ck.key_pem.into_bytes())),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn ips(ips: &[&str]) -> tls::Sans {
        tls::Sans {
            dns: vec![],
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn reasons_read_back_as_themselves() {
        for r in CertReason::ALL {
            assert_eq!(CertReason::parse(r.as_str()), Some(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(CertReason::parse("Unknown"), None);
    }

    /// Every `CertificateReady` reason, from what a reconcile reads to the condition the status
    /// carries and the Event its transition raises.
    #[test]
    fn every_certificate_reason_into_the_status() {
        let now = 1_790_000_000;
        let mut user = region("user", 900);
        user.spec.tls.self_signed = None;
        user.spec.tls.secret_name = Some("user-tls".into());
        let nodes = [node("a", &[("InternalIP", "10.0.0.1")])];
        let certificate = |status: &str| {
            serde_json::json!({"status": {"conditions": [
                {"type": "Ready", "status": status, "reason": "Pending", "message": "ordering"}
            ]}})
        };
        let cases = [
            (
                CertState::of_certificate("home-derper-tls", Some(&certificate("True"))),
                "Certificate home-derper-tls is issued",
                Some((EventType::Normal, "CertificateReady")),
            ),
            (
                CertState::of_provided_secret(
                    &user,
                    &nodes,
                    "user-tls",
                    &tls_secret(&ips(&["10.0.0.1"]), now),
                    now,
                ),
                "using Secret user-tls (sha256-raw:",
                Some((EventType::Normal, "CertificateReady")),
            ),
            (
                CertState::self_signed("home-derper-tls"),
                "self-signed certificate in Secret home-derper-tls",
                Some((EventType::Normal, "CertificateReady")),
            ),
            (
                CertState::cert_manager_missing(),
                "install cert-manager",
                Some((EventType::Warning, "CertManagerMissing")),
            ),
            (
                CertState::no_nodes("the Certificate is requested once one is"),
                "no node is selected yet",
                // Ready=False NoNodeSelected says it already.
                None,
            ),
            (
                CertState::of_certificate("home-derper-tls", Some(&serde_json::json!({}))),
                "waiting for cert-manager to issue Certificate home-derper-tls",
                Some((EventType::Warning, "CertificateNotReady")),
            ),
            (
                CertState::of_certificate("home-derper-tls", Some(&certificate("False"))),
                "Certificate home-derper-tls is not ready: Pending ordering",
                Some((EventType::Warning, "CertificateNotReady")),
            ),
            (
                CertState::secret_not_found("user-tls", "derp"),
                "Secret user-tls (tls.secretName) does not exist in namespace derp",
                Some((EventType::Warning, "CertificateNotReady")),
            ),
            (
                CertState::of_provided_secret(
                    &user,
                    &nodes,
                    "user-tls",
                    &tls_secret(&ips(&["10.0.0.9"]), now),
                    now,
                ),
                "does not name 10.0.0.1",
                Some((EventType::Warning, "CertificateNotReady")),
            ),
        ];
        let covered: Vec<CertReason> = cases.iter().map(|(s, _, _)| s.reason).collect();
        assert_eq!(covered, CertReason::ALL, "one case per reason, in order");
        let facts = RegionFacts::default();
        let at = Timestamp::from_second(now).unwrap();
        for (state, message, event) in cases {
            let reason = state.reason;
            let s: DerpRegionStatus = desired_status(&user, &facts, &state, None, at);
            let c = s
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_CERTIFICATE_READY)
                .unwrap();
            let status = if reason.is_ready() { "True" } else { "False" };
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                (status, reason.as_str()),
                "{reason}: {c:?}"
            );
            assert!(c.message.contains(message), "{reason}: {c:?}");
            let raised: Vec<(EventType, String)> = transitions(None, &s)
                .into_iter()
                .filter(|e| e.reason.starts_with("Cert"))
                .map(|e| (e.type_, e.reason))
                .collect();
            let want: Vec<(EventType, String)> =
                event.map(|(t, r)| (t, r.to_string())).into_iter().collect();
            assert_eq!(raised, want, "{reason}");
        }
    }

    #[test]
    fn provided_secret_must_hold_a_cert_naming_every_node() {
        let mut r = region("home", 900);
        r.spec.tls.self_signed = None;
        r.spec.tls.secret_name = Some("user-tls".into());
        let nodes = [
            node("a", &[("InternalIP", "10.0.0.1")]),
            node("b", &[("InternalIP", "10.0.0.2")]),
        ];
        let now = 1_790_000_000;
        let state =
            |secret: &Secret| CertState::of_provided_secret(&r, &nodes, "user-tls", secret, now);
        let ok = state(&tls_secret(&ips(&["10.0.0.1", "10.0.0.2"]), now));
        assert!(ok.ready(), "{ok:?}");
        assert!(ok.message.contains("sha256-raw:"), "{ok:?}");
        let short = state(&tls_secret(&ips(&["10.0.0.1"]), now));
        assert_eq!(short.reason, CertReason::SecretInvalid);
        assert!(
            short.message.contains("does not name 10.0.0.2"),
            "{short:?}"
        );
        let empty = state(&Secret::default());
        assert_eq!(empty.reason, CertReason::SecretInvalid);
        assert!(empty.message.contains("tls.crt and tls.key"), "{empty:?}");
        // With a hostname template the DNS names count, not the IPs.
        r.spec.hostname_template = Some("{node}.derp.example.com".into());
        let wild = tls::Sans {
            dns: vec!["*.derp.example.com".into()],
            ips: vec![],
        };
        let ck = tls::generate(&wild, "user", now).unwrap();
        let mut s = tls_secret(&ips(&[]), now);
        s.data
            .as_mut()
            .unwrap()
            .insert("tls.crt".into(), ByteString(ck.cert_pem.into_bytes()));
        assert!(CertState::of_provided_secret(&r, &nodes, "user-tls", &s, now).ready());
    }
}
