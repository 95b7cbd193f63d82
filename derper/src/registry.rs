//! Who is connected: every DERP connection by client key (with Go's duplicate-key policy, "last
//! writer is active"), mesh watchers, mesh forwarders, and who has received from whom (for
//! PeerGone). One mutex guards it all; the hot path holds it only to look up a destination.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use derp_proto::frame::PeerGoneReason;
use derp_proto::key::NodePublic;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DropReason, Metrics};

/// Mirrors Go's `perClientSendQueueDepth`: 32 packets per queue (disco and other each).
pub const DEFAULT_SEND_QUEUE_DEPTH: usize = 32;
/// PeerGone notices waiting to be written; Go's channel has the same depth and drops when full.
const PEER_GONE_QUEUE_DEPTH: usize = 32;

/// A packet waiting in a connection's send queue.
#[derive(Debug, Clone)]
pub struct Packet {
    pub src: NodePublic,
    pub data: Bytes,
}

/// A change a mesh watcher must learn about.
#[derive(Debug, Clone)]
pub enum PeerUpdate {
    Present {
        key: NodePublic,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    Gone(NodePublic),
}

#[derive(Default)]
pub struct Outbox {
    pub disco: VecDeque<Packet>,
    pub other: VecDeque<Packet>,
    pub peer_gone: VecDeque<(NodePublic, PeerGoneReason)>,
    /// Unbounded by design: a watcher must see every change, and it is bounded by the number of
    /// clients (a flood is coalesced by nothing in Go either).
    pub peer_updates: Vec<PeerUpdate>,
    /// Go keeps one pending pong; a faster ping stream is ignored.
    pub pong: Option<[u8; 8]>,
    pub restarting: Option<(u32, u32)>,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.disco.is_empty()
            && self.other.is_empty()
            && self.peer_gone.is_empty()
            && self.peer_updates.is_empty()
            && self.pong.is_none()
            && self.restarting.is_none()
    }
}

/// The shared half of one DERP connection: what other connections need to reach it.
pub struct ClientConn {
    pub id: u64,
    pub key: NodePublic,
    pub remote: SocketAddr,
    pub is_mesh: bool,
    /// PeerPresent flags for this connection.
    pub flags: u8,
    pub outbox: Mutex<Outbox>,
    pub wake: Notify,
    /// Set when the connection is going away; enqueues then drop with `gone_disconnected`.
    pub closing: AtomicBool,
    /// Cancelled to close the connection (ClosePeer, shutdown).
    pub cancel: CancellationToken,
    /// Whether this key has other connections: only then must reads take the registry lock.
    pub is_dup: AtomicBool,
    /// Frames read so far; the writer compares it between keepalives to tell an idle connection.
    pub frames_read: AtomicU64,
    /// Asks the reader to let go of its read buffer (the connection went idle).
    pub release_buffers: Notify,
    queue_depth: usize,
}

impl ClientConn {
    pub fn new(
        key: NodePublic,
        remote: SocketAddr,
        is_mesh: bool,
        flags: u8,
        queue_depth: usize,
        parent: &CancellationToken,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        ClientConn {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            key,
            remote,
            is_mesh,
            flags,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            cancel: parent.child_token(),
            is_dup: AtomicBool::new(false),
            frames_read: AtomicU64::new(0),
            release_buffers: Notify::new(),
            queue_depth: queue_depth.max(1),
        }
    }

    pub fn lock_outbox(&self) -> MutexGuard<'_, Outbox> {
        // A poisoned outbox only means a writer panicked mid-update; the queues stay usable.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a packet with Go's policy: when the queue is full the oldest packet is dropped.
    pub fn enqueue_packet(&self, pkt: Packet, disco: bool, metrics: &Metrics) {
        if self.closing.load(Ordering::Relaxed) {
            metrics.dropped(DropReason::GoneDisconnected, disco);
            return;
        }
        {
            let mut ob = self.lock_outbox();
            let q = if disco { &mut ob.disco } else { &mut ob.other };
            if q.len() >= self.queue_depth {
                q.pop_front();
                metrics.dropped(DropReason::QueueHead, disco);
            }
            q.push_back(pkt);
        }
        self.wake.notify_one();
    }

    pub fn enqueue_peer_gone(&self, key: NodePublic, reason: PeerGoneReason) -> bool {
        let queued = {
            let mut ob = self.lock_outbox();
            if ob.peer_gone.len() >= PEER_GONE_QUEUE_DEPTH {
                false
            } else {
                ob.peer_gone.push_back((key, reason));
                true
            }
        };
        if queued {
            self.wake.notify_one();
        }
        queued
    }

    pub fn enqueue_peer_updates(&self, updates: impl IntoIterator<Item = PeerUpdate>) {
        self.lock_outbox().peer_updates.extend(updates);
        self.wake.notify_one();
    }

    pub fn set_pong(&self, data: [u8; 8]) {
        {
            let mut ob = self.lock_outbox();
            if ob.pong.is_some() {
                return;
            }
            ob.pong = Some(data);
        }
        self.wake.notify_one();
    }

    pub fn set_restarting(&self, reconnect_in_ms: u32, try_for_ms: u32) {
        self.lock_outbox().restarting = Some((reconnect_in_ms, try_for_ms));
        self.wake.notify_one();
    }
}

/// Something that can carry a packet to another server of the region (a mesh client).
pub trait PacketForwarder: Send + Sync {
    /// Identifies the forwarder for add/remove; one per mesh peer.
    fn forwarder_id(&self) -> u64;
    /// Hands the packet over; false if it was dropped.
    fn forward(&self, src: NodePublic, dst: NodePublic, packet: Bytes) -> bool;
}

struct ClientSet {
    /// In connection order.
    conns: Vec<Arc<ClientConn>>,
    active: Option<Arc<ClientConn>>,
    /// Connection ids in the order they last spoke (adjacent repeats removed).
    history: Vec<u64>,
}

/// Where a packet for a key goes.
pub enum Route {
    Local(Arc<ClientConn>),
    Forward(Arc<dyn PacketForwarder>),
    /// Known key, but its duplicate connections are fighting: no connection is active.
    DupNoActive,
    Unknown,
}

#[derive(Default)]
struct Inner {
    clients: HashMap<NodePublic, ClientSet>,
    watchers: HashMap<u64, Arc<ClientConn>>,
    /// Packet source → connections that have been sent at least one packet from it.
    sent_to: HashMap<NodePublic, HashMap<u64, Arc<ClientConn>>>,
    /// Key → forwarders that reported it, oldest first (the first one is used).
    forwarders: HashMap<NodePublic, Vec<Arc<dyn PacketForwarder>>>,
    /// Set once shutdown tells clients to go: (reconnect in, try for) of the Restarting frame.
    draining: Option<(u32, u32)>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    /// Woken when the last client leaves, so a draining shutdown waits for exactly that.
    emptied: Notify,
    /// Accepted connections not yet known to be plain HTTP (TLS, request head, DERP handshake,
    /// and then the DERP connection itself): a shutdown waits for these too, so one accepted
    /// just before the listener closed is told to go rather than cut.
    pending: AtomicUsize,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            metrics,
            emptied: Notify::new(),
            pending: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection after its handshake; the newest connection of a key becomes active.
    pub fn register(&self, c: &Arc<ClientConn>) {
        let draining = self.register_locked(c);
        // A client that finished its handshake after the drain began (accepted from the
        // listener's queue as it closed) is told as well, or it would sit out the shutdown
        // timeout. Outside the registry lock: the outbox has its own.
        if let Some((reconnect, try_for)) = draining {
            c.set_restarting(reconnect, try_for);
        }
    }

    fn register_locked(&self, c: &Arc<ClientConn>) -> Option<(u32, u32)> {
        let mut inner = self.lock();
        match inner.clients.entry(c.key) {
            Entry::Vacant(v) => {
                v.insert(ClientSet {
                    conns: vec![c.clone()],
                    active: Some(c.clone()),
                    history: Vec::new(),
                });
                self.metrics.clients.inc();
            }
            Entry::Occupied(mut o) => {
                let set = o.get_mut();
                if set.conns.len() == 1 {
                    set.history = vec![set.conns[0].id];
                    set.conns[0].is_dup.store(true, Ordering::Relaxed);
                    self.metrics.duplicate_client_keys.inc();
                }
                c.is_dup.store(true, Ordering::Relaxed);
                set.conns.push(c.clone());
                set.history.push(c.id);
                set.active = Some(c.clone());
            }
        }
        let update = PeerUpdate::Present {
            key: c.key,
            addr: Some(c.remote),
            flags: c.flags,
        };
        for w in inner.watchers.values() {
            w.enqueue_peer_updates([update.clone()]);
        }
        inner.draining
    }

    /// Tells every client, and every one that registers from now on, that the server is
    /// restarting; returns how many were told now.
    pub fn start_draining(&self, reconnect_in_ms: u32, try_for_ms: u32) -> usize {
        let conns = {
            let mut inner = self.lock();
            inner.draining = Some((reconnect_in_ms, try_for_ms));
            inner
                .clients
                .values()
                .flat_map(|s| s.conns.iter().cloned())
                .collect::<Vec<_>>()
        };
        for c in &conns {
            c.set_restarting(reconnect_in_ms, try_for_ms);
        }
        conns.len()
    }

    /// Removes a connection. Returns true if it was the last connection of its key.
    pub fn unregister(&self, c: &Arc<ClientConn>, received_from: &HashSet<NodePublic>) -> bool {
        let mut inner = self.lock();
        if inner.watchers.remove(&c.id).is_some() {
            self.metrics.watchers.dec();
        }
        for src in received_from {
            if let Some(m) = inner.sent_to.get_mut(src) {
                m.remove(&c.id);
                if m.is_empty() {
                    inner.sent_to.remove(src);
                }
            }
        }
        let Some(set) = inner.clients.get_mut(&c.key) else {
            return false;
        };
        let before = set.conns.len();
        set.conns.retain(|x| x.id != c.id);
        if set.conns.len() == before {
            return false;
        }
        set.history.retain(|id| *id != c.id);
        match set.conns.len() {
            0 => {
                inner.clients.remove(&c.key);
                self.metrics.clients.dec();
                for w in inner.watchers.values() {
                    w.enqueue_peer_updates([PeerUpdate::Gone(c.key)]);
                }
                if !inner.forwarders.contains_key(&c.key) {
                    self.notify_gone_locked(&mut inner, c.key);
                } else {
                    inner.sent_to.remove(&c.key);
                }
                if inner.clients.is_empty() {
                    self.emptied.notify_waiters();
                }
                true
            }
            1 => {
                let only = set.conns[0].clone();
                only.is_dup.store(false, Ordering::Relaxed);
                set.active = Some(only);
                set.history.clear();
                self.metrics.duplicate_client_keys.dec();
                false
            }
            _ => {
                if set.active.as_ref().is_some_and(|a| a.id == c.id) {
                    set.active = set
                        .history
                        .last()
                        .and_then(|id| set.conns.iter().find(|x| x.id == *id))
                        .cloned();
                }
                false
            }
        }
    }

    /// Tells every connection that received from `key` that it is gone from the region.
    fn notify_gone_locked(&self, inner: &mut Inner, key: NodePublic) {
        if let Some(receivers) = inner.sent_to.remove(&key) {
            for r in receivers.values() {
                if r.enqueue_peer_gone(key, PeerGoneReason::Disconnected) {
                    self.metrics
                        .peer_gone_sent
                        .get_or_create(&crate::metrics::ReasonLabel {
                            reason: "disconnected",
                        })
                        .inc();
                }
            }
        }
    }

    /// Notes that a duplicate connection spoke: "last writer is active".
    pub fn note_active(&self, c: &Arc<ClientConn>) {
        let mut inner = self.lock();
        let Some(set) = inner.clients.get_mut(&c.key) else {
            return;
        };
        if set.conns.len() < 2 {
            return;
        }
        if set.history.last() != Some(&c.id) {
            set.history.push(c.id);
            // The history only needs each connection's latest position.
            if set.history.len() > 4 * set.conns.len() {
                let mut seen = HashSet::new();
                let mut compact: Vec<u64> = set
                    .history
                    .iter()
                    .rev()
                    .filter(|id| seen.insert(**id))
                    .copied()
                    .collect();
                compact.reverse();
                set.history = compact;
            }
        }
        set.active = Some(c.clone());
    }

    pub fn route(&self, dst: &NodePublic) -> Route {
        let inner = self.lock();
        if let Some(set) = inner.clients.get(dst) {
            if let Some(a) = &set.active {
                return Route::Local(a.clone());
            }
            if set.conns.len() > 1 {
                return Route::DupNoActive;
            }
        }
        match inner.forwarders.get(dst).and_then(|v| v.first()) {
            Some(f) => Route::Forward(f.clone()),
            None => Route::Unknown,
        }
    }

    /// Only local connections: what a ForwardPacket from a mesh peer may reach (one hop).
    pub fn route_local(&self, dst: &NodePublic) -> Route {
        let inner = self.lock();
        match inner.clients.get(dst) {
            Some(set) => match &set.active {
                Some(a) => Route::Local(a.clone()),
                None => Route::DupNoActive,
            },
            None => Route::Unknown,
        }
    }

    /// Records that `receiver` has been sent packets from each of `sources`.
    pub fn note_sent_to(&self, receiver: &Arc<ClientConn>, sources: &[NodePublic]) {
        let mut inner = self.lock();
        for s in sources {
            inner
                .sent_to
                .entry(*s)
                .or_default()
                .insert(receiver.id, receiver.clone());
        }
    }

    /// Subscribes a mesh watcher and queues PeerPresent for every key with an active connection.
    pub fn add_watcher(&self, w: &Arc<ClientConn>) {
        let mut inner = self.lock();
        let snapshot: Vec<PeerUpdate> = inner
            .clients
            .values()
            .filter_map(|set| set.active.as_ref())
            .map(|a| PeerUpdate::Present {
                key: a.key,
                addr: Some(a.remote),
                flags: a.flags,
            })
            .collect();
        w.enqueue_peer_updates(snapshot);
        if inner.watchers.insert(w.id, w.clone()).is_none() {
            self.metrics.watchers.inc();
        }
    }

    /// Closes every local connection of `key` (mesh ClosePeer). Returns how many.
    pub fn close_key(&self, key: &NodePublic) -> usize {
        let inner = self.lock();
        match inner.clients.get(key) {
            Some(set) => {
                for c in &set.conns {
                    c.cancel.cancel();
                }
                set.conns.len()
            }
            None => 0,
        }
    }

    /// A mesh peer reports that `key` is reachable through it.
    pub fn add_forwarder(&self, key: NodePublic, fwd: Arc<dyn PacketForwarder>) {
        let mut inner = self.lock();
        let list = inner.forwarders.entry(key).or_default();
        if !list.iter().any(|f| f.forwarder_id() == fwd.forwarder_id()) {
            list.push(fwd);
        }
    }

    /// A mesh peer no longer reaches `key`. When that was the last way to reach it and it is not
    /// local, everyone who received from it learns it is gone.
    pub fn remove_forwarder(&self, key: NodePublic, forwarder_id: u64) {
        let mut inner = self.lock();
        let Some(list) = inner.forwarders.get_mut(&key) else {
            return;
        };
        list.retain(|f| f.forwarder_id() != forwarder_id);
        if list.is_empty() {
            inner.forwarders.remove(&key);
            if !inner.clients.contains_key(&key) {
                self.notify_gone_locked(&mut inner, key);
            }
        }
    }

    /// Every connection, for shutdown.
    pub fn all_conns(&self) -> Vec<Arc<ClientConn>> {
        let inner = self.lock();
        inner
            .clients
            .values()
            .flat_map(|s| s.conns.iter().cloned())
            .collect()
    }

    pub fn client_count(&self) -> usize {
        self.lock().clients.len()
    }

    pub fn pending_add(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }

    pub fn pending_done(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.emptied.notify_waiters();
        }
    }

    /// Returns once no client is connected and no accepted connection may still become one.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the count is read, so a last client leaving in between is not
            // missed.
            emptied.as_mut().enable();
            if self.client_count() == 0 && self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            emptied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(key: u8, parent: &CancellationToken) -> Arc<ClientConn> {
        Arc::new(ClientConn::new(
            NodePublic([key; 32]),
            "127.0.0.1:1".parse().unwrap(),
            false,
            1,
            4,
            parent,
        ))
    }

    fn active_id(r: &Registry, key: u8) -> Option<u64> {
        match r.route(&NodePublic([key; 32])) {
            Route::Local(c) => Some(c.id),
            _ => None,
        }
    }

    #[tokio::test]
    async fn wait_empty_returns_when_the_last_client_leaves() {
        use std::time::Duration;
        let t = CancellationToken::new();
        let r = Arc::new(Registry::new(Arc::default()));
        let (a, b) = (conn(1, &t), conn(2, &t));
        r.register(&a);
        r.register(&b);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_empty().await }
        });
        r.unregister(&a, &HashSet::new());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "returned with a client still connected"
        );
        r.unregister(&b, &HashSet::new());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait_empty did not return after the last client left")
            .unwrap();
        // Already empty: returns at once.
        tokio::time::timeout(Duration::from_secs(1), r.wait_empty())
            .await
            .unwrap();
    }

    #[test]
    fn last_writer_is_active() {
        let t = CancellationToken::new();
        let r = Registry::new(Arc::default());
        let c1 = conn(1, &t);
        let c2 = conn(1, &t);
        r.register(&c1);
        assert_eq!(active_id(&r, 1), Some(c1.id));
        r.register(&c2);
        assert_eq!(active_id(&r, 1), Some(c2.id));
        assert!(c1.is_dup.load(Ordering::Relaxed));
        r.note_active(&c1);
        assert_eq!(active_id(&r, 1), Some(c1.id));
        r.note_active(&c2);
        assert_eq!(active_id(&r, 1), Some(c2.id));
        // Closing the active one falls back to the remaining one.
        assert!(!r.unregister(&c2, &HashSet::new()));
        assert_eq!(active_id(&r, 1), Some(c1.id));
        assert!(!c1.is_dup.load(Ordering::Relaxed));
        assert!(r.unregister(&c1, &HashSet::new()));
        assert!(matches!(r.route(&NodePublic([1; 32])), Route::Unknown));
    }

    #[test]
    fn three_duplicates_fall_back_along_history() {
        let t = CancellationToken::new();
        let r = Registry::new(Arc::default());
        let (a, b, c) = (conn(1, &t), conn(1, &t), conn(1, &t));
        r.register(&a);
        r.register(&b);
        r.register(&c);
        r.note_active(&a);
        assert_eq!(active_id(&r, 1), Some(a.id));
        r.unregister(&a, &HashSet::new());
        assert_eq!(active_id(&r, 1), Some(c.id));
    }

    #[test]
    fn queue_drops_oldest() {
        let t = CancellationToken::new();
        let m = Metrics::default();
        let c = conn(1, &t);
        for i in 0..10u8 {
            c.enqueue_packet(
                Packet {
                    src: NodePublic([2; 32]),
                    data: Bytes::from(vec![i]),
                },
                false,
                &m,
            );
        }
        let ob = c.lock_outbox();
        let got: Vec<u8> = ob.other.iter().map(|p| p.data[0]).collect();
        assert_eq!(got, vec![6, 7, 8, 9]);
    }

    #[test]
    fn peer_gone_reaches_only_receivers_when_key_leaves() {
        let t = CancellationToken::new();
        let r = Registry::new(Arc::default());
        let a = conn(1, &t);
        let b = conn(2, &t);
        let c = conn(3, &t);
        r.register(&a);
        r.register(&b);
        r.register(&c);
        r.note_sent_to(&b, &[a.key]);
        r.unregister(&a, &HashSet::new());
        assert_eq!(b.lock_outbox().peer_gone.len(), 1);
        assert_eq!(c.lock_outbox().peer_gone.len(), 0);
        // B leaves: it had received from A; nobody received from B.
        r.unregister(&b, &HashSet::from([a.key]));
        assert_eq!(c.lock_outbox().peer_gone.len(), 0);
    }
}
