//! Moving bytes between the client leg and the upstream leg once both are set up.
//!
//! - [`splice_relay`]: each direction spliced through its own pipe. A leg with kTLS decrypts
//!   into the pipe and encrypts out of it in the kernel; payload never enters user space.
//! - [`userspace_relay`]: rustls keeps the record layer of every TLS leg; a copy loop moves the
//!   plaintext.
//! - [`sockmap_relay`]: both legs plain (passthrough) in the eBPF sock hash; the kernel
//!   redirects each segment to the other leg and the agent only handles the ends.
//!
//! Either way a clean end of one direction (close_notify or FIN) becomes a half-close of the
//! other leg (close_notify then FIN on a TLS leg), and the relay ends when both directions have.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::Connection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};

use crate::handoff::{KernelSession, flush_tls};
use crate::ktls::{self, Direction, RecordType, TlsVersion};
use crate::splice::{self, Pipe};

/// Bytes asked of one splice call, and the pipe size requested.
const SPLICE_CHUNK: usize = 256 * 1024;
/// Page size: the smallest record the TX record estimate assumes.
const PAGE: usize = 4096;

/// A connected stream socket the relays can drive: TCP (every leg), or a unix socket (the local
/// upstream of a terminate listener). splice(2) takes either.
pub(crate) trait StreamSocket: AsFd + Send + Sync {
    /// Waits until the socket may be readable.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until the socket may be writable.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs a non-blocking operation; `WouldBlock` clears the readiness it waited for.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Owned read and write halves, for the user-space relay.
    fn into_halves(
        self,
    ) -> (
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    );
}

macro_rules! stream_socket {
    ($t:ty) => {
        impl StreamSocket for $t {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            fn into_halves(
                self,
            ) -> (
                Box<dyn AsyncRead + Unpin + Send>,
                Box<dyn AsyncWrite + Unpin + Send>,
            ) {
                let (rd, wr) = self.into_split();
                (Box::new(rd), Box::new(wr))
            }
        }
    };
}

stream_socket!(TcpStream);
stream_socket!(UnixStream);

fn shutdown_write(sock: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(Shutdown::Write)
}

/// The peer is already gone: our own end-of-stream signal has no one to reach, which is not a
/// failure of the connection (a client may close right after its close_notify).
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}

/// Signals the end of one direction on `dst`: close_notify on a kTLS leg, then FIN.
fn end_direction(dst: &impl StreamSocket, dst_ktls: bool) -> io::Result<()> {
    let result = if dst_ktls {
        ktls::send_record(dst.as_fd(), RecordType::Alert, &[1, 0]).map(|_| ())
    } else {
        Ok(())
    }
    .and_then(|()| shutdown_write(dst));
    match result {
        Err(e) if peer_gone(&e) => Ok(()),
        other => other,
    }
}

/// Plaintext bytes moved each way, and how the relay ended.
#[derive(Debug)]
pub(crate) struct RelayOutcome {
    /// Client to upstream.
    pub(crate) up: u64,
    /// Upstream to client.
    pub(crate) down: u64,
    /// TLS 1.3 key changes followed or made under kTLS (each direction counts once).
    pub(crate) key_updates: u64,
    /// Session tickets stored from a TLS upstream under kTLS.
    pub(crate) tickets: u64,
    /// `Err` when the relay ended on an error rather than on both sides closing.
    pub(crate) result: io::Result<()>,
}

impl RelayOutcome {
    /// A relay that could not start.
    pub(crate) fn failed(e: io::Error) -> Self {
        Self {
            up: 0,
            down: 0,
            key_updates: 0,
            tickets: 0,
            result: Err(e),
        }
    }
}

/// When the kernel legs change keys.
#[derive(Debug, Clone)]
pub(crate) struct RekeyPolicy {
    /// `Ok` when the kernel takes new TLS 1.3 keys on a live socket, else why not.
    pub(crate) kernel: Result<(), String>,
    /// Records sent under one key before the agent rekeys (or, where it cannot, closes);
    /// `None`: half the cipher suite's confidentiality limit.
    pub(crate) after_records: Option<u64>,
}

/// A leg whose record layer is in the kernel, shared by the two directions of a relay: the
/// reading direction follows the peer's KeyUpdates and keeps its tickets, the writing direction
/// counts records against the confidentiality limit.
pub(crate) struct KtlsLeg {
    session: Mutex<KernelSession>,
    /// Records this leg may send under one key before it must rekey or close: 7/8 of the
    /// configured number, else of half the cipher suite's confidentiality limit. Fixed for the
    /// connection, so the hot path never locks the session for it.
    tx_threshold: u64,
    /// Records sent under the current TX key: an estimate from the bytes spliced, corrected
    /// from the kernel's own sequence number whenever it nears the limit.
    tx_records: AtomicU64,
    key_updates: AtomicU64,
}

impl KtlsLeg {
    /// `after_records`: the listener's `rekey_after_records`.
    pub(crate) fn new(session: KernelSession, after_records: Option<u64>) -> Self {
        let limit = after_records.unwrap_or_else(|| session.confidentiality_limit() / 2);
        Self {
            session: Mutex::new(session),
            tx_threshold: limit - limit / 8,
            tx_records: AtomicU64::new(0),
            key_updates: AtomicU64::new(0),
        }
    }

    fn session(&self) -> io::Result<std::sync::MutexGuard<'_, KernelSession>> {
        self.session
            .lock()
            .map_err(|_| io::Error::other("kTLS session state poisoned by a panic"))
    }

    /// Bytes the next splice into this leg may carry so that the record estimate cannot pass
    /// the threshold unchecked.
    fn splice_budget(&self) -> usize {
        let headroom = self
            .tx_threshold
            .saturating_sub(self.tx_records.load(Ordering::Relaxed))
            .max(1);
        usize::try_from(headroom)
            .unwrap_or(usize::MAX)
            .saturating_mul(PAGE)
    }
}

/// The KeyUpdate handshake message (RFC 8446 4.6.3) with request_update = update_not_requested.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

/// Sends a control record on a kTLS socket, waiting for room in the socket buffer.
async fn send_control(
    sock: &impl StreamSocket,
    record_type: RecordType,
    data: &[u8],
) -> io::Result<()> {
    loop {
        sock.writable().await?;
        match sock.try_io(Interest::WRITABLE, || {
            ktls::send_record(sock.as_fd(), record_type, data)
        }) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends our KeyUpdate under the current key, then moves the kernel's TX to the next key.
async fn rekey_tx(sock: &impl StreamSocket, leg: &KtlsLeg) -> io::Result<()> {
    send_control(sock, RecordType::Handshake, &KEY_UPDATE_NOT_REQUESTED).await?;
    leg.session()?
        .rekey(sock.as_fd(), Direction::Tx)
        .map_err(|e| io::Error::other(format!("rekeying TX: {e}")))?;
    leg.tx_records.store(0, Ordering::Relaxed);
    leg.key_updates.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Counts `bytes` just spliced into a kTLS leg and, near the record limit, rekeys its TX (TLS
/// 1.3 on a kernel that can) or ends the connection before the limit is passed.
async fn account_tx(
    sock: &impl StreamSocket,
    leg: &KtlsLeg,
    bytes: usize,
    policy: &RekeyPolicy,
) -> io::Result<()> {
    // A pessimistic count: every splice ends its records (no SPLICE_F_MORE), and a record holds
    // at most 2^14 bytes but may be pushed early when its page fragments run out, so assume one
    // per page. The kernel's own sequence number settles it near the threshold.
    let estimate = leg
        .tx_records
        .fetch_add(bytes.div_ceil(PAGE) as u64, Ordering::Relaxed)
        + bytes.div_ceil(PAGE) as u64;
    let threshold = leg.tx_threshold;
    if estimate < threshold {
        return Ok(());
    }
    let session = leg.session()?.session();
    let sent = ktls::record_sequence(sock.as_fd(), Direction::Tx, session.version, session.cipher)
        .map_err(io::Error::other)?;
    leg.tx_records.store(sent, Ordering::Relaxed);
    if sent < threshold {
        return Ok(());
    }
    let cannot = match (&policy.kernel, session.version) {
        (Ok(()), TlsVersion::Tls13) => None,
        (Err(why), TlsVersion::Tls13) => Some(why.clone()),
        (_, TlsVersion::Tls12) => Some("TLS 1.2 has no KeyUpdate".to_owned()),
    };
    match cannot {
        None => rekey_tx(sock, leg).await,
        Some(why) => {
            // internal_error: the session cannot go on safely, and the peer should know.
            let _ = send_control(sock, RecordType::Alert, &[2, 80]).await;
            Err(io::Error::other(format!(
                "record limit: {sent} records sent under one {} {} key (rekey threshold {threshold}) and {why}: closing before the confidentiality limit",
                session.version, session.cipher
            )))
        }
    }
}

/// Moves bytes from `src` to `dst` through a pipe until `src` ends. On a kTLS `src`, control
/// records are handled (see [`control_record`]); on a kTLS `dst`, records are counted against
/// the confidentiality limit and the end is signalled with close_notify.
async fn pump(
    src: &impl StreamSocket,
    dst: &impl StreamSocket,
    src_leg: Option<&KtlsLeg>,
    dst_leg: Option<&KtlsLeg>,
    total: &AtomicU64,
    policy: &RekeyPolicy,
) -> io::Result<()> {
    let pipe = Pipe::new(SPLICE_CHUNK)?;
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice::splice(src.as_fd(), pipe.write_end(), SPLICE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // A kTLS socket refuses to splice a non-data record: read it with its type.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match src_leg {
                    Some(leg) => {
                        if control_record(src, leg, policy).await? {
                            break 0;
                        }
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return end_direction(dst, dst_leg.is_some());
        }
        let mut left = n;
        while left > 0 {
            let chunk = match dst_leg {
                Some(leg) => left.min(leg.splice_budget()),
                None => left,
            };
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice::splice(pipe.read_end(), dst.as_fd(), chunk)
            }) {
                Ok(m) => {
                    left -= m;
                    if let Some(leg) = dst_leg {
                        account_tx(dst, leg, m, policy).await?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Reads one control record from a kTLS socket and acts on it. `Ok(true)`: close_notify (end
/// of stream).
///
/// - NewSessionTicket: stored for resumption (we are the client of a TLS upstream);
/// - KeyUpdate: the kernel's RX moves to the peer's next key and, when the peer asks, ours
///   follows with a KeyUpdate of our own; on a kernel that cannot rekey, the connection ends
///   with an internal_error alert rather than decrypting garbage;
/// - any alert but close_notify, or anything else, ends the connection.
async fn control_record(
    sock: &impl StreamSocket,
    leg: &KtlsLeg,
    policy: &RekeyPolicy,
) -> io::Result<bool> {
    // On the heap, and only here: an array would sit inline in every connection's future
    // (this one is held across an await), costing each idle connection 16 KiB per direction
    // for a record that rarely comes (cargo xtask bench, idle connections).
    let mut buf = vec![0u8; 16 * 1024];
    let (record_type, n) = sock.try_io(Interest::READABLE, || {
        ktls::recv_record(sock.as_fd(), &mut buf)
    })?;
    match record_type {
        RecordType::Alert if n >= 2 && buf[1] == 0 => Ok(true),
        RecordType::Alert => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "peer sent TLS alert level {} description {}",
                buf[0],
                buf.get(1).copied().unwrap_or(0)
            ),
        )),
        RecordType::Handshake => {
            let mut messages = &buf[..n];
            while !messages.is_empty() {
                let truncated = || {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated post-handshake message from a kTLS peer",
                    )
                };
                let (&[kind, a, b, c], rest) =
                    messages.split_first_chunk::<4>().ok_or_else(truncated)?;
                let len = u32::from_be_bytes([0, a, b, c]) as usize;
                if rest.len() < len {
                    return Err(truncated());
                }
                let (body, next) = rest.split_at(len);
                messages = next;
                match kind {
                    // NewSessionTicket (RFC 8446 4.6.1)
                    4 => leg
                        .session()?
                        .take_ticket(body)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                    // KeyUpdate (RFC 8446 4.6.3)
                    24 => key_update(sock, leg, body, policy).await?,
                    other => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "unexpected post-handshake message type {other} from a kTLS peer"
                            ),
                        ));
                    }
                }
            }
            Ok(false)
        }
        RecordType::ApplicationData if n == 0 => Ok(true),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected {other:?} record from a kTLS peer"),
        )),
    }
}

/// Follows a peer's KeyUpdate with body `body` (one byte: update_requested or not).
async fn key_update(
    sock: &impl StreamSocket,
    leg: &KtlsLeg,
    body: &[u8],
    policy: &RekeyPolicy,
) -> io::Result<()> {
    let requested = match body {
        [0] => false,
        [1] => true,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed KeyUpdate from a kTLS peer",
            ));
        }
    };
    if let Err(why) = &policy.kernel {
        let _ = send_control(sock, RecordType::Alert, &[2, 80]).await;
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("peer sent TLS 1.3 KeyUpdate and {why}: closing"),
        ));
    }
    leg.session()?
        .rekey(sock.as_fd(), Direction::Rx)
        .map_err(|e| io::Error::other(format!("rekeying RX after the peer's KeyUpdate: {e}")))?;
    leg.key_updates.fetch_add(1, Ordering::Relaxed);
    if requested {
        rekey_tx(sock, leg).await?;
    }
    Ok(())
}

/// Both directions spliced; a leg with a [`KtlsLeg`] has its record layer in the kernel.
pub(crate) async fn splice_relay(
    client: &impl StreamSocket,
    client_leg: Option<&KtlsLeg>,
    upstream: &impl StreamSocket,
    upstream_leg: Option<&KtlsLeg>,
    policy: &RekeyPolicy,
) -> RelayOutcome {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        pump(client, upstream, client_leg, upstream_leg, &up, policy),
        pump(upstream, client, upstream_leg, client_leg, &down, policy)
    )
    .map(|_| ());
    let legs = [client_leg, upstream_leg];
    let key_updates = legs
        .iter()
        .flatten()
        .map(|l| l.key_updates.load(Ordering::Relaxed))
        .sum();
    let tickets = legs
        .iter()
        .flatten()
        .map(|l| l.session().map_or(0, |s| s.tickets))
        .sum();
    RelayOutcome {
        up: up.into_inner(),
        down: down.into_inner(),
        key_updates,
        tickets,
        result,
    }
}

/// Writes all of `data` to a socket shared by reference.
async fn write_all_shared(sock: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        sock.writable().await?;
        match sock.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long the sockmap relay waits for the kernel to queue redirected bytes on a leg without
/// seeing any progress (a reader that stopped reading, a peer that vanished).
const SOCKMAP_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until `dst` has `want` of its send sequence queued (see
/// [`crate::bpf::tcp_bytes_queued`]): every byte redirected into it has left the kernel's
/// redirect queue and is ordered ahead of what is written next.
async fn sockmap_flushed(dst: &TcpStream, want: u64) -> io::Result<()> {
    let mut last = 0;
    let mut since = tokio::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let (queued, sending) = crate::bpf::tcp_bytes_queued(dst.as_fd())?;
        if queued >= want {
            return Ok(());
        }
        if !sending {
            return Err(io::Error::other(format!(
                "sockmap: the other leg stopped sending with {} redirected bytes not queued",
                want - queued
            )));
        }
        if queued != last {
            (last, since) = (queued, tokio::time::Instant::now());
            pause = std::time::Duration::from_millis(1);
        } else if since.elapsed() > SOCKMAP_STALL_LIMIT {
            return Err(io::Error::other(format!(
                "sockmap: {} redirected bytes not queued on the other leg, no progress for {} s",
                want - queued,
                SOCKMAP_STALL_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

/// One direction of a sockmap relay: the kernel redirects `src`'s segments to `dst`; this waits
/// for `src` to end, forwards anything the verdict passed up instead (after what it redirected
/// before), then sends `dst` its FIN once every redirected byte is queued on `dst` ahead of it.
async fn sockmap_direction(
    src: &TcpStream,
    dst: &TcpStream,
    redirected: impl Fn() -> u64,
    dst_start: u64,
    user_bytes: &AtomicU64,
) -> io::Result<()> {
    // Sized at first wake-up: the verdict redirects nearly everything, and most connections
    // never need it before their end (an idle connection would otherwise hold 64 KiB per
    // direction).
    let mut buf = Vec::new();
    let want = |user: &AtomicU64| dst_start + user.load(Ordering::Relaxed) + redirected();
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf.resize(64 * 1024, 0);
        }
        match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes the verdict could not redirect: they follow the ones it did.
                sockmap_flushed(dst, want(user_bytes)).await?;
                write_all_shared(dst, &buf[..n]).await?;
                user_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    // The verdict ran for every segment before the FIN, but the redirected bytes reach `dst`'s
    // send queue from a kernel worker: the FIN must not overtake them.
    sockmap_flushed(dst, want(user_bytes)).await?;
    end_direction(dst, false)
}

/// Both plain legs in the eBPF sock hash: the kernel moves the bytes, the agent waits for the
/// ends. `Err` when the legs could not enter the maps before any byte moved (the caller picks
/// another path and says why); a failure after that ends the connection.
pub(crate) async fn sockmap_relay(
    client: &TcpStream,
    upstream: &TcpStream,
    bpf: &crate::bpf::LoadedBpf,
    listener: u16,
) -> Result<RelayOutcome, String> {
    let queued = |s: &TcpStream| crate::bpf::tcp_bytes_queued(s.as_fd()).map(|q| q.0);
    let (client_start, upstream_start) = match (queued(client), queued(upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return Err(format!("reading TCP_INFO: {e}")),
    };
    // Both legs enter the map with the client's bytes so far (its ClientHello, only peeked)
    // still in its receive queue: the verdict redirects them in order with everything after,
    // and the upstream, quiet until it has the ClientHello, answers into a complete pair.
    // Only an established socket may enter a sock hash: a client that has already sent its
    // FIN (a ClientHello and a half-close) is relayed another way.
    match crate::bpf::tcp_established(client.as_fd()) {
        Ok(true) => {}
        Ok(false) => return Err("the client leg has already received a FIN".into()),
        Err(e) => return Err(format!("reading TCP_INFO: {e}")),
    }
    let pair = bpf
        .sockmap_pair(listener, client.as_fd(), upstream.as_fd())
        .map_err(|e| e.to_string())?;
    match pair.admit_client(client.as_fd()) {
        Ok(()) => {}
        // Nothing left the client leg, and the upstream, which only answers a ClientHello, has
        // had none: the caller can take another path.
        Err(e @ crate::bpf::AdmitError::NotAdmitted(_)) => return Err(e.to_string()),
        // The verdict may have redirected bytes already: no other path can take over.
        Err(e) => return Ok(RelayOutcome::failed(io::Error::other(e.to_string()))),
    }
    let (user_up, user_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        sockmap_direction(
            client,
            upstream,
            || pair.redirected().0,
            upstream_start,
            &user_up
        ),
        sockmap_direction(
            upstream,
            client,
            || pair.redirected().1,
            client_start,
            &user_down
        ),
    )
    .map(|_| ());
    let (up, down) = pair.redirected();
    drop(pair);
    Ok(RelayOutcome {
        up: up + user_up.into_inner(),
        down: down + user_down.into_inner(),
        key_updates: 0,
        tickets: 0,
        result,
    })
}

/// One side of a user-space relay: a socket and, for a TLS leg, its rustls connection.
struct UserLeg {
    rd: Box<dyn AsyncRead + Unpin + Send>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
    tls: Option<Connection>,
    /// Still reading from this leg.
    open: bool,
    scratch: Vec<u8>,
    /// Plaintext read out of rustls on its way to the other leg; sized at first use, so a
    /// connection that moves nothing holds none.
    plain: Vec<u8>,
}

impl UserLeg {
    fn new(sock: impl StreamSocket, tls: Option<Connection>) -> Self {
        let (rd, wr) = sock.into_halves();
        Self {
            rd,
            wr,
            tls,
            open: true,
            scratch: Vec::new(),
            plain: Vec::new(),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(conn) => flush_tls(conn, &mut self.scratch, &mut self.wr).await,
            None => Ok(()),
        }
    }

    /// Sends plaintext to this leg's peer.
    async fn send(&mut self, mut data: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.wr.write_all(data).await,
            Some(conn) => {
                // rustls buffers a bounded amount of plaintext: hand it over in pieces,
                // sending the records each piece becomes.
                while !data.is_empty() {
                    let taken = conn.writer().write(data)?;
                    data = &data[taken..];
                    flush_tls(conn, &mut self.scratch, &mut self.wr).await?;
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
            Ok(()) => self.wr.shutdown().await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if peer_gone(&e) => Ok(()),
            other => other,
        }
    }
}

/// Handles bytes read from `src`: decrypts if `src` is TLS and forwards the plaintext to
/// `dst`, adding it to `forwarded`; a clean end of `src` half-closes `dst`.
async fn forward(
    src: &mut UserLeg,
    dst: &mut UserLeg,
    input: &[u8],
    forwarded: &mut u64,
) -> io::Result<()> {
    let UserLeg {
        tls,
        open,
        scratch,
        wr,
        plain,
        ..
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
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed TCP without close_notify",
        ));
    }
    if plain.is_empty() {
        plain.resize(16 * 1024, 0);
    }
    // rustls holds a bounded amount of plaintext: decrypt a piece, pass it on, then the next.
    let mut rest = input;
    while !rest.is_empty() && *open {
        conn.read_tls(&mut rest)?;
        if let Err(e) = conn.process_new_packets() {
            let _ = flush_tls(conn, scratch, wr).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
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
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// rustls in user space on every TLS leg and a copy loop between the legs.
pub(crate) async fn userspace_relay(
    client: impl StreamSocket,
    client_tls: Option<Connection>,
    upstream: impl StreamSocket,
    upstream_tls: Option<Connection>,
) -> RelayOutcome {
    let mut c = UserLeg::new(client, client_tls);
    let mut u = UserLeg::new(upstream, upstream_tls);
    let (mut up, mut down) = (0u64, 0u64);
    let result = copy_loop(&mut c, &mut u, &mut up, &mut down).await;
    RelayOutcome {
        up,
        down,
        key_updates: 0,
        tickets: 0,
        result,
    }
}

async fn copy_loop(
    c: &mut UserLeg,
    u: &mut UserLeg,
    up: &mut u64,
    down: &mut u64,
) -> io::Result<()> {
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
            r = c.rd.read(&mut c_buf), if c.open => {
                let n = r?;
                forward(c, u, &c_buf[..n], up).await?;
            }
            r = u.rd.read(&mut u_buf), if u.open => {
                let n = r?;
                forward(u, c, &u_buf[..n], down).await?;
            }
        }
    }
}

/// Connects to an upstream within `deadline`; on failure returns the report's reason and error.
pub(crate) async fn connect_upstream(
    addr: std::net::SocketAddr,
    deadline: std::time::Duration,
) -> Result<TcpStream, (&'static str, String)> {
    match tokio::time::timeout(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            // As on the client leg: no Nagle delay on relayed messages.
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(upstream = %addr, error = %e, "TCP_NODELAY");
            }
            Ok(s)
        }
        Ok(Err(e)) => Err(("upstream unreachable", format!("connect {addr}: {e}"))),
        Err(_) => Err((
            "upstream connect timeout",
            format!(
                "connect {addr}: no answer within {} ms",
                deadline.as_millis()
            ),
        )),
    }
}

/// Connects to a local upstream's unix socket within `deadline`; on failure returns the
/// report's reason and error.
pub(crate) async fn connect_unix(
    path: &std::path::Path,
    deadline: std::time::Duration,
) -> Result<UnixStream, (&'static str, String)> {
    match tokio::time::timeout(deadline, UnixStream::connect(path)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((
            "upstream unreachable",
            format!("connect {}: {e}", path.display()),
        )),
        Err(_) => Err((
            "upstream connect timeout",
            format!(
                "connect {}: no answer within {} ms",
                path.display(),
                deadline.as_millis()
            ),
        )),
    }
}

/// Writes the listener's PROXY protocol header, when it asks for one, as the first bytes on the
/// upstream connection. `client` is the accepted socket (its local address is the header's
/// destination), `peer` the client's address.
pub(crate) async fn write_proxy_header(
    upstream: &mut (impl AsyncWrite + Unpin),
    cfg: &crate::config::ListenerConfig,
    client: &TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<&crate::proxy_protocol::ClientTls>,
) -> Result<(), (&'static str, String)> {
    let Some(version) = cfg.proxy_protocol else {
        return Ok(());
    };
    let local = client
        .local_addr()
        .map_err(|e| ("proxy header failed", format!("getsockname: {e}")))?;
    let header = crate::proxy_protocol::header(version, peer, local, tls)
        .map_err(|e| ("proxy header failed", format!("building the header: {e}")))?;
    upstream.write_all(&header).await.map_err(|e| {
        (
            "proxy header failed",
            format!("writing to the upstream: {e}"),
        )
    })
}

/// Closes after a failed handshake without a reset: rustls already sent its alert, so send FIN
/// and discard what the peer still sends (bounded in bytes and time). Closing a socket with
/// unread input would make the kernel answer with RST, and the peer might lose the alert.
pub(crate) async fn linger_close(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

/// Closes a leg whose TLS (if any) is still in user space: close_notify, then FIN.
pub(crate) async fn close_leg(mut sock: impl AsyncWrite + Unpin, tls: Option<Connection>) {
    if let Some(mut conn) = tls {
        conn.send_close_notify();
        if flush_tls(&mut conn, &mut Vec::new(), &mut sock)
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = sock.shutdown().await;
}

/// Copies of a connection's two descriptors for [`with_idle_timeout`], taken before the relay
/// owns the sockets; `None` when the process has no descriptor to spare, and then `reason`
/// says the idle timeout is not enforced.
pub(crate) fn idle_watch(
    client: &impl AsFd,
    upstream: &impl AsFd,
    reason: &mut String,
) -> Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let copies = (
        client.as_fd().try_clone_to_owned(),
        upstream.as_fd().try_clone_to_owned(),
    );
    match copies {
        (Ok(c), Ok(u)) => Some((c, u)),
        _ => {
            reason
                .push_str("; idle timeout not enforced: no file descriptor to spare for its watch");
            None
        }
    }
}

/// Runs `relay` to its end, closing the connection when nothing has moved either way on the
/// client leg for `timeout` (read from the kernel's TCP counters, so every data path is seen
/// the same, in-kernel ones included). Closing is a shutdown of both legs, so the relay ends
/// on its own and still reports its bytes. Returns its outcome, and whether it idled out.
/// Without descriptors to watch (see [`idle_watch`]) the relay runs unwatched.
pub(crate) async fn with_idle_timeout<F: std::future::Future>(
    relay: F,
    watch: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    timeout: std::time::Duration,
) -> (F::Output, bool) {
    let Some((client, upstream)) = watch else {
        return (relay.await, false);
    };
    let poll = (timeout / 4).clamp(
        std::time::Duration::from_millis(25),
        std::time::Duration::from_secs(5),
    );
    tokio::pin!(relay);
    let mut last = crate::bpf::tcp_progress(client.as_fd()).ok();
    let mut since = tokio::time::Instant::now();
    let mut idled = false;
    loop {
        tokio::select! {
            out = &mut relay => return (out, idled),
            () = tokio::time::sleep(poll), if !idled => {
                let now = crate::bpf::tcp_progress(client.as_fd()).ok();
                if now != last {
                    last = now;
                    since = tokio::time::Instant::now();
                } else if since.elapsed() >= timeout {
                    idled = true;
                    for fd in [&client, &upstream] {
                        let _ = socket2::SockRef::from(fd).shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }
}
