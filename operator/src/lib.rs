//! derp-fleet operator library: the `DerpRegion` CRD types, the pure renderer of the objects a
//! region owns (`render`; `offline` runs it on files for the `operator render` command), the pure
//! DERP-map builder and the map HTTP server (no I/O in those), and the live
//! part over them: server-side apply (`apply`), the reconciler (`controller`), the map task
//! (`maptask`), leader election (`leader`) and the wiring of `operator run` (`run`).

pub mod apply;
pub mod certstate;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod mapbuild;
pub mod mapserver;
pub mod maptask;
pub mod metrics;
pub mod offline;
pub mod probe;
pub mod prune;
pub mod render;
pub mod run;
pub mod select;
pub mod slim;
pub mod tls;

#[cfg(test)]
mod testutil;

/// Version of the operator; the derper image tag defaults to it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
