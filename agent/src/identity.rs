//! TLS identity and trust: PEM certificate chains, private keys and CA bundles, turned into
//! rustls server and client configurations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
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

/// Reads a PEM CA bundle into a root store; an empty bundle is an error.
fn load_roots(path: &Path) -> Result<RootCertStore, MaterialError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(path).map_err(|e| error("CA bundle", path, e))? {
        let ca = ca.map_err(|e| error("CA bundle", path, e))?;
        roots.add(ca).map_err(|e| error("CA bundle", path, e))?;
    }
    if roots.is_empty() {
        return Err(error("CA bundle", path, "no CERTIFICATE block"));
    }
    Ok(roots)
}

/// A server configuration for a listener's own certificate, with secret extraction enabled
/// for the kTLS handoff. With `client_ca`, clients must present a certificate chaining to it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[String],
) -> Result<Arc<ServerConfig>, MaterialError> {
    let chain = load_chain(cert)?;
    let key_der = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("certificate", cert, e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                    .build()
                    .map_err(|e| error("CA bundle", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
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
    let roots = load_roots(&u.ca)?;
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

/// Who a peer certificate names: its subject common name and subject alternative names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's first common name, if it has one.
    pub common_name: Option<String>,
    /// Subject alternative names as `DNS:name`, `URI:uri`, `IP:addr` or `EMAIL:addr`.
    pub sans: Vec<String>,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.common_name {
            Some(cn) => write!(f, "CN={cn}")?,
            None => f.write_str("no CN")?,
        }
        if !self.sans.is_empty() {
            write!(f, " SAN={}", self.sans.join(","))?;
        }
        Ok(())
    }
}

/// Reads the names out of a DER certificate (one that rustls has already verified).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<PeerIdentity, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("peer certificate: {e}"))?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(n) => sans.push(format!("DNS:{n}")),
                GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                GeneralName::RFC822Name(e) => sans.push(format!("EMAIL:{e}")),
                GeneralName::IPAddress(ip) => {
                    let addr = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(addr) = addr {
                        sans.push(format!("IP:{addr}"));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(PeerIdentity { common_name, sans })
}
