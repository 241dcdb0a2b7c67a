//! CVE-2019-5736 protection: before it creates or enters a container, the runtime re-executes
//! itself from a copy of its binary that nothing can write, so `/proc/<pid>/exe` of any runtime
//! process a container can reach never leads to a writable host binary.
//!
//! Two ways, cheapest first (as runc 1.2):
//! 1. a read-only, detached bind mount of the binary (`open_tree(OPEN_TREE_CLONE)` +
//!    `mount_setattr(MOUNT_ATTR_RDONLY)`, then `execveat` of that descriptor): opening the
//!    resulting `/proc/<pid>/exe` for writing fails with `EROFS`, and the mount is attached to
//!    no namespace, so nobody can remount it. Two syscalls; needs Linux ≥ 5.12 and
//!    CAP_SYS_ADMIN.
//! 2. otherwise a sealed `memfd` copy (`F_SEAL_WRITE|F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`),
//!    `fexecve`d: one in-kernel copy of the binary (2–8 ms for ours on the development VM).
//!
//! Why not an `O_PATH` re-open of the binary: the attack goes through the kernel's
//! `/proc/<pid>/exe` magic link, which resolves to the file the image was executed from,
//! however the runtime opened it; only executing from something that cannot be written closes
//! it. A binary already on a read-only mount (either of the above, or a read-only /usr) needs
//! nothing, which is also how the re-executed process knows it is done.
//!
//! [`reexec`] executes the running binary once more with other arguments (the monitor's
//! supervise image): from the same read-only file when it already runs from one, so nothing is
//! copied again and the new image is as protected as the old one.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// Whether this process runs from a binary that cannot be written: a sealed memfd or a file on
/// a read-only mount.
pub fn is_sealed() -> bool {
    std::fs::File::open("/proc/self/exe").is_ok_and(|f| sealed_file(&f))
}

/// Whether `f` cannot be written: a sealed memfd or a file on a read-only mount.
fn sealed_file(f: &std::fs::File) -> bool {
    // SAFETY: fcntl on a valid fd.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & SEALS == SEALS {
        return true;
    }
    // SAFETY: st is plain old data filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and buffer.
    unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0 }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 1;

/// A read-only detached bind mount of `path` (our own binary: `/proc/self/exe`).
fn ro_bind(path: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let fd = super::cvt(fd)? as libc::c_int;
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    super::cvt(r)?;
    Ok(fd)
}

/// A sealed memfd copy of our own binary.
fn memfd_copy() -> io::Result<OwnedFd> {
    let exe = std::fs::File::open("/proc/self/exe")?;
    let size = exe.metadata()?.len();
    // SAFETY: valid C string; flags are constants.
    let fd = unsafe {
        libc::memfd_create(
            c"deckhand-runtime".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let mem = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut left = size as usize;
    while left > 0 {
        // SAFETY: valid fds; a null offset uses the file position.
        let n =
            unsafe { libc::sendfile(mem.as_raw_fd(), exe.as_raw_fd(), std::ptr::null_mut(), left) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        left -= n as usize;
    }
    // SAFETY: fcntl on a valid fd.
    if unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mem)
}

/// Re-executes the current binary, with the same arguments and environment, from a read-only
/// bind mount or a sealed memfd copy of itself, unless already running from one. Returns only
/// on error.
pub fn ensure_sealed() -> io::Result<()> {
    if is_sealed() {
        return Ok(());
    }
    let (args, env) = argv_envp();
    Err(exec_sealed(&args, &env, None))
}

/// Executes the running binary again with `args` (`args[0]` included) and the current
/// environment, keeping every descriptor without `FD_CLOEXEC`. From the very file the process
/// runs from when that is already read-only or sealed (no second copy), otherwise from a new
/// read-only bind mount or sealed copy as [`ensure_sealed`]. Returns only on error.
pub fn reexec(args: &[CString]) -> io::Error {
    let (_, env) = argv_envp();
    let exe = match std::fs::File::open("/proc/self/exe") {
        Ok(f) => f,
        Err(e) => return e,
    };
    if sealed_file(&exe) {
        exec_sealed(args, &env, Some(exe.into()))
    } else {
        drop(exe);
        exec_sealed(args, &env, None)
    }
}

/// `execveat`s `fd` (a descriptor of a file nothing can write), or a new read-only copy of our
/// binary when none is given. Returns only on error.
fn exec_sealed(args: &[CString], env: &[CString], fd: Option<OwnedFd>) -> io::Error {
    let mut a: Vec<*const libc::c_char> = args.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = env.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    let fd = match fd {
        Some(fd) => fd,
        None => match ro_bind(c"/proc/self/exe").or_else(|_| memfd_copy()) {
            Ok(fd) => fd,
            Err(e) => return e,
        },
    };
    // SAFETY: null-terminated arrays of valid C strings; returns only on error.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd.as_raw_fd(),
            c"".as_ptr(),
            a.as_ptr(),
            e.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}

fn argv_envp() -> (Vec<CString>, Vec<CString>) {
    use std::os::unix::ffi::OsStringExt;
    let args = std::env::args_os()
        .map(|a| CString::new(a.into_vec()).unwrap_or_default())
        .collect();
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut b = k.into_vec();
            b.push(b'=');
            b.extend(v.into_vec());
            CString::new(b).unwrap_or_default()
        })
        .collect();
    (args, env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_open(fd: &OwnedFd) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    #[test]
    fn copies_cannot_be_written() {
        // Needs CAP_SYS_ADMIN (the tests run as root).
        // A file of our own: our binary is busy (ETXTBSY) while the test runs.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("dh-bin");
        std::fs::write(&file, b"x").expect("write");
        let c = CString::new(file.to_str().expect("utf8")).expect("cstr");
        let fd = ro_bind(&c).expect("open_tree + mount_setattr");
        assert_eq!(
            write_open(&fd).expect_err("ro bind").raw_os_error(),
            Some(libc::EROFS)
        );
        let mem = memfd_copy().expect("memfd");
        // SAFETY: fcntl on a valid fd.
        assert_eq!(
            unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_GET_SEALS) } & SEALS,
            SEALS
        );
        let mut f = write_open(&mem).expect("a sealed memfd opens, but refuses writes");
        assert!(std::io::Write::write(&mut f, b"x").is_err());
    }
}
