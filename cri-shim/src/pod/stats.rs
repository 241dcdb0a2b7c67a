//! ContainerStats, ListContainerStats, PodSandboxStats and ListPodSandboxStats: from the
//! cgroups (the container's, and the pod's `cgroup_parent`), the writable layer's usage and
//! the pod interface's counters.

use std::path::Path;
use std::sync::Arc;

use deckhand_proto::cri;

use super::container::state_of;
use super::{Container, Manager, Result, Sandbox, now_ns};
use crate::oci::cgroups;

fn u(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

/// Bytes and inodes used below `dir` (not following symlinks, not crossing mounts).
pub(crate) fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let dev = root.dev();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.dev() != dev {
                continue;
            }
            inodes += 1;
            bytes += md.blocks() * 512;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// The counters of `iface` from `/proc/<pid>/net/dev` (the pid's network namespace).
fn net_dev(pid: i32, iface: &str) -> Option<cri::NetworkInterfaceUsage> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    for line in text.lines().skip(2) {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != iface {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() < 16 {
            return None;
        }
        return Some(cri::NetworkInterfaceUsage {
            name: iface.to_string(),
            rx_bytes: u(f[0]),
            rx_errors: u(f[2]),
            tx_bytes: u(f[8]),
            tx_errors: u(f[10]),
        });
    }
    None
}

impl Manager {
    fn cpu_usage(&self, key: &str, usage_ns: u64, ts: i64) -> cri::CpuUsage {
        let nano_cores = self.cpu_samples.lock().ok().and_then(|mut m| {
            let prev = m.insert(key.to_string(), (ts, usage_ns));
            let (pts, pusage) = prev?;
            let dt = ts.checked_sub(pts).filter(|d| *d > 0)? as u128;
            let du = usage_ns.checked_sub(pusage)? as u128;
            Some((du * 1_000_000_000 / dt) as u64)
        });
        cri::CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: u(usage_ns),
            usage_nano_cores: nano_cores.and_then(u),
        }
    }

    fn memory_usage(&self, m: &cgroups::MemoryStats, ts: i64) -> cri::MemoryUsage {
        cri::MemoryUsage {
            timestamp: ts,
            working_set_bytes: u(m.working_set),
            available_bytes: m.limit.and_then(|l| u(l.saturating_sub(m.working_set))),
            usage_bytes: u(m.usage),
            rss_bytes: u(m.rss),
            page_faults: u(m.pgfault),
            major_page_faults: u(m.pgmajfault),
        }
    }

    fn container_stats_of(&self, c: &Container) -> Option<cri::ContainerStats> {
        let rec = c.rec.lock().ok()?.clone();
        let config = rec.config();
        let ts = now_ns();
        let running =
            state_of(&rec, c.exit.borrow().as_ref()) == cri::ContainerState::ContainerRunning;
        let stats = if running {
            cgroups::Manager::new(&rec.cgroups_path)
                .ok()
                .and_then(|m| m.stats().ok())
        } else {
            None
        };
        let upper = self.images.snapshots().container_dir(&rec.id).join("upper");
        let (bytes, inodes) = disk_usage(&upper);
        Some(cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: rec.id.clone(),
                metadata: config.metadata.clone(),
                labels: config.labels.clone(),
                annotations: config.annotations.clone(),
            }),
            cpu: stats
                .as_ref()
                .map(|s| self.cpu_usage(&rec.id, s.cpu.usage_ns, ts)),
            memory: stats.as_ref().map(|s| self.memory_usage(&s.memory, ts)),
            writable_layer: Some(cri::FilesystemUsage {
                timestamp: ts,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: self.images.root().display().to_string(),
                }),
                used_bytes: u(bytes),
                inodes_used: u(inodes),
            }),
            swap: None,
        })
    }

    /// ContainerStats.
    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        let c = self.container(id)?;
        Ok(self.container_stats_of(&c).unwrap_or_default())
    }

    /// ListContainerStats.
    pub fn list_container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Result<Vec<cri::ContainerStats>> {
        let f = filter.unwrap_or_default();
        let list = self.list_containers(Some(cri::ContainerFilter {
            id: f.id,
            state: None,
            pod_sandbox_id: f.pod_sandbox_id,
            label_selector: f.label_selector,
        }))?;
        Ok(list
            .iter()
            .filter_map(|c| self.container(&c.id).ok())
            .filter_map(|c| self.container_stats_of(&c))
            .collect())
    }

    fn sandbox_stats_of(&self, sb: &Sandbox) -> Option<cri::PodSandboxStats> {
        let rec = sb.rec.lock().ok()?.clone();
        let config = rec.config();
        let ts = now_ns();
        let containers: Vec<Arc<Container>> = self.containers_of(&rec.id);
        let cstats: Vec<cri::ContainerStats> = containers
            .iter()
            .filter(|c| {
                c.rec.lock().is_ok_and(|r| {
                    state_of(&r, c.exit.borrow().as_ref()) == cri::ContainerState::ContainerRunning
                })
            })
            .filter_map(|c| self.container_stats_of(c))
            .collect();
        let parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .filter(|p| !p.is_empty());
        let pod = parent
            .as_deref()
            .and_then(|p| cgroups::Manager::new(p).ok())
            .and_then(|m| m.stats().ok());
        let (cpu, memory, procs) = match &pod {
            Some(s) => (
                Some(self.cpu_usage(&format!("pod-{}", rec.id), s.cpu.usage_ns, ts)),
                Some(self.memory_usage(&s.memory, ts)),
                s.pids.current,
            ),
            None => {
                // No pod cgroup: the sum of the containers'.
                let sum =
                    |f: &dyn Fn(&cri::ContainerStats) -> u64| cstats.iter().map(f).sum::<u64>();
                (
                    Some(cri::CpuUsage {
                        timestamp: ts,
                        usage_core_nano_seconds: u(sum(&|c| {
                            c.cpu
                                .as_ref()
                                .and_then(|x| x.usage_core_nano_seconds)
                                .map_or(0, |v| v.value)
                        })),
                        usage_nano_cores: u(sum(&|c| {
                            c.cpu
                                .as_ref()
                                .and_then(|x| x.usage_nano_cores)
                                .map_or(0, |v| v.value)
                        })),
                    }),
                    Some(cri::MemoryUsage {
                        timestamp: ts,
                        working_set_bytes: u(sum(&|c| {
                            c.memory
                                .as_ref()
                                .and_then(|x| x.working_set_bytes)
                                .map_or(0, |v| v.value)
                        })),
                        ..Default::default()
                    }),
                    0,
                )
            }
        };
        let pid = containers
            .iter()
            .filter_map(|c| c.rec.lock().ok().map(|r| r.init_pid))
            .find(|p| *p > 0 && std::path::Path::new(&format!("/proc/{p}")).exists());
        let network = match (pid, &rec.netns) {
            (Some(pid), Some(_)) => net_dev(pid, &self.cfg.cni_ifname).map(|i| cri::NetworkUsage {
                timestamp: ts,
                default_interface: Some(i.clone()),
                interfaces: vec![i],
            }),
            _ => None,
        };
        Some(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: rec.id.clone(),
                metadata: config.metadata.clone(),
                labels: config.labels.clone(),
                annotations: config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu,
                memory,
                network,
                process: Some(cri::ProcessUsage {
                    timestamp: ts,
                    process_count: u(procs),
                }),
                containers: cstats,
            }),
            windows: None,
        })
    }

    /// PodSandboxStats.
    pub fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats> {
        let sb = self.sandbox(id)?;
        Ok(self.sandbox_stats_of(&sb).unwrap_or_default())
    }

    /// ListPodSandboxStats.
    pub fn list_pod_sandbox_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Result<Vec<cri::PodSandboxStats>> {
        let f = filter.unwrap_or_default();
        let all = self.all_sandboxes()?;
        Ok(all
            .iter()
            .filter(|sb| {
                sb.rec.lock().is_ok_and(|r| {
                    (f.id.is_empty() || r.id.starts_with(&f.id))
                        && super::labels_match(&r.config().labels, &f.label_selector)
                })
            })
            .filter_map(|sb| self.sandbox_stats_of(sb))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_tree() -> std::io::Result<()> {
        let t = tempfile::tempdir()?;
        std::fs::create_dir(t.path().join("d"))?;
        std::fs::write(t.path().join("d/f"), vec![1u8; 10_000])?;
        std::os::unix::fs::symlink("/etc", t.path().join("l"))?;
        let (b, i) = disk_usage(t.path());
        assert_eq!(i, 3);
        assert!(b >= 10_000, "{b}");
        Ok(())
    }
}
