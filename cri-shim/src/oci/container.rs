//! The runtime side: the runc-like operations on a state root.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

use super::cgroups;
use super::init::{self, Mode};
use super::state::{FIFO, Record, State, Status, proc_stat, write_atomic};
use super::sync::{self, Msg};
use super::{Ctx, Error, Result};

/// A state root (runc's `--root`).
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
}

/// Options of [`Runtime::create`].
#[derive(Debug, Default, Clone)]
pub struct CreateOptions {
    /// Written with the init's pid once it is created.
    pub pid_file: Option<PathBuf>,
    /// The container's stdin, stdout and stderr; the caller's own when `None`.
    pub stdio: Option<[RawFd; 3]>,
    /// Where to send the pty master when `process.terminal` is set.
    pub console_socket: Option<PathBuf>,
}

/// Options of [`Runtime::exec`].
#[derive(Debug, Default, Clone)]
pub struct ExecOptions {
    pub pid_file: Option<PathBuf>,
    /// Leave the process running (reparented to the caller's subreaper) instead of waiting.
    pub detach: bool,
    pub stdio: Option<[RawFd; 3]>,
    /// Where to send the pty master when the process has `terminal` set.
    pub console_socket: Option<PathBuf>,
}

/// The result of a successful create.
#[derive(Debug)]
pub struct Created {
    pub pid: i32,
    /// Settings that were clamped or ignored, for the caller to log.
    pub warnings: Vec<String>,
}

fn ns_flag(t: LinuxNamespaceType) -> (libc::c_int, &'static str) {
    match t {
        LinuxNamespaceType::Mount => (libc::CLONE_NEWNS, "mnt"),
        LinuxNamespaceType::Cgroup => (libc::CLONE_NEWCGROUP, "cgroup"),
        LinuxNamespaceType::Uts => (libc::CLONE_NEWUTS, "uts"),
        LinuxNamespaceType::Ipc => (libc::CLONE_NEWIPC, "ipc"),
        LinuxNamespaceType::User => (libc::CLONE_NEWUSER, "user"),
        LinuxNamespaceType::Pid => (libc::CLONE_NEWPID, "pid"),
        LinuxNamespaceType::Network => (libc::CLONE_NEWNET, "net"),
        LinuxNamespaceType::Time => (libc::CLONE_NEWTIME, "time"),
    }
}

/// Valid runc ids: `[A-Za-z0-9_+.-]+`, not `.`/`..`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b))
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(17)?.parse().ok())
        .unwrap_or(0)
}

/// `clone(2)` without a new stack (fork semantics) with namespace flags.
fn raw_clone(flags: libc::c_int) -> std::io::Result<i32> {
    // SAFETY: clone without CLONE_VM and a null stack behaves like fork; the caller is
    // single-threaded (checked), so the child may allocate.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    super::cvt(r).map(|p| p as i32)
}

/// `clone3(2)` with `CLONE_INTO_CGROUP`: the child starts in the cgroup2 directory `cgroup`
/// without the global lock a later move takes. Fork semantics, like [`raw_clone`].
fn clone_into_cgroup(flags: libc::c_int, cgroup: BorrowedFd<'_>) -> std::io::Result<i32> {
    /// `struct clone_args` (Linux 5.7, with `cgroup`).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let args = CloneArgs {
        flags: flags as u32 as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: as raw_clone (no CLONE_VM, no stack: fork semantics from a single-threaded
    // caller); `args` is a valid clone_args of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    super::cvt(r).map(|p| p as i32)
}

/// Clones the child, straight into the cgroup2 directory when there is one and the kernel can
/// (Linux ≥ 5.7); otherwise a plain clone, and the child joins by itself. Returns the pid (0 in
/// the child) and whether the child was cloned into the cgroup.
fn spawn(flags: libc::c_int, cgroups: Option<&cgroups::SelfJoin>) -> Result<(i32, bool)> {
    if let Some(fd) = cgroups.and_then(|j| j.unified_dir.as_ref()) {
        // Any failure (an old kernel, a cgroup that refuses processes) falls back to the plain
        // path, where the child's own write names the problem.
        if let Ok(pid) = clone_into_cgroup(flags, fd.as_fd()) {
            return Ok((pid, true));
        }
    }
    Ok((raw_clone(flags).ctx(|| "clone")?, false))
}

fn open_ns(path: &Path) -> Result<OwnedFd> {
    let f = std::fs::File::open(path).ctx(|| format!("opening namespace {}", path.display()))?;
    Ok(f.into())
}

fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: plain waitpid.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
    Some(exit_code(status))
}

/// A wait status as a shell exit code (128 + signal for a signalled process).
pub(crate) fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// Removes the state directory unless disarmed.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn load_spec(bundle: &Path) -> Result<Spec> {
    let p = bundle.join("config.json");
    let data =
        std::fs::read(&p).map_err(|e| Error::Bundle(format!("reading {}: {e}", p.display())))?;
    serde_json::from_slice(&data)
        .map_err(|e| Error::Bundle(format!("invalid {}: {e}", p.display())))
}

/// Talks to the child until it is created (or exec'd), returning its warnings.
fn wait_child(sock: &OwnedFd, pid: i32, until_created: bool) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    loop {
        match sync::recv(sock).ctx(|| "reading from the container init")? {
            Some(Msg::Warning { msg }) => warnings.push(msg),
            Some(Msg::Created) if until_created => return Ok(warnings),
            Some(Msg::Error { msg }) => {
                reap(pid);
                return Err(Error::Init(msg));
            }
            None if !until_created => return Ok(warnings),
            None | Some(_) => {
                let code = reap(pid);
                return Err(Error::Init(format!(
                    "the init exited before reporting (status {code:?})"
                )));
            }
        }
    }
}

impl Runtime {
    pub fn new(root: impl Into<PathBuf>) -> Runtime {
        Runtime { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        Ok(self.root.join(id))
    }

    fn record(&self, id: &str) -> Result<(PathBuf, Record)> {
        let dir = self.dir(id)?;
        if !dir.is_dir() {
            return Err(Error::NotFound(id.to_string()));
        }
        let rec = match Record::load(&dir) {
            Ok(r) => r,
            // A create killed before it wrote anything: nothing runs.
            Err(_) => Record {
                id: id.to_string(),
                pid: 0,
                pid_start: 0,
                bundle: PathBuf::new(),
                rootfs: PathBuf::new(),
                created: String::new(),
                annotations: HashMap::new(),
                cgroups_path: String::new(),
            },
        };
        Ok((dir, rec))
    }

    /// Creates the container: the init runs in its namespaces, fully set up, and waits for
    /// [`Runtime::start`]. The caller must be single-threaded and stays the init's parent.
    pub fn create(&self, id: &str, bundle: &Path, opts: &CreateOptions) -> Result<Created> {
        if threads() != 1 {
            return Err(Error::Other(
                "create must be called from a single-threaded process".into(),
            ));
        }
        let dir = self.dir(id)?;
        let bundle = std::path::absolute(bundle).ctx(|| format!("bundle {}", bundle.display()))?;
        let spec = load_spec(&bundle)?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::Bundle("config.json has no process".into()))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(Error::Bundle("process.args must not be empty".into()));
        }
        let console = console_socket(process, opts.console_socket.as_deref())?;
        let root = spec
            .root()
            .as_ref()
            .ok_or_else(|| Error::Bundle("config.json has no root".into()))?;
        let rootfs = bundle.join(root.path());
        let rootfs = rootfs
            .canonicalize()
            .map_err(|e| Error::Bundle(format!("rootfs {}: {e}", rootfs.display())))?;
        if !rootfs.is_dir() {
            return Err(Error::Bundle(format!(
                "rootfs {} is not a directory",
                rootfs.display()
            )));
        }
        let namespaces = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default();
        if !namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Mount && n.path().is_none())
        {
            return Err(Error::Bundle("a new mount namespace is required".into()));
        }
        let mut clone_flags = 0;
        let mut join = Vec::new();
        let mut join_pid = None;
        let mut unshare_cgroup = false;
        let mut new_uts = false;
        for ns in &namespaces {
            let (flag, _) = ns_flag(ns.typ());
            match (ns.typ(), ns.path()) {
                (LinuxNamespaceType::User | LinuxNamespaceType::Time, _) => {
                    return Err(Error::Bundle(format!(
                        "{:?} namespaces are not supported yet",
                        ns.typ()
                    )));
                }
                (LinuxNamespaceType::Pid, Some(p)) => join_pid = Some(open_ns(p)?),
                (_, Some(p)) => join.push((flag, open_ns(p)?)),
                (LinuxNamespaceType::Cgroup, None) => unshare_cgroup = true,
                (t, None) => {
                    new_uts |= t == LinuxNamespaceType::Uts;
                    clone_flags |= flag;
                }
            }
        }

        std::fs::create_dir_all(&self.root).ctx(|| format!("creating {}", self.root.display()))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists(id.into()));
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("creating {}", dir.display()),
                    err: e,
                });
            }
        }
        let mut guard = DirGuard(Some(dir.clone()));
        // Recorded before the cgroup exists: a create killed from here on leaves a record
        // (status "creating", no pid) from which `delete` finds and removes the cgroup.
        let cgroups_path = cgroups_path(&spec, id);
        let record = |pid, pid_start| Record {
            id: id.to_string(),
            pid,
            pid_start,
            bundle: bundle.clone(),
            rootfs: rootfs.clone(),
            created: super::time::now(),
            annotations: spec.annotations().clone().unwrap_or_default(),
            cgroups_path: cgroups_path.clone(),
        };
        record(0, 0).save(&dir)?;
        let fifo_path = dir.join(FIFO);
        nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::from_bits_truncate(0o622))
            .ctx(|| "creating exec fifo")?;
        let fifo: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&fifo_path)
            .ctx(|| "opening exec fifo")?
            .into();
        let (parent_sock, child_sock) = sync::pair().ctx(|| "socketpair")?;
        if let Some(fd) = &join_pid {
            // Only affects our children: the init is cloned into that pid namespace.
            // SAFETY: valid namespace descriptor.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(Error::Io {
                    context: "joining pid namespace".into(),
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        // The cgroup exists, with its limits, before the init does: the init moves itself in
        // (see `cgroups::Manager::self_join`).
        let cg = cgroups::Manager::new(&cgroups_path).map_err(|e| Error::Cgroups(e.to_string()))?;
        let destroy_cg = |e: Error| {
            let _ = cg.destroy(true);
            e
        };
        let (mut cg_warnings, cg_join) = prepare_cgroups(&cg, &spec).map_err(destroy_cg)?;
        let args = init::Args {
            spec: &spec,
            process,
            bundle: &bundle,
            join,
            cgroups: Some(&cg_join),
            unshare_cgroup,
            new_uts,
            stdio: opts.stdio,
            console: console.as_ref().map(|c| c.as_raw_fd()),
            mode: Mode::Init {
                fifo: fifo.as_raw_fd(),
                rootfs: rootfs.clone(),
            },
        };
        let (pid, cloned_into) = spawn(clone_flags, Some(&cg_join)).map_err(destroy_cg)?;
        if pid == 0 {
            drop(parent_sock);
            init::child_main(&args, &child_sock, cloned_into);
        }
        drop(child_sock);
        drop(args);
        drop(cg_join);
        // From here on a failure must also kill the child and remove the cgroup.
        let fail = |e: Error| {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            let _ = cg.destroy(true);
            e
        };
        // The init sets itself up while we record it.
        sync::send(&parent_sock, &Msg::Go)
            .ctx(|| "signalling the init")
            .map_err(fail)?;
        let pid_start = proc_stat(pid).map(|s| s.1).unwrap_or(0);
        let rec = record(pid, pid_start);
        rec.save(&dir).map_err(fail)?;
        let mut warnings = wait_child(&parent_sock, pid, true).inspect_err(|_| {
            let _ = cg.destroy(true);
        })?;
        warnings.append(&mut cg_warnings);
        drop(fifo);
        if let Some(p) = &opts.pid_file {
            write_atomic(p, pid.to_string().as_bytes()).map_err(fail)?;
        }
        guard.0 = None;
        Ok(Created { pid, warnings })
    }

    /// Lets a created container's init exec its process.
    pub fn start(&self, id: &str) -> Result<()> {
        let (dir, rec) = self.record(id)?;
        let status = rec.status(&dir);
        if status != Status::Created {
            return Err(Error::State {
                id: id.into(),
                status,
                what: "cannot start a container that is not created",
            });
        }
        let fifo = dir.join(FIFO);
        let c =
            CString::new(fifo.as_os_str().as_bytes()).map_err(|e| Error::Other(e.to_string()))?;
        // SAFETY: valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::Io {
                context: "opening exec fifo".into(),
                err: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let mut b = [0u8; 1];
            // SAFETY: valid buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            if n == 1 {
                break;
            }
            if n == 0 && pfd.revents & libc::POLLHUP != 0 {
                return Err(Error::Other(
                    "the container init closed the exec fifo without starting".into(),
                ));
            }
            if !rec.alive() {
                return Err(Error::State {
                    id: id.into(),
                    status: Status::Stopped,
                    what: "the init died before start",
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Other(
                    "timed out waiting for the container init on the exec fifo".into(),
                ));
            }
        }
        let _ = std::fs::remove_file(&fifo);
        Ok(())
    }

    /// The OCI state.
    pub fn state(&self, id: &str) -> Result<State> {
        let (dir, rec) = self.record(id)?;
        let mut s = rec.to_state(&dir);
        s.id = id.to_string();
        Ok(s)
    }

    /// The ids of all containers under the root.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if let Some(n) = e.file_name().to_str() {
                    ids.push(n.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The host pids of the processes in the container's pid namespace.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>> {
        let (dir, rec) = self.record(id)?;
        if rec.status(&dir) == Status::Stopped || rec.pid == 0 {
            return Ok(Vec::new());
        }
        // The cgroup knows best (processes that left the pid namespace's view included).
        if !rec.cgroups_path.is_empty()
            && let Ok(cg) = cgroups::Manager::new(&rec.cgroups_path)
            && let Ok(pids) = cg.procs()
            && !pids.is_empty()
        {
            return Ok(pids);
        }
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", rec.pid))
            .ctx(|| "reading the init's pid namespace")?;
        // A container in our own pid namespace: never "every process in it" (that is the host).
        if std::fs::read_link("/proc/self/ns/pid").is_ok_and(|own| own == ns) {
            return Ok(vec![rec.pid]);
        }
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc")
            .ctx(|| "reading /proc")?
            .flatten()
        {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|n| n == ns) {
                pids.push(pid);
            }
        }
        pids.sort();
        Ok(pids)
    }

    /// Sends `signal` to the init (or, with `all`, to every process of the container).
    pub fn kill(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        let (dir, rec) = self.record(id)?;
        let status = rec.status(&dir);
        if matches!(status, Status::Stopped | Status::Creating) && !all {
            return Err(Error::State {
                id: id.into(),
                status,
                what: "container not running",
            });
        }
        let targets = if all { self.pids(id)? } else { vec![rec.pid] };
        for pid in targets {
            // SAFETY: plain kill.
            if unsafe { libc::kill(pid, signal) } < 0 && !all {
                return Err(Error::Io {
                    context: format!("kill {pid}"),
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Deletes a stopped or created container (`force`: also a running one, killed first).
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let (dir, rec) = self.record(id)?;
        let status = rec.status(&dir);
        if status == Status::Running && !force {
            return Err(Error::State {
                id: id.into(),
                status,
                what: "cannot delete a running container without --force",
            });
        }
        if rec.alive() {
            for pid in self
                .pids(id)
                .unwrap_or_default()
                .into_iter()
                .chain([rec.pid])
            {
                // SAFETY: plain kill.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while rec.alive() {
                if Instant::now() > deadline {
                    return Err(Error::Other(format!(
                        "container {id}: init {} did not die",
                        rec.pid
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        destroy_cgroups(&rec)?;
        std::fs::remove_dir_all(&dir).ctx(|| format!("removing {}", dir.display()))
    }

    /// Runs `process` inside the running container; returns its pid (with `detach`) or its
    /// exit code. The caller must be single-threaded.
    pub fn exec(
        &self,
        id: &str,
        process: &Process,
        opts: &ExecOptions,
    ) -> Result<(i32, Option<i32>)> {
        if threads() != 1 {
            return Err(Error::Other(
                "exec must be called from a single-threaded process".into(),
            ));
        }
        let (dir, rec) = self.record(id)?;
        let status = rec.status(&dir);
        if !matches!(status, Status::Running | Status::Created) {
            return Err(Error::State {
                id: id.into(),
                status,
                what: "cannot exec in a stopped container",
            });
        }
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(Error::Other("process args must not be empty".into()));
        }
        let console = console_socket(process, opts.console_socket.as_deref())?;
        let spec = load_spec(&rec.bundle)?;
        let mut join = Vec::new();
        let own = std::fs::read_link("/proc/self/ns/pid").ok();
        // The order runc uses; mount last so the others are opened through the host's /proc.
        for name in ["ipc", "uts", "net", "cgroup", "mnt"] {
            let p = PathBuf::from(format!("/proc/{}/ns/{name}", rec.pid));
            if std::fs::read_link(&p).ok()
                == std::fs::read_link(format!("/proc/self/ns/{name}")).ok()
            {
                continue;
            }
            let flag = match name {
                "ipc" => libc::CLONE_NEWIPC,
                "uts" => libc::CLONE_NEWUTS,
                "net" => libc::CLONE_NEWNET,
                "cgroup" => libc::CLONE_NEWCGROUP,
                _ => libc::CLONE_NEWNS,
            };
            join.push((flag, open_ns(&p)?));
        }
        let pidns = PathBuf::from(format!("/proc/{}/ns/pid", rec.pid));
        if std::fs::read_link(&pidns).ok() != own {
            let fd = open_ns(&pidns)?;
            // SAFETY: valid namespace descriptor; affects our children only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(Error::Io {
                    context: "joining pid namespace".into(),
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        let (parent_sock, child_sock) = sync::pair().ctx(|| "socketpair")?;
        let cg_join = exec_cgroups(&rec)?;
        let args = init::Args {
            spec: &spec,
            process,
            bundle: &rec.bundle,
            join,
            cgroups: cg_join.as_ref(),
            unshare_cgroup: false,
            new_uts: false,
            stdio: opts.stdio,
            console: console.as_ref().map(|c| c.as_raw_fd()),
            mode: Mode::Exec {
                detach: opts.detach,
            },
        };
        let (pid, cloned_into) = spawn(0, cg_join.as_ref())?;
        if pid == 0 {
            drop(parent_sock);
            init::child_main(&args, &child_sock, cloned_into);
        }
        drop(child_sock);
        drop(args);
        drop(cg_join);
        let kill_child = |e: Error| {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            e
        };
        sync::send(&parent_sock, &Msg::Go)
            .ctx(|| "signalling the exec'd process")
            .map_err(kill_child)?;
        wait_child(&parent_sock, pid, false)?;
        if let Some(p) = &opts.pid_file {
            write_atomic(p, pid.to_string().as_bytes())?;
        }
        if opts.detach {
            return Ok((pid, None));
        }
        Ok((pid, reap(pid)))
    }

    /// The cgroup manager of a container (`None` when it has no cgroup recorded).
    pub fn cgroup(&self, id: &str) -> Result<Option<cgroups::Manager>> {
        let (_, rec) = self.record(id)?;
        if rec.cgroups_path.is_empty() {
            return Ok(None);
        }
        cgroups::Manager::new(&rec.cgroups_path)
            .map(Some)
            .map_err(|e| Error::Cgroups(e.to_string()))
    }

    /// Waits for a container's init that is our child; its exit code.
    pub fn wait_init(&self, pid: i32) -> Option<i32> {
        reap(pid)
    }
}

/// A connection to the console socket when the process wants a terminal.
fn console_socket(
    process: &Process,
    path: Option<&Path>,
) -> Result<Option<std::os::unix::net::UnixStream>> {
    match (process.terminal().unwrap_or(false), path) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(Error::Bundle(
            "--console-socket given but process.terminal is false".into(),
        )),
        (true, None) => Err(Error::Bundle(
            "process.terminal is true: --console-socket is required".into(),
        )),
        (true, Some(p)) => std::os::unix::net::UnixStream::connect(p)
            .map(Some)
            .ctx(|| format!("connecting to the console socket {}", p.display())),
    }
}

/// The spec's cgroupsPath, or `/<id>` when it has none (as runc's cgroupfs driver).
fn cgroups_path(spec: &Spec, id: &str) -> String {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| format!("/{id}"))
}

/// Creates the cgroup and applies `linux.resources`, before the init exists; the init then
/// joins by itself, before it unshares its cgroup namespace. Returns the settings the manager
/// ignored and what the init needs to join.
fn prepare_cgroups(cg: &cgroups::Manager, spec: &Spec) -> Result<(Vec<String>, cgroups::SelfJoin)> {
    let err = |e: cgroups::Error| Error::Cgroups(e.to_string());
    cg.create().map_err(err)?;
    let warnings = match spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        Some(r) => cg.set(&with_default_device_rules(spec, r)).map_err(err)?,
        None => Vec::new(),
    };
    Ok((warnings, cg.self_join().map_err(err)?))
}

/// The spec's device rules followed by what runc always allows: mknod of any node, the
/// default devices, /dev/pts, ptmx and tun, and every device listed in `linux.devices`.
fn with_default_device_rules(spec: &Spec, r: &LinuxResources) -> LinuxResources {
    use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType as T};
    let rule = |typ: T, major: Option<i64>, minor: Option<i64>, access: &str| {
        let mut d = LinuxDeviceCgroup::default();
        d.set_allow(true);
        d.set_typ(Some(typ));
        d.set_major(major);
        d.set_minor(minor);
        d.set_access(Some(access.to_string()));
        d
    };
    let mut rules = r.devices().clone().unwrap_or_default();
    if rules.is_empty() {
        // No rules at all: leave the device controller alone.
        return r.clone();
    }
    rules.push(rule(T::C, None, None, "m"));
    rules.push(rule(T::B, None, None, "m"));
    for (maj, min) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
        (10, 200),
    ] {
        rules.push(rule(T::C, Some(maj), Some(min), "rwm"));
    }
    rules.push(rule(T::C, Some(136), None, "rwm"));
    for d in spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let typ = if d.typ() == T::U { T::C } else { d.typ() };
        rules.push(rule(typ, Some(d.major()), Some(d.minor()), "rwm"));
    }
    let mut out = r.clone();
    out.set_devices(Some(rules));
    out
}

/// What an exec'd process needs to join the init's cgroups (nothing when they are gone).
fn exec_cgroups(rec: &Record) -> Result<Option<cgroups::SelfJoin>> {
    if rec.cgroups_path.is_empty() {
        return Ok(None);
    }
    let err = |e: cgroups::Error| Error::Cgroups(e.to_string());
    let cg = cgroups::Manager::new(&rec.cgroups_path).map_err(err)?;
    if !cg.exists() {
        return Ok(None);
    }
    cg.self_join().map(Some).map_err(err)
}

/// Removes the container's cgroups (killing what is left in them).
fn destroy_cgroups(rec: &Record) -> Result<()> {
    if rec.cgroups_path.is_empty() {
        return Ok(());
    }
    let cg = cgroups::Manager::new(&rec.cgroups_path).map_err(|e| Error::Cgroups(e.to_string()))?;
    cg.destroy(true).map_err(|e| Error::Cgroups(e.to_string()))
}

/// A signal given as a number, `KILL` or `SIGKILL`.
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_signals() {
        assert!(valid_id("dh-abc_1.2+x"));
        assert!(!valid_id("../x") && !valid_id("") && !valid_id("..") && !valid_id("a/b"));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("kill"), Some(9));
        assert_eq!(parse_signal("NOPE"), None);
        assert_eq!(parse_signal("0"), None);
    }
}
