//! DERP over WebSocket, server side: the limits for accepting a WebSocket. The byte-stream
//! adapter over binary messages is `derp_client::ws::WsIo`, shared with the client.

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Go's server takes 32 KiB messages; we are lenient (a 64 KiB packet can be one message) but
/// still bounded, since this is read before any authentication.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

pub fn config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(MAX_MESSAGE_BYTES);
    c.max_frame_size = Some(MAX_MESSAGE_BYTES);
    c
}
