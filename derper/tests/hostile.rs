//! Hostile and slow clients against a server on 127.0.0.1:0: slowloris on the HTTP upgrade,
//! handshake floods (plain and TLS), oversized and malformed frames, a reader that never reads,
//! and a client sending to thousands of unknown keys. In each, a client pair relays throughout
//! and must be unaffected, and the server's memory (RSS of this process, open descriptors,
//! connection and registry gauges) must stay bounded. The tests run one at a time (they measure
//! the same process) and take about 25 s together.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use derp_client::{ClientConfig, PeerGoneReason, ServerToClient, TlsTrust};
use derp_proto::frame::{self, FrameType, HEADER_LEN};
use derp_proto::info::{self, ClientInfo};
use derp_proto::{NodePrivate, NodePublic};
use derper::config::{Config, TlsMode};
use derper::http::REQUEST_HEAD_TIMEOUT;
use derper::metrics::{DropLabels, ReasonLabel};
use derper::server::ServerHandle;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

/// The tests measure this process's memory and descriptors, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn handshake_failures(s: &ServerHandle, reason: &'static str) -> u64 {
    s.derp
        .metrics
        .handshake_failures
        .get_or_create(&ReasonLabel { reason })
        .get()
}

fn dropped(s: &ServerHandle, reason: &'static str, kind: &'static str) -> u64 {
    s.derp
        .metrics
        .packets_dropped
        .get_or_create(&DropLabels { reason, kind })
        .get()
}

/// A client pair relaying a packet back and forth every few milliseconds for as long as the
/// test runs; it records how many round trips made it and the slowest one.
struct Probe {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(u64, Duration)>,
}

impl Probe {
    async fn start(cfg_a: ClientConfig, cfg_b: ClientConfig) -> Probe {
        let mut a = connect_with(cfg_a).await;
        let mut b = connect_with(cfg_b).await;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut n, mut worst) = (0u64, Duration::ZERO);
            while !stopped.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let msg = n.to_be_bytes();
                a.tx.send_packet(&b.key, &msg).await.unwrap();
                assert_eq!(b.packet().await, (a.key, msg.to_vec()), "probe a→b");
                b.tx.send_packet(&a.key, &msg).await.unwrap();
                assert_eq!(a.packet().await, (b.key, msg.to_vec()), "probe b→a");
                worst = worst.max(t0.elapsed());
                n += 1;
                sleep(Duration::from_millis(5)).await;
            }
            (n, worst)
        });
        Probe { stop, task }
    }

    async fn plain(s: &ServerHandle) -> Probe {
        let u = url(s);
        Probe::start(
            ClientConfig::new(&u, NodePrivate::generate()),
            ClientConfig::new(&u, NodePrivate::generate()),
        )
        .await
    }

    /// Stops the pair and checks it kept relaying: at least `min` round trips, none slower
    /// than a second.
    async fn finish(self, min: u64) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (n, worst) = timeout(T, self.task).await.unwrap().unwrap();
        assert!(
            n >= min,
            "the pair made only {n} round trips (wanted {min})"
        );
        assert!(
            worst < Duration::from_secs(1),
            "a round trip took {worst:?}"
        );
        (n, worst)
    }
}

/// `GET /derp` with fast start and the ClientInfo frame right behind it, as Go clients send.
fn fast_start_hello(server: &NodePublic, me: &NodePrivate) -> Vec<u8> {
    let mut out = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n".to_vec();
    let ci = ClientInfo {
        version: 2,
        ..Default::default()
    };
    let sealed = info::seal(me, server, ci.to_json().as_bytes()).unwrap();
    frame::encode_client_info(&mut out, &me.public(), &sealed).unwrap();
    out
}

/// Reads one frame (header and payload) from a raw connection.
async fn read_raw_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    timeout(T, s.read_exact(&mut h)).await.unwrap().unwrap();
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut p = vec![0u8; len];
    timeout(T, s.read_exact(&mut p)).await.unwrap().unwrap();
    (h[0], p)
}

/// A raw TCP DERP connection past the handshake (ServerKey and ServerInfo read), and its key.
async fn raw_derp_on(sock: TcpStream, s: &ServerHandle) -> (TcpStream, NodePublic) {
    let mut sock = sock;
    let me = NodePrivate::generate();
    sock.write_all(&fast_start_hello(&s.public_key, &me))
        .await
        .unwrap();
    let (t, _) = read_raw_frame(&mut sock).await;
    assert_eq!(t, FrameType::ServerKey as u8);
    let (t, _) = read_raw_frame(&mut sock).await;
    assert_eq!(t, FrameType::ServerInfo as u8);
    (sock, me.public())
}

async fn raw_derp(s: &ServerHandle) -> TcpStream {
    raw_derp_on(TcpStream::connect(s.derp_addr).await.unwrap(), s)
        .await
        .0
}

/// Asserts the server closes the connection within `within` (EOF or reset), whatever it sends
/// before that. Returns how long it took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> Duration {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match timeout(within.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes, ignoring errors: the server may already have closed the connection.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) {
    let _ = timeout(T, w.write_all(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_at_the_head_timeout_while_a_pair_relays() {
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let s = plain().await;
    let probe = Probe::plain(&s).await;
    let rss0 = rss_kib();
    let fds0 = open_fds();
    // A head that never ends: one byte every 200 ms reaches ~50 bytes by the deadline.
    let head: &'static [u8] = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\nX-Pad-1: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nX-Pad-2: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n\r\n";
    let addr = s.derp_addr;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..N {
        tasks.push(tokio::spawn(async move {
            let sock = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = sock.into_split();
            let dribble = tokio::spawn(async move {
                for b in head.chunks(1) {
                    if wr.write_all(b).await.is_err() {
                        return;
                    }
                    sleep(Duration::from_millis(200)).await;
                }
                panic!("the whole slow head was taken");
            });
            let took = closed_within(&mut rd, REQUEST_HEAD_TIMEOUT + Duration::from_secs(5)).await;
            dribble.abort();
            took
        }));
    }
    let mut rss_peak = 0;
    while !tasks.iter().all(|t| t.is_finished()) && started.elapsed() < Duration::from_secs(20) {
        rss_peak = rss_peak.max(rss_kib());
        sleep(Duration::from_millis(250)).await;
    }
    for t in tasks {
        let took = t.await.unwrap();
        assert!(
            took >= REQUEST_HEAD_TIMEOUT - Duration::from_millis(500)
                && took <= REQUEST_HEAD_TIMEOUT + Duration::from_secs(3),
            "a slow head was cut after {took:?}, not at the {REQUEST_HEAD_TIMEOUT:?} head timeout"
        );
    }
    assert_eq!(handshake_failures(&s, "http_head_timeout"), N as u64);
    let (n, worst) = probe.finish(100).await;
    eventually("descriptors released", T, || open_fds() <= fds0 + 8).await;
    let grew = rss_peak.saturating_sub(rss0);
    eprintln!(
        "slowloris: {N} heads cut at the head timeout; pair {n} round trips, worst {worst:?}; \
         RSS +{grew} KiB at peak; fds {fds0} -> {}",
        open_fds()
    );
    // 200 idle half-open heads: a few KiB each, not megabytes.
    assert!(
        grew < 32 * 1024,
        "RSS grew by {grew} KiB for {N} slow heads"
    );
    s.shutdown().await;
}

/// Accepts any server certificate: the flood only needs a TLS session, not trust.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Garbage that no parser along the way accepts: not TLS, not HTTP.
fn garbage(i: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..512 + i % 700)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 0x80
        })
        .collect()
}

/// One of each flood connection: binary garbage to the plain listener, garbage instead of a
/// ClientHello to the TLS one, and either a ClientHello cut short or a real TLS session that
/// then sends garbage where the request head belongs.
fn flood_wave_one(
    i: usize,
    plain: std::net::SocketAddr,
    tls: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> [JoinHandle<&'static str>; 3] {
    let c = connector.clone();
    [
        tokio::spawn(async move {
            let mut s = TcpStream::connect(plain).await.unwrap();
            send(&mut s, &garbage(i)).await;
            closed_within(&mut s, T).await;
            "plain garbage"
        }),
        tokio::spawn(async move {
            let mut s = TcpStream::connect(tls).await.unwrap();
            send(&mut s, &garbage(i + 1)).await;
            closed_within(&mut s, T).await;
            "tls garbage"
        }),
        tokio::spawn(async move {
            let mut sock = TcpStream::connect(tls).await.unwrap();
            if !i.is_multiple_of(3) {
                // A truncated ClientHello record, then the socket goes away.
                send(&mut sock, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).await;
                return "tls cut";
            }
            let name = rustls_pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([127, 0, 0, 1]).into(),
            );
            let mut s = timeout(T, c.connect(name, sock)).await.unwrap().unwrap();
            send(&mut s, &garbage(i + 2)).await;
            let _ = s.flush().await;
            closed_within(&mut s, T).await;
            "tls then garbage"
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_floods_plain_and_tls_leave_the_pair_relaying() {
    let _serial = SERIAL.lock().await;
    const PER_KIND: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::for_tests();
    cfg.tls = TlsMode::Manual {
        certdir: dir.path().to_path_buf(),
    };
    let tls = server(cfg).await;
    let plain_s = plain().await;
    let pin = tls.derp_map.regions.values().next().unwrap().nodes[0]
        .cert_name
        .clone();
    let pinned = || {
        let mut c = ClientConfig::new(
            format!("https://{}/derp", tls.derp_addr),
            NodePrivate::generate(),
        );
        c.tls = TlsTrust::from_sha256_raw(&pin).unwrap();
        c
    };
    let tls_probe = Probe::start(pinned(), pinned()).await;
    let plain_probe = Probe::plain(&plain_s).await;
    let rss0 = rss_kib();
    let fds0 = open_fds();

    let connector = tls_connector();
    // Waves of concurrent connects until the flood has lasted two seconds, so the pairs relay
    // through it rather than after it.
    let started = Instant::now();
    let mut waves = 0;
    while waves < 2 || started.elapsed() < Duration::from_secs(2) {
        let mut tasks: Vec<JoinHandle<&'static str>> = Vec::new();
        for i in 0..PER_KIND {
            tasks.extend(flood_wave_one(
                i,
                plain_s.derp_addr,
                tls.derp_addr,
                &connector,
            ));
        }
        for t in tasks {
            timeout(T, t).await.unwrap().unwrap();
        }
        waves += 1;
    }
    let flood_took = started.elapsed();
    let rss_flood = rss_kib();
    // Only the two pairs are connected; every flood connection is gone from the server.
    assert_eq!(tls.derp.metrics.connections.get(), 2);
    assert_eq!(plain_s.derp.metrics.connections.get(), 2);
    assert_eq!(tls.derp.registry.client_count(), 2);
    let (n_tls, worst_tls) = tls_probe.finish(5).await;
    let (n_plain, worst_plain) = plain_probe.finish(5).await;
    // Truncated ClientHellos are dropped at the client's FIN (handshake failure) or at the TLS
    // handshake timeout; all the garbage ones were refused.
    eventually("flood descriptors released", T, || open_fds() <= fds0 + 8).await;
    let wanted = (waves * PER_KIND) as u64;
    assert_eq!(handshake_failures(&plain_s, "http_head_invalid"), wanted);
    // Garbage ClientHellos, and handshakes cut halfway; the TLS sessions then sent garbage.
    assert!(handshake_failures(&tls, "tls") >= wanted);
    assert!(handshake_failures(&tls, "http_head_invalid") >= wanted / 3);
    let grew = rss_flood.saturating_sub(rss0);
    eprintln!(
        "handshake flood: {} connects in {waves} waves in {flood_took:?}; pairs {n_tls} (TLS, worst {worst_tls:?}) \
         and {n_plain} (plain, worst {worst_plain:?}) round trips; RSS +{grew} KiB; fds {fds0} -> {}",
        3 * PER_KIND * waves,
        open_fds()
    );
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB during the flood");
    tls.shutdown().await;
    plain_s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_close_only_their_connection() {
    let _serial = SERIAL.lock().await;
    let s = plain().await;
    let probe = Probe::plain(&s).await;
    let rss0 = rss_kib();
    let header = |t: u8, len: u32| {
        let mut h = vec![t];
        h.extend_from_slice(&len.to_be_bytes());
        h
    };
    let quick = Duration::from_secs(2);

    // A 4 GiB SendPacket: refused from its header alone, nothing is buffered.
    let mut c = raw_derp(&s).await;
    send(&mut c, &header(FrameType::SendPacket as u8, u32::MAX)).await;
    closed_within(&mut c, quick).await;

    // A 1 MiB frame of an unknown type: unknown frames are skipped, but not at any size.
    let mut c = raw_derp(&s).await;
    let mut big = header(0x77, 1 << 20);
    big.resize(HEADER_LEN + (1 << 20), 0xAB);
    send(&mut c, &big).await;
    closed_within(&mut c, quick).await;

    // A small unknown frame is skipped and the connection stays usable.
    let mut c = raw_derp(&s).await;
    let mut small = header(0x77, 900);
    small.resize(HEADER_LEN + 900, 1);
    send(&mut c, &small).await;
    let mut ping = Vec::new();
    ping.extend_from_slice(&header(FrameType::Ping as u8, 8));
    ping.extend_from_slice(b"12345678");
    send(&mut c, &ping).await;
    loop {
        let (t, p) = read_raw_frame(&mut c).await;
        if t == FrameType::Pong as u8 {
            assert_eq!(p, b"12345678");
            break;
        }
    }
    drop(c);

    // SendPacket with a 65537-byte packet: one byte over the limit.
    let mut c = raw_derp(&s).await;
    let mut over = Vec::new();
    frame::encode_send_packet(&mut over, &NodePublic([7; 32]), &vec![0u8; 65_537]).unwrap();
    send(&mut c, &over).await;
    closed_within(&mut c, quick).await;

    // A truncated frame, then EOF.
    let mut c = raw_derp(&s).await;
    let mut cut = header(FrameType::SendPacket as u8, 100);
    cut.extend_from_slice(&[1; 10]);
    send(&mut c, &cut).await;
    c.shutdown().await.unwrap();
    closed_within(&mut c, quick).await;

    // Mesh-only frames from a regular client.
    let mut c = raw_derp(&s).await;
    send(&mut c, &header(FrameType::WatchConns as u8, 0)).await;
    closed_within(&mut c, quick).await;

    // During the handshake: a 4 GiB ClientInfo, a first frame that is not ClientInfo, a
    // ClientInfo with a zero key, and a truncated ClientInfo then EOF.
    let hello = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n";
    for first in [
        header(FrameType::ClientInfo as u8, u32::MAX),
        header(FrameType::SendPacket as u8, 40),
        [header(FrameType::ClientInfo as u8, 80), vec![0; 80]].concat(),
        [header(FrameType::ClientInfo as u8, 80), vec![1; 20]].concat(),
    ] {
        let mut c = TcpStream::connect(s.derp_addr).await.unwrap();
        send(&mut c, &[hello.as_slice(), &first].concat()).await;
        let _ = c.shutdown().await;
        closed_within(&mut c, quick).await;
    }

    eventually("only the pair connected", T, || {
        s.derp.metrics.connections.get() == 2 && s.derp.registry.client_count() == 2
    })
    .await;
    let (n, worst) = probe.finish(10).await;
    let grew = rss_kib().saturating_sub(rss0);
    eprintln!("malformed frames: pair {n} round trips, worst {worst:?}; RSS +{grew} KiB");
    // The 4 GiB headers allocated nothing; the 1 MiB frames were never buffered whole.
    assert!(grew < 32 * 1024, "RSS grew by {grew} KiB");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_is_cut_by_the_write_timeout() {
    let _serial = SERIAL.lock().await;
    let write_timeout = Duration::from_millis(300);
    let mut cfg = Config::for_tests();
    cfg.derp.write_timeout = Some(write_timeout);
    let s = server(cfg).await;
    let probe = Probe::plain(&s).await;
    let sender = connect(&url(&s)).await;
    let rss0 = rss_kib();

    // The stalled client: a small receive buffer, handshake done, then it never reads again.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.derp_addr.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let (stalled, stalled_key) = raw_derp_on(TcpStream::from_std(sock.into()).unwrap(), &s).await;
    eventually("stalled client registered", T, || {
        s.derp.registry.client_count() == 4
    })
    .await;

    let t0 = Instant::now();
    let big = vec![0x42u8; 64 << 10];
    let mut sent = 0u64;
    while s.derp.registry.client_count() == 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the stalled reader was never cut ({sent} packets sent to it)"
        );
        sender.tx.send_packet(&stalled_key, &big).await.unwrap();
        sent += 1;
        if sent.is_multiple_of(16) {
            sleep(Duration::from_millis(5)).await;
        }
    }
    let cut_after = t0.elapsed();
    assert!(dropped(&s, "write_error", "other") >= 1);
    let (n, worst) = probe.finish(10).await;
    let grew = rss_kib().saturating_sub(rss0);
    eprintln!(
        "never-reading client: cut {cut_after:?} after the flood began ({sent} x 64 KiB sent to it, \
         write timeout {write_timeout:?}); pair {n} round trips, worst {worst:?}; RSS +{grew} KiB"
    );
    // Its queue is 32 packets deep: at most a few MiB were ever held for it.
    assert!(grew < 32 * 1024, "RSS grew by {grew} KiB");
    drop(stalled);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_thousands_of_unknown_keys_grows_nothing() {
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 50_000;
    let s = plain().await;
    let probe = Probe::plain(&s).await;
    let Peer { tx, mut rx, .. } = connect(&url(&s)).await;
    let rss0 = rss_kib();
    let t0 = Instant::now();
    // Disco-shaped packets (those earn PeerGone NotHere) and plain ones, each to a new key.
    let mut disco = frame::DISCO_MAGIC.to_vec();
    disco.resize(frame::MIN_DISCO_BYTES + 16, 0);
    let notes = tokio::spawn(async move {
        let mut not_here = 0u64;
        let until = Instant::now() + Duration::from_secs(5);
        while let Ok(Ok(f)) = tokio::time::timeout_at(until, rx.recv()).await {
            if let ServerToClient::PeerGone {
                reason: PeerGoneReason::NotHere,
                ..
            } = f
            {
                not_here += 1;
            }
        }
        not_here
    });
    // In 20 bursts over about two seconds, so the NotHere limiter refills in between.
    for i in 0..KEYS {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64).to_be_bytes());
        k[31] = 0xEE;
        tx.send_packet(&NodePublic(k), &disco).await.unwrap();
        tx.send_packet(&NodePublic(k), b"not disco").await.unwrap();
        if (i + 1) % (KEYS / 20) == 0 {
            sleep(Duration::from_millis(100)).await;
        }
    }
    let sent_for = t0.elapsed();
    eventually("every packet counted", T, || {
        dropped(&s, "unknown_dest", "disco") == KEYS as u64
            && dropped(&s, "unknown_dest", "other") == KEYS as u64
    })
    .await;
    let not_here = notes.await.unwrap();
    let window = t0.elapsed();
    // Burst 3, then one per second while the packets keep coming.
    let allowed = 3 + sent_for.as_secs() + 1;
    assert!(
        not_here <= allowed,
        "{not_here} NotHere notices in {window:?} (at most {allowed})"
    );
    assert!(not_here >= 3, "the first NotHere notices were sent");
    assert_eq!(s.derp.registry.client_count(), 3);
    assert_eq!(s.derp.metrics.clients.get(), 3);
    let (n, worst) = probe.finish(10).await;
    let grew = rss_kib().saturating_sub(rss0);
    eprintln!(
        "unknown keys: {} packets to {KEYS} keys in {sent_for:?}; {not_here} NotHere in {window:?}; \
         pair {n} round trips, worst {worst:?}; RSS +{grew} KiB",
        2 * KEYS
    );
    // Any per-key state (a map entry of a key and a little more, ~100 bytes) would be ~5 MiB.
    assert!(
        grew < 4 * 1024,
        "RSS grew by {grew} KiB for {KEYS} unknown keys"
    );
    s.shutdown().await;
}
