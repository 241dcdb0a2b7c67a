//! OCI seccomp profiles compiled to BPF with `seccompiler` (pure Rust; no libseccomp).
//!
//! seccompiler's filter has one match action, the OCI profile one action per rule. A profile
//! becomes a few filters that the kernel combines by precedence (KILL > TRAP > ERRNO > TRACE >
//! LOG > ALLOW): one filter matching the union of all rules with `ALLOW` and the default action
//! otherwise, and one per other (action, errno) group returning that action on a match and
//! `ALLOW` otherwise. A syscall matched by no rule gets the default action; one matched by a
//! rule gets the rule's action (the most severe, when several rules match).
//! Conditions follow runc: the conditions of a rule are ANDed, unless they all name the same
//! argument, when they are ORed (separate rules). Names unknown on this architecture are
//! skipped (as runc does) and reported. Only the native architecture is filtered; other
//! architectures listed in the profile (x86, x32) are killed by seccompiler's arch check.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use syscalls::Sysno;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// A compiled profile: the BPF programs to install, in order, and warnings.
#[derive(Debug, Default)]
pub struct Compiled {
    pub programs: Vec<BpfProgram>,
    pub warnings: Vec<String>,
}

/// The names of all syscalls known on this architecture (the `syscalls` crate's table).
pub fn syscall_names() -> impl Iterator<Item = &'static str> {
    Sysno::iter().map(|s| s.name())
}

/// The number of a syscall on this architecture.
pub fn syscall_nr(name: &str) -> Option<i64> {
    name.parse::<Sysno>().ok().map(|s| i64::from(s.id()))
}

fn action(
    a: LinuxSeccompAction,
    errno: Option<u32>,
    default_errno: Option<u32>,
) -> Result<SeccompAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.or(default_errno).unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => {
            SeccompAction::Trace(errno.or(default_errno).unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported".into());
        }
    })
}

fn condition(a: &LinuxSeccompArg) -> Result<SeccompCondition, String> {
    let op = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => SeccompCmpOp::Ne,
        LinuxSeccompOperator::ScmpCmpLt => SeccompCmpOp::Lt,
        LinuxSeccompOperator::ScmpCmpLe => SeccompCmpOp::Le,
        LinuxSeccompOperator::ScmpCmpEq => SeccompCmpOp::Eq,
        LinuxSeccompOperator::ScmpCmpGe => SeccompCmpOp::Ge,
        LinuxSeccompOperator::ScmpCmpGt => SeccompCmpOp::Gt,
        LinuxSeccompOperator::ScmpCmpMaskedEq => SeccompCmpOp::MaskedEq(a.value()),
    };
    let value = match a.op() {
        LinuxSeccompOperator::ScmpCmpMaskedEq => a.value_two().unwrap_or(0),
        _ => a.value(),
    };
    let index = u8::try_from(a.index())
        .map_err(|_| format!("seccomp argument index {} out of range", a.index()))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("seccomp condition: {e}"))
}

/// The rules (ORed) for one OCI syscall entry's arguments.
fn rules(args: Option<&Vec<LinuxSeccompArg>>) -> Result<Vec<SeccompRule>, String> {
    let Some(args) = args.filter(|a| !a.is_empty()) else {
        return Ok(Vec::new());
    };
    let same_index = args.iter().all(|a| a.index() == args[0].index());
    let mk = |conds: Vec<SeccompCondition>| {
        SeccompRule::new(conds).map_err(|e| format!("seccomp rule: {e}"))
    };
    if same_index && args.len() > 1 {
        args.iter().map(|a| mk(vec![condition(a)?])).collect()
    } else {
        Ok(vec![mk(args
            .iter()
            .map(condition)
            .collect::<Result<_, _>>()?)?])
    }
}

type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Compiles an OCI seccomp profile.
pub fn compile(profile: &LinuxSeccomp) -> Result<Compiled, String> {
    let mut out = Compiled::default();
    if let Some(archs) = profile.architectures() {
        let native = serde_json::to_value(archs).unwrap_or_default().to_string();
        let want = if cfg!(target_arch = "x86_64") {
            "SCMP_ARCH_X86_64"
        } else {
            "SCMP_ARCH_AARCH64"
        };
        if !archs.is_empty() && !native.contains(want) {
            return Err(format!(
                "seccomp profile does not list the native architecture {want}"
            ));
        }
    }
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        out.warnings.push("seccomp flags are ignored".into());
    }
    let default = action(profile.default_action(), None, profile.default_errno_ret())?;
    // Rules grouped by action; `unconditional` tracks syscalls matched with no condition.
    let mut all: RuleMap = BTreeMap::new();
    let mut unconditional_all: Vec<i64> = Vec::new();
    let mut groups: Vec<(SeccompAction, RuleMap, Vec<i64>)> = Vec::new();
    let mut unknown = Vec::new();
    for sc in profile.syscalls().iter().flatten() {
        let act = action(sc.action(), sc.errno_ret(), profile.default_errno_ret())?;
        if act == default {
            continue;
        }
        let rs = rules(sc.args().as_ref())?;
        for name in sc.names() {
            let Some(nr) = syscall_nr(name) else {
                unknown.push(name.clone());
                continue;
            };
            merge(&mut all, &mut unconditional_all, nr, &rs);
            if act != SeccompAction::Allow {
                let idx = match groups.iter().position(|(a, _, _)| *a == act) {
                    Some(i) => i,
                    None => {
                        groups.push((act.clone(), BTreeMap::new(), Vec::new()));
                        groups.len() - 1
                    }
                };
                let (_, map, unc) = &mut groups[idx];
                merge(map, unc, nr, &rs);
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        out.warnings.push(format!(
            "seccomp: syscalls unknown on this architecture ignored: {}",
            unknown.join(" ")
        ));
    }
    let build = |map: RuleMap,
                 mismatch: SeccompAction,
                 matched: SeccompAction|
     -> Result<BpfProgram, String> {
        let f = SeccompFilter::new(map, mismatch, matched, ARCH)
            .map_err(|e| format!("seccomp filter: {e}"))?;
        f.try_into()
            .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))
    };
    if default != SeccompAction::Allow {
        out.programs
            .push(build(all, default.clone(), SeccompAction::Allow)?);
    }
    for (act, map, _) in groups {
        if default == act {
            continue;
        }
        out.programs.push(build(map, SeccompAction::Allow, act)?);
    }
    // The default action alone with nothing matching: one filter that returns it always.
    if out.programs.is_empty() && default != SeccompAction::Allow {
        out.programs
            .push(build(BTreeMap::new(), default, SeccompAction::Allow)?);
    }
    Ok(out)
}

/// Adds `rules` for `nr`; an empty rule list (unconditional) overrides conditional ones.
fn merge(map: &mut RuleMap, unconditional: &mut Vec<i64>, nr: i64, rules: &[SeccompRule]) {
    if unconditional.contains(&nr) {
        return;
    }
    if rules.is_empty() {
        unconditional.push(nr);
        map.insert(nr, Vec::new());
    } else {
        map.entry(nr).or_default().extend(rules.iter().cloned());
    }
}

/// Installs one BPF program on the calling thread (without setting no_new_privs: the caller
/// decides; without it the caller needs CAP_SYS_ADMIN).
pub fn install(prog: &BpfProgram) -> std::io::Result<()> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    let fprog = SockFprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr(),
    };
    // SAFETY: fprog points at a valid program that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const SockFprog,
        )
    };
    super::cvt(r).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("profile")
    }

    #[test]
    fn compiles_allowlist_and_denylist() {
        let deny = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_AARCH64"],
                "syscalls":[{"names":["mkdir","mkdirat","nosuchcall"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                            {"names":["personality"],"action":"SCMP_ACT_KILL","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"},{"index":0,"value":131072,"op":"SCMP_CMP_EQ"}]},
                            {"names":["clone"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        );
        let c = compile(&deny).expect("compile");
        assert_eq!(c.programs.len(), 2, "one filter per non-allow action");
        assert!(c.warnings.iter().any(|w| w.contains("nosuchcall")));

        let allow = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "syscalls":[{"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
                            {"names":["ptrace"],"action":"SCMP_ACT_LOG"}]}"#,
        );
        let c = compile(&allow).expect("compile");
        assert_eq!(c.programs.len(), 2);
        assert!(syscall_nr("read").is_some() && syscall_nr("nosuchcall").is_none());
    }
}
