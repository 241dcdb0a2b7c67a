//! The streaming server: the token cache the CRI calls into, and the HTTP/1.1 listener that
//! upgrades `/{exec,attach,portforward}/<token>` requests to SPDY/3.1.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deckhand_proto::cri;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Runtime;
use crate::protocol::{self, PORT_FORWARD_V1, REMOTECOMMAND_PROTOCOLS, SPDY_31};
use crate::spdy::{ConnOptions, Connection, Limits, Role};
use crate::tokens::{Pending, TokenCache, TokenError};

/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Streaming server settings (defaults as upstream's `DefaultConfig`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// The base of the URLs handed out (`http://host:port`); default: from the bound address
    /// (set it when `addr` is a wildcard address). Plain HTTP only: serve on loopback.
    pub base_url: Option<String>,
    /// A session with no frame either way for this long is closed (upstream: 4 h).
    pub stream_idle_timeout: Duration,
    /// How long a client may take to open the streams of a session (upstream: 30 s).
    pub stream_creation_timeout: Duration,
    /// How long a token stays valid (upstream: 1 min).
    pub token_ttl: Duration,
    /// remotecommand sub-protocols accepted, in no particular order (the client's order wins).
    pub remotecommand_protocols: Vec<String>,
    /// portforward sub-protocols accepted.
    pub portforward_protocols: Vec<String>,
    /// SPDY frame and header size limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: None,
            stream_idle_timeout: Duration::from_secs(4 * 3600),
            stream_creation_timeout: Duration::from_secs(30),
            token_ttl: Duration::from_secs(60),
            remotecommand_protocols: REMOTECOMMAND_PROTOCOLS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            portforward_protocols: vec![PORT_FORWARD_V1.to_string()],
            limits: Limits::default(),
        }
    }
}

/// Why a Get{Exec,Attach,PortForward} request was refused; `InvalidArgument` and
/// `ResourceExhausted` map to the gRPC codes of the same names, the rest to `Internal`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("maximum number of in-flight requests exceeded")]
    ResourceExhausted,
    #[error("the streaming server is not bound yet")]
    NotBound,
    #[error("{0}")]
    Internal(String),
}

/// Failures of the server itself.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serve called before bind")]
    NotBound,
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
}

/// The streaming server. Cheap to clone; clones share the token cache and listener.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) runtime: Arc<dyn Runtime>,
    tokens: TokenCache,
    listener: Mutex<Option<TcpListener>>,
    base_url: Mutex<Option<String>>,
    sessions: TaskTracker,
    stop: CancellationToken,
}

impl Server {
    pub fn new(config: Config, runtime: Arc<dyn Runtime>) -> Server {
        let tokens = TokenCache::new(config.token_ttl);
        Server {
            inner: Arc::new(Inner {
                base_url: Mutex::new(config.base_url.clone()),
                config,
                runtime,
                tokens,
                listener: Mutex::new(None),
                sessions: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Binds the listener; returns the bound address (the real port when 0 was asked for).
    pub async fn bind(&self) -> Result<SocketAddr, ServerError> {
        let addr = self.inner.config.addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        {
            let mut base = lock(&self.inner.base_url);
            if base.is_none() {
                *base = Some(format!("http://{bound}"));
            }
        }
        *lock(&self.inner.listener) = Some(listener);
        tracing::info!("streaming server listening on {bound}");
        Ok(bound)
    }

    /// The base of the URLs handed out, once bound (or configured).
    pub fn base_url(&self) -> Option<String> {
        lock(&self.inner.base_url).clone()
    }

    /// Serves until `shutdown` resolves; then stops accepting and ends the open sessions.
    /// Call once per `bind`.
    pub async fn serve(&self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let listener = lock(&self.inner.listener)
            .take()
            .ok_or(ServerError::NotBound)?;
        tokio::pin!(shutdown);
        let result = loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) if is_transient(&e) => {
                        tracing::warn!("streaming server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => break Err(ServerError::Accept(e)),
                },
            };
            let _ = tcp.set_nodelay(true);
            let inner = self.inner.clone();
            let stop = self.inner.stop.clone();
            self.inner.sessions.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let inner = inner.clone();
                    async move { Ok::<_, Infallible>(handle(inner, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades();
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!("streaming connection from {peer}: {e}");
                    },
                    _ = stop.cancelled() => {}
                }
            });
        };
        self.inner.stop.cancel();
        self.inner.sessions.close();
        self.inner.sessions.wait().await;
        result
    }

    /// Validates an exec request and returns its single-use URL.
    pub fn get_exec(&self, req: &cri::ExecRequest) -> Result<cri::ExecResponse, RequestError> {
        if req.container_id.is_empty() {
            return Err(invalid("missing required container_id"));
        }
        if req.cmd.is_empty() {
            return Err(invalid("missing required cmd"));
        }
        validate_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        let url = self.url("exec", Pending::Exec(req.clone()))?;
        Ok(cri::ExecResponse { url })
    }

    /// Validates an attach request and returns its single-use URL.
    pub fn get_attach(
        &self,
        req: &cri::AttachRequest,
    ) -> Result<cri::AttachResponse, RequestError> {
        if req.container_id.is_empty() {
            return Err(invalid("missing required container_id"));
        }
        validate_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        let url = self.url("attach", Pending::Attach(req.clone()))?;
        Ok(cri::AttachResponse { url })
    }

    /// Validates a port-forward request and returns its single-use URL.
    pub fn get_port_forward(
        &self,
        req: &cri::PortForwardRequest,
    ) -> Result<cri::PortForwardResponse, RequestError> {
        if req.pod_sandbox_id.is_empty() {
            return Err(invalid("missing required pod_sandbox_id"));
        }
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(invalid(&format!("invalid port {p}")));
        }
        let url = self.url("portforward", Pending::PortForward(req.clone()))?;
        Ok(cri::PortForwardResponse { url })
    }

    fn url(&self, kind: &str, req: Pending) -> Result<String, RequestError> {
        let base = self.base_url().ok_or(RequestError::NotBound)?;
        let token = self.inner.tokens.insert(req).map_err(|e| match e {
            TokenError::Full => RequestError::ResourceExhausted,
            TokenError::Random(m) => RequestError::Internal(m),
        })?;
        Ok(format!("{}/{kind}/{token}", base.trim_end_matches('/')))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        // EMFILE/ENFILE: wait for descriptors to be freed rather than giving up.
        || matches!(e.raw_os_error(), Some(23 | 24))
}

fn invalid(msg: &str) -> RequestError {
    RequestError::InvalidArgument(msg.to_string())
}

/// Upstream's rules: a TTY merges stderr into stdout, and some stream must be requested.
fn validate_streams(
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<(), RequestError> {
    if tty && stderr {
        return Err(invalid("tty and stderr cannot both be true"));
    }
    if !stdin && !stdout && !stderr {
        return Err(invalid("one of stdin, stdout, or stderr must be set"));
    }
    Ok(())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.into() + "\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn header_has_token(h: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

async fn handle(inner: Arc<Inner>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').split('/');
    let (kind, token) = match (parts.next(), parts.next(), parts.next()) {
        (Some(k @ ("exec" | "attach" | "portforward")), Some(t), None) if !t.is_empty() => (k, t),
        _ => return text(StatusCode::NOT_FOUND, "404 page not found"),
    };
    let pending = match inner.tokens.consume(token) {
        Some(p) => p,
        None => return text(StatusCode::NOT_FOUND, "404 page not found"),
    };
    let matches = matches!(
        (kind, &pending),
        ("exec", Pending::Exec(_))
            | ("attach", Pending::Attach(_))
            | ("portforward", Pending::PortForward(_))
    );
    if !matches {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    }
    let h = req.headers();
    if !header_has_token(h, header::CONNECTION, "upgrade")
        || !header_has_token(h, header::UPGRADE, SPDY_31)
    {
        return text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        );
    }
    let client = protocol::client_protocols(h);
    let server: Vec<&str> = match pending {
        Pending::PortForward(_) => inner.config.portforward_protocols.iter(),
        _ => inner.config.remotecommand_protocols.iter(),
    }
    .map(String::as_str)
    .collect();
    let chosen: Option<String> = if client.is_empty() {
        // Pre-negotiation clients: upstream falls back to the oldest protocol.
        None
    } else {
        match protocol::negotiate(&client, &server) {
            Some(p) => Some(p.to_string()),
            None => {
                let mut resp = text(
                    StatusCode::FORBIDDEN,
                    format!(
                        "unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts {server:?}"
                    ),
                );
                for p in &server {
                    if let Ok(v) = HeaderValue::from_str(p) {
                        resp.headers_mut()
                            .append(protocol::HEADER_ACCEPTED_PROTOCOL_VERSIONS, v);
                    }
                }
                return resp;
            }
        }
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let stop = inner.stop.clone();
    let session_inner = inner.clone();
    let proto = chosen.clone();
    inner.sessions.spawn(async move {
        let upgraded = tokio::select! {
            u = on_upgrade => match u {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("streaming upgrade failed: {e}");
                    return;
                }
            },
            _ = stop.cancelled() => return,
        };
        let opts = ConnOptions {
            limits: session_inner.config.limits,
            idle_timeout: Some(session_inner.config.stream_idle_timeout),
        };
        let conn = Connection::new(TokioIo::new(upgraded), Role::Server, opts);
        let session = async {
            match pending {
                Pending::PortForward(pf) => {
                    crate::portforward::serve(&session_inner, &conn, &pf.pod_sandbox_id).await
                }
                other => {
                    crate::remotecommand::serve(&session_inner, &conn, other, proto.as_deref())
                        .await
                }
            }
        };
        tokio::select! {
            _ = session => {}
            _ = stop.cancelled() => {}
        }
        conn.close(Duration::from_secs(5)).await;
    });

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hm = resp.headers_mut();
    hm.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hm.insert(header::UPGRADE, HeaderValue::from_static(SPDY_31));
    if let Some(p) = chosen.and_then(|p| HeaderValue::from_str(&p).ok()) {
        hm.insert(protocol::HEADER_PROTOCOL_VERSION, p);
    }
    resp
}
