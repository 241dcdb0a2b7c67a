//! The static-pod source: a directory of YAML/JSON pod manifests (`staticPodPath`).
//!
//! [`scan`] reads every regular, non-hidden file of the directory and turns each manifest into
//! the pod the kubelet runs, as upstream's file source: the name gets the `-<nodename>` suffix,
//! the namespace defaults to `default`, `spec.nodeName` is this node, the spec gets the API
//! server's defaults that the worker relies on, and the UID and the `kubernetes.io/config.hash`
//! annotation are a hash of the manifest (so a changed file is a new pod).
//! [`watch`] rescans on inotify events for the directory (debounced) and sends the full set each
//! time; a file that does not parse is logged and skipped, the others still run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::spec::{CONFIG_HASH, CONFIG_SEEN, CONFIG_SOURCE};

/// A manifest that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("static pod manifest {path}: {message}")]
pub struct ManifestError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// Applies the API server's defaults the kubelet relies on to a manifest's spec.
pub fn apply_defaults(pod: &mut Pod) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".into());
    spec.enable_service_links.get_or_insert(true);
    let containers = spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut());
    for c in containers {
        if c.image_pull_policy.is_none() {
            c.image_pull_policy = Some(super::spec::pull_policy(c).to_string());
        }
        c.termination_message_path
            .get_or_insert_with(|| "/dev/termination-log".into());
        c.termination_message_policy
            .get_or_insert_with(|| "File".into());
    }
}

/// Parses one manifest into the static pod for `node`.
pub fn parse_manifest(path: &Path, text: &str, node: &str) -> Result<Pod, ManifestError> {
    let err = |message: String| ManifestError {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_json::Value =
        serde_yaml_ng::from_str(text).map_err(|e| err(format!("not YAML or JSON: {e}")))?;
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    if kind != "Pod" {
        return Err(err(format!("kind is {kind:?}, not \"Pod\"")));
    }
    let mut pod: Pod = serde_json::from_value(value).map_err(|e| err(format!("not a pod: {e}")))?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("metadata.name is missing".into()))?;
    if pod.spec.as_ref().is_none_or(|s| s.containers.is_empty()) {
        return Err(err("spec.containers is empty".into()));
    }
    let full = format!("{name}-{node}");
    if !crate::config::is_dns1123_subdomain(&full) {
        return Err(err(format!("{full:?} is not a valid pod name")));
    }
    pod.metadata.name = Some(full);
    if pod.metadata.namespace.as_deref().is_none_or(str::is_empty) {
        pod.metadata.namespace = Some("default".into());
    }
    pod.metadata.uid = None;
    pod.metadata.resource_version = None;
    pod.status = None;
    apply_defaults(&mut pod);
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node.to_string());
    }
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.remove(CONFIG_HASH);
    annotations.remove(CONFIG_SEEN);
    annotations.insert(CONFIG_SOURCE.into(), "file".into());
    let canonical = serde_json::to_vec(&pod).map_err(|e| err(e.to_string()))?;
    let digest = Sha256::digest(&canonical);
    let hash: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    pod.metadata.uid = Some(hash.clone());
    if let Some(a) = pod.metadata.annotations.as_mut() {
        a.insert(CONFIG_HASH.into(), hash);
    }
    Ok(pod)
}

/// Reads the directory: the pods of every manifest that parses; errors for the others. A
/// missing directory is no pods.
pub fn scan(dir: &Path, node: &str) -> (Vec<Pod>, Vec<ManifestError>) {
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (pods, errors),
        Err(e) => {
            errors.push(ManifestError {
                path: dir.to_path_buf(),
                message: e.to_string(),
            });
            return (pods, errors);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .map(|e| e.path())
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_manifest(&path, &text, node) {
                Ok(p) => pods.push(p),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(ManifestError {
                path: path.clone(),
                message: e.to_string(),
            }),
        }
    }
    (pods, errors)
}

/// An inotify instance as tokio's `AsyncFd` wants it.
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Sends the directory's pods on `tx` at start and after every change (inotify on the
/// directory, debounced by 100 ms) until `shutdown`. When the directory does not exist yet, its
/// parent is watched until it appears.
pub async fn watch(
    dir: PathBuf,
    node: String,
    tx: mpsc::UnboundedSender<Vec<Pod>>,
    shutdown: CancellationToken,
) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(std::io::Error::from)
        .and_then(|i| {
            // SAFETY: the descriptor is owned by the `Inotify` inside the AsyncFd and stays open
            // until the AsyncFd (which deregisters it first) is dropped.
            unsafe { AsyncFd::register(InotifyFd(i)) }
                .map_err(|e| std::io::Error::other(e.to_string()))
        }) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(dir = %dir.display(), "inotify for the static pod directory: {e}");
            return;
        }
    };
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    let mut watching_dir = false;
    loop {
        if !watching_dir {
            if inotify.get_ref().0.add_watch(&dir, flags).is_ok() {
                watching_dir = true;
            } else if let Some(parent) = dir.parent()
                && let Err(e) = inotify.get_ref().0.add_watch(
                    parent,
                    AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
                )
            {
                tracing::warn!(dir = %parent.display(), "watching for the static pod directory: {e}");
            }
        }
        let (pods, errors) = scan(&dir, &node);
        for e in errors {
            tracing::warn!("{e}");
        }
        if tx.send(pods).is_err() {
            return;
        }
        // Wait for an event, then let a burst of them settle.
        let mut gone = false;
        loop {
            let ready = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = inotify.readable() => r,
            };
            let mut guard = match ready {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("inotify: {e}");
                    return;
                }
            };
            match guard.try_io(|i| i.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => {
                    gone |= events.iter().any(|e| {
                        e.mask
                            .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_IGNORED)
                    });
                    break;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(Err(e)) => {
                    tracing::error!("inotify: {e}");
                    return;
                }
                Err(_would_block) => continue,
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        while let Ok(events) = inotify.get_ref().0.read_events() {
            gone |= events.iter().any(|e| {
                e.mask
                    .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_IGNORED)
            });
        }
        if gone {
            watching_dir = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: busybox:1.0\n";

    #[test]
    fn manifest_becomes_a_static_pod() {
        let p = parse_manifest(Path::new("/m/web.yaml"), MANIFEST, "node1").expect("pod");
        assert_eq!(p.metadata.name.as_deref(), Some("web-node1"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        let a = p.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(a[CONFIG_SOURCE], "file");
        assert_eq!(Some(&a[CONFIG_HASH]), p.metadata.uid.as_ref());
        assert_eq!(a[CONFIG_HASH].len(), 32);
        let s = p.spec.as_ref().expect("spec");
        assert_eq!(s.node_name.as_deref(), Some("node1"));
        assert_eq!(s.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            s.containers[0].image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
        // Same manifest, same hash; a changed one, another.
        let again = parse_manifest(Path::new("/m/x.json"), MANIFEST, "node1").expect("pod");
        assert_eq!(again.metadata.uid, p.metadata.uid);
        let changed = MANIFEST.replace("1.0", "1.1");
        let other = parse_manifest(Path::new("/m/web.yaml"), &changed, "node1").expect("pod");
        assert_ne!(other.metadata.uid, p.metadata.uid);
    }

    #[test]
    fn bad_manifests_are_refused_with_reasons() {
        let p = Path::new("/m/x");
        for (text, want) in [
            ("kind: Service\nmetadata: {name: a}\n", "kind"),
            (
                "kind: Pod\nspec: {containers: [{name: c}]}\n",
                "metadata.name",
            ),
            (
                "kind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n",
                "containers",
            ),
            ("{{{", "YAML"),
        ] {
            let e = parse_manifest(p, text, "n").expect_err(text);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn scan_skips_hidden_and_reports_broken() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), MANIFEST).expect("write");
        std::fs::write(dir.path().join(".hidden.yaml"), MANIFEST).expect("write");
        std::fs::write(dir.path().join("b.yaml"), "kind: Pod\n").expect("write");
        let (pods, errors) = scan(dir.path(), "n");
        assert_eq!(pods.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(scan(&dir.path().join("missing"), "n").0.is_empty());
    }
}
