//! `deckhand-portmap`: the CNI portmap plugin (see `deckhand_cni::portmap`).

fn main() -> std::process::ExitCode {
    deckhand_cni::plugin::run(&deckhand_cni::portmap::PortMapPlugin)
}
