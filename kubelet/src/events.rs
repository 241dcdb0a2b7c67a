//! Kubernetes Events about pods, as upstream's event recorder (core/v1 Events).
//!
//! [`Recorder::event`] never blocks and never fails: every event is logged through `tracing`
//! and, with an API client, queued (bounded, [`QUEUE`]) for one sink task that posts it. A
//! repeat of an event (same object, field path, type, reason and message) patches the count
//! and lastTimestamp of the Event it posted before instead of posting a new one, as upstream's
//! aggregation does. When the queue is full the event is dropped (and logged at debug).

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How many events may wait for the sink before new ones are dropped.
pub const QUEUE: usize = 512;
/// How many posted events are remembered for aggregation.
const CACHE: usize = 4096;
/// The longest one API call of the sink may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `Normal`.
    Normal,
    /// `Warning`.
    Warning,
}

impl EventType {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The object it is about.
    pub object: ObjectReference,
    /// `Normal` or `Warning`.
    pub type_: EventType,
    /// The reason (`Pulling`, `Started`, `Unhealthy`...).
    pub reason: String,
    /// The message.
    pub message: String,
}

/// What identifies repeats of an event.
type Key = (String, String, String, EventType, String, String);

fn key(r: &Record) -> Key {
    let o = &r.object;
    (
        o.namespace.clone().unwrap_or_default(),
        o.uid.clone().unwrap_or_default(),
        o.field_path.clone().unwrap_or_default(),
        r.type_,
        r.reason.clone(),
        r.message.clone(),
    )
}

/// What the sink does with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Post a new Event of this name.
    Create(String),
    /// Patch the Event of this name to this count.
    Patch(String, i32),
}

/// The events posted so far, for aggregation.
#[derive(Debug, Default)]
pub struct Aggregator {
    seen: HashMap<Key, (String, i32)>,
    serial: u64,
}

impl Aggregator {
    /// What to do for `r`: a new Event, or the count of the one posted for its repeats.
    pub fn step(&mut self, r: &Record) -> Step {
        let k = key(r);
        if let Some((name, count)) = self.seen.get_mut(&k) {
            *count += 1;
            return Step::Patch(name.clone(), *count);
        }
        if self.seen.len() >= CACHE {
            self.seen.clear();
        }
        self.serial += 1;
        let nanos = Timestamp::now().as_nanosecond();
        let base = r.object.name.as_deref().unwrap_or("object");
        let name = format!("{base}.{:x}{:x}", nanos, self.serial);
        self.seen.insert(k, (name.clone(), 1));
        Step::Create(name)
    }

    /// Forgets `r`'s Event (it is gone from the API server).
    pub fn forget(&mut self, r: &Record) {
        self.seen.remove(&key(r));
    }
}

/// Records events; cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Record>>,
}

/// The reference to a pod (and, with `container`, to one of its containers as upstream's
/// `spec.containers{name}` field path).
pub fn pod_ref(pod: &Pod, container: Option<&str>) -> ObjectReference {
    let m = &pod.metadata;
    let field_path = container.map(|c| {
        let init = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|i| i.iter().any(|x| x.name == c));
        if init {
            format!("spec.initContainers{{{c}}}")
        } else {
            format!("spec.containers{{{c}}}")
        }
    });
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        field_path,
    }
}

impl Recorder {
    /// A recorder that only logs (standalone mode).
    pub fn logging() -> Recorder {
        Recorder { tx: None }
    }

    /// A recorder posting to the API server through `client` from a sink task that ends
    /// with `shutdown`; `host` is the node (the events' source host).
    pub fn new(client: kube::Client, host: String, shutdown: CancellationToken) -> Recorder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(sink(client, host, rx, shutdown));
        Recorder { tx: Some(tx) }
    }

    /// Records an event about `pod` (its container `container` when given).
    pub fn event(
        &self,
        pod: &Pod,
        container: Option<&str>,
        type_: EventType,
        reason: &str,
        message: impl Into<String>,
    ) {
        let record = Record {
            object: pod_ref(pod, container),
            type_,
            reason: reason.to_string(),
            message: message.into(),
        };
        self.record(record);
    }

    /// Records `r`.
    pub fn record(&self, r: Record) {
        let object = format!(
            "{}/{}",
            r.object.namespace.as_deref().unwrap_or_default(),
            r.object.name.as_deref().unwrap_or_default()
        );
        let field = r.object.field_path.as_deref().unwrap_or_default();
        match r.type_ {
            EventType::Normal => {
                tracing::info!(event = %r.reason, %object, field, "{}", r.message)
            }
            EventType::Warning => {
                tracing::warn!(event = %r.reason, %object, field, "{}", r.message)
            }
        }
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(r)
        {
            tracing::debug!("event not posted: {e}");
        }
    }
}

async fn sink(
    client: kube::Client,
    host: String,
    mut rx: mpsc::Receiver<Record>,
    shutdown: CancellationToken,
) {
    let mut agg = Aggregator::default();
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = rx.recv() => match r { Some(r) => r, None => return },
        };
        let ns = r
            .object
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        let now = Time(Timestamp::now());
        let step = agg.step(&r);
        let result = match &step {
            Step::Patch(name, count) => {
                let patch = json!({ "count": count, "lastTimestamp": now });
                let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
                match tokio::time::timeout(CALL_TIMEOUT, api.patch(name, &pp, &merge)).await {
                    Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                        // Gone (expired): post it again.
                        agg.forget(&r);
                        let Step::Create(name) = agg.step(&r) else {
                            continue;
                        };
                        create(&api, &name, &ns, &host, &r, &now).await
                    }
                    Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".into()),
                }
            }
            Step::Create(name) => create(&api, name, &ns, &host, &r, &now).await,
        };
        if let Err(e) = result {
            tracing::debug!(reason = %r.reason, "posting an event: {e}");
            if matches!(step, Step::Create(_)) {
                agg.forget(&r);
            }
        }
    }
}

async fn create(
    api: &Api<Event>,
    name: &str,
    ns: &str,
    host: &str,
    r: &Record,
    now: &Time,
) -> Result<(), String> {
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            ..Default::default()
        },
        involved_object: r.object.clone(),
        reason: Some(r.reason.clone()),
        message: Some(r.message.clone()),
        type_: Some(r.type_.as_str().into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(host.to_string()),
        }),
        count: Some(1),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now.clone()),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(host.to_string()),
        ..Default::default()
    };
    match tokio::time::timeout(CALL_TIMEOUT, api.create(&PostParams::default(), &event)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u", "resourceVersion": "7"},
            "spec": {"initContainers": [{"name": "i"}], "containers": [{"name": "c"}]}
        }))
        .expect("pod")
    }

    fn record(reason: &str, message: &str, container: Option<&str>) -> Record {
        Record {
            object: pod_ref(&pod(), container),
            type_: EventType::Warning,
            reason: reason.into(),
            message: message.into(),
        }
    }

    #[test]
    fn references_name_the_container_field() {
        let r = pod_ref(&pod(), Some("c"));
        assert_eq!(r.field_path.as_deref(), Some("spec.containers{c}"));
        assert_eq!(r.kind.as_deref(), Some("Pod"));
        assert_eq!(r.uid.as_deref(), Some("u"));
        let r = pod_ref(&pod(), Some("i"));
        assert_eq!(r.field_path.as_deref(), Some("spec.initContainers{i}"));
        assert_eq!(pod_ref(&pod(), None).field_path, None);
    }

    #[test]
    fn repeats_are_aggregated_by_count() {
        let mut a = Aggregator::default();
        let first = a.step(&record("BackOff", "back-off", Some("c")));
        let Step::Create(name) = first else {
            panic!("{first:?}")
        };
        assert!(name.starts_with("p."), "{name}");
        assert_eq!(
            a.step(&record("BackOff", "back-off", Some("c"))),
            Step::Patch(name.clone(), 2)
        );
        assert_eq!(
            a.step(&record("BackOff", "back-off", Some("c"))),
            Step::Patch(name.clone(), 3)
        );
        // Another message, container or reason is another event.
        assert!(matches!(
            a.step(&record("BackOff", "other", Some("c"))),
            Step::Create(n) if n != name
        ));
        assert!(matches!(
            a.step(&record("BackOff", "back-off", None)),
            Step::Create(_)
        ));
        a.forget(&record("BackOff", "back-off", Some("c")));
        assert!(matches!(
            a.step(&record("BackOff", "back-off", Some("c"))),
            Step::Create(_)
        ));
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_blocking() {
        let (tx, _rx) = mpsc::channel(1);
        let r = Recorder { tx: Some(tx) };
        for _ in 0..10 {
            r.event(&pod(), None, EventType::Normal, "Pulled", "m");
        }
        Recorder::logging().event(&pod(), Some("c"), EventType::Warning, "Failed", "m");
    }
}
