//! The per-container state directory (`<root>/<id>/`): `state.json` (written atomically),
//! `exec.fifo` while the container is created but not started, and the monitor's `exit.json`.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Ctx, Result};

pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const FIFO: &str = "exec.fifo";

/// The OCI status of a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        })
    }
}

/// What is recorded on disk for a container.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The init's host pid (0 before it exists).
    pub pid: i32,
    /// The init's start time (field 22 of /proc/pid/stat), to tell a reused pid apart.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The container's cgroupsPath (as given to the cgroup manager).
    #[serde(default)]
    pub cgroups_path: String,
}

/// The OCI state (runc's `state` output, which containerd's shim parses).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// The process state letter and start time of `pid`, if it exists.
pub(crate) fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    // Fields after the comm: state is field 3, starttime field 22.
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl Record {
    /// Whether the recorded init still runs (a zombie counts as stopped).
    pub fn alive(&self) -> bool {
        self.pid > 0
            && matches!(proc_stat(self.pid), Some((st, start)) if start == self.pid_start && st != 'Z' && st != 'X')
    }

    pub fn status(&self, dir: &Path) -> Status {
        if self.pid == 0 {
            return Status::Creating;
        }
        if !self.alive() {
            return Status::Stopped;
        }
        if dir.join(FIFO).exists() {
            Status::Created
        } else {
            Status::Running
        }
    }

    pub fn to_state(&self, dir: &Path) -> State {
        let status = self.status(dir);
        State {
            oci_version: "1.0.2".into(),
            id: self.id.clone(),
            pid: if status == Status::Stopped {
                0
            } else {
                self.pid
            },
            status,
            bundle: self.bundle.clone(),
            rootfs: self.rootfs.clone(),
            created: self.created.clone(),
            annotations: self.annotations.clone(),
        }
    }

    pub(crate) fn load(dir: &Path) -> Result<Record> {
        let p = dir.join(STATE_FILE);
        let b = std::fs::read(&p).ctx(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&b).map_err(|e| super::Error::Other(format!("{}: {e}", p.display())))
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let b = serde_json::to_vec(self).map_err(|e| super::Error::Other(e.to_string()))?;
        write_atomic(&dir.join(STATE_FILE), &b)
    }
}

/// Writes `path` through a temp file and rename, so readers see the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("renaming to {}", path.display()))
}
