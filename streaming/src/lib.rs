//! The Kubernetes streaming protocols a CRI runtime serves for `Exec`, `Attach` and
//! `PortForward` (upstream: k8s.io/kubelet/pkg/cri/streaming with apimachinery's httpstream/spdy,
//! remotecommand and portforward), and a client that speaks them.
//!
//! - [`Server`]: the CRI calls `get_exec`/`get_attach`/`get_port_forward`, which validate the
//!   request and return a single-use URL (`http://<addr>/exec/<token>`, valid for one minute).
//!   Its HTTP/1.1 listener upgrades a request for that URL to SPDY/3.1, negotiates the
//!   sub-protocol (`v4.channel.k8s.io` … `channel.k8s.io`, `portforward.k8s.io`), collects the
//!   streams the client opens and hands them to the [`Runtime`].
//! - [`Runtime`]: what the CRI implementation provides (run a command, attach, connect a port).
//! - [`client`]: `exec`/`attach`/`port_forward` against such a URL, as crictl and kubectl do.
//! - [`spdy`]: the SPDY/3.1 framing and stream multiplexer underneath.

pub mod client;
mod portforward;
pub mod protocol;
mod remotecommand;
mod server;
pub mod spdy;
mod tokens;

pub use server::{Config, RequestError, Server, ServerError};

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

/// A terminal size, as sent on the `resize` stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// A byte stream both ways (a port-forward connection).
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

/// The client's streams for one exec or attach. A stream is `Some` exactly when the request
/// asked for it (`resize` when it asked for a TTY and the protocol has resize, v3 and later).
///
/// `stdin` reaches EOF when the client half-closes it. Dropping (or shutting down) `stdout` or
/// `stderr` ends that stream for the client; the server does that for the runtime when the
/// call returns.
pub struct Streams {
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub resize: Option<tokio::sync::mpsc::Receiver<TerminalSize>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("resize", &self.resize.is_some())
            .finish()
    }
}

/// A runtime's failure; its message goes to the client (as the `Failure` status on v4, as the
/// error stream's text on older protocols, on the error stream of a port forward).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
}

/// What a CRI runtime implements to serve streaming requests. Each method runs for the whole
/// session. Everything written to `stdout`/`stderr` must have been written when the future
/// resolves: the server then sends the exit status and closes the connection. The server drops
/// the future (cancelling the session) when the client's connection goes away or the server
/// shuts down; what that means for the process (kill it, leave it) is the runtime's choice.
pub trait Runtime: Send + Sync + 'static {
    /// Runs `cmd` in the container with the given streams; returns its exit code.
    fn exec<'a>(
        &'a self,
        container_id: &'a str,
        cmd: &'a [String],
        tty: bool,
        io: Streams,
    ) -> BoxFuture<'a, Result<i32, RuntimeError>>;

    /// Attaches the streams to the container's main process until it exits or the client
    /// goes away (stdin EOF does not end an attach unless the runtime says so).
    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        tty: bool,
        io: Streams,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Connects to `port` inside the sandbox's network namespace and copies both ways until
    /// both directions are done (`stream` reads EOF when the client half-closes).
    fn port_forward<'a>(
        &'a self,
        pod_sandbox_id: &'a str,
        port: u16,
        stream: Box<dyn AsyncReadWrite>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
}
