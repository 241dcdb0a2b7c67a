//! [`ImageStore`]: pull, list, inspect, remove and garbage-collect images, and prepare container
//! root filesystems from them.
//!
//! Concurrency: a blob download and a snapshot unpack run at most once at a time per digest
//! (an in-flight map of shared futures, each running on its own task so that a cancelled pull
//! does not cancel what another pull waits for); layer downloads run in parallel, bounded across
//! all pulls by [`StoreOptions::max_concurrent_downloads`]; layers are unpacked in order as
//! their downloads complete.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Semaphore;

use super::content::{ContentStore, Digest};
use super::metadata::{ContainerRecord, ImageRecord, LayerRecord, Metadata, valid_container_id};
use super::pull::{Fetcher, Progress, Resolved, progress_logger};
use super::reference::ImageRef;
use super::registry::{Credentials, RegistryConfig};
use super::snapshot::{MountSpec, Snapshots, chain_ids};
use super::unpack::{UnpackOptions, unpack_layer};
use super::{ImageError, Result};

/// Options of an [`ImageStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The root directory (`/var/lib/deckhand`).
    pub root: PathBuf,
    /// Registry configuration.
    pub registry: RegistryConfig,
    /// Layer downloads in parallel, across all pulls.
    pub max_concurrent_downloads: usize,
    /// A download receiving nothing for this long fails.
    pub stall_timeout: Duration,
    /// How often a running pull logs its progress.
    pub progress_interval: Duration,
    /// Unpacking policy.
    pub unpack: UnpackOptions,
}

impl StoreOptions {
    /// Defaults for `root`: 3 parallel downloads, 60 s stall timeout, progress every 5 s,
    /// no device nodes.
    pub fn new(root: impl Into<PathBuf>) -> StoreOptions {
        StoreOptions {
            root: root.into(),
            registry: RegistryConfig::default(),
            max_concurrent_downloads: 3,
            stall_timeout: Duration::from_secs(60),
            progress_interval: Duration::from_secs(5),
            unpack: UnpackOptions::default(),
        }
    }
}

/// An image as the CRI sees it.
#[derive(Debug, Clone)]
pub struct Image {
    /// The record.
    pub record: ImageRecord,
    /// `registry/repo:tag` names.
    pub repo_tags: Vec<String>,
    /// `registry/repo@sha256:...` names.
    pub repo_digests: Vec<String>,
    /// The image config (JSON).
    pub config: serde_json::Value,
}

impl Image {
    /// The id (`sha256:...` of the config).
    pub fn id(&self) -> &Digest {
        &self.record.id
    }

    /// `config.User` of the image config.
    pub fn user(&self) -> Option<&str> {
        self.config
            .get("config")
            .and_then(|c| c.get("User"))
            .and_then(|u| u.as_str())
            .filter(|u| !u.is_empty())
    }
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Image records nothing named or used.
    pub images: usize,
    /// Blobs removed.
    pub blobs: usize,
    /// Snapshots removed.
    pub snapshots: usize,
    /// Bytes of blobs removed.
    pub blob_bytes: u64,
}

/// Disk usage of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes (allocated blocks) of blobs and snapshots.
    pub bytes: u64,
    /// Inodes of blobs and snapshots.
    pub inodes: u64,
}

type Flight = Shared<BoxFuture<'static, Result<(), Arc<ImageError>>>>;
type SharedResult = Flight;

/// The image store.
#[derive(Debug)]
pub struct ImageStore {
    opts: StoreOptions,
    content: ContentStore,
    snapshots: Snapshots,
    meta: Mutex<Metadata>,
    flights: Mutex<HashMap<String, Flight>>,
    /// Blobs and snapshots that pulls in progress hold (not yet referenced by a record):
    /// [`ImageStore::gc`] leaves them alone.
    pins: Mutex<HashMap<Digest, usize>>,
    downloads: Arc<Semaphore>,
}

/// Pins digests for the lifetime of a pull.
struct PinGuard<'a> {
    store: &'a ImageStore,
    digests: Vec<Digest>,
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        let mut pins = self.store.pins.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(n) = pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(d);
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ImageStore {
    /// Opens (creating) the store under `opts.root`, cleaning what a crash left half-done.
    pub fn open(opts: StoreOptions) -> Result<Arc<ImageStore>> {
        std::fs::create_dir_all(&opts.root)
            .map_err(|e| ImageError::io(format!("creating {}", opts.root.display()), e))?;
        let content = ContentStore::open(&opts.root)?;
        let snapshots = Snapshots::open(&opts.root)?;
        let meta = Metadata::open(&opts.root)?;
        tracing::info!(
            root = %opts.root.display(),
            images = meta.images.len(),
            names = meta.names.len(),
            containers = meta.containers.len(),
            "image store opened"
        );
        Ok(Arc::new(ImageStore {
            downloads: Arc::new(Semaphore::new(opts.max_concurrent_downloads.max(1))),
            opts,
            content,
            snapshots,
            meta: Mutex::new(meta),
            flights: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
        }))
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.opts.root
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The snapshots.
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    fn meta(&self) -> MutexGuard<'_, Metadata> {
        // A panic while holding the lock leaves the in-memory maps as consistent as the files
        // (every change writes the file first), so a poisoned lock is still usable.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin(&self, digests: Vec<Digest>) -> PinGuard<'_> {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        for d in &digests {
            *pins.entry(d.clone()).or_insert(0) += 1;
        }
        PinGuard {
            store: self,
            digests,
        }
    }

    fn flights(&self) -> MutexGuard<'_, HashMap<String, Flight>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `fut` once per `key` at a time: a caller arriving while it runs waits for the same
    /// result. The work runs on its own task.
    async fn once(
        self: &Arc<Self>,
        key: String,
        fut: impl Future<Output = Result<()>> + Send + 'static,
    ) -> Result<()> {
        let flight = {
            let mut map = self.flights();
            match map.get(&key) {
                Some(f) => {
                    tracing::debug!(%key, "joining an operation in flight");
                    f.clone()
                }
                None => {
                    let store = Arc::clone(self);
                    let k = key.clone();
                    let handle = tokio::spawn(async move {
                        let r = fut.await;
                        store.flights().remove(&k);
                        r
                    });
                    let f: Flight = async move {
                        match handle.await {
                            Ok(r) => r.map_err(Arc::new),
                            Err(e) => Err(Arc::new(ImageError::io(
                                "background task",
                                std::io::Error::other(e.to_string()),
                            ))),
                        }
                    }
                    .boxed()
                    .shared();
                    map.insert(key, f.clone());
                    f
                }
            }
        };
        flight.await.map_err(ImageError::Shared)
    }

    /// Downloads a blob unless present (once across concurrent pulls).
    async fn fetch_blob(
        self: &Arc<Self>,
        fetcher: &Arc<Fetcher>,
        digest: &Digest,
        size: u64,
        what: String,
        progress: Arc<Progress>,
    ) -> Result<()> {
        if self.content.contains(digest) {
            progress.bytes.fetch_add(size, Ordering::Relaxed);
            return Ok(());
        }
        let store = Arc::clone(self);
        let f = Arc::clone(fetcher);
        let d = digest.clone();
        self.once(format!("blob:{digest}"), async move {
            if store.content.contains(&d) {
                return Ok(());
            }
            let _permit = store
                .downloads
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| ImageError::io("download slots", std::io::Error::other(e)))?;
            let start = std::time::Instant::now();
            let writer = store.content.writer(&d, Some(size), &what)?;
            f.blob(&d, writer, &progress.bytes).await?;
            tracing::debug!(blob = %d, size, ms = start.elapsed().as_millis() as u64, "blob downloaded");
            Ok(())
        })
        .await
    }

    /// Unpacks a layer into its snapshot unless present (once across concurrent pulls).
    /// `lower_done` complete when the layers below are unpacked; the unpack waits for them only
    /// if it needs to look at them.
    async fn unpack(
        self: &Arc<Self>,
        layer: &LayerRecord,
        lowers: Vec<Digest>,
        lower_done: Vec<SharedResult>,
    ) -> Result<()> {
        if self.snapshots.exists(&layer.chain_id) {
            return Ok(());
        }
        let store = Arc::clone(self);
        let l = layer.clone();
        let rt = tokio::runtime::Handle::current();
        self.once(format!("snapshot:{}", layer.chain_id), async move {
            tokio::task::spawn_blocking(move || -> Result<()> {
                let layer_name = l.digest.to_string();
                let mut wait_lowers = move || -> Result<()> {
                    for r in rt.block_on(futures::future::join_all(lower_done.clone())) {
                        r.map_err(|e| ImageError::BadLayer {
                            layer: layer_name.clone(),
                            reason: format!("a lower layer failed: {e}"),
                        })?;
                    }
                    Ok(())
                };
                if store.snapshots.exists(&l.chain_id) {
                    return Ok(());
                }
                let start = std::time::Instant::now();
                let tmp = store.snapshots.temp_dir(&l.chain_id)?;
                let lower_dirs: Vec<PathBuf> = lowers
                    .iter()
                    .rev()
                    .map(|c| store.snapshots.path(c))
                    .collect();
                let stats = match unpack_layer(
                    &store.content.path(&l.digest),
                    &l.digest,
                    &l.diff_id,
                    &tmp.path,
                    &lower_dirs,
                    &mut wait_lowers,
                    store.opts.unpack,
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        // A layer that cannot be unpacked leaves nothing behind: its temporary
                        // snapshot goes with `tmp`, its blob unless an image uses it.
                        let referenced = store
                            .meta()
                            .images
                            .values()
                            .any(|i| i.layers.iter().any(|x| x.digest == l.digest));
                        if !referenced {
                            let _ = store.content.delete(&l.digest);
                        }
                        return Err(e);
                    }
                };
                tmp.commit()?;
                tracing::debug!(
                    layer = %l.digest,
                    chain_id = %l.chain_id,
                    entries = stats.entries,
                    tar_bytes = stats.tar_bytes,
                    ms = start.elapsed().as_millis() as u64,
                    "layer unpacked"
                );
                Ok(())
            })
            .await
            .map_err(|e| ImageError::io("unpack task", std::io::Error::other(e)))?
        })
        .await
    }

    /// Pulls `reference` (with optional per-request credentials and the server they are for),
    /// unpacks it and records it. Returns the image.
    pub async fn pull(
        self: &Arc<Self>,
        reference: &str,
        credentials: Option<(&Credentials, &str)>,
    ) -> Result<Image> {
        let r = ImageRef::parse(reference)?;
        let endpoints = self.opts.registry.endpoints(r.registry(), credentials)?;
        let mut last: Option<ImageError> = None;
        for ep in endpoints {
            let host = ep.host.clone();
            let fetcher = Arc::new(Fetcher::new(&r, ep, self.opts.stall_timeout)?);
            match fetcher.resolve().await {
                Ok(resolved) => {
                    tracing::info!(image = %r, endpoint = %host, manifest = %resolved.manifest.0, "resolved");
                    return self.pull_resolved(&r, fetcher, resolved).await;
                }
                Err(e) => {
                    tracing::warn!(image = %r, endpoint = %host, error = %e, "endpoint failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ImageError::NotFound(r.to_string())))
    }

    async fn pull_resolved(
        self: &Arc<Self>,
        r: &ImageRef,
        fetcher: Arc<Fetcher>,
        resolved: Resolved,
    ) -> Result<Image> {
        let start = std::time::Instant::now();
        let bad = |reason: String| ImageError::BadManifest {
            reference: r.to_string(),
            reason,
        };
        let progress = Arc::new(Progress::default());
        let m = &resolved.parsed;
        let config_desc = m.config.as_ref().ok_or_else(|| bad("no config".into()))?;
        let config_digest = config_desc.digest()?;
        let config_size = config_desc.size()?;
        let mut pinned = vec![config_digest.clone(), resolved.manifest.0.clone()];
        pinned.extend(resolved.index.iter().map(|(d, _)| d.clone()));
        for l in &m.layers {
            pinned.push(l.digest()?);
        }
        let _blob_pins = self.pin(pinned);

        // Start every layer download now (bounded by the download slots); fetch the config.
        let mut downloads = Vec::new();
        let mut total = 0u64;
        for l in &m.layers {
            let (d, size) = (l.digest()?, l.size()?);
            total += size;
            let store = Arc::clone(self);
            let f = Arc::clone(&fetcher);
            let p = Arc::clone(&progress);
            downloads.push(tokio::spawn(async move {
                store
                    .fetch_blob(&f, &d, size, format!("layer {d}"), p)
                    .await
            }));
        }
        let aborts: Vec<tokio::task::AbortHandle> =
            downloads.iter().map(|d| d.abort_handle()).collect();
        let _logger = AbortOnDrop(progress_logger(
            r.to_string(),
            m.layers.len() as u64,
            total,
            Arc::clone(&progress),
            self.opts.progress_interval,
        ));
        let result = async {
            self.fetch_blob(
                &fetcher,
                &config_digest,
                config_size,
                format!("config {config_digest}"),
                Arc::new(Progress::default()),
            )
            .await?;
            let config_bytes = self.content.read(&config_digest)?;
            let config: serde_json::Value = serde_json::from_slice(&config_bytes)
                .map_err(|e| bad(format!("malformed image config: {e}")))?;
            let diff_ids: Vec<Digest> = config
                .pointer("/rootfs/diff_ids")
                .and_then(|v| v.as_array())
                .ok_or_else(|| bad("image config has no rootfs.diff_ids".into()))?
                .iter()
                .map(|v| Digest::parse(v.as_str().unwrap_or("")))
                .collect::<Result<_>>()?;
            if diff_ids.len() != m.layers.len() {
                return Err(bad(format!(
                    "{} layers but {} diff_ids in the config",
                    m.layers.len(),
                    diff_ids.len()
                )));
            }
            let chains = chain_ids(&diff_ids);
            let _snapshot_pins = self.pin(chains.clone());
            let mut layers = Vec::new();
            for (i, l) in m.layers.iter().enumerate() {
                layers.push(LayerRecord {
                    digest: l.digest()?,
                    media_type: l.media_type.clone(),
                    size: l.size()?,
                    diff_id: diff_ids[i].clone(),
                    chain_id: chains[i].clone(),
                });
            }
            // Unpack each layer as soon as its download completes, in parallel: a layer waits
            // for the ones below only when it needs to look at them.
            let mut unpacks: Vec<SharedResult> = Vec::new();
            for (i, handle) in std::mem::take(&mut downloads).into_iter().enumerate() {
                let store = Arc::clone(self);
                let layer = layers[i].clone();
                let lowers = chains[..i].to_vec();
                let below = unpacks.clone();
                let p = Arc::clone(&progress);
                let f: SharedResult = async move {
                    handle
                        .await
                        .map_err(|e| ImageError::io("download task", std::io::Error::other(e)))
                        .and_then(|r| r)
                        .map_err(Arc::new)?;
                    store
                        .unpack(&layer, lowers, below)
                        .await
                        .map_err(Arc::new)?;
                    p.layers_done.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                .boxed()
                .shared();
                unpacks.push(f);
            }
            for r in futures::future::join_all(unpacks).await {
                r.map_err(ImageError::Shared)?;
            }
            // Manifests last: their presence is not needed by anything above.
            let (md, mbytes) = &resolved.manifest;
            self.content.put(md, mbytes, &format!("manifest {md}"))?;
            if let Some((id, ibytes)) = &resolved.index {
                self.content.put(id, ibytes, &format!("index {id}"))?;
            }
            let record = ImageRecord {
                id: config_digest.clone(),
                manifest_digest: md.clone(),
                index_digest: resolved.index.as_ref().map(|(d, _)| d.clone()),
                config_size,
                size: config_size + layers.iter().map(|l| l.size).sum::<u64>(),
                layers,
                created: now_secs(),
            };
            let image = {
                let mut meta = self.meta();
                let created = meta
                    .images
                    .get(&record.id)
                    .map(|old| old.created)
                    .unwrap_or(record.created);
                meta.put_image(ImageRecord {
                    created,
                    ..record.clone()
                })?;
                meta.put_name(&r.digest_name(record.repo_digest()), &record.id)?;
                if let Some(tagged) = r.tagged_name() {
                    meta.put_name(&tagged, &record.id)?;
                }
                self.image_locked(&meta, &record.id, Some(config))?
            };
            Ok(image)
        }
        .await;
        // A failed pull must not leave its downloads running unobserved.
        for d in aborts {
            d.abort();
        }
        match &result {
            Ok(img) => tracing::info!(
                image = %r,
                id = %img.id(),
                layers = m.layers.len(),
                bytes = total,
                ms = start.elapsed().as_millis() as u64,
                "pulled"
            ),
            Err(e) => tracing::warn!(image = %r, error = %e, "pull failed"),
        }
        result
    }

    fn image_locked(
        &self,
        meta: &Metadata,
        id: &Digest,
        config: Option<serde_json::Value>,
    ) -> Result<Image> {
        let record = meta
            .images
            .get(id)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(format!("image {id}")))?;
        let config = match config {
            Some(c) => c,
            None => {
                let bytes = self.content.read(id)?;
                serde_json::from_slice(&bytes).map_err(|e| ImageError::BadManifest {
                    reference: id.to_string(),
                    reason: format!("malformed stored config: {e}"),
                })?
            }
        };
        let mut repo_tags = Vec::new();
        let mut repo_digests = Vec::new();
        for n in meta.names_of(id) {
            if n.contains('@') {
                repo_digests.push(n);
            } else {
                repo_tags.push(n);
            }
        }
        Ok(Image {
            record,
            repo_tags,
            repo_digests,
            config,
        })
    }

    /// Resolves an image id (`sha256:...` or its hex), repo tag or repo digest to an image id.
    pub fn resolve(&self, spec: &str) -> Option<Digest> {
        let meta = self.meta();
        Self::resolve_locked(&meta, spec)
    }

    fn resolve_locked(meta: &Metadata, spec: &str) -> Option<Digest> {
        let as_id = if spec.starts_with("sha256:") {
            Digest::parse(spec).ok()
        } else {
            Digest::parse(&format!("sha256:{spec}")).ok()
        };
        if let Some(id) = as_id
            && meta.images.contains_key(&id)
        {
            return Some(id);
        }
        let r = ImageRef::parse(spec).ok()?;
        meta.names.get(&r.lookup_name()).cloned()
    }

    /// The image named by `spec` (id, repo tag or repo digest), if present.
    pub fn get(&self, spec: &str) -> Result<Option<Image>> {
        let meta = self.meta();
        match Self::resolve_locked(&meta, spec) {
            Some(id) => self.image_locked(&meta, &id, None).map(Some),
            None => Ok(None),
        }
    }

    /// Every image that has a name.
    pub fn list(&self) -> Result<Vec<Image>> {
        let meta = self.meta();
        let ids: BTreeSet<Digest> = meta.names.values().cloned().collect();
        ids.iter()
            .filter(|id| meta.images.contains_key(*id))
            .map(|id| self.image_locked(&meta, id, None))
            .collect()
    }

    /// Removes the image named by `spec` (all its names and its record); its blobs and
    /// snapshots go at the next [`ImageStore::gc`]. Refused while a container uses it.
    /// Returns the removed id, or `None` when there was no such image.
    pub fn remove(&self, spec: &str) -> Result<Option<Digest>> {
        let mut meta = self.meta();
        let Some(id) = Self::resolve_locked(&meta, spec) else {
            return Ok(None);
        };
        let users: Vec<String> = meta
            .containers
            .values()
            .filter(|c| c.image == id)
            .map(|c| c.id.clone())
            .collect();
        if !users.is_empty() {
            return Err(ImageError::InUse {
                image: id.to_string(),
                containers: users.join(", "),
            });
        }
        for n in meta.names_of(&id) {
            meta.delete_name(&n)?;
        }
        meta.delete_image(&id)?;
        tracing::info!(image = %id, "image removed");
        Ok(Some(id))
    }

    /// Deletes image records without names or users, then every blob and snapshot that no
    /// image references. Operations in flight are respected: blobs and snapshots being
    /// written are not yet visible under their names.
    pub fn gc(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut meta = self.meta();
        let named: HashSet<Digest> = meta.names.values().cloned().collect();
        let used: HashSet<Digest> = meta.containers.values().map(|c| c.image.clone()).collect();
        let orphans: Vec<Digest> = meta
            .images
            .keys()
            .filter(|id| !named.contains(*id) && !used.contains(*id))
            .cloned()
            .collect();
        for id in orphans {
            meta.delete_image(&id)?;
            report.images += 1;
        }
        let mut blobs = HashSet::new();
        let mut snaps = HashSet::new();
        for img in meta.images.values() {
            blobs.insert(img.id.clone());
            blobs.insert(img.manifest_digest.clone());
            if let Some(i) = &img.index_digest {
                blobs.insert(i.clone());
            }
            for l in &img.layers {
                blobs.insert(l.digest.clone());
                snaps.insert(l.chain_id.clone());
            }
        }
        // Pulls in progress hold their blobs and snapshots through pins and flight keys.
        let in_flight: HashSet<String> = self.flights().keys().cloned().collect();
        // Held to the end: a pull starting meanwhile pins (and then checks for) its blobs only
        // after this collection is done.
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        for d in self.content.list()? {
            if !blobs.contains(&d)
                && !pins.contains_key(&d)
                && !in_flight.contains(&format!("blob:{d}"))
            {
                report.blob_bytes += self.content.delete(&d)?;
                report.blobs += 1;
            }
        }
        for c in self.snapshots.list()? {
            if !snaps.contains(&c)
                && !pins.contains_key(&c)
                && !in_flight.contains(&format!("snapshot:{c}"))
            {
                self.snapshots.remove(&c)?;
                report.snapshots += 1;
            }
        }
        tracing::info!(?report, "garbage collected");
        Ok(report)
    }

    /// Bytes and inodes used by blobs and snapshots (hard links counted once).
    pub fn usage(&self) -> Result<Usage> {
        use std::os::unix::fs::MetadataExt;
        let mut usage = Usage::default();
        let mut seen = HashSet::new();
        let mut stack = vec![
            self.opts.root.join("blobs"),
            self.opts.root.join("snapshots"),
        ];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::io(format!("listing {}", dir.display()), e)),
            };
            for e in entries.flatten() {
                let Ok(md) = e.metadata() else { continue };
                if !seen.insert((md.dev(), md.ino())) {
                    continue;
                }
                usage.bytes += md.blocks() * 512;
                usage.inodes += 1;
                if md.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        Ok(usage)
    }

    fn chain_of(&self, meta: &Metadata, image: &str) -> Result<(Digest, Vec<Digest>)> {
        let id = Self::resolve_locked(meta, image)
            .ok_or_else(|| ImageError::NotFound(format!("image {image}")))?;
        let rec = meta
            .images
            .get(&id)
            .ok_or_else(|| ImageError::NotFound(format!("image {image}")))?;
        let chain: Vec<Digest> = rec.layers.iter().map(|l| l.chain_id.clone()).collect();
        if chain.is_empty() {
            return Err(ImageError::BadManifest {
                reference: image.to_string(),
                reason: "image has no layers".into(),
            });
        }
        for c in &chain {
            if !self.snapshots.exists(c) {
                return Err(ImageError::NotFound(format!(
                    "snapshot {c} of image {id} (pull the image again)"
                )));
            }
        }
        Ok((id, chain))
    }

    /// Prepares a writable rootfs for `container_id` from `image`: records the use (so the
    /// image cannot be removed), creates a fresh upper/work directory and returns the overlayfs
    /// mount spec. Mount it with [`MountSpec::mount`]; release with
    /// [`ImageStore::remove_container`].
    pub fn prepare(&self, container_id: &str, image: &str) -> Result<MountSpec> {
        self.lease(container_id, image, true)
    }

    /// A read-only view of `image` (for image volumes), recorded as a use under `lease_id`
    /// like a container; release with [`ImageStore::remove_container`].
    pub fn view(&self, lease_id: &str, image: &str) -> Result<MountSpec> {
        self.lease(lease_id, image, false)
    }

    fn lease(&self, id: &str, image: &str, writable: bool) -> Result<MountSpec> {
        if !valid_container_id(id) {
            return Err(ImageError::InvalidReference {
                reference: id.to_string(),
                reason: "container ids are [A-Za-z0-9_.-], at most 128 characters".into(),
            });
        }
        let mut meta = self.meta();
        if meta.containers.contains_key(id) {
            return Err(ImageError::ContainerExists(id.to_string()));
        }
        let (image_id, chain) = self.chain_of(&meta, image)?;
        let upper = if writable {
            Some(self.snapshots.create_container(id)?)
        } else {
            None
        };
        meta.put_container(ContainerRecord {
            id: id.to_string(),
            image: image_id,
            chain_id: chain.last().cloned(),
        })?;
        Ok(self.snapshots.spec(&chain, upper))
    }

    /// The mount spec of an already prepared container (after a restart).
    pub fn container_spec(&self, container_id: &str) -> Result<MountSpec> {
        let meta = self.meta();
        let c = meta
            .containers
            .get(container_id)
            .ok_or_else(|| ImageError::NotFound(format!("container {container_id}")))?;
        let (_, chain) = self.chain_of(&meta, c.image.as_str())?;
        let d = self.snapshots.container_dir(container_id);
        let upper = d.join("upper");
        let upper = upper.is_dir().then(|| (upper, d.join("work")));
        Ok(self.snapshots.spec(&chain, upper))
    }

    /// Forgets a container (or view): removes its upper/work directories and its use of the
    /// image. The caller unmounts its rootfs first. Unknown ids are not an error.
    pub fn remove_container(&self, container_id: &str) -> Result<()> {
        if !valid_container_id(container_id) {
            return Ok(());
        }
        let mut meta = self.meta();
        self.snapshots.remove_container(container_id)?;
        meta.delete_container(container_id)
    }

    /// Total size in bytes of what the store holds for `progress`-style reporting.
    pub fn blob_bytes(&self) -> u64 {
        self.content
            .list()
            .unwrap_or_default()
            .iter()
            .filter_map(|d| self.content.size(d))
            .sum()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
