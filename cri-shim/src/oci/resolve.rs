//! Resolving a path beneath a root directory by hand, one component at a time with
//! `O_PATH|O_NOFOLLOW` file descriptors, so a symlink can never lead out of the root.
//!
//! Semantics: the path is first cleaned lexically (`/a/../b` → `/b`, as runc does). Absolute
//! symlinks are read relative to the root (as `RESOLVE_IN_ROOT`); a relative symlink whose
//! `..` would climb above the root is an [`ResolveError::Escape`] (a clear error instead of a
//! silent clamp). Missing components can be created as directories, the last one as a
//! directory or an empty file.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// What to create when a component is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    No,
    Dir,
    File,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0} escapes the root through a symlink")]
    Escape(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

const MAX_SYMLINKS: usize = 40;

/// `path` cleaned lexically: no `.`, no `..` above `/`, no empty components; always absolute.
pub fn clean(path: &Path) -> PathBuf {
    let mut out: Vec<&OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    let mut p = PathBuf::from("/");
    p.extend(out);
    p
}

fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: c is a valid C string; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: st is plain old data filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is valid.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn readlink_fd(fd: RawFd) -> io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buf is valid for its length; "" with an O_PATH fd reads the link itself.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

/// Opens `path` beneath `root` as an `O_PATH` descriptor (creating what `create` says).
pub fn open_beneath(
    root: BorrowedFd<'_>,
    path: &Path,
    create: Create,
) -> Result<OwnedFd, ResolveError> {
    let cleaned = clean(path);
    let io_err = |source: io::Error| ResolveError::Io {
        path: cleaned.clone(),
        source,
    };
    let dup = |fd: RawFd| -> io::Result<OwnedFd> {
        openat(fd, OsStr::new("."), libc::O_PATH | libc::O_DIRECTORY, 0)
    };
    let mut stack: Vec<OwnedFd> = vec![dup(root.as_raw_fd()).map_err(io_err)?];
    let mut todo: VecDeque<OsString> = cleaned
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() == 1 {
                return Err(ResolveError::Escape(cleaned));
            }
            stack.pop();
            continue;
        }
        if name == "." || name.is_empty() {
            continue;
        }
        let last = todo.is_empty();
        let cur = stack
            .last()
            .map(|f| f.as_raw_fd())
            .unwrap_or(root.as_raw_fd());
        let fd = match openat(cur, &name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create != Create::No => {
                if last && create == Create::File {
                    drop(
                        openat(
                            cur,
                            &name,
                            libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW,
                            0o644,
                        )
                        .map_err(io_err)?,
                    );
                } else {
                    let c =
                        CString::new(name.as_bytes()).map_err(|e| io_err(io::Error::other(e)))?;
                    // SAFETY: c is a valid C string.
                    if unsafe { libc::mkdirat(cur, c.as_ptr(), 0o755) } < 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(io_err(e));
                        }
                    }
                }
                openat(cur, &name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };
        let st = fstat(fd.as_raw_fd()).map_err(io_err)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io_err(io::Error::from_raw_os_error(libc::ELOOP)));
                }
                let target = readlink_fd(fd.as_raw_fd()).map_err(io_err)?;
                let target = PathBuf::from(target);
                if target.is_absolute() {
                    stack.truncate(1);
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push_front(n.to_os_string()),
                        Component::ParentDir => todo.push_front(OsString::from("..")),
                        _ => {}
                    }
                }
            }
            libc::S_IFDIR => stack.push(fd),
            _ if last => return Ok(fd),
            _ => return Err(io_err(io::Error::from_raw_os_error(libc::ENOTDIR))),
        }
    }
    // The path ended on a directory (or was the root itself).
    if stack.len() == 1 {
        dup(root.as_raw_fd()).map_err(io_err)
    } else {
        stack
            .pop()
            .ok_or_else(|| io_err(io::Error::other("empty stack")))
    }
}

/// `/proc/self/fd/N` for `fd`, the way to hand a resolved descriptor to `mount(2)`.
pub fn proc_fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    #[test]
    fn cleans_lexically() {
        assert_eq!(clean(Path::new("a/../../b/./c//")), PathBuf::from("/b/c"));
        assert_eq!(clean(Path::new("/")), PathBuf::from("/"));
    }

    #[test]
    fn resolves_and_creates_beneath_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("real/dir")).expect("mkdir");
        symlink("/real", root.join("abs")).expect("symlink");
        symlink("../real/dir", root.join("real/rel")).expect("symlink");
        symlink("../../../../etc", root.join("real/evil")).expect("symlink");
        symlink("real/../../x", root.join("evil2")).expect("symlink");
        let rootfd = std::fs::File::open(root).expect("open root");
        let r = rootfd.as_fd();

        let fd = open_beneath(r, Path::new("/abs/dir"), Create::No).expect("abs link");
        let st = fstat(fd.as_raw_fd()).expect("stat");
        let want = std::fs::metadata(root.join("real/dir")).expect("meta");
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want));

        open_beneath(r, Path::new("/real/rel/new/file"), Create::File).expect("create file");
        assert!(root.join("real/dir/new/file").is_file());
        open_beneath(r, Path::new("/abs/made"), Create::Dir).expect("create dir");
        assert!(root.join("real/made").is_dir());

        assert!(matches!(
            open_beneath(r, Path::new("/real/evil/x"), Create::Dir),
            Err(ResolveError::Escape(_))
        ));
        assert!(matches!(
            open_beneath(r, Path::new("/evil2"), Create::Dir),
            Err(ResolveError::Escape(_))
        ));
        // Lexical `..` above / is clamped like runc's filepath.Clean, not an escape.
        open_beneath(r, Path::new("/../real"), Create::No).expect("clamped");
    }
}
