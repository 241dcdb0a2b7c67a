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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use deckhand_kubelet::pods::static_pods;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    ContainerFilter, ContainerState, ContainerStatusRequest, ListContainersRequest,
    ListPodSandboxRequest, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    RemovePodSandboxRequest, StopPodSandboxRequest,
};
use deckhand_tests::images::BUSYBOX;
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// A free loopback port, for the kubelet's HTTPS server (tests never listen beyond loopback).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

const CONFIG_HEAD: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nnodeStatusUpdateFrequency: 2s\nnodeLeaseDurationSeconds: 8\n";

/// The CRI endpoint the kubelet under test uses: the one line to switch to deckhand-cri.
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
    args: Vec<String>,
    passed: bool,
}

impl Bed {
    /// A namespace and a kubelet for a new node; `static_dir` enables static pods.
    async fn start(prefix: &str, static_dir: bool) -> Result<Bed> {
        Bed::start_with(prefix, static_dir, true).await
    }

    /// As [`Bed::start`]; `api` false runs the kubelet standalone (no kubeconfig).
    async fn start_with(prefix: &str, static_dir: bool, api: bool) -> Result<Bed> {
        let tb = Testbed::get();
        let client = tb.kube_client().await?;
        let ns = tb.create_namespace(&client, prefix).await?;
        let node = unique_name(prefix);
        let dir = tempfile::Builder::new()
            .prefix("dh-kubelet-pods-")
            .tempdir()?;
        let mut bed = Bed {
            node,
            ns,
            client,
            dir,
            child: None,
            args: Vec::new(),
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
        bed.args = vec![
            "--config".into(),
            p(config),
            "--hostname-override".into(),
            bed.node.clone(),
            "--node-ip=127.0.0.1".into(),
            "--root-dir".into(),
            p(bed.dir.path().join("root")),
            "--container-runtime-endpoint".into(),
            format!("unix://{}", cri_endpoint().display()),
        ];
        if api {
            bed.args.push("--kubeconfig".into());
            bed.args.push(p(creds.join("kubeconfig")));
        }
        if static_dir {
            std::fs::create_dir_all(bed.static_dir())?;
            bed.args.push("--pod-manifest-path".into());
            bed.args.push(p(bed.static_dir()));
        }
        bed.spawn()?;
        Ok(bed)
    }

    /// Marks the test passed (the kubelet's log is printed otherwise).
    fn pass(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    fn static_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(env!("CARGO_BIN_EXE_deckhand-kubelet"))
            .args(&self.args)
            .env("RUST_LOG", "info,deckhand_kubelet=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deckhand-kubelet")?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the kubelet with SIGTERM and waits for it.
    async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the kubelet did not stop on SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
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

    /// Waits up to `limit` for `check` on the pod to give `Some`.
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
                self.log()
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
                // Mirror pods of static pods live in the manifest's namespace (the test's).
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

/// The runtime's containers of pod `uid`: (name, id, state, restart count annotation).
async fn containers_of(uid: &str) -> Result<Vec<deckhand_proto::cri::ContainerStatus>> {
    let mut cri = runtime().await?;
    let list = cri
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                label_selector: HashMap::from([(
                    "io.kubernetes.pod.uid".to_string(),
                    uid.to_string(),
                )]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    let mut out = Vec::new();
    for c in list {
        let s = cri
            .container_status(ContainerStatusRequest {
                container_id: c.id,
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .ok_or_else(|| anyhow!("no container status"))?;
        out.push(s);
    }
    Ok(out)
}

async fn sandboxes_of(uid: &str) -> Result<usize> {
    let mut cri = runtime().await?;
    Ok(cri
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: HashMap::from([(
                    "io.kubernetes.pod.uid".to_string(),
                    uid.to_string(),
                )]),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items
        .len())
}

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

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
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

fn sleeper() -> serde_json::Value {
    json!({ "name": "main", "image": busybox(), "command": ["sleep", "3600"],
            "env": [{"name": "A", "value": "x"}, {"name": "B", "value": "$(A)y"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}] })
}

const LONG: Duration = Duration::from_secs(90);

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
    eventually(LONG, "mirror pod gone", || async {
        Ok(match bed.pods().get_opt(&name).await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
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
        json!({ "readinessGates": [{ "conditionType": "deckhand.io/gate" }],
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
    assert!(message.unwrap_or_default().contains("readinessGates"));
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
