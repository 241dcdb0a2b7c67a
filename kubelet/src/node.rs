//! The Node object: registration, re-registration and status, as upstream's kubelet.
//!
//! [`NodeController`] is one reconciler. Each run observes the machine and the runtime (CRI
//! Version, Status, ListImages, ImageFsInfo), registers the Node when it is not (creating it, or
//! reconciling labels and annotations of one that exists already), applies the Node's podCIDR
//! to the runtime, and patches `nodes/status` (strategic merge) when the status changed or
//! `nodeStatusReportFrequency` has passed. It runs every `nodeStatusUpdateFrequency` and
//! whenever [`watch_node`] sees the Node deleted, re-created or its podCIDR set, so a deleted
//! Node is registered again at once. [`NodeState`] publishes the Node's UID and podCIDR to the
//! rest of the kubelet (the Lease's ownerReference).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ContainerImage, DaemonEndpoint, Node, NodeAddress, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::conditions::{self, Condition, RuntimeHealth};
use crate::config::Config;
use crate::eviction::{self, Observation, Observations, PressureTracker, Signal};
use crate::machine::{self, MachineInfo};
use crate::quantity::{Amount, Format};
use crate::reconcile::{Action, Backoff, Reconciler, Trigger};
use crate::resources::{self, ResourceList};
use crate::runtime::RuntimeClient;

/// The version the kubelet reports: the Kubernetes API level it implements (that of the test
/// bed's control plane), with Deckhand's version as semver build metadata.
pub const KUBELET_VERSION: &str = concat!("v1.20.2+deckhand.", env!("CARGO_PKG_VERSION"));

/// Upstream's cap on the names reported per image (`MaxNamesPerImageInNodeStatus`).
pub const MAX_NAMES_PER_IMAGE: usize = 5;

/// The annotation telling the attach/detach controller to manage this node's volumes.
pub const CONTROLLER_MANAGED_ATTACH_DETACH: &str =
    "volumes.kubernetes.io/controller-managed-attach-detach";

/// The registered Node as the rest of the kubelet sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The Node's UID while it is registered.
    pub uid: Option<String>,
    /// The pod CIDR in use (the Node's spec.podCIDR, else the configured podCIDR).
    pub pod_cidr: Option<String>,
}

/// An error of one node reconcile.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The API server refused or failed a request.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// The Node exists but registerNode is false and it is gone.
    #[error("node {0} does not exist and registerNode is false")]
    NotRegistered(String),
}

fn api(what: &'static str) -> impl FnOnce(kube::Error) -> NodeError {
    move |source| NodeError::Api { what, source }
}

/// What one observation of machine and runtime found.
#[derive(Debug, Clone)]
struct Facts {
    capacity: ResourceList,
    allocatable: ResourceList,
    conditions: Vec<Condition>,
    runtime_version: Option<String>,
    images: Option<Vec<ContainerImage>>,
}

/// Registers the Node and keeps its status current.
pub struct NodeController {
    nodes: Api<Node>,
    config: Arc<Config>,
    runtime: Arc<RuntimeClient>,
    machine: MachineInfo,
    node_ip: IpAddr,
    health: RuntimeHealth,
    pressure: PressureTracker,
    runtime_version: Option<String>,
    uid: Option<String>,
    last_report: Option<Instant>,
    applied_pod_cidr: Option<String>,
    state: watch::Sender<NodeState>,
    backoff: Backoff,
}

impl NodeController {
    /// A controller for the node described by `config`.
    pub fn new(
        client: kube::Client,
        config: Arc<Config>,
        runtime: Arc<RuntimeClient>,
        machine: MachineInfo,
        node_ip: IpAddr,
        state: watch::Sender<NodeState>,
    ) -> NodeController {
        let transition = config.kubelet.eviction_pressure_transition_period;
        let update = config.kubelet.node_status_update_frequency;
        NodeController {
            nodes: Api::all(client),
            config,
            runtime,
            machine,
            node_ip,
            health: RuntimeHealth::default(),
            pressure: PressureTracker::new(transition),
            runtime_version: None,
            uid: None,
            last_report: None,
            applied_pod_cidr: None,
            state,
            backoff: Backoff::new(
                Duration::from_millis(200),
                update.max(Duration::from_secs(1)),
            ),
        }
    }

    fn name(&self) -> &str {
        &self.config.node_name
    }

    /// Reads the runtime and the machine. Runtime errors are recorded, never fatal: the node then
    /// reports NotReady with the reason.
    async fn observe(&mut self) -> Facts {
        let now = Instant::now();
        let cri_limit = self
            .config
            .kubelet
            .node_status_update_frequency
            .clamp(Duration::from_secs(2), Duration::from_secs(30));
        let runtime = self.runtime.clone();
        let cri = async {
            futures::join!(
                runtime.version(),
                runtime.status(),
                runtime.list_images(),
                runtime.image_fs_info()
            )
        };
        let (version, status, images, image_fs) = match tokio::time::timeout(cri_limit, cri).await {
            Ok(r) => (Some(r.0), Some(r.1), Some(r.2), Some(r.3)),
            Err(_) => {
                tracing::warn!(
                    endpoint = self.runtime.endpoint(),
                    "container runtime did not answer within {cri_limit:?}"
                );
                (None, None, None, None)
            }
        };
        match version {
            Some(Ok(v)) => {
                self.runtime_version = Some(format!("{}://{}", v.runtime_name, v.runtime_version));
            }
            Some(Err(e)) => tracing::warn!("container runtime version: {e}"),
            None => {}
        }
        match status {
            Some(Ok(s)) => self.health.observe(s.as_ref(), now),
            Some(Err(e)) => tracing::warn!("container runtime status check failed: {e}"),
            None => {}
        }
        let images = match images {
            Some(Ok(list)) => Some(node_images(
                list,
                self.config.kubelet.node_status_max_images,
            )),
            Some(Err(e)) => {
                tracing::warn!("listing images: {e}");
                None
            }
            None => None,
        };
        let image_fs_path = match image_fs {
            Some(Ok(info)) => info
                .image_filesystems
                .iter()
                .find_map(|f| f.fs_id.as_ref().map(|id| PathBuf::from(&id.mountpoint)))
                .filter(|p| p.is_absolute() && p.exists()),
            Some(Err(e)) => {
                tracing::debug!("image filesystem info: {e}");
                None
            }
            None => None,
        };

        let root_dir = self.config.root_dir.clone();
        let root_fs = machine::fs_stats(&root_dir)
            .inspect_err(|e| tracing::warn!("{e}"))
            .ok();
        let kc = &self.config.kubelet;
        let (capacity, allocatable) =
            capacity_and_allocatable(&self.config, &self.machine, root_fs.as_ref());

        let observations = observe_signals(root_fs.as_ref(), image_fs_path.as_deref());
        let met = eviction::thresholds_met(&kc.eviction_hard, &observations);
        for t in &met {
            tracing::debug!(signal = %t.signal, "eviction threshold met");
        }
        let pressure = self.pressure.update(now, &met);
        let missing: Vec<&str> = [
            resources::CPU,
            resources::MEMORY,
            resources::PODS,
            resources::EPHEMERAL_STORAGE,
        ]
        .into_iter()
        .filter(|r| !capacity.contains_key(*r))
        .collect();
        let mut conds: Vec<Condition> = conditions::pressure(pressure).into();
        conds.push(conditions::ready(&self.health, &missing, now));
        Facts {
            capacity,
            allocatable,
            conditions: conds,
            runtime_version: self.runtime_version.clone(),
            images,
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        node_labels(&self.config, &self.machine)
    }

    fn addresses(&self) -> Vec<NodeAddress> {
        vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: self.node_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: self.config.hostname.clone(),
            },
        ]
    }

    fn node_info(&self, runtime_version: Option<&str>) -> NodeSystemInfo {
        let m = &self.machine;
        NodeSystemInfo {
            architecture: m.architecture.clone(),
            boot_id: m.boot_id.clone(),
            container_runtime_version: runtime_version.unwrap_or_default().to_string(),
            kernel_version: m.kernel_version.clone(),
            kube_proxy_version: KUBELET_VERSION.into(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: m.machine_id.clone(),
            operating_system: m.operating_system.clone(),
            os_image: m.os_image.clone(),
            system_uuid: m.system_uuid.clone(),
            ..Default::default()
        }
    }

    fn daemon_endpoints(&self) -> NodeDaemonEndpoints {
        NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(self.config.kubelet.port),
            }),
        }
    }

    /// The status to report, given the current one.
    fn desired_status(&self, current: &NodeStatus, facts: &Facts, now: Timestamp) -> NodeStatus {
        let current_conditions = current.conditions.as_deref().unwrap_or_default();
        NodeStatus {
            addresses: Some(self.addresses()),
            allocatable: Some(resources::to_quantities(&facts.allocatable)),
            capacity: Some(resources::to_quantities(&facts.capacity)),
            conditions: Some(conditions::merge(
                current_conditions,
                &facts.conditions,
                now,
            )),
            daemon_endpoints: Some(self.daemon_endpoints()),
            images: facts.images.clone().or_else(|| current.images.clone()),
            node_info: Some(
                self.node_info(
                    facts.runtime_version.as_deref().or(current
                        .node_info
                        .as_ref()
                        .map(|i| i.container_runtime_version.as_str())),
                ),
            ),
            ..Default::default()
        }
    }

    fn initial_node(&self, facts: &Facts) -> Node {
        let taints = &self.config.kubelet.register_with_taints;
        Node {
            metadata: ObjectMeta {
                name: Some(self.name().to_string()),
                labels: Some(self.labels()),
                annotations: Some(BTreeMap::from([(
                    CONTROLLER_MANAGED_ATTACH_DETACH.to_string(),
                    "true".to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!taints.is_empty()).then(|| taints.clone()),
                ..Default::default()
            }),
            status: Some(self.desired_status(&NodeStatus::default(), facts, Timestamp::now())),
        }
    }

    /// Creates the Node, or brings an existing one's labels and annotations in line (upstream
    /// `tryRegisterWithAPIServer`). Returns the Node as the API server has it.
    async fn register(&mut self, facts: &Facts) -> Result<Node, NodeError> {
        let node = self.initial_node(facts);
        match self.nodes.create(&PostParams::default(), &node).await {
            Ok(created) => {
                tracing::info!(node = self.name(), "registered the node");
                self.last_report = Some(Instant::now());
                Ok(created)
            }
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                let existing = self
                    .nodes
                    .get(self.name())
                    .await
                    .map_err(api("reading the existing node"))?;
                let node = self.reconcile_existing(existing).await?;
                tracing::info!(
                    node = self.name(),
                    "node was registered already; reconciled it"
                );
                Ok(node)
            }
            Err(e) => Err(api("registering the node")(e)),
        }
    }

    /// Sets the default and configured labels and the attach/detach annotation on an existing
    /// Node; its taints and spec are left alone (NodeRestriction forbids changing them).
    async fn reconcile_existing(&self, existing: Node) -> Result<Node, NodeError> {
        let have_labels = existing.metadata.labels.clone().unwrap_or_default();
        let labels: BTreeMap<String, String> = self
            .labels()
            .into_iter()
            .filter(|(k, v)| have_labels.get(k) != Some(v))
            .collect();
        let annotated = existing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONTROLLER_MANAGED_ATTACH_DETACH))
            .is_some_and(|v| v == "true");
        if labels.is_empty() && annotated {
            return Ok(existing);
        }
        let patch = json!({
            "metadata": {
                "labels": labels,
                "annotations": { CONTROLLER_MANAGED_ATTACH_DETACH: "true" },
            }
        });
        self.nodes
            .patch(self.name(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api("updating the existing node's labels"))
    }

    /// Hands the pod CIDR to the runtime when it changed (upstream `updatePodCIDR`).
    async fn apply_pod_cidr(&mut self, node: Option<&Node>) {
        let from_node = node
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.pod_cidr.clone())
            .filter(|c| !c.is_empty());
        let cidr = from_node.or_else(|| self.config.kubelet.pod_cidr.clone());
        if cidr == self.applied_pod_cidr {
            return;
        }
        if let Some(c) = &cidr {
            match self.runtime.update_pod_cidr(c).await {
                Ok(()) => tracing::info!(pod_cidr = %c, "pod CIDR handed to the runtime"),
                Err(e) => {
                    tracing::warn!(pod_cidr = %c, "updating the runtime's pod CIDR: {e}");
                    return;
                }
            }
        }
        self.applied_pod_cidr = cidr;
    }

    fn publish(&self) {
        let state = NodeState {
            uid: self.uid.clone(),
            pod_cidr: self.applied_pod_cidr.clone(),
        };
        self.state.send_if_modified(|s| {
            if *s == state {
                false
            } else {
                *s = state;
                true
            }
        });
    }

    fn forget_node(&mut self) {
        if self.uid.take().is_some() {
            tracing::warn!(
                node = self.name(),
                "the node object is gone; registering it again"
            );
        }
        self.last_report = None;
        self.publish();
    }

    async fn sync(&mut self) -> Result<Action, NodeError> {
        let update_every = self.config.kubelet.node_status_update_frequency;
        let facts = self.observe().await;

        let node = if self.uid.is_none() {
            if self.config.kubelet.register_node {
                self.register(&facts).await?
            } else {
                match self
                    .nodes
                    .get_opt(self.name())
                    .await
                    .map_err(api("reading the node"))?
                {
                    Some(n) => n,
                    None => return Err(NodeError::NotRegistered(self.name().to_string())),
                }
            }
        } else {
            match self
                .nodes
                .get_opt(self.name())
                .await
                .map_err(api("reading the node"))?
            {
                Some(n) => n,
                None => {
                    self.forget_node();
                    return Ok(Action::requeue_now());
                }
            }
        };
        let uid = node.metadata.uid.clone();
        if self.uid.is_some() && uid != self.uid {
            // Deleted and created again by someone else: adopt it as upstream would at start.
            tracing::info!(node = self.name(), "the node object was re-created");
            self.reconcile_existing(node.clone()).await?;
        }
        self.uid = uid;
        self.apply_pod_cidr(Some(&node)).await;
        self.publish();

        let current = node.status.clone().unwrap_or_default();
        let desired = self.desired_status(&current, &facts, Timestamp::now());
        let changes = status_changes(&current, &desired);
        let changed = !changes.is_empty();
        if changed {
            tracing::debug!(node = self.name(), ?changes, "node status changed");
        }
        let report_due = self
            .last_report
            .is_none_or(|t| t.elapsed() >= self.config.kubelet.node_status_report_frequency);
        if changed || report_due {
            let patch = status_patch(&current, &desired);
            match self
                .nodes
                .patch_status(
                    self.name(),
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
            {
                Ok(_) => {
                    self.last_report = Some(Instant::now());
                    if changed {
                        log_status_change(&current, &desired);
                    }
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    self.forget_node();
                    return Ok(Action::requeue_now());
                }
                Err(e) => return Err(api("updating node status")(e)),
            }
        }
        self.backoff.reset();
        Ok(Action::requeue(update_every))
    }
}

impl Reconciler for NodeController {
    type Error = NodeError;

    fn name(&self) -> &'static str {
        "node"
    }

    fn timeout(&self) -> Duration {
        (self.config.kubelet.node_status_update_frequency * 3).max(Duration::from_secs(30))
    }

    async fn reconcile(&mut self) -> Result<Action, NodeError> {
        self.sync().await
    }

    fn error_policy(&mut self, _: Option<&NodeError>) -> Action {
        Action::requeue(self.backoff.next_delay())
    }
}

fn log_status_change(current: &NodeStatus, desired: &NodeStatus) {
    let ready = |s: &NodeStatus| {
        s.conditions
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()))
    };
    let (before, after) = (ready(current), ready(desired));
    if before.as_ref().map(|r| &r.0) != after.as_ref().map(|r| &r.0)
        && let Some((status, message)) = after
    {
        tracing::info!(ready = %status, "node readiness changed: {message}");
    }
}

/// Reads the eviction signals: memory, the root dir's filesystem (nodefs), the runtime's image
/// filesystem (imagefs; nodefs when unknown) and PIDs. What cannot be read is left out.
fn observe_signals(root_fs: Option<&machine::FsStats>, image_fs: Option<&Path>) -> Observations {
    let bytes = |n: u64| Amount::from_units(n, Format::BinarySi);
    let count = |n: u64| Amount::from_units(n, Format::DecimalSi);
    let mut o = Observations::new();
    match machine::memory_stats() {
        Ok(m) => {
            o.insert(
                Signal::MemoryAvailable,
                Observation {
                    available: bytes(m.available_bytes),
                    capacity: bytes(m.capacity_bytes),
                },
            );
        }
        Err(e) => tracing::debug!("memory statistics: {e}"),
    }
    let mut fs_signals = |fs: &machine::FsStats, space: Signal, inodes: Signal| {
        o.insert(
            space,
            Observation {
                available: bytes(fs.available_bytes),
                capacity: bytes(fs.capacity_bytes),
            },
        );
        if fs.inodes > 0 {
            o.insert(
                inodes,
                Observation {
                    available: count(fs.inodes_free),
                    capacity: count(fs.inodes),
                },
            );
        }
    };
    if let Some(fs) = root_fs {
        fs_signals(fs, Signal::NodeFsAvailable, Signal::NodeFsInodesFree);
    }
    let image = image_fs.and_then(|p| machine::fs_stats(p).ok());
    if let Some(fs) = image.as_ref().or(root_fs) {
        fs_signals(fs, Signal::ImageFsAvailable, Signal::ImageFsInodesFree);
    }
    match machine::pid_stats() {
        Ok(p) => {
            o.insert(
                Signal::PidAvailable,
                Observation {
                    available: count(p.max.saturating_sub(p.running)),
                    capacity: count(p.max),
                },
            );
        }
        Err(e) => tracing::debug!("PID statistics: {e}"),
    }
    o
}

/// The node's capacity and allocatable from the machine and the configuration: what the Node
/// reports and what pods are admitted against.
pub fn capacity_and_allocatable(
    config: &Config,
    machine: &MachineInfo,
    root_fs: Option<&machine::FsStats>,
) -> (ResourceList, ResourceList) {
    let kc = &config.kubelet;
    let capacity = resources::capacity(machine, root_fs, kc.max_pods, kc.pods_per_core);
    let allocatable = resources::allocatable(
        &capacity,
        &kc.system_reserved,
        &kc.kube_reserved,
        &kc.eviction_hard,
    );
    (capacity, allocatable)
}

/// The labels the kubelet registers the Node with.
pub fn node_labels(config: &Config, machine: &MachineInfo) -> BTreeMap<String, String> {
    let mut l = config.node_labels.clone();
    let os = &machine.operating_system;
    let arch = &machine.architecture;
    for (k, v) in [
        ("kubernetes.io/hostname", &config.hostname),
        ("kubernetes.io/os", os),
        ("kubernetes.io/arch", arch),
        ("beta.kubernetes.io/os", os),
        ("beta.kubernetes.io/arch", arch),
    ] {
        l.insert(k.to_string(), v.clone());
    }
    l
}

/// The images to report: largest first, at most `max` (-1: all), each with at most
/// [`MAX_NAMES_PER_IMAGE`] names (digests first, then tags), as upstream.
pub fn node_images(mut images: Vec<deckhand_proto::cri::Image>, max: i32) -> Vec<ContainerImage> {
    images.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.id.cmp(&b.id)));
    if let Ok(max) = usize::try_from(max) {
        images.truncate(max);
    }
    images
        .into_iter()
        .map(|i| {
            let names: Vec<String> = i
                .repo_digests
                .into_iter()
                .chain(i.repo_tags)
                .take(MAX_NAMES_PER_IMAGE)
                .collect();
            ContainerImage {
                names: Some(names),
                size_bytes: Some(i64::try_from(i.size).unwrap_or(i64::MAX)),
            }
        })
        .collect()
}

/// Whether `desired` differs from `current` in anything but heartbeat times.
pub fn status_changed(current: &NodeStatus, desired: &NodeStatus) -> bool {
    !status_changes(current, desired).is_empty()
}

/// The parts of the status that differ (heartbeat times ignored, quantities compared as numbers).
pub fn status_changes(current: &NodeStatus, desired: &NodeStatus) -> Vec<&'static str> {
    let empty = BTreeMap::new();
    let q = |m: &Option<BTreeMap<_, _>>| m.clone().unwrap_or_else(|| empty.clone());
    let mut changes = Vec::new();
    if current.addresses != desired.addresses {
        changes.push("addresses");
    }
    if !resources::same_quantities(&q(&current.capacity), &q(&desired.capacity)) {
        changes.push("capacity");
    }
    if !resources::same_quantities(&q(&current.allocatable), &q(&desired.allocatable)) {
        changes.push("allocatable");
    }
    if current.node_info != desired.node_info {
        changes.push("nodeInfo");
    }
    if current.daemon_endpoints != desired.daemon_endpoints {
        changes.push("daemonEndpoints");
    }
    if !same_images(current.images.as_deref(), desired.images.as_deref()) {
        changes.push("images");
    }
    if conditions::changed(
        current.conditions.as_deref().unwrap_or_default(),
        desired.conditions.as_deref().unwrap_or_default(),
    ) {
        changes.push("conditions");
    }
    changes
}

/// Image lists compare equal when only absent and empty lists differ (the API server drops
/// empty lists).
fn same_images(a: Option<&[ContainerImage]>, b: Option<&[ContainerImage]>) -> bool {
    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.size_bytes == y.size_bytes
                && x.names.as_deref().unwrap_or_default() == y.names.as_deref().unwrap_or_default()
        })
}

/// The strategic merge patch of `nodes/status` from `current` to `desired`: conditions merge by
/// type (others' conditions stay), addresses are replaced whole (upstream's fix-up for their
/// wrong merge key), huge page sizes that are gone are removed, other extended resources stay.
pub fn status_patch(current: &NodeStatus, desired: &NodeStatus) -> serde_json::Value {
    let mut status = serde_json::Map::new();
    let mut resource_map =
        |key: &str, cur: &Option<BTreeMap<String, _>>, want: &Option<BTreeMap<String, _>>| {
            let mut m = serde_json::Map::new();
            for (k, v) in want.iter().flatten() {
                m.insert(k.clone(), json!(v));
            }
            for k in cur.iter().flatten().map(|(k, _)| k) {
                if k.starts_with(resources::HUGEPAGES_PREFIX) && !m.contains_key(k) {
                    m.insert(k.clone(), serde_json::Value::Null);
                }
            }
            status.insert(key.to_string(), serde_json::Value::Object(m));
        };
    resource_map("capacity", &current.capacity, &desired.capacity);
    resource_map("allocatable", &current.allocatable, &desired.allocatable);
    status.insert("conditions".into(), json!(desired.conditions));
    status.insert("nodeInfo".into(), json!(desired.node_info));
    status.insert("daemonEndpoints".into(), json!(desired.daemon_endpoints));
    if let Some(images) = &desired.images {
        status.insert("images".into(), json!(images));
    }
    if current.addresses != desired.addresses {
        let mut addresses: Vec<serde_json::Value> = desired
            .addresses
            .iter()
            .flatten()
            .map(|a| json!(a))
            .collect();
        if current.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
            addresses.push(json!({ "$patch": "replace" }));
        }
        status.insert("addresses".into(), serde_json::Value::Array(addresses));
    }
    json!({ "status": status })
}

/// The node's IP: `--node-ip`, else the first non-loopback address the hostname resolves to,
/// else the source address of the default route (upstream's order).
pub async fn resolve_node_ip(config: &Config) -> Option<IpAddr> {
    if let Some(ip) = config.node_ip {
        if ip.is_loopback() {
            tracing::warn!(%ip, "--node-ip is a loopback address: only local clients can reach this node");
        }
        return Some(ip);
    }
    if let Ok(addrs) = tokio::net::lookup_host((config.hostname.as_str(), 0)).await {
        let ips: Vec<IpAddr> = addrs
            .map(|a| a.ip())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !is_link_local(ip))
            .collect();
        if let Some(ip) = ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()) {
            return Some(*ip);
        }
    }
    default_route_source()
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// The local address the kernel would use towards a public address (no packet is sent).
fn default_route_source() -> Option<IpAddr> {
    for target in ["192.0.2.1:9", "[2001:db8::1]:9"] {
        let bind = if target.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        if let Ok(sock) = std::net::UdpSocket::bind(bind)
            && sock.connect(target).is_ok()
            && let Ok(addr) = sock.local_addr()
            && !addr.ip().is_unspecified()
        {
            return Some(addr.ip());
        }
    }
    None
}

/// Watches this node's Node object and wakes `trigger` when it appears, disappears, is
/// re-created (new UID) or gets a different podCIDR. Returns at shutdown.
pub async fn watch_node(
    client: kube::Client,
    node_name: String,
    trigger: Trigger,
    shutdown: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let stream = watcher(nodes, cfg).default_backoff();
    futures::pin_mut!(stream);
    let key = |n: &Node| {
        (
            n.metadata.uid.clone(),
            n.spec.as_ref().and_then(|s| s.pod_cidr.clone()),
        )
    };
    type Key = (Option<String>, Option<String>);
    let mut last: Option<Key> = None;
    let mut listed: Option<Key> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = stream.next() => e,
        };
        let seen: Option<Option<Key>> = match event {
            None => return,
            Some(Err(e)) => {
                tracing::debug!(node = %node_name, "node watch: {e}");
                None
            }
            Some(Ok(watcher::Event::Init)) => {
                listed = None;
                None
            }
            Some(Ok(watcher::Event::InitApply(n))) => {
                listed = Some(key(&n));
                None
            }
            Some(Ok(watcher::Event::InitDone)) => Some(listed.take()),
            Some(Ok(watcher::Event::Apply(n))) => Some(Some(key(&n))),
            Some(Ok(watcher::Event::Delete(_))) => Some(None),
        };
        if let Some(now) = seen
            && now != last
        {
            tracing::debug!(node = %node_name, exists = now.is_some(), "node object changed");
            last = now;
            trigger.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeCondition;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn image(id: &str, size: u64, tags: &[&str], digests: &[&str]) -> deckhand_proto::cri::Image {
        deckhand_proto::cri::Image {
            id: id.into(),
            size,
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn images_are_largest_first_capped_and_named_as_upstream() {
        let list = vec![
            image("a", 10, &["a:1"], &["a@sha256:1"]),
            image(
                "b",
                30,
                &["b:1", "b:2", "b:3", "b:4", "b:5"],
                &["b@sha256:1"],
            ),
            image("c", 20, &[], &[]),
        ];
        let out = node_images(list.clone(), 2);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].size_bytes, Some(30));
        assert_eq!(
            out[0].names.as_deref(),
            Some(&["b@sha256:1", "b:1", "b:2", "b:3", "b:4"].map(String::from)[..])
        );
        assert_eq!(out[1].size_bytes, Some(20));
        assert_eq!(node_images(list, -1).len(), 3);
    }

    fn status(ready: &str, heartbeat: &str) -> NodeStatus {
        let t: Timestamp = heartbeat.parse().expect("time");
        NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.0.1".into(),
            }]),
            capacity: Some(BTreeMap::from([
                ("memory".to_string(), Quantity("1Ki".into())),
                ("hugepages-1Gi".to_string(), Quantity("0".into())),
            ])),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: Some("R".into()),
                message: Some("m".into()),
                last_heartbeat_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t)),
                last_transition_time: None,
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn status_changes_ignore_heartbeats_and_quantity_spelling() {
        let a = status("True", "2024-01-01T00:00:00Z");
        let mut b = status("True", "2024-01-01T00:05:00Z");
        assert!(!status_changed(&a, &b));
        b.capacity = Some(BTreeMap::from([
            ("memory".to_string(), Quantity("1024".into())),
            ("hugepages-1Gi".to_string(), Quantity("0".into())),
        ]));
        assert!(!status_changed(&a, &b));
        assert!(status_changed(&a, &status("False", "2024-01-01T00:00:00Z")));
        let mut c = a.clone();
        c.addresses = None;
        assert!(status_changed(&a, &c));
        let mut d = a.clone();
        d.images = Some(vec![]);
        assert!(!status_changed(&a, &d), "no images equals an empty list");
        d.images = Some(vec![ContainerImage {
            names: None,
            size_bytes: Some(1),
        }]);
        assert!(status_changed(&a, &d));
    }

    #[test]
    fn patch_replaces_addresses_and_drops_vanished_huge_pages() {
        let current = status("True", "2024-01-01T00:00:00Z");
        let mut desired = current.clone();
        desired.addresses = Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: "10.0.0.2".into(),
        }]);
        desired.capacity = Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("2Ki".into()),
        )]));
        let p = status_patch(&current, &desired);
        assert_eq!(p["status"]["capacity"]["memory"], "2Ki");
        assert!(p["status"]["capacity"]["hugepages-1Gi"].is_null());
        assert!(
            p["status"]["capacity"]
                .as_object()
                .is_some_and(|m| m.contains_key("hugepages-1Gi"))
        );
        let addrs = p["status"]["addresses"].as_array().expect("addresses");
        assert_eq!(addrs[0]["address"], "10.0.0.2");
        assert_eq!(addrs[1]["$patch"], "replace");
        assert!(
            status_patch(&current, &current)["status"]
                .get("addresses")
                .is_none()
        );
        assert_eq!(p["status"]["conditions"][0]["type"], "Ready");
    }

    #[test]
    fn version_is_semver_with_build_metadata() {
        assert!(KUBELET_VERSION.starts_with("v1.20.2+deckhand."));
    }
}
