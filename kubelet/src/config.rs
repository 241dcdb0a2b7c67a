//! The kubelet's configuration: command-line flags as upstream and a `KubeletConfiguration`
//! file (`kubelet.config.k8s.io/v1beta1`) read with upstream field names and defaults.
//!
//! [`Flags`] are the command line; [`KubeletConfiguration::from_yaml`] reads `--config` (YAML or
//! JSON) and reports the fields it does not support as warnings; [`Config::load`] joins both
//! (flags win, as upstream) and resolves the node name and labels.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;
use serde::Deserialize;

use crate::eviction::{self, Threshold};
use crate::resources::{self, ResourceList};

/// Upstream's default CRI endpoint.
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// Upstream's default `--root-dir`.
pub const DEFAULT_ROOT_DIR: &str = "/var/lib/kubelet";
/// The `apiVersion` of a KubeletConfiguration file.
pub const CONFIG_API_VERSION: &str = "kubelet.config.k8s.io/v1beta1";
/// The `kind` of a KubeletConfiguration file.
pub const CONFIG_KIND: &str = "KubeletConfiguration";

/// The command line, named as upstream's kubelet flags.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "deckhand-kubelet",
    version,
    about = "Deckhand's kubelet: registers the node, holds its Lease and reports its status.",
    // As upstream (pflag): a repeated flag's last value wins.
    args_override_self = true
)]
pub struct Flags {
    /// kubeconfig of the API server; without it the kubelet runs standalone (static pods only).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// A KubeletConfiguration file (kubelet.config.k8s.io/v1beta1, YAML or JSON).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The CRI runtime's endpoint (unix:///path); overrides containerRuntimeEndpoint.
    #[arg(long, value_name = "ENDPOINT")]
    pub container_runtime_endpoint: Option<String>,
    /// The node's IP address; detected when not given.
    #[arg(long, value_name = "IP")]
    pub node_ip: Option<IpAddr>,
    /// Use this name instead of the hostname as the node's name and hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// The static-pod directory; overrides staticPodPath.
    #[arg(long, value_name = "PATH")]
    pub pod_manifest_path: Option<PathBuf>,
    /// The kubelet's state directory.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ROOT_DIR)]
    pub root_dir: PathBuf,
    /// Labels for the Node at registration (`key=value,key2=value2`; may repeat).
    #[arg(long, value_name = "LABELS")]
    pub node_labels: Vec<String>,
    /// The IP the kubelet's HTTPS server listens on; overrides address.
    #[arg(long, value_name = "IP")]
    pub address: Option<IpAddr>,
    /// The kubelet's HTTPS port; overrides port.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// The serving certificate (PEM, chain allowed); overrides tlsCertFile.
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// The serving certificate's key (PEM); overrides tlsPrivateKeyFile.
    #[arg(long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle that verifies client certificates; overrides authentication.x509.clientCAFile.
    #[arg(long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,
    /// Allow anonymous requests; overrides authentication.anonymous.enabled.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub anonymous_auth: Option<bool>,
    /// Authenticate bearer tokens with TokenReview; overrides authentication.webhook.enabled.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub authentication_token_webhook: Option<bool>,
    /// `AlwaysAllow` or `Webhook`; overrides authorization.mode.
    #[arg(long, value_name = "MODE")]
    pub authorization_mode: Option<String>,
    /// Log verbosity as upstream's klog `--v` (0-1 info, 2-4 debug, 5+ trace); RUST_LOG wins.
    #[arg(long = "v", value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
}

impl Flags {
    /// The tracing filter for `--v` when RUST_LOG is not set.
    pub fn log_filter(&self) -> &'static str {
        match self.verbosity {
            0 | 1 => "info",
            2..=4 => "info,deckhand_kubelet=debug",
            _ => "debug,deckhand_kubelet=trace",
        }
    }
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON or a field has the wrong type.
    #[error("parsing KubeletConfiguration: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    /// A value is out of range or malformed.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `cgroupfs` (upstream's default).
    Cgroupfs,
    /// `systemd`.
    Systemd,
}

/// `authorization.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationMode {
    /// Every authenticated request is allowed.
    AlwaysAllow,
    /// Each request is checked with a SubjectAccessReview (the v1beta1 file default).
    Webhook,
}

impl std::str::FromStr for AuthorizationMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "AlwaysAllow" => Ok(AuthorizationMode::AlwaysAllow),
            "Webhook" => Ok(AuthorizationMode::Webhook),
            m => Err(invalid(format!(
                "authorization mode {m:?}: expected \"AlwaysAllow\" or \"Webhook\""
            ))),
        }
    }
}

/// The supported part of a KubeletConfiguration, typed and defaulted as upstream.
#[derive(Debug, Clone)]
pub struct KubeletConfiguration {
    /// `address` (0.0.0.0): the IP the kubelet serves on.
    pub address: IpAddr,
    /// `port` (10250): the kubelet's HTTPS port, reported in daemonEndpoints.
    pub port: u16,
    /// `tlsCertFile`: the serving certificate; without it one is self-signed under
    /// `<root-dir>/pki`.
    pub tls_cert_file: Option<PathBuf>,
    /// `tlsPrivateKeyFile`.
    pub tls_private_key_file: Option<PathBuf>,
    /// `authentication.x509.clientCAFile`: client certificates signed by it authenticate
    /// (user = CN, groups = O).
    pub client_ca_file: Option<PathBuf>,
    /// `authentication.anonymous.enabled` (false).
    pub anonymous_auth: bool,
    /// `authentication.webhook.enabled` (true): bearer tokens checked with TokenReview.
    pub authentication_webhook: bool,
    /// `authorization.mode` (Webhook).
    pub authorization_mode: AuthorizationMode,
    /// `authentication.webhook.cacheTTL` (2m): how long TokenReview answers are kept.
    pub authentication_webhook_cache_ttl: Duration,
    /// `authorization.webhook.cacheAuthorizedTTL` (5m).
    pub authorization_cache_authorized_ttl: Duration,
    /// `authorization.webhook.cacheUnauthorizedTTL` (30s).
    pub authorization_cache_unauthorized_ttl: Duration,
    /// `staticPodPath`.
    pub static_pod_path: Option<PathBuf>,
    /// `clusterDNS`.
    pub cluster_dns: Vec<IpAddr>,
    /// `clusterDomain`.
    pub cluster_domain: Option<String>,
    /// `nodeStatusUpdateFrequency` (10s): how often status is computed and, if changed, posted.
    pub node_status_update_frequency: Duration,
    /// `nodeStatusReportFrequency` (5m, or nodeStatusUpdateFrequency when only that is set): the
    /// longest time between two status posts.
    pub node_status_report_frequency: Duration,
    /// `nodeLeaseDurationSeconds` (40); the Lease is renewed every quarter of it.
    pub node_lease_duration_seconds: u32,
    /// `systemReserved`.
    pub system_reserved: ResourceList,
    /// `kubeReserved`.
    pub kube_reserved: ResourceList,
    /// `evictionHard` (upstream's defaults when absent).
    pub eviction_hard: Vec<Threshold>,
    /// `evictionPressureTransitionPeriod` (5m).
    pub eviction_pressure_transition_period: Duration,
    /// `maxPods` (110).
    pub max_pods: u32,
    /// `podsPerCore` (0: no limit).
    pub pods_per_core: u32,
    /// `podCIDR`: used in standalone mode; in cluster mode the Node's spec.podCIDR wins.
    pub pod_cidr: Option<String>,
    /// `cgroupDriver` (cgroupfs).
    pub cgroup_driver: CgroupDriver,
    /// `registerNode` (true).
    pub register_node: bool,
    /// `registerWithTaints`.
    pub register_with_taints: Vec<Taint>,
    /// `containerRuntimeEndpoint`.
    pub container_runtime_endpoint: String,
    /// `runtimeRequestTimeout` (2m).
    pub runtime_request_timeout: Duration,
    /// `nodeStatusMaxImages` (50; -1 for no limit).
    pub node_status_max_images: i32,
    /// `podLogsDir` (/var/log/pods): the root of the pods' log directories.
    pub pod_logs_dir: PathBuf,
    /// `cgroupsPerQOS` (true): the `kubepods` QoS and pod cgroups.
    pub cgroups_per_qos: bool,
    /// `cgroupRoot` ("/", normalised): the parent of `kubepods` (or of the pods' containers
    /// without cgroupsPerQOS). It must exist.
    pub cgroup_root: String,
    /// `enforceNodeAllocatable` (`["pods"]`; `["none"]` or `[]` for nothing): `pods`,
    /// `system-reserved`, `kube-reserved`.
    pub enforce_node_allocatable: Vec<String>,
    /// `systemReservedCgroup`: where `system-reserved` is enforced.
    pub system_reserved_cgroup: String,
    /// `kubeReservedCgroup`: where `kube-reserved` is enforced.
    pub kube_reserved_cgroup: String,
    /// `podPidsLimit` (-1: none): each pod cgroup's `pids.max` when positive.
    pub pod_pids_limit: i64,
}

impl Default for KubeletConfiguration {
    fn default() -> Self {
        let eviction_hard =
            eviction::parse_thresholds(&eviction::default_eviction_hard()).unwrap_or_default();
        KubeletConfiguration {
            address: IpAddr::from([0, 0, 0, 0]),
            port: 10250,
            tls_cert_file: None,
            tls_private_key_file: None,
            client_ca_file: None,
            anonymous_auth: false,
            authentication_webhook: true,
            authorization_mode: AuthorizationMode::Webhook,
            authentication_webhook_cache_ttl: Duration::from_secs(120),
            authorization_cache_authorized_ttl: Duration::from_secs(300),
            authorization_cache_unauthorized_ttl: Duration::from_secs(30),
            static_pod_path: None,
            cluster_dns: Vec::new(),
            cluster_domain: None,
            node_status_update_frequency: Duration::from_secs(10),
            node_status_report_frequency: Duration::from_secs(300),
            node_lease_duration_seconds: 40,
            system_reserved: ResourceList::new(),
            kube_reserved: ResourceList::new(),
            eviction_hard,
            eviction_pressure_transition_period: Duration::from_secs(300),
            max_pods: 110,
            pods_per_core: 0,
            pod_cidr: None,
            cgroup_driver: CgroupDriver::Cgroupfs,
            register_node: true,
            register_with_taints: Vec::new(),
            container_runtime_endpoint: DEFAULT_RUNTIME_ENDPOINT.to_string(),
            runtime_request_timeout: Duration::from_secs(120),
            node_status_max_images: 50,
            pod_logs_dir: PathBuf::from("/var/log/pods"),
            cgroups_per_qos: true,
            cgroup_root: "/".into(),
            enforce_node_allocatable: vec!["pods".into()],
            system_reserved_cgroup: String::new(),
            kube_reserved_cgroup: String::new(),
            pod_pids_limit: -1,
        }
    }
}

/// The file as written: every supported field optional, everything else collected.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    api_version: Option<String>,
    kind: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    tls_cert_file: Option<PathBuf>,
    tls_private_key_file: Option<PathBuf>,
    authentication: Option<AuthenticationFile>,
    authorization: Option<AuthorizationFile>,
    static_pod_path: Option<PathBuf>,
    #[serde(rename = "clusterDNS")]
    cluster_dns: Option<Vec<String>>,
    cluster_domain: Option<String>,
    node_status_update_frequency: Option<String>,
    node_status_report_frequency: Option<String>,
    node_lease_duration_seconds: Option<i64>,
    system_reserved: Option<BTreeMap<String, String>>,
    kube_reserved: Option<BTreeMap<String, String>>,
    eviction_hard: Option<BTreeMap<String, String>>,
    eviction_pressure_transition_period: Option<String>,
    max_pods: Option<i64>,
    pods_per_core: Option<i64>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    cgroup_driver: Option<String>,
    register_node: Option<bool>,
    register_with_taints: Option<Vec<Taint>>,
    container_runtime_endpoint: Option<String>,
    runtime_request_timeout: Option<String>,
    node_status_max_images: Option<i64>,
    pod_logs_dir: Option<PathBuf>,
    #[serde(rename = "cgroupsPerQOS")]
    cgroups_per_qos: Option<bool>,
    cgroup_root: Option<String>,
    enforce_node_allocatable: Option<Vec<String>>,
    system_reserved_cgroup: Option<String>,
    kube_reserved_cgroup: Option<String>,
    pod_pids_limit: Option<i64>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthenticationFile {
    x509: Option<X509File>,
    webhook: Option<TokenWebhookFile>,
    anonymous: Option<EnabledFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenWebhookFile {
    enabled: Option<bool>,
    #[serde(rename = "cacheTTL")]
    cache_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct X509File {
    #[serde(rename = "clientCAFile")]
    client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct EnabledFile {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthorizationFile {
    mode: Option<String>,
    webhook: Option<AuthorizationWebhookFile>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthorizationWebhookFile {
    #[serde(rename = "cacheAuthorizedTTL")]
    cache_authorized_ttl: Option<String>,
    #[serde(rename = "cacheUnauthorizedTTL")]
    cache_unauthorized_ttl: Option<String>,
}

fn nonempty(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|p| !p.as_os_str().is_empty())
}

fn duration_field(name: &str, v: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    v.as_deref()
        .map(|s| parse_go_duration(s).map_err(|e| invalid(format!("{name}: {e}"))))
        .transpose()
}

fn int_field<T: TryFrom<i64>>(
    name: &str,
    v: Option<i64>,
    min: i64,
) -> Result<Option<T>, ConfigError> {
    v.map(|n| {
        if n < min {
            return Err(invalid(format!("{name} must be at least {min}, got {n}")));
        }
        T::try_from(n).map_err(|_| invalid(format!("{name}: {n} is out of range")))
    })
    .transpose()
}

impl KubeletConfiguration {
    /// Reads a KubeletConfiguration (YAML or JSON). Returns it with warnings for the fields that
    /// are not supported (they are ignored, as an older upstream kubelet ignores newer fields).
    pub fn from_yaml(text: &str) -> Result<(KubeletConfiguration, Vec<String>), ConfigError> {
        let file: ConfigFile = if text.trim().is_empty() {
            ConfigFile::default()
        } else {
            serde_yaml_ng::from_str(text)?
        };
        match file.kind.as_deref() {
            Some(CONFIG_KIND) => {}
            Some(k) => return Err(invalid(format!("kind is {k:?}, expected {CONFIG_KIND:?}"))),
            None => {
                return Err(invalid(format!(
                    "kind is missing, expected {CONFIG_KIND:?}"
                )));
            }
        }
        match file.api_version.as_deref() {
            Some(CONFIG_API_VERSION) => {}
            Some(v) => {
                return Err(invalid(format!(
                    "apiVersion {v:?} is not supported, expected {CONFIG_API_VERSION:?}"
                )));
            }
            None => {
                return Err(invalid(format!(
                    "apiVersion is missing, expected {CONFIG_API_VERSION:?}"
                )));
            }
        }
        let warnings = file
            .other
            .keys()
            .map(|k| {
                format!(
                    "KubeletConfiguration field {k:?} is not supported by deckhand-kubelet; ignored"
                )
            })
            .collect();

        let mut c = KubeletConfiguration::default();
        if let Some(a) = &file.address {
            c.address = a
                .parse()
                .map_err(|_| invalid(format!("address {a:?} is not an IP address")))?;
        }
        if let Some(p) = int_field::<u16>("port", file.port, 1)? {
            c.port = p;
        }
        c.tls_cert_file = nonempty(file.tls_cert_file);
        c.tls_private_key_file = nonempty(file.tls_private_key_file);
        if let Some(a) = file.authentication {
            c.client_ca_file = nonempty(a.x509.and_then(|x| x.client_ca_file));
            if let Some(e) = a.anonymous.and_then(|x| x.enabled) {
                c.anonymous_auth = e;
            }
            if let Some(w) = a.webhook {
                if let Some(e) = w.enabled {
                    c.authentication_webhook = e;
                }
                if let Some(d) = duration_field("authentication.webhook.cacheTTL", &w.cache_ttl)? {
                    c.authentication_webhook_cache_ttl = d;
                }
            }
        }
        if let Some(a) = file.authorization {
            if let Some(m) = a.mode.filter(|m| !m.is_empty()) {
                c.authorization_mode = m.parse()?;
            }
            if let Some(w) = a.webhook {
                if let Some(d) = duration_field(
                    "authorization.webhook.cacheAuthorizedTTL",
                    &w.cache_authorized_ttl,
                )? {
                    c.authorization_cache_authorized_ttl = d;
                }
                if let Some(d) = duration_field(
                    "authorization.webhook.cacheUnauthorizedTTL",
                    &w.cache_unauthorized_ttl,
                )? {
                    c.authorization_cache_unauthorized_ttl = d;
                }
            }
        }
        c.static_pod_path = file.static_pod_path.filter(|p| !p.as_os_str().is_empty());
        if let Some(d) = file.pod_logs_dir.filter(|p| !p.as_os_str().is_empty()) {
            if !d.is_absolute() {
                return Err(invalid(format!(
                    "podLogsDir {} must be an absolute path",
                    d.display()
                )));
            }
            c.pod_logs_dir = d;
        }
        if let Some(dns) = &file.cluster_dns {
            c.cluster_dns = dns
                .iter()
                .map(|s| {
                    s.parse()
                        .map_err(|_| invalid(format!("clusterDNS {s:?} is not an IP address")))
                })
                .collect::<Result<_, _>>()?;
        }
        c.cluster_domain = file.cluster_domain.filter(|d| !d.is_empty());
        let update = duration_field(
            "nodeStatusUpdateFrequency",
            &file.node_status_update_frequency,
        )?
        .filter(|d| !d.is_zero());
        let report = duration_field(
            "nodeStatusReportFrequency",
            &file.node_status_report_frequency,
        )?
        .filter(|d| !d.is_zero());
        if let Some(u) = update {
            c.node_status_update_frequency = u;
            // Upstream: for backward compatibility the report frequency follows an explicitly set
            // update frequency.
            c.node_status_report_frequency = u;
        }
        if let Some(r) = report {
            c.node_status_report_frequency = r;
        }
        if let Some(d) = int_field::<u32>(
            "nodeLeaseDurationSeconds",
            file.node_lease_duration_seconds,
            1,
        )? {
            c.node_lease_duration_seconds = d;
        }
        if let Some(m) = &file.system_reserved {
            c.system_reserved = resources::parse_reservation(m)
                .map_err(|e| invalid(format!("systemReserved: {e}")))?;
        }
        if let Some(m) = &file.kube_reserved {
            c.kube_reserved = resources::parse_reservation(m)
                .map_err(|e| invalid(format!("kubeReserved: {e}")))?;
        }
        if let Some(m) = &file.eviction_hard {
            c.eviction_hard =
                eviction::parse_thresholds(m).map_err(|e| invalid(format!("evictionHard: {e}")))?;
        }
        if let Some(d) = duration_field(
            "evictionPressureTransitionPeriod",
            &file.eviction_pressure_transition_period,
        )? {
            c.eviction_pressure_transition_period = d;
        }
        if let Some(m) = int_field::<u32>("maxPods", file.max_pods, 0)? {
            c.max_pods = m;
        }
        if let Some(m) = int_field::<u32>("podsPerCore", file.pods_per_core, 0)? {
            c.pods_per_core = m;
        }
        if let Some(cidr) = file.pod_cidr.filter(|s| !s.is_empty()) {
            validate_cidr(&cidr).map_err(|e| invalid(format!("podCIDR: {e}")))?;
            c.pod_cidr = Some(cidr);
        }
        match file.cgroup_driver.as_deref() {
            None | Some("") | Some("cgroupfs") => {}
            Some("systemd") => c.cgroup_driver = CgroupDriver::Systemd,
            Some(d) => {
                return Err(invalid(format!(
                    "cgroupDriver {d:?}: expected \"cgroupfs\" or \"systemd\""
                )));
            }
        }
        if let Some(r) = file.register_node {
            c.register_node = r;
        }
        if let Some(taints) = file.register_with_taints {
            for t in &taints {
                validate_taint(t).map_err(|e| invalid(format!("registerWithTaints: {e}")))?;
            }
            c.register_with_taints = taints;
        }
        if let Some(e) = file.container_runtime_endpoint.filter(|e| !e.is_empty()) {
            c.container_runtime_endpoint = e;
        }
        if let Some(d) = duration_field("runtimeRequestTimeout", &file.runtime_request_timeout)?
            .filter(|d| !d.is_zero())
        {
            c.runtime_request_timeout = d;
        }
        if let Some(n) = int_field::<i32>("nodeStatusMaxImages", file.node_status_max_images, -1)? {
            c.node_status_max_images = n;
        }
        if let Some(q) = file.cgroups_per_qos {
            c.cgroups_per_qos = q;
        }
        if let Some(r) = file.cgroup_root.filter(|r| !r.is_empty()) {
            c.cgroup_root = cgroupfs_path("cgroupRoot", &r)?;
        }
        if let Some(r) = file.system_reserved_cgroup.filter(|r| !r.is_empty()) {
            c.system_reserved_cgroup = cgroupfs_path("systemReservedCgroup", &r)?;
        }
        if let Some(r) = file.kube_reserved_cgroup.filter(|r| !r.is_empty()) {
            c.kube_reserved_cgroup = cgroupfs_path("kubeReservedCgroup", &r)?;
        }
        if let Some(e) = file.enforce_node_allocatable {
            c.enforce_node_allocatable = e;
        }
        validate_enforcement(&mut c)?;
        if let Some(p) = file.pod_pids_limit {
            c.pod_pids_limit = p;
        }
        Ok((c, warnings))
    }
}

/// Everything the kubelet runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The API server's kubeconfig; `None` is standalone mode.
    pub kubeconfig: Option<PathBuf>,
    /// The Node's name (the hostname or `--hostname-override`, lowercased).
    pub node_name: String,
    /// The hostname reported in the `kubernetes.io/hostname` label and the Hostname address.
    pub hostname: String,
    /// `--node-ip`; detected at start when absent.
    pub node_ip: Option<IpAddr>,
    /// The kubelet's state directory.
    pub root_dir: PathBuf,
    /// Labels from `--node-labels`.
    pub node_labels: BTreeMap<String, String>,
    /// The configuration file's settings, with flag overrides applied.
    pub kubelet: KubeletConfiguration,
}

impl Config {
    /// Joins the flags and the `--config` file. Returns warnings to log.
    pub fn load(flags: &Flags) -> Result<(Config, Vec<String>), ConfigError> {
        let (mut kubelet, warnings) = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                KubeletConfiguration::from_yaml(&text)?
            }
            None => (KubeletConfiguration::default(), Vec::new()),
        };
        if let Some(e) = flags
            .container_runtime_endpoint
            .as_ref()
            .filter(|e| !e.is_empty())
        {
            kubelet.container_runtime_endpoint = e.clone();
        }
        if let Some(p) = flags
            .pod_manifest_path
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            kubelet.static_pod_path = Some(p.clone());
        }
        if let Some(a) = flags.address {
            kubelet.address = a;
        }
        if let Some(p) = flags.port {
            kubelet.port = p;
        }
        if let Some(f) = nonempty(flags.tls_cert_file.clone()) {
            kubelet.tls_cert_file = Some(f);
        }
        if let Some(f) = nonempty(flags.tls_private_key_file.clone()) {
            kubelet.tls_private_key_file = Some(f);
        }
        if let Some(f) = nonempty(flags.client_ca_file.clone()) {
            kubelet.client_ca_file = Some(f);
        }
        if let Some(a) = flags.anonymous_auth {
            kubelet.anonymous_auth = a;
        }
        if let Some(w) = flags.authentication_token_webhook {
            kubelet.authentication_webhook = w;
        }
        if let Some(m) = &flags.authorization_mode {
            kubelet.authorization_mode = m.parse()?;
        }
        if kubelet.tls_cert_file.is_some() != kubelet.tls_private_key_file.is_some() {
            return Err(invalid(
                "tlsCertFile and tlsPrivateKeyFile must be given together",
            ));
        }
        deckhand_proto::unix::socket_path(&kubelet.container_runtime_endpoint)
            .map_err(|e| invalid(e.to_string()))?;

        let hostname = match flags.hostname_override.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => h.to_lowercase(),
            _ => crate::machine::hostname()
                .map_err(|e| invalid(format!("cannot read the hostname: {e}")))?
                .to_lowercase(),
        };
        if !is_dns1123_subdomain(&hostname) {
            return Err(invalid(format!(
                "node name {hostname:?} is not a valid DNS-1123 subdomain (use --hostname-override)"
            )));
        }
        let mut node_labels = BTreeMap::new();
        for arg in &flags.node_labels {
            node_labels.extend(parse_node_labels(arg)?);
        }
        if flags.root_dir.as_os_str().is_empty() {
            return Err(invalid("--root-dir is empty"));
        }
        Ok((
            Config {
                kubeconfig: flags.kubeconfig.clone(),
                node_name: hostname.clone(),
                hostname,
                node_ip: flags.node_ip,
                root_dir: absolute(&flags.root_dir),
                node_labels,
                kubelet,
            },
            warnings,
        ))
    }

    /// The Lease's renew interval: a quarter of its duration, as upstream.
    pub fn lease_renew_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.kubelet.node_lease_duration_seconds)) / 4
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
    }
}

/// A cgroupfs path (`/a/b`): absolute, without `..`; normalised (`//` and a trailing `/` go).
fn cgroupfs_path(field: &str, p: &str) -> Result<String, ConfigError> {
    if !p.starts_with('/') {
        return Err(invalid(format!(
            "{field} {p:?} must be an absolute cgroupfs path (the systemd driver's slice names are not supported)"
        )));
    }
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(invalid(format!("{field} {p:?} must not contain \"..\"")));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Checks `enforceNodeAllocatable` as upstream's validation does; `["none"]` becomes empty.
fn validate_enforcement(c: &mut KubeletConfiguration) -> Result<(), ConfigError> {
    let e = &c.enforce_node_allocatable;
    if e.iter().any(|v| v == "none") {
        if e.len() > 1 {
            return Err(invalid(
                "enforceNodeAllocatable: \"none\" cannot be combined with other values",
            ));
        }
        c.enforce_node_allocatable.clear();
        return Ok(());
    }
    for v in e {
        match v.as_str() {
            "pods" => {}
            "system-reserved" if c.system_reserved_cgroup.is_empty() => {
                return Err(invalid(
                    "enforceNodeAllocatable: systemReservedCgroup must be set when \"system-reserved\" is enforced",
                ));
            }
            "kube-reserved" if c.kube_reserved_cgroup.is_empty() => {
                return Err(invalid(
                    "enforceNodeAllocatable: kubeReservedCgroup must be set when \"kube-reserved\" is enforced",
                ));
            }
            "system-reserved" | "kube-reserved" => {}
            "system-reserved-compressible" | "kube-reserved-compressible" => {
                return Err(invalid(format!(
                    "enforceNodeAllocatable: {v:?} is not supported by deckhand-kubelet"
                )));
            }
            v => {
                return Err(invalid(format!(
                    "enforceNodeAllocatable: {v:?}: valid values are \"pods\", \"system-reserved\", \"kube-reserved\" and \"none\""
                )));
            }
        }
    }
    if !c.cgroups_per_qos && !e.is_empty() {
        return Err(invalid(
            "enforceNodeAllocatable is not supported unless cgroupsPerQOS is true (set enforceNodeAllocatable: [] or [none])",
        ));
    }
    Ok(())
}

/// Parses a Go `time.Duration` string (`10s`, `5m0s`, `1h30m`, `1.5s`, `300ms`, `0`).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let orig = s;
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(format!("{orig:?} is negative"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{orig:?}: missing unit"))?;
        let (num, tail) = rest.split_at(n_end);
        if num.is_empty() || num == "." {
            return Err(format!("{orig:?}: expected a number"));
        }
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{orig:?}: bad number {num:?}"))?;
        let u_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(u_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{orig:?}: unknown unit {unit:?}")),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{orig:?}: {e}"))
}

/// Parses one `--node-labels` value (`k=v,k2=v2`) and checks the keys as upstream does: labels in
/// the `kubernetes.io`/`k8s.io` namespaces must be ones a kubelet may set.
pub fn parse_node_labels(arg: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for pair in arg.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("--node-labels: {pair:?} is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        if !is_label_key(k) {
            return Err(invalid(format!("--node-labels: invalid label key {k:?}")));
        }
        if !is_label_value(v) {
            return Err(invalid(format!(
                "--node-labels: invalid value {v:?} for {k:?}"
            )));
        }
        if is_kubernetes_namespace(k) && !is_kubelet_label(k) {
            return Err(invalid(format!(
                "unknown 'kubernetes.io' or 'k8s.io' labels specified with --node-labels: [{k}]; \
                 --node-labels in the 'kubernetes.io' namespace must begin with an allowed prefix \
                 (kubelet.kubernetes.io, node.kubernetes.io) or be in the specifically allowed set"
            )));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The labels a kubelet may set in the `kubernetes.io` namespaces (upstream `kubeletapis`).
const KUBELET_LABELS: [&str; 11] = [
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
];

fn label_namespace(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

fn is_kubernetes_namespace(key: &str) -> bool {
    let ns = label_namespace(key);
    ns == "kubernetes.io"
        || ns.ends_with(".kubernetes.io")
        || ns == "k8s.io"
        || ns.ends_with(".k8s.io")
}

fn is_kubelet_label(key: &str) -> bool {
    let ns = label_namespace(key);
    KUBELET_LABELS.contains(&key)
        || ns == "kubelet.kubernetes.io"
        || ns.ends_with(".kubelet.kubernetes.io")
        || ns == "node.kubernetes.io"
        || ns.ends_with(".node.kubernetes.io")
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A qualified label key (`[prefix/]name`).
pub fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

/// A label value (empty, or a name of at most 63 characters).
pub fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_label_name(v)
}

/// A DNS-1123 subdomain (lowercase labels joined by dots, at most 253 characters).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn validate_cidr(s: &str) -> Result<(), String> {
    let (ip, bits) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
    let bits: u8 = bits.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(format!("{s:?}: prefix longer than {max}"));
    }
    Ok(())
}

fn validate_taint(t: &Taint) -> Result<(), String> {
    if !is_label_key(&t.key) {
        return Err(format!("invalid taint key {:?}", t.key));
    }
    if let Some(v) = &t.value
        && !is_label_value(v)
    {
        return Err(format!("invalid taint value {v:?}"));
    }
    match t.effect.as_str() {
        "NoSchedule" | "PreferNoSchedule" | "NoExecute" => Ok(()),
        e => Err(format!("invalid taint effect {e:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eviction::Signal;
    use clap::Parser;

    const HEAD: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n";

    fn load(body: &str) -> Result<(KubeletConfiguration, Vec<String>), ConfigError> {
        KubeletConfiguration::from_yaml(&format!("{HEAD}{body}"))
    }

    #[test]
    fn defaults_are_upstreams() {
        let (c, warnings) = load("").expect("empty config");
        assert!(warnings.is_empty());
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(10));
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(300));
        assert_eq!(c.node_lease_duration_seconds, 40);
        assert_eq!(c.max_pods, 110);
        assert_eq!(c.port, 10250);
        assert_eq!(c.address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.cgroup_driver, CgroupDriver::Cgroupfs);
        assert!(c.register_node);
        assert_eq!(c.container_runtime_endpoint, DEFAULT_RUNTIME_ENDPOINT);
        assert_eq!(c.eviction_hard.len(), 5);
        assert_eq!(c.node_status_max_images, 50);
        assert_eq!(c.runtime_request_timeout, Duration::from_secs(120));
        assert!(!c.anonymous_auth);
        assert!(c.authentication_webhook);
        assert_eq!(c.authorization_mode, AuthorizationMode::Webhook);
        assert!(c.client_ca_file.is_none() && c.tls_cert_file.is_none());
        assert!(c.cgroups_per_qos);
        assert_eq!(c.cgroup_root, "/");
        assert_eq!(c.enforce_node_allocatable, ["pods"]);
        assert_eq!(c.pod_pids_limit, -1);
        assert!(c.system_reserved_cgroup.is_empty() && c.kube_reserved_cgroup.is_empty());
    }

    #[test]
    fn cgroup_fields() {
        let (c, w) = load(
            "cgroupRoot: /dh//root/\ncgroupsPerQOS: true\npodPidsLimit: 100\n\
             enforceNodeAllocatable: [pods, system-reserved, kube-reserved]\n\
             systemReservedCgroup: /system.slice\nkubeReservedCgroup: /dh-kube\n",
        )
        .expect("config");
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.cgroup_root, "/dh/root");
        assert_eq!(c.pod_pids_limit, 100);
        assert_eq!(c.enforce_node_allocatable.len(), 3);
        assert_eq!(c.system_reserved_cgroup, "/system.slice");
        let (c, _) = load("enforceNodeAllocatable: [none]\n").expect("none");
        assert!(c.enforce_node_allocatable.is_empty());
        let (c, _) = load("enforceNodeAllocatable: []\n").expect("empty");
        assert!(c.enforce_node_allocatable.is_empty());
        let (c, _) = load("cgroupsPerQOS: false\nenforceNodeAllocatable: []\n").expect("no qos");
        assert!(!c.cgroups_per_qos);
        for (body, says) in [
            ("cgroupsPerQOS: false\n", "cgroupsPerQOS"),
            ("enforceNodeAllocatable: [pods, none]\n", "\"none\""),
            (
                "enforceNodeAllocatable: [system-reserved]\n",
                "systemReservedCgroup",
            ),
            (
                "enforceNodeAllocatable: [kube-reserved]\n",
                "kubeReservedCgroup",
            ),
            (
                "enforceNodeAllocatable: [system-reserved-compressible]\n",
                "not supported",
            ),
            ("enforceNodeAllocatable: [everything]\n", "valid values"),
            ("cgroupRoot: kubepods.slice\n", "absolute"),
            ("cgroupRoot: /a/../b\n", "\"..\""),
        ] {
            let e = load(body).expect_err(body).to_string();
            assert!(e.contains(says), "{body:?}: {e}");
        }
    }

    #[test]
    fn reads_supported_fields() {
        let (c, warnings) = load(
            "nodeStatusUpdateFrequency: 2s\nnodeLeaseDurationSeconds: 8\nmaxPods: 20\n\
             systemReserved: {cpu: 100m, memory: 100Mi}\nkubeReserved:\n  memory: 50Mi\n\
             evictionHard: {memory.available: 200Mi}\nclusterDNS: [10.96.0.10]\n\
             clusterDomain: cluster.local\nstaticPodPath: /etc/kubernetes/manifests\n\
             address: 127.0.0.1\nport: 10350\ncgroupDriver: systemd\npodCIDR: 10.1.0.0/24\n\
             registerNode: false\nregisterWithTaints:\n- {key: dh/test, value: x, effect: NoSchedule}\n\
             containerRuntimeEndpoint: unix:///run/deckhand/cri.sock\nruntimeRequestTimeout: 1m30s\n\
             authentication: {anonymous: {enabled: true}, webhook: {enabled: false}, \
             x509: {clientCAFile: /ca.crt}}\n\
             authorization: {mode: AlwaysAllow, webhook: {cacheUnauthorizedTTL: 5s}}\n\
             tlsCertFile: /k.crt\ntlsPrivateKeyFile: /k.key\nfailSwapOn: false\n",
        )
        .expect("config");
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(2));
        assert_eq!(
            c.node_status_report_frequency,
            Duration::from_secs(2),
            "follows an explicit update frequency"
        );
        assert_eq!(c.node_lease_duration_seconds, 8);
        assert_eq!(c.max_pods, 20);
        assert_eq!(c.system_reserved["cpu"].millis(), 100);
        assert_eq!(c.kube_reserved["memory"].units(), 50 << 20);
        assert_eq!(c.eviction_hard.len(), 1);
        assert_eq!(c.eviction_hard[0].signal, Signal::MemoryAvailable);
        assert_eq!(c.cluster_dns, vec![IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(c.cluster_domain.as_deref(), Some("cluster.local"));
        assert_eq!(
            c.static_pod_path.as_deref(),
            Some(Path::new("/etc/kubernetes/manifests"))
        );
        assert_eq!(c.port, 10350);
        assert_eq!(c.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(c.pod_cidr.as_deref(), Some("10.1.0.0/24"));
        assert!(!c.register_node);
        assert_eq!(c.register_with_taints.len(), 1);
        assert_eq!(c.register_with_taints[0].effect, "NoSchedule");
        assert_eq!(
            c.container_runtime_endpoint,
            "unix:///run/deckhand/cri.sock"
        );
        assert_eq!(c.runtime_request_timeout, Duration::from_secs(90));
        assert!(c.anonymous_auth);
        assert!(!c.authentication_webhook);
        assert_eq!(c.client_ca_file.as_deref(), Some(Path::new("/ca.crt")));
        assert_eq!(c.authorization_mode, AuthorizationMode::AlwaysAllow);
        assert_eq!(
            c.authorization_cache_unauthorized_ttl,
            Duration::from_secs(5)
        );
        assert_eq!(
            c.authorization_cache_authorized_ttl,
            Duration::from_secs(300)
        );
        assert_eq!(c.authentication_webhook_cache_ttl, Duration::from_secs(120));
        assert_eq!(c.tls_cert_file.as_deref(), Some(Path::new("/k.crt")));
        assert_eq!(c.tls_private_key_file.as_deref(), Some(Path::new("/k.key")));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("\"failSwapOn\"")));

        let (c, _) = load("nodeStatusUpdateFrequency: 20s\nnodeStatusReportFrequency: 1m\n")
            .expect("config");
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(60));
        let (c, _) = KubeletConfiguration::from_yaml(
            r#"{"apiVersion":"kubelet.config.k8s.io/v1beta1","kind":"KubeletConfiguration","maxPods":7}"#,
        )
        .expect("JSON config");
        assert_eq!(c.max_pods, 7);
    }

    #[test]
    fn pod_logs_dir() {
        assert_eq!(
            KubeletConfiguration::default().pod_logs_dir,
            Path::new("/var/log/pods")
        );
        let (c, warnings) = load("podLogsDir: /srv/logs\n").expect("config");
        assert_eq!(c.pod_logs_dir, Path::new("/srv/logs"));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn rejects_invalid_configs() {
        assert!(KubeletConfiguration::from_yaml("kind: KubeletConfiguration\n").is_err());
        assert!(
            KubeletConfiguration::from_yaml(
                "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\n"
            )
            .is_err()
        );
        assert!(
            KubeletConfiguration::from_yaml(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: Pod\n"
            )
            .is_err()
        );
        for body in [
            "maxPods: many\n",
            "maxPods: -1\n",
            "nodeLeaseDurationSeconds: 0\n",
            "nodeStatusUpdateFrequency: 10 parsecs\n",
            "systemReserved: {gpu: '1'}\n",
            "systemReserved: {memory: lots}\n",
            "evictionHard: {memory.free: 1Mi}\n",
            "cgroupDriver: openrc\n",
            "clusterDNS: [not-an-ip]\n",
            "podCIDR: 10.0.0.0/33\n",
            "registerWithTaints: [{key: a, effect: Sometimes}]\n",
            "port: 70000\n",
            "authorization: {mode: RBAC}\n",
            "authentication: {webhook: {cacheTTL: soon}}\n",
            "podLogsDir: relative/logs\n",
            "- a list\n",
        ] {
            assert!(load(body).is_err(), "{body:?} should be refused");
        }
    }

    #[test]
    fn go_durations() {
        let d = |s| parse_go_duration(s);
        assert_eq!(d("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(d("5m0s"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "-1s", "1x", "s", "1.2.3s"] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_labels_as_upstream() {
        let l = parse_node_labels(
            "a=b, example.com/role=worker,node.kubernetes.io/pool=x,kubernetes.io/os=linux",
        )
        .expect("labels");
        assert_eq!(l.len(), 4);
        assert_eq!(l["example.com/role"], "worker");
        assert!(parse_node_labels("node-role.kubernetes.io/worker=").is_err());
        assert!(parse_node_labels("k8s.io/x=y").is_err());
        assert!(parse_node_labels("novalue").is_err());
        assert!(parse_node_labels("a=b c").is_err());
        assert!(parse_node_labels("-a=b").is_err());
        assert!(parse_node_labels("").expect("empty").is_empty());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.yaml");
        std::fs::write(
            &file,
            format!("{HEAD}staticPodPath: /a\ncontainerRuntimeEndpoint: unix:///a.sock\n"),
        )
        .expect("write");
        let flags = Flags::try_parse_from([
            "deckhand-kubelet",
            "--config",
            file.to_str().expect("utf-8 path"),
            "--hostname-override=My-Node",
            "--container-runtime-endpoint",
            "unix:///b.sock",
            "--pod-manifest-path=/b",
            "--node-labels=a=b",
            "--node-labels",
            "c=d",
            "--node-ip",
            "10.1.2.3",
            "--root-dir=/x",
            "--root-dir",
            DEFAULT_ROOT_DIR,
            "--port=10350",
            "--address=127.0.0.1",
            "--authorization-mode=AlwaysAllow",
            "--anonymous-auth",
            "--client-ca-file=/ca.crt",
        ])
        .expect("flags");
        let (c, _) = Config::load(&flags).expect("config");
        assert_eq!(c.kubelet.port, 10350);
        assert_eq!(c.kubelet.address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.kubelet.authorization_mode, AuthorizationMode::AlwaysAllow);
        assert!(c.kubelet.anonymous_auth);
        assert_eq!(
            c.kubelet.client_ca_file.as_deref(),
            Some(Path::new("/ca.crt"))
        );
        assert_eq!(c.node_name, "my-node");
        assert_eq!(c.hostname, "my-node");
        assert_eq!(c.kubelet.container_runtime_endpoint, "unix:///b.sock");
        assert_eq!(c.kubelet.static_pod_path.as_deref(), Some(Path::new("/b")));
        assert_eq!(c.node_labels.len(), 2);
        assert_eq!(c.node_ip, Some(IpAddr::from([10, 1, 2, 3])));
        assert_eq!(c.root_dir, Path::new(DEFAULT_ROOT_DIR));
        assert!(c.kubeconfig.is_none());
        assert_eq!(c.lease_renew_interval(), Duration::from_secs(10));

        let bad = Flags::try_parse_from(["deckhand-kubelet", "--hostname-override", "bad_name"])
            .expect("flags");
        assert!(Config::load(&bad).is_err());
        let bad = Flags::try_parse_from([
            "deckhand-kubelet",
            "--hostname-override=n",
            "--container-runtime-endpoint=tcp://x:1",
        ])
        .expect("flags");
        assert!(Config::load(&bad).is_err());
    }
}
