//! Access to the shared test bed started by `hack/testbed.sh up`.
//!
//! The test bed is started once per test run, outside the test processes (nextest runs every test
//! in its own process, so sharing in-process state is not possible). `hack/testbed.sh` writes a
//! descriptor, `testbed.env`, of `KEY=VALUE` lines; [`Testbed::get`] reads it from the path in
//! `DH_TESTBED_ENV`, or from [`DEFAULT_DESCRIPTOR`]. A test that needs the test bed and cannot find
//! it fails with a message saying how to start it: nothing is skipped silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, anyhow};

/// Where `hack/testbed.sh` writes its descriptor unless told otherwise.
pub const DEFAULT_DESCRIPTOR: &str = "/tmp/dh-testbed/testbed.env";

/// The parsed test bed descriptor.
#[derive(Debug, Clone)]
pub struct Testbed {
    vars: BTreeMap<String, String>,
    source: PathBuf,
}

/// Credentials of the auth-protected registry.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl Testbed {
    /// The shared test bed of this run. Panics with instructions when it is not running, so a
    /// test that needs it fails loudly instead of passing vacuously.
    pub fn get() -> &'static Testbed {
        static TB: OnceLock<Testbed> = OnceLock::new();
        TB.get_or_init(|| match Testbed::load() {
            Ok(tb) => tb,
            Err(e) => panic!(
                "the Deckhand test bed is not running: {e:#}\n\
                 start it with `hack/testbed.sh up` (hack/test.sh does this for you)"
            ),
        })
    }

    /// Reads the descriptor named by `DH_TESTBED_ENV` or [`DEFAULT_DESCRIPTOR`].
    pub fn load() -> Result<Testbed> {
        let path = std::env::var_os("DH_TESTBED_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DESCRIPTOR));
        Self::load_from(&path)
    }

    /// Reads a descriptor from `path`.
    pub fn load_from(path: &Path) -> Result<Testbed> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading test bed descriptor {}", path.display()))?;
        Ok(Testbed {
            vars: parse_env(&text)?,
            source: path.to_path_buf(),
        })
    }

    /// A value of the descriptor; an error names the key and the descriptor.
    pub fn var(&self, key: &str) -> Result<&str> {
        self.vars.get(key).map(String::as_str).ok_or_else(|| {
            anyhow!(
                "{key} is missing from the test bed descriptor {}",
                self.source.display()
            )
        })
    }

    fn must(&self, key: &str) -> &str {
        match self.var(key) {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// The test bed's scratch directory (everything it created lives below it).
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(self.must("DH_TESTBED_DIR"))
    }

    /// `host:port` of the anonymous plain-HTTP registry holding the test images.
    pub fn registry(&self) -> &str {
        self.must("DH_REGISTRY")
    }

    /// `host:port` of the htpasswd-protected plain-HTTP registry holding the same images.
    pub fn auth_registry(&self) -> &str {
        self.must("DH_REGISTRY_AUTH")
    }

    /// Credentials accepted by [`Testbed::auth_registry`].
    pub fn auth_credentials(&self) -> Credentials {
        Credentials {
            username: self.must("DH_REGISTRY_AUTH_USER").to_string(),
            password: self.must("DH_REGISTRY_AUTH_PASSWORD").to_string(),
        }
    }

    /// `host:port` of an HTTPS registry serving the same images as [`Testbed::registry`], with a
    /// certificate (for 127.0.0.1) signed by the CA in [`Testbed::tls_registry_ca`].
    pub fn tls_registry(&self) -> &str {
        self.must("DH_REGISTRY_TLS")
    }

    /// The PEM file of the CA that signed [`Testbed::tls_registry`]'s certificate.
    pub fn tls_registry_ca(&self) -> PathBuf {
        PathBuf::from(self.must("DH_REGISTRY_TLS_CA"))
    }

    /// The JSON index of the test images pushed to both registries (see [`crate::images`]).
    pub fn images_index(&self) -> PathBuf {
        PathBuf::from(self.must("DH_IMAGES_INDEX"))
    }

    /// The started containerd's gRPC socket.
    pub fn containerd_socket(&self) -> PathBuf {
        PathBuf::from(self.must("DH_CONTAINERD_SOCKET"))
    }

    /// `https://127.0.0.1:PORT` of the kube-apiserver.
    pub fn apiserver(&self) -> &str {
        self.must("DH_APISERVER")
    }

    /// An admin (system:masters) kubeconfig for the test bed's API server.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        PathBuf::from(self.must("DH_KUBECONFIG"))
    }

    /// The directory holding the test bed's PKI (cluster CA, kubelet CA, service-account keys).
    pub fn pki_dir(&self) -> PathBuf {
        PathBuf::from(self.must("DH_PKI_DIR"))
    }

    /// Creates a namespace named [`unique_name`]`(prefix)`, labelled as a Deckhand test's, and waits
    /// until pods can be created in it: its `default` service account exists and, on API servers
    /// older than 1.24 (the 1.20 test bed), has its token secret. Returns the name; the caller
    /// deletes the namespace when done (also on failure).
    pub async fn create_namespace(&self, client: &kube::Client, prefix: &str) -> Result<String> {
        use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
        use kube::api::{Api, PostParams};

        let name = unique_name(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "deckhand.io/test": prefix } }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;

        let legacy_tokens = client
            .apiserver_version()
            .await
            .map(|v| v.minor.trim_end_matches('+').parse::<u32>().unwrap_or(0) < 24)
            .unwrap_or(true);
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(sa) = accounts.get_opt("default").await? {
                let has_token = sa.secrets.as_ref().is_some_and(|s| !s.is_empty());
                if has_token || !legacy_tokens {
                    return Ok(name);
                }
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "namespace {name}: no default service account (with token) after 60s"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// A kube client with admin rights on the test bed's API server.
    pub async fn kube_client(&self) -> Result<kube::Client> {
        install_crypto_provider();
        let kubeconfig = kube::config::Kubeconfig::read_from(self.admin_kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// Installs rustls' ring provider for the process (idempotent). Clients built on rustls
/// (kube, oci-client) need one; Deckhand never builds aws-lc.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A name unique to this test process and call, starting with `dh`, usable as a Kubernetes
/// object name (lowercase, digits and '-', at most 63 characters).
pub fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!("dh-{clean}-{}-{n}", std::process::id())
}

fn parse_env(text: &str) -> Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("line {}: expected KEY=VALUE, got {line:?}", i + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
            .unwrap_or(v);
        vars.insert(k.trim().to_string(), v.to_string());
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_descriptor_lines() {
        let vars = parse_env("# comment\nA=1\n\nB='two words'\nC=x=y\n").expect("parse");
        assert_eq!(vars["A"], "1");
        assert_eq!(vars["B"], "two words");
        assert_eq!(vars["C"], "x=y");
        assert!(parse_env("garbage").is_err());
    }

    #[test]
    fn unique_names_are_valid_and_distinct() {
        let a = unique_name("Pod_Create");
        let b = unique_name("Pod_Create");
        assert_ne!(a, b);
        assert!(a.starts_with("dh-pod-create-"));
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }
}
