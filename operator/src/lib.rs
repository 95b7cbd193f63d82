//! derp-fleet operator library: the `DerpRegion` CRD types, the pure renderers of the objects a
//! region owns, the pure DERP-map builder and the map HTTP server. `main.rs` wires them to the CLI
//! and (next) to the cluster; nothing in here talks to an API server yet.

pub mod crd;
pub mod mapbuild;
pub mod mapserver;
pub mod preview;
pub mod render;
pub mod select;
pub mod tls;

#[cfg(test)]
mod testutil;

/// Version of the operator; the derper image tag defaults to it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
