//! The CRI gRPC services of `deckhand-cri` and serving them on a unix socket.
//!
//! The [`ImageService`](image_service::ImageService) over the image store and the
//! [`RuntimeService`](runtime_service::RuntimeService) over the pod manager, on one socket.

pub mod image_service;
pub mod runtime_service;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use deckhand_proto::cri::image_service_server::ImageServiceServer;
use deckhand_proto::cri::runtime_service_server::RuntimeServiceServer;
use tokio_stream::wrappers::UnixListenerStream;

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be created.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `socket` (replacing a stale socket file, creating its directory), makes it mode 0660
/// and serves the image service (and the runtime service, when given) until `shutdown`
/// completes.
pub async fn serve(
    socket: &Path,
    images: image_service::ImageService,
    runtime: Option<runtime_service::RuntimeService>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let sock_err = |source: std::io::Error| ServeError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    // Bound under a temporary name, made 0660, then renamed: the socket appears listening and
    // with its final mode, never in between.
    let tmp = socket.with_file_name(format!(
        ".{}.tmp-{}",
        socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(sock_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| std::fs::rename(&tmp, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(sock_err(e));
    }
    tracing::info!(socket = %socket.display(), runtime = runtime.is_some(), "serving CRI");
    let svc = ImageServiceServer::new(images)
        .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
        .max_encoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE);
    let rsvc = runtime.map(|r| {
        RuntimeServiceServer::new(r)
            .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
    });
    let res = tonic::transport::Server::builder()
        .add_service(svc)
        .add_optional_service(rsvc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    res.map_err(ServeError::from)
}
