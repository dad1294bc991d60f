//! PROXY protocol headers, written first on an upstream connection so the upstream learns who
//! the client is (HAProxy's spec, versions 1 and 2; built with the `ppp` crate).
//!
//! The header precedes everything else on the upstream connection, including the upstream TLS
//! handshake in reencrypt and originate mode: that is where HAProxy, nginx and Envoy expect it.
//!
//! Version 2 carries, when the client leg is TLS terminated by this agent:
//! - `PP2_TYPE_ALPN` (0x01): the negotiated protocol, when there is one;
//! - `PP2_TYPE_AUTHORITY` (0x02): the client's SNI, when it sent one;
//! - `PP2_TYPE_SSL` (0x20): client flags (`PP2_CLIENT_SSL`, plus `PP2_CLIENT_CERT_CONN` and
//!   `PP2_CLIENT_CERT_SESS` when the client presented a certificate), `verify` = 0 when a
//!   presented certificate was verified (non-zero when none was presented), and the sub-TLVs
//!   `PP2_SUBTYPE_SSL_VERSION` ("TLSv1.3"), `PP2_SUBTYPE_SSL_CIPHER` (IANA name) and
//!   `PP2_SUBTYPE_SSL_CN` (the certificate's subject common name);
//! - [`PP2_TYPE_TLSPLICE_SAN`] (0xE0, in the spec's custom range): one TLV per subject
//!   alternative name of the client certificate, written `DNS:name`, `URI:uri`, `IP:addr` or
//!   `EMAIL:addr` (the spec defines no SAN type; SPIFFE IDs arrive as `URI:spiffe://...`).

use std::io;
use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Type, Version};

use crate::config::ProxyProtocol;

/// Custom TLV type carrying one subject alternative name of the verified client certificate.
pub const PP2_TYPE_TLSPLICE_SAN: u8 = 0xE0;
/// `PP2_TYPE_SSL` client flag: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// `PP2_TYPE_SSL` client flag: the client presented a certificate on this connection.
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// `PP2_TYPE_SSL` client flag: the client presented a certificate in this TLS session.
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;
/// `verify` value when the client presented no certificate (any non-zero value means "not
/// verified" to a receiver).
pub const VERIFY_NO_CERTIFICATE: u32 = 1;

/// The client's TLS session as the upstream should learn it.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// "TLSv1.2" or "TLSv1.3".
    pub version: String,
    /// IANA cipher suite name, e.g. "TLS_AES_128_GCM_SHA256".
    pub cipher: String,
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The client certificate, present only when the client sent one and it was verified
    /// (rustls refuses the handshake otherwise).
    pub certificate: Option<crate::identity::PeerIdentity>,
}

/// Builds the header for a connection from `source` (the client) to `destination` (the
/// listener's address).
pub fn header(
    version: ProxyProtocol,
    source: SocketAddr,
    destination: SocketAddr,
    tls: Option<&ClientTls>,
) -> io::Result<Vec<u8>> {
    match version {
        ProxyProtocol::V1 => Ok(ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes()),
        ProxyProtocol::V2 => {
            let mut builder = Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (source, destination),
            );
            if let Some(tls) = tls {
                if let Some(alpn) = &tls.alpn {
                    builder = builder.write_tlv(Type::ALPN, alpn)?;
                }
                if let Some(sni) = &tls.sni {
                    builder = builder.write_tlv(Type::Authority, sni.as_bytes())?;
                }
                builder = builder.write_tlv(Type::SSL, &ssl_tlv(tls)?)?;
                if let Some(cert) = &tls.certificate {
                    for san in &cert.sans {
                        builder = builder.write_tlv(PP2_TYPE_TLSPLICE_SAN, san.as_bytes())?;
                    }
                }
            }
            builder.build()
        }
    }
}

/// The value of `PP2_TYPE_SSL`: client flags (1 byte), verify (4 bytes), then sub-TLVs.
fn ssl_tlv(tls: &ClientTls) -> io::Result<Vec<u8>> {
    let (client, verify) = match tls.certificate {
        Some(_) => (
            PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
            0u32,
        ),
        None => (PP2_CLIENT_SSL, VERIFY_NO_CERTIFICATE),
    };
    let mut value = vec![client];
    value.extend_from_slice(&verify.to_be_bytes());
    let mut sub = |kind: Type, bytes: &[u8]| -> io::Result<()> {
        let len = u16::try_from(bytes.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        value.push(kind.into());
        value.extend_from_slice(&len.to_be_bytes());
        value.extend_from_slice(bytes);
        Ok(())
    };
    sub(Type::SSLVersion, tls.version.as_bytes())?;
    sub(Type::SSLCipher, tls.cipher.as_bytes())?;
    if let Some(cn) = tls
        .certificate
        .as_ref()
        .and_then(|c| c.common_name.as_ref())
    {
        sub(Type::SSLCommonName, cn.as_bytes())?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PeerIdentity;

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            "192.0.2.7:40000".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        )
    }

    #[test]
    fn v1_is_the_text_line() {
        let (s, d) = addrs();
        let h = header(ProxyProtocol::V1, s, d, None).unwrap();
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n");
        let v6 = header(
            ProxyProtocol::V1,
            "[2001:db8::1]:5".parse().unwrap(),
            "[2001:db8::2]:6".parse().unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(v6, b"PROXY TCP6 2001:db8::1 2001:db8::2 5 6\r\n");
    }

    #[test]
    fn v2_carries_addresses_and_the_verified_certificate() {
        let (s, d) = addrs();
        let tls = ClientTls {
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_128_GCM_SHA256".into(),
            sni: Some("api.internal".into()),
            alpn: Some(b"h2".to_vec()),
            certificate: Some(PeerIdentity {
                common_name: Some("client-1".into()),
                sans: vec![
                    "DNS:client-1.internal".into(),
                    "URI:spiffe://td/ns/a".into(),
                ],
            }),
        };
        let h = header(ProxyProtocol::V2, s, d, Some(&tls)).unwrap();
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.command, Command::Proxy);
        match parsed.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                assert_eq!(a.source_address.to_string(), "192.0.2.7");
                assert_eq!(a.source_port, 40000);
                assert_eq!(a.destination_port, 443);
            }
            other => panic!("{other:?}"),
        }
        let tlvs: Vec<(u8, Vec<u8>)> = parsed
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect();
        assert_eq!(tlvs[0], (0x01, b"h2".to_vec()));
        assert_eq!(tlvs[1], (0x02, b"api.internal".to_vec()));
        let ssl = &tlvs[2];
        assert_eq!(ssl.0, 0x20);
        assert_eq!(ssl.1[0], 0x07, "SSL + CERT_CONN + CERT_SESS");
        assert_eq!(&ssl.1[1..5], &[0, 0, 0, 0], "verified");
        let mut expected_sub = Vec::new();
        for (kind, v) in [
            (0x21u8, &b"TLSv1.3"[..]),
            (0x23, b"TLS_AES_128_GCM_SHA256"),
            (0x22, b"client-1"),
        ] {
            expected_sub.push(kind);
            expected_sub.extend_from_slice(&(v.len() as u16).to_be_bytes());
            expected_sub.extend_from_slice(v);
        }
        assert_eq!(&ssl.1[5..], expected_sub.as_slice());
        assert_eq!(tlvs[3], (0xE0, b"DNS:client-1.internal".to_vec()));
        assert_eq!(tlvs[4], (0xE0, b"URI:spiffe://td/ns/a".to_vec()));
        assert_eq!(tlvs.len(), 5);
    }

    #[test]
    fn v2_without_a_client_certificate_says_not_verified() {
        let (s, d) = addrs();
        let tls = ClientTls {
            version: "TLSv1.2".into(),
            cipher: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into(),
            ..ClientTls::default()
        };
        let h = header(ProxyProtocol::V2, s, d, Some(&tls)).unwrap();
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        let ssl = parsed.tlvs().next().unwrap().unwrap();
        assert_eq!(ssl.kind, 0x20);
        assert_eq!(ssl.value[0], PP2_CLIENT_SSL);
        assert_eq!(&ssl.value[1..5], &1u32.to_be_bytes());
        // Plain client legs get addresses only.
        let plain = header(ProxyProtocol::V2, s, d, None).unwrap();
        let parsed = ppp::v2::Header::try_from(plain.as_slice()).unwrap();
        assert_eq!(parsed.tlvs().count(), 0);
    }
}
