//! `deckhand-cri-pull`: a minimal CRI image client for scripts and benchmarks (crictl is not
//! packaged in Debian 12). Pulls an image through any CRI endpoint's ImageService and prints
//! the image id and the time the pull took.
//!
//! ```text
//! deckhand-cri-pull --endpoint unix:///run/deckhand/cri.sock docker.io/library/busybox:latest
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use deckhand_proto::cri;
use deckhand_proto::cri::image_service_client::ImageServiceClient;

#[derive(Debug, Parser)]
#[command(
    name = "deckhand-cri-pull",
    version,
    about = "Pull an image through a CRI endpoint"
)]
struct Args {
    /// CRI endpoint (`unix:///path` or a path).
    #[arg(long, default_value = "unix:///run/deckhand/cri.sock")]
    endpoint: String,
    /// Basic credentials `user:password` for the image's registry.
    #[arg(long, env = "DH_PULL_CREDS")]
    creds: Option<String>,
    /// The image reference.
    image: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let ch = deckhand_proto::unix::connect(&args.endpoint).await?;
        let mut client = ImageServiceClient::new(ch)
            .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE);
        let auth = args.creds.as_deref().map(|c| {
            let (u, p) = c.split_once(':').unwrap_or((c, ""));
            cri::AuthConfig {
                username: u.to_string(),
                password: p.to_string(),
                ..Default::default()
            }
        });
        let start = Instant::now();
        let resp = client
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: args.image.clone(),
                    ..Default::default()
                }),
                auth,
                sandbox_config: None,
            })
            .await
            .with_context(|| format!("pulling {}", args.image))?
            .into_inner();
        println!("{} {:.3}s", resp.image_ref, start.elapsed().as_secs_f64());
        Ok(())
    })
}
