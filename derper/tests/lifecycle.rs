//! Shutdown and limits: SIGTERM-style shutdown tells every client `Restarting` and closes it
//! quickly; accept-rate and connection caps close excess connections and keep serving; the
//! per-client receive limit slows a sender without dropping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use derp_client::ServerToClient;
use derper::config::Config;
use derper::limits::RateConfig;

#[tokio::test]
async fn shutdown_sends_restarting_then_closes_everyone_fast() {
    let s = plain().await;
    let u = url(&s);
    let mut peers = Vec::new();
    for _ in 0..20 {
        peers.push(connect(&u).await);
    }
    let t0 = Instant::now();
    let report = s.shutdown().await;
    assert_eq!(report.clients_told, 20);
    assert_eq!(report.clients_cut, 0, "everyone left after the frame");
    assert!(report.elapsed < Duration::from_secs(2), "{report:?}");
    for p in &mut peers {
        match p.next().await {
            ServerToClient::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                assert_eq!(reconnect_in_ms, 0);
                assert!(try_for_ms > 0);
            }
            other => panic!("expected Restarting, got {other:?}"),
        }
        let end = tokio::time::timeout(T, p.rx.recv())
            .await
            .expect("closed promptly");
        assert!(end.is_err(), "then the connection closes");
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut sock) = tokio::net::TcpStream::connect(addr).await else {
        return "connection refused".into();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = sock.read_to_string(&mut out).await;
    out
}

/// SIGTERM's first step: /readyz answers 503 (so probes and load balancers stop sending new
/// clients) while the drain is still under way and /metrics and /healthz are still served.
#[tokio::test]
async fn readyz_turns_false_during_the_shutdown_drain() {
    let s = plain().await;
    let m = s.metrics_addr.unwrap();
    assert!(http_get(m, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(
        http_get(m, "/metrics")
            .await
            .contains("derper_accepts_total")
    );

    // A client that never reads, with its socket filled by a flood: its Restarting frame cannot
    // be flushed, so the drain lasts until the write deadline cuts it off.
    let (stalled, sender) = pair(&url(&s)).await;
    let packet = vec![7u8; 60_000];
    for _ in 0..300 {
        sender.tx.send_packet(&stalled.key, &packet).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let shutting = tokio::spawn(s.shutdown());
    let t0 = Instant::now();
    let mut seen_503 = false;
    while t0.elapsed() < Duration::from_secs(3) && !shutting.is_finished() {
        let ready = http_get(m, "/readyz").await;
        if ready.starts_with("HTTP/1.1 503") {
            seen_503 = true;
            assert!(http_get(m, "/healthz").await.starts_with("HTTP/1.1 200"));
            assert!(
                http_get(m, "/metrics")
                    .await
                    .contains("derper_accepts_total")
            );
            break;
        }
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_503, "/readyz never said 503 while the server drained");
    let report = shutting.await.unwrap();
    assert_eq!(report.clients_told, 2);
    drop((stalled, sender));
}

#[tokio::test]
async fn accept_rate_and_connection_cap_close_excess_and_keep_serving() {
    let mut cfg = Config::for_tests();
    cfg.max_connections = 3;
    let s = server(cfg).await;
    let u = url(&s);
    let _a = connect(&u).await;
    let _b = connect(&u).await;
    let _c = connect(&u).await;
    let r = derp_client::Client::connect(&derp_client::ClientConfig::new(
        u.clone(),
        derp_proto::NodePrivate::generate(),
    ))
    .await;
    assert!(r.is_err(), "fourth connection refused");
    drop(_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _d = connect(&u).await;
    s.shutdown().await;

    let mut cfg = Config::for_tests();
    cfg.accept_rate = Some(1.0);
    cfg.accept_burst = 2;
    let s = server(cfg).await;
    let u = url(&s);
    let mut ok = 0;
    for _ in 0..10 {
        let cfg = derp_client::ClientConfig::new(u.clone(), derp_proto::NodePrivate::generate());
        if derp_client::Client::connect(&cfg).await.is_ok() {
            ok += 1;
        }
    }
    assert!(
        (2..=3).contains(&ok),
        "burst of 2 (+1 refill) admitted, got {ok}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _again = connect(&u).await;
    s.shutdown().await;
}

#[tokio::test]
async fn receive_rate_limit_slows_but_does_not_drop() {
    let s = plain().await;
    s.derp.receive_limit.set(RateConfig {
        bytes_per_sec: 200_000,
        burst_bytes: 0,
    });
    let u = url(&s);
    let a = connect(&u).await;
    let mut b = connect(&u).await;
    let pkt = vec![1u8; 10_000];
    let t0 = Instant::now();
    let n = 40;
    let sender = {
        let tx = a.tx.clone();
        let dst = b.key;
        let pkt = pkt.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                tx.send_packet(&dst, &pkt).await.unwrap();
            }
        })
    };
    for _ in 0..n {
        assert_eq!(b.packet().await.1.len(), 10_000);
    }
    sender.await.unwrap();
    // 400 KB at 200 KB/s after a 65 KB burst: about 1.7 s.
    let took = t0.elapsed();
    assert!(
        took > Duration::from_millis(1200),
        "limit not applied: {took:?}"
    );
    s.shutdown().await;
}

/// Plain HTTP on the public port is counted by endpoint, from a fixed set of labels.
#[tokio::test]
async fn http_requests_are_counted_by_endpoint() {
    let s = plain().await;
    let m = s.metrics_addr.unwrap();
    assert!(
        http_get(s.derp_addr, "/generate_204")
            .await
            .starts_with("HTTP/1.1 204")
    );
    for path in ["/no-such-page", "/another/random/path"] {
        assert!(http_get(s.derp_addr, path).await.starts_with("HTTP/1.1 "));
    }
    let metrics = http_get(m, "/metrics").await;
    assert!(
        metrics.contains(r#"derper_http_requests_total{endpoint="generate_204"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"derper_http_requests_total{endpoint="other"} 2"#),
        "{metrics}"
    );
    s.shutdown().await;
}

/// -bootstrap-dns-names: the refresh task (a lookup, then ten minutes of sleep) must not hold
/// shutdown. Before the fix it took no cancellation and shutdown waited for it forever. An idle
/// plain-HTTP keep-alive connection must not hold it either.
#[tokio::test]
async fn shutdown_with_bootstrap_dns_and_idle_http_is_prompt() {
    let mut cfg = Config::for_tests();
    cfg.bootstrap_dns_names = vec!["localhost".into(), "nonexistent.invalid".into()];
    cfg.shutdown_timeout = Duration::from_secs(2);
    let s = server(cfg).await;
    // The first refresh has run once /bootstrap-dns answers with the names.
    let addr = s.derp_addr;
    let mut body = String::new();
    for _ in 0..100 {
        body = http_get(addr, "/bootstrap-dns").await;
        if body.contains("localhost") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.contains("\"localhost\""), "{body}");
    // A keep-alive HTTP connection left open.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        idle.write_all(b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(10), s.shutdown())
        .await
        .expect("shutdown returns with -bootstrap-dns-names set");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "shutdown took {:?} (timeout 2 s + 1 s grace)",
        t0.elapsed()
    );
    assert_eq!(report.clients_cut, 0);
}
