//! Service environment variables, as upstream's `getServiceEnvVarMap` and
//! `envvars.FromServices`: every Service of the pod's namespace that has a ClusterIP (when
//! `enableServiceLinks`, the default) and the master service `kubernetes` of `default`
//! (always) give `{NAME}_SERVICE_HOST`, `{NAME}_SERVICE_PORT`, `{NAME}_SERVICE_PORT_{PORT}`
//! per named port and the docker-links variables `{NAME}_PORT`, `{NAME}_PORT_{port}_{PROTO}`
//! with `_PROTO`, `_PORT` and `_ADDR`.
//!
//! The Services come from a [`ServiceCache`]: one list+watch of the Services of all
//! namespaces (kube's `watcher` feeding a `reflector` store; it resumes from the last
//! resourceVersion and relists only on 410), shared by every pod worker, so that a container
//! start makes no API request for them. It exists only when the kubelet has an API client;
//! standalone pods get no service variables. A container start waits for the first list (as
//! upstream waits for its service informer), at most [`SYNC_TIMEOUT`].

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

/// The namespace of the master services (upstream's `--master-service-namespace` default).
pub const MASTER_SERVICE_NAMESPACE: &str = "default";

/// The master services: their variables are given to every pod, whatever its
/// `enableServiceLinks` says.
pub const MASTER_SERVICES: &[&str] = &["kubernetes"];

/// How long a container start waits for the first list of Services.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the Service has a ClusterIP (upstream's `IsServiceIPSet`: neither `None` nor empty).
pub fn is_service_ip_set(s: &Service) -> bool {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty() && ip != "None")
}

/// A Service (or port) name as a variable name: upper-cased, `-` as `_`.
pub fn env_var_name(name: &str) -> String {
    name.replace('-', "_").to_uppercase()
}

/// `host:port`, the host in brackets when it is an IPv6 address (Go's `net.JoinHostPort`).
pub fn join_host_port(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The docker-links variables of a Service (upstream's `makeLinkVariables`): `{NAME}_PORT`
/// for the first port, then per port `{NAME}_PORT_{port}_{PROTO}` and its `_PROTO`, `_PORT`,
/// `_ADDR`.
pub fn link_variables(s: &Service) -> Vec<(String, String)> {
    let prefix = env_var_name(s.metadata.name.as_deref().unwrap_or_default());
    let Some(spec) = s.spec.as_ref() else {
        return Vec::new();
    };
    let ip = spec.cluster_ip.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = p
            .protocol
            .as_deref()
            .filter(|p| !p.is_empty())
            .unwrap_or("TCP");
        let url = format!(
            "{}://{}",
            protocol.to_lowercase(),
            join_host_port(ip, p.port)
        );
        if i == 0 {
            // Docker special-cases the first port.
            out.push((format!("{prefix}_PORT"), url.clone()));
        }
        let port_prefix = format!("{prefix}_PORT_{}_{}", p.port, protocol.to_uppercase());
        out.push((port_prefix.clone(), url));
        out.push((format!("{port_prefix}_PROTO"), protocol.to_lowercase()));
        out.push((format!("{port_prefix}_PORT"), p.port.to_string()));
        out.push((format!("{port_prefix}_ADDR"), ip.to_string()));
    }
    out
}

/// The variables of `services` in order (upstream's `envvars.FromServices`); Services without
/// a ClusterIP give none.
pub fn from_services<S: Borrow<Service>>(services: &[S]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in services {
        let s: &Service = s.borrow();
        if !is_service_ip_set(s) {
            continue;
        }
        let Some(spec) = s.spec.as_ref() else {
            continue;
        };
        let name = env_var_name(s.metadata.name.as_deref().unwrap_or_default());
        out.push((
            format!("{name}_SERVICE_HOST"),
            spec.cluster_ip.clone().unwrap_or_default(),
        ));
        let ports = spec.ports.as_deref().unwrap_or_default();
        // Validation gives every Service with a ClusterIP a port; without one there is no
        // `_SERVICE_PORT` (upstream would index out of range).
        if let Some(first) = ports.first() {
            let port_var = format!("{name}_SERVICE_PORT");
            out.push((port_var.clone(), first.port.to_string()));
            // Every named port (only the first may be unnamed).
            for p in ports {
                if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                    out.push((
                        format!("{port_var}_{}", env_var_name(n)),
                        p.port.to_string(),
                    ));
                }
            }
        }
        out.extend(link_variables(s));
    }
    out
}

/// The service variables of a pod in `namespace` (upstream's `getServiceEnvVarMap`): the
/// master services of [`MASTER_SERVICE_NAMESPACE`] always, and with `enable_service_links`
/// every Service of `namespace`; only Services with a ClusterIP count. On a name clash the
/// pod's own namespace wins. Services are taken in name order, so that a variable two of them
/// give (`foo`'s `FOO_PORT_80_TCP_PORT` and `foo-port-80-tcp`'s `FOO_PORT_80_TCP_PORT`) is
/// always the later one's (upstream: random).
pub fn service_env<S: Borrow<Service>>(
    services: &[S],
    namespace: &str,
    enable_service_links: bool,
) -> BTreeMap<String, String> {
    let mut chosen: BTreeMap<&str, &Service> = BTreeMap::new();
    let mut own: Vec<(&str, &Service)> = Vec::new();
    for s in services {
        let s: &Service = s.borrow();
        if !is_service_ip_set(s) {
            continue;
        }
        let (Some(name), ns) = (s.metadata.name.as_deref(), s.metadata.namespace.as_deref()) else {
            continue;
        };
        let ns = ns.unwrap_or_default();
        if ns == MASTER_SERVICE_NAMESPACE && MASTER_SERVICES.contains(&name) {
            // Kept unless the pod's namespace has a Service of that name (below).
            chosen.entry(name).or_insert(s);
        } else if ns == namespace && enable_service_links {
            own.push((name, s));
        }
    }
    for (name, s) in own {
        chosen.insert(name, s);
    }
    let list: Vec<&Service> = chosen.into_values().collect();
    from_services(&list).into_iter().collect()
}

/// The kubelet's cache of the Services of all namespaces, filled by [`ServiceCache::start`].
#[derive(Clone)]
pub struct ServiceCache {
    store: Store<Service>,
    timeout: Duration,
}

impl std::fmt::Debug for ServiceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCache")
            .field("services", &self.store.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ServiceCache {
    /// The cache and the task that fills it (list+watch of Services until `shutdown`; errors
    /// are logged and retried with back-off).
    pub fn start(
        client: kube::Client,
        shutdown: CancellationToken,
    ) -> (
        ServiceCache,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (store, writer) = reflector::store::<Service>();
        let api: Api<Service> = Api::all(client);
        let task = async move {
            // Only the name, namespace and spec are read: the rest is not kept.
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|s| {
                    s.metadata.managed_fields = None;
                    s.metadata.annotations = None;
                    s.metadata.labels = None;
                    s.status = None;
                })
                .reflect(writer);
            let mut stream = std::pin::pin!(stream);
            let mut listed = false;
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = stream.next() => match e { Some(e) => e, None => return },
                };
                match event {
                    Ok(watcher::Event::InitDone) if !listed => {
                        listed = true;
                        tracing::debug!("services listed");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("watching services: {e}"),
                }
            }
        };
        (ServiceCache::from_store(store, SYNC_TIMEOUT), task)
    }

    fn from_store(store: Store<Service>, timeout: Duration) -> ServiceCache {
        ServiceCache { store, timeout }
    }

    /// The service variables of a pod in `namespace` ([`service_env`]), once the first list
    /// of Services has completed (waiting for it at most [`SYNC_TIMEOUT`]).
    pub async fn env(
        &self,
        namespace: &str,
        enable_service_links: bool,
    ) -> Result<BTreeMap<String, String>, String> {
        match tokio::time::timeout(self.timeout, self.store.wait_until_ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(
                    "the kubelet's Service cache has stopped: cannot construct the service environment variables"
                        .to_string(),
                );
            }
            Err(_) => {
                return Err(format!(
                    "services have not yet been listed from the API server (waited {:?}): cannot construct the service environment variables",
                    self.timeout
                ));
            }
        }
        let relevant = self.store.state_filter(|s| {
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            let name = s.metadata.name.as_deref().unwrap_or_default();
            (enable_service_links && ns == namespace)
                || (ns == MASTER_SERVICE_NAMESPACE && MASTER_SERVICES.contains(&name))
        });
        Ok(service_env(&relevant, namespace, enable_service_links))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": ports},
        }))
        .expect("service")
    }

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn names_are_upper_cased_with_underscores() {
        assert_eq!(env_var_name("redis-master"), "REDIS_MASTER");
        assert_eq!(env_var_name("a-b-c1"), "A_B_C1");
        assert_eq!(env_var_name("http"), "HTTP");
    }

    #[test]
    fn variables_of_a_service_as_upstream() {
        let s = svc(
            "n",
            "redis-master",
            "10.0.0.11",
            serde_json::json!([
                {"port": 6379, "protocol": "TCP"},
                {"name": "dns-udp", "port": 53, "protocol": "UDP"},
                {"name": "sctp", "port": 9, "protocol": "SCTP"},
            ]),
        );
        assert_eq!(
            from_services(&[&s]),
            vars(&[
                ("REDIS_MASTER_SERVICE_HOST", "10.0.0.11"),
                ("REDIS_MASTER_SERVICE_PORT", "6379"),
                ("REDIS_MASTER_SERVICE_PORT_DNS_UDP", "53"),
                ("REDIS_MASTER_SERVICE_PORT_SCTP", "9"),
                ("REDIS_MASTER_PORT", "tcp://10.0.0.11:6379"),
                ("REDIS_MASTER_PORT_6379_TCP", "tcp://10.0.0.11:6379"),
                ("REDIS_MASTER_PORT_6379_TCP_PROTO", "tcp"),
                ("REDIS_MASTER_PORT_6379_TCP_PORT", "6379"),
                ("REDIS_MASTER_PORT_6379_TCP_ADDR", "10.0.0.11"),
                ("REDIS_MASTER_PORT_53_UDP", "udp://10.0.0.11:53"),
                ("REDIS_MASTER_PORT_53_UDP_PROTO", "udp"),
                ("REDIS_MASTER_PORT_53_UDP_PORT", "53"),
                ("REDIS_MASTER_PORT_53_UDP_ADDR", "10.0.0.11"),
                ("REDIS_MASTER_PORT_9_SCTP", "sctp://10.0.0.11:9"),
                ("REDIS_MASTER_PORT_9_SCTP_PROTO", "sctp"),
                ("REDIS_MASTER_PORT_9_SCTP_PORT", "9"),
                ("REDIS_MASTER_PORT_9_SCTP_ADDR", "10.0.0.11"),
            ])
        );
    }

    #[test]
    fn the_protocol_defaults_to_tcp_and_the_first_named_port_is_named_too() {
        let s = svc(
            "n",
            "web",
            "10.0.0.2",
            serde_json::json!([{"name": "http", "port": 80}]),
        );
        assert_eq!(
            from_services(&[&s]),
            vars(&[
                ("WEB_SERVICE_HOST", "10.0.0.2"),
                ("WEB_SERVICE_PORT", "80"),
                ("WEB_SERVICE_PORT_HTTP", "80"),
                ("WEB_PORT", "tcp://10.0.0.2:80"),
                ("WEB_PORT_80_TCP", "tcp://10.0.0.2:80"),
                ("WEB_PORT_80_TCP_PROTO", "tcp"),
                ("WEB_PORT_80_TCP_PORT", "80"),
                ("WEB_PORT_80_TCP_ADDR", "10.0.0.2"),
            ])
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed_in_urls_only() {
        let s = svc(
            "n",
            "v6",
            "fd00:10:96::a",
            serde_json::json!([{"port": 443, "protocol": "TCP"}]),
        );
        let env: BTreeMap<String, String> = from_services(&[&s]).into_iter().collect();
        assert_eq!(env["V6_SERVICE_HOST"], "fd00:10:96::a");
        assert_eq!(env["V6_PORT"], "tcp://[fd00:10:96::a]:443");
        assert_eq!(env["V6_PORT_443_TCP"], "tcp://[fd00:10:96::a]:443");
        assert_eq!(env["V6_PORT_443_TCP_ADDR"], "fd00:10:96::a");
        assert_eq!(join_host_port("10.1.2.3", 8), "10.1.2.3:8");
    }

    #[test]
    fn services_without_a_cluster_ip_give_nothing() {
        let ports = serde_json::json!([{"port": 80}]);
        let headless = svc("n", "headless", "None", ports.clone());
        let empty = svc("n", "external", "", ports.clone());
        let no_spec: Service = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "x", "namespace": "n"}}),
        )
        .expect("service");
        assert!(from_services(&[&headless, &empty, &no_spec]).is_empty());
        // Without ports (not valid with a ClusterIP) only the host.
        let portless = svc("n", "p", "10.0.0.9", serde_json::json!([]));
        assert_eq!(
            from_services(&[&portless]),
            vars(&[("P_SERVICE_HOST", "10.0.0.9")])
        );
    }

    fn cluster() -> Vec<Service> {
        let p = |port: i32| serde_json::json!([{"name": "https", "port": port}]);
        vec![
            svc("default", "kubernetes", "10.96.0.1", p(443)),
            svc("default", "other", "10.96.0.2", p(1)),
            svc("a", "web", "10.96.0.3", p(80)),
            svc("a", "headless", "None", p(80)),
            svc("b", "web", "10.96.0.4", p(81)),
        ]
    }

    #[test]
    fn the_pods_namespace_and_the_master_service() {
        let all = cluster();
        let env = service_env(&all, "a", true);
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT_HTTPS"], "443");
        assert_eq!(env["WEB_SERVICE_HOST"], "10.96.0.3", "the pod's namespace");
        assert!(!env.contains_key("OTHER_SERVICE_HOST"), "another namespace");
        assert!(!env.keys().any(|k| k.starts_with("HEADLESS")), "headless");
        assert_eq!(env.len(), 2 * 8, "{env:?}");
        // Without service links only the master service.
        let env = service_env(&all, "a", false);
        assert_eq!(env.len(), 8, "{env:?}");
        assert!(env.keys().all(|k| k.starts_with("KUBERNETES_")), "{env:?}");
        // In `default` the other Services are the pod's namespace's.
        let env = service_env(&all, "default", true);
        assert_eq!(env["OTHER_SERVICE_PORT"], "1");
        assert_eq!(service_env(&all, "default", false).len(), 8);
    }

    #[test]
    fn the_pods_namespace_wins_a_clash_with_the_master_service() {
        let mut all = cluster();
        let own = svc(
            "a",
            "kubernetes",
            "10.96.0.9",
            serde_json::json!([{"port": 6443}]),
        );
        // Either order.
        for at_front in [false, true] {
            if at_front {
                all.insert(0, own.clone());
            } else {
                all.push(own.clone());
            }
            let env = service_env(&all, "a", true);
            assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.9");
            assert_eq!(env["KUBERNETES_SERVICE_PORT"], "6443");
            assert!(!env.contains_key("KUBERNETES_SERVICE_PORT_HTTPS"));
            // Without service links the master service is kept.
            let env = service_env(&all, "a", false);
            assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
            all.retain(|s| s.metadata.namespace.as_deref() != Some("a"));
        }
        // A headless master service gives nothing.
        let headless = vec![svc(
            "default",
            "kubernetes",
            "None",
            serde_json::json!([{"port": 443}]),
        )];
        assert!(service_env(&headless, "a", false).is_empty());
    }

    #[tokio::test]
    async fn the_cache_waits_for_the_first_list_within_its_timeout() {
        let (store, mut writer) = reflector::store::<Service>();
        let cache = ServiceCache::from_store(store, Duration::from_millis(100));
        let err = cache.env("a", true).await.expect_err("not listed");
        assert!(err.contains("not yet been listed"), "{err}");
        writer.apply_watcher_event(&watcher::Event::Init);
        for s in cluster() {
            writer.apply_watcher_event(&watcher::Event::InitApply(s));
        }
        // A waiting start is released by the end of the list.
        let waiting = {
            let cache = ServiceCache::from_store(cache.store.clone(), Duration::from_secs(30));
            tokio::spawn(async move { cache.env("a", true).await })
        };
        tokio::task::yield_now().await;
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let env = waiting.await.expect("join").expect("env");
        assert_eq!(env["WEB_SERVICE_HOST"], "10.96.0.3");
        // Later changes are seen without waiting.
        writer.apply_watcher_event(&watcher::Event::Delete(svc(
            "a",
            "web",
            "10.96.0.3",
            serde_json::json!([{"port": 80}]),
        )));
        let env = cache.env("a", true).await.expect("env");
        assert!(!env.contains_key("WEB_SERVICE_HOST"), "{env:?}");
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        // A stopped cache that never listed says so.
        let (store, writer) = reflector::store::<Service>();
        drop(writer);
        let err = ServiceCache::from_store(store, Duration::from_secs(30))
            .env("a", true)
            .await
            .expect_err("stopped");
        assert!(err.contains("stopped"), "{err}");
    }
}
