//! TLS: self-signed IP certificate pinned by the map, Go's SNI rule for DNS host names, and
//! certificate files renewed in place reaching new connections while old ones stay up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;

use common::*;
use derp_client::{ClientConfig, TlsTrust};
use derp_proto::NodePrivate;
use derper::certs;
use derper::config::{Config, TlsMode};

fn tls_config(dir: &std::path::Path, hostname: &str) -> Config {
    let mut cfg = Config::for_tests();
    cfg.tls = TlsMode::Manual {
        certdir: dir.to_path_buf(),
    };
    cfg.hostname = hostname.into();
    cfg
}

fn pinned(s: &derper::server::ServerHandle, pin: &str) -> ClientConfig {
    let mut c = ClientConfig::new(
        format!("https://{}/derp", s.derp_addr),
        NodePrivate::generate(),
    );
    c.tls = TlsTrust::from_sha256_raw(pin).unwrap();
    c
}

fn map_pin(s: &derper::server::ServerHandle) -> String {
    s.derp_map.regions.values().next().unwrap().nodes[0]
        .cert_name
        .clone()
}

#[tokio::test]
async fn renewed_certificate_reaches_new_connections_and_keeps_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(tls_config(dir.path(), "127.0.0.1")).await;
    let old_pin = map_pin(&s);
    assert!(old_pin.starts_with("sha256-raw:"));
    let mut a = connect_with(pinned(&s, &old_pin)).await;
    assert!(a.tx.conn_info().fast_start, "TLS 1.3 metacert fast start");
    let b = connect_with(pinned(&s, &old_pin)).await;

    // cert-manager style renewal: new files written in place.
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let (crt, key) = certs::self_signed_for_ip(ip).unwrap();
    std::fs::write(dir.path().join("127.0.0.1.key"), key).unwrap();
    std::fs::write(dir.path().join("127.0.0.1.crt"), &crt).unwrap();
    assert!(s.reload_certs_now(), "the new certificate is installed");
    assert!(
        !s.reload_certs_now(),
        "unchanged files are not reloaded again"
    );
    let leaf = rustls_pki_types::pem::PemObject::from_pem_slice(crt.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'static>| certs::pin_of(&c));
    let new_pin = leaf.unwrap();
    assert_ne!(new_pin, old_pin);

    // Old connections keep relaying.
    b.tx.send_packet(&a.key, b"still connected").await.unwrap();
    assert_eq!(a.packet().await.1, b"still connected");
    // New connections see the new certificate only.
    let err = derp_client::Client::connect(&pinned(&s, &old_pin)).await;
    assert!(err.is_err(), "the old pin no longer matches");
    let _c = connect_with(pinned(&s, &new_pin)).await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_broken_renewal_keeps_the_current_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(tls_config(dir.path(), "127.0.0.1")).await;
    let pin = map_pin(&s);
    std::fs::write(dir.path().join("127.0.0.1.crt"), "half written").unwrap();
    assert!(!s.reload_certs_now());
    let _a = connect_with(pinned(&s, &pin)).await;
    s.shutdown().await;
}

#[tokio::test]
async fn dns_hostname_needs_matching_sni_and_reads_the_secret_layout() {
    let dir = tempfile::tempdir().unwrap();
    // A Kubernetes TLS Secret mounted as tls.crt/tls.key, for a DNS name.
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    let s = server(tls_config(dir.path(), "localhost")).await;
    let pin = certs::pin_of(cert.der());
    // SNI "localhost": accepted.
    let mut ok = ClientConfig::new(
        format!("https://localhost:{}/derp", s.derp_addr.port()),
        NodePrivate::generate(),
    );
    ok.tls = TlsTrust::from_sha256_raw(&pin).unwrap();
    let _a = connect_with(ok).await;
    // No SNI (an IP URL): Go's manual mode refuses the handshake for a DNS host name.
    let err = derp_client::Client::connect(&pinned(&s, &pin)).await;
    assert!(
        err.is_err(),
        "a handshake without the host name's SNI must fail"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn missing_certificate_for_a_dns_name_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = derper::server::start(
        tls_config(dir.path(), "derp.example.com"),
        Default::default(),
    )
    .await;
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("no certificate for \"derp.example.com\""),
        "{msg}"
    );
    assert!(msg.contains("derp.example.com.crt"), "{msg}");
    assert!(msg.contains("tls.crt"), "{msg}");
}

#[tokio::test]
async fn websocket_transport_relays() {
    let s = plain().await;
    let mut cfg = ClientConfig::new(url(&s), NodePrivate::generate());
    cfg.transport = derp_client::Transport::WebSocket;
    let mut a = connect_with(cfg).await;
    let b = connect(&url(&s)).await;
    let big = vec![3u8; 60_000];
    b.tx.send_packet(&a.key, &big).await.unwrap();
    assert_eq!(a.packet().await.1, big);
    // And the other way: what the WebSocket client sends reaches a TCP client.
    let mut b = b;
    a.tx.send_packet(&b.key, b"ws").await.unwrap();
    assert_eq!(b.packet().await, (a.key, b"ws".to_vec()));
    s.shutdown().await;
}
