//! `deckhand-monitor`: the per-container parent. Creates and starts one container through
//! `deckhand_cri::oci`, stays its parent (child subreaper), writes its stdout and stderr to the
//! CRI log file, records its exit code and finish time, and exits after it.
//!
//! Single-threaded, no async runtime, no allocation in the steady state beyond the log line
//! buffers; `deckhand-cri` execs it (never forks itself).
//!
//! ```text
//! deckhand-monitor --root DIR --bundle DIR --id ID --log-path FILE [--exit-file FILE] [--pid-file FILE] [--report]
//!                  [--attach-socket PATH [--stdin [--stdin-once]]]
//! deckhand-monitor --hold-pidns
//! ```
//! With `--report` it prints `{"pid":N,"startedAt":"RFC3339Nano"}` (the container's init) on
//! stdout once the container has started, then closes stdout: the caller reads one line and knows the outcome (an error
//! goes to stderr, with exit status 1). SIGUSR1 reopens the log file (after the kubelet rotated
//! it). The monitor starts its own session, so a signal to its caller's process group or
//! terminal never reaches it.
//!
//! `--hold-pidns` starts the holder of a pod's shared PID namespace: a child that is pid 1 of
//! a new PID namespace and only reaps; its pid is printed on stdout and the command exits.
//! The exit file (default `<root>/<id>/exit.json`) holds
//! `{"exitCode":N,"finishedAt":"RFC3339Nano","oomKilled":BOOL,"pid":P}` (`oomKilled` from the
//! container cgroup's OOM-kill counter).
//!
//! # The supervise image
//!
//! Creating a container leaves its marks on the monitor's private memory (the heap of parsing
//! `config.json`, compiling seccomp, setting up cgroups and mounts; deep stack frames), which
//! `malloc_trim` cannot give back, and one monitor runs per container. So once the container
//! has started and the caller has been told, the monitor executes its own (sealed, see
//! `oci::sealed`) binary again in an internal mode, keeping its pid, its session, its children
//! (the container's init), its subreaper flag and its blocked, pending signals (a SIGCHLD of an
//! init that exits meanwhile is waiting for the new image; so is a SIGUSR1):
//!
//! ```text
//! deckhand-monitor --supervise --root DIR --id ID --log-path FILE --exit-file FILE --init PID
//!                  --log-fd FD (--stdout-fd FD --stderr-fd FD | --tty-fd FD)
//!                  [--attach-socket PATH --listen-fd FD] [--stdin-fd FD] [--stdin-once]
//! ```
//! The descriptors are the ones the create image opened (the log file, the container's output
//! pipes or terminal master, the attach listener, the container's stdin), the only ones it
//! hands over without `FD_CLOEXEC`; the new image checks each (open, of the right kind,
//! distinct, not stdio) and that the init is its child, then supervises and writes the exit file
//! as the create image would have. Nobody runs this mode by hand: `deckhand-cri` and scripts only
//! see it in the monitor's command line, which still names the root, the id and the log. If the
//! exec fails the create image supervises itself (a warning on stderr): the container is never
//! lost.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use deckhand_cri::oci::{self, CreateOptions, Runtime, attach, crilog::LineWriter};

struct Args {
    root: PathBuf,
    bundle: PathBuf,
    id: String,
    log_path: PathBuf,
    exit_file: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    report: bool,
    attach_socket: Option<PathBuf>,
    stdin: bool,
    stdin_once: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut report = false;
    let (mut attach_socket, mut stdin, mut stdin_once) = (None, false, false);
    let (mut root, mut bundle, mut id, mut log_path, mut exit_file, mut pid_file) = (
        PathBuf::from(oci::DEFAULT_ROOT),
        None,
        None,
        None,
        None,
        None,
    );
    while let Some(a) = it.next() {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a, None),
        };
        let mut val = || {
            v.clone()
                .or_else(|| it.next())
                .ok_or(format!("{k} needs a value"))
        };
        match k.as_str() {
            "--root" => root = val()?.into(),
            "--bundle" | "-b" => bundle = Some(PathBuf::from(val()?)),
            "--id" => id = Some(val()?),
            "--log-path" => log_path = Some(PathBuf::from(val()?)),
            "--exit-file" => exit_file = Some(PathBuf::from(val()?)),
            "--pid-file" => pid_file = Some(PathBuf::from(val()?)),
            "--report" => report = true,
            "--attach-socket" => attach_socket = Some(PathBuf::from(val()?)),
            "--stdin" => stdin = true,
            "--stdin-once" => stdin_once = true,
            "--help" | "-h" => {
                return Err("usage: deckhand-monitor --root DIR --bundle DIR --id ID --log-path FILE [--exit-file FILE] [--pid-file FILE] [--report] [--attach-socket PATH [--stdin [--stdin-once]]] | --hold-pidns".into());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        root,
        bundle: bundle.ok_or("--bundle is required")?,
        id: id.ok_or("--id is required")?,
        log_path: log_path.ok_or("--log-path is required")?,
        exit_file,
        pid_file,
        report,
        attach_socket,
        stdin,
        stdin_once,
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deckhand-monitor: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--hold-pidns`: forks the pid 1 of a new PID namespace, prints its pid, exits.
fn hold_pidns() -> Result<(), String> {
    // SAFETY: plain syscalls in a single-threaded process.
    unsafe {
        libc::setsid();
        if libc::unshare(libc::CLONE_NEWPID) < 0 {
            return Err(format!(
                "unshare(CLONE_NEWPID): {}",
                std::io::Error::last_os_error()
            ));
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // pid 1 of the namespace: release the caller's pipes, then reap forever.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
            }
            libc::chdir(c"/".as_ptr());
            loop {
                let mut st = 0;
                if libc::waitpid(-1, &mut st, 0) < 0 {
                    libc::pause();
                }
            }
        }
        println!("{pid}");
    }
    Ok(())
}

fn run() -> Result<(), String> {
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some("--hold-pidns") => return hold_pidns(),
        Some("--supervise") => return run_supervise(),
        _ => {}
    }
    let args = parse_args()?;
    // Our own session: a signal to the caller's process group must not reach us.
    // SAFETY: plain syscall.
    unsafe { libc::setsid() };
    oci::sealed::ensure_sealed().map_err(|e| format!("re-executing from a sealed copy: {e}"))?;
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SIGCHLD through a signalfd, so one poll(2) covers the pipes and the child. Blocked from
    // here on, also across the exec into the supervise image.
    let sfd = signalfd()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log_path)
        .map_err(|e| format!("opening {}: {e}", args.log_path.display()))?;
    let null = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let terminal = std::fs::read(args.bundle.join("config.json"))
        .ok()
        .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
        .and_then(|v| v["process"]["terminal"].as_bool())
        .unwrap_or(false);
    let mut hub = attach::Hub {
        stdin_once: args.stdin_once,
        ..Default::default()
    };
    if let Some(p) = &args.attach_socket {
        hub.listener = Some(
            attach::listen(p, libc::SOCK_SEQPACKET)
                .map_err(|e| format!("attach socket {}: {e}", p.display()))?,
        );
    }
    // A terminal's master comes back over a console socket of our own, next to the attach one.
    let console = match (&args.attach_socket, terminal) {
        (Some(p), true) => {
            let c = p.with_extension("con");
            let l = attach::listen(&c, libc::SOCK_STREAM)
                .map_err(|e| format!("console socket {}: {e}", c.display()))?;
            Some((c, l))
        }
        (None, true) => return Err("a terminal needs --attach-socket".into()),
        _ => None,
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let stdin_pipe = if args.stdin && !terminal {
        let (r, w) = pipe()?;
        attach::set_nonblocking(w.as_raw_fd()).map_err(|e| format!("stdin pipe: {e}"))?;
        hub.stdin = Some(w);
        Some(r)
    } else {
        None
    };
    let rt = Runtime::new(&args.root);
    let opts = CreateOptions {
        pid_file: args.pid_file.clone(),
        stdio: Some([
            stdin_pipe
                .as_ref()
                .map_or(null.as_raw_fd(), |r| r.as_raw_fd()),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
        ]),
        console_socket: console.as_ref().map(|(p, _)| p.clone()),
    };
    let created = rt
        .create(&args.id, &args.bundle, &opts)
        .map_err(|e| e.to_string())?;
    drop((out_w, err_w, null, stdin_pipe));
    // The terminal: output and input go through the master.
    let (out, err) = match console {
        Some((path, l)) => {
            let master = receive_master(&l).map_err(|e| format!("receiving the terminal: {e}"));
            let _ = std::fs::remove_file(&path);
            let master = master?;
            hub.tty = Some(master.as_raw_fd());
            if args.stdin {
                hub.stdin = Some(master.try_clone().map_err(|e| format!("terminal: {e}"))?);
            }
            (master, None)
        }
        None => (out_r, Some(err_r)),
    };
    for w in &created.warnings {
        eprintln!("deckhand-monitor: warning: {w}");
    }
    if let Err(e) = rt.start(&args.id) {
        let _ = rt.delete(&args.id, true);
        return Err(e.to_string());
    }
    let started = oci::time::now();
    if args.report {
        println!("{{\"pid\":{},\"startedAt\":\"{started}\"}}", created.pid);
        let _ = std::io::stdout().flush();
        // SAFETY: replacing our stdout with /dev/null; the caller sees EOF.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::close(null);
            }
        }
    }
    let exit_file = args
        .exit_file
        .clone()
        .unwrap_or_else(|| args.root.join(&args.id).join("exit.json"));
    let sup = Supervision {
        init: created.pid,
        root: args.root,
        id: args.id,
        log_path: args.log_path,
        log,
        exit_file,
        out,
        err,
        attach_socket: args.attach_socket,
        hub,
    };
    drop((rt, created, opts));
    // Supervise from a fresh image of this binary: what creating the container left in our
    // heap and stack is gone with the old one. Returns only if the exec failed.
    let e = sup.reexec();
    eprintln!(
        "deckhand-monitor: warning: re-executing to supervise: {e}; supervising in this image"
    );
    trim_rss();
    sup.run(sfd.as_raw_fd())
}

/// Blocks SIGCHLD and SIGUSR1 (already blocked in the supervise image: the mask survives
/// execve, as do pending signals) and returns a signalfd for them.
fn signalfd() -> Result<OwnedFd, String> {
    // SAFETY: sigset manipulation on a local set.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if sfd < 0 {
        return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(sfd) })
}

/// `--supervise`: the image the create image execs into once the container runs.
fn run_supervise() -> Result<(), String> {
    // Normally a no-op: we were executed from the sealed file. Someone running this mode from
    // a writable binary gets the same protection (the descriptors survive that exec too).
    oci::sealed::ensure_sealed().map_err(|e| format!("re-executing from a sealed copy: {e}"))?;
    let sup = Supervision::from_args(std::env::args_os().skip(2))
        .map_err(|e| format!("--supervise: {e}"))?;
    // Preserved across execve; set again should it ever not be.
    let mut reaper: libc::c_int = 0;
    // SAFETY: plain prctls; the result pointer is valid.
    unsafe {
        if libc::prctl(
            libc::PR_GET_CHILD_SUBREAPER,
            &mut reaper as *mut libc::c_int,
        ) < 0
            || reaper == 0
        {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }
    let sfd = signalfd()?;
    trim_rss();
    sup.run(sfd.as_raw_fd())
}

/// Everything supervising a started container needs: what the create image hands to the
/// supervise image (as arguments and inherited descriptors).
struct Supervision {
    /// The container's init, our child.
    init: i32,
    /// The runtime's state root and the container's id (its cgroup, for the OOM flag).
    root: PathBuf,
    id: String,
    log_path: PathBuf,
    log: File,
    exit_file: PathBuf,
    /// The container's stdout pipe, or its terminal master.
    out: OwnedFd,
    /// The container's stderr pipe; none with a terminal.
    err: Option<OwnedFd>,
    attach_socket: Option<PathBuf>,
    /// The attach listener, the container's stdin, stdin-once and the terminal.
    hub: attach::Hub,
}

impl Supervision {
    /// The descriptors handed over.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.log.as_raw_fd(), self.out.as_raw_fd()];
        fds.extend(self.err.as_ref().map(|f| f.as_raw_fd()));
        fds.extend(self.hub.listener.as_ref().map(|f| f.as_raw_fd()));
        fds.extend(self.hub.stdin.as_ref().map(|f| f.as_raw_fd()));
        fds
    }

    /// The supervise image's command line (after `argv[0]` and `--supervise`).
    fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut kv = |k: &str, v: &std::ffi::OsStr| {
            a.push(k.into());
            a.push(v.to_owned());
        };
        let fd = |f: RawFd| std::ffi::OsString::from(f.to_string());
        kv("--root", self.root.as_os_str());
        kv("--id", self.id.as_ref());
        kv("--log-path", self.log_path.as_os_str());
        kv("--exit-file", self.exit_file.as_os_str());
        kv("--init", &fd(self.init));
        kv("--log-fd", &fd(self.log.as_raw_fd()));
        match &self.err {
            Some(err) => {
                kv("--stdout-fd", &fd(self.out.as_raw_fd()));
                kv("--stderr-fd", &fd(err.as_raw_fd()));
            }
            None => kv("--tty-fd", &fd(self.out.as_raw_fd())),
        }
        if let (Some(p), Some(l)) = (&self.attach_socket, &self.hub.listener) {
            kv("--attach-socket", p.as_os_str());
            kv("--listen-fd", &fd(l.as_raw_fd()));
        }
        if let Some(s) = &self.hub.stdin {
            kv("--stdin-fd", &fd(s.as_raw_fd()));
        }
        if self.hub.stdin_once {
            a.push("--stdin-once".into());
        }
        a
    }

    /// Execs `deckhand-monitor --supervise …` with only our descriptors inheritable. Returns
    /// only on error, with the descriptors close-on-exec again.
    fn reexec(&self) -> std::io::Error {
        use std::os::unix::ffi::OsStringExt as _;
        let fds = self.fds();
        let mut args = vec![
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "deckhand-monitor".into()),
            "--supervise".into(),
        ];
        args.extend(self.to_args());
        let args: Result<Vec<_>, _> = args
            .into_iter()
            .map(|a| std::ffi::CString::new(a.into_vec()))
            .collect();
        let e = match args {
            Ok(args) => match set_cloexec(&fds, false) {
                Ok(()) => oci::sealed::reexec(&args),
                Err(e) => e,
            },
            Err(e) => std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        };
        let _ = set_cloexec(&fds, true);
        e
    }

    /// Parses and checks `--supervise`'s arguments; takes the descriptors only once everything
    /// is valid (bad input closes nothing).
    fn from_args(
        mut args: impl Iterator<Item = std::ffi::OsString>,
    ) -> Result<Supervision, String> {
        use std::ffi::OsString;
        #[derive(Default)]
        struct Raw {
            root: Option<OsString>,
            id: Option<OsString>,
            log_path: Option<OsString>,
            exit_file: Option<OsString>,
            init: Option<OsString>,
            log_fd: Option<OsString>,
            out_fd: Option<OsString>,
            err_fd: Option<OsString>,
            tty_fd: Option<OsString>,
            attach_socket: Option<OsString>,
            listen_fd: Option<OsString>,
            stdin_fd: Option<OsString>,
        }
        let mut r = Raw::default();
        let mut stdin_once = false;
        while let Some(a) = args.next() {
            let k = a.to_string_lossy().into_owned();
            let slot = match k.as_str() {
                "--stdin-once" => {
                    stdin_once = true;
                    continue;
                }
                "--root" => &mut r.root,
                "--id" => &mut r.id,
                "--log-path" => &mut r.log_path,
                "--exit-file" => &mut r.exit_file,
                "--init" => &mut r.init,
                "--log-fd" => &mut r.log_fd,
                "--stdout-fd" => &mut r.out_fd,
                "--stderr-fd" => &mut r.err_fd,
                "--tty-fd" => &mut r.tty_fd,
                "--attach-socket" => &mut r.attach_socket,
                "--listen-fd" => &mut r.listen_fd,
                "--stdin-fd" => &mut r.stdin_fd,
                _ => return Err(format!("unknown argument {k:?}")),
            };
            let v = args.next().ok_or(format!("{k} needs a value"))?;
            if slot.replace(v).is_some() {
                return Err(format!("{k} given twice"));
            }
        }
        let need = |v: Option<OsString>, k: &str| v.ok_or(format!("{k} is required"));
        let root = PathBuf::from(need(r.root, "--root")?);
        let id = need(r.id, "--id")?
            .into_string()
            .map_err(|v| format!("--id {v:?} is not UTF-8"))?;
        if id.is_empty() || id.starts_with('.') || id.contains('/') {
            return Err(format!("--id {id:?} is not a container id"));
        }
        if !root.join(&id).is_dir() {
            return Err(format!(
                "--root {} holds no container {id:?}",
                root.display()
            ));
        }
        let log_path = PathBuf::from(need(r.log_path, "--log-path")?);
        let exit_file = PathBuf::from(need(r.exit_file, "--exit-file")?);
        let init = need(r.init, "--init")?;
        let init = init
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|p| *p > 0)
            .ok_or(format!("--init {init:?} is not a pid"))?;
        let log_fd = check_fd("--log-fd", need(r.log_fd, "--log-fd")?, FdKind::Log)?;
        let (out_fd, err_fd) = match (r.out_fd, r.err_fd, r.tty_fd) {
            (Some(o), Some(e), None) => (
                check_fd("--stdout-fd", o, FdKind::Output)?,
                Some(check_fd("--stderr-fd", e, FdKind::Output)?),
            ),
            (None, None, Some(t)) => (check_fd("--tty-fd", t, FdKind::Terminal)?, None),
            _ => return Err("either --stdout-fd and --stderr-fd, or --tty-fd".into()),
        };
        let terminal = err_fd.is_none();
        let (attach_socket, listen_fd) = match (r.attach_socket, r.listen_fd) {
            (Some(p), Some(l)) => (
                Some(PathBuf::from(p)),
                Some(check_fd("--listen-fd", l, FdKind::Listener)?),
            ),
            (None, None) => (None, None),
            _ => return Err("--attach-socket and --listen-fd go together".into()),
        };
        let stdin_kind = if terminal {
            FdKind::Terminal
        } else {
            FdKind::Input
        };
        let stdin_fd = r
            .stdin_fd
            .map(|s| check_fd("--stdin-fd", s, stdin_kind))
            .transpose()?;
        let mut all = vec![log_fd, out_fd];
        all.extend(err_fd.into_iter().chain(listen_fd).chain(stdin_fd));
        for (i, fd) in all.iter().enumerate() {
            if all[..i].contains(fd) {
                return Err(format!("descriptor {fd} given twice"));
            }
        }
        // SAFETY: siginfo_t is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid siginfo buffer; WNOWAIT leaves a zombie child for the supervise loop.
        if unsafe {
            libc::waitid(
                libc::P_PID,
                init as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        } < 0
        {
            return Err(format!(
                "--init {init}: not a child of this process ({})",
                std::io::Error::last_os_error()
            ));
        }
        set_cloexec(&all, true).map_err(|e| format!("FD_CLOEXEC: {e}"))?;
        // SAFETY: checked above: open, distinct, not stdio, handed to us alone by the create
        // image; each is owned once from here on.
        let own = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
        let out = own(out_fd);
        Ok(Supervision {
            init,
            root,
            id,
            log_path,
            log: File::from(own(log_fd)),
            exit_file,
            hub: attach::Hub {
                listener: listen_fd.map(own),
                clients: Vec::new(),
                stdin: stdin_fd.map(own),
                stdin_once,
                tty: terminal.then_some(out.as_raw_fd()),
            },
            out,
            err: err_fd.map(own),
            attach_socket,
        })
    }

    /// Supervises the container until it has exited and its output is drained, then writes
    /// the exit file.
    fn run(mut self, sfd: RawFd) -> Result<(), String> {
        let code = supervise(
            self.init,
            sfd,
            [
                self.out.as_raw_fd(),
                self.err.as_ref().map_or(-1, |e| e.as_raw_fd()),
            ],
            &mut self.log,
            &self.log_path,
            &mut self.hub,
        )?;
        self.hub.clients.clear();
        if let Some(p) = &self.attach_socket {
            let _ = std::fs::remove_file(p);
        }
        // Read before anything destroys the cgroup (the counter lives in it).
        let oom = Runtime::new(&self.root)
            .cgroup(&self.id)
            .ok()
            .flatten()
            .is_some_and(|m| m.oom_killed().unwrap_or(false));
        let rec = format!(
            "{{\"exitCode\":{code},\"finishedAt\":\"{}\",\"oomKilled\":{oom},\"pid\":{}}}",
            oci::time::now(),
            self.init
        );
        oci::state::write_atomic(&self.exit_file, rec.as_bytes()).map_err(|e| e.to_string())
    }
}

/// What a descriptor handed to `--supervise` must be.
#[derive(Clone, Copy)]
enum FdKind {
    /// The CRI log: a file open for writing, or a character device (`/dev/null` when the
    /// kubelet wants no log).
    Log,
    /// The read end of a pipe (the container's stdout or stderr).
    Output,
    /// The write end of a pipe (the container's stdin).
    Input,
    /// A terminal master, open for reading and writing.
    Terminal,
    /// A listening socket.
    Listener,
}

/// Checks the descriptor `v` given as `k`: a number above stdio, open, of the right kind.
fn check_fd(k: &str, v: std::ffi::OsString, kind: FdKind) -> Result<RawFd, String> {
    let fd = v
        .to_str()
        .and_then(|s| s.parse::<RawFd>().ok())
        .ok_or(format!("{k} {v:?} is not a descriptor number"))?;
    if fd < 3 {
        return Err(format!(
            "{k} {fd}: stdin, stdout and stderr are not handed over"
        ));
    }
    // SAFETY: fcntl and fstat on any number only report.
    let (fl, st) = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let mut st: libc::stat = std::mem::zeroed();
        if fl < 0 || libc::fstat(fd, &mut st) < 0 {
            return Err(format!("{k} {fd}: not an open descriptor"));
        }
        (fl, st)
    };
    let (fmt, acc) = (st.st_mode & libc::S_IFMT, fl & libc::O_ACCMODE);
    let (ok, what) = match kind {
        FdKind::Log => (
            matches!(fmt, libc::S_IFREG | libc::S_IFCHR) && acc != libc::O_RDONLY,
            "a file open for writing",
        ),
        FdKind::Output => (
            fmt == libc::S_IFIFO && acc == libc::O_RDONLY,
            "the read end of a pipe",
        ),
        FdKind::Input => (
            fmt == libc::S_IFIFO && acc == libc::O_WRONLY,
            "the write end of a pipe",
        ),
        FdKind::Terminal => (
            fmt == libc::S_IFCHR && acc == libc::O_RDWR,
            "a terminal open for reading and writing",
        ),
        FdKind::Listener => {
            let mut on: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: a valid int buffer of the given length.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut on as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            (
                fmt == libc::S_IFSOCK && r == 0 && on != 0,
                "a listening socket",
            )
        }
    };
    if !ok {
        return Err(format!("{k} {fd}: not {what}"));
    }
    Ok(fd)
}

/// Sets or clears `FD_CLOEXEC` on each descriptor.
fn set_cloexec(fds: &[RawFd], on: bool) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: plain fcntl calls.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFD);
            let new = if on {
                fl | libc::FD_CLOEXEC
            } else {
                fl & !libc::FD_CLOEXEC
            };
            if fl < 0 || libc::fcntl(fd, libc::F_SETFD, new) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Accepts the runtime's connection on the console socket and receives the terminal master.
fn receive_master(l: &OwnedFd) -> std::io::Result<OwnedFd> {
    // The init connected and sent the master before it reported `created`: accept at once,
    // waiting a little in case it is still in flight.
    for _ in 0..500 {
        // SAFETY: plain syscall; no address wanted.
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we own.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            return oci::tty::recv_fd(conn.as_raw_fd());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Err(std::io::Error::other("the runtime never connected"))
}

/// Copies the two streams into the log until the init has exited and the pipes are drained;
/// returns the init's exit code (128 + signal when killed).
fn supervise(
    init: i32,
    sfd: RawFd,
    fds: [RawFd; 2],
    log: &mut File,
    log_path: &std::path::Path,
    hub: &mut attach::Hub,
) -> Result<i32, String> {
    let mut writers = [LineWriter::new("stdout"), LineWriter::new("stderr")];
    let mut open = [fds[0] >= 0, fds[1] >= 0];
    // Attach clients' frames: allocated when the first client writes (most containers never
    // see one), so an idle monitor does not keep 32 KiB resident for it.
    let mut cbuf: Vec<u8> = Vec::new();
    let mut code = None;
    // The container's output is read in 8 KiB pieces (a log line longer than that is joined
    // by the LineWriter): a smaller resident buffer than one read per 32 KiB, at the cost of
    // more reads for a container that logs fast. Allocated (not zeroed) at the first output,
    // as `cbuf`: a container that never writes costs no page for it.
    let mut buf: Vec<u8> = Vec::new();
    let mut pfds = Vec::new();
    loop {
        pfds.clear();
        pfds.extend([
            libc::pollfd {
                fd: if open[0] { fds[0] } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if open[1] { fds[1] } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: hub.listener.as_ref().map_or(-1, |l| l.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ]);
        for c in &hub.clients {
            pfds.push(libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Once the init is gone, only drain what is already there.
        let timeout = if code.is_some() { 0 } else { -1 };
        // SAFETY: valid array.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        let mut progressed = false;
        for i in 0..2 {
            if open[i] && pfds[i].revents != 0 {
                buf.clear();
                buf.reserve_exact(8 * 1024);
                // SAFETY: reads into the buffer's capacity.
                let r = unsafe { libc::read(fds[i], buf.as_mut_ptr().cast(), buf.capacity()) };
                if r > 0 {
                    // SAFETY: the kernel initialised the first r bytes (r <= capacity).
                    unsafe { buf.set_len(r as usize) };
                    progressed = true;
                    writers[i]
                        .feed(log, &buf, SystemTime::now())
                        .map_err(|e| format!("writing log: {e}"))?;
                    let kind = if i == 0 {
                        attach::STDOUT
                    } else {
                        attach::STDERR
                    };
                    hub.broadcast(kind, &buf);
                } else if r == 0
                    // A terminal master reads EIO once the last slave is closed.
                    || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                {
                    open[i] = false;
                    writers[i]
                        .finish(log, SystemTime::now())
                        .map_err(|e| format!("writing log: {e}"))?;
                }
            }
        }
        if pfds[3].revents != 0 {
            hub.accept();
        }
        let mut gone = Vec::new();
        for (k, p) in pfds[4..].iter().enumerate() {
            if p.revents != 0 && cbuf.is_empty() {
                cbuf.resize(attach::MAX_FRAME, 0);
            }
            if p.revents != 0 && !hub.client_input(k, &mut cbuf) {
                gone.push(k);
            }
        }
        for k in gone.into_iter().rev() {
            hub.clients.remove(k);
        }
        if pfds[2].revents != 0 {
            let mut si = [0u8; 128];
            let mut reopen = false;
            // SAFETY: draining the signalfd into a buffer of the size of one siginfo.
            while unsafe { libc::read(sfd, si.as_mut_ptr().cast(), si.len()) } > 0 {
                let signo = u32::from_ne_bytes([si[0], si[1], si[2], si[3]]);
                reopen |= signo == libc::SIGUSR1 as u32;
            }
            if reopen {
                // The kubelet renamed the file away: continue in a new one at the same path.
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log_path)
                {
                    Ok(f) => *log = f,
                    Err(e) => eprintln!("deckhand-monitor: reopening {}: {e}", log_path.display()),
                }
            }
        }
        // Reap every child (we are a subreaper); remember the init's status.
        loop {
            let mut status = 0;
            // SAFETY: plain waitpid.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == init {
                code = Some(if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    libc::WEXITSTATUS(status)
                });
            }
        }
        if let Some(c) = code
            && ((!open[0] && !open[1]) || !progressed)
        {
            {
                for (i, w) in writers.iter_mut().enumerate() {
                    if open[i] {
                        w.finish(log, SystemTime::now())
                            .map_err(|e| format!("writing log: {e}"))?;
                    }
                }
                log.flush().map_err(|e| format!("writing log: {e}"))?;
                return Ok(c);
            }
        }
    }
}

/// Drops the executable pages touched so far (creating the container, or starting the
/// supervise image) from our resident set: the steady state (poll, read, write) needs a small
/// part of them and faults it back in from the page cache. Only `r-xp` mappings: text is never
/// written, so nothing private is lost (a relocated read-only or writable mapping could hold
/// private copies). Then `malloc_trim` gives back the free heap at the top, below glibc's trim
/// threshold (in the create image what creating used, ~64 KiB, when the exec failed; in both,
/// the copy of the maps).
fn trim_rss() {
    drop_text();
    // Last: also gives back what reading the maps took.
    // SAFETY: glibc's malloc_trim only releases free memory of the allocator.
    unsafe { libc::malloc_trim(0) };
}

fn drop_text() {
    use std::io::Read as _;
    // One allocation big enough for our maps (~40 lines), not a chain of growing ones: freed,
    // it goes back to the top of the heap, which `malloc_trim` then returns.
    let mut maps = Vec::with_capacity(16 * 1024);
    if File::open("/proc/self/maps")
        .and_then(|mut f| f.read_to_end(&mut maps))
        .is_err()
    {
        return;
    }
    let maps = String::from_utf8_lossy(&maps);
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        // Only file-backed text (the path field is present), never [vdso] and friends.
        let path = f.nth(3).unwrap_or("");
        if perms != "r-xp" || !path.starts_with('/') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        // SAFETY: a text mapping of ours, advised away; its pages fault back in from the file.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }
}
