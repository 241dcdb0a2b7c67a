//! Deckhand's test images: built reproducibly from `busybox-static` and pushed to a registry.
//!
//! [`build_catalog`] describes and encodes every image of the catalog in memory; the same inputs
//! (the same `/bin/busybox`) give byte-identical blobs and so identical digests on every run and
//! every machine: tar entries have mtime 0 and explicit owners, gzip headers carry no name or time,
//! compression levels are fixed, the image configs' `created` is the epoch, and no host name,
//! clock or random value is used anywhere. [`push_catalog`] pushes a built catalog to a plain-HTTP
//! registry with the OCI distribution API (idempotent) and returns the [`ImageIndex`] that the
//! `dh-testimages` binary writes as JSON for the tests: they read it with [`ImageIndex::load`] and
//! look images up with [`ImageIndex::get`] (or the `images` map directly).
//!
//! The catalog (see [`CATALOG`]):
//!
//! * `dh/busybox:latest` (OCI) and `dh/busybox:docker` (Docker schema 2 media types): `/bin/busybox`
//!   with a symlink per applet, `/etc/passwd` and `/etc/group` (root, nobody), `/tmp` (1777), no
//!   `/etc/hostname`, `/etc/hosts` or `/etc/resolv.conf`.
//! * `dh/httpd:latest`: busybox plus `/www/index.html`, serving it on port 8080.
//! * `dh/config:latest`: busybox plus user `dhuser` (1000:1000), `User: "1000:1000"`, a working
//!   dir, an entrypoint, an env var and a label.
//! * `dh/layers:{latest,zstd,uncompressed}`: busybox plus three layers exercising whiteouts,
//!   opaque dirs, hard and symbolic links, a mode change, a fifo, an xattr and a non-root owner;
//!   the three tags differ only in layer compression (same diff_ids, same config). Their records
//!   carry the [`ExpectedEntry`] tree a correct unpack must give.
//! * `dh/multiarch:latest`: an OCI image index: linux/amd64 is `dh/busybox:latest`, linux/arm64/v8
//!   a one-file image (`/arch` = `arm64\n`).
//! * `dh/hostile:*`: images that a safe runtime must refuse or contain (see [`HostileInfo`]).

mod catalog;
mod layer;
mod push;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use catalog::{
    BuildOptions, BuiltBlob, BuiltImage, Catalog, CorruptBlob, HTTPD_INDEX_HTML, build_catalog,
};
pub use layer::{
    Compression, EntryData, GZIP_LEVEL, LayerEntry, LayerSpec, MTIME, OPAQUE_MARKER,
    WHITEOUT_PREFIX, ZSTD_LEVEL, expected_tree, sha256_digest, sha256_hex,
};
pub use push::{PushOptions, push_catalog};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer media type.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI uncompressed layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker schema 2 gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// `dh/busybox:latest`.
pub const BUSYBOX: &str = "dh/busybox:latest";
/// `dh/busybox:docker`.
pub const BUSYBOX_DOCKER: &str = "dh/busybox:docker";
/// `dh/httpd:latest`.
pub const HTTPD: &str = "dh/httpd:latest";
/// `dh/pause:latest`: the test bed containerd's sandbox image (busybox sleeping forever).
pub const PAUSE: &str = "dh/pause:latest";
/// `dh/config:latest`.
pub const CONFIG: &str = "dh/config:latest";
/// `dh/layers:latest` (gzip layers).
pub const LAYERS: &str = "dh/layers:latest";
/// `dh/layers:zstd`.
pub const LAYERS_ZSTD: &str = "dh/layers:zstd";
/// `dh/layers:uncompressed`.
pub const LAYERS_UNCOMPRESSED: &str = "dh/layers:uncompressed";
/// `dh/multiarch:latest` (an image index).
pub const MULTIARCH: &str = "dh/multiarch:latest";
/// `dh/hostile:dotdot`.
pub const HOSTILE_DOTDOT: &str = "dh/hostile:dotdot";
/// `dh/hostile:absolute`.
pub const HOSTILE_ABSOLUTE: &str = "dh/hostile:absolute";
/// `dh/hostile:symlink-escape`.
pub const HOSTILE_SYMLINK_ESCAPE: &str = "dh/hostile:symlink-escape";
/// `dh/hostile:symlink-parent`.
pub const HOSTILE_SYMLINK_PARENT: &str = "dh/hostile:symlink-parent";
/// `dh/hostile:hardlink-escape`.
pub const HOSTILE_HARDLINK_ESCAPE: &str = "dh/hostile:hardlink-escape";
/// `dh/hostile:device`.
pub const HOSTILE_DEVICE: &str = "dh/hostile:device";
/// `dh/hostile:badlayer`.
pub const HOSTILE_BADLAYER: &str = "dh/hostile:badlayer";
/// `dh/hostile:bad-diffid`.
pub const HOSTILE_BAD_DIFFID: &str = "dh/hostile:bad-diffid";

/// Every reference of the catalog, in push order, with a one-line description.
pub const CATALOG: &[(&str, &str)] = &[
    (
        BUSYBOX,
        "busybox-static with applet symlinks, passwd/group, /tmp; Cmd [sh]",
    ),
    (
        BUSYBOX_DOCKER,
        "the busybox image with Docker schema 2 media types",
    ),
    (
        HTTPD,
        "busybox + /www/index.html; httpd -f -v -p 8080 -h /www",
    ),
    (
        PAUSE,
        "the busybox layer; Cmd [sleep 2147483647]: containerd's sandbox image in the test bed",
    ),
    (
        CONFIG,
        "busybox + dhuser 1000:1000; User, WorkingDir, Env, Entrypoint, Cmd, Labels",
    ),
    (
        LAYERS,
        "busybox + 3 layers: whiteouts, opaque dir, links, chmod, fifo, xattr, owner (gzip)",
    ),
    (LAYERS_ZSTD, "the layers image with zstd layers"),
    (
        LAYERS_UNCOMPRESSED,
        "the layers image with plain tar layers",
    ),
    (
        MULTIARCH,
        "image index: linux/amd64 = dh/busybox:latest, linux/arm64/v8 = /arch",
    ),
    (HOSTILE_DOTDOT, "layer entry ../../dh-escape-dotdot"),
    (HOSTILE_ABSOLUTE, "layer entry /tmp/dh-escape-absolute"),
    (
        HOSTILE_SYMLINK_ESCAPE,
        "layer 1: evil -> /tmp; layer 2: evil/dh-escape-symlink",
    ),
    (
        HOSTILE_SYMLINK_PARENT,
        "up -> ../../.. then up/dh-escape-parent in one layer",
    ),
    (
        HOSTILE_HARDLINK_ESCAPE,
        "hard links hl -> /etc/shadow and hl-dotdot -> ../x",
    ),
    (
        HOSTILE_DEVICE,
        "char device /dev-null-copy 1:3 and block device /dev-block-copy 7:0",
    ),
    (
        HOSTILE_BADLAYER,
        "layer blob whose bytes in the registry do not match its digest",
    ),
    (
        HOSTILE_BAD_DIFFID,
        "config rootfs.diff_ids do not match the uncompressed layer",
    ),
];

/// The JSON index written by `dh-testimages push`: what was pushed where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// `host:port` of the registry the images were pushed to.
    pub registry: String,
    /// SHA-256 (hex) of the busybox binary the images were built from.
    pub busybox_sha256: String,
    /// Every image by reference (`dh/busybox:latest`).
    pub images: BTreeMap<String, ImageRecord>,
}

impl ImageIndex {
    /// Reads an index written by `dh-testimages push`.
    pub fn load(path: &Path) -> Result<ImageIndex> {
        let text = std::fs::read(path)
            .with_context(|| format!("reading image index {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("parsing image index {}", path.display()))
    }

    /// Writes the index as pretty JSON (through a temporary file and a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).context("serializing the image index")?;
        json.push(b'\n');
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, &json)
            .with_context(|| format!("writing {}", Path::new(&tmp).display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming into place {}", path.display()))
    }

    /// The image with this reference (`dh/busybox:latest`); an error names a missing reference.
    pub fn get(&self, reference: &str) -> Result<&ImageRecord> {
        self.images.get(reference).with_context(|| {
            format!(
                "image {reference} is not in the index of registry {}",
                self.registry
            )
        })
    }

    /// `registry/reference`, e.g. `127.0.0.1:5000/dh/busybox:latest`.
    pub fn pull_ref(&self, reference: &str) -> String {
        format!("{}/{reference}", self.registry)
    }
}

/// One pushed reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `dh/busybox:latest`.
    pub reference: String,
    /// `dh/busybox`.
    pub repository: String,
    /// `latest`.
    pub tag: String,
    /// One-line description (from [`CATALOG`]).
    pub description: String,
    /// Digest of the manifest (of the image index for `dh/multiarch:latest`).
    pub manifest_digest: String,
    /// Media type of the manifest or index.
    pub manifest_media_type: String,
    /// Size of the manifest or index in bytes.
    pub manifest_size: u64,
    /// Digest of the config blob; empty for an image index.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_digest: String,
    /// Media type of the config blob; empty for an image index.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_media_type: String,
    /// Size of the config blob; 0 for an image index.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub config_size: u64,
    /// The layers, bottom first; empty for an image index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerRecord>,
    /// OS (`linux`); empty for an image index.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    /// Architecture (`amd64`); empty for an image index.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub architecture: String,
    /// The runtime part (`config`) of the image config, as written in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeConfig>,
    /// For an image index: its manifests, one per platform.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformRecord>,
    /// For `dh/layers:*`: the tree (absolute path -> entry) that unpacking all layers with OCI
    /// whiteout semantics must give, computed from the layer descriptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_tree: Option<BTreeMap<String, ExpectedEntry>>,
    /// For `dh/hostile:*`: what is wrong with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostile: Option<HostileInfo>,
    /// Set when the image was not pushed to this registry, with the reason (the `badlayer` image
    /// needs `--registry-storage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl ImageRecord {
    /// `registry/repository@digest`.
    pub fn pull_ref_by_digest(&self, registry: &str) -> String {
        format!("{registry}/{}@{}", self.repository, self.manifest_digest)
    }

    /// The diff_ids of the layers (digests of the uncompressed tars), bottom first.
    pub fn diff_ids(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.diff_id.as_str()).collect()
    }
}

/// A layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Media type in the manifest.
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (what a correct config lists in `rootfs.diff_ids`; for
    /// `dh/hostile:bad-diffid` the config lists something else).
    pub diff_id: String,
    /// Short human name of the layer (also in the config's history).
    pub name: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One manifest of an image index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformRecord {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`.
    pub architecture: String,
    /// `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Manifest digest.
    pub digest: String,
    /// Manifest media type.
    pub media_type: String,
    /// Manifest size.
    pub size: u64,
    /// Config digest of that manifest.
    pub config_digest: String,
    /// Layer digests of that manifest.
    pub layers: Vec<String>,
}

/// The runtime part of an image config (`config` in the OCI image config), with the field names
/// of the image spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// `User`.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `ExposedPorts` (`"8080/tcp": {}`).
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, Empty>,
    /// `Env`.
    #[serde(rename = "Env", default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `Entrypoint`.
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// `Labels`.
    #[serde(rename = "Labels", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// An empty JSON object (`{}`), the value type of `ExposedPorts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Type of an [`ExpectedEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
}

/// What must be at one path of a correctly unpacked rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedEntry {
    /// Type.
    pub kind: ExpectedKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`; `0o777` for links).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Regular files: SHA-256 (hex) of the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Regular files: size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Symbolic links: the target, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Hard links: the other path this one must share an inode with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardlink_to: Option<String>,
    /// Device nodes: `[major, minor]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<[u32; 2]>,
    /// Extended attributes (`user.dh` -> `1`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

/// What makes a `dh/hostile:*` image hostile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostileInfo {
    /// Short kind: the tag (`dotdot`, `absolute`, ...).
    pub kind: String,
    /// What the image does and what a safe runtime must do about it.
    pub description: String,
    /// File name the image tries to create outside the rootfs (`dh-escape-dotdot`); it must not
    /// appear anywhere outside the container's rootfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape_name: Option<String>,
    /// Host paths the image aims at (`/tmp/dh-escape-absolute`): they must not exist afterwards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_paths: Vec<String>,
}

#[cfg(test)]
mod tests;
