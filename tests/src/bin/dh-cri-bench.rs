//! `dh-cri-bench`: a CRI client and load generator that starts and stops pods the way the
//! kubelet does and measures each step (see [`deckhand_tests::cribench`]).
//!
//! ```text
//! dh-cri-bench --endpoint unix:///run/x.sock --image REF [--pods N] [--parallel N]
//!              [--mode seq|par|hold|probe|clean] [--cgroup-parent /dhbench] [--json]
//! ```
//!
//! * `seq`: starts N pods one after another (RunPodSandbox + CreateContainer + StartContainer,
//!   timed per pod), then tears them down one after another (StopPodSandbox + RemovePodSandbox).
//! * `par`: the same with up to `--parallel` (default N) starts, then teardowns, in flight.
//! * `hold`: starts N pods like `par`, prints `ready N` on stdout, waits for a line (or EOF) on
//!   stdin, SIGINT or SIGTERM, then tears them down and reports both phases.
//! * `probe`: calls Version and Status; exit code 3 when the endpoint has no RuntimeService.
//! * `clean`: removes every pod any run of this tool left on the endpoint.
//!
//! Images are checked and pulled (ImageStatus, PullImage) before any timing, and `--warmup`
//! pods (default 1) are started and stopped untimed. Every pod of a run is removed before the
//! tool exits, also on an error or on SIGINT/SIGTERM (a second signal exits at once).
//! Output: `key value` lines (`start.pod n=30 median_ms=… p99_ms=…`, `start.total_s …`), or one
//! JSON object with `--json`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use deckhand_tests::cribench::{Bench, PhaseReport, PodTemplate, Probe, RuntimeInfo};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Seq,
    Par,
    Hold,
    Probe,
    Clean,
}

#[derive(Debug, Parser)]
#[command(
    name = "dh-cri-bench",
    about = "Start and stop pods through a CRI endpoint as the kubelet does, and time each step"
)]
struct Args {
    /// CRI endpoint (`unix:///path` or a path).
    #[arg(long)]
    endpoint: String,
    /// The container image (from a registry the runtime can pull from).
    /// Required for seq, par and hold.
    #[arg(long)]
    image: Option<String>,
    /// Number of measured pods.
    #[arg(long, default_value_t = 30)]
    pods: usize,
    /// Starts (and teardowns) in flight at once; default 1 for seq, all pods otherwise.
    #[arg(long)]
    parallel: Option<usize>,
    #[arg(long, value_enum, default_value_t = Mode::Seq)]
    mode: Mode,
    /// cgroupfs parent of the pods' cgroups: each pod gets `<parent>/pod<uid>`.
    #[arg(long, default_value = "/dhbench")]
    cgroup_parent: String,
    /// Directory under which each pod's log directory is made.
    #[arg(long, default_value = "/tmp/dh-cri-bench-logs")]
    log_root: PathBuf,
    /// The container's command, split at whitespace.
    #[arg(long, default_value = "sleep 3600")]
    command: String,
    /// Untimed pods started and stopped before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// More images to check and pull before the timing (e.g. the runtime's sandbox image).
    #[arg(long)]
    pull: Vec<String>,
    /// CRI runtime handler (empty: the runtime's default).
    #[arg(long, default_value = "")]
    runtime_handler: String,
    /// The run's id, the value of the `io.deckhand.bench.run` label on its pods.
    #[arg(long)]
    run_id: Option<String>,
    /// Print one JSON object instead of `key value` lines.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    endpoint: String,
    runtime: RuntimeInfo,
    mode: Mode,
    pods: usize,
    parallel: usize,
    start: PhaseReport,
    stop: PhaseReport,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let code = rt.block_on(run(args))?;
    // The stdin reader of `hold` may still be blocked in read(2): do not wait for it.
    rt.shutdown_background();
    std::process::exit(code);
}

async fn run(args: Args) -> Result<i32> {
    if args.pods == 0 {
        bail!("--pods must be at least 1");
    }
    if args.image.is_none() && matches!(args.mode, Mode::Seq | Mode::Par | Mode::Hold) {
        bail!(
            "--image is required for --mode {}",
            format!("{:?}", args.mode).to_lowercase()
        );
    }
    let command: Vec<String> = args.command.split_whitespace().map(String::from).collect();
    if command.is_empty() {
        bail!("--command is empty");
    }
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("dhb{}", std::process::id()));
    let bench = Bench::connect(&args.endpoint, &run_id).await?;
    let template = PodTemplate {
        image: args.image.clone().unwrap_or_default(),
        command,
        cgroup_parent: args.cgroup_parent.clone(),
        log_root: args.log_root.clone(),
        runtime_handler: args.runtime_handler.clone(),
    };

    let info = match bench.probe().await? {
        Probe::Ready(info) => info,
        Probe::NoRuntimeService(msg) => {
            println!("no-runtime-service {msg}");
            return Ok(3);
        }
    };
    match args.mode {
        Mode::Probe => {
            println!(
                "runtime name={} version={} api={} runtime_ready={} network_ready={}",
                info.name, info.version, info.api_version, info.runtime_ready, info.network_ready
            );
            return Ok(0);
        }
        Mode::Clean => {
            let n = bench.cleanup_all(&template).await?;
            println!("removed {n}");
            return Ok(0);
        }
        _ => {}
    }

    let signalled = watch_signals(bench.clone())?;
    let result = measure(&args, &bench, &template, &info, signalled).await;
    // Whatever happened, nothing of this run stays behind.
    let cleanup = bench.cleanup(&template).await;
    if bench.is_cancelled() && result.is_err() {
        cleanup.context("removing the run's pods after a signal")?;
        eprintln!("dh-cri-bench: interrupted; every pod of this run is removed");
        return Ok(130);
    }
    let report = result?;
    match cleanup {
        Ok(0) => {}
        Ok(n) => tracing::warn!("{n} pods were still there after the run and are removed"),
        Err(e) => return Err(e.context("removing the run's pods")),
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!(
            "runtime name={} version={}\nmode {} pods={} parallel={}\n{}{}",
            report.runtime.name,
            report.runtime.version,
            format!("{:?}", report.mode).to_lowercase(),
            report.pods,
            report.parallel,
            report.start.text("start"),
            report.stop.text("stop")
        );
    }
    Ok(0)
}

async fn measure(
    args: &Args,
    bench: &Bench,
    t: &PodTemplate,
    info: &RuntimeInfo,
    mut signalled: tokio::sync::watch::Receiver<bool>,
) -> Result<Report> {
    if !info.runtime_ready || !info.network_ready {
        tracing::warn!(
            runtime_ready = info.runtime_ready,
            network_ready = info.network_ready,
            "the runtime does not report itself ready"
        );
    }
    for image in std::iter::once(&t.image).chain(&args.pull) {
        bench.ensure_image(image).await?;
    }
    let n = args.pods;
    let parallel = args
        .parallel
        .unwrap_or(if args.mode == Mode::Seq { 1 } else { n })
        .max(1);

    if args.warmup > 0 {
        let mut pods = Vec::new();
        let r = bench.start_pods(t, 0..args.warmup, 1, &mut pods).await;
        let (_, _, err) = bench.stop_pods(t, pods, 1).await;
        r.context("warm-up")?;
        if let Some(e) = err {
            return Err(e.context("warm-up teardown"));
        }
    }

    let first = args.warmup;
    let mut pods = Vec::new();
    let started = bench
        .start_pods(t, first..first + n, parallel, &mut pods)
        .await;
    let start_wall = match started {
        Ok(w) => w,
        Err(e) => {
            let _ = bench.stop_pods(t, pods, parallel).await;
            return Err(e.context("starting the pods"));
        }
    };
    let start = PhaseReport::starts(&pods, start_wall);

    if args.mode == Mode::Hold {
        println!("ready {}", pods.len());
        std::io::stdout().flush().context("stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A plain thread: a blocked read(2) of stdin must not hold up the runtime's exit.
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            let _ = tx.send(());
        });
        tokio::select! {
            _ = rx => {}
            _ = signalled.wait_for(|s| *s) => {}
        }
    }

    let (timings, stop_wall, err) = bench.stop_pods(t, pods, parallel).await;
    if let Some(e) = err {
        return Err(e.context("tearing the pods down"));
    }
    Ok(Report {
        endpoint: args.endpoint.clone(),
        runtime: info.clone(),
        mode: args.mode,
        pods: n,
        parallel,
        start,
        stop: PhaseReport::stops(&timings, stop_wall),
    })
}

/// First SIGINT/SIGTERM: no new steps start, `hold` proceeds to the teardown, the run cleans
/// up. Second: exit at once.
fn watch_signals(bench: Bench) -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen > 1 {
                eprintln!("dh-cri-bench: second signal: exiting without cleaning up");
                std::process::exit(130);
            }
            eprintln!("dh-cri-bench: signal: stopping and removing this run's pods");
            // Teardowns are not cancelled: only new start steps are refused.
            bench.cancel();
            let _ = tx.send(true);
        }
    });
    Ok(rx)
}
