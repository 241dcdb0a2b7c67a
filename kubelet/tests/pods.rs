//! deckhand-kubelet's pods against the test bed: the built binary runs as a child with node
//! credentials (as in node.rs), pods are created through an admin client with `spec.nodeName`
//! set to the test's node, and everything is observed through the API server and the CRI.
//!
//! The test bed's containerd has no CNI config, so every pod here uses `hostNetwork: true`;
//! [`cri_endpoint`] is the one line to change to run these against deckhand-cri. Each test has
//! its own node name and namespace; [`Bed`]'s drop stops the kubelet, removes whatever the
//! runtime still has of the node's pods, force-deletes the pods and deletes the namespace, Node
//! and Lease, also when the test failed.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use deckhand_kubelet::pods::static_pods;
use deckhand_proto::cri::{
    ContainerState, ListPodSandboxRequest, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
};
use deckhand_tests::testbed::Testbed;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use serde_json::json;

mod support;
use support::*;

async fn ready_sandboxes_of(uid: &str) -> Result<usize> {
    let mut cri = runtime().await?;
    Ok(cri
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: HashMap::from([(
                    "io.kubernetes.pod.uid".to_string(),
                    uid.to_string(),
                )]),
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items
        .len())
}

fn name_of(s: &deckhand_proto::cri::ContainerStatus) -> &str {
    s.metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or_default()
}

fn sleeper() -> serde_json::Value {
    json!({ "name": "main", "image": busybox(), "command": ["sleep", "3600"],
            "env": [{"name": "A", "value": "x"}, {"name": "B", "value": "$(A)y"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}] })
}

#[tokio::test]
async fn a_pod_runs_reports_status_and_is_removed_on_deletion() -> Result<()> {
    let bed = Bed::start("pod-run", false).await?;
    let created = bed
        .create_pod("web", json!({ "containers": [sleeper()] }))
        .await?;
    let uid = created
        .metadata
        .uid
        .clone()
        .ok_or_else(|| anyhow!("no uid"))?;
    let pod = bed
        .wait_pod("web", LONG, "pod Running and Ready", |p| {
            if phase(p) == "Running" && condition(p, "Ready").as_deref() == Some("True") {
                Ok(p.clone())
            } else {
                Err(format!("status {:?}", p.status))
            }
        })
        .await?;
    let st = pod.status.as_ref().ok_or_else(|| anyhow!("no status"))?;
    assert_eq!(st.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        st.pod_ip.as_deref(),
        Some("127.0.0.1"),
        "hostNetwork pods have the host IP"
    );
    assert_eq!(st.qos_class.as_deref(), Some("BestEffort"));
    assert!(st.start_time.is_some());
    for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert_eq!(condition(&pod, t).as_deref(), Some("True"), "{t}");
    }
    let cs = &st
        .container_statuses
        .as_ref()
        .ok_or_else(|| anyhow!("no statuses"))?[0];
    assert!(
        cs.ready && cs.started == Some(true) && cs.restart_count == 0,
        "{cs:?}"
    );
    assert!(cs.image_id.contains("sha256:"), "{cs:?}");
    assert_eq!(cs.image, busybox());
    let id = cs
        .container_id
        .as_deref()
        .and_then(|i| i.strip_prefix("containerd://"))
        .ok_or_else(|| anyhow!("container id {:?}", cs.container_id))?;
    let running = containers_of(&uid).await?;
    ensure!(running.len() == 1, "runtime has {running:?}");
    assert_eq!(running[0].id, id);
    assert_eq!(running[0].state, ContainerState::ContainerRunning as i32);
    assert_eq!(running[0].labels["io.kubernetes.container.name"], "main");
    assert_eq!(running[0].labels["io.kubernetes.pod.name"], "web");
    assert_eq!(running[0].labels["io.kubernetes.pod.namespace"], bed.ns);
    assert_eq!(
        running[0].annotations["io.kubernetes.container.restartCount"],
        "0"
    );
    assert!(
        running[0].log_path.ends_with("main/0.log"),
        "{}",
        running[0].log_path
    );

    bed.pods().delete("web", &DeleteParams::default()).await?;
    eventually(LONG, "pod object gone", || async {
        Ok(match bed.pods().get_opt("web").await? {
            None => Ok(()),
            Some(p) => Err(format!("still there: {:?}", p.metadata.deletion_timestamp)),
        })
    })
    .await?;
    assert_eq!(
        sandboxes_of(&uid).await?,
        0,
        "sandbox removed before the pod object"
    );
    assert!(containers_of(&uid).await?.is_empty());
    bed.pass()
}

#[tokio::test]
async fn a_failing_container_goes_into_crash_loop_back_off() -> Result<()> {
    let bed = Bed::start("pod-crash", false).await?;
    bed.create_pod(
        "crash",
        json!({ "containers": [{ "name": "c", "image": busybox(), "command": ["sh", "-c", "exit 3"] }] }),
    )
    .await?;
    let cs = bed
        .wait_pod("crash", LONG, "CrashLoopBackOff with restarts", |p| {
            let cs = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first().cloned());
            match cs {
                Some(c)
                    if c.restart_count >= 2
                        && c.state
                            .as_ref()
                            .and_then(|s| s.waiting.as_ref())
                            .and_then(|w| w.reason.as_deref())
                            == Some("CrashLoopBackOff") =>
                {
                    Ok(c)
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .ok_or_else(|| anyhow!("no lastState: {cs:?}"))?;
    assert_eq!(last.exit_code, 3);
    assert_eq!(last.reason.as_deref(), Some("Error"));
    let pod = bed.pods().get("crash").await?;
    assert_eq!(phase(&pod), "Running");
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));
    bed.pass()
}

#[tokio::test]
async fn restart_policy_never_with_exit_zero_succeeds() -> Result<()> {
    let bed = Bed::start("pod-done", false).await?;
    bed.create_pod(
        "done",
        json!({ "restartPolicy": "Never",
                "containers": [{ "name": "c", "image": busybox(), "command": ["true"] }] }),
    )
    .await?;
    let pod = bed
        .wait_pod("done", LONG, "Succeeded", |p| {
            if phase(p) == "Succeeded" {
                Ok(p.clone())
            } else {
                Err(format!("{:?}", p.status))
            }
        })
        .await?;
    let st = pod.status.as_ref().ok_or_else(|| anyhow!("no status"))?;
    let cs = &st
        .container_statuses
        .as_ref()
        .ok_or_else(|| anyhow!("none"))?[0];
    let t = cs
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .ok_or_else(|| anyhow!("not terminated: {cs:?}"))?;
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    assert_eq!(cs.restart_count, 0);
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));
    // A finished pod's sandbox is stopped; its container is kept for status.
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    eventually(LONG, "sandbox stopped", || async {
        let n = ready_sandboxes_of(&uid).await?;
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} ready"))
        })
    })
    .await?;
    assert_eq!(sandboxes_of(&uid).await?, 1);
    assert_eq!(containers_of(&uid).await?.len(), 1);
    bed.pass()
}

/// Termination messages as upstream: what the container wrote to its terminationMessagePath,
/// or with FallbackToLogsOnError the end of the log of a failed container.
#[tokio::test]
async fn termination_messages_from_the_file_or_the_log() -> Result<()> {
    let bed = Bed::start("pod-msg", false).await?;
    bed.create_pod(
        "msg",
        json!({ "restartPolicy": "Never",
                "containers": [
                    { "name": "file", "image": busybox(),
                      "command": ["sh", "-c", "echo -n all done > /dev/termination-log"] },
                    { "name": "custom", "image": busybox(), "terminationMessagePath": "/tmp/why",
                      "command": ["sh", "-c", "echo -n custom path > /tmp/why; exit 2"] },
                    { "name": "logs", "image": busybox(),
                      "terminationMessagePolicy": "FallbackToLogsOnError",
                      "command": ["sh", "-c", "echo first >&2; echo it broke >&2; exit 3"] },
                ] }),
    )
    .await?;
    let pod = bed
        .wait_pod("msg", LONG, "Failed", |p| {
            if phase(p) == "Failed" {
                Ok(p.clone())
            } else {
                Err(format!("{:?}", p.status))
            }
        })
        .await?;
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .ok_or_else(|| anyhow!("no statuses"))?;
    let message = |name: &str| {
        statuses
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.message.clone())
    };
    assert_eq!(message("file").as_deref(), Some("all done"));
    assert_eq!(message("custom").as_deref(), Some("custom path"));
    assert_eq!(message("logs").as_deref(), Some("first\nit broke\n"));
    bed.pass()
}

#[tokio::test]
async fn init_containers_run_in_order_before_the_main_container() -> Result<()> {
    let bed = Bed::start("pod-init", false).await?;
    let pod = bed
        .create_pod(
            "init",
            json!({
                "initContainers": [
                    { "name": "one", "image": busybox(), "command": ["sleep", "1"] },
                    { "name": "two", "image": busybox(), "command": ["sleep", "1"] },
                ],
                "containers": [sleeper()],
            }),
        )
        .await?;
    let uid = pod.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;
    bed.wait_pod("init", LONG, "Running", |p| {
        if phase(p) == "Running" && condition(p, "Initialized").as_deref() == Some("True") {
            Ok(())
        } else {
            Err(format!("{:?}", p.status))
        }
    })
    .await?;
    let cs = containers_of(&uid).await?;
    let get = |n: &str| {
        cs.iter()
            .find(|c| name_of(c) == n)
            .ok_or_else(|| anyhow!("no container {n} in {cs:?}"))
    };
    let (one, two, main) = (get("one")?, get("two")?, get("main")?);
    assert_eq!(one.state, ContainerState::ContainerExited as i32);
    assert_eq!(one.exit_code, 0);
    assert!(
        one.finished_at <= two.started_at,
        "two started before one finished"
    );
    assert!(
        two.finished_at <= main.started_at,
        "main started before two finished"
    );
    let p = bed.pods().get("init").await?;
    let init = p
        .status
        .and_then(|s| s.init_container_statuses)
        .ok_or_else(|| anyhow!("no init statuses"))?;
    let reasons: Vec<_> = init
        .iter()
        .map(|s| {
            s.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.reason.clone())
        })
        .collect();
    assert_eq!(
        reasons,
        [Some("Completed".to_string()), Some("Completed".to_string())]
    );
    bed.pass()
}

#[tokio::test]
async fn a_static_pod_runs_has_a_mirror_pod_and_stops_when_its_file_goes() -> Result<()> {
    let bed = Bed::start("pod-static", true).await?;
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "static", "namespace": bed.ns },
        "spec": { "hostNetwork": true, "terminationGracePeriodSeconds": 2,
                  "containers": [{ "name": "main", "image": busybox(), "command": ["sleep", "3600"] }] },
    });
    let file = bed.static_dir().join("static.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&manifest)?)?;
    let name = format!("static-{}", bed.node);
    let mirror = bed
        .wait_pod(&name, LONG, "mirror pod Running", |p| {
            if phase(p) == "Running" {
                Ok(p.clone())
            } else {
                Err(format!("{:?}", p.status))
            }
        })
        .await?;
    let ann = mirror.metadata.annotations.clone().unwrap_or_default();
    let hash = ann
        .get("kubernetes.io/config.hash")
        .cloned()
        .ok_or_else(|| anyhow!("no config.hash: {ann:?}"))?;
    assert_eq!(ann.get("kubernetes.io/config.mirror"), Some(&hash));
    assert_eq!(
        ann.get("kubernetes.io/config.source").map(String::as_str),
        Some("file")
    );
    let owner = mirror.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owner.iter().any(|o| o.kind == "Node" && o.name == bed.node),
        "{owner:?}"
    );
    // The static pod's UID in the runtime is its hash.
    eventually(LONG, "static pod container running", || async {
        let cs = containers_of(&hash).await?;
        Ok(
            if cs
                .iter()
                .any(|c| c.state == ContainerState::ContainerRunning as i32)
            {
                Ok(())
            } else {
                Err(format!("{cs:?}"))
            },
        )
    })
    .await?;

    // A deleted mirror pod is made again.
    let old_uid = mirror.metadata.uid.clone();
    bed.pods().delete(&name, &DeleteParams::default()).await?;
    bed.wait_pod(&name, LONG, "mirror pod recreated", |p| {
        if p.metadata.uid != old_uid && p.metadata.deletion_timestamp.is_none() {
            Ok(())
        } else {
            Err("old mirror still there".to_string())
        }
    })
    .await?;
    let cs = containers_of(&hash).await?;
    assert_eq!(cs.len(), 1, "the static pod kept running: {cs:?}");

    std::fs::remove_file(&file)?;
    eventually(LONG, "static pod gone from the runtime", || async {
        let n = sandboxes_of(&hash).await?;
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} sandboxes"))
        })
    })
    .await?;
    mirror_gone(&bed, &name).await?;
    bed.pass()
}

#[tokio::test]
async fn a_kubelet_restart_leaves_running_containers_alone() -> Result<()> {
    let mut bed = Bed::start("pod-restart", false).await?;
    let pod = bed
        .create_pod("keep", json!({ "containers": [sleeper()] }))
        .await?;
    let uid = pod.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;
    let before = bed
        .wait_pod("keep", LONG, "Running", |p| {
            let id = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .filter(|c| c.ready)
                .and_then(|c| c.container_id.clone());
            id.ok_or_else(|| format!("{:?}", p.status))
        })
        .await?;
    bed.stop().await?;
    bed.spawn()?;
    // The new kubelet has seen the pod once its API source synced; give it a few relists.
    eventually(LONG, "kubelet synced its pods", || async {
        Ok(if bed.log().matches("pod source synced").count() >= 2 {
            Ok(())
        } else {
            Err("not yet".to_string())
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cs = containers_of(&uid).await?;
    ensure!(cs.len() == 1, "containers after restart: {cs:?}");
    assert_eq!(
        Some(format!("containerd://{}", cs[0].id)),
        Some(before.clone())
    );
    assert_eq!(cs[0].state, ContainerState::ContainerRunning as i32);
    assert_eq!(sandboxes_of(&uid).await?, 1);
    let p = bed.pods().get("keep").await?;
    let c = &p
        .status
        .and_then(|s| s.container_statuses)
        .ok_or_else(|| anyhow!("no statuses"))?[0];
    assert_eq!((c.restart_count, c.container_id.clone()), (0, Some(before)));
    bed.pass()
}

#[tokio::test]
async fn an_unsupported_pod_is_rejected_with_a_reason() -> Result<()> {
    let bed = Bed::start("pod-reject", false).await?;
    bed.create_pod(
        "probe",
        json!({ "volumes": [{ "name": "dh-nfs", "nfs": { "server": "127.0.0.1", "path": "/" } }],
                "containers": [{ "name": "c", "image": busybox(), "command": ["sleep", "60"] }] }),
    )
    .await?;
    let (reason, message) = bed
        .wait_pod("probe", LONG, "rejected", |p| {
            let s = p.status.clone().unwrap_or_default();
            if s.phase.as_deref() == Some("Failed") {
                Ok((s.reason, s.message))
            } else {
                Err(format!("{s:?}"))
            }
        })
        .await?;
    assert_eq!(reason.as_deref(), Some("UnsupportedPodSpec"));
    assert!(message.unwrap_or_default().contains("volume \"dh-nfs\""));
    let uid = bed
        .pods()
        .get("probe")
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    assert_eq!(sandboxes_of(&uid).await?, 0, "nothing was started");
    bed.pass()
}

#[tokio::test]
async fn a_missing_image_is_reported_as_err_image_pull_then_back_off() -> Result<()> {
    let bed = Bed::start("pod-pull", false).await?;
    let image = format!("{}/dh/does-not-exist:1", Testbed::get().registry());
    bed.create_pod(
        "pull",
        json!({ "containers": [{ "name": "c", "image": image, "command": ["true"] }] }),
    )
    .await?;
    let reason = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone())
    };
    for want in ["ErrImagePull", "ImagePullBackOff"] {
        bed.wait_pod("pull", LONG, want, |p| {
            if reason(p).as_deref() == Some(want) {
                Ok(())
            } else {
                Err(format!("{:?}", reason(p)))
            }
        })
        .await?;
    }
    let pod = bed.pods().get("pull").await?;
    assert_eq!(phase(&pod), "Pending");
    bed.pass()
}

#[tokio::test]
async fn standalone_mode_runs_static_pods() -> Result<()> {
    let bed = Bed::start_with("pod-standalone", true, false).await?;
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "alone", "namespace": bed.ns },
        "spec": { "hostNetwork": true, "terminationGracePeriodSeconds": 2,
                  "containers": [{ "name": "main", "image": busybox(), "command": ["sleep", "3600"] }] },
    });
    let file = bed.static_dir().join("alone.json");
    std::fs::write(&file, serde_json::to_vec(&manifest)?)?;
    let pod = static_pods::parse_manifest(&file, &std::fs::read_to_string(&file)?, &bed.node)?;
    let uid = pod.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;
    eventually(LONG, "static pod running without an API server", || async {
        let cs = containers_of(&uid).await?;
        Ok(match cs.first() {
            Some(c) if c.state == ContainerState::ContainerRunning as i32 => {
                Ok(c.labels["io.kubernetes.pod.name"].clone())
            }
            _ => Err(format!("{cs:?}")),
        })
    })
    .await
    .map(|name| assert_eq!(name, format!("alone-{}", bed.node)))?;
    std::fs::remove_file(&file)?;
    eventually(LONG, "static pod removed", || async {
        let n = sandboxes_of(&uid).await?;
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} sandboxes"))
        })
    })
    .await?;
    bed.pass()
}

#[tokio::test]
async fn a_changed_image_restarts_the_container() -> Result<()> {
    let bed = Bed::start("pod-image", false).await?;
    let pod = bed
        .create_pod("img", json!({ "containers": [sleeper()] }))
        .await?;
    let uid = pod.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;
    let first = bed
        .wait_pod("img", LONG, "Running", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .filter(|c| c.ready)
                .and_then(|c| c.container_id.clone())
                .ok_or_else(|| format!("{:?}", p.status))
        })
        .await?;
    let image = format!(
        "{}/{}",
        Testbed::get().registry(),
        deckhand_tests::images::BUSYBOX_DOCKER
    );
    let patch = json!({ "spec": { "containers": [{ "name": "main", "image": image }] } });
    bed.pods()
        .patch(
            "img",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(&patch),
        )
        .await?;
    let cs = bed
        .wait_pod("img", LONG, "restarted with the new image", |p| {
            let c = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first().cloned());
            match c {
                Some(c)
                    if c.ready && c.image == image && c.container_id.as_ref() != Some(&first) =>
                {
                    Ok(c)
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
    assert_eq!(cs.restart_count, 1);
    let running: Vec<_> = containers_of(&uid)
        .await?
        .into_iter()
        .filter(|c| c.state == ContainerState::ContainerRunning as i32)
        .collect();
    assert_eq!(running.len(), 1, "{running:?}");
    bed.pass()
}

/// Runs `cmd` in the pod's running container through the runtime, for its exit code.
async fn exec_in(p: &Pod, cmd: &[&str]) -> Result<i32> {
    let id = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.split_once("://"))
        .map(|(_, id)| id.to_string())
        .ok_or_else(|| anyhow!("no container id in {:?}", p.status))?;
    let mut cri = runtime().await?;
    let r = cri
        .exec_sync(deckhand_proto::cri::ExecSyncRequest {
            container_id: id,
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await?
        .into_inner();
    Ok(r.exit_code)
}

/// Waits until the mirror pod `name` is gone from the API server.
async fn mirror_gone(bed: &Bed, name: &str) -> Result<()> {
    eventually(LONG, "mirror pod gone", || async {
        Ok(match bed.pods().get_opt(name).await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await
}

/// A static pod's readiness gates are set on its mirror pod, the only object controllers see.
#[tokio::test]
async fn a_static_pods_readiness_gates_are_read_from_its_mirror_pod() -> Result<()> {
    const GATE: &str = "dh.example/gate";
    let bed = Bed::start("pod-static-gate", true).await?;
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "gated", "namespace": bed.ns },
        "spec": { "hostNetwork": true, "terminationGracePeriodSeconds": 2,
                  "readinessGates": [{"conditionType": GATE}],
                  "containers": [{ "name": "main", "image": busybox(), "command": ["sleep", "3600"] }] },
    });
    let file = bed.static_dir().join("gated.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&manifest)?)?;
    let name = format!("gated-{}", bed.node);
    bed.wait_pod(
        &name,
        LONG,
        "mirror ContainersReady but not Ready",
        |p| match (condition_of(p, "ContainersReady"), condition_of(p, "Ready")) {
            (Some(c), Some(r)) if c.0 == "True" && r.0 == "False" => {
                if r.1.as_deref() == Some("ReadinessGatesNotReady") {
                    Ok(())
                } else {
                    Err(format!("Ready's reason {:?}", r.1))
                }
            }
            _ => Err(format!("{:?}", p.status)),
        },
    )
    .await?;
    let patch = json!({ "status": { "conditions": [{ "type": GATE, "status": "True",
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string() }] } });
    bed.pods()
        .patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(&patch),
        )
        .await?;
    bed.wait_pod(&name, LONG, "mirror Ready once the gate is True", |p| {
        let gate = condition_of(p, GATE).map(|c| c.0);
        match condition_of(p, "Ready") {
            Some((s, None, None)) if s == "True" && gate.as_deref() == Some("True") => Ok(()),
            _ => Err(format!("{:?}", p.status)),
        }
    })
    .await?;
    std::fs::remove_file(&file)?;
    mirror_gone(&bed, &name).await?;
    bed.pass()
}

#[tokio::test]
async fn readiness_gates_hold_ready_until_their_condition_is_true() -> Result<()> {
    const GATE: &str = "dh.example/gate";
    let bed = Bed::start("pod-gate", false).await?;
    bed.create_pod(
        "gated",
        json!({
            "readinessGates": [{"conditionType": GATE}],
            "containers": [{"name": "main", "image": busybox(),
                "command": ["sh", "-c", "touch /tmp/ready; exec sleep 3600"],
                "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]},
                    "periodSeconds": 1, "failureThreshold": 1}}],
        }),
    )
    .await?;
    // Running, its containers ready, but not Ready: the gate's condition does not exist.
    let pod = bed
        .wait_pod("gated", LONG, "ContainersReady but not Ready", |p| {
            let cr = condition_of(p, "ContainersReady");
            match (phase(p), cr, condition_of(p, "Ready")) {
                ("Running", Some((c, ..)), Some(r)) if c == "True" && r.0 == "False" => {
                    Ok((p.clone(), r))
                }
                _ => Err(format!("{:?}", p.status)),
            }
        })
        .await?;
    let (pod, ready) = pod;
    assert_eq!(ready.1.as_deref(), Some("ReadinessGatesNotReady"));
    assert_eq!(
        ready.2.as_deref(),
        Some("corresponding condition of pod readiness gate \"dh.example/gate\" does not exist.")
    );
    // A controller sets the gate's condition on the status subresource.
    let set_gate = |status: &str| {
        json!({ "status": { "conditions": [{ "type": GATE, "status": status,
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string() }] } })
    };
    let pp = kube::api::PatchParams::default();
    bed.pods()
        .patch_status(
            "gated",
            &pp,
            &kube::api::Patch::Strategic(&set_gate("False")),
        )
        .await?;
    bed.wait_pod("gated", LONG, "Ready False naming the gate's status", |p| {
        match condition_of(p, "Ready") {
            Some((s, r, m))
                if s == "False"
                    && r.as_deref() == Some("ReadinessGatesNotReady")
                    && m.as_deref()
                        == Some(
                            "the status of pod readiness gate \"dh.example/gate\" is not \"True\", but False",
                        ) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    bed.pods()
        .patch_status(
            "gated",
            &pp,
            &kube::api::Patch::Strategic(&set_gate("True")),
        )
        .await?;
    let gate_true = |p: &Pod| condition_of(p, GATE).is_some_and(|c| c.0 == "True");
    bed.wait_pod(
        "gated",
        LONG,
        "Ready once the gate is True",
        |p| match condition_of(p, "Ready") {
            Some((s, None, None)) if s == "True" && gate_true(p) => Ok(()),
            _ => Err(format!("{:?}", p.status)),
        },
    )
    .await?;
    // The kubelet's later patches (its container unready, then ready again) keep the
    // gate's condition.
    ensure!(
        exec_in(&pod, &["rm", "/tmp/ready"]).await? == 0,
        "rm failed"
    );
    bed.wait_pod("gated", LONG, "unready container, gate kept", |p| {
        let cr = condition_of(p, "ContainersReady").map(|c| c.0);
        match condition_of(p, "Ready") {
            Some((s, r, _))
                if s == "False"
                    && r.as_deref() == Some("ContainersNotReady")
                    && cr.as_deref() == Some("False")
                    && gate_true(p) =>
            {
                Ok(())
            }
            _ => Err(format!("{:?}", p.status)),
        }
    })
    .await?;
    ensure!(
        exec_in(&pod, &["touch", "/tmp/ready"]).await? == 0,
        "touch failed"
    );
    bed.wait_pod(
        "gated",
        LONG,
        "Ready again, gate kept",
        |p| match condition_of(p, "Ready") {
            Some((s, ..)) if s == "True" && gate_true(p) => Ok(()),
            _ => Err(format!("{:?}", p.status)),
        },
    )
    .await?;
    bed.pass()
}
