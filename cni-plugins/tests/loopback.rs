//! `deckhand-loopback` executed as a real plugin against network namespaces of its own.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_deckhand-loopback");
const REFERENCE: &str = "/usr/lib/cni/loopback";

/// A network namespace `dh-cni-<pid>-<n>`, deleted on drop (also when a test fails).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "dh-cni-lo-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        Netns { name }
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn lo_is_up(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "lo"])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&out.stdout);
        let flags = text
            .split('<')
            .nth(1)
            .and_then(|s| s.split('>').next())
            .unwrap_or("");
        flags.split(',').any(|f| f == "UP")
    }

    fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

fn exec(bin: &str, command: &str, netns: &str, conf: &Value) -> (i32, Value) {
    let mut cmd = Command::new(bin);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "dhc1")
        .env("CNI_IFNAME", "lo")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !netns.is_empty() {
        cmd.env("CNI_NETNS", netns);
    }
    let mut child = cmd.spawn().expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait plugin");
    let v = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).expect("stdout is JSON")
    };
    (out.status.code().unwrap_or(-1), v)
}

fn conf(version: &str) -> Value {
    json!({"cniVersion": version, "name": "dhlo", "type": "deckhand-loopback"})
}

#[test]
fn add_check_del() {
    let ns = Netns::new();
    assert!(!ns.lo_is_up(), "a new namespace has lo down");
    let (code, r) = exec(BIN, "ADD", &ns.path(), &conf("1.1.0"));
    assert_eq!(code, 0, "{r}");
    assert!(ns.lo_is_up());
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["interfaces"][0]["name"], "lo");
    assert_eq!(r["interfaces"][0]["sandbox"], ns.path());
    let ips: Vec<&str> = r["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i["address"].as_str().expect("address"))
        .collect();
    assert_eq!(ips, ["127.0.0.1/8", "::1/128"]);
    assert_eq!(r["ips"][0]["interface"], 0);

    let mut chk = conf("1.1.0");
    chk["prevResult"] = r.clone();
    assert_eq!(exec(BIN, "CHECK", &ns.path(), &chk), (0, Value::Null));
    assert_eq!(
        exec(BIN, "DEL", &ns.path(), &conf("1.1.0")),
        (0, Value::Null)
    );
    assert!(!ns.lo_is_up(), "DEL sets lo down");
    let (code, e) = exec(BIN, "CHECK", &ns.path(), &chk);
    assert_eq!(code, 1, "CHECK with lo down fails: {e}");

    // DEL when the namespace is gone, or without one, succeeds.
    let path = ns.path();
    ns.delete();
    assert_eq!(exec(BIN, "DEL", &path, &conf("1.1.0")), (0, Value::Null));
    assert_eq!(exec(BIN, "DEL", "", &conf("1.1.0")), (0, Value::Null));
    // ADD into a missing namespace is an error.
    let (code, e) = exec(BIN, "ADD", &path, &conf("1.1.0"));
    assert_eq!((code, e["code"].as_u64()), (1, Some(4)), "{e}");
}

#[test]
fn same_result_as_the_reference_and_chaining() {
    let ours = Netns::new();
    let theirs = Netns::new();
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        let (ca, mut a) = exec(BIN, "ADD", &ours.path(), &conf(version));
        let (cb, mut b) = exec(REFERENCE, "ADD", &theirs.path(), &conf(version));
        assert_eq!((ca, cb), (0, 0), "{a} {b}");
        a["interfaces"][0]["sandbox"] = Value::Null;
        // The spec's 0.3/0.4 results carry "version" on each IP; the reference loopback leaves
        // it out, so compare without it.
        if version != "1.0.0" {
            for ip in a["ips"].as_array_mut().expect("ips") {
                let fam = ip.as_object_mut().expect("ip").remove("version");
                assert!(fam.is_some(), "0.x results have version: {ip}");
            }
        }
        b["interfaces"][0]["sandbox"] = Value::Null;
        assert_eq!(a, b, "version {version}");
    }
    // A prevResult is passed through unchanged.
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": ours.path()}],
        "ips": [{"address": "10.131.0.2/24", "interface": 0}], "dns": {}});
    let mut c = conf("1.0.0");
    c["prevResult"] = prev.clone();
    assert_eq!(exec(BIN, "ADD", &ours.path(), &c), (0, prev));
}
