//! Unix-socket transport for CRI clients.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Errors from [`connect`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint is neither a `unix://` URL nor an absolute path.
    #[error("unsupported CRI endpoint {0:?}: expected unix:///path or an absolute path")]
    BadEndpoint(String),
    /// The socket could not be reached.
    #[error("cannot connect to CRI endpoint {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Turns `unix:///run/x.sock`, `unix:/run/x.sock` or `/run/x.sock` into a socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ConnectError> {
    let rest = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if rest.starts_with('/') {
        Ok(PathBuf::from(rest))
    } else {
        Err(ConnectError::BadEndpoint(endpoint.to_string()))
    }
}

/// Opens a gRPC channel to the unix socket named by `endpoint` (see [`socket_path`]).
/// The connection is made now, so a missing socket is reported here and not on the first call.
pub async fn connect(endpoint: &str) -> Result<Channel, ConnectError> {
    let path = socket_path(endpoint)?;
    connect_path(&path).await
}

/// Opens a gRPC channel to the unix socket at `path`.
pub async fn connect_path(path: &Path) -> Result<Channel, ConnectError> {
    let owned = path.to_path_buf();
    // The URI is required by tonic but never resolved: the connector below ignores it.
    Endpoint::from_static("http://[::1]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = owned.clone();
            async move { UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_path("unix:///run/deckhand/cri.sock").ok(),
            Some(PathBuf::from("/run/deckhand/cri.sock"))
        );
        assert_eq!(
            socket_path("unix:/run/a.sock").ok(),
            Some(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(
            socket_path("/run/a.sock").ok(),
            Some(PathBuf::from("/run/a.sock"))
        );
        assert!(matches!(
            socket_path("tcp://127.0.0.1:1"),
            Err(ConnectError::BadEndpoint(_))
        ));
        assert!(matches!(
            socket_path("relative.sock"),
            Err(ConnectError::BadEndpoint(_))
        ));
    }

    #[tokio::test]
    async fn missing_socket_is_an_error_at_connect() {
        let dir = std::env::temp_dir().join(format!("dh-proto-test-{}", std::process::id()));
        let err = connect_path(&dir.join("none.sock")).await;
        assert!(matches!(err, Err(ConnectError::Connect { .. })));
    }
}
