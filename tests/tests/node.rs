//! The whole node: deckhand-kubelet against the test bed's kube-apiserver, deckhand-cri (the
//! built-in runtime) as its CRI runtime and Deckhand's CNI plugins for the pod network. A pod
//! with its own network goes Running and Ready, answers HTTP on its pod IP from the node, and is
//! torn down completely when deleted.
//!
//! The binaries are the workspace's (`target/debug`, built by `hack/test.sh` before the tests).
//! Everything is named `dh…` (node, namespace, bridge, directories) and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use deckhand_proto::cri;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_tests::images::{HTTPD, HTTPD_INDEX_HTML};
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};

fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target dir")?;
    let p = dir.join(name);
    ensure!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        p.display()
    );
    Ok(p)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node: deckhand-cri with a CNI network of its own, deckhand-kubelet, a namespace.
struct NodeBed {
    dir: PathBuf,
    node: String,
    ns: String,
    bridge: String,
    client: kube::Client,
    kubelet: Option<Proc>,
    cri: Option<Proc>,
    socket: PathBuf,
}

impl NodeBed {
    fn cgroup_root(&self) -> String {
        format!("/dh-cg-{}", self.node)
    }

    async fn start() -> Result<NodeBed> {
        let tb = Testbed::get();
        let client = tb.kube_client().await?;
        let ns = tb.create_namespace(&client, "dh-e2e").await?;
        let node = unique_name("dh-e2e-node");
        let dir = std::env::temp_dir().join(unique_name("dh-e2e"));
        std::fs::create_dir_all(dir.join("net.d"))?;
        let bridge = format!("dhe2e{:x}", std::process::id() % 0xffff);
        let mut bed = NodeBed {
            dir: dir.clone(),
            node: node.clone(),
            ns,
            bridge: bridge.clone(),
            client,
            kubelet: None,
            cri: None,
            socket: dir.join("cri.sock"),
        };
        let list = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "dh-e2e",
            "plugins": [
                {"type": "deckhand-bridge", "bridge": bridge, "isGateway": true,
                 "ipam": {"type": "deckhand-host-local", "ranges": [[{"subnet": "10.234.7.0/24"}]],
                          "dataDir": dir.join("ipam")}},
                {"type": "deckhand-portmap", "capabilities": {"portMappings": true}},
            ]
        });
        std::fs::write(dir.join("net.d/10-dh.conflist"), serde_json::to_vec(&list)?)?;
        std::fs::write(dir.join("cri.toml"), "")?;
        let cni_bins = bin("deckhand-bridge")?
            .parent()
            .context("bin dir")?
            .to_path_buf();
        let cri_log = std::fs::File::create(dir.join("cri.log"))?;
        bed.cri = Some(Proc(
            Command::new(bin("deckhand-cri")?)
                .arg("--config")
                .arg(dir.join("cri.toml"))
                .arg("--socket")
                .arg(&bed.socket)
                .arg("--root")
                .arg(dir.join("root"))
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--cni-conf-dir")
                .arg(dir.join("net.d"))
                .arg("--cni-bin-dir")
                .arg(&cni_bins)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(cri_log)
                .spawn()
                .context("starting deckhand-cri")?,
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !bed.socket.exists() {
            ensure!(
                Instant::now() < deadline,
                "deckhand-cri did not start: {}",
                bed.log("cri.log")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let creds = dir.join("creds");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/testbed/controlplane.sh");
        let out = Command::new(&script)
            .arg("node-credentials")
            .arg(tb.dir())
            .arg(&node)
            .arg(&creds)
            .output()?;
        ensure!(
            out.status.success(),
            "node-credentials: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The kubelet's own cgroupRoot (its kubepods below), removed with the bed.
        deckhand_cgroups::Manager::new(&bed.cgroup_root())
            .and_then(|m| m.create())
            .with_context(|| format!("creating the cgroup root {}", bed.cgroup_root()))?;
        std::fs::write(
            dir.join("kubelet.yaml"),
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 nodeStatusUpdateFrequency: 2s\npodLogsDir: {}\naddress: 127.0.0.1\nport: {}\n\
                 tlsCertFile: {}\ntlsPrivateKeyFile: {}\n\
                 authentication: {{x509: {{clientCAFile: {}}}, anonymous: {{enabled: false}}}}\n\
                 authorization: {{mode: Webhook}}\ncgroupRoot: {}\n",
                dir.join("logs").display(),
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port(),
                creds.join("kubelet.crt").display(),
                creds.join("kubelet.key").display(),
                creds.join("ca.crt").display(),
                bed.cgroup_root(),
            ),
        )?;
        let klog = std::fs::File::create(dir.join("kubelet.log"))?;
        bed.kubelet = Some(Proc(
            Command::new(bin("deckhand-kubelet")?)
                .arg("--kubeconfig")
                .arg(creds.join("kubeconfig"))
                .arg("--config")
                .arg(dir.join("kubelet.yaml"))
                .arg("--hostname-override")
                .arg(&node)
                .arg("--node-ip=127.0.0.1")
                .arg("--root-dir")
                .arg(dir.join("kubelet"))
                .arg("--container-runtime-endpoint")
                .arg(format!("unix://{}", bed.socket.display()))
                .env("RUST_LOG", "info,deckhand_kubelet=debug")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(klog)
                .spawn()
                .context("starting deckhand-kubelet")?,
        ));
        Ok(bed)
    }

    fn log(&self, f: &str) -> String {
        std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
    }

    async fn cri(&self) -> Result<RuntimeServiceClient<tonic::transport::Channel>> {
        Ok(RuntimeServiceClient::new(
            deckhand_proto::unix::connect_path(&self.socket).await?,
        ))
    }
}

impl Drop for NodeBed {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("DH_SHOW_LOGS").is_some() {
            eprintln!(
                "--- kubelet ---\n{}\n--- cri ---\n{}",
                self.log("kubelet.log"),
                self.log("cri.log")
            );
        }
        self.kubelet.take();
        let (socket, node, ns) = (self.socket.clone(), self.node.clone(), self.ns.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                if let Ok(ch) = deckhand_proto::unix::connect_path(&socket).await {
                    let mut c = RuntimeServiceClient::new(ch);
                    if let Ok(r) = c
                        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                        .await
                    {
                        for p in r.into_inner().items {
                            let _ = c
                                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                                    pod_sandbox_id: p.id,
                                })
                                .await;
                        }
                    }
                }
                let client = Testbed::get().kube_client().await.ok()?;
                let dp = DeleteParams::default();
                let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &dp).await;
                let _ = Api::<Node>::all(client.clone()).delete(&node, &dp).await;
                let _ = Api::<Lease>::namespaced(client, "kube-node-lease")
                    .delete(&node, &dp)
                    .await;
                Some(())
            })
        })
        .join();
        self.cri.take();
        if let Err(e) =
            deckhand_cgroups::Manager::new(&self.cgroup_root()).and_then(|m| m.destroy(true))
        {
            eprintln!("removing the cgroup root {}: {e}", self.cgroup_root());
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        // Unmount what is left below the directory (deepest first), then remove it.
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            let prefix = self.dir.display().to_string();
            let mut m: Vec<&str> = mi
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            m.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in m {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for root in [
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu,cpuacct",
            "/sys/fs/cgroup/pids",
        ] {
            let _ = std::fs::remove_dir(Path::new(root).join("kubepods/besteffort"));
        }
    }
}

async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn pod_runs_on_its_own_ip_through_deckhand_cri() -> Result<()> {
    deckhand_tests::testbed::install_crypto_provider();
    let tb = Testbed::get();
    let bed = NodeBed::start().await?;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    eventually(Duration::from_secs(60), "the node Ready", || async {
        let n = nodes.get_opt(&bed.node).await?;
        let ready = n
            .and_then(|n| n.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok(ready.then_some(()))
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &bed.ns);
    let cms: Api<ConfigMap> = Api::namespaced(bed.client.clone(), &bed.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "dh-cfg"}, "data": {"greeting": "hello from a configmap"}
        }))?,
    )
    .await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "dh-web", "namespace": bed.ns},
        "spec": {
            "nodeName": bed.node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["dh-alias"]}],
            "volumes": [{"name": "cfg", "configMap": {"name": "dh-cfg"}}],
            "containers": [{
                "name": "web",
                "image": format!("{}/{HTTPD}", tb.registry()),
                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}],
            }],
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let ip = eventually(
        Duration::from_secs(60),
        "the pod Running and Ready with an IP",
        || async {
            let p = pods.get("dh-web").await?;
            let st = p.status.unwrap_or_default();
            let ready = st
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok((st.phase.as_deref() == Some("Running") && ready)
                .then_some(st.pod_ip)
                .flatten())
        },
    )
    .await?;
    ensure!(
        ip.starts_with("10.234.7."),
        "pod IP {ip} is not from the pod network"
    );

    // The node reaches the pod on its IP.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(format!("{ip}:8080")).await?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut page = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut page)).await??;
    ensure!(page.ends_with(HTTPD_INDEX_HTML), "{page}");

    // kubectl exec through the API server, the kubelet's API and deckhand-cri's streaming
    // server: the container sees the kubelet's /etc/hosts (with the alias) and the ConfigMap.
    let out = Command::new(tb.var("DH_KUBECTL")?)
        .arg("--kubeconfig")
        .arg(tb.var("DH_KUBECONFIG")?)
        .args(["-n", &bed.ns, "exec", "dh-web", "-c", "web", "--"])
        .args(["sh", "-c", "cat /etc/hosts /cfg/greeting; echo; exit 7"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(7),
        "kubectl exec: {:?} {text} {}\nkubelet log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        bed.log("kubelet.log")
    );
    ensure!(
        text.contains("10.1.2.3\tdh-alias") && text.contains(&format!("{ip}\tdh-web")),
        "/etc/hosts: {text}"
    );
    ensure!(text.contains("hello from a configmap"), "{text}");

    // Deleting the pod removes it from the runtime, then from the API server.
    pods.delete("dh-web", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(60), "the pod gone", || async {
        Ok(pods.get_opt("dh-web").await?.is_none().then_some(()))
    })
    .await?;
    let mut cri = bed.cri().await?;
    let left = cri
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    ensure!(left.is_empty(), "sandboxes left in deckhand-cri: {left:?}");
    Ok(())
}
