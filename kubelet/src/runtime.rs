//! The kubelet's CRI client: any CRI v1 runtime on a unix socket (deckhand-cri, containerd).
//!
//! [`RuntimeClient`] connects on first use and again after a transport failure, so the kubelet
//! starts (and reports the runtime down) while the runtime is not up yet. Every call is bounded
//! by `runtimeRequestTimeout`.

use std::time::Duration;

use deckhand_proto::CRI_MAX_MESSAGE_SIZE;
use deckhand_proto::cri::image_service_client::ImageServiceClient;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
use deckhand_proto::cri::{
    Image, ImageFsInfoRequest, ImageFsInfoResponse, ListImagesRequest, NetworkConfig,
    RuntimeConfig, RuntimeStatus, StatusRequest, UpdateRuntimeConfigRequest, VersionRequest,
    VersionResponse,
};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// The CRI API version the kubelet speaks.
pub const CRI_VERSION: &str = "v1";

/// A failed CRI call.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket could not be reached.
    #[error(transparent)]
    Connect(#[from] deckhand_proto::unix::ConnectError),
    /// The runtime answered with an error.
    #[error("CRI {call}: {status}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The runtime did not answer in time.
    #[error("CRI {call}: no answer within {timeout:?}")]
    Timeout {
        /// The RPC.
        call: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

/// A CRI v1 client (runtime and image services over one channel).
#[derive(Debug)]
pub struct RuntimeClient {
    endpoint: String,
    timeout: Duration,
    channel: Mutex<Option<Channel>>,
}

impl RuntimeClient {
    /// A client of the runtime at `endpoint` (`unix:///path`); nothing is connected yet.
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> RuntimeClient {
        RuntimeClient {
            endpoint: endpoint.into(),
            timeout,
            channel: Mutex::new(None),
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn channel(&self) -> Result<Channel, RuntimeError> {
        let mut guard = self.channel.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, deckhand_proto::unix::connect(&self.endpoint))
            .await
            .map_err(|_| RuntimeError::Timeout {
                call: "connect",
                timeout: self.timeout,
            })??;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn runtime(&self) -> Result<RuntimeServiceClient<Channel>, RuntimeError> {
        Ok(RuntimeServiceClient::new(self.channel().await?)
            .max_decoding_message_size(CRI_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(CRI_MAX_MESSAGE_SIZE))
    }

    async fn images(&self) -> Result<ImageServiceClient<Channel>, RuntimeError> {
        Ok(ImageServiceClient::new(self.channel().await?)
            .max_decoding_message_size(CRI_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(CRI_MAX_MESSAGE_SIZE))
    }

    /// Runs one call with the timeout; a transport failure drops the channel so the next call
    /// reconnects.
    async fn call<T>(
        &self,
        name: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, RuntimeError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(RuntimeError::Timeout {
                call: name,
                timeout: self.timeout,
            }),
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => {
                if status.code() == tonic::Code::Unavailable {
                    *self.channel.lock().await = None;
                }
                Err(RuntimeError::Call { call: name, status })
            }
        }
    }

    /// `Version`.
    pub async fn version(&self) -> Result<VersionResponse, RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "Version",
            c.version(VersionRequest {
                version: CRI_VERSION.into(),
            }),
        )
        .await
    }

    /// `Status`: the runtime's conditions (RuntimeReady, NetworkReady).
    pub async fn status(&self) -> Result<Option<RuntimeStatus>, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call("Status", c.status(StatusRequest { verbose: false }))
            .await?;
        Ok(r.status)
    }

    /// `ListImages` (all images).
    pub async fn list_images(&self) -> Result<Vec<Image>, RuntimeError> {
        let mut c = self.images().await?;
        let r = self
            .call(
                "ListImages",
                c.list_images(ListImagesRequest { filter: None }),
            )
            .await?;
        Ok(r.images)
    }

    /// `ImageFsInfo`.
    pub async fn image_fs_info(&self) -> Result<ImageFsInfoResponse, RuntimeError> {
        let mut c = self.images().await?;
        self.call("ImageFsInfo", c.image_fs_info(ImageFsInfoRequest {}))
            .await
    }

    /// `UpdateRuntimeConfig` with the node's pod CIDR.
    pub async fn update_pod_cidr(&self, pod_cidr: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "UpdateRuntimeConfig",
            c.update_runtime_config(UpdateRuntimeConfigRequest {
                runtime_config: Some(RuntimeConfig {
                    network_config: Some(NetworkConfig {
                        pod_cidr: pod_cidr.to_string(),
                    }),
                }),
            }),
        )
        .await
        .map(|_| ())
    }
}
