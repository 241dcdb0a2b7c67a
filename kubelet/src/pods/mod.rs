//! The kubelet's pods: sources, one worker per pod, runtime events and mirror pods.
//!
//! * Sources send [`ManagerEvent`]s to the [`PodManager`]: [`api_source`] (list+watch of pods
//!   with `spec.nodeName=<node>` through kube's watcher, which resumes from the last
//!   resourceVersion after a disconnect and relists only on 410 Gone) and the static-pod
//!   directory ([`static_pods`]).
//! * The manager keeps the desired state per pod UID and runs one [`worker::PodWorker`] per UID
//!   on [`crate::reconcile::run`], waking it when its pod changes (not its status alone, unless
//!   a readiness gate's condition no longer agrees with `Ready`) or the runtime reports a
//!   change of its containers. Once every source has synced, runtime sandboxes of this node
//!   whose pod is gone are stopped and removed by a worker with no desired pod (orphans).
//! * New pods are admitted ([`admission`]) once every source has synced, before a worker
//!   starts anything: the pods the runtime had running when the manager started first (always
//!   admitted, so a restart refuses no running pod), then by creation time, against the
//!   admitted pods that are not terminal. A refused pod's worker only reports it Failed with
//!   upstream's reason and a Warning Event. The decision is made once per UID.
//! * [`runtime_events`]: `GetContainerEvents` when the runtime has it; otherwise (containerd
//!   1.6) a relist every [`RELIST_PERIOD`] as the safety net.
//! * [`mirror::MirrorController`] keeps a mirror pod on the API server for every static pod.

pub mod admission;
pub mod env;
pub mod hooks;
pub mod mirror;
pub mod probes;
pub mod secrets;
pub mod services;
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
    /// Refused by admission: never started, reported Failed with this reason.
    pub rejected: Option<admission::Rejection>,
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
    /// A worker's pod reached a terminal phase (it no longer counts for admission).
    Finished(String),
}

struct Handle {
    desired: watch::Sender<Desired>,
    trigger: Trigger,
    stop: CancellationToken,
    /// Admitted: its requests count against the node while it is not terminal.
    admitted: bool,
    /// Its worker reported a terminal phase.
    finished: bool,
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
    /// New pods waiting for admission (until every source has synced), by UID.
    pending: HashMap<String, (Source, Pod)>,
    /// The UIDs of the pods the runtime had running when the manager started (admitted first).
    running_at_start: Option<HashSet<String>>,
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
            pending: HashMap::new(),
            running_at_start: None,
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

    fn set(&mut self, source: Source, mut pod: Pod, removed: bool) {
        let Some(uid) = uid_of(&pod) else { return };
        if source == Source::File {
            self.mirror_conditions(&mut pod);
        }
        if self.pending.contains_key(&uid) || (!removed && !self.workers.contains_key(&uid)) {
            // Not admitted yet: started (or refused) by `admit_pending`; a removed pod that
            // was never started is just forgotten.
            if removed {
                self.pending.remove(&uid);
            } else {
                self.pending.insert(uid, (source, pod));
            }
            return;
        }
        let mut desired = Desired {
            pod: Arc::new(pod),
            source,
            removed,
            rejected: None,
        };
        if let Some(h) = self.workers.get(&uid) {
            desired.rejected = h.desired.borrow().rejected.clone();
            // A change of status only (the kubelet's own patches) does not wake the worker,
            // unless another controller changed a readiness gate's condition so that `Ready`
            // must be evaluated again (upstream's `HandlePodReconcile`).
            let wake = removed != h.desired.borrow().removed
                || desired_changed(&h.desired.borrow().pod, &desired.pod)
                || status::needs_readiness_reconcile(&desired.pod);
            h.desired.send_replace(desired);
            if wake {
                h.trigger.notify_one();
            }
            return;
        }
        self.spawn(uid, desired, false);
    }

    fn spawn(&mut self, uid: String, desired: Desired, admitted: bool) {
        let source = desired.source;
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
                admitted,
                finished: false,
            },
        );
    }

    /// The admitted pods that still count against the node: not terminal, worker not done.
    fn active_pods(&self) -> Vec<Arc<Pod>> {
        self.workers
            .values()
            .filter(|h| h.admitted && !h.finished)
            .map(|h| h.desired.borrow().pod.clone())
            .filter(|p| !admission::is_terminal(p))
            .collect()
    }

    /// Whether every source has synced and the runtime's running pods are known.
    fn ready_to_admit(&self) -> bool {
        self.running_at_start.is_some() && self.sources.iter().all(|s| self.synced.contains(s))
    }

    /// What admission knows of the node: the Node's labels from the API server (the kubelet's
    /// own labels when it has no client or the Node is not registered yet) and the allocatable
    /// the node controller reports. `None` when the API server could not be asked.
    async fn node_info(&self) -> Option<admission::NodeInfo> {
        let local = &self.ctx.node;
        let root_fs = crate::machine::fs_stats(&local.config.root_dir)
            .inspect_err(|e| tracing::debug!("{e}"))
            .ok();
        let (_, allocatable) =
            crate::node::capacity_and_allocatable(&local.config, &local.machine, root_fs.as_ref());
        let mut labels = crate::node::node_labels(&local.config, &local.machine);
        if let Some(client) = &self.ctx.client {
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
            match nodes.get_opt(&self.ctx.node_name).await {
                Ok(Some(n)) => labels = n.metadata.labels.unwrap_or_default(),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("reading the Node for pod admission: {e}");
                    return None;
                }
            }
        }
        Some(admission::NodeInfo {
            name: self.ctx.node_name.clone(),
            labels,
            allocatable,
        })
    }

    /// Admits the pending pods once every source has synced: those the runtime had running at
    /// start first (always admitted, so that a restart never refuses a running pod), then by
    /// creation time. Returns false when it must be retried (the Node could not be read).
    async fn admit_pending(&mut self) -> bool {
        if self.pending.is_empty() || !self.ready_to_admit() {
            return true;
        }
        let Some(node) = self.node_info().await else {
            return false;
        };
        let running = self.running_at_start.clone().unwrap_or_default();
        let mut batch: Vec<(bool, Pod)> = Vec::new();
        let mut sources = HashMap::new();
        for (uid, (source, pod)) in std::mem::take(&mut self.pending) {
            sources.insert(uid.clone(), source);
            batch.push((running.contains(&uid), pod));
        }
        admission::admission_order(&mut batch);
        for (in_runtime, pod) in batch {
            let Some(uid) = uid_of(&pod) else { continue };
            let source = sources.get(&uid).copied().unwrap_or(Source::Api);
            let inactive =
                admission::is_terminal(&pod) || pod.metadata.deletion_timestamp.is_some();
            let verdict = if in_runtime || inactive {
                Ok(())
            } else {
                let active = self.active_pods();
                let refs: Vec<&Pod> = active.iter().map(|p| p.as_ref()).collect();
                admission::admit(&pod, &refs, &node)
            };
            let rejected = verdict.err();
            if let Some(r) = &rejected {
                tracing::warn!(pod = %spec::full_name(&pod), pod_uid = %uid, reason = %r.reason, "pod refused: {}", r.message);
            }
            let admitted = rejected.is_none() && (in_runtime || !inactive);
            let desired = Desired {
                pod: Arc::new(pod),
                source,
                removed: false,
                rejected,
            };
            self.spawn(uid, desired, admitted);
        }
        true
    }

    /// The UIDs of this node's pods with a ready sandbox in the runtime (retried until the
    /// runtime answers).
    async fn list_running(&self) -> Option<HashSet<String>> {
        let sel = HashMap::from([(worker::NODE_LABEL.to_string(), self.ctx.node_name.clone())]);
        let mut warned = false;
        loop {
            match self.ctx.runtime.list_pod_sandboxes(sel.clone()).await {
                Ok(sandboxes) => {
                    let ready = deckhand_proto::cri::PodSandboxState::SandboxReady as i32;
                    return Some(
                        sandboxes
                            .into_iter()
                            .filter(|s| s.state == ready)
                            .filter_map(|s| s.labels.get(POD_UID_LABEL).cloned())
                            .collect(),
                    );
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!("listing the runtime's pods before admitting any: {e}");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
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

    /// A static pod's conditions are its mirror pod's: other controllers set its readiness
    /// gates' conditions there (upstream's status manager merges them from the API's pod).
    /// None while it has no mirror.
    fn mirror_conditions(&self, pod: &mut Pod) {
        let conditions = self
            .mirrors
            .borrow()
            .get(&spec::full_name(pod))
            .and_then(|m| m.status.as_ref())
            .and_then(|s| s.conditions.clone());
        if conditions.is_some() || pod.status.is_some() {
            pod.status.get_or_insert_with(Default::default).conditions = conditions;
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
        // The static pod's worker reports status to its mirror: wake it, with the mirror's
        // conditions.
        let statics = self.statics.borrow().get(&name).and_then(uid_of);
        if let Some(uid) = statics
            && let Some(h) = self.workers.get(&uid)
        {
            let (current, removed) = {
                let d = h.desired.borrow();
                ((*d.pod).clone(), d.removed)
            };
            h.trigger.notify_one();
            self.set(Source::File, current, removed);
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
                // A pod not admitted yet is just forgotten.
                if self.pending.get(&uid).is_some_and(|(s, _)| *s == source) {
                    self.pending.remove(&uid);
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
                self.pending
                    .retain(|uid, (s, _)| *s != source || keep.contains(uid));
                if self.synced.insert(source) {
                    tracing::info!(?source, "pod source synced");
                }
            }
            ManagerEvent::Finished(uid) => {
                if let Some(h) = self.workers.get_mut(&uid) {
                    h.finished = true;
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
                    if self.workers.contains_key(&uid) || self.pending.contains_key(&uid) {
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
                // Pod cgroups without a pod (deleted while the kubelet was down).
                let active = self
                    .workers
                    .keys()
                    .chain(self.pending.keys())
                    .cloned()
                    .collect();
                drop(self.ctx.cgroups.remove_orphans(active));
            }
        }
    }

    /// Handles events until shutdown.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ManagerEvent>) {
        // Pods the runtime already runs are admitted before any other (a restart).
        self.running_at_start = self.list_running().await;
        if self.running_at_start.is_none() {
            return;
        }
        let mut retry = false;
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                e = rx.recv() => match e { Some(e) => Some(e), None => break },
                _ = tokio::time::sleep(Duration::from_secs(1)), if retry => None,
            };
            if let Some(event) = event {
                self.handle(event);
            }
            // Pods that arrived together are admitted together, oldest first.
            while let Ok(event) = rx.try_recv() {
                self.handle(event);
            }
            retry = !self.admit_pending().await;
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
