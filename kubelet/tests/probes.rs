//! deckhand-kubelet's probes, lifecycle hooks and Events against the test bed, in the manner
//! of pods.rs (whose kubelet harness is copied here in part): the built binary runs as a child
//! with node credentials, pods are created through an admin client with `spec.nodeName` set to
//! the test's node, and everything is observed through the API server and the CRI.
//!
//! Every pod uses `hostNetwork: true` (the test bed's containerd has no CNI config); HTTP
//! probes go to a busybox httpd on a loopback port picked at random. [`Bed`]'s drop stops the
//! kubelet, removes whatever the runtime still has of the node's pods, force-deletes the pods
//! and deletes the namespace, Node and Lease, also when the test failed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail, ensure};
use deckhand_kubelet::pods::static_pods;
use deckhand_proto::cri::{
    ContainerFilter, ContainerStatusRequest, ExecSyncRequest, ListContainersRequest,
};
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

mod support;
use support::*;

impl Bed {
    /// A directory for hostPath volumes (removed with the bed).
    fn host_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Waits for an Event about pod `uid` with `reason` whose message contains `text`.
    async fn wait_event(&self, uid: &str, reason: &str, text: &str) -> Result<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        eventually(LONG, &format!("a {reason} event"), || async {
            let list = events.list(&ListParams::default()).await?;
            let mut seen = Vec::new();
            for e in list {
                if e.involved_object.uid.as_deref() != Some(uid) {
                    continue;
                }
                let (r, m) = (
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default(),
                );
                if r == reason && m.contains(text) {
                    return Ok(Ok(e));
                }
                seen.push(format!("{r}: {m}"));
            }
            Ok(Err(format!("events: {seen:?}")))
        })
        .await
    }
}

/// Runs `cmd` in the running container `name` of pod `uid` through the CRI.
async fn exec_in(uid: &str, name: &str, cmd: &[&str]) -> Result<i32> {
    let mut cri = runtime().await?;
    let list = cri
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                label_selector: HashMap::from([
                    ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
                    ("io.kubernetes.container.name".to_string(), name.to_string()),
                ]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    for c in list {
        let s = cri
            .container_status(ContainerStatusRequest {
                container_id: c.id.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .ok_or_else(|| anyhow!("no container status"))?;
        if s.state != deckhand_proto::cri::ContainerState::ContainerRunning as i32 {
            continue;
        }
        let r = cri
            .exec_sync(ExecSyncRequest {
                container_id: c.id,
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 10,
            })
            .await?
            .into_inner();
        return Ok(r.exit_code);
    }
    bail!("no running container {name} in pod {uid}")
}

fn status_of(p: &Pod, name: &str) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

fn running(c: &ContainerStatus) -> bool {
    c.state.as_ref().is_some_and(|s| s.running.is_some())
}

fn uid(p: &Pod) -> Result<String> {
    p.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_container_with_events() -> Result<()> {
    let bed = Bed::start("probe-live", false).await?;
    // Healthy for a few seconds, then the probe's file is gone.
    let pod = bed
        .create_pod(
            "live",
            json!({ "containers": [{ "name": "c", "image": busybox(),
                "command": ["sh", "-c", "touch /tmp/healthy; sleep 4; rm /tmp/healthy; sleep 3600"],
                "livenessProbe": { "exec": { "command": ["cat", "/tmp/healthy"] },
                    "periodSeconds": 1, "failureThreshold": 2 } }] }),
        )
        .await?;
    let uid = uid(&pod)?;
    let first = bed
        .wait_pod("live", LONG, "running and ready", |p| {
            match status_of(p, "c") {
                Some(c) if running(&c) && c.ready && c.restart_count == 0 => Ok(c),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
    let cs = bed
        .wait_pod(
            "live",
            LONG,
            "restarted after failing liveness",
            |p| match status_of(p, "c") {
                Some(c) if c.restart_count >= 1 && running(&c) => Ok(c),
                other => Err(format!("{other:?}")),
            },
        )
        .await?;
    assert_ne!(cs.container_id, first.container_id, "a new container");
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .ok_or_else(|| anyhow!("no lastState: {cs:?}"))?;
    assert_eq!(last.container_id, first.container_id);
    let unhealthy = bed
        .wait_event(&uid, "Unhealthy", "Liveness probe failed:")
        .await?;
    assert_eq!(unhealthy.type_.as_deref(), Some("Warning"));
    assert_eq!(
        unhealthy.involved_object.field_path.as_deref(),
        Some("spec.containers{c}")
    );
    let source = unhealthy.source.clone().unwrap_or_default();
    assert_eq!(source.component.as_deref(), Some("kubelet"));
    assert_eq!(source.host.as_deref(), Some(bed.node.as_str()));
    bed.wait_event(&uid, "Killing", "failed liveness probe, will be restarted")
        .await?;
    for reason in ["Pulled", "Created", "Started"] {
        bed.wait_event(&uid, reason, "").await?;
    }
    // Repeats of one event are one Event with a count.
    let events: Api<Event> = Api::namespaced(bed.client.clone(), &bed.ns);
    eventually(LONG, "an aggregated Started event", || async {
        let list = events.list(&ListParams::default()).await?;
        let started: Vec<_> = list
            .items
            .iter()
            .filter(|e| {
                e.involved_object.uid.as_deref() == Some(uid.as_str())
                    && e.reason.as_deref() == Some("Started")
            })
            .map(|e| e.count)
            .collect();
        Ok(
            if started == [Some(2)] || started.iter().any(|c| c.unwrap_or(0) > 2) {
                Ok(())
            } else {
                Err(format!("Started events' counts: {started:?}"))
            },
        )
    })
    .await?;
    bed.pass()
}

#[tokio::test]
async fn readiness_follows_an_exec_probe() -> Result<()> {
    let bed = Bed::start("probe-ready", false).await?;
    let pod = bed
        .create_pod(
            "ready",
            json!({ "containers": [{ "name": "c", "image": busybox(), "command": ["sleep", "3600"],
                "readinessProbe": { "exec": { "command": ["test", "-f", "/tmp/ready"] },
                    "periodSeconds": 1, "failureThreshold": 1 } }] }),
        )
        .await?;
    let uid = uid(&pod)?;
    // A probe command that would succeed after 3 s but has 1 s: it never does.
    let slow = bed
        .create_pod(
            "slow",
            json!({ "containers": [{ "name": "c", "image": busybox(), "command": ["sleep", "3600"],
                "readinessProbe": { "exec": { "command": ["sleep", "3"] },
                    "timeoutSeconds": 1, "periodSeconds": 1 } }] }),
        )
        .await?;
    bed.wait_pod("ready", LONG, "running, not ready", |p| {
        match (status_of(p, "c"), condition(p, "Ready")) {
            (Some(c), Some(r))
                if running(&c) && !c.ready && c.started == Some(true) && r == "False" =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    // Not ready stays not ready while the file is missing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = bed.pods().get("ready").await?;
    assert_eq!(condition(&p, "Ready").as_deref(), Some("False"));
    assert_eq!(condition(&p, "ContainersReady").as_deref(), Some("False"));
    ensure!(exec_in(&uid, "c", &["touch", "/tmp/ready"]).await? == 0);
    bed.wait_pod("ready", LONG, "Ready", |p| {
        match (condition(p, "Ready"), condition(p, "ContainersReady")) {
            (Some(a), Some(b)) if a == "True" && b == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    ensure!(exec_in(&uid, "c", &["rm", "/tmp/ready"]).await? == 0);
    bed.wait_pod("ready", LONG, "not Ready again", |p| {
        match (condition(p, "Ready"), status_of(p, "c")) {
            (Some(r), Some(c)) if r == "False" && !c.ready && c.restart_count == 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    bed.wait_event(&uid, "Unhealthy", "Readiness probe failed")
        .await?;
    let slow_uid = self::uid(&slow)?;
    // Only a timeout fails `sleep 3`.
    bed.wait_event(
        &slow_uid,
        "Unhealthy",
        "Readiness probe failed: command timed out",
    )
    .await?;
    let p = bed.pods().get("slow").await?;
    let c = status_of(&p, "c").ok_or_else(|| anyhow!("no status: {:?}", p.status))?;
    assert!(running(&c) && !c.ready, "{c:?}");
    assert_eq!(condition(&p, "Ready").as_deref(), Some("False"));
    bed.pass()
}

#[tokio::test]
async fn an_http_readiness_probe_behind_a_startup_probe() -> Result<()> {
    let bed = Bed::start("probe-http", false).await?;
    let port = free_port()?;
    // The server starts after a few seconds; the startup probe (tcpSocket) gates the
    // readiness probe (httpGet by port name, with a header), which needs /www/ok.
    let script =
        format!("mkdir -p /tmp/www; sleep 3; exec httpd -f -p 127.0.0.1:{port} -h /tmp/www");
    let pod = bed
        .create_pod(
            "http",
            json!({ "containers": [{ "name": "web", "image": busybox(),
                "command": ["sh", "-c", script],
                "ports": [{ "name": "web", "containerPort": port }],
                "startupProbe": { "tcpSocket": { "port": port }, "periodSeconds": 1,
                    "failureThreshold": 60 },
                "readinessProbe": { "httpGet": { "port": "web", "path": "/ok",
                        "httpHeaders": [{ "name": "X-Probe", "value": "dh" }] },
                    "periodSeconds": 1, "failureThreshold": 1 } }] }),
        )
        .await?;
    let uid = uid(&pod)?;
    bed.wait_pod("http", LONG, "running, not started", |p| {
        match status_of(p, "web") {
            Some(c) if running(&c) && c.started == Some(false) && !c.ready => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    bed.wait_pod(
        "http",
        LONG,
        "started, not ready (404)",
        |p| match status_of(p, "web") {
            Some(c) if running(&c) && c.started == Some(true) && !c.ready => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await?;
    bed.wait_event(&uid, "Unhealthy", "HTTP probe failed with statuscode: 404")
        .await?;
    ensure!(exec_in(&uid, "web", &["sh", "-c", "echo ok > /tmp/www/ok"]).await? == 0);
    bed.wait_pod("http", LONG, "Ready", |p| {
        match (condition(p, "Ready"), status_of(p, "web")) {
            (Some(r), Some(c)) if r == "True" && c.ready && c.restart_count == 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    bed.pass()
}

#[tokio::test]
async fn post_start_runs_in_the_container_and_a_failing_one_restarts_it() -> Result<()> {
    let bed = Bed::start("hook-post", false).await?;
    let data = bed.host_dir("post")?;
    let volume = json!([{ "name": "data", "hostPath": { "path": data.display().to_string() } }]);
    let mount = json!([{ "name": "data", "mountPath": "/data" }]);
    bed.create_pod(
        "post",
        json!({ "volumes": volume, "containers": [{ "name": "c", "image": busybox(),
            "volumeMounts": mount,
            "command": ["sh", "-c",
                "while [ ! -f /tmp/hook ]; do sleep 0.2; done; cp /tmp/hook /data/seen; sleep 3600"],
            "lifecycle": { "postStart": { "exec": { "command":
                ["sh", "-c", "echo from-post-start > /tmp/hook"] } } } }] }),
    )
    .await?;
    let seen = data.join("seen");
    eventually(LONG, "the container saw the hook's file", || async {
        Ok(match std::fs::read_to_string(&seen) {
            Ok(s) if s.trim() == "from-post-start" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    bed.wait_pod("post", LONG, "running", |p| match status_of(p, "c") {
        Some(c) if running(&c) && c.ready && c.restart_count == 0 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await?;

    let bad = bed
        .create_pod(
            "bad",
            json!({ "containers": [{ "name": "c", "image": busybox(), "command": ["sleep", "3600"],
                "lifecycle": { "postStart": { "exec": { "command": ["sh", "-c", "echo nope; exit 7"] } } } }] }),
        )
        .await?;
    let uid = uid(&bad)?;
    let event = bed.wait_event(&uid, "FailedPostStartHook", "nope").await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    bed.wait_pod("bad", LONG, "restarted", |p| match status_of(p, "c") {
        Some(c) if c.restart_count >= 1 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await?;
    bed.wait_event(&uid, "Killing", "FailedPostStartHook")
        .await?;
    bed.pass()
}

#[tokio::test]
async fn pre_stop_runs_before_the_container_gets_sigterm() -> Result<()> {
    let bed = Bed::start("hook-pre", false).await?;
    let data = bed.host_dir("pre")?;
    let volume = json!([{ "name": "data", "hostPath": { "path": data.display().to_string() } }]);
    let mount = json!([{ "name": "data", "mountPath": "/data" }]);
    bed.create_pod(
        "pre",
        json!({ "terminationGracePeriodSeconds": 20, "volumes": volume,
            "containers": [{ "name": "c", "image": busybox(), "volumeMounts": mount,
            "command": ["sh", "-c",
                "trap 'echo term >> /data/log; exit 0' TERM; echo start >> /data/log; while true; do sleep 0.2; done"],
            "lifecycle": { "preStop": { "exec": { "command":
                ["sh", "-c", "sleep 1; echo pre-stop >> /data/log"] } } } }] }),
    )
    .await?;
    bed.wait_pod("pre", LONG, "running", |p| match status_of(p, "c") {
        Some(c) if running(&c) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await?;
    let log = data.join("log");
    eventually(LONG, "the container started", || async {
        Ok(match std::fs::read_to_string(&log) {
            Ok(s) if s.contains("start") => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    bed.pods().delete("pre", &DeleteParams::default()).await?;
    eventually(LONG, "pod object gone", || async {
        Ok(match bed.pods().get_opt("pre").await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    let lines: Vec<String> = std::fs::read_to_string(&log)?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines, ["start", "pre-stop", "term"]);
    bed.pass()
}

/// A gRPC health server (tonic-health) in the test process on a loopback port: the pods use
/// `hostNetwork`, so their IP is the node IP the kubelet was given (127.0.0.1). Stopped on drop.
struct HealthServer {
    port: u16,
    reporter: tonic_health::server::HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    async fn start() -> Result<HealthServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (reporter, service) = tonic_health::server::health_reporter();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
            if let Err(e) = served {
                eprintln!("the health server stopped: {e}");
            }
        });
        Ok(HealthServer {
            port,
            reporter,
            task,
        })
    }

    async fn set(&self, service: &str, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes static pod `name` (hostNetwork, busybox sleeping) with `container` fields merged
/// into its container; gives its UID.
fn write_static_pod(bed: &Bed, name: &str, container: serde_json::Value) -> Result<String> {
    let mut c = json!({ "name": "c", "image": busybox(), "command": ["sleep", "3600"] });
    if let (Some(base), Some(extra)) = (c.as_object_mut(), container.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": bed.ns },
        "spec": { "hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [c] },
    });
    let file = bed.static_dir().join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec(&manifest)?)?;
    let pod = static_pods::parse_manifest(&file, &std::fs::read_to_string(&file)?, &bed.node)?;
    pod.metadata.uid.ok_or_else(|| anyhow!("no uid"))
}

/// The runtime's containers of pod `uid` as (attempt, running), oldest first.
async fn attempts(uid: &str) -> Result<Vec<(u32, bool)>> {
    let mut v: Vec<(u32, bool)> = containers_of(uid)
        .await?
        .into_iter()
        .map(|c| {
            let attempt = c.metadata.map_or(0, |m| m.attempt);
            let running = c.state == deckhand_proto::cri::ContainerState::ContainerRunning as i32;
            (attempt, running)
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The count of the Events about `uid` with `reason` whose message contains `text`.
async fn event_count(bed: &Bed, uid: &str, reason: &str, text: &str) -> Result<i32> {
    let events: Api<Event> = Api::namespaced(bed.client.clone(), &bed.ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|e| {
            e.involved_object.uid.as_deref() == Some(uid)
                && e.reason.as_deref() == Some(reason)
                && e.message.as_deref().is_some_and(|m| m.contains(text))
        })
        .map(|e| e.count.unwrap_or(1))
        .sum())
}

// The test bed's API server (1.20) predates `probe.grpc` and drops it (the pod is then
// invalid: a probe without a handler), so gRPC probes come from static pods, whose mirror pods
// that API server refuses for the same reason: what the probes do is observed through the
// runtime (restarts) and the Events the kubelet posts about the static pods.
#[tokio::test]
async fn grpc_probes_follow_a_health_server() -> Result<()> {
    let bed = Bed::start("probe-grpc", true).await?;
    let health = HealthServer::start().await?;
    health.set("dh.Ready", true).await;
    health.set("dh.Start", false).await;
    health.set("dh.Live", false).await;
    let grpc = |service: &str, failures: i32| {
        json!({ "grpc": { "port": health.port, "service": service },
            "periodSeconds": 1, "failureThreshold": failures })
    };
    let ready = write_static_pod(
        &bed,
        "ready",
        json!({ "readinessProbe": grpc("dh.Ready", 1) }),
    )?;
    let live = write_static_pod(
        &bed,
        "live",
        json!({ "startupProbe": grpc("dh.Start", 600), "livenessProbe": grpc("dh.Live", 1) }),
    )?;
    let readiness_failed =
        "Readiness probe failed: service unhealthy (responded with \"NOT_SERVING\")";

    // The startup probe fails (its service does not serve) and holds the liveness probe back,
    // although that one's service does not serve either: no restart.
    let startup_failed = "Startup probe failed: service unhealthy (responded with \"NOT_SERVING\")";
    eventually(LONG, "failing startup probes", || async {
        let n = event_count(&bed, &live, "Unhealthy", startup_failed).await?;
        Ok(if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} events"))
        })
    })
    .await?;
    assert_eq!(attempts(&live).await?, [(0, true)]);
    assert_eq!(
        event_count(&bed, &live, "Unhealthy", "Liveness probe failed").await?,
        0
    );
    // SERVING: the readiness probe has not failed.
    assert_eq!(attempts(&ready).await?, [(0, true)]);
    assert_eq!(
        event_count(&bed, &ready, "Unhealthy", "Readiness").await?,
        0
    );

    // SERVING → NOT_SERVING → SERVING: readiness failures start, then stop; no restart.
    health.set("dh.Ready", false).await;
    eventually(LONG, "failing readiness probes", || async {
        let n = event_count(&bed, &ready, "Unhealthy", readiness_failed).await?;
        Ok(if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} events"))
        })
    })
    .await?;
    health.set("dh.Ready", true).await;
    // The last failed attempt may still be on its way to the API server.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = event_count(&bed, &ready, "Unhealthy", readiness_failed).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        event_count(&bed, &ready, "Unhealthy", readiness_failed).await?,
        settled,
        "no failures while serving again"
    );
    assert_eq!(
        attempts(&ready).await?,
        [(0, true)],
        "readiness restarts nothing"
    );

    // The startup probe succeeds: the liveness probe runs, fails and restarts the container.
    health.set("dh.Start", true).await;
    eventually(LONG, "restarted by the liveness probe", || async {
        let a = attempts(&live).await?;
        Ok(if a.iter().any(|(n, running)| *n >= 1 && *running) {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        })
    })
    .await?;
    bed.wait_event(&live, "Killing", "failed liveness probe, will be restarted")
        .await?;
    bed.wait_event(
        &live,
        "Unhealthy",
        "Liveness probe failed: service unhealthy (responded with \"NOT_SERVING\")",
    )
    .await?;
    drop(health);
    bed.pass()
}
