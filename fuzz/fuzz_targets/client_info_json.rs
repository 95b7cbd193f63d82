//! ClientInfo JSON plaintext (`ClientInfo::from_json`, Go's encoding/json rules), and ServerInfo
//! JSON as a client parses it. Whatever is accepted must survive `to_json` and back unchanged.
#![no_main]

use derp_proto::info::{ClientInfo, ServerInfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ci) = ClientInfo::from_json(data) {
        let json = ci.to_json();
        let back = ClientInfo::from_json(json.as_bytes())
            .unwrap_or_else(|e| panic!("our own JSON {json:?} is refused: {e}"));
        assert_eq!(
            back.mesh_key.map(|k| k.to_hex()),
            ci.mesh_key.map(|k| k.to_hex())
        );
        assert_eq!(back.version, ci.version);
        assert_eq!(back.can_ack_pings, ci.can_ack_pings);
        assert_eq!(back.is_prober, ci.is_prober);
        assert_eq!(back.app_name, ci.app_name);
    }
    if let Ok(si) = ServerInfo::from_json(data) {
        let json = si.to_json();
        assert_eq!(ServerInfo::from_json(json.as_bytes()), Ok(si));
    }
});
