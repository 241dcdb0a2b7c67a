//! `deckhand-runc` and `deckhand-monitor` with real namespaces (run as root): what a process
//! sees inside, the same bundles under Debian's runc, bad input, kill -9 during create, the
//! monitor's CRI log and containerd's runc shim driving deckhand-runc.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use deckhand_tests::testbed::{Testbed, unique_name};
use serde_json::{Value, json};

const RUNC: &str = env!("CARGO_BIN_EXE_deckhand-runc");
const MONITOR: &str = env!("CARGO_BIN_EXE_deckhand-monitor");
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "hostname", "tty", "stty", "ls", "mkdir", "touch", "true", "false",
    "grep", "mount", "ip", "env", "pwd", "sleep", "sort", "awk", "readlink", "printf", "head",
    "wc", "seq", "tr",
];

/// A bundle in a `dh-…` temp dir: busybox rootfs and `runc spec`'s config with our changes.
struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    fn new(args: &[&str], edit: impl FnOnce(&mut Value)) -> Bundle {
        let dir = std::env::temp_dir().join(unique_name("bundle"));
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "home/dh"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("mkdir rootfs");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            symlink("busybox", rootfs.join("bin").join(a)).expect("applet");
        }
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\ndh:x:1000:1000::/home/dh:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\ndh:x:1000:\n").expect("group");
        let out = Command::new("runc")
            .arg("spec")
            .current_dir(&dir)
            .output()
            .expect("runc spec");
        assert!(
            out.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("read"))
                .expect("json");
        cfg["process"]["terminal"] = json!(false);
        cfg["process"]["args"] = json!(args);
        edit(&mut cfg);
        let b = Bundle { dir };
        b.write_config(&cfg);
        b
    }

    fn write_config(&self, cfg: &Value) {
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_vec_pretty(cfg).expect("ser"),
        )
        .expect("write config");
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A state root; every container left in it is force-deleted on drop.
struct Root {
    dir: PathBuf,
    bin: &'static str,
}

impl Root {
    fn new() -> Root {
        Root::with(RUNC)
    }

    fn with(bin: &'static str) -> Root {
        Root {
            dir: std::env::temp_dir().join(unique_name("root")),
            bin,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin);
        c.arg("--root").arg(&self.dir).args(args);
        c
    }

    fn out(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn runtime")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.out(args);
        assert!(
            o.status.success(),
            "{} {args:?}: {}",
            self.bin,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn run(&self, b: &Bundle) -> Output {
        let id = unique_name("ctr");
        self.out(&["run", "--bundle", b.dir.to_str().expect("utf8"), &id])
    }

    fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state json")
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let _ = self.out(&["delete", "--force", &e.file_name().to_string_lossy()]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({:?}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a container sees, under deckhand-runc and under Debian's runc.
fn both(b: &Bundle) -> (String, String) {
    let (ours, theirs) = (Root::new(), Root::with("runc"));
    (stdout(&ours.run(b)), stdout(&theirs.run(b)))
}

const PROBE: &str = "echo pid=$$; hostname; id; pwd; env | sort; ulimit -n; ulimit -Hn; \
    grep -E '^(Cap|NoNewPrivs|Seccomp|SigBlk|SigIgn)' /proc/self/status; cat /proc/self/oom_score_adj; \
    mount; ls -ln /dev | awk '{print $1, $3, $4, $5, $6, $NF}'; umask";

#[test]
fn container_sees_its_spec_like_under_runc() {
    let b = Bundle::new(&["sh", "-c", PROBE], |c| {
        c["hostname"] = json!("dh-host");
        c["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
        c["process"]["cwd"] = json!("/home/dh");
        c["process"]["user"] =
            json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 63});
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
        c["process"]["oomScoreAdj"] = json!(100);
        c["process"]["capabilities"]["bounding"] = json!(["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW"]);
        c["process"]["capabilities"]["effective"] = json!(["CAP_KILL"]);
        c["process"]["capabilities"]["permitted"] = json!(["CAP_KILL", "CAP_CHOWN"]);
        c["process"]["capabilities"]["inheritable"] = json!(["CAP_KILL"]);
        c["process"]["capabilities"]["ambient"] = json!(["CAP_KILL"]);
    });
    let (ours, theirs) = both(&b);
    // Which signals runc's container inherits ignored depends on its caller (Go resets only
    // those it handles itself); ours starts with none, checked below.
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("SigIgn:"))
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&ours), strip(&theirs), "deckhand-runc vs runc");
    for want in [
        "pid=1",
        "dh-host",
        "uid=1000(dh) gid=1000(dh) groups=10,20",
        "HOME=/home/dh",
        "/home/dh",
        "FOO=bar baz",
        "\n256\n512\n",
        "CapEff:\t0000000000000020",
        "CapPrm:\t0000000000000020",
        "CapBnd:\t0000000000002021",
        "CapAmb:\t0000000000000020",
        "NoNewPrivs:\t1",
        // No signal ignored or blocked, though Rust's runtime ignores SIGPIPE in ours, and
        // whatever the test's caller ignores.
        "SigBlk:\t0000000000000000",
        "SigIgn:\t0000000000000000",
        "\n100\n",
        "proc on /proc type proc",
        "tmpfs on /proc/acpi type tmpfs (ro",
        "crw-rw-rw- 0 0 1, 3 null",
        "0077",
    ] {
        assert!(ours.contains(want), "missing {want:?} in:\n{ours}");
    }
}

fn seccomp_bundle(profile: Value) -> Bundle {
    Bundle::new(
        &[
            "sh",
            "-c",
            "grep -E '^Seccomp:' /proc/self/status; mkdir /tmp/dh-x; echo mkdir=$?; touch /tmp/f && echo touch-ok",
        ],
        |c| {
            c["linux"]["seccomp"] = profile;
            c["root"]["readonly"] = json!(false);
        },
    )
}

#[test]
fn seccomp_denies_with_eperm_like_runc() {
    let deny = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
    let b = seccomp_bundle(deny);
    let (ours, theirs) = both(&b);
    assert_eq!(ours, theirs);
    assert!(
        ours.contains("Seccomp:\t2") && ours.contains("mkdir=1") && ours.contains("touch-ok"),
        "{ours}"
    );

    // An allowlist with an errno default, the shape of RuntimeDefault: everything but mkdir*.
    let names: Vec<&str> = deckhand_cri::oci::seccomp::syscall_names()
        .filter(|n| !n.starts_with("mkdir"))
        .collect();
    let allow = json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"},
                     {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}]});
    let b = seccomp_bundle(allow);
    let out = stdout(&Root::new().run(&b));
    assert!(
        out.contains("Seccomp:\t2") && out.contains("mkdir=1") && out.contains("touch-ok"),
        "{out}"
    );
}

#[test]
fn readonly_root_and_masked_paths() {
    let b = Bundle::new(
        &[
            "sh",
            "-c",
            "touch /dh-file 2>/dev/null; echo root-write=$?; cat /proc/keys | wc -c; ls /sys/firmware | wc -l; \
           echo 1 > /proc/sys/kernel/dh 2>/dev/null; echo sys-write=$?; touch /tmp/ok; echo tmp-write=$?",
        ],
        |c| {
            c["root"]["readonly"] = json!(true);
            c["mounts"].as_array_mut().expect("mounts").push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}));
        },
    );
    let (ours, theirs) = both(&b);
    assert_eq!(ours, theirs);
    assert_eq!(ours, "root-write=1\n0\n0\nsys-write=1\ntmp-write=0\n");
}

#[test]
fn rlimits_and_oom_score_adj_are_clamped_not_fatal() {
    let b = Bundle::new(
        &["sh", "-c", "ulimit -Hn; cat /proc/self/oom_score_adj"],
        |c| {
            c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 1_073_741_816u64, "soft": 1_073_741_816u64}]);
            c["process"]["oomScoreAdj"] = json!(-999);
        },
    );
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    let root = Root::new();
    let o = root.run(&b);
    let out = stdout(&o);
    let own_adj = std::fs::read_to_string("/proc/self/oom_score_adj").expect("adj");
    if cur.rlim_max < 1_073_741_816 {
        assert!(out.starts_with(&format!("{}\n", cur.rlim_max)), "{out}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("clamped"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(out.ends_with(&own_adj) || out.ends_with("-999\n"), "{out}");
}

/// A named network namespace with a veth pair, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> NetNs {
        let name = unique_name("ns");
        let ip = |a: &[&str]| {
            assert!(
                Command::new("ip").args(a).status().expect("ip").success(),
                "ip {a:?}"
            )
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs(name);
        ip(&[
            "-n", &ns.0, "link", "add", "dh0", "type", "veth", "peer", "name", "dh1",
        ]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn containers_share_a_network_namespace_by_path() {
    let ns = NetNs::new();
    let path = format!("/var/run/netns/{}", ns.0);
    let mk = || {
        Bundle::new(
            &[
                "sh",
                "-c",
                "ip -o link | awk '{print $2}'; readlink /proc/self/ns/net",
            ],
            |c| {
                for n in c["linux"]["namespaces"].as_array_mut().expect("namespaces") {
                    if n["type"] == "network" {
                        n["path"] = json!(path);
                    }
                }
            },
        )
    };
    let (a, b) = (mk(), mk());
    let root = Root::new();
    let (oa, ob) = (stdout(&root.run(&a)), stdout(&root.run(&b)));
    assert_eq!(oa, ob);
    assert!(oa.contains("dh0"), "{oa}");
    let host = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    assert!(!oa.contains(&*host.to_string_lossy()));
}

/// Nothing of a failed create: no state dir, no mount below the bundle, no process inside it.
fn assert_nothing_left(root: &Root, b: &Bundle, id: &str) {
    assert!(!root.dir.join(id).exists(), "state dir left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*b.dir.to_string_lossy()),
        "mount left behind"
    );
    // Every hierarchy; the bundle's cgroup is the default `/<id>` (or one under `deckhand/`).
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .expect("/sys/fs/cgroup")
        .flatten()
    {
        for d in [h.path().join(id), h.path().join("deckhand").join(id)] {
            assert!(!d.exists(), "cgroup {} left behind", d.display());
        }
    }
    let rootfs = b.rootfs();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(r) = std::fs::read_link(e.path().join("root")) {
            assert!(
                !r.starts_with(&rootfs),
                "process {:?} left in the container",
                e.file_name()
            );
        }
    }
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let root = Root::new();
    let create =
        |b: &Bundle, id: &str| root.out(&["create", "--bundle", b.dir.to_str().expect("utf8"), id]);

    let b = Bundle::new(&["true"], |_| {});
    std::fs::write(b.dir.join("config.json"), b"{\"ociVersion\": 7").expect("write");
    let id = unique_name("bad");
    let o = create(&b, &id);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("invalid"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_nothing_left(&root, &b, &id);

    let b = Bundle::new(&["true"], |c| c["root"]["path"] = json!("no-such-rootfs"));
    let o = create(&b, &id);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no-such-rootfs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_nothing_left(&root, &b, &id);

    let target = unique_name("escape");
    let b = Bundle::new(&["true"], |c| {
        c["mounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"destination": "/etc/evil/x", "type": "tmpfs", "source": "tmpfs"}));
    });
    symlink(
        format!("../../../../../../../../tmp/{target}"),
        b.rootfs().join("etc/evil"),
    )
    .expect("symlink");
    let o = create(&b, &id);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("escapes the root"),
        "{err}"
    );
    assert!(
        !Path::new("/tmp").join(&target).exists(),
        "created outside the rootfs"
    );
    assert_nothing_left(&root, &b, &id);

    let b = Bundle::new(&["dh-no-such-binary"], |_| {});
    let o = create(&b, &id);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("executable file not found in $PATH"), "{err}");
    assert_nothing_left(&root, &b, &id);

    // Errors also go to --log as JSON lines, as containerd's shim reads them.
    let log = root.dir.with_extension("log");
    let o = root.out(&[
        "--log",
        log.to_str().expect("utf8"),
        "--log-format",
        "json",
        "start",
        "dh-nonexistent",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .expect("log")
            .lines()
            .last()
            .expect("line"),
    )
    .expect("json");
    let _ = std::fs::remove_file(&log);
    assert_eq!(line["level"], "error");
    assert!(
        line["msg"]
            .as_str()
            .expect("msg")
            .contains("does not exist")
            && line["time"].is_string()
    );
}

#[test]
fn lifecycle_create_start_exec_kill_delete() {
    let b = Bundle::new(&["sleep", "1000"], |c| c["hostname"] = json!("dh-life"));
    let root = Root::new();
    let id = unique_name("life");
    let pidfile = root.dir.with_extension("pid");
    // The init inherits stdout and stderr: a captured pipe would stay open, so no capture here.
    let st = root
        .cmd(&[
            "create",
            "--bundle",
            b.dir.to_str().expect("utf8"),
            "--pid-file",
            pidfile.to_str().expect("utf8"),
            &id,
        ])
        .stdout(Stdio::null())
        .status()
        .expect("create");
    assert!(st.success());
    let st = root.state(&id);
    assert_eq!(st["status"], "created");
    let pid: i64 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .parse()
        .expect("pid");
    let _ = std::fs::remove_file(&pidfile);
    assert_eq!(st["pid"], pid);
    assert_eq!(st["bundle"], b.dir.to_str().expect("utf8"));
    // CVE-2019-5736: the waiting init is the runtime binary; its /proc/<pid>/exe must be a
    // read-only mount (or a sealed memfd), never the writable host file.
    let exe = std::fs::File::open(format!("/proc/{pid}/exe")).expect("open init exe");
    // SAFETY: st is plain old data filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and buffer.
    assert_eq!(
        unsafe { libc::fstatvfs(std::os::fd::AsRawFd::as_raw_fd(&exe), &mut st) },
        0
    );
    // SAFETY: fcntl on a valid fd.
    let sealed =
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&exe), libc::F_GET_SEALS) } > 0;
    assert!(
        st.f_flag & libc::ST_RDONLY != 0 || sealed,
        "the init runs from a writable binary"
    );
    drop(exe);
    root.ok(&["start", &id]);
    assert_eq!(root.state(&id)["status"], "running");

    let out = root.ok(&[
        "exec",
        &id,
        "sh",
        "-c",
        "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; echo $$",
    ]);
    assert_eq!(
        out.lines().take(2).collect::<Vec<_>>(),
        vec!["dh-life", "sleep 1000 "]
    );
    let proc_file = root.dir.with_extension("process.json");
    let process = json!({"args": ["sh", "-c", "exit 3"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
    std::fs::write(&proc_file, process.to_string()).expect("process.json");
    let o = root.out(&["exec", "--process", proc_file.to_str().expect("utf8"), &id]);
    let _ = std::fs::remove_file(&proc_file);
    assert_eq!(o.status.code(), Some(3));
    let o = root.out(&["exec", &id, "dh-no-such-binary"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("executable file not found"));

    let pids: Vec<i64> =
        serde_json::from_str(&root.ok(&["ps", "--format", "json", &id])).expect("ps json");
    assert_eq!(pids, vec![pid]);
    let o = root.out(&["delete", &id]);
    assert!(
        !o.status.success(),
        "delete of a running container needs --force"
    );
    root.ok(&["kill", &id, "KILL"]);
    for _ in 0..500 {
        if root.state(&id)["status"] == "stopped" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(root.state(&id)["status"], "stopped");
    root.ok(&["delete", &id]);
    assert!(!root.dir.join(&id).exists());
    assert!(!root.out(&["state", &id]).status.success());
}

#[test]
fn kill_9_of_the_create_caller_leaves_nothing_delete_cannot_remove() {
    let b = Bundle::new(&["sleep", "1000"], |_| {});
    let root = Root::new();
    for i in 0..12u64 {
        let id = unique_name("k9");
        let mut child = root
            .cmd(&["create", "--bundle", b.dir.to_str().expect("utf8"), &id])
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_micros(i * 700));
        let _ = child.kill();
        let _ = child.wait();
        let o = root.out(&["delete", "--force", &id]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("does not exist"),
            "delete after kill -9 ({i}): {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_nothing_left(&root, &b, &id);
    }
}

#[test]
fn monitor_writes_the_cri_log_and_the_exit_code() {
    let b = Bundle::new(
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; printf tail; exit 7",
        ],
        |_| {},
    );
    let root = Root::new();
    let id = unique_name("mon");
    let log = root.dir.with_extension("ctr.log");
    let exit = root.dir.with_extension("exit.json");
    let (text, ex) = run_monitor(&root, &b, &id, &log, &exit);
    let recs: Vec<(&str, &str, &str)> = text
        .lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let ts = p.next().expect("ts");
            assert!(ts.len() == 30 && ts.ends_with('Z'), "timestamp {ts}");
            (
                p.next().expect("stream"),
                p.next().expect("tag"),
                p.next().unwrap_or(""),
            )
        })
        .collect();
    let stdout: Vec<_> = recs.iter().filter(|r| r.0 == "stdout").collect();
    assert_eq!(stdout[0], &("stdout", "F", "out1"));
    assert_eq!((stdout[1].1, stdout[1].2.len()), ("P", 16 * 1024));
    assert_eq!((stdout[2].1, stdout[2].2.len()), ("F", 20000 - 16 * 1024));
    assert_eq!(stdout[3], &("stdout", "P", "tail"));
    assert!(recs.contains(&("stderr", "F", "err1")));
    assert_eq!(ex["exitCode"], 7);
    assert!(
        ex["finishedAt"]
            .as_str()
            .expect("finishedAt")
            .ends_with('Z')
    );
    assert_eq!(root.state(&id)["status"], "stopped");
}

#[test]
fn containerd_runs_execs_stops_and_deletes_through_deckhand_runc() {
    let tb = Testbed::get();
    let sock = tb.containerd_socket();
    let b = Bundle::new(&["true"], |_| {});
    let id = unique_name("ctrd");
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    };
    struct Cleanup<'a>(&'a dyn Fn(&[&str]) -> Output, String);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            (self.0)(&["task", "kill", "-s", "SIGKILL", &self.1]);
            std::thread::sleep(Duration::from_millis(200));
            (self.0)(&["task", "delete", "--force", &self.1]);
            (self.0)(&["container", "delete", &self.1]);
        }
    }
    let _c = Cleanup(&ctr, id.clone());
    let rootfs = b.rootfs();
    let o = ctr(&[
        "run",
        "-d",
        "--runc-binary",
        RUNC,
        "--rootfs",
        rootfs.to_str().expect("utf8"),
        &id,
        "/bin/sleep",
        "1000",
    ]);
    assert!(
        o.status.success(),
        "ctr run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "dhx",
        &id,
        "/bin/sh",
        "-c",
        "echo exec-$$; cat /proc/1/cmdline",
    ]);
    assert!(
        o.status.success(),
        "ctr exec: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("exec-"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let ls = String::from_utf8_lossy(&ctr(&["task", "ls"]).stdout).into_owned();
    assert!(
        ls.lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING")),
        "{ls}"
    );
    assert!(
        ctr(&["task", "kill", "-s", "SIGKILL", &id])
            .status
            .success()
    );
    let mut stopped = false;
    for _ in 0..100 {
        let ls = String::from_utf8_lossy(&ctr(&["task", "ls"]).stdout).into_owned();
        if ls
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED"))
        {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stopped, "task did not stop");
    let o = ctr(&["task", "delete", &id]);
    assert!(
        o.status.success(),
        "ctr task delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ctr(&["container", "delete", &id]);
    assert!(
        o.status.success(),
        "ctr container delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn monitor_reports_an_oom_kill_under_a_memory_limit() {
    let b = Bundle::new(
        &[
            "sh",
            "-c",
            "echo start; x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
        ],
        |c| {
            c["linux"]["resources"]["memory"] = json!({"limit": 33_554_432, "swap": 33_554_432});
        },
    );
    let root = Root::new();
    let id = unique_name("oom");
    let log = root.dir.with_extension("oom.log");
    let exit = root.dir.with_extension("oom.json");
    let (text, ex) = run_monitor(&root, &b, &id, &log, &exit);
    assert!(
        text.contains("stdout F start") && !text.contains("survived"),
        "{text}"
    );
    assert_eq!(ex["oomKilled"], true, "{ex}");
    assert_eq!(ex["exitCode"], 137, "{ex}");
}

/// Starts `deckhand-monitor --report` for `b` in `root`; returns it (stdout piped) with the
/// init's pid from its report, the log path and the exit file.
fn start_monitor(
    root: &Root,
    b: &Bundle,
    id: &str,
) -> (std::process::Child, i64, PathBuf, PathBuf) {
    use std::io::BufRead as _;
    let log = root.dir.with_extension(format!("{id}.log"));
    let exit = root.dir.with_extension(format!("{id}.json"));
    let mut child = monitor_command(root, b, id, &log, &exit)
        .arg("--report")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("monitor");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("report");
    let report: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
    let pid = report["pid"].as_i64().unwrap_or(0);
    (child, pid, log, exit)
}

/// The monitor's command line for container `id` of bundle `b`, logging to `log`.
fn monitor_command(root: &Root, b: &Bundle, id: &str, log: &Path, exit: &Path) -> Command {
    let mut c = Command::new(MONITOR);
    c.args([
        "--root",
        root.dir.to_str().expect("utf8"),
        "--bundle",
        b.dir.to_str().expect("utf8"),
        "--id",
        id,
    ])
    .args([
        "--log-path",
        log.to_str().expect("utf8"),
        "--exit-file",
        exit.to_str().expect("utf8"),
    ]);
    c
}

/// Runs a monitor until its container has ended; returns the log and the exit file (both
/// removed).
fn run_monitor(root: &Root, b: &Bundle, id: &str, log: &Path, exit: &Path) -> (String, Value) {
    let child = monitor_command(root, b, id, log, exit)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("monitor");
    finish_monitor(child, log, exit)
}

/// Waits for a monitor and returns its exit file (removing it and the log).
fn finish_monitor(child: std::process::Child, log: &Path, exit: &Path) -> (String, Value) {
    let o = child.wait_with_output().expect("wait monitor");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let ex: Value = serde_json::from_slice(&std::fs::read(exit).expect("exit file")).expect("json");
    let _ = (std::fs::remove_file(log), std::fs::remove_file(exit));
    (text, ex)
}

/// Once the container has started, the monitor re-executes itself into its supervise image:
/// same pid and still the init's parent, a command line naming the root, the id and the log,
/// nothing of the create phase left open; it still copies output into the log, reopens it on
/// SIGUSR1 and writes the exit record.
#[test]
fn monitor_supervises_from_a_fresh_image() {
    let b = Bundle::new(
        &[
            "sh",
            "-c",
            "echo one; while [ ! -e /tmp/dh-go ]; do sleep 0.05; done; echo two >&2; exit 5",
        ],
        |_| {},
    );
    let root = Root::new();
    let id = unique_name("sup");
    let (child, init, log, exit) = start_monitor(&root, &b, &id);
    assert!(init > 0, "no report from the monitor");
    let mpid = child.id();
    let mut cmdline = String::new();
    for _ in 0..200 {
        cmdline = std::fs::read(format!("/proc/{mpid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(" --supervise ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cmdline.contains(" --supervise "), "{cmdline}");
    for want in [
        format!("--root {}", root.dir.display()),
        format!("--id {id}"),
        format!("--log-path {}", log.display()),
        format!("--init {init}"),
    ] {
        assert!(cmdline.contains(&want), "{want:?} not in {cmdline}");
    }
    let stat = std::fs::read_to_string(format!("/proc/{init}/stat")).expect("init stat");
    let ppid = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .nth(1)
        .expect("ppid");
    assert_eq!(
        ppid,
        mpid.to_string(),
        "the init is still the monitor's child"
    );
    // Only what supervising needs is open: nothing leads into the bundle or the state dir
    // (exec.fifo, config.json), no sealed copy of the binary, no console socket.
    for e in std::fs::read_dir(format!("/proc/{mpid}/fd"))
        .expect("fds")
        .flatten()
    {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(
            !t.starts_with(&format!("{}/", b.dir.display()))
                && !t.starts_with(&format!("{}/", root.dir.display()))
                && !t.contains("memfd:")
                && !t.starts_with("socket:"),
            "fd {:?} -> {t} survived the exec",
            e.file_name()
        );
    }
    // ReopenContainerLog after the exec: the kubelet renames the log, signals, expects a new one.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    // SAFETY: signalling the monitor this test started.
    assert_eq!(unsafe { libc::kill(mpid as i32, libc::SIGUSR1) }, 0);
    for _ in 0..200 {
        if log.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(log.exists(), "the log was not reopened after SIGUSR1");
    std::fs::write(b.rootfs().join("tmp/dh-go"), b"").expect("go");
    let (text, ex) = finish_monitor(child, &log, &exit);
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    let _ = std::fs::remove_file(&rotated);
    assert!(old.contains(" stdout F one\n"), "{old}");
    assert!(text.contains(" stderr F two\n"), "{text}");
    assert_eq!(ex["exitCode"], 5, "{ex}");
    assert_eq!(ex["pid"], init, "{ex}");
    assert_eq!(ex["oomKilled"], false, "{ex}");
}

/// A container that exits at once, while its monitor is still re-executing itself: its
/// SIGCHLD waits for the new image, which reaps it and records its exit code and output.
#[test]
fn monitor_records_a_container_that_exits_at_once() {
    let b = Bundle::new(&["sh", "-c", "echo bye; exit 42"], |_| {});
    let t = Bundle::new(&["true"], |_| {});
    let root = Root::new();
    for i in 0..5 {
        let id = unique_name("quick");
        let (child, init, log, exit) = start_monitor(&root, &b, &id);
        assert!(init > 0, "attempt {i}: no report");
        let (text, ex) = finish_monitor(child, &log, &exit);
        assert_eq!(ex["exitCode"], 42, "attempt {i}: {ex}");
        assert!(text.contains(" stdout F bye\n"), "attempt {i}: {text}");
        let id = unique_name("true");
        let (child, init, log, exit) = start_monitor(&root, &t, &id);
        assert!(init > 0, "attempt {i}: no report");
        let (_, ex) = finish_monitor(child, &log, &exit);
        assert_eq!(ex["exitCode"], 0, "attempt {i}: {ex}");
        assert_eq!(ex["pid"], init, "attempt {i}: {ex}");
    }
}

/// The internal `--supervise` mode checks what it is given and says what is wrong.
#[test]
fn monitor_supervise_mode_refuses_bad_input() {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let root = Root::new();
    std::fs::create_dir_all(root.dir.join("dhsup")).expect("state dir");
    let log = root.dir.with_extension("sup.log");
    let lf = std::fs::File::create(&log).expect("log");
    let (r, w) = std::io::pipe().expect("pipe");
    // In the monitor: 20 and 23 the pipe's read end, 21 its write end, 22 a file.
    let fds = [
        (r.as_raw_fd(), 20),
        (w.as_raw_fd(), 21),
        (lf.as_raw_fd(), 22),
        (r.as_raw_fd(), 23),
    ];
    let dir = root.dir.to_str().expect("utf8");
    let run = |id: &str, extra: &[&str]| {
        let mut c = Command::new(MONITOR);
        c.args(["--supervise", "--root", dir, "--id", id])
            .args(["--log-path", "/dev/null", "--exit-file", "/dev/null"])
            .args(extra)
            .stdin(Stdio::null());
        // SAFETY: only dup2 between fork and exec (it leaves the copies inheritable).
        unsafe {
            c.pre_exec(move || {
                for (from, to) in fds {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let o = c.output().expect("monitor");
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // (id, arguments, what the error says); `OK` the valid descriptors.
    const OK: &str = "--log-fd 22 --stdout-fd 20 --stderr-fd 23";
    let cases = [
        (
            "dhsup",
            "--bogus 1".to_string(),
            "unknown argument \"--bogus\"",
        ),
        ("dhsup", "--init".into(), "--init needs a value"),
        ("dhsup", "--id dhsup".into(), "--id given twice"),
        ("dh/sup", "".into(), "--id \"dh/sup\" is not a container id"),
        ("dhnone", "".into(), "holds no container \"dhnone\""),
        ("dhsup", OK.into(), "--init is required"),
        ("dhsup", "--init x".into(), "--init \"x\" is not a pid"),
        (
            "dhsup",
            "--init 1 --log-fd 2".into(),
            "--log-fd 2: stdin, stdout and stderr",
        ),
        (
            "dhsup",
            "--init 1 --log-fd 20".into(),
            "--log-fd 20: not a file open for writing",
        ),
        (
            "dhsup",
            "--init 1 --log-fd 22 --stdout-fd 20".into(),
            "either --stdout-fd",
        ),
        (
            "dhsup",
            "--init 1 --log-fd 22 --stdout-fd 20 --stderr-fd 77".into(),
            "--stderr-fd 77: not an open descriptor",
        ),
        (
            "dhsup",
            "--init 1 --log-fd 22 --stdout-fd 21 --stderr-fd 20".into(),
            "--stdout-fd 21: not the read end of a pipe",
        ),
        (
            "dhsup",
            "--init 1 --log-fd 22 --tty-fd 20".into(),
            "--tty-fd 20: not a terminal",
        ),
        (
            "dhsup",
            "--init 1 --log-fd 22 --stdout-fd 20 --stderr-fd 20".into(),
            "descriptor 20 given twice",
        ),
        (
            "dhsup",
            format!("--init 1 {OK} --listen-fd 21"),
            "--attach-socket and --listen-fd",
        ),
        (
            "dhsup",
            format!("--init 1 {OK} --stdin-fd 20"),
            "--stdin-fd 20: not the write end",
        ),
        (
            "dhsup",
            format!("--init 1 {OK} --stdin-fd 21"),
            "--init 1: not a child of this process",
        ),
    ];
    for (id, args, want) in cases {
        let args: Vec<&str> = args.split_whitespace().collect();
        let err = run(id, &args);
        assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
    }
    let _ = std::fs::remove_file(&log);
}

/// Reads a pty master until the slave side is gone (EIO).
fn read_pty(master: std::os::fd::OwnedFd) -> String {
    use std::io::Read;
    let mut f = std::fs::File::from(master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).replace('\r', "")
}

#[test]
fn terminal_through_the_console_socket() {
    use std::os::fd::AsRawFd;
    let b = Bundle::new(&["sh", "-c", "tty; echo tty-ok; sleep 1000"], |c| {
        c["process"]["terminal"] = json!(true);
        c["process"]["consoleSize"] = json!({"height": 33, "width": 99});
    });
    let root = Root::new();
    let id = unique_name("tty");
    let sock = root.dir.with_extension("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind console socket");
    let st = root
        .cmd(&[
            "create",
            "--bundle",
            b.dir.to_str().expect("utf8"),
            "--console-socket",
            sock.to_str().expect("utf8"),
            &id,
        ])
        .status()
        .expect("create");
    assert!(st.success());
    let (conn, _) = listener.accept().expect("accept");
    let master = deckhand_cri::oci::tty::recv_fd(conn.as_raw_fd()).expect("pty master");
    root.ok(&["start", &id]);
    // The init keeps the pty open (sleep): read what it printed, then exec with a tty of its own.
    let mut f = std::fs::File::from(master);
    let mut got = String::new();
    let mut buf = [0u8; 256];
    while !got.contains("tty-ok") {
        let n = std::io::Read::read(&mut f, &mut buf).expect("read pty");
        assert!(n > 0, "pty closed early: {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("/dev/pts/0"), "{got:?}");

    let st = root
        .cmd(&[
            "exec",
            "--tty",
            "--console-socket",
            sock.to_str().expect("utf8"),
            &id,
            "sh",
            "-c",
            "tty; stty size",
        ])
        .status()
        .expect("exec");
    assert!(st.success());
    let (conn, _) = listener.accept().expect("accept");
    let master = deckhand_cri::oci::tty::recv_fd(conn.as_raw_fd()).expect("pty master");
    let out = read_pty(master);
    let _ = std::fs::remove_file(&sock);
    assert!(out.starts_with("/dev/pts/1"), "{out:?}");
}
