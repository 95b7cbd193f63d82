//! Client verification through an admission URL (the shape Headscale's `/verify` has): allowed,
//! refused, unreachable (refused by default, admitted with fail-open), errors, mesh bypass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use common::*;
use derp_client::{Client, ClientConfig};
use derp_proto::{MeshKey, NodePrivate, NodePublic};
use derper::config::Config;
use derper::verify::VerifyConfig;

#[derive(Clone, Default)]
struct Admit {
    allowed: Arc<Mutex<Vec<NodePublic>>>,
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
    status: Arc<Mutex<u16>>,
}

async fn verify(
    State(st): State<Admit>,
    Json(v): Json<serde_json::Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    st.seen.lock().unwrap().push(v.clone());
    let status = *st.status.lock().unwrap();
    if status != 200 {
        return axum::http::StatusCode::from_u16(status)
            .unwrap()
            .into_response();
    }
    let key = v["NodePublic"]
        .as_str()
        .and_then(|s| NodePublic::parse_typed(s).ok());
    let allow = key.is_some_and(|k| st.allowed.lock().unwrap().contains(&k));
    Json(serde_json::json!({ "Allow": allow })).into_response()
}

async fn admission_server(st: Admit) -> String {
    *st.status.lock().unwrap() = 200;
    let app = axum::Router::new()
        .route("/verify", axum::routing::post(verify))
        .with_state(st);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}/verify")
}

fn cfg_with(url: &str, fail_open: bool) -> Config {
    let mut c = Config::for_tests();
    c.verify = VerifyConfig {
        url: Some(url.into()),
        url_fail_open: fail_open,
        tailscaled_socket: None,
    };
    c
}

fn refused(s: &derper::server::ServerHandle, label: &'static str) -> u64 {
    s.derp
        .metrics
        .clients_refused
        .get_or_create(&derper::metrics::ReasonLabel { reason: label })
        .get()
}

#[tokio::test]
async fn known_keys_are_admitted_and_unknown_refused() {
    let st = Admit::default();
    let u = admission_server(st.clone()).await;
    let s = server(cfg_with(&u, false)).await;
    let good = NodePrivate::generate();
    st.allowed.lock().unwrap().push(good.public());
    let mut a = connect_as(&url(&s), good.clone()).await;
    a.tx.send_packet(&a.key, b"in").await.unwrap();
    assert_eq!(a.packet().await.1, b"in");
    let seen = st.seen.lock().unwrap().clone();
    assert_eq!(seen[0]["NodePublic"], good.public().to_string());
    assert_eq!(seen[0]["Source"], "127.0.0.1");

    let r = Client::connect(&ClientConfig::new(url(&s), NodePrivate::generate())).await;
    assert!(r.is_err(), "unknown key refused");
    assert_eq!(refused(&s, "url"), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn unreachable_verifier_fails_closed_unless_fail_open() {
    // Nothing listens here.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/verify", l.local_addr().unwrap())
    };
    let s = server(cfg_with(&dead, false)).await;
    let r = Client::connect(&ClientConfig::new(url(&s), NodePrivate::generate())).await;
    assert!(
        r.is_err(),
        "refused when the verifier is down (our default)"
    );
    assert_eq!(refused(&s, "url_unreachable"), 1);
    s.shutdown().await;

    let s = server(cfg_with(&dead, true)).await;
    let _a = connect(&url(&s)).await;
    s.shutdown().await;
}

#[tokio::test]
async fn error_status_refuses_even_with_fail_open_and_mesh_peers_skip_it() {
    let st = Admit::default();
    let u = admission_server(st.clone()).await;
    *st.status.lock().unwrap() = 500;
    let mut cfg = cfg_with(&u, true);
    cfg.mesh = Some(derper::mesh::MeshConfig {
        key: MeshKey::from_bytes([9; 32]),
        peers: vec![],
        peers_file: None,
        ca_file: None,
    });
    let s = server(cfg).await;
    let r = Client::connect(&ClientConfig::new(url(&s), NodePrivate::generate())).await;
    assert!(r.is_err(), "HTTP 500 refuses, fail-open or not (Go's rule)");
    let before = st.seen.lock().unwrap().len();
    let mut mesh = ClientConfig::new(url(&s), NodePrivate::generate());
    mesh.mesh_key = Some(MeshKey::from_bytes([9; 32]));
    let _m = connect_with(mesh).await;
    assert_eq!(
        st.seen.lock().unwrap().len(),
        before,
        "mesh peers are not sent to the verifier"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn decisions_are_cached_briefly() {
    let st = Admit::default();
    let u = admission_server(st.clone()).await;
    let s = server(cfg_with(&u, false)).await;
    let k = NodePrivate::generate();
    st.allowed.lock().unwrap().push(k.public());
    for _ in 0..5 {
        let p = connect_as(&url(&s), k.clone()).await;
        p.tx.close().await.unwrap();
    }
    assert_eq!(
        st.seen.lock().unwrap().len(),
        1,
        "one verifier call for five connects"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.shutdown().await;
}
