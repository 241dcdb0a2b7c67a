//! `dh-testimages`: builds Deckhand's test images reproducibly from busybox-static and pushes them
//! to a plain-HTTP registry, writing a JSON index of what was pushed (see
//! [`deckhand_tests::images`]).
//!
//! ```text
//! dh-testimages push --registry 127.0.0.1:5000 [--username U --password P] \
//!     [--registry-storage DIR] --index-out FILE
//! dh-testimages list
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use deckhand_tests::images::{self, BuildOptions, PushOptions};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "dh-testimages",
    about = "Build Deckhand's test images reproducibly and push them to a registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build every image and push it to a plain-HTTP registry; write the JSON index.
    Push(PushArgs),
    /// Build every image and print the catalog: reference, media type, digest, description.
    List {
        /// The static busybox binary to build from.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct PushArgs {
    /// `host:port` of the registry (plain HTTP).
    #[arg(long)]
    registry: String,
    /// User name for HTTP basic auth.
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// Password for HTTP basic auth.
    #[arg(
        long,
        env = "DH_TESTIMAGES_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    password: Option<String>,
    /// The registry's filesystem storage root, to corrupt the `dh/hostile:badlayer` blob in it
    /// (without it, that image is skipped and marked so in the index).
    #[arg(long)]
    registry_storage: Option<PathBuf>,
    /// Where to write the JSON index.
    #[arg(long)]
    index_out: PathBuf,
    /// The static busybox binary to build from.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Push(args) => push(args).await,
        Command::List { busybox } => list(busybox),
    }
}

async fn push(args: PushArgs) -> Result<()> {
    let t = Instant::now();
    let catalog = images::build_catalog(&BuildOptions {
        busybox: args.busybox,
    })
    .context("building the test images")?;
    info!(
        images = catalog.images.len(),
        ms = t.elapsed().as_millis() as u64,
        "built"
    );
    let index = images::push_catalog(
        &catalog,
        &PushOptions {
            registry: args.registry.clone(),
            username: args.username,
            password: args.password,
            registry_storage: args.registry_storage,
        },
    )
    .await
    .with_context(|| format!("pushing the test images to {}", args.registry))?;
    index.save(&args.index_out)?;
    info!(index = %args.index_out.display(), "index written");
    Ok(())
}

fn list(busybox: PathBuf) -> Result<()> {
    let catalog =
        images::build_catalog(&BuildOptions { busybox }).context("building the test images")?;
    for image in &catalog.images {
        let r = &image.record;
        println!(
            "{:<28} {:<56} {}  {}",
            r.reference, r.manifest_media_type, r.manifest_digest, r.description
        );
    }
    Ok(())
}
