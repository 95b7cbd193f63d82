//! Self-signed certificates for `tls.selfSigned` regions and the pin the map publishes for them.
//!
//! One certificate per region (a `kubernetes.io/tls` Secret every derper of the DaemonSet mounts),
//! naming every node's addresses and, with a hostname template, every node's DNS name. A cert is
//! kept as long as it still covers every name the region needs and is far from expiry, so the pin
//! in the map (and with it the region's definition, which clients redial on) changes only when a
//! new node appears or once every few years.

use std::net::IpAddr;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use sha2::{Digest, Sha256};

/// Lifetime of a generated certificate: 5 years (1826 days). Pinned clients ignore expiry, but
/// our own mesh verification does not, and every renewal changes the pin, which makes every client
/// redial the region, so renewals should be rare.
pub const CERT_LIFETIME_SECS: i64 = 1826 * 24 * 3600;
/// Renew a generated certificate 30 days before it expires.
pub const RENEW_BEFORE_SECS: i64 = 30 * 24 * 3600;
/// Backdate `notBefore` by one hour for nodes whose clocks run a little behind ours.
const BACKDATE_SECS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate PEM is not valid: {0}")]
    Pem(String),
    #[error("clock is outside the certificate date range")]
    Clock,
}

/// The names a region's certificate must cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sans {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// A PEM certificate (leaf) and its PEM PKCS#8 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a self-signed ECDSA P-256 leaf for `sans`, valid from `now_unix - 1h` for
/// [`CERT_LIFETIME_SECS`].
pub fn generate(sans: &Sans, common_name: &str, now_unix: i64) -> Result<CertAndKey, TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "derp-fleet");
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let mut alt = Vec::new();
    for d in &sans.dns {
        alt.push(SanType::DnsName(
            d.clone()
                .try_into()
                .map_err(|_| TlsError::Pem(format!("bad DNS name {d}")))?,
        ));
    }
    alt.extend(sans.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = alt;
    params.not_before = time::OffsetDateTime::from_unix_timestamp(now_unix - BACKDATE_SECS)
        .map_err(|_| TlsError::Clock)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(now_unix + CERT_LIFETIME_SECS)
        .map_err(|_| TlsError::Clock)?;
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// DER of the first certificate in `pem`.
fn leaf_der(pem: &[u8]) -> Result<Vec<u8>, TlsError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok(p.contents)
}

/// `CertName` for a pinned certificate: `sha256-raw:` + lowercase hex SHA-256 of the leaf's DER,
/// exactly what the derper logs and Tailscale clients compare.
pub fn pin(cert_pem: &[u8]) -> Result<String, TlsError> {
    let der = leaf_der(cert_pem)?;
    Ok(format!(
        "{}{}",
        derp_proto::derpmap::SHA256_RAW_PREFIX,
        hex::encode(Sha256::digest(&der))
    ))
}

/// The DNS names (lowercase) and IPs a certificate's SAN extension lists.
fn san_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns: Vec<String> = Vec::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    dns.push(d.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        ips.push(IpAddr::from(a));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        ips.push(IpAddr::from(a));
                    }
                }
                _ => {}
            }
        }
    }
    (dns, ips)
}

/// Whether the certificate in `cert_pem` names everything in `sans` and stays valid for longer
/// than [`RENEW_BEFORE_SECS`] after `now_unix`.
pub fn covers(cert_pem: &[u8], sans: &Sans, now_unix: i64) -> bool {
    let Ok(der) = leaf_der(cert_pem) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    if cert.validity().not_after.timestamp() - now_unix <= RENEW_BEFORE_SECS {
        return false;
    }
    let (dns, ips) = san_names(&cert);
    sans.dns
        .iter()
        .all(|d| dns.contains(&d.to_ascii_lowercase()))
        && sans.ips.iter().all(|ip| ips.contains(ip))
}

/// Whether the SAN `pattern` matches `name` as a TLS client checks it: equal, or a `*.` wildcard
/// standing for exactly one leftmost label.
fn dns_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(rest) => name
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => pattern == name,
    }
}

/// Checks a certificate someone else provides (`tls.secretName`): it parses, is valid at
/// `now_unix`, and names every host of `sans` (wildcards allowed). The error says what is wrong,
/// for the `CertificateReady` condition.
pub fn check_provided(cert_pem: &[u8], sans: &Sans, now_unix: i64) -> Result<(), String> {
    let der = leaf_der(cert_pem).map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("tls.crt is not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    if validity.not_after.timestamp() <= now_unix {
        return Err(format!("the certificate expired at {}", validity.not_after));
    }
    if validity.not_before.timestamp() > now_unix {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    let (dns, ips) = san_names(&cert);
    let mut missing: Vec<String> = sans
        .dns
        .iter()
        .filter(|d| !dns.iter().any(|p| dns_matches(p, d)))
        .cloned()
        .collect();
    missing.extend(
        sans.ips
            .iter()
            .filter(|ip| !ips.contains(ip))
            .map(|ip| ip.to_string()),
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the certificate does not name {} (it names {})",
            missing.join(", "),
            dns.iter()
                .cloned()
                .chain(ips.iter().map(|i| i.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    fn sans() -> Sans {
        Sans {
            dns: vec!["a.derp.example.com".into()],
            ips: vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        }
    }

    #[test]
    fn generated_cert_covers_its_names_and_pins_the_leaf() {
        let c = generate(&sans(), "home", NOW).unwrap();
        assert!(covers(c.cert_pem.as_bytes(), &sans(), NOW));
        let mut more = sans();
        more.ips.push("10.0.0.2".parse().unwrap());
        assert!(!covers(c.cert_pem.as_bytes(), &more, NOW));
        // Near expiry it no longer counts.
        assert!(!covers(
            c.cert_pem.as_bytes(),
            &sans(),
            NOW + CERT_LIFETIME_SECS - RENEW_BEFORE_SECS
        ));

        let p = pin(c.cert_pem.as_bytes()).unwrap();
        let der = leaf_der(c.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            p,
            format!("sha256-raw:{}", hex::encode(Sha256::digest(der)))
        );
        assert_eq!(p.len(), "sha256-raw:".len() + 64);
        assert_eq!(p, p.to_lowercase());
        assert!(c.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn provided_certificate_checks_names_wildcards_and_dates() {
        let wild = Sans {
            dns: vec!["*.derp.example.com".into()],
            ips: vec![],
        };
        let c = generate(&wild, "user", NOW).unwrap();
        let need = |dns: &[&str]| Sans {
            dns: dns.iter().map(|d| d.to_string()).collect(),
            ips: vec![],
        };
        let pem = c.cert_pem.as_bytes();
        assert_eq!(
            check_provided(
                pem,
                &need(&["a.derp.example.com", "B.derp.example.com"]),
                NOW
            ),
            Ok(())
        );
        let e = check_provided(pem, &need(&["a.b.derp.example.com"]), NOW).unwrap_err();
        assert!(e.contains("does not name a.b.derp.example.com"), "{e}");
        assert!(check_provided(pem, &need(&["derp.example.com"]), NOW).is_err());
        let e = check_provided(pem, &need(&[]), NOW + CERT_LIFETIME_SECS + 1).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let e = check_provided(c.cert_pem.as_bytes(), &sans(), NOW).unwrap_err();
        assert!(e.contains("10.0.0.1"), "{e}");
        assert!(check_provided(b"nope", &need(&[]), NOW).is_err());
    }

    #[test]
    fn garbage_is_not_covered() {
        assert!(!covers(b"nope", &sans(), NOW));
        assert!(pin(b"nope").is_err());
    }
}
