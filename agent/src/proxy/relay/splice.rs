//! The splice data path: each direction moves from one socket into a pipe and from the pipe into
//! the other socket, so the bytes never enter user space. Plain legs (passthrough) run it as it
//! is; a leg whose record layer is in the kernel ([`super::ktls`]) adds what TLS needs through
//! [`RecordLayer`]: the kernel decrypts into the pipe and encrypts out of it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;

use super::RelayOutcome;
use crate::net::{self, StreamSocket};
use crate::outcome::Failure;
use crate::splice::{self, Pipe};

/// Bytes asked of one splice call, and the pipe size requested.
const SPLICE_CHUNK: usize = 256 * 1024;

/// What a leg whose record layer is in the kernel adds to a splice relay: control records on
/// the side it receives, record accounting and close_notify on the side it sends.
pub(crate) trait RecordLayer: Sync {
    /// splice refused to read a non-data record from `sock` (EINVAL): read it with its type
    /// and act on it. `Ok(true)`: it was close_notify, the end of this direction.
    fn control_record(
        &self,
        sock: &impl StreamSocket,
    ) -> impl Future<Output = Result<bool, Failure>> + Send;

    /// How many bytes the next splice into this leg may carry.
    fn splice_budget(&self) -> usize;

    /// `bytes` were just spliced into `sock`, this leg's socket.
    fn sent(
        &self,
        sock: &impl StreamSocket,
        bytes: usize,
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Tells this leg's peer that nothing more will be sent (close_notify; the FIN follows).
    fn close_notify(&self, sock: &impl StreamSocket) -> io::Result<()>;
}

/// The record layer of a plain leg: there is none.
pub(crate) enum Plain {}

impl RecordLayer for Plain {
    async fn control_record(&self, _: &impl StreamSocket) -> Result<bool, Failure> {
        match *self {}
    }
    fn splice_budget(&self) -> usize {
        match *self {}
    }
    async fn sent(&self, _: &impl StreamSocket, _: usize) -> Result<(), Failure> {
        match *self {}
    }
    fn close_notify(&self, _: &impl StreamSocket) -> io::Result<()> {
        match *self {}
    }
}

/// Both plain legs spliced (passthrough).
pub(crate) async fn relay_plain(
    client: &impl StreamSocket,
    upstream: &impl StreamSocket,
) -> RelayOutcome {
    let (up, down, result) = relay::<Plain>(client, None, upstream, None).await;
    RelayOutcome::moved(up, down, result)
}

/// Both directions spliced; a leg with a [`RecordLayer`] has its TLS in the kernel. Returns
/// the bytes moved up and down, and how it ended.
pub(crate) async fn relay<L: RecordLayer>(
    client: &impl StreamSocket,
    client_leg: Option<&L>,
    upstream: &impl StreamSocket,
    upstream_leg: Option<&L>,
) -> (u64, u64, Result<(), Failure>) {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        pump(client, upstream, client_leg, upstream_leg, &up),
        pump(upstream, client, upstream_leg, client_leg, &down)
    )
    .map(|_| ());
    (up.into_inner(), down.into_inner(), result)
}

/// Moves bytes from `src` to `dst` through a pipe until `src` ends, then ends `dst`'s
/// direction.
async fn pump<L: RecordLayer>(
    src: &impl StreamSocket,
    dst: &impl StreamSocket,
    src_leg: Option<&L>,
    dst_leg: Option<&L>,
    total: &AtomicU64,
) -> Result<(), Failure> {
    let pipe = Pipe::new(SPLICE_CHUNK).map_err(|e| Failure::io("pipe2", &e))?;
    loop {
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice::splice(src.as_fd(), pipe.write_end(), SPLICE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // A kTLS socket refuses to splice a non-data record.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && src_leg.is_some() => {
                    if let Some(leg) = src_leg
                        && leg.control_record(src).await?
                    {
                        break 0;
                    }
                }
                Err(e) => return Err(Failure::io("splice from a socket", &e)),
            }
        };
        if n == 0 {
            return end_direction(dst, dst_leg);
        }
        let mut left = n;
        while left > 0 {
            let chunk = dst_leg.map_or(left, |leg| left.min(leg.splice_budget()));
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice::splice(pipe.read_end(), dst.as_fd(), chunk)
            }) {
                Ok(m) => {
                    left -= m;
                    if let Some(leg) = dst_leg {
                        leg.sent(dst, m).await?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Failure::io("splice into a socket", &e)),
            }
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Signals the end of one direction on `dst`: close_notify on a TLS leg, then FIN.
fn end_direction<L: RecordLayer>(
    dst: &impl StreamSocket,
    dst_leg: Option<&L>,
) -> Result<(), Failure> {
    let result = match dst_leg {
        Some(leg) => leg.close_notify(dst),
        None => Ok(()),
    }
    .and_then(|()| net::shutdown_write(dst));
    match result {
        Err(e) if net::peer_gone(&e) => Ok(()),
        Err(e) => Err(Failure::io("ending a direction", &e)),
        Ok(()) => Ok(()),
    }
}
