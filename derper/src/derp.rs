//! One DERP connection from handshake to close: ServerKey, ClientInfo, ServerInfo, then a
//! reader (decode, route, enqueue; never blocked by a slow receiver) and a writer (drain the
//! outbox in batches, flush, keepalives) running in the connection's single task.

use std::collections::{HashSet, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use derp_proto::frame::{
    self, ClientToServer, FrameError, FrameType, HEADER_LEN, MAX_CLIENT_INFO_BYTES,
    MAX_PACKET_BYTES, MIN_CLIENT_INFO_BYTES, PACKET_HEAD_LEN, PeerGoneReason, Split, peer_flags,
};
use derp_proto::gather::{self, GATHER_MIN_PACKET, MAX_IOVECS};
use derp_proto::info::{self, ClientInfo, ServerInfo};
use derp_proto::key::{KEY_LEN, MeshKey, NodePrivate, NodePublic};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::metrics::{DropReason, KindLabel, Metrics, ReasonLabel};
use crate::registry::{ClientConn, Outbox, Packet, PeerUpdate, Registry, Route};

/// Go gives each handshake step 10 s (ServerKey write, ClientInfo read).
pub const HANDSHAKE_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// KeepAlive every 60 s plus up to 5 s of per-connection jitter, as Go does; Go clients declare
/// a connection dead after 120 s without a frame.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_JITTER_MS: u64 = 5_000;
/// Mesh peers get Go's 30 s write deadline instead of the client one.
pub const MESH_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame we read after the handshake. Packets are at most 64 KiB + two keys; other
/// frames are tiny, and Go clients never send unknown large frames, so anything above this is
/// hostile and closes the connection instead of being buffered.
pub const MAX_FRAME_BYTES: usize = MAX_PACKET_BYTES + 2 * KEY_LEN;
/// Read buffer: allocated only once bytes arrive (an idle connection holds none), sized for a
/// TLS record's worth of plaintext, grown for big packets.
const READ_BUF_INITIAL: usize = 16 << 10;
/// An idle connection waits for its next bytes with this much stack instead of a read buffer.
const FIRST_READ_BYTES: usize = 64;
/// A kept read buffer with less room than this is topped up before the next read.
const READ_BUF_MIN_SPARE: usize = 1 << 10;
/// A write buffer that grew past this in a burst is not kept for the next batch.
const WRITE_BUF_KEEP: usize = 256 << 10;
/// A read buffer's capacity is reported to the buffer gauge when it moved by this much (one
/// shared atomic per packet would be a contention point on a many-core server).
const BUF_GAUGE_STEP: usize = 4 << 10;
/// PeerGone(NotHere) limiter: burst 3, one per second, per connection (Go's numbers).
const NOT_HERE_BURST: f64 = 3.0;

#[derive(Debug, Clone)]
pub struct DerpConfig {
    pub send_queue_depth: usize,
    /// Per-write deadline for regular clients; `None` disables it (Go's `-tcp-write-timeout 0`).
    pub write_timeout: Option<Duration>,
    pub keepalive_interval: Duration,
    pub handshake_timeout: Duration,
}

impl Default for DerpConfig {
    fn default() -> Self {
        DerpConfig {
            send_queue_depth: crate::registry::DEFAULT_SEND_QUEUE_DEPTH,
            write_timeout: Some(Duration::from_secs(2)),
            keepalive_interval: KEEPALIVE_INTERVAL,
            handshake_timeout: HANDSHAKE_STEP_TIMEOUT,
        }
    }
}

/// Everything DERP connections share.
pub struct DerpServer {
    pub private_key: NodePrivate,
    pub public_key: NodePublic,
    pub mesh_key: Option<MeshKey>,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub config: DerpConfig,
    pub shutdown: CancellationToken,
    pub verifier: Option<crate::verify::Verifier>,
    pub receive_limit: crate::limits::ReceiveLimit,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("first frame was type {0:#04x}, not ClientInfo")]
    NotClientInfo(u8),
    #[error("ClientInfo of {0} bytes is outside 56..=262144")]
    ClientInfoSize(usize),
    #[error("client key is all zeros")]
    ZeroKey,
    #[error("client info: {0}")]
    Info(#[from] info::InfoError),
    #[error("frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("frame type {0:#04x} is only for mesh peers")]
    NotMesh(u8),
    #[error("{0}")]
    FrameTooLarge(#[from] frame::FrameTooLarge),
    /// A write batch that does not describe its own buffers: a bug here, never the peer's
    /// doing. The connection ends rather than send a frame whose bytes are missing.
    #[error("internal: write batch segment {0} is out of range")]
    BrokenBatch(usize),
    #[error("client refused: {0}")]
    Refused(String),
}

impl ConnError {
    fn handshake_label(&self) -> &'static str {
        match self {
            ConnError::Io(_) => "io",
            ConnError::Timeout(_) => "timeout",
            ConnError::NotClientInfo(_) => "not_client_info",
            ConnError::ClientInfoSize(_) => "client_info_size",
            ConnError::ZeroKey => "zero_key",
            ConnError::Info(info::InfoError::Json(_)) => "client_info_json",
            ConnError::Info(_) => "client_info_box",
            _ => "other",
        }
    }
}

/// Reads exactly one frame into `buf` (which may already hold bytes) and returns its type and
/// payload. `Ok(None)` on a clean EOF between frames.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max_len: impl Fn(u8) -> usize,
) -> Result<Option<(u8, Bytes)>, ConnError> {
    if buf.is_empty() {
        // Wait for data without a buffer; allocate one only when something arrived.
        let mut first = [0u8; FIRST_READ_BYTES];
        let n = rd.read(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.reserve(READ_BUF_INITIAL);
        buf.extend_from_slice(&first[..n]);
    }
    loop {
        match frame::split_frame(buf, &max_len)? {
            Split::Frame {
                frame_type,
                payload,
            } => return Ok(Some((frame_type, payload))),
            // Exactly the rest of the frame: a 64 KiB packet costs one allocation, no more.
            Split::NeedPayload { missing } => buf.reserve(missing),
            Split::NeedHeader if buf.capacity() - buf.len() < HEADER_LEN => {
                buf.reserve(READ_BUF_INITIAL)
            }
            Split::NeedHeader => {}
        }
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
    }
}

/// How the connection reached us, for PeerPresent flags and logs.
pub struct ConnMeta {
    pub remote: SocketAddr,
    pub not_ideal: bool,
}

/// An accepted connection that may become a DERP client (see [`crate::registry::Registry::pending_add`]); ends
/// its count when dropped.
pub struct PendingConn {
    server: Arc<DerpServer>,
}

impl Drop for PendingConn {
    fn drop(&mut self) {
        self.server.registry.pending_done();
    }
}

impl DerpServer {
    /// Counts an accepted connection until it turns out to be plain HTTP or ends.
    pub fn pending_conn(self: &Arc<Self>) -> PendingConn {
        self.registry.pending_add();
        PendingConn {
            server: self.clone(),
        }
    }

    /// Runs a DERP connection to completion. `preamble` is written before the ServerKey frame
    /// (the 101 response in classic mode; empty for fast start and WebSocket).
    pub async fn serve<S>(self: Arc<Self>, stream: S, preamble: &[u8], meta: ConnMeta)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let span = info_span!("derp", peer = %meta.remote, client = tracing::field::Empty);
        async move {
            if let Err(e) = self.serve_inner(stream, preamble, meta).await {
                debug!("connection ended: {e}");
            }
        }
        .instrument(span)
        .await
    }

    async fn serve_inner<S>(
        self: &Arc<Self>,
        mut stream: S,
        preamble: &[u8],
        meta: ConnMeta,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let step = self.config.handshake_timeout;
        let mut wbuf = Vec::with_capacity(preamble.len() + 64);
        wbuf.extend_from_slice(preamble);
        frame::encode_server_key(&mut wbuf, &self.public_key);
        let wrote = timeout(step, async {
            stream.write_all(&wbuf).await?;
            stream.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.handshake_failed(ConnError::Io(e))),
            Err(_) => return Err(self.handshake_failed(ConnError::Timeout("writing ServerKey"))),
        }

        let mut rbuf = BytesMut::new();
        let (client_key, ci) = match timeout(step, self.read_client_info(&mut stream, &mut rbuf))
            .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(self.handshake_failed(e)),
            Err(_) => return Err(self.handshake_failed(ConnError::Timeout("reading ClientInfo"))),
        };
        tracing::Span::current().record("client", tracing::field::display(client_key.short()));

        let is_mesh = match (&self.mesh_key, &ci.mesh_key) {
            (Some(ours), Some(theirs)) => ours.ct_eq(theirs),
            _ => false,
        };
        if !is_mesh && let Some(v) = &self.verifier {
            // Still inside the ClientInfo step's deadline, as in Go.
            if let crate::verify::Decision::Deny(label, reason) =
                v.check(&client_key, Some(meta.remote.ip())).await
            {
                self.metrics
                    .clients_refused
                    .get_or_create(&ReasonLabel { reason: label })
                    .inc();
                tracing::info!(key = %client_key, "client refused: {reason}");
                return Err(ConnError::Refused(reason));
            }
        }
        let mut flags = 0;
        if is_mesh {
            flags |= peer_flags::MESH;
        }
        if ci.is_prober {
            flags |= peer_flags::PROBER;
        }
        if meta.not_ideal {
            flags |= peer_flags::NOT_IDEAL;
        }
        if flags == 0 {
            flags = peer_flags::REGULAR;
        }

        let conn = Arc::new(ClientConn::new(
            client_key,
            meta.remote,
            is_mesh,
            flags,
            self.config.send_queue_depth,
            &self.shutdown,
        ));
        self.registry.register(&conn);
        self.metrics.connections.inc();
        if is_mesh {
            self.metrics.mesh_peers.inc();
        }
        debug!(mesh = is_mesh, prober = ci.is_prober, "client connected");

        let result = self.run_connected(stream, &conn, rbuf, &client_key).await;

        conn.closing.store(true, Ordering::Relaxed);
        self.metrics.connections.dec();
        if is_mesh {
            self.metrics.mesh_peers.dec();
        }
        result
    }

    fn handshake_failed(&self, e: ConnError) -> ConnError {
        self.metrics.handshake_failure(e.handshake_label());
        e
    }

    async fn read_client_info<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        rbuf: &mut BytesMut,
    ) -> Result<(NodePublic, ClientInfo), ConnError> {
        // Whatever the first frame claims to be, at most a ClientInfo's worth is read.
        let Some((typ, payload)) = read_frame(stream, rbuf, |_| MAX_CLIENT_INFO_BYTES).await?
        else {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        };
        if typ != FrameType::ClientInfo as u8 {
            return Err(ConnError::NotClientInfo(typ));
        }
        if payload.len() < MIN_CLIENT_INFO_BYTES {
            return Err(ConnError::ClientInfoSize(payload.len()));
        }
        let key = NodePublic::from_slice(&payload[..KEY_LEN]).unwrap_or_default();
        if key.is_zero() {
            return Err(ConnError::ZeroKey);
        }
        let plain = info::open(&self.private_key, &key, &payload[KEY_LEN..])?;
        let ci = ClientInfo::from_json(&plain)?;
        Ok((key, ci))
    }

    async fn run_connected<S>(
        self: &Arc<Self>,
        mut stream: S,
        conn: &Arc<ClientConn>,
        rbuf: BytesMut,
        client_key: &NodePublic,
    ) -> Result<(), ConnError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // ServerInfo is always the first frame after ServerKey; the writer starts only after it.
        let si = ServerInfo {
            version: i64::from(frame::PROTOCOL_VERSION),
            ..Default::default()
        };
        let mut wbuf = Vec::with_capacity(256);
        let sent = match info::seal(&self.private_key, client_key, si.to_json().as_bytes()) {
            Ok(sealed) => match frame::encode_server_info(&mut wbuf, &sealed) {
                Ok(()) => match stream.write_all(&wbuf).await {
                    Ok(()) => stream.flush().await.map_err(ConnError::from),
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        if let Err(e) = sent {
            conn.closing.store(true, Ordering::Relaxed);
            self.registry.unregister(conn, &HashSet::new());
            return Err(e);
        }
        let wbuf = Vec::new();

        // A client that goes quiet right after the handshake should hold no read buffer.
        let rbuf = if rbuf.is_empty() {
            BytesMut::new()
        } else {
            rbuf
        };
        let (rd, wr) = tokio::io::split(stream);
        let mut reader = Reader {
            server: self,
            conn,
            rbuf,
            held: HeldBytes::new(&self.metrics.connection_buffer_bytes),
            not_here_limit: crate::limits::TokenBucket::new(1.0, NOT_HERE_BURST),
            preferred: false,
            limit: crate::limits::ReaderLimit::new(),
        };
        let mut writer = Writer {
            server: self,
            conn,
            wbuf,
            segs: Vec::new(),
            payloads: Vec::new(),
            mark: 0,
            held: HeldBytes::new(&self.metrics.connection_buffer_bytes),
            idle: false,
            received_from: HashSet::new(),
            new_sources: Vec::new(),
            batch: Outbox::default(),
            finish: false,
        };
        let result = tokio::select! {
            r = reader.run(rd) => r,
            r = writer.run(wr) => r,
            _ = conn.cancel.cancelled() => Ok(()),
        };
        if reader.preferred {
            self.metrics.home_connections.dec();
        }
        conn.closing.store(true, Ordering::Relaxed);
        self.registry.unregister(conn, &writer.received_from);
        // What was still queued is lost with the connection.
        let ob = std::mem::take(&mut *conn.lock_outbox());
        for _ in &ob.disco {
            self.metrics.dropped(DropReason::GoneDisconnected, true);
        }
        for _ in &ob.other {
            self.metrics.dropped(DropReason::GoneDisconnected, false);
        }
        result
    }
}

/// One buffer's share of the `connection_buffer_bytes` gauge; gives it back when dropped (the
/// connection ended).
struct HeldBytes<'a> {
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
    held: usize,
}

impl<'a> HeldBytes<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        HeldBytes { gauge, held: 0 }
    }

    /// Reports `now` bytes held if it differs from the last report by `step` or more, or if
    /// the buffer is gone (so idle connections always read as zero).
    fn report(&mut self, now: usize, step: usize) {
        if now.abs_diff(self.held) < step && !(now == 0 && self.held != 0) {
            return;
        }
        let delta = now as i64 - self.held as i64;
        self.gauge.inc_by(delta);
        self.held = now;
    }
}

impl Drop for HeldBytes<'_> {
    fn drop(&mut self) {
        self.gauge.dec_by(self.held as i64);
    }
}

struct Reader<'a> {
    server: &'a Arc<DerpServer>,
    conn: &'a Arc<ClientConn>,
    rbuf: BytesMut,
    held: HeldBytes<'a>,
    not_here_limit: crate::limits::TokenBucket,
    preferred: bool,
    limit: crate::limits::ReaderLimit,
}

impl Reader<'_> {
    async fn run<R: AsyncRead + Unpin>(&mut self, mut rd: R) -> Result<(), ConnError> {
        let is_mesh = self.conn.is_mesh;
        loop {
            if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
                // An active connection keeps its buffer (allocating per packet costs more than
                // the bytes); the writer tells us when the connection has gone idle, and then
                // the buffer goes, so idle connections hold none.
                if self.rbuf.capacity() < READ_BUF_MIN_SPARE {
                    self.rbuf.reserve(READ_BUF_INITIAL);
                }
                tokio::select! {
                    biased;
                    r = rd.read_buf(&mut self.rbuf) => {
                        if r? == 0 {
                            return Ok(());
                        }
                    }
                    _ = self.conn.release_buffers.notified() => {
                        self.rbuf = BytesMut::new();
                        self.held.report(0, BUF_GAUGE_STEP);
                    }
                }
            }
            let Some((typ, payload)) = read_frame(&mut rd, &mut self.rbuf, |t| {
                if t == FrameType::ForwardPacket as u8 || t == FrameType::SendPacket as u8 {
                    MAX_FRAME_BYTES
                } else {
                    // Control frames are at most 1000 bytes (Ping); unknown ones are skipped,
                    // but not at any size.
                    64 << 10
                }
            })
            .await?
            else {
                return Ok(());
            };
            self.held.report(self.rbuf.capacity(), BUF_GAUGE_STEP);
            self.conn.frames_read.fetch_add(1, Ordering::Relaxed);
            if !is_mesh {
                // Mesh peers are exempt, as in Go: they carry a whole region's traffic.
                let pause = self
                    .limit
                    .delay_for(&self.server.receive_limit, payload.len());
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            if self.conn.is_dup.load(Ordering::Relaxed) {
                self.server.registry.note_active(self.conn);
            }
            match ClientToServer::decode(typ, payload)? {
                ClientToServer::SendPacket { dst, packet } => self.send_packet(dst, packet),
                ClientToServer::ForwardPacket { src, dst, packet } => {
                    if !is_mesh {
                        return Err(ConnError::NotMesh(typ));
                    }
                    self.forwarded_packet(src, dst, packet);
                }
                ClientToServer::NotePreferred(p) => {
                    if p != self.preferred {
                        self.preferred = p;
                        if p {
                            self.server.metrics.home_connections.inc();
                        } else {
                            self.server.metrics.home_connections.dec();
                        }
                    }
                }
                ClientToServer::WatchConns => {
                    if !is_mesh {
                        return Err(ConnError::NotMesh(typ));
                    }
                    // Our own mesh client connecting back to us (self-connect) is not a watcher.
                    if self.conn.key != self.server.public_key {
                        self.server.registry.add_watcher(self.conn);
                    }
                }
                ClientToServer::ClosePeer(k) => {
                    if !is_mesh {
                        return Err(ConnError::NotMesh(typ));
                    }
                    let n = self.server.registry.close_key(&k);
                    debug!(target_key = %k.short(), closed = n, "mesh peer asked to close a client");
                }
                ClientToServer::Ping(data) => self.conn.set_pong(data),
                ClientToServer::Pong(_) | ClientToServer::Ignored(_) => {}
            }
        }
    }

    fn note_received(&self, disco: bool, len: usize) {
        let m = &self.server.metrics;
        m.packets_received
            .get_or_create(&KindLabel {
                kind: crate::metrics::kind_label(disco),
            })
            .inc();
        m.bytes_received.inc_by(len as u64);
    }

    fn send_packet(&mut self, dst: NodePublic, packet: Bytes) {
        let disco = frame::looks_like_disco(&packet);
        self.note_received(disco, packet.len());
        let m = &self.server.metrics;
        match self.server.registry.route(&dst) {
            Route::Local(c) => c.enqueue_packet(
                Packet {
                    src: self.conn.key,
                    data: packet,
                },
                disco,
                m,
            ),
            Route::Forward(f) => {
                if f.forward(self.conn.key, dst, packet) {
                    m.packets_forwarded_out.inc();
                }
            }
            Route::DupNoActive => m.dropped(DropReason::DupClient, disco),
            Route::Unknown => {
                m.dropped(DropReason::UnknownDest, disco);
                if disco {
                    self.not_here(dst);
                }
            }
        }
    }

    fn forwarded_packet(&mut self, src: NodePublic, dst: NodePublic, packet: Bytes) {
        let disco = frame::looks_like_disco(&packet);
        self.note_received(disco, packet.len());
        let m = &self.server.metrics;
        if src.is_zero() {
            // Only a v1 RecvPacket could carry it; nobody speaks v1 any more.
            m.dropped(DropReason::UnknownDestOnFwd, disco);
            return;
        }
        match self.server.registry.route_local(&dst) {
            Route::Local(c) => {
                m.packets_forwarded_in.inc();
                c.enqueue_packet(Packet { src, data: packet }, disco, m);
            }
            Route::DupNoActive => m.dropped(DropReason::DupClient, disco),
            _ => {
                m.dropped(DropReason::UnknownDestOnFwd, disco);
                if disco {
                    self.not_here(dst);
                }
            }
        }
    }

    /// PeerGone(NotHere) to the sender, rate-limited like Go (burst 3, 1/s).
    fn not_here(&mut self, dst: NodePublic) {
        if self.not_here_limit.try_take(1.0)
            && self.conn.enqueue_peer_gone(dst, PeerGoneReason::NotHere)
        {
            self.server
                .metrics
                .peer_gone_sent
                .get_or_create(&ReasonLabel { reason: "not_here" })
                .inc();
        }
    }
}

struct Writer<'a> {
    server: &'a Arc<DerpServer>,
    conn: &'a Arc<ClientConn>,
    wbuf: Vec<u8>,
    /// The batch being written as slices of `wbuf` and `payloads` (kept between batches).
    segs: Vec<Seg>,
    payloads: Vec<Bytes>,
    mark: usize,
    held: HeldBytes<'a>,
    /// No traffic for a whole keepalive period: keepalives then leave no buffer behind.
    idle: bool,
    /// Every source this connection has been sent a packet from (for PeerGone).
    received_from: HashSet<NodePublic>,
    new_sources: Vec<NodePublic>,
    /// Swapped with the shared outbox so queues keep their capacity across batches.
    batch: Outbox,
    /// A Restarting frame went out: close cleanly once it is flushed.
    finish: bool,
}

impl Writer<'_> {
    async fn run<W: AsyncWrite + Unpin>(&mut self, mut wr: W) -> Result<(), ConnError> {
        // Go's jitter is up to 5 s on a 60 s period; a shorter period (tests) gets a
        // proportionally shorter jitter so it stays a period of about that length.
        let interval = self.server.config.keepalive_interval;
        let jitter_ms = KEEPALIVE_JITTER_MS.min(interval.as_millis() as u64 / 12);
        let period = interval + Duration::from_millis(rand::thread_rng().gen_range(0..=jitter_ms));
        let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
        let write_timeout = if self.conn.is_mesh {
            Some(MESH_WRITE_TIMEOUT)
        } else {
            self.server.config.write_timeout
        };
        // Activity seen at the last keepalive, to tell when the connection went idle.
        let mut last_reads = 0u64;
        let mut wrote_since_tick = false;
        loop {
            tokio::select! {
                _ = self.conn.wake.notified() => {}
                _ = keepalive.tick() => {
                    let reads = self.conn.frames_read.load(Ordering::Relaxed);
                    if reads == last_reads && !wrote_since_tick {
                        // A whole keepalive period without traffic: give the buffers back.
                        self.wbuf = Vec::new();
                        self.idle = true;
                        self.conn.release_buffers.notify_one();
                    }
                    last_reads = reads;
                    wrote_since_tick = false;
                    frame::encode_keep_alive(&mut self.wbuf);
                }
            }
            let had_traffic = self.fill_batch();
            self.idle &= !had_traffic;
            if self.wbuf.is_empty() {
                continue;
            }
            self.held.report(self.wbuf.capacity(), 1);
            if self.mark < self.wbuf.len() {
                self.segs.push(Seg::Buf(self.mark, self.wbuf.len()));
            }
            let segs = Segments::new(&self.wbuf, &self.segs, &self.payloads)?;
            if let Err(e) = write_with_deadline(&mut wr, &segs, write_timeout).await {
                self.server.metrics.dropped(DropReason::WriteError, false);
                return Err(e);
            }
            // The payloads' reader buffers are free to be reused from here.
            self.payloads.clear();
            self.segs.clear();
            self.mark = 0;
            if self.finish {
                // TLS close_notify and FIN, so the client redials at once instead of timing out.
                let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
                return Ok(());
            }
            // Kept for the next batch while the connection is busy (released above once it is
            // idle for a keepalive period, or now if a burst made it large).
            if self.wbuf.capacity() > WRITE_BUF_KEEP || self.idle {
                self.wbuf = Vec::new();
            } else {
                self.wbuf.clear();
            }
            self.held.report(self.wbuf.capacity(), 1);
            // Our own keepalives are not traffic.
            wrote_since_tick |= had_traffic;
            if !self.new_sources.is_empty() {
                self.server
                    .registry
                    .note_sent_to(self.conn, &self.new_sources);
                self.new_sources.clear();
            }
        }
    }

    /// Moves everything queued into the write buffer as frames; false if nothing was queued.
    fn fill_batch(&mut self) -> bool {
        {
            let mut ob = self.conn.lock_outbox();
            if ob.is_empty() {
                return false;
            }
            std::mem::swap(&mut *ob, &mut self.batch);
        }
        let b = &mut self.batch;
        let w = &mut self.wbuf;
        let frame_bytes = |q: &VecDeque<Packet>| -> usize {
            q.iter()
                .map(|p| match p.data.len() {
                    n if n >= GATHER_MIN_PACKET => PACKET_HEAD_LEN,
                    n => PACKET_HEAD_LEN + n,
                })
                .sum()
        };
        // Control frames are small; 256 bytes covers the usual pong or PeerGone.
        w.reserve(frame_bytes(&b.disco) + frame_bytes(&b.other) + 256);
        if let Some(p) = b.pong.take() {
            frame::encode_pong(w, &p);
        }
        for (key, reason) in b.peer_gone.drain(..) {
            frame::encode_peer_gone(w, &key, reason);
        }
        for u in b.peer_updates.drain(..) {
            match u {
                PeerUpdate::Present { key, addr, flags } => {
                    frame::encode_peer_present(w, &key, addr, flags)
                }
                PeerUpdate::Gone(key) => {
                    frame::encode_peer_gone(w, &key, PeerGoneReason::Disconnected)
                }
            }
        }
        let m = &self.server.metrics;
        let mut out = Batch {
            wbuf: w,
            segs: &mut self.segs,
            payloads: &mut self.payloads,
            mark: &mut self.mark,
        };
        for q in [&mut b.disco, &mut b.other] {
            drain_packets(
                q,
                &mut out,
                &mut self.received_from,
                &mut self.new_sources,
                m,
            );
        }
        // Last, after what was still queued: the client learns we are going, then we close.
        if let Some((reconnect, try_for)) = b.restarting.take() {
            frame::encode_restarting(w, reconnect, try_for);
            self.server.metrics.restarting_sent.inc();
            self.finish = true;
        }
        true
    }
}

/// A piece of a write batch: a range of the write buffer, or one packet payload.
#[derive(Debug, Clone, Copy)]
enum Seg {
    Buf(usize, usize),
    Payload(usize),
}

/// Where `fill_batch` puts frames: small ones whole into the write buffer; large packets as a
/// head in the buffer plus their payload by reference.
struct Batch<'a> {
    wbuf: &'a mut Vec<u8>,
    segs: &'a mut Vec<Seg>,
    payloads: &'a mut Vec<Bytes>,
    /// Start of the write-buffer bytes not yet covered by a `Seg::Buf`.
    mark: &'a mut usize,
}

impl Batch<'_> {
    /// Fails (writing nothing) only for a payload past the frame limit, which the reader's
    /// packet-size check keeps out of every queue.
    fn push_recv_packet(&mut self, src: &NodePublic, data: Bytes) -> Result<(), FrameError> {
        if data.len() < GATHER_MIN_PACKET {
            return frame::encode_recv_packet(self.wbuf, src, &data);
        }
        frame::encode_recv_packet_head(self.wbuf, src, data.len())?;
        self.segs.push(Seg::Buf(*self.mark, self.wbuf.len()));
        *self.mark = self.wbuf.len();
        self.segs.push(Seg::Payload(self.payloads.len()));
        self.payloads.push(data);
        Ok(())
    }
}

/// A batch ready to write, as the slices it is made of; every segment checked to lie within
/// its buffer when the batch is made.
struct Segments<'a> {
    wbuf: &'a [u8],
    segs: &'a [Seg],
    payloads: &'a [Bytes],
}

impl<'a> Segments<'a> {
    fn new(wbuf: &'a [u8], segs: &'a [Seg], payloads: &'a [Bytes]) -> Result<Self, ConnError> {
        for (n, s) in segs.iter().enumerate() {
            let ok = match *s {
                Seg::Buf(a, b) => a <= b && b <= wbuf.len(),
                Seg::Payload(i) => i < payloads.len(),
            };
            if !ok {
                debug_assert!(ok, "segment {n} ({s:?}) out of range");
                return Err(ConnError::BrokenBatch(n));
            }
        }
        Ok(Segments {
            wbuf,
            segs,
            payloads,
        })
    }

    fn iter(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let (wbuf, payloads) = (self.wbuf, self.payloads);
        // In range: checked in `new`.
        self.segs.iter().map(move |s| match *s {
            Seg::Buf(a, b) => &wbuf[a..b],
            Seg::Payload(i) => &payloads[i][..],
        })
    }

    fn len(&self) -> usize {
        self.iter().map(<[u8]>::len).sum()
    }
}

fn drain_packets(
    q: &mut VecDeque<Packet>,
    out: &mut Batch<'_>,
    received_from: &mut HashSet<NodePublic>,
    new_sources: &mut Vec<NodePublic>,
    m: &Metrics,
) {
    let mut bytes = 0u64;
    let n = q.len() as u64;
    for p in q.drain(..) {
        bytes += p.data.len() as u64;
        if received_from.insert(p.src) {
            new_sources.push(p.src);
        }
        if let Err(e) = out.push_recv_packet(&p.src, p.data) {
            debug_assert!(false, "a queued packet does not fit a frame: {e}");
            tracing::error!(src = %p.src, "dropping a queued packet that does not fit a frame: {e}");
        }
    }
    if n > 0 {
        m.packets_sent.inc_by(n);
        m.bytes_sent.inc_by(bytes);
    }
}

/// Writes the batch fully (gathered) and flushes; each write must make progress within
/// `deadline` (Go sets a deadline per frame; a client that stops reading is cut off instead of
/// stalling anyone).
async fn write_with_deadline<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &Segments<'_>,
    deadline: Option<Duration>,
) -> Result<(), ConnError> {
    let total = batch.len();
    let mut off = 0;
    while off < total {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let used = gather::fill_iovecs(batch.iter(), off, &mut iov);
        let iov = &iov[..used];
        let n = match deadline {
            Some(d) => timeout(d, wr.write_vectored(iov))
                .await
                .map_err(|_| ConnError::Timeout("writing to client"))??,
            None => wr.write_vectored(iov).await?,
        };
        if n == 0 {
            return Err(ConnError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        off += n;
    }
    match deadline {
        Some(d) => timeout(d, wr.flush())
            .await
            .map_err(|_| ConnError::Timeout("flushing to client"))??,
        None => wr.flush().await?,
    }
    Ok(())
}
