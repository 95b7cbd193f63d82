//! DERP protocol v2 as Tailscale's Go client speaks it: frames, keys, the boxed
//! client/server info handshake messages, the HTTP upgrade request parser, the STUN codec and
//! the DERP-map types. Nothing here touches a socket, so every parser can be unit-tested and
//! fuzzed; the server (`derper`) and the client (`derp-client`) do the I/O.

pub mod derpmap;
pub mod frame;
pub mod gather;
pub mod info;
pub mod key;
pub mod stun;
pub mod upgrade;

pub use key::{MeshKey, NodePrivate, NodePublic};
