//! `GET /containerLogs`: reading CRI log files.
//!
//! A CRI log line is `<RFC3339Nano time> <stdout|stderr> <P|F> <text>`: `P` marks a partial
//! line that the following pieces of the same stream complete, `F` the last piece. [`Parser`]
//! joins the pieces; [`LogOptions`] are the query parameters (`follow`, `tailLines`,
//! `timestamps`, `sinceSeconds`, `sinceTime`, `limitBytes`, `previous`); [`stream`] writes a
//! file's lines to a channel and, when following, waits for more, moving to the new file when
//! the runtime reopens the log (ReopenContainerLog after a rotation), until the container stops
//! or the reader goes away.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// The query parameters of `/containerLogs`, as upstream's `PodLogOptions`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogOptions {
    /// `follow`: keep streaming new lines until the container stops.
    pub follow: bool,
    /// `tailLines`: only the last N lines.
    pub tail_lines: Option<u64>,
    /// `timestamps`: prefix each line with its time.
    pub timestamps: bool,
    /// `sinceSeconds` / `sinceTime` resolved to a time: lines before it are skipped.
    pub since: Option<Timestamp>,
    /// `limitBytes`: stop after this many bytes of output.
    pub limit_bytes: Option<u64>,
    /// `previous`: the previous instance of the container.
    pub previous: bool,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "1" | "true" | "True" | "TRUE" => Ok(true),
        "0" | "false" | "False" | "FALSE" => Ok(false),
        _ => Err(format!("{name}: {v:?} is not a boolean")),
    }
}

impl LogOptions {
    /// Reads the query's parameters; `now` resolves `sinceSeconds`.
    pub fn from_query(query: &[(String, String)], now: Timestamp) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        let mut since_seconds = None;
        let mut since_time = None;
        for (k, v) in query {
            match k.as_str() {
                "follow" => o.follow = parse_bool(k, v)?,
                "timestamps" => o.timestamps = parse_bool(k, v)?,
                "previous" => o.previous = parse_bool(k, v)?,
                "tailLines" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("tailLines: {v:?} is not a number"))?;
                    // Upstream: a negative tailLines is "all lines".
                    o.tail_lines = u64::try_from(n).ok();
                }
                "limitBytes" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("limitBytes: {v:?} is not a number"))?;
                    if n < 1 {
                        return Err("limitBytes: must be greater than 0".to_string());
                    }
                    o.limit_bytes = u64::try_from(n).ok();
                }
                "sinceSeconds" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("sinceSeconds: {v:?} is not a number"))?;
                    if n < 1 {
                        return Err("sinceSeconds: must be greater than 0".to_string());
                    }
                    since_seconds = Some(n);
                }
                "sinceTime" => {
                    let t: Timestamp = v
                        .parse()
                        .map_err(|e| format!("sinceTime: {v:?} is not an RFC 3339 time: {e}"))?;
                    since_time = Some(t);
                }
                // container, pretty, insecureSkipTLSVerifyBackend...: not the kubelet's concern.
                _ => {}
            }
        }
        if since_seconds.is_some() && since_time.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".to_string());
        }
        if let Some(s) = since_seconds {
            let span = jiff::SignedDuration::from_secs(s);
            o.since = Some(now.checked_sub(span).unwrap_or(Timestamp::MIN));
        }
        if since_time.is_some() {
            o.since = since_time;
        }
        Ok(o)
    }
}

/// The stream a line was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `stdout`.
    Stdout,
    /// `stderr`.
    Stderr,
}

/// One complete log line.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// The time of its first piece, as written.
    pub time: String,
    /// The time, parsed.
    pub timestamp: Timestamp,
    /// The stream.
    pub stream: Stream,
    /// The text with its newline.
    pub text: Vec<u8>,
}

impl LogLine {
    /// The line as `/containerLogs` sends it.
    pub fn render(&self, timestamps: bool) -> Vec<u8> {
        if !timestamps {
            return self.text.clone();
        }
        let mut out = Vec::with_capacity(self.time.len() + 1 + self.text.len());
        out.extend_from_slice(self.time.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.text);
        out
    }
}

/// Joins the pieces of CRI log lines, per stream.
#[derive(Debug, Default)]
pub struct Parser {
    pending: [Option<LogLine>; 2],
}

/// A line of the file that is not in the CRI log format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a CRI log line: {0}")]
pub struct ParseError(String);

impl Parser {
    /// Parses one line of the file (with or without its `\n`); returns the line it completes.
    pub fn push(&mut self, raw: &[u8]) -> Result<Option<LogLine>, ParseError> {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let bad = || ParseError(String::from_utf8_lossy(raw).chars().take(80).collect());
        let mut parts = raw.splitn(3, |b| *b == b' ');
        let time = parts.next().ok_or_else(bad)?;
        let stream = parts.next().ok_or_else(bad)?;
        let rest = parts.next().unwrap_or_default();
        let time = std::str::from_utf8(time).map_err(|_| bad())?;
        let timestamp: Timestamp = time.parse().map_err(|_| bad())?;
        let stream = match stream {
            b"stdout" => Stream::Stdout,
            b"stderr" => Stream::Stderr,
            _ => return Err(bad()),
        };
        // The tag: `P`, `F` or (older runtimes) absent, which is a full line.
        let (partial, text) = match rest.split_first() {
            Some((b'P', t)) if t.is_empty() || t[0] == b' ' => (true, t.get(1..).unwrap_or(&[])),
            Some((b'F', t)) if t.is_empty() || t[0] == b' ' => (false, t.get(1..).unwrap_or(&[])),
            _ => (false, rest),
        };
        let slot = &mut self.pending[stream as usize];
        let mut line = slot.take().unwrap_or_else(|| LogLine {
            time: time.to_string(),
            timestamp,
            stream,
            text: Vec::new(),
        });
        line.text.extend_from_slice(text);
        if partial {
            *slot = Some(line);
            return Ok(None);
        }
        line.text.push(b'\n');
        Ok(Some(line))
    }
}

/// Where the output goes and how much more it may take.
struct Sink {
    tx: mpsc::Sender<Bytes>,
    timestamps: bool,
    left: Option<u64>,
}

impl Sink {
    /// Sends a line; false when the output is done (limit reached or reader gone).
    async fn send(&mut self, line: &LogLine) -> bool {
        let mut out = line.render(self.timestamps);
        if let Some(left) = self.left.as_mut() {
            let n = out.len() as u64;
            if n >= *left {
                out.truncate(usize::try_from(*left).unwrap_or(usize::MAX));
                *left = 0;
                let _ = self.tx.send(Bytes::from(out)).await;
                return false;
            }
            *left -= n;
        }
        self.tx.send(Bytes::from(out)).await.is_ok()
    }
}

/// Whether the container is still running, asked while following.
pub trait Running: Send {
    /// True while more output may come.
    fn running(&mut self) -> impl Future<Output = bool> + Send;
}

/// How often a follower looks for new data, and how many looks between container checks.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
const CHECKS_EVERY: u32 = 5;

struct Reader {
    path: PathBuf,
    inode: u64,
    file: BufReader<tokio::fs::File>,
    /// The start of a line whose `\n` has not been written yet.
    partial: Vec<u8>,
}

impl Reader {
    async fn open(path: &Path) -> std::io::Result<Reader> {
        let file = tokio::fs::File::open(path).await?;
        let inode = file.metadata().await?.ino();
        Ok(Reader {
            path: path.to_path_buf(),
            inode,
            file: BufReader::new(file),
            partial: Vec::new(),
        })
    }

    /// The next complete line, or None at the end of what is written.
    async fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = std::mem::take(&mut self.partial);
        self.file.read_until(b'\n', &mut buf).await?;
        if buf.ends_with(b"\n") {
            return Ok(Some(buf));
        }
        self.partial = buf;
        Ok(None)
    }

    /// Whether the path now names another file (the log was rotated and reopened).
    async fn rotated(&self) -> bool {
        match tokio::fs::metadata(&self.path).await {
            Ok(m) => m.ino() != self.inode,
            Err(_) => false,
        }
    }
}

/// Writes the log at `path` to `tx` per `opts`; when following, until `running` says the
/// container stopped (and everything it wrote was sent) or `tx` is closed.
pub async fn stream(
    path: &Path,
    opts: &LogOptions,
    tx: mpsc::Sender<Bytes>,
    mut running: impl Running,
) -> std::io::Result<()> {
    let mut reader = Reader::open(path).await?;
    let mut parser = Parser::default();
    let mut sink = Sink {
        tx,
        timestamps: opts.timestamps,
        left: opts.limit_bytes,
    };
    let keep = |l: &LogLine| opts.since.is_none_or(|s| l.timestamp >= s);
    // What is written now: all of it, or the last tailLines lines.
    let mut tail: VecDeque<LogLine> = VecDeque::new();
    while let Some(raw) = reader.next().await? {
        let Some(line) = parse(&mut parser, &raw) else {
            continue;
        };
        if !keep(&line) {
            continue;
        }
        match opts.tail_lines {
            Some(0) => {}
            Some(n) => {
                if tail.len() as u64 == n {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            None => {
                if !sink.send(&line).await {
                    return Ok(());
                }
            }
        }
    }
    for line in &tail {
        if !sink.send(line).await {
            return Ok(());
        }
    }
    if !opts.follow {
        return Ok(());
    }
    let mut polls = 0u32;
    let mut stopping = false;
    loop {
        match reader.next().await? {
            Some(raw) => {
                if let Some(line) = parse(&mut parser, &raw)
                    && keep(&line)
                    && !sink.send(&line).await
                {
                    return Ok(());
                }
                continue;
            }
            None if reader.rotated().await => {
                // The runtime writes to the new file now: what it wrote to the old one before
                // reopening is read first.
                while let Some(raw) = reader.next().await? {
                    if let Some(line) = parse(&mut parser, &raw)
                        && keep(&line)
                        && !sink.send(&line).await
                    {
                        return Ok(());
                    }
                }
                reader = Reader::open(path).await?;
                continue;
            }
            None if stopping => return Ok(()),
            None => {}
        }
        if sink.tx.is_closed() {
            return Ok(());
        }
        polls += 1;
        if polls.is_multiple_of(CHECKS_EVERY) && !running.running().await {
            // One more pass for what it wrote just before it stopped.
            stopping = true;
            continue;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

fn parse(parser: &mut Parser, raw: &[u8]) -> Option<LogLine> {
    match parser.push(raw) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("skipping a log line: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:10Z".parse().expect("time")
    }

    #[test]
    fn options_from_the_query() {
        let o = LogOptions::from_query(
            &q(&[
                ("follow", "true"),
                ("tailLines", "3"),
                ("timestamps", "1"),
                ("sinceSeconds", "4"),
                ("limitBytes", "100"),
                ("previous", "false"),
            ]),
            now(),
        )
        .expect("options");
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(o.tail_lines, Some(3));
        assert_eq!(o.limit_bytes, Some(100));
        assert_eq!(o.since, Some("2026-01-01T00:00:06Z".parse().expect("time")));
        let o = LogOptions::from_query(
            &q(&[
                ("sinceTime", "2025-12-31T23:00:00.5+01:00"),
                ("tailLines", "-1"),
            ]),
            now(),
        )
        .expect("options");
        assert_eq!(
            o.since,
            Some("2025-12-31T22:00:00.5Z".parse().expect("time"))
        );
        assert_eq!(o.tail_lines, None);
        for bad in [
            &[("tailLines", "x")][..],
            &[("limitBytes", "0")],
            &[("sinceSeconds", "0")],
            &[("sinceTime", "yesterday")],
            &[("follow", "maybe")],
            &[("sinceSeconds", "1"), ("sinceTime", "2025-12-31T23:00:00Z")],
        ] {
            assert!(LogOptions::from_query(&q(bad), now()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_and_joins_partial_lines() {
        let mut p = Parser::default();
        let t1 = "2026-01-01T00:00:01.000000001Z";
        let line = p
            .push(format!("{t1} stdout F hello world\n").as_bytes())
            .expect("parse")
            .expect("line");
        assert_eq!(line.text, b"hello world\n");
        assert_eq!(line.stream, Stream::Stdout);
        assert_eq!(line.time, t1);
        assert_eq!(
            line.render(true),
            format!("{t1} hello world\n").into_bytes()
        );
        // Pieces of two streams interleaved.
        assert_eq!(p.push(b"2026-01-01T00:00:02Z stdout P abc"), Ok(None));
        assert_eq!(p.push(b"2026-01-01T00:00:02Z stderr P err "), Ok(None));
        let out = p
            .push(b"2026-01-01T00:00:03Z stdout F def\n")
            .expect("parse")
            .expect("line");
        assert_eq!(out.text, b"abcdef\n");
        assert_eq!(out.time, "2026-01-01T00:00:02Z", "the first piece's time");
        let err = p
            .push(b"2026-01-01T00:00:03Z stderr F done")
            .expect("parse")
            .expect("line");
        assert_eq!(
            (err.stream, err.text.as_slice()),
            (Stream::Stderr, &b"err done\n"[..])
        );
        // An empty line, and a line without a tag.
        let empty = p.push(b"2026-01-01T00:00:04Z stdout F ").expect("parse");
        assert_eq!(empty.expect("line").text, b"\n");
        let untagged = p.push(b"2026-01-01T00:00:04Z stdout Xyz").expect("parse");
        assert_eq!(untagged.expect("line").text, b"Xyz\n");
        for bad in [
            &b"garbage"[..],
            b"notatime stdout F x",
            b"2026-01-01T00:00:04Z stdin F x",
        ] {
            assert!(p.push(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Running for Flag {
        async fn running(&mut self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn stopped() -> Flag {
        Flag(Default::default())
    }

    async fn collect(path: &Path, opts: LogOptions) -> String {
        let (tx, mut rx) = mpsc::channel(16);
        let p = path.to_path_buf();
        let task = tokio::spawn(async move { stream(&p, &opts, tx, stopped()).await });
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
        task.await.expect("join").expect("stream");
        String::from_utf8(out).expect("utf-8")
    }

    fn log_file(dir: &Path) -> PathBuf {
        let path = dir.join("0.log");
        let mut text = String::new();
        for i in 1..=5 {
            text.push_str(&format!("2026-01-01T00:00:0{i}Z stdout F line {i}\n"));
        }
        text.push_str("2026-01-01T00:00:06Z stderr P par");
        text.push_str("\n2026-01-01T00:00:06Z stderr F tial\n");
        // A line still being written is not sent.
        text.push_str("2026-01-01T00:00:07Z stdout F unfinish");
        std::fs::write(&path, text).expect("write");
        path
    }

    #[tokio::test]
    async fn tail_since_limit_and_timestamps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = log_file(dir.path());
        let all = collect(&path, LogOptions::default()).await;
        assert_eq!(all, "line 1\nline 2\nline 3\nline 4\nline 5\npartial\n");
        let o = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        assert_eq!(collect(&path, o).await, "line 5\npartial\n");
        let o = LogOptions {
            tail_lines: Some(0),
            ..Default::default()
        };
        assert_eq!(collect(&path, o).await, "");
        let o = LogOptions {
            since: Some("2026-01-01T00:00:04Z".parse().expect("time")),
            tail_lines: Some(10),
            ..Default::default()
        };
        assert_eq!(collect(&path, o).await, "line 4\nline 5\npartial\n");
        let o = LogOptions {
            limit_bytes: Some(10),
            ..Default::default()
        };
        assert_eq!(collect(&path, o).await, "line 1\nlin");
        let o = LogOptions {
            timestamps: true,
            tail_lines: Some(1),
            ..Default::default()
        };
        assert_eq!(collect(&path, o).await, "2026-01-01T00:00:06Z partial\n");
    }

    #[tokio::test]
    async fn follows_across_a_reopen_until_the_container_stops() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-01-01T00:00:01Z stdout F one\n").expect("write");
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, mut rx) = mpsc::channel(16);
        let opts = LogOptions {
            follow: true,
            ..Default::default()
        };
        let (p, f) = (path.clone(), Flag(flag.clone()));
        let task = tokio::spawn(async move { stream(&p, &opts, tx, f).await });
        assert_eq!(rx.recv().await.as_deref(), Some(&b"one\n"[..]));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(b"2026-01-01T00:00:02Z stdout P t")
            .expect("write");
        file.write_all(b"wo\n2026-01-01T00:00:02Z stdout F !\n")
            .expect("write");
        assert_eq!(rx.recv().await.as_deref(), Some(&b"two!\n"[..]));
        // Rotation: the old file moves away, a last line lands in it, the runtime reopens.
        std::fs::rename(&path, dir.path().join("0.log.1")).expect("rename");
        file.write_all(b"2026-01-01T00:00:03Z stdout F three\n")
            .expect("write");
        std::fs::write(&path, "2026-01-01T00:00:04Z stdout F four\n").expect("write");
        assert_eq!(rx.recv().await.as_deref(), Some(&b"three\n"[..]));
        assert_eq!(rx.recv().await.as_deref(), Some(&b"four\n"[..]));
        flag.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(rx.recv().await, None, "ends once the container stopped");
        task.await.expect("join").expect("stream");
    }
}
