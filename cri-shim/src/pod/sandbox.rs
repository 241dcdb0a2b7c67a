//! Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus and
//! ListPodSandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use deckhand_proto::cri;
use nix::mount::MsFlags;

use super::namespaces::{self, Pins};
use super::network::{Attachment, Network};
use super::{Error, Manager, Result, Sandbox, SandboxRecord, new_id, now_ns, poisoned};
use crate::oci::cgroups;

const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff00::1\tip6-allnodes\nff00::2\tip6-allrouters\n";

/// The namespace modes of a sandbox config: (network, pid, ipc) as the CRI's enum.
pub(crate) fn ns_modes(
    c: &cri::PodSandboxConfig,
) -> (cri::NamespaceMode, cri::NamespaceMode, cri::NamespaceMode) {
    let o = c
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let m = |v: i32| cri::NamespaceMode::try_from(v).unwrap_or(cri::NamespaceMode::Pod);
    (m(o.network), m(o.pid), m(o.ipc))
}

/// `resolv.conf` from the CRI's DNSConfig, or `None` to use the host's.
pub(crate) fn resolv_conf(dns: Option<&cri::DnsConfig>) -> Option<String> {
    let d = dns?;
    if d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty() {
        return None;
    }
    let mut s = String::new();
    if !d.searches.is_empty() {
        s.push_str(&format!("search {}\n", d.searches.join(" ")));
    }
    for n in &d.servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !d.options.is_empty() {
        s.push_str(&format!("options {}\n", d.options.join(" ")));
    }
    Some(s)
}

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn write(p: &Path, data: &str) -> Result<()> {
    std::fs::write(p, data).map_err(|e| Error::internal(format!("writing {}", p.display()), e))
}

impl Manager {
    pub(crate) fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("sandboxes").join(id)
    }

    pub(crate) fn network(&self) -> Network {
        Network::new(&self.cfg)
    }

    /// RunPodSandbox.
    pub async fn run_pod_sandbox(
        self: &Arc<Self>,
        config: cri::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| Error::InvalidArgument("sandbox config has no metadata".into()))?;
        if md.name.is_empty() || md.namespace.is_empty() {
            return Err(Error::InvalidArgument(
                "sandbox metadata needs a name and a namespace".into(),
            ));
        }
        if !matches!(runtime_handler, "" | "deckhand" | "runc") {
            return Err(Error::InvalidArgument(format!(
                "unknown runtime handler {runtime_handler:?}"
            )));
        }
        let (net_mode, pid_mode, ipc_mode) = ns_modes(&config);
        let host_net = net_mode == cri::NamespaceMode::Node;
        let host_ipc = ipc_mode == cri::NamespaceMode::Node;
        let id = new_id();
        let mut rec = SandboxRecord {
            id: id.clone(),
            config: String::new(),
            runtime_handler: runtime_handler.to_string(),
            created_at: now_ns(),
            stopped: false,
            netns: None,
            ipcns: None,
            utsns: None,
            pid_holder: None,
            network_attached: false,
            set_up: false,
            ips: Vec::new(),
            created_cgroup_parent: false,
        };
        rec.set_config(&config);
        let key = rec.name_key();
        self.reserve_name(&key, &id)?;
        let dir = self.sandbox_dir(&id);
        let res = self
            .setup_sandbox(&mut rec, &config, &dir, host_net, host_ipc, pid_mode)
            .await;
        if let Err(e) = res {
            tracing::warn!(sandbox = %id, pod = %md.name, namespace = %md.namespace, error = %e, "RunPodSandbox failed: cleaning up");
            if let Err(te) = self.teardown_sandbox(&mut rec).await {
                tracing::warn!(sandbox = %id, error = %te, "cleanup after the failed RunPodSandbox");
            }
            self.remove_sandbox_files(&rec);
            let _ = self.records.delete_sandbox(&id);
            self.release_name(&key);
            return Err(e);
        }
        tracing::info!(sandbox = %id, pod = %md.name, namespace = %md.namespace, ips = ?rec.ips, "sandbox ready");
        self.sandboxes.lock().map_err(poisoned)?.insert(
            id.clone(),
            Arc::new(Sandbox {
                rec: Mutex::new(rec),
                lock: tokio::sync::Mutex::new(()),
            }),
        );
        Ok(id)
    }

    async fn setup_sandbox(
        &self,
        rec: &mut SandboxRecord,
        config: &cri::PodSandboxConfig,
        dir: &Path,
        host_net: bool,
        host_ipc: bool,
        pid_mode: cri::NamespaceMode,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::internal(dir.display(), e))?;
        // Persist before anything that must be undone after a crash (the /dev/shm mount,
        // namespaces, CNI): a daemon killed from here on finds the record and the kubelet's
        // StopPodSandbox/RemovePodSandbox undo what was done.
        rec.network_attached = !host_net;
        self.records.put_sandbox(rec)?;
        let hostname = if host_net {
            host_hostname()
        } else if config.hostname.is_empty() {
            config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default()
        } else {
            config.hostname.clone()
        };
        write(&dir.join("hostname"), &format!("{hostname}\n"))?;
        let hosts = if host_net {
            std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| DEFAULT_HOSTS.to_string())
        } else {
            DEFAULT_HOSTS.to_string()
        };
        write(&dir.join("hosts"), &hosts)?;
        let resolv = match resolv_conf(config.dns_config.as_ref()) {
            Some(s) => s,
            None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        write(&dir.join("resolv.conf"), &resolv)?;
        if !host_ipc {
            let shm = dir.join("shm");
            std::fs::create_dir_all(&shm).map_err(|e| Error::internal(shm.display(), e))?;
            let opts = format!("mode=1777,size={}", self.cfg.shm_size);
            nix::mount::mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(opts.as_str()),
            )
            .map_err(|e| Error::internal("mounting the pod's /dev/shm", e))?;
        }
        let sysctls: Vec<(String, String)> = config
            .linux
            .as_ref()
            .map(|l| {
                let mut v: Vec<_> = l
                    .sysctls
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let req = namespaces::Request {
            net: !host_net,
            ipc: !host_ipc,
            uts: !host_net,
            hostname: hostname.clone(),
            sysctls,
        };
        let d = dir.to_path_buf();
        let pins = tokio::task::spawn_blocking(move || namespaces::create(&d, &req))
            .await
            .map_err(|e| Error::internal("namespace task", e))??;
        rec.netns = pins.net.clone();
        rec.ipcns = pins.ipc.clone();
        rec.utsns = pins.uts.clone();
        self.records.put_sandbox(rec)?;

        // The cgroup parent: the kubelet's pod cgroup normally exists; make it if not.
        if let Some(parent) = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())
            .filter(|p| !p.is_empty())
        {
            let m = cgroups::Manager::new(parent)
                .map_err(|e| Error::InvalidArgument(format!("cgroup parent {parent:?}: {e}")))?;
            if !m.exists() {
                m.create()
                    .map_err(|e| Error::internal(format!("creating cgroup {parent}"), e))?;
                rec.created_cgroup_parent = true;
            }
        }

        if pid_mode == cri::NamespaceMode::Pod {
            rec.pid_holder = Some(self.start_pid_holder(dir).await?);
        }
        self.records.put_sandbox(rec)?;

        if let Some(netns) = rec.netns.clone() {
            let ips = self
                .network()
                .add(&Attachment {
                    sandbox_id: &rec.id,
                    netns: &netns,
                    config,
                })
                .await?;
            rec.ips = ips;
        }
        rec.set_up = true;
        self.records.put_sandbox(rec)?;
        Ok(())
    }

    /// Starts `deckhand-monitor --hold-pidns`: pid 1 of the pod's shared PID namespace.
    async fn start_pid_holder(&self, dir: &Path) -> Result<(i32, u64)> {
        let out = tokio::process::Command::new(&self.cfg.monitor_bin)
            .arg("--hold-pidns")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(false)
            .output()
            .await
            .map_err(|e| {
                Error::internal(format!("running {}", self.cfg.monitor_bin.display()), e)
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let pid: i32 = text.trim().parse().map_err(|_| {
            Error::Internal(format!(
                "the PID namespace holder did not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        let start = crate::oci::state::proc_stat(pid)
            .map(|(_, s)| s)
            .ok_or_else(|| Error::Internal("the PID namespace holder vanished".into()))?;
        let _ = std::fs::write(dir.join("pidns-holder"), format!("{pid}\n"));
        Ok((pid, start))
    }

    /// Undoes what a sandbox holds on the host, in reverse: holder, CNI, namespaces, /dev/shm.
    /// Idempotent; errors are logged except a failed CNI DEL, which is returned (the kubelet
    /// retries StopPodSandbox).
    async fn teardown_sandbox(&self, rec: &mut SandboxRecord) -> Result<()> {
        if let Some((pid, start)) = rec.pid_holder.take() {
            kill_verified(pid, start, libc::SIGKILL);
        }
        if rec.network_attached {
            let config = rec.config();
            let netns = rec.netns.clone().unwrap_or_default();
            self.network()
                .del(&Attachment {
                    sandbox_id: &rec.id,
                    netns: &netns,
                    config: &config,
                })
                .await?;
            rec.network_attached = false;
        }
        namespaces::unpin(&Pins {
            net: rec.netns.clone(),
            ipc: rec.ipcns.clone(),
            uts: rec.utsns.clone(),
        });
        let shm = self.sandbox_dir(&rec.id).join("shm");
        let _ = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH);
        Ok(())
    }

    fn remove_sandbox_files(&self, rec: &SandboxRecord) {
        let dir = self.sandbox_dir(&rec.id);
        let shm = dir.join("shm");
        let _ = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing the sandbox directory");
        }
        if rec.created_cgroup_parent
            && let Some(parent) = rec
                .config()
                .linux
                .map(|l| l.cgroup_parent)
                .filter(|p| !p.is_empty())
            && let Ok(m) = cgroups::Manager::new(&parent)
            && let Err(e) = m.destroy(false)
        {
            tracing::warn!(cgroup = %parent, error = %e, "removing the pod cgroup we created");
        }
    }

    /// StopPodSandbox: kills the pod's containers, tears its network down and releases its
    /// namespaces; the record stays. Idempotent.
    pub async fn stop_pod_sandbox(self: &Arc<Self>, id: &str) -> Result<()> {
        let sb = self.sandbox(id)?;
        let _g = sb.lock.lock().await;
        let sid = sb.rec.lock().map_err(poisoned)?.id.clone();
        for c in self.containers_of(&sid) {
            self.stop_container_locked(&c, 0).await?;
        }
        let mut rec = sb.rec.lock().map_err(poisoned)?.clone();
        self.teardown_sandbox(&mut rec).await?;
        rec.stopped = true;
        rec.netns = None;
        rec.ipcns = None;
        rec.utsns = None;
        self.records.put_sandbox(&rec)?;
        *sb.rec.lock().map_err(poisoned)? = rec;
        tracing::info!(sandbox = %sid, "sandbox stopped");
        Ok(())
    }

    /// RemovePodSandbox: stops it if needed and removes it with its containers. Idempotent.
    pub async fn remove_pod_sandbox(self: &Arc<Self>, id: &str) -> Result<()> {
        let sb = match self.sandbox(id) {
            Ok(s) => s,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !sb.rec.lock().map_err(poisoned)?.stopped {
            self.stop_pod_sandbox(id).await?;
        }
        let _g = sb.lock.lock().await;
        let rec = sb.rec.lock().map_err(poisoned)?.clone();
        for c in self.containers_of(&rec.id) {
            self.remove_container_locked(&c).await?;
        }
        self.remove_sandbox_files(&rec);
        self.records.delete_sandbox(&rec.id)?;
        self.release_name(&rec.name_key());
        self.sandboxes.lock().map_err(poisoned)?.remove(&rec.id);
        tracing::info!(sandbox = %rec.id, "sandbox removed");
        Ok(())
    }

    /// Ok if the sandbox is ready (for PortForward).
    pub fn sandbox_ready(&self, id: &str) -> Result<()> {
        let sb = self.sandbox(id)?;
        let rec = sb.rec.lock().map_err(poisoned)?.clone();
        if self.sandbox_state(&rec) != cri::PodSandboxState::SandboxReady {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} is not ready",
                rec.id
            )));
        }
        Ok(())
    }

    /// The pinned network namespace of a ready sandbox (for PortForward).
    pub fn sandbox_netns(&self, id: &str) -> Result<PathBuf> {
        self.sandbox_ready(id)?;
        let sb = self.sandbox(id)?;
        let rec = sb.rec.lock().map_err(poisoned)?.clone();
        rec.netns.ok_or_else(|| {
            Error::FailedPrecondition(format!("sandbox {} uses the host network", rec.id))
        })
    }

    pub(crate) fn sandbox_state(&self, rec: &SandboxRecord) -> cri::PodSandboxState {
        let live = match &rec.netns {
            Some(p) => namespaces::is_pinned(p),
            None => ns_modes(&rec.config()).0 == cri::NamespaceMode::Node,
        };
        if !rec.stopped && rec.set_up && live {
            cri::PodSandboxState::SandboxReady
        } else {
            cri::PodSandboxState::SandboxNotready
        }
    }

    pub(crate) fn sandbox_status_of(&self, sb: &Sandbox) -> cri::PodSandboxStatus {
        let Ok(rec) = sb.rec.lock().map(|r| r.clone()) else {
            return cri::PodSandboxStatus::default();
        };
        let config = rec.config();
        let (net, pid, ipc) = ns_modes(&config);
        let mut ips = rec.ips.iter();
        cri::PodSandboxStatus {
            id: rec.id.clone(),
            metadata: config.metadata.clone(),
            state: self.sandbox_state(&rec) as i32,
            created_at: rec.created_at,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: ips.next().cloned().unwrap_or_default(),
                additional_ips: ips.map(|ip| cri::PodIp { ip: ip.clone() }).collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(cri::NamespaceOption {
                        network: net as i32,
                        pid: pid as i32,
                        ipc: ipc as i32,
                        target_id: String::new(),
                        userns_options: None,
                    }),
                }),
            }),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            runtime_handler: rec.runtime_handler.clone(),
        }
    }

    /// PodSandboxStatus.
    pub fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::PodSandboxStatusResponse> {
        let sb = self.sandbox(id)?;
        let status = self.sandbox_status_of(&sb);
        let mut info = HashMap::new();
        if verbose {
            let rec = sb.rec.lock().map_err(poisoned)?.clone();
            info.insert(
                "info".to_string(),
                serde_json::json!({
                    "netNamespacePath": rec.netns,
                    "ipcNamespacePath": rec.ipcns,
                    "utsNamespacePath": rec.utsns,
                    "pidNamespaceHolder": rec.pid_holder.map(|p| p.0),
                    "sandboxDir": self.sandbox_dir(&rec.id),
                    "cniAttached": rec.network_attached,
                })
                .to_string(),
            );
        }
        let containers_statuses = self
            .containers_of(&status.id)
            .iter()
            .map(|c| self.container_status_of(c))
            .collect();
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses,
            timestamp: now_ns(),
        })
    }

    /// ListPodSandbox.
    pub fn list_pod_sandbox(
        &self,
        filter: Option<cri::PodSandboxFilter>,
    ) -> Result<Vec<cri::PodSandbox>> {
        let all = self.all_sandboxes()?;
        let f = filter.unwrap_or_default();
        let mut out = Vec::new();
        for sb in all {
            let st = self.sandbox_status_of(&sb);
            if !f.id.is_empty() && !st.id.starts_with(&f.id) {
                continue;
            }
            if let Some(s) = &f.state
                && s.state != st.state
            {
                continue;
            }
            if !super::labels_match(&st.labels, &f.label_selector) {
                continue;
            }
            out.push(cri::PodSandbox {
                id: st.id,
                metadata: st.metadata,
                state: st.state,
                created_at: st.created_at,
                labels: st.labels,
                annotations: st.annotations,
                runtime_handler: st.runtime_handler,
            });
        }
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }
}

/// Sends `sig` to `pid` if it is still the process that started at `start`.
pub(crate) fn kill_verified(pid: i32, start: u64, sig: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match crate::oci::state::proc_stat(pid) {
        Some((state, s)) if s == start && state != 'Z' => {
            // SAFETY: plain kill of a verified pid.
            unsafe { libc::kill(pid, sig) == 0 }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        assert_eq!(resolv_conf(None), None);
        assert_eq!(resolv_conf(Some(&cri::DnsConfig::default())), None);
        let d = cri::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&d)).as_deref(),
            Some(
                "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
            )
        );
    }
}
