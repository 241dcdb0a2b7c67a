//! The test bed itself, seen through the clients Deckhand uses: the registries serve the
//! project's test images, the API server stores and watches pods, containerd answers.

use std::time::Duration;

use anyhow::{Context, Result};
use deckhand_tests::images::ImageIndex;
use deckhand_tests::testbed::{Testbed, install_crypto_provider, unique_name};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

fn oci_client() -> Client {
    install_crypto_provider();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

fn reference(s: &str) -> Reference {
    match s.parse() {
        Ok(r) => r,
        Err(e) => panic!("bad reference {s}: {e}"),
    }
}

#[tokio::test]
async fn busybox_manifest_by_tag_and_by_digest_agree() -> Result<()> {
    let tb = Testbed::get();
    let index = ImageIndex::load(&tb.images_index())?;
    let recorded = index.get("dh/busybox:latest")?;
    let client = oci_client();

    let by_tag = reference(&format!("{}/dh/busybox:latest", tb.registry()));
    let (tag_manifest, tag_digest) = client
        .pull_manifest_raw(
            &by_tag,
            &RegistryAuth::Anonymous,
            &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .context("pull by tag")?;

    let by_digest = reference(&format!("{}/dh/busybox@{tag_digest}", tb.registry()));
    let (digest_manifest, digest_digest) = client
        .pull_manifest_raw(
            &by_digest,
            &RegistryAuth::Anonymous,
            &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .context("pull by digest")?;

    assert_eq!(tag_digest, digest_digest);
    assert_eq!(
        tag_manifest, digest_manifest,
        "same bytes by tag and by digest"
    );
    // The registry serves what the image builder recorded: the digest is stable and known.
    assert_eq!(tag_digest, recorded.manifest_digest);
    let parsed: serde_json::Value = serde_json::from_slice(&tag_manifest)?;
    assert_eq!(parsed["config"]["digest"], recorded.config_digest.as_str());
    Ok(())
}

#[tokio::test]
async fn auth_registry_refuses_anonymous_and_serves_with_credentials() -> Result<()> {
    let tb = Testbed::get();
    let image = reference(&format!("{}/dh/busybox:latest", tb.auth_registry()));

    let anonymous = oci_client()
        .pull_manifest(&image, &RegistryAuth::Anonymous)
        .await;
    match anonymous {
        Err(OciDistributionError::UnauthorizedError { .. }) => {}
        Err(OciDistributionError::ServerError { code: 401, .. }) => {}
        other => panic!("anonymous pull from the auth registry: expected 401, got {other:?}"),
    }

    let wrong = oci_client()
        .pull_manifest(
            &image,
            &RegistryAuth::Basic("dhuser".into(), "not-the-password".into()),
        )
        .await;
    assert!(wrong.is_err(), "a wrong password must be refused");

    let creds = tb.auth_credentials();
    let (_, digest) = oci_client()
        .pull_manifest(&image, &RegistryAuth::Basic(creds.username, creds.password))
        .await
        .context("pull with credentials")?;
    // Both registries hold the same reproducibly built image.
    let index = ImageIndex::load(&tb.images_index())?;
    assert_eq!(digest, index.get("dh/busybox:latest")?.manifest_digest);
    Ok(())
}

#[tokio::test]
async fn pod_is_stored_read_back_and_watched_to_deletion() -> Result<()> {
    let tb = Testbed::get();
    let client = tb.kube_client().await?;

    let ns_name = tb.create_namespace(&client, "foundation").await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let result = pod_round_trip(client, &ns_name).await;
    // Always remove the namespace, also when the test failed.
    let _ = namespaces.delete(&ns_name, &DeleteParams::default()).await;
    result
}

async fn pod_round_trip(client: kube::Client, ns: &str) -> Result<()> {
    let tb = Testbed::get();
    let pods: Api<Pod> = Api::namespaced(client, ns);
    let node = unique_name("node");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "dh-demo", "labels": { "app": "dh-demo" } },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "main", "image": format!("{}/dh/busybox:latest", tb.registry()),
                             "command": ["sleep", "3600"] }]
        }
    }))?;
    let created = pods.create(&PostParams::default(), &pod).await?;
    let rv = created
        .metadata
        .resource_version
        .clone()
        .context("created pod has no resourceVersion")?;

    let read = pods.get("dh-demo").await?;
    let spec = read.spec.context("pod read back without spec")?;
    assert_eq!(spec.node_name.as_deref(), Some(node.as_str()));
    assert_eq!(
        spec.containers[0].command,
        Some(vec!["sleep".into(), "3600".into()])
    );
    assert_eq!(read.metadata.uid, created.metadata.uid);

    // Watch from the creation's resourceVersion, then delete: the watch must see the deletion.
    let watch = pods
        .watch(
            &WatchParams::default()
                .fields("metadata.name=dh-demo")
                .timeout(30),
            &rv,
        )
        .await?;
    let mut watch = watch.boxed();
    // Grace period 0: no kubelet runs for this node, so nothing would confirm a graceful stop.
    pods.delete("dh-demo", &DeleteParams::default().grace_period(0))
        .await?;

    let deleted = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = watch.try_next().await? {
            if let WatchEvent::Deleted(p) = event {
                return Ok::<_, anyhow::Error>(p);
            }
        }
        anyhow::bail!("watch ended without a Deleted event")
    })
    .await
    .context("no Deleted event within 30s")??;
    assert_eq!(deleted.metadata.uid, created.metadata.uid);

    match pods.get_opt("dh-demo").await? {
        None => Ok(()),
        Some(p) => anyhow::bail!("pod still present after deletion: {:?}", p.metadata),
    }
}

#[tokio::test]
async fn containerd_answers_version_and_namespaces() -> Result<()> {
    use containerd_client::services::v1::namespaces_client::NamespacesClient;
    use containerd_client::services::v1::version_client::VersionClient;
    use containerd_client::services::v1::{
        CreateNamespaceRequest, DeleteNamespaceRequest, ListNamespacesRequest, Namespace,
    };

    let tb = Testbed::get();
    let channel = containerd_client::connect(tb.containerd_socket()).await?;

    let version = VersionClient::new(channel.clone())
        .version(())
        .await?
        .into_inner();
    assert!(
        version.version.starts_with("1.6."),
        "the test bed runs containerd 1.6, got {}",
        version.version
    );

    let name = unique_name("ns");
    let mut namespaces = NamespacesClient::new(channel);
    // containerd publishes an event for the creation, in the namespace named by the request's
    // metadata (ctr sends its default one): name the new namespace itself.
    let mut create = tonic::Request::new(CreateNamespaceRequest {
        namespace: Some(Namespace {
            name: name.clone(),
            labels: [("deckhand.io/test".to_string(), "foundation".to_string())].into(),
        }),
    });
    create
        .metadata_mut()
        .insert("containerd-namespace", name.parse()?);
    namespaces.create(create).await?;
    let listed = namespaces
        .list(ListNamespacesRequest {
            filter: String::new(),
        })
        .await?
        .into_inner();
    let found = listed.namespaces.iter().find(|n| n.name == name);
    let deleted = namespaces
        .delete(DeleteNamespaceRequest { name: name.clone() })
        .await;
    let found = found.context("created namespace not listed")?;
    assert_eq!(
        found.labels.get("deckhand.io/test").map(String::as_str),
        Some("foundation")
    );
    deleted?;
    let after = namespaces
        .list(ListNamespacesRequest {
            filter: String::new(),
        })
        .await?
        .into_inner();
    assert!(after.namespaces.iter().all(|n| n.name != name));
    Ok(())
}
