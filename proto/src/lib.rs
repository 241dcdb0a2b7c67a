//! Wire definitions used by Deckhand.
//!
//! * [`cri`]: the Kubernetes CRI `runtime.v1` messages, the `RuntimeService` and `ImageService`
//!   clients and servers. Generated at build time (by the `k8s-cri` crate, with tonic/prost 0.14)
//!   from the upstream proto; nothing here is hand-written.
//! * [`unix`]: connecting a tonic client to a CRI endpoint on a unix socket, as the kubelet and
//!   `crictl` address it (`unix:///run/deckhand/cri.sock` or a plain path).
//!
//! This crate holds types and transport only: no runtime logic lives here.

pub use k8s_cri::v1 as cri;

pub mod unix;

/// The largest gRPC message the kubelet sends or accepts on the CRI (16 MiB); servers and
/// clients of Deckhand raise tonic's 4 MiB default to this.
pub const CRI_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
