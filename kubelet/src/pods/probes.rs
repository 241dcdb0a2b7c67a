//! Container probes (liveness, readiness, startup) and the actions they share with lifecycle
//! hooks (exec through CRI `ExecSync`, httpGet, tcpSocket), and gRPC probes
//! (`grpc.health.v1.Health/Check` over plain HTTP/2, as upstream's prober).
//!
//! Each running container with probes gets one tokio task per probe ([`PodProbes::sync`]
//! starts them for new container IDs and cancels those of containers that no longer run).
//! A task waits for `initialDelaySeconds` after the container started, then probes every
//! `periodSeconds`, each attempt bounded by `timeoutSeconds`; a result counts once it was seen
//! `successThreshold` or `failureThreshold` times in a row ([`Tracker`]), as upstream's prober
//! worker. Liveness and readiness wait for the startup probe to succeed; the startup probe
//! stops once it has. A changed result wakes the pod worker, which reads the state
//! ([`PodProbes::state`]): `started` and `ready` go into the container status, and a failed
//! liveness or startup probe makes it kill the container (which then restarts per
//! restartPolicy with back-off). Every failed attempt is an `Unhealthy` event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use deckhand_proto::cri::ExecSyncRequest;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Pod, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::ManagerEvent;
use crate::events::{EventType, Recorder};

/// The User-Agent of HTTP probes and hooks (upstream's `kube-probe/<major>.<minor>`).
pub const USER_AGENT: &str = "kube-probe/1.20";
/// How much of an HTTP answer's body is read.
const MAX_BODY: usize = 10 * 1024;
/// How much of a probe's output goes into its message.
const MAX_MESSAGE: usize = 1024;

/// A probe's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `livenessProbe`.
    Liveness,
    /// `readinessProbe`.
    Readiness,
    /// `startupProbe`.
    Startup,
}

impl Kind {
    /// Upstream's name in events (`Liveness probe failed: ...`).
    pub fn title(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }

    fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            Kind::Liveness => c.liveness_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
            Kind::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// A probe's timing and thresholds with upstream's defaults and minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `initialDelaySeconds` (0).
    pub initial_delay: Duration,
    /// `periodSeconds` (10, at least 1).
    pub period: Duration,
    /// `timeoutSeconds` (1, at least 1).
    pub timeout: Duration,
    /// `successThreshold` (1, at least 1).
    pub success: u32,
    /// `failureThreshold` (3, at least 1).
    pub failure: u32,
}

impl Timing {
    /// The timing of `p`.
    pub fn of(p: &Probe) -> Timing {
        let secs = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(u64::try_from(v.unwrap_or(default).max(min)).unwrap_or(0))
        };
        let count =
            |v: Option<i32>, default: i32| u32::try_from(v.unwrap_or(default).max(1)).unwrap_or(1);
        Timing {
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success: count(p.success_threshold, 1),
            failure: count(p.failure_threshold, 3),
        }
    }
}

/// Consecutive results of one probe and the result that counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    last: Option<bool>,
    run: u32,
    published: Option<bool>,
}

impl Tracker {
    /// A tracker whose result counts as `initial` (none: unknown) until thresholds say
    /// otherwise.
    pub fn new(initial: Option<bool>) -> Tracker {
        Tracker {
            last: None,
            run: 0,
            published: initial,
        }
    }

    /// The result that counts (none while unknown).
    pub fn result(&self) -> Option<bool> {
        self.published
    }

    /// Adds one attempt's result; returns the new result when it changed.
    pub fn observe(&mut self, ok: bool, t: &Timing) -> Option<bool> {
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let threshold = if ok { t.success } else { t.failure };
        if self.run >= threshold && self.published != Some(ok) {
            self.published = Some(ok);
            return Some(ok);
        }
        None
    }
}

/// What the probes say of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The startup probe succeeded (or there is none).
    pub started: bool,
    /// Started and the readiness probe succeeds (or there is none).
    pub ready: bool,
    /// A liveness or startup probe failed: the container must be killed, with this message.
    pub kill: Option<String>,
    /// The failed probe's `terminationGracePeriodSeconds`, if it has one.
    pub kill_grace: Option<i64>,
}

/// An `ExecSync` client on its own channel to the runtime (so that long probes and hooks do
/// not share the worker's request timeout); reconnects after a transport failure.
#[derive(Debug)]
pub struct ExecClient {
    endpoint: String,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

/// What an exec gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code.
    pub exit_code: i32,
    /// stdout then stderr.
    pub output: String,
}

impl ExecClient {
    /// A client of the runtime at `endpoint` (`unix:///path`); connects on first use.
    pub fn new(endpoint: impl Into<String>) -> ExecClient {
        ExecClient {
            endpoint: endpoint.into(),
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `cmd` in container `id`; `timeout` zero is none (the call then is bounded only
    /// by the caller).
    pub async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, String> {
        let channel = {
            let mut guard = self.channel.lock().await;
            match guard.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = tokio::time::timeout(
                        Duration::from_secs(10),
                        deckhand_proto::unix::connect(&self.endpoint),
                    )
                    .await
                    .map_err(|_| "connecting to the runtime: timed out".to_string())?
                    .map_err(|e| format!("connecting to the runtime: {e}"))?;
                    *guard = Some(c.clone());
                    c
                }
            }
        };
        let mut client = RuntimeServiceClient::new(channel);
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.to_vec(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        let call = client.exec_sync(req);
        let answer = if timeout.is_zero() {
            call.await
        } else {
            // The runtime enforces the timeout; this bound only guards against a stuck call.
            match tokio::time::timeout(timeout + Duration::from_secs(5), call).await {
                Ok(r) => r,
                Err(_) => return Err(format!("command timed out after {timeout:?}")),
            }
        };
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                let mut output = String::from_utf8_lossy(&r.stdout).into_owned();
                output.push_str(&String::from_utf8_lossy(&r.stderr));
                Ok(ExecOutput {
                    exit_code: r.exit_code,
                    output,
                })
            }
            Err(status) => {
                if status.code() == tonic::Code::Unavailable {
                    *self.channel.lock().await = None;
                }
                if status.code() == tonic::Code::DeadlineExceeded {
                    return Err(format!("command timed out after {timeout:?}"));
                }
                Err(format!("ExecSync: {}", status.message()))
            }
        }
    }
}

fn clip(s: &str) -> String {
    let s = s.trim_end();
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The port `port` names for container `c`: a number, a named containerPort, or a numeric
/// string.
pub fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    let n = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            let named = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port);
            match named.or_else(|| name.parse().ok()) {
                Some(n) => n,
                None => {
                    return Err(format!(
                        "couldn't find port: {name:?} in container {:?}",
                        c.name
                    ));
                }
            }
        }
    };
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("invalid port number: {n}"))
}

/// An HTTP GET as upstream's prober sends it: the URL parts and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// HTTPS (without certificate verification) rather than HTTP.
    pub https: bool,
    /// The host to connect to.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path with its query.
    pub path: String,
    /// The request's headers (Host, User-Agent and Accept unless the action sets them).
    pub headers: Vec<(String, String)>,
}

impl HttpTarget {
    /// The target of `a` for container `c` of a pod at `pod_ip`.
    pub fn of(a: &HTTPGetAction, c: &Container, pod_ip: &str) -> Result<HttpTarget, String> {
        let https = match a.scheme.as_deref().unwrap_or("HTTP") {
            s if s.eq_ignore_ascii_case("HTTP") => false,
            s if s.eq_ignore_ascii_case("HTTPS") => true,
            s => return Err(format!("unsupported scheme {s:?}")),
        };
        let host = a
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| pod_ip.to_string());
        if host.is_empty() {
            return Err("the pod has no IP yet".into());
        }
        let port = resolve_port(&a.port, c)?;
        let mut path = a.path.clone().unwrap_or_default();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        let mut headers: Vec<(String, String)> = a
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let has =
            |hs: &[(String, String)], n: &str| hs.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        for (name, value) in [
            ("Host", authority),
            ("User-Agent", USER_AGENT.to_string()),
            ("Accept", "*/*".to_string()),
        ] {
            if !has(&headers, name) {
                headers.push((name.to_string(), value));
            }
        }
        Ok(HttpTarget {
            https,
            host,
            port,
            path,
            headers,
        })
    }

    /// `host:port` (IPv6 hosts in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL (for messages).
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    location: Option<String>,
    body: String,
}

async fn send<I>(io: I, req: http::Request<Empty<Bytes>>) -> Result<Answer, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while data.len() < MAX_BODY {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    data.extend_from_slice(d);
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => break,
        }
    }
    data.truncate(MAX_BODY);
    Ok(Answer {
        status,
        location,
        body: String::from_utf8_lossy(&data).into_owned(),
    })
}

/// Accepts any certificate, as upstream's HTTPS probes (`InsecureSkipVerify`).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The most redirects followed (as Go's HTTP client, which upstream's prober uses).
const MAX_REDIRECTS: usize = 10;

async fn get_once(t: &HttpTarget) -> Result<Answer, String> {
    let mut req = http::Request::get(&t.path);
    for (k, v) in &t.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("dial tcp {}:{}: {e}", t.host, t.port))?;
    if t.https {
        let name =
            rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| e.to_string())?;
        let tls = tls_connector()?
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
}

/// Where the redirect of `t` to `location` goes when upstream's prober follows it: to the
/// same host name only (a redirect elsewhere ends with the 3xx answer, a success).
pub fn redirect(t: &HttpTarget, location: &str) -> Option<HttpTarget> {
    let mut next = t.clone();
    let old_authority = t.authority();
    if location.contains("://") {
        let uri: http::Uri = location.parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        if host != t.host {
            return None;
        }
        next.https = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            _ => return None,
        };
        next.port = uri.port_u16().unwrap_or(if next.https { 443 } else { 80 });
        next.path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
    } else if location.starts_with('/') {
        next.path = location.to_string();
    } else {
        // Relative to the current path's directory.
        let path = t.path.split('?').next().unwrap_or_default();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        next.path = format!("{dir}{location}");
    }
    if next.path.is_empty() {
        next.path = "/".into();
    }
    // A Host header the kubelet made follows the target; one the probe set stays.
    let new_authority = next.authority();
    for (k, v) in &mut next.headers {
        if k == "Host" && *v == old_authority {
            *v = new_authority.clone();
        }
    }
    Some(next)
}

/// Sends the GET; gives the status code and the start of the body. Redirects to the same
/// host are followed (at most [`MAX_REDIRECTS`]); a redirect elsewhere gives its 3xx
/// answer, as upstream's prober.
pub async fn http_get(t: &HttpTarget, timeout: Duration) -> Result<(u16, String), String> {
    let work = async {
        let mut target = t.clone();
        for _ in 0..=MAX_REDIRECTS {
            let a = get_once(&target).await?;
            let next = match (&a.status, &a.location) {
                (301 | 302 | 303 | 307 | 308, Some(l)) => redirect(&target, l),
                _ => None,
            };
            match next {
                Some(n) => target = n,
                None => {
                    if (300..400).contains(&a.status) {
                        tracing::debug!(url = %target.url(), location = ?a.location, "probe: redirect not followed");
                    }
                    return Ok((a.status, a.body));
                }
            }
        }
        Err(format!("stopped after {MAX_REDIRECTS} redirects"))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r.map_err(|e| format!("Get {:?}: {e}", t.url())),
        Err(_) => Err(format!(
            "Get {:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
            t.url()
        )),
    }
}

/// Connects to the action's port.
pub async fn tcp_connect(
    a: &TCPSocketAction,
    c: &Container,
    pod_ip: &str,
    timeout: Duration,
) -> Result<(), String> {
    let host = a
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod_ip.to_string());
    let port = resolve_port(&a.port, c)?;
    match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
        Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
    }
}

/// A duration as Go prints one in upstream's messages (`1s`, `1m30s`, `500ms`).
fn go_duration(d: Duration) -> String {
    let (secs, millis) = (d.as_secs(), d.subsec_millis());
    if secs == 0 {
        return format!("{millis}ms");
    }
    let frac = if millis == 0 {
        String::new()
    } else {
        format!(".{millis:03}").trim_end_matches('0').to_string()
    };
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}{frac}s"),
        (0, m) => format!("{m}m{s}{frac}s"),
        (h, m) => format!("{h}h{m}m{s}{frac}s"),
    }
}

/// An error with its sources, as `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// A gRPC health check as upstream's gRPC prober: `grpc.health.v1.Health/Check` of `service`
/// (empty: the server as a whole) on `host:port` over plain HTTP/2 (no TLS), connection and
/// call together bounded by `timeout`. `Ok` only for `SERVING`; otherwise upstream's message.
pub async fn grpc_check(
    host: &str,
    port: u16,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let connect_failed = |e: String| format!("error: failed to connect service at {addr:?}: {e}");
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .and_then(|e| e.user_agent(USER_AGENT))
        .map_err(|e| connect_failed(error_chain(&e)))?;
    let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(connect_failed(error_chain(&e))),
        Err(_) => {
            return Err(format!(
                "timeout: failed to connect service {addr:?} within {}: context deadline exceeded",
                go_duration(timeout)
            ));
        }
    };
    let rpc_timeout = || {
        format!(
            "timeout: health rpc did not complete within {}",
            go_duration(timeout)
        )
    };
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    // The deadline goes to the server too (`grpc-timeout`), as a Go context's does.
    request.set_timeout(
        deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1)),
    );
    let mut client = HealthClient::new(channel);
    let answer = match tokio::time::timeout_at(deadline, client.check(request)).await {
        Ok(a) => a,
        Err(_) => return Err(rpc_timeout()),
    };
    match answer {
        Ok(r) => match r.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!(
                "service unhealthy (responded with {:?})",
                other.as_str_name()
            )),
        },
        Err(status) => Err(match status.code() {
            tonic::Code::Unimplemented => format!(
                "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {}",
                status.message()
            ),
            tonic::Code::DeadlineExceeded => rpc_timeout(),
            // tonic's own enforcement of the `grpc-timeout` it sent.
            tonic::Code::Cancelled if tokio::time::Instant::now() >= deadline => rpc_timeout(),
            code => format!(
                "error: health rpc probe failed: rpc error: code = {code:?} desc = {}",
                status.message()
            ),
        }),
    }
}

/// One attempt of probe `p`: `Ok` on success, else the failure's message.
pub async fn run_once(
    exec: &ExecClient,
    p: &Probe,
    c: &Container,
    container_id: &str,
    pod_ip: &str,
) -> Result<(), String> {
    let timeout = Timing::of(p).timeout;
    if let Some(e) = &p.exec {
        let cmd = e.command.clone().unwrap_or_default();
        let out = exec.exec(container_id, &cmd, timeout).await?;
        if out.exit_code == 0 {
            return Ok(());
        }
        let msg = clip(&out.output);
        return Err(if msg.is_empty() {
            format!("command {cmd:?} exited with {}", out.exit_code)
        } else {
            msg
        });
    }
    if let Some(h) = &p.http_get {
        let target = HttpTarget::of(h, c, pod_ip)?;
        let (code, body) = http_get(&target, timeout).await?;
        if (200..400).contains(&code) {
            return Ok(());
        }
        let _ = body;
        return Err(format!("HTTP probe failed with statuscode: {code}"));
    }
    if let Some(t) = &p.tcp_socket {
        return tcp_connect(t, c, pod_ip, timeout).await;
    }
    if let Some(g) = &p.grpc {
        // Upstream's gRPC probe goes to the pod's IP only (the action has no host).
        if pod_ip.is_empty() {
            return Err("the pod has no IP yet".into());
        }
        let port = u16::try_from(g.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port number: {}", g.port))?;
        return grpc_check(
            pod_ip,
            port,
            g.service.as_deref().unwrap_or_default(),
            timeout,
        )
        .await;
    }
    Err("the probe has no handler".into())
}

/// One running container's probe tasks and state.
struct Probed {
    name: String,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

/// A running container the probes look at.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its name in the spec.
    pub name: String,
    /// Its runtime ID.
    pub id: String,
    /// When it started (CRI `started_at`, ns since the epoch).
    pub started_at: i64,
}

/// What a probe task needs.
#[derive(Clone)]
pub struct Env {
    /// For exec probes.
    pub exec: Arc<ExecClient>,
    /// For Unhealthy events.
    pub events: Recorder,
    /// Wakes the pod worker.
    pub wake: mpsc::UnboundedSender<ManagerEvent>,
}

/// The probes of one pod's running containers.
#[derive(Default)]
pub struct PodProbes {
    running: HashMap<String, Probed>,
}

impl PodProbes {
    /// Starts the probes of `running` containers that have none yet and stops those of
    /// containers no longer in `running`.
    pub fn sync(&mut self, env: &Env, pod: &Arc<Pod>, running: &[Target], pod_ip: &str) {
        self.running.retain(|id, p| {
            let keep = running.iter().any(|t| &t.id == id);
            if !keep {
                p.stop.cancel();
            }
            keep
        });
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        for t in running {
            if self.running.contains_key(&t.id) {
                continue;
            }
            // Sidecars (restartable init containers) are probed as the containers are.
            let s = super::spec::spec(pod);
            let mut all = s
                .containers
                .iter()
                .chain(s.init_containers.iter().flatten());
            let Some(c) = all.find(|c| c.name == t.name) else {
                continue;
            };
            let kinds: Vec<Kind> = [Kind::Startup, Kind::Liveness, Kind::Readiness]
                .into_iter()
                .filter(|k| k.of(c).is_some())
                .collect();
            if kinds.is_empty() {
                continue;
            }
            let has_startup = c.startup_probe.is_some();
            let state = Arc::new(Mutex::new(State {
                started: !has_startup,
                ready: !has_startup && c.readiness_probe.is_none(),
                kill: None,
                kill_grace: None,
            }));
            let (started_tx, _) = watch::channel(!has_startup);
            let started_tx = Arc::new(started_tx);
            let stop = CancellationToken::new();
            let start = SystemTime::UNIX_EPOCH
                + Duration::from_nanos(u64::try_from(t.started_at).unwrap_or(0));
            for kind in kinds {
                let task = Task {
                    env: env.clone(),
                    pod: pod.clone(),
                    uid: uid.clone(),
                    container: c.clone(),
                    id: t.id.clone(),
                    pod_ip: pod_ip.to_string(),
                    start,
                    kind,
                    state: state.clone(),
                    started: started_tx.clone(),
                };
                tokio::spawn(task.run(stop.clone()));
            }
            tracing::debug!(pod_uid = %uid, container = %t.name, "probes started");
            self.running.insert(
                t.id.clone(),
                Probed {
                    name: t.name.clone(),
                    state,
                    stop,
                },
            );
        }
    }

    /// What the probes say of container `id`; `None` when it has no probes.
    pub fn state(&self, id: &str) -> Option<State> {
        self.running.get(id).map(|p| {
            p.state
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|e| e.into_inner().clone())
        })
    }

    /// The probed containers' states by name.
    pub fn by_name(&self) -> HashMap<String, State> {
        self.running
            .iter()
            .filter_map(|(id, p)| Some((p.name.clone(), self.state(id)?)))
            .collect()
    }

    /// Stops every probe.
    pub fn stop_all(&mut self) {
        for p in self.running.values() {
            p.stop.cancel();
        }
        self.running.clear();
    }
}

impl Drop for PodProbes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Task {
    env: Env,
    pod: Arc<Pod>,
    uid: String,
    container: Container,
    id: String,
    pod_ip: String,
    start: SystemTime,
    kind: Kind,
    state: Arc<Mutex<State>>,
    started: Arc<watch::Sender<bool>>,
}

impl Task {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = s.clone();
        f(&mut s);
        let changed = *s != before;
        drop(s);
        if changed {
            let _ = self
                .env
                .wake
                .send(ManagerEvent::RuntimeChanged(vec![self.uid.clone()]));
        }
    }

    async fn run(self, stop: CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.probe_loop() => {}
        }
    }

    async fn probe_loop(&self) {
        let Some(probe) = self.kind.of(&self.container).cloned() else {
            return;
        };
        let timing = Timing::of(&probe);
        if self.kind != Kind::Startup {
            let mut rx = self.started.subscribe();
            if rx.wait_for(|s| *s).await.is_err() {
                return;
            }
        }
        let since_start = SystemTime::now()
            .duration_since(self.start)
            .unwrap_or_default();
        tokio::time::sleep(timing.initial_delay.saturating_sub(since_start)).await;
        // As upstream's initial values: liveness success, readiness failure, startup unknown.
        let mut tracker = Tracker::new(match self.kind {
            Kind::Liveness => Some(true),
            Kind::Readiness => Some(false),
            Kind::Startup => None,
        });
        let mut ticks = tokio::time::interval(timing.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let outcome = run_once(
                &self.env.exec,
                &probe,
                &self.container,
                &self.id,
                &self.pod_ip,
            )
            .await;
            if let Err(msg) = &outcome {
                tracing::debug!(pod_uid = %self.uid, container = %self.container.name, probe = self.kind.title(), "probe failed: {msg}");
                self.env.events.event(
                    &self.pod,
                    Some(&self.container.name),
                    EventType::Warning,
                    "Unhealthy",
                    format!("{} probe failed: {msg}", self.kind.title()),
                );
            }
            let ok = outcome.is_ok();
            let Some(now) = tracker.observe(ok, &timing) else {
                continue;
            };
            match (self.kind, now) {
                (Kind::Readiness, ready) => self.update(|s| s.ready = ready && s.started),
                (Kind::Startup, true) => {
                    let ready = self.container.readiness_probe.is_none();
                    self.update(|s| {
                        s.started = true;
                        s.ready = ready;
                    });
                    self.started.send_replace(true);
                    return;
                }
                (Kind::Liveness | Kind::Startup, false) => {
                    let what = self.kind.title().to_lowercase();
                    let msg = format!(
                        "Container {} failed {what} probe, will be restarted",
                        self.container.name
                    );
                    let grace = probe.termination_grace_period_seconds;
                    self.update(|s| {
                        s.kill = Some(msg);
                        s.kill_grace = grace;
                    });
                    return;
                }
                (Kind::Liveness, true) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).expect("probe")
    }

    #[test]
    fn timing_has_upstream_defaults_and_minimums() {
        let t = Timing::of(&probe(serde_json::json!({})));
        assert_eq!(
            t,
            Timing {
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success: 1,
                failure: 3
            }
        );
        let t = Timing::of(&probe(
            serde_json::json!({"periodSeconds": 0, "timeoutSeconds": -1,
            "failureThreshold": 0, "successThreshold": 2, "initialDelaySeconds": 5}),
        ));
        assert_eq!(t.period, Duration::from_secs(1));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success, t.failure), (2, 1));
        assert_eq!(t.initial_delay, Duration::from_secs(5));
    }

    #[test]
    fn results_count_after_their_threshold_in_a_row() {
        let t = Timing {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success: 2,
            failure: 3,
        };
        let mut r = Tracker::new(Some(false));
        assert_eq!(r.observe(true, &t), None, "one success of two");
        assert_eq!(r.observe(false, &t), None, "the run is broken");
        assert_eq!(r.observe(true, &t), None);
        assert_eq!(r.observe(true, &t), Some(true), "two in a row");
        assert_eq!(r.observe(true, &t), None, "no change");
        assert_eq!(r.result(), Some(true));
        assert_eq!(r.observe(false, &t), None);
        assert_eq!(r.observe(false, &t), None);
        assert_eq!(r.observe(false, &t), Some(false), "three failures in a row");
        assert_eq!(r.result(), Some(false));
        let mut s = Tracker::new(None);
        assert_eq!(s.result(), None);
        assert_eq!(s.observe(false, &t), None);
        assert_eq!(s.observe(false, &t), None);
        assert_eq!(s.observe(false, &t), Some(false), "unknown to failure");
        let mut l = Tracker::new(Some(true));
        let one = Timing {
            failure: 1,
            success: 1,
            ..t
        };
        assert_eq!(l.observe(true, &one), None, "liveness starts as success");
        assert_eq!(l.observe(false, &one), Some(false));
    }

    #[test]
    fn ports_by_number_name_or_numeric_string() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c",
            "ports": [{"name": "http", "containerPort": 8080}]}))
        .expect("container");
        assert_eq!(resolve_port(&IntOrString::Int(80), &c), Ok(80));
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Ok(8080)
        );
        assert_eq!(resolve_port(&IntOrString::String("81".into()), &c), Ok(81));
        assert!(resolve_port(&IntOrString::String("nope".into()), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(0), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
    }

    #[test]
    fn http_targets_default_to_the_pod_ip_and_keep_given_headers() {
        let c = Container {
            name: "c".into(),
            ..Default::default()
        };
        let a: HTTPGetAction = serde_json::from_value(serde_json::json!({"port": 8080,
            "path": "healthz?x=1", "scheme": "HTTPS",
            "httpHeaders": [{"name": "host", "value": "example"}, {"name": "X-A", "value": "b"}]}))
        .expect("action");
        let t = HttpTarget::of(&a, &c, "10.0.0.7").expect("target");
        assert!(t.https);
        assert_eq!(t.url(), "https://10.0.0.7:8080/healthz?x=1");
        assert!(t.headers.contains(&("host".into(), "example".into())));
        assert!(
            !t.headers.iter().any(|(k, _)| k == "Host"),
            "{:?}",
            t.headers
        );
        assert!(
            t.headers
                .contains(&("User-Agent".into(), USER_AGENT.into()))
        );
        let a: HTTPGetAction =
            serde_json::from_value(serde_json::json!({"port": 1, "scheme": "FTP"})).expect("a");
        assert!(HttpTarget::of(&a, &c, "10.0.0.7").is_err());
    }

    #[tokio::test]
    async fn probe_tasks_gate_on_startup_and_wake_the_worker() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open_port = open.local_addr().expect("addr").port();
        let closed_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [
                {"name": "up", "startupProbe": {"tcpSocket": {"port": open_port}, "periodSeconds": 1},
                 "readinessProbe": {"tcpSocket": {"port": open_port}, "periodSeconds": 1}},
                {"name": "down", "startupProbe": {"tcpSocket": {"port": closed_port},
                    "periodSeconds": 1, "failureThreshold": 2, "terminationGracePeriodSeconds": 3},
                 "livenessProbe": {"tcpSocket": {"port": closed_port}, "periodSeconds": 1}},
                {"name": "plain"}]}
        }))
        .expect("pod");
        let pod = Arc::new(pod);
        let (wake, mut woken) = mpsc::unbounded_channel();
        let env = Env {
            exec: Arc::new(ExecClient::new("unix:///nonexistent/dh.sock")),
            events: Recorder::logging(),
            wake,
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("time")
            .as_nanos();
        let target = |name: &str| Target {
            name: name.into(),
            id: format!("id-{name}"),
            started_at: i64::try_from(now).expect("ns"),
        };
        let mut probes = PodProbes::default();
        let targets = [target("up"), target("down"), target("plain")];
        probes.sync(&env, &pod, &targets, "127.0.0.1");
        assert!(probes.state("id-plain").is_none(), "no probes, no state");
        let first = probes.state("id-up").expect("state");
        assert!(!first.started && !first.ready, "{first:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let up = probes.state("id-up").expect("up");
            let down = probes.state("id-down").expect("down");
            if up.ready && down.kill.is_some() {
                assert!(up.started && up.kill.is_none(), "{up:?}");
                assert!(!down.started && !down.ready, "{down:?}");
                assert_eq!(
                    down.kill.as_deref(),
                    Some("Container down failed startup probe, will be restarted")
                );
                assert_eq!(down.kill_grace, Some(3));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "up {up:?} down {down:?}"
            );
            let woke = tokio::time::timeout_at(deadline, woken.recv()).await;
            match woke {
                Ok(Some(ManagerEvent::RuntimeChanged(uids))) => assert_eq!(uids, ["u"]),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            probes
                .by_name()
                .keys()
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>(),
            ["down", "up"].into()
        );
        // A container that no longer runs loses its probes.
        probes.sync(&env, &pod, &targets[..1], "127.0.0.1");
        assert!(probes.state("id-down").is_none());
        assert!(probes.state("id-up").is_some());
        drop(open);
    }

    #[test]
    fn redirects_are_followed_to_the_same_host_only() {
        let t = HttpTarget {
            https: false,
            host: "10.0.0.7".into(),
            port: 8080,
            path: "/a/b?x=1".into(),
            headers: vec![("Host".into(), "10.0.0.7:8080".into())],
        };
        let n = redirect(&t, "/c").expect("same host");
        assert_eq!(n.url(), "http://10.0.0.7:8080/c");
        let n = redirect(&t, "d?y").expect("relative");
        assert_eq!(n.url(), "http://10.0.0.7:8080/a/d?y");
        let n = redirect(&t, "https://10.0.0.7:8443/e").expect("same host name");
        assert_eq!(n.url(), "https://10.0.0.7:8443/e");
        assert_eq!(
            n.headers,
            [("Host".to_string(), "10.0.0.7:8443".to_string())]
        );
        assert!(
            redirect(&t, "http://example.org/").is_none(),
            "another host"
        );
        let set = HttpTarget {
            headers: vec![("Host".into(), "mine".into())],
            ..t
        };
        assert_eq!(
            redirect(&set, "http://10.0.0.7/").expect("r").headers,
            set.headers
        );
    }

    #[tokio::test]
    async fn http_get_follows_a_local_redirect() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            for answer in [
                "HTTP/1.1 302 Found\r\nlocation: /there\r\ncontent-length: 0\r\n\r\n",
                "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n",
            ] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.expect("read");
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                paths.push(req.split(' ').nth(1).unwrap_or_default().to_string());
                s.write_all(answer.as_bytes()).await.expect("write");
            }
            paths
        });
        let t = HttpTarget {
            https: false,
            host: "127.0.0.1".into(),
            port,
            path: "/here".into(),
            headers: Vec::new(),
        };
        let (code, _) = http_get(&t, Duration::from_secs(5)).await.expect("get");
        assert_eq!(code, 500, "the redirect's target answers");
        assert_eq!(server.await.expect("server"), ["/here", "/there"]);
    }

    #[tokio::test]
    async fn https_probes_accept_any_certificate() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let params =
            rcgen::CertificateParams::new(vec!["dh-nowhere.invalid".to_string()]).expect("params");
        let pair = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&pair).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::try_from(pair.serialize_der()).expect("der");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let mut s = acceptor.accept(s).await.expect("tls");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("write");
            s.shutdown().await.expect("shutdown");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let t = HttpTarget {
            https: true,
            host: "127.0.0.1".into(),
            port,
            path: "/secure".into(),
            headers: Vec::new(),
        };
        let (code, _) = http_get(&t, Duration::from_secs(5)).await.expect("get");
        assert_eq!(code, 204);
        assert!(server.await.expect("server").starts_with("GET /secure "));
    }

    async fn serve_once(answer: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (port, task)
    }

    #[test]
    fn durations_as_go_prints_them() {
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    /// A tonic health server on a loopback port: its port, reporter and the task serving.
    async fn health_server() -> (
        u16,
        tonic_health::server::HealthReporter,
        tokio::task::JoinHandle<()>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let (reporter, service) = tonic_health::server::health_reporter();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await
                .expect("serve");
        });
        (port, reporter, task)
    }

    #[tokio::test]
    async fn grpc_checks_as_upstream() {
        let (port, reporter, server) = health_server().await;
        let t = Duration::from_secs(2);
        let check = |service: &'static str| grpc_check("127.0.0.1", port, service, t);
        assert_eq!(check("").await, Ok(()), "the server as a whole serves");
        reporter
            .set_service_status("dh.Web", tonic_health::ServingStatus::Serving)
            .await;
        assert_eq!(check("dh.Web").await, Ok(()));
        reporter
            .set_service_status("dh.Web", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(
            check("dh.Web").await,
            Err("service unhealthy (responded with \"NOT_SERVING\")".to_string())
        );
        reporter
            .set_service_status("dh.Web", tonic_health::ServingStatus::Unknown)
            .await;
        assert_eq!(
            check("dh.Web").await,
            Err("service unhealthy (responded with \"UNKNOWN\")".to_string())
        );
        let unknown = check("dh.Nothing").await.expect_err("unknown service");
        assert!(
            unknown
                .starts_with("error: health rpc probe failed: rpc error: code = NotFound desc = "),
            "{unknown}"
        );
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(
            check("").await,
            Err("service unhealthy (responded with \"NOT_SERVING\")".to_string())
        );
        server.abort();
        let _ = server.await;
        // Nothing listens any more.
        let refused = check("").await.expect_err("refused");
        assert!(
            refused.starts_with(&format!(
                "error: failed to connect service at \"127.0.0.1:{port}\": "
            )),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_grpc_check_times_out_on_a_silent_server() {
        // Accepts connections and never answers (no HTTP/2 settings, no response).
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let started = tokio::time::Instant::now();
        let e = grpc_check("127.0.0.1", port, "", Duration::from_secs(1))
            .await
            .expect_err("a timeout");
        assert!(
            e == "timeout: health rpc did not complete within 1s"
                || e == format!(
                    "timeout: failed to connect service \"127.0.0.1:{port}\" within 1s: context deadline exceeded"
                ),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "bounded");
        silent.abort();
    }

    #[tokio::test]
    async fn grpc_probes_go_to_the_pod_ip() {
        let (port, _reporter, server) = health_server().await;
        let c = Container {
            name: "c".into(),
            ..Default::default()
        };
        let exec = ExecClient::new("unix:///nonexistent/dh.sock");
        let p = probe(serde_json::json!({"grpc": {"port": port}, "timeoutSeconds": 2}));
        assert_eq!(run_once(&exec, &p, &c, "id", "127.0.0.1").await, Ok(()));
        let named = probe(serde_json::json!({"grpc": {"port": port, "service": "dh.None"}}));
        assert!(
            run_once(&exec, &named, &c, "id", "127.0.0.1")
                .await
                .is_err()
        );
        assert!(
            run_once(&exec, &p, &c, "id", "").await.is_err(),
            "no IP yet"
        );
        let bad = probe(serde_json::json!({"grpc": {"port": 70000}}));
        assert_eq!(
            run_once(&exec, &bad, &c, "id", "127.0.0.1").await,
            Err("invalid port number: 70000".to_string())
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_grpc_readiness_probe_follows_the_serving_status() {
        let (port, reporter, server) = health_server().await;
        reporter
            .set_service_status("dh.Web", tonic_health::ServingStatus::Serving)
            .await;
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [{"name": "web", "readinessProbe": {
                "grpc": {"port": port, "service": "dh.Web"},
                "periodSeconds": 1, "failureThreshold": 1}}]}
        }))
        .expect("pod");
        let (wake, _woken) = mpsc::unbounded_channel();
        let env = Env {
            exec: Arc::new(ExecClient::new("unix:///nonexistent/dh.sock")),
            events: Recorder::logging(),
            wake,
        };
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("time")
            .as_nanos();
        let target = Target {
            name: "web".into(),
            id: "id-web".into(),
            started_at: i64::try_from(started_at).expect("ns"),
        };
        let mut probes = PodProbes::default();
        probes.sync(&env, &Arc::new(pod), &[target], "127.0.0.1");
        let ready_within = |want: bool| {
            let probes = &probes;
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let s = probes.state("id-web").expect("state");
                    if s.ready == want {
                        assert!(s.started && s.kill.is_none(), "{s:?}");
                        return;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "ready {want}: {s:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        ready_within(true).await;
        reporter
            .set_service_status("dh.Web", tonic_health::ServingStatus::NotServing)
            .await;
        ready_within(false).await;
        reporter
            .set_service_status("dh.Web", tonic_health::ServingStatus::Serving)
            .await;
        ready_within(true).await;
        probes.stop_all();
        server.abort();
    }

    #[tokio::test]
    async fn http_get_reports_the_status_and_sends_the_headers() {
        let (port, server) =
            serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno").await;
        let t = HttpTarget {
            https: false,
            host: "127.0.0.1".into(),
            port,
            path: "/h".into(),
            headers: vec![
                ("X-Probe".into(), "1".into()),
                ("Host".into(), "h:1".into()),
            ],
        };
        let (code, body) = http_get(&t, Duration::from_secs(5)).await.expect("get");
        assert_eq!((code, body.as_str()), (503, "no"));
        let req = server.await.expect("server");
        assert!(req.starts_with("GET /h HTTP/1.1\r\n"), "{req}");
        assert!(req.to_lowercase().contains("x-probe: 1"), "{req}");
        assert!(req.to_lowercase().contains("host: h:1"), "{req}");
        // Nothing listens any more: a failure with a message, not a hang.
        assert!(http_get(&t, Duration::from_secs(5)).await.is_err());
    }
}
