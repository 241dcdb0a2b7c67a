//! Unit tests on fake trees (plain directories): the file names and values of the v2 code path
//! that this host's hybrid layout cannot exercise for real (memory, cpu, pids, io in cgroup2).
//! The real-cgroup tests are in `cri-shim/tests/cgroups.rs`.

use std::fs;
use std::path::Path;

use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxHugepageLimitBuilder, LinuxMemoryBuilder,
    LinuxPidsBuilder, LinuxResourcesBuilder, LinuxThrottleDeviceBuilder, LinuxWeightDeviceBuilder,
};

use super::*;

const V2_FILES: &[&str] = &[
    "cgroup.procs",
    "cgroup.subtree_control",
    "cgroup.controllers",
    "cpu.weight",
    "cpu.max",
    "cpu.max.burst",
    "cpuset.cpus",
    "cpuset.mems",
    "memory.max",
    "memory.swap.max",
    "memory.low",
    "memory.high",
    "pids.max",
    "hugetlb.2MB.max",
    "io.weight",
    "io.max",
];

fn read(dir: &Path, f: &str) -> String {
    fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
}

fn fake_v2() -> (tempfile::TempDir, Manager) {
    let root = tempfile::tempdir().expect("tmp");
    fs::write(
        root.path().join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids\n",
    )
    .expect("w");
    fs::write(root.path().join("cgroup.subtree_control"), "").expect("w");
    let m = Manager::with_layout(Layout::v2(root.path()).expect("layout"), "/dh-fake/ctr")
        .expect("manager");
    (root, m)
}

fn touch_all(dir: &Path) {
    for f in V2_FILES {
        fs::write(dir.join(f), "").expect("touch");
    }
}

#[test]
fn paths() {
    assert!(matches!(
        parse_path("system.slice:docker:abc"),
        Err(Error::SystemdUnsupported(_))
    ));
    assert!(matches!(parse_path("/a/../b"), Err(Error::Invalid(_))));
    assert!(matches!(parse_path(""), Err(Error::Invalid(_))));
    assert!(matches!(parse_path("/"), Err(Error::Invalid(_))));
    assert_eq!(
        parse_path("/a//b/./c").expect("p"),
        (true, vec!["a", "b", "c"])
    );
    assert_eq!(parse_path("a/b").expect("p"), (false, vec!["a", "b"]));
    let layout = Layout {
        v1: vec![],
        unified: Some("/nonexistent".into()),
        v2_controllers: vec![],
        own: vec![],
    };
    let e = Manager::with_layout(layout, "kubepods.slice:cri:abc");
    assert!(
        e.expect_err("systemd")
            .to_string()
            .contains("systemd cgroup driver")
    );
}

#[test]
fn relative_path_joins_own_cgroup() {
    let layout = Layout {
        v1: vec![V1Hierarchy {
            mountpoint: "/cg/memory".into(),
            controllers: vec!["memory".into()],
        }],
        unified: Some("/cg/unified".into()),
        v2_controllers: vec![],
        own: vec![
            ("memory".into(), "/user/me".into()),
            (String::new(), "/u2".into()),
        ],
    };
    let m = Manager::with_layout(layout.clone(), "ctr").expect("m");
    let dirs: Vec<_> = m.v1_dirs().map(|(_, d)| d.to_path_buf()).collect();
    assert_eq!(dirs, [Path::new("/cg/memory/user/me/ctr")]);
    assert_eq!(m.unified_dir(), Some(Path::new("/cg/unified/u2/ctr")));
    let m = Manager::with_layout(layout, "/abs/ctr").expect("m");
    assert_eq!(m.unified_dir(), Some(Path::new("/cg/unified/abs/ctr")));
    assert_eq!(m.path(), "/abs/ctr");
}

#[test]
fn v2_create_enables_controllers() {
    let (root, m) = fake_v2();
    m.create().expect("create");
    assert!(root.path().join("dh-fake/ctr").is_dir());
    // Each "+ctl" write overwrites the fake file; the last controller in order is what remains.
    assert_eq!(read(root.path(), "cgroup.subtree_control"), "+pids");
    assert_eq!(m.layout().mode(), Mode::Unified);
}

#[test]
fn v2_set_writes_the_v2_files() {
    let (root, m) = fake_v2();
    m.create().expect("create");
    let dir = root.path().join("dh-fake/ctr");
    touch_all(&dir);
    let r = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .shares(1024u64)
                .quota(50_000i64)
                .period(100_000u64)
                .cpus("0-1")
                .mems("0")
                .build()
                .expect("cpu"),
        )
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64i64 << 20)
                .swap(128i64 << 20)
                .reservation(32i64 << 20)
                .disable_oom_killer(true)
                .build()
                .expect("mem"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(42i64)
                .build()
                .expect("pids"),
        )
        .hugepage_limits(vec![
            LinuxHugepageLimitBuilder::default()
                .page_size("2MB")
                .limit(4i64 << 20)
                .build()
                .expect("h"),
        ])
        .block_io(
            LinuxBlockIoBuilder::default()
                .weight(500u16)
                .weight_device(vec![
                    LinuxWeightDeviceBuilder::default()
                        .major(8i64)
                        .minor(0i64)
                        .weight(100u16)
                        .build()
                        .expect("wd"),
                ])
                .throttle_read_bps_device(vec![
                    LinuxThrottleDeviceBuilder::default()
                        .major(8i64)
                        .minor(0i64)
                        .rate(1u64 << 20)
                        .build()
                        .expect("t"),
                ])
                .build()
                .expect("blkio"),
        )
        .unified(
            [("memory.high".to_string(), "100000000".to_string())]
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()
        .expect("resources");
    let warns = m.set(&r).expect("set");
    assert!(
        warns.iter().any(|w| w.contains("disableOOMKiller")),
        "{warns:?}"
    );
    assert_eq!(read(&dir, "cpu.weight"), "100");
    assert_eq!(read(&dir, "cpu.max"), "50000 100000");
    assert_eq!(read(&dir, "cpuset.cpus"), "0-1");
    assert_eq!(read(&dir, "cpuset.mems"), "0");
    assert_eq!(read(&dir, "memory.max"), (64u64 << 20).to_string());
    assert_eq!(
        read(&dir, "memory.swap.max"),
        (64u64 << 20).to_string(),
        "swap alone = memsw − limit"
    );
    assert_eq!(read(&dir, "memory.low"), (32u64 << 20).to_string());
    assert_eq!(read(&dir, "memory.high"), "100000000");
    assert_eq!(read(&dir, "pids.max"), "42");
    assert_eq!(read(&dir, "hugetlb.2MB.max"), (4u64 << 20).to_string());
    // Writes overwrite the fake file: the weight_device line is the last io.weight write.
    assert_eq!(
        read(&dir, "io.weight"),
        format!("8:0 {}", convert::blkio_weight_to_io_weight(100))
    );
    assert_eq!(read(&dir, "io.max"), "8:0 rbps=1048576");

    // Unlimited values and a lone quota change.
    fs::write(dir.join("cpu.max"), "").expect("reset");
    fs::write(dir.join("memory.max"), "").expect("reset");
    fs::write(dir.join("pids.max"), "").expect("reset");
    let r = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .quota(-1i64)
                .build()
                .expect("cpu"),
        )
        .memory(
            LinuxMemoryBuilder::default()
                .limit(-1i64)
                .swap(-1i64)
                .build()
                .expect("mem"),
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(0i64)
                .build()
                .expect("pids"),
        )
        .build()
        .expect("r");
    m.set(&r).expect("set");
    assert_eq!(read(&dir, "cpu.max"), "max 100000");
    assert_eq!(read(&dir, "memory.max"), "max");
    assert_eq!(read(&dir, "memory.swap.max"), "max");
    assert_eq!(read(&dir, "pids.max"), "max");

    // Swap below the limit is refused before anything is written.
    let bad = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(100i64)
                .swap(50i64)
                .build()
                .expect("mem"),
        )
        .build()
        .expect("r");
    assert!(matches!(m.set(&bad), Err(Error::Invalid(_))));
    // Realtime has no v2 equivalent.
    let rt = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .realtime_runtime(1000i64)
                .build()
                .expect("cpu"),
        )
        .build()
        .expect("r");
    assert!(matches!(m.set(&rt), Err(Error::Unsupported(_))));
}

#[test]
fn v2_missing_controller_file_is_a_clear_error() {
    let (root, m) = fake_v2();
    m.create().expect("create");
    let _ = root;
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(1i64 << 20)
                .build()
                .expect("mem"),
        )
        .build()
        .expect("r");
    let e = m.set(&r).expect_err("no memory.max");
    assert!(e.to_string().contains("memory.max"), "{e}");
}

#[test]
fn v2_stats_oom_and_procs() {
    let (root, m) = fake_v2();
    m.create().expect("create");
    let dir = root.path().join("dh-fake/ctr");
    touch_all(&dir);
    fs::write(
        dir.join("memory.stat"),
        "anon 100\nfile 300\ninactive_file 200\npgfault 7\npgmajfault 1\n",
    )
    .expect("w");
    fs::write(dir.join("memory.current"), "1000\n").expect("w");
    fs::write(dir.join("memory.max"), "max\n").expect("w");
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n",
    )
    .expect("w");
    fs::write(
        dir.join("cpu.stat"),
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\nnr_throttled 2\nthrottled_usec 40\n",
    )
    .expect("w");
    fs::write(dir.join("pids.current"), "3\n").expect("w");
    fs::write(dir.join("pids.max"), "42\n").expect("w");
    let s = m.stats().expect("stats");
    assert_eq!(
        s.cpu,
        CpuStats {
            usage_ns: 1_500_000,
            user_ns: 1_000_000,
            system_ns: 500_000,
            nr_periods: 10,
            nr_throttled: 2,
            throttled_ns: 40_000
        }
    );
    assert_eq!(s.memory.usage, 1000);
    assert_eq!(s.memory.working_set, 800);
    assert_eq!(s.memory.rss, 100);
    assert_eq!(s.memory.cache, 300);
    assert_eq!(s.memory.limit, None);
    assert_eq!(s.memory.failcnt, 3);
    assert_eq!(
        s.pids,
        PidsStats {
            current: 3,
            limit: Some(42)
        }
    );
    assert_eq!(
        m.oom_events().expect("oom"),
        OomEvents {
            oom_kill: 1,
            oom: Some(2),
            under_oom: false
        }
    );
    assert!(m.oom_killed().expect("oom"));
    // Working set never goes negative.
    fs::write(dir.join("memory.current"), "100\n").expect("w");
    assert_eq!(m.stats().expect("stats").memory.working_set, 0);

    fs::write(dir.join("cgroup.procs"), "34\n12\n").expect("w");
    fs::create_dir(dir.join("sub")).expect("mkdir");
    fs::write(dir.join("sub/cgroup.procs"), "56\n").expect("w");
    assert_eq!(m.procs().expect("procs"), [12, 34, 56]);
}
