//! Snapshots (one unpacked layer per directory, keyed by chain ID) and the overlayfs mounts
//! composed from them.
//!
//! `snapshots/<chain-id-hex>` holds exactly one layer (an overlayfs lowerdir). It is unpacked
//! into `snapshots/.tmp-<hex>-<unique>` and renamed into place when complete and synced, so a
//! snapshot directory that exists is complete; temporary directories are removed on open.
//! A container's rootfs is the chain's snapshots as lowerdirs (top first) with a fresh
//! `containers/<id>/{upper,work}`.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::content::{Digest, sync_dir, unique_suffix};
use super::{ImageError, IoContext, Result};

/// How to mount a rootfs: an overlayfs, or a read-only bind of a single layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// `overlay` or `bind`.
    pub fstype: String,
    /// The lower directories, topmost first.
    pub lowerdirs: Vec<PathBuf>,
    /// The writable upper directory (none for a read-only view).
    pub upperdir: Option<PathBuf>,
    /// overlayfs' work directory (with `upperdir`).
    pub workdir: Option<PathBuf>,
    /// Read-only.
    pub readonly: bool,
}

impl MountSpec {
    /// The overlayfs mount options (`lowerdir=...,upperdir=...,workdir=...`), or none for a bind.
    pub fn options(&self) -> Option<String> {
        if self.fstype != "overlay" {
            return None;
        }
        let lowers: Vec<String> = self
            .lowerdirs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut o = format!("lowerdir={}", lowers.join(":"));
        if let (Some(u), Some(w)) = (&self.upperdir, &self.workdir) {
            o.push_str(&format!(
                ",upperdir={},workdir={}",
                u.display(),
                w.display()
            ));
        }
        Some(o)
    }

    /// Mounts the rootfs on `target` (an existing directory).
    pub fn mount(&self, target: &Path) -> Result<()> {
        let ctx = || format!("mounting rootfs on {}", target.display());
        if let Some(opts) = self.options() {
            if opts.len() >= 4000 {
                return Err(ImageError::io(
                    ctx(),
                    std::io::Error::other("too many layers for one overlayfs mount option page"),
                ));
            }
            let mut flags = MsFlags::empty();
            if self.readonly {
                flags |= MsFlags::MS_RDONLY;
            }
            nix::mount::mount(
                Some("overlay"),
                target,
                Some("overlay"),
                flags,
                Some(opts.as_str()),
            )
            .ctx(ctx)
        } else {
            let src = self
                .lowerdirs
                .first()
                .ok_or_else(|| ImageError::io(ctx(), std::io::Error::other("no layer")))?;
            nix::mount::mount(
                Some(src.as_path()),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(ctx)?;
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .ctx(ctx)
        }
    }
}

/// Unmounts a rootfs mounted with [`MountSpec::mount`] (lazily, so a busy mount goes away when
/// released). Not mounted is not an error.
pub fn unmount(target: &Path) -> Result<()> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(ImageError::io(
            format!("unmounting {}", target.display()),
            e,
        )),
    }
}

/// The chain IDs of a list of diff_ids: `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Snapshot and container directories.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    containers: PathBuf,
}

impl Snapshots {
    /// Opens (creating) `root/snapshots` and `root/containers`, removing unfinished unpacks.
    pub fn open(root: &Path) -> Result<Snapshots> {
        let dir = root.join("snapshots");
        let containers = root.join("containers");
        for d in [&dir, &containers] {
            std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }
        for e in std::fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                std::fs::remove_dir_all(e.path())
                    .ctx(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(Snapshots { dir, containers })
    }

    /// The directory of a snapshot.
    pub fn path(&self, chain_id: &Digest) -> PathBuf {
        self.dir.join(chain_id.hex())
    }

    /// Whether the snapshot is complete.
    pub fn exists(&self, chain_id: &Digest) -> bool {
        self.path(chain_id).is_dir()
    }

    /// A fresh temporary directory for unpacking `chain_id`.
    pub fn temp_dir(&self, chain_id: &Digest) -> Result<TempSnapshot> {
        let path = self
            .dir
            .join(format!(".tmp-{}-{}", chain_id.hex(), unique_suffix()));
        std::fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?;
        Ok(TempSnapshot {
            path,
            dest: self.path(chain_id),
            parent: self.dir.clone(),
            done: false,
        })
    }

    /// Every complete snapshot.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).ctx(|| format!("listing {}", self.dir.display()))? {
            let e = e.ctx(|| format!("listing {}", self.dir.display()))?;
            if let Some(n) = e.file_name().to_str()
                && let Ok(d) = Digest::parse(&format!("sha256:{n}"))
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Removes a snapshot (renamed aside first so a crash never leaves a half-deleted snapshot
    /// under its name).
    pub fn remove(&self, chain_id: &Digest) -> Result<()> {
        let p = self.path(chain_id);
        if !p.exists() {
            return Ok(());
        }
        let aside = self
            .dir
            .join(format!(".tmp-rm-{}-{}", chain_id.hex(), unique_suffix()));
        std::fs::rename(&p, &aside).ctx(|| format!("removing {}", p.display()))?;
        std::fs::remove_dir_all(&aside).ctx(|| format!("removing {}", aside.display()))
    }

    /// The mount spec of a rootfs over `chain` (bottom first): read-only (`upper` = None) or with
    /// the given upper/work directories.
    pub fn spec(&self, chain: &[Digest], upper: Option<(PathBuf, PathBuf)>) -> MountSpec {
        let lowerdirs: Vec<PathBuf> = chain.iter().rev().map(|c| self.path(c)).collect();
        match upper {
            Some((u, w)) => MountSpec {
                fstype: "overlay".into(),
                lowerdirs,
                upperdir: Some(u),
                workdir: Some(w),
                readonly: false,
            },
            None if lowerdirs.len() == 1 => MountSpec {
                fstype: "bind".into(),
                lowerdirs,
                upperdir: None,
                workdir: None,
                readonly: true,
            },
            None => MountSpec {
                fstype: "overlay".into(),
                lowerdirs,
                upperdir: None,
                workdir: None,
                readonly: true,
            },
        }
    }

    /// The container's directory.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }

    /// Creates fresh upper/work directories for a container.
    pub fn create_container(&self, id: &str) -> Result<(PathBuf, PathBuf)> {
        let d = self.container_dir(id);
        if d.exists() {
            // Left by a crash between this and recording the container: start afresh.
            std::fs::remove_dir_all(&d).ctx(|| format!("removing {}", d.display()))?;
        }
        let (u, w) = (d.join("upper"), d.join("work"));
        for p in [&u, &w] {
            std::fs::create_dir_all(p).ctx(|| format!("creating {}", p.display()))?;
        }
        sync_dir(&self.containers)?;
        Ok((u, w))
    }

    /// Removes a container's directories.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let d = self.container_dir(id);
        match std::fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io(format!("removing {}", d.display()), e)),
        }
    }
}

/// A snapshot being unpacked; removed on drop unless committed.
#[derive(Debug)]
pub struct TempSnapshot {
    /// Where to unpack.
    pub path: PathBuf,
    dest: PathBuf,
    parent: PathBuf,
    done: bool,
}

impl TempSnapshot {
    /// Renames the finished snapshot into place. If another unpack of the same chain won the
    /// race, this one is discarded.
    pub fn commit(mut self) -> Result<()> {
        match std::fs::rename(&self.path, &self.dest) {
            Ok(()) => {
                self.done = true;
                sync_dir(&self.parent)
            }
            Err(_) if self.dest.is_dir() => Ok(()),
            Err(e) => Err(ImageError::io(
                format!("renaming {} into place", self.path.display()),
                e,
            )),
        }
    }
}

impl Drop for TempSnapshot {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn overlay_options() {
        let s = MountSpec {
            fstype: "overlay".into(),
            lowerdirs: vec!["/l2".into(), "/l1".into()],
            upperdir: Some("/u".into()),
            workdir: Some("/w".into()),
            readonly: false,
        };
        assert_eq!(
            s.options().as_deref(),
            Some("lowerdir=/l2:/l1,upperdir=/u,workdir=/w")
        );
    }
}
