//! The streaming side of the runtime ([`deckhand_streaming::Runtime`]): Exec runs
//! `deckhand-runc exec` with pipes, or with a terminal whose master comes back over a console
//! socket (resized with `TIOCSWINSZ`); PortForward connects to the port on the pod's loopback
//! through a socket created inside the pod's network namespace.
//! Attach connects to the container's monitor ([`crate::oci::attach`]): output frames go to the
//! client's stdout/stderr, its stdin and resizes go back as frames.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

use deckhand_streaming::{AsyncReadWrite, RuntimeError, Streams, TerminalSize};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Error, Manager};

/// The manager as a streaming runtime.
#[derive(Debug, Clone)]
pub struct StreamRuntime(pub Arc<Manager>);

fn rt_err(e: Error) -> RuntimeError {
    match e {
        Error::NotFound(w) => RuntimeError::NotFound(w),
        e => RuntimeError::Other(e.to_string()),
    }
}

fn set_winsize(fd: &OwnedFd, s: TerminalSize) {
    let ws = libc::winsize {
        ws_row: s.height,
        ws_col: s.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: a valid descriptor and struct.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Copies `r` into `w` until EOF (or EIO: a terminal whose other side is gone), then shuts `w`.
async fn pump(mut r: impl tokio::io::AsyncRead + Unpin, mut w: impl tokio::io::AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                let _ = w.flush().await;
            }
        }
    }
    let _ = w.shutdown().await;
}

impl Manager {
    /// Exec with streams; the command's exit code.
    pub async fn exec_streams(
        self: &Arc<Self>,
        id: &str,
        cmd: &[String],
        tty: bool,
        io: Streams,
    ) -> Result<i32, Error> {
        let (cid, process) = self.exec_process(id, cmd, tty)?;
        let mut c = tokio::process::Command::new(&self.cfg.runc_bin);
        c.arg("--root")
            .arg(self.cfg.runc_root())
            .arg("exec")
            .arg("--process")
            .arg(&process.file)
            .kill_on_drop(true);
        if !tty {
            c.arg(&cid)
                .stdin(if io.stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().map_err(|e| {
                Error::internal(format!("running {}", self.cfg.runc_bin.display()), e)
            })?;
            let mut tasks = Vec::new();
            if let (Some(src), Some(dst)) = (io.stdin, child.stdin.take()) {
                tasks.push(tokio::spawn(pump(src, dst)));
            }
            let out = child.stdout.take();
            let err = child.stderr.take();
            let mut waits = Vec::new();
            if let Some(o) = out {
                match io.stdout {
                    Some(w) => waits.push(tokio::spawn(pump(o, w))),
                    None => waits.push(tokio::spawn(pump(o, tokio::io::sink()))),
                }
            }
            if let Some(e) = err {
                match io.stderr {
                    Some(w) => waits.push(tokio::spawn(pump(e, w))),
                    None => waits.push(tokio::spawn(pump(e, tokio::io::sink()))),
                }
            }
            let status = child
                .wait()
                .await
                .map_err(|e| Error::internal("waiting for exec", e))?;
            for w in waits {
                let _ = w.await;
            }
            for t in tasks {
                t.abort();
            }
            drop(process);
            return Ok(status.code().unwrap_or(255));
        }

        // With a terminal: the runtime sends the pty master to our console socket.
        // Short path (sun_path is 108 bytes): <state>/tty/<16 hex>.sock.
        let tty_dir = self.cfg.state_dir.join("tty");
        std::fs::create_dir_all(&tty_dir).map_err(|e| Error::internal(tty_dir.display(), e))?;
        let sock = tty_dir.join(format!("{}.sock", &super::new_id()[..16]));
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| Error::internal(format!("console socket {}", sock.display()), e))?;
        c.arg("--tty")
            .arg("--console-socket")
            .arg(&sock)
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| Error::internal(format!("running {}", self.cfg.runc_bin.display()), e))?;
        let accepted = tokio::select! {
            a = listener.accept() => a.map_err(|e| Error::internal("console socket", e)),
            s = child.wait() => {
                let mut msg = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut msg).await;
                }
                Err(Error::Internal(format!("exec failed ({:?}): {}", s.ok().and_then(|s| s.code()), msg.trim())))
            }
        };
        let _ = std::fs::remove_file(&sock);
        let (conn, _) = accepted?;
        let conn = conn
            .into_std()
            .map_err(|e| Error::internal("console socket", e))?;
        let _ = conn.set_nonblocking(false);
        let master: OwnedFd =
            tokio::task::spawn_blocking(move || crate::oci::tty::recv_fd(conn.as_raw_fd()))
                .await
                .map_err(|e| Error::internal("console task", e))?
                .map_err(|e| Error::internal("receiving the terminal", e))?;
        let resize_fd = master
            .try_clone()
            .map_err(|e| Error::internal("terminal", e))?;
        let mut resize_task = None;
        if let Some(mut rx) = io.resize {
            resize_task = Some(tokio::spawn(async move {
                while let Some(s) = rx.recv().await {
                    set_winsize(&resize_fd, s);
                }
            }));
        }
        let file = std::fs::File::from(master);
        let reader = tokio::fs::File::from_std(
            file.try_clone()
                .map_err(|e| Error::internal("terminal", e))?,
        );
        let writer = tokio::fs::File::from_std(file);
        let input = io.stdin.map(|src| tokio::spawn(pump(src, writer)));
        let output = match io.stdout {
            Some(w) => tokio::spawn(pump(reader, w)),
            None => tokio::spawn(pump(reader, tokio::io::sink())),
        };
        let status = child
            .wait()
            .await
            .map_err(|e| Error::internal("waiting for exec", e))?;
        let _ = output.await;
        if let Some(i) = input {
            i.abort();
        }
        if let Some(r) = resize_task {
            r.abort();
        }
        drop(process);
        Ok(status.code().unwrap_or(255))
    }

    /// Attach: the monitor's frames to and from the client until the container exits.
    pub async fn attach_streams(&self, id: &str, _tty: bool, io: Streams) -> Result<(), Error> {
        use crate::oci::attach;
        let (_, rec) = self.running(id)?;
        let path = self.attach_socket(&rec.id);
        let fd = attach::connect(&path)
            .map_err(|e| Error::internal(format!("attach socket {}", path.display()), e))?;
        // SAFETY: the OwnedFd moved in stays open, and the same, for the AsyncFd's lifetime.
        let afd = Arc::new(
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    fd,
                    tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
                )
            }
            .map_err(|e| Error::internal("attach socket", e.into_parts().1))?,
        );
        let send = |afd: Arc<tokio::io::unix::AsyncFd<OwnedFd>>, kind: u8, data: Vec<u8>| async move {
            loop {
                let mut g = afd.writable().await?;
                match g.try_io(|f| attach::send(f.get_ref().as_raw_fd(), kind, &data)) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        };
        let mut tasks = Vec::new();
        if let Some(mut stdin) = io.stdin {
            let a = afd.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; attach::MAX_FRAME - 1];
                loop {
                    match stdin.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = send(a.clone(), attach::STDIN, Vec::new()).await;
                            return;
                        }
                        Ok(n) => {
                            if send(a.clone(), attach::STDIN, buf[..n].to_vec())
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        if let Some(mut rx) = io.resize {
            let a = afd.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(s) = rx.recv().await {
                    let mut d = s.width.to_le_bytes().to_vec();
                    d.extend_from_slice(&s.height.to_le_bytes());
                    if send(a.clone(), attach::RESIZE, d).await.is_err() {
                        return;
                    }
                }
            }));
        }
        let (mut out, mut err) = (io.stdout, io.stderr);
        let mut buf = vec![0u8; attach::MAX_FRAME];
        loop {
            let mut g = afd
                .readable()
                .await
                .map_err(|e| Error::internal("attach socket", e))?;
            let n = match g.try_io(|f| attach::recv(f.get_ref().as_raw_fd(), &mut buf)) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_would_block) => continue,
            };
            if n == 0 {
                break;
            }
            let w = match buf[0] {
                attach::STDOUT => out.as_mut(),
                attach::STDERR => err.as_mut(),
                _ => None,
            };
            if let Some(w) = w
                && (w.write_all(&buf[1..n]).await.is_err() || w.flush().await.is_err())
            {
                break;
            }
        }
        for t in tasks {
            t.abort();
        }
        for w in [out.as_mut(), err.as_mut()].into_iter().flatten() {
            let _ = w.shutdown().await;
        }
        Ok(())
    }

    /// PortForward: a TCP connection to `port` on the pod's loopback.
    pub async fn port_forward_stream(
        &self,
        sandbox_id: &str,
        port: u16,
        mut stream: Box<dyn AsyncReadWrite>,
    ) -> Result<(), Error> {
        let netns = self.sandbox_netns(sandbox_id)?;
        let conn = tokio::task::spawn_blocking(move || {
            let ns = deckhand_cni::netns::NetNs::open(&netns)
                .map_err(|e| Error::internal("opening the pod's network namespace", e))?;
            ns.enter_briefly(|| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    std::time::Duration::from_secs(5),
                )
            })
            .map_err(|e| Error::internal("entering the pod's network namespace", e))?
            .map_err(|e| Error::Internal(format!("connecting to port {port} in the pod: {e}")))
        })
        .await
        .map_err(|e| Error::internal("port-forward task", e))??;
        conn.set_nonblocking(true)
            .map_err(|e| Error::internal("socket", e))?;
        let mut conn =
            tokio::net::TcpStream::from_std(conn).map_err(|e| Error::internal("socket", e))?;
        tokio::io::copy_bidirectional(&mut stream, &mut conn)
            .await
            .map(|_| ())
            .map_err(|e| Error::Internal(format!("forwarding port {port}: {e}")))
    }
}

impl deckhand_streaming::Runtime for StreamRuntime {
    fn exec<'a>(
        &'a self,
        container_id: &'a str,
        cmd: &'a [String],
        tty: bool,
        io: Streams,
    ) -> BoxFuture<'a, Result<i32, RuntimeError>> {
        Box::pin(async move {
            self.0
                .exec_streams(container_id, cmd, tty, io)
                .await
                .map_err(rt_err)
        })
    }

    fn attach<'a>(
        &'a self,
        container_id: &'a str,
        tty: bool,
        io: Streams,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.0
                .attach_streams(container_id, tty, io)
                .await
                .map_err(rt_err)
        })
    }

    fn port_forward<'a>(
        &'a self,
        pod_sandbox_id: &'a str,
        port: u16,
        stream: Box<dyn AsyncReadWrite>,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.0
                .port_forward_stream(pod_sandbox_id, port, stream)
                .await
                .map_err(rt_err)
        })
    }
}
