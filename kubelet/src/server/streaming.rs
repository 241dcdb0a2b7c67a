//! `/exec`, `/attach`, `/portForward`: the CRI call that returns the runtime's streaming URL,
//! then the upgraded connection proxied to it (the kubelet's default since 1.20, rather than a
//! redirect): the request goes to the runtime's streaming server with its headers (upgrade,
//! `X-Stream-Protocol-Version`), and after the runtime's `101 Switching Protocols` both
//! directions are spliced.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{Body, HttpError, full};

/// The stream flags of exec and attach, from the query as upstream's `remotecommand` options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamOptions {
    /// `command` (exec only; repeated).
    pub command: Vec<String>,
    /// `stdin`.
    pub stdin: bool,
    /// `stdout`.
    pub stdout: bool,
    /// `stderr` (false with a tty, whose output is on stdout).
    pub stderr: bool,
    /// `tty`.
    pub tty: bool,
}

fn truthy(v: &str) -> bool {
    matches!(v, "1" | "true" | "True" | "TRUE")
}

impl StreamOptions {
    /// Reads the query; at least one stream is required, as upstream.
    pub fn from_query(query: &[(String, String)], exec: bool) -> Result<StreamOptions, String> {
        let mut o = StreamOptions::default();
        for (k, v) in query {
            match k.as_str() {
                "command" if exec => o.command.push(v.clone()),
                "input" | "stdin" => o.stdin = truthy(v),
                "output" | "stdout" => o.stdout = truthy(v),
                "error" | "stderr" => o.stderr = truthy(v),
                "tty" => o.tty = truthy(v),
                _ => {}
            }
        }
        if o.tty && o.stderr {
            // The terminal merges stderr into stdout.
            o.stderr = false;
        }
        if !(o.stdin || o.stdout || o.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".to_string());
        }
        if exec && o.command.is_empty() {
            return Err("you must specify a command".to_string());
        }
        Ok(o)
    }
}

/// The `port` values of a port-forward request.
pub fn ports_from_query(query: &[(String, String)]) -> Result<Vec<i32>, String> {
    let mut out = Vec::new();
    for (k, v) in query.iter().filter(|(k, _)| k == "port") {
        for p in v.split(',').filter(|p| !p.is_empty()) {
            let n: u16 = p
                .trim()
                .parse()
                .map_err(|_| format!("{k}: {p:?} is not a port"))?;
            if n == 0 {
                return Err(format!("{k}: port 0 is not valid"));
            }
            out.push(i32::from(n));
        }
    }
    Ok(out)
}

/// Proxies the upgrade request `req` to the runtime's streaming `url`.
pub async fn proxy(
    mut req: http::Request<Incoming>,
    url: &str,
) -> Result<http::Response<Body>, HttpError> {
    let bad_gateway = |m: String| HttpError::new(http::StatusCode::BAD_GATEWAY, m);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| bad_gateway(format!("the runtime's streaming URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad_gateway(format!(
            "the runtime's streaming URL {url:?} is not http://"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad_gateway(format!("the runtime's streaming URL {url:?} has no host")))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| bad_gateway(format!("connecting to the runtime's streaming server: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| bad_gateway(format!("the runtime's streaming server: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("streaming proxy connection: {e}");
        }
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut out = http::Request::builder()
        .method(req.method().clone())
        .uri(path);
    for (name, value) in req.headers() {
        if name == http::header::HOST
            || name == http::header::AUTHORIZATION
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
        {
            continue;
        }
        out = out.header(name, value);
    }
    let out = out
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| HttpError::internal(e.to_string()))?;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| bad_gateway(format!("the runtime's streaming server: {e}")))?;
    let status = resp.status();
    let mut back = http::Response::builder().status(status);
    for (name, value) in resp.headers() {
        if status != http::StatusCode::SWITCHING_PROTOCOLS
            && (name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING)
        {
            continue;
        }
        back = back.header(name, value);
    }
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        // The runtime's answer (an error, a non-upgrade request) goes back as it is.
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return back
            .body(full(body))
            .map_err(|e| HttpError::internal(e.to_string()));
    }
    let runtime_upgrade = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (client, runtime) = match tokio::try_join!(client_upgrade, runtime_upgrade) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("streaming proxy: upgrade failed: {e}");
                return;
            }
        };
        let (mut client, mut runtime) = (TokioIo::new(client), TokioIo::new(runtime));
        match tokio::io::copy_bidirectional(&mut client, &mut runtime).await {
            Ok((up, down)) => tracing::debug!(up, down, "streaming proxy finished"),
            Err(e) => tracing::debug!("streaming proxy ended: {e}"),
        }
    });
    back.body(super::empty())
        .map_err(|e| HttpError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stream_options_as_upstream() {
        let o = StreamOptions::from_query(
            &q(&[
                ("command", "sh"),
                ("command", "-c"),
                ("command", "echo hi"),
                ("stdin", "1"),
                ("stdout", "true"),
                ("stderr", "1"),
                ("tty", "1"),
            ]),
            true,
        )
        .expect("options");
        assert_eq!(o.command, ["sh", "-c", "echo hi"]);
        assert!(o.stdin && o.stdout && o.tty);
        assert!(!o.stderr, "a tty carries stderr on stdout");
        assert!(StreamOptions::from_query(&q(&[("command", "ls")]), true).is_err());
        assert!(StreamOptions::from_query(&q(&[("stdout", "1")]), true).is_err());
        let a = StreamOptions::from_query(&q(&[("stdout", "1"), ("command", "x")]), false)
            .expect("attach");
        assert!(a.command.is_empty(), "attach takes no command");
    }

    #[test]
    fn ports() {
        assert_eq!(
            ports_from_query(&q(&[("port", "80"), ("port", "8080,9090")])),
            Ok(vec![80, 8080, 9090])
        );
        assert!(ports_from_query(&q(&[("port", "http")])).is_err());
        assert!(ports_from_query(&q(&[("port", "0")])).is_err());
        assert_eq!(ports_from_query(&[]), Ok(vec![]));
    }
}
