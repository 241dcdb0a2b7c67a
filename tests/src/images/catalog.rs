//! The catalog's images: their layer descriptions, configs and manifests, built in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use super::layer::{Compression, LayerEntry, LayerSpec, expected_tree, sha256_digest, sha256_hex};
use super::*;

/// The `created` time of every image config.
const CREATED: &str = "1970-01-01T00:00:00Z";

/// PATH of every image.
const PATH_ENV: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

/// Content of `/www/index.html` in `dh/httpd:latest`.
pub const HTTPD_INDEX_HTML: &str = "deckhand test page\n";

/// Inputs of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The static busybox binary to put in the images (`/bin/busybox`); it is also run with
    /// `--list` to get the applets.
    pub busybox: PathBuf,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            busybox: PathBuf::from("/bin/busybox"),
        }
    }
}

/// A blob (manifest, config or layer) ready to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltBlob {
    /// `sha256:<hex>` of `data`.
    pub digest: String,
    /// Media type it is referenced with.
    pub media_type: String,
    /// The bytes.
    pub data: Vec<u8>,
}

impl BuiltBlob {
    fn new(media_type: &str, data: Vec<u8>) -> Self {
        Self {
            digest: sha256_digest(&data),
            media_type: media_type.to_string(),
            data,
        }
    }
}

/// Bytes that replace a pushed blob in the registry's storage (same length, other digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlob {
    /// Digest of the blob as pushed (and referenced by the manifest).
    pub digest: String,
    /// What the registry will serve instead.
    pub replacement: Vec<u8>,
}

/// One reference of the catalog, built.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltImage {
    /// The manifest (or image index) pushed under the tag.
    pub manifest: BuiltBlob,
    /// Config and layer blobs to push first (for an index: those of every child).
    pub blobs: Vec<BuiltBlob>,
    /// For an index: the child manifests, pushed by digest before the index.
    pub children: Vec<BuiltBlob>,
    /// What goes into the JSON index (without push results).
    pub record: ImageRecord,
    /// For `dh/hostile:badlayer`: the blob to overwrite in the registry's storage.
    pub corrupt: Option<CorruptBlob>,
}

/// Every image of [`CATALOG`], built.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    /// SHA-256 (hex) of the busybox binary.
    pub busybox_sha256: String,
    /// The images in [`CATALOG`] order.
    pub images: Vec<BuiltImage>,
}

impl Catalog {
    /// The built image with this reference.
    pub fn get(&self, reference: &str) -> Option<&BuiltImage> {
        self.images.iter().find(|i| i.record.reference == reference)
    }
}

/// Builds every image of the catalog in memory.
pub fn build_catalog(opts: &BuildOptions) -> Result<Catalog> {
    let busybox = std::fs::read(&opts.busybox)
        .with_context(|| format!("reading {}", opts.busybox.display()))?;
    let applets = busybox_applets(&opts.busybox)?;
    let base = busybox_layer(busybox.clone(), &applets);

    let mut b = Builder::default();
    let mut images = Vec::new();
    let busybox_runtime = RuntimeConfig {
        env: vec![PATH_ENV.to_string()],
        cmd: Some(vec!["sh".into()]),
        ..RuntimeConfig::default()
    };

    // dh/busybox
    let busybox_image = b.image(
        BUSYBOX,
        &ImageDef::amd64(
            busybox_runtime.clone(),
            vec![(base.clone(), Compression::Gzip)],
        ),
    )?;
    images.push(busybox_image.clone());
    images.push(b.image(
        BUSYBOX_DOCKER,
        &ImageDef {
            docker: true,
            ..ImageDef::amd64(
                busybox_runtime.clone(),
                vec![(base.clone(), Compression::Gzip)],
            )
        },
    )?);

    // dh/pause (pushed after dh/httpd, in catalog order)
    let pause_runtime = RuntimeConfig {
        cmd: Some(vec!["sleep".into(), "2147483647".into()]),
        ..busybox_runtime.clone()
    };
    let pause = ImageDef::amd64(pause_runtime, vec![(base.clone(), Compression::Gzip)]);

    // dh/httpd
    let httpd = LayerSpec::new(
        "httpd-www",
        vec![
            LayerEntry::dir("www", 0o755),
            LayerEntry::file("www/index.html", 0o644, HTTPD_INDEX_HTML),
        ],
    );
    let httpd_runtime = RuntimeConfig {
        exposed_ports: BTreeMap::from([("8080/tcp".to_string(), Empty {})]),
        cmd: Some(
            ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
                .map(String::from)
                .to_vec(),
        ),
        ..busybox_runtime.clone()
    };
    images.push(b.image(
        HTTPD,
        &ImageDef::amd64(
            httpd_runtime,
            vec![
                (base.clone(), Compression::Gzip),
                (httpd, Compression::Gzip),
            ],
        ),
    )?);
    images.push(b.image(PAUSE, &pause)?);

    // dh/config
    let config_layer = LayerSpec::new(
        "config-user",
        vec![
            LayerEntry::dir("etc", 0o755),
            LayerEntry::file("etc/group", 0o644, format!("{GROUP}dhgroup:x:1000:\n")),
            LayerEntry::file(
                "etc/passwd",
                0o644,
                format!("{PASSWD}dhuser:x:1000:1000::/home/dhuser:/bin/sh\n"),
            ),
            LayerEntry::dir("home", 0o755),
            LayerEntry::dir("home/dhuser", 0o755).owned(1000, 1000),
        ],
    );
    let config_runtime = RuntimeConfig {
        user: Some("1000:1000".into()),
        env: vec![PATH_ENV.to_string(), "DH_GREETING=hello".to_string()],
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec!["id; pwd; echo $DH_GREETING".into()]),
        working_dir: Some("/home/dhuser".into()),
        labels: BTreeMap::from([("io.deckhand.test".to_string(), "config".to_string())]),
        ..RuntimeConfig::default()
    };
    images.push(b.image(
        CONFIG,
        &ImageDef::amd64(
            config_runtime,
            vec![
                (base.clone(), Compression::Gzip),
                (config_layer, Compression::Gzip),
            ],
        ),
    )?);

    // dh/layers
    let stack = layers_stack(base.clone());
    let tree = expected_tree(&stack).context("computing the expected tree of dh/layers")?;
    for (reference, compression) in [
        (LAYERS, Compression::Gzip),
        (LAYERS_ZSTD, Compression::Zstd),
        (LAYERS_UNCOMPRESSED, Compression::None),
    ] {
        let mut image = b.image(
            reference,
            &ImageDef::amd64(
                busybox_runtime.clone(),
                stack.iter().map(|l| (l.clone(), compression)).collect(),
            ),
        )?;
        image.record.expected_tree = Some(tree.clone());
        images.push(image);
    }

    // dh/multiarch
    let arm64 = b.image(
        "dh/multiarch:arm64-child",
        &ImageDef {
            architecture: "arm64",
            variant: Some("v8"),
            ..ImageDef::amd64(
                RuntimeConfig {
                    env: vec![PATH_ENV.to_string()],
                    ..RuntimeConfig::default()
                },
                vec![(
                    LayerSpec::new(
                        "arch-arm64",
                        vec![LayerEntry::file("arch", 0o644, "arm64\n")],
                    ),
                    Compression::Gzip,
                )],
            )
        },
    )?;
    images.push(index_image(
        MULTIARCH,
        &[
            (&busybox_image, "amd64", None),
            (&arm64, "arm64", Some("v8")),
        ],
    )?);

    // dh/hostile
    for h in hostile_images() {
        let mut def = ImageDef::amd64(
            busybox_runtime.clone(),
            std::iter::once((base.clone(), Compression::Gzip))
                .chain(h.layers.iter().map(|l| (l.clone(), h.compression)))
                .collect(),
        );
        def.bad_top_diff_id = h.bad_diff_id;
        let mut image = b.image(h.reference, &def)?;
        if let Some(replacement_layer) = &h.corrupt_with {
            let top = image.blobs.last().context("hostile image without layers")?;
            let replacement = b.encode(replacement_layer, h.compression)?.0.data;
            ensure!(
                replacement.len() == top.data.len() && replacement != top.data,
                "{}: the replacement blob must have the same length and other bytes",
                h.reference
            );
            image.corrupt = Some(CorruptBlob {
                digest: top.digest.clone(),
                replacement,
            });
        }
        let description = match &image.corrupt {
            Some(c) => format!(
                "{} The registry serves other bytes of the same length for layer {}.",
                h.description, c.digest
            ),
            None => h.description.to_string(),
        };
        image.record.hostile = Some(HostileInfo {
            kind: h
                .reference
                .rsplit_once(':')
                .map_or("", |(_, t)| t)
                .to_string(),
            description,
            escape_name: h.escape_name.map(String::from),
            host_paths: h.host_paths.iter().map(|p| p.to_string()).collect(),
        });
        images.push(image);
    }

    let built: Vec<&str> = images.iter().map(|i| i.record.reference.as_str()).collect();
    let listed: Vec<&str> = CATALOG.iter().map(|(r, _)| *r).collect();
    ensure!(
        built == listed,
        "built {built:?}, but the catalog lists {listed:?}"
    );
    Ok(Catalog {
        busybox_sha256: sha256_hex(&busybox),
        images,
    })
}

/// The applets of a busybox binary, from `busybox --list` (sorted, without `busybox`).
fn busybox_applets(busybox: &std::path::Path) -> Result<Vec<String>> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    ensure!(
        out.status.success(),
        "{} --list failed: {}: {}",
        busybox.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)
        .with_context(|| format!("{} --list printed non-UTF-8", busybox.display()))?;
    let mut applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(String::from)
        .collect();
    if let Some(bad) = applets
        .iter()
        .find(|a| a.contains('/') || *a == "." || *a == "..")
    {
        bail!(
            "{} --list printed a strange applet {bad:?}",
            busybox.display()
        );
    }
    applets.sort();
    applets.dedup();
    ensure!(
        applets.iter().any(|a| a == "sh"),
        "{} has no sh applet",
        busybox.display()
    );
    Ok(applets)
}

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

/// The busybox root filesystem: one layer, entries sorted by path.
fn busybox_layer(busybox: Vec<u8>, applets: &[String]) -> LayerSpec {
    let mut entries = vec![
        LayerEntry::dir("bin", 0o755),
        LayerEntry::file("bin/busybox", 0o755, busybox),
        LayerEntry::dir("dev", 0o755),
        LayerEntry::dir("etc", 0o755),
        LayerEntry::file("etc/group", 0o644, GROUP),
        LayerEntry::file("etc/passwd", 0o644, PASSWD),
        LayerEntry::dir("proc", 0o555),
        LayerEntry::dir("root", 0o700),
        LayerEntry::dir("sys", 0o555),
        LayerEntry::dir("tmp", 0o1777),
    ];
    entries.extend(
        applets
            .iter()
            .map(|a| LayerEntry::symlink(&format!("bin/{a}"), "busybox")),
    );
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    LayerSpec::new("busybox", entries)
}

/// The layer stack of `dh/layers:*`: busybox, then setup, modify and specials.
fn layers_stack(base: LayerSpec) -> Vec<LayerSpec> {
    let setup = LayerSpec::new(
        "layers-setup",
        vec![
            LayerEntry::dir("data", 0o755),
            LayerEntry::file("data/chmod.sh", 0o644, "#!/bin/sh\necho chmod\n"),
            LayerEntry::file("data/delete-me.txt", 0o644, "delete me\n"),
            LayerEntry::dir("data/gone", 0o755),
            LayerEntry::file("data/gone/a.txt", 0o644, "a\n"),
            LayerEntry::dir("data/gone/sub", 0o755),
            LayerEntry::file("data/gone/sub/b.txt", 0o644, "b\n"),
            LayerEntry::file("data/keep.txt", 0o644, "keep\n"),
            LayerEntry::dir("data/opaque", 0o755),
            LayerEntry::file("data/opaque/old.txt", 0o644, "old\n"),
            LayerEntry::dir("data/opaque/olddir", 0o755),
            LayerEntry::file("data/opaque/olddir/x.txt", 0o644, "x\n"),
            LayerEntry::file("data/replace.txt", 0o644, "old content\n"),
        ],
    );
    let modify = LayerSpec::new(
        "layers-modify",
        vec![
            LayerEntry::dir("data", 0o755),
            LayerEntry::whiteout("data/delete-me.txt"),
            LayerEntry::whiteout("data/gone"),
            LayerEntry::file("data/chmod.sh", 0o755, "#!/bin/sh\necho chmod\n"),
            LayerEntry::dir("data/opaque", 0o755),
            LayerEntry::opaque("data/opaque"),
            LayerEntry::file("data/opaque/new.txt", 0o644, "new in opaque dir\n"),
            LayerEntry::file("data/replace.txt", 0o644, "new content\n"),
        ],
    );
    let specials = LayerSpec::new(
        "layers-specials",
        vec![
            LayerEntry::dir("data", 0o755),
            LayerEntry::fifo("data/fifo", 0o644),
            LayerEntry::dir("data/links", 0o755),
            LayerEntry::file("data/links/target.txt", 0o644, "hard link target\n"),
            LayerEntry::hardlink("data/links/hard.txt", "data/links/target.txt"),
            LayerEntry::symlink("data/links/abs", "/data/keep.txt"),
            LayerEntry::symlink("data/links/rel", "target.txt"),
            LayerEntry::symlink("data/links/up", "../keep.txt"),
            LayerEntry::dir("data/owned", 0o750).owned(1000, 1000),
            LayerEntry::file("data/owned/file.txt", 0o640, "owned by 1000:1000\n")
                .owned(1000, 1000),
            LayerEntry::file("data/xattr.txt", 0o644, "has an xattr\n").xattr("user.dh", "1"),
        ],
    );
    vec![base, setup, modify, specials]
}

struct Hostile {
    reference: &'static str,
    description: &'static str,
    layers: Vec<LayerSpec>,
    compression: Compression,
    escape_name: Option<&'static str>,
    host_paths: &'static [&'static str],
    bad_diff_id: bool,
    corrupt_with: Option<LayerSpec>,
}

impl Hostile {
    fn new(reference: &'static str, description: &'static str, layers: Vec<LayerSpec>) -> Self {
        Self {
            reference,
            description,
            layers,
            compression: Compression::Gzip,
            escape_name: None,
            host_paths: &[],
            bad_diff_id: false,
            corrupt_with: None,
        }
    }
}

/// The hostile images: busybox, then the hostile layer(s) on top.
fn hostile_images() -> Vec<Hostile> {
    let one = |name: &str, entries: Vec<LayerEntry>| vec![LayerSpec::new(name, entries)];
    vec![
        Hostile {
            escape_name: Some("dh-escape-dotdot"),
            ..Hostile::new(
                HOSTILE_DOTDOT,
                "The top layer has the entry ../../dh-escape-dotdot: unpacking must refuse it or \
                 keep it inside the rootfs; no dh-escape-dotdot may appear outside it.",
                one(
                    "hostile-dotdot",
                    vec![LayerEntry::file(
                        "../../dh-escape-dotdot",
                        0o644,
                        "escaped\n",
                    )],
                ),
            )
        },
        Hostile {
            escape_name: Some("dh-escape-absolute"),
            host_paths: &["/tmp/dh-escape-absolute"],
            ..Hostile::new(
                HOSTILE_ABSOLUTE,
                "The top layer has the absolute entry /tmp/dh-escape-absolute: unpacking must \
                 refuse it or put it under the rootfs; the host's /tmp/dh-escape-absolute must \
                 not exist.",
                one(
                    "hostile-absolute",
                    vec![LayerEntry::file(
                        "/tmp/dh-escape-absolute",
                        0o644,
                        "escaped\n",
                    )],
                ),
            )
        },
        Hostile {
            escape_name: Some("dh-escape-symlink"),
            host_paths: &["/tmp/dh-escape-symlink"],
            ..Hostile::new(
                HOSTILE_SYMLINK_ESCAPE,
                "Layer 2 makes the symlink evil -> /tmp, layer 3 writes evil/dh-escape-symlink: \
                 the link must be resolved inside the rootfs (the file lands in the image's /tmp) \
                 or refused; the host's /tmp/dh-escape-symlink must not exist.",
                vec![
                    LayerSpec::new(
                        "hostile-symlink-escape-link",
                        vec![LayerEntry::symlink("evil", "/tmp")],
                    ),
                    LayerSpec::new(
                        "hostile-symlink-escape-file",
                        vec![LayerEntry::file(
                            "evil/dh-escape-symlink",
                            0o644,
                            "escaped\n",
                        )],
                    ),
                ],
            )
        },
        Hostile {
            escape_name: Some("dh-escape-parent"),
            ..Hostile::new(
                HOSTILE_SYMLINK_PARENT,
                "The top layer makes the symlink up -> ../../.. then writes up/dh-escape-parent: \
                 the link must be resolved inside the rootfs or refused; no dh-escape-parent may \
                 appear outside it.",
                one(
                    "hostile-symlink-parent",
                    vec![
                        LayerEntry::symlink("up", "../../.."),
                        LayerEntry::file("up/dh-escape-parent", 0o644, "escaped\n"),
                    ],
                ),
            )
        },
        Hostile::new(
            HOSTILE_HARDLINK_ESCAPE,
            "The top layer has the hard links hl -> /etc/shadow and hl-dotdot -> ../x: unpacking \
             must refuse them or resolve them inside the rootfs; no file of the host (its \
             /etc/shadow) may become reachable from the container.",
            one(
                "hostile-hardlink-escape",
                vec![
                    LayerEntry::hardlink("hl", "/etc/shadow"),
                    LayerEntry::hardlink("hl-dotdot", "../x"),
                ],
            ),
        ),
        Hostile::new(
            HOSTILE_DEVICE,
            "The top layer has the char device /dev-null-copy (1:3, 0666) and the block device \
             /dev-block-copy (7:0, 0660): unpacking may refuse them or create them, but a \
             container must not be able to use them.",
            one(
                "hostile-device",
                vec![
                    LayerEntry::block_device("dev-block-copy", 0o660, 7, 0),
                    LayerEntry::char_device("dev-null-copy", 0o666, 1, 3),
                ],
            ),
        ),
        Hostile {
            compression: Compression::GzipStored,
            corrupt_with: Some(LayerSpec::new(
                "hostile-badlayer-replacement",
                vec![LayerEntry::file("bad.txt", 0o644, "evil content\n")],
            )),
            ..Hostile::new(
                HOSTILE_BADLAYER,
                "The top layer (bad.txt = \"good content\\n\") is stored, gzip level 0, and \
                 after the push its bytes in the registry's storage are replaced by a valid \
                 gzip of the same length with bad.txt = \"evil content\\n\": pulling must fail \
                 on the digest mismatch.",
                one(
                    "hostile-badlayer",
                    vec![LayerEntry::file("bad.txt", 0o644, "good content\n")],
                ),
            )
        },
        Hostile {
            bad_diff_id: true,
            ..Hostile::new(
                HOSTILE_BAD_DIFFID,
                "The config's rootfs.diff_ids entry for the top layer (ok.txt) is not the digest \
                 of its uncompressed tar: unpacking must fail on the diff_id mismatch.",
                one(
                    "hostile-bad-diffid",
                    vec![LayerEntry::file("ok.txt", 0o644, "ok\n")],
                ),
            )
        },
    ]
}

/// An image to build.
struct ImageDef {
    architecture: &'static str,
    variant: Option<&'static str>,
    runtime: RuntimeConfig,
    layers: Vec<(LayerSpec, Compression)>,
    /// Docker schema 2 media types instead of OCI ones.
    docker: bool,
    /// Put a wrong diff_id for the top layer in the config.
    bad_top_diff_id: bool,
}

impl ImageDef {
    fn amd64(runtime: RuntimeConfig, layers: Vec<(LayerSpec, Compression)>) -> Self {
        Self {
            architecture: "amd64",
            variant: None,
            runtime,
            layers,
            docker: false,
            bad_top_diff_id: false,
        }
    }
}

#[derive(Serialize)]
struct ConfigJson<'a> {
    created: &'a str,
    architecture: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    os: &'a str,
    config: &'a RuntimeConfig,
    rootfs: RootFsJson,
    history: Vec<HistoryJson>,
}

#[derive(Serialize)]
struct RootFsJson {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct HistoryJson {
    created: &'static str,
    created_by: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: DescriptorJson<'a>,
    layers: Vec<DescriptorJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexJson<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: Vec<DescriptorJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescriptorJson<'a> {
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<PlatformJson<'a>>,
}

impl<'a> DescriptorJson<'a> {
    fn of(blob: &'a BuiltBlob) -> Self {
        Self {
            media_type: &blob.media_type,
            digest: &blob.digest,
            size: blob.data.len() as u64,
            platform: None,
        }
    }
}

#[derive(Serialize)]
struct PlatformJson<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
}

/// Encodes layers once per (description, compression) and builds images from them.
#[derive(Default)]
struct Builder {
    /// Layer name -> (description, tar, diff_id).
    tars: HashMap<String, (LayerSpec, Vec<u8>, String)>,
    /// (layer name, compression) -> (blob, diff_id).
    blobs: HashMap<(String, Compression), (BuiltBlob, String)>,
}

impl Builder {
    /// The layer's blob (with its OCI media type) and diff_id.
    fn encode(
        &mut self,
        layer: &LayerSpec,
        compression: Compression,
    ) -> Result<(BuiltBlob, String)> {
        let key = (layer.name.clone(), compression);
        if let Some((spec, _, _)) = self.tars.get(&layer.name) {
            if spec != layer {
                bail!("two different layers are named {:?}", layer.name);
            }
            if let Some(hit) = self.blobs.get(&key) {
                return Ok(hit.clone());
            }
        }
        if !self.tars.contains_key(&layer.name) {
            let tar = layer.tar()?;
            let diff_id = sha256_digest(&tar);
            self.tars
                .insert(layer.name.clone(), (layer.clone(), tar, diff_id));
        }
        let (_, tar, diff_id) = &self.tars[&layer.name];
        let data = compression
            .compress(tar)
            .with_context(|| format!("compressing layer {}", layer.name))?;
        let out = (
            BuiltBlob::new(compression.oci_media_type(), data),
            diff_id.clone(),
        );
        self.blobs.insert(key, out.clone());
        Ok(out)
    }

    fn image(&mut self, reference: &str, def: &ImageDef) -> Result<BuiltImage> {
        let (repository, tag) = split_reference(reference)?;
        let mut layers = Vec::new();
        let mut layer_records = Vec::new();
        let mut diff_ids = Vec::new();
        for (spec, compression) in &def.layers {
            let (mut blob, diff_id) = self.encode(spec, *compression)?;
            if def.docker {
                ensure!(
                    *compression == Compression::Gzip,
                    "{reference}: Docker images have gzip layers only"
                );
                blob.media_type = DOCKER_LAYER_GZIP.to_string();
            }
            layer_records.push(LayerRecord {
                digest: blob.digest.clone(),
                media_type: blob.media_type.clone(),
                size: blob.data.len() as u64,
                diff_id: diff_id.clone(),
                name: spec.name.clone(),
            });
            diff_ids.push(diff_id);
            layers.push(blob);
        }
        if def.bad_top_diff_id {
            let top = diff_ids
                .last_mut()
                .with_context(|| format!("{reference}: no layers"))?;
            *top = sha256_digest(format!("dh: not the diff_id of {reference}").as_bytes());
        }
        let config_json = ConfigJson {
            created: CREATED,
            architecture: def.architecture,
            variant: def.variant,
            os: "linux",
            config: &def.runtime,
            rootfs: RootFsJson {
                kind: "layers",
                diff_ids,
            },
            history: def
                .layers
                .iter()
                .map(|(l, _)| HistoryJson {
                    created: CREATED,
                    created_by: format!("dh-testimages: {}", l.name),
                })
                .collect(),
        };
        let config = BuiltBlob::new(
            if def.docker {
                DOCKER_CONFIG
            } else {
                OCI_CONFIG
            },
            serde_json::to_vec(&config_json).context("serializing an image config")?,
        );
        let manifest_media_type = if def.docker {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        };
        let manifest = ManifestJson {
            schema_version: 2,
            media_type: manifest_media_type,
            config: DescriptorJson::of(&config),
            layers: layers.iter().map(DescriptorJson::of).collect(),
        };
        let manifest = BuiltBlob::new(
            manifest_media_type,
            serde_json::to_vec(&manifest).context("serializing a manifest")?,
        );
        let record = ImageRecord {
            reference: reference.to_string(),
            repository,
            tag,
            description: describe(reference),
            manifest_digest: manifest.digest.clone(),
            manifest_media_type: manifest.media_type.clone(),
            manifest_size: manifest.data.len() as u64,
            config_digest: config.digest.clone(),
            config_media_type: config.media_type.clone(),
            config_size: config.data.len() as u64,
            layers: layer_records,
            os: "linux".into(),
            architecture: def.architecture.into(),
            runtime: Some(def.runtime.clone()),
            platforms: Vec::new(),
            expected_tree: None,
            hostile: None,
            skipped: None,
        };
        let mut blobs = vec![config];
        blobs.extend(layers);
        Ok(BuiltImage {
            manifest,
            blobs,
            children: Vec::new(),
            record,
            corrupt: None,
        })
    }
}

/// An OCI image index over built images, each with (architecture, variant).
fn index_image(
    reference: &str,
    children: &[(&BuiltImage, &str, Option<&str>)],
) -> Result<BuiltImage> {
    let (repository, tag) = split_reference(reference)?;
    let index = IndexJson {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests: children
            .iter()
            .map(|(child, architecture, variant)| DescriptorJson {
                platform: Some(PlatformJson {
                    architecture,
                    os: "linux",
                    variant: *variant,
                }),
                ..DescriptorJson::of(&child.manifest)
            })
            .collect(),
    };
    let manifest = BuiltBlob::new(
        OCI_INDEX,
        serde_json::to_vec(&index).context("serializing an image index")?,
    );
    let mut blobs: Vec<BuiltBlob> = Vec::new();
    for (child, _, _) in children {
        for blob in &child.blobs {
            if !blobs.iter().any(|b| b.digest == blob.digest) {
                blobs.push(blob.clone());
            }
        }
    }
    let platforms = children
        .iter()
        .map(|(child, architecture, variant)| PlatformRecord {
            os: "linux".into(),
            architecture: architecture.to_string(),
            variant: variant.map(String::from),
            digest: child.manifest.digest.clone(),
            media_type: child.manifest.media_type.clone(),
            size: child.manifest.data.len() as u64,
            config_digest: child.record.config_digest.clone(),
            layers: child
                .record
                .layers
                .iter()
                .map(|l| l.digest.clone())
                .collect(),
        })
        .collect();
    let record = ImageRecord {
        reference: reference.to_string(),
        repository,
        tag,
        description: describe(reference),
        manifest_digest: manifest.digest.clone(),
        manifest_media_type: manifest.media_type.clone(),
        manifest_size: manifest.data.len() as u64,
        config_digest: String::new(),
        config_media_type: String::new(),
        config_size: 0,
        layers: Vec::new(),
        os: String::new(),
        architecture: String::new(),
        runtime: None,
        platforms,
        expected_tree: None,
        hostile: None,
        skipped: None,
    };
    Ok(BuiltImage {
        manifest,
        blobs,
        children: children
            .iter()
            .map(|(c, _, _)| c.manifest.clone())
            .collect(),
        record,
        corrupt: None,
    })
}

fn split_reference(reference: &str) -> Result<(String, String)> {
    let (repository, tag) = reference
        .rsplit_once(':')
        .with_context(|| format!("reference {reference:?} has no tag"))?;
    Ok((repository.to_string(), tag.to_string()))
}

fn describe(reference: &str) -> String {
    CATALOG
        .iter()
        .find(|(r, _)| *r == reference)
        .map(|(_, d)| d.to_string())
        .unwrap_or_default()
}
