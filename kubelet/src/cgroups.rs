//! The kubelet's cgroup hierarchy, as upstream's cgroupfs driver with `cgroupsPerQOS`:
//!
//! ```text
//! <cgroupRoot>/kubepods                   node allocatable (enforceNodeAllocatable: pods)
//! <cgroupRoot>/kubepods/pod<uid>          Guaranteed pods
//! <cgroupRoot>/kubepods/burstable         cpu shares = the Burstable pods' cpu requests
//! <cgroupRoot>/kubepods/burstable/pod<uid>
//! <cgroupRoot>/kubepods/besteffort        cpu shares 2
//! <cgroupRoot>/kubepods/besteffort/pod<uid>
//! ```
//!
//! [`PodCgroups::start`] creates the node allocatable and QoS cgroups in every hierarchy
//! (deckhand-cgroups: v1, v2 or hybrid) and sizes `kubepods` from capacity minus
//! `systemReserved` and `kubeReserved` ([`resources::allocatable_for_enforcement`]); it also
//! applies the reservations to `systemReservedCgroup`/`kubeReservedCgroup` when
//! `enforceNodeAllocatable` names them. The kubelet runs it again every minute, as upstream's
//! QoS container manager does. [`PodCgroups::ensure_pod`] makes a pod's cgroup with upstream's
//! pod-level limits ([`resources::pod_cgroup_resources`]) before its sandbox; the runtime puts
//! the sandbox and containers beneath it. [`PodCgroups::remove_pod`] removes it after the pod's
//! sandboxes are gone. Both keep the burstable shares in step with the pods.
//!
//! Every cgroupfs write is plain blocking I/O and runs on tokio's blocking pool, one at a time
//! (an internal lock); each operation carries a sequence number per pod so that a later one
//! (an ensure after a remove of the same UID, or the reverse) is never undone by an earlier one
//! that ran late. Nothing here is state that cannot be rebuilt: after a restart the workers
//! ensure their pods again and the shares follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use deckhand_cgroups::{Layout, Manager};
use k8s_openapi::api::core::v1::Pod;
use oci_spec::runtime::{LinuxCpu, LinuxHugepageLimit, LinuxMemory, LinuxPids, LinuxResources};

use crate::config::{CgroupDriver, KubeletConfiguration};
use crate::pods::spec;
use crate::resources::{self, CgroupResources, ResourceList};

/// `kubepods`: the node allocatable cgroup under `cgroupRoot`.
pub const NODE_ALLOCATABLE_CGROUP: &str = "kubepods";

/// An error of the kubelet's cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup operation failed.
    #[error("cgroup {name}: {source}")]
    Cgroup {
        /// The cgroup.
        name: String,
        /// The error.
        #[source]
        source: deckhand_cgroups::Error,
    },
    /// The configuration cannot be enforced here.
    #[error("{0}")]
    Invalid(String),
    /// The blocking task did not finish.
    #[error("cgroup task: {0}")]
    Task(String),
}

fn cg_err(name: &str) -> impl FnOnce(deckhand_cgroups::Error) -> CgroupError + '_ {
    move |source| CgroupError::Cgroup {
        name: name.to_string(),
        source,
    }
}

/// What the configuration asks of the cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `cgroupRoot`, normalised (`/` or `/a/b`).
    pub root: String,
    /// `cgroupsPerQOS`.
    pub per_qos: bool,
    /// `enforceNodeAllocatable` has `pods`.
    pub enforce_pods: bool,
    /// `systemReserved`.
    pub system_reserved: ResourceList,
    /// `kubeReserved`.
    pub kube_reserved: ResourceList,
    /// `systemReservedCgroup`, when `enforceNodeAllocatable` has `system-reserved`.
    pub system_reserved_cgroup: Option<String>,
    /// `kubeReservedCgroup`, when `enforceNodeAllocatable` has `kube-reserved`.
    pub kube_reserved_cgroup: Option<String>,
    /// `podPidsLimit` (≤ 0: none).
    pub pod_pids_limit: i64,
    /// `cgroupDriver`.
    pub driver: CgroupDriver,
}

impl Settings {
    /// The settings of a (validated) configuration.
    pub fn from_config(kc: &KubeletConfiguration) -> Settings {
        let has = |k: &str| kc.enforce_node_allocatable.iter().any(|v| v == k);
        Settings {
            root: kc.cgroup_root.clone(),
            per_qos: kc.cgroups_per_qos,
            enforce_pods: has("pods"),
            system_reserved: kc.system_reserved.clone(),
            kube_reserved: kc.kube_reserved.clone(),
            system_reserved_cgroup: has("system-reserved")
                .then(|| kc.system_reserved_cgroup.clone()),
            kube_reserved_cgroup: has("kube-reserved").then(|| kc.kube_reserved_cgroup.clone()),
            pod_pids_limit: kc.pod_pids_limit,
            driver: kc.cgroup_driver,
        }
    }

    /// `<cgroupRoot>/kubepods`.
    pub fn node_allocatable(&self) -> String {
        join(&self.root, NODE_ALLOCATABLE_CGROUP)
    }

    /// The QoS cgroups: (`kubepods/burstable`, `kubepods/besteffort`).
    pub fn qos(&self) -> (String, String) {
        let k = self.node_allocatable();
        (join(&k, "burstable"), join(&k, "besteffort"))
    }
}

fn join(parent: &str, child: &str) -> String {
    format!("{}/{child}", parent.trim_end_matches('/'))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    name: String,
    burstable_cpu_millis: i128,
    resources: CgroupResources,
}

#[derive(Debug, Default)]
struct State {
    /// Pod cgroups made (by UID).
    pods: HashMap<String, PodEntry>,
    /// The latest operation asked for per pod, until it ran.
    pending: HashMap<String, u64>,
    seq: u64,
    /// The burstable shares last written.
    burstable_shares: Option<u64>,
}

/// The node allocatable, QoS and pod cgroups (see the module docs).
#[derive(Debug)]
pub struct PodCgroups {
    settings: Settings,
    layout: Option<Layout>,
    /// The `kubepods` settings.
    node: CgroupResources,
    /// The node's huge page sizes (bytes).
    page_sizes: Vec<u64>,
    state: Mutex<State>,
    io: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The kernel's name of a huge page size (`2MB`, `1GB`), as the hugetlb files spell it.
pub fn huge_page_size_name(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let (mut v, mut i) = (bytes, 0);
    while v >= 1024 && v % 1024 == 0 && i + 1 < UNITS.len() {
        v /= 1024;
        i += 1;
    }
    format!("{v}{}", UNITS[i])
}

/// The settings as OCI `linux.resources` for deckhand-cgroups.
pub fn linux_resources(r: &CgroupResources) -> LinuxResources {
    let mut out = LinuxResources::default();
    if r.cpu_shares.is_some() || r.cpu_quota.is_some() || r.cpu_period.is_some() {
        let mut cpu = LinuxCpu::default();
        cpu.set_shares(r.cpu_shares)
            .set_quota(r.cpu_quota)
            .set_period(r.cpu_period);
        out.set_cpu(Some(cpu));
    }
    if let Some(m) = r.memory {
        let mut mem = LinuxMemory::default();
        mem.set_limit(Some(m));
        out.set_memory(Some(mem));
    }
    if let Some(p) = r.pids {
        let mut pids = LinuxPids::default();
        pids.set_limit(p);
        out.set_pids(Some(pids));
    }
    if !r.huge_pages.is_empty() {
        let limits = r
            .huge_pages
            .iter()
            .map(|(size, limit)| {
                let mut l = LinuxHugepageLimit::default();
                l.set_page_size(huge_page_size_name(*size))
                    .set_limit(*limit);
                l
            })
            .collect();
        out.set_hugepage_limits(Some(limits));
    }
    out
}

impl PodCgroups {
    /// The manager for this host's hierarchies. `capacity` is the node's capacity,
    /// `max_pids` the smaller of `pid_max` and `threads-max`. With `cgroupsPerQOS` false it
    /// manages nothing: pods go directly under `cgroupRoot`, as upstream.
    pub fn new(
        settings: Settings,
        capacity: &ResourceList,
        max_pids: Option<u64>,
        page_sizes: Vec<u64>,
    ) -> Result<PodCgroups, CgroupError> {
        let layout = if settings.per_qos {
            if settings.driver == CgroupDriver::Systemd {
                return Err(CgroupError::Invalid(
                    "cgroupDriver systemd is not supported with cgroupsPerQOS; use cgroupfs".into(),
                ));
            }
            Some(Layout::detect().map_err(cg_err("/"))?)
        } else {
            None
        };
        Ok(Self::with_layout(
            settings, layout, capacity, max_pids, page_sizes,
        ))
    }

    /// As [`PodCgroups::new`] on a given layout (a fake tree in tests); `None` manages nothing.
    pub fn with_layout(
        settings: Settings,
        layout: Option<Layout>,
        capacity: &ResourceList,
        max_pids: Option<u64>,
        page_sizes: Vec<u64>,
    ) -> PodCgroups {
        let internal = resources::internal_capacity(capacity, max_pids);
        // Upstream sizes kubepods from the capacity when allocatable is not enforced: the
        // default cpu shares would starve the pods.
        let node = if settings.enforce_pods {
            resources::allocatable_for_enforcement(
                &internal,
                &settings.system_reserved,
                &settings.kube_reserved,
            )
        } else {
            internal
        };
        PodCgroups {
            node: resources::cgroup_resources(&node),
            settings,
            layout,
            page_sizes,
            state: Mutex::default(),
            io: Mutex::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What `kubepods` is given.
    pub fn node_allocatable(&self) -> &CgroupResources {
        &self.node
    }

    /// The pod's cgroup, its sandbox's cgroup parent.
    pub fn pod_cgroup(&self, pod: &Pod) -> String {
        spec::cgroup_parent(pod, &self.settings.root, self.settings.per_qos)
    }

    fn manager(&self, name: &str) -> Result<Option<Manager>, CgroupError> {
        match &self.layout {
            Some(l) => Ok(Some(
                Manager::with_layout(l.clone(), name).map_err(cg_err(name))?,
            )),
            None => Ok(None),
        }
    }

    fn apply(&self, name: &str, r: &CgroupResources) -> Result<(), CgroupError> {
        let Some(m) = self.manager(name)? else {
            return Ok(());
        };
        m.create().map_err(cg_err(name))?;
        for w in m.set(&linux_resources(r)).map_err(cg_err(name))? {
            tracing::debug!(cgroup = name, "{w}");
        }
        Ok(())
    }

    /// Creates (or updates) the node allocatable and QoS cgroups and enforces the reserved
    /// cgroups. Blocking; idempotent. `cgroupRoot` must exist (as upstream).
    pub fn start(&self) -> Result<(), CgroupError> {
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        let _io = lock(&self.io);
        if self.settings.root != "/" {
            let m = Manager::with_layout(layout.clone(), &self.settings.root)
                .map_err(cg_err(&self.settings.root))?;
            let missing: Vec<String> = m
                .v1_dirs()
                .map(|(_, d)| d)
                .chain(m.unified_dir())
                .filter(|d| !d.is_dir())
                .map(|d| d.display().to_string())
                .collect();
            if !missing.is_empty() {
                return Err(CgroupError::Invalid(format!(
                    "cgroupRoot {:?} does not exist ({})",
                    self.settings.root,
                    missing.join(", ")
                )));
            }
        }
        let kubepods = self.settings.node_allocatable();
        self.apply(&kubepods, &self.node)?;
        // The QoS tiers do not limit huge pages (kubepods and the pods do).
        let unlimited = self.page_sizes.iter().map(|s| (*s, -1)).collect();
        let (burstable, besteffort) = self.settings.qos();
        self.apply(
            &besteffort,
            &CgroupResources {
                cpu_shares: Some(resources::MIN_SHARES),
                huge_pages: unlimited,
                ..Default::default()
            },
        )?;
        let unlimited = self.page_sizes.iter().map(|s| (*s, -1)).collect();
        self.apply(
            &burstable,
            &CgroupResources {
                huge_pages: unlimited,
                ..Default::default()
            },
        )?;
        lock(&self.state).burstable_shares = None;
        self.update_burstable()?;
        let s = &self.settings;
        for (cgroup, reserved) in [
            (&s.system_reserved_cgroup, &s.system_reserved),
            (&s.kube_reserved_cgroup, &s.kube_reserved),
        ] {
            let Some(cgroup) = cgroup else { continue };
            // Upstream's enforceExistingCgroup: the cgroup must exist; cpu shares, memory and
            // pids from the reservation.
            let m = Manager::with_layout(layout.clone(), cgroup).map_err(cg_err(cgroup))?;
            if !m.exists() {
                return Err(CgroupError::Invalid(format!(
                    "the reserved cgroup {cgroup:?} does not exist"
                )));
            }
            let mut r = resources::cgroup_resources(reserved);
            r.huge_pages.clear();
            m.set(&linux_resources(&r)).map_err(cg_err(cgroup))?;
        }
        Ok(())
    }

    /// Writes the burstable shares if the pods' requests changed. With the io lock held.
    fn update_burstable(&self) -> Result<(), CgroupError> {
        let shares = {
            let st = lock(&self.state);
            let millis: i128 = st.pods.values().map(|p| p.burstable_cpu_millis).sum();
            let shares = resources::milli_cpu_to_shares(millis);
            if st.burstable_shares == Some(shares) {
                return Ok(());
            }
            shares
        };
        let (burstable, _) = self.settings.qos();
        if let Some(m) = self.manager(&burstable)? {
            let r = CgroupResources {
                cpu_shares: Some(shares),
                ..Default::default()
            };
            m.create().map_err(cg_err(&burstable))?;
            m.set(&linux_resources(&r)).map_err(cg_err(&burstable))?;
        }
        lock(&self.state).burstable_shares = Some(shares);
        Ok(())
    }

    fn schedule(&self, uid: &str) -> u64 {
        let mut st = lock(&self.state);
        st.seq += 1;
        let seq = st.seq;
        st.pending.insert(uid.to_string(), seq);
        seq
    }

    /// Whether `seq` is still the latest operation on `uid`.
    fn current(&self, uid: &str, seq: u64) -> bool {
        lock(&self.state).pending.get(uid) == Some(&seq)
    }

    fn finish(&self, uid: &str, seq: u64, entry: Option<PodEntry>) {
        let mut st = lock(&self.state);
        if st.pending.get(uid) == Some(&seq) {
            st.pending.remove(uid);
        }
        match entry {
            Some(e) => st.pods.insert(uid.to_string(), e),
            None => st.pods.remove(uid),
        };
    }

    fn entry(&self, pod: &Pod) -> PodEntry {
        let qos = spec::qos_class(pod);
        PodEntry {
            name: self.pod_cgroup(pod),
            burstable_cpu_millis: if qos == "Burstable" {
                resources::pod_requests(pod)
                    .get(resources::CPU)
                    .map_or(0, |a| a.millis())
            } else {
                0
            },
            resources: resources::pod_cgroup_resources(
                pod,
                qos,
                self.settings.pod_pids_limit,
                &self.page_sizes,
            ),
        }
    }

    /// Creates the pod's cgroup with its pod-level limits (blocking). Nothing to do when it
    /// was already made with the same settings.
    pub async fn ensure_pod(self: &Arc<Self>, pod: &Pod) -> Result<(), CgroupError> {
        if self.layout.is_none() {
            return Ok(());
        }
        let uid = spec::ids(pod).2.to_string();
        let entry = self.entry(pod);
        {
            let st = lock(&self.state);
            if !st.pending.contains_key(&uid) && st.pods.get(&uid) == Some(&entry) {
                return Ok(());
            }
        }
        let seq = self.schedule(&uid);
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.ensure_blocking(&uid, seq, entry))
            .await
            .map_err(|e| CgroupError::Task(e.to_string()))?
    }

    fn ensure_blocking(&self, uid: &str, seq: u64, entry: PodEntry) -> Result<(), CgroupError> {
        let _io = lock(&self.io);
        if !self.current(uid, seq) {
            return Ok(()); // a later ensure or remove of the same pod decides
        }
        let r = self.apply(&entry.name, &entry.resources);
        if let Err(e) = r {
            let mut st = lock(&self.state);
            if st.pending.get(uid) == Some(&seq) {
                st.pending.remove(uid);
            }
            return Err(e);
        }
        tracing::debug!(pod_uid = uid, cgroup = %entry.name, resources = ?entry.resources, "pod cgroup");
        self.finish(uid, seq, Some(entry));
        self.update_burstable()
    }

    /// The pod has finished (Succeeded or Failed): its cgroup stays until [`Self::remove_pod`],
    /// but its cpu requests leave the burstable shares, as upstream's QoS manager counts only
    /// the active pods. On the blocking pool.
    pub fn pod_finished(self: &Arc<Self>, uid: &str) -> tokio::task::JoinHandle<()> {
        let uid = uid.to_string();
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if me.layout.is_none() {
                return;
            }
            let _io = lock(&me.io);
            match lock(&me.state).pods.get_mut(&uid) {
                Some(e) if e.burstable_cpu_millis != 0 => e.burstable_cpu_millis = 0,
                _ => return,
            }
            if let Err(e) = me.update_burstable() {
                tracing::warn!("updating the burstable QoS cgroup: {e}");
            }
        })
    }

    /// Removes the pod's cgroup (killing what is left in it) on the blocking pool, then
    /// updates the burstable shares. Call it once the pod's sandboxes are gone.
    pub fn remove_pod(self: &Arc<Self>, pod: &Pod) -> tokio::task::JoinHandle<()> {
        let uid = spec::ids(pod).2.to_string();
        let name = self.pod_cgroup(pod);
        let seq = self.schedule(&uid);
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if me.layout.is_none() {
                return;
            }
            let _io = lock(&me.io);
            if !me.current(&uid, seq) {
                return;
            }
            let removed = me
                .manager(&name)
                .and_then(|m| m.map_or(Ok(()), |m| m.destroy(true).map_err(cg_err(&name))));
            if let Err(e) = removed {
                tracing::warn!(pod_uid = %uid, "removing the pod cgroup: {e}");
            }
            me.finish(&uid, seq, None);
            if let Err(e) = me.update_burstable() {
                tracing::warn!("updating the burstable QoS cgroup: {e}");
            }
        })
    }

    /// Removes the pod cgroups below `kubepods` and the QoS cgroups whose UID is not in
    /// `active` and which this kubelet has no operation on: pods deleted while it was down
    /// (upstream's `cleanupOrphanedPodCgroups`). Unlike upstream, a cgroup that still holds
    /// processes is left alone (logged): its pod may belong to another kubelet sharing the
    /// `cgroupRoot`, and orphaned sandboxes are removed through the runtime first anyway.
    /// Blocking work, on the blocking pool.
    pub fn remove_orphans(
        self: &Arc<Self>,
        active: std::collections::HashSet<String>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if me.layout.is_none() {
                return;
            }
            let (burstable, besteffort) = me.settings.qos();
            let mut found = std::collections::BTreeMap::new();
            for parent in [me.settings.node_allocatable(), burstable, besteffort] {
                let Ok(Some(m)) = me.manager(&parent) else {
                    continue;
                };
                let dirs = m
                    .unified_dir()
                    .into_iter()
                    .chain(m.v1_dirs().map(|(_, d)| d));
                for dir in dirs {
                    let Ok(entries) = std::fs::read_dir(dir) else {
                        continue;
                    };
                    for e in entries.flatten() {
                        let name = e.file_name();
                        let Some(uid) = name.to_str().and_then(|n| n.strip_prefix("pod")) else {
                            continue;
                        };
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            found.insert(uid.to_string(), join(&parent, &format!("pod{uid}")));
                        }
                    }
                }
            }
            let _io = lock(&me.io);
            let mut removed = false;
            for (uid, name) in found {
                if active.contains(&uid) {
                    continue;
                }
                {
                    let st = lock(&me.state);
                    if st.pending.contains_key(&uid) || st.pods.contains_key(&uid) {
                        continue;
                    }
                }
                let Ok(Some(m)) = me.manager(&name) else {
                    continue;
                };
                match m.destroy(false) {
                    Ok(()) => {
                        tracing::info!(pod_uid = %uid, cgroup = %name, "removed an orphaned pod cgroup");
                        removed = true;
                    }
                    Err(deckhand_cgroups::Error::NotEmpty(..)) => {
                        tracing::debug!(pod_uid = %uid, cgroup = %name, "an unknown pod cgroup still has processes: left alone");
                    }
                    Err(e) => {
                        tracing::warn!(pod_uid = %uid, cgroup = %name, "removing an orphaned pod cgroup: {e}")
                    }
                }
            }
            if removed && let Err(e) = me.update_burstable() {
                tracing::warn!("updating the burstable QoS cgroup: {e}");
            }
        })
    }

    /// The burstable shares last written (for tests and logs).
    pub fn burstable_shares(&self) -> Option<u64> {
        lock(&self.state).burstable_shares
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::quantity::{Amount, Format};

    const FILES: &[&str] = &[
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.controllers",
        "cpu.weight",
        "cpu.max",
        "memory.max",
        "pids.max",
        "hugetlb.2MB.max",
    ];

    fn read(dir: &Path, f: &str) -> String {
        fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()))
    }

    /// A fake cgroup2 tree with the kubelet's directories and their files (cgroupfs creates
    /// them on mkdir; plain directories do not).
    fn fake_v2(dirs: &[&str]) -> (tempfile::TempDir, Layout) {
        let root = tempfile::tempdir().expect("tmp");
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids\n",
        )
        .expect("w");
        fs::write(root.path().join("cgroup.subtree_control"), "").expect("w");
        for d in dirs {
            let d = root.path().join(d);
            fs::create_dir_all(&d).expect("mkdir");
            for f in FILES {
                fs::write(d.join(f), "").expect("touch");
            }
        }
        let layout = Layout::v2(root.path()).expect("layout");
        (root, layout)
    }

    fn settings(root: &str) -> Settings {
        let mut kc = KubeletConfiguration {
            cgroup_root: root.into(),
            pod_pids_limit: 64,
            ..Default::default()
        };
        kc.system_reserved.insert(
            "memory".into(),
            Amount::from_units(100 << 20, Format::BinarySi),
        );
        kc.kube_reserved
            .insert("cpu".into(), Amount::from_millis(500, Format::DecimalSi));
        Settings::from_config(&kc)
    }

    fn capacity() -> ResourceList {
        ResourceList::from([
            ("cpu".into(), Amount::from_units(2, Format::DecimalSi)),
            (
                "memory".into(),
                Amount::from_units(1 << 30, Format::BinarySi),
            ),
            (
                "hugepages-2Mi".into(),
                Amount::from_units(8 << 20, Format::BinarySi),
            ),
            ("pods".into(), Amount::from_units(110, Format::DecimalSi)),
        ])
    }

    fn pod(uid: &str, res: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": uid},
            "spec": {"containers": [{"name": "c", "resources": res}]}
        }))
        .expect("pod")
    }

    #[test]
    fn names_and_conversions() {
        assert_eq!(huge_page_size_name(2 << 20), "2MB");
        assert_eq!(huge_page_size_name(1 << 30), "1GB");
        assert_eq!(huge_page_size_name(64 << 10), "64KB");
        let s = settings("/dh/r");
        assert_eq!(s.node_allocatable(), "/dh/r/kubepods");
        assert_eq!(
            s.qos(),
            (
                "/dh/r/kubepods/burstable".into(),
                "/dh/r/kubepods/besteffort".into()
            )
        );
        assert_eq!(settings("/").node_allocatable(), "/kubepods");
        let r = linux_resources(&CgroupResources {
            cpu_shares: Some(512),
            memory: Some(1 << 20),
            pids: Some(5),
            huge_pages: [(2 << 20, -1)].into(),
            ..Default::default()
        });
        assert_eq!(r.cpu().as_ref().and_then(|c| c.shares()), Some(512));
        assert_eq!(r.cpu().as_ref().and_then(|c| c.quota()), None);
        assert_eq!(r.memory().as_ref().and_then(|m| m.limit()), Some(1 << 20));
        assert_eq!(r.pids().as_ref().map(|p| p.limit()), Some(5));
        let h = r.hugepage_limits().clone().unwrap_or_default();
        assert_eq!((h[0].page_size().as_str(), h[0].limit()), ("2MB", -1));
    }

    #[tokio::test]
    async fn v2_tree_gets_allocatable_qos_and_pod_limits() {
        let (g, b) = ("g1", "b1");
        let (tmp, layout) = fake_v2(&[
            "dh/r",
            "dh/r/kubepods",
            "dh/r/kubepods/burstable",
            "dh/r/kubepods/besteffort",
            "dh/r/kubepods/podg1",
            "dh/r/kubepods/burstable/podb1",
        ]);
        let pc = Arc::new(PodCgroups::with_layout(
            settings("/dh/r"),
            Some(layout),
            &capacity(),
            Some(4096),
            vec![2 << 20],
        ));
        pc.start().expect("start");
        let k = tmp.path().join("dh/r/kubepods");
        // capacity - systemReserved - kubeReserved; shares → weight by deckhand-cgroups.
        assert_eq!(
            read(&k, "memory.max"),
            ((1u64 << 30) - (100 << 20)).to_string()
        );
        let shares = resources::milli_cpu_to_shares(1500);
        assert_eq!(
            read(&k, "cpu.weight"),
            deckhand_cgroups::convert::shares_to_weight(shares).to_string()
        );
        assert_eq!(read(&k, "pids.max"), "4096");
        assert_eq!(read(&k, "hugetlb.2MB.max"), (8u64 << 20).to_string());
        assert_eq!(read(&k.join("besteffort"), "cpu.weight"), "1");
        assert_eq!(read(&k.join("besteffort"), "hugetlb.2MB.max"), "max");
        assert_eq!(read(&k.join("burstable"), "cpu.weight"), "1");
        assert_eq!(pc.burstable_shares(), Some(2));

        let gp = pod(
            g,
            serde_json::json!({"limits": {"cpu": "500m", "memory": "64Mi"}}),
        );
        pc.ensure_pod(&gp).await.expect("guaranteed");
        let gd = k.join("podg1");
        assert_eq!(read(&gd, "cpu.max"), "50000 100000");
        assert_eq!(read(&gd, "memory.max"), (64u64 << 20).to_string());
        assert_eq!(read(&gd, "pids.max"), "64");
        assert_eq!(read(&gd, "hugetlb.2MB.max"), "0");
        assert_eq!(
            read(&gd, "cpu.weight"),
            deckhand_cgroups::convert::shares_to_weight(512).to_string()
        );
        let bp = pod(b, serde_json::json!({"requests": {"cpu": "1500m"}}));
        pc.ensure_pod(&bp).await.expect("burstable");
        assert_eq!(pc.burstable_shares(), Some(1536));
        assert_eq!(
            read(&k.join("burstable"), "cpu.weight"),
            deckhand_cgroups::convert::shares_to_weight(1536).to_string()
        );
        let bd = k.join("burstable/podb1");
        assert_eq!(read(&bd, "cpu.max"), "", "no cpu limit: no quota");
        assert_eq!(read(&bd, "memory.max"), "");
        // Ensuring again with the same pod does nothing.
        fs::write(bd.join("pids.max"), "changed").expect("w");
        pc.ensure_pod(&bp).await.expect("again");
        assert_eq!(read(&bd, "pids.max"), "changed");

        // A finished pod keeps its cgroup but leaves the shares; ensured again, it counts.
        pc.pod_finished(b).await.expect("join");
        assert_eq!(pc.burstable_shares(), Some(2));
        assert_eq!(read(&k.join("burstable"), "cpu.weight"), "1");
        assert_eq!(read(&bd, "pids.max"), "changed", "the pod's cgroup is kept");
        pc.pod_finished(g)
            .await
            .expect("a Guaranteed pod: nothing to do");
        assert_eq!(pc.burstable_shares(), Some(2));
        pc.ensure_pod(&bp).await.expect("active again");
        assert_eq!(pc.burstable_shares(), Some(1536));

        // Removal: the fake directories hold files, so the rmdir fails (logged); the pod
        // leaves the burstable shares either way.
        pc.remove_pod(&bp).await.expect("join");
        assert_eq!(pc.burstable_shares(), Some(2));
        assert_eq!(read(&k.join("burstable"), "cpu.weight"), "1");
        // A removal scheduled before an ensure of the same UID never undoes it.
        let removal = pc.remove_pod(&bp);
        pc.ensure_pod(&bp).await.expect("back");
        removal.await.expect("join");
        assert_eq!(pc.burstable_shares(), Some(1536));
    }

    #[test]
    fn reserved_cgroups_are_enforced_when_asked() {
        let (tmp, layout) = fake_v2(&[
            "kubepods",
            "kubepods/burstable",
            "kubepods/besteffort",
            "dh-system",
            "dh-kube",
        ]);
        let mut s = settings("/");
        s.system_reserved_cgroup = Some("/dh-system".into());
        s.kube_reserved_cgroup = Some("/dh-kube".into());
        let pc =
            PodCgroups::with_layout(s.clone(), Some(layout.clone()), &capacity(), None, vec![]);
        pc.start().expect("start");
        assert_eq!(
            read(&tmp.path().join("dh-system"), "memory.max"),
            (100u64 << 20).to_string()
        );
        assert_eq!(read(&tmp.path().join("dh-system"), "cpu.weight"), "");
        assert_eq!(
            read(&tmp.path().join("dh-kube"), "cpu.weight"),
            deckhand_cgroups::convert::shares_to_weight(512).to_string()
        );
        assert_eq!(read(&tmp.path().join("dh-kube"), "memory.max"), "");
        // Not enforced: upstream leaves them alone.
        let (tmp2, layout2) = fake_v2(&[
            "kubepods",
            "kubepods/burstable",
            "kubepods/besteffort",
            "dh-kube",
        ]);
        let pc = PodCgroups::with_layout(settings("/"), Some(layout2), &capacity(), None, vec![]);
        pc.start().expect("start");
        assert_eq!(read(&tmp2.path().join("dh-kube"), "cpu.weight"), "");
        // A reserved cgroup must exist.
        s.kube_reserved_cgroup = Some("/dh-absent".into());
        let pc = PodCgroups::with_layout(s, Some(layout), &capacity(), None, vec![]);
        let e = pc.start().expect_err("absent").to_string();
        assert!(e.contains("\"/dh-absent\" does not exist"), "{e}");
    }

    #[test]
    fn missing_root_and_no_qos() {
        let (_tmp, layout) = fake_v2(&[]);
        let pc = PodCgroups::with_layout(
            settings("/dh-missing"),
            Some(layout),
            &capacity(),
            None,
            vec![],
        );
        let e = pc.start().expect_err("missing root").to_string();
        assert!(
            e.contains("cgroupRoot \"/dh-missing\" does not exist"),
            "{e}"
        );
        let mut s = settings("/dh/r");
        s.per_qos = false;
        let pc = PodCgroups::with_layout(s, None, &capacity(), None, vec![]);
        pc.start().expect("nothing to do");
        let p = pod("x", serde_json::json!({}));
        assert_eq!(pc.pod_cgroup(&p), "/dh/r");
    }
}
