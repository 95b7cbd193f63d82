//! DERP protocol v2 as Tailscale's Go client speaks it: frames, keys, the boxed
//! client/server info handshake messages, the STUN codec and the DERP-map types.
//! Nothing here touches a socket, so every parser can be unit-tested and fuzzed.
