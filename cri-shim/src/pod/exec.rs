//! ExecSync: `deckhand-runc exec` with the container's process settings and the given
//! command, its output captured (each stream capped at 16 MiB, the rest discarded, as the CRI
//! asks since CVE-2022-1708), killed when the timeout passes.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use deckhand_proto::cri;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{Error, Manager, Result, new_id};

/// The cap on each captured stream.
pub const MAX_OUTPUT: usize = 16 << 20;

/// Reads all of `r`, keeping the first `cap` bytes.
async fn capped(mut r: impl AsyncRead + Unpin, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                let room = cap.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// What an exec runs: the container's process with other args.
pub(crate) struct ExecProcess {
    /// The process JSON file for `deckhand-runc exec --process`.
    pub file: PathBuf,
}

impl Drop for ExecProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

impl Manager {
    /// Writes the OCI process of an exec: the container's process (user, env, cwd,
    /// capabilities, no_new_privileges) with `cmd` as args.
    pub(crate) fn exec_process(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
    ) -> Result<(String, ExecProcess)> {
        if cmd.is_empty() {
            return Err(Error::InvalidArgument("exec needs a command".into()));
        }
        let (_, rec) = self.running(id)?;
        let spec: serde_json::Value = std::fs::read(rec.bundle.join("config.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .ok_or_else(|| Error::Internal("the container's config.json is unreadable".into()))?;
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = serde_json::json!(tty);
        if let Some(p) = process.as_object_mut() {
            // Exec'd processes keep the container's OOM score (no adjustment of their own).
            p.remove("oomScoreAdj");
            p.remove("rlimits");
        }
        let file = rec.bundle.join(format!("exec-{}.json", &new_id()[..16]));
        let data = serde_json::to_vec(&process).map_err(|e| Error::internal("process", e))?;
        std::fs::write(&file, data).map_err(|e| Error::internal(file.display(), e))?;
        Ok((rec.id, ExecProcess { file }))
    }

    /// ExecSync.
    pub async fn exec_sync(
        self: &Arc<Self>,
        id: &str,
        cmd: &[String],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse> {
        let (cid, process) = self.exec_process(id, cmd, false)?;
        let pid_file = process.file.with_extension("pid");
        let mut child = tokio::process::Command::new(&self.cfg.runc_bin)
            .arg("--root")
            .arg(self.cfg.runc_root())
            .arg("exec")
            .arg("--process")
            .arg(&process.file)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::internal(format!("running {}", self.cfg.runc_bin.display()), e))?;
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(capped(o, MAX_OUTPUT)));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(capped(e, MAX_OUTPUT)));
        let wait = child.wait();
        let status = if timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout as u64), wait).await {
                Ok(s) => s,
                Err(_) => {
                    // Kill the exec'd process itself, then the runtime waiting for it.
                    if let Some(pid) = std::fs::read_to_string(&pid_file)
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    {
                        // SAFETY: plain kill of the pid the runtime just wrote.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    let _ = child.kill().await;
                    let _ = std::fs::remove_file(&pid_file);
                    return Err(Error::DeadlineExceeded(format!(
                        "command {cmd:?} timed out after {timeout}s"
                    )));
                }
            }
        } else {
            wait.await
        }
        .map_err(|e| Error::internal("waiting for exec", e))?;
        let _ = std::fs::remove_file(&pid_file);
        let stdout = match out {
            Some(h) => h.await.unwrap_or_default(),
            None => Vec::new(),
        };
        let stderr = match err {
            Some(h) => h.await.unwrap_or_default(),
            None => Vec::new(),
        };
        let code = status.code().unwrap_or(255);
        Ok(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: code,
        })
    }
}
