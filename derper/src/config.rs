//! The server's configuration as plain data: the library never sees command-line types.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::derp::DerpConfig;
use crate::http::HomePage;

/// How the public listener is secured.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// Plain HTTP (Go: port not 443 and no `-certmode manual`).
    Off,
    /// Certificates from `certdir` (Go's `-certmode manual`), reloaded on change.
    Manual { certdir: PathBuf },
    /// Certificates ordered and renewed over ACME (Go's `-certmode letsencrypt` and `gcp`).
    Acme(AcmeConfig),
}

/// Let's Encrypt directory, Go's default for `-certmode letsencrypt`.
pub const LETSENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Google Trust Services' directory, Go's fixed one for `-certmode gcp`.
pub const GCP_DIRECTORY: &str = "https://dv.acme-v02.api.pki.goog/directory";

/// An ACME external account binding (`-acme-eab-kid`, `-acme-eab-key`).
#[derive(Clone)]
pub struct Eab {
    pub kid: String,
    /// The decoded HMAC key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Eab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// How certificates are ordered over ACME.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// Account, certificates and keys live here, so a restart does not order again.
    pub certdir: PathBuf,
    pub directory_url: String,
    /// A CA (PEM) trusted for the directory's HTTPS besides the system roots (private CAs,
    /// tests).
    pub ca_file: Option<PathBuf>,
    pub email: Option<String>,
    pub eab: Option<Eab>,
    /// `-acme-ip-certs`: an IP `-hostname` gets a short-lived IP certificate over HTTP-01.
    pub ip_certs: bool,
}

/// What `--print-derpmap` and the startup log say about this node.
#[derive(Debug, Clone)]
pub struct MapConfig {
    pub region_id: u32,
    pub region_code: String,
    pub region_name: String,
    pub node_name: String,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    /// Print `InsecureForTests: true` instead of a `sha256-raw:` pin (clients before 1.82).
    pub insecure_for_tests: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Host of `-a`; `None` listens on every interface (dual-stack).
    pub listen_host: Option<IpAddr>,
    pub listen_port: u16,
    pub hostname: String,
    pub tls: TlsMode,
    /// Server key file; `None` uses a random key (dev mode).
    pub key_file: Option<PathBuf>,
    /// STUN UDP port; `None` disables STUN.
    pub stun_port: Option<u16>,
    /// Responses per second the STUN server sends at most (0 = unlimited).
    pub stun_rate_limit: f64,
    /// Plain-HTTP port next to TLS (Go's `-http-port`); `None` disables it.
    pub http_port: Option<u16>,
    pub derp_enabled: bool,
    pub home: HomePage,
    pub bootstrap_dns_names: Vec<String>,
    /// Prometheus and health endpoints, off the public port.
    pub metrics_addr: Option<SocketAddr>,
    pub derp: DerpConfig,
    pub tcp_keepalive_time: Duration,
    pub tcp_user_timeout: Duration,
    pub map: MapConfig,
    pub verify: crate::verify::VerifyConfig,
    /// Go's `-rate-config` JSON file; re-read on SIGHUP.
    pub rate_config: Option<PathBuf>,
    /// New connections per second (Go's `-accept-connection-limit`); `None` is unlimited.
    pub accept_rate: Option<f64>,
    pub accept_burst: u64,
    /// Open TCP connections at most (0 = unlimited); past it new ones are closed at once.
    pub max_connections: usize,
    /// How long shutdown waits for clients to take their Restarting frame and go.
    pub shutdown_timeout: Duration,
    /// SO_REUSEPORT on every listening socket (`--reuse-port`): a successor may bind beside us.
    pub reuse_port: bool,
    /// With `reuse_port`: how long shutdown waits for a successor to listen before it moves the
    /// clients anyway (they would find nobody on this address).
    pub handoff_wait: Duration,
    /// What the Restarting frame tells clients: reconnect after this, keep trying for that.
    pub restart_reconnect_in: Duration,
    pub restart_try_for: Duration,
    /// Meshing with the region's other servers; `None` without a mesh key.
    pub mesh: Option<crate::mesh::MeshConfig>,
}

impl Config {
    /// A configuration for tests and embedding: plain HTTP on 127.0.0.1 with ephemeral ports.
    pub fn for_tests() -> Self {
        Config {
            listen_host: Some(IpAddr::from([127, 0, 0, 1])),
            listen_port: 0,
            hostname: "127.0.0.1".into(),
            tls: TlsMode::Off,
            key_file: None,
            stun_port: Some(0),
            stun_rate_limit: 0.0,
            http_port: None,
            derp_enabled: true,
            home: HomePage::Default,
            bootstrap_dns_names: Vec::new(),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            derp: DerpConfig::default(),
            tcp_keepalive_time: Duration::from_secs(600),
            tcp_user_timeout: Duration::from_secs(15),
            map: MapConfig {
                region_id: 900,
                region_code: "test".into(),
                region_name: "Test".into(),
                node_name: "900a".into(),
                ipv4: None,
                ipv6: None,
                insecure_for_tests: false,
            },
            verify: crate::verify::VerifyConfig {
                url: None,
                url_fail_open: false,
                tailscaled_socket: None,
            },
            rate_config: None,
            accept_rate: None,
            accept_burst: u64::MAX,
            max_connections: 0,
            shutdown_timeout: Duration::from_secs(5),
            reuse_port: false,
            handoff_wait: Duration::from_secs(2),
            restart_reconnect_in: Duration::ZERO,
            restart_try_for: Duration::from_secs(30),
            mesh: None,
        }
    }
}
