//! Handing a rustls session to the kernel: finish the handshake without reading past it, extract
//! the traffic secrets, install them with kTLS, and drive the resulting socket.
//!
//! The handshake must not consume a single byte that belongs to the record layer after it: once
//! the keys are in the kernel, bytes already read into user space cannot be given back. So the
//! handshake reads through [`RecordBoundaryReader`], which never returns bytes past the end of the
//! TLS record it is in.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};

use std::fmt;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{CommonState, Connection, ConnectionTrafficSecrets, ProtocolVersion};

use crate::ktls::{self, Cipher, CryptoInfo, Direction, KtlsError, RecordType, TlsVersion};

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
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Socket I/O or a TLS error during the handshake.
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        /// The remote address, or "unknown".
        peer: String,
        /// What went wrong.
        source: io::Error,
    },
    /// rustls would not release the secrets.
    #[error("extracting TLS secrets for {peer}: {source}")]
    Extract {
        /// The remote address.
        peer: String,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The kernel refused the session.
    #[error("kTLS handoff for {peer}: {source}")]
    Kernel {
        /// The remote address.
        peer: String,
        /// The kernel interface error.
        source: KtlsError,
    },
}

fn peer_of(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string())
}

/// Drives the rustls handshake on a blocking socket to completion without reading past it,
/// and flushes everything rustls has to send.
pub fn complete_handshake(conn: &mut Connection, sock: &TcpStream) -> Result<(), HandoffError> {
    let mut io = HandshakeIo {
        reader: RecordBoundaryReader::new(sock),
        writer: sock,
    };
    let fail = |source| HandoffError::Handshake {
        peer: peer_of(sock),
        source,
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(fail)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut io).map_err(fail)?;
    }
    if !io.reader.at_record_boundary() {
        return Err(fail(misaligned()));
    }
    Ok(())
}

fn misaligned() -> io::Error {
    io::Error::other(
        "handshake ended inside a record: refusing to hand a misaligned stream to the kernel",
    )
}

/// Reads into `buf` no more than what is left of the current TLS record; end of stream is an
/// error (the handshake is not over).
async fn read_in_record(
    sock: &mut tokio::net::TcpStream,
    boundary: &mut RecordBoundary,
    buf: &mut [u8],
) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
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

/// Writes every TLS record rustls has queued to `sock`, using `scratch` as the buffer.
pub async fn flush_tls<W>(
    conn: &mut Connection,
    scratch: &mut Vec<u8>,
    sock: &mut W,
) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    while conn.wants_write() {
        scratch.clear();
        conn.write_tls(scratch)?;
        sock.write_all(scratch).await?;
    }
    Ok(())
}

/// Drives a rustls handshake on a tokio socket to completion without reading past it, and
/// flushes everything rustls has to send (including a fatal alert when the handshake fails).
pub async fn complete_handshake_async(
    conn: &mut Connection,
    sock: &mut tokio::net::TcpStream,
    peer: &str,
) -> Result<(), HandoffError> {
    let fail = |source: io::Error| HandoffError::Handshake {
        peer: peer.to_owned(),
        source,
    };
    let mut boundary = RecordBoundary::default();
    let mut buf = vec![0u8; 18 * 1024];
    let mut out = Vec::new();
    loop {
        flush_tls(conn, &mut out, sock).await.map_err(fail)?;
        if !conn.is_handshaking() {
            if !boundary.at_boundary() {
                return Err(fail(misaligned()));
            }
            return Ok(());
        }
        let n = read_in_record(sock, &mut boundary, &mut buf)
            .await
            .map_err(fail)?;
        let mut input = &buf[..n];
        while !input.is_empty() {
            conn.read_tls(&mut input).map_err(fail)?;
            if let Err(e) = conn.process_new_packets() {
                // rustls queued the alert that explains the failure: send it before closing.
                let _ = flush_tls(conn, &mut out, sock).await;
                return Err(fail(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

/// A rustls connection driven through the unbuffered API, for sessions headed to the kernel:
/// only that API yields a [`KernelConnection`], which derives the keys after a KeyUpdate and
/// keeps a server's session tickets once the record layer is in the kernel.
pub enum KernelBound {
    /// We are the TLS client (the upstream leg).
    Client(UnbufferedClientConnection),
    /// We are the TLS server (the client leg).
    Server(UnbufferedServerConnection),
}

impl fmt::Debug for KernelBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelBound::Client(_) => "KernelBound::Client",
            KernelBound::Server(_) => "KernelBound::Server",
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
    /// rustls failed (it may have queued an alert).
    Failed(rustls::Error),
    /// A state that cannot occur in a handshake we drive.
    Unexpected(String),
}

/// One call of `process_tls_records` on either side, reduced to what the socket must do next.
/// Encoded bytes are appended to `outgoing`.
fn step<Data>(status: UnbufferedStatus<'_, '_, Data>, outgoing: &mut Vec<u8>) -> (usize, Step) {
    let state = match status.state {
        Ok(state) => state,
        Err(e) => return (status.discard, Step::Failed(e)),
    };
    let step = match state {
        ConnectionState::EncodeTlsData(mut encoder) => {
            let start = outgoing.len();
            outgoing.resize(start + 4096, 0);
            loop {
                match encoder.encode(&mut outgoing[start..]) {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        break Step::Encoded;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        outgoing.resize(start + required_size, 0);
                    }
                    Err(e) => {
                        outgoing.truncate(start);
                        break Step::Unexpected(format!("encoding a handshake record: {e}"));
                    }
                }
            }
        }
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

impl KernelBound {
    /// rustls' view of the session: version, cipher, ALPN, peer certificates.
    pub fn common(&self) -> &CommonState {
        match self {
            KernelBound::Client(c) => c,
            KernelBound::Server(s) => s,
        }
    }

    fn process(&mut self, incoming: &mut [u8], outgoing: &mut Vec<u8>) -> (usize, Step) {
        match self {
            KernelBound::Client(c) => step(c.process_tls_records(incoming), outgoing),
            KernelBound::Server(s) => step(s.process_tls_records(incoming), outgoing),
        }
    }

    /// Drives the handshake to completion on a tokio socket, reading one record at a time so
    /// nothing past the handshake is read into user space, and sending what rustls encodes
    /// (including the alert when the handshake fails). Returns the server name from the
    /// ClientHello when we are the server.
    pub async fn handshake(
        &mut self,
        sock: &mut tokio::net::TcpStream,
        peer: &str,
    ) -> Result<Option<String>, HandoffError> {
        use tokio::io::AsyncWriteExt;
        let fail = |source: io::Error| HandoffError::Handshake {
            peer: peer.to_owned(),
            source,
        };
        let mut boundary = RecordBoundary::default();
        let mut incoming: Vec<u8> = Vec::with_capacity(RECORD_HEADER_LEN + 18 * 1024);
        let mut outgoing = Vec::new();
        let mut buf = vec![0u8; 18 * 1024];
        // The first record, kept whole while we are the server: the ClientHello, for its SNI.
        let mut first_record = matches!(self, KernelBound::Server(_)).then(Vec::new);
        let mut server_name = None;
        loop {
            let (discard, next) = self.process(&mut incoming, &mut outgoing);
            incoming.drain(..discard);
            match next {
                Step::Encoded => {}
                Step::Transmit => {
                    sock.write_all(&outgoing).await.map_err(fail)?;
                    outgoing.clear();
                }
                Step::Read => {
                    let n = read_in_record(sock, &mut boundary, &mut buf)
                        .await
                        .map_err(fail)?;
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
                        return Err(fail(misaligned()));
                    }
                    return Ok(server_name);
                }
                Step::Failed(e) => {
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
                    return Err(fail(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                Step::Unexpected(what) => return Err(fail(io::Error::other(what))),
            }
        }
    }

    /// Ends a finished session that will not go to the kernel: close_notify, then FIN.
    pub async fn close_notify(
        &mut self,
        sock: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut out = vec![0u8; 64];
        let written = match self {
            KernelBound::Client(c) => queue_close_notify(c.process_tls_records(&mut []), &mut out),
            KernelBound::Server(s) => queue_close_notify(s.process_tls_records(&mut []), &mut out),
        }?;
        sock.write_all(&out[..written]).await?;
        sock.shutdown().await
    }

    /// Moves the session into the kernel: attaches the TLS ULP and installs TX and RX state.
    /// The extracted secrets are zeroized before this returns; what rustls keeps can only derive
    /// the next keys (KeyUpdate) and take session tickets.
    pub fn into_kernel(
        self,
        sock: BorrowedFd<'_>,
        peer: &str,
    ) -> Result<KernelSession, HandoffError> {
        let extract = |source| HandoffError::Extract {
            peer: peer.to_owned(),
            source,
        };
        let (secrets, conn) = match self {
            KernelBound::Client(c) => {
                let (secrets, k) = c.dangerous_into_kernel_connection().map_err(extract)?;
                (secrets, KernelConn::Client(k))
            }
            KernelBound::Server(s) => {
                let (secrets, k) = s.dangerous_into_kernel_connection().map_err(extract)?;
                (secrets, KernelConn::Server(k))
            }
        };
        let session = install(conn.protocol_version(), secrets, sock, peer)?;
        Ok(KernelSession {
            conn,
            session,
            tickets: 0,
        })
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

/// rustls' half of a session whose record layer is in the kernel.
enum KernelConn {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl KernelConn {
    fn protocol_version(&self) -> ProtocolVersion {
        match self {
            KernelConn::Client(k) => k.protocol_version(),
            KernelConn::Server(k) => k.protocol_version(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            KernelConn::Client(k) => k.negotiated_cipher_suite(),
            KernelConn::Server(k) => k.negotiated_cipher_suite(),
        };
        match suite {
            rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        }
    }

    fn update_secret(
        &mut self,
        direction: Direction,
    ) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, direction) {
            (KernelConn::Client(k), Direction::Tx) => k.update_tx_secret(),
            (KernelConn::Client(k), Direction::Rx) => k.update_rx_secret(),
            (KernelConn::Server(k), Direction::Tx) => k.update_tx_secret(),
            (KernelConn::Server(k), Direction::Rx) => k.update_rx_secret(),
        }
    }
}

/// A TLS session under kTLS, with what is needed to keep it going: rustls' key schedule for
/// KeyUpdate and its session-ticket store.
pub struct KernelSession {
    conn: KernelConn,
    session: KtlsSession,
    /// NewSessionTickets from the server stored for resumption (client side only).
    pub tickets: u64,
}

impl fmt::Debug for KernelSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelSession")
            .field("session", &self.session)
            .field("tickets", &self.tickets)
            .finish_non_exhaustive()
    }
}

/// Why a session under kTLS could not follow a key change or keep a ticket.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// rustls refused (TLS 1.2 has no KeyUpdate; a malformed ticket).
    #[error("{what}: {source}")]
    Tls {
        /// What was being done.
        what: &'static str,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The kernel refused the new key or the state query.
    #[error("{0}")]
    Kernel(#[from] KtlsError),
}

impl KernelSession {
    /// The version and cipher the kernel is running.
    pub fn session(&self) -> KtlsSession {
        self.session
    }

    /// How many records may be sent under one key before the agent must rekey or close: the
    /// cipher suite's confidentiality limit as rustls states it.
    pub fn confidentiality_limit(&self) -> u64 {
        self.conn.confidentiality_limit()
    }

    /// Derives the next traffic key for `direction` (after a KeyUpdate: received for `Rx`, sent
    /// for `Tx`) and installs it in the kernel. The key is zeroized before this returns.
    pub fn rekey(
        &mut self,
        sock: BorrowedFd<'_>,
        direction: Direction,
    ) -> Result<(), SessionError> {
        let (seq, secrets) =
            self.conn
                .update_secret(direction)
                .map_err(|source| SessionError::Tls {
                    what: "deriving the next traffic key",
                    source,
                })?;
        let info = CryptoInfo::from_rustls(self.session.version, seq, &secrets)?;
        drop(secrets);
        ktls::set_crypto_info(sock, direction, &info)?;
        Ok(())
    }

    /// Stores the NewSessionTicket messages in a post-handshake record (`payload` is the
    /// handshake message without its 4-byte header) for resumption of the next connection.
    pub fn take_ticket(&mut self, payload: &[u8]) -> Result<(), SessionError> {
        match &mut self.conn {
            KernelConn::Client(k) => {
                k.handle_new_session_ticket(payload)
                    .map_err(|source| SessionError::Tls {
                        what: "storing a session ticket",
                        source,
                    })?;
                self.tickets += 1;
                Ok(())
            }
            KernelConn::Server(_) => Err(SessionError::Tls {
                what: "a client sent a NewSessionTicket",
                source: rustls::Error::General("only servers send session tickets".into()),
            }),
        }
    }
}

/// What the kernel took over for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KtlsSession {
    /// Negotiated protocol version.
    pub version: TlsVersion,
    /// Negotiated AEAD cipher.
    pub cipher: Cipher,
}

/// Moves a completed rustls session into the kernel: extracts the secrets, attaches the TLS ULP
/// and installs TX and RX state. The secrets are zeroized before this returns.
///
/// The connection must have been created with `enable_secret_extraction` and finished with
/// [`complete_handshake`].
pub fn into_kernel(
    conn: Connection,
    sock: BorrowedFd<'_>,
    peer: &str,
) -> Result<KtlsSession, HandoffError> {
    let peer = peer.to_owned();
    let version = conn
        .protocol_version()
        .and_then(TlsVersion::from_rustls)
        .ok_or_else(|| HandoffError::Kernel {
            peer: peer.clone(),
            source: KtlsError::Unsupported {
                what: format!("protocol version {:?}", conn.protocol_version()),
            },
        })?;
    let _ = version;
    let protocol = conn
        .protocol_version()
        .ok_or_else(|| HandoffError::Kernel {
            peer: peer.clone(),
            source: KtlsError::Unsupported {
                what: "a session without a protocol version".into(),
            },
        })?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|source| HandoffError::Extract {
            peer: peer.clone(),
            source,
        })?;
    install(protocol, secrets, sock, &peer)
}

/// Attaches the TLS ULP and installs both directions' keys from extracted secrets.
fn install(
    protocol: ProtocolVersion,
    secrets: rustls::ExtractedSecrets,
    sock: BorrowedFd<'_>,
    peer: &str,
) -> Result<KtlsSession, HandoffError> {
    let kernel = |source| HandoffError::Kernel {
        peer: peer.to_owned(),
        source,
    };
    let version = TlsVersion::from_rustls(protocol).ok_or_else(|| {
        kernel(KtlsError::Unsupported {
            what: format!("protocol version {protocol:?}"),
        })
    })?;
    let tx = CryptoInfo::from_rustls(version, secrets.tx.0, &secrets.tx.1).map_err(kernel)?;
    let rx = CryptoInfo::from_rustls(version, secrets.rx.0, &secrets.rx.1).map_err(kernel)?;
    // `secrets` holds rustls AeadKeys, which zeroize themselves on drop; `tx`/`rx` zeroize too.
    drop(secrets);
    ktls::attach_ulp(sock).map_err(kernel)?;
    ktls::set_crypto_info(sock, Direction::Tx, &tx).map_err(kernel)?;
    ktls::set_crypto_info(sock, Direction::Rx, &rx).map_err(kernel)?;
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
        let session = into_kernel(conn, sock.as_fd(), &peer_of(&sock))?;
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
