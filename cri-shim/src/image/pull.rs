//! The distribution client: manifests, image indexes with platform selection, and verified
//! blob downloads from one registry endpoint, through `oci-client`.
//!
//! `oci-client` provides the transport (HTTP/HTTPS, CA files, insecure TLS) and authentication
//! (anonymous, basic, bearer tokens from a `WWW-Authenticate` challenge). The bytes of every
//! manifest and blob are hashed here as they arrive and checked against the digest that names
//! them before anything is parsed or stored; a download that receives nothing for the stall
//! timeout fails with [`ImageError::Stalled`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;

use super::content::{BlobWriter, Digest};
use super::reference::ImageRef;
use super::registry::Endpoint;
use super::{ImageError, Result};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

const ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// Digest (validated with [`Digest::parse`] before use).
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Platform (index entries).
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The validated digest.
    pub fn digest(&self) -> Result<Digest> {
        Digest::parse(&self.digest)
    }

    /// The size, refusing negative values.
    pub fn size(&self) -> Result<u64> {
        u64::try_from(self.size).map_err(|_| ImageError::InvalidDigest {
            digest: self.digest.clone(),
            reason: format!("negative size {}", self.size),
        })
    }
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    #[serde(default)]
    pub os: String,
    /// `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// `v8`.
    #[serde(default)]
    pub variant: Option<String>,
}

/// A manifest or index (the fields used).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    #[serde(default)]
    pub schema_version: i64,
    /// Media type, when given in the document.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Image manifests: the config.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Image manifests: the layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Indexes: the manifests.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

/// This machine's platform as OCI names it: (`linux`, `amd64`, variant).
pub fn host_platform() -> Platform {
    let (arch, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        other => (other, None),
    };
    Platform {
        os: "linux".into(),
        architecture: arch.into(),
        variant: variant.map(String::from),
    }
}

/// Picks the manifest for `want` from an index: same OS and architecture; among those, the
/// same variant first, then one without a variant (arm64 without a variant is v8).
pub fn select_platform<'a>(entries: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    let norm = |p: &Platform| -> Option<String> {
        match (p.architecture.as_str(), p.variant.as_deref()) {
            (_, Some("")) | (_, None) if p.architecture == "arm64" => Some("v8".into()),
            (_, Some("")) | (_, None) => None,
            (_, Some(v)) => Some(v.to_string()),
        }
    };
    let want_variant = norm(want);
    let candidates = entries.iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
    });
    let mut fallback = None;
    for d in candidates {
        let v = d.platform.as_ref().and_then(norm);
        if v == want_variant {
            return Some(d);
        }
        if v.is_none() && fallback.is_none() {
            fallback = Some(d);
        }
    }
    fallback
}

/// The resolved manifest of an image for this platform.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The index it came through: its digest and bytes.
    pub index: Option<(Digest, Vec<u8>)>,
    /// The image manifest's digest and bytes.
    pub manifest: (Digest, Vec<u8>),
    /// The parsed manifest.
    pub parsed: Manifest,
}

/// Pulls from one endpoint.
pub struct Fetcher {
    /// The reference being pulled.
    pub reference: ImageRef,
    /// The endpoint.
    pub endpoint: Endpoint,
    client: oci_client::Client,
    auth: oci_client::secrets::RegistryAuth,
    stall: Duration,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("reference", &self.reference)
            .field("endpoint", &self.endpoint.host)
            .finish()
    }
}

/// Installs rustls' ring provider once (ignoring an already installed one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Fetcher {
    /// A client for `endpoint` (one per pull: `oci-client` keeps one set of credentials per
    /// registry per client).
    pub fn new(reference: &ImageRef, endpoint: Endpoint, stall: Duration) -> Result<Fetcher> {
        install_crypto_provider();
        use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
        let config = ClientConfig {
            protocol: if endpoint.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: endpoint.skip_verify,
            extra_root_certificates: endpoint
                .ca_pem
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            // Longer than the stall timeout, so that ours (with its clearer error) fires first.
            read_timeout: Some(stall * 2),
            connect_timeout: Some(Duration::from_secs(10).min(stall)),
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config).map_err(|e| ImageError::Registry {
            reference: reference.to_string(),
            host: endpoint.host.clone(),
            message: format!("creating the HTTP client: {e}"),
        })?;
        Ok(Fetcher {
            reference: reference.clone(),
            auth: endpoint.credentials.to_registry_auth(),
            endpoint,
            client,
            stall,
        })
    }

    fn map_err(&self, e: oci_client::errors::OciDistributionError) -> ImageError {
        use oci_client::errors::{OciDistributionError as E, OciErrorCode};
        let reference = self.reference.to_string();
        let host = self.endpoint.host.clone();
        match e {
            E::AuthenticationFailure(m) => ImageError::Unauthorized {
                reference,
                host,
                message: m,
            },
            E::UnauthorizedError { url } => ImageError::Unauthorized {
                reference,
                host,
                message: format!("{url}: 401 Unauthorized"),
            },
            E::RegistryError { envelope, url }
                if envelope.errors.iter().any(|e| {
                    matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)
                }) =>
            {
                ImageError::Unauthorized {
                    reference,
                    host,
                    message: format!("{url}: {envelope}"),
                }
            }
            E::RegistryError { envelope, url }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) =>
            {
                ImageError::NotFound(format!("{reference} ({url}: {envelope})"))
            }
            E::ImageManifestNotFoundError(m) => {
                ImageError::NotFound(format!("{reference} on {host} ({m})"))
            }
            E::DigestError(d) => ImageError::DigestMismatch {
                what: format!("{reference} from {host}"),
                expected: String::new(),
                actual: d.to_string(),
            },
            other => ImageError::Registry {
                reference,
                host,
                message: error_chain(&other),
            },
        }
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, oci_client::errors::OciDistributionError>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.stall, fut).await {
            Ok(r) => r.map_err(|e| self.map_err(e)),
            Err(_) => Err(ImageError::Stalled {
                what: format!("{what} from {}", self.endpoint.host),
                seconds: self.stall.as_secs(),
            }),
        }
    }

    /// Fetches a manifest (by the reference's tag or digest, or by `digest`), verifying its
    /// digest.
    pub async fn manifest(&self, digest: Option<&Digest>) -> Result<(Digest, Vec<u8>, Manifest)> {
        let oref = self.reference.on_host(&self.endpoint.host, digest);
        let (bytes, _) = self
            .timed(
                "manifest",
                self.client.pull_manifest_raw(&oref, &self.auth, ACCEPT),
            )
            .await?;
        let actual = Digest::of(&bytes);
        if let Some(want) = digest.or(self.reference.digest())
            && &actual != want
        {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {}", self.reference),
                expected: want.to_string(),
                actual: actual.to_string(),
            });
        }
        let parsed: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::BadManifest {
                reference: self.reference.to_string(),
                reason: format!("malformed manifest {actual}: {e}"),
            })?;
        if parsed.schema_version != 2 {
            return Err(ImageError::BadManifest {
                reference: self.reference.to_string(),
                reason: format!(
                    "unsupported manifest schema version {} (only schema 2 / OCI)",
                    parsed.schema_version
                ),
            });
        }
        Ok((actual, bytes.to_vec(), parsed))
    }

    /// Resolves the reference to this platform's image manifest.
    pub async fn resolve(&self) -> Result<Resolved> {
        let bad = |reason: String| ImageError::BadManifest {
            reference: self.reference.to_string(),
            reason,
        };
        let (digest, bytes, parsed) = self.manifest(None).await?;
        let is_index = parsed.manifests.is_some()
            || matches!(parsed.media_type.as_deref(), Some(OCI_INDEX | DOCKER_LIST));
        let resolved = if is_index {
            let entries = parsed.manifests.clone().unwrap_or_default();
            let want = host_platform();
            let entry =
                select_platform(&entries, &want).ok_or_else(|| ImageError::NoMatchingPlatform {
                    reference: self.reference.to_string(),
                    platform: format!(
                        "{}/{}{}",
                        want.os,
                        want.architecture,
                        want.variant
                            .as_deref()
                            .map(|v| format!("/{v}"))
                            .unwrap_or_default()
                    ),
                })?;
            let child = entry.digest()?;
            let (cd, cbytes, cparsed) = self.manifest(Some(&child)).await?;
            if cbytes.len() as u64 != entry.size()? {
                return Err(ImageError::SizeMismatch {
                    what: format!("manifest {child} of {}", self.reference),
                    expected: entry.size()?,
                    actual: cbytes.len() as u64,
                });
            }
            if cparsed.manifests.is_some() {
                return Err(bad("an image index inside an image index".into()));
            }
            Resolved {
                index: Some((digest, bytes)),
                manifest: (cd, cbytes),
                parsed: cparsed,
            }
        } else {
            Resolved {
                index: None,
                manifest: (digest, bytes),
                parsed,
            }
        };
        let config = resolved
            .parsed
            .config
            .as_ref()
            .ok_or_else(|| bad("manifest has no config".into()))?;
        config.digest()?;
        for l in &resolved.parsed.layers {
            l.digest()?;
            l.size()?;
            if !LAYER_TYPES.contains(&l.media_type.as_str()) {
                return Err(bad(format!(
                    "layer {} has unsupported media type {:?}",
                    l.digest, l.media_type
                )));
            }
        }
        Ok(resolved)
    }

    /// Streams a blob into `writer`, verifying it ([`BlobWriter::commit`] checks digest and
    /// size), counting bytes into `progress`; fails after the stall timeout without data.
    pub async fn blob(
        &self,
        digest: &Digest,
        mut writer: BlobWriter,
        progress: &AtomicU64,
    ) -> Result<()> {
        let oref = self.reference.on_host(&self.endpoint.host, None);
        let what = format!("blob {digest}");
        let sized = self
            .timed(&what, self.client.pull_blob_stream(&oref, digest.as_str()))
            .await?;
        let mut stream = sized.stream;
        // Writes happen on the blocking pool in batches, so the runtime threads only move
        // bytes and hash them.
        let mut pending: Vec<bytes::Bytes> = Vec::new();
        let mut pending_len = 0usize;
        loop {
            let next = tokio::time::timeout(self.stall, stream.next()).await;
            let chunk = match next {
                Err(_) => {
                    return Err(ImageError::Stalled {
                        what: format!("{what} from {}", self.endpoint.host),
                        seconds: self.stall.as_secs(),
                    });
                }
                Ok(None) => None,
                Ok(Some(Err(e))) => {
                    // oci-client's own verification reports a mismatch as an I/O error at
                    // the end; ours (in commit) names the digests, so only transport errors
                    // are reported here.
                    if e.to_string().to_lowercase().contains("digest") {
                        None
                    } else {
                        return Err(ImageError::Registry {
                            reference: self.reference.to_string(),
                            host: self.endpoint.host.clone(),
                            message: format!("downloading {what}: {}", error_chain(&e)),
                        });
                    }
                }
                Ok(Some(Ok(b))) => Some(b),
            };
            let end = chunk.is_none();
            if let Some(b) = chunk {
                progress.fetch_add(b.len() as u64, Ordering::Relaxed);
                pending_len += b.len();
                pending.push(b);
            }
            if pending_len >= 1024 * 1024 || (end && !pending.is_empty()) {
                let batch = std::mem::take(&mut pending);
                pending_len = 0;
                writer = tokio::task::spawn_blocking(move || -> Result<BlobWriter> {
                    for b in &batch {
                        writer.write(b)?;
                    }
                    Ok(writer)
                })
                .await
                .map_err(|e| ImageError::io("blob writer task", std::io::Error::other(e)))??;
            }
            if end {
                break;
            }
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| ImageError::io("blob writer task", std::io::Error::other(e)))?
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Shared progress counters of one pull.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes downloaded.
    pub bytes: AtomicU64,
    /// Layers downloaded and unpacked.
    pub layers_done: AtomicU64,
}

/// Logs progress every `every` until dropped.
pub(crate) fn progress_logger(
    reference: String,
    layers: u64,
    total: u64,
    p: Arc<Progress>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let bytes = p.bytes.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                image = %reference,
                layers_done = p.layers_done.load(Ordering::Relaxed),
                layers,
                bytes,
                total_bytes = total,
                rate_kib_s = (bytes as f64 / 1024.0 / secs) as u64,
                "pull in progress"
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, d: char) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", d.to_string().repeat(64)),
            size: 1,
            platform: Some(Platform {
                os: "linux".into(),
                architecture: arch.into(),
                variant: variant.map(String::from),
            }),
        }
    }

    #[test]
    fn platform_selection_is_variant_aware() {
        let idx = vec![
            entry("arm", Some("v6"), 'a'),
            entry("arm", Some("v7"), 'b'),
            entry("arm64", None, 'c'),
            entry("amd64", None, 'd'),
        ];
        let pick = |arch: &str, v: Option<&str>| {
            select_platform(
                &idx,
                &Platform {
                    os: "linux".into(),
                    architecture: arch.into(),
                    variant: v.map(String::from),
                },
            )
            .map(|d| d.digest.chars().last().unwrap_or(' '))
        };
        assert_eq!(pick("arm", Some("v7")), Some('b'));
        assert_eq!(pick("arm64", Some("v8")), Some('c'));
        assert_eq!(pick("amd64", None), Some('d'));
        assert_eq!(pick("arm", Some("v5")), None);
        assert_eq!(pick("s390x", None), None);
    }
}
