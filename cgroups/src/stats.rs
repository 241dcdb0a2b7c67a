//! Resource usage of a cgroup, in the units the CRI and the kubelet use.

use std::path::Path;

use super::{Error, util};

/// CPU usage. Times in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Total CPU time consumed (CRI `usage_core_nano_seconds`).
    pub usage_ns: u64,
    pub user_ns: u64,
    pub system_ns: u64,
    /// CFS bandwidth: enforcement periods, throttled periods, total throttled time.
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
}

/// Memory usage, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// v1 `memory.usage_in_bytes`, v2 `memory.current`.
    pub usage: u64,
    /// `usage − inactive_file` (0 if negative), as the kubelet and cAdvisor compute it; what
    /// evictions and `kubectl top` look at.
    pub working_set: u64,
    /// v1 `total_inactive_file`, v2 `inactive_file`.
    pub inactive_file: u64,
    /// Anonymous memory (v1 `total_rss`, v2 `anon`): CRI `rss_bytes`.
    pub rss: u64,
    /// Page cache (v1 `total_cache`, v2 `file`).
    pub cache: u64,
    /// Page faults (CRI `page_faults` / `major_page_faults`).
    pub pgfault: u64,
    pub pgmajfault: u64,
    /// The limit, `None` if unlimited.
    pub limit: Option<u64>,
    /// Peak usage (v1 `max_usage_in_bytes`, v2 `memory.peak` when the kernel has it).
    pub max_usage: Option<u64>,
    /// Times the limit was hit (v1 `failcnt`, v2 `memory.events` `max`).
    pub failcnt: u64,
    /// Processes killed by the OOM killer in this cgroup.
    pub oom_kill: u64,
}

/// Process counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PidsStats {
    pub current: u64,
    /// `None` if unlimited.
    pub limit: Option<u64>,
}

/// A snapshot of a cgroup's usage. Sections whose controller is not available are default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
}

/// OOM events of a cgroup (and, on v2, its descendants).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OomEvents {
    /// Processes the kernel OOM-killed (v1 `memory.oom_control` `oom_kill`, Linux ≥ 4.13; v2
    /// `memory.events` `oom_kill`).
    pub oom_kill: u64,
    /// Times the cgroup hit OOM (v2 `memory.events` `oom`); `None` on v1, which does not count.
    pub oom: Option<u64>,
    /// v1 only: the cgroup is under OOM right now (OOM killer disabled and limit reached).
    pub under_oom: bool,
}

pub(crate) fn cpu_v1(cpuacct: Option<&Path>, cpu: Option<&Path>) -> Result<CpuStats, Error> {
    let mut s = CpuStats::default();
    if let Some(d) = cpuacct {
        s.usage_ns = util::read_u64_opt(d, "cpuacct.usage")?.unwrap_or(0);
        match (
            util::read_u64_opt(d, "cpuacct.usage_user")?,
            util::read_u64_opt(d, "cpuacct.usage_sys")?,
        ) {
            (Some(u), Some(k)) => (s.user_ns, s.system_ns) = (u, k),
            _ => {
                // USER_HZ ticks.
                let text = util::read_opt(d, "cpuacct.stat")?.unwrap_or_default();
                // SAFETY: sysconf has no memory-safety preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                s.user_ns = util::keyed(&text, "user").unwrap_or(0) * 1_000_000_000 / hz;
                s.system_ns = util::keyed(&text, "system").unwrap_or(0) * 1_000_000_000 / hz;
            }
        }
    }
    if let Some(d) = cpu {
        let text = util::read_opt(d, "cpu.stat")?.unwrap_or_default();
        s.nr_periods = util::keyed(&text, "nr_periods").unwrap_or(0);
        s.nr_throttled = util::keyed(&text, "nr_throttled").unwrap_or(0);
        s.throttled_ns = util::keyed(&text, "throttled_time").unwrap_or(0);
    }
    Ok(s)
}

pub(crate) fn cpu_v2(dir: &Path) -> Result<CpuStats, Error> {
    // cpu.stat exists (with the usage lines) even without the cpu controller enabled.
    let text = util::read_opt(dir, "cpu.stat")?.unwrap_or_default();
    let us = |k: &str| util::keyed(&text, k).unwrap_or(0) * 1000;
    Ok(CpuStats {
        usage_ns: us("usage_usec"),
        user_ns: us("user_usec"),
        system_ns: us("system_usec"),
        nr_periods: util::keyed(&text, "nr_periods").unwrap_or(0),
        nr_throttled: util::keyed(&text, "nr_throttled").unwrap_or(0),
        throttled_ns: us("throttled_usec"),
    })
}

pub(crate) fn memory_v1(d: &Path) -> Result<MemoryStats, Error> {
    let stat = util::read(d, "memory.stat")?;
    let usage = util::read_u64_opt(d, "memory.usage_in_bytes")?.unwrap_or(0);
    let inactive_file = util::keyed(&stat, "total_inactive_file").unwrap_or(0);
    // v1 reports "unlimited" as a huge page-rounded number.
    let limit =
        util::read_u64_opt(d, "memory.limit_in_bytes")?.filter(|&l| l < (i64::MAX as u64) / 2);
    Ok(MemoryStats {
        usage,
        working_set: usage.saturating_sub(inactive_file),
        inactive_file,
        rss: util::keyed(&stat, "total_rss").unwrap_or(0),
        cache: util::keyed(&stat, "total_cache").unwrap_or(0),
        pgfault: util::keyed(&stat, "total_pgfault").unwrap_or(0),
        pgmajfault: util::keyed(&stat, "total_pgmajfault").unwrap_or(0),
        limit,
        max_usage: util::read_u64_opt(d, "memory.max_usage_in_bytes")?,
        failcnt: util::read_u64_opt(d, "memory.failcnt")?.unwrap_or(0),
        oom_kill: oom_v1(d)?.oom_kill,
    })
}

pub(crate) fn memory_v2(d: &Path) -> Result<MemoryStats, Error> {
    let stat = util::read(d, "memory.stat")?;
    let usage = util::read_u64_opt(d, "memory.current")?.unwrap_or(0);
    let inactive_file = util::keyed(&stat, "inactive_file").unwrap_or(0);
    let events = util::read_opt(d, "memory.events")?.unwrap_or_default();
    Ok(MemoryStats {
        usage,
        working_set: usage.saturating_sub(inactive_file),
        inactive_file,
        rss: util::keyed(&stat, "anon").unwrap_or(0),
        cache: util::keyed(&stat, "file").unwrap_or(0),
        pgfault: util::keyed(&stat, "pgfault").unwrap_or(0),
        pgmajfault: util::keyed(&stat, "pgmajfault").unwrap_or(0),
        limit: util::read_opt(d, "memory.max")?.and_then(|s| util::parse_limit(&s)),
        max_usage: util::read_u64_opt(d, "memory.peak")?,
        failcnt: util::keyed(&events, "max").unwrap_or(0),
        oom_kill: util::keyed(&events, "oom_kill").unwrap_or(0),
    })
}

pub(crate) fn oom_v1(d: &Path) -> Result<OomEvents, Error> {
    let text = util::read(d, "memory.oom_control")?;
    Ok(OomEvents {
        oom_kill: util::keyed(&text, "oom_kill").unwrap_or(0),
        oom: None,
        under_oom: util::keyed(&text, "under_oom").unwrap_or(0) != 0,
    })
}

pub(crate) fn oom_v2(d: &Path) -> Result<OomEvents, Error> {
    let text = util::read(d, "memory.events")?;
    Ok(OomEvents {
        oom_kill: util::keyed(&text, "oom_kill").unwrap_or(0),
        oom: Some(util::keyed(&text, "oom").unwrap_or(0)),
        under_oom: false,
    })
}

pub(crate) fn pids(d: &Path) -> Result<PidsStats, Error> {
    Ok(PidsStats {
        current: util::read_u64_opt(d, "pids.current")?.unwrap_or(0),
        limit: util::read_opt(d, "pids.max")?.and_then(|s| util::parse_limit(&s)),
    })
}
