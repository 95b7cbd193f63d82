//! The HTTP side of the public listener. The first request of every connection is parsed here:
//! `/derp` is served by our own code (fast start must write no HTTP response at all); anything
//! else is handed, with the bytes already read, to hyper and an axum router with Go's endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use derp_proto::upgrade::{DerpUpgrade, HeadError, RequestHead};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::RwLock;
use tracing::debug;

use crate::derp::{ConnMeta, DerpServer};
use crate::io::Rewind;
use crate::metrics::EndpointLabel;

/// How long the first request head may take to arrive. Go allows 30 s; DERP clients send it
/// with (or right after) the TLS handshake, and a shorter bound frees slowloris slots sooner.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Go refreshes bootstrap DNS answers every 10 minutes.
pub const BOOTSTRAP_DNS_REFRESH: Duration = Duration::from_secs(600);

/// What `/` shows (`-home`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomePage {
    Default,
    Blank,
    Redirect(String),
}

pub struct HttpState {
    pub derp: Arc<DerpServer>,
    pub derp_enabled: bool,
    pub home: HomePage,
    pub ready: AtomicBool,
    /// Resolved `-bootstrap-dns-names`; `None` when none are configured (empty body, as Go).
    pub bootstrap_dns: RwLock<Option<BTreeMap<String, Vec<IpAddr>>>>,
}

/// Headers Go adds to pages a browser may render.
fn browser_headers(h: &mut HeaderMap) {
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'self'; block-all-mixed-content; object-src 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

const HOME_HTML: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DERP</title></head><body>\n\
<h1>DERP</h1>\n<p>This is a <a href=\"https://tailscale.com/kb/1232/derp-servers\">Tailscale DERP</a> relay \
(derp-fleet derper). It relays encrypted traffic for Tailscale clients; there is nothing to browse here.</p>\n\
</body></html>\n";

async fn home(State(st): State<Arc<HttpState>>, method: Method) -> Response {
    if method == Method::CONNECT {
        return (StatusCode::FORBIDDEN, "CONNECT not enabled\n").into_response();
    }
    let mut resp = match &st.home {
        HomePage::Default => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            HOME_HTML,
        )
            .into_response(),
        HomePage::Blank => (StatusCode::OK, "").into_response(),
        HomePage::Redirect(url) => match HeaderValue::from_str(url) {
            Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
    };
    browser_headers(resp.headers_mut());
    resp
}

async fn robots() -> Response {
    let mut r = "User-agent: *\nDisallow: /\n".into_response();
    browser_headers(r.headers_mut());
    r
}

/// The captive-portal check: 204, and an echo of a well-formed challenge.
pub async fn generate_204(headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    if let Some(c) = headers.get("X-Tailscale-Challenge") {
        let b = c.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 64
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'));
        if ok && let Ok(v) = HeaderValue::from_bytes(&[b"response ".as_slice(), b].concat()) {
            h.insert("X-Tailscale-Response", v);
        }
    }
    r
}

async fn probe(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        ([(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], "").into_response()
    } else {
        (StatusCode::METHOD_NOT_ALLOWED, "bogus probe method\n").into_response()
    }
}

async fn bootstrap_dns(State(st): State<Arc<HttpState>>) -> Response {
    let body = match &*st.bootstrap_dns.read().await {
        None => String::new(),
        Some(m) => {
            let m: BTreeMap<&String, Vec<String>> = m
                .iter()
                .map(|(k, v)| (k, v.iter().map(|ip| ip.to_string()).collect()))
                .collect();
            serde_json::to_string_pretty(&m).unwrap_or_default() + "\n"
        }
    };
    let mut r = (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CONNECTION, "close"),
        ],
        body,
    )
        .into_response();
    browser_headers(r.headers_mut());
    r
}

async fn derp_via_hyper(State(st): State<Arc<HttpState>>) -> Response {
    if !st.derp_enabled {
        return (StatusCode::NOT_FOUND, "derp server disabled\n").into_response();
    }
    // Only the first request of a connection can become DERP; Go clients always dial fresh.
    (
        StatusCode::UPGRADE_REQUIRED,
        "DERP requires connection upgrade\n",
    )
        .into_response()
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(st): State<Arc<HttpState>>) -> Response {
    if st.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response()
    }
}

/// The public router (also the plain-HTTP one when TLS is off).
/// The `endpoint` label of `derper_http_requests_total`: a fixed set, so a scanner probing
/// random paths cannot grow the metric without bound.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/derp" => "derp_plain_http",
        "/derp/probe" | "/derp/latency-check" => "probe",
        "/generate_204" => "generate_204",
        "/bootstrap-dns" => "bootstrap_dns",
        "/robots.txt" => "robots",
        "/healthz" | "/readyz" => "health",
        "/" => "home",
        _ => "other",
    }
}

pub fn router(st: Arc<HttpState>) -> Router {
    Router::new()
        .route("/derp", axum::routing::any(derp_via_hyper))
        .route("/derp/probe", axum::routing::any(probe))
        .route("/derp/latency-check", axum::routing::any(probe))
        .route("/generate_204", axum::routing::any(generate_204))
        .route("/robots.txt", axum::routing::any(robots))
        .route("/bootstrap-dns", axum::routing::any(bootstrap_dns))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .fallback(home)
        .with_state(st)
}

/// The port-80 listener next to TLS: captive checks, health, ACME HTTP-01 answers (under
/// `-certmode letsencrypt/gcp`), and a redirect to HTTPS.
pub fn port80_router(st: Arc<HttpState>, acme: Option<Arc<crate::acme::Challenges>>) -> Router {
    async fn redirect(method: Method, headers: HeaderMap, uri: Uri) -> Response {
        if method != Method::GET && method != Method::HEAD {
            return (StatusCode::BAD_REQUEST, "Use HTTPS\n").into_response();
        }
        // Go redirects to https://<Host as sent><request URI>, port and all.
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let target = format!("https://{host}{path}");
        match HeaderValue::from_str(&target) {
            Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
            Err(_) => (StatusCode::BAD_REQUEST, "bad Host\n").into_response(),
        }
    }
    let mut r = Router::new()
        .route("/generate_204", axum::routing::any(generate_204))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .fallback(redirect)
        .with_state(st);
    if let Some(ch) = acme {
        let answer = move |axum::extract::Path(token): axum::extract::Path<String>| {
            let ch = ch.clone();
            async move {
                match ch.http_response(&token) {
                    Some(ka) => ([(header::CONTENT_TYPE, "text/plain")], ka).into_response(),
                    None => (StatusCode::NOT_FOUND, "no such ACME challenge\n").into_response(),
                }
            }
        };
        r = r.route(
            &format!("{}{{token}}", crate::acme::challenge::HTTP01_PREFIX),
            axum::routing::get(answer),
        );
    }
    r
}

fn simple_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads the first request head (bounded in size and time).
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<RequestHead>, HeadError> {
    loop {
        if let Some(h) = RequestHead::parse(buf)? {
            return Ok(Some(h));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Serves one accepted (and, for TLS, handshaken) connection.
pub async fn serve_connection<S>(
    st: Arc<HttpState>,
    router: Router,
    mut stream: S,
    remote: SocketAddr,
    pending: crate::derp::PendingConn,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(1024);
    let head = match tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read_head(&mut stream, &mut buf))
        .await
    {
        Err(_) => {
            st.derp.metrics.handshake_failure("http_head_timeout");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(h))) => h,
        Ok(Err(e)) => {
            st.derp.metrics.handshake_failure("http_head_invalid");
            let resp = match e {
                HeadError::TooLarge => simple_response("431 Request Header Fields Too Large", ""),
                HeadError::Malformed(_) => simple_response("400 Bad Request", ""),
            };
            let _ = stream.write_all(&resp).await;
            let _ = stream.shutdown().await;
            return;
        }
    };

    if head.path == "/derp" && st.derp_enabled && head.method != "CONNECT" {
        let meta = ConnMeta {
            remote,
            not_ideal: head.ideal_node.as_deref().is_some_and(|v| !v.is_empty()),
        };
        // What followed the head (a fast-start ClientInfo) is copied out so the head buffer is
        // not kept alive for the connection's lifetime by the slice replayed in front of it.
        let rest = Bytes::copy_from_slice(&buf[head.head_len..]);
        buf.truncate(head.head_len);
        match head.derp_upgrade() {
            DerpUpgrade::Refused => {
                if head.upgrade.as_deref().is_some_and(|u| !u.is_empty()) {
                    debug!(upgrade = ?head.upgrade, "weird upgrade header on /derp");
                }
                let r =
                    simple_response("426 Upgrade Required", "DERP requires connection upgrade\n");
                let _ = stream.write_all(&r).await;
                let _ = stream.shutdown().await;
            }
            DerpUpgrade::Classic => {
                let preamble = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {}\r\nDerp-Public-Key: {}\r\n\r\n",
                    derp_proto::frame::PROTOCOL_VERSION,
                    st.derp.public_key.untyped_hex()
                );
                drop(buf);
                st.derp
                    .clone()
                    .serve(
                        Box::new(Rewind::new(rest, stream)),
                        preamble.as_bytes(),
                        meta,
                    )
                    .await;
            }
            DerpUpgrade::FastStart => {
                drop(buf);
                st.derp
                    .clone()
                    .serve(Box::new(Rewind::new(rest, stream)), &[], meta)
                    .await;
            }
            // Boxed: its (tungstenite) state would otherwise size every connection's task.
            DerpUpgrade::WebSocket => {
                Box::pin(serve_websocket(st, buf.freeze(), rest, stream, meta)).await
            }
        }
        return;
    }

    st.derp
        .metrics
        .http_requests
        .get_or_create(&EndpointLabel {
            endpoint: endpoint_label(&head.path),
        })
        .inc();
    // Plain HTTP never becomes a DERP client: shutdown need not wait for it.
    drop(pending);
    // Boxed like the WebSocket path: plain HTTP is rare and hyper's state is large.
    Box::pin(serve_http(router, buf.freeze(), stream)).await;
}

async fn serve_http<S>(router: Router, head: Bytes, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(Rewind::new(head, stream));
    let svc = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .serve_connection(io, svc);
    if let Err(e) = conn.await {
        debug!("http connection: {e}");
    }
}

async fn serve_websocket<S>(st: Arc<HttpState>, head: Bytes, rest: Bytes, stream: S, meta: ConnMeta)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio_tungstenite::tungstenite::handshake::server::{
        ErrorResponse, Request, Response as WsResponse,
    };
    // tungstenite re-reads the whole request itself, so replay the head and what followed.
    let mut replay = BytesMut::with_capacity(head.len() + rest.len());
    replay.extend_from_slice(&head);
    replay.extend_from_slice(&rest);
    // The callback type is tungstenite's; its large error variant is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let negotiate = |req: &Request, mut resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        let offers_derp = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "derp");
        if !offers_derp {
            let mut e =
                ErrorResponse::new(Some("the derp WebSocket subprotocol is required\n".into()));
            *e.status_mut() = StatusCode::BAD_REQUEST;
            return Err(e);
        }
        resp.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("derp"));
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        Rewind::new(replay.freeze(), stream),
        negotiate,
        Some(crate::ws::config()),
    );
    match tokio::time::timeout(REQUEST_HEAD_TIMEOUT, ws).await {
        Ok(Ok(ws)) => {
            st.derp
                .clone()
                .serve(derp_client::ws::WsIo::new(ws), &[], meta)
                .await;
        }
        Ok(Err(e)) => {
            st.derp.metrics.handshake_failure("websocket");
            debug!("websocket handshake: {e}");
        }
        Err(_) => st.derp.metrics.handshake_failure("websocket"),
    }
}

/// How long one bootstrap DNS lookup may take (the resolver's own timeouts can be minutes).
pub const BOOTSTRAP_DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps `/bootstrap-dns` answers fresh until `shutdown`. Lookups run on tokio's blocking pool
/// (getaddrinfo cannot be cancelled), so shutdown stops waiting for them instead of waiting
/// them out: an abandoned lookup finishes on its own and its answer is dropped.
pub async fn refresh_bootstrap_dns(
    st: Arc<HttpState>,
    names: Vec<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if names.is_empty() {
        return;
    }
    loop {
        let mut m = BTreeMap::new();
        for name in &names {
            let lookup = tokio::time::timeout(
                BOOTSTRAP_DNS_LOOKUP_TIMEOUT,
                tokio::net::lookup_host((name.as_str(), 0)),
            );
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = lookup => r.unwrap_or_else(|_| Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {BOOTSTRAP_DNS_LOOKUP_TIMEOUT:?}"),
                ))),
            };
            let ips: Vec<IpAddr> = match result {
                Ok(addrs) => {
                    let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    v.sort();
                    v.dedup();
                    v
                }
                Err(e) => {
                    tracing::warn!(name, "bootstrap DNS lookup failed: {e}");
                    Vec::new()
                }
            };
            m.insert(name.clone(), ips);
        }
        *st.bootstrap_dns.write().await = Some(m);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(BOOTSTRAP_DNS_REFRESH) => {}
        }
    }
}
