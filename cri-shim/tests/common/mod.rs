//! Helpers shared by the integration tests: temporary stores (removed with their mounts on
//! drop), the expected-tree check, a counting (and optionally throttling) HTTP proxy, and the
//! `deckhand-cri` daemon as a child process.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use deckhand_cri::image::{ImageStore, RegistryConfig, StoreOptions};
use deckhand_tests::images::{ExpectedEntry, ExpectedKind, ImageIndex};
use deckhand_tests::testbed::{Testbed, unique_name};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test bed and its image index.
pub fn testbed() -> (&'static Testbed, ImageIndex) {
    let tb = Testbed::get();
    let index = ImageIndex::load(&tb.images_index()).expect("image index");
    (tb, index)
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("deckhand_cri=info")),
        )
        .with_test_writer()
        .try_init();
}

/// A `dh-…` directory under /tmp, removed on drop after unmounting everything below it.
pub struct TempRoot {
    pub path: PathBuf,
}

impl TempRoot {
    pub fn new(prefix: &str) -> TempRoot {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path).expect("creating temp root");
        TempRoot { path }
    }
}

/// Unmounts every mount at or below `dir` (deepest first).
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = nix::mount::umount2(t.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        unmount_below(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A registry configuration for the test bed (its registries are loopback, so plain HTTP).
pub fn registry_config(toml: &str) -> RegistryConfig {
    RegistryConfig::parse(toml).expect("registry config")
}

/// Opens a store under `root/store`.
pub fn open_store(root: &TempRoot, registry: RegistryConfig) -> Arc<ImageStore> {
    let mut opts = StoreOptions::new(root.path.join("store"));
    opts.registry = registry;
    opts.stall_timeout = Duration::from_secs(20);
    opts.progress_interval = Duration::from_millis(500);
    ImageStore::open(opts).expect("open store")
}

fn xattrs(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let mut buf = vec![0u8; 4096];
    // SAFETY: c is NUL-terminated, buf is a live buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return out;
    }
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        if !name.starts_with(b"user.") {
            continue;
        }
        let Ok(cn) = CString::new(name) else { continue };
        let mut val = vec![0u8; 4096];
        // SAFETY: as above.
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if m >= 0 {
            out.insert(
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(&val[..m as usize]).into_owned(),
            );
        }
    }
    out
}

/// The tree under `root` in the form of the image index's expected tree.
pub fn actual_tree(root: &Path) -> Result<BTreeMap<String, ExpectedEntry>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel_path = rel.join(e.file_name());
            let key = format!("/{}", rel_path.display());
            let path = root.join(&rel_path);
            let md = std::fs::symlink_metadata(&path)?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                ExpectedKind::Dir
            } else if ft.is_file() {
                ExpectedKind::File
            } else if ft.is_symlink() {
                ExpectedKind::Symlink
            } else if ft.is_fifo() {
                ExpectedKind::Fifo
            } else if ft.is_char_device() {
                ExpectedKind::CharDevice
            } else if ft.is_block_device() {
                ExpectedKind::BlockDevice
            } else {
                bail!("unexpected file type at {key}");
            };
            let mut entry = ExpectedEntry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                sha256: None,
                size: None,
                target: None,
                hardlink_to: None,
                device: None,
                xattrs: if ft.is_symlink() {
                    BTreeMap::new()
                } else {
                    xattrs(&path)
                },
            };
            match kind {
                ExpectedKind::File => {
                    let data = std::fs::read(&path)?;
                    entry.sha256 = Some(format!("{:x}", Sha256::digest(&data)));
                    entry.size = Some(data.len() as u64);
                    if md.nlink() > 1 {
                        if let Some(first) = inodes.get(&md.ino()) {
                            entry.hardlink_to = Some(first.clone());
                        } else {
                            inodes.insert(md.ino(), key.clone());
                        }
                    }
                }
                ExpectedKind::Symlink => {
                    entry.target = Some(std::fs::read_link(&path)?.to_string_lossy().into_owned())
                }
                ExpectedKind::CharDevice | ExpectedKind::BlockDevice => {
                    let r = md.rdev();
                    entry.device = Some([libc::major(r), libc::minor(r)]);
                }
                ExpectedKind::Dir => stack.push(rel_path),
                ExpectedKind::Fifo => {}
            }
            out.insert(key, entry);
        }
    }
    Ok(out)
}

/// Compares an unpacked tree with the expected one, naming every difference. Hard links are
/// compared as "shares an inode with" in either direction.
pub fn assert_tree(root: &Path, expected: &BTreeMap<String, ExpectedEntry>) -> Result<()> {
    let actual = actual_tree(root)?;
    let mut diffs = Vec::new();
    let strip = |e: &ExpectedEntry| ExpectedEntry {
        hardlink_to: None,
        ..e.clone()
    };
    for (k, want) in expected {
        match actual.get(k) {
            None => diffs.push(format!("missing {k}")),
            Some(got) => {
                if strip(got) != strip(want) {
                    diffs.push(format!("{k}: want {want:?}, got {got:?}"));
                }
                if let Some(other) = &want.hardlink_to {
                    let a = std::fs::symlink_metadata(root.join(k.trim_start_matches('/')))?;
                    let b = std::fs::symlink_metadata(root.join(other.trim_start_matches('/')))?;
                    if a.ino() != b.ino() {
                        diffs.push(format!("{k}: not a hard link of {other}"));
                    }
                }
            }
        }
    }
    for k in actual.keys() {
        if !expected.contains_key(k) {
            diffs.push(format!("unexpected {k}"));
        }
    }
    ensure!(diffs.is_empty(), "tree differs:\n{}", diffs.join("\n"));
    Ok(())
}

/// A tiny HTTP/1.1 forwarding proxy on 127.0.0.1 that records request lines and can throttle
/// responses. Requests are GET/HEAD (no bodies), so request boundaries are `\r\n\r\n`.
pub struct CountingProxy {
    pub addr: String,
    pub requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(upstream: &str, bytes_per_sec: Option<u64>) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let reqs = reqs.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut pending = Vec::new();
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            pending.extend_from_slice(&buf[..n]);
                            while let Some(pos) = pending.windows(4).position(|w| w == b"\r\n\r\n")
                            {
                                let head: Vec<u8> = pending.drain(..pos + 4).collect();
                                let line = String::from_utf8_lossy(&head)
                                    .lines()
                                    .next()
                                    .unwrap_or("")
                                    .to_string();
                                if let Ok(mut r) = reqs.lock() {
                                    r.push(line);
                                }
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if let Some(rate) = bytes_per_sec {
                                let us = n as u64 * 1_000_000 / rate.max(1);
                                tokio::time::sleep(Duration::from_micros(us)).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingProxy {
            addr,
            requests,
            task,
        }
    }

    /// Request lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many `GET` requests fetched each blob.
    pub fn blob_gets(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for l in self.lines() {
            let mut parts = l.split(' ');
            if parts.next() != Some("GET") {
                continue;
            }
            let path = parts.next().unwrap_or("");
            if let Some((_, digest)) = path.split_once("/blobs/") {
                *out.entry(digest.to_string()).or_insert(0) += 1;
            }
        }
        out
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `deckhand-cri` daemon as a child process; killed (SIGKILL) on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `dir/cri.sock` with its root in `dir/root` and waits for its socket.
    pub fn start(dir: &Path, registry_config: Option<&Path>) -> Result<Daemon> {
        Self::start_with(dir, registry_config, &[])
    }

    /// [`Daemon::start`] with more flags.
    pub fn start_with(
        dir: &Path,
        registry_config: Option<&Path>,
        extra: &[std::ffi::OsString],
    ) -> Result<Daemon> {
        let socket = dir.join("cri.sock");
        let root = dir.join("root");
        let log = dir.join(format!("daemon-{}.log", unique_name("log")));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_deckhand-cri"));
        cmd.arg("--config")
            .arg(dir.join("no-such-cri.toml"))
            .arg("--socket")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--log-level")
            .arg("deckhand_cri=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        // The config file named above does not exist: that is an error unless it is the
        // default, so give an empty one.
        std::fs::write(dir.join("no-such-cri.toml"), "")?;
        if let Some(r) = registry_config {
            cmd.arg("--registry-config").arg(r);
        }
        cmd.args(extra);
        let child = cmd.spawn().context("starting deckhand-cri")?;
        let mut d = Daemon {
            child,
            socket,
            root,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            if let Some(status) = d.child.try_wait()? {
                bail!("deckhand-cri exited early ({status}): {}", d.logs());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "deckhand-cri did not create its socket: {}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (letting the test's runtime run, so its client connections can
    /// close); returns the exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A registry front requiring bearer tokens, in the manner of a token-auth registry: requests
/// without `Authorization: Bearer dh-token` get a 401 with a `Bearer realm=...` challenge; the
/// realm (`/token`) hands out `dh-token` to callers presenting basic credentials `user:pass`
/// when `basic` is set, to anyone otherwise; authorized requests are forwarded to `upstream`.
/// One request per connection (`Connection: close`). Records the token requests it saw.
pub struct BearerGateway {
    pub addr: String,
    pub token_requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BearerGateway {
    pub async fn start(upstream: &str, basic: Option<(&str, &str)>) -> BearerGateway {
        use base64::Engine as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("addr").to_string();
        let token_requests = Arc::new(Mutex::new(Vec::new()));
        let seen = token_requests.clone();
        let upstream = upstream.to_string();
        let want_basic = basic.map(|(u, p)| {
            format!(
                "basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let realm = format!("http://{addr}/token");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let (seen, upstream, want_basic, realm) = (
                    seen.clone(),
                    upstream.clone(),
                    want_basic.clone(),
                    realm.clone(),
                );
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut lines = text.split("\r\n");
                    let request_line = lines.next().unwrap_or("").to_string();
                    let headers: Vec<&str> = lines.take_while(|l| !l.is_empty()).collect();
                    let auth = headers
                        .iter()
                        .find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            k.eq_ignore_ascii_case("authorization")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                    let reply = |status: &str, extra: &str, body: &str| {
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
                            body.len()
                        )
                    };
                    let response = if path.starts_with("/token") {
                        if let Ok(mut s) = seen.lock() {
                            s.push(format!("{path} auth={}", !auth.is_empty()));
                        }
                        let ok = match &want_basic {
                            Some(b) => auth.to_lowercase() == b.to_lowercase(),
                            None => true,
                        };
                        if ok {
                            reply("200 OK", "", r#"{"token":"dh-token","expires_in":300}"#)
                        } else {
                            reply(
                                "401 Unauthorized",
                                "",
                                r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                            )
                        }
                    } else if auth != "Bearer dh-token" {
                        reply(
                            "401 Unauthorized",
                            &format!(
                                "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"dh-gateway\"\r\n"
                            ),
                            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
                        )
                    } else {
                        // Forward without the token, one request per connection.
                        let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let mut req = format!("{request_line}\r\n");
                        for h in &headers {
                            let k = h.split(':').next().unwrap_or("").to_ascii_lowercase();
                            if k != "authorization" && k != "connection" {
                                req.push_str(h);
                                req.push_str("\r\n");
                            }
                        }
                        req.push_str("Connection: close\r\n\r\n");
                        if server.write_all(req.as_bytes()).await.is_err() {
                            return;
                        }
                        // Rewrite the response head to say Connection: close, then pipe.
                        let mut rhead = Vec::new();
                        while !rhead.windows(4).any(|w| w == b"\r\n\r\n") {
                            match server.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => rhead.extend_from_slice(&buf[..n]),
                            }
                        }
                        let Some(pos) = rhead.windows(4).position(|w| w == b"\r\n\r\n") else {
                            return;
                        };
                        let head_text = String::from_utf8_lossy(&rhead[..pos]).into_owned();
                        let mut out = String::new();
                        for l in head_text.split("\r\n") {
                            if !l.to_ascii_lowercase().starts_with("connection:") {
                                out.push_str(l);
                                out.push_str("\r\n");
                            }
                        }
                        out.push_str("Connection: close\r\n\r\n");
                        if client.write_all(out.as_bytes()).await.is_err()
                            || client.write_all(&rhead[pos + 4..]).await.is_err()
                        {
                            return;
                        }
                        let _ = tokio::io::copy(&mut server, &mut client).await;
                        let _ = client.shutdown().await;
                        return;
                    };
                    let _ = client.write_all(response.as_bytes()).await;
                    let _ = client.shutdown().await;
                });
            }
        });
        BearerGateway {
            addr,
            token_requests,
            task,
        }
    }

    pub fn token_requests(&self) -> Vec<String> {
        self.token_requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for BearerGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}
