//! The node's Lease in `kube-node-lease`: the kubelet's heartbeat, as upstream's
//! `nodelease` controller.
//!
//! The Lease is named after the node, held by the node name, lasts `nodeLeaseDurationSeconds`
//! and is renewed every quarter of that. Renewals are updates with the last seen
//! `resourceVersion` (optimistic concurrency): a conflict re-reads the Lease, a missing Lease is
//! created again, other errors back off from 200 ms to 7 s. Once the Node is registered the Lease
//! carries an ownerReference to it, so deleting the Node garbage-collects its Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::node::NodeState;
use crate::reconcile::{Action, Backoff, Reconciler};

/// The namespace of node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Upstream's retry back-off limits for lease errors.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(7);

/// Keeps the node's Lease renewed.
pub struct LeaseController {
    leases: Api<Lease>,
    node_name: String,
    duration_seconds: u32,
    renew_interval: Duration,
    node: watch::Receiver<NodeState>,
    latest: Option<Lease>,
    backoff: Backoff,
}

impl LeaseController {
    /// A controller for `node_name`'s Lease; `node` gives the registered Node's UID.
    pub fn new(
        client: kube::Client,
        node_name: &str,
        duration_seconds: u32,
        node: watch::Receiver<NodeState>,
    ) -> LeaseController {
        LeaseController {
            leases: Api::namespaced(client, LEASE_NAMESPACE),
            node_name: node_name.to_string(),
            duration_seconds,
            renew_interval: Duration::from_secs(u64::from(duration_seconds)) / 4,
            node,
            latest: None,
            backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
        }
    }

    fn owner(&self) -> Option<OwnerReference> {
        let uid = self.node.borrow().uid.clone()?;
        Some(OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: self.node_name.clone(),
            uid,
            ..Default::default()
        })
    }

    /// `lease` renewed now, held by this node, owned by the current Node when it is known.
    fn renewed(&self, mut lease: Lease) -> Lease {
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.node_name.clone());
        spec.lease_duration_seconds =
            Some(i32::try_from(self.duration_seconds).unwrap_or(i32::MAX));
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        if let Some(owner) = self.owner() {
            let refs = lease.metadata.owner_references.get_or_insert_with(Vec::new);
            let current = refs.iter().any(|r| r.kind == "Node" && r.uid == owner.uid);
            if !current {
                refs.retain(|r| r.kind != "Node");
                refs.push(owner);
            }
        }
        lease
    }

    fn new_lease(&self) -> Lease {
        self.renewed(Lease {
            metadata: ObjectMeta {
                name: Some(self.node_name.clone()),
                namespace: Some(LEASE_NAMESPACE.into()),
                ..Default::default()
            },
            spec: None,
        })
    }
}

impl Reconciler for LeaseController {
    type Error = kube::Error;

    fn name(&self) -> &'static str {
        "lease"
    }

    fn timeout(&self) -> Duration {
        self.renew_interval
            .clamp(Duration::from_secs(2), Duration::from_secs(10))
    }

    async fn reconcile(&mut self) -> Result<Action, kube::Error> {
        let current = match self.latest.take() {
            Some(l) => l,
            None => match self.leases.get_opt(&self.node_name).await? {
                Some(l) => l,
                None => {
                    let lease = self.new_lease();
                    match self.leases.create(&PostParams::default(), &lease).await {
                        Ok(created) => {
                            tracing::info!(lease = %self.node_name, "created the node lease");
                            self.latest = Some(created);
                            self.backoff.reset();
                            return Ok(Action::requeue(self.renew_interval));
                        }
                        Err(kube::Error::Api(s)) if s.is_already_exists() => {
                            return Ok(Action::requeue_now());
                        }
                        Err(e) => return Err(e),
                    }
                }
            },
        };
        let lease = self.renewed(current);
        match self
            .leases
            .replace(&self.node_name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                tracing::trace!(lease = %self.node_name, "renewed the node lease");
                self.latest = Some(updated);
                self.backoff.reset();
                Ok(Action::requeue(self.renew_interval))
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {
                // Someone else changed or deleted it: read it again (or create it) right away.
                tracing::debug!(lease = %self.node_name, "lease update: {}; re-reading", s.message);
                Ok(Action::requeue_now())
            }
            Err(e) => Err(e),
        }
    }

    fn error_policy(&mut self, _: Option<&kube::Error>) -> Action {
        self.latest = None;
        Action::requeue(self.backoff.next_delay())
    }
}
