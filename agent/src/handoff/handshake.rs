//! Running a TLS handshake on a tokio socket without reading past it, with rustls' unbuffered
//! API ([`TlsSession`]): the session that comes out can go to the kernel with its key schedule
//! ([`super::kernel`]) or keep its record layer in user space ([`super::records`]), and in user
//! space it holds no buffer of its own between records.
//!
//! The handshake must not consume a single byte that belongs to the record layer after it: once
//! the keys are in the kernel, bytes already read into user space cannot be given back. So every
//! read asks for no more than the rest of the current TLS record ([`RecordBoundary`]).

use std::fmt;
use std::io;

use rustls::CommonState;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::{self, StreamSocket};
use crate::outcome::Reason;

/// Length of a TLS record header: type (1), legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;

/// Tracks where TLS record boundaries fall in a byte stream, so a reader can ask for no more
/// than the rest of the current record (header first, then the body the header announced).
#[derive(Debug, Default, Clone)]
pub struct RecordBoundary {
    header: [u8; RECORD_HEADER_LEN],
    header_filled: usize,
    body_left: usize,
}

impl RecordBoundary {
    /// How many of `want` bytes may be read without crossing the end of the current record.
    pub fn limit(&self, want: usize) -> usize {
        if self.body_left > 0 {
            want.min(self.body_left)
        } else {
            want.min(RECORD_HEADER_LEN - self.header_filled)
        }
    }

    /// Accounts for bytes that were read (at most `limit` of them).
    pub fn advance(&mut self, bytes: &[u8]) {
        if self.body_left > 0 {
            self.body_left -= bytes.len().min(self.body_left);
            return;
        }
        let n = bytes.len().min(RECORD_HEADER_LEN - self.header_filled);
        self.header[self.header_filled..self.header_filled + n].copy_from_slice(&bytes[..n]);
        self.header_filled += n;
        if self.header_filled == RECORD_HEADER_LEN {
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            self.header_filled = 0;
        }
    }

    /// True when every byte seen so far ended a complete record.
    pub fn at_boundary(&self) -> bool {
        self.header_filled == 0 && self.body_left == 0
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// rustls refused the peer's handshake (and queued an alert, which was sent), or the peer
    /// aborted it with an alert.
    #[error("TLS handshake with {peer}: {source}")]
    Tls {
        /// The remote address.
        peer: String,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The peer's certificate verified, but names no identity the listener's
    /// `allow_clients` (or the leg's `allow_servers`) allows: refused with access_denied.
    #[error("TLS handshake with {peer}: {identity} is not allowed (access_denied sent)")]
    NotAllowed {
        /// The remote address.
        peer: String,
        /// Who the certificate says the peer is.
        identity: Box<crate::identity::PeerIdentity>,
    },
    /// The socket failed, or the peer closed it, before the handshake completed.
    #[error("TLS handshake with {peer}: {source}")]
    Io {
        /// The remote address.
        peer: String,
        /// What the socket said.
        source: io::Error,
    },
    /// The handshake's last record ended where a later record began: handing that stream to
    /// the kernel would lose bytes.
    #[error(
        "TLS handshake with {peer}: handshake ended inside a record: refusing to hand a misaligned stream to the kernel"
    )]
    Misaligned {
        /// The remote address.
        peer: String,
    },
    /// rustls' unbuffered API reached a state a handshake cannot be in.
    #[error("TLS handshake with {peer}: {what}")]
    Unexpected {
        /// The remote address.
        peer: String,
        /// The state.
        what: String,
    },
}

/// Which leg a handshake ran on: it names the reason a failure is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegSide {
    /// The client leg: the agent is the TLS server.
    Client,
    /// The upstream leg: the agent is the TLS client.
    Upstream,
}

impl HandshakeError {
    /// The reason this failure is counted under on `side`: a refused certificate (missing,
    /// untrusted, wrong name) is told apart from every other failure, and on the client leg
    /// so are an alert from the client and a client that left.
    pub fn reason(&self, side: LegSide) -> Reason {
        let certificate = matches!(
            self,
            HandshakeError::Tls {
                source: rustls::Error::NoCertificatesPresented
                    | rustls::Error::InvalidCertificate(_),
                ..
            }
        );
        match (side, self) {
            (LegSide::Client, HandshakeError::NotAllowed { .. }) => Reason::ClientNotAllowed,
            (LegSide::Upstream, HandshakeError::NotAllowed { .. }) => Reason::UpstreamNotAllowed,
            (LegSide::Client, _) if certificate => Reason::CertificateRefused,
            (LegSide::Upstream, _) if certificate => Reason::UpstreamCertificateRefused,
            (LegSide::Upstream, _) => Reason::UpstreamHandshakeFailed,
            (
                LegSide::Client,
                HandshakeError::Tls {
                    source: rustls::Error::AlertReceived(_),
                    ..
                },
            ) => Reason::HandshakeAlertReceived,
            (LegSide::Client, HandshakeError::Io { source, .. })
                if source.kind() == io::ErrorKind::UnexpectedEof
                    || crate::net::peer_gone(source) =>
            {
                Reason::HandshakePeerClosed
            }
            (LegSide::Client, _) => Reason::HandshakeFailed,
        }
    }
}

/// Reads into `buf` no more than what is left of the current TLS record; end of stream is an
/// error (the handshake is not over).
async fn read_in_record(
    sock: &mut TcpStream,
    boundary: &mut RecordBoundary,
    buf: &mut [u8],
) -> io::Result<usize> {
    let want = boundary.limit(buf.len());
    let n = sock.read(&mut buf[..want]).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the connection during the handshake",
        ));
    }
    boundary.advance(&buf[..n]);
    Ok(n)
}

/// One TLS leg's rustls session, driven through the unbuffered API: only that API yields a
/// [`rustls::kernel::KernelConnection`] (which derives the keys after a KeyUpdate and keeps a
/// server's session tickets once the record layer is in the kernel), and in user space it
/// leaves the buffers to the caller, so an idle session holds none.
pub enum TlsSession {
    /// We are the TLS client (the upstream leg), with the secrets caught from its handshake.
    Client(UnbufferedClientConnection, super::Caught),
    /// We are the TLS server (the client leg), with the secrets caught from its handshake.
    Server(UnbufferedServerConnection, super::Caught),
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsSession::Client(..) => "TlsSession::Client",
            TlsSession::Server(..) => "TlsSession::Server",
        })
    }
}

/// What a handshake step asks of the socket.
enum Step {
    /// Records were encoded into the outgoing buffer; ask rustls again.
    Encoded,
    /// Send the outgoing buffer.
    Transmit,
    /// Read more of the current record.
    Read,
    /// The handshake is complete.
    Done,
    /// rustls failed (it may have queued an alert); with the identity `allow_clients` or
    /// `allow_servers` refused, when that was why.
    Failed(rustls::Error, Option<Box<crate::identity::PeerIdentity>>),
    /// A state that cannot occur in a handshake we drive.
    Unexpected(String),
}

/// Appends the handshake record rustls has ready (a flight, a ticket, a KeyUpdate, an alert)
/// to `outgoing`.
pub(super) fn encode_record<Data>(
    mut encoder: EncodeTlsData<'_, Data>,
    outgoing: &mut Vec<u8>,
) -> Result<(), String> {
    let start = outgoing.len();
    outgoing.resize(start + 4096, 0);
    loop {
        match encoder.encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                outgoing.resize(start + required_size, 0);
            }
            Err(e) => {
                outgoing.truncate(start);
                return Err(format!("encoding a handshake record: {e}"));
            }
        }
    }
}

/// One call of `process_tls_records` on either side, reduced to what the socket must do next.
/// Encoded bytes are appended to `outgoing`.
fn step<Data>(status: UnbufferedStatus<'_, '_, Data>, outgoing: &mut Vec<u8>) -> (usize, Step) {
    let state = match status.state {
        Ok(state) => state,
        Err(e) => return (status.discard, Step::Failed(e, None)),
    };
    let step = match state {
        ConnectionState::EncodeTlsData(encoder) => match encode_record(encoder, outgoing) {
            Ok(()) => Step::Encoded,
            Err(what) => Step::Unexpected(what),
        },
        ConnectionState::TransmitTlsData(transmit) => {
            // The bytes are ours to send; rustls only needs to know they will be.
            transmit.done();
            Step::Transmit
        }
        ConnectionState::BlockedHandshake => Step::Read,
        ConnectionState::WriteTraffic(_) => Step::Done,
        other => Step::Unexpected(format!("{other:?} during the handshake")),
    };
    (status.discard, step)
}

impl TlsSession {
    /// Drops (zeroizing) the traffic secrets caught from the handshake: a session kept in
    /// user space never moves to another agent, and rustls holds its own copy.
    pub fn forget_caught(&mut self) {
        match self {
            TlsSession::Client(_, caught) | TlsSession::Server(_, caught) => {
                *caught = super::Caught::default();
            }
        }
    }

    /// rustls' view of the session: version, cipher, ALPN, peer certificates.
    pub fn common(&self) -> &CommonState {
        match self {
            TlsSession::Client(c, _) => c,
            TlsSession::Server(s, _) => s,
        }
    }

    fn process(&mut self, incoming: &mut [u8], outgoing: &mut Vec<u8>) -> (usize, Step) {
        let (discard, step) = self.process_records(incoming, outgoing);
        // A refused identity is left on this thread by the verifier, inside the call above.
        match (step, crate::authz::take_denied()) {
            (Step::Failed(e, _), Some(peer)) => (discard, Step::Failed(e, Some(Box::new(peer)))),
            (step, _) => (discard, step),
        }
    }

    fn process_records(&mut self, incoming: &mut [u8], outgoing: &mut Vec<u8>) -> (usize, Step) {
        match self {
            // The handshake derives the traffic secrets inside this call: caught for the
            // session's own key schedule (see `super::schedule`).
            TlsSession::Client(c, caught) => super::schedule::catching(caught, || {
                step(c.process_tls_records(incoming), outgoing)
            }),
            TlsSession::Server(s, caught) => super::schedule::catching(caught, || {
                step(s.process_tls_records(incoming), outgoing)
            }),
        }
    }

    /// Drives the handshake to completion on a tokio socket, reading one record at a time so
    /// nothing past the handshake is read into user space, and sending what rustls encodes
    /// (including the alert when the handshake fails). Returns the server name from the
    /// ClientHello when we are the server.
    async fn drive_handshake(
        &mut self,
        sock: &mut TcpStream,
        peer: &str,
    ) -> Result<Option<String>, HandshakeError> {
        let io_fail = |source: io::Error| HandshakeError::Io {
            peer: peer.to_owned(),
            source,
        };
        let mut boundary = RecordBoundary::default();
        let mut incoming: Vec<u8> = Vec::with_capacity(RECORD_HEADER_LEN + 18 * 1024);
        let mut outgoing = Vec::new();
        let mut buf = crate::buffers::Buffer::with_len(18 * 1024);
        // The first record, kept whole while we are the server: the ClientHello, for its SNI.
        let mut first_record = matches!(self, TlsSession::Server(..)).then(Vec::new);
        let mut server_name = None;
        loop {
            let (discard, next) = self.process(&mut incoming, &mut outgoing);
            incoming.drain(..discard);
            match next {
                Step::Encoded => {}
                Step::Transmit => {
                    sock.write_all(&outgoing).await.map_err(io_fail)?;
                    outgoing.clear();
                }
                Step::Read => {
                    let n = read_in_record(sock, &mut boundary, &mut buf)
                        .await
                        .map_err(io_fail)?;
                    incoming.extend_from_slice(&buf[..n]);
                    if let Some(hello) = &mut first_record {
                        hello.extend_from_slice(&buf[..n]);
                        if boundary.at_boundary() {
                            if let Ok(crate::client_hello::Peek::ClientHello {
                                server_name: name,
                            }) = crate::client_hello::peek(hello)
                            {
                                server_name = name;
                            }
                            first_record = None;
                        }
                    }
                }
                Step::Done => {
                    if !boundary.at_boundary() || !incoming.is_empty() {
                        return Err(HandshakeError::Misaligned {
                            peer: peer.to_owned(),
                        });
                    }
                    return Ok(server_name);
                }
                Step::Failed(source, denied) => {
                    // rustls queued the alert that explains the failure: encode and send it.
                    // Only while records are queued, since each call pops one before it would
                    // parse `incoming` again (which still holds the offending bytes).
                    outgoing.clear();
                    while self.common().wants_write() {
                        let (discard, next) = self.process(&mut incoming, &mut outgoing);
                        incoming.drain(..discard);
                        if !matches!(next, Step::Encoded) {
                            break;
                        }
                    }
                    let _ = sock.write_all(&outgoing).await;
                    if let Some(identity) = denied {
                        return Err(HandshakeError::NotAllowed {
                            peer: peer.to_owned(),
                            identity,
                        });
                    }
                    return Err(HandshakeError::Tls {
                        peer: peer.to_owned(),
                        source,
                    });
                }
                Step::Unexpected(what) => {
                    return Err(HandshakeError::Unexpected {
                        peer: peer.to_owned(),
                        what,
                    });
                }
            }
        }
    }

    /// Encodes a close_notify for a finished session that will not go to the kernel.
    fn close_notify_record(&mut self) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; 64];
        let written = match self {
            TlsSession::Client(c, _) => {
                queue_close_notify(c.process_tls_records(&mut []), &mut out)
            }
            TlsSession::Server(s, _) => {
                queue_close_notify(s.process_tls_records(&mut []), &mut out)
            }
        }?;
        out.truncate(written);
        Ok(out)
    }
}

fn queue_close_notify<Data>(
    status: UnbufferedStatus<'_, '_, Data>,
    out: &mut [u8],
) -> io::Result<usize> {
    match status.state {
        Ok(ConnectionState::WriteTraffic(mut w)) => w
            .queue_close_notify(out)
            .map_err(|e| io::Error::other(format!("encoding close_notify: {e}"))),
        Ok(other) => Err(io::Error::other(format!(
            "cannot send close_notify in state {other:?}"
        ))),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    }
}

impl TlsSession {
    /// Runs the handshake on `sock` to its end; returns the client's server name when we are
    /// the server.
    pub async fn handshake(
        &mut self,
        sock: &mut TcpStream,
        peer: &str,
    ) -> Result<Option<String>, HandshakeError> {
        self.drive_handshake(sock, peer).await
    }

    /// Sends a close_notify on a finished session whose record layer is still in user space
    /// (the FIN is the caller's).
    pub async fn send_close_notify(&mut self, sock: &impl StreamSocket) -> io::Result<()> {
        let record = self.close_notify_record()?;
        net::write_all(sock, &record).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boundary_stops_at_each_record_end_and_reassembles_split_headers() {
        let mut b = RecordBoundary::default();
        assert_eq!(b.limit(64), 5, "a header first");
        b.advance(&[22, 3, 3]);
        assert_eq!(b.limit(64), 2, "the rest of a split header");
        b.advance(&[0, 3]);
        assert!(!b.at_boundary());
        assert_eq!(b.limit(64), 3, "then exactly the body");
        b.advance(b"abc");
        assert!(b.at_boundary());
        assert_eq!(b.limit(64), 5);
    }

    #[test]
    fn handshake_failures_are_counted_by_side_and_cause() {
        let tls = |source| HandshakeError::Tls {
            peer: "p".into(),
            source,
        };
        let io = |kind| HandshakeError::Io {
            peer: "p".into(),
            source: io::Error::from(kind),
        };
        use LegSide::{Client, Upstream};
        let cases = [
            (
                Client,
                tls(rustls::Error::NoCertificatesPresented),
                Reason::CertificateRefused,
            ),
            (
                Upstream,
                tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired,
                )),
                Reason::UpstreamCertificateRefused,
            ),
            (
                Client,
                tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::HandshakeFailure,
                )),
                Reason::HandshakeAlertReceived,
            ),
            (
                Client,
                tls(rustls::Error::PeerIncompatible(
                    rustls::PeerIncompatible::NoCipherSuitesInCommon,
                )),
                Reason::HandshakeFailed,
            ),
            (
                Client,
                io(io::ErrorKind::UnexpectedEof),
                Reason::HandshakePeerClosed,
            ),
            (Client, io(io::ErrorKind::TimedOut), Reason::HandshakeFailed),
            (
                Upstream,
                io(io::ErrorKind::UnexpectedEof),
                Reason::UpstreamHandshakeFailed,
            ),
            (
                Client,
                HandshakeError::Misaligned { peer: "p".into() },
                Reason::HandshakeFailed,
            ),
        ];
        for (side, error, reason) in cases {
            assert_eq!(error.reason(side), reason, "{side:?} {error}");
        }
    }
}
