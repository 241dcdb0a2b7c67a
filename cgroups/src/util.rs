//! Small-file I/O on cgroupfs with errors that name the file.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::Error;

/// Writes `value` to `dir/name` in one `write(2)`, without creating the file (cgroupfs files
/// exist or the controller is not there).
pub(crate) fn write(dir: &Path, name: &str, value: &str) -> Result<(), Error> {
    let path = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, Some(value), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| Error::io("write", &path, Some(value), e))
}

pub(crate) fn read(dir: &Path, name: &str) -> Result<String, Error> {
    let path = dir.join(name);
    fs::read_to_string(&path).map_err(|e| Error::io("read", &path, None, e))
}

/// Reads a file that may be absent (controller not enabled, older kernel): `Ok(None)` then.
pub(crate) fn read_opt(dir: &Path, name: &str) -> Result<Option<String>, Error> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", &path, None, e)),
    }
}

/// A single number, `max` (or `-1`) read as `None`.
pub(crate) fn parse_limit(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" || s == "-1" {
        return None;
    }
    s.parse().ok()
}

pub(crate) fn read_u64_opt(dir: &Path, name: &str) -> Result<Option<u64>, Error> {
    Ok(read_opt(dir, name)?.and_then(|s| s.trim().parse().ok()))
}

/// The value of `key` in a flat keyed file (`memory.stat`, `cpu.stat`, `memory.events`, ...).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok()))?
    })
}

pub(crate) fn exists(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}

/// Every directory beneath `dir` (included), deepest first, for removal.
pub(crate) fn subtree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(d.to_path_buf());
    }
    if dir.is_dir() {
        walk(dir, &mut out);
    }
    out
}

/// The pids in `cgroup.procs` of `dir` and every cgroup beneath it.
pub(crate) fn procs_recursive(dir: &Path) -> Result<Vec<i32>, Error> {
    let mut pids = Vec::new();
    for d in subtree_deepest_first(dir) {
        match read_opt(&d, "cgroup.procs")? {
            Some(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
            None => continue,
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}
