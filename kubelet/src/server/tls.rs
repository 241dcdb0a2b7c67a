//! The serving certificate and the TLS configuration.
//!
//! With `tlsCertFile`/`tlsPrivateKeyFile` those are served; without them, as upstream, a
//! self-signed certificate for the hostname and node IP is made once under
//! `<root-dir>/pki/kubelet.{crt,key}` and reused afterwards. With `clientCAFile`, client
//! certificates are asked for and verified against it; requests without one go on to the other
//! authenticators.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS setup error.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The self-signed certificate could not be made or written.
    #[error("self-signed serving certificate under {dir}: {message}")]
    SelfSigned {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Read {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".to_string()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The certificate and key files to serve: the configured ones, or the self-signed pair under
/// `<root_dir>/pki`, made when missing.
pub fn serving_files(
    cert: Option<&Path>,
    key: Option<&Path>,
    root_dir: &Path,
    hostname: &str,
    node_ip: Option<IpAddr>,
) -> Result<(PathBuf, PathBuf), TlsError> {
    if let (Some(c), Some(k)) = (cert, key) {
        return Ok((c.to_path_buf(), k.to_path_buf()));
    }
    let dir = root_dir.join("pki");
    let (crt, key) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    if crt.exists() && key.exists() {
        return Ok((crt, key));
    }
    let err = |message: String| TlsError::SelfSigned {
        dir: dir.clone(),
        message,
    };
    let mut names = vec![hostname.to_string()];
    if let Some(ip) = node_ip {
        names.push(ip.to_string());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| err(e.to_string()))?;
    // As upstream's GenerateSelfSignedCertKey: CN <host>@<unix time>.
    let now = jiff::Timestamp::now();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("{hostname}@{}", now.as_second()),
    );
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    let year = now.to_zoned(jiff::tz::TimeZone::UTC).year();
    params.not_after = rcgen::date_time_ymd(i32::from(year) + 1, 1, 1);
    let pair = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let cert = params.self_signed(&pair).map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    write_private(&key, pair.serialize_pem().as_bytes()).map_err(|e| err(e.to_string()))?;
    std::fs::write(&crt, cert.pem()).map_err(|e| err(e.to_string()))?;
    tracing::info!(cert = %crt.display(), "generated a self-signed serving certificate");
    Ok((crt, key))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// The rustls server configuration (HTTP/1.1 only; client certificates optional and verified
/// against `client_ca` when given).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c).map_err(|e| TlsError::Read {
                    path: ca.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(read_certs(cert)?, read_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ip = Some(IpAddr::from([127, 0, 0, 1]));
        let (crt, key) = serving_files(None, None, dir.path(), "dh-node", ip).expect("files");
        assert_eq!(crt, dir.path().join("pki/kubelet.crt"));
        let first = std::fs::read(&crt).expect("read");
        let again = serving_files(None, None, dir.path(), "dh-node", ip).expect("files");
        assert_eq!(again, (crt.clone(), key.clone()));
        assert_eq!(std::fs::read(&crt).expect("read"), first, "reused");
        let der = read_certs(&crt).expect("certs");
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).expect("parse");
        let cn = cert.subject().iter_common_name().next().expect("cn");
        assert!(cn.as_str().expect("cn").starts_with("dh-node@"));
        server_config(&crt, &key, None).expect("config");
        // The CA file must hold a certificate; a missing file is a clear error.
        assert!(server_config(&crt, &key, Some(&dir.path().join("none"))).is_err());
        server_config(&crt, &key, Some(&crt)).expect("with a client CA");
    }
}
