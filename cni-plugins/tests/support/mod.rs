//! Test support shared by the CNI integration tests: namespaces, links and plugin runs, all
//! named `dh…` and removed on drop. Each test file declares it with `mod support;` and uses what
//! it needs.

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
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {raw:?}"))
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
