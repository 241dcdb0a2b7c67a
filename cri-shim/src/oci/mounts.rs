//! The container's root filesystem, set up by the init inside its new mount namespace:
//! propagation, the spec's mounts (every destination resolved beneath the rootfs with
//! [`super::resolve`]), devices and /dev symlinks, pivot_root, masked and read-only paths and
//! the read-only root.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::resolve::{Create, clean, open_beneath, proc_fd_path};

type R<T = ()> = std::result::Result<T, String>;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cstr(s: &str) -> R<CString> {
    CString::new(s).map_err(|e| e.to_string())
}

/// `mount(2)` with optional source, fstype and data.
fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).unwrap_or_default());
    let (s, t, f, d) = (
        c(src),
        CString::new(target).unwrap_or_default(),
        c(fstype),
        c(data),
    );
    let p = |x: &Option<CString>| x.as_ref().map_or(std::ptr::null(), |x| x.as_ptr());
    // SAFETY: all pointers are valid C strings or null.
    let r = unsafe { libc::mount(p(&s), t.as_ptr(), p(&f), flags, p(&d).cast()) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

/// Parsed mount options.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Opts {
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub data: Vec<String>,
    pub bind: bool,
}

/// Splits OCI mount options into flags, propagation flags and filesystem data.
pub(crate) fn parse_options(options: &[String]) -> Opts {
    let mut o = Opts::default();
    for opt in options {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match opt.as_str() {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "remount" => (libc::MS_REMOUNT, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "bind" => {
                o.bind = true;
                (libc::MS_BIND, 0)
            }
            "rbind" => {
                o.bind = true;
                (libc::MS_BIND | libc::MS_REC, 0)
            }
            p @ ("private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave"
            | "unbindable" | "runbindable") => {
                o.propagation |= match p.trim_start_matches('r') {
                    "private" => libc::MS_PRIVATE,
                    "shared" => libc::MS_SHARED,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_UNBINDABLE,
                } | if p.starts_with('r') { libc::MS_REC } else { 0 };
                (0, 0)
            }
            // runc-specific or irrelevant here.
            "tmpcopyup" | "idmap" | "ridmap" | "defaults" => (0, 0),
            _ => {
                o.data.push(opt.clone());
                (0, 0)
            }
        };
        o.flags = (o.flags | set) & !clear;
    }
    o
}

/// Propagation flags for `rootfsPropagation`.
fn propagation(p: &str) -> R<libc::c_ulong> {
    Ok(match p {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        other => return Err(format!("invalid rootfsPropagation {other:?}")),
    })
}

/// Sets up the root filesystem and pivots into it. Runs in the init, in its mount namespace.
pub(crate) fn setup_rootfs(
    spec: &Spec,
    rootfs: &Path,
    bundle: &Path,
    warnings: &mut Vec<String>,
) -> R {
    let linux = spec.linux().as_ref();
    let rprop = linux.and_then(|l| l.rootfs_propagation().as_deref());
    let root_prop = match rprop {
        Some(p) => propagation(p)?,
        None => libc::MS_SLAVE | libc::MS_REC,
    };
    // Never propagate our mounts back to the host.
    let first = if root_prop & (libc::MS_SHARED) != 0 {
        libc::MS_SLAVE | libc::MS_REC
    } else {
        root_prop
    };
    mount(None, "/", None, first | libc::MS_REC, None)
        .map_err(|e| format!("making / {first:#x}: {e}"))?;
    // Modes in the spec are exact (runc runs its init with umask 0); process.user.umask is
    // applied just before exec.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    let rootfs_s = rootfs.to_str().ok_or("rootfs path is not UTF-8")?;
    mount(
        Some(rootfs_s),
        rootfs_s,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .map_err(|e| format!("bind-mounting rootfs {rootfs_s}: {e}"))?;
    let root =
        std::fs::File::open(rootfs).map_err(|e| format!("opening rootfs {rootfs_s}: {e}"))?;

    let mut cgroup_ro_later = Vec::new();
    for m in spec.mounts().iter().flatten() {
        mount_one(&root, m, bundle, warnings, &mut cgroup_ro_later).map_err(|e| {
            format!(
                "mount {} ({}): {e}",
                m.destination().display(),
                m.typ().as_deref().unwrap_or("bind")
            )
        })?;
    }
    create_devices(
        &root,
        linux.and_then(|l| l.devices().as_deref()).unwrap_or(&[]),
    )?;
    drop(root);

    pivot_root(rootfs_s)?;
    if let Some(p) = rprop {
        mount(None, "/", None, propagation(p)?, None)
            .map_err(|e| format!("rootfsPropagation {p}: {e}"))?;
    }
    if let Some(l) = linux {
        for p in l.readonly_paths().iter().flatten() {
            readonly_path(p)?;
        }
        for p in l.masked_paths().iter().flatten() {
            mask_path(p)?;
        }
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount_ro("/").map_err(|e| format!("remounting / read-only: {e}"))?;
    }
    Ok(())
}

fn resolve(root: &std::fs::File, dest: &Path, create: Create) -> R<OwnedFd> {
    open_beneath(root.as_fd(), dest, create).map_err(|e| e.to_string())
}

fn mount_one(
    root: &std::fs::File,
    m: &Mount,
    bundle: &Path,
    warnings: &mut Vec<String>,
    _later: &mut Vec<PathBuf>,
) -> R {
    let o = parse_options(m.options().as_deref().unwrap_or(&[]));
    let typ = m
        .typ()
        .as_deref()
        .unwrap_or(if o.bind { "bind" } else { "none" });
    let bind = o.bind || typ == "bind";
    let dest = clean(m.destination());
    let data = o.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    if bind {
        let src = m.source().as_ref().ok_or("bind mount without source")?;
        let src = if src.is_absolute() {
            src.clone()
        } else {
            bundle.join(src)
        };
        let meta = std::fs::metadata(&src).map_err(|e| format!("source {}: {e}", src.display()))?;
        let fd = resolve(
            root,
            &dest,
            if meta.is_dir() {
                Create::Dir
            } else {
                Create::File
            },
        )?;
        let srcs = src.to_str().ok_or("source path is not UTF-8")?;
        mount(
            Some(srcs),
            &proc_fd_path(&fd),
            None,
            libc::MS_BIND | (o.flags & libc::MS_REC),
            None,
        )
        .map_err(|e| format!("bind {srcs}: {e}"))?;
        // Re-resolve: the new descriptor is on top of the new mount, not beneath it.
        let fd = resolve(root, &dest, Create::No)?;
        let extra = o.flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        if extra != 0 {
            mount(
                None,
                &proc_fd_path(&fd),
                None,
                extra | libc::MS_BIND | libc::MS_REMOUNT,
                None,
            )
            .map_err(|e| format!("remounting with flags {extra:#x}: {e}"))?;
        }
        if o.propagation != 0 {
            mount(None, &proc_fd_path(&fd), None, o.propagation, None)
                .map_err(|e| format!("propagation: {e}"))?;
        }
        return Ok(());
    }
    let fd = resolve(root, &dest, Create::Dir)?;
    let target = proc_fd_path(&fd);
    let flags = o.flags & !libc::MS_REMOUNT;
    match typ {
        "cgroup" => mount_cgroup(root, &dest, &target, flags, warnings)?,
        _ => {
            let src = m.source().as_ref().and_then(|s| s.to_str()).unwrap_or(typ);
            mount(Some(src), &target, Some(typ), flags, data).map_err(|e| e.to_string())?;
        }
    }
    if o.propagation != 0 {
        let fd = resolve(root, &dest, Create::No)?;
        mount(None, &proc_fd_path(&fd), None, o.propagation, None)
            .map_err(|e| format!("propagation: {e}"))?;
    }
    Ok(())
}

/// A `cgroup` mount: cgroup2 on a unified host; on a v1 or hybrid host a tmpfs holding one
/// mount per host hierarchy (as runc does). Mounting only; the cgroup manager is elsewhere.
fn mount_cgroup(
    root: &std::fs::File,
    dest: &Path,
    target: &str,
    flags: libc::c_ulong,
    _w: &mut Vec<String>,
) -> R {
    // SAFETY: st is plain old data filled by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    if unsafe { libc::statfs(c"/sys/fs/cgroup".as_ptr(), &mut st) } == 0
        && st.f_type == libc::CGROUP2_SUPER_MAGIC
    {
        return mount(Some("cgroup2"), target, Some("cgroup2"), flags, None)
            .map_err(|e| e.to_string());
    }
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        flags & !libc::MS_RDONLY,
        Some("mode=755"),
    )
    .map_err(|e| format!("tmpfs: {e}"))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mp = pre.split(' ').nth(4).unwrap_or("");
        let Some(name) = mp.strip_prefix("/sys/fs/cgroup/") else {
            continue;
        };
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or("");
        let superopts = post.nth(1).unwrap_or("");
        // As runc: the v1 hierarchies only (not the hybrid layout's cgroup2 "unified").
        if fstype != "cgroup" || name.contains('/') {
            continue;
        }
        let data: Vec<&str> = superopts
            .split(',')
            .filter(|o| *o != "rw" && *o != "ro")
            .collect();
        let sub = resolve(root, &dest.join(name), Create::Dir)?;
        mount(
            Some(fstype),
            &proc_fd_path(&sub),
            Some(fstype),
            flags,
            (fstype == "cgroup").then(|| data.join(",")).as_deref(),
        )
        .map_err(|e| format!("cgroup hierarchy {name}: {e}"))?;
    }
    Ok(())
}

const DEFAULT_DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

#[allow(clippy::too_many_arguments)]
fn mknod(
    root: &std::fs::File,
    path: &Path,
    kind: libc::mode_t,
    mode: u32,
    major: u32,
    minor: u32,
    uid: u32,
    gid: u32,
) -> R {
    let parent = resolve(root, path.parent().unwrap_or(Path::new("/")), Create::Dir)?;
    let name =
        CString::new(path.file_name().unwrap_or_default().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid fd and C string.
    unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) };
    // O_PATH descriptors cannot be used as dirfd for mknodat: reopen the directory.
    let dir = std::fs::File::open(proc_fd_path(&parent)).map_err(|e| e.to_string())?;
    let dev = libc::makedev(major, minor);
    // SAFETY: valid fd and C string.
    if unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), kind | (mode & 0o7777), dev) } < 0 {
        let e = errno();
        if e.raw_os_error() == Some(libc::EPERM) && kind != libc::S_IFIFO {
            // No mknod (e.g. a user namespace): bind the host's node instead.
            drop(std::fs::File::create(format!(
                "{}/{}",
                proc_fd_path(&parent),
                path.file_name().unwrap_or_default().to_string_lossy()
            )));
            let fd = resolve(root, path, Create::No)?;
            let host = format!(
                "/dev/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            return mount(Some(&host), &proc_fd_path(&fd), None, libc::MS_BIND, None)
                .map_err(|e| format!("bind {host}: {e}"));
        }
        return Err(format!("mknod {}: {e}", path.display()));
    }
    // SAFETY: valid fd and C string.
    if unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } < 0
    {
        return Err(format!("chown {}: {}", path.display(), errno()));
    }
    Ok(())
}

fn create_devices(root: &std::fs::File, devices: &[LinuxDevice]) -> R {
    for (name, major, minor) in DEFAULT_DEVICES {
        let path = PathBuf::from("/dev").join(name);
        if devices.iter().any(|d| clean(d.path()) == path) {
            continue;
        }
        mknod(root, &path, libc::S_IFCHR, 0o666, *major, *minor, 0, 0)
            .map_err(|e| format!("device {name}: {e}"))?;
    }
    for d in devices {
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(format!(
                    "device {}: type 'a' is not a device",
                    d.path().display()
                ));
            }
        };
        let (maj, min) = (d.major() as u32, d.minor() as u32);
        mknod(
            root,
            &clean(d.path()),
            kind,
            d.file_mode().unwrap_or(0o666),
            maj,
            min,
            d.uid().unwrap_or(0),
            d.gid().unwrap_or(0),
        )
        .map_err(|e| format!("device {}: {e}", d.path().display()))?;
    }
    let dev = resolve(root, Path::new("/dev"), Create::Dir)?;
    let dev = std::fs::File::open(proc_fd_path(&dev)).map_err(|e| e.to_string())?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let (n, t) = (cstr(name)?, cstr(target)?);
        // SAFETY: valid fd and C strings.
        if unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), n.as_ptr()) } < 0 {
            let e = errno();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("symlink /dev/{name}: {e}"));
            }
        }
    }
    Ok(())
}

fn pivot_root(rootfs: &str) -> R {
    let r = cstr(rootfs)?;
    // SAFETY: valid C strings; the old root is stacked on "." and detached right after.
    unsafe {
        if libc::chdir(r.as_ptr()) < 0 {
            return Err(format!("chdir {rootfs}: {}", errno()));
        }
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) < 0 {
            return Err(format!("pivot_root: {}", errno()));
        }
    }
    mount(None, ".", None, libc::MS_SLAVE | libc::MS_REC, None)
        .map_err(|e| format!("making old root slave: {e}"))?;
    // SAFETY: valid C strings.
    unsafe {
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) < 0 {
            return Err(format!("detaching old root: {}", errno()));
        }
        if libc::chdir(c"/".as_ptr()) < 0 {
            return Err(format!("chdir /: {}", errno()));
        }
    }
    Ok(())
}

fn mask_path(p: &str) -> R {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if meta.is_dir() {
        mount(Some("tmpfs"), p, Some("tmpfs"), libc::MS_RDONLY, None)
    } else {
        mount(Some("/dev/null"), p, None, libc::MS_BIND, None)
    };
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map_err(|e| format!("masking {p}: {e}")),
    }
}

fn remount_ro(p: &str) -> std::io::Result<()> {
    // Keep the flags the mount has (a bind remount must not clear nosuid/nodev/noexec).
    // SAFETY: st is plain old data filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = CString::new(p).map_err(std::io::Error::other)?;
    // SAFETY: valid path and buffer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } < 0 {
        return Err(errno());
    }
    let keep = st.f_flag
        & (libc::ST_NOSUID
            | libc::ST_NODEV
            | libc::ST_NOEXEC
            | libc::ST_NOATIME
            | libc::ST_NODIRATIME
            | libc::ST_RELATIME);
    let flags = (keep as libc::c_ulong) | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
    mount(None, p, None, flags, None)
}

fn readonly_path(p: &str) -> R {
    match mount(Some(p), p, None, libc::MS_BIND | libc::MS_REC, None) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        r => r.map_err(|e| format!("bind {p}: {e}"))?,
    }
    remount_ro(p).map_err(|e| format!("read-only {p}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let o = parse_options(&[
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "rslave".into(),
            "mode=755".into(),
            "size=1k".into(),
        ]);
        assert!(o.bind);
        assert_eq!(
            o.flags,
            libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY | libc::MS_NOSUID
        );
        assert_eq!(o.propagation, libc::MS_SLAVE | libc::MS_REC);
        assert_eq!(o.data, vec!["mode=755".to_string(), "size=1k".to_string()]);
        let o = parse_options(&["ro".into(), "rw".into()]);
        assert_eq!(o.flags, 0);
    }
}
