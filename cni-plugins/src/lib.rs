//! `deckhand-cni`: the CNI 1.1 library (plugin side and runtime side) and Deckhand's plugins
//! (`deckhand-bridge`, `deckhand-host-local`, `deckhand-loopback`, `deckhand-portmap`).
//!
//! - [`types`], [`error`], [`version`]: the wire types of the CNI spec 1.1 (configurations,
//!   results of every version from 0.3.0 with conversion, the error JSON and its codes).
//! - [`plugin`]: the plugin side: implement [`plugin::Plugin`] and make `main` call
//!   [`plugin::run`]; [`plugin::Request::delegate_add`] and friends run an IPAM plugin.
//! - [`runtime`]: the runtime side, as libcni: loading configuration directories,
//!   ADD/DEL/CHECK/GC/STATUS over a plugin chain, the result cache, per-container locking,
//!   blocking and async entry points.
//! - [`hostlocal`]: the `deckhand-host-local` IPAM plugin; [`ipam`]: address arithmetic,
//!   `resolv.conf` parsing and requested addresses, for any IPAM plugin.
//! - [`netns`], [`link`], [`firewall`]: entering network namespaces, links and addresses over
//!   rtnetlink, and the firewall rules of the bridge and portmap plugins.
//! - [`bridge`], [`portmap`], [`loopback`]: the other plugins; each binary in `src/bin` is a
//!   `main` that calls [`plugin::run`] with one of them.

pub mod bridge;
pub mod error;
pub mod firewall;
pub mod hostlocal;
pub mod ipam;
pub mod link;
pub mod loopback;
pub mod netns;
pub mod plugin;
pub mod portmap;
pub mod runtime;
pub mod types;
pub mod version;

pub use error::{CniError, Error, ErrorCode};
pub use plugin::{Command, Plugin, Request};
pub use types::{CniResult, NetConf, NetConfList};
pub use version::CniVersion;
