//! `deckhand-loopback`: the CNI loopback plugin (see `deckhand_cni::loopback`).

fn main() -> std::process::ExitCode {
    deckhand_cni::plugin::run(&deckhand_cni::loopback::Loopback)
}
