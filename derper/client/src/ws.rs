//! DERP over WebSocket (spec §4.4): the handshake (`Upgrade: websocket`, subprotocol `derp`) and
//! an adapter that turns binary messages into a byte stream, so the rest of the client reads and
//! writes frames exactly as over the raw upgrade. Message boundaries carry no meaning.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::ClientError;

/// Largest message we send. Go's server (coder/websocket) closes with 1009 on any received
/// message over 32 768 bytes, and a 64 KiB packet would be one such message, so writes are cut
/// into 16 KiB messages; the receiver reassembles the stream anyway.
pub const MAX_WS_MESSAGE_BYTES: usize = 16 << 10;

/// Runs the WebSocket client handshake over an established (TLS) stream.
pub(crate) async fn handshake<S>(
    stream: S,
    tls: bool,
    authority: &str,
    path_and_query: &str,
) -> Result<WsIo<S>, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let scheme = if tls { "wss" } else { "ws" };
    let mut req = format!("{scheme}://{authority}{path_and_query}")
        .into_client_request()
        .map_err(|e| ClientError::WebSocket(format!("request: {e}")))?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("derp"));
    let (ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| ClientError::WebSocket(format!("handshake: {e}")))?;
    let proto = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if proto != Some("derp") {
        return Err(ClientError::WebSocket(format!(
            "server negotiated subprotocol {proto:?}, want \"derp\""
        )));
    }
    Ok(WsIo::new(ws))
}

/// A WebSocket connection seen as a byte stream. The server uses it too, for the same reasons:
/// binary messages only, boundaries meaningless, writes cut to 16 KiB messages that every Go
/// peer accepts.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// Unread rest of the last binary message.
    rbuf: Bytes,
    eof: bool,
    /// Our close frame (1000, normal) is queued; then only flushing remains.
    close_sent: bool,
}

impl<S> WsIo<S> {
    /// Wraps an established WebSocket (after either side's handshake).
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsIo {
            ws,
            rbuf: Bytes::new(),
            eof: false,
            close_sent: false,
        }
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.rbuf.is_empty() {
                let n = self.rbuf.len().min(buf.remaining());
                buf.put_slice(&self.rbuf[..n]);
                self.rbuf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => self.eof = true,
                Some(Ok(Message::Binary(b))) => self.rbuf = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a DERP websocket",
                    )));
                }
                // Control frames are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_err)?;
        let n = buf.len().min(MAX_WS_MESSAGE_BYTES);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(ws_err)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A status code, so the server logs a normal close rather than "no status received".
        if !self.close_sent {
            ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_err)?;
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            Pin::new(&mut self.ws)
                .start_send(Message::Close(Some(frame)))
                .map_err(ws_err)?;
            self.close_sent = true;
        }
        Pin::new(&mut self.ws).poll_close(cx).map_err(ws_err)
    }
}
