//! `deckhand-crictl`: a small CRI client for operators and scripts, with crictl's names for
//! the few commands it has (crictl itself is not packaged in Debian 12). Works against any CRI
//! v1 endpoint.
//!
//! ```text
//! deckhand-crictl [--runtime-endpoint unix:///run/deckhand/cri.sock] version
//! deckhand-crictl pods            # id, state, name, namespace, IP
//! deckhand-crictl ps [-a]         # id, pod, name, state, image
//! deckhand-crictl inspectp ID     # the PodSandboxStatus (verbose) as JSON-ish debug output
//! deckhand-crictl rmp [-a | ID…]  # stop and remove pods
//! ```

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use deckhand_proto::cri;
use deckhand_proto::cri::runtime_service_client::RuntimeServiceClient;

#[derive(Debug, Parser)]
#[command(name = "deckhand-crictl", version, about = "A small CRI client")]
struct Args {
    /// CRI endpoint (`unix:///path` or a path).
    #[arg(
        long,
        short = 'r',
        default_value = "unix:///run/deckhand/cri.sock",
        env = "CONTAINER_RUNTIME_ENDPOINT"
    )]
    runtime_endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The runtime's name and versions.
    Version,
    /// List pod sandboxes.
    Pods,
    /// List containers (running ones; all with -a).
    Ps {
        #[arg(short, long)]
        all: bool,
    },
    /// Show a pod sandbox's status.
    Inspectp { id: String },
    /// Stop and remove pod sandboxes.
    Rmp {
        #[arg(short, long)]
        all: bool,
        ids: Vec<String>,
    },
}

fn state_name(s: i32) -> &'static str {
    match cri::ContainerState::try_from(s) {
        Ok(cri::ContainerState::ContainerCreated) => "Created",
        Ok(cri::ContainerState::ContainerRunning) => "Running",
        Ok(cri::ContainerState::ContainerExited) => "Exited",
        _ => "Unknown",
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let ch = deckhand_proto::unix::connect(&args.runtime_endpoint)
            .await
            .with_context(|| format!("connecting to {}", args.runtime_endpoint))?;
        let mut c = RuntimeServiceClient::new(ch)
            .max_decoding_message_size(deckhand_proto::CRI_MAX_MESSAGE_SIZE);
        match args.cmd {
            Cmd::Version => {
                let v = c
                    .version(cri::VersionRequest::default())
                    .await?
                    .into_inner();
                println!("Version:  {}", v.version);
                println!("RuntimeName:  {}", v.runtime_name);
                println!("RuntimeVersion:  {}", v.runtime_version);
                println!("RuntimeApiVersion:  {}", v.runtime_api_version);
            }
            Cmd::Pods => {
                let pods = c
                    .list_pod_sandbox(cri::ListPodSandboxRequest::default())
                    .await?
                    .into_inner()
                    .items;
                println!(
                    "{:<14} {:<9} {:<30} {:<20} IP",
                    "POD ID", "STATE", "NAME", "NAMESPACE"
                );
                for p in pods {
                    let st = c
                        .pod_sandbox_status(cri::PodSandboxStatusRequest {
                            pod_sandbox_id: p.id.clone(),
                            verbose: false,
                        })
                        .await?
                        .into_inner();
                    let ip = st
                        .status
                        .and_then(|s| s.network)
                        .map(|n| n.ip)
                        .unwrap_or_default();
                    let md = p.metadata.unwrap_or_default();
                    let state = if p.state == cri::PodSandboxState::SandboxReady as i32 {
                        "Ready"
                    } else {
                        "NotReady"
                    };
                    println!(
                        "{:<14} {:<9} {:<30} {:<20} {ip}",
                        short(&p.id),
                        state,
                        md.name,
                        md.namespace
                    );
                }
            }
            Cmd::Ps { all } => {
                let filter = (!all).then(|| cri::ContainerFilter {
                    state: Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                });
                let list = c
                    .list_containers(cri::ListContainersRequest { filter })
                    .await?
                    .into_inner()
                    .containers;
                println!(
                    "{:<14} {:<14} {:<20} {:<8} IMAGE",
                    "CONTAINER", "POD ID", "NAME", "STATE"
                );
                for ct in list {
                    let md = ct.metadata.unwrap_or_default();
                    let image = ct.image.map(|i| i.image).unwrap_or_default();
                    println!(
                        "{:<14} {:<14} {:<20} {:<8} {image}",
                        short(&ct.id),
                        short(&ct.pod_sandbox_id),
                        md.name,
                        state_name(ct.state)
                    );
                }
            }
            Cmd::Inspectp { id } => {
                let st = c
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id,
                        verbose: true,
                    })
                    .await?
                    .into_inner();
                println!("{st:#?}");
            }
            Cmd::Rmp { all, ids } => {
                let ids = if all {
                    c.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                        .await?
                        .into_inner()
                        .items
                        .into_iter()
                        .map(|p| p.id)
                        .collect()
                } else {
                    ids
                };
                for id in ids {
                    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await
                    .with_context(|| format!("stopping {id}"))?;
                    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await
                    .with_context(|| format!("removing {id}"))?;
                    println!("Removed sandbox {id}");
                }
            }
        }
        Ok(())
    })
}
