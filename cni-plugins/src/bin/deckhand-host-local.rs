//! `deckhand-host-local`: the host-local IPAM plugin (see `deckhand_cni::hostlocal`).

fn main() -> std::process::ExitCode {
    deckhand_cni::plugin::run(&deckhand_cni::hostlocal::HostLocal)
}
