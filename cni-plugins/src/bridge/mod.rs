//! `deckhand-bridge`: attaches a container to a Linux bridge on the host through a veth pair,
//! with the configuration keys of the reference `bridge` plugin.
//!
//! ADD, in order: validate the configuration and open the container namespace (bad input stops
//! here, before anything changes); start an executed IPAM plugin on a helper thread; ensure the
//! bridge and create the veth pair in one netlink request (host end attached and up, peer created
//! directly in the container namespace under `CNI_IFNAME`, the new host end echoed back by the
//! kernel; a taken `CNI_IFNAME` is learnt from the kernel's refusal); hairpin/VLAN on the port;
//! IPAM (our own `deckhand-host-local` in-process now, or join the thread); up, addresses and
//! routes inside the namespace in one batch; gateway addresses, forwarding, masquerading and the
//! MAC spoof check on the host. Netlink goes through blocking sockets (see [`crate::link`]): no
//! async runtime. A failure after IPAM leased releases the lease and removes what this ADD
//! created (the bridge stays). DEL sends one `RTM_DELLINK` by name in the container namespace
//! (which takes the host end with it) and meanwhile releases the lease and the firewall rules on
//! helper threads; a missing namespace or interface is success.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::error::CniError;
use crate::firewall::{self, Backend, Families, MasqAddr, Owner};
use crate::link::{self, Addr, BridgeSpec, Link, LinkError, Netlink, VethSpec};
use crate::netns::{NetNs, NetnsError};
use crate::plugin::{Plugin, Request};
use crate::types::{CniResult, Interface, IpamConf, Route};

pub use crate::error::INTERNAL_ERROR;

fn internal(msg: impl std::fmt::Display) -> CniError {
    CniError::plugin(INTERNAL_ERROR, msg.to_string())
}

/// Turns link and firewall errors into the plugin's generic error.
pub trait OrCni<T> {
    /// The result with the error as a [`CniError`] (code [`INTERNAL_ERROR`]).
    fn cni(self) -> Result<T, CniError>;
}

impl<T, E: std::fmt::Display> OrCni<T> for Result<T, E> {
    fn cni(self) -> Result<T, CniError> {
        self.map_err(internal)
    }
}

/// Maps a namespace error to the spec's (see `From<NetnsError> for CniError`).
pub fn netns_error(e: NetnsError) -> CniError {
    e.into()
}

/// The bridge plugin's configuration (the reference's keys).
#[derive(Debug, Clone, Deserialize)]
pub struct BridgeConf {
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Bridge name (default `cni0`).
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// Give the bridge the gateway address(es).
    #[serde(rename = "isGateway", default)]
    pub is_gateway: bool,
    /// Also add a default route through the gateway (implies `isGateway`).
    #[serde(rename = "isDefaultGateway", default)]
    pub is_default_gateway: bool,
    /// Replace a different address of the same family on the bridge.
    #[serde(rename = "forceAddress", default)]
    pub force_address: bool,
    /// Masquerade traffic leaving the pod's subnet.
    #[serde(rename = "ipMasq", default)]
    pub ip_masq: bool,
    /// `iptables` (default) or `nftables`.
    #[serde(rename = "ipMasqBackend", default)]
    pub ip_masq_backend: Option<String>,
    /// MTU of the bridge (on creation) and the veth pair; 0 or absent for the kernel default.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Hairpin mode on the host end (a pod can reach itself through a service/hostPort).
    #[serde(rename = "hairpinMode", default)]
    pub hairpin_mode: bool,
    /// Promiscuous mode on the bridge.
    #[serde(rename = "promiscMode", default)]
    pub promisc_mode: bool,
    /// VLAN id of the port (turns on VLAN filtering on the bridge).
    #[serde(default)]
    pub vlan: Option<i64>,
    /// Drop frames from the pod whose source MAC is not the pod's (nftables).
    #[serde(default)]
    pub macspoofchk: bool,
    /// The IPAM section.
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    /// Capability arguments (`mac`).
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<serde_json::Map<String, Value>>,
    /// Runtime args (`args.cni.mac`).
    #[serde(default)]
    pub args: Option<Value>,
}

fn default_bridge() -> String {
    "cni0".to_string()
}

/// The configuration validated and resolved.
#[derive(Debug, Clone)]
struct Conf {
    raw: BridgeConf,
    backend: Backend,
    mtu: Option<u32>,
    vlan: Option<u16>,
    is_gateway: bool,
    mac: Option<[u8; 6]>,
    ipam_type: Option<String>,
}

fn load(req: &Request) -> Result<Conf, CniError> {
    let raw: BridgeConf = req.parse_config()?;
    crate::plugin::validate_ifname(&raw.bridge)
        .map_err(|_| CniError::invalid_config(format!("invalid bridge name {:?}", raw.bridge)))?;
    let backend = match raw.ip_masq_backend.as_deref() {
        None | Some("") => Backend::Iptables,
        Some(s) => Backend::parse(s).ok_or_else(|| {
            CniError::invalid_config(format!(
                "invalid ipMasqBackend {s:?} (expected iptables or nftables)"
            ))
        })?,
    };
    let vlan = match raw.vlan {
        None | Some(0) => None,
        Some(v) if (1..=4094).contains(&v) => u16::try_from(v).ok(),
        Some(v) => return Err(CniError::invalid_config(format!("invalid VLAN ID {v}"))),
    };
    let mtu = match raw.mtu {
        None | Some(0) => None,
        Some(m) if (68..=65535).contains(&m) => Some(m),
        Some(m) => return Err(CniError::invalid_config(format!("invalid MTU {m}"))),
    };
    let mac_str = raw
        .runtime_config
        .as_ref()
        .and_then(|r| r.get("mac"))
        .and_then(Value::as_str)
        .or_else(|| {
            raw.args
                .as_ref()
                .and_then(|a| a.get("cni"))
                .and_then(|c| c.get("mac"))
                .and_then(Value::as_str)
        })
        .or_else(|| req.arg("MAC"));
    let mac = match mac_str {
        None => None,
        Some(s) => Some(
            link::parse_mac(s)
                .ok_or_else(|| CniError::invalid_config(format!("invalid MAC address {s:?}")))?,
        ),
    };
    let ipam_type = match &raw.ipam {
        Some(i) if !i.ipam_type.is_empty() => Some(i.ipam_type.clone()),
        _ => None,
    };
    Ok(Conf {
        is_gateway: raw.is_gateway || raw.is_default_gateway,
        backend,
        mtu,
        vlan,
        mac,
        ipam_type,
        raw,
    })
}

/// Our own host-local, when it is what `ipam.type` names (and `CNI_PATH` has it, so a
/// misconfiguration fails as it would otherwise), runs in-process: it is built from the same
/// crate and sees the same configuration and environment a delegated run would, and this saves
/// an exec on every ADD and DEL. Any other IPAM plugin is executed as the spec describes.
fn in_process_ipam(req: &Request, ipam_type: &str) -> bool {
    ipam_type == "deckhand-host-local"
        && crate::plugin::find_plugin(ipam_type, &req.cni_path).is_some()
}

fn ipam_del(req: &Request, ipam_type: &str) -> Result<(), CniError> {
    if in_process_ipam(req, ipam_type) {
        return crate::hostlocal::HostLocal.del(req);
    }
    req.delegate_del(ipam_type)
}

fn to_addr(n: &IpNet) -> Addr {
    Addr {
        ip: n.addr(),
        prefix: n.prefix_len(),
    }
}

fn default_net(v6: bool) -> IpNet {
    let s = if v6 { "::/0" } else { "0.0.0.0/0" };
    // Both literals are valid networks.
    s.parse().unwrap_or(IpNet::V4(ipnet::Ipv4Net::default()))
}

/// Computes the gateways (when `isGateway`) into the result and adds the default routes (when
/// `isDefaultGateway`). Returns the bridge addresses to ensure.
fn apply_gateways(conf: &Conf, res: &mut CniResult) -> Result<Vec<Addr>, CniError> {
    let mut bridge_addrs = Vec::new();
    if !conf.is_gateway {
        return Ok(bridge_addrs);
    }
    let mut default_gws: Vec<IpAddr> = Vec::new();
    for ipc in &mut res.ips {
        let net = ipc.address.trunc();
        let gw = match ipc.gateway {
            Some(g) => g,
            None => {
                let g = crate::ipam::next_ip(net.network()).ok_or_else(|| {
                    CniError::invalid_config(format!("no gateway in {}", ipc.address))
                })?;
                ipc.gateway = Some(g);
                g
            }
        };
        if gw == ipc.address.addr() {
            return Err(CniError::invalid_config(format!(
                "gateway {gw} is the container's own address"
            )));
        }
        let a = Addr {
            ip: gw,
            prefix: ipc.address.prefix_len(),
        };
        if !bridge_addrs.contains(&a) {
            bridge_addrs.push(a);
        }
        if conf.raw.is_default_gateway && !default_gws.iter().any(|g| g.is_ipv6() == gw.is_ipv6()) {
            default_gws.push(gw);
        }
    }
    for gw in default_gws {
        let dflt = default_net(gw.is_ipv6());
        let mut present = false;
        for r in &res.routes {
            if r.dst == dflt {
                if r.gw.is_some_and(|g| g != gw) {
                    return Err(CniError::invalid_config(format!(
                        "isDefaultGateway ineffective because IPAM sets default route via {:?}",
                        r.gw
                    )));
                }
                present = true;
            }
        }
        if !present {
            res.routes.push(Route::new(dflt, Some(gw)));
        }
    }
    Ok(bridge_addrs)
}

struct Attached {
    host: Link,
    /// The container end's MAC (we choose it).
    peer_mac: [u8; 6],
    /// Whether this ADD created the bridge.
    bridge_created: bool,
}

/// The IPAM ADD. Our own host-local runs in-process when its result is needed (after the veth
/// pair exists, as in the reference's order: a taken `CNI_IFNAME` fails before anything is
/// leased); it takes a fraction of a millisecond, less than starting and waking a thread. An
/// executed plugin runs on a thread from the start, beside the netlink work.
struct IpamRun<'a> {
    in_process: Option<&'a Request>,
    running: Option<std::thread::ScopedJoinHandle<'a, Result<CniResult, CniError>>>,
    /// Whether IPAM leased addresses (which a failed ADD must release).
    leased: bool,
}

impl IpamRun<'_> {
    /// The IPAM result (`None` without IPAM, or once taken).
    fn join(&mut self) -> Result<Option<CniResult>, CniError> {
        let r = if let Some(req) = self.in_process.take() {
            crate::hostlocal::HostLocal.add(req)?
        } else if let Some(h) = self.running.take() {
            h.join().map_err(|_| internal("IPAM thread panicked"))??
        } else {
            return Ok(None);
        };
        self.leased = true;
        Ok(Some(r))
    }

    /// After a failed ADD: waits for a plugin still running (an in-process one that has not run
    /// does not run now); whether addresses were leased and must be released.
    fn settle(&mut self) -> bool {
        self.in_process = None;
        let _ = self.join();
        self.leased
    }
}

/// Creates the veth pair with a fresh host name (retrying on a host name clash). A taken
/// `CNI_IFNAME` in the container is found out here, from the kernel's refusal, rather than by
/// asking first.
fn create_veth(
    host: &Netlink,
    cont: &Netlink,
    ns: &NetNs,
    ifname: &str,
    conf: &Conf,
    br: &Link,
) -> Result<Attached, CniError> {
    let mac = conf.mac.unwrap_or_else(link::random_mac);
    let mut last = None;
    for _ in 0..8 {
        let spec = VethSpec {
            host_name: link::random_veth_name(),
            peer_name: ifname.to_string(),
            peer_netns_fd: ns.raw_fd(),
            mtu: conf.mtu,
            peer_mac: Some(mac),
            master: Some(br.index),
        };
        match link::create_veth(host, &spec) {
            Ok(l) => {
                return Ok(Attached {
                    host: l,
                    peer_mac: mac,
                    bridge_created: false,
                });
            }
            Err(LinkError::Exists(n)) => {
                if link::link_by_name(cont, ifname).cni()?.is_some() {
                    return Err(internal(format!(
                        "container veth name provided ({ifname}) already exists"
                    )));
                }
                last = Some(n);
            }
            Err(e) => return Err(internal(e)),
        }
    }
    Err(internal(format!(
        "could not find a free host veth name (last tried {})",
        last.unwrap_or_default()
    )))
}

/// The bridge plugin.
#[derive(Debug, Default)]
pub struct BridgePlugin;

impl BridgePlugin {
    fn add_links(
        &self,
        req: &Request,
        conf: &Conf,
        ns: &NetNs,
        ipam: &mut IpamRun<'_>,
    ) -> Result<CniResult, CniError> {
        let host = crate::netns::host_netlink().map_err(internal)?;
        let cont = ns.netlink().map_err(netns_error)?;
        let (br, br_created) = link::ensure_bridge(
            &host,
            &BridgeSpec {
                name: conf.raw.bridge.clone(),
                mtu: conf.mtu,
                promisc: conf.raw.promisc_mode,
                vlan_filtering: conf.vlan.is_some(),
            },
        )
        .cni()?;
        let mut att = create_veth(&host, &cont, ns, &req.ifname, conf, &br)?;
        att.bridge_created = br_created;
        let r = self.finish_add(req, conf, ns, &host, &cont, &br, &att, ipam);
        if r.is_err() {
            // Undo what this ADD did on the host (the bridge and its addresses stay, as they
            // may serve other attachments).
            let _ = link::del_link(&host, att.host.index);
            let owner = Owner::new(&conf.raw.name, &req.container_id);
            if conf.raw.ip_masq {
                let _ = firewall::masq_del(conf.backend, &owner, Families::ALL);
            }
            if conf.raw.macspoofchk {
                let _ = firewall::macspoof_del(&owner);
            }
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_add(
        &self,
        req: &Request,
        conf: &Conf,
        ns: &NetNs,
        host: &Netlink,
        cont: &Netlink,
        br: &Link,
        att: &Attached,
        ipam: &mut IpamRun<'_>,
    ) -> Result<CniResult, CniError> {
        let mut port = Vec::new();
        if conf.raw.hairpin_mode {
            port.push(link::hairpin_op(att.host.index, true));
        }
        if let Some(vid) = conf.vlan {
            port.push(link::port_vlan_op(att.host.index, vid));
        }
        link::run(host, port).cni()?;
        // The host end's IFLA_LINK is the container end's index in its namespace, and we chose
        // its MAC: no need to ask.
        let c = match att.host.peer_index {
            Some(index) => Link {
                index,
                name: req.ifname.clone(),
                mac: att.peer_mac.to_vec(),
                ..Default::default()
            },
            None => link::link_by_name(cont, &req.ifname)
                .cni()?
                .ok_or_else(|| internal(format!("{} vanished from the container", req.ifname)))?,
        };

        let mut res = ipam.join()?.unwrap_or_default();
        let bridge_addrs = apply_gateways(conf, &mut res)?;

        res.interfaces = vec![
            Interface {
                name: br.name.clone(),
                mac: br.mac_string(),
                ..Default::default()
            },
            Interface {
                name: att.host.name.clone(),
                mac: att.host.mac_string(),
                ..Default::default()
            },
            Interface {
                name: req.ifname.clone(),
                mac: c.mac_string(),
                mtu: conf.mtu,
                sandbox: ns.path().display().to_string(),
                ..Default::default()
            },
        ];
        for ipc in &mut res.ips {
            ipc.interface = Some(2);
        }

        // Inside the container, in one batch: up, addresses, then routes (their gateways are
        // on-link by then).
        if res.ips.iter().any(|i| i.address.addr().is_ipv6()) {
            let ifname = req.ifname.clone();
            ns.enter_briefly(|| link::disable_dad(&ifname))
                .map_err(netns_error)?;
        }
        let mut ops = vec![link::set_up_op(c.index)];
        for ipc in &res.ips {
            ops.push(link::add_address_op(c.index, to_addr(&ipc.address)));
        }
        for r in &res.routes {
            let gw = r.gw.or_else(|| {
                res.ips
                    .iter()
                    .find(|i| i.address.addr().is_ipv6() == r.dst.addr().is_ipv6())
                    .and_then(|i| i.gateway)
            });
            ops.push(link::add_route_op(&link::Route {
                dst: to_addr(&r.dst.trunc()),
                gw,
                oif: Some(c.index),
            }));
        }
        link::run(cont, ops).cni()?;

        // On the host: gateway addresses, forwarding, masquerading.
        if conf.is_gateway {
            for a in &bridge_addrs {
                link::ensure_gateway_address(host, br, *a, conf.raw.force_address).cni()?;
            }
            let v4 = bridge_addrs.iter().any(|a| a.ip.is_ipv4());
            let v6 = bridge_addrs.iter().any(|a| a.ip.is_ipv6());
            link::enable_forwarding(v4, v6).cni()?;
        }
        if conf.raw.ip_masq && !res.ips.is_empty() {
            let addrs: Vec<MasqAddr> = res
                .ips
                .iter()
                .map(|i| MasqAddr {
                    ip: i.address.addr(),
                    prefix: i.address.prefix_len(),
                })
                .collect();
            firewall::masq_add(
                conf.backend,
                &Owner::new(&conf.raw.name, &req.container_id),
                &addrs,
            )
            .cni()?;
        }
        if conf.raw.macspoofchk {
            firewall::macspoof_add(
                &Owner::new(&conf.raw.name, &req.container_id),
                &att.host.name,
                &c.mac_string(),
            )
            .cni()?;
        }
        // A bridge without an explicit MAC takes its lowest port's, so adding a port may have
        // changed it: report it as it is now. (Bridges we create get a fixed MAC.)
        if !att.bridge_created
            && let Some(b) = link::link_by_index(host, br.index).cni()?
        {
            res.interfaces[0].mac = b.mac_string();
        }
        Ok(res)
    }

    fn check_links(&self, req: &Request, conf: &Conf, prev: &CniResult) -> Result<(), CniError> {
        let path = req
            .netns
            .as_ref()
            .ok_or_else(|| CniError::invalid_env("CNI_NETNS is required"))?;
        let ns = NetNs::open(path).map_err(netns_error)?;
        let host = crate::netns::host_netlink().map_err(internal)?;
        let cont = ns.netlink().map_err(netns_error)?;

        let br = link::link_by_name(&host, &conf.raw.bridge)
            .cni()?
            .ok_or_else(|| internal(format!("bridge {} not found", conf.raw.bridge)))?;
        let c = link::link_by_name(&cont, &req.ifname)
            .cni()?
            .ok_or_else(|| internal(format!("container interface {} not found", req.ifname)))?;
        let want = prev
            .interfaces
            .iter()
            .position(|i| i.name == req.ifname && !i.sandbox.is_empty())
            .ok_or_else(|| {
                internal(format!(
                    "prevResult has no container interface {}",
                    req.ifname
                ))
            })?;
        let wi = &prev.interfaces[want];
        if !wi.mac.is_empty() && !wi.mac.eq_ignore_ascii_case(&c.mac_string()) {
            return Err(internal(format!(
                "interface {} has MAC {}, expected {}",
                req.ifname,
                c.mac_string(),
                wi.mac
            )));
        }
        let peer = c
            .peer_index
            .ok_or_else(|| internal(format!("{} is not a veth", req.ifname)))?;
        let hv = link::link_by_index(&host, peer)
            .cni()?
            .ok_or_else(|| internal(format!("host end of {} not found", req.ifname)))?;
        if hv.master != Some(br.index) {
            return Err(internal(format!(
                "{} is not attached to bridge {}",
                hv.name, br.name
            )));
        }
        if let Some(hi) = prev
            .interfaces
            .iter()
            .find(|i| i.sandbox.is_empty() && i.name.starts_with("veth"))
            && hi.name != hv.name
        {
            return Err(internal(format!(
                "host veth is {}, expected {}",
                hv.name, hi.name
            )));
        }
        let addrs = link::addresses(&cont, c.index).cni()?;
        for ipc in &prev.ips {
            if ipc.interface.is_some_and(|i| i != want) {
                continue;
            }
            let a = to_addr(&ipc.address);
            if !addrs.contains(&a) {
                return Err(internal(format!("address {a} not found on {}", req.ifname)));
            }
        }
        for v6 in [false, true] {
            let wanted: Vec<&Route> = prev
                .routes
                .iter()
                .filter(|r| r.dst.addr().is_ipv6() == v6)
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let have = link::routes(&cont, v6).cni()?;
            for r in wanted {
                let dst = to_addr(&r.dst.trunc());
                if !have
                    .iter()
                    .any(|h| h.dst == dst && (r.gw.is_none() || h.gw == r.gw))
                {
                    return Err(internal(format!(
                        "route {} not found in the container",
                        r.dst
                    )));
                }
            }
        }
        if conf.raw.macspoofchk {
            firewall::macspoof_check(&Owner::new(&conf.raw.name, &req.container_id)).cni()?;
        }
        if conf.raw.ip_masq {
            let addrs: Vec<MasqAddr> = prev
                .ips
                .iter()
                .map(|i| MasqAddr {
                    ip: i.address.addr(),
                    prefix: i.address.prefix_len(),
                })
                .collect();
            firewall::masq_check(
                conf.backend,
                &Owner::new(&conf.raw.name, &req.container_id),
                &addrs,
            )
            .cni()?;
        }
        Ok(())
    }
}

impl Plugin for BridgePlugin {
    fn about(&self) -> String {
        "deckhand-bridge: Linux bridge + veth (Deckhand)".to_string()
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let conf = load(req)?;
        let path = req
            .netns
            .as_ref()
            .ok_or_else(|| CniError::invalid_env("CNI_NETNS is required"))?;
        let ns = NetNs::open(path).map_err(netns_error)?;
        std::thread::scope(|s| {
            let mut ipam = IpamRun {
                in_process: None,
                running: None,
                leased: false,
            };
            match conf.ipam_type.as_deref() {
                Some(t) if in_process_ipam(req, t) => ipam.in_process = Some(req),
                Some(t) => ipam.running = Some(s.spawn(move || req.delegate_add(t))),
                None => {}
            }
            let res = self.add_links(req, &conf, &ns, &mut ipam);
            // Release what IPAM leased (nothing when it failed itself: e.g. a duplicate ADD must
            // keep the first lease).
            if res.is_err()
                && let Some(t) = &conf.ipam_type
                && ipam.settle()
            {
                let _ = ipam_del(req, t);
            }
            res
        })
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        // The socket in the container namespace first: deleting the interface (which takes the
        // host end with it) is what takes long (the kernel waits for RCU grace periods), so it
        // starts as early as it can, and IPAM and the firewall are released meanwhile.
        let cont = match &req.netns {
            None => Ok(None),
            Some(path) => match NetNs::open(path) {
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(netns_error(e)),
                Ok(ns) => ns.netlink().map(Some).map_err(netns_error),
            },
        };
        std::thread::scope(|s| {
            let ipam = conf
                .ipam_type
                .as_ref()
                .map(|t| s.spawn(move || ipam_del(req, t)));
            let fw = (conf.raw.ip_masq || conf.raw.macspoofchk).then(|| {
                s.spawn(|| {
                    let owner = Owner::new(&conf.raw.name, &req.container_id);
                    if conf.raw.macspoofchk {
                        firewall::macspoof_del(&owner).cni()?;
                    }
                    if conf.raw.ip_masq {
                        // The previous result (when the runtime passes it) says which families
                        // have rules; without it, look at both.
                        let fam = req
                            .prev_result()
                            .ok()
                            .flatten()
                            .map(|r| Families::of(r.ips.iter().map(|i| i.address.addr())))
                            .unwrap_or(Families::ALL);
                        firewall::masq_del(conf.backend, &owner, fam).cni()?;
                    }
                    Ok(())
                })
            });
            // One RTM_DELLINK by name; a missing interface is success.
            let link_res = cont.and_then(|c| match c {
                None => Ok(()),
                Some(nl) => link::del_link_by_name(&nl, &req.ifname).map(drop).cni(),
            });
            let join = |h: Option<std::thread::ScopedJoinHandle<'_, Result<(), CniError>>>| match h
            {
                None => Ok(()),
                Some(h) => h.join().map_err(|_| internal("worker thread panicked"))?,
            };
            let ipam_res = join(ipam);
            let fw_res = join(fw);
            ipam_res?;
            link_res?;
            fw_res
        })
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        let prev = req
            .prev_result()?
            .ok_or_else(|| CniError::invalid_config("CHECK: required prevResult missing"))?;
        if let Some(t) = &conf.ipam_type {
            req.delegate_check(t)?;
        }
        self.check_links(req, &conf, &prev)
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        if conf.raw.ip_masq || conf.raw.macspoofchk {
            let keep: Vec<String> = req
                .valid_attachments()?
                .into_iter()
                .map(|a| a.container_id)
                .collect();
            firewall::gc(conf.backend, &conf.raw.name, &keep).cni()?;
        }
        if let Some(t) = &conf.ipam_type {
            req.delegate_gc(t)?;
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        let conf = load(req)?;
        if let Some(t) = &conf.ipam_type {
            req.delegate_status(t)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> Conf {
        let raw: BridgeConf = serde_json::from_str(json).expect("conf");
        Conf {
            is_gateway: raw.is_gateway || raw.is_default_gateway,
            backend: Backend::Iptables,
            mtu: None,
            vlan: None,
            mac: None,
            ipam_type: None,
            raw,
        }
    }

    #[test]
    fn gateways_and_default_routes() {
        let c = conf(r#"{"name":"n","isDefaultGateway":true}"#);
        let mut res = CniResult {
            ips: vec![
                crate::types::IpConfig {
                    interface: None,
                    address: "10.9.0.5/24".parse().expect("net"),
                    gateway: None,
                },
                crate::types::IpConfig {
                    interface: None,
                    address: "fd00:9::5/64".parse().expect("net"),
                    gateway: Some("fd00:9::1".parse().expect("ip")),
                },
            ],
            ..Default::default()
        };
        let addrs = apply_gateways(&c, &mut res).expect("gw");
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[0].to_string(), "10.9.0.1/24");
        assert_eq!(res.ips[0].gateway, Some("10.9.0.1".parse().expect("ip")));
        assert_eq!(res.routes.len(), 2);
        assert_eq!(res.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(res.routes[1].dst.to_string(), "::/0");
    }

    #[test]
    fn random_macs_are_local_unicast() {
        let m = link::random_mac();
        assert_eq!(m[0] & 0x01, 0);
        assert_eq!(m[0] & 0x02, 0x02);
    }
}
