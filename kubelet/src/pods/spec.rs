//! From a pod spec to CRI configs, as upstream's kuberuntime builds them.
//!
//! Labels and annotations use upstream's names (`io.kubernetes.pod.*`,
//! `io.kubernetes.container.*`) so that a runtime's state can be matched to pods after a crash
//! and tools such as crictl show the same. Also here: the admission check of what this kubelet
//! does not support yet, the QoS class, requests/limits to `LinuxContainerResources`,
//! `$(VAR)` expansion and `fieldRef` (the environment itself is in [`super::env`]), volume
//! paths and mounts (API-data volumes read-only, prepared subPaths, the managed `/etc/hosts`),
//! DNS, and the container hash.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use deckhand_proto::cri::{
    Capability, ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PortMapping, Protocol,
};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Volume};

use crate::quantity;

/// Sandbox and container label: the pod's name.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
/// Sandbox and container label: the pod's namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Sandbox and container label: the pod's UID.
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// Container label: the container's name in the pod spec.
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
/// Container annotation: the hash of the container's spec.
pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";
/// Container annotation: the container's restart count.
pub const CONTAINER_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
/// Container annotation: `terminationMessagePath`.
pub const CONTAINER_TERMINATION_MESSAGE_PATH: &str =
    "io.kubernetes.container.terminationMessagePath";
/// Container annotation: `terminationMessagePolicy`.
pub const CONTAINER_TERMINATION_MESSAGE_POLICY: &str =
    "io.kubernetes.container.terminationMessagePolicy";
/// Container annotation: the container's ports (JSON).
pub const CONTAINER_PORTS: &str = "io.kubernetes.container.ports";
/// Container annotation: the pod's `terminationGracePeriodSeconds`.
pub const POD_TERMINATION_GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";
/// Container annotation: the pod's `deletionGracePeriodSeconds`.
pub const POD_DELETION_GRACE_PERIOD: &str = "io.kubernetes.pod.deletionGracePeriod";
/// Pod annotation: the hash of a static pod's manifest.
pub const CONFIG_HASH: &str = "kubernetes.io/config.hash";
/// Pod annotation: on a mirror pod, the hash of its static pod.
pub const CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";
/// Pod annotation: where a pod came from (`file`, `api`).
pub const CONFIG_SOURCE: &str = "kubernetes.io/config.source";
/// Pod annotation: when the kubelet first saw the pod.
pub const CONFIG_SEEN: &str = "kubernetes.io/config.seen";

/// Upstream's default grace period.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;

/// The pod's `<namespace>/<name>`.
pub fn full_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Name, namespace and UID of a pod, with defaults for missing ones.
pub fn ids(pod: &Pod) -> (&str, &str, &str) {
    (
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.uid.as_deref().unwrap_or_default(),
    )
}

/// The pod's spec (an empty one when absent).
pub fn spec(pod: &Pod) -> &PodSpec {
    static EMPTY: std::sync::OnceLock<PodSpec> = std::sync::OnceLock::new();
    pod.spec
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(PodSpec::default))
}

/// The grace period to stop the pod's containers with.
pub fn grace_period(pod: &Pod) -> i64 {
    pod.metadata
        .deletion_grace_period_seconds
        .or(spec(pod).termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        .max(0)
}

/// Whether the pod runs in the node's network namespace.
pub fn host_network(pod: &Pod) -> bool {
    spec(pod).host_network.unwrap_or(false)
}

/// The label selector of everything the runtime runs for pod `uid`.
pub fn uid_selector(uid: &str) -> HashMap<String, String> {
    HashMap::from([(POD_UID_LABEL.to_string(), uid.to_string())])
}

/// Fields of the pod this kubelet does not run yet; a pod with any is refused at admission.
pub fn unsupported(pod: &Pod) -> Vec<String> {
    let s = spec(pod);
    let mut out = Vec::new();
    for v in s.volumes.iter().flatten() {
        if v.host_path.is_none() && volume_plugin_dir(v).is_none() {
            out.push(format!(
                "volume {:?}: only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are supported",
                v.name
            ));
        }
        if v.empty_dir.as_ref().is_some_and(|e| {
            e.medium
                .as_deref()
                .is_some_and(|m| !m.is_empty() && m != "Memory")
        }) {
            out.push(format!("volume {:?}: emptyDir medium", v.name));
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if src.config_map.is_none()
                && src.secret.is_none()
                && src.downward_api.is_none()
                && src.service_account_token.is_none()
            {
                out.push(format!(
                    "volume {:?}: projected sources other than configMap, secret, downwardAPI and serviceAccountToken",
                    v.name
                ));
            }
        }
    }
    if s.ephemeral_containers
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        out.push("ephemeralContainers".into());
    }
    let all = s
        .init_containers
        .iter()
        .flatten()
        .map(|c| (c, true))
        .chain(s.containers.iter().map(|c| (c, false)));
    for (c, init) in all {
        let n = &c.name;
        for (set, what) in [
            (
                // Sidecars are init containers with Always; nothing else is valid.
                c.restart_policy
                    .as_deref()
                    .is_some_and(|p| !init || p != "Always"),
                "restartPolicy other than Always on an init container",
            ),
            (c.resize_policy.is_some(), "resizePolicy"),
        ] {
            if set {
                out.push(format!("container {n:?}: {what}"));
            }
        }
    }
    out
}

/// The pod's QoS class, as upstream's `GetPodQOS`.
pub fn qos_class(pod: &Pod) -> &'static str {
    let s = spec(pod);
    let containers: Vec<&Container> = s
        .init_containers
        .iter()
        .flatten()
        .chain(s.containers.iter())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let r = c.resources.as_ref();
        let req = r.and_then(|r| r.requests.as_ref());
        let lim = r.and_then(|r| r.limits.as_ref());
        for res in ["cpu", "memory"] {
            let rq = req
                .and_then(|m| m.get(res))
                .and_then(|q| quantity::parse_quantity(q).ok());
            let lm = lim
                .and_then(|m| m.get(res))
                .and_then(|q| quantity::parse_quantity(q).ok());
            if rq.is_some_and(|a| a.millis() != 0) || lm.is_some_and(|a| a.millis() != 0) {
                any = true;
            }
            match (rq, lm) {
                (_, None) => guaranteed = false,
                (Some(a), Some(b)) if a != b => guaranteed = false,
                _ => {}
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The pod's cgroup parent as upstream's cgroupfs driver names it: with `cgroupsPerQOS`
/// (`per_qos`) the pod cgroup `<root>/kubepods[/burstable|/besteffort]/pod<uid>`; without, the
/// pods' containers go directly under `cgroupRoot` (`root`, a cgroupfs path such as `/`).
pub fn cgroup_parent(pod: &Pod, root: &str, per_qos: bool) -> String {
    let root = root.trim_end_matches('/');
    if !per_qos {
        return if root.is_empty() {
            "/".into()
        } else {
            root.into()
        };
    }
    let uid = ids(pod).2;
    match qos_class(pod) {
        "Guaranteed" => format!("{root}/kubepods/pod{uid}"),
        "Burstable" => format!("{root}/kubepods/burstable/pod{uid}"),
        _ => format!("{root}/kubepods/besteffort/pod{uid}"),
    }
}

/// The CFS period the kubelet uses.
const CPU_PERIOD: i64 = 100_000;

/// A container's requests and limits as CRI resources (upstream's
/// `generateLinuxContainerResources` with cgroup v1 shares), `memory_capacity` for the
/// Burstable OOM score.
pub fn container_resources(
    pod: &Pod,
    c: &Container,
    memory_capacity: u64,
) -> LinuxContainerResources {
    let r = c.resources.as_ref();
    let get =
        |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| {
            m.and_then(|m| m.get(k))
                .and_then(|q| quantity::parse_quantity(q).ok())
        };
    let req = r.and_then(|r| r.requests.as_ref());
    let lim = r.and_then(|r| r.limits.as_ref());
    let cpu_req = get(req, "cpu").or(get(lim, "cpu"));
    let cpu_lim = get(lim, "cpu");
    let mem_req = get(req, "memory").or(get(lim, "memory"));
    let mem_lim = get(lim, "memory");
    let shares = match cpu_req {
        Some(a) if a.millis() > 0 => (a.millis() * 1024 / 1000).max(2),
        _ => 2,
    };
    let quota = cpu_lim
        .filter(|a| a.millis() > 0)
        .map(|a| (a.millis() * i128::from(CPU_PERIOD) / 1000).max(1000))
        .unwrap_or(0);
    let oom = match qos_class(pod) {
        "Guaranteed" => -997,
        "BestEffort" => 1000,
        _ => {
            let req = mem_req.map(|a| a.units()).unwrap_or(0).max(0);
            let cap = i128::from(memory_capacity.max(1));
            (1000 - 1000 * req / cap).clamp(2, 999)
        }
    };
    LinuxContainerResources {
        cpu_period: if quota > 0 { CPU_PERIOD } else { 0 },
        cpu_quota: i64::try_from(quota).unwrap_or(i64::MAX),
        cpu_shares: i64::try_from(shares).unwrap_or(i64::MAX),
        memory_limit_in_bytes: mem_lim
            .map(|a| i64::try_from(a.units().max(0)).unwrap_or(i64::MAX))
            .unwrap_or(0),
        oom_score_adj: i64::try_from(oom).unwrap_or(1000),
        ..Default::default()
    }
}

/// The FNV-1a 32-bit hash of a container's spec (as JSON), hex: upstream's
/// `io.kubernetes.container.hash` is FNV-32a too, over a different encoding.
pub fn container_hash(c: &Container) -> String {
    let bytes = serde_json::to_vec(c).unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:x}")
}

/// Expands `$(VAR)` references in `input` from `env` as upstream's `expansion.Expand`: an
/// unknown name is left as written, `$$` is an escaped `$`.
pub fn expand(input: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(j) => {
                    let name = &tail[..j];
                    match env(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &tail[j + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = tail;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// What a container's environment may refer to besides the pod.
#[derive(Debug, Clone, Default)]
pub struct RuntimeFacts {
    /// The node's IP.
    pub host_ip: String,
    /// The pod's IPs (the first is `status.podIP`).
    pub pod_ips: Vec<String>,
    /// The node's name.
    pub node_name: String,
}

/// A `fieldRef` value (upstream's `podFieldSelectorRuntimeValue` for the common paths).
pub fn field_value(pod: &Pod, path: &str, facts: &RuntimeFacts) -> Result<String, String> {
    let m = &pod.metadata;
    let s = spec(pod);
    let key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => s
            .node_name
            .clone()
            .unwrap_or_else(|| facts.node_name.clone()),
        "spec.serviceAccountName" => s.service_account_name.clone().unwrap_or_default(),
        "status.hostIP" => facts.host_ip.clone(),
        "status.hostIPs" => facts.host_ip.clone(),
        "status.podIP" => facts.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => facts.pod_ips.join(","),
        _ => {
            if let Some(k) = key("metadata.labels['") {
                m.labels
                    .as_ref()
                    .and_then(|l| l.get(&k))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(k) = key("metadata.annotations['") {
                m.annotations
                    .as_ref()
                    .and_then(|l| l.get(&k))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldRef path {path:?}"));
            }
        }
    })
}

/// A container's environment with nothing but the pod and `facts` (no ConfigMaps, Secrets or
/// allocatable): see [`super::env::environment`].
pub fn environment(
    pod: &Pod,
    c: &Container,
    facts: &RuntimeFacts,
) -> Result<Vec<KeyValue>, String> {
    super::env::environment(pod, c, facts, &super::env::Resolved::default())
}

/// A resolv.conf's servers, searches and options.
pub fn parse_resolv_conf(text: &str) -> DnsConfig {
    let mut d = DnsConfig::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => d.servers.extend(f.next().map(str::to_string)),
            Some("search") | Some("domain") => d.searches = f.map(str::to_string).collect(),
            Some("options") => d.options.extend(f.map(str::to_string)),
            _ => {}
        }
    }
    d
}

/// The pod's DNS config as upstream's `GetPodDNS`: ClusterFirst (when clusterDNS is set and
/// the pod is not on the host network, unless ClusterFirstWithHostNet) uses the cluster's
/// servers and search path with `ndots:5`; Default the host's resolv.conf; None only the
/// pod's dnsConfig, which is merged in every case.
pub fn dns_config(
    pod: &Pod,
    cluster_dns: &[std::net::IpAddr],
    cluster_domain: Option<&str>,
    host: &DnsConfig,
) -> DnsConfig {
    let s = spec(pod);
    let policy = s.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let hostnet = host_network(pod);
    let cluster = !cluster_dns.is_empty()
        && (policy == "ClusterFirstWithHostNet" || (policy == "ClusterFirst" && !hostnet));
    let mut d = if policy == "None" {
        DnsConfig::default()
    } else if cluster {
        let ns = ids(pod).1;
        let mut searches = Vec::new();
        if let Some(domain) = cluster_domain {
            searches = vec![
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_string(),
            ];
        }
        searches.extend(host.searches.iter().cloned());
        DnsConfig {
            servers: cluster_dns.iter().map(|ip| ip.to_string()).collect(),
            searches,
            options: vec!["ndots:5".into()],
        }
    } else {
        host.clone()
    };
    if let Some(c) = &s.dns_config {
        for n in c.nameservers.iter().flatten() {
            if !d.servers.contains(n) {
                d.servers.push(n.clone());
            }
        }
        for n in c.searches.iter().flatten() {
            if !d.searches.contains(n) {
                d.searches.push(n.clone());
            }
        }
        for o in c.options.iter().flatten() {
            let v = match &o.value {
                Some(v) => format!("{}:{v}", o.name.clone().unwrap_or_default()),
                None => o.name.clone().unwrap_or_default(),
            };
            let key = |s: &str| s.split(':').next().unwrap_or_default().to_string();
            d.options.retain(|x| key(x) != key(&v));
            d.options.push(v);
        }
    }
    d
}

/// The pod's namespace options.
pub fn namespace_options(pod: &Pod) -> NamespaceOption {
    let s = spec(pod);
    let mode = |host: Option<bool>, otherwise: NamespaceMode| {
        if host.unwrap_or(false) {
            NamespaceMode::Node
        } else {
            otherwise
        }
    };
    let pid_default = if s.share_process_namespace.unwrap_or(false) {
        NamespaceMode::Pod
    } else {
        NamespaceMode::Container
    };
    NamespaceOption {
        network: mode(s.host_network, NamespaceMode::Pod) as i32,
        pid: mode(s.host_pid, pid_default) as i32,
        ipc: mode(s.host_ipc, NamespaceMode::Pod) as i32,
        ..Default::default()
    }
}

/// The pod's log directory under `logs_root`: `<ns>_<name>_<uid>`.
pub fn log_directory(logs_root: &Path, pod: &Pod) -> PathBuf {
    let (name, ns, uid) = ids(pod);
    logs_root.join(format!("{ns}_{name}_{uid}"))
}

/// The sandbox's hostname (upstream `GeneratePodHostNameAndDomain`, without the subdomain).
pub fn pod_hostname(pod: &Pod) -> String {
    let s = spec(pod);
    let h = s
        .hostname
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| ids(pod).0.to_string());
    let h: String = h.chars().take(63).collect();
    h.trim_end_matches(['-', '.']).to_string()
}

/// The sandbox config, as upstream's `generatePodSandboxConfig`.
pub fn sandbox_config(
    pod: &Pod,
    attempt: u32,
    logs_root: &Path,
    dns: DnsConfig,
    cgroup_parent: String,
) -> PodSandboxConfig {
    let (name, ns, uid) = ids(pod);
    let s = spec(pod);
    let mut labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.insert(POD_NAME_LABEL.into(), name.into());
    labels.insert(POD_NAMESPACE_LABEL.into(), ns.into());
    labels.insert(POD_UID_LABEL.into(), uid.into());
    let annotations: HashMap<String, String> = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut port_mappings = Vec::new();
    for c in &s.containers {
        for p in c.ports.iter().flatten() {
            if p.host_port.unwrap_or(0) == 0 {
                continue;
            }
            let protocol = match p.protocol.as_deref() {
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                _ => Protocol::Tcp,
            };
            port_mappings.push(PortMapping {
                protocol: protocol as i32,
                container_port: p.container_port,
                host_port: p.host_port.unwrap_or(0),
                host_ip: p.host_ip.clone().unwrap_or_default(),
            });
        }
    }
    let sc = s.security_context.as_ref();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: ns.into(),
            attempt,
        }),
        hostname: if host_network(pod) {
            String::new()
        } else {
            pod_hostname(pod)
        },
        log_directory: log_directory(logs_root, pod).display().to_string(),
        dns_config: Some(dns),
        port_mappings,
        labels,
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent,
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod)),
                run_as_user: sc
                    .and_then(|c| c.run_as_user)
                    .map(|value| Int64Value { value }),
                run_as_group: sc
                    .and_then(|c| c.run_as_group)
                    .map(|value| Int64Value { value }),
                supplemental_groups: supplemental_groups(pod),
                ..Default::default()
            }),
            sysctls: sc
                .and_then(|c| c.sysctls.as_ref())
                .map(|l| {
                    l.iter()
                        .map(|s| (s.name.clone(), s.value.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The supplemental groups of the pod's sandbox and of each of its containers, as upstream's
/// `determineEffectiveSecurityContext`: the pod's `fsGroup` first, then its
/// `supplementalGroups`.
pub fn supplemental_groups(pod: &Pod) -> Vec<i64> {
    let Some(sc) = spec(pod).security_context.as_ref() else {
        return Vec::new();
    };
    sc.fs_group
        .into_iter()
        .chain(sc.supplemental_groups.iter().flatten().copied())
        .collect()
}

/// The directory of volume `v`'s plugin under `<pods-dir>/<uid>/volumes/` (upstream's
/// escaped plugin names); `None` for hostPath and what is not supported.
pub fn volume_plugin_dir(v: &Volume) -> Option<&'static str> {
    if v.empty_dir.is_some() {
        Some("kubernetes.io~empty-dir")
    } else if v.config_map.is_some() {
        Some("kubernetes.io~configmap")
    } else if v.secret.is_some() {
        Some("kubernetes.io~secret")
    } else if v.downward_api.is_some() {
        Some("kubernetes.io~downward-api")
    } else if v.projected.is_some() {
        Some("kubernetes.io~projected")
    } else {
        None
    }
}

/// Whether `v` holds API data (configMap, secret, downwardAPI, projected): mounted read-only.
pub fn api_data_volume(v: &Volume) -> bool {
    v.config_map.is_some()
        || v.secret.is_some()
        || v.downward_api.is_some()
        || v.projected.is_some()
}

/// The pod's directory on the node: `<pods-dir>/<uid>`.
pub fn pod_dir(pods_dir: &Path, pod: &Pod) -> PathBuf {
    pods_dir.join(ids(pod).2)
}

/// Where a pod's volumes live on the node.
pub fn volume_host_path(pods_dir: &Path, pod: &Pod, volume: &str) -> Option<PathBuf> {
    let v = spec(pod)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)?;
    if let Some(h) = &v.host_path {
        return Some(PathBuf::from(&h.path));
    }
    let plugin = volume_plugin_dir(v)?;
    Some(
        pod_dir(pods_dir, pod)
            .join("volumes")
            .join(plugin)
            .join(volume),
    )
}

/// Everything [`container_config`] needs besides the pod and container.
#[derive(Debug, Clone)]
pub struct ContainerInputs<'a> {
    /// The container's restart count (its attempt).
    pub restart_count: u32,
    /// The image reference the runtime pulled.
    pub image_ref: String,
    /// The node's memory, for the OOM score.
    pub memory_capacity: u64,
    /// The kubelet's pods directory (volumes).
    pub pods_dir: &'a Path,
    /// Facts for fieldRef.
    pub facts: &'a RuntimeFacts,
}

/// The container config, as upstream's `generateContainerConfig`. An error is a
/// `CreateContainerConfigError` with its message.
pub fn container_config(
    pod: &Pod,
    c: &Container,
    inputs: &ContainerInputs<'_>,
) -> Result<ContainerConfig, String> {
    container_config_with(pod, c, inputs, &super::env::Resolved::default())
}

/// [`container_config`] with the ConfigMaps, Secrets and allocatable the pod refers to.
pub fn container_config_with(
    pod: &Pod,
    c: &Container,
    inputs: &ContainerInputs<'_>,
    resolved: &super::env::Resolved,
) -> Result<ContainerConfig, String> {
    let (name, ns, uid) = ids(pod);
    let envs = super::env::environment(pod, c, inputs.facts, resolved)?;
    let lookup = |n: &str| {
        envs.iter()
            .find(|kv| kv.key == n)
            .map(|kv| kv.value.clone())
    };
    let command = c
        .command
        .iter()
        .flatten()
        .map(|a| expand(a, &lookup))
        .collect();
    let args = c
        .args
        .iter()
        .flatten()
        .map(|a| expand(a, &lookup))
        .collect();
    let labels = HashMap::from([
        (POD_NAME_LABEL.to_string(), name.to_string()),
        (POD_NAMESPACE_LABEL.to_string(), ns.to_string()),
        (POD_UID_LABEL.to_string(), uid.to_string()),
        (CONTAINER_NAME_LABEL.to_string(), c.name.clone()),
    ]);
    let mut annotations = HashMap::from([
        (CONTAINER_HASH.to_string(), container_hash(c)),
        (
            CONTAINER_RESTART_COUNT.to_string(),
            inputs.restart_count.to_string(),
        ),
        (
            CONTAINER_TERMINATION_MESSAGE_PATH.to_string(),
            c.termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".into()),
        ),
        (
            CONTAINER_TERMINATION_MESSAGE_POLICY.to_string(),
            c.termination_message_policy
                .clone()
                .unwrap_or_else(|| "File".into()),
        ),
    ]);
    if let Some(g) = spec(pod).termination_grace_period_seconds {
        annotations.insert(POD_TERMINATION_GRACE_PERIOD.into(), g.to_string());
    }
    if let Some(g) = pod.metadata.deletion_grace_period_seconds {
        annotations.insert(POD_DELETION_GRACE_PERIOD.into(), g.to_string());
    }
    if let Some(ports) = c.ports.as_ref().filter(|p| !p.is_empty()) {
        annotations.insert(
            CONTAINER_PORTS.into(),
            serde_json::to_string(ports).unwrap_or_default(),
        );
    }
    let mut mounts = Vec::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let volume = spec(pod)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name);
        let host = volume_host_path(inputs.pods_dir, pod, &m.name)
            .ok_or_else(|| format!("volumeMount {:?}: no volume of that name", m.name))?;
        let sub = m.sub_path.as_deref().is_some_and(|p| !p.is_empty())
            || m.sub_path_expr.as_deref().is_some_and(|p| !p.is_empty());
        let host = match resolved.sub_paths.get(&i) {
            Some(p) => p.clone(),
            None if sub => {
                return Err(format!(
                    "volumeMount {:?}: the subPath was not prepared",
                    m.name
                ));
            }
            None => host,
        };
        mounts.push(Mount {
            container_path: m.mount_path.clone(),
            host_path: host.display().to_string(),
            readonly: m.read_only.unwrap_or(false) || volume.is_some_and(api_data_volume),
            ..Default::default()
        });
    }
    if let (Some(file), Some(path)) = (
        &resolved.termination_log,
        c.termination_message_path.as_deref(),
    ) && !mounts.iter().any(|m| m.container_path == path)
    {
        mounts.push(Mount {
            container_path: path.to_string(),
            host_path: file.display().to_string(),
            ..Default::default()
        });
    }
    if let Some(hosts) = &resolved.etc_hosts
        && !mounts.iter().any(|m| m.container_path == "/etc/hosts")
    {
        mounts.push(Mount {
            container_path: "/etc/hosts".into(),
            host_path: hosts.display().to_string(),
            ..Default::default()
        });
    }
    let psc = spec(pod).security_context.as_ref();
    let sc = c.security_context.as_ref();
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let security = LinuxContainerSecurityContext {
        capabilities: caps.map(|c| Capability {
            add_capabilities: c.add.clone().unwrap_or_default(),
            drop_capabilities: c.drop.clone().unwrap_or_default(),
            ..Default::default()
        }),
        privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
        namespace_options: Some(namespace_options(pod)),
        run_as_user: sc
            .and_then(|s| s.run_as_user)
            .or(psc.and_then(|s| s.run_as_user))
            .map(|value| Int64Value { value }),
        run_as_group: sc
            .and_then(|s| s.run_as_group)
            .or(psc.and_then(|s| s.run_as_group))
            .map(|value| Int64Value { value }),
        readonly_rootfs: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        supplemental_groups: supplemental_groups(pod),
        no_new_privs: sc
            .and_then(|s| s.allow_privilege_escalation)
            .is_some_and(|a| !a),
        ..Default::default()
    };
    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: c.name.clone(),
            attempt: inputs.restart_count,
        }),
        image: Some(ImageSpec {
            image: inputs.image_ref.clone(),
            user_specified_image: c.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command,
        args,
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs,
        mounts,
        labels,
        annotations,
        log_path: format!("{}/{}.log", c.name, inputs.restart_count),
        // `kubectl run -it` / `attach`: the runtime keeps the container's stdin open (closed
        // after the first attach with stdinOnce) and gives it a terminal with tty.
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        linux: Some(LinuxContainerConfig {
            resources: Some(container_resources(pod, c, inputs.memory_capacity)),
            security_context: Some(security),
        }),
        ..Default::default()
    })
}

/// The image pull policy, defaulted as the API server does (`Always` for `:latest` or no tag).
pub fn pull_policy(c: &Container) -> &str {
    match c.image_pull_policy.as_deref() {
        Some(p) if !p.is_empty() => p,
        _ => {
            let image = c.image.as_deref().unwrap_or_default();
            let last = image.rsplit('/').next().unwrap_or_default();
            let tagged = last.contains(':') || image.contains('@');
            if !tagged || image.ends_with(":latest") {
                "Always"
            } else {
                "IfNotPresent"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn expansion_as_upstream() {
        let env = |n: &str| match n {
            "A" => Some("x".to_string()),
            _ => None,
        };
        assert_eq!(expand("$(A)-$(B)-$$(A)-$A-$(", &env), "x-$(B)-$(A)-$A-$(");
    }

    #[test]
    fn env_with_field_refs_and_references() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "labels": {"app": "a"}},
            "spec": {"containers": [{"name": "c", "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "value": "$(A)2"},
                {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ]}]}
        }));
        let facts = RuntimeFacts {
            host_ip: "10.0.0.1".into(),
            pod_ips: vec!["10.1.0.2".into()],
            node_name: "n1".into(),
        };
        let env = environment(&p, &spec(&p).containers[0], &facts).expect("env");
        let kv: Vec<(String, String)> = env.into_iter().map(|k| (k.key, k.value)).collect();
        let want = [
            ("A", "1"),
            ("B", "12"),
            ("N", "p"),
            ("L", "a"),
            ("IP", "10.1.0.2"),
        ];
        assert_eq!(
            kv,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );
    }

    #[test]
    fn qos_and_resources() {
        let mk = |res: serde_json::Value| {
            pod(serde_json::json!({"metadata": {"uid": "u"},
                "spec": {"containers": [{"name": "c", "resources": res}]}}))
        };
        let be = mk(serde_json::json!({}));
        assert_eq!(qos_class(&be), "BestEffort");
        assert_eq!(cgroup_parent(&be, "/", true), "/kubepods/besteffort/podu");
        assert_eq!(
            cgroup_parent(&be, "/dh/r/", true),
            "/dh/r/kubepods/besteffort/podu"
        );
        assert_eq!(cgroup_parent(&be, "/dh/r", false), "/dh/r");
        assert_eq!(cgroup_parent(&be, "/", false), "/");
        let g = mk(serde_json::json!({"limits": {"cpu": "500m", "memory": "64Mi"}}));
        assert_eq!(qos_class(&g), "Guaranteed");
        let r = container_resources(&g, &spec(&g).containers[0], 1 << 30);
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.cpu_period),
            (512, 50_000, 100_000)
        );
        assert_eq!((r.memory_limit_in_bytes, r.oom_score_adj), (64 << 20, -997));
        let b = mk(serde_json::json!({"requests": {"memory": "256Mi"}}));
        assert_eq!(qos_class(&b), "Burstable");
        let r = container_resources(&b, &spec(&b).containers[0], 1 << 30);
        assert_eq!((r.cpu_shares, r.oom_score_adj), (2, 750));
    }

    #[test]
    fn dns_policies() {
        let host = parse_resolv_conf("nameserver 1.1.1.1\nsearch example.org\noptions edns0\n");
        let p =
            pod(serde_json::json!({"metadata": {"namespace": "ns"}, "spec": {"containers": []}}));
        let ip: std::net::IpAddr = [10, 96, 0, 10].into();
        let d = dns_config(&p, &[ip], Some("cluster.local"), &host);
        assert_eq!(d.servers, ["10.96.0.10"]);
        assert_eq!(
            d.searches,
            [
                "ns.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "example.org"
            ]
        );
        assert_eq!(d.options, ["ndots:5"]);
        let hn = pod(serde_json::json!({"spec": {"hostNetwork": true, "containers": []}}));
        assert_eq!(dns_config(&hn, &[ip], None, &host), host);
        let none = pod(
            serde_json::json!({"spec": {"dnsPolicy": "None", "containers": [],
            "dnsConfig": {"nameservers": ["9.9.9.9"], "options": [{"name": "ndots", "value": "2"}]}}}),
        );
        let d = dns_config(&none, &[ip], None, &host);
        assert_eq!(
            (d.servers, d.options),
            (vec!["9.9.9.9".to_string()], vec!["ndots:2".to_string()])
        );
    }

    #[test]
    fn sandbox_config_as_upstream() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1", "labels": {"app": "w"}},
            "spec": {"hostNetwork": true, "containers": [{"name": "c",
                "ports": [{"containerPort": 80, "hostPort": 8080}]}]}
        }));
        let parent = cgroup_parent(&p, "/", true);
        let c = sandbox_config(
            &p,
            2,
            Path::new("/var/log/pods"),
            DnsConfig::default(),
            parent,
        );
        assert_eq!(
            c.linux.as_ref().map(|l| l.cgroup_parent.as_str()),
            Some("/kubepods/besteffort/podu1")
        );
        let m = c.metadata.expect("metadata");
        assert_eq!(
            (
                m.name.as_str(),
                m.namespace.as_str(),
                m.uid.as_str(),
                m.attempt
            ),
            ("web", "ns", "u1", 2)
        );
        assert_eq!(c.log_directory, "/var/log/pods/ns_web_u1");
        assert_eq!(c.labels[POD_UID_LABEL], "u1");
        assert_eq!(c.labels["app"], "w");
        assert_eq!(c.port_mappings[0].host_port, 8080);
        let ns = c
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .expect("namespaces");
        assert_eq!(ns.network, NamespaceMode::Node as i32);
        assert_eq!(ns.pid, NamespaceMode::Container as i32);
    }

    #[test]
    fn unsupported_fields_are_named() {
        // gRPC probes and stdin/tty containers are supported; an nfs volume is not.
        let p = pod(serde_json::json!({"spec": {"containers": [{"name": "c",
            "livenessProbe": {"grpc": {"port": 1}}, "stdin": true, "stdinOnce": true, "tty": true}],
            "volumes": [{"name": "s", "nfs": {"server": "x", "path": "/"}}, {"name": "e", "emptyDir": {}},
                {"name": "m", "emptyDir": {"medium": "Memory"}}, {"name": "c", "secret": {"secretName": "x"}}]}}));
        let u = unsupported(&p);
        assert_eq!(u.len(), 1, "{u:?}");
        assert!(u[0].contains("\"s\""));
    }

    #[test]
    fn stdin_and_tty_go_into_the_container_config() {
        let facts = RuntimeFacts::default();
        let inputs = ContainerInputs {
            restart_count: 0,
            image_ref: "img".into(),
            memory_capacity: 1 << 30,
            pods_dir: Path::new("/nonexistent/dh-pods"),
            facts: &facts,
        };
        let p = pod(
            serde_json::json!({"metadata": {"uid": "u"}, "spec": {"containers": [
            {"name": "i", "stdin": true, "stdinOnce": true, "tty": true},
            {"name": "s", "stdin": true},
            {"name": "plain"}]}}),
        );
        let flags = |i: usize| {
            let c = container_config(&p, &spec(&p).containers[i], &inputs).expect("config");
            (c.stdin, c.stdin_once, c.tty)
        };
        assert_eq!(flags(0), (true, true, true));
        assert_eq!(flags(1), (true, false, false));
        assert_eq!(flags(2), (false, false, false));
    }

    #[test]
    fn sidecars_are_admitted() {
        let p = pod(serde_json::json!({"spec": {
            "initContainers": [{"name": "s", "restartPolicy": "Always"},
                {"name": "n", "restartPolicy": "Never"}],
            "containers": [{"name": "c", "restartPolicy": "Always"}]}}));
        let u = unsupported(&p);
        assert_eq!(u.len(), 2, "{u:?}");
        assert!(u[0].contains("\"n\"") && u[0].contains("restartPolicy"));
        assert!(u[1].contains("\"c\"") && u[1].contains("restartPolicy"));
    }

    #[test]
    fn pull_policy_defaults() {
        let c = |i: &str| Container {
            name: "c".into(),
            image: Some(i.into()),
            ..Default::default()
        };
        assert_eq!(pull_policy(&c("busybox")), "Always");
        assert_eq!(pull_policy(&c("r:5000/busybox:latest")), "Always");
        assert_eq!(pull_policy(&c("r:5000/busybox")), "Always");
        assert_eq!(pull_policy(&c("r:5000/busybox:1.0")), "IfNotPresent");
    }

    #[test]
    fn fs_group_comes_first_in_the_supplemental_groups() {
        let p = pod(serde_json::json!({"metadata": {"uid": "u"}, "spec": {
            "securityContext": {"fsGroup": 2345, "supplementalGroups": [7, 8]},
            "containers": [{"name": "c"}]}}));
        assert_eq!(supplemental_groups(&p), vec![2345, 7, 8]);
        let sandbox = sandbox_config(
            &p,
            0,
            Path::new("/var/log/pods"),
            DnsConfig::default(),
            cgroup_parent(&p, "/", true),
        );
        let groups = sandbox
            .linux
            .and_then(|l| l.security_context)
            .map(|s| s.supplemental_groups);
        assert_eq!(groups, Some(vec![2345, 7, 8]));
        let facts = RuntimeFacts::default();
        let inputs = ContainerInputs {
            restart_count: 0,
            image_ref: "img".into(),
            memory_capacity: 1 << 30,
            pods_dir: Path::new("/nonexistent/dh-pods"),
            facts: &facts,
        };
        let c = container_config(&p, &spec(&p).containers[0], &inputs).expect("config");
        let groups = c
            .linux
            .and_then(|l| l.security_context)
            .map(|s| s.supplemental_groups);
        assert_eq!(groups, Some(vec![2345, 7, 8]));
        let none = pod(serde_json::json!({"spec": {"containers": [{"name": "c"}]}}));
        assert!(supplemental_groups(&none).is_empty());
    }
}
