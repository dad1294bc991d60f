//! The modes in which the agent owns a TLS session on one leg or both:
//! - terminate: client TLS in, plaintext to the upstream (TCP or a unix socket);
//! - reencrypt: client TLS in, a new TLS connection (verified against the configured CA and
//!   server name, optionally with a client certificate) to the upstream;
//! - originate: plaintext in from a local app, TLS to the upstream.
//!
//! [`establish`] runs the handshakes (rustls' unbuffered API, each reading one record at a
//! time, so no byte past it is read into user space and the session can go to the kernel with
//! its key schedule or stay in user space), connects the upstream, sends the PROXY header, and
//! asks the path choice ([`crate::path::choose`]) which data path the negotiated sessions take.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::net::TcpStream;

use super::relay::ktls::RekeyPolicy;
use super::relay::{Established, Plan};
use super::state::ListenerState;
use super::upstream::{Target, write_proxy_header};
use crate::handoff::{LegSide, TlsSession};
use crate::identity;
use crate::ktls::{Cipher, TlsVersion};
use crate::net::Upstream;
use crate::outcome::{DataPath, Facts, Failure, HandshakeOutcome, Reason, Session};
use crate::path::{Choice, LegSession, Negotiated};
use crate::proxy_protocol::ClientTls;

/// Sets up one accepted connection of a TLS mode: its handshakes, its upstream leg and its
/// data path.
pub(crate) async fn establish(
    state: &ListenerState,
    mut client: TcpStream,
    peer: SocketAddr,
    facts: &mut Facts,
) -> Result<Established, Failure> {
    let cfg = &state.config;
    let Some(target) = Target::of(cfg) else {
        // Config validation requires an upstream for these modes.
        return Err(Failure::new(Reason::Internal, "listener has no upstream").lingering(client));
    };
    // The material as it is now: a reload swaps it for later handshakes only.
    let material = state.tls.current();

    let mut client_tls = match &material.server {
        None => None,
        Some(config) => match client_handshake(state, config, &mut client, peer, facts).await {
            Ok(done) => Some(done),
            Err(failure) => return Err(failure.lingering(client)),
        },
    };
    let info = match client_tls
        .as_ref()
        .map(|(leg, sni)| client_tls_info(leg.common(), sni.clone()))
        .transpose()
    {
        Ok(info) => info,
        Err(e) => {
            let reason = Reason::ClientCertificateUnreadable;
            facts.client_handshake = Some(HandshakeOutcome::failed(reason));
            let failure = Failure::new(reason, e);
            return Err(closing(client, client_tls.map(|(leg, _)| leg), failure).await);
        }
    };
    facts.client_identity = info
        .as_ref()
        .and_then(|i| i.certificate.as_ref())
        .map(ToString::to_string);
    let mut client_tls = client_tls.take().map(|(leg, _)| leg);

    let mut upstream = match target.connect(cfg.connect_timeout()).await {
        Ok(upstream) => upstream,
        Err(failure) => return Err(closing(client, client_tls, failure).await),
    };
    if let Err(failure) = write_proxy_header(&upstream, cfg, &client, peer, info.as_ref()).await {
        return Err(closing(client, client_tls, failure).await);
    }
    let mut upstream_tls = match &material.upstream {
        None => None,
        Some((config, name)) => {
            let done = match &mut upstream {
                Upstream::Tcp(sock) => {
                    upstream_handshake(state, config, name, sock, peer, facts).await
                }
                Upstream::Unix(_) => Err(Failure::new(
                    Reason::Internal,
                    "upstream TLS over a unix socket",
                )),
            };
            match done {
                Ok(leg) => Some(leg),
                Err(failure) => return Err(closing(client, client_tls, failure).await),
            }
        }
    };

    // Every TLS leg's session, for the path choice and the report.
    let mut legs = Vec::new();
    let sockets: [(&str, _, std::os::fd::BorrowedFd<'_>); 2] = [
        ("client", &client_tls, client.as_fd()),
        ("upstream", &upstream_tls, upstream.as_fd()),
    ];
    for (name, tls, fd) in sockets {
        if let Some(tls) = tls {
            let (version, cipher) = session_of(tls.common());
            legs.push(LegSession {
                leg: name,
                version,
                cipher,
                // Unknown counts as established: the handoff then says what the kernel did.
                established: crate::sys::tcp_established(fd).unwrap_or(true),
            });
        }
    }
    facts.session = Session::Tls {
        alpn: info.as_ref().and_then(|i| i.alpn.as_deref()).map(Box::from),
    };
    let mut choice = state.choose(Negotiated::Legs(&legs));
    if matches!(choice, Choice::Take(DataPath::Ktls, _)) {
        // The kernel's TLS takes only an established socket, and checks it when the ULP
        // attaches. A FIN that came in after the check above is found here, while rustls still
        // holds the sessions: the choice is made again with that leg closed, so the connection
        // goes on in user space (and says why) instead of being reset.
        let sockets = [("client", client.as_fd()), ("upstream", upstream.as_fd())];
        for leg in &mut legs {
            let Some((_, fd)) = sockets.iter().find(|(name, _)| *name == leg.leg) else {
                continue;
            };
            match crate::ktls::attach_ulp(*fd) {
                Ok(()) => {}
                Err(crate::ktls::KtlsError::AttachUlp { source, .. })
                    if source.raw_os_error() == Some(libc::ENOTCONN) =>
                {
                    leg.established = false;
                }
                Err(e) => {
                    let failure = Failure::new(Reason::KtlsRefused, e.to_string());
                    return Err(closing(client, client_tls.take(), failure).await);
                }
            }
        }
        if legs.iter().any(|l| !l.established) {
            choice = state.choose(Negotiated::Legs(&legs));
        }
    }
    let path = match choice {
        Choice::Take(path, why) => {
            facts.take_path(path, why);
            path
        }
        // Only `data_path = "ktls"` runs a kernel handshake on a kernel that cannot offload
        // every suite.
        Choice::Refuse(why) => {
            if let Some(leg) = &mut upstream_tls {
                let _ = leg.send_close_notify(&upstream).await;
            }
            let _ = crate::net::shutdown_write(&upstream);
            let failure = Failure::new(Reason::KtlsRequired, why);
            return Err(closing(client, client_tls.take(), failure).await);
        }
    };
    let plan = match path {
        DataPath::Ktls => Plan::Ktls {
            client: client_tls.map(Box::new),
            upstream: upstream_tls.map(Box::new),
            rekey: RekeyPolicy {
                kernel: state.caps.rekey(),
                after_records: cfg.rekey_after_records,
                key_updates_per_second: state.limits.key_updates_per_second,
            },
        },
        DataPath::Userspace => Plan::Userspace {
            client: client_tls.map(Box::new),
            upstream: upstream_tls.map(Box::new),
        },
        other => {
            return Err(Failure::new(
                Reason::Internal,
                format!("a TLS mode cannot take the {} data path", other.as_str()),
            ));
        }
    };
    Ok(Established {
        client,
        upstream,
        plan,
        listener: state.index,
        idle_timeout: cfg.idle_timeout(),
    })
}

/// A failure after the client's session was set up: close_notify to the client, then the
/// failure, which closes the socket gently.
async fn closing(client: TcpStream, tls: Option<TlsSession>, failure: Failure) -> Failure {
    if let Some(mut leg) = tls {
        let _ = leg.send_close_notify(&client).await;
    }
    failure.lingering(client)
}

/// The client leg's handshake: it waits for the client's first bytes, takes a place under the
/// handshake limit for the handshake alone, and runs it within what is left of the deadline.
/// Returns the session and the client's server name.
async fn client_handshake(
    state: &ListenerState,
    config: &Arc<ServerConfig>,
    client: &mut TcpStream,
    peer: SocketAddr,
    facts: &mut Facts,
) -> Result<(TlsSession, Option<String>), Failure> {
    let leg = UnbufferedServerConnection::new(config.clone())
        .map(|c| TlsSession::Server(c, Default::default()))
        .map_err(|e| Failure::new(Reason::Internal, format!("rustls: {e}")))?;
    let deadline = state.config.handshake_timeout();
    let started = tokio::time::Instant::now();
    first_flight(client, deadline).await?;
    let first_bytes = tokio::time::Instant::now();
    // A place under the handshake limit once the client has sent something: a client that
    // connects and says nothing holds none. Waiting for it counts against the deadline.
    let left = deadline.saturating_sub(started.elapsed());
    let _place = state.handshake_place(peer, left).await?;
    let left = deadline.saturating_sub(started.elapsed());
    let (leg, sni) = handshake(leg, client, peer.to_string(), left, LegSide::Client, facts).await?;
    let kind = match leg.common().handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => crate::metrics::HandshakeKind::Resumed,
        _ => crate::metrics::HandshakeKind::Full,
    };
    let took = first_bytes.elapsed().as_secs_f64();
    state
        .telemetry
        .handshake_done(&state.config.name, kind, took);
    Ok((leg, sni))
}

/// The upstream leg's handshake, under the handshake limit and the deadline.
async fn upstream_handshake(
    state: &ListenerState,
    config: &Arc<ClientConfig>,
    name: &rustls::pki_types::ServerName<'static>,
    upstream: &mut TcpStream,
    client: SocketAddr,
    facts: &mut Facts,
) -> Result<TlsSession, Failure> {
    let leg = UnbufferedClientConnection::new(config.clone(), name.clone())
        .map(|c| TlsSession::Client(c, Default::default()))
        .map_err(|e| Failure::new(Reason::Internal, format!("rustls: {e}")))?;
    let deadline = state.config.handshake_timeout();
    let started = tokio::time::Instant::now();
    // In the client's turn: the place is the client's source's.
    let _place = state.handshake_place(client, deadline).await?;
    let who = upstream
        .peer_addr()
        .map_or_else(|_| "the upstream".to_owned(), |a| a.to_string());
    let left = deadline.saturating_sub(started.elapsed());
    let (leg, _) = handshake(leg, upstream, who, left, LegSide::Upstream, facts).await?;
    Ok(leg)
}

/// Runs one handshake within `deadline` and records how it ended in `facts`.
async fn handshake(
    mut leg: TlsSession,
    sock: &mut TcpStream,
    peer: String,
    deadline: Duration,
    side: LegSide,
    facts: &mut Facts,
) -> Result<(TlsSession, Option<String>), Failure> {
    let ended = tokio::time::timeout(deadline, leg.handshake(sock, &peer)).await;
    let counted = match side {
        LegSide::Client => &mut facts.client_handshake,
        LegSide::Upstream => &mut facts.upstream_handshake,
    };
    match ended {
        Ok(Ok(sni)) => {
            *counted = Some(HandshakeOutcome::completed(leg.common()));
            Ok((leg, sni))
        }
        Ok(Err(e)) => {
            let reason = e.reason(side);
            *counted = Some(HandshakeOutcome::failed(reason));
            Err(Failure::new(reason, e.to_string()))
        }
        Err(_) => {
            let reason = match side {
                LegSide::Client => Reason::HandshakeTimeout,
                LegSide::Upstream => Reason::UpstreamHandshakeTimeout,
            };
            *counted = Some(HandshakeOutcome::failed(reason));
            Err(Failure::new(
                reason,
                format!("no complete handshake within {} ms", deadline.as_millis()),
            ))
        }
    }
}

/// Waits until the client has sent its first bytes, up to the handshake deadline.
async fn first_flight(client: &TcpStream, deadline: Duration) -> Result<(), Failure> {
    // peek, not readable(): readiness may be reported before any byte is there.
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, client.peek(&mut first)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let reason = if crate::net::peer_gone(&e) {
                Reason::HandshakePeerClosed
            } else {
                Reason::HandshakeFailed
            };
            Err(Failure::new(
                reason,
                format!("waiting for the ClientHello: {e}"),
            ))
        }
        Err(_) => Err(Failure::new(
            Reason::HandshakeTimeout,
            format!("no ClientHello within {} ms", deadline.as_millis()),
        )),
    }
}

/// Version and cipher of a finished handshake, as the kernel would need them.
fn session_of(common: &CommonState) -> (Option<TlsVersion>, Option<Cipher>) {
    let version = common.protocol_version().and_then(TlsVersion::from_rustls);
    let cipher = common
        .negotiated_cipher_suite()
        .and_then(|s| Cipher::from_suite(s.suite()));
    (version, cipher)
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
