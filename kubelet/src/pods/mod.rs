//! The kubelet's pods: sources, one worker per pod, runtime events and mirror pods.
//!
//! * Sources send [`ManagerEvent`]s to the [`PodManager`]: [`api_source`] (list+watch of pods
//!   with `spec.nodeName=<node>` through kube's watcher, which resumes from the last
//!   resourceVersion after a disconnect and relists only on 410 Gone) and the static-pod
//!   directory ([`static_pods`]).
//! * The manager keeps the desired state per pod UID and runs one [`worker::PodWorker`] per UID
//!   on [`crate::reconcile::run`], waking it when its pod changes or the runtime reports a
//!   change of its containers. Once every source has synced, runtime sandboxes of this node
//!   whose pod is gone are stopped and removed by a worker with no desired pod (orphans).
//! * [`runtime_events`]: `GetContainerEvents` when the runtime has it; otherwise (containerd
//!   1.6) a relist every [`RELIST_PERIOD`] as the safety net.
//! * [`mirror::MirrorController`] keeps a mirror pod on the API server for every static pod.

pub mod env;
pub mod hooks;
pub mod mirror;
pub mod probes;
pub mod secrets;
pub mod spec;
pub mod static_pods;
pub mod status;
pub mod volumes;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::reconcile::{self, Trigger};
use crate::runtime::RuntimeClient;
use spec::{CONFIG_MIRROR, POD_NAME_LABEL, POD_NAMESPACE_LABEL, POD_UID_LABEL};

/// How often the runtime is relisted when it has no event stream.
pub const RELIST_PERIOD: Duration = Duration::from_secs(2);

/// Where a pod comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The API server.
    Api,
    /// The static-pod directory.
    File,
    /// Found in the runtime only.
    Orphan,
}

/// A pod's desired state.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The pod (the latest version the source gave).
    pub pod: Arc<Pod>,
    /// Its source.
    pub source: Source,
    /// Gone from its source: stop it.
    pub removed: bool,
}

/// What the manager is told.
#[derive(Debug)]
pub enum ManagerEvent {
    /// A pod added or changed.
    Upsert(Source, Box<Pod>),
    /// A pod gone from its source.
    Remove(Source, String),
    /// The complete set of a source's pods (after a list or a rescan).
    Synced(Source, Vec<Pod>),
    /// A worker finished (its pod is gone from the runtime).
    WorkerDone(String),
    /// The runtime changed for these pod UIDs.
    RuntimeChanged(Vec<String>),
    /// The pods the runtime has for this node, with their grace periods (for orphans).
    RuntimePods(Vec<(String, String, String, i64)>),
}

struct Handle {
    desired: watch::Sender<Desired>,
    trigger: Trigger,
    stop: CancellationToken,
}

/// Keeps the desired pods and their workers.
pub struct PodManager {
    ctx: Arc<worker::Context>,
    workers: HashMap<String, Handle>,
    tx: mpsc::UnboundedSender<ManagerEvent>,
    synced: HashSet<Source>,
    sources: HashSet<Source>,
    statics: watch::Sender<BTreeMap<String, Pod>>,
    mirrors: watch::Sender<BTreeMap<String, Pod>>,
    shutdown: CancellationToken,
}

fn uid_of(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone().filter(|u| !u.is_empty())
}

fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CONFIG_MIRROR))
}

/// Whether a new version of a pod changes what its worker does (spec, labels, annotations,
/// deletion), as upstream's pod config ignores status-only updates.
fn desired_changed(old: &Pod, new: &Pod) -> bool {
    let (a, b) = (&old.metadata, &new.metadata);
    old.spec != new.spec
        || a.labels != b.labels
        || a.annotations != b.annotations
        || a.deletion_timestamp != b.deletion_timestamp
        || a.deletion_grace_period_seconds != b.deletion_grace_period_seconds
}

impl PodManager {
    /// A manager; `sources` are those whose first sync gates orphan collection. Returns it
    /// with the sender sources and runtime events use.
    pub fn new(
        ctx: Arc<worker::Context>,
        sources: HashSet<Source>,
        shutdown: CancellationToken,
    ) -> (
        PodManager,
        mpsc::UnboundedSender<ManagerEvent>,
        mpsc::UnboundedReceiver<ManagerEvent>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let manager = PodManager {
            ctx,
            workers: HashMap::new(),
            tx: tx.clone(),
            synced: HashSet::new(),
            sources,
            statics: watch::channel(BTreeMap::new()).0,
            mirrors: watch::channel(BTreeMap::new()).0,
            shutdown,
        };
        (manager, tx, rx)
    }

    /// The static pods by full name (for the mirror controller).
    pub fn statics(&self) -> watch::Receiver<BTreeMap<String, Pod>> {
        self.statics.subscribe()
    }

    /// The mirror pods seen on the API server by full name.
    pub fn mirrors(&self) -> watch::Receiver<BTreeMap<String, Pod>> {
        self.mirrors.subscribe()
    }

    fn set(&mut self, source: Source, pod: Pod, removed: bool) {
        let Some(uid) = uid_of(&pod) else { return };
        let desired = Desired {
            pod: Arc::new(pod),
            source,
            removed,
        };
        if let Some(h) = self.workers.get(&uid) {
            // A change of status only (the kubelet's own patches) does not wake the worker.
            let wake = removed != h.desired.borrow().removed
                || desired_changed(&h.desired.borrow().pod, &desired.pod);
            h.desired.send_replace(desired);
            if wake {
                h.trigger.notify_one();
            }
            return;
        }
        tracing::info!(pod = %spec::full_name(&desired.pod), pod_uid = %uid, ?source, "new pod worker");
        let (dtx, drx) = watch::channel(desired);
        let trigger = Trigger::default();
        let stop = self.shutdown.child_token();
        let w = worker::PodWorker::new(uid.clone(), self.ctx.clone(), drx, self.tx.clone());
        tokio::spawn(reconcile::run(w, trigger.clone(), stop.clone()));
        self.workers.insert(
            uid,
            Handle {
                desired: dtx,
                trigger,
                stop,
            },
        );
    }

    fn remove(&mut self, uid: &str) {
        if let Some(h) = self.workers.get(uid) {
            let mut d = h.desired.borrow().clone();
            if !d.removed {
                d.removed = true;
                h.desired.send_replace(d);
            }
            h.trigger.notify_one();
        }
    }

    fn update_mirror(&mut self, pod: &Pod, gone: bool) {
        let name = spec::full_name(pod);
        self.mirrors.send_modify(|m| {
            if gone {
                m.remove(&name);
            } else {
                m.insert(name.clone(), pod.clone());
            }
        });
        // The static pod's worker reports status to its mirror: wake it.
        let statics = self.statics.borrow().get(&name).and_then(uid_of);
        if let Some(uid) = statics
            && let Some(h) = self.workers.get(&uid)
        {
            h.trigger.notify_one();
        }
    }

    fn handle(&mut self, event: ManagerEvent) {
        match event {
            ManagerEvent::Upsert(source, pod) => {
                if source == Source::Api && is_mirror(&pod) {
                    self.update_mirror(&pod, false);
                    return;
                }
                self.set(source, *pod, false);
            }
            ManagerEvent::Remove(source, uid) => {
                if source == Source::Api {
                    let mirror = self
                        .mirrors
                        .borrow()
                        .values()
                        .find(|p| uid_of(p).as_deref() == Some(&uid))
                        .cloned();
                    if let Some(m) = mirror {
                        self.update_mirror(&m, true);
                        return;
                    }
                }
                let owned = self
                    .workers
                    .get(&uid)
                    .is_some_and(|h| h.desired.borrow().source == source);
                if owned {
                    self.remove(&uid);
                }
            }
            ManagerEvent::Synced(source, pods) => {
                let mut keep = HashSet::new();
                let mut mirrors = BTreeMap::new();
                let mut statics = BTreeMap::new();
                for pod in pods {
                    if source == Source::Api && is_mirror(&pod) {
                        mirrors.insert(spec::full_name(&pod), pod);
                        continue;
                    }
                    if source == Source::File {
                        statics.insert(spec::full_name(&pod), pod.clone());
                    }
                    if let Some(uid) = uid_of(&pod) {
                        keep.insert(uid);
                    }
                    self.set(source, pod, false);
                }
                if source == Source::Api {
                    self.mirrors.send_replace(mirrors);
                }
                if source == Source::File {
                    self.statics.send_replace(statics);
                }
                let gone: Vec<String> = self
                    .workers
                    .iter()
                    .filter(|(uid, h)| h.desired.borrow().source == source && !keep.contains(*uid))
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in gone {
                    self.remove(&uid);
                }
                if self.synced.insert(source) {
                    tracing::info!(?source, "pod source synced");
                }
            }
            ManagerEvent::WorkerDone(uid) => {
                if let Some(h) = self.workers.remove(&uid) {
                    h.stop.cancel();
                }
            }
            ManagerEvent::RuntimeChanged(uids) => {
                for uid in uids {
                    if let Some(h) = self.workers.get(&uid) {
                        h.trigger.notify_one();
                    }
                }
            }
            ManagerEvent::RuntimePods(pods) => {
                if !self.sources.iter().all(|s| self.synced.contains(s)) {
                    return;
                }
                for (uid, name, namespace, grace) in pods {
                    if self.workers.contains_key(&uid) {
                        continue;
                    }
                    tracing::info!(pod = %format!("{namespace}/{name}"), pod_uid = %uid, "removing an orphaned pod from the runtime");
                    let pod = Pod {
                        metadata: ObjectMeta {
                            name: Some(name),
                            namespace: Some(namespace),
                            uid: Some(uid),
                            deletion_grace_period_seconds: Some(grace),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    self.set(Source::Orphan, pod, true);
                }
            }
        }
    }

    /// Handles events until shutdown.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ManagerEvent>) {
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                e = rx.recv() => match e { Some(e) => e, None => break },
            };
            self.handle(event);
        }
        tracing::debug!("pod manager stopped");
    }
}

/// The API source: list+watch of this node's pods until `shutdown`.
pub async fn api_source(
    client: kube::Client,
    node: String,
    tx: mpsc::UnboundedSender<ManagerEvent>,
    shutdown: CancellationToken,
) {
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(pods, config).default_backoff().boxed();
    let mut listing: Vec<Pod> = Vec::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = stream.next() => match e { Some(e) => e, None => return },
        };
        let sent = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                Ok(())
            }
            Ok(watcher::Event::InitApply(p)) => {
                listing.push(p);
                Ok(())
            }
            Ok(watcher::Event::InitDone) => tx.send(ManagerEvent::Synced(
                Source::Api,
                std::mem::take(&mut listing),
            )),
            Ok(watcher::Event::Apply(p)) => tx.send(ManagerEvent::Upsert(Source::Api, Box::new(p))),
            Ok(watcher::Event::Delete(p)) => match uid_of(&p) {
                Some(uid) => tx.send(ManagerEvent::Remove(Source::Api, uid)),
                None => Ok(()),
            },
            Err(e) => {
                tracing::warn!("watching pods: {e}");
                Ok(())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// The static-pod source: the directory's pods as [`ManagerEvent::Synced`] on every change.
pub async fn file_source(
    dir: std::path::PathBuf,
    node: String,
    tx: mpsc::UnboundedSender<ManagerEvent>,
    shutdown: CancellationToken,
) {
    let (ftx, mut frx) = mpsc::unbounded_channel();
    tokio::spawn(static_pods::watch(dir, node, ftx, shutdown.clone()));
    while let Some(pods) = frx.recv().await {
        if tx.send(ManagerEvent::Synced(Source::File, pods)).is_err() {
            return;
        }
    }
}

type Fingerprint = BTreeMap<String, Vec<(String, i32)>>;

async fn relist(
    runtime: &RuntimeClient,
    node: &str,
) -> Result<(Fingerprint, Vec<(String, String, String, i64)>), crate::runtime::RuntimeError> {
    let sel = HashMap::from([(worker::NODE_LABEL.to_string(), node.to_string())]);
    let sandboxes = runtime.list_pod_sandboxes(sel.clone()).await?;
    let containers = runtime.list_containers(sel).await?;
    let mut fp: Fingerprint = BTreeMap::new();
    let mut pods: BTreeMap<String, (String, String, String, i64)> = BTreeMap::new();
    for s in &sandboxes {
        let Some(uid) = s.labels.get(POD_UID_LABEL) else {
            continue;
        };
        fp.entry(uid.clone())
            .or_default()
            .push((s.id.clone(), s.state));
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        pods.entry(uid.clone()).or_insert((
            uid.clone(),
            label(POD_NAME_LABEL),
            label(POD_NAMESPACE_LABEL),
            spec::DEFAULT_GRACE_SECONDS,
        ));
    }
    for c in &containers {
        let Some(uid) = c.labels.get(POD_UID_LABEL) else {
            continue;
        };
        fp.entry(uid.clone())
            .or_default()
            .push((c.id.clone(), c.state));
        if let Some(g) = c
            .annotations
            .get(spec::POD_TERMINATION_GRACE_PERIOD)
            .and_then(|g| g.parse().ok())
            && let Some(p) = pods.get_mut(uid)
        {
            p.3 = g;
        }
    }
    for v in fp.values_mut() {
        v.sort();
    }
    Ok((fp, pods.into_values().collect()))
}

/// How often the runtime is relisted while its event stream works (orphans, lost events).
pub const RELIST_PERIOD_WITH_EVENTS: Duration = Duration::from_secs(60);

/// Tells the manager which pods' containers changed: from `GetContainerEvents` when the runtime
/// streams events (with a relist every [`RELIST_PERIOD_WITH_EVENTS`]), else by relisting every
/// [`RELIST_PERIOD`] (logged once).
pub async fn runtime_events(
    runtime: Arc<RuntimeClient>,
    node: String,
    tx: mpsc::UnboundedSender<ManagerEvent>,
    shutdown: CancellationToken,
) {
    let mut previous: Fingerprint = BTreeMap::new();
    let mut supported = true;
    let mut stream: Option<tonic::Streaming<deckhand_proto::cri::ContainerEventResponse>> = None;
    let mut next_relist = tokio::time::Instant::now();
    loop {
        if supported && stream.is_none() {
            match runtime.container_events().await {
                Ok(s) => {
                    tracing::info!("runtime events: GetContainerEvents");
                    stream = Some(s);
                }
                Err(e) if RuntimeClient::status_code(&e) == Some(tonic::Code::Unimplemented) => {
                    supported = false;
                    tracing::info!(
                        "the runtime does not support GetContainerEvents: relisting it every {RELIST_PERIOD:?}"
                    );
                }
                Err(e) => tracing::debug!("runtime events: {e}"),
            }
        }
        if tokio::time::Instant::now() >= next_relist {
            match relist(&runtime, &node).await {
                Ok((fp, pods)) => {
                    let changed: Vec<String> = fp
                        .iter()
                        .filter(|(uid, v)| previous.get(*uid) != Some(v))
                        .map(|(uid, _)| uid.clone())
                        .chain(previous.keys().filter(|u| !fp.contains_key(*u)).cloned())
                        .collect();
                    previous = fp;
                    if (!changed.is_empty()
                        && tx.send(ManagerEvent::RuntimeChanged(changed)).is_err())
                        || tx.send(ManagerEvent::RuntimePods(pods)).is_err()
                    {
                        return;
                    }
                }
                Err(e) => tracing::debug!("relisting the runtime: {e}"),
            }
            let period = if stream.is_some() {
                RELIST_PERIOD_WITH_EVENTS
            } else {
                RELIST_PERIOD
            };
            next_relist = tokio::time::Instant::now() + period;
        }
        let event = async {
            match stream.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_relist) => {}
            msg = event => match msg {
                Some(Ok(ev)) => {
                    let uid = ev
                        .pod_sandbox_status
                        .as_ref()
                        .and_then(|s| s.metadata.as_ref())
                        .map(|m| m.uid.clone())
                        .or_else(|| {
                            ev.containers_statuses
                                .iter()
                                .find_map(|c| c.labels.get(POD_UID_LABEL).cloned())
                        });
                    if let Some(uid) = uid
                        && tx.send(ManagerEvent::RuntimeChanged(vec![uid])).is_err()
                    {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!("runtime event stream: {e}; relisting");
                    stream = None;
                    next_relist = tokio::time::Instant::now();
                }
                None => {
                    stream = None;
                    next_relist = tokio::time::Instant::now();
                }
            },
        }
        if stream.is_none() && supported {
            // Reconnect after a short pause, not in a tight loop.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
