//! Abuse limits: the accept rate (Go's `-accept-connection-limit/-burst`) and the per-client
//! receive rate (Go's `-rate-config` file, reloaded on SIGHUP). When a client's bucket is empty
//! the server stops reading from it (TCP back-pressure); nothing is dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Go raises the burst to at least one maximal frame, or a big packet could never pass.
pub const MIN_BURST_BYTES: u64 = 65_568;

/// A token bucket; `rate` per second, up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes `n` tokens if there are enough.
    pub fn try_take(&mut self, n: f64) -> bool {
        self.refill();
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens now (may go negative) and says how long to wait until the debt is paid.
    pub fn take_with_delay(&mut self, n: f64) -> Duration {
        self.refill();
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    pub fn set(&mut self, rate: f64, burst: f64) {
        self.refill();
        self.rate = rate;
        self.burst = burst;
        self.tokens = self.tokens.min(burst);
    }
}

/// The per-client receive limit, shared by every connection and swapped on reload.
#[derive(Debug, Default)]
pub struct ReceiveLimit {
    bytes_per_sec: AtomicU64,
    burst: AtomicU64,
    /// Bumped on every change so readers notice without locking.
    generation: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateConfig {
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RateConfigError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path}: {detail} (expected {{\"PerClientRateLimitBytesPerSec\": N, \"PerClientRateBurstBytes\": M}})"
    )]
    Parse { path: PathBuf, detail: String },
}

/// Parses Go's rate-config JSON. Both fields optional and unsigned; 0 bytes/s disables.
pub fn parse_rate_config(text: &[u8], path: &Path) -> Result<RateConfig, RateConfigError> {
    let err = |detail: String| RateConfigError::Parse {
        path: path.to_path_buf(),
        detail,
    };
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| err(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| err("not a JSON object".into()))?;
    let mut rc = RateConfig::default();
    for (k, v) in obj {
        let slot = if k.eq_ignore_ascii_case("PerClientRateLimitBytesPerSec") {
            &mut rc.bytes_per_sec
        } else if k.eq_ignore_ascii_case("PerClientRateBurstBytes") {
            &mut rc.burst_bytes
        } else {
            continue;
        };
        *slot = v
            .as_u64()
            .ok_or_else(|| err(format!("{k} must be a non-negative integer")))?;
    }
    Ok(rc)
}

pub fn load_rate_config(path: &Path) -> Result<RateConfig, RateConfigError> {
    let text = std::fs::read(path).map_err(|error| RateConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse_rate_config(&text, path)
}

impl ReceiveLimit {
    pub fn set(&self, rc: RateConfig) {
        self.bytes_per_sec
            .store(rc.bytes_per_sec, Ordering::Relaxed);
        self.burst
            .store(rc.burst_bytes.max(MIN_BURST_BYTES), Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// (bytes per second, burst); rate 0 means unlimited.
    pub fn get(&self) -> (u64, u64) {
        (
            self.bytes_per_sec.load(Ordering::Relaxed),
            self.burst.load(Ordering::Relaxed),
        )
    }
}

/// A reader's view of the receive limit.
pub struct ReaderLimit {
    generation: u64,
    bucket: Option<TokenBucket>,
}

impl ReaderLimit {
    pub fn new() -> Self {
        ReaderLimit {
            generation: u64::MAX,
            bucket: None,
        }
    }

    /// How long to pause before handling a frame of `len` bytes.
    pub fn delay_for(&mut self, shared: &ReceiveLimit, len: usize) -> Duration {
        let g = shared.generation();
        if g != self.generation {
            self.generation = g;
            let (rate, burst) = shared.get();
            self.bucket = match (rate, &mut self.bucket) {
                (0, _) => None,
                (r, Some(b)) => {
                    b.set(r as f64, burst as f64);
                    self.bucket.take()
                }
                (r, None) => Some(TokenBucket::new(r as f64, burst as f64)),
            };
        }
        match &mut self.bucket {
            None => Duration::ZERO,
            Some(b) => b.take_with_delay(len.min(MIN_BURST_BYTES as usize) as f64),
        }
    }
}

impl Default for ReaderLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_config_like_go() {
        let p = Path::new("rate.json");
        let rc = parse_rate_config(
            br#"{"PerClientRateLimitBytesPerSec": 1000, "PerClientRateBurstBytes": 10}"#,
            p,
        )
        .unwrap();
        assert_eq!(
            rc,
            RateConfig {
                bytes_per_sec: 1000,
                burst_bytes: 10
            }
        );
        assert_eq!(parse_rate_config(b"{}", p).unwrap(), RateConfig::default());
        assert!(parse_rate_config(br#"{"PerClientRateLimitBytesPerSec": -1}"#, p).is_err());
        let e = parse_rate_config(b"nope", p).unwrap_err().to_string();
        assert!(e.starts_with("rate.json:"), "{e}");
        let shared = ReceiveLimit::default();
        shared.set(rc);
        assert_eq!(shared.get(), (1000, MIN_BURST_BYTES));
    }

    #[tokio::test(start_paused = true)]
    async fn reader_pauses_when_over_budget() {
        let shared = ReceiveLimit::default();
        let mut r = ReaderLimit::new();
        assert_eq!(
            r.delay_for(&shared, 1_000_000),
            Duration::ZERO,
            "unlimited by default"
        );
        shared.set(RateConfig {
            bytes_per_sec: 65_568,
            burst_bytes: 0,
        });
        assert_eq!(
            r.delay_for(&shared, 65_568),
            Duration::ZERO,
            "the burst passes"
        );
        let d = r.delay_for(&shared, 65_568);
        assert!((d.as_secs_f64() - 1.0).abs() < 0.01, "{d:?}");
        shared.set(RateConfig::default());
        assert_eq!(
            r.delay_for(&shared, 65_568),
            Duration::ZERO,
            "reload back to unlimited"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refills() {
        let mut b = TokenBucket::new(2.0, 2.0);
        assert!(b.try_take(1.0) && b.try_take(1.0));
        assert!(!b.try_take(1.0));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.try_take(1.0));
    }
}
