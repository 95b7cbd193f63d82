//! TLS for DERP clients, as Go's `net/tlsdial` and `derphttp` do it: which certificates to trust
//! (Web PKI roots, extra CAs, a `sha256-raw:` pin, or nothing), verification for a `CertName`
//! other than the SNI, and reading the server key from the meta certificate that a TLS 1.3
//! server appends to its chain (the key that makes fast start possible).
//!
//! No ALPN is offered (Go's clients offer none) and no SNI is sent for IP literals (rustls only
//! puts DNS names in SNI, as Go does).

use std::fmt;
use std::sync::{Arc, OnceLock};

use derp_proto::NodePublic;
use derp_proto::derpmap::SHA256_RAW_PREFIX;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ClientError;

/// Common-name prefix of the meta certificate. Mirrors derpconst `MetaCertCommonNamePrefix`.
pub const METACERT_CN_PREFIX: &str = "derpkey";

/// Which server certificates the client accepts.
#[derive(Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// Web PKI: the OS trust store plus Mozilla's roots (Go tries system roots, then its baked-in
    /// Let's Encrypt roots; the union accepts what either would).
    WebPki,
    /// [`TlsTrust::WebPki`] plus these CA certificates (e.g. a test CA).
    ExtraCa(Vec<CertificateDer<'static>>),
    /// `CertName: "sha256-raw:<hex>"`: no CA check; exactly one non-metacert certificate whose
    /// SHA-256 over the DER is this, within its validity period.
    Pinned([u8; 32]),
    /// `InsecureForTests: true`: any certificate (handshake signatures are still checked).
    Insecure,
}

impl fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsTrust::WebPki => f.write_str("WebPki"),
            TlsTrust::ExtraCa(c) => write!(f, "ExtraCa({} certs)", c.len()),
            TlsTrust::Pinned(h) => write!(f, "Pinned(sha256-raw:{})", hex::encode(h)),
            TlsTrust::Insecure => f.write_str("Insecure"),
        }
    }
}

impl TlsTrust {
    /// Web PKI roots plus every `CERTIFICATE` block of `pem`.
    pub fn extra_ca_pem(pem: &[u8]) -> Result<Self, ClientError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Config(format!("extra CA PEM: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Config(
                "extra CA PEM holds no certificate".into(),
            ));
        }
        Ok(TlsTrust::ExtraCa(certs))
    }

    /// Parses a `CertName` of the form `sha256-raw:<64 lowercase hex>`. Uppercase hex is refused
    /// because Go compares the lowercase hex string, so such a map entry fails for real clients.
    pub fn from_sha256_raw(cert_name: &str) -> Result<Self, ClientError> {
        let hex_part = cert_name.strip_prefix(SHA256_RAW_PREFIX).ok_or_else(|| {
            ClientError::Config(format!("CertName {cert_name:?} lacks {SHA256_RAW_PREFIX}"))
        })?;
        let lower = hex_part.len() == 64
            && hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !lower {
            return Err(ClientError::Config(format!(
                "CertName {cert_name:?}: expected 64 lowercase hex digits (Go compares lowercase)"
            )));
        }
        let mut h = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut h)
            .map_err(|e| ClientError::Config(format!("CertName hex: {e}")))?;
        Ok(TlsTrust::Pinned(h))
    }
}

/// `sha256-raw:<hex>` for a certificate, the `CertName` value that pins it.
pub fn cert_name_for(cert_der: &[u8]) -> String {
    format!(
        "{SHA256_RAW_PREFIX}{}",
        hex::encode(Sha256::digest(cert_der))
    )
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// OS roots plus webpki-roots, loaded once per process (reading the OS store costs milliseconds
/// and a load generator connects thousands of clients).
fn web_pki_roots() -> RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let native = rustls_native_certs::load_native_certs();
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "loaded OS trust store");
            roots
        })
        .clone()
}

/// Builds the rustls client config. `cert_name`, if set, is the DNS name the certificate must be
/// valid for instead of the SNI (Go's `CertName` domain fronting; ignored for pins/insecure).
/// Public so tools that speak plain TLS next to DERP (the benchmark's TLS baseline) trust
/// servers exactly as the client does.
pub fn client_config(
    trust: &TlsTrust,
    cert_name: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let webpki =
        |extra: &[CertificateDer<'static>]| -> Result<Arc<dyn ServerCertVerifier>, ClientError> {
            let mut roots = web_pki_roots();
            for c in extra {
                roots
                    .add(c.clone())
                    .map_err(|e| ClientError::Config(format!("extra CA: {e}")))?;
            }
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| ClientError::Config(format!("TLS verifier: {e}")))?;
            Ok(match cert_name {
                Some(name) => Arc::new(RenamedVerifier {
                    inner: v,
                    name: ServerName::try_from(name.to_owned())
                        .map_err(|e| ClientError::Config(format!("CertName {name:?}: {e}")))?,
                }),
                None => v,
            })
        };
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        TlsTrust::WebPki => webpki(&[])?,
        TlsTrust::ExtraCa(extra) => webpki(extra)?,
        TlsTrust::Pinned(sha256) => Arc::new(ChainVerifier {
            pin: Some(*sha256),
            algs,
        }),
        TlsTrust::Insecure => Arc::new(ChainVerifier { pin: None, algs }),
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// `notAfter` (Unix seconds) of the first certificate of `chain` that is not a DERP meta
/// certificate: the leaf a client verifies, whose expiry the prober reports.
pub fn leaf_not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    chain
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c))
        .find(|c| !last_common_name(c).is_some_and(|cn| cn.starts_with(METACERT_CN_PREFIX)))
        .map(|c| c.validity().not_after.timestamp())
}

/// Whether a certificate's subject CN starts with `derpkey`. Unparseable certificates are not
/// metacerts (and fail any check that parses them).
pub fn is_metacert(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| last_common_name(&c).map(|cn| cn.starts_with(METACERT_CN_PREFIX)))
        .unwrap_or(false)
}

/// Go's `Subject.CommonName` is the last CN attribute of the subject.
fn last_common_name<'a>(c: &'a X509Certificate<'_>) -> Option<&'a str> {
    c.subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .last()
}

/// Reads the server key and protocol version from the first metacert in `chain`, as Go's
/// `parseMetaCert` does: CN `derpkey<64 hex>` (either case) and a serial of at most 8 bits.
/// Returns `None` when there is none; a returned version of 0 means "do not fast start".
pub fn parse_metacert(chain: &[CertificateDer<'_>]) -> Option<(NodePublic, u32)> {
    for der in chain {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        let Some(hex_key) =
            last_common_name(&cert).and_then(|cn| cn.strip_prefix(METACERT_CN_PREFIX))
        else {
            continue;
        };
        let Ok(key) = NodePublic::parse_untyped(hex_key) else {
            continue;
        };
        // DER INTEGER content bytes; a leading 0x00 only marks a positive number.
        let serial = cert.tbs_certificate.raw_serial();
        let serial = match serial {
            [0, rest @ ..] => rest,
            s => s,
        };
        match serial {
            [] => return Some((key, 0)),
            [v] => return Some((key, u32::from(*v))),
            _ => continue,
        }
    }
    None
}

/// Checks a `sha256-raw:` pin against a presented chain, as `tlsdial.SetConfigExpectedCertHash`.
/// `dns_name` is the SNI when it is a DNS name (Go checks the name only then).
pub(crate) fn check_pinned_chain<'a>(
    chain: impl IntoIterator<Item = &'a CertificateDer<'a>>,
    want_sha256: &[u8; 32],
    dns_name: Option<&ServerName<'_>>,
    now: UnixTime,
) -> Result<(), String> {
    let mut saw_good = false;
    for der in chain {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("unparseable certificate in chain: {e}"))?;
        if last_common_name(&cert).is_some_and(|cn| cn.starts_with(METACERT_CN_PREFIX)) {
            continue;
        }
        if saw_good {
            return Err("unexpected multiple certs presented".into());
        }
        if Sha256::digest(der.as_ref()).as_slice() != want_sha256 {
            return Err("cert hash does not match expected cert hash".into());
        }
        if let Some(name) = dns_name {
            let parsed = ParsedCertificate::try_from(der).map_err(|e| e.to_string())?;
            verify_server_name(&parsed, name)
                .map_err(|e| format!("cert does not match server name: {e}"))?;
        }
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let v = cert.validity();
        if now > v.not_after.timestamp() {
            return Err(format!("cert expired {}", v.not_after));
        }
        if now < v.not_before.timestamp() {
            return Err(format!(
                "cert not yet valid until {}; is your clock correct?",
                v.not_before
            ));
        }
        saw_good = true;
    }
    if saw_good {
        Ok(())
    } else {
        Err("expected cert not presented".into())
    }
}

/// The verifiers that skip CA paths: `sha256-raw:` pinning (`pin` set: exactly one non-metacert
/// certificate with that hash, within its validity) and `InsecureForTests` (`pin` unset: any
/// chain). Handshake signatures are verified either way, so the peer at least holds the key of
/// the certificate it shows.
#[derive(Debug)]
struct ChainVerifier {
    pin: Option<[u8; 32]>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(pin) = &self.pin {
            let dns = matches!(server_name, ServerName::DnsName(_)).then_some(server_name);
            check_pinned_chain(
                std::iter::once(end_entity).chain(intermediates),
                pin,
                dns,
                now,
            )
            .map_err(rustls::Error::General)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Web PKI verification for a fixed name instead of the SNI (Go: `CertName` differing from a DNS
/// `HostName`: SNI stays `HostName`, the certificate must be valid for `CertName`).
#[derive(Debug)]
struct RenamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for RenamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use derp_proto::NodePrivate;
    use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SerialNumber, date_time_ymd};

    use super::*;

    /// A metacert shaped like Go's: Ed25519, serial = version, CN `derpkey<hex>`, cA=false.
    fn metacert(cn: &str, serial: &[u8]) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serial_number = Some(SerialNumber::from_slice(serial));
        p.is_ca = IsCa::ExplicitNoCa;
        p.self_signed(&key).unwrap().der().clone()
    }

    fn leaf(
        names: &[&str],
        not_before: (i32, u8),
        not_after: (i32, u8),
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name.push(DnType::CommonName, &names[0]);
        p.not_before = date_time_ymd(not_before.0, not_before.1, 1);
        p.not_after = date_time_ymd(not_after.0, not_after.1, 1);
        p.self_signed(&key).unwrap().der().clone()
    }

    fn sha(c: &CertificateDer<'_>) -> [u8; 32] {
        Sha256::digest(c.as_ref()).into()
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn dns(s: &str) -> ServerName<'static> {
        ServerName::try_from(s.to_owned()).unwrap()
    }

    #[test]
    fn leaf_not_after_skips_the_metacert() {
        let server = NodePrivate::generate().public();
        let meta = metacert(&format!("derpkey{}", server.untyped_hex()), &[2]);
        let l = leaf(&["127.0.0.1"], (2020, 1), (2099, 1));
        // 2099-01-01T00:00:00Z
        let want = Some(4_070_908_800);
        assert_eq!(leaf_not_after(&[meta.clone(), l.clone()]), want);
        assert_eq!(leaf_not_after(&[l, meta.clone()]), want);
        assert_eq!(leaf_not_after(&[meta]), None);
        assert_eq!(leaf_not_after(&[CertificateDer::from(vec![1, 2, 3])]), None);
    }

    #[test]
    fn metacert_key_and_version() {
        let server = NodePrivate::generate().public();
        let meta = metacert(&format!("derpkey{}", server.untyped_hex()), &[2]);
        let l = leaf(&["127.0.0.1"], (2020, 1), (2099, 1));
        assert_eq!(
            parse_metacert(&[l.clone(), meta.clone()]),
            Some((server, 2))
        );
        assert!(is_metacert(&meta) && !is_metacert(&l));
        // Uppercase hex is accepted, as Go's untyped key parser does.
        let upper = metacert(
            &format!("derpkey{}", server.untyped_hex().to_uppercase()),
            &[2],
        );
        assert_eq!(parse_metacert(&[upper]), Some((server, 2)));
        // Serial 0: found, but version 0 (the caller must not fast start).
        assert_eq!(
            parse_metacert(&[metacert(&format!("derpkey{}", server.untyped_hex()), &[0])]),
            Some((server, 0))
        );
        // Serial wider than 8 bits: skipped, like Go's BitLen() <= 8 check.
        assert_eq!(
            parse_metacert(&[metacert(
                &format!("derpkey{}", server.untyped_hex()),
                &[1, 0]
            )]),
            None
        );
        // Bad hex or length: skipped, a later good one still counts.
        let bad = metacert("derpkeyzz", &[2]);
        assert_eq!(parse_metacert(&[bad.clone(), meta]), Some((server, 2)));
        assert_eq!(parse_metacert(&[bad, l]), None);
        assert_eq!(
            parse_metacert(&[CertificateDer::from(vec![0x30, 0x03, 0x02])]),
            None
        );
    }

    #[test]
    fn pinned_chain_rules() {
        let server = NodePrivate::generate().public();
        let meta = metacert(&format!("derpkey{}", server.untyped_hex()), &[2]);
        let l = leaf(&["127.0.0.1", "derp.example.com"], (2020, 1), (2099, 1));
        let pin = sha(&l);
        assert_eq!(check_pinned_chain([&l, &meta], &pin, None, now()), Ok(()));
        assert_eq!(
            check_pinned_chain([&l], &pin, Some(&dns("derp.example.com")), now()),
            Ok(())
        );
        let e = check_pinned_chain([&l], &pin, Some(&dns("other.example.com")), now()).unwrap_err();
        assert!(e.contains("server name"), "{e}");
        let e = check_pinned_chain([&l], &[0; 32], None, now()).unwrap_err();
        assert!(e.contains("hash does not match"), "{e}");
        // An intermediate next to the pinned leaf: Go refuses (send leaf + metacert only).
        let other = leaf(&["ca.example.com"], (2020, 1), (2099, 1));
        let e = check_pinned_chain([&l, &other, &meta], &pin, None, now()).unwrap_err();
        assert_eq!(e, "unexpected multiple certs presented");
        assert_eq!(
            check_pinned_chain([&meta], &pin, None, now()).unwrap_err(),
            "expected cert not presented"
        );
        let old = leaf(&["127.0.0.1"], (2000, 1), (2001, 1));
        let e = check_pinned_chain([&old], &sha(&old), None, now()).unwrap_err();
        assert!(e.starts_with("cert expired"), "{e}");
        let future = leaf(&["127.0.0.1"], (2098, 1), (2099, 1));
        let e = check_pinned_chain([&future], &sha(&future), None, now()).unwrap_err();
        assert!(e.contains("not yet valid"), "{e}");
        let junk = CertificateDer::from(vec![1, 2, 3]);
        assert!(check_pinned_chain([&junk], &pin, None, now()).is_err());
    }

    #[test]
    fn cert_name_parsing() {
        let l = leaf(&["127.0.0.1"], (2020, 1), (2099, 1));
        let name = cert_name_for(&l);
        assert_eq!(
            TlsTrust::from_sha256_raw(&name).unwrap(),
            TlsTrust::Pinned(sha(&l))
        );
        assert!(
            TlsTrust::from_sha256_raw(&name.to_uppercase().replace("SHA256-RAW:", "sha256-raw:"))
                .is_err()
        );
        assert!(TlsTrust::from_sha256_raw("sha256:abcd").is_err());
        assert!(TlsTrust::from_sha256_raw("sha256-raw:abcd").is_err());
        assert!(format!("{:?}", TlsTrust::from_sha256_raw(&name).unwrap()).contains(&name));
    }

    #[test]
    fn extra_ca_pem() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["ca.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let t = TlsTrust::extra_ca_pem(cert.pem().as_bytes()).unwrap();
        assert_eq!(t, TlsTrust::ExtraCa(vec![cert.der().clone()]));
        assert!(TlsTrust::extra_ca_pem(b"nothing here").is_err());
        assert!(client_config(&t, Some("derp.example.com")).is_ok());
        assert!(
            client_config(&TlsTrust::Insecure, None)
                .unwrap()
                .alpn_protocols
                .is_empty()
        );
    }
}
