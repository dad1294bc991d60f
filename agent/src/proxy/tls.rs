//! The modes in which the agent owns a TLS session on one leg or both:
//! - terminate: client TLS in, plaintext to the upstream;
//! - reencrypt: client TLS in, a new TLS connection (verified against the configured CA and
//!   server name, optionally with a client certificate) to the upstream;
//! - originate: plaintext in from a local app, TLS to the upstream.
//!
//! Each TLS handshake reads one record at a time, so no byte past it is read into user space.
//! The connection takes one data path for both legs, and says which and why:
//! - ktls: the kernel can offload every version and cipher rustls may negotiate (or the listener
//!   demands it); the handshakes run on rustls' unbuffered API, the keys go to the kernel, rustls
//!   keeps only the key schedule (KeyUpdate) and ticket store, and both directions are spliced,
//!   so the payload never enters user space;
//! - userspace: rustls keeps every TLS leg's record layer and a copy loop moves the plaintext.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConnection, CommonState, Connection, ServerConnection};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::relay::{
    KtlsLeg, RekeyPolicy, RelayOutcome, StreamSocket, close_leg, connect_unix, connect_upstream,
    idle_watch, linger_close, splice_relay, userspace_relay, with_idle_timeout, write_proxy_header,
};
use super::{ConnectionReport, DataPath, HandshakeOutcome, ListenerState};
use crate::certs::ListenerTls;
use crate::config::DataPathPolicy;
use crate::handoff::{self, KernelBound, complete_handshake_async};
use crate::identity;
use crate::ktls::{Cipher, TlsVersion};
use crate::proxy_protocol::ClientTls;

/// A TLS leg during and after its handshake, held the way the connection's data path needs it.
enum Leg {
    /// rustls keeps the record layer (the userspace path).
    User(Connection),
    /// Driven with rustls' unbuffered API so the session can go to the kernel with its key
    /// schedule (the ktls path).
    Kernel(KernelBound),
}

impl Leg {
    fn common(&self) -> &CommonState {
        match self {
            Leg::User(c) => c,
            Leg::Kernel(k) => k.common(),
        }
    }
}

/// Closes a leg whose TLS (if any) is still in user space: close_notify, then FIN.
async fn close(mut sock: impl AsyncWrite + Unpin, leg: Option<Leg>) {
    match leg {
        None => close_leg(sock, None).await,
        Some(Leg::User(conn)) => close_leg(sock, Some(conn)).await,
        Some(Leg::Kernel(mut k)) => {
            let _ = k.close_notify(&mut sock).await;
        }
    }
}

fn cipher_of(common: &CommonState) -> Option<Cipher> {
    use rustls::CipherSuite as S;
    match common.negotiated_cipher_suite()?.suite() {
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
fn session_of(common: &CommonState) -> (Option<TlsVersion>, Option<Cipher>, String) {
    let version = common.protocol_version().and_then(TlsVersion::from_rustls);
    let cipher = cipher_of(common);
    let text = match (version, cipher) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        _ => format!("{:?}", common.negotiated_cipher_suite()),
    };
    (version, cipher, text)
}

/// What the upstream learns of the client's TLS session through a PROXY v2 header; also where
/// the report gets the client certificate's names.
fn client_tls_info(common: &CommonState, sni: Option<String>) -> Result<ClientTls, String> {
    let version = match common.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        other => format!("{other:?}"),
    };
    let cipher = common
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        // rustls spells the TLS 1.3 suites "TLS13_..."; the IANA names are "TLS_...".
        .map(|name| match name.strip_prefix("TLS13_") {
            Some(rest) => format!("TLS_{rest}"),
            None => name.to_owned(),
        })
        .unwrap_or_default();
    let certificate = match common.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => Some(identity::peer_identity(leaf)?),
        None => None,
    };
    Ok(ClientTls {
        version,
        cipher,
        sni,
        alpn: common.alpn_protocol().map(<[u8]>::to_vec),
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

/// Waits until the client has sent its first bytes, up to the handshake deadline.
async fn first_flight(
    client: &TcpStream,
    deadline: Duration,
) -> Result<(), (&'static str, String)> {
    // peek, not readable(): readiness may be reported before any byte is there.
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, client.peek(&mut first)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err((
            "handshake failed",
            format!("waiting for the ClientHello: {e}"),
        )),
        Err(_) => Err((
            "handshake timeout",
            format!("no ClientHello within {} ms", deadline.as_millis()),
        )),
    }
}

/// Runs a handshake with a deadline; returns the leg and, for a server leg, the client's SNI.
/// On failure says why in the returned text.
async fn handshake(
    leg: Leg,
    sock: &mut TcpStream,
    peer: &str,
    deadline: Duration,
) -> Result<(Leg, Option<String>), (&'static str, String)> {
    let run = async {
        match leg {
            Leg::User(mut conn) => {
                complete_handshake_async(&mut conn, sock, peer).await?;
                let sni = match &conn {
                    Connection::Server(s) => s.server_name().map(str::to_owned),
                    Connection::Client(_) => None,
                };
                Ok((Leg::User(conn), sni))
            }
            Leg::Kernel(mut k) => {
                let sni = k.handshake(sock, peer).await?;
                Ok((Leg::Kernel(k), sni))
            }
        }
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(Ok(done)) => Ok(done),
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
    let target = match (cfg.upstream, &cfg.upstream_unix) {
        (Some(addr), _) => Target::Tcp(addr),
        (None, Some(path)) => Target::Unix(path.clone()),
        // Config validation requires an upstream for these modes.
        (None, None) => {
            report.error = Some("listener has no upstream".into());
            return report;
        }
    };
    let peer_s = peer.to_string();

    // Which kind of handshake: one the kernel can take over (rustls' unbuffered API, which
    // keeps the key schedule for KeyUpdate), or one that stays in user space. The userspace
    // reason stands unless the kernel path is chosen after the handshake.
    let userspace_reason = match (cfg.data_path, state.caps.offloads_all()) {
        (DataPathPolicy::Userspace, _) => Some("listener data_path = userspace".to_owned()),
        (DataPathPolicy::Auto, Err(why)) => Some(why),
        (DataPathPolicy::Ktls | DataPathPolicy::Auto, _) => None,
    };
    let for_kernel = userspace_reason.is_none();

    // The material as it is now: a reload swaps it for later handshakes only.
    let material = state.tls.current();
    let mut client_sni = None;
    let client_tls = match &material.server {
        None => None,
        Some(server_config) => {
            let leg = if for_kernel {
                UnbufferedServerConnection::new(server_config.clone())
                    .map(|c| Leg::Kernel(KernelBound::Server(c)))
            } else {
                ServerConnection::new(server_config.clone()).map(|c| Leg::User(c.into()))
            };
            let leg = match leg {
                Ok(leg) => leg,
                Err(e) => {
                    report.error = Some(format!("rustls: {e}"));
                    return report;
                }
            };
            // A place under the handshake limit once the client has sent something, held for
            // this handshake only: a client that connects and says nothing holds none.
            let started = tokio::time::Instant::now();
            let permit = match first_flight(&client, cfg.handshake_timeout()).await {
                Ok(()) => state.handshake_permit(),
                Err(e) => Err(e),
            };
            let _permit = match permit {
                Ok(permit) => permit,
                Err((reason, error)) => {
                    reason.clone_into(&mut report.reason);
                    report.error = Some(error);
                    linger_close(client).await;
                    return report;
                }
            };
            let left = cfg.handshake_timeout().saturating_sub(started.elapsed());
            match handshake(leg, &mut client, &peer_s, left).await {
                Ok((leg, sni)) => {
                    client_sni = sni;
                    report.client_handshake = Some(HandshakeOutcome::completed(leg.common()));
                    Some(leg)
                }
                Err((reason, error)) => {
                    report.reason = reason.to_owned();
                    report.client_handshake = Some(HandshakeOutcome::failed(reason));
                    report.error = Some(error);
                    linger_close(client).await;
                    return report;
                }
            }
        }
    };

    let client_info = match client_tls
        .as_ref()
        .map(|leg| client_tls_info(leg.common(), client_sni.clone()))
        .transpose()
    {
        Ok(info) => info,
        Err(e) => {
            report.reason = "client certificate unreadable".into();
            report.client_handshake = Some(HandshakeOutcome::failed(&report.reason));
            report.error = Some(e);
            close(client, client_tls).await;
            return report;
        }
    };
    if let Some(cert) = client_info.as_ref().and_then(|i| i.certificate.as_ref()) {
        report.client_identity = Some(cert.to_string());
    }

    let client_side = ClientSide {
        sock: client,
        tls: client_tls,
        info: client_info,
        peer,
        userspace_reason,
        material,
    };
    match target {
        Target::Tcp(addr) => tcp_upstream(state, report, client_side, addr).await,
        Target::Unix(path) => {
            let connected = connect_unix(&path, cfg.connect_timeout()).await;
            match announce(connected, cfg, &client_side).await {
                Ok(upstream) => {
                    let name = path.display().to_string();
                    relay(state, report, client_side, upstream, None, &name).await
                }
                Err(failure) => fail_early(report, failure, client_side).await,
            }
        }
    }
}

/// Writes the PROXY header (when the listener asks for one) on a freshly connected upstream.
async fn announce<U: AsyncWrite + Unpin>(
    connected: Result<U, (&'static str, String)>,
    cfg: &crate::config::ListenerConfig,
    client: &ClientSide,
) -> Result<U, (String, String)> {
    let mut upstream = connected.map_err(|(reason, error)| (reason.to_owned(), error))?;
    write_proxy_header(
        &mut upstream,
        cfg,
        &client.sock,
        client.peer,
        client.info.as_ref(),
    )
    .await
    .map_err(|(reason, error)| (reason.to_owned(), error))?;
    Ok(upstream)
}

/// Ends a connection that failed before its relay: reason and error in the report, and the
/// client's session closed cleanly (close_notify, then FIN).
async fn fail_early(
    mut report: ConnectionReport,
    (reason, error): (String, String),
    client: ClientSide,
) -> ConnectionReport {
    report.reason = reason;
    report.error = Some(error);
    close(client.sock, client.tls).await;
    report
}

/// Where a listener's upstream is.
enum Target {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

/// The client leg after its handshake, with what the upstream side needs to know.
struct ClientSide {
    sock: TcpStream,
    tls: Option<Leg>,
    info: Option<ClientTls>,
    peer: SocketAddr,
    /// Why this connection stays in user space, when it does.
    userspace_reason: Option<String>,
    /// The TLS material this connection's handshakes use.
    material: Arc<ListenerTls>,
}

/// Connects to a TCP upstream, sends the PROXY header, runs the upstream TLS handshake when
/// the mode has one, then relays.
async fn tcp_upstream(
    state: &ListenerState,
    mut report: ConnectionReport,
    client: ClientSide,
    upstream_addr: SocketAddr,
) -> ConnectionReport {
    let cfg = &state.config;
    let connected = connect_upstream(upstream_addr, cfg.connect_timeout()).await;
    let mut upstream = match announce(connected, cfg, &client).await {
        Ok(upstream) => upstream,
        Err(failure) => return fail_early(report, failure, client).await,
    };
    let upstream_tls = match &client.material.upstream {
        None => None,
        Some((client_config, name)) => {
            let leg = if client.userspace_reason.is_none() {
                UnbufferedClientConnection::new(client_config.clone(), name.clone())
                    .map(|c| Leg::Kernel(KernelBound::Client(c)))
            } else {
                ClientConnection::new(client_config.clone(), name.clone())
                    .map(|c| Leg::User(c.into()))
            };
            let leg = match leg {
                Ok(leg) => leg,
                Err(e) => {
                    let failure = ("rustls".to_owned(), format!("rustls: {e}"));
                    return fail_early(report, failure, client).await;
                }
            };
            let upstream_s = upstream_addr.to_string();
            let _permit = match state.handshake_permit() {
                Ok(permit) => permit,
                Err((reason, error)) => {
                    return fail_early(report, (reason.to_owned(), error), client).await;
                }
            };
            match handshake(leg, &mut upstream, &upstream_s, cfg.handshake_timeout()).await {
                Ok((leg, _)) => {
                    report.upstream_handshake = Some(HandshakeOutcome::completed(leg.common()));
                    Some(leg)
                }
                Err((reason, error)) => {
                    let failure = (format!("upstream {reason}"), error);
                    report.upstream_handshake = Some(HandshakeOutcome::failed(&failure.0));
                    return fail_early(report, failure, client).await;
                }
            }
        }
    };
    relay(
        state,
        report,
        client,
        upstream,
        upstream_tls,
        &upstream_addr.to_string(),
    )
    .await
}

/// Chooses the data path for both legs (and says why), then moves the bytes until both
/// directions end.
async fn relay(
    state: &ListenerState,
    mut report: ConnectionReport,
    client: ClientSide,
    upstream: impl StreamSocket + AsyncWrite + Unpin,
    upstream_tls: Option<Leg>,
    upstream_name: &str,
) -> ConnectionReport {
    let cfg = &state.config;
    let ClientSide {
        sock: client,
        tls: client_tls,
        info: client_info,
        peer,
        userspace_reason,
        material: _,
    } = client;
    // Every TLS leg must be offloadable for the kernel path.
    let mut sessions = Vec::new();
    let mut offload = Ok(());
    for (leg, tls) in [("client", &client_tls), ("upstream", &upstream_tls)] {
        if let Some(tls) = tls {
            let (version, cipher, text) = session_of(tls.common());
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
    let path = match (userspace_reason, offload) {
        (Some(why), _) => {
            report.reason = why;
            DataPath::Userspace
        }
        (None, Ok(())) => {
            report.reason = format!("kernel offloads {}", report.session);
            DataPath::Ktls
        }
        // Only `data_path = "ktls"` runs a kernel handshake on a kernel that cannot offload
        // every suite.
        (None, Err(why)) => {
            report.reason = format!("listener requires ktls: {why}");
            report.error = Some("connection refused by data_path = ktls".into());
            close(upstream, upstream_tls).await;
            close(client, client_tls).await;
            return report;
        }
    };
    report.data_path = Some(path);
    tracing::debug!(listener = %cfg.name, peer = %peer, data_path = %path, reason = %report.reason,
        session = %report.session, "data path chosen");

    let watch = idle_watch(&client, &upstream, &mut report.reason);
    let relay = async {
        match (client_tls, upstream_tls) {
            (Some(Leg::User(c)), Some(Leg::User(u))) => {
                userspace_relay(client, Some(c), upstream, Some(u)).await
            }
            (Some(Leg::User(c)), None) => userspace_relay(client, Some(c), upstream, None).await,
            (None, Some(Leg::User(u))) => userspace_relay(client, None, upstream, Some(u)).await,
            (client_tls, upstream_tls) => {
                let policy = RekeyPolicy {
                    kernel: state.caps.rekey.clone(),
                    after_records: cfg.rekey_after_records,
                };
                kernel_relay(
                    &client,
                    client_tls,
                    &upstream,
                    upstream_tls,
                    (&peer.to_string(), upstream_name),
                    &policy,
                )
                .await
            }
        }
    };
    let (outcome, idled) = with_idle_timeout(relay, watch, cfg.idle_timeout()).await;
    report.bytes_up = outcome.up;
    report.bytes_down = outcome.down;
    report.key_updates = outcome.key_updates;
    report.tickets = outcome.tickets;
    report.error = outcome.result.err().map(|e| e.to_string());
    if idled {
        super::idled(&mut report, cfg.idle_timeout());
    }
    report
}

/// Hands every TLS leg to the kernel, then splices.
async fn kernel_relay(
    client: &TcpStream,
    client_tls: Option<Leg>,
    upstream: &impl StreamSocket,
    upstream_tls: Option<Leg>,
    (peer, upstream_peer): (&str, &str),
    policy: &RekeyPolicy,
) -> RelayOutcome {
    let into_kernel =
        |leg: Option<Leg>, sock: BorrowedFd<'_>, who: &str| -> io::Result<Option<KtlsLeg>> {
            match leg {
                None => Ok(None),
                Some(Leg::Kernel(k)) => k
                    .into_kernel(sock, who)
                    .map(|s| Some(KtlsLeg::new(s, policy.after_records)))
                    .map_err(io::Error::other),
                Some(Leg::User(_)) => Err(io::Error::other(
                    "internal: a user-space session on the kernel path",
                )),
            }
        };
    let legs = into_kernel(client_tls, client.as_fd(), peer).and_then(|c| {
        Ok((
            c,
            into_kernel(upstream_tls, upstream.as_fd(), upstream_peer)?,
        ))
    });
    match legs {
        Ok((c, u)) => splice_relay(client, c.as_ref(), upstream, u.as_ref(), policy).await,
        Err(e) => RelayOutcome::failed(e),
    }
}
