//! CNI wire types (spec 1.1): network configurations and lists, results of every supported
//! version (0.3.0 to 1.1.0) with conversion between them, DNS, routes, GC attachments and the
//! well-known capability arguments.
//!
//! A plugin sees its configuration as a [`NetConf`] (the fields the spec defines, with the
//! plugin's own fields kept in [`NetConf::extra`]); it can parse its own view with
//! [`crate::plugin::Request::parse_config`]. Results are held as [`CniResult`] in the 1.1 form and
//! converted on output with [`CniResult::to_value`] / [`CniResult::to_json`] and on input with
//! [`CniResult::from_value`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::CniError;
use crate::version::CniVersion;

/// The configuration key in a GC request that lists the attachments to keep.
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";

/// One plugin's network configuration, as a plugin receives it on stdin (after the runtime has
/// inserted `name`, `cniVersion`, `runtimeConfig` and `prevResult`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    /// The spec version of the configuration (and of the result wanted).
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The network name.
    #[serde(default)]
    pub name: String,
    /// The plugin type (the binary's name).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Capabilities the plugin supports (only in configuration files; runtimes strip them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
    /// The IPAM section: `type` plus the IPAM plugin's own keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamConf>,
    /// DNS settings from the configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Runtime-provided arguments (`args`, e.g. `{"cni": {"ips": [...]}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Capability arguments from the runtime, keyed by capability name.
    #[serde(
        rename = "runtimeConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub runtime_config: Option<Map<String, Value>>,
    /// The previous plugin's result in a chain (raw, in `cniVersion`'s format).
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<Value>,
    /// Every other key (the plugin's own configuration).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl NetConf {
    /// The configuration's version; a missing or malformed version is the spec's error 1.
    pub fn version(&self) -> Result<CniVersion, CniError> {
        if self.cni_version.is_empty() {
            // The spec's implicit version for configurations without one.
            return Ok(CniVersion::V0_1_0);
        }
        CniVersion::parse_cni(&self.cni_version)
    }

    /// The previous result parsed, if there is one.
    pub fn parsed_prev_result(&self) -> Result<Option<CniResult>, CniError> {
        match &self.prev_result {
            None | Some(Value::Null) => Ok(None),
            Some(v) => CniResult::from_value(v).map(Some),
        }
    }

    /// One capability argument from `runtimeConfig` (e.g. `portMappings`), parsed.
    pub fn runtime_config_field<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, CniError> {
        match self.runtime_config.as_ref().and_then(|m| m.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| CniError::decode(format!("runtimeConfig.{key}: {e}"))),
        }
    }

    /// The attachments to keep in a GC request (`cni.dev/valid-attachments`).
    pub fn valid_attachments(&self) -> Result<Vec<GcAttachment>, CniError> {
        match self.extra.get(VALID_ATTACHMENTS_KEY) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| CniError::decode(format!("{VALID_ATTACHMENTS_KEY}: {e}"))),
        }
    }
}

/// The `ipam` section of a configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamConf {
    /// The IPAM plugin type (binary name).
    #[serde(rename = "type", default)]
    pub ipam_type: String,
    /// The IPAM plugin's own keys.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A network configuration list (`.conflist`), or a single `.conf` turned into a one-plugin list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConfList {
    /// The list's spec version.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Versions the list is valid for (1.1); the runtime picks the newest it supports.
    #[serde(rename = "cniVersions", default, skip_serializing_if = "Vec::is_empty")]
    pub cni_versions: Vec<String>,
    /// The network name.
    #[serde(default)]
    pub name: String,
    /// Whether CHECK is disabled for this network.
    #[serde(rename = "disableCheck", default, deserialize_with = "bool_or_string")]
    pub disable_check: bool,
    /// Whether GC is disabled for this network (1.1).
    #[serde(rename = "disableGC", default, deserialize_with = "bool_or_string")]
    pub disable_gc: bool,
    /// Only the inlined `plugins` are used (1.1); otherwise plugin files from a directory named
    /// after the network, next to the list, are appended.
    #[serde(
        rename = "loadOnlyInlinedPlugins",
        default,
        deserialize_with = "bool_or_string"
    )]
    pub load_only_inlined_plugins: bool,
    /// The plugins' configurations, in order, raw (they keep every plugin-specific key).
    #[serde(default)]
    pub plugins: Vec<Map<String, Value>>,
}

fn bool_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum B {
        B(bool),
        S(String),
    }
    match B::deserialize(d)? {
        B::B(b) => Ok(b),
        B::S(s) => match s.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" | "" => Ok(false),
            _ => Err(serde::de::Error::custom(format!("invalid boolean {s:?}"))),
        },
    }
}

/// An attachment named in a GC request: the runtime still uses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GcAttachment {
    /// The container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name inside the container.
    pub ifname: String,
}

/// DNS settings (config or result).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// resolv.conf options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// An interface in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// The interface name.
    pub name: String,
    /// The hardware address, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The MTU (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for a container interface; empty for a host interface.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// A socket path (1.1, e.g. vhost-user).
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// A PCI id (1.1, e.g. SR-IOV).
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// An IP address assigned to an interface in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Index into the result's `interfaces`, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// The address with its prefix length (`10.1.0.5/24`).
    pub address: IpNet,
    /// The default gateway for this subnet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// A route in a configuration or a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; none means the interface's default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Metric (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Scope (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    /// A route to `dst` through `gw`, without the 1.1 attributes.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// A port mapping (the `portMappings` capability argument).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port on the host.
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    /// Port in the container.
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Host address to bind; empty for all.
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

fn default_protocol() -> String {
    "tcp".to_string()
}

/// A result (ADD, and prevResult), held in the 1.1 form. IPAM plugins return the same type
/// without interfaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// The version this result was parsed from or is meant for.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Interfaces created or used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Assigned addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS.
    #[serde(default)]
    pub dns: Dns,
}

/// The result an IPAM plugin returns (no interfaces).
pub type IpamResult = CniResult;

impl CniResult {
    /// Parses a result of any supported version (0.3.0 to 1.1.0). Unknown fields are ignored;
    /// 0.1/0.2 results are the spec's error 1.
    pub fn from_value(v: &Value) -> Result<CniResult, CniError> {
        let version = match v.get("cniVersion") {
            Some(Value::String(s)) => CniVersion::parse_cni(s)?,
            None => return Err(CniError::decode("result has no cniVersion")),
            Some(other) => return Err(CniError::decode(format!("invalid cniVersion {other}"))),
        };
        if !version.is_supported() {
            return Err(CniError::incompatible_version(format!(
                "unsupported result version {version}"
            )));
        }
        let mut r: CniResult = serde_json::from_value(v.clone())
            .map_err(|e| CniError::decode(format!("result: {e}")))?;
        r.cni_version = version.to_string();
        if let Some(n) = r
            .ips
            .iter()
            .filter_map(|ip| ip.interface)
            .find(|&i| i >= r.interfaces.len())
        {
            return Err(CniError::decode(format!(
                "result: ip refers to missing interface {n}"
            )));
        }
        Ok(r)
    }

    /// Parses a result from JSON text.
    pub fn from_json(s: &[u8]) -> Result<CniResult, CniError> {
        let v: Value =
            serde_json::from_slice(s).map_err(|e| CniError::decode(format!("result: {e}")))?;
        Self::from_value(&v)
    }

    /// The result in `version`'s format: 0.3.x/0.4.0 add `version` to each IP; before 1.1 the
    /// 1.1-only route and interface attributes are dropped. 0.1/0.2 are the spec's error 1.
    pub fn to_value(&self, version: CniVersion) -> Result<Value, CniError> {
        if !version.is_supported() {
            return Err(CniError::incompatible_version(format!(
                "cannot convert result to version {version}"
            )));
        }
        let mut r = self.clone();
        r.cni_version = version.to_string();
        if version < CniVersion::V1_1_0 {
            for i in &mut r.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for rt in &mut r.routes {
                *rt = Route::new(rt.dst, rt.gw);
            }
        }
        let mut v =
            serde_json::to_value(&r).map_err(|e| CniError::io(format!("encode result: {e}")))?;
        if version < CniVersion::V1_0_0
            && let Some(Value::Array(ips)) = v.get_mut("ips")
        {
            for (ip, cfg) in ips.iter_mut().zip(&r.ips) {
                if let Value::Object(m) = ip {
                    let fam = if cfg.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    m.insert("version".into(), Value::String(fam.into()));
                }
            }
        }
        Ok(v)
    }

    /// The result in `version`'s format as JSON text.
    pub fn to_json(&self, version: CniVersion) -> Result<String, CniError> {
        let v = self.to_value(version)?;
        serde_json::to_string(&v).map_err(|e| CniError::io(format!("encode result: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                mtu: Some(1500),
                sandbox: "/var/run/netns/x".into(),
                ..Default::default()
            }],
            ips: vec![
                IpConfig {
                    interface: Some(0),
                    address: "10.1.2.3/24".parse().expect("net"),
                    gateway: Some("10.1.2.1".parse().expect("ip")),
                },
                IpConfig {
                    interface: Some(0),
                    address: "fd00::3/64".parse().expect("net"),
                    gateway: None,
                },
            ],
            routes: vec![Route {
                mtu: Some(1400),
                ..Route::new("0.0.0.0/0".parse().expect("net"), None)
            }],
            dns: Dns {
                nameservers: vec!["10.0.0.10".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn conversions() {
        let r = sample();
        let v11 = r.to_value(CniVersion::V1_1_0).expect("1.1");
        assert_eq!(v11["cniVersion"], "1.1.0");
        assert_eq!(v11["routes"][0]["mtu"], 1400);
        assert_eq!(v11["interfaces"][0]["mtu"], 1500);
        assert!(v11["ips"][0].get("version").is_none());

        let v10 = r.to_value(CniVersion::V1_0_0).expect("1.0");
        assert!(v10["routes"][0].get("mtu").is_none());
        assert!(v10["interfaces"][0].get("mtu").is_none());
        assert!(v10["ips"][0].get("version").is_none());

        let v04 = r.to_value(CniVersion::V0_4_0).expect("0.4");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["ips"][1]["version"], "6");
        assert_eq!(v04["ips"][0]["address"], "10.1.2.3/24");
        assert_eq!(v04["ips"][0]["gateway"], "10.1.2.1");

        // Round trip from an old version keeps everything that version has.
        let back = CniResult::from_value(&v04).expect("parse 0.4");
        assert_eq!(back.cni_version, "0.4.0");
        assert_eq!(back.ips, r.ips);
        assert!(r.to_value(CniVersion::V0_2_0).is_err());
        let e =
            CniResult::from_value(&json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}))
                .expect_err("0.2 refused");
        assert_eq!(e.code, 1);
    }

    #[test]
    fn result_validation() {
        let bad =
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 3}]});
        assert_eq!(CniResult::from_value(&bad).expect_err("bad index").code, 6);
        let bad = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]});
        assert_eq!(CniResult::from_value(&bad).expect_err("no prefix").code, 6);
    }

    #[test]
    fn netconf_keeps_plugin_keys() {
        let c: NetConf = serde_json::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "bridge", "bridge": "dh0", "isGateway": true,
            "ipam": {"type": "host-local", "subnet": "10.0.0.0/24"},
            "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80}]},
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}],
        }))
        .expect("parse");
        assert_eq!(c.extra["bridge"], "dh0");
        assert_eq!(c.ipam.as_ref().expect("ipam").ipam_type, "host-local");
        assert_eq!(
            c.ipam.as_ref().expect("ipam").extra["subnet"],
            "10.0.0.0/24"
        );
        let pm: Vec<PortMapping> = c
            .runtime_config_field("portMappings")
            .expect("ok")
            .expect("some");
        assert_eq!(pm[0].protocol, "tcp");
        assert_eq!(c.valid_attachments().expect("ok")[0].container_id, "c1");
        assert_eq!(c.version().expect("v"), CniVersion::V1_0_0);
    }

    #[test]
    fn conflist_parsing() {
        let l: NetConfList = serde_json::from_value(json!({
            "cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "n",
            "disableCheck": "true", "plugins": [{"type": "loopback"}]
        }))
        .expect("parse");
        assert!(l.disable_check && !l.disable_gc);
        assert_eq!(l.cni_versions.len(), 2);
        assert!(
            serde_json::from_value::<NetConfList>(json!({"name": "n", "disableCheck": "maybe"}))
                .is_err()
        );
    }
}
