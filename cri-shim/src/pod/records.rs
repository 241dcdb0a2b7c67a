//! The persistent records of sandboxes and containers: `<root>/pods/sandboxes/<id>.json` and
//! `<root>/pods/containers/<id>.json`, each written atomically ([`crate::records`]). The CRI
//! configs are kept as their protobuf encoding (base64), so every field the kubelet sent
//! survives a restart exactly; what the runtime learnt (IPs, pids, times) sits beside them.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use deckhand_proto::cri;
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::records::RecordDir;

fn encode(m: &impl prost::Message) -> String {
    base64::engine::general_purpose::STANDARD.encode(m.encode_to_vec())
}

fn decode<M: prost::Message + Default>(s: &str) -> M {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .and_then(|b| M::decode(b.as_slice()).ok())
        .unwrap_or_default()
}

/// What is recorded of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// The `PodSandboxConfig`, protobuf-encoded.
    pub config: String,
    pub runtime_handler: String,
    pub created_at: i64,
    /// Stopped (StopPodSandbox ran): NOTREADY from then on.
    pub stopped: bool,
    /// The pinned network namespace (none with hostNetwork).
    pub netns: Option<PathBuf>,
    /// The pinned IPC and UTS namespaces (none when the host's are used).
    pub ipcns: Option<PathBuf>,
    pub utsns: Option<PathBuf>,
    /// The PID namespace holder when the pod shares one (pid, start time).
    pub pid_holder: Option<(i32, u64)>,
    /// CNI ADD was (or is about to be) run and no DEL ran since: teardown runs a DEL.
    pub network_attached: bool,
    /// Set up completely (namespaces, PID holder, CNI). A record left `false` by a daemon
    /// killed half-way stays NOTREADY after the restart, for the kubelet to stop and remove
    /// (which undoes whatever was done).
    #[serde(default = "complete")]
    pub set_up: bool,
    /// The pod's IPs (first is the primary).
    pub ips: Vec<String>,
    /// The cgroup parent did not exist and was created by us (removed with the sandbox).
    pub created_cgroup_parent: bool,
}

/// Records written before `set_up` existed were only written for complete sandboxes.
fn complete() -> bool {
    true
}

impl SandboxRecord {
    pub fn config(&self) -> cri::PodSandboxConfig {
        decode(&self.config)
    }

    pub fn set_config(&mut self, c: &cri::PodSandboxConfig) {
        self.config = encode(c);
    }

    pub fn metadata(&self) -> cri::PodSandboxMetadata {
        self.config().metadata.unwrap_or_default()
    }

    /// The reserved-name key (as containerd: name, namespace, uid, attempt).
    pub fn name_key(&self) -> String {
        let m = self.metadata();
        format!("sandbox_{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
    }
}

/// What is recorded of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    /// The `ContainerConfig`, protobuf-encoded.
    pub config: String,
    /// The sandbox's name key (for the container's reserved name).
    pub sandbox_name: String,
    pub created_at: i64,
    pub started_at: i64,
    /// The image as the kubelet named it, its id (config digest) and a repo digest.
    pub image: String,
    pub image_id: String,
    pub image_ref: String,
    /// The CRI log file (absolute), empty for none.
    pub log_path: PathBuf,
    pub cgroups_path: String,
    /// The OCI bundle directory.
    pub bundle: PathBuf,
    /// `deckhand-monitor` (pid, start time) once started.
    pub monitor_pid: i32,
    pub monitor_start: u64,
    /// The container's init (host pid, start time) once started.
    pub init_pid: i32,
    pub init_start: u64,
    /// The signal StopContainer sends first (from the image's StopSignal).
    pub stop_signal: i32,
    /// The resources last applied (UpdateContainerResources), protobuf-encoded.
    pub resources: String,
    /// The start failed: the reason and message ContainerStatus reports.
    pub start_error: Option<String>,
    /// The uid/gid/groups the process runs as.
    pub user: (u32, u32, Vec<u32>),
}

impl ContainerRecord {
    pub fn config(&self) -> cri::ContainerConfig {
        decode(&self.config)
    }

    pub fn set_config(&mut self, c: &cri::ContainerConfig) {
        self.config = encode(c);
    }

    pub fn resources(&self) -> Option<cri::LinuxContainerResources> {
        (!self.resources.is_empty()).then(|| decode(&self.resources))
    }

    pub fn set_resources(&mut self, r: &cri::LinuxContainerResources) {
        self.resources = encode(r);
    }

    pub fn metadata(&self) -> cri::ContainerMetadata {
        self.config().metadata.unwrap_or_default()
    }

    pub fn name_key(&self) -> String {
        let m = self.metadata();
        format!("container_{}_{}_{}", m.name, self.sandbox_name, m.attempt)
    }

    pub fn exit_file(&self) -> PathBuf {
        self.bundle.join("exit.json")
    }
}

/// The monitor's exit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitInfo {
    pub exit_code: i32,
    /// RFC 3339 with nanoseconds.
    pub finished_at: String,
    #[serde(default)]
    pub oom_killed: bool,
    #[serde(default)]
    pub pid: i32,
    /// Set when the exit was inferred (the monitor vanished), not recorded.
    #[serde(default)]
    pub unknown: bool,
}

impl ExitInfo {
    /// The finish time in nanoseconds since the epoch.
    pub fn finished_ns(&self) -> i64 {
        parse_rfc3339_ns(&self.finished_at).unwrap_or(0)
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fffffffff]Z` into nanoseconds since the epoch.
pub fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, dd): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':');
    let (h, mi, se): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let mut nanos: i64 = frac.get(..frac.len().min(9))?.parse().ok()?;
    for _ in frac.len().min(9)..9 {
        nanos *= 10;
    }
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) * 1_000_000_000) + nanos)
}

/// The two record directories.
#[derive(Debug)]
pub struct Records {
    sandboxes: RecordDir,
    containers: RecordDir,
}

fn io(e: std::io::Error) -> Error {
    Error::Internal(e.to_string())
}

impl Records {
    pub fn open(dir: &Path) -> Result<Records> {
        Ok(Records {
            sandboxes: RecordDir::open(dir.join("sandboxes")).map_err(io)?,
            containers: RecordDir::open(dir.join("containers")).map_err(io)?,
        })
    }

    pub fn load(&self) -> Result<(Vec<SandboxRecord>, Vec<ContainerRecord>)> {
        Ok((
            self.sandboxes.load().map_err(io)?,
            self.containers.load().map_err(io)?,
        ))
    }

    pub fn put_sandbox(&self, r: &SandboxRecord) -> Result<()> {
        self.sandboxes.write(&r.id, r).map_err(io)
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.sandboxes.delete(id).map_err(io)
    }

    pub fn put_container(&self, r: &ContainerRecord) -> Result<()> {
        self.containers.write(&r.id, r).map_err(io)
    }

    pub fn delete_container(&self, id: &str) -> Result<()> {
        self.containers.delete(id).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        let s = crate::oci::time::rfc3339_nanos(t);
        assert_eq!(parse_rfc3339_ns(&s), Some(1_700_000_000_123_456_789));
        assert_eq!(
            parse_rfc3339_ns("1970-01-01T00:00:01Z"),
            Some(1_000_000_000)
        );
        assert_eq!(parse_rfc3339_ns("garbage"), None);
    }

    #[test]
    fn configs_survive_encoding() {
        let mut r = SandboxRecord {
            id: "x".into(),
            config: String::new(),
            runtime_handler: String::new(),
            created_at: 1,
            stopped: false,
            netns: None,
            ipcns: None,
            utsns: None,
            pid_holder: None,
            network_attached: false,
            set_up: false,
            ips: vec![],
            created_cgroup_parent: false,
        };
        let c = cri::PodSandboxConfig {
            hostname: "h".into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: "p".into(),
                uid: "u".into(),
                namespace: "n".into(),
                attempt: 2,
            }),
            ..Default::default()
        };
        r.set_config(&c);
        let json = serde_json::to_string(&r).expect("encode");
        let back: SandboxRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.config(), c);
        assert_eq!(back.name_key(), "sandbox_p_n_u_2");
        assert!(!back.set_up, "a half-made sandbox stays half-made");
        // A record from before `set_up` existed was complete.
        let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
        old.as_object_mut().expect("object").remove("set_up");
        let old: SandboxRecord = serde_json::from_value(old).expect("decode old");
        assert!(old.set_up);
    }
}
