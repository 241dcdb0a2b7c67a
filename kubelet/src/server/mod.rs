//! The kubelet's HTTPS API on `address:port` (10250), as upstream's `kubelet/server`: what the
//! API server calls for `kubectl logs`, `exec`, `attach` and `port-forward`.
//!
//! * [`tls`]: the serving certificate (configured, or self-signed under `<root-dir>/pki`) and
//!   optional client certificates verified against `clientCAFile`.
//! * [`auth`]: authentication (client certificate, TokenReview, anonymous) and authorization
//!   (AlwaysAllow or SubjectAccessReview with upstream's attribute mapping); 401 and 403.
//! * Endpoints: `GET /healthz`; `GET /pods` (the node's pods as a PodList);
//!   `GET /containerLogs/{ns}/{pod}/{container}` ([`logs`]: the CRI log file);
//!   `/exec/{ns}/{pod}[/{uid}]/{container}`, `/attach/...`, `/portForward/{ns}/{pod}[/{uid}]`
//!   (GET or POST: the CRI call, then the upgraded connection proxied to the runtime's
//!   streaming server, [`streaming`]); `POST /run/{ns}/{pod}[/{uid}]/{container}?cmd=...`
//!   (ExecSync, the output as the body).
//!
//! Pods are found in the runtime by the labels the pod workers set (`io.kubernetes.pod.*`,
//! `io.kubernetes.container.name`, and `deckhand.io/node` for this node).

pub mod auth;
pub mod logs;
pub mod streaming;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    AttachRequest, Container, ContainerState, ExecRequest, ExecSyncRequest, PodSandbox,
    PodSandboxState, PortForwardRequest,
};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pods::spec::{
    CONFIG_MIRROR, CONTAINER_NAME_LABEL, POD_NAME_LABEL, POD_NAMESPACE_LABEL, POD_UID_LABEL,
};
use crate::pods::worker::NODE_LABEL;
use crate::runtime::RuntimeClient;
use auth::{Auth, Denied, User};

/// A response body.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A body of `b`.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn channel_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let s = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    });
    StreamBody::new(s).boxed_unsync()
}

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The status.
    pub status: http::StatusCode,
    /// The text body.
    pub message: String,
}

impl HttpError {
    /// An error with `status`.
    pub fn new(status: http::StatusCode, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> HttpError {
        HttpError::new(http::StatusCode::NOT_FOUND, message)
    }

    fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(http::StatusCode::BAD_REQUEST, message)
    }

    /// A 500.
    pub fn internal(message: impl Into<String>) -> HttpError {
        HttpError::new(http::StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn response(self) -> http::Response<Body> {
        text(self.status, format!("{}\n", self.message))
    }
}

fn text(status: http::StatusCode, body: String) -> http::Response<Body> {
    let mut r = http::Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A server start-up error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listener could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What the server needs from the rest of the kubelet.
pub struct ServerContext {
    /// The CRI client.
    pub runtime: Arc<RuntimeClient>,
    /// The API client (webhooks, `/pods`); `None` in standalone mode.
    pub client: Option<kube::Client>,
    /// The node IP (in the self-signed certificate).
    pub node_ip: Option<IpAddr>,
    /// The static pods (in `/pods`).
    pub statics: Option<watch::Receiver<BTreeMap<String, Pod>>>,
}

struct State {
    auth: Auth,
    runtime: Arc<RuntimeClient>,
    endpoint: String,
    timeout: Duration,
    node: String,
    client: Option<kube::Client>,
    statics: Option<watch::Receiver<BTreeMap<String, Pod>>>,
    logs_root: PathBuf,
}

/// The kubelet's HTTPS server, set up and ready to listen.
pub struct Server {
    addr: SocketAddr,
    listener: std::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Server {
    /// Sets up TLS and authentication from the configuration and binds the listener, so that
    /// a port in use or unreadable TLS files stop the kubelet at start (as upstream's).
    pub fn new(config: &Config, ctx: ServerContext) -> Result<Server, ServerError> {
        let k = &config.kubelet;
        let addr = SocketAddr::new(k.address, k.port);
        let bind_err = |source| ServerError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let (crt, key) = tls::serving_files(
            k.tls_cert_file.as_deref(),
            k.tls_private_key_file.as_deref(),
            &config.root_dir,
            &config.hostname,
            ctx.node_ip,
        )?;
        let tls = tls::server_config(&crt, &key, k.client_ca_file.as_deref())?;
        let auth = Auth::new(
            ctx.client.clone(),
            k.anonymous_auth,
            k.authentication_webhook,
            k.authorization_mode,
            config.node_name.clone(),
            auth::CacheTtls {
                token: k.authentication_webhook_cache_ttl,
                authorized: k.authorization_cache_authorized_ttl,
                unauthorized: k.authorization_cache_unauthorized_ttl,
            },
        );
        if ctx.client.is_none()
            && (k.authorization_mode == crate::config::AuthorizationMode::Webhook
                || k.authentication_webhook)
        {
            tracing::warn!(
                "no API server: webhook authentication/authorization cannot be used, \
                 such requests are refused"
            );
        }
        Ok(Server {
            addr,
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                auth,
                endpoint: ctx.runtime.endpoint().to_string(),
                runtime: ctx.runtime,
                timeout: k.runtime_request_timeout,
                node: config.node_name.clone(),
                client: ctx.client,
                statics: ctx.statics,
                logs_root: k.pod_logs_dir.clone(),
            }),
        })
    }

    /// Listens and serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let addr = self.addr;
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .map_err(|source| ServerError::Bind { addr, source })?;
        tracing::info!(addr = %self.addr, "serving the kubelet API");
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (acceptor, state) = (self.acceptor.clone(), self.state.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let user = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| match User::from_certificate(der) {
                        Ok(u) => Some(Arc::new(u)),
                        Err(e) => {
                            tracing::debug!(%peer, "client certificate: {e}");
                            None
                        }
                    });
                let service = hyper::service::service_fn(move |req| {
                    let (state, user) = (state.clone(), user.clone());
                    async move { Ok::<_, Infallible>(handle(state, user, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    // Headers must arrive within 30 s (slow clients do not hold connections).
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!(%peer, "connection: {e}");
                }
            });
        }
    }
}

async fn handle(
    state: Arc<State>,
    cert_user: Option<Arc<User>>,
    req: http::Request<Incoming>,
) -> http::Response<Body> {
    let denied = |d: Denied| match d {
        Denied::Unauthorized => text(http::StatusCode::UNAUTHORIZED, "Unauthorized\n".into()),
        Denied::Forbidden(m) => text(http::StatusCode::FORBIDDEN, format!("{m}\n")),
        Denied::Error(m) => text(http::StatusCode::INTERNAL_SERVER_ERROR, format!("{m}\n")),
    };
    let user = match state
        .auth
        .authenticate(cert_user.as_deref(), req.headers())
        .await
    {
        Ok(u) => u,
        Err(d) => return denied(d),
    };
    let path = req.uri().path().to_string();
    let attrs = auth::attributes(req.method(), &path, &state.node);
    if let Err(d) = state.auth.authorize(&user, &attrs).await {
        tracing::debug!(user = %user.name, %path, "refused: {d:?}");
        return denied(d);
    }
    tracing::debug!(user = %user.name, method = %req.method(), %path, "request");
    match route(&state, req).await {
        Ok(r) => r,
        Err(e) => e.response(),
    }
}

fn query(req: &http::Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn route(
    state: &State,
    req: http::Request<Incoming>,
) -> Result<http::Response<Body>, HttpError> {
    use http::Method;
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    let get_or_post = get || method == Method::POST;
    let allowed = match segs.first().copied().unwrap_or_default() {
        "healthz" | "pods" | "containerLogs" => get,
        "exec" | "attach" | "portForward" => get_or_post,
        "run" => method == Method::POST,
        _ => true,
    };
    if !allowed {
        return Err(HttpError::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed on {path}"),
        ));
    }
    match segs.as_slice() {
        ["healthz"] if get => Ok(text(http::StatusCode::OK, "ok".into())),
        ["pods"] | ["pods", ""] if get => state.pods().await,
        ["containerLogs", ns, pod, container] if get => {
            state.container_logs(ns, pod, container, &query(&req)).await
        }
        ["exec", ns, pod, container] | ["exec", ns, pod, _, container] if get_or_post => {
            let uid = (segs.len() == 5).then(|| segs[3]);
            let opts = streaming::StreamOptions::from_query(&query(&req), true)
                .map_err(HttpError::bad_request)?;
            let c = state.running_container(ns, pod, uid, container).await?;
            let req_cri = ExecRequest {
                container_id: c.id,
                cmd: opts.command,
                tty: opts.tty,
                stdin: opts.stdin,
                stdout: opts.stdout,
                stderr: opts.stderr,
            };
            let mut cri = state.cri().await?;
            let url = state.call("Exec", cri.exec(req_cri)).await?.url;
            streaming::proxy(req, &url).await
        }
        ["attach", ns, pod, container] | ["attach", ns, pod, _, container] if get_or_post => {
            let uid = (segs.len() == 5).then(|| segs[3]);
            let opts = streaming::StreamOptions::from_query(&query(&req), false)
                .map_err(HttpError::bad_request)?;
            let c = state.running_container(ns, pod, uid, container).await?;
            let req_cri = AttachRequest {
                container_id: c.id,
                stdin: opts.stdin,
                tty: opts.tty,
                stdout: opts.stdout,
                stderr: opts.stderr,
            };
            let mut cri = state.cri().await?;
            let url = state.call("Attach", cri.attach(req_cri)).await?.url;
            streaming::proxy(req, &url).await
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] if get_or_post => {
            let uid = (segs.len() == 4).then(|| segs[3]);
            let port = streaming::ports_from_query(&query(&req)).map_err(HttpError::bad_request)?;
            let sandbox = state.sandbox(ns, pod, uid, true).await?;
            let mut cri = state.cri().await?;
            let url = state
                .call(
                    "PortForward",
                    cri.port_forward(PortForwardRequest {
                        pod_sandbox_id: sandbox.id,
                        port,
                    }),
                )
                .await?
                .url;
            streaming::proxy(req, &url).await
        }
        ["run", ns, pod, container] | ["run", ns, pod, _, container] if method == Method::POST => {
            let uid = (segs.len() == 5).then(|| segs[3]);
            state.run(ns, pod, uid, container, &query(&req)).await
        }
        _ => Err(HttpError::not_found("404 page not found")),
    }
}

fn runtime_error(call: &str, e: impl std::fmt::Display) -> HttpError {
    HttpError::internal(format!("{call}: {e}"))
}

impl State {
    async fn cri(&self) -> Result<RuntimeServiceClient<tonic::transport::Channel>, HttpError> {
        let channel =
            tokio::time::timeout(self.timeout, deckhand_proto::unix::connect(&self.endpoint))
                .await
                .map_err(|_| runtime_error("connecting to the runtime", "timed out"))?
                .map_err(|e| runtime_error("connecting to the runtime", e))?;
        Ok(RuntimeServiceClient::new(channel)
            .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE))
    }

    async fn call<T>(
        &self,
        name: &str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, HttpError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(runtime_error(name, "timed out")),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                Err(HttpError::not_found(format!("{name}: {}", s.message())))
            }
            Ok(Err(s)) => Err(runtime_error(name, s.message())),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// The pod's newest sandbox on this node (a ready one when `ready`).
    async fn sandbox(
        &self,
        ns: &str,
        pod: &str,
        uid: Option<&str>,
        ready: bool,
    ) -> Result<PodSandbox, HttpError> {
        let mut sel = HashMap::from([
            (POD_NAME_LABEL.to_string(), pod.to_string()),
            (POD_NAMESPACE_LABEL.to_string(), ns.to_string()),
            (NODE_LABEL.to_string(), self.node.clone()),
        ]);
        if let Some(u) = uid {
            sel.insert(POD_UID_LABEL.to_string(), u.to_string());
        }
        let mut all = self
            .runtime
            .list_pod_sandboxes(sel)
            .await
            .map_err(|e| runtime_error("ListPodSandbox", e))?;
        if all.is_empty() {
            return Err(HttpError::not_found(format!(
                "pod \"{ns}/{pod}\" does not exist on node {}",
                self.node
            )));
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        if ready {
            return all
                .into_iter()
                .find(|s| s.state == PodSandboxState::SandboxReady as i32)
                .ok_or_else(|| {
                    HttpError::bad_request(format!("pod \"{ns}/{pod}\" has no running sandbox"))
                });
        }
        Ok(all.swap_remove(0))
    }

    /// The pod's instances of `container`, newest first.
    async fn containers(
        &self,
        ns: &str,
        pod: &str,
        uid: Option<&str>,
        container: &str,
    ) -> Result<(PodSandbox, Vec<Container>), HttpError> {
        let sandbox = self.sandbox(ns, pod, uid, false).await?;
        let pod_uid = sandbox
            .labels
            .get(POD_UID_LABEL)
            .cloned()
            .unwrap_or_default();
        let sel = HashMap::from([
            (POD_UID_LABEL.to_string(), pod_uid),
            (CONTAINER_NAME_LABEL.to_string(), container.to_string()),
        ]);
        let mut list = self
            .runtime
            .list_containers(sel)
            .await
            .map_err(|e| runtime_error("ListContainers", e))?;
        if list.is_empty() {
            return Err(HttpError::not_found(format!(
                "container \"{container}\" in pod \"{ns}/{pod}\" not found"
            )));
        }
        list.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Ok((sandbox, list))
    }

    async fn running_container(
        &self,
        ns: &str,
        pod: &str,
        uid: Option<&str>,
        container: &str,
    ) -> Result<Container, HttpError> {
        let (_, list) = self.containers(ns, pod, uid, container).await?;
        list.into_iter()
            .find(|c| c.state == ContainerState::ContainerRunning as i32)
            .ok_or_else(|| {
                HttpError::bad_request(format!(
                    "container \"{container}\" in pod \"{ns}/{pod}\" is not running"
                ))
            })
    }

    async fn pods(&self) -> Result<http::Response<Body>, HttpError> {
        let mut items: Vec<Pod> = Vec::new();
        if let Some(client) = &self.client {
            let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
            let list = Api::<Pod>::all(client.clone())
                .list(&lp)
                .await
                .map_err(|e| HttpError::internal(format!("listing the node's pods: {e}")))?;
            // Static pods are listed as themselves, not as their mirror pods.
            items.extend(list.items.into_iter().filter(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .is_none_or(|a| !a.contains_key(CONFIG_MIRROR))
            }));
        }
        if let Some(statics) = &self.statics {
            items.extend(statics.borrow().values().cloned());
        }
        let body = serde_json::json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": items,
        });
        let mut r = http::Response::new(full(body.to_string()));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }

    async fn container_logs(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        query: &[(String, String)],
    ) -> Result<http::Response<Body>, HttpError> {
        let opts = logs::LogOptions::from_query(query, jiff::Timestamp::now())
            .map_err(HttpError::bad_request)?;
        let (sandbox, list) = self.containers(ns, pod, None, container).await?;
        let c = if opts.previous {
            list.into_iter().nth(1).ok_or_else(|| {
                HttpError::bad_request(format!(
                    "previous terminated container \"{container}\" in pod \"{ns}/{pod}\" not found"
                ))
            })?
        } else {
            list.into_iter().next().ok_or_else(|| {
                HttpError::not_found(format!("container \"{container}\" not found"))
            })?
        };
        let status = self
            .runtime
            .container_status(&c.id)
            .await
            .map_err(|e| runtime_error("ContainerStatus", e))?;
        let mut path = PathBuf::from(&status.log_path);
        if status.log_path.is_empty() {
            return Err(HttpError::bad_request(format!(
                "container \"{container}\" in pod \"{ns}/{pod}\" has no log file"
            )));
        }
        if path.is_relative() {
            let uid = sandbox
                .labels
                .get(POD_UID_LABEL)
                .cloned()
                .unwrap_or_default();
            path = self.logs_root.join(format!("{ns}_{pod}_{uid}")).join(path);
        }
        if let Err(e) = tokio::fs::metadata(&path).await {
            return Err(HttpError::bad_request(format!(
                "reading the log of container \"{container}\" in pod \"{ns}/{pod}\" ({}): {e}",
                path.display()
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let running = ContainerRunning {
            runtime: self.runtime.clone(),
            id: c.id,
        };
        tokio::spawn(async move {
            if let Err(e) = logs::stream(&path, &opts, tx, running).await {
                tracing::warn!(path = %path.display(), "streaming a log: {e}");
            }
        });
        let mut r = http::Response::new(channel_body(rx));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        Ok(r)
    }

    async fn run(
        &self,
        ns: &str,
        pod: &str,
        uid: Option<&str>,
        container: &str,
        query: &[(String, String)],
    ) -> Result<http::Response<Body>, HttpError> {
        let cmd: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "cmd")
            .flat_map(|(_, v)| v.split_whitespace().map(str::to_string))
            .collect();
        if cmd.is_empty() {
            return Err(HttpError::bad_request("cmd is required"));
        }
        let c = self.running_container(ns, pod, uid, container).await?;
        let mut cri = self.cri().await?;
        let out = self
            .call(
                "ExecSync",
                cri.exec_sync(ExecSyncRequest {
                    container_id: c.id,
                    cmd,
                    timeout: i64::try_from(self.timeout.as_secs()).unwrap_or(i64::MAX),
                }),
            )
            .await?;
        let mut body = out.stdout;
        body.extend_from_slice(&out.stderr);
        let mut r = http::Response::new(full(body));
        if out.exit_code != 0 {
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            r.headers_mut()
                .insert("X-Exit-Code", http::HeaderValue::from(out.exit_code));
        }
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        Ok(r)
    }
}

struct ContainerRunning {
    runtime: Arc<RuntimeClient>,
    id: String,
}

impl logs::Running for ContainerRunning {
    async fn running(&mut self) -> bool {
        match self.runtime.container_status(&self.id).await {
            Ok(s) => s.state == ContainerState::ContainerRunning as i32,
            Err(e) => {
                tracing::debug!(container = %self.id, "ContainerStatus while following: {e}");
                false
            }
        }
    }
}

/// Sets up and runs the server until `shutdown`; a failure is logged and the rest of the
/// kubelet goes on without its API.
pub async fn run(server: Server, shutdown: CancellationToken) {
    if let Err(e) = server.serve(shutdown).await {
        tracing::error!("the kubelet API is not served: {e}");
    }
}
