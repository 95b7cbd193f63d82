//! The STUN server: answers exactly the binding requests Tailscale clients send, ignores
//! everything else, and never answers faster than its rate limit.
//!
//! On Linux it reads up to [`BATCH`] datagrams per `recvmmsg` and answers them with one
//! `sendmmsg`, on a thread of its own that blocks in the kernel: one wake-up and two syscalls
//! per batch instead of an epoll round trip and two syscalls per request, which is what bounded
//! the one-datagram-at-a-time loop. Elsewhere it keeps that portable tokio loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derp_proto::stun;
use prometheus_client::metrics::counter::Counter;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
#[cfg(not(target_os = "linux"))]
use tracing::warn;

use crate::limits::TokenBucket;
use crate::metrics::{Metrics, ReasonLabel};

/// What happened to one datagram; the label values of `stun_requests`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    NotStun,
    NotTailscale,
    RateLimited,
    OkIpv4,
    OkIpv6,
    SendError,
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::NotStun,
    Outcome::NotTailscale,
    Outcome::RateLimited,
    Outcome::OkIpv4,
    Outcome::OkIpv6,
    Outcome::SendError,
];

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::NotStun => "not_stun",
            Outcome::NotTailscale => "not_tailscale",
            Outcome::RateLimited => "rate_limited",
            Outcome::OkIpv4 => "ok_ipv4",
            Outcome::OkIpv6 => "ok_ipv6",
            Outcome::SendError => "send_error",
        }
    }

    fn sent_to(addr: SocketAddr) -> Self {
        if addr.ip().to_canonical().is_ipv4() {
            Outcome::OkIpv4
        } else {
            Outcome::OkIpv6
        }
    }
}

/// Counts outcomes locally and adds them to the shared counters once per batch: one atomic add
/// per label per batch instead of a family lookup per datagram. A label's series is created on
/// its first count, so `/metrics` shows the same series as before.
struct Tally {
    metrics: Arc<Metrics>,
    counters: [Option<Counter>; OUTCOMES.len()],
    pending: [u64; OUTCOMES.len()],
}

impl Tally {
    fn new(metrics: Arc<Metrics>) -> Self {
        Tally {
            metrics,
            counters: Default::default(),
            pending: [0; OUTCOMES.len()],
        }
    }

    fn add(&mut self, o: Outcome) {
        self.pending[o as usize] += 1;
    }

    fn flush(&mut self) {
        for (i, o) in OUTCOMES.iter().enumerate() {
            let n = std::mem::take(&mut self.pending[i]);
            if n == 0 {
                continue;
            }
            let c = self.counters[i].get_or_insert_with(|| {
                self.metrics
                    .stun_requests
                    .get_or_create(&ReasonLabel { reason: o.label() })
                    .clone()
            });
            c.inc_by(n);
        }
    }
}

/// The per-datagram decision shared by both loops.
struct Answerer {
    /// Responses per second, up to one second's worth at once; `None` is unlimited.
    limiter: Option<TokenBucket>,
    tally: Tally,
}

impl Answerer {
    /// Writes the answer to `pkt` from `from` into `out` and returns its length, or counts why
    /// there is none. `truncated` means the datagram was longer than the buffer it was read
    /// into: such a datagram is never answered, since its FINGERPRINT (the last 8 bytes) was cut.
    fn answer(
        &mut self,
        pkt: &[u8],
        truncated: bool,
        from: SocketAddr,
        out: &mut [u8; stun::MAX_RESPONSE_LEN],
    ) -> Option<usize> {
        let tx = match stun::parse_binding_request(pkt) {
            // Go reads 64 KiB and would parse the whole datagram; the magic-cookie check only
            // needs the first 8 bytes, so the split between its two labels stays the same.
            Ok(_) if truncated => {
                self.tally.add(Outcome::NotTailscale);
                return None;
            }
            Ok(tx) => tx,
            Err(stun::StunError::NotStun) => {
                self.tally.add(Outcome::NotStun);
                return None;
            }
            Err(_) => {
                self.tally.add(Outcome::NotTailscale);
                return None;
            }
        };
        if let Some(limit) = &mut self.limiter
            && !limit.try_take(1.0)
        {
            self.tally.add(Outcome::RateLimited);
            return None;
        }
        Some(stun::write_response(&tx, from, out))
    }
}

/// Serves until `shutdown`. `rate_limit` is responses per second (0 = unlimited).
pub async fn run(
    sock: UdpSocket,
    metrics: Arc<Metrics>,
    rate_limit: f64,
    shutdown: CancellationToken,
) {
    let ans = Answerer {
        limiter: (rate_limit > 0.0).then(|| TokenBucket::new(rate_limit, rate_limit.max(1.0))),
        tally: Tally::new(metrics),
    };
    #[cfg(target_os = "linux")]
    batched::run(sock, ans, shutdown).await;
    #[cfg(not(target_os = "linux"))]
    portable(sock, ans, shutdown).await;
}

/// One datagram per syscall through tokio: for platforms without recvmmsg/sendmmsg.
#[cfg(not(target_os = "linux"))]
async fn portable(sock: UdpSocket, mut ans: Answerer, shutdown: CancellationToken) {
    // Datagrams up to 64 KiB are read (Go's buffer); anything that long is not a request anyway.
    let mut buf = vec![0u8; 64 << 10];
    let mut out = [0u8; stun::MAX_RESPONSE_LEN];
    loop {
        let (n, from): (usize, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // Go logs, sleeps a second and goes on; ICMP errors from earlier sends land here.
                    warn!("STUN read error: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        if let Some(len) = ans.answer(&buf[..n], false, from, &mut out) {
            let o = match sock.send_to(&out[..len], from).await {
                Ok(_) => Outcome::sent_to(from),
                Err(_) => Outcome::SendError,
            };
            ans.tally.add(o);
        }
        ans.tally.flush();
    }
}

#[cfg(target_os = "linux")]
mod batched {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket as StdUdpSocket};
    use std::os::fd::AsRawFd;

    use derp_proto::stun;
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, sendmmsg};
    use tokio::net::UdpSocket;
    use tokio_util::sync::CancellationToken;
    use tracing::{error, warn};

    use super::{Answerer, Duration, Outcome};

    /// Datagrams read per `recvmmsg` (and at most answered per `sendmmsg`). 64 covers the
    /// queue a busy closed-loop client builds without making one batch's latency noticeable.
    pub(super) const BATCH: usize = 64;
    /// Bytes per receive slot. A Tailscale request is 40 bytes; 2 KiB holds anything that
    /// crossed an Ethernet link unfragmented. Longer datagrams arrive cut (MSG_TRUNC) and are
    /// counted, not answered (Go reads up to 64 KiB, but no Tailscale client sends more than
    /// 40 bytes, and 64 slots of 64 KiB would be 4 MiB for nothing).
    pub(super) const SLOT: usize = 2048;
    /// How long the thread blocks in the kernel before looking at the shutdown token.
    const POLL: Duration = Duration::from_millis(100);
    /// How often one batch's `sendmmsg` is retried after a partial send before the rest of the
    /// batch counts as send errors. Every retry sends or skips at least one datagram, so the
    /// loop is bounded by the batch size anyway; this just says so.
    const SEND_ROUNDS: usize = BATCH + 1;

    /// The thread's buffers, allocated once.
    pub(super) struct Bufs {
        data: Vec<u8>,
        hdrs: MultiHeaders<SockaddrStorage>,
        /// Per received datagram: length, cut or not, source.
        meta: Vec<(usize, bool, Option<SocketAddr>)>,
        out: Vec<[u8; stun::MAX_RESPONSE_LEN]>,
        out_len: Vec<usize>,
        dest: Vec<SocketAddr>,
        dest_any: Vec<SocketAddrAny>,
    }

    impl Bufs {
        pub(super) fn new() -> Self {
            Bufs {
                data: vec![0u8; BATCH * SLOT],
                hdrs: MultiHeaders::preallocate(BATCH, None),
                meta: Vec::with_capacity(BATCH),
                out: vec![[0u8; stun::MAX_RESPONSE_LEN]; BATCH],
                out_len: Vec::with_capacity(BATCH),
                dest: Vec::with_capacity(BATCH),
                dest_any: Vec::with_capacity(BATCH),
            }
        }

        /// One `recvmmsg`: blocks until a datagram is there (or POLL passes), then takes what
        /// else is queued without waiting. Fills `meta`.
        pub(super) fn recv(&mut self, sock: &StdUdpSocket) -> io::Result<usize> {
            self.meta.clear();
            let mut chunks = self.data.chunks_exact_mut(SLOT);
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
            let res = recvmmsg(
                sock.as_raw_fd(),
                &mut self.hdrs,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            )?;
            for m in res {
                let from = m.address.and_then(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(SocketAddr::V4(SocketAddrV4::from(*v4)))
                    } else {
                        a.as_sockaddr_in6()
                            .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
                    }
                });
                let cut = m.flags.contains(MsgFlags::MSG_TRUNC);
                self.meta.push((m.bytes.min(SLOT), cut, from));
            }
            Ok(self.meta.len())
        }

        /// Answers what `recv` read: decides per datagram, then sends all answers.
        pub(super) fn answer(&mut self, sock: &StdUdpSocket, ans: &mut Answerer) {
            self.dest.clear();
            self.out_len.clear();
            for (i, &(len, cut, from)) in self.meta.iter().enumerate() {
                let pkt = &self.data[i * SLOT..i * SLOT + len];
                let Some(from) = from else {
                    // The kernel gave no IP source (cannot happen on a UDP/IP socket); there
                    // is no one to answer, so count it with the other unanswerable ones.
                    ans.tally.add(Outcome::NotStun);
                    continue;
                };
                let j = self.dest.len();
                if let Some(n) = ans.answer(pkt, cut, from, &mut self.out[j]) {
                    self.dest.push(from);
                    self.out_len.push(n);
                }
            }
            self.send(sock, ans);
            ans.tally.flush();
        }

        fn send(&mut self, sock: &StdUdpSocket, ans: &mut Answerer) {
            let n = self.dest.len();
            if n == 0 {
                return;
            }
            self.dest_any.clear();
            self.dest_any
                .extend(self.dest.iter().map(|a| SocketAddrAny::from(*a)));
            let iovs: Vec<[IoSlice<'_>; 1]> = self
                .out
                .iter()
                .zip(&self.out_len)
                .map(|(o, &l)| [IoSlice::new(&o[..l])])
                .collect();
            let mut ctrl: Vec<SendAncillaryBuffer<'_, '_, '_>> =
                (0..n).map(|_| SendAncillaryBuffer::default()).collect();
            let mut msgs: Vec<MMsgHdr<'_>> = self
                .dest_any
                .iter()
                .zip(&iovs)
                .zip(ctrl.iter_mut())
                .map(|((a, io), c)| MMsgHdr::new_with_addr(a, io, c))
                .collect();
            let mut start = 0;
            for _ in 0..SEND_ROUNDS {
                if start >= n {
                    break;
                }
                match sendmmsg(sock, &mut msgs[start..], SendFlags::empty()) {
                    Ok(k) if k > 0 => {
                        for a in &self.dest[start..start + k] {
                            ans.tally.add(Outcome::sent_to(*a));
                        }
                        start += k;
                    }
                    Err(rustix::io::Errno::INTR) => continue,
                    // The send buffer stayed full for the whole write timeout: drop the rest
                    // rather than stall reads (UDP answers are best-effort; the client retries).
                    Err(rustix::io::Errno::AGAIN) => break,
                    // An error on the first datagram (say an unroutable or port-0 source):
                    // it is lost, the rest of the batch still goes out.
                    _ => {
                        ans.tally.add(Outcome::SendError);
                        start += 1;
                    }
                }
            }
            for _ in start..n {
                ans.tally.add(Outcome::SendError);
            }
        }
    }

    pub(super) async fn run(sock: UdpSocket, ans: Answerer, shutdown: CancellationToken) {
        let std_sock = match into_blocking(sock) {
            Ok(s) => s,
            Err(e) => {
                error!("STUN is disabled: could not prepare its socket: {e}");
                return;
            }
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let stop = shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("stun".into())
            .spawn(move || {
                serve(&std_sock, ans, &stop);
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            error!("STUN is disabled: could not start its thread: {e}");
            return;
        }
        // The thread sees the token within POLL; wait for it so shutdown is orderly.
        let _ = done_rx.await;
    }

    /// Takes the socket out of tokio's reactor (left registered, every arriving datagram would
    /// also wake the runtime's thread on the same core for nothing) and makes it blocking.
    fn into_blocking(sock: UdpSocket) -> io::Result<StdUdpSocket> {
        let s = sock.into_std()?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(POLL))?;
        s.set_write_timeout(Some(POLL))?;
        Ok(s)
    }

    /// Runs until `shutdown` is cancelled; each pass blocks at most POLL, so it notices within
    /// that.
    pub(super) fn serve(sock: &StdUdpSocket, mut ans: Answerer, shutdown: &CancellationToken) {
        let mut bufs = Bufs::new();
        while !shutdown.is_cancelled() {
            match bufs.recv(sock) {
                Ok(_) => bufs.answer(sock, &mut ans),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // Go logs, sleeps a second and goes on; ICMP errors from earlier sends land
                    // here. Sleep in POLL steps so shutdown is not held up.
                    warn!("STUN read error: {e}");
                    for _ in 0..10 {
                        if shutdown.is_cancelled() {
                            break;
                        }
                        std::thread::sleep(POLL);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket as StdUdpSocket};

    use super::*;

    fn req(id: u32, seq: u32) -> ([u8; stun::REQUEST_LEN], stun::TxId) {
        let mut tx = [0u8; stun::TXID_LEN];
        tx[..4].copy_from_slice(&id.to_be_bytes());
        tx[4..8].copy_from_slice(&seq.to_be_bytes());
        (stun::binding_request(&tx), tx)
    }

    fn count(m: &Metrics, reason: &'static str) -> u64 {
        m.stun_requests.get_or_create(&ReasonLabel { reason }).get()
    }

    fn client(server: SocketAddr) -> StdUdpSocket {
        let bind: SocketAddr = if server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        }
        .parse()
        .unwrap();
        let c = StdUdpSocket::bind(bind).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    /// Starts `run` on `bind`; None when the host has no such address (no IPv6 loopback).
    async fn start(
        bind: &str,
        rate: f64,
    ) -> Option<(
        SocketAddr,
        Arc<Metrics>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    )> {
        let sock = UdpSocket::bind(bind).await.ok()?;
        let addr = sock.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let h = tokio::spawn(run(sock, m.clone(), rate, stop.clone()));
        Some((addr, m, stop, h))
    }

    /// Many sockets, several requests each, all in flight at once: every request gets its own
    /// answer carrying the sender's address and port.
    async fn many_sockets(bind: &str) -> Option<Arc<Metrics>> {
        let (addr, m, stop, h) = start(bind, 0.0).await?;
        let clients: Vec<StdUdpSocket> = (0..40).map(|_| client(addr)).collect();
        let per = 4u32;
        tokio::task::spawn_blocking(move || {
            for (id, c) in clients.iter().enumerate() {
                for seq in 0..per {
                    c.send_to(&req(id as u32, seq).0, addr).unwrap();
                }
            }
            for (id, c) in clients.iter().enumerate() {
                let mut seen = std::collections::HashSet::new();
                for _ in 0..per {
                    let mut b = [0u8; 128];
                    let (n, from) = c.recv_from(&mut b).unwrap();
                    assert_eq!(from, addr);
                    let (tx, mapped) = stun::parse_response(&b[..n]).unwrap();
                    assert_eq!(tx[..4], (id as u32).to_be_bytes());
                    assert_eq!(mapped, c.local_addr().unwrap());
                    assert!(seen.insert(tx), "duplicate answer");
                }
            }
        })
        .await
        .unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("STUN server stops on shutdown")
            .unwrap();
        Some(m)
    }

    #[tokio::test]
    async fn batched_answers_many_sockets_v4() {
        let m = many_sockets("127.0.0.1:0").await.unwrap();
        assert_eq!(count(&m, "ok_ipv4"), 160);
        assert_eq!(count(&m, "ok_ipv6"), 0);
    }

    #[tokio::test]
    async fn batched_answers_many_sockets_v6() {
        let Some(m) = many_sockets("[::1]:0").await else {
            eprintln!(
                "SKIP batched_answers_many_sockets_v6: this machine has no IPv6 loopback (::1)"
            );
            return;
        };
        assert_eq!(count(&m, "ok_ipv6"), 160);
    }

    /// IPv4 clients of a dual-stack socket are answered as IPv4 (family 1, 32 bytes).
    #[tokio::test]
    async fn dual_stack_answers_ipv4_as_ipv4() {
        let Ok(sock) = tokio::net::UdpSocket::bind("[::]:0").await else {
            eprintln!("SKIP dual_stack_answers_ipv4_as_ipv4: this machine cannot bind [::]");
            return;
        };
        let port = sock.local_addr().unwrap().port();
        let m = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let h = tokio::spawn(run(sock, m.clone(), 0.0, stop.clone()));
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        tokio::task::spawn_blocking(move || {
            let c = client(to);
            c.send_to(&req(1, 1).0, to).unwrap();
            let mut b = [0u8; 128];
            let (n, _) = c.recv_from(&mut b).unwrap();
            assert_eq!(n, 32);
            assert_eq!(
                stun::parse_response(&b[..n]).unwrap().1,
                c.local_addr().unwrap()
            );
        })
        .await
        .unwrap();
        stop.cancel();
        h.await.unwrap();
        assert_eq!(count(&m, "ok_ipv4"), 1);
    }

    /// A valid Tailscale-style request `total` bytes long: SOFTWARE, a padding attribute, then
    /// FINGERPRINT over everything before it (what Go's server would answer at any length).
    fn long_request(total: usize) -> Vec<u8> {
        let base = req(9, 9).0;
        let mut p = base[..32].to_vec(); // header + SOFTWARE
        let pad = total - 32 - 4 - 8;
        p.extend([0x80, 0x26]); // an unknown comprehension-optional attribute
        p.extend((pad as u16).to_be_bytes());
        p.extend(std::iter::repeat_n(0u8, pad));
        let fp = crc32fast::hash(&p) ^ 0x5354_554E;
        p.extend([0x80, 0x28, 0, 4]);
        p.extend(fp.to_be_bytes());
        p
    }

    /// Good requests around bad ones, all read by the same recvmmsg: the bad ones are counted
    /// and dropped, every good one is answered.
    #[cfg(target_os = "linux")]
    #[test]
    fn bad_datagrams_inside_a_batch_do_not_stop_the_rest() {
        let server = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let addr = server.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        let mut ans = Answerer {
            limiter: None,
            tally: Tally::new(m.clone()),
        };
        let c = client(addr);
        let (good1, tx1) = req(1, 1);
        let (good2, tx2) = req(1, 2);
        let mut not_ts = req(1, 3).0;
        not_ts[24] = b'X';
        let mut bad_fp = req(1, 4).0;
        bad_fp[39] ^= 1;
        let oversized = long_request(batched::SLOT + 1000);
        assert!(stun::parse_binding_request(&oversized).is_ok());
        let fits = long_request(batched::SLOT);
        let fits_tx = stun::parse_binding_request(&fits).unwrap();
        let junk: Vec<Vec<u8>> = vec![
            good1.to_vec(),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![],
            not_ts.to_vec(),
            bad_fp.to_vec(),
            good1[..30].to_vec(),
            oversized,
            vec![0u8; 20_000],
            fits,
            good2.to_vec(),
        ];
        for p in &junk {
            c.send_to(p, addr).unwrap();
        }
        let mut bufs = batched::Bufs::new();
        assert_eq!(
            bufs.recv(&server).unwrap(),
            junk.len(),
            "one recvmmsg reads all"
        );
        bufs.answer(&server, &mut ans);
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut b = [0u8; 128];
            let n = c.recv(&mut b).unwrap();
            let (tx, mapped) = stun::parse_response(&b[..n]).unwrap();
            assert_eq!(mapped, c.local_addr().unwrap());
            got.push(tx);
        }
        assert_eq!(got, vec![tx1, fits_tx, tx2]);
        assert_eq!(count(&m, "ok_ipv4"), 3);
        // HTTP text, the empty datagram, 20,000 zero bytes (no magic cookie).
        assert_eq!(count(&m, "not_stun"), 3);
        // Wrong SOFTWARE, wrong FINGERPRINT, cut at 30 bytes, longer than a receive slot.
        assert_eq!(count(&m, "not_tailscale"), 4);
    }

    #[tokio::test]
    async fn rate_limit_counts_what_it_drops() {
        let (addr, m, stop, h) = start("127.0.0.1:0", 1.0).await.unwrap();
        tokio::task::spawn_blocking(move || {
            let c = client(addr);
            for seq in 0..5 {
                c.send_to(&req(2, seq).0, addr).unwrap();
            }
            let mut b = [0u8; 128];
            assert!(c.recv(&mut b).is_ok());
        })
        .await
        .unwrap();
        // The four others were read and dropped by the time the metrics settle.
        for _ in 0..50 {
            if count(&m, "rate_limited") == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        h.await.unwrap();
        assert_eq!(count(&m, "ok_ipv4"), 1);
        assert_eq!(count(&m, "rate_limited"), 4);
    }
}
