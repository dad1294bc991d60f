//! The record layer of a session that stays in user space (the userspace data path), on
//! rustls' unbuffered API: the caller lends the buffers for each read and write, so an idle
//! session holds none. (rustls' buffered API keeps a 4 KiB read buffer in every session for
//! good; a user-space reencrypt connection holds two sessions.)

use rustls::unbuffered::{ConnectionState, EncryptError, InsufficientSizeError, UnbufferedStatus};

use super::handshake::{TlsSession, encode_record};

/// Why a session's record layer failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// rustls refused what the peer sent (a record that does not decrypt, a message out of
    /// place) or the peer sent a fatal alert. The alert rustls queued to say why is in the
    /// caller's outgoing buffer, to be sent before the connection closes.
    #[error("{0}")]
    Tls(rustls::Error),
    /// The failing record is longer than its version allows (RFC 8446 5.2: 2^14 + 256 bytes
    /// of ciphertext; RFC 5246 6.2.3: 2^14 + 2048). rustls reads up to the larger bound and
    /// then fails to decrypt; this names the cause as the kernel's record layer does.
    #[error("a record of {length} bytes, over the {limit} its TLS version allows ({source})")]
    Oversized {
        /// The record's length field.
        length: usize,
        /// The version's bound.
        limit: usize,
        /// What rustls said of it.
        source: rustls::Error,
    },
    /// The session is in a state where it cannot do what was asked (it is closed; a state the
    /// data phase cannot reach).
    #[error("{0}")]
    State(String),
}

/// What one [`UserSession::receive`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The peer sent its close_notify: no more plaintext will come from it.
    pub peer_closed: bool,
}

/// A finished session whose record layer stays in user space: the session, and the start of
/// a record whose end has not arrived yet (empty, holding no memory, between records).
pub struct UserSession {
    session: Box<TlsSession>,
    partial: Vec<u8>,
}

impl std::fmt::Debug for UserSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSession")
            .field("session", &self.session)
            .field("partial_bytes", &self.partial.len())
            .finish()
    }
}

/// What the record layer asks for next while it reads.
enum ReadNext {
    /// Ask rustls again.
    More,
    /// The peer's close_notify arrived.
    PeerClosed,
    /// Every complete record is processed: the rest (if any) waits for more bytes.
    Drained,
    Failed(rustls::Error),
    Unexpected(String),
}

/// What the record layer asks for next while it writes.
enum WriteNext {
    /// Ask rustls again (it encoded a queued record first).
    Again,
    Written,
    Failed(rustls::Error),
    Unexpected(String),
}

/// What is to be written.
#[derive(Clone, Copy)]
enum Outbound<'a> {
    Plaintext(&'a [u8]),
    CloseNotify,
}

/// Runs `$body` with `$conn` bound to the client or server connection of a [`TlsSession`].
macro_rules! on_connection {
    ($session:expr, $conn:ident => $body:expr) => {
        match $session {
            TlsSession::Client($conn, _) => $body,
            TlsSession::Server($conn, _) => $body,
        }
    };
}

impl UserSession {
    /// Takes a finished session's record layer into user space.
    pub fn new(mut session: Box<TlsSession>) -> Self {
        session.forget_caught();
        Self {
            session,
            partial: Vec::new(),
        }
    }

    /// rustls' view of the session.
    pub fn common(&self) -> &rustls::CommonState {
        self.session.common()
    }

    /// Decrypts every complete record in what is held plus `input` (read from the socket),
    /// appending the plaintext to `plain` and the records rustls has to send in answer (the
    /// alert that explains a failure) to `outgoing`; its answer to a KeyUpdate goes out ahead of
    /// the next record sealed. The start of a record not yet complete is kept for
    /// the next call.
    pub fn receive(
        &mut self,
        input: &mut [u8],
        plain: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
    ) -> Result<Received, RecordError> {
        if self.partial.is_empty() {
            let (consumed, received) = self.records_in(input, plain, outgoing)?;
            if consumed < input.len() {
                self.partial = input[consumed..].to_vec();
            }
            return Ok(received);
        }
        let mut joined = std::mem::take(&mut self.partial);
        joined.extend_from_slice(input);
        let (consumed, received) = self.records_in(&mut joined, plain, outgoing)?;
        joined.drain(..consumed);
        // Kept with its capacity while a record is still coming (a peer that sends a record a
        // byte at a time must not cost a copy of it per byte); freed once none is.
        self.partial = if joined.is_empty() {
            Vec::new()
        } else {
            joined
        };
        Ok(received)
    }

    /// Encrypts `plaintext` into records appended to `outgoing` (after any record rustls has
    /// queued, such as its answer to a KeyUpdate).
    pub fn seal(&mut self, plaintext: &[u8], outgoing: &mut Vec<u8>) -> Result<(), RecordError> {
        self.write(Outbound::Plaintext(plaintext), outgoing)
    }

    /// Appends a close_notify to `outgoing`.
    pub fn close_notify(&mut self, outgoing: &mut Vec<u8>) -> Result<(), RecordError> {
        self.write(Outbound::CloseNotify, outgoing)
    }

    fn records_in(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
    ) -> Result<(usize, Received), RecordError> {
        let mut consumed = 0;
        let mut received = Received::default();
        loop {
            let (discard, next) = on_connection!(self.session.as_mut(), c => read_step(
                c.process_tls_records(&mut incoming[consumed..]),
                plain,
                outgoing,
            ));
            consumed += discard;
            match next {
                ReadNext::More => {}
                ReadNext::PeerClosed => received.peer_closed = true,
                ReadNext::Drained => return Ok((consumed, received)),
                ReadNext::Failed(e) => {
                    let limit = match self.session.common().protocol_version() {
                        Some(rustls::ProtocolVersion::TLSv1_2) => (1 << 14) + 2048,
                        _ => (1 << 14) + 256,
                    };
                    let length = incoming
                        .get(consumed + 3..consumed + 5)
                        .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])));
                    self.encode_alert(&mut incoming[consumed..], outgoing);
                    return Err(match length {
                        Some(length) if length > limit => RecordError::Oversized {
                            length,
                            limit,
                            source: e,
                        },
                        _ => RecordError::Tls(e),
                    });
                }
                ReadNext::Unexpected(what) => return Err(RecordError::State(what)),
            }
        }
    }

    /// Appends the alert rustls queued after a failure to `outgoing`. Only while records are
    /// queued: each call pops one before it would parse `incoming` again (which still holds
    /// the offending bytes).
    fn encode_alert(&mut self, incoming: &mut [u8], outgoing: &mut Vec<u8>) {
        let mut plain = Vec::new();
        for _ in 0..4 {
            if !self.session.common().wants_write() {
                break;
            }
            let (_, next) = on_connection!(self.session.as_mut(), c => read_step(
                c.process_tls_records(incoming),
                &mut plain,
                outgoing,
            ));
            if !matches!(next, ReadNext::More) {
                break;
            }
        }
    }

    fn write(&mut self, what: Outbound<'_>, outgoing: &mut Vec<u8>) -> Result<(), RecordError> {
        // rustls is handed what it holds of the next record: a handshake message that spans
        // records is tracked by its place in this buffer.
        let mut held = std::mem::take(&mut self.partial);
        let result = loop {
            let (discard, next) = on_connection!(self.session.as_mut(), c => write_step(
                c.process_tls_records(&mut held),
                what,
                outgoing,
            ));
            held.drain(..discard);
            match next {
                WriteNext::Again => {}
                WriteNext::Written => break Ok(()),
                WriteNext::Failed(e) => break Err(RecordError::Tls(e)),
                WriteNext::Unexpected(what) => break Err(RecordError::State(what)),
            }
        };
        self.partial = held;
        result
    }
}

/// One call of `process_tls_records` while reading: plaintext to `plain`, records to send to
/// `outgoing`.
fn read_step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    plain: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
) -> (usize, ReadNext) {
    let mut discard = status.discard;
    let state = match status.state {
        Ok(state) => state,
        Err(e) => return (discard, ReadNext::Failed(e)),
    };
    let next = match state {
        ConnectionState::ReadTraffic(mut traffic) => {
            let mut next = ReadNext::More;
            while let Some(record) = traffic.next_record() {
                match record {
                    Ok(record) => {
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    Err(e) => {
                        next = ReadNext::Failed(e);
                        break;
                    }
                }
            }
            next
        }
        ConnectionState::EncodeTlsData(encoder) => match encode_record(encoder, outgoing) {
            Ok(()) => ReadNext::More,
            Err(what) => ReadNext::Unexpected(what),
        },
        ConnectionState::TransmitTlsData(transmit) => {
            // The caller sends `outgoing` once the records are read.
            transmit.done();
            ReadNext::More
        }
        ConnectionState::PeerClosed => ReadNext::PeerClosed,
        // Nothing complete is left to read (rustls would let us write: the data phase).
        ConnectionState::WriteTraffic(_)
        | ConnectionState::Closed
        | ConnectionState::BlockedHandshake => ReadNext::Drained,
        other => ReadNext::Unexpected(format!("{other:?} after the handshake")),
    };
    (discard, next)
}

/// One call of `process_tls_records` while writing `what` into `outgoing`.
fn write_step<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    what: Outbound<'_>,
    outgoing: &mut Vec<u8>,
) -> (usize, WriteNext) {
    let discard = status.discard;
    let state = match status.state {
        Ok(state) => state,
        Err(e) => return (discard, WriteNext::Failed(e)),
    };
    let next = match state {
        ConnectionState::WriteTraffic(mut traffic) => {
            let start = outgoing.len();
            // Room for the records' headers and tags: rustls says how much if it needs more.
            let mut room = match what {
                Outbound::Plaintext(data) => data.len() + (data.len() / 16_384 + 1) * 64,
                Outbound::CloseNotify => 64,
            };
            loop {
                outgoing.resize(start + room, 0);
                let written = match what {
                    Outbound::Plaintext(data) => traffic.encrypt(data, &mut outgoing[start..]),
                    Outbound::CloseNotify => traffic.queue_close_notify(&mut outgoing[start..]),
                };
                match written {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        break WriteNext::Written;
                    }
                    Err(EncryptError::InsufficientSize(InsufficientSizeError {
                        required_size,
                    })) => {
                        room = required_size;
                    }
                    Err(e) => {
                        outgoing.truncate(start);
                        break WriteNext::Unexpected(format!("encrypting: {e}"));
                    }
                }
            }
        }
        ConnectionState::EncodeTlsData(encoder) => match encode_record(encoder, outgoing) {
            Ok(()) => WriteNext::Again,
            Err(what) => WriteNext::Unexpected(what),
        },
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            WriteNext::Again
        }
        // Seen by the reader already (it is reported once).
        ConnectionState::PeerClosed => WriteNext::Again,
        other => WriteNext::Unexpected(format!("{other:?}: cannot send")),
    };
    (discard, next)
}
