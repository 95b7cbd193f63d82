//! The STUN subset Tailscale uses (RFC 5389 binding requests with the `tailnode` SOFTWARE
//! attribute and a FINGERPRINT), both the server's answer and a client's request/parse.
//! Mirrors tailscale.com/net/stun.

use std::net::{IpAddr, SocketAddr};

pub const HEADER_LEN: usize = 20;
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
pub const TXID_LEN: usize = 12;
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const SOFTWARE: &[u8] = b"tailnode";
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Largest response we build: IPv6 XOR-MAPPED-ADDRESS.
pub const MAX_RESPONSE_LEN: usize = 44;
/// Tailscale's request is always this long.
pub const REQUEST_LEN: usize = 40;

pub type TxId = [u8; TXID_LEN];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN packet")]
    NotStun,
    #[error("not a binding request")]
    NotBindingRequest,
    #[error("truncated attribute")]
    Truncated,
    #[error("missing or wrong SOFTWARE attribute")]
    NotTailscale,
    #[error("missing, misplaced or wrong FINGERPRINT")]
    BadFingerprint,
    #[error("not a binding success response")]
    NotSuccess,
    #[error("no mapped address in the response")]
    NoAddress,
}

/// The first-pass check Go's server does: length, top two bits, magic cookie.
pub fn is_stun(p: &[u8]) -> bool {
    p.len() >= HEADER_LEN && p[0] & 0xC0 == 0 && p[4..8] == MAGIC_COOKIE
}

fn fingerprint(p: &[u8]) -> u32 {
    crc32fast::hash(p) ^ FINGERPRINT_XOR
}

struct Attr<'a> {
    typ: u16,
    value: &'a [u8],
}

/// Walks attributes to the end of the datagram (Go does not trust the header length field).
fn attrs(body: &[u8]) -> Result<Vec<Attr<'_>>, StunError> {
    let mut out = Vec::with_capacity(4);
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(StunError::Truncated);
        }
        let typ = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = len.div_ceil(4) * 4;
        if rest.len() < 4 + padded {
            return Err(StunError::Truncated);
        }
        out.push(Attr {
            typ,
            value: &rest[4..4 + len],
        });
        rest = &rest[4 + padded..];
    }
    Ok(out)
}

/// Parses a Tailscale binding request and returns its transaction id. Anything else is an
/// error, and the server answers nothing (no STUN error responses, as in Go).
pub fn parse_binding_request(p: &[u8]) -> Result<TxId, StunError> {
    if !is_stun(p) {
        return Err(StunError::NotStun);
    }
    if p[..2] != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let list = attrs(&p[HEADER_LEN..])?;
    if !list
        .iter()
        .any(|a| a.typ == ATTR_SOFTWARE && a.value == SOFTWARE)
    {
        return Err(StunError::NotTailscale);
    }
    let Some(last) = list.last() else {
        return Err(StunError::BadFingerprint);
    };
    if last.typ != ATTR_FINGERPRINT || last.value.len() != 4 || p.len() < 8 {
        return Err(StunError::BadFingerprint);
    }
    let want = u32::from_be_bytes([last.value[0], last.value[1], last.value[2], last.value[3]]);
    if fingerprint(&p[..p.len() - 8]) != want {
        return Err(StunError::BadFingerprint);
    }
    let mut tx = [0u8; TXID_LEN];
    tx.copy_from_slice(&p[8..20]);
    Ok(tx)
}

/// Writes the binding success response for `addr` into `out` and returns its length.
/// IPv4-mapped IPv6 sources are answered as IPv4 (family 0x01), as RFC 5389 wants.
pub fn write_response(tx: &TxId, addr: SocketAddr, out: &mut [u8; MAX_RESPONSE_LEN]) -> usize {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    let (family, ip_len) = match ip {
        IpAddr::V4(_) => (0x01u8, 4usize),
        IpAddr::V6(_) => (0x02u8, 16usize),
    };
    let attr_len = 4 + ip_len; // reserved(1) family(1) port(2) + address
    let total = HEADER_LEN + 4 + attr_len;
    out[..2].copy_from_slice(&BINDING_SUCCESS);
    out[2..4].copy_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(tx);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(attr_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let port = addr.port() ^ 0x2112;
    out[26..28].copy_from_slice(&port.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => {
            for (i, b) in v4.octets().iter().enumerate() {
                out[28 + i] = b ^ MAGIC_COOKIE[i];
            }
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            for i in 0..16 {
                let x = if i < 4 { MAGIC_COOKIE[i] } else { tx[i - 4] };
                out[28 + i] = o[i] ^ x;
            }
        }
    }
    total
}

/// Builds Tailscale's 40-byte binding request.
pub fn binding_request(tx: &TxId) -> [u8; REQUEST_LEN] {
    let mut p = [0u8; REQUEST_LEN];
    p[..2].copy_from_slice(&BINDING_REQUEST);
    p[2..4].copy_from_slice(&20u16.to_be_bytes());
    p[4..8].copy_from_slice(&MAGIC_COOKIE);
    p[8..20].copy_from_slice(tx);
    p[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    p[22..24].copy_from_slice(&8u16.to_be_bytes());
    p[24..32].copy_from_slice(SOFTWARE);
    p[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    p[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&p[..32]);
    p[36..40].copy_from_slice(&fp.to_be_bytes());
    p
}

/// Parses a binding success response the way Tailscale's client does.
pub fn parse_response(p: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    if !is_stun(p) {
        return Err(StunError::NotStun);
    }
    if p[..2] != BINDING_SUCCESS {
        return Err(StunError::NotSuccess);
    }
    let hdr_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let body = p
        .get(HEADER_LEN..HEADER_LEN + hdr_len)
        .ok_or(StunError::Truncated)?;
    let mut tx = [0u8; TXID_LEN];
    tx.copy_from_slice(&p[8..20]);
    let mut fallback = None;
    for a in attrs(body)? {
        let xor = matches!(a.typ, ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT);
        if !xor && a.typ != ATTR_MAPPED_ADDRESS {
            continue;
        }
        let Some(addr) = decode_address(a.value, xor.then_some(&tx)) else {
            continue;
        };
        if xor {
            return Ok((tx, addr));
        }
        fallback = Some(addr);
    }
    fallback.map(|a| (tx, a)).ok_or(StunError::NoAddress)
}

fn decode_address(v: &[u8], xor_tx: Option<&TxId>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    let len = match v[1] {
        0x01 => 4,
        0x02 => 16,
        _ => return None,
    };
    let raw = v.get(4..4 + len)?;
    let mut ip = [0u8; 16];
    ip[..len].copy_from_slice(raw);
    if let Some(tx) = xor_tx {
        port ^= 0x2112;
        for (i, b) in ip.iter_mut().take(len).enumerate() {
            *b ^= if i < 4 { MAGIC_COOKIE[i] } else { tx[i - 4] };
        }
    }
    let ip = if len == 4 {
        IpAddr::from([ip[0], ip[1], ip[2], ip[3]])
    } else {
        let v6 = std::net::Ipv6Addr::from(ip);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TX: TxId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn request_round_trip() {
        let r = binding_request(&TX);
        assert_eq!(parse_binding_request(&r), Ok(TX));
    }

    #[test]
    fn refuses_what_go_refuses() {
        let good = binding_request(&TX);
        let mut sw = good;
        sw[24] = b'X';
        assert_eq!(parse_binding_request(&sw), Err(StunError::NotTailscale));
        let mut fp = good;
        fp[39] ^= 1;
        assert_eq!(parse_binding_request(&fp), Err(StunError::BadFingerprint));
        assert_eq!(
            parse_binding_request(&good[..32]),
            Err(StunError::BadFingerprint)
        );
        let mut cookie = good;
        cookie[4] = 0;
        assert_eq!(parse_binding_request(&cookie), Err(StunError::NotStun));
        let mut method = good;
        method[1] = 2;
        assert_eq!(
            parse_binding_request(&method),
            Err(StunError::NotBindingRequest)
        );
        assert_eq!(parse_binding_request(&good[..19]), Err(StunError::NotStun));
        assert_eq!(
            parse_binding_request(&good[..38]),
            Err(StunError::Truncated)
        );
        // FINGERPRINT not last.
        let mut extra = good.to_vec();
        extra.extend([0x80, 0x22, 0, 0]);
        assert_eq!(
            parse_binding_request(&extra),
            Err(StunError::BadFingerprint)
        );
    }

    #[test]
    fn response_round_trip_v4_v6_and_mapped() {
        let mut out = [0u8; MAX_RESPONSE_LEN];
        for (addr, len) in [
            ("192.0.2.7:41641", 32),
            ("[2001:db8::7]:41641", 44),
            ("[::ffff:192.0.2.7]:41641", 32),
        ] {
            let a: SocketAddr = addr.parse().unwrap();
            let n = write_response(&TX, a, &mut out);
            assert_eq!(n, len, "{addr}");
            let (tx, got) = parse_response(&out[..n]).unwrap();
            assert_eq!(tx, TX);
            let want = match a.ip() {
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
                    None => a,
                },
                _ => a,
            };
            assert_eq!(got, want);
        }
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(p in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let _ = parse_binding_request(&p);
            let _ = parse_response(&p);
        }
    }
}
