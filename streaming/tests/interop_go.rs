//! Interoperability with upstream's Go implementation: client-go's remotecommand and
//! portforward clients (what kubectl and crictl use) against Deckhand's server, and Deckhand's
//! client against the kubelet's CRI streaming server (k8s.io/kubernetes/pkg/kubelet/cri/streaming).
//!
//! The Go side is `tests/interop/main.go`, built (and cached) by hack/build-streaming-interop.sh
//! from Debian's kubernetes source package; `DH_STREAMING_INTEROP_BIN` overrides the path.

mod support;

use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use deckhand_streaming::Config;
use deckhand_streaming::client::{self, ExecOptions, PortForwarder};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

fn interop_bin() -> Result<String> {
    static BIN: OnceLock<Result<String, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("DH_STREAMING_INTEROP_BIN") {
            return Ok(p);
        }
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hack/build-streaming-interop.sh"
        );
        let out = std::process::Command::new(script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {script}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{script} failed ({}); it needs root and Debian's source package `kubernetes`",
                out.status
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .map(str::to_string)
            .ok_or_else(|| format!("{script} printed no path"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

async fn go_exec(url: &str, flags: &[&str], stdin: &[u8]) -> Result<(i32, String, String)> {
    let mut child = Command::new(interop_bin()?)
        .arg("exec")
        .arg(url)
        .args(flags)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut i = child.stdin.take().context("stdin")?;
    i.write_all(stdin).await?;
    drop(i);
    let out = tokio::time::timeout(T, child.wait_with_output()).await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn go_client_exec_against_our_server() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let url = h.exec_url(
        &["sh", "-c", "cat; echo oops >&2; exit 4"],
        true,
        true,
        true,
        false,
    );
    let (code, out, err) = go_exec(&url, &["-stdin", "-stdout", "-stderr"], b"from go\n").await?;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (4, "from go\n", "oops\n")
    );

    let url = h.exec_url(&["sh", "-c", "echo fine"], false, true, false, false);
    let (code, out, err) = go_exec(&url, &["-stdout"], b"").await?;
    assert_eq!((code, out.as_str()), (0, "fine\n"), "stderr: {err}");

    // A runtime error is a Failure status the Go client reports (not an exit code).
    let url = h
        .server
        .get_exec(&deckhand_proto::cri::ExecRequest {
            container_id: "dh-missing".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })?
        .url;
    let (code, _, err) = go_exec(&url, &["-stdout"], b"").await?;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("dh-missing not found"), "{err}");
    h.stop().await?;

    // Negotiated down to v3 (plain-text errors), as an older client would get.
    let config = Config {
        remotecommand_protocols: vec!["v3.channel.k8s.io".into()],
        ..Default::default()
    };
    let h = Harness::start(config).await?;
    let url = h.exec_url(&["sh", "-c", "echo v3; exit 2"], false, true, false, false);
    let (code, out, err) = go_exec(&url, &["-stdout"], b"").await?;
    assert_eq!((code, out.as_str()), (125, "v3\n"), "{err}");
    assert!(err.contains("non-zero exit code"), "{err}");
    h.stop().await
}

#[tokio::test]
async fn go_client_tty_exec_sends_its_size() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    // The Go client sends 111x33 once; the runtime applies it to the terminal with stty.
    let script = "for i in $(seq 200); do s=$(stty size); \
                  [ \"$s\" = '33 111' ] && { echo \"size $s\"; exit 0; }; sleep 0.05; done; \
                  echo \"size stayed $s\"; exit 9";
    let url = h.exec_url(&["sh", "-c", script], false, true, false, true);
    let (code, out, err) = go_exec(&url, &["-stdout", "-tty"], b"").await?;
    assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
    assert!(out.contains("size 33 111"), "{out:?}");
    h.stop().await
}

#[tokio::test]
async fn go_client_port_forward_against_our_server() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let (port, echo) = echo_server().await?;
    let url = h.port_forward_url(SANDBOX);
    let mut child = Command::new(interop_bin()?)
        .args(["portforward", &url, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = tokio::time::timeout(T, lines.next_line())
        .await??
        .context("no output")?;
    let local: u16 = line
        .strip_prefix("listening ")
        .context("listening line")?
        .parse()?;
    // Two concurrent connections through kubectl's port forwarder.
    let conn = |msg: Vec<u8>| async move {
        let mut s = TcpStream::connect(("127.0.0.1", local)).await?;
        s.write_all(&msg).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        anyhow::ensure!(
            back == msg,
            "echo mismatch: {} bytes back of {}",
            back.len(),
            msg.len()
        );
        anyhow::Ok(())
    };
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let (a, b) = tokio::time::timeout(T, async {
        tokio::join!(conn(big), conn(b"second".to_vec()))
    })
    .await?;
    a?;
    b?;
    drop(child.stdin.take());
    let status = tokio::time::timeout(T, child.wait()).await??;
    assert!(status.success(), "{status}");
    echo.abort();
    h.stop().await
}

/// Upstream's CRI streaming server, driven through the interop binary's stdin.
struct GoServer {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl GoServer {
    async fn start() -> Result<GoServer> {
        let mut child = Command::new(interop_bin()?)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(GoServer {
            child,
            stdin,
            lines,
        })
    }

    async fn url(&mut self, request: &str) -> Result<String> {
        self.stdin
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        let line = tokio::time::timeout(T, self.lines.next_line())
            .await??
            .context("go server exited")?;
        let Some(rest) = line.strip_prefix("http://") else {
            bail!("go server: {line}");
        };
        let host = rest.split('/').next().unwrap_or_default().to_string();
        anyhow::ensure!(host.starts_with("127.0.0.1:"), "go server: {line}");
        // The Go server starts listening in the background: wait until it accepts.
        let deadline = tokio::time::Instant::now() + T;
        while TcpStream::connect(&host).await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "go server not listening"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(line)
    }

    async fn stop(mut self) -> Result<()> {
        drop(self.stdin);
        tokio::time::timeout(T, self.child.wait()).await??;
        Ok(())
    }
}

#[tokio::test]
async fn our_client_against_the_go_server() -> Result<()> {
    let mut go = GoServer::start().await?;
    let url = go
        .url("exec false true true true cat; echo oops >&2; exit 6")
        .await?;
    let (out, out_r) = sink();
    let (err, err_r) = sink();
    let status = tokio::time::timeout(
        T,
        client::exec(
            &url,
            ExecOptions {
                stdin: input(b"to go\n"),
                stdout: Some(out),
                stderr: Some(err),
                ..Default::default()
            },
        ),
    )
    .await??;
    assert_eq!(status.code, 6);
    assert_eq!(read_all(out_r).await, "to go\n");
    assert_eq!(read_all(err_r).await, "oops\n");

    let url = go.url("exec false false true false echo ok").await?;
    let (out, out_r) = sink();
    let status = client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await?;
    assert!(status.success());
    assert_eq!(read_all(out_r).await, "ok\n");

    // Port forwarding: two concurrent connections, then one to a closed port.
    let (port, echo) = echo_server().await?;
    let pf = PortForwarder::connect(&go.url("portforward").await?).await?;
    let mut a = pf.forward(port).await?;
    let mut b = pf.forward(port).await?;
    let big: Vec<u8> = (0..250_000u32).map(|i| (i % 249) as u8).collect();
    let (ra, rb) = tokio::time::timeout(T, async {
        tokio::join!(
            async {
                a.write_all(&big).await?;
                a.shutdown().await?;
                let mut got = Vec::new();
                a.read_to_end(&mut got).await?;
                anyhow::Ok(got)
            },
            async {
                b.write_all(b"beta").await?;
                b.shutdown().await?;
                let mut got = Vec::new();
                b.read_to_end(&mut got).await?;
                anyhow::Ok(got)
            }
        )
    })
    .await?;
    assert_eq!(ra?, big);
    assert_eq!(rb?, b"beta");
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?.port()
    };
    let mut c = pf.forward(closed).await?;
    let mut sink_buf = Vec::new();
    let _ = tokio::time::timeout(T, c.read_to_end(&mut sink_buf)).await?;
    let msg = tokio::time::timeout(T, c.error())
        .await?
        .context("an error message")?;
    assert!(msg.contains(&format!("{closed}")), "{msg}");
    pf.close().await;
    echo.abort();
    go.stop().await
}
