//! The OCI runtime spec of a container, from its CRI config, its sandbox and its image config,
//! with containerd's CRI defaults (capabilities, mounts, masked and read-only paths, the
//! merge of command and args with the image's entrypoint and cmd). Pure: everything it needs
//! comes in through [`Input`], so it is unit-tested without root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use deckhand_proto::cri;
use serde_json::{Value, json};

use super::{Error, Result};

/// containerd's default capabilities.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// containerd's default masked paths.
pub const DEFAULT_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's default read-only paths.
pub const DEFAULT_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The namespaces a container joins (paths) or gets of its own.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    /// The pod's network namespace; `None`: the host's.
    pub net: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    /// `Some(path)`: join (the pod's holder or a target container); `None` with `pid_host`
    /// false: a new one.
    pub pid: Option<PathBuf>,
    pub pid_host: bool,
}

/// Everything the spec is built from.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub id: &'a str,
    pub sandbox_id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub sandbox: &'a cri::PodSandboxConfig,
    /// The image config JSON (with its `config` object).
    pub image_config: &'a Value,
    /// Where the rootfs is mounted (the bundle's `rootfs`).
    pub rootfs: &'a Path,
    pub user: (u32, u32, Vec<u32>),
    pub cgroups_path: &'a str,
    pub namespaces: Namespaces,
    /// The sandbox directory: `hostname`, `hosts`, `resolv.conf`, `shm`.
    pub sandbox_dir: &'a Path,
    /// Device numbers of host devices (`stat` of each `host_path`), looked up by the caller.
    pub devices: Vec<Device>,
    /// A Localhost seccomp profile's content, read by the caller.
    pub localhost_seccomp: Option<Value>,
}

/// A device to create in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub container_path: String,
    /// `c` or `b`.
    pub kind: char,
    pub major: i64,
    pub minor: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup access: `rwm` subset.
    pub access: String,
}

fn image_cfg<'a>(image: &'a Value, key: &str) -> Option<&'a Value> {
    image.get("config").and_then(|c| c.get(key))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The process args: the CRI command and args merged with the image's entrypoint and cmd,
/// as containerd does.
pub fn process_args(config: &cri::ContainerConfig, image: &Value) -> Result<Vec<String>> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = strings(image_cfg(image, "Cmd"));
        }
        command = strings(image_cfg(image, "Entrypoint"));
    }
    command.extend(args);
    if command.is_empty() {
        return Err(Error::InvalidArgument(
            "no command specified and the image has no entrypoint or cmd".into(),
        ));
    }
    Ok(command)
}

/// The environment: PATH (unless the image sets one), HOSTNAME, the image's, then the CRI's
/// (later entries replace earlier ones with the same name, keeping their position).
pub fn process_env(config: &cri::ContainerConfig, image: &Value, hostname: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut put = |kv: String| {
        let key = kv
            .split_once('=')
            .map(|(k, _)| k)
            .unwrap_or(&kv)
            .to_string();
        match index.get(&key) {
            Some(&i) => out[i] = kv,
            None => {
                index.insert(key, out.len());
                out.push(kv);
            }
        }
    };
    put(DEFAULT_PATH.to_string());
    if !hostname.is_empty() {
        put(format!("HOSTNAME={hostname}"));
    }
    for e in strings(image_cfg(image, "Env")) {
        put(e);
    }
    for kv in &config.envs {
        put(format!("{}={}", kv.key, kv.value));
    }
    out
}

/// `NET_ADMIN` or `CAP_NET_ADMIN` → `CAP_NET_ADMIN`.
fn cap_name(c: &str) -> String {
    let u = c.to_ascii_uppercase();
    if u.starts_with("CAP_") {
        u
    } else {
        format!("CAP_{u}")
    }
}

/// The capability set: the defaults (or all, privileged), plus `add`, minus `drop`; `ALL` in
/// either list means every capability.
pub fn capabilities(privileged: bool, c: Option<&cri::Capability>) -> Vec<String> {
    let all: Vec<String> = {
        let mut v: Vec<String> = caps::all().into_iter().map(|c| c.to_string()).collect();
        v.sort();
        v
    };
    let mut set: Vec<String> = if privileged {
        all.clone()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    if let Some(c) = c {
        if c.add_capabilities
            .iter()
            .any(|a| a.eq_ignore_ascii_case("ALL"))
        {
            set = all.clone();
        } else {
            for a in &c.add_capabilities {
                let n = cap_name(a);
                if !set.contains(&n) && all.contains(&n) {
                    set.push(n);
                }
            }
        }
        if c.drop_capabilities
            .iter()
            .any(|a| a.eq_ignore_ascii_case("ALL"))
        {
            set.clear();
        } else {
            let drop: Vec<String> = c.drop_capabilities.iter().map(|d| cap_name(d)).collect();
            set.retain(|s| !drop.contains(s));
        }
    }
    set
}

fn propagation(p: i32) -> &'static str {
    match cri::MountPropagation::try_from(p) {
        Ok(cri::MountPropagation::PropagationHostToContainer) => "rslave",
        Ok(cri::MountPropagation::PropagationBidirectional) => "rshared",
        _ => "rprivate",
    }
}

/// The resources as OCI `linux.resources`.
pub fn resources(r: &cri::LinuxContainerResources) -> Value {
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    let mut mem = serde_json::Map::new();
    if r.memory_limit_in_bytes > 0 {
        mem.insert("limit".into(), json!(r.memory_limit_in_bytes));
    }
    if r.memory_swap_limit_in_bytes != 0 {
        mem.insert("swap".into(), json!(r.memory_swap_limit_in_bytes));
    }
    let mut out = serde_json::Map::new();
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    if !mem.is_empty() {
        out.insert("memory".into(), Value::Object(mem));
    }
    if !r.hugepage_limits.is_empty() {
        out.insert(
            "hugepageLimits".into(),
            Value::Array(
                r.hugepage_limits
                    .iter()
                    .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
                    .collect(),
            ),
        );
    }
    if !r.unified.is_empty() {
        out.insert("unified".into(), json!(r.unified));
    }
    Value::Object(out)
}

/// The signal StopContainer sends first: the image's `StopSignal`, else SIGTERM.
pub fn stop_signal(image: &Value) -> i32 {
    image_cfg(image, "StopSignal")
        .and_then(Value::as_str)
        .and_then(|s| {
            s.parse::<i32>()
                .ok()
                .or_else(|| crate::oci::parse_signal(s))
        })
        .unwrap_or(libc::SIGTERM)
}

/// Builds the spec.
pub fn build(inp: &Input<'_>) -> Result<Value> {
    let cfg = inp.config;
    let linux = cfg.linux.clone().unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged;
    let args = process_args(cfg, inp.image_config)?;
    let hostname = inp.sandbox.hostname.as_str();
    let env = process_env(cfg, inp.image_config, hostname);
    let cwd = if !cfg.working_dir.is_empty() {
        cfg.working_dir.clone()
    } else {
        image_cfg(inp.image_config, "WorkingDir")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string()
    };
    if !cwd.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }
    let caps = capabilities(privileged, sc.capabilities.as_ref());
    let ambient: Vec<String> = sc
        .capabilities
        .as_ref()
        .map(|c| {
            c.add_ambient_capabilities
                .iter()
                .map(|a| cap_name(a))
                .collect()
        })
        .unwrap_or_default();
    let res = linux.resources.clone().unwrap_or_default();

    let mut process = json!({
        "terminal": cfg.tty,
        "user": {"uid": inp.user.0, "gid": inp.user.1, "additionalGids": inp.user.2},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": [], "ambient": ambient,
        },
        "noNewPrivileges": sc.no_new_privs,
    });
    if res.oom_score_adj != 0 {
        process["oomScoreAdj"] = json!(res.oom_score_adj);
    }

    // Mounts: containerd's defaults, then the pod files, then the CRI's, parents first.
    let host_net = inp.namespaces.net.is_none();
    let sys_ro = if privileged { "rw" } else { "ro" };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
    ];
    if host_net && !privileged {
        // sysfs cannot be mounted without a network namespace of our own: bind the host's.
        mounts.push(json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}));
    } else {
        mounts.push(json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", sys_ro]}));
    }
    mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", sys_ro]}));
    let cri_dests: Vec<&str> = cfg
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    let shm = inp.sandbox_dir.join("shm");
    if !cri_dests.contains(&"/dev/shm") {
        if inp.namespaces.ipc.is_some() && shm.is_dir() {
            mounts.push(json!({"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "nosuid", "nodev", "noexec", "rw"]}));
        } else {
            mounts.push(json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}));
        }
    }
    for (file, dest) in [
        ("hostname", "/etc/hostname"),
        ("hosts", "/etc/hosts"),
        ("resolv.conf", "/etc/resolv.conf"),
    ] {
        let src = inp.sandbox_dir.join(file);
        if !cri_dests.contains(&dest) && src.is_file() {
            let ro = if sc.readonly_rootfs { "ro" } else { "rw" };
            mounts.push(json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "rprivate", ro]}));
        }
    }
    let mut cri_mounts: Vec<&cri::Mount> = cfg.mounts.iter().collect();
    cri_mounts.sort_by_key(|m| Path::new(&m.container_path).components().count());
    for m in cri_mounts {
        if !m.container_path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "mount destination {:?} is not absolute",
                m.container_path
            )));
        }
        if m.host_path.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "mount {:?} has no host path (image mounts are not supported)",
                m.container_path
            )));
        }
        let ro = if m.readonly { "ro" } else { "rw" };
        mounts.push(json!({
            "destination": m.container_path, "type": "bind", "source": m.host_path,
            "options": ["rbind", propagation(m.propagation), ro],
        }));
    }

    // Namespaces.
    let ns = &inp.namespaces;
    let mut namespaces = vec![json!({"type": "mount"})];
    if let Some(p) = &ns.net {
        namespaces.push(json!({"type": "network", "path": p}));
    }
    if let Some(p) = &ns.ipc {
        namespaces.push(json!({"type": "ipc", "path": p}));
    }
    if let Some(p) = &ns.uts {
        namespaces.push(json!({"type": "uts", "path": p}));
    }
    match (&ns.pid, ns.pid_host) {
        (Some(p), _) => namespaces.push(json!({"type": "pid", "path": p})),
        (None, false) => namespaces.push(json!({"type": "pid"})),
        (None, true) => {}
    }
    namespaces.push(json!({"type": "cgroup"}));

    // Devices.
    let mut dev_rules = vec![json!({"allow": false, "access": "rwm"})];
    if privileged {
        dev_rules = vec![json!({"allow": true, "access": "rwm"})];
    }
    let devices: Vec<Value> = inp
        .devices
        .iter()
        .map(|d| {
            dev_rules.push(json!({"allow": true, "type": d.kind.to_string(), "major": d.major, "minor": d.minor, "access": d.access}));
            json!({"path": d.container_path, "type": d.kind.to_string(), "major": d.major, "minor": d.minor, "fileMode": d.mode, "uid": d.uid, "gid": d.gid})
        })
        .collect();
    let mut resources = resources(&res);
    resources["devices"] = Value::Array(dev_rules);

    let mut linux_v = json!({
        "cgroupsPath": inp.cgroups_path,
        "namespaces": namespaces,
        "resources": resources,
        "devices": devices,
    });
    if !privileged {
        let masked: Vec<String> = if sc.masked_paths.is_empty() {
            DEFAULT_MASKED.iter().map(|s| s.to_string()).collect()
        } else {
            sc.masked_paths.clone()
        };
        let ro: Vec<String> = if sc.readonly_paths.is_empty() {
            DEFAULT_READONLY.iter().map(|s| s.to_string()).collect()
        } else {
            sc.readonly_paths.clone()
        };
        linux_v["maskedPaths"] = json!(masked);
        linux_v["readonlyPaths"] = json!(ro);
        let has_admin = caps.iter().any(|c| c == "CAP_SYS_ADMIN");
        let seccomp = match sc.seccomp.as_ref() {
            None => None,
            Some(p) => match cri::security_profile::ProfileType::try_from(p.profile_type) {
                Ok(cri::security_profile::ProfileType::RuntimeDefault) => {
                    Some(super::seccomp_default::profile(has_admin))
                }
                Ok(cri::security_profile::ProfileType::Unconfined) => None,
                Ok(cri::security_profile::ProfileType::Localhost) => {
                    Some(inp.localhost_seccomp.clone().ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "seccomp profile {:?} could not be read",
                            p.localhost_ref
                        ))
                    })?)
                }
                Err(_) => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown seccomp profile type {}",
                        p.profile_type
                    )));
                }
            },
        };
        if let Some(s) = seccomp {
            linux_v["seccomp"] = s;
        }
    }

    let mut annotations: serde_json::Map<String, Value> = cfg
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        json!("container"),
    );
    annotations.insert("io.kubernetes.cri.sandbox-id".into(), json!(inp.sandbox_id));
    if let Some(md) = &cfg.metadata {
        annotations.insert("io.kubernetes.cri.container-name".into(), json!(md.name));
    }

    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": inp.rootfs, "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "linux": linux_v,
        "annotations": annotations,
    });
    // Validate by parsing as the runtime will.
    serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone())
        .map_err(|e| Error::Internal(format!("built an invalid OCI spec: {e}")))?;
    let _ = inp.id;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Value {
        json!({"config": {
            "Env": ["PATH=/bin", "A=image", "B=image"],
            "Entrypoint": ["/bin/entry"],
            "Cmd": ["default-arg"],
            "WorkingDir": "/work",
            "StopSignal": "SIGQUIT",
        }})
    }

    fn cfg() -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            envs: vec![cri::KeyValue {
                key: "A".into(),
                value: "cri".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn merges_command_like_containerd() -> Result<()> {
        let img = image();
        let mut c = cfg();
        assert_eq!(process_args(&c, &img)?, ["/bin/entry", "default-arg"]);
        c.args = vec!["x".into()];
        assert_eq!(process_args(&c, &img)?, ["/bin/entry", "x"]);
        c.command = vec!["/bin/sh".into()];
        assert_eq!(process_args(&c, &img)?, ["/bin/sh", "x"]);
        c.args.clear();
        assert_eq!(process_args(&c, &img)?, ["/bin/sh"]);
        assert!(process_args(&cfg(), &json!({})).is_err());
        Ok(())
    }

    #[test]
    fn env_order_and_override() {
        let env = process_env(&cfg(), &image(), "pod-a");
        assert_eq!(env, ["PATH=/bin", "HOSTNAME=pod-a", "A=cri", "B=image"]);
        assert_eq!(stop_signal(&image()), libc::SIGQUIT);
        assert_eq!(stop_signal(&json!({})), libc::SIGTERM);
    }

    #[test]
    fn capabilities_add_drop_all() {
        let c = cri::Capability {
            add_capabilities: vec!["NET_ADMIN".into(), "CAP_SYS_TIME".into()],
            drop_capabilities: vec!["kill".into()],
            add_ambient_capabilities: vec![],
        };
        let set = capabilities(false, Some(&c));
        assert!(set.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(set.contains(&"CAP_SYS_TIME".to_string()));
        assert!(!set.contains(&"CAP_KILL".to_string()));
        let none = capabilities(
            false,
            Some(&cri::Capability {
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            }),
        );
        assert!(none.is_empty());
        assert!(capabilities(true, None).contains(&"CAP_SYS_ADMIN".to_string()));
    }

    #[test]
    fn builds_a_valid_spec() -> Result<()> {
        let t = tempfile::tempdir().map_err(|e| Error::internal("tmp", e))?;
        let sb = cri::PodSandboxConfig {
            hostname: "pod-a".into(),
            ..Default::default()
        };
        let mut c = cfg();
        c.mounts = vec![
            cri::Mount {
                container_path: "/data/sub".into(),
                host_path: "/tmp/b".into(),
                readonly: true,
                ..Default::default()
            },
            cri::Mount {
                container_path: "/data".into(),
                host_path: "/tmp/a".into(),
                propagation: cri::MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            },
        ];
        c.linux = Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_shares: 512,
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile::default()),
                readonly_rootfs: true,
                ..Default::default()
            }),
        });
        let img = image();
        let inp = Input {
            id: "cid",
            sandbox_id: "sid",
            config: &c,
            sandbox: &sb,
            image_config: &img,
            rootfs: Path::new("/run/x/rootfs"),
            user: (1000, 1000, vec![5]),
            cgroups_path: "/pod/cid",
            namespaces: Namespaces {
                net: Some("/run/x/net".into()),
                ipc: Some("/run/x/ipc".into()),
                uts: Some("/run/x/uts".into()),
                pid: None,
                pid_host: false,
            },
            sandbox_dir: t.path(),
            devices: vec![],
            localhost_seccomp: None,
        };
        let s = build(&inp)?;
        assert_eq!(s["process"]["cwd"], "/work");
        assert_eq!(s["process"]["user"]["uid"], 1000);
        assert_eq!(s["root"]["readonly"], true);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert!(s["linux"]["seccomp"].is_object(), "RuntimeDefault");
        let dests: Vec<&str> = s["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["destination"].as_str())
            .collect();
        let (a, b) = (
            dests.iter().position(|d| *d == "/data"),
            dests.iter().position(|d| *d == "/data/sub"),
        );
        assert!(a < b, "parents are mounted first: {dests:?}");
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(ns, ["mount", "network", "ipc", "uts", "pid", "cgroup"]);
        // Relative working dirs are refused.
        let mut bad = c.clone();
        bad.working_dir = "rel".into();
        assert!(
            build(&Input {
                config: &bad,
                ..inp.clone()
            })
            .is_err()
        );
        Ok(())
    }
}
