#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]
//! The client against a tiny in-test DERP server that behaves like Go's (101 or fast start,
//! ServerKey, ClientInfo, ServerInfo, relay, Pong) or misbehaves on purpose, over plain TCP,
//! TLS 1.3 with a metacert, or TLS 1.2. Checks what the server saw (fast start, SNI, headers,
//! ClientInfo) as well as what the client returns.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use derp_client::{Client, ClientConfig, ClientError, ServerToClient, TlsTrust, tls};
use derp_proto::frame::{self, ClientToServer, Split};
use derp_proto::info::{self, ClientInfo, ServerInfo};
use derp_proto::upgrade::RequestHead;
use derp_proto::{NodePrivate, NodePublic};
use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SerialNumber};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq)]
enum Behavior {
    Normal,
    KeepAliveFirst,
    CloseAfterClientInfo,
    HugeFrameAfterInfo,
    Refuse426,
    Silent,
}

#[derive(Clone, Copy, PartialEq)]
enum Tls {
    None,
    V13,
    V12,
}

#[derive(Debug, Clone, Default)]
struct Seen {
    fast_start: bool,
    sni: Option<String>,
    ideal_node: Option<String>,
    client_info_json: String,
}

struct Mini {
    addr: SocketAddr,
    key: NodePublic,
    cert_name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mini {
    fn url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}/derp", self.addr)
    }
}

type Peers = Arc<Mutex<HashMap<NodePublic, mpsc::UnboundedSender<Vec<u8>>>>>;

async fn start(tls: Tls, behavior: Behavior) -> Mini {
    let server_key = NodePrivate::generate();
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let leaf = p.self_signed(&leaf_key).unwrap().der().clone();
    let meta_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let cn = format!("derpkey{}", server_key.public().untyped_hex());
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(SerialNumber::from_slice(&[2]));
    p.is_ca = IsCa::ExplicitNoCa;
    let meta = p.self_signed(&meta_key).unwrap().der().clone();
    let cert_name = tls::cert_name_for(&leaf);

    let acceptor = (tls != Tls::None).then(|| {
        let versions: &[&rustls::SupportedProtocolVersion] = match tls {
            Tls::V12 => &[&rustls::version::TLS12],
            _ => &[&rustls::version::TLS13],
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> = vec![leaf.clone(), meta.clone()];
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let peers: Peers = Arc::default();
    let server = Mini {
        addr,
        key: server_key.public(),
        cert_name,
        seen: seen.clone(),
    };
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, key, seen, peers) = (
                acceptor.clone(),
                server_key.clone(),
                seen.clone(),
                peers.clone(),
            );
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        let Ok(s) = a.accept(tcp).await else { return };
                        let sni = s.get_ref().1.server_name().map(str::to_owned);
                        serve(s, sni, key, behavior, seen, peers).await;
                    }
                    None => serve(tcp, None, key, behavior, seen, peers).await,
                }
            });
        }
    });
    server
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    loop {
        if let Ok(Split::Frame {
            frame_type,
            payload,
        }) = frame::split_frame(buf, |_| usize::MAX)
        {
            return Some((frame_type, payload));
        }
        if r.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    s: S,
    sni: Option<String>,
    key: NodePrivate,
    behavior: Behavior,
    seen: Arc<Mutex<Vec<Seen>>>,
    peers: Peers,
) {
    let (mut rd, mut wr) = tokio::io::split(s);
    let mut buf = BytesMut::new();
    let head = loop {
        if let Ok(Some(h)) = RequestHead::parse(&buf) {
            break h;
        }
        if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
    };
    buf.advance(head.head_len);
    if behavior == Behavior::Silent {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    if behavior == Behavior::Refuse426 {
        let body = "DERP requires connection upgrade\n";
        let resp = format!(
            "HTTP/1.1 426 Upgrade Required\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = wr.write_all(resp.as_bytes()).await;
        return;
    }
    let fast = head.fast_start.as_deref() == Some("1");
    let mut out = Vec::new();
    if !fast {
        out.extend_from_slice(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
                key.public().untyped_hex()
            )
            .as_bytes(),
        );
    }
    frame::encode_server_key(&mut out, &key.public());
    wr.write_all(&out).await.unwrap();
    let Some((2, ci)) = read_frame(&mut rd, &mut buf).await else {
        return;
    };
    let client = NodePublic::from_slice(&ci[..32]).unwrap();
    let plain = info::open(&key, &client, &ci[32..]).unwrap();
    ClientInfo::from_json(&plain).unwrap();
    seen.lock().unwrap().push(Seen {
        fast_start: fast,
        sni,
        ideal_node: head.ideal_node.clone(),
        client_info_json: String::from_utf8(plain).unwrap(),
    });
    let mut out = Vec::new();
    match behavior {
        Behavior::CloseAfterClientInfo => return,
        Behavior::KeepAliveFirst => frame::encode_keep_alive(&mut out),
        _ => {}
    }
    let si = ServerInfo {
        version: 2,
        ..Default::default()
    };
    let sealed = info::seal(&key, &client, si.to_json().as_bytes()).unwrap();
    frame::encode_server_info(&mut out, &sealed).unwrap();
    if behavior == Behavior::HugeFrameAfterInfo {
        frame::encode_keep_alive(&mut out);
        out.extend_from_slice(&[0x05, 0x00, 0x20, 0x00, 0x00]); // a 2 MiB RecvPacket header
    }
    wr.write_all(&out).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    peers.lock().unwrap().insert(client, tx.clone());
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                return;
            }
        }
    });
    while let Some((t, payload)) = read_frame(&mut rd, &mut buf).await {
        match ClientToServer::decode(t, payload) {
            Ok(ClientToServer::SendPacket { dst, packet }) => {
                let mut f = Vec::new();
                frame::encode_recv_packet(&mut f, &client, &packet).unwrap();
                if let Some(p) = peers.lock().unwrap().get(&dst) {
                    let _ = p.send(f);
                }
            }
            Ok(ClientToServer::Ping(d)) => {
                let mut f = Vec::new();
                frame::encode_pong(&mut f, &d);
                let _ = tx.send(f);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    peers.lock().unwrap().remove(&client);
}

fn cfg(url: String, tls: TlsTrust) -> ClientConfig {
    let mut c = ClientConfig::new(url, NodePrivate::generate());
    c.tls = tls;
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn recv_packet(c: &mut Client) -> (NodePublic, Bytes) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ServerToClient::RecvPacket { src, packet } => return (src, packet),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn relays_over_plain_http_with_classic_upgrade() {
    let s = start(Tls::None, Behavior::Normal).await;
    let a = Client::connect(&cfg(s.url(false), TlsTrust::WebPki))
        .await
        .unwrap();
    let mut b = Client::connect(&cfg(s.url(false), TlsTrust::WebPki))
        .await
        .unwrap();
    assert_eq!(a.server_key(), s.key);
    assert_eq!(a.server_info().version, 2);
    assert!(!a.conn_info().fast_start && !a.conn_info().tls);
    for size in [0usize, 1, 1400, 65536] {
        let pkt: Vec<u8> = (0..size).map(|i| i as u8).collect();
        a.send_packet(&b.public_key(), &pkt).await.unwrap();
        let (src, got) = recv_packet(&mut b).await;
        assert_eq!((src, got.len()), (a.public_key(), size));
        assert_eq!(&got[..], &pkt[..]);
    }
    // Batched sends arrive in order.
    let pkts: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
    a.handle()
        .send_packets(&b.public_key(), pkts.iter().map(Vec::as_slice))
        .await
        .unwrap();
    for p in &pkts {
        assert_eq!(&recv_packet(&mut b).await.1[..], &p[..]);
    }
    assert!(matches!(
        a.send_packet(&b.public_key(), &vec![0; 65537]).await,
        Err(ClientError::PacketTooLarge(65537))
    ));
    let json = s.seen.lock().unwrap()[0].client_info_json.clone();
    assert_eq!(json, r#"{"version":2,"CanAckPings":false}"#);
    // ping() needs a concurrent reader; its pong is consumed, not returned.
    let (h, mut rx) = a.split();
    let reader = tokio::spawn(async move { rx.recv().await });
    h.ping(Duration::from_secs(5)).await.unwrap();
    h.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), reader).await;
    assert!(
        matches!(end, Ok(Ok(Err(ClientError::Closed(_))))),
        "{end:?}"
    );
}

#[tokio::test]
async fn tls13_pin_uses_fast_start_without_sni() {
    let s = start(Tls::V13, Behavior::Normal).await;
    let mut c = cfg(
        s.url(true),
        TlsTrust::from_sha256_raw(&s.cert_name).unwrap(),
    );
    c.is_prober = true;
    c.ideal_node = Some("900a".into());
    let mut a = Client::connect(&c).await.unwrap();
    let info = a.conn_info().clone();
    assert!(info.fast_start);
    assert_eq!(info.metacert, Some((s.key, 2)));
    assert_eq!(info.tls_version.as_deref(), Some("TLSv1_3"));
    assert!(info.tls_handshake.is_some_and(|d| d > Duration::ZERO));
    // The leaf's expiry (rcgen's default notAfter is 4096-01-01), not the metacert's.
    assert_eq!(info.leaf_not_after, Some(67_090_118_400));
    assert_eq!(a.server_key(), s.key);
    let seen = s.seen.lock().unwrap()[0].clone();
    assert!(seen.fast_start);
    assert_eq!(seen.sni, None, "no SNI for an IP literal");
    assert_eq!(seen.ideal_node.as_deref(), Some("900a"));
    assert_eq!(
        seen.client_info_json,
        r#"{"version":2,"CanAckPings":false,"IsProber":true}"#
    );
    let me = a.public_key();
    a.send_packet(&me, b"to myself").await.unwrap();
    assert_eq!(&recv_packet(&mut a).await.1[..], b"to myself");
}

#[tokio::test]
async fn tls12_and_disabled_fast_start_use_the_101() {
    let s = start(Tls::V12, Behavior::Normal).await;
    let a = Client::connect(&cfg(
        s.url(true),
        TlsTrust::from_sha256_raw(&s.cert_name).unwrap(),
    ))
    .await
    .unwrap();
    assert!(!a.conn_info().fast_start);
    assert_eq!(
        a.conn_info().metacert,
        None,
        "metacert only trusted over TLS 1.3"
    );
    assert_eq!(a.server_key(), s.key);

    let s = start(Tls::V13, Behavior::Normal).await;
    let mut c = cfg(s.url(true), TlsTrust::Insecure);
    c.fast_start = false;
    c.preferred = true;
    c.watch_conns = true;
    let a = Client::connect(&c).await.unwrap();
    assert!(!a.conn_info().fast_start);
    assert!(!s.seen.lock().unwrap()[0].fast_start);
}

#[tokio::test]
async fn dial_addr_keeps_url_host_for_sni() {
    let s = start(Tls::V13, Behavior::Normal).await;
    let mut c = cfg(
        format!("https://derp.invalid:{}/derp", s.addr.port()),
        TlsTrust::Insecure,
    );
    c.dial_addr = Some("127.0.0.1".into());
    Client::connect(&c).await.unwrap();
    assert_eq!(
        s.seen.lock().unwrap()[0].sni.as_deref(),
        Some("derp.invalid")
    );
}

#[tokio::test]
async fn refuses_wrong_pin_and_untrusted_certs() {
    let s = start(Tls::V13, Behavior::Normal).await;
    let wrong = format!("sha256-raw:{}", "00".repeat(32));
    let e = Client::connect(&cfg(
        s.url(true),
        TlsTrust::from_sha256_raw(&wrong).unwrap(),
    ))
    .await
    .err()
    .unwrap();
    assert!(
        matches!(&e, ClientError::Tls(_)) && e.to_string().contains("hash"),
        "{e}"
    );
    let e = Client::connect(&cfg(s.url(true), TlsTrust::WebPki))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::Tls(_)), "{e}");
}

#[tokio::test]
async fn server_misbehaviour_is_an_error_not_a_panic() {
    let s = start(Tls::None, Behavior::KeepAliveFirst).await;
    let e = Client::connect(&cfg(s.url(false), TlsTrust::WebPki))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, ClientError::Handshake(m) if m.contains("0x06")),
        "{e}"
    );

    let s = start(Tls::V13, Behavior::CloseAfterClientInfo).await;
    let e = Client::connect(&cfg(s.url(true), TlsTrust::Insecure))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::Eof | ClientError::Io(_)), "{e}");

    let s = start(Tls::None, Behavior::Refuse426).await;
    let e = Client::connect(&cfg(s.url(false), TlsTrust::WebPki))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, ClientError::UpgradeRefused { status: 426, body } if body.contains("DERP requires")),
        "{e}"
    );

    let s = start(Tls::None, Behavior::HugeFrameAfterInfo).await;
    let mut a = Client::connect(&cfg(s.url(false), TlsTrust::WebPki))
        .await
        .unwrap();
    assert_eq!(a.recv().await.unwrap(), ServerToClient::KeepAlive);
    let e = a.recv().await.unwrap_err();
    assert!(
        matches!(e, ClientError::FrameTooLarge { len: 2097152, .. }),
        "{e}"
    );
    assert!(matches!(a.recv().await, Err(ClientError::Closed(_))));

    let s = start(Tls::None, Behavior::Silent).await;
    let mut c = cfg(s.url(false), TlsTrust::WebPki);
    c.connect_timeout = Duration::from_millis(300);
    let e = Client::connect(&c).await.err().unwrap();
    assert!(
        matches!(
            e,
            ClientError::Timeout {
                step: "reading upgrade response"
            }
        ),
        "{e}"
    );
}

/// A WebSocket DERP server that relays a client's packets back to itself, and records the size
/// of every binary message it receives (Go's server refuses messages over 32 KiB).
#[tokio::test]
async fn websocket_transport_relays_and_keeps_messages_small() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = NodePrivate::generate();
    let server_pub = key.public();
    let largest = Arc::new(Mutex::new(0usize));
    let largest_seen = largest.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let cb = |req: &Request, mut resp: Response| {
            let proto = req.headers().get("Sec-WebSocket-Protocol").unwrap();
            assert_eq!(proto, "derp");
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", "derp".parse().unwrap());
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tcp, cb).await.unwrap();
        let mut out = Vec::new();
        frame::encode_server_key(&mut out, &key.public());
        ws.send(Message::Binary(out.into())).await.unwrap();
        let mut buf = BytesMut::new();
        let mut client = None;
        while let Some(Ok(m)) = ws.next().await {
            let Message::Binary(b) = m else { continue };
            {
                let mut l = largest.lock().unwrap();
                *l = (*l).max(b.len());
            }
            buf.extend_from_slice(&b);
            let mut out = Vec::new();
            while let Some((t, payload)) = read_frame(&mut &[][..], &mut buf).await {
                match (t, &client) {
                    (2, None) => {
                        let c = NodePublic::from_slice(&payload[..32]).unwrap();
                        info::open(&key, &c, &payload[32..]).unwrap();
                        let si = ServerInfo {
                            version: 2,
                            ..Default::default()
                        };
                        let sealed = info::seal(&key, &c, si.to_json().as_bytes()).unwrap();
                        frame::encode_server_info(&mut out, &sealed).unwrap();
                        client = Some(c);
                    }
                    (_, Some(c)) => match ClientToServer::decode(t, payload).unwrap() {
                        ClientToServer::SendPacket { packet, .. } => {
                            frame::encode_recv_packet(&mut out, c, &packet).unwrap()
                        }
                        ClientToServer::Ping(d) => frame::encode_pong(&mut out, &d),
                        _ => {}
                    },
                    _ => panic!("unexpected frame {t}"),
                }
            }
            if !out.is_empty() {
                ws.send(Message::Binary(out.into())).await.unwrap();
            }
        }
    });

    let mut c = cfg(format!("http://{addr}/derp"), TlsTrust::WebPki);
    c.transport = derp_client::Transport::WebSocket;
    let mut a = Client::connect(&c).await.unwrap();
    assert_eq!(a.server_key(), server_pub);
    assert!(!a.conn_info().fast_start);
    let me = a.public_key();
    for size in [1usize, 1400, 65536] {
        let pkt = vec![size as u8; size];
        a.send_packet(&me, &pkt).await.unwrap();
        let (src, got) = recv_packet(&mut a).await;
        assert_eq!((src, &got[..]), (me, &pkt[..]));
    }
    let l = *largest_seen.lock().unwrap();
    assert!(l <= 16 << 10, "largest websocket message {l} bytes");
}
