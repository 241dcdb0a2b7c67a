//! The client side, as crictl and kubectl speak it: upgrade an `http://` streaming URL to
//! SPDY/3.1, open the streams and copy.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::TerminalSize;
use crate::protocol::*;
use crate::remotecommand::{Status, Version};
use crate::spdy::{ConnOptions, Connection, Headers, Role, SpdyError, Stream};

/// How long to wait for the server to accept a stream (upstream: 30 s).
const STREAM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an error stream or error body kept.
const MAX_ERROR: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid streaming URL {0:?}: {1}")]
    Url(String, String),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the server refused the upgrade: {status}: {body}")]
    Refused { status: StatusCode, body: String },
    #[error("SPDY: {0}")]
    Spdy(#[from] SpdyError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The session failed on the server's side (anything but a non-zero exit code).
    #[error("{message}")]
    Remote { reason: String, message: String },
}

/// How a remote command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// The local ends of an exec or attach. The streams requested are the ones given; with `tty`
/// stderr must be `None` (the server refuses tty + stderr).
#[derive(Default)]
pub struct ExecOptions {
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub tty: bool,
    /// Terminal sizes to send (only with `tty`).
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

/// Upgrades `url` to SPDY/3.1 offering `protocols` (most preferred first); returns the
/// connection and the protocol the server chose (`None` if it named none). The building block
/// of [`exec`] and [`PortForwarder`], for callers that speak a protocol themselves.
pub async fn upgrade(
    url: &str,
    protocols: &[&str],
) -> Result<(Connection, Option<String>), ClientError> {
    let bad = |m: &str| ClientError::Url(url.to_string(), m.to_string());
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// URLs are supported"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    let target = match authority.port_u16() {
        Some(_) => authority.to_string(),
        None => format!("{}:80", authority.host()),
    };
    let tcp = TcpStream::connect(&target)
        .await
        .map_err(|e| ClientError::Connect(target.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("streaming client connection: {e}");
        }
    });
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, authority.as_str())
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, SPDY_31);
    for p in protocols {
        req = req.header(HEADER_PROTOCOL_VERSION, *p);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = match Limited::new(resp.into_body(), MAX_ERROR).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
            Err(e) => format!("(body unreadable: {e})"),
        };
        return Err(ClientError::Refused { status, body });
    }
    let protocol = resp
        .headers()
        .get(HEADER_PROTOCOL_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(p) = &protocol
        && !protocols.contains(&p.as_str())
    {
        return Err(ClientError::Http(format!(
            "the server chose protocol {p:?}, which was not offered"
        )));
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let conn = Connection::new(TokioIo::new(upgraded), Role::Client, ConnOptions::default());
    Ok((conn, protocol))
}

async fn open(conn: &Connection, kind: &str) -> Result<Stream, ClientError> {
    let h = Headers::new().with(HEADER_STREAM_TYPE, kind);
    Ok(conn.open(h, STREAM_REPLY_TIMEOUT).await?)
}

/// Runs an exec session against a URL from `Exec` (negotiating v4, accepting v3 and v2).
pub async fn exec(url: &str, opts: ExecOptions) -> Result<ExitStatus, ClientError> {
    let offered = [STREAM_PROTOCOL_V4, STREAM_PROTOCOL_V3, STREAM_PROTOCOL_V2];
    let (conn, protocol) = upgrade(url, &offered).await?;
    let version = Version::from_name(protocol.as_deref());
    let result = run_session(&conn, version, opts).await;
    conn.close(Duration::from_secs(1)).await;
    result
}

/// Runs an attach session against a URL from `Attach`; the same protocol as exec (the exit
/// status is 0 unless the server reports one).
pub async fn attach(url: &str, opts: ExecOptions) -> Result<ExitStatus, ClientError> {
    exec(url, opts).await
}

async fn run_session(
    conn: &Connection,
    version: Version,
    opts: ExecOptions,
) -> Result<ExitStatus, ClientError> {
    let mut error = open(conn, STREAM_TYPE_ERROR).await?;
    // This side never writes to the error stream.
    error.shutdown().await?;
    let error_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let r = (&mut error)
            .take(MAX_ERROR as u64)
            .read_to_end(&mut buf)
            .await;
        r.map(|_| buf)
    });

    let mut stdin_task: Option<JoinHandle<()>> = None;
    if let Some(mut input) = opts.stdin {
        let mut s = open(conn, STREAM_TYPE_STDIN).await?;
        stdin_task = Some(tokio::spawn(async move {
            if let Err(e) = tokio::io::copy(&mut input, &mut s).await {
                tracing::debug!("stdin: {e}");
            }
            let _ = s.shutdown().await;
        }));
    }
    let mut copies = Vec::new();
    for (kind, out) in [
        (STREAM_TYPE_STDOUT, opts.stdout),
        (STREAM_TYPE_STDERR, opts.stderr),
    ] {
        if let Some(mut out) = out {
            let mut s = open(conn, kind).await?;
            copies.push(tokio::spawn(async move {
                let r = tokio::io::copy(&mut s, &mut out).await;
                let _ = out.flush().await;
                r.map(|_| ())
            }));
        }
    }
    let mut resize_task = None;
    if opts.tty && version >= Version::V3 {
        let mut s = open(conn, STREAM_TYPE_RESIZE).await?;
        if let Some(mut sizes) = opts.resize {
            resize_task = Some(tokio::spawn(async move {
                while let Some(size) = sizes.recv().await {
                    let Ok(mut msg) = serde_json::to_vec(&size) else {
                        break;
                    };
                    msg.push(b'\n');
                    if s.write_all(&msg).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            }));
        }
    }

    let mut copy_error = None;
    for c in copies {
        match c.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => copy_error = Some(ClientError::Io(e)),
            Err(e) => copy_error = Some(ClientError::Http(format!("copy task: {e}"))),
        }
    }
    let raw = match error_task.await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(ClientError::Io(e)),
        Err(e) => return Err(ClientError::Http(format!("error stream task: {e}"))),
    };
    for t in [stdin_task, resize_task].into_iter().flatten() {
        t.abort();
    }
    let status = decode_status(version, &raw)?;
    if let Some(e) = copy_error {
        return Err(e);
    }
    Ok(status)
}

fn decode_status(version: Version, raw: &[u8]) -> Result<ExitStatus, ClientError> {
    if version < Version::V4 {
        if raw.is_empty() {
            return Ok(ExitStatus { code: 0 });
        }
        return Err(ClientError::Remote {
            reason: String::new(),
            message: String::from_utf8_lossy(raw).into_owned(),
        });
    }
    if raw.is_empty() {
        // The server closed without a status: upstream treats that as success too.
        return Ok(ExitStatus { code: 0 });
    }
    let status: Status = serde_json::from_slice(raw).map_err(|e| ClientError::Remote {
        reason: String::new(),
        message: format!(
            "error stream: invalid status ({e}): {}",
            String::from_utf8_lossy(raw)
        ),
    })?;
    if status.status == "Success" {
        return Ok(ExitStatus { code: 0 });
    }
    if status.reason == "NonZeroExitCode"
        && let Some(code) = status
            .details
            .iter()
            .flat_map(|d| d.causes.iter())
            .find(|c| c.reason == "ExitCode")
            .and_then(|c| c.message.parse::<i32>().ok())
    {
        return Ok(ExitStatus { code });
    }
    Err(ClientError::Remote {
        reason: status.reason,
        message: status.message,
    })
}

/// One port-forward connection; any number of forwards over it.
pub struct PortForwarder {
    conn: Arc<Connection>,
    next_request: AtomicU64,
}

impl PortForwarder {
    /// Connects to a URL from `PortForward`.
    pub async fn connect(url: &str) -> Result<PortForwarder, ClientError> {
        let (conn, _) = upgrade(url, &[PORT_FORWARD_V1]).await?;
        Ok(PortForwarder {
            conn: Arc::new(conn),
            next_request: AtomicU64::new(0),
        })
    }

    /// Opens a forwarded connection to `port` in the pod.
    pub async fn forward(&self, port: u16) -> Result<PortForwardStream, ClientError> {
        let id = self
            .next_request
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let headers = |kind: &str| {
            Headers::new()
                .with(HEADER_STREAM_TYPE, kind)
                .with(HEADER_PORT, port.to_string())
                .with(HEADER_REQUEST_ID, id.clone())
        };
        let mut error = self
            .conn
            .open(headers(STREAM_TYPE_ERROR), STREAM_REPLY_TIMEOUT)
            .await?;
        error.shutdown().await?;
        let error_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut error)
                .take(MAX_ERROR as u64)
                .read_to_end(&mut buf)
                .await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        let data = self
            .conn
            .open(headers(STREAM_TYPE_DATA), STREAM_REPLY_TIMEOUT)
            .await?;
        Ok(PortForwardStream {
            data,
            error: Some(error_task),
            _conn: self.conn.clone(),
        })
    }

    /// Closes the connection (ending every forward).
    pub async fn close(&self) {
        self.conn.close(Duration::from_secs(1)).await;
    }
}

/// Connects to `url` and forwards one connection to `port`.
pub async fn port_forward(url: &str, port: u16) -> Result<PortForwardStream, ClientError> {
    PortForwarder::connect(url).await?.forward(port).await
}

/// A forwarded connection: read and write it like a socket; `shutdown` half-closes.
pub struct PortForwardStream {
    data: Stream,
    error: Option<JoinHandle<String>>,
    _conn: Arc<Connection>,
}

impl PortForwardStream {
    /// What the server wrote on the error stream (waits for it to close; `None` if empty).
    pub async fn error(&mut self) -> Option<String> {
        let msg = self.error.take()?.await.ok()?;
        (!msg.is_empty()).then_some(msg)
    }
}

impl AsyncRead for PortForwardStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().data).poll_read(cx, buf)
    }
}

impl AsyncWrite for PortForwardStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().data).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().data).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().data).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decode_as_upstream_clients_do() {
        let ok = br#"{"metadata":{},"status":"Success"}"#;
        assert_eq!(decode_status(Version::V4, ok).expect("ok").code, 0);
        let exit = serde_json::to_vec(&Status::exit_code(7)).expect("json");
        assert_eq!(decode_status(Version::V4, &exit).expect("exit").code, 7);
        let internal = serde_json::to_vec(&Status::internal("boom")).expect("json");
        let err = decode_status(Version::V4, &internal).expect_err("internal");
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(decode_status(Version::V4, b"{not json").is_err());
        assert_eq!(decode_status(Version::V3, b"").expect("ok").code, 0);
        assert!(decode_status(Version::V3, b"it broke").is_err());
    }
}
