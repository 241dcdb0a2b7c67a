//! The CRI runtime logic on the built-in backend: pod sandboxes and their containers.
//!
//! [`Manager`] is the entry point; `server::runtime_service` is a thin gRPC adapter over it.
//!
//! * A **sandbox** is a set of pinned namespaces, not a process: RunPodSandbox creates the
//!   network, IPC and UTS namespaces on a short-lived thread (`unshare(2)` affects only the
//!   calling thread) and bind-mounts them under `<state_dir>/sandboxes/<id>/`, writes the pod's
//!   `hostname`, `hosts` and `resolv.conf`, mounts its `/dev/shm`, applies its sysctls inside
//!   the namespaces and calls the CNI conflist ([`network`]). A pod that shares its PID
//!   namespace gets a holder process (`deckhand-monitor --hold-pidns`).
//! * A **container** is created as an OCI bundle (`config.json` built by [`spec`] from the CRI
//!   config and the image config, rootfs an overlayfs of the image's snapshots) and started by
//!   exec'ing `deckhand-monitor`, which creates and starts it through [`crate::oci`], stays
//!   its parent and writes the CRI log and the exit file. The daemon never forks.
//! * Every sandbox and container has a JSON record under `<root>/pods/` ([`records`]); after
//!   a restart the manager reloads them, reattaches to the monitors still running and reads the
//!   exit files of those that finished, so nothing runs twice and nothing is lost.
//! * RPCs on one pod are serialised by the sandbox's lock; different pods run in parallel.

mod container;
mod exec;
mod namespaces;
pub mod network;
mod records;
mod sandbox;
pub mod seccomp_default;
pub mod spec;
mod stats;
pub mod streaming;
pub mod user;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use deckhand_proto::cri;
use tokio::sync::mpsc;

use crate::image::ImageStore;

pub use records::{ContainerRecord, ExitInfo, SandboxRecord};

/// Where the manager keeps things and which binaries it runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Persistent root (`/var/lib/deckhand`): records under `pods/`, the CNI cache under `cni/`.
    pub root: PathBuf,
    /// Runtime state (`/run/deckhand`): namespace pins, bundles, the OCI runtime's state.
    pub state_dir: PathBuf,
    /// `deckhand-monitor`.
    pub monitor_bin: PathBuf,
    /// `deckhand-runc` (for exec).
    pub runc_bin: PathBuf,
    /// The CNI configuration directory.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries are looked up.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The interface name inside the pod.
    pub cni_ifname: String,
    /// Clamp negative `oom_score_adj` values when root lacks `CAP_SYS_RESOURCE`.
    pub restrict_oom_score_adj: bool,
    /// The `/dev/shm` size of a pod, in bytes.
    pub shm_size: u64,
}

impl Config {
    /// Defaults for a node: `root` and `state_dir`, binaries next to the current executable.
    pub fn new(root: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Config {
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin"));
        Config {
            root: root.into(),
            state_dir: state_dir.into(),
            monitor_bin: bin_dir.join("deckhand-monitor"),
            runc_bin: bin_dir.join("deckhand-runc"),
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin")],
            cni_ifname: "eth0".into(),
            restrict_oom_score_adj: true,
            shm_size: 64 << 20,
        }
    }

    pub(crate) fn runc_root(&self) -> PathBuf {
        self.state_dir.join("runc")
    }
}

/// Errors of the runtime service, each mapped to its gRPC code by the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn internal(context: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
        Error::Internal(format!("{context}: {e}"))
    }
}

impl From<crate::image::ImageError> for Error {
    fn from(e: crate::image::ImageError) -> Error {
        match e.root() {
            crate::image::ImageError::NotFound(what) => Error::NotFound(what.clone()),
            _ => Error::Internal(e.to_string()),
        }
    }
}

/// How many container events a GetContainerEvents client may have unread before it misses some
/// (the daemon logs it; the kubelet's relist is the safety net).
const EVENT_BACKLOG: usize = 256;

/// A GetContainerEvents subscription: the events its client has not read yet.
pub(crate) type EventReceiver = mpsc::Receiver<Arc<cri::ContainerEventResponse>>;

/// A sandbox in memory: its record and the lock that serialises the pod's RPCs.
#[derive(Debug)]
pub(crate) struct Sandbox {
    pub rec: Mutex<SandboxRecord>,
    pub lock: tokio::sync::Mutex<()>,
}

/// A container in memory: its record and its exit, once known.
#[derive(Debug)]
pub(crate) struct Container {
    pub rec: Mutex<ContainerRecord>,
    pub exit: tokio::sync::watch::Sender<Option<ExitInfo>>,
}

/// The pod and container runtime (see the module docs).
#[derive(Debug)]
pub struct Manager {
    pub(crate) cfg: Config,
    pub(crate) images: Arc<ImageStore>,
    pub(crate) records: records::Records,
    pub(crate) sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    pub(crate) containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Reserved names (`<kind>_<name>_<pod>_<ns>_<uid>_<attempt>`), as containerd's CRI.
    pub(crate) names: Mutex<HashMap<String, String>>,
    /// One bounded queue per GetContainerEvents client. Not a broadcast ring: a ring keeps its
    /// last events, each with a whole pod status, in its slots until they are overwritten,
    /// read or not; a queue holds only what its client has not read yet.
    pub(crate) events: Mutex<Vec<mpsc::Sender<Arc<cri::ContainerEventResponse>>>>,
    pub(crate) pod_cidr: Mutex<String>,
    /// The last CPU sample per container (time, usage) for `usage_nano_cores`.
    pub(crate) cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
}

/// Nanoseconds since the epoch, as the CRI's timestamps.
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A random 64-hex-digit id, as containerd's.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 32];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: writing into our own buffer.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `labels` contain every pair of `selector`.
pub(crate) fn labels_match(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Manager {
    /// Opens the manager: loads the records and reattaches to running containers.
    pub fn open(cfg: Config, images: Arc<ImageStore>) -> Result<Arc<Manager>> {
        for d in [
            cfg.state_dir.join("sandboxes"),
            cfg.state_dir.join("containers"),
            cfg.runc_root(),
        ] {
            std::fs::create_dir_all(&d).map_err(|e| Error::internal(d.display(), e))?;
        }
        let records = records::Records::open(&cfg.root.join("pods"))?;
        let m = Arc::new(Manager {
            cfg,
            images,
            records,
            sandboxes: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            pod_cidr: Mutex::new(String::new()),
            cpu_samples: Mutex::new(HashMap::new()),
        });
        m.recover()?;
        Ok(m)
    }

    /// Loads every record; containers whose monitor still runs are watched again.
    fn recover(self: &Arc<Self>) -> Result<()> {
        let (sandboxes, containers) = self.records.load()?;
        for s in sandboxes {
            self.reserve_name(&s.name_key(), &s.id)?;
            self.sandboxes.lock().map_err(poisoned)?.insert(
                s.id.clone(),
                Arc::new(Sandbox {
                    rec: Mutex::new(s),
                    lock: tokio::sync::Mutex::new(()),
                }),
            );
        }
        for c in containers {
            if !self
                .sandboxes
                .lock()
                .map_err(poisoned)?
                .contains_key(&c.sandbox_id)
            {
                tracing::warn!(container = %c.id, sandbox = %c.sandbox_id, "container of a vanished sandbox: kept for removal");
            }
            if let Err(e) = self.reserve_name(&c.name_key(), &c.id) {
                tracing::warn!(container = %c.id, error = %e, "duplicate container name in records");
            }
            let id = c.id.clone();
            let exit = self.read_exit(&c);
            let running = exit.is_none() && c.monitor_pid > 0;
            let (tx, _) = tokio::sync::watch::channel(exit);
            let ctr = Arc::new(Container {
                rec: Mutex::new(c),
                exit: tx,
            });
            self.containers
                .lock()
                .map_err(poisoned)?
                .insert(id.clone(), ctr.clone());
            if running {
                self.watch_exit(ctr, None);
            }
        }
        let n = self.sandboxes.lock().map_err(poisoned)?.len();
        let m = self.containers.lock().map_err(poisoned)?.len();
        if n + m > 0 {
            tracing::info!(sandboxes = n, containers = m, "recovered from records");
        }
        Ok(())
    }

    pub(crate) fn reserve_name(&self, key: &str, id: &str) -> Result<()> {
        let mut names = self.names.lock().map_err(poisoned)?;
        match names.get(key) {
            Some(other) if other != id => Err(Error::AlreadyExists(format!(
                "the name {key:?} is reserved for {other}"
            ))),
            _ => {
                names.insert(key.to_string(), id.to_string());
                Ok(())
            }
        }
    }

    pub(crate) fn release_name(&self, key: &str) {
        if let Ok(mut names) = self.names.lock() {
            names.remove(key);
        }
    }

    pub(crate) fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>> {
        lookup(
            &*self.sandboxes.lock().map_err(poisoned)?,
            id,
            "pod sandbox",
        )
    }

    pub(crate) fn container(&self, id: &str) -> Result<Arc<Container>> {
        lookup(&*self.containers.lock().map_err(poisoned)?, id, "container")
    }

    pub(crate) fn all_sandboxes(&self) -> Result<Vec<Arc<Sandbox>>> {
        Ok(self
            .sandboxes
            .lock()
            .map_err(poisoned)?
            .values()
            .cloned()
            .collect())
    }

    pub(crate) fn all_containers(&self) -> Result<Vec<Arc<Container>>> {
        Ok(self
            .containers
            .lock()
            .map_err(poisoned)?
            .values()
            .cloned()
            .collect())
    }

    pub(crate) fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<Container>> {
        self.containers
            .lock()
            .map(|m| {
                m.values()
                    .filter(|c| c.rec.lock().is_ok_and(|r| r.sandbox_id == sandbox_id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends an event to every GetContainerEvents subscriber (none listening is fine, and costs
    /// nothing: the statuses are only gathered for someone).
    pub(crate) fn emit(&self, container_id: &str, kind: cri::ContainerEventType) {
        if self.events.lock().map_or(true, |s| s.is_empty()) {
            return;
        }
        let (status, sandbox_status) = match self.container(container_id) {
            Ok(c) => {
                let st = self.container_status_of(&c);
                let sb = c
                    .rec
                    .lock()
                    .ok()
                    .map(|r| r.sandbox_id.clone())
                    .and_then(|sid| self.sandbox(&sid).ok())
                    .map(|s| self.sandbox_status_of(&s));
                (Some(st), sb)
            }
            Err(_) => (None, None),
        };
        let ev = Arc::new(cri::ContainerEventResponse {
            container_id: container_id.to_string(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status: sandbox_status,
            containers_statuses: status.into_iter().collect(),
        });
        if let Ok(mut subs) = self.events.lock() {
            subs.retain(|tx| match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        container = container_id,
                        "a GetContainerEvents client fell behind: it misses this event"
                    );
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }

    /// A stream of container events (GetContainerEvents), from now on. It ends when the
    /// manager is dropped; dropping it unsubscribes (at the next event).
    pub fn subscribe(&self) -> EventReceiver {
        let (tx, rx) = mpsc::channel(EVENT_BACKLOG);
        if let Ok(mut subs) = self.events.lock() {
            subs.push(tx);
        }
        rx
    }

    /// Status: runtime ready; network ready once a valid CNI configuration exists.
    pub fn status(&self, verbose: bool) -> cri::StatusResponse {
        let net = network::Network::new(&self.cfg).ready();
        let mut conditions = vec![cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: true,
            reason: String::new(),
            message: String::new(),
        }];
        conditions.push(match net {
            Ok(()) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(msg) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: format!("Network plugin returns error: {msg}"),
            },
        });
        let mut info = HashMap::new();
        if verbose {
            info.insert(
                "config".to_string(),
                serde_json::json!({
                    "root": self.cfg.root,
                    "stateDir": self.cfg.state_dir,
                    "cniConfDir": self.cfg.cni_conf_dir,
                    "cniBinDirs": self.cfg.cni_bin_dirs,
                    "podCIDR": self.pod_cidr.lock().map(|s| s.clone()).unwrap_or_default(),
                })
                .to_string(),
            );
        }
        cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: vec![cri::RuntimeHandler {
                name: String::new(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            }],
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }
    }

    /// UpdateRuntimeConfig: records the pod CIDR (the CNI configuration is the operator's).
    pub fn update_runtime_config(&self, cfg: Option<cri::RuntimeConfig>) {
        let cidr = cfg
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        if let Ok(mut c) = self.pod_cidr.lock()
            && *c != cidr
        {
            tracing::info!(pod_cidr = %cidr, "pod CIDR updated");
            *c = cidr;
        }
    }
}

/// An entry by id, or by a unique id prefix (as crictl uses them).
fn lookup<T>(map: &HashMap<String, Arc<T>>, id: &str, kind: &str) -> Result<Arc<T>> {
    if let Some(v) = map.get(id) {
        return Ok(v.clone());
    }
    let mut found = map
        .iter()
        .filter(|(k, _)| !id.is_empty() && k.starts_with(id));
    match (found.next(), found.next()) {
        (Some((_, v)), None) => Ok(v.clone()),
        (Some(_), Some(_)) => Err(Error::InvalidArgument(format!(
            "{kind} id prefix {id:?} is ambiguous"
        ))),
        _ => Err(Error::NotFound(format!("{kind} {id:?}"))),
    }
}

pub(crate) fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::Internal("internal lock poisoned".into())
}
