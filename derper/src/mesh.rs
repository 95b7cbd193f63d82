//! Regional mesh: for each sibling server, a DERP client holding the mesh key that watches the
//! sibling's connections (WatchConns → PeerPresent/PeerGone) and installs forwarders so our
//! clients reach theirs (ForwardPacket). Peers come from `-mesh-with` and from
//! `--mesh-with-file`, which is re-read when it changes (the operator's ConfigMap), so peers
//! are added and dropped without a restart.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use derp_client::{Client, ClientConfig, ServerToClient, TlsTrust};
use derp_proto::frame::PeerGoneReason;
use derp_proto::key::{MeshKey, NodePublic};
use exp_backoff::Backoff;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::derp::DerpServer;
use crate::metrics::DropReason;
use crate::registry::PacketForwarder;

/// Packets waiting to be forwarded to one mesh peer. Forwarding must never block the sender's
/// reader (Go blocks it for up to 5 s); past this depth packets are dropped and counted.
pub const FORWARD_QUEUE_DEPTH: usize = 1024;
/// Reconnect backoff: starts small so a restarted sibling is back quickly, caps at Go's 5 s.
pub const RECONNECT_MIN: Duration = Duration::from_millis(250);
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Spread of the redial after a sibling's `Restarting`: its clients and every other sibling
/// redial at the same moment.
const RESTARTING_JITTER_MS: u64 = 20;
/// How often `--mesh-with-file` is checked for changes (a Kubernetes ConfigMap volume swaps a
/// symlink; SIGHUP checks at once).
pub const PEER_FILE_POLL: Duration = Duration::from_secs(2);

/// One sibling server: `host[:port]` for the URL, SNI and certificate, and optionally where to
/// dial instead (Go's `host/dialhost`). An entry may also be a full `http(s)://` URL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MeshPeer {
    pub url: String,
    pub host: String,
    pub dial: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshConfigError {
    #[error("mesh peer {0:?}: {1}")]
    BadPeer(String, &'static str),
}

/// Parses one `-mesh-with` entry.
pub fn parse_peer(entry: &str) -> Result<MeshPeer, MeshConfigError> {
    let e = entry.trim();
    let bad = |why| MeshConfigError::BadPeer(e.to_string(), why);
    if e.is_empty() {
        return Err(bad("empty"));
    }
    if let Some(rest) = e
        .strip_prefix("https://")
        .or_else(|| e.strip_prefix("http://"))
    {
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty() {
            return Err(bad("URL has no host"));
        }
        let url = if rest.contains('/') {
            e.to_string()
        } else {
            format!("{e}/derp")
        };
        return Ok(MeshPeer {
            url,
            host: host.to_string(),
            dial: None,
        });
    }
    let (host, dial) = match e.split_once('/') {
        Some((h, d)) if !h.is_empty() && !d.is_empty() => (h, Some(d.to_string())),
        Some(_) => return Err(bad("expected host/dialhost")),
        None => (e, None),
    };
    if host.chars().any(|c| c.is_whitespace() || c == '#') {
        return Err(bad("host has spaces or #"));
    }
    Ok(MeshPeer {
        url: format!("https://{host}/derp"),
        host: host.to_string(),
        dial,
    })
}

/// Parses the peers file: one entry per line, `#` comments and blank lines ignored, commas
/// allowed too. A bad line is an error (the previous peer set is kept).
pub fn parse_peer_file(text: &str) -> Result<Vec<MeshPeer>, MeshConfigError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for entry in line.split(',') {
            if !entry.trim().is_empty() {
                out.push(parse_peer(entry)?);
            }
        }
    }
    Ok(out)
}

/// Whether `peer` names this server (Go skips its own name in `-mesh-with`).
fn is_self(peer: &MeshPeer, own_hostname: &str, own_port: u16) -> bool {
    let (h, p) = match peer.host.rsplit_once(':') {
        // A bare IPv6 address has colons but no port.
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (peer.host.as_str(), None),
        Some((h, p)) => (h, p.parse::<u16>().ok()),
        None => (peer.host.as_str(), None),
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    let default_port = if peer.url.starts_with("http://") {
        80
    } else {
        443
    };
    h.eq_ignore_ascii_case(own_hostname) && p.unwrap_or(default_port) == own_port
}

#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub key: MeshKey,
    pub peers: Vec<MeshPeer>,
    pub peers_file: Option<PathBuf>,
    /// Extra CA for mesh TLS; without it, the system roots, plus our own certificate when it
    /// is self-signed (a region sharing one self-signed certificate).
    pub ca_file: Option<PathBuf>,
}

/// Reads our current certificate's pin (it changes when the certificate is renewed).
pub type PinSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Decides how mesh peers' certificates are checked, at every connect (so a renewed
/// certificate or CA file is picked up).
#[derive(Clone)]
struct TrustSource {
    ca_file: Option<PathBuf>,
    own_pin: Option<PinSource>,
}

impl TrustSource {
    fn get(&self) -> TlsTrust {
        if let Some(p) = &self.ca_file {
            match std::fs::read(p) {
                Ok(pem) => match TlsTrust::extra_ca_pem(&pem) {
                    Ok(t) => return t,
                    Err(e) => {
                        warn!(file = %p.display(), "--mesh-ca-file unusable ({e}); using the system roots")
                    }
                },
                // A public-CA certificate from cert-manager comes without ca.crt: the system
                // roots are the right trust then, so this is not worth a warning.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    debug!(file = %p.display(), "--mesh-ca-file absent; using the system roots")
                }
                Err(e) => {
                    warn!(file = %p.display(), "--mesh-ca-file unreadable ({e}); using the system roots")
                }
            }
        } else if let Some(pin) = self.own_pin.as_ref().and_then(|f| f()) {
            match TlsTrust::from_sha256_raw(&pin) {
                Ok(t) => return t,
                Err(e) => warn!("own certificate pin unusable: {e}"),
            }
        }
        TlsTrust::WebPki
    }
}

/// Carries packets to one peer, from any reader, without blocking it.
struct Forwarder {
    id: u64,
    tx: mpsc::Sender<(NodePublic, NodePublic, Bytes)>,
    server: Arc<DerpServer>,
}

impl PacketForwarder for Forwarder {
    fn forwarder_id(&self) -> u64 {
        self.id
    }
    fn forward(&self, src: NodePublic, dst: NodePublic, packet: Bytes) -> bool {
        let disco = derp_proto::frame::looks_like_disco(&packet);
        match self.tx.try_send((src, dst, packet)) {
            Ok(()) => true,
            Err(_) => {
                self.server
                    .metrics
                    .dropped(DropReason::MeshQueueFull, disco);
                false
            }
        }
    }
}

/// Runs the mesh: one task per peer, restarted when the peer set changes.
pub struct Mesh {
    server: Arc<DerpServer>,
    cfg: MeshConfig,
    own_hostname: String,
    own_port: u16,
    /// Our certificate pin, when it is self-signed (trust for siblings sharing it).
    own_pin: Option<PinSource>,
    running: HashMap<MeshPeer, CancellationToken>,
    /// The peers' tasks, owned here: a mesh dropped (its task aborted at the shutdown deadline)
    /// aborts them, and [`Mesh::run`] returns only once they ended.
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

impl Mesh {
    pub fn new(
        server: Arc<DerpServer>,
        cfg: MeshConfig,
        own_hostname: String,
        own_port: u16,
        own_pin: Option<PinSource>,
        shutdown: CancellationToken,
    ) -> Self {
        Mesh {
            server,
            cfg,
            own_hostname,
            own_port,
            own_pin,
            running: HashMap::new(),
            tasks: JoinSet::new(),
            shutdown,
        }
    }

    /// Makes the running peer set equal to `static peers ∪ file peers`.
    pub fn apply(&mut self, file_peers: &[MeshPeer]) {
        let wanted: BTreeSet<MeshPeer> = self
            .cfg
            .peers
            .iter()
            .chain(file_peers)
            .filter(|p| !is_self(p, &self.own_hostname, self.own_port))
            .cloned()
            .collect();
        self.running.retain(|peer, token| {
            let keep = wanted.contains(peer);
            if !keep {
                info!(peer = %peer.host, "mesh peer removed");
                token.cancel();
            }
            keep
        });
        for peer in wanted {
            if self.running.contains_key(&peer) {
                continue;
            }
            info!(peer = %peer.host, "mesh peer added");
            let token = self.shutdown.child_token();
            self.running.insert(peer.clone(), token.clone());
            let trust = TrustSource {
                ca_file: self.cfg.ca_file.clone(),
                own_pin: self.own_pin.clone(),
            };
            let span = info_span!("mesh", peer = %peer.host);
            self.tasks.spawn(
                run_peer(self.server.clone(), self.cfg.key, peer, trust, token).instrument(span),
            );
        }
        // Removed peers' tasks end on their token; forget them once they did.
        while self.tasks.try_join_next().is_some() {}
    }

    pub fn peer_count(&self) -> usize {
        self.running.len()
    }

    /// Applies the static peers, then follows the peers file until shutdown; returns once every
    /// peer's task ended (their tokens are children of the shutdown token).
    pub async fn run(mut self) {
        self.follow_peers().await;
        while self.tasks.join_next().await.is_some() {}
    }

    async fn follow_peers(&mut self) {
        let mut last: Option<String> = None;
        let mut hup = crate::signals::Hangups::new();
        loop {
            let file_peers = match &self.cfg.peers_file {
                None => Some(Vec::new()),
                Some(p) => match std::fs::read_to_string(p) {
                    Ok(text) if last.as_deref() == Some(text.as_str()) => None,
                    Ok(text) => {
                        let parsed = parse_peer_file(&text);
                        last = Some(text);
                        match parsed {
                            Ok(v) => Some(v),
                            Err(e) => {
                                warn!(file = %p.display(), "mesh peers file not applied, keeping the current peers: {e}");
                                None
                            }
                        }
                    }
                    Err(e) => {
                        if last.is_some() || self.running.is_empty() {
                            warn!(file = %p.display(), "reading the mesh peers file: {e}");
                        }
                        None
                    }
                },
            };
            if let Some(fp) = file_peers {
                self.apply(&fp);
            }
            if self.cfg.peers_file.is_none() {
                // Nothing to follow; keep the tasks until shutdown.
                self.shutdown.cancelled().await;
                return;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(PEER_FILE_POLL) => {}
                _ = hup.recv() => {}
            }
        }
    }
}

static NEXT_FORWARDER: AtomicU64 = AtomicU64::new(1);

/// One peer: connect, watch, forward; on any failure forget what it told us and reconnect.
async fn run_peer(
    server: Arc<DerpServer>,
    key: MeshKey,
    peer: MeshPeer,
    trust: TrustSource,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    loop {
        let mut cfg = ClientConfig::new(peer.url.clone(), server.private_key.clone());
        cfg.mesh_key = Some(key);
        cfg.can_ack_pings = false;
        cfg.watch_conns = true;
        cfg.tls = trust.get();
        cfg.dial_addr = peer.dial.clone();
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = Client::connect(&cfg) => r,
        };
        match connected {
            Err(e) => debug!(
                failures = backoff.failures() + 1,
                "connect failed: {e}; retrying"
            ),
            Ok(c) if c.server_key() == server.public_key => {
                info!("mesh peer is this server itself; not meshing with it");
                stop.cancelled().await;
                return;
            }
            Ok(c) => {
                info!(server_key = %c.server_key().short(), "mesh connected");
                server.metrics.mesh_links.inc();
                let ran = serve_link(&server, c, &stop).await;
                server.metrics.mesh_links.dec();
                match ran {
                    LinkEnd::Stopped => return,
                    LinkEnd::Restarting { reconnect_in } => {
                        info!(?reconnect_in, "mesh peer is restarting; redialling");
                        backoff.reset();
                        let wait = redial_after_restarting(reconnect_in, rand::random());
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                    LinkEnd::Broken(e) => {
                        warn!("mesh link lost: {e}; reconnecting");
                        backoff.reset();
                    }
                }
            }
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay() + jitter) => {}
        }
    }
}

/// The wait before redialling a sibling that said `Restarting`: what it asked for (capped), not
/// the backoff. During a `--reuse-port` handover the successor already listens (the old
/// derper tells its clients only after that), so the link is back in one dial instead of after
/// the backoff's first 250 ms, and packets to the clients that moved with it flow again as soon
/// as they are announced. If that dial fails, the backoff takes over as after any failure.
fn redial_after_restarting(reconnect_in: Duration, random: u64) -> Duration {
    reconnect_in.min(RECONNECT_MAX) + Duration::from_millis(random % RESTARTING_JITTER_MS)
}

enum LinkEnd {
    Stopped,
    /// The peer sent `Restarting` (its shutdown), then the link ended.
    Restarting {
        reconnect_in: Duration,
    },
    Broken(String),
}

async fn serve_link(server: &Arc<DerpServer>, client: Client, stop: &CancellationToken) -> LinkEnd {
    let (handle, mut rx) = client.split();
    let id = NEXT_FORWARDER.fetch_add(1, Ordering::Relaxed);
    let (tx, mut queue) = mpsc::channel(FORWARD_QUEUE_DEPTH);
    let fwd: Arc<dyn PacketForwarder> = Arc::new(Forwarder {
        id,
        tx,
        server: server.clone(),
    });
    let mut learned: HashSet<NodePublic> = HashSet::new();
    let send_handle = handle.clone();
    let sender = async move {
        while let Some((src, dst, pkt)) = queue.recv().await {
            if let Err(e) = send_handle.forward_packet(&src, &dst, &pkt).await {
                return e.to_string();
            }
        }
        "forward queue closed".to_string()
    };
    tokio::pin!(sender);
    let mut restarting = None;
    let broken = |e: String, restarting: Option<Duration>| match restarting {
        Some(reconnect_in) => LinkEnd::Restarting { reconnect_in },
        None => LinkEnd::Broken(e),
    };
    let end = loop {
        tokio::select! {
            _ = stop.cancelled() => break LinkEnd::Stopped,
            e = &mut sender => break broken(e, restarting),
            m = rx.recv() => match m {
                Err(e) => break broken(e.to_string(), restarting),
                Ok(ServerToClient::Restarting { reconnect_in_ms, .. }) => {
                    restarting = Some(Duration::from_millis(u64::from(reconnect_in_ms)));
                }
                Ok(ServerToClient::PeerPresent { key, .. }) => {
                    if learned.insert(key) {
                        server.registry.add_forwarder(key, fwd.clone());
                    }
                }
                Ok(ServerToClient::PeerGone { key, reason }) => {
                    // Disconnected: it left that server. NotHere: a forward missed, so our
                    // entry is stale; Go's mesh client drops it too.
                    if learned.remove(&key) {
                        server.registry.remove_forwarder(key, id);
                    }
                    if reason == PeerGoneReason::NotHere {
                        debug!(key = %key.short(), "peer says a forwarded key is not there");
                    }
                }
                Ok(_) => {}
            },
        }
    };
    for key in learned {
        server.registry.remove_forwarder(key, id);
    }
    let _ = handle.close().await;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_entries() {
        let p = parse_peer("derp2.example.com").unwrap();
        assert_eq!(p.url, "https://derp2.example.com/derp");
        assert_eq!(p.dial, None);
        let p = parse_peer("derp2.example.com:8443/10.0.0.2").unwrap();
        assert_eq!(p.url, "https://derp2.example.com:8443/derp");
        assert_eq!(p.dial.as_deref(), Some("10.0.0.2"));
        let p = parse_peer("http://127.0.0.1:3340").unwrap();
        assert_eq!(p.url, "http://127.0.0.1:3340/derp");
        assert!(parse_peer("a/").is_err());
        assert!(parse_peer("").is_err());
    }

    #[test]
    fn peer_file() {
        let v =
            parse_peer_file("# region 900\n127.0.0.2:8443\n\n127.0.0.3:8443 # b\nx,y\n").unwrap();
        assert_eq!(v.len(), 4);
        assert!(parse_peer_file("ok\nbad/\n").is_err());
    }

    fn trust(ca_file: Option<PathBuf>, own_pin: Option<&str>) -> TlsTrust {
        let own_pin = own_pin.map(|p| {
            let p = p.to_string();
            Arc::new(move || Some(p.clone())) as PinSource
        });
        TrustSource { ca_file, own_pin }.get()
    }

    #[test]
    fn mesh_trust_prefers_the_ca_file_and_falls_back_to_system_roots() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, _) = crate::certs::self_signed_for_ip("127.0.0.1".parse().unwrap()).unwrap();
        let pin = format!("sha256-raw:{}", "ab".repeat(32));

        // A readable CA file wins over our own pin.
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, &cert_pem).unwrap();
        assert!(matches!(trust(Some(ca), Some(&pin)), TlsTrust::ExtraCa(c) if c.len() == 1));

        // cert-manager with a public issuer writes no ca.crt: the system roots, not the pin
        // (the peers' certificates are publicly trusted then).
        let missing = dir.path().join("absent.crt");
        assert!(matches!(trust(Some(missing), Some(&pin)), TlsTrust::WebPki));

        // A file that holds no certificate is reported and ignored the same way.
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "not a certificate").unwrap();
        assert!(matches!(trust(Some(junk), None), TlsTrust::WebPki));

        // A directory where the file should be: unreadable, still no panic and no trust in it.
        assert!(matches!(
            trust(Some(dir.path().to_path_buf()), None),
            TlsTrust::WebPki
        ));
    }

    #[test]
    fn mesh_trust_without_a_ca_file_pins_our_own_self_signed_certificate() {
        let pin = format!("sha256-raw:{}", "ab".repeat(32));
        assert!(matches!(trust(None, Some(&pin)), TlsTrust::Pinned(h) if h == [0xab; 32]));
        assert!(matches!(
            trust(None, Some("sha256-raw:zz")),
            TlsTrust::WebPki
        ));
        assert!(matches!(trust(None, None), TlsTrust::WebPki));
        let no_pin: PinSource = Arc::new(|| None);
        let t = TrustSource {
            ca_file: None,
            own_pin: Some(no_pin),
        }
        .get();
        assert!(matches!(t, TlsTrust::WebPki));
    }

    #[test]
    fn a_restarting_sibling_is_redialled_when_it_asks_not_after_the_backoff() {
        for random in [0, 7, 19, 20, u64::MAX] {
            let now = redial_after_restarting(Duration::ZERO, random);
            assert!(now < Duration::from_millis(RESTARTING_JITTER_MS), "{now:?}");
            assert!(now < RECONNECT_MIN);
            let later = redial_after_restarting(Duration::from_millis(1500), random);
            assert!(later >= Duration::from_millis(1500) && later < Duration::from_millis(1520));
            // A sibling cannot park the link for longer than the backoff's cap.
            let capped = redial_after_restarting(Duration::from_secs(3600), random);
            assert!(capped >= RECONNECT_MAX && capped < RECONNECT_MAX + Duration::from_millis(20));
        }
    }

    #[test]
    fn self_detection() {
        let me = |s: &str| is_self(&parse_peer(s).unwrap(), "derp1.example.com", 443);
        assert!(me("derp1.example.com"));
        assert!(me("DERP1.example.com:443"));
        assert!(!me("derp1.example.com:8443"));
        assert!(!me("derp2.example.com"));
        assert!(is_self(
            &parse_peer("127.0.0.2:8443").unwrap(),
            "127.0.0.2",
            8443
        ));
    }
}
