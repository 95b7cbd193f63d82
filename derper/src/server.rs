//! Binding the listeners and running them: the public DERP/HTTP(S) listener, the port-80
//! listener next to TLS, STUN, metrics, certificate reloading, and shutdown.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use derp_proto::derpmap::{DerpMap, DerpNode, DerpRegion};
use derp_proto::key::{NodePrivate, NodePublic, parse_key_file, render_key_file};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::certs::{self, CertResolver, SniPolicy};
use crate::config::{Config, TlsMode};
use crate::derp::DerpServer;
use crate::http::{self, HttpState};
use crate::metrics::{Metrics, ReasonLabel};
use crate::registry::Registry;

/// TLS handshakes must finish within this. Go allows 30 s (its HTTP read timeout); DERP
/// clients finish in milliseconds, and every second allowed is a second a slowloris holds a
/// slot before authentication.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for the server's tasks after the connections are stopped, at least.
const TASK_JOIN_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("key file {path}: {detail}")]
    KeyFile { path: String, detail: String },
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error(transparent)]
    Acme(#[from] crate::acme::PrepareError),
    #[error("{0}")]
    Verify(String),
    #[error(transparent)]
    RateConfig(#[from] crate::limits::RateConfigError),
    #[error("cannot listen on {what} {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownReport {
    pub clients_told: usize,
    /// Connections still open at the timeout, closed without waiting.
    pub clients_cut: usize,
    pub elapsed: Duration,
    /// With `--reuse-port`: whether a successor was listening when the clients were moved.
    pub successor: Option<bool>,
}

/// A running server: its bound addresses, for logs and tests.
pub struct ServerHandle {
    pub derp_addr: SocketAddr,
    pub stun_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub public_key: NodePublic,
    /// The map entry for this node (CertName pin filled in for a self-signed certificate).
    pub derp_map: DerpMap,
    pub derp: Arc<DerpServer>,
    pub resolver: Option<Arc<CertResolver>>,
    /// Present when the certificate comes from files (`-certmode manual`).
    reloader: Option<Arc<CertReloader>>,
    http: Arc<HttpState>,
    shutdown: CancellationToken,
    conns_stop: CancellationToken,
    shutdown_timeout: Duration,
    /// `--reuse-port`: shutdown waits for a successor on the DERP port first.
    handoff: Option<Handoff>,
    /// Cancelled once the DERP listener is closed (its backlog taken).
    listener_closed: CancellationToken,
    restart_reconnect_in: Duration,
    restart_try_for: Duration,
    tasks: JoinSet<()>,
}

/// What shutdown needs to hand the DERP port to a successor.
struct Handoff {
    port: u16,
    /// Our listener's socket inode (`None` where `/proc` cannot tell: no waiting then).
    own_inode: Option<u64>,
    wait: Duration,
}

/// Loads the key file in Go's format, creating it (0600) with a fresh key if missing.
pub fn load_or_create_key(path: &Path) -> Result<NodePrivate, ServerError> {
    let err = |detail: String| ServerError::KeyFile {
        path: path.display().to_string(),
        detail,
    };
    match std::fs::read(path) {
        Ok(b) => parse_key_file(&b).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = NodePrivate::generate();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(format!("creating its directory: {e}")))?;
            }
            certs::write_with_mode(path, render_key_file(&k).as_bytes(), 0o600)
                .map_err(|e| err(format!("writing a new key: {e}")))?;
            info!(path = %path.display(), "wrote a new server key");
            Ok(k)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn bind_tcp(
    addr: SocketAddr,
    what: &'static str,
    reuse_port: bool,
) -> Result<TcpListener, ServerError> {
    let e = |error| ServerError::Bind { what, addr, error };
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(e)?;
    if addr.is_ipv6() {
        // `-a :443` serves IPv4 and IPv6 on one socket, as Go does.
        let _ = s.set_only_v6(false);
    }
    s.set_reuse_address(true).map_err(e)?;
    set_reuse_port(&s, reuse_port).map_err(e)?;
    s.set_nonblocking(true).map_err(e)?;
    s.bind(&addr.into()).map_err(e)?;
    s.listen(1024).map_err(e)?;
    TcpListener::from_std(s.into()).map_err(e)
}

/// SO_REUSEPORT lets a successor bind the same address while we still listen; the kernel then
/// spreads new connections (and STUN datagrams) over both until we close ours. Only sockets of
/// the same effective uid can join (Linux), so another user's process cannot take the port.
fn set_reuse_port(s: &socket2::Socket, on: bool) -> std::io::Result<()> {
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    if on {
        return s.set_reuse_port(true);
    }
    let _ = s;
    if on {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "--reuse-port needs SO_REUSEPORT, which this platform lacks",
        ));
    }
    Ok(())
}

fn bind_udp(addr: SocketAddr, reuse_port: bool) -> Result<UdpSocket, ServerError> {
    let e = |error| ServerError::Bind {
        what: "STUN",
        addr,
        error,
    };
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(e)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    set_reuse_port(&s, reuse_port).map_err(e)?;
    s.set_nonblocking(true).map_err(e)?;
    s.bind(&addr.into()).map_err(e)?;
    UdpSocket::from_std(s.into()).map_err(e)
}

/// Binds `host:port`; with no host, tries dual-stack `[::]` and falls back to `0.0.0.0` on hosts
/// without IPv6.
fn listen_addr(host: Option<IpAddr>, port: u16) -> Vec<SocketAddr> {
    match host {
        Some(h) => vec![SocketAddr::new(h, port)],
        None => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::from(([0, 0, 0, 0], port)),
        ],
    }
}

fn bind_tcp_any(
    host: Option<IpAddr>,
    port: u16,
    what: &'static str,
    reuse_port: bool,
) -> Result<TcpListener, ServerError> {
    let mut last = None;
    for a in listen_addr(host, port) {
        match bind_tcp(a, what, reuse_port) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(ServerError::Bind {
        what,
        addr: SocketAddr::from(([0, 0, 0, 0], port)),
        error: std::io::ErrorKind::AddrNotAvailable.into(),
    }))
}

fn tune_accepted(s: &TcpStream, cfg: &Config) {
    // Tokio leaves Nagle on; small DERP frames (pongs, PeerGone) must not wait behind it.
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new().with_time(cfg.tcp_keepalive_time);
    let _ = sock.set_tcp_keepalive(&ka);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(cfg.tcp_user_timeout).filter(|d| !d.is_zero()));
}

/// The certificate side of a TLS server, ready to serve.
pub struct PreparedTls {
    pub resolver: Arc<CertResolver>,
    /// The certificate files reloaded on change (`-certmode manual`).
    pub files: Option<certs::CertFiles>,
    pub meta: rustls_pki_types::CertificateDer<'static>,
    /// `sha256-raw:` pin when the leaf is self-signed.
    pub pin: Option<String>,
    /// The certificate's orderer (`-certmode letsencrypt/gcp`), to run once listening.
    pub acme: Option<crate::acme::AcmeManager>,
}

/// Finds (or, for an IP hostname, creates) the certificate and checks it, as Go's manual mode
/// does at startup; under ACME, reads its cache (ordering starts with the server).
pub fn prepare_tls(
    cfg: &Config,
    public_key: &NodePublic,
    metrics: &Arc<Metrics>,
) -> Result<Option<PreparedTls>, ServerError> {
    let certdir = match &cfg.tls {
        TlsMode::Off => return Ok(None),
        TlsMode::Manual { certdir } => certdir,
        TlsMode::Acme(acme) => {
            let meta = certs::meta_cert(public_key)?;
            let m = crate::acme::AcmeManager::prepare(
                acme.clone(),
                &cfg.hostname,
                cfg.http_port.is_some(),
                meta.clone(),
                metrics.clone(),
            )?;
            return Ok(Some(PreparedTls {
                resolver: m.resolver(),
                files: None,
                meta,
                pin: None,
                acme: Some(m),
            }));
        }
    };
    let meta = certs::meta_cert(public_key)?;
    let files = match certs::locate(certdir, &cfg.hostname) {
        Ok(f) => f,
        Err(missing) => match cfg.hostname.parse::<IpAddr>() {
            Ok(ip) => {
                let f = certs::create_self_signed(certdir, ip)?;
                info!(cert = %f.cert.display(), "no certificate for the IP hostname: generated a self-signed one");
                f
            }
            Err(_) => return Err(missing.into()),
        },
    };
    let loaded = certs::load(&files, &cfg.hostname, &meta)?;
    let pin = loaded.self_signed.then(|| certs::pin_of(&loaded.leaf_der));
    metrics
        .cert_not_after
        .set(loaded.not_after.unix_timestamp());
    info!(cert = %files.cert.display(), self_signed = loaded.self_signed, "TLS certificate loaded");
    let resolver = Arc::new(CertResolver::new(
        loaded,
        SniPolicy::for_hostname(&cfg.hostname),
    ));
    Ok(Some(PreparedTls {
        resolver,
        files: Some(files),
        meta,
        pin,
        acme: None,
    }))
}

/// The map entry `--print-derpmap` shows, without binding any port.
pub fn configured_map(cfg: &Config) -> Result<DerpMap, ServerError> {
    let private_key = server_key(cfg)?;
    let tls = prepare_tls(cfg, &private_key.public(), &Arc::new(Metrics::default()))?;
    let stun = cfg
        .stun_port
        .map(|p| SocketAddr::new(cfg.listen_host.unwrap_or(IpAddr::from([0, 0, 0, 0])), p));
    Ok(own_map(
        cfg,
        cfg.listen_port,
        tls.as_ref().and_then(|t| t.pin.clone()),
        tls.is_some(),
        stun,
    ))
}

/// The `-c` key file's key, or a fresh one for a server without a key file.
fn server_key(cfg: &Config) -> Result<NodePrivate, ServerError> {
    match &cfg.key_file {
        Some(p) => load_or_create_key(p),
        None => Ok(NodePrivate::generate()),
    }
}

/// Starts every listener and returns once they are bound: the relay and its certificate first,
/// then each listener in turn (a port that cannot be bound fails the start before anything is
/// served), the tasks beside them, and `/readyz` turns true.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<ServerHandle, ServerError> {
    let private_key = server_key(&cfg)?;
    let public_key = private_key.public();
    let metrics = Arc::new(Metrics::default());
    let mut tls = prepare_tls(&cfg, &public_key, &metrics)?;
    let acme = tls.as_mut().and_then(|t| t.acme.take());
    let tls = tls.map(|t| ServedCert::new(t, &cfg.hostname));
    // Connections are cancelled by `conns_stop` (after their Restarting frame); the listeners by
    // `shutdown`, so the two can be stopped in order.
    let conns_stop = CancellationToken::new();
    let derp = Arc::new(derp_server(&cfg, private_key, metrics, conns_stop.clone())?);
    let derp_listener = DerpListener::bind(&cfg)?;
    let mut s = Spawner {
        http: Arc::new(HttpState {
            derp: derp.clone(),
            derp_enabled: cfg.derp_enabled,
            home: cfg.home.clone(),
            ready: std::sync::atomic::AtomicBool::new(false),
            bootstrap_dns: tokio::sync::RwLock::new(None),
        }),
        cfg: Arc::new(cfg),
        derp,
        shutdown,
        conns_stop,
        tasks: JoinSet::new(),
    };
    let stun_addr = start_stun(&s.cfg, &s.derp.metrics, &s.shutdown, &mut s.tasks);
    let http_addr = s.spawn_port80(tls.is_some(), acme.as_ref())?;
    let metrics_addr = s.spawn_metrics()?;
    let derp_addr = derp_listener.addr;
    let resolver = tls.as_ref().map(|t| t.resolver.clone());
    let listener_closed = CancellationToken::new();
    let derp_inode = derp_listener.inode;
    s.spawn_accept_loop(derp_listener, resolver.as_ref(), &listener_closed);
    let reloader = tls.as_ref().and_then(|t| t.reloader.clone());
    s.spawn_background(acme, reloader.as_ref(), resolver.as_ref(), derp_addr.port());

    let (tls_on, pin) = (tls.is_some(), tls.and_then(|t| t.pin));
    let cfg = s.cfg;
    let derp_map = own_map(&cfg, derp_addr.port(), pin, tls_on, stun_addr);
    s.http.ready.store(true, Ordering::Relaxed);
    info!(%derp_addr, tls = tls_on, ?stun_addr, ?http_addr, ?metrics_addr, key = %public_key, "derper serving");
    Ok(ServerHandle {
        derp_addr,
        stun_addr,
        http_addr,
        metrics_addr,
        public_key,
        derp_map,
        derp: s.derp,
        resolver,
        reloader,
        http: s.http,
        shutdown: s.shutdown,
        conns_stop: s.conns_stop,
        shutdown_timeout: cfg.shutdown_timeout,
        handoff: cfg.reuse_port.then_some(Handoff {
            port: derp_addr.port(),
            own_inode: derp_inode,
            wait: cfg.handoff_wait,
        }),
        listener_closed,
        restart_reconnect_in: cfg.restart_reconnect_in,
        restart_try_for: cfg.restart_try_for,
        tasks: s.tasks,
    })
}

/// The certificate as the running server uses it: the resolver handshakes take it from, the
/// pin the map announces, and the reloader of its files.
struct ServedCert {
    resolver: Arc<CertResolver>,
    /// `sha256-raw:` pin when the leaf is self-signed.
    pin: Option<String>,
    /// Present when the certificate comes from files (`-certmode manual`).
    reloader: Option<Arc<CertReloader>>,
}

impl ServedCert {
    fn new(tls: PreparedTls, hostname: &str) -> Self {
        let reloader = tls.files.map(|files| {
            Arc::new(CertReloader {
                resolver: tls.resolver.clone(),
                files,
                meta: tls.meta,
                hostname: hostname.to_string(),
            })
        });
        Self {
            resolver: tls.resolver,
            pin: tls.pin,
            reloader,
        }
    }
}

/// The bound DERP listener, before its accept loop runs.
struct DerpListener {
    listener: TcpListener,
    addr: SocketAddr,
    /// Its socket inode, for the `--reuse-port` handoff (`None` where `/proc` cannot tell).
    inode: Option<u64>,
}

impl DerpListener {
    fn bind(cfg: &Config) -> Result<Self, ServerError> {
        let listener = bind_tcp_any(cfg.listen_host, cfg.listen_port, "DERP", cfg.reuse_port)?;
        let inode = {
            #[cfg(unix)]
            {
                use std::os::fd::AsRawFd;
                crate::handoff::socket_inode(listener.as_raw_fd())
            }
            #[cfg(not(unix))]
            {
                None
            }
        };
        let addr = listener.local_addr().map_err(|error| ServerError::Bind {
            what: "DERP",
            addr: SocketAddr::from(([0, 0, 0, 0], cfg.listen_port)),
            error,
        })?;
        Ok(Self {
            listener,
            addr,
            inode,
        })
    }
}

/// What the listeners and tasks [`start`] spawns share; they end up owned by the
/// [`ServerHandle`].
struct Spawner {
    cfg: Arc<Config>,
    derp: Arc<DerpServer>,
    http: Arc<HttpState>,
    shutdown: CancellationToken,
    conns_stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Spawner {
    /// The port-80 listener next to TLS (`-http-port`): redirects, and ACME's HTTP-01
    /// challenges.
    fn spawn_port80(
        &mut self,
        tls_on: bool,
        acme: Option<&crate::acme::AcmeManager>,
    ) -> Result<Option<SocketAddr>, ServerError> {
        let cfg = &self.cfg;
        let Some(port) = cfg.http_port.filter(|_| tls_on) else {
            return Ok(None);
        };
        let l = bind_tcp_any(cfg.listen_host, port, "HTTP", cfg.reuse_port)?;
        let addr = l.local_addr().ok();
        let router = http::port80_router(self.http.clone(), acme.map(|a| a.challenges()));
        self.tasks
            .spawn(serve_plain_http(l, router, self.shutdown.clone()));
        Ok(addr)
    }

    /// `--metrics-addr`: `/metrics`, `/healthz` and `/readyz`.
    fn spawn_metrics(&mut self) -> Result<Option<SocketAddr>, ServerError> {
        let Some(a) = self.cfg.metrics_addr else {
            return Ok(None);
        };
        let l = bind_tcp(a, "metrics", self.cfg.reuse_port)?;
        let addr = l.local_addr().ok();
        let mut reg = PromRegistry::default();
        self.derp.metrics.register(&mut reg);
        let router = metrics_router(Arc::new(reg), self.http.clone());
        // Served until the drain ends, not only until shutdown starts: /readyz says 503
        // and /metrics can still be scraped while clients are being moved away.
        self.tasks
            .spawn(serve_plain_http(l, router, self.conns_stop.clone()));
        Ok(addr)
    }

    fn spawn_accept_loop(
        &mut self,
        derp_listener: DerpListener,
        resolver: Option<&Arc<CertResolver>>,
        listener_closed: &CancellationToken,
    ) {
        self.tasks.spawn(accept_loop(
            derp_listener.listener,
            resolver.map(|r| TlsAcceptor::from(certs::server_config(r.clone()))),
            http::router(self.http.clone()),
            self.http.clone(),
            self.cfg.clone(),
            self.shutdown.clone(),
            listener_closed.clone(),
        ));
    }

    /// The tasks beside the listeners: bootstrap DNS, ACME orders, reloads on SIGHUP or file
    /// change, and the mesh.
    fn spawn_background(
        &mut self,
        acme: Option<crate::acme::AcmeManager>,
        reloader: Option<&Arc<CertReloader>>,
        resolver: Option<&Arc<CertResolver>>,
        derp_port: u16,
    ) {
        let (cfg, shutdown) = (&self.cfg, &self.shutdown);
        self.tasks.spawn(http::refresh_bootstrap_dns(
            self.http.clone(),
            cfg.bootstrap_dns_names.clone(),
            shutdown.clone(),
        ));
        if let Some(a) = acme {
            // Listeners are up: the CA's validation can reach both challenge ports.
            self.tasks.spawn(a.run(shutdown.clone()));
        }
        if let Some(p) = cfg.rate_config.clone() {
            self.tasks.spawn(reload_rate_config_on_hup(
                self.derp.clone(),
                p,
                shutdown.clone(),
            ));
        }
        if let Some(r) = reloader {
            self.tasks
                .spawn(r.clone().run(self.derp.metrics.clone(), shutdown.clone()));
        }
        if let Some(mesh_cfg) = cfg.mesh.clone() {
            let mesh = crate::mesh::Mesh::new(
                self.derp.clone(),
                mesh_cfg,
                cfg.hostname.clone(),
                derp_port,
                resolver.cloned().map(own_pin_source),
                self.conns_stop.clone(),
            );
            self.tasks.spawn(mesh.run());
        }
    }
}

/// The relay itself: keys, limits and the admission check, before any socket is open.
fn derp_server(
    cfg: &Config,
    private_key: NodePrivate,
    metrics: Arc<Metrics>,
    conns_stop: CancellationToken,
) -> Result<DerpServer, ServerError> {
    let verifier = if cfg.verify.enabled() {
        Some(crate::verify::Verifier::new(cfg.verify.clone()).map_err(ServerError::Verify)?)
    } else {
        None
    };
    let receive_limit = crate::limits::ReceiveLimit::default();
    if let Some(p) = &cfg.rate_config {
        receive_limit.set(crate::limits::load_rate_config(p)?);
    }
    Ok(DerpServer {
        public_key: private_key.public(),
        private_key,
        mesh_key: cfg.mesh.as_ref().map(|m| m.key),
        registry: Registry::new(metrics.clone()),
        metrics,
        config: cfg.derp.clone(),
        shutdown: conns_stop,
        verifier,
        receive_limit,
    })
}

/// Binds STUN and spawns its server; returns where it listens. A STUN port that cannot be bound
/// leaves the derper running without STUN, as Go does, but says so loudly.
fn start_stun(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Option<SocketAddr> {
    let port = cfg.stun_port?;
    let mut sock = None;
    for a in listen_addr(cfg.listen_host, port) {
        match bind_udp(a, cfg.reuse_port) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => warn!("{e}"),
        }
    }
    let Some(sock) = sock else {
        error!(port, "STUN is disabled: could not bind its UDP port");
        return None;
    };
    let addr = sock.local_addr().ok();
    tasks.spawn(crate::stun_server::run(
        sock,
        metrics.clone(),
        cfg.stun_rate_limit,
        shutdown.clone(),
    ));
    addr
}

/// The pin the mesh announces for this node: that of the certificate being served right now,
/// when it is self-signed.
fn own_pin_source(resolver: Arc<CertResolver>) -> crate::mesh::PinSource {
    Arc::new(move || {
        let c = resolver.current()?;
        c.self_signed.then(|| certs::pin_of(&c.leaf_der))
    })
}

/// This node's map entry, from the flags and what was bound.
pub fn own_map(
    cfg: &Config,
    port: u16,
    pin: Option<String>,
    tls: bool,
    stun: Option<SocketAddr>,
) -> DerpMap {
    let m = &cfg.map;
    let host_ip = cfg.hostname.parse::<IpAddr>().ok();
    let ipv4 = m
        .ipv4
        .clone()
        .or_else(|| host_ip.filter(IpAddr::is_ipv4).map(|i| i.to_string()));
    let ipv6 = m
        .ipv6
        .clone()
        .or_else(|| host_ip.filter(IpAddr::is_ipv6).map(|i| i.to_string()));
    let (cert_name, insecure) = match (m.insecure_for_tests, pin) {
        (true, _) => (String::new(), true),
        (false, Some(p)) => (p, false),
        (false, None) => (String::new(), false),
    };
    let node = DerpNode {
        name: m.node_name.clone(),
        region_id: m.region_id,
        host_name: cfg.hostname.clone(),
        cert_name,
        ipv4: ipv4.unwrap_or_default(),
        ipv6: ipv6.unwrap_or_default(),
        stun_port: match stun {
            Some(a) if a.port() == 3478 => 0,
            Some(a) => i64::from(a.port()),
            None => -1,
        },
        derp_port: if port == 443 { 0 } else { i64::from(port) },
        insecure_for_tests: insecure,
        can_port80: tls && cfg.http_port == Some(80),
        ..Default::default()
    };
    let mut map = DerpMap::default();
    map.regions.insert(
        m.region_id,
        DerpRegion {
            region_id: m.region_id,
            region_code: m.region_code.clone(),
            region_name: m.region_name.clone(),
            nodes: vec![node],
            ..Default::default()
        },
    );
    map
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    router: Router,
    st: Arc<HttpState>,
    cfg: Arc<Config>,
    shutdown: CancellationToken,
    listener_closed: CancellationToken,
) {
    let mut listener = Some(listener);
    // Connections the kernel completed before the listener closed, served like any other.
    let mut backlog: Option<std::vec::IntoIter<(TcpStream, SocketAddr)>> = None;
    let mut limits = AcceptLimits::new(&cfg);
    // Connection tasks are owned here: DERP connections end on the connections' token (after
    // their Restarting frame); whatever is left then (plain HTTP, handshakes) is aborted.
    let mut conns = JoinSet::new();
    loop {
        let (sock, remote) = if let Some(b) = backlog.as_mut() {
            match b.next() {
                Some(v) => v,
                None => break,
            }
        } else if let Some(l) = listener.as_ref() {
            tokio::select! {
            _ = shutdown.cancelled() => {
                backlog = listener.take().map(|l| take_backlog(l).into_iter());
                listener_closed.cancel();
                continue;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = l.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; never exit.
                    warn!("accept failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            }
        } else {
            break;
        };
        st.derp.metrics.accepts.inc();
        // Over a limit the connection is closed at once and the server goes on (Go's limiter
        // makes its http.Server exit instead).
        let permit = match limits.admit() {
            Ok(permit) => permit,
            Err(reason) => {
                st.derp
                    .metrics
                    .connections_refused
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                drop(sock);
                continue;
            }
        };
        tune_accepted(&sock, &cfg);
        // Peers on a dual-stack socket are reported as plain IPv4, as Go does.
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let pending = st.derp.pending_conn();
        conns.spawn(serve_accepted(
            st.clone(),
            router.clone(),
            acceptor.clone(),
            sock,
            remote,
            pending,
            permit,
        ));
    }
    drop(listener);
    listener_closed.cancel();
    st.derp.shutdown.cancelled().await;
    conns.shutdown().await;
}

/// The accept loop's limits: `--accept-rate`/`--accept-burst` and `--max-connections`.
struct AcceptLimits {
    bucket: Option<crate::limits::TokenBucket>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl AcceptLimits {
    fn new(cfg: &Config) -> Self {
        Self {
            bucket: cfg
                .accept_rate
                .map(|r| crate::limits::TokenBucket::new(r, cfg.accept_burst as f64)),
            slots: (cfg.max_connections > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(cfg.max_connections))),
        }
    }

    /// Lets one more connection in, holding its `--max-connections` slot (if any) until the
    /// permit drops; `Err` is the `connections_refused` reason.
    fn admit(&mut self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, &'static str> {
        if let Some(b) = self.bucket.as_mut()
            && !b.try_take(1.0)
        {
            return Err("accept_rate");
        }
        match &self.slots {
            None => Ok(None),
            Some(s) => s
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| "max_connections"),
        }
    }
}

/// One accepted connection: its TLS handshake (bounded by [`TLS_HANDSHAKE_TIMEOUT`]), then HTTP
/// and the DERP upgrade. `permit` holds its `--max-connections` slot until it ends.
async fn serve_accepted(
    st: Arc<HttpState>,
    router: Router,
    acceptor: Option<TlsAcceptor>,
    sock: TcpStream,
    remote: SocketAddr,
    pending: crate::derp::PendingConn,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let _permit = permit;
    let Some(acc) = acceptor else {
        return http::serve_connection(st, router, sock, remote, pending).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(sock)).await {
        // A TLS-ALPN-01 validation: the handshake was the answer.
        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(certs::ACME_TLS_ALPN) => {}
        Ok(Ok(tls)) => http::serve_connection(st, router, tls, remote, pending).await,
        Ok(Err(_)) => st.derp.metrics.handshake_failure("tls"),
        Err(_) => st.derp.metrics.handshake_failure("tls_timeout"),
    }
}

/// Closes the listener, first taking every connection already in its accept queue: closing a
/// listening socket resets those, and with SO_REUSEPORT the kernel keeps queueing some new
/// connections on ours until the moment it is closed.
fn take_backlog(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    /// Bounded: a flood must not keep a closing listener open.
    const MAX_BACKLOG: usize = 4096;
    let Ok(std_listener) = listener.into_std() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while out.len() < MAX_BACKLOG {
        match std_listener.accept() {
            Ok((s, remote)) => {
                if s.set_nonblocking(true).is_ok()
                    && let Ok(s) = TcpStream::from_std(s)
                {
                    out.push((s, remote));
                }
            }
            // WouldBlock: the queue is empty. Any other error: nothing more to take.
            Err(_) => break,
        }
    }
    drop(std_listener);
    if !out.is_empty() {
        info!(
            connections = out.len(),
            "took the listener's backlog before closing it"
        );
    }
    out
}

async fn serve_plain_http(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let serve = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned());
    if let Err(e) = serve.await {
        error!("HTTP listener failed: {e}");
    }
}

fn metrics_router(reg: Arc<PromRegistry>, st: Arc<HttpState>) -> Router {
    async fn metrics(
        axum::extract::State(reg): axum::extract::State<Arc<PromRegistry>>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response()
    }
    let health = Router::new()
        .route("/healthz", axum::routing::get(http::healthz))
        .route("/readyz", axum::routing::get(http::readyz))
        .with_state(st);
    Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(reg)
        .merge(health)
}

/// Certificate files watched for renewal (`-certmode manual`): new handshakes get a renewed
/// certificate, established connections are untouched.
pub struct CertReloader {
    resolver: Arc<CertResolver>,
    files: certs::CertFiles,
    /// The meta certificate the leaf is checked against when loaded.
    meta: rustls_pki_types::CertificateDer<'static>,
    hostname: String,
}

impl CertReloader {
    async fn run(self: Arc<Self>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let mut hup = crate::signals::Hangups::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(certs::RELOAD_INTERVAL) => {}
                _ = hup.recv() => info!("SIGHUP: checking certificates"),
            }
            self.reload_once(&metrics);
        }
    }

    /// Checks the files once; returns whether a new certificate was installed.
    pub fn reload_once(&self, metrics: &Metrics) -> bool {
        let label = |reason| ReasonLabel { reason };
        match certs::load(&self.files, &self.hostname, &self.meta) {
            Ok(new)
                if self
                    .resolver
                    .current()
                    .is_none_or(|c| new.fingerprint != c.fingerprint) =>
            {
                info!(pin = %certs::pin_of(&new.leaf_der), "certificate changed on disk: serving the new one to new connections");
                metrics.cert_not_after.set(new.not_after.unix_timestamp());
                self.resolver.replace(new);
                metrics.cert_reloads.get_or_create(&label("ok")).inc();
                true
            }
            Ok(_) => false,
            Err(e) => {
                // A half-written renewal must not take the server down: keep the old certificate.
                warn!("certificate reload failed, keeping the current one: {e}");
                metrics.cert_reloads.get_or_create(&label("error")).inc();
                false
            }
        }
    }
}

impl ServerHandle {
    /// Graceful stop: `/readyz` turns false, listeners close, every client gets a Restarting
    /// frame and then a clean close (today's clients ignore the frame but redial at once on
    /// the close, to the region's next node), and whatever is left after the timeout is cut.
    ///
    /// With `--reuse-port` it first waits (at most `--handoff-wait`, serving as before) until a
    /// successor listens on the DERP port, and moves the clients only once our listener is
    /// closed: their reconnect to the same address then reaches the successor.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let started = tokio::time::Instant::now();
        self.http.ready.store(false, Ordering::Relaxed);
        let mut successor = None;
        if let Some(h) = &self.handoff
            && let Some(inode) = h.own_inode
        {
            let found = crate::handoff::wait_for_successor(h.port, inode, h.wait).await;
            if found {
                info!(port = h.port, waited = ?started.elapsed(), "a successor listens on the DERP port: handing the clients over to it");
            } else {
                warn!(port = h.port, waited = ?h.wait, "no successor listens on the DERP port: clients will move to the region's other nodes");
            }
            successor = Some(found);
        }
        self.shutdown.cancel();
        // The clients are told only once nobody can reach this server through its port, so
        // their reconnect cannot come back here.
        let _ = tokio::time::timeout(TASK_JOIN_GRACE, self.listener_closed.cancelled()).await;
        let reconnect = u32::try_from(self.restart_reconnect_in.as_millis()).unwrap_or(u32::MAX);
        let try_for = u32::try_from(self.restart_try_for.as_millis()).unwrap_or(u32::MAX);
        let told = self.derp.registry.start_draining(reconnect, try_for);
        let deadline = started + self.shutdown_timeout;
        // Clients leave as they take the close; past the deadline the rest are cut.
        let _ = tokio::time::timeout_at(deadline, self.derp.registry.wait_empty()).await;
        let cut = self.derp.registry.all_conns().len();
        self.conns_stop.cancel();
        // Every task takes one of the two tokens; one that does not end by the deadline (a
        // bug, or I/O that cannot be cancelled) is aborted rather than waited for.
        let join_by = deadline.max(tokio::time::Instant::now() + TASK_JOIN_GRACE);
        loop {
            match tokio::time::timeout_at(join_by, self.tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    warn!(
                        left = self.tasks.len(),
                        "tasks still running at the shutdown deadline: aborting them"
                    );
                    self.tasks.shutdown().await;
                    break;
                }
            }
        }
        let report = ShutdownReport {
            clients_told: told,
            clients_cut: cut,
            elapsed: started.elapsed(),
            successor,
        };
        info!(told = report.clients_told, cut = report.clients_cut, elapsed = ?report.elapsed, ?successor, "shut down");
        report
    }

    /// Checks the certificate files now (what SIGHUP does); true if a new one was installed.
    pub fn reload_certs_now(&self) -> bool {
        self.reloader
            .as_ref()
            .is_some_and(|r| r.reload_once(&self.derp.metrics))
    }
}

async fn reload_rate_config_on_hup(
    derp: Arc<DerpServer>,
    path: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    let mut hup = crate::signals::Hangups::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => {}
        }
        match crate::limits::load_rate_config(&path) {
            Ok(rc) => {
                info!(
                    bytes_per_sec = rc.bytes_per_sec,
                    burst = rc.burst_bytes,
                    "SIGHUP: rate limits reloaded"
                );
                derp.receive_limit.set(rc);
            }
            Err(e) => warn!("SIGHUP: keeping the current rate limits: {e}"),
        }
    }
}
