//! TLS certificates: Go's `-certmode manual` file rules (`<certdir>/<hostname>.crt/.key`, plus the
//! Kubernetes Secret layout `tls.crt/tls.key`), the self-signed certificate for a bare IP, the
//! DERP meta certificate that carries our server key, Go's SNI policy, and reloading renewed
//! files without dropping established connections.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use derp_proto::derpmap::SHA256_RAW_PREFIX;
use derp_proto::key::NodePublic;
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType, SerialNumber,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: no PEM certificate found ({detail})")]
    NoCert { path: PathBuf, detail: String },
    #[error("{path}: no usable PEM private key found ({detail})")]
    NoKey { path: PathBuf, detail: String },
    #[error("{path}: the private key type is not supported: {detail}")]
    KeyType { path: PathBuf, detail: String },
    #[error(
        "no certificate for {hostname:?}: looked for {tried}; put the certificate and key there, \
         or use an IP address as -hostname to get a self-signed one"
    )]
    Missing { hostname: String, tried: String },
    #[error("{path}: the certificate is not valid for {hostname:?} (its names: {names})")]
    WrongName {
        path: PathBuf,
        hostname: String,
        names: String,
    },
    #[error("{path}: unparseable certificate: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Go's file-name rule: every character outside `[A-Za-z0-9.-]` is deleted.
pub fn sanitize_hostname(h: &str) -> String {
    h.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect()
}

/// The meta certificate Go clients read (over TLS 1.3) to learn our key and skip the 101.
/// Exactly Go's shape: Ed25519, serial = protocol version, CN `derpkey<hex>`, ±30 days, one
/// critical empty basicConstraints and no key identifiers (derpprobe's expiry check relies on
/// SKI == AKI, both absent).
pub fn meta_cert(server_key: &NodePublic) -> Result<CertificateDer<'static>, CertError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from(vec![
        derp_proto::frame::PROTOCOL_VERSION as u8,
    ]));
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("derpkey{}", server_key.untyped_hex()),
    );
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now + time::Duration::days(30);
    params.is_ca = IsCa::NoCa;
    let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
    bc.set_criticality(true);
    params.custom_extensions = vec![bc];
    Ok(params.self_signed(&key)?.der().clone())
}

/// A self-signed certificate for a bare IP, as Go's manual mode makes one: ECDSA P-256, CN and
/// IP SAN = the address, serverAuth, one year. Returns (certificate PEM, key PEM).
pub fn self_signed_for_ip(ip: IpAddr) -> Result<(String, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from(serial.to_vec()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ip.to_string());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::IpAddress(ip)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = IsCa::ExplicitNoCa;
    let now = OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(365);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `sha256-raw:<lowercase hex>` of a certificate's DER, for the map's `CertName`.
pub fn pin_of(der: &[u8]) -> String {
    format!("{SHA256_RAW_PREFIX}{}", hex::encode(Sha256::digest(der)))
}

/// Where the certificate files are.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Finds the files for `hostname` in `certdir`: `<name>.crt/.key` first (Go), then
/// `tls.crt/tls.key` (a mounted Kubernetes TLS Secret).
pub fn locate(certdir: &Path, hostname: &str) -> Result<CertFiles, CertError> {
    let name = sanitize_hostname(hostname);
    let candidates = [
        (
            certdir.join(format!("{name}.crt")),
            certdir.join(format!("{name}.key")),
        ),
        (certdir.join("tls.crt"), certdir.join("tls.key")),
    ];
    for (cert, key) in &candidates {
        if cert.exists() && key.exists() {
            return Ok(CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
    }
    Err(CertError::Missing {
        hostname: hostname.to_string(),
        tried: candidates
            .iter()
            .map(|(c, k)| format!("{} + {}", c.display(), k.display()))
            .collect::<Vec<_>>()
            .join(" or "),
    })
}

/// For an IP hostname with no files: writes a self-signed pair as Go does (dir 0700, crt 0644,
/// key 0600) and returns where.
pub fn create_self_signed(certdir: &Path, ip: IpAddr) -> Result<CertFiles, CertError> {
    let name = sanitize_hostname(&ip.to_string());
    let files = CertFiles {
        cert: certdir.join(format!("{name}.crt")),
        key: certdir.join(format!("{name}.key")),
    };
    let (cert_pem, key_pem) = self_signed_for_ip(ip)?;
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CertError::Write { path, error }
    };
    std::fs::create_dir_all(certdir).map_err(werr(certdir))?;
    set_mode(certdir, 0o700).map_err(werr(certdir))?;
    write_with_mode(&files.key, key_pem.as_bytes(), 0o600).map_err(werr(&files.key))?;
    write_with_mode(&files.cert, cert_pem.as_bytes(), 0o644).map_err(werr(&files.cert))?;
    Ok(files)
}

#[cfg(unix)]
fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}
#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Writes a file created with `mode` (never world-readable in between), atomically.
pub fn write_with_mode(p: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, p)
}

/// A loaded certificate: the chain we present and facts about its leaf.
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    pub leaf_der: Vec<u8>,
    pub self_signed: bool,
    /// The leaf's validity (ACME renews at two thirds of it).
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Hash of the files' bytes, to notice changes.
    pub fingerprint: [u8; 32],
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("pin", &pin_of(&self.leaf_der))
            .field("self_signed", &self.self_signed)
            .finish()
    }
}

fn read(p: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(p).map_err(|error| CertError::Read {
        path: p.to_path_buf(),
        error,
    })
}

/// Loads and checks the pair: the leaf must be valid for `hostname` (Go refuses to start
/// otherwise), and the meta certificate is appended last.
pub fn load(
    files: &CertFiles,
    hostname: &str,
    meta: &CertificateDer<'static>,
) -> Result<LoadedCert, CertError> {
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    from_pem(&cert_pem, &files.cert, &key_pem, &files.key, hostname, meta)
}

/// Builds a served certificate from PEM bytes (`cert_from`/`key_from` name their source in
/// errors): the chain's leaf must be valid for `hostname`; the meta certificate goes last.
pub fn from_pem(
    cert_pem: &[u8],
    cert_from: &Path,
    key_pem: &[u8],
    key_from: &Path,
    hostname: &str,
    meta: &CertificateDer<'static>,
) -> Result<LoadedCert, CertError> {
    let mut h = Sha256::new();
    h.update(cert_pem);
    h.update(key_pem);
    let fingerprint: [u8; 32] = h.finalize().into();

    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    for c in CertificateDer::pem_slice_iter(cert_pem) {
        chain.push(c.map_err(|e| CertError::NoCert {
            path: cert_from.to_path_buf(),
            detail: e.to_string(),
        })?);
    }
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCert {
            path: cert_from.to_path_buf(),
            detail: "the file holds no CERTIFICATE block".into(),
        });
    };
    let leaf_der = leaf.as_ref().to_vec();
    let info = inspect_leaf(&leaf_der).map_err(|detail| CertError::Parse {
        path: cert_from.to_path_buf(),
        detail,
    })?;
    if !info.names.iter().any(|n| n.matches(hostname)) {
        return Err(CertError::WrongName {
            path: cert_from.to_path_buf(),
            hostname: hostname.to_string(),
            names: info
                .names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::NoKey {
        path: key_from.to_path_buf(),
        detail: e.to_string(),
    })?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::KeyType {
            path: key_from.to_path_buf(),
            detail: e.to_string(),
        })?;
    chain.push(meta.clone());
    Ok(LoadedCert {
        certified: Arc::new(CertifiedKey::new(chain, signer)),
        leaf_der,
        self_signed: info.self_signed,
        not_before: info.not_before,
        not_after: info.not_after,
        fingerprint,
    })
}

/// A name a certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertName {
    Dns(String),
    Ip(IpAddr),
}

impl CertName {
    fn matches(&self, hostname: &str) -> bool {
        match (self, hostname.parse::<IpAddr>()) {
            (CertName::Ip(a), Ok(b)) => *a == b,
            (CertName::Dns(pat), Err(_)) => dns_matches(pat, hostname),
            _ => false,
        }
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertName::Dns(d) => f.write_str(d),
            CertName::Ip(i) => write!(f, "{i}"),
        }
    }
}

fn dns_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if let Some(rest) = pattern.strip_prefix("*.") {
        // A wildcard covers exactly one label.
        return host
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail == rest);
    }
    pattern == host
}

/// What the server needs to know about its leaf certificate.
struct LeafInfo {
    names: Vec<CertName>,
    self_signed: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The leaf's SAN names (or its CN when it has no SANs, for old certificates), whether it is
/// self-signed (issuer == subject), and its validity.
fn inspect_leaf(der: &[u8]) -> Result<LeafInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(CertName::Dns(d.to_string())),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        names.push(CertName::Ip(IpAddr::from(a)));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        names.push(CertName::Ip(IpAddr::from(a)));
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(match s.parse::<IpAddr>() {
                    Ok(ip) => CertName::Ip(ip),
                    Err(_) => CertName::Dns(s.to_string()),
                });
            }
        }
    }
    Ok(LeafInfo {
        names,
        self_signed: cert.issuer() == cert.subject(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// Go's SNI rule: a DNS `-hostname` needs that exact SNI; an IP `-hostname` takes any or none.
#[derive(Debug, Clone)]
pub enum SniPolicy {
    Exact(String),
    Any,
}

impl SniPolicy {
    pub fn for_hostname(h: &str) -> Self {
        if h.parse::<IpAddr>().is_ok() {
            SniPolicy::Any
        } else {
            SniPolicy::Exact(h.to_ascii_lowercase())
        }
    }
}

/// Answers TLS-ALPN-01 challenges (RFC 8737): a handshake offering only `acme-tls/1` gets the
/// challenge certificate for its SNI instead of the served one.
pub trait AlpnChallenges: Send + Sync + fmt::Debug {
    fn challenge_cert(&self, sni: &str) -> Option<Arc<CertifiedKey>>;
}

/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Serves the current certificate; a reload swaps it for new handshakes only. Under ACME there
/// may be none yet (the first order is under way): those handshakes fail until it arrives.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Option<Arc<LoadedCert>>>,
    policy: SniPolicy,
    challenges: Option<Arc<dyn AlpnChallenges>>,
}

impl CertResolver {
    pub fn new(initial: LoadedCert, policy: SniPolicy) -> Self {
        CertResolver {
            current: RwLock::new(Some(Arc::new(initial))),
            policy,
            challenges: None,
        }
    }

    /// A resolver whose certificate comes from ACME: `initial` from the cache, if any.
    pub fn for_acme(
        initial: Option<LoadedCert>,
        policy: SniPolicy,
        challenges: Arc<dyn AlpnChallenges>,
    ) -> Self {
        CertResolver {
            current: RwLock::new(initial.map(Arc::new)),
            policy,
            challenges: Some(challenges),
        }
    }

    pub fn current(&self) -> Option<Arc<LoadedCert>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace(&self, c: LoadedCert) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(c));
    }

    /// Whether handshakes may negotiate `acme-tls/1`.
    pub fn answers_alpn_challenges(&self) -> bool {
        self.challenges.is_some()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(ch) = &self.challenges {
            let mut alpn = hello.alpn().into_iter().flatten();
            // RFC 8737: the validation handshake offers acme-tls/1 and nothing else.
            if alpn.next() == Some(ACME_TLS_ALPN) && alpn.next().is_none() {
                return hello.server_name().and_then(|sni| ch.challenge_cert(sni));
            }
        }
        if let SniPolicy::Exact(want) = &self.policy {
            // Go: "cert mismatch with hostname" — the handshake fails.
            match hello.server_name() {
                Some(sni) if sni.eq_ignore_ascii_case(want) => {}
                _ => return None,
            }
        }
        self.current().map(|c| c.certified.clone())
    }
}

/// The rustls server config: TLS 1.2 and 1.3, ALPN `http/1.1` only (DERP needs HTTP/1.1
/// hijacking; Go clients send no ALPN at all).
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<rustls::ServerConfig> {
    let resolver_answers_challenges = resolver.answers_alpn_challenges();
    let mut provider = rustls::crypto::ring::default_provider();
    // Go's server order on AES hardware: AES-128-GCM first, chosen by the server whatever the
    // client prefers. Go clients already ask for it; rustls clients would otherwise get
    // AES-256-GCM, about a third more CPU per relayed byte on both ends.
    provider
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let mut cfg = match builder {
        Ok(b) => b.with_no_client_auth().with_cert_resolver(resolver),
        // The ring provider supports both versions; this cannot fail, but never panic.
        Err(_) => rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(resolver),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if resolver_answers_challenges {
        // Only a client offering nothing else gets it (rustls picks the first server protocol
        // the client offers), and the accept loop closes such connections after the handshake.
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    cfg.ignore_client_order = true;
    // Idle TLS state is most of a connection's memory: keep session tickets small and few.
    cfg.send_tls13_tickets = 1;
    Arc::new(cfg)
}

/// How often certificate files are checked for changes (cert-manager renews in place; a
/// Kubernetes Secret volume swaps a symlink). SIGHUP checks at once.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CertificateDer<'static> {
        meta_cert(&NodePublic([7; 32])).unwrap()
    }

    #[test]
    fn meta_cert_has_go_shape() {
        let der = meta();
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(c.raw_serial(), &[2]);
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, format!("derpkey{}", "07".repeat(32)));
        let exts = c.extensions();
        assert_eq!(exts.len(), 1, "exactly one extension");
        assert_eq!(exts[0].oid.to_id_string(), "2.5.29.19");
        assert!(exts[0].critical);
        assert_eq!(exts[0].value, &[0x30, 0x00]);
        assert_eq!(c.issuer(), c.subject());
    }

    #[test]
    fn self_signed_ip_cert_loads_and_pins() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let files = create_self_signed(dir.path(), ip).unwrap();
        assert!(files.cert.ends_with("127.0.0.1.crt"));
        let loaded = load(&files, "127.0.0.1", &meta()).unwrap();
        assert!(loaded.self_signed);
        assert_eq!(loaded.certified.cert.len(), 2, "leaf + metacert");
        assert!(pin_of(&loaded.leaf_der).starts_with("sha256-raw:"));
        assert_eq!(pin_of(&loaded.leaf_der).len(), 11 + 64);
        // Wrong host name is refused with a clear error.
        let err = load(&files, "10.0.0.1", &meta()).unwrap_err();
        assert!(
            err.to_string().contains("not valid for \"10.0.0.1\""),
            "{err}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn locate_prefers_go_names_then_secret_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            locate(dir.path(), "derp.example.com"),
            Err(CertError::Missing { .. })
        ));
        std::fs::write(dir.path().join("tls.crt"), "x").unwrap();
        std::fs::write(dir.path().join("tls.key"), "x").unwrap();
        assert!(
            locate(dir.path(), "derp.example.com")
                .unwrap()
                .cert
                .ends_with("tls.crt")
        );
        std::fs::write(dir.path().join("derp.example.com.crt"), "x").unwrap();
        std::fs::write(dir.path().join("derp.example.com.key"), "x").unwrap();
        assert!(
            locate(dir.path(), "derp.example.com")
                .unwrap()
                .cert
                .ends_with("derp.example.com.crt")
        );
        assert_eq!(sanitize_hostname("fe80::1%eth0"), "fe801eth0");
    }

    #[test]
    fn wildcard_and_case_rules() {
        assert!(dns_matches("*.example.com", "derp.example.com"));
        assert!(!dns_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_matches("*.example.com", "example.com"));
        assert!(dns_matches("DERP.example.com", "derp.EXAMPLE.com."));
    }
}
