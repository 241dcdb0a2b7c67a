// Included by the build scripts of the crates whose short-lived or per-container binaries are
// linked statically (`include!`, after `relr.rs`, whose `gnu_linux_target` and
// `glibc_at_least` it uses).
//
// A dynamically linked binary pays for the loader on every start and for the C library's
// mappings for its whole life: mapping ld.so, libc and libgcc_s, resolving their symbols, and
// the private pages their relocations and data dirty, about 65 KiB per process (measured on 30
// deckhand-monitors with /proc/<pid>/smaps: Pss 164 KiB and Private_Dirty 134 KiB each when
// dynamic, 100 and 68 KiB static). That is per container for the monitor, and a fifth of a
// CNI plugin's or deckhand-runc's start-up time. None of these binaries uses what a static glibc cannot do (NSS lookups, dlopen).
//
// Cargo has no per-binary `crt-static`, and rustc links std against `-lgcc_s -lc -lm …` in
// dynamic mode (`-Wl,-Bdynamic`) whatever the link arguments. So each static binary gets
// `-static` or `-static-pie` plus, first on its library path, a directory in which those names
// are linker scripts naming the static archives (`libgcc_s.so` → `libgcc_eh.a`, `libc.so` →
// `libc.a`, …); the linker takes the first match on its path. Only for glibc 2.34 and later
// (libpthread, librt, libdl and libutil are part of libc.a), and only where the C compiler
// finds every archive (libc6-dev, libgcc's dev package): otherwise the binary stays dynamic.

/// How a binary is linked when it can be linked statically.
#[allow(dead_code)]
enum Static {
    /// Position-independent (`-static-pie`): the image keeps its ASLR.
    Pie,
    /// Position-dependent (`-static`, for a binary already linked with `-no-pie`).
    NoPie,
}

/// Links `bins` statically if the target and the build host allow it (see above).
fn link_statically(bins: &[(&str, Static)]) {
    println!("cargo:rerun-if-changed=../build-support/static.rs");
    if !gnu_linux_target() || !glibc_at_least(2, 34) {
        return;
    }
    let Some(dir) = static_lib_dir() else {
        println!("cargo:warning=static C library not found: linking dynamically");
        return;
    };
    for (bin, how) in bins {
        println!("cargo:rustc-link-arg-bin={bin}=-L{}", dir.display());
        let flag = match how {
            Static::Pie => "-static-pie",
            Static::NoPie => "-static",
        };
        println!("cargo:rustc-link-arg-bin={bin}={flag}");
    }
}

/// Writes the directory of linker scripts; `None` if an archive is missing.
fn static_lib_dir() -> Option<std::path::PathBuf> {
    let cc = std::env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".to_string());
    let find = |name: &str| -> Option<String> {
        let out = std::process::Command::new(&cc)
            .arg(format!("-print-file-name={name}"))
            .output()
            .ok()?;
        let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
        // Not found: the compiler echoes the bare name.
        let p = std::fs::canonicalize(&path).ok()?;
        (path.contains('/') && p.is_file()).then(|| p.to_string_lossy().into_owned())
    };
    let eh = find("libgcc_eh.a")?;
    let mut scripts = vec![
        ("libgcc_s.so".to_string(), format!("INPUT(\"{eh}\")\n")),
        (
            "libc.so".to_string(),
            format!("GROUP(\"{}\" \"{eh}\")\n", find("libc.a")?),
        ),
    ];
    for lib in ["m", "pthread", "rt", "dl", "util"] {
        let archive = find(&format!("lib{lib}.a"))?;
        scripts.push((format!("lib{lib}.so"), format!("INPUT(\"{archive}\")\n")));
    }
    let dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR")?).join("static-libc");
    std::fs::create_dir_all(&dir).ok()?;
    for (name, text) in scripts {
        std::fs::write(dir.join(name), text).ok()?;
    }
    Some(dir)
}
