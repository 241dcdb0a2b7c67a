//! `deckhand-cri`: the CRI v1 runtime of a Deckhand node.
//!
//! This crate will own the CRI `RuntimeService` and `ImageService` served on a unix socket, the
//! built-in OCI runtime (behind a boundary that lets it become its own crate), the per-container
//! monitor, the image store and the containerd backend. See ARCHITECTURE.md for the plan and the
//! invariants; the work is tracked in the runtime, images and CRI issues. Nothing is implemented
//! yet: the crate exists so the workspace has its final shape.
