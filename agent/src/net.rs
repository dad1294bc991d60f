//! Connected stream sockets as the relays drive them: by shared reference, through readiness and
//! non-blocking calls, so one connection value can own both sockets while its data path, its idle
//! watch and its drain all borrow them.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A connected stream socket: TCP (every leg), or a unix socket (the local upstream of a
/// terminate listener). splice(2) takes either.
pub trait StreamSocket: AsFd + Send + Sync {
    /// Waits until the socket may be readable.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until the socket may be writable.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs a non-blocking operation; `WouldBlock` clears the readiness it waited for.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes what fits without waiting (`WouldBlock` when nothing does).
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
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
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
        }
    };
}

stream_socket!(TcpStream);
stream_socket!(UnixStream);

/// A connected upstream: TCP, or the unix socket of a local upstream (`upstream_unix`).
#[derive(Debug)]
pub enum Upstream {
    /// A TCP upstream.
    Tcp(TcpStream),
    /// A local upstream's unix socket.
    Unix(UnixStream),
}

impl Upstream {
    /// Who the upstream is, for messages: its address, or its socket's path.
    pub fn peer(&self) -> String {
        match self {
            Upstream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "the upstream".to_owned(), |a| a.to_string()),
            Upstream::Unix(s) => s
                .peer_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "the upstream".to_owned()),
        }
    }
}

impl AsFd for Upstream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Upstream::Tcp(s) => s.as_fd(),
            Upstream::Unix(s) => s.as_fd(),
        }
    }
}

impl StreamSocket for Upstream {
    async fn readable(&self) -> io::Result<()> {
        match self {
            Upstream::Tcp(s) => s.readable().await,
            Upstream::Unix(s) => s.readable().await,
        }
    }
    async fn writable(&self) -> io::Result<()> {
        match self {
            Upstream::Tcp(s) => s.writable().await,
            Upstream::Unix(s) => s.writable().await,
        }
    }
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Upstream::Tcp(s) => s.try_io(interest, f),
            Upstream::Unix(s) => s.try_io(interest, f),
        }
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Upstream::Tcp(s) => s.try_read(buf),
            Upstream::Unix(s) => s.try_read(buf),
        }
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Upstream::Tcp(s) => s.try_write(buf),
            Upstream::Unix(s) => s.try_write(buf),
        }
    }
}

/// Reads what arrives next (0: end of stream).
pub async fn read_some(sock: &impl StreamSocket, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        sock.readable().await?;
        match sock.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

/// Writes all of `data`.
pub async fn write_all(sock: &impl StreamSocket, mut data: &[u8]) -> io::Result<()> {
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

/// Sends a FIN: nothing more will be written to this socket.
pub fn shutdown_write(sock: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(Shutdown::Write)
}

/// Ends both directions at once (the idle timeout and the drain use it to make a relay end on
/// its own, with its counts).
pub fn shutdown_both(sock: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(Shutdown::Both)
}

/// The peer is already gone: our own end-of-stream signal has no one to reach, which is not a
/// failure of the connection (a client may close right after its close_notify).
pub fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}
