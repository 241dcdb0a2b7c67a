//! Image references, normalised as the kubelet and `crictl` do.
//!
//! `busybox` is `docker.io/library/busybox:latest`, `quay.io/x/y` is `quay.io/x/y:latest`, and
//! `name:tag@sha256:...` pulls by digest (the tag is informational only, as in Docker and
//! containerd, and is not recorded).
//!
//! The grammar is the distribution project's (`reference/regexp.go`): `[domain/]path[:tag][@digest]`,
//! a domain being the first component when it holds a `.` or a `:` or is `localhost`. It is
//! parsed here by hand rather than with `oci-spec`'s `Reference::try_from`: that one compiles a
//! Unicode regex whose NFA stays resident (~15 MiB) for the daemon's lifetime, half of
//! deckhand-cri's memory with 30 pods. The `oci-client` reference a pull needs is built from the
//! parts ([`ImageRef::on_host`]).

use std::fmt;

use super::content::Digest;
use super::{ImageError, Result};

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// The longest repository path (`NameTotalLengthMax`).
const NAME_MAX: usize = 255;

impl ImageRef {
    /// Parses and normalises `s`.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("empty".into()));
        }
        if s.trim() != s {
            return Err(invalid("surrounding whitespace".into()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/' (before it, a ':' is a port).
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = t.len() <= 128
                && t.bytes().next().is_some_and(is_word)
                && t.bytes().all(|b| is_word(b) || b == b'.' || b == b'-');
            if !ok {
                return Err(invalid(format!(
                    "tag {t:?} must be 1 to 128 letters, digits and _ . - (not starting with . or -)"
                )));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_domain(first) {
                    return Err(invalid(format!("registry {first:?} is not a host[:port]")));
                }
                (first, path)
            }
            _ => ("docker.io", name),
        };
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(invalid(format!(
                "repository {path:?} must be lowercase letters, digits and separators . _ __ - \
                 between them"
            )));
        }
        let registry = if registry == "index.docker.io" {
            "docker.io"
        } else {
            registry
        };
        let repository = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if repository.len() > NAME_MAX {
            return Err(invalid(format!(
                "repository name longer than {NAME_MAX} characters"
            )));
        }
        Ok(ImageRef {
            registry: registry.to_string(),
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The registry as named (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    /// The tag, unless the reference pins a digest (then the tag is ignored).
    pub fn tag(&self) -> Option<&str> {
        if self.digest.is_some() {
            None
        } else {
            Some(self.tag.as_deref().unwrap_or("latest"))
        }
    }

    /// The pinned digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository:tag` for a tag reference (a repo tag in CRI terms).
    pub fn tagged_name(&self) -> Option<String> {
        self.tag().map(|t| format!("{}:{t}", self.name()))
    }

    /// `registry/repository@digest` (a repo digest in CRI terms).
    pub fn digest_name(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }

    /// The name this reference is recorded and looked up under: the repo digest when it pins
    /// one, else the repo tag.
    pub fn lookup_name(&self) -> String {
        match &self.digest {
            Some(d) => self.digest_name(d),
            None => self.tagged_name().unwrap_or_else(|| self.name()),
        }
    }

    /// The same repository on another registry host (a mirror), as an `oci-client` reference
    /// for a tag or a digest.
    pub(crate) fn on_host(&self, host: &str, digest: Option<&Digest>) -> oci_client::Reference {
        match digest.or(self.digest.as_ref()) {
            Some(d) => oci_client::Reference::with_digest(
                host.to_string(),
                self.repository().to_string(),
                d.to_string(),
            ),
            None => oci_client::Reference::with_tag(
                host.to_string(),
                self.repository().to_string(),
                self.tag().unwrap_or("latest").to_string(),
            ),
        }
    }
}

/// `[A-Za-z0-9_]`, regexp's `\w`.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `host[:port]`: dot-separated labels of letters, digits and inner dashes, or a bracketed IPv6
/// address, then an optional numeric port.
fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(r) = d.strip_prefix('[') {
        match r.split_once(']') {
            Some((v6, rest)) if v6.parse::<std::net::Ipv6Addr>().is_ok() => {
                match rest.strip_prefix(':') {
                    Some(p) => ("v6", Some(p)),
                    None if rest.is_empty() => ("v6", None),
                    None => return false,
                }
            }
            _ => return false,
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A path component: lowercase alphanumerics separated by `.`, `_`, `__` or any number of `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lookup_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises_like_the_kubelet() {
        let r = ImageRef::parse("busybox").expect("parse");
        assert_eq!(r.lookup_name(), "docker.io/library/busybox:latest");
        let r = ImageRef::parse("library/busybox:1.36").expect("parse");
        assert_eq!(r.lookup_name(), "docker.io/library/busybox:1.36");
        let r = ImageRef::parse("index.docker.io/foo/bar").expect("parse");
        assert_eq!(r.lookup_name(), "docker.io/foo/bar:latest");
        let r = ImageRef::parse("127.0.0.1:5000/dh/busybox").expect("parse");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.lookup_name(), "127.0.0.1:5000/dh/busybox:latest");
    }

    #[test]
    fn grammar_as_the_distribution_project() {
        let parts = |s: &str| {
            let r = ImageRef::parse(s).expect(s);
            (
                r.registry().to_string(),
                r.repository().to_string(),
                r.tag().map(str::to_string),
            )
        };
        let t = |reg: &str, repo: &str, tag: &str| {
            (reg.to_string(), repo.to_string(), Some(tag.to_string()))
        };
        // A first component without '.' or ':' is a path (not a registry), as Docker does.
        assert_eq!(
            parts("test.com:tag"),
            t("docker.io", "library/test.com", "tag")
        );
        assert_eq!(
            parts("test.com:5000"),
            t("docker.io", "library/test.com", "5000")
        );
        assert_eq!(parts("test.com:5000/a"), t("test.com:5000", "a", "latest"));
        assert_eq!(parts("localhost/a/b:v1"), t("localhost", "a/b", "v1"));
        assert_eq!(
            parts("localhost:5000/a"),
            t("localhost:5000", "a", "latest")
        );
        assert_eq!(parts("foo/bar"), t("docker.io", "foo/bar", "latest"));
        assert_eq!(
            parts("lowercase:Uppercase"),
            t("docker.io", "library/lowercase", "Uppercase")
        );
        assert_eq!(
            parts("foo_bar.com:8080"),
            t("docker.io", "library/foo_bar.com", "8080")
        );
        assert_eq!(
            parts("a.b/c__d/e--f.g:1.0_x-y"),
            t("a.b", "c__d/e--f.g", "1.0_x-y")
        );
        assert_eq!(parts("[::1]:5000/a"), t("[::1]:5000", "a", "latest"));
        assert_eq!(
            parts("Sub-Domain.Example/a"),
            t("Sub-Domain.Example", "a", "latest")
        );
        let long = format!("x.io/{}", "a".repeat(256));
        assert!(ImageRef::parse(&long).is_err());
        let tag129 = format!("a:{}", "t".repeat(129));
        assert!(ImageRef::parse(&tag129).is_err());
        let r = ImageRef::parse(&format!("x.io/a@{D}")).expect("digest only");
        assert_eq!((r.tag(), r.digest().map(|d| d.as_str())), (None, Some(D)));
    }

    #[test]
    fn digest_wins_over_tag() {
        let r = ImageRef::parse(&format!("quay.io/a/b:1.0@{D}")).expect("parse");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().map(|d| d.as_str()), Some(D));
        assert_eq!(r.lookup_name(), format!("quay.io/a/b@{D}"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            " busybox",
            "UPPER/case",
            "a@sha256:zz",
            "a@md5:0000",
            "a:",
            "a:-x",
            "a/",
            "/a",
            "a//b",
            "a/-b",
            "a/b_",
            "a/b___c",
            "a/b._c",
            "-x.io/a",
            "x.io:port/a",
            "x.io:/a",
            "[::1/a",
            "a:t@",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
