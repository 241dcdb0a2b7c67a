//! `deckhand-cri`: the CRI daemon of a Deckhand node (ImageService and RuntimeService on the
//! built-in runtime).
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
//! cni_conf_dir = "/etc/cni/net.d"                 # --cni-conf-dir
//! cni_bin_dirs = ["/opt/cni/bin"]                 # --cni-bin-dir (repeatable)
//! monitor_bin = "/usr/local/bin/deckhand-monitor" # --monitor-bin (default: beside this binary)
//! runc_bin = "/usr/local/bin/deckhand-runc"       # --runc-bin (default: beside this binary)
//! streaming_addr = "127.0.0.1:0"                  # --streaming-addr: exec/port-forward server
//! ```
//!
//! Logs go to stderr (`RUST_LOG` or `--log-level`). SIGTERM or SIGINT stop it gracefully.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use deckhand_cri::image::{ImageStore, RegistryConfig, StoreOptions};
use deckhand_cri::{pod, server};
use serde::Deserialize;

const DEFAULT_CONFIG: &str = "/etc/deckhand/cri.toml";
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "deckhand-cri",
    version,
    about = "Deckhand's CRI runtime (ImageService and RuntimeService)"
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
    /// CNI configuration directory.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// CNI plugin directory (repeatable; searched in order).
    #[arg(long = "cni-bin-dir")]
    cni_bin_dirs: Vec<PathBuf>,
    /// The deckhand-monitor binary.
    #[arg(long)]
    monitor_bin: Option<PathBuf>,
    /// The deckhand-runc binary (used for exec).
    #[arg(long)]
    runc_bin: Option<PathBuf>,
    /// Address of the streaming server (exec, port-forward); port 0 picks one. Plain HTTP:
    /// keep it on loopback (the kubelet proxies to it).
    #[arg(long)]
    streaming_addr: Option<std::net::SocketAddr>,
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
    cni_conf_dir: Option<PathBuf>,
    cni_bin_dirs: Option<Vec<PathBuf>>,
    monitor_bin: Option<PathBuf>,
    runc_bin: Option<PathBuf>,
    streaming_addr: Option<std::net::SocketAddr>,
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
    // Before any thread starts (deckhand-malloc says why).
    let arenas_limited = deckhand_malloc::limit_arenas();
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
    if !arenas_limited {
        tracing::warn!("mallopt(M_ARENA_MAX) refused: malloc keeps its default arenas");
    }

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

    let mut pods = pod::Config::new(&root, &state_dir);
    if let Some(d) = args.cni_conf_dir.or(file.cni_conf_dir) {
        pods.cni_conf_dir = d;
    }
    if !args.cni_bin_dirs.is_empty() {
        pods.cni_bin_dirs = args.cni_bin_dirs;
    } else if let Some(d) = file.cni_bin_dirs {
        pods.cni_bin_dirs = d;
    }
    if let Some(b) = args.monitor_bin.or(file.monitor_bin) {
        pods.monitor_bin = b;
    }
    if let Some(b) = args.runc_bin.or(file.runc_bin) {
        pods.runc_bin = b;
    }
    for (what, b) in [("monitor", &pods.monitor_bin), ("runc", &pods.runc_bin)] {
        if !b.is_file() {
            anyhow::bail!("the {what} binary {} does not exist", b.display());
        }
    }
    let streaming_addr = args
        .streaming_addr
        .or(file.streaming_addr)
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
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
    let _lock = lock_state_dir(&state_dir)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        deckhand_malloc::spawn_trimmer(deckhand_malloc::QUIET, deckhand_malloc::MAX_DELAY);
        let store = ImageStore::open(opts).context("opening the image store")?;
        let manager = pod::Manager::open(pods, store.clone()).context("opening the pod records")?;
        let svc = server::image_service::ImageService::new(store);
        let streaming = deckhand_streaming::Server::new(
            deckhand_streaming::Config {
                addr: streaming_addr,
                ..Default::default()
            },
            Arc::new(pod::streaming::StreamRuntime(manager.clone())),
        );
        let bound = streaming
            .bind()
            .await
            .context("binding the streaming server")?;
        tracing::info!(addr = %bound, "streaming server (exec, port-forward)");
        let ss = streaming.clone();
        tokio::spawn(async move {
            if let Err(e) = ss.serve(std::future::pending::<()>()).await {
                tracing::error!(error = %e, "the streaming server stopped");
            }
        });
        // Graceful shutdown lets running requests finish, for at most SHUTDOWN_GRACE; event
        // streams end at once.
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let runtime = server::runtime_service::RuntimeService::new(
            manager,
            Some(Arc::new(streaming) as Arc<dyn server::runtime_service::Streaming>),
        )
        .with_shutdown(rx.clone());
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        let mut rx2 = rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        tokio::select! {
            res = server::serve(&socket, svc, Some(runtime), stop) => res.context("serving CRI")?,
            _ = async {
                let _ = rx2.wait_for(|v| *v).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}: exiting anyway");
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

/// How long a starting daemon waits for the one it replaces to let go of the state directory.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Takes `<state_dir>/deckhand-cri.lock` for the daemon's lifetime: two daemons on one state
/// directory would both adopt the same containers and sandboxes. A predecessor still shutting
/// down is waited for, up to [`LOCK_WAIT`].
fn lock_state_dir(state_dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = state_dir.join("deckhand-cri.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "another deckhand-cri holds {} (still running after {LOCK_WAIT:?})",
                        path.display()
                    );
                }
                if !told {
                    tracing::warn!(lock = %path.display(), "another deckhand-cri holds the state directory: waiting for it to exit");
                    told = true;
                }
                file = f;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err((_, e)) => {
                return Err(anyhow::Error::from(e).context(format!("locking {}", path.display())));
            }
        }
    }
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
