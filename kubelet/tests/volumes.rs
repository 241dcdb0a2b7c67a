//! deckhand-kubelet's env sources and volumes against the test bed, in the style of pods.rs
//! (whose helpers are copied here): the built kubelet runs with node credentials, pods are
//! created through an admin client with `spec.nodeName` set to the test's node (hostNetwork:
//! the test bed's containerd has no CNI config), and what the containers see is checked from
//! inside them (their output, or ExecSync through the CRI).

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use deckhand_proto::cri::ExecSyncRequest;
use deckhand_tests::images::BUSYBOX;
use deckhand_tests::testbed::Testbed;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

mod support;
use support::*;

impl Bed {
    async fn config_map(&self, name: &str, data: serde_json::Value) -> Result<()> {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns }, "data": data }))?;
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &cm)
            .await?;
        Ok(())
    }

    async fn secret(&self, name: &str, type_: &str, string_data: serde_json::Value) -> Result<()> {
        let s: Secret = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns },
            "type": type_, "stringData": string_data }))?;
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &s)
            .await?;
        Ok(())
    }

    /// Waits for the pod to run and gives its (first) container's runtime ID.
    async fn running(&self, name: &str) -> Result<String> {
        self.wait_pod(name, LONG, "pod Running", |p| {
            let cs = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first());
            match cs {
                Some(c) if c.state.as_ref().is_some_and(|s| s.running.is_some()) => c
                    .container_id
                    .as_deref()
                    .and_then(|i| i.split_once("://"))
                    .map(|(_, id)| id.to_string())
                    .ok_or_else(|| format!("no container id in {c:?}")),
                _ => Err(format!("status {:?}", p.status)),
            }
        })
        .await
    }
}

/// Runs `cmd` in container `id` through the CRI: exit code and stdout.
async fn exec(id: &str, cmd: &[&str]) -> Result<(i32, String)> {
    let mut cri = runtime().await?;
    let r = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await?
        .into_inner();
    Ok((r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()))
}

/// `cat` of `path` in container `id`.
async fn cat(id: &str, path: &str) -> Result<String> {
    let (code, out) = exec(id, &["cat", path]).await?;
    ensure!(code == 0, "cat {path}: exit {code}");
    Ok(out)
}

/// The permission bits of `path` (following symlinks) in container `id`.
async fn mode(id: &str, path: &str) -> Result<String> {
    let (code, out) = exec(id, &["stat", "-L", "-c", "%a", path]).await?;
    ensure!(code == 0, "stat {path}: exit {code}");
    Ok(out.trim().to_string())
}

fn waiting_reason(p: &Pod) -> Option<(String, String)> {
    let w = p
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

#[tokio::test]
async fn env_comes_from_config_maps_secrets_and_resources() -> Result<()> {
    let bed = Bed::start("vol-env", false).await?;
    bed.config_map("cfg", json!({"a": "1", "b": "two", "1bad": "x"}))
        .await?;
    bed.secret("sec", "Opaque", json!({"pw": "s3cret", "1bad": "x"}))
        .await?;
    let script = r#"echo "A=$A"; echo "P=$P"; echo "OPT=${OPT-unset}"; echo "LIM=$LIM"; echo "CPU=$CPU"; echo "NCPU=$NCPU"; echo "CM_b=$CM_b"; echo "CM_a=$CM_a"; echo "pw=$pw"; echo "X=$X"; echo "CM_1bad=$CM_1bad"; echo "BAD=$(env | grep -c ^1bad)""#;
    bed.create_pod(
        "env",
        json!({ "restartPolicy": "Never", "containers": [{
            "name": "main", "image": busybox(), "command": ["sh", "-c", script],
            "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m", "memory": "64Mi"}},
            "envFrom": [
                {"configMapRef": {"name": "cfg"}, "prefix": "CM_"},
                {"secretRef": {"name": "sec"}},
                {"secretRef": {"name": "nope", "optional": true}}],
            "env": [
                {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}},
                {"name": "P", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}},
                {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "zz", "optional": true}}},
                {"name": "LIM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                {"name": "NCPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                {"name": "CM_a", "value": "overridden"},
                {"name": "X", "value": "$(A)-$(pw)"}]}]}),
    )
    .await?;
    let out = bed.output("env", "main").await?;
    // limits.cpu unset: the node's allocatable, in whole cores rounded up.
    let node = Api::<Node>::all(bed.client.clone()).get(&bed.node).await?;
    let cpu = node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get("cpu").cloned())
        .ok_or_else(|| anyhow!("node has no allocatable cpu"))?;
    let millis: u64 = match cpu.0.strip_suffix('m') {
        Some(m) => m.parse()?,
        None => cpu.0.parse::<u64>()? * 1000,
    };
    let want = format!(
        "A=1\nP=s3cret\nOPT=unset\nLIM=64\nCPU=250\nNCPU={}\nCM_b=two\nCM_a=overridden\npw=s3cret\nX=1-s3cret\nCM_1bad=x\nBAD=0\n",
        millis.div_ceil(1000)
    );
    assert_eq!(out, want);
    // The skipped key is reported as upstream does.
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(bed.client.clone(), &bed.ns);
    let message = eventually(LONG, "InvalidEnvironmentVariableNames event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidEnvironmentVariableNames"))
            .and_then(|e| e.message)
            .ok_or_else(|| "no event yet".to_string()))
    })
    .await?;
    assert!(message.contains("[1bad]"), "{message}");
    bed.pass()
}

#[tokio::test]
async fn a_missing_config_map_key_blocks_with_create_container_config_error() -> Result<()> {
    let bed = Bed::start("vol-envmiss", false).await?;
    bed.config_map("cfg", json!({"a": "1"})).await?;
    bed.create_pod(
        "miss",
        json!({ "restartPolicy": "Never", "containers": [{
            "name": "main", "image": busybox(), "command": ["sh", "-c", "echo K=$K"],
            "env": [{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}]}]}),
    )
    .await?;
    let (reason, message) = bed
        .wait_pod(
            "miss",
            LONG,
            "CreateContainerConfigError",
            |p| match waiting_reason(p) {
                Some((r, m)) if r == "CreateContainerConfigError" => Ok((r, m)),
                other => Err(format!("{other:?}")),
            },
        )
        .await?;
    assert_eq!(reason, "CreateContainerConfigError");
    assert_eq!(
        message,
        format!("couldn't find key k in ConfigMap {}/cfg", bed.ns)
    );
    assert_eq!(phase(&bed.pods().get("miss").await?), "Pending");
    // Once the key exists the container is created.
    Api::<ConfigMap>::namespaced(bed.client.clone(), &bed.ns)
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "now"}})),
        )
        .await?;
    assert_eq!(bed.output("miss", "main").await?, "K=now\n");
    bed.pass()
}

#[tokio::test]
async fn volumes_of_config_maps_secrets_downward_api_and_tokens() -> Result<()> {
    let bed = Bed::start("vol-files", false).await?;
    bed.config_map("cfg", json!({"a": "1", "b": "two"})).await?;
    bed.secret("sec", "Opaque", json!({"pw": "s3cret"})).await?;
    let created = bed
        .create_pod(
            "files",
            json!({
                "containers": [{
                    "name": "main", "image": busybox(), "command": ["sleep", "3600"],
                    "resources": {"limits": {"memory": "64Mi"}},
                    "volumeMounts": [
                        {"name": "cm", "mountPath": "/v/cm"},
                        {"name": "cmall", "mountPath": "/v/cmall"},
                        {"name": "sec", "mountPath": "/v/sec"},
                        {"name": "down", "mountPath": "/v/down"},
                        {"name": "proj", "mountPath": "/v/proj"},
                        {"name": "mem", "mountPath": "/v/mem"}]}],
                "volumes": [
                    {"name": "cm", "configMap": {"name": "cfg",
                        "items": [{"key": "a", "path": "dir/a.txt", "mode": 0o600}]}},
                    {"name": "cmall", "configMap": {"name": "cfg", "defaultMode": 0o640}},
                    {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
                    {"name": "down", "downwardAPI": {"items": [
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                        {"path": "mem", "resourceFieldRef": {"containerName": "main",
                            "resource": "limits.memory", "divisor": "1Mi"}}]}},
                    {"name": "proj", "projected": {"sources": [
                        {"configMap": {"name": "cfg", "items": [{"key": "a", "path": "cm-a"}]}},
                        {"secret": {"name": "sec", "items": [{"key": "pw", "path": "sec-pw"}]}},
                        {"downwardAPI": {"items": [{"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}}]}},
                        {"serviceAccountToken": {"path": "token", "audience": "dh-test",
                            "expirationSeconds": 3600}}]}},
                    {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]
            }),
        )
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let _ = &uid;
    let id = bed.running("files").await?;
    assert_eq!(cat(&id, "/v/cm/dir/a.txt").await?, "1");
    assert_eq!(mode(&id, "/v/cm/dir/a.txt").await?, "600");
    assert_eq!(cat(&id, "/v/cmall/b").await?, "two");
    assert_eq!(mode(&id, "/v/cmall/b").await?, "640");
    assert_eq!(cat(&id, "/v/sec/pw").await?, "s3cret");
    assert_eq!(mode(&id, "/v/sec/pw").await?, "400");
    let (code, _) = exec(&id, &["touch", "/v/sec/new"]).await?;
    assert_ne!(code, 0, "secret volumes are read-only");
    let (_, ls) = exec(&id, &["ls", "-a", "/v/cmall"]).await?;
    assert!(ls.contains("..data"), "atomic writer layout: {ls}");
    assert_eq!(cat(&id, "/v/down/name").await?, "files");
    assert_eq!(cat(&id, "/v/down/mem").await?, "64");
    assert_eq!(cat(&id, "/v/down/labels").await?, "");
    assert_eq!(cat(&id, "/v/proj/cm-a").await?, "1");
    assert_eq!(cat(&id, "/v/proj/sec-pw").await?, "s3cret");
    assert_eq!(cat(&id, "/v/proj/uid").await?, uid);
    assert_eq!(mode(&id, "/v/proj/token").await?, "644");

    // The token is a JWT of the pod's service account for the audience.
    let token = cat(&id, "/v/proj/token").await?;
    ensure!(token.split('.').count() == 3, "not a JWT: {token}");
    let review: k8s_openapi::api::authentication::v1::TokenReview =
        serde_json::from_value(json!({"spec": {"token": token, "audiences": ["dh-test"]}}))?;
    let reviewed =
        Api::<k8s_openapi::api::authentication::v1::TokenReview>::all(bed.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
    let st = reviewed
        .status
        .ok_or_else(|| anyhow!("no TokenReview status"))?;
    assert_eq!(st.authenticated, Some(true), "{st:?}");
    assert_eq!(st.audiences, Some(vec!["dh-test".to_string()]));
    assert_eq!(
        st.user.and_then(|u| u.username),
        Some(format!("system:serviceaccount:{}:default", bed.ns))
    );

    // emptyDir Memory is a tmpfs of the size asked for.
    let mounts = cat(&id, "/proc/mounts").await?;
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/v/mem"))
        .ok_or_else(|| anyhow!("/v/mem not mounted: {mounts}"))?;
    assert_eq!(line.split(' ').nth(2), Some("tmpfs"), "{line}");
    assert!(line.contains("size=16384k"), "{line}");

    // A ConfigMap update reaches the running container.
    Api::<ConfigMap>::namespaced(bed.client.clone(), &bed.ns)
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "changed", "b": null, "c": "3"}})),
        )
        .await?;
    eventually(Duration::from_secs(150), "the ConfigMap update", || async {
        let cmall_a = cat(&id, "/v/cmall/a").await?;
        let proj = cat(&id, "/v/proj/cm-a").await?;
        let c = exec(&id, &["cat", "/v/cmall/c"]).await?.1;
        let b = exec(&id, &["ls", "/v/cmall/b"]).await?.0;
        Ok(
            if cmall_a == "changed" && proj == "changed" && c == "3" && b != 0 {
                Ok(())
            } else {
                Err(format!(
                    "cmall/a={cmall_a:?} proj/cm-a={proj:?} c={c:?} b exists={}",
                    b == 0
                ))
            },
        )
    })
    .await?;

    // A label change reaches the downward API volume.
    bed.pods()
        .patch(
            "files",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "vol", "tier": "b"}}})),
        )
        .await?;
    eventually(LONG, "the label update", || async {
        let labels = cat(&id, "/v/down/labels").await?;
        Ok(if labels == "app=\"vol\"\ntier=\"b\"" {
            Ok(())
        } else {
            Err(format!("labels {labels:?}"))
        })
    })
    .await?;

    // Deletion removes the volumes, the tmpfs included.
    bed.pods().delete("files", &DeleteParams::default()).await?;
    eventually(LONG, "pod gone", || async {
        Ok(match bed.pods().get_opt("files").await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    let pod_dir = bed.dir.path().join("root/pods").join(&uid);
    assert!(!pod_dir.exists(), "{} left", pod_dir.display());
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !host_mounts.contains(&uid),
        "mounts of the pod left: {host_mounts}"
    );
    bed.pass()
}

#[tokio::test]
async fn a_private_image_pulls_with_an_image_pull_secret_only() -> Result<()> {
    let bed = Bed::start("vol-pull", false).await?;
    let tb = Testbed::get();
    let creds = tb.auth_credentials();
    let host = tb.auth_registry().to_string();
    // The more specific key (wrong password) is tried first, then the host's.
    let config = json!({"auths": {
        format!("{host}/dh"): {"username": creds.username, "password": "wrong"},
        format!("https://{host}"): {"username": creds.username, "password": creds.password}}});
    bed.secret(
        "regcred",
        "kubernetes.io/dockerconfigjson",
        json!({".dockerconfigjson": config.to_string()}),
    )
    .await?;
    let image = format!("{host}/{BUSYBOX}");
    let container = |name: &str| {
        json!({"name": name, "image": image, "imagePullPolicy": "Always",
               "command": ["sh", "-c", "echo pulled"]})
    };
    bed.create_pod(
        "with",
        json!({"restartPolicy": "Never", "imagePullSecrets": [{"name": "regcred"}, {"name": "absent"}],
               "containers": [container("main")]}),
    )
    .await?;
    bed.create_pod(
        "without",
        json!({"restartPolicy": "Never", "containers": [container("main")]}),
    )
    .await?;
    assert_eq!(bed.output("with", "main").await?, "pulled\n");
    let (reason, message) = bed
        .wait_pod("without", LONG, "ErrImagePull", |p| {
            match waiting_reason(p) {
                Some((r, m)) if r == "ErrImagePull" || r == "ImagePullBackOff" => Ok((r, m)),
                other => Err(format!("{other:?}")),
            }
        })
        .await?;
    assert!(
        reason == "ErrImagePull" || message.contains("Back-off"),
        "{reason}: {message}"
    );
    assert_eq!(phase(&bed.pods().get("without").await?), "Pending");
    bed.pass()
}

#[tokio::test]
async fn host_aliases_show_in_etc_hosts() -> Result<()> {
    let bed = Bed::start("vol-hosts", false).await?;
    bed.create_pod(
        "hosts",
        json!({"hostAliases": [{"ip": "10.1.2.3", "hostnames": ["foo.dh", "bar.dh"]}],
               "containers": [{"name": "main", "image": busybox(), "command": ["sleep", "3600"]}]}),
    )
    .await?;
    let id = bed.running("hosts").await?;
    let hosts = cat(&id, "/etc/hosts").await?;
    // The pod is on the host network: the node's entries, then the aliases.
    let node = std::fs::read_to_string("/etc/hosts")?;
    assert_eq!(
        hosts,
        format!(
            "# Kubernetes-managed hosts file (host network).\n{node}\n# Entries added by HostAliases.\n10.1.2.3\tfoo.dh\tbar.dh\n"
        )
    );
    bed.pass()
}

#[tokio::test]
async fn sub_paths_are_resolved_beneath_their_volume() -> Result<()> {
    let bed = Bed::start("vol-subpath", false).await?;
    let created = bed
        .create_pod(
            "subp",
            json!({
                "volumes": [{"name": "data", "emptyDir": {}}],
                "initContainers": [{"name": "mk", "image": busybox(),
                    "command": ["sh", "-c", "ln -s /etc /data/evil"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "containers": [
                    {"name": "good", "image": busybox(),
                     "command": ["sh", "-c", "echo hi > /out/f; sleep 3600"],
                     "env": [{"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                     "volumeMounts": [{"name": "data", "mountPath": "/out", "subPathExpr": "$(NAME)/out"}]},
                    {"name": "bad", "image": busybox(), "command": ["sleep", "3600"],
                     "volumeMounts": [{"name": "data", "mountPath": "/x", "subPath": "evil"}]}]
            }),
        )
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let message = bed
        .wait_pod("subp", LONG, "bad refused, good running", |p| {
            let statuses = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.clone())
                .unwrap_or_default();
            let of = |n: &str| statuses.iter().find(|c| c.name == n).cloned();
            let good = of("good").and_then(|c| c.state).and_then(|s| s.running);
            let bad = of("bad").and_then(|c| c.state).and_then(|s| s.waiting);
            match (good, bad) {
                (Some(_), Some(w)) if w.reason.as_deref() == Some("CreateContainerConfigError") => {
                    Ok(w.message.unwrap_or_default())
                }
                _ => Err(format!("{statuses:?}")),
            }
        })
        .await?;
    assert!(
        message.contains("subPath \"evil\" resolves outside of its volume"),
        "{message}"
    );
    let host = bed
        .dir
        .path()
        .join("root/pods")
        .join(&uid)
        .join("volumes/kubernetes.io~empty-dir/data/subp/out/f");
    eventually(LONG, "the file written through the subPath", || async {
        Ok(match std::fs::read_to_string(&host) {
            Ok(t) if t == "hi\n" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    bed.pods().delete("subp", &DeleteParams::default()).await?;
    eventually(LONG, "pod gone", || async {
        Ok(match bed.pods().get_opt("subp").await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!host_mounts.contains(&uid), "mounts of the pod left");
    assert!(!bed.dir.path().join("root/pods").join(&uid).exists());
    bed.pass()
}

#[tokio::test]
async fn a_missing_config_map_volume_waits_and_an_optional_one_is_empty() -> Result<()> {
    let bed = Bed::start("vol-cmwait", false).await?;
    bed.create_pod(
        "wait",
        json!({
            "containers": [{"name": "main", "image": busybox(), "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "opt", "mountPath": "/opt"},
                                 {"name": "later", "mountPath": "/later"}]}],
            "volumes": [
                {"name": "opt", "configMap": {"name": "nope", "optional": true}},
                {"name": "later", "configMap": {"name": "later"}}]
        }),
    )
    .await?;
    bed.wait_pod(
        "wait",
        LONG,
        "ContainerCreating",
        |p| match waiting_reason(p) {
            Some((r, _)) if r == "ContainerCreating" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = bed.pods().get("wait").await?;
    assert_eq!(phase(&pod), "Pending");
    assert_eq!(
        waiting_reason(&pod).map(|w| w.0).as_deref(),
        Some("ContainerCreating"),
        "no container without its volume"
    );
    bed.config_map("later", json!({"k": "v"})).await?;
    let id = bed.running("wait").await?;
    assert_eq!(cat(&id, "/later/k").await?, "v");
    let (code, ls) = exec(&id, &["ls", "/opt"]).await?;
    assert_eq!(
        (code, ls.as_str()),
        (0, ""),
        "an optional missing ConfigMap is an empty volume"
    );
    bed.pass()
}

/// `stat -c '%g %a'` of `path` (following symlinks) in container `id`: group and mode.
async fn group_mode(id: &str, path: &str) -> Result<String> {
    let (code, out) = exec(id, &["stat", "-L", "-c", "%g %a", path]).await?;
    ensure!(code == 0, "stat {path}: exit {code}");
    Ok(out.trim().to_string())
}

#[tokio::test]
async fn fs_group_owns_the_volumes_and_joins_the_groups() -> Result<()> {
    let bed = Bed::start("vol-fsgroup", false).await?;
    bed.config_map("cfg", json!({"a": "1"})).await?;
    let created = bed
        .create_pod(
            "fsg",
            json!({
                "securityContext": {"fsGroup": 2345, "runAsUser": 1000},
                "containers": [{
                    "name": "main", "image": busybox(), "command": ["sleep", "3600"],
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/data"},
                        {"name": "mem", "mountPath": "/mem"},
                        {"name": "cm", "mountPath": "/cm"},
                        {"name": "proj", "mountPath": "/proj"}]}],
                "volumes": [
                    {"name": "data", "emptyDir": {}},
                    {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
                    {"name": "cm", "configMap": {"name": "cfg", "defaultMode": 0o400}},
                    {"name": "proj", "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "audience": "dh-test"}}]}}]
            }),
        )
        .await?;
    let id = bed.running("fsg").await?;
    // fsGroup is one of the container's groups.
    let (code, groups) = exec(&id, &["id", "-G"]).await?;
    ensure!(code == 0, "id -G: exit {code}");
    assert!(
        groups.split_whitespace().any(|g| g == "2345"),
        "groups {groups:?}"
    );
    let (_, uid) = exec(&id, &["id", "-u"]).await?;
    assert_eq!(uid.trim(), "1000");
    // The emptyDirs: group 2345, setgid, writable by the group.
    assert_eq!(group_mode(&id, "/data").await?, "2345 2777");
    assert_eq!(group_mode(&id, "/mem").await?, "2345 2777");
    let (code, out) = exec(
        &id,
        &[
            "sh",
            "-c",
            "mkdir /data/d && echo hi > /data/d/f && stat -c '%u %g' /data/d/f && stat -c '%g %a' /data/d",
        ],
    )
    .await?;
    assert_eq!(code, 0, "writing to the emptyDir as uid 1000: {out}");
    // New files inherit the group through the setgid directories.
    assert_eq!(out, "1000 2345\n2345 2755\n");
    // The configMap's files: the group with its read bits (0400 → 0440), readable by uid
    // 1000 through the group only (the files are root's).
    assert_eq!(group_mode(&id, "/cm/a").await?, "2345 440");
    assert_eq!(cat(&id, "/cm/a").await?, "1");
    let (_, ls) = exec(&id, &["ls", "-ln", "/cm/..data/"]).await?;
    let owners: Vec<Vec<&str>> = ls
        .lines()
        .filter(|l| l.ends_with(" a"))
        .map(|l| l.split_whitespace().skip(2).take(2).collect())
        .collect();
    assert_eq!(owners, vec![vec!["0", "2345"]], "ls -ln: {ls}");
    // The token: 0600 with an fsGroup, 0640 after the ownership walk, as upstream.
    assert_eq!(group_mode(&id, "/proj/token").await?, "2345 640");
    let token = cat(&id, "/proj/token").await?;
    ensure!(token.split('.').count() == 3, "not a JWT: {token}");
    // A rewrite of the configMap volume keeps the ownership.
    Api::<ConfigMap>::namespaced(bed.client.clone(), &bed.ns)
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "changed", "b": "new"}})),
        )
        .await?;
    eventually(Duration::from_secs(150), "the ConfigMap update", || async {
        let b = exec(&id, &["cat", "/cm/b"]).await?.1;
        Ok(if b == "new" {
            Ok(())
        } else {
            Err(format!("b={b:?}"))
        })
    })
    .await?;
    assert_eq!(cat(&id, "/cm/a").await?, "changed");
    assert_eq!(group_mode(&id, "/cm/a").await?, "2345 440");
    assert_eq!(group_mode(&id, "/cm/b").await?, "2345 440");
    assert_eq!(group_mode(&id, "/cm/..data").await?, "2345 2755");
    // Deletion removes the owned volumes, the tmpfs included.
    let uid = created.metadata.uid.clone().unwrap_or_default();
    bed.pods().delete("fsg", &DeleteParams::default()).await?;
    eventually(LONG, "pod gone", || async {
        Ok(match bed.pods().get_opt("fsg").await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    assert!(!bed.dir.path().join("root/pods").join(&uid).exists());
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!host_mounts.contains(&uid), "mounts of the pod left");
    bed.pass()
}
