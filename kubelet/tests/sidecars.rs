//! Sidecars (init containers with `restartPolicy: Always`, KEP-753) against the test bed.
//!
//! The test bed's kube-apiserver (1.20) drops the unknown `restartPolicy` of init containers,
//! so the pods here are static pods: the kubelet reads the manifest itself. What they do is
//! observed through the CRI (the containers' states, start and finish times) and through the
//! mirror pod's status on the API server. That server also refuses probes and lifecycle hooks
//! on init containers, so a pod whose sidecar has a startup probe has no mirror pod and is
//! observed through the CRI only. [`Bed`]'s drop removes whatever is left, also when a test
//! failed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use deckhand_kubelet::pods::static_pods;
use deckhand_proto::cri::{ContainerState, ContainerStatus};
use k8s_openapi::api::core::v1::{self as core, Pod};
use serde_json::json;

mod support;
use support::*;

fn name_of(s: &ContainerStatus) -> &str {
    s.metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or_default()
}

/// The newest instance of each container, by name.
fn newest(cs: &[ContainerStatus]) -> HashMap<String, ContainerStatus> {
    let mut out: HashMap<String, ContainerStatus> = HashMap::new();
    for c in cs {
        let attempt = |s: &ContainerStatus| s.metadata.as_ref().map_or(0, |m| m.attempt);
        let replace = out
            .get(name_of(c))
            .is_none_or(|o| (attempt(c), c.created_at) > (attempt(o), o.created_at));
        if replace {
            out.insert(name_of(c).to_string(), c.clone());
        }
    }
    out
}

fn running(c: &ContainerStatus) -> bool {
    c.state == ContainerState::ContainerRunning as i32
}

fn exited(c: &ContainerStatus) -> bool {
    c.state == ContainerState::ContainerExited as i32
}

/// A shell loop that exits (0) `after` seconds after SIGTERM.
fn until_term(after: u32) -> serde_json::Value {
    json!([
        "sh",
        "-c",
        format!("trap 'sleep {after}; exit 0' TERM; while true; do sleep 0.2; done")
    ])
}

/// Writes the static pod `name` with `spec` (hostNetwork) and gives its manifest path and UID.
fn write_static(bed: &Bed, name: &str, spec: serde_json::Value) -> Result<(PathBuf, String)> {
    let mut s = json!({ "hostNetwork": true, "terminationGracePeriodSeconds": 2 });
    if let (Some(base), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": bed.ns },
        "spec": s,
    });
    let file = bed.static_dir().join(format!("{name}.yaml"));
    let text = serde_yaml_ng::to_string(&manifest)?;
    std::fs::write(&file, &text)?;
    let pod = static_pods::parse_manifest(&file, &text, &bed.node)?;
    let uid = pod.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;
    Ok((file, uid))
}

/// Removes the manifest and waits for the runtime to have nothing left of the pod.
async fn remove_static(file: &PathBuf, uid: &str) -> Result<()> {
    std::fs::remove_file(file)?;
    eventually(LONG, "static pod gone from the runtime", || async {
        let n = sandboxes_of(uid).await?;
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} sandboxes"))
        })
    })
    .await
}

fn init_status<'a>(p: &'a Pod, name: &str) -> Option<&'a core::ContainerStatus> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == name)
}

#[tokio::test]
async fn a_sidecar_starts_before_the_main_container_and_is_stopped_once_it_completed() -> Result<()>
{
    let bed = Bed::start("sidecar-life", true).await?;
    // The main container runs for 3 s and succeeds; the sidecar would run on.
    let (file, uid) = write_static(
        &bed,
        "life",
        json!({
            "restartPolicy": "Never",
            "initContainers": [{ "name": "side", "image": busybox(), "restartPolicy": "Always",
                                 "command": until_term(0) }],
            "containers": [{ "name": "main", "image": busybox(), "command": ["sleep", "3"] }],
        }),
    )?;
    let mirror = format!("life-{}", bed.node);
    // While the main container runs, the mirror pod shows the sidecar running, started and
    // ready among the init containers, and the pod initialized.
    let p = bed
        .wait_pod(&mirror, LONG, "Running with the sidecar started", |p| {
            let side = init_status(p, "side");
            let main_running = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
            if phase(p) == "Running" && main_running && side.is_some_and(|s| s.ready) {
                Ok(p.clone())
            } else {
                Err(format!("{:?}", p.status))
            }
        })
        .await?;
    let side = init_status(&p, "side").ok_or_else(|| anyhow!("no sidecar status"))?;
    assert_eq!(side.started, Some(true));
    assert!(
        side.state.as_ref().is_some_and(|s| s.running.is_some()),
        "{side:?}"
    );
    assert_eq!(condition(&p, "Initialized").as_deref(), Some("True"));
    // The main container completes: the pod succeeds and the sidecar is stopped.
    let p = bed
        .wait_pod(&mirror, LONG, "Succeeded", |p| {
            if phase(p) == "Succeeded" {
                Ok(p.clone())
            } else {
                Err(format!("{:?}", p.status))
            }
        })
        .await?;
    let side = init_status(&p, "side").ok_or_else(|| anyhow!("no sidecar status"))?;
    assert!(
        side.state.as_ref().is_some_and(|s| s.terminated.is_some()),
        "the sidecar is reported stopped: {side:?}"
    );
    let cs = newest(&containers_of(&uid).await?);
    let (side, main) = (
        cs.get("side")
            .ok_or_else(|| anyhow!("no sidecar in {cs:?}"))?,
        cs.get("main")
            .ok_or_else(|| anyhow!("no main container in {cs:?}"))?,
    );
    ensure!(exited(side) && exited(main), "{cs:?}");
    assert_eq!(main.exit_code, 0);
    assert_eq!(
        side.metadata.as_ref().map(|m| m.attempt),
        Some(0),
        "the stopped sidecar was not restarted"
    );
    assert!(
        main.started_at >= side.started_at,
        "the sidecar started first: {side:?} {main:?}"
    );
    assert!(
        side.finished_at >= main.finished_at,
        "the sidecar outlived the main container: {side:?} {main:?}"
    );
    remove_static(&file, &uid).await?;
    bed.pass()
}

#[tokio::test]
async fn an_exited_sidecar_is_restarted_with_back_off() -> Result<()> {
    let bed = Bed::start("sidecar-restart", true).await?;
    // restartPolicy Never: the sidecar restarts all the same.
    let (file, uid) = write_static(
        &bed,
        "restart",
        json!({
            "restartPolicy": "Never",
            "initContainers": [{ "name": "side", "image": busybox(), "restartPolicy": "Always",
                                 "command": ["sh", "-c", "sleep 1; exit 3"] }],
            "containers": [{ "name": "main", "image": busybox(), "command": ["sleep", "3600"] }],
        }),
    )?;
    let mirror = format!("restart-{}", bed.node);
    let p = bed
        .wait_pod(&mirror, LONG, "the sidecar in CrashLoopBackOff", |p| {
            let side = init_status(p, "side");
            let reason = side
                .and_then(|s| s.state.as_ref())
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref());
            if reason == Some("CrashLoopBackOff") && side.is_some_and(|s| s.restart_count >= 1) {
                Ok(p.clone())
            } else {
                Err(format!("{:?}", p.status))
            }
        })
        .await?;
    assert_eq!(phase(&p), "Running");
    let side = init_status(&p, "side").ok_or_else(|| anyhow!("no sidecar status"))?;
    let last = side
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .ok_or_else(|| anyhow!("no last state: {side:?}"))?;
    assert_eq!(last.exit_code, 3);
    // Back-off over, it runs again: a new instance with a higher attempt; the main container
    // was never restarted.
    eventually(LONG, "the sidecar restarted again", || async {
        let cs = newest(&containers_of(&uid).await?);
        let attempt = cs
            .get("side")
            .and_then(|s| s.metadata.as_ref())
            .map_or(0, |m| m.attempt);
        Ok(if attempt >= 2 {
            Ok(cs)
        } else {
            Err(format!("{cs:?}"))
        })
    })
    .await
    .and_then(|cs| {
        let main = cs.get("main").ok_or_else(|| anyhow!("no main container"))?;
        ensure!(running(main), "{main:?}");
        assert_eq!(main.metadata.as_ref().map(|m| m.attempt), Some(0));
        Ok(())
    })?;
    remove_static(&file, &uid).await?;
    bed.pass()
}

#[tokio::test]
async fn on_deletion_the_main_container_stops_before_the_sidecars_in_reverse_order() -> Result<()> {
    let bed = Bed::start("sidecar-stop", true).await?;
    // Each takes a while after SIGTERM: stopped all at once, the sidecars would finish first.
    let side = |name: &str| {
        json!({ "name": name, "image": busybox(), "restartPolicy": "Always",
                "command": until_term(1) })
    };
    let (file, uid) = write_static(
        &bed,
        "stop",
        json!({
            "terminationGracePeriodSeconds": 20,
            "initContainers": [side("first"), side("second")],
            "containers": [{ "name": "main", "image": busybox(), "command": until_term(2) }],
        }),
    )?;
    eventually(LONG, "all three running", || async {
        let cs = newest(&containers_of(&uid).await?);
        Ok(
            if ["first", "second", "main"]
                .iter()
                .all(|n| cs.get(*n).is_some_and(running))
            {
                Ok(())
            } else {
                Err(format!("{cs:?}"))
            },
        )
    })
    .await?;
    std::fs::remove_file(&file)?;
    // Watch the runtime until the sandbox is gone: the last status seen of each container,
    // and whether `first` was still seen running once `second` had exited.
    let mut last: HashMap<String, ContainerStatus> = HashMap::new();
    let mut first_outlived_second = false;
    let deadline = std::time::Instant::now() + LONG;
    while sandboxes_of(&uid).await? > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        ensure!(
            std::time::Instant::now() < deadline,
            "the pod was not removed"
        );
        // A container removed between the listing and its status: look again.
        let Ok(cs) = containers_of(&uid).await.map(|cs| newest(&cs)) else {
            continue;
        };
        if cs.get("second").is_some_and(exited) {
            let main_gone = cs.get("main").is_none_or(exited);
            ensure!(main_gone, "second stopped while main ran: {cs:?}");
            if cs.get("first").is_some_and(running) {
                first_outlived_second = true;
            }
        }
        if cs.get("first").is_some_and(exited) {
            ensure!(
                cs.get("second").is_none_or(exited),
                "first stopped before second: {cs:?}"
            );
        }
        last.extend(cs);
    }
    let get = |n: &str| last.get(n).ok_or_else(|| anyhow!("never saw {n}"));
    let (main, second, first) = (get("main")?, get("second")?, get("first")?);
    ensure!(
        exited(main) && exited(second),
        "main and second seen exited: {last:?}"
    );
    assert_eq!((main.exit_code, second.exit_code), (0, 0), "{last:?}");
    assert!(
        main.finished_at < second.finished_at,
        "main finished before the sidecar: {main:?} {second:?}"
    );
    if exited(first) {
        assert!(second.finished_at < first.finished_at, "{last:?}");
    } else {
        assert!(first_outlived_second, "first ran on after second: {last:?}");
    }
    // Graceful: nothing needed the grace period's end (20 s).
    assert!(
        second.finished_at - main.finished_at < 10_000_000_000,
        "{main:?} {second:?}"
    );
    bed.pass()
}

#[tokio::test]
async fn the_next_init_container_waits_for_the_sidecars_startup_probe_and_runs_beside_it()
-> Result<()> {
    let bed = Bed::start("sidecar-probe", true).await?;
    // The sidecar makes the file its startup probe looks for after 2 s; a regular init
    // container then runs (1 s) while it runs, then the main container.
    let (file, uid) = write_static(
        &bed,
        "probe",
        json!({
            "restartPolicy": "Never",
            "initContainers": [
                { "name": "side", "image": busybox(), "restartPolicy": "Always",
                  "command": ["sh", "-c",
                      "trap 'exit 0' TERM; sleep 2; touch /tmp/started; while true; do sleep 0.2; done"],
                  "startupProbe": { "exec": { "command": ["test", "-f", "/tmp/started"] },
                                    "periodSeconds": 1, "failureThreshold": 30 } },
                { "name": "init", "image": busybox(), "command": ["sleep", "1"] },
            ],
            "containers": [{ "name": "main", "image": busybox(), "command": ["sleep", "3600"] }],
        }),
    )?;
    let cs = eventually(LONG, "the main container running", || async {
        let cs = newest(&containers_of(&uid).await?);
        Ok(if cs.get("main").is_some_and(running) {
            Ok(cs)
        } else {
            Err(format!("{cs:?}"))
        })
    })
    .await?;
    let get = |n: &str| cs.get(n).ok_or_else(|| anyhow!("no {n} in {cs:?}"));
    let (side, init, main) = (get("side")?, get("init")?, get("main")?);
    assert!(
        init.started_at >= side.started_at + 2_000_000_000,
        "init waited for the sidecar's startup probe: {side:?} {init:?}"
    );
    assert!(exited(init) && init.exit_code == 0, "{init:?}");
    assert!(
        main.started_at >= init.finished_at,
        "main waited for init: {init:?} {main:?}"
    );
    assert!(
        running(side) && side.metadata.as_ref().is_some_and(|m| m.attempt == 0),
        "the sidecar ran on through init and main: {side:?}"
    );
    remove_static(&file, &uid).await?;
    bed.pass()
}
