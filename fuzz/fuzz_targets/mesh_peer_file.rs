//! The `--mesh-with-file` parser (`derper::mesh::parse_peer_file`), re-read whenever the
//! operator's ConfigMap changes. Every peer it yields has an http(s) URL, and that URL parses
//! back to the same host.
#![no_main]

use derper::mesh::{parse_peer, parse_peer_file};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(peers) = parse_peer_file(&text) else {
        return;
    };
    for p in peers {
        assert!(
            p.url.starts_with("https://") || p.url.starts_with("http://"),
            "{p:?}"
        );
        assert!(!p.host.is_empty(), "{p:?}");
        let back = parse_peer(&p.url).unwrap_or_else(|e| panic!("{p:?}: its URL is refused: {e}"));
        assert_eq!(back.host, p.host, "{p:?}");
    }
});
