//! A closed-loop STUN client: each socket keeps `window` binding requests outstanding and sends
//! a new one for every response; responses inside the measurement window are counted and timed.
//!
//! On Linux each socket sends its refill with one `sendmmsg` and drains what has arrived with
//! one `recvmmsg`, so the generator's own syscalls and wake-ups stay well below the server's
//! (the one-request-per-syscall loop was the limit, not the servers).

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
    /// Poll the sockets from a thread of their own without sleeping (Linux; the `stun`
    /// command), rather than as tokio tasks that share the runtime (relay + STUN).
    pub busy: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct StunStats {
    pub sockets: usize,
    pub window: usize,
    pub responses: u64,
    pub rps: f64,
    pub latency: Percentiles,
    pub lost: u64,
    /// With `--server-pid`: the server's CPU seconds inside the window, per second of window
    /// (1.0 = its core saturated), and per answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_util: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_req: Option<f64>,
}

fn request(seq: u64, sock_id: u32) -> [u8; stun::REQUEST_LEN] {
    let mut tx = [0u8; stun::TXID_LEN];
    tx[..8].copy_from_slice(&seq.to_be_bytes());
    tx[8..].copy_from_slice(&sock_id.to_be_bytes());
    stun::binding_request(&tx)
}

#[derive(Default)]
struct SockStats {
    responses: u64,
    lost: u64,
    hist: Hist,
}

/// The measurement window and the stop signal, as each socket task gets them.
struct Span {
    t0: Instant,
    t1: Instant,
    stop: CancellationToken,
}

impl StunSpec {
    /// Requests outstanding per socket, as used.
    fn window(&self) -> usize {
        self.window.clamp(1, RING / 2)
    }
}

async fn connect(addr: SocketAddr) -> Result<UdpSocket> {
    let sock = UdpSocket::bind("127.0.0.1:0")
        .await
        .context("binding UDP")?;
    sock.connect(addr).await.context("connecting UDP")?;
    Ok(sock)
}

/// The send time of each outstanding request, by sequence number.
struct Ring {
    sent_at: Vec<Option<(u64, Instant)>>,
}

impl Ring {
    fn new() -> Self {
        Ring {
            sent_at: vec![None; RING],
        }
    }

    fn sent(&mut self, seq: u64, at: Instant) {
        self.sent_at[(seq as usize) % RING] = Some((seq, at));
    }

    /// Matches a response; `None` for a late answer to a request already written off.
    fn answered(&mut self, pkt: &[u8]) -> Option<Instant> {
        let (tx, _addr) = stun::parse_response(pkt).ok()?;
        let mut s = [0u8; 8];
        s.copy_from_slice(&tx[..8]);
        let rseq = u64::from_be_bytes(s);
        let slot = &mut self.sent_at[(rseq as usize) % RING];
        match *slot {
            Some((want, at)) if want == rseq => {
                *slot = None;
                Some(at)
            }
            _ => None,
        }
    }
}

#[cfg(target_os = "linux")]
mod batch {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::os::fd::{AsFd, AsRawFd};

    use anyhow::Context;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::{Ring, STUN_STALL, SockStats, StunSpec, request};

    use derp_proto::stun;
    use nix::sys::socket::{MsgFlags, MultiHeaders, recvmmsg};
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, sendmmsg};
    use tokio::net::UdpSocket;

    /// Datagrams per `sendmmsg`/`recvmmsg`.
    pub const BATCH: usize = 64;
    /// Receive slot: answers are 32 or 44 bytes.
    pub const SLOT: usize = 128;

    /// Sends `reqs` on the connected socket with as few `sendmmsg` calls as it takes; returns
    /// how many went out (the rest hit an error).
    pub async fn send(sock: &UdpSocket, reqs: &[[u8; stun::REQUEST_LEN]]) -> io::Result<usize> {
        let mut done = 0;
        // Each round sends at least one datagram, waits for room, or ends.
        for _ in 0..=reqs.len() {
            if done >= reqs.len() {
                break;
            }
            // try_io refuses (WouldBlock) until tokio has seen the socket writable once.
            sock.writable().await?;
            match sock.try_io(tokio::io::Interest::WRITABLE, || {
                send_now(sock, &reqs[done..])
            }) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    /// One `sendmmsg` without waiting. The message headers hold raw pointers (not Send), so
    /// they are built here and never live across an await.
    pub fn send_now(sock: impl AsFd, reqs: &[[u8; stun::REQUEST_LEN]]) -> io::Result<usize> {
        let iovs: Vec<[IoSlice<'_>; 1]> = reqs.iter().map(|r| [IoSlice::new(r)]).collect();
        let mut ctrl: Vec<SendAncillaryBuffer<'_, '_, '_>> = (0..reqs.len())
            .map(|_| SendAncillaryBuffer::default())
            .collect();
        let mut msgs: Vec<MMsgHdr<'_>> = iovs
            .iter()
            .zip(ctrl.iter_mut())
            .map(|(io, c)| MMsgHdr::new(io, c))
            .collect();
        Ok(sendmmsg(sock, &mut msgs, SendFlags::DONTWAIT)?)
    }

    /// One `recvmmsg` without waiting into `buf` (BATCH slots of SLOT bytes); the datagram
    /// lengths go to `lens`. `()` as the address type: the sockets are connected.
    pub fn recv_now(
        sock: &impl AsRawFd,
        hdrs: &mut MultiHeaders<()>,
        buf: &mut [u8],
        lens: &mut Vec<usize>,
    ) -> io::Result<usize> {
        lens.clear();
        let mut chunks = buf.chunks_exact_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let res = recvmmsg(
            sock.as_raw_fd(),
            hdrs,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        lens.extend(res.map(|m| m.bytes.min(SLOT)));
        Ok(lens.len())
    }

    /// Reads what is queued without blocking; calls `each` per datagram and returns how many
    /// there were (WouldBlock when none).
    pub fn recv(
        sock: &UdpSocket,
        buf: &mut [u8],
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<usize> {
        let mut lens = Vec::with_capacity(BATCH);
        sock.try_io(tokio::io::Interest::READABLE, || {
            // Not Send, so made per call (one 4 KiB allocation) rather than kept across awaits.
            let mut hdrs = MultiHeaders::<()>::preallocate(BATCH, None);
            recv_now(sock, &mut hdrs, buf, &mut lens)
        })?;
        for (i, &n) in lens.iter().enumerate() {
            each(&buf[i * SLOT..i * SLOT + n]);
        }
        Ok(lens.len())
    }

    /// One socket's side of the busy-polling generator.
    struct Sock {
        sock: std::net::UdpSocket,
        id: u32,
        ring: Ring,
        seq: u64,
        outstanding: usize,
        last_answer: Instant,
        st: SockStats,
    }

    /// The generator for `stun` alone: one thread polls every socket without ever sleeping,
    /// so an answer is read the moment it lands and the server is the only side that can run
    /// out of CPU (it is pinned to its own core; with tokio it waited for wake-ups on a shared
    /// core as much as the server did). Ends at `t1` or `stop`.
    pub fn busy(
        spec: &StunSpec,
        t0: Instant,
        t1: Instant,
        stop: &CancellationToken,
    ) -> anyhow::Result<Vec<SockStats>> {
        let window = spec.window();
        let mut socks = Vec::new();
        for id in 0..spec.sockets.max(1) {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("binding UDP")?;
            sock.connect(spec.addr).context("connecting UDP")?;
            socks.push(Sock {
                sock,
                id: id as u32,
                ring: Ring::new(),
                seq: 0,
                outstanding: 0,
                last_answer: Instant::now(),
                st: SockStats::default(),
            });
        }
        let mut hdrs = MultiHeaders::<()>::preallocate(BATCH, None);
        let mut buf = vec![0u8; BATCH * SLOT];
        let mut lens = Vec::with_capacity(BATCH);
        let mut reqs = Vec::with_capacity(window);
        // Bounded by t1 (and stop): every pass reads the clock.
        while !stop.is_cancelled() {
            let now = Instant::now();
            if now >= t1 {
                break;
            }
            for s in &mut socks {
                if s.outstanding < window {
                    reqs.clear();
                    for i in 0..(window - s.outstanding) as u64 {
                        s.ring.sent(s.seq + i, now);
                        reqs.push(request(s.seq + i, s.id));
                    }
                    // A full socket buffer or an ICMP error: what did not go out is lost.
                    let sent = send_now(&s.sock, &reqs).unwrap_or(0);
                    s.st.lost += (reqs.len() - sent) as u64;
                    s.outstanding += sent;
                    s.seq += reqs.len() as u64;
                }
                let n = recv_now(&s.sock, &mut hdrs, &mut buf, &mut lens).unwrap_or(0);
                let at_recv = Instant::now();
                if n == 0 {
                    if at_recv.duration_since(s.last_answer) > STUN_STALL {
                        s.st.lost += s.outstanding as u64;
                        s.outstanding = 0;
                        s.last_answer = at_recv;
                    }
                    continue;
                }
                s.last_answer = at_recv;
                for (i, &len) in lens.iter().enumerate() {
                    if let Some(at) = s.ring.answered(&buf[i * SLOT..i * SLOT + len]) {
                        s.outstanding = s.outstanding.saturating_sub(1);
                        if at_recv >= t0 && at_recv < t1 {
                            s.st.responses += 1;
                            s.st.hist
                                .record_ns(at_recv.duration_since(at).as_nanos() as u64);
                        }
                    }
                }
            }
        }
        Ok(socks.into_iter().map(|s| s.st).collect())
    }
}

#[cfg(target_os = "linux")]
async fn one_socket(spec: StunSpec, id: u32, span: Span) -> Result<SockStats> {
    let Span { t0, t1, stop } = span;
    let sock = connect(spec.addr).await?;
    let window = spec.window();
    let (mut ring, mut seq, mut st) = (Ring::new(), 0u64, SockStats::default());
    let mut buf = vec![0u8; batch::BATCH * batch::SLOT];
    let mut reqs: Vec<[u8; stun::REQUEST_LEN]> = Vec::with_capacity(window);
    let mut outstanding = 0usize;
    loop {
        if outstanding < window {
            reqs.clear();
            let now = Instant::now();
            for i in 0..(window - outstanding) as u64 {
                ring.sent(seq + i, now);
                reqs.push(request(seq + i, id));
            }
            // A full socket buffer or an ICMP error: what did not go out counts as lost.
            let sent = batch::send(&sock, &reqs).await.unwrap_or(0);
            st.lost += (reqs.len() - sent) as u64;
            outstanding += sent;
            seq += reqs.len() as u64;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(st),
            r = tokio::time::timeout(STUN_STALL, sock.readable()) => match r {
                Err(_) => {
                    st.lost += outstanding as u64;
                    outstanding = 0;
                    continue;
                }
                Ok(Err(_)) => continue,
                Ok(Ok(())) => {}
            },
        }
        let now = Instant::now();
        let r = batch::recv(&sock, &mut buf, |pkt| {
            if let Some(at) = ring.answered(pkt) {
                outstanding = outstanding.saturating_sub(1);
                if now >= t0 && now < t1 {
                    st.responses += 1;
                    st.hist.record_ns(now.duration_since(at).as_nanos() as u64);
                }
            }
        });
        // WouldBlock: a spurious wake-up (try_io cleared the readiness); other errors (ICMP
        // port unreachable while the server starts) just mean nothing to count.
        let _ = r;
    }
}

/// One request per syscall through tokio, for platforms without sendmmsg/recvmmsg.
#[cfg(not(target_os = "linux"))]
async fn one_socket(spec: StunSpec, id: u32, span: Span) -> Result<SockStats> {
    let Span { t0, t1, stop } = span;
    let sock = connect(spec.addr).await?;
    let window = spec.window();
    let (mut ring, mut seq, mut st) = (Ring::new(), 0u64, SockStats::default());
    let mut buf = [0u8; 512];
    let mut outstanding = 0usize;
    loop {
        while outstanding < window {
            ring.sent(seq, Instant::now());
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
        if let Some(at) = ring.answered(&buf[..n]) {
            outstanding = outstanding.saturating_sub(1);
            if now >= t0 && now < t1 {
                st.responses += 1;
                st.hist.record_ns(now.duration_since(at).as_nanos() as u64);
            }
        }
    }
}

pub async fn run(
    spec: StunSpec,
    t0: Instant,
    t1: Instant,
    stop: CancellationToken,
) -> Result<StunStats> {
    let mut hist = Hist::default();
    let (mut responses, mut lost) = (0, 0);
    #[cfg(target_os = "linux")]
    if spec.busy {
        let (sp, st) = (spec.clone(), stop.clone());
        let all = tokio::task::spawn_blocking(move || batch::busy(&sp, t0, t1, &st))
            .await
            .context("STUN thread")??;
        for st in all {
            hist.merge(&st.hist);
            responses += st.responses;
            lost += st.lost;
        }
        return Ok(stats(&spec, t0, t1, hist, responses, lost));
    }
    let mut tasks = Vec::new();
    for id in 0..spec.sockets.max(1) {
        let span = Span {
            t0,
            t1,
            stop: stop.clone(),
        };
        tasks.push(tokio::spawn(one_socket(spec.clone(), id as u32, span)));
    }
    for t in tasks {
        let st = t.await.context("STUN socket task")??;
        hist.merge(&st.hist);
        responses += st.responses;
        lost += st.lost;
    }
    Ok(stats(&spec, t0, t1, hist, responses, lost))
}

fn stats(
    spec: &StunSpec,
    t0: Instant,
    t1: Instant,
    hist: Hist,
    responses: u64,
    lost: u64,
) -> StunStats {
    let secs = t1.duration_since(t0).as_secs_f64();
    StunStats {
        sockets: spec.sockets,
        window: spec.window,
        responses,
        rps: responses as f64 / secs,
        latency: hist.percentiles(),
        lost,
        server_cpu_util: None,
        server_cpu_us_per_req: None,
    }
}
