//! Shared helpers for the derper integration tests: a server on 127.0.0.1:0 and clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use derp_client::{Client, ClientConfig, ClientHandle, ClientReceiver, ServerToClient};
use derp_proto::{NodePrivate, NodePublic};
use derper::config::Config;
use derper::server::{ServerHandle, start};
use tokio_util::sync::CancellationToken;

pub const T: Duration = Duration::from_secs(5);

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn server(cfg: Config) -> ServerHandle {
    start(cfg, CancellationToken::new())
        .await
        .expect("server starts")
}

pub async fn plain() -> ServerHandle {
    server(Config::for_tests()).await
}

pub fn url(s: &ServerHandle) -> String {
    format!("http://{}/derp", s.derp_addr)
}

pub struct Peer {
    pub key: NodePublic,
    pub tx: ClientHandle,
    pub rx: ClientReceiver,
}

pub async fn connect_with(cfg: ClientConfig) -> Peer {
    let c = tokio::time::timeout(T, Client::connect(&cfg))
        .await
        .expect("connect in time")
        .expect("connect");
    let (tx, rx) = c.split();
    Peer {
        key: tx.public_key(),
        tx,
        rx,
    }
}

pub async fn connect(url: &str) -> Peer {
    connect_with(ClientConfig::new(url, NodePrivate::generate())).await
}

/// Two fresh clients of one server.
pub async fn pair(url: &str) -> (Peer, Peer) {
    (connect(url).await, connect(url).await)
}

pub async fn connect_as(url: &str, key: NodePrivate) -> Peer {
    connect_with(ClientConfig::new(url, key)).await
}

impl Peer {
    /// The next frame that is not a KeepAlive.
    pub async fn next(&mut self) -> ServerToClient {
        loop {
            let f = tokio::time::timeout(T, self.rx.recv())
                .await
                .expect("a frame in time")
                .expect("recv");
            if f != ServerToClient::KeepAlive {
                return f;
            }
        }
    }

    /// The next packet: (source, payload).
    pub async fn packet(&mut self) -> (NodePublic, Vec<u8>) {
        loop {
            match self.next().await {
                ServerToClient::RecvPacket { src, packet } => return (src, packet.to_vec()),
                ServerToClient::PeerPresent { .. } | ServerToClient::Pong(_) => {}
                other => panic!("expected a packet, got {other:?}"),
            }
        }
    }

    /// Asserts nothing but KeepAlives arrives for `d`.
    pub async fn quiet_for(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Err(_) => return,
                Ok(Ok(ServerToClient::KeepAlive)) => {}
                Ok(other) => panic!("expected nothing, got {other:?}"),
            }
        }
    }
}

/// Polls `f` until true or the deadline.
pub async fn eventually(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + d;
    while !f() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
