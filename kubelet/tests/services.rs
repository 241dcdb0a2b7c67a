//! deckhand-kubelet's service environment variables against the test bed, in the style of
//! volumes.rs (whose helpers are copied here): the built kubelet runs with node credentials,
//! Services and pods are created through an admin client, and the containers print their
//! environment to their log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    ListPodSandboxRequest, PodSandboxFilter, RemovePodSandboxRequest, StopPodSandboxRequest,
};
use deckhand_tests::images::BUSYBOX;
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
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
        // Whatever the kubelet left mounted under its directory (tmpfs emptyDirs, subPath
        // binds), so that the directory can be removed.
        unmount_beneath(self.dir.path());
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

/// Unmounts every mount point beneath `dir`, deepest first.
fn unmount_beneath(dir: &Path) {
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

const LONG: Duration = Duration::from_secs(90);

impl Bed {
    /// Waits for the pod to succeed and gives the output of `container` (its CRI log).
    async fn output(&self, name: &str, container: &str) -> Result<String> {
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

impl Bed {
    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a Service of this namespace (no selector) and gives it as the API server
    /// stored it (with its allocated ClusterIP).
    async fn service(&self, name: &str, spec: serde_json::Value) -> Result<Service> {
        let s: Service = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns }, "spec": spec }))?;
        Ok(self.services().create(&PostParams::default(), &s).await?)
    }

    /// Runs a pod printing its service-looking variables (sorted) and gives them.
    async fn env_of(&self, name: &str, extra: serde_json::Value) -> Result<Vec<String>> {
        let mut container = json!({
            "name": "main", "image": busybox(),
            "command": ["sh", "-c", "env | grep -E '^(DH_|KUBERNETES_|X=|Y=)' | sort"],
        });
        let mut spec = json!({ "restartPolicy": "Never" });
        if let (Some(c), Some(s), Some(e)) = (
            container.as_object_mut(),
            spec.as_object_mut(),
            extra.as_object(),
        ) {
            for (k, v) in e {
                if k == "env" {
                    c.insert(k.clone(), v.clone());
                } else {
                    s.insert(k.clone(), v.clone());
                }
            }
        }
        spec["containers"] = json!([container]);
        self.create_pod(name, spec).await?;
        Ok(self
            .output(name, "main")
            .await?
            .lines()
            .map(str::to_string)
            .collect())
    }
}

/// The ClusterIP of a Service as the API server allocated it.
fn cluster_ip(s: &Service) -> Result<String> {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or_else(|| anyhow!("no clusterIP in {s:?}"))
}

/// The variables the master service `kubernetes` of `default` gives (its ClusterIP and its
/// one port, named https, read from the API server).
async fn master_vars(client: &kube::Client) -> Result<Vec<String>> {
    let s = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await?;
    let ip = cluster_ip(&s)?;
    let ports = s.spec.and_then(|s| s.ports).unwrap_or_default();
    ensure!(ports.len() == 1, "kubernetes ports: {ports:?}");
    let (port, name) = (ports[0].port, ports[0].name.clone().unwrap_or_default());
    ensure!(name == "https", "kubernetes port name {name:?}");
    Ok(vec![
        format!("KUBERNETES_PORT=tcp://{ip}:{port}"),
        format!("KUBERNETES_PORT_{port}_TCP=tcp://{ip}:{port}"),
        format!("KUBERNETES_PORT_{port}_TCP_ADDR={ip}"),
        format!("KUBERNETES_PORT_{port}_TCP_PORT={port}"),
        format!("KUBERNETES_PORT_{port}_TCP_PROTO=tcp"),
        format!("KUBERNETES_SERVICE_HOST={ip}"),
        format!("KUBERNETES_SERVICE_PORT={port}"),
        format!("KUBERNETES_SERVICE_PORT_HTTPS={port}"),
    ])
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn services_of_the_namespace_give_variables_that_env_overrides() -> Result<()> {
    let bed = Bed::start("svc-env", false).await?;
    let web = bed
        .service(
            "dh-web",
            json!({"ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "dns-udp", "port": 53, "protocol": "UDP"}]}),
        )
        .await?;
    bed.service(
        "dh-headless",
        json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
    )
    .await?;
    let ip = cluster_ip(&web)?;
    let got = bed
        .env_of(
            "links",
            json!({"env": [
                {"name": "DH_WEB_SERVICE_PORT", "value": "8080"},
                {"name": "X", "value": "$(DH_WEB_SERVICE_HOST)"},
                {"name": "Y", "value": "$(KUBERNETES_SERVICE_HOST):$(DH_WEB_SERVICE_PORT_DNS_UDP)"}]}),
        )
        .await?;
    let master = master_vars(&bed.client).await?;
    let master_ip = master
        .iter()
        .find_map(|l| l.strip_prefix("KUBERNETES_SERVICE_HOST="))
        .ok_or_else(|| anyhow!("no master host"))?
        .to_string();
    let mut want = vec![
        format!("DH_WEB_PORT=tcp://{ip}:80"),
        format!("DH_WEB_PORT_53_UDP=udp://{ip}:53"),
        format!("DH_WEB_PORT_53_UDP_ADDR={ip}"),
        "DH_WEB_PORT_53_UDP_PORT=53".to_string(),
        "DH_WEB_PORT_53_UDP_PROTO=udp".to_string(),
        format!("DH_WEB_PORT_80_TCP=tcp://{ip}:80"),
        format!("DH_WEB_PORT_80_TCP_ADDR={ip}"),
        "DH_WEB_PORT_80_TCP_PORT=80".to_string(),
        "DH_WEB_PORT_80_TCP_PROTO=tcp".to_string(),
        format!("DH_WEB_SERVICE_HOST={ip}"),
        // The container's env wins over the service variable.
        "DH_WEB_SERVICE_PORT=8080".to_string(),
        "DH_WEB_SERVICE_PORT_DNS_UDP=53".to_string(),
        "DH_WEB_SERVICE_PORT_HTTP=80".to_string(),
        format!("X={ip}"),
        format!("Y={master_ip}:53"),
    ];
    want.extend(master);
    // Nothing of the headless Service.
    assert_eq!(got, sorted(want));
    bed.pass()
}

#[tokio::test]
async fn without_service_links_only_the_master_service_and_the_cache_follows() -> Result<()> {
    let bed = Bed::start("svc-nolinks", false).await?;
    bed.service("dh-first", json!({"ports": [{"port": 81}]}))
        .await?;
    let master = master_vars(&bed.client).await?;
    let got = bed
        .env_of("nolinks", json!({"enableServiceLinks": false}))
        .await?;
    assert_eq!(got, sorted(master.clone()));
    // A Service created and one deleted after the kubelet listed them: the watch brings both.
    let late = bed
        .service(
            "dh-late",
            json!({"ports": [{"port": 82, "protocol": "UDP"}]}),
        )
        .await?;
    bed.services()
        .delete("dh-first", &DeleteParams::default())
        .await?;
    let ip = cluster_ip(&late)?;
    let got = eventually(LONG, "the new Service in a new pod's env", || async {
        // A fresh pod per attempt: the kubelet's cache may lag the API server a little.
        let name = unique_name("late");
        let got = bed.env_of(&name, json!({})).await?;
        Ok(if got.iter().any(|l| l.starts_with("DH_FIRST_")) {
            Err(format!("the deleted Service is still there: {got:?}"))
        } else {
            Ok(got)
        })
    })
    .await?;
    let mut want = vec![
        format!("DH_LATE_PORT=udp://{ip}:82"),
        format!("DH_LATE_PORT_82_UDP=udp://{ip}:82"),
        format!("DH_LATE_PORT_82_UDP_ADDR={ip}"),
        "DH_LATE_PORT_82_UDP_PORT=82".to_string(),
        "DH_LATE_PORT_82_UDP_PROTO=udp".to_string(),
        format!("DH_LATE_SERVICE_HOST={ip}"),
        "DH_LATE_SERVICE_PORT=82".to_string(),
    ];
    want.extend(master);
    assert_eq!(got, sorted(want));
    bed.pass()
}

#[tokio::test]
async fn a_standalone_kubelet_gives_no_service_variables() -> Result<()> {
    let bed = Bed::start_with("svc-alone", true, false).await?;
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "alone", "namespace": bed.ns},
        "spec": {"hostNetwork": true, "restartPolicy": "Never", "containers": [{
            "name": "main", "image": busybox(),
            "command": ["sh", "-c", "env | grep -E '^(DH_|KUBERNETES_)' | sort; echo done"]}]}
    });
    std::fs::write(
        bed.static_dir().join("alone.json"),
        serde_json::to_vec(&pod)?,
    )?;
    let logs = bed.dir.path().join("logs");
    let prefix = format!("{}_alone-{}_", bed.ns, bed.node);
    let out = eventually(LONG, "the static pod's output", || async {
        let Ok(dir) = std::fs::read_dir(&logs) else {
            return Ok(Err("no log directory".to_string()));
        };
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let text = std::fs::read_to_string(e.path().join("main/0.log")).unwrap_or_default();
            let out: String = text
                .lines()
                .filter_map(|l| l.splitn(4, ' ').nth(3))
                .map(|l| format!("{l}\n"))
                .collect();
            if out.ends_with("done\n") {
                return Ok(Ok(out));
            }
        }
        Ok(Err("no output yet".to_string()))
    })
    .await?;
    assert_eq!(out, "done\n");
    bed.pass()
}
