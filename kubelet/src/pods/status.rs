//! A pod's API status from what the runtime reports, as upstream's `generateAPIPodStatus`.
//!
//! Pure functions: the worker observes the runtime ([`Instance`]s of each container, newest
//! first) and passes what it decided itself (waiting reasons such as `CrashLoopBackOff` or
//! `ErrImagePull`); [`pod_status`] gives phase, conditions, IPs, QoS class and the container
//! statuses. Condition transition times are kept from the previous status when a condition
//! did not change, so a status computed again after a kubelet restart is equal.
//!
//! Sidecars (init containers with `restartPolicy: Always`, KEP-753) are reported among the
//! init container statuses as running, `started` and `ready` per their probes; they count as
//! initialized once started, their readiness counts for `ContainersReady`/`Ready`, and they do
//! not decide the phase (a sidecar that exited, e.g. killed once the regular containers
//! completed, is not counted), as upstream's `getPhase`.
//!
//! Readiness gates (`spec.readinessGates`): `Ready` is True only when `ContainersReady` is
//! and every gate's condition, set by another controller on the API's pod, exists and is
//! True; otherwise it is False with upstream's reason `ReadinessGatesNotReady` and messages
//! (upstream's `GeneratePodReadyCondition`). The kubelet reports only the conditions it owns
//! ([`KUBELET_CONDITIONS`]) in a strategic-merge patch ([`status_patch`]) that keeps the
//! others, and [`needs_readiness_reconcile`] tells the manager to wake the worker when a
//! status-only update makes `Ready` disagree with the gates.

use std::collections::HashMap;

use deckhand_proto::cri::{self, ContainerState as CriState};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::spec::{self, CONTAINER_RESTART_COUNT};

/// One runtime container of a pod.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// Its status.
    pub status: cri::ContainerStatus,
}

impl Instance {
    /// The container's name in the pod spec.
    pub fn name(&self) -> &str {
        self.status
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default()
    }

    /// Its restart count (annotation).
    pub fn restart_count(&self) -> u32 {
        self.status
            .annotations
            .get(CONTAINER_RESTART_COUNT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Its CRI state.
    pub fn state(&self) -> CriState {
        CriState::try_from(self.status.state).unwrap_or(CriState::ContainerUnknown)
    }

    /// Whether it exited.
    pub fn exited(&self) -> bool {
        self.state() == CriState::ContainerExited
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.state() == CriState::ContainerRunning
    }
}

/// Whether `c` (an init container) is a sidecar: a restartable init container.
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// A reason the kubelet itself gives for a container that does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// `CrashLoopBackOff`, `ErrImagePull`, `ImagePullBackOff`, `CreateContainerConfigError`...
    pub reason: String,
    /// The message.
    pub message: String,
}

/// Everything the status is computed from.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    /// Instances of the current sandbox's containers by name, newest first.
    pub instances: HashMap<String, Vec<&'a Instance>>,
    /// Reasons decided by the worker, by container name.
    pub waiting: HashMap<String, Waiting>,
    /// The pod's IPs from the sandbox.
    pub pod_ips: Vec<String>,
    /// The node IP.
    pub host_ip: String,
    /// The runtime's name for container IDs (`containerd`).
    pub runtime_name: String,
    /// The start time to report.
    pub start_time: Option<Time>,
    /// A sandbox exists (ContainerCreating vs PodInitializing).
    pub sandbox_ready: bool,
    /// What the probes say of running containers that have probes, by name (the others are
    /// started and ready while they run).
    pub probed: HashMap<String, Probed>,
}

/// A running container's probe results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    /// The startup probe succeeded (or there is none).
    pub started: bool,
    /// Started, and the readiness probe succeeds (or there is none).
    pub ready: bool,
}

fn time(ns: i64) -> Option<Time> {
    if ns <= 0 {
        return None;
    }
    Timestamp::from_nanosecond(i128::from(ns)).ok().map(Time)
}

fn terminated(i: &Instance, runtime: &str) -> ContainerStateTerminated {
    let s = &i.status;
    let reason = if !s.reason.is_empty() {
        s.reason.clone()
    } else if s.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    ContainerStateTerminated {
        exit_code: s.exit_code,
        reason: Some(reason),
        message: Some(s.message.clone()).filter(|m| !m.is_empty()),
        started_at: time(s.started_at),
        finished_at: time(s.finished_at),
        container_id: Some(format!("{runtime}://{}", s.id)),
        signal: None,
    }
}

fn waiting(reason: &str, message: Option<&str>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message: message.map(str::to_string).filter(|m| !m.is_empty()),
        }),
        ..Default::default()
    }
}

/// One container's status.
pub fn container_status(
    c: &Container,
    obs: &Observed<'_>,
    default_reason: &str,
) -> ContainerStatus {
    let instances = obs
        .instances
        .get(&c.name)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let latest = instances.first();
    let kubelet_reason = obs.waiting.get(&c.name);
    let rt = &obs.runtime_name;
    let (state, last) = match latest {
        None => (
            match kubelet_reason {
                Some(w) => waiting(&w.reason, Some(&w.message)),
                None => waiting(default_reason, None),
            },
            None,
        ),
        Some(i) if i.running() => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: time(i.status.started_at),
                }),
                ..Default::default()
            },
            instances
                .get(1)
                .filter(|p| p.exited())
                .map(|p| terminated(p, rt)),
        ),
        Some(i) if i.exited() => match kubelet_reason {
            Some(w) => (
                waiting(&w.reason, Some(&w.message)),
                Some(terminated(i, rt)),
            ),
            None => (
                ContainerState {
                    terminated: Some(terminated(i, rt)),
                    ..Default::default()
                },
                instances
                    .get(1)
                    .filter(|p| p.exited())
                    .map(|p| terminated(p, rt)),
            ),
        },
        Some(_) => (
            waiting(
                kubelet_reason.map_or("ContainerCreating", |w| &w.reason),
                kubelet_reason.map(|w| w.message.as_str()),
            ),
            None,
        ),
    };
    let running = state.running.is_some();
    let probed = obs.probed.get(&c.name);
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: latest
            .map(|i| i.status.image_ref.clone())
            .unwrap_or_default(),
        container_id: latest.map(|i| format!("{rt}://{}", i.status.id)),
        ready: running && probed.is_none_or(|p| p.ready),
        started: Some(running && probed.is_none_or(|p| p.started)),
        restart_count: latest.map_or(0, |i| i32::try_from(i.restart_count()).unwrap_or(i32::MAX)),
        last_state: last.map(|t| ContainerState {
            terminated: Some(t),
            ..Default::default()
        }),
        state: Some(state),
        ..Default::default()
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    previous: &[PodCondition],
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let prev = previous.iter().find(|c| c.type_ == type_);
    let since = match prev {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(now.clone()),
    };
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: if ok { None } else { reason.map(str::to_string) },
        message: if ok { None } else { message },
        last_transition_time: since,
        last_probe_time: None,
        observed_generation: None,
    }
}

/// The conditions the kubelet writes (upstream's `PodConditionByKubelet`, and `PodScheduled`
/// it sets when nothing did); the others belong to other controllers (readiness gates) and
/// are never patched by it.
pub const KUBELET_CONDITIONS: [&str; 4] =
    ["Initialized", "Ready", "ContainersReady", "PodScheduled"];

/// Upstream's reason of a pod whose containers are ready but not its readiness gates.
pub const READINESS_GATES_NOT_READY: &str = "ReadinessGatesNotReady";

/// Why the readiness gates of `pod` are not all satisfied by `conditions` (upstream's
/// messages, joined by ", "), or None when every gate's condition exists and is True.
pub fn readiness_gates_unready<'a>(
    pod: &Pod,
    conditions: impl IntoIterator<Item = &'a PodCondition> + Clone,
) -> Option<String> {
    let gates = spec::spec(pod)
        .readiness_gates
        .as_deref()
        .unwrap_or_default();
    let problems: Vec<String> = gates
        .iter()
        .filter_map(|g| {
            let t = &g.condition_type;
            match conditions.clone().into_iter().find(|c| &c.type_ == t) {
                None => Some(format!(
                    "corresponding condition of pod readiness gate {t:?} does not exist."
                )),
                Some(c) if c.status != "True" => Some(format!(
                    "the status of pod readiness gate {t:?} is not \"True\", but {}",
                    c.status
                )),
                Some(_) => None,
            }
        })
        .collect();
    (!problems.is_empty()).then(|| problems.join(", "))
}

/// The `Ready` condition's status, reason and message, as upstream's
/// `GeneratePodReadyCondition`: those of `ContainersReady` while it is not True, else True
/// only if every readiness gate's condition in `conditions` is True.
fn ready(
    pod: &Pod,
    containers_ready: &PodCondition,
    conditions: &[&PodCondition],
) -> (bool, Option<String>, Option<String>) {
    if containers_ready.status != "True" {
        return (
            false,
            containers_ready.reason.clone(),
            containers_ready.message.clone(),
        );
    }
    match readiness_gates_unready(pod, conditions.iter().copied()) {
        Some(m) => (false, Some(READINESS_GATES_NOT_READY.into()), Some(m)),
        None => (true, None, None),
    }
}

/// Whether the API's `Ready` condition of `pod` is not what its readiness gates and its
/// `ContainersReady` now give, so that its worker must run again although only the status
/// changed (upstream's `NeedToReconcilePodReadiness`: another controller set a gate's
/// condition). Only a pod with readiness gates and a `Ready` condition the kubelet reported.
pub fn needs_readiness_reconcile(pod: &Pod) -> bool {
    if spec::spec(pod)
        .readiness_gates
        .as_ref()
        .is_none_or(|g| g.is_empty())
    {
        return false;
    }
    let conds = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let find = |t: &str| conds.iter().find(|c| c.type_ == t);
    let (Some(current), Some(containers_ready)) = (find("Ready"), find("ContainersReady")) else {
        return false;
    };
    let others: Vec<&PodCondition> = conds.iter().filter(|c| c.type_ != "Ready").collect();
    let (ok, _, message) = ready(pod, containers_ready, &others);
    let status = if ok { "True" } else { "False" };
    let msg = |m: Option<&str>| m.filter(|m| !m.is_empty()).map(str::to_string);
    current.status != status || msg(current.message.as_deref()) != msg(message.as_deref())
}

/// The body of the strategic-merge patch of a pod's status subresource, as upstream's
/// status manager patches: conditions merge by type, so the conditions of other controllers
/// (readiness gates) are kept; only the kubelet's own are sent, and the fields they no
/// longer have are deleted (null). `podIPs` (merged by IP) is replaced with
/// `replace_ips`, which must be given only when the server has podIPs (the 1.20 API server
/// stores the directive itself into an absent list). `uid` makes the patch apply only to
/// that pod (not to a mirror pod, whose UID is its own).
pub fn status_patch(status: &PodStatus, replace_ips: bool, uid: Option<&str>) -> serde_json::Value {
    let mut st = serde_json::to_value(status).unwrap_or_default();
    if let Some(o) = st.as_object_mut() {
        if let Some(conds) = o.get_mut("conditions").and_then(|c| c.as_array_mut()) {
            conds.retain(|c| {
                c["type"]
                    .as_str()
                    .is_some_and(|t| KUBELET_CONDITIONS.contains(&t))
            });
            for c in conds.iter_mut().filter_map(|c| c.as_object_mut()) {
                for field in ["reason", "message"] {
                    c.entry(field).or_insert(serde_json::Value::Null);
                }
            }
        }
        if let Some(ips) = o
            .get_mut("podIPs")
            .and_then(|c| c.as_array_mut())
            .filter(|_| replace_ips)
        {
            ips.push(serde_json::json!({"$patch": "replace"}));
        }
    }
    match uid {
        Some(uid) => serde_json::json!({ "metadata": { "uid": uid }, "status": st }),
        None => serde_json::json!({ "status": st }),
    }
}

fn is_succeeded(s: &ContainerStatus) -> bool {
    s.state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .is_some_and(|t| t.exit_code == 0)
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|s| s.running.is_some())
}

fn last_terminated(s: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    s.last_state.as_ref().and_then(|l| l.terminated.as_ref())
}

/// Whether a regular container has run (upstream's `HasAnyRegularContainerStarted`): the pod
/// was initialized once, also when a sidecar restarts now.
fn any_regular_started(main: &[ContainerStatus]) -> bool {
    main.iter().any(|s| {
        s.state
            .as_ref()
            .is_some_and(|st| st.running.is_some() || st.terminated.is_some())
    })
}

/// The phase, as upstream's `getPhase`: `init` are the statuses of the init containers in
/// spec order (regular ones and sidecars), `main` those of the containers.
pub fn phase(pod: &Pod, init: &[ContainerStatus], main: &[ContainerStatus]) -> &'static str {
    let s = spec::spec(pod);
    let restart = s.restart_policy.as_deref().unwrap_or("Always");
    let (mut pending_init, mut pending_sidecars, mut failed_init) = (0, 0, 0);
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for (c, st) in s.init_containers.iter().flatten().zip(init) {
        let state = st.state.as_ref();
        if is_sidecar(c) {
            // An exited sidecar (or one waiting to restart) does not count.
            if state.is_some_and(|s| s.running.is_some()) {
                if st.started != Some(true) {
                    pending_sidecars += 1;
                }
                running += 1;
            } else if state.is_none_or(|s| s.terminated.is_none()) && last_terminated(st).is_none()
            {
                pending_sidecars += 1;
                waiting += 1;
            }
            continue;
        }
        if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
            if t.exit_code != 0 {
                failed_init += 1;
            }
        } else if state.is_some_and(|s| s.waiting.is_some())
            && let Some(t) = last_terminated(st)
        {
            if t.exit_code != 0 {
                failed_init += 1;
            }
        } else {
            pending_init += 1;
        }
    }
    for st in main {
        if is_running(st) {
            running += 1;
        } else if let Some(t) = st.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if last_terminated(st).is_some() {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    if failed_init > 0 && restart == "Never" {
        return "Failed";
    }
    if pending_init > 0 || (pending_sidecars > 0 && !any_regular_started(main)) || waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 {
        if restart == "Always" {
            return "Running";
        }
        if stopped == succeeded {
            return "Succeeded";
        }
        if restart == "Never" {
            return "Failed";
        }
        return "Running";
    }
    "Pending"
}

/// The pod's whole status; `previous` is the status the API server has.
pub fn pod_status(pod: &Pod, obs: &Observed<'_>, previous: Option<&PodStatus>) -> PodStatus {
    let s = spec::spec(pod);
    let init_specs: Vec<&Container> = s.init_containers.iter().flatten().collect();
    let init: Vec<ContainerStatus> = init_specs
        .iter()
        .map(|c| {
            let mut st = container_status(
                c,
                obs,
                if obs.sandbox_ready {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                },
            );
            if !is_sidecar(c) {
                // A regular init container is ready once it completed (upstream's prober
                // manager).
                st.ready = is_succeeded(&st);
            }
            st
        })
        .collect();
    // Regular init containers completed and sidecars started (upstream's
    // `GeneratePodInitializedCondition`).
    let uninit: Vec<String> = init_specs
        .iter()
        .zip(&init)
        .filter(|(c, st)| {
            if is_sidecar(c) {
                st.started != Some(true)
            } else {
                !is_succeeded(st)
            }
        })
        .map(|(_, st)| st.name.clone())
        .collect();
    let init_done = uninit.is_empty();
    let main: Vec<ContainerStatus> = s
        .containers
        .iter()
        .map(|c| {
            container_status(
                c,
                obs,
                if init_done && obs.sandbox_ready || s.init_containers.is_none() {
                    "ContainerCreating"
                } else {
                    "PodInitializing"
                },
            )
        })
        .collect();
    let phase = phase(pod, &init, &main);
    let now = Time(Timestamp::now());
    let prev_conds = previous
        .and_then(|p| p.conditions.as_deref())
        .unwrap_or_default();
    fn not(list: &[ContainerStatus], pred: &dyn Fn(&ContainerStatus) -> bool) -> Vec<String> {
        list.iter()
            .filter(|s| !pred(s))
            .map(|s| s.name.clone())
            .collect()
    }
    let initialized = init_done || phase == "Succeeded" || any_regular_started(&main);
    // Sidecars' readiness counts, listed first (upstream's `GenerateContainersReadyCondition`).
    let sidecars: Vec<ContainerStatus> = init_specs
        .iter()
        .zip(&init)
        .filter(|(c, _)| is_sidecar(c))
        .map(|(_, st)| st.clone())
        .collect();
    let mut unready = not(&sidecars, &|s| s.ready);
    unready.extend(not(&main, &|s| s.ready));
    let completed = phase == "Succeeded";
    let ready_reason = if completed {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let unready_msg =
        (!completed).then(|| format!("containers with unready status: [{}]", unready.join(" ")));
    let initialized = condition(
        "Initialized",
        initialized,
        Some("ContainersNotInitialized"),
        Some(format!(
            "containers with incomplete status: [{}]",
            uninit.join(" ")
        )),
        prev_conds,
        &now,
    );
    let containers_ready = condition(
        "ContainersReady",
        unready.is_empty() && !completed,
        Some(ready_reason),
        unready_msg,
        prev_conds,
        &now,
    );
    let scheduled = match prev_conds.iter().find(|c| c.type_ == "PodScheduled") {
        Some(c) => c.clone(),
        None => condition("PodScheduled", true, None, None, &[], &now),
    };
    // The readiness gates' conditions are those other controllers set on the API's pod.
    let others = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|c| !KUBELET_CONDITIONS.contains(&c.type_.as_str()));
    let gate_conditions: Vec<&PodCondition> = [&initialized, &containers_ready, &scheduled]
        .into_iter()
        .chain(others)
        .collect();
    let (ok, reason, message) = ready(pod, &containers_ready, &gate_conditions);
    let ready = condition("Ready", ok, reason.as_deref(), message, prev_conds, &now);
    let conditions = vec![initialized, ready, containers_ready, scheduled];
    let pod_ips = if spec::host_network(pod) {
        vec![obs.host_ip.clone()]
            .into_iter()
            .filter(|i| !i.is_empty())
            .collect()
    } else {
        obs.pod_ips.clone()
    };
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(obs.host_ip.clone()).filter(|i| !i.is_empty()),
        pod_ip: pod_ips.first().cloned(),
        pod_ips: (!pod_ips.is_empty())
            .then(|| pod_ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        start_time: obs.start_time.clone(),
        qos_class: Some(spec::qos_class(pod).into()),
        init_container_statuses: (!init.is_empty()).then_some(init),
        container_statuses: Some(main),
        ..Default::default()
    }
}

/// Whether two statuses are the same for the API (ignoring fields and conditions the kubelet
/// does not own).
pub fn same(a: &PodStatus, b: &PodStatus) -> bool {
    let norm = |s: &PodStatus| {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.retain(|k, _| {
                matches!(
                    k.as_str(),
                    "phase"
                        | "conditions"
                        | "hostIP"
                        | "podIP"
                        | "podIPs"
                        | "startTime"
                        | "qosClass"
                        | "initContainerStatuses"
                        | "containerStatuses"
                        | "reason"
                        | "message"
                )
            });
            if let Some(c) = o.get_mut("conditions").and_then(|c| c.as_array_mut()) {
                c.retain(|c| {
                    c["type"]
                        .as_str()
                        .is_some_and(|t| KUBELET_CONDITIONS.contains(&t))
                });
                c.sort_by(|x, y| x["type"].as_str().cmp(&y["type"].as_str()));
            }
        }
        v
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, state: CriState, exit: i32, restarts: u32, id: &str) -> Instance {
        Instance {
            sandbox_id: "s".into(),
            status: cri::ContainerStatus {
                id: id.into(),
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: restarts,
                }),
                state: state as i32,
                exit_code: exit,
                started_at: 1_700_000_000_000_000_000,
                finished_at: if state == CriState::ContainerExited {
                    1_700_000_001_000_000_000
                } else {
                    0
                },
                image_ref: "sha256:abc".into(),
                annotations: HashMap::from([(
                    CONTAINER_RESTART_COUNT.to_string(),
                    restarts.to_string(),
                )]),
                ..Default::default()
            },
        }
    }

    fn pod(restart: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"restartPolicy": restart, "initContainers": [{"name": "i", "image": "b"}],
                "containers": [{"name": "c", "image": "b"}]}
        }))
        .expect("pod")
    }

    #[test]
    fn running_pod() {
        let i = inst("i", CriState::ContainerExited, 0, 0, "i1");
        let c = inst("c", CriState::ContainerRunning, 0, 0, "c1");
        let obs = Observed {
            instances: HashMap::from([("i".into(), vec![&i]), ("c".into(), vec![&c])]),
            host_ip: "10.0.0.1".into(),
            runtime_name: "containerd".into(),
            sandbox_ready: true,
            ..Default::default()
        };
        let p = pod("Always");
        let s = pod_status(&p, &obs, None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.as_ref().expect("statuses")[0];
        assert!(cs.ready);
        assert_eq!(cs.container_id.as_deref(), Some("containerd://c1"));
        let conds = s.conditions.as_ref().expect("conditions");
        assert!(conds.iter().all(|c| c.status == "True"), "{conds:?}");
        assert_eq!(s.qos_class.as_deref(), Some("BestEffort"));
        // The same observation again is the same status.
        assert!(same(&s, &pod_status(&p, &obs, Some(&s))));
    }

    #[test]
    fn probes_decide_started_and_ready() {
        let i = inst("i", CriState::ContainerExited, 0, 0, "i1");
        let c = inst("c", CriState::ContainerRunning, 0, 0, "c1");
        let obs = |started, ready| Observed {
            instances: HashMap::from([("i".into(), vec![&i]), ("c".into(), vec![&c])]),
            sandbox_ready: true,
            probed: HashMap::from([("c".into(), Probed { started, ready })]),
            ..Default::default()
        };
        let p = pod("Always");
        let s = pod_status(&p, &obs(false, false), None);
        let cs = &s.container_statuses.as_ref().expect("statuses")[0];
        assert_eq!((cs.started, cs.ready), (Some(false), false));
        assert!(cs.state.as_ref().is_some_and(|s| s.running.is_some()));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cond = |s: &PodStatus, t: &str| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == t)
                .map(|c| c.status.clone())
        };
        assert_eq!(cond(&s, "Ready").as_deref(), Some("False"));
        assert_eq!(cond(&s, "ContainersReady").as_deref(), Some("False"));
        let s = pod_status(&p, &obs(true, false), Some(&s));
        let cs = &s.container_statuses.as_ref().expect("statuses")[0];
        assert_eq!((cs.started, cs.ready), (Some(true), false));
        let s = pod_status(&p, &obs(true, true), Some(&s));
        assert_eq!(cond(&s, "Ready").as_deref(), Some("True"));
        assert_eq!(cond(&s, "ContainersReady").as_deref(), Some("True"));
    }

    #[test]
    fn crash_loop_and_completion() {
        let i = inst("i", CriState::ContainerExited, 0, 0, "i1");
        let c = inst("c", CriState::ContainerExited, 3, 2, "c3");
        let obs = Observed {
            instances: HashMap::from([("i".into(), vec![&i]), ("c".into(), vec![&c])]),
            waiting: HashMap::from([(
                "c".into(),
                Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: "back-off".into(),
                },
            )]),
            sandbox_ready: true,
            ..Default::default()
        };
        let s = pod_status(&pod("Always"), &obs, None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.as_ref().expect("statuses")[0];
        let w = cs
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .expect("waiting");
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
        let last = cs
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("last");
        assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
        assert_eq!(cs.restart_count, 2);

        let ok = inst("c", CriState::ContainerExited, 0, 0, "c1");
        let obs = Observed {
            instances: HashMap::from([("i".into(), vec![&i]), ("c".into(), vec![&ok])]),
            sandbox_ready: true,
            ..Default::default()
        };
        let s = pod_status(&pod("Never"), &obs, None);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let cs = &s.container_statuses.as_ref().expect("statuses")[0];
        let t = cs
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("terminated");
        assert_eq!(t.reason.as_deref(), Some("Completed"));
        let bad = inst("i", CriState::ContainerExited, 1, 0, "i1");
        let obs = Observed {
            instances: HashMap::from([("i".into(), vec![&bad])]),
            sandbox_ready: true,
            ..Default::default()
        };
        assert_eq!(
            pod_status(&pod("Never"), &obs, None).phase.as_deref(),
            Some("Failed")
        );
        assert_eq!(
            pod_status(&pod("Always"), &obs, None).phase.as_deref(),
            Some("Pending")
        );
    }

    fn sidecar_pod(restart: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"restartPolicy": restart, "initContainers": [
                    {"name": "s", "image": "b", "restartPolicy": "Always"},
                    {"name": "i", "image": "b"}],
                "containers": [{"name": "c", "image": "b"}]}
        }))
        .expect("pod")
    }

    fn cond(s: &PodStatus, t: &str) -> (String, Option<String>) {
        let c = s
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .expect("condition");
        (c.status.clone(), c.message.clone())
    }

    #[test]
    fn sidecars_initialize_once_started_and_count_for_readiness() {
        let sc = inst("s", CriState::ContainerRunning, 0, 0, "s1");
        let p = sidecar_pod("Never");
        // Running, its startup probe not yet passed: not initialized, Pending.
        let obs = Observed {
            instances: HashMap::from([("s".into(), vec![&sc])]),
            sandbox_ready: true,
            probed: HashMap::from([(
                "s".into(),
                Probed {
                    started: false,
                    ready: false,
                },
            )]),
            ..Default::default()
        };
        let s = pod_status(&p, &obs, None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let (st, msg) = cond(&s, "Initialized");
        assert_eq!(st, "False");
        assert_eq!(
            msg.as_deref(),
            Some("containers with incomplete status: [s i]")
        );
        let init = s.init_container_statuses.as_ref().expect("init statuses");
        assert_eq!(init[0].name, "s");
        assert_eq!((init[0].started, init[0].ready), (Some(false), false));
        assert!(init[0].state.as_ref().is_some_and(|s| s.running.is_some()));
        // Started and ready; the regular init container completed; the main one runs.
        let i = inst("i", CriState::ContainerExited, 0, 0, "i1");
        let c = inst("c", CriState::ContainerRunning, 0, 0, "c1");
        let mut obs = Observed {
            instances: HashMap::from([
                ("s".into(), vec![&sc]),
                ("i".into(), vec![&i]),
                ("c".into(), vec![&c]),
            ]),
            sandbox_ready: true,
            ..Default::default()
        };
        let s = pod_status(&p, &obs, Some(&s));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        for t in ["Initialized", "Ready", "ContainersReady"] {
            assert_eq!(cond(&s, t).0, "True", "{t}");
        }
        let init = s.init_container_statuses.as_ref().expect("init statuses");
        assert_eq!((init[0].started, init[0].ready), (Some(true), true));
        assert_eq!((init[1].started, init[1].ready), (Some(false), true));
        // An unready sidecar makes the pod unready.
        obs.probed = HashMap::from([(
            "s".into(),
            Probed {
                started: true,
                ready: false,
            },
        )]);
        let s = pod_status(&p, &obs, Some(&s));
        let (st, msg) = cond(&s, "ContainersReady");
        assert_eq!(st, "False");
        assert_eq!(msg.as_deref(), Some("containers with unready status: [s]"));
        assert_eq!(cond(&s, "Ready").0, "False");
        assert_eq!(cond(&s, "Initialized").0, "True");
    }

    #[test]
    fn sidecars_do_not_decide_the_phase() {
        let i = inst("i", CriState::ContainerExited, 0, 0, "i1");
        let done = inst("c", CriState::ContainerExited, 0, 0, "c1");
        let failed = inst("c", CriState::ContainerExited, 2, 0, "c1");
        let running = inst("s", CriState::ContainerRunning, 0, 0, "s1");
        let killed = inst("s", CriState::ContainerExited, 143, 0, "s1");
        fn obs<'a>(s: &'a Instance, i: &'a Instance, c: &'a Instance) -> Observed<'a> {
            Observed {
                instances: HashMap::from([
                    ("s".into(), vec![s]),
                    ("i".into(), vec![i]),
                    ("c".into(), vec![c]),
                ]),
                sandbox_ready: true,
                ..Default::default()
            }
        }
        let p = sidecar_pod("Never");
        // While the sidecar still runs, the pod runs.
        let s = pod_status(&p, &obs(&running, &i, &done), None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        // Once it was stopped (143), the main container's exit decides.
        let s = pod_status(&p, &obs(&killed, &i, &done), None);
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        assert_eq!(cond(&s, "Initialized").0, "True");
        let s = pod_status(&p, &obs(&killed, &i, &failed), None);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        // A sidecar in back-off after the pod initialized leaves it Running.
        let c = inst("c", CriState::ContainerRunning, 0, 0, "c1");
        let mut o = obs(&killed, &i, &c);
        o.waiting.insert(
            "s".into(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off".into(),
            },
        );
        let s = pod_status(&sidecar_pod("Always"), &o, None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let init = s.init_container_statuses.as_ref().expect("init statuses");
        let w = init[0].state.as_ref().and_then(|s| s.waiting.as_ref());
        assert_eq!(
            w.and_then(|w| w.reason.as_deref()),
            Some("CrashLoopBackOff")
        );
        assert_eq!(cond(&s, "Initialized").0, "True");
        // Not yet started at all: Pending, the main container PodInitializing.
        let o = Observed {
            sandbox_ready: true,
            ..Default::default()
        };
        let s = pod_status(&p, &o, None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let main = &s.container_statuses.as_ref().expect("statuses")[0];
        let w = main.state.as_ref().and_then(|s| s.waiting.as_ref());
        assert_eq!(w.and_then(|w| w.reason.as_deref()), Some("PodInitializing"));
    }

    fn gated_pod(gates: &[&str], conditions: serde_json::Value) -> Pod {
        let gates: Vec<serde_json::Value> = gates
            .iter()
            .map(|g| serde_json::json!({"conditionType": g}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"readinessGates": gates, "containers": [{"name": "c", "image": "b"}]},
            "status": {"conditions": conditions}
        }))
        .expect("pod")
    }

    fn full_cond(s: &PodStatus, t: &str) -> PodCondition {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .cloned()
            .expect("condition")
    }

    #[test]
    fn readiness_gates_decide_ready_once_the_containers_are() {
        let c = inst("c", CriState::ContainerRunning, 0, 0, "c1");
        let obs = Observed {
            instances: HashMap::from([("c".into(), vec![&c])]),
            sandbox_ready: true,
            ..Default::default()
        };
        let gate = "dh.example/gate";
        // No condition of the gate yet.
        let p = gated_pod(&[gate], serde_json::json!([]));
        let s = pod_status(&p, &obs, None);
        assert_eq!(full_cond(&s, "ContainersReady").status, "True");
        let r = full_cond(&s, "Ready");
        assert_eq!(r.status, "False");
        assert_eq!(r.reason.as_deref(), Some(READINESS_GATES_NOT_READY));
        assert_eq!(
            r.message.as_deref(),
            Some(
                "corresponding condition of pod readiness gate \"dh.example/gate\" does not exist."
            )
        );
        // The kubelet reports only its own conditions.
        assert!(
            s.conditions
                .iter()
                .flatten()
                .all(|c| KUBELET_CONDITIONS.contains(&c.type_.as_str()))
        );
        // The gate's condition False, and a second gate missing: both named.
        let p = gated_pod(
            &[gate, "dh.example/other"],
            serde_json::json!([{"type": gate, "status": "False"}]),
        );
        let s = pod_status(&p, &obs, Some(&s));
        assert_eq!(
            full_cond(&s, "Ready").message.as_deref(),
            Some(
                "the status of pod readiness gate \"dh.example/gate\" is not \"True\", but False, \
                 corresponding condition of pod readiness gate \"dh.example/other\" does not exist."
            )
        );
        // True: Ready, with a new transition time.
        let before = full_cond(&s, "Ready");
        let p = gated_pod(
            &[gate],
            serde_json::json!([{"type": gate, "status": "True"}]),
        );
        let s = pod_status(&p, &obs, Some(&s));
        let r = full_cond(&s, "Ready");
        assert_eq!(
            (r.status.as_str(), r.reason, r.message),
            ("True", None, None)
        );
        assert!(r.last_transition_time >= before.last_transition_time);
        // Unready containers win: Ready says what ContainersReady says.
        let mut unready = obs.clone();
        unready.probed = HashMap::from([(
            "c".into(),
            Probed {
                started: true,
                ready: false,
            },
        )]);
        let s = pod_status(&p, &unready, Some(&s));
        let r = full_cond(&s, "Ready");
        assert_eq!(r.status, "False");
        assert_eq!(r.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            r.message.as_deref(),
            Some("containers with unready status: [c]")
        );
    }

    #[test]
    fn a_gate_condition_set_by_another_controller_needs_a_reconcile() {
        let gate = "dh.example/gate";
        let kubelet_said = |ready: &str, message: Option<&str>| {
            serde_json::json!([
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": ready, "message": message},
            ])
        };
        let missing =
            "corresponding condition of pod readiness gate \"dh.example/gate\" does not exist.";
        // As the kubelet reported it: nothing to do.
        let p = gated_pod(&[gate], kubelet_said("False", Some(missing)));
        assert!(!needs_readiness_reconcile(&p));
        // A controller set the gate's condition True.
        let mut conds = kubelet_said("False", Some(missing));
        conds
            .as_array_mut()
            .expect("array")
            .push(serde_json::json!({"type": gate, "status": "True"}));
        let p = gated_pod(&[gate], conds.clone());
        assert!(needs_readiness_reconcile(&p));
        // The kubelet then reported Ready: nothing more to do.
        let mut done = kubelet_said("True", None);
        done.as_array_mut()
            .expect("array")
            .push(serde_json::json!({"type": gate, "status": "True"}));
        assert!(!needs_readiness_reconcile(&gated_pod(
            &[gate],
            done.clone()
        )));
        // The gate back to False.
        done[2]["status"] = "False".into();
        assert!(needs_readiness_reconcile(&gated_pod(&[gate], done)));
        // Without gates, or before the kubelet reported Ready at all, never.
        assert!(!needs_readiness_reconcile(&gated_pod(&[], conds)));
        assert!(!needs_readiness_reconcile(&gated_pod(
            &[gate],
            serde_json::json!([{"type": gate, "status": "True"}])
        )));
    }

    #[test]
    fn the_status_patch_sends_only_the_kubelets_conditions() {
        let c = inst("c", CriState::ContainerRunning, 0, 0, "c1");
        let obs = Observed {
            instances: HashMap::from([("c".into(), vec![&c])]),
            sandbox_ready: true,
            pod_ips: vec!["10.1.0.2".into()],
            ..Default::default()
        };
        let gate = "dh.example/gate";
        let p = gated_pod(
            &[gate],
            serde_json::json!([{"type": gate, "status": "True"}]),
        );
        let mut s = pod_status(&p, &obs, None);
        // A status carrying another controller's condition (as the API gave it).
        s.conditions.get_or_insert_default().push(PodCondition {
            type_: gate.into(),
            status: "True".into(),
            ..Default::default()
        });
        let patch = status_patch(&s, true, Some("u"));
        assert_eq!(patch["metadata"]["uid"], "u");
        let conds = patch["status"]["conditions"]
            .as_array()
            .expect("conditions");
        let types: Vec<&str> = conds.iter().filter_map(|c| c["type"].as_str()).collect();
        assert_eq!(
            types,
            ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
        );
        // Fields a condition no longer has are deleted, not left as the server had them.
        let ready = &conds[1];
        assert_eq!(ready["status"], "True");
        assert!(ready["reason"].is_null() && ready["message"].is_null());
        assert!(ready.as_object().is_some_and(|o| o.contains_key("reason")));
        assert_eq!(
            patch["status"]["podIPs"],
            serde_json::json!([{"ip": "10.1.0.2"}, {"$patch": "replace"}])
        );
        let first = status_patch(&s, false, None);
        assert!(first.get("metadata").is_none());
        assert_eq!(
            first["status"]["podIPs"],
            serde_json::json!([{"ip": "10.1.0.2"}])
        );
        // Another controller's condition does not make the status differ.
        let mine = pod_status(&p, &obs, Some(&s));
        assert!(same(&s, &mine));
    }
}
