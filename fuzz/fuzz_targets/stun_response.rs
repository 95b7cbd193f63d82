//! A STUN binding response as a client parses it (`parse_response`), and `is_stun`, on
//! whatever a server or an attacker sends back.
#![no_main]

use derp_proto::stun;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let looks = stun::is_stun(data);
    if let Ok((tx, _addr)) = stun::parse_response(data) {
        assert!(looks);
        assert_eq!(&data[8..20], &tx);
    }
});
