//! The map server every operator replica runs: `GET /derpmap.json` (the exact `tailcfg.DERPMap`
//! JSON Headscale's `derp.urls` fetches, with a strong ETag and `If-None-Match` → 304), `/healthz`,
//! `/readyz` (ready once the first map was built from synced caches, because Headscale refuses to
//! start on an empty or failed fetch) and `/metrics`. Requests never reach the API server: they
//! read the latest snapshot, which the map builder publishes through a `watch` channel.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use derp_proto::derpmap::DerpMap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// One built map, serialised once and served many times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSnapshot {
    pub json: Arc<str>,
    /// Strong ETag: quoted hex of the first 16 bytes of SHA-256 over the JSON, so equal maps on
    /// different replicas (and across restarts) carry the same tag.
    pub etag: String,
    pub regions: usize,
    pub nodes: usize,
}

impl MapSnapshot {
    pub fn new(map: &DerpMap) -> Self {
        let json = map.to_json();
        let digest = Sha256::digest(json.as_bytes());
        Self {
            etag: format!("\"{}\"", hex::encode(&digest[..16])),
            json: json.into(),
            regions: map.regions.len(),
            nodes: map.regions.values().map(|r| r.nodes.len()).sum(),
        }
    }
}

/// Shared state of the handlers. `None` in the channel means "no map built yet" (caches not
/// synced): `/derpmap.json` and `/readyz` answer 503 so no Headscale ever sees an empty map.
#[derive(Clone)]
pub struct MapServerState {
    snapshot: watch::Receiver<Option<Arc<MapSnapshot>>>,
    counters: Arc<Counters>,
    extra_metrics: Option<ExtraMetrics>,
}

/// More Prometheus text appended to `/metrics` (the operator's own counters).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Default)]
struct Counters {
    full: AtomicU64,
    not_modified: AtomicU64,
    unavailable: AtomicU64,
}

impl MapServerState {
    pub fn new(snapshot: watch::Receiver<Option<Arc<MapSnapshot>>>) -> Self {
        Self {
            snapshot,
            counters: Arc::default(),
            extra_metrics: None,
        }
    }

    /// Appends `f()` to every `/metrics` answer.
    pub fn with_extra_metrics(mut self, f: ExtraMetrics) -> Self {
        self.extra_metrics = Some(f);
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
    let etag = HeaderValue::from_str(&snap.etag).unwrap_or(HeaderValue::from_static("\"\""));
    let inm = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if inm.is_some_and(|v| matches_etag(v, &snap.etag)) {
        state.counters.not_modified.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    state.counters.full.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            // Clients may cache but must revalidate: the map changes with pod readiness.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        snap.json.to_string(),
    )
        .into_response()
}

async fn readyz(State(state): State<MapServerState>) -> Response {
    match current(&state) {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "map not built yet\n").into_response(),
    }
}

async fn metrics(State(state): State<MapServerState>) -> Response {
    let snap = current(&state);
    let c = &state.counters;
    let mut body = format!(
        "# HELP derpfleet_map_requests_total Requests for /derpmap.json by result.\n\
         # TYPE derpfleet_map_requests_total counter\n\
         derpfleet_map_requests_total{{result=\"ok\"}} {}\n\
         derpfleet_map_requests_total{{result=\"not_modified\"}} {}\n\
         derpfleet_map_requests_total{{result=\"unavailable\"}} {}\n\
         # HELP derpfleet_map_regions Regions in the served map.\n\
         # TYPE derpfleet_map_regions gauge\n\
         derpfleet_map_regions {}\n\
         # HELP derpfleet_map_nodes Nodes in the served map.\n\
         # TYPE derpfleet_map_nodes gauge\n\
         derpfleet_map_nodes {}\n",
        c.full.load(Ordering::Relaxed),
        c.not_modified.load(Ordering::Relaxed),
        c.unavailable.load(Ordering::Relaxed),
        snap.as_ref().map_or(0, |s| s.regions),
        snap.as_ref().map_or(0, |s| s.nodes),
    );
    if let Some(f) = &state.extra_metrics {
        body.push_str(&f());
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
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

        let snap = MapSnapshot::new(&map());
        tx.send(Some(Arc::new(snap.clone()))).unwrap();
        assert!(get(addr, "/readyz", "").await.0.contains("200"));
        let (status, body) = get(addr, "/derpmap.json", "").await;
        assert!(status.contains("200"), "{body}");
        assert!(
            body.to_ascii_lowercase()
                .contains(&format!("etag: {}", snap.etag))
        );
        assert!(body.ends_with(&map().to_json()), "{body}");

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

    #[test]
    fn etag_is_stable_for_equal_maps() {
        assert_eq!(MapSnapshot::new(&map()), MapSnapshot::new(&map()));
        let mut other = map();
        other.omit_default_regions = true;
        assert_ne!(MapSnapshot::new(&other).etag, MapSnapshot::new(&map()).etag);
        assert!(matches_etag("\"a\", W/\"b\"", "\"b\""));
        assert!(!matches_etag("\"a\"", "\"b\""));
    }
}
