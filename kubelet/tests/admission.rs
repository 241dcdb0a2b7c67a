//! Pod admission against the test bed, as upstream's kubelet `canAdmitPod`: a pod that does
//! not fit the node's allocatable (`maxPods`, cpu), whose hostPort is taken or whose
//! nodeSelector does not match the Node is never started and is reported Failed with
//! upstream's reason and message and a Warning Event; a kubelet restart keeps the running pods
//! admitted. The helpers are those of `pods.rs` (the built kubelet as a child with node
//! credentials, an admin client, cleanup on drop also when a test failed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    ContainerFilter, ContainerState, ContainerStatusRequest, ListContainersRequest,
    ListPodSandboxRequest, PodSandboxFilter, RemovePodSandboxRequest, StopPodSandboxRequest,
};
use deckhand_tests::images::BUSYBOX;
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
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
    /// A namespace and a kubelet for a new node, `extra_config` appended to its configuration.
    async fn start(prefix: &str, extra_config: &str) -> Result<Bed> {
        let tb = Testbed::get();
        let client = tb.kube_client().await?;
        let ns = tb.create_namespace(&client, prefix).await?;
        let node = unique_name(prefix);
        let dir = tempfile::Builder::new()
            .prefix("dh-kubelet-admission-")
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
                "{CONFIG_HEAD}address: 127.0.0.1\nport: {}\npodLogsDir: {}\n{extra_config}",
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
        bed.args.push("--kubeconfig".into());
        bed.args.push(p(creds.join("kubeconfig")));
        bed.spawn()?;
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

const LONG: Duration = Duration::from_secs(90);

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

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
    let mut bed = Bed::start(
        "adm-fit",
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
    let bed = Bed::start("adm-sel", "").await?;
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
