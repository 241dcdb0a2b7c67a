//! SPDY/3.1 as Kubernetes uses it (the subset docker/moby spdystream speaks): framing with
//! zlib header compression, and a stream multiplexer.

pub mod conn;
mod dictionary;
pub mod frame;

pub use conn::{ConnOptions, Connection, Role, Stream};
pub use frame::{Frame, Headers, Limits, SpdyError};
