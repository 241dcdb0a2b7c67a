//! The streaming server and client end to end on loopback, with a `Runtime` that runs real
//! processes (see `support`).

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use deckhand_proto::cri;
use deckhand_streaming::client::{self, ClientError, ExecOptions, PortForwarder};
use deckhand_streaming::{Config, RequestError, Server, TerminalSize};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::mpsc;

#[tokio::test]
async fn exec_with_stdin_stdout_stderr_and_exit_codes() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let url = h.exec_url(
        &["sh", "-c", "cat; echo oops >&2; exit 3"],
        true,
        true,
        true,
        false,
    );
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/exec/"),
        "{url}"
    );
    let (out, out_r) = sink();
    let (err, err_r) = sink();
    let status = tokio::time::timeout(
        T,
        client::exec(
            &url,
            ExecOptions {
                stdin: input(b"hello\nworld\n"),
                stdout: Some(out),
                stderr: Some(err),
                ..Default::default()
            },
        ),
    )
    .await??;
    assert_eq!(status.code, 3);
    assert_eq!(read_all(out_r).await, "hello\nworld\n");
    assert_eq!(read_all(err_r).await, "oops\n");

    // A large output, success.
    let url = h.exec_url(
        &["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"],
        false,
        true,
        false,
        false,
    );
    let (out, out_r) = sink();
    let reader = tokio::spawn(read_all(out_r));
    let status = client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await?;
    assert!(status.success());
    let got = reader.await?;
    assert_eq!(got.len(), 3_000_000);
    assert!(got.bytes().all(|b| b == b'x'));
    h.stop().await
}

#[tokio::test]
async fn runtime_errors_reach_the_client() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let url = h
        .server
        .get_exec(&cri::ExecRequest {
            container_id: "dh-missing".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })?
        .url;
    let (out, _r) = sink();
    let err = client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await
    .expect_err("missing container");
    match err {
        ClientError::Remote { reason, message } => {
            assert_eq!(reason, "InternalError");
            assert!(message.contains("dh-missing not found"), "{message}");
        }
        other => bail!("unexpected error {other}"),
    }
    // The command itself cannot be started.
    let url = h.exec_url(&["/nonexistent/dh-binary"], false, true, false, false);
    let (out, _r) = sink();
    let err = client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await
    .expect_err("no such binary");
    assert!(matches!(err, ClientError::Remote { .. }), "{err}");
    h.stop().await
}

#[tokio::test]
async fn older_protocols_report_errors_as_text() -> Result<()> {
    let config = Config {
        remotecommand_protocols: vec!["v3.channel.k8s.io".into()],
        ..Default::default()
    };
    let h = Harness::start(config).await?;
    let url = h.exec_url(&["sh", "-c", "echo hi; exit 5"], false, true, false, false);
    let (out, out_r) = sink();
    let err = client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await
    .expect_err("v3 has no exit codes");
    assert!(err.to_string().contains("non-zero exit code"), "{err}");
    assert_eq!(read_all(out_r).await, "hi\n");
    let url = h.exec_url(&["true"], false, true, false, false);
    let (out, _r) = sink();
    assert!(
        client::exec(
            &url,
            ExecOptions {
                stdout: Some(out),
                ..Default::default()
            }
        )
        .await?
        .success()
    );
    h.stop().await
}

#[tokio::test]
async fn tty_exec_applies_resizes() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    // Prints the terminal size for every input line, until "quit".
    let url = h.exec_url(
        &[
            "sh",
            "-c",
            "while read l; do [ \"$l\" = quit ] && exit 7; echo \"size=$(stty size)\"; done",
        ],
        true,
        true,
        false,
        true,
    );
    let (stdin_w, stdin_r) = tokio::io::duplex(4096);
    let (out, mut out_r) = sink();
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let session = tokio::spawn(async move {
        client::exec(
            &url,
            ExecOptions {
                stdin: Some(Box::new(stdin_r)),
                stdout: Some(out),
                tty: true,
                resize: Some(resize_rx),
                ..Default::default()
            },
        )
        .await
    });
    let mut stdin_w = stdin_w;
    let mut seen = String::new();
    let mut ok = [false, false];
    for (i, (w, hgt)) in [(123u16, 45u16), (80, 24)].into_iter().enumerate() {
        resize_tx
            .send(TerminalSize {
                width: w,
                height: hgt,
            })
            .await?;
        let want = format!("size={hgt} {w}");
        // The resize stream and stdin are independent: ask until the new size shows.
        let deadline = tokio::time::Instant::now() + T;
        while tokio::time::Instant::now() < deadline {
            stdin_w.write_all(b"x\n").await?;
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(500), out_r.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {}
            }
            if seen.contains(&want) {
                ok[i] = true;
                break;
            }
        }
    }
    assert_eq!(ok, [true, true], "output: {seen:?}");
    stdin_w.write_all(b"quit\n").await?;
    let status = tokio::time::timeout(T, session).await???;
    assert_eq!(status.code, 7);
    h.stop().await
}

#[tokio::test]
async fn attach_connects_to_the_running_process() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let child = Command::new("sh")
        .args([
            "-c",
            "while read l; do echo \"attached: $l\"; done; echo bye",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    h.runtime
        .attachable
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .insert(CONTAINER.into(), child);
    let url = h
        .server
        .get_attach(&cri::AttachRequest {
            container_id: CONTAINER.into(),
            stdin: true,
            stdout: true,
            ..Default::default()
        })?
        .url;
    assert!(url.contains("/attach/"), "{url}");
    let (out, out_r) = sink();
    let status = tokio::time::timeout(
        T,
        client::attach(
            &url,
            ExecOptions {
                stdin: input(b"one\ntwo\n"),
                stdout: Some(out),
                ..Default::default()
            },
        ),
    )
    .await??;
    assert!(status.success());
    assert_eq!(read_all(out_r).await, "attached: one\nattached: two\nbye\n");
    h.stop().await
}

#[tokio::test]
async fn port_forward_two_concurrent_connections() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let (port, echo) = echo_server().await?;
    let url = h.port_forward_url(SANDBOX);
    assert!(url.contains("/portforward/"), "{url}");
    let pf = PortForwarder::connect(&url).await?;
    let mut a = pf.forward(port).await?;
    let mut b = pf.forward(port).await?;
    // Interleave the two connections, then half-close both and read the echoes.
    let data_a: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let data_b = b"second connection".to_vec();
    let (ra, rb) = tokio::join!(
        async {
            a.write_all(&data_a).await?;
            a.shutdown().await?;
            let mut got = Vec::new();
            a.read_to_end(&mut got).await?;
            anyhow::Ok((got, a.error().await))
        },
        async {
            b.write_all(&data_b).await?;
            b.shutdown().await?;
            let mut got = Vec::new();
            b.read_to_end(&mut got).await?;
            anyhow::Ok((got, b.error().await))
        }
    );
    let (got_a, err_a) = ra?;
    let (got_b, err_b) = rb?;
    assert_eq!(got_a, data_a);
    assert_eq!(got_b, data_b);
    assert_eq!((err_a, err_b), (None, None));

    // A closed port: the error stream says so.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?.port()
    };
    let mut c = pf.forward(closed).await?;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await?;
    let msg = c.error().await.context("an error message")?;
    assert!(
        msg.contains(&format!("error forwarding port {closed} to pod {SANDBOX}")),
        "{msg}"
    );
    pf.close().await;

    // The single-call helper, on a fresh URL.
    let mut d = client::port_forward(&h.port_forward_url(SANDBOX), port).await?;
    d.write_all(b"ping").await?;
    d.shutdown().await?;
    let mut got = Vec::new();
    d.read_to_end(&mut got).await?;
    assert_eq!(got, b"ping");
    echo.abort();
    h.stop().await
}

/// Sends a raw HTTP request and returns the status code.
async fn raw_status(url: &str, headers: &str) -> Result<u16> {
    let rest = url.strip_prefix("http://").context("http url")?;
    let (host, path) = rest.split_at(rest.find('/').context("path")?);
    let mut s = TcpStream::connect(host).await?;
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).await?;
    let line = String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    line.split(' ')
        .nth(1)
        .context("status")?
        .parse()
        .context("status code")
}

#[tokio::test]
async fn tokens_are_single_use_expire_and_are_checked() -> Result<()> {
    let h = Harness::start(Config {
        token_ttl: Duration::from_millis(300),
        ..Default::default()
    })
    .await?;
    let url = h.exec_url(&["true"], false, true, false, false);
    let (out, _r) = sink();
    assert!(
        client::exec(
            &url,
            ExecOptions {
                stdout: Some(out),
                ..Default::default()
            }
        )
        .await?
        .success()
    );
    // Reused.
    let (out, _r) = sink();
    match client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await
    {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status.as_u16(), 404),
        other => bail!("reused token: {other:?}"),
    }
    // Expired.
    let url = h.exec_url(&["true"], false, true, false, false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (out, _r) = sink();
    match client::exec(
        &url,
        ExecOptions {
            stdout: Some(out),
            ..Default::default()
        },
    )
    .await
    {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status.as_u16(), 404),
        other => bail!("expired token: {other:?}"),
    }
    // Unknown token, and a token used on the wrong endpoint.
    let base = h.server.base_url().context("bound")?;
    assert_eq!(raw_status(&format!("{base}/exec/nope"), "").await?, 404);
    let pf = h.port_forward_url(SANDBOX);
    assert_eq!(
        raw_status(&pf.replace("/portforward/", "/exec/"), "").await?,
        404
    );
    // Not an upgrade request, then a protocol nobody speaks.
    let upgrade = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n";
    let url = h.exec_url(&["true"], false, true, false, false);
    assert_eq!(raw_status(&url, "").await?, 400);
    let url = h.exec_url(&["true"], false, true, false, false);
    let hdr = format!("{upgrade}X-Stream-Protocol-Version: v99.channel.k8s.io\r\n");
    assert_eq!(raw_status(&url, &hdr).await?, 403);
    let url = h.exec_url(&["true"], false, true, false, false);
    let hdr = format!("{upgrade}X-Stream-Protocol-Version: v4.channel.k8s.io\r\n");
    assert_eq!(raw_status(&url, &hdr).await?, 101);
    h.stop().await
}

#[tokio::test]
async fn invalid_requests_are_refused() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let base = cri::ExecRequest {
        container_id: CONTAINER.into(),
        cmd: vec!["true".into()],
        stdout: true,
        ..Default::default()
    };
    let cases = [
        cri::ExecRequest {
            cmd: vec![],
            ..base.clone()
        },
        cri::ExecRequest {
            container_id: String::new(),
            ..base.clone()
        },
        cri::ExecRequest {
            stdout: false,
            ..base.clone()
        },
        cri::ExecRequest {
            tty: true,
            stderr: true,
            ..base.clone()
        },
    ];
    for c in &cases {
        assert!(
            matches!(h.server.get_exec(c), Err(RequestError::InvalidArgument(_))),
            "{c:?}"
        );
    }
    assert!(matches!(
        h.server.get_attach(&cri::AttachRequest {
            container_id: CONTAINER.into(),
            ..Default::default()
        }),
        Err(RequestError::InvalidArgument(_))
    ));
    for ports in [vec![0], vec![70000], vec![-1]] {
        let r = cri::PortForwardRequest {
            pod_sandbox_id: SANDBOX.into(),
            port: ports,
        };
        assert!(matches!(
            h.server.get_port_forward(&r),
            Err(RequestError::InvalidArgument(_))
        ));
    }
    let r = cri::PortForwardRequest {
        pod_sandbox_id: String::new(),
        port: vec![80],
    };
    assert!(matches!(
        h.server.get_port_forward(&r),
        Err(RequestError::InvalidArgument(_))
    ));
    h.stop().await
}

#[tokio::test]
async fn a_server_that_is_not_bound_hands_out_no_urls() {
    let server = Server::new(Config::default(), Arc::new(ProcessRuntime::default()));
    let r = server.get_port_forward(&cri::PortForwardRequest {
        pod_sandbox_id: SANDBOX.into(),
        port: vec![],
    });
    assert!(matches!(r, Err(RequestError::NotBound)));
}

#[tokio::test]
async fn garbage_after_the_upgrade_does_not_hurt_the_server() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let url = h.exec_url(&["true"], false, true, false, false);
    let rest = url.strip_prefix("http://").context("http")?;
    let (host, path) = rest.split_at(rest.find('/').context("path")?);
    let mut s = TcpStream::connect(host).await?;
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    // A SYN_STREAM announcing 16 MiB, then random bytes.
    s.write_all(&[0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff]).await?;
    s.write_all(&[0x5a; 4096]).await?;
    let mut rest = Vec::new();
    // The server answers 101, then closes the connection (GOAWAY) instead of allocating.
    tokio::time::timeout(T, s.read_to_end(&mut rest)).await??;
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 101"));
    // And keeps serving.
    let url = h.exec_url(&["sh", "-c", "echo still here"], false, true, false, false);
    let (out, out_r) = sink();
    assert!(
        client::exec(
            &url,
            ExecOptions {
                stdout: Some(out),
                ..Default::default()
            }
        )
        .await?
        .success()
    );
    assert_eq!(read_all(out_r).await, "still here\n");
    h.stop().await
}

#[tokio::test]
async fn sessions_whose_streams_never_come_are_closed() -> Result<()> {
    let config = Config {
        stream_creation_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let h = Harness::start(config).await?;
    // stdout is expected but only the error stream is opened: the server gives up.
    let url = h.exec_url(&["sh", "-c", "echo never"], false, true, false, false);
    let (conn, proto) = client::upgrade(&url, &["v4.channel.k8s.io"]).await?;
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    let headers = deckhand_streaming::spdy::Headers::new().with("streamType", "error");
    let mut error = conn.open(headers, T).await?;
    let mut got = Vec::new();
    tokio::time::timeout(T, error.read_to_end(&mut got)).await??;
    assert!(got.is_empty(), "{got:?}");
    tokio::time::timeout(T, conn.closed()).await?;
    // A stream type nobody asked for is refused.
    let url = h.exec_url(&["true"], false, true, false, false);
    let (conn, _) = client::upgrade(&url, &["v4.channel.k8s.io"]).await?;
    let headers = deckhand_streaming::spdy::Headers::new().with("streamType", "stdin");
    let err = conn
        .open(headers, T)
        .await
        .err()
        .context("stdin was not requested")?;
    assert!(err.to_string().contains("reset"), "{err}");
    conn.close(Duration::from_secs(1)).await;
    h.stop().await
}

#[tokio::test]
async fn streams_opened_mid_session_are_refused() -> Result<()> {
    let h = Harness::start(Config::default()).await?;
    let url = h.exec_url(
        &["sh", "-c", "read l; echo \"got $l\""],
        true,
        true,
        false,
        false,
    );
    let (conn, _) = client::upgrade(&url, &["v4.channel.k8s.io"]).await?;
    let open = |kind: &str| {
        conn.open(
            deckhand_streaming::spdy::Headers::new().with("streamType", kind),
            T,
        )
    };
    let mut error = open("error").await?;
    let mut stdin = open("stdin").await?;
    let mut stdout = open("stdout").await?;
    // The session is running: a second stdout is refused, the session goes on.
    let extra = open("stdout").await;
    assert!(extra.is_err(), "extra stream accepted");
    stdin.write_all(b"line\n").await?;
    stdin.shutdown().await?;
    let mut out = String::new();
    tokio::time::timeout(T, stdout.read_to_string(&mut out)).await??;
    assert_eq!(out, "got line\n");
    let mut status = String::new();
    tokio::time::timeout(T, error.read_to_string(&mut status)).await??;
    assert_eq!(status, r#"{"metadata":{},"status":"Success"}"#);
    conn.close(Duration::from_secs(1)).await;
    h.stop().await
}
