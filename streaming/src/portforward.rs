//! portforward over an upgraded SPDY connection, server side: the client opens a pair of
//! streams (`streamType: error` and `data`, same `port` and `requestID`) per forwarded
//! connection; any number of pairs run concurrently on one connection.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::protocol::*;
use crate::server::Inner;
use crate::spdy::Connection;
use crate::spdy::Stream;
use crate::spdy::frame::rst;

#[derive(Default)]
struct Pair {
    data: Option<Stream>,
    error: Option<Stream>,
    port: u16,
    created: Option<Instant>,
}

/// Serves one port-forward connection until the client closes it.
pub(crate) async fn serve(inner: &Inner, conn: &Connection, sandbox: &str) {
    let timeout = inner.config.stream_creation_timeout;
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards = JoinSet::new();
    loop {
        let next_expiry = pairs
            .values()
            .filter_map(|p| p.created)
            .min()
            .map(|c| c + timeout);
        let sleep = async {
            match next_expiry {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let stream = tokio::select! {
            s = conn.accept() => match s {
                Some(s) => s,
                None => break,
            },
            _ = sleep => {
                let now = Instant::now();
                let expired: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| p.created.is_some_and(|c| c + timeout <= now))
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in expired {
                    if let Some(p) = pairs.remove(&id) {
                        let msg = format!("timed out waiting for the second stream of request {id}");
                        tracing::debug!("{sandbox}: {msg}");
                        fail(p, &msg).await;
                    }
                }
                continue;
            }
            Some(done) = forwards.join_next(), if !forwards.is_empty() => {
                if let Err(e) = done {
                    tracing::debug!("{sandbox}: forward task: {e}");
                }
                continue;
            }
        };
        if stream.reply().await.is_err() {
            break;
        }
        let h = stream.headers();
        let kind = h.get(HEADER_STREAM_TYPE).unwrap_or("").to_string();
        let port = h
            .get(HEADER_PORT)
            .map(|p| (p.to_string(), p.parse::<u16>()));
        // Clients before requestID paired an error stream with the data stream after it.
        let request_id = match h.get(HEADER_REQUEST_ID) {
            Some(id) => id.to_string(),
            None if kind == STREAM_TYPE_DATA => stream.id().saturating_sub(2).to_string(),
            None => stream.id().to_string(),
        };
        let port = match port {
            Some((_, Ok(p))) if p > 0 => p,
            Some((raw, _)) => {
                reject(stream, &kind, &format!("invalid port {raw:?}")).await;
                continue;
            }
            None => {
                reject(stream, &kind, "missing port header").await;
                continue;
            }
        };
        let pair = pairs.entry(request_id.clone()).or_default();
        if pair.created.is_some() && pair.port != port {
            let msg = format!("request {request_id}: streams for different ports");
            reject(stream, &kind, &msg).await;
            if let Some(p) = pairs.remove(&request_id) {
                fail(p, &msg).await;
            }
            continue;
        }
        pair.port = port;
        pair.created.get_or_insert_with(Instant::now);
        let slot = match kind.as_str() {
            STREAM_TYPE_DATA => &mut pair.data,
            STREAM_TYPE_ERROR => &mut pair.error,
            other => {
                let msg = format!("invalid stream type {other:?}");
                reject(stream, other, &msg).await;
                continue;
            }
        };
        if slot.is_some() {
            reject(
                stream,
                &kind,
                &format!("request {request_id}: duplicate {kind} stream"),
            )
            .await;
            continue;
        }
        *slot = Some(stream);
        if pair.data.is_some()
            && pair.error.is_some()
            && let Some(Pair {
                data: Some(data),
                error: Some(mut error),
                port,
                ..
            }) = pairs.remove(&request_id)
        {
            let runtime = inner.runtime.clone();
            let sandbox = sandbox.to_string();
            forwards.spawn(async move {
                tracing::debug!("{sandbox}: forwarding port {port} (request {request_id})");
                match runtime.port_forward(&sandbox, port, Box::new(data)).await {
                    Ok(()) => {
                        let _ = error.shutdown().await;
                    }
                    Err(e) => {
                        let msg = format!("error forwarding port {port} to pod {sandbox}: {e}");
                        tracing::debug!("{msg}");
                        let _ = error.write_and_close(msg.as_bytes()).await;
                    }
                }
            });
        }
    }
    forwards.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while forwards.join_next().await.is_some() {}
    })
    .await;
}

/// Refuses one stream: the message on it if it is an error stream, a reset otherwise.
async fn reject(mut stream: Stream, kind: &str, msg: &str) {
    tracing::debug!("port forward: {msg}");
    if kind == STREAM_TYPE_ERROR {
        let _ = stream.write_and_close(msg.as_bytes()).await;
    } else {
        stream.reset(rst::REFUSED_STREAM).await;
    }
}

async fn fail(p: Pair, msg: &str) {
    if let Some(mut e) = p.error {
        let _ = e.write_and_close(msg.as_bytes()).await;
    }
    if let Some(d) = p.data {
        d.reset(rst::CANCEL).await;
    }
}
