//! passthrough: the client's TLS goes to the upstream untouched. The agent peeks at the
//! ClientHello (without consuming it) for the server name, picks the upstream by it, connects,
//! and hands both plain legs to the data path the node chose ([`crate::path::PlainPath`]:
//! splice or sockmap), or to a user-space copy loop when the listener says
//! `data_path = "userspace"`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::relay::{Established, Plan};
use super::state::ListenerState;
use super::upstream::{connect_tcp, write_proxy_header};
use crate::client_hello::{self, ClientHelloError, MAX_CLIENT_HELLO, Peek};
use crate::net::Upstream;
use crate::outcome::{DataPath, Facts, Failure, Reason, Session};
use crate::path::{Choice, Negotiated};

/// Sets up one accepted passthrough connection: its route by server name, its upstream leg and
/// its data path.
pub(crate) async fn establish(
    state: &ListenerState,
    client: TcpStream,
    peer: SocketAddr,
    facts: &mut Facts,
) -> Result<Established, Failure> {
    let cfg = &state.config;
    let server_name =
        match tokio::time::timeout(cfg.handshake_timeout(), peek_server_name(&client)).await {
            Ok(Ok(name)) => name,
            // The client is gone: nothing to close gently.
            Ok(Err(PeekFailure::Io(e))) => {
                return Err(Failure::new(Reason::NoClientHello, e.to_string()));
            }
            Ok(Err(PeekFailure::Hello(e))) => {
                let reason = match e {
                    ClientHelloError::NotTls(_) => Reason::NotTls,
                    ClientHelloError::Oversized(_) => Reason::OversizedClientHello,
                    ClientHelloError::NotClientHello(_) | ClientHelloError::Malformed(_) => {
                        Reason::MalformedClientHello
                    }
                };
                return Err(Failure::new(reason, e.to_string()).lingering(client));
            }
            Err(_) => {
                return Err(Failure::new(
                    Reason::HandshakeTimeout,
                    format!(
                        "no complete ClientHello within {} ms",
                        cfg.handshake_timeout_ms
                    ),
                )
                .lingering(client));
            }
        };
    facts.session = Session::Sni(server_name.as_deref().map(Box::from));
    let route = server_name
        .as_ref()
        .and_then(|name| cfg.sni.get(name))
        .copied()
        .or(cfg.upstream);
    let Some(upstream_addr) = route else {
        return Err(Failure::new(
            Reason::UnknownSni,
            format!("no route for server name {server_name:?} and no default upstream"),
        )
        .lingering(client));
    };
    let upstream = match connect_tcp(upstream_addr, cfg.connect_timeout()).await {
        Ok(upstream) => upstream,
        Err(failure) => return Err(failure.lingering(client)),
    };
    if let Err(failure) = write_proxy_header(&upstream, cfg, &client, peer, None).await {
        return Err(failure.lingering(client));
    }
    let plan = match state.choose(Negotiated::Pending) {
        Choice::Take(DataPath::Splice, why) => (Plan::Splice, why),
        Choice::Take(DataPath::Sockmap, why) => (Plan::Sockmap, why),
        Choice::Take(DataPath::Userspace, why) => (
            Plan::Userspace {
                client: None,
                upstream: None,
            },
            why,
        ),
        Choice::Take(DataPath::Ktls, why) => {
            return Err(Failure::new(Reason::Internal, why).lingering(client));
        }
        Choice::Refuse(why) => {
            return Err(Failure::new(Reason::Internal, why).lingering(client));
        }
    };
    let (plan, why) = plan;
    facts.take_path(plan.path(), format!("{why}; upstream {upstream_addr}"));
    Ok(Established {
        client,
        upstream: Upstream::Tcp(upstream),
        plan,
        listener: state.index,
        idle_timeout: cfg.idle_timeout(),
    })
}

/// Why no ClientHello could be read.
enum PeekFailure {
    Hello(ClientHelloError),
    Io(io::Error),
}

/// Waits until the client's first record is a complete ClientHello and returns its server
/// name; nothing is consumed from the socket.
async fn peek_server_name(sock: &TcpStream) -> Result<Option<String>, PeekFailure> {
    let mut buf = crate::buffers::Buffer::with_len(MAX_CLIENT_HELLO);
    loop {
        let n = sock.peek(&mut buf).await.map_err(PeekFailure::Io)?;
        if n == 0 {
            return Err(PeekFailure::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed before sending a ClientHello",
            )));
        }
        match client_hello::peek(&buf[..n]) {
            Ok(Peek::ClientHello { server_name }) => return Ok(server_name),
            // The socket stays readable while the bytes we peeked sit in it, so wait a little
            // for the rest of the record instead of spinning on readiness.
            Ok(Peek::Incomplete) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err(PeekFailure::Hello(e)),
        }
    }
}
