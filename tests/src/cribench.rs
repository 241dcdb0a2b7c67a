//! A small CRI v1 client that starts and stops pods the way the kubelet does, and measures how
//! long each step takes: the library behind `dh-cri-bench` (and `hack/bench/cri.sh`).
//!
//! A pod is started as the kubelet starts one (`ImageStatus`/`PullImage` of the image first,
//! outside the timing; then `RunPodSandbox` with a `PodSandboxConfig` carrying metadata, hostname,
//! log directory, a cgroupfs `cgroup_parent` and no port mappings; `CreateContainer` with the
//! image, a long `sleep` and a log path; `StartContainer`) and torn down with `StopPodSandbox` +
//! `RemovePodSandbox`. Like the kubelet, the client makes each pod's log directory before the
//! sandbox and removes it, and the pod's cgroup, after the sandbox is gone.
//!
//! Every pod carries the label [`RUN_LABEL`] with the run's id, so [`Bench::cleanup`] finds and
//! removes every pod of a run — also pods whose `RunPodSandbox` was interrupted before its reply
//! arrived — and [`Bench::cleanup_all`] every pod any run of this tool left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use deckhand_proto::cri;
use deckhand_proto::cri::image_service_client::ImageServiceClient;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

/// Label on every pod the benchmark creates: its value is the run's id.
pub const RUN_LABEL: &str = "io.deckhand.bench.run";
/// The Kubernetes namespace the benchmark's pods claim to be in.
pub const POD_NAMESPACE: &str = "dh-bench";
/// The name of the one container in each pod.
pub const CONTAINER_NAME: &str = "bench";

/// What the benchmark's pods look like and how many run at once.
#[derive(Debug, Clone)]
pub struct PodTemplate {
    /// The container's image (pulled before any timing).
    pub image: String,
    /// The container's command.
    pub command: Vec<String>,
    /// The cgroupfs parent of the pods' cgroups: each pod gets `<cgroup_parent>/pod<uid>`.
    pub cgroup_parent: String,
    /// Each pod's log directory is `<log_root>/<namespace>_<name>_<uid>`.
    pub log_root: PathBuf,
    /// The CRI runtime handler (empty: the runtime's default).
    pub runtime_handler: String,
}

/// One pod started by [`Bench::start_pod`].
#[derive(Debug, Clone)]
pub struct StartedPod {
    /// The sandbox id the runtime returned.
    pub sandbox_id: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's log directory.
    pub log_dir: PathBuf,
    /// How long each start step took.
    pub timing: StartTiming,
}

/// Durations of the steps of a pod start.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartTiming {
    /// `RunPodSandbox`.
    pub run_sandbox: Duration,
    /// `CreateContainer`.
    pub create: Duration,
    /// `StartContainer`.
    pub start: Duration,
}

impl StartTiming {
    /// The whole start.
    pub fn total(&self) -> Duration {
        self.run_sandbox + self.create + self.start
    }
}

/// Durations of the steps of a pod teardown.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopTiming {
    /// `StopPodSandbox`.
    pub stop: Duration,
    /// `RemovePodSandbox`.
    pub remove: Duration,
}

impl StopTiming {
    /// The whole teardown.
    pub fn total(&self) -> Duration {
        self.stop + self.remove
    }
}

/// What `Version` and `Status` say about a runtime.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeInfo {
    /// `runtime_name`.
    pub name: String,
    /// `runtime_version`.
    pub version: String,
    /// `runtime_api_version`.
    pub api_version: String,
    /// `RuntimeReady` and `NetworkReady` (false when missing).
    pub runtime_ready: bool,
    /// See `runtime_ready`.
    pub network_ready: bool,
}

/// The answer of [`Bench::probe`].
#[derive(Debug, Clone)]
pub enum Probe {
    /// `Version` and `Status` answered.
    Ready(RuntimeInfo),
    /// The endpoint answers but does not serve the RuntimeService (`Unimplemented`).
    NoRuntimeService(String),
}

/// A connection to one CRI endpoint, and the run every pod it creates belongs to.
#[derive(Debug, Clone)]
pub struct Bench {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    run_id: String,
    cancelled: Arc<AtomicBool>,
}

impl Bench {
    /// Connects to `endpoint` (`unix:///path` or a path). One HTTP/2 connection carries every
    /// call, as the kubelet's does.
    pub async fn connect(endpoint: &str, run_id: &str) -> Result<Self> {
        let channel = deckhand_proto::unix::connect(endpoint).await?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
                .max_encoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE),
            images: ImageServiceClient::new(channel)
                .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
                .max_encoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE),
            run_id: run_id.to_string(),
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The run's id (the value of [`RUN_LABEL`] on its pods).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Makes every later start or stop step fail with "cancelled" (for signal handlers); steps
    /// in flight finish, so the runtime never holds a pod the run does not know how to find.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Whether [`Bench::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn check_cancelled(&self) -> Result<()> {
        if self.is_cancelled() {
            bail!("cancelled");
        }
        Ok(())
    }

    /// Calls `Version` and `Status` of the RuntimeService.
    pub async fn probe(&self) -> Result<Probe> {
        let mut rt = self.runtime.clone();
        let version = match rt
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
        {
            Ok(v) => v.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                return Ok(Probe::NoRuntimeService(s.message().to_string()));
            }
            Err(s) => return Err(s).context("RuntimeService.Version"),
        };
        let status = match rt.status(cri::StatusRequest { verbose: false }).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                return Ok(Probe::NoRuntimeService(format!(
                    "Version answered but Status is unimplemented: {}",
                    s.message()
                )));
            }
            Err(s) => return Err(s).context("RuntimeService.Status"),
        };
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        let ready = |t: &str| conditions.iter().any(|c| c.r#type == t && c.status);
        Ok(Probe::Ready(RuntimeInfo {
            name: version.runtime_name,
            version: version.runtime_version,
            api_version: version.runtime_api_version,
            runtime_ready: ready("RuntimeReady"),
            network_ready: ready("NetworkReady"),
        }))
    }

    /// `ImageStatus`, then `PullImage` if the image is missing, as the kubelet does before
    /// starting a container. Returns whether it pulled.
    pub async fn ensure_image(&self, image: &str) -> Result<bool> {
        let mut img = self.images.clone();
        let spec = cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        let status = img
            .image_status(cri::ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            })
            .await
            .with_context(|| format!("ImageStatus {image}"))?
            .into_inner();
        if status.image.is_some() {
            return Ok(false);
        }
        img.pull_image(cri::PullImageRequest {
            image: Some(spec),
            auth: None,
            sandbox_config: None,
        })
        .await
        .with_context(|| format!("PullImage {image}"))?;
        Ok(true)
    }

    /// The uid of pod `index` of this run.
    pub fn pod_uid(&self, index: usize) -> String {
        format!("{}-{index}", self.run_id)
    }

    /// The `PodSandboxConfig` of pod `index`, as the kubelet builds it (cgroupfs driver).
    pub fn sandbox_config(&self, t: &PodTemplate, index: usize) -> cri::PodSandboxConfig {
        let uid = self.pod_uid(index);
        let name = format!("dhbench-{index}");
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                POD_NAMESPACE.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.clone()),
            (RUN_LABEL.to_string(), self.run_id.clone()),
        ]);
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: POD_NAMESPACE.to_string(),
                attempt: 0,
            }),
            hostname: name.clone(),
            log_directory: pod_log_dir(t, &name, &uid).to_string_lossy().into_owned(),
            dns_config: None,
            port_mappings: Vec::new(),
            labels,
            annotations: HashMap::from([(
                "kubernetes.io/config.source".to_string(),
                "api".to_string(),
            )]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: pod_cgroup(t, &uid),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }

    /// The `ContainerConfig` of the container of a pod (BestEffort, as the kubelet sets it).
    pub fn container_config(
        &self,
        t: &PodTemplate,
        sandbox: &cri::PodSandboxConfig,
    ) -> cri::ContainerConfig {
        let mut labels = sandbox.labels.clone();
        labels.insert(
            "io.kubernetes.container.name".to_string(),
            CONTAINER_NAME.to_string(),
        );
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: CONTAINER_NAME.to_string(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: t.image.clone(),
                ..Default::default()
            }),
            command: t.command.clone(),
            labels,
            log_path: format!("{CONTAINER_NAME}/0.log"),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// Starts pod `index`: log directory (untimed), then `RunPodSandbox`, `CreateContainer`,
    /// `StartContainer`, each timed. On a failure after the sandbox exists, the sandbox is
    /// torn down before the error is returned.
    pub async fn start_pod(&self, t: &PodTemplate, index: usize) -> Result<StartedPod> {
        self.check_cancelled()?;
        let config = self.sandbox_config(t, index);
        let uid = self.pod_uid(index);
        let log_dir = PathBuf::from(&config.log_directory);
        std::fs::create_dir_all(log_dir.join(CONTAINER_NAME))
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let mut rt = self.runtime.clone();
        let mut timing = StartTiming::default();

        let t0 = Instant::now();
        let sandbox_id = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: t.runtime_handler.clone(),
            })
            .await
            .with_context(|| format!("RunPodSandbox of pod {index}"))?
            .into_inner()
            .pod_sandbox_id;
        timing.run_sandbox = t0.elapsed();
        let pod = StartedPod {
            sandbox_id,
            uid,
            log_dir,
            timing,
        };
        match self.start_container(t, &config, &pod).await {
            Ok((create, start)) => Ok(StartedPod {
                timing: StartTiming {
                    create,
                    start,
                    ..pod.timing
                },
                ..pod
            }),
            Err(e) => {
                if let Err(e2) = self.stop_pod(t, &pod).await {
                    tracing::warn!(sandbox = %pod.sandbox_id, error = %format!("{e2:#}"), "teardown after a failed start failed");
                }
                Err(e.context(format!("pod {index}")))
            }
        }
    }

    async fn start_container(
        &self,
        t: &PodTemplate,
        config: &cri::PodSandboxConfig,
        pod: &StartedPod,
    ) -> Result<(Duration, Duration)> {
        self.check_cancelled()?;
        let mut rt = self.runtime.clone();
        let t1 = Instant::now();
        let container_id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
                config: Some(self.container_config(t, config)),
                sandbox_config: Some(config.clone()),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        let create = t1.elapsed();
        self.check_cancelled()?;
        let t2 = Instant::now();
        rt.start_container(cri::StartContainerRequest {
            container_id: container_id.clone(),
        })
        .await
        .with_context(|| format!("StartContainer {container_id}"))?;
        Ok((create, t2.elapsed()))
    }

    /// Tears a pod down: `StopPodSandbox` + `RemovePodSandbox` (timed), then its log directory
    /// and its cgroup (untimed, as the kubelet does). Not stopped by [`Bench::cancel`].
    pub async fn stop_pod(&self, t: &PodTemplate, pod: &StartedPod) -> Result<StopTiming> {
        let timing = self.remove_sandbox(&pod.sandbox_id).await?;
        remove_pod_leftovers(&pod.log_dir, &pod_cgroup(t, &pod.uid));
        Ok(timing)
    }

    async fn remove_sandbox(&self, id: &str) -> Result<StopTiming> {
        let mut rt = self.runtime.clone();
        let t0 = Instant::now();
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .with_context(|| format!("StopPodSandbox {id}"))?;
        let stop = t0.elapsed();
        let t1 = Instant::now();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .with_context(|| format!("RemovePodSandbox {id}"))?;
        Ok(StopTiming {
            stop,
            remove: t1.elapsed(),
        })
    }

    /// Removes every pod of this run the runtime still lists (see [`RUN_LABEL`]), with its log
    /// directory and cgroup. Returns how many it removed.
    pub async fn cleanup(&self, t: &PodTemplate) -> Result<usize> {
        self.cleanup_matching(t, Some(&self.run_id)).await
    }

    /// Removes every pod of any run of this tool (any value of [`RUN_LABEL`]).
    pub async fn cleanup_all(&self, t: &PodTemplate) -> Result<usize> {
        self.cleanup_matching(t, None).await
    }

    async fn cleanup_matching(&self, t: &PodTemplate, run: Option<&str>) -> Result<usize> {
        let mut rt = self.runtime.clone();
        let label_selector = match run {
            Some(r) => HashMap::from([(RUN_LABEL.to_string(), r.to_string())]),
            None => HashMap::new(),
        };
        let items = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    label_selector,
                    ..Default::default()
                }),
            })
            .await
            .context("ListPodSandbox")?
            .into_inner()
            .items;
        let mut removed = 0;
        let mut first_error = None;
        for sb in items
            .into_iter()
            .filter(|s| s.labels.contains_key(RUN_LABEL))
        {
            match self.remove_sandbox(&sb.id).await {
                Ok(_) => {
                    removed += 1;
                    if let Some(m) = &sb.metadata {
                        remove_pod_leftovers(
                            &pod_log_dir(t, &m.name, &m.uid),
                            &pod_cgroup(t, &m.uid),
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(sandbox = %sb.id, error = %format!("{e:#}"), "cannot remove a pod");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.context(format!("{removed} pods removed, some could not be")));
        }
        remove_cgroup(&t.cgroup_parent);
        Ok(removed)
    }

    /// Starts the pods `indices` with at most `parallel` starts in flight (1: one after
    /// another). Stops starting new pods at the first failure or on [`Bench::cancel`]; every pod
    /// that started is pushed to `started` either way, so the caller can tear it down. Returns
    /// the wall time of the phase.
    pub async fn start_pods(
        &self,
        t: &PodTemplate,
        indices: std::ops::Range<usize>,
        parallel: usize,
        started: &mut Vec<StartedPod>,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        if parallel <= 1 {
            for i in indices {
                started.push(self.start_pod(t, i).await?);
            }
            return Ok(t0.elapsed());
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut set = tokio::task::JoinSet::new();
        let mut first_error: Option<anyhow::Error> = None;
        for i in indices {
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .context("semaphore closed")?;
            while let Some(done) = set.try_join_next() {
                collect(done, started, &mut first_error);
            }
            if first_error.is_some() || self.is_cancelled() {
                break;
            }
            let (b, t) = (self.clone(), t.clone());
            set.spawn(async move {
                let r = b.start_pod(&t, i).await;
                drop(permit);
                r
            });
        }
        while let Some(done) = set.join_next().await {
            collect(done, started, &mut first_error);
        }
        self.check_cancelled()?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(t0.elapsed()),
        }
    }

    /// Tears down `pods` with at most `parallel` teardowns in flight. Every pod is tried;
    /// returns the teardown timings of those that succeeded, the wall time, and the first error.
    pub async fn stop_pods(
        &self,
        t: &PodTemplate,
        pods: Vec<StartedPod>,
        parallel: usize,
    ) -> (Vec<StopTiming>, Duration, Option<anyhow::Error>) {
        let t0 = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for pod in pods {
            let (b, t, sem) = (self.clone(), t.clone(), sem.clone());
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                b.stop_pod(&t, &pod).await
            });
        }
        let mut timings = Vec::new();
        let mut first_error = None;
        while let Some(done) = set.join_next().await {
            match done {
                Ok(Ok(st)) => timings.push(st),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(anyhow::Error::new(e).context("teardown task"));
                }
            }
        }
        (timings, t0.elapsed(), first_error)
    }
}

fn collect(
    done: std::result::Result<Result<StartedPod>, tokio::task::JoinError>,
    started: &mut Vec<StartedPod>,
    first_error: &mut Option<anyhow::Error>,
) {
    match done {
        Ok(Ok(p)) => started.push(p),
        Ok(Err(e)) => {
            first_error.get_or_insert(e);
        }
        Err(e) => {
            first_error.get_or_insert(anyhow::Error::new(e).context("start task"));
        }
    }
}

fn namespace_options() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn pod_log_dir(t: &PodTemplate, name: &str, uid: &str) -> PathBuf {
    t.log_root.join(format!("{POD_NAMESPACE}_{name}_{uid}"))
}

fn pod_cgroup(t: &PodTemplate, uid: &str) -> String {
    format!("{}/pod{uid}", t.cgroup_parent.trim_end_matches('/'))
}

/// Removes a pod's log directory and its (empty) cgroup in every hierarchy, as the kubelet does
/// once the sandbox is gone. Failures are logged: they never fail a teardown.
fn remove_pod_leftovers(log_dir: &Path, cgroup: &str) {
    if let Err(e) = std::fs::remove_dir_all(log_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %log_dir.display(), error = %e, "cannot remove a pod's log directory");
    }
    remove_cgroup(cgroup);
}

/// `rmdir` of the cgroup `path` (absolute, cgroupfs style) in every mounted hierarchy where it
/// exists. Only empty cgroups can go; a busy one is logged and left.
pub fn remove_cgroup(path: &str) {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    for mount in cgroup_mounts() {
        let dir = mount.join(rel);
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a cgroup"),
        }
    }
}

/// Mount points of cgroup (v1) and cgroup2 file systems, from /proc/self/mountinfo.
fn cgroup_mounts() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse_cgroup_mounts(&text)
}

fn parse_cgroup_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let mount_point = left.split_whitespace().nth(4)?;
            Some(PathBuf::from(
                <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                    deckhand_cgroups::layout::unescape_mountinfo(mount_point),
                ),
            ))
        })
        .collect()
}

/// Median, p99, min and max of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Median (mean of the two middle samples for an even count).
    pub median_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Smallest sample.
    pub min_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Stats {
    /// Statistics of `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median_ms = if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        };
        // Nearest rank: the smallest sample with at least 99% of the samples at or below it.
        let rank = ((n as f64) * 0.99).ceil() as usize;
        Some(Self {
            n,
            median_ms,
            p99_ms: ms[rank.clamp(1, n) - 1],
            min_ms: ms[0],
            max_ms: ms[n - 1],
        })
    }
}

/// The figures of one phase (starts or teardowns) of a run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// The whole step per pod (start: RunPodSandbox + CreateContainer + StartContainer;
    /// stop: StopPodSandbox + RemovePodSandbox).
    pub pod: Option<Stats>,
    /// Wall time of the phase, all pods, in seconds.
    pub total_s: f64,
    /// Per-RPC statistics, by RPC name.
    pub rpcs: std::collections::BTreeMap<&'static str, Stats>,
}

impl PhaseReport {
    /// The start phase's report.
    pub fn starts(pods: &[StartedPod], wall: Duration) -> Self {
        let of = |f: fn(&StartTiming) -> Duration| {
            Stats::of(&pods.iter().map(|p| f(&p.timing)).collect::<Vec<_>>())
        };
        Self {
            pod: of(StartTiming::total),
            total_s: wall.as_secs_f64(),
            rpcs: [
                ("RunPodSandbox", of(|t| t.run_sandbox)),
                ("CreateContainer", of(|t| t.create)),
                ("StartContainer", of(|t| t.start)),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
        }
    }

    /// The teardown phase's report.
    pub fn stops(timings: &[StopTiming], wall: Duration) -> Self {
        let of =
            |f: fn(&StopTiming) -> Duration| Stats::of(&timings.iter().map(f).collect::<Vec<_>>());
        Self {
            pod: of(StopTiming::total),
            total_s: wall.as_secs_f64(),
            rpcs: [
                ("StopPodSandbox", of(|t| t.stop)),
                ("RemovePodSandbox", of(|t| t.remove)),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect(),
        }
    }

    /// One line per figure, `<prefix>.<what> <value>`, for scripts (`awk`).
    pub fn text(&self, prefix: &str) -> String {
        let mut out = String::new();
        let mut put = |name: &str, s: &Stats| {
            out.push_str(&format!(
                "{prefix}.{name} n={} median_ms={:.2} p99_ms={:.2} min_ms={:.2} max_ms={:.2}\n",
                s.n, s.median_ms, s.p99_ms, s.min_ms, s.max_ms
            ));
        };
        if let Some(s) = &self.pod {
            put("pod", s);
        }
        for (rpc, s) in &self.rpcs {
            put(rpc, s);
        }
        out.push_str(&format!("{prefix}.total_s {:.3}\n", self.total_s));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn stats_median_p99_min_max() {
        let s = Stats::of(&ms(&[5, 1, 3])).expect("samples");
        assert_eq!((s.n, s.median_ms, s.min_ms, s.max_ms), (3, 3.0, 1.0, 5.0));
        assert_eq!(s.p99_ms, 5.0);
        let even = Stats::of(&ms(&[4, 1, 2, 3])).expect("samples");
        assert_eq!(even.median_ms, 2.5);
        // 200 samples 1..=200: nearest-rank p99 is the 198th.
        let many: Vec<u64> = (1..=200).collect();
        assert_eq!(Stats::of(&ms(&many)).expect("samples").p99_ms, 198.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn cgroup_mounts_from_mountinfo() {
        let mi = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /tmp/a\\040b rw - cgroup cgroup rw,memory
29 30 0:5 / /proc rw - proc proc rw
";
        assert_eq!(
            parse_cgroup_mounts(mi),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/tmp/a b"),
            ]
        );
    }

    #[test]
    fn configs_are_kubelet_shaped() {
        // No connection is needed to build the configs; a lazy channel never dials.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ch = tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy();
            let b = Bench {
                runtime: RuntimeServiceClient::new(ch.clone()),
                images: ImageServiceClient::new(ch),
                run_id: "dhb1".into(),
                cancelled: Arc::new(AtomicBool::new(false)),
            };
            let t = PodTemplate {
                image: "127.0.0.1:1/dh/busybox:latest".into(),
                command: vec!["sleep".into(), "3600".into()],
                cgroup_parent: "/dhbench/".into(),
                log_root: PathBuf::from("/tmp/dhlogs"),
                runtime_handler: String::new(),
            };
            let sb = b.sandbox_config(&t, 7);
            let md = sb.metadata.clone().expect("metadata");
            assert_eq!((md.name.as_str(), md.uid.as_str()), ("dhbench-7", "dhb1-7"));
            assert_eq!(sb.hostname, "dhbench-7");
            assert_eq!(sb.log_directory, "/tmp/dhlogs/dh-bench_dhbench-7_dhb1-7");
            assert!(sb.port_mappings.is_empty());
            assert_eq!(sb.labels.get(RUN_LABEL).map(String::as_str), Some("dhb1"));
            let linux = sb.linux.clone().expect("linux");
            assert_eq!(linux.cgroup_parent, "/dhbench/poddhb1-7");
            let c = b.container_config(&t, &sb);
            assert_eq!(c.command, vec!["sleep", "3600"]);
            assert_eq!(c.log_path, "bench/0.log");
            assert_eq!(
                c.image.map(|i| i.image).as_deref(),
                Some("127.0.0.1:1/dh/busybox:latest")
            );
        });
    }

    #[test]
    fn text_report_lines() {
        let r = PhaseReport::stops(
            &[StopTiming {
                stop: Duration::from_millis(3),
                remove: Duration::from_millis(1),
            }],
            Duration::from_millis(4),
        );
        let text = r.text("seq.stop");
        assert!(
            text.contains("seq.stop.pod n=1 median_ms=4.00 p99_ms=4.00"),
            "{text}"
        );
        assert!(
            text.contains("seq.stop.RemovePodSandbox n=1 median_ms=1.00"),
            "{text}"
        );
        assert!(text.contains("seq.stop.total_s 0.004"), "{text}");
    }
}
