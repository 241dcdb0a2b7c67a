//! Integration tests of `deckhand-bridge` in real network namespaces (run as root).
//!
//! Everything is named `dh…` and removed also when a test fails (guards with `Drop`); only
//! 10.x/fd00: addresses on bridges and namespaces the tests create are used. Tests that compare
//! host state take a lock so they do not see each other's links.

use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{Value, json};

#[allow(dead_code)]
mod support;

use support::*;

static HOST_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn bridge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_deckhand-bridge"))
}

fn conf(net: &str, br: &str, ipam: Value, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.1.0",
        "name": net,
        "type": "deckhand-bridge",
        "bridge": br,
        "isGateway": true,
        "ipam": ipam,
    });
    if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
        m.extend(e);
    }
    c
}

fn gateway(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i["gateway"].as_str())
        .find(|g| g.contains(':') == v6)
        .expect("gateway")
        .to_string()
}

fn two_pods(subnets: &[&str], families: &[bool]) {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let net = name("n");
    let c = conf(&net, &br.0, host_local(subnets, dir.path()), json!({}));
    let ns1 = Netns::new("p");
    let ns2 = Netns::new("q");
    let mut a1 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns1.path(),
        "eth0",
    );
    let a2 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns2.path(),
        "eth0",
    );
    let res = &a1.result;
    assert_eq!(res["interfaces"][0]["name"], br.0.as_str());
    assert!(
        res["interfaces"][1]["name"]
            .as_str()
            .expect("veth")
            .starts_with("veth")
    );
    assert_eq!(res["interfaces"][2]["sandbox"], ns1.path().as_str());
    for &v6 in families {
        let ip1 = pod_ip(&a1.result, v6).expect("pod 1 address");
        let ip2 = pod_ip(&a2.result, v6).expect("pod 2 address");
        let gw = gateway(&a1.result, v6);
        assert!(ping(Some(&ns1), &ip2), "pod 1 -> pod 2 {ip2}");
        assert!(ping(Some(&ns2), &ip1), "pod 2 -> pod 1 {ip1}");
        assert!(ping(Some(&ns1), &gw), "pod 1 -> gateway {gw}");
        assert!(ping(None, &ip1), "host -> pod 1 {ip1}");
        assert!(ping(None, &ip2), "host -> pod 2 {ip2}");
    }
    a1.check().expect("CHECK on a healthy attachment");
    a2.check().expect("CHECK on a healthy attachment");
    for out in a1.del() {
        assert!(out.ok, "DEL: {}", out.raw);
    }
    let (_, links, _) = ns1.exec(&["ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "eth0 left after DEL: {links}");
    let veth = a1.result["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    assert!(
        !sh("ip", &["link", "show", &veth]).0,
        "host veth {veth} left after DEL"
    );
}

#[test]
fn ipv4_pods_reach_each_other_the_gateway_and_the_host() {
    two_pods(&["10.123.1.0/24"], &[false]);
}

#[test]
fn ipv6_pods_reach_each_other_the_gateway_and_the_host() {
    two_pods(&["fd00:dh::/64".replace("dh", "d4").as_str()], &[true]);
}

#[test]
fn dual_stack_pods_reach_each_other_the_gateway_and_the_host() {
    two_pods(&["10.123.3.0/24", "fd00:d4:3::/64"], &[false, true]);
}

#[test]
fn check_fails_after_the_veth_or_the_address_is_removed() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let c = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.4.0/24"], dir.path()),
        json!({}),
    );
    let ns1 = Netns::new("p");
    let ns2 = Netns::new("q");
    let a1 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns1.path(),
        "eth0",
    );
    let a2 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns2.path(),
        "eth0",
    );
    a1.check().expect("healthy");
    a2.check().expect("healthy");

    let ip = pod_ip(&a1.result, false).expect("ip");
    must(
        "ip",
        &[
            "netns",
            "exec",
            &ns1.name,
            "ip",
            "addr",
            "del",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ],
    );
    let err = a1.check().expect_err("CHECK must fail without the address");
    assert!(err.contains(&ip), "{err}");

    let veth = a2.result["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    must("ip", &["link", "del", &veth]);
    a2.check().expect_err("CHECK must fail without the veth");
}

#[test]
fn del_twice_and_del_with_the_netns_gone_succeed() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let c = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.5.0/24"], dir.path()),
        json!({"ipMasq": true}),
    );
    let ns1 = Netns::new("p");
    let mut a1 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns1.path(),
        "eth0",
    );
    for _ in 0..2 {
        for out in a1.del() {
            assert!(out.ok, "DEL: {}", out.raw);
            assert!(out.raw.trim().is_empty(), "DEL prints nothing: {}", out.raw);
        }
    }

    let ns2 = Netns::new("q");
    let cid = name("c");
    let a2 = Attachment::add(&[(bridge_bin(), c.clone())], &cid, &ns2.path(), "eth0");
    let ip = pod_ip(&a2.result, false).expect("ip");
    let veth = a2.result["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    ns2.delete();
    // The netns is gone (and with it the veth pair); DEL with the stale path and without one.
    for netns in [Some(ns2.path()), None] {
        let out = cni(&bridge_bin(), "DEL", &cid, netns.as_deref(), "eth0", &c);
        assert!(out.ok, "DEL without netns: {}", out.raw);
    }
    // The kernel tears a deleted netns down asynchronously (its veth goes with it): wait.
    let gone_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sh("ip", &["link", "show", &veth]).0 && std::time::Instant::now() < gone_by {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !sh("ip", &["link", "show", &veth]).0,
        "host veth {veth} still there 10 s after its netns was deleted"
    );
    assert!(
        !iptables_snapshot().contains(&ip),
        "masquerade rule for {ip} left"
    );
    // The lease was released: a new ADD can get addresses again, and the dir holds no lease for it.
    let leases = std::fs::read_dir(dir.path())
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    let held: Vec<String> = leases
        .iter()
        .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == &ip)
        .collect();
    assert!(held.is_empty(), "lease of {ip} not released");
    drop(a2);
}

#[test]
fn bad_input_gives_the_spec_error_and_changes_nothing() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let good = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.6.0/24"], dir.path()),
        json!({}),
    );
    let ns = Netns::new("p");
    let nspath = ns.path();
    let before = host_links_and_addrs();
    let fw_before = iptables_snapshot();
    let bin = bridge_bin();
    let base = |extra: &[(&'static str, &str)]| {
        let mut e: Vec<(&str, String)> = vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "dhbad".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_NETNS", nspath.clone()),
        ];
        for (k, v) in extra {
            e.retain(|(x, _)| x != k);
            if !v.is_empty() {
                e.push((k, v.to_string()));
            }
        }
        e
    };
    let call = |env: Vec<(&str, String)>, stdin: &str| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_plugin(&bin, &env, stdin.as_bytes())
    };
    let mut bad_version = good.clone();
    bad_version["cniVersion"] = json!("9.9.9");
    let mut bad_backend = good.clone();
    bad_backend["ipMasq"] = json!(true);
    bad_backend["ipMasqBackend"] = json!("ebtables");
    let mut bad_vlan = good.clone();
    bad_vlan["vlan"] = json!(5000);
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String, u64);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            base(&[]),
            "{\"cniVersion\": \"1.1.0\", ".into(),
            6,
        ),
        ("unknown cniVersion", base(&[]), bad_version.to_string(), 1),
        (
            "missing CNI_NETNS",
            base(&[("CNI_NETNS", "")]),
            good.to_string(),
            4,
        ),
        (
            "missing CNI_CONTAINERID",
            base(&[("CNI_CONTAINERID", "")]),
            good.to_string(),
            4,
        ),
        (
            "missing CNI_IFNAME",
            base(&[("CNI_IFNAME", "")]),
            good.to_string(),
            4,
        ),
        (
            "nonexistent netns",
            base(&[("CNI_NETNS", "/run/netns/dh-no-such-ns")]),
            good.to_string(),
            4,
        ),
        (
            "netns path is not a netns",
            base(&[("CNI_NETNS", "/etc/hostname")]),
            good.to_string(),
            4,
        ),
        (
            "unknown ipMasqBackend",
            base(&[]),
            bad_backend.to_string(),
            7,
        ),
        ("VLAN out of range", base(&[]), bad_vlan.to_string(), 7),
    ];
    for (what, env, stdin, code) in cases {
        let out = call(env, &stdin);
        assert!(!out.ok, "{what}: must fail");
        assert_eq!(out.code(), code, "{what}: {}", out.raw);
        assert!(
            !out.json["msg"].as_str().unwrap_or_default().is_empty(),
            "{what}: no msg"
        );
    }
    assert_eq!(
        before,
        host_links_and_addrs(),
        "bad input changed links or addresses"
    );
    assert_eq!(
        fw_before,
        iptables_snapshot(),
        "bad input changed the firewall"
    );
    assert!(
        !sh("ip", &["link", "show", &br.0]).0,
        "bridge created on bad input"
    );
    let (_, links, _) = ns.exec(&["ip", "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "container netns changed: {links}");
    let leases = std::fs::read_dir(dir.path())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leases, 0, "IPAM was called on bad input");
}

#[test]
fn an_existing_container_interface_fails_without_releasing_the_first_lease() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let c = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.7.0/24"], dir.path()),
        json!({}),
    );
    let ns = Netns::new("p");
    let a = Attachment::add(&[(bridge_bin(), c.clone())], &name("c"), &ns.path(), "eth0");
    let out = cni(&bridge_bin(), "ADD", &a.cid, Some(&ns.path()), "eth0", &c);
    assert!(!out.ok);
    assert!(out.raw.contains("already exists"), "{}", out.raw);
    a.check().expect("the first attachment is untouched");
}

fn masq_follows_attachment(backend: &str) {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let net = name("n");
    let c = conf(
        &net,
        &br.0,
        host_local(&["10.123.8.0/24", "fd00:d4:8::/64"], dir.path()),
        json!({"ipMasq": true, "ipMasqBackend": backend, "isDefaultGateway": true}),
    );
    let before = (iptables_snapshot(), nft_snapshot());
    let ns = Netns::new("p");
    let mut a = Attachment::add(&[(bridge_bin(), c.clone())], &name("c"), &ns.path(), "eth0");
    let ip = pod_ip(&a.result, false).expect("ip");
    let ip6 = pod_ip(&a.result, true).expect("ip6");
    let fw = format!("{}{}", iptables_snapshot(), nft_snapshot());
    assert!(
        fw.contains(&ip) && fw.contains(&ip6),
        "masquerade rules missing:\n{fw}"
    );
    assert!(fw.contains(&a.cid), "rules carry the container id");
    // The default routes point at the gateways.
    let (_, routes, _) = ns.exec(&["ip", "route"]);
    assert!(routes.contains("default via 10.123.8.1"), "{routes}");
    a.check().expect("CHECK");
    for out in a.del() {
        assert!(out.ok, "{}", out.raw);
    }
    assert_eq!(
        before,
        (iptables_snapshot(), nft_snapshot()),
        "DEL left firewall changes"
    );

    // GC removes the rules of attachments the runtime no longer knows.
    let mut b = Attachment::add(&[(bridge_bin(), c.clone())], &name("c"), &ns.path(), "eth0");
    let mut gc_conf = c.clone();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let out = run_plugin(
        &bridge_bin(),
        &[("CNI_COMMAND", "GC")],
        gc_conf.to_string().as_bytes(),
    );
    assert!(out.ok, "GC: {}", out.raw);
    assert_eq!(
        before,
        (iptables_snapshot(), nft_snapshot()),
        "GC left firewall changes"
    );
    b.del();
}

#[test]
fn ip_masq_iptables_rules_follow_the_attachment() {
    masq_follows_attachment("iptables");
}

#[test]
fn ip_masq_nftables_rules_follow_the_attachment() {
    masq_follows_attachment("nftables");
}

#[test]
fn status_and_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = conf(
        "dhstatus",
        "dhnobridge",
        host_local(&["10.123.9.0/24"], dir.path()),
        json!({}),
    );
    let out = run_plugin(
        &bridge_bin(),
        &[("CNI_COMMAND", "STATUS")],
        c.to_string().as_bytes(),
    );
    assert!(out.ok, "STATUS: {}", out.raw);
    let out = run_plugin(
        &bridge_bin(),
        &[("CNI_COMMAND", "VERSION")],
        b"{\"cniVersion\":\"1.0.0\"}",
    );
    assert!(out.ok);
    assert!(
        out.json["supportedVersions"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
    );
}

#[test]
fn mtu_and_mac_spoof_check() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let c = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.10.0/24"], dir.path()),
        json!({"mtu": 1400, "macspoofchk": true}),
    );
    let before = (iptables_snapshot(), nft_snapshot());
    let ns1 = Netns::new("p");
    let ns2 = Netns::new("q");
    let mut a1 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns1.path(),
        "eth0",
    );
    let mut a2 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns2.path(),
        "eth0",
    );
    let veth = a1.result["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    let (_, l, _) = ns1.exec(&["ip", "-o", "link", "show", "eth0"]);
    assert!(l.contains("mtu 1400"), "{l}");
    assert!(must("ip", &["-o", "link", "show", &veth]).contains("mtu 1400"));
    assert!(must("ip", &["-o", "link", "show", &br.0]).contains("mtu 1400"));
    let ip2 = pod_ip(&a2.result, false).expect("ip");
    assert!(ping(Some(&ns1), &ip2), "pods reach each other");
    a1.check().expect("CHECK");

    // A spoofed source MAC is dropped at the bridge.
    must(
        "ip",
        &["netns", "exec", &ns1.name, "ip", "neigh", "flush", "all"],
    );
    must(
        "ip",
        &[
            "netns",
            "exec",
            &ns1.name,
            "ip",
            "link",
            "set",
            "eth0",
            "address",
            "02:00:00:dd:ee:01",
        ],
    );
    assert!(!ping(Some(&ns1), &ip2), "spoofed MAC must be dropped");

    for out in a1.del().into_iter().chain(a2.del()) {
        assert!(out.ok, "{}", out.raw);
    }
    assert_eq!(
        before,
        (iptables_snapshot(), nft_snapshot()),
        "DEL left firewall changes"
    );
}

/// VLAN filtering needs CONFIG_BRIDGE_VLAN_FILTERING. Where the kernel has it, the port gets the
/// VLAN as untagged PVID and pods on it reach each other; where it does not, ADD fails with the
/// kernel's error and leaves no bridge behind.
#[test]
fn vlan_tags_the_port_or_fails_cleanly() {
    let _l = lock();
    let probe = name("v");
    let supported = sh(
        "ip",
        &[
            "link",
            "add",
            &probe,
            "type",
            "bridge",
            "vlan_filtering",
            "1",
        ],
    )
    .0;
    let _ = sh("ip", &["link", "del", &probe]);
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let c = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.11.0/24"], dir.path()),
        json!({"vlan": 100}),
    );
    let ns1 = Netns::new("p");
    if !supported {
        let out = cni(
            &bridge_bin(),
            "ADD",
            &name("c"),
            Some(&ns1.path()),
            "eth0",
            &c,
        );
        assert!(!out.ok);
        assert!(out.raw.contains("not supported"), "{}", out.raw);
        assert!(
            !sh("ip", &["link", "show", &br.0]).0,
            "no bridge left behind"
        );
        let (_, links, _) = ns1.exec(&["ip", "-o", "link"]);
        assert_eq!(links.lines().count(), 1, "container netns changed: {links}");
        return;
    }
    let ns2 = Netns::new("q");
    let a1 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns1.path(),
        "eth0",
    );
    let a2 = Attachment::add(
        &[(bridge_bin(), c.clone())],
        &name("c"),
        &ns2.path(),
        "eth0",
    );
    let veth = a1.result["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    let vlans = must("bridge", &["vlan", "show", "dev", &veth]);
    assert!(vlans.contains("100 PVID Egress Untagged"), "{vlans}");
    let ip2 = pod_ip(&a2.result, false).expect("ip");
    assert!(ping(Some(&ns1), &ip2), "same VLAN pods reach each other");
}

#[test]
fn force_address_replaces_a_different_gateway_address() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let net = name("n");
    let first = conf(
        &net,
        &br.0,
        host_local(&["10.123.12.0/24"], dir.path()),
        json!({}),
    );
    let ns1 = Netns::new("p");
    let _a1 = Attachment::add(&[(bridge_bin(), first)], &name("c"), &ns1.path(), "eth0");
    assert!(must("ip", &["-o", "addr", "show", "dev", &br.0]).contains("10.123.12.1/24"));

    let dir2 = tempfile::tempdir().expect("tempdir");
    let other = conf(
        &net,
        &br.0,
        host_local(&["10.123.13.0/24"], dir2.path()),
        json!({}),
    );
    let ns2 = Netns::new("q");
    let out = cni(
        &bridge_bin(),
        "ADD",
        &name("c"),
        Some(&ns2.path()),
        "eth0",
        &other,
    );
    assert!(!out.ok);
    assert!(out.raw.contains("already has an IP address"), "{}", out.raw);
    let (_, links, _) = ns2.exec(&["ip", "-o", "link"]);
    assert_eq!(
        links.lines().count(),
        1,
        "failed ADD left an interface: {links}"
    );

    let mut forced = other.clone();
    forced["forceAddress"] = json!(true);
    let _a2 = Attachment::add(&[(bridge_bin(), forced)], &name("c"), &ns2.path(), "eth0");
    let addrs = must("ip", &["-o", "addr", "show", "dev", &br.0]);
    assert!(
        addrs.contains("10.123.13.1/24") && !addrs.contains("10.123.12.1/24"),
        "{addrs}"
    );
}

#[test]
fn parallel_adds_and_dels_on_one_bridge() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let br = HostLink(name("b"));
    let c = conf(
        &name("n"),
        &br.0,
        host_local(&["10.123.14.0/24"], dir.path()),
        json!({"ipMasq": true}),
    );
    let before = iptables_snapshot();
    let nss: Vec<Netns> = (0..8).map(|_| Netns::new("p")).collect();
    let cids: Vec<String> = (0..8).map(|_| name("c")).collect();
    // DEL everything on the way out, also when an assertion fails.
    struct Cleanup<'a>(&'a Value, Vec<(String, String)>);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for (cid, ns) in &self.1 {
                let _ = cni(&bridge_bin(), "DEL", cid, Some(ns), "eth0", self.0);
            }
        }
    }
    let _cleanup = Cleanup(
        &c,
        cids.iter()
            .cloned()
            .zip(nss.iter().map(Netns::path))
            .collect(),
    );
    let results: Vec<Out> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .zip(&cids)
            .map(|(ns, cid)| {
                let c = &c;
                s.spawn(move || cni(&bridge_bin(), "ADD", cid, Some(&ns.path()), "eth0", c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut ips: Vec<String> = results
        .iter()
        .map(|o| {
            assert!(o.ok, "parallel ADD: {}", o.raw);
            pod_ip(&o.json, false).expect("ip")
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "distinct addresses");
    assert!(ping(Some(&nss[0]), &ips[7]));
    let dels: Vec<Out> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .zip(&cids)
            .map(|(ns, cid)| {
                let c = &c;
                s.spawn(move || cni(&bridge_bin(), "DEL", cid, Some(&ns.path()), "eth0", c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for o in dels {
        assert!(o.ok, "parallel DEL: {}", o.raw);
    }
    assert_eq!(before, iptables_snapshot(), "parallel DELs left rules");
}
