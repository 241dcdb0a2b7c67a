//! Interoperability with the reference plugins (containernetworking/plugins in /usr/lib/cni):
//! our bridge followed by the reference portmap, bandwidth and tuning in one chain, and the
//! reference bridge followed by our portmap. The chains are executed by hand, passing each
//! plugin's result as the next one's `prevResult`, as a runtime does.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

#[allow(dead_code)]
mod support;

use support::*;

static HOST_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn ours(name: &str) -> PathBuf {
    support::our_dir().join(name)
}

fn reference(name: &str) -> PathBuf {
    PathBuf::from("/usr/lib/cni").join(name)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn httpd(ns: &Netns, root: &std::path::Path) -> Proc {
    Proc(
        Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "busybox", "httpd", "-f", "-p", "80", "-h",
            ])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("httpd"),
    )
}

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

/// Removes the reference portmap's shared top-level chains when they did not exist before the
/// test (the reference plugin never removes them itself).
struct RefPortmapChains {
    existed: bool,
}

impl RefPortmapChains {
    fn new() -> Self {
        RefPortmapChains {
            existed: iptables_snapshot().contains("CNI-HOSTPORT"),
        }
    }
}

impl Drop for RefPortmapChains {
    fn drop(&mut self) {
        if self.existed {
            return;
        }
        for (cmd, restore) in [
            ("iptables-save", "iptables-restore"),
            ("ip6tables-save", "ip6tables-restore"),
        ] {
            let (_, saved, _) = sh(cmd, &["-t", "nat"]);
            let mut script = String::from("*nat\n");
            let mut chains = Vec::new();
            for l in saved.lines() {
                if let Some(c) = l
                    .strip_prefix(':')
                    .and_then(|c| c.split_whitespace().next())
                    && c.starts_with("CNI-HOSTPORT-")
                {
                    chains.push(c.to_string());
                }
            }
            if chains.is_empty() {
                continue;
            }
            for l in saved.lines() {
                if let Some(rule) = l.strip_prefix("-A ")
                    && chains.iter().any(|c| rule.ends_with(&format!("-j {c}")))
                    && !chains.iter().any(|c| rule.starts_with(&format!("{c} ")))
                {
                    script.push_str(&format!("-D {rule}\n"));
                }
            }
            for c in &chains {
                script.push_str(&format!("-F {c}\n-X {c}\n"));
            }
            script.push_str("COMMIT\n");
            let mut child = Command::new(restore)
                .arg("--noflush")
                .stdin(Stdio::piped())
                .spawn()
                .expect("restore");
            if let Some(mut w) = child.stdin.take() {
                use std::io::Write;
                let _ = w.write_all(script.as_bytes());
            }
            let _ = child.wait();
        }
    }
}

#[test]
fn our_bridge_then_reference_portmap_bandwidth_and_tuning() {
    let _l = lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), "dh-interop-1").expect("index");
    let _ref_chains = RefPortmapChains::new();
    let br = HostLink(name("b"));
    let net = name("n");
    let pod = Netns::new("p");
    let v = "1.0.0";
    let chain = vec![
        (
            ours("deckhand-bridge"),
            json!({"cniVersion": v, "name": net, "type": "deckhand-bridge", "bridge": br.0,
                   "isDefaultGateway": true, "hairpinMode": true,
                   "ipam": host_local(&["10.127.1.0/24"], dir.path())}),
        ),
        (
            reference("portmap"),
            json!({"cniVersion": v, "name": net, "type": "portmap", "snat": true,
                   "runtimeConfig": {"portMappings": [{"hostPort": 38280, "containerPort": 80, "protocol": "tcp"}]}}),
        ),
        (
            reference("bandwidth"),
            json!({"cniVersion": v, "name": net, "type": "bandwidth",
                   "runtimeConfig": {"bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
                                                   "egressRate": 100_000_000, "egressBurst": 1_000_000}}}),
        ),
        (
            reference("tuning"),
            json!({"cniVersion": v, "name": net, "type": "tuning",
                   "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"}}),
        ),
    ];
    let mut att = Attachment::add(&chain, &name("c"), &pod.path(), "eth0");
    assert_eq!(att.result["cniVersion"], v);
    let veth = att.result["interfaces"][1]["name"]
        .as_str()
        .expect("veth")
        .to_string();
    let _srv = httpd(&pod, www.path());
    assert!(
        http_get(None, "127.0.0.1", 38280).contains("dh-interop-1"),
        "reference portmap to our pod"
    );
    assert!(
        http_get(Some(&pod), "10.127.1.1", 38280).contains("dh-interop-1"),
        "hairpin"
    );
    let (_, qd, _) = sh("tc", &["qdisc", "show", "dev", &veth]);
    assert!(qd.contains("tbf"), "bandwidth shaped the host veth: {qd}");
    let (_, rp, _) = pod.exec(&["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]);
    assert_eq!(rp.trim(), "2", "tuning set the sysctl in the pod");
    // CHECK through the chain, except the reference portmap: its 1.1 CHECK also looks for an
    // IPv6 chain it never creates for an IPv4-only pod, and fails the same way after the
    // reference bridge.
    for (bin, conf) in &att.plugins {
        if *bin == reference("portmap") {
            continue;
        }
        let out = cni(
            bin,
            "CHECK",
            &att.cid,
            Some(&att.netns),
            "eth0",
            &with_prev(conf, &att.result),
        );
        assert!(out.ok, "CHECK {}: {}", bin.display(), out.raw);
    }
    for out in att.del() {
        assert!(out.ok, "DEL: {} {}", out.raw, out.stderr);
    }
    assert!(!sh("ip", &["link", "show", &veth]).0);
}

#[test]
fn reference_bridge_then_our_portmap() {
    let _l = lock();
    for (i, backend) in ["iptables", "nftables"].into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let www = tempfile::tempdir().expect("www");
        std::fs::write(
            www.path().join("index.html"),
            format!("dh-interop-{backend}"),
        )
        .expect("index");
        let br = HostLink(name("b"));
        let net = name("n");
        let pod = Netns::new("p");
        let subnet = format!("10.127.{}.0/24", 10 + i);
        let gw = format!("10.127.{}.1", 10 + i);
        let port = 38290 + u16::try_from(i).expect("small");
        let before = (iptables_snapshot(), nft_snapshot());
        let chain = vec![
            (
                reference("bridge"),
                json!({"cniVersion": "1.0.0", "name": net, "type": "bridge", "bridge": br.0,
                       "isDefaultGateway": true, "hairpinMode": true,
                       "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                                "dataDir": dir.path().display().to_string()}}),
            ),
            (
                ours("deckhand-portmap"),
                json!({"cniVersion": "1.0.0", "name": net, "type": "deckhand-portmap", "backend": backend,
                       "runtimeConfig": {"portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}]}}),
            ),
        ];
        let mut att = Attachment::add(&chain, &name("c"), &pod.path(), "eth0");
        let _srv = httpd(&pod, www.path());
        let want = format!("dh-interop-{backend}");
        assert!(
            http_get(None, "127.0.0.1", port).contains(&want),
            "{backend}: localhost"
        );
        assert!(
            http_get(Some(&pod), &gw, port).contains(&want),
            "{backend}: hairpin"
        );
        att.check().expect("CHECK");
        for out in att.del() {
            assert!(out.ok, "DEL: {} {}", out.raw, out.stderr);
        }
        assert_eq!(
            before,
            (iptables_snapshot(), nft_snapshot()),
            "{backend}: DEL restored the firewall"
        );
    }
}
