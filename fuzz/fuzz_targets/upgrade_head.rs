//! The HTTP request-head parser the server runs on the first bytes of every connection, before
//! any authentication (`RequestHead::parse`), and the `/derp` upgrade decision. A complete head
//! must parse the same from exactly its own bytes (what follows is the DERP stream).
#![no_main]

use derp_proto::upgrade::{MAX_HEAD_BYTES, RequestHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = RequestHead::parse(data) else {
        return;
    };
    let Some(head) = parsed else {
        assert!(
            data.len() < MAX_HEAD_BYTES,
            "an incomplete head past the limit is refused"
        );
        return;
    };
    assert!(head.head_len <= data.len());
    let _ = head.derp_upgrade();
    let again = RequestHead::parse(&data[..head.head_len]);
    assert_eq!(again, Ok(Some(head)));
});
