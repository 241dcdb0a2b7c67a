//! deckhand-kubelet's HTTPS API against the test bed: the built binary runs with node
//! credentials, a serving certificate from the test bed's kubelet CA (the one the API server
//! trusts), `--client-ca-file` the cluster CA and Webhook authorization; the real kubectl then
//! goes through the API server for `logs`, `exec`, `attach` and `port-forward`, and direct
//! requests (curl) check authentication and authorization.
//!
//! The test bed's containerd has no CNI config, so the pod uses `hostNetwork: true`. Each test
//! has its own node name and namespace; [`Bed`]'s drop stops the kubelet, removes the runtime's
//! sandboxes of the node, force-deletes the pods and deletes the namespace, Node and Lease, also
//! when the test failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use deckhand_tests::testbed::{Testbed, unique_name};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

mod support;
use support::*;

const CONFIG_HEAD: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nnodeStatusUpdateFrequency: 2s\nnodeLeaseDurationSeconds: 8\nauthentication:\n  anonymous: {enabled: false}\n  webhook: {enabled: true}\nauthorization: {mode: Webhook}\n";

/// A kubelet serving its API, its namespace and what to clean up.
struct Bed {
    node: String,
    ns: String,
    client: kube::Client,
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    passed: bool,
}

impl Bed {
    async fn start(prefix: &str) -> Result<Bed> {
        let tb = Testbed::get();
        let client = tb.kube_client().await?;
        let ns = tb.create_namespace(&client, prefix).await?;
        let dir = tempfile::Builder::new()
            .prefix("dh-kubelet-server-")
            .tempdir()?;
        let mut bed = Bed {
            node: unique_name(prefix),
            ns,
            client,
            dir,
            child: None,
            port: free_port()?,
            passed: false,
        };
        // Client credentials and a serving certificate (CN=<node>, IP:127.0.0.1) signed by
        // the kubelet CA that the API server trusts.
        let creds = bed.creds();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/testbed/controlplane.sh");
        let out = Command::new(&script)
            .arg("node-credentials")
            .arg(tb.dir())
            .arg(&bed.node)
            .arg(&creds)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        ensure!(
            out.status.success(),
            "node-credentials failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = bed.dir.path().join("config.yaml");
        // Its own cgroupRoot: kubelets of parallel tests never share one.
        deckhand_cgroups::Manager::new(&bed.cgroup_root())
            .and_then(|m| m.create())
            .with_context(|| format!("creating the cgroup root {}", bed.cgroup_root()))?;
        std::fs::write(
            &config,
            format!(
                "{CONFIG_HEAD}podLogsDir: {}\ncgroupRoot: {}\n",
                bed.dir.path().join("logs").display(),
                bed.cgroup_root()
            ),
        )?;
        let p = |p: PathBuf| p.display().to_string();
        let args = vec![
            "--config".into(),
            p(config),
            "--hostname-override".into(),
            bed.node.clone(),
            "--node-ip=127.0.0.1".into(),
            "--address=127.0.0.1".into(),
            format!("--port={}", bed.port),
            "--tls-cert-file".into(),
            p(creds.join("kubelet.crt")),
            "--tls-private-key-file".into(),
            p(creds.join("kubelet.key")),
            "--client-ca-file".into(),
            p(tb.pki_dir().join("ca.crt")),
            "--root-dir".into(),
            p(bed.dir.path().join("root")),
            "--container-runtime-endpoint".into(),
            format!("unix://{}", cri_endpoint().display()),
            "--kubeconfig".into(),
            p(creds.join("kubeconfig")),
        ];
        let log = std::fs::File::create(bed.log_path())?;
        let child = Command::new(env!("CARGO_BIN_EXE_deckhand-kubelet"))
            .args(&args)
            .env("RUST_LOG", "info,deckhand_kubelet=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deckhand-kubelet")?;
        bed.child = Some(child);
        let port = bed.port;
        eventually(
            Duration::from_secs(30),
            "the kubelet API listening",
            || async move {
                Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(|_| ())
                    .map_err(|e| e.to_string()))
            },
        )
        .await?;
        Ok(bed)
    }

    fn cgroup_root(&self) -> String {
        format!("/dh-cg-{}", self.node)
    }

    fn pass(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    fn creds(&self) -> PathBuf {
        self.dir.path().join("creds")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("kubelet.log")
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_pod(&self, name: &str, containers: serde_json::Value) -> Result<()> {
        self.create_pod_with(name, containers, json!([])).await
    }

    async fn create_pod_with(
        &self,
        name: &str,
        containers: serde_json::Value,
        volumes: serde_json::Value,
    ) -> Result<()> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns },
            "spec": {
                "hostNetwork": true,
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 1,
                "nodeName": self.node,
                "containers": containers,
                "volumes": volumes,
            },
        }))?;
        self.pods().create(&PostParams::default(), &pod).await?;
        Ok(())
    }

    async fn wait_running(&self, name: &str) -> Result<()> {
        let pods = self.pods();
        eventually(LONG, "pod Running and Ready", || async {
            let Some(p) = pods.get_opt(name).await? else {
                return Ok(Err("no pod".to_string()));
            };
            let st = p.status.as_ref();
            let ready = st
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let running = st.and_then(|s| s.phase.as_deref()) == Some("Running");
            Ok(if running && ready {
                Ok(())
            } else {
                Err(format!("status {st:?}"))
            })
        })
        .await
    }

    /// kubectl as the admin, in the test's namespace.
    fn kubectl(&self) -> Command {
        let tb = Testbed::get();
        let mut c = Command::new(tb.var("DH_KUBECTL").unwrap_or("kubectl"));
        c.arg("--kubeconfig")
            .arg(tb.admin_kubeconfig())
            .arg("-n")
            .arg(&self.ns)
            .arg("--request-timeout=60s");
        c
    }

    fn kubectl_out(&self, args: &[&str]) -> Result<Output> {
        self.kubectl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("kubectl {args:?}"))
    }

    /// curl against the kubelet itself: (status, body). `cert` is a (crt, key) pair.
    fn curl(
        &self,
        method: &str,
        path: &str,
        cert: Option<(&Path, &Path)>,
    ) -> Result<(u16, String)> {
        self.curl_with(method, path, cert, None)
    }

    /// As [`Bed::curl`], with a bearer token.
    fn curl_with(
        &self,
        method: &str,
        path: &str,
        cert: Option<(&Path, &Path)>,
        token: Option<&str>,
    ) -> Result<(u16, String)> {
        let tb = Testbed::get();
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "20",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(tb.pki_dir().join("kubelet-ca.crt"));
        if let Some((crt, key)) = cert {
            c.arg("--cert").arg(crt).arg("--key").arg(key);
        }
        if let Some(t) = token {
            // Through stdin, so the token is not on a command line.
            c.args(["-H", "@-"]).stdin(Stdio::piped());
            let mut child = c
                .arg(format!("https://127.0.0.1:{}{path}", self.port))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("curl")?;
            child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("no stdin"))?
                .write_all(format!("Authorization: Bearer {t}\n").as_bytes())?;
            return parse_curl(path, child.wait_with_output()?);
        }
        let out = c
            .arg(format!("https://127.0.0.1:{}{path}", self.port))
            .output()
            .context("curl")?;
        parse_curl(path, out)
    }
}

/// (status, body) of a curl run with `-w "\n%{http_code}"`.
fn parse_curl(path: &str, out: Output) -> Result<(u16, String)> {
    ensure!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text
        .rsplit_once('\n')
        .ok_or_else(|| anyhow!("curl output {text:?}"))?;
    Ok((code.parse()?, body.to_string()))
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking()
            || !self.passed
            || std::env::var_os("DH_SHOW_KUBELET_LOG").is_some()
        {
            eprintln!(
                "--- deckhand-kubelet log ({}) ---\n{}",
                self.node,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        cleanup_node(&self.node, &self.ns);
        if let Err(e) =
            deckhand_cgroups::Manager::new(&self.cgroup_root()).and_then(|m| m.destroy(true))
        {
            eprintln!("removing the cgroup root {}: {e}", self.cgroup_root());
        }
    }
}

/// Reads `child`'s stdout lines for `period` (or until `enough` lines), then kills it.
fn read_lines_for(mut child: Child, period: Duration, enough: usize) -> Result<Vec<String>> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + period;
    let mut lines = Vec::new();
    while lines.len() < enough {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    Ok(lines)
}

fn counter(line: &str) -> Option<u64> {
    line.trim().strip_prefix("line ")?.parse().ok()
}

/// A client certificate for `cn` signed by the cluster CA, made with openssl.
fn client_cert(dir: &Path, cn: &str) -> Result<(PathBuf, PathBuf)> {
    let pki = Testbed::get().pki_dir();
    let (key, csr, crt) = (
        dir.join(format!("{cn}.key")),
        dir.join(format!("{cn}.csr")),
        dir.join(format!("{cn}.crt")),
    );
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).output()?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let s = |p: &Path| p.display().to_string();
    // v3 with a client-auth extension (webpki refuses v1 certificates).
    let ext = dir.join(format!("{cn}.ext"));
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )?;
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &s(&key),
    ])?;
    run(&[
        "req",
        "-new",
        "-key",
        &s(&key),
        "-subj",
        &format!("/O=dh-nobodies/CN={cn}"),
        "-out",
        &s(&csr),
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&pki.join("ca.crt")),
        "-CAkey",
        &s(&pki.join("ca.key")),
        "-set_serial",
        "0x1d",
        "-days",
        "1",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&crt),
    ])?;
    Ok((crt, key))
}

/// The token of the namespace's `default` service account (its 1.20 token secret).
async fn service_account_token(bed: &Bed) -> Result<String> {
    let sa: Api<ServiceAccount> = Api::namespaced(bed.client.clone(), &bed.ns);
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.ns);
    let name = sa
        .get("default")
        .await?
        .secrets
        .unwrap_or_default()
        .into_iter()
        .find_map(|r| r.name)
        .ok_or_else(|| anyhow!("the default service account has no token secret"))?;
    let secret = secrets.get(&name).await?;
    let token = secret
        .data
        .and_then(|d| d.get("token").cloned())
        .ok_or_else(|| anyhow!("secret {name} has no token"))?;
    Ok(String::from_utf8(token.0)?)
}

#[tokio::test]
async fn kubectl_logs_exec_attach_and_port_forward_through_the_api_server() -> Result<()> {
    let bed = Bed::start("srv-kubectl").await?;
    let http_port = free_port()?;
    bed.create_pod(
        "web",
        json!([
            { "name": "main", "image": busybox(), "command": ["sh", "-c",
              "echo started >&2; i=0; while true; do echo \"line $i\"; i=$((i+1)); sleep 0.2; done"] },
            { "name": "httpd", "image": busybox(), "command": ["sh", "-c",
              format!("mkdir -p /www && echo hello-from-httpd > /www/index.html && \
                       exec httpd -f -p 127.0.0.1:{http_port} -h /www")] },
        ]),
    )
    .await?;
    bed.wait_running("web").await?;

    // logs: all of it (stdout and stderr), --tail, --timestamps.
    let out = eventually(Duration::from_secs(20), "a few log lines", || async {
        let out = bed.kubectl_out(&["logs", "web", "-c", "main"])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(if out.status.success() && text.contains("line 3\n") {
            Ok(text)
        } else {
            Err(format!("{text:?} {}", String::from_utf8_lossy(&out.stderr)))
        })
    })
    .await?;
    // stderr and stdout are two pipes: their lines interleave in any order.
    assert!(out.lines().any(|l| l == "started"), "{out:?}");
    let stdout: Vec<&str> = out.lines().filter(|l| *l != "started").collect();
    assert!(stdout.starts_with(&["line 0", "line 1"]), "{out:?}");
    let newest = out.lines().filter_map(counter).max().unwrap_or(0);
    let out = bed.kubectl_out(&["logs", "web", "-c", "main", "--tail=2"])?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text:?}");
    // The last two lines: consecutive, and at least as new as anything the full log showed.
    let tail: Vec<u64> = lines.iter().filter_map(|l| counter(l)).collect();
    assert!(
        tail.len() == 2 && tail[1] == tail[0] + 1 && tail[1] >= newest,
        "{text:?} after line {newest}"
    );
    let out = bed.kubectl_out(&["logs", "web", "-c", "main", "--tail=1", "--timestamps"])?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let (ts, rest) = text
        .trim_end()
        .split_once(' ')
        .ok_or_else(|| anyhow!("{text:?}"))?;
    let ts: jiff::Timestamp = ts
        .parse()
        .with_context(|| format!("timestamp in {text:?}"))?;
    let age = jiff::Timestamp::now().duration_since(ts);
    assert!(age.as_secs() < 60, "{text:?} is {age:?} old");
    assert!(counter(rest).is_some(), "{text:?}");

    // logs -f: new lines keep coming.
    let follow = bed
        .kubectl()
        .args(["logs", "-f", "web", "-c", "main", "--tail=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let lines = read_lines_for(follow, Duration::from_secs(10), 6)?;
    let numbers: Vec<u64> = lines.iter().filter_map(|l| counter(l)).collect();
    assert_eq!(numbers.len(), 6, "{lines:?}");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "followed lines in order: {lines:?}"
    );

    // exec: stdout, stderr and the exit code.
    let out = bed.kubectl_out(&[
        "exec",
        "web",
        "-c",
        "main",
        "--",
        "sh",
        "-c",
        "echo hi; echo err >&2; exit 3",
    ])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("err"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    // exec -i: stdin reaches the command.
    let mut child = bed
        .kubectl()
        .args(["exec", "-i", "web", "-c", "main", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(b"through stdin\n")?;
    let out = child.wait_with_output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "THROUGH STDIN\n",
        "{out:?}"
    );
    assert!(out.status.success(), "{out:?}");

    // attach: the running container's output.
    let attach = bed
        .kubectl()
        .args(["attach", "web", "-c", "main"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let lines = read_lines_for(attach, Duration::from_secs(15), 3)?;
    assert!(
        lines.iter().filter(|l| counter(l).is_some()).count() >= 3,
        "attached output: {lines:?}"
    );

    // port-forward to the httpd, then an HTTP GET through the local port.
    let local = free_port()?;
    let mut pf = bed
        .kubectl()
        .args([
            "port-forward",
            "--address=127.0.0.1",
            "pod/web",
            &format!("{local}:{http_port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = async {
        let stdout = pf.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut first = String::new();
        // Kept open to the end: kubectl reports each connection on stdout.
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut first)?;
        ensure!(
            first.contains("Forwarding from"),
            "port-forward said {first:?}"
        );
        let response = eventually(
            Duration::from_secs(20),
            "HTTP through the forward",
            || async {
                let mut s = match std::net::TcpStream::connect(("127.0.0.1", local)) {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e.to_string())),
                };
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                Ok(if buf.contains("hello-from-httpd") {
                    Ok(buf)
                } else {
                    Err(format!("{buf:?}"))
                })
            },
        )
        .await?;
        drop(reader);
        ensure!(
            response.starts_with("HTTP/1.") && response.contains(" 200 "),
            "{response:?}"
        );
        Ok(())
    }
    .await;
    let _ = pf.kill();
    let _ = pf.wait();
    result?;

    // logs --since: only the last second's lines (the pod has run for several).
    let out = bed.kubectl_out(&["logs", "web", "-c", "main", "--since=1s"])?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let recent: Vec<u64> = text.lines().filter_map(counter).collect();
    assert!(
        !recent.is_empty() && recent.len() <= 8 && !recent.contains(&0),
        "{text:?}"
    );
    assert!(!text.contains("started"), "{text:?}");

    // The kubelet's own API with the API server's client certificate (system:masters).
    let pki = Testbed::get().pki_dir();
    let (crt, key) = (
        pki.join("apiserver-kubelet-client.crt"),
        pki.join("apiserver-kubelet-client.key"),
    );
    let master = Some((crt.as_path(), key.as_path()));
    assert_eq!(
        bed.curl("GET", "/healthz", master)?,
        (200, "ok".to_string())
    );
    let (code, body) = bed.curl("GET", "/pods", master)?;
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(list["kind"], "PodList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .ok_or_else(|| anyhow!("{body}"))?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["web"], "{body}");
    let ns = &bed.ns;
    let (code, body) = bed.curl(
        "POST",
        &format!("/run/{ns}/web/main?cmd=echo+run-ok"),
        master,
    )?;
    assert_eq!((code, body.as_str()), (200, "run-ok\n"));
    let (code, body) = bed.curl("GET", &format!("/run/{ns}/web/main?cmd=id"), master)?;
    assert_eq!(code, 405, "{body}");
    let (code, _) = bed.curl("GET", "/nothing/here", master)?;
    assert_eq!(code, 404);
    let (code, body) = bed.curl("GET", &format!("/containerLogs/{ns}/nopod/main"), master)?;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("nopod") && body.contains("does not exist"),
        "{body}"
    );
    let (code, body) = bed.curl("GET", &format!("/containerLogs/{ns}/web/nothere"), master)?;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("\"nothere\""), "{body}");
    let (code, body) = bed.curl(
        "GET",
        &format!("/containerLogs/{ns}/web/main?tailLines=1&limitBytes=4"),
        master,
    )?;
    assert_eq!((code, body.as_str()), (200, "line"));
    bed.pass()
}

#[tokio::test]
async fn requests_without_credentials_or_rights_are_refused() -> Result<()> {
    let bed = Bed::start("srv-auth").await?;
    let (code, body) = bed.curl("GET", "/healthz", None)?;
    assert_eq!((code, body.as_str()), (401, "Unauthorized\n"));
    let (code, _) = bed.curl("POST", "/run/default/x/y?cmd=id", None)?;
    assert_eq!(code, 401);
    // A valid certificate of a user without rights on nodes/proxy.
    let user = unique_name("nobody");
    let (crt, key) = client_cert(bed.dir.path(), &user)?;
    let (code, body) = bed.curl("GET", "/pods", Some((&crt, &key)))?;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body,
        format!("Forbidden (user={user}, verb=get, resource=nodes, subresource=proxy)\n")
    );
    let (code, body) = bed.curl(
        "POST",
        "/exec/default/x/y?command=id&stdout=1",
        Some((&crt, &key)),
    )?;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("verb=create"), "{body}");
    // Bearer tokens go through TokenReview: an invalid one is not a user (401), the namespace's
    // default service account is one, without rights on the node (403).
    let (code, body) = bed.curl_with("GET", "/pods", None, Some("dh-not-a-token"))?;
    assert_eq!((code, body.as_str()), (401, "Unauthorized\n"));
    let token = service_account_token(&bed).await?;
    let (code, body) = bed.curl_with("GET", "/healthz", None, Some(&token))?;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body,
        format!(
            "Forbidden (user=system:serviceaccount:{}:default, verb=get, resource=nodes, \
             subresource=proxy)\n",
            bed.ns
        )
    );
    // A certificate from another CA is refused in the handshake or treated as no certificate.
    let foreign = bed.creds().join("kubelet.crt");
    let foreign_key = bed.creds().join("kubelet.key");
    match bed.curl("GET", "/healthz", Some((&foreign, &foreign_key))) {
        Ok((code, _)) => assert_eq!(code, 401),
        Err(e) => assert!(format!("{e:#}").contains("curl"), "{e:#}"),
    }
    bed.pass()
}

/// `kubectl get` and `kubectl describe` (1.20) show a restarted pod as they would one of the
/// upstream kubelet, and `kubectl logs --previous` the instance before the restart.
#[tokio::test]
async fn kubectl_logs_get_and_describe_show_a_restarted_pod() -> Result<()> {
    let bed = Bed::start("srv-previous").await?;
    // The first instance exits, the restarted one stays.
    bed.create_pod_with(
        "crash",
        json!([{ "name": "main", "image": busybox(),
                 "volumeMounts": [{ "name": "d", "mountPath": "/d" }],
                 "command": ["sh", "-c",
                   "if [ -e /d/ran ]; then echo second; exec sleep 3600; \
                    else touch /d/ran; echo first; exit 1; fi"] }]),
        json!([{ "name": "d", "emptyDir": {} }]),
    )
    .await?;
    let pods = bed.pods();
    eventually(LONG, "restarted once", || async {
        let p = pods.get("crash").await?;
        let restarts = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map(|c| (c.restart_count, c.ready));
        Ok(match restarts {
            Some((1, true)) => Ok(()),
            r => Err(format!("{r:?}")),
        })
    })
    .await?;
    let out = bed.kubectl_out(&["logs", "crash", "--previous"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first\n", "{out:?}");
    let out = bed.kubectl_out(&["logs", "crash"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "second\n", "{out:?}");

    // get -o wide: NAME READY STATUS RESTARTS AGE IP NODE NOMINATED-NODE READINESS-GATES.
    let ip = pods
        .get("crash")
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("no podIP")?;
    let out = bed.kubectl_out(&["get", "pod", "crash", "-o", "wide", "--no-headers"])?;
    ensure!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let cols: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        cols.get(..4),
        Some(&["crash", "1/1", "Running", "1"][..]),
        "{text:?}"
    );
    assert_eq!(
        cols.get(5..7),
        Some(&[ip.as_str(), bed.node.as_str()][..]),
        "{text:?}"
    );

    // describe: whitespace collapsed, one line per row. The kubelet's Events reach the API
    // server a moment after the steps they report.
    let event_from_kubelet = |rows: &[String], reason: &str| {
        // Events: Type Reason Age From Message (Age may read "5s (x2 over 20s)").
        rows.iter()
            .any(|r| r.starts_with(&format!("Normal {reason} ")) && r.contains(" kubelet "))
    };
    let (text, rows) = eventually(
        Duration::from_secs(20),
        "Created and Started events",
        || async {
            let out = bed.kubectl_out(&["describe", "pod", "crash"])?;
            ensure!(out.status.success(), "{out:?}");
            let text = String::from_utf8(out.stdout)?;
            let rows: Vec<String> = text
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            Ok(
                if ["Created", "Started"]
                    .iter()
                    .all(|r| event_from_kubelet(&rows, r))
                {
                    Ok((text, rows))
                } else {
                    Err(text)
                },
            )
        },
    )
    .await?;
    for row in [
        "Status: Running",
        "State: Running",
        "Last State: Terminated",
        "Reason: Error",
        "Exit Code: 1",
        "Ready: True",
        "Restart Count: 1",
        "Initialized True",
        "Ready True",
        "ContainersReady True",
        "PodScheduled True",
        &format!("IP: {ip}"),
    ] {
        assert!(
            rows.iter().any(|r| r == row),
            "no {row:?} in kubectl describe:\n{text}"
        );
    }
    bed.pass()
}

#[tokio::test]
async fn kubectl_attach_writes_to_a_stdin_container() -> Result<()> {
    let bed = Bed::start("srv-stdin").await?;
    // `cat` with its stdin kept open by the runtime; `once` gets EOF when its first attach
    // ends (stdinOnce), so its `cat` returns.
    bed.create_pod(
        "cat",
        json!([
            { "name": "main", "image": busybox(), "command": ["cat"], "stdin": true },
            { "name": "once", "image": busybox(), "stdin": true, "stdinOnce": true,
              "command": ["sh", "-c", "cat; echo stdin closed"] },
        ]),
    )
    .await?;
    bed.wait_running("cat").await?;

    // attach -i: the line goes to cat's stdin, comes back on the attached stdout and is in
    // the container's log.
    let mut attach = bed
        .kubectl()
        .args(["attach", "-i", "cat", "-c", "main"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = attach.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    // kubectl sends stdin once the stream is up; repeat until the echo is seen.
    let writer = std::thread::spawn(move || {
        for _ in 0..20 {
            if stdin.write_all(b"through attach\n").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let lines = read_lines_for(attach, Duration::from_secs(20), 1)?;
    let _ = writer.join();
    assert_eq!(
        lines.first().map(String::as_str),
        Some("through attach"),
        "{lines:?}"
    );
    let logged = eventually(Duration::from_secs(20), "the line in the log", || async {
        let out = bed.kubectl_out(&["logs", "cat", "-c", "main"])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(if text.lines().any(|l| l == "through attach") {
            Ok(text)
        } else {
            Err(format!("{text:?} {}", String::from_utf8_lossy(&out.stderr)))
        })
    })
    .await?;
    assert!(
        logged.lines().all(|l| l == "through attach"),
        "only what was written: {logged:?}"
    );

    // stdinOnce: the first attach's EOF closes the container's stdin; cat returns and the
    // container exits (and restarts).
    let mut once = bed
        .kubectl()
        .args(["attach", "-i", "cat", "-c", "once"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = once.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let out = once.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<()> {
        // kubectl reads its stdin once the stream is up; the echo says the line went through.
        stdin.write_all(b"once\n")?;
        let echoed = rx.recv_timeout(Duration::from_secs(20));
        ensure!(echoed.as_deref() == Ok("once"), "{echoed:?}");
        drop(stdin);
        Ok(())
    })();
    let finished = eventually(LONG, "once's cat ended by EOF", || async {
        let out = bed.kubectl_out(&["logs", "cat", "-c", "once", "--previous"])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(if text.contains("stdin closed") {
            Ok(text)
        } else {
            Err(format!("{text:?} {}", String::from_utf8_lossy(&out.stderr)))
        })
    })
    .await;
    let _ = once.kill();
    let _ = once.wait();
    result?;
    let text = finished?;
    assert_eq!(text, "once\nstdin closed\n");
    let p = bed.pods().get("cat").await?;
    let main = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "main"))
        .ok_or_else(|| anyhow!("no status of main: {:?}", p.status))?;
    assert_eq!(main.restart_count, 0, "main's stdin stays open: {main:?}");
    bed.pass()
}
