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

/// Test support: namespaces, links and plugin runs, all named `dh…` and removed on drop.
#[allow(dead_code)]
mod support {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    use serde_json::Value;

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A unique `dh…` name of at most 15 characters.
    pub fn name(tag: &str) -> String {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        format!("dh{tag}{:04x}{n}", std::process::id() & 0xffff)
    }

    /// Runs a command, returning (success, stdout, stderr).
    pub fn sh(cmd: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn must(cmd: &str, args: &[&str]) -> String {
        let (ok, out, err) = sh(cmd, args);
        assert!(ok, "{cmd} {args:?} failed: {err}");
        out
    }

    /// A network namespace under /run/netns, deleted on drop.
    pub struct Netns {
        pub name: String,
    }

    impl Netns {
        pub fn new(tag: &str) -> Netns {
            let name = name(tag);
            must("ip", &["netns", "add", &name]);
            must(
                "ip",
                &["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
            );
            Netns { name }
        }
        pub fn path(&self) -> String {
            format!("/run/netns/{}", self.name)
        }
        /// Runs a command inside the namespace.
        pub fn exec(&self, args: &[&str]) -> (bool, String, String) {
            let mut a = vec!["netns", "exec", &self.name];
            a.extend_from_slice(args);
            sh("ip", &a)
        }
        /// Deletes the namespace now (idempotent).
        pub fn delete(&self) {
            let _ = sh("ip", &["netns", "del", &self.name]);
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            self.delete();
        }
    }

    /// A host link deleted on drop (the bridge a test uses).
    pub struct HostLink(pub String);

    impl Drop for HostLink {
        fn drop(&mut self) {
            let _ = sh("ip", &["link", "del", &self.0]);
        }
    }

    /// The directory of our plugin binaries.
    pub fn our_dir() -> PathBuf {
        Path::new(env!("CARGO_BIN_EXE_deckhand-bridge"))
            .parent()
            .expect("bin dir")
            .to_path_buf()
    }

    /// CNI_PATH with our binaries and the reference plugins.
    pub fn cni_path() -> String {
        format!("{}:/usr/lib/cni", our_dir().display())
    }

    /// What a plugin run returned.
    #[derive(Debug)]
    pub struct Out {
        pub ok: bool,
        pub json: Value,
        pub raw: String,
        pub stderr: String,
    }

    impl Out {
        pub fn code(&self) -> u64 {
            self.json["code"].as_u64().unwrap_or(0)
        }
    }

    /// Runs a plugin binary with `env` (CNI_PATH added unless given) and `stdin`.
    pub fn run_plugin(bin: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Out {
        use std::io::Write;
        let mut c = Command::new(bin);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !env.iter().any(|(k, _)| *k == "CNI_PATH") {
            c.env("CNI_PATH", cni_path());
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn plugin");
        if let Some(mut w) = child.stdin.take() {
            let _ = w.write_all(stdin);
        }
        let out = child.wait_with_output().expect("plugin output");
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {raw:?}"))
        };
        Out {
            ok: out.status.success(),
            json,
            raw,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// One CNI call: command, container id, netns path (or none), ifname.
    pub fn cni(
        bin: &Path,
        cmd: &str,
        cid: &str,
        netns: Option<&str>,
        ifname: &str,
        conf: &Value,
    ) -> Out {
        let mut env = vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", ifname),
        ];
        if let Some(n) = netns {
            env.push(("CNI_NETNS", n));
        }
        run_plugin(bin, &env, conf.to_string().as_bytes())
    }

    /// `conf` with `prevResult` set.
    pub fn with_prev(conf: &Value, prev: &Value) -> Value {
        let mut c = conf.clone();
        c["prevResult"] = prev.clone();
        c
    }

    /// An attachment made with ADD; DEL (in reverse plugin order) runs on drop unless done.
    pub struct Attachment {
        /// (binary, config with prevResult) per plugin, in chain order.
        pub plugins: Vec<(PathBuf, Value)>,
        pub cid: String,
        pub netns: String,
        pub ifname: String,
        pub result: Value,
        pub deleted: bool,
    }

    impl Attachment {
        /// ADD through a chain of (binary, config); panics with the plugin's error on failure.
        pub fn add(chain: &[(PathBuf, Value)], cid: &str, netns: &str, ifname: &str) -> Attachment {
            let mut att = Attachment {
                plugins: Vec::new(),
                cid: cid.to_string(),
                netns: netns.to_string(),
                ifname: ifname.to_string(),
                result: Value::Null,
                deleted: false,
            };
            for (bin, conf) in chain {
                let conf = if att.result.is_null() {
                    conf.clone()
                } else {
                    with_prev(conf, &att.result)
                };
                let out = cni(bin, "ADD", cid, Some(netns), ifname, &conf);
                att.plugins.push((bin.clone(), conf));
                assert!(
                    out.ok,
                    "ADD {} failed: {} {}",
                    bin.display(),
                    out.raw,
                    out.stderr
                );
                att.result = out.json;
            }
            att
        }

        /// CHECK through the chain with the final result as prevResult.
        pub fn check(&self) -> Result<(), String> {
            for (bin, conf) in &self.plugins {
                let out = cni(
                    bin,
                    "CHECK",
                    &self.cid,
                    Some(&self.netns),
                    &self.ifname,
                    &with_prev(conf, &self.result),
                );
                if !out.ok {
                    return Err(out.raw);
                }
            }
            Ok(())
        }

        /// DEL in reverse order (with the namespace path even when it is gone, as a runtime
        /// does); returns the outputs.
        pub fn del(&mut self) -> Vec<Out> {
            self.deleted = true;
            self.plugins
                .iter()
                .rev()
                .map(|(bin, conf)| {
                    cni(
                        bin,
                        "DEL",
                        &self.cid,
                        Some(&self.netns),
                        &self.ifname,
                        &with_prev(conf, &self.result),
                    )
                })
                .collect()
        }
    }

    impl Drop for Attachment {
        fn drop(&mut self) {
            if !self.deleted {
                let _ = self.del();
            }
        }
    }

    /// `ip -o link` and `ip -o addr` of the host, for "nothing changed" comparisons.
    pub fn host_links_and_addrs() -> String {
        let links: Vec<String> = must("ip", &["-o", "link"])
            .lines()
            // Counters and operational state may change on their own; names and flags must not.
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        // Address lifetimes count down on their own (DHCP); the addresses themselves must not change.
        let addrs: Vec<String> = must("ip", &["-o", "addr"])
            .lines()
            .map(|l| l.split('\\').next().unwrap_or(l).trim_end().to_string())
            .collect();
        format!("{}\n{}", links.join("\n"), addrs.join("\n"))
    }

    /// iptables-save and ip6tables-save without comments and counters. Tables holding nothing
    /// but built-in chains with their default policy are left out: iptables-nft creates those on
    /// first use and never removes them, whoever asked.
    pub fn iptables_snapshot() -> String {
        let mut s = String::new();
        for cmd in ["iptables-save", "ip6tables-save"] {
            let mut table: Vec<String> = Vec::new();
            for l in must(cmd, &[]).lines() {
                if l.starts_with('#') {
                    continue;
                }
                let l = match l.find(" [") {
                    Some(i) if l.starts_with(':') => &l[..i],
                    _ => l,
                };
                table.push(l.to_string());
                if l == "COMMIT" {
                    let trivial = table.iter().all(|t| {
                        t.starts_with('*')
                            || t == "COMMIT"
                            || (t.starts_with(':')
                                && t.ends_with(" ACCEPT")
                                && t[1..].chars().all(|c| c.is_ascii_uppercase() || c == ' '))
                    });
                    if !trivial {
                        s.push_str(&table.join("\n"));
                        s.push('\n');
                    }
                    table.clear();
                }
            }
        }
        s
    }

    /// `nft list ruleset`, leaving out empty base chains and then empty tables (what
    /// iptables-nft creates on first use and never removes).
    pub fn nft_snapshot() -> String {
        let text = must("nft", &["list", "ruleset"]);
        let mut out = String::new();
        let mut table: Vec<String> = Vec::new();
        let mut chain: Vec<String> = Vec::new();
        let mut table_has = false;
        for l in text.lines() {
            let l = &strip_counters(l);
            let t = l.trim();
            if t.starts_with("table ") {
                table = vec![l.to_string()];
                table_has = false;
            } else if t.starts_with("chain ") {
                chain = vec![l.to_string()];
            } else if t == "}" && !chain.is_empty() {
                chain.push(l.to_string());
                let body = chain.len() - 2;
                let only_type = body == 0 || (body == 1 && chain[1].trim().starts_with("type "));
                if !only_type {
                    table.append(&mut chain);
                    table_has = true;
                }
                chain.clear();
            } else if t == "}" {
                table.push(l.to_string());
                if table_has {
                    out.push_str(&table.join("\n"));
                    out.push('\n');
                }
                table.clear();
            } else if !chain.is_empty() {
                chain.push(l.to_string());
            } else if !t.is_empty() {
                table.push(l.to_string());
                if !t.starts_with("flags") && !t.starts_with("comment") {
                    table_has = true;
                }
            }
        }
        out
    }

    /// Drops `counter packets N bytes M` (traffic changes it, not rules).
    fn strip_counters(l: &str) -> String {
        let words: Vec<&str> = l.split(' ').collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < words.len() {
            if words[i] == "counter" && words.get(i + 1) == Some(&"packets") {
                out.push("counter");
                i += 5;
            } else {
                out.push(words[i]);
                i += 1;
            }
        }
        out.join(" ")
    }

    /// Pings `ip` from the namespace (or the host when `ns` is None), a few tries.
    pub fn ping(ns: Option<&Netns>, ip: &str) -> bool {
        for _ in 0..3 {
            let args = ["busybox", "ping", "-c", "1", "-W", "2", ip];
            let (ok, _, _) = match ns {
                Some(n) => n.exec(&args),
                None => sh(args[0], &args[1..]),
            };
            if ok {
                return true;
            }
        }
        false
    }

    /// A host-local IPAM section with the given subnets (one range set each) in a temp dir.
    pub fn host_local(subnets: &[&str], data_dir: &Path) -> Value {
        let ranges: Vec<Value> = subnets
            .iter()
            .map(|s| serde_json::json!([{ "subnet": s }]))
            .collect();
        serde_json::json!({
            "type": "deckhand-host-local",
            "ranges": ranges,
            "dataDir": data_dir.display().to_string(),
        })
    }

    /// The container address of family `v6` in a result.
    pub fn pod_ip(result: &Value, v6: bool) -> Option<String> {
        result["ips"].as_array()?.iter().find_map(|ip| {
            let a = ip["address"].as_str()?;
            let addr = a.split('/').next()?;
            (addr.contains(':') == v6).then(|| addr.to_string())
        })
    }
}

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
