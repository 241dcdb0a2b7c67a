//! The runtime side, as libcni does it: load network configurations from a directory, run a
//! plugin chain for ADD/DEL/CHECK/GC/STATUS, cache results, negotiate versions.
//!
//! - [`load_dir`] / [`load_file`] / [`NetworkConfigList::from_bytes`]: `.conf`, `.conflist` and
//!   `.json` files in lexical order; a single-plugin `.conf` becomes a one-plugin list.
//! - [`CniConfig`]: where plugins are ([`CniConfig::plugin_dirs`]) and where state goes
//!   ([`CniConfig::state_dir`]: `results/<net>-<containerid>-<ifname>` holds the cached result of
//!   each attachment, `locks/<containerid>.lock` serialises operations on one container across
//!   threads and processes).
//! - Every operation is blocking and execs the plugins with `std::process::Command` (never a
//!   fork of the caller); the `*_async` variants run the same on tokio's blocking pool.
//!
//! ADD runs the plugins in order passing each one's result as the next one's `prevResult`; when a
//! plugin fails, DEL is run for the whole list (in reverse) before the error is returned. DEL runs
//! in reverse with the cached result as `prevResult` and tolerates a missing cache. GC first DELs
//! every cached attachment of the network that is not in the valid list, then sends GC to the
//! plugins (1.1 lists, unless `disableGC`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CniError, Error};
use crate::plugin::{
    Command, ExecError, exec_plugin, find_plugin, validate_container_id, validate_ifname,
    validate_network_name,
};
use crate::types::{CniResult, GcAttachment, NetConfList, VALID_ATTACHMENTS_KEY};
use crate::version::{CniVersion, VersionInfo};

/// Extensions of configuration files, as libcni.
pub const CONF_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// The kind tag of cache files (libcni's).
pub const CACHE_KIND: &str = "cniCacheV1";

/// One plugin of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConf {
    /// The plugin type (binary name).
    pub plugin_type: String,
    /// The capabilities it declares.
    pub capabilities: BTreeMap<String, bool>,
    /// Its configuration as written (every key).
    pub raw: Map<String, Value>,
}

/// A validated network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    /// The network name.
    pub name: String,
    /// The version the list is used with (the newest of `cniVersions` this library supports, or
    /// `cniVersion`).
    pub cni_version: CniVersion,
    /// CHECK is refused.
    pub disable_check: bool,
    /// GC is not sent to the plugins (stale cached attachments are still deleted).
    pub disable_gc: bool,
    /// The plugins, in ADD order.
    pub plugins: Vec<PluginConf>,
    /// The file it came from.
    pub source: Option<PathBuf>,
    /// The list as parsed.
    pub list: NetConfList,
}

fn invalid(path: Option<&Path>, msg: impl Into<String>) -> Error {
    Error::InvalidConfig {
        path: path.map(Path::to_path_buf),
        msg: msg.into(),
    }
}

impl NetworkConfigList {
    /// Parses a `.conflist` (an object with `plugins`) or a single-plugin `.conf` (an object with
    /// `type`), and validates it: a path-safe name, a supported version, every plugin with a type.
    pub fn from_bytes(bytes: &[u8], source: Option<&Path>) -> Result<Self, Error> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(source, e.to_string()))?;
        let Value::Object(obj) = v else {
            return Err(invalid(source, "not a JSON object"));
        };
        let list: NetConfList = if obj.contains_key("plugins") {
            serde_json::from_value(Value::Object(obj))
                .map_err(|e| invalid(source, e.to_string()))?
        } else if obj.contains_key("type") {
            let get = |k: &str| {
                obj.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            NetConfList {
                cni_version: get("cniVersion"),
                name: get("name"),
                load_only_inlined_plugins: true,
                plugins: vec![obj.clone()],
                ..Default::default()
            }
        } else {
            return Err(invalid(
                source,
                "neither a plugin list (\"plugins\") nor a plugin (\"type\")",
            ));
        };
        Self::from_list(list, source)
    }

    /// Validates a parsed list.
    pub fn from_list(mut list: NetConfList, source: Option<&Path>) -> Result<Self, Error> {
        validate_network_name(&list.name).map_err(|e| invalid(source, e.msg))?;
        if !list.load_only_inlined_plugins
            && let Some(dir) = source.and_then(Path::parent).map(|d| d.join(&list.name))
            && dir.is_dir()
        {
            for f in conf_files_with(&dir, &["conf"]).map_err(|e| invalid(source, e.to_string()))? {
                let bytes =
                    fs::read(&f).map_err(|e| Error::io(format!("reading {}", f.display()), e))?;
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Object(m)) => list.plugins.push(m),
                    _ => return Err(invalid(Some(&f), "not a JSON object")),
                }
            }
        }
        let cni_version = select_version(&list).map_err(|m| invalid(source, m))?;
        if list.plugins.is_empty() {
            return Err(invalid(source, "no plugins in list"));
        }
        let mut plugins = Vec::new();
        for (i, raw) in list.plugins.iter().enumerate() {
            let plugin_type = raw
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if plugin_type.is_empty() || plugin_type.contains('/') {
                return Err(invalid(
                    source,
                    format!("plugin {i}: missing or invalid \"type\""),
                ));
            }
            let capabilities = match raw.get("capabilities") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(c) => serde_json::from_value(c.clone())
                    .map_err(|e| invalid(source, format!("plugin {i}: capabilities: {e}")))?,
            };
            plugins.push(PluginConf {
                plugin_type,
                capabilities,
                raw: raw.clone(),
            });
        }
        Ok(NetworkConfigList {
            name: list.name.clone(),
            cni_version,
            disable_check: list.disable_check,
            disable_gc: list.disable_gc,
            plugins,
            source: source.map(Path::to_path_buf),
            list,
        })
    }

    /// The capabilities any plugin of the list declares.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = self
            .plugins
            .iter()
            .flat_map(|p| {
                p.capabilities
                    .iter()
                    .filter(|(_, on)| **on)
                    .map(|(k, _)| k.clone())
            })
            .collect();
        caps.sort();
        caps.dedup();
        caps
    }
}

/// The version to use: the newest entry of `cniVersions` this library supports, else `cniVersion`.
fn select_version(list: &NetConfList) -> Result<CniVersion, String> {
    if !list.cni_versions.is_empty() {
        return list
            .cni_versions
            .iter()
            .filter_map(|v| v.parse::<CniVersion>().ok())
            .filter(|v| v.is_supported())
            .max()
            .ok_or_else(|| {
                format!(
                    "no supported version in cniVersions {:?}",
                    list.cni_versions
                )
            });
    }
    let v: CniVersion = if list.cni_version.is_empty() {
        CniVersion::V0_1_0
    } else {
        list.cni_version
            .parse()
            .map_err(|e: crate::version::ParseVersionError| e.to_string())?
    };
    if v.is_supported() {
        Ok(v)
    } else {
        Err(format!("unsupported cniVersion {v}"))
    }
}

fn conf_files_with(dir: &Path, exts: &[&str]) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The configuration files of `dir` (`.conf`, `.conflist`, `.json`) in lexical order.
pub fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    conf_files_with(dir, CONF_EXTENSIONS)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))
}

/// Loads and validates one configuration file.
pub fn load_file(path: &Path) -> Result<NetworkConfigList, Error> {
    let bytes = fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    NetworkConfigList::from_bytes(&bytes, Some(path))
}

/// Loads every configuration file of `dir` in lexical order. Invalid files are reported in the
/// second vector (with their error) and skipped, as runtimes do; the first valid list is the
/// default network.
pub fn load_dir(dir: &Path) -> Result<(Vec<NetworkConfigList>, Vec<Error>), Error> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for f in conf_files(dir)? {
        match load_file(&f) {
            Ok(l) => ok.push(l),
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "skipping invalid CNI configuration");
                bad.push(e);
            }
        }
    }
    Ok((ok, bad))
}

/// One attachment's parameters (libcni's RuntimeConf).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConf {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerId")]
    pub container_id: String,
    /// `CNI_NETNS` (may be empty for DEL).
    #[serde(rename = "netns", default)]
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    #[serde(rename = "ifName")]
    pub ifname: String,
    /// `CNI_ARGS` pairs.
    #[serde(rename = "cniArgs", default)]
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `ips`, ...), passed to plugins declaring them.
    #[serde(rename = "capabilityArgs", default)]
    pub capability_args: Map<String, Value>,
}

/// A cached attachment (`results/<net>-<containerid>-<ifname>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAttachment {
    /// [`CACHE_KIND`].
    pub kind: String,
    /// The network name.
    #[serde(rename = "networkName")]
    pub network_name: String,
    /// The attachment.
    #[serde(flatten)]
    pub runtime: RuntimeConf,
    /// The list as it was when ADD ran.
    #[serde(default)]
    pub config: Value,
    /// The final result of ADD (in the list's version).
    #[serde(default)]
    pub result: Value,
}

/// The runtime-side CNI client.
#[derive(Debug, Clone)]
pub struct CniConfig {
    /// Directories searched for plugin binaries (`CNI_PATH`).
    pub plugin_dirs: Vec<PathBuf>,
    /// State: `results/` (cache) and `locks/`.
    pub state_dir: PathBuf,
}

/// A held per-container lock.
#[derive(Debug)]
struct ContainerLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl ContainerLock {
    /// Removes the lock file while holding it (waiters notice and retry on a new file).
    fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl CniConfig {
    /// A client looking for plugins in `plugin_dirs` and keeping state under `state_dir`
    /// (e.g. `/var/lib/cni`).
    pub fn new(plugin_dirs: Vec<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        CniConfig {
            plugin_dirs,
            state_dir: state_dir.into(),
        }
    }

    fn results_dir(&self) -> PathBuf {
        self.state_dir.join("results")
    }

    /// The cache file of an attachment.
    pub fn cache_path(&self, network: &str, rt: &RuntimeConf) -> PathBuf {
        self.results_dir()
            .join(format!("{network}-{}-{}", rt.container_id, rt.ifname))
    }

    /// Takes the container's lock (`locks/<id>.lock`), waiting for other threads and
    /// processes. A lock file removed by its holder (after DEL) while we waited is not a lock:
    /// we retry on the new file.
    fn lock_container(&self, container_id: &str) -> Result<ContainerLock, Error> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.state_dir.join("locks");
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(format!("{container_id}.lock"));
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let lock = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| Error::io(format!("locking {}", path.display()), e.into()))?;
            let same = match (fs::metadata(&path), lock.metadata()) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                return Ok(ContainerLock { _lock: lock, path });
            }
        }
    }

    fn check_runtime(rt: &RuntimeConf, need_netns: bool) -> Result<(), Error> {
        let bad = |e: CniError| Error::InvalidConfig {
            path: None,
            msg: e.msg,
        };
        validate_container_id(&rt.container_id).map_err(bad)?;
        validate_ifname(&rt.ifname).map_err(bad)?;
        if need_netns && rt.netns.as_os_str().is_empty() {
            return Err(Error::InvalidConfig {
                path: None,
                msg: "netns path is required".into(),
            });
        }
        Ok(())
    }

    fn env(&self, command: Command, rt: Option<&RuntimeConf>) -> Vec<(String, OsString)> {
        let mut env: Vec<(String, OsString)> =
            vec![("CNI_COMMAND".into(), command.as_str().into())];
        if let Some(rt) = rt {
            env.push(("CNI_CONTAINERID".into(), rt.container_id.clone().into()));
            if !rt.netns.as_os_str().is_empty() {
                env.push(("CNI_NETNS".into(), rt.netns.clone().into_os_string()));
            }
            env.push(("CNI_IFNAME".into(), rt.ifname.clone().into()));
            let args = rt
                .args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";");
            env.push(("CNI_ARGS".into(), args.into()));
        }
        let mut path = OsString::new();
        for (i, d) in self.plugin_dirs.iter().enumerate() {
            if i > 0 {
                path.push(":");
            }
            path.push(d);
        }
        env.push(("CNI_PATH".into(), path));
        env
    }

    /// The stdin of one plugin: its configuration with `name`, `cniVersion`, the capability
    /// arguments it declares as `runtimeConfig`, and `prevResult`.
    fn plugin_stdin(
        &self,
        net: &NetworkConfigList,
        plugin: &PluginConf,
        rt: Option<&RuntimeConf>,
        prev: Option<&CniResult>,
        extra: &[(&str, Value)],
    ) -> Result<Vec<u8>, Error> {
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), Value::String(net.name.clone()));
        conf.insert(
            "cniVersion".into(),
            Value::String(net.cni_version.to_string()),
        );
        if let Some(rt) = rt {
            let rc: Map<String, Value> = plugin
                .capabilities
                .iter()
                .filter(|(_, on)| **on)
                .filter_map(|(k, _)| rt.capability_args.get(k).map(|v| (k.clone(), v.clone())))
                .collect();
            if !rc.is_empty() {
                conf.insert("runtimeConfig".into(), Value::Object(rc));
            }
        }
        if let Some(prev) = prev {
            let v = prev
                .to_value(net.cni_version)
                .map_err(|e| Error::InvalidOutput {
                    plugin: plugin.plugin_type.clone(),
                    command: "prevResult".into(),
                    msg: e.to_string(),
                })?;
            conf.insert("prevResult".into(), v);
        }
        for (k, v) in extra {
            conf.insert((*k).to_string(), v.clone());
        }
        serde_json::to_vec(&Value::Object(conf)).map_err(|e| Error::InvalidConfig {
            path: None,
            msg: e.to_string(),
        })
    }

    fn exec(
        &self,
        plugin: &str,
        command: Command,
        env: &[(String, OsString)],
        stdin: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let bin = find_plugin(plugin, &self.plugin_dirs).ok_or_else(|| Error::PluginNotFound {
            plugin: plugin.to_string(),
            path: self.plugin_dirs.clone(),
        })?;
        tracing::debug!(plugin, %command, "exec CNI plugin");
        exec_plugin(&bin, env, stdin).map_err(|e| match e {
            ExecError::Plugin(error) => Error::Plugin {
                plugin: plugin.to_string(),
                command: command.to_string(),
                error: Box::new(error),
            },
            ExecError::Spawn { path, source } => {
                Error::io(format!("executing {}", path.display()), source)
            }
        })
    }

    /// Runs `VERSION` on a plugin.
    pub fn get_version_info(
        &self,
        plugin_type: &str,
        version: CniVersion,
    ) -> Result<VersionInfo, Error> {
        let stdin = serde_json::json!({ "cniVersion": version.to_string() }).to_string();
        let out = self.exec(
            plugin_type,
            Command::Version,
            &self.env(Command::Version, None),
            stdin.as_bytes(),
        )?;
        serde_json::from_slice(&out).map_err(|e| Error::InvalidOutput {
            plugin: plugin_type.to_string(),
            command: "VERSION".into(),
            msg: e.to_string(),
        })
    }

    /// Checks that every plugin exists and supports the list's version; returns the list's
    /// capabilities.
    pub fn validate_network_list(&self, net: &NetworkConfigList) -> Result<Vec<String>, Error> {
        for p in &net.plugins {
            let info = self.get_version_info(&p.plugin_type, net.cni_version)?;
            if !info.supports(net.cni_version) {
                return Err(Error::IncompatibleVersion(format!(
                    "plugin {} does not support version {} (supports {:?})",
                    p.plugin_type, net.cni_version, info.supported_versions
                )));
            }
        }
        Ok(net.capabilities())
    }

    /// Version negotiation: the newest version allowed by the list (`cniVersions`, or
    /// `cniVersion`), this library and every plugin's `VERSION` reply. Returns the list with
    /// that version.
    pub fn negotiate(&self, net: &NetworkConfigList) -> Result<NetworkConfigList, Error> {
        let mut candidates: Vec<CniVersion> = if net.list.cni_versions.is_empty() {
            vec![net.cni_version]
        } else {
            net.list
                .cni_versions
                .iter()
                .filter_map(|v| v.parse().ok())
                .filter(|v: &CniVersion| v.is_supported())
                .collect()
        };
        for p in &net.plugins {
            let info = self.get_version_info(&p.plugin_type, net.cni_version)?;
            let theirs = info.versions();
            candidates.retain(|v| theirs.contains(v));
        }
        let v = candidates.into_iter().max().ok_or_else(|| {
            Error::IncompatibleVersion(format!(
                "no version of network {} is supported by all its plugins",
                net.name
            ))
        })?;
        let mut out = net.clone();
        out.cni_version = v;
        Ok(out)
    }

    /// ADD: runs the plugins in order and caches the final result. If a plugin fails, DEL is
    /// run for the whole list before the error is returned.
    pub fn add_network_list(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult, Error> {
        Self::check_runtime(rt, true)?;
        let _lock = self.lock_container(&rt.container_id)?;
        let env = self.env(Command::Add, Some(rt));
        let mut prev: Option<CniResult> = None;
        for p in &net.plugins {
            let step = self
                .plugin_stdin(net, p, Some(rt), prev.as_ref(), &[])
                .and_then(|stdin| {
                    let out = self.exec(&p.plugin_type, Command::Add, &env, &stdin)?;
                    CniResult::from_json(&out).map_err(|e| Error::InvalidOutput {
                        plugin: p.plugin_type.clone(),
                        command: "ADD".into(),
                        msg: e.to_string(),
                    })
                });
            match step {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    tracing::warn!(network = %net.name, container = %rt.container_id, error = %e, "CNI ADD failed, running DEL");
                    if let Err(de) = self.del_locked(net, rt, prev.as_ref()) {
                        tracing::warn!(error = %de, "DEL after failed ADD also failed");
                    }
                    let _ = fs::remove_file(self.cache_path(&net.name, rt));
                    return Err(e);
                }
            }
        }
        let mut result = prev.unwrap_or_default();
        result.cni_version = net.cni_version.to_string();
        if let Err(e) = self.write_cache(net, rt, &result) {
            let _ = self.del_locked(net, rt, Some(&result));
            return Err(e);
        }
        Ok(result)
    }

    /// CHECK: runs the plugins in order with the cached result. Refused for lists older than
    /// 0.4.0 or with `disableCheck`; needs a cached result.
    pub fn check_network_list(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<(), Error> {
        Self::check_runtime(rt, true)?;
        if !net.cni_version.supports_check() {
            return Err(Error::IncompatibleVersion(format!(
                "configuration version {} does not allow CHECK",
                net.cni_version
            )));
        }
        if net.disable_check {
            return Err(Error::NotAllowed(format!(
                "network {} has disableCheck",
                net.name
            )));
        }
        let _lock = self.lock_container(&rt.container_id)?;
        let cached = self.cached_result(&net.name, rt)?.ok_or_else(|| {
            Error::NoCachedResult(format!("{}/{}/{}", net.name, rt.container_id, rt.ifname))
        })?;
        let env = self.env(Command::Check, Some(rt));
        for p in &net.plugins {
            let stdin = self.plugin_stdin(net, p, Some(rt), Some(&cached), &[])?;
            self.exec(&p.plugin_type, Command::Check, &env, &stdin)?;
        }
        Ok(())
    }

    /// DEL: runs the plugins in reverse order with the cached result (if any), then removes the
    /// cache. A missing cache is fine.
    pub fn del_network_list(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), Error> {
        Self::check_runtime(rt, false)?;
        let lock = self.lock_container(&rt.container_id)?;
        let cached = match self.cached_result(&net.name, rt) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring unreadable CNI cache");
                None
            }
        };
        self.del_locked(net, rt, cached.as_ref())?;
        let path = self.cache_path(&net.name, rt);
        match fs::remove_file(&path) {
            Ok(()) => {
                lock.remove();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                lock.remove();
                Ok(())
            }
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    fn del_locked(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
        prev: Option<&CniResult>,
    ) -> Result<(), Error> {
        let env = self.env(Command::Del, Some(rt));
        // prevResult exists for DEL from 0.4.0 on.
        let prev = prev.filter(|_| net.cni_version >= CniVersion::V0_4_0);
        for p in net.plugins.iter().rev() {
            let stdin = self.plugin_stdin(net, p, Some(rt), prev, &[])?;
            self.exec(&p.plugin_type, Command::Del, &env, &stdin)?;
        }
        Ok(())
    }

    /// GC: DELs every cached attachment of this network not in `valid` (with the configuration
    /// cached at its ADD when readable), then sends GC with `cni.dev/valid-attachments` to every
    /// plugin (1.1 lists without `disableGC`). All errors are collected.
    pub fn gc_network_list(
        &self,
        net: &NetworkConfigList,
        valid: &[GcAttachment],
    ) -> Result<(), Error> {
        let keep: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut errors = Vec::new();
        for cached in self.cached_attachments(&net.name)? {
            let rt = &cached.runtime;
            if keep.contains(&(rt.container_id.as_str(), rt.ifname.as_str())) {
                continue;
            }
            let conf = serde_json::to_vec(&cached.config)
                .ok()
                .and_then(|b| NetworkConfigList::from_bytes(&b, None).ok())
                .unwrap_or_else(|| net.clone());
            tracing::debug!(network = %net.name, container = %rt.container_id, "GC: deleting stale attachment");
            if let Err(e) = self.del_network_list(&conf, rt) {
                errors.push(e);
            }
        }
        if !net.disable_gc && net.cni_version.supports_gc_status() {
            let attachments = serde_json::to_value(valid).map_err(|e| Error::InvalidConfig {
                path: None,
                msg: e.to_string(),
            })?;
            let env = self.env(Command::Gc, None);
            for p in &net.plugins {
                let r = self
                    .plugin_stdin(
                        net,
                        p,
                        None,
                        None,
                        &[(VALID_ATTACHMENTS_KEY, attachments.clone())],
                    )
                    .and_then(|stdin| self.exec(&p.plugin_type, Command::Gc, &env, &stdin));
                if let Err(e) = r {
                    errors.push(e);
                }
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Multiple(errors)),
        }
    }

    /// STATUS: asks every plugin; the first error (code 50 = not available) is returned. Lists
    /// older than 1.1.0 are always ready.
    pub fn status_network_list(&self, net: &NetworkConfigList) -> Result<(), Error> {
        if !net.cni_version.supports_gc_status() {
            return Ok(());
        }
        let env = self.env(Command::Status, None);
        for p in &net.plugins {
            let stdin = self.plugin_stdin(net, p, None, None, &[])?;
            self.exec(&p.plugin_type, Command::Status, &env, &stdin)?;
        }
        Ok(())
    }

    fn write_cache(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
        result: &CniResult,
    ) -> Result<(), Error> {
        let dir = self.results_dir();
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let entry = CachedAttachment {
            kind: CACHE_KIND.into(),
            network_name: net.name.clone(),
            runtime: rt.clone(),
            config: serde_json::to_value(&net.list).unwrap_or(Value::Null),
            result: result
                .to_value(net.cni_version)
                .map_err(|e| Error::InvalidConfig {
                    path: None,
                    msg: e.to_string(),
                })?,
        };
        let path = self.cache_path(&net.name, rt);
        let bytes = serde_json::to_vec(&entry).map_err(|e| Error::InvalidConfig {
            path: None,
            msg: e.to_string(),
        })?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, bytes).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("renaming {}", tmp.display()), e)
        })
    }

    /// The cached entry of an attachment, if any.
    pub fn cached_attachment(
        &self,
        network: &str,
        rt: &RuntimeConf,
    ) -> Result<Option<CachedAttachment>, Error> {
        let path = self.cache_path(network, rt);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::InvalidOutput {
                    plugin: "cache".into(),
                    command: path.display().to_string(),
                    msg: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The cached result of an attachment, if any.
    pub fn cached_result(
        &self,
        network: &str,
        rt: &RuntimeConf,
    ) -> Result<Option<CniResult>, Error> {
        match self.cached_attachment(network, rt)? {
            None => Ok(None),
            Some(c) if c.result.is_null() => Ok(None),
            Some(c) => {
                CniResult::from_value(&c.result)
                    .map(Some)
                    .map_err(|e| Error::InvalidOutput {
                        plugin: "cache".into(),
                        command: network.to_string(),
                        msg: e.to_string(),
                    })
            }
        }
    }

    /// Every cached attachment of `network` (unreadable entries are skipped).
    pub fn cached_attachments(&self, network: &str) -> Result<Vec<CachedAttachment>, Error> {
        let dir = self.results_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let prefix = format!("{network}-");
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            if !name
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix) && !n.contains(".tmp"))
            {
                continue;
            }
            match fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<CachedAttachment>(&b).ok())
            {
                Some(c) if c.network_name == network && c.kind == CACHE_KIND => out.push(c),
                _ => tracing::debug!(file = %e.path().display(), "skipping cache entry"),
            }
        }
        Ok(out)
    }

    /// [`CniConfig::add_network_list`] on tokio's blocking pool.
    pub async fn add_network_list_async(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult, Error> {
        let (this, net, rt) = (self.clone(), net.clone(), rt.clone());
        blocking(move || this.add_network_list(&net, &rt)).await
    }

    /// [`CniConfig::del_network_list`] on tokio's blocking pool.
    pub async fn del_network_list_async(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<(), Error> {
        let (this, net, rt) = (self.clone(), net.clone(), rt.clone());
        blocking(move || this.del_network_list(&net, &rt)).await
    }

    /// [`CniConfig::check_network_list`] on tokio's blocking pool.
    pub async fn check_network_list_async(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<(), Error> {
        let (this, net, rt) = (self.clone(), net.clone(), rt.clone());
        blocking(move || this.check_network_list(&net, &rt)).await
    }

    /// [`CniConfig::gc_network_list`] on tokio's blocking pool.
    pub async fn gc_network_list_async(
        &self,
        net: &NetworkConfigList,
        valid: &[GcAttachment],
    ) -> Result<(), Error> {
        let (this, net, valid) = (self.clone(), net.clone(), valid.to_vec());
        blocking(move || this.gc_network_list(&net, &valid)).await
    }

    /// [`CniConfig::status_network_list`] on tokio's blocking pool.
    pub async fn status_network_list_async(&self, net: &NetworkConfigList) -> Result<(), Error> {
        let (this, net) = (self.clone(), net.clone());
        blocking(move || this.status_network_list(&net)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conf_becomes_list_and_versions() {
        let conf = json!({"cniVersion": "1.0.0", "name": "dhnet", "type": "loopback"});
        let l = NetworkConfigList::from_bytes(conf.to_string().as_bytes(), None).expect("conf");
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.cni_version, CniVersion::V1_0_0);
        let list = json!({"cniVersion": "1.0.0", "cniVersions": ["0.4.0", "1.1.0", "9.9.9"], "name": "dhnet",
            "plugins": [{"type": "a", "capabilities": {"portMappings": true, "ips": false}}, {"type": "b"}]});
        let l = NetworkConfigList::from_bytes(list.to_string().as_bytes(), None).expect("list");
        assert_eq!(l.cni_version, CniVersion::V1_1_0);
        assert_eq!(l.capabilities(), vec!["portMappings".to_string()]);
        for bad in [
            json!({"cniVersion": "0.2.0", "name": "n", "type": "x"}),
            json!({"cniVersion": "1.0.0", "name": "../n", "type": "x"}),
            json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
            json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../x"}]}),
            json!({"cniVersion": "1.0.0", "name": "n"}),
            json!([1]),
        ] {
            assert!(
                NetworkConfigList::from_bytes(bad.to_string().as_bytes(), None).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn stdin_injection() {
        let list = json!({"cniVersion": "1.0.0", "name": "dhnet",
            "plugins": [{"type": "a", "capabilities": {"portMappings": true}, "x": 1}, {"type": "b"}]});
        let l = NetworkConfigList::from_bytes(list.to_string().as_bytes(), None).expect("list");
        let c = CniConfig::new(vec![], "/nonexistent");
        let mut rt = RuntimeConf {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        rt.capability_args.insert(
            "portMappings".into(),
            json!([{"hostPort": 1, "containerPort": 2}]),
        );
        rt.capability_args.insert("bandwidth".into(), json!({}));
        let prev = CniResult::from_value(
            &json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.2/24"}]}),
        )
        .expect("r");
        let a: Value = serde_json::from_slice(
            &c.plugin_stdin(&l, &l.plugins[0], Some(&rt), Some(&prev), &[])
                .expect("a"),
        )
        .expect("json");
        assert_eq!(a["name"], "dhnet");
        assert_eq!(a["x"], 1);
        assert_eq!(a["runtimeConfig"]["portMappings"][0]["hostPort"], 1);
        assert!(a["runtimeConfig"].get("bandwidth").is_none());
        assert_eq!(a["prevResult"]["cniVersion"], "1.0.0");
        let b: Value = serde_json::from_slice(
            &c.plugin_stdin(&l, &l.plugins[1], Some(&rt), None, &[])
                .expect("b"),
        )
        .expect("json");
        assert!(b.get("runtimeConfig").is_none() && b.get("prevResult").is_none());
    }

    #[test]
    fn load_dir_lexical_and_skips_invalid() {
        let tmp = tempfile::tempdir().expect("tmp");
        let w = |n: &str, v: Value| fs::write(tmp.path().join(n), v.to_string()).expect("write");
        w(
            "20-b.conflist",
            json!({"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "x"}]}),
        );
        w(
            "10-a.conf",
            json!({"cniVersion": "1.0.0", "name": "a", "type": "x"}),
        );
        w(
            "30-c.json",
            json!({"cniVersion": "1.0.0", "name": "c", "type": "x"}),
        );
        w("05-bad.conf", json!({"name": "bad"}));
        w(
            "99-ignored.txt",
            json!({"cniVersion": "1.0.0", "name": "z", "type": "x"}),
        );
        let (ok, bad) = load_dir(tmp.path()).expect("load");
        assert_eq!(
            ok.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(bad.len(), 1);
    }
}
