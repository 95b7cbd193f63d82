//! Per-connection buffers: a busy connection keeps its read and write buffers, an idle one
//! gives them back after a keepalive period of silence, and `derper_connection_buffer_bytes`
//! shows both (the gauge an operator watches to see what idle clients cost).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use derper::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Short keepalive period so idleness is reached in well under a second.
const PERIOD: Duration = Duration::from_millis(300);

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    out
}

/// The gauge's value as served on /metrics.
async fn scraped_gauge(addr: std::net::SocketAddr) -> i64 {
    let text = scrape(addr).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("derper_connection_buffer_bytes "))
        .expect("derper_connection_buffer_bytes on /metrics");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn busy_connections_hold_buffers_and_idle_ones_release_them() {
    let mut cfg = Config::for_tests();
    cfg.derp.keepalive_interval = PERIOD;
    let s = server(cfg).await;
    let m = s.metrics_addr.unwrap();
    let u = url(&s);
    let gauge = || s.derp.metrics.connection_buffer_bytes.get();
    let (a, mut b) = pair(&u).await;
    // Right after the handshake nothing is held: a quiet client costs no buffers.
    assert_eq!(gauge(), 0);

    // Busy for several keepalive periods: the buffers stay.
    let packet = vec![5u8; 4096];
    let until = Instant::now() + PERIOD * 4;
    while Instant::now() < until {
        a.tx.send_packet(&b.key, &packet).await.unwrap();
        assert_eq!(b.packet().await.1, packet);
        assert!(gauge() > 0, "a busy connection holds its buffers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(scraped_gauge(m).await > 0);
    // Unlabelled metrics that once were never registered are served too (labelled families
    // appear with their first label value).
    let text = scrape(m).await;
    assert!(text.contains("\nderper_restarting_sent_total 0\n"));
    assert!(text.contains("\nderper_mesh_links 0\n"));

    // Silence: released within a couple of periods, to exactly nothing.
    eventually("buffers released", T, || gauge() == 0).await;
    assert_eq!(scraped_gauge(m).await, 0);

    // Traffic again: buffers come back and packets still relay intact.
    a.tx.send_packet(&b.key, &packet).await.unwrap();
    assert_eq!(b.packet().await.1, packet);
    assert!(gauge() > 0);

    // A closed connection gives back what it held.
    drop(a);
    drop(b);
    eventually("connections gone", T, || {
        s.derp.metrics.connections.get() == 0
    })
    .await;
    assert_eq!(gauge(), 0);
    s.shutdown().await;
}
