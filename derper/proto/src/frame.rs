//! DERP frames: `type (1) || length (4, big-endian) || payload`. Decoding of what a client sends
//! to a server and of what a server sends to a client, and the encoders for both directions.
//! Payloads are `Bytes` so a relayed packet is sliced out of the read buffer, never copied.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use crate::key::{KEY_LEN, NodePublic};

/// Frame header length: one type byte and a four-byte big-endian payload length.
pub const HEADER_LEN: usize = 5;
/// Mirrors derp.go `MaxPacketSize`: the largest relayed packet, 64 KiB.
pub const MAX_PACKET_BYTES: usize = 64 << 10;
/// Magic at the start of the ServerKey payload: "DERP" + U+1F511 (key emoji).
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
/// DERP protocol version we speak (v2: RecvPacket carries the source key).
pub const PROTOCOL_VERSION: u32 = 2;
/// Go's server accepts ClientInfo payloads up to 256 KiB; 56 = key + nonce.
pub const MIN_CLIENT_INFO_BYTES: usize = KEY_LEN + crate::info::NONCE_LEN;
pub const MAX_CLIENT_INFO_BYTES: usize = 256 << 10;
/// Largest frame a Go client accepts in steady state; larger breaks its connection.
pub const MAX_CLIENT_FRAME_BYTES: usize = 1 << 20;
/// Ping payloads accepted by the server: at least 8 bytes, at most 1000 (only 8 are echoed).
pub const MIN_PING_BYTES: usize = 8;
pub const MAX_PING_BYTES: usize = 1000;
/// PeerPresent payload: key(32) + IPv6-mapped IP(16) + port(2) + flags(1).
pub const PEER_PRESENT_BYTES: usize = 51;

/// Frame type bytes. Mirrors derp.go `frameType` constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    ServerKey = 0x01,
    ClientInfo = 0x02,
    ServerInfo = 0x03,
    SendPacket = 0x04,
    RecvPacket = 0x05,
    KeepAlive = 0x06,
    NotePreferred = 0x07,
    PeerGone = 0x08,
    PeerPresent = 0x09,
    ForwardPacket = 0x0a,
    WatchConns = 0x10,
    ClosePeer = 0x11,
    Ping = 0x12,
    Pong = 0x13,
    Health = 0x14,
    Restarting = 0x15,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerKey,
            0x02 => ClientInfo,
            0x03 => ServerInfo,
            0x04 => SendPacket,
            0x05 => RecvPacket,
            0x06 => KeepAlive,
            0x07 => NotePreferred,
            0x08 => PeerGone,
            0x09 => PeerPresent,
            0x0a => ForwardPacket,
            0x10 => WatchConns,
            0x11 => ClosePeer,
            0x12 => Ping,
            0x13 => Pong,
            0x14 => Health,
            0x15 => Restarting,
            _ => return None,
        })
    }
}

/// Why a peer is gone (PeerGone reason byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// The peer left the server/region (0x00).
    Disconnected,
    /// A disco packet was sent to a key this server does not know (0x01).
    NotHere,
    Other(u8),
}

impl PeerGoneReason {
    pub fn to_u8(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0x00,
            PeerGoneReason::NotHere => 0x01,
            PeerGoneReason::Other(b) => b,
        }
    }
    pub fn from_u8(b: u8) -> Self {
        match b {
            0x00 => PeerGoneReason::Disconnected,
            0x01 => PeerGoneReason::NotHere,
            b => PeerGoneReason::Other(b),
        }
    }
}

/// PeerPresent flag bits.
pub mod peer_flags {
    pub const REGULAR: u8 = 0x01;
    pub const MESH: u8 = 0x02;
    pub const PROBER: u8 = 0x04;
    pub const NOT_IDEAL: u8 = 0x08;
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: u8,
    pub len: u32,
}

impl FrameHeader {
    /// Parses the 5-byte header at the start of `buf`, or `None` if fewer bytes are there.
    pub fn parse(buf: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            frame_type: h[0],
            len: u32::from_be_bytes([h[1], h[2], h[3], h[4]]),
        })
    }
}

/// What [`split_frame`] found at the front of a read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Split {
    /// A whole frame, now split off the buffer: its type byte and payload (a slice of the
    /// buffer's allocation, not a copy).
    Frame { frame_type: u8, payload: Bytes },
    /// Fewer than [`HEADER_LEN`] bytes: read more before anything is known.
    NeedHeader,
    /// The header is there and within bounds; `missing` more bytes complete the frame, so a
    /// reader can reserve exactly that.
    NeedPayload { missing: usize },
}

/// A header announcing more payload than the reader allows for that frame type. Refused before
/// any of the payload is read, so a peer cannot make us buffer an arbitrary amount.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("frame type {frame_type:#04x} announces a {len}-byte payload, more than the {max} allowed")]
pub struct FrameTooLarge {
    pub frame_type: u8,
    pub len: usize,
    pub max: usize,
}

/// The one frame splitter under both the server's and the client's reader (no I/O: the reader
/// reads into `buf` and calls this until it yields a frame). `max_payload` gives the largest
/// payload accepted for a frame type; it is checked as soon as the header is complete.
pub fn split_frame(
    buf: &mut BytesMut,
    max_payload: impl Fn(u8) -> usize,
) -> Result<Split, FrameTooLarge> {
    let Some(h) = FrameHeader::parse(buf) else {
        return Ok(Split::NeedHeader);
    };
    let len = h.len as usize;
    let max = max_payload(h.frame_type);
    if len > max {
        return Err(FrameTooLarge {
            frame_type: h.frame_type,
            len,
            max,
        });
    }
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(Split::NeedPayload {
            missing: total - buf.len(),
        });
    }
    let mut frame = buf.split_to(total);
    let payload = frame.split_off(HEADER_LEN).freeze();
    Ok(Split::Frame {
        frame_type: h.frame_type,
        payload,
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame type {frame_type:#04x} has a {len}-byte payload, expected {expected}")]
    BadLength {
        frame_type: u8,
        len: usize,
        expected: &'static str,
    },
    #[error("packet of {0} bytes exceeds the 65536-byte limit")]
    PacketTooLarge(usize),
    #[error("frame of {len} bytes exceeds the {max}-byte limit for this connection")]
    FrameTooLarge { len: usize, max: usize },
    #[error("ServerKey frame has a bad magic")]
    BadMagic,
}

fn bad_len(frame_type: FrameType, len: usize, expected: &'static str) -> FrameError {
    FrameError::BadLength {
        frame_type: frame_type as u8,
        len,
        expected,
    }
}

fn key_at(p: &[u8], at: usize) -> NodePublic {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&p[at..at + KEY_LEN]);
    NodePublic(k)
}

/// A frame a client sends to the server after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToServer {
    SendPacket {
        dst: NodePublic,
        packet: Bytes,
    },
    ForwardPacket {
        src: NodePublic,
        dst: NodePublic,
        packet: Bytes,
    },
    NotePreferred(bool),
    WatchConns,
    ClosePeer(NodePublic),
    Ping([u8; 8]),
    Pong([u8; 8]),
    /// Anything else, including frame types only a server sends: skipped, as Go does.
    Ignored(u8),
}

impl ClientToServer {
    /// Decodes one frame's payload. Errors mean the connection must be closed.
    pub fn decode(frame_type: u8, payload: Bytes) -> Result<Self, FrameError> {
        let len = payload.len();
        let Some(t) = FrameType::from_u8(frame_type) else {
            return Ok(ClientToServer::Ignored(frame_type));
        };
        Ok(match t {
            FrameType::SendPacket => {
                if len < KEY_LEN {
                    return Err(bad_len(t, len, "at least 32"));
                }
                if len - KEY_LEN > MAX_PACKET_BYTES {
                    return Err(FrameError::PacketTooLarge(len - KEY_LEN));
                }
                ClientToServer::SendPacket {
                    dst: key_at(&payload, 0),
                    packet: payload.slice(KEY_LEN..),
                }
            }
            FrameType::ForwardPacket => {
                if len < 2 * KEY_LEN {
                    return Err(bad_len(t, len, "at least 64"));
                }
                if len - 2 * KEY_LEN > MAX_PACKET_BYTES {
                    return Err(FrameError::PacketTooLarge(len - 2 * KEY_LEN));
                }
                ClientToServer::ForwardPacket {
                    src: key_at(&payload, 0),
                    dst: key_at(&payload, KEY_LEN),
                    packet: payload.slice(2 * KEY_LEN..),
                }
            }
            FrameType::NotePreferred => {
                if len != 1 {
                    return Err(bad_len(t, len, "exactly 1"));
                }
                ClientToServer::NotePreferred(payload[0] != 0)
            }
            FrameType::WatchConns => {
                if len != 0 {
                    return Err(bad_len(t, len, "exactly 0"));
                }
                ClientToServer::WatchConns
            }
            FrameType::ClosePeer => {
                if len != KEY_LEN {
                    return Err(bad_len(t, len, "exactly 32"));
                }
                ClientToServer::ClosePeer(key_at(&payload, 0))
            }
            FrameType::Ping => {
                if !(MIN_PING_BYTES..=MAX_PING_BYTES).contains(&len) {
                    return Err(bad_len(t, len, "8 to 1000"));
                }
                ClientToServer::Ping(first8(&payload))
            }
            FrameType::Pong => {
                if len < 8 {
                    // A short pong is meaningless but harmless: skip it like an unknown frame.
                    return Ok(ClientToServer::Ignored(frame_type));
                }
                ClientToServer::Pong(first8(&payload))
            }
            _ => ClientToServer::Ignored(frame_type),
        })
    }
}

fn first8(p: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[..8]);
    b
}

/// A frame a server sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerToClient {
    ServerKey(NodePublic),
    /// The sealed ServerInfo (nonce || box); open it with `info::open_server_info`.
    ServerInfo(Bytes),
    RecvPacket {
        src: NodePublic,
        packet: Bytes,
    },
    KeepAlive,
    PeerGone {
        key: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent {
        key: NodePublic,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    Ping([u8; 8]),
    Pong([u8; 8]),
    Health(String),
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// Unknown frame types, and known ones too short to use (Go clients log and skip them).
    Ignored(u8),
}

impl ServerToClient {
    pub fn decode(frame_type: u8, payload: Bytes) -> Result<Self, FrameError> {
        let len = payload.len();
        let Some(t) = FrameType::from_u8(frame_type) else {
            return Ok(ServerToClient::Ignored(frame_type));
        };
        let ignored = Ok(ServerToClient::Ignored(frame_type));
        Ok(match t {
            FrameType::ServerKey => {
                if len < MAGIC.len() + KEY_LEN {
                    return Err(bad_len(t, len, "at least 40"));
                }
                if payload[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                ServerToClient::ServerKey(key_at(&payload, MAGIC.len()))
            }
            FrameType::ServerInfo => ServerToClient::ServerInfo(payload),
            FrameType::RecvPacket => {
                if len < KEY_LEN {
                    return ignored;
                }
                ServerToClient::RecvPacket {
                    src: key_at(&payload, 0),
                    packet: payload.slice(KEY_LEN..),
                }
            }
            FrameType::KeepAlive => ServerToClient::KeepAlive,
            FrameType::PeerGone => {
                if len < KEY_LEN {
                    return ignored;
                }
                let reason = payload.get(KEY_LEN).copied().unwrap_or(0);
                ServerToClient::PeerGone {
                    key: key_at(&payload, 0),
                    reason: PeerGoneReason::from_u8(reason),
                }
            }
            FrameType::PeerPresent => {
                if len < KEY_LEN {
                    return ignored;
                }
                let addr = if len >= KEY_LEN + 18 {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&payload[KEY_LEN..KEY_LEN + 16]);
                    let port = u16::from_be_bytes([payload[KEY_LEN + 16], payload[KEY_LEN + 17]]);
                    let ip = Ipv6Addr::from(ip);
                    if ip.is_unspecified() && port == 0 {
                        None
                    } else {
                        let ip = match ip.to_ipv4_mapped() {
                            Some(v4) => IpAddr::V4(v4),
                            None => IpAddr::V6(ip),
                        };
                        Some(SocketAddr::new(ip, port))
                    }
                } else {
                    None
                };
                let flags = payload.get(KEY_LEN + 18).copied().unwrap_or(0);
                ServerToClient::PeerPresent {
                    key: key_at(&payload, 0),
                    addr,
                    flags,
                }
            }
            FrameType::Ping if len >= 8 => ServerToClient::Ping(first8(&payload)),
            FrameType::Pong if len >= 8 => ServerToClient::Pong(first8(&payload)),
            FrameType::Health => {
                ServerToClient::Health(String::from_utf8_lossy(&payload).into_owned())
            }
            FrameType::Restarting if len >= 8 => ServerToClient::Restarting {
                reconnect_in_ms: u32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]),
                try_for_ms: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
            },
            _ => return ignored,
        })
    }
}

/// Appends the header of a variable-length frame, or refuses (writing nothing) past
/// [`MAX_CLIENT_FRAME_BYTES`]: no Go reader accepts a longer frame, and a length that does not
/// fit the header's u32 would desynchronise the stream.
fn put_header(buf: &mut impl BufMut, frame_type: FrameType, len: usize) -> Result<(), FrameError> {
    let too_large = FrameError::FrameTooLarge {
        len,
        max: MAX_CLIENT_FRAME_BYTES,
    };
    if len > MAX_CLIENT_FRAME_BYTES {
        return Err(too_large);
    }
    let wire_len = u32::try_from(len).map_err(|_| too_large)?;
    put_fixed_header(buf, frame_type, wire_len);
    Ok(())
}

/// Appends the header of a frame whose length is a constant of the protocol.
fn put_fixed_header(buf: &mut impl BufMut, frame_type: FrameType, len: u32) {
    buf.put_u8(frame_type as u8);
    buf.put_u32(len);
}

// ---- Server-to-client encoders -------------------------------------------------------------

pub fn encode_server_key(buf: &mut impl BufMut, server: &NodePublic) {
    put_fixed_header(buf, FrameType::ServerKey, (MAGIC.len() + KEY_LEN) as u32);
    buf.put_slice(&MAGIC);
    buf.put_slice(server.as_bytes());
}

pub fn encode_server_info(buf: &mut impl BufMut, sealed: &[u8]) -> Result<(), FrameError> {
    put_header(buf, FrameType::ServerInfo, sealed.len())?;
    buf.put_slice(sealed);
    Ok(())
}

pub fn encode_recv_packet(
    buf: &mut impl BufMut,
    src: &NodePublic,
    packet: &[u8],
) -> Result<(), FrameError> {
    encode_recv_packet_head(buf, src, packet.len())?;
    buf.put_slice(packet);
    Ok(())
}

/// A RecvPacket frame without its payload (see [`encode_send_packet_head`]).
pub fn encode_recv_packet_head(
    buf: &mut impl BufMut,
    src: &NodePublic,
    packet_len: usize,
) -> Result<(), FrameError> {
    put_header(buf, FrameType::RecvPacket, KEY_LEN + packet_len)?;
    buf.put_slice(src.as_bytes());
    Ok(())
}

pub fn encode_keep_alive(buf: &mut impl BufMut) {
    put_fixed_header(buf, FrameType::KeepAlive, 0);
}

pub fn encode_peer_gone(buf: &mut impl BufMut, key: &NodePublic, reason: PeerGoneReason) {
    put_fixed_header(buf, FrameType::PeerGone, (KEY_LEN + 1) as u32);
    buf.put_slice(key.as_bytes());
    buf.put_u8(reason.to_u8());
}

/// PeerPresent with the address as a 16-byte IPv6 (IPv4 mapped), as Go writes it.
pub fn encode_peer_present(
    buf: &mut impl BufMut,
    key: &NodePublic,
    addr: Option<SocketAddr>,
    flags: u8,
) {
    put_fixed_header(buf, FrameType::PeerPresent, PEER_PRESENT_BYTES as u32);
    buf.put_slice(key.as_bytes());
    match addr {
        Some(a) => {
            let ip = match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            buf.put_slice(&ip.octets());
            buf.put_u16(a.port());
        }
        None => {
            buf.put_slice(&[0u8; 16]);
            buf.put_u16(0);
        }
    }
    buf.put_u8(flags);
}

pub fn encode_ping(buf: &mut impl BufMut, data: &[u8; 8]) {
    put_fixed_header(buf, FrameType::Ping, 8);
    buf.put_slice(data);
}

pub fn encode_pong(buf: &mut impl BufMut, data: &[u8; 8]) {
    put_fixed_header(buf, FrameType::Pong, 8);
    buf.put_slice(data);
}

pub fn encode_health(buf: &mut impl BufMut, problem: &str) -> Result<(), FrameError> {
    put_header(buf, FrameType::Health, problem.len())?;
    buf.put_slice(problem.as_bytes());
    Ok(())
}

pub fn encode_restarting(buf: &mut impl BufMut, reconnect_in_ms: u32, try_for_ms: u32) {
    put_fixed_header(buf, FrameType::Restarting, 8);
    buf.put_u32(reconnect_in_ms);
    buf.put_u32(try_for_ms);
}

// ---- Client-to-server encoders -------------------------------------------------------------

pub fn encode_client_info(
    buf: &mut impl BufMut,
    client: &NodePublic,
    sealed: &[u8],
) -> Result<(), FrameError> {
    put_header(buf, FrameType::ClientInfo, KEY_LEN + sealed.len())?;
    buf.put_slice(client.as_bytes());
    buf.put_slice(sealed);
    Ok(())
}

pub fn encode_send_packet(
    buf: &mut impl BufMut,
    dst: &NodePublic,
    packet: &[u8],
) -> Result<(), FrameError> {
    encode_send_packet_head(buf, dst, packet.len())?;
    buf.put_slice(packet);
    Ok(())
}

/// Bytes in front of a SendPacket or RecvPacket payload: frame header and key.
pub const PACKET_HEAD_LEN: usize = HEADER_LEN + KEY_LEN;

/// A SendPacket frame without its payload, for writers that send the payload from where it
/// already is (a vectored write) instead of copying it behind the head.
pub fn encode_send_packet_head(
    buf: &mut impl BufMut,
    dst: &NodePublic,
    packet_len: usize,
) -> Result<(), FrameError> {
    put_header(buf, FrameType::SendPacket, KEY_LEN + packet_len)?;
    buf.put_slice(dst.as_bytes());
    Ok(())
}

pub fn encode_forward_packet(
    buf: &mut impl BufMut,
    src: &NodePublic,
    dst: &NodePublic,
    packet: &[u8],
) -> Result<(), FrameError> {
    put_header(buf, FrameType::ForwardPacket, 2 * KEY_LEN + packet.len())?;
    buf.put_slice(src.as_bytes());
    buf.put_slice(dst.as_bytes());
    buf.put_slice(packet);
    Ok(())
}

pub fn encode_note_preferred(buf: &mut impl BufMut, preferred: bool) {
    put_fixed_header(buf, FrameType::NotePreferred, 1);
    buf.put_u8(u8::from(preferred));
}

pub fn encode_watch_conns(buf: &mut impl BufMut) {
    put_fixed_header(buf, FrameType::WatchConns, 0);
}

pub fn encode_close_peer(buf: &mut impl BufMut, key: &NodePublic) {
    put_fixed_header(buf, FrameType::ClosePeer, KEY_LEN as u32);
    buf.put_slice(key.as_bytes());
}

/// Disco magic: "TS" + U+1F4AC (speech balloon). Mirrors disco.go `Magic`.
pub const DISCO_MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
/// Shortest disco packet: magic(6) + sender key(32) + nonce(24).
pub const MIN_DISCO_BYTES: usize = 62;

/// Whether a relayed packet looks like a disco packet (only those earn a PeerGone(NotHere)).
pub fn looks_like_disco(packet: &[u8]) -> bool {
    packet.len() >= MIN_DISCO_BYTES && packet[..DISCO_MAGIC.len()] == DISCO_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_all(
        stream: &[u8],
        chunk: usize,
        max: usize,
    ) -> Result<Vec<(u8, Bytes)>, FrameTooLarge> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match split_frame(&mut buf, |_| max)? {
                    Split::Frame {
                        frame_type,
                        payload,
                    } => out.push((frame_type, payload)),
                    Split::NeedHeader => {
                        assert!(buf.len() < HEADER_LEN);
                        break;
                    }
                    Split::NeedPayload { missing } => {
                        let len = FrameHeader::parse(&buf).unwrap().len as usize;
                        assert_eq!(missing, HEADER_LEN + len - buf.len());
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn split_frame_needs_header_then_payload_then_yields() {
        let mut buf = BytesMut::from(&[0x04u8, 0, 0][..]);
        assert_eq!(split_frame(&mut buf, |_| 100), Ok(Split::NeedHeader));
        buf.extend_from_slice(&[0, 3, b'a']);
        assert_eq!(
            split_frame(&mut buf, |_| 100),
            Ok(Split::NeedPayload { missing: 2 })
        );
        buf.extend_from_slice(b"bc\x06");
        assert_eq!(
            split_frame(&mut buf, |_| 100),
            Ok(Split::Frame {
                frame_type: 0x04,
                payload: Bytes::from_static(b"abc")
            })
        );
        // The next frame's first byte stays for the next call.
        assert_eq!(&buf[..], b"\x06");
    }

    #[test]
    fn split_frame_refuses_oversize_before_its_payload_arrives() {
        let mut buf = BytesMut::from(&[0x04u8, 0, 1, 0, 0][..]);
        assert_eq!(
            split_frame(&mut buf, |t| if t == 0x04 { 65535 } else { 0 }),
            Err(FrameTooLarge {
                frame_type: 0x04,
                len: 65536,
                max: 65535
            })
        );
    }

    proptest! {
        /// However the bytes arrive, the frames come out whole and in order.
        #[test]
        fn split_frame_is_independent_of_chunking(
            frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..12),
            chunk in 1usize..700,
        ) {
            let mut stream = Vec::new();
            for (t, p) in &frames {
                stream.push(*t);
                stream.extend_from_slice(&(p.len() as u32).to_be_bytes());
                stream.extend_from_slice(p);
            }
            let got = split_all(&stream, chunk, 300).unwrap();
            let want: Vec<(u8, Bytes)> = frames.into_iter().map(|(t, p)| (t, Bytes::from(p))).collect();
            prop_assert_eq!(got, want);
        }
    }

    fn k(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    fn split(buf: &[u8]) -> (u8, Bytes) {
        let h = FrameHeader::parse(buf).unwrap();
        assert_eq!(h.len as usize, buf.len() - HEADER_LEN);
        (h.frame_type, Bytes::copy_from_slice(&buf[HEADER_LEN..]))
    }

    #[test]
    fn server_key_frame_is_45_bytes_with_magic() {
        let mut b = Vec::new();
        encode_server_key(&mut b, &k(7));
        assert_eq!(b.len(), 45);
        assert_eq!(
            &b[..13],
            &[
                1, 0, 0, 0, 40, 0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91
            ]
        );
        let (t, p) = split(&b);
        assert_eq!(
            ServerToClient::decode(t, p).unwrap(),
            ServerToClient::ServerKey(k(7))
        );
    }

    #[test]
    fn send_packet_limits() {
        let mut b = Vec::new();
        encode_send_packet(&mut b, &k(1), &vec![9u8; MAX_PACKET_BYTES]).unwrap();
        let (t, p) = split(&b);
        assert!(ClientToServer::decode(t, p).is_ok());
        let mut b = Vec::new();
        encode_send_packet(&mut b, &k(1), &vec![9u8; MAX_PACKET_BYTES + 1]).unwrap();
        let (t, p) = split(&b);
        assert_eq!(
            ClientToServer::decode(t, p),
            Err(FrameError::PacketTooLarge(MAX_PACKET_BYTES + 1))
        );
        assert!(ClientToServer::decode(0x04, Bytes::from_static(&[0; 31])).is_err());
        let empty = ClientToServer::decode(0x04, Bytes::from(vec![3u8; 32])).unwrap();
        assert_eq!(
            empty,
            ClientToServer::SendPacket {
                dst: k(3),
                packet: Bytes::new()
            }
        );
    }

    #[test]
    fn control_frame_lengths() {
        assert!(ClientToServer::decode(0x07, Bytes::from_static(&[1, 1])).is_err());
        assert_eq!(
            ClientToServer::decode(0x07, Bytes::from_static(&[1])).unwrap(),
            ClientToServer::NotePreferred(true)
        );
        assert!(ClientToServer::decode(0x12, Bytes::from(vec![0u8; 7])).is_err());
        assert!(ClientToServer::decode(0x12, Bytes::from(vec![0u8; 1001])).is_err());
        let mut twelve = vec![1, 2, 3, 4, 5, 6, 7, 8];
        twelve.extend([9, 9, 9, 9]);
        assert_eq!(
            ClientToServer::decode(0x12, Bytes::from(twelve)).unwrap(),
            ClientToServer::Ping([1, 2, 3, 4, 5, 6, 7, 8])
        );
        assert!(ClientToServer::decode(0x10, Bytes::from_static(&[0])).is_err());
        assert!(ClientToServer::decode(0x11, Bytes::from(vec![0u8; 31])).is_err());
        assert_eq!(
            ClientToServer::decode(0x20, Bytes::from(vec![0u8; 100])).unwrap(),
            ClientToServer::Ignored(0x20)
        );
        assert_eq!(
            ClientToServer::decode(0x05, Bytes::new()).unwrap(),
            ClientToServer::Ignored(0x05)
        );
    }

    #[test]
    fn peer_present_round_trip_maps_ipv4() {
        let addr: SocketAddr = "192.0.2.1:4242".parse().unwrap();
        let mut b = Vec::new();
        encode_peer_present(
            &mut b,
            &k(5),
            Some(addr),
            peer_flags::MESH | peer_flags::PROBER,
        );
        assert_eq!(b.len(), HEADER_LEN + 51);
        assert_eq!(
            &b[HEADER_LEN + 32..HEADER_LEN + 44],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        let (t, p) = split(&b);
        assert_eq!(
            ServerToClient::decode(t, p).unwrap(),
            ServerToClient::PeerPresent {
                key: k(5),
                addr: Some(addr),
                flags: 0x06
            }
        );
    }

    #[test]
    fn peer_gone_and_restarting() {
        let mut b = Vec::new();
        encode_peer_gone(&mut b, &k(2), PeerGoneReason::NotHere);
        assert_eq!(b.len(), HEADER_LEN + 33);
        let (t, p) = split(&b);
        assert_eq!(
            ServerToClient::decode(t, p).unwrap(),
            ServerToClient::PeerGone {
                key: k(2),
                reason: PeerGoneReason::NotHere
            }
        );
        // Old servers omitted the reason byte.
        assert_eq!(
            ServerToClient::decode(0x08, Bytes::from(vec![2u8; 32])).unwrap(),
            ServerToClient::PeerGone {
                key: k(2),
                reason: PeerGoneReason::Disconnected
            }
        );
        let mut b = Vec::new();
        encode_restarting(&mut b, 500, 10_000);
        let (t, p) = split(&b);
        assert_eq!(
            ServerToClient::decode(t, p).unwrap(),
            ServerToClient::Restarting {
                reconnect_in_ms: 500,
                try_for_ms: 10_000
            }
        );
    }

    #[test]
    fn disco_detection() {
        let mut p = DISCO_MAGIC.to_vec();
        p.resize(61, 0);
        assert!(!looks_like_disco(&p));
        p.push(0);
        assert!(looks_like_disco(&p));
        p[0] = 0;
        assert!(!looks_like_disco(&p));
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(t in proptest::prelude::any::<u8>(), p in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = ClientToServer::decode(t, Bytes::from(p.clone()));
            let _ = ServerToClient::decode(t, Bytes::from(p));
        }
    }
}
