//! A blocking kTLS stream for tests: a rustls handshake finished on a blocking socket without
//! reading past it, the session handed to the kernel through the agent's kTLS interface
//! ([`tlsplice::ktls`]), then plain reads and writes that the kernel encrypts. The agent serves
//! with its own async handoff; this is the independent peer the kTLS smoke test talks to.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};

use rustls::Connection;
use tlsplice::handoff::{KtlsSession, RecordBoundary};
use tlsplice::ktls::{self, CryptoInfo, Direction, KtlsError, RecordType, TlsVersion};

/// Reads from an inner reader but never past the end of the current TLS record.
#[derive(Debug)]
pub struct RecordBoundaryReader<R> {
    inner: R,
    boundary: RecordBoundary,
}

impl<R: Read> RecordBoundaryReader<R> {
    /// Wraps `inner`, which must be positioned at a record boundary.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            boundary: RecordBoundary::default(),
        }
    }

    /// True when every byte read so far ended a complete record.
    pub fn at_record_boundary(&self) -> bool {
        self.boundary.at_boundary()
    }

    /// Returns the inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for RecordBoundaryReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let want = self.boundary.limit(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        self.boundary.advance(&buf[..n]);
        Ok(n)
    }
}

/// A socket as rustls sees it during the handshake: bounded reads, plain writes.
struct HandshakeIo<'a> {
    reader: RecordBoundaryReader<&'a TcpStream>,
    writer: &'a TcpStream,
}

impl Read for HandshakeIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for HandshakeIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// Errors while completing a handshake and handing it to the kernel.
#[derive(Debug)]
pub enum HandoffError {
    /// Socket I/O or a TLS error during the handshake.
    Handshake(io::Error),
    /// rustls would not release the secrets.
    Extract(rustls::Error),
    /// The kernel refused the session.
    Kernel(KtlsError),
}

impl std::fmt::Display for HandoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoffError::Handshake(e) => write!(f, "TLS handshake: {e}"),
            HandoffError::Extract(e) => write!(f, "extracting TLS secrets: {e}"),
            HandoffError::Kernel(e) => write!(f, "kTLS handoff: {e}"),
        }
    }
}

/// Drives the rustls handshake on a blocking socket to completion without reading past it,
/// and flushes everything rustls has to send.
pub fn complete_handshake(conn: &mut Connection, sock: &TcpStream) -> Result<(), HandoffError> {
    let mut io = HandshakeIo {
        reader: RecordBoundaryReader::new(sock),
        writer: sock,
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(HandoffError::Handshake)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut io).map_err(HandoffError::Handshake)?;
    }
    if !io.reader.at_record_boundary() {
        return Err(HandoffError::Handshake(io::Error::other(
            "handshake ended inside a record: refusing to hand a misaligned stream to the kernel",
        )));
    }
    Ok(())
}

/// Moves a completed rustls session into the kernel: extracts the secrets, attaches the TLS ULP
/// and installs TX and RX state. The connection must have been created with
/// `enable_secret_extraction` and finished with [`complete_handshake`].
pub fn into_kernel(conn: Connection, sock: BorrowedFd<'_>) -> Result<KtlsSession, HandoffError> {
    let version = conn
        .protocol_version()
        .and_then(TlsVersion::from_rustls)
        .ok_or_else(|| {
            HandoffError::Kernel(KtlsError::Unsupported {
                what: format!("protocol version {:?}", conn.protocol_version()),
            })
        })?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(HandoffError::Extract)?;
    let tx = CryptoInfo::from_rustls(version, secrets.tx.0, &secrets.tx.1)
        .map_err(HandoffError::Kernel)?;
    let rx = CryptoInfo::from_rustls(version, secrets.rx.0, &secrets.rx.1)
        .map_err(HandoffError::Kernel)?;
    drop(secrets);
    ktls::attach_ulp(sock).map_err(HandoffError::Kernel)?;
    ktls::set_crypto_info(sock, Direction::Tx, &tx).map_err(HandoffError::Kernel)?;
    ktls::set_crypto_info(sock, Direction::Rx, &rx).map_err(HandoffError::Kernel)?;
    Ok(KtlsSession {
        version,
        cipher: tx.cipher(),
    })
}

/// A connected socket whose record layer is in the kernel.
///
/// Reads return application data only: a peer's close_notify reads as end of stream, a TCP close
/// without one is an `UnexpectedEof` error (truncation), a NewSessionTicket is consumed and
/// counted, any other alert or handshake message is an error.
#[derive(Debug)]
pub struct KtlsStream {
    sock: TcpStream,
    session: KtlsSession,
    peer_closed: bool,
    /// Post-handshake records carrying NewSessionTickets consumed so far.
    pub ticket_records: u64,
}

impl KtlsStream {
    /// Completes the handshake on `sock` and hands the session to the kernel.
    pub fn handshake(conn: impl Into<Connection>, sock: TcpStream) -> Result<Self, HandoffError> {
        let mut conn = conn.into();
        complete_handshake(&mut conn, &sock)?;
        let session = into_kernel(conn, sock.as_fd())?;
        Ok(Self {
            sock,
            session,
            peer_closed: false,
            ticket_records: 0,
        })
    }

    /// The version and cipher the kernel is running.
    pub fn session(&self) -> KtlsSession {
        self.session
    }

    /// The underlying socket.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Sends a close_notify alert (RFC 8446 6.1) and shuts down the write side.
    pub fn close_notify(&mut self) -> io::Result<()> {
        // level warning (1), description close_notify (0)
        ktls::send_record(self.sock.as_fd(), RecordType::Alert, &[1, 0])?;
        self.sock.shutdown(std::net::Shutdown::Write)
    }
}

impl Read for KtlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.peer_closed || buf.is_empty() {
                return Ok(0);
            }
            let (record_type, n) = ktls::recv_record(self.sock.as_fd(), buf)?;
            match record_type {
                RecordType::ApplicationData if n == 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the TCP connection without a TLS close_notify",
                    ));
                }
                RecordType::ApplicationData => return Ok(n),
                RecordType::Alert if n >= 2 && buf[1] == 0 => {
                    self.peer_closed = true;
                    return Ok(0);
                }
                RecordType::Alert => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("peer sent TLS alert {:?}", &buf[..n.min(2)]),
                    ));
                }
                // handshake type 4 = NewSessionTicket (RFC 8446 4.6.1)
                RecordType::Handshake if n >= 1 && buf[0] == 4 => self.ticket_records += 1,
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "unexpected post-handshake {other:?} record (first byte {:?})",
                            buf.first()
                        ),
                    ));
                }
            }
        }
    }
}

impl Write for KtlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.sock).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns everything it has in one go, like a socket with a full buffer.
    struct Greedy(Vec<u8>);
    impl Read for Greedy {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn reader_stops_at_each_record_end() {
        let mut wire = vec![22, 3, 3, 0, 3, b'a', b'b', b'c'];
        wire.extend([23, 3, 3, 0, 2, b'x', b'y']);
        let mut r = RecordBoundaryReader::new(Greedy(wire));
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).unwrap(), 5);
        assert!(!r.at_record_boundary());
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        assert!(r.at_record_boundary());
        // The next record is still unread in the inner reader.
        assert_eq!(r.into_inner().0, vec![23, 3, 3, 0, 2, b'x', b'y']);
    }

    #[test]
    fn reader_reassembles_split_headers() {
        let wire = vec![22, 3, 3, 0, 1, b'z', 23];
        let mut r = RecordBoundaryReader::new(Greedy(wire));
        let mut one = [0u8; 2];
        assert_eq!(r.read(&mut one).unwrap(), 2);
        assert_eq!(r.read(&mut one).unwrap(), 2);
        assert_eq!(r.read(&mut one).unwrap(), 1);
        assert_eq!(r.read(&mut one).unwrap(), 1);
        assert_eq!(one[0], b'z');
        assert!(r.at_record_boundary());
    }
}
