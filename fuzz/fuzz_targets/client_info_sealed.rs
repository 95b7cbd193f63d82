//! The ClientInfo frame payload the server opens: `client key (32) || nonce (24) || box`. With
//! the first byte even, the rest is taken as a raw payload (short, zero key, corrupted box);
//! with it odd, the rest is a plaintext sealed here with the golden keys (a precomputed box and
//! a fixed nonce, so the only key agreement per input is the server's own), so the fuzzer
//! reaches the JSON behind a box that opens.
#![no_main]

use std::sync::OnceLock;

use crypto_box::aead::{Aead, generic_array::GenericArray};
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use derp_proto::info::{self, ClientInfo, NONCE_LEN};
use derp_proto::key::{KEY_LEN, NodePrivate, NodePublic};
use libfuzzer_sys::fuzz_target;

/// The golden fixture's keys (derper/proto/tests/fixtures/go-golden.json).
const SERVER_PRIVATE: &str = "d0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdce4f";
const CLIENT_PRIVATE: &str = "a8ad3bcbbb7da7cd0ee8b92a2ab5afeb2fc14b6b2f4a5b8d7e03d2e3c2f0b15e";

fn bytes(hex: &str) -> [u8; KEY_LEN] {
    let mut b = [0u8; KEY_LEN];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    b
}

struct Keys {
    server: NodePrivate,
    client: NodePublic,
    /// The client's side of the box to the server, agreed once.
    sealer: SalsaBox,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let server = NodePrivate::from_bytes(bytes(SERVER_PRIVATE)).expect("golden key");
        let client = NodePrivate::from_bytes(bytes(CLIENT_PRIVATE)).expect("golden key");
        let sealer = SalsaBox::new(
            &PublicKey::from(server.public().0),
            &SecretKey::from(bytes(CLIENT_PRIVATE)),
        );
        Keys {
            server,
            client: client.public(),
            sealer,
        }
    })
}

/// What `DerpServer::read_client_info` does with the frame payload.
fn server_side(server: &NodePrivate, payload: &[u8]) -> Option<(NodePublic, ClientInfo)> {
    let k = NodePublic::from_slice(payload.get(..KEY_LEN)?)?;
    if k.is_zero() {
        return None;
    }
    let plain = info::open(server, &k, &payload[KEY_LEN..]).ok()?;
    Some((k, ClientInfo::from_json(&plain).ok()?))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let k = keys();
    if mode & 1 == 0 {
        let _ = server_side(&k.server, rest);
        return;
    }
    let nonce = [mode; NONCE_LEN];
    let Ok(ct) = k.sealer.encrypt(GenericArray::from_slice(&nonce), rest) else {
        return;
    };
    let mut payload = k.client.as_bytes().to_vec();
    payload.extend_from_slice(&nonce);
    payload.extend_from_slice(&ct);
    // The box must open to exactly the plaintext, and the server must then decide as the
    // plaintext parser does.
    let opened = info::open(&k.server, &k.client, &payload[KEY_LEN..]).expect("the box opens");
    assert_eq!(opened, rest);
    let direct = ClientInfo::from_json(rest).ok().map(|c| c.to_json());
    let via_frame = ClientInfo::from_json(&opened).ok().map(|c| c.to_json());
    assert_eq!(direct, via_frame);
});
