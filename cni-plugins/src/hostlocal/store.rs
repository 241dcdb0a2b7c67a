//! host-local's on-disk store, one directory per network under `dataDir`:
//!
//! - `lock`: flock'ed for the whole of every operation, so plugin processes exclude each other;
//! - `<ip>`: one file per reserved address holding `<containerid>\r\n<ifname>` (the reference
//!   plugin's layout);
//! - `last_reserved_ip.<n>`: the allocation cursor of range set `n`;
//! - `attachments/<containerid>@<ifname>`: the addresses of one attachment, one per line, so DEL
//!   and CHECK find them without looking at any other file (`@` cannot occur in a container id).
//!
//! Every operation touches a number of files independent of how many addresses are reserved,
//! except GC, which by nature looks at every reservation.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::CniError;

const ATTACHMENTS_DIR: &str = "attachments";
const CURSOR_PREFIX: &str = "last_reserved_ip.";

/// An exclusively locked network directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> CniError {
    CniError::io(format!("{what} {}: {e}", path.display()))
}

impl Store {
    /// Opens (creating) `data_dir/network` and takes its lock, waiting for other processes.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, CniError> {
        let dir = data_dir.join(network);
        let lock_path = dir.join("lock");
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
        };
        // The directories exist once the lock file does (it is created after them).
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir.join(ATTACHMENTS_DIR))
                    .map_err(|e| io_err("creating", &dir, e))?;
                open()
            }
            r => r,
        }
        .map_err(|e| io_err("opening", &lock_path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("locking", &lock_path, e.into()))?;
        Ok(Store { dir, _lock: lock })
    }

    /// The network directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn index_path(&self, id: &str, ifname: &str) -> PathBuf {
        self.dir
            .join(ATTACHMENTS_DIR)
            .join(format!("{id}@{ifname}"))
    }

    /// Whether `ip` is reserved by anyone.
    pub fn is_reserved(&self, ip: IpAddr) -> Result<bool, CniError> {
        let p = self.ip_path(ip);
        match fs::symlink_metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("checking", &p, e)),
        }
    }

    /// Who holds `ip`: (container id, ifname); `None` if free.
    pub fn owner(&self, ip: IpAddr) -> Result<Option<(String, String)>, CniError> {
        let p = self.ip_path(ip);
        match fs::read_to_string(&p) {
            Ok(s) => Ok(Some(parse_owner(&s))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &p, e)),
        }
    }

    /// Reserves `ip` for the attachment; `false` if it was already taken.
    pub fn reserve(&self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, CniError> {
        let p = self.ip_path(ip);
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(mut f) => {
                f.write_all(format!("{id}\r\n{ifname}").as_bytes())
                    .map_err(|e| io_err("writing", &p, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err("creating", &p, e)),
        }
    }

    /// Frees `ip` if the attachment holds it.
    pub fn release_if_owner(&self, ip: IpAddr, id: &str, ifname: &str) -> Result<(), CniError> {
        match self.owner(ip)? {
            Some((o_id, o_if)) if o_id == id && (o_if == ifname || o_if.is_empty()) => {
                self.remove(&self.ip_path(ip))
            }
            _ => Ok(()),
        }
    }

    fn remove(&self, p: &Path) -> Result<(), CniError> {
        match fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", p, e)),
        }
    }

    /// The cursor of range set `n`.
    pub fn last_reserved(&self, n: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{CURSOR_PREFIX}{n}")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Moves the cursor of range set `n`.
    ///
    /// The cursor is only where the next search starts (the address files are the truth), so it
    /// is overwritten in place rather than replaced: the write lands in the file's existing
    /// block, and ext4 does not force out delayed allocations as it does for a file replaced by
    /// rename or truncated to zero (that flush cost about a millisecond per ADD). A torn write
    /// leaves an unparsable or stale cursor, which only moves where the next search starts.
    pub fn set_last_reserved(&self, n: usize, ip: IpAddr) -> Result<(), CniError> {
        let p = self.dir.join(format!("{CURSOR_PREFIX}{n}"));
        let text = ip.to_string();
        let write = || -> io::Result<()> {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)?;
            std::os::unix::fs::FileExt::write_all_at(&f, text.as_bytes(), 0)?;
            // A longer previous address leaves a tail to cut (never down to zero).
            if f.metadata()?.len() > text.len() as u64 {
                f.set_len(text.len() as u64)?;
            }
            Ok(())
        };
        write().map_err(|e| io_err("writing", &p, e))
    }

    /// The addresses recorded for the attachment (empty if none).
    pub fn attachment(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let p = self.index_path(id, ifname);
        match fs::read_to_string(&p) {
            Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("reading", &p, e)),
        }
    }

    /// Records the attachment's addresses (replacing any record).
    ///
    /// Written in place, with one `write`, before any of the addresses is reserved: a plugin
    /// killed before the write completes leaves an empty or no record and no reservation; one
    /// killed after it leaves a record naming addresses it may not hold, which DEL (owner check)
    /// and GC handle. A temporary file renamed into place would add a file creation to every
    /// ADD and no safety: the lock already keeps readers out, and nothing is fsync'ed either way.
    pub fn set_attachment(&self, id: &str, ifname: &str, ips: &[IpAddr]) -> Result<(), CniError> {
        let text: String = ips.iter().map(|ip| format!("{ip}\n")).collect();
        let p = self.index_path(id, ifname);
        match fs::write(&p, text.as_bytes()) {
            // The attachments directory was removed under us: make it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(self.dir.join(ATTACHMENTS_DIR))
                    .and_then(|()| fs::write(&p, text.as_bytes()))
            }
            r => r,
        }
        .map_err(|e| io_err("writing", &p, e))
    }

    /// Forgets the attachment's record.
    pub fn remove_attachment(&self, id: &str, ifname: &str) -> Result<(), CniError> {
        self.remove(&self.index_path(id, ifname))
    }

    /// Frees every address and record of attachments not in `valid`; returns the freed addresses.
    pub fn gc(&self, valid: &HashSet<(String, String)>) -> Result<Vec<IpAddr>, CniError> {
        let keep = |id: &str, ifname: &str| valid.contains(&(id.to_string(), ifname.to_string()));
        let mut freed = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| io_err("listing", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("listing", &self.dir, e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if let Some((id, ifname)) = self.owner(ip)?
                && !keep(&id, &ifname)
            {
                self.remove(&entry.path())?;
                freed.push(ip);
            }
        }
        let adir = self.dir.join(ATTACHMENTS_DIR);
        for entry in fs::read_dir(&adir).map_err(|e| io_err("listing", &adir, e))? {
            let entry = entry.map_err(|e| io_err("listing", &adir, e))?;
            let name = entry.file_name();
            let Some((id, ifname)) = name.to_str().and_then(|n| n.split_once('@')) else {
                continue;
            };
            if !keep(id, ifname) {
                self.remove(&entry.path())?;
            }
        }
        Ok(freed)
    }
}

/// Parses an address file: `id\r\nifname`, or just `id` from old reference versions.
fn parse_owner(s: &str) -> (String, String) {
    let mut lines = s.lines().map(str::trim);
    let id = lines.next().unwrap_or("").to_string();
    let ifname = lines.next().unwrap_or("").to_string();
    (id, ifname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release_gc() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = Store::open(tmp.path(), "dhnet").expect("open");
        let a: IpAddr = "10.0.0.2".parse().expect("ip");
        let b: IpAddr = "fd00::2".parse().expect("ip");
        assert!(s.reserve(a, "c1", "eth0").expect("reserve"));
        assert!(!s.reserve(a, "c2", "eth0").expect("taken"));
        assert!(s.reserve(b, "c2", "eth0").expect("reserve"));
        assert_eq!(
            fs::read_to_string(s.dir().join("10.0.0.2")).expect("file"),
            "c1\r\neth0"
        );
        assert_eq!(
            s.owner(a).expect("owner"),
            Some(("c1".into(), "eth0".into()))
        );
        s.release_if_owner(a, "c2", "eth0").expect("not owner");
        assert!(s.is_reserved(a).expect("still"));
        s.set_attachment("c1", "eth0", &[a]).expect("index");
        s.set_attachment("c2", "eth0", &[b]).expect("index");
        assert_eq!(s.attachment("c1", "eth0").expect("read"), vec![a]);
        s.set_last_reserved(0, a).expect("cursor");
        assert_eq!(s.last_reserved(0), Some(a));
        // Overwritten in place: a shorter address leaves no tail of the longer one.
        s.set_last_reserved(1, "fd00::1234:5678".parse().expect("ip"))
            .expect("cursor");
        s.set_last_reserved(1, a).expect("cursor");
        assert_eq!(
            fs::read_to_string(s.dir().join("last_reserved_ip.1")).expect("file"),
            "10.0.0.2"
        );
        let valid: HashSet<_> = [("c2".to_string(), "eth0".to_string())].into();
        assert_eq!(s.gc(&valid).expect("gc"), vec![a]);
        assert!(s.attachment("c1", "eth0").expect("read").is_empty());
        assert!(s.is_reserved(b).expect("kept"));
        s.release_if_owner(b, "c2", "eth0").expect("release");
        assert!(!s.is_reserved(b).expect("freed"));
    }
}
