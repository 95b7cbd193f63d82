//! A log-bucketed latency histogram (1% wide buckets): constant memory at millions of samples,
//! mergeable across tasks, percentiles within 1%.

use serde::Serialize;

const BUCKETS_PER_E: f64 = 100.0;
/// ln(60 s in ns) * 100 is about 2480; anything slower lands in the last bucket.
const NBUCKETS: usize = 2600;

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max_ns: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; NBUCKETS],
            total: 0,
            max_ns: 0,
        }
    }
}

impl Hist {
    pub fn record_ns(&mut self, ns: u64) {
        let i = ((ns.max(1) as f64).ln() * BUCKETS_PER_E) as usize;
        self.counts[i.min(NBUCKETS - 1)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max_ns = self.max_ns.max(o.max_ns);
    }

    /// The upper edge of the bucket holding quantile `q`, in microseconds.
    fn quantile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let want = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                let edge = ((i + 1) as f64 / BUCKETS_PER_E).exp();
                return edge.min(self.max_ns as f64) / 1e3;
            }
        }
        self.max_ns as f64 / 1e3
    }

    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            samples: self.total,
            p50_us: self.quantile_us(0.50),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            max_us: self.max_ns as f64 / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_within_a_percent() {
        let mut h = Hist::default();
        for v in 1..=10_000u64 {
            h.record_ns(v * 1000);
        }
        let p = h.percentiles();
        assert!((p.p50_us - 5000.0).abs() / 5000.0 < 0.02, "{p:?}");
        assert!((p.p99_us - 9900.0).abs() / 9900.0 < 0.02, "{p:?}");
        assert_eq!(p.max_us, 10_000.0);
        let mut g = Hist::default();
        g.merge(&h);
        assert_eq!(g.percentiles().samples, 10_000);
    }
}
