//! The pod's volumes on the node and what the kubelet prepares for each container.
//!
//! Volumes live under `<root-dir>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>`.
//! configMap, secret, downwardAPI and projected volumes are written as upstream's atomic
//! writer does ([`write_payload`]): the files go to a new timestamped directory
//! `..<timestamp>.<n>`, the `..data` symlink is swapped to it by rename, and each top-level
//! name is a symlink `<name> -> ..data/<name>`; a reader sees the old set of files or the new
//! one, never a mix. [`setup`] runs on every sync of the pod and again every
//! [`RESYNC_PERIOD`] (as upstream's TTL cache), so a changed ConfigMap or Secret shows up in
//! running containers; a service-account token is requested again at 80% of its lifetime.
//! emptyDir with `medium: Memory` is a tmpfs mounted on the volume directory. [`teardown`]
//! unmounts whatever is mounted beneath the pod's directory before it is removed.
//!
//! A pod's `securityContext.fsGroup` is applied as upstream's `SetVolumeOwnership`
//! ([`set_volume_ownership`]): an emptyDir once when it is set up (upstream's ready file
//! under `plugins/kubernetes.io~empty-dir/<name>/`, honouring `fsGroupChangePolicy:
//! OnRootMismatch`), an atomic-writer volume on every write before the new data becomes
//! visible ([`write_payload_owned`]); hostPath volumes never.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use deckhand_proto::cri::ContainerConfig;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
    ServiceAccountTokenProjection, Volume,
};
use kube::api::{Api, PostParams};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

use super::env::{self, Allocatable, Objects, Resolved};
use super::spec::{self, ContainerInputs, RuntimeFacts};
use super::worker::Context;
use crate::events::EventType;
use crate::quantity;

/// How soon a container whose config could not be made (a missing ConfigMap or key) is tried
/// again.
pub const CONFIG_ERROR_RETRY: Duration = Duration::from_secs(5);
/// How often the volumes of API objects are rewritten from the API (upstream's sync period
/// and ConfigMap/Secret cache TTL).
pub const RESYNC_PERIOD: Duration = Duration::from_secs(60);
/// The default file mode of configMap, secret, downwardAPI and projected volumes.
pub const DEFAULT_MODE: u32 = 0o644;
/// The `..data` symlink of the atomic writer.
const DATA_DIR: &str = "..data";
const DATA_DIR_TMP: &str = "..data_tmp";
/// The default lifetime of a projected service-account token.
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// An error of the atomic writer.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A payload path that would leave the volume directory or hide the writer's own names.
    #[error("invalid path {0:?} in the volume's payload")]
    InvalidPath(String),
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Something the writer did not make is in the way.
    #[error("{0}: is not a symlink made by the kubelet")]
    InTheWay(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    /// The content.
    pub data: Vec<u8>,
    /// The permission bits.
    pub mode: u32,
}

/// A volume's files by relative path.
pub type Payload = BTreeMap<String, Projection>;

/// Checks a payload path as upstream's `validatePath`: relative, no `..` element, not
/// starting with `..`, no empty elements.
pub fn validate_path(p: &str) -> Result<(), WriteError> {
    let bad = || WriteError::InvalidPath(p.to_string());
    if p.is_empty() || p.len() > 4096 || p.starts_with("..") || p.contains('\0') {
        return Err(bad());
    }
    if Path::new(p).is_absolute() {
        return Err(bad());
    }
    for part in p.split('/') {
        if part.is_empty() || part == ".." || part == "." {
            return Err(bad());
        }
    }
    Ok(())
}

/// Opens `rel` beneath `dir` for reading: symlinks are followed only while they stay
/// beneath `dir`, magic links never.
pub fn open_beneath(dir: &Path, rel: &str) -> std::io::Result<std::fs::File> {
    let root = std::fs::File::open(dir)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd: OwnedFd = nix::fcntl::openat2(root.as_fd(), rel, how).map_err(std::io::Error::from)?;
    Ok(std::fs::File::from(fd))
}

/// The files beneath `dir` (no symlinks followed), relative paths to content and mode;
/// `None` when something else than files and directories is there.
fn read_tree(dir: &Path) -> Option<Payload> {
    fn walk(base: &Path, rel: &str, out: &mut Payload) -> Option<()> {
        let here = if rel.is_empty() {
            base.to_path_buf()
        } else {
            base.join(rel)
        };
        for entry in std::fs::read_dir(&here).ok()? {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = entry.path().symlink_metadata().ok()?;
            if meta.is_dir() {
                walk(base, &path, out)?;
            } else if meta.is_file() {
                let data = std::fs::read(entry.path()).ok()?;
                let mode = meta.permissions().mode() & 0o7777;
                out.insert(path, Projection { data, mode });
            } else {
                return None;
            }
        }
        Some(())
    }
    let mut out = Payload::new();
    walk(dir, "", &mut out)?;
    Some(out)
}

/// The directory `..data` points to in `dir`, when it is one of the writer's.
fn current_data_dir(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir.join(DATA_DIR)).ok()?;
    let name = target.to_str()?;
    if !name.starts_with("..") || name.contains('/') || name == DATA_DIR {
        return None;
    }
    dir.join(name)
        .symlink_metadata()
        .ok()
        .filter(|m| m.is_dir())
        .map(|_| name.to_string())
}

/// The first element of a payload path (the user-visible name in the volume's top level).
fn top(p: &str) -> &str {
    p.split('/').next().unwrap_or(p)
}

/// Writes `payload` to the volume directory `dir` as upstream's atomic writer; returns
/// whether anything changed. `dir` must exist and be a directory (not a symlink).
pub fn write_payload(dir: &Path, payload: &Payload) -> Result<bool, WriteError> {
    write_payload_owned(dir, payload, None)
}

/// As [`write_payload`], with the pod's fsGroup applied as upstream's `setPerms` does: after
/// the new data directory is written and before it becomes visible, the whole volume is
/// walked by [`set_volume_ownership`] (read-only: `0440` added to files; directories also
/// setgid and `0110`), and the links made afterwards get the group too. A payload already
/// on disk counts as unchanged only when its modes are the owned ones and every file has the
/// group, so ownership holds after every write.
pub fn write_payload_owned(
    dir: &Path,
    payload: &Payload,
    fs_group: Option<u32>,
) -> Result<bool, WriteError> {
    for p in payload.keys() {
        validate_path(p)?;
    }
    let meta = dir.symlink_metadata().map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(WriteError::InTheWay(dir.to_path_buf()));
    }
    for name in payload.keys().map(|p| top(p)) {
        let link = dir.join(name);
        if link
            .symlink_metadata()
            .is_ok_and(|m| !m.file_type().is_symlink())
        {
            return Err(WriteError::InTheWay(link));
        }
    }
    let ownership = fs_group.map(|gid| Ownership {
        gid,
        read_only: true,
        on_root_mismatch: false,
    });
    let old = current_data_dir(dir);
    let old_payload = old.as_ref().and_then(|o| read_tree(&dir.join(o)));
    let unchanged = match &ownership {
        None => old_payload.as_ref() == Some(payload),
        Some(o) => {
            let expected: Payload = payload
                .iter()
                .map(|(k, f)| {
                    let mode = o.mode_of(f.mode & 0o7777, false);
                    (k.clone(), Projection { mode, ..f.clone() })
                })
                .collect();
            old_payload.as_ref() == Some(&expected)
                && !needs_ownership_change(dir, o)
                && old
                    .as_ref()
                    .is_some_and(|d| tree_has_gid(&dir.join(d), o.gid))
        }
    };
    if unchanged && payload.keys().all(|p| user_link_ok(dir, top(p))) {
        return Ok(false);
    }
    // A new data directory, written completely before it becomes visible.
    let stamp = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y_%m_%d_%H_%M_%S")
        .to_string();
    let mut n = 0u32;
    let (ts_name, ts_dir) = loop {
        let name = format!("..{stamp}.{}{n}", std::process::id());
        let path = dir.join(&name);
        match std::fs::create_dir(&path) {
            Ok(()) => break (name, path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(io(&path)(e)),
        }
    };
    // 0755 whatever the umask, as upstream's `newTimestampDir`.
    let mut written = std::fs::set_permissions(&ts_dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io(&ts_dir))
        .and_then(|()| write_tree(&ts_dir, payload));
    if let (Ok(()), Some(o)) = (&written, &ownership) {
        // As upstream: the whole volume, as the first write also makes files outside the
        // timestamped directory.
        written = set_volume_ownership(dir, o).map(|_| ());
    }
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&ts_dir);
        return Err(e);
    }
    // The links made from here on get the group too (a failure is logged, as the walk's).
    let lchown = |path: &Path| {
        if let Some(gid) = fs_group
            && let Err(e) = std::os::unix::fs::lchown(path, None, Some(gid))
        {
            tracing::warn!(path = %path.display(), "fsGroup: chown failed: {e}");
        }
    };
    let tmp = dir.join(DATA_DIR_TMP);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
        _ => {}
    }
    std::os::unix::fs::symlink(&ts_name, &tmp).map_err(io(&tmp))?;
    lchown(&tmp);
    let data = dir.join(DATA_DIR);
    std::fs::rename(&tmp, &data).map_err(io(&data))?;
    // The user-visible names.
    for name in payload.keys().map(|p| top(p)) {
        if user_link_ok(dir, name) {
            continue;
        }
        let link = dir.join(name);
        match link.symlink_metadata() {
            Ok(m) if !m.file_type().is_symlink() => return Err(WriteError::InTheWay(link)),
            Ok(_) => std::fs::remove_file(&link).map_err(io(&link))?,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(Path::new(DATA_DIR).join(name), &link).map_err(io(&link))?;
        lchown(&link);
    }
    // Names no longer in the payload, and the old data directory.
    if let Some(old_payload) = &old_payload {
        for name in old_payload.keys().map(|p| top(p)) {
            if payload.keys().any(|p| top(p) == name) {
                continue;
            }
            let link = dir.join(name);
            if link
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                std::fs::remove_file(&link).map_err(io(&link))?;
            }
        }
    }
    if let Some(old) = old
        && old != ts_name
    {
        let path = dir.join(old);
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(true)
}

/// Whether `dir/name` is the writer's symlink to `..data/name`.
fn user_link_ok(dir: &Path, name: &str) -> bool {
    std::fs::read_link(dir.join(name)).is_ok_and(|t| t == Path::new(DATA_DIR).join(name))
}

/// Writes the payload's files into the new (empty, private) directory `base`.
fn write_tree(base: &Path, payload: &Payload) -> Result<(), WriteError> {
    for (rel, file) in payload {
        let path = base.join(rel);
        let mut parent = base.to_path_buf();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            parent.push(part);
            match std::fs::create_dir(&parent) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let m = parent.symlink_metadata().map_err(io(&parent))?;
                    if !m.is_dir() {
                        return Err(WriteError::InTheWay(parent));
                    }
                }
                Err(e) => return Err(io(&parent)(e)),
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(file.mode & 0o777)
            .open(&path)
            .map_err(io(&path))?;
        f.write_all(&file.data).map_err(io(&path))?;
        // The mode exactly, whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o7777))
            .map_err(io(&path))?;
    }
    Ok(())
}

/// What fsGroup adds to every file and directory of a writable volume (upstream's `rwMask`).
const FS_GROUP_RW: u32 = 0o660;
/// What fsGroup adds to every file and directory of a read-only volume (`roMask`).
const FS_GROUP_RO: u32 = 0o440;
/// What fsGroup adds to directories besides setgid (`execMask`).
const FS_GROUP_EXEC: u32 = 0o110;
/// The setgid bit.
const SETGID: u32 = 0o2000;

/// A pod's fsGroup as it applies to one volume (the arguments of upstream's
/// `SetVolumeOwnership`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// The group every file and directory gets (the owner stays).
    pub gid: u32,
    /// The volume is read-only to the pod (configMap, secret, downwardAPI, projected): read
    /// bits for the group instead of read-write.
    pub read_only: bool,
    /// `fsGroupChangePolicy: OnRootMismatch`: no walk when the volume's root already has the
    /// group, the setgid bit and the group's bits.
    pub on_root_mismatch: bool,
}

impl Ownership {
    fn mask(&self) -> u32 {
        if self.read_only {
            FS_GROUP_RO
        } else {
            FS_GROUP_RW
        }
    }

    /// The permission bits (`0o7777`) `mode` becomes (upstream's `changeFilePermission`).
    pub fn mode_of(&self, mode: u32, dir: bool) -> u32 {
        let extra = if dir {
            self.mask() | FS_GROUP_EXEC | SETGID
        } else {
            self.mask()
        };
        (mode & 0o7777) | extra
    }
}

/// The pod's `securityContext.fsGroup`; an error when it is no group ID.
pub fn pod_fs_group(pod: &Pod) -> Result<Option<u32>, String> {
    let Some(g) = spec::spec(pod)
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group)
    else {
        return Ok(None);
    };
    u32::try_from(g)
        .ok()
        .filter(|g| *g != u32::MAX)
        .map(Some)
        .ok_or_else(|| format!("securityContext.fsGroup {g} is not a valid group ID"))
}

/// Whether the pod's `fsGroupChangePolicy` is `OnRootMismatch` (anything else walks always,
/// as upstream).
pub fn on_root_mismatch(pod: &Pod) -> bool {
    spec::spec(pod)
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group_change_policy.as_deref())
        == Some("OnRootMismatch")
}

/// Whether the volume root `dir` lacks what [`set_volume_ownership`] gives it (upstream's
/// `requiresPermissionChange`): the group, a directory with the setgid bit and the group's
/// bits.
pub fn needs_ownership_change(dir: &Path, o: &Ownership) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = dir.symlink_metadata() else {
        return true;
    };
    if m.gid() != o.gid || !m.is_dir() {
        return true;
    }
    let want = o.mask() | FS_GROUP_EXEC;
    m.mode() & want != want || m.mode() & SETGID == 0
}

/// Whether the directory `dir` and everything beneath it (no symlink followed) has group
/// `gid`.
fn tree_has_gid(dir: &Path, gid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = dir.symlink_metadata() else {
        return false;
    };
    if m.gid() != gid {
        return false;
    }
    if !m.is_dir() {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .into_iter()
        .all(|e| e.is_ok_and(|e| tree_has_gid(&e.path(), gid)))
}

fn errno_io(path: &Path) -> impl Fn(nix::errno::Errno) -> WriteError + '_ {
    move |e| WriteError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

/// The names in the directory open as `fd` (read through its `/proc/self/fd` link, so the
/// directory cannot be swapped for another).
fn dir_names(fd: &OwnedFd, path: &Path) -> Result<Vec<std::ffi::OsString>, WriteError> {
    let listing =
        std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(io(path))?;
    listing
        .map(|e| e.map(|e| e.file_name()).map_err(io(path)))
        .collect()
}

fn is_dir_mode(mode: u32) -> bool {
    mode & nix::libc::S_IFMT == nix::libc::S_IFDIR
}

/// A directory being walked: its descriptor, its mode and the names still to visit.
struct Level {
    fd: OwnedFd,
    path: PathBuf,
    mode: u32,
    names: std::vec::IntoIter<std::ffi::OsString>,
}

/// Gives every file and directory beneath the volume directory `dir` (itself included, last)
/// the group `o.gid` and the group's bits, as upstream's `SetVolumeOwnership`: the owner
/// stays, files get `0660` (`0440` read-only) added, directories also the setgid bit and
/// `0110`. Symlinks get the group but no chmod; nothing is followed: each entry is opened
/// `O_PATH|O_NOFOLLOW` beneath its parent's descriptor and changed through that descriptor,
/// so the walk never leaves `dir` even while a container renames things in it. A failed chown
/// or chmod is logged and the walk goes on (as upstream); an entry that disappears is
/// skipped. With `o.on_root_mismatch` nothing is done when the root is already right.
/// Returns whether the volume was walked.
pub fn set_volume_ownership(dir: &Path, o: &Ownership) -> Result<bool, WriteError> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::Mode;
    use nix::unistd::Gid;
    if o.on_root_mismatch && !needs_ownership_change(dir, o) {
        tracing::debug!(dir = %dir.display(), "volume ownership already set, skipping (OnRootMismatch)");
        return Ok(false);
    }
    let gid = Some(Gid::from_raw(o.gid));
    let root = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_io(dir))?;
    let st = nix::sys::stat::fstat(&root).map_err(errno_io(dir))?;
    let names = dir_names(&root, dir)?;
    let mut stack = vec![Level {
        fd: root,
        path: dir.to_path_buf(),
        mode: st.st_mode,
        names: names.into_iter(),
    }];
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.next() else {
            // Every child done: the directory itself.
            let Some(done) = stack.pop() else { break };
            if let Err(e) = nix::unistd::fchown(&done.fd, None, gid) {
                tracing::warn!(path = %done.path.display(), "fsGroup: chown failed: {e}");
            }
            let mode = Mode::from_bits_truncate(o.mode_of(done.mode, true) as nix::libc::mode_t);
            if let Err(e) = nix::sys::stat::fchmod(&done.fd, mode) {
                tracing::warn!(path = %done.path.display(), "fsGroup: chmod failed: {e}");
            }
            continue;
        };
        let path = level.path.join(&name);
        let fd = match nix::fcntl::openat(
            &level.fd,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(errno_io(&path)(e)),
        };
        let st = nix::sys::stat::fstat(&fd).map_err(errno_io(&path))?;
        if is_dir_mode(st.st_mode) {
            // The same directory, opened for reading through the O_PATH descriptor.
            let d = nix::fcntl::openat(
                &fd,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno_io(&path))?;
            let names = dir_names(&d, &path)?;
            stack.push(Level {
                fd: d,
                path,
                mode: st.st_mode,
                names: names.into_iter(),
            });
            continue;
        }
        // The entry itself (a symlink included): AT_EMPTY_PATH on its O_PATH descriptor.
        if let Err(e) = nix::unistd::fchownat(&fd, "", None, gid, AtFlags::AT_EMPTY_PATH) {
            tracing::warn!(path = %path.display(), "fsGroup: chown failed: {e}");
        }
        if st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFLNK {
            continue;
        }
        // chmod through the descriptor's /proc link reaches this very inode (no open).
        let mode = o.mode_of(st.st_mode, false);
        if let Err(e) = std::fs::set_permissions(
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            std::fs::Permissions::from_mode(mode),
        ) {
            tracing::warn!(path = %path.display(), "fsGroup: chmod failed: {e}");
        }
    }
    Ok(true)
}

/// Where upstream's emptyDir plugin records that a volume is set up:
/// `<pod dir>/plugins/kubernetes.io~empty-dir/<name>/ready`.
fn empty_dir_ready(pods_dir: &Path, pod: &Pod, name: &str) -> PathBuf {
    spec::pod_dir(pods_dir, pod)
        .join("plugins")
        .join("kubernetes.io~empty-dir")
        .join(name)
        .join("ready")
}

/// The payload of a key→bytes map with `items` (key → path and mode) or all keys, as
/// upstream's `MakePayload` of the configMap and secret plugins.
fn key_payload(
    what: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<Payload, String> {
    let mut out = Payload::new();
    match items {
        Some(items) if !items.is_empty() => {
            for i in items {
                let Some(v) = data.get(&i.key) else {
                    if optional {
                        continue;
                    }
                    return Err(format!(
                        "{what} references non-existent {what} key: {}",
                        i.key
                    ));
                };
                let mode = i.mode.map_or(default_mode, |m| m as u32);
                out.insert(
                    i.path.clone(),
                    Projection {
                        data: v.clone(),
                        mode,
                    },
                );
            }
        }
        _ => {
            for (k, v) in data {
                out.insert(
                    k.clone(),
                    Projection {
                        data: v.clone(),
                        mode: default_mode,
                    },
                );
            }
        }
    }
    Ok(out)
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// A ConfigMap's payload; a missing optional one is empty.
fn config_map_payload(
    objects: &Objects,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<Payload, String> {
    match objects.config_map(name)? {
        Some(cm) => key_payload(
            "configMap",
            &config_map_data(cm),
            items,
            default_mode,
            optional,
        ),
        None if optional => Ok(Payload::new()),
        None => Err(format!("configmap {name:?} not found")),
    }
}

/// A Secret's payload; a missing optional one is empty.
fn secret_payload(
    objects: &Objects,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<Payload, String> {
    match objects.secret(name)? {
        Some(s) => key_payload("secret", &secret_data(s), items, default_mode, optional),
        None if optional => Ok(Payload::new()),
        None => Err(format!("secret {name:?} not found")),
    }
}

/// Go's `%q` of a string (strconv.Quote), as the downward API writes label values.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Labels or annotations as the downward API writes them: `key="value"` lines, sorted.
fn format_map(m: Option<&BTreeMap<String, String>>) -> String {
    m.iter()
        .flat_map(|m| m.iter())
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The downward API payload of `items`.
fn downward_payload(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    allocatable: &Allocatable,
) -> Result<Payload, String> {
    let mut out = Payload::new();
    for i in items {
        let value = if let Some(f) = &i.field_ref {
            match f.field_path.as_str() {
                "metadata.labels" => format_map(pod.metadata.labels.as_ref()),
                "metadata.annotations" => format_map(pod.metadata.annotations.as_ref()),
                p @ ("metadata.name" | "metadata.namespace" | "metadata.uid") => {
                    spec::field_value(pod, p, &RuntimeFacts::default())?
                }
                p if p.starts_with("metadata.labels['")
                    || p.starts_with("metadata.annotations['") =>
                {
                    spec::field_value(pod, p, &RuntimeFacts::default())?
                }
                p => {
                    return Err(format!(
                        "downwardAPI {:?}: unsupported fieldRef {p:?}",
                        i.path
                    ));
                }
            }
        } else if let Some(r) = &i.resource_field_ref {
            let name = r.container_name.as_deref().unwrap_or_default();
            let c = env::find_container(pod, name)
                .ok_or_else(|| format!("downwardAPI {:?}: no container {name:?}", i.path))?;
            env::resource_field_value(c, r, allocatable)?
        } else {
            return Err(format!(
                "downwardAPI {:?}: neither fieldRef nor resourceFieldRef",
                i.path
            ));
        };
        out.insert(
            i.path.clone(),
            Projection {
                data: value.into_bytes(),
                mode: i.mode.map_or(default_mode, |m| m as u32),
            },
        );
    }
    Ok(out)
}

/// `iat` and `exp` of a JWT (not verified: it is the token the kubelet wrote).
pub fn jwt_times(token: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(token).ok()?;
    let claims = text.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((v.get("iat")?.as_i64()?, v.get("exp")?.as_i64()?))
}

/// When a token issued at `iat` expiring at `exp` is due again (upstream's token manager: at
/// 80% of its lifetime, or after 24 h).
pub fn token_refresh_at(iat: i64, exp: i64) -> i64 {
    let ttl = (exp - iat).max(0);
    iat + (ttl * 8 / 10).min(24 * 3600)
}

/// A projected service-account token: the one in the volume while it is not due, a new one
/// from the TokenRequest API otherwise. Returns the token and the seconds until it is due.
async fn service_account_token(
    ctx: &Context,
    pod: &Pod,
    dir: &Path,
    src: &ServiceAccountTokenProjection,
) -> Result<(Vec<u8>, i64), String> {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    if let Ok(mut f) = open_beneath(dir, &format!("{DATA_DIR}/{}", src.path)) {
        let mut current = Vec::new();
        if std::io::Read::read_to_end(&mut f, &mut current).is_ok()
            && let Some((iat, exp)) = jwt_times(&current)
        {
            let due = token_refresh_at(iat, exp);
            if now < due && now < exp {
                return Ok((current, due - now));
            }
        }
    }
    let Some(client) = &ctx.client else {
        return Err("serviceAccountToken: the kubelet has no API client".into());
    };
    let (name, ns, uid) = spec::ids(pod);
    let s = spec::spec(pod);
    let sa = s
        .service_account_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: src
                .audience
                .clone()
                .filter(|a| !a.is_empty())
                .into_iter()
                .collect(),
            expiration_seconds: Some(src.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let got: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &req)
        .await
        .map_err(|e| format!("requesting a token of service account {ns}/{sa}: {e}"))?;
    let token = got
        .status
        .map(|s| s.token.into_bytes())
        .ok_or_else(|| format!("requesting a token of service account {ns}/{sa}: no status"))?;
    let left = match jwt_times(&token) {
        Some((iat, exp)) => token_refresh_at(iat, exp) - now,
        None => src.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS) * 8 / 10,
    };
    tracing::info!(pod = %spec::full_name(pod), service_account = %sa, "requested a service account token");
    Ok((token, left))
}

/// The mode bits of `defaultMode` (or upstream's default).
fn default_mode(m: Option<i32>) -> u32 {
    m.map_or(DEFAULT_MODE, |m| (m as u32) & 0o7777)
}

/// Whether `dir` is a mount point (in `/proc/self/mountinfo`).
fn is_mount_point(dir: &Path) -> bool {
    mount_points().iter().any(|m| m == dir)
}

/// Every mount point of this mount namespace.
fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> std::ffi::OsString {
    std::ffi::OsString::from_vec(deckhand_cgroups::layout::unescape_mountinfo(s))
}

/// Mounts a tmpfs of `size` bytes on `dir` unless something is mounted there already;
/// returns whether it mounted one.
fn ensure_tmpfs(dir: &Path, size: u64) -> Result<bool, String> {
    if is_mount_point(dir) {
        return Ok(false);
    }
    let opts = format!("size={size}");
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting a tmpfs on {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    tracing::info!(dir = %dir.display(), size, "mounted a tmpfs for an emptyDir");
    Ok(true)
}

/// Sets up an emptyDir as upstream's plugin: once (until its ready file exists, or when its
/// tmpfs had to be mounted again) the directory gets mode 0777 whatever the umask, and with an
/// fsGroup the ownership of [`set_volume_ownership`] (read-write, the pod's
/// `fsGroupChangePolicy`); a failed ownership change is logged, as upstream.
fn setup_empty_dir(
    pods_dir: &Path,
    pod: &Pod,
    v: &Volume,
    dir: &Path,
    existed: bool,
    mounted: bool,
    fs_group: Option<u32>,
) -> Result<(), String> {
    let ready = empty_dir_ready(pods_dir, pod, &v.name);
    if existed && !mounted && ready.symlink_metadata().is_ok() {
        return Ok(());
    }
    // As upstream's `setupDir`: only when the permission bits differ (a root made setgid by
    // an earlier walk keeps it).
    let perm = dir
        .symlink_metadata()
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .permissions()
        .mode();
    if perm & 0o777 != 0o777 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if let Some(gid) = fs_group {
        let o = Ownership {
            gid,
            read_only: false,
            on_root_mismatch: on_root_mismatch(pod),
        };
        match set_volume_ownership(dir, &o) {
            Ok(true) => {
                tracing::info!(pod = %spec::full_name(pod), volume = %v.name, gid, "volume ownership set")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(pod = %spec::full_name(pod), volume = %v.name, "setting the volume's ownership: {e}")
            }
        }
    }
    if let Some(parent) = ready.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&ready, b"").map_err(|e| format!("{}: {e}", ready.display()))
}

/// Sets up every volume of the pod that the kubelet writes or mounts (emptyDir Memory,
/// configMap, secret, downwardAPI, projected). Returns when to run again (the resync of API
/// data, sooner for a token due), `None` when nothing needs it. An error names the volume.
pub async fn setup(ctx: &Context, pod: &Pod) -> Result<Option<Duration>, String> {
    let r = setup_all(ctx, pod).await;
    if let Err(e) = &r {
        tracing::warn!(pod = %spec::full_name(pod), "MountVolume.SetUp failed: {e}");
        ctx.events.event(
            pod,
            None,
            EventType::Warning,
            "FailedMount",
            format!("MountVolume.SetUp failed for {e}"),
        );
    }
    r
}

async fn setup_all(ctx: &Context, pod: &Pod) -> Result<Option<Duration>, String> {
    let s = spec::spec(pod);
    let volumes: Vec<&Volume> = s.volumes.iter().flatten().collect();
    if volumes.is_empty() {
        return Ok(None);
    }
    let resolved = if volumes.iter().any(|v| spec::api_data_volume(v)) {
        env::resolve(ctx, pod, &[], true).await?
    } else {
        Resolved::default()
    };
    // hostPath volumes are never changed (as upstream), so an fsGroup is only checked when
    // another volume would get it.
    let fs_group = if volumes.iter().any(|v| v.host_path.is_none()) {
        pod_fs_group(pod)?
    } else {
        None
    };
    let mut next: Option<Duration> = None;
    let mut sooner = |d: Duration| {
        next = Some(next.map_or(d, |n| n.min(d)));
    };
    for v in volumes {
        let Some(dir) = spec::volume_host_path(&ctx.pods_dir, pod, &v.name) else {
            continue;
        };
        if v.host_path.is_some() {
            continue;
        }
        let existed = dir.symlink_metadata().is_ok_and(|m| m.is_dir());
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("volume {:?}: {}: {e}", v.name, dir.display()))?;
        let named = |e: String| format!("volume {:?}: {e}", v.name);
        if let Some(e) = &v.empty_dir {
            let mut mounted = false;
            if e.medium.as_deref() == Some("Memory") {
                let size = match &e.size_limit {
                    Some(q) => quantity::parse_quantity(q)
                        .map_err(|e| named(e.to_string()))?
                        .units(),
                    None => env::node_allocatable(ctx).await.memory.units(),
                };
                mounted = ensure_tmpfs(&dir, u64::try_from(size.max(0)).unwrap_or(u64::MAX))
                    .map_err(named)?;
            }
            setup_empty_dir(&ctx.pods_dir, pod, v, &dir, existed, mounted, fs_group)
                .map_err(named)?;
            continue;
        }
        let payload = if let Some(c) = &v.config_map {
            config_map_payload(
                &resolved.objects,
                &c.name,
                c.items.as_ref(),
                default_mode(c.default_mode),
                c.optional.unwrap_or(false),
            )
            .map_err(named)?
        } else if let Some(c) = &v.secret {
            secret_payload(
                &resolved.objects,
                c.secret_name.as_deref().unwrap_or_default(),
                c.items.as_ref(),
                default_mode(c.default_mode),
                c.optional.unwrap_or(false),
            )
            .map_err(named)?
        } else if let Some(d) = &v.downward_api {
            downward_payload(
                pod,
                d.items.as_deref().unwrap_or_default(),
                default_mode(d.default_mode),
                &resolved.allocatable,
            )
            .map_err(named)?
        } else if let Some(p) = &v.projected {
            let mode = default_mode(p.default_mode);
            let mut out = Payload::new();
            for src in p.sources.iter().flatten() {
                let part = if let Some(c) = &src.config_map {
                    config_map_payload(
                        &resolved.objects,
                        &c.name,
                        c.items.as_ref(),
                        mode,
                        c.optional.unwrap_or(false),
                    )
                } else if let Some(c) = &src.secret {
                    secret_payload(
                        &resolved.objects,
                        &c.name,
                        c.items.as_ref(),
                        mode,
                        c.optional.unwrap_or(false),
                    )
                } else if let Some(d) = &src.downward_api {
                    downward_payload(
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                        &resolved.allocatable,
                    )
                } else if let Some(t) = &src.service_account_token {
                    let (token, left) = service_account_token(ctx, pod, &dir, t)
                        .await
                        .map_err(named)?;
                    sooner(Duration::from_secs(u64::try_from(left.max(1)).unwrap_or(1)));
                    // As upstream: with an fsGroup the token is 0600, which the ownership
                    // walk makes 0640.
                    let mode = if fs_group.is_some() { 0o600 } else { mode };
                    Ok(Payload::from([(
                        t.path.clone(),
                        Projection { data: token, mode },
                    )]))
                } else {
                    Err("projected source of an unsupported kind".to_string())
                };
                out.extend(part.map_err(named)?);
            }
            out
        } else {
            continue;
        };
        if write_payload_owned(&dir, &payload, fs_group).map_err(|e| named(e.to_string()))? {
            tracing::info!(pod = %spec::full_name(pod), volume = %v.name, files = payload.len(), "volume written");
        }
        if v.config_map.is_some() || v.secret.is_some() || v.projected.is_some() {
            sooner(RESYNC_PERIOD);
        }
    }
    Ok(next)
}

/// Unmounts everything mounted beneath the pod's directory (tmpfs emptyDirs, subPath binds),
/// deepest first, so that the directory can be removed; returns whether nothing is left
/// mounted beneath it.
pub fn teardown(pod_dir: &Path) -> bool {
    let beneath = || -> Vec<PathBuf> {
        let mut under: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(pod_dir) && m != pod_dir)
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        under.dedup();
        under
    };
    for m in beneath() {
        match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::debug!(mount = %m.display(), "unmounted"),
            Err(e) => tracing::warn!(mount = %m.display(), "unmounting: {e}"),
        }
    }
    beneath().is_empty()
}

/// The container config with everything the container reads beyond the pod resolved: its
/// environment's ConfigMaps, Secrets and the node's allocatable. An error is a
/// `CreateContainerConfigError` with its message.
pub async fn container_config(
    ctx: &Context,
    pod: &Pod,
    c: &Container,
    inputs: &ContainerInputs<'_>,
) -> Result<ContainerConfig, String> {
    let mut resolved = env::resolve(ctx, pod, &[c], false).await?;
    let (_, invalid) = env::environment_checked(pod, c, inputs.facts, &resolved)?;
    if !invalid.is_empty() {
        let message = format!(
            "Keys [{}] from the EnvFrom configMap/secret were skipped since they are considered invalid environment variable names.",
            invalid.join(", ")
        );
        tracing::warn!(pod = %spec::full_name(pod), container = %c.name, "{message}");
        ctx.events.event(
            pod,
            Some(&c.name),
            EventType::Warning,
            "InvalidEnvironmentVariableNames",
            message,
        );
    }
    if !inputs.facts.pod_ips.is_empty() {
        resolved.etc_hosts = Some(ensure_hosts_file(ctx, pod, inputs.facts)?);
    }
    if c.volume_mounts.iter().flatten().any(|m| {
        m.sub_path.as_deref().is_some_and(|p| !p.is_empty())
            || m.sub_path_expr.as_deref().is_some_and(|p| !p.is_empty())
    }) {
        let envs = env::environment(pod, c, inputs.facts, &resolved)?;
        for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
            let sub = match (m.sub_path.as_deref(), m.sub_path_expr.as_deref()) {
                (Some(p), _) if !p.is_empty() => p.to_string(),
                (_, Some(e)) if !e.is_empty() => spec::expand(e, &|n| {
                    envs.iter()
                        .find(|kv| kv.key == n)
                        .map(|kv| kv.value.clone())
                }),
                _ => continue,
            };
            let base = spec::volume_host_path(&ctx.pods_dir, pod, &m.name)
                .ok_or_else(|| format!("volumeMount {:?}: no volume of that name", m.name))?;
            let target = spec::pod_dir(&ctx.pods_dir, pod)
                .join("volume-subpaths")
                .join(&m.name)
                .join(&c.name)
                .join(i.to_string());
            prepare_sub_path(&base, &sub, &target).map_err(|e| {
                format!(
                    "failed to prepare subPath for volumeMount {:?} of container {:?}: {e}",
                    m.name, c.name
                )
            })?;
            resolved.sub_paths.insert(i, target);
        }
    }
    if let Some(path) = c
        .termination_message_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        resolved.termination_log = Some(termination_log_file(ctx, pod, c, path)?);
    }
    spec::container_config_with(pod, c, inputs, &resolved)
}

/// Creates the empty, world-writable host file a new container instance writes its
/// termination message to (`<pod dir>/containers/<name>/<random>`, as upstream: one per
/// instance, so a restarted container does not see the previous one's message).
fn termination_log_file(
    ctx: &Context,
    pod: &Pod,
    c: &Container,
    container_path: &str,
) -> Result<PathBuf, String> {
    if !container_path.starts_with('/') {
        return Err(format!(
            "terminationMessagePath {container_path:?} must be an absolute path"
        ));
    }
    let dir = spec::pod_dir(&ctx.pods_dir, pod)
        .join("containers")
        .join(&c.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut random = [0u8; 4];
    getrandom_bytes(&mut random);
    let name: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // The container may run as any user.
    f.set_permissions(std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Random bytes from the kernel (the time as a fallback: the name only needs to be new).
fn getrandom_bytes(buf: &mut [u8]) {
    use std::io::Read;
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (t >> (8 * (i % 4))) as u8;
        }
    }
}

/// Checks a subPath as the API server and upstream's kubelet do: relative, no `..`.
fn validate_sub_path(sub: &str) -> Result<(), String> {
    if sub.starts_with('/') {
        return Err(format!("subPath {sub:?} must be a relative path"));
    }
    if sub.split('/').any(|p| p == "..") {
        return Err(format!("subPath {sub:?} must not contain '..'"));
    }
    if sub.contains('\0') {
        return Err(format!("subPath {sub:?} is invalid"));
    }
    Ok(())
}

fn open_how_beneath(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Opens `rel` beneath the directory `base` as an `O_PATH` descriptor, creating missing
/// directories (0755) on the way, each resolved beneath `base` again.
pub fn open_sub_path(base: &Path, rel: &str) -> Result<OwnedFd, String> {
    validate_sub_path(rel)?;
    let root = std::fs::File::open(base).map_err(|e| format!("{}: {e}", base.display()))?;
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let escape = |e: nix::errno::Errno| match e {
        nix::errno::Errno::EXDEV | nix::errno::Errno::ELOOP => {
            format!("subPath {rel:?} resolves outside of its volume (through a symlink)")
        }
        e => format!("subPath {rel:?}: {e}"),
    };
    for k in 1..=parts.len() {
        let prefix = parts[..k].join("/");
        match nix::fcntl::openat2(
            root.as_fd(),
            prefix.as_str(),
            open_how_beneath(OFlag::O_PATH),
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::ENOENT) => {
                let parent = if k == 1 {
                    nix::fcntl::openat2(
                        root.as_fd(),
                        ".",
                        open_how_beneath(OFlag::O_PATH | OFlag::O_DIRECTORY),
                    )
                } else {
                    nix::fcntl::openat2(
                        root.as_fd(),
                        parts[..k - 1].join("/").as_str(),
                        open_how_beneath(OFlag::O_PATH | OFlag::O_DIRECTORY),
                    )
                }
                .map_err(escape)?;
                match nix::sys::stat::mkdirat(
                    parent.as_fd(),
                    parts[k - 1],
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(escape(e)),
                }
            }
            Err(e) => return Err(escape(e)),
        }
    }
    let path = if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    };
    nix::fcntl::openat2(root.as_fd(), path.as_str(), open_how_beneath(OFlag::O_PATH))
        .map_err(escape)
}

/// Resolves `sub` beneath `base` and bind-mounts what it names, through its open descriptor
/// (so that nothing can swap a symlink in afterwards), on `target` (a private path under the
/// pod's directory), replacing an earlier bind there.
pub fn prepare_sub_path(base: &Path, sub: &str, target: &Path) -> Result<(), String> {
    let fd = open_sub_path(base, sub)?;
    let is_dir = nix::sys::stat::fstat(fd.as_fd())
        .map(|st| (st.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFDIR)
        .map_err(|e| format!("subPath {sub:?}: {e}"))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    if is_mount_point(target) {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| format!("unmounting {}: {e}", target.display()))?;
    }
    match target.symlink_metadata() {
        Ok(m) if m.is_dir() == is_dir && !m.file_type().is_symlink() => {}
        Ok(m) => {
            if m.is_dir() {
                std::fs::remove_dir(target)
            } else {
                std::fs::remove_file(target)
            }
            .map_err(|e| format!("{}: {e}", target.display()))?;
            make_target(target, is_dir)?;
        }
        Err(_) => make_target(target, is_dir)?,
    }
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::mount::mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting subPath {sub:?} on {}: {e}", target.display()))?;
    Ok(())
}

fn make_target(target: &Path, dir: bool) -> Result<(), String> {
    if dir {
        std::fs::create_dir(target)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(target)
            .map(|_| ())
    }
    .map_err(|e| format!("{}: {e}", target.display()))
}

/// The `/etc/hosts` of the pod's containers (upstream's `ensureHostsFile`): on the host
/// network the node's file with the pod's aliases appended, otherwise the managed file with
/// the localhost entries, the pod's IPs and hostname, and the aliases.
pub fn hosts_file_content(
    pod: &Pod,
    pod_ips: &[String],
    cluster_domain: Option<&str>,
    node_hosts: &str,
) -> String {
    let s = spec::spec(pod);
    let mut out = String::new();
    if spec::host_network(pod) {
        out.push_str("# Kubernetes-managed hosts file (host network).\n");
        out.push_str(node_hosts);
    } else {
        out.push_str("# Kubernetes-managed hosts file.\n");
        out.push_str("127.0.0.1\tlocalhost\n");
        out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
        out.push_str("fe00::0\tip6-localnet\n");
        out.push_str("fe00::0\tip6-mcastprefix\n");
        out.push_str("fe00::1\tip6-allnodes\n");
        out.push_str("fe00::2\tip6-allrouters\n");
        let host = spec::pod_hostname(pod);
        let domain = match (s.subdomain.as_deref(), cluster_domain) {
            (Some(sub), Some(d)) if !sub.is_empty() => {
                Some(format!("{sub}.{}.svc.{d}", spec::ids(pod).1))
            }
            _ => None,
        };
        for ip in pod_ips {
            match &domain {
                Some(d) => out.push_str(&format!("{ip}\t{host}.{d}\t{host}\n")),
                None => out.push_str(&format!("{ip}\t{host}\n")),
            }
        }
    }
    let aliases = s.host_aliases.as_deref().unwrap_or_default();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.as_deref().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", a.ip));
        }
    }
    out
}

/// Writes `<pod dir>/etc-hosts` (in place, so that containers that mount it see a change)
/// when its content differs; returns its path.
fn ensure_hosts_file(ctx: &Context, pod: &Pod, facts: &RuntimeFacts) -> Result<PathBuf, String> {
    let dir = spec::pod_dir(&ctx.pods_dir, pod);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let node_hosts = if spec::host_network(pod) {
        std::fs::read_to_string("/etc/hosts").map_err(|e| format!("/etc/hosts: {e}"))?
    } else {
        String::new()
    };
    let content = hosts_file_content(
        pod,
        &facts.pod_ips,
        ctx.cluster_domain.as_deref(),
        &node_hosts,
    );
    let path = dir.join("etc-hosts");
    if path
        .symlink_metadata()
        .is_ok_and(|m| !m.file_type().is_file())
    {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
        std::fs::write(&path, content).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(files: &[(&str, &str, u32)]) -> Payload {
        files
            .iter()
            .map(|(p, d, m)| {
                (
                    p.to_string(),
                    Projection {
                        data: d.as_bytes().to_vec(),
                        mode: *m,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn atomic_writer_swaps_data_and_links() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        let first = payload(&[("a", "1", 0o644), ("sub/b", "2", 0o600)]);
        assert!(write_payload(dir, &first).expect("write"));
        assert_eq!(
            std::fs::read_link(dir.join("a")).expect("a"),
            Path::new("..data/a")
        );
        assert_eq!(
            std::fs::read_link(dir.join("sub")).expect("sub"),
            Path::new("..data/sub")
        );
        assert_eq!(std::fs::read_to_string(dir.join("sub/b")).expect("b"), "2");
        let mode = std::fs::metadata(dir.join("sub/b"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let data1 = std::fs::read_link(dir.join(DATA_DIR)).expect("..data");
        assert!(data1.to_string_lossy().starts_with(".."));
        // The same payload changes nothing.
        assert!(!write_payload(dir, &first).expect("rewrite"));
        assert_eq!(
            std::fs::read_link(dir.join(DATA_DIR)).expect("..data"),
            data1
        );
        // A new payload: a new data dir, the old one and removed names gone.
        let second = payload(&[("a", "3", 0o644), ("c", "4", 0o400)]);
        assert!(write_payload(dir, &second).expect("write 2"));
        let data2 = std::fs::read_link(dir.join(DATA_DIR)).expect("..data");
        assert_ne!(data1, data2);
        assert!(!dir.join(&data1).exists());
        assert!(dir.join("sub").symlink_metadata().is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a")).expect("a"), "3");
        assert_eq!(std::fs::read_to_string(dir.join("c")).expect("c"), "4");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec![
            "..data".to_string(),
            data2.to_string_lossy().into_owned(),
            "a".into(),
            "c".into(),
        ];
        want.sort();
        assert_eq!(names, want);
    }

    #[test]
    fn atomic_writer_refuses_escapes() {
        let t = tempfile::tempdir().expect("tempdir");
        for bad in ["../x", "a/../../x", "/etc/x", "..data", "..x", "a//b", ""] {
            let p = payload(&[(bad, "x", 0o644)]);
            assert!(
                matches!(write_payload(t.path(), &p), Err(WriteError::InvalidPath(_))),
                "{bad}"
            );
        }
        // A file the writer did not make is not replaced.
        std::fs::write(t.path().join("k"), "mine").expect("write");
        let p = payload(&[("k", "x", 0o644)]);
        assert!(matches!(
            write_payload(t.path(), &p),
            Err(WriteError::InTheWay(_))
        ));
        assert_eq!(
            std::fs::read_to_string(t.path().join("k")).expect("k"),
            "mine"
        );
        // A volume dir that is a symlink is refused.
        let link = t.path().join("link");
        std::os::unix::fs::symlink("/tmp", &link).expect("symlink");
        assert!(write_payload(&link, &payload(&[("a", "1", 0o644)])).is_err());
    }

    #[test]
    fn open_beneath_stays_inside() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("f"), "x").expect("write");
        std::os::unix::fs::symlink("f", t.path().join("inside")).expect("symlink");
        std::os::unix::fs::symlink("/etc/hostname", t.path().join("out")).expect("symlink");
        std::os::unix::fs::symlink("../..", t.path().join("up")).expect("symlink");
        assert!(open_beneath(t.path(), "inside").is_ok());
        assert!(open_beneath(t.path(), "out").is_err());
        assert!(open_beneath(t.path(), "up/etc/hostname").is_err());
    }

    #[test]
    fn downward_api_files_as_upstream() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u",
                "labels": {"b": "2", "a": "x\"y"}, "annotations": {"k": "v"}},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi"}}}]}
        }))
        .expect("pod");
        let items: Vec<DownwardAPIVolumeFile> = serde_json::from_value(serde_json::json!([
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o600},
            {"path": "k", "fieldRef": {"fieldPath": "metadata.annotations['k']"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}},
        ]))
        .expect("items");
        let p = downward_payload(&pod, &items, 0o644, &Allocatable::default()).expect("payload");
        let get = |k: &str| String::from_utf8(p[k].data.clone()).expect("utf8");
        assert_eq!(get("labels"), "a=\"x\\\"y\"\nb=\"2\"");
        assert_eq!((get("name"), p["name"].mode), ("p".to_string(), 0o600));
        assert_eq!(get("k"), "v");
        assert_eq!(get("mem"), "64");
    }

    #[test]
    fn key_payload_items_and_optional() {
        let data = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ]);
        let all = key_payload("configMap", &data, None, 0o644, false).expect("all");
        assert_eq!(all.len(), 2);
        let items: Vec<KeyToPath> = serde_json::from_value(serde_json::json!([
            {"key": "a", "path": "x/a.txt", "mode": 0o400}]))
        .expect("items");
        let some = key_payload("configMap", &data, Some(&items), 0o644, false).expect("items");
        assert_eq!(
            some["x/a.txt"],
            Projection {
                data: b"1".to_vec(),
                mode: 0o400
            }
        );
        let missing: Vec<KeyToPath> =
            serde_json::from_value(serde_json::json!([{"key": "z", "path": "z"}])).expect("items");
        let err =
            key_payload("configMap", &data, Some(&missing), 0o644, false).expect_err("missing");
        assert_eq!(err, "configMap references non-existent configMap key: z");
        assert!(
            key_payload("configMap", &data, Some(&missing), 0o644, true)
                .expect("optional")
                .is_empty()
        );
    }

    #[test]
    fn token_times() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iat":1000,"exp":4600,"aud":["x"]}"#);
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{claims}.sig");
        assert_eq!(jwt_times(jwt.as_bytes()), Some((1000, 4600)));
        assert_eq!(token_refresh_at(1000, 4600), 1000 + 2880);
        assert_eq!(token_refresh_at(0, 10 * 24 * 3600), 24 * 3600);
        assert_eq!(jwt_times(b"not a jwt"), None);
    }

    #[test]
    fn hosts_files_as_upstream() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"subdomain": "sub", "containers": [],
                "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["a.example", "b"]}]}
        }))
        .expect("pod");
        let c = hosts_file_content(&pod, &["10.244.0.5".into()], Some("cluster.local"), "");
        assert_eq!(
            c,
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n10.244.0.5\tweb.sub.ns.svc.cluster.local\tweb\n\n# Entries added by HostAliases.\n10.1.2.3\ta.example\tb\n"
        );
        let mut hn = pod.clone();
        if let Some(s) = hn.spec.as_mut() {
            s.host_network = Some(true);
        }
        let c = hosts_file_content(&hn, &["127.0.0.1".into()], None, "127.0.0.1 node\n");
        assert_eq!(
            c,
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 node\n\n# Entries added by HostAliases.\n10.1.2.3\ta.example\tb\n"
        );
    }

    #[test]
    fn sub_paths_resolve_beneath_their_volume() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("vol");
        std::fs::create_dir_all(base.join("d")).expect("mkdir");
        std::fs::write(base.join("d/f"), "x").expect("write");
        std::os::unix::fs::symlink("d", base.join("inside")).expect("symlink");
        std::os::unix::fs::symlink("/etc", base.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../..", base.join("up")).expect("symlink");
        std::fs::create_dir(t.path().join("outside")).expect("mkdir");
        std::os::unix::fs::symlink("../outside", base.join("rel")).expect("symlink");
        assert!(open_sub_path(&base, "d/f").is_ok());
        assert!(
            open_sub_path(&base, "inside/f").is_ok(),
            "a symlink inside stays inside"
        );
        for bad in [
            "abs",
            "abs/passwd",
            "up",
            "rel",
            "rel/new",
            "../x",
            "/etc",
            "d/../../x",
        ] {
            let e = open_sub_path(&base, bad).expect_err(bad);
            assert!(
                e.contains("outside") || e.contains("..") || e.contains("relative"),
                "{bad}: {e}"
            );
        }
        assert!(
            !t.path().join("outside/new").exists(),
            "nothing created outside"
        );
        // Missing directories are made beneath the volume.
        open_sub_path(&base, "a/b/c").expect("created");
        assert!(base.join("a/b/c").is_dir());
        let mode = std::fs::metadata(base.join("a/b"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o700, 0o700, "{mode:o}");
        assert_eq!(mode & 0o022 & !0o755, 0, "{mode:o}");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape_mountinfo("/a\\040b"),
            std::ffi::OsString::from("/a b")
        );
        assert_eq!(
            unescape_mountinfo("/plain"),
            std::ffi::OsString::from("/plain")
        );
    }

    fn gid_mode(p: &Path) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let m = p.symlink_metadata().expect("lstat");
        (m.gid(), m.mode() & 0o7777)
    }

    fn set_mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// A volume with a file, a subdirectory, symlinks out of it and a file outside.
    fn volume_tree(t: &Path) -> PathBuf {
        let vol = t.join("vol");
        std::fs::create_dir_all(vol.join("sub/deeper")).expect("mkdir");
        std::fs::create_dir(t.join("outside")).expect("mkdir");
        std::fs::write(t.join("outside/secret"), "x").expect("write");
        set_mode(&t.join("outside/secret"), 0o600);
        set_mode(&t.join("outside"), 0o700);
        std::fs::write(vol.join("f"), "f").expect("write");
        set_mode(&vol.join("f"), 0o644);
        std::fs::write(vol.join("sub/deeper/g"), "g").expect("write");
        set_mode(&vol.join("sub/deeper/g"), 0o600);
        set_mode(&vol.join("sub/deeper"), 0o700);
        set_mode(&vol.join("sub"), 0o750);
        set_mode(&vol, 0o755);
        std::os::unix::fs::symlink("../outside/secret", vol.join("filelink")).expect("symlink");
        std::os::unix::fs::symlink("../../outside", vol.join("sub/dirlink")).expect("symlink");
        // An owner other than root, to see that it stays.
        std::os::unix::fs::chown(vol.join("f"), Some(4321), None).expect("chown");
        vol
    }

    #[test]
    fn ownership_walk_sets_group_and_bits_without_following_symlinks() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().expect("tempdir");
        let vol = volume_tree(t.path());
        let o = Ownership {
            gid: 1234,
            read_only: false,
            on_root_mismatch: false,
        };
        assert!(needs_ownership_change(&vol, &o));
        assert!(set_volume_ownership(&vol, &o).expect("walk"));
        assert_eq!(gid_mode(&vol), (1234, 0o2775));
        assert_eq!(gid_mode(&vol.join("f")), (1234, 0o664));
        assert_eq!(vol.join("f").symlink_metadata().expect("f").uid(), 4321);
        assert_eq!(gid_mode(&vol.join("sub")), (1234, 0o2770));
        assert_eq!(gid_mode(&vol.join("sub/deeper")), (1234, 0o2770));
        assert_eq!(gid_mode(&vol.join("sub/deeper/g")), (1234, 0o660));
        // Symlinks get the group themselves; what they point to is untouched.
        assert_eq!(gid_mode(&vol.join("filelink")).0, 1234);
        assert_eq!(gid_mode(&vol.join("sub/dirlink")).0, 1234);
        assert_eq!(gid_mode(&t.path().join("outside/secret")), (0, 0o600));
        assert_eq!(gid_mode(&t.path().join("outside")), (0, 0o700));
        assert!(!needs_ownership_change(&vol, &o));
        // A volume directory that is a symlink is refused.
        let link = t.path().join("vol-link");
        std::os::unix::fs::symlink("outside", &link).expect("symlink");
        assert!(set_volume_ownership(&link, &o).is_err());
        assert_eq!(gid_mode(&t.path().join("outside")), (0, 0o700));
    }

    #[test]
    fn ownership_walk_of_a_read_only_volume_adds_read_bits_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let vol = volume_tree(t.path());
        set_mode(&vol.join("f"), 0o400);
        let o = Ownership {
            gid: 1234,
            read_only: true,
            on_root_mismatch: false,
        };
        assert!(set_volume_ownership(&vol, &o).expect("walk"));
        assert_eq!(gid_mode(&vol), (1234, 0o2755));
        assert_eq!(gid_mode(&vol.join("f")), (1234, 0o440));
        assert_eq!(gid_mode(&vol.join("sub")), (1234, 0o2750));
        assert_eq!(gid_mode(&vol.join("sub/deeper/g")), (1234, 0o640));
        assert_eq!(gid_mode(&t.path().join("outside/secret")), (0, 0o600));
    }

    #[test]
    fn on_root_mismatch_skips_a_volume_whose_root_is_right() {
        let t = tempfile::tempdir().expect("tempdir");
        let vol = volume_tree(t.path());
        let mut o = Ownership {
            gid: 1234,
            read_only: false,
            on_root_mismatch: true,
        };
        // A fresh root does not match: walked.
        assert!(set_volume_ownership(&vol, &o).expect("walk"));
        assert_eq!(gid_mode(&vol.join("f")).0, 1234);
        // A new file under a root that matches: skipped, the file stays as it is.
        std::fs::write(vol.join("new"), "n").expect("write");
        std::os::unix::fs::chown(vol.join("new"), None, Some(0)).expect("chown");
        set_mode(&vol.join("new"), 0o600);
        assert!(!set_volume_ownership(&vol, &o).expect("skip"));
        assert_eq!(gid_mode(&vol.join("new")), (0, 0o600));
        // Always walks.
        o.on_root_mismatch = false;
        assert!(set_volume_ownership(&vol, &o).expect("walk"));
        assert_eq!(gid_mode(&vol.join("new")), (1234, 0o660));
        // A root without the setgid bit, or of another group, is a mismatch.
        o.on_root_mismatch = true;
        std::fs::write(vol.join("new2"), "n").expect("write");
        set_mode(&vol, 0o775);
        assert!(set_volume_ownership(&vol, &o).expect("walk"));
        assert_eq!(gid_mode(&vol.join("new2")).0, 1234);
        std::os::unix::fs::chown(&vol, None, Some(1235)).expect("chown");
        assert!(needs_ownership_change(&vol, &o));
        // Another group, a root lacking the group's bits.
        let other = Ownership { gid: 1235, ..o };
        set_mode(&vol, 0o2705);
        assert!(needs_ownership_change(&vol, &other));
    }

    #[test]
    fn atomic_writer_with_fs_group_owns_every_write() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("vol");
        std::fs::create_dir(&dir).expect("mkdir");
        set_mode(&dir, 0o755);
        let first = payload(&[("a", "1", 0o400), ("sub/b", "2", 0o644)]);
        assert!(write_payload_owned(&dir, &first, Some(1234)).expect("write"));
        let data = std::fs::read_link(dir.join(DATA_DIR)).expect("..data");
        assert_eq!(gid_mode(&dir), (1234, 0o2755));
        assert_eq!(gid_mode(&dir.join(&data)), (1234, 0o2755));
        assert_eq!(gid_mode(&dir.join(&data).join("sub")), (1234, 0o2755));
        assert_eq!(gid_mode(&dir.join(&data).join("a")), (1234, 0o440));
        assert_eq!(gid_mode(&dir.join(&data).join("sub/b")), (1234, 0o644));
        for link in [DATA_DIR, "a", "sub"] {
            assert_eq!(gid_mode(&dir.join(link)).0, 1234, "{link}");
        }
        // The same payload again: nothing to do (the owned modes are not a change).
        assert!(!write_payload_owned(&dir, &first, Some(1234)).expect("rewrite"));
        // A file that lost its group is written again, owned.
        std::os::unix::fs::chown(dir.join(&data).join("a"), None, Some(0)).expect("chown");
        assert!(write_payload_owned(&dir, &first, Some(1234)).expect("repair"));
        let data2 = std::fs::read_link(dir.join(DATA_DIR)).expect("..data");
        assert_ne!(data, data2);
        assert_eq!(gid_mode(&dir.join("a")).0, 1234);
        // A changed payload: the new files are owned before they are visible.
        let second = payload(&[("a", "3", 0o400), ("c", "4", 0o600)]);
        assert!(write_payload_owned(&dir, &second, Some(1234)).expect("write 2"));
        assert_eq!(std::fs::read_to_string(dir.join("c")).expect("c"), "4");
        assert_eq!(
            gid_mode(&std::fs::canonicalize(dir.join("c")).expect("c")),
            (1234, 0o640)
        );
        assert_eq!(std::fs::metadata(dir.join("a")).expect("a").gid(), 1234);
        assert!(tree_has_gid(&dir, 1234));
    }

    #[test]
    fn empty_dirs_are_owned_once_and_honour_the_change_policy() {
        let t = tempfile::tempdir().expect("tempdir");
        let pod_of = |policy: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "n", "uid": "u"},
                "spec": {"securityContext": {"fsGroup": 1234, "fsGroupChangePolicy": policy},
                    "containers": [], "volumes": [{"name": "e", "emptyDir": {}}]}
            }))
            .expect("pod")
        };
        let pod = pod_of("OnRootMismatch");
        assert_eq!(pod_fs_group(&pod), Ok(Some(1234)));
        assert!(on_root_mismatch(&pod));
        let v = &spec::spec(&pod).volumes.as_ref().expect("volumes")[0];
        let dir = spec::volume_host_path(t.path(), &pod, "e").expect("path");
        std::fs::create_dir_all(&dir).expect("mkdir");
        set_mode(&dir, 0o755);
        let setup = |pod: &Pod| setup_empty_dir(t.path(), pod, v, &dir, true, false, Some(1234));
        setup(&pod).expect("setup");
        assert_eq!(gid_mode(&dir), (1234, 0o2777));
        assert!(empty_dir_ready(t.path(), &pod, "e").exists());
        // Set up once: later syncs leave what the pod did alone.
        std::fs::write(dir.join("f"), "x").expect("write");
        std::os::unix::fs::chown(dir.join("f"), None, Some(0)).expect("chown");
        setup(&pod).expect("again");
        assert_eq!(gid_mode(&dir.join("f")).0, 0);
        // Without the ready file (a crash before it was written) it is set up again:
        // OnRootMismatch skips a root that is right, Always walks.
        let ready = empty_dir_ready(t.path(), &pod, "e");
        std::fs::remove_file(&ready).expect("rm");
        setup(&pod).expect("OnRootMismatch");
        assert_eq!(gid_mode(&dir.join("f")).0, 0);
        assert_eq!(gid_mode(&dir), (1234, 0o2777));
        std::fs::remove_file(&ready).expect("rm");
        let always = pod_of("Always");
        assert!(!on_root_mismatch(&always));
        setup(&always).expect("Always");
        assert_eq!(gid_mode(&dir.join("f")), (1234, 0o664));
        // A negative fsGroup (a static pod is not validated) is refused.
        let mut bad = pod.clone();
        if let Some(sc) = bad.spec.as_mut().and_then(|s| s.security_context.as_mut()) {
            sc.fs_group = Some(-1);
        }
        assert!(pod_fs_group(&bad).is_err());
    }
}
