//! `deckhand-monitor`: the per-container parent. Creates and starts one container through
//! `deckhand_cri::oci`, stays its parent (child subreaper), writes its stdout and stderr to the
//! CRI log file, records its exit code and finish time, and exits after it.
//!
//! Single-threaded, no async runtime, no allocation in the steady state beyond the log line
//! buffers; `deckhand-cri` execs it (never forks itself).
//!
//! ```text
//! deckhand-monitor --root DIR --bundle DIR --id ID --log-path FILE [--exit-file FILE] [--pid-file FILE] [--report]
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
    if std::env::args().nth(1).as_deref() == Some("--hold-pidns") {
        return hold_pidns();
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
    // SIGCHLD through a signalfd, so one poll(2) covers the pipes and the child.
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
    let mut log = std::fs::OpenOptions::new()
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
    let mut out_fd = out_r;
    if let Some((path, l)) = console {
        let master = receive_master(&l).map_err(|e| format!("receiving the terminal: {e}"));
        let _ = std::fs::remove_file(&path);
        let master = master?;
        hub.tty = Some(master.as_raw_fd());
        if args.stdin {
            hub.stdin = Some(master.try_clone().map_err(|e| format!("terminal: {e}"))?);
        }
        out_fd = master;
    }
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
    trim_rss();
    let exit_file = args
        .exit_file
        .clone()
        .unwrap_or_else(|| args.root.join(&args.id).join("exit.json"));
    let code = supervise(
        created.pid,
        sfd,
        [
            out_fd.as_raw_fd(),
            if terminal { -1 } else { err_r.as_raw_fd() },
        ],
        &mut log,
        &args.log_path,
        &mut hub,
    )?;
    hub.clients.clear();
    if let Some(p) = &args.attach_socket {
        let _ = std::fs::remove_file(p);
    }
    // Read before anything destroys the cgroup (the counter lives in it).
    let oom = rt
        .cgroup(&args.id)
        .ok()
        .flatten()
        .is_some_and(|m| m.oom_killed().unwrap_or(false));
    let rec = format!(
        "{{\"exitCode\":{code},\"finishedAt\":\"{}\",\"oomKilled\":{oom},\"pid\":{}}}",
        oci::time::now(),
        created.pid
    );
    oci::state::write_atomic(&exit_file, rec.as_bytes()).map_err(|e| e.to_string())
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
    // more reads for a container that logs fast.
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let mut pfds = vec![
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
        ];
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
                // SAFETY: valid buffer.
                let r = unsafe { libc::read(fds[i], buf.as_mut_ptr().cast(), buf.len()) };
                if r > 0 {
                    progressed = true;
                    writers[i]
                        .feed(log, &buf[..r as usize], SystemTime::now())
                        .map_err(|e| format!("writing log: {e}"))?;
                    let kind = if i == 0 {
                        attach::STDOUT
                    } else {
                        attach::STDERR
                    };
                    hub.broadcast(kind, &buf[..r as usize]);
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

/// Drops the executable pages touched while creating the container from our resident set: the
/// steady state (poll, read, write) needs a small part of them and faults it back in from the
/// page cache. Only `r-xp` mappings: text is never written, so nothing private is lost (a
/// relocated read-only or writable mapping could hold private copies). The heap the creation
/// used (the parsed config.json, mounts, the seccomp program) is free by then but sits at the
/// top of the heap, below glibc's trim threshold: `malloc_trim` gives it back (~64 KiB).
fn trim_rss() {
    // SAFETY: glibc's malloc_trim only releases free memory of the allocator.
    unsafe { libc::malloc_trim(0) };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
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
