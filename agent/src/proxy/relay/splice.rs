//! The splice data path: each direction moves from one socket into a pipe and from the pipe into
//! the other socket, so the bytes never enter user space. Plain legs (passthrough) run it as it
//! is; a leg whose record layer is in the kernel ([`super::ktls`]) adds what TLS needs through
//! [`RecordLayer`]: the kernel decrypts into the pipe and encrypts out of it.
//!
//! Pipes come from the node's [`PipePool`], borrowed when a direction's socket has bytes to read
//! and given back once they are all out of the pipe: an idle connection holds its two sockets
//! and nothing else.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use tokio::io::Interest;

use super::RelayOutcome;
use crate::net::{self, StreamSocket};
use crate::outcome::{Failure, Reason};
use crate::splice::{self, PipePool};

/// Zero-length application data records a kTLS peer may send in a row: RFC 8446 5.1 allows
/// them (against traffic analysis), but each costs a wakeup and moves nothing.
const EMPTY_RECORDS_IN_A_ROW: u32 = 1024;

/// What a read of 0 bytes from a kTLS leg was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroRead {
    /// A zero-length application data record: read on.
    EmptyRecord,
    /// The peer's FIN after its last whole record (with no close_notify: that one is read
    /// as a control record).
    End,
    /// The peer's FIN inside a record: the rest will never come.
    Truncated,
}

/// Judges a read of 0 bytes from a kTLS leg from the receive side
/// ([`crate::sys::receive_side`]): `queued_before` is what the queue held at the previous
/// read of 0 bytes, if nothing was read since. Bytes left behind a FIN that a second read
/// does not take are part of a record that will never be whole.
fn judge_zero_read(peer_closed: bool, queued: usize, queued_before: Option<usize>) -> ZeroRead {
    match (peer_closed, queued) {
        (false, _) => ZeroRead::EmptyRecord,
        (true, 0) => ZeroRead::End,
        (true, q) if queued_before == Some(q) => ZeroRead::Truncated,
        (true, _) => ZeroRead::EmptyRecord,
    }
}

/// Bytes asked of one splice call, and the pipe size the pool asks for.
pub(crate) const SPLICE_CHUNK: usize = 256 * 1024;

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

    /// `bytes` were just spliced into this leg; `true` when [`RecordLayer::near_limit`] must
    /// run before the next splice.
    fn count_sent(&self, bytes: usize) -> bool;

    /// The leg's record count neared its limit: act before it is passed (rekey, or close).
    fn near_limit(
        &self,
        sock: &impl StreamSocket,
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Tells this leg's peer that nothing more will be sent (close_notify; the FIN follows).
    fn close_notify(&self, sock: &impl StreamSocket) -> io::Result<()>;

    /// The kernel refused a record from this leg's peer for `reason`: tells the peer with the
    /// alert RFC 8446 names for it, if there is one and the socket still takes it, and says
    /// what was sent.
    fn record_refused(&self, sock: &impl StreamSocket, reason: Reason) -> Option<String>;
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
    fn count_sent(&self, _: usize) -> bool {
        match *self {}
    }
    async fn near_limit(&self, _: &impl StreamSocket) -> Result<(), Failure> {
        match *self {}
    }
    fn close_notify(&self, _: &impl StreamSocket) -> io::Result<()> {
        match *self {}
    }
    fn record_refused(&self, _: &impl StreamSocket, _: Reason) -> Option<String> {
        match *self {}
    }
}

/// Both plain legs spliced (passthrough), to their end.
pub(crate) async fn relay_plain(
    pipes: &PipePool,
    client: &impl StreamSocket,
    upstream: &impl StreamSocket,
) -> RelayOutcome {
    relay::<Plain>(pipes, client, None, upstream, None, None, None).await
}

/// What the park check of a spliced relay sees of its two directions.
#[derive(Default)]
struct Quiet {
    /// Directions waiting for bytes on their socket, holding nothing.
    waiting: AtomicU8,
    /// Times a direction's socket became readable.
    woke: AtomicU64,
    /// When one last did, in nanoseconds after the relay started (0: not yet).
    last_woke: AtomicU64,
    /// Asked to move to a new agent: no direction reads from its socket until the move
    /// happens (the relay is dropped) or is called off ([`Quiet::resume`]).
    moving: AtomicBool,
    /// The move was called off.
    resume: tokio::sync::Notify,
}

impl Quiet {
    /// Returns once the relay is not (or no longer) asked to move.
    async fn unless_moving(&self) {
        while self.moving.load(Ordering::Relaxed) {
            let resumed = self.resume.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.moving.load(Ordering::Relaxed) {
                break;
            }
            resumed.await;
        }
    }
}

/// How long a relay asked to move waits for both directions to stop where they hold nothing
/// (no pipe, no write pending); past it the move is called off and the connection stays, to
/// end or drain in this agent (a half-closed connection, a receiver that takes nothing).
pub(crate) const MOVE_WINDOW: std::time::Duration = std::time::Duration::from_millis(1500);

/// How often a relay asked to move looks whether both directions hold nothing.
const MOVE_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// Both directions spliced; a leg with a [`RecordLayer`] has its TLS in the kernel. Runs until
/// both directions end or it fails; with `park_after`, also until both directions have waited
/// that long for bytes (checked once per `park_after`, so between one and two of it): it then
/// stops holding nothing, and says so ([`RelayOutcome::idle`]), for the connection to be parked.
/// With `moving`, once it says so the relay is asked to move to a new agent: its directions
/// finish what they hold and read nothing more, and once both hold nothing it stops as idle
/// (within [`MOVE_WINDOW`], else it goes on). Nothing is lost or reordered: bytes are only
/// ever read into a pipe that is then written out whole before a direction stops.
pub(crate) async fn relay<L: RecordLayer>(
    pipes: &PipePool,
    client: &impl StreamSocket,
    client_leg: Option<&L>,
    upstream: &impl StreamSocket,
    upstream_leg: Option<&L>,
    park_after: Option<std::time::Duration>,
    mut moving: Option<super::Drained>,
) -> RelayOutcome {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let quiet = Quiet::default();
    let started = tokio::time::Instant::now();
    let both = async {
        tokio::try_join!(
            pump(
                pipes,
                client,
                upstream,
                client_leg,
                upstream_leg,
                &up,
                (&quiet, started)
            ),
            pump(
                pipes,
                upstream,
                client,
                upstream_leg,
                client_leg,
                &down,
                (&quiet, started)
            )
        )
        .map(|_| ())
    };
    let result = if park_after.is_none() && moving.is_none() {
        Some(both.await)
    } else {
        tokio::pin!(both);
        let mut seen = u64::MAX;
        let after = park_after.unwrap_or(std::time::Duration::MAX);
        // When the relay was asked to move.
        let mut asked: Option<tokio::time::Instant> = None;
        // Counted among the relays a takeover waits for while it may still move (from its
        // start, so one asked a moment later is never missed).
        let mut _pending = moving
            .as_ref()
            .map(|_| crate::proxy::moving::MovePending::new());
        loop {
            let tick = if asked.is_some() { MOVE_POLL } else { after };
            tokio::select! {
                result = &mut both => break Some(result),
                () = tokio::time::sleep(tick), if park_after.is_some() || asked.is_some() => {
                    let waiting = quiet.waiting.load(Ordering::Relaxed) == 2;
                    match asked {
                        // Both directions wait without having read anything: the connection
                        // is its sockets alone.
                        Some(_) if waiting => break None,
                        Some(at) if at.elapsed() >= MOVE_WINDOW => {
                            quiet.moving.store(false, Ordering::Relaxed);
                            quiet.resume.notify_waiters();
                            asked = None;
                            moving = None;
                            _pending = None;
                        }
                        Some(_) => {}
                        // Both directions are suspended where they wait for bytes (no pipe,
                        // no write pending), and neither woke since the last check: drop them.
                        None => {
                            let woke = quiet.woke.load(Ordering::Relaxed);
                            if waiting && woke == seen {
                                break None;
                            }
                            seen = woke;
                        }
                    }
                }
                () = super::move_asked_if(moving.as_mut()), if asked.is_none() => {
                    asked = Some(tokio::time::Instant::now());
                    quiet.moving.store(true, Ordering::Relaxed);
                }
            }
        }
    };
    let (up, down) = (up.into_inner(), down.into_inner());
    let last_woke = match quiet.last_woke.into_inner() {
        0 => None,
        nanos => Some(started + std::time::Duration::from_nanos(nanos)),
    };
    RelayOutcome {
        idle: result.is_none(),
        last_woke,
        ..RelayOutcome::moved(up, down, result.unwrap_or(Ok(())))
    }
}

/// How long a direction keeps its pipe waiting for a receiver that takes nothing; then the
/// bytes left in the pipe move to the heap and the pipe goes back to the pool.
const SPILL_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Moves bytes from `src` to `dst` through a pipe borrowed from `pipes` while they are in
/// flight, until `src` ends; then ends `dst`'s direction. A pipe is taken once `dst` was last
/// seen writable, and kept while bytes flow; a receiver that stops reading gets the bytes left
/// in the pipe from the heap after [`SPILL_AFTER`], so it holds up its own direction and not a
/// pipe every other connection may need.
async fn pump<L: RecordLayer>(
    pipes: &PipePool,
    src: &impl StreamSocket,
    dst: &impl StreamSocket,
    src_leg: Option<&L>,
    dst_leg: Option<&L>,
    total: &AtomicU64,
    (quiet, started): (&Quiet, tokio::time::Instant),
) -> Result<(), Failure> {
    // Zero-length application data records read since the last byte (kTLS legs only).
    let mut empty_records = 0u32;
    // What the receive queue held at the last read of 0 bytes, while nothing came since.
    let mut queued_at_last_zero: Option<usize> = None;
    loop {
        quiet.waiting.fetch_add(1, Ordering::Relaxed);
        let readable = src.readable().await;
        // Asked to move: read nothing until the move happens (this future is dropped) or is
        // called off.
        quiet.unless_moving().await;
        quiet.waiting.fetch_sub(1, Ordering::Relaxed);
        quiet.woke.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        quiet.last_woke.store(nanos.max(1), Ordering::Relaxed);
        readable?;
        dst.writable().await?;
        let mut pipe = pipes
            .take()
            .await
            .map_err(|e| Failure::io("pipe2 (splice pipe pool)", &e))?;
        // Keep the pipe while the socket has more; give it back, empty, once it has none (or
        // once the relay is asked to move: the pipe is empty at the top of each round).
        'burst: loop {
            if quiet.moving.load(Ordering::Relaxed) {
                break;
            }
            let n = match src.try_io(Interest::READABLE, || {
                splice::splice(src.as_fd(), pipe.write_end(), SPLICE_CHUNK)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A kTLS socket refuses to splice a non-data record.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && src_leg.is_some() => {
                    // Rare, and its future is large: on the heap for the moment it runs.
                    match src_leg {
                        Some(leg) if Box::pin(leg.control_record(src)).await? => {
                            // close_notify: the end of this direction.
                            drop(pipe);
                            return end_direction(dst, dst_leg);
                        }
                        _ => continue,
                    }
                }
                Err(e) => {
                    let mut failure = Failure::io("splice from a socket", &e);
                    if let Some(sent) = src_leg.and_then(|l| l.record_refused(src, failure.reason))
                    {
                        failure.detail = format!("{}: {sent}", failure.detail);
                    }
                    return Err(failure);
                }
            };
            if n == 0 {
                if src_leg.is_none() {
                    drop(pipe);
                    return end_direction(dst, dst_leg);
                }
                let verdict = crate::sys::receive_side(src.as_fd()).map_or(
                    ZeroRead::End,
                    |(closed, queued)| {
                        let verdict = judge_zero_read(closed, queued, queued_at_last_zero);
                        queued_at_last_zero = Some(queued);
                        verdict
                    },
                );
                match verdict {
                    ZeroRead::EmptyRecord => {
                        empty_records += 1;
                        if empty_records > EMPTY_RECORDS_IN_A_ROW {
                            return Err(Failure::new(
                                Reason::UnexpectedMessage,
                                format!(
                                    "kTLS peer sent more than {EMPTY_RECORDS_IN_A_ROW} zero-length records in a row"
                                ),
                            ));
                        }
                        continue;
                    }
                    ZeroRead::Truncated => {
                        return Err(Failure::new(
                            Reason::Truncated,
                            "kTLS peer closed TCP inside a record",
                        ));
                    }
                    // A TLS peer ends its side with close_notify (read above as a control
                    // record): a FIN without one may be an attacker's cut, and user space
                    // (rustls) names it the same way.
                    ZeroRead::End => {
                        return Err(Failure::new(
                            Reason::Truncated,
                            "kTLS peer closed TCP without close_notify",
                        ));
                    }
                }
            }
            queued_at_last_zero = None;
            empty_records = 0;
            pipe.filled(n);
            let mut left = n;
            while left > 0 {
                let chunk = dst_leg.map_or(left, |leg| left.min(leg.splice_budget()));
                if tokio::time::timeout(SPILL_AFTER, dst.writable())
                    .await
                    .is_err()
                {
                    // The receiver takes nothing: free the pipe for others.
                    let spilled = pipe
                        .spill(left)
                        .map_err(|e| Failure::io("reading a pipe", &e))?;
                    drop(pipe);
                    write_spilled(dst, dst_leg, &spilled).await?;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    // The pipe is gone: borrow one again when more comes.
                    break 'burst;
                }
                match dst.try_io(Interest::WRITABLE, || {
                    splice::splice(pipe.read_end(), dst.as_fd(), chunk)
                }) {
                    Ok(m) => {
                        left -= m;
                        pipe.drained(m);
                        if let Some(leg) = dst_leg
                            && leg.count_sent(m)
                        {
                            Box::pin(leg.near_limit(dst)).await?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(Failure::io("splice into a socket", &e)),
                }
            }
            total.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Writes bytes taken out of a pipe to a receiver that had stopped taking them, in the pieces
/// a kTLS leg's record accounting allows.
async fn write_spilled<L: RecordLayer>(
    dst: &impl StreamSocket,
    dst_leg: Option<&L>,
    mut data: &[u8],
) -> Result<(), Failure> {
    while !data.is_empty() {
        let chunk = dst_leg.map_or(data.len(), |leg| data.len().min(leg.splice_budget()));
        dst.writable().await?;
        match dst.try_write(&data[..chunk]) {
            Ok(m) => {
                data = &data[m..];
                if let Some(leg) = dst_leg
                    && leg.count_sent(m)
                {
                    Box::pin(leg.near_limit(dst)).await?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failure::io("writing to a slow receiver", &e)),
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::{ZeroRead, judge_zero_read};

    #[test]
    fn a_read_of_nothing_is_an_empty_record_the_end_or_a_cut_record() {
        let table = [
            // (peer closed, queued, queued at the last read of 0, verdict)
            (false, 0, None, ZeroRead::EmptyRecord),
            (false, 40, Some(40), ZeroRead::EmptyRecord),
            (true, 0, None, ZeroRead::End),
            (true, 0, Some(9), ZeroRead::End),
            // An empty record with more records and the FIN queued behind it.
            (true, 60, None, ZeroRead::EmptyRecord),
            (true, 60, Some(80), ZeroRead::EmptyRecord),
            // The same bytes left twice: part of a record, then the FIN.
            (true, 9, Some(9), ZeroRead::Truncated),
        ];
        for (closed, queued, before, verdict) in table {
            assert_eq!(
                judge_zero_read(closed, queued, before),
                verdict,
                "closed {closed}, queued {queued}, before {before:?}"
            );
        }
    }
}
