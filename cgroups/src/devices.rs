//! Device rules: the v1 `devices.allow`/`devices.deny` lines and the v2 eBPF device program
//! (`BPF_PROG_TYPE_CGROUP_DEVICE`), assembled by hand and loaded with `bpf(2)`.
//!
//! Semantics (both versions): rules apply in order and a later rule overrides an earlier one, as
//! writing them one by one to v1 `devices.allow`/`devices.deny` does; a cgroup starts out
//! allowing everything (so specs start with a deny-all rule). The eBPF program checks the rules
//! last to first and returns the verdict of the first that matches. An allow rule matches an
//! access only if it grants every requested bit; a deny rule matches if it names any of them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::Error;

pub const ACC_MKNOD: u8 = 1;
pub const ACC_READ: u8 = 2;
pub const ACC_WRITE: u8 = 4;
const ACC_ALL: u8 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// `BPF_DEVCG_DEV_*`.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

/// One normalised device rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// `b`, `c`, or `None` for all.
    pub kind: Option<char>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u8,
}

impl Rule {
    /// Normalises an OCI rule; `None` for rules the device controller does not handle (fifos).
    pub fn from_oci(r: &LinuxDeviceCgroup) -> Result<Option<Rule>, Error> {
        let kind = match r.typ().unwrap_or_default() {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some('b'),
            LinuxDeviceType::C | LinuxDeviceType::U => Some('c'),
            LinuxDeviceType::P => return Ok(None),
        };
        let num = |v: Option<i64>, what: &str| -> Result<Option<u32>, Error> {
            match v {
                None => Ok(None),
                Some(n) if n < 0 => Ok(None), // -1 is "any" in some producers
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| Error::Invalid(format!("device rule {what} {n} out of range"))),
            }
        };
        let access = match r.access().as_deref() {
            None | Some("") => ACC_ALL,
            Some(s) => {
                let mut a = 0;
                for c in s.chars() {
                    a |= match c {
                        'r' => ACC_READ,
                        'w' => ACC_WRITE,
                        'm' => ACC_MKNOD,
                        _ => {
                            return Err(Error::Invalid(format!(
                                "device rule access {s:?}: only r, w and m are allowed"
                            )));
                        }
                    };
                }
                a
            }
        };
        Ok(Some(Rule {
            allow: r.allow(),
            kind,
            major: num(r.major(), "major")?,
            minor: num(r.minor(), "minor")?,
            access,
        }))
    }

    /// The line for v1 `devices.allow` / `devices.deny` (`c 1:3 rwm`, `a *:* rwm`).
    pub fn v1_line(&self) -> String {
        let n = |v: Option<u32>| v.map_or("*".to_string(), |v| v.to_string());
        let mut acc = String::new();
        if self.access & ACC_READ != 0 {
            acc.push('r');
        }
        if self.access & ACC_WRITE != 0 {
            acc.push('w');
        }
        if self.access & ACC_MKNOD != 0 {
            acc.push('m');
        }
        format!(
            "{} {}:{} {}",
            self.kind.unwrap_or('a'),
            n(self.major),
            n(self.minor),
            acc
        )
    }

    /// The v1 file this rule goes to.
    pub fn v1_file(&self) -> &'static str {
        if self.allow {
            "devices.allow"
        } else {
            "devices.deny"
        }
    }
}

/// Normalises a list of OCI rules.
pub fn rules_from_oci(rules: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, Error> {
    let mut out = Vec::new();
    for r in rules {
        if let Some(r) = Rule::from_oci(r)? {
            out.push(r);
        }
    }
    Ok(out)
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}
// Opcodes (class | op | source).
const LDX_MEM_W: u8 = 0x01 | 0x60; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_AND_K: u8 = 0x07 | 0x50;
const ALU64_RSH_K: u8 = 0x07 | 0x70;
const ALU64_MOV_K: u8 = 0x07 | 0xb0;
const ALU64_MOV_X: u8 = 0x07 | 0xb0 | 0x08;
const JMP_JEQ_K: u8 = 0x05 | 0x10;
const JMP_JNE_K: u8 = 0x05 | 0x50;
const JMP_EXIT: u8 = 0x05 | 0x90;

/// Builds the program for `rules`. Registers: r2 = device type, r3 = access bits, r4 = major,
/// r5 = minor (from `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`,
/// `access_type = access << 16 | type`); r6 is scratch; r0 the verdict (1 allow, 0 deny).
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU64_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // The checks of one rule; each jumps past the rule's verdict when it does not match.
        let mut checks: Vec<Insn> = Vec::new();
        if let Some(k) = r.kind {
            let t = if k == 'b' { DEV_BLOCK } else { DEV_CHAR };
            checks.push(insn(JMP_JNE_K, 2, 0, 0, t));
        }
        if r.access != ACC_ALL || !r.allow {
            checks.push(insn(ALU64_MOV_X, 6, 3, 0, 0));
            if r.allow {
                // Any requested bit outside the rule: no match.
                checks.push(insn(ALU64_AND_K, 6, 0, 0, i32::from(!r.access & ACC_ALL)));
                checks.push(insn(JMP_JNE_K, 6, 0, 0, 0));
            } else {
                // No requested bit in the rule: no match.
                checks.push(insn(ALU64_AND_K, 6, 0, 0, i32::from(r.access)));
                checks.push(insn(JMP_JEQ_K, 6, 0, 0, 0));
            }
        }
        if let Some(m) = r.major {
            checks.push(insn(JMP_JNE_K, 4, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            checks.push(insn(JMP_JNE_K, 5, 0, 0, m as i32));
        }
        let n = checks.len();
        for (i, c) in checks.iter_mut().enumerate() {
            if c.code == JMP_JNE_K || c.code == JMP_JEQ_K {
                // Skip the remaining checks and the two verdict instructions.
                c.off = (n - i - 1 + 2) as i16;
            }
        }
        p.extend(checks);
        p.push(insn(ALU64_MOV_K, 0, 0, 0, i32::from(r.allow)));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    // Nothing matched: a cgroup allows what its rules do not take away.
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

/// Interprets [`program`]'s output for one access: for unit tests of the encoding without a
/// kernel (and as the reference of what the kernel computes). `kind` is `b` or `c`.
pub fn simulate(prog: &[Insn], kind: char, major: u32, minor: u32, access: u8) -> bool {
    let t = if kind == 'b' { DEV_BLOCK } else { DEV_CHAR } as u64;
    let ctx = [
        (u64::from(access) << 16) | t,
        u64::from(major),
        u64::from(minor),
    ];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    loop {
        let i = prog[pc];
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        let imm = i.imm as i64 as u64;
        pc += 1;
        match i.code {
            LDX_MEM_W => r[dst] = ctx[(i.off / 4) as usize],
            ALU64_AND_K => r[dst] &= imm,
            ALU64_RSH_K => r[dst] >>= imm,
            ALU64_MOV_K => r[dst] = imm,
            ALU64_MOV_X => r[dst] = r[src],
            JMP_JEQ_K if r[dst] == imm => pc += i.off as usize,
            JMP_JNE_K if r[dst] != imm => pc += i.off as usize,
            JMP_JEQ_K | JMP_JNE_K => {}
            JMP_EXIT => return r[0] == 1,
            c => panic!("unknown opcode {c:#x}"),
        }
    }
}

// bpf(2) commands, program and attach types, flags.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetFdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: `attr` is a live, properly laid out `union bpf_attr` member of the given size;
    // the kernel reads (and for QUERY writes) only within it and the buffers it points to.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

/// Loads `prog` as a cgroup device program; the verifier's log is in the error.
pub fn load(prog: &[Insn]) -> Result<OwnedFd, Error> {
    let license = c"Apache";
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"dh_devices");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd that we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(Error::Bpf(format!(
                "loading the device program: {e}; verifier: {}",
                String::from_utf8_lossy(&log[..end]).trim()
            )))
        }
    }
}

/// The ids of the device programs attached to the cgroup `dir`.
pub fn query(dir: &Path) -> Result<Vec<u32>, Error> {
    let cg = open_dir(dir)?;
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)
        .map_err(|e| Error::Bpf(format!("querying {}: {e}", dir.display())))?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

fn open_dir(dir: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| Error::io("open", dir, None, e))
}

/// Replaces the device programs of the cgroup `dir` by one built from `rules`: the new one is
/// attached (multi mode) before the old ones are detached, so there is no window without rules.
pub fn apply_v2(dir: &Path, rules: &[Rule]) -> Result<(), Error> {
    let old = query(dir)?;
    let prog = load(&program(rules))?;
    let cg = open_dir(dir)?;
    let mut attr = AttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map_err(|e| Error::Bpf(format!("attaching to {}: {e}", dir.display())))?;
    for id in old {
        let mut g = GetFdAttr {
            prog_id: id,
            ..Default::default()
        };
        let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut g) {
            // SAFETY: a new fd owned by us.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(Error::Bpf(format!("program {id}: {e}"))),
        };
        let mut d = AttachAttr {
            target_fd: cg.as_raw_fd() as u32,
            attach_bpf_fd: fd.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_DEVICE,
            ..Default::default()
        };
        match bpf(BPF_PROG_DETACH, &mut d) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(Error::Bpf(format!(
                    "detaching program {id} from {}: {e}",
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    fn oci(
        allow: bool,
        t: LinuxDeviceType,
        maj: Option<i64>,
        min: Option<i64>,
        acc: &str,
    ) -> LinuxDeviceCgroup {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(t)
            .access(acc);
        if let Some(m) = maj {
            b = b.major(m);
        }
        if let Some(m) = min {
            b = b.minor(m);
        }
        b.build().expect("rule")
    }

    fn default_rules() -> Vec<Rule> {
        rules_from_oci(&[
            oci(false, LinuxDeviceType::A, None, None, "rwm"),
            oci(true, LinuxDeviceType::C, Some(1), Some(3), "rwm"),
            oci(true, LinuxDeviceType::C, Some(136), None, "rw"),
            oci(true, LinuxDeviceType::C, Some(1), Some(9), "r"),
            oci(false, LinuxDeviceType::C, Some(136), Some(2), "w"),
            oci(false, LinuxDeviceType::P, None, None, "rwm"),
        ])
        .expect("rules")
    }

    #[test]
    fn v1_lines() {
        let r = default_rules();
        assert_eq!(r.len(), 5, "fifo rule dropped");
        let lines: Vec<_> = r.iter().map(|r| (r.v1_file(), r.v1_line())).collect();
        assert_eq!(
            lines,
            [
                ("devices.deny", "a *:* rwm".to_string()),
                ("devices.allow", "c 1:3 rwm".to_string()),
                ("devices.allow", "c 136:* rw".to_string()),
                ("devices.allow", "c 1:9 r".to_string()),
                ("devices.deny", "c 136:2 w".to_string()),
            ]
        );
    }

    #[test]
    fn program_semantics() {
        let p = program(&default_rules());
        let (r, w, m) = (ACC_READ, ACC_WRITE, ACC_MKNOD);
        assert!(simulate(&p, 'c', 1, 3, r | w));
        assert!(simulate(&p, 'c', 1, 3, m));
        assert!(!simulate(&p, 'c', 1, 5, r), "/dev/zero denied");
        assert!(!simulate(&p, 'b', 1, 3, r), "block 1:3 is another device");
        assert!(simulate(&p, 'c', 136, 7, r | w));
        assert!(!simulate(&p, 'c', 136, 7, m), "pts allow has no m");
        assert!(simulate(&p, 'c', 1, 9, r));
        assert!(!simulate(&p, 'c', 1, 9, r | w), "urandom read-only");
        assert!(simulate(&p, 'c', 136, 2, r), "later deny only covers w");
        assert!(!simulate(&p, 'c', 136, 2, r | w));
        // No rules: everything allowed (a fresh cgroup).
        assert!(simulate(&program(&[]), 'b', 8, 0, r | w | m));
        // A later allow-all overrides an earlier deny-all.
        let all = rules_from_oci(&[
            oci(false, LinuxDeviceType::A, None, None, "rwm"),
            oci(true, LinuxDeviceType::A, None, None, "rwm"),
        ])
        .expect("rules");
        assert!(simulate(&program(&all), 'c', 4, 4, r));
    }

    #[test]
    fn bad_access_rejected() {
        let r = oci(true, LinuxDeviceType::C, Some(1), Some(3), "rx");
        assert!(Rule::from_oci(&r).is_err());
    }
}
