//! The content store: blobs named by their SHA-256 digest.
//!
//! A blob is written to `ingest/` under a unique temporary name while its digest is computed,
//! fsynced, compared with the digest (and size) it must have, and only then renamed to
//! `blobs/sha256/<hex>` (and the directory fsynced). A blob present under its name is therefore
//! always complete and verified; a download killed half-way leaves only a temporary file, which
//! [`ContentStore::open`] removes.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use super::{ImageError, IoContext, Result};

/// A validated `sha256:<64 lowercase hex>` digest (the only algorithm accepted: it is also a safe
/// file name).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Digest> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl Digest {
    /// Parses and validates a digest.
    pub fn parse(s: &str) -> Result<Digest> {
        let bad = |reason: &str| ImageError::InvalidDigest {
            digest: s.to_string(),
            reason: reason.to_string(),
        };
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("only sha256 digests are supported"))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(bad("expected 64 lowercase hex digits"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(format!("sha256:{:x}", Sha256::digest(data)))
    }

    /// From a finished hasher.
    pub fn from_hasher(h: Sha256) -> Digest {
        Digest(format!("sha256:{:x}", h.finalize()))
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Blobs under `<root>/blobs/sha256`.
#[derive(Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique suffix for temporary names (process id, a counter, the time).
pub(crate) fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// fsyncs a directory (so a rename or unlink inside it is durable).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("fsync {}", dir.display()))
}

impl ContentStore {
    /// Opens (creating) the store under `root`; removes partial downloads left by a crash.
    pub fn open(root: &Path) -> Result<ContentStore> {
        let blobs = root.join("blobs").join("sha256");
        let ingest = root.join("ingest");
        std::fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
        if ingest.exists() {
            std::fs::remove_dir_all(&ingest).ctx(|| format!("cleaning {}", ingest.display()))?;
        }
        std::fs::create_dir_all(&ingest).ctx(|| format!("creating {}", ingest.display()))?;
        Ok(ContentStore { blobs, ingest })
    }

    /// Where the blob lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether the blob is present (and so complete and verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a present blob.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Starts writing a blob that must have `digest` (and `size`, when known).
    pub fn writer(&self, digest: &Digest, size: Option<u64>, what: &str) -> Result<BlobWriter> {
        let tmp = self
            .ingest
            .join(format!("{}.{}", digest.hex(), unique_suffix()));
        let file = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        Ok(BlobWriter {
            file: std::io::BufWriter::with_capacity(256 * 1024, file),
            tmp,
            dest: self.path(digest),
            blobs: self.blobs.clone(),
            digest: digest.clone(),
            hasher: Sha256::new(),
            written: 0,
            size,
            what: what.to_string(),
            done: false,
        })
    }

    /// Writes a whole blob held in memory (manifests, indexes).
    pub fn put(&self, digest: &Digest, data: &[u8], what: &str) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut w = self.writer(digest, Some(data.len() as u64), what)?;
        w.write(data)?;
        w.commit()
    }

    /// Reads a small blob, verifying it again (configs, manifests).
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.path(digest);
        let data = std::fs::read(&path).ctx(|| format!("reading blob {digest}"))?;
        let actual = Digest::of(&data);
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("stored blob {}", path.display()),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(data)
    }

    /// Every blob present.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for e in
            std::fs::read_dir(&self.blobs).ctx(|| format!("listing {}", self.blobs.display()))?
        {
            let e = e.ctx(|| format!("listing {}", self.blobs.display()))?;
            if let Some(name) = e.file_name().to_str()
                && let Ok(d) = Digest::parse(&format!("sha256:{name}"))
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Deletes a blob; returns the bytes freed.
    pub fn delete(&self, digest: &Digest) -> Result<u64> {
        let path = self.path(digest);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ImageError::io(format!("removing blob {digest}"), e)),
        }
    }
}

/// A blob being written; [`BlobWriter::commit`] verifies and publishes it, dropping it without
/// committing removes the temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    file: std::io::BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    blobs: PathBuf,
    digest: Digest,
    hasher: Sha256,
    written: u64,
    size: Option<u64>,
    what: String,
    done: bool,
}

impl BlobWriter {
    /// Appends data; fails as soon as more than the announced size arrives.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.written += data.len() as u64;
        if let Some(size) = self.size
            && self.written > size
        {
            return Err(ImageError::SizeMismatch {
                what: self.what.clone(),
                expected: size,
                actual: self.written,
            });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .ctx(|| format!("writing {}", self.tmp.display()))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes, fsyncs, verifies size and digest, renames into place.
    pub fn commit(mut self) -> Result<()> {
        if let Some(size) = self.size
            && self.written != size
        {
            return Err(ImageError::SizeMismatch {
                what: self.what.clone(),
                expected: size,
                actual: self.written,
            });
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.digest {
            return Err(ImageError::DigestMismatch {
                what: self.what.clone(),
                expected: self.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_all())
            .ctx(|| format!("syncing {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest)
            .ctx(|| format!("renaming {} into place", self.tmp.display()))?;
        self.done = true;
        sync_dir(&self.blobs)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_validation() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::parse(d.as_str()).ok(), Some(d.clone()));
        assert!(Digest::parse("sha256:../../etc").is_err());
        assert!(Digest::parse(&d.as_str().to_uppercase()).is_err());
        assert!(Digest::parse("sha512:00").is_err());
    }

    #[test]
    fn verified_write_and_rejection() {
        let dir = tempfile::Builder::new()
            .prefix("dh-content-")
            .tempdir()
            .expect("tempdir");
        let cs = ContentStore::open(dir.path()).expect("open");
        let d = Digest::of(b"hello");
        cs.put(&d, b"hello", "test").expect("put");
        assert_eq!(cs.read(&d).expect("read"), b"hello");

        let wrong = Digest::of(b"other");
        let err = cs.put(&wrong, b"hello", "test").expect_err("mismatch");
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!cs.contains(&wrong));
        let mut w = cs.writer(&wrong, Some(5), "test").expect("writer");
        let err = w.write(b"other!").expect_err("size");
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        drop(w);
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .expect("ingest")
                .count(),
            0,
            "no temporary file is left behind"
        );
    }
}
