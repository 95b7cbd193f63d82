//! A DERP client speaking the same wire protocol as Tailscale's `derphttp`: TCP or TLS (Web PKI,
//! extra CA, `sha256-raw:` pin, or insecure), the `/derp` upgrade or fast start from the TLS 1.3
//! meta certificate, or WebSocket; the ClientInfo/ServerInfo handshake; then a cloneable write
//! handle and a receiver. The frames themselves come from `derp-proto`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), derp_client::ClientError> {
//! use derp_client::{Client, ClientConfig, TlsTrust};
//! use derp_proto::NodePrivate;
//! let mut cfg = ClientConfig::new("https://127.0.0.1:8443/derp", NodePrivate::generate());
//! cfg.tls = TlsTrust::from_sha256_raw("sha256-raw:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")?;
//! let (tx, mut rx) = Client::connect(&cfg).await?.split();
//! tx.send_packet(&tx.public_key(), b"hello me").await?;
//! let frame = rx.recv().await?;
//! # let _ = frame; Ok(()) }
//! ```

mod client;
mod config;
mod error;
pub mod tls;
mod upgrade;
pub mod ws;

pub use client::{Client, ClientHandle, ClientReceiver, ConnInfo};
pub use config::{
    AddrFamily, ClientConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_WRITE_TIMEOUT,
    Transport,
};
pub use derp_proto::frame::{PeerGoneReason, ServerToClient};
pub use error::ClientError;
pub use tls::TlsTrust;
