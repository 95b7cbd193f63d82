//! What the STUN server does with every UDP datagram: `parse_binding_request`, then for an
//! accepted request `write_response` for an IPv4 and an IPv6 source, which a Tailscale client
//! (`parse_response`) must read back as the same transaction and address.
#![no_main]

use std::net::SocketAddr;

use derp_proto::stun::{self, MAX_RESPONSE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tx) = stun::parse_binding_request(data) else {
        return;
    };
    assert_eq!(&data[8..20], &tx);
    let ip4: SocketAddr = SocketAddr::from(([192, 0, 2, 7], 41641));
    let ip6: SocketAddr = "[2001:db8::7]:3478".parse().expect("literal");
    for addr in [ip4, ip6] {
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = stun::write_response(&tx, addr, &mut out);
        assert_eq!(stun::parse_response(&out[..n]), Ok((tx, addr)));
    }
});
