//! `deckhand-portmap`: forwards host ports to a pod, chained after an interface plugin (it finds
//! the pod's addresses in `prevResult`), with the configuration keys of the reference `portmap`.
//!
//! The mappings come from the `portMappings` capability (`runtimeConfig.portMappings`). Traffic
//! to a local address on `hostPort` is DNATed to `podIP:containerPort` whether it arrives from
//! another host (PREROUTING) or starts on the node (OUTPUT), including `127.0.0.1` (which needs
//! `route_localnet` on the pod's host-side interface and a masquerade so the pod can answer).
//! A pod reaching its own host port (hairpin) is masqueraded too. With `snat: false` neither
//! masquerade is installed. The rules live in [`crate::firewall`]; `backend` picks iptables (the
//! default, as the reference) or nftables.

use std::net::IpAddr;

use serde::Deserialize;

use crate::error::CniError;
use crate::firewall::{self, Backend, Families, Mapping, Owner, PortMapSpec, Proto};
use crate::plugin::{Plugin, Request};
use crate::types::{CniResult, PortMapping};

/// Error code for failures that are not one of the spec's.
pub const INTERNAL_ERROR: u32 = 999;

fn internal(msg: impl std::fmt::Display) -> CniError {
    CniError::plugin(INTERNAL_ERROR, msg.to_string())
}

/// The portmap configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct PortMapConf {
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Masquerade hairpin and localhost traffic (default true).
    #[serde(default)]
    pub snat: Option<bool>,
    /// The mark bit the reference uses for masquerading (0..=31); validated, not needed here.
    #[serde(rename = "markMasqBit", default)]
    pub mark_masq_bit: Option<i64>,
    /// A chain that marks packets for masquerading (e.g. `KUBE-MARK-MASQ`); iptables only.
    #[serde(rename = "externalSetMarkChain", default)]
    pub external_set_mark_chain: Option<String>,
    /// `iptables` (default) or `nftables`.
    #[serde(default)]
    pub backend: Option<String>,
}

struct Conf {
    raw: PortMapConf,
    backend: Backend,
    mappings: Vec<Mapping>,
}

fn load(req: &Request) -> Result<Conf, CniError> {
    let raw: PortMapConf = req.parse_config()?;
    let backend = match raw.backend.as_deref() {
        None | Some("") => Backend::Iptables,
        Some(s) => Backend::parse(s).ok_or_else(|| {
            CniError::invalid_config(format!(
                "invalid backend {s:?} (expected iptables or nftables)"
            ))
        })?,
    };
    if let Some(b) = raw.mark_masq_bit
        && !(0..=31).contains(&b)
    {
        return Err(CniError::invalid_config(format!(
            "markMasqBit must be between 0 and 31, got {b}"
        )));
    }
    if raw.mark_masq_bit.is_some() && raw.external_set_mark_chain.is_some() {
        return Err(CniError::invalid_config(
            "cannot specify externalSetMarkChain and markMasqBit",
        ));
    }
    if let Some(c) = &raw.external_set_mark_chain {
        if backend == Backend::Nftables {
            return Err(CniError::invalid_config(
                "externalSetMarkChain needs the iptables backend",
            ));
        }
        if c.is_empty()
            || c.len() > 28
            || !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_'))
        {
            return Err(CniError::invalid_config(format!(
                "invalid externalSetMarkChain {c:?}"
            )));
        }
    }
    let pms: Vec<PortMapping> = req
        .config
        .runtime_config_field("portMappings")
        .map_err(|e| CniError::invalid_config(e.msg))?
        .unwrap_or_default();
    let mut mappings = Vec::with_capacity(pms.len());
    for pm in pms {
        if pm.host_port == 0 || pm.container_port == 0 {
            return Err(CniError::invalid_config(format!(
                "invalid port mapping {}->{}: ports must be 1-65535",
                pm.host_port, pm.container_port
            )));
        }
        let proto = Proto::parse(&pm.protocol).ok_or_else(|| {
            CniError::invalid_config(format!("unknown protocol {:?}", pm.protocol))
        })?;
        let host_ip = match pm.host_ip.as_str() {
            "" | "0.0.0.0" | "::" => None,
            s => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| CniError::invalid_config(format!("invalid hostIP {s:?}")))?,
            ),
        };
        mappings.push(Mapping {
            host_port: pm.host_port,
            container_port: pm.container_port,
            proto,
            host_ip,
        });
    }
    Ok(Conf {
        raw,
        backend,
        mappings,
    })
}

/// The pod's addresses (first IPv4 and first IPv6 on a container interface) and the name of the
/// host-side interface to allow localhost routing on.
fn pod_addrs(prev: &CniResult) -> (Vec<IpAddr>, Option<String>) {
    let mut ips: Vec<IpAddr> = Vec::new();
    for ipc in &prev.ips {
        let in_sandbox = match ipc.interface {
            Some(i) => prev
                .interfaces
                .get(i)
                .is_some_and(|x| !x.sandbox.is_empty()),
            None => true,
        };
        let ip = ipc.address.addr();
        if in_sandbox && !ips.iter().any(|x| x.is_ipv6() == ip.is_ipv6()) {
            ips.push(ip);
        }
    }
    let host_if = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_empty())
        .map(|i| i.name.clone());
    (ips, host_if)
}

fn spec(conf: &Conf, ips: Vec<IpAddr>) -> PortMapSpec {
    PortMapSpec {
        pod_ips: ips,
        mappings: conf.mappings.clone(),
        snat: conf.raw.snat.unwrap_or(true),
        external_mark_chain: conf.raw.external_set_mark_chain.clone(),
    }
}

/// The portmap plugin.
#[derive(Debug, Default)]
pub struct PortMapPlugin;

impl Plugin for PortMapPlugin {
    fn about(&self) -> String {
        "deckhand-portmap: host port forwarding (Deckhand)".to_string()
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let conf = load(req)?;
        let prev = req
            .prev_result()?
            .ok_or_else(|| CniError::invalid_config("must be called as a chained plugin"))?;
        if conf.mappings.is_empty() {
            return Ok(prev);
        }
        let (ips, host_if) = pod_addrs(&prev);
        if ips.is_empty() {
            return Err(CniError::invalid_config(
                "prevResult has no container address to forward to",
            ));
        }
        let spec = spec(&conf, ips);
        if spec.snat
            && spec.pod_ips.iter().any(IpAddr::is_ipv4)
            && let Some(h) = &host_if
            && crate::plugin::validate_ifname(h).is_ok()
        {
            crate::netns::write_sysctl(&format!("net/ipv4/conf/{h}/route_localnet"), "1")
                .map_err(|e| internal(format!("enable route_localnet on {h}: {e}")))?;
        }
        let owner = Owner::new(&conf.raw.name, &req.container_id);
        if let Err(e) = firewall::portmap_add(conf.backend, &owner, &spec) {
            let _ = firewall::portmap_del(conf.backend, &owner, Families::ALL);
            return Err(internal(e));
        }
        Ok(prev)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        // The previous result (when the runtime passes it) says which families have rules.
        let fam = req
            .prev_result()
            .ok()
            .flatten()
            .map(|r| Families::of(pod_addrs(&r).0))
            .unwrap_or(Families::ALL);
        firewall::portmap_del(
            conf.backend,
            &Owner::new(&conf.raw.name, &req.container_id),
            fam,
        )
        .map_err(internal)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        let prev = req
            .prev_result()?
            .ok_or_else(|| CniError::invalid_config("must be called as a chained plugin"))?;
        if conf.mappings.is_empty() {
            return Ok(());
        }
        let (ips, _) = pod_addrs(&prev);
        firewall::portmap_check(
            conf.backend,
            &Owner::new(&conf.raw.name, &req.container_id),
            &spec(&conf, ips),
        )
        .map_err(internal)
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        let keep: Vec<String> = req
            .valid_attachments()?
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        firewall::gc(conf.backend, &conf.raw.name, &keep).map_err(internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Interface, IpConfig};

    #[test]
    fn pod_addresses_from_prev_result() {
        let prev = CniResult {
            interfaces: vec![
                Interface {
                    name: "dh-br0".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: "/run/netns/x".into(),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    interface: Some(1),
                    address: "10.1.0.5/24".parse().expect("net"),
                    gateway: None,
                },
                IpConfig {
                    interface: Some(0),
                    address: "10.1.0.1/24".parse().expect("net"),
                    gateway: None,
                },
                IpConfig {
                    interface: Some(1),
                    address: "fd00::5/64".parse().expect("net"),
                    gateway: None,
                },
            ],
            ..Default::default()
        };
        let (ips, host) = pod_addrs(&prev);
        assert_eq!(
            ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse::<IpAddr>().expect("ip")
            ]
        );
        assert_eq!(host.as_deref(), Some("dh-br0"));
    }
}
