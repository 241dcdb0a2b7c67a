//! deckhand-kubelet's service environment variables against the test bed, in the style of
//! volumes.rs (whose helpers are copied here): the built kubelet runs with node credentials,
//! Services and pods are created through an admin client, and the containers print their
//! environment to their log.

use anyhow::{Result, anyhow, ensure};
use deckhand_tests::testbed::unique_name;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

mod support;
use support::*;

impl Bed {
    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a Service of this namespace (no selector) and gives it as the API server
    /// stored it (with its allocated ClusterIP).
    async fn service(&self, name: &str, spec: serde_json::Value) -> Result<Service> {
        let s: Service = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns }, "spec": spec }))?;
        Ok(self.services().create(&PostParams::default(), &s).await?)
    }

    /// Runs a pod printing its service-looking variables (sorted) and gives them.
    async fn env_of(&self, name: &str, extra: serde_json::Value) -> Result<Vec<String>> {
        let mut container = json!({
            "name": "main", "image": busybox(),
            "command": ["sh", "-c", "env | grep -E '^(DH_|KUBERNETES_|X=|Y=)' | sort"],
        });
        let mut spec = json!({ "restartPolicy": "Never" });
        if let (Some(c), Some(s), Some(e)) = (
            container.as_object_mut(),
            spec.as_object_mut(),
            extra.as_object(),
        ) {
            for (k, v) in e {
                if k == "env" {
                    c.insert(k.clone(), v.clone());
                } else {
                    s.insert(k.clone(), v.clone());
                }
            }
        }
        spec["containers"] = json!([container]);
        self.create_pod(name, spec).await?;
        Ok(self
            .output(name, "main")
            .await?
            .lines()
            .map(str::to_string)
            .collect())
    }
}

/// The ClusterIP of a Service as the API server allocated it.
fn cluster_ip(s: &Service) -> Result<String> {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None")
        .ok_or_else(|| anyhow!("no clusterIP in {s:?}"))
}

/// The variables the master service `kubernetes` of `default` gives (its ClusterIP and its
/// one port, named https, read from the API server).
async fn master_vars(client: &kube::Client) -> Result<Vec<String>> {
    let s = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await?;
    let ip = cluster_ip(&s)?;
    let ports = s.spec.and_then(|s| s.ports).unwrap_or_default();
    ensure!(ports.len() == 1, "kubernetes ports: {ports:?}");
    let (port, name) = (ports[0].port, ports[0].name.clone().unwrap_or_default());
    ensure!(name == "https", "kubernetes port name {name:?}");
    Ok(vec![
        format!("KUBERNETES_PORT=tcp://{ip}:{port}"),
        format!("KUBERNETES_PORT_{port}_TCP=tcp://{ip}:{port}"),
        format!("KUBERNETES_PORT_{port}_TCP_ADDR={ip}"),
        format!("KUBERNETES_PORT_{port}_TCP_PORT={port}"),
        format!("KUBERNETES_PORT_{port}_TCP_PROTO=tcp"),
        format!("KUBERNETES_SERVICE_HOST={ip}"),
        format!("KUBERNETES_SERVICE_PORT={port}"),
        format!("KUBERNETES_SERVICE_PORT_HTTPS={port}"),
    ])
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn services_of_the_namespace_give_variables_that_env_overrides() -> Result<()> {
    let bed = Bed::start("svc-env", false).await?;
    let web = bed
        .service(
            "dh-web",
            json!({"ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "dns-udp", "port": 53, "protocol": "UDP"}]}),
        )
        .await?;
    bed.service(
        "dh-headless",
        json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
    )
    .await?;
    let ip = cluster_ip(&web)?;
    let got = bed
        .env_of(
            "links",
            json!({"env": [
                {"name": "DH_WEB_SERVICE_PORT", "value": "8080"},
                {"name": "X", "value": "$(DH_WEB_SERVICE_HOST)"},
                {"name": "Y", "value": "$(KUBERNETES_SERVICE_HOST):$(DH_WEB_SERVICE_PORT_DNS_UDP)"}]}),
        )
        .await?;
    let master = master_vars(&bed.client).await?;
    let master_ip = master
        .iter()
        .find_map(|l| l.strip_prefix("KUBERNETES_SERVICE_HOST="))
        .ok_or_else(|| anyhow!("no master host"))?
        .to_string();
    let mut want = vec![
        format!("DH_WEB_PORT=tcp://{ip}:80"),
        format!("DH_WEB_PORT_53_UDP=udp://{ip}:53"),
        format!("DH_WEB_PORT_53_UDP_ADDR={ip}"),
        "DH_WEB_PORT_53_UDP_PORT=53".to_string(),
        "DH_WEB_PORT_53_UDP_PROTO=udp".to_string(),
        format!("DH_WEB_PORT_80_TCP=tcp://{ip}:80"),
        format!("DH_WEB_PORT_80_TCP_ADDR={ip}"),
        "DH_WEB_PORT_80_TCP_PORT=80".to_string(),
        "DH_WEB_PORT_80_TCP_PROTO=tcp".to_string(),
        format!("DH_WEB_SERVICE_HOST={ip}"),
        // The container's env wins over the service variable.
        "DH_WEB_SERVICE_PORT=8080".to_string(),
        "DH_WEB_SERVICE_PORT_DNS_UDP=53".to_string(),
        "DH_WEB_SERVICE_PORT_HTTP=80".to_string(),
        format!("X={ip}"),
        format!("Y={master_ip}:53"),
    ];
    want.extend(master);
    // Nothing of the headless Service.
    assert_eq!(got, sorted(want));
    bed.pass()
}

#[tokio::test]
async fn without_service_links_only_the_master_service_and_the_cache_follows() -> Result<()> {
    let bed = Bed::start("svc-nolinks", false).await?;
    bed.service("dh-first", json!({"ports": [{"port": 81}]}))
        .await?;
    let master = master_vars(&bed.client).await?;
    let got = bed
        .env_of("nolinks", json!({"enableServiceLinks": false}))
        .await?;
    assert_eq!(got, sorted(master.clone()));
    // A Service created and one deleted after the kubelet listed them: the watch brings both.
    let late = bed
        .service(
            "dh-late",
            json!({"ports": [{"port": 82, "protocol": "UDP"}]}),
        )
        .await?;
    bed.services()
        .delete("dh-first", &DeleteParams::default())
        .await?;
    let ip = cluster_ip(&late)?;
    let got = eventually(LONG, "the new Service in a new pod's env", || async {
        // A fresh pod per attempt: the kubelet's cache may lag the API server a little.
        let name = unique_name("late");
        let got = bed.env_of(&name, json!({})).await?;
        Ok(if got.iter().any(|l| l.starts_with("DH_FIRST_")) {
            Err(format!("the deleted Service is still there: {got:?}"))
        } else {
            Ok(got)
        })
    })
    .await?;
    let mut want = vec![
        format!("DH_LATE_PORT=udp://{ip}:82"),
        format!("DH_LATE_PORT_82_UDP=udp://{ip}:82"),
        format!("DH_LATE_PORT_82_UDP_ADDR={ip}"),
        "DH_LATE_PORT_82_UDP_PORT=82".to_string(),
        "DH_LATE_PORT_82_UDP_PROTO=udp".to_string(),
        format!("DH_LATE_SERVICE_HOST={ip}"),
        "DH_LATE_SERVICE_PORT=82".to_string(),
    ];
    want.extend(master);
    assert_eq!(got, sorted(want));
    bed.pass()
}

#[tokio::test]
async fn a_standalone_kubelet_gives_no_service_variables() -> Result<()> {
    let bed = Bed::start_with("svc-alone", true, false).await?;
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "alone", "namespace": bed.ns},
        "spec": {"hostNetwork": true, "restartPolicy": "Never", "containers": [{
            "name": "main", "image": busybox(),
            "command": ["sh", "-c", "env | grep -E '^(DH_|KUBERNETES_)' | sort; echo done"]}]}
    });
    std::fs::write(
        bed.static_dir().join("alone.json"),
        serde_json::to_vec(&pod)?,
    )?;
    let logs = bed.dir.path().join("logs");
    let prefix = format!("{}_alone-{}_", bed.ns, bed.node);
    let out = eventually(LONG, "the static pod's output", || async {
        let Ok(dir) = std::fs::read_dir(&logs) else {
            return Ok(Err("no log directory".to_string()));
        };
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let text = std::fs::read_to_string(e.path().join("main/0.log")).unwrap_or_default();
            let out: String = text
                .lines()
                .filter_map(|l| l.splitn(4, ' ').nth(3))
                .map(|l| format!("{l}\n"))
                .collect();
            if out.ends_with("done\n") {
                return Ok(Ok(out));
            }
        }
        Ok(Err("no output yet".to_string()))
    })
    .await?;
    assert_eq!(out, "done\n");
    bed.pass()
}
