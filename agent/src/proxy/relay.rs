//! Moving bytes between the client leg and the upstream leg once both are set up.
//!
//! - [`splice_relay`]: each direction spliced through its own pipe. A leg with kTLS decrypts
//!   into the pipe and encrypts out of it in the kernel; payload never enters user space.
//! - [`userspace_relay`]: rustls keeps the record layer of every TLS leg; a copy loop moves the
//!   plaintext.
//!
//! Either way a clean end of one direction (close_notify or FIN) becomes a half-close of the
//! other leg (close_notify then FIN on a TLS leg), and the relay ends when both directions have.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::handoff::flush_tls;
use crate::ktls::{self, RecordType};
use crate::splice::{self, Pipe};

/// Bytes asked of one splice call, and the pipe size requested.
const SPLICE_CHUNK: usize = 256 * 1024;

fn shutdown_write(sock: &TcpStream) -> io::Result<()> {
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
fn end_direction(dst: &TcpStream, dst_ktls: bool) -> io::Result<()> {
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
    /// `Err` when the relay ended on an error rather than on both sides closing.
    pub(crate) result: io::Result<()>,
}

/// Moves bytes from `src` to `dst` through a pipe until `src` ends. When `src_ktls`, control
/// records on `src` are handled (close_notify ends the stream, session tickets are skipped,
/// anything else is an error); when `dst_ktls`, the end is signalled with close_notify.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    src_ktls: bool,
    dst_ktls: bool,
    total: &AtomicU64,
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
                Err(e) if src_ktls && e.raw_os_error() == Some(libc::EINVAL) => {
                    if control_record(src)? {
                        break 0;
                    }
                }
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return end_direction(dst, dst_ktls);
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice::splice(pipe.read_end(), dst.as_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Reads one control record from a kTLS socket. `Ok(true)`: close_notify (end of stream).
fn control_record(sock: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
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
        // NewSessionTicket (4): an upstream's tickets are not kept yet; skipping them is safe.
        RecordType::Handshake if n >= 1 && buf[0] == 4 => Ok(false),
        // KeyUpdate (24): following it needs kernel >= 6.14 and is not implemented yet; ending
        // the connection is the only way to avoid decrypting with stale keys.
        RecordType::Handshake if n >= 1 && buf[0] == 24 => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "peer sent TLS 1.3 KeyUpdate: rekeying under kTLS is not supported, closing",
        )),
        RecordType::ApplicationData if n == 0 => Ok(true),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected {other:?} record from a kTLS peer"),
        )),
    }
}

/// Both directions spliced; `*_ktls` says which legs have their record layer in the kernel.
pub(crate) async fn splice_relay(
    client: &TcpStream,
    client_ktls: bool,
    upstream: &TcpStream,
    upstream_ktls: bool,
) -> RelayOutcome {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        pump(client, upstream, client_ktls, upstream_ktls, &up),
        pump(upstream, client, upstream_ktls, client_ktls, &down)
    )
    .map(|_| ());
    RelayOutcome {
        up: up.into_inner(),
        down: down.into_inner(),
        result,
    }
}

/// One side of a user-space relay: a socket and, for a TLS leg, its rustls connection.
struct UserLeg {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    tls: Option<Connection>,
    /// Still reading from this leg.
    open: bool,
    scratch: Vec<u8>,
}

impl UserLeg {
    fn new(sock: TcpStream, tls: Option<Connection>) -> Self {
        let (rd, wr) = sock.into_split();
        Self {
            rd,
            wr,
            tls,
            open: true,
            scratch: Vec::new(),
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
    let mut plain = [0u8; 16 * 1024];
    // rustls holds a bounded amount of plaintext: decrypt a piece, pass it on, then the next.
    let mut rest = input;
    while !rest.is_empty() && *open {
        conn.read_tls(&mut rest)?;
        if let Err(e) = conn.process_new_packets() {
            let _ = flush_tls(conn, scratch, wr).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        loop {
            match conn.reader().read(&mut plain) {
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
    client: TcpStream,
    client_tls: Option<Connection>,
    upstream: TcpStream,
    upstream_tls: Option<Connection>,
) -> RelayOutcome {
    let mut c = UserLeg::new(client, client_tls);
    let mut u = UserLeg::new(upstream, upstream_tls);
    let (mut up, mut down) = (0u64, 0u64);
    let result = copy_loop(&mut c, &mut u, &mut up, &mut down).await;
    RelayOutcome { up, down, result }
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
        Ok(Ok(s)) => Ok(s),
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

/// Writes the listener's PROXY protocol header, when it asks for one, as the first bytes on the
/// upstream connection. `client` is the accepted socket (its local address is the header's
/// destination), `peer` the client's address.
pub(crate) async fn write_proxy_header(
    upstream: &mut TcpStream,
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
pub(crate) async fn close_leg(mut sock: TcpStream, tls: Option<Connection>) {
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
