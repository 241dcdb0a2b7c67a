//! `deckhand-portmap`: the CNI portmap plugin (see `deckhand_cni::portmap`).
//!
//! A C `main` rather than Rust's: see `deckhand_cni::plugin::c_main` for what that skips.
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main() -> std::ffi::c_int {
    deckhand_cni::plugin::c_main(&deckhand_cni::portmap::PortMapPlugin)
}
