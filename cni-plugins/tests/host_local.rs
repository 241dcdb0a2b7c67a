//! `deckhand-host-local` executed as a real plugin: environment + stdin in, JSON out.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_deckhand-host-local");
const REFERENCE: &str = "/usr/lib/cni/host-local";

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dh-cni-hl-")
        .tempdir()
        .expect("temp dir")
}

/// Runs a plugin binary; returns (exit code, parsed stdout or Null).
fn exec(
    bin: &str,
    command: &str,
    cid: &str,
    ifname: &str,
    conf: &Value,
    args: &str,
) -> (i32, Value) {
    let mut child = Command::new(bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", "/var/run/netns/dh-not-used")
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
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
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    (out.status.code().unwrap_or(-1), v)
}

fn run(command: &str, cid: &str, conf: &Value) -> (i32, Value) {
    exec(BIN, command, cid, "eth0", conf, "")
}

fn conf(version: &str, data: &Path, ipam: Value) -> Value {
    let mut ipam = ipam;
    ipam["type"] = json!("deckhand-host-local");
    ipam["dataDir"] = json!(data);
    json!({"cniVersion": version, "name": "dhnet", "type": "dh-test", "ipam": ipam})
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).expect("prefix").display().to_string())
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

fn addr(r: &Value, i: usize) -> String {
    r["ips"][i]["address"]
        .as_str()
        .expect("address")
        .to_string()
}

#[test]
fn add_del_check_and_idempotent_del() {
    let tmp = tmpdir();
    let c = conf(
        "1.1.0",
        tmp.path(),
        json!({"subnet": "10.123.0.0/24", "routes": [{"dst": "0.0.0.0/0"}]}),
    );
    let (code, r) = run("ADD", "dhc1", &c);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(addr(&r, 0), "10.123.0.2/24");
    assert_eq!(r["ips"][0]["gateway"], "10.123.0.1");
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    let ipfile = tmp.path().join("dhnet/10.123.0.2");
    assert_eq!(
        std::fs::read_to_string(&ipfile).expect("reservation"),
        "dhc1\r\neth0"
    );

    // CHECK with the ADD's result as prevResult.
    let mut chk = c.clone();
    chk["prevResult"] = r.clone();
    assert_eq!(run("CHECK", "dhc1", &chk).0, 0);

    // A second ADD of the same attachment is refused and changes nothing.
    let (code, e) = run("ADD", "dhc1", &c);
    assert_eq!(code, 1);
    assert!(e["msg"].as_str().expect("msg").contains("duplicate"), "{e}");

    assert_eq!(run("DEL", "dhc1", &c), (0, Value::Null));
    assert!(!ipfile.exists(), "DEL frees the address");
    assert_eq!(
        run("DEL", "dhc1", &c),
        (0, Value::Null),
        "DEL twice is fine"
    );
    let (code, e) = run("CHECK", "dhc1", &chk);
    assert_eq!(code, 1, "CHECK after DEL fails: {e}");

    // Old result versions carry "version".
    let (code, r) = run(
        "ADD",
        "dhc2",
        &conf("0.3.1", tmp.path(), json!({"subnet": "10.123.0.0/24"})),
    );
    assert_eq!(code, 0);
    assert_eq!(r["ips"][0]["version"], "4");
    assert_eq!(addr(&r, 0), "10.123.0.3/24", "the cursor moves on");
}

#[test]
fn exhaustion_is_an_error_and_writes_nothing() {
    let tmp = tmpdir();
    // One IPv4 address (10.124.0.2) and plenty of IPv6: exhaustion of either set fails the ADD.
    let c = conf(
        "1.0.0",
        tmp.path(),
        json!({"ranges": [[{"subnet": "fd00:124::/64"}], [{"subnet": "10.124.0.0/30"}]]}),
    );
    let (code, r) = run("ADD", "dhc1", &c);
    assert_eq!(code, 0, "{r}");
    let before = files(tmp.path());
    let (code, e) = run("ADD", "dhc2", &c);
    assert_eq!(code, 1);
    assert_eq!(e["code"], 11, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .expect("msg")
            .contains("no IP addresses available in range set"),
        "{e}"
    );
    assert_eq!(files(tmp.path()), before, "nothing written on exhaustion");
    // DEL of the failed attachment is fine, and frees nothing of the other's.
    assert_eq!(run("DEL", "dhc2", &c).0, 0);
    assert_eq!(files(tmp.path()), before);
}

#[test]
fn dual_stack_and_requested_ip() {
    let tmp = tmpdir();
    let c = conf(
        "1.0.0",
        tmp.path(),
        json!({"ranges": [
            [{"subnet": "10.125.0.0/24", "rangeStart": "10.125.0.10", "rangeEnd": "10.125.0.20"}],
            [{"subnet": "fd00:125::/120", "gateway": "fd00:125::fe"}]
        ]}),
    );
    let (code, r) = run("ADD", "dhc1", &c);
    assert_eq!(code, 0, "{r}");
    assert_eq!(addr(&r, 0), "10.125.0.10/24");
    assert_eq!(addr(&r, 1), "fd00:125::1/120");
    assert_eq!(r["ips"][1]["gateway"], "fd00:125::fe");
    let (code, r) = exec(
        BIN,
        "ADD",
        "dhc2",
        "eth0",
        &c,
        "IgnoreUnknown=1;IP=10.125.0.15",
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(addr(&r, 0), "10.125.0.15/24");
    assert_eq!(addr(&r, 1), "fd00:125::2/120");
    let (code, e) = exec(BIN, "ADD", "dhc3", "eth0", &c, "IP=10.125.0.15");
    assert_eq!(code, 1, "a taken requested address fails: {e}");
    let (code, e) = exec(BIN, "ADD", "dhc3", "eth0", &c, "IP=10.125.0.30");
    assert_eq!(
        (code, e["code"].as_u64()),
        (1, Some(7)),
        "outside every range: {e}"
    );
    assert_eq!(run("DEL", "dhc1", &c).0, 0);
    assert_eq!(run("DEL", "dhc2", &c).0, 0);
    assert_eq!(
        files(&tmp.path().join("dhnet")),
        [
            "attachments",
            "last_reserved_ip.0",
            "last_reserved_ip.1",
            "lock"
        ]
    );
}

#[test]
fn fifty_parallel_adds_get_distinct_addresses() {
    let tmp = tmpdir();
    let c = conf("1.1.0", tmp.path(), json!({"subnet": "10.126.0.0/24"}));
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || run("ADD", &format!("dhc{i}"), &c))
        })
        .collect();
    let mut seen = HashSet::new();
    for h in handles {
        let (code, r) = h.join().expect("thread");
        assert_eq!(code, 0, "{r}");
        assert!(
            seen.insert(addr(&r, 0)),
            "duplicate address {}",
            addr(&r, 0)
        );
    }
    assert_eq!(seen.len(), 50);
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || run("DEL", &format!("dhc{i}"), &c))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("thread").0, 0);
    }
    assert_eq!(
        files(&tmp.path().join("dhnet")),
        ["attachments", "last_reserved_ip.0", "lock"]
    );
}

#[test]
fn gc_frees_exactly_the_others() {
    let tmp = tmpdir();
    let mut c = conf(
        "1.1.0",
        tmp.path(),
        json!({"ranges": [[{"subnet": "10.127.0.0/24"}], [{"subnet": "fd00:127::/64"}]]}),
    );
    let mut by_id = Vec::new();
    for i in 0..6 {
        let (code, r) = run("ADD", &format!("dhc{i}"), &c);
        assert_eq!(code, 0, "{r}");
        by_id.push((addr(&r, 0), addr(&r, 1)));
    }
    c["cni.dev/valid-attachments"] = json!([
        {"containerID": "dhc0", "ifname": "eth0"},
        {"containerID": "dhc2", "ifname": "eth0"},
        {"containerID": "dhc4", "ifname": "eth0"},
        {"containerID": "dhc5", "ifname": "other0"},
    ]);
    let gc = exec(BIN, "GC", "", "", &c, "");
    assert_eq!(gc, (0, Value::Null));
    let dir = tmp.path().join("dhnet");
    for (i, (v4, v6)) in by_id.iter().enumerate() {
        let kept = [0, 2, 4].contains(&i);
        for a in [v4, v6] {
            let ip = a.split('/').next().expect("ip");
            assert_eq!(dir.join(ip).exists(), kept, "dhc{i} {ip}");
        }
        assert_eq!(dir.join(format!("attachments/dhc{i}@eth0")).exists(), kept);
    }
    // GC needs a 1.1 configuration.
    let mut old = c.clone();
    old["cniVersion"] = json!("1.0.0");
    assert_eq!(exec(BIN, "GC", "", "", &old, "").1["code"], 1);
}

#[test]
fn invalid_config_changes_nothing() {
    let tmp = tmpdir();
    for ipam in [
        json!({"subnet": "10.128.0.1/24"}),
        json!({}),
        json!({"ranges": [[{"subnet": "10.128.0.0/24"}], [{"subnet": "10.128.0.0/25"}]]}),
        json!({"subnet": "10.128.0.0/24", "routes": [{"dst": "nonsense"}]}),
    ] {
        let (code, e) = run("ADD", "dhc1", &conf("1.0.0", tmp.path(), ipam.clone()));
        assert_eq!((code, e["code"].as_u64()), (1, Some(7)), "{ipam}: {e}");
    }
    let mut bad_name = conf("1.0.0", tmp.path(), json!({"subnet": "10.128.0.0/24"}));
    bad_name["name"] = json!("../escape");
    assert_eq!(run("ADD", "dhc1", &bad_name).1["code"], 7);
    assert!(files(tmp.path()).is_empty(), "{:?}", files(tmp.path()));
}

#[test]
fn same_output_as_the_reference_plugin() {
    let ours = tmpdir();
    let theirs = tmpdir();
    let resolv = ours.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 10.0.0.10\nsearch a.dh b.dh\noptions ndots:5\n",
    )
    .expect("resolv.conf");
    let ipam = json!({
        "ranges": [[{"subnet": "10.129.0.0/28", "rangeStart": "10.129.0.4"}], [{"subnet": "fd00:129::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.129.0.1"}],
        "resolvConf": resolv,
    });
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        for i in 0..3 {
            let cid = format!("dhc{version}-{i}");
            let a = exec(
                BIN,
                "ADD",
                &cid,
                "eth0",
                &conf(version, ours.path(), ipam.clone()),
                "",
            );
            let b = exec(
                REFERENCE,
                "ADD",
                &cid,
                "eth0",
                &conf(version, theirs.path(), ipam.clone()),
                "",
            );
            assert_eq!(a.0, 0, "{}", a.1);
            assert_eq!(a, b, "version {version}, ADD {i}");
        }
    }
    // Exhaustion: the reference says the same thing (with its generic code).
    let small = json!({"subnet": "10.130.0.0/30"});
    let _ = exec(
        BIN,
        "ADD",
        "dhx1",
        "eth0",
        &conf("1.0.0", ours.path(), small.clone()),
        "",
    );
    let _ = exec(
        REFERENCE,
        "ADD",
        "dhx1",
        "eth0",
        &conf("1.0.0", theirs.path(), small.clone()),
        "",
    );
    let a = exec(
        BIN,
        "ADD",
        "dhx2",
        "eth0",
        &conf("1.0.0", ours.path(), small.clone()),
        "",
    );
    let b = exec(
        REFERENCE,
        "ADD",
        "dhx2",
        "eth0",
        &conf("1.0.0", theirs.path(), small),
        "",
    );
    assert_eq!((a.0, b.0), (1, 1));
    assert_eq!(a.1["msg"], b.1["msg"]);
    // The reservations the reference can read back: same file layout for the addresses.
    let a_files: Vec<String> = files(&ours.path().join("dhnet"))
        .into_iter()
        .filter(|f| !f.starts_with("attachments") && f != "resolv.conf")
        .collect();
    assert_eq!(a_files, files(&theirs.path().join("dhnet")));
}

#[test]
fn delegation_from_a_plugin_request() {
    use deckhand_cni::plugin::{Command as Cmd, parse_request};
    let tmp = tmpdir();
    let bin_dir = Path::new(BIN)
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let c = conf("1.1.0", tmp.path(), json!({"subnet": "10.132.0.0/24"}));
    let stdin = c.to_string();
    let env = |k: &str| {
        Some(
            match k {
                "CNI_CONTAINERID" => "dhdeleg",
                "CNI_IFNAME" => "eth0",
                "CNI_NETNS" => "/var/run/netns/dh-not-used",
                "CNI_PATH" => bin_dir.as_str(),
                _ => return None,
            }
            .to_string(),
        )
    };
    let req = parse_request(Cmd::Add, &env, stdin.as_bytes()).expect("request");
    let r = req
        .delegate_add("deckhand-host-local")
        .expect("delegated ADD");
    assert_eq!(r.ips[0].address.to_string(), "10.132.0.2/24");
    req.delegate_check("deckhand-host-local")
        .expect("delegated CHECK");
    req.delegate_del("deckhand-host-local")
        .expect("delegated DEL");
    assert!(!tmp.path().join("dhnet/10.132.0.2").exists());
    let e = req.delegate_check("deckhand-host-local").expect_err("gone");
    assert_eq!(e.code, 100);
    let e = req.delegate_add("dh-no-such-plugin").expect_err("missing");
    assert_eq!(e.code, 7);
}
