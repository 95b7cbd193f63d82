//! derp-fleet operator library: the `DerpRegion` CRD types, the pure renderers of the objects a
//! region owns, and the pure DERP-map builder. `main.rs` wires them to the CLI and (later) to the
//! cluster; nothing in here talks to an API server.

pub mod crd;
pub mod mapbuild;
pub mod preview;
pub mod render;
pub mod select;
pub mod tls;

#[cfg(test)]
mod testutil;

/// Version of the operator; the derper image tag defaults to it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
