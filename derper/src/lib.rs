//! The derper server: listeners, TLS, HTTP, the DERP connection registry and STUN.
//! The wire format lives in `derp-proto`; this crate does the I/O.

pub mod acme;
pub mod certs;
pub mod cli;
pub mod config;
pub mod derp;
pub mod handoff;
pub mod http;
pub mod io;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod signals;
pub mod stun_server;
pub mod verify;
pub mod ws;
