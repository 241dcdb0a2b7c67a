//! Links the plugins statically (`build-support/static.rs`): each runs for a few milliseconds,
//! of which the dynamic loader was a tenth. Packs the relative relocations where the C library
//! allows (`build-support/relr.rs`).
include!("../build-support/relr.rs");
include!("../build-support/static.rs");

fn main() {
    pack_relative_relocs();
    link_statically(&[
        ("deckhand-bridge", Static::Pie),
        ("deckhand-host-local", Static::Pie),
        ("deckhand-loopback", Static::Pie),
        ("deckhand-portmap", Static::Pie),
    ]);
}
