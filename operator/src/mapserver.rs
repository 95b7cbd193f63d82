//! The map server every operator replica runs: `GET /derpmap.json` (the exact `tailcfg.DERPMap`
//! JSON Headscale's `derp.urls` fetches, with a strong ETag and `If-None-Match` → 304, gzip when
//! the client accepts it), `/healthz`, `/readyz` (ready once the first map was built from synced
//! caches, because Headscale refuses to start on an empty or failed fetch) and `/metrics`.
//! Requests never reach the API server: they read the latest snapshot, which the map builder
//! publishes through a `watch` channel.

use std::future::Future;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use derp_proto::derpmap::DerpMap;
use flate2::Compression;
use flate2::write::GzEncoder;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::warn;

use crate::metrics::Shared;

/// One built map, serialised once and served many times. The bodies are `Bytes`, so a response
/// shares them instead of copying up to a megabyte per request.
#[derive(Debug, Clone)]
pub struct MapSnapshot {
    pub json: Bytes,
    /// Strong ETag of the plain JSON: quoted hex of the first 16 bytes of SHA-256 over it, so
    /// equal maps on different replicas (and across restarts) carry the same tag.
    pub etag: String,
    /// ETag of the gzip variant. A strong ETag promises byte-identical content (RFC 9110 8.8.1),
    /// and the gzip body is a different sequence of bytes than the plain one, so the two variants
    /// must not share a tag (a cache could otherwise answer a plain request with gzip bytes it
    /// revalidated under the plain tag). Derived from the plain tag, so it is as stable across
    /// replicas as that one (the compressor is deterministic for equal input and version).
    pub etag_gzip: String,
    /// The gzip body, made on the first request that accepts gzip (at most once per map change):
    /// most map changes are never fetched (a cold start publishes hundreds of intermediate maps
    /// within seconds), and Headscale asks only every few minutes.
    gzip: OnceLock<Option<Bytes>>,
    pub regions: usize,
    pub nodes: usize,
}

impl PartialEq for MapSnapshot {
    fn eq(&self, other: &Self) -> bool {
        // The gzip body follows from the JSON.
        self.json == other.json && self.regions == other.regions && self.nodes == other.nodes
    }
}

impl Eq for MapSnapshot {}

impl MapSnapshot {
    pub fn new(map: &DerpMap) -> Result<Self, serde_json::Error> {
        let json = map.to_json()?;
        let digest = Sha256::digest(json.as_bytes());
        let hex = hex::encode(&digest[..16]);
        Ok(Self {
            etag: format!("\"{hex}\""),
            etag_gzip: format!("\"{hex}-gzip\""),
            json: Bytes::from(json),
            gzip: OnceLock::new(),
            regions: map.regions.len(),
            nodes: map.regions.values().map(|r| r.nodes.len()).sum(),
        })
    }

    /// The gzip body (made once). `None` if compressing failed, which writing to memory does not
    /// do in practice; the caller then serves the plain body.
    pub fn gzip(&self) -> Option<&Bytes> {
        self.gzip
            .get_or_init(|| match gzip(&self.json) {
                Ok(b) => Some(b),
                Err(e) => {
                    warn!("compressing the map: {e}");
                    None
                }
            })
            .as_ref()
    }
}

/// Gzip at the default level: a few milliseconds per megabyte of map, once per map change, and
/// JSON this repetitive shrinks ~10x; the best level costs several times more for a few percent.
/// No file name and mtime 0 in the header, so equal input gives equal bytes.
fn gzip(data: &[u8]) -> std::io::Result<Bytes> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 8), Compression::default());
    enc.write_all(data)?;
    Ok(Bytes::from(enc.finish()?))
}

/// Whether an `Accept-Encoding` value admits gzip: `gzip` (or the legacy `x-gzip`) or `*` with a
/// non-zero quality. An explicit `gzip;q=0` refuses it even when `*` is listed.
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    let mut star = false;
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or_default().trim();
        let q_positive = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim().eq_ignore_ascii_case("q").then(|| v.trim())
            })
            .next_back()
            // An unparsable quality counts as absent (q=1): the client asked for the coding.
            .is_none_or(|v| v.parse::<f32>().map_or(true, |q| q > 0.0));
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            return q_positive;
        }
        if coding == "*" {
            star = q_positive;
        }
    }
    star
}

/// Shared state of the handlers. `None` in the channel means "no map built yet" (caches not
/// synced): `/derpmap.json` and `/readyz` answer 503 so no Headscale ever sees an empty map.
#[derive(Clone)]
pub struct MapServerState {
    snapshot: watch::Receiver<Option<Arc<MapSnapshot>>>,
    /// Why the served map is the last good one rather than the latest build.
    held: Option<watch::Receiver<Option<String>>>,
    counters: Arc<Counters>,
    /// The operator's own series, after the map server's.
    extra_metrics: Vec<Shared>,
}

#[derive(Default)]
struct Counters {
    full: AtomicU64,
    /// Of `full`, the answers sent gzip-encoded.
    gzip: AtomicU64,
    not_modified: AtomicU64,
    unavailable: AtomicU64,
}

impl MapServerState {
    pub fn new(snapshot: watch::Receiver<Option<Arc<MapSnapshot>>>) -> Self {
        Self {
            snapshot,
            held: None,
            counters: Arc::default(),
            extra_metrics: Vec::new(),
        }
    }

    /// Reports in `/readyz` and `derpfleet_map_held` why the map task holds the last good map.
    pub fn with_held(mut self, held: watch::Receiver<Option<String>>) -> Self {
        self.held = Some(held);
        self
    }

    fn held(&self) -> Option<String> {
        self.held.as_ref().and_then(|h| h.borrow().clone())
    }

    /// Adds `c`'s series to every `/metrics` answer.
    pub fn with_metrics(mut self, c: Arc<dyn Collector>) -> Self {
        self.extra_metrics.push(Shared(c));
        self
    }
}

pub fn router(state: MapServerState) -> Router {
    Router::new()
        .route("/derpmap.json", get(derpmap))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MapServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn current(state: &MapServerState) -> Option<Arc<MapSnapshot>> {
    state.snapshot.borrow().clone()
}

/// Whether an `If-None-Match` value names `etag` (a list of tags, or `*`).
fn matches_etag(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

async fn derpmap(State(state): State<MapServerState>, headers: HeaderMap) -> Response {
    let Some(snap) = current(&state) else {
        state.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "map not built yet\n").into_response();
    };
    let want_gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(accepts_gzip);
    let gz = if want_gzip { snap.gzip() } else { None };
    let tag = if gz.is_some() {
        &snap.etag_gzip
    } else {
        &snap.etag
    };
    let etag = HeaderValue::from_str(tag).unwrap_or(HeaderValue::from_static("\"\""));
    // The answer depends on Accept-Encoding: shared caches must key on it.
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    let inm = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if inm.is_some_and(|v| matches_etag(v, tag)) {
        state.counters.not_modified.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag), vary]).into_response();
    }
    state.counters.full.fetch_add(1, Ordering::Relaxed);
    let common = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::ETAG, etag),
        // Clients may cache but must revalidate: the map changes with pod readiness.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        vary,
    ];
    match gz {
        Some(body) => {
            state.counters.gzip.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::OK,
                common,
                [(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"))],
                Body::from(body.clone()),
            )
                .into_response()
        }
        None => (StatusCode::OK, common, Body::from(snap.json.clone())).into_response(),
    }
}

/// Ready while a map is served, held or not: a held map is the last good one, and taking the
/// replica out of the Service would make Headscale's fetch fail instead (fatal when it starts).
/// The body says when the map is held; no answer here is JSON.
async fn readyz(State(state): State<MapServerState>) -> Response {
    match (current(&state), state.held()) {
        (Some(_), None) => (StatusCode::OK, "ok\n").into_response(),
        (Some(_), Some(why)) => (StatusCode::OK, format!("ok, held: {why}\n")).into_response(),
        (None, None) => (StatusCode::SERVICE_UNAVAILABLE, "map not built yet\n").into_response(),
        (None, Some(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no map to serve: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<MapServerState>) -> Response {
    match metrics_text(&state) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The `/metrics` exposition: the map server's own series, then the operator's.
pub fn metrics_text(state: &MapServerState) -> Result<String, std::fmt::Error> {
    let snap = current(state);
    let c = &state.counters;
    let own = ServedMetrics {
        ok: c.full.load(Ordering::Relaxed),
        not_modified: c.not_modified.load(Ordering::Relaxed),
        unavailable: c.unavailable.load(Ordering::Relaxed),
        gzip: c.gzip.load(Ordering::Relaxed),
        regions: snap.as_ref().map_or(0, |s| s.regions),
        nodes: snap.as_ref().map_or(0, |s| s.nodes),
        held: state.held().is_some(),
    };
    let own = Shared(Arc::new(own));
    crate::metrics::encode(std::iter::once(own).chain(state.extra_metrics.iter().cloned()))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The map server's series, as read at one scrape.
#[derive(Debug)]
struct ServedMetrics {
    ok: u64,
    not_modified: u64,
    unavailable: u64,
    gzip: u64,
    regions: usize,
    nodes: usize,
    held: bool,
}

impl Collector for ServedMetrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::{counter, counter_family, gauge};
        let results = [
            ("ok", self.ok),
            ("not_modified", self.not_modified),
            ("unavailable", self.unavailable),
        ];
        counter_family(
            &mut e,
            "derpfleet_map_requests",
            "Requests for /derpmap.json by result.",
            results.map(|(result, n)| (ResultLabel { result }, n)),
        )?;
        counter(
            &mut e,
            "derpfleet_map_gzip_responses",
            "Full map answers sent gzip-encoded.",
            self.gzip,
        )?;
        gauge(
            &mut e,
            "derpfleet_map_regions",
            "Regions in the served map.",
            self.regions,
        )?;
        gauge(
            &mut e,
            "derpfleet_map_nodes",
            "Nodes in the served map.",
            self.nodes,
        )?;
        gauge(
            &mut e,
            "derpfleet_map_held",
            "Whether the served map is the last good one because the latest build has no region \
             while DerpRegions exist.",
            i64::from(self.held),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use derp_proto::derpmap::{DerpNode, DerpRegion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn map() -> DerpMap {
        let mut m = DerpMap::default();
        m.regions.insert(
            900,
            DerpRegion {
                region_id: 900,
                region_code: "home".into(),
                region_name: "Home".into(),
                nodes: vec![DerpNode {
                    name: "900-a".into(),
                    region_id: 900,
                    host_name: "198.51.100.1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        m
    }

    /// One HTTP/1.1 request over a fresh connection; returns (status line, whole response).
    async fn get(addr: std::net::SocketAddr, path: &str, extra: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        (buf.lines().next().unwrap_or_default().to_string(), buf)
    }

    #[tokio::test]
    async fn serves_map_with_etag_and_304_and_is_unready_before_the_first_map() {
        let (tx, rx) = watch::channel(None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, MapServerState::new(rx), async {
            let _ = stop_rx.await;
        }));

        assert!(get(addr, "/readyz", "").await.0.contains("503"));
        assert!(get(addr, "/derpmap.json", "").await.0.contains("503"));
        assert!(get(addr, "/healthz", "").await.0.contains("200"));

        let snap = MapSnapshot::new(&map()).unwrap();
        tx.send(Some(Arc::new(snap.clone()))).unwrap();
        assert!(get(addr, "/readyz", "").await.0.contains("200"));
        let (status, body) = get(addr, "/derpmap.json", "").await;
        assert!(status.contains("200"), "{body}");
        assert!(
            body.to_ascii_lowercase()
                .contains(&format!("etag: {}", snap.etag))
        );
        assert!(body.ends_with(&map().to_json().unwrap()), "{body}");

        let inm = format!("If-None-Match: {}\r\n", snap.etag);
        let (status, _) = get(addr, "/derpmap.json", &inm).await;
        assert!(status.contains("304"), "{status}");
        let (status, _) = get(addr, "/derpmap.json", "If-None-Match: \"other\"\r\n").await;
        assert!(status.contains("200"));

        let (_, m) = get(addr, "/metrics", "").await;
        assert!(
            m.contains("derpfleet_map_requests_total{result=\"not_modified\"} 1"),
            "{m}"
        );
        assert!(m.contains("derpfleet_map_nodes 1"));

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// One HTTP/1.1 request over a fresh connection; returns (status line, lower-cased header
    /// block, body bytes). The body may be gzip, so it is not read as text.
    async fn get_raw(
        addr: std::net::SocketAddr,
        path: &str,
        extra: &str,
    ) -> (String, String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(buf[..split].to_vec()).unwrap();
        let status = head.lines().next().unwrap_or_default().to_string();
        (status, head.to_ascii_lowercase(), buf[split + 4..].to_vec())
    }

    fn gunzip(b: &[u8]) -> Vec<u8> {
        use std::io::Read as _;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn gzip_variant_has_its_own_etag_vary_and_304() {
        let (_tx, rx) = watch::channel(Some(Arc::new(MapSnapshot::new(&map()).unwrap())));
        let snap = MapSnapshot::new(&map()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, MapServerState::new(rx), async {
            let _ = stop_rx.await;
        }));
        let plain = map().to_json().unwrap().into_bytes();

        // Go's net/http client sends exactly this and decompresses transparently.
        let (status, head, body) =
            get_raw(addr, "/derpmap.json", "Accept-Encoding: gzip\r\n").await;
        assert!(status.contains("200"), "{status}");
        assert!(head.contains("content-encoding: gzip"), "{head}");
        assert!(head.contains("vary: accept-encoding"), "{head}");
        assert!(
            head.contains(&format!("etag: {}", snap.etag_gzip)),
            "{head}"
        );
        assert_ne!(snap.etag, snap.etag_gzip);
        assert_eq!(
            gunzip(&body),
            plain,
            "gzip must decode to the exact plain body"
        );

        // No Accept-Encoding, a refused gzip, or another coding only: identity.
        for extra in [
            "",
            "Accept-Encoding: gzip;q=0\r\n",
            "Accept-Encoding: gzip; q=0.0, *\r\n",
            "Accept-Encoding: br, deflate\r\n",
            "Accept-Encoding: identity\r\n",
        ] {
            let (status, head, body) = get_raw(addr, "/derpmap.json", extra).await;
            assert!(status.contains("200"), "{extra}: {status}");
            assert!(!head.contains("content-encoding"), "{extra}: {head}");
            assert!(head.contains("vary: accept-encoding"), "{extra}: {head}");
            assert!(
                head.contains(&format!("etag: {}", snap.etag)),
                "{extra}: {head}"
            );
            assert_eq!(body, plain, "{extra}");
        }

        // 304 for the tag of the variant the request selects, and only for it.
        let gz_inm = format!(
            "Accept-Encoding: gzip\r\nIf-None-Match: {}\r\n",
            snap.etag_gzip
        );
        let (status, head, body) = get_raw(addr, "/derpmap.json", &gz_inm).await;
        assert!(status.contains("304"), "{status}");
        assert!(
            head.contains(&format!("etag: {}", snap.etag_gzip)),
            "{head}"
        );
        assert!(head.contains("vary: accept-encoding"), "{head}");
        assert!(body.is_empty());
        let plain_inm = format!("If-None-Match: {}\r\n", snap.etag);
        assert!(
            get_raw(addr, "/derpmap.json", &plain_inm)
                .await
                .0
                .contains("304")
        );
        // A plain tag does not validate the gzip variant (different bytes), nor the reverse.
        let crossed = format!("Accept-Encoding: gzip\r\nIf-None-Match: {}\r\n", snap.etag);
        let (status, head, body) = get_raw(addr, "/derpmap.json", &crossed).await;
        assert!(status.contains("200") && head.contains("content-encoding: gzip"));
        assert_eq!(gunzip(&body), plain);
        let crossed = format!("If-None-Match: {}\r\n", snap.etag_gzip);
        assert!(
            get_raw(addr, "/derpmap.json", &crossed)
                .await
                .0
                .contains("200")
        );

        let (_, m) = get(addr, "/metrics", "").await;
        assert!(m.contains("derpfleet_map_gzip_responses_total 2"), "{m}");

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// Headscale decodes any body as a map whatever the status: no answer but a served map may
    /// be JSON, and a held map keeps being served while `/readyz` and `/metrics` say so.
    #[tokio::test]
    async fn error_answers_are_never_json_and_a_held_map_is_served_and_reported() {
        let (tx, rx) = watch::channel(None);
        let (held_tx, held_rx) = watch::channel(None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = MapServerState::new(rx).with_held(held_rx);
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stop_rx.await;
        }));
        let body_of = |resp: &str| resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        let not_json = |b: &str| serde_json::from_str::<serde_json::Value>(b).is_err();

        // Nothing to serve yet, held or not; unknown paths; other methods.
        held_tx.send_replace(Some("no region".into()));
        for (path, want) in [
            ("/derpmap.json", "503"),
            ("/readyz", "503"),
            ("/nope", "404"),
        ] {
            let (status, resp) = get(addr, path, "").await;
            assert!(status.contains(want), "{path}: {status}");
            assert!(not_json(&body_of(&resp)), "{path}: {resp}");
        }
        let (_, readyz) = get(addr, "/readyz", "").await;
        assert!(readyz.contains("no map to serve: no region"), "{readyz}");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /derpmap.json HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
        assert!(not_json(&body_of(&resp)), "{resp}");

        // A held map: served, ready, and said so.
        tx.send_replace(Some(Arc::new(MapSnapshot::new(&map()).unwrap())));
        let (status, resp) = get(addr, "/derpmap.json", "").await;
        assert!(status.contains("200") && resp.ends_with(&map().to_json().unwrap()));
        let (status, readyz) = get(addr, "/readyz", "").await;
        assert!(
            status.contains("200") && readyz.contains("ok, held: no region"),
            "{readyz}"
        );
        assert!(
            get(addr, "/metrics", "")
                .await
                .1
                .contains("derpfleet_map_held 1")
        );
        held_tx.send_replace(None);
        assert!(get(addr, "/readyz", "").await.1.ends_with("\r\n\r\nok\n"));
        assert!(
            get(addr, "/metrics", "")
                .await
                .1
                .contains("derpfleet_map_held 0")
        );

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn gzip_body_is_the_same_for_equal_maps() {
        // Replicas must serve the same bytes under the same tag.
        let a = MapSnapshot::new(&map()).unwrap();
        let b = MapSnapshot::new(&map()).unwrap();
        assert_eq!(a.gzip(), b.gzip());
        assert_eq!(a.etag_gzip, b.etag_gzip);
        assert_eq!(gunzip(a.gzip().unwrap()), a.json.to_vec());
    }

    #[test]
    fn accept_encoding_parsing() {
        for yes in [
            "gzip",
            "GZIP",
            "gzip, deflate",
            "deflate, gzip;q=0.5",
            "x-gzip",
            "*",
            "br;q=1, *;q=0.1",
            "gzip;q=junk",
        ] {
            assert!(accepts_gzip(yes), "{yes}");
        }
        for no in [
            "",
            "identity",
            "br, deflate",
            "gzip;q=0",
            "gzip; q=0.000",
            "*;q=0",
            "gzip;q=0, *",
            "*, gzip;q=0",
        ] {
            assert!(!accepts_gzip(no), "{no}");
        }
    }

    #[test]
    fn etag_is_stable_for_equal_maps() {
        assert_eq!(
            MapSnapshot::new(&map()).unwrap(),
            MapSnapshot::new(&map()).unwrap()
        );
        let mut other = map();
        other.omit_default_regions = true;
        assert_ne!(
            MapSnapshot::new(&other).unwrap().etag,
            MapSnapshot::new(&map()).unwrap().etag
        );
        assert!(matches_etag("\"a\", W/\"b\"", "\"b\""));
        assert!(!matches_etag("\"a\"", "\"b\""));
    }
}
