//! The CNI caller: the pod network through `deckhand-cni`'s runtime side (libcni semantics).
//!
//! The network is the first valid configuration (lexical order) in the configured directory,
//! read when a sandbox is set up, as containerd's CRI does with `max_conf_num = 1`. ADD passes
//! the pod's port mappings (`portMappings`) and bandwidth annotations (`bandwidth`) as
//! capability arguments and `K8S_POD_*` as `CNI_ARGS`; DEL runs with the configuration cached
//! at ADD when the directory no longer has it, so a pod can always be torn down.

use std::path::{Path, PathBuf};

use deckhand_cni::runtime::{self, CniConfig, NetworkConfigList, RuntimeConf};
use deckhand_proto::cri;
use serde_json::{Map, Value, json};

use super::{Config, Error, Result};

/// The pod network of one manager.
#[derive(Debug, Clone)]
pub struct Network {
    conf_dir: PathBuf,
    ifname: String,
    cni: CniConfig,
}

/// The attachment of one sandbox.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub sandbox_id: &'a str,
    pub netns: &'a Path,
    pub config: &'a cri::PodSandboxConfig,
}

impl Network {
    pub fn new(cfg: &Config) -> Network {
        Network {
            conf_dir: cfg.cni_conf_dir.clone(),
            ifname: cfg.cni_ifname.clone(),
            cni: CniConfig::new(cfg.cni_bin_dirs.clone(), cfg.root.join("cni")),
        }
    }

    /// The network to use, or why there is none.
    pub fn load(&self) -> Result<NetworkConfigList, String> {
        let (lists, errors) = runtime::load_dir(&self.conf_dir).map_err(|e| e.to_string())?;
        match lists.into_iter().next() {
            Some(l) => Ok(l),
            None => Err(match errors.first() {
                Some(e) => format!(
                    "no valid CNI configuration in {}: {e}",
                    self.conf_dir.display()
                ),
                None => format!(
                    "cni config uninitialized: no network configuration in {}",
                    self.conf_dir.display()
                ),
            }),
        }
    }

    /// NetworkReady: a valid configuration exists.
    pub fn ready(&self) -> Result<(), String> {
        self.load().map(|_| ())
    }

    fn runtime_conf(&self, a: &Attachment<'_>) -> RuntimeConf {
        let md = a.config.metadata.clone().unwrap_or_default();
        let mut caps = Map::new();
        let pm: Vec<Value> = a
            .config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                let proto = match cri::Protocol::try_from(p.protocol) {
                    Ok(cri::Protocol::Udp) => "udp",
                    Ok(cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                };
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": proto,
                });
                if !p.host_ip.is_empty() {
                    m["hostIP"] = json!(p.host_ip);
                }
                m
            })
            .collect();
        if !pm.is_empty() {
            caps.insert("portMappings".into(), Value::Array(pm));
        }
        if let Some(bw) = bandwidth(&a.config.annotations) {
            caps.insert("bandwidth".into(), bw);
        }
        RuntimeConf {
            container_id: a.sandbox_id.to_string(),
            netns: a.netns.to_path_buf(),
            ifname: self.ifname.clone(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), md.namespace),
                ("K8S_POD_NAME".into(), md.name),
                (
                    "K8S_POD_INFRA_CONTAINER_ID".into(),
                    a.sandbox_id.to_string(),
                ),
                ("K8S_POD_UID".into(), md.uid),
            ],
            capability_args: caps,
        }
    }

    /// CNI ADD; the pod's IPs, primary first (IPv4 before IPv6, as the kubelet expects).
    pub async fn add(&self, a: &Attachment<'_>) -> Result<Vec<String>> {
        let net = self
            .load()
            .map_err(|m| Error::FailedPrecondition(format!("setting up the pod network: {m}")))?;
        let rt = self.runtime_conf(a);
        let res = self
            .cni
            .add_network_list_async(&net, &rt)
            .await
            .map_err(|e| Error::Internal(format!("CNI ADD of network {:?}: {e}", net.name)))?;
        let sandbox_ifaces: Vec<usize> = res
            .interfaces
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.sandbox.is_empty())
            .map(|(n, _)| n)
            .collect();
        let mut ips: Vec<std::net::IpAddr> = res
            .ips
            .iter()
            .filter(|ip| match ip.interface {
                Some(i) => sandbox_ifaces.is_empty() || sandbox_ifaces.contains(&i),
                None => true,
            })
            .map(|ip| ip.address.addr())
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips.dedup();
        Ok(ips.into_iter().map(|ip| ip.to_string()).collect())
    }

    /// CNI DEL (idempotent: a missing netns or cache is fine).
    pub async fn del(&self, a: &Attachment<'_>) -> Result<()> {
        let rt = self.runtime_conf(a);
        let net = match self.load() {
            Ok(n) => n,
            Err(why) => match self.cached_list(&rt)? {
                Some(n) => n,
                None => {
                    tracing::warn!(sandbox = %a.sandbox_id, %why, "no CNI configuration to run DEL with; skipping");
                    return Ok(());
                }
            },
        };
        self.cni
            .del_network_list_async(&net, &rt)
            .await
            .map_err(|e| Error::Internal(format!("CNI DEL of network {:?}: {e}", net.name)))
    }

    /// The list cached at ADD for this attachment, whatever network it was.
    fn cached_list(&self, rt: &RuntimeConf) -> Result<Option<NetworkConfigList>> {
        let dir = self.cni.state_dir.join("results");
        let suffix = format!("-{}-{}", rt.container_id, rt.ifname);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(None);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(net) = name.strip_suffix(&suffix) else {
                continue;
            };
            if let Ok(Some(c)) = self.cni.cached_attachment(net, rt) {
                let bytes = serde_json::to_vec(&c.config).unwrap_or_default();
                if let Ok(l) = NetworkConfigList::from_bytes(&bytes, None) {
                    return Ok(Some(l));
                }
            }
        }
        Ok(None)
    }
}

/// The `bandwidth` capability from the kubernetes.io/{ingress,egress}-bandwidth annotations
/// (bits per second; bursts as the kubelet's defaults: unlimited is not expressible, so a
/// large burst).
fn bandwidth(ann: &std::collections::HashMap<String, String>) -> Option<Value> {
    let parse = |k: &str| ann.get(k).and_then(|v| parse_bits(v));
    let ingress = parse("kubernetes.io/ingress-bandwidth");
    let egress = parse("kubernetes.io/egress-bandwidth");
    if ingress.is_none() && egress.is_none() {
        return None;
    }
    let mut m = Map::new();
    const BURST: u64 = i32::MAX as u64;
    if let Some(i) = ingress {
        m.insert("ingressRate".into(), json!(i));
        m.insert("ingressBurst".into(), json!(BURST));
    }
    if let Some(e) = egress {
        m.insert("egressRate".into(), json!(e));
        m.insert("egressBurst".into(), json!(BURST));
    }
    Some(Value::Object(m))
}

/// A Kubernetes quantity of bits per second (`10M`, `1Gi`, `500k`).
fn parse_bits(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_from_annotations() {
        let mut a = std::collections::HashMap::new();
        assert!(bandwidth(&a).is_none());
        a.insert(
            "kubernetes.io/ingress-bandwidth".to_string(),
            "10M".to_string(),
        );
        let v = bandwidth(&a).expect("bandwidth");
        assert_eq!(v["ingressRate"], json!(10_000_000u64));
        assert!(v.get("egressRate").is_none());
        assert_eq!(parse_bits("1Gi"), Some(1 << 30));
        assert_eq!(parse_bits("x"), None);
    }
}
