//! The CRI `ImageService` over an [`ImageStore`].
//!
//! Answers as the kubelet expects: `ImageStatus` of an unknown image is an empty response;
//! removing an unknown image succeeds; repo tags and repo digests are the recorded names
//! (`docker.io/library/busybox:latest`, `docker.io/library/busybox@sha256:...`); `uid` is set
//! when the image's `User` is numeric, `username` otherwise; `ImageStatus` with `verbose` puts
//! the image config (and the store's record) as JSON under the `info` key.

use std::collections::HashMap;
use std::sync::Arc;

use deckhand_proto::cri;
use tonic::{Request, Response, Status};

use crate::image::{Credentials, Image, ImageError, ImageStore};

/// The service.
#[derive(Debug, Clone)]
pub struct ImageService {
    store: Arc<ImageStore>,
}

impl ImageService {
    /// Serves `store`.
    pub fn new(store: Arc<ImageStore>) -> ImageService {
        ImageService { store }
    }
}

fn status(e: ImageError) -> Status {
    let msg = e.to_string();
    match e.root() {
        ImageError::InvalidReference { .. } | ImageError::InvalidDigest { .. } => {
            Status::invalid_argument(msg)
        }
        ImageError::NotFound(_) => Status::not_found(msg),
        ImageError::Unauthorized { .. } => Status::permission_denied(msg),
        ImageError::InUse { .. } | ImageError::ContainerExists(_) => {
            Status::failed_precondition(msg)
        }
        ImageError::Stalled { .. } => Status::deadline_exceeded(msg),
        ImageError::Registry { .. } => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

fn to_cri(img: &Image) -> cri::Image {
    let mut out = cri::Image {
        id: img.id().to_string(),
        repo_tags: img.repo_tags.clone(),
        repo_digests: img.repo_digests.clone(),
        size: img.record.size,
        spec: Some(cri::ImageSpec {
            image: img.id().to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(user) = img.user() {
        let name = user.split(':').next().unwrap_or(user);
        match name.parse::<i64>() {
            Ok(uid) => out.uid = Some(cri::Int64Value { value: uid }),
            Err(_) => out.username = name.to_string(),
        }
    }
    out
}

fn spec_image(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Status::invalid_argument("image spec is required")),
    }
}

#[tonic::async_trait]
impl cri::image_service_server::ImageService for ImageService {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = match filter {
            Some(f) => {
                let id = self.store.resolve(&f);
                self.store
                    .list()
                    .map_err(status)?
                    .into_iter()
                    .filter(|i| Some(i.id()) == id.as_ref())
                    .collect()
            }
            None => self.store.list().map_err(status)?,
        };
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = request.into_inner();
        let spec = spec_image(req.image.as_ref())?;
        let Some(img) = self.store.get(spec).map_err(status)? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if req.verbose {
            let v = serde_json::json!({
                "imageSpec": img.config,
                "manifestDigest": img.record.manifest_digest,
                "indexDigest": img.record.index_digest,
                "chainId": img.record.top_chain_id(),
                "layers": img.record.layers,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(to_cri(&img)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = request.into_inner();
        let spec = spec_image(req.image.as_ref())?.to_string();
        let auth = match &req.auth {
            Some(a) => Some((
                Credentials::from_parts(
                    &a.username,
                    &a.password,
                    &a.auth,
                    &a.identity_token,
                    &a.registry_token,
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
                a.server_address.clone(),
            )),
            None => None,
        };
        if let Some(sb) = &req.sandbox_config {
            let md = sb.metadata.clone().unwrap_or_default();
            tracing::info!(image = %spec, pod = %md.name, namespace = %md.namespace, "pull for sandbox");
        }
        let store = Arc::clone(&self.store);
        // The pull runs on its own task: a client giving up does not leave a half-done pull
        // (it completes and is recorded).
        let img = tokio::spawn(async move {
            store
                .pull(&spec, auth.as_ref().map(|(c, s)| (c, s.as_str())))
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("pull task: {e}")))?
        .map_err(status)?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: img.id().to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = request.into_inner();
        let spec = spec_image(req.image.as_ref())?.to_string();
        let store = Arc::clone(&self.store);
        // Record files are fsynced: off the async threads.
        tokio::task::spawn_blocking(move || store.remove(&spec))
            .await
            .map_err(|e| Status::internal(format!("remove task: {e}")))?
            .map_err(status)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let store = Arc::clone(&self.store);
        let usage = tokio::task::spawn_blocking(move || store.usage())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let fs = cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.store.root().display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: usage.bytes }),
            inodes_used: Some(cri::UInt64Value {
                value: usage.inodes,
            }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: vec![],
        }))
    }
}
