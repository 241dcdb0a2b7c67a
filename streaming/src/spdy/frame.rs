//! SPDY/3.1 frames: parsing and serialisation, with the connection-wide zlib header compression.
//!
//! Every length is checked against [`Limits`] before anything is allocated, so a hostile peer
//! gets an error, never a panic or an unbounded allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::dictionary::HEADER_DICTIONARY;

/// The SPDY version this implementation speaks.
pub const VERSION: u16 = 3;

pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;

/// FLAG_FIN, for control and data frames alike.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL (SYN_STREAM only).
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
}

/// The largest length a frame header can express (24 bits).
pub const MAX_FRAME_LENGTH: usize = (1 << 24) - 1;

/// Size limits applied while reading.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest data frame payload accepted.
    pub max_data_frame: usize,
    /// Largest control frame payload accepted (compressed header blocks included).
    pub max_control_frame: usize,
    /// Largest decompressed header block accepted.
    pub max_header_block: usize,
    /// Most name/value pairs in one header block.
    pub max_header_pairs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_data_frame: 1 << 20,
            max_control_frame: 64 << 10,
            max_header_block: 256 << 10,
            max_header_pairs: 1024,
        }
    }
}

/// Header name/value pairs; names are lower case. A SPDY value holding several NUL-separated
/// values is split into several pairs with the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Adds a pair (the name is lower-cased).
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        /// (flags, id, value)
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this implementation does not know: the spec says to ignore it.
    Unknown {
        frame_type: u16,
    },
}

/// What can go wrong on a SPDY connection.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("{kind} frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        kind: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("malformed header block: {0}")]
    HeaderBlock(String),
    #[error("header compression: {0}")]
    Compression(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection closed")]
    Closed,
    #[error("stream reset by peer (status {0})")]
    Reset(u32),
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

/// Encodes frames; owns the sending direction's zlib stream.
pub struct FrameWriter {
    compress: Compress,
    scratch: Vec<u8>,
}

impl Default for FrameWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameWriter {
    pub fn new() -> Self {
        let mut compress = Compress::new(Compression::default(), true);
        // Cannot fail on a fresh stream: the dictionary must be set before the first byte.
        if let Err(e) = compress.set_dictionary(HEADER_DICTIONARY) {
            tracing::error!("zlib refused the SPDY dictionary: {e}");
        }
        FrameWriter {
            compress,
            scratch: Vec::new(),
        }
    }

    /// Appends the encoding of `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_FRAME_LENGTH {
                    return Err(SpdyError::TooLarge {
                        kind: "data",
                        len: data.len(),
                        limit: MAX_FRAME_LENGTH,
                    });
                }
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                out.put_slice(data);
                Ok(())
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.compress_headers(headers)?;
                let mut p = BytesMut::with_capacity(10 + block.len());
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(associated_to & 0x7fff_ffff);
                p.put_u8((priority & 0x7) << 5);
                p.put_u8(0); // slot
                p.put_slice(&block);
                control(out, TYPE_SYN_STREAM, *flags, &p)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.compress_headers(headers)?;
                let mut p = BytesMut::with_capacity(4 + block.len());
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_slice(&block);
                control(out, TYPE_SYN_REPLY, *flags, &p)
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.compress_headers(headers)?;
                let mut p = BytesMut::with_capacity(4 + block.len());
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_slice(&block);
                control(out, TYPE_HEADERS, *flags, &p)
            }
            Frame::RstStream { stream_id, status } => {
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p[4..].copy_from_slice(&status.to_be_bytes());
                control(out, TYPE_RST_STREAM, 0, &p)
            }
            Frame::Settings { flags, entries } => {
                let mut p = BytesMut::with_capacity(4 + 8 * entries.len());
                p.put_u32(entries.len() as u32);
                for (f, id, value) in entries {
                    p.put_u32((u32::from(*f) << 24) | (id & 0x00ff_ffff));
                    p.put_u32(*value);
                }
                control(out, TYPE_SETTINGS, *flags, &p)
            }
            Frame::Ping { id } => control(out, TYPE_PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
                p[4..].copy_from_slice(&status.to_be_bytes());
                control(out, TYPE_GOAWAY, 0, &p)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut p = [0u8; 8];
                p[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p[4..].copy_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
                control(out, TYPE_WINDOW_UPDATE, 0, &p)
            }
            Frame::Unknown { frame_type } => Err(SpdyError::Protocol(format!(
                "cannot encode a frame of unknown type {frame_type}"
            ))),
        }
    }

    fn compress_headers(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let mut raw = Vec::new();
        // Pairs with the same name are joined with NUL, as SPDY requires unique names.
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in &headers.0 {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        raw.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for name in names {
            let lower = name.to_ascii_lowercase();
            let values: Vec<&str> = headers
                .0
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect();
            let value = values.join("\0");
            raw.extend_from_slice(&(lower.len() as u32).to_be_bytes());
            raw.extend_from_slice(lower.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        self.scratch.clear();
        self.scratch.reserve(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            if self.scratch.capacity() - self.scratch.len() < 64 {
                self.scratch.reserve(256);
            }
            let before_in = self.compress.total_in();
            self.compress
                .compress_vec(input, &mut self.scratch, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            let used = (self.compress.total_in() - before_in) as usize;
            input = &input[used..];
            // A sync flush is complete once all input is consumed and zlib left spare room.
            if input.is_empty() && self.scratch.len() < self.scratch.capacity() {
                break;
            }
        }
        Ok(std::mem::take(&mut self.scratch))
    }
}

fn control(
    out: &mut BytesMut,
    frame_type: u16,
    flags: u8,
    payload: &[u8],
) -> Result<(), SpdyError> {
    if payload.len() > MAX_FRAME_LENGTH {
        return Err(SpdyError::TooLarge {
            kind: "control",
            len: payload.len(),
            limit: MAX_FRAME_LENGTH,
        });
    }
    out.put_u16(0x8000 | VERSION);
    out.put_u16(frame_type);
    out.put_u32((u32::from(flags) << 24) | payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}

/// Decodes frames; owns the receiving direction's zlib stream.
pub struct FrameReader<R> {
    io: R,
    limits: Limits,
    decompress: Decompress,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, limits: Limits) -> Self {
        FrameReader {
            io,
            limits,
            decompress: Decompress::new(true),
        }
    }

    /// Reads the next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        let mut head = [0u8; 8];
        match self.io.read(&mut head[..1]).await? {
            0 => return Ok(None),
            _ => read_exact(&mut self.io, &mut head[1..]).await?,
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            if len > self.limits.max_data_frame {
                return Err(SpdyError::TooLarge {
                    kind: "data",
                    len,
                    limit: self.limits.max_data_frame,
                });
            }
            let mut data = BytesMut::zeroed(len);
            read_exact(&mut self.io, &mut data).await?;
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: data.freeze(),
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        let frame_type = u16::from_be_bytes([head[2], head[3]]);
        if len > self.limits.max_control_frame {
            return Err(SpdyError::TooLarge {
                kind: "control",
                len,
                limit: self.limits.max_control_frame,
            });
        }
        let mut payload = vec![0u8; len];
        read_exact(&mut self.io, &mut payload).await?;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        self.parse_control(frame_type, flags, &payload).map(Some)
    }

    fn parse_control(&mut self, frame_type: u16, flags: u8, p: &[u8]) -> Result<Frame, SpdyError> {
        let mut b = p;
        let need = |b: &[u8], n: usize, what: &'static str| {
            if b.len() < n {
                Err(SpdyError::Malformed(what))
            } else {
                Ok(())
            }
        };
        Ok(match frame_type {
            TYPE_SYN_STREAM => {
                need(b, 10, "SYN_STREAM")?;
                let stream_id = b.get_u32() & 0x7fff_ffff;
                let associated_to = b.get_u32() & 0x7fff_ffff;
                let priority = b.get_u8() >> 5;
                let _slot = b.get_u8();
                if stream_id == 0 {
                    return Err(SpdyError::Malformed("SYN_STREAM (stream 0)"));
                }
                let headers = self.decompress_headers(b)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                need(b, 4, "SYN_REPLY/HEADERS")?;
                let stream_id = b.get_u32() & 0x7fff_ffff;
                let headers = self.decompress_headers(b)?;
                if frame_type == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                if b.len() != 8 {
                    return Err(SpdyError::Malformed("RST_STREAM"));
                }
                Frame::RstStream {
                    stream_id: b.get_u32() & 0x7fff_ffff,
                    status: b.get_u32(),
                }
            }
            TYPE_SETTINGS => {
                need(b, 4, "SETTINGS")?;
                let n = b.get_u32() as usize;
                // The count must match the payload exactly; this also bounds the allocation.
                if n.checked_mul(8) != Some(b.len()) {
                    return Err(SpdyError::Malformed("SETTINGS"));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let fid = b.get_u32();
                    entries.push(((fid >> 24) as u8, fid & 0x00ff_ffff, b.get_u32()));
                }
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                if b.len() != 4 {
                    return Err(SpdyError::Malformed("PING"));
                }
                Frame::Ping { id: b.get_u32() }
            }
            TYPE_GOAWAY => {
                // SPDY/3 adds a status code; accept its absence as SPDY/2 peers did.
                if b.len() != 8 && b.len() != 4 {
                    return Err(SpdyError::Malformed("GOAWAY"));
                }
                let last_good_stream_id = b.get_u32() & 0x7fff_ffff;
                let status = if b.len() == 4 { b.get_u32() } else { 0 };
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }
            TYPE_WINDOW_UPDATE => {
                if b.len() != 8 {
                    return Err(SpdyError::Malformed("WINDOW_UPDATE"));
                }
                Frame::WindowUpdate {
                    stream_id: b.get_u32() & 0x7fff_ffff,
                    delta: b.get_u32() & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown { frame_type: other },
        })
    }

    fn decompress_headers(&mut self, mut input: &[u8]) -> Result<Headers, SpdyError> {
        let limit = self.limits.max_header_block;
        let mut out: Vec<u8> = Vec::with_capacity(input.len().saturating_mul(4).min(limit) + 16);
        // Until all input is consumed and zlib has no output left (it did not fill the room).
        loop {
            if out.len() >= limit {
                return Err(SpdyError::TooLarge {
                    kind: "header block",
                    len: out.len(),
                    limit,
                });
            }
            if out.capacity() == out.len() {
                out.reserve((out.len()).clamp(64, limit - out.len()));
            }
            // Never let zlib write past the limit.
            let room = (limit - out.len()).min(out.capacity() - out.len());
            let before_in = self.decompress.total_in();
            let before_out = self.decompress.total_out();
            let start = out.len();
            out.resize(start + room, 0);
            let res = self
                .decompress
                .decompress(input, &mut out[start..], FlushDecompress::Sync);
            let produced = (self.decompress.total_out() - before_out) as usize;
            out.truncate(start + produced);
            let used = (self.decompress.total_in() - before_in) as usize;
            input = &input[used..];
            match res {
                Ok(Status::Ok) | Ok(Status::BufError) => {
                    if input.is_empty() && produced < room {
                        break;
                    }
                    if used == 0 && produced == 0 {
                        return Err(SpdyError::Compression("no progress".into()));
                    }
                }
                Ok(Status::StreamEnd) => {
                    return Err(SpdyError::Compression(
                        "zlib stream ended inside a header block".into(),
                    ));
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.decompress
                        .set_dictionary(HEADER_DICTIONARY)
                        .map_err(|e| SpdyError::Compression(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Compression(e.to_string())),
            }
        }
        parse_header_block(&out, self.limits.max_header_pairs)
    }
}

async fn read_exact<R: AsyncRead + Unpin>(io: &mut R, buf: &mut [u8]) -> Result<(), SpdyError> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(SpdyError::Truncated),
        Err(e) => Err(SpdyError::Io(e)),
    }
}

/// Parses an uncompressed header block.
pub(crate) fn parse_header_block(mut b: &[u8], max_pairs: usize) -> Result<Headers, SpdyError> {
    let bad = |m: &str| SpdyError::HeaderBlock(m.to_string());
    if b.len() < 4 {
        return Err(bad("missing pair count"));
    }
    let n = b.get_u32() as usize;
    if n > max_pairs {
        return Err(bad(&format!("{n} pairs exceed the limit of {max_pairs}")));
    }
    let mut headers = Headers::new();
    for _ in 0..n {
        let name = take_string(&mut b).ok_or_else(|| bad("truncated name"))?;
        if name.is_empty() {
            return Err(bad("empty header name"));
        }
        let value = take_string(&mut b).ok_or_else(|| bad("truncated value"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| bad("header name is not UTF-8"))?
            .to_ascii_lowercase();
        let value = std::str::from_utf8(value).map_err(|_| bad("header value is not UTF-8"))?;
        if headers.0.iter().any(|(n, _)| *n == name) {
            return Err(bad(&format!("duplicate header name {name:?}")));
        }
        for v in value.split('\0') {
            headers.0.push((name.clone(), v.to_string()));
        }
    }
    if !b.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(headers)
}

fn take_string<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    if b.len() < 4 {
        return None;
    }
    let len = b.get_u32() as usize;
    if b.len() < len {
        return None;
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_all(frames: &[Frame]) -> BytesMut {
        let mut w = FrameWriter::new();
        let mut out = BytesMut::new();
        for f in frames {
            w.encode(f, &mut out).expect("encode");
        }
        out
    }

    async fn decode_all(bytes: &[u8], limits: Limits) -> Result<Vec<Frame>, SpdyError> {
        let mut r = FrameReader::new(bytes, limits);
        let mut frames = Vec::new();
        while let Some(f) = r.read_frame().await? {
            frames.push(f);
        }
        Ok(frames)
    }

    fn sample() -> Vec<Frame> {
        vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 3,
                flags: FLAG_FIN,
                headers: Headers::new()
                    .with("streamType", "error")
                    .with("x", "a")
                    .with("x", "b"),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 3,
                flags: 0,
                headers: Headers::new().with("streamtype", "stdout"),
            },
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            },
            Frame::Settings {
                flags: 1,
                entries: vec![(0, 7, 65536), (1, 4, 100)],
            },
            Frame::Ping { id: 42 },
            Frame::GoAway {
                last_good_stream_id: 7,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 3,
                delta: 1000,
            },
        ]
    }

    #[tokio::test]
    async fn round_trip_every_frame_type() {
        let frames = sample();
        let bytes = encode_all(&frames);
        let decoded = decode_all(&bytes, Limits::default()).await.expect("decode");
        assert_eq!(decoded, frames);
    }

    #[tokio::test]
    async fn header_compression_shares_state_and_uses_dictionary() {
        // The second identical header block compresses to far less than the first, because
        // the zlib stream is shared by the connection; the first already benefits from the
        // dictionary (common words like "content-type" cost almost nothing).
        let h = Headers::new()
            .with("content-type", "text/plain")
            .with("streamtype", "stdout");
        let mut w = FrameWriter::new();
        let a = w.compress_headers(&h).expect("compress");
        let b = w.compress_headers(&h).expect("compress");
        assert!(b.len() < a.len(), "{} !< {}", b.len(), a.len());
        // The stream announces a preset dictionary (FDICT) whose Adler-32 is the SPDY one's.
        assert_eq!(a[1] & 0x20, 0x20, "FDICT bit set");
        let adler = u32::from_be_bytes([a[2], a[3], a[4], a[5]]);
        assert_eq!(adler, adler32(HEADER_DICTIONARY));
        // A decompressor without the dictionary cannot read it; ours can.
        let mut plain = Decompress::new(true);
        let mut out = vec![0u8; 1024];
        let err = plain
            .decompress(&a, &mut out, FlushDecompress::Sync)
            .expect_err("needs the dictionary");
        assert!(err.needs_dictionary().is_some());
    }

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[tokio::test]
    async fn large_and_repeated_header_blocks_round_trip() {
        // Blocks that decompress to far more than their compressed size (the output buffer
        // fills and grows several times), followed by small ones on the same zlib stream.
        let mut frames = Vec::new();
        for i in 0..6u32 {
            let value = format!("{i}").repeat(if i % 2 == 0 { 100_000 } else { 3 });
            frames.push(Frame::Headers {
                stream_id: 2 * i + 1,
                flags: 0,
                headers: Headers::new().with("big", value).with("n", i.to_string()),
            });
        }
        let bytes = encode_all(&frames);
        let decoded = decode_all(&bytes, Limits::default()).await.expect("decode");
        assert_eq!(decoded, frames);
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let bytes = encode_all(&sample());
        for cut in [1, 5, 9, 20, bytes.len() - 1] {
            let res = decode_all(&bytes[..cut], Limits::default()).await;
            assert!(res.is_err(), "cut at {cut} accepted");
        }
    }

    #[tokio::test]
    async fn oversized_frames_are_rejected_before_allocation() {
        // A data frame announcing 16 MiB - 1 with a 1 MiB limit.
        let head = [0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        let err = decode_all(&head, Limits::default())
            .await
            .expect_err("too large");
        assert!(
            matches!(err, SpdyError::TooLarge { kind: "data", .. }),
            "{err}"
        );
        // A control frame above the control limit.
        let head = [0x80, 3, 0, 1, 0, 0x10, 0, 0];
        let err = decode_all(&head, Limits::default())
            .await
            .expect_err("too large");
        assert!(
            matches!(
                err,
                SpdyError::TooLarge {
                    kind: "control",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn decompression_bomb_is_capped() {
        // A header block of one huge value: compresses to almost nothing.
        let h = Headers::new().with("x", "a".repeat(2 << 20));
        let mut w = FrameWriter::new();
        let mut out = BytesMut::new();
        w.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h,
            },
            &mut out,
        )
        .expect("encode");
        assert!(out.len() < 64 << 10);
        let err = decode_all(&out, Limits::default()).await.expect_err("bomb");
        assert!(
            matches!(
                err,
                SpdyError::TooLarge {
                    kind: "header block",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn malformed_control_frames_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            // wrong version
            vec![0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1],
            // PING with 3 bytes
            vec![0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1],
            // RST_STREAM too short
            vec![0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1],
            // SETTINGS claiming 2^32-1 entries
            vec![0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
            // SYN_STREAM with stream id 0 and no header block
            vec![0x80, 3, 0, 1, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // SYN_STREAM with garbage instead of zlib
            vec![
                0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
            ],
            // WINDOW_UPDATE too long
            vec![0x80, 3, 0, 9, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0, 1, 0],
        ];
        for (i, c) in cases.iter().enumerate() {
            let res = decode_all(c, Limits::default()).await;
            assert!(res.is_err(), "case {i} accepted: {res:?}");
        }
    }

    #[tokio::test]
    async fn unknown_control_frames_are_skipped() {
        let bytes = [0x80, 3, 0, 0x42, 0, 0, 0, 2, 9, 9];
        let frames = decode_all(&bytes, Limits::default()).await.expect("decode");
        assert_eq!(frames, vec![Frame::Unknown { frame_type: 0x42 }]);
    }

    #[test]
    fn hostile_header_blocks() {
        // Count far above the limit.
        assert!(parse_header_block(&[0xff, 0xff, 0xff, 0xff], 1024).is_err());
        // Name length beyond the block.
        assert!(parse_header_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff], 1024).is_err());
        // Empty name.
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], 1024).is_err());
        // Duplicate names.
        let dup = [
            0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 0, 0,
        ];
        assert!(parse_header_block(&dup, 1024).is_err());
        // Trailing bytes.
        assert!(parse_header_block(&[0, 0, 0, 0, 1], 1024).is_err());
        // A valid block with a multi-value header.
        let ok = [0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 3, b'x', 0, b'y'];
        let h = parse_header_block(&ok, 1024).expect("valid");
        assert_eq!(
            h.0,
            vec![
                ("a".to_string(), "x".to_string()),
                ("a".to_string(), "y".to_string())
            ]
        );
    }
}
