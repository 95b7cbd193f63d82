//! The client half of the `/derp` HTTP upgrade: the request Go's `derphttp` writes and the
//! parsing of the server's `101 Switching Protocols` head. No I/O here.

use bytes::BufMut;

use crate::ClientError;

/// Largest response head accepted; Go's 101 is ~150 bytes, error pages are short.
pub(crate) const MAX_RESPONSE_HEAD_BYTES: usize = 16 << 10;
/// How much of a refusal body is kept for the error message.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 512;

/// Appends the upgrade request. Header set and meaning as Go's (`Upgrade: DERP`,
/// `Connection: Upgrade`, optional `Derp-Fast-Start: 1` and `Ideal-Node`); Go sorts the
/// headers, so do we.
pub(crate) fn write_request(
    buf: &mut impl BufMut,
    authority: &str,
    path_and_query: &str,
    fast_start: bool,
    ideal_node: Option<&str>,
) {
    let mut put = |s: &str| buf.put_slice(s.as_bytes());
    put("GET ");
    put(path_and_query);
    put(" HTTP/1.1\r\nHost: ");
    put(authority);
    put("\r\nUser-Agent: derp-client-rs/");
    put(env!("CARGO_PKG_VERSION"));
    put("\r\nConnection: Upgrade\r\n");
    if fast_start {
        put("Derp-Fast-Start: 1\r\n");
    }
    if let Some(n) = ideal_node.filter(|n| !n.is_empty()) {
        put("Ideal-Node: ");
        put(n);
        put("\r\n");
    }
    put("Upgrade: DERP\r\n\r\n");
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    pub status: u16,
    /// `Derp-Public-Key` header, if present (informational; the ServerKey frame is authoritative).
    pub public_key: Option<String>,
    /// Bytes of the head including the blank line; what follows is DERP frames (or a body).
    pub head_len: usize,
}

/// Parses the response head at the start of `buf`. `Ok(None)` means more bytes are needed.
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let status = resp
                .code
                .ok_or_else(|| ClientError::BadResponse("no status code".into()))?;
            let public_key = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("Derp-Public-Key"))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_owned());
            Ok(Some(ResponseHead {
                status,
                public_key,
                head_len,
            }))
        }
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_RESPONSE_HEAD_BYTES {
                return Err(ClientError::BadResponse(format!(
                    "response head exceeds {MAX_RESPONSE_HEAD_BYTES} bytes"
                )));
            }
            Ok(None)
        }
        Err(e) => Err(ClientError::BadResponse(format!(
            "{e} (first bytes {:?})",
            String::from_utf8_lossy(&buf[..buf.len().min(64)])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_matches_go_shape() {
        let mut b = Vec::new();
        write_request(&mut b, "127.0.0.1:3340", "/derp", true, Some("900a"));
        let s = String::from_utf8(b).unwrap();
        assert!(s.starts_with("GET /derp HTTP/1.1\r\nHost: 127.0.0.1:3340\r\n"));
        assert!(s.contains("\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\nIdeal-Node: 900a\r\nUpgrade: DERP\r\n\r\n"));
        // The server's parser agrees.
        let head = derp_proto::upgrade::RequestHead::parse(s.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(head.path, "/derp");
        assert_eq!(head.fast_start.as_deref(), Some("1"));
        assert_eq!(head.ideal_node.as_deref(), Some("900a"));
        assert_eq!(head.head_len, s.len());

        let mut b = Vec::new();
        write_request(&mut b, "h", "/derp", false, None);
        let s = String::from_utf8(b).unwrap();
        assert!(!s.contains("Derp-Fast-Start") && !s.contains("Ideal-Node"));
    }

    #[test]
    fn parses_go_101() {
        let key = "ab".repeat(32);
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {key}\r\n\r\n\x01\x00\x00\x00\x28"
        );
        let h = parse_response(resp.as_bytes()).unwrap().unwrap();
        assert_eq!(h.status, 101);
        assert_eq!(h.public_key.as_deref(), Some(key.as_str()));
        assert_eq!(&resp.as_bytes()[h.head_len..], b"\x01\x00\x00\x00\x28");
    }

    #[test]
    fn partial_error_and_oversize() {
        assert_eq!(parse_response(b"HTTP/1.1 101 Swi").unwrap(), None);
        assert_eq!(parse_response(b"").unwrap(), None);
        let h = parse_response(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 426);
        // A DERP frame where a response was expected (fast-start confusion) is an error, not a hang.
        assert!(parse_response(b"\x01\x00\x00\x00\x28DERP").is_err());
        let mut big = b"HTTP/1.1 101 OK\r\n".to_vec();
        while big.len() < MAX_RESPONSE_HEAD_BYTES {
            big.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(parse_response(&big).is_err());
    }
}
