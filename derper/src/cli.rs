//! The command line, compatible with Go's derper: the same flag names and meanings, written
//! Go's way (`-a :443`, `-hostname=x`, `-stun=false`) or `--a=:443`, and the environment
//! variables of the classic Docker recipe (`DERP_DOMAIN`, `DERP_ADDR=12345`, ...). The few Go flags
//! we do not implement (setec secrets, unpublished bootstrap names, `-ace`) are recognised and
//! refused, never silently ignored.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::config::{Config, MapConfig, TlsMode};
use crate::derp::DerpConfig;
use crate::http::HomePage;

/// Go's strconv.ParseBool.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean {s:?} (use true or false)")),
    }
}

/// A DERP relay and STUN server for Tailscale clients; a drop-in for Tailscale's Go derper.
#[derive(Parser, Debug)]
#[command(name = "derper", version, about, long_about = None)]
pub struct Cli {
    /// Listen address: ":port", "ip:port" or "[ip6]:port". TLS is served when the port is 443 or
    /// -certmode=manual. DERP_ADDR may be a bare port ("12345").
    #[arg(long = "a", env = "DERP_ADDR", default_value = ":443")]
    pub addr: String,
    /// Host name (or IP) this server is reached at: certificate lookup, SNI check, map entry.
    #[arg(long, env = "DERP_DOMAIN", default_value = "derp.tailscale.com")]
    pub hostname: String,
    /// "manual" reads <certdir>/<hostname>.crt/.key (or tls.crt/tls.key); "letsencrypt" and
    /// "gcp" order and renew the certificate over ACME (TLS only on port 443, as Go).
    #[arg(long, env = "DERP_CERT_MODE", default_value = "letsencrypt")]
    pub certmode: String,
    /// Certificate directory, also ACME's cache (default: the user cache dir +
    /// /tailscale/derper-certs, as Go; /app/certs in the derper image).
    #[arg(long, env = "DERP_CERT_DIR")]
    pub certdir: Option<PathBuf>,
    /// Server key file in Go's JSON format; created (0600) if missing. Required unless root.
    #[arg(short = 'c', long = "c", env = "DERP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Run the STUN server.
    #[arg(long, env = "DERP_STUN", default_value = "true", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub stun: bool,
    /// UDP port for STUN.
    #[arg(long = "stun-port", env = "DERP_STUN_PORT", default_value_t = 3478)]
    pub stun_port: u16,
    /// Plain-HTTP port served next to TLS (captive-portal checks, redirect); -1 disables.
    #[arg(
        long = "http-port",
        env = "DERP_HTTP_PORT",
        default_value_t = 80,
        allow_negative_numbers = true
    )]
    pub http_port: i64,
    /// Serve DERP (false answers /derp with 404).
    #[arg(long, env = "DERP_DERP", default_value = "true", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub derp: bool,
    /// The / page: "" (default page), "blank", or an http(s):// URL to redirect to.
    #[arg(long, env = "DERP_HOME", default_value = "")]
    pub home: String,
    /// Comma list of names answered on /bootstrap-dns.
    #[arg(
        long = "bootstrap-dns-names",
        env = "DERP_BOOTSTRAP_DNS_NAMES",
        default_value = ""
    )]
    pub bootstrap_dns_names: String,
    /// Development mode: listen on :3340 with a random key.
    #[arg(long, default_value = "false", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub dev: bool,
    /// TCP keepalive idle time (Go duration, e.g. 10m).
    #[arg(long = "tcp-keepalive-time", default_value = "10m", value_parser = go_duration::parse)]
    pub tcp_keepalive_time: Duration,
    /// TCP_USER_TIMEOUT for client connections.
    #[arg(long = "tcp-user-timeout", default_value = "15s", value_parser = go_duration::parse)]
    pub tcp_user_timeout: Duration,
    /// Write deadline per write to a regular client; 0 disables.
    #[arg(long = "tcp-write-timeout", default_value = "2s", value_parser = go_duration::parse)]
    pub tcp_write_timeout: Duration,

    // ---- derp-fleet's own flags ----
    /// Prometheus /metrics plus /healthz and /readyz, plain HTTP (e.g. 127.0.0.1:9731). Off by
    /// default so nothing is exposed by surprise.
    #[arg(long = "metrics-addr", env = "DERPER_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Packets queued per client (disco and other each) before the oldest is dropped.
    #[arg(
        long = "send-queue-depth",
        env = "TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH",
        default_value_t = 32
    )]
    pub send_queue_depth: usize,
    /// Most STUN responses per second (0 = unlimited).
    #[arg(
        long = "stun-rate-limit",
        env = "DERPER_STUN_RATE_LIMIT",
        default_value_t = 200_000.0
    )]
    pub stun_rate_limit: f64,
    /// Print this server's DERP map (json, or yaml for Headscale's derp.paths) and exit.
    #[arg(long = "print-derpmap", num_args = 0..=1, require_equals = true, default_missing_value = "json", value_parser = ["json", "yaml"])]
    pub print_derpmap: Option<String>,
    /// Region id for the printed map (900-999 are meant for self-hosting).
    #[arg(long = "region-id", env = "DERPER_REGION_ID", default_value_t = 900)]
    pub region_id: u32,
    /// Region code for the printed map (shown by `tailscale netcheck`).
    #[arg(
        long = "region-code",
        env = "DERPER_REGION_CODE",
        default_value = "derp"
    )]
    pub region_code: String,
    /// Region name for the printed map.
    #[arg(
        long = "region-name",
        env = "DERPER_REGION_NAME",
        default_value = "Self-hosted DERP"
    )]
    pub region_name: String,
    /// Node name for the printed map (default: <region-id>a).
    #[arg(long = "node-name", env = "DERPER_NODE_NAME")]
    pub node_name: Option<String>,
    /// IPv4 address for the printed map (default: the hostname if it is an IPv4 address).
    #[arg(long = "ipv4", env = "DERPER_IPV4")]
    pub ipv4: Option<String>,
    /// IPv6 address for the printed map (default: the hostname if it is an IPv6 address).
    #[arg(long = "ipv6", env = "DERPER_IPV6")]
    pub ipv6: Option<String>,
    /// Print `InsecureForTests: true` instead of pinning the self-signed certificate (for
    /// Tailscale clients older than 1.82, which do not understand `sha256-raw:` pins).
    #[arg(long = "insecure-for-tests", default_value = "false", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub insecure_for_tests: bool,

    // ---- Mesh, admission, limits and shutdown ----
    /// File holding the region's mesh key (64 hex digits). Default: /home/derp/keys/derp-mesh.key
    /// or $HOME/keys/derp-mesh.key if one exists, as Go.
    #[arg(long = "mesh-psk-file", env = "DERP_MESH_PSK_FILE")]
    pub mesh_psk_file: Option<PathBuf>,
    /// Comma list of the region's other servers: host[:port] or host/dialhost.
    #[arg(long = "mesh-with", env = "DERP_MESH_WITH", default_value = "")]
    pub mesh_with: String,
    /// A file of mesh peers (one per line, # comments), re-read when it changes: peers are
    /// added and dropped without a restart.
    #[arg(long = "mesh-with-file", env = "DERP_MESH_WITH_FILE")]
    pub mesh_with_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for mesh peers' TLS, in addition to the system roots.
    #[arg(long = "mesh-ca-file", env = "DERP_MESH_CA_FILE")]
    pub mesh_ca_file: Option<PathBuf>,
    /// Admit only clients the local tailscaled knows (through its LocalAPI socket).
    #[arg(long = "verify-clients", env = "DERP_VERIFY_CLIENTS", default_value = "false", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub verify_clients: bool,
    /// Admission URL: POSTed {"NodePublic","Source"}, answers {"Allow": bool} (Headscale: /verify).
    #[arg(
        long = "verify-client-url",
        env = "DERP_VERIFY_CLIENT_URL",
        default_value = ""
    )]
    pub verify_client_url: String,
    /// Admit clients when the admission URL cannot be reached. Go's default is true; ours is
    /// false (fail closed).
    #[arg(long = "verify-client-url-fail-open", env = "DERP_VERIFY_CLIENT_URL_FAIL_OPEN", default_value = "false", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub verify_client_url_fail_open: bool,
    /// tailscaled's LocalAPI socket for -verify-clients (default /var/run/tailscale/tailscaled.sock).
    #[arg(long = "socket", env = "DERP_TAILSCALED_SOCKET", default_value = "")]
    pub socket: String,
    /// New connections accepted per second at most (Go's name); over it they are closed.
    #[arg(long = "accept-connection-limit", default_value_t = f64::INFINITY)]
    pub accept_connection_limit: f64,
    /// Burst for -accept-connection-limit.
    #[arg(long = "accept-connection-burst", default_value_t = i64::MAX)]
    pub accept_connection_burst: i64,
    /// Per-client receive rate limit JSON file (Go's format), re-read on SIGHUP.
    #[arg(long = "rate-config", env = "DERP_RATE_CONFIG")]
    pub rate_config: Option<PathBuf>,
    /// Open TCP connections at most (0 = unlimited); past it new connections are closed.
    #[arg(
        long = "max-connections",
        env = "DERPER_MAX_CONNECTIONS",
        default_value_t = 0
    )]
    pub max_connections: usize,
    /// How long SIGTERM waits for clients to take their Restarting frame and leave.
    #[arg(long = "shutdown-timeout", env = "DERPER_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = go_duration::parse)]
    pub shutdown_timeout: Duration,
    /// Bind the public, port-80, metrics and STUN sockets with SO_REUSEPORT, so a new derper can
    /// start beside this one on the same ports (a surge rollout) and take over its clients.
    #[arg(long = "reuse-port", env = "DERP_REUSE_PORT", default_value = "false", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub reuse_port: bool,
    /// With --reuse-port: how long SIGTERM keeps serving while no other derper listens on the
    /// DERP port, before its clients are moved anyway.
    #[arg(long = "handoff-wait", env = "DERPER_HANDOFF_WAIT", default_value = "2s", value_parser = go_duration::parse)]
    pub handoff_wait: Duration,

    // ---- Go flags we do not implement: recognised and refused by name (refuse_unsupported) ----
    #[arg(long = "secrets-url", hide = true)]
    pub secrets_url: Option<String>,
    #[arg(long = "secrets-path-prefix", hide = true)]
    pub secrets_path_prefix: Option<String>,
    #[arg(long = "secrets-cache-dir", hide = true)]
    pub secrets_cache_dir: Option<String>,
    #[arg(long = "unpublished-bootstrap-dns-names", hide = true)]
    pub unpublished_bootstrap_dns_names: Option<String>,

    // ---- ACME (-certmode letsencrypt / gcp) ----
    /// ACME External Account Binding key id (required by -certmode gcp).
    #[arg(long = "acme-eab-kid", env = "DERP_ACME_EAB_KID")]
    pub acme_eab_kid: Option<String>,
    /// ACME External Account Binding HMAC key, base64 or base64url (required by -certmode gcp).
    #[arg(
        long = "acme-eab-key",
        env = "DERP_ACME_EAB_KEY",
        hide_env_values = true
    )]
    pub acme_eab_key: Option<String>,
    /// ACME account contact email (required by -certmode gcp).
    #[arg(long = "acme-email", env = "DERP_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// With an IP -hostname and -certmode letsencrypt: a short-lived Let's Encrypt certificate
    /// for that IP, validated over HTTP-01 on -http-port.
    #[arg(long = "acme-ip-certs", env = "DERP_ACME_IP_CERTS", default_value = "false", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub acme_ip_certs: bool,
    /// ACME directory URL (default: Let's Encrypt for letsencrypt, Google Trust Services for gcp).
    #[arg(long = "acme-directory-url", env = "DERP_ACME_DIRECTORY_URL")]
    pub acme_directory_url: Option<String>,
    /// CA certificates (PEM) trusted for the ACME directory's HTTPS, besides the system roots.
    #[arg(long = "acme-ca-file", env = "DERP_ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,
    /// Go's CONNECT proxy: refused by name (refuse_unsupported).
    #[arg(long = "ace", hide = true, value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub ace: Option<bool>,
}

/// Go's decodeEABKey: base64url without padding (the ACME spec), else standard base64.
fn decode_eab_key(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(s))
        .ok()
}

/// Boolean flags: in Go they never take a separate value (`-stun false` is not `-stun=false`).
const BOOL_FLAGS: &[&str] = &[
    "stun",
    "derp",
    "dev",
    "version",
    "help",
    "insecure-for-tests",
    "verify-clients",
    "verify-client-url-fail-open",
    "acme-ip-certs",
    "ace",
];

/// Rewrites Go-style single-dash long flags (`-hostname=x`, `-a :443`) to clap's `--` form,
/// leaving flag values (including negative numbers like `-http-port -1`) alone.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let mut out = Vec::new();
    let mut iter = args.into_iter();
    if let Some(prog) = iter.next() {
        out.push(prog);
    }
    let mut expect_value = false;
    let mut rest_verbatim = false;
    for a in iter {
        if rest_verbatim || expect_value {
            expect_value = false;
            out.push(a);
            continue;
        }
        if a == "--" {
            rest_verbatim = true;
            out.push(a);
            continue;
        }
        let is_flag =
            a.starts_with('-') && a.len() > 1 && !a[1..].starts_with(|c: char| c.is_ascii_digit());
        if !is_flag {
            out.push(a);
            continue;
        }
        let long = if a.starts_with("--") {
            a.clone()
        } else {
            format!("-{a}")
        };
        let name = long[2..].split('=').next().unwrap_or("");
        if !long.contains('=') && !BOOL_FLAGS.contains(&name) && name != "V" && name != "h" {
            expect_value = true;
        }
        out.push(match name {
            "version" => "--version".into(),
            "help" | "h" => "--help".into(),
            _ => long,
        });
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("{flag}: {message}")]
    Refused { flag: &'static str, message: String },
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

fn refused(flag: &'static str, what: &str) -> CliError {
    CliError::Refused {
        flag,
        message: format!(
            "{what} is not implemented in this derper yet; remove the flag (it is recognised so it is never silently ignored)"
        ),
    }
}

/// Parses `-a`: `:443`, `ip:port`, `[v6]:port`, or (DERP_ADDR) a bare port.
pub fn parse_listen(s: &str) -> Result<(Option<IpAddr>, u16), CliError> {
    let inv = |m: String| CliError::Invalid {
        flag: "-a",
        message: m,
    };
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return s
            .parse()
            .map(|p| (None, p))
            .map_err(|_| inv(format!("bad port {s:?}")));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| {
        inv(format!(
            "{s:?} is not host:port (e.g. :443 or 127.0.0.1:8443)"
        ))
    })?;
    let port: u16 = match port {
        "https" => 443,
        "http" => 80,
        p => p
            .parse()
            .map_err(|_| inv(format!("bad port {p:?} in {s:?}")))?,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Ok((None, port));
    }
    let ip = host.parse::<IpAddr>().map_err(|_| {
        inv(format!(
            "listen host {host:?} must be an IP address (or empty for all)"
        ))
    })?;
    Ok((Some(ip), port))
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn default_certdir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tailscale").join("derper-certs")
}

impl Cli {
    /// The mesh key and peers. Go's rules: a named key file that cannot be read is fatal, an
    /// empty one means no key, and peers without a key are an error.
    fn mesh_config(&self) -> Result<Option<crate::mesh::MeshConfig>, CliError> {
        let inv = |flag, message: String| CliError::Invalid { flag, message };
        let key = if self.dev {
            match std::env::var("TAILSCALE_DERPER_MESH_KEY") {
                Ok(v) if !v.trim().is_empty() => Some(
                    derp_proto::MeshKey::parse_hex(v.trim())
                        .map_err(|e| inv("TAILSCALE_DERPER_MESH_KEY", e.to_string()))?,
                ),
                _ => None,
            }
        } else {
            let path = self.mesh_psk_file.clone().or_else(|| {
                let mut candidates = vec![PathBuf::from("/home/derp/keys/derp-mesh.key")];
                if let Some(h) = std::env::var_os("HOME") {
                    candidates.push(PathBuf::from(h).join("keys/derp-mesh.key"));
                }
                candidates.into_iter().find(|p| p.exists())
            });
            match path {
                None => None,
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .map_err(|e| inv("-mesh-psk-file", format!("{}: {e}", p.display())))?;
                    derp_proto::MeshKey::parse_file_contents(&text).map_err(|e| {
                        inv(
                            "-mesh-psk-file",
                            format!("{}: {e} (expected 64 hex digits)", p.display()),
                        )
                    })?
                }
            }
        };
        let peers = self
            .mesh_with
            .split(',')
            .filter(|e| !e.trim().is_empty())
            .map(crate::mesh::parse_peer)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| inv("-mesh-with", e.to_string()))?;
        let Some(key) = key else {
            if !peers.is_empty() || self.mesh_with_file.is_some() {
                return Err(inv(
                    "-mesh-with",
                    "meshing needs the region's mesh key: give -mesh-psk-file".into(),
                ));
            }
            return Ok(None);
        };
        Ok(Some(crate::mesh::MeshConfig {
            key,
            peers,
            peers_file: self.mesh_with_file.clone(),
            ca_file: self.mesh_ca_file.clone(),
        }))
    }

    /// The ACME settings, checked as Go checks them.
    fn acme_config(&self) -> Result<crate::config::AcmeConfig, CliError> {
        use crate::config::{AcmeConfig, Eab, GCP_DIRECTORY, LETSENCRYPT_DIRECTORY};
        let inv = |flag, message: &str| CliError::Invalid {
            flag,
            message: message.into(),
        };
        let gcp = self.certmode == "gcp";
        let ip = self.hostname.parse::<IpAddr>().is_ok();
        if ip && gcp {
            return Err(inv(
                "-hostname",
                "-certmode gcp needs a DNS name as -hostname, not an IP address",
            ));
        }
        if ip && !self.acme_ip_certs {
            return Err(inv(
                "-hostname",
                "is an IP address: use -certmode manual for a self-signed certificate, or set -acme-ip-certs for a Let's Encrypt IP certificate",
            ));
        }
        if ip && self.http_port < 0 {
            return Err(inv(
                "-acme-ip-certs",
                "IP certificates are validated over HTTP-01: -http-port must not be -1",
            ));
        }
        if !ip && self.acme_ip_certs {
            return Err(CliError::Refused {
                flag: "-acme-ip-certs",
                message: "with a DNS -hostname (IP certificates for every local address on demand) is not implemented; give the server's IP as -hostname".into(),
            });
        }
        let some = |o: &Option<String>| {
            o.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
        };
        let (kid, key, email) = (
            some(&self.acme_eab_kid),
            some(&self.acme_eab_key),
            some(&self.acme_email),
        );
        let eab = match (kid, key) {
            (Some(kid), Some(key)) => Some(Eab {
                kid,
                key: decode_eab_key(&key)
                    .ok_or_else(|| inv("-acme-eab-key", "is not base64 or base64url"))?,
            }),
            (None, None) => None,
            _ => {
                return Err(inv(
                    "-acme-eab-kid",
                    "-acme-eab-kid and -acme-eab-key go together",
                ));
            }
        };
        if gcp && eab.is_none() {
            return Err(inv(
                "-certmode",
                "gcp requires -acme-eab-kid and -acme-eab-key",
            ));
        }
        if gcp && email.is_none() {
            return Err(inv("-certmode", "gcp requires -acme-email"));
        }
        let directory_url = some(&self.acme_directory_url).unwrap_or_else(|| {
            if gcp {
                GCP_DIRECTORY
            } else {
                LETSENCRYPT_DIRECTORY
            }
            .to_string()
        });
        if !directory_url.starts_with("https://") {
            return Err(inv(
                "--acme-directory-url",
                "must be an https:// URL (RFC 8555)",
            ));
        }
        Ok(AcmeConfig {
            certdir: self.certdir.clone().unwrap_or_else(default_certdir),
            directory_url,
            ca_file: self.acme_ca_file.clone(),
            email,
            eab,
            ip_certs: self.acme_ip_certs,
        })
    }

    /// Checks the flags and builds the server configuration.
    pub fn into_config(self) -> Result<Config, CliError> {
        self.refuse_unsupported()?;
        let mesh = self.mesh_config()?;
        let (listen_host, listen_port, tls) = self.listener()?;
        self.check_limits()?;
        Ok(Config {
            mesh,
            verify: self.verify_config(),
            rate_config: self.rate_config.clone(),
            accept_rate: self
                .accept_connection_limit
                .is_finite()
                .then_some(self.accept_connection_limit),
            accept_burst: u64::try_from(self.accept_connection_burst.max(1)).unwrap_or(1),
            max_connections: self.max_connections,
            shutdown_timeout: self.shutdown_timeout,
            reuse_port: self.reuse_port,
            handoff_wait: self.handoff_wait,
            restart_reconnect_in: Duration::ZERO,
            restart_try_for: Duration::from_secs(30),
            listen_host,
            listen_port,
            hostname: self.hostname.clone(),
            tls,
            key_file: self.key_file()?,
            stun_port: self.stun.then_some(self.stun_port),
            stun_rate_limit: self.stun_rate_limit.max(0.0),
            http_port: self.plain_http_port()?,
            derp_enabled: self.derp,
            home: self.home_page()?,
            bootstrap_dns_names: self
                .bootstrap_dns_names
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            metrics_addr: self.metrics_listen()?,
            derp: DerpConfig {
                send_queue_depth: self.send_queue_depth,
                write_timeout: Some(self.tcp_write_timeout).filter(|d| !d.is_zero()),
                ..DerpConfig::default()
            },
            tcp_keepalive_time: self.tcp_keepalive_time,
            tcp_user_timeout: self.tcp_user_timeout,
            map: MapConfig {
                region_id: self.region_id,
                region_code: self.region_code.clone(),
                region_name: self.region_name.clone(),
                node_name: self
                    .node_name
                    .clone()
                    .unwrap_or_else(|| format!("{}a", self.region_id)),
                ipv4: self.ipv4.clone(),
                ipv6: self.ipv6.clone(),
                insecure_for_tests: self.insecure_for_tests,
            },
        })
    }

    /// Go flags for features we do not have: refused by name, never silently ignored.
    fn refuse_unsupported(&self) -> Result<(), CliError> {
        let refusals: [(&'static str, bool, &str); 3] = [
            (
                "-secrets-url",
                self.secrets_url.is_some()
                    || self.secrets_path_prefix.is_some()
                    || self.secrets_cache_dir.is_some(),
                "the setec secret store",
            ),
            (
                "-unpublished-bootstrap-dns-names",
                self.unpublished_bootstrap_dns_names.is_some(),
                "unpublished bootstrap DNS names",
            ),
            ("-ace", self.ace == Some(true), "the CONNECT proxy (-ace)"),
        ];
        match refusals.iter().find(|(_, set, _)| *set) {
            Some((flag, _, what)) => Err(refused(flag, what)),
            None => Ok(()),
        }
    }

    /// Where to listen and whether with TLS: `-a`, `-dev` and `-certmode` together, as Go
    /// decides it (ACME only on port 443, plain HTTP elsewhere).
    fn listener(&self) -> Result<(Option<IpAddr>, u16, TlsMode), CliError> {
        let (mut listen_host, mut listen_port) = parse_listen(&self.addr)?;
        if self.dev {
            listen_host = None;
            listen_port = 3340;
        }
        let tls = match self.certmode.as_str() {
            "manual" => TlsMode::Manual {
                certdir: self.certdir.clone().unwrap_or_else(default_certdir),
            },
            "letsencrypt" | "gcp" if listen_port == 443 => TlsMode::Acme(self.acme_config()?),
            // Go serves plain HTTP when the port is not 443 and certmode is not manual.
            "letsencrypt" | "gcp" => TlsMode::Off,
            other => {
                return Err(CliError::Invalid {
                    flag: "-certmode",
                    message: format!("unknown mode {other:?}; use manual, letsencrypt or gcp"),
                });
            }
        };
        if self.acme_ip_certs && self.certmode != "letsencrypt" {
            return Err(CliError::Invalid {
                flag: "-acme-ip-certs",
                message: "requires -certmode letsencrypt".into(),
            });
        }
        Ok((listen_host, listen_port, tls))
    }

    /// The server key file (`-c`): required unless root (Go's default path) or `-dev`.
    fn key_file(&self) -> Result<Option<PathBuf>, CliError> {
        if self.dev {
            return Ok(None);
        }
        match &self.config {
            Some(p) => Ok(Some(p.clone())),
            None if running_as_root() => Ok(Some(PathBuf::from("/var/lib/derper/derper.key"))),
            None => Err(CliError::Invalid {
                flag: "-c",
                message: "-c <key file path> not specified (required when not running as root)"
                    .into(),
            }),
        }
    }

    fn home_page(&self) -> Result<HomePage, CliError> {
        match self.home.as_str() {
            "" => Ok(HomePage::Default),
            "blank" => Ok(HomePage::Blank),
            u if u.starts_with("http://") || u.starts_with("https://") => {
                Ok(HomePage::Redirect(u.into()))
            }
            other => Err(CliError::Invalid {
                flag: "-home",
                message: format!("{other:?} must be empty, \"blank\" or an http(s):// URL"),
            }),
        }
    }

    /// `-http-port`: the plain listener next to TLS; negative disables it.
    fn plain_http_port(&self) -> Result<Option<u16>, CliError> {
        if self.http_port < 0 {
            return Ok(None);
        }
        u16::try_from(self.http_port)
            .map(Some)
            .map_err(|_| CliError::Invalid {
                flag: "-http-port",
                message: format!("{} is not a port", self.http_port),
            })
    }

    fn metrics_listen(&self) -> Result<Option<SocketAddr>, CliError> {
        match self.metrics_addr.as_deref() {
            None | Some("") => Ok(None),
            Some(a) => {
                let (h, p) = parse_listen(a).map_err(|_| CliError::Invalid {
                    flag: "--metrics-addr",
                    message: format!("{a:?} is not ip:port"),
                })?;
                Ok(Some(SocketAddr::new(
                    h.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                    p,
                )))
            }
        }
    }

    fn check_limits(&self) -> Result<(), CliError> {
        if self.send_queue_depth == 0 || self.send_queue_depth > 4096 {
            return Err(CliError::Invalid {
                flag: "--send-queue-depth",
                message: "must be between 1 and 4096".into(),
            });
        }
        if self.accept_connection_limit.is_nan() || self.accept_connection_limit <= 0.0 {
            return Err(CliError::Invalid {
                flag: "-accept-connection-limit",
                message: "must be a positive number of connections per second".into(),
            });
        }
        Ok(())
    }

    fn verify_config(&self) -> crate::verify::VerifyConfig {
        crate::verify::VerifyConfig {
            url: Some(self.verify_client_url.clone()).filter(|u| !u.is_empty()),
            url_fail_open: self.verify_client_url_fail_open,
            tailscaled_socket: self.verify_clients.then(|| {
                if self.socket.is_empty() {
                    PathBuf::from(crate::verify::DEFAULT_TAILSCALED_SOCKET)
                } else {
                    PathBuf::from(&self.socket)
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let v = normalize_args(
            std::iter::once("derper")
                .chain(args.iter().copied())
                .map(String::from),
        );
        Cli::try_parse_from(v)
    }

    #[test]
    fn go_style_flags() {
        let c = parse(&[
            "-a",
            "127.0.0.1:8443",
            "-hostname=127.0.0.1",
            "-certmode",
            "manual",
            "-certdir",
            "/tmp/x",
            "-c",
            "/tmp/k",
            "-stun-port",
            "3479",
            "-http-port",
            "-1",
            "-stun=false",
        ])
        .unwrap();
        assert_eq!(c.addr, "127.0.0.1:8443");
        assert_eq!(c.hostname, "127.0.0.1");
        assert_eq!(c.http_port, -1);
        assert!(!c.stun);
        let cfg = c.into_config().unwrap();
        assert_eq!(cfg.http_port, None);
        assert_eq!(cfg.stun_port, None);
        assert!(matches!(cfg.tls, TlsMode::Manual { .. }));
        let c = parse(&["--a=:8443", "--stun", "-c=/k"]).unwrap();
        assert!(c.stun);
        assert_eq!(c.into_config().unwrap().listen_port, 8443);
    }

    #[test]
    fn unknown_and_refused_flags_name_the_flag() {
        let e = parse(&["-nosuchflag", "x"]).unwrap_err().to_string();
        assert!(e.contains("nosuchflag"), "{e}");
        let e = parse(&["-c", "/k", "-secrets-url", "https://x"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("-secrets-url: the setec secret store is not implemented"),
            "{e}"
        );
        let e = parse(&["-a", ":443", "-c", "/k", "-certmode", "gcp"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(e.to_string().starts_with("-certmode: gcp requires"), "{e}");
        let e = parse(&["-a", ":443", "-c", "/k", "-certmode", "bogus"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(e.to_string().starts_with("-certmode:"), "{e}");
        let e = parse(&["-a", ":8443", "-c", "/k", "-home", "ftp://x"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(e.to_string().starts_with("-home:"), "{e}");
    }

    #[test]
    fn acme_flags_as_go_checks_them() {
        use crate::config::{GCP_DIRECTORY, LETSENCRYPT_DIRECTORY};
        let acme = |args: &[&str]| {
            let mut v = vec!["-a", ":443", "-c", "/k"];
            v.extend_from_slice(args);
            parse(&v).unwrap().into_config()
        };
        // Go's default: letsencrypt for derp.tailscale.com, TLS on 443.
        let TlsMode::Acme(a) = acme(&["-certdir", "/certs"]).unwrap().tls else {
            panic!("letsencrypt on :443 is ACME")
        };
        assert_eq!(a.directory_url, LETSENCRYPT_DIRECTORY);
        assert_eq!(a.certdir, PathBuf::from("/certs"));
        assert!(a.eab.is_none() && a.email.is_none() && !a.ip_certs);
        // Not on 443: plain HTTP, as Go.
        let c = parse(&["-a", ":8080", "-c", "/k"])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(matches!(c.tls, TlsMode::Off));
        // gcp: EAB and email required; both key encodings accepted.
        let TlsMode::Acme(a) = acme(&[
            "-certmode=gcp",
            "-hostname=derp.example.com",
            "-acme-eab-kid=kid-1",
            "-acme-eab-key=zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
            "-acme-email=ops@example.com",
        ])
        .unwrap()
        .tls
        else {
            panic!("gcp is ACME")
        };
        assert_eq!(a.directory_url, GCP_DIRECTORY);
        assert_eq!(a.eab.as_ref().unwrap().key.len(), 48);
        assert_eq!(decode_eab_key("aGk=").unwrap(), b"hi");
        let e = acme(&[
            "-certmode=gcp",
            "-hostname=d.example.com",
            "-acme-email=a@b",
        ]);
        assert!(e.unwrap_err().to_string().contains("-acme-eab-kid"));
        let e = acme(&["-acme-eab-kid=k", "-hostname=d.example.com"]).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        // IP hostnames: refused unless -acme-ip-certs, as Go says.
        let e = acme(&["-hostname=192.0.2.1"]).unwrap_err().to_string();
        assert!(e.contains("-acme-ip-certs") && e.contains("manual"), "{e}");
        let TlsMode::Acme(a) = acme(&["-hostname=192.0.2.1", "-acme-ip-certs"])
            .unwrap()
            .tls
        else {
            panic!("IP certs are ACME")
        };
        assert!(a.ip_certs);
        let e = acme(&["-hostname=192.0.2.1", "-acme-ip-certs", "-http-port", "-1"]).unwrap_err();
        assert!(e.to_string().contains("HTTP-01"), "{e}");
        let e = acme(&["-certmode=manual", "-acme-ip-certs"]).unwrap_err();
        assert!(
            e.to_string().contains("requires -certmode letsencrypt"),
            "{e}"
        );
        // Directory and CA overrides.
        let TlsMode::Acme(a) = acme(&[
            "--acme-directory-url=https://pebble:14000/dir",
            "--acme-ca-file=/ca.pem",
        ])
        .unwrap()
        .tls
        else {
            panic!()
        };
        assert_eq!(a.directory_url, "https://pebble:14000/dir");
        assert_eq!(a.ca_file, Some(PathBuf::from("/ca.pem")));
        assert!(acme(&["--acme-directory-url=http://x/dir"]).is_err());
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen(":443").unwrap(), (None, 443));
        assert_eq!(parse_listen("12345").unwrap(), (None, 12345));
        assert_eq!(
            parse_listen("[::1]:8443").unwrap(),
            (Some("::1".parse().unwrap()), 8443)
        );
        assert_eq!(
            parse_listen("127.0.0.1:https").unwrap(),
            (Some("127.0.0.1".parse().unwrap()), 443)
        );
        assert!(parse_listen("example.com:443").is_err());
        assert!(parse_listen("nonsense").is_err());
    }

    #[test]
    fn duration_flags_use_go_syntax() {
        let cli = Cli::try_parse_from(["derper", "--tcp-keepalive-time", "1h30m"]).unwrap();
        assert_eq!(cli.tcp_keepalive_time, Duration::from_secs(5400));
        let err = Cli::try_parse_from(["derper", "--tcp-user-timeout", "99999999999999999999h"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range"), "{err}");
    }
}
