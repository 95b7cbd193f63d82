//! ACME failures in words a self-hoster can act on: what the CA said, and what to fix.

use std::time::Duration;

use instant_acme::Problem;

/// An order that did not produce a certificate.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA answered with a problem document (RFC 8555 §6.7).
    #[error("{}: {}{}", kind_of(.problem), describe(.problem), hint_suffix(.problem, .host))]
    Ca { problem: Problem, host: String },
    /// Talking to the CA failed (network, TLS, malformed answers).
    #[error(
        "talking to the ACME directory {directory}: {detail} (check that this host can reach it over HTTPS{ca})"
    )]
    Client {
        directory: String,
        detail: String,
        ca: &'static str,
    },
    #[error("{0}")]
    Local(String),
}

impl AcmeError {
    /// The short label for metrics and logs: `dns`, `connection`, `rate_limited`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            AcmeError::Ca { problem, .. } => kind_of(problem),
            AcmeError::Client { .. } => "client",
            AcmeError::Local(_) => "local",
        }
    }

    /// A failed validation is worth a new order with the other challenge type (Go's autocert
    /// tries tls-alpn-01, then http-01).
    pub fn is_validation_failure(&self) -> bool {
        matches!(
            self.kind(),
            "connection" | "unauthorized" | "incorrect_response" | "tls" | "dns"
        )
    }

    /// The least wait before the next attempt.
    pub fn min_retry(&self) -> Duration {
        if self.kind() == "rate_limited" {
            // Let's Encrypt's limits are per hour and per week; retrying sooner only extends them.
            Duration::from_secs(3600)
        } else {
            Duration::ZERO
        }
    }
}

fn problem_type(p: &Problem) -> &str {
    p.r#type
        .as_deref()
        .and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:"))
        .unwrap_or("")
}

fn kind_of(p: &Problem) -> &'static str {
    // A failed order carries the validation's problem in a subproblem, or its own type.
    let t = std::iter::once(problem_type(p))
        .chain(
            p.subproblems
                .iter()
                .filter_map(|s| s.r#type.as_deref())
                .filter_map(|t| t.strip_prefix("urn:ietf:params:acme:error:")),
        )
        .find(|t| !t.is_empty() && *t != "malformed" && *t != "serverInternal")
        .unwrap_or_else(|| problem_type(p));
    // Some CAs (Pebble among them) report a name that does not resolve as malformed or as a
    // connection failure.
    if matches!(t, "malformed" | "connection" | "") && mentions_dns(p) {
        return "dns";
    }
    match t {
        "dns" => "dns",
        "connection" => "connection",
        "unauthorized" => "unauthorized",
        "incorrectResponse" => "incorrect_response",
        "tls" => "tls",
        "caa" => "caa",
        "rateLimited" => "rate_limited",
        "rejectedIdentifier" | "unsupportedIdentifier" => "rejected_identifier",
        "externalAccountRequired" => "eab_required",
        "unauthorizedExternalAccount" | "malformedExternalAccount" => "eab_refused",
        "invalidProfile" => "invalid_profile",
        "badNonce" => "bad_nonce",
        "accountDoesNotExist" => "account_gone",
        "serverInternal" => "ca_internal",
        _ => "refused",
    }
}

fn mentions_dns(p: &Problem) -> bool {
    std::iter::once(p.detail.as_deref())
        .chain(p.subproblems.iter().map(|s| s.detail.as_deref()))
        .flatten()
        .any(|d| {
            let d = d.to_ascii_lowercase();
            [
                "could not resolve",
                "no such host",
                "nxdomain",
                "servfail",
                "dns problem",
            ]
            .iter()
            .any(|w| d.contains(w))
        })
}

fn describe(p: &Problem) -> String {
    let mut s = p.detail.clone().unwrap_or_else(|| "no detail".into());
    for sub in &p.subproblems {
        if let Some(d) = &sub.detail {
            s.push_str("; ");
            s.push_str(d);
        }
    }
    if let Some(t) = &p.r#type {
        s.push_str(&format!(" ({t})"));
    }
    s
}

fn hint_suffix(p: &Problem, host: &str) -> String {
    let hint = match kind_of(p) {
        "dns" => format!(
            "the CA could not resolve {host}: its DNS A/AAAA records must exist and point at this server"
        ),
        "connection" => format!(
            "the CA could not reach this server: {host} must resolve to this server, and TCP 443 \
             (TLS-ALPN-01) and 80 (HTTP-01, -http-port) must be open to the internet"
        ),
        "unauthorized" | "incorrect_response" => format!(
            "something else answered the CA's check for {host}: is a proxy or load balancer in \
             front of ports 80/443, or do the DNS records point at another server?"
        ),
        "tls" => "the CA's TLS-ALPN-01 handshake failed: a TLS-terminating proxy in front of \
                  port 443 hides the derper; pass TCP through, or keep -http-port 80 open for HTTP-01"
            .into(),
        "caa" => format!(
            "a CAA DNS record for {host} forbids this CA: add the CA (e.g. letsencrypt.org) to it"
        ),
        "rate_limited" => "the CA's rate limit was hit: the derper waits at least an hour \
                           before it tries again and keeps serving its current certificate"
            .into(),
        "rejected_identifier" => format!(
            "the CA will not issue for {host}: use a public DNS name (or an IP with -acme-ip-certs)"
        ),
        "eab_required" => "this CA needs an external account binding: set -acme-eab-kid and \
                           -acme-eab-key (DERP_ACME_EAB_KID, DERP_ACME_EAB_KEY)"
            .into(),
        "eab_refused" => "the CA refused the external account binding: check -acme-eab-kid and \
                          -acme-eab-key (base64url HMAC key, as the CA printed it)"
            .into(),
        "account_gone" => {
            "the CA no longer knows the saved account: a new one is registered on the next try".into()
        }
        "invalid_profile" => {
            "the CA does not offer the short-lived profile IP certificates need".into()
        }
        _ => return String::new(),
    };
    format!(" — {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(json: &str) -> Problem {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn kinds_and_hints() {
        let e = AcmeError::Ca {
            problem: problem(
                r#"{"type":"urn:ietf:params:acme:error:connection","detail":"Connection refused","status":400}"#,
            ),
            host: "derp.example.com".into(),
        };
        assert_eq!(e.kind(), "connection");
        assert!(e.is_validation_failure());
        let m = e.to_string();
        assert!(
            m.contains("Connection refused") && m.contains("TCP 443"),
            "{m}"
        );

        let e = AcmeError::Ca {
            problem: problem(
                r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many certificates"}"#,
            ),
            host: "h".into(),
        };
        assert_eq!(e.kind(), "rate_limited");
        assert_eq!(e.min_retry(), Duration::from_secs(3600));
        assert!(!e.is_validation_failure());

        // An order's problem names the validation failure in a subproblem.
        let e = AcmeError::Ca {
            problem: problem(
                r#"{"type":"urn:ietf:params:acme:error:malformed","detail":"order failed",
                    "subproblems":[{"type":"urn:ietf:params:acme:error:caa","detail":"CAA forbids"}]}"#,
            ),
            host: "h".into(),
        };
        assert_eq!(e.kind(), "caa");
        assert!(e.to_string().contains("CAA forbids"), "{e}");

        // Pebble's answer for a name that does not resolve.
        let e = AcmeError::Ca {
            problem: problem(
                r#"{"type":"urn:ietf:params:acme:error:malformed","detail":"Could not resolve URL \"derp.acme.test\""}"#,
            ),
            host: "derp.acme.test".into(),
        };
        assert_eq!(e.kind(), "dns");
        assert!(e.to_string().contains("DNS A/AAAA records"), "{e}");
    }
}
