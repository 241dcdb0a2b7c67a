//! Firewall rules for `ipMasq` (bridge) and port mappings (portmap), with an iptables and an
//! nftables backend.
//!
//! **Why the system tools.** Both backends drive the distribution's own binaries, each change as
//! one atomic batch: `iptables-restore --noflush` (one exec per family; with iptables-nft that is
//! one nftables transaction) and `nft -f -` (one transaction for both families). The alternatives
//! were nftables over netlink (`rustables`/`nftnl`) and hand-written xtables netlink: faster by a
//! few milliseconds per call, but they would make us own the encoding of every expression
//! (`fib`, `nat`, `masquerade`, comments) against kernel and userspace versions we do not control,
//! and rules written that way can be unreadable to, or silently misread by, the `nft`/`iptables`
//! a node operator uses to inspect them; for iptables there is no stable netlink API at all
//! (iptables-nft's rule encoding is private to it). The `nftables` crate is itself a wrapper around
//! the `nft` binary, so it buys nothing over writing the short scripts here. One batch per change
//! (and family; both families in parallel) keeps each ADD/DEL far below the reference plugins,
//! which run `iptables` once per rule.
//!
//! **Naming and ownership.** Everything is per attachment and named from a hash of the network
//! name (8 hex digits) and the container id (12 hex digits), so it can be found by DEL and GC
//! without reading any state: iptables chains `DH-MQ-<net>-<cid>` (masquerade), `DH-DN-…` (DNAT)
//! and `DH-SN-…` (SNAT for hairpin/localhost), jumped to from the built-in chains by rules carrying
//! the comment `dh net=<name> id=<cid>` (portmap's jumps are inserted first, as the reference's,
//! so a masquerade chain's ACCEPT cannot hide them); nftables tables `inet dh-mq-<net>-<cid>` and
//! `inet dh-pm-<net>-<cid>` with their own base chains, and `bridge dh-msc-<net>-<cid>` for the
//! MAC spoof check. Nothing is shared between attachments, so no locking is needed and DEL leaves
//! the ruleset exactly as it was before ADD (iptables-nft's own empty built-in chains aside).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Which tool set programs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `iptables-restore`/`ip6tables-restore` (whatever `iptables` is on the host: nft or legacy).
    #[default]
    Iptables,
    /// `nft`.
    Nftables,
}

impl Backend {
    /// Parses `iptables` / `nftables`.
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "iptables" => Some(Backend::Iptables),
            "nftables" => Some(Backend::Nftables),
            _ => None,
        }
    }
}

/// Firewall errors.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// A tool could not be started.
    #[error("cannot run {cmd}: {source}")]
    Exec {
        /// The command.
        cmd: String,
        /// The error.
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{cmd} failed: {stderr}")]
    Failed {
        /// The command.
        cmd: String,
        /// Its standard error.
        stderr: String,
    },
    /// CHECK: something expected is missing.
    #[error("firewall rule missing: {0}")]
    Missing(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, FirewallError>;

/// FNV-1a, 64 bits: a stable, dependency-free hash for names (not for security).
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The 8-hex-digit hash of a network name.
pub fn net_hash(network: &str) -> String {
    format!("{:08x}", fnv1a(network.as_bytes()) >> 32)
}

/// The 12-hex-digit hash of a container id (salted with the network name).
pub fn cid_hash(network: &str, container_id: &str) -> String {
    let mut d = Vec::with_capacity(network.len() + container_id.len() + 1);
    d.extend_from_slice(network.as_bytes());
    d.push(0);
    d.extend_from_slice(container_id.as_bytes());
    format!("{:012x}", fnv1a(&d) >> 16)
}

/// Identity of one attachment's firewall objects.
#[derive(Debug, Clone)]
pub struct Owner {
    /// Network name.
    pub network: String,
    /// Container id.
    pub container_id: String,
}

impl Owner {
    /// A new owner.
    pub fn new(network: &str, container_id: &str) -> Self {
        Owner {
            network: network.to_string(),
            container_id: container_id.to_string(),
        }
    }
    fn suffix(&self) -> String {
        format!(
            "{}-{}",
            net_hash(&self.network),
            cid_hash(&self.network, &self.container_id)
        )
    }
    /// The iptables chain with `kind` (`MQ`, `DN`, `SN`).
    pub fn chain(&self, kind: &str) -> String {
        format!("DH-{kind}-{}", self.suffix())
    }
    /// The nftables table with `kind` (`mq`, `pm`).
    pub fn table(&self, kind: &str) -> String {
        format!("dh-{kind}-{}", self.suffix())
    }
    /// The rule comment (only characters that need no quoting in either tool).
    pub fn comment(&self) -> String {
        format!(
            "dh net={} id={}",
            sanitize(&self.network),
            sanitize(&self.container_id)
        )
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(100)
        .collect()
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let full = format!("{cmd} {}", args.join(" "));
    let mut child = c.spawn().map_err(|source| FirewallError::Exec {
        cmd: full.clone(),
        source,
    })?;
    if let Some(input) = stdin
        && let Some(mut w) = child.stdin.take()
    {
        w.write_all(input.as_bytes())
            .map_err(|source| FirewallError::Exec {
                cmd: full.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| FirewallError::Exec {
            cmd: full.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(FirewallError::Failed {
            cmd: full,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore_cmd(v6: bool) -> &'static str {
    if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    }
}

fn save_nat(v6: bool) -> Result<String> {
    run(
        if v6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        },
        &["-t", "nat"],
        None,
    )
}

fn restore(v6: bool, script: &str) -> Result<()> {
    run(restore_cmd(v6), &["-w", "5", "--noflush"], Some(script)).map(|_| ())
}

fn nft(script: &str) -> Result<()> {
    run("nft", &["-f", "-"], Some(script)).map(|_| ())
}

/// The IP families an operation concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    /// IPv4.
    pub v4: bool,
    /// IPv6.
    pub v6: bool,
}

impl Families {
    /// Both families (DEL without a previous result: whatever is there).
    pub const ALL: Families = Families { v4: true, v6: true };

    /// The families of `ips`; both when `ips` is empty (nothing known).
    pub fn of(ips: impl IntoIterator<Item = IpAddr>) -> Families {
        let mut f = Families {
            v4: false,
            v6: false,
        };
        for ip in ips {
            if ip.is_ipv6() {
                f.v6 = true;
            } else {
                f.v4 = true;
            }
        }
        if !f.v4 && !f.v6 { Families::ALL } else { f }
    }
}

/// Runs `f` for the selected families, IPv4 and IPv6 in parallel; the first error wins.
fn both_families(fam: Families, f: impl Fn(bool) -> Result<()> + Sync) -> Result<()> {
    match (fam.v4, fam.v6) {
        (true, false) => f(false),
        (false, true) => f(true),
        (false, false) => Ok(()),
        (true, true) => std::thread::scope(|s| {
            let v6 = s.spawn(|| f(true));
            let r4 = f(false);
            let r6 = v6
                .join()
                .unwrap_or_else(|_| Err(FirewallError::Missing("worker thread panicked".into())));
            r4.and(r6)
        }),
    }
}

/// Deletes, in one batch, every rule that jumps to one of `chains` and the chains themselves,
/// reading the current nat table first. Nothing to do is success.
fn iptables_remove_chains(v6: bool, chains: &[String]) -> Result<()> {
    let saved = match save_nat(v6) {
        Ok(s) => s,
        // A host without IPv6 NAT (no ip6tables, IPv6 disabled) cannot hold our IPv6 rules.
        Err(_) if v6 => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut script = String::from("*nat\n");
    let mut any = false;
    for line in saved.lines() {
        if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = rule.split_whitespace();
            let chain = words.next().unwrap_or_default();
            if chains.iter().any(|c| c == chain) {
                continue; // flushed below
            }
            if chains
                .iter()
                .any(|c| rule.ends_with(&format!("-j {c}")) || rule.contains(&format!("-j {c} ")))
            {
                let _ = writeln!(script, "-D {rule}");
                any = true;
            }
        }
    }
    for c in chains {
        if saved
            .lines()
            .any(|l| l == format!(":{c} - [0:0]") || l.starts_with(&format!(":{c} ")))
        {
            let _ = writeln!(script, "-F {c}\n-X {c}");
            any = true;
        }
    }
    if !any {
        return Ok(());
    }
    script.push_str("COMMIT\n");
    restore(v6, &script)
}

/// The chains of all attachments of `network` present in the nat table of one family, as
/// `(kind, chain)`.
fn iptables_chains_of_network(v6: bool, network: &str) -> Result<Vec<String>> {
    let saved = save_nat(v6)?;
    let nh = net_hash(network);
    Ok(saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("DH-") && c.get(6..14) == Some(nh.as_str()))
        .map(str::to_string)
        .collect())
}

fn nft_delete_tables(tables: &[String]) -> Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    // Declaring a table first makes the delete succeed when it is already gone.
    let mut s = String::new();
    for t in tables {
        let _ = writeln!(s, "table inet {t}\ndelete table inet {t}");
    }
    nft(&s)
}

fn nft_tables() -> Result<Vec<String>> {
    let out = run("nft", &["list", "tables", "inet"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .map(|s| s.trim().to_string())
        .collect())
}

fn nft_table_text(table: &str) -> Result<Option<String>> {
    match run("nft", &["list", "table", "inet", table], None) {
        Ok(s) => Ok(Some(s)),
        Err(FirewallError::Failed { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// ipMasq

/// One pod address with its subnet, for masquerading.
#[derive(Debug, Clone, Copy)]
pub struct MasqAddr {
    /// The pod's address.
    pub ip: IpAddr,
    /// The prefix length of its subnet (traffic inside the subnet is not masqueraded).
    pub prefix: u8,
}

fn net_of(a: &MasqAddr) -> String {
    format!("{}/{}", crate::link::mask(a.ip, a.prefix), a.prefix)
}

fn mcast(v6: bool) -> &'static str {
    if v6 { "ff00::/8" } else { "224.0.0.0/4" }
}

/// Installs masquerading for the pod's addresses: traffic from the pod to anything outside its
/// subnet (and not multicast) leaves with the host's address.
pub fn masq_add(backend: Backend, owner: &Owner, addrs: &[MasqAddr]) -> Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    match backend {
        Backend::Iptables => {
            let chain = owner.chain("MQ");
            let comment = owner.comment();
            both_families(Families::of(addrs.iter().map(|a| a.ip)), |v6| {
                let fam: Vec<&MasqAddr> = addrs.iter().filter(|a| a.ip.is_ipv6() == v6).collect();
                if fam.is_empty() {
                    return Ok(());
                }
                let host = if v6 { 128 } else { 32 };
                let mut s = format!("*nat\n:{chain} - [0:0]\n");
                for a in &fam {
                    let _ = writeln!(
                        s,
                        "-A {chain} -s {ip}/{host} -d {net} -m comment --comment \"{comment}\" -j ACCEPT\n\
                         -A {chain} -s {ip}/{host} ! -d {mc} -m comment --comment \"{comment}\" -j MASQUERADE",
                        ip = a.ip,
                        net = net_of(a),
                        mc = mcast(v6),
                    );
                }
                let _ = writeln!(
                    s,
                    "-A POSTROUTING -m comment --comment \"{comment}\" -j {chain}\nCOMMIT"
                );
                restore(v6, &s)
            })
        }
        Backend::Nftables => {
            let table = owner.table("mq");
            let mut s = format!(
                "table inet {table} {{\n  comment \"{c}\"\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n",
                c = owner.comment()
            );
            for a in addrs {
                let f = if a.ip.is_ipv6() { "ip6" } else { "ip" };
                let _ = writeln!(
                    s,
                    "    {f} saddr {ip} {f} daddr {net} accept\n    {f} saddr {ip} {f} daddr != {mc} masquerade",
                    ip = a.ip,
                    net = net_of(a),
                    mc = mcast(a.ip.is_ipv6()),
                );
            }
            s.push_str("  }\n}\n");
            // Replace any leftover of an earlier ADD of the same attachment atomically.
            let full = format!("table inet {table}\ndelete table inet {table}\n{s}");
            nft(&full)
        }
    }
}

/// Removes the attachment's masquerading (both families). Idempotent.
/// `families` limits the work when the previous result tells which families were used.
pub fn masq_del(backend: Backend, owner: &Owner, families: Families) -> Result<()> {
    match backend {
        Backend::Iptables => {
            let chain = owner.chain("MQ");
            let comment = owner.comment();
            // The fast path: the exact rules we wrote, in one batch per family, both families
            // at once. When something is already gone the batch fails as a whole; then read the
            // table and remove what is left.
            let one = |v6: bool| {
                let s = format!(
                    "*nat\n-D POSTROUTING -m comment --comment \"{comment}\" -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"
                );
                if restore(v6, &s).is_err() {
                    iptables_remove_chains(v6, std::slice::from_ref(&chain))?;
                }
                Ok(())
            };
            both_families(families, one)
        }
        Backend::Nftables => nft_delete_tables(&[owner.table("mq")]),
    }
}

/// Verifies that the attachment's masquerading is in place.
pub fn masq_check(backend: Backend, owner: &Owner, addrs: &[MasqAddr]) -> Result<()> {
    match backend {
        Backend::Iptables => {
            let chain = owner.chain("MQ");
            for v6 in [false, true] {
                let fam: Vec<&MasqAddr> = addrs.iter().filter(|a| a.ip.is_ipv6() == v6).collect();
                if fam.is_empty() {
                    continue;
                }
                let saved = save_nat(v6)?;
                if !saved
                    .lines()
                    .any(|l| l.starts_with("-A POSTROUTING") && l.ends_with(&format!("-j {chain}")))
                {
                    return Err(FirewallError::Missing(format!(
                        "POSTROUTING jump to {chain}"
                    )));
                }
                for a in fam {
                    let want = format!("-A {chain} -s {}/", a.ip);
                    let n = saved.lines().filter(|l| l.starts_with(&want)).count();
                    if n < 2 {
                        return Err(FirewallError::Missing(format!(
                            "masquerade rules for {} in {chain}",
                            a.ip
                        )));
                    }
                }
            }
            Ok(())
        }
        Backend::Nftables => {
            let table = owner.table("mq");
            let text = nft_table_text(&table)?
                .ok_or_else(|| FirewallError::Missing(format!("table inet {table}")))?;
            for a in addrs {
                let f = if a.ip.is_ipv6() { "ip6" } else { "ip" };
                if !text.contains(&format!("{f} saddr {} ", a.ip)) || !text.contains("masquerade") {
                    return Err(FirewallError::Missing(format!(
                        "masquerade rule for {} in table inet {table}",
                        a.ip
                    )));
                }
            }
            Ok(())
        }
    }
}

fn gc_macspoof(network: &str, stale: &dyn Fn(&str) -> bool) -> Result<()> {
    let nh = net_hash(network);
    let out = run("nft", &["list", "tables", "bridge"], None)?;
    let mut script = String::new();
    for t in out.lines().filter_map(|l| l.strip_prefix("table bridge ")) {
        let t = t.trim();
        if t.starts_with("dh-msc-") && t.get(7..15) == Some(nh.as_str()) && stale(t) {
            let _ = writeln!(script, "table bridge {t}\ndelete table bridge {t}");
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    nft(&script)
}

/// GC: removes the masquerading, port mappings and MAC spoof checks of every attachment of `network` whose
/// container id is not in `keep`.
pub fn gc(backend: Backend, network: &str, keep: &[String]) -> Result<()> {
    let keep_suffixes: Vec<String> = keep
        .iter()
        .map(|c| Owner::new(network, c).suffix())
        .collect();
    let stale = |name: &str| !keep_suffixes.iter().any(|k| name.ends_with(k.as_str()));
    match backend {
        Backend::Iptables => {
            for v6 in [false, true] {
                let chains: Vec<String> = iptables_chains_of_network(v6, network)?
                    .into_iter()
                    .filter(|c| stale(c))
                    .collect();
                if !chains.is_empty() {
                    iptables_remove_chains(v6, &chains)?;
                }
            }
            gc_macspoof(network, &stale)
        }
        Backend::Nftables => {
            let nh = net_hash(network);
            let tables: Vec<String> = nft_tables()?
                .into_iter()
                .filter(|t| {
                    (t.starts_with("dh-mq-") || t.starts_with("dh-pm-"))
                        && t.get(6..14) == Some(nh.as_str())
                        && stale(t)
                })
                .collect();
            nft_delete_tables(&tables)?;
            gc_macspoof(network, &stale)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MAC spoof check (bridge `macspoofchk`; nftables, as the reference)

/// Drops frames entering the bridge from the pod's host-side veth with any source MAC but the
/// pod's own: table `bridge dh-msc-<net>-<cid>`.
pub fn macspoof_add(owner: &Owner, host_veth: &str, mac: &str) -> Result<()> {
    let table = owner.table("msc");
    let ok_name = host_veth
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let ok_mac = mac.len() == 17 && mac.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
    if !ok_name || !ok_mac {
        return Err(FirewallError::Missing(format!(
            "invalid interface {host_veth:?} or MAC {mac:?}"
        )));
    }
    nft(&format!(
        "table bridge {table}\ndelete table bridge {table}\n\
         table bridge {table} {{\n  comment \"{c}\"\n  chain prerouting {{\n    \
         type filter hook prerouting priority -300; policy accept;\n    \
         iifname \"{host_veth}\" ether saddr != {mac} drop\n  }}\n}}\n",
        c = owner.comment()
    ))
}

/// Removes the MAC spoof check. Idempotent.
pub fn macspoof_del(owner: &Owner) -> Result<()> {
    let table = owner.table("msc");
    nft(&format!(
        "table bridge {table}\ndelete table bridge {table}\n"
    ))
}

/// Verifies the MAC spoof check.
pub fn macspoof_check(owner: &Owner) -> Result<()> {
    let table = owner.table("msc");
    match run("nft", &["list", "table", "bridge", &table], None) {
        Ok(t) if t.contains("drop") => Ok(()),
        Ok(_) | Err(FirewallError::Failed { .. }) => {
            Err(FirewallError::Missing(format!("table bridge {table}")))
        }
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Port mappings

/// Transport protocol of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    /// Parses `tcp`/`udp`/`sctp` (any case).
    pub fn parse(s: &str) -> Option<Proto> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "sctp" => Some(Proto::Sctp),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

/// One host port forwarded to a pod port.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Host port.
    pub host_port: u16,
    /// Pod port.
    pub container_port: u16,
    /// Protocol.
    pub proto: Proto,
    /// Only for traffic to this host address.
    pub host_ip: Option<IpAddr>,
}

/// Everything portmap installs for one attachment.
#[derive(Debug, Clone)]
pub struct PortMapSpec {
    /// Pod addresses (one per family is used).
    pub pod_ips: Vec<IpAddr>,
    /// The mappings.
    pub mappings: Vec<Mapping>,
    /// Masquerade hairpin and localhost-originated traffic (`snat`, default true).
    pub snat: bool,
    /// Mark such traffic through this chain instead of masquerading it ourselves
    /// (`externalSetMarkChain`, iptables only: e.g. `KUBE-MARK-MASQ`).
    pub external_mark_chain: Option<String>,
}

fn bracket(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
    }
}

/// Installs the DNAT (and hairpin/localhost SNAT) rules of one attachment.
pub fn portmap_add(backend: Backend, owner: &Owner, spec: &PortMapSpec) -> Result<()> {
    match backend {
        Backend::Iptables => portmap_add_iptables(owner, spec),
        Backend::Nftables => portmap_add_nft(owner, spec),
    }
}

fn portmap_add_iptables(owner: &Owner, spec: &PortMapSpec) -> Result<()> {
    let dn = owner.chain("DN");
    let sn = owner.chain("SN");
    let comment = owner.comment();
    for v6 in [false, true] {
        let Some(pod) = spec.pod_ips.iter().copied().find(|i| i.is_ipv6() == v6) else {
            continue;
        };
        let maps: Vec<&Mapping> = spec
            .mappings
            .iter()
            .filter(|m| m.host_ip.is_none_or(|h| h.is_ipv6() == v6))
            .collect();
        if maps.is_empty() {
            continue;
        }
        let host = if v6 { 128 } else { 32 };
        let mut s = format!("*nat\n:{dn} - [0:0]\n");
        let use_sn = spec.snat && spec.external_mark_chain.is_none();
        if use_sn {
            let _ = writeln!(s, ":{sn} - [0:0]");
        }
        for m in &maps {
            let p = m.proto.as_str();
            let dst = m
                .host_ip
                .map(|h| format!(" -d {h}/{host}"))
                .unwrap_or_default();
            let base = format!("-A {dn}{dst} -p {p} -m {p} --dport {}", m.host_port);
            if let (true, Some(ext)) = (spec.snat, &spec.external_mark_chain) {
                let _ = writeln!(
                    s,
                    "{base} -s {pod}/{host} -m comment --comment \"{comment}\" -j {ext}"
                );
                if !v6 {
                    let _ = writeln!(
                        s,
                        "{base} -s 127.0.0.1/32 -m comment --comment \"{comment}\" -j {ext}"
                    );
                }
            }
            let _ = writeln!(
                s,
                "{base} -m comment --comment \"{comment}\" -j DNAT --to-destination {}:{}",
                bracket(pod),
                m.container_port
            );
            if use_sn {
                let tail = format!(
                    "-d {pod}/{host} -p {p} -m {p} --dport {} -m comment --comment \"{comment}\" -j MASQUERADE",
                    m.container_port
                );
                let _ = writeln!(s, "-A {sn} -s {pod}/{host} {tail}");
                if !v6 {
                    let _ = writeln!(s, "-A {sn} -s 127.0.0.0/8 {tail}");
                }
            }
        }
        // Inserted first, as the reference does: a masquerade chain's ACCEPT for in-subnet traffic
        // (bridge ipMasq) would otherwise end the nat table before the hairpin masquerade.
        for base in ["PREROUTING", "OUTPUT"] {
            let _ = writeln!(
                s,
                "-I {base} -m addrtype --dst-type LOCAL -m comment --comment \"{comment}\" -j {dn}"
            );
        }
        if use_sn {
            let _ = writeln!(
                s,
                "-I POSTROUTING -m comment --comment \"{comment}\" -j {sn}"
            );
        }
        s.push_str("COMMIT\n");
        restore(v6, &s)?;
    }
    Ok(())
}

fn portmap_add_nft(owner: &Owner, spec: &PortMapSpec) -> Result<()> {
    let table = owner.table("pm");
    let mut dnat = String::new();
    let mut snat = String::new();
    for m in &spec.mappings {
        for pod in &spec.pod_ips {
            let v6 = pod.is_ipv6();
            if m.host_ip.is_some_and(|h| h.is_ipv6() != v6) {
                continue;
            }
            let f = if v6 { "ip6" } else { "ip" };
            let nfp = if v6 { "ipv6" } else { "ipv4" };
            let p = m.proto.as_str();
            let dst = m
                .host_ip
                .map(|h| format!("{f} daddr {h} "))
                .unwrap_or_default();
            let _ = writeln!(
                dnat,
                "    meta nfproto {nfp} {dst}{p} dport {} dnat {f} to {}:{}",
                m.host_port,
                bracket(*pod),
                m.container_port
            );
            if spec.snat {
                let _ = writeln!(
                    snat,
                    "    {f} saddr {pod} {f} daddr {pod} {p} dport {} masquerade",
                    m.container_port
                );
                if !v6 {
                    let _ = writeln!(
                        snat,
                        "    ip saddr 127.0.0.0/8 ip daddr {pod} {p} dport {} masquerade",
                        m.container_port
                    );
                }
            }
        }
    }
    let s = format!(
        "table inet {table}\ndelete table inet {table}\n\
         table inet {table} {{\n  comment \"{c}\"\n\
         \x20 chain hostports {{\n{dnat}  }}\n\
         \x20 chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    fib daddr type local jump hostports\n  }}\n\
         \x20 chain output {{\n    type nat hook output priority -100; policy accept;\n    fib daddr type local jump hostports\n  }}\n\
         \x20 chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{snat}  }}\n}}\n",
        c = owner.comment()
    );
    nft(&s)
}

/// Removes exactly the attachment's port-mapping rules. Idempotent.
/// `families` limits the work when the previous result tells which families were used.
pub fn portmap_del(backend: Backend, owner: &Owner, families: Families) -> Result<()> {
    match backend {
        Backend::Iptables => {
            let dn = owner.chain("DN");
            let sn = owner.chain("SN");
            both_families(families, |v6| {
                iptables_remove_chains(v6, &[dn.clone(), sn.clone()])
            })
        }
        Backend::Nftables => nft_delete_tables(&[owner.table("pm")]),
    }
}

/// Verifies the attachment's port-mapping rules.
pub fn portmap_check(backend: Backend, owner: &Owner, spec: &PortMapSpec) -> Result<()> {
    match backend {
        Backend::Iptables => {
            let dn = owner.chain("DN");
            for v6 in [false, true] {
                let Some(pod) = spec.pod_ips.iter().copied().find(|i| i.is_ipv6() == v6) else {
                    continue;
                };
                let saved = save_nat(v6)?;
                for base in ["PREROUTING", "OUTPUT"] {
                    if !saved.lines().any(|l| {
                        l.starts_with(&format!("-A {base} ")) && l.ends_with(&format!("-j {dn}"))
                    }) {
                        return Err(FirewallError::Missing(format!("{base} jump to {dn}")));
                    }
                }
                for m in spec
                    .mappings
                    .iter()
                    .filter(|m| m.host_ip.is_none_or(|h| h.is_ipv6() == v6))
                {
                    let to = format!("--to-destination {}:{}", bracket(pod), m.container_port);
                    let port = format!("--dport {} ", m.host_port);
                    if !saved.lines().any(|l| {
                        l.starts_with(&format!("-A {dn} ")) && l.contains(&port) && l.ends_with(&to)
                    }) {
                        return Err(FirewallError::Missing(format!(
                            "DNAT {}/{} -> {}",
                            m.host_port,
                            m.proto.as_str(),
                            to
                        )));
                    }
                }
            }
            Ok(())
        }
        Backend::Nftables => {
            let table = owner.table("pm");
            let text = nft_table_text(&table)?
                .ok_or_else(|| FirewallError::Missing(format!("table inet {table}")))?;
            for m in &spec.mappings {
                for pod in &spec.pod_ips {
                    if m.host_ip.is_some_and(|h| h.is_ipv6() != pod.is_ipv6()) {
                        continue;
                    }
                    let want = format!("to {}:{}", bracket(*pod), m.container_port);
                    let port = format!("dport {} ", m.host_port);
                    if !text
                        .lines()
                        .any(|l| l.contains(&port) && l.contains("dnat") && l.contains(&want))
                    {
                        return Err(FirewallError::Missing(format!(
                            "dnat {} -> {want} in table inet {table}",
                            m.host_port
                        )));
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_are_stable() {
        let o = Owner::new("dh-net", "0123456789abcdef0123456789abcdef");
        let c = o.chain("MQ");
        assert!(c.len() <= 28, "{c}");
        assert!(c.starts_with("DH-MQ-"));
        assert_eq!(
            c,
            Owner::new("dh-net", "0123456789abcdef0123456789abcdef").chain("MQ")
        );
        assert_ne!(c, Owner::new("dh-net", "other").chain("MQ"));
        assert!(o.table("pm").starts_with("dh-pm-"));
        assert_eq!(&c[6..14], net_hash("dh-net"));
        assert_eq!(
            o.comment(),
            "dh net=dh-net id=0123456789abcdef0123456789abcdef"
        );
        assert_eq!(Owner::new("a\"b c", "x;y").comment(), "dh net=abc id=xy");
    }

    #[test]
    fn protocols() {
        assert_eq!(Proto::parse("TCP"), Some(Proto::Tcp));
        assert_eq!(Proto::parse("udp"), Some(Proto::Udp));
        assert_eq!(Proto::parse("icmp"), None);
        assert_eq!(Backend::parse("nftables"), Some(Backend::Nftables));
        assert_eq!(Backend::parse("ebtables"), None);
    }
}
