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
    AuthConfig, Container, ContainerConfig, ContainerEventResponse, ContainerFilter,
    ContainerStatus, ContainerStatusRequest, CreateContainerRequest, GetEventsRequest, Image,
    ImageFsInfoRequest, ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ListContainersRequest,
    ListImagesRequest, ListPodSandboxRequest, NetworkConfig, PodSandbox, PodSandboxConfig,
    PodSandboxFilter, PodSandboxStatus, PodSandboxStatusRequest, PullImageRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, RuntimeConfig,
    RuntimeStatus, StartContainerRequest, StatusRequest, StopContainerRequest,
    StopPodSandboxRequest, UpdateRuntimeConfigRequest, VersionRequest, VersionResponse,
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

    /// The gRPC status of a failed call, if it was one.
    pub fn status_code(e: &RuntimeError) -> Option<tonic::Code> {
        match e {
            RuntimeError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// `ListPodSandbox` with the labels in `selector` (all sandboxes when empty).
    pub async fn list_pod_sandboxes(
        &self,
        selector: std::collections::HashMap<String, String>,
    ) -> Result<Vec<PodSandbox>, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call(
                "ListPodSandbox",
                c.list_pod_sandbox(ListPodSandboxRequest {
                    filter: Some(PodSandboxFilter {
                        label_selector: selector,
                        ..Default::default()
                    }),
                }),
            )
            .await?;
        Ok(r.items)
    }

    /// `ListContainers` with the labels in `selector` (all containers when empty).
    pub async fn list_containers(
        &self,
        selector: std::collections::HashMap<String, String>,
    ) -> Result<Vec<Container>, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call(
                "ListContainers",
                c.list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        label_selector: selector,
                        ..Default::default()
                    }),
                }),
            )
            .await?;
        Ok(r.containers)
    }

    /// `PodSandboxStatus`.
    pub async fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatus, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call(
                "PodSandboxStatus",
                c.pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: id.to_string(),
                    verbose: false,
                }),
            )
            .await?;
        r.status.ok_or_else(|| RuntimeError::Call {
            call: "PodSandboxStatus",
            status: tonic::Status::internal("no status in the answer"),
        })
    }

    /// `ContainerStatus`.
    pub async fn container_status(&self, id: &str) -> Result<ContainerStatus, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call(
                "ContainerStatus",
                c.container_status(ContainerStatusRequest {
                    container_id: id.to_string(),
                    verbose: false,
                }),
            )
            .await?;
        r.status.ok_or_else(|| RuntimeError::Call {
            call: "ContainerStatus",
            status: tonic::Status::internal("no status in the answer"),
        })
    }

    /// `RunPodSandbox`; returns the sandbox ID.
    pub async fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call(
                "RunPodSandbox",
                c.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                }),
            )
            .await?;
        Ok(r.pod_sandbox_id)
    }

    /// `StopPodSandbox`.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "StopPodSandbox",
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        )
        .await
        .map(|_| ())
    }

    /// `RemovePodSandbox` (removes its containers too).
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "RemovePodSandbox",
            c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            }),
        )
        .await
        .map(|_| ())
    }

    /// `CreateContainer`; returns the container ID.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, RuntimeError> {
        let mut c = self.runtime().await?;
        let r = self
            .call(
                "CreateContainer",
                c.create_container(CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.to_string(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                }),
            )
            .await?;
        Ok(r.container_id)
    }

    /// `StartContainer`.
    pub async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "StartContainer",
            c.start_container(StartContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(|_| ())
    }

    /// `StopContainer` with a grace period of `timeout` seconds (the call itself may take that
    /// much longer than the request timeout).
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), RuntimeError> {
        let mut c = self.runtime().await?;
        let limit = self.timeout + Duration::from_secs(u64::try_from(timeout).unwrap_or(0));
        let fut = c.stop_container(StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        });
        match tokio::time::timeout(limit, fut).await {
            Err(_) => Err(RuntimeError::Timeout {
                call: "StopContainer",
                timeout: limit,
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(RuntimeError::Call {
                call: "StopContainer",
                status,
            }),
        }
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "RemoveContainer",
            c.remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            }),
        )
        .await
        .map(|_| ())
    }

    /// `ImageStatus`: the image's ID when the runtime has it.
    pub async fn image_status(&self, image: &str) -> Result<Option<Image>, RuntimeError> {
        let mut c = self.images().await?;
        let r = self
            .call(
                "ImageStatus",
                c.image_status(ImageStatusRequest {
                    image: Some(ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    verbose: false,
                }),
            )
            .await?;
        Ok(r.image)
    }

    /// `PullImage`; returns the image reference (ID) the runtime pulled. Pulls are bounded by
    /// the request timeout too (upstream bounds them by progress instead).
    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<AuthConfig>,
        sandbox_config: Option<PodSandboxConfig>,
    ) -> Result<String, RuntimeError> {
        let mut c = self.images().await?;
        let r = self
            .call(
                "PullImage",
                c.pull_image(PullImageRequest {
                    image: Some(ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    auth,
                    sandbox_config,
                }),
            )
            .await?;
        Ok(r.image_ref)
    }

    /// `GetContainerEvents`: the runtime's event stream (an `Unimplemented` error from runtimes
    /// without it, such as containerd 1.6).
    pub async fn container_events(
        &self,
    ) -> Result<tonic::Streaming<ContainerEventResponse>, RuntimeError> {
        let mut c = self.runtime().await?;
        self.call(
            "GetContainerEvents",
            c.get_container_events(GetEventsRequest {}),
        )
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
