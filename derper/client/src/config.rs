//! What a client connects to and how: [`ClientConfig`] (from a URL or a DERP-map node), the
//! transport and address-family choices, and the URL parsing that turns it into a dial target.

use std::net::IpAddr;
use std::time::Duration;

use derp_proto::derpmap::{DerpNode, SHA256_RAW_PREFIX};
use derp_proto::{MeshKey, NodePrivate};

use crate::ClientError;
use crate::tls::TlsTrust;

/// Go's `derphttp` bounds DNS + TCP + TLS + HTTP + ClientInfo together by 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Go's client declares the connection dead after 120 s without any frame (servers send a
/// KeepAlive every 60-65 s).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// A flush that takes longer than this breaks the connection; 5 s is Go's mesh forward timeout.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How DERP bytes are carried after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// `Upgrade: DERP`, the raw byte stream (what native Go clients use).
    #[default]
    Derp,
    /// `Upgrade: websocket` with subprotocol `derp`, binary messages (the js/wasm client).
    WebSocket,
}

/// Which addresses to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddrFamily {
    #[default]
    Any,
    V4,
    V6,
}

impl AddrFamily {
    pub(crate) fn allows(self, ip: &IpAddr) -> bool {
        match self {
            AddrFamily::Any => true,
            AddrFamily::V4 => ip.is_ipv4(),
            AddrFamily::V6 => ip.is_ipv6(),
        }
    }
}

/// Everything needed to connect one client. Fields are public; [`ClientConfig::new`] and
/// [`ClientConfig::for_node`] fill in Go's defaults. Debug output shows no secrets.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `https://host[:port]/derp` or `http://host[:port]/derp`.
    pub url: String,
    pub private_key: NodePrivate,
    pub mesh_key: Option<MeshKey>,
    pub is_prober: bool,
    pub can_ack_pings: bool,
    /// Sent as ClientInfo `AppName` when non-empty.
    pub app_name: String,
    pub tls: TlsTrust,
    /// SNI (and default verification name); defaults to the URL host. Go uses `CertName` here
    /// when `HostName` is an IP literal.
    pub tls_server_name: Option<String>,
    /// Verify the certificate for this DNS name instead of the SNI (Go's `CertName` when it is a
    /// DNS name differing from a DNS `HostName`). Ignored with pinned or insecure trust.
    pub cert_name: Option<String>,
    /// Dial this host or `host:port` instead of the URL host (mesh `host/dialhost`); SNI and
    /// `Host:` still come from the URL. A missing port means the URL's port.
    pub dial_addr: Option<String>,
    pub addr_family: AddrFamily,
    /// Bound on the whole connect: DNS, TCP, TLS, upgrade and handshake up to ServerInfo.
    pub connect_timeout: Duration,
    /// Sends `Ideal-Node: <name>` (Go does when connected to a node other than the region's first).
    pub ideal_node: Option<String>,
    /// Use fast start when a TLS 1.3 server presents a metacert (as Go always does).
    pub fast_start: bool,
    pub transport: Transport,
    /// Send NotePreferred(true) right after ClientInfo, as tailscaled does for its home region.
    pub preferred: bool,
    /// Send WatchConns right after ClientInfo (mesh peers and watchers).
    pub watch_conns: bool,
    /// `recv` fails after this long without a frame; `None` waits forever.
    pub read_timeout: Option<Duration>,
    /// A write or flush that takes longer breaks the connection; `None` waits forever.
    pub write_timeout: Option<Duration>,
}

impl ClientConfig {
    /// A regular client (`CanAckPings: false`, like Go's `derphttp.NewClient`) with Web PKI trust.
    pub fn new(url: impl Into<String>, private_key: NodePrivate) -> Self {
        ClientConfig {
            url: url.into(),
            private_key,
            mesh_key: None,
            is_prober: false,
            can_ack_pings: false,
            app_name: String::new(),
            tls: TlsTrust::WebPki,
            tls_server_name: None,
            cert_name: None,
            dial_addr: None,
            addr_family: AddrFamily::Any,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ideal_node: None,
            fast_start: true,
            transport: Transport::Derp,
            preferred: false,
            watch_conns: false,
            read_timeout: Some(DEFAULT_READ_TIMEOUT),
            write_timeout: Some(DEFAULT_WRITE_TIMEOUT),
        }
    }

    /// A client for one node of a DERP map, as `derphttp` dials it: `https://HostName[:DERPPort]/derp`,
    /// TCP to the node's `IPv4`/`IPv6` literal of the wanted family when set (else DNS of
    /// `HostName`), trust from `InsecureForTests` / `CertName`.
    pub fn for_node(
        node: &DerpNode,
        family: AddrFamily,
        private_key: NodePrivate,
    ) -> Result<Self, ClientError> {
        if node.stun_only {
            return Err(ClientError::Config(format!(
                "node {:?} is STUN-only",
                node.name
            )));
        }
        if node.host_name.is_empty() {
            return Err(ClientError::Config(format!(
                "node {:?} has no HostName",
                node.name
            )));
        }
        let port = match node.derp_port {
            0 => 443,
            p => u16::try_from(p)
                .map_err(|_| ClientError::Config(format!("DERPPort {p} out of range")))?,
        };
        let host_ip = node.host_name.parse::<IpAddr>().ok();
        let host = match host_ip {
            Some(IpAddr::V6(_)) => format!("[{}]", node.host_name),
            _ => node.host_name.clone(),
        };
        let url = if port == 443 {
            format!("https://{host}/derp")
        } else {
            format!("https://{host}:{port}/derp")
        };
        let mut cfg = ClientConfig::new(url, private_key);
        cfg.addr_family = family;
        // An IP field of "none" disables that family for the node (tailcfg semantics).
        let literal = |s: &str| -> Result<Option<IpAddr>, ClientError> {
            match s {
                "" => Ok(None),
                "none" => Err(ClientError::Config(format!(
                    "node {:?} disables this address family",
                    node.name
                ))),
                s => s
                    .parse::<IpAddr>()
                    .map(Some)
                    .map_err(|_| ClientError::Config(format!("node IP {s:?} is not an IP"))),
            }
        };
        let dial_ip = match family {
            AddrFamily::V4 => literal(&node.ipv4)?,
            AddrFamily::V6 => literal(&node.ipv6)?,
            AddrFamily::Any => literal(&node.ipv4)
                .ok()
                .flatten()
                .or(literal(&node.ipv6).ok().flatten()),
        };
        cfg.dial_addr = dial_ip.map(|ip| std::net::SocketAddr::new(ip, port).to_string());
        if node.insecure_for_tests {
            cfg.tls = TlsTrust::Insecure;
        } else if node.cert_name.starts_with(SHA256_RAW_PREFIX) {
            cfg.tls = TlsTrust::from_sha256_raw(&node.cert_name)?;
        } else if !node.cert_name.is_empty() {
            if host_ip.is_some() {
                cfg.tls_server_name = Some(node.cert_name.clone());
            } else {
                cfg.cert_name = Some(node.cert_name.clone());
            }
        }
        Ok(cfg)
    }
}

/// A parsed DERP URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub tls: bool,
    /// Host without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `Host:` header value: the URL's authority as written.
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target, ClientError> {
        let bad = |why: &str| ClientError::Config(format!("URL {url:?}: {why}"));
        let uri: http::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") | Some("wss") => true,
            Some("http") | Some("ws") => false,
            _ => return Err(bad("scheme must be https or http")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_owned();
        Ok(Target {
            tls,
            host,
            port,
            authority: authority.as_str().to_owned(),
            path_and_query,
        })
    }
}

/// Splits `host[:port]` / `[v6][:port]` / bare v6 into host and port (default `port`).
pub(crate) fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), ClientError> {
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Ok((s.to_owned(), default_port));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return Ok((inner.to_owned(), default_port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => {
            let port = p
                .parse::<u16>()
                .map_err(|_| ClientError::Config(format!("dial address {s:?}: bad port")))?;
            Ok((h.to_owned(), port))
        }
        None => Ok((s.to_owned(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("https://derp.example.com/derp").unwrap();
        assert_eq!(
            t,
            Target {
                tls: true,
                host: "derp.example.com".into(),
                port: 443,
                authority: "derp.example.com".into(),
                path_and_query: "/derp".into(),
            }
        );
        let t = Target::parse("http://127.0.0.1:3340/derp").unwrap();
        assert!(!t.tls);
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 3340));
        assert_eq!(t.authority, "127.0.0.1:3340");
        let t = Target::parse("https://[::1]:8443/derp").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8443));
        assert_eq!(t.authority, "[::1]:8443");
        assert!(Target::parse("ftp://x/derp").is_err());
        assert!(Target::parse("derp").is_err());
    }

    #[test]
    fn splits_dial_addresses() {
        assert_eq!(split_host_port("h", 443).unwrap(), ("h".into(), 443));
        assert_eq!(split_host_port("h:8443", 443).unwrap(), ("h".into(), 8443));
        assert_eq!(split_host_port("::1", 443).unwrap(), ("::1".into(), 443));
        assert_eq!(split_host_port("[::1]", 443).unwrap(), ("::1".into(), 443));
        assert_eq!(split_host_port("[::1]:9", 443).unwrap(), ("::1".into(), 9));
        assert!(split_host_port("h:x", 443).is_err());
    }

    fn node() -> DerpNode {
        DerpNode {
            name: "900a".into(),
            region_id: 900,
            host_name: "203.0.113.7".into(),
            ipv4: "203.0.113.7".into(),
            derp_port: 8443,
            ..Default::default()
        }
    }

    #[test]
    fn node_configs_follow_go() {
        let k = NodePrivate::generate();
        let mut n = node();
        n.cert_name = format!("sha256-raw:{}", "ab".repeat(32));
        let c = ClientConfig::for_node(&n, AddrFamily::V4, k.clone()).unwrap();
        assert_eq!(c.url, "https://203.0.113.7:8443/derp");
        assert_eq!(c.dial_addr.as_deref(), Some("203.0.113.7:8443"));
        assert_eq!(c.tls, TlsTrust::Pinned([0xab; 32]));
        // No IPv6 literal: resolve the host name, v6 only.
        let c = ClientConfig::for_node(&n, AddrFamily::V6, k.clone()).unwrap();
        assert_eq!(c.dial_addr, None);

        n.cert_name = "derp.example.com".into();
        let c = ClientConfig::for_node(&n, AddrFamily::Any, k.clone()).unwrap();
        assert_eq!(c.tls_server_name.as_deref(), Some("derp.example.com"));
        assert_eq!(c.tls, TlsTrust::WebPki);

        n.host_name = "front.example.com".into();
        n.derp_port = 0;
        let c = ClientConfig::for_node(&n, AddrFamily::Any, k.clone()).unwrap();
        assert_eq!(c.url, "https://front.example.com/derp");
        assert_eq!(c.cert_name.as_deref(), Some("derp.example.com"));
        assert_eq!(c.tls_server_name, None);

        n.insecure_for_tests = true;
        let c = ClientConfig::for_node(&n, AddrFamily::Any, k.clone()).unwrap();
        assert_eq!(c.tls, TlsTrust::Insecure);

        n.ipv4 = "none".into();
        assert!(ClientConfig::for_node(&n, AddrFamily::V4, k.clone()).is_err());
        n.stun_only = true;
        assert!(ClientConfig::for_node(&n, AddrFamily::Any, k).is_err());
    }
}
