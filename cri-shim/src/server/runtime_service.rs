//! The CRI `RuntimeService` over a [`pod::Manager`]: request validation and the mapping of
//! its errors to gRPC codes; the logic is the manager's. Exec, Attach and PortForward hand out URLs
//! of the streaming server (`deckhand-streaming`) when one is configured.

use std::pin::Pin;
use std::sync::Arc;

use deckhand_proto::cri;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::pod::{self, Error};

/// The streaming endpoints (Exec, Attach, PortForward): URLs for a request.
pub trait Streaming: Send + Sync + 'static {
    fn exec_url(&self, req: &cri::ExecRequest) -> Result<String, Status>;
    fn attach_url(&self, req: &cri::AttachRequest) -> Result<String, Status>;
    fn port_forward_url(&self, req: &cri::PortForwardRequest) -> Result<String, Status>;
}

fn request_status(e: deckhand_streaming::RequestError) -> Status {
    match e {
        deckhand_streaming::RequestError::InvalidArgument(m) => Status::invalid_argument(m),
        deckhand_streaming::RequestError::ResourceExhausted => {
            Status::resource_exhausted(e.to_string())
        }
        e => Status::internal(e.to_string()),
    }
}

impl Streaming for deckhand_streaming::Server {
    fn exec_url(&self, req: &cri::ExecRequest) -> Result<String, Status> {
        self.get_exec(req).map(|r| r.url).map_err(request_status)
    }

    fn attach_url(&self, req: &cri::AttachRequest) -> Result<String, Status> {
        self.get_attach(req).map(|r| r.url).map_err(request_status)
    }

    fn port_forward_url(&self, req: &cri::PortForwardRequest) -> Result<String, Status> {
        self.get_port_forward(req)
            .map(|r| r.url)
            .map_err(request_status)
    }
}

/// The service.
#[derive(Clone)]
pub struct RuntimeService {
    m: Arc<pod::Manager>,
    streaming: Option<Arc<dyn Streaming>>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for RuntimeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeService").finish_non_exhaustive()
    }
}

impl RuntimeService {
    pub fn new(m: Arc<pod::Manager>, streaming: Option<Arc<dyn Streaming>>) -> RuntimeService {
        RuntimeService {
            m,
            streaming,
            shutdown: None,
        }
    }

    /// Ends the long-lived `GetContainerEvents` streams once `shutdown` turns true, so that a
    /// graceful shutdown does not wait for clients that never hang up (every kubelet keeps one).
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    fn streaming(&self) -> Result<&dyn Streaming, Status> {
        self.streaming
            .as_deref()
            .ok_or_else(|| Status::unimplemented("no streaming server is configured"))
    }
}

/// Resolves once `sd` turns true; never if its sender is gone without doing so.
async fn shutting_down(sd: &mut tokio::sync::watch::Receiver<bool>) {
    if sd.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::NotFound(_) => Status::not_found(msg),
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
        Error::Unimplemented(_) => Status::unimplemented(msg),
        Error::Internal(_) => Status::internal(msg),
    }
}

type R<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> R<T> {
    Ok(Response::new(t))
}

/// The runtime's version (the crate's).
pub const RUNTIME_NAME: &str = "deckhand";

#[tonic::async_trait]
impl cri::runtime_service_server::RuntimeService for RuntimeService {
    async fn version(&self, _: Request<cri::VersionRequest>) -> R<cri::VersionResponse> {
        ok(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        })
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> R<cri::RunPodSandboxResponse> {
        let r = req.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("no sandbox config"))?;
        let id = self
            .m
            .run_pod_sandbox(config, &r.runtime_handler)
            .await
            .map_err(status)?;
        ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> R<cri::StopPodSandboxResponse> {
        self.m
            .stop_pod_sandbox(&req.into_inner().pod_sandbox_id)
            .await
            .map_err(status)?;
        ok(cri::StopPodSandboxResponse {})
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> R<cri::RemovePodSandboxResponse> {
        self.m
            .remove_pod_sandbox(&req.into_inner().pod_sandbox_id)
            .await
            .map_err(status)?;
        ok(cri::RemovePodSandboxResponse {})
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> R<cri::PodSandboxStatusResponse> {
        let r = req.into_inner();
        ok(self
            .m
            .pod_sandbox_status(&r.pod_sandbox_id, r.verbose)
            .map_err(status)?)
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> R<cri::ListPodSandboxResponse> {
        let items = self
            .m
            .list_pod_sandbox(req.into_inner().filter)
            .map_err(status)?;
        ok(cri::ListPodSandboxResponse { items })
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> R<cri::CreateContainerResponse> {
        let r = req.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("no container config"))?;
        let id = self
            .m
            .create_container(&r.pod_sandbox_id, config)
            .await
            .map_err(status)?;
        ok(cri::CreateContainerResponse { container_id: id })
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> R<cri::StartContainerResponse> {
        self.m
            .start_container(&req.into_inner().container_id)
            .await
            .map_err(status)?;
        ok(cri::StartContainerResponse {})
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> R<cri::StopContainerResponse> {
        let r = req.into_inner();
        self.m
            .stop_container(&r.container_id, r.timeout)
            .await
            .map_err(status)?;
        ok(cri::StopContainerResponse {})
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> R<cri::RemoveContainerResponse> {
        self.m
            .remove_container(&req.into_inner().container_id)
            .await
            .map_err(status)?;
        ok(cri::RemoveContainerResponse {})
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> R<cri::ListContainersResponse> {
        let containers = self
            .m
            .list_containers(req.into_inner().filter)
            .map_err(status)?;
        ok(cri::ListContainersResponse { containers })
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> R<cri::ContainerStatusResponse> {
        let r = req.into_inner();
        ok(self
            .m
            .container_status(&r.container_id, r.verbose)
            .map_err(status)?)
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> R<cri::UpdateContainerResourcesResponse> {
        let r = req.into_inner();
        self.m
            .update_container_resources(&r.container_id, r.linux)
            .await
            .map_err(status)?;
        ok(cri::UpdateContainerResourcesResponse {})
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> R<cri::ReopenContainerLogResponse> {
        self.m
            .reopen_container_log(&req.into_inner().container_id)
            .await
            .map_err(status)?;
        ok(cri::ReopenContainerLogResponse {})
    }

    async fn exec_sync(&self, req: Request<cri::ExecSyncRequest>) -> R<cri::ExecSyncResponse> {
        let r = req.into_inner();
        ok(self
            .m
            .exec_sync(&r.container_id, &r.cmd, r.timeout)
            .await
            .map_err(status)?)
    }

    async fn exec(&self, req: Request<cri::ExecRequest>) -> R<cri::ExecResponse> {
        let r = req.into_inner();
        // Fail early on what cannot be exec'd into.
        self.m.container_running(&r.container_id).map_err(status)?;
        let url = self.streaming()?.exec_url(&r)?;
        ok(cri::ExecResponse { url })
    }

    async fn attach(&self, req: Request<cri::AttachRequest>) -> R<cri::AttachResponse> {
        let r = req.into_inner();
        self.m.container_running(&r.container_id).map_err(status)?;
        let url = self.streaming()?.attach_url(&r)?;
        ok(cri::AttachResponse { url })
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> R<cri::PortForwardResponse> {
        let r = req.into_inner();
        self.m.sandbox_ready(&r.pod_sandbox_id).map_err(status)?;
        let url = self.streaming()?.port_forward_url(&r)?;
        ok(cri::PortForwardResponse { url })
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> R<cri::ContainerStatsResponse> {
        let stats = self
            .m
            .container_stats(&req.into_inner().container_id)
            .map_err(status)?;
        ok(cri::ContainerStatsResponse { stats: Some(stats) })
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> R<cri::ListContainerStatsResponse> {
        let stats = self
            .m
            .list_container_stats(req.into_inner().filter)
            .map_err(status)?;
        ok(cri::ListContainerStatsResponse { stats })
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> R<cri::PodSandboxStatsResponse> {
        let stats = self
            .m
            .pod_sandbox_stats(&req.into_inner().pod_sandbox_id)
            .map_err(status)?;
        ok(cri::PodSandboxStatsResponse { stats: Some(stats) })
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> R<cri::ListPodSandboxStatsResponse> {
        let stats = self
            .m
            .list_pod_sandbox_stats(req.into_inner().filter)
            .map_err(status)?;
        ok(cri::ListPodSandboxStatsResponse { stats })
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> R<cri::UpdateRuntimeConfigResponse> {
        self.m
            .update_runtime_config(req.into_inner().runtime_config);
        ok(cri::UpdateRuntimeConfigResponse {})
    }

    async fn status(&self, req: Request<cri::StatusRequest>) -> R<cri::StatusResponse> {
        ok(self.m.status(req.into_inner().verbose))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> R<cri::CheckpointContainerResponse> {
        Err(Status::unimplemented("checkpointing is not supported"))
    }

    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> R<Self::GetContainerEventsStream> {
        let rx = self.m.subscribe();
        // Without a shutdown signal, a receiver whose sender is gone: the stream ends only with
        // the manager's sender.
        let sd = self
            .shutdown
            .clone()
            .unwrap_or_else(|| tokio::sync::watch::channel(false).1);
        let s = futures::stream::unfold((rx, sd), |(mut rx, mut sd)| async move {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = shutting_down(&mut sd) => {
                    tracing::debug!("shutting down: ending a GetContainerEvents stream");
                    return None;
                }
            };
            ev.map(|ev| (Ok(cri::ContainerEventResponse::clone(&ev)), (rx, sd)))
        });
        ok(Box::pin(s))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> R<cri::ListMetricDescriptorsResponse> {
        Err(Status::unimplemented(
            "metric descriptors are not supported",
        ))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> R<cri::ListPodSandboxMetricsResponse> {
        Err(Status::unimplemented(
            "pod sandbox metrics are not supported",
        ))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> R<cri::RuntimeConfigResponse> {
        ok(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        })
    }
}
