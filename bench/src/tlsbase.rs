//! The baseline a relay is measured against: a plain TLS echo over loopback. The server
//! decrypts and re-encrypts every byte once, as a relay does, with the same rustls (ring)
//! settings and write batching as our derper; nothing else (no framing, no routing).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const CHUNK: usize = 64 << 10;

pub async fn serve(listen: SocketAddr, cert: &Path, key: &Path) -> Result<()> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .context("parsing certificate PEM")?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    // The same cipher choice as our derper (and Go's): AES-128-GCM first, server's order.
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server certificate")?;
    cfg.ignore_client_order = true;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let ln = TcpListener::bind(listen).await.context("binding")?;
    eprintln!("tls-echo-server: listening on {}", ln.local_addr()?);
    loop {
        let (tcp, _) = ln.accept().await.context("accepting")?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(s) = acceptor.accept(tcp).await else {
                return;
            };
            // Shaped like a relay connection: a reader appends to a pending buffer, a writer
            // takes all of it per wake-up and writes it in one go (the derper's batching).
            let (mut rd, mut wr) = tokio::io::split(s);
            let pending = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
            let wake = Arc::new(tokio::sync::Notify::new());
            let (p2, w2) = (pending.clone(), wake.clone());
            let writer = tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    w2.notified().await;
                    {
                        let mut p = p2.lock().unwrap_or_else(|e| e.into_inner());
                        std::mem::swap(&mut *p, &mut out);
                    }
                    if out.is_empty() {
                        continue;
                    }
                    if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                        return;
                    }
                    out.clear();
                }
            });
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
                wake.notify_one();
            }
            writer.abort();
        });
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EchoResult {
    pub conns: usize,
    pub window_bytes: usize,
    pub mb_per_s: f64,
    pub cipher: String,
    /// The client's own CPU over the window (1.0 = its core busy) and per GB echoed, to
    /// compare with the relay generator's `load_cpu_*`.
    pub load_cpu_util: f64,
    pub load_cpu_s_per_gb: Option<f64>,
    /// The echo server's CPU over the window, when its pid is given.
    pub server_cpu_util: Option<f64>,
    pub server_cpu_s_per_gb: Option<f64>,
}

pub async fn client(
    addr: SocketAddr,
    conns: usize,
    window_bytes: usize,
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
) -> Result<EchoResult> {
    let (streams, cipher) = connect_all(addr, conns).await?;
    let t0 = Instant::now() + warmup;
    let t1 = t0 + duration;
    let stop = CancellationToken::new();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| echo_stream(s, window_bytes, t0, t1, &stop))
        .collect();
    let cpu = || -> Result<(f64, Option<f64>)> {
        Ok((
            crate::procfs::cpu_seconds(std::process::id())?,
            server_pid.map(crate::procfs::cpu_seconds).transpose()?,
        ))
    };
    tokio::time::sleep_until(t0).await;
    let (own0, srv0) = cpu()?;
    tokio::time::sleep_until(t1).await;
    let (own1, srv1) = cpu()?;
    stop.cancel();
    let mut total = 0usize;
    for t in tasks {
        total += t.await.context("echo reader")??;
    }
    let secs = duration.as_secs_f64();
    let gb = total as f64 / 1e9;
    let per_gb = |s: f64| (gb > 0.0).then(|| s / gb);
    let srv = srv0.zip(srv1).map(|(a, b)| b - a);
    Ok(EchoResult {
        conns,
        window_bytes,
        mb_per_s: total as f64 / secs / 1e6,
        cipher,
        load_cpu_util: (own1 - own0) / secs,
        load_cpu_s_per_gb: per_gb(own1 - own0),
        server_cpu_util: srv.map(|s| s / secs),
        server_cpu_s_per_gb: srv.and_then(per_gb),
    })
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// `conns` (at least one) TLS connections to `addr`, and the cipher suite they negotiated.
async fn connect_all(addr: SocketAddr, conns: usize) -> Result<(Vec<ClientStream>, String)> {
    // The same trust code the DERP client uses (InsecureForTests: any certificate).
    let cfg = derp_client::tls::client_config(&derp_client::TlsTrust::Insecure, None)
        .map_err(|e| anyhow::anyhow!("TLS config: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut streams = Vec::new();
    let mut cipher = String::new();
    for _ in 0..conns.max(1) {
        let tcp = TcpStream::connect(addr).await.context("connecting")?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("127.0.0.1").context("server name")?;
        let s = connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        cipher = format!(
            "{:?}",
            s.get_ref().1.negotiated_cipher_suite().map(|c| c.suite())
        );
        streams.push(s);
    }
    Ok((streams, cipher))
}

/// Keeps `window_bytes` in flight on one connection until `stop`; the task it returns counts
/// the bytes echoed back between `t0` and `t1`.
fn echo_stream(
    s: ClientStream,
    window_bytes: usize,
    t0: Instant,
    t1: Instant,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<Result<usize>> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let echoed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let (e2, p2, stop2) = (echoed.clone(), progress.clone(), stop.clone());
    tokio::spawn(async move {
        let chunk = vec![0x5au8; CHUNK];
        let mut sent = 0usize;
        loop {
            if sent + CHUNK > e2.load(std::sync::atomic::Ordering::Relaxed) + window_bytes {
                tokio::select! {
                    _ = stop2.cancelled() => return,
                    _ = p2.notified() => continue,
                }
            }
            tokio::select! {
                _ = stop2.cancelled() => return,
                r = wr.write_all(&chunk) => if r.is_err() { return },
            }
            sent += CHUNK;
        }
    });
    let stop3 = stop.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut in_window = 0usize;
        loop {
            let n = tokio::select! {
                _ = stop3.cancelled() => return Ok::<usize, anyhow::Error>(in_window),
                r = rd.read(&mut buf) => r.context("reading echo")?,
            };
            if n == 0 {
                bail!("echo server closed");
            }
            let now = Instant::now();
            if now >= t0 && now < t1 {
                in_window += n;
            }
            echoed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            progress.notify_one();
        }
    })
}
