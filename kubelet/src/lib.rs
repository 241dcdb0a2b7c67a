//! `deckhand-kubelet`: the node agent of a Deckhand node.
//!
//! This crate will own node registration and its Lease, the pod sources (API server watch and
//! static-pod directory), one reconciling worker per pod over any CRI v1 runtime, probes and
//! status. See ARCHITECTURE.md; the work is tracked in the kubelet issue. Nothing is implemented
//! yet: the crate exists so the workspace has its final shape.
