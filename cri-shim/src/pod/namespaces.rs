//! Pinned pod namespaces without a pause process.
//!
//! `unshare(2)` of the network, IPC and UTS namespaces changes only the calling thread, so a
//! short-lived thread of the daemon creates them, sets the hostname and the pod's sysctls
//! inside them, and bind-mounts `/proc/thread-self/ns/*` onto files in the sandbox directory
//! (as `ip netns add` does). The thread then ends; the bind mounts keep the namespaces alive
//! until [`unpin`]. Nothing forks.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::{Error, Result};

/// Pinned namespaces of one sandbox.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pins {
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
}

/// What to create.
#[derive(Debug, Default, Clone)]
pub struct Request {
    pub net: bool,
    pub ipc: bool,
    pub uts: bool,
    pub hostname: String,
    /// `(name, value)` with dotted names, applied inside the new namespaces.
    pub sysctls: Vec<(String, String)>,
}

/// Which namespace a sysctl belongs to, or an error for one that is not namespaced (it would
/// change the whole node).
pub fn sysctl_namespace(name: &str) -> Result<&'static str> {
    let bad = || Error::InvalidArgument(format!("sysctl {name:?} is not allowed in a pod"));
    if name.is_empty()
        || name.split(['.', '/']).any(|p| p.is_empty() || p == "..")
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    {
        return Err(bad());
    }
    if name.starts_with("net.") {
        return Ok("net");
    }
    if name.starts_with("kernel.shm")
        || name.starts_with("kernel.msg")
        || name == "kernel.sem"
        || name.starts_with("fs.mqueue.")
    {
        return Ok("ipc");
    }
    if name == "kernel.domainname" || name == "kernel.hostname" {
        return Ok("uts");
    }
    Err(bad())
}

/// Checks that every sysctl fits a namespace the pod has of its own.
pub fn validate_sysctls(req: &Request) -> Result<()> {
    for (k, _) in &req.sysctls {
        let ns = sysctl_namespace(k)?;
        let own = match ns {
            "net" => req.net,
            "ipc" => req.ipc,
            _ => req.uts,
        };
        if !own {
            return Err(Error::InvalidArgument(format!(
                "sysctl {k:?} needs the pod's own {ns} namespace (it shares the host's)"
            )));
        }
    }
    Ok(())
}

fn pin_one(kind: &str, dest: &Path) -> std::io::Result<()> {
    std::fs::File::create(dest)?;
    let src = format!("/proc/thread-self/ns/{kind}");
    nix::mount::mount(
        Some(src.as_str()),
        dest,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

/// Creates and pins the requested namespaces under `dir` (files `net`, `ipc`, `uts`).
pub fn create(dir: &Path, req: &Request) -> Result<Pins> {
    validate_sysctls(req)?;
    let dir = dir.to_path_buf();
    let req = req.clone();
    let handle = std::thread::Builder::new()
        .name("dh-netns".into())
        .spawn(move || create_on_this_thread(&dir, &req))
        .map_err(|e| Error::internal("spawning the namespace thread", e))?;
    handle
        .join()
        .map_err(|_| Error::Internal("the namespace thread panicked".into()))?
}

fn create_on_this_thread(dir: &Path, req: &Request) -> Result<Pins> {
    let mut flags = 0;
    if req.net {
        flags |= libc::CLONE_NEWNET;
    }
    if req.ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if req.uts {
        flags |= libc::CLONE_NEWUTS;
    }
    let mut pins = Pins::default();
    if flags == 0 {
        return Ok(pins);
    }
    // SAFETY: plain syscall; affects only this thread, which ends right after.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(Error::internal("unshare", std::io::Error::last_os_error()));
    }
    let res = (|| -> Result<()> {
        if req.uts && !req.hostname.is_empty() {
            // SAFETY: a valid buffer and its length.
            let r = unsafe { libc::sethostname(req.hostname.as_ptr().cast(), req.hostname.len()) };
            if r < 0 {
                return Err(Error::internal(
                    format!("sethostname {:?}", req.hostname),
                    std::io::Error::last_os_error(),
                ));
            }
        }
        if req.net {
            // A new network namespace has lo down.
            set_loopback_up()?;
        }
        for (k, v) in &req.sysctls {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::write(&path, v.as_bytes())
                .map_err(|e| Error::InvalidArgument(format!("sysctl {k}={v}: {e}")))?;
        }
        for (on, kind) in [(req.net, "net"), (req.ipc, "ipc"), (req.uts, "uts")] {
            if !on {
                continue;
            }
            let dest = dir.join(kind);
            pin_one(kind, &dest)
                .map_err(|e| Error::internal(format!("pinning {kind} namespace"), e))?;
            match kind {
                "net" => pins.net = Some(dest),
                "ipc" => pins.ipc = Some(dest),
                _ => pins.uts = Some(dest),
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(pins),
        Err(e) => {
            unpin(&pins);
            Err(e)
        }
    }
}

/// Brings `lo` up in the calling thread's network namespace (SIOCSIFFLAGS: one ioctl, no
/// netlink socket needed).
fn set_loopback_up() -> Result<()> {
    // SAFETY: a plain socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::internal("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain data; the name fits.
    let res = unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let r = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            -1
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr)
        };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 { Err(err) } else { Ok(()) }
    };
    res.map_err(|e| Error::internal("bringing lo up", e))
}

/// Unmounts and removes the pins (missing ones are fine).
pub fn unpin(pins: &Pins) {
    for p in [&pins.net, &pins.ipc, &pins.uts].into_iter().flatten() {
        unmount_file(p);
    }
}

/// Lazily unmounts `p` and removes the file.
pub fn unmount_file(p: &Path) {
    match nix::mount::umount2(p, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!(path = %p.display(), error = %e, "unmounting a namespace pin"),
    }
    let _ = std::fs::remove_file(p);
}

/// Whether `p` is a live namespace pin (an nsfs mount).
pub fn is_pinned(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == 0x6e73_6673)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_namespaced_or_refused() {
        assert_eq!(sysctl_namespace("net.ipv4.ip_forward").ok(), Some("net"));
        assert_eq!(sysctl_namespace("kernel.shmmax").ok(), Some("ipc"));
        assert_eq!(sysctl_namespace("fs.mqueue.msg_max").ok(), Some("ipc"));
        for bad in [
            "vm.swappiness",
            "kernel.panic",
            "net..x",
            "net/../../x",
            "",
            "net.a b",
        ] {
            assert!(sysctl_namespace(bad).is_err(), "{bad}");
        }
        let req = Request {
            net: false,
            sysctls: vec![("net.ipv4.ip_forward".into(), "1".into())],
            ..Default::default()
        };
        assert!(
            validate_sysctls(&req).is_err(),
            "net sysctl with the host network"
        );
    }
}
