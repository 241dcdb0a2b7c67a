//! What the kubelet reads about its machine: static facts for the Node (CPUs, memory, huge
//! pages, IDs, kernel, OS) and the signals of node pressure (available memory, filesystem space
//! and inodes, PIDs). Everything comes from `/proc`, `/sys`, `/etc` and `statvfs`; the parsers
//! are separate from the reads so they are tested without a machine.

use std::path::{Path, PathBuf};

/// An error reading the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file did not contain what was expected.
    #[error("parsing {path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was missing or malformed.
        what: String,
    },
    /// `statvfs` failed.
    #[error("statvfs {path}: {source}")]
    Statvfs {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: nix::Error,
    },
}

fn read(path: &str) -> Result<String, MachineError> {
    std::fs::read_to_string(path).map_err(|source| MachineError::Read {
        path: PathBuf::from(path),
        source,
    })
}

fn read_trimmed_or_empty(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn parse_err(path: &str, what: impl Into<String>) -> MachineError {
    MachineError::Parse {
        path: PathBuf::from(path),
        what: what.into(),
    }
}

/// A huge page size and how many pages of it the kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePages {
    /// Page size in bytes.
    pub page_size: u64,
    /// `nr_hugepages`.
    pub count: u64,
}

/// The machine's static facts, read once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineInfo {
    /// Logical CPUs online.
    pub num_cpus: u64,
    /// `MemTotal` in bytes.
    pub memory_bytes: u64,
    /// Huge page pools.
    pub huge_pages: Vec<HugePages>,
    /// `/etc/machine-id`.
    pub machine_id: String,
    /// `/sys/class/dmi/id/product_uuid` (empty if unreadable).
    pub system_uuid: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The kernel release (`uname -r`).
    pub kernel_version: String,
    /// `PRETTY_NAME` from os-release.
    pub os_image: String,
    /// The architecture, named as Go's GOARCH (`amd64`, `arm64`).
    pub architecture: String,
    /// The operating system, named as Go's GOOS (`linux`).
    pub operating_system: String,
}

impl MachineInfo {
    /// Reads the running machine.
    pub fn collect() -> Result<MachineInfo, MachineError> {
        const CPUS: &str = "/sys/devices/system/cpu/online";
        let num_cpus = match std::fs::read_to_string(CPUS) {
            Ok(s) => parse_cpu_list(&s).ok_or_else(|| parse_err(CPUS, "bad CPU list"))?,
            Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        };
        const MEMINFO: &str = "/proc/meminfo";
        let meminfo = parse_meminfo(&read(MEMINFO)?);
        let memory_bytes = meminfo
            .mem_total
            .ok_or_else(|| parse_err(MEMINFO, "no MemTotal"))?;
        let os_release = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap_or_default();
        let machine_id = match read_trimmed_or_empty("/etc/machine-id") {
            id if id.is_empty() => read_trimmed_or_empty("/var/lib/dbus/machine-id"),
            id => id,
        };
        Ok(MachineInfo {
            num_cpus,
            memory_bytes,
            huge_pages: read_huge_pages(Path::new("/sys/kernel/mm/hugepages")),
            machine_id,
            system_uuid: read_trimmed_or_empty("/sys/class/dmi/id/product_uuid"),
            boot_id: read_trimmed_or_empty("/proc/sys/kernel/random/boot_id"),
            kernel_version: read_trimmed_or_empty("/proc/sys/kernel/osrelease"),
            os_image: os_pretty_name(&os_release),
            architecture: go_arch(std::env::consts::ARCH).to_string(),
            operating_system: std::env::consts::OS.to_string(),
        })
    }
}

/// Go's GOARCH name for a Rust target architecture.
pub fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Counts the CPUs of a kernel CPU list (`0-3,5,7-8`).
pub fn parse_cpu_list(s: &str) -> Option<u64> {
    let mut n = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<u64>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// The fields of `/proc/meminfo` the kubelet uses, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub mem_total: Option<u64>,
    /// `MemFree`.
    pub mem_free: Option<u64>,
    /// `Inactive(file)`.
    pub inactive_file: Option<u64>,
}

/// Parses `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(Ok(v)) = words.next().map(str::parse::<u64>) else {
            continue;
        };
        let bytes = match words.next() {
            Some("kB") => v.saturating_mul(1024),
            _ => v,
        };
        match key {
            "MemTotal" => m.mem_total = Some(bytes),
            "MemFree" => m.mem_free = Some(bytes),
            "Inactive(file)" => m.inactive_file = Some(bytes),
            _ => {}
        }
    }
    m
}

/// `PRETTY_NAME` of an os-release file, unquoted; "Linux" without one (as cadvisor).
pub fn os_pretty_name(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
                .to_string()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "Linux".to_string())
}

fn read_huge_pages(dir: &Path) -> Vec<HugePages> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<HugePages> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let page_size = parse_huge_page_dir(&name)?;
            let count = std::fs::read_to_string(e.path().join("nr_hugepages"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(HugePages { page_size, count })
        })
        .collect();
    out.sort_by_key(|h| h.page_size);
    out
}

/// The page size in bytes of a `/sys/kernel/mm/hugepages` entry (`hugepages-2048kB`).
pub fn parse_huge_page_dir(name: &str) -> Option<u64> {
    let kb: u64 = name
        .strip_prefix("hugepages-")?
        .strip_suffix("kB")?
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Space and inodes of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Size in bytes.
    pub capacity_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Inodes in total.
    pub inodes: u64,
    /// Inodes free.
    pub inodes_free: u64,
}

/// `statvfs` of the filesystem holding `path`.
pub fn fs_stats(path: &Path) -> Result<FsStats, MachineError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|source| MachineError::Statvfs {
        path: path.to_path_buf(),
        source,
    })?;
    let frsize = s.fragment_size() as u64;
    Ok(FsStats {
        capacity_bytes: (s.blocks() as u64).saturating_mul(frsize),
        available_bytes: (s.blocks_available() as u64).saturating_mul(frsize),
        inodes: s.files() as u64,
        inodes_free: s.files_free() as u64,
    })
}

/// Memory as the eviction manager sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// `MemTotal`.
    pub capacity_bytes: u64,
    /// Capacity minus the working set (usage minus inactive file pages), as upstream's
    /// `memory.available`: `MemFree + Inactive(file)`.
    pub available_bytes: u64,
}

/// Reads memory statistics from `/proc/meminfo`.
pub fn memory_stats() -> Result<MemoryStats, MachineError> {
    const MEMINFO: &str = "/proc/meminfo";
    memory_stats_from(&parse_meminfo(&read(MEMINFO)?))
        .ok_or_else(|| parse_err(MEMINFO, "no MemTotal/MemFree"))
}

/// Memory statistics from parsed meminfo.
pub fn memory_stats_from(m: &MemInfo) -> Option<MemoryStats> {
    let total = m.mem_total?;
    let free = m.mem_free?;
    let working_set = total
        .saturating_sub(free)
        .saturating_sub(m.inactive_file.unwrap_or(0));
    Some(MemoryStats {
        capacity_bytes: total,
        available_bytes: total.saturating_sub(working_set),
    })
}

/// PIDs as the eviction manager sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidStats {
    /// The smaller of `pid_max` and `threads-max`.
    pub max: u64,
    /// Tasks (threads) running now.
    pub running: u64,
}

/// Reads `/proc/sys/kernel/{pid_max,threads-max}` and the task count of `/proc/loadavg`.
pub fn pid_stats() -> Result<PidStats, MachineError> {
    const PID_MAX: &str = "/proc/sys/kernel/pid_max";
    const LOADAVG: &str = "/proc/loadavg";
    let pid_max: u64 = read(PID_MAX)?
        .trim()
        .parse()
        .map_err(|_| parse_err(PID_MAX, "not a number"))?;
    let threads_max = read_trimmed_or_empty("/proc/sys/kernel/threads-max")
        .parse::<u64>()
        .unwrap_or(u64::MAX);
    let running =
        parse_loadavg_tasks(&read(LOADAVG)?).ok_or_else(|| parse_err(LOADAVG, "no task count"))?;
    Ok(PidStats {
        max: pid_max.min(threads_max),
        running,
    })
}

/// The total task count of `/proc/loadavg` (`0.00 0.01 0.05 1/123 4567` gives 123).
pub fn parse_loadavg_tasks(s: &str) -> Option<u64> {
    s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()
}

/// The machine's hostname (`/proc/sys/kernel/hostname`).
pub fn hostname() -> Result<String, MachineError> {
    Ok(read("/proc/sys/kernel/hostname")?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn meminfo_and_available_memory() {
        let m = parse_meminfo(
            "MemTotal:        8148820 kB\nMemFree:         1000000 kB\nMemAvailable:    5000000 kB\n\
             Inactive(file):  2000000 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(m.mem_total, Some(8_148_820 * 1024));
        let s = memory_stats_from(&m).expect("stats");
        assert_eq!(s.available_bytes, 3_000_000 * 1024);
        assert_eq!(memory_stats_from(&MemInfo::default()), None);
    }

    #[test]
    fn os_release_and_arch() {
        assert_eq!(
            os_pretty_name("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(os_pretty_name("NAME=x\n"), "Linux");
        assert_eq!(go_arch("x86_64"), "amd64");
        assert_eq!(go_arch("aarch64"), "arm64");
        assert_eq!(go_arch("riscv64"), "riscv64");
    }

    #[test]
    fn huge_pages_and_tasks() {
        assert_eq!(parse_huge_page_dir("hugepages-2048kB"), Some(2 << 20));
        assert_eq!(parse_huge_page_dir("hugepages-1048576kB"), Some(1 << 30));
        assert_eq!(parse_huge_page_dir("other"), None);
        assert_eq!(
            parse_loadavg_tasks("0.00 0.01 0.05 1/123 4567\n"),
            Some(123)
        );
        assert_eq!(parse_loadavg_tasks("garbage"), None);
    }

    #[test]
    fn reads_this_machine() {
        let m = MachineInfo::collect().expect("machine info");
        assert!(m.num_cpus >= 1);
        assert!(m.memory_bytes > 0);
        assert_eq!(m.operating_system, "linux");
        let fs = fs_stats(Path::new("/")).expect("statvfs /");
        assert!(fs.capacity_bytes >= fs.available_bytes);
        assert!(pid_stats().expect("pids").max > 0);
        assert!(memory_stats().expect("memory").capacity_bytes > 0);
    }
}
