//! The loopback plugin (`deckhand-loopback`): brings `lo` up (ADD) or down (DEL) inside `CNI_NETNS` over rtnetlink.
//!
//! ADD reports `lo` and its addresses (127.0.0.1/8, ::1/128), or passes a `prevResult` through
//! unchanged when chained. DEL succeeds when the namespace is already gone. CHECK verifies that
//! `lo` is up.

use std::net::IpAddr;

use crate::error::CniError;
use crate::link;
use crate::netns::{NetNs, NetnsError};
use crate::plugin::{Plugin, Request};
use crate::types::{CniResult, Interface, IpConfig};
use ipnet::IpNet;

/// The loopback plugin.
#[derive(Debug)]
pub struct Loopback;

/// What we learnt about `lo`.
struct LoState {
    mac: String,
    up: bool,
    addrs: Vec<(IpAddr, u8)>,
}

fn netns_err(e: NetnsError) -> CniError {
    e.into()
}

fn link_err(e: link::LinkError) -> CniError {
    CniError::io(e.to_string())
}

/// Opens the netns, sets `lo` up or down (`want_up`, or leaves it when `None`) and reads it back.
fn with_lo(req: &Request, want_up: Option<bool>) -> Result<LoState, CniError> {
    let path = req
        .netns
        .as_ref()
        .ok_or_else(|| CniError::invalid_env("CNI_NETNS is required"))?;
    let ns = NetNs::open(path).map_err(netns_err)?;
    lo_in(&ns, want_up)
}

/// Sets `lo` of `ns` up or down (`want_up`, or leaves it when `None`) and reads it back.
fn lo_in(ns: &NetNs, want_up: Option<bool>) -> Result<LoState, CniError> {
    let h = ns.netlink().map_err(netns_err)?;
    let lo = link::link_by_name(&h, "lo")
        .map_err(link_err)?
        .ok_or_else(|| CniError::io("no lo interface in the namespace"))?;
    match want_up {
        Some(true) if !lo.up => link::set_up(&h, lo.index).map_err(link_err)?,
        Some(false) if lo.up => link::set_down(&h, lo.index).map_err(link_err)?,
        _ => {}
    }
    let lo = link::link_by_index(&h, lo.index)
        .map_err(link_err)?
        .ok_or_else(|| CniError::io("lo disappeared"))?;
    let addrs = link::addresses(&h, lo.index)
        .map_err(link_err)?
        .into_iter()
        .map(|a| (a.ip, a.prefix))
        .collect();
    Ok(LoState {
        mac: lo.mac_string(),
        up: lo.up,
        addrs,
    })
}

impl Plugin for Loopback {
    fn about(&self) -> String {
        format!("Deckhand loopback plugin {}", env!("CARGO_PKG_VERSION"))
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let lo = with_lo(req, Some(true))?;
        if !lo.up {
            return Err(CniError::io("lo is still down after setting it up"));
        }
        if let Some(prev) = req.prev_result()? {
            return Ok(prev);
        }
        let sandbox = req
            .netns
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut addrs = lo.addrs;
        // IPv4 first, as the reference reports them.
        addrs.sort_by_key(|(ip, _)| ip.is_ipv6());
        let ips = addrs
            .into_iter()
            .filter_map(|(ip, prefix)| IpNet::new(ip, prefix).ok())
            .map(|address| IpConfig {
                interface: Some(0),
                address,
                gateway: None,
            })
            .collect();
        Ok(CniResult {
            cni_version: req.version.to_string(),
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: lo.mac,
                sandbox,
                ..Default::default()
            }],
            ips,
            ..Default::default()
        })
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let Some(path) = req.netns.as_ref() else {
            return Ok(());
        };
        match NetNs::open(path) {
            Ok(ns) => lo_in(&ns, Some(false)).map(|_| ()),
            // The namespace is gone: nothing to undo.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(netns_err(e)),
        }
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let lo = with_lo(req, None)?;
        if lo.up {
            Ok(())
        } else {
            Err(CniError::plugin(100, "loopback interface is down"))
        }
    }
}
