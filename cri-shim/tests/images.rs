//! Integration tests of the image library against the test bed's registries and images.

mod common;

use std::path::Path;

use common::*;
use deckhand_cri::image::{Credentials, ImageError, RegistryConfig};
use deckhand_tests::images::{
    BUSYBOX, BUSYBOX_DOCKER, HOSTILE_ABSOLUTE, HOSTILE_BAD_DIFFID, HOSTILE_BADLAYER,
    HOSTILE_DEVICE, HOSTILE_DOTDOT, HOSTILE_HARDLINK_ESCAPE, HOSTILE_SYMLINK_ESCAPE,
    HOSTILE_SYMLINK_PARENT, LAYERS, LAYERS_UNCOMPRESSED, LAYERS_ZSTD, MULTIARCH,
};

#[tokio::test]
async fn pulls_by_tag_digest_and_index() {
    init_logs();
    let (_, index) = testbed();
    let root = TempRoot::new("img-pull");
    let store = open_store(&root, RegistryConfig::default());
    let bb = index.get(BUSYBOX).expect("busybox");

    // By tag (OCI manifest).
    let img = store
        .pull(&index.pull_ref(BUSYBOX), None)
        .await
        .expect("pull by tag");
    assert_eq!(img.id().as_str(), bb.config_digest);
    assert_eq!(
        img.repo_tags,
        [format!("{}/dh/busybox:latest", index.registry)]
    );
    assert_eq!(
        img.repo_digests,
        [format!(
            "{}/dh/busybox@{}",
            index.registry, bb.manifest_digest
        )]
    );
    assert_eq!(img.record.layers.len(), 1);
    assert_eq!(img.record.layers[0].diff_id.as_str(), bb.layers[0].diff_id);

    // Docker schema 2: same config and layer, another manifest.
    let docker = index.get(BUSYBOX_DOCKER).expect("docker");
    let img2 = store
        .pull(&index.pull_ref(BUSYBOX_DOCKER), None)
        .await
        .expect("pull docker schema 2");
    assert_eq!(img2.id().as_str(), docker.config_digest);

    // By digest, and by tag@digest.
    let by_digest = bb.pull_ref_by_digest(&index.registry);
    let img3 = store.pull(&by_digest, None).await.expect("pull by digest");
    assert_eq!(img3.id(), img.id());
    let both = format!(
        "{}/dh/busybox:ignored@{}",
        index.registry, bb.manifest_digest
    );
    store.pull(&both, None).await.expect("pull by tag@digest");
    let got = store
        .get(&by_digest)
        .expect("get")
        .expect("present by digest");
    assert_eq!(got.id(), img.id());

    // The index: linux/amd64 is the busybox image; the repo digest is the index's.
    let ma = index.get(MULTIARCH).expect("multiarch");
    let img4 = store
        .pull(&index.pull_ref(MULTIARCH), None)
        .await
        .expect("pull index");
    let amd64 = ma
        .platforms
        .iter()
        .find(|p| p.architecture == "amd64")
        .expect("amd64 entry");
    assert_eq!(img4.id().as_str(), amd64.config_digest);
    assert!(
        img4.repo_digests.contains(&format!(
            "{}/dh/multiarch@{}",
            index.registry, ma.manifest_digest
        )),
        "{:?}",
        img4.repo_digests
    );
    assert_eq!(img4.record.manifest_digest.as_str(), amd64.digest);

    // Lookups by id, short names, and an unknown name.
    assert!(store.get(img.id().as_str()).expect("get").is_some());
    assert!(store.get(img.id().hex()).expect("get").is_some());
    assert!(
        store
            .get(&format!("{}/dh/busybox", index.registry))
            .expect("get")
            .is_some()
    );
    assert!(store.get("dh-no-such-image").expect("get").is_none());

    // One busybox layer stored once, one snapshot.
    assert_eq!(store.snapshots().list().expect("snapshots").len(), 1);

    // Unknown tag.
    let err = store
        .pull(
            &format!("{}/dh/busybox:dh-no-such-tag", index.registry),
            None,
        )
        .await
        .expect_err("unknown tag");
    assert!(matches!(err.root(), ImageError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn auth_required_denied_and_accepted() {
    init_logs();
    let (tb, index) = testbed();
    let root = TempRoot::new("img-auth");
    let creds = tb.auth_credentials();
    let reference = format!("{}/{BUSYBOX}", tb.auth_registry());

    let store = open_store(&root, RegistryConfig::default());
    let err = store.pull(&reference, None).await.expect_err("anonymous");
    assert!(
        matches!(err.root(), ImageError::Unauthorized { .. }),
        "{err}"
    );
    let wrong = Credentials::Basic {
        username: creds.username.clone(),
        password: "dh-wrong-password".into(),
    };
    let err = store
        .pull(&reference, Some((&wrong, "")))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(err.root(), ImageError::Unauthorized { .. }),
        "{err}"
    );
    // Credentials for another server are not sent.
    let right = Credentials::Basic {
        username: creds.username.clone(),
        password: creds.password.clone(),
    };
    let err = store
        .pull(&reference, Some((&right, "dh-other.invalid")))
        .await
        .expect_err("credentials for another server");
    assert!(
        matches!(err.root(), ImageError::Unauthorized { .. }),
        "{err}"
    );
    let img = store
        .pull(&reference, Some((&right, tb.auth_registry())))
        .await
        .expect("pull with request credentials");
    assert_eq!(
        img.id().as_str(),
        index.get(BUSYBOX).expect("bb").config_digest
    );

    // Credentials from the registry configuration file.
    let root2 = TempRoot::new("img-auth-file");
    let cfg = registry_config(&format!(
        "[hosts.\"{}\"]\nusername = \"{}\"\npassword = \"{}\"\n",
        tb.auth_registry(),
        creds.username,
        creds.password
    ));
    let store2 = open_store(&root2, cfg);
    store2
        .pull(&reference, None)
        .await
        .expect("pull with file credentials");

    // Credentials from a docker config.json.
    let root3 = TempRoot::new("img-auth-docker");
    let dc = root3.path.join("config.json");
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", creds.username, creds.password))
    };
    std::fs::write(
        &dc,
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
            tb.auth_registry()
        ),
    )
    .expect("config.json");
    let cfg_path = root3.path.join("registries.toml");
    std::fs::write(&cfg_path, format!("docker_config = \"{}\"\n", dc.display())).expect("toml");
    let store3 = open_store(&root3, RegistryConfig::load(&cfg_path, true).expect("load"));
    store3
        .pull(&reference, None)
        .await
        .expect("pull with config.json credentials");
}

#[tokio::test]
async fn mirrors_are_tried_in_order_before_the_upstream() {
    init_logs();
    let (_, index) = testbed();
    let root = TempRoot::new("img-mirror");
    let proxy = CountingProxy::start(&index.registry, None).await;
    // A dead mirror first, then the (counting) test registry; the upstream does not exist.
    let cfg = registry_config(&format!(
        "[hosts.\"dh-upstream.invalid\"]\nmirrors = [ {{ host = \"127.0.0.1:9\" }}, {{ host = \"{}\", plain_http = true }} ]\n",
        proxy.addr
    ));
    let store = open_store(&root, cfg);
    let img = store
        .pull("dh-upstream.invalid/dh/busybox:latest", None)
        .await
        .expect("pull through the mirror");
    assert_eq!(img.repo_tags, ["dh-upstream.invalid/dh/busybox:latest"]);
    assert!(
        proxy
            .lines()
            .iter()
            .any(|l| l.starts_with("GET /v2/dh/busybox/manifests/latest")),
        "{:?}",
        proxy.lines()
    );

    // A mirror of a reachable upstream is still used first.
    let root2 = TempRoot::new("img-mirror2");
    let proxy2 = CountingProxy::start(&index.registry, None).await;
    let cfg = registry_config(&format!(
        "[hosts.\"{}\"]\nmirrors = [ {{ host = \"{}\" }} ]\n",
        index.registry, proxy2.addr
    ));
    let store2 = open_store(&root2, cfg);
    store2
        .pull(&index.pull_ref(BUSYBOX), None)
        .await
        .expect("pull with mirror");
    let gets = proxy2.blob_gets();
    assert_eq!(
        gets.len(),
        2,
        "config and layer came from the mirror: {gets:?}"
    );

    // With every endpoint failing, the upstream's error is reported.
    let root3 = TempRoot::new("img-mirror3");
    let store3 = open_store(
        &root3,
        registry_config(
            "[hosts.\"dh-upstream.invalid\"]\nmirrors = [ { host = \"127.0.0.1:9\" } ]\n",
        ),
    );
    let err = store3
        .pull("dh-upstream.invalid/dh/busybox:latest", None)
        .await
        .expect_err("nothing reachable");
    assert!(err.to_string().contains("dh-upstream.invalid"), "{err}");
}

/// Pulls a `dh/layers` tag into a fresh store, mounts it through overlayfs and compares the
/// tree with the index's expected tree.
async fn check_layers(tag: &str) {
    init_logs();
    let (_, index) = testbed();
    let rec = index.get(tag).expect("layers image");
    let expected = rec.expected_tree.clone().expect("expected tree");
    let root = TempRoot::new("img-layers");
    let store = open_store(&root, RegistryConfig::default());
    let img = store
        .pull(&index.pull_ref(tag), None)
        .await
        .unwrap_or_else(|e| panic!("pull {tag}: {e}"));
    assert_eq!(img.record.layers.len(), rec.layers.len());
    let spec = store
        .prepare("dh-ctr-1", img.id().as_str())
        .expect("prepare");
    assert_eq!(spec.lowerdirs.len(), rec.layers.len());
    let target = root.path.join("rootfs");
    std::fs::create_dir_all(&target).expect("mkdir");
    spec.mount(&target).expect("mount overlay");
    let res = assert_tree(&target, &expected);
    // A write lands in the upper dir only.
    std::fs::write(target.join("data/new-file"), b"x").expect("write in rootfs");
    deckhand_cri::image::snapshot::unmount(&target).expect("unmount");
    res.unwrap_or_else(|e| panic!("{tag}: {e:#}"));
    assert!(
        root.path
            .join("store/containers/dh-ctr-1/upper/data/new-file")
            .exists()
    );

    // The image is in use: removal is refused until the container is gone.
    let err = store.remove(img.id().as_str()).expect_err("in use");
    assert!(matches!(err, ImageError::InUse { .. }), "{err}");
    // A read-only view gives the same tree.
    let view = store
        .view("dh-view-1", tag_ref(&index.pull_ref(tag)).as_str())
        .expect("view");
    let vt = root.path.join("view");
    std::fs::create_dir_all(&vt).expect("mkdir");
    view.mount(&vt).expect("mount view");
    let res = assert_tree(&vt, &expected);
    let ro = std::fs::write(vt.join("x"), b"x").is_err();
    deckhand_cri::image::snapshot::unmount(&vt).expect("unmount view");
    res.unwrap_or_else(|e| panic!("{tag} view: {e:#}"));
    assert!(ro, "a view is read-only");
    store
        .remove_container("dh-ctr-1")
        .expect("remove container");
    store.remove_container("dh-view-1").expect("remove view");
    assert!(store.remove(img.id().as_str()).expect("remove").is_some());
}

fn tag_ref(s: &str) -> String {
    s.to_string()
}

#[tokio::test]
async fn whiteouts_and_gzip_layers_give_the_expected_tree() {
    check_layers(LAYERS).await;
}

#[tokio::test]
async fn zstd_layers_give_the_expected_tree() {
    check_layers(LAYERS_ZSTD).await;
}

#[tokio::test]
async fn uncompressed_layers_give_the_expected_tree() {
    check_layers(LAYERS_UNCOMPRESSED).await;
}

fn find_named(dir: &Path, name: &str, depth: usize, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy() == name {
            out.push(p.display().to_string());
        }
        if depth > 0 && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            find_named(&p, name, depth - 1, out);
        }
    }
}

#[tokio::test]
async fn hostile_images_are_refused_and_write_nothing_outside() {
    init_logs();
    let (_, index) = testbed();
    let cases: &[(&str, &str)] = &[
        (HOSTILE_DOTDOT, "`..`"),
        (HOSTILE_ABSOLUTE, "absolute path"),
        (HOSTILE_SYMLINK_ESCAPE, "symlink in a lower layer"),
        (HOSTILE_SYMLINK_PARENT, "is a symlink"),
        (HOSTILE_HARDLINK_ESCAPE, "outside the layer"),
        (HOSTILE_DEVICE, "device node"),
        (HOSTILE_BADLAYER, "digest mismatch"),
        (HOSTILE_BAD_DIFFID, "diff_id"),
    ];
    for (tag, needle) in cases {
        let rec = index.get(tag).expect("hostile image");
        let hostile = rec.hostile.clone().expect("hostile info");
        let root = TempRoot::new("img-hostile");
        let store = open_store(&root, RegistryConfig::default());
        let err = store
            .pull(&index.pull_ref(tag), None)
            .await
            .expect_err(&format!("{tag} must be refused"));
        let msg = err.to_string();
        assert!(msg.contains(needle), "{tag}: unclear error: {msg}");
        match *tag {
            HOSTILE_BADLAYER | HOSTILE_BAD_DIFFID => {
                assert!(
                    matches!(err.root(), ImageError::DigestMismatch { .. }),
                    "{msg}"
                )
            }
            _ => assert!(
                matches!(err.root(), ImageError::UnsafeLayer { .. }),
                "{msg}"
            ),
        }
        // No record, no snapshot of the hostile layer, no temporary left.
        assert!(store.list().expect("list").is_empty(), "{tag}");
        let top = rec.layers.last().expect("layers");
        let snaps = store.snapshots().list().expect("snapshots");
        assert!(snaps.len() < rec.layers.len(), "{tag}: {snaps:?}");
        assert!(
            !store
                .content()
                .contains(&deckhand_cri::image::Digest::parse(&top.digest).expect("digest"))
                || *tag != HOSTILE_BAD_DIFFID,
            "{tag}: a rejected layer's blob is not kept"
        );
        let leftovers: Vec<_> = std::fs::read_dir(root.path.join("store/snapshots"))
            .expect("snapshots dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{tag}: temporary snapshots left");
        for p in &hostile.host_paths {
            assert!(!Path::new(p).exists(), "{tag}: {p} exists on the host");
        }
        if let Some(name) = &hostile.escape_name {
            let mut found = Vec::new();
            find_named(&root.path, name, 8, &mut found);
            find_named(Path::new("/tmp"), name, 0, &mut found);
            find_named(Path::new("/"), name, 0, &mut found);
            assert!(found.is_empty(), "{tag}: escape file found at {found:?}");
        }
    }
}

#[tokio::test]
async fn concurrent_pulls_download_each_blob_once() {
    init_logs();
    let (_, index) = testbed();
    let proxy = CountingProxy::start(&index.registry, Some(20 * 1024 * 1024)).await;
    let root = TempRoot::new("img-concurrent");
    let store = open_store(&root, RegistryConfig::default());
    let reference = format!("{}/{LAYERS}", proxy.addr);
    let (a, b) = tokio::join!(store.pull(&reference, None), store.pull(&reference, None));
    let (a, b) = (a.expect("pull a"), b.expect("pull b"));
    assert_eq!(a.id(), b.id());
    let gets = proxy.blob_gets();
    let rec = index.get(LAYERS).expect("layers");
    assert_eq!(gets.len(), rec.layers.len() + 1, "{gets:?}");
    for (digest, n) in &gets {
        assert_eq!(*n, 1, "blob {digest} downloaded {n} times: {gets:?}");
    }
    // A later pull of an image sharing the busybox layer does not fetch it again.
    store
        .pull(&format!("{}/{BUSYBOX}", proxy.addr), None)
        .await
        .expect("pull busybox");
    let bb_layer = &index.get(BUSYBOX).expect("bb").layers[0].digest;
    assert_eq!(proxy.blob_gets().get(bb_layer), Some(&1));
}

#[tokio::test]
async fn remove_and_gc_free_the_space() {
    init_logs();
    let (_, index) = testbed();
    let root = TempRoot::new("img-gc");
    let store = open_store(&root, RegistryConfig::default());
    let empty = store.usage().expect("usage");
    store
        .pull(&index.pull_ref(LAYERS), None)
        .await
        .expect("pull layers");
    let bb = store
        .pull(&index.pull_ref(BUSYBOX), None)
        .await
        .expect("pull busybox");
    let full = store.usage().expect("usage");
    assert!(full.bytes > empty.bytes + 1_000_000, "{full:?}");

    // Removing layers keeps busybox's shared layer.
    assert!(
        store
            .remove(&index.pull_ref(LAYERS))
            .expect("remove")
            .is_some()
    );
    assert!(
        store
            .remove(&index.pull_ref(LAYERS))
            .expect("again")
            .is_none()
    );
    let report = store.gc().expect("gc");
    assert_eq!(report.snapshots, 3, "{report:?}");
    assert!(store.get(bb.id().as_str()).expect("get").is_some());
    let spec = store
        .prepare("dh-gc-ctr", bb.id().as_str())
        .expect("prepare");
    assert!(spec.lowerdirs.iter().all(|d| d.is_dir()));
    assert!(matches!(
        store.remove(bb.id().as_str()),
        Err(ImageError::InUse { .. })
    ));
    store
        .remove_container("dh-gc-ctr")
        .expect("remove container");
    store
        .remove(&index.pull_ref(BUSYBOX))
        .expect("remove busybox");
    let report = store.gc().expect("gc");
    assert!(report.blobs >= 3, "{report:?}");
    assert!(store.content().list().expect("blobs").is_empty());
    assert!(store.snapshots().list().expect("snapshots").is_empty());
    let after = store.usage().expect("usage");
    assert!(
        after.bytes <= empty.bytes + 64 * 1024,
        "{empty:?} -> {after:?}"
    );
}

#[tokio::test]
async fn a_stalled_download_times_out_with_a_clear_error() {
    init_logs();
    let (_, index) = testbed();
    // Small responses (manifest, config) pass; the 1 MB layer trickles far below one chunk per
    // stall timeout.
    let proxy = CountingProxy::start(&index.registry, Some(4000)).await;
    let root = TempRoot::new("img-stall");
    let mut opts = deckhand_cri::image::StoreOptions::new(root.path.join("store"));
    opts.stall_timeout = std::time::Duration::from_secs(2);
    let store = deckhand_cri::image::ImageStore::open(opts).expect("open");
    let start = std::time::Instant::now();
    let err = store
        .pull(&format!("{}/{BUSYBOX}", proxy.addr), None)
        .await
        .expect_err("stalled pull");
    assert!(matches!(err.root(), ImageError::Stalled { .. }), "{err}");
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    assert!(store.list().expect("list").is_empty());
}

#[tokio::test]
async fn bearer_token_auth_anonymous_basic_and_given_token() {
    init_logs();
    let (_, index) = testbed();
    let bb = index.get(BUSYBOX).expect("busybox");

    // Anonymous token: the challenge is answered without credentials.
    let open = BearerGateway::start(&index.registry, None).await;
    let root = TempRoot::new("img-bearer");
    let store = open_store(&root, RegistryConfig::default());
    let img = store
        .pull(&format!("{}/{BUSYBOX}", open.addr), None)
        .await
        .expect("pull with an anonymous bearer token");
    assert_eq!(img.id().as_str(), bb.config_digest);
    let reqs = open.token_requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("scope=repository%3Adh%2Fbusybox%3Apull")
                || r.contains("scope=repository:dh/busybox:pull")),
        "{reqs:?}"
    );

    // Basic credentials exchanged for a token; wrong ones refused.
    let gated = BearerGateway::start(&index.registry, Some(("dh-user", "dh-pass"))).await;
    let reference = format!("{}/{BUSYBOX}", gated.addr);
    let root2 = TempRoot::new("img-bearer2");
    let store2 = open_store(&root2, RegistryConfig::default());
    let err = store2
        .pull(&reference, None)
        .await
        .expect_err("no credentials");
    assert!(
        matches!(err.root(), ImageError::Unauthorized { .. }),
        "{err}"
    );
    let wrong = Credentials::Basic {
        username: "dh-user".into(),
        password: "dh-wrong".into(),
    };
    let err = store2
        .pull(&reference, Some((&wrong, "")))
        .await
        .expect_err("wrong credentials");
    assert!(
        matches!(err.root(), ImageError::Unauthorized { .. }),
        "{err}"
    );
    let right = Credentials::Basic {
        username: "dh-user".into(),
        password: "dh-pass".into(),
    };
    store2
        .pull(&reference, Some((&right, "")))
        .await
        .expect("basic credentials exchanged for a token");

    // A registry token given with the request (CRI registry_token) is used as is.
    let root3 = TempRoot::new("img-bearer3");
    let store3 = open_store(&root3, RegistryConfig::default());
    let before = gated.token_requests().len();
    store3
        .pull(
            &reference,
            Some((&Credentials::Bearer("dh-token".into()), "")),
        )
        .await
        .expect("pull with a given bearer token");
    assert_eq!(gated.token_requests().len(), before, "no token exchange");
}

#[tokio::test]
async fn tls_registry_is_trusted_through_its_ca_file_only() {
    init_logs();
    let (tb, index) = testbed();
    let host = tb.tls_registry();
    let image = format!("{host}/dh/busybox:latest");
    let want = format!(
        "{host}/dh/busybox@{}",
        index
            .get("dh/busybox:latest")
            .expect("busybox")
            .manifest_digest
    );

    // HTTPS without the CA: the certificate is not trusted and nothing is stored.
    let root = TempRoot::new("img-tls-noca");
    let store = open_store(
        &root,
        registry_config(&format!("[hosts.\"{host}\"]\nplain_http = false\n")),
    );
    let err = store
        .pull(&image, None)
        .await
        .expect_err("a certificate from an unknown CA must be refused");
    assert!(
        store.list().expect("list").is_empty(),
        "nothing stored after {err}"
    );

    // With the CA file from the registry configuration.
    let root = TempRoot::new("img-tls-ca");
    let store = open_store(
        &root,
        registry_config(&format!(
            "[hosts.\"{host}\"]\nplain_http = false\nca = \"{}\"\n",
            tb.tls_registry_ca().display()
        )),
    );
    let img = store
        .pull(&image, None)
        .await
        .expect("pull with the CA file");
    assert_eq!(img.repo_digests, std::slice::from_ref(&want));

    // skip_verify accepts the certificate without the CA (insecure, but what it is for).
    let root = TempRoot::new("img-tls-skip");
    let store = open_store(
        &root,
        registry_config(&format!(
            "[hosts.\"{host}\"]\nplain_http = false\nskip_verify = true\n"
        )),
    );
    let img = store
        .pull(&image, None)
        .await
        .expect("pull with skip_verify");
    assert_eq!(img.repo_digests, [want]);
}
