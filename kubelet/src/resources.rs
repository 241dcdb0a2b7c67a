//! Node capacity and allocatable, computed as upstream's kubelet does.
//!
//! Capacity: `cpu` (logical CPUs), `memory` (`MemTotal`), `ephemeral-storage` (size of the root
//! dir's filesystem), `hugepages-<size>` (each pool) and `pods` (`maxPods`, or `podsPerCore` x CPUs
//! when smaller). Allocatable: capacity minus `systemReserved`, `kubeReserved` and the hard
//! eviction thresholds for `memory.available` (from memory) and `nodefs.available` (from
//! ephemeral-storage), clamped at zero; memory allocatable also loses every huge page pool.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::eviction::{Signal, Threshold};
use crate::machine::{FsStats, MachineInfo};
use crate::quantity::{self, Amount, Format};

/// Resource name to amount, ordered as the API server orders map keys.
pub type ResourceList = BTreeMap<String, Amount>;

/// `cpu`.
pub const CPU: &str = "cpu";
/// `memory`.
pub const MEMORY: &str = "memory";
/// `ephemeral-storage`.
pub const EPHEMERAL_STORAGE: &str = "ephemeral-storage";
/// `pods`.
pub const PODS: &str = "pods";
/// `pid` (reservable, not a capacity).
pub const PID: &str = "pid";
/// Prefix of huge page resources (`hugepages-2Mi`).
pub const HUGEPAGES_PREFIX: &str = "hugepages-";

/// The resources `systemReserved` and `kubeReserved` may name (upstream `ParseResourceList`).
pub const RESERVABLE: [&str; 4] = [CPU, MEMORY, EPHEMERAL_STORAGE, PID];

/// An invalid reservation.
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    /// The resource cannot be reserved.
    #[error("cannot reserve {0:?} resource")]
    Unsupported(String),
    /// The quantity does not parse.
    #[error("reservation of {name}: {source}")]
    Quantity {
        /// The resource.
        name: String,
        /// The parse error.
        #[source]
        source: quantity::QuantityError,
    },
    /// The quantity is negative.
    #[error("reservation of {0} is negative")]
    Negative(String),
}

/// Parses a `systemReserved`/`kubeReserved` map.
pub fn parse_reservation(map: &BTreeMap<String, String>) -> Result<ResourceList, ReservationError> {
    let mut out = ResourceList::new();
    for (name, value) in map {
        if !RESERVABLE.contains(&name.as_str()) {
            return Err(ReservationError::Unsupported(name.clone()));
        }
        let a = quantity::parse(value).map_err(|source| ReservationError::Quantity {
            name: name.clone(),
            source,
        })?;
        if a.is_negative() {
            return Err(ReservationError::Negative(name.clone()));
        }
        out.insert(name.clone(), a);
    }
    Ok(out)
}

/// The name of the huge page resource for pages of `page_size` bytes (`hugepages-2Mi`).
pub fn huge_page_resource(page_size: u64) -> String {
    format!(
        "{HUGEPAGES_PREFIX}{}",
        Amount::from_units(page_size, Format::BinarySi)
    )
}

/// The node's capacity.
pub fn capacity(
    machine: &MachineInfo,
    root_fs: Option<&FsStats>,
    max_pods: u32,
    pods_per_core: u32,
) -> ResourceList {
    let mut c = ResourceList::new();
    c.insert(
        CPU.into(),
        Amount::from_units(machine.num_cpus, Format::DecimalSi),
    );
    c.insert(
        MEMORY.into(),
        Amount::from_units(machine.memory_bytes, Format::BinarySi),
    );
    if let Some(fs) = root_fs {
        c.insert(
            EPHEMERAL_STORAGE.into(),
            Amount::from_units(fs.capacity_bytes, Format::BinarySi),
        );
    }
    for h in &machine.huge_pages {
        c.insert(
            huge_page_resource(h.page_size),
            Amount::from_units(h.page_size.saturating_mul(h.count), Format::BinarySi),
        );
    }
    let mut pods = u64::from(max_pods);
    if pods_per_core > 0 {
        pods = pods.min(u64::from(pods_per_core) * machine.num_cpus);
    }
    c.insert(PODS.into(), Amount::from_units(pods, Format::DecimalSi));
    c
}

/// The amounts hard eviction keeps free, by resource (upstream `hardEvictionReservation`).
pub fn hard_eviction_reservation(
    thresholds: &[Threshold],
    capacity: &ResourceList,
) -> ResourceList {
    let mut out = ResourceList::new();
    for t in thresholds {
        let resource = match t.signal {
            Signal::MemoryAvailable => MEMORY,
            Signal::NodeFsAvailable => EPHEMERAL_STORAGE,
            _ => continue,
        };
        if let Some(cap) = capacity.get(resource) {
            out.insert(resource.to_string(), t.value.amount_of(*cap));
        }
    }
    out
}

/// Allocatable: capacity minus reservations and hard eviction thresholds, never negative; memory
/// also minus the huge page pools.
pub fn allocatable(
    capacity: &ResourceList,
    system_reserved: &ResourceList,
    kube_reserved: &ResourceList,
    eviction_hard: &[Threshold],
) -> ResourceList {
    let eviction = hard_eviction_reservation(eviction_hard, capacity);
    let mut out = ResourceList::new();
    for (name, cap) in capacity {
        let mut v = *cap;
        for reserved in [system_reserved, kube_reserved, &eviction] {
            if let Some(r) = reserved.get(name) {
                v = v.saturating_sub(*r);
            }
        }
        out.insert(name.clone(), v.non_negative());
    }
    for (name, cap) in capacity {
        if name.starts_with(HUGEPAGES_PREFIX)
            && let Some(mem) = out.get_mut(MEMORY)
        {
            *mem = mem.saturating_sub(*cap).non_negative();
        }
    }
    out
}

/// The smallest and largest `cpu.shares` (cgroup v1 units; v2 converts them).
pub const MIN_SHARES: u64 = 2;
/// The largest `cpu.shares`.
pub const MAX_SHARES: u64 = 262_144;
/// The CFS period the kubelet uses (`cpuCFSQuotaPeriod`, 100 ms), in µs.
pub const CPU_PERIOD: u64 = 100_000;
/// The smallest CFS quota (1 ms), in µs.
pub const MIN_QUOTA: i64 = 1000;

/// Millicores as `cpu.shares` (upstream `MilliCPUToShares`): 1024 per CPU, at least 2, at most
/// 262144.
pub fn milli_cpu_to_shares(milli: i128) -> u64 {
    if milli <= 0 {
        return MIN_SHARES;
    }
    u64::try_from(milli * 1024 / 1000)
        .unwrap_or(MAX_SHARES)
        .clamp(MIN_SHARES, MAX_SHARES)
}

/// Millicores as a CFS quota over `period` µs (upstream `MilliCPUToQuota`): 0 (none) for no
/// limit, else at least 1 ms.
pub fn milli_cpu_to_quota(milli: i128, period: u64) -> i64 {
    if milli <= 0 {
        return 0;
    }
    i64::try_from(milli * i128::from(period) / 1000)
        .unwrap_or(i64::MAX)
        .max(MIN_QUOTA)
}

/// The page size (bytes) of a huge page resource name (`hugepages-2Mi` gives 2097152).
pub fn huge_page_size(resource: &str) -> Option<u64> {
    let size = resource.strip_prefix(HUGEPAGES_PREFIX)?;
    let a = quantity::parse(size).ok()?;
    u64::try_from(a.units()).ok().filter(|s| *s > 0)
}

/// A container's requests or limits; requests default to the limits where unset, as the API
/// server defaults them.
fn container_list(c: &Container, limits: bool) -> ResourceList {
    let r = c.resources.as_ref();
    let parse = |m: Option<&BTreeMap<String, Quantity>>| -> ResourceList {
        m.into_iter()
            .flatten()
            .filter_map(|(k, q)| Some((k.clone(), quantity::parse_quantity(q).ok()?)))
            .collect()
    };
    let lim = parse(r.and_then(|r| r.limits.as_ref()));
    if limits {
        return lim;
    }
    let mut req = parse(r.and_then(|r| r.requests.as_ref()));
    for (k, v) in lim {
        req.entry(k).or_insert(v);
    }
    req
}

fn add_into(to: &mut ResourceList, from: &ResourceList) {
    for (k, v) in from {
        let e = to
            .entry(k.clone())
            .or_insert(Amount::from_millis(0, v.format()));
        *e = e.saturating_add(*v);
    }
}

fn max_into(to: &mut ResourceList, from: &ResourceList) {
    for (k, v) in from {
        match to.get_mut(k) {
            Some(e) if e.millis() >= v.millis() => {}
            Some(e) => *e = *v,
            None => {
                to.insert(k.clone(), *v);
            }
        }
    }
}

/// Whether an init container is a sidecar (restartPolicy Always: it runs beside the others).
fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// Sums a pod's containers as upstream's `PodRequests`/`PodLimits`: the regular containers and
/// sidecars add up; each other init container runs alone (beside the sidecars started before
/// it), so the pod needs at least the largest of those.
fn pod_total(pod: &Pod, limits: bool) -> ResourceList {
    let Some(s) = pod.spec.as_ref() else {
        return ResourceList::new();
    };
    let mut total = ResourceList::new();
    for c in &s.containers {
        add_into(&mut total, &container_list(c, limits));
    }
    let mut sidecars = ResourceList::new();
    let mut init_max = ResourceList::new();
    for c in s.init_containers.iter().flatten() {
        let r = container_list(c, limits);
        if is_sidecar(c) {
            add_into(&mut total, &r);
            add_into(&mut sidecars, &r);
            max_into(&mut init_max, &sidecars);
        } else {
            let mut alone = r;
            add_into(&mut alone, &sidecars);
            max_into(&mut init_max, &alone);
        }
    }
    max_into(&mut total, &init_max);
    total
}

/// The pod's requests (upstream `PodRequests`): containers and sidecars summed, at least the
/// largest init container, plus the pod overhead.
pub fn pod_requests(pod: &Pod) -> ResourceList {
    let mut r = pod_total(pod, false);
    if let Some(o) = pod.spec.as_ref().and_then(|s| s.overhead.as_ref()) {
        let o: ResourceList = o
            .iter()
            .filter_map(|(k, q)| Some((k.clone(), quantity::parse_quantity(q).ok()?)))
            .collect();
        add_into(&mut r, &o);
    }
    r
}

/// The pod's limits (upstream `PodLimits`): as [`pod_requests`], the overhead added only to
/// the resources that have a limit.
pub fn pod_limits(pod: &Pod) -> ResourceList {
    let mut l = pod_total(pod, true);
    for (k, q) in pod
        .spec
        .as_ref()
        .and_then(|s| s.overhead.as_ref())
        .into_iter()
        .flatten()
    {
        if let (Some(v), Ok(o)) = (l.get_mut(k), quantity::parse_quantity(q)) {
            *v = v.saturating_add(o);
        }
    }
    l
}

/// Cgroup settings of the kubelet's own cgroups (node allocatable, QoS and pod level), in v1
/// units; deckhand-cgroups converts them for v2. `None` leaves the kernel's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupResources {
    /// `cpu.shares`.
    pub cpu_shares: Option<u64>,
    /// `cpu.cfs_quota_us` (with [`CgroupResources::cpu_period`]).
    pub cpu_quota: Option<i64>,
    /// `cpu.cfs_period_us`.
    pub cpu_period: Option<u64>,
    /// The memory limit in bytes.
    pub memory: Option<i64>,
    /// `pids.max`.
    pub pids: Option<i64>,
    /// Huge page limits in bytes by page size in bytes (`-1`: unlimited).
    pub huge_pages: BTreeMap<u64, i64>,
}

fn bytes(a: &Amount) -> i64 {
    i64::try_from(a.units().max(0)).unwrap_or(i64::MAX)
}

/// The settings a resource list gives a cgroup (upstream `getCgroupConfig`): cpu shares from
/// millicores, the memory limit, the pids limit and a limit per huge page size.
pub fn cgroup_resources(list: &ResourceList) -> CgroupResources {
    CgroupResources {
        cpu_shares: list.get(CPU).map(|a| milli_cpu_to_shares(a.millis())),
        memory: list.get(MEMORY).map(bytes),
        pids: list.get(PID).map(bytes),
        huge_pages: list
            .iter()
            .filter_map(|(k, v)| Some((huge_page_size(k)?, bytes(v))))
            .collect(),
        ..Default::default()
    }
}

/// The capacity the node's top-level cgroup is sized from (upstream's internal capacity): the
/// capacity plus `pid`, the smaller of `pid_max` and `threads-max`, when known.
pub fn internal_capacity(capacity: &ResourceList, max_pids: Option<u64>) -> ResourceList {
    let mut c = capacity.clone();
    if let Some(p) = max_pids {
        c.insert(PID.into(), Amount::from_units(p, Format::DecimalSi));
    }
    c
}

/// Node allocatable as enforced on the `kubepods` cgroup (upstream
/// `getNodeAllocatableAbsolute`): capacity minus `systemReserved` and `kubeReserved`, clamped
/// at zero. Unlike the allocatable the Node reports, the hard eviction thresholds are not
/// subtracted: the pods may use that memory until the eviction manager acts.
pub fn allocatable_for_enforcement(
    capacity: &ResourceList,
    system_reserved: &ResourceList,
    kube_reserved: &ResourceList,
) -> ResourceList {
    capacity
        .iter()
        .map(|(name, cap)| {
            let mut v = *cap;
            for r in [system_reserved, kube_reserved] {
                if let Some(r) = r.get(name) {
                    v = v.saturating_sub(*r);
                }
            }
            (name.clone(), v.non_negative())
        })
        .collect()
}

/// The pod cgroup's settings, as upstream's `ResourceConfigForPod` and pod container manager:
/// shares from the pod's cpu requests (2 for BestEffort); the CFS quota from the sum of cpu
/// limits only when every container (sidecars included) has one, and the memory limit likewise
/// (always for Guaranteed); huge page limits from the containers' requests, 0 for every other
/// size the node has (`page_sizes`); `pids.max` from `podPidsLimit` when positive.
pub fn pod_cgroup_resources(
    pod: &Pod,
    qos: &str,
    pod_pids_limit: i64,
    page_sizes: &[u64],
) -> CgroupResources {
    let reqs = pod_requests(pod);
    let limits = pod_limits(pod);
    let s = pod.spec.as_ref();
    let running: Vec<&Container> = s
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten().filter(|c| is_sidecar(c)))
        })
        .collect();
    let has_limit = |c: &Container, r: &str| {
        container_list(c, true)
            .get(r)
            .is_some_and(|a| a.millis() != 0)
    };
    let cpu_declared = running.iter().all(|c| has_limit(c, CPU));
    let memory_declared = running.iter().all(|c| has_limit(c, MEMORY));
    let shares = milli_cpu_to_shares(reqs.get(CPU).map_or(0, Amount::millis));
    let quota = milli_cpu_to_quota(limits.get(CPU).map_or(0, Amount::millis), CPU_PERIOD);
    let memory = limits.get(MEMORY).map_or(0, bytes);
    let mut r = CgroupResources::default();
    match qos {
        "Guaranteed" | "Burstable" => {
            r.cpu_shares = Some(shares);
            if qos == "Guaranteed" || cpu_declared {
                // A limit of zero millicores is no limit (-1), as upstream writes it.
                r.cpu_quota = Some(if quota > 0 { quota } else { -1 });
                r.cpu_period = Some(CPU_PERIOD);
            }
            if qos == "Guaranteed" || memory_declared {
                r.memory = Some(memory);
            }
        }
        _ => r.cpu_shares = Some(MIN_SHARES),
    }
    let mut huge = BTreeMap::new();
    for c in s.into_iter().flat_map(|s| s.containers.iter()) {
        for (k, v) in container_list(c, false) {
            if let Some(size) = huge_page_size(&k) {
                *huge.entry(size).or_insert(0i64) += bytes(&v);
            }
        }
    }
    for size in page_sizes {
        huge.entry(*size).or_insert(0);
    }
    r.huge_pages = huge;
    if pod_pids_limit > 0 {
        r.pids = Some(pod_pids_limit);
    }
    r
}

/// The list as API quantities.
pub fn to_quantities(list: &ResourceList) -> BTreeMap<String, Quantity> {
    list.iter()
        .map(|(k, v)| (k.clone(), v.to_quantity()))
        .collect()
}

/// Whether two API resource lists hold the same amounts (compared as numbers, so `1Ki` equals
/// `1024`). An unparsable quantity compares by its text.
pub fn same_quantities(a: &BTreeMap<String, Quantity>, b: &BTreeMap<String, Quantity>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, va)| {
            b.get(k).is_some_and(|vb| {
                match (quantity::parse_quantity(va), quantity::parse_quantity(vb)) {
                    (Ok(x), Ok(y)) => x == y,
                    _ => va == vb,
                }
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eviction::{default_eviction_hard, parse_thresholds};
    use crate::machine::HugePages;

    fn machine() -> MachineInfo {
        MachineInfo {
            num_cpus: 2,
            memory_bytes: 8_344_391_680,
            huge_pages: vec![
                HugePages {
                    page_size: 2 << 20,
                    count: 16,
                },
                HugePages {
                    page_size: 1 << 30,
                    count: 0,
                },
            ],
            machine_id: "m".into(),
            system_uuid: String::new(),
            boot_id: "b".into(),
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            architecture: "amd64".into(),
            operating_system: "linux".into(),
        }
    }

    fn fs() -> FsStats {
        FsStats {
            capacity_bytes: 100 << 30,
            available_bytes: 50 << 30,
            inodes: 1000,
            inodes_free: 500,
        }
    }

    fn strings(list: &ResourceList) -> BTreeMap<&str, String> {
        list.iter()
            .map(|(k, v)| (k.as_str(), v.to_string()))
            .collect()
    }

    #[test]
    fn capacity_from_machine() {
        let c = capacity(&machine(), Some(&fs()), 110, 0);
        let s = strings(&c);
        assert_eq!(s["cpu"], "2");
        assert_eq!(s["memory"], "8148820Ki");
        assert_eq!(s["ephemeral-storage"], "100Gi");
        assert_eq!(s["hugepages-2Mi"], "32Mi");
        assert_eq!(s["hugepages-1Gi"], "0");
        assert_eq!(s["pods"], "110");
        assert_eq!(strings(&capacity(&machine(), None, 110, 10))["pods"], "20");
    }

    /// A `systemReserved`/`kubeReserved` map from pairs.
    fn reserve(pairs: &[(&str, &str)]) -> ResourceList {
        parse_reservation(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .expect("reservation")
    }

    #[test]
    fn allocatable_subtracts_reservations_eviction_and_huge_pages() {
        let c = capacity(&machine(), Some(&fs()), 110, 0);
        let system = reserve(&[("cpu", "100m"), ("memory", "100Mi"), ("pid", "100")]);
        let kube = reserve(&[("cpu", "200m"), ("ephemeral-storage", "1Gi")]);
        let eviction = parse_thresholds(&default_eviction_hard()).expect("thresholds");
        let a = allocatable(&c, &system, &kube, &eviction);
        let s = strings(&a);
        assert_eq!(s["cpu"], "1700m");
        // 8148820Ki - 100Mi (system) - 100Mi (eviction) - 32Mi (huge pages)
        assert_eq!(s["memory"], format!("{}Ki", 8_148_820 - 232 * 1024));
        // 100Gi - 1Gi - 10% of 100Gi
        assert_eq!(
            a["ephemeral-storage"].units(),
            (99 << 30) - ((100_u64 << 30) as f64 * f64::from(10_f32 / 100.0)) as i128
        );
        assert_eq!(s["pods"], "110");
        assert_eq!(s["hugepages-2Mi"], "32Mi");
        assert!(!a.contains_key("pid"));

        let huge = reserve(&[("cpu", "8")]);
        assert_eq!(allocatable(&c, &huge, &kube, &[])["cpu"].millis(), 0);
    }

    #[test]
    fn reservations_are_validated() {
        let one =
            |k: &str, v: &str| parse_reservation(&BTreeMap::from([(k.to_string(), v.to_string())]));
        assert!(one("cpu", "1").is_ok());
        assert!(matches!(
            one("hugepages-2Mi", "1"),
            Err(ReservationError::Unsupported(_))
        ));
        assert!(one("memory", "lots").is_err());
        assert!(one("memory", "-1").is_err());
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"uid": "u"}, "spec": spec}))
            .expect("pod")
    }

    fn ctr(name: &str, res: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"name": name, "resources": res})
    }

    #[test]
    fn shares_and_quota_as_upstream() {
        assert_eq!(milli_cpu_to_shares(0), 2);
        assert_eq!(milli_cpu_to_shares(1), 2);
        assert_eq!(milli_cpu_to_shares(100), 102);
        assert_eq!(milli_cpu_to_shares(1000), 1024);
        assert_eq!(milli_cpu_to_shares(1_000_000), MAX_SHARES);
        assert_eq!(milli_cpu_to_quota(0, CPU_PERIOD), 0);
        assert_eq!(milli_cpu_to_quota(5, CPU_PERIOD), 1000);
        assert_eq!(milli_cpu_to_quota(500, CPU_PERIOD), 50_000);
        assert_eq!(milli_cpu_to_quota(2500, 50_000), 125_000);
        assert_eq!(huge_page_size("hugepages-2Mi"), Some(2 << 20));
        assert_eq!(huge_page_size("hugepages-1Gi"), Some(1 << 30));
        assert_eq!(huge_page_size("memory"), None);
    }

    #[test]
    fn pod_requests_take_init_containers_sidecars_and_overhead() {
        let p = pod(serde_json::json!({
            "overhead": {"cpu": "50m", "memory": "10Mi"},
            "initContainers": [
                ctr("big-init", serde_json::json!({"requests": {"cpu": "1", "memory": "64Mi"}})),
                ctr("side", serde_json::json!({"limits": {"cpu": "100m", "memory": "16Mi"}}))
                    .as_object().cloned().map(|mut o| {
                        o.insert("restartPolicy".into(), "Always".into());
                        serde_json::Value::Object(o)
                    }).expect("sidecar"),
                ctr("late-init", serde_json::json!({"requests": {"cpu": "950m"}})),
            ],
            "containers": [
                ctr("a", serde_json::json!({"requests": {"cpu": "200m", "memory": "32Mi"},
                    "limits": {"cpu": "400m", "memory": "32Mi"}})),
                ctr("b", serde_json::json!({"requests": {"cpu": "100m"}})),
            ],
        }));
        let r = pod_requests(&p);
        // Regular 300m + sidecar 100m = 400m; init max: max(1000m, 950m + 100m) = 1050m.
        assert_eq!(r["cpu"].millis(), 1050 + 50);
        // Regular 32Mi + sidecar 16Mi = 48Mi; init 64Mi alone wins.
        assert_eq!(r["memory"].units(), (64 + 10) << 20);
        let l = pod_limits(&p);
        // Limits: a 400m + sidecar 100m; overhead only on resources with a limit.
        assert_eq!(l["cpu"].millis(), 500 + 50);
        assert_eq!(l["memory"].units(), (48 + 10) << 20);
    }

    #[test]
    fn pod_cgroup_resources_as_resource_config_for_pod() {
        let g = pod(serde_json::json!({"containers": [
            ctr("a", serde_json::json!({"limits": {"cpu": "500m", "memory": "64Mi", "hugepages-2Mi": "4Mi"}})),
            ctr("b", serde_json::json!({"limits": {"cpu": "250m", "memory": "32Mi"}})),
        ]}));
        let r = pod_cgroup_resources(&g, "Guaranteed", -1, &[2 << 20, 1 << 30]);
        assert_eq!(r.cpu_shares, Some(768));
        assert_eq!(
            (r.cpu_quota, r.cpu_period),
            (Some(75_000), Some(CPU_PERIOD))
        );
        assert_eq!(r.memory, Some(96 << 20));
        assert_eq!(r.pids, None);
        assert_eq!(
            r.huge_pages,
            BTreeMap::from([(2 << 20, 4 << 20), (1 << 30, 0)])
        );

        // Burstable: a limit missing on one container leaves that resource unlimited.
        let b = pod(serde_json::json!({"containers": [
            ctr("a", serde_json::json!({"requests": {"cpu": "300m"}, "limits": {"cpu": "1", "memory": "64Mi"}})),
            ctr("b", serde_json::json!({"limits": {"cpu": "500m"}})),
        ]}));
        let r = pod_cgroup_resources(&b, "Burstable", 1024, &[]);
        assert_eq!(r.cpu_shares, Some(milli_cpu_to_shares(800)));
        assert_eq!(r.cpu_quota, Some(150_000));
        assert_eq!(r.memory, None);
        assert_eq!(r.pids, Some(1024));
        let b2 = pod(serde_json::json!({"containers": [
            ctr("a", serde_json::json!({"requests": {"cpu": "300m", "memory": "8Mi"}})),
        ]}));
        let r = pod_cgroup_resources(&b2, "Burstable", 0, &[]);
        assert_eq!(r.cpu_shares, Some(307));
        assert_eq!((r.cpu_quota, r.memory, r.pids), (None, None, None));

        let be = pod(serde_json::json!({"containers": [ctr("a", serde_json::json!({}))]}));
        let r = pod_cgroup_resources(&be, "BestEffort", -1, &[2 << 20]);
        assert_eq!(r.cpu_shares, Some(2));
        assert_eq!((r.cpu_quota, r.memory), (None, None));
        assert_eq!(r.huge_pages, BTreeMap::from([(2 << 20, 0)]));
    }

    #[test]
    fn enforced_allocatable_keeps_the_eviction_threshold() {
        let c = internal_capacity(&capacity(&machine(), Some(&fs()), 110, 0), Some(32768));
        let system = reserve(&[("cpu", "100m"), ("memory", "100Mi"), ("pid", "1000")]);
        let kube = reserve(&[("cpu", "400m"), ("memory", "50Mi")]);
        let a = allocatable_for_enforcement(&c, &system, &kube);
        let r = cgroup_resources(&a);
        assert_eq!(r.cpu_shares, Some(milli_cpu_to_shares(1500)));
        // No eviction threshold and no huge pages taken off: only the reservations.
        assert_eq!(r.memory, Some(8_344_391_680 - (150 << 20)));
        assert_eq!(r.pids, Some(32768 - 1000));
        assert_eq!(
            r.huge_pages,
            BTreeMap::from([(2 << 20, 32 << 20), (1 << 30, 0)])
        );
        assert_eq!((r.cpu_quota, r.cpu_period), (None, None));
        let none = allocatable_for_enforcement(&c, &reserve(&[("memory", "100Gi")]), &kube);
        assert_eq!(cgroup_resources(&none).memory, Some(0));
    }

    #[test]
    fn quantities_compare_by_value() {
        let a = BTreeMap::from([("memory".to_string(), Quantity("1Ki".into()))]);
        let b = BTreeMap::from([("memory".to_string(), Quantity("1024".into()))]);
        let c = BTreeMap::from([("memory".to_string(), Quantity("1025".into()))]);
        assert!(same_quantities(&a, &b));
        assert!(!same_quantities(&a, &c));
        assert!(!same_quantities(&a, &BTreeMap::new()));
    }
}
