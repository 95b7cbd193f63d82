//! The server→client frame decoder (`ServerToClient::decode`) a client runs on whatever a
//! server sends: first byte is the frame type, the rest the payload. Checks that decoded
//! frames re-encode to a frame that decodes to the same value.
#![no_main]

use bytes::Bytes;
use derp_proto::frame::{self, HEADER_LEN, ServerToClient};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&typ, payload)) = data.split_first() else {
        return;
    };
    let Ok(f) = ServerToClient::decode(typ, Bytes::copy_from_slice(payload)) else {
        return;
    };
    let mut again = Vec::new();
    match &f {
        ServerToClient::ServerKey(k) => frame::encode_server_key(&mut again, k),
        ServerToClient::RecvPacket { src, packet } => {
            frame::encode_recv_packet(&mut again, src, packet).expect("a decoded frame encodes again")
        }
        ServerToClient::PeerGone { key, reason } => {
            frame::encode_peer_gone(&mut again, key, *reason)
        }
        ServerToClient::PeerPresent { key, addr, flags } => {
            frame::encode_peer_present(&mut again, key, *addr, *flags)
        }
        ServerToClient::Ping(d) => frame::encode_ping(&mut again, d),
        ServerToClient::Pong(d) => frame::encode_pong(&mut again, d),
        ServerToClient::Health(s) => frame::encode_health(&mut again, s).expect("a decoded frame encodes again"),
        ServerToClient::Restarting {
            reconnect_in_ms,
            try_for_ms,
        } => frame::encode_restarting(&mut again, *reconnect_in_ms, *try_for_ms),
        ServerToClient::KeepAlive | ServerToClient::ServerInfo(_) | ServerToClient::Ignored(_) => {
            return;
        }
    }
    let back = ServerToClient::decode(again[0], Bytes::copy_from_slice(&again[HEADER_LEN..]));
    assert_eq!(back.as_ref(), Ok(&f), "re-encoding changes {f:?}");
});
