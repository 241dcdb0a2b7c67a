//! Network namespaces: open one by path and run work inside it without moving the calling thread.
//!
//! `setns(2)` changes the namespace of one thread only, so [`NetNs::run`] does the work on a
//! short-lived scoped OS thread that enters the namespace, runs the closure and exits; the caller's
//! thread never leaves its own namespace. A netlink socket stays bound to the namespace it was
//! created in, so [`NetNs::netlink`] creates the rtnetlink socket while the calling thread is
//! briefly inside ([`NetNs::enter_briefly`]): afterwards every request on that socket acts inside
//! the target namespace. Plugins never fork.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// `NSFS_MAGIC` from `linux/magic.h`: the filesystem type of `/proc/*/ns/*` and their bind mounts.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Errors opening or entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist (the namespace is gone or was never there).
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    /// The path exists but is not a namespace file.
    #[error("{0} is not a network namespace")]
    NotNetns(PathBuf),
    /// Any other I/O error (permissions, setns failure, ...).
    #[error("network namespace {path}: {source}")]
    Io {
        /// The namespace path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The helper thread panicked.
    #[error("network namespace {0}: worker thread panicked")]
    Panicked(PathBuf),
}

impl NetnsError {
    /// True when the namespace does not exist (DEL treats this as success).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetnsError::NotFound(_))
    }
}

impl From<NetnsError> for crate::error::CniError {
    /// A missing or invalid `CNI_NETNS` is the spec's error 4 (invalid environment variable,
    /// naming it); anything else is a plugin error with code
    /// [`INTERNAL_ERROR`](crate::error::INTERNAL_ERROR).
    fn from(e: NetnsError) -> Self {
        match e {
            NetnsError::NotFound(_) | NetnsError::NotNetns(_) => {
                crate::error::CniError::invalid_env(format!("CNI_NETNS: {e}"))
            }
            other => {
                crate::error::CniError::plugin(crate::error::INTERNAL_ERROR, other.to_string())
            }
        }
    }
}

/// An open network namespace file.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the network namespace at `path` (a bind mount under `/run/netns` or
    /// `/proc/<pid>/ns/net`). Fails with [`NetnsError::NotFound`] when it does not exist and
    /// [`NetnsError::NotNetns`] when the path is some other file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(NetnsError::NotFound(path));
            }
            Err(source) => return Err(NetnsError::Io { path, source }),
        };
        let st = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        // The field's integer type differs between targets; compare as i64.
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        let magic = st.filesystem_type().0 as i64;
        if magic != NSFS_MAGIC {
            return Err(NetnsError::NotNetns(path));
        }
        Ok(NetNs { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw file descriptor (for `IFLA_NET_NS_FD`). Valid while `self` lives.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Borrowed file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a dedicated OS thread that has entered this namespace; the calling thread is
    /// not affected. The thread exits afterwards, so its namespace change dies with it.
    pub fn run<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Io {
                    path: self.path.clone(),
                    source: e.into(),
                })?;
                Ok(f())
            });
            worker
                .join()
                .unwrap_or_else(|_| Err(NetnsError::Panicked(self.path.clone())))
        })
    }

    /// Runs `f` on the calling thread while it is inside this namespace, then switches the thread
    /// back to the namespace it was in. `f` must be short and synchronous (no `.await`): nothing
    /// else may run on this thread meanwhile. Cheaper than [`NetNs::run`] (no thread); used to
    /// create sockets and open `/proc/sys` files, which stay bound to the namespace they were
    /// created in. If the thread cannot return to its namespace the process aborts rather than
    /// go on acting in the wrong one.
    pub fn enter_briefly<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R,
    {
        let home = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Io {
            path: PathBuf::from("/proc/thread-self/ns/net"),
            source,
        })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let r = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!(
                "deckhand-cni: cannot return from network namespace {}: {e}; aborting",
                self.path.display()
            );
            std::process::abort();
        }
        Ok(r)
    }

    /// Opens a (blocking) rtnetlink socket inside the namespace: the socket is created while
    /// the calling thread is briefly inside it, and every request on it acts inside this
    /// namespace.
    pub fn netlink(&self) -> Result<crate::link::Netlink, NetnsError> {
        self.enter_briefly(crate::link::Netlink::new)?
            .map_err(|source| NetnsError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// An rtnetlink socket for the calling thread's namespace.
pub fn host_netlink() -> std::io::Result<crate::link::Netlink> {
    crate::link::Netlink::new()
}

/// Writes a sysctl below `/proc/sys` (e.g. `net/ipv4/ip_forward`) in the namespace of the calling
/// thread, skipping the write when the value is already set.
pub fn write_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    if let Ok(cur) = std::fs::read_to_string(&path)
        && cur.trim() == value
    {
        return Ok(());
    }
    std::fs::write(&path, value)
}

/// Reads a sysctl below `/proc/sys` in the namespace of the calling thread.
pub fn read_sysctl(key: &str) -> std::io::Result<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key)).map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_not_found() {
        let err = NetNs::open("/run/netns/dh-does-not-exist-xyz").err();
        assert!(matches!(err, Some(NetnsError::NotFound(_))));
    }

    #[test]
    fn regular_file_is_not_netns() {
        let err = NetNs::open("/proc/self/status").err();
        assert!(matches!(err, Some(NetnsError::NotNetns(_))));
    }

    #[test]
    fn entering_briefly_returns_to_the_namespace() {
        let before = std::fs::read_link("/proc/thread-self/ns/net").expect("link");
        let ns = NetNs::current().expect("own netns");
        let v = ns.enter_briefly(|| 7).expect("enter");
        assert_eq!(v, 7);
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").expect("link"),
            before
        );
    }

    #[test]
    fn current_namespace_runs() {
        let ns = NetNs::current().expect("own netns");
        let v = ns.run(|| 41 + 1).expect("run");
        assert_eq!(v, 42);
    }
}
