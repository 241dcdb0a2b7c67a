//! Real-cgroup tests of `oci::cgroups` (root required). Every cgroup is named `/dh-test-<pid>-<n>`
//! and removed by a drop guard, also when a test fails; children are killed and reaped by theirs.
//!
//! On this development VM the layout is hybrid (v1 controllers, a cgroup2 tree with only
//! `hugetlb`): the host-layout tests exercise the v1 code paths; the `v2_unified_*` tests run the
//! v2 code (cgroup.procs, cgroup.freeze/cgroup.events, cgroup.kill, the eBPF device program) for
//! real against a unified-only layout of the cgroup2 tree that the host has.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deckhand_cri::oci::cgroups::{FreezerState, Layout, Manager, Mode, devices};
use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder,
    LinuxDeviceType, LinuxHugepageLimitBuilder, LinuxMemoryBuilder, LinuxPidsBuilder,
    LinuxResources, LinuxResourcesBuilder, LinuxThrottleDeviceBuilder,
};

static N: AtomicUsize = AtomicUsize::new(0);

fn unique() -> String {
    format!(
        "/dh-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Destroys the cgroup (killing what is inside) on drop.
struct Cg(Manager);

impl Drop for Cg {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy(true) {
            eprintln!("cleanup of {}: {e}", self.0.path());
        }
    }
}

impl std::ops::Deref for Cg {
    type Target = Manager;
    fn deref(&self) -> &Manager {
        &self.0
    }
}

fn host_cg() -> Cg {
    let m = Manager::new(&unique()).expect("manager");
    let cg = Cg(m);
    cg.create().expect("create");
    cg
}

/// A unified-only manager on the host's cgroup2 tree, when it has one that is not the only tree
/// (on a pure-v2 host `host_cg` already covers v2).
fn unified_cg() -> Option<Cg> {
    let host = Layout::detect().expect("layout");
    let root = host.unified.clone()?;
    let cg =
        Cg(Manager::with_layout(Layout::v2(root).expect("v2 layout"), &unique()).expect("manager"));
    cg.create().expect("create");
    Some(cg)
}

/// A busybox shell that waits for a line on stdin, so it can be moved into the cgroup first.
struct Proc(Child);

impl Proc {
    fn start(cg: &Manager, script: &str) -> Proc {
        let child = Command::new("/bin/busybox")
            .args(["sh", "-c", &format!("read _go; {script}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn busybox");
        let mut p = Proc(child);
        cg.apply(p.pid()).expect("apply");
        p.0.stdin
            .as_mut()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("go");
        p
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Waits (bounded) and returns (exit status, stdout, stderr).
    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.0.try_wait().expect("wait") {
                break s;
            }
            assert!(
                start.elapsed() < timeout,
                "process did not finish in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let (mut out, mut err) = (String::new(), String::new());
        self.0
            .stdout
            .take()
            .expect("out")
            .read_to_string(&mut out)
            .expect("read");
        self.0
            .stderr
            .take()
            .expect("err")
            .read_to_string(&mut err)
            .expect("read");
        (status, out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn v1_dir(cg: &Manager, controller: &str) -> PathBuf {
    cg.v1_dirs()
        .find(|(h, _)| h.controllers.iter().any(|c| c == controller))
        .map(|(_, d)| d.to_path_buf())
        .unwrap_or_else(|| panic!("no v1 {controller} hierarchy"))
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
        .trim()
        .to_string()
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect(")") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Waits for a condition. Generous on purpose: the pure-v2 VM runs these tests under TCG
/// emulation, all at once, where a second of host time can become ten.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rule(
    allow: bool,
    t: LinuxDeviceType,
    maj: Option<i64>,
    min: Option<i64>,
    acc: &str,
) -> LinuxDeviceCgroup {
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .typ(t)
        .access(acc);
    if let Some(m) = maj {
        b = b.major(m);
    }
    if let Some(m) = min {
        b = b.minor(m);
    }
    b.build().expect("rule")
}

/// Deny everything, allow /dev/null (c 1:3).
fn null_only() -> LinuxResources {
    LinuxResourcesBuilder::default()
        .devices(vec![
            rule(false, LinuxDeviceType::A, None, None, "rwm"),
            rule(true, LinuxDeviceType::C, Some(1), Some(3), "rwm"),
        ])
        .build()
        .expect("resources")
}

/// Opens /dev/null and /dev/zero and mknods both in `dir`; prints what worked.
fn device_probe(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "echo x > /dev/null && echo null-ok; head -c1 /dev/zero > /dev/null && echo zero-ok; \
         mknod {d}/n c 1 3 && echo mknod-null-ok; mknod {d}/z c 1 5 && echo mknod-zero-ok; true"
    )
}

fn check_device_probe(out: &str, err: &str) {
    assert!(out.contains("null-ok"), "out={out:?} err={err:?}");
    assert!(
        !out.contains("zero-ok"),
        "/dev/zero must be denied: out={out:?} err={err:?}"
    );
    assert!(out.contains("mknod-null-ok"), "out={out:?} err={err:?}");
    assert!(
        !out.contains("mknod-zero-ok"),
        "mknod 1:5 must be denied: out={out:?} err={err:?}"
    );
    assert!(err.contains("not permitted"), "err={err:?}");
}

#[test]
fn layout_matches_mounts() {
    let l = Layout::detect().expect("detect");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let v1 = mounts
        .lines()
        .filter(|l| l.split(' ').nth(2) == Some("cgroup"))
        .count();
    let v2 = mounts
        .lines()
        .any(|l| l.split(' ').nth(2) == Some("cgroup2"));
    assert!(l.v1.len() <= v1 && (v1 == 0) == l.v1.is_empty());
    assert_eq!(l.unified.is_some(), v2);
    let expected = match (v1 > 0, v2) {
        (true, true) => Mode::Hybrid,
        (true, false) => Mode::Legacy,
        _ => Mode::Unified,
    };
    // A host with only name=systemd in v1 counts as unified.
    if !l.v1.iter().all(|h| h.is_named()) {
        assert_eq!(l.mode(), expected);
    }
}

#[test]
fn procs_listed_and_destroy_kills_and_is_idempotent() {
    let cg = host_cg();
    assert!(cg.exists());
    let p = Proc::start(&cg, "exec /bin/busybox sleep 30");
    assert!(cg.procs().expect("procs").contains(&p.pid()));
    // Also in every hierarchy, including the cgroup2 tree in hybrid mode.
    for (_, d) in cg.v1_dirs() {
        assert!(
            read(d, "cgroup.procs")
                .lines()
                .any(|l| l == p.pid().to_string()),
            "{}",
            d.display()
        );
    }
    if let Some(u) = cg.unified_dir() {
        assert!(
            read(u, "cgroup.procs")
                .lines()
                .any(|l| l == p.pid().to_string())
        );
    }
    // Without kill, a populated cgroup cannot go (and nothing is removed).
    assert!(matches!(
        cg.destroy(false),
        Err(deckhand_cri::oci::cgroups::Error::NotEmpty(..))
    ));
    assert!(cg.exists());
    cg.destroy(true).expect("destroy");
    let (status, _, _) = p.finish(Duration::from_secs(30));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!cg.exists());
    for (_, d) in cg.v1_dirs() {
        assert!(!d.exists(), "{}", d.display());
    }
    cg.destroy(true).expect("second destroy");
    cg.destroy(false).expect("third destroy");
}

#[test]
fn memory_limit_oom_kill_is_reported() {
    let cg = host_cg();
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(32i64 << 20)
                .swap(32i64 << 20)
                .build()
                .expect("mem"),
        )
        .build()
        .expect("r");
    cg.set(&r).expect("set");
    assert_eq!(cg.oom_events().expect("oom").oom_kill, 0);
    // The shell keeps the whole 100 MB command substitution in memory.
    let p = Proc::start(
        &cg,
        "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
    );
    let (status, out, _) = p.finish(Duration::from_secs(60));
    use std::os::unix::process::ExitStatusExt;
    assert!(!out.contains("survived"), "{out}");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let ev = cg.oom_events().expect("oom");
    assert!(ev.oom_kill >= 1, "{ev:?}");
    assert!(cg.oom_killed().expect("oom"));
    let s = cg.stats().expect("stats");
    assert_eq!(s.memory.limit, Some(32 << 20));
    assert!(
        s.memory.oom_kill >= 1 && s.memory.max_usage >= Some(30 << 20),
        "{:?}",
        s.memory
    );
}

#[test]
fn pids_limit_bounds_a_fork_loop() {
    let cg = host_cg();
    let r = LinuxResourcesBuilder::default()
        .pids(
            LinuxPidsBuilder::default()
                .limit(8i64)
                .build()
                .expect("pids"),
        )
        .build()
        .expect("r");
    cg.set(&r).expect("set");
    let p = Proc::start(
        &cg,
        "for i in $(seq 50); do /bin/busybox sleep 5 & done; exit 0",
    );
    // Up to the shell and 7 sleeps (the shell may already have exited).
    wait_for("the limit", || cg.procs().expect("procs").len() >= 7);
    for _ in 0..10 {
        let n = cg.procs().expect("procs").len();
        assert!(n <= 8, "{n} processes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, _, err) = p.finish(Duration::from_secs(30));
    assert!(
        err.contains("fork") || err.contains("Resource temporarily unavailable"),
        "{err}"
    );
    let s = cg.stats().expect("stats");
    assert_eq!(s.pids.limit, Some(8));
    assert!(s.pids.current <= 8, "{:?}", s.pids);
}

#[test]
fn cpu_quota_cpuset_and_blkio_written_and_throttled() {
    let cg = host_cg();
    let mut blkio = LinuxBlockIoBuilder::default();
    let vda = Path::new("/sys/block/vda/dev");
    let dev = std::fs::read_to_string(vda)
        .ok()
        .map(|s| s.trim().to_string());
    if let Some((maj, min)) = dev.as_deref().and_then(|d| d.split_once(':')) {
        blkio = blkio.throttle_read_bps_device(vec![
            LinuxThrottleDeviceBuilder::default()
                .major(maj.parse::<i64>().expect("maj"))
                .minor(min.parse::<i64>().expect("min"))
                .rate(10u64 << 20)
                .build()
                .expect("t"),
        ]);
    }
    let r = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(10_000i64)
                .period(100_000u64)
                .cpus("0")
                .mems("0")
                .build()
                .expect("cpu"),
        )
        .block_io(blkio.build().expect("blkio"))
        .build()
        .expect("r");
    cg.set(&r).expect("set");
    let layout = cg.layout().clone();
    if layout.v1_hierarchy("cpu").is_some() {
        let cpu = v1_dir(&cg, "cpu");
        assert_eq!(read(&cpu, "cpu.shares"), "512");
        assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "10000");
        assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
        let cpuset = v1_dir(&cg, "cpuset");
        assert_eq!(read(&cpuset, "cpuset.cpus"), "0");
        assert_eq!(read(&cpuset, "cpuset.mems"), "0");
        if let (Some(d), Some(_)) = (dev, layout.v1_hierarchy("blkio")) {
            let b = v1_dir(&cg, "blkio");
            assert_eq!(
                read(&b, "blkio.throttle.read_bps_device"),
                format!("{d} {}", 10u64 << 20)
            );
        }
    } else {
        let u = cg.unified_dir().expect("unified");
        assert_eq!(read(u, "cpu.max"), "10000 100000");
    }
    // A busy loop at 10% of one CPU gets throttled within a few periods.
    let p = Proc::start(&cg, "while :; do :; done");
    wait_for("throttling", || {
        cg.stats().expect("stats").cpu.nr_throttled > 0
    });
    let s = cg.stats().expect("stats");
    assert!(
        s.cpu.usage_ns > 0 && s.cpu.nr_periods > 0 && s.cpu.throttled_ns > 0,
        "{:?}",
        s.cpu
    );
    drop(p);
}

#[test]
fn freeze_and_thaw_stop_and_resume_a_busy_process() {
    let cg = host_cg();
    let p = Proc::start(&cg, "while :; do :; done");
    wait_for("cpu time", || cpu_ticks(p.pid()) > 0);
    assert_eq!(cg.freezer_state().expect("state"), FreezerState::Thawed);
    cg.freeze().expect("freeze");
    assert_eq!(cg.freezer_state().expect("state"), FreezerState::Frozen);
    let t0 = cpu_ticks(p.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cpu_ticks(p.pid()), t0, "a frozen process does not run");
    cg.thaw().expect("thaw");
    assert_eq!(cg.freezer_state().expect("state"), FreezerState::Thawed);
    wait_for("running again", || cpu_ticks(p.pid()) > t0);
    // destroy of a frozen cgroup works too.
    cg.freeze().expect("freeze");
    cg.destroy(true).expect("destroy frozen");
    assert!(!cg.exists());
}

#[test]
fn device_rules_deny_zero_allow_null_on_the_host_layout() {
    let cg = host_cg();
    cg.set(&null_only()).expect("set devices");
    if cg.layout().v1_hierarchy("devices").is_some() {
        let d = v1_dir(&cg, "devices");
        assert_eq!(read(&d, "devices.list"), "c 1:3 rwm");
    }
    let tmp = tempfile::Builder::new()
        .prefix("dh-dev")
        .tempdir()
        .expect("tmp");
    let p = Proc::start(&cg, &device_probe(tmp.path()));
    let (_, out, err) = p.finish(Duration::from_secs(60));
    check_device_probe(&out, &err);
}

#[test]
fn stats_are_plausible() {
    let cg = host_cg();
    // ~20 MB of anonymous memory in the shell, then spin a little.
    let p = Proc::start(
        &cg,
        "x=$(head -c 20000000 /dev/zero | tr '\\0' a); echo ready; i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done; sleep 30",
    );
    wait_for("usage", || {
        let s = cg.stats().expect("stats");
        s.cpu.usage_ns > 10_000_000 && s.memory.usage > 10 << 20
    });
    let s = cg.stats().expect("stats");
    assert!(s.memory.working_set <= s.memory.usage, "{:?}", s.memory);
    assert!(s.memory.working_set > 10 << 20, "{:?}", s.memory);
    assert!(s.memory.rss > 0, "{:?}", s.memory);
    assert!(s.cpu.user_ns + s.cpu.system_ns > 0, "{:?}", s.cpu);
    assert!(s.pids.current >= 1, "{:?}", s.pids);
    assert_eq!(s.memory.limit, None);
    drop(p);
}

#[test]
fn hugetlb_limit_goes_where_the_controller_is() {
    let host = Layout::detect().expect("layout");
    let has = host.v1_hierarchy("hugetlb").is_some() || host.has_v2("hugetlb");
    let size_dir = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB");
    if !has || !size_dir.exists() {
        eprintln!("no hugetlb controller or no 2MB pages: nothing to test");
        return;
    }
    let cg = host_cg();
    let r = LinuxResourcesBuilder::default()
        .hugepage_limits(vec![
            LinuxHugepageLimitBuilder::default()
                .page_size("2MB")
                .limit(4i64 << 20)
                .build()
                .expect("h"),
        ])
        .build()
        .expect("r");
    let warns = cg.set(&r).expect("set");
    assert!(warns.is_empty(), "{warns:?}");
    let (dir, file) = match host.v1_hierarchy("hugetlb") {
        Some(_) => (v1_dir(&cg, "hugetlb"), "hugetlb.2MB.limit_in_bytes"),
        None => (
            cg.unified_dir().expect("unified").to_path_buf(),
            "hugetlb.2MB.max",
        ),
    };
    assert_eq!(read(&dir, file), (4u64 << 20).to_string());
}

#[test]
fn v2_unified_procs_freeze_and_cgroup_kill() {
    let Some(cg) = unified_cg() else {
        eprintln!("no cgroup2 tree");
        return;
    };
    assert_eq!(cg.layout().mode(), Mode::Unified);
    let p = Proc::start(&cg, "while :; do :; done");
    assert_eq!(cg.procs().expect("procs"), [p.pid()]);
    wait_for("cpu time", || cpu_ticks(p.pid()) > 0);
    cg.freeze().expect("freeze");
    assert_eq!(cg.freezer_state().expect("state"), FreezerState::Frozen);
    let u = cg.unified_dir().expect("dir");
    assert!(read(u, "cgroup.events").contains("frozen 1"));
    let t0 = cpu_ticks(p.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cpu_ticks(p.pid()), t0);
    cg.thaw().expect("thaw");
    assert_eq!(cg.freezer_state().expect("state"), FreezerState::Thawed);
    wait_for("running again", || cpu_ticks(p.pid()) > t0);
    // cpu.stat exists in every cgroup2 cgroup, controller or not.
    assert!(cg.stats().expect("stats").cpu.usage_ns > 0);
    // destroy uses cgroup.kill here.
    cg.destroy(true).expect("destroy");
    assert!(!u.exists());
    let (status, _, _) = p.finish(Duration::from_secs(30));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn v2_unified_ebpf_device_program_is_enforced() {
    let Some(cg) = unified_cg() else {
        eprintln!("no cgroup2 tree");
        return;
    };
    let u = cg.unified_dir().expect("dir").to_path_buf();
    cg.set(&null_only()).expect("set devices");
    assert_eq!(devices::query(&u).expect("query").len(), 1);
    // Setting again replaces the program rather than stacking another.
    cg.set(&null_only()).expect("set devices again");
    assert_eq!(devices::query(&u).expect("query").len(), 1);
    let tmp = tempfile::Builder::new()
        .prefix("dh-dev")
        .tempdir()
        .expect("tmp");
    let p = Proc::start(&cg, &device_probe(tmp.path()));
    let (_, out, err) = p.finish(Duration::from_secs(60));
    check_device_probe(&out, &err);
}

#[test]
fn systemd_paths_are_refused_clearly() {
    let e = Manager::new("kubepods.slice:cri-containerd:abc").expect_err("systemd");
    assert!(
        e.to_string()
            .contains("systemd cgroup driver is not supported"),
        "{e}"
    );
    assert!(Manager::new("/dh/../etc").is_err());
}

#[test]
fn memory_limits_can_be_raised_and_lowered() {
    let cg = host_cg();
    let mem = |limit: i64, swap: i64, reservation: i64| {
        LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(limit)
                    .swap(swap)
                    .reservation(reservation)
                    .build()
                    .expect("mem"),
            )
            .build()
            .expect("r")
    };
    // Raising both needs memsw first, lowering needs the limit first: both orders work.
    for (limit, swap) in [
        (32i64 << 20, 32i64 << 20),
        (256 << 20, 512 << 20),
        (16 << 20, 16 << 20),
        (-1, -1),
    ] {
        cg.set(&mem(limit, swap, 8 << 20)).expect("set");
        let s = cg.stats().expect("stats");
        let want = (limit > 0).then_some(limit as u64);
        assert_eq!(s.memory.limit, want, "limit {limit} swap {swap}");
        if cg.layout().v1_hierarchy("memory").is_some() {
            let d = v1_dir(&cg, "memory");
            assert_eq!(
                read(&d, "memory.soft_limit_in_bytes"),
                (8u64 << 20).to_string()
            );
            if d.join("memory.memsw.limit_in_bytes").exists() && swap > 0 {
                assert_eq!(read(&d, "memory.memsw.limit_in_bytes"), swap.to_string());
            }
        }
    }
}

/// `deckhand-runc`, next to this test binary in the VM (`/deckhand-runc`), else Cargo's.
fn runc_bin() -> PathBuf {
    let vm = Path::new("/deckhand-runc");
    if vm.exists() {
        return vm.to_path_buf();
    }
    PathBuf::from(env!("CARGO_BIN_EXE_deckhand-runc"))
}

/// Deletes the container (and so its cgroup) on drop.
struct Container<'a> {
    runc: &'a Path,
    state: &'a Path,
    id: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.runc)
            .arg("--root")
            .arg(self.state)
            .args(["delete", "--force", &self.id])
            .status();
    }
}

/// The runtime's init and an exec'd process start in the container's cgroup in every
/// hierarchy: on cgroup2 through `clone3(CLONE_INTO_CGROUP)`, in v1 hierarchies by moving
/// themselves (`tasks`), neither taking the kernel's global lock that moving another pid takes.
#[test]
fn runtime_init_and_exec_start_in_the_container_cgroup() {
    let runc = runc_bin();
    let tmp = tempfile::Builder::new()
        .prefix("dh-rt-cg")
        .tempdir()
        .expect("tmp");
    let rootfs = tmp.path().join("bundle/rootfs");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
    let path = unique();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "sleep", "60"],
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": rootfs},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "cgroupsPath": path,
            "resources": {"pids": {"limit": 64}},
            "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}]
        }
    });
    let bundle = tmp.path().join("bundle");
    std::fs::write(bundle.join("config.json"), config.to_string()).expect("config");
    let state = tmp.path().join("state");
    let id = format!("dh-rt-cg-{}", std::process::id());
    let runc_cmd = || {
        let mut c = Command::new(&runc);
        c.arg("--root").arg(&state);
        c
    };
    let guard = Container {
        runc: &runc,
        state: &state,
        id: id.clone(),
    };
    let st = runc_cmd()
        .args(["create", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("create");
    assert!(st.success(), "create failed");
    assert!(
        runc_cmd()
            .args(["start", &id])
            .status()
            .expect("start")
            .success()
    );
    let out = runc_cmd()
        .args([
            "exec",
            &id,
            "/bin/busybox",
            "sh",
            "-c",
            "cat /proc/1/cgroup; echo ---; cat /proc/self/cgroup",
        ])
        .output()
        .expect("exec");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exec: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (init, exec) = text.split_once("---\n").expect("two parts");
    let layout = Layout::detect().expect("layout");
    for (who, lines) in [("init", init), ("exec", exec)] {
        // One line per hierarchy: `id:controllers:path`; every one names our cgroup.
        let paths: Vec<&str> = lines
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .collect();
        assert!(!paths.is_empty(), "{who}: no cgroups in {lines:?}");
        assert!(
            paths.iter().all(|p| *p == path),
            "{who} not in {path}: {lines}"
        );
        if layout.mode() != Mode::Unified {
            assert!(paths.len() > 1, "{who}: only {lines:?}");
        }
    }
    drop(guard);
    let cg = Manager::new(&path).expect("manager");
    assert!(!cg.exists(), "delete left the cgroup {path}");
}

/// Pure cgroup v2 for real: boots a Debian kernel with `cgroup_no_v1=all` in QEMU with this very
/// test binary in an initramfs (with its shared libraries and busybox), mounts cgroup2 on
/// /sys/fs/cgroup (every controller) and runs every other test of this file there.
///
/// Needs `qemu-system-x86` and a kernel: `DH_VM_KERNEL`, else
/// `/var/cache/deckhand/vm-kernel/vmlinuz` (both provided by `hack/install-deps.sh`), else the
/// newest `/boot/vmlinuz-*`. TCG by default: nested KVM on the development VM hangs after the
/// kernel decompresses; `DH_VM_ACCEL=kvm` tries it.
#[test]
fn pure_v2_in_a_vm() {
    use std::os::unix::fs::PermissionsExt;
    let kernel = std::env::var_os("DH_VM_KERNEL")
        .map(PathBuf::from)
        .or_else(|| {
            Some(PathBuf::from("/var/cache/deckhand/vm-kernel/vmlinuz")).filter(|p| p.exists())
        })
        .or_else(|| {
            let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
                .collect();
            k.sort();
            k.pop()
        })
        .expect("no kernel: set DH_VM_KERNEL or put one at /var/cache/deckhand/vm-kernel/vmlinuz");
    let qemu = "/usr/bin/qemu-system-x86_64";
    assert!(
        Path::new(qemu).exists(),
        "{qemu} missing: apt-get install --no-install-recommends qemu-system-x86"
    );

    let tmp = tempfile::Builder::new()
        .prefix("dh-vm")
        .tempdir()
        .expect("tmp");
    let root = tmp.path().join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    let me = std::env::current_exe().expect("exe");
    copy(&me, &root.join("cgroups-test"));
    let runc = runc_bin();
    copy(&runc, &root.join("deckhand-runc"));
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"));
    for bin in [&me, &runc] {
        let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let lib = Path::new(lib);
            copy(
                &std::fs::canonicalize(lib).expect("lib"),
                &root.join(lib.strip_prefix("/").expect("abs")),
            );
        }
    }
    // First the init moves everything to a tmpfs and switch_roots there: a container's
    // pivot_root cannot leave the initramfs.
    let init = "#!/bin/busybox sh\n\
        if [ \"$DH_STAGE\" != 2 ]; then\n\
          /bin/busybox mkdir /new; /bin/busybox mount -t tmpfs -o size=900m new /new\n\
          for d in /*; do [ \"$d\" = /new ] || /bin/busybox cp -a \"$d\" /new/; done\n\
          export DH_STAGE=2; exec /bin/busybox switch_root /new /init\n\
        fi\n\
        /bin/busybox mkdir -p /usr/bin /sbin /usr/sbin\n\
        /bin/busybox --install -s\n\
        mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp\n\
        mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
        echo \"DH-MOUNTS: $(grep -c ' - cgroup ' /proc/self/mountinfo) v1, $(grep -c ' - cgroup2 ' /proc/self/mountinfo) v2\"\n\
        echo \"DH-CONTROLLERS: $(cat /sys/fs/cgroup/cgroup.controllers)\"\n\
        cd /tmp; /cgroups-test --test-threads=2 --skip pure_v2_in_a_vm; echo \"DH-RESULT $?\"\n\
        echo \"DH-LEFT:$(ls -d /sys/fs/cgroup/dh* 2>/dev/null)\"\n\
        poweroff -f\n";
    std::fs::write(root.join("init"), init).expect("init");
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let initrd = tmp.path().join("initrd.cpio");
    let st = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | /bin/busybox cpio -o -H newc > {}",
            root.display(),
            initrd.display()
        ))
        .status()
        .expect("cpio");
    assert!(st.success(), "cpio");

    let kvm = std::env::var("DH_VM_ACCEL").is_ok_and(|a| a == "kvm");
    let log_path = tmp.path().join("console.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut cmd = Command::new(qemu);
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args([
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-kernel",
    ])
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        "console=ttyS0 rdinit=/init cgroup_no_v1=all panic=-1 quiet",
    ])
    .stdin(Stdio::null())
    .stdout(log.try_clone().expect("log"))
    .stderr(log);
    let mut vm = Proc(cmd.spawn().expect("qemu"));
    let start = Instant::now();
    while vm.0.try_wait().expect("wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "VM timed out: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = String::from_utf8_lossy(&std::fs::read(&log_path).expect("log")).into_owned();
    let summary: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("DH-") || l.starts_with("test ") || l.contains("panicked"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    assert!(out.contains("DH-MOUNTS: 0 v1, 1 v2"), "not pure v2:\n{out}");
    assert!(
        out.contains("DH-RESULT 0"),
        "tests failed in the VM:\n{out}"
    );
    assert!(
        out.contains("DH-LEFT:\n") || out.contains("DH-LEFT:\r\n"),
        "cgroups left behind:\n{out}"
    );
    let passed = out
        .lines()
        .filter(|l| l.starts_with("test ") && l.trim_end().ends_with("ok"))
        .count();
    assert!(passed >= 13, "only {passed} tests passed in the VM:\n{out}");
}

#[test]
fn nested_paths_and_empty_parents() {
    let parent = unique();
    let a = Cg(Manager::new(&format!("{parent}/a")).expect("a"));
    let b = Cg(Manager::new(&format!("{parent}/b")).expect("b"));
    // Removes the parent whatever happens below.
    let _p = Cg(Manager::new(&parent).expect("parent"));
    a.create().expect("create a");
    b.create().expect("create b");
    let p = Proc::start(&a, "exec /bin/busybox sleep 30");
    // The parent's procs include its children's.
    let top = Manager::new(&parent).expect("parent");
    assert!(top.procs().expect("procs").contains(&p.pid()));
    a.destroy(true).expect("destroy a");
    // b is still there: the parent stays.
    a.remove_empty_parents(1).expect("parents");
    assert!(top.exists());
    b.destroy(false).expect("destroy b");
    b.remove_empty_parents(1).expect("parents");
    assert!(!top.exists(), "empty parent removed in every hierarchy");
    // Never above the hierarchy roots, and idempotent.
    b.remove_empty_parents(5).expect("again");
}
