//! The child side: runs in the process `clone`d by [`super::container`], sets the container up
//! and execs the process. Errors before exec go back over the sync channel.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{PosixRlimitType, Process, Spec};

use super::sync::{self, Msg};

type R<T = ()> = std::result::Result<T, String>;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// What the child does.
pub(crate) enum Mode {
    /// The container init: waits on the exec fifo (descriptor) after reporting `created`.
    Init {
        fifo: RawFd,
        rootfs: std::path::PathBuf,
    },
    /// `exec` into a running container; `detach` clears the parent-death signal before exec.
    Exec { detach: bool },
}

pub(crate) struct Args<'a> {
    pub spec: &'a Spec,
    pub process: &'a Process,
    pub bundle: &'a Path,
    /// Namespaces to join with setns (flag, descriptor), in order.
    pub join: Vec<(libc::c_int, OwnedFd)>,
    /// The cgroup we move ourselves into first (see `cgroups::Manager::self_join`).
    pub cgroups: Option<&'a super::cgroups::SelfJoin>,
    /// unshare(CLONE_NEWCGROUP) once we are in our cgroups.
    pub unshare_cgroup: bool,
    pub new_uts: bool,
    pub stdio: Option<[RawFd; 3]>,
    /// The console socket: create a pty and send its master there.
    pub console: Option<RawFd>,
    pub mode: Mode,
}

/// Entry point of the cloned child. Never returns. `cloned_into_cgroup`: the kernel already
/// placed us in the cgroup2 directory (`clone3(CLONE_INTO_CGROUP)`).
pub(crate) fn child_main(a: &Args<'_>, sync: &OwnedFd, cloned_into_cgroup: bool) -> ! {
    // The container's process starts with no signal blocked, whatever its parent blocked
    // (the monitor blocks SIGCHLD and SIGUSR1 for its signalfd), and with every signal's
    // default action: an ignored signal stays ignored across execve, and Rust's runtime ignores
    // SIGPIPE in our binaries (a container would then get EPIPE where it expects to die), as
    // may whoever started us (nohup: SIGHUP). Handlers need nothing: execve resets them.
    // The raw system call: glibc's wrapper refuses its own two real-time signals (32 and 33),
    // which a caller may still have ignored.
    // SAFETY: an empty set from sigemptyset; a kernel `struct sigaction` with SIG_DFL installs
    // no handler code.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // handler, flags, restorer, mask: the kernel's layout on x86_64 and aarch64.
        let dfl: [libc::c_ulong; 4] = [libc::SIG_DFL as libc::c_ulong, 0, 0, 0];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, sig, dfl.as_ptr(), 0usize, 8usize);
            }
        }
    }
    let code = match run(a, sync, cloned_into_cgroup) {
        Ok(()) => 0,
        Err(Fail::Report(msg)) => {
            let _ = sync::send(sync, &Msg::Error { msg });
            1
        }
        Err(Fail::Late(msg)) => {
            eprintln!("deckhand-runc init: {msg}");
            127
        }
        Err(Fail::Quiet) => 1,
    };
    // SAFETY: leaving the child without running the parent's destructors or atexit handlers.
    unsafe { libc::_exit(code) }
}

enum Fail {
    /// Reported to the parent over the sync channel.
    Report(String),
    /// After `start`: the parent is gone; to stderr.
    Late(String),
    /// The parent died: just exit.
    Quiet,
}

impl From<&str> for Fail {
    fn from(s: &str) -> Fail {
        Fail::Report(s.to_string())
    }
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::Report(s)
    }
}

fn prctl(op: libc::c_int, arg: libc::c_ulong) -> R {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(op, arg, 0, 0, 0) } < 0 {
        Err(format!("prctl({op}): {}", errno()))
    } else {
        Ok(())
    }
}

fn run(a: &Args<'_>, sync: &OwnedFd, cloned_into_cgroup: bool) -> Result<(), Fail> {
    // Parent death before `Go` shows as EOF on the sync channel (getppid() is 0 in a new pid
    // namespace, so it cannot tell).
    prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)?;
    match sync::recv(sync) {
        Ok(Some(Msg::Go)) => {}
        _ => return Err(Fail::Quiet),
    }
    // Our cgroups first, so that everything below is accounted to the container.
    if let Some(j) = a.cgroups {
        j.join_current(cloned_into_cgroup)
            .map_err(|e| format!("joining the cgroup: {e}"))?;
    }
    let mut warnings = Vec::new();
    if let Some(fds) = a.stdio {
        for (i, fd) in fds.iter().enumerate() {
            // SAFETY: dup2 onto 0..2.
            if *fd != i as RawFd && unsafe { libc::dup2(*fd, i as RawFd) } < 0 {
                return Err(format!("dup2 stdio: {}", errno()).into());
            }
        }
    }
    for (flag, fd) in &a.join {
        // SAFETY: valid namespace descriptor.
        if unsafe { libc::setns(fd.as_raw_fd(), *flag) } < 0 {
            return Err(format!("joining namespace {flag:#x}: {}", errno()).into());
        }
    }
    if a.unshare_cgroup {
        // SAFETY: plain unshare.
        if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } < 0 {
            return Err(format!("unshare cgroup namespace: {}", errno()).into());
        }
    }
    let spec = a.spec;
    let proc_fd_dir = match &a.mode {
        Mode::Init { rootfs, .. } => {
            // SAFETY: setsid has no preconditions.
            unsafe { libc::setsid() };
            // /proc/self/fd of the host, kept to reopen the fifo after pivot_root.
            let d = std::fs::File::open("/proc/self/fd")
                .map_err(|e| format!("opening /proc/self/fd: {e}"))?;
            super::mounts::setup_rootfs(spec, rootfs, a.bundle, &mut warnings)?;
            if let Some(h) = spec.hostname() {
                if !a.new_uts {
                    return Err(
                        "hostname is set but the container has no UTS namespace of its own"
                            .to_string()
                            .into(),
                    );
                }
                let c = CString::new(h.as_str()).map_err(|e| e.to_string())?;
                // SAFETY: valid buffer and length.
                if unsafe { libc::sethostname(c.as_ptr(), h.len()) } < 0 {
                    return Err(format!("sethostname: {}", errno()).into());
                }
            }
            if let Some(d) = spec.domainname() {
                let c = CString::new(d.as_str()).map_err(|e| e.to_string())?;
                // SAFETY: valid buffer and length.
                if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } < 0 {
                    return Err(format!("setdomainname: {}", errno()).into());
                }
            }
            if let Some(sysctls) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) {
                for (k, v) in sysctls {
                    let p = format!("/proc/sys/{}", k.replace('.', "/"));
                    std::fs::write(&p, v).map_err(|e| format!("sysctl {k}={v}: {e}"))?;
                }
            }
            Some(d)
        }
        Mode::Exec { .. } => None,
    };
    if let Some(console) = a.console {
        if let Mode::Exec { .. } = a.mode {
            // SAFETY: setsid has no preconditions (the init already is a session leader).
            unsafe { libc::setsid() };
        }
        super::tty::setup(console, a.process)?;
    }
    set_rlimits(a.process, &mut warnings)?;
    if let (Some(adj), Mode::Init { .. }) = (a.process.oom_score_adj(), &a.mode) {
        set_oom_score_adj(adj, &mut warnings)?;
    }
    let cwd = a.process.cwd();
    std::env::set_current_dir(cwd)
        .map_err(|e| format!("chdir to cwd {:?} set in config.json: {e}", cwd.display()))?;
    let mut env: Vec<String> = a.process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        // As runc: HOME from the container's /etc/passwd, else "/".
        env.push(format!(
            "HOME={}",
            home_of(a.process.user().uid()).unwrap_or_else(|| "/".into())
        ));
    }
    let args: Vec<String> = a.process.args().clone().unwrap_or_default();
    let arg0 = args.first().ok_or("process.args is empty")?;
    let exe = find_executable(arg0, &env)?;
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(p) => {
            let c = super::seccomp::compile(p)?;
            warnings.extend(c.warnings);
            c.programs
        }
        None => Vec::new(),
    };
    let to_c = |v: &[String]| -> R<Vec<CString>> {
        v.iter()
            .map(|s| CString::new(s.as_str()).map_err(|e| e.to_string()))
            .collect()
    };
    let (c_args, c_env) = (to_c(&args)?, to_c(&env)?);
    let c_exe = CString::new(exe).map_err(|e| e.to_string())?;
    for msg in warnings {
        let _ = sync::send(sync, &Msg::Warning { msg });
    }

    if let Mode::Init { fifo, .. } = &a.mode {
        prctl(libc::PR_SET_PDEATHSIG, 0)?;
        // Fails (EPIPE) if the parent died meanwhile: then exit quietly.
        sync::send(sync, &Msg::Created).map_err(|_| Fail::Quiet)?;
        let dir = proc_fd_dir.ok_or("no /proc/self/fd")?;
        // Blocks until `start` opens the fifo for reading.
        let name = CString::new(fifo.to_string()).map_err(|e| e.to_string())?;
        // SAFETY: valid fd and C string.
        let w = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if w < 0 {
            return Err(Fail::Late(format!("opening exec fifo: {}", errno())));
        }
        // SAFETY: w is valid, the buffer one byte.
        let n = unsafe { libc::write(w, b"0".as_ptr().cast(), 1) };
        // SAFETY: closing our own descriptors.
        unsafe {
            libc::close(w);
            libc::close(*fifo);
        }
        drop(dir);
        if n != 1 {
            return Err(Fail::Late(format!("writing exec fifo: {}", errno())));
        }
        finalize(a.process, &seccomp).map_err(Fail::Late)?;
        exec(&c_exe, &c_args, &c_env);
        Err(Fail::Late(format!("exec {:?}: {}", args[0], errno())))
    } else {
        finalize(a.process, &seccomp)?;
        if let Mode::Exec { detach: true } = a.mode {
            prctl(libc::PR_SET_PDEATHSIG, 0)?;
        }
        exec(&c_exe, &c_args, &c_env);
        Err(format!("exec {:?}: {}", args[0], errno()).into())
    }
}

fn exec(exe: &CString, args: &[CString], env: &[CString]) {
    let mut a: Vec<*const libc::c_char> = args.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = env.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: null-terminated arrays of valid C strings.
    unsafe { libc::execve(exe.as_ptr(), a.as_ptr(), e.as_ptr()) };
}

/// The home directory of `uid` in the container's /etc/passwd.
fn home_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok()? == uid).then(|| f[5].to_string())
    })
}

/// `name` looked up in the PATH of `env` (runc's message when not found).
pub(crate) fn find_executable(name: &str, env: &[String]) -> R<String> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        // As runc: the file must exist (an error here is reported by `create`, not lost
        // after `start`).
        return match std::fs::metadata(name) {
            Ok(m) if m.is_dir() => Err(format!("exec: \"{name}\": is a directory")),
            Ok(_) => Ok(name.to_string()),
            Err(e) => Err(format!("exec: \"{name}\": stat {name}: {e}")),
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = format!("{dir}/{name}");
        if std::fs::metadata(&cand)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Ok(cand);
        }
    }
    Err(format!(
        "exec: \"{name}\": executable file not found in $PATH"
    ))
}

fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// The limits to use when raising the hard limit is refused: the hard limit clamped to the
/// current one, the soft limit to that.
pub(crate) fn clamp_rlimit(soft: u64, hard: u64, cur_hard: u64) -> (u64, u64) {
    let hard = hard.min(cur_hard);
    (soft.min(hard), hard)
}

fn set_rlimits(p: &Process, warnings: &mut Vec<String>) -> R {
    for rl in p.rlimits().iter().flatten() {
        let res = rlimit_resource(rl.typ());
        let want = libc::rlimit {
            rlim_cur: rl.soft(),
            rlim_max: rl.hard(),
        };
        // SAFETY: valid struct.
        if unsafe { libc::setrlimit(res, &want) } == 0 {
            continue;
        }
        let e = errno();
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid struct.
        unsafe { libc::getrlimit(res, &mut cur) };
        if e.raw_os_error() != Some(libc::EPERM) || rl.hard() <= cur.rlim_max {
            return Err(format!("setrlimit {:?}: {e}", rl.typ()));
        }
        let (soft, hard) = clamp_rlimit(rl.soft(), rl.hard(), cur.rlim_max);
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: valid struct.
        if unsafe { libc::setrlimit(res, &lim) } < 0 {
            return Err(format!("setrlimit {:?} (clamped): {}", rl.typ(), errno()));
        }
        warnings.push(format!(
            "rlimit {:?} hard {} is above the runtime's own {} and cannot be raised: clamped to soft {soft} hard {hard}",
            rl.typ(),
            rl.hard(),
            cur.rlim_max
        ));
    }
    Ok(())
}

fn set_oom_score_adj(adj: i32, warnings: &mut Vec<String>) -> R {
    const P: &str = "/proc/self/oom_score_adj";
    match std::fs::write(P, adj.to_string()) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EPERM) =>
        {
            let cur = std::fs::read_to_string(P).unwrap_or_default();
            warnings.push(format!(
                "oom_score_adj {adj} needs CAP_SYS_RESOURCE: kept at the current {}",
                cur.trim()
            ));
            Ok(())
        }
        Err(e) => Err(format!("oom_score_adj {adj}: {e}")),
    }
}

fn cap_set(set: Option<&oci_spec::runtime::Capabilities>) -> CapsHashSet {
    set.into_iter()
        .flatten()
        .filter_map(|c| {
            let name = serde_json::to_value(c).ok()?;
            name.as_str()?.parse::<Capability>().ok()
        })
        .collect()
}

/// Capabilities, user and groups, no_new_privileges and seccomp, then umask: the last steps
/// before exec. Seccomp is loaded before dropping capabilities when no_new_privileges is off
/// (the kernel then needs CAP_SYS_ADMIN), last otherwise (as runc).
fn finalize(p: &Process, seccomp: &[seccompiler::BpfProgram]) -> R {
    let nnp = p.no_new_privileges().unwrap_or(false);
    let load = || -> R {
        for prog in seccomp {
            super::seccomp::install(prog).map_err(|e| format!("loading seccomp filter: {e}"))?;
        }
        Ok(())
    };
    if !nnp {
        load()?;
    }
    let caps = p.capabilities().as_ref();
    if let Some(c) = caps {
        let keep = cap_set(c.bounding().as_ref());
        let supported = caps::runtime::thread_all_supported();
        for cap in supported.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
        }
    }
    let user = p.user();
    prctl(libc::PR_SET_KEEPCAPS, 1)?;
    let gids: Vec<libc::gid_t> = user.additional_gids().clone().unwrap_or_default();
    // SAFETY: valid array and length; setres[gu]id with plain integers.
    unsafe {
        if libc::setgroups(gids.len(), gids.as_ptr()) < 0 {
            return Err(format!("setgroups: {}", errno()));
        }
        if libc::setresgid(user.gid(), user.gid(), user.gid()) < 0 {
            return Err(format!("setgid {}: {}", user.gid(), errno()));
        }
        if libc::setresuid(user.uid(), user.uid(), user.uid()) < 0 {
            return Err(format!("setuid {}: {}", user.uid(), errno()));
        }
    }
    prctl(libc::PR_SET_KEEPCAPS, 0)?;
    if let Some(c) = caps {
        // What the runtime itself lacks (e.g. CAP_SYS_RESOURCE on this host) cannot be granted.
        let have = caps::read(None, CapSet::Permitted)
            .map_err(|e| format!("reading capabilities: {e}"))?;
        let cap_set = |s| -> CapsHashSet { cap_set(s).intersection(&have).copied().collect() };
        let sets = [
            (CapSet::Inheritable, cap_set(c.inheritable().as_ref())),
            (CapSet::Effective, cap_set(c.effective().as_ref())),
            (CapSet::Permitted, cap_set(c.permitted().as_ref())),
        ];
        for (set, want) in sets {
            caps::set(None, set, &want)
                .map_err(|e| format!("setting {set:?} capabilities: {e}"))?;
        }
        // Ambient needs the capability in both the permitted and inheritable sets; runc
        // skips the others with a warning, so do we (silently: the caller is gone by now).
        let inh = caps::read(None, CapSet::Inheritable).unwrap_or_default();
        let amb: CapsHashSet = cap_set(c.ambient().as_ref())
            .intersection(&inh)
            .copied()
            .collect();
        caps::set(None, CapSet::Ambient, &amb)
            .map_err(|e| format!("setting ambient capabilities: {e}"))?;
    }
    if nnp {
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
        load()?;
    }
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(user.umask().unwrap_or(0o022) as libc::mode_t) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_rlimits() {
        assert_eq!(clamp_rlimit(1_048_576, 1_048_576, 20_000), (20_000, 20_000));
        assert_eq!(clamp_rlimit(1024, 1_048_576, 20_000), (1024, 20_000));
    }

    #[test]
    fn path_lookup_reports_like_runc() {
        let e = find_executable("dh-no-such-binary", &["PATH=/nonexistent".into()])
            .expect_err("missing");
        assert_eq!(
            e,
            "exec: \"dh-no-such-binary\": executable file not found in $PATH"
        );
        assert_eq!(find_executable("/bin/sh", &[]).expect("abs"), "/bin/sh");
        let e = find_executable("/dh/no/such", &[]).expect_err("missing");
        assert!(
            e.starts_with("exec: \"/dh/no/such\": stat /dh/no/such:"),
            "{e}"
        );
    }
}
