//! The sockmap data path (passthrough): both plain legs enter the eBPF sock hash, whose stream
//! verdict program redirects each segment a leg receives to the other leg's egress. The agent
//! moves no byte itself; it waits for each direction's end, forwards the rare bytes the verdict
//! passed up instead (after the ones it redirected), and sends each FIN once every redirected
//! byte is queued ahead of it.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;

use super::RelayOutcome;
use crate::bpf::SockmapPair;
use crate::buffers::Buffer;
use crate::net;
use crate::outcome::Failure;

/// How long the sockmap relay waits for the kernel to queue redirected bytes on a leg without
/// seeing any progress (a reader that stopped reading, a peer that vanished).
const SOCKMAP_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until `dst` has `want` of its send sequence queued (see
/// [`crate::sys::tcp_bytes_queued`]): every byte redirected into it has left the kernel's
/// redirect queue and is ordered ahead of what is written next.
async fn sockmap_flushed(dst: &TcpStream, want: u64) -> io::Result<()> {
    let mut last = 0;
    let mut since = tokio::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let (queued, sending) = crate::sys::tcp_bytes_queued(dst.as_fd())?;
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
    let want = |user: &AtomicU64| dst_start + user.load(Ordering::Relaxed) + redirected();
    loop {
        src.readable().await?;
        // Borrowed for this wake-up only: the verdict redirects nearly everything, so an idle
        // connection holds none (the first wake-up is usually the ClientHello the sockmap took
        // before we could read it).
        let mut buf = Buffer::with_len(64 * 1024);
        match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes the verdict could not redirect: they follow the ones it did.
                sockmap_flushed(dst, want(user_bytes)).await?;
                net::write_all(dst, &buf[..n]).await?;
                user_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    // The verdict ran for every segment before the FIN, but the redirected bytes reach `dst`'s
    // send queue from a kernel worker: the FIN must not overtake them.
    sockmap_flushed(dst, want(user_bytes)).await?;
    match net::shutdown_write(dst) {
        Err(e) if net::peer_gone(&e) => Ok(()),
        other => other,
    }
}

/// Where each leg's send sequence stood when the legs entered the sock hash: the bytes a leg
/// must have queued before the agent writes to it or sends its FIN count from there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendStarts {
    client: u64,
    upstream: u64,
}

impl SendStarts {
    /// As they travel at a takeover: (client leg, upstream leg).
    pub(crate) fn to_pair(self) -> [u64; 2] {
        [self.client, self.upstream]
    }

    /// From a takeover record.
    pub(crate) fn from_pair([client, upstream]: [u64; 2]) -> Self {
        Self { client, upstream }
    }
}

/// How entering the sock hash went, once both legs could be put there.
pub(crate) enum Entry<'a> {
    /// Both legs are in: the kernel moves the bytes from here on.
    Entered(SockmapPair<'a>, SendStarts),
    /// The client leg entered but the verdict could not be made to run over what it had
    /// received: bytes may have moved, so no other path can take over.
    Failed(Failure),
}

/// Puts both plain legs into the eBPF sock hash. `Err` when they could not enter before any
/// byte moved (the caller picks another path and says why).
pub(crate) fn enter<'a>(
    client: &TcpStream,
    upstream: &TcpStream,
    bpf: &'a crate::bpf::LoadedBpf,
    listener: u16,
) -> Result<Entry<'a>, String> {
    let queued = |s: &TcpStream| crate::sys::tcp_bytes_queued(s.as_fd()).map(|q| q.0);
    let starts = match (queued(client), queued(upstream)) {
        (Ok(client), Ok(upstream)) => SendStarts { client, upstream },
        (Err(e), _) | (_, Err(e)) => return Err(format!("reading TCP_INFO: {e}")),
    };
    // Both legs enter the map with the client's bytes so far (its ClientHello, only peeked)
    // still in its receive queue: the verdict redirects them in order with everything after,
    // and the upstream, quiet until it has the ClientHello, answers into a complete pair.
    // Only an established socket may enter a sock hash: a client that has already sent its
    // FIN (a ClientHello and a half-close) is relayed another way.
    match crate::sys::tcp_established(client.as_fd()) {
        Ok(true) => {}
        Ok(false) => return Err("the client leg has already received a FIN".into()),
        Err(e) => return Err(format!("reading TCP_INFO: {e}")),
    }
    let pair = bpf
        .sockmap_pair(listener, client.as_fd(), upstream.as_fd())
        .map_err(|e| e.to_string())?;
    match pair.admit_client(client.as_fd()) {
        Ok(()) => Ok(Entry::Entered(pair, starts)),
        // Nothing left the client leg, and the upstream, which only answers a ClientHello, has
        // had none: the caller can take another path.
        // The FIN may also arrive between the check above and the insert, which the kernel
        // then refuses (EOPNOTSUPP): the same cause, said the same way.
        Err(e @ crate::bpf::AdmitError::NotAdmitted(_)) => {
            match crate::sys::tcp_established(client.as_fd()) {
                Ok(false) => Err("the client leg has already received a FIN".into()),
                _ => Err(e.to_string()),
            }
        }
        // The verdict may have redirected bytes already: no other path can take over.
        Err(e) => Ok(Entry::Failed(Failure::new(
            crate::outcome::Reason::RelayError,
            e.to_string(),
        ))),
    }
}

/// Both plain legs in the eBPF sock hash ([`enter`]): the kernel moves the bytes, the agent
/// waits for each direction's end (or for bytes the verdict passed up) and forwards it.
pub(crate) async fn finish(
    client: &TcpStream,
    upstream: &TcpStream,
    pair: SockmapPair<'_>,
    starts: SendStarts,
) -> RelayOutcome {
    let (user_up, user_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        sockmap_direction(
            client,
            upstream,
            || pair.redirected().0,
            starts.upstream,
            &user_up
        ),
        sockmap_direction(
            upstream,
            client,
            || pair.redirected().1,
            starts.client,
            &user_down
        ),
    )
    .map(|_| ())
    .map_err(|e| Failure::io("sockmap relay", &e));
    let (up, down) = pair.redirected();
    drop(pair);
    RelayOutcome::moved(
        up + user_up.into_inner(),
        down + user_down.into_inner(),
        result,
    )
}
