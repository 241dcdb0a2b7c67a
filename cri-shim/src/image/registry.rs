//! Registry configuration and credentials.
//!
//! The registry configuration file (TOML, default `/etc/deckhand/registries.toml`) follows
//! containerd's `hosts.toml` semantics where they apply: for each registry host as named in
//! image references, mirrors tried in order and then the registry itself (the upstream), each
//! with its own transport and credentials.
//!
//! ```toml
//! # A docker-style config.json whose "auths" are used when nothing more specific is given.
//! docker_config = "/root/.docker/config.json"
//!
//! [hosts."docker.io"]
//! # Mirrors, tried in order before the upstream. `host` is host[:port].
//! mirrors = [
//!   { host = "mirror.internal:5000", plain_http = true },
//!   { host = "mirror2.internal", ca = "/etc/deckhand/certs/mirror2.pem", username = "u", password = "p" },
//! ]
//!
//! [hosts."registry.internal:5000"]
//! plain_http = true          # speak HTTP, not HTTPS (default: false; loopback hosts: true)
//! skip_verify = false        # accept any TLS certificate (insecure)
//! ca = "/etc/deckhand/certs/internal.pem"   # extra trusted CA (PEM)
//! username = "user"          # basic credentials, or
//! password = "secret"
//! # auth = "dXNlcjpzZWNyZXQ="   # base64 "user:password", or
//! # token = "..."              # a bearer (registry) token
//! ```
//!
//! Credentials for one request are chosen per endpoint, most specific first: for the upstream,
//! the CRI `AuthConfig` of the request (when its `server_address` is empty or names the host),
//! then the file's credentials for the host, then `config.json`; for a mirror, its own
//! credentials, then `config.json` for the mirror's host. A request's credentials are never sent
//! to a mirror.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::{ImageError, Result};

/// Credentials for one registry endpoint.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials.
    #[default]
    Anonymous,
    /// HTTP basic credentials (also exchanged for a bearer token when the registry asks).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// A bearer token used as is (CRI `registry_token`).
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

impl Credentials {
    /// From the fields of a CRI `AuthConfig` or a `config.json` entry: a registry token wins,
    /// then an identity token (sent as the password of basic credentials, the user being
    /// `username` or `<token>`, as Docker does for token-exchange registries), then
    /// username/password, then `auth` (base64 `user:password`).
    pub fn from_parts(
        username: &str,
        password: &str,
        auth: &str,
        identity_token: &str,
        registry_token: &str,
    ) -> Result<Credentials> {
        if !registry_token.is_empty() {
            return Ok(Credentials::Bearer(registry_token.to_string()));
        }
        if !identity_token.is_empty() {
            let user = if username.is_empty() {
                "<token>"
            } else {
                username
            };
            return Ok(Credentials::Basic {
                username: user.to_string(),
                password: identity_token.to_string(),
            });
        }
        if !username.is_empty() || !password.is_empty() {
            return Ok(Credentials::Basic {
                username: username.to_string(),
                password: password.to_string(),
            });
        }
        if !auth.is_empty() {
            return decode_auth(auth);
        }
        Ok(Credentials::Anonymous)
    }

    /// For `oci-client`.
    pub(crate) fn to_registry_auth(&self) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        match self {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

fn decode_auth(auth: &str) -> Result<Credentials> {
    let bad = |reason: &str| ImageError::Config {
        path: PathBuf::from("<auth>"),
        reason: reason.to_string(),
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad("auth is not valid base64"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("auth is not UTF-8"))?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| bad("auth is not user:password"))?;
    Ok(Credentials::Basic {
        username: u.to_string(),
        password: p.to_string(),
    })
}

/// Settings of one endpoint (an upstream registry or a mirror).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `host[:port]`: required for mirrors, ignored for the upstream (the table key names it).
    #[serde(default)]
    pub host: Option<String>,
    /// Plain HTTP instead of HTTPS. Unset: HTTP for loopback hosts, HTTPS otherwise.
    #[serde(default)]
    pub plain_http: Option<bool>,
    /// Accept any TLS certificate.
    #[serde(default)]
    pub skip_verify: bool,
    /// An extra CA certificate (PEM file) to trust.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Basic credentials: user.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic credentials: password.
    #[serde(default)]
    pub password: Option<String>,
    /// Basic credentials as base64 `user:password`.
    #[serde(default)]
    pub auth: Option<String>,
    /// A bearer token.
    #[serde(default)]
    pub token: Option<String>,
}

impl EndpointConfig {
    fn credentials(&self) -> Result<Option<Credentials>> {
        let c = Credentials::from_parts(
            self.username.as_deref().unwrap_or(""),
            self.password.as_deref().unwrap_or(""),
            self.auth.as_deref().unwrap_or(""),
            "",
            self.token.as_deref().unwrap_or(""),
        )?;
        Ok((c != Credentials::Anonymous).then_some(c))
    }
}

/// The configuration of one registry host.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct HostConfig {
    /// Mirrors, tried in order before the upstream.
    #[serde(default)]
    pub mirrors: Vec<EndpointConfig>,
    /// The upstream's own settings.
    #[serde(flatten)]
    pub upstream: EndpointConfig,
}

/// The registry configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RegistryConfig {
    /// A docker-style `config.json`.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Per registry host (as named in references: `docker.io`, `127.0.0.1:5000`).
    #[serde(default)]
    pub hosts: BTreeMap<String, HostConfig>,
    /// `config.json` auths, loaded by [`RegistryConfig::load`].
    #[serde(skip)]
    pub docker_auths: BTreeMap<String, Credentials>,
}

/// One place to pull from, resolved for a request.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host[:port]` to connect to.
    pub host: String,
    /// Whether this is the upstream (not a mirror).
    pub upstream: bool,
    /// HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Accept any certificate.
    pub skip_verify: bool,
    /// Extra CA (PEM bytes).
    pub ca_pem: Option<Vec<u8>>,
    /// Credentials to present.
    pub credentials: Credentials,
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

/// `https://index.docker.io/v1/` -> `docker.io`, `https://host/` -> `host`.
fn auth_key_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    }
}

fn is_loopback(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    h == "localhost" || h == "::1" || h.starts_with("127.")
}

impl RegistryConfig {
    /// Reads the configuration file (and the `config.json` it names). A missing file is an
    /// empty configuration only when `must_exist` is false.
    pub fn load(path: &Path, must_exist: bool) -> Result<RegistryConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(RegistryConfig::default());
            }
            Err(e) => {
                return Err(ImageError::Config {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        let mut cfg = Self::parse(&text).map_err(|reason| ImageError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        if let Some(dc) = cfg.docker_config.clone() {
            cfg.load_docker_config(&dc)?;
        }
        Ok(cfg)
    }

    /// Parses the TOML text (without loading `config.json`).
    pub fn parse(text: &str) -> std::result::Result<RegistryConfig, String> {
        let cfg: RegistryConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for (host, hc) in &cfg.hosts {
            for m in &hc.mirrors {
                if m.host.as_deref().is_none_or(str::is_empty) {
                    return Err(format!("hosts.{host:?}: a mirror has no host"));
                }
            }
        }
        Ok(cfg)
    }

    /// Loads the `auths` of a docker-style `config.json`.
    pub fn load_docker_config(&mut self, path: &Path) -> Result<()> {
        let bad = |reason: String| ImageError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let file: DockerConfigFile =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        for (key, a) in file.auths {
            let creds = Credentials::from_parts(
                &a.username,
                &a.password,
                &a.auth,
                &a.identity_token,
                &a.registry_token,
            )
            .map_err(|e| bad(format!("auths.{key:?}: {e}")))?;
            self.docker_auths.insert(auth_key_host(&key), creds);
        }
        Ok(())
    }

    /// The endpoints to try for `registry`, in order: mirrors, then the upstream.
    /// `request` is the per-request credentials and the server they are for (may be empty).
    pub fn endpoints(
        &self,
        registry: &str,
        request: Option<(&Credentials, &str)>,
    ) -> Result<Vec<Endpoint>> {
        let hc = self.hosts.get(registry).cloned().unwrap_or_default();
        let mut out = Vec::new();
        for m in &hc.mirrors {
            let host = m.host.clone().unwrap_or_default();
            let credentials = match m.credentials()? {
                Some(c) => c,
                None => self.docker_auths.get(&host).cloned().unwrap_or_default(),
            };
            out.push(self.endpoint(host, false, m, credentials)?);
        }
        let upstream_host = match registry {
            "docker.io" => "index.docker.io".to_string(),
            h => h.to_string(),
        };
        let request_creds = request.and_then(|(c, server)| {
            let matches = server.is_empty() || auth_key_host(server) == registry;
            (matches && *c != Credentials::Anonymous).then(|| c.clone())
        });
        let credentials = match request_creds {
            Some(c) => c,
            None => match hc.upstream.credentials()? {
                Some(c) => c,
                None => self.docker_auths.get(registry).cloned().unwrap_or_default(),
            },
        };
        out.push(self.endpoint(upstream_host, true, &hc.upstream, credentials)?);
        Ok(out)
    }

    fn endpoint(
        &self,
        host: String,
        upstream: bool,
        c: &EndpointConfig,
        credentials: Credentials,
    ) -> Result<Endpoint> {
        let ca_pem = match &c.ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| ImageError::Config {
                path: p.clone(),
                reason: format!("reading CA file: {e}"),
            })?),
            None => None,
        };
        Ok(Endpoint {
            plain_http: c.plain_http.unwrap_or_else(|| is_loopback(&host)),
            host,
            upstream,
            skip_verify: c.skip_verify,
            ca_pem,
            credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_and_orders_endpoints() {
        let cfg = RegistryConfig::parse(
            r#"
            [hosts."dh-upstream.invalid"]
            mirrors = [ { host = "127.0.0.1:1" }, { host = "m2.example", username = "u", password = "p" } ]
            skip_verify = true
            [hosts."r.example"]
            auth = "dXNlcjpzZWNyZXQ="
            "#,
        )
        .expect("parse");
        let eps = cfg
            .endpoints("dh-upstream.invalid", None)
            .expect("endpoints");
        let hosts: Vec<_> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["127.0.0.1:1", "m2.example", "dh-upstream.invalid"]);
        assert!(eps[0].plain_http && !eps[1].plain_http && !eps[2].plain_http);
        assert!(eps[2].skip_verify && eps[2].upstream);
        assert!(matches!(eps[1].credentials, Credentials::Basic { .. }));

        let eps = cfg.endpoints("r.example", None).expect("endpoints");
        assert_eq!(
            eps[0].credentials,
            Credentials::Basic {
                username: "user".into(),
                password: "secret".into()
            }
        );
        let req = Credentials::Bearer("t".into());
        let eps = cfg
            .endpoints("r.example", Some((&req, "")))
            .expect("endpoints");
        assert_eq!(eps[0].credentials, req);
        let eps = cfg
            .endpoints("r.example", Some((&req, "other.example")))
            .expect("endpoints");
        assert_ne!(
            eps[0].credentials, req,
            "credentials for another server are not sent"
        );
        assert_eq!(
            cfg.endpoints("docker.io", None).expect("eps")[0].host,
            "index.docker.io"
        );
    }

    #[test]
    fn rejects_bad_files() {
        assert!(RegistryConfig::parse("hosts = 3").is_err());
        assert!(
            RegistryConfig::parse("[hosts.\"a\"]\nmirrors = [ { plain_http = true } ]").is_err()
        );
    }

    #[test]
    fn credentials_precedence() {
        let c = Credentials::from_parts("", "", "dTpw", "", "").expect("auth");
        assert_eq!(
            c,
            Credentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(
            Credentials::from_parts("u", "p", "", "", "tok").expect("tok"),
            Credentials::Bearer("tok".into())
        );
        assert!(Credentials::from_parts("", "", "!!", "", "").is_err());
        assert_eq!(auth_key_host("https://index.docker.io/v1/"), "docker.io");
    }
}
