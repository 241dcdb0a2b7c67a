//! The CRI RuntimeService of `deckhand-cri` on the built-in runtime, driven through the gRPC
//! client in the order crictl and the kubelet use: real namespaces, cgroups, overlayfs, CNI
//! (Deckhand's bridge, host-local and portmap plugins), the test bed's registry. Every pod gets a
//! `dh…` bridge and subnet of its own; everything is removed at the end, also on failure.

mod common;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use deckhand_proto::cri;
use deckhand_proto::cri::image_service_client::ImageServiceClient;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_tests::images::{BUSYBOX, HTTPD, HTTPD_INDEX_HTML};
use deckhand_tests::testbed::unique_name;
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

/// `target/debug`, where the workspace's binaries (the CNI plugins) are built.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target dir")
}

static SUBNET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A daemon with a CNI network of its own (bridge `dhbr…`, a /24 of 10.233/16), removed on
/// drop with everything the test created.
struct Node {
    dir: TempRoot,
    daemon: Option<Daemon>,
    bridge: String,
    subnet: String,
    extra: Vec<OsString>,
}

impl Node {
    fn new(tag: &str, cni: bool) -> Result<Node> {
        let dir = TempRoot::new(tag);
        let n = SUBNET.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + (std::process::id() % 50) * 4;
        let bridge = format!("dhbr{:x}{n}", std::process::id() % 0xfff);
        let subnet = format!("10.233.{}", n % 250);
        let conf = dir.path.join("net.d");
        std::fs::create_dir_all(&conf)?;
        let bins = bin_dir();
        ensure!(
            bins.join("deckhand-bridge").is_file(),
            "{} has no deckhand-bridge: build the CNI plugins first (cargo build -p deckhand-cni --bins)",
            bins.display()
        );
        if cni {
            let list = serde_json::json!({
                "cniVersion": "1.0.0",
                "name": format!("dh-{tag}"),
                "plugins": [
                    {"type": "deckhand-bridge", "bridge": bridge, "isGateway": true,
                     "ipam": {"type": "deckhand-host-local", "ranges": [[{"subnet": format!("{subnet}.0/24")}]],
                              "dataDir": dir.path.join("ipam")}},
                    {"type": "deckhand-portmap", "capabilities": {"portMappings": true}},
                ]
            });
            std::fs::write(conf.join("10-dh.conflist"), serde_json::to_vec(&list)?)?;
        }
        let extra: Vec<OsString> = vec![
            "--cni-conf-dir".into(),
            conf.into_os_string(),
            "--cni-bin-dir".into(),
            bins.into_os_string(),
        ];
        let daemon = Daemon::start_with(&dir.path, None, &extra)?;
        Ok(Node {
            dir,
            daemon: Some(daemon),
            bridge,
            subnet,
            extra,
        })
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon")
    }

    async fn clients(&self) -> Result<(Rt, ImageServiceClient<Channel>)> {
        let ch = deckhand_proto::unix::connect_path(&self.daemon().socket).await?;
        Ok((
            RuntimeServiceClient::new(ch.clone()),
            ImageServiceClient::new(ch),
        ))
    }

    /// kill -9 and start again on the same root and state.
    fn restart_hard(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        self.daemon = Some(Daemon::start_with(&self.dir.path, None, &self.extra)?);
        Ok(())
    }

    fn logs(&self) -> String {
        self.daemon.as_ref().map(|d| d.logs()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Remove every pod the daemon still has (best effort), then the daemon, the bridge
        // and the directory with its mounts.
        if let Some(d) = &self.daemon {
            let socket = d.socket.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async move {
                    let ch = deckhand_proto::unix::connect_path(&socket).await.ok()?;
                    let mut c = RuntimeServiceClient::new(ch);
                    let pods = c
                        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                        .await
                        .ok()?
                        .into_inner()
                        .items;
                    for p in pods {
                        let _ = c
                            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                                pod_sandbox_id: p.id,
                            })
                            .await;
                    }
                    Some(())
                })
            })
            .join();
        }
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        unmount_below(&self.dir.path);
    }
}

async fn pull(img: &mut ImageServiceClient<Channel>, image: &str) -> Result<String> {
    let r = img
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("pulling {image}"))?;
    Ok(r.into_inner().image_ref)
}

fn sandbox_config(name: &str, logs: &Path, cgroup_parent: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "dh-test".into(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: logs.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["127.0.0.53".into()],
            searches: vec!["dh.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            // As the kubelet sends them for a pod without shareProcessNamespace.
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

async fn run_container(
    rt: &mut Rt,
    pod: &str,
    sandbox: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> Result<String> {
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    Ok(id)
}

async fn status(rt: &mut Rt, id: &str) -> Result<cri::ContainerStatus> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.to_string(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .context("no status")
}

async fn wait_exited(rt: &mut Rt, id: &str, within: Duration) -> Result<cri::ContainerStatus> {
    let deadline = Instant::now() + within;
    loop {
        let s = status(rt, id).await?;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(s);
        }
        ensure!(
            Instant::now() < deadline,
            "container {id} did not exit: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exec(rt: &mut Rt, id: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await?
        .into_inner();
    Ok((
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    ))
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

async fn wait_log(p: &Path, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = read_log(p);
        if s.contains(needle) {
            return Ok(s);
        }
        ensure!(
            Instant::now() < deadline,
            "{needle:?} not in {}: {s:?}",
            p.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One streaming session against an Exec or Attach URL, as crictl runs it: `input` on stdin
/// (none: no stdin), stderr unless `tty`, an initial terminal size; (exit code, stdout, stderr).
async fn session(
    url: &str,
    input: Option<&[u8]>,
    tty: bool,
    size: Option<deckhand_streaming::TerminalSize>,
) -> Result<(i32, String, String)> {
    let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
    let (err_w, mut err_r) = tokio::io::duplex(1 << 16);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    if let Some(sz) = size {
        tx.send(sz).await?;
    }
    let st = deckhand_streaming::client::exec(
        url,
        deckhand_streaming::client::ExecOptions {
            stdin: input.map(|i| Box::new(std::io::Cursor::new(i.to_vec())) as Box<_>),
            stdout: Some(Box::new(out_w)),
            stderr: (!tty).then(|| Box::new(err_w) as Box<_>),
            tty,
            resize: size.map(|_| rx),
        },
    )
    .await?;
    let (mut out, mut err) = (String::new(), String::new());
    tokio::io::AsyncReadExt::read_to_string(&mut out_r, &mut out).await?;
    if !tty {
        tokio::io::AsyncReadExt::read_to_string(&mut err_r, &mut err).await?;
    }
    Ok((st.code, out, err))
}

/// An HTTP GET from the host to `addr` (a pod IP inside our own bridge's subnet).
async fn http_get(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(b"GET / HTTP/1.0\r\nHost: dh\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .context("read timed out")??;
    Ok(out)
}

#[tokio::test]
async fn pods_and_containers_end_to_end() -> Result<()> {
    init_logs();
    let (tb, _) = testbed();
    let node = Node::new("rt-e2e", true)?;
    let (mut rt, mut img) = node.clients().await?;
    let res = async {
        let busybox = format!("{}/{BUSYBOX}", tb.registry());
        let httpd = format!("{}/{HTTPD}", tb.registry());
        pull(&mut img, &busybox).await?;
        pull(&mut img, &httpd).await?;

        let v = rt.version(cri::VersionRequest::default()).await?.into_inner();
        assert_eq!(v.runtime_name, "deckhand");
        assert_eq!(v.runtime_api_version, "v1");
        let st = rt.status(cri::StatusRequest::default()).await?.into_inner();
        let conds = st.status.context("status")?.conditions;
        assert!(conds.iter().all(|c| c.status), "{conds:?}");

        let mut events = rt
            .get_container_events(cri::GetEventsRequest {})
            .await?
            .into_inner();

        let logs = node.dir.path.join("pods").join("p1");
        let cg = format!("/{}", unique_name("dh-pod"));
        let mut sb = sandbox_config("dh-p1", &logs, &cg);
        let host_port = 31000 + (std::process::id() % 2000) as i32;
        sb.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port,
            host_ip: String::new(),
        }];
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sb.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let pst = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            })
            .await?
            .into_inner();
        let pstatus = pst.status.context("sandbox status")?;
        assert_eq!(pstatus.state, cri::PodSandboxState::SandboxReady as i32);
        let ip = pstatus.network.context("network")?.ip;
        assert!(ip.starts_with(&format!("{}.", node.subnet)), "pod IP {ip}");

        // A web server and a shell in one pod: they share localhost and the pod's IP.
        let web = run_container(&mut rt, &pod, &sb, container_config("web", &httpd, &[])).await?;
        let mut shell_cfg = container_config(
            "shell",
            &busybox,
            &[
                "sh",
                "-c",
                "echo hello; echo oops >&2; head -c 20000 /dev/zero | tr '\\0' a; echo; printf partial; exec sleep 1000",
            ],
        );
        shell_cfg.envs = vec![cri::KeyValue {
            key: "DH_VAR".into(),
            value: "dh-value".into(),
        }];
        let shell = run_container(&mut rt, &pod, &sb, shell_cfg).await?;
        let st = status(&mut rt, &shell).await?;
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
        assert!(st.started_at > 0);

        // The CRI log: timestamps, streams, full lines, long lines split at 16 KiB.
        let shell_log = logs.join("shell/0.log");
        let log = wait_log(&shell_log, "stderr F oops").await?;
        let log = if log.contains(" stdout F aaa") { log } else { wait_log(&shell_log, " stdout F aaa").await? };
        let lines: Vec<&str> = log.lines().collect();
        assert!(lines.iter().any(|l| l.ends_with(" stdout F hello")), "{log}");
        assert!(lines.iter().any(|l| l.ends_with(" stderr F oops")), "{log}");
        let long: Vec<&str> = lines.iter().filter(|l| l.contains(" stdout ") && l.ends_with("aaaa")).copied().collect();
        assert_eq!(long.len(), 2, "{long:?}");
        assert!(long[0].contains(" stdout P ") && long[0].ends_with(&"a".repeat(16384)), "16 KiB partial record");
        assert!(long[1].contains(&format!(" stdout F {}", "a".repeat(20000 - 16384))), "the rest");

        // Exec: hostname, environment, DNS, the pod's IP on eth0, localhost to the web server.
        let (code, out, _) = exec(&mut rt, &shell, &["hostname"]).await?;
        assert_eq!((code, out.trim()), (0, "dh-p1"));
        let (_, out, _) = exec(&mut rt, &shell, &["sh", "-c", "echo $DH_VAR $HOSTNAME"]).await?;
        assert_eq!(out.trim(), "dh-value dh-p1");
        let (_, out, _) = exec(&mut rt, &shell, &["cat", "/etc/resolv.conf"]).await?;
        assert!(out.contains("nameserver 127.0.0.53") && out.contains("ndots:5"), "{out}");
        let (_, out, _) = exec(&mut rt, &shell, &["ip", "-4", "addr", "show", "eth0"]).await?;
        assert!(out.contains(&format!("inet {ip}/")), "{out}");
        let (code, out, err) = exec(&mut rt, &shell, &["wget", "-qO-", "http://127.0.0.1:8080/"]).await?;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, HTTPD_INDEX_HTML);
        let (code, _, _) = exec(&mut rt, &shell, &["sh", "-c", "exit 7"]).await?;
        assert_eq!(code, 7);
        // The pid namespace is the container's own.
        let (_, out, _) = exec(&mut rt, &shell, &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"]).await?;
        assert!(out.starts_with("sleep 1000"), "{out}");
        // ExecSync with a timeout.
        let err = rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: shell.clone(),
                cmd: vec!["sleep".into(), "30".into()],
                timeout: 1,
            })
            .await
            .expect_err("timeout");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");

        // Exec and PortForward through the streaming server, as crictl does.
        let url = rt
            .exec(cri::ExecRequest {
                container_id: shell.clone(),
                cmd: vec!["sh".into(), "-c".into(), "read x; echo got $x; echo to-err >&2; exit 4".into()],
                tty: false,
                stdin: true,
                stdout: true,
                stderr: true,
            })
            .await?
            .into_inner()
            .url;
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let (code, out, err) = session(&url, Some(b"dh-input\n"), false, None).await?;
        assert_eq!(code, 4);
        assert_eq!((out.as_str(), err.as_str()), ("got dh-input\n", "to-err\n"));
        // With a terminal: the size the client sets is the terminal's.
        let url = rt
            .exec(cri::ExecRequest {
                container_id: shell.clone(),
                cmd: vec!["sh".into(), "-c".into(), "sleep 0.5; stty size; tty".into()],
                tty: true,
                stdin: false,
                stdout: true,
                stderr: false,
            })
            .await?
            .into_inner()
            .url;
        let size = deckhand_streaming::TerminalSize { width: 123, height: 45 };
        let (code, out, _) = session(&url, None, true, Some(size)).await?;
        assert_eq!(code, 0);
        assert!(out.contains("45 123") && out.contains("/dev/pts/"), "{out:?}");
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await?
            .into_inner()
            .url;
        let mut s = deckhand_streaming::client::port_forward(&url, 8080).await?;
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.0\r\nHost: dh\r\n\r\n").await?;
        let mut page = String::new();
        tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_string(&mut s, &mut page)).await??;
        assert!(page.ends_with(HTTPD_INDEX_HTML), "{page}");

        // Attach, as crictl attach: a container reading its stdin, then one with a terminal.
        let mut talk_cfg = container_config("talk", &busybox, &["sh", "-c", "read x; echo heard $x; echo to-err >&2"]);
        talk_cfg.stdin = true;
        talk_cfg.stdin_once = true;
        let talk = run_container(&mut rt, &pod, &sb, talk_cfg).await?;
        let url = rt
            .attach(cri::AttachRequest {
                container_id: talk.clone(),
                stdin: true,
                tty: false,
                stdout: true,
                stderr: true,
            })
            .await?
            .into_inner()
            .url;
        let (_, out, err) = session(&url, Some(b"dh-words\n"), false, None).await?;
        assert_eq!((out.as_str(), err.as_str()), ("heard dh-words\n", "to-err\n"));
        let st = wait_exited(&mut rt, &talk, Duration::from_secs(10)).await?;
        assert_eq!(st.exit_code, 0);
        let mut tty_cfg = container_config("term", &busybox, &["sh"]);
        tty_cfg.stdin = true;
        tty_cfg.tty = true;
        let term = run_container(&mut rt, &pod, &sb, tty_cfg).await?;
        let url = rt
            .attach(cri::AttachRequest {
                container_id: term.clone(),
                stdin: true,
                tty: true,
                stdout: true,
                stderr: false,
            })
            .await?
            .into_inner()
            .url;
        let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(deckhand_streaming::TerminalSize { width: 101, height: 31 }).await?;
        let (mut in_w, in_r) = tokio::io::duplex(1 << 12);
        let session = tokio::spawn(async move {
            deckhand_streaming::client::attach(
                &url,
                deckhand_streaming::client::ExecOptions {
                    stdin: Some(Box::new(in_r)),
                    stdout: Some(Box::new(out_w)),
                    stderr: None,
                    tty: true,
                    resize: Some(rx),
                },
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::io::AsyncWriteExt::write_all(&mut in_w, b"echo dh$((6*7)); stty size; exit\n").await?;
        tokio::time::timeout(Duration::from_secs(10), session).await???;
        drop((tx, in_w));
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut out_r, &mut out).await?;
        assert!(out.contains("dh42") && out.contains("31 101"), "{out:?}");
        let st = wait_exited(&mut rt, &term, Duration::from_secs(10)).await?;
        assert_eq!(st.exit_code, 0);
        let log = read_log(&logs.join("term/0.log"));
        assert!(log.contains("dh42"), "the terminal's output is logged too: {log}");

        // The node reaches the pod on its IP, and on the host port from 127.0.0.1.
        let page = http_get(&format!("{ip}:8080")).await?;
        assert!(page.ends_with(HTTPD_INDEX_HTML), "{page}");
        let page = http_get(&format!("127.0.0.1:{host_port}")).await?;
        assert!(page.ends_with(HTTPD_INDEX_HTML), "hostPort: {page}");

        // Pod to pod on the bridge: a second pod fetches the first one's page.
        let sb2 = sandbox_config("dh-p1b", &logs, &cg);
        let pod2 = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sb2.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let client = run_container(&mut rt, &pod2, &sb2, container_config("client", &busybox, &["sleep", "1000"])).await?;
        let (code, out, err) = exec(&mut rt, &client, &["wget", "-qO-", &format!("http://{ip}:8080/")]).await?;
        assert_eq!((code, out.as_str()), (0, HTTPD_INDEX_HTML), "{err}");
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod2.clone(),
        })
        .await?;

        // The container runs in its cgroup below the pod's cgroup parent.
        let (_, out, _) = exec(&mut rt, &shell, &["cat", "/proc/self/cgroup"]).await?;
        assert!(!out.is_empty());
        let info = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: shell.clone(),
                verbose: true,
            })
            .await?
            .into_inner()
            .info;
        let info: serde_json::Value = serde_json::from_str(info.get("info").context("info")?)?;
        let pid = info["pid"].as_i64().context("pid")?;
        let host_cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        assert!(host_cg.contains(&format!("{cg}/{shell}")), "{host_cg}");

        // Lists and filters.
        let list = rt
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod.clone(),
                    label_selector: HashMap::from([("container".into(), "web".into())]),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        assert_eq!(list.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [web.as_str()]);
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items;
        assert!(pods.iter().any(|p| p.id == pod));

        // Stats.
        let stats = rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: shell.clone(),
            })
            .await?
            .into_inner()
            .stats
            .context("stats")?;
        assert!(stats.memory.and_then(|m| m.working_set_bytes).is_some_and(|v| v.value > 0));
        let ps = rt
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await?
            .into_inner()
            .stats
            .context("pod stats")?;
        let linux = ps.linux.context("linux")?;
        assert_eq!(linux.containers.len(), 2);
        assert!(linux.network.is_some_and(|n| n.default_interface.is_some_and(|i| i.rx_bytes.is_some_and(|b| b.value > 0))));

        // Exit codes and reasons.
        let fail = run_container(&mut rt, &pod, &sb, container_config("fail", &busybox, &["sh", "-c", "exit 3"])).await?;
        let st = wait_exited(&mut rt, &fail, Duration::from_secs(10)).await?;
        assert_eq!((st.exit_code, st.reason.as_str()), (3, "Error"));
        assert!(st.finished_at >= st.started_at);
        let done = run_container(&mut rt, &pod, &sb, container_config("done", &busybox, &["true"])).await?;
        let st = wait_exited(&mut rt, &done, Duration::from_secs(10)).await?;
        assert_eq!((st.exit_code, st.reason.as_str()), (0, "Completed"));

        // OOM: a process over its memory limit is killed and reported so.
        let mut oom_cfg = container_config("oom", &busybox, &["sh", "-c", "head -c 200m /dev/zero | tail"]);
        oom_cfg.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 32 << 20,
                memory_swap_limit_in_bytes: 32 << 20,
                ..Default::default()
            }),
            security_context: None,
        });
        let oom = run_container(&mut rt, &pod, &sb, oom_cfg).await?;
        let st = wait_exited(&mut rt, &oom, Duration::from_secs(30)).await?;
        assert_eq!(st.reason, "OOMKilled", "{st:?}");

        // A name is reserved while its container exists.
        let dup = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("done", &busybox, &["true"])),
                sandbox_config: Some(sb.clone()),
            })
            .await
            .expect_err("duplicate name");
        assert_eq!(dup.code(), tonic::Code::AlreadyExists);

        // Stop with a grace period: SIGTERM ends the shell's sleep (pid 1 ignores it unless
        // handled: busybox sleep as pid 1 has no handler, so it takes the SIGKILL after 1 s).
        let t0 = Instant::now();
        rt.stop_container(cri::StopContainerRequest {
            container_id: shell.clone(),
            timeout: 1,
        })
        .await?;
        assert!(t0.elapsed() >= Duration::from_millis(900));
        let st = status(&mut rt, &shell).await?;
        assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!(st.exit_code, 137, "{st:?}");
        // The unfinished line is logged, as a partial record, once the stream ends.
        let log = wait_log(&shell_log, " stdout P partial").await?;
        assert!(log.lines().last().is_some_and(|l| l.ends_with(" stdout P partial")), "{log}");
        // Stop is idempotent.
        rt.stop_container(cri::StopContainerRequest {
            container_id: shell.clone(),
            timeout: 1,
        })
        .await?;

        // Events came for the shell: created, started, stopped.
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && seen.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(1), events.message()).await {
                Ok(Ok(Some(e))) if e.container_id == shell => seen.push(e.container_event_type),
                Ok(Ok(Some(_))) => {}
                _ => {}
            }
        }
        assert_eq!(
            seen,
            [
                cri::ContainerEventType::ContainerCreatedEvent as i32,
                cri::ContainerEventType::ContainerStartedEvent as i32,
                cri::ContainerEventType::ContainerStoppedEvent as i32
            ]
        );

        // Stop and remove the pod: containers gone, network released, idempotent.
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        let pstatus = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("status")?;
        assert_eq!(pstatus.state, cri::PodSandboxState::SandboxNotready as i32);
        assert!(http_get(&format!("{ip}:8080")).await.is_err(), "the pod still answers");
        assert!(
            http_get(&format!("127.0.0.1:{host_port}")).await.is_err(),
            "the host port still forwards"
        );
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        let left = rt
            .list_containers(cri::ListContainersRequest::default())
            .await?
            .into_inner()
            .containers;
        assert!(left.is_empty(), "{left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        assert!(
            !mounts.contains(&pod) && !mounts.contains(&web),
            "mounts of the removed pod remain"
        );
        assert!(
            !Path::new("/sys/fs/cgroup/memory").join(cg.trim_start_matches('/')).exists(),
            "the pod cgroup we created remains"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if res.is_err() {
        eprintln!("daemon log:\n{}", node.logs());
    }
    res
}

#[tokio::test]
async fn restart_keeps_containers_running() -> Result<()> {
    init_logs();
    let (tb, _) = testbed();
    let mut node = Node::new("rt-restart", true)?;
    let res = async {
        let (mut rt, mut img) = node.clients().await?;
        let busybox = format!("{}/{BUSYBOX}", tb.registry());
        pull(&mut img, &busybox).await?;
        let logs = node.dir.path.join("pods").join("p2");
        let sb = sandbox_config("dh-p2", &logs, "");
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sb.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let ticker = run_container(
            &mut rt,
            &pod,
            &sb,
            container_config(
                "ticker",
                &busybox,
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done",
                ],
            ),
        )
        .await?;
        let quick = run_container(
            &mut rt,
            &pod,
            &sb,
            container_config("quick", &busybox, &["sh", "-c", "sleep 1; exit 5"]),
        )
        .await?;
        let before = status(&mut rt, &ticker).await?;
        let log = logs.join("ticker/0.log");
        wait_log(&log, "tick 3").await?;

        // kill -9 the daemon while the containers run; one exits while it is down.
        drop((rt, img));
        if let Some(mut d) = node.daemon.take() {
            d.kill();
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        node.daemon = Some(Daemon::start_with(&node.dir.path, None, &node.extra)?);
        let (mut rt, _img) = node.clients().await?;

        let after = status(&mut rt, &ticker).await?;
        assert_eq!(
            after.state,
            cri::ContainerState::ContainerRunning as i32,
            "{after:?}"
        );
        assert_eq!(after.started_at, before.started_at);
        let q = wait_exited(&mut rt, &quick, Duration::from_secs(5)).await?;
        assert_eq!(
            q.exit_code, 5,
            "exit code recorded while the daemon was down"
        );
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items;
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
        // Logs go on.
        let n = read_log(&log).lines().count();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(read_log(&log).lines().count() > n, "logs stopped");
        // Still managed: exec works, and a stop records the exit.
        let (code, _, _) = exec(&mut rt, &ticker, &["true"]).await?;
        assert_eq!(code, 0);
        rt.stop_container(cri::StopContainerRequest {
            container_id: ticker.clone(),
            timeout: 0,
        })
        .await?;
        let st = status(&mut rt, &ticker).await?;
        assert_eq!(
            (st.state, st.exit_code),
            (cri::ContainerState::ContainerExited as i32, 137)
        );

        // A second hard restart with everything stopped, then removal.
        node.restart_hard()?;
        let (mut rt, _img) = node.clients().await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items;
        assert!(pods.is_empty());
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if res.is_err() {
        eprintln!("daemon log:\n{}", node.logs());
    }
    res
}

#[tokio::test]
async fn failures_leave_nothing_behind() -> Result<()> {
    init_logs();
    let (tb, _) = testbed();
    let node = Node::new("rt-fail", false)?;
    let res = async {
        let (mut rt, mut img) = node.clients().await?;
        let busybox = format!("{}/{BUSYBOX}", tb.registry());
        pull(&mut img, &busybox).await?;

        // No CNI configuration: NetworkReady is false and a pod network cannot be set up.
        let st = rt.status(cri::StatusRequest::default()).await?.into_inner();
        let net = st
            .status
            .context("status")?
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .context("NetworkReady")?;
        assert!(!net.status);
        assert_eq!(net.reason, "NetworkPluginNotReady");
        let logs = node.dir.path.join("pods").join("p3");
        let sb = sandbox_config("dh-p3", &logs, "");
        let err = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sb.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect_err("no network");
        assert!(err.message().contains("cni config uninitialized"), "{err}");
        let state = node.dir.path.join("state").join("sandboxes");
        let left: Vec<_> = std::fs::read_dir(&state)?.collect();
        assert!(left.is_empty(), "sandbox state left: {left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        assert!(
            !mounts.contains(&node.dir.path.display().to_string()),
            "mounts left"
        );

        // Bad input is refused with InvalidArgument and creates nothing.
        let err = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cri::PodSandboxConfig::default()),
                runtime_handler: String::new(),
            })
            .await
            .expect_err("no metadata");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let mut bad_sysctl = sb.clone();
        if let Some(l) = bad_sysctl.linux.as_mut() {
            l.sysctls.insert("vm.swappiness".into(), "0".into());
            l.security_context = Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let err = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(bad_sysctl),
                runtime_handler: String::new(),
            })
            .await
            .expect_err("node-wide sysctl");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

        // A host-network pod needs no CNI; its containers see the host's interfaces.
        let mut hsb = sb.clone();
        if let Some(l) = hsb.linux.as_mut() {
            l.security_context = Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(hsb.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let mut bad = container_config("bad", &busybox, &["true"]);
        bad.working_dir = "relative".into();
        let err = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(bad),
                sandbox_config: Some(hsb.clone()),
            })
            .await
            .expect_err("relative working dir");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("nope", "dh/not-pulled:1", &["true"])),
                sandbox_config: Some(hsb.clone()),
            })
            .await
            .expect_err("image not pulled");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        let bundles: Vec<_> =
            std::fs::read_dir(node.dir.path.join("state").join("containers"))?.collect();
        assert!(bundles.is_empty(), "bundles left: {bundles:?}");

        // A command that does not exist: StartContainer fails, the status says why.
        let missing = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("missing", &busybox, &["/no/such/binary"])),
                sandbox_config: Some(hsb.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        let err = rt
            .start_container(cri::StartContainerRequest {
                container_id: missing.clone(),
            })
            .await
            .expect_err("start of a missing binary");
        assert!(err.message().contains("/no/such/binary"), "{err}");
        let st = status(&mut rt, &missing).await?;
        assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!(st.reason, "StartError");

        // Shared PID namespace: two containers see each other's processes.
        let a = run_container(
            &mut rt,
            &pod,
            &hsb,
            container_config("a", &busybox, &["sleep", "1001"]),
        )
        .await?;
        let b = run_container(
            &mut rt,
            &pod,
            &hsb,
            container_config("b", &busybox, &["sleep", "1002"]),
        )
        .await?;
        let (_, out, _) = exec(&mut rt, &b, &["ps"]).await?;
        assert!(
            out.contains("sleep 1001") && out.contains("sleep 1002"),
            "{out}"
        );
        let (_, out, _) = exec(&mut rt, &a, &["hostname"]).await?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
        assert_eq!(
            out.trim(),
            host.trim(),
            "host network means the host's UTS namespace"
        );
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        let procs = std::process::Command::new("pgrep")
            .args(["-f", "sleep 100[12]"])
            .output()?;
        assert!(
            procs.stdout.is_empty(),
            "containers survived their pod: {}",
            String::from_utf8_lossy(&procs.stdout)
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if res.is_err() {
        eprintln!("daemon log:\n{}", node.logs());
    }
    res
}

/// A container that keeps failing, created again for every attempt as the kubelet does: each
/// attempt's exit code, reason, timestamps and log; the dead attempts removed as the kubelet's
/// garbage collection does; nothing of them left.
#[tokio::test]
async fn crash_looping_container_reports_every_exit() -> Result<()> {
    init_logs();
    let (tb, _) = testbed();
    let node = Node::new("rt-crash", true)?;
    let res = async {
        let (mut rt, mut img) = node.clients().await?;
        let busybox = format!("{}/{BUSYBOX}", tb.registry());
        pull(&mut img, &busybox).await?;
        let logs = node.dir.path.join("pods").join("p5");
        let sb = sandbox_config("dh-p5", &logs, "");
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(sb.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let mut previous: Option<String> = None;
        for attempt in 0..5u32 {
            let mut c = container_config(
                "crasher",
                &busybox,
                &["sh", "-c", "echo attempt $A; exit $((10 + A))"],
            );
            c.metadata = Some(cri::ContainerMetadata {
                name: "crasher".into(),
                attempt,
            });
            c.envs = vec![cri::KeyValue {
                key: "A".into(),
                value: attempt.to_string(),
            }];
            c.log_path = format!("crasher/{attempt}.log");
            let id = run_container(&mut rt, &pod, &sb, c.clone()).await?;
            let st = wait_exited(&mut rt, &id, Duration::from_secs(20)).await?;
            assert_eq!(st.exit_code, 10 + attempt as i32, "{st:?}");
            assert_eq!(st.reason, "Error", "{st:?}");
            assert!(
                st.finished_at >= st.started_at && st.started_at > 0,
                "{st:?}"
            );
            let log = read_log(&logs.join(format!("crasher/{attempt}.log")));
            assert!(
                log.contains(&format!("stdout F attempt {attempt}")),
                "{log}"
            );
            // The same name and attempt is refused while that container exists.
            let dup = rt
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(c),
                    sandbox_config: Some(sb.clone()),
                })
                .await;
            assert!(dup.is_err(), "a second container with one name and attempt");
            // The kubelet keeps the last dead attempt and removes the one before.
            if let Some(old) = previous.replace(id) {
                rt.remove_container(cri::RemoveContainerRequest { container_id: old })
                    .await?;
            }
        }
        let left = rt
            .list_containers(cri::ListContainersRequest::default())
            .await?
            .into_inner()
            .containers;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].metadata.as_ref().map(|m| m.attempt), Some(4));
        assert_eq!(left[0].state, cri::ContainerState::ContainerExited as i32);
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
        let left = rt
            .list_containers(cri::ListContainersRequest::default())
            .await?
            .into_inner()
            .containers;
        assert!(left.is_empty(), "{left:?}");
        let monitors = std::process::Command::new("pgrep")
            .args(["-f", &node.dir.path.display().to_string()])
            .output()?;
        let pids = String::from_utf8_lossy(&monitors.stdout).into_owned();
        let own = std::process::id().to_string();
        let daemon = node.daemon().child.id().to_string();
        let others: Vec<&str> = pids
            .split_whitespace()
            .filter(|p| *p != own && *p != daemon)
            .collect();
        assert!(
            others.is_empty(),
            "processes of the removed pod remain: {others:?}"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if res.is_err() {
        eprintln!("daemon log:\n{}", node.logs());
    }
    res
}

/// `kill -9` of the daemon while six pods are being started at once. After the restart every
/// sandbox is either ready, with its network, or not ready; the kubelet's way out (stop and
/// remove what is not ready, create what is missing, start what was created) gives six running
/// pods on six distinct addresses; removing them all releases every address, so nothing was
/// attached twice and nothing leaked.
#[tokio::test]
async fn restart_under_load_converges() -> Result<()> {
    const PODS: usize = 6;
    init_logs();
    let (tb, _) = testbed();
    let mut node = Node::new("rt-load", true)?;
    let res = async {
        let (_, mut img) = node.clients().await?;
        let busybox = format!("{}/{BUSYBOX}", tb.registry());
        pull(&mut img, &busybox).await?;
        let logs = node.dir.path.join("pods");
        let sandbox = |i: usize, attempt: u32| {
            let mut sb = sandbox_config(&format!("dh-load{i}"), &logs.join(format!("l{i}")), "");
            if let Some(m) = sb.metadata.as_mut() {
                m.attempt = attempt;
            }
            sb
        };
        let sleeper = || container_config("sleeper", &busybox, &["sleep", "300"]);

        // Round one: all at once; the daemon dies in the middle.
        let mut tasks = Vec::new();
        for i in 0..PODS {
            let socket = node.daemon().socket.clone();
            let (sb, c) = (sandbox(i, 0), sleeper());
            tasks.push(tokio::spawn(async move {
                let ch = deckhand_proto::unix::connect_path(&socket).await?;
                let mut rt = RuntimeServiceClient::new(ch);
                let pod = rt
                    .run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(sb.clone()),
                        runtime_handler: String::new(),
                    })
                    .await?
                    .into_inner()
                    .pod_sandbox_id;
                run_container(&mut rt, &pod, &sb, c).await?;
                Ok::<(), anyhow::Error>(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        node.restart_hard()?;
        let mut interrupted = 0;
        for t in tasks {
            if t.await?.is_err() {
                interrupted += 1;
            }
        }
        eprintln!("{interrupted} of {PODS} pods interrupted by the restart");
        let (mut rt, _img) = node.clients().await?;

        // Every sandbox is consistent: ready ones have their address.
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items;
        let mut ready = HashMap::new();
        for p in &pods {
            let st = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: p.id.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("status")?;
            let name = p
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            if st.state == cri::PodSandboxState::SandboxReady as i32 {
                let ip = st.network.map(|n| n.ip).unwrap_or_default();
                assert!(!ip.is_empty(), "ready sandbox {} without an address", p.id);
                ready.insert(name, p.id.clone());
            } else {
                rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await?;
                rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await?;
            }
        }

        // Round two, one pod at a time as each pod's worker would.
        let mut ips = std::collections::HashSet::new();
        for i in 0..PODS {
            let name = format!("dh-load{i}");
            let sb = match ready.get(&name) {
                Some(_) => sandbox(i, 0),
                None => sandbox(i, 1),
            };
            let pod = match ready.get(&name) {
                Some(id) => id.clone(),
                None => {
                    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(sb.clone()),
                        runtime_handler: String::new(),
                    })
                    .await?
                    .into_inner()
                    .pod_sandbox_id
                }
            };
            let ctrs = rt
                .list_containers(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        pod_sandbox_id: pod.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner()
                .containers;
            let mut running = None;
            for c in &ctrs {
                let started = c.state == cri::ContainerState::ContainerRunning as i32
                    || (c.state == cri::ContainerState::ContainerCreated as i32
                        && rt
                            .start_container(cri::StartContainerRequest {
                                container_id: c.id.clone(),
                            })
                            .await
                            .is_ok());
                if started && running.is_none() {
                    running = Some(c.id.clone());
                } else {
                    rt.remove_container(cri::RemoveContainerRequest {
                        container_id: c.id.clone(),
                    })
                    .await?;
                }
            }
            let ctr = match running {
                Some(id) => id,
                None => {
                    let mut c = sleeper();
                    c.metadata = Some(cri::ContainerMetadata {
                        name: "sleeper".into(),
                        attempt: 1,
                    });
                    run_container(&mut rt, &pod, &sb, c).await?
                }
            };
            assert_eq!(
                status(&mut rt, &ctr).await?.state,
                cri::ContainerState::ContainerRunning as i32
            );
            let (code, _, _) = exec(&mut rt, &ctr, &["true"]).await?;
            assert_eq!(code, 0);
            let ip = rt
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap_or_default();
            assert!(ips.insert(ip.clone()), "address {ip} given twice");
        }
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await?
            .into_inner()
            .items;
        assert_eq!(pods.len(), PODS, "{pods:?}");

        // Removing everything frees every address.
        for p in pods {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            })
            .await?;
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: p.id,
            })
            .await?;
        }
        let ipam = node.dir.path.join("ipam").join("dh-rt-load");
        let reserved: Vec<String> = std::fs::read_dir(&ipam)
            .with_context(|| format!("{}", ipam.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        assert!(
            reserved.is_empty(),
            "addresses still reserved: {reserved:?}"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if res.is_err() {
        eprintln!("daemon log:\n{}", node.logs());
    }
    res
}
