//! Exponential retry backoff: the delay doubles with each consecutive failure, from a minimum up
//! to a cap, and starts over after a success. The derper's mesh links and the operator's
//! reconciler and `derp-map` ConfigMap writer retry with it, so all three back off alike. Pure:
//! it computes delays; callers sleep (and add jitter where many peers retry at once).
//!
//! Why not `backon` (already in the tree through kube-runtime): its `ExponentialBackoff` is an
//! iterator for one retry sequence, rebuilt for every streak; the callers here keep one state per
//! key in a map (the reconciler, per region), report the failure count (logs and status), and pin
//! the exact, jitter-free sequence in tests. Twenty lines of arithmetic serve that more plainly
//! than an adapter around the iterator would.

use std::time::Duration;

/// The retry state of one thing that can fail (a mesh link, a region, a ConfigMap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays `min`, `2·min`, `4·min` ... up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// Counts one more failure and returns how long to wait before the next attempt: `min`
    /// after the first failure, doubled after each further one, never more than `max`.
    pub fn next_delay(&mut self) -> Duration {
        // 2^31 times any delay of a second or more is past every sensible cap; the shift stays
        // in range however long the failures go on.
        let delay = self
            .min
            .saturating_mul(1u32 << self.failures.min(31))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Consecutive failures counted since the last [`reset`](Self::reset).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_to_max_and_starts_over_after_reset() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(s(1), s(60));
        let delays: Vec<Duration> = (0..9).map(|_| b.next_delay()).collect();
        assert_eq!(
            delays,
            [s(1), s(2), s(4), s(8), s(16), s(32), s(60), s(60), s(60)]
        );
        assert_eq!(b.failures(), 9);
        b.reset();
        assert_eq!((b.failures(), b.next_delay()), (0, s(1)));
    }

    #[test]
    fn endless_failures_neither_overflow_nor_pass_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(300));
        let last = (0..100_000).map(|_| b.next_delay()).last();
        assert_eq!(last, Some(Duration::from_secs(300)));
        // With no effective cap the shift stays in range: the delay stops at 2^31 x min.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..40 {
            let _ = b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_secs(1 << 31));
    }
}
