//! Connecting (TCP, TLS, upgrade or fast start, WebSocket), the DERP handshake up to ServerInfo,
//! and the established connection: a cloneable [`ClientHandle`] for writes and a
//! [`ClientReceiver`] for reads, so sending and receiving run in separate tasks.
//!
//! Write path: frames are encoded into one reusable buffer under a mutex and written out when no
//! other writer is waiting (or the buffer is large), so concurrent senders share syscalls and a
//! packet costs no allocation. Large packets skip that buffer: only their frame heads are
//! encoded and the payloads go to TLS from the caller's memory in one vectored write. Read
//! path: one reusable `BytesMut`; each frame is split off and frozen, so packets are handed out
//! as `Bytes` slices without copying.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use derp_proto::frame::{
    self, FrameError, FrameType, MAX_CLIENT_FRAME_BYTES, MAX_PACKET_BYTES, PACKET_HEAD_LEN,
    PROTOCOL_VERSION, ServerToClient, Split,
};
use derp_proto::gather::{self, GATHER_MIN_PACKET, MAX_IOVECS};
use derp_proto::info::{self, ClientInfo, ServerInfo};
use derp_proto::{NodePrivate, NodePublic};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{ClientConfig, Target, Transport, split_host_port};
use crate::{ClientError, tls, upgrade, ws};

/// Go's client reads the greeting with a 1 KiB cap (`readFrame(c.br, 1<<10, ...)`).
const MAX_SERVER_KEY_FRAME_BYTES: usize = 1 << 10;
/// Read-buffer growth step: one read can take a full 64 KiB packet frame.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Write out the batch once it is this large even if more writers wait, to bound latency and
/// memory (two maximum-size packet frames).
const FLUSH_THRESHOLD_BYTES: usize = 128 << 10;
/// Per-address TCP dial timeout when other addresses remain; Go's per-node dial timeout.
const PER_ADDR_DIAL_TIMEOUT: Duration = Duration::from_millis(1500);
/// Initial write buffer: a few WireGuard-sized frames.
const WRITE_BUF_BYTES: usize = 16 << 10;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

/// Facts about an established connection, for logs and the prober.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: Option<SocketAddr>,
    /// TLS was used (false for `http://`).
    pub tls: bool,
    /// `"TLSv1_3"` or `"TLSv1_2"` when TLS was used.
    pub tls_version: Option<String>,
    /// Server key and protocol version read from the metacert (TLS 1.3 only).
    pub metacert: Option<(NodePublic, u32)>,
    /// Fast start was used (no 101 read).
    pub fast_start: bool,
    pub transport: Transport,
    /// How long the TLS handshake took (from the TCP connection being up to TLS being
    /// established); `None` without TLS.
    pub tls_handshake: Option<Duration>,
    /// `notAfter` of the server's leaf certificate (the first one that is not the DERP meta
    /// certificate), in Unix seconds; `None` without TLS or when it cannot be parsed.
    pub leaf_not_after: Option<i64>,
}

/// A connected DERP client. Use it directly from one task, or [`Client::split`] it.
pub struct Client {
    handle: ClientHandle,
    receiver: ClientReceiver,
}

/// The cloneable write side of a connection.
#[derive(Clone)]
pub struct ClientHandle {
    shared: Arc<Shared>,
}

/// The read side of a connection. `recv` is cancel-safe (state lives in the buffer).
pub struct ClientReceiver {
    reader: FrameReader<ReadHalf<BoxIo>>,
    shared: Arc<Shared>,
    read_timeout: Option<Duration>,
    /// Set by the first error; later calls repeat it (the stream is no longer in sync).
    failed: Option<String>,
}

struct Shared {
    public_key: NodePublic,
    server_key: NodePublic,
    server_info: ServerInfo,
    conn_info: ConnInfo,
    writer: tokio::sync::Mutex<Writer>,
    /// Writers waiting for or holding the lock; the last one out writes the batch.
    pending: AtomicUsize,
    write_timeout: Option<Duration>,
    /// Outstanding `ping()` calls by payload.
    pings: StdMutex<HashMap<[u8; 8], oneshot::Sender<()>>>,
    /// Set by `close()` so a receiver blocked in `recv` ends at once instead of waiting for the
    /// server to hang up (the read half of a split TLS stream cannot be closed on its own).
    closed: tokio::sync::watch::Sender<bool>,
}

struct Writer {
    io: WriteHalf<BoxIo>,
    buf: BytesMut,
    /// Frame heads of the packets being written vectored (reused between batches).
    heads: Vec<u8>,
    /// Why the connection cannot be written any more.
    broken: Option<String>,
}

/// Packet frames being written vectored: `heads[i]` then `packets[i]` for each packet. If the
/// write is cancelled part-way, `drop` moves what was not written yet into the write buffer,
/// so the stream stays in frame sync and the next writer (or the flush the pending guard
/// spawns) sends it; that is what keeps `send_packets` cancel-safe without copying up front.
struct Gather<'a, 'p> {
    buf: &'a mut BytesMut,
    heads: &'a [u8],
    packets: &'a [&'p [u8]],
    /// Bytes of the head/packet sequence already written.
    done: usize,
}

/// The head/packet sequence a [`Gather`] writes, in order.
fn segments<'s>(heads: &'s [u8], packets: &'s [&[u8]]) -> impl Iterator<Item = &'s [u8]> {
    heads
        .chunks(PACKET_HEAD_LEN)
        .zip(packets.iter())
        .flat_map(|(h, p)| [h, *p])
}

impl Gather<'_, '_> {
    fn total(&self) -> usize {
        self.heads.len() + self.packets.iter().map(|p| p.len()).sum::<usize>()
    }

    /// Fills `iov` with what is left, from `done` on; returns how many entries were used.
    fn fill<'s>(&'s self, iov: &mut [IoSlice<'s>]) -> usize {
        gather::fill_iovecs(segments(self.heads, self.packets), self.done, iov)
    }
}

impl Drop for Gather<'_, '_> {
    fn drop(&mut self) {
        for seg in gather::remaining(segments(self.heads, self.packets), self.done) {
            self.buf.extend_from_slice(seg);
        }
    }
}

impl Writer {
    /// Writes the whole buffer and flushes. Cancel-safe: unwritten bytes stay in `buf`.
    async fn write_out(&mut self) -> io::Result<()> {
        while !self.buf.is_empty() {
            let n = self.io.write(&self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.buf.advance(n);
        }
        self.io.flush().await
    }

    async fn write_out_timed(&mut self, limit: Option<Duration>) -> Result<(), ClientError> {
        let res = match limit {
            Some(d) => match tokio::time::timeout(d, self.write_out()).await {
                Ok(r) => r.map_err(ClientError::Io),
                Err(_) => Err(ClientError::WriteTimeout(d)),
            },
            None => self.write_out().await.map_err(ClientError::Io),
        };
        if let Err(e) = &res {
            self.broken = Some(e.to_string());
        }
        res
    }

    /// Writes what is buffered, then `packets` as SendPacket frames to `dst` straight from the
    /// caller's memory, and flushes. Cancel-safe like `write_out` (see [`Gather`]).
    async fn write_packets(&mut self, dst: &NodePublic, packets: &[&[u8]]) -> io::Result<()> {
        self.heads.clear();
        for p in packets {
            frame::encode_send_packet_head(&mut self.heads, dst, p.len())
                .map_err(io::Error::other)?;
        }
        while !self.buf.is_empty() {
            let n = self.io.write(&self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.buf.advance(n);
        }
        let Writer { io, buf, heads, .. } = self;
        let mut g = Gather {
            buf,
            heads,
            packets,
            done: 0,
        };
        let total = g.total();
        while g.done < total {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let used = g.fill(&mut iov);
            let n = io.write_vectored(&iov[..used]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            g.done += n;
        }
        drop(g);
        io.flush().await
    }

    async fn write_packets_timed(
        &mut self,
        dst: &NodePublic,
        packets: &[&[u8]],
        limit: Option<Duration>,
    ) -> Result<(), ClientError> {
        let res = match limit {
            Some(d) => match tokio::time::timeout(d, self.write_packets(dst, packets)).await {
                Ok(r) => r.map_err(ClientError::Io),
                Err(_) => Err(ClientError::WriteTimeout(d)),
            },
            None => self
                .write_packets(dst, packets)
                .await
                .map_err(ClientError::Io),
        };
        if let Err(e) = &res {
            self.broken = Some(e.to_string());
        }
        res
    }
}

fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a writer in `Shared::pending`; if the operation is dropped before it finished (the
/// caller's future was cancelled), spawns a flush so no encoded frame is left unsent.
struct PendingGuard<'a> {
    shared: &'a Arc<Shared>,
    counted: bool,
    done: bool,
}

impl<'a> PendingGuard<'a> {
    fn new(shared: &'a Arc<Shared>) -> Self {
        shared.pending.fetch_add(1, Ordering::AcqRel);
        PendingGuard {
            shared,
            counted: true,
            done: false,
        }
    }

    /// Leaves the pending count; returns how many other writers remain.
    fn leave(&mut self) -> usize {
        if !self.counted {
            return 0;
        }
        self.counted = false;
        self.shared.pending.fetch_sub(1, Ordering::AcqRel) - 1
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.leave();
        if !self.done
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let shared = self.shared.clone();
            rt.spawn(async move {
                let mut w = shared.writer.lock().await;
                if w.broken.is_none() && !w.buf.is_empty() {
                    let _ = w.write_out_timed(shared.write_timeout).await;
                }
            });
        }
    }
}

impl ClientHandle {
    /// Encodes frames with `encode` and writes them out unless other writers are queued behind
    /// us (the last of them writes the batch).
    /// `encode` appends whole frames only (a refused frame writes nothing), so what it left in
    /// the buffer is sent even when it fails part way.
    async fn write_frames(
        &self,
        encode: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
    ) -> Result<(), ClientError> {
        let mut guard = PendingGuard::new(&self.shared);
        let mut w = self.shared.writer.lock().await;
        if let Some(why) = &w.broken {
            guard.done = true;
            return Err(ClientError::Closed(why.clone()));
        }
        let encoded = encode(&mut w.buf);
        let others = guard.leave();
        if others == 0 || w.buf.len() >= FLUSH_THRESHOLD_BYTES {
            w.write_out_timed(self.shared.write_timeout).await?;
        }
        guard.done = true;
        Ok(encoded?)
    }

    /// SendPacket: relays `packet` (at most 64 KiB) to `dst`.
    pub async fn send_packet(&self, dst: &NodePublic, packet: &[u8]) -> Result<(), ClientError> {
        self.send_packet_slice(dst, &[packet]).await
    }

    /// Several SendPackets to one destination in one write (for load generators).
    pub async fn send_packets<'p>(
        &self,
        dst: &NodePublic,
        packets: impl IntoIterator<Item = &'p [u8]>,
    ) -> Result<(), ClientError> {
        let packets: Vec<&[u8]> = packets.into_iter().collect();
        self.send_packet_slice(dst, &packets).await
    }

    async fn send_packet_slice(
        &self,
        dst: &NodePublic,
        packets: &[&[u8]],
    ) -> Result<(), ClientError> {
        if let Some(p) = packets.iter().find(|p| p.len() > MAX_PACKET_BYTES) {
            return Err(ClientError::PacketTooLarge(p.len()));
        }
        if packets.iter().any(|p| p.len() < GATHER_MIN_PACKET) {
            return self
                .write_frames(|b| {
                    packets
                        .iter()
                        .try_for_each(|p| frame::encode_send_packet(b, dst, p))
                })
                .await;
        }
        // Large packets cannot wait in the buffer for a later writer (they are borrowed), so
        // this writes at once, taking along whatever other writers left buffered.
        let mut guard = PendingGuard::new(&self.shared);
        let mut w = self.shared.writer.lock().await;
        if let Some(why) = &w.broken {
            guard.done = true;
            return Err(ClientError::Closed(why.clone()));
        }
        guard.leave();
        w.write_packets_timed(dst, packets, self.shared.write_timeout)
            .await?;
        guard.done = true;
        Ok(())
    }

    /// ForwardPacket (mesh peers only): relays `packet` to `dst` as if sent by `src`.
    pub async fn forward_packet(
        &self,
        src: &NodePublic,
        dst: &NodePublic,
        packet: &[u8],
    ) -> Result<(), ClientError> {
        if packet.len() > MAX_PACKET_BYTES {
            return Err(ClientError::PacketTooLarge(packet.len()));
        }
        self.write_frames(|b| frame::encode_forward_packet(b, src, dst, packet))
            .await
    }

    /// NotePreferred: whether this server is the client's home.
    pub async fn note_preferred(&self, preferred: bool) -> Result<(), ClientError> {
        self.write_frames(|b| {
            frame::encode_note_preferred(b, preferred);
            Ok(())
        })
        .await
    }

    /// Ping with a payload of our choice; the Pong comes back through `recv`.
    pub async fn send_ping(&self, data: [u8; 8]) -> Result<(), ClientError> {
        self.write_frames(|b| {
            frame::encode_ping(b, &data);
            Ok(())
        })
        .await
    }

    /// Sends a random Ping and waits for its Pong (which `recv` then consumes instead of
    /// returning). Needs a task calling `recv` concurrently. Returns the round-trip time.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let data: [u8; 8] = rand::random();
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pings).insert(data, tx);
        struct Unregister<'a>(&'a Shared, [u8; 8]);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                lock(&self.0.pings).remove(&self.1);
            }
        }
        let _unregister = Unregister(&self.shared, data);
        let start = Instant::now();
        self.send_ping(data).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(ClientError::Closed("receiver dropped".into())),
            Err(_) => Err(ClientError::PingTimeout(timeout)),
        }
    }

    /// Pong: answers a server Ping (only if we advertised `CanAckPings`).
    pub async fn send_pong(&self, data: [u8; 8]) -> Result<(), ClientError> {
        self.write_frames(|b| {
            frame::encode_pong(b, &data);
            Ok(())
        })
        .await
    }

    /// WatchConns (mesh key holders only): subscribe to PeerPresent / PeerGone.
    pub async fn watch_conns(&self) -> Result<(), ClientError> {
        self.write_frames(|b| {
            frame::encode_watch_conns(b);
            Ok(())
        })
        .await
    }

    /// ClosePeer (mesh key holders only): the server drops every connection of `key`.
    pub async fn close_peer(&self, key: &NodePublic) -> Result<(), ClientError> {
        self.write_frames(|b| {
            frame::encode_close_peer(b, key);
            Ok(())
        })
        .await
    }

    /// Writes out anything still buffered.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.write_frames(|_| Ok(())).await
    }

    /// Flushes and shuts down the write side (TLS close_notify, TCP FIN). Later writes fail;
    /// the receiver sees EOF once the server closes its side.
    pub async fn close(&self) -> Result<(), ClientError> {
        let mut w = self.shared.writer.lock().await;
        if w.broken.is_none() {
            let _ = w.write_out_timed(self.shared.write_timeout).await;
        }
        w.broken = Some("closed by us".into());
        self.shared.closed.send_replace(true);
        match self.shared.write_timeout {
            Some(d) => tokio::time::timeout(d, w.io.shutdown())
                .await
                .map_err(|_| ClientError::WriteTimeout(d))?
                .map_err(ClientError::Io),
            None => w.io.shutdown().await.map_err(ClientError::Io),
        }
    }

    pub fn public_key(&self) -> NodePublic {
        self.shared.public_key
    }
    pub fn server_key(&self) -> NodePublic {
        self.shared.server_key
    }
    pub fn server_info(&self) -> &ServerInfo {
        &self.shared.server_info
    }
    pub fn conn_info(&self) -> &ConnInfo {
        &self.shared.conn_info
    }
}

impl ClientReceiver {
    /// The next frame from the server. KeepAlives and unknown frames are returned too (callers
    /// usually ignore them); Pongs answering our own `ping()` are consumed. Fails on EOF, a
    /// frame over 1 MiB, a malformed ServerKey, or no frame within the read timeout.
    pub async fn recv(&mut self) -> Result<ServerToClient, ClientError> {
        if let Some(why) = &self.failed {
            return Err(ClientError::Closed(why.clone()));
        }
        let res = self.recv_inner().await;
        if let Err(e) = &res {
            self.failed = Some(e.to_string());
        }
        res
    }

    async fn recv_inner(&mut self) -> Result<ServerToClient, ClientError> {
        let mut closed = self.shared.closed.subscribe();
        loop {
            let read = async {
                match self.read_timeout {
                    Some(d) => {
                        tokio::time::timeout(d, self.reader.read_frame(MAX_CLIENT_FRAME_BYTES))
                            .await
                            .map_err(|_| ClientError::ReadTimeout(d))?
                    }
                    None => self.reader.read_frame(MAX_CLIENT_FRAME_BYTES).await,
                }
            };
            let (t, payload) = tokio::select! {
                r = read => r?,
                _ = closed.wait_for(|c| *c) => {
                    return Err(ClientError::Closed("closed by us".into()));
                }
            };
            let msg = ServerToClient::decode(t, payload)?;
            if let ServerToClient::Pong(data) = &msg
                && let Some(tx) = lock(&self.shared.pings).remove(data)
            {
                let _ = tx.send(());
                continue;
            }
            return Ok(msg);
        }
    }

    pub fn server_key(&self) -> NodePublic {
        self.shared.server_key
    }
}

impl Drop for ClientReceiver {
    fn drop(&mut self) {
        // Wake pending ping() calls now rather than at their timeout.
        lock(&self.shared.pings).clear();
    }
}

impl Client {
    /// Connects and completes the handshake (ServerInfo received), all within
    /// `cfg.connect_timeout`.
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        connect(cfg).await
    }

    pub fn split(self) -> (ClientHandle, ClientReceiver) {
        (self.handle, self.receiver)
    }
    /// A handle for writing from other tasks.
    pub fn handle(&self) -> ClientHandle {
        self.handle.clone()
    }
    pub fn public_key(&self) -> NodePublic {
        self.handle.public_key()
    }
    pub fn server_key(&self) -> NodePublic {
        self.handle.server_key()
    }
    pub fn server_info(&self) -> &ServerInfo {
        self.handle.server_info()
    }
    pub fn conn_info(&self) -> &ConnInfo {
        self.handle.conn_info()
    }
    pub async fn send_packet(&self, dst: &NodePublic, packet: &[u8]) -> Result<(), ClientError> {
        self.handle.send_packet(dst, packet).await
    }
    pub async fn recv(&mut self) -> Result<ServerToClient, ClientError> {
        self.receiver.recv().await
    }
}

/// Reads frames into one reusable buffer and hands out frozen slices of it.
struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads more bytes; EOF is an error since every caller needs more.
    async fn fill(&mut self, want: usize) -> Result<(), ClientError> {
        self.buf.reserve(want.max(READ_CHUNK_BYTES / 4));
        let n = self.io.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(ClientError::Eof);
        }
        Ok(())
    }

    /// One frame: type and payload. Frames longer than `max` are refused before reading them.
    async fn read_frame(&mut self, max: usize) -> Result<(u8, Bytes), ClientError> {
        loop {
            match frame::split_frame(&mut self.buf, |_| max)
                .map_err(|e| ClientError::FrameTooLarge { len: e.len, max })?
            {
                Split::Frame {
                    frame_type,
                    payload,
                } => return Ok((frame_type, payload)),
                Split::NeedPayload { missing } => self.fill(missing).await?,
                Split::NeedHeader => self.fill(READ_CHUNK_BYTES).await?,
            }
        }
    }
}

async fn step<T>(
    deadline: Instant,
    name: &'static str,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .map_err(|_| ClientError::Timeout { step: name })?
}

async fn dial(target: &Target, cfg: &ClientConfig) -> Result<TcpStream, ClientError> {
    let (host, port) = match &cfg.dial_addr {
        Some(d) => split_host_port(d, target.port)?,
        None => (target.host.clone(), target.port),
    };
    let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| ClientError::Resolve {
                host: host.clone(),
                reason: e.to_string(),
            })?
            .collect(),
    };
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| cfg.addr_family.allows(&a.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(ClientError::Resolve {
            host,
            reason: format!("no {:?} address", cfg.addr_family),
        });
    }
    let mut last = None;
    let count = addrs.len();
    for (i, addr) in addrs.into_iter().enumerate() {
        // With more addresses to try, a black-holed one must not eat the whole connect budget.
        let attempt = async {
            if i + 1 < count {
                tokio::time::timeout(PER_ADDR_DIAL_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            } else {
                TcpStream::connect(addr).await
            }
        };
        match attempt.await {
            Ok(s) => {
                // DERP frames are small and latency-bound; Nagle would hold pongs and disco.
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    match last {
        Some((addr, source)) => Err(ClientError::Connect {
            addr: addr.to_string(),
            source,
        }),
        None => Err(ClientError::Resolve {
            host,
            reason: "no address".into(),
        }),
    }
}

fn client_info_json(cfg: &ClientConfig) -> String {
    ClientInfo {
        mesh_key: cfg.mesh_key,
        version: i64::from(PROTOCOL_VERSION),
        can_ack_pings: cfg.can_ack_pings,
        is_prober: cfg.is_prober,
        app_name: cfg.app_name.clone(),
    }
    .to_json()
}

/// Appends ClientInfo and the frames Go sends right behind it (NotePreferred, WatchConns).
fn encode_hello(
    buf: &mut BytesMut,
    cfg: &ClientConfig,
    server_key: &NodePublic,
) -> Result<(), ClientError> {
    let key: &NodePrivate = &cfg.private_key;
    let sealed = info::seal(key, server_key, client_info_json(cfg).as_bytes())?;
    frame::encode_client_info(buf, &key.public(), &sealed)?;
    if cfg.preferred {
        frame::encode_note_preferred(buf, true);
    }
    if cfg.watch_conns {
        frame::encode_watch_conns(buf);
    }
    Ok(())
}

/// The handshake, step by step, within one deadline: TCP, TLS, the transport (HTTP upgrade or
/// WebSocket), the key exchange (fast start or classic), then ServerInfo.
async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let target = Target::parse(&cfg.url)?;
    let tcp = step(deadline, "TCP connect", dial(&target, cfg)).await?;
    let (local_addr, remote_addr) = (tcp.local_addr().ok(), tcp.peer_addr().ok());
    let (io, tls) = secure(tcp, &target, cfg, deadline).await?;
    let io: BoxIo = match cfg.transport {
        Transport::Derp => io,
        Transport::WebSocket => Box::new(
            step(
                deadline,
                "WebSocket handshake",
                ws::handshake(io, target.tls, &target.authority, &target.path_and_query),
            )
            .await?,
        ),
    };
    let (rd, wr) = tokio::io::split(io);
    let mut reader = FrameReader {
        io: rd,
        buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
    };
    let mut writer = Writer {
        io: wr,
        buf: BytesMut::with_capacity(WRITE_BUF_BYTES),
        heads: Vec::new(),
        broken: None,
    };
    let fast_key = fast_start_key(cfg, tls.metacert);
    let server_key = match fast_key {
        Some(key) => send_fast_start(&mut writer, &target, cfg, key, deadline).await?,
        None => greet_classic(&mut reader, &mut writer, &target, cfg, deadline).await?,
    };
    let server_info = step(
        deadline,
        "reading ServerInfo",
        read_server_info(&mut reader, cfg, &server_key, fast_key.is_some()),
    )
    .await?;
    let conn_info = ConnInfo {
        local_addr,
        remote_addr,
        tls: target.tls,
        tls_version: tls.version,
        metacert: tls.metacert,
        fast_start: fast_key.is_some(),
        transport: cfg.transport,
        tls_handshake: tls.handshake,
        leaf_not_after: tls.leaf_not_after,
    };
    tracing::debug!(
        server = %server_key,
        fast_start = conn_info.fast_start,
        url = %cfg.url,
        "DERP connected"
    );
    let shared = Arc::new(Shared {
        public_key: cfg.private_key.public(),
        server_key,
        server_info,
        conn_info,
        writer: tokio::sync::Mutex::new(writer),
        pending: AtomicUsize::new(0),
        write_timeout: cfg.write_timeout,
        pings: StdMutex::new(HashMap::new()),
        closed: tokio::sync::watch::Sender::new(false),
    });
    Ok(Client {
        handle: ClientHandle {
            shared: shared.clone(),
        },
        receiver: ClientReceiver {
            reader,
            shared,
            read_timeout: cfg.read_timeout,
            failed: None,
        },
    })
}

/// What the TLS handshake told us (nothing for plain HTTP).
#[derive(Default)]
struct TlsFacts {
    version: Option<String>,
    /// The DERP meta certificate's server key and protocol version, trusted only over TLS 1.3.
    metacert: Option<(NodePublic, u32)>,
    handshake: Option<Duration>,
    leaf_not_after: Option<i64>,
}

async fn secure(
    tcp: TcpStream,
    target: &Target,
    cfg: &ClientConfig,
    deadline: Instant,
) -> Result<(BoxIo, TlsFacts), ClientError> {
    if !target.tls {
        return Ok((Box::new(tcp), TlsFacts::default()));
    }
    let tls_cfg = tls::client_config(&cfg.tls, cfg.cert_name.as_deref())?;
    let sni = cfg.tls_server_name.as_deref().unwrap_or(&target.host);
    // An IP literal becomes ServerName::IpAddress, for which rustls sends no SNI (as Go).
    let server_name = ServerName::try_from(sni.to_owned())
        .map_err(|e| ClientError::Config(format!("TLS server name {sni:?}: {e}")))?;
    let started = Instant::now();
    let stream = step(deadline, "TLS handshake", async {
        tokio_rustls::TlsConnector::from(tls_cfg)
            .connect(server_name, tcp)
            .await
            .map_err(ClientError::Tls)
    })
    .await?;
    let conn = stream.get_ref().1;
    let tls_13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let handshake = started.elapsed();
    let facts = TlsFacts {
        version: conn.protocol_version().map(|v| format!("{v:?}")),
        handshake: Some(handshake),
        leaf_not_after: conn.peer_certificates().and_then(tls::leaf_not_after),
        // Only TLS 1.3 hides the certificates, so only then does Go trust the metacert.
        metacert: tls_13
            .then(|| conn.peer_certificates().and_then(tls::parse_metacert))
            .flatten(),
    };
    Ok((Box::new(stream), facts))
}

/// The server key to use for fast start, when the metacert offers one and fast start applies.
fn fast_start_key(cfg: &ClientConfig, metacert: Option<(NodePublic, u32)>) -> Option<NodePublic> {
    match metacert {
        Some((key, version))
            if cfg.fast_start
                && cfg.transport == Transport::Derp
                && !key.is_zero()
                && version != 0 =>
        {
            Some(key)
        }
        _ => None,
    }
}

/// Fast start: the upgrade request and ClientInfo leave in one flush; no response is read
/// (spec §4.3).
async fn send_fast_start(
    writer: &mut Writer,
    target: &Target,
    cfg: &ClientConfig,
    key: NodePublic,
    deadline: Instant,
) -> Result<NodePublic, ClientError> {
    upgrade::write_request(
        &mut writer.buf,
        &target.authority,
        &target.path_and_query,
        true,
        cfg.ideal_node.as_deref(),
    );
    encode_hello(&mut writer.buf, cfg, &key)?;
    step(
        deadline,
        "sending upgrade and ClientInfo",
        writer.write_out_timed(None),
    )
    .await?;
    Ok(key)
}

/// The classic exchange: upgrade request and 101 (not over WebSocket), ServerKey, ClientInfo.
async fn greet_classic(
    reader: &mut FrameReader<ReadHalf<BoxIo>>,
    writer: &mut Writer,
    target: &Target,
    cfg: &ClientConfig,
    deadline: Instant,
) -> Result<NodePublic, ClientError> {
    if cfg.transport == Transport::Derp {
        upgrade::write_request(
            &mut writer.buf,
            &target.authority,
            &target.path_and_query,
            false,
            cfg.ideal_node.as_deref(),
        );
        step(
            deadline,
            "sending upgrade request",
            writer.write_out_timed(None),
        )
        .await?;
        step(deadline, "reading upgrade response", read_101(reader)).await?;
    }
    let (t, payload) = step(
        deadline,
        "reading ServerKey",
        reader.read_frame(MAX_SERVER_KEY_FRAME_BYTES),
    )
    .await?;
    let key = match ServerToClient::decode(t, payload) {
        Ok(ServerToClient::ServerKey(k)) if t == FrameType::ServerKey as u8 => k,
        _ => {
            return Err(ClientError::Handshake(format!(
                "invalid server greeting (frame type {t:#04x})"
            )));
        }
    };
    encode_hello(&mut writer.buf, cfg, &key)?;
    step(deadline, "sending ClientInfo", writer.write_out_timed(None)).await?;
    Ok(key)
}

async fn read_server_info<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    cfg: &ClientConfig,
    server_key: &NodePublic,
    fast_start: bool,
) -> Result<ServerInfo, ClientError> {
    loop {
        let (t, payload) = reader.read_frame(MAX_CLIENT_FRAME_BYTES).await?;
        // In fast start the server still sends ServerKey first; Go skips it.
        if fast_start && t == FrameType::ServerKey as u8 {
            continue;
        }
        if t != FrameType::ServerInfo as u8 {
            return Err(ClientError::Handshake(format!(
                "first frame after ServerKey is type {t:#04x}, expected ServerInfo (0x03)"
            )));
        }
        let plain = info::open(&cfg.private_key, server_key, &payload)?;
        return Ok(ServerInfo::from_json(&plain)?);
    }
}

/// Reads the upgrade response head and leaves what follows it (DERP frames) in the buffer.
async fn read_101<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> Result<(), ClientError> {
    loop {
        if let Some(head) = upgrade::parse_response(&reader.buf)? {
            if head.status != 101 {
                // Best effort: whatever body bytes already arrived, for the error message.
                let body = &reader.buf[head.head_len..];
                let body = &body[..body.len().min(upgrade::MAX_ERROR_BODY_BYTES)];
                return Err(ClientError::UpgradeRefused {
                    status: head.status,
                    body: String::from_utf8_lossy(body).trim().to_owned(),
                });
            }
            reader.buf.advance(head.head_len);
            return Ok(());
        }
        reader.fill(4096).await?;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Drives the receive path (upgrade response, then frames) over arbitrary server bytes.
    async fn consume(input: Vec<u8>, classic: bool) -> Result<(), ClientError> {
        let mut r = FrameReader {
            io: &input[..],
            buf: BytesMut::new(),
        };
        if classic {
            read_101(&mut r).await?;
        }
        loop {
            let (t, payload) = r.read_frame(MAX_CLIENT_FRAME_BYTES).await?;
            let _ = ServerToClient::decode(t, payload)?;
        }
    }

    fn run(input: Vec<u8>, classic: bool) -> Result<(), ClientError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(consume(input, classic))
    }

    #[test]
    fn frames_split_and_cap() {
        let mut input = Vec::new();
        frame::encode_keep_alive(&mut input);
        frame::encode_recv_packet(&mut input, &NodePublic([7; 32]), &[1, 2, 3]).unwrap();
        // Then a header announcing 1 MiB + 1: refused before reading the payload.
        input.extend_from_slice(&[0x05, 0x00, 0x10, 0x00, 0x01]);
        let mut r = FrameReader {
            io: &input[..],
            buf: BytesMut::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(r.read_frame(MAX_CLIENT_FRAME_BYTES).await.unwrap().0, 0x06);
            let (t, p) = r.read_frame(MAX_CLIENT_FRAME_BYTES).await.unwrap();
            assert_eq!((t, p.len()), (0x05, 35));
            assert!(matches!(
                r.read_frame(MAX_CLIENT_FRAME_BYTES).await,
                Err(ClientError::FrameTooLarge { len: 1048577, .. })
            ));
        });
        // A frame of exactly 1 MiB is accepted.
        let mut input = vec![0x14, 0x00, 0x10, 0x00, 0x00];
        input.resize(5 + (1 << 20), b'x');
        assert_eq!(
            run(input, false).unwrap_err().to_string(),
            ClientError::Eof.to_string()
        );
    }

    /// A gathered write cancelled part-way leaves exactly the unwritten rest of its frames in
    /// the write buffer, so the stream stays in frame sync.
    #[test]
    fn cancelled_gather_keeps_the_unwritten_rest() {
        let dst = NodePublic([4; 32]);
        let (p0, p1) = (vec![1u8; 3000], vec![2u8; 5000]);
        let packets: [&[u8]; 2] = [&p0, &p1];
        let mut heads = Vec::new();
        let mut whole = Vec::new();
        for p in packets {
            frame::encode_send_packet_head(&mut heads, &dst, p.len()).unwrap();
            frame::encode_send_packet(&mut whole, &dst, p).unwrap();
        }
        for done in [
            0,
            10,
            PACKET_HEAD_LEN,
            1000,
            PACKET_HEAD_LEN + 3000 + 7,
            whole.len(),
        ] {
            let mut buf = BytesMut::new();
            drop(Gather {
                buf: &mut buf,
                heads: &heads,
                packets: &packets,
                done,
            });
            assert_eq!(&buf[..], &whole[done..], "cancelled after {done} bytes");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever a server sends, the client returns an error or frames, never panics.
        #[test]
        fn arbitrary_server_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..2048),
            classic in any::<bool>(),
        ) {
            let _ = run(input, classic);
        }

        /// Valid frames with mutated bytes: still no panic.
        #[test]
        fn mutated_frames_never_panic(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let mut input = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n".to_vec();
            frame::encode_server_key(&mut input, &NodePublic([1; 32]));
            frame::encode_peer_gone(&mut input, &NodePublic([2; 32]), frame::PeerGoneReason::NotHere);
            frame::encode_peer_present(&mut input, &NodePublic([3; 32]), None, 1);
            frame::encode_restarting(&mut input, 1, 2);
            frame::encode_pong(&mut input, &[9; 8]);
            for (at, v) in flips {
                let n = input.len();
                input[at % n] ^= v;
            }
            input.truncate(cut % (input.len() + 1));
            let _ = run(input, true);
        }
    }
}
