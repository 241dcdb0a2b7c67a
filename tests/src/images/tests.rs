//! Unit tests of the image builder (no registry needed; they need `/bin/busybox`).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::OnceLock;

use serde_json::Value;

use super::*;

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| build_catalog(&BuildOptions::default()).expect("build the catalog"))
}

fn image(reference: &str) -> &'static BuiltImage {
    catalog()
        .get(reference)
        .unwrap_or_else(|| panic!("{reference} is not in the catalog"))
}

fn blob<'a>(image: &'a BuiltImage, digest: &str) -> &'a BuiltBlob {
    image
        .blobs
        .iter()
        .find(|b| b.digest == digest)
        .unwrap_or_else(|| panic!("blob {digest} missing"))
}

fn decompress(media_type: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if media_type.ends_with("gzip") {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("gunzip");
    } else if media_type.ends_with("zstd") {
        out = zstd::decode_all(data).expect("unzstd");
    } else {
        assert_eq!(media_type, OCI_LAYER_TAR);
        out = data.to_vec();
    }
    out
}

fn layer_tars(image: &BuiltImage) -> Vec<Vec<u8>> {
    image
        .record
        .layers
        .iter()
        .map(|l| decompress(&l.media_type, &blob(image, &l.digest).data))
        .collect()
}

fn json(data: &[u8]) -> Value {
    serde_json::from_slice(data).expect("JSON")
}

#[test]
fn build_is_reproducible() {
    let again = build_catalog(&BuildOptions::default()).expect("build again");
    let first = catalog();
    assert_eq!(first.images.len(), again.images.len());
    for (a, b) in first.images.iter().zip(&again.images) {
        assert_eq!(a.record, b.record, "{}", a.record.reference);
        assert_eq!(a, b, "{}", a.record.reference);
    }
    let refs: Vec<&str> = first
        .images
        .iter()
        .map(|i| i.record.reference.as_str())
        .collect();
    assert_eq!(refs, CATALOG.iter().map(|(r, _)| *r).collect::<Vec<_>>());
}

#[test]
fn every_digest_matches_its_bytes() {
    for image in &catalog().images {
        assert_eq!(image.manifest.digest, sha256_digest(&image.manifest.data));
        for b in image.blobs.iter().chain(&image.children) {
            assert_eq!(b.digest, sha256_digest(&b.data));
        }
        let manifest = json(&image.manifest.data);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(
            manifest["mediaType"],
            image.record.manifest_media_type.as_str()
        );
        assert_eq!(image.record.manifest_size, image.manifest.data.len() as u64);
        if !image.record.config_digest.is_empty() {
            let r = &image.record;
            assert_eq!(manifest["config"]["digest"], r.config_digest.as_str());
            assert_eq!(manifest["config"]["size"], r.config_size);
            assert_eq!(
                manifest["config"]["mediaType"],
                r.config_media_type.as_str()
            );
            let layers = manifest["layers"].as_array().expect("layers");
            assert_eq!(layers.len(), image.record.layers.len());
            for (m, l) in layers.iter().zip(&image.record.layers) {
                assert_eq!(m["digest"], l.digest.as_str());
                assert_eq!(m["mediaType"], l.media_type.as_str());
                assert_eq!(m["size"], l.size);
                assert_eq!(blob(image, &l.digest).data.len() as u64, l.size);
            }
        }
    }
}

#[test]
fn compression_variants_share_diff_ids() {
    let gz = image(LAYERS);
    let zst = image(LAYERS_ZSTD);
    let raw = image(LAYERS_UNCOMPRESSED);
    assert_eq!(gz.record.layers.len(), 4);
    assert_eq!(gz.record.diff_ids(), zst.record.diff_ids());
    assert_eq!(gz.record.diff_ids(), raw.record.diff_ids());
    assert_eq!(
        gz.record.config_digest, zst.record.config_digest,
        "same config"
    );
    assert_eq!(
        gz.record.config_digest, raw.record.config_digest,
        "same config"
    );
    assert_ne!(gz.record.manifest_digest, zst.record.manifest_digest);
    assert_ne!(gz.record.manifest_digest, raw.record.manifest_digest);
    for (img, media_type) in [
        (gz, OCI_LAYER_GZIP),
        (zst, OCI_LAYER_ZSTD),
        (raw, OCI_LAYER_TAR),
    ] {
        for (layer, tar) in img.record.layers.iter().zip(layer_tars(img)) {
            assert_eq!(layer.media_type, media_type);
            assert_eq!(sha256_digest(&tar), layer.diff_id, "{}", layer.name);
        }
        let config_digest = &img.record.config_digest;
        let config = json(&blob(img, config_digest).data);
        let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
            .as_array()
            .expect("diff_ids")
            .iter()
            .map(|v| v.as_str().expect("string"))
            .collect();
        assert_eq!(diff_ids, img.record.diff_ids());
    }
    // The gzip base layer is the busybox image's layer.
    assert_eq!(
        gz.record.layers[0].digest,
        image(BUSYBOX).record.layers[0].digest
    );
}

#[test]
fn busybox_image() {
    let bb = image(BUSYBOX);
    let config = json(&blob(bb, &bb.record.config_digest).data);
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!(["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));

    let tars = layer_tars(bb);
    assert_eq!(tars.len(), 1);
    let tree = apply_tars(&tars);
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let e = &tree["/bin/busybox"];
    assert_eq!(e.kind, ExpectedKind::File);
    assert_eq!(e.mode, 0o755);
    assert_eq!(e.sha256.as_deref(), Some(sha256_hex(&busybox).as_str()));
    for applet in ["sh", "ls", "id", "httpd", "cat"] {
        let e = &tree[&format!("/bin/{applet}")];
        assert_eq!(e.kind, ExpectedKind::Symlink, "{applet}");
        assert_eq!(e.target.as_deref(), Some("busybox"));
    }
    assert_eq!(tree["/tmp"].mode, 0o1777);
    assert_eq!(tree["/tmp"].kind, ExpectedKind::Dir);
    for absent in ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"] {
        assert!(!tree.contains_key(absent), "{absent}");
    }
    assert!(tree.values().all(|e| e.uid == 0 && e.gid == 0));

    // Same content with Docker media types.
    let docker = image(BUSYBOX_DOCKER);
    assert_eq!(docker.record.manifest_media_type, DOCKER_MANIFEST);
    assert_eq!(docker.record.config_media_type, DOCKER_CONFIG);
    assert_eq!(docker.record.config_digest, bb.record.config_digest);
    assert_eq!(docker.record.layers[0].media_type, DOCKER_LAYER_GZIP);
    assert_eq!(docker.record.layers[0].digest, bb.record.layers[0].digest);
}

#[test]
fn httpd_and_config_images() {
    let httpd = image(HTTPD);
    let rt = httpd.record.runtime.as_ref().expect("runtime");
    assert_eq!(
        rt.cmd.as_deref().expect("cmd").join(" "),
        "httpd -f -v -p 8080 -h /www"
    );
    assert!(rt.exposed_ports.contains_key("8080/tcp"));
    let tree = apply_tars(&layer_tars(httpd));
    assert_eq!(
        tree["/www/index.html"].sha256.as_deref(),
        Some(sha256_hex(b"deckhand test page\n").as_str())
    );

    let config = image(CONFIG);
    let rt = config.record.runtime.as_ref().expect("runtime");
    assert_eq!(rt.user.as_deref(), Some("1000:1000"));
    assert_eq!(rt.working_dir.as_deref(), Some("/home/dhuser"));
    assert!(rt.env.iter().any(|e| e == "DH_GREETING=hello"));
    assert_eq!(rt.labels["io.deckhand.test"], "config");
    let raw = json(&blob(config, &config.record.config_digest).data);
    assert_eq!(raw["config"]["User"], "1000:1000");
    assert_eq!(
        raw["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
    let tree = apply_tars(&layer_tars(config));
    let home = &tree["/home/dhuser"];
    assert_eq!(
        (home.kind, home.uid, home.gid),
        (ExpectedKind::Dir, 1000, 1000)
    );
    let passwd_tar = &layer_tars(config)[1];
    let text = String::from_utf8_lossy(passwd_tar);
    assert!(text.contains("dhuser:x:1000:1000::/home/dhuser:/bin/sh\n"));
    assert!(text.contains("dhgroup:x:1000:\n"));
}

#[test]
fn expected_tree_matches_the_encoded_layers() {
    for reference in [LAYERS, LAYERS_ZSTD, LAYERS_UNCOMPRESSED] {
        let img = image(reference);
        let expected = img.record.expected_tree.as_ref().expect("expected tree");
        let applied = apply_tars(&layer_tars(img));
        let exp_keys: Vec<&String> = expected.keys().collect();
        let got_keys: Vec<&String> = applied.keys().collect();
        assert_eq!(exp_keys, got_keys, "{reference}: paths");
        for (path, e) in expected {
            assert_eq!(&applied[path], e, "{reference}: {path}");
        }
    }
}

#[test]
fn expected_tree_key_entries() {
    let tree = image(LAYERS)
        .record
        .expected_tree
        .as_ref()
        .expect("expected tree");
    for gone in [
        "/data/delete-me.txt",
        "/data/gone",
        "/data/gone/a.txt",
        "/data/gone/sub/b.txt",
        "/data/opaque/old.txt",
        "/data/opaque/olddir",
        "/data/opaque/olddir/x.txt",
    ] {
        assert!(!tree.contains_key(gone), "{gone} must be gone");
    }
    assert!(!tree.keys().any(|k| k.contains(".wh.")));
    let file = |p: &str, content: &str| {
        let e = &tree[p];
        assert_eq!(e.kind, ExpectedKind::File, "{p}");
        assert_eq!(
            e.sha256.as_deref(),
            Some(sha256_hex(content.as_bytes()).as_str()),
            "{p}"
        );
        e
    };
    file("/data/keep.txt", "keep\n");
    file("/data/replace.txt", "new content\n");
    file("/data/opaque/new.txt", "new in opaque dir\n");
    assert_eq!(tree["/data/opaque"].kind, ExpectedKind::Dir);
    assert_eq!(
        file("/data/chmod.sh", "#!/bin/sh\necho chmod\n").mode,
        0o755
    );
    let hard = file("/data/links/hard.txt", "hard link target\n");
    assert_eq!(hard.hardlink_to.as_deref(), Some("/data/links/target.txt"));
    for (link, target) in [
        ("/data/links/rel", "target.txt"),
        ("/data/links/up", "../keep.txt"),
        ("/data/links/abs", "/data/keep.txt"),
    ] {
        assert_eq!(tree[link].kind, ExpectedKind::Symlink);
        assert_eq!(tree[link].target.as_deref(), Some(target));
    }
    assert_eq!(tree["/data/fifo"].kind, ExpectedKind::Fifo);
    let x = file("/data/xattr.txt", "has an xattr\n");
    assert_eq!(x.xattrs.get("user.dh").map(String::as_str), Some("1"));
    let owned = file("/data/owned/file.txt", "owned by 1000:1000\n");
    assert_eq!((owned.uid, owned.gid, owned.mode), (1000, 1000, 0o640));
    assert_eq!(
        (tree["/data/owned"].uid, tree["/data/owned"].mode),
        (1000, 0o750)
    );
    assert_eq!(tree["/tmp"].mode, 0o1777);
    assert_eq!(tree["/bin/sh"].target.as_deref(), Some("busybox"));
}

#[test]
fn multiarch_index() {
    let idx = image(MULTIARCH);
    assert_eq!(idx.record.manifest_media_type, OCI_INDEX);
    let v = json(&idx.manifest.data);
    let manifests = v["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 2);
    assert_eq!(manifests[0]["platform"]["architecture"], "amd64");
    assert_eq!(
        manifests[0]["digest"],
        image(BUSYBOX).record.manifest_digest.as_str()
    );
    assert_eq!(manifests[1]["platform"]["architecture"], "arm64");
    assert_eq!(manifests[1]["platform"]["variant"], "v8");
    assert_eq!(idx.children.len(), 2);
    let arm = &idx.record.platforms[1];
    assert_eq!(arm.digest, idx.children[1].digest);
    let arm_manifest = json(&idx.children[1].data);
    let config_digest = arm_manifest["config"]["digest"].as_str().expect("digest");
    assert_eq!(config_digest, arm.config_digest);
    let config = json(&blob(idx, config_digest).data);
    assert_eq!(config["architecture"], "arm64");
    let layer = &arm_manifest["layers"][0];
    let tar = decompress(
        layer["mediaType"].as_str().expect("media type"),
        &blob(idx, layer["digest"].as_str().expect("digest")).data,
    );
    let tree = apply_tars(&[tar]);
    assert_eq!(tree.len(), 1);
    assert_eq!(
        tree["/arch"].sha256.as_deref(),
        Some(sha256_hex(b"arm64\n").as_str())
    );
}

/// (raw path, raw link name) of every entry of the top layer.
fn top_entries(reference: &str) -> Vec<(String, Option<String>, tar::EntryType)> {
    let tars = layer_tars(image(reference));
    let top = tars.last().expect("a layer");
    let mut archive = tar::Archive::new(top.as_slice());
    archive
        .entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned()),
                e.header().entry_type(),
            )
        })
        .collect()
}

#[test]
fn hostile_layers_are_written_raw() {
    assert_eq!(top_entries(HOSTILE_DOTDOT)[0].0, "../../dh-escape-dotdot");
    assert_eq!(
        top_entries(HOSTILE_ABSOLUTE)[0].0,
        "/tmp/dh-escape-absolute"
    );
    let sym = image(HOSTILE_SYMLINK_ESCAPE);
    assert_eq!(sym.record.layers.len(), 3);
    let tars = layer_tars(sym);
    let mut a = tar::Archive::new(tars[1].as_slice());
    let link = a
        .entries()
        .expect("entries")
        .next()
        .expect("one")
        .expect("entry");
    assert_eq!(link.path_bytes().as_ref(), b"evil");
    assert_eq!(link.link_name_bytes().as_deref(), Some(&b"/tmp"[..]));
    assert_eq!(
        top_entries(HOSTILE_SYMLINK_ESCAPE)[0].0,
        "evil/dh-escape-symlink"
    );
    let parent = top_entries(HOSTILE_SYMLINK_PARENT);
    assert_eq!(parent[0].1.as_deref(), Some("../../.."));
    assert_eq!(parent[1].0, "up/dh-escape-parent");
    let hl = top_entries(HOSTILE_HARDLINK_ESCAPE);
    assert_eq!(
        hl[0],
        (
            "hl".into(),
            Some("/etc/shadow".into()),
            tar::EntryType::Link
        )
    );
    assert_eq!(
        hl[1],
        (
            "hl-dotdot".into(),
            Some("../x".into()),
            tar::EntryType::Link
        )
    );
    let dev = top_entries(HOSTILE_DEVICE);
    assert!(
        dev.iter()
            .any(|e| e.0 == "dev-null-copy" && e.2 == tar::EntryType::Char)
    );
    assert!(
        dev.iter()
            .any(|e| e.0 == "dev-block-copy" && e.2 == tar::EntryType::Block)
    );
    for (reference, _) in CATALOG.iter().filter(|(r, _)| r.starts_with("dh/hostile:")) {
        let h = image(reference)
            .record
            .hostile
            .as_ref()
            .expect("hostile info");
        assert_eq!(format!("dh/hostile:{}", h.kind), *reference);
    }
}

#[test]
fn badlayer_replacement_is_same_length_valid_gzip() {
    let bad = image(HOSTILE_BADLAYER);
    let corrupt = bad.corrupt.as_ref().expect("corrupt blob");
    let top = bad.record.layers.last().expect("layer");
    assert_eq!(corrupt.digest, top.digest);
    let original = blob(bad, &top.digest);
    assert_eq!(corrupt.replacement.len(), original.data.len());
    assert_ne!(sha256_digest(&corrupt.replacement), top.digest);
    let tar = decompress(OCI_LAYER_GZIP, &corrupt.replacement);
    let tree = apply_tars(&[tar]);
    assert_eq!(
        tree["/bad.txt"].sha256.as_deref(),
        Some(sha256_hex(b"evil content\n").as_str())
    );
}

#[test]
fn bad_diffid_config_lies() {
    let img = image(HOSTILE_BAD_DIFFID);
    let config = json(&blob(img, &img.record.config_digest).data);
    let listed = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    let tars = layer_tars(img);
    assert_eq!(listed.len(), tars.len());
    assert_eq!(listed[0], sha256_digest(&tars[0]).as_str(), "base is fine");
    assert_ne!(listed[1], sha256_digest(&tars[1]).as_str(), "top lies");
    // The record keeps the true diff_id.
    assert_eq!(img.record.layers[1].diff_id, sha256_digest(&tars[1]));
}

#[test]
fn index_round_trips() {
    let index = ImageIndex {
        registry: "127.0.0.1:5000".into(),
        busybox_sha256: catalog().busybox_sha256.clone(),
        images: catalog()
            .images
            .iter()
            .map(|i| (i.record.reference.clone(), i.record.clone()))
            .collect(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("index.json");
    index.save(&path).expect("save");
    let back = ImageIndex::load(&path).expect("load");
    assert_eq!(back, index);
    let bb = back.get(BUSYBOX).expect("busybox");
    assert_eq!(bb.repository, "dh/busybox");
    assert_eq!(bb.tag, "latest");
    let missing = back.get("dh/nope:latest").expect_err("not in the index");
    assert!(format!("{missing:#}").contains("dh/nope:latest"));
    assert_eq!(
        back.pull_ref(HTTPD),
        "127.0.0.1:5000/dh/httpd:latest".to_string()
    );
}

/// A small reference applier, independent of [`expected_tree`]: reads the encoded archives and
/// applies them with OCI whiteout semantics (whiteouts act on lower layers only).
fn apply_tars(tars: &[Vec<u8>]) -> BTreeMap<String, ExpectedEntry> {
    struct Raw {
        path: String,
        kind: tar::EntryType,
        mode: u32,
        uid: u32,
        gid: u32,
        content: Vec<u8>,
        link: Option<String>,
        device: [u32; 2],
        xattrs: BTreeMap<String, String>,
    }
    let mut tree: BTreeMap<String, ExpectedEntry> = BTreeMap::new();
    let clean = |p: &str| format!("/{}", p.trim_start_matches("./").trim_end_matches('/'));
    let drop_below = |tree: &mut BTreeMap<String, ExpectedEntry>, dir: &str| {
        let prefix = format!("{dir}/");
        tree.retain(|k, _| !k.starts_with(&prefix));
    };
    for tar_bytes in tars {
        let mut raws = Vec::new();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        for e in archive.entries().expect("entries") {
            let mut e = e.expect("entry");
            let mut xattrs = BTreeMap::new();
            if let Some(exts) = e.pax_extensions().expect("pax") {
                for ext in exts {
                    let ext = ext.expect("pax record");
                    if let Some(name) = ext.key().expect("key").strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(name.to_string(), ext.value().expect("value").to_string());
                    }
                }
            }
            let h = e.header();
            let raw = Raw {
                path: String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                kind: h.entry_type(),
                mode: h.mode().expect("mode"),
                uid: h.uid().expect("uid") as u32,
                gid: h.gid().expect("gid") as u32,
                link: e
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned()),
                device: [
                    h.device_major().expect("major").unwrap_or(0),
                    h.device_minor().expect("minor").unwrap_or(0),
                ],
                content: Vec::new(),
                xattrs,
            };
            let mut content = Vec::new();
            e.read_to_end(&mut content).expect("content");
            raws.push(Raw { content, ..raw });
        }
        // Whiteouts first.
        for r in &raws {
            let path = clean(&r.path);
            let (dir, base) = path.rsplit_once('/').expect("slash");
            if base == ".wh..wh..opq" {
                drop_below(&mut tree, dir);
            } else if let Some(victim) = base.strip_prefix(".wh.") {
                let victim = format!("{dir}/{victim}");
                tree.remove(&victim);
                drop_below(&mut tree, &victim);
            }
        }
        for r in raws {
            let path = clean(&r.path);
            if path
                .rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with(".wh."))
            {
                continue;
            }
            let base = ExpectedEntry {
                kind: ExpectedKind::File,
                mode: r.mode,
                uid: r.uid,
                gid: r.gid,
                sha256: None,
                size: None,
                target: None,
                hardlink_to: None,
                device: None,
                xattrs: r.xattrs,
            };
            let entry = match r.kind {
                tar::EntryType::Directory => ExpectedEntry {
                    kind: ExpectedKind::Dir,
                    ..base
                },
                tar::EntryType::Regular => ExpectedEntry {
                    sha256: Some(sha256_hex(&r.content)),
                    size: Some(r.content.len() as u64),
                    ..base
                },
                tar::EntryType::Symlink => ExpectedEntry {
                    kind: ExpectedKind::Symlink,
                    target: r.link,
                    ..base
                },
                tar::EntryType::Link => {
                    let target = clean(&r.link.expect("link name"));
                    ExpectedEntry {
                        hardlink_to: Some(target.clone()),
                        ..tree[&target].clone()
                    }
                }
                tar::EntryType::Fifo => ExpectedEntry {
                    kind: ExpectedKind::Fifo,
                    ..base
                },
                tar::EntryType::Char => ExpectedEntry {
                    kind: ExpectedKind::CharDevice,
                    device: Some(r.device),
                    ..base
                },
                tar::EntryType::Block => ExpectedEntry {
                    kind: ExpectedKind::BlockDevice,
                    device: Some(r.device),
                    ..base
                },
                other => panic!("unexpected entry type {other:?} at {path}"),
            };
            if entry.kind != ExpectedKind::Dir {
                drop_below(&mut tree, &path);
            }
            tree.insert(path, entry);
        }
    }
    tree
}
