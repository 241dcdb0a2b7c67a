//! The CRI container log format: `<RFC3339Nano> <stream> <P|F> <content>\n`, one record per
//! line, long lines split at [`MAX_LINE`] bytes with the `P` (partial) tag on all but the last.

use std::io::{self, Write};
use std::time::SystemTime;

/// The largest content of one record (the kubelet's 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

/// Splits one stream into CRI records; keeps the unfinished line between reads.
#[derive(Debug)]
pub struct LineWriter {
    stream: &'static str,
    pending: Vec<u8>,
}

impl LineWriter {
    pub fn new(stream: &'static str) -> LineWriter {
        LineWriter {
            stream,
            pending: Vec::new(),
        }
    }

    fn record(&self, out: &mut impl Write, now: &str, tag: char, content: &[u8]) -> io::Result<()> {
        let mut line = Vec::with_capacity(now.len() + self.stream.len() + content.len() + 5);
        line.extend_from_slice(now.as_bytes());
        line.push(b' ');
        line.extend_from_slice(self.stream.as_bytes());
        line.push(b' ');
        line.push(tag as u8);
        line.push(b' ');
        line.extend_from_slice(content);
        line.push(b'\n');
        out.write_all(&line)
    }

    /// Feeds bytes read from the stream; writes every complete (or full-size) line.
    pub fn feed(&mut self, out: &mut impl Write, data: &[u8], at: SystemTime) -> io::Result<()> {
        self.pending.extend_from_slice(data);
        let now = super::time::rfc3339_nanos(at);
        let mut start = 0;
        loop {
            let rest = &self.pending[start..];
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) if i <= MAX_LINE => {
                    self.record(out, &now, 'F', &rest[..i])?;
                    start += i + 1;
                }
                _ if rest.len() >= MAX_LINE => {
                    self.record(out, &now, 'P', &rest[..MAX_LINE])?;
                    start += MAX_LINE;
                }
                _ => break,
            }
        }
        self.pending.drain(..start);
        Ok(())
    }

    /// At EOF: what is left is a partial line.
    pub fn finish(&mut self, out: &mut impl Write, at: SystemTime) -> io::Result<()> {
        if !self.pending.is_empty() {
            let now = super::time::rfc3339_nanos(at);
            let p = std::mem::take(&mut self.pending);
            self.record(out, &now, 'P', &p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn splits_lines_and_tags_partials() {
        let t = UNIX_EPOCH + Duration::new(1_475_713_029, 669_794_202);
        let mut out = Vec::new();
        let mut w = LineWriter::new("stdout");
        w.feed(&mut out, b"hello\nwor", t).expect("feed");
        w.feed(&mut out, b"ld\n", t).expect("feed");
        let big = vec![b'x'; MAX_LINE + 3];
        w.feed(&mut out, &big, t).expect("feed");
        w.feed(&mut out, b"\nend", t).expect("feed");
        w.finish(&mut out, t).expect("finish");
        let s = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "2016-10-06T00:17:09.669794202Z stdout F hello");
        assert_eq!(lines[1], "2016-10-06T00:17:09.669794202Z stdout F world");
        assert!(lines[2].starts_with("2016-10-06T00:17:09.669794202Z stdout P xxx"));
        assert_eq!(lines[2].len(), 31 + 9 + MAX_LINE);
        assert_eq!(lines[3], "2016-10-06T00:17:09.669794202Z stdout F xxx");
        assert_eq!(lines[4], "2016-10-06T00:17:09.669794202Z stdout P end");
    }
}
