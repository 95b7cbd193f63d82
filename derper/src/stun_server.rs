//! The STUN server: answers exactly the binding requests Tailscale clients send, ignores
//! everything else, and never answers faster than its rate limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derp_proto::stun;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::{Metrics, ReasonLabel};

/// Datagrams up to 64 KiB are read (Go's buffer); anything that long is not a request anyway.
const RECV_BUF_BYTES: usize = 64 << 10;

/// A token bucket over whole responses.
struct Limiter {
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl Limiter {
    fn allow(&mut self) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let burst = self.per_sec.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_sec).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn count(m: &Metrics, reason: &'static str) {
    m.stun_requests.get_or_create(&ReasonLabel { reason }).inc();
}

/// Serves until `shutdown`. `rate_limit` is responses per second (0 = unlimited).
pub async fn run(
    sock: Arc<UdpSocket>,
    metrics: Arc<Metrics>,
    rate_limit: f64,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUF_BYTES];
    let mut out = [0u8; stun::MAX_RESPONSE_LEN];
    let mut limiter = Limiter {
        per_sec: rate_limit,
        tokens: rate_limit.max(1.0),
        at: Instant::now(),
    };
    loop {
        let (n, from): (usize, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // Go logs, sleeps a second and goes on; ICMP errors from earlier sends land here.
                    warn!("STUN read error: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let pkt = &buf[..n];
        let tx = match stun::parse_binding_request(pkt) {
            Ok(tx) => tx,
            Err(stun::StunError::NotStun) => {
                count(&metrics, "not_stun");
                continue;
            }
            Err(_) => {
                count(&metrics, "not_tailscale");
                continue;
            }
        };
        if !limiter.allow() {
            count(&metrics, "rate_limited");
            continue;
        }
        let len = stun::write_response(&tx, from, &mut out);
        match sock.send_to(&out[..len], from).await {
            Ok(_) => count(
                &metrics,
                if from.is_ipv4() || from.ip().to_canonical().is_ipv4() {
                    "ok_ipv4"
                } else {
                    "ok_ipv6"
                },
            ),
            Err(_) => count(&metrics, "send_error"),
        }
    }
}
