//! Writing `LinuxResources` to v1 and v2 controller files.

use std::path::Path;

use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxHugepageLimit, LinuxMemory, LinuxPids};

use super::convert::{self, mem_v1, mem_v2};
use super::{Error, util};

fn set_opt(dir: &Path, name: &str, v: Option<String>) -> Result<(), Error> {
    match v {
        Some(v) => util::write(dir, name, &v),
        None => Ok(()),
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().filter(|s| !s.trim().is_empty()).cloned()
}

pub(crate) fn cpuset(dir: &Path, cpu: &LinuxCpu) -> Result<(), Error> {
    // mems first: a new cpuset is unusable until both are set, and mems is rarely narrowed.
    set_opt(dir, "cpuset.mems", non_empty(cpu.mems()))?;
    set_opt(dir, "cpuset.cpus", non_empty(cpu.cpus()))
}

pub(crate) fn cpu_v1(dir: &Path, cpu: &LinuxCpu) -> Result<(), Error> {
    set_opt(
        dir,
        "cpu.shares",
        cpu.shares().filter(|&s| s != 0).map(|s| s.to_string()),
    )?;
    // Period before quota: the quota is checked against the period.
    set_opt(
        dir,
        "cpu.cfs_period_us",
        cpu.period().filter(|&p| p != 0).map(|p| p.to_string()),
    )?;
    set_opt(
        dir,
        "cpu.cfs_quota_us",
        cpu.quota()
            .filter(|&q| q != 0)
            .map(|q| if q < 0 { "-1".into() } else { q.to_string() }),
    )?;
    if let Some(b) = cpu.burst() {
        util::write(dir, "cpu.cfs_burst_us", &b.to_string())?;
    }
    set_opt(
        dir,
        "cpu.rt_period_us",
        cpu.realtime_period()
            .filter(|&p| p != 0)
            .map(|p| p.to_string()),
    )?;
    set_opt(
        dir,
        "cpu.rt_runtime_us",
        cpu.realtime_runtime()
            .filter(|&r| r != 0)
            .map(|r| r.to_string()),
    )?;
    if let Some(idle) = cpu.idle() {
        util::write(dir, "cpu.idle", &idle.to_string())?;
    }
    Ok(())
}

/// The `cpu.max` line for a quota/period pair (`None` if neither is set). A period alone keeps
/// the current quota.
pub(crate) fn cpu_max(
    dir: &Path,
    quota: Option<i64>,
    period: Option<u64>,
) -> Result<Option<String>, Error> {
    let quota = quota.filter(|&q| q != 0);
    let period = period.filter(|&p| p != 0);
    if quota.is_none() && period.is_none() {
        return Ok(None);
    }
    let current = util::read_opt(dir, "cpu.max")?.unwrap_or_default();
    let mut cur = current.split_whitespace();
    let (cur_quota, cur_period) = (
        cur.next().unwrap_or("max").to_string(),
        cur.next().unwrap_or("100000").to_string(),
    );
    let q = match quota {
        Some(q) if q > 0 => q.to_string(),
        Some(_) => "max".into(),
        None => cur_quota,
    };
    let p = period.map_or(cur_period, |p| p.to_string());
    Ok(Some(format!("{q} {p}")))
}

pub(crate) fn cpu_v2(dir: &Path, cpu: &LinuxCpu) -> Result<(), Error> {
    if cpu.realtime_runtime().is_some_and(|r| r != 0)
        || cpu.realtime_period().is_some_and(|p| p != 0)
    {
        return Err(Error::Unsupported(
            "realtime CPU scheduling is not supported on cgroup v2".into(),
        ));
    }
    set_opt(
        dir,
        "cpu.weight",
        cpu.shares()
            .filter(|&s| s != 0)
            .map(|s| convert::shares_to_weight(s).to_string()),
    )?;
    set_opt(dir, "cpu.max", cpu_max(dir, cpu.quota(), cpu.period())?)?;
    if let Some(b) = cpu.burst() {
        util::write(dir, "cpu.max.burst", &b.to_string())?;
    }
    if let Some(idle) = cpu.idle() {
        util::write(dir, "cpu.idle", &idle.to_string())?;
    }
    Ok(())
}

fn warn_ignored(m: &LinuxMemory, warns: &mut Vec<String>) {
    if m.disable_oom_killer() == Some(true) {
        // A container with the OOM killer disabled hangs at its limit instead of dying; the
        // kubelet never asks for it. Ignored on purpose.
        warns.push("memory.disableOOMKiller is ignored".to_string());
    }
    if m.kernel().is_some_and(|k| k > 0) || m.kernel_tcp().is_some_and(|k| k > 0) {
        warns.push("memory.kernel and memory.kernelTCP are deprecated and ignored".to_string());
    }
}

pub(crate) fn memory_v1(dir: &Path, m: &LinuxMemory, warns: &mut Vec<String>) -> Result<(), Error> {
    warn_ignored(m, warns);
    let limit = m.limit().filter(|&l| l != 0);
    let swap = m.swap().filter(|&s| s != 0);
    let has_memsw = util::exists(dir, "memory.memsw.limit_in_bytes");
    let swap = match swap {
        Some(s) if !has_memsw => {
            if s == -1 || Some(s) == limit {
                None // Nothing to enforce without swap accounting: memory+swap == memory.
            } else {
                return Err(Error::Unsupported(format!(
                    "memory.swap = {s}: swap accounting (memory.memsw.*) is not enabled"
                )));
            }
        }
        s => s,
    };
    match (limit, swap) {
        (Some(l), Some(s)) => {
            // memory.limit_in_bytes <= memory.memsw.limit_in_bytes at all times: when raising,
            // memsw has to move first; when lowering, the limit.
            if util::write(dir, "memory.limit_in_bytes", &mem_v1(l)).is_err() {
                util::write(dir, "memory.memsw.limit_in_bytes", &mem_v1(s))?;
                util::write(dir, "memory.limit_in_bytes", &mem_v1(l))?;
            } else {
                util::write(dir, "memory.memsw.limit_in_bytes", &mem_v1(s))?;
            }
        }
        (Some(l), None) => util::write(dir, "memory.limit_in_bytes", &mem_v1(l))?,
        (None, Some(s)) => util::write(dir, "memory.memsw.limit_in_bytes", &mem_v1(s))?,
        (None, None) => {}
    }
    set_opt(
        dir,
        "memory.soft_limit_in_bytes",
        m.reservation().filter(|&r| r != 0).map(mem_v1),
    )?;
    if let Some(sw) = m.swappiness() {
        if sw > 100 {
            return Err(Error::Invalid(format!(
                "memory.swappiness {sw} is above 100"
            )));
        }
        util::write(dir, "memory.swappiness", &sw.to_string())?;
    }
    Ok(())
}

pub(crate) fn memory_v2(dir: &Path, m: &LinuxMemory, warns: &mut Vec<String>) -> Result<(), Error> {
    warn_ignored(m, warns);
    if m.swappiness().is_some() {
        warns.push("memory.swappiness has no cgroup v2 equivalent and is ignored".to_string());
    }
    let limit = m.limit().filter(|&l| l != 0);
    let swap = convert::swap_to_v2(limit, m.swap()).map_err(Error::Invalid)?;
    set_opt(dir, "memory.max", limit.map(mem_v2))?;
    if let Some(s) = swap {
        if util::exists(dir, "memory.swap.max") {
            util::write(dir, "memory.swap.max", &s)?;
        } else if s != "0" && s != "max" {
            return Err(Error::Unsupported(format!(
                "memory.swap.max = {s}: swap accounting is not enabled"
            )));
        }
    }
    set_opt(
        dir,
        "memory.low",
        m.reservation().filter(|&r| r != 0).map(mem_v2),
    )
}

/// `pids.max` (same file on v1 and v2).
pub(crate) fn pids(dir: &Path, p: &LinuxPids) -> Result<(), Error> {
    let v = if p.limit() > 0 {
        p.limit().to_string()
    } else {
        "max".into()
    };
    util::write(dir, "pids.max", &v)
}

pub(crate) fn hugetlb(dir: &Path, limits: &[LinuxHugepageLimit], v2: bool) -> Result<(), Error> {
    for l in limits {
        let size = l.page_size();
        if size.is_empty() || size.contains('/') || size.contains('.') {
            return Err(Error::Invalid(format!("hugepage size {size:?}")));
        }
        let (file, rsvd) = if v2 {
            (
                format!("hugetlb.{size}.max"),
                format!("hugetlb.{size}.rsvd.max"),
            )
        } else {
            (
                format!("hugetlb.{size}.limit_in_bytes"),
                format!("hugetlb.{size}.rsvd.limit_in_bytes"),
            )
        };
        let value = if v2 {
            mem_v2(l.limit())
        } else {
            mem_v1(l.limit())
        };
        if !util::exists(dir, &file) {
            return Err(Error::Unsupported(format!(
                "hugepage size {size}: {} does not exist",
                dir.join(&file).display()
            )));
        }
        util::write(dir, &file, &value)?;
        if util::exists(dir, &rsvd) {
            util::write(dir, &rsvd, &value)?;
        }
    }
    Ok(())
}

/// The first of `names` that exists in `dir`.
fn first_existing<'a>(dir: &Path, names: &[&'a str]) -> Option<&'a str> {
    names.iter().copied().find(|n| util::exists(dir, n))
}

pub(crate) fn blkio_v1(dir: &Path, b: &LinuxBlockIo, warns: &mut Vec<String>) -> Result<(), Error> {
    let weight_file = first_existing(dir, &["blkio.weight", "blkio.bfq.weight"]);
    if let Some(w) = b.weight().filter(|&w| w != 0) {
        match weight_file {
            Some(f) => util::write(dir, f, &w.to_string())?,
            None => warns.push(format!(
                "blkio weight {w} ignored: no blkio.weight or blkio.bfq.weight (no CFQ/BFQ)"
            )),
        }
    }
    if let Some(w) = b.leaf_weight().filter(|&w| w != 0)
        && util::exists(dir, "blkio.leaf_weight")
    {
        util::write(dir, "blkio.leaf_weight", &w.to_string())?;
    }
    let wd_file = first_existing(dir, &["blkio.weight_device", "blkio.bfq.weight_device"]);
    for wd in b.weight_device().iter().flatten() {
        if let Some(w) = wd.weight() {
            match wd_file {
                Some(f) => util::write(dir, f, &format!("{}:{} {w}", wd.major(), wd.minor()))?,
                None => {
                    warns.push("blkio weight_device ignored: no CFQ/BFQ weight file".to_string())
                }
            }
        }
    }
    let throttles = [
        (
            "blkio.throttle.read_bps_device",
            b.throttle_read_bps_device(),
        ),
        (
            "blkio.throttle.write_bps_device",
            b.throttle_write_bps_device(),
        ),
        (
            "blkio.throttle.read_iops_device",
            b.throttle_read_iops_device(),
        ),
        (
            "blkio.throttle.write_iops_device",
            b.throttle_write_iops_device(),
        ),
    ];
    for (file, devs) in throttles {
        for d in devs.iter().flatten() {
            util::write(
                dir,
                file,
                &format!("{}:{} {}", d.major(), d.minor(), d.rate()),
            )?;
        }
    }
    Ok(())
}

pub(crate) fn io_v2(dir: &Path, b: &LinuxBlockIo, warns: &mut Vec<String>) -> Result<(), Error> {
    // BFQ takes the v1 range (1..=1000) unchanged; io.weight (the cost model) takes 1..=10000.
    let bfq = util::exists(dir, "io.bfq.weight");
    let weight = |w: u16| {
        if bfq {
            ("io.bfq.weight", w.to_string())
        } else {
            (
                "io.weight",
                convert::blkio_weight_to_io_weight(u64::from(w)).to_string(),
            )
        }
    };
    if let Some(w) = b.weight().filter(|&w| w != 0) {
        let (f, v) = weight(w);
        if util::exists(dir, f) {
            util::write(dir, f, &v)?;
        } else {
            warns.push(format!("blkio weight {w} ignored: {f} does not exist"));
        }
    }
    for wd in b.weight_device().iter().flatten() {
        if let Some(w) = wd.weight() {
            let (f, v) = weight(w);
            util::write(dir, f, &format!("{}:{} {v}", wd.major(), wd.minor()))?;
        }
    }
    let throttles = [
        ("rbps", b.throttle_read_bps_device()),
        ("wbps", b.throttle_write_bps_device()),
        ("riops", b.throttle_read_iops_device()),
        ("wiops", b.throttle_write_iops_device()),
    ];
    for (key, devs) in throttles {
        for d in devs.iter().flatten() {
            // v1 removes a rule written with 0; v2 spells that "max".
            let rate = if d.rate() == 0 {
                "max".to_string()
            } else {
                d.rate().to_string()
            };
            util::write(
                dir,
                "io.max",
                &format!("{}:{} {key}={rate}", d.major(), d.minor()),
            )?;
        }
    }
    Ok(())
}
