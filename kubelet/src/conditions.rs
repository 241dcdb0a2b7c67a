//! The node's conditions, computed as upstream's kubelet does.
//!
//! [`RuntimeHealth`] follows the CRI `Status` answers (upstream `runtimeState`): the last
//! successful sync, the RuntimeReady and NetworkReady conditions. [`ready`] turns it (and missing
//! capacity) into the Ready condition with upstream's reasons and messages (`KubeletReady`,
//! `KubeletNotReady` with "container runtime network not ready: NetworkReady=false reason:...
//! message:..."); [`pressure`] gives MemoryPressure, DiskPressure and PIDPressure. [`merge`] keeps
//! `lastTransitionTime` while a condition's status holds and stamps every one with the heartbeat.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::NodeCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use deckhand_proto::cri::{RuntimeCondition, RuntimeStatus};

use crate::eviction::PressureState;

/// After this long without a successful CRI Status, the runtime is reported down (upstream's
/// `maxWaitForContainerRuntime`).
pub const RUNTIME_SYNC_THRESHOLD: Duration = Duration::from_secs(30);

/// The CRI condition type of the runtime.
pub const RUNTIME_READY: &str = "RuntimeReady";
/// The CRI condition type of the network.
pub const NETWORK_READY: &str = "NetworkReady";

/// What the kubelet knows about its runtime's health.
#[derive(Debug, Clone, Default)]
pub struct RuntimeHealth {
    last_sync: Option<Instant>,
    runtime_error: Option<String>,
    network_error: Option<String>,
}

/// Upstream's rendering of a CRI condition (`kubecontainer.RuntimeCondition.String`), `<nil>`
/// when absent.
fn describe(c: Option<&RuntimeCondition>) -> String {
    match c {
        Some(c) => format!(
            "{}={} reason:{} message:{}",
            c.r#type, c.status, c.reason, c.message
        ),
        None => "<nil>".to_string(),
    }
}

impl RuntimeHealth {
    /// Records a CRI Status answer received at `now` (upstream `updateRuntimeUp`).
    pub fn observe(&mut self, status: Option<&RuntimeStatus>, now: Instant) {
        let Some(status) = status else {
            // A runtime that answers without a status is treated like one that did not answer.
            return;
        };
        let find = |t: &str| status.conditions.iter().find(|c| c.r#type == t);
        let network = find(NETWORK_READY);
        self.network_error = match network {
            Some(c) if c.status => None,
            other => Some(format!(
                "container runtime network not ready: {}",
                describe(other)
            )),
        };
        let runtime = find(RUNTIME_READY);
        match runtime {
            Some(c) if c.status => {
                self.runtime_error = None;
                self.last_sync = Some(now);
            }
            other => {
                self.runtime_error =
                    Some(format!("container runtime not ready: {}", describe(other)));
            }
        }
    }

    /// The runtime's errors at `now`, in upstream's order.
    pub fn runtime_errors(&self, now: Instant) -> Vec<String> {
        let mut errs = Vec::new();
        match self.last_sync {
            None => errs.push("container runtime status check may not have completed yet".into()),
            Some(t) if now.saturating_duration_since(t) >= RUNTIME_SYNC_THRESHOLD => {
                errs.push("container runtime is down".into())
            }
            Some(_) => {}
        }
        errs.extend(self.runtime_error.clone());
        errs
    }

    /// The network's errors.
    pub fn network_errors(&self) -> Vec<String> {
        self.network_error.iter().cloned().collect()
    }
}

/// A condition to report: type, status, reason and message (times are added by [`merge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `Ready`, `MemoryPressure`...
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

/// Go's `utilerrors.NewAggregate(errs).Error()`: one message alone, several in brackets, without
/// repeats.
fn aggregate(errs: &[String]) -> Option<String> {
    let mut seen: Vec<&str> = Vec::new();
    for e in errs {
        if !seen.contains(&e.as_str()) {
            seen.push(e);
        }
    }
    match seen.len() {
        0 => None,
        1 => Some(seen[0].to_string()),
        _ => Some(format!("[{}]", seen.join(", "))),
    }
}

/// The Ready condition from the runtime's health and the capacities missing from the node.
pub fn ready(health: &RuntimeHealth, missing_capacity: &[&str], now: Instant) -> Condition {
    let mut errs = health.runtime_errors(now);
    errs.extend(health.network_errors());
    if !missing_capacity.is_empty() {
        errs.push(format!(
            "missing node capacity for resources: {}",
            missing_capacity.join(", ")
        ));
    }
    match aggregate(&errs) {
        None => Condition {
            type_: "Ready",
            status: "True",
            reason: "KubeletReady",
            message: "kubelet is posting ready status".into(),
        },
        Some(message) => Condition {
            type_: "Ready",
            status: "False",
            reason: "KubeletNotReady",
            message,
        },
    }
}

/// MemoryPressure, DiskPressure and PIDPressure, in upstream's order.
pub fn pressure(state: PressureState) -> [Condition; 3] {
    let c = |type_, on: bool, yes: (&'static str, &str), no: (&'static str, &str)| {
        let (reason, message) = if on { yes } else { no };
        Condition {
            type_,
            status: if on { "True" } else { "False" },
            reason,
            message: message.to_string(),
        }
    };
    [
        c(
            "MemoryPressure",
            state.memory,
            (
                "KubeletHasInsufficientMemory",
                "kubelet has insufficient memory available",
            ),
            (
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
        ),
        c(
            "DiskPressure",
            state.disk,
            ("KubeletHasDiskPressure", "kubelet has disk pressure"),
            ("KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ),
        c(
            "PIDPressure",
            state.pid,
            (
                "KubeletHasInsufficientPID",
                "kubelet has insufficient PID available",
            ),
            (
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
        ),
    ]
}

/// The conditions to post: each desired one stamped with `now` as heartbeat, keeping the current
/// `lastTransitionTime` while its status is unchanged.
pub fn merge(
    current: &[NodeCondition],
    desired: &[Condition],
    now: Timestamp,
) -> Vec<NodeCondition> {
    desired
        .iter()
        .map(|d| {
            let transition = current
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == d.status)
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            NodeCondition {
                type_: d.type_.to_string(),
                status: d.status.to_string(),
                reason: Some(d.reason.to_string()),
                message: Some(d.message.clone()),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: Some(transition),
            }
        })
        .collect()
}

/// Whether posting `desired` would change anything in `current` beyond heartbeats.
pub fn changed(current: &[NodeCondition], desired: &[NodeCondition]) -> bool {
    desired.iter().any(|d| {
        !current.iter().any(|c| {
            c.type_ == d.type_
                && c.status == d.status
                && c.reason == d.reason
                && c.message == d.message
                && c.last_transition_time == d.last_transition_time
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &str, ok: bool, reason: &str, message: &str) -> RuntimeCondition {
        RuntimeCondition {
            r#type: t.into(),
            status: ok,
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn status(conds: Vec<RuntimeCondition>) -> RuntimeStatus {
        RuntimeStatus { conditions: conds }
    }

    #[test]
    fn ready_needs_a_first_status() {
        let h = RuntimeHealth::default();
        let r = ready(&h, &[], Instant::now());
        assert_eq!(r.status, "False");
        assert_eq!(r.reason, "KubeletNotReady");
        assert_eq!(
            r.message,
            "container runtime status check may not have completed yet"
        );
    }

    #[test]
    fn ready_when_runtime_and_network_are() {
        let mut h = RuntimeHealth::default();
        let now = Instant::now();
        h.observe(
            Some(&status(vec![
                cond(RUNTIME_READY, true, "", ""),
                cond(NETWORK_READY, true, "", ""),
            ])),
            now,
        );
        let r = ready(&h, &[], now);
        assert_eq!(
            (r.status, r.reason, r.message.as_str()),
            ("True", "KubeletReady", "kubelet is posting ready status")
        );
    }

    #[test]
    fn network_not_ready_message_is_upstreams() {
        let mut h = RuntimeHealth::default();
        let now = Instant::now();
        h.observe(
            Some(&status(vec![
                cond(RUNTIME_READY, true, "", ""),
                cond(
                    NETWORK_READY,
                    false,
                    "NetworkPluginNotReady",
                    "Network plugin returns error: cni plugin not initialized",
                ),
            ])),
            now,
        );
        let r = ready(&h, &[], now);
        assert_eq!(r.status, "False");
        assert_eq!(r.reason, "KubeletNotReady");
        assert_eq!(
            r.message,
            "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady \
             message:Network plugin returns error: cni plugin not initialized"
        );
    }

    #[test]
    fn runtime_down_and_several_errors_aggregate() {
        let mut h = RuntimeHealth::default();
        let t0 = Instant::now();
        h.observe(Some(&status(vec![cond(RUNTIME_READY, true, "", "")])), t0);
        let later = t0 + RUNTIME_SYNC_THRESHOLD + Duration::from_secs(1);
        let r = ready(&h, &["pods"], later);
        assert_eq!(
            r.message,
            "[container runtime is down, container runtime network not ready: <nil>, \
             missing node capacity for resources: pods]"
        );
        h.observe(
            Some(&status(vec![cond(RUNTIME_READY, false, "Broken", "oops")])),
            later,
        );
        assert!(
            h.runtime_errors(later).contains(
                &"container runtime not ready: RuntimeReady=false reason:Broken message:oops"
                    .to_string()
            )
        );
    }

    #[test]
    fn pressure_conditions() {
        let [m, d, p] = pressure(PressureState {
            memory: false,
            disk: true,
            pid: false,
        });
        assert_eq!(
            (m.type_, m.status, m.reason),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory")
        );
        assert_eq!(
            (d.type_, d.status, d.reason),
            ("DiskPressure", "True", "KubeletHasDiskPressure")
        );
        assert_eq!(
            (p.type_, p.status, p.reason),
            ("PIDPressure", "False", "KubeletHasSufficientPID")
        );
    }

    #[test]
    fn merge_keeps_transition_times_and_detects_changes() {
        let t0: Timestamp = "2024-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2024-01-01T00:01:00Z".parse().expect("time");
        let not_ready = Condition {
            type_: "Ready",
            status: "False",
            reason: "KubeletNotReady",
            message: "x".into(),
        };
        let first = merge(&[], std::slice::from_ref(&not_ready), t0);
        assert_eq!(first[0].last_transition_time, Some(Time(t0)));
        let again = merge(&first, std::slice::from_ref(&not_ready), t1);
        assert_eq!(again[0].last_transition_time, Some(Time(t0)));
        assert_eq!(again[0].last_heartbeat_time, Some(Time(t1)));
        assert!(!changed(&first, &again), "heartbeats alone are no change");
        let ready_now = Condition {
            status: "True",
            reason: "KubeletReady",
            message: "y".into(),
            ..not_ready
        };
        let flipped = merge(&again, &[ready_now], t1);
        assert_eq!(flipped[0].last_transition_time, Some(Time(t1)));
        assert!(changed(&again, &flipped));
    }
}
