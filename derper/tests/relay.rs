//! The server on 127.0.0.1:0 with our Rust client: relay, queue overflow, duplicate keys,
//! PeerGone, keepalives, pings, and that connections leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use derp_client::{PeerGoneReason, ServerToClient};
use derp_proto::NodePrivate;
use derper::config::Config;
use derper::metrics::DropLabels;

#[tokio::test]
async fn relays_between_two_clients_and_not_to_bystanders() {
    let s = plain().await;
    let u = url(&s);
    let mut a = connect(&u).await;
    let mut b = connect(&u).await;
    let mut c = connect(&u).await;
    a.tx.send_packet(&b.key, b"hello").await.unwrap();
    assert_eq!(b.packet().await, (a.key, b"hello".to_vec()));
    b.tx.send_packet(&a.key, b"").await.unwrap();
    assert_eq!(a.packet().await, (b.key, Vec::new()));
    let big = vec![7u8; 65_536];
    a.tx.send_packet(&b.key, &big).await.unwrap();
    assert_eq!(b.packet().await.1, big);
    // To oneself.
    a.tx.send_packet(&a.key, b"me").await.unwrap();
    assert_eq!(a.packet().await, (a.key, b"me".to_vec()));
    c.quiet_for(Duration::from_millis(200)).await;
    s.shutdown().await;
}

/// Small and large packets mixed in one batch travel intact and in order: large ones are
/// written from where they are (gathered) on both the client and the server, small ones are
/// copied next to their heads, so every boundary between the two kinds is exercised.
#[tokio::test]
async fn mixed_sizes_in_one_batch_arrive_intact_and_in_order() {
    let s = plain().await;
    let (a, mut b) = pair(&url(&s)).await;
    let mixed = [
        0, 100, 2047, 2048, 5000, 16_384, 16_385, 65_536, 1, 3000, 2049, 65_535,
    ];
    let large = [2048, 65_536, 16_421, 4096, 65_536, 2048];
    for (round, sizes) in [&mixed[..], &large[..], &mixed[..]].iter().enumerate() {
        let packets: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (round * 97 + i * 31 + j) as u8).collect())
            .collect();
        a.tx.send_packets(&b.key, packets.iter().map(|p| &p[..]))
            .await
            .unwrap();
        for want in &packets {
            let (src, got) = b.packet().await;
            assert_eq!(src, a.key);
            assert!(
                got == *want,
                "packet of {} bytes changed in transit",
                want.len()
            );
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_packets_arrive_in_order() {
    let s = plain().await;
    let u = url(&s);
    let a = connect(&u).await;
    let mut b = connect(&u).await;
    let n = 10_000u32;
    let sender = {
        let tx = a.tx.clone();
        let dst = b.key;
        tokio::spawn(async move {
            for i in 0..n {
                tx.send_packet(&dst, &i.to_be_bytes()).await.unwrap();
                if i % 16 == 0 {
                    // Keep at most a few dozen in flight: the server's queue is 32 deep.
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut want = 0u32;
    let mut drops_seen = 0u64;
    while want < n {
        let (_, p) = b.packet().await;
        let got = u32::from_be_bytes(p.try_into().unwrap());
        assert!(got >= want, "packet {got} arrived after {want}: reordered");
        drops_seen += u64::from(got - want);
        want = got + 1;
    }
    sender.await.unwrap();
    let dropped: u64 = ["queue_head"]
        .iter()
        .map(|r| {
            s.derp
                .metrics
                .packets_dropped
                .get_or_create(&DropLabels {
                    reason: r,
                    kind: "other",
                })
                .get()
        })
        .sum();
    assert_eq!(drops_seen, dropped, "every gap is a counted drop");
    s.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_and_never_blocks_the_sender() {
    let s = plain().await;
    let u = url(&s);
    let a = connect(&u).await;
    let mut b = connect(&u).await;
    let mut c = connect(&u).await;
    // B does not read while A sends 200 packets; the sender must not stall.
    let t0 = tokio::time::Instant::now();
    for i in 0..200u32 {
        a.tx.send_packet(&b.key, &i.to_be_bytes()).await.unwrap();
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "sender was blocked");
    // A still reaches C at once.
    a.tx.send_packet(&c.key, b"still here").await.unwrap();
    assert_eq!(c.packet().await.1, b"still here");
    // B gets a tail of the newest packets; the last one is among them.
    let mut last = None;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), b.rx.recv()).await {
            Ok(Ok(ServerToClient::RecvPacket { packet, .. })) => {
                last = Some(u32::from_be_bytes(packet[..].try_into().unwrap()))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
    }
    assert_eq!(last, Some(199), "the newest packet is delivered");
    s.shutdown().await;
}

#[tokio::test]
async fn peer_gone_goes_to_former_receivers_only() {
    let s = plain().await;
    let u = url(&s);
    let a = connect(&u).await;
    let mut b = connect(&u).await;
    let mut c = connect(&u).await;
    a.tx.send_packet(&b.key, b"x").await.unwrap();
    assert_eq!(b.packet().await.0, a.key);
    let a_key = a.key;
    a.tx.close().await.unwrap();
    drop(a);
    assert_eq!(
        b.next().await,
        ServerToClient::PeerGone {
            key: a_key,
            reason: PeerGoneReason::Disconnected
        }
    );
    c.quiet_for(Duration::from_millis(200)).await;
    s.shutdown().await;
}

#[tokio::test]
async fn disco_to_unknown_key_gets_not_here_rate_limited() {
    let s = plain().await;
    let mut a = connect(&url(&s)).await;
    let nobody = NodePrivate::generate().public();
    let mut disco = vec![0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
    disco.resize(80, 1);
    for _ in 0..6 {
        a.tx.send_packet(&nobody, &disco).await.unwrap();
    }
    a.tx.send_packet(&nobody, b"not disco").await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            a.next().await,
            ServerToClient::PeerGone {
                key: nobody,
                reason: PeerGoneReason::NotHere
            }
        );
    }
    a.quiet_for(Duration::from_millis(300)).await;
    s.shutdown().await;
}

#[tokio::test]
async fn duplicate_keys_last_writer_is_active() {
    let s = plain().await;
    let u = url(&s);
    let key = NodePrivate::generate();
    let mut c1 = connect_as(&u, key.clone()).await;
    let mut c2 = connect_as(&u, key.clone()).await;
    let sender = connect(&u).await;
    sender.tx.send_packet(&c1.key, b"to newest").await.unwrap();
    assert_eq!(c2.packet().await.1, b"to newest");
    // C1 speaks: it becomes active.
    c1.tx.send_ping([1; 8]).await.unwrap();
    assert_eq!(c1.next().await, ServerToClient::Pong([1; 8]));
    sender.tx.send_packet(&c1.key, b"to c1").await.unwrap();
    assert_eq!(c1.packet().await.1, b"to c1");
    // Closing the active one falls back to the other, with no PeerGone to the sender.
    c1.tx.close().await.unwrap();
    drop(c1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    sender.tx.send_packet(&c2.key, b"back to c2").await.unwrap();
    assert_eq!(c2.packet().await.1, b"back to c2");
    s.shutdown().await;
}

#[tokio::test]
async fn ping_pong_and_keepalives() {
    let mut cfg = Config::for_tests();
    cfg.derp.keepalive_interval = Duration::from_millis(200);
    let s = server(cfg).await;
    let mut a = connect(&url(&s)).await;
    a.tx.send_ping(*b"12345678").await.unwrap();
    assert_eq!(a.next().await, ServerToClient::Pong(*b"12345678"));
    // With a 200 ms interval (+ up to 5 s jitter) two KeepAlives arrive within 12 s.
    let mut keepalives = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(12);
    while keepalives < 2 {
        match tokio::time::timeout_at(until, a.rx.recv()).await {
            Ok(Ok(ServerToClient::KeepAlive)) => keepalives += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => panic!("only {keepalives} keepalives"),
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn many_connections_leave_nothing_behind() {
    let s = plain().await;
    let u = url(&s);
    let fds_before = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    for round in 0..10 {
        let mut peers = Vec::new();
        for _ in 0..50 {
            peers.push(connect(&u).await);
        }
        // Half of the handshakes fail: garbage instead of ClientInfo.
        for _ in 0..50 {
            let mut sock = tokio::net::TcpStream::connect(s.derp_addr).await.unwrap();
            use tokio::io::AsyncWriteExt;
            let _ = sock
                .write_all(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n\x02\x00\x00\x00\x05hello")
                .await;
        }
        let a = &peers[0];
        a.tx.send_packet(&peers[1].key, &[round]).await.unwrap();
        for p in peers.drain(..) {
            p.tx.close().await.unwrap();
        }
    }
    let reg = &s.derp.registry;
    eventually("all clients gone", T, || reg.client_count() == 0).await;
    eventually("connections gauge back to 0", T, || {
        s.derp.metrics.connections.get() == 0
    })
    .await;
    let failures: u64 = [
        "not_client_info",
        "client_info_size",
        "io",
        "client_info_box",
    ]
    .iter()
    .map(|r| {
        s.derp
            .metrics
            .handshake_failures
            .get_or_create(&derper::metrics::ReasonLabel { reason: r })
            .get()
    })
    .sum();
    assert!(failures >= 400, "failed handshakes counted: {failures}");
    let fds_after = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        fds_after <= fds_before + 20,
        "file descriptors leaked: {fds_before} before, {fds_after} after"
    );
    s.shutdown().await;
}
