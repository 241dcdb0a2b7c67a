//! The runtime side driving real plugin binaries: the reference `bridge` and `loopback`, our
//! `deckhand-host-local` and `deckhand-loopback`, and a tiny shell plugin that fails on ADD.
//! Everything the bridge creates lives in a "host" network namespace of the test's own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use deckhand_cni::error::Error;
use deckhand_cni::netns::NetNs;
use deckhand_cni::runtime::{CniConfig, NetworkConfigList, RuntimeConf, load_dir};
use deckhand_cni::types::GcAttachment;
use deckhand_cni::version::CniVersion;
use serde_json::{Value, json};

/// A network namespace `dh-cni-rt-<pid>-<n>`, deleted on drop (also when a test fails).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "dh-cni-rt-{}-{}",
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

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dh-cni-rt-")
        .tempdir()
        .expect("temp dir")
}

/// Our binaries' directory, a directory of test plugins, and the reference plugins.
fn plugin_dirs(test_plugins: &Path) -> Vec<PathBuf> {
    let ours = Path::new(env!("CARGO_BIN_EXE_deckhand-host-local"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    vec![
        ours,
        test_plugins.to_path_buf(),
        PathBuf::from("/usr/lib/cni"),
    ]
}

/// `dh-fail`: logs every call to `log`, fails ADD with code 123, succeeds otherwise.
fn write_fail_plugin(dir: &Path, log: &Path) {
    let script = format!(
        r#"#!/bin/sh
cat >/dev/null
echo "$CNI_COMMAND $CNI_CONTAINERID" >> '{log}'
case "$CNI_COMMAND" in
  VERSION) echo '{{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}}' ;;
  ADD) echo '{{"cniVersion":"1.0.0","code":123,"msg":"dh test failure"}}'; exit 1 ;;
esac
exit 0
"#,
        log = log.display()
    );
    let path = dir.join("dh-fail");
    std::fs::write(&path, script).expect("write plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn list(v: Value) -> NetworkConfigList {
    NetworkConfigList::from_bytes(v.to_string().as_bytes(), None).expect("valid list")
}

fn rt(id: &str, netns: &Path) -> RuntimeConf {
    RuntimeConf {
        container_id: id.into(),
        netns: netns.to_path_buf(),
        ifname: "eth0".into(),
        args: vec![("IgnoreUnknown".into(), "1".into())],
        ..Default::default()
    }
}

fn bridge_plugin(ipam_dir: &Path, subnet: &str) -> Value {
    json!({"type": "bridge", "bridge": "dhbr0", "isGateway": true,
        "ipam": {"type": "deckhand-host-local", "subnet": subnet, "dataDir": ipam_dir}})
}

fn ipam_attachments(ipam_dir: &Path, net: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(ipam_dir.join(net).join("attachments"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn conflist_dir_bridge_host_local_loopback_chain() {
    let host = Netns::new();
    let ctr = Netns::new();
    let tmp = tmpdir();
    let confdir = tmp.path().join("net.d");
    let ipam = tmp.path().join("ipam");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&confdir).expect("mkdir");
    let write =
        |name: &str, v: Value| std::fs::write(confdir.join(name), v.to_string()).expect("write");
    write(
        "10-dh.conflist",
        json!({"cniVersion": "1.0.0", "name": "dh-rt-bridge",
            "plugins": [bridge_plugin(&ipam, "10.140.0.0/24"), {"type": "deckhand-loopback"}]}),
    );
    write(
        "20-lo.conf",
        json!({"cniVersion": "1.0.0", "name": "dh-rt-lo", "type": "loopback"}),
    );
    write("30-notes.txt", json!({"not": "a config"}));
    write("15-broken.conf", json!({"cniVersion": "1.0.0"}));
    let (lists, bad) = load_dir(&confdir).expect("load dir");
    assert_eq!(
        lists.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["dh-rt-bridge", "dh-rt-lo"]
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    let net = &lists[0];
    let cfg = CniConfig::new(plugin_dirs(tmp.path()), &state);
    let rt = rt("dhc1", &ctr.path());
    let cache = state.join("results/dh-rt-bridge-dhc1-eth0");

    let hostns = NetNs::open(host.path()).expect("host netns");
    let result = hostns
        .run(|| cfg.add_network_list(net, &rt))
        .expect("enter host netns")
        .expect("ADD");
    assert_eq!(result.ips[0].address.to_string(), "10.140.0.2/24");
    let eth0 = result
        .interfaces
        .iter()
        .find(|i| i.name == "eth0")
        .expect("eth0 in result");
    assert_eq!(Path::new(&eth0.sandbox), ctr.path());
    assert!(cache.exists(), "result cached");
    assert!(ctr.ip(&["addr", "show", "eth0"]).contains("10.140.0.2/24"));
    assert!(
        ctr.ip(&["link", "show", "lo"]).contains("UP"),
        "loopback ran"
    );
    assert!(
        host.ip(&["addr", "show", "dhbr0"])
            .contains("10.140.0.1/24")
    );
    assert_eq!(
        cfg.cached_result("dh-rt-bridge", &rt)
            .expect("cache")
            .expect("some"),
        result
    );
    assert_eq!(ipam_attachments(&ipam, "dh-rt-bridge"), ["dhc1@eth0"]);

    hostns
        .run(|| cfg.check_network_list(net, &rt))
        .expect("enter")
        .expect("CHECK");

    hostns
        .run(|| cfg.del_network_list(net, &rt))
        .expect("enter")
        .expect("DEL");
    assert!(!cache.exists(), "cache removed");
    assert!(ipam_attachments(&ipam, "dh-rt-bridge").is_empty());
    assert!(
        !ipam.join("dh-rt-bridge/10.140.0.2").exists(),
        "address freed"
    );
    assert!(!ctr.ip(&["link", "show"]).contains("eth0"), "eth0 gone");
    // DEL again: no cache, nothing to delete, still fine.
    hostns
        .run(|| cfg.del_network_list(net, &rt))
        .expect("enter")
        .expect("second DEL");
    // CHECK without a cached result.
    let e = hostns
        .run(|| cfg.check_network_list(net, &rt))
        .expect("enter")
        .expect_err("no cache");
    assert!(matches!(e, Error::NoCachedResult(_)), "{e}");
}

#[test]
fn failed_add_runs_del() {
    let host = Netns::new();
    let ctr = Netns::new();
    let tmp = tmpdir();
    let ipam = tmp.path().join("ipam");
    let log = tmp.path().join("calls.log");
    write_fail_plugin(tmp.path(), &log);
    let net = list(json!({"cniVersion": "1.0.0", "name": "dh-rt-fail",
        "plugins": [bridge_plugin(&ipam, "10.141.0.0/24"), {"type": "dh-fail"}]}));
    let state = tmp.path().join("state");
    let cfg = CniConfig::new(plugin_dirs(tmp.path()), &state);
    let rt = rt("dhc1", &ctr.path());
    let hostns = NetNs::open(host.path()).expect("host netns");
    let e = hostns
        .run(|| cfg.add_network_list(&net, &rt))
        .expect("enter")
        .expect_err("ADD fails");
    let cni = e.cni_error().expect("plugin error");
    assert_eq!((cni.code, cni.msg.as_str()), (123, "dh test failure"));
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "ADD dhc1\nDEL dhc1\n"
    );
    assert!(
        !state.join("results/dh-rt-fail-dhc1-eth0").exists(),
        "no cache"
    );
    assert!(
        ipam_attachments(&ipam, "dh-rt-fail").is_empty(),
        "address released"
    );
    assert!(!ctr.ip(&["link", "show"]).contains("eth0"), "eth0 removed");
    assert!(
        !host.ip(&["link", "show"]).contains("veth"),
        "host veth removed"
    );
}

#[test]
fn gc_status_versions_and_async() {
    let ctr = Netns::new();
    let tmp = tmpdir();
    let ipam = tmp.path().join("ipam");
    let state = tmp.path().join("state");
    let cfg = CniConfig::new(plugin_dirs(tmp.path()), &state);
    let net = list(
        json!({"cniVersion": "1.0.0", "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "dh-rt-gc", "plugins": [{"type": "deckhand-host-local",
            "ipam": {"type": "deckhand-host-local", "subnet": "10.142.0.0/24", "dataDir": ipam}}]}),
    );
    assert_eq!(net.cni_version, CniVersion::V1_1_0);
    assert_eq!(
        cfg.negotiate(&net).expect("negotiate").cni_version,
        CniVersion::V1_1_0
    );
    // The reference loopback speaks up to 1.0.0.
    let lo = list(
        json!({"cniVersion": "0.4.0", "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": "dh-rt-lo", "plugins": [{"type": "loopback"}]}),
    );
    assert_eq!(
        cfg.negotiate(&lo).expect("negotiate").cni_version,
        CniVersion::V1_0_0
    );
    assert!(cfg.validate_network_list(&net).is_ok());
    assert!(matches!(
        cfg.validate_network_list(&list(
            json!({"cniVersion": "1.0.0", "name": "dh-x", "plugins": [{"type": "dh-missing"}]})
        )),
        Err(Error::PluginNotFound { .. })
    ));
    let info = cfg
        .get_version_info("deckhand-host-local", CniVersion::V1_1_0)
        .expect("VERSION");
    assert!(info.supports(CniVersion::V0_3_0) && info.supports(CniVersion::V1_1_0));

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    for i in 0..4 {
        let r = tokio
            .block_on(cfg.add_network_list_async(&net, &rt(&format!("dhc{i}"), &ctr.path())))
            .expect("ADD");
        assert_eq!(r.cni_version, "1.1.0");
        assert!(state.join(format!("locks/dhc{i}.lock")).exists());
    }
    tokio
        .block_on(cfg.check_network_list_async(&net, &rt("dhc0", &ctr.path())))
        .expect("CHECK");
    tokio
        .block_on(cfg.status_network_list_async(&net))
        .expect("STATUS");
    let valid = [
        GcAttachment {
            container_id: "dhc1".into(),
            ifname: "eth0".into(),
        },
        GcAttachment {
            container_id: "dhc3".into(),
            ifname: "eth0".into(),
        },
    ];
    tokio
        .block_on(cfg.gc_network_list_async(&net, &valid))
        .expect("GC");
    let mut cached: Vec<String> = cfg
        .cached_attachments("dh-rt-gc")
        .expect("cache")
        .into_iter()
        .map(|c| c.runtime.container_id)
        .collect();
    cached.sort();
    assert_eq!(cached, ["dhc1", "dhc3"]);
    assert_eq!(
        ipam_attachments(&ipam, "dh-rt-gc"),
        ["dhc1@eth0", "dhc3@eth0"]
    );
    // A reservation the cache does not know about is collected by the plugin's own GC.
    let orphan = ipam.join("dh-rt-gc/10.142.0.99");
    std::fs::write(&orphan, "dhorphan\r\neth0").expect("orphan");
    cfg.gc_network_list(&net, &valid).expect("GC");
    assert!(!orphan.exists(), "plugin GC ran");

    // disableCheck.
    let mut nocheck = net.clone();
    nocheck.disable_check = true;
    assert!(matches!(
        cfg.check_network_list(&nocheck, &rt("dhc1", &ctr.path())),
        Err(Error::NotAllowed(_))
    ));
    for i in [1, 3] {
        tokio
            .block_on(cfg.del_network_list_async(&net, &rt(&format!("dhc{i}"), &ctr.path())))
            .expect("DEL");
    }
    assert!(
        cfg.cached_attachments("dh-rt-gc")
            .expect("cache")
            .is_empty()
    );
    assert!(ipam_attachments(&ipam, "dh-rt-gc").is_empty());
}

#[test]
fn concurrent_operations_on_many_containers() {
    let ctr = Netns::new();
    let tmp = tmpdir();
    let ipam = tmp.path().join("ipam");
    let cfg = CniConfig::new(plugin_dirs(tmp.path()), tmp.path().join("state"));
    let net = list(
        json!({"cniVersion": "1.1.0", "name": "dh-rt-par", "plugins": [{"type": "deckhand-host-local",
            "ipam": {"type": "deckhand-host-local", "subnet": "10.143.0.0/24", "dataDir": ipam}}]}),
    );
    std::thread::scope(|s| {
        for i in 0..8 {
            let (cfg, net, ctr) = (&cfg, &net, &ctr);
            s.spawn(move || {
                let rt = rt(&format!("dhc{}", i % 4), &ctr.path());
                // Two threads per container: ADD/DEL pairs serialise on the container lock.
                for _ in 0..3 {
                    match cfg.add_network_list(net, &rt) {
                        Ok(_) => cfg.del_network_list(net, &rt).expect("DEL"),
                        // The other thread holds the attachment right now.
                        Err(e) => assert!(e.to_string().contains("duplicate"), "{e}"),
                    }
                }
            });
        }
    });
    assert!(
        cfg.cached_attachments("dh-rt-par")
            .expect("cache")
            .is_empty()
    );
    assert!(ipam_attachments(&ipam, "dh-rt-par").is_empty());
}
