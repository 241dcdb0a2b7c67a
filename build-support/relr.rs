// Included by the build scripts of the crates that ship binaries (`include!`): one copy of the
// rule, no extra crate.
//
// Packs the binaries' relative relocations as DT_RELR (`-z pack-relative-relocs`) when the C
// library supports it. A position-independent Rust binary carries tens of thousands of them: in
// the classic `.rela.dyn` table, 24 bytes each (about 1 MiB for deckhand-cri), which the loader
// reads in full at start-up and which then stays resident for the life of the process; as RELR a
// few KiB. The loader must know DT_RELR (glibc 2.36 and later): the linker then records a
// dependency on the version `GLIBC_ABI_DT_RELR`, so an older C library refuses the binary at
// start with a clear message instead of running it unrelocated. Older build hosts and other
// targets get the classic table.

/// Emits the link argument for every binary of the crate being built, if the target's C
/// library (here: the build host's, as Deckhand is built on the node it runs on) is glibc 2.36
/// or later.
fn pack_relative_relocs() {
    println!("cargo:rerun-if-changed=../build-support/relr.rs");
    if gnu_linux_target() && glibc_at_least(2, 36) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the crate is built for Linux with glibc.
fn gnu_linux_target() -> bool {
    std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
}

/// The build host's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.trim().trim_start_matches("glibc ").split('.');
    let num = |p: Option<&str>| p.and_then(|s| s.parse::<u32>().ok());
    match (num(v.next()), num(v.next())) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}
