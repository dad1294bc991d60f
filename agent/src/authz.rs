//! Who may connect: a listener's `allow_clients` and an upstream leg's `allow_servers`, matched
//! against the peer certificate once it has been verified against its CA. A SPIFFE ID (URI
//! SAN) by trust domain and path prefix, a DNS SAN (exact, or one-label wildcard), or the
//! subject's common name. A peer that matches none is refused in the handshake with the
//! access_denied alert ([`rustls::CertificateError::ApplicationVerificationFailure`]), and
//! the identity it presented is kept for the connection's one log line ([`take_denied`]).

use std::cell::RefCell;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{PeerIdentity, peer_identity};

/// One entry of `allow_clients` / `allow_servers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum IdentityPattern {
    /// `spiffe://trust-domain[/path]`: a URI SAN in that trust domain whose path is `path` or
    /// below it (segment by segment; a trailing `/*` says the same). No path: the whole trust
    /// domain.
    Spiffe {
        /// The trust domain, lower case.
        trust_domain: String,
        /// Path segments the ID's path must start with.
        path: Vec<String>,
    },
    /// `dns:name`: a DNS SAN equal to `name` (case-insensitive), or, for `dns:*.example.com`,
    /// one label followed by `.example.com`.
    Dns(String),
    /// `cn:name`: the subject's common name, exactly.
    CommonName(String),
}

impl TryFrom<String> for IdentityPattern {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("spiffe://") {
            let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
            if domain.is_empty()
                || !domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(format!("{text:?}: not a SPIFFE trust domain"));
            }
            let path = path.strip_suffix("/*").unwrap_or(path);
            let path = path.strip_suffix('/').unwrap_or(path);
            let segments: Vec<String> = if path.is_empty() {
                Vec::new()
            } else {
                path.split('/').map(str::to_owned).collect()
            };
            if !segments.iter().all(|s| spiffe_segment(s)) {
                return Err(format!(
                    "{text:?}: a SPIFFE path prefix is whole segments of A-Z a-z 0-9 . - _ \
                     (not . or ..), optionally ending in /*"
                ));
            }
            return Ok(IdentityPattern::Spiffe {
                trust_domain: domain.to_ascii_lowercase(),
                path: segments,
            });
        }
        if let Some(name) = text.strip_prefix("dns:") {
            let wildcard_ok = name
                .strip_prefix("*.")
                .is_none_or(|rest| !rest.is_empty() && !rest.contains('*'));
            if name.is_empty() || !wildcard_ok || (name.contains('*') && !name.starts_with("*.")) {
                return Err(format!(
                    "{text:?}: a DNS name, or `*.` and a name for one label"
                ));
            }
            return Ok(IdentityPattern::Dns(name.to_ascii_lowercase()));
        }
        if let Some(cn) = text.strip_prefix("cn:") {
            if cn.is_empty() {
                return Err(format!("{text:?}: an empty common name"));
            }
            return Ok(IdentityPattern::CommonName(cn.to_owned()));
        }
        Err(format!(
            "{text:?}: expected spiffe://trust-domain/path, dns:name or cn:name"
        ))
    }
}

impl From<IdentityPattern> for String {
    fn from(p: IdentityPattern) -> String {
        p.to_string()
    }
}

impl std::fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityPattern::Spiffe { trust_domain, path } if path.is_empty() => {
                write!(f, "spiffe://{trust_domain}")
            }
            IdentityPattern::Spiffe { trust_domain, path } => {
                write!(f, "spiffe://{trust_domain}/{}", path.join("/"))
            }
            IdentityPattern::Dns(name) => write!(f, "dns:{name}"),
            IdentityPattern::CommonName(cn) => write!(f, "cn:{cn}"),
        }
    }
}

impl IdentityPattern {
    /// Whether a verified peer's names match this entry.
    pub fn matches(&self, peer: &PeerIdentity) -> bool {
        match self {
            IdentityPattern::Spiffe { trust_domain, path } => {
                // An X.509-SVID has exactly one URI SAN: a certificate with more is not one.
                let mut uris = peer.sans.iter().filter_map(|s| s.strip_prefix("URI:"));
                let (Some(uri), None) = (uris.next(), uris.next()) else {
                    return false;
                };
                spiffe_parts(uri).is_some_and(|(domain, segments)| {
                    domain == trust_domain
                        && segments.len() >= path.len()
                        && segments.iter().zip(path).all(|(a, b)| a == b)
                })
            }
            IdentityPattern::Dns(pattern) => peer
                .sans
                .iter()
                .filter_map(|s| s.strip_prefix("DNS:"))
                .any(|name| dns_matches(pattern, &name.to_ascii_lowercase())),
            IdentityPattern::CommonName(cn) => peer.common_name.as_deref() == Some(cn.as_str()),
        }
    }
}

/// One path segment as the SPIFFE ID standard allows it: A-Z a-z 0-9 . - _, not `.` or `..`.
fn spiffe_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// A SPIFFE ID's trust domain and path segments; `None` when it is not a SPIFFE ID that
/// conforms to the standard (lower-case trust domain of a-z 0-9 . - _, segments as
/// [`spiffe_segment`], no empty segment, no trailing slash, no query or fragment): such an
/// ID matches nothing.
fn spiffe_parts(uri: &str) -> Option<(&str, Vec<&str>)> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if !domain_ok {
        return None;
    }
    if path.is_empty() {
        return Some((domain, Vec::new()));
    }
    let segments: Vec<&str> = path.split('/').collect();
    segments
        .iter()
        .all(|s| spiffe_segment(s))
        .then_some((domain, segments))
}

fn dns_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == name,
    }
}

/// Whether `peer` may connect under `allowed` (empty: anyone the CA vouches for).
pub fn allowed(allowed: &[IdentityPattern], peer: &PeerIdentity) -> bool {
    allowed.is_empty() || allowed.iter().any(|p| p.matches(peer))
}

thread_local! {
    /// The identity of the last peer refused on this thread, for the handshake that runs
    /// here to take ([`take_denied`]). The verifier runs inside rustls' record processing,
    /// on the thread that drives the connection, and has no other way back to it.
    static DENIED: RefCell<Option<PeerIdentity>> = const { RefCell::new(None) };
}

/// The identity a verifier refused during the record processing that just ran on this thread.
pub fn take_denied() -> Option<PeerIdentity> {
    DENIED.with(|d| d.borrow_mut().take())
}

fn refuse(peer: PeerIdentity) -> rustls::Error {
    DENIED.with(|d| *d.borrow_mut() = Some(peer));
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Checks the verified end-entity certificate against `allow`.
fn authorize(
    allow: &[IdentityPattern],
    end_entity: &CertificateDer<'_>,
) -> Result<(), rustls::Error> {
    let peer = peer_identity(end_entity).map_err(|e| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            std::io::Error::other(e),
        ))))
    })?;
    if allowed(allow, &peer) {
        Ok(())
    } else {
        Err(refuse(peer))
    }
}

/// A client certificate verifier that, after the CA's verdict, checks `allow_clients`.
#[derive(Debug)]
pub struct AllowClients {
    /// The CA's verifier.
    pub inner: Arc<dyn ClientCertVerifier>,
    /// Who may connect.
    pub allow: Vec<IdentityPattern>,
}

impl ClientCertVerifier for AllowClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        authorize(&self.allow, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server certificate verifier that, after the CA's and the server name's verdict, checks
/// `allow_servers`.
#[derive(Debug)]
pub struct AllowServers {
    /// The CA's verifier.
    pub inner: Arc<dyn ServerCertVerifier>,
    /// Who the upstream may be.
    pub allow: Vec<IdentityPattern>,
}

impl ServerCertVerifier for AllowServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        authorize(&self.allow, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(cn: Option<&str>, sans: &[&str]) -> PeerIdentity {
        PeerIdentity {
            common_name: cn.map(str::to_owned),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn pattern(text: &str) -> IdentityPattern {
        IdentityPattern::try_from(text.to_owned()).expect(text)
    }

    #[test]
    fn patterns_match_as_the_table_says() {
        let a = peer(
            Some("node-a"),
            &["URI:spiffe://mesh.local/ns/a/sa/web", "DNS:web.a.internal"],
        );
        let b = peer(Some("node-b"), &["URI:spiffe://mesh.local/ns/b/sa/web"]);
        let other_domain = peer(None, &["URI:spiffe://other.local/ns/a/sa/web"]);
        let prefix_trap = peer(None, &["URI:spiffe://mesh.local/ns/ab/sa/web"]);
        // Not conforming SPIFFE IDs: they match nothing.
        let dot_dot = peer(None, &["URI:spiffe://mesh.local/ns/a/../b"]);
        let empty_segment = peer(None, &["URI:spiffe://mesh.local/ns//a"]);
        let upper_domain = peer(None, &["URI:spiffe://MESH.local/ns/a"]);
        let two_uris = peer(
            None,
            &[
                "URI:spiffe://mesh.local/ns/a",
                "URI:spiffe://mesh.local/ns/b",
            ],
        );
        #[rustfmt::skip]
        let table: &[(&str, &PeerIdentity, bool)] = &[
            ("spiffe://mesh.local", &a, true),
            ("spiffe://mesh.local", &other_domain, false),
            ("spiffe://MESH.local/ns/a", &a, true),
            ("spiffe://mesh.local/ns/a/*", &a, true),
            ("spiffe://mesh.local/ns/a/", &a, true),
            ("spiffe://mesh.local/ns/a", &b, false),
            // Whole segments: ns/a is not a prefix of ns/ab.
            ("spiffe://mesh.local/ns/a", &prefix_trap, false),
            ("spiffe://mesh.local/ns/a/sa/web", &a, true),
            ("spiffe://mesh.local/ns/a/sa/web/extra", &a, false),
            ("spiffe://mesh.local/ns/a", &dot_dot, false),
            ("spiffe://mesh.local/ns/a", &empty_segment, false),
            ("spiffe://mesh.local/ns", &empty_segment, false),
            ("spiffe://mesh.local/ns/a", &upper_domain, false),
            ("spiffe://mesh.local/ns/a", &two_uris, false),
            ("dns:web.a.internal", &a, true),
            ("dns:WEB.A.internal", &a, true),
            ("dns:*.a.internal", &a, true),
            ("dns:*.internal", &a, false),
            ("dns:web.a.internal", &b, false),
            ("cn:node-a", &a, true),
            ("cn:node-A", &a, false),
            ("cn:node-a", &b, false),
        ];
        for (text, peer, want) in table {
            assert_eq!(pattern(text).matches(peer), *want, "{text} vs {peer}");
        }
        assert!(allowed(&[], &b), "no list: anyone the CA vouches for");
        assert!(allowed(
            &[pattern("cn:x"), pattern("spiffe://mesh.local/ns/b")],
            &b
        ));
        assert!(!allowed(&[pattern("cn:x")], &b));
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_entry() {
        for bad in [
            "web.internal",
            "spiffe://",
            "spiffe://mesh local/x",
            "spiffe://mesh.local/ns/*/sa",
            "spiffe://mesh.local/../x",
            "spiffe://mesh.local/ns/a*",
            "spiffe://mesh.local/ns//a",
            "dns:*.",
            "dns:",
            "dns:web.*.internal",
            "dns:a*.internal",
            "cn:",
        ] {
            let e = IdentityPattern::try_from(bad.to_owned()).expect_err(bad);
            assert!(e.contains(bad) || bad.is_empty(), "{e}");
        }
        // Written back as read (the /config page shows them).
        for good in [
            "spiffe://mesh.local",
            "spiffe://mesh.local/ns/a",
            "dns:*.a.internal",
            "cn:x",
        ] {
            assert_eq!(pattern(good).to_string(), good);
        }
    }
}
