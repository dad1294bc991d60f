//! The userspace data path: rustls keeps the record layer of every TLS leg (its unbuffered API:
//! the buffers are lent for each read and write, so an idle connection holds none), and a copy
//! loop moves the plaintext between the legs (plain legs are copied as they are). Used when the
//! kernel cannot offload the session, when the listener says `data_path = "userspace"`, and for
//! passthrough listeners that say so.

use std::io;

use super::RelayOutcome;
use crate::buffers::Buffer;
use crate::handoff::{RecordError, TlsSession, UserSession};
use crate::net::{self, StreamSocket};
use crate::outcome::{Failure, Reason};

/// rustls in user space on every TLS leg and a copy loop between the legs.
pub(crate) async fn relay(
    client: &impl StreamSocket,
    client_tls: Option<Box<TlsSession>>,
    upstream: &impl StreamSocket,
    upstream_tls: Option<Box<TlsSession>>,
) -> RelayOutcome {
    let mut c = Leg::new(client, client_tls);
    let mut u = Leg::new(upstream, upstream_tls);
    let (mut up, mut down) = (0u64, 0u64);
    let result = copy_loop(&mut c, &mut u, &mut up, &mut down).await;
    RelayOutcome::moved(up, down, result)
}

/// The failure of a TLS leg's record layer, under the reason it is counted by.
fn record_failure(e: &RecordError) -> Failure {
    let reason = match e {
        RecordError::Tls(rustls::Error::AlertReceived(_)) => Reason::AlertReceived,
        RecordError::Tls(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::TooManyKeyUpdateRequests,
        )) => Reason::KeyUpdateRateLimit,
        RecordError::Oversized { .. }
        | RecordError::Tls(
            rustls::Error::PeerSentOversizedRecord
            | rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooLarge),
        ) => Reason::RecordOverflow,
        // A message that does not decode is one the agent does not accept: the kTLS path
        // names it the same way.
        RecordError::Tls(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }
            | rustls::Error::PeerMisbehaved(_),
        ) => Reason::UnexpectedMessage,
        RecordError::Tls(_) | RecordError::State(_) => Reason::RecordError,
    };
    Failure::new(reason, e.to_string())
}

/// Bytes read from a socket at once: two full TLS records.
const READ_BYTES: usize = 32 * 1024;

/// One side of a user-space relay: a socket and, for a TLS leg, its session. It holds no
/// buffer of its own: an idle connection costs its sockets and its TLS sessions, and the
/// buffers a forward needs are borrowed for that forward only.
struct Leg<'a, S> {
    sock: &'a S,
    tls: Option<UserSession>,
    /// Still reading from this leg.
    open: bool,
}

impl<'a, S: StreamSocket> Leg<'a, S> {
    fn new(sock: &'a S, tls: Option<Box<TlsSession>>) -> Self {
        Self {
            sock,
            tls: tls.map(UserSession::new),
            open: true,
        }
    }

    /// Sends plaintext to this leg's peer (sealed into records in `scratch` on a TLS leg).
    async fn send(&mut self, data: &[u8], scratch: &mut Vec<u8>) -> Result<(), Failure> {
        match &mut self.tls {
            None => Ok(net::write_all(self.sock, data).await?),
            Some(session) => {
                scratch.clear();
                session
                    .seal(data, scratch)
                    .map_err(|e| record_failure(&e))?;
                Ok(net::write_all(self.sock, scratch).await?)
            }
        }
    }

    /// Ends what we send to this leg's peer: close_notify on TLS, then FIN.
    async fn close_write(&mut self, scratch: &mut Vec<u8>) -> Result<(), Failure> {
        let mut result = Ok(());
        if let Some(session) = &mut self.tls {
            scratch.clear();
            match session.close_notify(scratch) {
                Ok(()) => result = net::write_all(self.sock, scratch).await,
                Err(e) => return Err(record_failure(&e)),
            }
        }
        let result = result.and_then(|()| net::shutdown_write(self.sock));
        match result {
            Err(e) if net::peer_gone(&e) => Ok(()),
            other => Ok(other?),
        }
    }
}

/// Handles bytes read from `src` (empty: its end): decrypts if `src` is TLS and forwards the
/// plaintext to `dst`, adding it to `forwarded`; a clean end of `src` half-closes `dst`. The
/// buffers it needs live as long as this call.
async fn forward<A: StreamSocket, B: StreamSocket>(
    src: &mut Leg<'_, A>,
    dst: &mut Leg<'_, B>,
    input: &mut [u8],
    forwarded: &mut u64,
) -> Result<(), Failure> {
    let mut scratch = Buffer::empty();
    let Leg { tls, open, sock } = src;
    let Some(session) = tls.as_mut() else {
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
    let (mut plain, mut answer) = (Buffer::empty(), Vec::new());
    let received = session.receive(input, &mut plain, &mut answer);
    // What rustls answers on this leg (the alert that explains a failure; its answer to a
    // KeyUpdate goes out ahead of the next record sealed for this leg).
    if !answer.is_empty() {
        let sent = net::write_all(*sock, &answer).await;
        if received.is_ok() {
            sent?;
        }
    }
    let received = received.map_err(|e| record_failure(&e))?;
    if !plain.is_empty() {
        dst.send(&plain, &mut scratch).await?;
        *forwarded += plain.len() as u64;
    }
    if received.peer_closed {
        *open = false;
        dst.close_write(&mut scratch).await?;
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
        let bytes = &mut bytes[..n];
        match ready {
            Ready::Client => forward(c, u, bytes, up).await?,
            Ready::Upstream => forward(u, c, bytes, down).await?,
        }
    }
}
