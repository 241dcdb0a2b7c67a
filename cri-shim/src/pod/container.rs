//! Containers: CreateContainer, StartContainer (through `deckhand-monitor`), StopContainer,
//! RemoveContainer, ContainerStatus, ListContainers, UpdateContainerResources and
//! ReopenContainerLog; and watching each monitor for the container's exit.

use std::collections::HashMap;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deckhand_proto::cri;
use tokio::io::AsyncBufReadExt as _;

use super::records::parse_rfc3339_ns;
use super::sandbox::{kill_verified, ns_modes};
use super::spec::{self, Namespaces};
use super::{
    Container, ContainerRecord, Error, ExitInfo, Manager, Result, new_id, now_ns, poisoned, user,
};
use crate::image::snapshot;
use crate::oci::{self, cgroups};

/// How long StartContainer waits for the monitor to report the container started.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The state of a container as the CRI sees it.
pub(crate) fn state_of(rec: &ContainerRecord, exit: Option<&ExitInfo>) -> cri::ContainerState {
    if exit.is_some() {
        cri::ContainerState::ContainerExited
    } else if rec.started_at > 0 {
        cri::ContainerState::ContainerRunning
    } else {
        cri::ContainerState::ContainerCreated
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `pid` (started at `start`) has exited; at once if it is not that process.
async fn wait_pid(pid: i32, start: u64) {
    let Ok(fd) = pidfd_open(pid) else {
        return;
    };
    // Opened before the check, so a pid reused after the check cannot fool us.
    if !crate::oci::state::proc_stat(pid).is_some_and(|(st, s)| s == start && st != 'Z') {
        return;
    }
    // SAFETY: an OwnedFd we moved in stays open, and the same, for the AsyncFd's lifetime.
    match unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => loop {
            if !crate::oci::state::proc_stat(pid).is_some_and(|(st, s)| s == start && st != 'Z') {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        },
    }
}

fn device_of(d: &cri::Device) -> Result<spec::Device> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let md = std::fs::metadata(&d.host_path)
        .map_err(|e| Error::InvalidArgument(format!("device {:?}: {e}", d.host_path)))?;
    let ft = md.file_type();
    let kind = if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        return Err(Error::InvalidArgument(format!(
            "{:?} is not a device node",
            d.host_path
        )));
    };
    let rdev = md.rdev();
    let access: String = if d.permissions.is_empty() {
        "rwm".into()
    } else {
        d.permissions.clone()
    };
    if !access.chars().all(|c| "rwm".contains(c)) {
        return Err(Error::InvalidArgument(format!(
            "device permissions {access:?}: only r, w and m"
        )));
    }
    Ok(spec::Device {
        container_path: if d.container_path.is_empty() {
            d.host_path.clone()
        } else {
            d.container_path.clone()
        },
        kind,
        major: libc::major(rdev) as i64,
        minor: libc::minor(rdev) as i64,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        access,
    })
}

impl Manager {
    pub(crate) fn read_exit(&self, rec: &ContainerRecord) -> Option<ExitInfo> {
        let data = std::fs::read(rec.exit_file()).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Watches a started container: waits for its monitor (our child, or by pid after a
    /// restart), then publishes its exit.
    pub(crate) fn watch_exit(
        self: &Arc<Self>,
        c: Arc<Container>,
        child: Option<tokio::process::Child>,
    ) {
        let m = self.clone();
        tokio::spawn(async move {
            let Ok(rec) = c.rec.lock().map(|r| r.clone()) else {
                return;
            };
            match child {
                Some(mut ch) => {
                    let _ = ch.wait().await;
                }
                None => wait_pid(rec.monitor_pid, rec.monitor_start).await,
            }
            let exit = match m.read_exit(&rec) {
                Some(e) => e,
                None => {
                    // The monitor vanished (killed) without writing the exit file: the container
                    // may still run, orphaned. Wait for it, then record what we know.
                    wait_pid(rec.init_pid, rec.init_start).await;
                    let e = ExitInfo {
                        exit_code: 255,
                        finished_at: crate::oci::time::now(),
                        oom_killed: false,
                        pid: rec.init_pid,
                        unknown: true,
                    };
                    if let Ok(data) = serde_json::to_vec(&e) {
                        let _ = crate::oci::state::write_atomic(&rec.exit_file(), &data);
                    }
                    tracing::warn!(container = %rec.id, "the container's monitor vanished; its exit code is unknown");
                    e
                }
            };
            tracing::info!(container = %rec.id, exit_code = exit.exit_code, oom = exit.oom_killed, "container exited");
            c.exit.send_replace(Some(exit));
            m.emit(&rec.id, cri::ContainerEventType::ContainerStoppedEvent);
        });
    }

    /// The monitor's attach socket of a container (short: `sun_path` has 108 bytes).
    pub(crate) fn attach_socket(&self, id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("attach")
            .join(&id[..id.len().min(32)])
    }

    /// Ok if the container runs (for Exec and Attach).
    pub fn container_running(&self, id: &str) -> Result<()> {
        self.running(id).map(|_| ())
    }

    /// The container and its record, if it runs; FAILED_PRECONDITION otherwise.
    pub(crate) fn running(&self, id: &str) -> Result<(Arc<Container>, ContainerRecord)> {
        let c = self.container(id)?;
        let rec = c.rec.lock().map_err(poisoned)?.clone();
        if state_of(&rec, c.exit.borrow().as_ref()) != cri::ContainerState::ContainerRunning {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        Ok((c, rec))
    }

    /// CreateContainer.
    pub async fn create_container(
        self: &Arc<Self>,
        sandbox_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let sb = self.sandbox(sandbox_id)?;
        let _g = sb.lock.lock().await;
        let srec = sb.rec.lock().map_err(poisoned)?.clone();
        if self.sandbox_state(&srec) != cri::PodSandboxState::SandboxReady {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} is not ready",
                srec.id
            )));
        }
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| Error::InvalidArgument("container config has no metadata".into()))?;
        if md.name.is_empty() {
            return Err(Error::InvalidArgument(
                "container metadata has no name".into(),
            ));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Error::InvalidArgument("container config has no image".into()))?;
        let image = self
            .images
            .get(&image_name)?
            .ok_or_else(|| Error::NotFound(format!("image {image_name:?}")))?;
        let id = new_id();
        let bundle = self.cfg.state_dir.join("containers").join(&id);
        let log_path = match (
            srec.config().log_directory.as_str(),
            config.log_path.as_str(),
        ) {
            (_, "") => PathBuf::new(),
            (dir, p) => Path::new(dir).join(p),
        };
        let cgroup_parent = srec
            .config()
            .linux
            .map(|l| l.cgroup_parent)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/deckhand".into());
        let mut rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: srec.id.clone(),
            config: String::new(),
            sandbox_name: srec.name_key(),
            created_at: now_ns(),
            started_at: 0,
            image: image_name.clone(),
            image_id: image.id().as_str().to_string(),
            image_ref: image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| image.id().as_str().to_string()),
            log_path,
            cgroups_path: format!("{}/{id}", cgroup_parent.trim_end_matches('/')),
            bundle: bundle.clone(),
            monitor_pid: 0,
            monitor_start: 0,
            init_pid: 0,
            init_start: 0,
            stop_signal: spec::stop_signal(&image.config),
            resources: String::new(),
            start_error: None,
            user: (0, 0, Vec::new()),
        };
        rec.set_config(&config);
        if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            rec.set_resources(r);
        }
        let key = rec.name_key();
        self.reserve_name(&key, &id)?;
        match self
            .prepare_container(&mut rec, &config, &srec, &image.config)
            .await
        {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(container = %id, name = %md.name, error = %e, "CreateContainer failed: cleaning up");
                self.remove_container_files(&rec).await;
                self.release_name(&key);
                return Err(e);
            }
        }
        let (tx, _) = tokio::sync::watch::channel(None);
        self.containers.lock().map_err(poisoned)?.insert(
            id.clone(),
            Arc::new(Container {
                rec: Mutex::new(rec),
                exit: tx,
            }),
        );
        tracing::info!(container = %id, name = %md.name, sandbox = %srec.id, "container created");
        self.emit(&id, cri::ContainerEventType::ContainerCreatedEvent);
        Ok(id)
    }

    async fn prepare_container(
        &self,
        rec: &mut ContainerRecord,
        config: &cri::ContainerConfig,
        srec: &super::SandboxRecord,
        image_config: &serde_json::Value,
    ) -> Result<()> {
        let rootfs = rec.bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| Error::internal(rootfs.display(), e))?;
        self.records.put_container(rec)?;
        let mount = self.images.prepare(&rec.id, &rec.image)?;
        let rf = rootfs.clone();
        tokio::task::spawn_blocking(move || mount.mount(&rf))
            .await
            .map_err(|e| Error::internal("mount task", e))?
            .map_err(|e| Error::internal("mounting the rootfs", e))?;

        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        let image_user = image_config
            .get("config")
            .and_then(|c| c.get("User"))
            .and_then(|u| u.as_str())
            .unwrap_or("");
        let resolved = user::resolve(
            &rootfs,
            &user::Request {
                run_as_user: sc.run_as_user.as_ref().map(|v| v.value),
                run_as_username: &sc.run_as_username,
                run_as_group: sc.run_as_group.as_ref().map(|v| v.value),
                image_user,
                supplemental_groups: &sc.supplemental_groups,
            },
        )?;
        rec.user = resolved.clone();
        let devices = config
            .devices
            .iter()
            .map(device_of)
            .collect::<Result<Vec<_>>>()?;
        let localhost_seccomp = match sc.seccomp.as_ref() {
            Some(p) if p.profile_type == cri::security_profile::ProfileType::Localhost as i32 => {
                let path = p.localhost_ref.trim_start_matches("localhost/");
                let data = std::fs::read(path).map_err(|e| {
                    Error::InvalidArgument(format!("seccomp profile {path:?}: {e}"))
                })?;
                Some(serde_json::from_slice(&data).map_err(|e| {
                    Error::InvalidArgument(format!("seccomp profile {path:?}: {e}"))
                })?)
            }
            _ => None,
        };
        let sconfig = srec.config();
        let (_, pod_pid, _) = ns_modes(&sconfig);
        let own_pid = sc
            .namespace_options
            .as_ref()
            .map(|o| cri::NamespaceMode::try_from(o.pid).unwrap_or(cri::NamespaceMode::Container));
        let target = sc
            .namespace_options
            .as_ref()
            .map(|o| o.target_id.clone())
            .unwrap_or_default();
        let pid_mode = own_pid.unwrap_or(pod_pid);
        let (pid, pid_host) = match pid_mode {
            cri::NamespaceMode::Node => (None, true),
            cri::NamespaceMode::Pod => match srec.pid_holder {
                Some((p, _)) => (Some(PathBuf::from(format!("/proc/{p}/ns/pid"))), false),
                None => (None, false),
            },
            cri::NamespaceMode::Target => {
                let t = self.container(&target)?;
                let p = t.rec.lock().map_err(poisoned)?.init_pid;
                if p <= 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "target container {target} is not running"
                    )));
                }
                (Some(PathBuf::from(format!("/proc/{p}/ns/pid"))), false)
            }
            cri::NamespaceMode::Container => (None, false),
        };
        let sandbox_dir = self.sandbox_dir(&srec.id);
        let spec = spec::build(&spec::Input {
            id: &rec.id,
            sandbox_id: &srec.id,
            config,
            sandbox: &sconfig,
            image_config,
            rootfs: &rootfs,
            user: resolved,
            cgroups_path: &rec.cgroups_path,
            namespaces: Namespaces {
                net: srec.netns.clone(),
                ipc: srec.ipcns.clone(),
                uts: srec.utsns.clone(),
                pid,
                pid_host,
            },
            sandbox_dir: &sandbox_dir,
            devices,
            localhost_seccomp,
        })?;
        for m in &config.mounts {
            let p = Path::new(&m.host_path);
            if !p.exists() {
                std::fs::create_dir_all(p).map_err(|e| {
                    Error::InvalidArgument(format!("creating mount source {:?}: {e}", m.host_path))
                })?;
            }
        }
        let data = serde_json::to_vec_pretty(&spec).map_err(|e| Error::internal("spec", e))?;
        oci::state::write_atomic(&rec.bundle.join("config.json"), &data)
            .map_err(|e| Error::internal("writing config.json", e))?;
        if let Some(dir) = rec.log_path.parent()
            && !rec.log_path.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| Error::internal(dir.display(), e))?;
        }
        self.records.put_container(rec)?;
        Ok(())
    }

    /// Unmounts and removes the rootfs, the bundle and the record; idempotent.
    async fn remove_container_files(&self, rec: &ContainerRecord) {
        let rootfs = rec.bundle.join("rootfs");
        let images = self.images.clone();
        let (id, bundle) = (rec.id.clone(), rec.bundle.clone());
        let res = tokio::task::spawn_blocking(move || {
            let _ = snapshot::unmount(&rootfs);
            if let Err(e) = images.remove_container(&id) {
                tracing::warn!(container = %id, error = %e, "releasing the container's snapshot");
            }
            match std::fs::remove_dir_all(&bundle) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(bundle = %bundle.display(), error = %e, "removing the bundle")
                }
            }
        })
        .await;
        if res.is_err() {
            tracing::warn!(container = %rec.id, "the cleanup task failed");
        }
        let _ = self.records.delete_container(&rec.id);
    }

    /// StartContainer: execs `deckhand-monitor`, which creates and starts the container and
    /// reports the init's pid on its stdout.
    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let sid = c.rec.lock().map_err(poisoned)?.sandbox_id.clone();
        let sb = self.sandbox(&sid)?;
        let _g = sb.lock.lock().await;
        let mut rec = c.rec.lock().map_err(poisoned)?.clone();
        if state_of(&rec, c.exit.borrow().as_ref()) != cri::ContainerState::ContainerCreated {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not in the created state",
                rec.id
            )));
        }
        let monitor_log = rec.bundle.join("monitor.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&monitor_log)
            .map_err(|e| Error::internal(monitor_log.display(), e))?;
        let log = if rec.log_path.as_os_str().is_empty() {
            PathBuf::from("/dev/null")
        } else {
            rec.log_path.clone()
        };
        let mut cmd = tokio::process::Command::new(&self.cfg.monitor_bin);
        let attach = self.attach_socket(&rec.id);
        if let Some(d) = attach.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::internal(d.display(), e))?;
        }
        let config = rec.config();
        if config.stdin {
            cmd.arg("--stdin");
            if config.stdin_once {
                cmd.arg("--stdin-once");
            }
        }
        cmd.arg("--attach-socket")
            .arg(&attach)
            .arg("--root")
            .arg(self.cfg.runc_root())
            .arg("--bundle")
            .arg(&rec.bundle)
            .arg("--id")
            .arg(&rec.id)
            .arg("--log-path")
            .arg(&log)
            .arg("--exit-file")
            .arg(rec.exit_file())
            .arg("--report")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            Error::internal(format!("running {}", self.cfg.monitor_bin.display()), e)
        })?;
        let monitor_pid = child.id().map(|p| p as i32).unwrap_or(0);
        let monitor_start = crate::oci::state::proc_stat(monitor_pid)
            .map(|(_, s)| s)
            .unwrap_or(0);
        let line = match child.stdout.take() {
            Some(out) => {
                let mut r = tokio::io::BufReader::new(out);
                let mut line = String::new();
                match tokio::time::timeout(START_TIMEOUT, r.read_line(&mut line)).await {
                    Ok(_) => line,
                    Err(_) => String::new(),
                }
            }
            None => String::new(),
        };
        let report: Option<serde_json::Value> = serde_json::from_str(line.trim()).ok();
        let init_pid = report
            .as_ref()
            .and_then(|v| v.get("pid"))
            .and_then(|p| p.as_i64())
            .unwrap_or(0) as i32;
        if init_pid <= 0 {
            let _ = child.wait().await;
            let msg = std::fs::read_to_string(&monitor_log)
                .ok()
                .and_then(|s| {
                    s.lines()
                        .rev()
                        .find(|l| !l.contains("warning:"))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "the monitor exited without reporting".into());
            let msg = msg.trim_start_matches("deckhand-monitor: ").to_string();
            rec.start_error = Some(msg.clone());
            rec.started_at = now_ns();
            let e = ExitInfo {
                exit_code: 128,
                finished_at: crate::oci::time::now(),
                oom_killed: false,
                pid: 0,
                unknown: false,
            };
            if let Ok(data) = serde_json::to_vec(&e) {
                let _ = oci::state::write_atomic(&rec.exit_file(), &data);
            }
            self.records.put_container(&rec)?;
            *c.rec.lock().map_err(poisoned)? = rec;
            c.exit.send_replace(Some(e));
            self.emit(id, cri::ContainerEventType::ContainerStoppedEvent);
            return Err(Error::Internal(format!("starting container: {msg}")));
        }
        rec.monitor_pid = monitor_pid;
        rec.monitor_start = monitor_start;
        rec.init_pid = init_pid;
        rec.init_start = crate::oci::state::proc_stat(init_pid)
            .map(|(_, s)| s)
            .unwrap_or(0);
        rec.started_at = report
            .as_ref()
            .and_then(|v| v.get("startedAt"))
            .and_then(|t| t.as_str())
            .and_then(parse_rfc3339_ns)
            .unwrap_or_else(now_ns);
        self.records.put_container(&rec)?;
        let cid = rec.id.clone();
        *c.rec.lock().map_err(poisoned)? = rec;
        self.watch_exit(c.clone(), Some(child));
        tracing::info!(container = %cid, pid = init_pid, "container started");
        self.emit(&cid, cri::ContainerEventType::ContainerStartedEvent);
        Ok(())
    }

    /// StopContainer.
    pub async fn stop_container(self: &Arc<Self>, id: &str, timeout: i64) -> Result<()> {
        let c = self.container(id)?;
        let sid = c.rec.lock().map_err(poisoned)?.sandbox_id.clone();
        let sb = self.sandbox(&sid).ok();
        let _g = match &sb {
            Some(s) => Some(s.lock.lock().await),
            None => None,
        };
        self.stop_container_locked(&c, timeout).await
    }

    /// Stops a container (the caller holds its sandbox's lock): the stop signal, then SIGKILL
    /// to everything in it after `timeout` seconds (at once for 0). Idempotent.
    pub(crate) async fn stop_container_locked(&self, c: &Container, timeout: i64) -> Result<()> {
        let rec = c.rec.lock().map_err(poisoned)?.clone();
        if state_of(&rec, c.exit.borrow().as_ref()) != cri::ContainerState::ContainerRunning {
            return Ok(());
        }
        let mut rx = c.exit.subscribe();
        let rt = oci::Runtime::new(self.cfg.runc_root());
        if timeout > 0 {
            if !kill_verified(rec.init_pid, rec.init_start, rec.stop_signal) {
                tracing::debug!(container = %rec.id, "stop signal not delivered (already gone?)");
            }
            let t = Duration::from_secs(timeout as u64);
            if tokio::time::timeout(t, rx.wait_for(|e| e.is_some()))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tracing::info!(container = %rec.id, timeout, "did not stop in time: killing");
        }
        if let Err(e) = rt.kill(&rec.id, libc::SIGKILL, true) {
            tracing::debug!(container = %rec.id, error = %e, "kill through the runtime state");
            kill_verified(rec.init_pid, rec.init_start, libc::SIGKILL);
        }
        match tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|e| e.is_some())).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "container {} did not exit 30 s after SIGKILL",
                rec.id
            ))),
        }
    }

    /// RemoveContainer: kills it if it runs, then removes everything. Idempotent.
    pub async fn remove_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let c = match self.container(id) {
            Ok(c) => c,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let sid = c.rec.lock().map_err(poisoned)?.sandbox_id.clone();
        let sb = self.sandbox(&sid).ok();
        let _g = match &sb {
            Some(s) => Some(s.lock.lock().await),
            None => None,
        };
        self.remove_container_locked(&c).await
    }

    pub(crate) async fn remove_container_locked(&self, c: &Container) -> Result<()> {
        self.stop_container_locked(c, 0).await?;
        let rec = c.rec.lock().map_err(poisoned)?.clone();
        let rt = oci::Runtime::new(self.cfg.runc_root());
        let rid = rec.id.clone();
        let cgp = rec.cgroups_path.clone();
        let default_parent = cgp.starts_with("/deckhand/");
        let res = tokio::task::spawn_blocking(move || {
            match rt.delete(&rid, true) {
                Ok(()) | Err(oci::Error::NotFound(_)) => {}
                Err(e) => return Err(Error::internal(format!("deleting container {rid}"), e)),
            }
            // A container that never started has no runtime state but may have a cgroup.
            if let Ok(m) = cgroups::Manager::new(&cgp) {
                let _ = m.destroy(true);
                if default_parent {
                    let _ = m.remove_empty_parents(1);
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::internal("delete task", e))?;
        res?;
        self.remove_container_files(&rec).await;
        self.emit(&rec.id, cri::ContainerEventType::ContainerDeletedEvent);
        self.release_name(&rec.name_key());
        self.containers.lock().map_err(poisoned)?.remove(&rec.id);
        tracing::info!(container = %rec.id, "container removed");
        Ok(())
    }

    pub(crate) fn container_status_of(&self, c: &Container) -> cri::ContainerStatus {
        let Ok(rec) = c.rec.lock().map(|r| r.clone()) else {
            return cri::ContainerStatus::default();
        };
        let exit = c.exit.borrow().clone();
        let config = rec.config();
        let state = state_of(&rec, exit.as_ref());
        let (exit_code, finished_at, reason, message) = match &exit {
            None => (0, 0, String::new(), String::new()),
            Some(e) => {
                let (reason, message) = if let Some(err) = &rec.start_error {
                    ("StartError".to_string(), err.clone())
                } else if e.oom_killed {
                    ("OOMKilled".to_string(), String::new())
                } else if e.unknown {
                    (
                        "Error".to_string(),
                        "the exit code is unknown: the container's monitor vanished".to_string(),
                    )
                } else if e.exit_code == 0 {
                    ("Completed".to_string(), String::new())
                } else {
                    ("Error".to_string(), String::new())
                };
                (
                    e.exit_code,
                    parse_rfc3339_ns(&e.finished_at).unwrap_or(0),
                    reason,
                    message,
                )
            }
        };
        let resources = rec
            .resources()
            .or_else(|| config.linux.as_ref().and_then(|l| l.resources.clone()));
        cri::ContainerStatus {
            id: rec.id.clone(),
            metadata: config.metadata.clone(),
            state: state as i32,
            created_at: rec.created_at,
            started_at: if rec.start_error.is_some() {
                0
            } else {
                rec.started_at
            },
            finished_at,
            exit_code,
            image: Some(cri::ImageSpec {
                image: rec.image.clone(),
                annotations: config
                    .image
                    .clone()
                    .map(|i| i.annotations)
                    .unwrap_or_default(),
                user_specified_image: config
                    .image
                    .as_ref()
                    .map(|i| i.user_specified_image.clone())
                    .unwrap_or_default(),
                runtime_handler: String::new(),
            }),
            image_ref: rec.image_ref.clone(),
            reason,
            message,
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            mounts: config.mounts.clone(),
            log_path: rec.log_path.display().to_string(),
            resources: resources.map(|r| cri::ContainerResources {
                linux: Some(r),
                windows: None,
            }),
            image_id: rec.image_id.clone(),
            user: Some(cri::ContainerUser {
                linux: Some(cri::LinuxContainerUser {
                    uid: rec.user.0 as i64,
                    gid: rec.user.1 as i64,
                    supplemental_groups: rec.user.2.iter().map(|g| *g as i64).collect(),
                }),
            }),
        }
    }

    /// ContainerStatus.
    pub fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::ContainerStatusResponse> {
        let c = self.container(id)?;
        let status = self.container_status_of(&c);
        let mut info = HashMap::new();
        if verbose {
            let rec = c.rec.lock().map_err(poisoned)?.clone();
            let spec: serde_json::Value = std::fs::read(rec.bundle.join("config.json"))
                .ok()
                .and_then(|d| serde_json::from_slice(&d).ok())
                .unwrap_or_default();
            info.insert(
                "info".to_string(),
                serde_json::json!({
                    "sandboxID": rec.sandbox_id,
                    "pid": rec.init_pid,
                    "monitorPid": rec.monitor_pid,
                    "bundle": rec.bundle,
                    "cgroupsPath": rec.cgroups_path,
                    "runtimeSpec": spec,
                })
                .to_string(),
            );
        }
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    /// ListContainers.
    pub fn list_containers(
        &self,
        filter: Option<cri::ContainerFilter>,
    ) -> Result<Vec<cri::Container>> {
        let all = self.all_containers()?;
        let f = filter.unwrap_or_default();
        let mut out = Vec::new();
        for c in all {
            let Ok(rec) = c.rec.lock().map(|r| r.clone()) else {
                continue;
            };
            if !f.id.is_empty() && !rec.id.starts_with(&f.id) {
                continue;
            }
            if !f.pod_sandbox_id.is_empty() && !rec.sandbox_id.starts_with(&f.pod_sandbox_id) {
                continue;
            }
            let state = state_of(&rec, c.exit.borrow().as_ref()) as i32;
            if let Some(s) = &f.state
                && s.state != state
            {
                continue;
            }
            let config = rec.config();
            if !super::labels_match(&config.labels, &f.label_selector) {
                continue;
            }
            out.push(cri::Container {
                id: rec.id.clone(),
                pod_sandbox_id: rec.sandbox_id.clone(),
                metadata: config.metadata.clone(),
                image: Some(cri::ImageSpec {
                    image: rec.image.clone(),
                    ..Default::default()
                }),
                image_ref: rec.image_ref.clone(),
                state,
                created_at: rec.created_at,
                labels: config.labels.clone(),
                annotations: config.annotations.clone(),
                image_id: rec.image_id.clone(),
            });
        }
        out.sort_by_key(|c| c.created_at);
        Ok(out)
    }

    /// UpdateContainerResources: applied to the cgroup of a created or running container.
    pub async fn update_container_resources(
        self: &Arc<Self>,
        id: &str,
        linux: Option<cri::LinuxContainerResources>,
    ) -> Result<()> {
        let c = self.container(id)?;
        let Some(res) = linux else {
            return Ok(());
        };
        let mut rec = c.rec.lock().map_err(poisoned)?.clone();
        if state_of(&rec, c.exit.borrow().as_ref()) == cri::ContainerState::ContainerExited {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                rec.id
            )));
        }
        let oci_res: oci_spec::runtime::LinuxResources =
            serde_json::from_value(spec::resources(&res))
                .map_err(|e| Error::InvalidArgument(format!("resources: {e}")))?;
        if rec.started_at > 0 {
            let m = cgroups::Manager::new(&rec.cgroups_path)
                .map_err(|e| Error::internal("cgroup", e))?;
            let warnings = m
                .set(&oci_res)
                .map_err(|e| Error::InvalidArgument(format!("updating resources: {e}")))?;
            for w in warnings {
                tracing::warn!(container = %rec.id, "{w}");
            }
        } else {
            // Not started yet: the new resources go into its spec.
            let p = rec.bundle.join("config.json");
            let mut spec: serde_json::Value = std::fs::read(&p)
                .ok()
                .and_then(|d| serde_json::from_slice(&d).ok())
                .ok_or_else(|| {
                    Error::Internal("the container's config.json is unreadable".into())
                })?;
            let devices = spec["linux"]["resources"]["devices"].clone();
            spec["linux"]["resources"] = spec::resources(&res);
            spec["linux"]["resources"]["devices"] = devices;
            let data = serde_json::to_vec_pretty(&spec).map_err(|e| Error::internal("spec", e))?;
            oci::state::write_atomic(&p, &data).map_err(|e| Error::internal("config.json", e))?;
        }
        rec.set_resources(&res);
        self.records.put_container(&rec)?;
        *c.rec.lock().map_err(poisoned)? = rec;
        Ok(())
    }

    /// ReopenContainerLog: the monitor reopens the log file (SIGUSR1) and recreates it.
    pub async fn reopen_container_log(&self, id: &str) -> Result<()> {
        let (_, rec) = self.running(id)?;
        if rec.log_path.as_os_str().is_empty() {
            return Ok(());
        }
        let before = std::fs::metadata(&rec.log_path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.ino()
        });
        if !kill_verified(rec.monitor_pid, rec.monitor_start, libc::SIGUSR1) {
            return Err(Error::FailedPrecondition(format!(
                "the monitor of container {} is gone",
                rec.id
            )));
        }
        // The kubelet renames the file before asking: wait until a new one exists.
        for _ in 0..200 {
            let now = std::fs::metadata(&rec.log_path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.ino()
            });
            if now.is_some() && now != before {
                return Ok(());
            }
            if now.is_some() && before.is_some() {
                // Reopened without a rename: the same file is fine.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(Error::Internal(format!(
            "the monitor did not reopen {}",
            rec.log_path.display()
        )))
    }
}
