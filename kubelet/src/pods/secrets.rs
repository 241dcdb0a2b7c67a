//! Image pull credentials from the pod's `imagePullSecrets`, as upstream's credential keyring.
//!
//! Secrets of type `kubernetes.io/dockerconfigjson` (`.dockerconfigjson`: `{"auths": {..}}`)
//! and `kubernetes.io/dockercfg` (`.dockercfg`: the entries at the top level) are read from
//! the pod's namespace. Each entry's key is normalised as upstream's `BasicDockerKeyring.Add`
//! (scheme dropped, `/v1/` and `/v2/` path prefixes dropped); an image matches a key when
//! their hosts have the same number of dot-separated parts, each matching the key's glob
//! (`*.example.com`), the ports are equal and the image's path starts with the key's path.
//! Keys are tried most specific first (reverse-sorted); the pull tries each matching
//! credential, then anonymously.

use std::collections::BTreeMap;

use base64::Engine;
use deckhand_proto::cri::{AuthConfig, PodSandboxConfig};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use serde::Deserialize;

use super::spec;
use super::worker::Context;
use crate::runtime::RuntimeError;

/// The upstream default registry host (Docker Hub).
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

/// One entry of a docker config.
#[derive(Debug, Clone, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

#[derive(Debug, Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// Credentials by registry key, with the order upstream looks them up in.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    creds: BTreeMap<String, Vec<(AuthConfig, String)>>,
}

/// Splits a schemeless URL (`host[:port][/path]`) into host, port and path.
fn split_url(s: &str) -> (String, String, String) {
    let (hostport, path) = match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => (h, p),
        _ => (hostport, ""),
    };
    (
        host.to_ascii_lowercase(),
        port.to_string(),
        path.to_string(),
    )
}

/// A shell glob of `*`, `?` (Go's `filepath.Match` without classes) on one host part.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], text) || (!text.is_empty() && glob(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// Upstream's `URLsMatchStr(key, image)`.
pub fn urls_match(key: &str, image: &str) -> bool {
    let (kh, kp, kpath) = split_url(key);
    let (ih, ip, ipath) = split_url(image);
    if kp != ip || !ipath.starts_with(&kpath) {
        return false;
    }
    let kparts: Vec<&str> = kh.split('.').collect();
    let iparts: Vec<&str> = ih.split('.').collect();
    kparts.len() == iparts.len()
        && kparts
            .iter()
            .zip(&iparts)
            .all(|(k, i)| glob(k.as_bytes(), i.as_bytes()))
}

/// The keyring key of a config entry (upstream's `BasicDockerKeyring.Add`).
fn normalise_key(loc: &str) -> String {
    let rest = loc
        .strip_prefix("https://")
        .or_else(|| loc.strip_prefix("http://"))
        .unwrap_or(loc);
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = if path.starts_with("/v2/") || path.starts_with("/v1/") {
        &path[3..]
    } else {
        path
    };
    if !path.is_empty() && path != "/" {
        format!("{hostport}{path}")
    } else {
        hostport.to_string()
    }
}

/// The repository an image is pulled from, normalised as upstream's `ParseImageName`
/// (`busybox` is `docker.io/library/busybox`), without tag or digest.
pub fn repository(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let without_tag = match without_digest[last_slash..].find(':') {
        Some(i) => &without_digest[..last_slash + i],
        None => without_digest,
    };
    let first = without_tag.split('/').next().unwrap_or_default();
    let has_registry = without_tag.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        without_tag.to_string()
    } else if without_tag.contains('/') {
        format!("docker.io/{without_tag}")
    } else {
        format!("docker.io/library/{without_tag}")
    }
}

impl Keyring {
    /// Adds the entries of a docker config (`auths` map or dockercfg's top level).
    fn add(&mut self, entries: BTreeMap<String, Entry>) {
        for (loc, e) in entries {
            let (mut username, mut password) = (e.username.clone(), e.password.clone());
            if !e.auth.is_empty()
                && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(e.auth.trim())
                && let Ok(text) = String::from_utf8(bytes)
                && let Some((u, p)) = text.split_once(':')
            {
                username = u.to_string();
                password = p.to_string();
            }
            let key = normalise_key(&loc);
            let auth = AuthConfig {
                username,
                password,
                // Upstream's keyring leaves the server address empty; containerd ignores
                // credentials whose address it cannot match to the host.
                identity_token: e.identity_token,
                registry_token: e.registry_token,
                ..Default::default()
            };
            self.creds.entry(key).or_default().push((auth, loc));
        }
    }

    /// Adds a Secret of type `kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg`;
    /// other types and malformed data are an error (the secret is skipped by the caller).
    pub fn add_secret(&mut self, s: &Secret) -> Result<(), String> {
        let data = s.data.clone().unwrap_or_default();
        let name = s.metadata.name.as_deref().unwrap_or_default();
        match s.type_.as_deref() {
            Some("kubernetes.io/dockerconfigjson") => {
                let raw = data
                    .get(".dockerconfigjson")
                    .ok_or_else(|| format!("secret {name:?}: no .dockerconfigjson"))?;
                let cfg: DockerConfigJson = serde_json::from_slice(&raw.0)
                    .map_err(|e| format!("secret {name:?}: .dockerconfigjson: {e}"))?;
                self.add(cfg.auths);
            }
            Some("kubernetes.io/dockercfg") => {
                let raw = data
                    .get(".dockercfg")
                    .ok_or_else(|| format!("secret {name:?}: no .dockercfg"))?;
                let cfg: BTreeMap<String, Entry> = serde_json::from_slice(&raw.0)
                    .map_err(|e| format!("secret {name:?}: .dockercfg: {e}"))?;
                self.add(cfg);
            }
            t => {
                return Err(format!(
                    "secret {name:?}: type {t:?} is not a docker config"
                ));
            }
        }
        Ok(())
    }

    /// The credentials for `image`, most specific key first (upstream's `Lookup`).
    pub fn lookup(&self, image: &str) -> Vec<AuthConfig> {
        self.lookup_named(image)
            .into_iter()
            .map(|(a, _)| a)
            .collect()
    }

    /// As [`Keyring::lookup`], with each credential's key as written in its secret.
    pub fn lookup_named(&self, image: &str) -> Vec<(AuthConfig, String)> {
        let repo = repository(image);
        let mut out = Vec::new();
        for (key, creds) in self.creds.iter().rev() {
            if urls_match(key, &repo) {
                out.extend(creds.iter().cloned());
            }
        }
        if out.is_empty()
            && repo.starts_with("docker.io/")
            && let Some(c) = self.creds.get(DEFAULT_REGISTRY_HOST)
        {
            out.extend(c.iter().cloned());
        }
        out
    }
}

/// The keyring of the pod's `imagePullSecrets` (missing or malformed secrets are skipped
/// with a warning, as upstream).
pub async fn pod_keyring(ctx: &Context, pod: &Pod) -> Keyring {
    let mut ring = Keyring::default();
    let refs = spec::spec(pod)
        .image_pull_secrets
        .clone()
        .unwrap_or_default();
    if refs.is_empty() {
        return ring;
    }
    let Some(client) = &ctx.client else {
        tracing::warn!(pod = %spec::full_name(pod), "imagePullSecrets ignored: the kubelet has no API client");
        return ring;
    };
    let ns = spec::ids(pod).1;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for r in refs {
        let name = r.name;
        match api.get_opt(&name).await {
            Ok(Some(s)) => {
                if let Err(e) = ring.add_secret(&s) {
                    tracing::warn!(pod = %spec::full_name(pod), "imagePullSecrets: {e}");
                }
            }
            Ok(None) => {
                tracing::warn!(pod = %spec::full_name(pod), secret = %name, "unable to retrieve pull secret: not found")
            }
            Err(e) => {
                tracing::warn!(pod = %spec::full_name(pod), secret = %name, "unable to retrieve pull secret: {e}")
            }
        }
    }
    ring
}

/// Pulls `image` with each credential of the pod's keyring that matches it, then without
/// credentials. The error of a failed pull names every attempt's error.
pub async fn pull_image(
    ctx: &Context,
    pod: &Pod,
    image: &str,
    sandbox: &PodSandboxConfig,
) -> Result<String, RuntimeError> {
    let ring = pod_keyring(ctx, pod).await;
    let creds = ring.lookup_named(image);
    let mut errors: Vec<String> = Vec::new();
    for (auth, with) in creds
        .into_iter()
        .map(|(a, key)| {
            let with = format!("the credentials for {key} ({})", a.username);
            (Some(a), Some(with))
        })
        .chain([(None, None)])
    {
        match ctx
            .runtime
            .pull_image(image, auth, Some(sandbox.clone()))
            .await
        {
            Ok(r) => return Ok(r),
            Err(e) if errors.is_empty() && with.is_none() => return Err(e),
            Err(e) => {
                tracing::debug!(%image, with = ?with, "pull failed: {e}");
                let status = match &e {
                    RuntimeError::Call { status, .. } => Some(status.code()),
                    _ => None,
                };
                errors.push(match &with {
                    Some(w) => format!("with {w}: {e}"),
                    None => format!("without credentials: {e}"),
                });
                if with.is_none() {
                    return Err(RuntimeError::Call {
                        call: "PullImage",
                        status: tonic::Status::new(
                            status.unwrap_or(tonic::Code::Unknown),
                            errors.join("; "),
                        ),
                    });
                }
            }
        }
    }
    Err(RuntimeError::Call {
        call: "PullImage",
        status: tonic::Status::unknown(errors.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, key: &str, json: serde_json::Value) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(serde_json::to_vec(&json).expect("json")),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn image_repositories() {
        assert_eq!(repository("busybox"), "docker.io/library/busybox");
        assert_eq!(repository("user/app:1"), "docker.io/user/app");
        assert_eq!(
            repository("127.0.0.1:5000/dh/busybox:latest"),
            "127.0.0.1:5000/dh/busybox"
        );
        assert_eq!(repository("r.io/a/b@sha256:00"), "r.io/a/b");
        assert_eq!(repository("localhost/x"), "localhost/x");
    }

    #[test]
    fn keyring_matches_as_upstream() {
        let auth = base64::engine::general_purpose::STANDARD.encode("u2:p2");
        let mut ring = Keyring::default();
        ring.add_secret(&secret(
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            serde_json::json!({"auths": {
                "https://reg.example.com/v2/": {"username": "u1", "password": "p1"},
                "reg.example.com/team": {"auth": auth},
                "*.wild.io": {"username": "w", "password": "x"},
                "127.0.0.1:35001": {"username": "l", "password": "y"},
                "https://index.docker.io/v1/": {"username": "hub", "password": "z"}}}),
        ))
        .expect("dockerconfigjson");
        ring.add_secret(&secret(
            "kubernetes.io/dockercfg",
            ".dockercfg",
            serde_json::json!({"old.example.com": {"username": "o", "password": "q"}}),
        ))
        .expect("dockercfg");
        let users = |image: &str| -> Vec<String> {
            ring.lookup(image).into_iter().map(|a| a.username).collect()
        };
        // The more specific path first, then the host.
        assert_eq!(users("reg.example.com/team/app:1"), ["u2", "u1"]);
        assert_eq!(users("reg.example.com/other/app"), ["u1"]);
        assert_eq!(users("a.wild.io/x"), ["w"]);
        assert!(users("a.b.wild.io/x").is_empty(), "a glob is one host part");
        assert!(users("wild.io/x").is_empty());
        assert_eq!(users("127.0.0.1:35001/dh/busybox:latest"), ["l"]);
        assert!(
            users("127.0.0.1:35000/dh/busybox").is_empty(),
            "ports must match"
        );
        assert_eq!(users("old.example.com/x"), ["o"]);
        assert_eq!(users("busybox"), ["hub"], "Docker Hub");
        assert!(users("other.io/x").is_empty());
        let a = &ring.lookup("reg.example.com/team/app")[0];
        assert_eq!((a.password.as_str(), a.server_address.as_str()), ("p2", ""));
        assert!(
            ring.add_secret(&secret("Opaque", "x", serde_json::json!({})))
                .is_err()
        );
    }

    #[test]
    fn globs() {
        assert!(glob(b"*", b"abc"));
        assert!(glob(b"a?c", b"abc"));
        assert!(glob(b"*.b", b"a.b"));
        assert!(!glob(b"a", b"ab"));
    }
}
