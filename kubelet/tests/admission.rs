//! Pod admission against the test bed, as upstream's kubelet `canAdmitPod`: a pod that does
//! not fit the node's allocatable (`maxPods`, cpu), whose hostPort is taken or whose
//! nodeSelector does not match the Node is never started and is reported Failed with
//! upstream's reason and message and a Warning Event; a kubelet restart keeps the running pods
//! admitted. The helpers are those of `pods.rs` (the built kubelet as a child with node
//! credentials, an admin client, cleanup on drop also when a test failed).

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use deckhand_proto::cri::ContainerState;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

mod support;
use support::*;

fn uid(p: &Pod) -> Result<String> {
    p.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))
}

fn sleeper() -> serde_json::Value {
    json!({ "name": "main", "image": busybox(), "command": ["sleep", "3600"] })
}

/// A pod's status (phase, reason, message).
fn verdict(p: &Pod) -> (String, String, String) {
    let s = p.status.clone().unwrap_or_default();
    (
        s.phase.unwrap_or_default(),
        s.reason.unwrap_or_default(),
        s.message.unwrap_or_default(),
    )
}

impl Bed {
    /// Waits for the pod to be Running with its container ready; gives its container ID.
    async fn wait_running(&self, name: &str) -> Result<String> {
        self.wait_pod(name, LONG, &format!("{name} Running"), |p| {
            let id = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .filter(|c| c.ready && phase(p) == "Running")
                .and_then(|c| c.container_id.clone());
            id.ok_or_else(|| format!("{:?}", p.status))
        })
        .await
    }

    /// Waits for the pod to be refused with `reason`; gives its status message.
    async fn wait_refused(&self, name: &str, reason: &str) -> Result<String> {
        self.wait_pod(
            name,
            LONG,
            &format!("{name} refused with {reason}"),
            |p| match verdict(p) {
                (ph, r, m) if ph == "Failed" && r == reason => Ok(m),
                v => Err(format!("{v:?}")),
            },
        )
        .await
    }

    /// Waits for a Warning Event about pod `uid` with `reason` and exactly `message`.
    async fn wait_event(&self, uid: &str, reason: &str, message: &str) -> Result<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        eventually(LONG, &format!("a {reason} event"), || async {
            let list = events.list(&ListParams::default()).await?;
            let mut seen = Vec::new();
            for e in list {
                if e.involved_object.uid.as_deref() != Some(uid) {
                    continue;
                }
                let (t, r, m) = (
                    e.type_.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default(),
                );
                if t == "Warning" && r == reason && m == message {
                    return Ok(Ok(e));
                }
                seen.push(format!("{t} {r}: {m}"));
            }
            Ok(Err(format!("events: {seen:?}")))
        })
        .await
    }

    /// The registered Node (waits for it).
    async fn node(&self) -> Result<Node> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        eventually(LONG, "the Node registered with allocatable", || async {
            Ok(match nodes.get_opt(&self.node).await? {
                Some(n)
                    if n.status
                        .as_ref()
                        .and_then(|s| s.allocatable.as_ref())
                        .is_some_and(|a| a.contains_key("cpu")) =>
                {
                    Ok(n)
                }
                other => Err(format!("{:?}", other.map(|n| n.status))),
            })
        })
        .await
    }

    /// Asserts that the runtime has nothing of pod `uid`.
    async fn assert_not_started(&self, uid: &str) -> Result<()> {
        ensure!(
            sandboxes_of(uid).await? == 0,
            "a sandbox of refused pod {uid}"
        );
        ensure!(
            containers_of(uid).await?.is_empty(),
            "containers of refused pod {uid}"
        );
        Ok(())
    }

    /// Deletes a pod and waits until it is gone from the API server (the kubelet deletes it
    /// once the runtime shows nothing of it).
    async fn delete_and_wait(&self, name: &str) -> Result<()> {
        self.pods().delete(name, &DeleteParams::default()).await?;
        let pods = self.pods();
        eventually(LONG, &format!("{name} deleted"), || async {
            Ok(match pods.get_opt(name).await? {
                None => Ok(()),
                Some(p) => Err(format!("still there: {:?}", p.status.map(|s| s.phase))),
            })
        })
        .await
    }
}

/// The Node's allocatable cpu in millicores.
fn allocatable_millicores(node: &Node) -> Result<i128> {
    let q = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("cpu"))
        .ok_or_else(|| anyhow!("no allocatable cpu"))?;
    Ok(deckhand_kubelet::quantity::parse_quantity(q)?.millis())
}

#[tokio::test]
async fn pods_beyond_allocatable_are_refused_and_a_restart_keeps_running_pods() -> Result<()> {
    // Two pods at most; 500m of cpu reserved so that allocatable is below capacity.
    let mut bed = Bed::start_config(
        "adm-fit",
        false,
        true,
        "maxPods: 2\nsystemReserved:\n  cpu: 300m\nkubeReserved:\n  cpu: 200m\n",
    )
    .await?;
    let node = bed.node().await?;
    let cpu = allocatable_millicores(&node)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i128;
    assert_eq!(cpu, cpus * 1000 - 500, "allocatable = capacity - reserved");

    // More cpu than the node has: refused, nothing in the runtime.
    let big = bed
        .create_pod(
            "big",
            json!({ "containers": [{ "name": "main", "image": busybox(),
                "command": ["sleep", "3600"], "resources": {"requests": {"cpu": "1000"}} }] }),
        )
        .await?;
    let message = bed.wait_refused("big", "OutOfcpu").await?;
    let expected = format!(
        "Node didn't have enough resource: cpu, requested: 1000000, used: 0, capacity: {cpu}"
    );
    assert_eq!(message, format!("Pod {expected}"));
    bed.wait_event(&uid(&big)?, "OutOfcpu", &expected).await?;
    bed.assert_not_started(&uid(&big)?).await?;

    // Two pods fit (the refused one does not count); a third does not.
    bed.create_pod("a1", json!({ "containers": [sleeper()] }))
        .await?;
    let a2 = bed
        .create_pod("a2", json!({ "containers": [sleeper()] }))
        .await?;
    bed.wait_running("a1").await?;
    let a2_id = bed.wait_running("a2").await?;
    let a3 = bed
        .create_pod("a3", json!({ "containers": [sleeper()] }))
        .await?;
    let expected = "Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2";
    assert_eq!(
        bed.wait_refused("a3", "OutOfpods").await?,
        format!("Pod {expected}")
    );
    bed.wait_event(&uid(&a3)?, "OutOfpods", expected).await?;
    bed.assert_not_started(&uid(&a3)?).await?;
    // The decision is stable: a refused pod stays refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(verdict(&bed.pods().get("a3").await?).0, "Failed");
    bed.assert_not_started(&uid(&a3)?).await?;

    // A deletion frees a place.
    bed.delete_and_wait("a1").await?;
    let a4 = bed
        .create_pod("a4", json!({ "containers": [sleeper()] }))
        .await?;
    let a4_id = bed.wait_running("a4").await?;

    // A restart: the running pods are admitted first, so a pod created while the kubelet was
    // down (not in the runtime) is the one refused, and no running container is restarted.
    bed.stop().await?;
    let late = bed
        .create_pod("late", json!({ "containers": [sleeper()] }))
        .await?;
    bed.spawn()?;
    bed.wait_refused("late", "OutOfpods").await?;
    bed.assert_not_started(&uid(&late)?).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (name, id, pod) in [("a2", &a2_id, &a2), ("a4", &a4_id, &a4)] {
        let p = bed.pods().get(name).await?;
        let cs = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        ensure!(
            phase(&p) == "Running",
            "{name} after restart: {:?}",
            p.status
        );
        assert_eq!(cs.first().and_then(|c| c.container_id.as_ref()), Some(id));
        assert_eq!(cs.first().map(|c| c.restart_count), Some(0));
        let running = containers_of(&uid(pod)?).await?;
        ensure!(
            running.len() == 1 && running[0].state == ContainerState::ContainerRunning as i32,
            "{name}'s containers after restart: {running:?}"
        );
    }
    assert_eq!(verdict(&bed.pods().get("a3").await?).1, "OutOfpods");
    bed.pass()
}

#[tokio::test]
async fn host_port_clashes_and_node_selector_mismatches_are_refused() -> Result<()> {
    let bed = Bed::start_config("adm-sel", false, true, "").await?;
    bed.node().await?;
    // A label set on the Node by someone else counts, as the Node's labels are read.
    let nodes: Api<Node> = Api::all(bed.client.clone());
    nodes
        .patch(
            &bed.node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"dh-admission": "yes"}}})),
        )
        .await?;
    let port = i32::from(free_port()?);
    let with_port = || {
        json!({ "containers": [{ "name": "main", "image": busybox(),
            "command": ["sleep", "3600"],
            "ports": [{"containerPort": port, "hostPort": port, "protocol": "TCP"}] }] })
    };
    bed.create_pod("hp1", with_port()).await?;
    bed.wait_running("hp1").await?;
    let hp2 = bed.create_pod("hp2", with_port()).await?;
    assert_eq!(
        bed.wait_refused("hp2", "NodePorts").await?,
        "Pod Predicate NodePorts failed"
    );
    bed.wait_event(&uid(&hp2)?, "NodePorts", "Predicate NodePorts failed")
        .await?;
    bed.assert_not_started(&uid(&hp2)?).await?;

    let selecting =
        |labels: serde_json::Value| json!({ "nodeSelector": labels, "containers": [sleeper()] });
    let other = bed
        .create_pod("other", selecting(json!({"dh-admission": "no"})))
        .await?;
    assert_eq!(
        bed.wait_refused("other", "NodeAffinity").await?,
        "Pod Predicate NodeAffinity failed"
    );
    bed.wait_event(
        &uid(&other)?,
        "NodeAffinity",
        "Predicate NodeAffinity failed",
    )
    .await?;
    bed.assert_not_started(&uid(&other)?).await?;
    // Required node affinity, by a term that does not match then by one that does.
    let affinity = |values: serde_json::Value| {
        json!({ "containers": [sleeper()], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                    "values": values}]}]}}}})
    };
    bed.create_pod("aff-no", affinity(json!(["dh-elsewhere"])))
        .await?;
    bed.wait_refused("aff-no", "NodeAffinity").await?;
    bed.create_pod("aff-yes", affinity(json!([bed.node])))
        .await?;
    bed.create_pod(
        "mine",
        selecting(json!({"dh-admission": "yes", "kubernetes.io/hostname": bed.node})),
    )
    .await?;
    bed.wait_running("mine").await?;
    bed.wait_running("aff-yes").await?;
    // hp1 still runs.
    assert_eq!(phase(&bed.pods().get("hp1").await?), "Running");
    bed.pass()
}
