//! The modes in which the agent owns a TLS session on one leg or both:
//! - terminate: client TLS in, plaintext to the upstream;
//! - reencrypt: client TLS in, a new TLS connection (verified against the configured CA and
//!   server name, optionally with a client certificate) to the upstream;
//! - originate: plaintext in from a local app, TLS to the upstream.
//!
//! Each TLS handshake reads one record at a time, so no byte past it is read into user space.
//! Then the connection takes one data path for both legs, and says which and why:
//! - ktls: the kernel can offload every TLS leg's version and cipher; keys go to the kernel and
//!   both directions are spliced, so the payload never enters user space;
//! - userspace: rustls keeps every TLS leg's record layer and a copy loop moves the plaintext.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use rustls::{ClientConnection, Connection, ServerConnection};
use tokio::net::TcpStream;

use super::relay::{
    RelayOutcome, close_leg, connect_upstream, linger_close, splice_relay, userspace_relay,
    write_proxy_header,
};
use super::{ConnectionReport, DataPath, ListenerState};
use crate::config::DataPathPolicy;
use crate::handoff::{self, complete_handshake_async};
use crate::identity;
use crate::ktls::{Cipher, TlsVersion};
use crate::proxy_protocol::ClientTls;

fn cipher_of(conn: &Connection) -> Option<Cipher> {
    use rustls::CipherSuite as S;
    match conn.negotiated_cipher_suite()?.suite() {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
        S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
        _ => None,
    }
}

/// Version and cipher of a finished handshake, as the kernel would need them.
fn session_of(conn: &Connection) -> (Option<TlsVersion>, Option<Cipher>, String) {
    let version = conn.protocol_version().and_then(TlsVersion::from_rustls);
    let cipher = cipher_of(conn);
    let text = match (version, cipher) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        _ => format!("{:?}", conn.negotiated_cipher_suite()),
    };
    (version, cipher, text)
}

/// What the upstream learns of the client's TLS session through a PROXY v2 header; also where
/// the report gets the client certificate's names.
fn client_tls_info(conn: &Connection) -> Result<ClientTls, String> {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        other => format!("{other:?}"),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        // rustls spells the TLS 1.3 suites "TLS13_..."; the IANA names are "TLS_...".
        .map(|name| match name.strip_prefix("TLS13_") {
            Some(rest) => format!("TLS_{rest}"),
            None => name.to_owned(),
        })
        .unwrap_or_default();
    let sni = match conn {
        Connection::Server(s) => s.server_name().map(str::to_owned),
        Connection::Client(_) => None,
    };
    let certificate = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => Some(identity::peer_identity(leaf)?),
        None => None,
    };
    Ok(ClientTls {
        version,
        cipher,
        sni,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        certificate,
    })
}

/// The reason a failed handshake is counted under: a refused peer certificate (missing,
/// untrusted, wrong name) is told apart from every other failure.
fn handshake_failure_reason(e: &handoff::HandoffError) -> &'static str {
    let tls_error = match e {
        handoff::HandoffError::Handshake { source, .. } => source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    match tls_error {
        Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_)) => {
            "certificate refused"
        }
        _ => "handshake failed",
    }
}

/// Runs a handshake with a deadline; on failure says why in the returned text.
async fn handshake(
    mut conn: Connection,
    sock: &mut TcpStream,
    peer: &str,
    deadline: Duration,
) -> Result<Connection, (&'static str, String)> {
    match tokio::time::timeout(deadline, complete_handshake_async(&mut conn, sock, peer)).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => Err((handshake_failure_reason(&e), e.to_string())),
        Err(_) => Err((
            "handshake timeout",
            format!("no complete handshake within {} ms", deadline.as_millis()),
        )),
    }
}

/// Handles one accepted client connection to the end.
pub(crate) async fn handle(
    state: &ListenerState,
    mut client: TcpStream,
    peer: SocketAddr,
) -> ConnectionReport {
    let cfg = &state.config;
    let mut report = ConnectionReport::new(&cfg.name, peer);
    let Some(upstream_addr) = cfg.upstream else {
        // Config validation requires an upstream for these modes.
        report.error = Some("listener has no upstream".into());
        return report;
    };
    let peer_s = peer.to_string();

    let client_tls = match &state.server_tls {
        None => None,
        Some(server_config) => {
            let conn = match ServerConnection::new(server_config.clone()) {
                Ok(c) => c.into(),
                Err(e) => {
                    report.error = Some(format!("rustls: {e}"));
                    return report;
                }
            };
            match handshake(conn, &mut client, &peer_s, cfg.handshake_timeout()).await {
                Ok(conn) => Some(conn),
                Err((reason, error)) => {
                    report.reason = reason.to_owned();
                    report.error = Some(error);
                    linger_close(client).await;
                    return report;
                }
            }
        }
    };

    let client_info = match client_tls.as_ref().map(client_tls_info).transpose() {
        Ok(info) => info,
        Err(e) => {
            report.reason = "client certificate unreadable".into();
            report.error = Some(e);
            close_leg(client, client_tls).await;
            return report;
        }
    };
    if let Some(cert) = client_info.as_ref().and_then(|i| i.certificate.as_ref()) {
        report.client_identity = Some(cert.to_string());
    }

    let mut upstream = match connect_upstream(upstream_addr, cfg.connect_timeout()).await {
        Ok(s) => s,
        Err((reason, error)) => {
            report.reason = reason.to_owned();
            report.error = Some(error);
            close_leg(client, client_tls).await;
            return report;
        }
    };
    if let Err((reason, error)) =
        write_proxy_header(&mut upstream, cfg, &client, peer, client_info.as_ref()).await
    {
        report.reason = reason.to_owned();
        report.error = Some(error);
        close_leg(client, client_tls).await;
        return report;
    }

    let upstream_tls = match &state.upstream_tls {
        None => None,
        Some((client_config, name)) => {
            let conn = match ClientConnection::new(client_config.clone(), name.clone()) {
                Ok(c) => c.into(),
                Err(e) => {
                    report.error = Some(format!("rustls: {e}"));
                    close_leg(client, client_tls).await;
                    return report;
                }
            };
            let upstream_s = upstream_addr.to_string();
            match handshake(conn, &mut upstream, &upstream_s, cfg.handshake_timeout()).await {
                Ok(conn) => Some(conn),
                Err((reason, error)) => {
                    report.reason = format!("upstream {reason}");
                    report.error = Some(error);
                    close_leg(client, client_tls).await;
                    return report;
                }
            }
        }
    };

    // Every TLS leg must be offloadable for the kernel path.
    let mut sessions = Vec::new();
    let mut offload = Ok(());
    for (leg, conn) in [("client", &client_tls), ("upstream", &upstream_tls)] {
        if let Some(conn) = conn {
            let (version, cipher, text) = session_of(conn);
            sessions.push(format!("{leg} {text}"));
            if offload.is_ok() {
                offload = state
                    .caps
                    .offload(version, cipher)
                    .map_err(|why| format!("{leg} leg: {why}"));
            }
        }
    }
    if let Some(alpn) = client_info.as_ref().and_then(|i| i.alpn.as_deref()) {
        sessions.push(format!("ALPN {}", String::from_utf8_lossy(alpn)));
    }
    report.session = sessions.join(", ");
    let (path, reason) = match (cfg.data_path, offload) {
        (DataPathPolicy::Userspace, _) => (
            DataPath::Userspace,
            "listener data_path = userspace".to_owned(),
        ),
        (_, Ok(())) => (
            DataPath::Ktls,
            format!("kernel offloads {}", report.session),
        ),
        (DataPathPolicy::Auto, Err(why)) => (DataPath::Userspace, why),
        (DataPathPolicy::Ktls, Err(why)) => {
            report.reason = format!("listener requires ktls: {why}");
            report.error = Some("connection refused by data_path = ktls".into());
            close_leg(upstream, upstream_tls).await;
            close_leg(client, client_tls).await;
            return report;
        }
    };
    report.data_path = Some(path);
    report.reason = reason;
    tracing::debug!(listener = %cfg.name, peer = %peer, data_path = %path, reason = %report.reason,
        session = %report.session, "data path chosen");

    let outcome = match path {
        DataPath::Ktls => {
            kernel_relay(
                &client,
                client_tls,
                &upstream,
                upstream_tls,
                &peer_s,
                &upstream_addr.to_string(),
            )
            .await
        }
        // `Splice` is passthrough's path and never chosen above.
        DataPath::Userspace | DataPath::Splice => {
            userspace_relay(client, client_tls, upstream, upstream_tls).await
        }
    };
    report.bytes_up = outcome.up;
    report.bytes_down = outcome.down;
    report.error = outcome.result.err().map(|e| e.to_string());
    report
}

/// Hands every TLS leg to the kernel, then splices.
async fn kernel_relay(
    client: &TcpStream,
    client_tls: Option<Connection>,
    upstream: &TcpStream,
    upstream_tls: Option<Connection>,
    peer: &str,
    upstream_peer: &str,
) -> RelayOutcome {
    let client_ktls = client_tls.is_some();
    let upstream_ktls = upstream_tls.is_some();
    let handoff = || -> Result<(), handoff::HandoffError> {
        if let Some(conn) = client_tls {
            handoff::into_kernel(conn, client.as_fd(), peer)?;
        }
        if let Some(conn) = upstream_tls {
            handoff::into_kernel(conn, upstream.as_fd(), upstream_peer)?;
        }
        Ok(())
    };
    if let Err(e) = handoff() {
        return RelayOutcome {
            up: 0,
            down: 0,
            result: Err(io::Error::other(e)),
        };
    }
    splice_relay(client, client_ktls, upstream, upstream_ktls).await
}
