//! The userspace data path: rustls keeps the record layer of every TLS leg, and a copy loop
//! moves the plaintext between the legs (plain legs are copied as they are). Used when the
//! kernel cannot offload the session, when the listener says `data_path = "userspace"`, and for
//! passthrough listeners that say so.

use std::io::{self, Read, Write};

use rustls::Connection;

use super::RelayOutcome;
use crate::handoff::flush_tls;
use crate::net::{self, StreamSocket};
use crate::outcome::{Failure, Reason};

/// rustls in user space on every TLS leg and a copy loop between the legs.
pub(crate) async fn relay(
    client: &impl StreamSocket,
    client_tls: Option<Connection>,
    upstream: &impl StreamSocket,
    upstream_tls: Option<Connection>,
) -> RelayOutcome {
    let mut c = Leg::new(client, client_tls);
    let mut u = Leg::new(upstream, upstream_tls);
    let (mut up, mut down) = (0u64, 0u64);
    let result = copy_loop(&mut c, &mut u, &mut up, &mut down).await;
    RelayOutcome::moved(up, down, result)
}

/// The reason a rustls error on an established session is counted under.
fn tls_failure(e: &rustls::Error) -> Reason {
    match e {
        rustls::Error::AlertReceived(_) => Reason::AlertReceived,
        rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::PeerMisbehaved(_) => Reason::UnexpectedMessage,
        _ => Reason::RecordError,
    }
}

/// One side of a user-space relay: a socket and, for a TLS leg, its rustls connection.
struct Leg<'a, S> {
    sock: &'a S,
    tls: Option<Connection>,
    /// Still reading from this leg.
    open: bool,
    scratch: Vec<u8>,
    /// Plaintext read out of rustls on its way to the other leg; sized at first use, so a
    /// connection that moves nothing holds none.
    plain: Vec<u8>,
}

impl<'a, S: StreamSocket> Leg<'a, S> {
    fn new(sock: &'a S, tls: Option<Connection>) -> Self {
        Self {
            sock,
            tls,
            open: true,
            scratch: Vec::new(),
            plain: Vec::new(),
        }
    }

    /// Sends every record rustls has queued on this leg.
    async fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(conn) => flush_tls(conn, &mut self.scratch, self.sock).await,
            None => Ok(()),
        }
    }

    /// Sends plaintext to this leg's peer.
    async fn send(&mut self, mut data: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => net::write_all(self.sock, data).await,
            Some(conn) => {
                // rustls buffers a bounded amount of plaintext: hand it over in pieces,
                // sending the records each piece becomes.
                while !data.is_empty() {
                    let taken = conn.writer().write(data)?;
                    data = &data[taken..];
                    flush_tls(conn, &mut self.scratch, self.sock).await?;
                }
                Ok(())
            }
        }
    }

    /// Ends what we send to this leg's peer: close_notify on TLS, then FIN.
    async fn close_write(&mut self) -> io::Result<()> {
        if let Some(conn) = &mut self.tls {
            conn.send_close_notify();
        }
        let result = match self.flush().await {
            Ok(()) => net::shutdown_write(self.sock),
            Err(e) => Err(e),
        };
        match result {
            Err(e) if net::peer_gone(&e) => Ok(()),
            other => other,
        }
    }
}

/// Handles bytes read from `src`: decrypts if `src` is TLS and forwards the plaintext to
/// `dst`, adding it to `forwarded`; a clean end of `src` half-closes `dst`.
async fn forward<A: StreamSocket, B: StreamSocket>(
    src: &mut Leg<'_, A>,
    dst: &mut Leg<'_, B>,
    input: &[u8],
    forwarded: &mut u64,
) -> Result<(), Failure> {
    let Leg {
        tls,
        open,
        scratch,
        sock,
        plain,
    } = src;
    let Some(conn) = tls.as_mut() else {
        if input.is_empty() {
            *open = false;
            dst.close_write().await?;
        } else {
            dst.send(input).await?;
            *forwarded += input.len() as u64;
        }
        return Ok(());
    };
    if input.is_empty() {
        return Err(Failure::new(
            Reason::Truncated,
            "peer closed TCP without close_notify",
        ));
    }
    if plain.is_empty() {
        plain.resize(16 * 1024, 0);
    }
    // rustls holds a bounded amount of plaintext: decrypt a piece, pass it on, then the next.
    let mut rest = input;
    while !rest.is_empty() && *open {
        conn.read_tls(&mut rest)
            .map_err(|e| Failure::new(Reason::RecordError, format!("reading TLS records: {e}")))?;
        if let Err(e) = conn.process_new_packets() {
            // rustls queued the alert that explains the failure: send it before closing.
            let _ = flush_tls(conn, scratch, *sock).await;
            return Err(Failure::new(tls_failure(&e), e.to_string()));
        }
        loop {
            match conn.reader().read(plain) {
                Ok(0) => {
                    *open = false;
                    dst.close_write().await?;
                    break;
                }
                Ok(m) => {
                    dst.send(&plain[..m]).await?;
                    *forwarded += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failure::io("reading plaintext from rustls", &e)),
            }
        }
    }
    Ok(())
}

async fn copy_loop<A: StreamSocket, B: StreamSocket>(
    c: &mut Leg<'_, A>,
    u: &mut Leg<'_, B>,
    up: &mut u64,
    down: &mut u64,
) -> Result<(), Failure> {
    let mut c_buf = vec![0u8; 32 * 1024];
    let mut u_buf = vec![0u8; 32 * 1024];
    loop {
        // Session tickets, alerts and handshake replies rustls queued on either leg.
        c.flush().await?;
        u.flush().await?;
        if !c.open && !u.open {
            return Ok(());
        }
        tokio::select! {
            r = net::read_some(c.sock, &mut c_buf), if c.open => {
                let n = r?;
                forward(c, u, &c_buf[..n], up).await?;
            }
            r = net::read_some(u.sock, &mut u_buf), if u.open => {
                let n = r?;
                forward(u, c, &u_buf[..n], down).await?;
            }
        }
    }
}
