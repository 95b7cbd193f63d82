//! A whole client connection through the real server code (`DerpServer::serve`), in memory:
//! the fuzz input is what the client sends. First byte: bit 0 set = the input starts at the
//! ClientInfo frame (the handshake itself is fuzzed), clear = the golden ClientInfo frame is
//! sent first and the input is the stream of frames after it; bit 1 = a mesh peer's ClientInfo
//! (ForwardPacket, WatchConns, ClosePeer allowed); bits 2..=7 pick how the bytes are cut into
//! reads. Writes are swallowed. After each connection the registry must be empty again.
#![no_main]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use derp_proto::frame;
use derp_proto::info::{self, ClientInfo};
use derp_proto::key::{KEY_LEN, MeshKey, NodePrivate};
use derper::derp::{ConnMeta, DerpConfig, DerpServer};
use derper::metrics::Metrics;
use derper::registry::Registry;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// The golden fixture's keys (derper/proto/tests/fixtures/go-golden.json).
const SERVER_PRIVATE: &str = "d0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdce4f";
const CLIENT_PRIVATE: &str = "a8ad3bcbbb7da7cd0ee8b92a2ab5afeb2fc14b6b2f4a5b8d7e03d2e3c2f0b15e";
const MESH_KEY: [u8; 32] = [0x5a; 32];

fn key(hex: &str) -> NodePrivate {
    let mut b = [0u8; KEY_LEN];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    NodePrivate::from_bytes(b).unwrap_or_else(|_| NodePrivate::generate())
}

struct World {
    rt: tokio::runtime::Runtime,
    server: Arc<DerpServer>,
    /// ClientInfo frames: a regular client, and a mesh peer with the server's mesh key.
    regular: Vec<u8>,
    mesh: Vec<u8>,
}

fn client_info_frame(client: &NodePrivate, server: &NodePrivate, ci: &ClientInfo) -> Vec<u8> {
    let sealed =
        info::seal(client, &server.public(), ci.to_json().as_bytes()).expect("sealing works");
    let mut out = Vec::new();
    frame::encode_client_info(&mut out, &client.public(), &sealed).expect("ClientInfo fits a frame");
    out
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let private_key = key(SERVER_PRIVATE);
        let client = key(CLIENT_PRIVATE);
        let metrics = Arc::new(Metrics::default());
        let regular = client_info_frame(
            &client,
            &private_key,
            &ClientInfo {
                version: 2,
                can_ack_pings: true,
                ..Default::default()
            },
        );
        let mesh = client_info_frame(
            &client,
            &private_key,
            &ClientInfo {
                version: 2,
                mesh_key: Some(MeshKey::from_bytes(MESH_KEY)),
                ..Default::default()
            },
        );
        let server = Arc::new(DerpServer {
            public_key: private_key.public(),
            private_key,
            mesh_key: Some(MeshKey::from_bytes(MESH_KEY)),
            registry: Registry::new(metrics.clone()),
            metrics,
            config: DerpConfig::default(),
            shutdown: CancellationToken::new(),
            verifier: None,
            receive_limit: Default::default(),
        });
        World {
            rt,
            server,
            regular,
            mesh,
        }
    })
}

/// Reads hand out the input in `chunk`-sized pieces, then EOF; writes succeed and vanish.
struct FuzzStream<'a> {
    input: &'a [u8],
    chunk: usize,
}

impl AsyncRead for FuzzStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.input.len().min(self.chunk).min(buf.remaining());
        let (now, later) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = later;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for FuzzStream<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const CHUNKS: [usize; 8] = [1, 3, 5, 37, 512, 4096, 65_536, usize::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let mut input = Vec::with_capacity(rest.len() + w.mesh.len());
    if mode & 1 == 0 {
        input.extend_from_slice(if mode & 2 == 0 { &w.regular } else { &w.mesh });
    }
    input.extend_from_slice(rest);
    let stream = FuzzStream {
        input: &input,
        chunk: CHUNKS[usize::from(mode >> 2) % CHUNKS.len()],
    };
    let meta = ConnMeta {
        remote: SocketAddr::from(([192, 0, 2, 1], 41641)),
        not_ideal: mode & 0x80 != 0,
    };
    w.rt.block_on(w.server.clone().serve(stream, b"", meta));
    assert_eq!(
        w.server.registry.client_count(),
        0,
        "the connection left itself registered"
    );
});
