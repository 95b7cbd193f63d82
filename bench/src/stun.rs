//! A closed-loop STUN client: each socket keeps `window` binding requests outstanding and sends
//! a new one for every response; responses inside the measurement window are counted and timed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use derp_proto::stun;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::hist::{Hist, Percentiles};

/// With no response for this long, the outstanding requests count as lost and are re-sent.
const STUN_STALL: Duration = Duration::from_millis(200);
/// Send times are kept in a ring this large, indexed by sequence number.
const RING: usize = 4096;

#[derive(Debug, Clone)]
pub struct StunSpec {
    pub addr: SocketAddr,
    pub sockets: usize,
    /// Requests outstanding per socket (at most RING / 2).
    pub window: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct StunStats {
    pub sockets: usize,
    pub window: usize,
    pub responses: u64,
    pub rps: f64,
    pub latency: Percentiles,
    pub lost: u64,
}

fn request(seq: u64, sock_id: u32) -> [u8; stun::REQUEST_LEN] {
    let mut tx = [0u8; stun::TXID_LEN];
    tx[..8].copy_from_slice(&seq.to_be_bytes());
    tx[8..].copy_from_slice(&sock_id.to_be_bytes());
    stun::binding_request(&tx)
}

struct SockStats {
    responses: u64,
    lost: u64,
    hist: Hist,
}

async fn one_socket(
    spec: StunSpec,
    id: u32,
    t0: Instant,
    t1: Instant,
    stop: CancellationToken,
) -> Result<SockStats> {
    let sock = UdpSocket::bind("127.0.0.1:0")
        .await
        .context("binding UDP")?;
    sock.connect(spec.addr).await.context("connecting UDP")?;
    let window = spec.window.clamp(1, RING / 2);
    let mut sent_at: Vec<Option<(u64, Instant)>> = vec![None; RING];
    let mut seq = 0u64;
    let mut st = SockStats {
        responses: 0,
        lost: 0,
        hist: Hist::default(),
    };
    let mut buf = [0u8; 512];
    let mut outstanding = 0usize;
    loop {
        while outstanding < window {
            sent_at[(seq as usize) % RING] = Some((seq, Instant::now()));
            // A full socket buffer (EAGAIN is handled by tokio) or ICMP error: count and go on.
            if sock.send(&request(seq, id)).await.is_err() {
                st.lost += 1;
            } else {
                outstanding += 1;
            }
            seq += 1;
        }
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(st),
            r = tokio::time::timeout(STUN_STALL, sock.recv(&mut buf)) => match r {
                Err(_) => {
                    st.lost += outstanding as u64;
                    outstanding = 0;
                    continue;
                }
                Ok(Err(_)) => continue,
                Ok(Ok(n)) => n,
            },
        };
        let now = Instant::now();
        let Ok((tx, _addr)) = stun::parse_response(&buf[..n]) else {
            continue;
        };
        let mut s = [0u8; 8];
        s.copy_from_slice(&tx[..8]);
        let rseq = u64::from_be_bytes(s);
        let slot = &mut sent_at[(rseq as usize) % RING];
        match *slot {
            Some((want, at)) if want == rseq => {
                *slot = None;
                outstanding = outstanding.saturating_sub(1);
                if now >= t0 && now < t1 {
                    st.responses += 1;
                    st.hist.record_ns(now.duration_since(at).as_nanos() as u64);
                }
            }
            // Late answer to a request already written off.
            _ => {}
        }
    }
}

pub async fn run(
    spec: StunSpec,
    t0: Instant,
    t1: Instant,
    stop: CancellationToken,
) -> Result<StunStats> {
    let mut tasks = Vec::new();
    for id in 0..spec.sockets.max(1) {
        tasks.push(tokio::spawn(one_socket(
            spec.clone(),
            id as u32,
            t0,
            t1,
            stop.clone(),
        )));
    }
    let mut hist = Hist::default();
    let (mut responses, mut lost) = (0, 0);
    for t in tasks {
        let st = t.await.context("STUN socket task")??;
        hist.merge(&st.hist);
        responses += st.responses;
        lost += st.lost;
    }
    let secs = t1.duration_since(t0).as_secs_f64();
    Ok(StunStats {
        sockets: spec.sockets,
        window: spec.window,
        responses,
        rps: responses as f64 / secs,
        latency: hist.percentiles(),
        lost,
    })
}
