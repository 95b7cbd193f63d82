#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Live check against Tailscale's own Go derper (the reference server): two of our clients relay
//! packets of every size through it in order, over fast start (TLS 1.3 + metacert), the classic
//! 101 path and WebSocket, with the `sha256-raw:` pin it logs. Ignored by default; run with
//!
//! ```text
//! DERP_TEST_GO_DERPER_URL=https://127.0.0.1:18443/derp \
//! DERP_TEST_GO_CERTNAME=sha256-raw:<hex from the derper log> \
//!   cargo test -p derp-client --test go_derper -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use derp_client::{Client, ClientConfig, ServerToClient, TlsTrust, Transport};
use derp_proto::NodePrivate;

fn env() -> Option<(String, String)> {
    Some((
        std::env::var("DERP_TEST_GO_DERPER_URL").ok()?,
        std::env::var("DERP_TEST_GO_CERTNAME").ok()?,
    ))
}

fn config(url: &str, cert_name: &str, transport: Transport, fast_start: bool) -> ClientConfig {
    let mut c = ClientConfig::new(url, NodePrivate::generate());
    c.tls = TlsTrust::from_sha256_raw(cert_name).unwrap();
    c.transport = transport;
    c.fast_start = fast_start;
    c
}

/// Sends `n` packets of cycling sizes (up to 64 KiB) from a to b; b checks order and content.
async fn relay(a: Client, b: Client, n: usize) -> Duration {
    let (ha, _ra) = a.split();
    let (hb, mut rb) = b.split();
    let dst = hb.public_key();
    let src = ha.public_key();
    let sizes = [1usize, 60, 1280, 1400, 9000, 65536];
    let start = Instant::now();
    // How many packets b has received, so the sender keeps a bounded window in flight.
    let (got_tx, mut got) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        for i in 0..n {
            let want = sizes[i % sizes.len()];
            loop {
                match rb.recv().await.unwrap() {
                    ServerToClient::RecvPacket { src: s, packet } => {
                        assert_eq!(s, src);
                        assert_eq!(packet.len(), want, "packet {i}");
                        let k = want.min(4);
                        assert_eq!(&packet[..k], &(i as u32).to_be_bytes()[..k]);
                        break;
                    }
                    _ => continue,
                }
            }
            got_tx.send_replace(i + 1);
        }
    });
    // Go's per-client queue is 32 deep and drops the oldest when full: never have more than
    // 16 packets between the sender and b's reader, whatever the machine's load (pacing by time
    // lost packets on a busy machine).
    const WINDOW: usize = 16;
    let mut buf = vec![0u8; 65536];
    for i in 0..n {
        if i >= WINDOW {
            tokio::time::timeout(
                Duration::from_secs(10),
                got.wait_for(|&received| received > i - WINDOW),
            )
            .await
            .unwrap_or_else(|_| panic!("packet {} not relayed within 10 s", i - WINDOW))
            .unwrap();
        }
        let size = sizes[i % sizes.len()];
        let id = (i as u32).to_be_bytes();
        buf[..4.min(size)].copy_from_slice(&id[..4.min(size)]);
        ha.send_packet(&dst, &buf[..size]).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("all packets relayed")
        .unwrap();
    start.elapsed()
}

#[tokio::test]
#[ignore = "needs a running Go derper; tests/interop/run starts one and runs this"]
async fn relays_through_go_derper() {
    // Only run when asked (tests/interop/run starts Tailscale's derper and asks); asked
    // without a server is a failure, not a quiet pass.
    let (url, cert_name) = env().expect(
        "DERP_TEST_GO_DERPER_URL and DERP_TEST_GO_CERTNAME must name a running Go derper \
         (tests/interop/run sets them)",
    );
    for (transport, fast_start, label) in [
        (Transport::Derp, true, "fast start"),
        (Transport::Derp, false, "classic 101"),
        (Transport::WebSocket, false, "websocket"),
    ] {
        let a = Client::connect(&config(&url, &cert_name, transport, fast_start))
            .await
            .unwrap();
        let b = Client::connect(&config(&url, &cert_name, transport, fast_start))
            .await
            .unwrap();
        assert_eq!(a.server_key(), b.server_key());
        assert_eq!(a.server_info().version, 2);
        assert_eq!(a.conn_info().fast_start, fast_start, "{label}");
        if transport == Transport::Derp {
            assert_eq!(a.conn_info().metacert.map(|m| m.1), Some(2));
        }
        // Ping round trip through Go's server.
        let (h, mut r) = b.split();
        let pinger = tokio::spawn(async move {
            let _ = r.recv().await;
            r
        });
        let rtt = h.ping(Duration::from_secs(5)).await.unwrap();
        h.close().await.unwrap();
        let _ = pinger.await;
        let b = Client::connect(&config(&url, &cert_name, transport, fast_start))
            .await
            .unwrap();
        let n = 3000;
        let took = relay(a, b, n).await;
        eprintln!("{label}: ping rtt {rtt:?}; {n} packets relayed in order in {took:?}");
    }
}
