//! Packs the binary's relative relocations where the C library allows (`build-support/relr.rs`).
include!("../build-support/relr.rs");

fn main() {
    pack_relative_relocs();
}
