//! Integration tests of `deckhand-portmap` chained after `deckhand-bridge`, in real network
//! namespaces (run as root): a busybox httpd and a UDP echo inside a pod answer on their host
//! ports from another "host" (a namespace routed through the node), from the node's 127.0.0.1
//! and from the pod itself (hairpin); the firewall is the same before ADD and after DEL.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use deckhand_cni::netns::NetNs;
use serde_json::{Value, json};

#[allow(dead_code)]
mod support;

use support::*;

static HOST_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn bin(name: &str) -> PathBuf {
    support::our_dir().join(name)
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace standing for another host: a veth pair `dh…` to the node with a /30 and a
/// default route through the node.
struct OtherHost {
    ns: Netns,
    _link: HostLink,
    node_ip: String,
}

fn other_host(octet: u8) -> OtherHost {
    let ns = Netns::new("x");
    let link = HostLink(name("e"));
    must(
        "ip",
        &[
            "link", "add", &link.0, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ],
    );
    let node_ip = format!("10.126.{octet}.1");
    must(
        "ip",
        &["addr", "add", &format!("{node_ip}/30"), "dev", &link.0],
    );
    must("ip", &["link", "set", &link.0, "up"]);
    let (ok, _, e) = ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.126.{octet}.2/30"),
        "dev",
        "eth0",
    ]);
    assert!(ok, "{e}");
    assert!(ns.exec(&["ip", "link", "set", "eth0", "up"]).0);
    assert!(
        ns.exec(&["ip", "route", "add", "default", "via", &node_ip])
            .0
    );
    OtherHost {
        ns,
        _link: link,
        node_ip,
    }
}

/// An HTTP GET with busybox nc (from `ns`, or the host); returns the body-containing response.
fn http_get(ns: Option<&Netns>, ip: &str, port: u16) -> String {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 {ip} {port}");
    for _ in 0..20 {
        let (ok, out, _) = match ns {
            Some(n) => n.exec(&["sh", "-c", &script]),
            None => sh("sh", &["-c", &script]),
        };
        if ok && out.contains("200 OK") {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    String::new()
}

/// Sends one UDP datagram from `client` to `ip:port` and waits for the echo of a server bound in
/// `server` on `server_port`.
fn udp_round_trip(server: &str, server_port: u16, client: &str, ip: &str, port: u16) -> bool {
    let server_ns = NetNs::open(server).expect("server netns");
    let client_ns = NetNs::open(client).expect("client netns");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            server_ns
                .run(move || -> Option<()> {
                    let sock = std::net::UdpSocket::bind(("0.0.0.0", server_port)).ok()?;
                    sock.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                    let _ = ready_tx.send(());
                    let mut buf = [0u8; 64];
                    let (n, from) = sock.recv_from(&mut buf).ok()?;
                    sock.send_to(&buf[..n], from).ok()?;
                    Some(())
                })
                .ok()
                .flatten()
        });
        if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
            return false;
        }
        let got = client_ns
            .run(|| -> Option<Vec<u8>> {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
                sock.set_read_timeout(Some(Duration::from_millis(500)))
                    .ok()?;
                let mut buf = [0u8; 64];
                for _ in 0..6 {
                    sock.send_to(b"dh-udp", (ip, port)).ok()?;
                    if let Ok((n, _)) = sock.recv_from(&mut buf) {
                        return Some(buf[..n].to_vec());
                    }
                }
                None
            })
            .ok()
            .flatten();
        let _ = srv.join();
        got.as_deref() == Some(b"dh-udp".as_slice())
    })
}

fn portmap_end_to_end(backend: &str, octet: u8, host_port: u16) {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), format!("dh-hello-{backend}")).expect("index");
    let br = HostLink(name("b"));
    let net = name("n");
    let ext = other_host(octet);
    let pod = Netns::new("p");
    let bridge_conf = json!({
        "cniVersion": "1.1.0", "name": net, "type": "deckhand-bridge", "bridge": br.0,
        "isDefaultGateway": true, "hairpinMode": true,
        "ipam": host_local(&[&format!("10.125.{octet}.0/24")], dir.path()),
    });
    let pm_conf = json!({
        "cniVersion": "1.1.0", "name": net, "type": "deckhand-portmap", "backend": backend,
        "runtimeConfig": {"portMappings": [
            {"hostPort": host_port, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": host_port + 1, "containerPort": 81, "protocol": "udp"},
        ]},
    });
    let before = (iptables_snapshot(), nft_snapshot());
    let mut att = Attachment::add(
        &[
            (bin("deckhand-bridge"), bridge_conf),
            (bin("deckhand-portmap"), pm_conf),
        ],
        &name("c"),
        &pod.path(),
        "eth0",
    );
    let gw = format!("10.125.{octet}.1");
    let _httpd = Proc(
        Command::new("ip")
            .args([
                "netns", "exec", &pod.name, "busybox", "httpd", "-f", "-p", "80", "-h",
            ])
            .arg(www.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("httpd"),
    );
    let want = format!("dh-hello-{backend}");
    let r = http_get(Some(&ext.ns), &ext.node_ip, host_port);
    assert!(r.contains(&want), "from another host: {r:?}");
    let r = http_get(None, "127.0.0.1", host_port);
    assert!(r.contains(&want), "from 127.0.0.1: {r:?}");
    let r = http_get(Some(&pod), &gw, host_port);
    assert!(r.contains(&want), "hairpin: {r:?}");
    assert!(
        udp_round_trip(&pod.path(), 81, &ext.ns.path(), &ext.node_ip, host_port + 1),
        "UDP from another host"
    );
    att.check().expect("CHECK");

    for out in att.del() {
        assert!(out.ok, "DEL: {}", out.raw);
    }
    assert_eq!(
        before,
        (iptables_snapshot(), nft_snapshot()),
        "DEL did not restore the firewall"
    );
    assert!(
        http_get(None, "127.0.0.1", host_port).is_empty(),
        "port still mapped after DEL"
    );
    // DEL again is fine and changes nothing.
    for out in att.del() {
        assert!(out.ok, "second DEL: {}", out.raw);
    }
}

#[test]
fn iptables_host_ports_answer_from_other_hosts_localhost_and_hairpin() {
    portmap_end_to_end("iptables", 1, 38080);
}

#[test]
fn nftables_host_ports_answer_from_other_hosts_localhost_and_hairpin() {
    portmap_end_to_end("nftables", 2, 38090);
}

#[test]
fn check_fails_when_the_rules_are_gone_and_bad_config_is_refused() {
    let _l = lock();
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "dhnobr"}, {"name": "eth0", "sandbox": "/run/netns/dhnone"}],
        "ips": [{"address": "10.125.9.5/24", "interface": 1}],
    });
    for backend in ["iptables", "nftables"] {
        let conf = json!({
            "cniVersion": "1.1.0", "name": "dhpmcheck", "type": "deckhand-portmap", "backend": backend,
            "runtimeConfig": {"portMappings": [{"hostPort": 38099, "containerPort": 80, "protocol": "tcp"}]},
            "prevResult": prev,
        });
        let ns = Netns::new("p");
        let out = cni(
            &bin("deckhand-portmap"),
            "CHECK",
            "dhpmc",
            Some(&ns.path()),
            "eth0",
            &conf,
        );
        assert!(!out.ok, "CHECK without rules must fail ({backend})");
    }
    let before = (iptables_snapshot(), nft_snapshot());
    let ns = Netns::new("p");
    let bad: Vec<(Value, u64)> = vec![
        (
            json!({"cniVersion": "1.1.0", "name": "n", "type": "deckhand-portmap", "backend": "pf",
                "runtimeConfig": {"portMappings": [{"hostPort": 1, "containerPort": 2}]}, "prevResult": prev}),
            7,
        ),
        (
            json!({"cniVersion": "1.1.0", "name": "n", "type": "deckhand-portmap",
                "runtimeConfig": {"portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "icmp"}]}, "prevResult": prev}),
            7,
        ),
        (
            json!({"cniVersion": "1.1.0", "name": "n", "type": "deckhand-portmap", "markMasqBit": 40,
                "runtimeConfig": {"portMappings": [{"hostPort": 1, "containerPort": 2}]}, "prevResult": prev}),
            7,
        ),
        (
            json!({"cniVersion": "1.1.0", "name": "n", "type": "deckhand-portmap",
                "runtimeConfig": {"portMappings": [{"hostPort": 1, "containerPort": 2}]}}),
            7,
        ),
    ];
    for (conf, code) in bad {
        let out = cni(
            &bin("deckhand-portmap"),
            "ADD",
            "dhpmbad",
            Some(&ns.path()),
            "eth0",
            &conf,
        );
        assert!(!out.ok);
        assert_eq!(out.code(), code, "{}", out.raw);
    }
    assert_eq!(
        before,
        (iptables_snapshot(), nft_snapshot()),
        "bad config changed the firewall"
    );
}

#[test]
fn dual_stack_host_ports_over_ipv6_from_other_hosts_and_hairpin() {
    let _l = lock();
    for (i, backend) in ["iptables", "nftables"].into_iter().enumerate() {
        let octet = 3 + u8::try_from(i).expect("small");
        let host_port = 38100 + 10 * u16::from(octet);
        let dir = tempfile::tempdir().expect("tempdir");
        let www = tempfile::tempdir().expect("www");
        std::fs::write(www.path().join("index.html"), format!("dh-v6-{backend}")).expect("index");
        let br = HostLink(name("b"));
        let net = name("n");
        let ext = other_host(octet);
        let node6 = format!("fd00:d4:e{octet}::1");
        let ext_link = ext._link.0.clone();
        must(
            "ip",
            &[
                "addr",
                "add",
                &format!("{node6}/64"),
                "dev",
                &ext_link,
                "nodad",
            ],
        );
        assert!(
            ext.ns
                .exec(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("fd00:d4:e{octet}::2/64"),
                    "dev",
                    "eth0",
                    "nodad"
                ])
                .0
        );
        assert!(
            ext.ns
                .exec(&["ip", "-6", "route", "add", "default", "via", &node6])
                .0
        );
        let pod = Netns::new("p");
        let bridge_conf = json!({
            "cniVersion": "1.1.0", "name": net, "type": "deckhand-bridge", "bridge": br.0,
            "isDefaultGateway": true, "hairpinMode": true,
            "ipam": host_local(&[&format!("10.125.{octet}.0/24"), &format!("fd00:d4:{octet}::/64")], dir.path()),
        });
        let pm_conf = json!({
            "cniVersion": "1.1.0", "name": net, "type": "deckhand-portmap", "backend": backend,
            "runtimeConfig": {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]},
        });
        let before = (iptables_snapshot(), nft_snapshot());
        let mut att = Attachment::add(
            &[
                (bin("deckhand-bridge"), bridge_conf),
                (bin("deckhand-portmap"), pm_conf),
            ],
            &name("c"),
            &pod.path(),
            "eth0",
        );
        let _httpd = Proc(
            Command::new("ip")
                .args([
                    "netns", "exec", &pod.name, "busybox", "httpd", "-f", "-p", "[::]:80", "-h",
                ])
                .arg(www.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("httpd"),
        );
        let want = format!("dh-v6-{backend}");
        let r = http_get(Some(&ext.ns), &node6, host_port);
        assert!(
            r.contains(&want),
            "{backend}: IPv6 from another host: {r:?}"
        );
        let r = http_get(Some(&ext.ns), &ext.node_ip, host_port);
        assert!(
            r.contains(&want),
            "{backend}: IPv4 from another host: {r:?}"
        );
        let gw6 = format!("fd00:d4:{octet}::1");
        let r = http_get(Some(&pod), &gw6, host_port);
        assert!(r.contains(&want), "{backend}: IPv6 hairpin: {r:?}");
        att.check().expect("CHECK");
        for out in att.del() {
            assert!(out.ok, "DEL: {}", out.raw);
        }
        assert_eq!(
            before,
            (iptables_snapshot(), nft_snapshot()),
            "{backend}: DEL did not restore the firewall"
        );
    }
}

#[test]
fn gc_removes_the_rules_of_attachments_the_runtime_no_longer_has() {
    let _l = lock();
    for (i, backend) in ["iptables", "nftables"].into_iter().enumerate() {
        let octet = 7 + u8::try_from(i).expect("small");
        let dir = tempfile::tempdir().expect("tempdir");
        let br = HostLink(name("b"));
        let net = name("n");
        let pod = Netns::new("p");
        let pm_conf = json!({
            "cniVersion": "1.1.0", "name": net, "type": "deckhand-portmap", "backend": backend,
            "runtimeConfig": {"portMappings": [{"hostPort": 38150 + u16::from(octet), "containerPort": 80}]},
        });
        let before = (iptables_snapshot(), nft_snapshot());
        let mut att = Attachment::add(
            &[
                (
                    bin("deckhand-bridge"),
                    json!({"cniVersion": "1.1.0", "name": net, "type": "deckhand-bridge", "bridge": br.0,
                           "isGateway": true, "ipam": host_local(&[&format!("10.125.{octet}.0/24")], dir.path())}),
                ),
                (bin("deckhand-portmap"), pm_conf.clone()),
            ],
            &name("c"),
            &pod.path(),
            "eth0",
        );
        assert_ne!(
            before,
            (iptables_snapshot(), nft_snapshot()),
            "{backend}: rules installed"
        );
        let mut keep_other = pm_conf.clone();
        keep_other["cni.dev/valid-attachments"] =
            json!([{"containerID": "dhother", "ifname": "eth0"}]);
        let out = run_plugin(
            &bin("deckhand-portmap"),
            &[("CNI_COMMAND", "GC")],
            keep_other.to_string().as_bytes(),
        );
        assert!(out.ok, "GC: {}", out.raw);
        assert_eq!(
            before,
            (iptables_snapshot(), nft_snapshot()),
            "{backend}: GC removed the stale rules"
        );
        for out in att.del() {
            assert!(out.ok, "DEL after GC: {}", out.raw);
        }
    }
}
