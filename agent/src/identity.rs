//! TLS identity and trust: PEM certificate chains, private keys and CA bundles, turned into
//! rustls server and client configurations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::UpstreamTls;

/// TLS material that could not be loaded or used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct MaterialError {
    /// "certificate", "key", "CA bundle" or "server name".
    pub what: &'static str,
    /// The file (or the name).
    pub path: String,
    /// Why.
    pub message: String,
}

fn error(what: &'static str, path: &Path, message: impl ToString) -> MaterialError {
    MaterialError {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads a PEM certificate chain (leaf first); an empty file is an error.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| error("certificate", path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| error("certificate", path, e))?;
    if chain.is_empty() {
        return Err(error("certificate", path, "no CERTIFICATE block"));
    }
    Ok(chain)
}

/// Reads a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, MaterialError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| error("key", path, e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration for a listener's own certificate, with secret extraction enabled
/// for the kTLS handoff.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[String],
) -> Result<Arc<ServerConfig>, MaterialError> {
    let chain = load_chain(cert)?;
    let key_der = load_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("certificate", cert, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| error("key", key, e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // The kTLS path needs the traffic secrets; they are zeroized right after the handoff.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A client configuration and server name for connecting to a TLS upstream.
pub fn upstream_client(
    u: &UpstreamTls,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), MaterialError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&u.ca).map_err(|e| error("CA bundle", &u.ca, e))? {
        let ca = ca.map_err(|e| error("CA bundle", &u.ca, e))?;
        roots.add(ca).map_err(|e| error("CA bundle", &u.ca, e))?;
    }
    if roots.is_empty() {
        return Err(error("CA bundle", &u.ca, "no CERTIFICATE block"));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("CA bundle", &u.ca, e))?
        .with_root_certificates(roots);
    let mut config = match (&u.client_cert, &u.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_chain(cert)?, load_key(key)?)
            .map_err(|e| error("key", key, e))?,
        _ => builder.with_no_client_auth(),
    };
    config.enable_secret_extraction = true;
    let name = ServerName::try_from(u.server_name.clone())
        .map_err(|e| error("server name", &PathBuf::from(&u.server_name), e))?;
    Ok((Arc::new(config), name))
}
