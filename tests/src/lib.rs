//! Deckhand's test bed harness and test-image builder.
//!
//! * [`testbed`]: reads the descriptor that `hack/testbed.sh up` writes and hands tests the
//!   addresses, credentials and sockets of the shared parts (registries, containerd, control
//!   plane), plus per-test unique names.
//! * [`cribench`]: a CRI client that starts and stops pods as the kubelet does and times each
//!   step (the `dh-cri-bench` binary, used by `hack/bench/cri.sh`).
//! * [`images`]: builds the project's test images reproducibly from `busybox-static` and pushes
//!   them to a registry with the OCI distribution API (used by the `dh-testimages` binary).
//!
//! The end-to-end tests themselves live in `tests/tests/*.rs`.

pub mod cribench;
pub mod images;
pub mod testbed;
