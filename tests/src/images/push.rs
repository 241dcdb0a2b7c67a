//! Pushing a built [`Catalog`] to a plain-HTTP registry with the OCI distribution API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tracing::{info, warn};

use super::ImageIndex;
use super::catalog::{BuiltBlob, BuiltImage, Catalog, CorruptBlob};

/// Where and how to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `host:port` of a plain-HTTP registry.
    pub registry: String,
    /// HTTP basic auth user name (with `password`), for an htpasswd-protected registry.
    pub username: Option<String>,
    /// HTTP basic auth password.
    pub password: Option<String>,
    /// The registry's filesystem storage root (`rootdirectory` of its config). Needed to corrupt
    /// the `dh/hostile:badlayer` blob; without it that image is skipped (and marked so).
    pub registry_storage: Option<PathBuf>,
}

/// Pushes every image of `catalog` (blobs already in a repository are not uploaded again; tags
/// are overwritten with the same manifests) and returns the index of what is in the registry.
pub async fn push_catalog(catalog: &Catalog, opts: &PushOptions) -> Result<ImageIndex> {
    crate::testbed::install_crypto_provider();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: true,
        ..ClientConfig::default()
    });
    let auth = match (&opts.username, &opts.password) {
        (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        (None, None) => RegistryAuth::Anonymous,
        _ => anyhow::bail!("give both a user name and a password, or neither"),
    };
    client.store_auth_if_needed(&opts.registry, &auth).await;

    let started = Instant::now();
    let mut images = BTreeMap::new();
    for image in &catalog.images {
        let mut record = image.record.clone();
        if image.corrupt.is_some() && opts.registry_storage.is_none() {
            let reason = "not pushed: corrupting the layer needs --registry-storage".to_string();
            warn!(reference = %record.reference, "{reason}");
            record.skipped = Some(reason);
            images.insert(record.reference.clone(), record);
            continue;
        }
        let t = Instant::now();
        let uploaded = push_image(&client, &opts.registry, image)
            .await
            .with_context(|| format!("pushing {} to {}", record.reference, opts.registry))?;
        if let (Some(corrupt), Some(storage)) = (&image.corrupt, &opts.registry_storage) {
            corrupt_blob(storage, corrupt)
                .with_context(|| format!("corrupting the top layer of {}", record.reference))?;
        }
        info!(
            reference = %record.reference,
            digest = %record.manifest_digest,
            uploaded,
            ms = t.elapsed().as_millis() as u64,
            "pushed"
        );
        images.insert(record.reference.clone(), record);
    }
    info!(
        registry = %opts.registry,
        images = images.len(),
        ms = started.elapsed().as_millis() as u64,
        "catalog pushed"
    );
    Ok(ImageIndex {
        registry: opts.registry.clone(),
        busybox_sha256: catalog.busybox_sha256.clone(),
        images,
    })
}

/// Pushes one image; returns how many blobs were uploaded (the others were already there).
async fn push_image(client: &Client, registry: &str, image: &BuiltImage) -> Result<usize> {
    let repository = &image.record.repository;
    let tagged = Reference::with_tag(
        registry.to_string(),
        repository.clone(),
        image.record.tag.clone(),
    );
    let mut uploaded = 0;
    for blob in &image.blobs {
        let exists = client
            .blob_exists(&tagged, &blob.digest)
            .await
            .with_context(|| format!("checking for blob {}", blob.digest))?;
        if !exists {
            client
                .push_blob(&tagged, blob.data.clone(), &blob.digest)
                .await
                .with_context(|| format!("uploading blob {} ({})", blob.digest, blob.media_type))?;
            uploaded += 1;
        }
    }
    for child in &image.children {
        let by_digest = Reference::with_digest(
            registry.to_string(),
            repository.clone(),
            child.digest.clone(),
        );
        push_manifest(client, &by_digest, child).await?;
    }
    push_manifest(client, &tagged, &image.manifest).await?;
    Ok(uploaded)
}

async fn push_manifest(client: &Client, reference: &Reference, manifest: &BuiltBlob) -> Result<()> {
    let content_type = manifest
        .media_type
        .parse()
        .with_context(|| format!("media type {:?} as a header", manifest.media_type))?;
    let location = client
        .push_manifest_raw(reference, manifest.data.clone(), content_type)
        .await
        .with_context(|| format!("pushing manifest {} as {reference}", manifest.digest))?;
    ensure!(
        location.ends_with(&manifest.digest),
        "the registry stored manifest {} at {location}: it computed another digest",
        manifest.digest
    );
    Ok(())
}

/// Replaces a blob's bytes in a `docker-registry` filesystem storage with same-length bytes.
fn corrupt_blob(storage: &Path, corrupt: &CorruptBlob) -> Result<()> {
    let hex = corrupt
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64)
        .with_context(|| format!("unexpected digest {}", corrupt.digest))?;
    let data = storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let meta = std::fs::metadata(&data).with_context(|| {
        format!(
            "looking for blob {} at {} (is --registry-storage the registry's rootdirectory?)",
            corrupt.digest,
            data.display()
        )
    })?;
    ensure!(
        meta.len() == corrupt.replacement.len() as u64,
        "{} has {} bytes, the replacement {}",
        data.display(),
        meta.len(),
        corrupt.replacement.len()
    );
    std::fs::write(&data, &corrupt.replacement)
        .with_context(|| format!("overwriting {}", data.display()))
}
