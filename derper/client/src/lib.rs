//! A DERP client speaking the same wire protocol as Tailscale's `derphttp`.
