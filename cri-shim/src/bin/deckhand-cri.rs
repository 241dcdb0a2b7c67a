//! `deckhand-cri`: the CRI daemon of a Deckhand node (today: the ImageService).
//!
//! Configuration: a TOML file (default `/etc/deckhand/cri.toml`; a missing default file is an
//! empty configuration), every key overridable by a flag:
//!
//! ```toml
//! socket = "/run/deckhand/cri.sock"               # --socket
//! root = "/var/lib/deckhand"                      # --root: images, snapshots, records
//! state_dir = "/run/deckhand"                     # --state-dir: runtime state (not persistent)
//! registry_config = "/etc/deckhand/registries.toml" # --registry-config (see deckhand_cri::image::registry)
//! max_concurrent_downloads = 3                    # --max-concurrent-downloads
//! stall_timeout_secs = 60                         # --stall-timeout-secs
//! allow_devices = false                           # --allow-devices: device nodes in layers
//! ```
//!
//! Logs go to stderr (`RUST_LOG` or `--log-level`). SIGTERM or SIGINT stop it gracefully.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use deckhand_cri::image::{ImageStore, RegistryConfig, StoreOptions};
use deckhand_cri::server;
use serde::Deserialize;

const DEFAULT_CONFIG: &str = "/etc/deckhand/cri.toml";
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "deckhand-cri",
    version,
    about = "Deckhand's CRI runtime (ImageService)"
)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// CRI socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Root directory for images, snapshots and records.
    #[arg(long)]
    root: Option<PathBuf>,
    /// State directory (non-persistent runtime state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Registry configuration file (TOML: mirrors, plain HTTP, CA files, credentials).
    #[arg(long)]
    registry_config: Option<PathBuf>,
    /// Parallel layer downloads.
    #[arg(long)]
    max_concurrent_downloads: Option<usize>,
    /// Seconds without data after which a download fails.
    #[arg(long)]
    stall_timeout_secs: Option<u64>,
    /// Allow device nodes in image layers.
    #[arg(long)]
    allow_devices: bool,
    /// Log filter (overrides RUST_LOG), e.g. `info` or `deckhand_cri=debug`.
    #[arg(long, env = "DECKHAND_LOG")]
    log_level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    registry_config: Option<PathBuf>,
    max_concurrent_downloads: Option<usize>,
    stall_timeout_secs: Option<u64>,
    #[serde(default)]
    allow_devices: bool,
}

fn load_file(path: &Path) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG) => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = match &args.log_level {
        Some(l) => tracing_subscriber::EnvFilter::new(l),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let file = load_file(&args.config)?;
    let socket = args
        .socket
        .or(file.socket)
        .unwrap_or_else(|| PathBuf::from("/run/deckhand/cri.sock"));
    let root = args
        .root
        .or(file.root)
        .unwrap_or_else(|| PathBuf::from("/var/lib/deckhand"));
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from("/run/deckhand"));
    let (registry_path, must_exist) = match args.registry_config.or(file.registry_config) {
        Some(p) => (p, true),
        None => (PathBuf::from("/etc/deckhand/registries.toml"), false),
    };
    let registry = RegistryConfig::load(&registry_path, must_exist)?;

    let mut opts = StoreOptions::new(root);
    opts.registry = registry;
    if let Some(n) = args
        .max_concurrent_downloads
        .or(file.max_concurrent_downloads)
    {
        opts.max_concurrent_downloads = n.max(1);
    }
    if let Some(s) = args.stall_timeout_secs.or(file.stall_timeout_secs) {
        opts.stall_timeout = Duration::from_secs(s.max(1));
    }
    opts.unpack.allow_devices = args.allow_devices || file.allow_devices;

    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let store = ImageStore::open(opts).context("opening the image store")?;
        let svc = server::image_service::ImageService::new(store);
        // Graceful shutdown lets running requests finish, for at most SHUTDOWN_GRACE.
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        let mut rx2 = rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        tokio::select! {
            res = server::serve(&socket, svc, stop) => res.context("serving CRI")?,
            _ = async {
                let _ = rx2.wait_for(|v| *v).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}: exiting anyway");
                let _ = std::fs::remove_file(&socket);
            }
        }
        tracing::info!("stopped");
        Ok::<(), anyhow::Error>(())
    })?;
    // Do not wait for blocking tasks (an unpack) of abandoned requests: everything on disk is
    // crash-safe.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
