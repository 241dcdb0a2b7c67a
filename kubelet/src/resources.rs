//! Node capacity and allocatable, computed as upstream's kubelet does.
//!
//! Capacity: `cpu` (logical CPUs), `memory` (`MemTotal`), `ephemeral-storage` (size of the root
//! dir's filesystem), `hugepages-<size>` (each pool) and `pods` (`maxPods`, or `podsPerCore` x CPUs
//! when smaller). Allocatable: capacity minus `systemReserved`, `kubeReserved` and the hard
//! eviction thresholds for `memory.available` (from memory) and `nodefs.available` (from
//! ephemeral-storage), clamped at zero; memory allocatable also loses every huge page pool.

use std::collections::BTreeMap;

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

    #[test]
    fn allocatable_subtracts_reservations_eviction_and_huge_pages() {
        let c = capacity(&machine(), Some(&fs()), 110, 0);
        let reserve = |pairs: &[(&str, &str)]| {
            parse_reservation(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .expect("reservation")
        };
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
