//! The `RuntimeDefault` seccomp profile.
//!
//! containerd's and Docker's default profile is an allow-list of about 350 syscalls whose
//! effect is to refuse, with `EPERM`, the syscalls that reach outside a container (kernel
//! modules, kexec, reboot, clock setting, keyrings, swap, quotas, namespace and mount changes
//! without `CAP_SYS_ADMIN`, tracing of other processes, BPF and perf without their
//! capabilities, obsolete and 32-bit compatibility calls). This profile expresses the same
//! outcome as a deny-list: the default action is `ALLOW` and those syscalls return `EPERM`
//! (`clone3` returns `ENOSYS`, so libcs fall back to `clone`, whose namespace flags are then
//! checked). A syscall added to the kernel later is allowed here, as it would be refused by
//! the allow-list: that is the one difference, accepted for a profile short enough to read.

use serde_json::{Value, json};

/// Refused for every container.
const ALWAYS: &[&str] = &[
    "acct",
    "add_key",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "nfsservctl",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "swapon",
    "swapoff",
    "sysfs",
    "_sysctl",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
    "kcmp",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "personality",
    "open_by_handle_at",
    "name_to_handle_at",
    "perf_event_open",
    "bpf",
    "fanotify_init",
    "mbind",
    "move_pages",
    "get_mempolicy",
    "set_mempolicy",
    "set_mempolicy_home_node",
];

/// Refused unless the container has `CAP_SYS_ADMIN`.
const NEED_SYS_ADMIN: &[&str] = &[
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "setns",
    "unshare",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "lsm_set_self_attr",
];

/// The namespace flags of `clone(2)` refused without `CAP_SYS_ADMIN`.
const CLONE_NS_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

/// The profile as OCI `linux.seccomp` JSON. `sys_admin`: the container has `CAP_SYS_ADMIN`.
pub fn profile(sys_admin: bool) -> Value {
    let known: std::collections::HashSet<&str> = crate::oci::seccomp::syscall_names().collect();
    let mut names: Vec<&str> = ALWAYS.to_vec();
    if !sys_admin {
        names.extend_from_slice(NEED_SYS_ADMIN);
    }
    names.retain(|n| known.contains(n));
    let mut syscalls = vec![
        json!({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}),
    ];
    if !sys_admin {
        for f in CLONE_NS_FLAGS {
            syscalls.push(json!({
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM,
                "args": [{"index": 0, "value": f, "valueTwo": f, "op": "SCMP_CMP_MASKED_EQ"}],
            }));
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_for_both_capability_sets() {
        for admin in [false, true] {
            let p: oci_spec::runtime::LinuxSeccomp =
                serde_json::from_value(profile(admin)).expect("valid OCI seccomp");
            let c = crate::oci::seccomp::compile(&p).expect("compiles");
            assert!(!c.programs.is_empty());
        }
        let p = profile(true);
        let text = p.to_string();
        assert!(!text.contains("\"unshare\""), "CAP_SYS_ADMIN may unshare");
        assert!(profile(false).to_string().contains("\"unshare\""));
    }
}
