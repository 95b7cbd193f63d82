//! Parsing the head of the first HTTP request on a connection, so the server can decide how to
//! serve `/derp` itself (a stock HTTP stack would always write a 101, which breaks fast start).

/// Largest request head we buffer before answering 431; Go's default is 1 MiB, but no DERP
/// client sends more than a few hundred bytes and this is read before any authentication.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// Headers we parse at most; more gets a 431 too.
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request head exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    TooLarge,
}

/// What the DERP routing decision needs from a request head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// First `Upgrade` header value.
    pub upgrade: Option<String>,
    /// First `Derp-Fast-Start` value.
    pub fast_start: Option<String>,
    /// First `Sec-WebSocket-Protocol` value.
    pub websocket_protocol: Option<String>,
    pub ideal_node: Option<String>,
    pub host: Option<String>,
    /// Bytes the head occupies; anything after it is the body or the DERP stream.
    pub head_len: usize,
}

/// How `/derp` is to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerpUpgrade {
    /// Raw DERP after a 101 response.
    Classic,
    /// Raw DERP with no HTTP response at all (`Derp-Fast-Start: 1`).
    FastStart,
    /// DERP inside WebSocket binary messages.
    WebSocket,
    /// No usable `Upgrade` header: 426.
    Refused,
}

impl RequestHead {
    /// Parses a complete head at the start of `buf`. `Ok(None)` means more bytes are needed.
    pub fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let status = match req.parse(buf) {
            Ok(s) => s,
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        };
        let head_len = match status {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => {
                return if buf.len() >= MAX_HEAD_BYTES {
                    Err(HeadError::TooLarge)
                } else {
                    Ok(None)
                };
            }
        };
        let target = req.path.unwrap_or("/");
        let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
        let mut head = RequestHead {
            method: req.method.unwrap_or("").to_string(),
            path,
            head_len,
            ..Default::default()
        };
        for h in req.headers.iter() {
            let slot = if h.name.eq_ignore_ascii_case("upgrade") {
                &mut head.upgrade
            } else if h.name.eq_ignore_ascii_case("derp-fast-start") {
                &mut head.fast_start
            } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                &mut head.websocket_protocol
            } else if h.name.eq_ignore_ascii_case("ideal-node") {
                &mut head.ideal_node
            } else if h.name.eq_ignore_ascii_case("host") {
                &mut head.host
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(String::from_utf8_lossy(h.value).trim().to_string());
            }
        }
        Ok(Some(head))
    }

    /// Go's decision for `/derp`: WebSocket only if `Upgrade: websocket` and the first
    /// `Sec-WebSocket-Protocol` contains `derp`; `Upgrade: websocket` without it is raw DERP
    /// (legacy clients); `Derp-Fast-Start` must be exactly `1`.
    pub fn derp_upgrade(&self) -> DerpUpgrade {
        let up = self.upgrade.as_deref().unwrap_or("");
        let is_ws = up.eq_ignore_ascii_case("websocket");
        if is_ws
            && self
                .websocket_protocol
                .as_deref()
                .is_some_and(|p| p.contains("derp"))
        {
            return DerpUpgrade::WebSocket;
        }
        if !is_ws && !up.eq_ignore_ascii_case("derp") {
            return DerpUpgrade::Refused;
        }
        if self.fast_start.as_deref() == Some("1") {
            DerpUpgrade::FastStart
        } else {
            DerpUpgrade::Classic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RequestHead {
        RequestHead::parse(s.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn go_client_requests() {
        let classic = "GET /derp HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nUser-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n\x02\x00";
        let h = parse(classic);
        assert_eq!(h.path, "/derp");
        assert_eq!(h.head_len, classic.len() - 2);
        assert_eq!(h.derp_upgrade(), DerpUpgrade::Classic);
        let fast = parse(
            "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\nIdeal-Node: 900a\r\n\r\n",
        );
        assert_eq!(fast.derp_upgrade(), DerpUpgrade::FastStart);
        assert_eq!(fast.ideal_node.as_deref(), Some("900a"));
    }

    #[test]
    fn upgrade_rules_follow_go() {
        let h = |extra: &str| parse(&format!("GET /derp?x=1 HTTP/1.1\r\n{extra}\r\n"));
        assert_eq!(h("").derp_upgrade(), DerpUpgrade::Refused);
        assert_eq!(h("Upgrade: h2c\r\n").derp_upgrade(), DerpUpgrade::Refused);
        assert_eq!(h("Upgrade: derp\r\n").derp_upgrade(), DerpUpgrade::Classic);
        assert_eq!(
            h("Upgrade: DERP\r\nDerp-Fast-Start: 0\r\n").derp_upgrade(),
            DerpUpgrade::Classic
        );
        assert_eq!(
            h("Upgrade: DERP\r\nDerp-Fast-Start: true\r\n").derp_upgrade(),
            DerpUpgrade::Classic
        );
        assert_eq!(
            h("Upgrade: websocket\r\n").derp_upgrade(),
            DerpUpgrade::Classic
        );
        assert_eq!(
            h("Upgrade: WebSocket\r\nSec-WebSocket-Protocol: derp\r\n").derp_upgrade(),
            DerpUpgrade::WebSocket
        );
        assert_eq!(h("").path, "/derp");
    }

    #[test]
    fn partial_and_oversized() {
        assert_eq!(
            RequestHead::parse(b"GET /derp HTTP/1.1\r\nHo").unwrap(),
            None
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(RequestHead::parse(big.as_bytes()), Err(HeadError::TooLarge));
        let many: String = (0..70).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(
            RequestHead::parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Err(HeadError::TooLarge)
        );
        assert!(RequestHead::parse(b"\x16\x03\x01garbage\r\n\r\n").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(p in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = RequestHead::parse(&p).map(|h| h.map(|h| h.derp_upgrade()));
        }
    }
}
