//! The CRI gRPC services of `deckhand-cri` and serving them on a unix socket.
//!
//! The [`ImageService`](image_service::ImageService) over the image store and the
//! [`RuntimeService`](runtime_service::RuntimeService) over the pod manager, on one socket.

pub mod image_service;
pub mod runtime_service;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
    // Which file is ours: on the way out we remove the socket only if it is still this one (a
    // successor may already have bound its own at the same path).
    // A guard, so that this also happens when the caller drops this future (a shutdown that
    // does not wait for the running requests).
    let _guard = SocketGuard {
        path: socket.to_path_buf(),
        ours: std::fs::metadata(socket).map(|m| (m.dev(), m.ino())).ok(),
    };
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
        // Every request counts as work for the heap trimmer (deckhand-malloc).
        .layer(tower::util::MapRequestLayer::new(
            mark_work::<tonic::codegen::http::Request<tonic::body::Body>>,
        ))
        .add_service(svc)
        .add_optional_service(rsvc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    res.map_err(ServeError::from)
}

fn mark_work<R>(req: R) -> R {
    deckhand_malloc::after_work();
    req
}

/// Removes the socket when dropped, if the path still names the file we bound (device, inode).
struct SocketGuard {
    path: std::path::PathBuf,
    ours: Option<(u64, u64)>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if self.ours.is_some() && now == self.ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
