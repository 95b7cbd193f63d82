//! The client→server frame decoder (`ClientToServer::decode`): first byte is the frame type,
//! the rest the payload. Checks the size limits hold and that every accepted packet frame
//! re-encodes to the bytes it came from.
#![no_main]

use bytes::Bytes;
use derp_proto::frame::{self, ClientToServer, HEADER_LEN, MAX_PACKET_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&typ, payload)) = data.split_first() else {
        return;
    };
    let Ok(f) = ClientToServer::decode(typ, Bytes::copy_from_slice(payload)) else {
        return;
    };
    let mut again = Vec::new();
    match &f {
        ClientToServer::SendPacket { dst, packet } => {
            assert!(packet.len() <= MAX_PACKET_BYTES);
            frame::encode_send_packet(&mut again, dst, packet).expect("a decoded frame encodes again");
        }
        ClientToServer::ForwardPacket { src, dst, packet } => {
            assert!(packet.len() <= MAX_PACKET_BYTES);
            frame::encode_forward_packet(&mut again, src, dst, packet).expect("a decoded frame encodes again");
        }
        ClientToServer::NotePreferred(p) => {
            assert_eq!(payload.len(), 1);
            assert_eq!(*p, payload[0] != 0);
            return;
        }
        ClientToServer::ClosePeer(k) => frame::encode_close_peer(&mut again, k),
        ClientToServer::WatchConns => frame::encode_watch_conns(&mut again),
        ClientToServer::Ping(d) | ClientToServer::Pong(d) => {
            assert_eq!(&payload[..8], d);
            return;
        }
        ClientToServer::Ignored(t) => {
            assert_eq!(*t, typ);
            return;
        }
    }
    assert_eq!(again[0], typ);
    assert_eq!(&again[HEADER_LEN..], payload, "re-encoding changes {f:?}");
});
