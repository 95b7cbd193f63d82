//! The relay load engine: N client pairs (A sends to B) with a bounded window of packets in
//! flight per pair, optionally paced to a total rate; every packet carries its send time, so
//! the receiver measures one-way delay (sender and receiver share this process's clock).
//! Optional extras in the same run: a paced probe flow of small packets (derpprobe's
//! queuing-delay probe) and a closed-loop STUN client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use derp_client::{Client, ClientConfig, ClientHandle, ClientReceiver, ServerToClient, TlsTrust};
use derp_proto::NodePrivate;
use derp_proto::NodePublic;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hist::{Hist, Percentiles};
use crate::stun::{StunSpec, StunStats};

/// Smallest packet: 8 bytes of send time and 8 of sequence number.
pub const MIN_PACKET: usize = 16;
/// With no packet delivered for this long, a pair's in-flight packets count as lost and the
/// window opens again (a server that drops must not stall the run).
const STALL: Duration = Duration::from_millis(500);
/// Concurrent connects while setting up (TLS + DERP handshakes).
const CONNECT_PARALLEL: usize = 64;

#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub pairs: usize,
    pub size: usize,
    /// Packets in flight per pair (sent, not yet received).
    pub window: u64,
    /// Total packets per second over all pairs; `None` = as fast as the window allows.
    pub rate_pps: Option<f64>,
    /// Packets slower than this count as dropped (derpprobe's -qd-packet-timeout).
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub trust: TlsTrust,
    pub warmup: Duration,
    pub duration: Duration,
    pub load: FlowSpec,
    pub probe: Option<FlowSpec>,
    pub stun: Option<StunSpec>,
    pub server_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct FlowStats {
    pub pairs: usize,
    pub size: usize,
    pub window: u64,
    pub rate_target_pps: Option<f64>,
    /// Packets received inside the measurement window.
    pub packets: u64,
    pub pps: f64,
    /// Payload megabytes (10^6) per second received.
    pub mb_per_s: f64,
    pub latency: Percentiles,
    /// Packets presumed lost (window stalls, or later than the timeout).
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadResult {
    pub seconds: f64,
    pub load: FlowStats,
    pub probe: Option<FlowStats>,
    pub stun: Option<StunStats>,
    pub server_cpu_s: Option<f64>,
    /// Server CPU seconds over the measurement window per GB (10^9 payload bytes) relayed.
    pub server_cpu_s_per_gb: Option<f64>,
    /// Server CPU use over the window (1.0 = one core busy).
    pub server_cpu_util: Option<f64>,
    /// This load generator's own CPU over the window: well under 1.0 while the server is not
    /// busy either means other processes took the generator's core (a noisy run, not a result).
    pub load_cpu_util: f64,
    /// The generator's CPU seconds per GB relayed (its efficiency, independent of core sharing).
    pub load_cpu_s_per_gb: Option<f64>,
}

pub fn client_config(url: &str, trust: &TlsTrust) -> ClientConfig {
    let mut c = ClientConfig::new(url.to_owned(), NodePrivate::generate());
    c.tls = trust.clone();
    c.read_timeout = None;
    c.connect_timeout = Duration::from_secs(30);
    c
}

/// Connects `n` clients, at most [`CONNECT_PARALLEL`] at a time.
pub async fn connect_many(url: &str, trust: &TlsTrust, n: usize) -> Result<Vec<Client>> {
    let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let cfg = client_config(url, trust);
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, Client::connect(&cfg).await)
        });
    }
    let mut out: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r.context("connect task")?;
        out[i] = Some(c.with_context(|| format!("connecting client {i}"))?);
    }
    Ok(out.into_iter().flatten().collect())
}

struct Clock {
    base: Instant,
    t0: Instant,
    t1: Instant,
}

impl Clock {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    fn in_window(&self, t: Instant) -> bool {
        t >= self.t0 && t < self.t1
    }
}

struct PairShared {
    received: AtomicU64,
    progress: Notify,
}

#[derive(Default)]
struct RecvStats {
    packets: u64,
    bytes: u64,
    late: u64,
    hist: Hist,
}

async fn receive(
    mut rx: ClientReceiver,
    shared: Arc<PairShared>,
    clock: Arc<Clock>,
    timeout: Option<Duration>,
    stop: CancellationToken,
) -> Result<RecvStats> {
    let mut st = RecvStats::default();
    let timeout_ns = timeout.map(|d| d.as_nanos() as u64);
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(st),
            m = rx.recv() => m.context("receiving")?,
        };
        let ServerToClient::RecvPacket { packet: data, .. } = msg else {
            continue;
        };
        let now = Instant::now();
        shared.received.fetch_add(1, Ordering::Relaxed);
        shared.progress.notify_one();
        if data.len() < MIN_PACKET || !clock.in_window(now) {
            continue;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&data[..8]);
        let sent_ns = u64::from_be_bytes(ts);
        let lat = now.duration_since(clock.base).as_nanos() as u64;
        let lat = lat.saturating_sub(sent_ns);
        if timeout_ns.is_some_and(|t| lat > t) {
            st.late += 1;
            continue;
        }
        st.packets += 1;
        st.bytes += data.len() as u64;
        st.hist.record_ns(lat);
    }
}

async fn send(
    tx: ClientHandle,
    dst: NodePublic,
    spec: FlowSpec,
    pair_rate: Option<f64>,
    shared: Arc<PairShared>,
    clock: Arc<Clock>,
    stop: CancellationToken,
) -> Result<u64> {
    let size = spec.size.max(MIN_PACKET);
    let window = spec.window.max(1);
    let mut buf = vec![0xa5u8; size * window as usize];
    let mut sent = 0u64;
    let mut lost = 0u64;
    let mut seq = 0u64;
    let start = Instant::now();
    // Paced flows: packets due so far, re-based when we fall far behind (no catch-up bursts).
    let mut paced_from = (start, 0u64);
    loop {
        if stop.is_cancelled() {
            return Ok(lost);
        }
        let received = shared.received.load(Ordering::Relaxed);
        let mut room = (received + lost + window).saturating_sub(sent);
        if room == 0 {
            tokio::select! {
                _ = stop.cancelled() => return Ok(lost),
                _ = shared.progress.notified() => {}
                _ = tokio::time::sleep(STALL) => {
                    if shared.received.load(Ordering::Relaxed) == received {
                        lost += sent - received - lost;
                    }
                }
            }
            continue;
        }
        if let Some(rate) = pair_rate {
            let (from, base) = paced_from;
            let due = base + (from.elapsed().as_secs_f64() * rate) as u64;
            if due <= sent {
                let next = from + Duration::from_secs_f64((sent + 1 - base) as f64 / rate);
                tokio::select! {
                    _ = stop.cancelled() => return Ok(lost),
                    _ = tokio::time::sleep_until(next) => {}
                }
                continue;
            }
            if due - sent > window {
                paced_from = (Instant::now(), sent);
            }
            room = room.min(due - sent).max(1);
        }
        let n = room as usize;
        let ts = clock.now_ns().to_be_bytes();
        for p in buf.chunks_mut(size).take(n) {
            p[..8].copy_from_slice(&ts);
            p[8..16].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(lost),
            r = tx.send_packets(&dst, buf.chunks(size).take(n)) => r.context("sending")?,
        }
        sent += n as u64;
    }
}

struct FlowTasks {
    spec: FlowSpec,
    recv: Vec<tokio::task::JoinHandle<Result<RecvStats>>>,
    send: Vec<tokio::task::JoinHandle<Result<u64>>>,
    /// Kept so the connections stay open until the end.
    _handles: Vec<ClientHandle>,
}

async fn connect_flow(url: &str, trust: &TlsTrust, spec: &FlowSpec) -> Result<Vec<Client>> {
    if spec.size > derp_proto::frame::MAX_PACKET_BYTES {
        bail!("packet size {} exceeds 64 KiB", spec.size);
    }
    connect_many(url, trust, spec.pairs * 2).await
}

fn start_flow(
    clients: Vec<Client>,
    spec: &FlowSpec,
    clock: &Arc<Clock>,
    stop: &CancellationToken,
) -> FlowTasks {
    let pair_rate = spec.rate_pps.map(|r| r / spec.pairs as f64);
    let mut it = clients.into_iter();
    let mut t = FlowTasks {
        spec: spec.clone(),
        recv: Vec::new(),
        send: Vec::new(),
        _handles: Vec::new(),
    };
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        let (a_tx, _a_rx) = a.split();
        let (b_tx, b_rx) = b.split();
        let shared = Arc::new(PairShared {
            received: AtomicU64::new(0),
            progress: Notify::new(),
        });
        t.recv.push(tokio::spawn(receive(
            b_rx,
            shared.clone(),
            clock.clone(),
            spec.timeout,
            stop.clone(),
        )));
        t.send.push(tokio::spawn(send(
            a_tx.clone(),
            b_tx.public_key(),
            spec.clone(),
            pair_rate,
            shared,
            clock.clone(),
            stop.clone(),
        )));
        t._handles.push(a_tx);
        t._handles.push(b_tx);
    }
    t
}

async fn finish_flow(t: FlowTasks, secs: f64) -> Result<FlowStats> {
    let mut hist = Hist::default();
    let (mut packets, mut bytes, mut lost) = (0u64, 0u64, 0u64);
    for h in t.recv {
        let st = h.await.context("receiver task")??;
        hist.merge(&st.hist);
        packets += st.packets;
        bytes += st.bytes;
        lost += st.late;
    }
    for h in t.send {
        lost += h.await.context("sender task")??;
    }
    Ok(FlowStats {
        pairs: t.spec.pairs,
        size: t.spec.size,
        window: t.spec.window,
        rate_target_pps: t.spec.rate_pps,
        packets,
        pps: packets as f64 / secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        latency: hist.percentiles(),
        lost,
    })
}

pub async fn run(spec: LoadSpec) -> Result<LoadResult> {
    let stop = CancellationToken::new();
    let load_clients = connect_flow(&spec.url, &spec.trust, &spec.load).await?;
    let probe_clients = match &spec.probe {
        Some(p) => Some(connect_flow(&spec.url, &spec.trust, p).await?),
        None => None,
    };
    let base = Instant::now();
    let t0 = base + spec.warmup;
    let clock = Arc::new(Clock {
        base,
        t0,
        t1: t0 + spec.duration,
    });
    let load = start_flow(load_clients, &spec.load, &clock, &stop);
    let probe = match (&spec.probe, probe_clients) {
        (Some(p), Some(c)) => Some(start_flow(c, p, &clock, &stop)),
        _ => None,
    };
    let stun = spec
        .stun
        .clone()
        .map(|s| tokio::spawn(crate::stun::run(s, clock.t0, clock.t1, stop.clone())));
    tokio::time::sleep_until(clock.t0).await;
    let own0 = crate::procfs::cpu_seconds(std::process::id())?;
    let cpu0 = spec
        .server_pid
        .map(crate::procfs::cpu_seconds)
        .transpose()?;
    tokio::time::sleep_until(clock.t1).await;
    let own = crate::procfs::cpu_seconds(std::process::id())? - own0;
    let cpu1 = spec
        .server_pid
        .map(crate::procfs::cpu_seconds)
        .transpose()?;
    stop.cancel();
    let secs = spec.duration.as_secs_f64();
    let load = finish_flow(load, secs).await?;
    let probe = match probe {
        Some(p) => Some(finish_flow(p, secs).await?),
        None => None,
    };
    let stun = match stun {
        Some(h) => Some(h.await.context("STUN task")??),
        None => None,
    };
    let server_cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let gb = load.mb_per_s * secs / 1e3;
    Ok(LoadResult {
        seconds: secs,
        server_cpu_s_per_gb: server_cpu_s.filter(|_| gb > 0.0).map(|c| c / gb),
        server_cpu_util: server_cpu_s.map(|c| c / secs),
        server_cpu_s,
        load_cpu_util: own / secs,
        load_cpu_s_per_gb: (gb > 0.0).then(|| own / gb),
        load,
        probe,
        stun,
    })
}
