//! A container's environment, as upstream's `makeEnvironmentVariables`: `envFrom`
//! (ConfigMaps and Secrets, with prefix and optional; keys that are not valid variable names
//! are skipped), then `env` in order with `$(VAR)` expansion of `value`, `fieldRef`,
//! `resourceFieldRef` (limits default to the node's allocatable), `configMapKeyRef` and
//! `secretKeyRef`, then the service variables ([`super::services`]) the container does not
//! define (they are visible to `$(VAR)`). ConfigMaps and Secrets are read from the pod's namespace through the API
//! ([`fetch_objects`]) before the pure [`environment`] runs; a kubelet without an API client
//! (standalone) refuses references to them with a clear error.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use deckhand_proto::cri::KeyValue;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, ResourceFieldSelector, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::Api;

use super::spec::{self, RuntimeFacts, expand};
use super::worker::Context;
use crate::quantity::{self, Amount};

/// ConfigMaps and Secrets of the pod's namespace that the pod refers to (`None`: not found).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// Whether there is an API client (false: standalone, nothing can be read).
    pub api: bool,
    /// The pod's namespace.
    pub namespace: String,
    /// ConfigMaps by name.
    pub config_maps: HashMap<String, Option<ConfigMap>>,
    /// Secrets by name.
    pub secrets: HashMap<String, Option<Secret>>,
}

impl Objects {
    /// ConfigMap `name`: `Ok(None)` when it does not exist.
    pub fn config_map(&self, name: &str) -> Result<Option<&ConfigMap>, String> {
        if !self.api {
            return Err(format!(
                "couldn't get configMap {}/{name}: the kubelet has no API client (standalone pods may not reference ConfigMaps)",
                self.namespace
            ));
        }
        match self.config_maps.get(name) {
            Some(c) => Ok(c.as_ref()),
            None => Err(format!(
                "couldn't get configMap {}/{name}: not fetched",
                self.namespace
            )),
        }
    }

    /// Secret `name`: `Ok(None)` when it does not exist.
    pub fn secret(&self, name: &str) -> Result<Option<&Secret>, String> {
        if !self.api {
            return Err(format!(
                "couldn't get secret {}/{name}: the kubelet has no API client (standalone pods may not reference Secrets)",
                self.namespace
            ));
        }
        match self.secrets.get(name) {
            Some(s) => Ok(s.as_ref()),
            None => Err(format!(
                "couldn't get secret {}/{name}: not fetched",
                self.namespace
            )),
        }
    }
}

/// The node's allocatable resources: the default of unset limits in `resourceFieldRef`.
#[derive(Debug, Clone, Copy)]
pub struct Allocatable {
    /// CPU.
    pub cpu: Amount,
    /// Memory, bytes.
    pub memory: Amount,
    /// Ephemeral storage, bytes.
    pub ephemeral_storage: Amount,
}

impl Default for Allocatable {
    fn default() -> Allocatable {
        Allocatable {
            cpu: Amount::zero(quantity::Format::DecimalSi),
            memory: Amount::zero(quantity::Format::BinarySi),
            ephemeral_storage: Amount::zero(quantity::Format::BinarySi),
        }
    }
}

impl Allocatable {
    /// From a Node's `status.allocatable`, `fallback` for what it lacks.
    pub fn from_node(node: Option<&Node>, fallback: Allocatable) -> Allocatable {
        let list = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.allocatable.as_ref());
        let get = |k: &str, d: Amount| {
            list.and_then(|l| l.get(k))
                .and_then(|q| quantity::parse_quantity(q).ok())
                .unwrap_or(d)
        };
        Allocatable {
            cpu: get("cpu", fallback.cpu),
            memory: get("memory", fallback.memory),
            ephemeral_storage: get("ephemeral-storage", fallback.ephemeral_storage),
        }
    }
}

/// Everything beyond the pod that the environment and the volumes read.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Referenced ConfigMaps and Secrets.
    pub objects: Objects,
    /// The node's allocatable.
    pub allocatable: Allocatable,
    /// Host paths prepared for the container's subPath mounts, by the mount's index.
    pub sub_paths: HashMap<usize, std::path::PathBuf>,
    /// The pod's managed `/etc/hosts`, to be mounted in the container.
    pub etc_hosts: Option<std::path::PathBuf>,
    /// A fresh host file for this container's `terminationMessagePath`.
    pub termination_log: Option<std::path::PathBuf>,
    /// The service variables ([`super::services::service_env`]): after `envFrom` and `env`,
    /// which override them, and visible to their `$(VAR)` expansion.
    pub services: BTreeMap<String, String>,
}

/// The names of the ConfigMaps and Secrets `containers` (their env and envFrom) and, with
/// `volumes`, the pod's volumes refer to.
pub fn referenced(
    pod: &Pod,
    containers: &[&Container],
    volumes: bool,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut cms, mut secrets) = (BTreeSet::new(), BTreeSet::new());
    for c in containers {
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &e.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
        for e in c.env.iter().flatten() {
            let Some(from) = &e.value_from else { continue };
            if let Some(r) = &from.config_map_key_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &from.secret_key_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    if volumes {
        for v in spec::spec(pod).volumes.iter().flatten() {
            if let Some(c) = &v.config_map {
                cms.insert(c.name.clone());
            }
            if let Some(s) = &v.secret {
                secrets.insert(s.secret_name.clone().unwrap_or_default());
            }
            for s in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(c) = &s.config_map {
                    cms.insert(c.name.clone());
                }
                if let Some(c) = &s.secret {
                    secrets.insert(c.name.clone());
                }
            }
        }
    }
    (cms, secrets)
}

/// Reads the named ConfigMaps and Secrets of `namespace` (a missing one is `None`). Without a
/// client the result says so and every lookup fails with a clear error.
pub async fn fetch_objects(
    client: Option<&kube::Client>,
    namespace: &str,
    config_maps: &BTreeSet<String>,
    secrets: &BTreeSet<String>,
) -> Result<Objects, String> {
    let mut out = Objects {
        api: client.is_some(),
        namespace: namespace.to_string(),
        ..Default::default()
    };
    let Some(client) = client else {
        return Ok(out);
    };
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for name in config_maps {
        let got = cm_api
            .get_opt(name)
            .await
            .map_err(|e| format!("couldn't get configMap {namespace}/{name}: {e}"))?;
        out.config_maps.insert(name.clone(), got);
    }
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in secrets {
        let got = secret_api
            .get_opt(name)
            .await
            .map_err(|e| format!("couldn't get secret {namespace}/{name}: {e}"))?;
        out.secrets.insert(name.clone(), got);
    }
    Ok(out)
}

/// Whether `name` is a valid environment variable name (upstream's `IsEnvVarName`).
pub fn is_env_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_') => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Ceiling of `a / b` for `b > 0`.
fn ceil_div(a: i128, b: i128) -> i128 {
    a.div_euclid(b) + i128::from(a.rem_euclid(b) != 0)
}

/// A `resourceFieldRef` value of container `c` (upstream's `ExtractContainerResourceValue`
/// after `MergeContainerResourceLimits`): unset limits are the node's allocatable; CPU is
/// `ceil(millicores / divisor millicores)`, memory and ephemeral storage
/// `ceil(bytes / divisor bytes)`.
pub fn resource_field_value(
    c: &Container,
    sel: &ResourceFieldSelector,
    allocatable: &Allocatable,
) -> Result<String, String> {
    // An unset or zero divisor (the API server defaults it to 0) is 1.
    let one = Amount::from_units(1, quantity::Format::DecimalSi);
    let divisor = match &sel.divisor {
        Some(d) if !d.0.is_empty() => quantity::parse_quantity(d)
            .map_err(|e| format!("resourceFieldRef {:?}: divisor: {e}", sel.resource))?,
        _ => one,
    };
    let divisor = if divisor.millis() == 0 { one } else { divisor };
    let r = c.resources.as_ref();
    let get = |which: Option<&BTreeMap<String, Quantity>>, k: &str| {
        which
            .and_then(|m| m.get(k))
            .map(quantity::parse_quantity)
            .transpose()
            .map_err(|e| format!("resourceFieldRef {:?}: {e}", sel.resource))
    };
    let limits = r.and_then(|r| r.limits.as_ref());
    let requests = r.and_then(|r| r.requests.as_ref());
    let zero = Amount::zero(quantity::Format::DecimalSi);
    let (value, cpu) = match sel.resource.as_str() {
        "limits.cpu" => (get(limits, "cpu")?.unwrap_or(allocatable.cpu), true),
        "limits.memory" => (get(limits, "memory")?.unwrap_or(allocatable.memory), false),
        "limits.ephemeral-storage" => (
            get(limits, "ephemeral-storage")?.unwrap_or(allocatable.ephemeral_storage),
            false,
        ),
        // Requests are defaulted from limits by the API server; unset ones are zero.
        "requests.cpu" => (get(requests, "cpu")?.unwrap_or(zero), true),
        "requests.memory" => (get(requests, "memory")?.unwrap_or(zero), false),
        "requests.ephemeral-storage" => {
            (get(requests, "ephemeral-storage")?.unwrap_or(zero), false)
        }
        other => return Err(format!("unsupported container resource : {other}")),
    };
    let v = if cpu {
        if divisor.millis() <= 0 {
            return Err(format!(
                "resourceFieldRef {:?}: divisor must be positive",
                sel.resource
            ));
        }
        ceil_div(value.millis(), divisor.millis())
    } else {
        let d = divisor.units();
        if d <= 0 {
            return Err(format!(
                "resourceFieldRef {:?}: divisor must be positive",
                sel.resource
            ));
        }
        ceil_div(value.units(), d)
    };
    Ok(v.to_string())
}

/// Sets `key` to `value`, in place when it is already there (a later definition wins).
fn set(out: &mut Vec<KeyValue>, seen: &mut HashMap<String, String>, key: &str, value: String) {
    seen.insert(key.to_string(), value.clone());
    match out.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => kv.value = value,
        None => out.push(KeyValue {
            key: key.to_string(),
            value,
        }),
    }
}

/// A container's environment in order: `envFrom` sources (keys sorted), then `env`, with
/// `$(VAR)` in `value` expanded against the variables before it. Keys of `envFrom` that are
/// not valid names are skipped (and logged). An error is a `CreateContainerConfigError`.
pub fn environment(
    pod: &Pod,
    c: &Container,
    facts: &RuntimeFacts,
    resolved: &Resolved,
) -> Result<Vec<KeyValue>, String> {
    environment_checked(pod, c, facts, resolved).map(|(env, _)| env)
}

/// [`environment`], with the `envFrom` keys skipped as invalid names (sorted), for upstream's
/// `InvalidEnvironmentVariableNames` event.
pub fn environment_checked(
    pod: &Pod,
    c: &Container,
    facts: &RuntimeFacts,
    resolved: &Resolved,
) -> Result<(Vec<KeyValue>, Vec<String>), String> {
    let objects = &resolved.objects;
    let ns = spec::ids(pod).1;
    let mut out: Vec<KeyValue> = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut invalid: Vec<String> = Vec::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data: BTreeMap<String, String> = if let Some(r) = &from.config_map_ref {
            match objects.config_map(&r.name)? {
                Some(cm) => cm.data.clone().unwrap_or_default(),
                None if r.optional.unwrap_or(false) => continue,
                None => return Err(format!("configmap {:?} not found", r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match objects.secret(&r.name)? {
                Some(s) => s
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
                    .collect(),
                None if r.optional.unwrap_or(false) => continue,
                None => return Err(format!("secret {:?} not found", r.name)),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            let key = format!("{prefix}{k}");
            if !is_env_var_name(&key) {
                invalid.push(key);
                continue;
            }
            set(&mut out, &mut seen, &key, v);
        }
    }
    invalid.sort();
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                spec::field_value(pod, &f.field_path, facts)?
            } else if let Some(r) = &from.resource_field_ref {
                // In env, an empty containerName is this container.
                let target = match r.container_name.as_deref() {
                    Some(n) if !n.is_empty() && n != c.name => find_container(pod, n)
                        .ok_or_else(|| format!("env {:?}: no container {n:?}", e.name))?,
                    _ => c,
                };
                resource_field_value(target, r, &resolved.allocatable)?
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                match objects.config_map(&r.name)? {
                    None if optional => continue,
                    None => return Err(format!("configmap {:?} not found", r.name)),
                    Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                }
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                match objects.secret(&r.name)? {
                    None if optional => continue,
                    None => return Err(format!("secret {:?} not found", r.name)),
                    Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                        Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                }
            } else {
                return Err(format!("env {:?}: empty valueFrom", e.name));
            }
        } else {
            let v = e.value.clone().unwrap_or_default();
            expand(&v, &|n| {
                seen.get(n).or_else(|| resolved.services.get(n)).cloned()
            })
        };
        set(&mut out, &mut seen, &e.name, value);
    }
    // Service variables last, unless the container defines them (as upstream).
    for (k, v) in &resolved.services {
        if !seen.contains_key(k) {
            out.push(KeyValue {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    Ok((out, invalid))
}

/// The pod's container (init or main) called `name`.
pub fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let s = spec::spec(pod);
    s.containers
        .iter()
        .chain(s.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

/// Whether anything in the pod reads a `resourceFieldRef` (env or downward API volumes).
fn needs_allocatable(pod: &Pod) -> bool {
    let s = spec::spec(pod);
    let env = s
        .containers
        .iter()
        .chain(s.init_containers.iter().flatten())
        .flat_map(|c| c.env.iter().flatten())
        .any(|e| {
            e.value_from
                .as_ref()
                .is_some_and(|f| f.resource_field_ref.is_some())
        });
    let volumes = s.volumes.iter().flatten().any(|v| {
        let direct = v.downward_api.iter().flat_map(|d| d.items.iter().flatten());
        let projected = v
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|s| s.downward_api.as_ref())
            .flat_map(|d| d.items.iter().flatten());
        direct
            .chain(projected)
            .any(|i| i.resource_field_ref.is_some())
    });
    env || volumes
}

/// The node's allocatable: the Node's `status.allocatable` when there is a client, the
/// machine's capacity otherwise (or for what the Node lacks).
pub async fn node_allocatable(ctx: &Context) -> Allocatable {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let disk = crate::machine::fs_stats(&ctx.pods_dir)
        .map(|f| f.capacity_bytes)
        .unwrap_or(0);
    let fallback = Allocatable {
        cpu: Amount::from_units(cpus, quantity::Format::DecimalSi),
        memory: Amount::from_units(ctx.memory_capacity, quantity::Format::BinarySi),
        ephemeral_storage: Amount::from_units(disk, quantity::Format::BinarySi),
    };
    let node = match &ctx.client {
        Some(client) => Api::<Node>::all(client.clone())
            .get_opt(&ctx.node_name)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!("reading the Node for its allocatable: {e}");
                None
            }),
        None => None,
    };
    Allocatable::from_node(node.as_ref(), fallback)
}

/// What `containers` (and, with `volumes`, the pod's volumes) read beyond the pod: the
/// ConfigMaps and Secrets of its namespace, the node's allocatable and, for containers, the
/// service variables from the kubelet's Service cache.
pub async fn resolve(
    ctx: &Context,
    pod: &Pod,
    containers: &[&Container],
    volumes: bool,
) -> Result<Resolved, String> {
    let (cms, secrets) = referenced(pod, containers, volumes);
    let objects = fetch_objects(ctx.client.as_ref(), spec::ids(pod).1, &cms, &secrets).await?;
    let allocatable = if needs_allocatable(pod) {
        node_allocatable(ctx).await
    } else {
        Allocatable::default()
    };
    // Service variables for a container's environment (none in standalone mode).
    let services = match &ctx.services {
        Some(cache) if !containers.is_empty() => {
            let links = spec::spec(pod).enable_service_links.unwrap_or(true);
            cache.env(spec::ids(pod).1, links).await?
        }
        _ => BTreeMap::new(),
    };
    Ok(Resolved {
        objects,
        allocatable,
        services,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    fn alloc() -> Allocatable {
        let q = |s: &str| quantity::parse_quantity(&Quantity(s.into())).expect("quantity");
        Allocatable {
            cpu: q("2"),
            memory: q("8Gi"),
            ephemeral_storage: q("100Gi"),
        }
    }

    #[test]
    fn resource_field_math_as_upstream() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c",
            "resources": {"limits": {"cpu": "1500m", "memory": "64Mi"},
                          "requests": {"cpu": "250m", "memory": "32Mi"}}}))
        .expect("container");
        let sel = |r: &str, d: Option<&str>| ResourceFieldSelector {
            resource: r.into(),
            divisor: d.map(|d| Quantity(d.into())),
            container_name: None,
        };
        let a = alloc();
        let v = |r, d| resource_field_value(&c, &sel(r, d), &a).expect("value");
        assert_eq!(v("limits.cpu", None), "2", "1.5 cores rounded up");
        assert_eq!(v("limits.cpu", Some("1m")), "1500");
        assert_eq!(v("requests.cpu", Some("100m")), "3");
        assert_eq!(v("limits.memory", None), (64u64 << 20).to_string());
        assert_eq!(v("limits.memory", Some("1Mi")), "64");
        assert_eq!(
            v("requests.memory", Some("1M")),
            "34",
            "33554432 / 1e6 rounded up"
        );
        // Unset limits are the node's allocatable.
        assert_eq!(v("limits.ephemeral-storage", Some("1Gi")), "100");
        let empty = Container {
            name: "e".into(),
            ..Default::default()
        };
        assert_eq!(
            resource_field_value(&empty, &sel("limits.cpu", Some("1m")), &a).expect("cpu"),
            "2000"
        );
        assert_eq!(
            resource_field_value(&empty, &sel("requests.memory", None), &a).expect("mem"),
            "0"
        );
        assert!(resource_field_value(&c, &sel("limits.gpu", None), &a).is_err());
        assert_eq!(v("limits.cpu", Some("0")), "2", "a zero divisor is 1");
        assert!(resource_field_value(&c, &sel("limits.cpu", Some("-1")), &a).is_err());
    }

    #[test]
    fn env_from_config_maps_and_secrets() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [{"name": "c",
                "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "P_"},
                            {"secretRef": {"name": "gone", "optional": true}},
                            {"secretRef": {"name": "s"}}],
                "env": [
                    {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "a"}}},
                    {"name": "B", "value": "$(A)-$(P_a)-$(S)"},
                    {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "nokey", "optional": true}}},
                    {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "S"}}},
                    {"name": "M", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                ]}]}
        }));
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cm"}, "data": {"a": "1", "bad key": "x"}}))
        .expect("cm");
        let s = Secret {
            data: Some(BTreeMap::from([(
                "S".to_string(),
                ByteString(b"sv".to_vec()),
            )])),
            ..Default::default()
        };
        let resolved = Resolved {
            objects: Objects {
                api: true,
                namespace: "n".into(),
                config_maps: HashMap::from([("cm".to_string(), Some(cm))]),
                secrets: HashMap::from([("s".to_string(), Some(s)), ("gone".to_string(), None)]),
            },
            allocatable: alloc(),
            ..Default::default()
        };
        let env = environment(
            &p,
            &spec::spec(&p).containers[0],
            &RuntimeFacts::default(),
            &resolved,
        )
        .expect("env");
        let kv: Vec<(String, String)> = env.into_iter().map(|k| (k.key, k.value)).collect();
        let want = [
            ("P_a", "1"),
            ("S", "sv"),
            ("A", "1"),
            ("B", "1-1-sv"),
            ("X", "sv"),
            ("M", "8192"),
        ];
        assert_eq!(
            kv,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );

        // A required key that is missing, a missing ConfigMap, and no API client.
        let missing = pod(serde_json::json!({"metadata": {"namespace": "n"},
            "spec": {"containers": [{"name": "c", "env": [
                {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "nokey"}}}]}]}}));
        let c = &spec::spec(&missing).containers[0];
        let err =
            environment(&missing, c, &RuntimeFacts::default(), &resolved).expect_err("missing key");
        assert_eq!(err, "couldn't find key nokey in ConfigMap n/cm");
        let mut none = resolved.clone();
        none.objects.config_maps.insert("cm".into(), None);
        let err = environment(&missing, c, &RuntimeFacts::default(), &none).expect_err("no cm");
        assert_eq!(err, "configmap \"cm\" not found");
        let standalone = Resolved::default();
        let err = environment(&missing, c, &RuntimeFacts::default(), &standalone)
            .expect_err("standalone");
        assert!(err.contains("no API client"), "{err}");
    }

    #[test]
    fn service_variables_come_last_and_expand() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [{"name": "c",
                "envFrom": [{"configMapRef": {"name": "cm"}}],
                "env": [
                    {"name": "WEB_SERVICE_PORT", "value": "8080"},
                    {"name": "URL", "value": "http://$(WEB_SERVICE_HOST):$(WEB_SERVICE_PORT)/$(WEB_PORT)"},
                    {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "no", "optional": true}}},
                ]}]}
        }));
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cm"}, "data": {"WEB_PORT": "cm"}}))
        .expect("cm");
        let resolved = Resolved {
            objects: Objects {
                api: true,
                namespace: "n".into(),
                config_maps: HashMap::from([("cm".to_string(), Some(cm))]),
                ..Default::default()
            },
            services: BTreeMap::from(
                [
                    ("WEB_SERVICE_HOST", "10.0.0.1"),
                    ("WEB_SERVICE_PORT", "80"),
                    ("WEB_PORT", "tcp://10.0.0.1:80"),
                    ("O", "service"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string())),
            ),
            ..Default::default()
        };
        let env = environment(
            &p,
            &spec::spec(&p).containers[0],
            &RuntimeFacts::default(),
            &resolved,
        )
        .expect("env");
        let kv: Vec<(String, String)> = env.into_iter().map(|k| (k.key, k.value)).collect();
        let want = [
            ("WEB_PORT", "cm"),
            ("WEB_SERVICE_PORT", "8080"),
            ("URL", "http://10.0.0.1:8080/cm"),
            // An optional reference that is missing leaves the service variable.
            ("O", "service"),
            ("WEB_SERVICE_HOST", "10.0.0.1"),
        ];
        assert_eq!(
            kv,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );
    }

    #[test]
    fn env_var_names() {
        for ok in ["A", "_a", "a.b-c", "-x"] {
            assert!(is_env_var_name(ok), "{ok}");
        }
        for bad in ["", "1a", "a b", "a=b", "ä"] {
            assert!(!is_env_var_name(bad), "{bad}");
        }
    }
}
