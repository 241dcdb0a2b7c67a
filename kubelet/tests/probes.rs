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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    ContainerFilter, ContainerStatusRequest, ExecSyncRequest, ListContainersRequest,
    ListPodSandboxRequest, PodSandboxFilter, RemovePodSandboxRequest, StopPodSandboxRequest,
};
use deckhand_tests::images::BUSYBOX;
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const CONFIG_HEAD: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nnodeStatusUpdateFrequency: 2s\nnodeLeaseDurationSeconds: 8\n";

const LONG: Duration = Duration::from_secs(90);

/// The CRI endpoint the kubelet under test uses (as in pods.rs).
fn cri_endpoint() -> PathBuf {
    Testbed::get().containerd_socket()
}

fn busybox() -> String {
    format!("{}/{}", Testbed::get().registry(), BUSYBOX)
}

/// A kubelet, its namespace and what to clean up.
struct Bed {
    node: String,
    ns: String,
    client: kube::Client,
    dir: tempfile::TempDir,
    child: Option<Child>,
    passed: bool,
}

impl Bed {
    /// A namespace and a kubelet for a new node.
    async fn start(prefix: &str) -> Result<Bed> {
        let tb = Testbed::get();
        let client = tb.kube_client().await?;
        let ns = tb.create_namespace(&client, prefix).await?;
        let node = unique_name(prefix);
        let dir = tempfile::Builder::new()
            .prefix("dh-kubelet-probes-")
            .tempdir()?;
        let mut bed = Bed {
            node,
            ns,
            client,
            dir,
            child: None,
            passed: false,
        };
        let creds = bed.dir.path().join("creds");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/testbed/controlplane.sh");
        let out = Command::new(&script)
            .arg("node-credentials")
            .arg(tb.dir())
            .arg(&bed.node)
            .arg(&creds)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(
            out.status.success(),
            "node-credentials failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = bed.dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "{CONFIG_HEAD}address: 127.0.0.1\nport: {}\npodLogsDir: {}\n",
                free_port()?,
                bed.dir.path().join("logs").display()
            ),
        )?;
        let p = |p: PathBuf| p.display().to_string();
        let args = vec![
            "--config".into(),
            p(config),
            "--hostname-override".into(),
            bed.node.clone(),
            "--node-ip=127.0.0.1".into(),
            "--root-dir".into(),
            p(bed.dir.path().join("root")),
            "--container-runtime-endpoint".into(),
            format!("unix://{}", cri_endpoint().display()),
            "--kubeconfig".into(),
            p(creds.join("kubeconfig")),
        ];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(bed.log_path())?;
        let child = Command::new(env!("CARGO_BIN_EXE_deckhand-kubelet"))
            .args(&args)
            .env("RUST_LOG", "info,deckhand_kubelet=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deckhand-kubelet")?;
        bed.child = Some(child);
        Ok(bed)
    }

    /// Marks the test passed (the kubelet's log is printed otherwise).
    fn pass(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    /// A directory for hostPath volumes (removed with the bed).
    fn host_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a pod bound to this node from `spec` (hostNetwork, no service account token,
    /// a 2 s grace period unless `spec` says otherwise).
    async fn create_pod(&self, name: &str, spec: serde_json::Value) -> Result<Pod> {
        let mut s = json!({
            "hostNetwork": true,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 2,
            "nodeName": self.node,
        });
        if let (Some(base), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns },
            "spec": s,
        }))?;
        Ok(self.pods().create(&PostParams::default(), &pod).await?)
    }

    /// Waits up to `limit` for `check` on the pod to give `Ok`.
    async fn wait_pod<T>(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        check: impl Fn(&Pod) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let pods = self.pods();
        eventually(limit, what, || async {
            Ok(match pods.get_opt(name).await? {
                Some(p) => check(&p),
                None => Err("no pod".to_string()),
            })
        })
        .await
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

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking()
            || !self.passed
            || std::env::var_os("DH_SHOW_KUBELET_LOG").is_some()
        {
            eprintln!(
                "--- deckhand-kubelet log ({}) ---\n{}",
                self.node,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        let (node, ns) = (self.node.clone(), self.ns.clone());
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let removed = remove_node_sandboxes(&node).await;
                let client = Testbed::get().kube_client().await?;
                let force = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                };
                let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    for p in list {
                        if let Some(n) = p.metadata.name {
                            let _ = pods.delete(&n, &force).await;
                        }
                    }
                }
                // The namespace takes its Events with it.
                let dp = DeleteParams::default();
                let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &dp).await;
                let _ = Api::<Node>::all(client.clone()).delete(&node, &dp).await;
                let _ = Api::<Lease>::namespaced(client, "kube-node-lease")
                    .delete(&node, &dp)
                    .await;
                removed
            })
        });
        match cleanup.join() {
            Ok(Err(e)) => eprintln!("cleaning up node {}: {e:#}", self.node),
            Err(_) => eprintln!("cleaning up node {}: panicked", self.node),
            Ok(Ok(())) => {}
        }
    }
}

/// Stops and removes every sandbox the kubelet of `node` made, and the pods' cgroups.
async fn remove_node_sandboxes(node: &str) -> Result<()> {
    let mut cri = runtime().await?;
    let sandboxes = cri
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: HashMap::from([("deckhand.io/node".to_string(), node.to_string())]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items;
    for s in sandboxes {
        let _ = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: s.id.clone(),
            })
            .await;
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        })
        .await?;
        if let Some(uid) = s.labels.get("io.kubernetes.pod.uid") {
            for root in cgroup_roots() {
                for qos in ["", "burstable/", "besteffort/"] {
                    let _ = std::fs::remove_dir(root.join(format!("kubepods/{qos}pod{uid}")));
                }
            }
        }
    }
    Ok(())
}

fn cgroup_roots() -> Vec<PathBuf> {
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mi.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            matches!(f.get(sep + 1), Some(&"cgroup") | Some(&"cgroup2"))
                .then(|| PathBuf::from(f[4]))
        })
        .collect()
}

async fn runtime() -> Result<RuntimeServiceClient<tonic::transport::Channel>> {
    let channel = deckhand_proto::unix::connect_path(&cri_endpoint()).await?;
    Ok(RuntimeServiceClient::new(channel))
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

/// Polls `check` every 200 ms until it gives `Ok`, or fails after `limit` with its last reason.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, String>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(why)) => why,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn condition(p: &Pod, t: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
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

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_container_with_events() -> Result<()> {
    let bed = Bed::start("probe-live").await?;
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
    let bed = Bed::start("probe-ready").await?;
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
    let bed = Bed::start("probe-http").await?;
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
    let bed = Bed::start("hook-post").await?;
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
    let bed = Bed::start("hook-pre").await?;
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
