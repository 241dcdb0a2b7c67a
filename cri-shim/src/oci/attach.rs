//! The monitor's attach socket: how clients (deckhand-cri's Attach) share a running
//! container's stdio without ever being its parent.
//!
//! A `SOCK_SEQPACKET` unix socket: every message is one frame whose first byte says what it
//! is. Monitor → client: [`STDOUT`] or [`STDERR`] and the bytes the container wrote (a copy of
//! what goes to the CRI log). Client → monitor: [`STDIN`] and bytes for the container's stdin
//! (a lone [`STDIN`] byte is that client's end of input: with `stdin_once` it closes the
//! container's stdin), or [`RESIZE`] with width and height as two little-endian `u16`. When the
//! container exits, the monitor closes every connection. A client that cannot keep up (its
//! socket buffer is full) is dropped rather than allowed to stall the log.
//!
//! Single-threaded and non-blocking, for the monitor's poll loop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const RESIZE: u8 = 3;

/// The largest frame (a kind byte and 32 KiB of data).
pub const MAX_FRAME: usize = 32 * 1024 + 1;

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long", path.display()),
        ));
    }
    for (i, c) in b.iter().enumerate() {
        a.sun_path[i] = *c as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + b.len() + 1;
    Ok((a, len as libc::socklen_t))
}

fn socket(kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds and listens on `path` (replacing a stale socket file), mode 0600.
pub fn listen(path: &Path, kind: libc::c_int) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = socket(kind | libc::SOCK_NONBLOCK)?;
    let _ = std::fs::remove_file(path);
    // SAFETY: a valid address of the given length.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: plain syscall.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Connects to an attach socket (non-blocking).
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = socket(libc::SOCK_SEQPACKET)?;
    // SAFETY: a valid address of the given length.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    set_nonblocking(fd.as_raw_fd())?;
    Ok(fd)
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends one frame without blocking.
pub fn send(fd: RawFd, kind: u8, data: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(kind);
    frame.extend_from_slice(data);
    // SAFETY: a valid buffer.
    let r = unsafe {
        libc::send(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one frame (`Ok(0)`: the peer is gone).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid buffer.
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// The monitor's side.
#[derive(Debug, Default)]
pub struct Hub {
    pub listener: Option<OwnedFd>,
    pub clients: Vec<OwnedFd>,
    /// Where client input goes: the stdin pipe's write end, or the terminal master.
    pub stdin: Option<OwnedFd>,
    pub stdin_once: bool,
    /// The terminal master (for resizes).
    pub tty: Option<RawFd>,
}

impl Hub {
    /// Accepts every pending connection.
    pub fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            // SAFETY: plain syscall; no address wanted.
            let fd = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                return;
            }
            // SAFETY: a fresh descriptor we own.
            self.clients.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Copies output to every client; drops those that fail.
    pub fn broadcast(&mut self, kind: u8, data: &[u8]) {
        if self.clients.is_empty() {
            return;
        }
        self.clients.retain(|c| {
            data.chunks(MAX_FRAME - 1)
                .all(|d| send(c.as_raw_fd(), kind, d).is_ok())
        });
    }

    /// Handles what client `i` sent; false when it is gone (the caller removes it).
    pub fn client_input(&mut self, i: usize, buf: &mut [u8]) -> bool {
        let Some(fd) = self.clients.get(i).map(|c| c.as_raw_fd()) else {
            return false;
        };
        loop {
            match recv(fd, buf) {
                Ok(0) => return false,
                Ok(n) => self.frame(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }

    fn frame(&mut self, f: &[u8]) {
        match f.first() {
            Some(&STDIN) if f.len() == 1 && self.stdin_once && self.tty.is_none() => {
                self.stdin = None;
            }
            Some(&STDIN) if f.len() == 1 => {}
            Some(&STDIN) => {
                if let Some(w) = &self.stdin {
                    let mut data = &f[1..];
                    while !data.is_empty() {
                        // SAFETY: a valid buffer.
                        let r =
                            unsafe { libc::write(w.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                        if r <= 0 {
                            // A full pipe (the container does not read): the rest is dropped.
                            break;
                        }
                        data = &data[r as usize..];
                    }
                }
            }
            Some(&RESIZE) if f.len() == 5 => {
                if let Some(t) = self.tty {
                    let ws = libc::winsize {
                        ws_col: u16::from_le_bytes([f[1], f[2]]),
                        ws_row: u16::from_le_bytes([f[3], f[4]]),
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: a valid descriptor and struct.
                    unsafe { libc::ioctl(t, libc::TIOCSWINSZ, &ws) };
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: valid array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: fresh descriptors.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn frames_flow_both_ways() -> io::Result<()> {
        let (mon, cli) = pair();
        let (pr, pw) = {
            let mut fds = [0; 2];
            // SAFETY: valid array.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: fresh descriptors.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        set_nonblocking(mon.as_raw_fd())?;
        let mut hub = Hub {
            clients: vec![mon],
            stdin: Some(pw),
            stdin_once: true,
            ..Default::default()
        };
        hub.broadcast(STDOUT, b"hello");
        let mut buf = vec![0u8; MAX_FRAME];
        let n = recv(cli.as_raw_fd(), &mut buf)?;
        assert_eq!(&buf[..n], b"\x01hello");
        send(cli.as_raw_fd(), STDIN, b"input")?;
        send(cli.as_raw_fd(), STDIN, b"")?;
        assert!(hub.client_input(0, &mut buf));
        let mut got = [0u8; 16];
        // SAFETY: valid buffer.
        let n = unsafe { libc::read(pr.as_raw_fd(), got.as_mut_ptr().cast(), got.len()) };
        assert_eq!(&got[..n as usize], b"input");
        assert!(
            hub.stdin.is_none(),
            "stdin_once closes stdin at the client's EOF"
        );
        // SAFETY: valid buffer.
        let n = unsafe { libc::read(pr.as_raw_fd(), got.as_mut_ptr().cast(), got.len()) };
        assert_eq!(n, 0, "the container sees EOF");
        drop(cli);
        assert!(!hub.client_input(0, &mut buf), "a gone client is reported");
        Ok(())
    }
}
