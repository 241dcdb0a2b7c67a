//! remotecommand (exec and attach) over an upgraded SPDY connection, server side.

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::protocol::*;
use crate::server::Inner;
use crate::spdy::frame::rst;
use crate::spdy::{Connection, Stream};
use crate::tokens::Pending;
use crate::{RuntimeError, Streams, TerminalSize};

/// The remotecommand protocol versions, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    V1,
    V2,
    V3,
    V4,
}

impl Version {
    pub(crate) fn from_name(name: Option<&str>) -> Version {
        match name {
            Some(STREAM_PROTOCOL_V4) => Version::V4,
            Some(STREAM_PROTOCOL_V3) => Version::V3,
            Some(STREAM_PROTOCOL_V2) => Version::V2,
            _ => Version::V1,
        }
    }
}

/// metav1.Status, as much of it as remotecommand uses.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StatusCause {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Status {
    pub(crate) fn success() -> Status {
        Status {
            metadata: Default::default(),
            status: "Success".into(),
            message: String::new(),
            reason: String::new(),
            details: None,
            code: None,
        }
    }

    /// What upstream's kubelet reports for a command's non-zero exit.
    pub(crate) fn exit_code(code: i32) -> Status {
        Status {
            metadata: Default::default(),
            status: "Failure".into(),
            message: format!("command terminated with non-zero exit code: exit status {code}"),
            reason: "NonZeroExitCode".into(),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    reason: "ExitCode".into(),
                    message: code.to_string(),
                }],
            }),
            code: None,
        }
    }

    /// apierrors.NewInternalError.
    pub(crate) fn internal(err: &str) -> Status {
        Status {
            metadata: Default::default(),
            status: "Failure".into(),
            message: format!("Internal error occurred: {err}"),
            reason: "InternalError".into(),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    reason: String::new(),
                    message: err.to_string(),
                }],
            }),
            code: Some(500),
        }
    }
}

struct Collected {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

/// Serves one exec or attach session on `conn`.
pub(crate) async fn serve(inner: &Inner, conn: &Connection, req: Pending, protocol: Option<&str>) {
    let version = Version::from_name(protocol);
    let (container, cmd, tty, stdin, stdout, stderr) = match &req {
        Pending::Exec(r) => (
            &r.container_id,
            Some(&r.cmd),
            r.tty,
            r.stdin,
            r.stdout,
            r.stderr,
        ),
        Pending::Attach(r) => (&r.container_id, None, r.tty, r.stdin, r.stdout, r.stderr),
        Pending::PortForward(_) => return,
    };
    let want_resize = tty && version >= Version::V3;
    let mut c = Collected {
        error: None,
        stdin: None,
        stdout: None,
        stderr: None,
        resize: None,
    };
    let complete = |c: &Collected| {
        c.error.is_some()
            && (!stdin || c.stdin.is_some())
            && (!stdout || c.stdout.is_some())
            && (!stderr || c.stderr.is_some())
            && (!want_resize || c.resize.is_some())
    };
    let deadline = tokio::time::Instant::now() + inner.config.stream_creation_timeout;
    while !complete(&c) {
        let stream = tokio::select! {
            s = conn.accept() => match s {
                Some(s) => s,
                None => return,
            },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("{container}: timed out waiting for client to create streams");
                return;
            }
        };
        let kind = stream
            .headers()
            .get(HEADER_STREAM_TYPE)
            .unwrap_or("")
            .to_string();
        let slot = match kind.as_str() {
            STREAM_TYPE_ERROR => &mut c.error,
            STREAM_TYPE_STDIN if stdin => &mut c.stdin,
            STREAM_TYPE_STDOUT if stdout => &mut c.stdout,
            STREAM_TYPE_STDERR if stderr => &mut c.stderr,
            STREAM_TYPE_RESIZE if want_resize => &mut c.resize,
            _ => {
                tracing::debug!("{container}: unexpected stream type {kind:?}");
                stream.reset(rst::REFUSED_STREAM).await;
                continue;
            }
        };
        if slot.is_some() {
            tracing::debug!("{container}: duplicate {kind} stream");
            stream.reset(rst::PROTOCOL_ERROR).await;
            continue;
        }
        if stream.reply().await.is_err() {
            return;
        }
        *slot = Some(stream);
    }
    let Some(mut error) = c.error.take() else {
        return;
    };
    let resize_rx = c.resize.take().map(spawn_resize_reader);
    let io = Streams {
        stdin: c.stdin.take().map(|s| Box::new(s) as _),
        stdout: c.stdout.take().map(|s| Box::new(s) as _),
        stderr: c.stderr.take().map(|s| Box::new(s) as _),
        resize: resize_rx,
    };
    let runtime = &inner.runtime;
    let run = async {
        match cmd {
            Some(cmd) => runtime.exec(container, cmd, tty, io).await,
            None => runtime.attach(container, tty, io).await.map(|()| 0),
        }
    };
    // Streams opened after the session started are refused, so they cannot stall the
    // connection's reader.
    let refuse_extra = async {
        while let Some(extra) = conn.accept().await {
            tracing::debug!("{container}: refusing a stream opened mid-session");
            extra.reset(rst::REFUSED_STREAM).await;
        }
    };
    let result: Result<i32, RuntimeError> = tokio::select! {
        r = run => r,
        // `accept` ends only when the connection is gone.
        _ = refuse_extra => {
            tracing::debug!("{container}: client went away");
            return;
        }
        _ = conn.closed() => {
            tracing::debug!("{container}: client went away");
            return;
        }
    };
    let status = match &result {
        Ok(0) => Status::success(),
        Ok(code) => Status::exit_code(*code),
        Err(e) => {
            tracing::warn!("{container}: {e}");
            Status::internal(&e.to_string())
        }
    };
    let payload = if version >= Version::V4 {
        serde_json::to_vec(&status).unwrap_or_default()
    } else if status.status == "Success" {
        Vec::new()
    } else {
        status.message.into_bytes()
    };
    if let Err(e) = error.write_and_close(&payload).await {
        tracing::debug!("{container}: writing status: {e}");
    }
}

/// Decodes the resize stream: a sequence of JSON `{"Width":..,"Height":..}` values.
fn spawn_resize_reader(mut stream: Stream) -> mpsc::Receiver<TerminalSize> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut consumed = 0;
            {
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TerminalSize>();
                loop {
                    match it.next() {
                        Some(Ok(size)) => {
                            consumed = it.byte_offset();
                            if tx.send(size).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) if e.is_eof() => break,
                        Some(Err(e)) => {
                            tracing::debug!("bad resize message: {e}");
                            return;
                        }
                        None => {
                            consumed = buf.len();
                            break;
                        }
                    }
                }
            }
            buf.drain(..consumed);
            if buf.len() > 4096 {
                tracing::debug!("resize message too long");
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_matches_upstream_shape() {
        let s = serde_json::to_value(Status::exit_code(3)).expect("json");
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        let ok = serde_json::to_string(&Status::success()).expect("json");
        assert_eq!(ok, r#"{"metadata":{},"status":"Success"}"#);
    }

    #[test]
    fn version_order() {
        assert!(Version::from_name(Some(STREAM_PROTOCOL_V4)) > Version::V3);
        assert_eq!(Version::from_name(None), Version::V1);
    }
}
