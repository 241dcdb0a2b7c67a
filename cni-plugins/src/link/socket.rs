//! A blocking rtnetlink socket.
//!
//! A plugin makes a handful of requests and exits, so it talks to the kernel over a plain
//! blocking `NETLINK_ROUTE` socket (`netlink-sys`, as re-exported by `rtnetlink`) with the
//! messages `netlink-packet-route` and `rtnetlink`'s builders produce: no async runtime to start,
//! two system calls per request, and independent requests sent together in one `sendmsg`
//! ([`Netlink::batch`]): the kernel handles them in order and acknowledges each.

use std::cell::{Cell, RefCell};

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{Socket, protocols::NETLINK_ROUTE};

/// What went wrong with one netlink request.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The kernel refused the request with this (positive) errno.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
    /// The socket failed.
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel's answer could not be parsed (or a batch was malformed).
    #[error("netlink message: {0}")]
    Decode(String),
}

impl NlError {
    /// The errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel(e) => Some(*e),
            _ => None,
        }
    }
}

/// One request: a message and its `NLM_F_*` flags (`NLM_F_REQUEST` is implied; `NLM_F_ACK` is
/// added to every request that is not a dump, so each one ends with an acknowledgement).
#[derive(Debug, Clone)]
pub struct Request {
    /// The message.
    pub msg: RouteNetlinkMessage,
    /// Extra flags (`NLM_F_CREATE`, `NLM_F_EXCL`, `NLM_F_ECHO`, `NLM_F_DUMP`, ...).
    pub flags: u16,
}

impl Request {
    /// A request with `flags`.
    pub fn new(msg: RouteNetlinkMessage, flags: u16) -> Self {
        Request { msg, flags }
    }
}

/// The replies to one request (without the acknowledgement), or its error.
pub type Reply = Result<Vec<RouteNetlinkMessage>, NlError>;

/// Replies can be large (a link dump); the kernel caps one datagram at 32 KiB by default.
const RECV_BUF: usize = 64 * 1024;

/// A blocking rtnetlink socket, bound to the network namespace it was created in.
#[derive(Debug)]
pub struct Netlink {
    sock: Socket,
    seq: Cell<u32>,
    buf: RefCell<Vec<u8>>,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> std::io::Result<Self> {
        let sock = Socket::new(NETLINK_ROUTE)?;
        // Errors then carry only the failed request's header, not the whole request; dumps are
        // filtered by the kernel (e.g. the addresses of one link only).
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_netlink_get_strict_chk(true);
        Ok(Netlink {
            sock,
            seq: Cell::new(0),
            buf: RefCell::new(Vec::with_capacity(RECV_BUF)),
        })
    }

    /// Sends one request and returns its replies.
    pub fn request(&self, req: Request) -> Reply {
        self.batch(vec![req])?
            .pop()
            .unwrap_or_else(|| Err(NlError::Decode("no reply".into())))
    }

    /// Sends the requests in one `sendmsg` and returns each one's replies, in order. At most one
    /// dump, and only as the last request (the kernel answers dumps in parts as they are read).
    /// The outer error is a socket failure; each request has its own result.
    pub fn batch(&self, reqs: Vec<Request>) -> Result<Vec<Reply>, NlError> {
        let n = reqs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if reqs[..n - 1]
            .iter()
            .any(|r| r.flags & NLM_F_DUMP == NLM_F_DUMP)
        {
            return Err(NlError::Decode(
                "a dump must be the last request of a batch".into(),
            ));
        }
        let first = self.seq.get().wrapping_add(1);
        let mut out = Vec::new();
        for (i, r) in reqs.into_iter().enumerate() {
            let dump = r.flags & NLM_F_DUMP == NLM_F_DUMP;
            let mut m = NetlinkMessage::from(r.msg);
            m.header.flags = NLM_F_REQUEST | r.flags | if dump { 0 } else { NLM_F_ACK };
            m.header.sequence_number = first.wrapping_add(i as u32);
            m.finalize();
            let at = out.len();
            // Messages in one datagram are 4-byte aligned.
            out.resize(at + m.buffer_len().next_multiple_of(4), 0);
            m.serialize(&mut out[at..at + m.buffer_len()]);
        }
        self.seq.set(first.wrapping_add(n as u32 - 1));
        let sent = self.sock.send(&out, 0)?;
        if sent != out.len() {
            return Err(NlError::Decode(format!(
                "short netlink send ({sent} of {})",
                out.len()
            )));
        }

        let mut replies: Vec<Vec<RouteNetlinkMessage>> = (0..n).map(|_| Vec::new()).collect();
        let mut done: Vec<Option<Result<(), NlError>>> = (0..n).map(|_| None).collect();
        let mut pending = n;
        let mut buf = self.buf.borrow_mut();
        while pending > 0 {
            buf.clear();
            let len = self.sock.recv(&mut *buf, nix::libc::MSG_TRUNC)?;
            if len > buf.len() {
                return Err(NlError::Decode(format!(
                    "netlink reply truncated ({len} bytes)"
                )));
            }
            let mut off = 0;
            while off < len {
                let nb = NetlinkBuffer::new_checked(&buf[off..len])
                    .map_err(|e| NlError::Decode(e.to_string()))?;
                let mlen = nb.length() as usize;
                if mlen == 0 || off + mlen > len {
                    return Err(NlError::Decode(format!(
                        "malformed netlink reply (message of {mlen} bytes at {off} of {len})"
                    )));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + mlen])
                    .map_err(|e| NlError::Decode(e.to_string()))?;
                off += mlen.next_multiple_of(4);
                let i = msg.header.sequence_number.wrapping_sub(first) as usize;
                if i >= n || done[i].is_some() {
                    continue; // not ours (or after the end): ignore
                }
                let fin = match msg.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        replies[i].push(m);
                        None
                    }
                    NetlinkPayload::Error(e) => Some(match e.raw_code() {
                        0 => Ok(()),
                        c => Err(NlError::Kernel(c.saturating_abs())),
                    }),
                    NetlinkPayload::Done(d) => Some(match d.code {
                        0 => Ok(()),
                        c => Err(NlError::Kernel(c.saturating_abs())),
                    }),
                    NetlinkPayload::Overrun(_) => {
                        Some(Err(NlError::Decode("netlink overrun".into())))
                    }
                    _ => None,
                };
                if let Some(f) = fin {
                    done[i] = Some(f);
                    pending -= 1;
                }
            }
        }
        Ok(done
            .into_iter()
            .zip(replies)
            .map(|(d, r)| match d {
                Some(Ok(())) | None => Ok(r),
                Some(Err(e)) => Err(e),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};

    #[test]
    fn batches_get_one_answer_each() {
        let nl = Netlink::new().expect("socket");
        let get = |name: &str| {
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(name.into()));
            Request::new(RouteNetlinkMessage::GetLink(m), 0)
        };
        let r = nl
            .batch(vec![get("lo"), get("dh-no-such-link"), get("lo")])
            .expect("batch");
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].as_ref().expect("lo").len(), 1);
        assert_eq!(r[1].as_ref().err().and_then(NlError::errno), Some(19));
        assert_eq!(r[2].as_ref().expect("lo").len(), 1);
        let dump = nl
            .request(Request::new(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            ))
            .expect("dump");
        assert!(!dump.is_empty());
    }
}
