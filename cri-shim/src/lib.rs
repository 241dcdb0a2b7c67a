//! `deckhand-cri`: the CRI v1 runtime of a Deckhand node.
//!
//! Implemented today:
//!
//! * [`image`]: the image subsystem: pulling from OCI registries (through `oci-client`; mirrors,
//!   plain HTTP, CA files and credentials from a registry configuration file, a docker
//!   `config.json` or the CRI request), a crash-safe content store, image records, safe layer
//!   unpacking into per-layer snapshots and overlayfs root filesystems for containers
//!   ([`image::ImageStore`] is the entry point).
//! * [`server`]: the CRI `ImageService` over the image store, served on a unix socket by the
//!   `deckhand-cri` binary (`src/bin/deckhand-cri.rs`, thin over the library);
//!   `deckhand-cri-pull` is a minimal CRI pull client for scripts and `hack/bench/images.sh`.
//!
//! * [`oci`]: the built-in OCI runtime library (bundles, namespaces, rootfs, capabilities,
//!   seccomp, the create/start split), used by the runc-compatible `deckhand-runc` CLI and by
//!   `deckhand-monitor`, the per-container parent ([`oci::Runtime`] is the entry point).
//!
//! Still to come (see ARCHITECTURE.md and the runtime and CRI issues): the `RuntimeService`, the
//! built-in OCI runtime and its per-container monitor, the containerd backend and the CNI
//! caller.

pub mod image;
pub mod oci;
pub mod pod;
pub mod records;
pub mod server;
