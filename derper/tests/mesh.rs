//! Two and three of our servers meshed on 127.0.0.1: clients on different servers reach each
//! other both ways, PeerGone crosses the mesh, a restarted peer heals, and a peer added to the
//! mesh file starts forwarding without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use derp_client::{PeerGoneReason, ServerToClient};
use derp_proto::MeshKey;
use derper::config::Config;
use derper::mesh::{MeshConfig, parse_peer};
use derper::server::ServerHandle;

fn key() -> MeshKey {
    MeshKey::from_bytes([0x42; 32])
}

fn meshed(port: u16, peers: &[u16], file: Option<std::path::PathBuf>) -> Config {
    let mut cfg = Config::for_tests();
    cfg.listen_port = port;
    cfg.mesh = Some(MeshConfig {
        key: key(),
        peers: peers
            .iter()
            .map(|p| parse_peer(&format!("http://127.0.0.1:{p}")).unwrap())
            .collect(),
        peers_file: file,
        ca_file: None,
    });
    cfg
}

async fn wait_links(s: &ServerHandle, n: i64) {
    let m = s.derp.metrics.clone();
    eventually("mesh links up", Duration::from_secs(10), || {
        m.mesh_links.get() == n
    })
    .await;
}

/// Waits until `key` is reachable from `s` (locally or through a forwarder).
async fn wait_route(s: &ServerHandle, key: &derp_proto::NodePublic) {
    let reg = &s.derp.registry;
    eventually("route to key", Duration::from_secs(10), || {
        !matches!(reg.route(key), derper::registry::Route::Unknown)
    })
    .await;
}

#[tokio::test]
async fn two_servers_relay_both_ways_and_peer_gone_crosses() {
    let (p1, p2) = (free_port(), free_port());
    let s1 = server(meshed(p1, &[p2, p1], None)).await;
    let s2 = server(meshed(p2, &[p1], None)).await;
    wait_links(&s1, 1).await;
    wait_links(&s2, 1).await;
    let a = connect(&url(&s1)).await;
    let mut b = connect(&url(&s2)).await;
    wait_route(&s1, &b.key).await;
    wait_route(&s2, &a.key).await;
    a.tx.send_packet(&b.key, b"over the mesh").await.unwrap();
    assert_eq!(b.packet().await, (a.key, b"over the mesh".to_vec()));
    let mut a = a;
    b.tx.send_packet(&a.key, b"and back").await.unwrap();
    assert_eq!(a.packet().await, (b.key, b"and back".to_vec()));
    // B leaves server 2: A, which received from B, learns it is gone from the region.
    let b_key = b.key;
    b.tx.close().await.unwrap();
    drop(b);
    assert_eq!(
        a.next().await,
        ServerToClient::PeerGone {
            key: b_key,
            reason: PeerGoneReason::Disconnected
        }
    );
    let m1 = s1.derp.metrics.clone();
    s1.shutdown().await;
    // The mesh owns its peers' tasks: shutdown returns after they ended, links down.
    assert_eq!(m1.mesh_links.get(), 0);
    s2.shutdown().await;
}

#[tokio::test]
async fn mesh_heals_after_a_peer_restarts() {
    let (p1, p2) = (free_port(), free_port());
    let s1 = server(meshed(p1, &[p2], None)).await;
    let s2 = server(meshed(p2, &[p1], None)).await;
    wait_links(&s1, 1).await;
    s2.shutdown().await;
    let m = s1.derp.metrics.clone();
    eventually("link down", Duration::from_secs(10), || {
        m.mesh_links.get() == 0
    })
    .await;
    let s2 = server(meshed(p2, &[p1], None)).await;
    wait_links(&s1, 1).await;
    let a = connect(&url(&s1)).await;
    let mut b = connect(&url(&s2)).await;
    wait_route(&s1, &b.key).await;
    a.tx.send_packet(&b.key, b"healed").await.unwrap();
    assert_eq!(b.packet().await.1, b"healed");
    s1.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test]
async fn peers_file_adds_and_drops_peers_live() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers");
    std::fs::write(&file, "# nobody yet\n").unwrap();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let s1 = server(meshed(p1, &[], Some(file.clone()))).await;
    let s2 = server(meshed(p2, &[p1], None)).await;
    let s3 = server(meshed(p3, &[p1], None)).await;
    wait_links(&s2, 1).await;
    assert_eq!(s1.derp.metrics.mesh_links.get(), 0);
    // Add s2 and s3 (and ourselves, which is skipped by name) without a restart.
    std::fs::write(
        &file,
        format!("http://127.0.0.1:{p1}\nhttp://127.0.0.1:{p2}\nhttp://127.0.0.1:{p3} # third\n"),
    )
    .unwrap();
    wait_links(&s1, 2).await;
    let a = connect(&url(&s1)).await;
    let mut c = connect(&url(&s3)).await;
    wait_route(&s1, &c.key).await;
    a.tx.send_packet(&c.key, b"via the file").await.unwrap();
    assert_eq!(c.packet().await.1, b"via the file");
    // A bad file is not applied; the current peers stay.
    std::fs::write(&file, "bad/\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s1.derp.metrics.mesh_links.get(), 2);
    // Dropping s3 from the file closes that link.
    std::fs::write(&file, format!("http://127.0.0.1:{p2}\n")).unwrap();
    wait_links(&s1, 1).await;
    for s in [s1, s2, s3] {
        s.shutdown().await;
    }
}

#[tokio::test]
async fn wrong_mesh_key_gets_no_mesh_privileges() {
    let p1 = free_port();
    let s1 = server(meshed(p1, &[], None)).await;
    let mut cfg = derp_client::ClientConfig::new(url(&s1), derp_proto::NodePrivate::generate());
    cfg.mesh_key = Some(MeshKey::from_bytes([0x43; 32]));
    let mut p = connect_with(cfg).await;
    p.tx.watch_conns().await.unwrap();
    // A non-mesh WatchConns closes the connection.
    let r = tokio::time::timeout(T, async {
        loop {
            if p.rx.recv().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection was closed");
    // The right key gets PeerPresent for everyone, itself included.
    let mut cfg = derp_client::ClientConfig::new(url(&s1), derp_proto::NodePrivate::generate());
    cfg.mesh_key = Some(key());
    cfg.watch_conns = true;
    let mut w = connect_with(cfg).await;
    match w.next().await {
        ServerToClient::PeerPresent { key, flags, addr } => {
            assert_eq!(key, w.key);
            assert_eq!(flags, derp_proto::frame::peer_flags::MESH);
            assert_eq!(
                addr.map(|a: SocketAddr| a.ip().to_string()),
                Some("127.0.0.1".into())
            );
        }
        other => panic!("{other:?}"),
    }
    s1.shutdown().await;
}
