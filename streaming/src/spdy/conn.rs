//! A SPDY/3.1 connection: streams multiplexed over one byte stream.
//!
//! One task reads frames and routes them to streams, one task encodes and writes frames (it owns
//! the compressor, so header blocks are compressed in the order they hit the wire). Streams are
//! `AsyncRead + AsyncWrite`; shutting one down sends FIN (a half-close), dropping it sends FIN if
//! that was not done yet. Reading ends (EOF) at the peer's FIN or RST_STREAM, or when the
//! connection ends; writing to a reset stream fails.
//!
//! Flow control: the Kubernetes peers (docker/moby spdystream) neither send nor honour
//! WINDOW_UPDATE, so neither does this side; backpressure comes from TCP. Each stream buffers at
//! most [`STREAM_BUFFER`] frames; a reader that does not keep up stalls the connection, as it
//! does upstream. WINDOW_UPDATE and SETTINGS from a peer are accepted and ignored.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, PollSender};

use super::frame::{
    FLAG_FIN, FLAG_UNIDIRECTIONAL, Frame, FrameReader, FrameWriter, Headers, Limits, SpdyError, rst,
};

/// Frames buffered per stream before the connection's reader waits for the stream's reader.
pub const STREAM_BUFFER: usize = 16;
/// Largest data frame this side sends.
pub const MAX_WRITE: usize = 32 << 10;
/// Frames queued for the writer task.
const OUT_QUEUE: usize = 64;

/// Which end of the connection this is: clients open odd-numbered streams, servers even ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

enum Out {
    Frame(Frame),
    Close,
}

struct Entry {
    data: Option<mpsc::Sender<Bytes>>,
    reply: Option<oneshot::Sender<Result<Headers, SpdyError>>>,
    reset: Arc<AtomicU32>,
}

struct Shared {
    role: Role,
    tx: mpsc::Sender<Out>,
    streams: Mutex<HashMap<u32, Entry>>,
    next_id: tokio::sync::Mutex<u32>,
    closed: CancellationToken,
    started: Instant,
    last_activity_ms: AtomicU64,
}

impl Shared {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        // A poisoned map only means another task panicked while holding it; the map itself
        // is still consistent (every update is a single insert/remove).
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_peer_id(&self, id: u32) -> bool {
        match self.role {
            Role::Server => !id.is_multiple_of(2),
            Role::Client => id.is_multiple_of(2),
        }
    }
}

/// Options for a connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnOptions {
    pub limits: Limits,
    /// Close the connection after this long without any frame either way.
    pub idle_timeout: Option<Duration>,
}

/// A SPDY connection.
pub struct Connection {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Stream>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Connection {
    /// Starts the reader and writer tasks over `io` (must run inside a tokio runtime).
    pub fn new<IO>(io: IO, role: Role, opts: ConnOptions) -> Connection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            role,
            tx,
            streams: Mutex::new(HashMap::new()),
            next_id: tokio::sync::Mutex::new(if role == Role::Client { 1 } else { 2 }),
            closed: CancellationToken::new(),
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
        });
        let mut tasks = vec![
            tokio::spawn(read_loop(
                FrameReader::new(rd, opts.limits),
                shared.clone(),
                in_tx,
            )),
            tokio::spawn(write_loop(wr, rx, shared.closed.clone(), shared.clone())),
        ];
        if let Some(idle) = opts.idle_timeout {
            tasks.push(tokio::spawn(idle_watch(shared.clone(), idle)));
        }
        Connection {
            shared,
            incoming: tokio::sync::Mutex::new(in_rx),
            tasks: Mutex::new(tasks),
        }
    }

    /// The next stream the peer opened; `None` once the connection is closed.
    pub async fn accept(&self) -> Option<Stream> {
        self.incoming.lock().await.recv().await
    }

    /// Opens a stream and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers, timeout: Duration) -> Result<Stream, SpdyError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let (data_tx, data_rx) = mpsc::channel(STREAM_BUFFER);
        let reset = Arc::new(AtomicU32::new(0));
        let id = {
            let mut next = self.shared.next_id.lock().await;
            let id = *next;
            if id > 0x7fff_ffff {
                return Err(SpdyError::Protocol("stream ids exhausted".into()));
            }
            *next += 2;
            self.shared.streams().insert(
                id,
                Entry {
                    data: Some(data_tx),
                    reply: Some(reply_tx),
                    reset: reset.clone(),
                },
            );
            // Sent while holding the id lock, so ids reach the wire in increasing order.
            self.shared
                .tx
                .send(Out::Frame(Frame::SynStream {
                    stream_id: id,
                    associated_to: 0,
                    priority: 0,
                    flags: 0,
                    headers: headers.clone(),
                }))
                .await
                .map_err(|_| SpdyError::Closed)?;
            id
        };
        let stream = Stream::new(id, headers, self.shared.clone(), data_rx, reset, false);
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(Ok(_))) => Ok(stream),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(SpdyError::Closed),
            Err(_) => Err(SpdyError::Timeout("waiting for the reply to a new stream")),
        }
    }

    /// Resolves when the connection has closed (peer gone, GOAWAY, error, idle, `close`).
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Sends what is queued, a GOAWAY, shuts the write side down and waits (up to `grace`)
    /// for the peer to close its side.
    pub async fn close(&self, grace: Duration) {
        let _ = self.shared.tx.send(Out::Close).await;
        let mut tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        // tasks[0] reads, tasks[1] writes: wait for the writer to finish, then for the peer.
        let wait = async {
            for t in tasks.iter_mut().take(2).rev() {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(grace, wait).await.is_err() {
            tracing::debug!("peer did not close the connection in time");
        }
        self.shared.closed.cancel();
        for t in &tasks {
            t.abort();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.closed.cancel();
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

async fn idle_watch(shared: Arc<Shared>, idle: Duration) {
    loop {
        let last = Duration::from_millis(shared.last_activity_ms.load(Ordering::Relaxed));
        let deadline = shared.started + last + idle;
        if Instant::now() >= deadline {
            tracing::debug!("SPDY connection idle for {idle:?}: closing");
            let _ = shared.tx.send(Out::Close).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shared.closed.cancelled() => return,
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    shared: Arc<Shared>,
    incoming: mpsc::Sender<Stream>,
) {
    let mut last_peer_id = 0u32;
    loop {
        let frame = tokio::select! {
            f = reader.read_frame() => f,
            _ = shared.closed.cancelled() => break,
        };
        shared.touch();
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("SPDY read: {e}");
                let status = if matches!(e, SpdyError::Io(_) | SpdyError::Truncated) {
                    0
                } else {
                    1 // PROTOCOL_ERROR
                };
                let _ = shared.tx.try_send(Out::Frame(Frame::GoAway {
                    last_good_stream_id: last_peer_id,
                    status,
                }));
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                if !shared.is_peer_id(stream_id) || stream_id <= last_peer_id {
                    tracing::debug!("SPDY: invalid stream id {stream_id} from peer");
                    send(&shared, rst_frame(stream_id, rst::PROTOCOL_ERROR)).await;
                    continue;
                }
                last_peer_id = stream_id;
                let (data_tx, data_rx) = mpsc::channel(STREAM_BUFFER);
                let reset = Arc::new(AtomicU32::new(0));
                shared.streams().insert(
                    stream_id,
                    Entry {
                        data: (flags & FLAG_FIN == 0).then_some(data_tx),
                        reply: None,
                        reset: reset.clone(),
                    },
                );
                let stream = Stream::new(
                    stream_id,
                    headers,
                    shared.clone(),
                    data_rx,
                    reset,
                    flags & FLAG_UNIDIRECTIONAL != 0,
                );
                let delivered = tokio::select! {
                    r = incoming.send(stream) => r.is_ok(),
                    _ = shared.closed.cancelled() => break,
                };
                if !delivered {
                    // Nobody accepts streams any more: refuse it.
                    shared.streams().remove(&stream_id);
                    send(&shared, rst_frame(stream_id, rst::REFUSED_STREAM)).await;
                }
            }
            Frame::SynReply {
                stream_id, flags, ..
            } => {
                let mut streams = shared.streams();
                match streams.get_mut(&stream_id) {
                    Some(e) => {
                        if let Some(r) = e.reply.take() {
                            let _ = r.send(Ok(Headers::new()));
                        }
                        if flags & FLAG_FIN != 0 {
                            e.data = None;
                        }
                    }
                    None => tracing::debug!("SPDY: SYN_REPLY for unknown stream {stream_id}"),
                }
            }
            Frame::Headers {
                stream_id, flags, ..
            } => {
                if flags & FLAG_FIN != 0
                    && let Some(e) = shared.streams().get_mut(&stream_id)
                {
                    e.data = None;
                }
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let sender = shared
                    .streams()
                    .get(&stream_id)
                    .and_then(|e| e.data.clone());
                match sender {
                    Some(tx) => {
                        if !data.is_empty() {
                            tokio::select! {
                                // An error means the stream was dropped: discard.
                                _ = tx.send(data) => {}
                                _ = shared.closed.cancelled() => break,
                            }
                        }
                        if flags & FLAG_FIN != 0
                            && let Some(e) = shared.streams().get_mut(&stream_id)
                        {
                            e.data = None;
                        }
                    }
                    None => tracing::trace!("SPDY: data for closed or unknown stream {stream_id}"),
                }
            }
            Frame::RstStream { stream_id, status } => {
                if let Some(mut e) = shared.streams().remove(&stream_id) {
                    e.reset.store(status.max(1), Ordering::Relaxed);
                    if let Some(r) = e.reply.take() {
                        let _ = r.send(Err(SpdyError::Reset(status)));
                    }
                }
            }
            Frame::Ping { id } => {
                // Echo the peer's pings; ours coming back need nothing.
                if shared.is_peer_id(id) {
                    send(&shared, Frame::Ping { id }).await;
                }
            }
            Frame::GoAway { .. } => break,
            Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Unknown { .. } => {}
        }
    }
    // The peer is gone: every stream sees EOF, every pending open fails.
    let entries: Vec<Entry> = shared.streams().drain().map(|(_, e)| e).collect();
    for mut e in entries {
        if let Some(r) = e.reply.take() {
            let _ = r.send(Err(SpdyError::Closed));
        }
    }
    shared.closed.cancel();
}

async fn send(shared: &Shared, frame: Frame) {
    let _ = shared.tx.send(Out::Frame(frame)).await;
}

fn rst_frame(stream_id: u32, status: u32) -> Frame {
    Frame::RstStream { stream_id, status }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    closed: CancellationToken,
    shared: Arc<Shared>,
) {
    let mut enc = FrameWriter::new();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut close = false;
    loop {
        let first = tokio::select! {
            biased;
            m = rx.recv() => m,
            _ = closed.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                Out::Frame(f) => {
                    if let Err(e) = enc.encode(&f, &mut buf) {
                        tracing::warn!("SPDY: cannot encode frame: {e}");
                    }
                }
                Out::Close => {
                    close = true;
                    break;
                }
            }
            if buf.len() >= 256 << 10 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if close {
            let _ = enc.encode(
                &Frame::GoAway {
                    last_good_stream_id: 0,
                    status: 0,
                },
                &mut buf,
            );
        }
        if !buf.is_empty() {
            shared.touch();
            if let Err(e) = wr.write_all(&buf).await {
                tracing::debug!("SPDY write: {e}");
                break;
            }
            buf.clear();
            if let Err(e) = wr.flush().await {
                tracing::debug!("SPDY flush: {e}");
                break;
            }
        }
        if close {
            break;
        }
    }
    let _ = wr.shutdown().await;
    if !close {
        closed.cancel();
    }
}

/// One SPDY stream.
pub struct Stream {
    id: u32,
    headers: Headers,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Bytes>,
    buf: Bytes,
    tx: PollSender<Out>,
    local_closed: bool,
    replied: AtomicBool,
    reset: Arc<AtomicU32>,
}

impl Stream {
    fn new(
        id: u32,
        headers: Headers,
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Bytes>,
        reset: Arc<AtomicU32>,
        local_closed: bool,
    ) -> Stream {
        let tx = PollSender::new(shared.tx.clone());
        Stream {
            id,
            headers,
            shared,
            rx,
            buf: Bytes::new(),
            tx,
            local_closed,
            replied: AtomicBool::new(false),
            reset,
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The headers of the SYN_STREAM that opened this stream.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Accepts a stream the peer opened (sends SYN_REPLY with no headers).
    pub async fn reply(&self) -> Result<(), SpdyError> {
        if self.replied.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        self.shared
            .tx
            .send(Out::Frame(Frame::SynReply {
                stream_id: self.id,
                flags: 0,
                headers: Headers::new(),
            }))
            .await
            .map_err(|_| SpdyError::Closed)
    }

    /// Resets the stream (RST_STREAM with `status`).
    pub async fn reset(mut self, status: u32) {
        self.local_closed = true;
        self.shared.streams().remove(&self.id);
        send(&self.shared, rst_frame(self.id, status)).await;
    }

    /// Writes all of `data` and then half-closes the stream.
    pub async fn write_and_close(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        self.shutdown().await
    }

    fn write_error(&self) -> Option<io::Error> {
        if self.reset.load(Ordering::Relaxed) != 0 {
            Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "stream reset by peer",
            ))
        } else if self.local_closed {
            Some(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))
        } else if self.shared.closed.is_cancelled() {
            Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ))
        } else {
            None
        }
    }
}

fn closed_err() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(this.rx.poll_recv(cx)) {
                Some(b) => this.buf = b,
                // End of stream: FIN, RST or the connection's end. A reset reads as EOF, as
                // in spdystream: upstream's server resets every stream when it is done
                // (after writing the status), so a reset is its normal way of ending.
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.write_error() {
            return Poll::Ready(Err(e));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.tx.poll_reserve(cx)).map_err(|_| closed_err())?;
        let n = data.len().min(MAX_WRITE);
        this.tx
            .send_item(Out::Frame(Frame::Data {
                stream_id: this.id,
                flags: 0,
                data: Bytes::copy_from_slice(&data[..n]),
            }))
            .map_err(|_| closed_err())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames go to the writer task in order; it flushes the socket after every batch.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.local_closed {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = this.write_error() {
            return Poll::Ready(Err(e));
        }
        ready!(this.tx.poll_reserve(cx)).map_err(|_| closed_err())?;
        this.tx
            .send_item(Out::Frame(fin(this.id)))
            .map_err(|_| closed_err())?;
        this.local_closed = true;
        Poll::Ready(Ok(()))
    }
}

fn fin(stream_id: u32) -> Frame {
    Frame::Data {
        stream_id,
        flags: FLAG_FIN,
        data: Bytes::new(),
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.streams().remove(&self.id);
        if self.local_closed || self.shared.closed.is_cancelled() {
            return;
        }
        // Half-close on drop, after whatever this stream already queued.
        if let Err(mpsc::error::TrySendError::Full(m)) =
            self.shared.tx.try_send(Out::Frame(fin(self.id)))
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let tx = self.shared.tx.clone();
            rt.spawn(async move {
                let _ = tx.send(m).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const T: Duration = Duration::from_secs(5);

    fn pair() -> (Connection, Connection) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (
            Connection::new(a, Role::Client, ConnOptions::default()),
            Connection::new(b, Role::Server, ConnOptions::default()),
        )
    }

    #[tokio::test]
    async fn streams_carry_data_both_ways_with_half_close() {
        let (client, server) = pair();
        let srv = tokio::spawn(async move {
            let mut s = server.accept().await.expect("stream");
            assert_eq!(s.headers().get("streamType"), Some("stdin"));
            s.reply().await.expect("reply");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            s.write_and_close(&got).await.expect("echo");
            server
        });
        let mut s = client
            .open(Headers::new().with("streamType", "stdin"), T)
            .await
            .expect("open");
        let big = vec![7u8; 200_000];
        s.write_all(&big).await.expect("write");
        s.shutdown().await.expect("fin");
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, big);
        let _server = srv.await.expect("server task");
    }

    #[tokio::test]
    async fn many_concurrent_streams() {
        let (client, server) = pair();
        let client = Arc::new(client);
        let srv = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Some(mut s) = server.accept().await {
                s.reply().await.expect("reply");
                tasks.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.expect("read");
                    got.reverse();
                    s.write_and_close(&got).await.expect("write");
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        });
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = c.open(Headers::new().with("n", i.to_string()), T).await?;
                let msg: Vec<u8> = (0..1000).map(|j| (j as u8).wrapping_add(i)).collect();
                s.write_and_close(&msg).await?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).await?;
                let mut expect = msg;
                expect.reverse();
                assert_eq!(back, expect);
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("stream");
        }
        client.close(T).await;
        srv.await.expect("server");
    }

    #[tokio::test]
    async fn reset_and_close_are_seen_by_the_peer() {
        let (client, server) = pair();
        let srv = tokio::spawn(async move {
            let s = server.accept().await.expect("stream");
            s.reset(rst::REFUSED_STREAM).await;
            server
        });
        let err = client
            .open(Headers::new().with("a", "b"), T)
            .await
            .err()
            .expect("reset");
        assert!(matches!(err, SpdyError::Reset(3)), "{err}");
        let server = srv.await.expect("server");
        server.close(T).await;
        tokio::time::timeout(T, client.closed())
            .await
            .expect("client sees close");
        assert!(client.open(Headers::new(), T).await.is_err());
    }

    #[tokio::test]
    async fn idle_connections_close() {
        let (a, b) = tokio::io::duplex(1024);
        let opts = ConnOptions {
            idle_timeout: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        let server = Connection::new(b, Role::Server, opts);
        let _client = Connection::new(a, Role::Client, ConnOptions::default());
        tokio::time::timeout(T, server.closed())
            .await
            .expect("idle close");
    }

    #[tokio::test]
    async fn garbage_from_the_peer_closes_the_connection() {
        let (mut a, b) = tokio::io::duplex(1024);
        let server = Connection::new(b, Role::Server, ConnOptions::default());
        a.write_all(&[
            0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
        ])
        .await
        .expect("write");
        tokio::time::timeout(T, server.closed())
            .await
            .expect("closed");
        assert!(server.accept().await.is_none());
    }
}
