//! A directory of small JSON records, one file per key, each written atomically (temporary
//! file, fsync, rename, fsync of the directory): a crash leaves the old record or the new one.
//! Used by the image metadata and by the pod and container records.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, de::DeserializeOwned};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// One directory of `<key>.json` records.
#[derive(Debug, Clone)]
pub struct RecordDir {
    dir: PathBuf,
}

fn ctx(what: String) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl RecordDir {
    /// Opens (creating) `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<RecordDir> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(ctx(format!("creating {}", dir.display())))?;
        Ok(RecordDir { dir })
    }

    /// The records in `dir`, which must exist.
    pub fn at(dir: impl Into<PathBuf>) -> RecordDir {
        RecordDir { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Every record, removing temporary files a crash left and moving corrupt records aside
    /// (`.corrupt`) with a warning.
    pub fn load<T: DeserializeOwned>(&self) -> std::io::Result<Vec<T>> {
        let d = &self.dir;
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).map_err(ctx(format!("listing {}", d.display())))? {
            let e = e.map_err(ctx(format!("listing {}", d.display())))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "corrupt record moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        Ok(out)
    }

    /// Writes the record `key` atomically and durably.
    pub fn write<T: Serialize>(&self, key: &str, value: &T) -> std::io::Result<()> {
        let dest = self.dir.join(format!("{key}.json"));
        let tmp = self.dir.join(format!(
            ".tmp-{key}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let json = serde_json::to_vec_pretty(value)
            .map_err(|e| std::io::Error::other(format!("encoding {}: {e}", dest.display())))?;
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map_err(ctx(format!("writing {}", dest.display())))?;
        self.sync()
    }

    /// Deletes the record `key`; a missing record is not an error.
    pub fn delete(&self, key: &str) -> std::io::Result<()> {
        let path = self.dir.join(format!("{key}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ctx(format!("removing {}", path.display()))(e)),
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        std::fs::File::open(&self.dir)
            .and_then(|f| f.sync_all())
            .map_err(ctx(format!("fsync {}", self.dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct R {
        k: String,
        n: u32,
    }

    #[test]
    fn round_trip_and_corruption() -> std::io::Result<()> {
        let t = tempfile::tempdir()?;
        let d = RecordDir::open(t.path().join("r"))?;
        d.write(
            "a",
            &R {
                k: "a".into(),
                n: 1,
            },
        )?;
        d.write(
            "a",
            &R {
                k: "a".into(),
                n: 2,
            },
        )?;
        d.write(
            "b",
            &R {
                k: "b".into(),
                n: 3,
            },
        )?;
        std::fs::write(d.path().join("c.json"), b"{not json")?;
        std::fs::write(d.path().join(".tmp-x-1-2"), b"partial")?;
        let mut all: Vec<R> = d.load()?;
        all.sort_by(|a, b| a.k.cmp(&b.k));
        assert_eq!(
            all,
            vec![
                R {
                    k: "a".into(),
                    n: 2
                },
                R {
                    k: "b".into(),
                    n: 3
                }
            ]
        );
        assert!(d.path().join("c.corrupt").exists());
        assert!(!d.path().join(".tmp-x-1-2").exists());
        d.delete("a")?;
        d.delete("a")?;
        assert_eq!(d.load::<R>()?.len(), 1);
        Ok(())
    }
}
