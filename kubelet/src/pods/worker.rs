//! One pod's worker: a [`Reconciler`] that converges the runtime on the pod's desired state.
//!
//! Each reconcile observes the runtime (ListPodSandbox and ListContainers filtered by the pod's
//! UID label, ContainerStatus of each), then takes the steps upstream's `SyncPod` takes, each
//! idempotent: admission, a sandbox (a new attempt when the latest is not ready), image pulls
//! per pull policy, init containers one at a time in order, main containers, restarts per
//! restartPolicy with back-off (10 s doubling to 5 min, reset after 10 min of running), and
//! finally the status, patched on the API server only when it changed. A deleted pod is
//! stopped (StopContainer with the grace period, StopPodSandbox, RemovePodSandbox) and only
//! then, once the runtime shows nothing left, deleted from the API server (grace period 0 with
//! the UID as precondition). Nothing is kept that the runtime and the API cannot give back:
//! after a kubelet restart a worker finds its containers running and leaves them alone.
//!
//! Running containers with probes get their probe tasks ([`super::probes`]); a probe result
//! that changes wakes the worker, which puts `started`/`ready` into the status and kills a
//! container whose liveness or startup probe failed. postStart runs right after
//! StartContainer and preStop before every StopContainer of a running container
//! ([`super::hooks`]). The steps are recorded as Events ([`crate::events`]), fire and forget.
//!
//! Sidecars (init containers with `restartPolicy: Always`, KEP-753) start in their place
//! among the init containers; the next one starts once the sidecar has started (postStart
//! done, startup probe succeeded if it has one). They are restarted whenever they exit,
//! whatever the pod's restartPolicy, with the same back-off, and probed as the containers are.
//! Once the regular containers have all finished for good, the sidecars are stopped and the
//! pod completes. Stopping a pod stops the regular containers first; each sidecar gets SIGTERM
//! once the regular containers and the sidecars declared after it are gone (reverse order),
//! all within the one grace period; preStop hooks all run at once, as upstream.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deckhand_proto::cri::{self, DnsConfig, PodSandboxState};
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use tokio::sync::{OnceCell, mpsc, watch};

use super::hooks::{self, Hook};
use super::probes::{self, PodProbes};
use super::spec::{self, ContainerInputs, RuntimeFacts};
use super::status::{self, Instance, Observed, Waiting};
use super::{Desired, ManagerEvent, Source};
use crate::events::EventType;
use crate::reconcile::{Action, Backoff, Reconciler};
use crate::runtime::{RuntimeClient, RuntimeError};

/// Restart back-off bounds (upstream's 10 s and 5 min).
pub const RESTART_BACKOFF_INITIAL: Duration = Duration::from_secs(10);
/// The longest restart back-off.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Running this long resets a container's back-off.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);
/// How long a failed pull shows as ErrImagePull before the wait shows as ImagePullBackOff.
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(2);
/// A sandbox label naming the node whose kubelet made it, so that kubelets sharing a runtime
/// only collect their own orphans.
pub const NODE_LABEL: &str = "deckhand.io/node";

/// What every worker shares.
pub struct Context {
    /// The runtime.
    pub runtime: Arc<RuntimeClient>,
    /// The API server (none in standalone mode).
    pub client: Option<kube::Client>,
    /// This node.
    pub node_name: String,
    /// The node IP (hostIP).
    pub node_ip: String,
    /// Pod log directories' root (`/var/log/pods`).
    pub logs_root: PathBuf,
    /// `<root-dir>/pods`.
    pub pods_dir: PathBuf,
    /// The node's memory, for OOM scores.
    pub memory_capacity: u64,
    /// `clusterDNS`.
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// `clusterDomain`.
    pub cluster_domain: Option<String>,
    /// The host's resolv.conf.
    pub host_dns: DnsConfig,
    /// The runtime's name (`containerd`), for container IDs.
    pub runtime_name: OnceCell<String>,
    /// Events about pods.
    pub events: crate::events::Recorder,
    /// `ExecSync` for probes and hooks.
    pub exec: Arc<probes::ExecClient>,
    /// The Services of all namespaces, for service variables (none in standalone mode).
    pub services: Option<super::services::ServiceCache>,
    /// The node's configuration and machine, for admission (labels, allocatable).
    pub node: LocalNode,
    /// The node allocatable, QoS and pod cgroups.
    pub cgroups: Arc<crate::cgroups::PodCgroups>,
}

/// What the node is made of: its allocatable and labels are computed from these as the node
/// controller computes them ([`crate::node::capacity_and_allocatable`]).
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// The kubelet's configuration.
    pub config: Arc<crate::config::Config>,
    /// The machine.
    pub machine: crate::machine::MachineInfo,
}

/// An error of one pod reconcile.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A CRI call failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was done.
        what: &'static str,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// The runtime still shows the pod after stopping it.
    #[error("the runtime still has {0} sandbox(es) of the pod")]
    Remaining(usize),
    /// A directory could not be made.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A volume could not be set up.
    #[error("setting up volumes: {0}")]
    Volume(String),
    /// The pod's cgroup could not be made.
    #[error("pod cgroup: {0}")]
    Cgroup(#[from] crate::cgroups::CgroupError),
}

#[derive(Debug, Clone)]
struct RestartBackoff {
    delay: Duration,
    last: Instant,
}

/// The worker of one pod UID.
pub struct PodWorker {
    uid: String,
    ctx: Arc<Context>,
    desired: watch::Receiver<Desired>,
    events: mpsc::UnboundedSender<ManagerEvent>,
    restarts: HashMap<String, RestartBackoff>,
    pulls: HashMap<String, RestartBackoff>,
    waiting: HashMap<String, Waiting>,
    last_status: Option<PodStatus>,
    start_time: Option<Time>,
    errors: Backoff,
    finished: bool,
    /// The phase last computed (or the API's at start): a terminal pod is not synced again.
    phase: Option<String>,
    /// The probes of the running containers.
    probes: PodProbes,
    /// The pod's IP last seen (for hooks).
    pod_ip: String,
    /// The last status patch was refused as invalid: the server's podIPs are not what
    /// `last_status` says (a mirror pod made again), so the next patch assumes the opposite.
    ips_doubt: bool,
}

/// What the runtime has of the pod.
#[derive(Debug, Default)]
struct Runtime {
    /// Newest first.
    sandboxes: Vec<cri::PodSandbox>,
    /// Newest first.
    instances: Vec<Instance>,
}

impl Runtime {
    fn current(&self) -> Option<&cri::PodSandbox> {
        self.sandboxes.first()
    }

    fn ready(&self) -> bool {
        self.current()
            .is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32)
    }

    /// Instances of `name` in the current sandbox, newest first.
    fn of(&self, name: &str) -> Vec<&Instance> {
        let Some(sb) = self.current() else {
            return Vec::new();
        };
        self.instances
            .iter()
            .filter(|i| i.sandbox_id == sb.id && i.name() == name)
            .collect()
    }

    /// The next restart count for `name` (across all sandboxes).
    fn next_restart_count(&self, name: &str) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.name() == name)
            .map(|i| i.restart_count() + 1)
            .max()
            .unwrap_or(0)
    }
}

/// What a sync decided to wait for.
enum Next {
    /// Nothing to do until an event.
    Events,
    /// Look again after this long (back-off).
    After(Duration),
}

impl PodWorker {
    /// A worker for pod `uid`.
    pub fn new(
        uid: String,
        ctx: Arc<Context>,
        desired: watch::Receiver<Desired>,
        events: mpsc::UnboundedSender<ManagerEvent>,
    ) -> PodWorker {
        let previous = desired.borrow().pod.status.clone();
        let previous_phase = previous.as_ref().and_then(|s| s.phase.clone());
        let previous_ip = previous
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        PodWorker {
            uid,
            ctx,
            start_time: previous.as_ref().and_then(|s| s.start_time.clone()),
            last_status: previous,
            desired,
            events,
            restarts: HashMap::new(),
            pulls: HashMap::new(),
            waiting: HashMap::new(),
            errors: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            finished: false,
            phase: previous_phase,
            probes: PodProbes::default(),
            pod_ip: previous_ip,
            ips_doubt: false,
        }
    }

    async fn observe(&self) -> Result<Runtime, PodError> {
        let rt = &self.ctx.runtime;
        let mut sandboxes = rt.list_pod_sandboxes(spec::uid_selector(&self.uid)).await?;
        sandboxes.sort_by(|a, b| {
            let att = |s: &cri::PodSandbox| s.metadata.as_ref().map_or(0, |m| m.attempt);
            (att(b), b.created_at).cmp(&(att(a), a.created_at))
        });
        let containers = rt.list_containers(spec::uid_selector(&self.uid)).await?;
        let mut instances = Vec::new();
        for c in containers {
            match rt.container_status(&c.id).await {
                Ok(mut status) => {
                    if status.state == cri::ContainerState::ContainerExited as i32 {
                        add_termination_message(&mut status);
                    }
                    instances.push(Instance {
                        sandbox_id: c.pod_sandbox_id.clone(),
                        status,
                    })
                }
                Err(e) if RuntimeClient::status_code(&e) == Some(tonic::Code::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        instances.sort_by(|a, b| {
            (b.restart_count(), b.status.created_at).cmp(&(a.restart_count(), a.status.created_at))
        });
        Ok(Runtime {
            sandboxes,
            instances,
        })
    }

    async fn runtime_name(&self) -> String {
        self.ctx
            .runtime_name
            .get_or_init(|| async {
                match self.ctx.runtime.version().await {
                    Ok(v) => v.runtime_name,
                    Err(_) => "cri".to_string(),
                }
            })
            .await
            .clone()
    }

    fn dns(&self, pod: &Pod) -> DnsConfig {
        spec::dns_config(
            pod,
            &self.ctx.cluster_dns,
            self.ctx.cluster_domain.as_deref(),
            &self.ctx.host_dns,
        )
    }

    fn sandbox_config(&self, pod: &Pod, attempt: u32) -> cri::PodSandboxConfig {
        let parent = self.ctx.cgroups.pod_cgroup(pod);
        let mut c = spec::sandbox_config(pod, attempt, &self.ctx.logs_root, self.dns(pod), parent);
        c.labels
            .insert(NODE_LABEL.into(), self.ctx.node_name.clone());
        c
    }

    /// Stops every container and sandbox of the pod; with `remove`, removes the sandboxes and
    /// the pod's directories too.
    async fn kill(
        &self,
        pod: &Pod,
        obs: &Runtime,
        grace: i64,
        remove: bool,
    ) -> Result<(), PodError> {
        let rt = &self.ctx.runtime;
        let live: Vec<&Instance> = obs
            .instances
            .iter()
            .filter(|i| i.running() || i.state() == cri::ContainerState::ContainerCreated)
            .collect();
        self.stop_ordered(pod, &live, grace).await?;
        for sb in &obs.sandboxes {
            rt.stop_pod_sandbox(&sb.id).await?;
            if remove {
                rt.remove_pod_sandbox(&sb.id).await?;
            }
        }
        Ok(())
    }

    /// Stops the `live` instances (running or created) as upstream's
    /// `killContainersWithSyncResult` with sidecars: each gets its Killing event and preStop
    /// hook at once; the regular containers are then stopped, and each sidecar only once the
    /// regular containers and the sidecars declared after it have stopped (so in reverse
    /// order), with what is left of `grace` (at least [`hooks::MIN_GRACE_SECONDS`]).
    async fn stop_ordered(
        &self,
        pod: &Pod,
        live: &[&Instance],
        grace: i64,
    ) -> Result<(), PodError> {
        let sidecars: Vec<&str> = spec::spec(pod)
            .init_containers
            .iter()
            .flatten()
            .filter(|c| status::is_sidecar(c))
            .map(|c| c.name.as_str())
            .collect();
        let rank = |name: &str| sidecars.iter().position(|n| *n == name);
        // The instances still to stop, with their sidecar rank (none: a regular container).
        let (left_tx, left_rx) = watch::channel(
            live.iter()
                .map(|i| (i.status.id.clone(), rank(i.name())))
                .collect::<Vec<_>>(),
        );
        let stops = live.iter().map(|i| {
            let (left_tx, mut left_rx) = (&left_tx, left_rx.clone());
            async move {
                let (name, id) = (i.name(), i.status.id.as_str());
                tracing::info!(pod_uid = %self.uid, container = name, grace, "stopping container");
                let since = Instant::now();
                let message = format!("Stopping container {name}");
                let mut g = self
                    .pre_stop(pod, name, id, grace, &message, i.running())
                    .await;
                if let Some(r) = rank(name) {
                    let turn = left_rx.wait_for(|left| {
                        left.iter().all(|(_, other)| other.is_some_and(|o| o <= r))
                    });
                    let budget = Duration::from_secs(u64::try_from(grace).unwrap_or(0))
                        .saturating_sub(since.elapsed());
                    if tokio::time::timeout(budget, turn).await.is_err() {
                        tracing::info!(pod_uid = %self.uid, container = name, "the grace period ran out before the sidecar's turn");
                    }
                    let used = i64::try_from(since.elapsed().as_secs()).unwrap_or(i64::MAX);
                    g = g
                        .min(grace.saturating_sub(used))
                        .max(hooks::MIN_GRACE_SECONDS.min(grace));
                }
                let r = self.ctx.runtime.stop_container(id, g).await;
                left_tx.send_modify(|left| left.retain(|(other, _)| other != id));
                r
            }
        });
        for r in futures::future::join_all(stops).await {
            match r {
                Err(e) if RuntimeClient::status_code(&e) != Some(tonic::Code::NotFound) => {
                    return Err(e.into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Stops one container as upstream's `killContainer`: the Killing event, the preStop
    /// hook (when `running`) within `grace`, then StopContainer with the rest of it.
    async fn stop_one(
        &self,
        pod: &Pod,
        name: &str,
        id: &str,
        grace: i64,
        message: &str,
        running: bool,
    ) -> Result<(), RuntimeError> {
        let grace = self.pre_stop(pod, name, id, grace, message, running).await;
        self.ctx.runtime.stop_container(id, grace).await
    }

    /// The Killing event and the preStop hook (when `running`) within `grace`; gives the
    /// grace StopContainer gets.
    async fn pre_stop(
        &self,
        pod: &Pod,
        name: &str,
        id: &str,
        grace: i64,
        message: &str,
        running: bool,
    ) -> i64 {
        self.ctx
            .events
            .event(pod, Some(name), EventType::Normal, "Killing", message);
        let s = spec::spec(pod);
        let c = s
            .containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .find(|c| c.name == name);
        match c {
            Some(c) if running && hooks::has(c, Hook::PreStop) => {
                hooks::pre_stop(
                    &self.ctx.exec,
                    &self.ctx.events,
                    pod,
                    c,
                    id,
                    &self.pod_ip,
                    grace,
                )
                .await
            }
            _ => grace,
        }
    }

    fn cleanup_dirs(&self, pod: &Pod) {
        let pod_dir = self.ctx.pods_dir.join(&self.uid);
        // Never remove through a mount that is still there (a hostPath subPath bind).
        let unmounted = super::volumes::teardown(&pod_dir);
        let dirs = [
            pod_dir.clone(),
            spec::log_directory(&self.ctx.logs_root, pod),
        ];
        for d in dirs {
            if d == pod_dir && !unmounted {
                tracing::warn!(dir = %d.display(), "mounts are left beneath the pod's directory: not removing it");
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %d.display(), "removing the pod's directory: {e}");
            }
        }
        // After the sandboxes are gone; on the blocking pool.
        self.ctx.cgroups.remove_pod(pod);
    }

    /// The deleted pod: stop, remove, then delete the API object.
    async fn terminate(&mut self, d: &Desired) -> Result<Action, PodError> {
        let pod = &d.pod;
        let grace = spec::grace_period(pod);
        self.probes.stop_all();
        let obs = self.observe().await?;
        if !obs.sandboxes.is_empty() {
            tracing::info!(pod = %spec::full_name(pod), pod_uid = %self.uid, grace, "killing the pod");
        }
        self.kill(pod, &obs, grace, true).await?;
        let left = self.observe().await?;
        if !left.sandboxes.is_empty() {
            return Err(PodError::Remaining(left.sandboxes.len()));
        }
        self.cleanup_dirs(pod);
        if d.source == Source::Api
            && !d.removed
            && let Some(client) = &self.ctx.client
        {
            let (name, ns, uid) = spec::ids(pod);
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.to_string()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(name, &dp).await {
                Ok(_) => {
                    tracing::info!(pod = %spec::full_name(pod), "pod deleted from the API server")
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(source) => {
                    return Err(PodError::Api {
                        what: "deleting the pod",
                        source,
                    });
                }
            }
        }
        tracing::info!(pod = %spec::full_name(pod), pod_uid = %self.uid, "pod terminated");
        self.finished = true;
        let _ = self.events.send(ManagerEvent::WorkerDone(self.uid.clone()));
        Ok(Action::await_change())
    }

    /// Ensures `c`'s image per its pull policy; on failure records the waiting reason.
    async fn ensure_image(
        &mut self,
        pod: &Pod,
        c: &Container,
        sandbox: &cri::PodSandboxConfig,
    ) -> Result<Option<String>, PodError> {
        let events = self.ctx.events.clone();
        let event = |t: EventType, reason: &str, message: String| {
            events.event(pod, Some(&c.name), t, reason, message)
        };
        let image = c.image.clone().unwrap_or_default();
        let policy = spec::pull_policy(c).to_string();
        let present = match self.ctx.runtime.image_status(&image).await? {
            Some(i) => Some(i.id),
            None => None,
        };
        if policy != "Always"
            && let Some(id) = present
        {
            event(
                EventType::Normal,
                "Pulled",
                format!("Container image {image:?} already present on machine"),
            );
            return Ok(Some(id));
        }
        if policy == "Never" {
            event(
                EventType::Warning,
                "ErrImageNeverPull",
                format!("Container image {image:?} is not present with pull policy of Never"),
            );
            self.waiting.insert(
                c.name.clone(),
                Waiting {
                    reason: "ErrImageNeverPull".into(),
                    message: format!(
                        "Container image {image:?} is not present with pull policy of Never"
                    ),
                },
            );
            return Ok(None);
        }
        let now = Instant::now();
        if let Some(b) = self.pulls.get(&image)
            && now < b.last + b.delay
        {
            event(
                EventType::Normal,
                "BackOff",
                format!("Back-off pulling image {image:?}"),
            );
            self.waiting.insert(
                c.name.clone(),
                Waiting {
                    reason: "ImagePullBackOff".into(),
                    message: format!("Back-off pulling image {image:?}"),
                },
            );
            return Ok(None);
        }
        tracing::info!(pod_uid = %self.uid, %image, "pulling image");
        event(
            EventType::Normal,
            "Pulling",
            format!("Pulling image {image:?}"),
        );
        match super::secrets::pull_image(&self.ctx, pod, &image, sandbox).await {
            Ok(r) => {
                self.pulls.remove(&image);
                tracing::info!(pod_uid = %self.uid, %image, image_ref = %r, "pulled image");
                event(
                    EventType::Normal,
                    "Pulled",
                    format!("Successfully pulled image {image:?}"),
                );
                Ok(Some(r))
            }
            Err(e) => {
                tracing::warn!(pod_uid = %self.uid, %image, "pulling image: {e}");
                event(
                    EventType::Warning,
                    "Failed",
                    format!("Failed to pull image {image:?}: {e}"),
                );
                let b = self.pulls.entry(image.clone()).or_insert(RestartBackoff {
                    delay: Duration::ZERO,
                    last: now,
                });
                b.delay = (b.delay * 2).clamp(RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX);
                b.last = now;
                self.waiting.insert(
                    c.name.clone(),
                    Waiting {
                        reason: "ErrImagePull".into(),
                        message: e.to_string(),
                    },
                );
                Ok(None)
            }
        }
    }

    /// Creates and starts one container in the current sandbox; gives its ID when it was
    /// started and its postStart hook (if any) succeeded.
    async fn start(
        &mut self,
        pod: &Pod,
        c: &Container,
        obs: &Runtime,
        sandbox_config: &cri::PodSandboxConfig,
        facts: &RuntimeFacts,
    ) -> Result<Option<String>, PodError> {
        let Some(sb) = obs.current() else {
            return Ok(None);
        };
        let Some(image_ref) = self.ensure_image(pod, c, sandbox_config).await? else {
            return Ok(None);
        };
        let restart_count = obs.next_restart_count(&c.name);
        let inputs = ContainerInputs {
            restart_count,
            image_ref,
            memory_capacity: self.ctx.memory_capacity,
            pods_dir: &self.ctx.pods_dir,
            facts,
        };
        let mut config = match super::volumes::container_config(&self.ctx, pod, c, &inputs).await {
            Ok(cfg) => cfg,
            Err(message) => {
                self.waiting.insert(
                    c.name.clone(),
                    Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message,
                    },
                );
                return Ok(None);
            }
        };
        config
            .labels
            .insert(NODE_LABEL.into(), self.ctx.node_name.clone());
        let rt = &self.ctx.runtime;
        let id = rt
            .create_container(&sb.id, config, sandbox_config.clone())
            .await?;
        let created = format!("Created container {}", c.name);
        let events = &self.ctx.events;
        events.event(pod, Some(&c.name), EventType::Normal, "Created", created);
        let hooked = self.start_created(pod, c, &id, facts).await?;
        self.waiting.remove(&c.name);
        tracing::info!(pod = %spec::full_name(pod), container = %c.name, restart_count, container_id = %id, "started container");
        // Keep the newest dead instance (lastState); remove older ones.
        for old in obs.of(&c.name).iter().filter(|i| i.exited()).skip(1) {
            if let Err(e) = rt.remove_container(&old.status.id).await {
                tracing::debug!("removing an old container: {e}");
            }
        }
        Ok(hooked.then_some(id))
    }

    /// Starts the created container `id` of `c`, then runs its postStart hook; a failed
    /// hook kills the container (it restarts per restartPolicy), as upstream. Gives whether
    /// the hook (if any) succeeded.
    async fn start_created(
        &self,
        pod: &Pod,
        c: &Container,
        id: &str,
        facts: &RuntimeFacts,
    ) -> Result<bool, PodError> {
        self.ctx.runtime.start_container(id).await?;
        let events = &self.ctx.events;
        let started = format!("Started container {}", c.name);
        events.event(pod, Some(&c.name), EventType::Normal, "Started", started);
        if hooks::has(c, Hook::PostStart) {
            let ip = facts.pod_ips.first().cloned().unwrap_or_default();
            if let Err(msg) = hooks::post_start(&self.ctx.exec, events, pod, c, id, &ip).await {
                tracing::warn!(pod = %spec::full_name(pod), container = %c.name, "postStart hook failed: {msg}");
                let grace = spec::grace_period(pod);
                self.stop_one(pod, &c.name, id, grace, "FailedPostStartHook", true)
                    .await?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Restarts `c` unless it is in back-off; returns the time left when it is.
    async fn restart(
        &mut self,
        pod: &Pod,
        c: &Container,
        obs: &Runtime,
        sandbox_config: &cri::PodSandboxConfig,
        facts: &RuntimeFacts,
    ) -> Result<Option<Duration>, PodError> {
        let now = Instant::now();
        let ran = obs.of(&c.name).first().map(|i| {
            Duration::from_nanos(
                u64::try_from(i.status.finished_at.saturating_sub(i.status.started_at))
                    .unwrap_or(0),
            )
        });
        if ran.is_some_and(|r| r >= BACKOFF_RESET_AFTER) {
            self.restarts.remove(&c.name);
        }
        if let Some(b) = self.restarts.get(&c.name)
            && now < b.last + b.delay
        {
            let left = b.last + b.delay - now;
            self.ctx.events.event(
                pod,
                Some(&c.name),
                EventType::Warning,
                "BackOff",
                "Back-off restarting failed container",
            );
            self.waiting.insert(
                c.name.clone(),
                Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!(
                        "back-off {:?} restarting failed container={} pod={}_{}({})",
                        b.delay,
                        c.name,
                        spec::ids(pod).0,
                        spec::ids(pod).1,
                        self.uid
                    ),
                },
            );
            return Ok(Some(left));
        }
        self.waiting.remove(&c.name);
        self.start(pod, c, obs, sandbox_config, facts).await?;
        let b = self
            .restarts
            .entry(c.name.clone())
            .or_insert(RestartBackoff {
                delay: Duration::ZERO,
                last: now,
            });
        b.delay = (b.delay * 2).clamp(RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX);
        b.last = now;
        Ok(None)
    }

    /// Acts on the running instance of `c`: kills it when its liveness or startup probe
    /// failed (it restarts once the runtime shows it exited) and replaces it when its spec
    /// changed. Gives whether it did either.
    async fn check_running(
        &mut self,
        pod: &Pod,
        c: &Container,
        running: &Instance,
        obs: &Runtime,
        sandbox_config: &cri::PodSandboxConfig,
        facts: &RuntimeFacts,
    ) -> Result<bool, PodError> {
        let id = running.status.id.clone();
        if let Some(state) = self.probes.state(&id)
            && let Some(message) = state.kill
        {
            let grace = state.kill_grace.unwrap_or_else(|| spec::grace_period(pod));
            tracing::info!(pod = %spec::full_name(pod), container = %c.name, "{message}");
            self.stop_one(pod, &c.name, &id, grace, &message, true)
                .await?;
            return Ok(true);
        }
        // The spec changed (the image, the only mutable field): replace it.
        let hash = running.status.annotations.get(spec::CONTAINER_HASH);
        if hash.is_some_and(|h| *h != spec::container_hash(c)) {
            tracing::info!(pod = %spec::full_name(pod), container = %c.name, "container spec changed: restarting it");
            let message = format!("Container {} definition changed, will be restarted", c.name);
            let grace = spec::grace_period(pod);
            self.stop_one(pod, &c.name, &id, grace, &message, true)
                .await?;
            self.start(pod, c, obs, sandbox_config, facts).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Stops the pod's running sidecars (in reverse order, with the grace period) once the
    /// pod is done, as upstream kills a pod whose regular containers all finished; they are
    /// not restarted after.
    async fn stop_sidecars(&mut self, pod: &Pod, obs: &Runtime) -> Result<(), PodError> {
        let sidecars: Vec<&Container> = spec::spec(pod)
            .init_containers
            .iter()
            .flatten()
            .filter(|c| status::is_sidecar(c))
            .collect();
        for c in &sidecars {
            self.waiting.remove(&c.name);
        }
        let live: Vec<&Instance> = sidecars
            .iter()
            .filter_map(|c| obs.of(&c.name).first().copied())
            .filter(|i| i.running() || i.state() == cri::ContainerState::ContainerCreated)
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        tracing::info!(pod = %spec::full_name(pod), sidecars = live.len(), "the pod is done: stopping its sidecars");
        self.stop_ordered(pod, &live, spec::grace_period(pod)).await
    }

    /// One sync of a pod that should run.
    async fn sync(&mut self, pod: &Pod, obs: &mut Runtime) -> Result<Next, PodError> {
        let s = spec::spec(pod);
        let restart_policy = s.restart_policy.clone().unwrap_or_else(|| "Always".into());
        let ran_before = !obs.instances.is_empty();
        // The pod cgroup before the sandbox (in memory only when it was made already).
        self.ctx.cgroups.ensure_pod(pod).await?;
        if !obs.ready() {
            if ran_before && restart_policy == "Never" {
                // Upstream does not recreate the sandbox of a pod that ran with Never.
                return Ok(Next::Events);
            }
            let attempt = obs
                .current()
                .and_then(|s| s.metadata.as_ref())
                .map_or(0, |m| m.attempt + 1);
            if !obs.sandboxes.is_empty() {
                tracing::info!(pod = %spec::full_name(pod), "sandbox not ready: starting a new one");
                self.kill(pod, obs, spec::grace_period(pod), false).await?;
            }
            let config = self.sandbox_config(pod, attempt);
            for dir in [PathBuf::from(&config.log_directory)].into_iter().chain(
                s.volumes
                    .iter()
                    .flatten()
                    .filter(|v| v.empty_dir.is_some())
                    .filter_map(|v| spec::volume_host_path(&self.ctx.pods_dir, pod, &v.name)),
            ) {
                std::fs::create_dir_all(&dir).map_err(|source| PodError::Io {
                    path: dir.clone(),
                    source,
                })?;
            }
            let id = self.ctx.runtime.run_pod_sandbox(config).await?;
            tracing::info!(pod = %spec::full_name(pod), sandbox = %id, attempt, "sandbox running");
            *obs = self.observe().await?;
        }
        let Some(sb) = obs.current() else {
            return Ok(Next::Events);
        };
        if regular_containers_done(pod, obs, &restart_policy) {
            // None restarts: the pod is done, sidecars don't keep it running.
            self.stop_sidecars(pod, obs).await?;
            return Ok(Next::Events);
        }
        let attempt = sb.metadata.as_ref().map_or(0, |m| m.attempt);
        let sandbox_config = self.sandbox_config(pod, attempt);
        let sandbox_status = self.ctx.runtime.pod_sandbox_status(&sb.id).await?;
        let mut pod_ips = Vec::new();
        if let Some(n) = &sandbox_status.network {
            pod_ips.extend(Some(n.ip.clone()).filter(|i| !i.is_empty()));
            pod_ips.extend(n.additional_ips.iter().map(|i| i.ip.clone()));
        }
        if spec::host_network(pod) {
            pod_ips = vec![self.ctx.node_ip.clone()];
        }
        let facts = RuntimeFacts {
            host_ip: self.ctx.node_ip.clone(),
            pod_ips,
            node_name: self.ctx.node_name.clone(),
        };
        let volumes_due = super::volumes::setup(&self.ctx, pod)
            .await
            .map_err(PodError::Volume)?;
        let mut next = Next::Events;
        let soonest = |next: Next, left: Duration| match next {
            Next::After(d) if d < left => Next::After(d),
            _ => Next::After(left),
        };
        let init: Vec<&Container> = s.init_containers.iter().flatten().collect();
        // Init containers before the furthest one the runtime has were initialized once (upstream
        // looks backwards for it, as completed ones may be gone); once a regular container
        // runs, all were. Of those, only sidecars are kept running.
        let initialized = s
            .containers
            .iter()
            .any(|c| obs.of(&c.name).first().is_some_and(|i| !i.exited()));
        let furthest = if initialized {
            init.len()
        } else {
            init.iter()
                .rposition(|c| !obs.of(&c.name).is_empty())
                .unwrap_or(0)
        };
        for (index, c) in init.iter().copied().enumerate() {
            let before = index < furthest;
            let latest = obs.of(&c.name).first().copied();
            if !status::is_sidecar(c) {
                if before {
                    continue;
                }
                match latest.map(|i| (i.state(), i.status.exit_code)) {
                    None => {
                        self.start(pod, c, obs, &sandbox_config, &facts).await?;
                        return Ok(next);
                    }
                    Some((cri::ContainerState::ContainerExited, 0)) => continue,
                    Some((cri::ContainerState::ContainerExited, _)) => {
                        if restart_policy == "Never" {
                            // The pod failed: its sidecars are stopped too.
                            self.stop_sidecars(pod, obs).await?;
                            return Ok(Next::Events);
                        }
                        return Ok(
                            match self.restart(pod, c, obs, &sandbox_config, &facts).await? {
                                Some(left) => soonest(next, left),
                                None => next,
                            },
                        );
                    }
                    Some((cri::ContainerState::ContainerCreated, _)) => {
                        let id = obs.of(&c.name)[0].status.id.clone();
                        self.start_created(pod, c, &id, &facts).await?;
                        return Ok(next);
                    }
                    Some(_) => return Ok(next),
                }
            }
            // A sidecar: restarted whenever it exited, whatever the pod's restartPolicy; the
            // next init container starts once it has started (startup probe, postStart).
            match latest {
                None => {
                    let id = self.start(pod, c, obs, &sandbox_config, &facts).await?;
                    if before || (id.is_some() && c.startup_probe.is_none()) {
                        continue;
                    }
                    return Ok(next);
                }
                Some(i) if i.exited() => {
                    if let Some(left) = self.restart(pod, c, obs, &sandbox_config, &facts).await? {
                        next = soonest(next, left);
                    }
                    if before {
                        continue;
                    }
                    return Ok(next);
                }
                Some(i) if i.state() == cri::ContainerState::ContainerCreated => {
                    let id = i.status.id.clone();
                    let hooked = self.start_created(pod, c, &id, &facts).await?;
                    if before || (hooked && c.startup_probe.is_none()) {
                        continue;
                    }
                    return Ok(next);
                }
                Some(i) if i.running() => {
                    let i = i.clone();
                    if self
                        .check_running(pod, c, &i, obs, &sandbox_config, &facts)
                        .await?
                    {
                        if before {
                            continue;
                        }
                        return Ok(next);
                    }
                    // Without probe state yet, a startup probe has not succeeded.
                    let started = match self.probes.state(&i.status.id) {
                        Some(p) => p.started,
                        None => c.startup_probe.is_none(),
                    };
                    if before || started {
                        continue;
                    }
                    return Ok(next);
                }
                Some(_) if before => continue,
                Some(_) => return Ok(next),
            }
        }
        for c in &s.containers {
            let latest = obs
                .of(&c.name)
                .first()
                .map(|i| (i.state(), i.status.exit_code));
            match latest {
                None => {
                    self.start(pod, c, obs, &sandbox_config, &facts).await?;
                }
                Some((cri::ContainerState::ContainerExited, code)) => {
                    let again = match restart_policy.as_str() {
                        "Always" => true,
                        "OnFailure" => code != 0,
                        _ => false,
                    };
                    if again
                        && let Some(left) =
                            self.restart(pod, c, obs, &sandbox_config, &facts).await?
                    {
                        next = soonest(next, left);
                    }
                }
                Some((cri::ContainerState::ContainerCreated, _)) => {
                    let id = obs.of(&c.name)[0].status.id.clone();
                    self.start_created(pod, c, &id, &facts).await?;
                }
                Some((cri::ContainerState::ContainerRunning, _)) => {
                    let running = obs.of(&c.name)[0].clone();
                    self.check_running(pod, c, &running, obs, &sandbox_config, &facts)
                        .await?;
                }
                Some(_) => {}
            }
        }
        if self
            .waiting
            .values()
            .any(|w| w.reason == "CreateContainerConfigError")
        {
            // The ConfigMap or Secret may appear: try again.
            next = Next::After(super::volumes::CONFIG_ERROR_RETRY);
        }
        if self.waiting.values().any(|w| w.reason == "ErrImagePull") {
            // ErrImagePull stays visible for a moment, then the wait shows as ImagePullBackOff.
            next = Next::After(ERR_IMAGE_PULL_SHOWN);
        } else if self
            .waiting
            .values()
            .any(|w| w.reason == "ImagePullBackOff")
        {
            let soonest = self
                .pulls
                .values()
                .map(|b| (b.last + b.delay).saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(RESTART_BACKOFF_INITIAL);
            next = Next::After(soonest.max(Duration::from_millis(100)));
        }
        if let Some(due) = volumes_due {
            // Volumes of API data are rewritten periodically.
            next = match next {
                Next::After(d) if d < due => Next::After(d),
                _ => Next::After(due),
            };
        }
        Ok(next)
    }

    async fn report(&mut self, d: &Desired, status: PodStatus) -> Result<(), PodError> {
        let Some(client) = &self.ctx.client else {
            return Ok(());
        };
        if self
            .last_status
            .as_ref()
            .is_some_and(|l| status::same(l, &status))
        {
            return Ok(());
        }
        let (name, ns, uid) = spec::ids(&d.pod);
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        // A static pod's status goes to its mirror pod (same name, its own UID). A strategic
        // merge: the conditions other controllers set (readiness gates) are kept.
        // The server has podIPs when the kubelet reported some (it alone writes them): those
        // are replaced, not merged with the new ones.
        let has_ips = self
            .last_status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .is_some_and(|ips| !ips.is_empty());
        let patch = status::status_patch(
            &status,
            has_ips != self.ips_doubt,
            (d.source != Source::File).then_some(uid),
        );
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %spec::full_name(&d.pod), phase = ?status.phase, "status patched");
                self.last_status = Some(status);
                self.ips_doubt = false;
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 && d.source == Source::File => Ok(()),
            Err(source) => {
                if matches!(&source, kube::Error::Api(s) if s.code == 422) {
                    self.ips_doubt = !self.ips_doubt;
                }
                Err(PodError::Api {
                    what: "patching the pod status",
                    source,
                })
            }
        }
    }

    /// A pod refused by admission: nothing is started; the status is Failed with the reason
    /// and a Warning Event is recorded, as upstream's `rejectPod`.
    async fn rejected(
        &mut self,
        d: &Desired,
        r: &super::admission::Rejection,
    ) -> Result<Action, PodError> {
        let message = r.status_message();
        let last = self.last_status.as_ref();
        if last.and_then(|s| s.reason.as_deref()) != Some(r.reason.as_str())
            || last.and_then(|s| s.message.as_deref()) != Some(message.as_str())
        {
            if self.phase.as_deref() != Some("Failed") {
                self.ctx.events.event(
                    &d.pod,
                    None,
                    EventType::Warning,
                    &r.reason,
                    r.message.clone(),
                );
            }
            let st = PodStatus {
                phase: Some("Failed".into()),
                reason: Some(r.reason.clone()),
                message: Some(message),
                ..self.last_status.clone().unwrap_or_default()
            };
            self.report(d, st).await?;
        }
        self.phase = Some("Failed".into());
        let _ = self.events.send(ManagerEvent::Finished(self.uid.clone()));
        Ok(Action::await_change())
    }

    async fn admission_failure(
        &mut self,
        d: &Desired,
        problems: Vec<String>,
    ) -> Result<Action, PodError> {
        let mut st = self.last_status.clone().unwrap_or_default();
        st.phase = Some("Failed".into());
        st.reason = Some("UnsupportedPodSpec".into());
        st.message = Some(format!(
            "Pod was rejected: deckhand-kubelet does not support: {}",
            problems.join("; ")
        ));
        if self.last_status.as_ref().and_then(|s| s.reason.as_deref()) != Some("UnsupportedPodSpec")
        {
            tracing::warn!(pod = %spec::full_name(&d.pod), "pod rejected: {}", problems.join("; "));
        }
        self.report(d, st).await?;
        Ok(Action::await_change())
    }
}

impl Reconciler for PodWorker {
    type Error = PodError;

    fn name(&self) -> &'static str {
        "pod"
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(600)
    }

    async fn reconcile(&mut self) -> Result<Action, PodError> {
        if self.finished {
            return Ok(Action::await_change());
        }
        let d = self.desired.borrow().clone();
        if d.removed || d.pod.metadata.deletion_timestamp.is_some() {
            return self.terminate(&d).await;
        }
        let pod = d.pod.clone();
        if let Some(r) = &d.rejected {
            return self.rejected(&d, r).await;
        }
        if let Some(st) = &pod.status
            && (st.reason.as_deref() == Some("UnsupportedPodSpec")
                || (st.phase.as_deref() == Some("Failed")
                    && st
                        .reason
                        .as_deref()
                        .is_some_and(super::admission::is_rejection_reason)))
        {
            return Ok(Action::await_change());
        }
        let problems = spec::unsupported(&pod);
        if !problems.is_empty() {
            return self.admission_failure(&d, problems).await;
        }
        if self.start_time.is_none() {
            self.start_time = Some(Time(Timestamp::now()));
        }
        let mut obs = self.observe().await?;
        // The status is reported also when a step failed (Pending, ContainerCreating), then
        // the error goes to the back-off.
        let terminal = matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"));
        let synced = if terminal {
            Ok(Next::Events)
        } else {
            self.sync(&pod, &mut obs).await
        };
        let obs = self.observe().await?;
        let sandbox_ready = obs.ready();
        let mut by_name: HashMap<String, Vec<&Instance>> = HashMap::new();
        if let Some(sb) = obs.current() {
            for i in obs.instances.iter().filter(|i| i.sandbox_id == sb.id) {
                by_name.entry(i.name().to_string()).or_default().push(i);
            }
        }
        let mut pod_ips = Vec::new();
        if let Some(sb) = obs.current()
            && sandbox_ready
            && let Ok(st) = self.ctx.runtime.pod_sandbox_status(&sb.id).await
            && let Some(n) = st.network
        {
            pod_ips.extend(Some(n.ip).filter(|i| !i.is_empty()));
            pod_ips.extend(n.additional_ips.into_iter().map(|i| i.ip));
        }
        self.pod_ip = if spec::host_network(&pod) {
            self.ctx.node_ip.clone()
        } else {
            pod_ips.first().cloned().unwrap_or_default()
        };
        let s = spec::spec(&pod);
        let sidecars = s
            .init_containers
            .iter()
            .flatten()
            .filter(|c| status::is_sidecar(c));
        let targets: Vec<probes::Target> = s
            .containers
            .iter()
            .chain(sidecars)
            .filter_map(|c| by_name.get(&c.name)?.first().copied())
            .filter(|i| i.running())
            .map(|i| probes::Target {
                name: i.name().to_string(),
                id: i.status.id.clone(),
                started_at: i.status.started_at,
            })
            .collect();
        let env = probes::Env {
            exec: self.ctx.exec.clone(),
            events: self.ctx.events.clone(),
            wake: self.events.clone(),
        };
        self.probes.sync(&env, &pod, &targets, &self.pod_ip);
        let probed = self
            .probes
            .by_name()
            .into_iter()
            .map(|(name, s)| {
                let p = status::Probed {
                    started: s.started,
                    ready: s.ready,
                };
                (name, p)
            })
            .collect();
        let observed = Observed {
            probed,
            instances: by_name,
            waiting: self.waiting.clone(),
            pod_ips,
            host_ip: self.ctx.node_ip.clone(),
            runtime_name: self.runtime_name().await,
            start_time: self.start_time.clone(),
            sandbox_ready,
        };
        let status = status::pod_status(&pod, &observed, self.last_status.as_ref());
        let was_done = matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"));
        self.phase = status.phase.clone();
        let done = matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"));
        if done && !was_done {
            // It no longer counts against the node's allocatable, nor in the burstable shares.
            let _ = self.events.send(ManagerEvent::Finished(self.uid.clone()));
            self.ctx.cgroups.pod_finished(&self.uid);
        }
        self.report(&d, status).await?;
        if done
            && sandbox_ready
            && let Some(sb) = obs.current()
        {
            // A pod that has finished keeps its containers (for status and logs) but not its
            // sandbox, as upstream terminates finished pods.
            tracing::info!(pod = %spec::full_name(&pod), phase = ?self.phase, "pod finished: stopping its sandbox");
            self.ctx.runtime.stop_pod_sandbox(&sb.id).await?;
        }
        let next = synced?;
        self.errors.reset();
        Ok(match next {
            Next::Events => Action::await_change(),
            Next::After(d) => Action::requeue(d),
        })
    }

    fn error_policy(&mut self, error: Option<&PodError>) -> Action {
        if error.is_none() {
            tracing::warn!(pod_uid = %self.uid, "pod sync timed out");
        }
        Action::requeue(self.errors.next_delay())
    }
}

/// Whether every regular container of the pod has exited and none is to restart per the
/// pod's `restart_policy` (sidecars left aside).
fn regular_containers_done(pod: &Pod, obs: &Runtime, restart_policy: &str) -> bool {
    let containers = &spec::spec(pod).containers;
    restart_policy != "Always"
        && !containers.is_empty()
        && containers.iter().all(|c| {
            obs.of(&c.name).first().is_some_and(|i| {
                i.exited() && (restart_policy == "Never" || i.status.exit_code == 0)
            })
        })
}

/// The longest termination message read from the file (upstream's 4 KiB).
const TERMINATION_MESSAGE_MAX: u64 = 4096;
/// FallbackToLogsOnError: the last this many log lines...
const TERMINATION_LOG_LINES: usize = 80;
/// ... of at most this many bytes (upstream's values).
const TERMINATION_LOG_BYTES: usize = 2048;

/// Adds an exited container's termination message to its CRI message, as upstream's kubelet:
/// the file mounted at its `terminationMessagePath` (at most 4 KiB), or, with
/// `FallbackToLogsOnError`, a failure and nothing in that file, the end of its log (the last 80
/// lines, at most 2 KiB of them).
fn add_termination_message(s: &mut cri::ContainerStatus) {
    use std::io::Read;
    let path = s.annotations.get(spec::CONTAINER_TERMINATION_MESSAGE_PATH);
    let fallback = s
        .annotations
        .get(spec::CONTAINER_TERMINATION_MESSAGE_POLICY)
        .is_some_and(|p| p == "FallbackToLogsOnError")
        && s.exit_code != 0
        && s.reason != "ContainerCannotRun";
    let mut message = String::new();
    if let Some(m) = path.and_then(|p| s.mounts.iter().find(|m| &m.container_path == p)) {
        let mut buf = Vec::new();
        // O_NOFOLLOW: the container may have replaced its end of the mount with a symlink;
        // never read through it on the host.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(&m.host_path);
        if let Ok(f) = opened
            && f.metadata().is_ok_and(|md| md.is_file())
        {
            let _ = f.take(TERMINATION_MESSAGE_MAX).read_to_end(&mut buf);
        }
        message = String::from_utf8_lossy(&buf).into_owned();
    }
    if message.is_empty() && fallback && Path::new(&s.log_path).is_absolute() {
        message = log_tail(Path::new(&s.log_path));
    }
    if !message.is_empty() {
        if !s.message.is_empty() {
            s.message.push_str(": ");
        }
        s.message.push_str(&message);
    }
}

/// The last [`TERMINATION_LOG_LINES`] lines of a CRI log file, at most
/// [`TERMINATION_LOG_BYTES`] of them, read from the file's last 256 KiB.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    // A cut first line is not a line.
    let body = if start > 0 {
        buf.iter()
            .position(|b| *b == b'\n')
            .map_or(&buf[..0], |i| &buf[i + 1..])
    } else {
        &buf[..]
    };
    let mut parser = crate::server::logs::Parser::default();
    let mut lines: std::collections::VecDeque<Vec<u8>> = Default::default();
    for raw in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        if let Ok(Some(line)) = parser.push(raw) {
            if lines.len() == TERMINATION_LOG_LINES {
                lines.pop_front();
            }
            lines.push_back(line.text);
        }
    }
    let mut out: Vec<u8> = lines.into_iter().flatten().collect();
    out.truncate(TERMINATION_LOG_BYTES);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inst(name: &str, state: cri::ContainerState, exit_code: i32) -> Instance {
        Instance {
            sandbox_id: "sb".into(),
            status: cri::ContainerStatus {
                id: format!("{name}-id"),
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                state: state as i32,
                exit_code,
                ..Default::default()
            },
        }
    }

    #[test]
    fn sidecars_do_not_keep_a_finished_pod_running() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"initContainers": [{"name": "s", "restartPolicy": "Always"}],
                "containers": [{"name": "a"}, {"name": "b"}]}
        }))
        .expect("pod");
        let rt = |instances: Vec<Instance>| Runtime {
            sandboxes: vec![cri::PodSandbox {
                id: "sb".into(),
                ..Default::default()
            }],
            instances,
        };
        use cri::ContainerState::{ContainerExited as Exited, ContainerRunning as Running};
        let side = || inst("s", Running, 0);
        let both_ok = rt(vec![side(), inst("a", Exited, 0), inst("b", Exited, 0)]);
        assert!(regular_containers_done(&pod, &both_ok, "Never"));
        assert!(regular_containers_done(&pod, &both_ok, "OnFailure"));
        assert!(!regular_containers_done(&pod, &both_ok, "Always"));
        let one_failed = rt(vec![side(), inst("a", Exited, 0), inst("b", Exited, 1)]);
        assert!(regular_containers_done(&pod, &one_failed, "Never"));
        assert!(!regular_containers_done(&pod, &one_failed, "OnFailure"));
        let one_runs = rt(vec![side(), inst("a", Exited, 0), inst("b", Running, 0)]);
        assert!(!regular_containers_done(&pod, &one_runs, "Never"));
        let not_started = rt(vec![side(), inst("a", Exited, 0)]);
        assert!(!regular_containers_done(&pod, &not_started, "Never"));
    }
}
