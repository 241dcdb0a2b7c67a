//! Mirror pods: the API server's read-only view of each static pod, as upstream's
//! `mirrorClient`.
//!
//! [`MirrorController`] compares the static pods with the mirror pods the pod watch sees. A
//! static pod without a mirror gets one (a copy with `kubernetes.io/config.mirror` set to its
//! hash and the Node as owner, which NodeRestriction requires); a mirror whose hash is stale or
//! that someone deleted (deletionTimestamp set) is deleted with grace period 0 and the UID as
//! precondition, and made again; a mirror without a static pod is deleted. It is woken by
//! changes of either set.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use tokio::sync::watch;

use super::spec::{self, CONFIG_HASH, CONFIG_MIRROR};
use crate::node::NodeState;
use crate::reconcile::{Action, Backoff, Reconciler};

/// An error of one mirror reconcile.
#[derive(Debug, thiserror::Error)]
#[error("{what} mirror pod {pod}: {source}")]
pub struct MirrorError {
    what: &'static str,
    pod: String,
    #[source]
    source: kube::Error,
}

/// Keeps mirror pods in line with static pods.
pub struct MirrorController {
    client: kube::Client,
    node_name: String,
    statics: watch::Receiver<BTreeMap<String, Pod>>,
    mirrors: watch::Receiver<BTreeMap<String, Pod>>,
    node: watch::Receiver<NodeState>,
    backoff: Backoff,
}

impl MirrorController {
    /// A controller over the manager's static and mirror pod sets.
    pub fn new(
        client: kube::Client,
        node_name: String,
        statics: watch::Receiver<BTreeMap<String, Pod>>,
        mirrors: watch::Receiver<BTreeMap<String, Pod>>,
        node: watch::Receiver<NodeState>,
    ) -> MirrorController {
        MirrorController {
            client,
            node_name,
            statics,
            mirrors,
            node,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }

    /// A change of either set or of the Node wakes the controller through `trigger`.
    pub async fn forward_changes(
        mut statics: watch::Receiver<BTreeMap<String, Pod>>,
        mut mirrors: watch::Receiver<BTreeMap<String, Pod>>,
        mut node: watch::Receiver<NodeState>,
        trigger: crate::reconcile::Trigger,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let ok = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = statics.changed() => r.is_ok(),
                r = mirrors.changed() => r.is_ok(),
                r = node.changed() => r.is_ok(),
            };
            if !ok {
                return;
            }
            trigger.notify_one();
        }
    }

    fn mirror_of(&self, pod: &Pod, hash: &str) -> Pod {
        let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
        annotations.insert(CONFIG_MIRROR.into(), hash.to_string());
        let owner = self.node.borrow().uid.clone().map(|uid| {
            vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: self.node_name.clone(),
                uid,
                controller: Some(true),
                block_owner_deletion: None,
            }]
        });
        Pod {
            metadata: ObjectMeta {
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                labels: pod.metadata.labels.clone(),
                annotations: Some(annotations),
                owner_references: owner,
                ..Default::default()
            },
            spec: pod.spec.clone(),
            status: None,
        }
    }

    async fn delete(&self, m: &Pod) -> Result<(), MirrorError> {
        let (name, ns, uid) = spec::ids(m);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {
                tracing::info!(pod = %spec::full_name(m), "deleted mirror pod");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(source) => Err(MirrorError {
                what: "deleting",
                pod: spec::full_name(m),
                source,
            }),
        }
    }
}

impl Reconciler for MirrorController {
    type Error = MirrorError;

    fn name(&self) -> &'static str {
        "mirror-pods"
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    async fn reconcile(&mut self) -> Result<Action, MirrorError> {
        if self.node.borrow().uid.is_none() {
            // NodeRestriction wants the Node as the mirror's owner: wait for its registration.
            return Ok(Action::await_change());
        }
        let statics = self.statics.borrow().clone();
        let mirrors = self.mirrors.borrow().clone();
        let mut pending = false;
        for (name, pod) in &statics {
            let hash = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CONFIG_HASH))
                .cloned()
                .unwrap_or_default();
            if let Some(m) = mirrors.get(name) {
                let current = m
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(CONFIG_MIRROR))
                    .is_some_and(|h| *h == hash);
                if current && m.metadata.deletion_timestamp.is_none() {
                    continue;
                }
                self.delete(m).await?;
                // Created again once the watch shows the old one gone.
                pending = true;
                continue;
            }
            let (_, ns, _) = spec::ids(pod);
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            match api
                .create(&PostParams::default(), &self.mirror_of(pod, &hash))
                .await
            {
                Ok(_) => tracing::info!(pod = %name, "created mirror pod"),
                Err(kube::Error::Api(s)) if s.code == 409 => pending = true,
                Err(source) => {
                    return Err(MirrorError {
                        what: "creating",
                        pod: name.clone(),
                        source,
                    });
                }
            }
        }
        for (name, m) in &mirrors {
            if !statics.contains_key(name) {
                self.delete(m).await?;
            }
        }
        self.backoff.reset();
        Ok(if pending {
            Action::requeue(Duration::from_secs(1))
        } else {
            Action::await_change()
        })
    }

    fn error_policy(&mut self, _: Option<&MirrorError>) -> Action {
        Action::requeue(self.backoff.next_delay())
    }
}
