//! The `deckhand-cri` binary: its CRI ImageService through the gRPC client, and pulls killed
//! at random points then retried.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use deckhand_cri::image::{ImageStore, StoreOptions};
use deckhand_proto::cri;
use deckhand_proto::cri::image_service_client::ImageServiceClient;
use deckhand_tests::images::{BUSYBOX, CONFIG, LAYERS};
use tonic::transport::Channel;

async fn client(d: &Daemon) -> ImageServiceClient<Channel> {
    let ch = deckhand_proto::unix::connect_path(&d.socket)
        .await
        .expect("connect");
    ImageServiceClient::new(ch)
        .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
        .max_encoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE)
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

#[tokio::test]
async fn image_service_answers_through_grpc() {
    init_logs();
    let (tb, index) = testbed();
    let dir = TempRoot::new("cri-svc");
    let mut d = Daemon::start(&dir.path, None).expect("start daemon");
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    let mut c = client(&d).await;

    // Auth: refused without credentials, accepted with them.
    let auth_ref = format!("{}/{BUSYBOX}", tb.auth_registry());
    let err = c
        .pull_image(cri::PullImageRequest {
            image: spec(&auth_ref),
            ..Default::default()
        })
        .await
        .expect_err("anonymous pull from the auth registry");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let creds = tb.auth_credentials();
    let pulled = c
        .pull_image(cri::PullImageRequest {
            image: spec(&auth_ref),
            auth: Some(cri::AuthConfig {
                username: creds.username.clone(),
                password: creds.password.clone(),
                server_address: tb.auth_registry().to_string(),
                ..Default::default()
            }),
            sandbox_config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "dh-pod".into(),
                    namespace: "dh-ns".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("pull with auth")
        .into_inner();
    let bb = index.get(BUSYBOX).expect("busybox");
    assert_eq!(pulled.image_ref, bb.config_digest);

    // A config image: uid from User, verbose status carries the config.
    let cfg_ref = index.pull_ref(CONFIG);
    let pulled = c
        .pull_image(cri::PullImageRequest {
            image: spec(&cfg_ref),
            ..Default::default()
        })
        .await
        .expect("pull config image")
        .into_inner();
    let st = c
        .image_status(cri::ImageStatusRequest {
            image: spec(&cfg_ref),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner();
    let img = st.image.expect("image present");
    assert_eq!(img.id, pulled.image_ref);
    assert_eq!(img.repo_tags, std::slice::from_ref(&cfg_ref));
    assert_eq!(
        img.repo_digests,
        [format!(
            "{}/dh/config@{}",
            index.registry,
            index.get(CONFIG).expect("config").manifest_digest
        )]
    );
    assert_eq!(img.uid, Some(cri::Int64Value { value: 1000 }));
    assert!(img.size > 1_000_000);
    let info: serde_json::Value =
        serde_json::from_str(st.info.get("info").expect("verbose info")).expect("json");
    assert_eq!(
        info.pointer("/imageSpec/config/User")
            .and_then(|v| v.as_str()),
        Some("1000:1000"),
        "{info}"
    );
    // By id too.
    let st = c
        .image_status(cri::ImageStatusRequest {
            image: spec(&img.id),
            verbose: false,
        })
        .await
        .expect("status by id")
        .into_inner();
    assert!(st.image.is_some() && st.info.is_empty());

    // Unknown image: empty response, not an error.
    let st = c
        .image_status(cri::ImageStatusRequest {
            image: spec("dh-unknown/image:none"),
            verbose: true,
        })
        .await
        .expect("status of unknown image")
        .into_inner();
    assert!(st.image.is_none());

    // List, with and without filter.
    let all = c
        .list_images(cri::ListImagesRequest { filter: None })
        .await
        .expect("list")
        .into_inner()
        .images;
    assert_eq!(all.len(), 2, "{all:?}");
    let filtered = c
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: spec(&cfg_ref),
            }),
        })
        .await
        .expect("list filtered")
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].id, img.id);

    // Filesystem info.
    let fs = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("fs info")
        .into_inner();
    let f = &fs.image_filesystems[0];
    assert!(f.used_bytes.as_ref().expect("bytes").value > 1_000_000);
    assert!(f.inodes_used.as_ref().expect("inodes").value > 10);
    assert_eq!(
        f.fs_id.as_ref().expect("fs id").mountpoint,
        d.root.display().to_string()
    );

    // Remove: unknown is fine; a known one disappears.
    c.remove_image(cri::RemoveImageRequest {
        image: spec("dh-unknown/image:none"),
    })
    .await
    .expect("removing an unknown image");
    c.remove_image(cri::RemoveImageRequest {
        image: spec(&cfg_ref),
    })
    .await
    .expect("remove");
    let st = c
        .image_status(cri::ImageStatusRequest {
            image: spec(&cfg_ref),
            verbose: false,
        })
        .await
        .expect("status after remove")
        .into_inner();
    assert!(st.image.is_none());

    // Graceful shutdown.
    drop(c);
    let status = d.terminate().await.expect("terminate");
    assert!(status.success(), "exit status {status}: {}", d.logs());
    assert!(!d.socket.exists(), "socket removed on shutdown");
}

/// A small deterministic generator (xorshift), seeded from the clock and printed.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn pull(d: &Daemon, image: &str) -> Result<cri::PullImageResponse, tonic::Status> {
    let mut c = client(d).await;
    c.pull_image(cri::PullImageRequest {
        image: spec(image),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn pull_killed_at_random_points_then_retried_gives_a_correct_image() {
    init_logs();
    let (_, index) = testbed();
    let rec = index.get(LAYERS).expect("layers");
    let expected = rec.expected_tree.clone().expect("tree");
    // Throttled so that kill points land in downloads and unpacks alike.
    let proxy = CountingProxy::start(&index.registry, Some(4 * 1024 * 1024)).await;
    let image = format!("{}/{LAYERS}", proxy.addr);

    // How long one pull takes.
    let base = TempRoot::new("cri-kill-base");
    let d = Daemon::start(&base.path, None).expect("start");
    let t0 = Instant::now();
    pull(&d, &image).await.expect("baseline pull");
    let full = t0.elapsed();
    drop(d);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("kill test: seed {seed}, full pull {full:?}");
    let mut rng = Rng(seed);
    for round in 0..6 {
        let dir = TempRoot::new("cri-kill");
        let mut kills = Vec::new();
        // Kill once or twice, at random points of the pull.
        for _ in 0..(1 + round % 2) {
            let d = Daemon::start(&dir.path, None).expect("start");
            let at = full.mul_f64(rng.next_f64() * 1.1);
            kills.push(at);
            let img = image.clone();
            let socket = d.socket.clone();
            let req = tokio::spawn(async move {
                let ch = deckhand_proto::unix::connect_path(&socket).await?;
                let _ = ImageServiceClient::new(ch)
                    .pull_image(cri::PullImageRequest {
                        image: spec(&img),
                        ..Default::default()
                    })
                    .await;
                Ok::<_, anyhow::Error>(())
            });
            tokio::time::sleep(at).await;
            drop(d); // SIGKILL
            let _ = req.await;
        }
        // Retry: a correct image.
        let mut d = Daemon::start(&dir.path, None).expect("restart");
        let got = pull(&d, &image).await.unwrap_or_else(|e| {
            panic!(
                "round {round} (kills at {kills:?}): retry failed: {e}\n{}",
                d.logs()
            )
        });
        assert_eq!(got.image_ref, rec.config_digest);
        assert!(d.terminate().await.expect("terminate").success());

        let mut opts = StoreOptions::new(&d.root);
        opts.stall_timeout = Duration::from_secs(20);
        let store = ImageStore::open(opts).expect("open store");
        let img = store.get(&image).expect("get").expect("image recorded");
        let spec = store
            .prepare("dh-kill-ctr", img.id().as_str())
            .expect("prepare");
        let target = dir.path.join("rootfs");
        std::fs::create_dir_all(&target).expect("mkdir");
        spec.mount(&target).expect("mount");
        let res = assert_tree(&target, &expected);
        deckhand_cri::image::snapshot::unmount(&target).expect("unmount");
        res.unwrap_or_else(|e| panic!("round {round} (seed {seed}, kills at {kills:?}): {e:#}"));
        store
            .remove_container("dh-kill-ctr")
            .expect("remove container");
        let tmp: Vec<_> = std::fs::read_dir(d.root.join("snapshots"))
            .expect("snapshots")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(tmp.is_empty(), "temporary snapshots left after open");
        assert_eq!(
            std::fs::read_dir(d.root.join("ingest"))
                .expect("ingest")
                .count(),
            0
        );
    }
}

/// A daemon restarted the way a service manager does it (SIGTERM, and the successor started at
/// once on the same state) hands over cleanly: the old one ends its event streams and exits
/// without waiting out its grace period, the new one waits for the state directory's lock and
/// then owns the socket, which the old one's exit does not remove.
// Multi-threaded: `Daemon::start` blocks, and the client connection must keep answering the
// old daemon's graceful-shutdown PING meanwhile (as a kubelet's would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_over_the_socket_and_state() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;
    use futures::StreamExt;
    init_logs();
    let dir = TempRoot::new("dh-cri-handover");
    let mut old = Daemon::start(&dir.path, None)?;
    let ch = deckhand_proto::unix::connect_path(&old.socket).await?;
    let mut events = RuntimeServiceClient::new(ch)
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner();
    // SIGTERM without waiting; the successor starts while the old one may still be stopping.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let new = Daemon::start(&dir.path, None)?;
    let status = old.terminate().await.context("the old daemon")?;
    ensure!(status.success(), "old daemon: {status}: {}", old.logs());
    ensure!(
        !old.logs().contains("requests still running"),
        "the old daemon waited for its event stream: {}",
        old.logs()
    );
    // The stream ended (the server closed it), rather than staying open.
    ensure!(
        events.next().await.is_none_or(|r| r.is_err()),
        "the event stream is still open"
    );
    ensure!(new.socket.exists(), "the successor's socket is gone");
    let ch = deckhand_proto::unix::connect_path(&new.socket).await?;
    let v = RuntimeServiceClient::new(ch)
        .version(cri::VersionRequest::default())
        .await
        .context("the successor answers")?
        .into_inner();
    ensure!(v.runtime_name == "deckhand", "{v:?}");
    Ok(())
}
