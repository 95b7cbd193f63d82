//! Client admission: the local tailscaled's LocalAPI (`-verify-clients`) and an admission URL
//! (`-verify-client-url`, which Headscale serves at `/verify`). Unlike Go, a verifier that
//! cannot be reached refuses the client unless `-verify-client-url-fail-open` is given: a
//! public relay should not open up to the internet because its verifier is down.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use derp_proto::key::NodePublic;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Go's admission timeout: the whole exchange, request to body.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Only the first 4 KiB of an answer is read (Go's limit).
pub const MAX_ANSWER_BYTES: usize = 4 << 10;
/// A decision is reused for this long, so a reconnect storm does not hammer the verifier. Short,
/// so a node removed from Headscale loses access quickly.
pub const ALLOW_CACHE_TTL: Duration = Duration::from_secs(30);
pub const DENY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached decisions at most; past this the cache is emptied (bounded memory under key floods).
pub const CACHE_MAX_ENTRIES: usize = 16_384;
/// Default tailscaled socket on Linux.
pub const DEFAULT_TAILSCALED_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused: a metric label and the reason for the log.
    Deny(&'static str, String),
}

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub url: Option<String>,
    /// Admit when the URL cannot be reached (Go's default; ours is off).
    pub url_fail_open: bool,
    /// Ask the local tailscaled (socket path).
    pub tailscaled_socket: Option<PathBuf>,
}

impl VerifyConfig {
    pub fn enabled(&self) -> bool {
        self.url.is_some() || self.tailscaled_socket.is_some()
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Verifier {
    cfg: VerifyConfig,
    client: Option<HttpsClient>,
    cache: Mutex<HashMap<NodePublic, (bool, Instant)>>,
}

/// Why a check could not decide: only `Unreachable` is covered by fail-open (as in Go).
enum CheckError {
    Unreachable(String),
    Refused(String),
}

impl Verifier {
    pub fn new(cfg: VerifyConfig) -> Result<Self, String> {
        let client = match &cfg.url {
            None => None,
            Some(u) => {
                let uri: hyper::Uri = u
                    .parse()
                    .map_err(|e| format!("-verify-client-url {u:?}: {e}"))?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) {
                    return Err(format!(
                        "-verify-client-url {u:?}: must be an http:// or https:// URL"
                    ));
                }
                let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_native_roots(provider)
                    .or_else(|_| {
                        Ok::<_, std::io::Error>(
                            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots(),
                        )
                    })
                    .map_err(|e| e.to_string())?
                    .https_or_http()
                    .enable_http1()
                    .build();
                Some(Client::builder(TokioExecutor::new()).build(https))
            }
        };
        Ok(Verifier {
            cfg,
            client,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, key: &NodePublic) -> Option<Decision> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(key) {
            Some((allow, until)) if *until > Instant::now() => Some(if *allow {
                Decision::Allow
            } else {
                Decision::Deny("cached", "refused (cached decision)".into())
            }),
            _ => None,
        }
    }

    fn remember(&self, key: NodePublic, allow: bool) {
        let ttl = if allow {
            ALLOW_CACHE_TTL
        } else {
            DENY_CACHE_TTL
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (allow, Instant::now() + ttl));
    }

    /// Both checks must pass when both are configured (Go's order: tailscaled, then URL).
    pub async fn check(&self, key: &NodePublic, source: Option<IpAddr>) -> Decision {
        if let Some(d) = self.cached(key) {
            return d;
        }
        if let Some(sock) = &self.cfg.tailscaled_socket {
            match tokio::time::timeout(VERIFY_TIMEOUT, whois(sock, key)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    self.remember(*key, false);
                    return Decision::Deny(
                        "tailscaled",
                        "not authorized (not found in local tailscaled)".into(),
                    );
                }
                Ok(Err(e)) => {
                    return Decision::Deny(
                        "tailscaled_error",
                        format!("local tailscaled check failed: {e}"),
                    );
                }
                Err(_) => {
                    return Decision::Deny(
                        "tailscaled_error",
                        "local tailscaled check timed out".into(),
                    );
                }
            }
        }
        if let (Some(url), Some(client)) = (&self.cfg.url, &self.client) {
            let r = tokio::time::timeout(VERIFY_TIMEOUT, admit(client, url, key, source)).await;
            let r = r.unwrap_or_else(|_| Err(CheckError::Unreachable("timed out after 5s".into())));
            match r {
                Ok(true) => {}
                Ok(false) => {
                    self.remember(*key, false);
                    return Decision::Deny("url", format!("refused by {url}"));
                }
                Err(CheckError::Unreachable(e)) if self.cfg.url_fail_open => {
                    tracing::warn!(
                        "admission URL unreachable ({e}); admitting because of -verify-client-url-fail-open"
                    );
                    return Decision::Allow;
                }
                Err(CheckError::Unreachable(e)) => {
                    return Decision::Deny(
                        "url_unreachable",
                        format!(
                            "admission URL unreachable ({e}); refusing (fail closed; -verify-client-url-fail-open admits instead)"
                        ),
                    );
                }
                Err(CheckError::Refused(e)) => {
                    return Decision::Deny("url_error", format!("admission URL: {e}"));
                }
            }
        }
        self.remember(*key, true);
        Decision::Allow
    }
}

#[derive(serde::Serialize)]
struct AdmitRequest<'a> {
    #[serde(rename = "NodePublic")]
    node_public: String,
    #[serde(rename = "Source")]
    source: &'a str,
}

/// POSTs Go's `DERPAdmitClientRequest` and reads `{"Allow": bool}` (key case-insensitive).
async fn admit(
    client: &HttpsClient,
    url: &str,
    key: &NodePublic,
    source: Option<IpAddr>,
) -> Result<bool, CheckError> {
    let src = source
        .map(|s| s.to_canonical().to_string())
        .unwrap_or_default();
    let body = serde_json::to_vec(&AdmitRequest {
        node_public: key.to_string(),
        source: &src,
    })
    .map_err(|e| CheckError::Refused(e.to_string()))?;
    let req = Request::post(url)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| CheckError::Refused(format!("building the request: {e}")))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| CheckError::Unreachable(e.to_string()))?;
    if resp.status() != hyper::StatusCode::OK {
        return Err(CheckError::Refused(format!(
            "answered HTTP {}",
            resp.status()
        )));
    }
    let body = read_prefix(resp.into_body(), MAX_ANSWER_BYTES)
        .await
        .map_err(|e| CheckError::Refused(format!("reading the answer: {e}")))?;
    parse_allow(&body).map_err(CheckError::Refused)
}

/// Reads at most `max` bytes of a body (the rest is ignored, as Go's LimitReader does).
async fn read_prefix<B>(mut body: B, max: usize) -> Result<Vec<u8>, String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = Vec::new();
    while out.len() < max {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    let take = (max - out.len()).min(d.len());
                    out.extend_from_slice(&d[..take]);
                }
            }
        }
    }
    Ok(out)
}

/// `{"Allow": true}` allows; false, absent, or invalid JSON refuses.
pub fn parse_allow(body: &[u8]) -> Result<bool, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON answer: {e}"))?;
    let obj = v.as_object().ok_or("answer is not a JSON object")?;
    let mut allow = false;
    for (k, v) in obj {
        if k.eq_ignore_ascii_case("Allow") {
            allow = v.as_bool().ok_or("Allow is not a boolean")?;
        }
    }
    Ok(allow)
}

/// Asks tailscaled's LocalAPI whether it knows `key`: 200 with a WhoIs body yes, 404 no.
async fn whois(socket: &std::path::Path, key: &NodePublic) -> Result<bool, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(format!(
        "/localapi/v0/whois?addr=nodekey%3A{}",
        key.untyped_hex()
    ))
    .header("Host", "local-tailscaled.sock")
    .body(http_body_util::Empty::<Bytes>::new())
    .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    match resp.status() {
        hyper::StatusCode::OK => {
            let body = Limited::new(resp.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| format!("undecodable WhoIs answer: {e}"))?;
            if v.is_object() {
                Ok(true)
            } else {
                Err("WhoIs answer is not an object".into())
            }
        }
        hyper::StatusCode::NOT_FOUND => Ok(false),
        s => {
            let body = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            if body.contains("invalid 'addr' parameter") {
                Err(
                    "tailscaled is too old to look up node keys; upgrade it to match this derper"
                        .into(),
                )
            } else {
                Err(format!("tailscaled answered HTTP {s}: {}", body.trim()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_parsing_follows_go() {
        assert_eq!(parse_allow(br#"{"Allow":true}"#), Ok(true));
        assert_eq!(parse_allow(br#"{"allow":true}"#), Ok(true));
        assert_eq!(parse_allow(b"{\"Allow\":false}\n"), Ok(false));
        assert_eq!(parse_allow(br#"{}"#), Ok(false));
        assert!(parse_allow(b"yes").is_err());
        assert!(parse_allow(br#"{"Allow":"true"}"#).is_err());
    }

    #[test]
    fn request_json_has_go_field_names() {
        let k = NodePublic([0xab; 32]);
        let j = serde_json::to_string(&AdmitRequest {
            node_public: k.to_string(),
            source: "127.0.0.1",
        })
        .unwrap();
        assert_eq!(
            j,
            format!(
                r#"{{"NodePublic":"nodekey:{}","Source":"127.0.0.1"}}"#,
                "ab".repeat(32)
            )
        );
    }
}
