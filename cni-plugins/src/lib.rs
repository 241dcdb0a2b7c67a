//! `deckhand-cni`: the CNI 1.1 library (plugin side and runtime side) and Deckhand's plugins
//! (`deckhand-bridge`, `deckhand-host-local`, `deckhand-loopback`, `deckhand-portmap`).
//!
//! See ARCHITECTURE.md; the work is tracked in the CNI issue. Nothing is implemented yet: the
//! crate exists so the workspace has its final shape.
