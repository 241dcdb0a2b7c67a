//! Image references, normalised as the kubelet and `crictl` do.
//!
//! `busybox` is `docker.io/library/busybox:latest`, `quay.io/x/y` is `quay.io/x/y:latest`, and
//! `name:tag@sha256:...` pulls by digest (the tag is informational only, as in Docker and
//! containerd, and is not recorded). Parsing is `oci-client`'s [`oci_client::Reference`]; this
//! type adds the names the store records.

use std::fmt;

use super::content::Digest;
use super::{ImageError, Result};

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: oci_client::Reference,
    digest: Option<Digest>,
}

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
        let inner = oci_client::Reference::try_from(s).map_err(|e| invalid(e.to_string()))?;
        // The distribution spec's repository grammar: lowercase components.
        let repo_ok = inner.repository().split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        });
        if !repo_ok {
            return Err(invalid(format!(
                "repository {:?} must be lowercase letters, digits and . _ -",
                inner.repository()
            )));
        }
        let digest = inner.digest().map(Digest::parse).transpose()?;
        Ok(ImageRef { inner, digest })
    }

    /// The registry as named (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
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
            Some(self.inner.tag().unwrap_or("latest"))
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
    fn digest_wins_over_tag() {
        let r = ImageRef::parse(&format!("quay.io/a/b:1.0@{D}")).expect("parse");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().map(|d| d.as_str()), Some(D));
        assert_eq!(r.lookup_name(), format!("quay.io/a/b@{D}"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", " busybox", "UPPER/case", "a@sha256:zz", "a@md5:0000"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
