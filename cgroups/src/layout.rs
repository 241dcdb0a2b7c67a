//! Where the cgroup hierarchies are: detected from `/proc/self/mountinfo` at run time.

use std::path::{Path, PathBuf};

use super::{Error, util};

/// Which cgroup setup the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only v1 hierarchies.
    Legacy,
    /// v1 hierarchies for (most) controllers plus a cgroup2 tree (usually `/sys/fs/cgroup/unified`)
    /// that tracks processes and holds whatever controllers no v1 hierarchy took.
    Hybrid,
    /// One cgroup2 tree with every controller.
    Unified,
}

/// A mounted v1 hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Hierarchy {
    pub mountpoint: PathBuf,
    /// Its controllers (`cpu`, `cpuacct`, ...) and named hierarchies as `name=systemd`.
    pub controllers: Vec<String>,
}

/// The cgroup hierarchies of the host (or of a fake tree in tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub v1: Vec<V1Hierarchy>,
    /// The cgroup2 mount, if any.
    pub unified: Option<PathBuf>,
    /// Controllers available in the cgroup2 tree (its root's `cgroup.controllers`): every one in
    /// pure v2; in hybrid mode only those no v1 hierarchy is bound to (e.g. `hugetlb`).
    pub v2_controllers: Vec<String>,
    /// This process's own cgroup per hierarchy, from `/proc/self/cgroup`: `("cpu,cpuacct",
    /// "/user.slice")`, `("", "/...")` for v2. Used for relative cgroupsPaths.
    pub own: Vec<(String, String)>,
}

const V1_SKIP_OPTS: &[&str] = &[
    "rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
];

impl Layout {
    /// The host's layout, from `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn detect() -> Result<Layout, Error> {
        let mi = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("read", Path::new("/proc/self/mountinfo"), None, e))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| Error::io("read", Path::new("/proc/self/cgroup"), None, e))?;
        let mut l = Self::from_mountinfo(&mi)?;
        l.own = parse_proc_cgroup(&own);
        Ok(l)
    }

    /// Parses mountinfo text; reads the cgroup2 root's `cgroup.controllers`.
    pub fn from_mountinfo(mountinfo: &str) -> Result<Layout, Error> {
        let mut v1: Vec<V1Hierarchy> = Vec::new();
        let mut unified: Option<PathBuf> = None;
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 5 || post.len() < 3 {
                continue;
            }
            let (root, mountpoint) = (pre[3], unescape(pre[4]));
            // Bind mounts of a sub-tree (root != "/") are not a hierarchy's root: skip them, the
            // real mount (or none, inside a cgroup namespace where "/" is the namespace root) wins.
            if root != "/" {
                continue;
            }
            match post[0] {
                "cgroup2" if unified.is_none() => unified = Some(PathBuf::from(mountpoint)),
                "cgroup" => {
                    let controllers: Vec<String> = post[2]
                        .split(',')
                        .filter(|o| !V1_SKIP_OPTS.contains(o) && !o.starts_with("release_agent="))
                        .filter(|o| *o != "clone_children" && *o != "noprefix" && *o != "xattr")
                        .map(str::to_string)
                        .collect();
                    if controllers.is_empty() || v1.iter().any(|h| h.controllers == controllers) {
                        continue;
                    }
                    v1.push(V1Hierarchy {
                        mountpoint: PathBuf::from(mountpoint),
                        controllers,
                    });
                }
                _ => {}
            }
        }
        let v2_controllers = match &unified {
            Some(u) => util::read_opt(u, "cgroup.controllers")?
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        if v1.is_empty() && unified.is_none() {
            return Err(Error::Unsupported("no cgroup hierarchy is mounted".into()));
        }
        Ok(Layout {
            v1,
            unified,
            v2_controllers,
            own: Vec::new(),
        })
    }

    /// A pure cgroup v2 layout rooted at `root` (a real cgroup2 tree, or a fake one in tests):
    /// the controllers are read from `root/cgroup.controllers`.
    pub fn v2(root: impl Into<PathBuf>) -> Result<Layout, Error> {
        let root = root.into();
        let v2_controllers = util::read(&root, "cgroup.controllers")?
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Ok(Layout {
            v1: Vec::new(),
            unified: Some(root),
            v2_controllers,
            own: Vec::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        match (self.v1.iter().any(|h| !h.is_named()), &self.unified) {
            (false, Some(_)) => Mode::Unified,
            (true, Some(_)) => Mode::Hybrid,
            _ => Mode::Legacy,
        }
    }

    /// The v1 hierarchy holding `controller`.
    pub fn v1_hierarchy(&self, controller: &str) -> Option<&V1Hierarchy> {
        self.v1
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }

    pub fn has_v2(&self, controller: &str) -> bool {
        self.unified.is_some() && self.v2_controllers.iter().any(|c| c == controller)
    }

    /// This process's cgroup in the hierarchy keyed `key` (`"memory"`, or `""` for v2).
    pub(crate) fn own_cgroup(&self, key: &str) -> &str {
        self.own
            .iter()
            .find(|(k, _)| {
                if key.is_empty() {
                    k.is_empty()
                } else {
                    k.split(',').any(|c| c == key)
                }
            })
            .map_or("/", |(_, p)| p.as_str())
    }
}

impl V1Hierarchy {
    /// A named hierarchy without controllers (`name=systemd`).
    pub fn is_named(&self) -> bool {
        self.controllers.iter().all(|c| c.starts_with("name="))
    }
}

fn parse_proc_cgroup(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctl, path) = (it.next()?, it.next()?, it.next()?);
            Some((ctl.to_string(), path.to_string()))
        })
        .collect()
}

/// Undoes `/proc/self/mountinfo`'s octal escapes of a path (space, tab, newline and backslash
/// are written as `\040`, `\011`, `\012` and `\134`). The bytes, as a path may hold any.
pub fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&unescape_mountinfo(s)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
99 31 0:37 /sub /mnt/bind rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /nonexistent/dh-unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_hybrid() {
        let l = Layout::from_mountinfo(HYBRID).expect("layout");
        assert_eq!(l.mode(), Mode::Hybrid);
        assert_eq!(l.v1.len(), 4);
        assert_eq!(
            l.v1_hierarchy("cpuacct").expect("cpuacct").mountpoint,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            l.v1_hierarchy("cpuset").expect("cpuset").controllers,
            ["cpuset"]
        );
        assert_eq!(
            l.v1_hierarchy("memory").expect("m").mountpoint,
            Path::new("/sys/fs/cgroup/memory")
        );
        assert!(l.v1_hierarchy("name=systemd").expect("systemd").is_named());
        assert_eq!(
            l.unified.as_deref(),
            Some(Path::new("/nonexistent/dh-unified"))
        );
        assert!(l.v2_controllers.is_empty());
    }

    #[test]
    fn parses_unified_and_legacy() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("write");
        let mi = format!(
            "30 23 0:27 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
            dir.path().display()
        );
        let l = Layout::from_mountinfo(&mi).expect("layout");
        assert_eq!(l.mode(), Mode::Unified);
        assert!(l.has_v2("memory") && l.has_v2("pids") && !l.has_v2("hugetlb"));

        let legacy = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            Layout::from_mountinfo(&legacy).expect("l").mode(),
            Mode::Legacy
        );
        assert!(Layout::from_mountinfo("").is_err());
    }

    #[test]
    fn detects_this_host() {
        let l = Layout::detect().expect("detect");
        // Whatever the host has, the process's own cgroups are known.
        assert!(!l.own.is_empty());
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }
}
