//! Our codec against bytes produced by Tailscale's own Go code (fixtures/go-golden.json, made by
//! tests/golden/main.go with tailscale.com v1.102.3).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use derp_proto::frame::{ClientToServer, FrameHeader, HEADER_LEN};
use derp_proto::info::{self, ClientInfo, ServerInfo};
use derp_proto::key::{NodePrivate, NodePublic};
use derp_proto::stun;

fn golden(name: &str) -> String {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/go-golden.json")).unwrap();
    match &all[name] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn private(s: &str) -> NodePrivate {
    NodePrivate::from_bytes(h(s).try_into().unwrap()).unwrap()
}

#[test]
fn public_keys_match_go() {
    assert_eq!(
        private(&golden("ClientPrivate")).public().untyped_hex(),
        golden("ClientPublic")
    );
    assert_eq!(
        private(&golden("ServerPrivate")).public().untyped_hex(),
        golden("ServerPublic")
    );
}

#[test]
fn go_sealed_infos_open_here() {
    let client = private(&golden("ClientPrivate"));
    let server = private(&golden("ServerPrivate"));
    let ci = info::open(&server, &client.public(), &h(&golden("ClientInfoSealed"))).unwrap();
    assert_eq!(ci, golden("ClientInfoJSON").as_bytes());
    let parsed = ClientInfo::from_json(&ci).unwrap();
    assert_eq!(parsed.version, 2);
    assert!(parsed.can_ack_pings);
    assert_eq!(parsed.to_json(), golden("ClientInfoJSON"));
    let si = info::open(&client, &server.public(), &h(&golden("ServerInfoSealed"))).unwrap();
    assert_eq!(si, golden("ServerInfoJSON").as_bytes());
    assert_eq!(
        ServerInfo::from_json(&si).unwrap().to_json(),
        golden("ServerInfoJSON")
    );
}

#[test]
fn go_client_frames_decode() {
    let server = NodePublic::parse_untyped(&golden("ServerPublic")).unwrap();
    let client = NodePublic::parse_untyped(&golden("ClientPublic")).unwrap();
    let bytes = h(&golden("ClientFrames"));
    let mut rest = &bytes[..];
    let mut got = Vec::new();
    while !rest.is_empty() {
        let hd = FrameHeader::parse(rest).unwrap();
        let end = HEADER_LEN + hd.len as usize;
        got.push(
            ClientToServer::decode(
                hd.frame_type,
                Bytes::copy_from_slice(&rest[HEADER_LEN..end]),
            )
            .unwrap(),
        );
        rest = &rest[end..];
    }
    assert_eq!(
        got,
        vec![
            ClientToServer::SendPacket {
                dst: server,
                packet: Bytes::from_static(b"hello")
            },
            ClientToServer::NotePreferred(true),
            ClientToServer::Ping([1, 2, 3, 4, 5, 6, 7, 8]),
            ClientToServer::Pong([8, 7, 6, 5, 4, 3, 2, 1]),
            ClientToServer::ForwardPacket {
                src: client,
                dst: server,
                packet: Bytes::from_static(b"fwd")
            },
            ClientToServer::WatchConns,
            ClientToServer::ClosePeer(server),
        ]
    );
    // And our encoders write the same bytes.
    let mut ours = Vec::new();
    derp_proto::frame::encode_send_packet(&mut ours, &server, b"hello").unwrap();
    derp_proto::frame::encode_note_preferred(&mut ours, true);
    assert_eq!(&ours[..], &bytes[..ours.len()]);
}

#[test]
fn go_client_info_frame_layout() {
    let head = h(&golden("ClientInfoFrameHead"));
    assert_eq!(head[0], 0x02);
    let hd = FrameHeader::parse(&head).unwrap();
    assert_eq!(
        hd.len as usize + HEADER_LEN,
        golden("ClientInfoFrameLen").parse::<usize>().unwrap()
    );
    assert_eq!(hex::encode(&head[5..37]), golden("ClientPublic"));
}

#[test]
fn stun_matches_go() {
    let tx: stun::TxId = h(&golden("StunTxID")).try_into().unwrap();
    assert_eq!(
        stun::binding_request(&tx).to_vec(),
        h(&golden("StunRequest"))
    );
    assert_eq!(
        stun::parse_binding_request(&h(&golden("StunRequest"))),
        Ok(tx)
    );
    let mut out = [0u8; stun::MAX_RESPONSE_LEN];
    let n = stun::write_response(&tx, "192.0.2.7:41641".parse().unwrap(), &mut out);
    assert_eq!(out[..n].to_vec(), h(&golden("StunResponseV4")));
    let n = stun::write_response(&tx, "[2001:db8::7]:41641".parse().unwrap(), &mut out);
    assert_eq!(out[..n].to_vec(), h(&golden("StunResponseV6")));
}
