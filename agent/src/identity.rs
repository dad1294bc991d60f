//! TLS identity and trust: PEM certificate chains, private keys and CA bundles, turned into
//! rustls server and client configurations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{ListenerConfig, UpstreamTls};
use crate::tls_policy::TlsPolicy;

/// TLS material that could not be loaded or used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct MaterialError {
    /// "certificate", "key", "CA bundle", "CRL", "TLS policy" or "server name".
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
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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

/// Reads the CRLs in a file: PEM blocks, or one DER CRL.
fn load_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, MaterialError> {
    use rustls::pki_types::CertificateRevocationListDer as Crl;
    let bytes = std::fs::read(path).map_err(|e| error("CRL", path, e))?;
    let crls: Vec<Crl<'static>> = Crl::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| error("CRL", path, e))?;
    let crls = if crls.is_empty() && bytes.first() == Some(&0x30) {
        vec![Crl::from(bytes)]
    } else {
        crls
    };
    if crls.is_empty() {
        return Err(error("CRL", path, "no X509 CRL block"));
    }
    // A CRL that does not parse fails here, naming the file, rather than at a handshake.
    for crl in &crls {
        x509_parser::parse_x509_crl(crl.as_ref())
            .map_err(|e| error("CRL", path, format!("not a CRL: {e}")))?;
    }
    Ok(crls)
}

/// What the agent serves or presents from one certificate file, for the expiry gauge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The certificate file.
    pub path: PathBuf,
    /// The leaf's subject, e.g. `CN=web.internal`.
    pub subject: String,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    /// Its OCSP response, when one is configured: what it says, or why it cannot be stapled.
    pub ocsp: Option<Result<crate::ocsp::OcspValidity, String>>,
}

impl CertInfo {
    /// Whether its configured OCSP response is not stapled at `now` (stale, failed, not
    /// good); `None` when it has none.
    pub fn ocsp_stale(&self, now: i64) -> Option<bool> {
        self.ocsp
            .as_ref()
            .map(|o| !o.as_ref().is_ok_and(|v| v.fresh_at(now)))
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A certificate as served: without a staple, and with its OCSP response while that is fresh.
#[derive(Debug, Clone)]
pub struct Served {
    plain: Arc<CertifiedKey>,
    stapled: Option<(Arc<CertifiedKey>, crate::ocsp::OcspValidity)>,
}

impl Served {
    /// What to present at `now`: stapled while the response is fresh.
    pub fn at(&self, now: i64) -> Arc<CertifiedKey> {
        match &self.stapled {
            Some((key, validity)) if validity.fresh_at(now) => key.clone(),
            _ => self.plain.clone(),
        }
    }
}

/// Reads a certificate's OCSP response file: unreadable is an error (like any material file);
/// a response that cannot be stapled is kept as why, for the gauge and the log.
fn load_ocsp(
    path: &Path,
    cert: &Path,
    serial: &[u8],
) -> Result<(Vec<u8>, Result<crate::ocsp::OcspValidity, String>), MaterialError> {
    let der = std::fs::read(path).map_err(|e| error("OCSP response", path, e))?;
    let validity = crate::ocsp::validity(&der, serial);
    match &validity {
        Ok(v) if v.fresh_at(unix_now()) => {}
        Ok(_) => tracing::warn!(ocsp = %path.display(), cert = %cert.display(),
            "OCSP response is stale (its nextUpdate has passed): not stapled"),
        Err(why) => tracing::warn!(ocsp = %path.display(), cert = %cert.display(), why = %why,
            "OCSP response cannot be stapled"),
    }
    Ok((der, validity))
}

/// A certified key and, with an OCSP file, its stapled twin.
fn served(
    certified: Arc<CertifiedKey>,
    info: &mut CertInfo,
    cert: &Path,
    ocsp: Option<&Path>,
) -> Result<Served, MaterialError> {
    let Some(path) = ocsp else {
        return Ok(Served {
            plain: certified,
            stapled: None,
        });
    };
    let leaf = certified
        .cert
        .first()
        .ok_or_else(|| error("certificate", cert, "empty chain"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| error("certificate", cert, e))?;
    let (der, validity) = load_ocsp(path, cert, parsed.raw_serial())?;
    info.ocsp = Some(validity.clone());
    let stapled = validity.ok().map(|v| {
        let mut key = (*certified).clone();
        key.ocsp = Some(der);
        (Arc::new(key), v)
    });
    Ok(Served {
        plain: certified,
        stapled,
    })
}

/// Reads a chain and its key into a rustls certified key, refusing a key that does not match
/// the leaf certificate; also returns the leaf's names and expiry.
fn certified_key(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<CertifiedKey>, CertInfo, Vec<String>), MaterialError> {
    let chain = load_chain(cert)?;
    let info = leaf_info(cert, &chain[0])?;
    let names = dns_names(&chain[0]);
    let certified = CertifiedKey::from_der(chain, load_key(key)?, &provider())
        .map_err(|e| error("key", key, format!("does not fit {}: {e}", cert.display())))?;
    Ok((Arc::new(certified), info, names))
}

fn leaf_info(path: &Path, leaf: &CertificateDer<'_>) -> Result<CertInfo, MaterialError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| error("certificate", path, e))?;
    Ok(CertInfo {
        path: path.to_owned(),
        subject: parsed.subject().to_string(),
        not_after: parsed.validity().not_after.timestamp(),
        ocsp: None,
    })
}

fn dns_names(leaf: &CertificateDer<'_>) -> Vec<String> {
    peer_identity(leaf)
        .map(|id| {
            id.sans
                .iter()
                .filter_map(|s| s.strip_prefix("DNS:"))
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default()
}

/// A listener's server configuration and the certificates in it.
pub type ServerMaterial = (Arc<ServerConfig>, Vec<CertInfo>);

/// Picks a listener's certificate by the client's server name: an exact name, then a
/// one-label wildcard (`*.example.com`), then the listener's default certificate.
#[derive(Debug)]
pub struct SniResolver {
    default: Served,
    by_name: BTreeMap<String, Served>,
}

impl SniResolver {
    /// The certificate for `server_name` (`None`: the client sent no SNI), stapled with its
    /// OCSP response while that is fresh.
    pub fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let now = unix_now();
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return self.default.at(now);
        };
        if let Some(k) = self.by_name.get(&name) {
            return k.at(now);
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.by_name.get(&format!("*.{parent}")))
            .unwrap_or(&self.default)
            .at(now)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// A listener's TLS server configuration: its default certificate, its SNI certificates, its
/// client CA (mTLS) and ALPN, with secret extraction enabled for the kTLS handoff. Also
/// returns every certificate's expiry. `None` when the listener's clients do not speak TLS.
pub fn server_config(l: &ListenerConfig) -> Result<Option<ServerMaterial>, MaterialError> {
    let (Some(cert), Some(key)) = (&l.cert, &l.key) else {
        return Ok(None);
    };
    let (default, mut info, _) = certified_key(cert, key)?;
    let default = served(default, &mut info, cert, l.ocsp.as_deref())?;
    let mut infos = vec![info];
    let mut by_name = BTreeMap::new();
    for extra in &l.certs {
        let (k, mut info, sans) = certified_key(&extra.cert, &extra.key)?;
        let k = served(k, &mut info, &extra.cert, extra.ocsp.as_deref())?;
        let names = if extra.server_names.is_empty() {
            sans
        } else {
            extra
                .server_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect()
        };
        if names.is_empty() {
            return Err(error(
                "certificate",
                &extra.cert,
                "no server_names given and no DNS names in the certificate",
            ));
        }
        for name in names {
            by_name.insert(name, k.clone());
        }
        infos.push(info);
    }
    let policy = TlsPolicy::resolve(&l.effective_tls, crate::tls_policy::cpu_has_aes())
        .map_err(|e| error("TLS policy", &PathBuf::from("tls"), e))?;
    let policy_provider = Arc::new(policy.provider());
    let builder = ServerConfig::builder_with_provider(policy_provider.clone())
        .with_protocol_versions(&policy.rustls_versions())
        .map_err(|e| error("TLS policy", &PathBuf::from("tls"), e))?;
    let builder = match &l.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(ca)?),
                policy_provider,
            );
            if !l.client_crls.is_empty() {
                let mut crls = Vec::new();
                for path in &l.client_crls {
                    crls.extend(load_crls(path)?);
                }
                // The CA bundle's certificates are trust anchors: only the client's own
                // certificate has a status to look up.
                // A CRL past its nextUpdate is no longer trusted (the client is refused):
                // whatever refreshes the file has stopped.
                verifier = verifier
                    .with_crls(crls)
                    .only_check_end_entity_revocation()
                    .enforce_revocation_expiration();
            }
            let verifier = verifier.build().map_err(|e| error("CA bundle", ca, e))?;
            if l.allow_clients.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(crate::authz::AllowClients {
                    inner: verifier,
                    allow: l.allow_clients.clone(),
                }))
            }
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    // The server's order of preference wins (a scanner's "server cipher order: yes").
    config.ignore_client_order = true;
    if !policy.resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    config.alpn_protocols = l.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // The kTLS path needs the traffic secrets; they are zeroized right after the handoff.
    config.enable_secret_extraction = true;
    // Its own copy of the TLS 1.3 key schedule, to travel at a takeover (written nowhere).
    config.key_log = Arc::new(crate::handoff::SecretCatcher);
    Ok(Some((Arc::new(config), infos)))
}

/// Every file a listener's TLS material is read from (watched for changes).
pub fn material_files(l: &ListenerConfig) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [&l.cert, &l.key, &l.client_ca]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    files.extend(l.client_crls.iter().cloned());
    files.extend(l.ocsp.iter().cloned());
    files.extend(l.certs.iter().filter_map(|c| c.ocsp.clone()));
    for c in &l.certs {
        files.push(c.cert.clone());
        files.push(c.key.clone());
    }
    if let Some(u) = &l.upstream_tls {
        files.push(u.ca.clone());
        files.extend(u.client_cert.iter().cloned());
        files.extend(u.client_key.iter().cloned());
    }
    files
}

/// A client configuration and server name for connecting to a TLS upstream, and the expiry of
/// the client certificate when there is one.
pub fn upstream_client(
    u: &UpstreamTls,
) -> Result<(Arc<ClientConfig>, ServerName<'static>, Vec<CertInfo>), MaterialError> {
    let roots = load_roots(&u.ca)?;
    let policy = TlsPolicy::resolve(&u.effective_tls, crate::tls_policy::cpu_has_aes())
        .map_err(|e| error("TLS policy", &PathBuf::from("upstream_tls"), e))?;
    let policy_provider = Arc::new(policy.provider());
    let builder = ClientConfig::builder_with_provider(policy_provider.clone())
        .with_protocol_versions(&policy.rustls_versions())
        .map_err(|e| error("TLS policy", &PathBuf::from("upstream_tls"), e))?;
    let builder = if u.allow_servers.is_empty() {
        builder.with_root_certificates(roots)
    } else {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            policy_provider,
        )
        .build()
        .map_err(|e| error("CA bundle", &u.ca, e))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::authz::AllowServers {
                inner: verifier,
                allow: u.allow_servers.clone(),
            }))
    };
    let mut infos = Vec::new();
    let mut config = match (&u.client_cert, &u.client_key) {
        (Some(cert), Some(key)) => {
            let (certified, info, _) = certified_key(cert, key)?;
            infos.push(info);
            builder
                .with_client_auth_cert(certified.cert.clone(), load_key(key)?)
                .map_err(|e| error("key", key, e))?
        }
        _ => builder.with_no_client_auth(),
    };
    if !policy.resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(crate::handoff::SecretCatcher);
    let name = ServerName::try_from(u.server_name.clone())
        .map_err(|e| error("server name", &PathBuf::from(&u.server_name), e))?;
    Ok((Arc::new(config), name, infos))
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
