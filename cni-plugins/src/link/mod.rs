//! Links, addresses and routes through rtnetlink (never the `ip` command).
//!
//! Every function takes an [`rtnetlink::Handle`]; a handle made by
//! [`crate::netns::NetNs::netlink`] acts inside that namespace, one made by
//! [`crate::netns::host_netlink`] in the caller's. The veth pair is created with one request from
//! the host side: the host end gets its name, MTU, bridge and `up` flag, the peer is created
//! directly inside the container namespace (`IFLA_NET_NS_FD` in the peer message) under its final
//! name, so nothing is ever moved or renamed afterwards.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags,
    LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkBridgeVlan, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

/// Errors from link operations.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The netlink error.
        source: rtnetlink::Error,
    },
    /// A link exists with the name but the wrong kind.
    #[error("link {name} already exists and is not a {kind}")]
    WrongKind {
        /// The link name.
        name: String,
        /// The expected kind.
        kind: &'static str,
    },
    /// The bridge has a different address of the same family and forceAddress is off.
    #[error("{name} already has an IP address different from {want}")]
    AddressConflict {
        /// The bridge name.
        name: String,
        /// The wanted address/prefix.
        want: String,
    },
    /// A link was not found.
    #[error("link {0} not found")]
    NotFound(String),
    /// A link name already exists.
    #[error("link {0} already exists")]
    Exists(String),
    /// A sysctl write or other I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, LinkError>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// The positive errno of a netlink error, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

const ENOENT: i32 = 2;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const ESRCH: i32 = 3;

/// What we read back about a link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address.
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: u32,
    /// `IFF_UP` is set.
    pub up: bool,
    /// `IFF_PROMISC` is set.
    pub promisc: bool,
    /// Index of the bridge (master) it is attached to.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND` (e.g. "bridge", "veth").
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// Bridge `vlan_filtering`, when this is a bridge that reports it.
    pub vlan_filtering: Option<bool>,
}

impl Link {
    fn from_msg(m: LinkMessage) -> Self {
        let mut l = Link {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            promisc: m.header.flags.contains(LinkFlags::Promisc),
            ..Default::default()
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::Address(a) => l.mac = a,
                LinkAttribute::Mtu(v) => l.mtu = v,
                LinkAttribute::Controller(v) => l.master = Some(v),
                LinkAttribute::Link(v) => l.peer_index = Some(v),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            NlLinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                            NlLinkInfo::Data(InfoData::Bridge(bs)) => {
                                for b in bs {
                                    if let InfoBridge::VlanFiltering(v) = b {
                                        l.vlan_filtering = Some(v);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// Formats a hardware address as lower-case colon-separated hex.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or `-` separated).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

/// Looks a link up by name; `None` when it does not exist.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>> {
    let mut s = h.link().get().match_name(name).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(Link::from_msg(m))),
        Ok(None) => Ok(None),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

/// Looks a link up by index; `None` when it does not exist.
pub async fn link_by_index(h: &Handle, index: u32) -> Result<Option<Link>> {
    let mut s = h.link().get().match_index(index).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(Link::from_msg(m))),
        Ok(None) => Ok(None),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
        Err(e) => Err(nl(format!("get link {index}"))(e)),
    }
}

/// What a bridge must look like.
#[derive(Debug, Clone)]
pub struct BridgeSpec {
    /// Bridge name.
    pub name: String,
    /// MTU on creation (an existing bridge keeps its MTU, as the reference does).
    pub mtu: Option<u32>,
    /// Put the bridge in promiscuous mode.
    pub promisc: bool,
    /// Turn on VLAN filtering (when a `vlan` is configured).
    pub vlan_filtering: bool,
}

/// Creates the bridge or reuses an existing one, and makes sure it is up (and promiscuous and
/// VLAN-filtering when asked). Fails when a non-bridge link has the name. Returns the bridge and
/// whether this call created it (then with a fixed random MAC).
pub async fn ensure_bridge(h: &Handle, spec: &BridgeSpec) -> Result<(Link, bool)> {
    let mut created = false;
    let br = match link_by_name(h, &spec.name).await? {
        Some(l) => l,
        None => {
            // An explicit MAC keeps the bridge's address stable when ports come and go.
            let mut b = LinkBridge::new(&spec.name)
                .up()
                .address(random_mac().to_vec());
            if let Some(mtu) = spec.mtu {
                b = b.mtu(mtu);
            }
            if spec.promisc {
                b = b.promiscuous(true);
            }
            if spec.vlan_filtering {
                b = b.append_info_data(InfoBridge::VlanFiltering(true));
            }
            match h.link().add(b.build()).execute().await {
                Ok(()) => created = true,
                Err(e) if errno(&e) == Some(EEXIST) => {}
                Err(e) => return Err(nl(format!("create bridge {}", spec.name))(e)),
            }
            link_by_name(h, &spec.name)
                .await?
                .ok_or_else(|| LinkError::NotFound(spec.name.clone()))?
        }
    };
    if br.kind.as_deref() != Some("bridge") {
        return Err(LinkError::WrongKind {
            name: spec.name.clone(),
            kind: "bridge",
        });
    }
    if created {
        return Ok((br, true));
    }
    let need_flags = !br.up || (spec.promisc && !br.promisc);
    let need_vlan = spec.vlan_filtering && br.vlan_filtering != Some(true);
    if need_vlan {
        let msg = LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
            .index(br.index)
            .append_info_data(InfoBridge::VlanFiltering(true))
            .build();
        h.link()
            .change(msg)
            .execute()
            .await
            .map_err(nl(format!("set vlan_filtering on {}", spec.name)))?;
    }
    if need_flags {
        let mut b = LinkUnspec::new_with_index(br.index).up();
        if spec.promisc {
            b = b.promiscuous(true);
        }
        h.link()
            .set(b.build())
            .execute()
            .await
            .map_err(nl(format!("set {} up", spec.name)))?;
    }
    if need_flags || need_vlan {
        return link_by_index(h, br.index)
            .await?
            .map(|l| (l, false))
            .ok_or_else(|| LinkError::NotFound(spec.name.clone()));
    }
    Ok((br, false))
}

/// An address with its prefix length, as read from or written to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr {
    /// The address.
    pub ip: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl Addr {
    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        mask(self.ip, self.prefix)
    }

    /// True when `ip` lies in this address's subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.ip.is_ipv4() && mask(ip, self.prefix) == self.network()
    }
}

/// Clears the host bits of `ip` beyond `prefix`.
pub fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v) => {
            let bits = u32::from(v);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v) => {
            let bits = u128::from(v);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// The addresses on a link (IPv6 link-local addresses excluded).
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<Addr>> {
    let mut s = h.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(nl(format!("list addresses of link {index}")))?
    {
        if m.header.index != index {
            continue;
        }
        if let Some(a) = addr_of(&m)
            && !is_link_local(a.ip)
        {
            out.push(a);
        }
    }
    Ok(out)
}

fn addr_of(m: &AddressMessage) -> Option<Addr> {
    let mut local = None;
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    local.or(address).map(|ip| Addr {
        ip,
        prefix: m.header.prefix_len,
    })
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v) => (v.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

/// Adds an address; IPv6 addresses are added without duplicate address detection.
/// An address that is already there is not an error.
pub async fn add_address(h: &Handle, index: u32, a: Addr) -> Result<()> {
    let mut req = h.address().add(index, a.ip, a.prefix);
    if a.ip.is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        Err(e) => Err(nl(format!("add address {a} to link {index}"))(e)),
    }
}

/// Deletes an address from a link; a missing address is not an error.
pub async fn del_address(h: &Handle, index: u32, a: Addr) -> Result<()> {
    let mut msg = AddressMessage::default();
    msg.header.family = family(a.ip);
    msg.header.prefix_len = a.prefix;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(a.ip));
    if a.ip.is_ipv6() {
        msg.attributes.pop();
        msg.attributes.push(AddressAttribute::Address(a.ip));
    }
    match h.address().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL) | Some(ENODEV)) => Ok(()),
        Err(e) => Err(nl(format!("delete address {a} from link {index}"))(e)),
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Makes sure `want` is on the bridge, with the reference's rules: an identical address is kept;
/// an IPv4 address of a different value, or an IPv6 address whose subnet overlaps, is a conflict
/// that `force` resolves by removing the old address and otherwise is an error.
pub async fn ensure_gateway_address(
    h: &Handle,
    bridge: &Link,
    want: Addr,
    force: bool,
) -> Result<()> {
    let existing = addresses(h, bridge.index).await?;
    for a in existing {
        if a.ip.is_ipv4() != want.ip.is_ipv4() {
            continue;
        }
        if a == want {
            return Ok(());
        }
        if want.ip.is_ipv6() && !(a.contains(want.ip) || want.contains(a.ip)) {
            // Several IPv6 addresses on the bridge are fine when their subnets do not overlap.
            continue;
        }
        if !force {
            return Err(LinkError::AddressConflict {
                name: bridge.name.clone(),
                want: want.to_string(),
            });
        }
        del_address(h, bridge.index, a).await?;
    }
    add_address(h, bridge.index, want).await
}

/// A veth pair to create.
#[derive(Debug, Clone)]
pub struct VethSpec {
    /// Host-side name.
    pub host_name: String,
    /// Container-side name (CNI_IFNAME).
    pub peer_name: String,
    /// The container namespace's file descriptor.
    pub peer_netns_fd: RawFd,
    /// MTU of both ends.
    pub mtu: Option<u32>,
    /// MAC of the container end.
    pub peer_mac: Option<[u8; 6]>,
    /// Bridge to attach the host end to.
    pub master: Option<u32>,
}

/// A host-side veth name like the reference's: `veth` + 8 random hex digits.
pub fn random_veth_name() -> String {
    let mut b = [0u8; 4];
    if !fill_random(&mut b) {
        // Fall back to time and pid; collisions are retried by the caller anyway.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        b = (t ^ std::process::id().rotate_left(16)).to_be_bytes();
    }
    format!("veth{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// A random locally administered unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    if !fill_random(&mut m) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        m.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

fn fill_random(buf: &mut [u8]) -> bool {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .is_ok()
}

/// Creates the veth pair in one request: the host end up, with its MTU and attached to the
/// bridge; the peer directly in the container namespace under its final name (down: the kernel
/// refuses to open a peer in another namespace during creation).
/// Returns the host end. `Exists` when the host name is taken (the caller retries with another).
pub async fn create_veth(h: &Handle, spec: &VethSpec) -> Result<Link> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(spec.peer_name.clone())
        .setns_by_fd(spec.peer_netns_fd);
    if let Some(mtu) = spec.mtu {
        peer = peer.mtu(mtu);
    }
    if let Some(mac) = spec.peer_mac {
        peer = peer.address(mac.to_vec());
    }
    let mut b = LinkVeth::new(&spec.host_name, &spec.peer_name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .up();
    if let Some(mtu) = spec.mtu {
        b = b.mtu(mtu);
    }
    if let Some(m) = spec.master {
        b = b.controller(m);
    }
    match h.link().add(b.build()).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => {
            return Err(LinkError::Exists(spec.host_name.clone()));
        }
        Err(e) => {
            return Err(nl(format!(
                "create veth {} (peer {})",
                spec.host_name, spec.peer_name
            ))(e));
        }
    }
    link_by_name(h, &spec.host_name)
        .await?
        .ok_or_else(|| LinkError::NotFound(spec.host_name.clone()))
}

/// Sets hairpin mode on a bridge port.
pub async fn set_hairpin(h: &Handle, index: u32, on: bool) -> Result<()> {
    h.link()
        .set_port(LinkBridgePort::new(index).hairpin(on).build())
        .execute()
        .await
        .map_err(nl(format!("set hairpin on link {index}")))
}

/// Makes `vid` the untagged PVID of a bridge port (`bridge vlan add vid V pvid untagged`).
pub async fn set_port_vlan(h: &Handle, index: u32, vid: u16) -> Result<()> {
    let msg = LinkBridgeVlan::new(index)
        .vlan(
            vid,
            BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
        )
        .build();
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(nl(format!("set vlan {vid} on link {index}")))
}

/// Brings a link up.
pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set link {index} up")))
}

/// Deletes a link by index; a missing link is not an error.
pub async fn del_link(h: &Handle, index: u32) -> Result<()> {
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(()),
        Err(e) => Err(nl(format!("delete link {index}"))(e)),
    }
}

/// Deletes a link by name. Returns whether it existed.
pub async fn del_link_by_name(h: &Handle, name: &str) -> Result<bool> {
    match link_by_name(h, name).await? {
        Some(l) => {
            del_link(h, l.index).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// A route as read back or to be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dst: Addr,
    /// Gateway, if any.
    pub gw: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
}

/// Adds a route (replacing an identical destination's route); a gateway-less route is scoped
/// to the link.
pub async fn add_route(h: &Handle, r: &Route) -> Result<()> {
    let msg: RouteMessage = match (r.dst.ip, r.gw) {
        (IpAddr::V4(d), gw) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d, r.dst.prefix);
            if let Some(IpAddr::V4(g)) = gw {
                b = b.gateway(g);
            } else {
                b = b.scope(RouteScope::Link);
            }
            if let Some(o) = r.oif {
                b = b.output_interface(o);
            }
            b.build()
        }
        (IpAddr::V6(d), gw) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d, r.dst.prefix);
            if let Some(IpAddr::V6(g)) = gw {
                b = b.gateway(g);
            }
            if let Some(o) = r.oif {
                b = b.output_interface(o);
            }
            b.build()
        }
    };
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("add route {}", r.dst)))
}

/// The main-table routes of one family (`v6` selects IPv6).
pub async fn routes(h: &Handle, v6: bool) -> Result<Vec<Route>> {
    let msg = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let mut s = h.route().get(msg).execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.map_err(nl("list routes"))? {
        if m.header.table != 254 {
            continue;
        }
        let mut dst = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let mut gw = None;
        let mut oif = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(v)) => dst = IpAddr::V4(*v),
                RouteAttribute::Destination(RouteAddress::Inet6(v)) => dst = IpAddr::V6(*v),
                RouteAttribute::Gateway(RouteAddress::Inet(v)) => gw = Some(IpAddr::V4(*v)),
                RouteAttribute::Gateway(RouteAddress::Inet6(v)) => gw = Some(IpAddr::V6(*v)),
                RouteAttribute::Oif(o) => oif = Some(*o),
                _ => {}
            }
        }
        out.push(Route {
            dst: Addr {
                ip: dst,
                prefix: m.header.destination_prefix_length,
            },
            gw,
            oif,
        });
    }
    Ok(out)
}

/// True when the error means "no such process/namespace" (the netns vanished under us).
pub fn is_gone(e: &LinkError) -> bool {
    match e {
        LinkError::Netlink { source, .. } => {
            matches!(errno(source), Some(ENODEV) | Some(ENOENT) | Some(ESRCH))
        }
        LinkError::NotFound(_) => true,
        _ => false,
    }
}

/// Enables forwarding for the given families in the calling thread's namespace.
pub fn enable_forwarding(v4: bool, v6: bool) -> Result<()> {
    if v4 {
        crate::netns::write_sysctl("net/ipv4/ip_forward", "1").map_err(|source| LinkError::Io {
            what: "enable net.ipv4.ip_forward".into(),
            source,
        })?;
    }
    if v6 {
        crate::netns::write_sysctl("net/ipv6/conf/all/forwarding", "1").map_err(|source| {
            LinkError::Io {
                what: "enable net.ipv6.conf.all.forwarding".into(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Turns off duplicate address detection on `ifname` in the calling thread's namespace, so IPv6
/// addresses are usable at once (the reference does this when hairpin mode would echo the
/// neighbour solicitations back). Missing IPv6 support is not an error.
pub fn disable_dad(ifname: &str) {
    let _ = crate::netns::write_sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0");
    let _ = crate::netns::write_sysctl(&format!("net/ipv6/conf/{ifname}/enhanced_dad"), "0");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_roundtrip() {
        let m = parse_mac("0a:58:0A:f4:00:01").expect("mac");
        assert_eq!(format_mac(&m), "0a:58:0a:f4:00:01");
        assert!(parse_mac("0a:58").is_none());
        assert!(parse_mac("zz:58:0a:f4:00:01").is_none());
    }

    #[test]
    fn masks() {
        let a = Addr {
            ip: "10.1.2.3".parse().expect("ip"),
            prefix: 24,
        };
        assert_eq!(a.network(), "10.1.2.0".parse::<IpAddr>().expect("ip"));
        assert!(a.contains("10.1.2.200".parse().expect("ip")));
        assert!(!a.contains("10.1.3.1".parse().expect("ip")));
        let b = Addr {
            ip: "fd00:1::5".parse().expect("ip"),
            prefix: 64,
        };
        assert!(b.contains("fd00:1::ffff".parse().expect("ip")));
        assert_eq!(
            mask("1.2.3.4".parse().expect("ip"), 0),
            "0.0.0.0".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn veth_names() {
        let n = random_veth_name();
        assert_eq!(n.len(), 12);
        assert!(n.starts_with("veth"));
    }
}
