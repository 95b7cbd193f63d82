//! `--reuse-port`: a successor derper binds the same port beside a running one, and the old
//! one's shutdown hands its clients over: it closes its listener (taking the accept queue
//! first), then tells every client `Restarting`, and their reconnect to the same address lands
//! on the successor. New connections made during the handover all succeed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use derp_client::ServerToClient;
use derper::config::Config;
use derper::server::ServerError;

fn reuse_cfg(port: u16) -> Config {
    let mut cfg = Config::for_tests();
    cfg.listen_port = port;
    cfg.reuse_port = true;
    cfg.handoff_wait = Duration::from_secs(2);
    cfg
}

/// Waits for Restarting, then the close. Peers told before this one may leave first, so news of
/// them (PeerGone, and keepalives) can come ahead of this client's own Restarting.
async fn restarting_then_closed(p: &mut Peer) {
    let mut skipped = Vec::new();
    loop {
        match p.next().await {
            ServerToClient::Restarting { .. } => break,
            other @ (ServerToClient::PeerGone { .. } | ServerToClient::KeepAlive)
                if skipped.len() < 8 =>
            {
                skipped.push(other)
            }
            other => panic!("expected Restarting, got {other:?} after {skipped:?}"),
        }
    }
    let end = tokio::time::timeout(T, p.rx.recv())
        .await
        .expect("closed promptly after Restarting");
    assert!(end.is_err(), "the connection closes after Restarting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_move_to_the_successor_on_the_same_port() {
    let port = free_port();
    let old = server(reuse_cfg(port)).await;
    let u = format!("http://127.0.0.1:{port}/derp");
    let mut a = connect(&u).await;
    let mut b = connect(&u).await;
    assert_eq!(a.tx.server_key(), old.public_key);
    assert_eq!(b.tx.server_key(), old.public_key);

    let new = server(reuse_cfg(port)).await;
    assert_eq!(new.derp_addr, old.derp_addr, "both listen on one address");

    // New connections all through the handover: each must complete a DERP handshake, with
    // whichever server the kernel picked.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut storm = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, u) = (stop.clone(), ok.clone(), failed.clone(), u.clone());
        storm.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let cfg = derp_client::ClientConfig::new(&u, derp_proto::NodePrivate::generate());
                match tokio::time::timeout(T, derp_client::Client::connect(&cfg)).await {
                    Ok(Ok(_)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(e.to_string());
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push("timed out".into());
                    }
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = ok.load(Ordering::Relaxed);
    let report = old.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for t in storm {
        errors.extend(t.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "handover: {ok} connects succeeded ({before} before the shutdown began), {failed} failed; \
         shutdown {report:?}"
    );
    assert_eq!(report.successor, Some(true), "{report:?}");
    assert_eq!(report.clients_cut, 0, "{report:?}");
    assert!(
        ok > before,
        "connections made during and after the handover"
    );
    assert_eq!(
        failed, 0,
        "no connection failed in the handover: {errors:?}"
    );

    restarting_then_closed(&mut a).await;
    restarting_then_closed(&mut b).await;
    // Same address, and the successor answers.
    let mut a = connect(&u).await;
    let b = connect(&u).await;
    assert_eq!(a.tx.server_key(), new.public_key);
    assert_eq!(b.tx.server_key(), new.public_key);
    b.tx.send_packet(&a.key, b"after the handover")
        .await
        .unwrap();
    assert_eq!(a.packet().await, (b.key, b"after the handover".to_vec()));
    new.shutdown().await;
}

/// Without a successor the old derper keeps serving for the handoff wait, then drains as
/// before (its clients must go to the region's other nodes).
#[tokio::test]
async fn without_a_successor_it_serves_through_the_wait_then_drains() {
    let port = free_port();
    let mut cfg = reuse_cfg(port);
    cfg.handoff_wait = Duration::from_millis(600);
    let old = server(cfg).await;
    let u = format!("http://127.0.0.1:{port}/derp");
    let mut a = connect(&u).await;
    let b = connect(&u).await;
    let shutdown = tokio::spawn(old.shutdown());
    // Still relaying while it waits for a successor.
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.tx.send_packet(&a.key, b"during the wait").await.unwrap();
    assert_eq!(a.packet().await, (b.key, b"during the wait".to_vec()));
    let report = shutdown.await.unwrap();
    assert_eq!(report.successor, Some(false), "{report:?}");
    assert_eq!(report.clients_told, 2, "{report:?}");
    restarting_then_closed(&mut a).await;
}

/// The default stays Go's: a second derper cannot take a port in use.
#[tokio::test]
async fn without_reuse_port_a_second_bind_fails() {
    let port = free_port();
    let mut cfg = Config::for_tests();
    cfg.listen_port = port;
    let first = server(cfg.clone()).await;
    match derper::server::start(cfg, tokio_util::sync::CancellationToken::new()).await {
        Err(ServerError::Bind { what: "DERP", .. }) => {}
        Err(e) => panic!("expected a DERP bind error, got {e}"),
        Ok(_) => panic!("a second derper bound the same port without --reuse-port"),
    }
    let report = first.shutdown().await;
    assert_eq!(report.successor, None);
}
