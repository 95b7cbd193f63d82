//! The derper server: listeners, TLS, HTTP, the DERP connection registry and STUN.
