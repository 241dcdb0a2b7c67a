//! Links `deckhand-monitor` as a static position-dependent executable and `deckhand-runc` as a
//! static position-independent one.
//!
//! One monitor runs per container, so its private memory is the per-container cost. Loading a
//! position-independent Rust binary applies its relative relocations at start-up, which dirties
//! every page of `.data.rel.ro` and the GOT: about 1 MiB of private memory for this binary,
//! against about 260 KiB in total when the linker resolves them (measured with
//! `/proc/<pid>/smaps_rollup`, `Private_Dirty`). The cost is ASLR of the monitor's own image
//! (its heap and stack stay randomised); the monitor parses no input from the container.
//! Static: no loader, C library or libgcc_s mappings (`build-support/static.rs`).
//!
//! deckhand-runc starts two or three times per container operation and keeps its ASLR; the
//! other binaries (the daemons) stay dynamic and pack their relative relocations where the C
//! library allows (`build-support/relr.rs`).
include!("../build-support/relr.rs");
include!("../build-support/static.rs");

fn main() {
    println!("cargo:rustc-link-arg-bin=deckhand-monitor=-no-pie");
    pack_relative_relocs();
    link_statically(&[
        ("deckhand-monitor", Static::NoPie),
        ("deckhand-runc", Static::Pie),
    ]);
}
