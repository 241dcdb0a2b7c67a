//! The image subsystem of `deckhand-cri`: pulling from OCI registries, a crash-safe content
//! store, safe layer unpacking into per-layer snapshots and overlayfs rootfs composition.
//!
//! The pieces, bottom up:
//!
//! * [`reference`]: image references normalised as the kubelet and `crictl` do
//!   (`busybox` -> `docker.io/library/busybox:latest`).
//! * [`registry`]: the registry configuration file (mirrors, plain HTTP, CA files, credentials),
//!   a docker-style `config.json` and per-request credentials (CRI `AuthConfig`).
//! * [`content`]: content-addressed blobs, each written to a temporary file, fsynced, verified
//!   against its digest and only then renamed into place.
//! * [`metadata`]: image, name and container-usage records (one JSON file per record, written
//!   atomically; see the module for why).
//! * [`unpack`]: turning a layer blob into a snapshot directory without ever creating or
//!   following anything outside it, OCI whiteouts becoming overlayfs whiteouts.
//! * [`snapshot`]: snapshot directories keyed by chain ID, and the overlayfs mount specs of
//!   containers (`prepare` / `mount` / `remove`) and read-only views.
//! * [`pull`]: the distribution client (through `oci-client`): manifests, indexes with platform
//!   selection, verified streaming of blobs, parallel layer downloads shared between pulls.
//! * [`store`]: [`ImageStore`], the facade the CRI `ImageService` (and later the runtime) uses.
//!
//! On-disk layout under the root directory (default `/var/lib/deckhand`):
//!
//! ```text
//! blobs/sha256/<hex>          verified blobs (manifests, indexes, configs, layers)
//! ingest/                     partial downloads (removed on open)
//! snapshots/<chain-id-hex>/   one unpacked layer each (overlayfs lowerdir)
//! snapshots/.tmp-*            unpacks in progress (removed on open)
//! containers/<id>/{upper,work} writable layers of containers
//! meta/{images,names,containers}/*.json  records
//! ```
//!
//! Crash safety: every step makes its result visible with one `rename`, in dependency order
//! (blobs, then snapshots, then the image record, then its names), so a pull killed at any point
//! leaves either the old state or the new one; leftovers are only temporary files, which
//! [`ImageStore::open`] removes, and unreferenced blobs or snapshots, which [`ImageStore::gc`]
//! removes.

pub mod content;
pub mod metadata;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod unpack;

use std::path::PathBuf;
use std::sync::Arc;

pub use content::Digest;
pub use reference::ImageRef;
pub use registry::{Credentials, RegistryConfig};
pub use snapshot::MountSpec;
pub use store::{GcReport, Image, ImageStore, StoreOptions, Usage};

/// Errors of the image subsystem.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference cannot be parsed.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A digest is malformed or uses an unsupported algorithm.
    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        /// The digest as given.
        digest: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No image (or container) with this name or id.
    #[error("{0} not found")]
    NotFound(String),
    /// The registry refused our credentials, or asked for some and we had none.
    #[error("pulling {reference} from {host}: not authorized: {message}")]
    Unauthorized {
        /// The reference being pulled.
        reference: String,
        /// The registry host that refused.
        host: String,
        /// What the registry said.
        message: String,
    },
    /// A registry request failed.
    #[error("pulling {reference} from {host}: {message}")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The registry host.
        host: String,
        /// The failure.
        message: String,
    },
    /// Content did not match the digest that names it.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was verified (`layer sha256:...`, `manifest of ...`).
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// Content did not have the size its descriptor announced.
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// What was verified.
        what: String,
        /// The announced size.
        expected: u64,
        /// The size received (possibly a lower bound, when too much was sent).
        actual: u64,
    },
    /// A manifest, index or config is malformed or unsupported.
    #[error("{reference}: {reason}")]
    BadManifest {
        /// The reference being pulled.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// An image index has no manifest for this platform.
    #[error("{reference}: no manifest for platform {platform} in the image index")]
    NoMatchingPlatform {
        /// The reference being pulled.
        reference: String,
        /// The platform wanted (`linux/amd64`).
        platform: String,
    },
    /// A download received no data for too long.
    #[error("{what}: download stalled: no data for {seconds}s")]
    Stalled {
        /// What was being downloaded.
        what: String,
        /// The stall timeout.
        seconds: u64,
    },
    /// A layer tried to create or follow something outside its snapshot, or holds an entry
    /// refused by policy (device nodes).
    #[error("unsafe layer {layer}: entry {path:?}: {reason}")]
    UnsafeLayer {
        /// The layer's blob digest.
        layer: String,
        /// The entry path as written in the tar.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// A layer's tar stream is malformed.
    #[error("layer {layer}: malformed tar: {reason}")]
    BadLayer {
        /// The layer's blob digest.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// The image (or one of its layers) is used by containers.
    #[error("image {image} is in use by container(s) {containers}")]
    InUse {
        /// The image id.
        image: String,
        /// The containers using it, comma-separated.
        containers: String,
    },
    /// A container with this id already exists.
    #[error("container {0} already has a rootfs")]
    ContainerExists(String),
    /// A configuration file is malformed.
    #[error("configuration {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The failure of an operation shared with another pull (a download or an unpack).
    #[error(transparent)]
    Shared(Arc<ImageError>),
}

impl ImageError {
    /// An [`ImageError::Io`] with context.
    pub fn io(context: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        ImageError::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The error behind [`ImageError::Shared`] wrappers.
    pub fn root(&self) -> &ImageError {
        match self {
            ImageError::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

/// Results of the image subsystem.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Adds context to `std::io::Result`s (and `nix::Result`s through `From<Errno>`).
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<std::io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| ImageError::io(context(), e))
    }
}
