//! Packs the binary's relative relocations where the C library allows (`build-support/relr.rs`).
include!("../build-support/relr.rs");

fn main() {
    println!("cargo:rerun-if-changed=../build-support/relr.rs");
    pack_relative_relocs();
}
