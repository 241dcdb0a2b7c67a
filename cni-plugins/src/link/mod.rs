//! Links, addresses and routes through rtnetlink (never the `ip` command).
//!
//! Every function takes a blocking [`Netlink`] socket (see [`socket`](Netlink)); one made by
//! [`crate::netns::NetNs::netlink`] acts inside that namespace, one made by [`Netlink::new`] in
//! the caller's. The `*_op` functions build requests that [`run`] sends together in one batch.
//! The veth pair is created with one request from the host side: the host end gets its name,
//! MTU, bridge and `up` flag, the peer is created directly inside the container namespace
//! (`IFLA_NET_NS_FD` in the peer message) under its final name, so nothing is ever moved or
//! renamed afterwards; the kernel echoes the new host end back (`NLM_F_ECHO`), so nothing is
//! read back either.

mod socket;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkExtentMask,
    LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkBridgeVlan, LinkMessageBuilder,
    LinkUnspec, LinkVeth, RouteMessageBuilder,
};

pub use socket::{Netlink, NlError, Reply, Request};

/// Errors from link operations.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The netlink error.
        source: NlError,
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

fn nl(what: impl Into<String>) -> impl FnOnce(NlError) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// The positive errno of a netlink error, if it is one.
pub fn errno(e: &NlError) -> Option<i32> {
    e.errno()
}

/// One request of a batch ([`run`]) with what it does (for the error) and the errnos that
/// count as success (e.g. `EEXIST` for an address that is already there).
#[derive(Debug, Clone)]
pub struct Op {
    req: Request,
    what: String,
    ok: &'static [i32],
}

impl Op {
    fn new(msg: RouteNetlinkMessage, flags: u16, what: String) -> Self {
        Op {
            req: Request::new(msg, flags),
            what,
            ok: &[],
        }
    }

    fn tolerating(mut self, ok: &'static [i32]) -> Self {
        self.ok = ok;
        self
    }
}

/// Sends `ops` in one batch; the first failure (in order) is the error.
pub fn run(h: &Netlink, ops: Vec<Op>) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let (reqs, meta): (Vec<Request>, Vec<(String, &'static [i32])>) =
        ops.into_iter().map(|o| (o.req, (o.what, o.ok))).unzip();
    let replies = h
        .batch(reqs)
        .map_err(nl(format!("netlink batch ({})", meta[0].0)))?;
    for (r, (what, ok)) in replies.into_iter().zip(meta) {
        match r {
            Ok(_) => {}
            Err(e) if errno(&e).is_some_and(|c| ok.contains(&c)) => {}
            Err(e) => return Err(nl(what)(e)),
        }
    }
    Ok(())
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

/// The link messages we read back carry no statistics (smaller replies, less to parse).
fn get_link_msg(index: u32, name: Option<&str>) -> RouteNetlinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(n) = name {
        m.attributes.push(LinkAttribute::IfName(n.to_string()));
    }
    m.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    RouteNetlinkMessage::GetLink(m)
}

fn one_link(r: Reply, what: impl FnOnce() -> String) -> Result<Option<Link>> {
    match r {
        Ok(msgs) => Ok(msgs.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
            _ => None,
        })),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
        Err(e) => Err(nl(what())(e)),
    }
}

/// Looks a link up by name; `None` when it does not exist.
pub fn link_by_name(h: &Netlink, name: &str) -> Result<Option<Link>> {
    one_link(
        h.request(Request::new(get_link_msg(0, Some(name)), 0)),
        || format!("get link {name}"),
    )
}

/// Looks a link up by index; `None` when it does not exist.
pub fn link_by_index(h: &Netlink, index: u32) -> Result<Option<Link>> {
    one_link(
        h.request(Request::new(get_link_msg(index, None), 0)),
        || format!("get link {index}"),
    )
}

fn new_link(msg: LinkMessage, flags: u16) -> Request {
    Request::new(RouteNetlinkMessage::NewLink(msg), flags)
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
pub fn ensure_bridge(h: &Netlink, spec: &BridgeSpec) -> Result<(Link, bool)> {
    let mut created = false;
    let br = match link_by_name(h, &spec.name)? {
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
            match h.request(new_link(b.build(), NLM_F_CREATE | NLM_F_EXCL)) {
                Ok(_) => created = true,
                Err(e) if errno(&e) == Some(EEXIST) => {}
                Err(e) => return Err(nl(format!("create bridge {}", spec.name))(e)),
            }
            link_by_name(h, &spec.name)?.ok_or_else(|| LinkError::NotFound(spec.name.clone()))?
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
    let mut ops = Vec::new();
    if need_vlan {
        let msg = LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
            .index(br.index)
            .append_info_data(InfoBridge::VlanFiltering(true))
            .build();
        ops.push(Op::new(
            RouteNetlinkMessage::NewLink(msg),
            0,
            format!("set vlan_filtering on {}", spec.name),
        ));
    }
    if need_flags {
        let mut b = LinkUnspec::new_with_index(br.index).up();
        if spec.promisc {
            b = b.promiscuous(true);
        }
        ops.push(Op::new(
            RouteNetlinkMessage::SetLink(b.build()),
            0,
            format!("set {} up", spec.name),
        ));
    }
    if ops.is_empty() {
        return Ok((br, false));
    }
    run(h, ops)?;
    link_by_index(h, br.index)?
        .map(|l| (l, false))
        .ok_or_else(|| LinkError::NotFound(spec.name.clone()))
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
pub fn addresses(h: &Netlink, index: u32) -> Result<Vec<Addr>> {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    let replies = h
        .request(Request::new(
            RouteNetlinkMessage::GetAddress(msg),
            NLM_F_DUMP,
        ))
        .map_err(nl(format!("list addresses of link {index}")))?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(m) if m.header.index == index => addr_of(&m),
            _ => None,
        })
        .filter(|a| !is_link_local(a.ip))
        .collect())
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

/// Adding an address (for a batch); IPv6 addresses are added without duplicate address
/// detection. An address that is already there is not an error.
pub fn add_address_op(index: u32, a: Addr) -> Op {
    let mut msg = match a.ip {
        IpAddr::V4(ip) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, a.prefix)
            .build(),
        IpAddr::V6(ip) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(ip, a.prefix)
            .build(),
    };
    if a.ip.is_ipv6() {
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    Op::new(
        RouteNetlinkMessage::NewAddress(msg),
        NLM_F_CREATE | NLM_F_EXCL,
        format!("add address {a} to link {index}"),
    )
    .tolerating(&[EEXIST])
}

/// Adds an address (see [`add_address_op`]).
pub fn add_address(h: &Netlink, index: u32, a: Addr) -> Result<()> {
    run(h, vec![add_address_op(index, a)])
}

/// Deletes an address from a link; a missing address is not an error.
pub fn del_address(h: &Netlink, index: u32, a: Addr) -> Result<()> {
    let mut msg = AddressMessage::default();
    msg.header.family = family(a.ip);
    msg.header.prefix_len = a.prefix;
    msg.header.index = index;
    if a.ip.is_ipv6() {
        msg.attributes.push(AddressAttribute::Address(a.ip));
    } else {
        msg.attributes.push(AddressAttribute::Local(a.ip));
    }
    run(
        h,
        vec![
            Op::new(
                RouteNetlinkMessage::DelAddress(msg),
                0,
                format!("delete address {a} from link {index}"),
            )
            .tolerating(&[EADDRNOTAVAIL, ENODEV]),
        ],
    )
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
pub fn ensure_gateway_address(h: &Netlink, bridge: &Link, want: Addr, force: bool) -> Result<()> {
    let existing = addresses(h, bridge.index)?;
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
        del_address(h, bridge.index, a)?;
    }
    add_address(h, bridge.index, want)
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
    // getrandom(2): no file to open; the pool is initialised long before any plugin runs.
    // SAFETY: the pointer and length describe `buf`, which is valid for writes.
    let n = unsafe { nix::libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).is_ok_and(|n| n == buf.len())
}

/// Creates the veth pair in one request: the host end up, with its MTU and attached to the
/// bridge; the peer directly in the container namespace under its final name (down: the kernel
/// refuses to open a peer in another namespace during creation).
/// Returns the host end (from the kernel's echo of the request, else read back). `Exists` when
/// a name is taken (the host name, or the peer's in the container namespace).
pub fn create_veth(h: &Netlink, spec: &VethSpec) -> Result<Link> {
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
    let echoed = match h.request(new_link(b.build(), NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO)) {
        Ok(msgs) => msgs.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
            _ => None,
        }),
        Err(e) if errno(&e) == Some(EEXIST) => {
            return Err(LinkError::Exists(spec.host_name.clone()));
        }
        Err(e) => {
            return Err(nl(format!(
                "create veth {} (peer {})",
                spec.host_name, spec.peer_name
            ))(e));
        }
    };
    // The echo is sent before the host end joins the bridge: fill that in.
    match echoed {
        Some(mut l) if l.name == spec.host_name && l.index != 0 && l.peer_index.is_some() => {
            if spec.master.is_some() {
                l.master = spec.master;
            }
            Ok(l)
        }
        _ => link_by_name(h, &spec.host_name)?
            .ok_or_else(|| LinkError::NotFound(spec.host_name.clone())),
    }
}

/// Setting hairpin mode on a bridge port (for a batch).
pub fn hairpin_op(index: u32, on: bool) -> Op {
    Op::new(
        RouteNetlinkMessage::NewLink(LinkBridgePort::new(index).hairpin(on).build()),
        0,
        format!("set hairpin on link {index}"),
    )
}

/// Sets hairpin mode on a bridge port.
pub fn set_hairpin(h: &Netlink, index: u32, on: bool) -> Result<()> {
    run(h, vec![hairpin_op(index, on)])
}

/// Making `vid` the untagged PVID of a bridge port (`bridge vlan add vid V pvid untagged`),
/// for a batch.
pub fn port_vlan_op(index: u32, vid: u16) -> Op {
    let msg = LinkBridgeVlan::new(index)
        .vlan(
            vid,
            BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
        )
        .build();
    Op::new(
        RouteNetlinkMessage::SetLink(msg),
        0,
        format!("set vlan {vid} on link {index}"),
    )
}

/// Makes `vid` the untagged PVID of a bridge port.
pub fn set_port_vlan(h: &Netlink, index: u32, vid: u16) -> Result<()> {
    run(h, vec![port_vlan_op(index, vid)])
}

/// Bringing a link up (for a batch).
pub fn set_up_op(index: u32) -> Op {
    Op::new(
        RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(index).up().build()),
        0,
        format!("set link {index} up"),
    )
}

/// Brings a link up.
pub fn set_up(h: &Netlink, index: u32) -> Result<()> {
    run(h, vec![set_up_op(index)])
}

/// Brings a link down.
pub fn set_down(h: &Netlink, index: u32) -> Result<()> {
    let msg = LinkUnspec::new_with_index(index).down().build();
    h.request(Request::new(RouteNetlinkMessage::SetLink(msg), 0))
        .map(drop)
        .map_err(nl(format!("set link {index} down")))
}

/// Deletes a link by index; a missing link is not an error.
pub fn del_link(h: &Netlink, index: u32) -> Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    match h.request(Request::new(RouteNetlinkMessage::DelLink(m), 0)) {
        Ok(_) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(()),
        Err(e) => Err(nl(format!("delete link {index}"))(e)),
    }
}

/// Deletes a link by name, in one request (the kernel looks the name up). Returns whether it
/// existed.
pub fn del_link_by_name(h: &Netlink, name: &str) -> Result<bool> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    match h.request(Request::new(RouteNetlinkMessage::DelLink(m), 0)) {
        Ok(_) => Ok(true),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(false),
        Err(e) => Err(nl(format!("delete link {name}"))(e)),
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

/// Adding a route (replacing an identical destination's route), for a batch; a gateway-less
/// route is scoped to the link.
pub fn add_route_op(r: &Route) -> Op {
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
    Op::new(
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
        format!("add route {}", r.dst),
    )
}

/// Adds a route (see [`add_route_op`]).
pub fn add_route(h: &Netlink, r: &Route) -> Result<()> {
    run(h, vec![add_route_op(r)])
}

/// The main-table routes of one family (`v6` selects IPv6).
pub fn routes(h: &Netlink, v6: bool) -> Result<Vec<Route>> {
    // Only the family: with strict checking the kernel would filter on any other field set.
    let mut msg = RouteMessage::default();
    msg.header.address_family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let replies = h
        .request(Request::new(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP))
        .map_err(nl("list routes"))?;
    let mut out = Vec::new();
    for m in replies {
        let RouteNetlinkMessage::NewRoute(m) = m else {
            continue;
        };
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
