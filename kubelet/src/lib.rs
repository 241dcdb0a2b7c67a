//! `deckhand-kubelet`: the node agent of a Deckhand node.
//!
//! It talks only to the API server (kube-rs) and to a CRI v1 runtime over its unix socket
//! (deckhand-cri, or containerd's CRI). Implemented today, the API-facing node agent:
//!
//! * [`config`]: upstream's flags and the `KubeletConfiguration` file (upstream names and
//!   defaults, unsupported fields warned about).
//! * [`node`]: Node registration (labels, addresses, capacity/allocatable, nodeInfo,
//!   daemonEndpoints), reconciliation of an existing Node, re-registration after deletion, the
//!   pod CIDR handed to the runtime, and node status (conditions, images) patched when it changes
//!   and at least every `nodeStatusReportFrequency`.
//! * [`lease`]: the node Lease in `kube-node-lease`, renewed every quarter of its duration.
//! * [`conditions`], [`eviction`], [`resources`], [`machine`], [`quantity`]: the pure parts
//!   (Ready and pressure conditions, eviction thresholds, capacity and allocatable, machine
//!   facts, resource quantities).
//! * [`runtime`]: the CRI client; [`reconcile`]: the kube-rs style driver (reconcilers return
//!   when to run again and are woken by events; there is no global polling loop).
//!
//! * [`pods`]: pod sources (API watch, static-pod directory, mirror pods), one worker per pod
//!   (sandbox, volumes, images with pull secrets, env, init and main containers, probes,
//!   lifecycle hooks, restarts with back-off, graceful deletion) and pod status.
//! * [`cgroups`]: the `kubepods` node allocatable, QoS and pod cgroups (upstream's cgroupfs
//!   driver with cgroupsPerQOS), pod-level limits before each sandbox.
//! * [`events`]: core/v1 Events about pods, never blocking a reconcile.
//! * [`server`]: the kubelet's HTTPS API on `address:port` (logs, exec, attach, port-forward,
//!   run, pods, healthz) with x509/TokenReview authentication and Webhook authorization.
//!
//! Standalone mode (no `--kubeconfig`) runs static pods only. Not implemented yet (see the
//! kubelet issue): PVC/CSI volumes (refused at admission), eviction of pods, critical-pod
//! preemption.

pub mod cgroups;
pub mod conditions;
pub mod config;
pub mod events;
pub mod eviction;
pub mod lease;
pub mod machine;
pub mod node;
pub mod pods;
pub mod quantity;
pub mod reconcile;
pub mod resources;
pub mod runtime;
pub mod server;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{Config, Flags, KubeletConfiguration};
pub use node::{KUBELET_VERSION, NodeState};

/// An error that stops the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The root dir could not be created.
    #[error("creating the root dir {path}: {source}")]
    RootDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The machine could not be read.
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    /// No node IP was given and none could be found.
    #[error("cannot determine the node IP; set --node-ip")]
    NoNodeIp,
    /// The kubelet's HTTPS API could not be set up (TLS files, the port).
    #[error("the kubelet API: {0}")]
    Server(#[from] server::ServerError),
    /// The node allocatable or QoS cgroups could not be set up.
    #[error("cgroups: {0}")]
    Cgroups(#[from] cgroups::CgroupError),
}

/// How often the node allocatable and QoS cgroups are applied again (upstream's QoS container
/// manager: every minute).
const CGROUP_RESYNC: std::time::Duration = std::time::Duration::from_secs(60);

/// Sets up the kubelet's cgroups on the blocking pool ([`cgroups::PodCgroups::start`]).
async fn start_cgroups(
    config: &Config,
    machine: &machine::MachineInfo,
) -> Result<Arc<cgroups::PodCgroups>, Error> {
    let kc = &config.kubelet;
    let capacity = resources::capacity(machine, None, kc.max_pods, kc.pods_per_core);
    let max_pids = machine::pid_stats().ok().map(|p| p.max);
    let page_sizes = machine.huge_pages.iter().map(|h| h.page_size).collect();
    let settings = cgroups::Settings::from_config(kc);
    let pc = Arc::new(cgroups::PodCgroups::new(
        settings, &capacity, max_pids, page_sizes,
    )?);
    let p = pc.clone();
    tokio::task::spawn_blocking(move || p.start())
        .await
        .map_err(|e| cgroups::CgroupError::Task(e.to_string()))??;
    let n = pc.node_allocatable();
    tracing::info!(
        cgroup_root = %pc.settings().root,
        per_qos = pc.settings().per_qos,
        enforce_pods = pc.settings().enforce_pods,
        cpu_shares = ?n.cpu_shares,
        memory = ?n.memory,
        pids = ?n.pids,
        "cgroups"
    );
    Ok(pc)
}

/// Applies the node allocatable and QoS cgroups again every [`CGROUP_RESYNC`].
async fn resync_cgroups(pc: Arc<cgroups::PodCgroups>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CGROUP_RESYNC) => {}
        }
        let p = pc.clone();
        match tokio::task::spawn_blocking(move || p.start()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("updating the QoS cgroups: {e}"),
            Err(e) => tracing::warn!("updating the QoS cgroups: {e}"),
        }
    }
}

/// Builds a client of the API server from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, Error> {
    let err = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| err(e.to_string()))?;
    // As upstream's `kubelet/<version> (<os>/<arch>)`: the API server's logs and managedFields
    // name the kubelet by it.
    let agent = format!(
        "deckhand-kubelet/{KUBELET_VERSION} ({}/{})",
        std::env::consts::OS,
        machine::go_arch(std::env::consts::ARCH)
    );
    let agent = http::HeaderValue::from_str(&agent).map_err(|e| err(e.to_string()))?;
    config.headers.push((http::header::USER_AGENT, agent));
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// Runs the kubelet until `shutdown` is cancelled. On shutdown the Lease is no longer renewed
/// and the Node is left in place, as upstream.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    std::fs::create_dir_all(&config.root_dir).map_err(|source| Error::RootDir {
        path: config.root_dir.clone(),
        source,
    })?;
    let runtime = Arc::new(runtime::RuntimeClient::new(
        config.kubelet.container_runtime_endpoint.clone(),
        config.kubelet.runtime_request_timeout,
    ));
    let version = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        v = runtime.version() => v,
    };
    match version {
        Ok(v) => tracing::info!(
            endpoint = runtime.endpoint(),
            runtime = %v.runtime_name,
            version = %v.runtime_version,
            cri = %v.runtime_api_version,
            "container runtime"
        ),
        Err(e) => tracing::warn!(
            endpoint = runtime.endpoint(),
            "container runtime not reachable yet: {e}"
        ),
    }
    let config = Arc::new(config);
    match config.kubeconfig.clone() {
        None => standalone(config, runtime, shutdown).await,
        Some(path) => {
            let client = client_from_kubeconfig(&path).await?;
            cluster(config, client, runtime, shutdown).await
        }
    }
}

/// Starts the pod manager, its sources and runtime events; with a client, the API source and
/// the mirror pods too.
struct PodsSetup {
    client: Option<kube::Client>,
    runtime: Arc<runtime::RuntimeClient>,
    memory_capacity: u64,
    machine: machine::MachineInfo,
    node_ip: Option<std::net::IpAddr>,
    node_state: Option<watch::Receiver<NodeState>>,
    cgroups: Arc<cgroups::PodCgroups>,
}

fn start_pods(
    config: &Arc<Config>,
    setup: PodsSetup,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let PodsSetup {
        client,
        runtime,
        memory_capacity,
        machine,
        node_ip,
        node_state,
        cgroups,
    } = setup;
    tasks.spawn(resync_cgroups(cgroups.clone(), shutdown.clone()));
    let host_dns = std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| pods::spec::parse_resolv_conf(&t))
        .unwrap_or_default();
    // One list+watch of Services shared by every pod worker, for service variables.
    let services = client.as_ref().map(|c| {
        let (cache, task) = pods::services::ServiceCache::start(c.clone(), shutdown.clone());
        tasks.spawn(task);
        cache
    });
    let ctx = Arc::new(pods::worker::Context {
        runtime: runtime.clone(),
        client: client.clone(),
        node_name: config.node_name.clone(),
        node_ip: node_ip.map(|i| i.to_string()).unwrap_or_default(),
        logs_root: config.kubelet.pod_logs_dir.clone(),
        pods_dir: config.root_dir.join("pods"),
        memory_capacity,
        cluster_dns: config.kubelet.cluster_dns.clone(),
        cluster_domain: config.kubelet.cluster_domain.clone(),
        host_dns,
        runtime_name: Default::default(),
        events: match &client {
            Some(c) => events::Recorder::new(c.clone(), config.node_name.clone(), shutdown.clone()),
            None => events::Recorder::logging(),
        },
        exec: Arc::new(pods::probes::ExecClient::new(
            config.kubelet.container_runtime_endpoint.clone(),
        )),
        services,
        node: pods::worker::LocalNode {
            config: config.clone(),
            machine,
        },
        cgroups,
    });
    let mut sources = std::collections::HashSet::new();
    if client.is_some() {
        sources.insert(pods::Source::Api);
    }
    if config.kubelet.static_pod_path.is_some() {
        sources.insert(pods::Source::File);
    }
    let (manager, tx, rx) = pods::PodManager::new(ctx, sources, shutdown.clone());
    let statics = manager.statics();
    // The kubelet's HTTPS API (logs, exec, attach, port-forward).
    let server = server::Server::new(
        config,
        server::ServerContext {
            runtime: runtime.clone(),
            client: client.clone(),
            node_ip,
            statics: Some(manager.statics()),
        },
    )?;
    tasks.spawn(server::run(server, shutdown.clone()));
    let mirrors = manager.mirrors();
    tasks.spawn(manager.run(rx));
    tasks.spawn(pods::runtime_events(
        runtime,
        config.node_name.clone(),
        tx.clone(),
        shutdown.clone(),
    ));
    if let Some(dir) = config.kubelet.static_pod_path.clone() {
        tasks.spawn(pods::file_source(
            dir,
            config.node_name.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(client) = client {
        tasks.spawn(pods::api_source(
            client.clone(),
            config.node_name.clone(),
            tx,
            shutdown.clone(),
        ));
        if config.kubelet.static_pod_path.is_some()
            && let Some(node) = node_state
        {
            let trigger = reconcile::Trigger::default();
            let stop = shutdown.clone();
            let node_name = config.node_name.clone();
            tasks.spawn(async move {
                // Mirror pods are judged only once both sets are known.
                let (mut s, mut m) = (statics.clone(), mirrors.clone());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = async { s.changed().await.and(m.changed().await) } => if r.is_err() { return },
                }
                let controller = pods::mirror::MirrorController::new(
                    client,
                    node_name,
                    statics.clone(),
                    mirrors.clone(),
                    node.clone(),
                );
                tokio::spawn(pods::mirror::MirrorController::forward_changes(
                    statics,
                    mirrors,
                    node,
                    trigger.clone(),
                    stop.clone(),
                ));
                reconcile::run(controller, trigger, stop).await;
            });
        }
    }
    Ok(())
}

async fn standalone(
    config: Arc<Config>,
    runtime: Arc<runtime::RuntimeClient>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    tracing::info!(
        node = %config.node_name,
        static_pod_path = ?config.kubelet.static_pod_path,
        "standalone mode: no API server"
    );
    if let Some(cidr) = &config.kubelet.pod_cidr
        && let Err(e) = runtime.update_pod_cidr(cidr).await
    {
        tracing::warn!(pod_cidr = %cidr, "updating the runtime's pod CIDR: {e}");
    }
    let machine = machine::MachineInfo::collect()?;
    let node_ip = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        ip = node::resolve_node_ip(&config) => ip,
    };
    let cgroups = start_cgroups(&config, &machine).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let setup = PodsSetup {
        client: None,
        runtime,
        memory_capacity: machine.memory_bytes,
        machine: machine.clone(),
        node_ip,
        node_state: None,
        cgroups,
    };
    start_pods(&config, setup, &mut tasks, &shutdown)?;
    shutdown.cancelled().await;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!("task failed: {e}");
        }
    }
    tracing::info!("shut down");
    Ok(())
}

async fn cluster(
    config: Arc<Config>,
    client: kube::Client,
    runtime: Arc<runtime::RuntimeClient>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let machine = machine::MachineInfo::collect()?;
    let node_ip = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        ip = node::resolve_node_ip(&config) => ip.ok_or(Error::NoNodeIp)?,
    };
    tracing::info!(
        node = %config.node_name,
        %node_ip,
        version = KUBELET_VERSION,
        "starting against the API server"
    );
    let (state_tx, state_rx) = watch::channel(NodeState::default());
    let node_trigger = reconcile::Trigger::default();
    let lease_trigger = reconcile::Trigger::default();
    let cgroups = start_cgroups(&config, &machine).await?;
    let mut tasks = tokio::task::JoinSet::new();

    let setup = PodsSetup {
        client: Some(client.clone()),
        runtime: runtime.clone(),
        memory_capacity: machine.memory_bytes,
        machine: machine.clone(),
        node_ip: Some(node_ip),
        node_state: Some(state_rx.clone()),
        cgroups,
    };
    start_pods(&config, setup, &mut tasks, &shutdown)?;
    let controller = node::NodeController::new(
        client.clone(),
        config.clone(),
        runtime,
        machine,
        node_ip,
        state_tx,
    );
    tasks.spawn(reconcile::run(
        controller,
        node_trigger.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(node::watch_node(
        client.clone(),
        config.node_name.clone(),
        node_trigger,
        shutdown.clone(),
    ));

    let lease = lease::LeaseController::new(
        client,
        &config.node_name,
        config.kubelet.node_lease_duration_seconds,
        state_rx.clone(),
    );
    tasks.spawn(reconcile::run(
        lease,
        lease_trigger.clone(),
        shutdown.clone(),
    ));
    // A new Node UID (registration, re-registration) renews the Lease's ownerReference now.
    let mut uid_rx = state_rx;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut uid = uid_rx.borrow().uid.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = uid_rx.changed() => if r.is_err() { return },
            }
            let now = uid_rx.borrow().uid.clone();
            if now != uid {
                uid = now;
                lease_trigger.notify_one();
            }
        }
    });

    shutdown.cancelled().await;
    tracing::info!("shutting down: the lease is no longer renewed, the node is left in place");
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!("task failed: {e}");
        }
    }
    tracing::info!("shut down");
    Ok(())
}
