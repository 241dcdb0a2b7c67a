//! What the kubelet's integration tests share: the test bed's CRI endpoint and images, the
//! cleanup of a test node's sandboxes and cgroups, and small waiting and status helpers. Each
//! test file has its own `Bed` (its kubelet's flags and configuration differ).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    ContainerFilter, ContainerStatusRequest, ListContainersRequest, ListPodSandboxRequest,
    PodSandboxFilter, RemovePodSandboxRequest, StopPodSandboxRequest,
};
use deckhand_tests::images::BUSYBOX;
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// A free loopback port, for the kubelet's HTTPS server (tests never listen beyond loopback).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The CRI endpoint the kubelet under test uses: the one line to switch to deckhand-cri.
pub fn cri_endpoint() -> PathBuf {
    Testbed::get().containerd_socket()
}

pub fn busybox() -> String {
    format!("{}/{}", Testbed::get().registry(), BUSYBOX)
}

/// Stops and removes every sandbox the kubelet of `node` made (the pods' cgroups go with the
/// bed's own cgroupRoot).
pub async fn remove_node_sandboxes(node: &str) -> Result<()> {
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
    }
    Ok(())
}

/// Removes what a test kubelet of `node` leaves in the runtime and the API server: its
/// sandboxes, the pods of `ns` (forced), `ns` itself, the Node and its Lease. From a thread
/// with a runtime of its own, so that it can run in a `Drop` of a test's runtime.
pub fn cleanup_node(node: &str, ns: &str) {
    let (n, ns) = (node.to_string(), ns.to_string());
    let cleanup = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let removed = remove_node_sandboxes(&n).await;
            let client = Testbed::get().kube_client().await?;
            let force = DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for p in list {
                    if let Some(name) = p.metadata.name {
                        let _ = pods.delete(&name, &force).await;
                    }
                }
            }
            // Mirror pods of static pods live in the manifest's namespace (the test's).
            let dp = DeleteParams::default();
            let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &dp).await;
            let _ = Api::<Node>::all(client.clone()).delete(&n, &dp).await;
            let _ = Api::<Lease>::namespaced(client, "kube-node-lease")
                .delete(&n, &dp)
                .await;
            removed
        })
    });
    match cleanup.join() {
        Ok(Err(e)) => eprintln!("cleaning up node {node}: {e:#}"),
        Err(_) => eprintln!("cleaning up node {node}: panicked"),
        Ok(Ok(())) => {}
    }
}

pub async fn runtime() -> Result<RuntimeServiceClient<tonic::transport::Channel>> {
    let channel = deckhand_proto::unix::connect_path(&cri_endpoint()).await?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Polls `check` every 200 ms until it gives `Ok`, or fails after `limit` with its last reason.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
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

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

pub fn condition(p: &Pod, t: &str) -> Option<String> {
    condition_of(p, t).map(|c| c.0)
}

/// A pod condition's (status, reason, message).
pub fn condition_of(p: &Pod, t: &str) -> Option<(String, Option<String>, Option<String>)> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Unmounts every mount point beneath `dir`, deepest first.
pub fn unmount_beneath(dir: &Path) {
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mi
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in points {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", m.display());
        }
    }
}

pub const LONG: Duration = Duration::from_secs(90);

pub const CONFIG_HEAD: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nnodeStatusUpdateFrequency: 2s\nnodeLeaseDurationSeconds: 8\n";

/// A kubelet, its namespace and what to clean up.
pub struct Bed {
    pub node: String,
    pub ns: String,
    pub client: kube::Client,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub args: Vec<String>,
    pub passed: bool,
    /// The kubelet's own `cgroupRoot` (`/dh-cg-<node>`), made before it starts and removed
    /// with everything beneath it afterwards, so parallel tests never share `kubepods`.
    pub cgroup_root: String,
}

impl Bed {
    /// A namespace and a kubelet for a new node; `static_dir` enables static pods.
    pub async fn start(prefix: &str, static_dir: bool) -> Result<Bed> {
        Bed::start_with(prefix, static_dir, true).await
    }

    /// As [`Bed::start`]; `api` false runs the kubelet standalone (no kubeconfig).
    pub async fn start_with(prefix: &str, static_dir: bool, api: bool) -> Result<Bed> {
        Bed::start_config(prefix, static_dir, api, "").await
    }

    /// As [`Bed::start_with`], `extra_config` appended to the KubeletConfiguration.
    pub async fn start_config(
        prefix: &str,
        static_dir: bool,
        api: bool,
        extra_config: &str,
    ) -> Result<Bed> {
        let tb = Testbed::get();
        let client = tb.kube_client().await?;
        let ns = tb.create_namespace(&client, prefix).await?;
        let node = unique_name(prefix);
        let dir = tempfile::Builder::new().prefix("dh-kubelet-").tempdir()?;
        let cgroup_root = format!("/dh-cg-{node}");
        let mut bed = Bed {
            node,
            ns,
            client,
            dir,
            child: None,
            args: Vec::new(),
            passed: false,
            cgroup_root,
        };
        deckhand_cgroups::Manager::new(&bed.cgroup_root)
            .and_then(|m| m.create())
            .with_context(|| format!("creating the cgroup root {}", bed.cgroup_root))?;
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
                "{CONFIG_HEAD}address: 127.0.0.1\nport: {}\npodLogsDir: {}\ncgroupRoot: {}\n{extra_config}",
                free_port()?,
                bed.dir.path().join("logs").display(),
                bed.cgroup_root,
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
    pub fn pass(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    pub fn static_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn spawn(&mut self) -> Result<()> {
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
    pub async fn stop(&mut self) -> Result<()> {
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

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a pod bound to this node from `spec` (hostNetwork, no service account token,
    /// a 2 s grace period unless `spec` says otherwise).
    pub async fn create_pod(&self, name: &str, spec: serde_json::Value) -> Result<Pod> {
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
    pub async fn wait_pod<T>(
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
        cleanup_node(&self.node, &self.ns);
        // The pods' cgroups and whatever is left in them (this test's only), then the root.
        if let Err(e) =
            deckhand_cgroups::Manager::new(&self.cgroup_root).and_then(|m| m.destroy(true))
        {
            eprintln!("removing the cgroup root {}: {e}", self.cgroup_root);
        }
        // What the kubelet left mounted beneath its directory (an emptyDir `medium: Memory` of
        // a pod that was not deleted), so that a failed test leaves no mount behind either.
        unmount_beneath(self.dir.path());
    }
}

/// The runtime's containers of pod `uid`: (name, id, state, restart count annotation).
pub async fn containers_of(uid: &str) -> Result<Vec<deckhand_proto::cri::ContainerStatus>> {
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

pub async fn sandboxes_of(uid: &str) -> Result<usize> {
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

impl Bed {
    /// Waits for the pod to succeed and gives the output of `container` (its CRI log).
    pub async fn output(&self, name: &str, container: &str) -> Result<String> {
        let pod = self
            .wait_pod(name, LONG, "pod Succeeded", |p| {
                if phase(p) == "Succeeded" {
                    Ok(p.clone())
                } else {
                    Err(format!("status {:?}", p.status))
                }
            })
            .await?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let path = self
            .dir
            .path()
            .join("logs")
            .join(format!("{}_{name}_{uid}", self.ns))
            .join(container)
            .join("0.log");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        // CRI log lines: `<time> <stream> <tag> <text>`.
        Ok(text
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .map(|l| format!("{l}\n"))
            .collect())
    }
}
