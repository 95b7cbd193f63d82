//! Soak: client pairs connect (fresh keys every time), relay a trickle in both directions,
//! poke an unknown key now and then (PeerGone), and leave after a random lifetime, for the
//! whole duration. Every few seconds the server's RSS, open fds, threads and
//! `derper_connections` gauge go into a CSV; at the end the slope of each line is reported.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use derp_client::{ServerToClient, TlsTrust};
use derp_proto::NodePrivate;
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::procfs;

#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub url: String,
    pub trust: TlsTrust,
    pub clients: usize,
    pub duration: Duration,
    pub interval: Duration,
    pub pid: u32,
    pub metrics: Option<SocketAddr>,
    pub csv: PathBuf,
    pub min_life: Duration,
    pub max_life: Duration,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Slope {
    pub name: &'static str,
    pub mean: f64,
    /// Least-squares slope per minute over the steady part (after the ramp-up).
    pub per_minute: f64,
    /// Slope times the steady part's length, as a fraction of the mean.
    pub drift_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    pub clients: usize,
    pub seconds: f64,
    pub samples: usize,
    /// Slopes use the samples from here on.
    pub steady_from_s: f64,
    pub connects: u64,
    pub connect_errors: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub client_errors: u64,
    pub slopes: Vec<Slope>,
    /// After every client left: connections gauge, fds, RSS.
    pub drained_connections: Option<f64>,
    pub drained_fds: u64,
    pub drained_rss_kib: u64,
}

async fn scrape_connections(addr: SocketAddr) -> Option<f64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("derper_connections "))
            .and_then(|v| v.trim().parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

/// One pair's life cycle, over and over until `stop`.
async fn pair_loop(spec: Arc<SoakSpec>, c: Arc<Counters>, stop: CancellationToken) {
    let first = rand::thread_rng().gen_range(0..spec.max_life.as_millis().max(1) as u64);
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(first)) => {}
    }
    while !stop.is_cancelled() {
        if let Err(e) = one_life(&spec, &c, &stop).await {
            c.errors.fetch_add(1, Ordering::Relaxed);
            tracing_like(&e);
        }
        let pause = rand::thread_rng().gen_range(0..1000);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
        }
    }
}

fn tracing_like(e: &anyhow::Error) {
    static SHOWN: AtomicU64 = AtomicU64::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("soak: client error: {e:#}");
    }
}

async fn one_life(spec: &SoakSpec, c: &Counters, stop: &CancellationToken) -> Result<()> {
    let connect = |_| async {
        let cfg = crate::load::client_config(&spec.url, &spec.trust);
        match derp_client::Client::connect(&cfg).await {
            Ok(cl) => {
                c.connects.fetch_add(1, Ordering::Relaxed);
                Ok(cl)
            }
            Err(e) => {
                c.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    };
    let a = connect(0).await.context("connecting A")?;
    let b = connect(1).await.context("connecting B")?;
    let (life, size, gap) = {
        let mut r = rand::thread_rng();
        let life = r.gen_range(spec.min_life.as_millis()..=spec.max_life.as_millis()) as u64;
        (
            Duration::from_millis(life),
            r.gen_range(64..=2048usize),
            Duration::from_millis(r.gen_range(50..250)),
        )
    };
    let (a_tx, mut a_rx) = a.split();
    let (b_tx, mut b_rx) = b.split();
    let end = Instant::now() + life;
    let pkt = vec![0x42u8; size];
    let mut tick = tokio::time::interval(gap);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => {
                n += 1;
                a_tx.send_packet(&b_tx.public_key(), &pkt).await?;
                c.sent.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(4) {
                    b_tx.send_packet(&a_tx.public_key(), &pkt[..64]).await?;
                    c.sent.fetch_add(1, Ordering::Relaxed);
                }
                if n.is_multiple_of(16) {
                    // Disco-shaped packet to a key nobody holds: the server answers PeerGone.
                    let nobody = NodePrivate::generate().public();
                    let mut disco = b"TS\xf0\x9f\x92\xac".to_vec();
                    disco.resize(64, 0);
                    a_tx.send_packet(&nobody, &disco).await?;
                }
            }
            m = a_rx.recv() => if let ServerToClient::RecvPacket { .. } = m? {
                c.received.fetch_add(1, Ordering::Relaxed);
            },
            m = b_rx.recv() => if let ServerToClient::RecvPacket { .. } = m? {
                c.received.fetch_add(1, Ordering::Relaxed);
            },
        }
    }
    let _ = a_tx.close().await;
    let _ = b_tx.close().await;
    Ok(())
}

/// Least squares over the samples taken at or after `from_s` (the ramp-up is left out).
fn slope(name: &'static str, xs: &[f64], ys: &[f64], from_s: f64) -> Slope {
    let skip = xs.iter().take_while(|x| **x < from_s).count();
    let (xs, ys) = (&xs[skip..], &ys[skip..]);
    let n = xs.len() as f64;
    let mx = xs.iter().sum::<f64>() / n.max(1.0);
    let my = ys.iter().sum::<f64>() / n.max(1.0);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let per_sec = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let span = xs.last().copied().unwrap_or(0.0) - xs.first().copied().unwrap_or(0.0);
    Slope {
        name,
        mean: my,
        per_minute: per_sec * 60.0,
        drift_fraction: if my.abs() > 0.0 {
            per_sec * span / my
        } else {
            0.0
        },
    }
}

pub async fn run(spec: SoakSpec) -> Result<SoakResult> {
    let spec = Arc::new(spec);
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..spec.clients / 2 {
        workers.spawn(pair_loop(spec.clone(), counters.clone(), stop.clone()));
    }
    let mut csv = std::fs::File::create(&spec.csv)
        .with_context(|| format!("creating {}", spec.csv.display()))?;
    writeln!(
        csv,
        "t_s,rss_kib,fds,threads,derper_connections,connects,packets_sent,packets_received,client_errors"
    )?;
    let start = Instant::now();
    let end = start + spec.duration;
    let mut cols: [Vec<f64>; 5] = Default::default();
    let mut next = start;
    while next <= end {
        tokio::time::sleep_until(next).await;
        let t = start.elapsed().as_secs_f64();
        let rss = procfs::rss_kib(spec.pid)? as f64;
        let fds = procfs::open_fds(spec.pid)? as f64;
        let thr = procfs::threads(spec.pid)? as f64;
        let conns = match spec.metrics {
            Some(a) => scrape_connections(a).await,
            None => None,
        };
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        writeln!(
            csv,
            "{t:.1},{rss},{fds},{thr},{},{},{},{},{}",
            conns.map(|c| c.to_string()).unwrap_or_default(),
            ld(&counters.connects),
            ld(&counters.sent),
            ld(&counters.received),
            ld(&counters.errors),
        )?;
        csv.flush()?;
        for (col, v) in cols
            .iter_mut()
            .zip([t, rss, fds, thr, conns.unwrap_or(f64::NAN)])
        {
            col.push(v);
        }
        next += spec.interval;
    }
    stop.cancel();
    // Clients close with a bounded write timeout; give them a little while, then drop the rest.
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let drained_connections = match spec.metrics {
        Some(a) => scrape_connections(a).await,
        None => None,
    };
    let t = &cols[0];
    // Pairs start spread over one lifetime; the population is steady after about 1.5 of them.
    let from = (spec.duration.as_secs_f64() / 10.0).max(spec.max_life.as_secs_f64() * 1.5);
    let mut slopes = vec![
        slope("rss_kib", t, &cols[1], from),
        slope("fds", t, &cols[2], from),
        slope("threads", t, &cols[3], from),
    ];
    if cols[4].iter().all(|v| v.is_finite()) {
        slopes.push(slope("derper_connections", t, &cols[4], from));
    }
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(SoakResult {
        clients: spec.clients,
        seconds: spec.duration.as_secs_f64(),
        samples: t.len(),
        steady_from_s: from,
        connects: ld(&counters.connects),
        connect_errors: ld(&counters.connect_errors),
        packets_sent: ld(&counters.sent),
        packets_received: ld(&counters.received),
        client_errors: ld(&counters.errors),
        slopes,
        drained_connections,
        drained_fds: procfs::open_fds(spec.pid)?,
        drained_rss_kib: procfs::rss_kib(spec.pid)?,
    })
}
