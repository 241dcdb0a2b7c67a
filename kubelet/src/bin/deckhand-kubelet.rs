//! `deckhand-kubelet`: parses the flags, sets up logging and TLS, handles SIGTERM/SIGINT and
//! runs [`deckhand_kubelet::run`].

use std::process::ExitCode;

use clap::Parser;
use deckhand_kubelet::{Config, Flags};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Before any thread starts (deckhand-malloc says why).
    let arenas_limited = deckhand_malloc::limit_arenas();
    let flags = Flags::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(flags.log_filter()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if !arenas_limited {
        tracing::warn!("mallopt(M_ARENA_MAX) refused: malloc keeps its default arenas");
    }
    // rustls needs a process-wide provider; another part of the process may have set it already.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (config, warnings) = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for w in warnings {
        tracing::warn!("{w}");
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(config: Config) -> anyhow::Result<()> {
    deckhand_malloc::spawn_trimmer(deckhand_malloc::QUIET, deckhand_malloc::MAX_DELAY);
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("received {name}");
        stop.cancel();
    });
    deckhand_kubelet::run(config, shutdown).await?;
    Ok(())
}
