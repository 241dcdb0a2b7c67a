//! Layer descriptions, their reproducible tar encoding and compression, and the expected tree
//! that applying a stack of layer descriptions must give.
//!
//! A layer is described as an ordered list of [`LayerEntry`]s. [`LayerSpec::tar`] writes it as a
//! POSIX ustar archive by hand (every header field is set explicitly; names are copied byte for
//! byte, so hostile names such as `../x` or `/tmp/x` survive), with PAX extended headers for long
//! names and extended attributes. Every timestamp is [`MTIME`]; nothing depends on the host.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest as _, Sha256};

use super::{ExpectedEntry, ExpectedKind};

/// The modification time of every tar entry (the Unix epoch).
pub const MTIME: u64 = 0;

/// The gzip level of every gzip-compressed layer.
pub const GZIP_LEVEL: u32 = 6;

/// The zstd level of every zstd-compressed layer.
pub const ZSTD_LEVEL: i32 = 3;

/// Prefix of a whiteout file's name.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// Name of the opaque-directory marker.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What a [`LayerEntry`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryData {
    /// A directory (written with a trailing `/`).
    Dir,
    /// A regular file with this content.
    File(Vec<u8>),
    /// A symbolic link to this target (written verbatim).
    Symlink(String),
    /// A hard link to this path of the archive (written verbatim).
    Hardlink(String),
    /// A named pipe.
    Fifo,
    /// A character device node.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device node.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// Deletes the entry's path from lower layers: written as `dir/.wh.name`.
    Whiteout,
    /// Hides everything lower layers put below the entry's path (a directory): written as
    /// `path/.wh..wh..opq`.
    Opaque,
}

/// One entry of a layer description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// Path inside the image, relative to the root, without a trailing `/` (`bin/busybox`).
    /// Hostile layers put `..` components or a leading `/` here; it is written unchanged.
    pub path: String,
    /// Type and payload.
    pub data: EntryData,
    /// Permission bits, including setuid/setgid/sticky (`0o1777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Extended attributes, written as PAX `SCHILY.xattr.<name>` records.
    pub xattrs: BTreeMap<String, String>,
}

impl LayerEntry {
    fn new(path: &str, data: EntryData, mode: u32) -> Self {
        Self {
            path: path.to_string(),
            data,
            mode,
            uid: 0,
            gid: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// A directory owned by root.
    pub fn dir(path: &str, mode: u32) -> Self {
        Self::new(path, EntryData::Dir, mode)
    }

    /// A regular file owned by root.
    pub fn file(path: &str, mode: u32, content: impl Into<Vec<u8>>) -> Self {
        Self::new(path, EntryData::File(content.into()), mode)
    }

    /// A symbolic link owned by root.
    pub fn symlink(path: &str, target: &str) -> Self {
        Self::new(path, EntryData::Symlink(target.to_string()), 0o777)
    }

    /// A hard link to `target` (an archive path).
    pub fn hardlink(path: &str, target: &str) -> Self {
        Self::new(path, EntryData::Hardlink(target.to_string()), 0o644)
    }

    /// A named pipe owned by root.
    pub fn fifo(path: &str, mode: u32) -> Self {
        Self::new(path, EntryData::Fifo, mode)
    }

    /// A character device node owned by root.
    pub fn char_device(path: &str, mode: u32, major: u32, minor: u32) -> Self {
        Self::new(path, EntryData::CharDevice { major, minor }, mode)
    }

    /// A block device node owned by root.
    pub fn block_device(path: &str, mode: u32, major: u32, minor: u32) -> Self {
        Self::new(path, EntryData::BlockDevice { major, minor }, mode)
    }

    /// A whiteout deleting `path` (and everything below it) from lower layers.
    pub fn whiteout(path: &str) -> Self {
        Self::new(path, EntryData::Whiteout, 0o644)
    }

    /// An opaque marker for the directory `path`.
    pub fn opaque(path: &str) -> Self {
        Self::new(path, EntryData::Opaque, 0o644)
    }

    /// The same entry owned by `uid:gid`.
    pub fn owned(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// The same entry with an extended attribute.
    pub fn xattr(mut self, name: &str, value: &str) -> Self {
        self.xattrs.insert(name.to_string(), value.to_string());
        self
    }

    /// The name this entry has in the tar archive.
    pub fn tar_name(&self) -> String {
        match self.data {
            EntryData::Dir => format!("{}/", self.path),
            EntryData::Whiteout => match self.path.rsplit_once('/') {
                Some((dir, base)) => format!("{dir}/{WHITEOUT_PREFIX}{base}"),
                None => format!("{WHITEOUT_PREFIX}{}", self.path),
            },
            EntryData::Opaque => format!("{}/{OPAQUE_MARKER}", self.path),
            _ => self.path.clone(),
        }
    }
}

/// A described layer: a name (used in logs and the image config's history) and its entries in
/// archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// Short human name of the layer.
    pub name: String,
    /// The entries, in the order they are written.
    pub entries: Vec<LayerEntry>,
}

impl LayerSpec {
    /// A named layer.
    pub fn new(name: &str, entries: Vec<LayerEntry>) -> Self {
        Self {
            name: name.to_string(),
            entries,
        }
    }

    /// The layer as an uncompressed tar archive (byte-identical for identical descriptions).
    pub fn tar(&self) -> Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in &self.entries {
            append_entry(&mut builder, entry)
                .with_context(|| format!("layer {}: writing {:?}", self.name, entry.path))?;
        }
        builder
            .into_inner()
            .with_context(|| format!("layer {}: finishing the archive", self.name))
    }
}

fn append_entry(builder: &mut tar::Builder<Vec<u8>>, entry: &LayerEntry) -> Result<()> {
    let name = entry.tar_name();
    let (entry_type, content, link): (tar::EntryType, &[u8], Option<&str>) = match &entry.data {
        EntryData::Dir => (tar::EntryType::Directory, &[], None),
        EntryData::File(c) => (tar::EntryType::Regular, c, None),
        EntryData::Symlink(t) => (tar::EntryType::Symlink, &[], Some(t)),
        EntryData::Hardlink(t) => (tar::EntryType::Link, &[], Some(t)),
        EntryData::Fifo => (tar::EntryType::Fifo, &[], None),
        EntryData::CharDevice { .. } => (tar::EntryType::Char, &[], None),
        EntryData::BlockDevice { .. } => (tar::EntryType::Block, &[], None),
        EntryData::Whiteout | EntryData::Opaque => (tar::EntryType::Regular, &[], None),
    };

    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut header = tar::Header::new_ustar();
    if !set_field(&mut header.as_old_mut().name, name.as_bytes()) {
        pax.push(("path".to_string(), name.as_bytes().to_vec()));
        set_field(
            &mut header.as_old_mut().name,
            truncated(name.as_bytes(), 100),
        );
    }
    if let Some(link) = link
        && !set_field(&mut header.as_old_mut().linkname, link.as_bytes())
    {
        pax.push(("linkpath".to_string(), link.as_bytes().to_vec()));
        set_field(
            &mut header.as_old_mut().linkname,
            truncated(link.as_bytes(), 100),
        );
    }
    for (k, v) in &entry.xattrs {
        pax.push((format!("SCHILY.xattr.{k}"), v.as_bytes().to_vec()));
    }
    header.set_entry_type(entry_type);
    header.set_mode(entry.mode);
    header.set_uid(u64::from(entry.uid));
    header.set_gid(u64::from(entry.gid));
    header.set_mtime(MTIME);
    header.set_size(content.len() as u64);
    // Like GNU tar, write the device numbers of every entry (0 unless it is a device node):
    // some readers reject empty numeric fields.
    let (major, minor) = match entry.data {
        EntryData::CharDevice { major, minor } | EntryData::BlockDevice { major, minor } => {
            (major, minor)
        }
        _ => (0, 0),
    };
    header.set_device_major(major)?;
    header.set_device_minor(minor)?;
    header.set_cksum();

    if !pax.is_empty() {
        let records = pax_records(&pax);
        let mut pax_header = tar::Header::new_ustar();
        let pax_name = format!("PaxHeaders/{}", name.trim_end_matches('/'));
        set_field(
            &mut pax_header.as_old_mut().name,
            truncated(pax_name.as_bytes(), 100),
        );
        pax_header.set_entry_type(tar::EntryType::XHeader);
        pax_header.set_mode(0o644);
        pax_header.set_uid(0);
        pax_header.set_gid(0);
        pax_header.set_mtime(MTIME);
        pax_header.set_size(records.len() as u64);
        pax_header.set_device_major(0)?;
        pax_header.set_device_minor(0)?;
        pax_header.set_cksum();
        builder.append(&pax_header, records.as_slice())?;
    }
    builder.append(&header, content)?;
    Ok(())
}

/// Copies `value` into a NUL-padded header field; false when it does not fit.
fn set_field(field: &mut [u8], value: &[u8]) -> bool {
    if value.len() > field.len() {
        return false;
    }
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
    true
}

fn truncated(value: &[u8], max: usize) -> &[u8] {
    &value[..value.len().min(max)]
}

/// Encodes PAX records (`"<len> <key>=<value>\n"`, `len` counting the whole record).
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Compression {
    /// gzip at [`GZIP_LEVEL`], header without name or timestamp.
    Gzip,
    /// gzip at level 0 (stored blocks): the output length depends only on the input length.
    GzipStored,
    /// zstd at [`ZSTD_LEVEL`].
    Zstd,
    /// Plain tar.
    None,
}

impl Compression {
    /// Compresses `tar` reproducibly.
    pub fn compress(self, tar: &[u8]) -> Result<Vec<u8>> {
        match self {
            Compression::Gzip => gzip(tar, flate2::Compression::new(GZIP_LEVEL)),
            Compression::GzipStored => gzip(tar, flate2::Compression::none()),
            Compression::Zstd => {
                zstd::stream::encode_all(tar, ZSTD_LEVEL).context("zstd-compressing a layer")
            }
            Compression::None => Ok(tar.to_vec()),
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::Gzip | Compression::GzipStored => super::OCI_LAYER_GZIP,
            Compression::Zstd => super::OCI_LAYER_ZSTD,
            Compression::None => super::OCI_LAYER_TAR,
        }
    }
}

fn gzip(data: &[u8], level: flate2::Compression) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), level);
    enc.write_all(data).context("gzip-compressing a layer")?;
    enc.finish().context("gzip-compressing a layer")
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let sum = Sha256::digest(data);
    let mut out = String::with_capacity(64);
    for b in sum {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The tree that unpacking `layers` in order onto an empty directory, with OCI whiteout
/// semantics, must give. Keys are absolute paths (`/bin/busybox`); the root itself is left out.
///
/// This is computed from the descriptions alone, never from the encoded archives: within a layer
/// the whiteouts and opaque markers act on the lower layers first, then the layer's other entries
/// are added in order. A hard link gets its target's metadata and content.
pub fn expected_tree(layers: &[LayerSpec]) -> Result<BTreeMap<String, ExpectedEntry>> {
    let mut tree: BTreeMap<String, ExpectedEntry> = BTreeMap::new();
    for layer in layers {
        for e in &layer.entries {
            let path = normalize(&e.path)?;
            match e.data {
                EntryData::Whiteout => {
                    tree.remove(&path);
                    remove_below(&mut tree, &path);
                }
                EntryData::Opaque => remove_below(&mut tree, &path),
                _ => {}
            }
        }
        for e in &layer.entries {
            let path = normalize(&e.path)?;
            let xattrs = e.xattrs.clone();
            let new = match &e.data {
                EntryData::Whiteout | EntryData::Opaque => continue,
                EntryData::Dir => ExpectedEntry::new(ExpectedKind::Dir, e),
                EntryData::File(content) => ExpectedEntry {
                    sha256: Some(sha256_hex(content)),
                    size: Some(content.len() as u64),
                    ..ExpectedEntry::new(ExpectedKind::File, e)
                },
                EntryData::Symlink(target) => ExpectedEntry {
                    target: Some(target.clone()),
                    ..ExpectedEntry::new(ExpectedKind::Symlink, e)
                },
                EntryData::Fifo => ExpectedEntry::new(ExpectedKind::Fifo, e),
                EntryData::CharDevice { major, minor } => ExpectedEntry {
                    device: Some([*major, *minor]),
                    ..ExpectedEntry::new(ExpectedKind::CharDevice, e)
                },
                EntryData::BlockDevice { major, minor } => ExpectedEntry {
                    device: Some([*major, *minor]),
                    ..ExpectedEntry::new(ExpectedKind::BlockDevice, e)
                },
                EntryData::Hardlink(target) => {
                    let target = normalize(target)?;
                    let Some(t) = tree.get(&target) else {
                        bail!(
                            "layer {}: hard link {path} -> {target}: no such entry",
                            layer.name
                        );
                    };
                    ensure!(
                        t.kind != ExpectedKind::Dir,
                        "layer {}: hard link {path} -> directory {target}",
                        layer.name
                    );
                    ExpectedEntry {
                        hardlink_to: Some(target.clone()),
                        xattrs: t.xattrs.clone(),
                        ..t.clone()
                    }
                }
            };
            let new = if matches!(e.data, EntryData::Hardlink(_)) {
                new
            } else {
                ExpectedEntry { xattrs, ..new }
            };
            if new.kind != ExpectedKind::Dir {
                remove_below(&mut tree, &path);
            }
            tree.insert(path, new);
        }
    }
    Ok(tree)
}

impl ExpectedEntry {
    fn new(kind: ExpectedKind, e: &LayerEntry) -> Self {
        Self {
            kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            sha256: None,
            size: None,
            target: None,
            hardlink_to: None,
            device: None,
            xattrs: BTreeMap::new(),
        }
    }
}

fn remove_below(tree: &mut BTreeMap<String, ExpectedEntry>, dir: &str) {
    let prefix = format!("{dir}/");
    tree.retain(|k, _| !k.starts_with(&prefix));
}

/// `/a/b` from `a/b`, `./a/b/` or `/a/b`; rejects `..` (only hostile layers have it, and they
/// have no expected tree).
fn normalize(path: &str) -> Result<String> {
    let mut out = String::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => bail!("path {path:?} has a `..` component"),
            p => {
                out.push('/');
                out.push_str(p);
            }
        }
    }
    ensure!(!out.is_empty(), "empty path {path:?}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let r = pax_records(&[("path".into(), b"x".to_vec())]);
        assert_eq!(r, b"9 path=x\n");
        let long = vec![b'a'; 95];
        let r = pax_records(&[("path".into(), long)]);
        let text = String::from_utf8(r.clone()).expect("utf8");
        let (len, _) = text.split_once(' ').expect("space");
        assert_eq!(len.parse::<usize>().expect("number"), r.len());
    }

    #[test]
    fn gzip_header_has_no_name_or_time() {
        let gz = Compression::Gzip.compress(b"hello").expect("gzip");
        assert_eq!(
            &gz[..4],
            &[0x1f, 0x8b, 8, 0],
            "no FNAME/FEXTRA/FCOMMENT flags"
        );
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime 0");
        assert_eq!(gz[9], 255, "OS unknown");
    }

    #[test]
    fn raw_names_survive() {
        let layer = LayerSpec::new(
            "raw",
            vec![
                LayerEntry::file("../../x", 0o644, "x"),
                LayerEntry::file("/tmp/y", 0o644, "y"),
                LayerEntry::hardlink("hl", "/etc/shadow"),
                LayerEntry::file(&format!("{}f", "d/".repeat(60)), 0o644, "long"),
            ],
        );
        let tar = layer.tar().expect("tar");
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        for e in archive.entries().expect("entries") {
            let e = e.expect("entry");
            names.push((
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned()),
            ));
        }
        assert_eq!(names[0].0, "../../x");
        assert_eq!(names[1].0, "/tmp/y");
        assert_eq!(names[2], ("hl".into(), Some("/etc/shadow".into())));
        assert_eq!(names[3].0, format!("{}f", "d/".repeat(60)));
    }
}
