//! `deckhand-host-local`: IPAM from local range sets, compatible with the reference host-local
//! plugin's configuration (`ranges`, legacy `subnet`/`rangeStart`/`rangeEnd`/`gateway`, `routes`,
//! `dataDir`, `resolvConf`) and requested addresses (`CNI_ARGS` `IP=`, `args.cni.ips`, the `ips`
//! capability).
//!
//! One address is allocated per range set (so one IPv4 and one IPv6 set give dual stack). Every
//! operation holds the network's lock file (see [`store`]); an allocation starts after the range
//! set's last reserved address, so it looks at a handful of files whatever the number of
//! existing reservations, and DEL/CHECK read the attachment's own record.
//!
//! An exhausted range set is error 11 (try again later) with the reference's message, and nothing
//! is reserved for the other sets either.

pub mod config;
pub mod store;

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::CniError;
use crate::ipam::{ip_to_u128, parse_resolv_conf, requested_ips, u128_to_ip};
use crate::plugin::{Plugin, Request};
use crate::types::{CniResult, IpConfig};
use config::{Config, RangeSet};
use store::Store;

/// The host-local IPAM plugin.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostLocal;

impl Plugin for HostLocal {
    fn about(&self) -> String {
        format!(
            "Deckhand host-local IPAM plugin {}",
            env!("CARGO_PKG_VERSION")
        )
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let conf = Config::parse(&req.stdin)?;
        let requested = requested_ips(req)?;
        let store = Store::open(&conf.data_dir, &conf.name)?;
        let ips = allocate(
            &store,
            &conf.range_sets,
            &req.container_id,
            &req.ifname,
            &requested,
        )?;
        let mut result = CniResult {
            cni_version: req.version.to_string(),
            ips,
            routes: conf.routes.clone(),
            ..Default::default()
        };
        if let Some(path) = &conf.resolv_conf {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CniError::io(format!("reading resolvConf {}: {e}", path.display())))?;
            result.dns = parse_resolv_conf(&text);
        }
        Ok(result)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let conf = Config::parse(&req.stdin)?;
        let store = Store::open(&conf.data_dir, &conf.name)?;
        for ip in store.attachment(&req.container_id, &req.ifname)? {
            store.release_if_owner(ip, &req.container_id, &req.ifname)?;
        }
        store.remove_attachment(&req.container_id, &req.ifname)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let conf = Config::parse(&req.stdin)?;
        let store = Store::open(&conf.data_dir, &conf.name)?;
        let ips = store.attachment(&req.container_id, &req.ifname)?;
        let missing = || {
            CniError::plugin(
                100,
                format!(
                    "host-local: Failed to find address added by container {}",
                    req.container_id
                ),
            )
        };
        if ips.is_empty() {
            return Err(missing());
        }
        for ip in &ips {
            match store.owner(*ip)? {
                Some((id, ifname)) if id == req.container_id && ifname == req.ifname => {}
                _ => return Err(missing()),
            }
        }
        // The result of the ADD must only name addresses we hold.
        if let Some(prev) = req.prev_result()?
            && let Some(extra) = prev.ips.iter().find(|c| !ips.contains(&c.address.addr()))
        {
            return Err(CniError::plugin(
                100,
                format!(
                    "host-local: address {} is not allocated to container {}",
                    extra.address, req.container_id
                ),
            ));
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let conf = Config::parse(&req.stdin)?;
        let valid: HashSet<(String, String)> = req
            .valid_attachments()?
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let store = Store::open(&conf.data_dir, &conf.name)?;
        let freed = store.gc(&valid)?;
        tracing::debug!(network = %conf.name, freed = freed.len(), "host-local GC");
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        let conf = Config::parse(&req.stdin)?;
        Store::open(&conf.data_dir, &conf.name)
            .map(drop)
            .map_err(|e| CniError::not_available(format!("host-local store unusable: {}", e.msg)))
    }
}

/// Allocates one address per range set to (`id`, `ifname`), honouring `requested` addresses.
/// On any error nothing is left reserved.
pub fn allocate(
    store: &Store,
    sets: &[RangeSet],
    id: &str,
    ifname: &str,
    requested: &[IpAddr],
) -> Result<Vec<IpConfig>, CniError> {
    // An attachment that already holds addresses here is a duplicate ADD, as in the reference.
    let existing = store.attachment(id, ifname)?;
    for ip in &existing {
        if store
            .owner(*ip)?
            .is_some_and(|(o, i)| o == id && i == ifname)
        {
            return Err(CniError::plugin(
                100,
                format!("{ip} has been allocated to {id}, duplicate allocation is not allowed"),
            ));
        }
    }

    // Which set each requested address belongs to.
    let mut wanted: Vec<Option<IpAddr>> = vec![None; sets.len()];
    for ip in requested {
        let i = sets
            .iter()
            .position(|s| s.range_for(*ip).is_some())
            .ok_or_else(|| {
                CniError::invalid_config(format!(
                    "requested IP address {ip} is not in any range set"
                ))
            })?;
        if wanted[i].is_some() {
            return Err(CniError::invalid_config(format!(
                "more than one requested IP address in range set {i}"
            )));
        }
        wanted[i] = Some(*ip);
    }

    // Pick every address first (under the lock the picture cannot change), then write.
    let mut picks: Vec<(IpAddr, IpNet, Option<IpAddr>)> = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let ip = match wanted[i] {
            Some(ip) => {
                let range = set
                    .range_for(ip)
                    .ok_or_else(|| CniError::invalid_config("requested IP not in range"))?;
                if range.gateway == Some(ip) {
                    return Err(CniError::invalid_config(format!(
                        "failed to allocate for range {i}: requested ip {ip} is subnet's gateway"
                    )));
                }
                if store.is_reserved(ip)? {
                    return Err(CniError::plugin(
                        100,
                        format!(
                            "failed to allocate for range {i}: requested IP address {ip} is not available in range set {}",
                            set.describe()
                        ),
                    ));
                }
                ip
            }
            None => next_free(store, set, store.last_reserved(i))?.ok_or_else(|| {
                CniError::try_again_later(format!(
                    "failed to allocate for range {i}: no IP addresses available in range set: {}",
                    set.describe()
                ))
            })?,
        };
        let range = set
            .range_for(ip)
            .ok_or_else(|| CniError::io("allocated address outside its range"))?;
        let net =
            IpNet::new(ip, range.subnet.prefix_len()).map_err(|e| CniError::io(e.to_string()))?;
        picks.push((ip, net, range.gateway));
    }

    let ips: Vec<IpAddr> = picks.iter().map(|p| p.0).collect();
    // The record first: a crash after it leaves at most a record naming free addresses, which
    // DEL (owner check) and GC handle; never a reservation nobody can find.
    store.set_attachment(id, ifname, &ips)?;
    let mut done = Vec::new();
    for ip in &ips {
        match store.reserve(*ip, id, ifname) {
            Ok(true) => done.push(*ip),
            res => {
                for d in &done {
                    let _ = store.release_if_owner(*d, id, ifname);
                }
                let _ = store.remove_attachment(id, ifname);
                res?;
                return Err(CniError::try_again_later(format!(
                    "address {ip} was taken concurrently"
                )));
            }
        }
    }
    for (i, ip) in ips.iter().enumerate() {
        if wanted[i].is_none() {
            store.set_last_reserved(i, *ip)?;
        }
    }
    Ok(picks
        .into_iter()
        .map(|(_, address, gateway)| IpConfig {
            interface: None,
            address,
            gateway,
        })
        .collect())
}

/// The first free address of `set` after `last` (wrapping around once), skipping gateways.
fn next_free(
    store: &Store,
    set: &RangeSet,
    last: Option<IpAddr>,
) -> Result<Option<IpAddr>, CniError> {
    let ranges = &set.0;
    if ranges.is_empty() {
        return Ok(None);
    }
    // Start just after the cursor if it is inside the set, else at the set's first address.
    let (mut ri, mut cur) = (0usize, ip_to_u128(ranges[0].start));
    if let Some(last) = last
        && let Some(i) = ranges.iter().position(|r| r.contains(last))
    {
        let l = ip_to_u128(last);
        if l < ip_to_u128(ranges[i].end) {
            (ri, cur) = (i, l + 1);
        } else {
            ri = (i + 1) % ranges.len();
            cur = ip_to_u128(ranges[ri].start);
        }
    }
    let (start_ri, start_cur) = (ri, cur);
    loop {
        let r = &ranges[ri];
        let ip =
            u128_to_ip(cur, r.start).ok_or_else(|| CniError::io("address arithmetic overflow"))?;
        if r.gateway != Some(ip) && !store.is_reserved(ip)? {
            return Ok(Some(ip));
        }
        if cur >= ip_to_u128(r.end) {
            ri = (ri + 1) % ranges.len();
            cur = ip_to_u128(ranges[ri].start);
        } else {
            cur += 1;
        }
        if (ri, cur) == (start_ri, start_cur) {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sets(ipam: serde_json::Value) -> Vec<RangeSet> {
        let conf = json!({"name": "dhnet", "ipam": ipam});
        Config::parse(conf.to_string().as_bytes())
            .expect("config")
            .range_sets
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn allocates_in_order_and_wraps() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path(), "dhnet").expect("store");
        let s = sets(json!({"subnet": "10.9.0.0/29"}));
        let mut got = Vec::new();
        for n in 0..5 {
            let r = allocate(&store, &s, &format!("c{n}"), "eth0", &[]).expect("alloc");
            assert_eq!(r[0].gateway, Some(ip("10.9.0.1")));
            got.push(r[0].address.to_string());
        }
        assert_eq!(
            got,
            [
                "10.9.0.2/29",
                "10.9.0.3/29",
                "10.9.0.4/29",
                "10.9.0.5/29",
                "10.9.0.6/29"
            ]
        );
        let e = allocate(&store, &s, "c9", "eth0", &[]).expect_err("exhausted");
        assert_eq!(e.code, 11);
        assert!(
            e.msg
                .contains("no IP addresses available in range set: 10.9.0.1-10.9.0.6"),
            "{}",
            e.msg
        );
        assert!(store.attachment("c9", "eth0").expect("index").is_empty());
        // Free one in the middle: the next allocation wraps around to it.
        store
            .release_if_owner(ip("10.9.0.3"), "c1", "eth0")
            .expect("release");
        let r = allocate(&store, &s, "c10", "eth0", &[]).expect("alloc");
        assert_eq!(r[0].address.addr(), ip("10.9.0.3"));
        // Duplicate ADD.
        assert!(
            allocate(&store, &s, "c10", "eth0", &[])
                .expect_err("dup")
                .msg
                .contains("duplicate")
        );
    }

    #[test]
    fn requested_and_multi_range() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path(), "dhnet").expect("store");
        let s = sets(json!({"ranges": [
            [{"subnet": "10.9.0.0/30"}, {"subnet": "10.9.1.0/30"}],
            [{"subnet": "fd00::/126", "rangeStart": "fd00::2"}]
        ]}));
        let r = allocate(&store, &s, "c1", "eth0", &[ip("10.9.1.2")]).expect("requested");
        assert_eq!(r[0].address.to_string(), "10.9.1.2/30");
        assert_eq!(r[0].gateway, Some(ip("10.9.1.1")));
        assert_eq!(r[1].address.to_string(), "fd00::2/126");
        assert!(allocate(&store, &s, "c2", "eth0", &[ip("10.9.1.2")]).is_err());
        assert!(
            allocate(&store, &s, "c2", "eth0", &[ip("10.9.0.1")])
                .expect_err("gw")
                .msg
                .contains("gateway")
        );
        assert!(allocate(&store, &s, "c2", "eth0", &[ip("10.99.0.1")]).is_err());
        // Only 10.9.0.2 is left in the first set, fd00::3 in the second.
        let r = allocate(&store, &s, "c3", "eth0", &[]).expect("alloc");
        assert_eq!(
            (r[0].address.addr(), r[1].address.addr()),
            (ip("10.9.0.2"), ip("fd00::3"))
        );
        let e = allocate(&store, &s, "c4", "eth0", &[]).expect_err("exhausted");
        assert_eq!(e.code, 11);
    }
}
