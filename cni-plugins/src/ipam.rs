//! Helpers for IPAM: address arithmetic, `resolv.conf` parsing, and reading the requested
//! addresses a runtime may pass (`CNI_ARGS` `IP=`, `args.cni.ips`, the `ips` capability).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::Value;

use crate::error::CniError;
use crate::plugin::Request;
use crate::types::Dns;

/// The address as a number (IPv4 in the low 32 bits).
pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of a number in the family of `like` (`None` if it does not fit IPv4).
pub fn u128_to_ip(v: u128, like: IpAddr) -> Option<IpAddr> {
    match like {
        IpAddr::V4(_) => u32::try_from(v).ok().map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        IpAddr::V6(_) => Some(IpAddr::V6(Ipv6Addr::from(v))),
    }
}

/// The next address, `None` past the end of the family.
pub fn next_ip(ip: IpAddr) -> Option<IpAddr> {
    ip_to_u128(ip)
        .checked_add(1)
        .and_then(|v| u128_to_ip(v, ip))
}

/// The previous address, `None` before the start of the family.
pub fn prev_ip(ip: IpAddr) -> Option<IpAddr> {
    ip_to_u128(ip)
        .checked_sub(1)
        .and_then(|v| u128_to_ip(v, ip))
}

/// Parses a `resolv.conf` into the result's DNS section (`nameserver`, `domain`, `search`,
/// `options`; later `domain`/`search` lines win, as the resolver does).
pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(str::to_string)),
            Some("domain") => dns.domain = words.next().map(str::to_string),
            Some("search") => dns.search = words.map(str::to_string).collect(),
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    dns
}

/// The addresses the runtime asked for: `CNI_ARGS` `IP=a,b`, `args.cni.ips` and
/// `runtimeConfig.ips` (entries may carry a prefix length, which is ignored). Duplicates are
/// removed; an unparsable entry is error 7.
pub fn requested_ips(req: &Request) -> Result<Vec<IpAddr>, CniError> {
    let mut raw: Vec<String> = Vec::new();
    if let Some(v) = req.arg("IP") {
        raw.extend(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    let list = |v: Option<&Value>, what: &str| -> Result<Vec<String>, CniError> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        CniError::invalid_config(format!("{what}: not a string: {x}"))
                    })
                })
                .collect(),
            Some(other) => Err(CniError::invalid_config(format!(
                "{what}: not a list: {other}"
            ))),
        }
    };
    raw.extend(list(
        req.config
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("ips")),
        "args.cni.ips",
    )?);
    raw.extend(list(
        req.config
            .runtime_config
            .as_ref()
            .and_then(|r| r.get("ips")),
        "runtimeConfig.ips",
    )?);
    let mut out = Vec::new();
    for s in raw {
        let addr = s.split('/').next().unwrap_or("");
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| CniError::invalid_config(format!("invalid requested IP address {s:?}")))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        let a: IpAddr = "10.0.0.255".parse().expect("ip");
        assert_eq!(next_ip(a), Some("10.0.1.0".parse().expect("ip")));
        assert_eq!(next_ip("255.255.255.255".parse().expect("ip")), None);
        assert_eq!(prev_ip("0.0.0.0".parse().expect("ip")), None);
        assert_eq!(
            next_ip("fd00::ffff".parse().expect("ip")),
            Some("fd00::1:0".parse().expect("ip"))
        );
        assert_eq!(u128_to_ip(1 << 40, a), None);
    }

    #[test]
    fn requested_from_every_source() {
        let env = |k: &str| match k {
            "CNI_CONTAINERID" => Some("c1".to_string()),
            "CNI_IFNAME" => Some("eth0".to_string()),
            "CNI_NETNS" => Some("/x".to_string()),
            "CNI_PATH" => Some("/x".to_string()),
            "CNI_ARGS" => Some("IgnoreUnknown=1;IP=10.0.0.5,fd00::5".to_string()),
            _ => None,
        };
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"t",
            "args":{"cni":{"ips":["10.0.0.6/24","10.0.0.5"]}},"runtimeConfig":{"ips":["fd00::7/64"]}}"#;
        let req = crate::plugin::parse_request(crate::plugin::Command::Add, &env, conf.as_bytes())
            .expect("request");
        let ips: Vec<String> = requested_ips(&req)
            .expect("ips")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5", "10.0.0.6", "fd00::7"]);
        let bad = r#"{"cniVersion":"1.0.0","name":"n","type":"t","runtimeConfig":{"ips":["x"]}}"#;
        let req = crate::plugin::parse_request(crate::plugin::Command::Add, &env, bad.as_bytes())
            .expect("request");
        assert_eq!(requested_ips(&req).expect_err("bad").code, 7);
    }

    #[test]
    fn resolv_conf() {
        let d = parse_resolv_conf(
            "# c\nnameserver 10.0.0.10\nnameserver fd00::10 # x\ndomain a.local\nsearch b.local c.local\noptions ndots:5 edns0\n",
        );
        assert_eq!(d.nameservers, vec!["10.0.0.10", "fd00::10"]);
        assert_eq!(d.domain.as_deref(), Some("a.local"));
        assert_eq!(d.search, vec!["b.local", "c.local"]);
        assert_eq!(d.options, vec!["ndots:5", "edns0"]);
    }
}
