//! The userspace data path: rustls keeps the record layer of every TLS leg, and a copy loop
//! moves the plaintext between the legs (plain legs are copied as they are). Used when the
//! kernel cannot offload the session, when the listener says `data_path = "userspace"`, and for
//! passthrough listeners that say so.

use std::io::{self, Read, Write};

use rustls::Connection;

use super::RelayOutcome;
use crate::buffers::Buffer;
use crate::handoff::flush_tls;
use crate::net::{self, StreamSocket};
use crate::outcome::{Failure, Reason};

/// rustls in user space on every TLS leg and a copy loop between the legs.
pub(crate) async fn relay(
    client: &impl StreamSocket,
    client_tls: Option<Box<Connection>>,
    upstream: &impl StreamSocket,
    upstream_tls: Option<Box<Connection>>,
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

/// Bytes read from a socket at once: two full TLS records.
const READ_BYTES: usize = 32 * 1024;

/// Plaintext taken out of rustls at once on its way to the other leg: one record's worth.
const PLAINTEXT_BYTES: usize = 16 * 1024;

/// One side of a user-space relay: a socket and, for a TLS leg, its rustls connection. It holds
/// no buffer of its own: an idle connection costs its sockets and its TLS sessions, and the
/// buffers a forward needs are borrowed for that forward only.
struct Leg<'a, S> {
    sock: &'a S,
    tls: Option<Box<Connection>>,
    /// Still reading from this leg.
    open: bool,
}

impl<'a, S: StreamSocket> Leg<'a, S> {
    fn new(sock: &'a S, tls: Option<Box<Connection>>) -> Self {
        Self {
            sock,
            tls,
            open: true,
        }
    }

    /// Sends every record rustls has queued on this leg, through `scratch`.
    async fn flush(&mut self, scratch: &mut Vec<u8>) -> io::Result<()> {
        match &mut self.tls {
            Some(conn) => flush_tls(conn, scratch, self.sock).await,
            None => Ok(()),
        }
    }

    /// Sends plaintext to this leg's peer (TLS records go through `scratch`).
    async fn send(&mut self, mut data: &[u8], scratch: &mut Vec<u8>) -> io::Result<()> {
        match &mut self.tls {
            None => net::write_all(self.sock, data).await,
            Some(conn) => {
                // rustls buffers a bounded amount of plaintext: hand it over in pieces,
                // sending the records each piece becomes.
                while !data.is_empty() {
                    let taken = conn.writer().write(data)?;
                    data = &data[taken..];
                    flush_tls(conn, scratch, self.sock).await?;
                }
                Ok(())
            }
        }
    }

    /// Ends what we send to this leg's peer: close_notify on TLS, then FIN.
    async fn close_write(&mut self, scratch: &mut Vec<u8>) -> io::Result<()> {
        if let Some(conn) = &mut self.tls {
            conn.send_close_notify();
        }
        let result = match self.flush(scratch).await {
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
/// `dst`, adding it to `forwarded`; a clean end of `src` half-closes `dst`. The buffers it
/// needs live as long as this call.
async fn forward<A: StreamSocket, B: StreamSocket>(
    src: &mut Leg<'_, A>,
    dst: &mut Leg<'_, B>,
    input: &[u8],
    forwarded: &mut u64,
) -> Result<(), Failure> {
    let mut scratch = Buffer::empty();
    let Leg { tls, open, sock } = src;
    let Some(conn) = tls.as_mut() else {
        if input.is_empty() {
            *open = false;
            dst.close_write(&mut scratch).await?;
        } else {
            dst.send(input, &mut scratch).await?;
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
    let mut plain: Option<Buffer> = None;
    // rustls holds a bounded amount of plaintext: decrypt a piece, pass it on, then the next.
    let mut rest = input;
    while !rest.is_empty() && *open {
        conn.read_tls(&mut rest)
            .map_err(|e| Failure::new(Reason::RecordError, format!("reading TLS records: {e}")))?;
        if let Err(e) = conn.process_new_packets() {
            // rustls queued the alert that explains the failure: send it before closing.
            let _ = flush_tls(conn, &mut scratch, *sock).await;
            return Err(Failure::new(tls_failure(&e), e.to_string()));
        }
        loop {
            let plain = plain.get_or_insert_with(|| Buffer::with_len(PLAINTEXT_BYTES));
            match conn.reader().read(plain) {
                Ok(0) => {
                    *open = false;
                    dst.close_write(&mut scratch).await?;
                    break;
                }
                Ok(m) => {
                    dst.send(&plain[..m], &mut scratch).await?;
                    *forwarded += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failure::io("reading plaintext from rustls", &e)),
            }
        }
    }
    Ok(())
}

/// Which leg has bytes to read.
enum Ready {
    Client,
    Upstream,
}

async fn copy_loop<A: StreamSocket, B: StreamSocket>(
    c: &mut Leg<'_, A>,
    u: &mut Leg<'_, B>,
    up: &mut u64,
    down: &mut u64,
) -> Result<(), Failure> {
    // Borrowed while a leg has bytes to read, given back once neither has: an idle connection
    // holds none, a busy one reuses it.
    let mut buf: Option<Buffer> = None;
    loop {
        // Session tickets, alerts and handshake replies rustls queued on either leg.
        let mut scratch = Buffer::empty();
        c.flush(&mut scratch).await?;
        u.flush(&mut scratch).await?;
        drop(scratch);
        if !c.open && !u.open {
            return Ok(());
        }
        let ready = tokio::select! {
            r = c.sock.readable(), if c.open => { r?; Ready::Client }
            r = u.sock.readable(), if u.open => { r?; Ready::Upstream }
        };
        let bytes = buf.get_or_insert_with(|| Buffer::with_len(READ_BYTES));
        let read = match ready {
            Ready::Client => c.sock.try_read(bytes),
            Ready::Upstream => u.sock.try_read(bytes),
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf = None;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let bytes = &bytes[..n];
        match ready {
            Ready::Client => forward(c, u, bytes, up).await?,
            Ready::Upstream => forward(u, c, bytes, down).await?,
        }
    }
}
