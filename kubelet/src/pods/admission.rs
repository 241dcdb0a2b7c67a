//! Pod admission against the node, as upstream's kubelet `canAdmitPod` with its
//! GeneralPredicates admit handler (pure).
//!
//! A new pod is admitted only if, with the pods already admitted that are not terminal, it fits
//! the node's allocatable (the `pods` count, then cpu, memory and ephemeral-storage requests:
//! the effective request of a pod is max(sum of its containers, max of its init containers)
//! plus its overhead), its nodeSelector and required node affinity match the node's labels, and
//! none of its hostPorts is taken. The first failure is the pod's status reason, as upstream:
//! `OutOf<resource>` with `Node didn't have enough resource: ...`, `NodeAffinity` and
//! `NodePorts` with `Predicate <name> failed`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, NodeSelectorRequirement, NodeSelectorTerm, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::spec;
use crate::quantity;
use crate::resources::{CPU, EPHEMERAL_STORAGE, MEMORY, PODS, ResourceList};

/// Upstream's predicate name for the node selector and required node affinity.
pub const NODE_AFFINITY: &str = "NodeAffinity";
/// Upstream's predicate name for host ports.
pub const NODE_PORTS: &str = "NodePorts";

/// What admission knows of the node.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// The node's name (`matchFields` on `metadata.name`).
    pub name: String,
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
    /// The node's allocatable.
    pub allocatable: ResourceList,
}

/// Why a pod was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The status reason and Event reason (`OutOfcpu`, `NodeAffinity`, ...).
    pub reason: String,
    /// The message (the status message is `Pod ` + this, as upstream's `rejectPod`).
    pub message: String,
}

impl Rejection {
    /// The pod status message.
    pub fn status_message(&self) -> String {
        format!("Pod {}", self.message)
    }
}

/// Whether `reason` is one admission gives (a pod already refused).
pub fn is_rejection_reason(reason: &str) -> bool {
    reason.starts_with("OutOf") || reason == NODE_AFFINITY || reason == NODE_PORTS
}

/// Whether the pod's phase is terminal (Succeeded or Failed).
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Requests in thousandths of a unit (millicores, milli-bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    /// CPU.
    pub cpu: i128,
    /// Memory.
    pub memory: i128,
    /// Ephemeral storage.
    pub ephemeral_storage: i128,
}

impl Requests {
    fn add(self, o: Requests) -> Requests {
        Requests {
            cpu: self.cpu + o.cpu,
            memory: self.memory + o.memory,
            ephemeral_storage: self.ephemeral_storage + o.ephemeral_storage,
        }
    }

    fn max(self, o: Requests) -> Requests {
        Requests {
            cpu: self.cpu.max(o.cpu),
            memory: self.memory.max(o.memory),
            ephemeral_storage: self.ephemeral_storage.max(o.ephemeral_storage),
        }
    }

    fn get(&self, name: &str) -> i128 {
        match name {
            CPU => self.cpu,
            MEMORY => self.memory,
            _ => self.ephemeral_storage,
        }
    }
}

type Quantities = BTreeMap<String, Quantity>;

fn from_list(list: Option<&Quantities>, fallback: Option<&Quantities>) -> Requests {
    let get = |name: &str| {
        list.and_then(|l| l.get(name))
            .or_else(|| fallback.and_then(|l| l.get(name)))
            .and_then(|q| quantity::parse_quantity(q).ok())
            .map_or(0, |a| a.millis().max(0))
    };
    Requests {
        cpu: get(CPU),
        memory: get(MEMORY),
        ephemeral_storage: get(EPHEMERAL_STORAGE),
    }
}

fn container_requests(c: &Container) -> Requests {
    let r = c.resources.as_ref();
    // An unset request defaults to the limit, as the API server's defaulting does.
    from_list(
        r.and_then(|r| r.requests.as_ref()),
        r.and_then(|r| r.limits.as_ref()),
    )
}

/// The pod's effective requests, as upstream's `PodRequests`: max(sum of containers, the
/// largest init container) plus overhead, where restartable init containers (sidecars) add to
/// the containers and to every init container started after them.
pub fn pod_requests(pod: &Pod) -> Requests {
    let s = spec::spec(pod);
    let sum = s
        .containers
        .iter()
        .map(container_requests)
        .fold(Requests::default(), Requests::add);
    let mut sidecars = Requests::default();
    let mut init = Requests::default();
    for c in s.init_containers.iter().flatten() {
        let r = container_requests(c);
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars = sidecars.add(r);
            init = init.max(sidecars);
        } else {
            init = init.max(r.add(sidecars));
        }
    }
    sum.add(sidecars)
        .max(init)
        .add(from_list(s.overhead.as_ref(), None))
}

/// A hostPort a pod takes: (protocol, host IP, port).
type HostPort = (String, String, i32);

fn host_ports(pod: &Pod) -> Vec<HostPort> {
    spec::spec(pod)
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|h| *h > 0)?;
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let ip = p
                .host_ip
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| "0.0.0.0".into());
            Some((proto, ip, port))
        })
        .collect()
}

fn ports_clash(a: &HostPort, b: &HostPort) -> bool {
    a.0 == b.0 && a.2 == b.2 && (a.1 == b.1 || a.1 == "0.0.0.0" || b.1 == "0.0.0.0")
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |v: &str| v.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), [x]) = (value.and_then(number), values) else {
                return false;
            };
            let Some(x) = number(x) else { return false };
            if r.operator == "Gt" { v > x } else { v < x }
        }
        _ => false,
    }
}

fn term_matches(t: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    let exprs = t.match_expressions.as_deref().unwrap_or_default();
    let fields = t.match_fields.as_deref().unwrap_or_default();
    // An empty term matches no object.
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(node.name.as_str())))
}

/// Whether the pod's nodeSelector and required node affinity terms match the node.
pub fn matches_node(pod: &Pod, node: &NodeInfo) -> bool {
    let s = spec::spec(pod);
    let selector_ok = s
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    let required = s
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let affinity_ok =
        required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)));
    selector_ok && affinity_ok
}

fn insufficient(name: &str, requested: i128, used: i128, capacity: i128) -> Rejection {
    Rejection {
        reason: format!("OutOf{name}"),
        message: format!(
            "Node didn't have enough resource: {name}, requested: {requested}, used: {used}, capacity: {capacity}"
        ),
    }
}

fn predicate(name: &str) -> Rejection {
    Rejection {
        reason: name.to_string(),
        message: format!("Predicate {name} failed"),
    }
}

/// Whether `pod` may join `admitted` (the admitted pods that are not terminal) on `node`:
/// the first failure, in upstream's order (resources, node affinity, host ports).
pub fn admit(pod: &Pod, admitted: &[&Pod], node: &NodeInfo) -> Result<(), Rejection> {
    let alloc = |name: &str| node.allocatable.get(name).map_or(0, |a| a.millis());
    let allowed_pods = node.allocatable.get(PODS).map_or(0, |a| a.units());
    let count = admitted.len() as i128;
    if count + 1 > allowed_pods {
        return Err(insufficient(PODS, 1, count, allowed_pods));
    }
    let want = pod_requests(pod);
    let used = admitted
        .iter()
        .map(|p| pod_requests(p))
        .fold(Requests::default(), Requests::add);
    for name in [CPU, MEMORY, EPHEMERAL_STORAGE] {
        let (w, u, a) = (want.get(name), used.get(name), alloc(name));
        if w > 0 && w + u > a {
            // cpu in millicores, memory and storage in bytes, as upstream.
            let scale = |v: i128| if name == CPU { v } else { v / 1000 };
            return Err(insufficient(name, scale(w), scale(u), scale(a)));
        }
    }
    if !matches_node(pod, node) {
        return Err(predicate(NODE_AFFINITY));
    }
    let taken: Vec<HostPort> = admitted.iter().flat_map(|p| host_ports(p)).collect();
    if host_ports(pod)
        .iter()
        .any(|p| taken.iter().any(|t| ports_clash(p, t)))
    {
        return Err(predicate(NODE_PORTS));
    }
    Ok(())
}

/// The order pods are admitted in after a restart: those the runtime already has first, then
/// by creation time (then name), as upstream sorts pods by creation time.
pub fn admission_order(pods: &mut [(bool, Pod)]) {
    pods.sort_by(|(ra, a), (rb, b)| {
        let key = |p: &Pod| {
            (
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                spec::full_name(p),
            )
        };
        rb.cmp(ra).then_with(|| key(a).cmp(&key(b)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantity::{Amount, Format};
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    fn node(cpu_millis: i128, memory: u64, pods: u64) -> NodeInfo {
        let mut allocatable = ResourceList::new();
        allocatable.insert(
            CPU.into(),
            Amount::from_millis(cpu_millis, Format::DecimalSi),
        );
        allocatable.insert(MEMORY.into(), Amount::from_units(memory, Format::BinarySi));
        allocatable.insert(
            EPHEMERAL_STORAGE.into(),
            Amount::from_units(1 << 30, Format::BinarySi),
        );
        allocatable.insert(PODS.into(), Amount::from_units(pods, Format::DecimalSi));
        NodeInfo {
            name: "dh-node".into(),
            labels: BTreeMap::from([("kubernetes.io/hostname".into(), "dh-node".into())]),
            allocatable,
        }
    }

    fn with_cpu(name: &str, cpu: &str) -> Pod {
        pod(json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}))
    }

    #[test]
    fn effective_requests_take_init_max_and_overhead() {
        let p = pod(json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [
                {"name": "i1", "resources": {"requests": {"cpu": "2", "memory": "10Mi"}}},
                {"name": "i2", "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "700m", "memory": "100Mi"}}},
                {"name": "b", "resources": {"requests": {"cpu": "800m", "ephemeral-storage": "1Ki"}}}],
            "overhead": {"cpu": "100m"}}}));
        let r = pod_requests(&p);
        assert_eq!(r.cpu, 2100);
        assert_eq!(r.memory, (1i128 << 30) * 1000);
        assert_eq!(r.ephemeral_storage, 1024 * 1000);
    }

    #[test]
    fn sidecars_add_to_containers_and_later_init_containers() {
        let p = pod(json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [
                {"name": "i1", "resources": {"requests": {"cpu": "1"}}},
                {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "300m"}}},
                {"name": "i2", "resources": {"requests": {"cpu": "900m"}}}],
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "500m"}}}]}}));
        // max(500 + 300, 1000, 900 + 300) = 1200.
        assert_eq!(pod_requests(&p).cpu, 1200);
    }

    #[test]
    fn cpu_over_allocatable_is_out_of_cpu_with_upstream_message() {
        let n = node(2000, 1 << 30, 10);
        let a = with_cpu("a", "1800m");
        let err = admit(&with_cpu("b", "500m"), &[&a], &n).expect_err("refused");
        assert_eq!(err.reason, "OutOfcpu");
        assert_eq!(
            err.status_message(),
            "Pod Node didn't have enough resource: cpu, requested: 500, used: 1800, capacity: 2000"
        );
        assert!(admit(&with_cpu("b", "200m"), &[&a], &n).is_ok());
        // A pod requesting nothing only counts as a pod.
        assert!(admit(&with_cpu("b", "0"), &[&a], &n).is_ok());
    }

    #[test]
    fn memory_is_reported_in_bytes() {
        let n = node(2000, 1000, 10);
        let p = pod(json!({"metadata": {"name": "m"}, "spec": {"containers": [
            {"name": "c", "resources": {"requests": {"memory": "2k"}}}]}}));
        let err = admit(&p, &[], &n).expect_err("refused");
        assert_eq!(err.reason, "OutOfmemory");
        assert_eq!(
            err.message,
            "Node didn't have enough resource: memory, requested: 2000, used: 0, capacity: 1000"
        );
    }

    #[test]
    fn pods_count_is_checked_first() {
        let n = node(100, 1 << 30, 2);
        let (a, b) = (with_cpu("a", "0"), with_cpu("b", "0"));
        let err = admit(&with_cpu("c", "5"), &[&a, &b], &n).expect_err("refused");
        assert_eq!(err.reason, "OutOfpods");
        assert_eq!(
            err.message,
            "Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2"
        );
    }

    #[test]
    fn node_selector_and_required_affinity() {
        let n = node(2000, 1 << 30, 10);
        let sel = |v: serde_json::Value| {
            pod(
                json!({"metadata": {"name": "s"}, "spec": {"nodeSelector": v, "containers": [{"name": "c"}]}}),
            )
        };
        assert!(admit(&sel(json!({"kubernetes.io/hostname": "dh-node"})), &[], &n).is_ok());
        let err = admit(&sel(json!({"disk": "ssd"})), &[], &n).expect_err("refused");
        assert_eq!(err.reason, "NodeAffinity");
        assert_eq!(err.status_message(), "Pod Predicate NodeAffinity failed");
        let aff = |terms: serde_json::Value| {
            pod(
                json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                    {"nodeSelectorTerms": terms}}}}}),
            )
        };
        let in_other = json!({"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["x"]}]});
        let by_name = json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["dh-node"]}]});
        let absent = json!({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]});
        assert!(admit(&aff(json!([in_other.clone()])), &[], &n).is_err());
        assert!(admit(&aff(json!([in_other.clone(), by_name])), &[], &n).is_ok());
        assert!(admit(&aff(json!([absent])), &[], &n).is_ok());
        assert!(admit(&aff(json!([{}])), &[], &n).is_err());
    }

    #[test]
    fn host_ports_clash_by_protocol_port_and_ip() {
        let n = node(2000, 1 << 30, 10);
        let hp = |name: &str, port: i32, proto: &str, ip: &str| {
            pod(
                json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c",
                "ports": [{"containerPort": 80, "hostPort": port, "protocol": proto, "hostIP": ip}]}]}}),
            )
        };
        let a = hp("a", 8080, "TCP", "");
        let err = admit(&hp("b", 8080, "TCP", "127.0.0.1"), &[&a], &n).expect_err("clash");
        assert_eq!(err.reason, "NodePorts");
        assert_eq!(err.message, "Predicate NodePorts failed");
        assert!(admit(&hp("b", 8080, "UDP", ""), &[&a], &n).is_ok());
        assert!(admit(&hp("b", 8081, "TCP", ""), &[&a], &n).is_ok());
        let c = hp("c", 9090, "TCP", "127.0.0.1");
        assert!(admit(&hp("d", 9090, "TCP", "127.0.0.2"), &[&c], &n).is_ok());
    }

    #[test]
    fn running_pods_come_first_then_oldest() {
        let p = |name: &str, t: &str| {
            pod(
                json!({"metadata": {"name": name, "creationTimestamp": t}, "spec": {"containers": []}}),
            )
        };
        let mut pods = vec![
            (false, p("new-old", "2026-01-01T00:00:00Z")),
            (true, p("run-young", "2026-03-01T00:00:00Z")),
            (true, p("run-old", "2026-02-01T00:00:00Z")),
        ];
        admission_order(&mut pods);
        let names: Vec<_> = pods
            .iter()
            .map(|(_, p)| spec::ids(p).0.to_string())
            .collect();
        assert_eq!(names, ["run-old", "run-young", "new-old"]);
    }

    #[test]
    fn rejection_reasons_are_recognised() {
        for r in ["OutOfcpu", "OutOfpods", "NodeAffinity", "NodePorts"] {
            assert!(is_rejection_reason(r));
        }
        assert!(!is_rejection_reason("Evicted"));
    }
}
