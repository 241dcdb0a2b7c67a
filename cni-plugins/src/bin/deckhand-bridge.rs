//! `deckhand-bridge`: the CNI bridge plugin (see `deckhand_cni::bridge`).
//!
//! A C `main` rather than Rust's: see `deckhand_cni::plugin::c_main` for what that skips.
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main() -> std::ffi::c_int {
    deckhand_cni::plugin::c_main(&deckhand_cni::bridge::BridgePlugin)
}
