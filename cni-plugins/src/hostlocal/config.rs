//! host-local's configuration: the reference plugin's keys under `ipam`, validated and turned
//! into [`RangeSet`]s with every default filled in.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::CniError;
use crate::ipam::{ip_to_u128, next_ip, prev_ip};
use crate::plugin::validate_network_name;
use crate::types::Route;

/// Where allocations live when `dataDir` is not set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(default)]
    name: String,
    ipam: Option<RawIpam>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(flatten)]
    legacy: RawRange,
    #[serde(default)]
    routes: Vec<Route>,
    data_dir: Option<PathBuf>,
    resolv_conf: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: Option<String>,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
}

/// One contiguous range inside a subnet, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The subnet (network address, prefix length).
    pub subnet: IpNet,
    /// First allocatable address.
    pub start: IpAddr,
    /// Last allocatable address.
    pub end: IpAddr,
    /// The gateway (never allocated); defaults to the subnet's first address.
    pub gateway: Option<IpAddr>,
}

impl Range {
    /// Whether `ip` is in `start..=end`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && ip_to_u128(ip) >= ip_to_u128(self.start)
            && ip_to_u128(ip) <= ip_to_u128(self.end)
    }

    fn overlaps(&self, o: &Range) -> bool {
        self.start.is_ipv4() == o.start.is_ipv4()
            && ip_to_u128(self.start) <= ip_to_u128(o.end)
            && ip_to_u128(o.start) <= ip_to_u128(self.end)
    }
}

/// A set of ranges of one family: one address is allocated per set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

impl RangeSet {
    /// The range containing `ip`.
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    /// `start-end` of the whole set, as the reference prints it.
    pub fn describe(&self) -> String {
        match (self.0.first(), self.0.last()) {
            (Some(f), Some(l)) => format!("{}-{}", f.start, l.end),
            _ => String::new(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network name (a directory under `data_dir`).
    pub name: String,
    /// The range sets, legacy `subnet` first.
    pub range_sets: Vec<RangeSet>,
    /// Routes to return.
    pub routes: Vec<Route>,
    /// The allocation store's parent directory.
    pub data_dir: PathBuf,
    /// A resolv.conf whose settings go into the result's DNS.
    pub resolv_conf: Option<PathBuf>,
}

impl Config {
    /// Parses and validates host-local's configuration from the whole network configuration.
    /// Every problem is error 7 (invalid network config) with the reference's wording.
    pub fn parse(stdin: &[u8]) -> Result<Config, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin)
            .map_err(|e| CniError::invalid_config(format!("invalid configuration: {e}")))?;
        validate_network_name(&raw.name)?;
        let ipam = raw
            .ipam
            .ok_or_else(|| CniError::invalid_config("IPAM config missing 'ipam' key"))?;
        let mut raw_sets = Vec::new();
        if ipam.legacy.subnet.is_some() {
            raw_sets.push(vec![ipam.legacy]);
        } else if ipam.legacy.range_start.is_some() || ipam.legacy.range_end.is_some() {
            return Err(CniError::invalid_config(
                "rangeStart/rangeEnd given without subnet",
            ));
        }
        raw_sets.extend(ipam.ranges);
        if raw_sets.is_empty() {
            return Err(CniError::invalid_config("no IP ranges specified"));
        }
        let mut range_sets: Vec<RangeSet> = Vec::new();
        for (i, set) in raw_sets.into_iter().enumerate() {
            let rs = canonical_set(set)
                .map_err(|m| CniError::invalid_config(format!("invalid range set {i}: {m}")))?;
            for (j, other) in range_sets.iter().enumerate() {
                if rs.0.iter().any(|a| other.0.iter().any(|b| a.overlaps(b))) {
                    return Err(CniError::invalid_config(format!(
                        "range set {i} overlaps with {j}"
                    )));
                }
            }
            range_sets.push(rs);
        }
        Ok(Config {
            name: raw.name,
            range_sets,
            routes: ipam.routes,
            data_dir: ipam
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            resolv_conf: ipam.resolv_conf,
        })
    }
}

fn canonical_set(raw: Vec<RawRange>) -> Result<RangeSet, String> {
    if raw.is_empty() {
        return Err("empty range set".into());
    }
    let mut ranges: Vec<Range> = Vec::new();
    for r in raw {
        let range = canonical_range(r)?;
        if let Some(first) = ranges.first()
            && first.start.is_ipv4() != range.start.is_ipv4()
        {
            return Err("mixed address families in one range set".into());
        }
        if let Some(o) = ranges.iter().find(|o| o.overlaps(&range)) {
            return Err(format!("subnets {} and {} overlap", o.subnet, range.subnet));
        }
        ranges.push(range);
    }
    Ok(RangeSet(ranges))
}

fn canonical_range(r: RawRange) -> Result<Range, String> {
    let text = r.subnet.ok_or("missing subnet")?;
    let subnet: IpNet = text
        .parse()
        .map_err(|_| format!("invalid subnet {text:?}"))?;
    if subnet.prefix_len() + 2 > subnet.max_prefix_len() {
        return Err(format!("Network {subnet} too small to allocate from"));
    }
    if subnet.addr() != subnet.network() {
        return Err(format!(
            "Network has host bits set. For a subnet mask of length {} the network address is {}",
            subnet.prefix_len(),
            subnet.network()
        ));
    }
    let first = next_ip(subnet.network()).ok_or("subnet has no addresses")?;
    let last = match subnet {
        // Never the broadcast address.
        IpNet::V4(_) => prev_ip(subnet.broadcast()).ok_or("subnet has no addresses")?,
        IpNet::V6(_) => subnet.broadcast(),
    };
    let check_in = |what: &str, ip: IpAddr| {
        if subnet.contains(&ip) {
            Ok(ip)
        } else {
            Err(format!("{what} {ip} not in network {subnet}"))
        }
    };
    let start = r
        .range_start
        .map(|ip| check_in("RangeStart", ip))
        .transpose()?
        .unwrap_or(first);
    let end = r
        .range_end
        .map(|ip| check_in("RangeEnd", ip))
        .transpose()?
        .unwrap_or(last);
    if ip_to_u128(start) > ip_to_u128(end) {
        return Err(format!("RangeStart {start} is after RangeEnd {end}"));
    }
    let gateway = Some(match r.gateway {
        Some(gw) if gw.is_ipv4() != start.is_ipv4() => {
            return Err(format!("gateway {gw} is not in the family of {subnet}"));
        }
        Some(gw) => gw,
        None => first,
    });
    let subnet = IpNet::new(subnet.network(), subnet.prefix_len()).map_err(|e| e.to_string())?;
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(ipam: serde_json::Value) -> Result<Config, CniError> {
        let conf = json!({"cniVersion": "1.0.0", "name": "dhnet", "type": "x", "ipam": ipam});
        Config::parse(conf.to_string().as_bytes())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn defaults_and_legacy() {
        let c = parse(json!({"type": "host-local", "subnet": "10.1.0.0/24",
            "ranges": [[{"subnet": "fd00::/120", "rangeStart": "fd00::10"}]], "dataDir": "/tmp/x"}))
        .expect("valid");
        assert_eq!(c.range_sets.len(), 2);
        let v4 = &c.range_sets[0].0[0];
        assert_eq!(
            (v4.start, v4.end, v4.gateway),
            (ip("10.1.0.1"), ip("10.1.0.254"), Some(ip("10.1.0.1")))
        );
        let v6 = &c.range_sets[1].0[0];
        assert_eq!((v6.start, v6.end), (ip("fd00::10"), ip("fd00::ff")));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.range_sets[0].describe(), "10.1.0.1-10.1.0.254");
    }

    #[test]
    fn errors() {
        let msg = |v| parse(v).expect_err("invalid").msg;
        assert_eq!(msg(json!({"type": "host-local"})), "no IP ranges specified");
        assert!(msg(json!({"subnet": "10.1.0.1/24"})).contains("host bits set"));
        assert!(msg(json!({"subnet": "10.1.0.0/31"})).contains("too small"));
        assert!(
            msg(json!({"subnet": "10.1.0.0/24", "rangeStart": "10.2.0.1"}))
                .contains("not in network")
        );
        assert!(
            msg(json!({"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.9", "rangeEnd": "10.1.0.8"}))
                .contains("after")
        );
        assert!(
            msg(json!({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]}))
                .contains("mixed")
        );
        assert!(
            msg(json!({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]}))
                .contains("overlaps")
        );
        assert!(msg(json!({"ranges": [[{"subnet": "nonsense"}]]})).contains("invalid subnet"));
        let bad_name =
            json!({"cniVersion": "1.0.0", "name": "../x", "ipam": {"subnet": "10.1.0.0/24"}});
        assert_eq!(
            Config::parse(bad_name.to_string().as_bytes())
                .expect_err("bad")
                .code,
            7
        );
    }
}
