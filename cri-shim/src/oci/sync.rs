//! The sync channel between the runtime and the container init (or exec'd process): a
//! `SOCK_SEQPACKET` socketpair, one JSON message per packet, close-on-exec on both ends, so
//! a successful `execve` shows up as EOF.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub(crate) enum Msg {
    /// Parent → child: namespaces joined by the parent and cgroups are in place, go on.
    Go,
    /// Child → parent: something was clamped or ignored.
    Warning { msg: String },
    /// Child → parent: the init is ready and waits on the exec fifo.
    Created,
    /// Child → parent: setup failed; the child exits.
    Error { msg: String },
}

pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    crate::oci::cvt(r as libc::c_long)?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn send(fd: &OwnedFd, msg: &Msg) -> io::Result<()> {
    let buf = serde_json::to_vec(msg).map_err(io::Error::other)?;
    loop {
        // SAFETY: buf is valid for its length.
        let r = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The next message; `None` when the peer closed (or exec'd).
pub(crate) fn recv(fd: &OwnedFd) -> io::Result<Option<Msg>> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for its length.
        let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r > 0 {
            return serde_json::from_slice(&buf[..r as usize])
                .map(Some)
                .map_err(io::Error::other);
        }
        if r == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
