//! `deckhand-bridge`: the CNI bridge plugin (see `deckhand_cni::bridge`).

fn main() -> std::process::ExitCode {
    deckhand_cni::plugin::run(&deckhand_cni::bridge::BridgePlugin)
}
