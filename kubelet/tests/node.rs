//! deckhand-kubelet against the test bed: the built binary runs as a child process with node
//! credentials made by `controlplane.sh node-credentials` (so it authenticates as
//! `system:node:<name>` and passes the Node authorizer and NodeRestriction, as a real kubelet),
//! the test bed's containerd as its CRI runtime and a temporary root dir. Everything is observed
//! through an admin client. Each test uses its own node name and removes its Node and Lease.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use deckhand_kubelet::quantity;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{StatusRequest, VersionRequest};
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use kube::api::{Api, DeleteParams, PostParams};

mod support;
use support::eventually;

const CONFIG_HEAD: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n";
/// Status every 2 s, lease of 8 s renewed every 2 s: fast enough for tests.
const FAST: &str = "nodeStatusUpdateFrequency: 2s\nnodeLeaseDurationSeconds: 8\n";

/// A running deckhand-kubelet; killed and its Node and Lease deleted on drop.
struct Kubelet {
    name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Its own `cgroupRoot` (`/dh-cg-<name>`): kubelets of parallel tests never share one.
    cgroup_root: String,
}

impl Kubelet {
    /// Starts a kubelet for node `name` with `config` appended to the KubeletConfiguration and
    /// `args` added to the command line. `api` false runs it standalone.
    fn start(name: &str, config: &str, args: &[&str], api: bool) -> Result<Kubelet> {
        Kubelet::start_as(name, name, config, args, api)
    }

    /// As [`Kubelet::start`], with the client credentials of node `identity`.
    fn start_as(
        name: &str,
        identity: &str,
        config: &str,
        args: &[&str],
        api: bool,
    ) -> Result<Kubelet> {
        let tb = Testbed::get();
        let dir = tempfile::Builder::new()
            .prefix("dh-kubelet-test-")
            .tempdir()?;
        let creds = dir.path().join("creds");
        if api {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/testbed/controlplane.sh");
            let out = Command::new(&script)
                .arg("node-credentials")
                .arg(tb.dir())
                .arg(identity)
                .arg(&creds)
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            ensure!(
                out.status.success(),
                "node-credentials failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let config_path = dir.path().join("config.yaml");
        // The HTTPS server on loopback only, on a free port unless the test names one.
        let port = if config.contains("port:") {
            String::new()
        } else {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            format!("port: {}\n", l.local_addr()?.port())
        };
        let cgroup_root = format!("/dh-cg-{name}");
        deckhand_cgroups::Manager::new(&cgroup_root)
            .and_then(|m| m.create())
            .with_context(|| format!("creating the cgroup root {cgroup_root}"))?;
        std::fs::write(
            &config_path,
            format!("{CONFIG_HEAD}address: 127.0.0.1\ncgroupRoot: {cgroup_root}\n{port}{config}"),
        )?;
        let log = std::fs::File::create(dir.path().join("kubelet.log"))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deckhand-kubelet"));
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--hostname-override")
            .arg(name)
            .arg("--node-ip=127.0.0.1")
            .arg("--root-dir")
            .arg(dir.path().join("root"))
            .arg("--container-runtime-endpoint")
            .arg(format!("unix://{}", tb.containerd_socket().display()))
            .args(args)
            .env("RUST_LOG", "info,deckhand_kubelet=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if api {
            cmd.arg("--kubeconfig").arg(creds.join("kubeconfig"));
        }
        let child = cmd.spawn().context("starting deckhand-kubelet")?;
        Ok(Kubelet {
            name: name.to_string(),
            child: Some(child),
            dir,
            cgroup_root,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kubelet.log")).unwrap_or_default()
    }

    fn pid(&self) -> Result<nix::unistd::Pid> {
        let child = self.child.as_ref().ok_or_else(|| anyhow!("not running"))?;
        Ok(nix::unistd::Pid::from_raw(i32::try_from(child.id())?))
    }

    /// Whether the process still runs.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `limit` for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("deckhand-kubelet did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(self.pid()?, sig)?;
        Ok(())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Another Kubelet of the same node (a restart) may still use it: only when it is empty.
        let _ = deckhand_cgroups::Manager::new(&self.cgroup_root).and_then(|m| m.destroy(false));
        if std::thread::panicking() {
            eprintln!(
                "--- deckhand-kubelet log ({}) ---\n{}",
                self.name,
                self.log()
            );
        }
        // The test's runtime is blocked in this drop: clean up from a thread with its own.
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = Testbed::get().kube_client().await?;
                let dp = DeleteParams::default();
                let nodes: Api<Node> = Api::all(client.clone());
                let _ = nodes.delete(&name, &dp).await;
                let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
                let _ = leases.delete(&name, &dp).await;
                anyhow::Ok(())
            })
        });
        if let Ok(Err(e)) = cleanup.join() {
            eprintln!("cleaning up node {}: {e:#}", self.name);
        }
    }
}

async fn wait_node(nodes: &Api<Node>, name: &str, limit: Duration) -> Result<Node> {
    eventually(limit, &format!("node {name} registered"), || async {
        Ok(match nodes.get_opt(name).await? {
            Some(n) if n.status.as_ref().is_some_and(|s| s.conditions.is_some()) => Ok(n),
            Some(_) => Err("no status yet".to_string()),
            None => Err("no node".to_string()),
        })
    })
    .await
}

fn condition<'a>(node: &'a Node, type_: &str) -> Option<&'a NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

async fn containerd() -> Result<RuntimeServiceClient<tonic::transport::Channel>> {
    let channel = deckhand_proto::unix::connect_path(&Testbed::get().containerd_socket()).await?;
    Ok(RuntimeServiceClient::new(channel))
}

/// The Ready condition (status, reason, message) upstream derives from containerd's CRI Status.
async fn expected_ready() -> Result<(String, String, String)> {
    let status = containerd()
        .await?
        .status(StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("containerd returned no status"))?;
    let find = |t: &str| status.conditions.iter().find(|c| c.r#type == t).cloned();
    let runtime = find("RuntimeReady").ok_or_else(|| anyhow!("no RuntimeReady"))?;
    ensure!(
        runtime.status,
        "containerd's runtime is not ready: {runtime:?}"
    );
    let network = find("NetworkReady").ok_or_else(|| anyhow!("no NetworkReady"))?;
    Ok(if network.status {
        (
            "True".into(),
            "KubeletReady".into(),
            "kubelet is posting ready status".into(),
        )
    } else {
        (
            "False".into(),
            "KubeletNotReady".into(),
            format!(
                "container runtime network not ready: NetworkReady=false reason:{} message:{}",
                network.reason, network.message
            ),
        )
    })
}

fn ready_of(node: &Node) -> Option<(String, String, String)> {
    let c = condition(node, "Ready")?;
    Some((
        c.status.clone(),
        c.reason.clone().unwrap_or_default(),
        c.message.clone().unwrap_or_default(),
    ))
}

/// Waits until the node's Ready condition is what containerd's status implies, with `status`.
async fn wait_ready_matches_containerd(nodes: &Api<Node>, name: &str, status: &str) -> Result<()> {
    eventually(
        Duration::from_secs(20),
        &format!("node {name} Ready={status} as containerd reports"),
        || async {
            let want = expected_ready().await?;
            if want.0 != status {
                return Ok(Err(format!("containerd implies {want:?}")));
            }
            let node = nodes.get(name).await?;
            let have = ready_of(&node);
            Ok(if have.as_ref() == Some(&want) {
                Ok(())
            } else {
                Err(format!("node has {have:?}, want {want:?}"))
            })
        },
    )
    .await
}

fn quantity_of(node: &Node, list: &str, resource: &str) -> Result<i128> {
    let status = node.status.as_ref().ok_or_else(|| anyhow!("no status"))?;
    let map = match list {
        "capacity" => status.capacity.as_ref(),
        _ => status.allocatable.as_ref(),
    }
    .ok_or_else(|| anyhow!("no {list}"))?;
    let q = map
        .get(resource)
        .ok_or_else(|| anyhow!("{list} has no {resource}: {map:?}"))?;
    Ok(quantity::parse(&q.0)?.millis())
}

fn meminfo_bytes(key: &str) -> Result<i128> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .ok_or_else(|| anyhow!("no {key} in /proc/meminfo"))?;
    let kb: i128 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad meminfo line {line:?}"))?
        .parse()?;
    Ok(kb * 1024)
}

fn huge_pages_bytes() -> i128 {
    let Ok(entries) = std::fs::read_dir("/sys/kernel/mm/hugepages") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kb: i128 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let n: i128 = std::fs::read_to_string(e.path().join("nr_hugepages"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(kb * 1024 * n)
        })
        .sum()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn registers_the_node_with_labels_addresses_resources_and_node_info() -> Result<()> {
    let name = unique_name("node-register");
    let kubelet = Kubelet::start(
        &name,
        &format!(
            "{FAST}maxPods: 42\nport: 10350\nfailSwapOn: false\n\
             systemReserved: {{cpu: 100m, memory: 100Mi}}\nkubeReserved: {{memory: 50Mi}}\n\
             evictionHard: {{memory.available: 100Mi, nodefs.available: 10%}}\n\
             registerWithTaints: [{{key: deckhand.io/test, value: x, effect: NoSchedule}}]\n"
        ),
        &["--node-labels=example.com/role=test,node.kubernetes.io/pool=dh"],
        true,
    )?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client);
    let node = wait_node(&nodes, &name, Duration::from_secs(30)).await?;

    let labels = node.metadata.labels.clone().unwrap_or_default();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    for (k, v) in [
        ("kubernetes.io/hostname", name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", arch),
        ("example.com/role", "test"),
        ("node.kubernetes.io/pool", "dh"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("volumes.kubernetes.io/controller-managed-attach-detach")
            .map(String::as_str),
        Some("true")
    );
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|t| t.key == "deckhand.io/test" && t.effect == "NoSchedule"),
        "registerWithTaints: {taints:?}"
    );
    let managers: Vec<String> = node
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "deckhand-kubelet"),
        "user agent names the kubelet: {managers:?}"
    );

    let status = node.status.clone().unwrap_or_default();
    let addresses: Vec<(String, String)> = status
        .addresses
        .iter()
        .flatten()
        .map(|a| (a.type_.clone(), a.address.clone()))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_string(), "127.0.0.1".to_string()),
            ("Hostname".to_string(), name.clone())
        ]
    );

    // Capacity from the machine.
    let cpus = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as i128;
    assert_eq!(quantity_of(&node, "capacity", "cpu")?, cpus * 1000);
    let mem = meminfo_bytes("MemTotal")?;
    assert_eq!(quantity_of(&node, "capacity", "memory")?, mem * 1000);
    assert_eq!(quantity_of(&node, "capacity", "pods")?, 42_000);
    let root = kubelet.dir.path().join("root");
    let fs = nix::sys::statvfs::statvfs(&root)?;
    let disk = i128::from(fs.blocks()) * i128::from(fs.fragment_size());
    assert_eq!(
        quantity_of(&node, "capacity", "ephemeral-storage")?,
        disk * 1000
    );
    let capacity = status.capacity.clone().unwrap_or_default();
    assert!(
        capacity.keys().any(|k| k.starts_with("hugepages-"))
            || !Path::new("/sys/kernel/mm/hugepages").exists(),
        "huge page pools in capacity: {capacity:?}"
    );

    // Allocatable = capacity - systemReserved - kubeReserved - hard eviction (- huge pages).
    let mib = 1024 * 1024;
    assert_eq!(quantity_of(&node, "allocatable", "cpu")?, cpus * 1000 - 100);
    assert_eq!(
        quantity_of(&node, "allocatable", "memory")?,
        (mem - 100 * mib - 50 * mib - 100 * mib - huge_pages_bytes()) * 1000
    );
    let ten_percent = (disk as f64 * f64::from(10_f32 / 100.0)) as i128;
    assert_eq!(
        quantity_of(&node, "allocatable", "ephemeral-storage")?,
        (disk - ten_percent) * 1000
    );
    assert_eq!(quantity_of(&node, "allocatable", "pods")?, 42_000);

    // nodeInfo.
    let version = containerd()
        .await?
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    let info = status
        .node_info
        .clone()
        .ok_or_else(|| anyhow!("no nodeInfo"))?;
    assert_eq!(
        info.container_runtime_version,
        format!("{}://{}", version.runtime_name, version.runtime_version)
    );
    assert!(
        info.kubelet_version.starts_with("v1.20.2"),
        "{}",
        info.kubelet_version
    );
    assert_eq!(info.machine_id, read_trimmed("/etc/machine-id"));
    assert_eq!(
        info.boot_id,
        read_trimmed("/proc/sys/kernel/random/boot_id")
    );
    assert_eq!(
        info.kernel_version,
        read_trimmed("/proc/sys/kernel/osrelease")
    );
    assert_eq!(info.operating_system, "linux");
    assert_eq!(info.architecture, arch);
    let pretty = std::fs::read_to_string("/etc/os-release")?
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    assert_eq!(info.os_image, pretty);
    assert_eq!(
        status
            .daemon_endpoints
            .and_then(|d| d.kubelet_endpoint)
            .map(|e| e.port),
        Some(10350)
    );

    // Pressure conditions with upstream's reasons, consistent with their status.
    for (type_, yes, no) in [
        (
            "MemoryPressure",
            "KubeletHasInsufficientMemory",
            "KubeletHasSufficientMemory",
        ),
        (
            "DiskPressure",
            "KubeletHasDiskPressure",
            "KubeletHasNoDiskPressure",
        ),
        (
            "PIDPressure",
            "KubeletHasInsufficientPID",
            "KubeletHasSufficientPID",
        ),
    ] {
        let c = condition(&node, type_).ok_or_else(|| anyhow!("no {type_} condition"))?;
        let reason = c.reason.as_deref().unwrap_or_default();
        match c.status.as_str() {
            "True" => assert_eq!(reason, yes),
            "False" => assert_eq!(reason, no),
            s => panic!("{type_} has status {s}"),
        }
        assert!(c.last_heartbeat_time.is_some() && c.last_transition_time.is_some());
    }
    assert!(condition(&node, "Ready").is_some());

    // The controller-manager assigns a podCIDR; the kubelet hands it to the runtime.
    let cidr = eventually(Duration::from_secs(20), "podCIDR assigned", || async {
        Ok(nodes
            .get(&name)
            .await?
            .spec
            .and_then(|s| s.pod_cidr)
            .ok_or_else(|| "no podCIDR yet".to_string()))
    })
    .await?;
    eventually(
        Duration::from_secs(10),
        "pod CIDR handed to the runtime",
        || async {
            Ok(if kubelet.log().contains(&format!("pod_cidr={cidr}")) {
                Ok(())
            } else {
                Err("not in the log".to_string())
            })
        },
    )
    .await?;
    assert!(
        kubelet.log().contains("\"failSwapOn\" is not supported"),
        "unsupported fields are warned about"
    );
    Ok(())
}

/// Writes a reference CNI config into the test bed containerd's conf dir; removes it on drop.
struct CniConfig(PathBuf);

impl CniConfig {
    fn write(name: &str) -> Result<CniConfig> {
        let dir = Testbed::get().dir().join("containerd/cni/net.d");
        let others: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        ensure!(
            others.is_empty(),
            "{} already holds {others:?}: this test needs containerd without a CNI config",
            dir.display()
        );
        let bridge = format!("dh-kl{}", std::process::id() % 100_000);
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": name,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": false,
                "ipMasq": false,
                "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.199.0.0/24" }]] }
            }]
        });
        let path = dir.join(format!("10-{name}.conflist"));
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&conf)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(CniConfig(path))
    }
}

impl Drop for CniConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn ready_follows_the_runtime_network_status() -> Result<()> {
    let name = unique_name("node-ready");
    let _kubelet = Kubelet::start(&name, FAST, &[], true)?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client);
    wait_node(&nodes, &name, Duration::from_secs(30)).await?;

    // The test bed's containerd has no CNI config: NetworkReady=false, so the node is NotReady
    // with upstream's reason and message.
    wait_ready_matches_containerd(&nodes, &name, "False").await?;
    let node = nodes.get(&name).await?;
    let (_, reason, message) = ready_of(&node).ok_or_else(|| anyhow!("no Ready"))?;
    assert_eq!(reason, "KubeletNotReady");
    assert!(
        message.starts_with("container runtime network not ready: NetworkReady=false reason:"),
        "{message}"
    );
    let not_ready_since = condition(&node, "Ready").and_then(|c| c.last_transition_time.clone());

    // A loadable CNI config makes the network ready: Ready=True within the update period.
    let cni = CniConfig::write(&name)?;
    wait_ready_matches_containerd(&nodes, &name, "True").await?;
    let node = nodes.get(&name).await?;
    let ready_since = condition(&node, "Ready").and_then(|c| c.last_transition_time.clone());
    assert_ne!(ready_since, not_ready_since, "the transition time moved");

    // Removing it again turns the node NotReady again.
    drop(cni);
    wait_ready_matches_containerd(&nodes, &name, "False").await?;
    Ok(())
}

#[tokio::test]
async fn the_lease_is_owned_by_the_node_and_renewed() -> Result<()> {
    let name = unique_name("node-lease");
    let _kubelet = Kubelet::start(&name, FAST, &[], true)?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let node = wait_node(&nodes, &name, Duration::from_secs(30)).await?;
    let uid = node
        .metadata
        .uid
        .clone()
        .ok_or_else(|| anyhow!("node without uid"))?;

    let lease = eventually(
        Duration::from_secs(15),
        "lease owned by the node",
        || async {
            Ok(match leases.get_opt(&name).await? {
                Some(l)
                    if l.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.kind == "Node" && o.name == name && o.uid == uid) =>
                {
                    Ok(l)
                }
                Some(l) => Err(format!("owners {:?}", l.metadata.owner_references)),
                None => Err("no lease".to_string()),
            })
        },
    )
    .await?;
    let spec = lease
        .spec
        .clone()
        .ok_or_else(|| anyhow!("lease without spec"))?;
    assert_eq!(spec.holder_identity.as_deref(), Some(name.as_str()));
    assert_eq!(spec.lease_duration_seconds, Some(8));
    let first = spec.renew_time.ok_or_else(|| anyhow!("no renewTime"))?;

    // Renewed every 2 s (a quarter of 8 s).
    let mut last = first.clone();
    for _ in 0..2 {
        last = eventually(Duration::from_secs(6), "lease renewed", || {
            let leases = leases.clone();
            let name = name.clone();
            let last = last.clone();
            async move {
                let now = leases
                    .get(&name)
                    .await?
                    .spec
                    .and_then(|s| s.renew_time)
                    .ok_or_else(|| anyhow!("no renewTime"))?;
                Ok(if now.0 > last.0 {
                    Ok(now)
                } else {
                    Err(format!("still {:?}", now.0))
                })
            }
        })
        .await?;
    }
    assert!(last.0 > first.0);
    Ok(())
}

#[tokio::test]
async fn a_deleted_node_is_registered_again() -> Result<()> {
    let name = unique_name("node-reregister");
    let _kubelet = Kubelet::start(&name, FAST, &[], true)?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let node = wait_node(&nodes, &name, Duration::from_secs(30)).await?;
    let old_uid = node.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;

    nodes.delete(&name, &DeleteParams::default()).await?;
    let node = eventually(Duration::from_secs(20), "node registered again", || async {
        Ok(match nodes.get_opt(&name).await? {
            Some(n) if n.metadata.uid.as_deref() != Some(old_uid.as_str()) => Ok(n),
            Some(_) => Err("still the old node".to_string()),
            None => Err("no node".to_string()),
        })
    })
    .await?;
    let new_uid = node.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))?;
    assert_eq!(
        node.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/hostname"))
            .map(String::as_str),
        Some(name.as_str())
    );
    wait_node(&nodes, &name, Duration::from_secs(10)).await?;

    // The Lease follows the new Node (it is re-owned, or garbage-collected and re-created).
    eventually(
        Duration::from_secs(30),
        "lease owned by the new node",
        || async {
            Ok(match leases.get_opt(&name).await? {
                Some(l)
                    if l.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.uid == new_uid) =>
                {
                    Ok(())
                }
                Some(l) => Err(format!("owners {:?}", l.metadata.owner_references)),
                None => Err("no lease".to_string()),
            })
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_existing_node_is_reconciled_not_replaced() -> Result<()> {
    let name = unique_name("node-existing");
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client);
    let pre: Node = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "labels": { "kubernetes.io/hostname": "somewhere-else", "example.com/keep": "yes" }
        },
        // Nodes accept status on create: stale addresses, a huge page size that is gone and an
        // extended resource advertised by someone else.
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": "10.0.0.9" },
                { "type": "ExternalIP", "address": "192.0.2.99" }
            ],
            "capacity": { "example.com/dongle": "4", "hugepages-3Mi": "0" }
        }
    }))?;
    let created = nodes.create(&PostParams::default(), &pre).await?;
    // The guard deletes the Node even if the kubelet never starts.
    let kubelet = Kubelet::start(&name, FAST, &[], true)?;

    let node = eventually(
        Duration::from_secs(30),
        "existing node reconciled",
        || async {
            let n = nodes.get(&name).await?;
            let labels = n.metadata.labels.clone().unwrap_or_default();
            let has_status = n
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .is_some_and(|c| c.contains_key("cpu"));
            Ok(
                if labels.get("kubernetes.io/hostname") == Some(&name)
                    && labels.contains_key("kubernetes.io/arch")
                    && has_status
                {
                    Ok(n)
                } else {
                    Err(format!(
                        "labels {labels:?}, capacity reported: {has_status}"
                    ))
                },
            )
        },
    )
    .await?;
    assert_eq!(
        node.metadata.uid, created.metadata.uid,
        "the same Node object"
    );
    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("example.com/keep").map(String::as_str),
        Some("yes")
    );
    assert_eq!(
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("volumes.kubernetes.io/controller-managed-attach-detach"))
            .map(String::as_str),
        Some("true")
    );
    assert!(kubelet.log().contains("registered already"));

    // Addresses are replaced whole, the vanished huge page size is dropped, the extended
    // resource stays.
    let status = node.status.clone().unwrap_or_default();
    let addresses: Vec<(String, String)> = status
        .addresses
        .iter()
        .flatten()
        .map(|a| (a.type_.clone(), a.address.clone()))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_string(), "127.0.0.1".to_string()),
            ("Hostname".to_string(), name.clone())
        ]
    );
    let capacity = status.capacity.unwrap_or_default();
    assert!(!capacity.contains_key("hugepages-3Mi"), "{capacity:?}");
    assert_eq!(
        capacity.get("example.com/dongle").map(|q| q.0.as_str()),
        Some("4")
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_lease_renewal_and_leaves_the_node() -> Result<()> {
    let name = unique_name("node-sigterm");
    let mut kubelet = Kubelet::start(&name, FAST, &[], true)?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    wait_node(&nodes, &name, Duration::from_secs(30)).await?;
    let renew_time = || async {
        leases
            .get_opt(&name)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time)
            .ok_or_else(|| anyhow!("no lease renewTime"))
    };
    eventually(Duration::from_secs(15), "lease renewed once", || async {
        let first = renew_time().await?;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let second = renew_time().await?;
        Ok(if second.0 > first.0 {
            Ok(())
        } else {
            Err("not renewed".to_string())
        })
    })
    .await?;

    kubelet.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = kubelet.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status}");
    assert!(kubelet.log().contains("received SIGTERM"));

    let stopped_at = renew_time().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(renew_time().await?, stopped_at, "no renewal after SIGTERM");
    assert!(
        nodes.get_opt(&name).await?.is_some(),
        "the Node is left in place"
    );
    Ok(())
}

#[tokio::test]
async fn standalone_mode_runs_without_an_api_server() -> Result<()> {
    let name = unique_name("node-standalone");
    let mut kubelet = Kubelet::start(&name, "podCIDR: 10.198.0.0/24\n", &[], false)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(kubelet.running(), "exited:\n{}", kubelet.log());
    assert!(
        kubelet.log().contains("standalone mode"),
        "{}",
        kubelet.log()
    );
    kubelet.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = kubelet.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[tokio::test]
async fn an_invalid_configuration_stops_the_kubelet_at_start() -> Result<()> {
    for (config, expect) in [
        ("maxPods: lots\n", "maxPods"),
        ("systemReserved: {gpu: '1'}\n", "cannot reserve \"gpu\""),
    ] {
        let name = unique_name("node-badconfig");
        let mut kubelet = Kubelet::start(&name, config, &[], false)?;
        let status = kubelet.wait_exit(Duration::from_secs(10)).await?;
        assert!(!status.success(), "{config:?} was accepted");
        assert!(kubelet.log().contains(expect), "{}", kubelet.log());
    }
    let mut bad_labels = Kubelet::start(
        &unique_name("node-badlabels"),
        "",
        &["--node-labels=node-role.kubernetes.io/worker="],
        false,
    )?;
    let status = bad_labels.wait_exit(Duration::from_secs(10)).await?;
    assert!(!status.success());
    assert!(
        bad_labels.log().contains("kubernetes.io"),
        "{}",
        bad_labels.log()
    );
    Ok(())
}

#[tokio::test]
async fn status_is_posted_when_changed_or_due_not_every_update() -> Result<()> {
    let name = unique_name("node-report");
    // Computed every second, posted unchanged only every 8 s.
    let _kubelet = Kubelet::start(
        &name,
        "nodeStatusUpdateFrequency: 1s\nnodeStatusReportFrequency: 8s\n",
        &[],
        true,
    )?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client);
    wait_node(&nodes, &name, Duration::from_secs(30)).await?;
    let mut heartbeats = std::collections::BTreeSet::new();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        let node = nodes.get(&name).await?;
        if let Some(t) = condition(&node, "Ready").and_then(|c| c.last_heartbeat_time.clone()) {
            heartbeats.insert(t.0);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Posting every update would give ~10 heartbeats; reports plus a few real changes (another
    // test flips containerd's network readiness) stay well below.
    assert!(
        (2..=5).contains(&heartbeats.len()),
        "heartbeats in 10 s: {heartbeats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_runtime_is_reported_not_ready() -> Result<()> {
    let name = unique_name("node-noruntime");
    let dir = tempfile::tempdir()?;
    let missing = format!("unix://{}", dir.path().join("none.sock").display());
    // A repeated flag's last value wins, as upstream.
    let _kubelet = Kubelet::start(
        &name,
        FAST,
        &[&format!("--container-runtime-endpoint={missing}")],
        true,
    )?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client);
    let node = wait_node(&nodes, &name, Duration::from_secs(30)).await?;
    assert_eq!(
        ready_of(&node),
        Some((
            "False".to_string(),
            "KubeletNotReady".to_string(),
            "container runtime status check may not have completed yet".to_string()
        ))
    );
    assert!(
        quantity_of(&node, "capacity", "cpu")? > 0,
        "capacity without a runtime"
    );
    Ok(())
}

#[tokio::test]
async fn another_nodes_credentials_cannot_register_this_node() -> Result<()> {
    // The kubelet authenticates as system:node:<identity>: the Node authorizer and NodeRestriction
    // refuse it a Node of another name, as they would a real kubelet.
    let name = unique_name("node-impostor");
    let identity = unique_name("node-identity");
    let kubelet = Kubelet::start_as(&name, &identity, FAST, &[], true)?;
    eventually(Duration::from_secs(20), "registration refused", || async {
        Ok(if kubelet.log().contains("forbidden") {
            Ok(())
        } else {
            Err("no refusal logged yet".to_string())
        })
    })
    .await?;
    let client = Testbed::get().kube_client().await?;
    let nodes: Api<Node> = Api::all(client);
    assert!(nodes.get_opt(&name).await?.is_none(), "{}", kubelet.log());
    Ok(())
}
