//! Shared by the integration tests: a `Runtime` that runs real processes (`sh`, with a real
//! pseudo-terminal for TTY sessions) and forwards to real TCP ports on loopback, and a harness
//! that runs a `Server` with it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use deckhand_proto::cri;
use deckhand_streaming::{
    AsyncReadWrite, Config, Runtime, RuntimeError, Server, Streams, TerminalSize,
};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

pub const T: Duration = Duration::from_secs(20);
pub const CONTAINER: &str = "dh-container";
pub const SANDBOX: &str = "dh-sandbox";

/// Containers are plain processes; "dh-container" exists, anything else does not.
#[derive(Default)]
pub struct ProcessRuntime {
    /// Main processes of containers that can be attached to.
    pub attachable: Mutex<HashMap<String, Child>>,
}

async fn pump_in(mut from: Box<dyn AsyncRead + Send + Unpin>, mut to: impl AsyncWrite + Unpin) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

async fn pump_out(mut from: impl AsyncRead + Unpin, mut to: Box<dyn AsyncWrite + Send + Unpin>) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

impl ProcessRuntime {
    async fn exec_pipes(&self, cmd: &[String], io: Streams) -> Result<i32, RuntimeError> {
        let err = |e: std::io::Error| RuntimeError::Other(e.to_string());
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(if io.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if io.stdout.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if io.stderr.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .map_err(err)?;
        let mut tasks = Vec::new();
        if let (Some(i), Some(p)) = (io.stdin, child.stdin.take()) {
            // Not awaited: stdin may stay open after the process exits.
            tokio::spawn(pump_in(i, p));
        }
        if let (Some(o), Some(p)) = (io.stdout, child.stdout.take()) {
            tasks.push(tokio::spawn(pump_out(p, o)));
        }
        if let (Some(o), Some(p)) = (io.stderr, child.stderr.take()) {
            tasks.push(tokio::spawn(pump_out(p, o)));
        }
        let status = child.wait().await.map_err(err)?;
        for t in tasks {
            let _ = t.await;
        }
        Ok(status.code().unwrap_or(128))
    }

    /// Runs `cmd` as the session leader of a new pseudo-terminal; resizes are applied to the
    /// terminal with `stty`, so the process sees them as it would in a container.
    async fn exec_tty(&self, cmd: &[String], mut io: Streams) -> Result<i32, RuntimeError> {
        let err = |e: &dyn std::fmt::Display| RuntimeError::Other(e.to_string());
        let pty = nix::pty::openpty(None, None).map_err(|e| err(&e))?;
        let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
            .map_err(|e| err(&e))?;
        let stdio = |fd: &OwnedFd| -> Result<Stdio, RuntimeError> {
            Ok(Stdio::from(fd.try_clone().map_err(|e| err(&e))?))
        };
        let mut child = Command::new("setsid")
            .arg("-c")
            .args(cmd)
            .stdin(stdio(&pty.slave)?)
            .stdout(stdio(&pty.slave)?)
            .stderr(stdio(&pty.slave)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err(&e))?;
        drop(pty.slave);
        let master = std::fs::File::from(pty.master);
        let reader = tokio::fs::File::from_std(master.try_clone().map_err(|e| err(&e))?);
        let writer = tokio::fs::File::from_std(master);
        if let Some(mut sizes) = io.resize.take() {
            let path = slave_path.clone();
            tokio::spawn(async move {
                while let Some(TerminalSize { width, height }) = sizes.recv().await {
                    let _ = Command::new("stty")
                        .arg("-F")
                        .arg(&path)
                        .args(["cols", &width.to_string(), "rows", &height.to_string()])
                        .status()
                        .await;
                }
            });
        }
        if let Some(i) = io.stdin.take() {
            tokio::spawn(pump_in(i, writer));
        }
        let out = io.stdout.take().map(|o| {
            tokio::spawn(async move {
                let mut reader = reader;
                let mut o = o;
                let mut buf = [0u8; 4096];
                // EIO from the master means every slave is closed: the end of output.
                while let Ok(n) = reader.read(&mut buf).await {
                    if n == 0 || o.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = o.shutdown().await;
            })
        });
        let status = child.wait().await.map_err(|e| err(&e))?;
        if let Some(t) = out {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        Ok(status.code().unwrap_or(128))
    }
}

impl Runtime for ProcessRuntime {
    fn exec<'a>(
        &'a self,
        container_id: &'a str,
        cmd: &'a [String],
        tty: bool,
        io: Streams,
    ) -> BoxFuture<'a, Result<i32, RuntimeError>> {
        Box::pin(async move {
            if container_id != CONTAINER {
                return Err(RuntimeError::NotFound(container_id.to_string()));
            }
            if tty {
                self.exec_tty(cmd, io).await
            } else {
                self.exec_pipes(cmd, io).await
            }
        })
    }

    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        _tty: bool,
        io: Streams,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let child = self
                .attachable
                .lock()
                .map_err(|_| RuntimeError::Other("poisoned".into()))?
                .remove(container_id);
            let Some(mut child) = child else {
                return Err(RuntimeError::NotFound(container_id.to_string()));
            };
            if let (Some(i), Some(p)) = (io.stdin, child.stdin.take()) {
                tokio::spawn(pump_in(i, p));
            }
            let out = match (io.stdout, child.stdout.take()) {
                (Some(o), Some(p)) => Some(tokio::spawn(pump_out(p, o))),
                _ => None,
            };
            child
                .wait()
                .await
                .map_err(|e| RuntimeError::Other(e.to_string()))?;
            if let Some(t) = out {
                let _ = t.await;
            }
            Ok(())
        })
    }

    fn port_forward<'a>(
        &'a self,
        pod_sandbox_id: &'a str,
        port: u16,
        mut stream: Box<dyn AsyncReadWrite>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if pod_sandbox_id != SANDBOX {
                return Err(RuntimeError::NotFound(pod_sandbox_id.to_string()));
            }
            let mut tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| RuntimeError::Other(e.to_string()))?;
            tokio::io::copy_bidirectional(&mut stream, &mut tcp)
                .await
                .map_err(|e| RuntimeError::Other(e.to_string()))?;
            Ok(())
        })
    }
}

pub struct Harness {
    pub server: Server,
    pub runtime: Arc<ProcessRuntime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    pub async fn start(config: Config) -> Result<Harness> {
        let runtime = Arc::new(ProcessRuntime::default());
        let server = Server::new(config, runtime.clone());
        let addr = server.bind().await?;
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
        let (stop, rx) = oneshot::channel();
        let s = server.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = s
                .serve(async {
                    let _ = rx.await;
                })
                .await
            {
                panic!("serve: {e}");
            }
        });
        Ok(Harness {
            server,
            runtime,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn exec_url(
        &self,
        cmd: &[&str],
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    ) -> String {
        self.server
            .get_exec(&cri::ExecRequest {
                container_id: CONTAINER.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout,
                stderr,
            })
            .expect("get_exec")
            .url
    }

    pub fn port_forward_url(&self, sandbox: &str) -> String {
        self.server
            .get_port_forward(&cri::PortForwardRequest {
                pod_sandbox_id: sandbox.into(),
                port: vec![],
            })
            .expect("get_port_forward")
            .url
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(T, t).await.context("server stop")??;
        }
        Ok(())
    }
}

/// Output sinks that the test reads back.
pub fn sink() -> (Box<dyn AsyncWrite + Send + Unpin>, DuplexStream) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (Box::new(a), b)
}

pub async fn read_all(mut r: DuplexStream) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s).await;
    s
}

pub fn input(data: &'static [u8]) -> Option<Box<dyn AsyncRead + Send + Unpin>> {
    Some(Box::new(data))
}

pub async fn echo_server() -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((port, task))
}
