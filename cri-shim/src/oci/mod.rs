//! The built-in OCI runtime: runs an OCI bundle (`config.json`, read with `oci-spec`) as a
//! container in its own namespaces, with runc's state-directory semantics (`--root`, default
//! [`DEFAULT_ROOT`]).
//!
//! [`Runtime`] is the entry point: `create` / `start` / `state` / `kill` / `delete` / `exec`,
//! as runc's commands. The `deckhand-runc` CLI and `deckhand-monitor` are thin over it.
//!
//! Process model: the caller must be single-threaded (checked). `create` clones the container
//! init with the namespace flags (no fork inside a multi-threaded process); the init prepares
//! everything (mounts, pivot_root, devices, hostname, sysctls, rlimits…), reports `created` or
//! its error over a `SOCK_SEQPACKET` socketpair (`sync`) and then blocks opening the
//! `exec.fifo` in the state directory for writing; `start` (any process) opens it for reading,
//! which lets the init drop privileges, load seccomp and exec the process.
//!
//! Cgroups come from [`cgroups`] (another owner): `create` makes the container's cgroup
//! (`linux.cgroupsPath`, default `/<id>`), applies `linux.resources` (plus runc's default device
//! rules) and moves the init in before it unshares its cgroup namespace; `exec` joins it,
//! `delete` destroys it.
//!
//! Terminals: `process.terminal` with a console socket ([`tty`]).
//!
//! Not yet: user and time namespaces, hooks, AppArmor/SELinux labels, `personality`/`ioPriority`/`scheduler`,
//! `--preserve-fds`, pause/resume/update/events commands.
//!
//! Testable without root: path resolution ([`resolve`], on a temp dir), mount option parsing,
//! seccomp compilation ([`seccomp`]), rlimit clamping, CRI log framing ([`crilog`]); the rest is
//! exercised for real by `tests/runc.rs` (no syscall trait: the logic worth faking is in those
//! pure functions, the rest is a straight sequence of syscalls).
//!
//! This module keeps a narrow boundary (only `oci-spec`, `caps`, `seccompiler`, `syscalls`,
//! `nix`, `libc`, `serde` and `thiserror`) so it can become its own crate.

pub mod attach;
pub use deckhand_cgroups as cgroups;
mod container;
pub mod crilog;
mod init;
mod mounts;
pub mod resolve;
pub mod sealed;
pub mod seccomp;
pub mod state;
mod sync;
pub mod time;
pub mod tty;

pub use container::{CreateOptions, Created, ExecOptions, Runtime, parse_signal};
pub use state::{State, Status};

/// runc's default state root (`--root`).
pub const DEFAULT_ROOT: &str = "/run/deckhand-runc";

/// Errors of the runtime library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container \"{0}\" does not exist")]
    NotFound(String),
    #[error("container with id \"{0}\" already exists")]
    Exists(String),
    #[error("invalid container id {0:?}: only [A-Za-z0-9_+.-] allowed, not starting with '.'")]
    InvalidId(String),
    #[error("invalid bundle: {0}")]
    Bundle(String),
    /// An error from inside the container init (before exec), as it reported it.
    #[error("container init: {0}")]
    Init(String),
    #[error("container \"{id}\" is {status}: {what}")]
    State {
        id: String,
        status: Status,
        what: &'static str,
    },
    #[error("{context}: {err}")]
    Io {
        context: String,
        err: std::io::Error,
    },
    #[error("cgroups: {0}")]
    Cgroups(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to I/O errors.
pub(crate) trait Ctx<T> {
    fn ctx<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|err| Error::Io {
            context: f().into(),
            err,
        })
    }
}

impl<T> Ctx<T> for nix::Result<T> {
    fn ctx<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Io {
            context: f().into(),
            err: e.into(),
        })
    }
}

/// `-1` → the last OS error.
pub(crate) fn cvt(r: libc::c_long) -> std::io::Result<libc::c_long> {
    if r == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
