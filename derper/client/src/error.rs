//! The one error type of the client. Every failure of connect, handshake, send or receive maps to
//! a variant here; nothing a server sends can make the client panic, it becomes one of these.

use std::io;

use derp_proto::frame::FrameError;
use derp_proto::info::InfoError;

/// Errors from connecting to, or talking with, a DERP server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot be used (bad URL, bad pin, STUN-only node, ...).
    #[error("invalid client config: {0}")]
    Config(String),
    /// Name resolution of the dial host failed or found no address of the wanted family.
    #[error("resolving {host}: {reason}")]
    Resolve { host: String, reason: String },
    /// Every TCP connect attempt failed; the error of the last one.
    #[error("TCP connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (including certificate verification).
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    /// A connect or handshake step did not finish in time.
    #[error("timed out during {step}")]
    Timeout { step: &'static str },
    /// The server answered the upgrade request with something other than 101.
    #[error("upgrade refused: HTTP {status}: {body}")]
    UpgradeRefused { status: u16, body: String },
    /// The upgrade response was not parseable HTTP/1.1.
    #[error("bad HTTP upgrade response: {0}")]
    BadResponse(String),
    /// The WebSocket handshake or transport failed.
    #[error("websocket: {0}")]
    WebSocket(String),
    /// The DERP handshake went wrong (bad greeting, unexpected first frame, ...).
    #[error("DERP handshake: {0}")]
    Handshake(String),
    /// ServerInfo could not be opened or parsed.
    #[error("ServerInfo: {0}")]
    Info(#[from] InfoError),
    /// A frame was malformed in a way that breaks the connection.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The server sent a frame over the 1 MiB cap of Go's client.
    #[error("frame of {len} bytes exceeds the {max}-byte client limit")]
    FrameTooLarge { len: usize, max: usize },
    /// We were asked to send a packet over 64 KiB.
    #[error("packet of {0} bytes exceeds the 65536-byte limit")]
    PacketTooLarge(usize),
    /// No frame arrived within the read timeout.
    #[error("no frame from the server within {0:?}")]
    ReadTimeout(std::time::Duration),
    /// A write did not complete within the write timeout; the connection is no longer usable.
    #[error("write timed out after {0:?}")]
    WriteTimeout(std::time::Duration),
    /// `ping()` got no matching pong in time.
    #[error("no pong within {0:?}")]
    PingTimeout(std::time::Duration),
    /// The server closed the connection.
    #[error("connection closed by server")]
    Eof,
    /// This side was closed, or an earlier write error broke the connection.
    #[error("connection closed: {0}")]
    Closed(String),
    /// Any other I/O error on the established connection.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}
