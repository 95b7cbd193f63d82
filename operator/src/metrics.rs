//! The operator's `/metrics` exposition through prometheus-client: each part of the operator
//! (map server, controller counters, per-region facts, prober) is a [`Collector`] that reads its
//! own state at scrape time and writes it with these helpers, so the library writes the text
//! (HELP/TYPE lines, `_total` suffixes, histogram buckets, the OpenMetrics `# EOF`).
//!
//! Names are stable (the chart's dashboard and alerts use them). Two prefixes stand side by side
//! for historical reasons: `derpfleet_*` (map server and controller) and `derp_fleet_*` (regions
//! and prober); renaming either would break every stored series and rule.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::mapbuild::RegionKey;

/// The labels of a per-region series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub namespace: String,
    pub region: String,
}

impl RegionLabels {
    pub fn of(key: &RegionKey) -> Self {
        Self {
            namespace: key.namespace.clone(),
            region: key.name.clone(),
        }
    }
}

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A collector shared between its owner and the scrape (the registry takes a `Box`).
#[derive(Debug, Clone)]
pub struct Shared(pub Arc<dyn Collector>);

impl Collector for Shared {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        self.0.encode(encoder)
    }
}

/// The exposition of `collectors`, in order.
pub fn encode(collectors: impl IntoIterator<Item = Shared>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    for c in collectors {
        registry.register_collector(Box::new(c));
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A counter without labels; `name` without `_total` (the encoder appends it).
pub fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// A counter with one series per label set.
pub fn counter_family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
pub fn gauge<N: EncodeGaugeValue + fmt::Debug + Send + Sync>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A gauge with one series per label set (the family is described even with no series).
pub fn gauge_family<L: EncodeLabelSet, N: EncodeGaugeValue + fmt::Debug + Send + Sync>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, N)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One histogram series: its sum, count and per-bucket (not cumulative) counts by upper bound;
/// the encoder accumulates them and adds the `+Inf` bucket from `count`.
pub struct HistogramSeries {
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

/// A histogram with one series per label set.
pub fn histogram_family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, HistogramSeries)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in series {
        // The +Inf bucket: what no finite bound counted.
        let finite: u64 = h.buckets.iter().map(|(_, c)| c).sum();
        let mut buckets = h.buckets;
        buckets.push((f64::MAX, h.count.saturating_sub(finite)));
        m.encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)?;
    }
    Ok(())
}
