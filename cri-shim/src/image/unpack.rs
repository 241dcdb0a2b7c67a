//! Unpacking a layer blob into a snapshot directory, safely.
//!
//! Every path is resolved beneath the snapshot directory: parents are opened one level at a
//! time with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and the final component is created
//! with `*at` calls that never follow it (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `O_EXCL`). So:
//!
//! * entries with `..` components or absolute paths are refused;
//! * an entry whose parent is a symlink (made earlier in this layer or by a lower layer) is
//!   refused: nothing is ever created through a symlink;
//! * a hard link must name (relative, no `..`) an earlier entry of the same layer or a regular
//!   file of a lower layer, which is then copied up into this layer first, as overlayfs would
//!   (its extended attributes are not copied);
//! * device nodes are refused unless [`UnpackOptions::allow_devices`];
//! * `trusted.overlay.*` extended attributes are refused (they would steer overlayfs).
//!
//! Each layer is unpacked on its own (it is an overlayfs lowerdir): OCI whiteouts `.wh.<name>`
//! become overlayfs whiteouts (a 0:0 character device `<name>`) and `.wh..wh..opq` sets
//! `trusted.overlay.opaque=y` on its directory. A directory that a layer's entries need but do
//! not list is created with the owner and mode it has in the lower layers (so overlayfs does not
//! change them in the merged view). The uncompressed stream is hashed while it is read and must
//! equal the layer's `diff_id`; any failure leaves the caller to remove the directory.
//!
//! Compression is detected from the content (gzip, zstd or none), not trusted from the media
//! type. Known approximation: opaque directories of lower layers are not considered when looking
//! up the owner and mode of an implicit parent directory.

use std::ffi::{CString, OsStr};
use std::io::{BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, futimens, mkdirat, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use sha2::{Digest as _, Sha256};

use super::content::Digest;
use super::{ImageError, Result};

/// What unpacking allows.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackOptions {
    /// Create character and block device nodes (other than whiteouts). Off by default: a
    /// device node in an image gives its container access to a host device.
    pub allow_devices: bool,
}

/// What an unpack did.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackStats {
    /// Entries processed.
    pub entries: u64,
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
}

struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Opens a blob and decompresses it according to its magic bytes.
pub fn open_decompressed(blob: &Path) -> std::io::Result<Box<dyn Read + Send>> {
    let mut file = std::fs::File::open(blob)?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        let r = file.read(&mut magic[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let buffered = BufReader::with_capacity(256 * 1024, file);
    Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(buffered))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

/// Unpacks the layer blob at `blob` into the empty directory `target`, checking that the
/// uncompressed tar has digest `diff_id`. `lowers` are the snapshot directories of the layers
/// below, topmost first; they are only looked at when an entry's parent directory is not in
/// this layer, after `wait_lowers` returned (so layers can be unpacked in parallel, one waiting
/// for those below only when it must). On error the caller removes `target`.
pub fn unpack_layer(
    blob: &Path,
    layer: &Digest,
    diff_id: &Digest,
    target: &Path,
    lowers: &[PathBuf],
    wait_lowers: &mut dyn FnMut() -> Result<()>,
    opts: UnpackOptions,
) -> Result<UnpackStats> {
    let reader = open_decompressed(blob).map_err(|e| ImageError::BadLayer {
        layer: layer.to_string(),
        reason: format!("opening {}: {e}", blob.display()),
    })?;
    let root = openat(
        nix::fcntl::AT_FDCWD,
        target,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::io(format!("opening {}", target.display()), e))?;
    let mut u = Unpacker {
        layer: layer.to_string(),
        root,
        lower_paths: lowers.to_vec(),
        lowers: std::cell::RefCell::new(None),
        wait_lowers: std::cell::RefCell::new(wait_lowers),
        opts,
        dir_times: Vec::new(),
        buf: vec![0u8; 256 * 1024],
    };
    let mut archive = tar::Archive::new(HashReader {
        inner: reader,
        hasher: Sha256::new(),
        bytes: 0,
    });
    let bad = |reason: String| ImageError::BadLayer {
        layer: layer.to_string(),
        reason,
    };
    let mut stats = UnpackStats::default();
    {
        let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            u.entry(&mut entry)?;
            stats.entries += 1;
        }
    }
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| bad(e.to_string()))?;
    stats.tar_bytes = rest.bytes;
    let actual = Digest::from_hasher(rest.hasher);
    if &actual != diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("uncompressed layer {layer} (diff_id)"),
            expected: diff_id.to_string(),
            actual: actual.to_string(),
        });
    }
    u.finish()?;
    nix::unistd::syncfs(&u.root)
        .map_err(|e| ImageError::io(format!("syncfs {}", target.display()), e))?;
    Ok(stats)
}

/// Splits a tar path into safe components; `None` components means the root itself.
fn components(raw: &[u8], layer: &str, what: &str) -> Result<Vec<Vec<u8>>> {
    let path = String::from_utf8_lossy(raw).into_owned();
    let unsafe_entry = |reason: &str| ImageError::UnsafeLayer {
        layer: layer.to_string(),
        path: path.clone(),
        reason: format!("{what}: {reason}"),
    };
    if raw.first() == Some(&b'/') {
        return Err(unsafe_entry("absolute path"));
    }
    if raw.contains(&0) {
        return Err(unsafe_entry("NUL byte in path"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(unsafe_entry("path contains `..`")),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn cstr(b: &[u8]) -> CString {
    // Components never contain NUL (checked in `components`).
    CString::new(b).unwrap_or_default()
}

fn join(comps: &[Vec<u8>]) -> Vec<u8> {
    comps.join(&b'/')
}

fn beneath(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

fn ts(secs: u64) -> TimeSpec {
    TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0)
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Unpacker<'w> {
    layer: String,
    root: OwnedFd,
    lower_paths: Vec<PathBuf>,
    /// Opened on first use, after `wait_lowers`.
    lowers: std::cell::RefCell<Option<Vec<OwnedFd>>>,
    wait_lowers: std::cell::RefCell<&'w mut dyn FnMut() -> Result<()>>,
    opts: UnpackOptions,
    dir_times: Vec<(Vec<Vec<u8>>, u64)>,
    buf: Vec<u8>,
}

enum Kind {
    Missing,
    Dir,
    Other,
}

impl Unpacker<'_> {
    fn unsafe_entry(&self, path: &[u8], reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeLayer {
            layer: self.layer.clone(),
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        }
    }

    fn io(&self, path: &[u8], what: &str, e: impl Into<std::io::Error>) -> ImageError {
        ImageError::io(
            format!(
                "layer {}: {what} {:?}",
                self.layer,
                String::from_utf8_lossy(path)
            ),
            e,
        )
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let comps = components(&raw_path, &self.layer, "entry")?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mut meta = Meta {
            mode: header.mode().unwrap_or(0o644) & 0o7777,
            uid: header
                .uid()
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            gid: header
                .gid()
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            mtime: header.mtime().unwrap_or(0),
            xattrs: Vec::new(),
        };
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let num = || {
                    std::str::from_utf8(value)
                        .ok()?
                        .split('.')
                        .next()?
                        .parse::<u64>()
                        .ok()
                };
                match key {
                    b"uid" => {
                        meta.uid = num()
                            .and_then(|v| u32::try_from(v).ok())
                            .unwrap_or(meta.uid)
                    }
                    b"gid" => {
                        meta.gid = num()
                            .and_then(|v| u32::try_from(v).ok())
                            .unwrap_or(meta.gid)
                    }
                    b"mtime" => meta.mtime = num().unwrap_or(meta.mtime),
                    k if k.starts_with(b"SCHILY.xattr.") => {
                        let name = k["SCHILY.xattr.".len()..].to_vec();
                        if name.starts_with(b"trusted.overlay.") {
                            return Err(self.unsafe_entry(
                                &raw_path,
                                "trusted.overlay.* extended attributes are not allowed",
                            ));
                        }
                        meta.xattrs.push((name, value.to_vec()));
                    }
                    _ => {}
                }
            }
        }

        // Whiteouts.
        if let Some(last) = comps.last()
            && let Some(target) = last.strip_prefix(b".wh.")
        {
            let parent = &comps[..comps.len() - 1];
            if target == b".wh..opq" {
                let dir = self.open_dir(parent, &raw_path, true)?;
                return self
                    .set_xattr(dir.as_fd(), b"trusted.overlay.opaque", b"y")
                    .map_err(|e| self.io(&raw_path, "marking opaque", e));
            }
            if target.starts_with(b".wh.") {
                return Ok(()); // aufs metadata (.wh..wh.plnk and the like)
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(self.unsafe_entry(&raw_path, "malformed whiteout"));
            }
            let dir = self.open_dir(parent, &raw_path, true)?;
            let name = cstr(target);
            self.remove_existing(dir.as_fd(), &name, &raw_path)?;
            return mknodat(
                dir.as_fd(),
                name.as_c_str(),
                SFlag::S_IFCHR,
                Mode::empty(),
                0,
            )
            .map_err(|e| self.io(&raw_path, "creating whiteout for", e));
        }

        use tar::EntryType as T;
        if comps.is_empty() {
            // The root directory itself (`./`).
            if kind == T::Directory {
                let root = self
                    .root
                    .try_clone()
                    .map_err(|e| self.io(&raw_path, "dup", e))?;
                self.apply_fd_meta(root.as_fd(), &meta, &raw_path)?;
                self.dir_times.push((Vec::new(), meta.mtime));
            }
            return Ok(());
        }
        let parent = &comps[..comps.len() - 1];
        let name = cstr(&comps[comps.len() - 1]);
        match kind {
            T::Directory => {
                let dir = self.open_dir(parent, &raw_path, true)?;
                match self.kind_at(dir.as_fd(), &name, &raw_path)? {
                    Kind::Dir => {}
                    Kind::Other => {
                        self.remove_existing(dir.as_fd(), &name, &raw_path)?;
                        self.mkdir(dir.as_fd(), &name, &raw_path)?;
                    }
                    Kind::Missing => self.mkdir(dir.as_fd(), &name, &raw_path)?,
                }
                let fd = openat(
                    dir.as_fd(),
                    name.as_c_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.io(&raw_path, "opening directory", e))?;
                self.apply_fd_meta(fd.as_fd(), &meta, &raw_path)?;
                self.dir_times.push((comps.clone(), meta.mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let dir = self.open_dir(parent, &raw_path, true)?;
                self.remove_existing(dir.as_fd(), &name, &raw_path)?;
                let fd = openat(
                    dir.as_fd(),
                    name.as_c_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| self.io(&raw_path, "creating file", e))?;
                let mut file = std::fs::File::from(fd);
                loop {
                    let n = entry
                        .read(&mut self.buf)
                        .map_err(|e| ImageError::BadLayer {
                            layer: self.layer.clone(),
                            reason: format!(
                                "reading {:?}: {e}",
                                String::from_utf8_lossy(&raw_path)
                            ),
                        })?;
                    if n == 0 {
                        break;
                    }
                    std::io::Write::write_all(&mut file, &self.buf[..n])
                        .map_err(|e| self.io(&raw_path, "writing", e))?;
                }
                self.apply_fd_meta(file.as_fd(), &meta, &raw_path)?;
                futimens(file.as_fd(), &ts(meta.mtime), &ts(meta.mtime))
                    .map_err(|e| self.io(&raw_path, "setting times of", e))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(&raw_path, "symlink without target"))?
                    .into_owned();
                if target.contains(&0) || target.is_empty() {
                    return Err(self.unsafe_entry(&raw_path, "malformed symlink target"));
                }
                let dir = self.open_dir(parent, &raw_path, true)?;
                self.remove_existing(dir.as_fd(), &name, &raw_path)?;
                symlinkat(OsStr::from_bytes(&target), dir.as_fd(), name.as_c_str())
                    .map_err(|e| self.io(&raw_path, "creating symlink", e))?;
                fchownat(
                    dir.as_fd(),
                    name.as_c_str(),
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| self.io(&raw_path, "chown", e))?;
                nix::sys::stat::utimensat(
                    dir.as_fd(),
                    name.as_c_str(),
                    &ts(meta.mtime),
                    &ts(meta.mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| self.io(&raw_path, "setting times of", e))?;
            }
            T::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(&raw_path, "hard link without target"))?
                    .into_owned();
                let tcomps =
                    components(&target_raw, &self.layer, "hard link target").map_err(|_| {
                        self.unsafe_entry(
                            &raw_path,
                            format!(
                                "hard link target {:?} is outside the layer",
                                String::from_utf8_lossy(&target_raw)
                            ),
                        )
                    })?;
                if tcomps.is_empty() {
                    return Err(self.unsafe_entry(&raw_path, "hard link to the root"));
                }
                let tname = cstr(&tcomps[tcomps.len() - 1]);
                let in_layer = self
                    .open_dir(&tcomps[..tcomps.len() - 1], &raw_path, false)
                    .ok()
                    .and_then(|d| {
                        fstatat(d.as_fd(), tname.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                            .ok()
                            .map(|st| (d, st))
                    });
                let tdir = match in_layer {
                    Some((_, st)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        return Err(self.unsafe_entry(&raw_path, "hard link to a directory"));
                    }
                    Some((d, _)) => d,
                    // A file of a lower layer: copied up into this one (as overlayfs would),
                    // then linked.
                    None => self.copy_up(&tcomps, &raw_path, &target_raw)?,
                };
                let dir = self.open_dir(parent, &raw_path, true)?;
                if tcomps == comps {
                    return Ok(());
                }
                self.remove_existing(dir.as_fd(), &name, &raw_path)?;
                linkat(
                    tdir.as_fd(),
                    tname.as_c_str(),
                    dir.as_fd(),
                    name.as_c_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| self.io(&raw_path, "creating hard link", e))?;
            }
            T::Char | T::Block | T::Fifo => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let sflag = match kind {
                    T::Char => SFlag::S_IFCHR,
                    T::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let whiteout = kind == T::Char && major == 0 && minor == 0;
                if kind != T::Fifo && !whiteout && !self.opts.allow_devices {
                    return Err(self.unsafe_entry(
                        &raw_path,
                        format!("device node {major}:{minor} refused (devices are not allowed in images)"),
                    ));
                }
                let dir = self.open_dir(parent, &raw_path, true)?;
                self.remove_existing(dir.as_fd(), &name, &raw_path)?;
                mknodat(
                    dir.as_fd(),
                    name.as_c_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    libc::makedev(major, minor),
                )
                .map_err(|e| self.io(&raw_path, "creating node", e))?;
                let fd = openat(
                    dir.as_fd(),
                    name.as_c_str(),
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.io(&raw_path, "opening node", e))?;
                // O_PATH fds do not allow fchown/fchmod: go through the fd's /proc entry, which
                // names exactly this inode (no path lookup in the layer).
                let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
                nix::unistd::chown(
                    proc.as_str(),
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                )
                .map_err(|e| self.io(&raw_path, "chown", e))?;
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    proc.as_str(),
                    Mode::from_bits_truncate(meta.mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| self.io(&raw_path, "chmod", e))?;
                nix::sys::stat::utimensat(
                    dir.as_fd(),
                    name.as_c_str(),
                    &ts(meta.mtime),
                    &ts(meta.mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| self.io(&raw_path, "setting times of", e))?;
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            other => {
                return Err(
                    self.unsafe_entry(&raw_path, format!("unsupported tar entry type {other:?}"))
                );
            }
        }
        Ok(())
    }

    fn mkdir(&self, dir: BorrowedFd<'_>, name: &CString, raw: &[u8]) -> Result<()> {
        mkdirat(dir, name.as_c_str(), Mode::from_bits_truncate(0o700))
            .map_err(|e| self.io(raw, "creating directory", e))
    }

    fn kind_at(&self, dir: BorrowedFd<'_>, name: &CString, raw: &[u8]) -> Result<Kind> {
        match fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Ok(Kind::Dir),
            Ok(_) => Ok(Kind::Other),
            Err(Errno::ENOENT) => Ok(Kind::Missing),
            Err(e) => Err(self.io(raw, "stat", e)),
        }
    }

    /// Removes whatever this layer has at `name` (recursively for a directory).
    fn remove_existing(&self, dir: BorrowedFd<'_>, name: &CString, raw: &[u8]) -> Result<()> {
        match self.kind_at(dir, name, raw)? {
            Kind::Missing => Ok(()),
            Kind::Other => unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| self.io(raw, "replacing", e)),
            Kind::Dir => {
                // The /proc path names the directory fd itself; remove_dir_all does not follow
                // symlinks inside the tree it removes.
                let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
                    .join(OsStr::from_bytes(name.as_bytes()));
                std::fs::remove_dir_all(&path).map_err(|e| self.io(raw, "replacing directory", e))
            }
        }
    }

    /// Opens the directory `comps` of this layer. With `create`, missing directories are
    /// created (with the owner and mode the lower layers give them). Symlinks and non-directories
    /// on the way are refused.
    fn open_dir(&self, comps: &[Vec<u8>], raw: &[u8], create: bool) -> Result<OwnedFd> {
        if comps.is_empty() {
            return self.root.try_clone().map_err(|e| self.io(raw, "dup", e));
        }
        // Fast path: the whole parent at once.
        let path = cstr(&join(comps));
        match openat2(
            self.root.as_fd(),
            path.as_c_str(),
            beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY),
        ) {
            Ok(fd) => return Ok(fd),
            // Diagnosed one component at a time below.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR) => {}
            Err(e) => return Err(self.io(raw, "opening parent of", e)),
        }
        let mut cur = self.root.try_clone().map_err(|e| self.io(raw, "dup", e))?;
        for i in 0..comps.len() {
            let name = cstr(&comps[i]);
            match openat2(
                cur.as_fd(),
                name.as_c_str(),
                beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY),
            ) {
                Ok(fd) => {
                    cur = fd;
                    continue;
                }
                Err(Errno::ENOENT) if create => {}
                Err(Errno::ENOENT) => {
                    return Err(self
                        .unsafe_entry(raw, "refers to a path that does not exist in this layer"));
                }
                Err(Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR) => {
                    let is_link =
                        fstatat(cur.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                    return Err(self.unsafe_entry(
                        raw,
                        format!(
                            "parent {:?} is {}",
                            String::from_utf8_lossy(&join(&comps[..=i])),
                            if is_link {
                                "a symlink"
                            } else {
                                "not a directory"
                            }
                        ),
                    ));
                }
                Err(e) => return Err(self.io(raw, "opening parent of", e)),
            }
            // Missing in this layer: what do the lower layers have there?
            let (mode, uid, gid) = match self.lower_stat(&comps[..=i])? {
                None => (0o755, 0, 0),
                Some(st) => match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR => (st.st_mode & 0o7777, st.st_uid, st.st_gid),
                    libc::S_IFLNK => {
                        return Err(self.unsafe_entry(
                            raw,
                            format!(
                                "parent {:?} is a symlink in a lower layer",
                                String::from_utf8_lossy(&join(&comps[..=i]))
                            ),
                        ));
                    }
                    _ => {
                        return Err(self.unsafe_entry(
                            raw,
                            format!(
                                "parent {:?} is not a directory in a lower layer",
                                String::from_utf8_lossy(&join(&comps[..=i]))
                            ),
                        ));
                    }
                },
            };
            self.mkdir(cur.as_fd(), &name, raw)?;
            let fd = openat(
                cur.as_fd(),
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io(raw, "opening new directory for", e))?;
            fchown(
                fd.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
            .map_err(|e| self.io(raw, "chown", e))?;
            fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))
                .map_err(|e| self.io(raw, "chmod", e))?;
            cur = fd;
        }
        Ok(cur)
    }

    /// The entry at `comps` in the merged view of the lower layers (`None` when absent or
    /// whited out). Never follows a symlink.
    fn lower_stat(&self, comps: &[Vec<u8>]) -> Result<Option<FileStat>> {
        if self.lower_paths.is_empty() {
            return Ok(None);
        }
        if self.lowers.borrow().is_none() {
            (self.wait_lowers.borrow_mut())()?;
            let mut fds = Vec::new();
            for l in &self.lower_paths {
                let fd = openat(
                    nix::fcntl::AT_FDCWD,
                    l.as_path(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| {
                    ImageError::io(format!("opening lower snapshot {}", l.display()), e)
                })?;
                fds.push(fd);
            }
            *self.lowers.borrow_mut() = Some(fds);
        }
        let lowers = self.lowers.borrow();
        let path = cstr(&join(comps));
        for l in lowers.iter().flatten() {
            match openat2(l.as_fd(), path.as_c_str(), beneath(OFlag::O_PATH)) {
                Ok(fd) => {
                    let Ok(st) = fstat(fd.as_fd()) else {
                        return Ok(None);
                    };
                    if st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0 {
                        return Ok(None); // whiteout
                    }
                    return Ok(Some(st));
                }
                Err(Errno::ENOENT) => continue,
                Err(_) => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Copies the regular file `comps` of the lower layers into this layer (same content,
    /// owner, mode and mtime); returns its directory in this layer.
    fn copy_up(&self, comps: &[Vec<u8>], raw: &[u8], target_raw: &[u8]) -> Result<OwnedFd> {
        let missing = || {
            self.unsafe_entry(
                raw,
                format!(
                    "hard link target {:?} is neither an earlier entry of this layer nor a file of a lower layer",
                    String::from_utf8_lossy(target_raw)
                ),
            )
        };
        let Some(st) = self.lower_stat(comps)? else {
            return Err(missing());
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(missing());
        }
        let path = cstr(&join(comps));
        let src = {
            let lowers = self.lowers.borrow();
            lowers
                .iter()
                .flatten()
                .find_map(|l| openat2(l.as_fd(), path.as_c_str(), beneath(OFlag::O_RDONLY)).ok())
                .ok_or_else(missing)?
        };
        let dir = self.open_dir(&comps[..comps.len() - 1], raw, true)?;
        let name = cstr(&comps[comps.len() - 1]);
        let fd = openat(
            dir.as_fd(),
            name.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.io(raw, "copying up hard link target for", e))?;
        let mut out = std::fs::File::from(fd);
        std::io::copy(&mut std::fs::File::from(src), &mut out)
            .map_err(|e| self.io(raw, "copying up hard link target for", e))?;
        let meta = Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: u64::try_from(st.st_mtime).unwrap_or(0),
            xattrs: Vec::new(),
        };
        self.apply_fd_meta(out.as_fd(), &meta, raw)?;
        futimens(out.as_fd(), &ts(meta.mtime), &ts(meta.mtime))
            .map_err(|e| self.io(raw, "setting times of", e))?;
        Ok(dir)
    }

    fn set_xattr(&self, fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> std::io::Result<()> {
        let name = CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: fd is a valid open descriptor, name is NUL-terminated, value/len describe a
        // live slice.
        let r = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Owner, then mode (chown clears set-id bits), then xattrs, of an open file or directory.
    fn apply_fd_meta(&self, fd: BorrowedFd<'_>, meta: &Meta, raw: &[u8]) -> Result<()> {
        fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| self.io(raw, "chown", e))?;
        fchmod(fd, Mode::from_bits_truncate(meta.mode)).map_err(|e| self.io(raw, "chmod", e))?;
        for (k, v) in &meta.xattrs {
            if let Err(e) = self.set_xattr(fd, k, v) {
                tracing::warn!(
                    layer = %self.layer,
                    path = %String::from_utf8_lossy(raw),
                    xattr = %String::from_utf8_lossy(k),
                    error = %e,
                    "extended attribute not set"
                );
            }
        }
        Ok(())
    }

    /// Directory mtimes, last (creating entries inside a directory changes its mtime).
    fn finish(&mut self) -> Result<()> {
        let times = std::mem::take(&mut self.dir_times);
        for (comps, mtime) in times.iter().rev() {
            let fd = match self.open_dir(comps, &join(comps), false) {
                Ok(fd) => fd,
                Err(_) => continue, // replaced later in the layer
            };
            futimens(fd.as_fd(), &ts(*mtime), &ts(*mtime))
                .map_err(|e| self.io(&join(comps), "setting times of", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    enum E<'a> {
        Dir(&'a str, u32, u32),
        File(&'a str, &'a [u8]),
        Symlink(&'a str, &'a str),
    }

    fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_ustar();
            let (path, data): (&str, &[u8]) = match e {
                E::Dir(p, mode, uid) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_uid(u64::from(*uid));
                    (p, b"")
                }
                E::File(p, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    (p, d)
                }
                E::Symlink(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_link_name(t).expect("link name");
                    (p, b"")
                }
            };
            h.set_path(path).expect("path");
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn unpack(
        dir: &Path,
        name: &str,
        data: &[u8],
        diff: Option<&Digest>,
        lowers: &[PathBuf],
    ) -> Result<PathBuf> {
        let blob = dir.join(format!("{name}.tar"));
        std::fs::write(&blob, data).expect("blob");
        let target = dir.join(name);
        std::fs::create_dir(&target).expect("target");
        let d = Digest::of(data);
        unpack_layer(
            &blob,
            &d,
            diff.unwrap_or(&d),
            &target,
            lowers,
            &mut || Ok(()),
            UnpackOptions::default(),
        )?;
        Ok(target)
    }

    #[test]
    fn whiteouts_opaque_dirs_and_implicit_parents() {
        let dir = tempfile::Builder::new()
            .prefix("dh-unpack-")
            .tempdir()
            .expect("tempdir");
        let l1 = unpack(
            dir.path(),
            "l1",
            &tar(&[
                E::Dir("d/", 0o750, 1000),
                E::File("d/a", b"a"),
                E::File("gone", b"x"),
                E::Dir("x/", 0o755, 0),
            ]),
            None,
            &[],
        )
        .expect("lower layer");
        let l2 = unpack(
            dir.path(),
            "l2",
            &tar(&[
                E::File("d/b", b"b"),
                E::File(".wh.gone", b""),
                E::File("x/.wh..wh..opq", b""),
                E::File("x/new", b"n"),
            ]),
            None,
            std::slice::from_ref(&l1),
        )
        .expect("upper layer");
        let d = std::fs::metadata(l2.join("d")).expect("implicit d");
        assert_eq!(
            (d.mode() & 0o7777, d.uid()),
            (0o750, 1000),
            "lower's owner and mode"
        );
        let w = std::fs::symlink_metadata(l2.join("gone")).expect("whiteout");
        assert!(w.file_type().is_char_device() && w.rdev() == 0);
        assert!(!l2.join(".wh.gone").exists());
        let mut buf = [0u8; 4];
        let path = CString::new(l2.join("x").as_os_str().as_bytes()).expect("path");
        let name = CString::new("trusted.overlay.opaque").expect("name");
        // SAFETY: valid NUL-terminated strings and a live buffer.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1);
        assert_eq!(buf[0], b'y');
    }

    #[test]
    fn hard_links_to_lower_files_are_copied_up() {
        let dir = tempfile::Builder::new()
            .prefix("dh-unpack-")
            .tempdir()
            .expect("tempdir");
        let l1 = unpack(
            dir.path(),
            "l1",
            &tar(&[E::File("a/t", b"lower")]),
            None,
            &[],
        )
        .expect("lower");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Link);
        h.set_path("h").expect("path");
        h.set_link_name("a/t").expect("link");
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b""[..]).expect("append");
        let data = b.into_inner().expect("tar");
        let l2 = unpack(dir.path(), "l2", &data, None, std::slice::from_ref(&l1)).expect("upper");
        assert_eq!(std::fs::read(l2.join("h")).expect("h"), b"lower");
        let (a, h) = (
            std::fs::metadata(l2.join("a/t")).expect("copied up"),
            std::fs::metadata(l2.join("h")).expect("h"),
        );
        assert_eq!(a.ino(), h.ino());
        // Without such a lower file: refused.
        let err = unpack(dir.path(), "l3", &data, None, &[]).expect_err("no target");
        assert!(err.to_string().contains("hard link target"), "{err}");
    }

    #[test]
    fn refusals_leave_clear_errors() {
        let dir = tempfile::Builder::new()
            .prefix("dh-unpack-")
            .tempdir()
            .expect("tempdir");
        let err = unpack(
            dir.path(),
            "s",
            &tar(&[E::Symlink("up", "/"), E::File("up/x", b"x")]),
            None,
            &[],
        )
        .expect_err("through a symlink");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        let data = tar(&[E::File("ok", b"ok")]);
        let err =
            unpack(dir.path(), "d", &data, Some(&Digest::of(b"other")), &[]).expect_err("diff_id");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn component_rules() {
        let ok = components(b"./a//b/./c/", "l", "entry").expect("ok");
        assert_eq!(ok, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert!(components(b"./", "l", "entry").expect("root").is_empty());
        assert!(components(b"../x", "l", "entry").is_err());
        assert!(components(b"a/../../x", "l", "entry").is_err());
        assert!(components(b"/etc/passwd", "l", "entry").is_err());
    }
}
