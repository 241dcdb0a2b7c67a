//! The user a container runs as: the CRI's run-as fields, else the image's `User`, resolved
//! against the image's `/etc/passwd` and `/etc/group` (read beneath the rootfs, never through
//! a symlink out of it), as containerd does.

use std::io::Read as _;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::Path;

use super::{Error, Result};
use crate::oci::resolve::{self, Create};

/// What to resolve.
#[derive(Debug, Default, Clone)]
pub struct Request<'a> {
    pub run_as_user: Option<i64>,
    pub run_as_username: &'a str,
    pub run_as_group: Option<i64>,
    /// The image's `config.User` (`name`, `uid`, `name:group`, `uid:gid`).
    pub image_user: &'a str,
    pub supplemental_groups: &'a [i64],
}

/// A passwd entry: name, uid, gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A group entry: name, gid, members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

pub fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

pub fn parse_group(text: &str) -> Vec<Group> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Group {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Reads `path` (relative to the rootfs) beneath `rootfs`; a missing file is empty. At most
/// 4 MiB: a hostile image cannot make us read a huge file.
fn read_beneath(rootfs: &Path, path: &str) -> Result<String> {
    let root: OwnedFd = std::fs::File::open(rootfs)
        .map_err(|e| Error::internal(format!("opening rootfs {}", rootfs.display()), e))?
        .into();
    let fd = match resolve::open_beneath(root.as_fd(), Path::new(path), Create::No) {
        Ok(fd) => fd,
        Err(resolve::ResolveError::Io { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT) =>
        {
            return Ok(String::new());
        }
        Err(e) => return Err(Error::InvalidArgument(format!("image {path}: {e}"))),
    };
    let f = std::fs::File::open(resolve::proc_fd_path(&fd))
        .map_err(|e| Error::internal(format!("reading image {path}"), e))?;
    let mut s = String::new();
    f.take(4 << 20)
        .read_to_string(&mut s)
        .map_err(|e| Error::InvalidArgument(format!("image {path}: {e}")))?;
    Ok(s)
}

/// Resolves the request against the image files: (uid, gid, additional gids).
pub fn resolve(rootfs: &Path, req: &Request<'_>) -> Result<(u32, u32, Vec<u32>)> {
    let passwd = parse_passwd(&read_beneath(rootfs, "etc/passwd")?);
    let groups = parse_group(&read_beneath(rootfs, "etc/group")?);
    resolve_with(&passwd, &groups, req)
}

fn id(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} {v} is out of range")))
}

/// [`resolve`] on parsed files.
pub fn resolve_with(
    passwd: &[Passwd],
    groups: &[Group],
    req: &Request<'_>,
) -> Result<(u32, u32, Vec<u32>)> {
    let by_uid = |uid: u32| passwd.iter().find(|p| p.uid == uid);
    let by_name = |n: &str| passwd.iter().find(|p| p.name == n);
    let (uid, mut gid, name) = if let Some(u) = req.run_as_user {
        let uid = id(u, "runAsUser")?;
        let p = by_uid(uid);
        (
            uid,
            p.map(|p| p.gid).unwrap_or(0),
            p.map(|p| p.name.clone()),
        )
    } else if !req.run_as_username.is_empty() {
        let p = by_name(req.run_as_username).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "user {:?} not found in the image's /etc/passwd",
                req.run_as_username
            ))
        })?;
        (p.uid, p.gid, Some(p.name.clone()))
    } else if req.image_user.is_empty() {
        (0, 0, by_uid(0).map(|p| p.name.clone()))
    } else {
        let (u, g) = match req.image_user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (req.image_user, None),
        };
        let (uid, pgid, name) = match u.parse::<u32>() {
            Ok(uid) => {
                let p = by_uid(uid);
                (
                    uid,
                    p.map(|p| p.gid).unwrap_or(0),
                    p.map(|p| p.name.clone()),
                )
            }
            Err(_) => {
                let p = by_name(u).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "image user {u:?} not found in the image's /etc/passwd"
                    ))
                })?;
                (p.uid, p.gid, Some(p.name.clone()))
            }
        };
        let gid = match g {
            None => pgid,
            Some(g) => match g.parse::<u32>() {
                Ok(g) => g,
                Err(_) => {
                    groups
                        .iter()
                        .find(|x| x.name == g)
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "image group {g:?} not found in the image's /etc/group"
                            ))
                        })?
                        .gid
                }
            },
        };
        (uid, gid, name)
    };
    if let Some(g) = req.run_as_group {
        gid = id(g, "runAsGroup")?;
    }
    let mut extra: Vec<u32> = Vec::new();
    if let Some(n) = &name {
        extra.extend(
            groups
                .iter()
                .filter(|g| g.members.iter().any(|m| m == n))
                .map(|g| g.gid),
        );
    }
    for g in req.supplemental_groups {
        extra.push(id(*g, "supplemental group")?);
    }
    extra.sort_unstable();
    extra.dedup();
    extra.retain(|g| *g != gid);
    Ok((uid, gid, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\nstaff:x:50:app,www\napp:x:1000:\n";

    fn r(req: Request<'_>) -> Result<(u32, u32, Vec<u32>)> {
        resolve_with(&parse_passwd(PASSWD), &parse_group(GROUP), &req)
    }

    #[test]
    fn resolves_like_containerd() -> Result<()> {
        assert_eq!(r(Request::default())?, (0, 0, vec![]));
        assert_eq!(
            r(Request {
                image_user: "app",
                ..Default::default()
            })?,
            (1000, 1000, vec![50])
        );
        assert_eq!(
            r(Request {
                image_user: "33:staff",
                ..Default::default()
            })?,
            (33, 50, vec![])
        );
        assert_eq!(
            r(Request {
                run_as_user: Some(1000),
                run_as_group: Some(7),
                supplemental_groups: &[9, 9],
                image_user: "www",
                ..Default::default()
            })?,
            (1000, 7, vec![9, 50])
        );
        assert_eq!(
            r(Request {
                run_as_user: Some(4242),
                ..Default::default()
            })?,
            (4242, 0, vec![])
        );
        assert!(
            r(Request {
                run_as_username: "nobody-here",
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            r(Request {
                run_as_user: Some(-1),
                ..Default::default()
            })
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn reads_beneath_the_rootfs_only() -> Result<()> {
        let t = tempfile::tempdir().map_err(|e| Error::internal("tmp", e))?;
        let root = t.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).map_err(|e| Error::internal("mk", e))?;
        // A symlink pointing out of the rootfs resolves beneath it (to a missing file).
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/group"))
            .map_err(|e| Error::internal("ln", e))?;
        std::fs::write(root.join("etc/passwd"), PASSWD).map_err(|e| Error::internal("w", e))?;
        let got = resolve(
            &root,
            &Request {
                image_user: "app",
                ..Default::default()
            },
        )?;
        // /etc/group -> /etc/passwd of the rootfs itself: parsed as a group file, no
        // membership of 'app'; nothing of the host was read.
        assert_eq!(got.0, 1000);
        Ok(())
    }
}
